//! The agent's own state files (applied-generation ledger, saved manifest, last report, spooled
//! reports): written whole or not at all, through a temp file with a unique name that has its
//! final mode from the moment it exists, so two writers never share a temp file and a secret is
//! never readable through a looser one.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Writes `bytes` to `path` with `mode`: temp file in the same directory (created with `mode`,
/// narrowed only by the umask), fsync, rename into place, fsync the directory.
pub fn write(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    let dir = path
        .parent()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no parent"))?;
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("state");
    // Unique per process and call; O_EXCL, so a leftover or planted file is never written through.
    let tmp = dir.join(format!(
        ".{name}.{}-{}.tmp",
        std::process::id(),
        TEMP_COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let result = (|| {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .custom_flags(nofollow())
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result?;
    fs::File::open(dir)?.sync_all()
}

/// O_NOFOLLOW, from rustix (the agent's one syscall crate).
fn nofollow() -> i32 {
    rustix::fs::OFlags::NOFOLLOW.bits() as i32
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn the_file_has_its_mode_from_creation_and_no_temp_file_is_left() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("applied.json");
        // A stale temp file of the old fixed name must not be reused (nor its mode inherited).
        fs::write(d.path().join("applied.tmp"), b"old").unwrap();
        fs::set_permissions(
            d.path().join("applied.tmp"),
            fs::Permissions::from_mode(0o666),
        )
        .unwrap();
        write(&p, b"{\"generation\":3}", 0o600).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"{\"generation\":3}");
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        write(&p, b"{}", 0o400).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"{}");
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o400
        );
        let mut left: Vec<String> = fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(left, ["applied.json", "applied.tmp"]);
    }

    #[test]
    fn concurrent_writers_never_share_a_temp_file() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("last-report.json");
        std::thread::scope(|s| {
            for i in 0..8u8 {
                let p = &p;
                s.spawn(move || {
                    for _ in 0..50 {
                        write(p, &[i; 4096], 0o600).unwrap();
                    }
                });
            }
        });
        let got = fs::read(&p).unwrap();
        assert_eq!(got.len(), 4096);
        assert!(got.iter().all(|b| *b == got[0]), "a torn write");
    }

    #[test]
    fn a_missing_directory_is_an_error() {
        let d = tempfile::tempdir().unwrap();
        assert!(write(&d.path().join("no/such/file"), b"x", 0o600).is_err());
    }
}
