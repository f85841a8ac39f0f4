//! Each unit's own cgroup v2 directory, `<mount>/hiveseed/<unit>` (under a per-root directory
//! when the agent provisions a root other than `/`, so two roots on one machine never share a
//! unit's cgroup). A process cannot leave its cgroup without write access to the cgroup tree,
//! which only root has, so a stop that writes `cgroup.kill` reaches every process the unit
//! forked, double-forked or `setsid`-ed away from its session.
//!
//! Used only where a cgroup2 hierarchy is mounted, writable and has `cgroup.kill` (Linux 5.14);
//! elsewhere the supervisor falls back to the unit's session (see the supervisor's docs).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use sha2::{Digest, Sha256};

const CGROUP2_SUPER_MAGIC: u64 = 0x6367_7270;

/// Where cgroup v2 is mounted: `/sys/fs/cgroup` (unified) or `/sys/fs/cgroup/unified` (hybrid).
fn cgroup2_mount() -> Option<PathBuf> {
    ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| rustix::fs::statfs(p).is_ok_and(|s| s.f_type as u64 == CGROUP2_SUPER_MAGIC))
}

/// The directory under which this agent's unit cgroups live, created if needed; `None` when
/// cgroups are not usable here (the reason is logged once by the caller).
pub fn base_for_root(root: &Path) -> Result<PathBuf, String> {
    let mount = cgroup2_mount().ok_or("no cgroup2 hierarchy mounted")?;
    let mut base = mount.join("hiveseed");
    if root != Path::new("/") {
        let h = Sha256::digest(root.as_os_str().as_encoded_bytes());
        base.push(format!("root-{}", &hex::encode(h)[..16]));
    }
    std::fs::create_dir_all(&base).map_err(|e| format!("creating {}: {e}", base.display()))?;
    if !base.join("cgroup.kill").exists() {
        return Err(format!(
            "{} has no cgroup.kill (Linux < 5.14)",
            base.display()
        ));
    }
    Ok(base)
}

/// Creates (or reuses) the unit's cgroup; `base` too, which goes when its last unit stops.
pub fn create(base: &Path, unit: &str) -> std::io::Result<PathBuf> {
    let dir = base.join(unit);
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// SIGKILL to every process in the cgroup, by the kernel (no pid is looked up by us).
pub fn kill(dir: &Path) -> std::io::Result<()> {
    std::fs::OpenOptions::new()
        .write(true)
        .open(dir.join("cgroup.kill"))?
        .write_all(b"1\n")
}

pub fn populated(dir: &Path) -> bool {
    std::fs::read_to_string(dir.join("cgroup.events"))
        .is_ok_and(|s| s.lines().any(|l| l.trim() == "populated 1"))
}

/// Waits until no process is left in the cgroup (killed processes take a moment to exit),
/// then removes it. `false` when processes remain at the deadline.
pub async fn drain_and_remove(dir: &Path, deadline: Duration) -> bool {
    let until = tokio::time::Instant::now() + deadline;
    let mut pause = Duration::from_millis(1);
    while populated(dir) {
        if tokio::time::Instant::now() >= until {
            return false;
        }
        // cgroup.events can be watched with inotify; the exit of SIGKILLed processes takes
        // microseconds to milliseconds, so a short doubling poll is as good and simpler.
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(50));
    }
    let _ = std::fs::remove_dir(dir);
    // A per-root directory goes with its last unit (errors: other units still there).
    if let Some(parent) = dir.parent().filter(|p| {
        p.file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("root-"))
    }) {
        let _ = std::fs::remove_dir(parent);
    }
    true
}
