//! Lab nodes: one Debian chroot per node, an overlay on the cached base rootfs.
//!
//! A node is `<labdir>/nodes/<name>/{upper,work,root}` with these mounts, in this order:
//!
//! | target        | what                                                            |
//! |---------------|-----------------------------------------------------------------|
//! | `root`        | overlayfs, `lowerdir=<base>`, per-node `upper`/`work`           |
//! | `root/proc`   | proc                                                            |
//! | `root/dev`    | tmpfs with `mknod` null, zero, full, random, urandom, tty       |
//! | `root/dev/shm`| tmpfs, mode 1777 (postgres' POSIX shared memory)                |
//! | `root/run`    | a fresh tmpfs, with `/run/lock`                                 |
//!
//! Why a tmpfs `/dev` with our own device nodes rather than bind mounts of the host's: it is one
//! mount instead of six, it does not depend on the base carrying device nodes (a base unpacked
//! without `CAP_MKNOD` has none), nothing a node writes under `/dev` lands in its upper dir, and
//! the node cannot reach any host device beyond these six. No `/sys` and no `/dev/pts`: apt,
//! dpkg, postgres and ai-memory need neither.
//!
//! Why a fresh `/run`: a base that ever ran postgres carries its lock file in `/run/postgresql`,
//! and since all chroots share the host's pid namespace the next node refuses to start
//! (lab-feasibility §4, gotcha 2).
//!
//! Processes run through `chroot(8)` (and `setsid(1)` for background ones), because
//! `unsafe_code` is forbidden here and a `pre_exec` chroot would need it. Everything a node's
//! processes fork keeps the node's root, which is how `down` finds them.

use std::collections::BTreeMap;
use std::fmt;
use std::fs::{self, OpenOptions};
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::str::FromStr;
use std::time::Duration;

use nix::mount::{mount, MsFlags};
use nix::sys::stat::{makedev, mknod, Mode, SFlag};

use crate::error::{LabError, Result};
use crate::mounts::{self, Unmounted};
use crate::procs::{self, Target};
use crate::state::{MountRecord, NodeRecord, ProcRecord, StateFile};

const CHROOT: &str = "/usr/sbin/chroot";
const SETSID: &str = "/usr/bin/setsid";
const NODE_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// How long a process gets between SIGTERM and SIGKILL during teardown.
pub const TERM_DEADLINE: Duration = Duration::from_secs(10);
/// How long an unmount may keep failing with EBUSY before it is detached lazily.
const BUSY_DEADLINE: Duration = Duration::from_secs(5);

/// The character devices every node gets: (name, major, minor).
const DEVICES: [(&str, u64, u64); 6] = [
    ("null", 1, 3),
    ("zero", 1, 5),
    ("full", 1, 7),
    ("random", 1, 8),
    ("urandom", 1, 9),
    ("tty", 5, 0),
];

/// A node name: 1 to 32 of `[a-z0-9-]`, not starting with `-`. It becomes a directory name and
/// part of mount sources, so nothing else is allowed.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeName(String);

impl NodeName {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for NodeName {
    type Err = LabError;
    fn from_str(s: &str) -> Result<Self> {
        let ok = !s.is_empty()
            && s.len() <= 32
            && !s.starts_with('-')
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if ok {
            Ok(Self(s.to_owned()))
        } else {
            Err(LabError::InvalidName(s.to_owned()))
        }
    }
}

impl fmt::Display for NodeName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What a teardown did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct DownReport {
    /// Pids that exited after SIGTERM.
    pub terminated: Vec<i32>,
    /// Pids that needed SIGKILL.
    pub killed: Vec<i32>,
    pub unmounted: Vec<PathBuf>,
    /// Mounts that stayed busy and were detached with `MNT_DETACH` (the last resort).
    pub lazily_unmounted: Vec<PathBuf>,
}

impl fmt::Display for DownReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} process(es) terminated, {} killed, {} mount(s) unmounted",
            self.terminated.len(),
            self.killed.len(),
            self.unmounted.len()
        )?;
        if !self.lazily_unmounted.is_empty() {
            write!(
                f,
                ", {} LAZILY (busy): {:?}",
                self.lazily_unmounted.len(),
                self.lazily_unmounted
            )?;
        }
        Ok(())
    }
}

/// One lab directory: its nodes and its state file.
#[derive(Debug, Clone)]
pub struct Lab {
    dir: PathBuf,
    state: StateFile,
}

impl Lab {
    /// Opens (creating if needed) a lab directory. Does not touch any node.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        fs::create_dir_all(dir).map_err(LabError::io("create lab dir", dir))?;
        let dir = fs::canonicalize(dir).map_err(LabError::io("resolve", dir))?;
        if dir.parent().is_none() {
            return Err(LabError::Io {
                what: "refusing to use / as lab dir",
                path: dir,
                source: std::io::ErrorKind::InvalidInput.into(),
            });
        }
        let state = StateFile::new(&dir);
        Ok(Self { dir, state })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn state_file(&self) -> &StateFile {
        &self.state
    }

    /// Everything the lab mounts lives here; teardown sweeps exactly this subtree.
    pub fn nodes_dir(&self) -> PathBuf {
        self.dir.join("nodes")
    }

    fn node_dir(&self, name: &NodeName) -> PathBuf {
        self.nodes_dir().join(name.as_str())
    }

    fn handle(&self, name: &NodeName, rec: &NodeRecord) -> Node {
        Node {
            name: name.clone(),
            dir: rec.dir.clone(),
            root: rec.root.clone(),
            upper: rec.upper.clone(),
            state: self.state.clone(),
        }
    }

    /// Brings up a fresh node on `base`. A leftover directory of a node with this name (from an
    /// earlier run, already down) is wiped first: a node always boots from the pristine base.
    pub fn node_up(&self, name: &NodeName, base: &Path) -> Result<Node> {
        self.node_up_with(name, base, true)
    }

    /// A reboot: the node's processes are stopped and its mounts replaced (fresh /run, /dev,
    /// /dev/shm) while its disk (the upper dir) stays, as on a droplet reboot.
    pub fn node_reboot(&self, name: &NodeName, base: &Path) -> Result<Node> {
        self.node_down(name)?;
        self.node_up_with(name, base, false)
    }

    fn node_up_with(&self, name: &NodeName, base: &Path, fresh: bool) -> Result<Node> {
        if !base.join("etc/os-release").exists() {
            return Err(LabError::BadBase(base.to_path_buf()));
        }
        let base = fs::canonicalize(base).map_err(LabError::io("resolve", base))?;
        let dir = self.node_dir(name);
        let root = dir.join("root");
        let upper = dir.join("upper");
        let work = dir.join("work");
        for p in [&base, &upper, &work] {
            let s = p.to_string_lossy();
            if s.contains([',', ':', '\\']) {
                return Err(LabError::OverlayPath(p.clone()));
            }
        }

        let rec = NodeRecord {
            base: base.clone(),
            dir: dir.clone(),
            root: root.clone(),
            upper: upper.clone(),
            mounts: [
                (root.clone(), "overlay"),
                (root.join("proc"), "proc"),
                (root.join("dev"), "tmpfs"),
                (root.join("dev/shm"), "tmpfs"),
                (root.join("run"), "tmpfs"),
            ]
            .into_iter()
            .map(|(target, fstype)| MountRecord {
                target,
                fstype: fstype.to_owned(),
            })
            .collect(),
        };

        // Claim the name; the record (intent) is on disk before the first mount.
        let claimed = self.state.update(|s| {
            if s.nodes.contains_key(name.as_str()) {
                false
            } else {
                s.nodes.insert(name.to_string(), rec.clone());
                true
            }
        })?;
        if !claimed {
            return Err(LabError::AlreadyUp(name.to_string()));
        }

        match self.mount_node(name, &rec, &base, &work, fresh) {
            Ok(()) => {
                tracing::info!(node = %name, root = %root.display(), "node up");
                Ok(self.handle(name, &rec))
            }
            Err(e) => {
                if let Err(down_err) = self.node_down(name) {
                    tracing::error!(node = %name, "cleanup after failed node up: {down_err}");
                }
                Err(e)
            }
        }
    }

    fn mount_node(
        &self,
        name: &NodeName,
        rec: &NodeRecord,
        base: &Path,
        work: &Path,
        fresh: bool,
    ) -> Result<()> {
        let dir = &rec.dir;
        if dir.exists() {
            let left =
                mounts::mounts_under(dir).map_err(LabError::io("read mountinfo for", dir))?;
            if !left.is_empty() {
                return Err(LabError::StillMounted {
                    dir: dir.clone(),
                    mounts: left,
                });
            }
            if fresh {
                fs::remove_dir_all(dir).map_err(LabError::io("remove old node dir", dir))?;
            }
        }
        for d in [&rec.upper, &work.to_path_buf(), &rec.root] {
            fs::create_dir_all(d).map_err(LabError::io("create", d))?;
        }

        let root = &rec.root;
        let overlay = format!(
            "lowerdir={},upperdir={},workdir={}",
            base.display(),
            rec.upper.display(),
            work.display()
        );
        let src = format!("lab-{name}");
        do_mount(&src, root, "overlay", MsFlags::empty(), Some(&overlay))?;

        let nosuid_nodev = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
        let proc_t = checked_dir(name, root, "proc")?;
        do_mount(
            "proc",
            &proc_t,
            "proc",
            nosuid_nodev | MsFlags::MS_NOEXEC,
            None,
        )?;

        let dev = checked_dir(name, root, "dev")?;
        do_mount(
            &format!("{src}-dev"),
            &dev,
            "tmpfs",
            MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
            Some("mode=0755,size=1m"),
        )?;
        populate_dev(&dev)?;
        do_mount(
            &format!("{src}-shm"),
            &dev.join("shm"),
            "tmpfs",
            nosuid_nodev,
            Some("mode=1777,size=256m"),
        )?;

        let run = checked_dir(name, root, "run")?;
        do_mount(
            &format!("{src}-run"),
            &run,
            "tmpfs",
            nosuid_nodev,
            Some("mode=0755,size=64m"),
        )?;
        // What systemd-tmpfiles would have made at boot; /var/lock points here.
        let lock = run.join("lock");
        fs::create_dir(&lock).map_err(LabError::io("create", &lock))?;
        set_mode(&lock, 0o1777)?;
        Ok(())
    }

    /// A handle on a node that is up.
    pub fn node(&self, name: &NodeName) -> Result<Node> {
        let state = self.state.read()?;
        let rec = state
            .nodes
            .get(name.as_str())
            .ok_or_else(|| LabError::NotUp(name.to_string()))?;
        Ok(self.handle(name, rec))
    }

    /// Every node that is up, by name.
    pub fn nodes(&self) -> Result<Vec<Node>> {
        let state = self.state.read()?;
        state
            .nodes
            .iter()
            .map(|(n, rec)| Ok(self.handle(&n.parse()?, rec)))
            .collect()
    }

    /// Stops one node's processes and unmounts it; its directory (upper dir) stays for
    /// inspection. Not being up counts as done.
    pub fn node_down(&self, name: &NodeName) -> Result<DownReport> {
        let state = self.state.read()?;
        let rec = state.nodes.get(name.as_str());
        let targets = recorded_targets(state.procs.iter().filter(|p| p.node == name.as_str()));
        let mounts = rec.map(planned_unmounts).unwrap_or_default();
        let report = teardown(&self.node_dir(name), targets, mounts)?;
        self.state.update(|s| {
            s.nodes.remove(name.as_str());
            s.procs.retain(|p| p.node != name.as_str());
        })?;
        tracing::info!(node = %name, "node down: {report}");
        Ok(report)
    }

    /// Stops every process rooted in any node, unmounts everything under `<labdir>/nodes` (the
    /// recorded mounts first, then whatever mountinfo still shows there) and removes the state
    /// file. Works from the state file alone or, if that was lost, from /proc and mountinfo.
    /// Running it again is a no-op.
    pub fn down(&self) -> Result<DownReport> {
        let state = self.state.read()?;
        let targets = recorded_targets(state.procs.iter());
        let mounts = state.nodes.values().flat_map(planned_unmounts).collect();
        let report = teardown(&self.nodes_dir(), targets, mounts)?;
        self.state.remove()?;
        tracing::info!(lab = %self.dir.display(), "lab down: {report}");
        Ok(report)
    }

    /// `down`, then delete every node directory (upper dirs included).
    pub fn purge(&self) -> Result<DownReport> {
        let report = self.down()?;
        let nodes = self.nodes_dir();
        // down() verified nothing is mounted below; deleting cannot reach the base or the host.
        match fs::remove_dir_all(&nodes) {
            Ok(()) => Ok(report),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(report),
            Err(e) => Err(LabError::Io {
                what: "remove",
                path: nodes,
                source: e,
            }),
        }
    }
}

fn recorded_targets<'a>(procs: impl Iterator<Item = &'a ProcRecord>) -> Vec<Target> {
    procs
        .map(|p| Target {
            pid: p.pid,
            start_time: Some(p.start_time),
            group: true,
        })
        .collect()
}

fn planned_unmounts(rec: &NodeRecord) -> Vec<PathBuf> {
    rec.mounts.iter().rev().map(|m| m.target.clone()).collect()
}

/// Stops processes (the recorded ones plus any rooted below `scope`), then unmounts `mounts` in
/// the given order and any mount still below `scope`, deepest first.
fn teardown(scope: &Path, recorded: Vec<Target>, mounts: Vec<PathBuf>) -> Result<DownReport> {
    let mut report = DownReport::default();
    let mut first = Some(recorded);
    // A dying daemon can still fork; a few rounds of scan-and-stop converge.
    for _ in 0..5 {
        let mut targets = first.take().unwrap_or_default();
        for pid in procs::rooted_under(scope) {
            if !targets.iter().any(|t| t.pid == pid) {
                targets.push(Target {
                    pid,
                    start_time: procs::start_time(pid),
                    group: false,
                });
            }
        }
        targets.retain(|t| procs::is_alive(t.pid, t.start_time));
        if targets.is_empty() {
            break;
        }
        let stopped = procs::stop(&targets, TERM_DEADLINE);
        if !stopped.survivors.is_empty() {
            return Err(LabError::Unkillable(stopped.survivors));
        }
        report.terminated.extend(stopped.terminated);
        report.killed.extend(stopped.killed);
    }

    let swept = mounts::mounts_under(scope).map_err(LabError::io("read mountinfo for", scope))?;
    for target in mounts.into_iter().chain(swept) {
        let outcome =
            mounts::unmount(&target, BUSY_DEADLINE).map_err(|source| LabError::Unmount {
                target: target.clone(),
                source,
            })?;
        match outcome {
            Unmounted::NotMounted => {}
            Unmounted::Clean => report.unmounted.push(target),
            Unmounted::Lazy => {
                report.unmounted.push(target.clone());
                report.lazily_unmounted.push(target);
            }
        }
    }
    let left = mounts::mounts_under(scope).map_err(LabError::io("read mountinfo for", scope))?;
    if !left.is_empty() {
        return Err(LabError::StillMounted {
            dir: scope.to_path_buf(),
            mounts: left,
        });
    }
    Ok(report)
}

fn do_mount(
    source: &str,
    target: &Path,
    fstype: &str,
    flags: MsFlags,
    data: Option<&str>,
) -> Result<()> {
    mount(Some(source), target, Some(fstype), flags, data).map_err(|source| LabError::Mount {
        fstype: fstype.to_owned(),
        target: target.to_path_buf(),
        source,
    })
}

fn set_mode(path: &Path, mode: u32) -> Result<()> {
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).map_err(LabError::io("chmod", path))
}

/// `root/<rel>` as a mount target: it must be a real directory, never a symlink (a symlink in the
/// node could otherwise point a mount at the host).
fn checked_dir(node: &NodeName, root: &Path, rel: &str) -> Result<PathBuf> {
    let p = root.join(rel);
    match fs::symlink_metadata(&p) {
        Ok(m) if m.is_dir() => Ok(p),
        _ => Err(LabError::UnsafePath {
            node: node.to_string(),
            path: PathBuf::from("/").join(rel),
        }),
    }
}

fn populate_dev(dev: &Path) -> Result<()> {
    for (name, major, minor) in DEVICES {
        let p = dev.join(name);
        mknod(
            &p,
            SFlag::S_IFCHR,
            Mode::from_bits_truncate(0o666),
            makedev(major, minor),
        )
        .map_err(|e| LabError::Io {
            what: "mknod",
            path: p.clone(),
            source: e.into(),
        })?;
        set_mode(&p, 0o666)?; // mknod is subject to the umask
    }
    for (name, to) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        let p = dev.join(name);
        symlink(to, &p).map_err(LabError::io("symlink", &p))?;
    }
    for (name, mode) in [("shm", 0o1777), ("pts", 0o755)] {
        let p = dev.join(name);
        fs::create_dir(&p).map_err(LabError::io("create", &p))?;
        set_mode(&p, mode)?;
    }
    Ok(())
}

/// A node that is up.
#[derive(Debug, Clone)]
pub struct Node {
    name: NodeName,
    dir: PathBuf,
    root: PathBuf,
    upper: PathBuf,
    state: StateFile,
}

impl Node {
    pub fn name(&self) -> &NodeName {
        &self.name
    }

    /// The mounted root (what processes in the node see as `/`).
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The overlay's upper dir: everything this node changed relative to the base.
    pub fn upper(&self) -> &Path {
        &self.upper
    }

    /// `<labdir>/nodes/<name>`: a good place for this node's logs (outside its root).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The host path of `path_in_node` (absolute, no `..`). Every existing component below the
    /// node root must be a real directory (not a symlink), so the result cannot lead out of the
    /// node. Missing parent directories are not created.
    pub fn host_path(&self, path_in_node: &str) -> Result<PathBuf> {
        let unsafe_path = || LabError::UnsafePath {
            node: self.name.to_string(),
            path: PathBuf::from(path_in_node),
        };
        let rel = Path::new(path_in_node)
            .strip_prefix("/")
            .map_err(|_| unsafe_path())?;
        let mut p = self.root.clone();
        let parts: Vec<Component<'_>> = rel.components().collect();
        for (i, c) in parts.iter().enumerate() {
            let Component::Normal(seg) = c else {
                return Err(unsafe_path());
            };
            p.push(seg);
            match fs::symlink_metadata(&p) {
                Ok(m) if m.file_type().is_symlink() => return Err(unsafe_path()),
                Ok(m) if i + 1 < parts.len() && !m.is_dir() => return Err(unsafe_path()),
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(LabError::Io {
                        what: "stat",
                        path: p,
                        source: e,
                    })
                }
            }
        }
        Ok(p)
    }

    /// Writes a file into the node atomically (temp file + rename), creating parent directories.
    /// For lab scaffolding only (e.g. a facts file standing in for the metadata service).
    pub fn write_file(&self, path_in_node: &str, contents: &[u8], mode: u32) -> Result<()> {
        let target = self.host_path(path_in_node)?;
        let parent = target.parent().unwrap_or(&self.root).to_path_buf();
        fs::create_dir_all(&parent).map_err(LabError::io("create", &parent))?;
        // Re-check: create_dir_all follows symlinks, so verify nothing raced in.
        self.host_path(path_in_node)?;
        let io = |what| LabError::io(what, &target);
        let mut tmp = tempfile::NamedTempFile::new_in(&parent).map_err(io("create temp for"))?;
        std::io::Write::write_all(&mut tmp, contents).map_err(io("write"))?;
        tmp.as_file()
            .set_permissions(fs::Permissions::from_mode(mode))
            .map_err(io("chmod"))?;
        tmp.as_file().sync_all().map_err(io("fsync"))?;
        tmp.persist(&target).map_err(|e| LabError::Io {
            what: "rename into",
            path: target.clone(),
            source: e.error,
        })?;
        Ok(())
    }

    /// A command to run inside the node (`chroot <root> argv...`) with a clean environment:
    /// `PATH`, `LANG=C.UTF-8`, `HOME=/root`, plus whatever `env` adds.
    pub fn command<I, S>(&self, argv: I) -> NodeCommand<'_>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let env = [("PATH", NODE_PATH), ("LANG", "C.UTF-8"), ("HOME", "/root")]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        NodeCommand {
            node: self,
            argv: argv.into_iter().map(|s| s.as_ref().to_owned()).collect(),
            env,
            userspec: None,
        }
    }
}

/// A command inside a node, built by [`Node::command`].
#[derive(Debug)]
pub struct NodeCommand<'a> {
    node: &'a Node,
    argv: Vec<String>,
    env: BTreeMap<String, String>,
    userspec: Option<String>,
}

/// A background process started in a node (and recorded in the state file).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Background {
    pub pid: i32,
    pub log: PathBuf,
}

impl NodeCommand<'_> {
    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.insert(key.into(), value.into());
        self
    }

    /// Run as `user[:group]`, names resolved inside the node (`chroot --userspec`).
    pub fn user(mut self, userspec: impl Into<String>) -> Self {
        self.userspec = Some(userspec.into());
        self
    }

    fn chroot_args(&self) -> Vec<String> {
        let mut args = Vec::new();
        if let Some(u) = &self.userspec {
            args.push(format!("--userspec={u}"));
        }
        args.push(self.node.root.to_string_lossy().into_owned());
        args.extend(self.argv.iter().cloned());
        args
    }

    fn base_command(&self, program: &str) -> Command {
        let mut cmd = Command::new(program);
        cmd.env_clear().envs(&self.env).stdin(Stdio::null());
        cmd
    }

    fn spawn_err(&self) -> impl FnOnce(std::io::Error) -> LabError + '_ {
        |source| LabError::Spawn {
            argv: self.argv.clone(),
            source,
        }
    }

    /// Runs to completion and captures stdout/stderr; the exit status is the caller's to judge.
    ///
    /// Output goes to anonymous temp files, not pipes: a command that leaves a daemon behind
    /// (`pg_ctl start`, `setsid -f ...`) hands it our pipe, and reading a pipe to EOF would then
    /// wait for the daemon to exit. We wait for the command itself only.
    pub fn output(&self) -> Result<Output> {
        let capture = || -> Result<(std::fs::File, std::fs::File)> {
            let f = tempfile::tempfile()
                .map_err(LabError::io("create temp file in", std::env::temp_dir()))?;
            let dup = f
                .try_clone()
                .map_err(LabError::io("dup temp file in", std::env::temp_dir()))?;
            Ok((f, dup))
        };
        let (mut out, out_w) = capture()?;
        let (mut err, err_w) = capture()?;
        let mut cmd = self.base_command(CHROOT);
        cmd.args(self.chroot_args()).stdout(out_w).stderr(err_w);
        let status = cmd.status().map_err(self.spawn_err())?;
        let read_back = |f: &mut std::fs::File| -> Result<Vec<u8>> {
            let mut buf = Vec::new();
            f.seek(SeekFrom::Start(0))
                .and_then(|_| f.read_to_end(&mut buf))
                .map_err(LabError::io(
                    "read captured output of",
                    self.node.root.clone(),
                ))?;
            Ok(buf)
        };
        Ok(Output {
            status,
            stdout: read_back(&mut out)?,
            stderr: read_back(&mut err)?,
        })
    }

    /// Runs to completion with this process's stdout and stderr (for interactive use; a daemon
    /// the command leaves behind keeps them open).
    pub fn status(&self) -> Result<std::process::ExitStatus> {
        let mut cmd = self.base_command(CHROOT);
        cmd.args(self.chroot_args());
        cmd.status().map_err(self.spawn_err())
    }

    /// Runs to completion; a non-zero exit is an error carrying argv, status and stderr.
    pub fn run(&self) -> Result<Output> {
        let out = self.output()?;
        if out.status.success() {
            return Ok(out);
        }
        let stderr = String::from_utf8_lossy(&out.stderr);
        let tail: String = stderr
            .chars()
            .rev()
            .take(2000)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        Err(LabError::CommandFailed {
            node: self.node.name.to_string(),
            argv: self.argv.clone(),
            status: out.status,
            stderr: tail,
        })
    }

    /// Starts the command in its own session (`setsid`), stdout and stderr appended to `log`,
    /// and records its pid in the state file. The process outlives this handle (and this
    /// process); `Lab::down` stops it.
    pub fn spawn_background(&self, log: &Path) -> Result<Background> {
        let out = OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .map_err(LabError::io("open log", log))?;
        let err = out.try_clone().map_err(LabError::io("dup log", log))?;
        let mut cmd = self.base_command(SETSID);
        // Spawned by us, setsid(1) is not a group leader, so it calls setsid() and execs
        // in place: the pid we get is the workload's.
        cmd.arg(CHROOT)
            .args(self.chroot_args())
            .stdout(out)
            .stderr(err);
        let mut child = cmd.spawn().map_err(self.spawn_err())?;
        let pid = child.id() as i32;
        // Reap it in this process if it exits while we live, so it never lingers as a zombie.
        std::thread::spawn(move || child.wait());
        if let Some(start_time) = procs::start_time(pid) {
            self.node.state.update(|s| {
                s.procs.push(ProcRecord {
                    node: self.node.name.to_string(),
                    pid,
                    start_time,
                    argv: self.argv.clone(),
                    log: Some(log.to_path_buf()),
                })
            })?;
        }
        tracing::info!(node = %self.node.name, pid, argv = ?self.argv, "background process started");
        Ok(Background {
            pid,
            log: log.to_path_buf(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_names() {
        for ok in ["a", "pg-r1", "r2n10", "0"] {
            assert!(ok.parse::<NodeName>().is_ok(), "{ok}");
        }
        for bad in ["", "-a", "A", "a/b", "..", "a b", "a.b", &"x".repeat(33)] {
            assert!(bad.parse::<NodeName>().is_err(), "{bad}");
        }
    }

    #[test]
    fn lab_refuses_root_dir() {
        assert!(Lab::open("/").is_err());
    }

    #[test]
    fn host_path_refuses_escapes() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        fs::create_dir_all(root.join("etc")).unwrap();
        symlink("/etc", root.join("link")).unwrap();
        fs::write(root.join("file"), b"").unwrap();
        let node = Node {
            name: "t".parse().unwrap(),
            dir: dir.path().to_path_buf(),
            root: root.clone(),
            upper: dir.path().join("upper"),
            state: StateFile::new(dir.path()),
        };
        assert_eq!(
            node.host_path("/etc/hosts").unwrap(),
            root.join("etc/hosts")
        );
        assert_eq!(
            node.host_path("/new/dir/f").unwrap(),
            root.join("new/dir/f")
        );
        for bad in [
            "etc/hosts",
            "/../etc/passwd",
            "/link/passwd",
            "/link",
            "/file/x",
        ] {
            assert!(node.host_path(bad).is_err(), "{bad}");
        }
        node.write_file("/etc/hosts", b"x", 0o600).unwrap();
        let meta = fs::metadata(root.join("etc/hosts")).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert!(node.write_file("/link/evil", b"x", 0o600).is_err());
        assert!(!Path::new("/etc/evil").exists());
    }
}
