//! Desired vs observed → an ordered list of actions. `observe` only reads (through the Host, the
//! supervisor and, for waits, one probe); `plan` is a pure function of the manifest, the
//! observations and the clock reading it is given. A plan printed by `bootstrap plan` is exactly
//! what `apply` will do.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::Duration;

use hiveseed_proto::credential::CredentialError;
use hiveseed_proto::manifest::{
    CertificatePurpose, FederationIssuer, FileContent, NamespaceStandard, Ownership, WaitTarget,
};
use hiveseed_proto::{
    AbsPath, FedId, FileMode, Generation, Manifest, NodeName, Resource, ResourceId, Sha256,
};

use crate::host::{display_argv, Host, HostError, Sensitive, Stat};
use crate::resources::{
    certificate, command, directory, federation, file, package, service, standard, user, wait,
    NodeReadiness,
};
use crate::supervisor::Supervisor;
use crate::unit::UnitError;

/// Which executor runs services on this host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServiceManager {
    /// systemd is PID 1 (`/run/systemd/system` exists in the root).
    Systemd,
    /// No systemd (containers, the lab): the agent's own supervisor runs the units.
    Supervisor,
}

impl fmt::Display for ServiceManager {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ServiceManager::Systemd => "systemd",
            ServiceManager::Supervisor => "supervisor",
        })
    }
}

/// How a package is pinned in the one `apt-get install` transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InstallPin {
    Exact {
        name: String,
        version: String,
    },
    /// Resolved from `apt-cache policy`'s candidate at apply time (after any `apt-get update`),
    /// which must start with the prefix.
    Prefix {
        name: String,
        prefix: String,
    },
    Any {
        name: String,
    },
}

impl fmt::Display for InstallPin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            InstallPin::Exact { name, version } => write!(f, "{name}={version}"),
            InstallPin::Prefix { name, prefix } => write!(f, "{name}={prefix}*"),
            InstallPin::Any { name } => f.write_str(name),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Content {
    /// Inline content from the manifest (text, or base64-decoded bytes); `Sensitive` so no Debug
    /// ever prints it.
    Text(Sensitive),
    Artifact {
        sha256: Sha256,
        size: u64,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CertReason {
    NoKey,
    Missing,
    Unreadable,
    KeyMismatch,
    /// Past 2/3 of its lifetime.
    Renew,
}

/// Why a federation credential is requested.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CredentialReason {
    /// The key is not there (yet): it is generated earlier in the same apply.
    NoKey,
    Missing,
    Unreadable(CredentialError),
    /// Not the manifest's issuer's, for its trust domain, under its key.
    NotTrusted(CredentialError),
    OtherIdentity,
    OtherKey,
    /// Past 2/3 of its lifetime (or expired).
    Renew,
}

impl fmt::Display for CredentialReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CredentialReason::NoKey => f.write_str("new key"),
            CredentialReason::Missing => f.write_str("missing"),
            CredentialReason::Unreadable(e) => write!(f, "unreadable: {e}"),
            CredentialReason::NotTrusted(e) => write!(f, "not the campaign issuer's: {e}"),
            CredentialReason::OtherIdentity => f.write_str("for another identity"),
            CredentialReason::OtherKey => f.write_str("for another key"),
            CredentialReason::Renew => f.write_str("past 2/3 of its lifetime"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunReason {
    /// `creates` is missing and/or `unless` did not exit 0.
    GuardsUnmet,
    /// A `refresh_on` resource changes in this plan.
    Refresh(Vec<ResourceId>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestartReason {
    pub unit_changed: bool,
    pub notified_by: Vec<ResourceId>,
}

/// One host change. `apply` has one match arm per variant and makes no decisions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    WriteKeyring {
        path: AbsPath,
        bytes: Vec<u8>,
    },
    WriteAptSource {
        path: AbsPath,
        text: String,
    },
    AptUpdate,
    AptInstall {
        pins: Vec<InstallPin>,
    },
    CreateDirectory {
        path: AbsPath,
        mode: FileMode,
        owner: Option<Ownership>,
    },
    /// Refused when `path` is no longer the object (or the absence) `observed` saw.
    WriteFile {
        path: AbsPath,
        content: Content,
        mode: FileMode,
        owner: Option<Ownership>,
        secret: bool,
        observed: Option<Stat>,
    },
    /// Applied only to the object `observed` saw (same device and inode).
    Chmod {
        path: AbsPath,
        mode: FileMode,
        observed: Stat,
    },
    /// Applied only to the object `observed` saw (same device and inode).
    Chown {
        path: AbsPath,
        owner: Ownership,
        observed: Stat,
    },
    CreateUser {
        argv: Vec<String>,
    },
    /// Refused when `path` is no longer the object (or the absence) `observed` saw.
    GenerateKey {
        path: AbsPath,
        mode: FileMode,
        owner: Option<Ownership>,
        observed: Option<Stat>,
    },
    RequestCertificate {
        purpose: CertificatePurpose,
        key_path: AbsPath,
        cert_path: AbsPath,
        owner: Option<Ownership>,
        /// Also write the chain's CA here (root:root 0644).
        ca_path: Option<AbsPath>,
        reason: CertReason,
        /// What was at `cert_path`: refused when it is no longer that object (or absence).
        cert_observed: Option<Stat>,
    },
    /// A new Ed25519 seed at `key_path` (0400) and its public half at `pub_path` (0444).
    /// Refused when either file is no longer the object (or the absence) observed.
    GenerateFederationKey {
        key_dir: AbsPath,
        key_path: AbsPath,
        pub_path: AbsPath,
        owner: Option<Ownership>,
        key_observed: Option<Stat>,
        pub_observed: Option<Stat>,
    },
    /// `.pub` rewritten from the seed at `key_path`.
    WriteFederationPub {
        key_path: AbsPath,
        pub_path: AbsPath,
        owner: Option<Ownership>,
        pub_observed: Option<Stat>,
    },
    RequestCredential {
        fed_id: FedId,
        key_path: AbsPath,
        credential_path: AbsPath,
        issuer: FederationIssuer,
        owner: Option<Ownership>,
        reason: CredentialReason,
        /// What was at `credential_path`: refused when it is no longer that object (or absence).
        credential_observed: Option<Stat>,
    },
    RunCommand {
        argv: Vec<String>,
        stdin: Option<Sensitive>,
        user: Option<String>,
        reason: RunReason,
    },
    WriteUnit {
        path: AbsPath,
        text: String,
    },
    DaemonReload,
    EnableUnit {
        unit: String,
    },
    StartUnit {
        unit: String,
        manager: ServiceManager,
    },
    RestartUnit {
        unit: String,
        manager: ServiceManager,
        reason: RestartReason,
    },
    Wait {
        target: WaitTarget,
        timeout: Duration,
    },
    SetNamespaceStandard {
        standard: Box<NamespaceStandard>,
        reason: String,
    },
}

fn owner_str(owner: &Option<Ownership>) -> String {
    match owner {
        Some(o) => format!(" {}:{}", o.owner, o.group),
        None => String::new(),
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Action::WriteKeyring { path, bytes } => {
                write!(f, "write keyring {path} ({} bytes)", bytes.len())
            }
            Action::WriteAptSource { path, text } => {
                write!(f, "write apt source {path}: {}", text.trim_end())
            }
            Action::AptUpdate => f.write_str("apt-get update"),
            Action::AptInstall { pins } => {
                let pins: Vec<String> = pins.iter().map(ToString::to_string).collect();
                write!(f, "apt-get install {}", pins.join(" "))
            }
            Action::CreateDirectory { path, mode, owner } => {
                write!(f, "mkdir {path} {mode}{}", owner_str(owner))
            }
            Action::WriteFile {
                path,
                content,
                mode,
                owner,
                secret,
                observed: _,
            } => {
                write!(f, "write {path} {mode}{} ", owner_str(owner))?;
                match (content, secret) {
                    (Content::Text(t), true) => write!(f, "(secret, {} bytes)", t.0.len()),
                    (Content::Text(t), false) => write!(
                        f,
                        "({} bytes, sha256 {})",
                        t.0.len(),
                        &Sha256::digest(&t.0).to_hex()[..12]
                    ),
                    (Content::Artifact { sha256, size }, _) => {
                        write!(f, "(artifact {}, {size} bytes)", &sha256.to_hex()[..12])
                    }
                }
            }
            Action::Chmod { path, mode, .. } => write!(f, "chmod {mode} {path}"),
            Action::Chown { path, owner, .. } => {
                write!(f, "chown {}:{} {path}", owner.owner, owner.group)
            }
            Action::CreateUser { argv } => f.write_str(&display_argv(argv)),
            Action::GenerateKey {
                path, mode, owner, ..
            } => write!(
                f,
                "generate ECDSA P-256 key {path} {mode}{}",
                owner_str(owner)
            ),
            Action::RequestCertificate {
                purpose,
                cert_path,
                reason,
                ..
            } => write!(
                f,
                "request {purpose:?} certificate {cert_path} ({})",
                match reason {
                    CertReason::NoKey => "new key",
                    CertReason::Missing => "missing",
                    CertReason::Unreadable => "unreadable",
                    CertReason::KeyMismatch => "does not match the key",
                    CertReason::Renew => "past 2/3 of its lifetime",
                }
            ),
            Action::GenerateFederationKey {
                key_path,
                pub_path,
                owner,
                ..
            } => write!(
                f,
                "generate Ed25519 federation key {key_path} 0400 and {pub_path} 0444{}",
                owner_str(owner)
            ),
            Action::WriteFederationPub {
                key_path,
                pub_path,
                owner,
                ..
            } => write!(
                f,
                "write {pub_path} 0444{} (public half of {key_path})",
                owner_str(owner)
            ),
            Action::RequestCredential {
                fed_id,
                credential_path,
                reason,
                ..
            } => write!(
                f,
                "request federation credential {credential_path} for {fed_id} ({reason})"
            ),
            Action::RunCommand {
                argv,
                stdin,
                user,
                reason,
            } => {
                write!(f, "run {}", display_argv(argv))?;
                if let Some(u) = user {
                    write!(f, " as {u}")?;
                }
                if let Some(s) = stdin {
                    write!(f, " <stdin {} bytes>", s.0.len())?;
                }
                match reason {
                    RunReason::GuardsUnmet => Ok(()),
                    RunReason::Refresh(ids) => write!(f, " (refresh: {})", join_ids(ids)),
                }
            }
            Action::WriteUnit { path, .. } => write!(f, "write unit {path}"),
            Action::DaemonReload => f.write_str("systemctl daemon-reload"),
            Action::EnableUnit { unit } => write!(f, "systemctl enable {unit}"),
            Action::StartUnit { unit, manager } => write!(f, "start {unit} ({manager})"),
            Action::RestartUnit {
                unit,
                manager,
                reason,
            } => {
                let mut why = Vec::new();
                if reason.unit_changed {
                    why.push("unit changed".to_owned());
                }
                if !reason.notified_by.is_empty() {
                    why.push(format!("notified by {}", join_ids(&reason.notified_by)));
                }
                write!(f, "restart {unit} ({manager}; {})", why.join("; "))
            }
            Action::Wait { target, timeout } => write!(
                f,
                "wait up to {}s for {}",
                timeout.as_secs(),
                wait::blocked_on(target)
            ),
            Action::SetNamespaceStandard { standard, reason } => write!(
                f,
                "set the standard of namespace {} to {:?} as {} ({reason})",
                standard.namespace, standard.memory.title, standard.owner.agent_id
            ),
        }
    }
}

fn join_ids(ids: &[ResourceId]) -> String {
    ids.iter()
        .map(ResourceId::as_str)
        .collect::<Vec<_>>()
        .join(", ")
}

/// The actions for one resource, in manifest order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub id: ResourceId,
    pub kind: &'static str,
    pub actions: Vec<Action>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub node: NodeName,
    pub generation: Generation,
    pub steps: Vec<Step>,
}

impl Plan {
    /// No action at all: the node already is what the manifest says.
    pub fn is_empty(&self) -> bool {
        self.steps.iter().all(|s| s.actions.is_empty())
    }

    /// Resources that will change.
    pub fn changing(&self) -> impl Iterator<Item = &Step> {
        self.steps.iter().filter(|s| !s.actions.is_empty())
    }

    pub fn actions(&self) -> impl Iterator<Item = &Action> {
        self.steps.iter().flat_map(|s| s.actions.iter())
    }
}

impl fmt::Display for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let changing = self.changing().count();
        writeln!(
            f,
            "plan for {} generation {}: {changing} of {} resources change",
            self.node,
            self.generation,
            self.steps.len()
        )?;
        if changing == 0 {
            return writeln!(f, "  nothing to do");
        }
        for step in self.changing() {
            writeln!(f, "  {} ({})", step.id, step.kind)?;
            for a in &step.actions {
                writeln!(f, "    - {a}")?;
            }
        }
        Ok(())
    }
}

/// What `observe` saw for one resource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Observation {
    Package(package::Observed),
    Directory(directory::Observed),
    File(file::Observed),
    User(user::Observed),
    Certificate(certificate::Observed),
    FederationKey(federation::KeyObserved),
    FederationCredential(federation::CredentialObserved),
    Command(command::Observed),
    Service(service::Observed),
    Wait(wait::Observed),
    NamespaceStandard(standard::Observed),
    Check,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observed {
    pub manager: ServiceManager,
    pub resources: BTreeMap<ResourceId, Observation>,
}

/// Inputs to `plan` besides manifest and observations: the clock reading, so `plan` stays pure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlanContext {
    /// Unix seconds.
    pub now: i64,
}

impl PlanContext {
    pub fn now() -> Self {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        Self { now }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("{id}: secret file {path} must not be readable by group or others (mode {mode})")]
    SecretExposed {
        id: ResourceId,
        path: AbsPath,
        mode: FileMode,
    },
    #[error("{id}: private key {path} must not be accessible to others (mode {mode})")]
    KeyExposed {
        id: ResourceId,
        path: AbsPath,
        mode: FileMode,
    },
    #[error(
        "{id}: a command needs `creates`, `unless` or `refresh_on`, or it would run on every apply"
    )]
    UnguardedCommand { id: ResourceId },
    #[error("{id}: empty argv")]
    EmptyArgv { id: ResourceId },
    #[error("{id}: {field} names {target}, which is not an earlier resource")]
    UnknownReference {
        id: ResourceId,
        field: &'static str,
        target: ResourceId,
    },
    #[error("{id}: invalid {what} {value:?}")]
    BadName {
        id: ResourceId,
        what: &'static str,
        value: String,
    },
    #[error("{id}: unit {unit}")]
    Unit {
        id: ResourceId,
        unit: String,
        #[source]
        source: Box<UnitError>,
    },
    #[error("{id}: {path} exists but is not a {expected}")]
    WrongKind {
        id: ResourceId,
        path: AbsPath,
        expected: &'static str,
    },
    #[error("{id}: no observation (observe and plan were given different manifests)")]
    NotObserved { id: ResourceId },
}

#[derive(Debug, thiserror::Error)]
#[error("observing {id}")]
pub struct ObserveError {
    pub id: ResourceId,
    #[source]
    pub source: HostError,
}

/// What `observe` may consult besides the Host.
#[derive(Clone, Copy)]
pub struct ObserveEnv<'a> {
    pub host: &'a dyn Host,
    pub supervisor: Option<&'a Supervisor>,
    pub readiness: &'a dyn NodeReadiness,
    /// Bound on the single readiness probe a wait gets while observing.
    pub probe_timeout: Duration,
}

impl fmt::Debug for ObserveEnv<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ObserveEnv")
            .field("host", &self.host)
            .field("probe_timeout", &self.probe_timeout)
            .finish_non_exhaustive()
    }
}

pub fn observe_manager(host: &dyn Host) -> Result<ServiceManager, HostError> {
    let marker: AbsPath = "/run/systemd/system".parse().expect("static path");
    Ok(match host.stat(&marker)? {
        Some(_) => ServiceManager::Systemd,
        None => ServiceManager::Supervisor,
    })
}

/// Reads the current state of everything the manifest names. Waits get one bounded probe, so a
/// dependency that is already ready plans nothing.
pub async fn observe(manifest: &Manifest, env: &ObserveEnv<'_>) -> Result<Observed, ObserveError> {
    let manager = observe_manager(env.host).map_err(|source| ObserveError {
        id: manifest
            .resources
            .first()
            .map(|r| r.id().clone())
            .unwrap_or_else(|| "manifest".parse().expect("static id")),
        source,
    })?;
    let mut owners = directory::OwnerCache::default();
    let mut resources = BTreeMap::new();
    for r in &manifest.resources {
        let err = |source| ObserveError {
            id: r.id().clone(),
            source,
        };
        let o = match r {
            Resource::Package(p) => {
                Observation::Package(package::observe(env.host, p).map_err(err)?)
            }
            Resource::Directory(d) => Observation::Directory(
                directory::observe(env.host, &mut owners, &d.path, d.owner.as_ref())
                    .map_err(err)?,
            ),
            Resource::File(fr) => {
                Observation::File(file::observe(env.host, &mut owners, fr).map_err(err)?)
            }
            Resource::User(u) => Observation::User(user::observe(env.host, u).map_err(err)?),
            Resource::Certificate(c) => Observation::Certificate(
                certificate::observe(env.host, &mut owners, c).map_err(err)?,
            ),
            Resource::FederationKey(k) => Observation::FederationKey(
                federation::observe_key(env.host, &mut owners, k).map_err(err)?,
            ),
            Resource::FederationCredential(c) => Observation::FederationCredential(
                federation::observe_credential(env.host, &mut owners, c).map_err(err)?,
            ),
            Resource::Command(c) => {
                Observation::Command(command::observe(env.host, c).map_err(err)?)
            }
            Resource::Service(s) => Observation::Service(
                service::observe(env.host, manager, env.supervisor, s).map_err(err)?,
            ),
            Resource::Wait(w) => Observation::Wait(
                wait::observe(env.host, env.readiness, &w.target, env.probe_timeout).await,
            ),
            Resource::NamespaceStandard(s) => Observation::NamespaceStandard(
                standard::observe(env.host, s, env.probe_timeout).await,
            ),
            Resource::Check(_) => Observation::Check,
        };
        resources.insert(r.id().clone(), o);
    }
    Ok(Observed { manager, resources })
}

/// Desired vs observed → actions. Pure: same inputs, same plan.
pub fn plan(
    manifest: &Manifest,
    observed: &Observed,
    ctx: &PlanContext,
) -> Result<Plan, PlanError> {
    let mut steps: Vec<Step> = Vec::with_capacity(manifest.resources.len());
    let mut earlier: BTreeSet<ResourceId> = BTreeSet::new();
    let mut changing: BTreeSet<ResourceId> = BTreeSet::new();
    for r in &manifest.resources {
        let id = r.id().clone();
        let obs = observed
            .resources
            .get(&id)
            .ok_or_else(|| PlanError::NotObserved { id: id.clone() })?;
        let actions = match (r, obs) {
            (Resource::Package(p), Observation::Package(o)) => package::plan(p, o)?,
            (Resource::Directory(d), Observation::Directory(o)) => directory::plan(d, o)?,
            (Resource::File(fr), Observation::File(o)) => file::plan(fr, o)?,
            (Resource::User(u), Observation::User(o)) => user::plan(u, o)?,
            (Resource::Certificate(c), Observation::Certificate(o)) => {
                certificate::plan(c, o, ctx.now)?
            }
            (Resource::FederationKey(k), Observation::FederationKey(o)) => {
                federation::plan_key(k, o)?
            }
            (Resource::FederationCredential(c), Observation::FederationCredential(o)) => {
                federation::plan_credential(c, o, ctx.now)?
            }
            (Resource::Command(c), Observation::Command(o)) => {
                let refresh = referenced(&id, "refresh_on", &c.refresh_on, &earlier, &changing)?;
                command::plan(c, o, refresh)?
            }
            (Resource::Service(s), Observation::Service(o)) => {
                let notified = referenced(&id, "notify", &s.notify, &earlier, &changing)?;
                service::plan(s, o, observed.manager, notified)?
            }
            (Resource::Wait(w), Observation::Wait(o)) => wait::plan(w, o),
            (Resource::NamespaceStandard(s), Observation::NamespaceStandard(o)) => {
                standard::plan(s, o)
            }
            (Resource::Check(_), Observation::Check) => Vec::new(),
            _ => return Err(PlanError::NotObserved { id }),
        };
        if !actions.is_empty() {
            changing.insert(id.clone());
        }
        earlier.insert(id.clone());
        steps.push(Step {
            id,
            kind: r.kind(),
            actions,
        });
    }
    Ok(Plan {
        node: manifest.node.clone(),
        generation: manifest.generation,
        steps,
    })
}

/// The listed ids that change in this plan; every id must name an earlier resource.
fn referenced(
    id: &ResourceId,
    field: &'static str,
    ids: &[ResourceId],
    earlier: &BTreeSet<ResourceId>,
    changing: &BTreeSet<ResourceId>,
) -> Result<Vec<ResourceId>, PlanError> {
    let mut out = Vec::new();
    for t in ids {
        if !earlier.contains(t) {
            return Err(PlanError::UnknownReference {
                id: id.clone(),
                field,
                target: t.clone(),
            });
        }
        if changing.contains(t) {
            out.push(t.clone());
        }
    }
    Ok(out)
}

/// Text content as the `Content` of a write.
pub(crate) fn content_of(c: &FileContent) -> Content {
    match c {
        FileContent::Text { text } => Content::Text(Sensitive(text.as_bytes().to_vec())),
        FileContent::Artifact { sha256, size } => Content::Artifact {
            sha256: *sha256,
            size: *size,
        },
        FileContent::Base64 { base64 } => Content::Text(Sensitive(base64.as_bytes().to_vec())),
    }
}
