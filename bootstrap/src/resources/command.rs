//! `command`: an argv (never a shell) run when its guards say so: `creates` missing and `unless`
//! not exiting 0, or a `refresh_on` resource changing in this apply. Secrets reach it on stdin
//! only, and then its stderr is withheld from errors (psql, for one, echoes the offending line).

use hiveseed_proto::manifest::Command;
use hiveseed_proto::ResourceId;

use crate::host::{Exec, Host, HostError, Sensitive};
use crate::plan::{Action, PlanError, RunReason};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observed {
    /// Whether `creates` exists (`None`: no such guard).
    pub creates_exists: Option<bool>,
    /// Whether `unless` exited 0 (`None`: no such guard, or not asked because `creates` exists).
    pub unless_ok: Option<bool>,
}

pub fn observe(host: &dyn Host, c: &Command) -> Result<Observed, HostError> {
    let creates_exists = match &c.creates {
        Some(p) => Some(host.stat(p)?.is_some()),
        None => None,
    };
    let unless_ok = match (&c.unless, creates_exists) {
        (_, Some(true)) | (None, _) => None,
        (Some(argv), _) if argv.is_empty() => Some(false),
        (Some(argv), _) => {
            let exec = Exec::new(argv.iter().cloned())
                .user(c.user.clone())
                .timeout(Exec::OBSERVE_TIMEOUT);
            match host.exec(&exec) {
                Ok(o) => Some(o.status.success()),
                // One that hangs or floods is an error: the command must not run on a guess.
                Err(e @ (HostError::Timeout { .. } | HostError::OutputCap { .. })) => {
                    return Err(e)
                }
                // One that cannot even start (binary or user not there yet) is simply unmet.
                Err(_) => Some(false),
            }
        }
    };
    Ok(Observed {
        creates_exists,
        unless_ok,
    })
}

pub fn plan(c: &Command, o: &Observed, refresh: Vec<ResourceId>) -> Result<Vec<Action>, PlanError> {
    if c.argv.is_empty() || c.unless.as_ref().is_some_and(Vec::is_empty) {
        return Err(PlanError::EmptyArgv { id: c.id.clone() });
    }
    let guarded = c.creates.is_some() || c.unless.is_some();
    if !guarded && c.refresh_on.is_empty() {
        return Err(PlanError::UnguardedCommand { id: c.id.clone() });
    }
    let guards_met = o.creates_exists == Some(true) || o.unless_ok == Some(true);
    let reason = if !refresh.is_empty() {
        RunReason::Refresh(refresh)
    } else if guarded && !guards_met {
        RunReason::GuardsUnmet
    } else {
        return Ok(Vec::new());
    };
    Ok(vec![Action::RunCommand {
        argv: c.argv.clone(),
        stdin: c.stdin.as_ref().map(|s| Sensitive(s.as_bytes().to_vec())),
        user: c.user.clone(),
        reason,
    }])
}

pub fn ensure_command(
    host: &dyn Host,
    argv: &[String],
    stdin: Option<&Sensitive>,
    user: Option<&str>,
) -> Result<(), HostError> {
    let mut exec = Exec::new(argv.iter().cloned()).user(user.map(str::to_owned));
    exec.stdin = stdin.cloned();
    let out = host.exec(&exec)?;
    match out.check(&exec) {
        Ok(_) => Ok(()),
        Err(HostError::CommandFailed { argv, status, .. }) if stdin.is_some() => {
            Err(HostError::CommandFailed {
                argv,
                status,
                stderr: "(withheld: the command was fed secret stdin)".into(),
            })
        }
        Err(e) => Err(e),
    }
}
