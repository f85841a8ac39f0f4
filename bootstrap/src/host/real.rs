//! The real host: file operations relative to a root directory fd, and commands spawned by argv
//! (prepared in [`crate::spawn`]).
//!
//! Every path is walked one component at a time with `openat2(RESOLVE_NO_SYMLINKS |
//! RESOLVE_NO_MAGICLINKS | RESOLVE_NO_XDEV)`, so the kernel itself refuses to follow a symlink or
//! cross a mount point. The walk follows a symlink (or crosses a mount point) only where every
//! directory on the way from the root is owned by root and not writable by group or others
//! (systemd's CHASE_SAFE rule): `/var/run -> /run` keeps working, while a link a service user
//! plants in a directory it owns (`/etc/ai-memory/keys/<campaign>/<region> -> /etc/cron.d`) is
//! refused with an error naming the path. Everything after the walk happens through the fd of
//! the directory it reached, so a later swap of a name on the way cannot redirect it.
//!
//! Under a root other than `/` (tests) a symlink may not leave the root: an absolute target or a
//! `..` past the root is refused as an escape (what `RESOLVE_BENEATH` does), and every step also
//! carries `RESOLVE_BENEATH`. [`RealHost::with_system_resolution`] walks a test root exactly as
//! `/` is walked (absolute targets restart at the root), so tests cover the droplet's code path.
//!
//! Commands run in the agent's own mount namespace: on a droplet and inside a lab chroot the
//! root is `/`, so the two agree. With a temp-dir root (tests) only files are rooted.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};

use hiveseed_proto::{AbsPath, FileMode};
use rand::RngCore;
use rustix::fs::{AtFlags, FileType, Mode, OFlags, ResolveFlags};
use rustix::io::Errno;

use super::fsid::AsOwner;
use super::{Attrs, Exec, ExecOutput, FileKind, Host, HostError, Owner, StagedFile, Stat};

/// Symlinks one resolution may follow before it is refused (the kernel's own limit).
const MAX_SYMLINKS: usize = 40;

/// Flags for opening an existing object to read it or change its attributes: never through a
/// final symlink, never blocking on a FIFO, never acquiring a terminal.
const OPEN_EXISTING: OFlags = OFlags::RDONLY
    .union(OFlags::NOFOLLOW)
    .union(OFlags::NONBLOCK)
    .union(OFlags::NOCTTY)
    .union(OFlags::CLOEXEC);

/// How far a symlink may lead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Confinement {
    /// The root is the system's `/` (or stands for it): an absolute target starts again at the
    /// root.
    System,
    /// A test root: a target leaving it is an escape.
    Beneath,
}

#[derive(Debug)]
pub struct RealHost {
    root: PathBuf,
    root_fd: OwnedFd,
    confinement: Confinement,
    /// Digests by path, valid while the file's device, inode, size, mtime and ctime are the
    /// same (any write or attribute change moves ctime, which user space cannot set back).
    digests: std::sync::Mutex<std::collections::HashMap<String, (FileKey, hiveseed_proto::Sha256)>>,
}

/// What must not change for a remembered digest to still be the file's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileKey {
    dev: u64,
    ino: u64,
    size: i64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl FileKey {
    fn of(st: &rustix::fs::Stat) -> Self {
        Self {
            dev: st.st_dev,
            ino: st.st_ino,
            size: st.st_size,
            mtime: (st.st_mtime, st.st_mtime_nsec as i64),
            ctime: (st.st_ctime, st.st_ctime_nsec as i64),
        }
    }
}

/// The first directory on the way that a non-root user controls: past it nothing is followed.
#[derive(Debug, Clone)]
struct Untrusted {
    dir: String,
    uid: u32,
    mode: u32,
}

/// One directory reached by the walk.
struct Level {
    fd: OwnedFd,
    /// Its path from the root, for errors.
    shown: String,
    untrusted: Option<Untrusted>,
}

impl Level {
    fn child(&self, name: &str) -> String {
        if self.shown == "/" {
            format!("/{name}")
        } else {
            format!("{}/{name}", self.shown)
        }
    }
}

/// Where a path's last component lives: the directory the walk reached (an `O_PATH` fd) and the
/// name in it. The name itself has not been opened or followed.
struct Parent {
    dir: OwnedFd,
    name: String,
}

/// Why a walk stopped.
enum WalkError {
    Errno(Errno),
    Escape,
    Unsafe {
        what: &'static str,
        at: String,
        by: Untrusted,
    },
}

impl From<Errno> for WalkError {
    fn from(e: Errno) -> Self {
        WalkError::Errno(e)
    }
}

fn is_untrusted(st: &rustix::fs::Stat) -> bool {
    st.st_uid != 0 || st.st_mode & 0o022 != 0
}

fn components(s: &str) -> impl DoubleEndedIterator<Item = &str> {
    s.split('/').filter(|c| !c.is_empty() && *c != ".")
}

impl RealHost {
    /// Opens the root directory. No other I/O.
    pub fn new(root: impl Into<PathBuf>) -> Result<Self, HostError> {
        let root = root.into();
        let confinement = if root == Path::new("/") {
            Confinement::System
        } else {
            Confinement::Beneath
        };
        Self::open(root, confinement)
    }

    /// A host whose paths resolve under `root` exactly as they do under `/` (an absolute
    /// symlink target starts again at `root`, as it would in a chroot): what tests use to cover
    /// the code path a droplet runs.
    pub fn with_system_resolution(root: impl Into<PathBuf>) -> Result<Self, HostError> {
        Self::open(root.into(), Confinement::System)
    }

    fn open(root: PathBuf, confinement: Confinement) -> Result<Self, HostError> {
        let root_fd = rustix::fs::open(
            &root,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| HostError::Root {
            root: root.clone(),
            source: e.into(),
        })?;
        Ok(Self {
            digests: Default::default(),
            root,
            root_fd,
            confinement,
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The flags every step of a walk is opened with.
    pub fn resolve_flags(&self) -> ResolveFlags {
        let safe = ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS | ResolveFlags::NO_XDEV;
        match self.confinement {
            Confinement::System => safe,
            Confinement::Beneath => safe | ResolveFlags::BENEATH,
        }
    }

    fn io_err(&self, path: &AbsPath, op: &'static str, e: Errno) -> HostError {
        HostError::Io {
            path: path.clone(),
            op,
            source: e.into(),
        }
    }

    fn walk_err(&self, path: &AbsPath, op: &'static str, e: WalkError) -> HostError {
        match e {
            WalkError::Errno(e) => self.io_err(path, op, e),
            WalkError::Escape => HostError::Escape {
                path: path.clone(),
                root: self.root.clone(),
            },
            WalkError::Unsafe { what, at, by } => HostError::Unsafe {
                path: path.clone(),
                what,
                at,
                dir: by.dir,
                uid: by.uid,
                mode: by.mode,
            },
        }
    }

    fn root_level(&self) -> Result<Level, Errno> {
        let fd = rustix::io::fcntl_dupfd_cloexec(&self.root_fd, 0)?;
        let st = rustix::fs::fstat(&fd)?;
        let untrusted = is_untrusted(&st).then(|| Untrusted {
            dir: "/".into(),
            uid: st.st_uid,
            mode: st.st_mode & 0o7777,
        });
        Ok(Level {
            fd,
            shown: "/".into(),
            untrusted,
        })
    }

    /// Walks `path` from the root to its last component, one `openat2` per directory. With
    /// `follow_final`, a final symlink is followed too (by the same rule); without, the last
    /// component is returned as it is, whatever it is.
    fn walk(&self, path: &AbsPath, follow_final: bool) -> Result<Parent, WalkError> {
        let mut pending: VecDeque<String> = components(path.as_str()).map(str::to_owned).collect();
        let mut stack = vec![self.root_level()?];
        let mut links = 0;
        while let Some(name) = pending.pop_front() {
            let last = pending.is_empty();
            if name == ".." {
                if stack.len() > 1 {
                    stack.pop();
                } else if self.confinement == Confinement::Beneath {
                    return Err(WalkError::Escape);
                }
                if last {
                    // Only a symlink's target can end in `..`; manifest paths cannot.
                    return Err(WalkError::Errno(Errno::INVAL));
                }
                continue;
            }
            let top = stack.last().expect("the root is never popped");
            let is_link = if last {
                match rustix::fs::statat(&top.fd, name.as_str(), AtFlags::SYMLINK_NOFOLLOW) {
                    Ok(st) => FileType::from_raw_mode(st.st_mode) == FileType::Symlink,
                    Err(Errno::NOENT) => false,
                    Err(e) => return Err(e.into()),
                }
            } else {
                false
            };
            if last && !(is_link && follow_final) {
                let dir = rustix::io::fcntl_dupfd_cloexec(&top.fd, 0)?;
                return Ok(Parent { dir, name });
            }
            let fd = if last {
                None
            } else {
                Some(self.step(top, &name)?)
            };
            let st = match &fd {
                Some(fd) => Some(rustix::fs::fstat(fd)?),
                None => None,
            };
            let link = is_link
                || st
                    .as_ref()
                    .is_some_and(|st| FileType::from_raw_mode(st.st_mode) == FileType::Symlink);
            if link {
                if let Some(by) = &top.untrusted {
                    return Err(WalkError::Unsafe {
                        what: "symlink",
                        at: top.child(&name),
                        by: by.clone(),
                    });
                }
                links += 1;
                if links > MAX_SYMLINKS {
                    return Err(WalkError::Errno(Errno::LOOP));
                }
                let target = rustix::fs::readlinkat(&top.fd, name.as_str(), Vec::new())?;
                let target = target.to_string_lossy().into_owned();
                if target.starts_with('/') {
                    if self.confinement == Confinement::Beneath {
                        return Err(WalkError::Escape);
                    }
                    stack.truncate(1);
                }
                for c in components(&target).rev() {
                    pending.push_front(c.to_owned());
                }
                continue;
            }
            let (fd, st) = (fd.expect("not last"), st.expect("not last"));
            if FileType::from_raw_mode(st.st_mode) != FileType::Directory {
                return Err(WalkError::Errno(Errno::NOTDIR));
            }
            let shown = top.child(&name);
            let untrusted = top.untrusted.clone().or_else(|| {
                is_untrusted(&st).then(|| Untrusted {
                    dir: shown.clone(),
                    uid: st.st_uid,
                    mode: st.st_mode & 0o7777,
                })
            });
            stack.push(Level {
                fd,
                shown,
                untrusted,
            });
        }
        // The path was `/`, or a symlink led back to a directory: its parent is not known.
        Err(WalkError::Errno(Errno::INVAL))
    }

    /// Opens one component below `top` without following it; a mount point is crossed only from
    /// a trusted directory.
    fn step(&self, top: &Level, name: &str) -> Result<OwnedFd, WalkError> {
        let flags = OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let resolve = self.resolve_flags();
        match rustix::fs::openat2(&top.fd, name, flags, Mode::empty(), resolve) {
            Err(Errno::XDEV) => {
                if let Some(by) = &top.untrusted {
                    return Err(WalkError::Unsafe {
                        what: "mount point",
                        at: top.child(name),
                        by: by.clone(),
                    });
                }
                let resolve = resolve - ResolveFlags::NO_XDEV;
                Ok(rustix::fs::openat2(
                    &top.fd,
                    name,
                    flags,
                    Mode::empty(),
                    resolve,
                )?)
            }
            r => Ok(r?),
        }
    }

    /// The directory holding `path`'s last component and that name; the root itself has none.
    fn parent(&self, path: &AbsPath, op: &'static str) -> Result<Parent, HostError> {
        if path.as_str() == "/" {
            return Err(HostError::Io {
                path: path.clone(),
                op,
                source: std::io::Error::other("not allowed on the root itself"),
            });
        }
        self.walk(path, false)
            .map_err(|e| self.walk_err(path, op, e))
    }

    /// The one read path: the regular file at `path` (a final symlink followed by the walk's
    /// rule), opened `O_NOFOLLOW | O_NONBLOCK | O_NOCTTY` and checked with `fstat` after the open,
    /// so a FIFO, a device or a directory is an error, never a hang or an endless read. `None`
    /// when it does not exist.
    fn open_regular(
        &self,
        path: &AbsPath,
        cap: u64,
    ) -> Result<Option<(std::fs::File, rustix::fs::Stat)>, HostError> {
        if path.as_str() == "/" {
            return Err(HostError::WrongKind {
                path: path.clone(),
                expected: "a regular file",
                found: FileKind::Directory,
            });
        }
        let parent = match self.walk(path, true) {
            Ok(p) => p,
            Err(WalkError::Errno(Errno::NOENT | Errno::NOTDIR)) => return Ok(None),
            Err(e) => return Err(self.walk_err(path, "open for reading", e)),
        };
        let fd = match rustix::fs::openat(
            &parent.dir,
            parent.name.as_str(),
            OPEN_EXISTING,
            Mode::empty(),
        ) {
            Ok(fd) => fd,
            Err(Errno::NOENT) => return Ok(None),
            Err(e) => return Err(self.io_err(path, "open for reading", e)),
        };
        let st = rustix::fs::fstat(&fd).map_err(|e| self.io_err(path, "stat", e))?;
        let kind = to_stat(&st).kind;
        if kind != FileKind::File {
            return Err(HostError::WrongKind {
                path: path.clone(),
                expected: "a regular file",
                found: kind,
            });
        }
        if st.st_size as u64 > cap {
            return Err(HostError::TooLarge {
                path: path.clone(),
                cap,
            });
        }
        Ok(Some((std::fs::File::from(fd), st)))
    }

    /// Opens the existing object at `path` (never a final symlink) and checks it is the one
    /// `observed` saw: same kind, device and inode, and a single link if it is a file (a hard
    /// link could be another path's file, e.g. `/etc/shadow`).
    fn open_observed(
        &self,
        path: &AbsPath,
        observed: &Stat,
        op: &'static str,
    ) -> Result<OwnedFd, HostError> {
        let parent = self.parent(path, op)?;
        let fd = match rustix::fs::openat(
            &parent.dir,
            parent.name.as_str(),
            OPEN_EXISTING,
            Mode::empty(),
        ) {
            Ok(fd) => fd,
            Err(Errno::LOOP) => {
                return Err(HostError::WrongKind {
                    path: path.clone(),
                    expected: "a file or directory, not a symlink",
                    found: FileKind::Symlink,
                })
            }
            Err(Errno::NOENT) => {
                return Err(HostError::Changed {
                    path: path.clone(),
                    detail: "it no longer exists".into(),
                })
            }
            Err(e) => return Err(self.io_err(path, op, e)),
        };
        let now = to_stat(&rustix::fs::fstat(&fd).map_err(|e| self.io_err(path, "stat", e))?);
        if (now.kind, now.dev, now.ino) != (observed.kind, observed.dev, observed.ino) {
            return Err(HostError::Changed {
                path: path.clone(),
                detail: format!(
                    "observed {:?} device {} inode {}, found {:?} device {} inode {}",
                    observed.kind, observed.dev, observed.ino, now.kind, now.dev, now.ino
                ),
            });
        }
        if now.kind == FileKind::File && now.nlink != 1 {
            return Err(HostError::HardLinked {
                path: path.clone(),
                links: now.nlink,
            });
        }
        Ok(fd)
    }

    /// Owner first, then mode: `fchown` clears set-id bits, so the mode must come last.
    fn set_attrs(&self, path: &AbsPath, fd: impl AsFd, attrs: Attrs) -> Result<(), HostError> {
        let st = to_stat(&rustix::fs::fstat(&fd).map_err(|e| self.io_err(path, "stat", e))?);
        if let Some(owner) = attrs.owner {
            if (st.uid, st.gid) != (owner.uid, owner.gid) {
                let (u, g) = owner_ids(owner);
                rustix::fs::fchown(&fd, u, g).map_err(|e| self.io_err(path, "chown", e))?;
            }
        }
        rustix::fs::fchmod(&fd, Mode::from_raw_mode(attrs.mode.bits()))
            .map_err(|e| self.io_err(path, "chmod", e))
    }

    /// Acts as `dir`'s owner until dropped when a service user owns it (see [`AsOwner`]).
    fn as_owner(&self, path: &AbsPath, dir: impl AsFd) -> Result<AsOwner, HostError> {
        AsOwner::of(dir).map_err(|e| self.io_err(path, "take on the directory owner's identity", e))
    }

    /// A readable fd of the walked directory (an `O_PATH` fd cannot be fsynced).
    fn readable_dir(&self, path: &AbsPath, dir: &OwnedFd) -> Result<OwnedFd, HostError> {
        rustix::fs::openat(
            dir,
            ".",
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| self.io_err(path, "open parent directory", e))
    }
}

fn to_stat(st: &rustix::fs::Stat) -> Stat {
    let kind = match FileType::from_raw_mode(st.st_mode) {
        FileType::RegularFile => FileKind::File,
        FileType::Directory => FileKind::Directory,
        FileType::Symlink => FileKind::Symlink,
        _ => FileKind::Other,
    };
    Stat {
        kind,
        mode: st.st_mode & 0o7777,
        uid: st.st_uid,
        gid: st.st_gid,
        size: st.st_size as u64,
        dev: st.st_dev,
        ino: st.st_ino,
        nlink: st.st_nlink,
    }
}

fn owner_ids(owner: Owner) -> (Option<rustix::fs::Uid>, Option<rustix::fs::Gid>) {
    (
        Some(rustix::fs::Uid::from_raw(owner.uid)),
        Some(rustix::fs::Gid::from_raw(owner.gid)),
    )
}

/// A temp name nobody can guess: a user who can write the directory cannot pre-create it.
fn temp_name(name: &str) -> String {
    format!(".{name}.hiveseed-{:016x}", rand::rngs::OsRng.next_u64())
}

impl Host for RealHost {
    fn read_limited(&self, path: &AbsPath, cap: u64) -> Result<Option<Vec<u8>>, HostError> {
        let Some((file, _)) = self.open_regular(path, cap)? else {
            return Ok(None);
        };
        let mut buf = Vec::new();
        file.take(cap + 1)
            .read_to_end(&mut buf)
            .map_err(|source| HostError::Io {
                path: path.clone(),
                op: "read",
                source,
            })?;
        if buf.len() as u64 > cap {
            return Err(HostError::TooLarge {
                path: path.clone(),
                cap,
            });
        }
        Ok(Some(buf))
    }

    fn sha256(&self, path: &AbsPath) -> Result<Option<hiveseed_proto::Sha256>, HostError> {
        let Some((file, before)) = self.open_regular(path, u64::MAX)? else {
            return Ok(None);
        };
        let key = FileKey::of(&before);
        let cached = self
            .digests
            .lock()
            .ok()
            .and_then(|m| m.get(path.as_str()).copied());
        if let Some((k, digest)) = cached {
            if k == key {
                return Ok(Some(digest));
            }
        }
        // Streamed, and no further than the size at open: a file that grows while it is read is
        // not the file that was observed.
        let size = before.st_size as u64;
        let mut hasher = <sha2::Sha256 as sha2::Digest>::new();
        let mut reader = (&file).take(size + 1);
        let mut buf = vec![0u8; 64 * 1024];
        let mut read = 0u64;
        loop {
            let n = reader.read(&mut buf).map_err(|source| HostError::Io {
                path: path.clone(),
                op: "read",
                source,
            })?;
            if n == 0 {
                break;
            }
            read += n as u64;
            sha2::Digest::update(&mut hasher, &buf[..n]);
        }
        if read > size {
            return Err(HostError::Changed {
                path: path.clone(),
                detail: format!("it grew past its {size} bytes while it was hashed"),
            });
        }
        let digest = hiveseed_proto::Sha256(sha2::Digest::finalize(hasher).into());
        // Remember it only if nothing changed the file while it was read, and not while its
        // ctime is recent: timestamps are coarse (a clock tick), so a write in the same tick
        // would keep them (git's "racy clean" rule).
        let after = rustix::fs::fstat(&file).map_err(|e| self.io_err(path, "stat", e))?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        if FileKey::of(&after) == key && now - after.st_ctime >= 2 {
            if let Ok(mut m) = self.digests.lock() {
                m.insert(path.as_str().to_owned(), (key, digest));
            }
        }
        Ok(Some(digest))
    }

    fn stat(&self, path: &AbsPath) -> Result<Option<Stat>, HostError> {
        if path.as_str() == "/" {
            let st = rustix::fs::fstat(&self.root_fd).map_err(|e| self.io_err(path, "stat", e))?;
            return Ok(Some(to_stat(&st)));
        }
        let parent = match self.walk(path, false) {
            Ok(p) => p,
            Err(WalkError::Errno(Errno::NOENT | Errno::NOTDIR)) => return Ok(None),
            Err(e) => return Err(self.walk_err(path, "stat", e)),
        };
        match rustix::fs::statat(&parent.dir, parent.name.as_str(), AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => Ok(Some(to_stat(&st))),
            Err(Errno::NOENT) => Ok(None),
            Err(e) => Err(self.io_err(path, "stat", e)),
        }
    }

    fn write_atomic(&self, path: &AbsPath, content: &[u8], attrs: Attrs) -> Result<(), HostError> {
        let mut staged = self.stage_file(path, attrs)?;
        staged
            .file()
            .write_all(content)
            .map_err(|source| HostError::Io {
                path: path.clone(),
                op: "write temp file",
                source,
            })?;
        self.commit_staged(staged)
    }

    fn stage_file(&self, path: &AbsPath, attrs: Attrs) -> Result<StagedFile, HostError> {
        let Parent { dir, name } = self.parent(path, "open parent directory")?;
        let dir = self.readable_dir(path, &dir)?;
        let mode = Mode::from_raw_mode(attrs.mode.bits());
        let flags =
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let mut attempts = 0;
        let (tmp, fd) = {
            let _as_owner = self.as_owner(path, &dir)?;
            loop {
                let tmp = temp_name(&name);
                match rustix::fs::openat(&dir, tmp.as_str(), flags, mode) {
                    Ok(fd) => break (tmp, fd),
                    // 64 random bits: a clash is someone else's file, and another name will do.
                    Err(Errno::EXIST) if attempts < 8 => attempts += 1,
                    Err(e) => return Err(self.io_err(path, "create temp file", e)),
                }
            }
        };
        // From here on, dropping `staged` removes the temp file.
        let staged = StagedFile {
            path: path.clone(),
            dir,
            name,
            tmp,
            file: std::fs::File::from(fd),
            committed: false,
        };
        // The umask may have narrowed the mode; never widened it, so nothing was exposed.
        self.set_attrs(path, &staged.file, attrs)?;
        Ok(staged)
    }

    fn commit_staged(&self, mut staged: StagedFile) -> Result<(), HostError> {
        let path = staged.path.clone();
        staged.file.sync_all().map_err(|source| HostError::Io {
            path: path.clone(),
            op: "fsync temp file",
            source,
        })?;
        {
            let _as_owner = self.as_owner(&path, &staged.dir)?;
            rustix::fs::renameat(
                &staged.dir,
                staged.tmp.as_str(),
                &staged.dir,
                staged.name.as_str(),
            )
            .map_err(|e| self.io_err(&path, "rename into place", e))?;
        }
        staged.committed = true;
        rustix::fs::fsync(&staged.dir).map_err(|e| self.io_err(&path, "fsync directory", e))
    }

    fn mkdir(&self, path: &AbsPath, attrs: Attrs) -> Result<(), HostError> {
        let Parent { dir, name } = self.parent(path, "open parent directory")?;
        let dir = self.readable_dir(path, &dir)?;
        let mode = Mode::from_raw_mode(attrs.mode.bits());
        let made = {
            let _as_owner = self.as_owner(path, &dir)?;
            rustix::fs::mkdirat(&dir, name.as_str(), mode)
        };
        match made {
            // Made since it was observed missing: it gets the mode and owner asked for, by fd.
            Ok(()) | Err(Errno::EXIST) => {}
            Err(e) => return Err(self.io_err(path, "mkdir", e)),
        }
        let fd = match rustix::fs::openat(
            &dir,
            name.as_str(),
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        ) {
            Ok(fd) => fd,
            Err(Errno::LOOP | Errno::NOTDIR) => {
                let found = rustix::fs::statat(&dir, name.as_str(), AtFlags::SYMLINK_NOFOLLOW)
                    .map(|st| to_stat(&st).kind)
                    .unwrap_or(FileKind::Other);
                return Err(HostError::WrongKind {
                    path: path.clone(),
                    expected: "a directory",
                    found,
                });
            }
            Err(e) => return Err(self.io_err(path, "open new directory", e)),
        };
        self.set_attrs(path, &fd, attrs)?;
        rustix::fs::fsync(&dir).map_err(|e| self.io_err(path, "fsync directory", e))
    }

    fn chmod(&self, path: &AbsPath, mode: FileMode, observed: &Stat) -> Result<(), HostError> {
        let fd = self.open_observed(path, observed, "chmod")?;
        rustix::fs::fchmod(&fd, Mode::from_raw_mode(mode.bits()))
            .map_err(|e| self.io_err(path, "chmod", e))
    }

    fn chown(&self, path: &AbsPath, owner: Owner, observed: &Stat) -> Result<(), HostError> {
        let fd = self.open_observed(path, observed, "chown")?;
        let (u, g) = owner_ids(owner);
        rustix::fs::fchown(&fd, u, g).map_err(|e| self.io_err(path, "chown", e))
    }

    fn remove(&self, path: &AbsPath) -> Result<(), HostError> {
        let parent = match self.walk(path, false) {
            Ok(p) => p,
            Err(WalkError::Errno(Errno::NOENT | Errno::NOTDIR)) => return Ok(()),
            Err(e) => return Err(self.walk_err(path, "open parent directory", e)),
        };
        let removed = {
            let _as_owner = self.as_owner(path, &parent.dir)?;
            rustix::fs::unlinkat(&parent.dir, parent.name.as_str(), AtFlags::empty())
        };
        match removed {
            Ok(()) | Err(Errno::NOENT) => Ok(()),
            Err(e) => Err(self.io_err(path, "remove", e)),
        }
    }

    fn open_append(&self, path: &AbsPath, mode: FileMode) -> Result<std::fs::File, HostError> {
        let Parent { dir, name } = self.parent(path, "open parent directory")?;
        let _as_owner = self.as_owner(path, &dir)?;
        let fd = rustix::fs::openat(
            &dir,
            name.as_str(),
            OFlags::WRONLY
                | OFlags::APPEND
                | OFlags::CREATE
                | OFlags::NOFOLLOW
                | OFlags::NONBLOCK
                | OFlags::NOCTTY
                | OFlags::CLOEXEC,
            Mode::from_raw_mode(mode.bits()),
        )
        .map_err(|e| self.io_err(path, "open for appending", e))?;
        let kind = to_stat(&rustix::fs::fstat(&fd).map_err(|e| self.io_err(path, "stat", e))?).kind;
        if kind != FileKind::File {
            return Err(HostError::WrongKind {
                path: path.clone(),
                expected: "a regular file",
                found: kind,
            });
        }
        Ok(std::fs::File::from(fd))
    }

    fn dir_path(&self, path: &AbsPath) -> Result<PathBuf, HostError> {
        if path.as_str() != "/" {
            let parent = self
                .walk(path, true)
                .map_err(|e| self.walk_err(path, "open directory", e))?;
            rustix::fs::openat(
                &parent.dir,
                parent.name.as_str(),
                OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .map_err(|e| self.io_err(path, "open directory", e))?;
        }
        Ok(self.root.join(&path.as_str()[1..]))
    }

    fn exec(&self, exec: &Exec) -> Result<ExecOutput, HostError> {
        let user = match &exec.user {
            Some(name) => Some(crate::spawn::Credentials::lookup(self, name)?),
            None => None,
        };
        crate::spawn::run(exec, user.as_ref())
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;

    use super::*;

    fn p(s: &str) -> AbsPath {
        s.parse().expect("valid path")
    }

    #[test]
    fn every_step_is_opened_with_no_symlinks_no_magiclinks_no_xdev() {
        let dir = tempfile::tempdir().expect("tempdir");
        let safe = ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS | ResolveFlags::NO_XDEV;
        let system = RealHost::with_system_resolution(dir.path()).expect("root");
        assert_eq!(system.resolve_flags(), safe);
        let beneath = RealHost::new(dir.path()).expect("root");
        assert_eq!(beneath.resolve_flags(), safe | ResolveFlags::BENEATH);
        assert_eq!(RealHost::new("/").expect("root").resolve_flags(), safe);
    }

    /// Under the machine's own `/`: `/proc` is a mount point and `/proc/self` a symlink, both in
    /// root-owned, non-writable directories, so both are passed; `/dev/null` is no file to read.
    #[test]
    fn the_real_root_crosses_trusted_mounts_and_links() {
        let host = RealHost::new("/").expect("root");
        let status = host.read(&p("/proc/self/status")).expect("read");
        let status = String::from_utf8(status.expect("exists")).expect("text");
        assert!(
            status.contains(&format!("Pid:\t{}", std::process::id())),
            "{status}"
        );
        assert!(matches!(
            host.read(&p("/dev/null")),
            Err(HostError::WrongKind {
                found: FileKind::Other,
                ..
            })
        ));
    }

    #[test]
    fn a_symlink_loop_ends_in_an_error_and_dotdot_stays_in_the_root() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(dir.path().join("etc")).expect("mkdir");
        std::fs::write(dir.path().join("etc/x"), "x").expect("write");
        symlink("b", dir.path().join("a")).expect("symlink");
        symlink("a", dir.path().join("b")).expect("symlink");
        symlink("../../../../etc", dir.path().join("up")).expect("symlink");
        let system = RealHost::with_system_resolution(dir.path()).expect("root");
        let beneath = RealHost::new(dir.path()).expect("root");
        for host in [&system, &beneath] {
            let err = host.read(&p("/a/x")).expect_err("loop");
            assert!(
                matches!(&err, HostError::Io { source, .. } if source.raw_os_error() == Some(Errno::LOOP.raw_os_error())),
                "{err}"
            );
        }
        // `..` past the root: the root itself under `/` (as the kernel does), an escape otherwise.
        assert_eq!(system.read(&p("/up/x")).expect("read"), Some(b"x".to_vec()));
        assert!(matches!(
            beneath.read(&p("/up/x")),
            Err(HostError::Escape { .. })
        ));
    }
}
