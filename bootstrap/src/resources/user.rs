//! `user`: a (system) account in the root's `/etc/passwd`, created with `useradd` when missing.
//! An existing account is left as it is.

use hiveseed_proto::manifest::User;

use crate::host::{Exec, ExitCode, Host, HostError};
use crate::plan::{Action, PlanError};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observed {
    pub exists: bool,
}

/// `useradd`'s own rule for names, so a name can never be read as an option.
fn valid_user_name(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 32
        && (b[0].is_ascii_lowercase() || b[0] == b'_')
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || b"_-".contains(c))
}

pub fn observe(host: &dyn Host, u: &User) -> Result<Observed, HostError> {
    Ok(Observed {
        exists: host.lookup_user(&u.name)?.is_some(),
    })
}

pub fn useradd_argv(u: &User) -> Vec<String> {
    let mut argv = vec!["useradd".to_owned()];
    if u.system {
        argv.push("--system".into());
    }
    argv.push("--user-group".into());
    if let Some(uid) = u.uid {
        // The group of the same name gets the same number (--user-group follows --uid when free).
        argv.push("--uid".into());
        argv.push(uid.to_string());
    }
    if let Some(home) = &u.home {
        argv.push("--home-dir".into());
        argv.push(home.to_string());
        if !u.system {
            argv.push("--create-home".into());
        }
    }
    if let Some(shell) = &u.shell {
        argv.push("--shell".into());
        argv.push(shell.to_string());
    }
    argv.push(u.name.clone());
    argv
}

pub fn plan(u: &User, o: &Observed) -> Result<Vec<Action>, PlanError> {
    if !valid_user_name(&u.name) {
        return Err(PlanError::BadName {
            id: u.id.clone(),
            what: "user name",
            value: u.name.clone(),
        });
    }
    if o.exists {
        return Ok(Vec::new());
    }
    Ok(vec![Action::CreateUser {
        argv: useradd_argv(u),
    }])
}

pub fn ensure_user(host: &dyn Host, argv: &[String]) -> Result<(), HostError> {
    let exec = Exec::new(argv.iter().cloned());
    let out = host.exec(&exec)?;
    // 9: "username already in use" — someone got there first, which is what we wanted.
    if out.status == ExitCode::Code(9) {
        return Ok(());
    }
    out.check(&exec)?;
    Ok(())
}
