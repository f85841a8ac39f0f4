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
        observed: o.stat,
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

/// Writes `content` to `path` atomically with its final mode and owner. An artifact is streamed
/// into a temp file beside `path` while it is hashed; only bytes of the manifest's size and digest
/// are renamed into place, anything else is deleted with the temp file.
pub async fn ensure_file(
    host: &dyn Host,
    fetcher: &dyn ArtifactFetcher,
    path: &AbsPath,
    content: &Content,
    mode: FileMode,
    owner: Option<&Ownership>,
    observed: Option<&Stat>,
) -> Result<(), ResourceError> {
    super::directory::check_unchanged(host, path, observed)?;
    let owner = super::directory::resolve(host, path, owner)?;
    super::ensure_parents(host, path)?;
    match content {
        Content::Text(t) => host.write_atomic(path, &t.0, Attrs { mode, owner })?,
        Content::Artifact { sha256, size } => {
            // Dropped on every early return, which removes the temp file.
            let mut staged = host.stage_file(path, Attrs { mode, owner })?;
            let mut sink = ArtifactSink::new(staged.file(), *size);
            let fetched = fetcher.fetch(sha256, *size, &mut sink).await;
            let (got, got_len) = sink.finish();
            if got_len > *size {
                return Err(ResourceError::ArtifactMismatch {
                    expected: *sha256,
                    expected_len: *size,
                    got,
                    got_len,
                });
            }
            fetched.map_err(|source| ResourceError::Fetch {
                sha256: *sha256,
                source,
            })?;
            if got != *sha256 || got_len != *size {
                return Err(ResourceError::ArtifactMismatch {
                    expected: *sha256,
                    expected_len: *size,
                    got,
                    got_len,
                });
            }
            host.commit_staged(staged)?;
        }
    }
    Ok(())
}

/// Where a download is written: hashes what it passes to the temp file and refuses a byte past
/// the expected size (a seeder cannot make the agent fill its disk).
struct ArtifactSink<'a> {
    file: &'a mut std::fs::File,
    limit: u64,
    /// Bytes offered, including any refused past the limit.
    offered: u64,
    hasher: sha2::Sha256,
}

impl<'a> ArtifactSink<'a> {
    fn new(file: &'a mut std::fs::File, limit: u64) -> Self {
        Self {
            file,
            limit,
            offered: 0,
            hasher: sha2::Digest::new(),
        }
    }

    /// The digest of the bytes kept and the number of bytes offered.
    fn finish(self) -> (Sha256, u64) {
        (
            Sha256(sha2::Digest::finalize(self.hasher).into()),
            self.offered,
        )
    }
}

impl std::io::Write for ArtifactSink<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.offered += buf.len() as u64;
        if self.offered > self.limit {
            return Err(std::io::Error::other(format!(
                "more than the manifest's {} bytes",
                self.limit
            )));
        }
        self.file.write_all(buf)?;
        sha2::Digest::update(&mut self.hasher, buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}
