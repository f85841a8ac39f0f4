//! Lab node primitives against the real cached base rootfs (built on first use, ~2 min).
//! Needs root. No fixed sleeps: every wait is a condition with a deadline.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use hiveseed_lab::{mounts, procs, wait, Cache, Lab, NodeName};

/// One build at a time within this process (the cache's flock serializes across processes).
static BASE: Mutex<Option<PathBuf>> = Mutex::new(None);

fn base() -> PathBuf {
    let mut guard = BASE.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(p) = guard.as_ref() {
        return p.clone();
    }
    let (base, outcome) = Cache::from_env().ensure_rootfs().expect("base rootfs");
    eprintln!("base rootfs {outcome}: {}", base.root.display());
    *guard = Some(base.root.clone());
    base.root
}

/// A lab in a temp dir that is always taken down, even when an assertion fails, before the
/// temp dir is deleted (deleting it with mounts inside would walk into the node's /proc).
struct TestLab {
    lab: Lab,
    _dir: tempfile::TempDir,
}

impl TestLab {
    fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("hiveseed-lab-test-")
            .tempdir()
            .expect("temp lab dir");
        Self {
            lab: Lab::open(dir.path()).expect("open lab"),
            _dir: dir,
        }
    }
}

impl Drop for TestLab {
    fn drop(&mut self) {
        if let Err(e) = self.lab.down() {
            eprintln!("teardown in drop failed: {e}");
        }
    }
}

fn name(s: &str) -> NodeName {
    s.parse().expect("node name")
}

fn wait_until(what: &str, deadline: Duration, cond: impl FnMut() -> bool) {
    if let Err(e) = wait::until(what, deadline, cond) {
        panic!("{e}");
    }
}

fn root_of(pid: i32) -> Option<PathBuf> {
    std::fs::read_link(format!("/proc/{pid}/root")).ok()
}

fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    mounts::mount_table()
        .expect("mountinfo")
        .into_iter()
        .map(|m| m.mount_point)
        .filter(|p| p.starts_with(dir))
        .collect()
}

#[test]
fn two_nodes_isolated_writes_background_processes_and_down() {
    let base = base();
    let t = TestLab::new();
    let a = t.lab.node_up(&name("a"), &base).unwrap();
    let b = t.lab.node_up(&name("b"), &base).unwrap();
    assert!(matches!(
        t.lab.node_up(&name("a"), &base),
        Err(hiveseed_lab::LabError::AlreadyUp(_))
    ));

    // Every node has its five mounts, and a fresh, empty-but-for-lock /run.
    let under = mounts_under(t.lab.dir());
    assert_eq!(under.len(), 10, "{under:#?}");
    for n in [&a, &b] {
        for rel in ["", "proc", "dev", "dev/shm", "run"] {
            let p = n.root().join(rel);
            let p = if rel.is_empty() {
                n.root().to_path_buf()
            } else {
                p
            };
            assert!(under.contains(&p), "{} not mounted", p.display());
        }
        let run: Vec<_> = std::fs::read_dir(n.root().join("run"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(run, vec!["lock"]);
    }

    // A write inside node a lands in a's upper dir only.
    let out = a
        .command([
            "/bin/sh",
            "-c",
            "echo hi > /root/x && cat /root/x && head -c 4 /dev/urandom | wc -c",
        ])
        .run()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hi\n4\n");
    assert_eq!(
        std::fs::read_to_string(a.upper().join("root/x")).unwrap(),
        "hi\n"
    );
    assert!(!b.upper().join("root/x").exists());
    assert!(!b.root().join("root/x").exists());
    assert!(!base.join("root/x").exists());

    // A failing command is an error that carries its stderr.
    let err = b
        .command(["/bin/sh", "-c", "echo nope >&2; exit 3"])
        .run()
        .unwrap_err()
        .to_string();
    assert!(err.contains("nope"), "{err}");

    // Workloads: a recorded background process in b, and a daemon that a node-side command
    // detached (re-parented to PID 1, in no state file) in a, like postgres started by an agent.
    let log = b.dir().join("sleep.log");
    let bg = b
        .command(["sleep", "infinity"])
        .spawn_background(&log)
        .unwrap();
    let b_root = b.root().to_path_buf();
    wait_until(
        "background process chrooted into b",
        Duration::from_secs(10),
        || root_of(bg.pid).as_deref() == Some(b_root.as_path()),
    );
    let state = t.lab.state_file().read().unwrap();
    assert!(state.procs.iter().any(|p| p.pid == bg.pid && p.node == "b"));

    a.command(["setsid", "-f", "sleep", "infinity"])
        .run()
        .unwrap();
    // setsid forked the daemon before it exited, and the fork inherited the chroot.
    let detached = procs::rooted_under(a.root());
    assert_eq!(detached.len(), 1, "{detached:?}");

    let report = t.lab.down().unwrap();
    eprintln!("down: {report}");
    assert!(report.lazily_unmounted.is_empty(), "{report}");
    assert_eq!(report.unmounted.len(), 10, "{report}");
    assert!(mounts_under(t.lab.dir()).is_empty());
    assert!(!t.lab.state_file().path().exists());
    for pid in detached.iter().copied().chain([bg.pid]) {
        assert!(
            report.terminated.contains(&pid) || report.killed.contains(&pid),
            "{pid}: {report}"
        );
        assert!(
            !procs::is_alive(pid, None),
            "{pid} still running after down"
        );
    }
    // The upper dir survives down (for inspection).
    assert!(a.upper().join("root/x").exists());

    let again = t.lab.down().unwrap();
    assert_eq!(again, hiveseed_lab::DownReport::default());
}

#[test]
fn down_recovers_without_state_file() {
    let base = base();
    let t = TestLab::new();
    let c = t.lab.node_up(&name("c"), &base).unwrap();
    let bg = c
        .command(["sleep", "infinity"])
        .spawn_background(&c.dir().join("log"))
        .unwrap();
    // A crash long after the start: the process has entered its chroot (until it has, only the
    // state file knows it, and that is what this test takes away).
    hiveseed_lab::wait::until(
        "the process to enter the node",
        std::time::Duration::from_secs(10),
        || hiveseed_lab::procs::rooted_under(&t.lab.nodes_dir()).contains(&bg.pid),
    )
    .unwrap();
    // Simulate a crash that lost the state file.
    std::fs::remove_file(t.lab.state_file().path()).unwrap();
    let report = t.lab.down().unwrap();
    assert!(report.terminated.contains(&bg.pid), "{report}");
    assert_eq!(report.unmounted.len(), 5, "{report}");
    assert!(mounts_under(t.lab.dir()).is_empty());

    // The same name comes back as a fresh node.
    let c = t.lab.node_up(&name("c"), &base).unwrap();
    assert!(!c.dir().join("log").exists());
    t.lab.purge().unwrap();
    assert!(!t.lab.nodes_dir().exists());
}

#[test]
fn offline_postgres_install_from_the_base_archive() {
    let base = base();
    let t = TestLab::new();
    let n = t.lab.node_up(&name("pg"), &base).unwrap();
    let started = Instant::now();
    // The proxy points at a closed port: any download would fail the install.
    let out = n
        .command([
            "apt-get",
            "install",
            "-y",
            "--no-install-recommends",
            "-o",
            "Acquire::http::Proxy=http://127.0.0.1:9",
            "-o",
            "Acquire::https::Proxy=http://127.0.0.1:9",
            "postgresql-17",
            "postgresql-17-pgvector",
            "postgresql-17-age",
        ])
        .env("DEBIAN_FRONTEND", "noninteractive")
        .run()
        .unwrap();
    let took = started.elapsed();
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!(
        "offline install of postgresql-17 + pgvector + age in a node: {:.1}s",
        took.as_secs_f64()
    );
    assert!(stdout.contains("Need to get 0 B"), "{stdout}");
    assert!(!stdout.lines().any(|l| l.starts_with("Get:")), "{stdout}");
    for f in [
        "usr/lib/postgresql/17/bin/postgres",
        "usr/lib/postgresql/17/lib/vector.so",
        "usr/lib/postgresql/17/lib/age.so",
    ] {
        assert!(n.upper().join(f).exists(), "{f} not installed");
    }
    // The base carries no createcluster.d drop-in (the pg role brings its own, before the
    // packages), so here the postinst made 17/main: what the bring-up's "no packaged cluster"
    // check finds on a pg node whose role lost its drop-in. policy-rc.d kept it from starting.
    assert!(!base.join("etc/postgresql-common/createcluster.d").exists());
    let clusters: Vec<PathBuf> = hiveseed_lab::scenario::packaged_clusters(n.root())
        .into_iter()
        .map(|c| c.strip_prefix(n.root()).unwrap().to_path_buf())
        .collect();
    assert_eq!(
        clusters,
        [
            PathBuf::from("etc/postgresql/17/main"),
            PathBuf::from("var/lib/postgresql/17/main")
        ]
    );
    assert!(procs::rooted_under(n.root()).is_empty());
    assert!(!base.join("usr/lib/postgresql").exists());

    // A cluster started by a node-side command (as an agent would) detaches from us; down
    // must still find and stop every postgres process.
    let pg = |args: &[&str]| {
        let mut argv = vec![format!("/usr/lib/postgresql/17/bin/{}", args[0])];
        argv.extend(args[1..].iter().map(|a| (*a).to_owned()));
        n.command(argv)
            .user("postgres:postgres")
            .env("HOME", "/var/lib/postgresql")
            .run()
            .unwrap()
    };
    pg(&[
        "initdb",
        "-D",
        "/var/lib/postgresql/lab",
        "--auth=trust",
        "-U",
        "postgres",
    ]);
    pg(&[
        "pg_ctl",
        "-D",
        "/var/lib/postgresql/lab",
        "-l",
        "/var/lib/postgresql/lab.log",
        "-o",
        "-c listen_addresses='' -c unix_socket_directories=/tmp",
        "-w",
        "start",
    ]);
    let postgres = procs::rooted_under(n.root());
    assert!(
        postgres.len() >= 2,
        "postmaster and its workers: {postgres:?}"
    );

    let report = t.lab.down().unwrap();
    for pid in &postgres {
        assert!(
            !procs::is_alive(*pid, None),
            "{pid} survived down: {report}"
        );
    }
    assert!(mounts_under(t.lab.dir()).is_empty());
}

/// The secrets scan's sampler, scoped as the lab scopes it (processes rooted in the lab dir):
/// a command inside a node that carries a secret in its argv for 200 ms, as
/// `psql "postgres://u:<password>@..."` would, is caught; a secret nothing carried is not
/// reported, nor is a process outside the lab that carries one.
#[test]
fn a_secret_on_a_node_command_line_for_200_ms_is_sampled() {
    use hiveseed_lab::cmdlines::{Sampler, Scope};
    let base = base();
    let t = TestLab::new();
    let n = t.lab.node_up(&name("peer"), &base).unwrap();
    let sampler = Sampler::start(Scope {
        roots_under: t.lab.dir().to_path_buf(),
        children_of: None,
    })
    .unwrap();
    let secret = || hex::encode(rand::random::<[u8; 16]>());
    let (in_node, absent, on_host) = (secret(), secret(), secret());
    let url = |s: &str| format!("postgres://u:{s}@127.0.1.10:5432/ai_memory");
    // sh keeps its argv (the URL as $0 $1) while its child sleeps.
    let started = Instant::now();
    n.command(["/bin/sh", "-c", "sleep 0.2; exit 0", "psql", &url(&in_node)])
        .run()
        .unwrap();
    let lived = started.elapsed();
    let host = std::process::Command::new("/bin/sh")
        .args(["-c", "sleep 0.2; exit 0", "psql", &url(&on_host)])
        .status()
        .unwrap();
    assert!(host.success());
    sampler.stop();
    let stats = sampler.stats();
    eprintln!("planted command ran {lived:?} in the node; sampler: {stats}");
    let leaks = sampler.leaks(&[
        ("pg password".to_owned(), in_node.clone()),
        ("absent secret".to_owned(), absent),
        ("host-side secret".to_owned(), on_host),
    ]);
    let found: Vec<(&str, &str)> = leaks
        .iter()
        .map(|l| (l.label.as_str(), l.program.as_str()))
        .collect();
    assert_eq!(found, [("pg password", "/bin/sh")], "{leaks:?}");
    assert!(!leaks[0].to_string().contains(&in_node), "{}", leaks[0]);
}
