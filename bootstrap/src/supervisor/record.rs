//! What the supervisor records about a unit's main process when it starts it (`<unit>.pid`,
//! root-only), and the check an agent restart makes before adopting the process a record
//! names. A pid alone is not an identity (pids are reused) and `/proc/<pid>/cmdline` is
//! whatever the process wrote there; what a process cannot change is its start time (stat
//! field 22, per boot), and what it cannot fake without privilege is its uid and the file it
//! executes (`/proc/<pid>/exe`).

use std::os::fd::OwnedFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use rustix::process::{Pid, PidfdFlags};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub pid: u32,
    pub boot_id: String,
    /// Clock ticks after boot (`/proc/<pid>/stat` field 22).
    pub start_time: u64,
    pub uid: u32,
    /// The program's path and file identity as the kernel will show it in `/proc/<pid>/exe`.
    pub exe: PathBuf,
    pub exe_dev: u64,
    pub exe_ino: u64,
    /// The launcher's file identity: what `/proc/<pid>/exe` shows until the launcher has
    /// exec'd the program (an agent restarted right after a start can see that).
    pub launcher_dev: u64,
    pub launcher_ino: u64,
    /// sha256 over everything the unit was started with (argv, environment, credentials,
    /// working directory): equal means the process is the one we would start now.
    pub inputs: String,
    /// The unit's cgroup, when it has one.
    pub cgroup: Option<PathBuf>,
}

/// What `/proc` shows about a live process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observed {
    pub boot_id: String,
    pub start_time: u64,
    /// Real, effective, saved and filesystem uid.
    pub uids: [u32; 4],
    pub exe: PathBuf,
    pub exe_dev: u64,
    pub exe_ino: u64,
}

pub fn boot_id() -> std::io::Result<String> {
    Ok(std::fs::read_to_string("/proc/sys/kernel/random/boot_id")?
        .trim()
        .to_owned())
}

/// Field 22 of `/proc/<pid>/stat`, counted after the `)` that ends the (process-chosen) name.
pub fn start_time(pid: u32) -> std::io::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let bad = || std::io::Error::other(format!("/proc/{pid}/stat: unexpected format"));
    let after = stat.rsplit_once(')').ok_or_else(bad)?.1;
    // `after` starts at field 3 (state); field 22 is its 20th word.
    after
        .split_whitespace()
        .nth(19)
        .and_then(|s| s.parse().ok())
        .ok_or_else(bad)
}

/// The program a unit's argv[0] names, as the kernel records it on exec.
pub fn program_identity(program: &str) -> std::io::Result<(PathBuf, u64, u64)> {
    let path = std::fs::canonicalize(program)?;
    let md = std::fs::metadata(&path)?;
    Ok((path, md.dev(), md.ino()))
}

/// Reads what `/proc` shows for `pid`; the caller holds a pidfd for it and checks afterwards
/// that the process is still alive, so every read here was of that same process.
pub fn observe(pid: u32) -> std::io::Result<Observed> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let uids: Vec<u32> = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .map(|l| {
            l.split_whitespace()
                .filter_map(|n| n.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    let uids: [u32; 4] = uids
        .try_into()
        .map_err(|_| std::io::Error::other(format!("/proc/{pid}/status: no Uid line")))?;
    let exe_link = Path::new("/proc").join(pid.to_string()).join("exe");
    let exe = std::fs::read_link(&exe_link)?;
    // A binary replaced on disk while it runs reads "<path> (deleted)"; its identity is the
    // inode it runs from, which is compared too.
    let exe = match exe.to_str().and_then(|s| s.strip_suffix(" (deleted)")) {
        Some(s) => PathBuf::from(s),
        None => exe,
    };
    let md = std::fs::metadata(&exe_link)?;
    Ok(Observed {
        boot_id: boot_id()?,
        start_time: start_time(pid)?,
        uids,
        exe,
        exe_dev: md.dev(),
        exe_ino: md.ino(),
    })
}

/// Why a live process is not the one the record describes; `None` when it is.
pub fn mismatch(rec: &Record, got: &Observed) -> Option<String> {
    if got.boot_id != rec.boot_id {
        return Some(format!(
            "recorded in boot {}, this is boot {}",
            rec.boot_id, got.boot_id
        ));
    }
    if got.start_time != rec.start_time {
        return Some(format!(
            "started at tick {}, the recorded process at tick {}",
            got.start_time, rec.start_time
        ));
    }
    if got.uids.iter().any(|u| *u != rec.uid) {
        return Some(format!(
            "runs as uids {:?}, recorded uid {}",
            got.uids, rec.uid
        ));
    }
    if (got.exe_dev, got.exe_ino) != (rec.exe_dev, rec.exe_ino) || got.exe != rec.exe {
        return Some(format!(
            "executes {} (inode {}:{}), recorded {} (inode {}:{})",
            got.exe.display(),
            got.exe_dev,
            got.exe_ino,
            rec.exe.display(),
            rec.exe_dev,
            rec.exe_ino
        ));
    }
    None
}

/// True while the process behind `pidfd` has not exited.
pub fn alive(pidfd: &OwnedFd) -> bool {
    use rustix::event::{PollFd, PollFlags};
    let mut fds = [PollFd::new(pidfd, PollFlags::IN)];
    let zero = rustix::time::Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    matches!(rustix::event::poll(&mut fds, Some(&zero)), Ok(0))
}

/// Opens a pidfd for the recorded pid and checks the process is the recorded one. Errors say
/// why it is not (the caller logs them and does not touch that process).
pub async fn verify(rec: &Record) -> Result<OwnedFd, String> {
    let pid = Pid::from_raw(rec.pid as i32).ok_or("pid 0")?;
    let fd = rustix::process::pidfd_open(pid, PidfdFlags::empty())
        .map_err(|e| format!("pid {} is gone ({e})", rec.pid))?;
    let until = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    let mut pause = std::time::Duration::from_millis(1);
    let got = loop {
        let got = observe(rec.pid).map_err(|e| format!("pid {}: {e}", rec.pid))?;
        // Still the launcher, about to exec the program: wait for that, briefly.
        let launching = (got.exe_dev, got.exe_ino) == (rec.launcher_dev, rec.launcher_ino)
            && got.start_time == rec.start_time;
        if !launching || tokio::time::Instant::now() >= until {
            break got;
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(std::time::Duration::from_millis(50));
    };
    if !alive(&fd) {
        return Err(format!("pid {} exited while being checked", rec.pid));
    }
    match mismatch(rec, &got) {
        None => Ok(fd),
        Some(why) => Err(format!(
            "pid {} is not the process this agent started: {why}",
            rec.pid
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec() -> Record {
        Record {
            pid: 10,
            boot_id: "b".into(),
            start_time: 100,
            uid: 998,
            exe: "/usr/local/bin/ai-memory".into(),
            exe_dev: 1,
            exe_ino: 2,
            launcher_dev: 1,
            launcher_ino: 9,
            inputs: String::new(),
            cgroup: None,
        }
    }

    fn seen() -> Observed {
        Observed {
            boot_id: "b".into(),
            start_time: 100,
            uids: [998; 4],
            exe: "/usr/local/bin/ai-memory".into(),
            exe_dev: 1,
            exe_ino: 2,
        }
    }

    #[test]
    fn each_identity_field_is_checked() {
        assert_eq!(mismatch(&rec(), &seen()), None);
        type Change = fn(&mut Observed);
        let cases: [(&str, Change); 5] = [
            ("boot", |o| o.boot_id = "other".into()),
            ("tick", |o| o.start_time = 101),
            ("uids", |o| o.uids[1] = 0),
            ("executes", |o| o.exe = "/usr/bin/python3".into()),
            ("inode", |o| o.exe_ino = 3),
        ];
        for (word, change) in cases {
            let mut o = seen();
            change(&mut o);
            let why = mismatch(&rec(), &o).unwrap_or_default();
            assert!(why.contains(word), "{word}: {why:?}");
        }
    }

    #[test]
    fn start_time_of_ourselves_is_stable() {
        let me = std::process::id();
        let a = start_time(me).unwrap();
        assert!(a > 0);
        assert_eq!(start_time(me).unwrap(), a);
    }
}
