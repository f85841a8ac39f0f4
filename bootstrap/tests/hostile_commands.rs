//! Commands the agent runs on a node whose service users may be hostile (issue #15 item 4), on
//! the real machine as root, with real unprivileged users made for the test: a guard that hangs
//! is killed with its whole session, output is capped, and no environment, fd, terminal or
//! session of the agent reaches the child, which gets its user's supplementary groups.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use hiveseed_bootstrap::host::{Exec, HostError};
use hiveseed_bootstrap::resources::command;
use hiveseed_bootstrap::spawn::{session_members, OUTPUT_CAP, PATH};
use hiveseed_bootstrap::{Host, RealHost};
use hiveseed_proto::Resource;

fn require_root() {
    assert!(
        rustix::process::geteuid().is_root(),
        "these tests drop privileges to a user they create: run them as root"
    );
}

/// The machine itself: commands run in the agent's mount namespace whatever the root.
fn host() -> RealHost {
    require_root();
    RealHost::new("/").unwrap()
}

static SERIAL: AtomicU32 = AtomicU32::new(0);

/// A real user (and a group it is a supplementary member of), removed on drop even when the
/// test fails.
struct TestUser {
    name: String,
    extra_group: String,
}

fn run_admin(argv: &[&str]) {
    // Another test may hold /etc/passwd's lock for a moment: retry on that only.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = std::process::Command::new(argv[0])
            .args(&argv[1..])
            .output()
            .unwrap();
        if out.status.success() {
            return;
        }
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("lock") && Instant::now() < deadline,
            "{argv:?}: {}: {err}",
            out.status
        );
        std::thread::yield_now();
    }
}

impl TestUser {
    fn new() -> Self {
        require_root();
        let n = SERIAL.fetch_add(1, Ordering::Relaxed);
        let suffix = format!("{}-{n}", std::process::id());
        let name = format!("hs-cmd-{suffix}");
        let extra_group = format!("hs-cmdg-{suffix}");
        run_admin(&["groupadd", "--system", &extra_group]);
        let user = Self {
            name: name.clone(),
            extra_group: extra_group.clone(),
        };
        run_admin(&[
            "useradd",
            "--system",
            "--user-group",
            "--groups",
            &extra_group,
            "--home-dir",
            "/nonexistent",
            "--shell",
            "/usr/sbin/nologin",
            &name,
        ]);
        user
    }

    fn gid_of(&self, group: &str) -> u32 {
        host().lookup_group(group).unwrap().unwrap()
    }
}

impl Drop for TestUser {
    fn drop(&mut self) {
        let _ = std::process::Command::new("userdel")
            .arg(&self.name)
            .output();
        let _ = std::process::Command::new("groupdel")
            .arg(&self.extra_group)
            .output();
    }
}

fn stdout_as(user: Option<&TestUser>, argv: &[&str]) -> String {
    let exec = Exec::new(argv.iter().copied())
        .user(user.map(|u| u.name.clone()))
        .timeout(Duration::from_secs(30));
    let out = host().exec(&exec).unwrap().check(&exec).unwrap();
    out.stdout_str()
}

/// The real host with every command's timeout cut to `limit`, so a guard's hang is measured in
/// seconds instead of [`Exec::OBSERVE_TIMEOUT`].
#[derive(Debug)]
struct ShortTimeouts {
    inner: RealHost,
    limit: Duration,
}

impl Host for ShortTimeouts {
    fn read_limited(
        &self,
        p: &hiveseed_proto::AbsPath,
        cap: u64,
    ) -> Result<Option<Vec<u8>>, HostError> {
        self.inner.read_limited(p, cap)
    }
    fn stat(
        &self,
        p: &hiveseed_proto::AbsPath,
    ) -> Result<Option<hiveseed_bootstrap::host::Stat>, HostError> {
        self.inner.stat(p)
    }
    fn write_atomic(
        &self,
        p: &hiveseed_proto::AbsPath,
        c: &[u8],
        a: hiveseed_bootstrap::host::Attrs,
    ) -> Result<(), HostError> {
        self.inner.write_atomic(p, c, a)
    }
    fn stage_file(
        &self,
        p: &hiveseed_proto::AbsPath,
        a: hiveseed_bootstrap::host::Attrs,
    ) -> Result<hiveseed_bootstrap::host::StagedFile, HostError> {
        self.inner.stage_file(p, a)
    }
    fn commit_staged(&self, s: hiveseed_bootstrap::host::StagedFile) -> Result<(), HostError> {
        self.inner.commit_staged(s)
    }
    fn mkdir(
        &self,
        p: &hiveseed_proto::AbsPath,
        a: hiveseed_bootstrap::host::Attrs,
    ) -> Result<(), HostError> {
        self.inner.mkdir(p, a)
    }
    fn chmod(
        &self,
        p: &hiveseed_proto::AbsPath,
        m: hiveseed_proto::FileMode,
        observed: &hiveseed_bootstrap::host::Stat,
    ) -> Result<(), HostError> {
        self.inner.chmod(p, m, observed)
    }
    fn chown(
        &self,
        p: &hiveseed_proto::AbsPath,
        o: hiveseed_bootstrap::host::Owner,
        observed: &hiveseed_bootstrap::host::Stat,
    ) -> Result<(), HostError> {
        self.inner.chown(p, o, observed)
    }
    fn remove(&self, p: &hiveseed_proto::AbsPath) -> Result<(), HostError> {
        self.inner.remove(p)
    }
    fn open_append(
        &self,
        p: &hiveseed_proto::AbsPath,
        m: hiveseed_proto::FileMode,
    ) -> Result<std::fs::File, HostError> {
        self.inner.open_append(p, m)
    }
    fn dir_path(&self, p: &hiveseed_proto::AbsPath) -> Result<PathBuf, HostError> {
        self.inner.dir_path(p)
    }
    fn exec(&self, exec: &Exec) -> Result<hiveseed_bootstrap::host::ExecOutput, HostError> {
        let mut e = exec.clone();
        e.timeout = e.timeout.min(self.limit);
        self.inner.exec(&e)
    }
}

/// A `unless` guard run as a service user that never ends (here: it forks a background child
/// and blocks, as a guard reading a FIFO the user planted would) fails observation with an error
/// naming the timeout, within a deadline, and leaves no process of its session behind.
#[test]
fn a_hanging_guard_times_out_and_its_whole_session_is_killed() {
    let user = TestUser::new();
    let dir = tempfile::tempdir().unwrap();
    let pid_file = dir.path().join("pid");
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )
    .unwrap();
    let script = format!(
        "echo $$ > {}; /bin/sleep 1000 & /bin/sleep 1000",
        pid_file.display()
    );
    let Resource::Command(c) = common::res(serde_json::json!({
        "kind": "command", "id": "cmd:hang", "argv": ["/bin/true"],
        "unless": ["/bin/sh", "-c", script], "user": user.name,
    })) else {
        unreachable!()
    };
    let host = ShortTimeouts {
        inner: host(),
        limit: Duration::from_secs(2),
    };
    let (tx, rx) = std::sync::mpsc::channel();
    let started = Instant::now();
    std::thread::spawn(move || {
        let _ = tx.send(command::observe(&host, &c));
    });
    let observed = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("the guard was still running 20 s after it started: no timeout stopped it");
    let err = observed.expect_err("a guard killed for its timeout must not count as an answer");
    assert!(matches!(err, HostError::Timeout { .. }), "{err}");
    let msg = err.to_string();
    assert!(msg.contains("/bin/sh -c") && msg.contains("2s"), "{msg}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );

    let leader: i32 = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let sid = rustix::process::Pid::from_raw(leader).unwrap();
    let left = session_members(sid);
    assert!(
        left.is_empty(),
        "processes of the guard's session still alive: {left:?}"
    );
}

/// The agent's peak memory (VmHWM) in bytes.
fn peak_rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .unwrap()
        .trim()
        .trim_end_matches(" kB")
        .parse()
        .unwrap();
    kb * 1024
}

/// A command streaming 256 MiB (a hostile file it cats, say) is stopped at the cap on stdout,
/// and on stderr, with an error naming the cap; the agent's memory does not grow with the flood.
#[test]
fn a_flooding_command_is_stopped_at_the_output_cap() {
    let host = host();
    let before = peak_rss();
    for (script, stream) in [
        ("/usr/bin/head -c 268435456 /dev/zero", "stdout"),
        ("/usr/bin/head -c 268435456 /dev/zero >&2", "stderr"),
    ] {
        let exec = Exec::new(["/bin/sh", "-c", script]).timeout(Duration::from_secs(60));
        match host.exec(&exec) {
            Err(e @ HostError::OutputCap { .. }) => {
                let msg = e.to_string();
                assert!(
                    msg.contains(stream) && msg.contains(&OUTPUT_CAP.to_string()),
                    "{msg}"
                );
            }
            Err(e) => panic!("{script}: {e}"),
            Ok(out) => panic!(
                "{script}: ran to the end, {} bytes of stdout and {} of stderr kept",
                out.stdout.len(),
                out.stderr.len()
            ),
        }
    }
    let grown = peak_rss().saturating_sub(before);
    assert!(
        grown < 64 << 20,
        "peak memory grew by {grown} bytes during the floods"
    );
}

/// Nothing of the agent's environment reaches a command: a secret-looking variable of the
/// agent is absent from the user command's environment, which is exactly the fixed one.
#[test]
fn the_agent_environment_does_not_leak_into_a_user_command() {
    let user = TestUser::new();
    std::env::set_var("HIVESEED_TEST_LEAK_TOKEN", "s3cr3t-token-value");
    let env = stdout_as(Some(&user), &["/usr/bin/env"]);
    let environ = stdout_as(Some(&user), &["/bin/cat", "/proc/self/environ"]);
    for text in [&env, &environ] {
        assert!(
            !text.contains("s3cr3t-token-value"),
            "the agent's variable reached the command: {text}"
        );
    }
    let mut vars: Vec<&str> = env.lines().collect();
    vars.sort_unstable();
    let path = format!("PATH={PATH}");
    let user_var = format!("USER={}", user.name);
    let logname = format!("LOGNAME={}", user.name);
    let mut want = vec![
        "HOME=/nonexistent",
        "LANG=C.UTF-8",
        logname.as_str(),
        path.as_str(),
        user_var.as_str(),
    ];
    want.sort_unstable();
    assert_eq!(vars, want);
}

/// A bare program name comes from the fixed PATH, never the agent's: a directory the agent's
/// PATH puts first, holding an `id` of its own, is not searched.
#[test]
fn a_bare_program_name_ignores_the_agents_path() {
    let dir = tempfile::tempdir().unwrap();
    let fake = dir.path().join("id");
    std::fs::write(&fake, "#!/bin/sh\necho hijacked\n").unwrap();
    std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let old = std::env::var("PATH").unwrap_or_default();
    std::env::set_var("PATH", format!("{}:{old}", dir.path().display()));
    let out = stdout_as(None, &["id", "-u"]);
    assert_eq!(out.trim(), "0", "`id` came from the agent's PATH");
}

/// An fd the agent holds without close-on-exec (inherited from whoever started it) is not
/// open in the command: it sees 0, 1, 2 and only what it opened itself.
#[test]
fn an_inherited_fd_does_not_leak_into_a_user_command() {
    let user = TestUser::new();
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("agent-private-file");
    std::fs::File::create(&secret)
        .unwrap()
        .write_all(b"x")
        .unwrap();
    // No O_CLOEXEC: what an fd inherited from the agent's parent looks like.
    let leaked = rustix::fs::open(
        &secret,
        rustix::fs::OFlags::RDONLY,
        rustix::fs::Mode::empty(),
    )
    .unwrap();
    assert!(!rustix::io::fcntl_getfd(&leaked)
        .unwrap()
        .contains(rustix::io::FdFlags::CLOEXEC));
    // `ls -l` of the child's own fd table: fd 3 is ls's handle on that directory.
    let listing = stdout_as(Some(&user), &["/bin/ls", "-l", "/proc/self/fd/"]);
    assert!(
        !listing.contains("agent-private-file"),
        "the agent's fd is open in the command:\n{listing}"
    );
    for line in listing.lines().filter(|l| l.contains(" -> ")) {
        let (left, target) = line.split_once(" -> ").unwrap();
        let fd: u32 = left.rsplit(' ').next().unwrap().parse().unwrap();
        assert!(
            fd <= 2 || target.starts_with("/proc/"),
            "fd {fd} -> {target} open in the command:\n{listing}"
        );
    }
    drop(leaked);
}

/// A command starts its own session (its session id is its pid) without a controlling
/// terminal, so it can neither read the operator's terminal nor outlive a kill of its group by
/// moving to another group of the agent's session.
#[test]
fn a_command_runs_in_a_new_session_without_a_terminal() {
    let user = TestUser::new();
    let stat = stdout_as(Some(&user), &["/bin/cat", "/proc/self/stat"]);
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    let pid: i32 = stat.split(' ').next().unwrap().parse().unwrap();
    let (session, tty): (i32, i32) = (f[3].parse().unwrap(), f[4].parse().unwrap());
    assert_eq!(session, pid, "not a session leader: {stat}");
    assert_eq!(tty, 0, "has a controlling terminal: {stat}");
    // The test's own session id from /proc, not getsid(): where the session leader lives
    // outside this pid namespace (a CI container) the kernel reports 0, which rustix's
    // getsid refuses with a panic.
    let own = std::fs::read_to_string("/proc/self/stat").unwrap();
    let own_rest = &own[own.rfind(')').unwrap() + 2..];
    let agent_sid: i32 = own_rest.split(' ').nth(3).unwrap().parse().unwrap();
    assert_ne!(
        session, agent_sid,
        "the command stayed in the test's session"
    );
}

/// A command as a user gets that user's supplementary groups, as `initgroups` gives them (std's
/// `uid()`/`gid()` would clear them), and no group of the agent's.
#[test]
fn a_user_command_gets_the_users_supplementary_groups() {
    let user = TestUser::new();
    let extra = user.gid_of(&user.extra_group);
    let primary = user.gid_of(&user.name);
    let ids = stdout_as(Some(&user), &["/usr/bin/id", "-G"]);
    let mut got: Vec<u32> = ids.split_whitespace().map(|g| g.parse().unwrap()).collect();
    got.sort_unstable();
    let mut want = vec![primary, extra];
    want.sort_unstable();
    assert_eq!(got, want, "`id -G` as {}", user.name);
    let uid = stdout_as(Some(&user), &["/usr/bin/id", "-u"]);
    let entry = host().lookup_user(&user.name).unwrap().unwrap();
    assert_eq!(uid.trim(), entry.uid.to_string());
}

/// The trusted CA comes from the seeder's answer, never from the certificate file its owner
/// (`ai-memory`) can rewrite: after the owner appends a CA of its own to client.pem, a missing
/// ca.pem is written again from a fresh answer, root-owned 0644, with the campaign CA only.
#[tokio::test]
async fn the_trusted_ca_never_comes_from_a_file_the_certificate_owner_writes() {
    use std::os::unix::fs::MetadataExt;
    require_root();
    let root = common::temp_root();
    let host = RealHost::new(root.path()).unwrap();
    let ca = common::TestCa::new();
    let m = common::manifest(vec![common::res(serde_json::json!({
        "kind": "certificate", "id": "cert:client", "purpose": "client",
        "key_path": "/etc/ai-memory/tls/client.key",
        "cert_path": "/etc/ai-memory/tls/client.pem", "key_mode": "0400",
        "owner": {"owner": "postgres", "group": "postgres"},
        "ca_path": "/etc/ai-memory/tls/ca.pem",
    }))]);
    let mut env = common::Env::new(&host);
    env.signer = &ca;
    env.converge(&m).await;
    let ca_file = root.path().join("etc/ai-memory/tls/ca.pem");
    assert_eq!(std::fs::read_to_string(&ca_file).unwrap(), ca.cert_pem);
    let meta = std::fs::metadata(&ca_file).unwrap();
    assert_eq!((meta.uid(), meta.mode() & 0o7777), (0, 0o644));

    // The owner plants its own CA after the leaf; ca.pem goes missing.
    let attacker = common::TestCa::new();
    let client = root.path().join("etc/ai-memory/tls/client.pem");
    let mut planted = std::fs::read_to_string(&client).unwrap();
    planted.push_str(&attacker.cert_pem);
    std::fs::write(&client, planted).unwrap();
    std::fs::remove_file(&ca_file).unwrap();
    env.converge(&m).await;
    let trusted = std::fs::read_to_string(&ca_file).unwrap();
    assert!(
        !trusted.contains(attacker.cert_pem.trim()),
        "the planted CA became trusted"
    );
    assert_eq!(trusted, ca.cert_pem);
}

/// A `sql` check connects as root to the socket in `/var/run/postgresql`, a directory postgres
/// owns. A link planted there to another socket of the node (here one root serves), or a socket
/// served by another account, is refused with the path named, and the other socket never sees a
/// connection.
#[tokio::test]
async fn a_sql_check_refuses_a_socket_postgres_could_have_planted() {
    use hiveseed_bootstrap::resources::check::run_check;
    use hiveseed_bootstrap::{CheckEnv, ServiceManager};
    use std::os::unix::net::UnixListener;
    let user = TestUser::new();
    let uid = host().lookup_user(&user.name).unwrap().unwrap().uid;
    let root = common::temp_root();
    let sock_dir = root.path().join("var/run/postgresql");
    std::fs::create_dir_all(&sock_dir).unwrap();
    std::os::unix::fs::chown(&sock_dir, Some(uid), None).unwrap();
    let host = RealHost::new(root.path()).unwrap();
    let node = common::node();
    let env = CheckEnv {
        host: &host,
        node: &node,
        manager: ServiceManager::Supervisor,
        supervisor: None,
        timeout: Duration::from_secs(3),
    };
    let Resource::Check(check) = common::res(serde_json::json!({
        "kind": "check", "id": "check:v", "check": "store.pg_version", "expected": "15",
        "probe": {"type": "sql", "dbname": "postgres", "user": "postgres", "query": "SELECT 1"},
    })) else {
        unreachable!()
    };
    let elsewhere = tempfile::tempdir().unwrap();
    let socket = sock_dir.join(".s.PGSQL.5432");

    // A link to a socket root serves elsewhere.
    let target = elsewhere.path().join("root-service.sock");
    let root_service = UnixListener::bind(&target).unwrap();
    root_service.set_nonblocking(true).unwrap();
    std::os::unix::fs::symlink(&target, &socket).unwrap();
    let got = run_check(&env, &check).await.got;
    assert!(
        root_service.accept().is_err(),
        "the check connected through the planted link (GOT {got})"
    );
    assert!(
        got.contains("refusing") && got.contains(".s.PGSQL.5432") && got.contains("not a socket"),
        "{got}"
    );

    // A real socket in the directory, owned like it, but served by root, not its owner.
    std::fs::remove_file(&socket).unwrap();
    let impostor = UnixListener::bind(&socket).unwrap();
    impostor.set_nonblocking(true).unwrap();
    std::os::unix::fs::lchown(&socket, Some(uid), None).unwrap();
    let got = run_check(&env, &check).await.got;
    assert!(
        got.contains("refusing")
            && got.contains(&format!(
                "served by uid 0, not by the directory's owner uid {uid}"
            )),
        "{got}"
    );
}
