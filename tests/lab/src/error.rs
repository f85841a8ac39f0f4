//! The error type of the lab's node API (`Lab`, `Node`, the state file).

use std::path::PathBuf;
use std::process::ExitStatus;

#[derive(Debug, thiserror::Error)]
pub enum LabError {
    #[error("{what} {}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("state file {} is not valid JSON for this lab version", path.display())]
    StateCorrupt {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("invalid node name {0:?}: use 1 to 32 of [a-z0-9-], starting with a letter or digit")]
    InvalidName(String),
    #[error("node {0} is already up")]
    AlreadyUp(String),
    #[error("node {0} is not up")]
    NotUp(String),
    #[error("{} does not look like a rootfs (no etc/os-release)", .0.display())]
    BadBase(PathBuf),
    #[error("path {} cannot be used in an overlay option (contains ',', ':' or '\\\\')", .0.display())]
    OverlayPath(PathBuf),
    #[error("mount {fstype} on {}", target.display())]
    Mount {
        fstype: String,
        target: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("unmount {}", target.display())]
    Unmount {
        target: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} in node {node}: a component is a symlink or not a directory", path.display())]
    UnsafePath { node: String, path: PathBuf },
    #[error("start {argv:?}")]
    Spawn {
        argv: Vec<String>,
        #[source]
        source: std::io::Error,
    },
    #[error("{argv:?} in node {node} exited with {status}; stderr: {stderr}")]
    CommandFailed {
        node: String,
        argv: Vec<String>,
        status: ExitStatus,
        stderr: String,
    },
    #[error("processes survived SIGKILL (uninterruptible?): {0:?}")]
    Unkillable(Vec<i32>),
    #[error("mounts still present under {}: {mounts:?}", dir.display())]
    StillMounted { dir: PathBuf, mounts: Vec<PathBuf> },
}

impl LabError {
    pub(crate) fn io(
        what: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| LabError::Io { what, path, source }
    }
}

pub type Result<T, E = LabError> = std::result::Result<T, E>;
