//! Wire types shared by the `bootstrap` agent and the `seeder`: parsed newtypes, join tokens,
//! signed envelopes, manifests, status reports and zero-touch federation credentials. No I/O, no
//! async.

pub mod api;
pub mod credential;
pub mod envelope;
#[doc(hidden)]
pub mod fuzz;
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
    AbsPath, Base64Bytes, Campaign, Ed25519PublicKey, FedId, FileMode, Generation, IssuerId,
    NameError, NodeName, Region, ResourceId, RoleName, Sha256, TrustDomain,
};
pub use status::{CheckRecord, CheckStatus, Phase, ServiceRestarts, StatusReport};
pub use token::{JoinClaims, JoinToken, TokenError};
