//! Every command line the lab's processes had, sampled every [`INTERVAL`] from boot: the
//! `secrets` scenario looks for secrets in all of them, so a command that carried a secret for
//! a moment (a `psql "postgres://u:secret@..."` that lives 200 ms) is caught, not only what is
//! still running when the scan happens.
//!
//! On each tick a background thread reads `/proc/<pid>/cmdline` of every process in [`Scope`]
//! (a scan held up by one slow read leaves the next tick to another thread, which skips that
//! pid) and keeps each distinct command line once (with the first pid and time it was seen). What is
//! matched is decided at the end ([`Sampler::leaks`]): secrets created later (the `llm key`
//! scenario's keys) are looked for in everything sampled before. The thread's own CPU time and
//! scan times are kept, so its cost can be printed next to the bring-up figure.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::hash::{Hash, Hasher};
use std::io::Read;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
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
    last_start: Option<Instant>,
    /// CPU time (user + system) of each scanning thread when it last finished a scan.
    cpu_by_thread: HashMap<i32, Duration>,
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
        Self::start_with(scope, Box::new(read_cmdline))
    }

    /// [`Sampler::start`] with the command-line read given (a test holds one up).
    fn start_with(scope: Scope, read: Reader) -> std::io::Result<Self> {
        let samples = Arc::new(Mutex::new(Samples::default()));
        let (tx, rx) = mpsc::channel();
        let (first_tx, first_rx) = mpsc::channel();
        let shared = Arc::new(Shared {
            scope: scope.clone(),
            samples: Arc::clone(&samples),
            in_flight: Mutex::new(HashSet::new()),
            read,
            started: Instant::now(),
            me: std::process::id() as i32,
        });
        let thread = std::thread::Builder::new()
            .name("cmdline-sampler".into())
            .spawn(move || run(&shared, &rx, first_tx))?;
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
            cpu: s.cpu_by_thread.values().sum(),
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

/// Most scans running at once. A scan waits while the kernel reads a command line under the
/// target's mmap lock; on a loaded machine a process holding that lock while descheduled held a
/// single-threaded scan for 223 ms (a CI bring-up). The next tick's scan then runs on another
/// thread and skips the pid the held one is reading, so one slow read no longer stops sampling.
const MAX_SCANNERS: usize = 4;

/// What every scanning thread shares.
struct Shared {
    scope: Scope,
    samples: Arc<Mutex<Samples>>,
    /// Pids a scan is handling right now: another scan that comes to one skips it (the first
    /// one records what it reads).
    in_flight: Mutex<HashSet<i32>>,
    read: Reader,
    started: Instant,
    me: i32,
}

/// Reads one pid's command line into the buffer (cleared first).
type Reader = Box<dyn Fn(i32, &mut Vec<u8>) -> std::io::Result<()> + Send + Sync>;

fn read_cmdline(pid: i32, buf: &mut Vec<u8>) -> std::io::Result<()> {
    buf.clear();
    std::fs::File::open(format!("/proc/{pid}/cmdline"))?.read_to_end(buf)?;
    Ok(())
}

/// A scanning thread and whether it is in a scan.
struct Scanner {
    /// A scan to run, with whom to tell when it is done.
    tick: mpsc::Sender<Option<mpsc::Sender<()>>>,
    busy: Arc<AtomicBool>,
    thread: JoinHandle<()>,
}

/// The ticker: a scan per tick on a fixed schedule, each on an idle scanning thread (up to
/// [`MAX_SCANNERS`]); once told to stop (or once the [`Sampler`] is gone), one last scan and out.
fn run(shared: &Arc<Shared>, stop: &mpsc::Receiver<()>, first: mpsc::Sender<()>) {
    realtime();
    let mut buf = Vec::with_capacity(4096);
    let mut scanners: Vec<Scanner> = Vec::new();
    // The first scan reports when it is done, so start() returns once it is.
    let mut first = Some(first);
    let mut next = Instant::now();
    loop {
        dispatch(shared, &mut scanners, first.take());
        // A late tick is not made up for: the next scan starts at once.
        next = (next + INTERVAL).max(Instant::now());
        match stop.recv_timeout(next.saturating_duration_since(Instant::now())) {
            Err(RecvTimeoutError::Timeout) => {}
            Ok(()) | Err(RecvTimeoutError::Disconnected) => break,
        }
    }
    scan_once(shared, &mut buf);
    for s in scanners {
        let busy = s.busy.load(Ordering::Acquire);
        drop(s.tick);
        // A scanner still held by a read finishes it on its own; the rest are waited for.
        if !busy && s.thread.join().is_err() {
            tracing::error!("a command-line scanner panicked");
        }
    }
}

/// Hands this tick's scan to an idle scanner, or a new one; with [`MAX_SCANNERS`] all busy the
/// tick is lost, which the longest gap shows.
fn dispatch(shared: &Arc<Shared>, scanners: &mut Vec<Scanner>, mut done: Option<mpsc::Sender<()>>) {
    if let Some(s) = scanners.iter().find(|s| !s.busy.load(Ordering::Acquire)) {
        s.busy.store(true, Ordering::Release);
        match s.tick.send(done) {
            Ok(()) => return,
            Err(mpsc::SendError(back)) => done = back,
        }
        s.busy.store(false, Ordering::Release);
    }
    if scanners.len() >= MAX_SCANNERS {
        return;
    }
    let (tx, rx) = mpsc::channel::<Option<mpsc::Sender<()>>>();
    let busy = Arc::new(AtomicBool::new(true));
    let spawned = {
        let shared = Arc::clone(shared);
        let busy = Arc::clone(&busy);
        std::thread::Builder::new()
            .name(format!("cmdline-scan-{}", scanners.len()))
            .spawn(move || {
                realtime();
                let mut buf = Vec::with_capacity(4096);
                while let Ok(done) = rx.recv() {
                    scan_once(&shared, &mut buf);
                    busy.store(false, Ordering::Release);
                    if let Some(done) = done {
                        let _ = done.send(());
                    }
                }
            })
    };
    match spawned {
        Ok(thread) => {
            let _ = tx.send(done);
            scanners.push(Scanner {
                tick: tx,
                busy,
                thread,
            });
        }
        Err(e) => tracing::warn!("command-line sampler: starting a scanner: {e}"),
    }
}

/// One scan, with its start (for the gap since the previous scan began) and cost recorded.
fn scan_once(shared: &Shared, buf: &mut Vec<u8>) {
    let t = Instant::now();
    {
        let mut s = shared
            .samples
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(p) = s.last_start {
            s.gap_max = s.gap_max.max(t.saturating_duration_since(p));
        }
        s.last_start = Some(s.last_start.map_or(t, |p| p.max(t)));
    }
    let seen = scan(shared, buf);
    record(&shared.samples, seen, t - shared.started, t.elapsed());
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
fn record(samples: &Mutex<Samples>, seen: Vec<(i32, Vec<u8>)>, at: Duration, took: Duration) {
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
    if let Some(cpu) = thread_cpu() {
        s.cpu_by_thread
            .insert(rustix::thread::gettid().as_raw_nonzero().get(), cpu);
    }
    s.running_for = s.running_for.max(at + took);
}

/// One pass over /proc: (pid, raw command line) of every process in scope with a non-empty
/// command line (kernel threads have none). Never this process itself, nor a pid another scan
/// is handling.
fn scan(shared: &Shared, buf: &mut Vec<u8>) -> Vec<(i32, Vec<u8>)> {
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
        if pid == shared.me {
            continue;
        }
        if !shared
            .in_flight
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(pid)
        {
            continue;
        }
        if in_scope(&shared.scope, pid) && (shared.read)(pid, buf).is_ok() && !buf.is_empty() {
            out.push((pid, buf.clone()));
        }
        shared
            .in_flight
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&pid);
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

    /// A command-line read the kernel holds up (the target's mmap lock held by a descheduled
    /// process, as in a loaded CI bring-up) holds up that pid only: every read of one process
    /// is held for the whole life of a planted 200 ms process, and the other scans still catch
    /// the planted one, with no gap of 200 ms between scans.
    #[test]
    fn a_held_up_read_holds_up_only_its_pid() {
        let mut held = std::process::Command::new("/bin/sleep")
            .arg("30")
            .spawn()
            .expect("spawn the process whose reads are held up");
        let held_pid = held.id() as i32;
        // 0: reads go through; 1: reads of `held` wait; 2: released.
        let gate = Arc::new((Mutex::new(0u8), std::sync::Condvar::new()));
        let set = |state: u8| {
            let (lock, cv) = &*gate;
            *lock.lock().unwrap_or_else(PoisonError::into_inner) = state;
            cv.notify_all();
        };
        let reader_gate = Arc::clone(&gate);
        let sampler = Sampler::start_with(
            Scope {
                roots_under: PathBuf::from("/nonexistent/hiveseed-lab"),
                children_of: Some(std::process::id() as i32),
            },
            Box::new(move |pid, buf| {
                if pid == held_pid {
                    // The stand-in for the kernel's wait on the lock: while the gate is shut
                    // (at most 10 s).
                    let (lock, cv) = &*reader_gate;
                    let state = lock.lock().unwrap_or_else(PoisonError::into_inner);
                    drop(
                        cv.wait_timeout_while(state, Duration::from_secs(10), |s| *s == 1)
                            .unwrap_or_else(PoisonError::into_inner),
                    );
                }
                read_cmdline(pid, buf)
            }),
        )
        .expect("start the sampler");
        // From the next scan on, a scanner waits on `held` until the planted process is gone.
        set(1);
        let present = secret();
        let mut child = planted(&present);
        let pid = child.id() as i32;
        let started = Instant::now();
        assert!(child.wait().expect("wait for it").success());
        let lived = started.elapsed();
        set(2);
        sampler.stop();
        let _ = held.kill();
        let _ = held.wait();
        let stats = sampler.stats();
        eprintln!("planted process lived {lived:?}; {stats}");
        let leaks = sampler.leaks(&[("planted".to_owned(), present)]);
        assert_eq!(
            leaks.iter().map(|l| l.pid).collect::<Vec<_>>(),
            [pid],
            "{leaks:?}"
        );
        // One scan was held for about the planted process's life (it began within a tick).
        assert!(stats.scan_max + 2 * INTERVAL >= lived, "{stats}");
        assert!(stats.gap_max < Duration::from_millis(200), "{stats}");
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
