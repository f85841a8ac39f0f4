//! `file`: content (inline text or bytes, or a sha256-addressed artifact), mode, owner; written
//! atomically.
//! Secret files never get group/other bits and their content never reaches a log or an error.

use hiveseed_proto::manifest::{File, FileContent, Ownership};
use hiveseed_proto::{AbsPath, FileMode, Sha256};

use super::directory::{attr_actions, expect_kind, OwnerCache};
use super::{ArtifactFetcher, ResourceError};
use crate::host::{Attrs, FileKind, Host, HostError, Owner, Stat};
use crate::plan::{content_of, Action, Content, PlanError};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observed {
    pub stat: Option<Stat>,
    /// Digest of the current content; `None` when absent, not a file, or of another size
    /// (then it differs anyway and is not read).
    pub sha256: Option<Sha256>,
    pub owner: Option<Owner>,
}

fn desired(content: &FileContent) -> (Sha256, u64) {
    match content {
        FileContent::Text { text } => (Sha256::digest(text.as_bytes()), text.len() as u64),
        FileContent::Artifact { sha256, size } => (*sha256, *size),
        FileContent::Base64 { base64 } => (
            Sha256::digest(base64.as_bytes()),
            base64.as_bytes().len() as u64,
        ),
    }
}

pub fn observe(host: &dyn Host, owners: &mut OwnerCache, f: &File) -> Result<Observed, HostError> {
    let stat = host.stat(&f.path)?;
    let (_, size) = desired(&f.content);
    let sha256 = match &stat {
        Some(s) if s.kind == FileKind::File && s.size == size => host.sha256(&f.path)?,
        _ => None,
    };
    let owner = match &f.owner {
        Some(o) => owners.resolve(host, o)?,
        None => None,
    };
    Ok(Observed {
        stat,
        sha256,
        owner,
    })
}

/// Refuses a secret that group or others could read, before anything is written.
pub(crate) fn check_secret_mode(f: &File) -> Result<(), PlanError> {
    if f.secret && f.mode.exposes_to_others() {
        return Err(PlanError::SecretExposed {
            id: f.id.clone(),
            path: f.path.clone(),
            mode: f.mode,
        });
    }
    Ok(())
}

pub fn plan(f: &File, o: &Observed) -> Result<Vec<Action>, PlanError> {
    check_secret_mode(f)?;
    let write = || Action::WriteFile {
        path: f.path.clone(),
        content: content_of(&f.content),
        mode: f.mode,
        owner: f.owner.clone(),
        secret: f.secret,
    };
    let Some(stat) = &o.stat else {
        return Ok(vec![write()]);
    };
    if stat.kind == FileKind::Symlink {
        // The atomic rename replaces the link itself, never its target.
        return Ok(vec![write()]);
    }
    expect_kind(&f.id, &f.path, stat, FileKind::File)?;
    if o.sha256 != Some(desired(&f.content).0) {
        return Ok(vec![write()]);
    }
    Ok(attr_actions(
        &f.path,
        stat,
        f.mode,
        f.owner.as_ref(),
        o.owner,
    ))
}

/// Writes `content` to `path` atomically with its final mode and owner; artifacts are fetched
/// and verified against size and digest before anything touches the disk.
pub async fn ensure_file(
    host: &dyn Host,
    fetcher: &dyn ArtifactFetcher,
    path: &AbsPath,
    content: &Content,
    mode: FileMode,
    owner: Option<&Ownership>,
) -> Result<(), ResourceError> {
    let owner = super::directory::resolve(host, path, owner)?;
    let fetched;
    let bytes: &[u8] = match content {
        Content::Text(t) => &t.0,
        Content::Artifact { sha256, size } => {
            fetched =
                fetcher
                    .fetch(sha256, *size)
                    .await
                    .map_err(|source| ResourceError::Fetch {
                        sha256: *sha256,
                        source,
                    })?;
            let got = Sha256::digest(&fetched);
            if got != *sha256 || fetched.len() as u64 != *size {
                return Err(ResourceError::ArtifactMismatch {
                    expected: *sha256,
                    expected_len: *size,
                    got,
                    got_len: fetched.len() as u64,
                });
            }
            &fetched
        }
    };
    super::ensure_parents(host, path)?;
    host.write_atomic(path, bytes, Attrs { mode, owner })?;
    Ok(())
}
