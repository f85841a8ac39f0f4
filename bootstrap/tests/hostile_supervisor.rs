//! The supervisor against its own units (issue #15 item 6), as root with a real unprivileged
//! user created for each test: the unit's processes run as that user and do what a compromised
//! service could. Each test fails against the supervisor as it was before #15 (see the branch
//! report): a `setsid`-ed grandchild survived a stop, a reused pid with the same command line was
//! adopted, the log grew without bound, and supplementary groups were dropped.

#![allow(clippy::unwrap_used)] // test helpers outside #[test] fns

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use hiveseed_bootstrap::supervisor::{StartOutcome, State};
use hiveseed_bootstrap::{Host, RealHost, Supervisor, SupervisorSettings};

const DEADLINE: Duration = Duration::from_secs(15);

fn run(argv: &[&str]) {
    let out = std::process::Command::new(argv[0])
        .args(&argv[1..])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{argv:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A real account (and a supplementary group it is a member of), removed on drop.
struct TestUser {
    name: String,
    extra_group: String,
    uid: u32,
    gid: u32,
    extra_gid: u32,
}

impl TestUser {
    fn new() -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let tag = format!(
            "{}{}",
            std::process::id() % 100_000,
            N.fetch_add(1, Ordering::SeqCst)
        );
        let (name, extra_group) = (format!("hsup{tag}"), format!("hsupg{tag}"));
        run(&["groupadd", &extra_group]);
        run(&[
            "useradd",
            "-M",
            "-U",
            "-s",
            "/usr/sbin/nologin",
            "-G",
            &extra_group,
            &name,
        ]);
        let id = |flag: &str| -> u32 {
            let out = std::process::Command::new("id")
                .args([flag, &name])
                .output()
                .unwrap();
            String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
        };
        let (uid, gid) = (id("-u"), id("-g"));
        let group = std::fs::read_to_string("/etc/group").unwrap();
        let extra_gid = group
            .lines()
            .find_map(|l| {
                let f: Vec<&str> = l.split(':').collect();
                (f[0] == extra_group).then(|| f[2].parse().unwrap())
            })
            .unwrap();
        Self {
            name,
            extra_group,
            uid,
            gid,
            extra_gid,
        }
    }
}

impl Drop for TestUser {
    fn drop(&mut self) {
        // -f: even while a process the test failed to stop still runs as the user.
        let _ = std::process::Command::new("userdel")
            .args(["-f", &self.name])
            .output();
        let _ = std::process::Command::new("groupdel")
            .arg(&self.name)
            .output();
        let _ = std::process::Command::new("groupdel")
            .arg(&self.extra_group)
            .output();
    }
}

/// Processes a test saw, SIGKILLed on drop (through pidfds opened while they ran, so never a
/// reused pid) so a failing test leaks nothing.
#[derive(Default)]
struct Reaper(Vec<std::os::fd::OwnedFd>);

impl Reaper {
    fn watch(&mut self, pid: u32) {
        let pid = rustix::process::Pid::from_raw(pid as i32).unwrap();
        if let Ok(fd) = rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty()) {
            self.0.push(fd);
        }
    }
}

impl Drop for Reaper {
    fn drop(&mut self) {
        for fd in &self.0 {
            let _ = rustix::process::pidfd_send_signal(fd, rustix::process::Signal::KILL);
        }
    }
}

struct Fixture {
    root: tempfile::TempDir,
    host: Arc<dyn Host>,
    user: TestUser,
}

impl Fixture {
    fn new() -> Self {
        let user = TestUser::new();
        let root = temp_root();
        // The unit's user reads its scripts here and writes its markers to out/.
        std::fs::set_permissions(root.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::create_dir(root.path().join("out")).unwrap();
        std::fs::set_permissions(
            root.path().join("out"),
            std::fs::Permissions::from_mode(0o777),
        )
        .unwrap();
        for db in ["etc/passwd", "etc/group"] {
            std::fs::copy(Path::new("/").join(db), root.path().join(db)).unwrap();
        }
        let host: Arc<dyn Host> = Arc::new(RealHost::new(root.path()).unwrap());
        Self { root, host, user }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.root.path().join(rel)
    }

    fn script(&self, name: &str, body: &str) -> String {
        let p = self.path(name);
        std::fs::write(&p, body).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        p.to_str().unwrap().to_owned()
    }

    /// A unit running `exec_start` as the test user.
    fn unit(&self, name: &str, exec_start: &str) {
        let dir = self.path("etc/systemd/system");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join(name),
            format!(
                "[Service]\nUser={}\nExecStart={exec_start}\nTimeoutStopSec=5\n",
                self.user.name
            ),
        )
        .unwrap();
    }

    fn supervisor(&self) -> Supervisor {
        self.supervisor_with(true)
    }

    fn supervisor_with(&self, cgroups: bool) -> Supervisor {
        Supervisor::new(
            self.host.clone(),
            SupervisorSettings {
                launcher: env!("CARGO_BIN_EXE_bootstrap").into(),
                cgroups,
                ..SupervisorSettings::default()
            },
        )
    }
}

/// Alive and not a zombie.
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        !s.rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z')
    })
}

/// Field `n` (1-based, as proc(5) counts) of `/proc/<pid>/stat`.
fn stat_field(pid: u32, n: usize) -> Option<String> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    s.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(n - 3)
        .map(str::to_owned)
}

fn proc_uid(pid: u32) -> Option<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// The unit `escape.service`: its main process sleeps; one grandchild stays in the unit's
/// process group (pid in out/stayer.pid), another leaves the unit's session and process group
/// (`setsid -f` forks, then setsid), is reparented to init when its parent exits, and records its
/// pid in out/escapee.pid.
fn escape_unit(fx: &Fixture) {
    let (esc, stay) = (fx.path("out/escapee.pid"), fx.path("out/stayer.pid"));
    let script = fx.script(
        "escape.sh",
        &format!(
            "(/usr/bin/setsid -f /bin/sh -c 'echo $$ > {e}.tmp && mv {e}.tmp {e}; exec sleep 1000' &)\n\
             (/bin/sh -c 'echo $$ > {s}.tmp && mv {s}.tmp {s}; exec sleep 1000' &)\n\
             exec sleep 1000\n",
            e = esc.display(),
            s = stay.display()
        ),
    );
    fx.unit("escape.service", &format!("/bin/sh {script}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_that_double_forks_into_its_own_session_is_killed_on_stop() {
    let fx = Fixture::new();
    let mut reaper = Reaper::default();
    escape_unit(&fx);
    let sup = fx.supervisor();
    sup.start("escape.service").await.unwrap();
    let main = sup.status("escape.service").unwrap().pid.unwrap();
    reaper.watch(main);
    let marker = fx.path("out/escapee.pid");
    let escapee: u32 = wait_file(&marker, DEADLINE).await.trim().parse().unwrap();
    reaper.watch(escapee);
    // The unit's processes are in its own cgroup (what makes the kill complete).
    let cg = std::fs::read_to_string(format!("/proc/{escapee}/cgroup")).unwrap();
    assert!(
        cg.lines()
            .any(|l| l.starts_with("0::/hiveseed/") && l.ends_with("/escape.service")),
        "escapee {escapee} is not in the unit's cgroup: {cg}"
    );
    // The premise: it runs as the service user, in a session and group of its own.
    eventually("the escapee to exec sleep", DEADLINE, || async {
        std::fs::read_to_string(format!("/proc/{escapee}/comm")).is_ok_and(|c| c == "sleep\n")
    })
    .await;
    assert_eq!(proc_uid(escapee), Some(fx.user.uid));
    let sid = stat_field(escapee, 6).unwrap();
    let pgrp = stat_field(escapee, 5).unwrap();
    assert_ne!(
        sid,
        main.to_string(),
        "escapee {escapee} still in the unit's session"
    );
    assert_ne!(
        pgrp,
        main.to_string(),
        "escapee {escapee} still in the unit's group"
    );

    sup.stop("escape.service").await.unwrap();
    assert!(!alive(main), "main process {main} survived the stop");
    eventually(
        &format!("escapee {escapee} (left the unit's session) to be killed by the stop"),
        DEADLINE,
        || async { !alive(escapee) },
    )
    .await;
}

/// Where cgroup v2 is not usable (a lab chroot has no /sys), a stop reaches the unit's process
/// group only. This pins down exactly what remains then: a process that left the group by
/// `setsid` survives; one that stayed does not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_cgroups_a_stop_kills_the_process_group_and_a_setsid_escapee_remains() {
    let fx = Fixture::new();
    let mut reaper = Reaper::default();
    escape_unit(&fx);
    let sup = fx.supervisor_with(false);
    sup.start("escape.service").await.unwrap();
    let main = sup.status("escape.service").unwrap().pid.unwrap();
    reaper.watch(main);
    let escapee: u32 = wait_file(&fx.path("out/escapee.pid"), DEADLINE)
        .await
        .trim()
        .parse()
        .unwrap();
    reaper.watch(escapee);
    let stayer: u32 = wait_file(&fx.path("out/stayer.pid"), DEADLINE)
        .await
        .trim()
        .parse()
        .unwrap();
    reaper.watch(stayer);
    let cg = std::fs::read_to_string(format!("/proc/{main}/cgroup")).unwrap();
    assert!(!cg.contains("/hiveseed/"), "cgroups were off: {cg}");
    sup.stop("escape.service").await.unwrap();
    assert!(!alive(main), "main process {main} survived the stop");
    eventually(
        &format!("group member {stayer} killed"),
        DEADLINE,
        || async { !alive(stayer) },
    )
    .await;
    assert!(
        alive(escapee),
        "the setsid escapee {escapee} was killed without cgroups: update the supervisor's docs"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adoption_refuses_a_reused_pid_whose_command_line_matches_but_not_its_executable() {
    let fx = Fixture::new();
    let mut reaper = Reaper::default();
    fx.unit("idle.service", "/bin/sleep 1000");
    let first = fx.supervisor();
    first.start("idle.service").await.unwrap();
    let pid = first.status("idle.service").unwrap().pid.unwrap();
    reaper.watch(pid);
    // The agent goes away; its unit dies (SIGKILL by pidfd) while no agent runs.
    drop(first);
    drop(reaper);
    eventually(&format!("pid {pid} to be reaped"), DEADLINE, || async {
        !Path::new(&format!("/proc/{pid}")).exists()
    })
    .await;

    // The service user gets the freed pid for a program of its own (a copy of sleep it
    // controls) whose command line reads exactly as the unit's: /bin/sleep 1000.
    let impostor_exe = fx.path("out/not-sleep");
    std::fs::copy("/bin/sleep", &impostor_exe).unwrap();
    std::fs::set_permissions(&impostor_exe, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut impostor = take_pid(pid, &impostor_exe, fx.user.uid, fx.user.gid);
    let mut reaper = Reaper::default();
    reaper.watch(pid);
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    assert_eq!(
        cmdline, b"/bin/sleep\x001000\x00",
        "premise: same command line"
    );

    let second = fx.supervisor();
    let out = second.start("idle.service").await.unwrap();
    assert!(
        matches!(out, StartOutcome::Started { pid: p } if p != pid),
        "the agent took the service user's process {pid} for its unit: {out:?}"
    );
    second.stop("idle.service").await.unwrap();
    // Refused, and left alone: not ours to signal.
    let alive_after = alive(pid);
    drop(reaper);
    impostor.wait().unwrap();
    assert!(alive_after, "the impostor {pid} was signalled by the stop");
}

/// Spawns `exe` (argv[0] `/bin/sleep`) as `uid` with exactly pid `want`, by setting the pid
/// namespace's last pid just before the fork; retried, since any process on the machine may
/// take the pid first.
fn take_pid(want: u32, exe: &Path, uid: u32, gid: u32) -> std::process::Child {
    use std::os::unix::process::CommandExt;
    for _ in 0..200 {
        std::fs::write("/proc/sys/kernel/ns_last_pid", format!("{}", want - 1)).unwrap();
        let mut child = std::process::Command::new(exe)
            .arg0("/bin/sleep")
            .arg("1000")
            .uid(uid)
            .gid(gid)
            .spawn()
            .unwrap();
        if child.id() == want {
            // cmdline and exe read as the program once it has exec'd.
            let deadline = std::time::Instant::now() + DEADLINE;
            while std::fs::read_link(format!("/proc/{want}/exe")).map_or(true, |p| p != exe) {
                assert!(
                    std::time::Instant::now() < deadline,
                    "impostor did not exec"
                );
                std::thread::yield_now();
            }
            return child;
        }
        let _ = child.kill();
        let _ = child.wait();
    }
    panic!("could not obtain pid {want} for the impostor in 200 tries");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooding_unit_cannot_grow_its_log_past_the_cap() {
    let fx = Fixture::new();
    let cap = SupervisorSettings::default().log_max_bytes;
    // Three times the cap in zeros, then a last line that says the flood is over.
    let script = fx.script(
        "flood.sh",
        &format!("head -c {} /dev/zero\necho\necho FLOOD-END\n", 3 * cap),
    );
    fx.unit("flood.service", &format!("/bin/sh {script}"));
    let sup = fx.supervisor();
    sup.start("flood.service").await.unwrap();
    wait_status(&sup, "flood.service", "the flood to end", DEADLINE, |s| {
        s.state == State::Exited
    })
    .await;
    let log = fx.path("var/log/hiveseed/flood.service.log");
    eventually("FLOOD-END at the end of the log", DEADLINE, || async {
        tail(&log).ends_with("FLOOD-END\n")
    })
    .await;
    let size = |p: &Path| std::fs::metadata(p).map_or(0, |m| m.len());
    let old = fx.path("var/log/hiveseed/flood.service.log.1");
    let (cur, prev) = (size(&log), size(&old));
    assert!(cur <= cap, "flood.service.log is {cur} bytes, cap {cap}");
    assert!(
        prev <= cap,
        "flood.service.log.1 is {prev} bytes, cap {cap}"
    );
    let kept = std::fs::read_dir(fx.path("var/log/hiveseed"))
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with("flood.service.log")
        })
        .count();
    assert_eq!(kept, 2, "the log and one old file");
}

/// The last 64 bytes of a file.
fn tail(p: &Path) -> String {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut f) = std::fs::File::open(p) else {
        return String::new();
    };
    let len = f.metadata().map_or(0, |m| m.len());
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(64)));
    let mut buf = Vec::new();
    let _ = f.read_to_end(&mut buf);
    String::from_utf8_lossy(&buf).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_unit_runs_with_its_users_supplementary_groups() {
    let fx = Fixture::new();
    let out = fx.path("out/groups");
    fx.unit(
        "groups.service",
        &format!(
            "/bin/sh -c \"id -G > {o}.tmp && mv {o}.tmp {o}; exec sleep 1000\"",
            o = out.display()
        ),
    );
    let sup = fx.supervisor();
    sup.start("groups.service").await.unwrap();
    let got = wait_file(&out, DEADLINE).await;
    sup.stop("groups.service").await.unwrap();
    let gids: Vec<u32> = got.split_whitespace().map(|g| g.parse().unwrap()).collect();
    assert!(
        gids.contains(&fx.user.extra_gid),
        "{} is a member of {} (gid {}); the unit ran with groups {gids:?}",
        fx.user.name,
        fx.user.extra_group,
        fx.user.extra_gid
    );
    assert!(gids.contains(&fx.user.gid), "{gids:?}");
    assert!(!gids.contains(&0), "root's group leaked: {gids:?}");
}
