//! The agent's own service manager where systemd is not PID 1 (containers, the lab): it runs the
//! same unit files systemd would (see [`crate::unit`]) as children, restarts them per `Restart=`
//! with capped exponential backoff, stops them with `KillSignal=` then SIGKILL, and survives an
//! agent restart by adopting the children recorded in its pid files (watched through a pidfd).
//!
//! One tokio task per service owns its process; the `Supervisor` talks to it over a channel and
//! reads its state from a watch channel, so tests (and the agent) wait on state, never on time.
//! Dropping the `Supervisor` detaches: children keep running, to be adopted by the next agent.
//!
//! What a unit's processes cannot do to the agent (issue #15): each unit starts through
//! [`launch`] in its own session and, where cgroup v2 is usable, its own cgroup ([`cgroup`]),
//! with the unit user's supplementary groups. Its main process is signalled only through a
//! pidfd (opened while it was our unreaped child, or when adopting, checked against its record
//! after opening), and its process group only while that leader is our unreaped child or, when
//! adopted, still running, so the group's number has not been reused. The rest of the unit is
//! killed through `cgroup.kill` once the main process has exited or been stopped. Without
//! cgroups, a process that leaves the unit's process group (`setpgid`/`setsid`) survives a stop,
//! and so does the whole group of an adopted unit whose leader exited first. Adoption after an
//! agent restart checks the process's boot, start time, uid and executable against [`record`],
//! never its command line. Output goes through a pipe to a logger that rotates `<unit>.log` at
//! [`SupervisorSettings::log_max_bytes`].

mod cgroup;
pub mod launch;
mod record;

use std::collections::BTreeMap;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use sha2::{Digest, Sha256};

use hiveseed_proto::{AbsPath, FileMode};
use rustix::process::{Pid, Signal};
use tokio::io::unix::AsyncFd;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

use crate::host::{Attrs, Host, HostError};
use crate::resources::service::{unit_path, valid_unit_name, UNIT_DIR};
use crate::unit::{ExitMatch, KillSignal, RestartPolicy, Unit, UnitError};

const HISTORY: usize = 32;

#[derive(Debug, Clone)]
pub struct SupervisorSettings {
    pub unit_dir: AbsPath,
    /// `<unit>.pid` files, read on agent restart to adopt running children.
    pub pid_dir: AbsPath,
    /// `<unit>.log`: stdout and stderr of each service, appended.
    pub log_dir: AbsPath,
    /// Upper bound of the restart backoff.
    pub backoff_cap: Duration,
    /// A child that ran at least this long resets the backoff to `RestartSec=`.
    pub stable_after: Duration,
    /// The agent's own binary, run as `launch-unit` and `unit-log` (see [`launch`]).
    /// `/proc/self/exe` works even after the binary was replaced on disk.
    pub launcher: PathBuf,
    /// `<unit>.log` is renamed to `<unit>.log.1` (the one old file kept, replacing the previous
    /// one) before a write would take it past this size: at most twice this per unit on disk.
    pub log_max_bytes: u64,
    /// Put each unit in its own cgroup where cgroup v2 is usable.
    pub cgroups: bool,
}

impl Default for SupervisorSettings {
    fn default() -> Self {
        Self {
            unit_dir: UNIT_DIR.parse().expect("static path"),
            pid_dir: "/run/hiveseed".parse().expect("static path"),
            log_dir: "/var/log/hiveseed".parse().expect("static path"),
            backoff_cap: Duration::from_secs(60),
            stable_after: Duration::from_secs(30),
            launcher: PathBuf::from("/proc/self/exe"),
            log_max_bytes: 10 * 1024 * 1024,
            cgroups: true,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    #[error("unit {unit}: invalid unit name")]
    BadName { unit: String },
    #[error("unit {unit}: {path} is missing")]
    UnitMissing { unit: String, path: AbsPath },
    #[error("unit {unit}")]
    Unit {
        unit: String,
        #[source]
        source: UnitError,
    },
    #[error("unit {unit}: EnvironmentFile {path} is missing")]
    EnvironmentFile { unit: String, path: AbsPath },
    #[error("unit {unit}: {what} {name:?} is not in the root's {db}")]
    UnknownName {
        unit: String,
        what: &'static str,
        name: String,
        db: &'static str,
    },
    #[error("unit {unit}: ExecStart expands to nothing")]
    EmptyCommand { unit: String },
    /// Only the program is named: expanded arguments may carry secrets.
    #[error("unit {unit}: cannot start {program}")]
    Spawn {
        unit: String,
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("unit {unit}")]
    Host {
        unit: String,
        #[source]
        source: HostError,
    },
    #[error("unit {unit}: its supervising task is gone")]
    Gone { unit: String },
}

/// How a child ended. `Unknown` for adopted children, whose status went to their real parent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Code(i32),
    Signal(i32),
    Unknown,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Running,
    /// Waiting out the restart delay.
    BackingOff,
    /// Ended and `Restart=` says not to restart it.
    Exited,
    /// Stopped on request.
    Stopped,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceStatus {
    pub state: State,
    pub pid: Option<u32>,
    /// Processes this supervisor instance spawned for the unit.
    pub starts: u32,
    /// The current process was adopted from a previous agent.
    pub adopted: bool,
    /// Automatic restarts (`Restart=` after an exit) since the unit was last started or
    /// restarted on request, as systemd's `NRestarts` counts them. Kept across agent restarts in
    /// `<unit>.restarts` beside the pid file while the unit runs or waits to be restarted.
    pub restarts: u32,
    pub last_exit: Option<Exit>,
    /// Restart delays scheduled after crashes, oldest first (the last 32).
    pub restart_delays: Vec<Duration>,
    pub last_error: Option<String>,
}

impl ServiceStatus {
    pub fn active(&self) -> bool {
        matches!(self.state, State::Running | State::BackingOff)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartOutcome {
    Started { pid: u32 },
    Adopted { pid: u32 },
    AlreadyRunning,
}

enum Cmd {
    Stop(oneshot::Sender<()>),
    Restart(oneshot::Sender<Result<u32, SupervisorError>>),
}

struct Handle {
    tx: mpsc::UnboundedSender<Cmd>,
    status: watch::Receiver<ServiceStatus>,
}

pub struct Supervisor {
    host: Arc<dyn Host>,
    settings: SupervisorSettings,
    /// Where unit cgroups go, found at the first start.
    cgroups: Arc<OnceLock<Option<PathBuf>>>,
    services: Mutex<BTreeMap<String, Handle>>,
}

impl std::fmt::Debug for Supervisor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Supervisor")
            .field("host", &self.host)
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

/// A unit made ready to run: everything resolved, nothing spawned.
#[derive(Debug)]
struct Prepared {
    unit: Unit,
    /// May hold values expanded from the EnvironmentFile: never logged.
    argv: Vec<String>,
    env: BTreeMap<String, String>,
    uid: Option<u32>,
    gid: Option<u32>,
    /// Supplementary groups: every `/etc/group` entry listing the user, as `initgroups(3)`.
    groups: Vec<u32>,
    cwd: PathBuf,
    /// sha256 of all of the above that reaches the process (see [`record::Record::inputs`]).
    inputs: String,
}

struct Running {
    pid: u32,
    /// Opened while the process was our unreaped child (or, adopted, checked against its
    /// record after opening): it names this process and no other, whatever happens to the pid.
    pidfd: AsyncFd<OwnedFd>,
    /// `None` for an adopted process, whose exit status goes to its real parent.
    child: Option<tokio::process::Child>,
    cgroup: Option<PathBuf>,
    since: Instant,
    adopted: bool,
}

/// How long a stop waits for SIGKILLed processes of the unit's cgroup to be gone.
const DRAIN_DEADLINE: Duration = Duration::from_secs(10);

impl Running {
    /// Resolves once the main process has exited (cancel-safe). An own child is not reaped yet,
    /// so its pid, and the process group it leads, cannot be reused until [`Self::finish`].
    async fn exited(&self) {
        // A pidfd turns readable when its process exits, and stays so.
        let _ = self.pidfd.readable().await;
    }

    /// The leader's pid cannot name anything else: our child not reaped yet, or (adopted)
    /// still running.
    fn pinned(&self) -> bool {
        self.child.is_some() || record::alive(self.pidfd.get_ref())
    }

    /// `sig` to the main process by pidfd, and to its process group while the leader pins the
    /// group's number (as systemd's KillMode=control-group signals the whole unit).
    fn signal(&self, sig: Signal) {
        let _ = rustix::process::pidfd_send_signal(self.pidfd.get_ref(), sig);
        if self.pinned() {
            if let Some(pid) = Pid::from_raw(self.pid as i32) {
                let _ = rustix::process::kill_process_group(pid, sig);
            }
        }
    }

    /// After the main process exited: SIGKILL what is left of the unit (its cgroup, or its
    /// process group while the leader is unreaped), then reap the leader.
    async fn finish(&mut self, unit: &str) -> Exit {
        match &self.cgroup {
            Some(cg) => {
                if let Err(e) = cgroup::kill(cg) {
                    tracing::warn!(unit, cgroup = %cg.display(), error = %e, "cgroup.kill failed");
                }
                if !cgroup::drain_and_remove(cg, DRAIN_DEADLINE).await {
                    tracing::warn!(unit, cgroup = %cg.display(), "processes left after SIGKILL");
                }
            }
            None => {
                if self.pinned() {
                    if let Some(pid) = Pid::from_raw(self.pid as i32) {
                        let _ = rustix::process::kill_process_group(pid, Signal::KILL);
                    }
                }
            }
        }
        let Some(mut child) = self.child.take() else {
            return Exit::Unknown;
        };
        match child.wait().await {
            Ok(st) => {
                use std::os::unix::process::ExitStatusExt;
                match (st.code(), st.signal()) {
                    (Some(c), _) => Exit::Code(c),
                    (None, Some(s)) => Exit::Signal(s),
                    _ => Exit::Unknown,
                }
            }
            Err(_) => Exit::Unknown,
        }
    }
}

fn rustix_signal(s: KillSignal) -> Signal {
    match s {
        KillSignal::Hup => Signal::HUP,
        KillSignal::Int => Signal::INT,
        KillSignal::Quit => Signal::QUIT,
        KillSignal::Kill => Signal::KILL,
        KillSignal::Usr1 => Signal::USR1,
        KillSignal::Usr2 => Signal::USR2,
        KillSignal::Term => Signal::TERM,
    }
}

/// `KillSignal=`, then SIGKILL after `TimeoutStopSec=`; then SIGKILL to what is left of the unit.
async fn stop_process(r: &mut Running, name: &str, unit: &Unit) -> Exit {
    r.signal(rustix_signal(unit.kill_signal));
    if let Some(t) = unit.timeout_stop {
        if tokio::time::timeout(t, r.exited()).await.is_err() {
            r.signal(Signal::KILL);
            if let Some(cg) = &r.cgroup {
                let _ = cgroup::kill(cg);
            }
        }
    }
    r.exited().await;
    r.finish(name).await
}

/// systemd's `Restart=` rules; SIGHUP/SIGINT/SIGTERM/SIGPIPE count as clean exits.
pub fn should_restart(unit: &Unit, exit: Exit) -> bool {
    let prevented = unit.restart_prevent_exit_status.iter().any(|m| {
        matches!((m, exit), (ExitMatch::Code(a), Exit::Code(b)) if *a == b)
            || matches!((m, exit), (ExitMatch::Signal(a), Exit::Signal(b)) if *a == b)
    });
    if prevented {
        return false;
    }
    match unit.restart {
        RestartPolicy::No => false,
        RestartPolicy::Always => true,
        RestartPolicy::OnFailure => match exit {
            Exit::Code(c) => c != 0,
            Exit::Signal(s) => ![1, 2, 13, 15].contains(&s),
            Exit::Unknown => true,
        },
    }
}

/// `RestartSec=` doubled per consecutive failure, capped.
pub fn backoff(restart_sec: Duration, consecutive: u32, cap: Duration) -> Duration {
    let base = restart_sec.max(Duration::from_millis(10));
    let factor = 1u32 << consecutive.saturating_sub(1).min(16);
    base.saturating_mul(factor).min(cap.max(base))
}

fn pid_path(settings: &SupervisorSettings, unit: &str) -> AbsPath {
    format!("{}/{unit}.pid", settings.pid_dir)
        .parse()
        .expect("valid unit name makes a valid path")
}

fn restarts_path(settings: &SupervisorSettings, unit: &str) -> AbsPath {
    format!("{}/{unit}.restarts", settings.pid_dir)
        .parse()
        .expect("valid unit name makes a valid path")
}

/// The count a previous agent left for a unit it was running or about to restart.
fn persisted_restarts(host: &dyn Host, settings: &SupervisorSettings, unit: &str) -> u32 {
    match host.read(&restarts_path(settings, unit)) {
        Ok(Some(b)) => String::from_utf8_lossy(&b).trim().parse().unwrap_or(0),
        _ => 0,
    }
}

/// Records the count for the next agent; 0 is no file. A failure costs only that record.
fn persist_restarts(host: &dyn Host, settings: &SupervisorSettings, unit: &str, n: u32) {
    let path = restarts_path(settings, unit);
    let r = if n == 0 {
        host.remove(&path)
    } else {
        ensure_dir(host, &settings.pid_dir).and_then(|()| {
            host.write_atomic(
                &path,
                format!("{n}\n").as_bytes(),
                Attrs {
                    mode: FileMode::new(0o644).expect("valid"),
                    owner: None,
                },
            )
        })
    };
    if let Err(e) = r {
        tracing::warn!(unit, error = %e, "restart count not recorded");
    }
}

fn ensure_dir(host: &dyn Host, path: &AbsPath) -> Result<(), HostError> {
    crate::resources::ensure_parents(host, path)?;
    host.mkdir(
        path,
        Attrs {
            mode: FileMode::new(0o755).expect("valid mode"),
            owner: None,
        },
    )
}

fn prepare(
    host: &dyn Host,
    settings: &SupervisorSettings,
    name: &str,
) -> Result<Prepared, SupervisorError> {
    let host_err = |source| SupervisorError::Host {
        unit: name.to_owned(),
        source,
    };
    let path: AbsPath = format!("{}/{name}", settings.unit_dir)
        .parse()
        .map_err(|_| SupervisorError::BadName { unit: name.into() })?;
    let text = host
        .read(&path)
        .map_err(host_err)?
        .ok_or_else(|| SupervisorError::UnitMissing {
            unit: name.into(),
            path: path.clone(),
        })?;
    let unit = crate::unit::parse(&String::from_utf8_lossy(&text)).map_err(|source| {
        SupervisorError::Unit {
            unit: name.into(),
            source,
        }
    })?;
    let mut files = Vec::new();
    for ef in &unit.environment_files {
        match host.read(&ef.path).map_err(host_err)? {
            Some(b) => files.push(Some(String::from_utf8_lossy(&b).into_owned())),
            None if ef.optional => files.push(None),
            None => {
                return Err(SupervisorError::EnvironmentFile {
                    unit: name.into(),
                    path: ef.path.clone(),
                })
            }
        }
    }
    let unit_env = unit.environment_with(&files);
    let argv = unit.exec_argv(&unit_env);
    if argv.is_empty() {
        return Err(SupervisorError::EmptyCommand { unit: name.into() });
    }
    let mut env: BTreeMap<String, String> = BTreeMap::new();
    env.insert("PATH".into(), crate::spawn::PATH.into());
    let (mut uid, mut gid) = (None, None);
    if let Some(user) = &unit.user {
        let e = host.lookup_user(user).map_err(host_err)?.ok_or_else(|| {
            SupervisorError::UnknownName {
                unit: name.into(),
                what: "user",
                name: user.clone(),
                db: "/etc/passwd",
            }
        })?;
        uid = Some(e.uid);
        gid = Some(e.gid);
        env.insert("HOME".into(), e.home.clone());
        env.insert("USER".into(), e.name.clone());
        env.insert("LOGNAME".into(), e.name.clone());
        env.insert("SHELL".into(), e.shell.clone());
    }
    if let Some(group) = &unit.group {
        gid = Some(host.lookup_group(group).map_err(host_err)?.ok_or_else(|| {
            SupervisorError::UnknownName {
                unit: name.into(),
                what: "group",
                name: group.clone(),
                db: "/etc/group",
            }
        })?);
    }
    env.extend(unit_env);
    let root: AbsPath = "/".parse().expect("static path");
    let cwd = host
        .dir_path(unit.working_directory.as_ref().unwrap_or(&root))
        .map_err(host_err)?;
    let groups = match (&unit.user, uid) {
        (Some(user), Some(_)) => {
            // Looked up again for the primary gid: `Group=` replaces gid, not the user's own.
            let primary = host
                .lookup_user(user)
                .map_err(host_err)?
                .map_or(0, |e| e.gid);
            supplementary_groups(host, user, primary).map_err(host_err)?
        }
        _ => gid.into_iter().collect(),
    };
    let inputs = {
        let mut h = Sha256::new();
        let fields = serde_json::json!([
            argv,
            env,
            uid,
            gid,
            groups,
            cwd,
            unit.limit_nofile.map(|l| (l.soft, l.hard)),
            unit.nice
        ]);
        h.update(fields.to_string().as_bytes());
        hex::encode(h.finalize())
    };
    Ok(Prepared {
        unit,
        argv,
        env,
        uid,
        gid,
        groups,
        cwd,
        inputs,
    })
}

/// The user's primary group and every root's `/etc/group` entry listing the user, as
/// `initgroups(3)` gives them.
fn supplementary_groups(host: &dyn Host, user: &str, primary: u32) -> Result<Vec<u32>, HostError> {
    let path: AbsPath = "/etc/group".parse().expect("static path");
    let db = host.read(&path)?.unwrap_or_default();
    let mut gids = crate::spawn::member_groups(&String::from_utf8_lossy(&db), user);
    gids.push(primary);
    gids.sort_unstable();
    gids.dedup();
    Ok(gids)
}

/// The cgroup base for this supervisor's root, found once; `None` (logged once) where cgroups
/// are not usable.
fn cgroup_base(
    cell: &OnceLock<Option<PathBuf>>,
    host: &dyn Host,
    settings: &SupervisorSettings,
) -> Option<PathBuf> {
    cell.get_or_init(|| {
        if !settings.cgroups {
            return None;
        }
        let root = host
            .dir_path(&"/".parse().expect("static path"))
            .map_err(|e| e.to_string());
        match root.and_then(|r| cgroup::base_for_root(&r)) {
            Ok(base) => Some(base),
            Err(why) => {
                tracing::warn!(%why, "units run without cgroups: a stop kills the unit's process group only");
                None
            }
        }
    })
    .clone()
}

async fn spawn(
    host: &dyn Host,
    settings: &SupervisorSettings,
    cgroups: &OnceLock<Option<PathBuf>>,
    name: &str,
    p: &Prepared,
) -> Result<Running, SupervisorError> {
    let host_err = |source| SupervisorError::Host {
        unit: name.to_owned(),
        source,
    };
    let spawn_err = |source| SupervisorError::Spawn {
        unit: name.into(),
        program: p.argv[0].clone(),
        source,
    };
    let (exe, exe_dev, exe_ino) = record::program_identity(&p.argv[0]).map_err(spawn_err)?;
    // stat, not canonicalize: `/proc/self/exe` of a binary replaced on disk reads
    // "… (deleted)" but still leads to the inode we run from.
    let launcher_id = std::fs::metadata(&settings.launcher)
        .map(|m| {
            use std::os::unix::fs::MetadataExt;
            (m.dev(), m.ino())
        })
        .map_err(spawn_err)?;
    let cgroup = match cgroup_base(cgroups, host, settings) {
        Some(base) => {
            let dir = cgroup::create(&base, name).map_err(spawn_err)?;
            // Processes left from an instance not adopted: ours by construction (only root
            // can move a process into this directory), and in the way of a clean start.
            if cgroup::populated(&dir) {
                tracing::info!(
                    unit = name,
                    "killing leftover processes of the unit's cgroup"
                );
                cgroup::kill(&dir).map_err(spawn_err)?;
                cgroup::drain_and_remove(&dir, DRAIN_DEADLINE).await;
                cgroup::create(&base, name).map_err(spawn_err)?;
            }
            Some(dir)
        }
        None => None,
    };
    ensure_dir(host, &settings.log_dir).map_err(host_err)?;
    let log_dir = host.dir_path(&settings.log_dir).map_err(host_err)?;
    let (log_r, log_w) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)
        .map_err(|e| spawn_err(e.into()))?;
    let launcher = settings.launcher.display().to_string();
    let helper = |args: Vec<String>, env: &[(String, String)]| {
        let argv: Vec<String> = std::iter::once(launcher.clone()).chain(args).collect();
        crate::spawn::command(&argv, None, env)
            .map(tokio::process::Command::from)
            .map_err(host_err)
    };
    // Dropped at once: the runtime reaps it when it exits (at EOF, after the unit's last
    // process closed the pipe).
    helper(
        vec![
            "unit-log".into(),
            format!("--dir={}", log_dir.display()),
            format!("--name={name}.log"),
            format!("--max-bytes={}", settings.log_max_bytes),
        ],
        &[],
    )?
    .current_dir("/")
    .stdin(Stdio::from(log_r))
    .stdout(Stdio::null())
    .stderr(Stdio::null())
    .kill_on_drop(false)
    .spawn()
    .map_err(spawn_err)?;
    let creds = (p.uid.is_some() || p.gid.is_some()).then(|| launch::Creds {
        uid: p.uid.unwrap_or(0),
        gid: p.gid.unwrap_or(0),
        groups: p.groups.clone(),
    });
    let spec = launch::LaunchSpec {
        cgroup: cgroup.clone(),
        creds,
        nofile: p.unit.limit_nofile,
        nice: p.unit.nice,
        argv: p.argv.clone(),
    };
    let log_w2 = log_w.try_clone().map_err(spawn_err)?;
    let env: Vec<(String, String)> = p.env.clone().into_iter().collect();
    let child = helper(
        std::iter::once("launch-unit".to_owned())
            .chain(spec.to_args())
            .collect(),
        &env,
    )?
    .current_dir(&p.cwd)
    .stdin(Stdio::null())
    .stdout(Stdio::from(log_w))
    .stderr(Stdio::from(log_w2))
    .kill_on_drop(false)
    .spawn()
    .map_err(spawn_err)?;
    let pid = child.id().unwrap_or(0);
    // Our unreaped child: the pid names it until we wait for it, so this pidfd is its.
    let rpid =
        Pid::from_raw(pid as i32).ok_or_else(|| spawn_err(std::io::Error::other("no pid")))?;
    let pidfd = rustix::process::pidfd_open(rpid, rustix::process::PidfdFlags::empty())
        .map_err(|e| spawn_err(e.into()))?;
    let rec = record::Record {
        pid,
        boot_id: record::boot_id().map_err(spawn_err)?,
        start_time: record::start_time(pid).map_err(spawn_err)?,
        uid: p.uid.unwrap_or(0),
        exe,
        exe_dev,
        exe_ino,
        launcher_dev: launcher_id.0,
        launcher_ino: launcher_id.1,
        inputs: p.inputs.clone(),
        cgroup: cgroup.clone(),
    };
    #[allow(deprecated)] // see find_adoptable
    let pidfd = AsyncFd::with_interest(pidfd, tokio::io::Interest::READABLE).map_err(spawn_err)?;
    let running = Running {
        pid,
        pidfd,
        child: Some(child),
        cgroup,
        since: Instant::now(),
        adopted: false,
    };
    let written = ensure_dir(host, &settings.pid_dir).and_then(|()| {
        host.write_atomic(
            &pid_path(settings, name),
            serde_json::to_string(&rec)
                .expect("serializable")
                .as_bytes(),
            Attrs {
                mode: FileMode::new(0o600).expect("valid"),
                owner: None,
            },
        )
    });
    if let Err(e) = written {
        // Not adoptable later, and not to be left running untracked either.
        let mut running = running;
        running.signal(Signal::KILL);
        running.exited().await;
        running.finish(name).await;
        return Err(host_err(e));
    }
    tracing::info!(unit = name, pid, "service started");
    Ok(running)
}

enum Adoptable {
    /// Same inputs: the very process we would start.
    Matched(Running),
    /// Our process, other inputs (they changed while no agent ran): replace it.
    Stale(Running),
}

/// The process named by the unit's pid file, if it is provably the one a previous agent
/// started (start time, uid and executable as recorded); a pid file naming anything else is
/// logged and removed, and that process is left alone.
async fn find_adoptable(
    host: &dyn Host,
    settings: &SupervisorSettings,
    name: &str,
    p: &Prepared,
) -> Option<Adoptable> {
    let path = pid_path(settings, name);
    let text = host.read(&path).ok()??;
    let refuse = |why: String| {
        tracing::warn!(unit = name, %why, "not adopting");
        let _ = host.remove(&path);
        None
    };
    let rec: record::Record = match serde_json::from_slice(&text) {
        Ok(r) => r,
        Err(e) => return refuse(format!("{path}: not a pid record ({e})")),
    };
    let fd = match record::verify(&rec).await {
        Ok(fd) => fd,
        Err(why) => return refuse(why),
    };
    // The safe constructor is deprecated because a borrowed fd could be closed while
    // registered; this one is an OwnedFd moved into the AsyncFd, closed only when it drops.
    #[allow(deprecated)]
    let fd = AsyncFd::with_interest(fd, tokio::io::Interest::READABLE).ok()?;
    let running = Running {
        pid: rec.pid,
        pidfd: fd,
        child: None,
        cgroup: rec.cgroup.clone(),
        since: Instant::now(),
        adopted: true,
    };
    if rec.inputs == p.inputs {
        Some(Adoptable::Matched(running))
    } else {
        Some(Adoptable::Stale(running))
    }
}

struct Monitor {
    host: Arc<dyn Host>,
    settings: SupervisorSettings,
    cgroups: Arc<OnceLock<Option<PathBuf>>>,
    name: String,
    prepared: Prepared,
    status: watch::Sender<ServiceStatus>,
}

impl Monitor {
    fn update(&self, f: impl FnOnce(&mut ServiceStatus)) {
        self.status.send_modify(f);
    }

    fn running(&self, r: &Running) {
        let (pid, adopted) = (r.pid, r.adopted);
        self.update(|s| {
            s.state = State::Running;
            s.pid = Some(pid);
            s.adopted = adopted;
            s.last_error = None;
            if !adopted {
                s.starts += 1;
            }
        });
    }

    /// Sets the automatic restart count, and records it for a next agent.
    fn set_restarts(&self, n: u32) {
        self.update(|s| s.restarts = n);
        persist_restarts(self.host.as_ref(), &self.settings, &self.name, n);
    }

    /// The main process is reaped and the rest of the unit killed: forget the pid record.
    fn gone(&self) {
        let _ = self.host.remove(&pid_path(&self.settings, &self.name));
    }

    /// Re-reads the unit from disk and starts it (a restart picks up changed inputs).
    async fn respawn(&mut self) -> Result<Running, SupervisorError> {
        self.prepared = prepare(self.host.as_ref(), &self.settings, &self.name)?;
        spawn(
            self.host.as_ref(),
            &self.settings,
            &self.cgroups,
            &self.name,
            &self.prepared,
        )
        .await
    }

    async fn run(mut self, mut running: Option<Running>, mut rx: mpsc::UnboundedReceiver<Cmd>) {
        let mut consecutive: u32 = 0;
        let mut next_start: Option<Instant> = None;
        loop {
            let cmd = if let Some(r) = running.as_mut() {
                tokio::select! {
                    () = r.exited() => {
                        let exit = r.finish(&self.name).await;
                        let (pid, ran) = (r.pid, r.since.elapsed());
                        running = None;
                        self.gone();
                        tracing::info!(unit = %self.name, pid, ?exit, "service exited");
                        if should_restart(&self.prepared.unit, exit) {
                            if ran >= self.settings.stable_after {
                                consecutive = 0;
                            }
                            consecutive += 1;
                            let delay = backoff(self.prepared.unit.restart_sec, consecutive, self.settings.backoff_cap);
                            next_start = Some(Instant::now() + delay);
                            self.update(|s| {
                                s.state = State::BackingOff;
                                s.pid = None;
                                s.last_exit = Some(exit);
                                s.restart_delays.push(delay);
                                if s.restart_delays.len() > HISTORY {
                                    s.restart_delays.remove(0);
                                }
                            });
                        } else {
                            self.update(|s| {
                                s.state = State::Exited;
                                s.pid = None;
                                s.last_exit = Some(exit);
                            });
                            // The count stays readable here until the next start resets it.
                            persist_restarts(self.host.as_ref(), &self.settings, &self.name, 0);
                        }
                        continue;
                    }
                    cmd = rx.recv() => cmd,
                }
            } else {
                let sleep = async {
                    match next_start {
                        Some(t) => tokio::time::sleep_until(t).await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    () = sleep => {
                        next_start = None;
                        // Counted when the restart is attempted, as systemd counts NRestarts.
                        let n = self.status.borrow().restarts.saturating_add(1);
                        self.set_restarts(n);
                        match spawn(self.host.as_ref(), &self.settings, &self.cgroups, &self.name, &self.prepared).await {
                            Ok(r) => {
                                self.running(&r);
                                running = Some(r);
                            }
                            Err(e) => {
                                consecutive += 1;
                                let delay = backoff(self.prepared.unit.restart_sec, consecutive, self.settings.backoff_cap);
                                next_start = Some(Instant::now() + delay);
                                let msg = crate::resources::wait::error_chain(&e);
                                self.update(|s| {
                                    s.state = State::BackingOff;
                                    s.restart_delays.push(delay);
                                    s.last_error = Some(msg);
                                });
                            }
                        }
                        continue;
                    }
                    cmd = rx.recv() => cmd,
                }
            };
            match cmd {
                // The Supervisor was dropped (agent restart): leave the child running.
                None => return,
                Some(Cmd::Stop(reply)) => {
                    if let Some(mut r) = running.take() {
                        let exit = stop_process(&mut r, &self.name, &self.prepared.unit).await;
                        self.gone();
                        self.update(|s| s.last_exit = Some(exit));
                    }
                    persist_restarts(self.host.as_ref(), &self.settings, &self.name, 0);
                    self.update(|s| {
                        s.state = State::Stopped;
                        s.pid = None;
                    });
                    let _ = reply.send(());
                    return;
                }
                Some(Cmd::Restart(reply)) => {
                    if let Some(mut r) = running.take() {
                        let exit = stop_process(&mut r, &self.name, &self.prepared.unit).await;
                        self.gone();
                        self.update(|s| s.last_exit = Some(exit));
                    }
                    next_start = None;
                    consecutive = 0;
                    // A restart on request starts the count afresh, as systemd's does.
                    self.set_restarts(0);
                    match self.respawn().await {
                        Ok(r) => {
                            self.running(&r);
                            let _ = reply.send(Ok(r.pid));
                            running = Some(r);
                        }
                        Err(e) => {
                            let msg = crate::resources::wait::error_chain(&e);
                            self.update(|s| {
                                s.state = State::Exited;
                                s.pid = None;
                                s.last_error = Some(msg);
                            });
                            let _ = reply.send(Err(e));
                        }
                    }
                }
            }
        }
    }
}

impl Supervisor {
    /// No I/O: units are read when started.
    pub fn new(host: Arc<dyn Host>, settings: SupervisorSettings) -> Self {
        Self {
            host,
            settings,
            cgroups: Arc::new(OnceLock::new()),
            services: Mutex::new(BTreeMap::new()),
        }
    }

    fn services(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Handle>> {
        self.services.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Running or waiting to be restarted.
    pub fn is_active(&self, unit: &str) -> bool {
        self.services()
            .get(unit)
            .is_some_and(|h| h.status.borrow().active())
    }

    pub fn status(&self, unit: &str) -> Option<ServiceStatus> {
        self.services().get(unit).map(|h| h.status.borrow().clone())
    }

    /// A watch on the unit's state, for waiting on a condition instead of sleeping.
    pub fn watch(&self, unit: &str) -> Option<watch::Receiver<ServiceStatus>> {
        self.services().get(unit).map(|h| h.status.clone())
    }

    /// Called once at agent start, before the first plan: adopts each listed unit's child that
    /// is still running (so the plan sees it active and starts nothing). Units without a pid
    /// file are left for the plan to start.
    pub async fn recover<'u>(
        &self,
        units: impl IntoIterator<Item = &'u str>,
    ) -> Vec<(String, Result<StartOutcome, SupervisorError>)> {
        let mut out = Vec::new();
        for unit in units {
            if !valid_unit_name(unit) {
                continue;
            }
            let has_pid = matches!(self.host.stat(&pid_path(&self.settings, unit)), Ok(Some(_)));
            if has_pid && unit_path(unit).is_some() {
                out.push((unit.to_owned(), self.start(unit).await));
            }
        }
        out
    }

    /// Starts the unit from its unit file unless it runs already; adopts a still-running child
    /// of a previous agent instead of starting a second one.
    pub async fn start(&self, unit: &str) -> Result<StartOutcome, SupervisorError> {
        if !valid_unit_name(unit) {
            return Err(SupervisorError::BadName { unit: unit.into() });
        }
        let existing = self
            .services()
            .get(unit)
            .map(|h| (h.tx.clone(), h.status.borrow().state));
        match existing {
            Some((_, State::Running | State::BackingOff)) => {
                return Ok(StartOutcome::AlreadyRunning)
            }
            Some((tx, State::Exited)) if !tx.is_closed() => {
                return self
                    .send_restart(unit, &tx)
                    .await
                    .map(|pid| StartOutcome::Started { pid })
            }
            _ => {}
        }
        let host = self.host.as_ref();
        let prepared = prepare(host, &self.settings, unit)?;
        // A previous agent's count continues while its crash loop does (its child adopted, or
        // started again where the previous agent was waiting to restart it).
        let mut restarts = persisted_restarts(host, &self.settings, unit);
        let (running, outcome) = match find_adoptable(host, &self.settings, unit, &prepared).await {
            Some(Adoptable::Matched(r)) => {
                tracing::info!(unit, pid = r.pid, "adopted running service");
                let pid = r.pid;
                (r, StartOutcome::Adopted { pid })
            }
            Some(Adoptable::Stale(mut old)) => {
                tracing::info!(unit, pid = old.pid, "replacing a stale instance");
                stop_process(&mut old, unit, &prepared.unit).await;
                // Replaced because its inputs changed: a restart on request.
                restarts = 0;
                persist_restarts(host, &self.settings, unit, 0);
                let r = spawn(host, &self.settings, &self.cgroups, unit, &prepared).await?;
                let pid = r.pid;
                (r, StartOutcome::Started { pid })
            }
            None => {
                let r = spawn(host, &self.settings, &self.cgroups, unit, &prepared).await?;
                let pid = r.pid;
                (r, StartOutcome::Started { pid })
            }
        };
        let (status_tx, status_rx) = watch::channel(ServiceStatus {
            state: State::Running,
            pid: None,
            starts: 0,
            adopted: false,
            restarts,
            last_exit: None,
            restart_delays: Vec::new(),
            last_error: None,
        });
        let monitor = Monitor {
            host: self.host.clone(),
            settings: self.settings.clone(),
            cgroups: self.cgroups.clone(),
            name: unit.to_owned(),
            prepared,
            status: status_tx,
        };
        monitor.running(&running);
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(monitor.run(Some(running), rx));
        self.services().insert(
            unit.to_owned(),
            Handle {
                tx,
                status: status_rx,
            },
        );
        Ok(outcome)
    }

    async fn send_restart(
        &self,
        unit: &str,
        tx: &mpsc::UnboundedSender<Cmd>,
    ) -> Result<u32, SupervisorError> {
        let (reply, rx) = oneshot::channel();
        tx.send(Cmd::Restart(reply))
            .map_err(|_| SupervisorError::Gone { unit: unit.into() })?;
        rx.await
            .map_err(|_| SupervisorError::Gone { unit: unit.into() })?
    }

    /// Stops (KillSignal, then SIGKILL after TimeoutStopSec) and starts again with the unit file
    /// and environment as they are now. Only called when an input changed.
    pub async fn restart(&self, unit: &str) -> Result<u32, SupervisorError> {
        let tx = self
            .services()
            .get(unit)
            .map(|h| h.tx.clone())
            .filter(|tx| !tx.is_closed());
        let tx = match tx {
            Some(tx) => tx,
            None => match self.start(unit).await? {
                StartOutcome::Started { pid } => return Ok(pid),
                StartOutcome::Adopted { .. } | StartOutcome::AlreadyRunning => self
                    .services()
                    .get(unit)
                    .map(|h| h.tx.clone())
                    .ok_or_else(|| SupervisorError::Gone { unit: unit.into() })?,
            },
        };
        self.send_restart(unit, &tx).await
    }

    /// Stops the unit and forgets its pid file.
    pub async fn stop(&self, unit: &str) -> Result<(), SupervisorError> {
        let tx = self.services().get(unit).map(|h| h.tx.clone());
        let Some(tx) = tx else { return Ok(()) };
        let (reply, rx) = oneshot::channel();
        if tx.send(Cmd::Stop(reply)).is_err() {
            return Ok(());
        }
        let _ = rx.await;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unit(text: &str) -> Unit {
        crate::unit::parse(text).unwrap()
    }

    #[test]
    fn restart_rules_follow_systemd() {
        let u = unit("[Service]\nExecStart=/bin/x\nRestart=on-failure\nRestartPreventExitStatus=75 SIGUSR1\n");
        assert!(!should_restart(&u, Exit::Code(0)));
        assert!(should_restart(&u, Exit::Code(1)));
        assert!(!should_restart(&u, Exit::Code(75)));
        assert!(!should_restart(&u, Exit::Signal(15)));
        assert!(should_restart(&u, Exit::Signal(9)));
        assert!(!should_restart(&u, Exit::Signal(10)));
        assert!(should_restart(&u, Exit::Unknown));
        let always = unit("[Service]\nExecStart=/bin/x\nRestart=always\n");
        assert!(should_restart(&always, Exit::Code(0)));
        let no = unit("[Service]\nExecStart=/bin/x\n");
        assert!(!should_restart(&no, Exit::Code(1)));
    }

    #[test]
    fn backoff_doubles_and_caps() {
        let s = Duration::from_secs(3);
        let cap = Duration::from_secs(20);
        let got: Vec<u64> = (1..=5).map(|n| backoff(s, n, cap).as_secs()).collect();
        assert_eq!(got, [3, 6, 12, 20, 20]);
        assert_eq!(backoff(Duration::ZERO, 1, cap), Duration::from_millis(10));
        assert_eq!(backoff(s, 1000, cap), cap);
    }
}
