//! `directory`: exists, with mode and owner (names resolved in the root's passwd/group).
//! Also the attribute comparison that files and keys share.

use std::collections::BTreeMap;

use hiveseed_proto::manifest::{Directory, Ownership};
use hiveseed_proto::{AbsPath, FileMode, ResourceId};

use crate::host::{Attrs, FileKind, Host, HostError, Owner, Stat};
use crate::plan::{Action, PlanError};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observed {
    pub stat: Option<Stat>,
    /// The desired owner's ids, `None` when not managed or not (yet) known to the root.
    pub owner: Option<Owner>,
}

/// Resolves owner names once per observe pass.
#[derive(Debug, Default)]
pub struct OwnerCache {
    map: BTreeMap<(String, String), Option<Owner>>,
}

impl OwnerCache {
    pub fn resolve(&mut self, host: &dyn Host, o: &Ownership) -> Result<Option<Owner>, HostError> {
        let key = (o.owner.clone(), o.group.clone());
        if let Some(v) = self.map.get(&key) {
            return Ok(*v);
        }
        let uid = host.lookup_user(&o.owner)?.map(|e| e.uid);
        let gid = host.lookup_group(&o.group)?;
        let v = match (uid, gid) {
            (Some(uid), Some(gid)) => Some(Owner { uid, gid }),
            _ => None,
        };
        self.map.insert(key, v);
        Ok(v)
    }
}

pub fn observe(
    host: &dyn Host,
    owners: &mut OwnerCache,
    path: &AbsPath,
    owner: Option<&Ownership>,
) -> Result<Observed, HostError> {
    let stat = host.stat(path)?;
    let owner = match owner {
        Some(o) => owners.resolve(host, o)?,
        None => None,
    };
    Ok(Observed { stat, owner })
}

/// chown/chmod actions that bring an existing path to the desired mode and owner, each carrying
/// the `stat` it was planned from. The owner comes first: a chown clears set-id bits.
pub(crate) fn attr_actions(
    path: &AbsPath,
    stat: &Stat,
    mode: FileMode,
    want_owner: Option<&Ownership>,
    resolved: Option<Owner>,
) -> Vec<Action> {
    let mut out = Vec::new();
    let chown = want_owner
        .filter(|_| !resolved.is_some_and(|r| r.uid == stat.uid && r.gid == stat.gid))
        .map(|o| Action::Chown {
            path: path.clone(),
            owner: o.clone(),
            observed: *stat,
        });
    out.extend(chown);
    if stat.mode != mode.bits() || (!out.is_empty() && mode.bits() & 0o6000 != 0) {
        out.push(Action::Chmod {
            path: path.clone(),
            mode,
            observed: *stat,
        });
    }
    out
}

/// Refuses `path` when it is no longer what the plan observed: another object (device, inode,
/// kind), or a directory, link or other non-file where nothing was. The plan's decision was
/// about that object. A regular file where nothing was is let through: the write that follows
/// replaces it by rename (never through it), which is what the plan decided for the empty name,
/// and a command earlier in the same pass (`initdb` writing `postgresql.conf`) makes exactly that.
pub(crate) fn check_unchanged(
    host: &dyn Host,
    path: &AbsPath,
    observed: Option<&Stat>,
) -> Result<(), HostError> {
    let now = host.stat(path)?;
    let id = |s: Option<&Stat>| s.map(|s| (s.kind, s.dev, s.ino));
    if id(now.as_ref()) == id(observed) {
        return Ok(());
    }
    if observed.is_none() && now.as_ref().is_some_and(|s| s.kind == FileKind::File) {
        return Ok(());
    }
    let show = |s: Option<&Stat>| match s {
        Some(s) => format!("{:?} device {} inode {}", s.kind, s.dev, s.ino),
        None => "nothing".to_owned(),
    };
    Err(HostError::Changed {
        path: path.clone(),
        detail: format!("observed {}, found {}", show(observed), show(now.as_ref())),
    })
}

pub(crate) fn expect_kind(
    id: &ResourceId,
    path: &AbsPath,
    stat: &Stat,
    kind: FileKind,
) -> Result<(), PlanError> {
    if stat.kind != kind {
        return Err(PlanError::WrongKind {
            id: id.clone(),
            path: path.clone(),
            expected: match kind {
                FileKind::Directory => "directory",
                _ => "regular file",
            },
        });
    }
    Ok(())
}

pub fn plan(d: &Directory, o: &Observed) -> Result<Vec<Action>, PlanError> {
    let Some(stat) = &o.stat else {
        return Ok(vec![Action::CreateDirectory {
            path: d.path.clone(),
            mode: d.mode,
            owner: d.owner.clone(),
        }]);
    };
    expect_kind(&d.id, &d.path, stat, FileKind::Directory)?;
    Ok(attr_actions(
        &d.path,
        stat,
        d.mode,
        d.owner.as_ref(),
        o.owner,
    ))
}

pub(crate) fn resolve(
    host: &dyn Host,
    path: &AbsPath,
    owner: Option<&Ownership>,
) -> Result<Option<Owner>, HostError> {
    owner
        .map(|o| host.resolve_owner(path, &o.owner, &o.group))
        .transpose()
}

pub fn ensure_directory(
    host: &dyn Host,
    path: &AbsPath,
    mode: FileMode,
    owner: Option<&Ownership>,
) -> Result<(), HostError> {
    let owner = resolve(host, path, owner)?;
    super::ensure_parents(host, path)?;
    host.mkdir(path, Attrs { mode, owner })
}

pub fn ensure_mode(
    host: &dyn Host,
    path: &AbsPath,
    mode: FileMode,
    observed: &Stat,
) -> Result<(), HostError> {
    host.chmod(path, mode, observed)
}

pub fn ensure_owner(
    host: &dyn Host,
    path: &AbsPath,
    owner: &Ownership,
    observed: &Stat,
) -> Result<(), HostError> {
    let ids = host.resolve_owner(path, &owner.owner, &owner.group)?;
    host.chown(path, ids, observed)
}
