//! The one place a child process is prepared. Whatever the agent runs (a command of the manifest,
//! a guard, a probe, a supervised unit) starts from [`command`]: a cleared environment with a
//! fixed PATH, the program resolved against that PATH (never the agent's inherited one), a new
//! session (no controlling terminal), the target user's supplementary groups, gid and uid set as
//! `initgroups` + `setgid` + `setuid` would, and no inherited fd but 0, 1 and 2. [`run`] runs a
//! command the agent waits for.
//!
//! The agent may be started from an operator's shell (`bootstrap plan`), so its environment, its
//! terminal and its open fds belong to someone else: none of them reaches a child.

use std::io::{Read, Write};
use std::os::fd::RawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use rustix::event::PollFlags;

use hiveseed_proto::AbsPath;

use crate::host::{Exec, ExecOutput, ExitCode, Host, HostError};

/// Every child's PATH, and the only directories a bare program name is looked up in.
pub const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Who a child runs as, read from the root's `/etc/passwd` and `/etc/group` before the fork
/// (the child cannot read files or allocate safely).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    pub name: String,
    pub uid: u32,
    /// The primary group; a unit's `Group=` replaces it.
    pub gid: u32,
    /// Supplementary groups: every group of `/etc/group` listing the user, and the primary one
    /// (what `initgroups(3)` sets).
    pub groups: Vec<u32>,
    pub home: String,
}

impl Credentials {
    /// `name` from the root's `/etc/passwd`, its groups from the root's `/etc/group`.
    pub fn lookup(host: &dyn Host, name: &str) -> Result<Self, HostError> {
        let entry = host
            .lookup_user(name)?
            .ok_or_else(|| HostError::UnknownName {
                path: static_path("/etc/passwd"),
                what: "user",
                name: name.to_owned(),
                db: "/etc/passwd",
            })?;
        let group_db = host.read(&static_path("/etc/group"))?.unwrap_or_default();
        let mut groups = member_groups(&String::from_utf8_lossy(&group_db), name);
        if !groups.contains(&entry.gid) {
            groups.insert(0, entry.gid);
        }
        Ok(Self {
            name: entry.name,
            uid: entry.uid,
            gid: entry.gid,
            groups,
            home: entry.home,
        })
    }
}

fn static_path(p: &str) -> AbsPath {
    p.parse().expect("static path")
}

/// The gids of every group whose member list (the fourth field) names `user`.
pub fn member_groups(group_db: &str, user: &str) -> Vec<u32> {
    group_db
        .lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split(':').collect();
            if f.len() < 4 || !f[3].split(',').any(|m| m.trim() == user) {
                return None;
            }
            f[2].parse().ok()
        })
        .collect()
}

/// `program` as an absolute path: itself when absolute, else the first executable regular file
/// of that name in [`PATH`]. Looked up in the agent's own mount namespace, where the child runs.
pub fn resolve_program(program: &str) -> Result<PathBuf, HostError> {
    if program.starts_with('/') {
        return Ok(PathBuf::from(program));
    }
    let found = (!program.contains('/'))
        .then(|| {
            PATH.split(':')
                .map(|dir| Path::new(dir).join(program))
                .find(|p| is_executable_file(p))
        })
        .flatten();
    found.ok_or_else(|| HostError::ProgramNotFound {
        program: program.to_owned(),
        path: PATH,
    })
}

fn is_executable_file(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// A [`Command`] for `argv` that starts clean: environment cleared to PATH=[`PATH`], HOME (the
/// user's, `/root` for root), LANG=C.UTF-8, USER and LOGNAME, then `env` (which may override
/// them); the program resolved with [`resolve_program`]; in the child before `exec`: `setsid`,
/// then for `user` `setgroups` + `setgid` + `setuid`, then every fd above 2 marked close-on-exec.
/// Stdio is left to the caller (std's default is to inherit: set all three). Without `user`
/// the child keeps the agent's ids.
///
/// Do not add `.uid()`/`.gid()`/`.process_group()` to the result: std applies them before the
/// hook and they would undo (groups) or fail (process group of a session leader) its work.
pub fn command(
    argv: &[String],
    user: Option<&Credentials>,
    env: &[(String, String)],
) -> Result<Command, HostError> {
    let (program, args) = argv.split_first().ok_or(HostError::EmptyArgv)?;
    let mut cmd = Command::new(resolve_program(program)?);
    cmd.arg0(program).args(args).env_clear().env("PATH", PATH);
    let (home, name) = match user {
        Some(u) => (u.home.as_str(), u.name.as_str()),
        None => ("/root", "root"),
    };
    cmd.env("HOME", home)
        .env("LANG", "C.UTF-8")
        .env("USER", name)
        .env("LOGNAME", name)
        .envs(env.iter().map(|(k, v)| (k, v)));
    let ids = user.map(|u| {
        (
            rustix::process::Uid::from_raw(u.uid),
            rustix::process::Gid::from_raw(u.gid),
            u.groups
                .iter()
                .map(|g| rustix::process::Gid::from_raw(*g))
                .collect::<Vec<_>>(),
        )
    });
    // Listed before the fork: the fallback when the kernel lacks close_range's CLOEXEC flag.
    let inherited = open_fds_above_stdio();
    child_setup(&mut cmd, ids, inherited);
    Ok(cmd)
}

type Ids = (
    rustix::process::Uid,
    rustix::process::Gid,
    Vec<rustix::process::Gid>,
);

/// The hook std runs in the child between `fork` and `exec`. Only raw system calls here: no
/// allocation, no lock (another thread of the agent may have held one at the fork).
#[allow(unsafe_code)]
fn child_setup(cmd: &mut Command, ids: Option<Ids>, inherited: Vec<RawFd>) {
    let hook = move || -> std::io::Result<()> {
        // A new session: no controlling terminal, and a process group the agent kills whole.
        rustix::process::setsid()?;
        if let Some((uid, gid, groups)) = &ids {
            // Raw syscalls act on the calling thread; the forked child has only this one.
            rustix::thread::set_thread_groups(groups)?;
            rustix::thread::set_thread_gid(*gid)?;
            rustix::thread::set_thread_uid(*uid)?;
        }
        mark_inherited_cloexec(&inherited);
        Ok(())
    };
    // SAFETY: the hook makes only async-signal-safe system calls (setsid, setgroups, setgid,
    // setuid, close_range, fcntl) on values prepared before the fork, and allocates nothing.
    unsafe {
        cmd.pre_exec(hook);
    }
}

/// Every fd above 2 close-on-exec, std's own error pipe (already CLOEXEC) included: closing it
/// instead would hide an `exec` failure from the parent.
#[allow(unsafe_code)]
fn mark_inherited_cloexec(fallback: &[RawFd]) {
    const CLOSE_RANGE_CLOEXEC: libc::c_uint = 1 << 2;
    // SAFETY: close_range only changes fd flags; no memory is touched.
    let r = unsafe {
        libc::syscall(
            libc::SYS_close_range,
            3,
            libc::c_uint::MAX,
            CLOSE_RANGE_CLOEXEC,
        )
    };
    if r == 0 {
        return;
    }
    for fd in fallback {
        // SAFETY: fcntl(F_SETFD) on a raw fd number; a number closed meanwhile gives EBADF.
        unsafe {
            libc::fcntl(*fd, libc::F_SETFD, libc::FD_CLOEXEC);
        }
    }
}

/// The agent's open fds above 2, from `/proc/self/fd`.
fn open_fds_above_stdio() -> Vec<RawFd> {
    std::fs::read_dir("/proc/self/fd")
        .map(|dir| {
            dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .filter(|fd: &RawFd| *fd > 2)
                .collect()
        })
        .unwrap_or_default()
}

/// Bytes kept of a command's stdout, and of its stderr: one more and the command is killed.
pub const OUTPUT_CAP: usize = 4 << 20;

/// Runs `exec` as `user` and collects its output. A non-zero exit is not an error here. The
/// command's session is killed, and an error names the limit, when it outlives `exec.timeout`
/// or writes more than [`OUTPUT_CAP`] bytes to stdout or stderr: a guard reading a file a
/// service user controls must neither hang the agent nor fill its memory. Processes the command
/// leaves behind in its session are not waited for once it exits (their output is dropped).
pub fn run(exec: &Exec, user: Option<&Credentials>) -> Result<ExecOutput, HostError> {
    let mut cmd = command(&exec.argv, user, &exec.env)?;
    cmd.stdin(if exec.stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let spawn_err = |source| HostError::Spawn {
        argv: exec.display(),
        source,
    };
    let deadline = Instant::now() + exec.timeout;
    let child = cmd.spawn().map_err(spawn_err)?;
    let mut session = Session::new(child);
    let pid = session.pid;
    let pidfd = rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty())
        .map_err(|e| spawn_err(e.into()))?;
    let mut stdout = Output::new(session.child.stdout.take()).map_err(spawn_err)?;
    let mut stderr = Output::new(session.child.stderr.take()).map_err(spawn_err)?;
    let mut input = match (session.child.stdin.take(), &exec.stdin) {
        (Some(pipe), Some(bytes)) => {
            rustix::io::ioctl_fionbio(&pipe, true).map_err(|e| spawn_err(e.into()))?;
            Some((pipe, bytes.0.as_slice()))
        }
        _ => None,
    };
    let over_cap = |stream: &'static str| HostError::OutputCap {
        argv: exec.display(),
        stream,
        cap: OUTPUT_CAP,
    };
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            session.kill();
            return Err(HostError::Timeout {
                argv: exec.display(),
                timeout: exec.timeout,
            });
        }
        let timeout = rustix::event::Timespec::try_from(left).unwrap_or(rustix::event::Timespec {
            tv_sec: i64::MAX,
            tv_nsec: 0,
        });
        let mut fds = vec![rustix::event::PollFd::new(&pidfd, PollFlags::IN)];
        for pipe in [&stdout.pipe, &stderr.pipe].into_iter().flatten() {
            fds.push(rustix::event::PollFd::new(pipe, PollFlags::IN));
        }
        if let Some((pipe, _)) = &input {
            fds.push(rustix::event::PollFd::new(pipe, PollFlags::OUT));
        }
        match rustix::event::poll(&mut fds, Some(&timeout)) {
            Ok(_) | Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(spawn_err(e.into())),
        }
        let exited = !fds[0].revents().is_empty();
        drop(fds);
        // Non-blocking: each reads what is there now.
        if stdout.read_available().map_err(spawn_err)? {
            session.kill();
            return Err(over_cap("stdout"));
        }
        if stderr.read_available().map_err(spawn_err)? {
            session.kill();
            return Err(over_cap("stderr"));
        }
        if let Some((pipe, rest)) = &mut input {
            match pipe.write(rest) {
                Ok(n) => *rest = &rest[n..],
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                // The child closed its stdin (or died): nothing more to feed.
                Err(_) => *rest = &[],
            }
            if rest.is_empty() {
                input = None;
            }
        }
        if exited {
            // What the command wrote before it exited is in the pipes, and was just read.
            break;
        }
    }
    let status = session.wait().map_err(spawn_err)?;
    Ok(ExecOutput {
        status: ExitCode::from_status(status),
        stdout: stdout.buf,
        stderr: stderr.buf,
    })
}

/// A spawned child, killed with its whole session unless waited for.
struct Session {
    child: std::process::Child,
    pid: rustix::process::Pid,
    reaped: bool,
}

impl Session {
    fn new(child: std::process::Child) -> Self {
        let pid = rustix::process::Pid::from_raw(child.id() as i32)
            .expect("a spawned child has a positive pid");
        Self {
            child,
            pid,
            reaped: false,
        }
    }

    /// SIGKILL to the session's process group, then to any member of the session that moved to
    /// another group, then reaps the leader. Until the leader is reaped its pid (the session
    /// and group id) cannot be reused, so nothing outside the session is hit. A process that
    /// called `setsid` itself has left the session and is out of reach.
    fn kill(&mut self) {
        if self.reaped {
            return;
        }
        let _ = rustix::process::kill_process_group(self.pid, rustix::process::Signal::KILL);
        // A member may fork while we look: look again until a pass finds none (bounded).
        for _ in 0..8 {
            let members = session_members(self.pid);
            if members.is_empty() {
                break;
            }
            for p in members {
                let _ = rustix::process::kill_process(p, rustix::process::Signal::KILL);
            }
        }
        let _ = self.wait();
    }

    fn wait(&mut self) -> std::io::Result<std::process::ExitStatus> {
        let status = self.child.wait()?;
        self.reaped = true;
        Ok(status)
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Live processes (zombies aside) whose session id is `sid`, from `/proc/<pid>/stat`.
pub fn session_members(sid: rustix::process::Pid) -> Vec<rustix::process::Pid> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| {
        let pid: i32 = e.ok()?.file_name().to_str()?.parse().ok()?;
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // Fields after the command name (which may hold spaces and parentheses): state is
        // the first, the session id the fourth.
        let rest = &stat[stat.rfind(')')? + 2..];
        let f: Vec<&str> = rest.split(' ').collect();
        let (state, session) = (*f.first()?, f.get(3)?.parse::<i32>().ok()?);
        (session == sid.as_raw_nonzero().get() && state != "Z")
            .then(|| rustix::process::Pid::from_raw(pid))
            .flatten()
    })
    .collect()
}

/// One of the child's output pipes, read without blocking into a capped buffer.
struct Output {
    pipe: Option<std::fs::File>,
    buf: Vec<u8>,
}

impl Output {
    fn new(pipe: Option<impl Into<std::os::fd::OwnedFd>>) -> std::io::Result<Self> {
        let pipe = pipe.map(|p| std::fs::File::from(p.into()));
        if let Some(p) = &pipe {
            rustix::io::ioctl_fionbio(p, true)?;
        }
        Ok(Self {
            pipe,
            buf: Vec::new(),
        })
    }

    /// Reads until the pipe is empty or closed; `true` when the cap is exceeded.
    fn read_available(&mut self) -> std::io::Result<bool> {
        let Some(pipe) = &mut self.pipe else {
            return Ok(false);
        };
        let mut chunk = [0u8; 64 * 1024];
        loop {
            match pipe.read(&mut chunk) {
                Ok(0) => {
                    self.pipe = None;
                    return Ok(false);
                }
                Ok(n) => {
                    if self.buf.len() + n > OUTPUT_CAP {
                        return Ok(true);
                    }
                    self.buf.extend_from_slice(&chunk[..n]);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn member_groups_are_the_groups_listing_the_user() {
        let db =
            "root:x:0:\nadm:x:4:syslog,ai-memory\nssl-cert:x:110:postgres\nai:x:5:ai-memoryx\n";
        assert_eq!(member_groups(db, "ai-memory"), vec![4]);
        assert_eq!(member_groups(db, "postgres"), vec![110]);
        assert!(member_groups(db, "nobody").is_empty());
    }

    #[test]
    fn bare_names_resolve_in_the_fixed_path_only() {
        assert_eq!(resolve_program("/x/y").unwrap(), PathBuf::from("/x/y"));
        let sh = resolve_program("sh").unwrap();
        assert!(PATH.split(':').any(|d| sh.starts_with(d)), "{sh:?}");
        let err = resolve_program("no-such-program-hiveseed").unwrap_err();
        assert!(err.to_string().contains(PATH), "{err}");
        assert!(resolve_program("./sh").is_err());
    }
}
