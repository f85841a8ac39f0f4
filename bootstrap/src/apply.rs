//! Carries out a [`Plan`]: the only place with side effects. One match arm per action, no
//! decisions; one outcome per resource, emitted as it finishes so the caller can report after
//! every step; the first failure stops the run with a typed error.

use std::fmt;
use std::time::{Duration, Instant};

use hiveseed_proto::status::{Outcome, ResourceReport};
use hiveseed_proto::{NodeName, ResourceId};

use crate::host::Host;
use crate::plan::{Action, Plan};
use crate::resources::wait::{self, WaitPolicy};
use crate::resources::{
    certificate, command, directory, federation, file, package, service, standard, user,
    ArtifactFetcher, CertSigner, CredentialIssuer, NodeReadiness, ResourceError,
};
use crate::supervisor::Supervisor;

#[derive(Debug, Clone, Copy)]
pub struct ApplySettings {
    /// `-o DPkg::Lock::Timeout=`: how long apt waits for another dpkg to finish.
    pub apt_lock_timeout: Duration,
    pub wait: WaitPolicy,
}

impl Default for ApplySettings {
    fn default() -> Self {
        Self {
            apt_lock_timeout: Duration::from_secs(300),
            wait: WaitPolicy::default(),
        }
    }
}

/// Everything `apply` acts through.
#[derive(Clone, Copy)]
pub struct ApplyEnv<'a> {
    pub host: &'a dyn Host,
    pub node: &'a NodeName,
    pub fetcher: &'a dyn ArtifactFetcher,
    pub signer: &'a dyn CertSigner,
    pub issuer: &'a dyn CredentialIssuer,
    pub readiness: &'a dyn NodeReadiness,
    /// Required when the plan starts services without systemd.
    pub supervisor: Option<&'a Supervisor>,
    pub settings: ApplySettings,
}

impl fmt::Debug for ApplyEnv<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApplyEnv")
            .field("host", &self.host)
            .field("node", &self.node)
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

/// Progress, in order: `Started`, maybe `Waiting`, then `Finished` for every resource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApplyEvent {
    Started {
        id: ResourceId,
        /// 0-based position and total, for `applying k/n`.
        index: usize,
        total: usize,
    },
    /// The caller reports `waiting blocked_on=<blocked_on>` until the next event.
    Waiting {
        id: ResourceId,
        blocked_on: String,
    },
    Finished(ResourceReport),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApplySummary {
    pub reports: Vec<ResourceReport>,
}

impl ApplySummary {
    pub fn changed(&self) -> impl Iterator<Item = &ResourceId> {
        self.reports
            .iter()
            .filter(|r| r.outcome == Outcome::Changed)
            .map(|r| &r.id)
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{kind} {id} failed")]
pub struct ApplyError {
    pub id: ResourceId,
    pub kind: &'static str,
    /// Reports up to and including the failed resource.
    pub reports: Vec<ResourceReport>,
    #[source]
    pub source: ResourceError,
}

/// Applies every step in order and stops at the first failure.
pub async fn apply(
    plan: &Plan,
    env: &ApplyEnv<'_>,
    on_event: &mut (dyn FnMut(ApplyEvent) + Send),
) -> Result<ApplySummary, ApplyError> {
    let total = plan.steps.len();
    let mut reports = Vec::with_capacity(total);
    for (index, step) in plan.steps.iter().enumerate() {
        on_event(ApplyEvent::Started {
            id: step.id.clone(),
            index,
            total,
        });
        let started = Instant::now();
        let mut result = Ok(());
        for action in &step.actions {
            if let Action::Wait { target, .. } = action {
                on_event(ApplyEvent::Waiting {
                    id: step.id.clone(),
                    blocked_on: wait::blocked_on(target),
                });
            }
            result = run(action, env).await;
            if result.is_err() {
                break;
            }
        }
        let duration_ms = started.elapsed().as_millis() as u64;
        let (outcome, message) = match &result {
            Ok(()) if step.actions.is_empty() => (Outcome::Unchanged, None),
            Ok(()) => (Outcome::Changed, None),
            Err(e) => (Outcome::Failed, Some(wait::error_chain(e))),
        };
        match outcome {
            Outcome::Changed => {
                tracing::info!(id = %step.id, kind = step.kind, duration_ms, "changed")
            }
            Outcome::Unchanged => tracing::debug!(id = %step.id, kind = step.kind, "unchanged"),
            Outcome::Failed => {
                tracing::warn!(id = %step.id, kind = step.kind, error = message.as_deref().unwrap_or(""), "failed")
            }
        }
        let report = ResourceReport {
            id: step.id.clone(),
            outcome,
            message,
            duration_ms,
        };
        reports.push(report.clone());
        on_event(ApplyEvent::Finished(report));
        if let Err(source) = result {
            return Err(ApplyError {
                id: step.id.clone(),
                kind: step.kind,
                reports,
                source,
            });
        }
    }
    Ok(ApplySummary { reports })
}

async fn run(action: &Action, env: &ApplyEnv<'_>) -> Result<(), ResourceError> {
    let host = env.host;
    let lock = env.settings.apt_lock_timeout;
    match action {
        Action::WriteKeyring { path, bytes } => package::write_keyring(host, path, bytes)?,
        Action::WriteAptSource { path, text } => package::write_source(host, path, text)?,
        Action::AptUpdate => package::apt_update(host, lock)?,
        Action::AptInstall { pins } => package::apt_install(host, pins, lock)?,
        Action::CreateDirectory { path, mode, owner } => {
            directory::ensure_directory(host, path, *mode, owner.as_ref())?
        }
        Action::WriteFile {
            path,
            content,
            mode,
            owner,
            secret: _,
            observed,
        } => {
            file::ensure_file(
                host,
                env.fetcher,
                path,
                content,
                *mode,
                owner.as_ref(),
                observed.as_ref(),
            )
            .await?
        }
        Action::Chmod {
            path,
            mode,
            observed,
        } => directory::ensure_mode(host, path, *mode, observed)?,
        Action::Chown {
            path,
            owner,
            observed,
        } => directory::ensure_owner(host, path, owner, observed)?,
        Action::CreateUser { argv } => user::ensure_user(host, argv)?,
        Action::GenerateKey {
            path,
            mode,
            owner,
            observed,
        } => {
            directory::check_unchanged(host, path, observed.as_ref())?;
            certificate::generate_key(host, path, *mode, owner.as_ref())?
        }
        Action::RequestCertificate {
            purpose,
            key_path,
            cert_path,
            owner,
            ca_path,
            reason: _,
            cert_observed,
        } => {
            directory::check_unchanged(host, cert_path, cert_observed.as_ref())?;
            certificate::request_certificate(
                host,
                env.signer,
                env.node,
                *purpose,
                certificate::CertFiles {
                    key_path,
                    cert_path,
                    ca_path: ca_path.as_ref(),
                },
                owner.as_ref(),
            )
            .await?
        }
        Action::GenerateFederationKey {
            key_dir,
            key_path,
            pub_path,
            owner,
            key_observed,
            pub_observed,
        } => {
            directory::check_unchanged(host, key_path, key_observed.as_ref())?;
            directory::check_unchanged(host, pub_path, pub_observed.as_ref())?;
            federation::generate_key(host, key_dir, key_path, pub_path, owner.as_ref())?
        }
        Action::WriteFederationPub {
            key_path,
            pub_path,
            owner,
            pub_observed,
        } => {
            directory::check_unchanged(host, pub_path, pub_observed.as_ref())?;
            federation::write_public(host, key_path, pub_path, owner.as_ref())?
        }
        Action::RequestCredential {
            fed_id,
            key_path,
            credential_path,
            issuer,
            owner,
            reason: _,
            credential_observed,
        } => {
            directory::check_unchanged(host, credential_path, credential_observed.as_ref())?;
            federation::request_credential(
                host,
                env.issuer,
                fed_id,
                key_path,
                credential_path,
                issuer,
                owner.as_ref(),
                crate::plan::PlanContext::now().now,
            )
            .await?
        }
        Action::RunCommand {
            argv,
            stdin,
            user,
            reason: _,
        } => command::ensure_command(host, argv, stdin.as_ref(), user.as_deref())?,
        Action::WriteUnit { path, text } => service::write_unit(host, path, text)?,
        Action::DaemonReload => service::systemctl(host, &["daemon-reload"])?,
        Action::EnableUnit { unit } => service::systemctl(host, &["enable", unit])?,
        Action::StartUnit { unit, manager } => {
            service::start(host, env.supervisor, unit, *manager).await?
        }
        Action::RestartUnit {
            unit,
            manager,
            reason: _,
        } => service::restart(host, env.supervisor, unit, *manager).await?,
        Action::SetNamespaceStandard {
            standard,
            reason: _,
        } => standard::ensure(host, env.issuer, standard).await?,
        Action::Wait { target, timeout } => {
            wait::wait_for(host, env.readiness, target, *timeout, &env.settings.wait).await?;
        }
    }
    Ok(())
}
