//! The report spool: every report is numbered and written to disk before it is sent, and sent in
//! order; when the seeder is unreachable reports wait here, across agent restarts, and nothing is
//! lost. Sequence numbers only grow, so the seeder drops resends.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use hiveseed_proto::status::StatusReport;

use crate::client::{ClientError, SeederClient};

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("report spool {path}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("report spool {path}: {message}")]
    Corrupt { path: String, message: String },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SpoolError + '_ {
    move |source| SpoolError::Io {
        path: path.display().to_string(),
        source,
    }
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), SpoolError> {
    crate::state_file::write(path, bytes, 0o600).map_err(io(path))
}

#[derive(Debug)]
pub struct Spool {
    dir: PathBuf,
    next_seq: u64,
}

/// What a flush achieved.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Flushed {
    pub sent: usize,
    /// Refused permanently by the seeder (e.g. malformed): dropped, with the reason logged.
    pub dropped: usize,
}

impl Spool {
    /// Opens (creating, 0700) the spool directory; the next sequence number continues after
    /// everything ever numbered here.
    pub fn open(dir: &Path) -> Result<Self, SpoolError> {
        fs::create_dir_all(dir).map_err(io(dir))?;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(io(dir))?;
        let seq_file = dir.join("seq");
        let stored: u64 = match fs::read_to_string(&seq_file) {
            Ok(s) => s.trim().parse().map_err(|_| SpoolError::Corrupt {
                path: seq_file.display().to_string(),
                message: format!("not a number: {s:?}"),
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => 1,
            Err(e) => return Err(io(&seq_file)(e)),
        };
        let mut s = Self {
            dir: dir.to_path_buf(),
            next_seq: stored,
        };
        let max_pending = s.pending()?.last().map(|(seq, _)| *seq).unwrap_or(0);
        s.next_seq = s.next_seq.max(max_pending + 1);
        Ok(s)
    }

    /// Numbers the report, writes it to disk, and returns its sequence number.
    pub fn push(&mut self, mut report: StatusReport) -> Result<u64, SpoolError> {
        let seq = self.next_seq;
        // Persist the counter first: a crash may skip a number, never reuse one.
        write_atomic(&self.dir.join("seq"), (seq + 1).to_string().as_bytes())?;
        self.next_seq = seq + 1;
        report.seq = seq;
        let path = self.dir.join(format!("{seq:020}.json"));
        let json = serde_json::to_vec(&report).map_err(|e| SpoolError::Corrupt {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        write_atomic(&path, &json)?;
        Ok(seq)
    }

    /// Spooled reports, oldest first.
    pub fn pending(&self) -> Result<Vec<(u64, PathBuf)>, SpoolError> {
        let mut out = Vec::new();
        for e in fs::read_dir(&self.dir).map_err(io(&self.dir))? {
            let e = e.map_err(io(&self.dir))?;
            let name = e.file_name();
            let Some(stem) = name.to_str().and_then(|n| n.strip_suffix(".json")) else {
                continue;
            };
            if let Ok(seq) = stem.parse::<u64>() {
                out.push((seq, e.path()));
            }
        }
        out.sort();
        Ok(out)
    }

    /// Sends spooled reports in order until one cannot be delivered now.
    pub async fn flush(&self, client: &SeederClient) -> Result<Flushed, ClientError> {
        let mut done = Flushed::default();
        for (seq, path) in self
            .pending()
            .map_err(|e| ClientError::Protocol(e.to_string()))?
        {
            let report: StatusReport = match fs::read(&path)
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok())
            {
                Some(r) => r,
                None => {
                    tracing::warn!(seq, path = %path.display(), "unreadable spooled report dropped");
                    let _ = fs::remove_file(&path);
                    done.dropped += 1;
                    continue;
                }
            };
            match client.report(&report).await {
                Ok(()) => {
                    let _ = fs::remove_file(&path);
                    done.sent += 1;
                }
                Err(e) if e.retryable() => return Err(e),
                Err(e @ ClientError::Refused { .. }) => {
                    // The seeder will never accept it (malformed, or our identity is gone);
                    // keeping it would block every later report.
                    tracing::warn!(seq, error = %e, "report refused by the seeder; dropped");
                    let _ = fs::remove_file(&path);
                    done.dropped += 1;
                }
                Err(e) => return Err(e),
            }
        }
        Ok(done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hiveseed_proto::status::Phase;

    fn report() -> StatusReport {
        StatusReport {
            node: "do-1461-pg-nyc3-01".parse().unwrap(),
            seq: 0,
            at: 1,
            phase: Phase::Enrolling,
            generation: None,
            digest: None,
            resources: vec![],
            services: Vec::new(),
            checks: vec![],
        }
    }

    #[test]
    fn sequence_numbers_survive_reopening_and_never_repeat() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("spool");
        let mut s = Spool::open(&dir).unwrap();
        assert_eq!(s.push(report()).unwrap(), 1);
        assert_eq!(s.push(report()).unwrap(), 2);
        let mode = fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        drop(s);
        let mut s = Spool::open(&dir).unwrap();
        assert_eq!(s.push(report()).unwrap(), 3);
        let seqs: Vec<u64> = s.pending().unwrap().into_iter().map(|(n, _)| n).collect();
        assert_eq!(seqs, [1, 2, 3]);
        // Even if the counter file is lost, numbering continues after what is spooled.
        fs::remove_file(dir.join("seq")).unwrap();
        let mut s = Spool::open(&dir).unwrap();
        assert_eq!(s.push(report()).unwrap(), 4);
        let stored: StatusReport =
            serde_json::from_slice(&fs::read(&s.pending().unwrap()[3].1).unwrap()).unwrap();
        assert_eq!(stored.seq, 4);
    }
}
