//! Wire types shared by the `bootstrap` agent and the `seeder`: parsed newtypes, join tokens,
//! signed envelopes, manifests and status reports. No I/O, no async.

pub mod api;
pub mod envelope;
pub mod join;
pub mod manifest;
pub mod names;
pub mod status;
pub mod token;

pub use envelope::{canonical_bytes, EnvelopeError, KeyId, Signable, SignedEnvelope};
pub use manifest::{
    check_generation, verify_manifest, Applied, GenerationError, GenerationVerdict, Manifest,
    ManifestError, Resource, VerifiedManifest,
};
pub use names::{
    AbsPath, Campaign, FileMode, Generation, NameError, NodeName, Region, ResourceId, RoleName,
    Sha256,
};
pub use status::{CheckRecord, CheckStatus, Phase, StatusReport};
pub use token::{JoinClaims, JoinToken, TokenError};
