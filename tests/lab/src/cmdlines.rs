//! Every command line the lab's processes had, sampled every [`INTERVAL`] from boot: the
//! `secrets` scenario looks for secrets in all of them, so a command that carried a secret for
//! a moment (a `psql "postgres://u:secret@..."` that lives 200 ms) is caught, not only what is
//! still running when the scan happens.
//!
//! A background thread reads `/proc/<pid>/cmdline` of every process in [`Scope`] on each tick
//! and keeps each distinct command line once (with the first pid and time it was seen). What is
//! matched is decided at the end ([`Sampler::leaks`]): secrets created later (the `llm key`
//! scenario's keys) are looked for in everything sampled before. The thread's own CPU time and
//! scan times are kept, so its cost can be printed next to the bring-up figure.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::hash::{Hash, Hasher};
use std::io::Read;
use std::path::PathBuf;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How often every command line in scope is read.
pub const INTERVAL: Duration = Duration::from_millis(50);

/// Which processes are the lab's.
#[derive(Debug, Clone)]
pub struct Scope {
    /// Processes whose root directory is here or below (every node's processes).
    pub roots_under: PathBuf,
    /// Also host processes whose parent is this pid: what the lab itself runs (`seeder serve`,
    /// `seeder` subcommands, `terraform`, `chroot` before it enters a node).
    pub children_of: Option<i32>,
}

/// One distinct command line and where it was first seen.
#[derive(Debug, Clone)]
struct Sighting {
    pid: i32,
    at: Duration,
}

/// What the sampler has seen, and what seeing it cost.
#[derive(Debug, Default)]
struct Samples {
    /// Raw `/proc/<pid>/cmdline` bytes (NUL-separated argv) → first sighting.
    cmdlines: HashMap<Vec<u8>, Sighting>,
    /// Distinct (pid, command line) pairs: the processes seen.
    processes: HashSet<(i32, u64)>,
    ticks: u64,
    scan_total: Duration,
    scan_max: Duration,
    /// Longest time between the starts of two consecutive scans.
    gap_max: Duration,
    /// CPU time of the sampling thread (user + system) when it last updated.
    cpu: Duration,
    running_for: Duration,
}

/// A secret found in a sampled command line. Carries the label, never the secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leak {
    pub label: String,
    pub pid: i32,
    /// argv[0] of the command line that carried it.
    pub program: String,
    /// When it was first seen, since the sampler started.
    pub at: Duration,
}

impl fmt::Display for Leak {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} in the command line of pid {} ({}) at {:.2}s",
            self.label,
            self.pid,
            self.program,
            self.at.as_secs_f64()
        )
    }
}

/// The sampler's figures so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    pub ticks: u64,
    pub distinct_cmdlines: usize,
    pub processes: usize,
    pub scan_mean: Duration,
    pub scan_max: Duration,
    /// Longest time between two consecutive scans: a process that lived longer than this was
    /// sampled at least once.
    pub gap_max: Duration,
    pub cpu: Duration,
    pub running_for: Duration,
}

impl fmt::Display for Stats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let secs = self.running_for.as_secs_f64();
        write!(
            f,
            "{} samples every {} ms over {:.1}s: {} distinct command lines of {} processes; \
             scan mean {:.2} ms, max {:.1} ms; longest gap between samples {:.0} ms; \
             sampler CPU {:.2}s ({:.1}% of one core)",
            self.ticks,
            INTERVAL.as_millis(),
            secs,
            self.distinct_cmdlines,
            self.processes,
            self.scan_mean.as_secs_f64() * 1e3,
            self.scan_max.as_secs_f64() * 1e3,
            self.gap_max.as_secs_f64() * 1e3,
            self.cpu.as_secs_f64(),
            if secs > 0.0 {
                100.0 * self.cpu.as_secs_f64() / secs
            } else {
                0.0
            }
        )
    }
}

/// The running sampler; stops on [`Sampler::stop`] or drop.
pub struct Sampler {
    scope: Scope,
    samples: Arc<Mutex<Samples>>,
    stop: Mutex<Option<(mpsc::Sender<()>, JoinHandle<()>)>>,
}

impl fmt::Debug for Sampler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sampler")
            .field("scope", &self.scope)
            .field("stats", &self.stats())
            .finish()
    }
}

impl Sampler {
    /// Starts sampling now; the first scan runs before this returns, so anything already
    /// running is in it.
    pub fn start(scope: Scope) -> std::io::Result<Self> {
        let samples = Arc::new(Mutex::new(Samples::default()));
        let (tx, rx) = mpsc::channel();
        let (first_tx, first_rx) = mpsc::channel();
        let thread = {
            let scope = scope.clone();
            let samples = Arc::clone(&samples);
            std::thread::Builder::new()
                .name("cmdline-sampler".into())
                .spawn(move || run(&scope, &samples, &rx, first_tx))?
        };
        // The thread reports its first scan (or is gone, which the channel shows as well).
        let _ = first_rx.recv();
        Ok(Self {
            scope,
            samples,
            stop: Mutex::new(Some((tx, thread))),
        })
    }

    /// Stops sampling (after one last scan) and waits for the thread; idempotent.
    pub fn stop(&self) {
        let taken = self
            .stop
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some((tx, thread)) = taken {
            let _ = tx.send(());
            if thread.join().is_err() {
                tracing::error!("the command-line sampler panicked");
            }
        }
    }

    pub fn stats(&self) -> Stats {
        let s = self.samples.lock().unwrap_or_else(PoisonError::into_inner);
        Stats {
            ticks: s.ticks,
            distinct_cmdlines: s.cmdlines.len(),
            processes: s.processes.len(),
            scan_mean: if s.ticks > 0 {
                s.scan_total / u32::try_from(s.ticks).unwrap_or(u32::MAX)
            } else {
                Duration::ZERO
            },
            scan_max: s.scan_max,
            gap_max: s.gap_max,
            cpu: s.cpu,
            running_for: s.running_for,
        }
    }

    /// Every sampled command line that contains one of `secrets` (label, value), once per
    /// (label, command line).
    pub fn leaks(&self, secrets: &[(String, String)]) -> Vec<Leak> {
        let s = self.samples.lock().unwrap_or_else(PoisonError::into_inner);
        let mut out = Vec::new();
        for (raw, seen) in &s.cmdlines {
            for (label, value) in secrets {
                if contains(raw, value.as_bytes()) {
                    let argv0 = raw.split(|b| *b == 0).next().unwrap_or_default();
                    out.push(Leak {
                        label: label.clone(),
                        pid: seen.pid,
                        program: String::from_utf8_lossy(argv0).into_owned(),
                        at: seen.at,
                    });
                }
            }
        }
        out.sort_by_key(|l| l.at);
        out
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.stop();
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

/// The sampling loop: a scan per tick on a fixed schedule; once told to stop (or once the
/// [`Sampler`] is gone), one last scan and out.
fn run(
    scope: &Scope,
    samples: &Mutex<Samples>,
    stop: &mpsc::Receiver<()>,
    first: mpsc::Sender<()>,
) {
    realtime();
    let started = Instant::now();
    let me = std::process::id() as i32;
    let mut buf = Vec::with_capacity(4096);
    let mut next = started;
    let mut previous: Option<Instant> = None;
    let mut first = Some(first);
    loop {
        let t = Instant::now();
        let seen = scan(scope, me, &mut buf);
        record(
            samples,
            seen,
            t - started,
            t.elapsed(),
            previous.map(|p| t - p),
        );
        previous = Some(t);
        if let Some(tx) = first.take() {
            let _ = tx.send(());
        }
        // A late tick is not made up for: the next scan starts at once.
        next = (next + INTERVAL).max(Instant::now());
        match stop.recv_timeout(next.saturating_duration_since(Instant::now())) {
            Err(RecvTimeoutError::Timeout) => {}
            Ok(()) | Err(RecvTimeoutError::Disconnected) => {
                let t = Instant::now();
                let seen = scan(scope, me, &mut buf);
                record(
                    samples,
                    seen,
                    t - started,
                    t.elapsed(),
                    previous.map(|p| t - p),
                );
                return;
            }
        }
    }
}

/// Makes the calling thread SCHED_FIFO (priority 1). While 14 nodes install packages on 2 cores
/// (and the kernel is `PREEMPT_NONE`), a sleeping thread of normal priority, even at nice -10,
/// was woken 120-380 ms late: gaps a 200 ms process fits in. As a real-time thread the sampler
/// runs when its timer fires (longest gap 78 ms in the same bring-up); it uses about 3% of one
/// core, so it starves nothing. No crate wraps sched_setscheduler(2) without `unsafe`, hence
/// util-linux's `chrt`. Without it (not root) the sampler keeps its priority and the scan's
/// longest gap shows what that cost.
fn realtime() {
    let tid = rustix::thread::gettid().as_raw_nonzero().get();
    let out = std::process::Command::new("chrt")
        .args(["--fifo", "--pid", "1"])
        .arg(tid.to_string())
        .output();
    match out {
        Ok(o) if o.status.success() => {}
        Ok(o) => tracing::warn!(
            status = %o.status,
            stderr = %String::from_utf8_lossy(&o.stderr).trim(),
            "command-line sampler: chrt --fifo failed, normal priority"
        ),
        Err(e) => tracing::warn!("command-line sampler: running chrt: {e}; normal priority"),
    }
}

/// Adds one scan's command lines (seen `at` since the start) and its cost to `samples`.
fn record(
    samples: &Mutex<Samples>,
    seen: Vec<(i32, Vec<u8>)>,
    at: Duration,
    took: Duration,
    gap: Option<Duration>,
) {
    let mut s = samples.lock().unwrap_or_else(PoisonError::into_inner);
    for (pid, raw) in seen {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        raw.hash(&mut h);
        s.processes.insert((pid, h.finish()));
        s.cmdlines.entry(raw).or_insert(Sighting { pid, at });
    }
    s.ticks += 1;
    s.scan_total += took;
    s.scan_max = s.scan_max.max(took);
    s.gap_max = s.gap_max.max(gap.unwrap_or_default());
    s.cpu = thread_cpu().unwrap_or(s.cpu);
    s.running_for = at + took;
}

/// One pass over /proc: (pid, raw command line) of every process in scope with a non-empty
/// command line (kernel threads have none). Never this process itself.
fn scan(scope: &Scope, me: i32, buf: &mut Vec<u8>) -> Vec<(i32, Vec<u8>)> {
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        if pid == me || !in_scope(scope, pid) {
            continue;
        }
        buf.clear();
        let read = std::fs::File::open(format!("/proc/{pid}/cmdline"))
            .and_then(|mut f| f.read_to_end(buf));
        if read.is_ok() && !buf.is_empty() {
            out.push((pid, buf.clone()));
        }
    }
    out
}

fn in_scope(scope: &Scope, pid: i32) -> bool {
    let rooted = std::fs::read_link(format!("/proc/{pid}/root"))
        .is_ok_and(|root| root.starts_with(&scope.roots_under));
    rooted || (scope.children_of.is_some() && crate::procs::parent(pid) == scope.children_of)
}

/// User + system CPU time of the calling thread (`/proc/thread-self/stat`, clock ticks of
/// 1/100 s, which is USER_HZ on Linux).
fn thread_cpu() -> Option<Duration> {
    let text = std::fs::read_to_string("/proc/thread-self/stat").ok()?;
    let after = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    // utime and stime are fields 14 and 15; after the name, field 3 is index 0.
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(Duration::from_millis(ticks * 10))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh random secret in the shape the lab's are (hex, long enough to be unique).
    fn secret() -> String {
        hex::encode(rand::random::<[u8; 16]>())
    }

    /// A child of this process that carries `secret` in its argv for about 200 ms, as
    /// `psql "postgres://u:<secret>@..."` would: sh runs the sleep as a child and stays, so its
    /// own argv (with the URL as `$0 $1`) lives as long as the sleep.
    fn planted(secret: &str) -> std::process::Child {
        std::process::Command::new("/bin/sh")
            .args([
                "-c",
                "sleep 0.2; exit 0",
                "psql",
                &format!("postgres://u:{secret}@127.0.1.10:5432/ai_memory"),
            ])
            .spawn()
            .expect("spawn the planted process")
    }

    #[test]
    fn a_secret_on_a_command_line_for_200_ms_is_caught_and_an_absent_one_is_not() {
        let sampler = Sampler::start(Scope {
            // No process has its root here: only this test's children are in scope.
            roots_under: PathBuf::from("/nonexistent/hiveseed-lab"),
            children_of: Some(std::process::id() as i32),
        })
        .expect("start the sampler");
        let (present, absent) = (secret(), secret());
        let mut child = planted(&present);
        let pid = child.id() as i32;
        let started = Instant::now();
        assert!(child.wait().expect("wait for it").success());
        let lived = started.elapsed();
        sampler.stop();
        let needles = [
            ("planted pg password".to_owned(), present.clone()),
            ("absent secret".to_owned(), absent),
        ];
        let leaks = sampler.leaks(&needles);
        let stats = sampler.stats();
        eprintln!("planted process lived {lived:?}; {stats}");
        assert_eq!(
            leaks
                .iter()
                .map(|l| (l.label.as_str(), l.pid))
                .collect::<Vec<_>>(),
            [("planted pg password", pid)],
            "{leaks:?}"
        );
        assert_eq!(leaks[0].program, "/bin/sh");
        // The message names the secret's label, never the secret.
        assert!(!leaks[0].to_string().contains(&present), "{}", leaks[0]);
        assert!(stats.ticks >= 2 && stats.processes >= 1, "{stats}");
    }

    #[test]
    fn a_process_outside_the_scope_is_not_sampled() {
        let sampler = Sampler::start(Scope {
            roots_under: PathBuf::from("/nonexistent/hiveseed-lab"),
            // Not this process: the planted child is nobody's in scope.
            children_of: None,
        })
        .expect("start the sampler");
        let present = secret();
        let mut child = planted(&present);
        assert!(child.wait().expect("wait for it").success());
        sampler.stop();
        assert_eq!(
            sampler.leaks(&[("planted".to_owned(), present)]),
            Vec::<Leak>::new()
        );
        assert_eq!(sampler.stats().distinct_cmdlines, 0);
    }

    #[test]
    fn stats_read_well_and_the_thread_cpu_is_readable() {
        assert!(thread_cpu().is_some());
        let s = Stats {
            ticks: 20,
            distinct_cmdlines: 3,
            processes: 4,
            scan_mean: Duration::from_micros(1500),
            scan_max: Duration::from_millis(4),
            gap_max: Duration::from_millis(61),
            cpu: Duration::from_millis(50),
            running_for: Duration::from_secs(1),
        };
        assert_eq!(
            s.to_string(),
            "20 samples every 50 ms over 1.0s: 3 distinct command lines of 4 processes; scan \
             mean 1.50 ms, max 4.0 ms; longest gap between samples 61 ms; sampler CPU 0.05s \
             (5.0% of one core)"
        );
        assert!(contains(b"a\0postgres://u:s3cret@h", b"s3cret"));
        assert!(!contains(b"abc", b""));
    }
}
