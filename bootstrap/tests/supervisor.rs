//! The supervisor with real child processes (small /bin/sh scripts written by each test).
//! Every wait is on a condition with a deadline, never a fixed sleep.

#![allow(clippy::unwrap_used)] // test helpers outside #[test] fns

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use hiveseed_bootstrap::host::fake::FakeHost;
use hiveseed_bootstrap::resources::service::restart_counts;
use hiveseed_bootstrap::supervisor::{Exit, StartOutcome, State};
use hiveseed_bootstrap::{Host, RealHost, ServiceManager, Supervisor, SupervisorSettings};
use hiveseed_proto::ServiceRestarts;
use serde_json::json;

const DEADLINE: Duration = Duration::from_secs(10);

struct Fixture {
    root: tempfile::TempDir,
    host: Arc<dyn Host>,
}

impl Fixture {
    fn new() -> Self {
        let root = temp_root();
        let host: Arc<dyn Host> = Arc::new(RealHost::new(root.path()).unwrap());
        Self { root, host }
    }

    fn path(&self, rel: &str) -> std::path::PathBuf {
        self.root.path().join(rel)
    }

    /// Host path of a script written under the root.
    fn script(&self, name: &str, body: &str) -> String {
        let p = self.path(name);
        std::fs::write(&p, body).unwrap();
        p.to_str().unwrap().to_owned()
    }

    fn unit(&self, name: &str, text: &str) {
        let dir = self.path("etc/systemd/system");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(name), text).unwrap();
    }

    fn supervisor(&self) -> Supervisor {
        Supervisor::new(
            self.host.clone(),
            SupervisorSettings {
                backoff_cap: Duration::from_millis(500),
                launcher: env!("CARGO_BIN_EXE_bootstrap").into(),
                ..SupervisorSettings::default()
            },
        )
    }
}

fn alive(pid: u32) -> bool {
    // A zombie still has a /proc entry; count it as gone.
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        !s.rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z')
    })
}

/// Processes whose command line contains `needle`, not counting a forked child that has not
/// exec'd yet (it briefly shares its parent's cmdline: `sh` forking for `sleep`).
fn count_cmdline(needle: &str) -> usize {
    let matching: Vec<(u32, u32)> = std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(Result::ok)
        .filter_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let cmd = std::fs::read(e.path().join("cmdline")).ok()?;
            if !String::from_utf8_lossy(&cmd)
                .replace('\0', " ")
                .contains(needle)
            {
                return None;
            }
            let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
            let ppid = stat
                .rsplit(')')
                .next()?
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()?;
            alive(pid).then_some((pid, ppid))
        })
        .collect();
    matching
        .iter()
        .filter(|(_, ppid)| !matching.iter().any(|(pid, _)| pid == ppid))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_loop_restarts_with_exponential_backoff_and_respects_prevent_status() {
    let fx = Fixture::new();
    let counter = fx.path("starts");
    let script = fx.script(
        "crash.sh",
        &format!("echo start >> {}\nexit 1\n", counter.display()),
    );
    fx.unit(
        "crash.service",
        &format!("[Service]\nExecStart=/bin/sh {script}\nRestart=on-failure\nRestartSec=20ms\n"),
    );
    let sup = fx.supervisor();
    assert!(matches!(
        sup.start("crash.service").await.unwrap(),
        StartOutcome::Started { .. }
    ));
    // The 5th start follows the 4th run's exit, so 4 runs have written their line.
    let s = wait_status(&sup, "crash.service", "5 starts", DEADLINE, |s| {
        s.starts >= 5
    })
    .await;
    let ms: Vec<u128> = s.restart_delays.iter().map(Duration::as_millis).collect();
    assert_eq!(&ms[..3], [20, 40, 80], "{ms:?}");
    assert_eq!(s.last_exit, Some(Exit::Code(1)));
    sup.stop("crash.service").await.unwrap();
    let runs = std::fs::read_to_string(&counter).unwrap().lines().count();
    assert!(runs >= 4, "{runs}");

    // RestartPreventExitStatus: exit 75 is final.
    let script = fx.script("tempfail.sh", "exit 75\n");
    fx.unit(
        "tempfail.service",
        &format!("[Service]\nExecStart=/bin/sh {script}\nRestart=on-failure\nRestartSec=10ms\nRestartPreventExitStatus=75\n"),
    );
    sup.start("tempfail.service").await.unwrap();
    let s = wait_status(&sup, "tempfail.service", "exited", DEADLINE, |s| {
        s.state == State::Exited
    })
    .await;
    assert_eq!((s.starts, s.last_exit), (1, Some(Exit::Code(75))));
    assert!(s.restart_delays.is_empty());
    assert!(!sup.is_active("tempfail.service"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_uses_the_units_kill_signal_and_escalates_to_sigkill() {
    let fx = Fixture::new();
    let marker = fx.path("stopped");
    let ready = fx.path("ready");
    let script = fx.script(
        "graceful.sh",
        &format!(
            "trap 'echo stopped-by-sigint > {m}; exit 0' INT\ntrap 'echo wrong-signal > {m}; exit 0' TERM\necho up > {r}\nwhile :; do sleep 1; done\n",
            m = marker.display(),
            r = ready.display()
        ),
    );
    fx.unit(
        "graceful.service",
        &format!("[Service]\nExecStart=/bin/sh {script}\nKillSignal=SIGINT\nTimeoutStopSec=10\nRestart=always\n"),
    );
    let sup = fx.supervisor();
    sup.start("graceful.service").await.unwrap();
    wait_file(&ready, DEADLINE).await;
    let pid = sup.status("graceful.service").unwrap().pid.unwrap();
    let pidfile = std::fs::read_to_string(fx.path("run/hiveseed/graceful.service.pid")).unwrap();
    let rec: serde_json::Value = serde_json::from_str(&pidfile).unwrap();
    assert_eq!(rec["pid"], pid, "{pidfile}");
    sup.stop("graceful.service").await.unwrap();
    assert_eq!(wait_file(&marker, DEADLINE).await, "stopped-by-sigint\n");
    let s = sup.status("graceful.service").unwrap();
    assert_eq!(
        (s.state, s.last_exit, s.starts),
        (State::Stopped, Some(Exit::Code(0)), 1)
    );
    assert!(!alive(pid));
    assert!(!fx.path("run/hiveseed/graceful.service.pid").exists());

    // A child that ignores KillSignal is killed after TimeoutStopSec.
    let ready2 = fx.path("ready2");
    let script = fx.script(
        "stubborn.sh",
        &format!(
            "trap '' INT\necho up > {}\nwhile :; do sleep 1; done\n",
            ready2.display()
        ),
    );
    fx.unit(
        "stubborn.service",
        &format!(
            "[Service]\nExecStart=/bin/sh {script}\nKillSignal=SIGINT\nTimeoutStopSec=200ms\n"
        ),
    );
    sup.start("stubborn.service").await.unwrap();
    wait_file(&ready2, DEADLINE).await;
    sup.stop("stubborn.service").await.unwrap();
    assert_eq!(
        sup.status("stubborn.service").unwrap().last_exit,
        Some(Exit::Signal(9))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn environment_file_expands_into_argv_and_secrets_stay_out_of_cmdline() {
    let fx = Fixture::new();
    std::fs::write(
        fx.path("etc/app.env"),
        "GREETING=hello world\nARGS=-a -b\nAPP_SECRET=hunter2-very-secret\n",
    )
    .unwrap();
    std::fs::set_permissions(
        fx.path("etc/app.env"),
        std::os::unix::fs::PermissionsExt::from_mode(0o400),
    )
    .unwrap();
    let out = fx.path("args");
    let script = fx.script(
        "args.sh",
        &format!(
            "echo log-line-from-child\nfor a in \"$@\"; do echo \"[$a]\"; done > {o}.tmp\necho \"secret-len=${{#APP_SECRET}}\" >> {o}.tmp\nmv {o}.tmp {o}\nwhile :; do sleep 1; done\n",
            o = out.display()
        ),
    );
    fx.unit(
        "args.service",
        &format!("[Service]\nEnvironment=UNIT_VAR=from-unit\nEnvironmentFile=/etc/app.env\nEnvironmentFile=-/etc/missing.env\nExecStart=/bin/sh {script} ${{GREETING}} $ARGS ${{UNIT_VAR}}\nKillSignal=SIGTERM\n"),
    );
    let sup = fx.supervisor();
    sup.start("args.service").await.unwrap();
    let got = wait_file(&out, DEADLINE).await;
    assert_eq!(
        got, "[hello world]\n[-a]\n[-b]\n[from-unit]\nsecret-len=19\n",
        "argv as systemd expands it; the secret arrives through the environment"
    );
    let pid = sup.status("args.service").unwrap().pid.unwrap();
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    assert!(!String::from_utf8_lossy(&cmdline).contains("hunter2"));
    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    assert!(String::from_utf8_lossy(&environ).contains("APP_SECRET=hunter2-very-secret"));
    // The unit's logger copies the child's output to the log file on its own task: the line
    // reaches the file some time after the child wrote it, so wait for it with a deadline.
    let log_path = fx.path("var/log/hiveseed/args.service.log");
    common::eventually("the child's line in args.service.log", DEADLINE, || {
        let p = log_path.clone();
        async move { std::fs::read_to_string(&p).is_ok_and(|l| l.contains("log-line-from-child")) }
    })
    .await;
    sup.stop("args.service").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_agent_adopts_the_running_child_instead_of_starting_another() {
    let fx = Fixture::new();
    let ready = fx.path("ready");
    let script = fx.script(
        "daemon.sh",
        &format!("echo up > {}\nwhile :; do sleep 1; done\n", ready.display()),
    );
    let unit_text = format!(
        "[Service]\nEnvironmentFile=/etc/app.env\nExecStart=/bin/sh {script} --id ${{ID}}\nRestart=on-failure\nRestartSec=10ms\nKillSignal=SIGTERM\n"
    );
    let m = manifest(vec![
        res(
            json!({"kind": "file", "id": "file:env", "path": "/etc/app.env", "mode": "0400",
                   "secret": true, "content": {"type": "text", "text": "ID=peer-01\n"}}),
        ),
        res(
            json!({"kind": "service", "id": "service:app", "unit": "app.service",
                   "unit_text": unit_text, "notify": ["file:env"]}),
        ),
    ]);
    let needle = format!("{script} --id peer-01");

    let first = fx.supervisor();
    {
        let mut env = Env::new(fx.host.as_ref());
        env.supervisor = Some(&first);
        env.converge(&m).await;
    }
    wait_file(&ready, DEADLINE).await;
    let pid = first.status("app.service").unwrap().pid.unwrap();
    eventually("1 instance(s)", DEADLINE, || async {
        count_cmdline(&needle) == 1
    })
    .await;
    drop(first); // the agent goes away; its child stays

    let second = fx.supervisor();
    let recovered = second.recover(["app.service"]).await;
    assert_eq!(recovered.len(), 1);
    assert_eq!(
        recovered[0].1.as_ref().unwrap(),
        &StartOutcome::Adopted { pid }
    );
    let s = second.status("app.service").unwrap();
    assert_eq!((s.adopted, s.starts, s.pid), (true, 0, Some(pid)));
    // The plan sees it running: nothing to do, and still exactly one instance.
    let mut env = Env::new(fx.host.as_ref());
    env.supervisor = Some(&second);
    let p = env.plan(&m).await;
    assert!(p.is_empty(), "{p}");
    assert_eq!(
        second.start("app.service").await.unwrap(),
        StartOutcome::AlreadyRunning
    );
    eventually("1 instance(s)", DEADLINE, || async {
        count_cmdline(&needle) == 1
    })
    .await;

    // Its exit is noticed through the pidfd and Restart= applies.
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(pid as i32).unwrap(),
        rustix::process::Signal::KILL,
    )
    .unwrap();
    let s = wait_status(
        &second,
        "app.service",
        "restart after the adopted child died",
        DEADLINE,
        |s| s.starts == 1 && s.pid.is_some_and(|p| p != pid),
    )
    .await;
    assert!(!s.adopted);
    eventually("old instance gone", DEADLINE, || async { !alive(pid) }).await;
    eventually("1 instance(s)", DEADLINE, || async {
        count_cmdline(&needle) == 1
    })
    .await;
    second.stop("app.service").await.unwrap();
    eventually("0 instance(s)", DEADLINE, || async {
        count_cmdline(&needle) == 0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_instance_from_before_the_restart_is_replaced_not_duplicated() {
    let fx = Fixture::new();
    let script = fx.script("d.sh", "while :; do sleep 1; done\n");
    std::fs::write(fx.path("etc/app.env"), "ID=old\n").unwrap();
    fx.unit(
        "app.service",
        &format!("[Service]\nEnvironmentFile=/etc/app.env\nExecStart=/bin/sh {script} ${{ID}}\nKillSignal=SIGTERM\n"),
    );
    let first = fx.supervisor();
    first.start("app.service").await.unwrap();
    let old = first.status("app.service").unwrap().pid.unwrap();
    drop(first);
    // Inputs changed while no agent was running.
    std::fs::write(fx.path("etc/app.env"), "ID=new\n").unwrap();
    let second = fx.supervisor();
    let out = second.start("app.service").await.unwrap();
    assert!(
        matches!(out, StartOutcome::Started { pid } if pid != old),
        "{out:?}"
    );
    eventually("stale instance stopped", DEADLINE, || async { !alive(old) }).await;
    eventually("0 instance(s)", DEADLINE, || async {
        count_cmdline(&format!("{script} old")) == 0
    })
    .await;
    eventually("1 instance(s)", DEADLINE, || async {
        count_cmdline(&format!("{script} new")) == 1
    })
    .await;
    second.stop("app.service").await.unwrap();
}

/// `curator_no_crashloop` reads this: a crash-looping unit's automatic restarts are counted,
/// reported with the checks, kept across an agent restart, and reset by a restart on request
/// (as systemd's `NRestarts`). A unit that keeps running reports 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_loops_restart_count_grows_is_reported_and_survives_an_agent_restart() {
    let fx = Fixture::new();
    let stable = fx.path("stable");
    let ready = fx.path("ready");
    // Crashes until `stable` exists, then runs (as /bin/sh, so a next agent can adopt it).
    let script = fx.script(
        "flaky.sh",
        &format!(
            "[ -e {s} ] || exit 1\necho up > {r}\nwhile :; do sleep 1; done\n",
            s = stable.display(),
            r = ready.display()
        ),
    );
    let steady = fx.script("steady.sh", "while :; do sleep 1; done\n");
    let flaky_unit =
        format!("[Service]\nExecStart=/bin/sh {script}\nRestart=on-failure\nRestartSec=10ms\n");
    let steady_unit = format!("[Service]\nExecStart=/bin/sh {steady}\nRestart=on-failure\n");
    fx.unit("flaky.service", &flaky_unit);
    fx.unit("steady.service", &steady_unit);
    let m = manifest(vec![
        res(
            json!({"kind": "service", "id": "service:flaky", "unit": "flaky.service",
                   "unit_text": flaky_unit}),
        ),
        res(
            json!({"kind": "service", "id": "service:steady", "unit": "steady.service",
                   "unit_text": steady_unit}),
        ),
    ]);
    let counts = |sup: &Supervisor| -> Vec<(String, u32)> {
        restart_counts(&m, fx.host.as_ref(), ServiceManager::Supervisor, Some(sup))
            .into_iter()
            .map(|s| (s.unit, s.restarts))
            .collect()
    };

    let first = fx.supervisor();
    first.start("steady.service").await.unwrap();
    first.start("flaky.service").await.unwrap();
    wait_status(&first, "flaky.service", "5 restarts", DEADLINE, |s| {
        s.restarts >= 5
    })
    .await;
    std::fs::write(&stable, "").unwrap();
    wait_file(&ready, DEADLINE).await;
    let s = first.status("flaky.service").unwrap();
    assert_eq!(s.state, State::Running);
    let n = s.restarts;
    assert!(n >= 5, "{n}");
    assert_eq!(s.starts, n + 1, "one start per automatic restart");
    assert_eq!(
        counts(&first),
        [
            ("flaky.service".to_owned(), n),
            ("steady.service".into(), 0)
        ]
    );
    let persisted = fx.path("run/hiveseed/flaky.service.restarts");
    assert_eq!(
        std::fs::read_to_string(&persisted).unwrap(),
        format!("{n}\n")
    );

    // The agent restarts: the next one adopts the child and the count goes on.
    let mut gone = first.watch("flaky.service").unwrap();
    drop(first);
    while gone.changed().await.is_ok() {}
    let second = fx.supervisor();
    let recovered = second.recover(["flaky.service", "steady.service"]).await;
    assert!(recovered
        .iter()
        .all(|(_, o)| matches!(o, Ok(StartOutcome::Adopted { .. }))));
    assert_eq!(
        counts(&second),
        [
            ("flaky.service".to_owned(), n),
            ("steady.service".into(), 0)
        ]
    );

    // A restart on request starts the count afresh.
    second.restart("flaky.service").await.unwrap();
    assert_eq!(second.status("flaky.service").unwrap().restarts, 0);
    assert!(!persisted.exists());
    second.stop("flaky.service").await.unwrap();
    second.stop("steady.service").await.unwrap();
}

/// Under systemd the count is `systemctl show --property=NRestarts --value <unit>`.
#[tokio::test]
async fn under_systemd_the_count_is_nrestarts() {
    let root = temp_root();
    let host = FakeHost::new(root.path()).unwrap();
    let unit = "ai-memory-curator.service";
    let m = manifest(vec![res(
        json!({"kind": "service", "id": "service:curator", "unit": unit,
               "unit_text": "[Service]\nExecStart=/bin/true\n"}),
    )]);
    host.sys().units.entry(unit.into()).or_default().n_restarts = 5;
    let got = restart_counts(&m, &host, ServiceManager::Systemd, None);
    assert_eq!(
        got,
        [ServiceRestarts {
            unit: unit.into(),
            restarts: 5
        }]
    );
    assert!(host.sys().calls.contains(&vec![
        "systemctl".to_owned(),
        "show".into(),
        "--property=NRestarts".into(),
        "--value".into(),
        unit.into()
    ]));
    hiveseed_bootstrap::resources::service::restart(&host, None, unit, ServiceManager::Systemd)
        .await
        .unwrap();
    assert_eq!(
        restart_counts(&m, &host, ServiceManager::Systemd, None)[0].restarts,
        0
    );
    // Without a supervisor that runs the unit nothing is measured, so nothing is reported.
    assert!(restart_counts(&m, &host, ServiceManager::Supervisor, None).is_empty());
}
