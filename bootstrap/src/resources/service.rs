//! `service`: a unit file with the manifest's full text, enabled and running; restarted only
//! when its text or a `notify` input changes in this apply. Under systemd (PID 1) through
//! `systemctl`; elsewhere the agent's [`Supervisor`] runs the same unit file.

use hiveseed_proto::manifest::Service;
use hiveseed_proto::{AbsPath, FileMode, ResourceId};

use super::ResourceError;
use crate::host::{Attrs, Exec, Host, HostError};
use crate::plan::{Action, PlanError, RestartReason, ServiceManager};
use crate::supervisor::Supervisor;

/// Where unit files live, for systemd and the supervisor alike.
pub const UNIT_DIR: &str = "/etc/systemd/system";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observed {
    pub unit_text: Option<String>,
    pub enabled: bool,
    pub active: bool,
}

pub fn valid_unit_name(s: &str) -> bool {
    s.len() > ".service".len()
        && s.len() <= 255
        && s.ends_with(".service")
        && !s.starts_with('.')
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"@._:-".contains(&b))
}

pub fn unit_path(unit: &str) -> Option<AbsPath> {
    valid_unit_name(unit)
        .then(|| format!("{UNIT_DIR}/{unit}").parse().ok())
        .flatten()
}

fn systemctl_says(host: &dyn Host, verb: &str, unit: &str, yes: &str) -> Result<bool, HostError> {
    let out = host.exec(&Exec::new(["systemctl", verb, unit]).timeout(Exec::OBSERVE_TIMEOUT))?;
    Ok(out.stdout_str().trim() == yes)
}

pub fn observe(
    host: &dyn Host,
    manager: ServiceManager,
    supervisor: Option<&Supervisor>,
    s: &Service,
) -> Result<Observed, HostError> {
    let Some(path) = unit_path(&s.unit) else {
        return Ok(Observed {
            unit_text: None,
            enabled: false,
            active: false,
        });
    };
    let unit_text = host
        .read(&path)?
        .map(|b| String::from_utf8_lossy(&b).into_owned());
    let (enabled, active) = match manager {
        ServiceManager::Systemd => (
            systemctl_says(host, "is-enabled", &s.unit, "enabled")?,
            systemctl_says(host, "is-active", &s.unit, "active")?,
        ),
        ServiceManager::Supervisor => (true, supervisor.is_some_and(|sv| sv.is_active(&s.unit))),
    };
    Ok(Observed {
        unit_text,
        enabled,
        active,
    })
}

/// Automatic restarts of `unit` as its service manager counts them: systemd's `NRestarts`
/// (`systemctl show`), or the agent's supervisor where systemd is not PID 1. Both reset the
/// count when the unit is started or restarted on request.
pub fn observe_restarts(
    host: &dyn Host,
    manager: ServiceManager,
    supervisor: Option<&Supervisor>,
    unit: &str,
) -> Result<u32, String> {
    match manager {
        ServiceManager::Systemd => {
            let exec = Exec::new(["systemctl", "show", "--property=NRestarts", "--value", unit])
                .timeout(Exec::OBSERVE_TIMEOUT);
            let out = host
                .exec(&exec)
                .and_then(|o| o.check(&exec))
                .map_err(|e| crate::resources::wait::error_chain(&e))?;
            let text = out.stdout_str();
            text.trim().parse().map_err(|_| {
                format!(
                    "`{}` printed {:?}, not a count",
                    exec.display(),
                    text.trim()
                )
            })
        }
        ServiceManager::Supervisor => supervisor
            .and_then(|sv| sv.status(unit))
            .map(|s| s.restarts)
            .ok_or_else(|| format!("{unit} is not supervised by this agent")),
    }
}

/// The restart count of every service of the manifest; a unit whose count cannot be read is left
/// out (and logged), so the report never claims a count nobody measured.
pub fn restart_counts(
    manifest: &hiveseed_proto::Manifest,
    host: &dyn Host,
    manager: ServiceManager,
    supervisor: Option<&Supervisor>,
) -> Vec<hiveseed_proto::ServiceRestarts> {
    manifest
        .resources
        .iter()
        .filter_map(|r| match r {
            hiveseed_proto::Resource::Service(s) => Some(&s.unit),
            _ => None,
        })
        .filter_map(
            |unit| match observe_restarts(host, manager, supervisor, unit) {
                Ok(restarts) => Some(hiveseed_proto::ServiceRestarts {
                    unit: unit.clone(),
                    restarts,
                }),
                Err(e) => {
                    tracing::warn!(unit = %unit, error = %e, "restart count not measured");
                    None
                }
            },
        )
        .collect()
}

pub fn plan(
    s: &Service,
    o: &Observed,
    manager: ServiceManager,
    notified_by: Vec<ResourceId>,
) -> Result<Vec<Action>, PlanError> {
    let path = unit_path(&s.unit).ok_or_else(|| PlanError::BadName {
        id: s.id.clone(),
        what: "unit name",
        value: s.unit.clone(),
    })?;
    let unit = crate::unit::parse(&s.unit_text).map_err(|source| PlanError::Unit {
        id: s.id.clone(),
        unit: s.unit.clone(),
        source: Box::new(source),
    })?;
    let unit_changed = o.unit_text.as_deref() != Some(s.unit_text.as_str());
    let mut actions = Vec::new();
    if unit_changed {
        actions.push(Action::WriteUnit {
            path,
            text: s.unit_text.clone(),
        });
        if manager == ServiceManager::Systemd {
            actions.push(Action::DaemonReload);
        }
    }
    if manager == ServiceManager::Systemd && !unit.wanted_by.is_empty() && !o.enabled {
        actions.push(Action::EnableUnit {
            unit: s.unit.clone(),
        });
    }
    if !o.active {
        actions.push(Action::StartUnit {
            unit: s.unit.clone(),
            manager,
        });
    } else if unit_changed || !notified_by.is_empty() {
        actions.push(Action::RestartUnit {
            unit: s.unit.clone(),
            manager,
            reason: RestartReason {
                unit_changed,
                notified_by,
            },
        });
    }
    Ok(actions)
}

pub fn write_unit(host: &dyn Host, path: &AbsPath, text: &str) -> Result<(), HostError> {
    super::ensure_parents(host, path)?;
    host.write_atomic(
        path,
        text.as_bytes(),
        Attrs {
            mode: FileMode::new(0o644).expect("valid mode"),
            owner: None,
        },
    )
}

pub fn systemctl(host: &dyn Host, args: &[&str]) -> Result<(), HostError> {
    let exec = Exec::new(std::iter::once("systemctl").chain(args.iter().copied()));
    host.exec(&exec)?.check(&exec)?;
    Ok(())
}

pub async fn start(
    host: &dyn Host,
    supervisor: Option<&Supervisor>,
    unit: &str,
    manager: ServiceManager,
) -> Result<(), ResourceError> {
    match manager {
        ServiceManager::Systemd => Ok(systemctl(host, &["start", unit])?),
        ServiceManager::Supervisor => {
            let sv = supervisor.ok_or_else(|| ResourceError::NoSupervisor { unit: unit.into() })?;
            sv.start(unit).await?;
            Ok(())
        }
    }
}

pub async fn restart(
    host: &dyn Host,
    supervisor: Option<&Supervisor>,
    unit: &str,
    manager: ServiceManager,
) -> Result<(), ResourceError> {
    match manager {
        ServiceManager::Systemd => Ok(systemctl(host, &["restart", unit])?),
        ServiceManager::Supervisor => {
            let sv = supervisor.ok_or_else(|| ResourceError::NoSupervisor { unit: unit.into() })?;
            sv.restart(unit).await?;
            Ok(())
        }
    }
}
