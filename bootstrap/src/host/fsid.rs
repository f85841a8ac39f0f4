//! The calling thread's filesystem identity (fsuid/fsgid), switched to a directory's owner while
//! the agent creates, renames or removes a name in a directory a service user owns. The kernel
//! then checks that operation with the user's rights, not root's: whatever the user has arranged
//! in their directory, the agent can do there no more than the user could. Attributes are set
//! afterwards as root, on the file's fd.
//!
//! fsuid and fsgid are per thread (the raw system calls, unlike `setuid`, are not broadcast to the
//! other threads), and the guard restores them on drop, unwinding included.

use std::os::fd::AsFd;

use rustix::io::Errno;

/// While alive, the thread's fsuid/fsgid are a directory owner's; root's again on drop.
#[derive(Debug)]
pub(crate) struct AsOwner {
    switched: bool,
}

impl AsOwner {
    /// Takes on the owner of `dir` when a user other than root owns it and the agent runs as
    /// root; otherwise changes nothing.
    pub(crate) fn of(dir: impl AsFd) -> Result<Self, Errno> {
        let st = rustix::fs::fstat(dir)?;
        if st.st_uid == 0 || !rustix::process::geteuid().is_root() {
            return Ok(Self { switched: false });
        }
        set(st.st_uid, st.st_gid)?;
        Ok(Self { switched: true })
    }

    /// Whether the thread now acts as the directory's owner.
    #[cfg(test)]
    pub(crate) fn switched(&self) -> bool {
        self.switched
    }
}

impl Drop for AsOwner {
    fn drop(&mut self) {
        if self.switched && set(0, 0).is_err() {
            // Unreachable for root; never go on with another identity than the one believed.
            std::process::abort();
        }
    }
}

/// setfsgid then setfsuid; each call returns the previous id, so a second call with the same id
/// tells whether the first took effect.
#[allow(unsafe_code)]
fn set(uid: u32, gid: u32) -> Result<(), Errno> {
    // SAFETY: setfsgid/setfsuid change only the calling thread's credentials; no memory is
    // touched.
    let (g, u) = unsafe {
        libc::setfsgid(gid);
        let g = libc::setfsgid(gid);
        libc::setfsuid(uid);
        let u = libc::setfsuid(uid);
        (g, u)
    };
    if u32::try_from(g) == Ok(gid) && u32::try_from(u) == Ok(uid) {
        Ok(())
    } else {
        Err(Errno::PERM)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fs_ids() -> (u32, u32) {
        let status = std::fs::read_to_string("/proc/thread-self/status").expect("status");
        let field = |name: &str| -> u32 {
            let line = status.lines().find(|l| l.starts_with(name)).expect("field");
            // Real, effective, saved, filesystem.
            line.split_whitespace()
                .nth(4)
                .expect("fs id")
                .parse()
                .expect("number")
        };
        (field("Uid:"), field("Gid:"))
    }

    /// As root: inside the guard the thread's fs ids are the directory owner's, after it root's.
    #[test]
    fn the_guard_takes_on_the_directory_owner_and_gives_it_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::os::unix::fs::chown(dir.path(), Some(65534), Some(65533)).expect("chown");
        let fd = std::fs::File::open(dir.path()).expect("open");
        {
            let guard = AsOwner::of(&fd).expect("switch");
            assert!(guard.switched());
            assert_eq!(fs_ids(), (65534, 65533));
        }
        assert_eq!(fs_ids(), (0, 0));
        std::os::unix::fs::chown(dir.path(), Some(0), Some(0)).expect("chown");
        let guard = AsOwner::of(&fd).expect("root's directory");
        assert!(!guard.switched());
    }
}
