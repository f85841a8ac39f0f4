//! Artifacts on disk and their downloads. `artifact add` copies a file into the campaign's
//! content-addressed store while hashing it, reads the stored copy back to verify it, and records
//! the stored file's identity (a [`Stamp`]) in a sidecar. Serving opens the file, checks the open
//! file still has that identity, and streams it in chunks: no request buffers or re-hashes a whole
//! artifact. Downloads are capped overall, and a download whose client stops reading for the write
//! timeout has its connection closed.
//!
//! Why a stamp and not a re-hash while streaming: hashing per request is the CPU an
//! unauthenticated client multiplies (100 downloads of 50 MiB = 5 GiB hashed), and a stream can
//! only be aborted after the wrong bytes went out. The stamp holds the inode (a replaced file has
//! a new one) and `ctime`, which the kernel sets on every write or metadata change and which no
//! caller can set back (unlike `mtime`), so any change made through the filesystem after `add` is
//! refused before the first byte. A write into the same inode while a download of it is under way
//! moves its ctime as well: the body checks it (one `fstat`) before the last chunk and withholds
//! that chunk when it moved, so the client gets a response short of its Content-Length. The store
//! is written only by `add`, which renames a new file in.

use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use bytes::{Bytes, BytesMut};
use hiveseed_proto::Sha256;
use serde::{Deserialize, Serialize};
use sha2::Digest;
use tokio::io::{AsyncRead, ReadBuf};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};

use crate::tls::ConnCloser;

/// Bytes read from disk per body frame.
const CHUNK: usize = 32 * 1024;

/// The stored file's identity as `artifact add` left it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stamp {
    pub size: u64,
    pub dev: u64,
    pub ino: u64,
    pub mtime_ns: i128,
    pub ctime_ns: i128,
}

impl Stamp {
    fn of(m: &std::fs::Metadata) -> Self {
        Self {
            size: m.size(),
            dev: m.dev(),
            ino: m.ino(),
            mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
            ctime_ns: i128::from(m.ctime()) * 1_000_000_000 + i128::from(m.ctime_nsec()),
        }
    }
}

fn artifact_path(dir: &Path, sha: &Sha256) -> PathBuf {
    dir.join(sha.to_hex())
}

fn stamp_path(dir: &Path, sha: &Sha256) -> PathBuf {
    dir.join(format!("{}.stamp", sha.to_hex()))
}

fn hash_reader(mut r: impl Read) -> std::io::Result<(Sha256, u64)> {
    let mut hasher = sha2::Sha256::new();
    let mut buf = vec![0u8; 1024 * 1024];
    let mut size = 0u64;
    loop {
        let n = r.read(&mut buf)?;
        if n == 0 {
            return Ok((Sha256(hasher.finalize().into()), size));
        }
        hasher.update(&buf[..n]);
        size += n as u64;
    }
}

/// A file copied into the store's directory under a temporary name and hashed; [`Staged::commit`]
/// puts it in place, dropping it removes it.
#[derive(Debug)]
pub struct Staged {
    dir: PathBuf,
    tmp: Option<PathBuf>,
    pub sha: Sha256,
    pub size: u64,
}

/// Copies `src` into `dir` while hashing it, in bounded memory.
pub fn stage(dir: &Path, src: &Path) -> Result<Staged> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let tmp = dir.join(format!(
        ".add.tmp{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let mut staged = Staged {
        dir: dir.to_path_buf(),
        tmp: Some(tmp.clone()),
        sha: Sha256([0; 32]),
        size: 0,
    };
    let mut input =
        std::fs::File::open(src).with_context(|| format!("opening {}", src.display()))?;
    let mut out = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    let mut hasher = sha2::Sha256::new();
    let mut buf = vec![0u8; 1024 * 1024];
    loop {
        let n = input
            .read(&mut buf)
            .with_context(|| format!("reading {}", src.display()))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        out.write_all(&buf[..n])
            .with_context(|| format!("writing {}", tmp.display()))?;
        staged.size += n as u64;
    }
    out.sync_all()
        .with_context(|| format!("writing {}", tmp.display()))?;
    // The umask may have narrowed the mode at creation.
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o644))?;
    staged.sha = Sha256(hasher.finalize().into());
    Ok(staged)
}

impl Staged {
    /// Renames the copy into place, reads it back to verify it is the hashed bytes, and records
    /// its stamp: from here on, serving it costs no hashing.
    pub fn commit(mut self) -> Result<Stamp> {
        let tmp = self.tmp.take().context("already committed")?;
        let path = artifact_path(&self.dir, &self.sha);
        let renamed = std::fs::rename(&tmp, &path);
        if renamed.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        renamed.with_context(|| format!("renaming into {}", path.display()))?;
        std::fs::File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .ok();
        let file =
            std::fs::File::open(&path).with_context(|| format!("opening {}", path.display()))?;
        let (sha, size) =
            hash_reader(&file).with_context(|| format!("reading back {}", path.display()))?;
        if sha != self.sha || size != self.size {
            bail!(
                "{} reads back as {sha} ({size} bytes), not the {} ({} bytes) written",
                path.display(),
                self.sha,
                self.size
            );
        }
        // Stamped after the rename: a rename changes the inode's ctime.
        let stamp = Stamp::of(&file.metadata()?);
        let json = serde_json::to_vec(&stamp)?;
        crate::campaign::write_atomic(&stamp_path(&self.dir, &self.sha), &json, 0o644)?;
        Ok(stamp)
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        if let Some(tmp) = self.tmp.take() {
            let _ = std::fs::remove_file(tmp);
        }
    }
}

/// Why an artifact cannot be served; every case is the operator's to fix, so all are 5xx.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("{path}: no stamp from `seeder artifact add`; add the artifact again")]
    NoStamp {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: unreadable stamp")]
    BadStamp {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{path}: cannot open")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} changed on disk since `seeder artifact add` (recorded {recorded:?}, now {now:?}); refusing to serve it under its recorded sha256: add it again")]
    Changed {
        path: PathBuf,
        recorded: Stamp,
        now: Stamp,
    },
}

/// An artifact opened for serving, checked against its stamp.
#[derive(Debug)]
pub struct Opened {
    file: tokio::fs::File,
    pub size: u64,
    /// The stamp's ctime: checked again before the last chunk goes out.
    ctime_ns: i128,
}

pub async fn open(dir: &Path, sha: &Sha256) -> Result<Opened, OpenError> {
    let spath = stamp_path(dir, sha);
    let raw = tokio::fs::read(&spath)
        .await
        .map_err(|source| OpenError::NoStamp {
            path: spath.clone(),
            source,
        })?;
    let recorded: Stamp = serde_json::from_slice(&raw).map_err(|source| OpenError::BadStamp {
        path: spath,
        source,
    })?;
    let path = artifact_path(dir, sha);
    let open_err = |source| OpenError::Open {
        path: path.clone(),
        source,
    };
    let file = tokio::fs::File::open(&path).await.map_err(open_err)?;
    // The open file's identity, not the path's: what is checked is what is read.
    let now = Stamp::of(&file.metadata().await.map_err(open_err)?);
    if now != recorded {
        return Err(OpenError::Changed {
            path,
            recorded,
            now,
        });
    }
    Ok(Opened {
        file,
        size: recorded.size,
        ctime_ns: recorded.ctime_ns,
    })
}

/// Download limits (`seeder serve` flags).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DownloadSettings {
    /// Artifact and bootstrap downloads in progress at once, over all clients.
    pub max_concurrent: usize,
    /// A download whose body makes no progress (the client stopped reading) this long is cut.
    pub write_timeout: Duration,
}

impl Default for DownloadSettings {
    fn default() -> Self {
        Self {
            max_concurrent: 64,
            write_timeout: Duration::from_secs(30),
        }
    }
}

/// The download slots.
#[derive(Debug)]
pub struct Downloads {
    slots: Arc<Semaphore>,
    pub settings: DownloadSettings,
}

impl Downloads {
    pub fn new(settings: DownloadSettings) -> Self {
        Self {
            slots: Arc::new(Semaphore::new(settings.max_concurrent)),
            settings,
        }
    }

    /// A slot, or None when `max_concurrent` downloads are in progress.
    pub fn try_slot(&self) -> Option<OwnedSemaphorePermit> {
        self.slots.clone().try_acquire_owned().ok()
    }

    /// The response body for an opened artifact. It holds the slot until it is dropped (finished,
    /// or its connection closed); a watchdog closes the connection when the body has not been
    /// asked for its next chunk within the write timeout, which is what a client that stopped
    /// reading looks like from here (hyper polls a body only when it can send more).
    pub fn body(
        &self,
        opened: Opened,
        slot: OwnedSemaphorePermit,
        closer: Option<ConnCloser>,
    ) -> ArtifactBody {
        let (progress, mut seen) = watch::channel(0u64);
        let timeout = self.settings.write_timeout;
        tokio::spawn(async move {
            loop {
                match tokio::time::timeout(timeout, seen.changed()).await {
                    Ok(Ok(())) => {}
                    // The body was dropped: finished, or its connection already gone.
                    Ok(Err(_)) => return,
                    Err(_) => {
                        tracing::info!(
                            timeout_secs = timeout.as_secs_f64(),
                            "download stalled past the write timeout; closing its connection"
                        );
                        if let Some(c) = closer {
                            c.close();
                        }
                        return;
                    }
                }
            }
        });
        ArtifactBody {
            file: opened.file,
            ctime_ns: opened.ctime_ns,
            remaining: opened.size,
            buf: None,
            progress,
            _slot: slot,
        }
    }
}

/// An artifact's bytes, read from disk a chunk at a time as the connection asks for them.
#[derive(Debug)]
pub struct ArtifactBody {
    file: tokio::fs::File,
    ctime_ns: i128,
    remaining: u64,
    buf: Option<BytesMut>,
    progress: watch::Sender<u64>,
    _slot: OwnedSemaphorePermit,
}

impl ArtifactBody {
    /// The open file's ctime is still the stamp's: nothing wrote to it or changed its metadata.
    fn unchanged(&self) -> bool {
        rustix::fs::fstat(&self.file).is_ok_and(|st| {
            i128::from(st.st_ctime) * 1_000_000_000 + i128::from(st.st_ctime_nsec) == self.ctime_ns
        })
    }
}

impl http_body::Body for ArtifactBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, std::io::Error>>> {
        let me = self.get_mut();
        if me.remaining == 0 {
            return Poll::Ready(None);
        }
        let want = CHUNK.min(usize::try_from(me.remaining).unwrap_or(CHUNK));
        let buf = me.buf.get_or_insert_with(|| BytesMut::zeroed(want));
        let mut rb = ReadBuf::new(&mut buf[..want]);
        match Pin::new(&mut me.file).poll_read(cx, &mut rb) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Err(e)) => Poll::Ready(Some(Err(e))),
            Poll::Ready(Ok(())) => {
                let n = rb.filled().len();
                if n == 0 {
                    // Shorter than its stamp: changed under an open download. Ending with an
                    // error makes the response short of its Content-Length, which clients refuse.
                    return Poll::Ready(Some(Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "artifact shorter than when it was added",
                    ))));
                }
                if n as u64 >= me.remaining && !me.unchanged() {
                    // Written to since it was opened (its ctime moved): the last chunk is
                    // withheld, so the response ends short of its Content-Length and the client
                    // refuses it, whatever bytes it already has.
                    tracing::warn!("artifact written to during a download; download cut short");
                    return Poll::Ready(Some(Err(std::io::Error::other(
                        "artifact changed during the download",
                    ))));
                }
                let mut chunk = me.buf.take().unwrap_or_default();
                chunk.truncate(n);
                me.remaining -= n as u64;
                me.progress.send_modify(|p| *p += 1);
                Poll::Ready(Some(Ok(http_body::Frame::data(chunk.freeze()))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.remaining == 0
    }

    fn size_hint(&self) -> http_body::SizeHint {
        http_body::SizeHint::with_exact(self.remaining)
    }
}
