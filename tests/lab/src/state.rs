//! `<labdir>/state.json`: every mount and background process the lab made, so `down` can undo
//! them from a new process after a crash.
//!
//! Intent is written before the action (mounts are recorded, then mounted), so a crash between
//! the two leaves a record of something that may not exist, never the reverse; teardown treats
//! "not mounted" and "no such process" as done. Updates are read-modify-write under an exclusive
//! `flock` on the lab directory itself, then an atomic replace.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

use crate::error::{LabError, Result};

pub const STATE_FILE: &str = "state.json";

#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LabState {
    pub nodes: BTreeMap<String, NodeRecord>,
    pub procs: Vec<ProcRecord>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub base: PathBuf,
    /// `<labdir>/nodes/<name>`: holds `upper/`, `work/`, `root/` and logs.
    pub dir: PathBuf,
    pub root: PathBuf,
    pub upper: PathBuf,
    /// In mount order; unmounted in reverse.
    pub mounts: Vec<MountRecord>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MountRecord {
    pub target: PathBuf,
    pub fstype: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcRecord {
    pub node: String,
    pub pid: i32,
    /// From `/proc/<pid>/stat`; a pid whose start time differs was recycled and is left alone.
    pub start_time: u64,
    pub argv: Vec<String>,
    pub log: Option<PathBuf>,
}

/// Handle on one lab directory's state file.
#[derive(Debug, Clone)]
pub struct StateFile {
    dir: PathBuf,
}

impl StateFile {
    pub fn new(dir: &Path) -> Self {
        Self {
            dir: dir.to_path_buf(),
        }
    }

    pub fn path(&self) -> PathBuf {
        self.dir.join(STATE_FILE)
    }

    fn lock(&self) -> Result<Flock<File>> {
        let f = File::open(&self.dir).map_err(LabError::io("open lab dir", &self.dir))?;
        Flock::lock(f, FlockArg::LockExclusive).map_err(|(_, errno)| LabError::Io {
            what: "lock lab dir",
            path: self.dir.clone(),
            source: errno.into(),
        })
    }

    fn load(&self) -> Result<LabState> {
        let path = self.path();
        match std::fs::read(&path) {
            Ok(raw) => serde_json::from_slice(&raw)
                .map_err(|source| LabError::StateCorrupt { path, source }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(LabState::default()),
            Err(e) => Err(LabError::Io {
                what: "read",
                path,
                source: e,
            }),
        }
    }

    fn store(&self, state: &LabState) -> Result<()> {
        let path = self.path();
        let io = |what| LabError::io(what, &path);
        let mut tmp = tempfile::NamedTempFile::new_in(&self.dir).map_err(io("create temp for"))?;
        let json = serde_json::to_vec_pretty(state).map_err(|source| LabError::StateCorrupt {
            path: path.clone(),
            source,
        })?;
        tmp.write_all(&json).map_err(io("write"))?;
        tmp.as_file().sync_all().map_err(io("fsync"))?;
        tmp.persist(&path).map_err(|e| LabError::Io {
            what: "replace",
            path: path.clone(),
            source: e.error,
        })?;
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(LabError::io("fsync", &self.dir))?;
        Ok(())
    }

    /// A snapshot of the state (empty if there is no state file).
    pub fn read(&self) -> Result<LabState> {
        let _lock = self.lock()?;
        self.load()
    }

    /// Read, change, write back atomically, all under the lock.
    pub fn update<T>(&self, f: impl FnOnce(&mut LabState) -> T) -> Result<T> {
        let _lock = self.lock()?;
        let mut state = self.load()?;
        let out = f(&mut state);
        self.store(&state)?;
        Ok(out)
    }

    /// Deletes the state file; absent counts as done.
    pub fn remove(&self) -> Result<()> {
        let _lock = self.lock()?;
        match std::fs::remove_file(self.path()) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(LabError::Io {
                what: "remove",
                path: self.path(),
                source: e,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_remove_twice() {
        let dir = tempfile::tempdir().unwrap();
        let sf = StateFile::new(dir.path());
        assert_eq!(sf.read().unwrap(), LabState::default());
        sf.update(|s| {
            s.procs.push(ProcRecord {
                node: "a".into(),
                pid: 42,
                start_time: 7,
                argv: vec!["sleep".into()],
                log: None,
            })
        })
        .unwrap();
        assert_eq!(sf.read().unwrap().procs[0].pid, 42);
        sf.remove().unwrap();
        sf.remove().unwrap();
        assert!(!sf.path().exists());
    }

    #[test]
    fn corrupt_state_is_an_error_not_an_empty_lab() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(STATE_FILE), b"{not json").unwrap();
        let err = StateFile::new(dir.path()).read().unwrap_err();
        assert!(matches!(err, LabError::StateCorrupt { .. }), "{err}");
    }
}
