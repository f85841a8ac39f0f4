//! Request and response bodies of the seeder's HTTP API, and its bounded set of error kinds.

use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

use crate::envelope::SignedEnvelope;
use crate::manifest::{CertificatePurpose, Manifest};
use crate::names::{Ed25519PublicKey, FedId, Region, Sha256};

/// A DNS name that only the seeder's own server certificate carries and that agents require of
/// the seeder: it has dots, so no node name (one DNS label) is it, and the seeder never puts it in
/// a node's certificate. `.invalid` never resolves (RFC 2606).
pub const SEEDER_CERT_NAME: &str = "seeder.hiveseed.invalid";

/// What a node knows about itself: from the DigitalOcean metadata service or a facts file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeFacts {
    pub droplet_id: u64,
    pub region: Region,
    pub public_ipv4: Ipv4Addr,
    pub private_ipv4: Ipv4Addr,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnrollRequest {
    /// The join token travels in the join URL's query string, not here.
    pub csr_pem: String,
    pub facts: NodeFacts,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnrollResponse {
    /// The node's client certificate, then the campaign CA.
    pub cert_chain_pem: String,
    pub manifest: SignedEnvelope<Manifest>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertRequest {
    pub purpose: CertificatePurpose,
    pub csr_pem: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertResponse {
    pub cert_chain_pem: String,
}

/// A zero-touch federation credential for the node's own key (`POST /v1/credential`). Only the
/// public half travels; `fed_id` is what the node expects, and the seeder refuses any other than
/// the one it derives from the node's identity certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CredentialRequest {
    pub fed_id: FedId,
    pub subject_pubkey: Ed25519PublicKey,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CredentialResponse {
    /// `v1=<base64(CBOR)>`, the file content and `X-Memory-Cred` header value.
    pub credential: String,
    /// Unix seconds.
    pub not_after: i64,
}

/// A signature for an attested ai-memory write the node's manifest asks for
/// (`POST /v1/attest`): the seeder signs as the standard's owner, only a memory that a
/// `namespace_standard` resource of the node's current manifest names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttestRequest {
    pub namespace: String,
    pub title: String,
    pub kind: String,
    /// SHA-256 of the memory's content.
    pub content_sha256: Sha256,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttestResponse {
    pub agent_id: String,
    /// RFC 3339 (`2026-06-01T12:00:00+00:00`); the daemon accepts it within ±300 s of its clock.
    pub created_at: String,
    /// Standard base64 Ed25519 over the canonical-CBOR `SignableWrite` envelope.
    pub signature: String,
}

/// Whether a node has reached a readiness gate (`GET /v1/ready/{node}/{gate}`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Readiness {
    pub node: crate::names::NodeName,
    pub gate: String,
    pub ready: bool,
    /// The node's last reported phase, for `waiting blocked_on=` messages.
    pub phase: String,
}

/// The bounded set of error kinds the seeder answers with (`{"kind", "message"}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    BadRequest,
    BadToken,
    BadCsr,
    SourceMismatch,
    Unauthenticated,
    Revoked,
    Forbidden,
    NotFound,
    MethodNotAllowed,
    Conflict,
    TooLarge,
    RateLimited,
    /// The seeder is at a capacity limit (concurrent downloads); retry after `Retry-After`.
    Busy,
    Internal,
    /// Residency attestation found the enrolling droplet is not the node: the cloud's record of
    /// the droplet differs in the field the message names. Permanent.
    AttestationFailed,
    /// Residency attestation could not ask the cloud (API down, slow, or refusing the seeder's
    /// token); retry after `Retry-After`.
    AttestationUnavailable,
}

impl ErrorKind {
    /// Whether a client should retry the same request later.
    pub fn retryable(self) -> bool {
        matches!(
            self,
            ErrorKind::RateLimited
                | ErrorKind::Busy
                | ErrorKind::Internal
                | ErrorKind::AttestationUnavailable
        )
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{kind:?}: {message}")]
pub struct ApiError {
    pub kind: ErrorKind,
    pub message: String,
}
