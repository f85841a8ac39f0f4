//! The manifest: one node's desired state, a list of resources of a closed set of kinds.
//!
//! The seeder renders and signs it; the agent verifies it (signature, node, expiry, digest,
//! generation) before anything is planned. Everything in it is concrete: the agent never computes
//! fleet topology.

use std::collections::BTreeSet;

use ed25519_dalek::VerifyingKey;
use serde::{Deserialize, Serialize};

use crate::envelope::{canonical_bytes, EnvelopeError, Signable, SignedEnvelope};
use crate::names::{
    AbsPath, Base64Bytes, Campaign, Ed25519PublicKey, FedId, FileMode, Generation, IssuerId,
    NameError, NodeName, Region, ResourceId, RoleName, Sha256, TrustDomain,
};

pub const MANIFEST_VERSION: u8 = 1;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub v: u8,
    pub campaign: Campaign,
    pub node: NodeName,
    pub role: RoleName,
    pub region: Region,
    pub generation: Generation,
    /// Unix seconds.
    pub issued_at: u64,
    /// Unix seconds; an agent refuses the manifest after this.
    pub not_after: u64,
    /// SHA-256 of the canonical bytes of `resources`: the content identity of this generation.
    pub digest: Sha256,
    /// How often the agent reports while idle; the seeder counts a node silent for 2x this as missing.
    pub report_interval_secs: u32,
    pub resources: Vec<Resource>,
}

impl Signable for Manifest {
    const CONTEXT: &'static str = "hiveseed/manifest/v1";
}

impl Manifest {
    /// The digest a manifest with these resources must carry.
    pub fn digest_of(resources: &[Resource]) -> Sha256 {
        Sha256::digest(&canonical_bytes(&resources))
    }

    /// Internal consistency: digest, unique ids, `notify` edges to existing earlier resources.
    pub fn check_consistency(&self) -> Result<(), ManifestError> {
        if self.v != MANIFEST_VERSION {
            return Err(ManifestError::UnsupportedVersion(self.v));
        }
        if Self::digest_of(&self.resources) != self.digest {
            return Err(ManifestError::DigestMismatch);
        }
        if self.not_after <= self.issued_at {
            return Err(ManifestError::Invalid(
                "not_after is not after issued_at".into(),
            ));
        }
        let mut seen = BTreeSet::new();
        for r in &self.resources {
            if let Resource::Service(s) = r {
                for input in &s.notify {
                    if !seen.contains(input) {
                        return Err(ManifestError::Invalid(format!(
                            "service {} is notified by {input}, which is not an earlier resource",
                            s.id
                        )));
                    }
                }
            }
            if let Resource::NamespaceStandard(n) = r {
                n.validate()?;
            }
            if let Resource::Check(c) = r {
                c.validate()?;
            }
            if !seen.insert(r.id().clone()) {
                return Err(ManifestError::Invalid(format!(
                    "resource id {} appears twice",
                    r.id()
                )));
            }
        }
        Ok(())
    }
}

/// The closed set of resource kinds. Anything else in a manifest is refused at parse time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Resource {
    Package(Package),
    Directory(Directory),
    File(File),
    User(User),
    Certificate(Certificate),
    FederationKey(FederationKey),
    FederationCredential(FederationCredential),
    Command(Command),
    Service(Service),
    Wait(Wait),
    NamespaceStandard(NamespaceStandard),
    Check(Check),
}

impl Resource {
    pub fn id(&self) -> &ResourceId {
        match self {
            Resource::Package(r) => &r.id,
            Resource::Directory(r) => &r.id,
            Resource::File(r) => &r.id,
            Resource::User(r) => &r.id,
            Resource::Certificate(r) => &r.id,
            Resource::FederationKey(r) => &r.id,
            Resource::FederationCredential(r) => &r.id,
            Resource::Command(r) => &r.id,
            Resource::Service(r) => &r.id,
            Resource::Wait(r) => &r.id,
            Resource::NamespaceStandard(r) => &r.id,
            Resource::Check(r) => &r.id,
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Resource::Package(_) => "package",
            Resource::Directory(_) => "directory",
            Resource::File(_) => "file",
            Resource::User(_) => "user",
            Resource::Certificate(_) => "certificate",
            Resource::FederationKey(_) => "federation_key",
            Resource::FederationCredential(_) => "federation_credential",
            Resource::Command(_) => "command",
            Resource::Service(_) => "service",
            Resource::Wait(_) => "wait",
            Resource::NamespaceStandard(_) => "namespace_standard",
            Resource::Check(_) => "check",
        }
    }
}

/// Debian packages installed in one apt transaction, optionally from an extra apt source.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Package {
    pub id: ResourceId,
    pub packages: Vec<PackagePin>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<AptSource>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PackagePin {
    pub name: String,
    /// `Exact` installs `name=version`; `Prefix` accepts any candidate starting with it (distro
    /// suites keep only the newest point release, so exact pins rot there).
    pub version: VersionPin,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum VersionPin {
    Exact(String),
    Prefix(String),
    Any,
}

/// An extra apt repository: its sources entry and the keyring it is signed with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AptSource {
    pub name: String,
    pub uri: String,
    pub suite: String,
    pub components: Vec<String>,
    /// The armored or binary keyring, base64; written to `/usr/share/keyrings/<name>.gpg`.
    pub keyring_b64: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ownership {
    pub owner: String,
    pub group: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Directory {
    pub id: ResourceId,
    pub path: AbsPath,
    pub mode: FileMode,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<Ownership>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct File {
    pub id: ResourceId,
    pub path: AbsPath,
    pub mode: FileMode,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<Ownership>,
    pub content: FileContent,
    /// Secret content is never logged, never reported, and must not be readable by group/others.
    #[serde(default)]
    pub secret: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum FileContent {
    Text {
        text: String,
    },
    /// Fetched from the seeder's content-addressed artifact store and verified against the digest.
    Artifact {
        sha256: Sha256,
        size: u64,
    },
    /// Binary content carried inline, e.g. a raw 32-byte key for a trust bundle.
    Base64 {
        base64: Base64Bytes,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct User {
    pub id: ResourceId,
    pub name: String,
    #[serde(default)]
    pub system: bool,
    /// A pinned uid (and gid of the user's group); `None` lets useradd pick.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub home: Option<AbsPath>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shell: Option<AbsPath>,
}

/// Which certificate the seeder signs for a CSR: it picks subject and SANs from accepted facts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CertificatePurpose {
    /// TLS server for the node's public address (ai-memory API).
    Server,
    /// TLS server for the node's private and public address (PostgreSQL).
    PgServer,
    /// TLS client identity (mesh client, allowlisted by fingerprint).
    Client,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Certificate {
    pub id: ResourceId,
    pub purpose: CertificatePurpose,
    /// Private key, generated on the node, never sent anywhere.
    pub key_path: AbsPath,
    pub cert_path: AbsPath,
    pub key_mode: FileMode,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<Ownership>,
    /// Where the issuing CA goes (the certificates after the leaf in the seeder's answer):
    /// written by the agent from the seeder's bytes, root:root 0644, so the trust anchor never
    /// passes through a file the certificate's owner can write.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_path: Option<AbsPath>,
}

/// Modes of the zero-touch federation files (reference spec §6). ai-memory refuses a `.priv`
/// with any group or other bit; it reads all three as the daemon's user (the resource's owner).
pub const FEDERATION_KEY_MODE: u32 = 0o400;
pub const FEDERATION_PUB_MODE: u32 = 0o444;
pub const FEDERATION_CREDENTIAL_MODE: u32 = 0o400;

/// A node's zero-touch federation key, generated on the node and never sent anywhere:
/// `<key_dir>/<fed_id>.priv` (raw 32-byte Ed25519 seed, 0400) and `.pub` next to it (raw 32
/// bytes, 0444), in nested directories for the slashed id (created 0700, owned like the key) —
/// the layout ai-memory's signer loads for `--federation-identity` with `AI_MEMORY_KEY_DIR`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FederationKey {
    pub id: ResourceId,
    pub fed_id: FedId,
    pub key_dir: AbsPath,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<Ownership>,
}

impl FederationKey {
    pub fn key_path(&self) -> Result<AbsPath, NameError> {
        federation_key_path(&self.key_dir, &self.fed_id, "priv")
    }

    pub fn pub_path(&self) -> Result<AbsPath, NameError> {
        federation_key_path(&self.key_dir, &self.fed_id, "pub")
    }
}

fn federation_key_path(dir: &AbsPath, fed_id: &FedId, ext: &str) -> Result<AbsPath, NameError> {
    dir.join(&format!("{fed_id}.{ext}"))
}

/// The campaign's federation CA as a node must trust it: the credential's issuer and domain, and
/// the key its signature must verify under.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FederationIssuer {
    pub id: IssuerId,
    pub trust_domain: TrustDomain,
    pub public_key: Ed25519PublicKey,
}

/// A credential (`v1=<base64(CBOR)>`, 0400) binding `fed_id` to the public half of the key at
/// `<key_dir>/<fed_id>.priv`, signed by `issuer`. Only the public key goes to the seeder, which
/// picks the subject from the node's identity certificate. Requested when missing, unreadable,
/// not `issuer`'s, for another identity or key, or past 2/3 of its lifetime.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FederationCredential {
    pub id: ResourceId,
    pub fed_id: FedId,
    pub key_dir: AbsPath,
    pub credential_path: AbsPath,
    pub issuer: FederationIssuer,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<Ownership>,
}

impl FederationCredential {
    pub fn key_path(&self) -> Result<AbsPath, NameError> {
        federation_key_path(&self.key_dir, &self.fed_id, "priv")
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Command {
    pub id: ResourceId,
    /// Run directly, never through a shell.
    pub argv: Vec<String>,
    /// Skip when this path exists.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub creates: Option<AbsPath>,
    /// Skip when this argv exits 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unless: Option<Vec<String>>,
    /// Fed on stdin: the only way a secret reaches a command.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdin: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Re-run when one of these resources changed in this apply.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub refresh_on: Vec<ResourceId>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Service {
    pub id: ResourceId,
    /// Unit name, e.g. `ai-memory.service`.
    pub unit: String,
    /// The full unit file text; under systemd it is written to /etc/systemd/system, elsewhere the
    /// agent's supervisor runs it.
    pub unit_text: String,
    /// Restart the service when any of these resources changed in this apply.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notify: Vec<ResourceId>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Wait {
    pub id: ResourceId,
    pub target: WaitTarget,
    pub timeout_secs: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum WaitTarget {
    /// Another node's readiness gate, as the seeder knows it.
    Node { node: NodeName, gate: String },
    /// A TCP connect.
    Tcp { host: String, port: u16 },
    /// HTTPS GET with the node's client certificate; success is a 2xx.
    Https {
        url: String,
        ca_path: AbsPath,
        cert_path: AbsPath,
        key_path: AbsPath,
    },
    /// PostgreSQL login over `sslmode=verify-full`, then the schema must exist.
    Postgres {
        host: String,
        port: u16,
        dbname: String,
        user: String,
        password_file: AbsPath,
        ca_path: AbsPath,
        schema: String,
        /// Connect from this local address (pg_hba admits the node's private address, not
        /// whatever source the kernel would pick).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        source: Option<std::net::IpAddr>,
    },
}

/// An ai-memory namespace standard (Batman Forms 2 and 6, reference spec §3.4): the node's own
/// daemon binds `namespace` to a standard memory carrying `governance`. The memory is an attested
/// write by `owner`, whose key only the seeder holds: the agent registers `owner` on its daemon,
/// binds `owner.public_key` to it (as `owner`, the daemon's admin agent), asks the seeder to sign
/// exactly this memory, writes it and points the namespace at it. Converged when the daemon
/// reports a standard with this title whose governance holds every field given here.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NamespaceStandard {
    pub id: ResourceId,
    /// The daemon's API base, `https://<host>:<port>`.
    pub url: String,
    pub ca_path: AbsPath,
    pub cert_path: AbsPath,
    pub key_path: AbsPath,
    /// The daemon's API key (`x-api-key`); read on the node, never in the manifest.
    pub api_key_file: AbsPath,
    pub namespace: String,
    pub owner: StandardOwner,
    pub memory: StandardMemory,
    /// The `GovernancePolicy` object (`ai-memory namespace batman-policy --json`).
    pub governance: serde_json::Value,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StandardOwner {
    pub agent_id: String,
    pub public_key: Ed25519PublicKey,
}

/// The standard memory: what the seeder signs (with `namespace` and a fresh `created_at`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StandardMemory {
    pub title: String,
    /// The daemon's memory kind (`observation`, ...), part of the signed envelope.
    pub kind: String,
    pub content: String,
}

/// Limits on the texts of a namespace standard; ai-memory refuses far less anyway.
const STANDARD_TEXT_MAX: usize = 4096;

fn plain_text(what: &str, s: &str, max: usize) -> Result<(), ManifestError> {
    if s.trim().is_empty() {
        return Err(ManifestError::Invalid(format!("{what} is empty")));
    }
    if s.len() > max {
        return Err(ManifestError::Invalid(format!(
            "{what} is longer than {max} bytes"
        )));
    }
    if s.chars().any(|c| c.is_control() && c != '\n') {
        return Err(ManifestError::Invalid(format!(
            "{what} contains control characters"
        )));
    }
    Ok(())
}

impl NamespaceStandard {
    pub fn validate(&self) -> Result<(), ManifestError> {
        let what = |f: &str| format!("namespace_standard {}: {f}", self.id);
        if !self.url.starts_with("https://") || self.url.contains(char::is_whitespace) {
            return Err(ManifestError::Invalid(what(
                "url must be https://host:port",
            )));
        }
        plain_text(&what("namespace"), &self.namespace, 128)?;
        if self.namespace.contains(char::is_whitespace) {
            return Err(ManifestError::Invalid(what(
                "namespace contains whitespace",
            )));
        }
        plain_text(&what("owner.agent_id"), &self.owner.agent_id, 128)?;
        if self
            .owner
            .agent_id
            .contains(|c: char| c.is_whitespace() || c == '/')
        {
            return Err(ManifestError::Invalid(what(
                "owner.agent_id contains whitespace or a slash",
            )));
        }
        plain_text(&what("memory.title"), &self.memory.title, 512)?;
        plain_text(&what("memory.kind"), &self.memory.kind, 64)?;
        plain_text(
            &what("memory.content"),
            &self.memory.content,
            STANDARD_TEXT_MAX,
        )?;
        match &self.governance {
            serde_json::Value::Object(m) if !m.is_empty() => Ok(()),
            _ => Err(ManifestError::Invalid(what(
                "governance must be a non-empty JSON object",
            ))),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Check {
    pub id: ResourceId,
    /// The check's name in reports, e.g. `binary.sha256`.
    pub check: String,
    pub expected: String,
    /// How the observed value is held against `expected` (`match = "..."` in a role; exact when
    /// absent, and then not serialized, so existing manifests keep their digests).
    #[serde(rename = "match", default, skip_serializing_if = "Match::is_exact")]
    pub matching: Match,
    pub probe: Probe,
}

/// How a check's observed value (GOT, always what was measured) passes against `expected`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Match {
    /// GOT equals `expected`.
    #[default]
    Exact,
    /// GOT equals `expected` or continues it at a dot: `17` holds for `17.12`, `18.4` pins a
    /// point release and refuses `18.40`.
    VersionPrefix,
    /// `expected` is a regular expression (the `regex` crate's syntax) that must match the whole
    /// of GOT, as if written `^(?:...)$`.
    Regex,
}

impl Match {
    pub fn is_exact(&self) -> bool {
        *self == Match::Exact
    }
}

impl Check {
    /// Whether `got` passes. An `expected` that is not a valid pattern is an error (a manifest
    /// that passed [`Manifest::check_consistency`] has none).
    pub fn passes(&self, got: &str) -> Result<bool, ManifestError> {
        Ok(match self.matching {
            Match::Exact => got == self.expected,
            Match::VersionPrefix => got
                .strip_prefix(self.expected.as_str())
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('.')),
            Match::Regex => self.pattern()?.is_match(got),
        })
    }

    fn pattern(&self) -> Result<regex::Regex, ManifestError> {
        let invalid = |e: regex::Error| {
            ManifestError::Invalid(format!(
                "check {}: expected is not a regular expression: {e}",
                self.id
            ))
        };
        // Compiled alone first: only a pattern that stands by itself is anchored, so `a)|(b`
        // cannot turn the anchors into alternatives.
        regex::Regex::new(&self.expected).map_err(invalid)?;
        regex::Regex::new(&format!("^(?:{})$", self.expected)).map_err(invalid)
    }

    fn validate(&self) -> Result<(), ManifestError> {
        match self.matching {
            Match::Regex => self.pattern().map(|_| ()),
            Match::Exact | Match::VersionPrefix => Ok(()),
        }
    }
}

/// How a node-local check observes its value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Probe {
    FileSha256 {
        path: AbsPath,
    },
    /// The trimmed stdout of argv, compared exactly: the command prints the measured value and
    /// nothing else.
    CommandOutput {
        argv: Vec<String>,
    },
    /// argv's stdout parsed as JSON; `field` selects the value as in `https_json`.
    CommandJson {
        argv: Vec<String>,
        field: String,
    },
    /// A JSON field of a plain-HTTP GET to a loopback service (a sidecar such as Ollama, which
    /// serves no TLS); any other host is refused.
    HttpJson {
        url: String,
        field: String,
    },
    /// A JSON field of an HTTPS GET made with the node's client certificate. `field` is a dotted
    /// path (`a.b.0.c`); a `*` segment takes the rest of the path from every element of an
    /// array, `*[k=v]` from those whose field `k` is `v`, joined with `,` (`[]` when none).
    HttpsJson {
        url: String,
        field: String,
        ca_path: AbsPath,
        cert_path: AbsPath,
        key_path: AbsPath,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        api_key_file: Option<AbsPath>,
    },
    /// A single-value SQL query over the local socket (`/var/run/postgresql`) as database role
    /// `user` (peer authentication; the pg role maps the agent's root to it in pg_ident.conf).
    Sql {
        dbname: String,
        user: String,
        query: String,
    },
    /// ai-memory 0.7.0's `signed_events` hash chain in `schema` of `dbname`, recomputed from the
    /// stored rows over the local socket as `user` (as [`Probe::Sql`]). Reports
    /// `linked (N events)`, or `broken at event K of N: <why>`.
    SignedEventsChain {
        dbname: String,
        user: String,
        schema: String,
    },
    /// A plaintext TCP connection (`sslmode=disable`) to a PostgreSQL server as `user` with the
    /// password in `password_file`, from `source` when given (the address pg_hba sees). Reports
    /// `refused: <the server's message>` when the server refuses it, `connected without TLS`
    /// when it admits it; no TCP connection, or no answer in time, is an error, never a refusal.
    PgPlaintext {
        host: std::net::IpAddr,
        port: u16,
        dbname: String,
        user: String,
        password_file: AbsPath,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        source: Option<std::net::IpAddr>,
    },
    /// How many running processes have this exact argv[0] + first argument.
    ProcessCount {
        exe: AbsPath,
        arg: String,
    },
    /// Whether the service manager reports the unit running.
    ServiceActive {
        unit: String,
    },
    /// A zero-touch credential file verified as a receiving ai-memory peer would (ai-memory's
    /// `verify-cred`): against the issuer keys (raw 32-byte `<issuer_id>.pub` files, the id
    /// being the file stem) and the trust domain. Reports the credential's subject.
    FederationCredential {
        credential_path: AbsPath,
        issuer_keys: Vec<AbsPath>,
        trust_domain: String,
    },
    /// A JSON field (`title`, `metadata.governance.auto_atomise_mode`, ...) of the standard
    /// memory an ai-memory daemon binds `namespace` to, read as `agent_id` with the node's client
    /// certificate; `unset` when the namespace has no standard.
    NamespaceStandard {
        url: String,
        ca_path: AbsPath,
        cert_path: AbsPath,
        key_path: AbsPath,
        api_key_file: AbsPath,
        namespace: String,
        agent_id: String,
        field: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    #[error(transparent)]
    Envelope(#[from] EnvelopeError),
    #[error("manifest version {0} is not supported")]
    UnsupportedVersion(u8),
    #[error("manifest is for node {got}, this node is {expected}")]
    WrongNode { expected: NodeName, got: NodeName },
    #[error("manifest is for campaign {got}, not {expected}")]
    WrongCampaign { expected: Campaign, got: Campaign },
    #[error("manifest expired at {not_after} (now {now})")]
    Expired { not_after: u64, now: u64 },
    #[error("manifest digest does not match its resources")]
    DigestMismatch,
    #[error("manifest is invalid: {0}")]
    Invalid(String),
    #[error(transparent)]
    Generation(#[from] GenerationError),
}

/// What the agent last applied: the generation rules compare against it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Applied {
    pub generation: Generation,
    pub digest: Sha256,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GenerationVerdict {
    /// Nothing applied yet.
    First,
    /// A newer generation: converge to it.
    Newer,
    /// Same generation and digest: re-plan to repair drift (usually an empty plan).
    Same,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum GenerationError {
    #[error("manifest generation {offered} is older than the applied generation {applied}")]
    RolledBack {
        applied: Generation,
        offered: Generation,
    },
    #[error("manifest generation {generation} was already applied with a different digest")]
    DigestConflict { generation: Generation },
}

/// The generation rules (omicron ledgers): older → refuse; same generation with another digest →
/// refuse; same generation and digest → repair; newer → converge.
pub fn check_generation(
    applied: Option<Applied>,
    generation: Generation,
    digest: Sha256,
) -> Result<GenerationVerdict, GenerationError> {
    let Some(applied) = applied else {
        return Ok(GenerationVerdict::First);
    };
    match generation.cmp(&applied.generation) {
        std::cmp::Ordering::Less => Err(GenerationError::RolledBack {
            applied: applied.generation,
            offered: generation,
        }),
        std::cmp::Ordering::Equal if digest != applied.digest => {
            Err(GenerationError::DigestConflict { generation })
        }
        std::cmp::Ordering::Equal => Ok(GenerationVerdict::Same),
        std::cmp::Ordering::Greater => Ok(GenerationVerdict::Newer),
    }
}

/// A manifest that passed every check an agent makes before planning.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedManifest {
    pub manifest: Manifest,
    pub verdict: GenerationVerdict,
}

/// Everything an agent checks, in order: signature, campaign, node, expiry, consistency, generation.
pub fn verify_manifest(
    envelope: &SignedEnvelope<Manifest>,
    key: &VerifyingKey,
    campaign: &Campaign,
    node: &NodeName,
    now: u64,
    applied: Option<Applied>,
) -> Result<VerifiedManifest, ManifestError> {
    let manifest = envelope.verify(key)?;
    if &manifest.campaign != campaign {
        return Err(ManifestError::WrongCampaign {
            expected: campaign.clone(),
            got: manifest.campaign,
        });
    }
    if &manifest.node != node {
        return Err(ManifestError::WrongNode {
            expected: node.clone(),
            got: manifest.node,
        });
    }
    if now >= manifest.not_after {
        return Err(ManifestError::Expired {
            not_after: manifest.not_after,
            now,
        });
    }
    manifest.check_consistency()?;
    let verdict = check_generation(applied, manifest.generation, manifest.digest)?;
    Ok(VerifiedManifest { manifest, verdict })
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::SigningKey;
    use rand::rngs::OsRng;

    fn resources() -> Vec<Resource> {
        vec![
            Resource::Directory(Directory {
                id: "dir:tls".parse().unwrap(),
                path: "/etc/ai-memory/tls".parse().unwrap(),
                mode: "0700".parse().unwrap(),
                owner: None,
            }),
            Resource::File(File {
                id: "file:env".parse().unwrap(),
                path: "/etc/ai-memory/ai-memory.env".parse().unwrap(),
                mode: "0400".parse().unwrap(),
                owner: None,
                content: FileContent::Text {
                    text: "A=1\n".into(),
                },
                secret: true,
            }),
            Resource::Service(Service {
                id: "service:ai-memory".parse().unwrap(),
                unit: "ai-memory.service".into(),
                unit_text: "[Service]\nExecStart=/bin/true\n".into(),
                notify: vec!["file:env".parse().unwrap()],
            }),
        ]
    }

    fn manifest(generation: u64) -> Manifest {
        let resources = resources();
        Manifest {
            v: MANIFEST_VERSION,
            campaign: "do-1461".parse().unwrap(),
            node: "do-1461-peer-nyc3-01".parse().unwrap(),
            role: "peer".parse().unwrap(),
            region: "nyc3".parse().unwrap(),
            generation: Generation(generation),
            issued_at: 100,
            not_after: 10_000,
            digest: Manifest::digest_of(&resources),
            report_interval_secs: 30,
            resources,
        }
    }

    fn check(
        env: &SignedEnvelope<Manifest>,
        key: &SigningKey,
        applied: Option<Applied>,
    ) -> Result<VerifiedManifest, ManifestError> {
        verify_manifest(
            env,
            &key.verifying_key(),
            &"do-1461".parse().unwrap(),
            &"do-1461-peer-nyc3-01".parse().unwrap(),
            500,
            applied,
        )
    }

    #[test]
    fn generation_rules() {
        let d1 = Sha256::digest(b"1");
        let d2 = Sha256::digest(b"2");
        let at = |g| {
            Some(Applied {
                generation: Generation(g),
                digest: d1,
            })
        };
        assert_eq!(
            check_generation(None, Generation(1), d1),
            Ok(GenerationVerdict::First)
        );
        assert_eq!(
            check_generation(at(3), Generation(4), d2),
            Ok(GenerationVerdict::Newer)
        );
        assert_eq!(
            check_generation(at(3), Generation(3), d1),
            Ok(GenerationVerdict::Same)
        );
        assert_eq!(
            check_generation(at(3), Generation(2), d1),
            Err(GenerationError::RolledBack {
                applied: Generation(3),
                offered: Generation(2)
            })
        );
        assert_eq!(
            check_generation(at(3), Generation(3), d2),
            Err(GenerationError::DigestConflict {
                generation: Generation(3)
            })
        );
    }

    #[test]
    fn verify_accepts_good_and_refuses_each_fault() {
        let key = SigningKey::generate(&mut OsRng);
        let env = SignedEnvelope::sign(&manifest(2), &key);
        let ok = check(&env, &key, None).unwrap();
        assert_eq!(ok.verdict, GenerationVerdict::First);

        let other = SigningKey::generate(&mut OsRng);
        assert!(matches!(
            check(&env, &other, None),
            Err(ManifestError::Envelope(_))
        ));

        let mut m = manifest(2);
        m.node = "do-1461-peer-nyc3-02".parse().unwrap();
        let e = SignedEnvelope::sign(&m, &key);
        assert!(matches!(
            check(&e, &key, None),
            Err(ManifestError::WrongNode { .. })
        ));

        let mut m = manifest(2);
        m.campaign = "other".parse().unwrap();
        let e = SignedEnvelope::sign(&m, &key);
        assert!(matches!(
            check(&e, &key, None),
            Err(ManifestError::WrongCampaign { .. })
        ));

        let mut m = manifest(2);
        m.not_after = 400;
        let e = SignedEnvelope::sign(&m, &key);
        assert!(matches!(
            check(&e, &key, None),
            Err(ManifestError::Expired { .. })
        ));

        let mut m = manifest(2);
        m.digest = Sha256::digest(b"other");
        let e = SignedEnvelope::sign(&m, &key);
        assert_eq!(check(&e, &key, None), Err(ManifestError::DigestMismatch));

        let applied = Applied {
            generation: Generation(3),
            digest: manifest(3).digest,
        };
        assert!(matches!(
            check(&env, &key, Some(applied)),
            Err(ManifestError::Generation(
                GenerationError::RolledBack { .. }
            ))
        ));

        let mut m = manifest(2);
        if let Resource::Service(s) = &mut m.resources[2] {
            s.notify = vec!["file:missing".parse().unwrap()];
        }
        m.digest = Manifest::digest_of(&m.resources);
        let e = SignedEnvelope::sign(&m, &key);
        assert!(matches!(
            check(&e, &key, None),
            Err(ManifestError::Invalid(_))
        ));
    }

    #[test]
    fn unknown_resource_kind_and_fields_are_refused() {
        let mut v = serde_json::to_value(manifest(1)).unwrap();
        v["resources"][0]["kind"] = "shell".into();
        let err = serde_json::from_value::<Manifest>(v)
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown variant `shell`"), "{err}");

        let mut v = serde_json::to_value(manifest(1)).unwrap();
        v["resources"][1]["path"] = "/etc/../root/x".into();
        assert!(serde_json::from_value::<Manifest>(v).is_err());

        let mut v = serde_json::to_value(manifest(1)).unwrap();
        v["resources"][1]["surprise"] = true.into();
        assert!(serde_json::from_value::<Manifest>(v).is_err());
    }

    fn federation_credential_json() -> serde_json::Value {
        serde_json::json!({
            "kind": "federation_credential",
            "id": "credential:federation",
            "fed_id": "do-1461/nyc3/do-1461-peer-nyc3-01",
            "key_dir": "/etc/ai-memory/keys",
            "credential_path": "/etc/ai-memory/credential",
            "issuer": {
                "id": "do-1461-ca",
                "trust_domain": "do-1461.fleet",
                "public_key": "11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo=",
            },
            "owner": {"owner": "ai-memory", "group": "ai-memory"},
        })
    }

    #[test]
    fn federation_resources_parse_and_name_their_key_files() {
        let Resource::FederationCredential(c) =
            serde_json::from_value(federation_credential_json()).unwrap()
        else {
            panic!()
        };
        assert_eq!(
            c.key_path().unwrap().as_str(),
            "/etc/ai-memory/keys/do-1461/nyc3/do-1461-peer-nyc3-01.priv"
        );
        let Resource::FederationKey(k) = serde_json::from_value(serde_json::json!({
            "kind": "federation_key", "id": "key:federation",
            "fed_id": "do-1461/nyc3/do-1461-peer-nyc3-01", "key_dir": "/",
        }))
        .unwrap() else {
            panic!()
        };
        assert_eq!(
            k.pub_path().unwrap().as_str(),
            "/do-1461/nyc3/do-1461-peer-nyc3-01.pub"
        );
        assert_eq!(Resource::FederationKey(k.clone()).kind(), "federation_key");
    }

    #[test]
    fn hostile_federation_fields_are_refused_naming_the_field() {
        let cases: [(&str, serde_json::Value, &str); 5] = [
            ("fed_id", "do-1461/nyc3".into(), "federation identity"),
            ("fed_id", "do-1461/../x".into(), "federation identity"),
            ("key_dir", "keys".into(), "must be absolute"),
            (
                "issuer",
                serde_json::json!({"id": "a/b", "trust_domain": "d", "public_key": "11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo="}),
                "issuer id",
            ),
            (
                "issuer",
                serde_json::json!({"id": "ca", "trust_domain": "d", "public_key": "AAAA"}),
                "must be exactly 32 bytes",
            ),
        ];
        for (field, value, needle) in cases {
            let mut v = federation_credential_json();
            v[field] = value;
            let err = serde_json::from_value::<Resource>(v)
                .unwrap_err()
                .to_string();
            assert!(err.contains(needle), "{field}: {err}");
        }
        let mut v = federation_credential_json();
        v["private_key"] = "x".into();
        assert!(serde_json::from_value::<Resource>(v).is_err());
    }

    fn namespace_standard_json() -> serde_json::Value {
        serde_json::json!({
            "kind": "namespace_standard",
            "id": "standard:campaign",
            "url": "https://127.1.1.2:9077",
            "ca_path": "/etc/ai-memory/tls/ca.pem",
            "cert_path": "/etc/ai-memory/tls/client.pem",
            "key_path": "/etc/ai-memory/tls/client.key",
            "api_key_file": "/etc/ai-memory/api.key",
            "namespace": "do-1461",
            "owner": {
                "agent_id": "ai:do-1461-operator@do-1461",
                "public_key": "11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo=",
            },
            "memory": {"title": "batman-active standard for do-1461", "kind": "observation", "content": "Form 2 + Form 6"},
            "governance": {"auto_atomise": true, "write": "owner"},
        })
    }

    fn with_resource(r: Resource) -> Manifest {
        let mut m = manifest(1);
        m.resources.push(r);
        m.digest = Manifest::digest_of(&m.resources);
        m
    }

    #[test]
    fn namespace_standard_parses_and_passes_consistency() {
        let r: Resource = serde_json::from_value(namespace_standard_json()).unwrap();
        assert_eq!(r.kind(), "namespace_standard");
        with_resource(r).check_consistency().unwrap();
    }

    #[test]
    fn hostile_namespace_standards_are_refused_naming_the_field() {
        let cases: [(&str, serde_json::Value, &str); 8] = [
            ("url", "http://127.1.1.2:9077".into(), "url must be https"),
            ("namespace", "".into(), "namespace is empty"),
            (
                "namespace",
                "do 1461".into(),
                "namespace contains whitespace",
            ),
            (
                "owner",
                serde_json::json!({"agent_id": "ai:x/y", "public_key": "11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo="}),
                "owner.agent_id",
            ),
            (
                "memory",
                serde_json::json!({"title": "t\u{7}", "kind": "observation", "content": "c"}),
                "memory.title contains control",
            ),
            (
                "memory",
                serde_json::json!({"title": "t", "kind": "observation", "content": "x".repeat(5000)}),
                "memory.content is longer",
            ),
            (
                "governance",
                serde_json::json!([1, 2]),
                "governance must be",
            ),
            ("governance", serde_json::json!({}), "governance must be"),
        ];
        for (field, value, needle) in cases {
            let mut v = namespace_standard_json();
            v[field] = value;
            let r: Resource = serde_json::from_value(v).unwrap();
            let err = with_resource(r)
                .check_consistency()
                .unwrap_err()
                .to_string();
            assert!(err.contains(needle), "{field}: {err}");
            assert!(err.contains("standard:campaign"), "{field}: {err}");
        }
        let mut v = namespace_standard_json();
        v["owner"]["public_key"] = "AAAA".into();
        assert!(serde_json::from_value::<Resource>(v).is_err());
        let mut v = namespace_standard_json();
        v["owner"]["private_key"] = "x".into();
        assert!(serde_json::from_value::<Resource>(v).is_err());
    }

    #[test]
    fn base64_file_content_roundtrips_through_the_digest() {
        let f = Resource::File(File {
            id: "file:trust".parse().unwrap(),
            path: "/etc/ai-memory/trust/do-1461-ca.pub".parse().unwrap(),
            mode: "0444".parse().unwrap(),
            owner: None,
            content: FileContent::Base64 {
                base64: Base64Bytes::new(vec![0xff; 32]),
            },
            secret: false,
        });
        let json = serde_json::to_value(&f).unwrap();
        assert_eq!(json["content"]["type"], "base64");
        assert_eq!(serde_json::from_value::<Resource>(json).unwrap(), f);
    }

    #[test]
    fn digest_covers_only_resources() {
        let a = manifest(1);
        let mut b = manifest(7);
        b.issued_at = 5;
        assert_eq!(a.digest, b.digest);
        let mut c = manifest(1);
        if let Resource::File(f) = &mut c.resources[1] {
            f.content = FileContent::Text {
                text: "A=2\n".into(),
            };
        }
        assert_ne!(Manifest::digest_of(&c.resources), a.digest);
    }

    fn check_of(matching: &str, expected: &str) -> Check {
        serde_json::from_value(serde_json::json!({
            "id": "check:c",
            "check": "c",
            "expected": expected,
            "match": matching,
            "probe": {"type": "process_count", "exe": "/usr/bin/x", "arg": "-D"},
        }))
        .unwrap()
    }

    #[test]
    fn check_match_modes() {
        let exact = check_of("exact", "17");
        assert!(exact.passes("17").unwrap());
        assert!(!exact.passes("17.12").unwrap());

        let version = check_of("version_prefix", "17");
        for (got, pass) in [
            ("17", true),
            ("17.12", true),
            ("17.12.1", true),
            ("170", false),
            ("1", false),
            ("", false),
            ("16.4", false),
            ("age is not installed", false),
        ] {
            assert_eq!(version.passes(got).unwrap(), pass, "17 vs {got}");
        }
        let point = check_of("version_prefix", "18.4");
        assert!(point.passes("18.4").unwrap());
        assert!(!point.passes("18.40").unwrap());

        // The whole of GOT must match: no "contains".
        let linked = check_of("regex", r"linked \([0-9]+ events\)");
        assert!(linked.passes("linked (0 events)").unwrap());
        assert!(linked.passes("linked (12 events)").unwrap());
        assert!(!linked.passes("linked (x events)").unwrap());
        assert!(!linked.passes("not linked (3 events)").unwrap());
        assert!(!linked.passes("linked (3 events) but broken").unwrap());
        let alt = check_of("regex", "a|b");
        assert!(alt.passes("b").unwrap());
        assert!(!alt.passes("ab").unwrap());
    }

    #[test]
    fn exact_match_is_not_serialized_and_a_bad_pattern_is_refused() {
        let exact = check_of("exact", "1");
        let json = serde_json::to_value(Resource::Check(exact.clone())).unwrap();
        assert!(json.get("match").is_none(), "{json}");
        let absent: Check = serde_json::from_value(serde_json::json!({
            "id": "check:c", "check": "c", "expected": "1",
            "probe": {"type": "process_count", "exe": "/usr/bin/x", "arg": "-D"},
        }))
        .unwrap();
        assert_eq!(absent, exact);
        let json = serde_json::to_value(Resource::Check(check_of("regex", "x"))).unwrap();
        assert_eq!(json["match"], "regex");

        with_resource(Resource::Check(check_of("regex", "a+")))
            .check_consistency()
            .unwrap();
        for bad in ["a(", "a)|(b"] {
            let err = with_resource(Resource::Check(check_of("regex", bad)))
                .check_consistency()
                .unwrap_err();
            assert!(
                err.to_string().contains("not a regular expression"),
                "{bad}: {err}"
            );
            assert!(check_of("regex", bad).passes("a").is_err());
        }
        assert!(serde_json::from_value::<Check>(serde_json::json!({
            "id": "check:c", "check": "c", "expected": "1", "match": "contains",
            "probe": {"type": "process_count", "exe": "/usr/bin/x", "arg": "-D"},
        }))
        .is_err());
    }
}
