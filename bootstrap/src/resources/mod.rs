//! One module per resource kind of the closed [`hiveseed_proto::Resource`] enum. Each owns how
//! its kind is observed (`observe`, read-only), planned (`plan`, pure) and converged (`ensure_*`,
//! called by [`crate::apply`] and nowhere else).

pub mod certificate;
pub mod check;
pub mod command;
pub mod directory;
pub mod federation;
pub mod file;
pub mod package;
pub mod service;
pub mod signed_events;
pub mod standard;
pub mod user;
pub mod wait;

use std::future::Future;
use std::pin::Pin;

use hiveseed_proto::api::{AttestRequest, AttestResponse, CredentialRequest, CredentialResponse};
use hiveseed_proto::{AbsPath, FileMode, Sha256};

use crate::host::{Attrs, Host, HostError};
use crate::supervisor::SupervisorError;

/// What injected async collaborators return: object-safe without a macro crate.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Why converging one resource failed. Never carries secret content.
#[derive(Debug, thiserror::Error)]
pub enum ResourceError {
    #[error(transparent)]
    Host(#[from] HostError),
    #[error(
        "package {package}: candidate {candidate:?} does not match the pinned prefix {prefix:?}"
    )]
    PrefixMismatch {
        package: String,
        prefix: String,
        candidate: String,
    },
    #[error("package {package}: apt has no installation candidate")]
    NoCandidate { package: String },
    #[error("package {package}: after install dpkg reports {got:?}, wanted {wanted}")]
    NotInstalled {
        package: String,
        got: Option<String>,
        wanted: String,
    },
    #[error("artifact {sha256}: fetch failed")]
    Fetch {
        sha256: Sha256,
        #[source]
        source: FetchError,
    },
    #[error(
        "artifact {expected}: got {got_len} bytes with sha256 {got}, wanted {expected_len} bytes"
    )]
    ArtifactMismatch {
        expected: Sha256,
        expected_len: u64,
        got: Sha256,
        got_len: u64,
    },
    #[error("keyring {path}: not valid base64")]
    Keyring { path: AbsPath },
    #[error("certificate {path}: {reason}")]
    Certificate { path: AbsPath, reason: String },
    #[error("certificate {path}: signing request refused")]
    Sign {
        path: AbsPath,
        #[source]
        source: SignError,
    },
    #[error("federation key {path}: {reason}")]
    FederationKey { path: AbsPath, reason: String },
    #[error("federation credential {path}: {reason}")]
    Credential { path: AbsPath, reason: String },
    #[error("federation credential {path}: the seeder refused")]
    CredentialRefused {
        path: AbsPath,
        #[source]
        source: SignError,
    },
    #[error("namespace standard {namespace}: {reason}")]
    Standard { namespace: String, reason: String },
    #[error(transparent)]
    Wait(#[from] wait::WaitError),
    #[error(transparent)]
    Supervisor(#[from] SupervisorError),
    #[error("service {unit}: no systemd and no supervisor was given to apply")]
    NoSupervisor { unit: String },
}

/// Fetches content-addressed artifacts (the seeder's artifact store), writing the bytes to `out`
/// as they arrive so no artifact is held in memory. `out` refuses more than `size` bytes; the
/// caller verifies size and digest.
pub trait ArtifactFetcher: Send + Sync {
    fn fetch<'a>(
        &'a self,
        sha256: &'a Sha256,
        size: u64,
        out: &'a mut (dyn std::io::Write + Send),
    ) -> BoxFuture<'a, Result<(), FetchError>>;
}

#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct FetchError {
    pub message: String,
    pub retryable: bool,
}

/// Sends a CSR to the seeder and returns the PEM chain (leaf first).
pub trait CertSigner: Send + Sync {
    fn sign<'a>(
        &'a self,
        purpose: hiveseed_proto::manifest::CertificatePurpose,
        csr_pem: &'a str,
    ) -> BoxFuture<'a, Result<String, SignError>>;
}

#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct SignError {
    pub message: String,
    pub retryable: bool,
}

/// What the seeder signs for a node's ai-memory daemon: a federation credential for the node's
/// public key, and the attested write of a namespace standard its manifest names.
pub trait CredentialIssuer: Send + Sync {
    fn issue<'a>(
        &'a self,
        req: &'a CredentialRequest,
    ) -> BoxFuture<'a, Result<CredentialResponse, SignError>>;

    fn attest<'a>(
        &'a self,
        _req: &'a AttestRequest,
    ) -> BoxFuture<'a, Result<AttestResponse, SignError>> {
        Box::pin(async {
            Err(SignError {
                message: "no attestation signer configured".into(),
                retryable: false,
            })
        })
    }
}

/// Answers whether another node passed a readiness gate, as the seeder knows it.
pub trait NodeReadiness: Send + Sync {
    fn is_ready<'a>(
        &'a self,
        node: &'a hiveseed_proto::NodeName,
        gate: &'a str,
    ) -> BoxFuture<'a, Result<bool, ReadinessError>>;
}

#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct ReadinessError {
    pub message: String,
}

/// A collaborator for manifests that never use it (and for tests): every call fails.
#[derive(Debug, Clone, Copy, Default)]
pub struct Unavailable;

impl ArtifactFetcher for Unavailable {
    fn fetch<'a>(
        &'a self,
        _: &'a Sha256,
        _: u64,
        _: &'a mut (dyn std::io::Write + Send),
    ) -> BoxFuture<'a, Result<(), FetchError>> {
        Box::pin(async {
            Err(FetchError {
                message: "no artifact fetcher configured".into(),
                retryable: false,
            })
        })
    }
}

impl CertSigner for Unavailable {
    fn sign<'a>(
        &'a self,
        _: hiveseed_proto::manifest::CertificatePurpose,
        _: &'a str,
    ) -> BoxFuture<'a, Result<String, SignError>> {
        Box::pin(async {
            Err(SignError {
                message: "no certificate signer configured".into(),
                retryable: false,
            })
        })
    }
}

impl CredentialIssuer for Unavailable {
    fn issue<'a>(
        &'a self,
        _: &'a CredentialRequest,
    ) -> BoxFuture<'a, Result<CredentialResponse, SignError>> {
        Box::pin(async {
            Err(SignError {
                message: "no credential issuer configured".into(),
                retryable: false,
            })
        })
    }
}

impl NodeReadiness for Unavailable {
    fn is_ready<'a>(
        &'a self,
        _: &'a hiveseed_proto::NodeName,
        _: &'a str,
    ) -> BoxFuture<'a, Result<bool, ReadinessError>> {
        Box::pin(async {
            Err(ReadinessError {
                message: "no readiness source configured".into(),
            })
        })
    }
}

/// `install -d` for every missing ancestor of `path` (0755, owned by the agent): files may be
/// declared without their parent directories, as package-owned directories usually are.
pub fn ensure_parents(host: &dyn Host, path: &AbsPath) -> Result<(), HostError> {
    let mut missing = Vec::new();
    let mut cur = path.parent();
    while let Some(p) = cur {
        if host.stat(&p)?.is_some() {
            break;
        }
        cur = p.parent();
        missing.push(p);
    }
    let attrs = Attrs {
        mode: FileMode::new(0o755).expect("valid mode"),
        owner: None,
    };
    for p in missing.iter().rev() {
        host.mkdir(p, attrs)?;
    }
    Ok(())
}
