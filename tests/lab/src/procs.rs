//! Finding and stopping the processes that belong to a lab node.
//!
//! A node's processes are whatever runs with its root: `/proc/<pid>/root` is inside the node's
//! root directory. That catches daemons a node's agent started (postgres re-parents to PID 1 and
//! is in no state file), and a pid recorded in the state file is only trusted while its start
//! time still matches, so a recycled pid is never killed after a crash.
//!
//! Once chosen, a process is pinned by a pidfd: signals go to exactly that process even if its
//! pid is reused meanwhile, and its exit is waited on with `poll(2)` instead of polling /proc.

use std::path::Path;
use std::time::{Duration, Instant};

use std::os::fd::OwnedFd;

use nix::errno::Errno;
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use rustix::event::{poll, PollFd, PollFlags, Timespec};
use rustix::process::{pidfd_open, pidfd_send_signal, Pid as RPid, PidfdFlags, Signal as RSignal};

/// A process to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Target {
    pub pid: i32,
    /// `/proc/<pid>/stat` start time in clock ticks since boot; `None` means "whatever has that
    /// pid now" (only for pids just found by a scan).
    pub start_time: Option<u64>,
    /// Also signal the process group `pid` leads (set for processes we started with `setsid`).
    pub group: bool,
}

/// Fields of `/proc/<pid>/stat` after the command name, which may itself contain spaces and
/// parentheses.
fn stat_fields(pid: i32) -> Option<Vec<String>> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &text[text.rfind(')')? + 1..];
    Some(after.split_whitespace().map(str::to_owned).collect())
}

/// Start time (field 22 of stat) of `pid`, if it exists.
pub fn start_time(pid: i32) -> Option<u64> {
    // Fields after the name start at field 3 (state), so field 22 is index 19.
    stat_fields(pid)?.get(19)?.parse().ok()
}

/// The parent pid (field 4 of stat) of `pid`, if it exists.
pub fn parent(pid: i32) -> Option<i32> {
    stat_fields(pid)?.get(1)?.parse().ok()
}

/// True while `pid` exists, is not a zombie, and (if given) has the expected start time.
pub fn is_alive(pid: i32, expected_start: Option<u64>) -> bool {
    let Some(fields) = stat_fields(pid) else {
        return false;
    };
    let state = fields.first().map(String::as_str).unwrap_or("X");
    if state == "Z" || state == "X" {
        return false;
    }
    match expected_start {
        Some(want) => fields.get(19).and_then(|s| s.parse::<u64>().ok()) == Some(want),
        None => true,
    }
}

/// The argv of `pid` (empty for kernel threads or vanished processes).
pub fn cmdline(pid: i32) -> Vec<String> {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|raw| {
            raw.split(|b| *b == 0)
                .filter(|s| !s.is_empty())
                .map(|s| String::from_utf8_lossy(s).into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// All pids currently in /proc.
pub fn all_pids() -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .collect()
}

/// Live processes whose root directory is `dir` or below it. Never includes this process.
pub fn rooted_under(dir: &Path) -> Vec<i32> {
    let me = std::process::id() as i32;
    all_pids()
        .into_iter()
        .filter(|&pid| pid != me)
        .filter(|&pid| {
            std::fs::read_link(format!("/proc/{pid}/root"))
                .map(|root| root.starts_with(dir))
                .unwrap_or(false)
        })
        .filter(|&pid| is_alive(pid, None))
        .collect()
}

/// A process pinned by a pidfd.
#[derive(Debug)]
struct Pinned {
    target: Target,
    fd: OwnedFd,
}

impl Pinned {
    /// Pins `t` if it is alive and still the process it claims to be (the pid may have been
    /// recycled between a scan and `pidfd_open`; the start time settles it).
    fn new(t: Target) -> Option<Self> {
        let fd = pidfd_open(RPid::from_raw(t.pid)?, PidfdFlags::empty()).ok()?;
        is_alive(t.pid, t.start_time).then_some(Self { target: t, fd })
    }

    /// A pidfd turns readable when its process exits (reaped or not).
    fn exited(&self) -> bool {
        let mut fds = [PollFd::new(&self.fd, PollFlags::IN)];
        let now = Timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        match poll(&mut fds, Some(&now)) {
            Ok(n) => n > 0,
            Err(_) => !is_alive(self.target.pid, self.target.start_time),
        }
    }

    fn signal(&self, sig: RSignal) {
        if self.exited() {
            return;
        }
        if self.target.group {
            // pidfds cannot address a process group; the leader is alive, so its pgid is ours.
            match killpg(Pid::from_raw(self.target.pid), nix_signal(sig)) {
                Ok(()) | Err(Errno::ESRCH) => {}
                Err(e) => tracing::warn!(pid = self.target.pid, "killpg: {e}"),
            }
        }
        match pidfd_send_signal(&self.fd, sig) {
            Ok(()) | Err(rustix::io::Errno::SRCH) => {}
            Err(e) => tracing::warn!(pid = self.target.pid, "pidfd_send_signal: {e}"),
        }
    }
}

fn nix_signal(sig: RSignal) -> Signal {
    if sig == RSignal::KILL {
        Signal::SIGKILL
    } else {
        Signal::SIGTERM
    }
}

/// Blocks in `poll(2)` until every pinned process has exited or `deadline` passes; returns the
/// ones still running.
fn wait_exit<'a>(pinned: &[&'a Pinned], deadline: Duration) -> Vec<&'a Pinned> {
    let started = Instant::now();
    loop {
        let alive: Vec<&Pinned> = pinned.iter().copied().filter(|p| !p.exited()).collect();
        let left = deadline.saturating_sub(started.elapsed());
        if alive.is_empty() || left.is_zero() {
            return alive;
        }
        let mut fds: Vec<PollFd<'_>> = alive
            .iter()
            .map(|p| PollFd::new(&p.fd, PollFlags::IN))
            .collect();
        let timeout = Timespec {
            tv_sec: left.as_secs() as i64,
            tv_nsec: i64::from(left.subsec_nanos()),
        };
        match poll(&mut fds, Some(&timeout)) {
            Ok(_) | Err(rustix::io::Errno::INTR) => {}
            Err(e) => {
                tracing::warn!("poll on pidfds: {e}");
                return alive;
            }
        }
    }
}

/// Waits (without polling) until every live target has exited or `deadline` passes; returns
/// the pids still running.
pub fn wait_gone(targets: &[Target], deadline: Duration) -> Vec<i32> {
    let pinned: Vec<Pinned> = targets.iter().copied().filter_map(Pinned::new).collect();
    wait_exit(&pinned.iter().collect::<Vec<_>>(), deadline)
        .into_iter()
        .map(|p| p.target.pid)
        .collect()
}

/// Stops the process group whose leader's pid `pid_file` holds (a daemon the lab started in its
/// own group: the seeder, the DO API stand-in), then removes the file. No file: nothing to do.
pub fn stop_recorded(pid_file: &Path, term_deadline: Duration) {
    if let Ok(pid) = std::fs::read_to_string(pid_file) {
        if let Ok(pid) = pid.trim().parse::<i32>() {
            let target = Target {
                pid,
                start_time: start_time(pid),
                group: true,
            };
            stop(&[target], term_deadline);
        }
        let _ = std::fs::remove_file(pid_file);
    }
}

/// What stopping a set of processes took.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Stopped {
    /// Exited after SIGTERM.
    pub terminated: Vec<i32>,
    /// Needed SIGKILL.
    pub killed: Vec<i32>,
    /// Still alive even after SIGKILL (uninterruptible sleep); the caller reports them.
    pub survivors: Vec<i32>,
}

/// SIGTERM every live target, wait up to `term_deadline`, then SIGKILL what is left.
pub fn stop(targets: &[Target], term_deadline: Duration) -> Stopped {
    let pinned: Vec<Pinned> = targets.iter().copied().filter_map(Pinned::new).collect();
    if pinned.is_empty() {
        return Stopped::default();
    }
    for p in &pinned {
        p.signal(RSignal::TERM);
    }
    let stubborn = wait_exit(&pinned.iter().collect::<Vec<_>>(), term_deadline);
    for p in &stubborn {
        tracing::warn!(
            pid = p.target.pid,
            cmd = ?cmdline(p.target.pid),
            "ignored SIGTERM for {term_deadline:?}: SIGKILL"
        );
        p.signal(RSignal::KILL);
    }
    let killed: Vec<i32> = stubborn.iter().map(|p| p.target.pid).collect();
    let survivors = wait_exit(&stubborn, Duration::from_secs(5))
        .into_iter()
        .map(|p| p.target.pid)
        .collect();
    Stopped {
        terminated: pinned
            .iter()
            .map(|p| p.target.pid)
            .filter(|pid| !killed.contains(pid))
            .collect(),
        killed,
        survivors,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_process_is_alive_with_its_start_time() {
        let me = std::process::id() as i32;
        let st = start_time(me).expect("own stat");
        assert!(is_alive(me, Some(st)));
        assert!(!is_alive(me, Some(st + 1)));
        assert!(!cmdline(me).is_empty());
        let mut child = std::process::Command::new("true").spawn().unwrap();
        // Exited or not, it is unreaped until the wait below: its stat names its parent.
        assert_eq!(parent(child.id() as i32), Some(me));
        child.wait().unwrap();
    }

    #[test]
    fn absent_pid_is_dead() {
        // pid_max is at most 2^22, so this pid cannot exist.
        assert!(!is_alive(i32::MAX, None));
        assert_eq!(start_time(i32::MAX), None);
    }

    #[test]
    fn stop_terminates_a_child_and_zombies_count_as_gone() {
        let mut child = std::process::Command::new("sleep")
            .arg("1000")
            .spawn()
            .unwrap();
        let pid = child.id() as i32;
        let t = Target {
            pid,
            start_time: start_time(pid),
            group: false,
        };
        let reaper = std::thread::spawn(move || child.wait());
        let s = stop(&[t], Duration::from_secs(5));
        assert_eq!(s.terminated, vec![pid]);
        assert!(s.killed.is_empty() && s.survivors.is_empty());
        reaper.join().unwrap().unwrap();
    }

    #[test]
    fn stop_recorded_stops_the_recorded_group_and_removes_its_pid_file() {
        use std::os::unix::process::CommandExt;
        let dir = tempfile::tempdir().unwrap();
        let pid_file = dir.path().join("daemon.pid");
        // No pid file: nothing to stop, nothing created.
        stop_recorded(&pid_file, Duration::from_secs(5));
        assert!(!pid_file.exists());
        // A leader and its child in a group of their own, as the lab starts the seeder.
        let mut leader = std::process::Command::new("sh")
            .args(["-c", "sleep 1000 & echo $!; wait"])
            .process_group(0)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let pid = leader.id() as i32;
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(leader.stdout.take().unwrap()),
            &mut line,
        )
        .unwrap();
        let child: i32 = line.trim().parse().unwrap();
        let child_start = start_time(child);
        assert!(is_alive(child, child_start));
        std::fs::write(&pid_file, format!("{pid}\n")).unwrap();
        let reaper = std::thread::spawn(move || leader.wait());
        stop_recorded(&pid_file, Duration::from_secs(5));
        let status = reaper.join().unwrap().unwrap();
        assert!(!status.success(), "{status}");
        assert!(!pid_file.exists());
        assert!(!is_alive(pid, None));
        // The group went, not just its leader (the child is not ours to reap: gone or a zombie
        // of init's, either way not alive).
        let gone = crate::wait::until("the group's child to go", Duration::from_secs(5), || {
            !is_alive(child, child_start)
        });
        if gone.is_err() {
            let _ = stop(
                &[Target {
                    pid: child,
                    start_time: child_start,
                    group: false,
                }],
                Duration::from_secs(1),
            );
        }
        assert_eq!(gone, Ok(()), "the leader's child outlived its group");
    }
}
