//! The real host: file operations relative to a root directory fd, resolved with `openat2`
//! (`RESOLVE_BENEATH` when the root is not `/`, so a symlink can never lead a write out of the
//! root), and commands spawned by argv (prepared in [`crate::spawn`]).
//!
//! Commands run in the agent's own mount namespace: on a droplet and inside a lab chroot the
//! root is `/`, so the two agree. With a temp-dir root (tests) only files are rooted.

use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use hiveseed_proto::{AbsPath, FileMode};
use rustix::fs::{AtFlags, FileType, Mode, OFlags, ResolveFlags};
use rustix::io::Errno;

use super::{Attrs, Exec, ExecOutput, FileKind, Host, HostError, Owner, StagedFile, Stat};

static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

#[derive(Debug)]
pub struct RealHost {
    root: PathBuf,
    root_fd: OwnedFd,
    resolve: ResolveFlags,
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

/// Where a path lives under the root: the only product of joining a path to the root.
struct Located<'p> {
    /// Relative to the root fd; `.` for the root itself.
    rel: &'p str,
    /// Relative path of the parent directory and the final name; `None` for the root itself.
    split: Option<(&'p str, &'p str)>,
}

impl RealHost {
    /// Opens the root directory. No other I/O.
    pub fn new(root: impl Into<PathBuf>) -> Result<Self, HostError> {
        let root = root.into();
        let root_fd = rustix::fs::open(
            &root,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| HostError::Root {
            root: root.clone(),
            source: e.into(),
        })?;
        // Under `/` nothing can escape, and absolute symlinks (`/var/run -> /run`) must keep
        // working; under any other root every symlink must stay beneath it.
        let resolve = if root == Path::new("/") {
            ResolveFlags::NO_MAGICLINKS
        } else {
            ResolveFlags::BENEATH | ResolveFlags::NO_MAGICLINKS
        };
        Ok(Self {
            digests: Default::default(),
            root,
            root_fd,
            resolve,
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The one function that joins a manifest path to the root.
    fn locate<'p>(&self, path: &'p AbsPath) -> Located<'p> {
        let s = path.as_str();
        if s == "/" {
            return Located {
                rel: ".",
                split: None,
            };
        }
        let rel = &s[1..];
        let split = match rel.rfind('/') {
            Some(i) => (&rel[..i], &rel[i + 1..]),
            None => (".", rel),
        };
        Located {
            rel,
            split: Some(split),
        }
    }

    fn io_err(&self, path: &AbsPath, op: &'static str, e: Errno) -> HostError {
        if e == Errno::XDEV || (e == Errno::LOOP && self.resolve.contains(ResolveFlags::BENEATH)) {
            return HostError::Escape {
                path: path.clone(),
                root: self.root.clone(),
            };
        }
        HostError::Io {
            path: path.clone(),
            op,
            source: e.into(),
        }
    }

    fn open_beneath(&self, rel: &str, flags: OFlags) -> Result<OwnedFd, Errno> {
        rustix::fs::openat2(
            &self.root_fd,
            rel,
            flags | OFlags::CLOEXEC,
            Mode::empty(),
            self.resolve,
        )
    }

    /// The parent directory (opened for reading so it can be fsynced) and the final name.
    fn parent(&self, path: &AbsPath, op: &'static str) -> Result<(OwnedFd, String), HostError> {
        let loc = self.locate(path);
        let Some((parent, name)) = loc.split else {
            return Err(HostError::Io {
                path: path.clone(),
                op,
                source: std::io::Error::other("not allowed on the root itself"),
            });
        };
        let fd = self
            .open_beneath(parent, OFlags::RDONLY | OFlags::DIRECTORY)
            .map_err(|e| self.io_err(path, op, e))?;
        Ok((fd, name.to_owned()))
    }

    fn refuse_symlink(&self, dir: &OwnedFd, name: &str, path: &AbsPath) -> Result<(), HostError> {
        let st = rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW)
            .map_err(|e| self.io_err(path, "stat", e))?;
        if FileType::from_raw_mode(st.st_mode) == FileType::Symlink {
            return Err(HostError::WrongKind {
                path: path.clone(),
                expected: "a file or directory, not a symlink",
                found: FileKind::Symlink,
            });
        }
        Ok(())
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
    }
}

fn owner_ids(owner: Owner) -> (Option<rustix::fs::Uid>, Option<rustix::fs::Gid>) {
    (
        Some(rustix::fs::Uid::from_raw(owner.uid)),
        Some(rustix::fs::Gid::from_raw(owner.gid)),
    )
}

impl Host for RealHost {
    fn read(&self, path: &AbsPath) -> Result<Option<Vec<u8>>, HostError> {
        let loc = self.locate(path);
        let fd = match self.open_beneath(loc.rel, OFlags::RDONLY) {
            Ok(fd) => fd,
            Err(Errno::NOENT) | Err(Errno::NOTDIR) => return Ok(None),
            Err(e) => return Err(self.io_err(path, "open for reading", e)),
        };
        let mut buf = Vec::new();
        std::fs::File::from(fd)
            .read_to_end(&mut buf)
            .map_err(|source| HostError::Io {
                path: path.clone(),
                op: "read",
                source,
            })?;
        Ok(Some(buf))
    }

    fn sha256(&self, path: &AbsPath) -> Result<Option<hiveseed_proto::Sha256>, HostError> {
        let loc = self.locate(path);
        let fd = match self.open_beneath(loc.rel, OFlags::RDONLY) {
            Ok(fd) => fd,
            Err(Errno::NOENT) | Err(Errno::NOTDIR) => return Ok(None),
            Err(e) => return Err(self.io_err(path, "open for reading", e)),
        };
        let before = rustix::fs::fstat(&fd).map_err(|e| self.io_err(path, "stat", e))?;
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
        let mut buf = Vec::new();
        let mut file = std::fs::File::from(fd);
        file.read_to_end(&mut buf).map_err(|source| HostError::Io {
            path: path.clone(),
            op: "read",
            source,
        })?;
        let digest = hiveseed_proto::Sha256::digest(&buf);
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
        let loc = self.locate(path);
        let Some((parent, name)) = loc.split else {
            let st = rustix::fs::fstat(&self.root_fd).map_err(|e| self.io_err(path, "stat", e))?;
            return Ok(Some(to_stat(&st)));
        };
        let dir = match self.open_beneath(parent, OFlags::PATH | OFlags::DIRECTORY) {
            Ok(fd) => fd,
            Err(Errno::NOENT) | Err(Errno::NOTDIR) => return Ok(None),
            Err(e) => return Err(self.io_err(path, "stat", e)),
        };
        match rustix::fs::statat(&dir, name, AtFlags::SYMLINK_NOFOLLOW) {
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
        let (dir, name) = self.parent(path, "open parent directory")?;
        let tmp = format!(
            ".{name}.hiveseed-{}-{}",
            std::process::id(),
            TEMP_COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let mode = Mode::from_raw_mode(attrs.mode.bits());
        let fd = rustix::fs::openat(
            &dir,
            tmp.as_str(),
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            mode,
        )
        .map_err(|e| self.io_err(path, "create temp file", e))?;
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
        rustix::fs::fchmod(&staged.file, mode)
            .map_err(|e| self.io_err(path, "chmod temp file", e))?;
        if let Some(owner) = attrs.owner {
            let (u, g) = owner_ids(owner);
            rustix::fs::fchown(&staged.file, u, g)
                .map_err(|e| self.io_err(path, "chown temp file", e))?;
        }
        Ok(staged)
    }

    fn commit_staged(&self, mut staged: StagedFile) -> Result<(), HostError> {
        let path = staged.path.clone();
        staged.file.sync_all().map_err(|source| HostError::Io {
            path: path.clone(),
            op: "fsync temp file",
            source,
        })?;
        rustix::fs::renameat(
            &staged.dir,
            staged.tmp.as_str(),
            &staged.dir,
            staged.name.as_str(),
        )
        .map_err(|e| self.io_err(&path, "rename into place", e))?;
        staged.committed = true;
        rustix::fs::fsync(&staged.dir).map_err(|e| self.io_err(&path, "fsync directory", e))
    }

    fn mkdir(&self, path: &AbsPath, attrs: Attrs) -> Result<(), HostError> {
        let (dir, name) = self.parent(path, "open parent directory")?;
        let mode = Mode::from_raw_mode(attrs.mode.bits());
        match rustix::fs::mkdirat(&dir, name.as_str(), mode) {
            Ok(()) => {}
            Err(Errno::EXIST) => {
                let st = rustix::fs::statat(&dir, name.as_str(), AtFlags::SYMLINK_NOFOLLOW)
                    .map_err(|e| self.io_err(path, "stat", e))?;
                let st = to_stat(&st);
                if st.kind != FileKind::Directory {
                    return Err(HostError::WrongKind {
                        path: path.clone(),
                        expected: "a directory",
                        found: st.kind,
                    });
                }
                return Ok(());
            }
            Err(e) => return Err(self.io_err(path, "mkdir", e)),
        }
        let fd = rustix::fs::openat(
            &dir,
            name.as_str(),
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| self.io_err(path, "open new directory", e))?;
        rustix::fs::fchmod(&fd, mode).map_err(|e| self.io_err(path, "chmod", e))?;
        if let Some(owner) = attrs.owner {
            let (u, g) = owner_ids(owner);
            rustix::fs::fchown(&fd, u, g).map_err(|e| self.io_err(path, "chown", e))?;
        }
        rustix::fs::fsync(&dir).map_err(|e| self.io_err(path, "fsync directory", e))
    }

    fn chmod(&self, path: &AbsPath, mode: FileMode) -> Result<(), HostError> {
        let (dir, name) = self.parent(path, "open parent directory")?;
        self.refuse_symlink(&dir, &name, path)?;
        rustix::fs::chmodat(
            &dir,
            name.as_str(),
            Mode::from_raw_mode(mode.bits()),
            AtFlags::empty(),
        )
        .map_err(|e| self.io_err(path, "chmod", e))
    }

    fn chown(&self, path: &AbsPath, owner: Owner) -> Result<(), HostError> {
        let (dir, name) = self.parent(path, "open parent directory")?;
        self.refuse_symlink(&dir, &name, path)?;
        let (u, g) = owner_ids(owner);
        rustix::fs::chownat(&dir, name.as_str(), u, g, AtFlags::SYMLINK_NOFOLLOW)
            .map_err(|e| self.io_err(path, "chown", e))
    }

    fn remove(&self, path: &AbsPath) -> Result<(), HostError> {
        let (dir, name) = match self.parent(path, "open parent directory") {
            Ok(x) => x,
            Err(HostError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                return Ok(())
            }
            Err(e) => return Err(e),
        };
        match rustix::fs::unlinkat(&dir, name.as_str(), AtFlags::empty()) {
            Ok(()) | Err(Errno::NOENT) => Ok(()),
            Err(e) => Err(self.io_err(path, "remove", e)),
        }
    }

    fn open_append(&self, path: &AbsPath, mode: FileMode) -> Result<std::fs::File, HostError> {
        let (dir, name) = self.parent(path, "open parent directory")?;
        let fd = rustix::fs::openat(
            &dir,
            name.as_str(),
            OFlags::WRONLY | OFlags::APPEND | OFlags::CREATE | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(mode.bits()),
        )
        .map_err(|e| self.io_err(path, "open for appending", e))?;
        Ok(std::fs::File::from(fd))
    }

    fn dir_path(&self, path: &AbsPath) -> Result<PathBuf, HostError> {
        let loc = self.locate(path);
        self.open_beneath(loc.rel, OFlags::PATH | OFlags::DIRECTORY)
            .map_err(|e| self.io_err(path, "open directory", e))?;
        Ok(self.root.join(loc.rel))
    }

    fn exec(&self, exec: &Exec) -> Result<ExecOutput, HostError> {
        let user = match &exec.user {
            Some(name) => Some(crate::spawn::Credentials::lookup(self, name)?),
            None => None,
        };
        crate::spawn::run(exec, user.as_ref())
    }
}
