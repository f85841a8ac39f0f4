//! The two helper processes a unit runs through, both the agent's own binary started with
//! [`crate::spawn::command`] (cleared environment, new session, inherited fds close-on-exec).
//! The unit-specific setup that must happen as root before the unit's program runs lives here
//! rather than in spawn's pre-exec hook, which drops privileges first:
//!
//! - `bootstrap launch-unit`: moves itself into the unit's cgroup, sets `LimitNOFILE=`/`Nice=`,
//!   takes the unit user's primary and supplementary groups (what `initgroups(3)` gives) and
//!   uid, refuses to run with an inherited descriptor above stderr, then execs the unit's
//!   program. Its pid, and so the pidfd the supervisor holds, is the unit's main process from
//!   the first instruction on; nothing forks before the cgroup move.
//! - `bootstrap unit-log`: reads the unit's stdout and stderr from a pipe and appends them to
//!   `<unit>.log`, renaming it to `<unit>.log.1` (the one old file kept) when the next write
//!   would take it past the cap. It runs in its own session, outside the unit's cgroup, so it
//!   outlives an agent restart (the adopted unit keeps logging) and drains the pipe until the
//!   unit's last process closes it.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use rustix::fs::{Mode, OFlags};
use rustix::process::{Gid, Uid};

use crate::unit::Limit;

/// Everything the launcher applies before it execs `argv`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaunchSpec {
    /// The unit's cgroup directory (`cgroup.procs` is written with our own pid).
    pub cgroup: Option<PathBuf>,
    /// Credentials: uid, primary gid, supplementary groups. `None` keeps the agent's (root's).
    pub creds: Option<Creds>,
    pub nofile: Option<Limit>,
    pub nice: Option<i32>,
    pub argv: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Creds {
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
}

fn limit_arg(v: Option<u64>) -> String {
    v.map_or_else(|| "infinity".to_owned(), |n| n.to_string())
}

impl LaunchSpec {
    /// The launcher's arguments after `launch-unit`.
    pub fn to_args(&self) -> Vec<String> {
        let mut a: Vec<String> = Vec::new();
        if let Some(cg) = &self.cgroup {
            a.push(format!("--cgroup={}", cg.display()));
        }
        if let Some(c) = &self.creds {
            a.push(format!("--uid={}", c.uid));
            a.push(format!("--gid={}", c.gid));
            if !c.groups.is_empty() {
                let groups: Vec<String> = c.groups.iter().map(u32::to_string).collect();
                a.push(format!("--groups={}", groups.join(",")));
            }
        }
        if let Some(l) = self.nofile {
            a.push(format!(
                "--nofile={}:{}",
                limit_arg(l.soft),
                limit_arg(l.hard)
            ));
        }
        if let Some(n) = self.nice {
            a.push(format!("--nice={n}"));
        }
        a.push("--".into());
        a.extend(self.argv.iter().cloned());
        a
    }
}

/// Fails when a descriptor above stderr is open without close-on-exec: the unit must not
/// inherit anything of the agent's. The agent opens everything with `O_CLOEXEC` (Rust's
/// default); this is the check that it stays so.
fn check_no_inherited_fds() -> std::io::Result<()> {
    const O_CLOEXEC: u32 = 0o2_000_000;
    for e in std::fs::read_dir("/proc/self/fdinfo")? {
        let e = e?;
        let Some(n) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if n <= 2 {
            continue;
        }
        // The directory being read is itself an open (close-on-exec) descriptor.
        let Ok(info) = std::fs::read_to_string(e.path()) else {
            continue;
        };
        let flags = info
            .lines()
            .find_map(|l| l.strip_prefix("flags:"))
            .and_then(|f| u32::from_str_radix(f.trim(), 8).ok())
            .unwrap_or(0);
        if flags & O_CLOEXEC == 0 {
            let target = std::fs::read_link(format!("/proc/self/fd/{n}"))
                .map(|p| p.display().to_string())
                .unwrap_or_default();
            return Err(std::io::Error::other(format!(
                "descriptor {n} ({target}) would be inherited by the unit"
            )));
        }
    }
    Ok(())
}

/// Runs in the launcher process: applies `spec`, then execs. Returns only on failure.
pub fn launch(spec: &LaunchSpec) -> std::io::Error {
    match prepare_self(spec) {
        Ok(()) => {}
        Err(e) => return e,
    }
    use std::os::unix::process::CommandExt;
    let Some((program, args)) = spec.argv.split_first() else {
        return std::io::Error::other("no program to run");
    };
    // The environment and working directory were set by the supervisor for this process.
    std::process::Command::new(program).args(args).exec()
}

/// This process's session id, 0 where the session's leader is outside this pid namespace (a
/// container's shell). libc's getsid, not rustix's: rustix answers a session id of 0 with a panic.
#[allow(unsafe_code)]
fn own_session_id() -> i32 {
    // SAFETY: getsid(0) reads the caller's session id; it takes no pointers.
    unsafe { libc::getsid(0) }
}

fn prepare_self(spec: &LaunchSpec) -> std::io::Result<()> {
    let ctx = |what: &str, e: std::io::Error| std::io::Error::new(e.kind(), format!("{what}: {e}"));
    if let Some(cg) = &spec.cgroup {
        std::fs::write(cg.join("cgroup.procs"), b"0\n")
            .map_err(|e| ctx(&format!("joining cgroup {}", cg.display()), e))?;
    }
    // spawn::command made us a session leader already; run by hand, become one.
    if own_session_id() != rustix::process::getpid().as_raw_nonzero().get() {
        rustix::process::setsid().map_err(|e| ctx("setsid", e.into()))?;
    }
    if let Some(l) = spec.nofile {
        set_nofile(l).map_err(|e| ctx("LimitNOFILE", e))?;
    }
    if let Some(n) = spec.nice {
        rustix::process::setpriority_process(None, n).map_err(|e| ctx("Nice", e.into()))?;
    }
    if let Some(c) = &spec.creds {
        // The launcher is single-threaded, so the per-thread calls set the whole process.
        let groups: Vec<Gid> = c.groups.iter().map(|g| Gid::from_raw(*g)).collect();
        rustix::thread::set_thread_groups(&groups).map_err(|e| ctx("setgroups", e.into()))?;
        let gid = Gid::from_raw(c.gid);
        rustix::thread::set_thread_res_gid(gid, gid, gid)
            .map_err(|e| ctx("setresgid", e.into()))?;
        let uid = Uid::from_raw(c.uid);
        rustix::thread::set_thread_res_uid(uid, uid, uid)
            .map_err(|e| ctx("setresuid", e.into()))?;
        if rustix::process::getuid() != uid || rustix::process::geteuid() != uid {
            return Err(std::io::Error::other("uid did not change"));
        }
    }
    check_no_inherited_fds()
}

/// `LimitNOFILE=`. Above a hard limit this process may not raise (a container's, such as the
/// lab's 20,000), the unit gets that hard limit instead, said on stderr (the unit's log): the
/// agent before the launcher applied what it could and warned, and a daemon runs with fewer
/// files rather than not at all.
fn set_nofile(l: Limit) -> std::io::Result<()> {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let wanted = Rlimit {
        current: l.soft,
        maximum: l.hard,
    };
    let Err(e) = setrlimit(Resource::Nofile, wanted) else {
        return Ok(());
    };
    let cap = getrlimit(Resource::Nofile).maximum;
    let clamp = |v: Option<u64>| match (v, cap) {
        (Some(v), Some(c)) => Some(v.min(c)),
        (None, c) => c,
        (v, None) => v,
    };
    let fallback = Rlimit {
        current: clamp(l.soft),
        maximum: clamp(l.hard),
    };
    let show = |v: Option<u64>| v.map_or("infinity".to_owned(), |v| v.to_string());
    eprintln!(
        "bootstrap launch-unit: LimitNOFILE={}:{} refused ({e}); using {}:{}, the hard limit this \
         process has",
        show(l.soft),
        show(l.hard),
        show(fallback.current),
        show(fallback.maximum)
    );
    setrlimit(Resource::Nofile, fallback).map_err(Into::into)
}

/// Runs in the logger process: copies stdin to `dir/name`, rotating at `max_bytes`.
pub fn log_stdin(dir: &Path, name: &str, max_bytes: u64) -> std::io::Result<()> {
    let dirfd = std::fs::File::open(dir)?;
    let old = format!("{name}.1");
    let open = || -> std::io::Result<(std::fs::File, u64)> {
        let fd = rustix::fs::openat(
            &dirfd,
            name,
            OFlags::WRONLY | OFlags::CREATE | OFlags::APPEND | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o640),
        )?;
        let st = rustix::fs::fstat(&fd)?;
        if st.st_mode & 0o170_000 != 0o100_000 {
            return Err(std::io::Error::other(format!(
                "{name} is not a regular file"
            )));
        }
        Ok((std::fs::File::from(fd), st.st_size as u64))
    };
    let (mut file, mut size) = open()?;
    let mut stdin = std::io::stdin().lock();
    let chunk = usize::try_from(max_bytes.clamp(1, 64 * 1024)).unwrap_or(64 * 1024);
    let mut buf = vec![0u8; chunk];
    loop {
        let n = match stdin.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if size > 0 && size + n as u64 > max_bytes {
            rustix::fs::renameat(&dirfd, name, &dirfd, old.as_str())?;
            (file, size) = open()?;
        }
        file.write_all(&buf[..n])?;
        size += n as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    /// `LimitNOFILE=infinity` is above every hard limit (the kernel caps files at `nr_open`):
    /// the launcher gets the hard limit it has instead of failing the unit, as the lab's
    /// PostgreSQL unit (65536 against a hard 20,000) needs.
    #[test]
    fn a_nofile_limit_above_the_hard_limit_is_clamped_to_it() {
        use rustix::process::{getrlimit, Resource};
        let hard = getrlimit(Resource::Nofile).maximum;
        set_nofile(Limit {
            soft: None,
            hard: None,
        })
        .expect("clamped, not refused");
        let now = getrlimit(Resource::Nofile);
        assert_eq!((now.current, now.maximum), (hard, hard));
    }

    /// What the supervisor writes is what the launcher reads back, hyphens and all.
    #[test]
    fn launch_args_round_trip_through_the_cli() {
        let spec = LaunchSpec {
            cgroup: Some("/sys/fs/cgroup/hiveseed/ai-memory.service".into()),
            creds: Some(Creds {
                uid: 998,
                gid: 997,
                groups: vec![4, 997],
            }),
            nofile: Some(Limit {
                soft: Some(65536),
                hard: None,
            }),
            nice: Some(-5),
            argv: vec!["/usr/local/bin/x".into(), "--root".into(), "-v".into()],
        };
        let args = ["bootstrap".to_owned(), "launch-unit".to_owned()]
            .into_iter()
            .chain(spec.to_args());
        let cli = crate::cli::Cli::try_parse_from(args).unwrap();
        assert_eq!(crate::cli::launch_spec(&cli.command), Ok(spec));
    }
}
