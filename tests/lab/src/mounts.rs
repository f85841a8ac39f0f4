//! Mount table reading and the mount/unmount calls the lab makes.
//!
//! `/proc/self/mountinfo` is the ground truth for teardown: the state file says what we meant to
//! mount, mountinfo says what is actually mounted, and `down` trusts the latter.

use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::errno::Errno;
use nix::mount::{umount2, MntFlags};

/// One line of `/proc/self/mountinfo`, reduced to what teardown needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    pub mount_id: u32,
    pub parent_id: u32,
    pub mount_point: PathBuf,
    pub fstype: String,
    pub source: String,
}

/// Decodes the octal escapes (`\040` space, `\011` tab, `\012` newline, `\134` backslash) the
/// kernel writes into mountinfo paths.
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..=i + 3]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b))
        {
            let v = (bytes[i + 1] - b'0') * 64 + (bytes[i + 2] - b'0') * 8 + (bytes[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parses mountinfo text. Lines that do not parse are skipped: the format is stable, and a
/// partial view is still better than refusing to tear down.
pub fn parse_mountinfo(text: &str) -> Vec<MountEntry> {
    text.lines()
        .filter_map(|line| {
            let (pre, post) = line.split_once(" - ")?;
            let pre: Vec<&str> = pre.split(' ').collect();
            let post: Vec<&str> = post.split(' ').collect();
            if pre.len() < 6 || post.len() < 2 {
                return None;
            }
            Some(MountEntry {
                mount_id: pre[0].parse().ok()?,
                parent_id: pre[1].parse().ok()?,
                mount_point: PathBuf::from(unescape(pre[4])),
                fstype: unescape(post[0]),
                source: unescape(post[1]),
            })
        })
        .collect()
}

/// The current mount table of this process's mount namespace.
pub fn mount_table() -> std::io::Result<Vec<MountEntry>> {
    Ok(parse_mountinfo(&std::fs::read_to_string(
        "/proc/self/mountinfo",
    )?))
}

/// Every mount point at or below `dir`, deepest first (the order they must be unmounted in).
pub fn mounts_under(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut found: Vec<PathBuf> = mount_table()?
        .into_iter()
        .map(|m| m.mount_point)
        .filter(|p| p.starts_with(dir))
        .collect();
    found.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    found.dedup();
    Ok(found)
}

pub fn is_mount_point(path: &Path) -> std::io::Result<bool> {
    Ok(mount_table()?.iter().any(|m| m.mount_point == path))
}

/// How a mount point went away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unmounted {
    /// Nothing was mounted there.
    NotMounted,
    Clean,
    /// `MNT_DETACH`: the mount left the tree but the kernel frees it only when the last user
    /// lets go. Only used when a clean unmount kept failing with EBUSY.
    Lazy,
}

/// Unmounts every mount stacked on `target` (a path can carry several), retrying EBUSY until
/// `busy_deadline`, then detaching lazily as the last resort.
pub fn unmount(target: &Path, busy_deadline: Duration) -> std::io::Result<Unmounted> {
    let mut result = Unmounted::NotMounted;
    while is_mount_point(target)? {
        let mut outcome = Ok(());
        let settled = crate::wait::until(
            "mount to stop being busy",
            busy_deadline,
            || match umount2(target, MntFlags::empty()) {
                Err(Errno::EBUSY) => false,
                other => {
                    outcome = other;
                    true
                }
            },
        );
        match (settled, outcome) {
            (Ok(()), Ok(())) => {
                if result == Unmounted::NotMounted {
                    result = Unmounted::Clean;
                }
            }
            // The kernel says it is not a mount point (any more): nothing left to do.
            (Ok(()), Err(Errno::EINVAL | Errno::ENOENT)) => break,
            (Ok(()), Err(e)) => return Err(e.into()),
            (Err(timed_out), _) => {
                tracing::warn!(
                    target = %target.display(),
                    "{timed_out}: detaching lazily (MNT_DETACH)"
                );
                umount2(target, MntFlags::MNT_DETACH)?;
                result = Unmounted::Lazy;
            }
        }
    }
    Ok(result)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
22 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw
98 22 0:45 / /tmp/lab/nodes/a/root rw,relatime - overlay overlay rw,lowerdir=/b,upperdir=/u,workdir=/w
99 98 0:46 / /tmp/lab/nodes/a/root/proc rw,nosuid,nodev,noexec,relatime - proc proc rw
100 98 0:47 / /tmp/lab\\040x/root/run rw - tmpfs lab-run rw,size=65536k
";

    #[test]
    fn parses_and_unescapes() {
        let m = parse_mountinfo(SAMPLE);
        assert_eq!(m.len(), 4);
        assert_eq!(m[1].fstype, "overlay");
        assert_eq!(m[1].parent_id, 22);
        assert_eq!(
            m[2].mount_point,
            PathBuf::from("/tmp/lab/nodes/a/root/proc")
        );
        assert_eq!(m[3].mount_point, PathBuf::from("/tmp/lab x/root/run"));
        assert_eq!(m[3].source, "lab-run");
    }

    #[test]
    fn garbage_lines_are_skipped() {
        let m = parse_mountinfo("not a mountinfo line\n\n1 2 3\n");
        assert!(m.is_empty());
    }

    #[test]
    fn unescape_leaves_plain_backslashes() {
        assert_eq!(unescape("a\\b"), "a\\b");
        assert_eq!(unescape("a\\134b"), "a\\b");
        assert_eq!(unescape("tail\\04"), "tail\\04");
    }
}
