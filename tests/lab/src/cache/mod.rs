//! The lab's build cache, outside the clone: the trixie base rootfs, the ai-memory binary and the
//! MiniLM embedder files.
//!
//! Root: `$HIVESEED_CACHE`, else `/var/cache/hiveseed`. Every entry is built in a
//! `.tmp-<entry>-<pid>` sibling and renamed into place in one step, so an entry that exists is
//! complete; a half-built one never has the final name. Builders of one entry serialize on a
//! `flock`ed `.<entry>.lock`; holding it, they delete leftover `.tmp-<entry>-*` dirs of crashed
//! builds (unmounting anything below them first).

pub mod ai_memory;
pub mod minilm;
pub mod rootfs;

use std::fmt;
use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use nix::fcntl::{Flock, FlockArg};
use sha2::{Digest, Sha256};

pub use ai_memory::AiMemory;
pub use minilm::Minilm;
pub use rootfs::BaseRootfs;

/// Default cache root when `$HIVESEED_CACHE` is unset.
pub const DEFAULT_CACHE: &str = "/var/cache/hiveseed";

/// Whether an entry was found or had to be made.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Outcome {
    Reused,
    Built { took: Duration },
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            Outcome::Reused => "reused".to_owned(),
            Outcome::Built { took } => format!("built in {:.1}s", took.as_secs_f64()),
        };
        f.pad(&s)
    }
}

/// A cache root directory.
#[derive(Debug, Clone)]
pub struct Cache {
    root: PathBuf,
}

impl Cache {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// `$HIVESEED_CACHE` or `/var/cache/hiveseed`.
    pub fn from_env() -> Self {
        Self::new(
            std::env::var_os("HIVESEED_CACHE")
                .map_or_else(|| PathBuf::from(DEFAULT_CACHE), PathBuf::from),
        )
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Creates `<root>/<rel>` and returns it.
    fn dir(&self, rel: &str) -> Result<PathBuf> {
        let p = self.root.join(rel);
        fs::create_dir_all(&p).with_context(|| format!("create {}", p.display()))?;
        Ok(p)
    }
}

/// Exclusive lock for building `name` inside `parent`; released on drop.
fn lock_entry(parent: &Path, name: &str) -> Result<Flock<File>> {
    let path = parent.join(format!(".{name}.lock"));
    let f = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("open {}", path.display()))?;
    Flock::lock(f, FlockArg::LockExclusive)
        .map_err(|(_, e)| anyhow!("lock {}: {e}", path.display()))
}

/// Deletes leftovers of crashed builds of `name` (call with the entry lock held), unmounting
/// anything below them first so deletion never walks into a mounted /proc.
fn sweep_stale(parent: &Path, name: &str) -> Result<()> {
    let prefix = format!(".tmp-{name}-");
    for entry in fs::read_dir(parent).with_context(|| format!("list {}", parent.display()))? {
        let entry = entry?;
        if !entry.file_name().to_string_lossy().starts_with(&prefix) {
            continue;
        }
        let path = entry.path();
        tracing::warn!(path = %path.display(), "removing leftover of an interrupted build");
        for m in crate::mounts::mounts_under(&path)? {
            crate::mounts::unmount(&m, Duration::from_secs(5))
                .with_context(|| format!("unmount {}", m.display()))?;
        }
        remove_path(&path)?;
    }
    Ok(())
}

fn remove_path(path: &Path) -> Result<()> {
    let meta = match fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("stat {}", path.display())),
    };
    if meta.is_dir() {
        fs::remove_dir_all(path)
    } else {
        fs::remove_file(path)
    }
    .with_context(|| format!("remove {}", path.display()))
}

/// A fresh staging dir for `name` in `parent` (same filesystem as the final entry).
fn staging_dir(parent: &Path, name: &str) -> Result<PathBuf> {
    let tmp = parent.join(format!(".tmp-{name}-{}", std::process::id()));
    remove_path(&tmp)?;
    fs::create_dir(&tmp).with_context(|| format!("create {}", tmp.display()))?;
    Ok(tmp)
}

/// Moves an invalid entry out of the way (renamed to a `.tmp-` name, so a crash while deleting
/// it leaves only a leftover the next sweep removes).
fn discard_invalid(parent: &Path, name: &str) -> Result<()> {
    let path = parent.join(name);
    if fs::symlink_metadata(&path).is_err() {
        return Ok(());
    }
    tracing::warn!(path = %path.display(), "cache entry present but not valid: rebuilding");
    let aside = parent.join(format!(".tmp-{name}-invalid-{}", std::process::id()));
    fs::rename(&path, &aside).with_context(|| format!("move aside {}", path.display()))?;
    remove_path(&aside)
}

/// Publishes a staged entry: flush everything to disk, then one rename.
fn commit(tmp: &Path, final_path: &Path) -> Result<()> {
    nix::unistd::sync();
    fs::rename(tmp, final_path)
        .with_context(|| format!("rename {} -> {}", tmp.display(), final_path.display()))?;
    if let Some(parent) = final_path.parent() {
        File::open(parent).and_then(|d| d.sync_all()).ok();
    }
    Ok(())
}

/// Writes `path` atomically (temp file in the same dir, fsync, rename).
fn write_atomic(path: &Path, contents: &[u8]) -> Result<()> {
    let dir = path
        .parent()
        .ok_or_else(|| anyhow!("{} has no parent", path.display()))?;
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    tmp.write_all(contents)?;
    // NamedTempFile is 0600; cache entries are read by whoever runs the lab.
    tmp.as_file()
        .set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o644))?;
    tmp.as_file().sync_all()?;
    tmp.persist(path)
        .with_context(|| format!("write {}", path.display()))?;
    Ok(())
}

/// Lowercase hex sha256 of a file's contents.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = File::open(path).with_context(|| format!("open {}", path.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

/// Runs `cmd` with stdout and stderr appended to `log`; on failure the error carries argv,
/// status and the log's last lines. Returns how long it took.
fn run_logged(cmd: &mut Command, log: &Path) -> Result<Duration> {
    let argv = describe(cmd);
    let mut out = File::options()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("open {}", log.display()))?;
    writeln!(out, "\n== {argv}")?;
    let err = out.try_clone()?;
    tracing::info!(log = %log.display(), "running {argv}");
    let started = Instant::now();
    let status = cmd
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .status()
        .with_context(|| format!("start {argv}"))?;
    let took = started.elapsed();
    if !status.success() {
        bail!(
            "{argv} exited with {status}; last lines of {}:\n{}",
            log.display(),
            tail(log, 25)
        );
    }
    tracing::info!(took_s = took.as_secs_f64(), "done: {argv}");
    Ok(took)
}

/// Runs `cmd`, capturing stdout; failure carries argv, status and stderr.
fn run_captured(cmd: &mut Command) -> Result<String> {
    let argv = describe(cmd);
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("start {argv}"))?;
    if !out.status.success() {
        bail!(
            "{argv} exited with {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn describe(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

fn tail(path: &Path, lines: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn staged_entry_is_invisible_until_commit_and_leftovers_are_swept() {
        let dir = tempfile::tempdir().unwrap();
        let _lock = lock_entry(dir.path(), "e").unwrap();
        let tmp = staging_dir(dir.path(), "e").unwrap();
        fs::write(tmp.join("f"), b"x").unwrap();
        assert!(!dir.path().join("e").exists());
        commit(&tmp, &dir.path().join("e")).unwrap();
        assert_eq!(fs::read(dir.path().join("e/f")).unwrap(), b"x");

        fs::create_dir_all(dir.path().join(".tmp-e-999/sub")).unwrap();
        fs::create_dir_all(dir.path().join(".tmp-other-1")).unwrap();
        sweep_stale(dir.path(), "e").unwrap();
        assert!(!dir.path().join(".tmp-e-999").exists());
        assert!(dir.path().join(".tmp-other-1").exists());
        assert!(dir.path().join("e/f").exists());
    }

    #[test]
    fn sha256_of_known_content() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("abc");
        fs::write(&p, b"abc").unwrap();
        assert_eq!(
            sha256_file(&p).unwrap(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn failed_command_error_names_argv_and_log_tail() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log");
        let err = run_logged(
            Command::new("/bin/sh").args(["-c", "echo boom-marker >&2; exit 3"]),
            &log,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("/bin/sh -c"), "{err}");
        assert!(err.contains("boom-marker"), "{err}");
    }
}
