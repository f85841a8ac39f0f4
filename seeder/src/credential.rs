//! Zero-touch federation credentials: the wire format (mint, and verify by the receiver's rules)
//! lives in `hiveseed_proto::credential`, shared with the agent, which checks what it receives.

pub use hiveseed_proto::credential::*;
