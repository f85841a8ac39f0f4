//! The one interface for every host side effect, rooted at a directory: `/` on a droplet and
//! inside a lab chroot, a temp dir in tests. Step code never touches `std::fs` or spawns a
//! process itself; it goes through [`Host`].

pub mod fake;
mod fsid;
pub mod real;

use std::fmt;
use std::path::PathBuf;
use std::process::ExitStatus;
use std::time::Duration;

use hiveseed_proto::{AbsPath, FileMode};

pub use real::RealHost;

/// How much of a failed command's stderr lands in an error (and so in a report).
pub const STDERR_LIMIT: usize = 2048;

/// What a path is, without following a final symlink.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    File,
    Directory,
    Symlink,
    Other,
}

/// `lstat` of one path. Device and inode say which object it was: an action planned from a
/// `Stat` is refused when the path names another object by the time it runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stat {
    pub kind: FileKind,
    /// Permission bits only (`& 0o7777`).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub dev: u64,
    pub ino: u64,
    pub nlink: u64,
}

/// The most [`Host::read`] reads: every file the agent reads whole is small (PEM, passwd,
/// units); a larger one is refused, never loaded.
pub const READ_LIMIT: u64 = 16 * 1024 * 1024;

/// Numeric ownership, resolved from the root's own `/etc/passwd` and `/etc/group`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Owner {
    pub uid: u32,
    pub gid: u32,
}

/// One entry of the root's `/etc/passwd`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PasswdEntry {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub home: String,
    pub shell: String,
}

/// Mode and optional owner of something the host creates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attrs {
    pub mode: FileMode,
    pub owner: Option<Owner>,
}

/// A file being written beside its destination ([`Host::stage_file`]), created with the final
/// mode and owner. Nothing is at the destination until [`Host::commit_staged`]; dropped
/// uncommitted (a refused download, an error), the temp file is removed.
#[derive(Debug)]
pub struct StagedFile {
    path: AbsPath,
    dir: std::os::fd::OwnedFd,
    name: String,
    tmp: String,
    file: std::fs::File,
    committed: bool,
}

impl StagedFile {
    /// The destination.
    pub fn path(&self) -> &AbsPath {
        &self.path
    }

    pub fn file(&mut self) -> &mut std::fs::File {
        &mut self.file
    }
}

impl Drop for StagedFile {
    fn drop(&mut self) {
        if !self.committed {
            let _ =
                rustix::fs::unlinkat(&self.dir, self.tmp.as_str(), rustix::fs::AtFlags::empty());
        }
    }
}

/// Bytes that must never be printed: stdin of a command, secret file content.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Sensitive(pub Vec<u8>);

impl fmt::Debug for Sensitive {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "<{} bytes redacted>", self.0.len())
    }
}

/// A command run by argv only (never through a shell).
#[derive(Debug, Clone)]
pub struct Exec {
    pub argv: Vec<String>,
    /// Fed on stdin: the only way a secret reaches a command.
    pub stdin: Option<Sensitive>,
    /// Run as this user of the root's passwd (uid, gid and groups as `initgroups` sets them).
    pub user: Option<String>,
    /// Added to the fixed environment every child starts with ([`crate::spawn::command`]).
    pub env: Vec<(String, String)>,
    /// Past this the command's whole session is killed and the run is an error naming it.
    pub timeout: Duration,
}

impl Exec {
    /// The default: a command that changes the node (apply).
    pub const APPLY_TIMEOUT: Duration = Duration::from_secs(600);
    /// A command that only looks: a guard, an observation, a probe.
    pub const OBSERVE_TIMEOUT: Duration = Duration::from_secs(60);

    pub fn new<S: Into<String>>(argv: impl IntoIterator<Item = S>) -> Self {
        Self {
            argv: argv.into_iter().map(Into::into).collect(),
            stdin: None,
            user: None,
            env: Vec::new(),
            timeout: Self::APPLY_TIMEOUT,
        }
    }

    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    pub fn stdin(mut self, bytes: Vec<u8>) -> Self {
        self.stdin = Some(Sensitive(bytes));
        self
    }

    pub fn user(mut self, user: Option<String>) -> Self {
        self.user = user;
        self
    }

    /// The argv as one line for errors and plans (arguments are never secret by construction:
    /// secrets travel on stdin).
    pub fn display(&self) -> String {
        display_argv(&self.argv)
    }
}

pub fn display_argv(argv: &[String]) -> String {
    argv.iter()
        .map(|a| {
            if a.is_empty() || a.contains(|c: char| c.is_whitespace() || c == '\'') {
                format!("{a:?}")
            } else {
                a.clone()
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// How a command ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitCode {
    Code(i32),
    Signal(i32),
}

impl ExitCode {
    pub fn from_status(status: ExitStatus) -> Self {
        use std::os::unix::process::ExitStatusExt;
        match (status.code(), status.signal()) {
            (Some(c), _) => ExitCode::Code(c),
            (None, Some(s)) => ExitCode::Signal(s),
            (None, None) => ExitCode::Code(-1),
        }
    }

    pub fn success(self) -> bool {
        self == ExitCode::Code(0)
    }
}

impl fmt::Display for ExitCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExitCode::Code(c) => write!(f, "exit status {c}"),
            ExitCode::Signal(s) => write!(f, "killed by signal {s}"),
        }
    }
}

#[derive(Debug, Clone)]
pub struct ExecOutput {
    pub status: ExitCode,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

impl ExecOutput {
    pub fn stdout_str(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    /// `Ok(self)` on exit 0, else the error every caller reports: argv, status, stderr.
    pub fn check(self, exec: &Exec) -> Result<Self, HostError> {
        if self.status.success() {
            Ok(self)
        } else {
            Err(HostError::CommandFailed {
                argv: exec.display(),
                status: self.status,
                stderr: truncate_stderr(&self.stderr),
            })
        }
    }
}

pub fn truncate_stderr(bytes: &[u8]) -> String {
    let s = String::from_utf8_lossy(bytes);
    let s = s.trim();
    if s.len() <= STDERR_LIMIT {
        return s.to_owned();
    }
    let mut end = STDERR_LIMIT;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… ({} bytes truncated)", &s[..end], s.len() - end)
}

#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error("{path}: resolves outside the root {root} (symlink escape refused)")]
    Escape { path: AbsPath, root: PathBuf },
    #[error(
        "refusing {path}: {what} {at} is in directory {dir}, owned by uid {uid} with mode \
         {mode:04o}; a {what} is only followed through root-owned directories that group and \
         others cannot write"
    )]
    Unsafe {
        path: AbsPath,
        /// `symlink` or `mount point`.
        what: &'static str,
        /// The symlink or mount point, as reached from the root.
        at: String,
        /// The first directory on the way that is not root-owned or is group/other-writable.
        dir: String,
        uid: u32,
        mode: u32,
    },
    #[error("refusing {path}: it is not the object observed when the plan was made ({detail})")]
    Changed { path: AbsPath, detail: String },
    #[error(
        "refusing {path}: it has {links} hard links, so changing it could change another path's \
         file"
    )]
    HardLinked { path: AbsPath, links: u64 },
    #[error("{path}: larger than the {cap} bytes the agent reads")]
    TooLarge { path: AbsPath, cap: u64 },
    #[error("{path}: {op}")]
    Io {
        path: AbsPath,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: expected {expected}, found {found:?}")]
    WrongKind {
        path: AbsPath,
        expected: &'static str,
        found: FileKind,
    },
    #[error("{path}: {what} {name:?} is not in the root's {db}")]
    UnknownName {
        path: AbsPath,
        what: &'static str,
        name: String,
        db: &'static str,
    },
    #[error("could not start `{argv}`")]
    Spawn {
        argv: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{argv}` failed with {status}: {stderr}")]
    CommandFailed {
        argv: String,
        status: ExitCode,
        stderr: String,
    },
    #[error("`{argv}` still ran after {timeout:?} (its timeout): its session was killed")]
    Timeout { argv: String, timeout: Duration },
    #[error(
        "`{argv}` wrote more than {cap} bytes to {stream} (the output cap): its session was killed"
    )]
    OutputCap {
        argv: String,
        stream: &'static str,
        cap: usize,
    },
    #[error("empty argv")]
    EmptyArgv,
    #[error("{program:?} is neither an absolute path nor a program in the fixed PATH {path}")]
    ProgramNotFound { program: String, path: &'static str },
    #[error("root {root} cannot be opened")]
    Root {
        root: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Every host side effect the agent has. Paths are [`AbsPath`]s relative to the host's root;
/// the implementation joins them to the root in exactly one place.
pub trait Host: Send + Sync + fmt::Debug {
    /// The whole regular file, `None` when it does not exist; at most [`READ_LIMIT`] bytes.
    fn read(&self, path: &AbsPath) -> Result<Option<Vec<u8>>, HostError> {
        self.read_limited(path, READ_LIMIT)
    }
    /// The whole regular file, `None` when it does not exist; a FIFO, device, directory or a file
    /// over `cap` bytes is an error naming the path.
    fn read_limited(&self, path: &AbsPath, cap: u64) -> Result<Option<Vec<u8>>, HostError>;
    /// `lstat`, `None` when it does not exist.
    fn stat(&self, path: &AbsPath) -> Result<Option<Stat>, HostError>;
    /// SHA-256 of the whole file, `None` when it does not exist. An implementation may remember
    /// digests of files whose identity and times have not changed (large artifacts are observed
    /// on every convergence).
    fn sha256(&self, path: &AbsPath) -> Result<Option<hiveseed_proto::Sha256>, HostError> {
        Ok(self.read(path)?.map(|b| hiveseed_proto::Sha256::digest(&b)))
    }
    /// Temp file created with the final mode (and owner), content written and fsynced, renamed
    /// over `path`, directory fsynced. The parent must exist.
    fn write_atomic(&self, path: &AbsPath, content: &[u8], attrs: Attrs) -> Result<(), HostError>;
    /// The first half of `write_atomic` for content that is streamed (downloads): the temp file,
    /// created with the final mode (and owner) in `path`'s directory. The parent must exist.
    fn stage_file(&self, path: &AbsPath, attrs: Attrs) -> Result<StagedFile, HostError>;
    /// The second half: fsync, rename over the destination, fsync the directory.
    fn commit_staged(&self, staged: StagedFile) -> Result<(), HostError>;
    /// Create one directory (the parent must exist); an existing directory (one made since it
    /// was observed missing) gets `attrs` set on it too, by fd.
    fn mkdir(&self, path: &AbsPath, attrs: Attrs) -> Result<(), HostError>;
    /// chmod of the object `observed` saw (same device and inode, one link if a file), by fd;
    /// refuses a final symlink.
    fn chmod(&self, path: &AbsPath, mode: FileMode, observed: &Stat) -> Result<(), HostError>;
    /// chown of the object `observed` saw, as [`Host::chmod`].
    fn chown(&self, path: &AbsPath, owner: Owner, observed: &Stat) -> Result<(), HostError>;
    /// Remove a file (not a directory); a missing file counts as removed.
    fn remove(&self, path: &AbsPath) -> Result<(), HostError>;
    /// Open for appending (created with `mode` when missing): service logs.
    fn open_append(&self, path: &AbsPath, mode: FileMode) -> Result<std::fs::File, HostError>;
    /// The directory as a path the kernel can use for a child's cwd, checked to be in the root.
    fn dir_path(&self, path: &AbsPath) -> Result<PathBuf, HostError>;
    /// Run argv (never a shell) and collect its output. A non-zero exit is not an error here:
    /// callers decide with [`ExecOutput::check`].
    fn exec(&self, exec: &Exec) -> Result<ExecOutput, HostError>;

    /// The root's `/etc/passwd` entry for `name`.
    fn lookup_user(&self, name: &str) -> Result<Option<PasswdEntry>, HostError> {
        let path: AbsPath = "/etc/passwd".parse().expect("static path");
        let Some(bytes) = self.read(&path)? else {
            return Ok(None);
        };
        Ok(parse_passwd(&String::from_utf8_lossy(&bytes), name))
    }

    /// The root's `/etc/group` gid for `name`.
    fn lookup_group(&self, name: &str) -> Result<Option<u32>, HostError> {
        let path: AbsPath = "/etc/group".parse().expect("static path");
        let Some(bytes) = self.read(&path)? else {
            return Ok(None);
        };
        Ok(parse_group(&String::from_utf8_lossy(&bytes), name))
    }

    /// Owner and group names to ids, erroring when either is unknown.
    fn resolve_owner(&self, path: &AbsPath, owner: &str, group: &str) -> Result<Owner, HostError> {
        let uid = self
            .lookup_user(owner)?
            .ok_or_else(|| HostError::UnknownName {
                path: path.clone(),
                what: "user",
                name: owner.into(),
                db: "/etc/passwd",
            })?
            .uid;
        let gid = self
            .lookup_group(group)?
            .ok_or_else(|| HostError::UnknownName {
                path: path.clone(),
                what: "group",
                name: group.into(),
                db: "/etc/group",
            })?;
        Ok(Owner { uid, gid })
    }
}

pub fn parse_passwd(text: &str, name: &str) -> Option<PasswdEntry> {
    text.lines().find_map(|line| {
        let f: Vec<&str> = line.split(':').collect();
        if f.len() < 7 || f[0] != name {
            return None;
        }
        Some(PasswdEntry {
            name: f[0].into(),
            uid: f[2].parse().ok()?,
            gid: f[3].parse().ok()?,
            home: f[5].into(),
            shell: f[6].into(),
        })
    })
}

pub fn parse_group(text: &str, name: &str) -> Option<u32> {
    text.lines().find_map(|line| {
        let f: Vec<&str> = line.split(':').collect();
        if f.len() < 3 || f[0] != name {
            return None;
        }
        f[2].parse().ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwd_and_group_parse_the_named_entry_only() {
        let pw = "root:x:0:0:root:/root:/bin/bash\nai-memory:x:998:997::/var/lib/ai-memory:/usr/sbin/nologin\n";
        let e = parse_passwd(pw, "ai-memory").unwrap();
        assert_eq!((e.uid, e.gid), (998, 997));
        assert_eq!(e.home, "/var/lib/ai-memory");
        assert!(parse_passwd(pw, "ai").is_none());
        assert_eq!(
            parse_group("root:x:0:\npostgres:x:104:\n", "postgres"),
            Some(104)
        );
        assert_eq!(parse_group("root:x:0:\n", "postgres"), None);
    }

    #[test]
    fn stderr_is_truncated_on_a_char_boundary() {
        let long = "é".repeat(STDERR_LIMIT);
        let t = truncate_stderr(long.as_bytes());
        assert!(t.len() < long.len());
        assert!(t.ends_with("bytes truncated)"));
        assert_eq!(truncate_stderr(b"  short\n"), "short");
    }

    #[test]
    fn stdin_is_redacted_in_debug() {
        let e = Exec::new(["psql"]).stdin(b"PASSWORD 'hunter2'".to_vec());
        let dbg = format!("{e:?}");
        assert!(!dbg.contains("hunter2"), "{dbg}");
        assert!(dbg.contains("redacted"));
    }
}
