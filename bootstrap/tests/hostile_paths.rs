//! The agent against a service user who controls some of the directories it writes (issue #15
//! items 1, 2, 3, 5, 7): on a real root, as root, with a real unprivileged user created for each
//! test who does the attacker's steps under its own uid (`setpriv`). Each attack runs against
//! both resolutions: a test root as tests use it (`RESOLVE_BENEATH`) and the same root walked as
//! a droplet's `/` is ([`RealHost::with_system_resolution`]).

#![allow(clippy::unwrap_used)] // test helpers outside #[test] fns

mod common;

use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use common::{manifest, res, GROUP, PASSWD};
use hiveseed_bootstrap::host::{Attrs, FileKind, Owner};
use hiveseed_bootstrap::plan::{Action, Plan};
use hiveseed_bootstrap::{
    apply, observe, plan, ApplyEnv, ApplySettings, Host, HostError, ObserveEnv, PlanContext,
    RealHost,
};
use hiveseed_proto::{AbsPath, FileMode, Manifest};
use serde_json::json;

fn p(s: &str) -> AbsPath {
    s.parse().unwrap()
}

fn mode_of(path: &Path) -> u32 {
    std::fs::symlink_metadata(path).unwrap().mode() & 0o7777
}

/// Names in a directory, sorted.
fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

// ---- a real unprivileged user ------------------------------------------------------------------

/// useradd/userdel of concurrent tests take turns on /etc/passwd.
static ACCOUNTS: Mutex<()> = Mutex::new(());
static SEQ: AtomicU32 = AtomicU32::new(0);

/// A system account made for one test and deleted when dropped, even when the test fails.
struct Attacker {
    name: String,
    uid: u32,
    gid: u32,
}

impl Attacker {
    fn new() -> Self {
        assert!(
            rustix::process::geteuid().is_root(),
            "hostile_paths runs as root: the agent is root on a node, and the attacker needs a \
             real account (run the tests as root, as CI does)"
        );
        let name = format!(
            "hs-ap-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::SeqCst)
        );
        let _turn = ACCOUNTS.lock().unwrap_or_else(|e| e.into_inner());
        let out = Command::new("useradd")
            .args([
                "--system",
                "--no-create-home",
                "--user-group",
                "--shell",
                "/usr/sbin/nologin",
                &name,
            ])
            .output()
            .unwrap();
        assert!(out.status.success(), "useradd {name}: {out:?}");
        let id = |flag: &str| -> u32 {
            let out = Command::new("id").args([flag, &name]).output().unwrap();
            String::from_utf8(out.stdout)
                .unwrap()
                .trim()
                .parse()
                .unwrap()
        };
        let (uid, gid) = (id("-u"), id("-g"));
        Self { name, uid, gid }
    }

    /// Runs argv as this user (its uid and gid, no supplementary groups); it must succeed.
    fn run(&self, argv: &[&str]) {
        let out = Command::new("setpriv")
            .arg(format!("--reuid={}", self.uid))
            .arg(format!("--regid={}", self.gid))
            .arg("--clear-groups")
            .arg("--")
            .args(argv)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "as {}: {argv:?}: {}",
            self.name,
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn owner(&self) -> Owner {
        Owner {
            uid: self.uid,
            gid: self.gid,
        }
    }

    fn chown(&self, path: &Path) {
        std::os::unix::fs::lchown(path, Some(self.uid), Some(self.gid)).unwrap();
    }
}

impl Drop for Attacker {
    fn drop(&mut self) {
        let _turn = ACCOUNTS.lock().unwrap_or_else(|e| e.into_inner());
        let _ = Command::new("userdel").arg(&self.name).status();
    }
}

// ---- a node root ---------------------------------------------------------------------------------

/// A node root the attacker can walk into (0755, like `/`), whose passwd names the attacker as
/// `svc`, with `/etc/victim.d`: a root-owned directory whose content root trusts (the
/// `/etc/bash_completion.d` of item 1).
struct Node {
    dir: tempfile::TempDir,
}

impl Node {
    fn new(attacker: &Attacker) -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::create_dir_all(dir.path().join("etc/victim.d")).unwrap();
        std::fs::write(
            dir.path().join("etc/passwd"),
            format!(
                "{PASSWD}svc:x:{}:{}::/nonexistent:/usr/sbin/nologin\n",
                attacker.uid, attacker.gid
            ),
        )
        .unwrap();
        std::fs::write(
            dir.path().join("etc/group"),
            format!("{GROUP}svc:x:{}:\n", attacker.gid),
        )
        .unwrap();
        Self { dir }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel.trim_start_matches('/'))
    }

    /// A directory chain made by root (0755), the last one owned by the attacker (0755).
    fn service_dir(&self, rel: &str, attacker: &Attacker) -> PathBuf {
        let d = self.path(rel);
        std::fs::create_dir_all(&d).unwrap();
        attacker.chown(&d);
        d
    }

    /// The two ways a host resolves this root: as tests root it, and as a droplet's `/`.
    fn hosts(&self) -> [(&'static str, RealHost); 2] {
        [
            ("test root", RealHost::new(self.dir.path()).unwrap()),
            (
                "system resolution",
                RealHost::with_system_resolution(self.dir.path()).unwrap(),
            ),
        ]
    }
}

// ---- one drift pass --------------------------------------------------------------------------

async fn observe_and_plan(host: &dyn Host, m: &Manifest) -> Result<Plan, String> {
    let observed = observe(
        m,
        &ObserveEnv {
            host,
            supervisor: None,
            readiness: &hiveseed_bootstrap::Unavailable,
            probe_timeout: Duration::from_secs(2),
        },
    )
    .await
    .map_err(|e| format!("{:#}", anyhow::Error::new(e)))?;
    plan(m, &observed, &PlanContext::now()).map_err(|e| format!("{:#}", anyhow::Error::new(e)))
}

async fn apply_plan(host: &dyn Host, plan: &Plan) -> Result<(), String> {
    let node = common::node();
    let env = ApplyEnv {
        host,
        node: &node,
        fetcher: &hiveseed_bootstrap::Unavailable,
        signer: &hiveseed_bootstrap::Unavailable,
        issuer: &hiveseed_bootstrap::Unavailable,
        readiness: &hiveseed_bootstrap::Unavailable,
        supervisor: None,
        settings: ApplySettings::default(),
    };
    apply(plan, &env, &mut |_| {})
        .await
        .map(|_| ())
        .map_err(|e| format!("{:#}", anyhow::Error::new(e)))
}

const FED_ID: &str = "do-1461/nyc3/do-1461-peer-nyc3-01";

/// Item 1's example: the node's federation key under `/etc/ai-memory/keys/<campaign>/<region>`,
/// owned by the service.
fn key_manifest() -> Manifest {
    manifest(vec![res(json!({
        "kind": "federation_key", "id": "key:federation", "fed_id": FED_ID,
        "key_dir": "/etc/ai-memory/keys", "owner": {"owner": "svc", "group": "svc"}
    }))])
}

/// The refusal names the path, the directory the service owns, and the rule.
fn assert_unsafe(err: &str, path: &str, dir: &str) {
    assert!(err.contains(path), "{err}");
    assert!(
        err.contains(&format!("in directory {dir}, owned by uid")),
        "{err}"
    );
    assert!(err.contains("only followed through root-owned"), "{err}");
}

// ---- item 1: symlinks in parent directories ----------------------------------------------------

#[tokio::test]
async fn a_symlinked_key_directory_is_refused_and_nothing_is_written_outside() {
    let attacker = Attacker::new();
    let node = Node::new(&attacker);
    let keys = node.service_dir("etc/ai-memory/keys", &attacker);
    attacker.run(&["mkdir", keys.join("do-1461").to_str().unwrap()]);
    for (target, what) in [
        ("../../../victim.d", "relative"),
        ("/etc/victim.d", "absolute"),
    ] {
        let link = keys.join("do-1461/nyc3");
        let _ = std::fs::remove_file(&link);
        attacker.run(&["ln", "-s", target, link.to_str().unwrap()]);
        for (how, host) in node.hosts() {
            let err = match observe_and_plan(&host, &key_manifest()).await {
                Err(e) => e,
                Ok(plan) => apply_plan(&host, &plan)
                    .await
                    .expect_err(&format!("{how}, {what} link: the key was written")),
            };
            assert_unsafe(
                &err,
                "/etc/ai-memory/keys/do-1461/nyc3",
                "/etc/ai-memory/keys",
            );
            assert!(
                names(&node.path("etc/victim.d")).is_empty(),
                "{how}, {what} link: {:?}",
                names(&node.path("etc/victim.d"))
            );
        }
    }
}

#[tokio::test]
async fn a_parent_swapped_for_a_symlink_between_plan_and_apply_is_refused() {
    let attacker = Attacker::new();
    let node = Node::new(&attacker);
    let keys = node.service_dir("etc/ai-memory/keys", &attacker);
    let region = keys.join("do-1461/nyc3");
    attacker.run(&["mkdir", "-p", region.to_str().unwrap()]);
    for (how, host) in node.hosts() {
        let plan = observe_and_plan(&host, &key_manifest()).await.unwrap();
        assert!(
            matches!(
                plan.actions().next(),
                Some(Action::GenerateFederationKey { .. })
            ),
            "{plan}"
        );
        // Between observe and apply (the agent may wait 30 minutes), the region is swapped.
        let moved = keys.join("do-1461/moved");
        attacker.run(&["mv", region.to_str().unwrap(), moved.to_str().unwrap()]);
        attacker.run(&["ln", "-s", "../../../victim.d", region.to_str().unwrap()]);
        let err = apply_plan(&host, &plan).await.expect_err(&format!(
            "{how}: the key was written through the swapped link"
        ));
        assert_unsafe(
            &err,
            "/etc/ai-memory/keys/do-1461/nyc3",
            "/etc/ai-memory/keys",
        );
        assert!(names(&node.path("etc/victim.d")).is_empty(), "{how}");
        attacker.run(&["rm", region.to_str().unwrap()]);
        attacker.run(&["mv", moved.to_str().unwrap(), region.to_str().unwrap()]);
    }
}

/// The CHASE_SAFE rule's other side: links in root-owned, non-writable directories keep
/// working (`/var/run -> /run`), and the same link in a group-writable root directory does not.
#[test]
fn links_through_root_owned_directories_still_resolve() {
    let attacker = Attacker::new();
    let node = Node::new(&attacker);
    std::fs::create_dir_all(node.path("run/app")).unwrap();
    std::fs::create_dir_all(node.path("var")).unwrap();
    symlink("../run", node.path("var/run")).unwrap();
    let host = RealHost::new(node.dir.path()).unwrap();
    host.write_atomic(
        &p("/var/run/app/x.pid"),
        b"42\n",
        Attrs {
            mode: FileMode::new(0o644).unwrap(),
            owner: None,
        },
    )
    .unwrap();
    assert_eq!(std::fs::read(node.path("run/app/x.pid")).unwrap(), b"42\n");
    std::fs::remove_file(node.path("var/run")).unwrap();
    symlink("/run", node.path("var/run")).unwrap();
    let system = RealHost::with_system_resolution(node.dir.path()).unwrap();
    assert_eq!(
        system.read(&p("/var/run/app/x.pid")).unwrap().unwrap(),
        b"42\n"
    );
    std::fs::set_permissions(node.path("var"), std::fs::Permissions::from_mode(0o775)).unwrap();
    let err = system.read(&p("/var/run/app/x.pid")).unwrap_err();
    assert!(
        matches!(&err, HostError::Unsafe { dir, what: "symlink", .. } if dir == "/var"),
        "{err}"
    );
}

// ---- items 2 and 3: chmod and chown act on the object the plan observed ----------------------

/// A file the plan will chmod (0600 on disk, 0640 wanted) and chown, in the service's directory.
fn pem_manifest() -> Manifest {
    manifest(vec![res(json!({
        "kind": "file", "id": "file:pem", "path": "/srv/svc/server.pem", "mode": "0640",
        "owner": {"owner": "svc", "group": "svc"},
        "content": {"type": "text", "text": "pem\n"}
    }))])
}

/// A root-owned 0600 file standing for `/etc/shadow`.
fn shadow(node: &Node) -> PathBuf {
    let s = node.path("etc/shadow");
    std::fs::write(&s, "root:*:1::::::\n").unwrap();
    std::fs::set_permissions(&s, std::fs::Permissions::from_mode(0o600)).unwrap();
    s
}

fn assert_untouched(shadow: &Path) {
    let m = std::fs::metadata(shadow).unwrap();
    assert_eq!((m.mode() & 0o7777, m.uid(), m.gid()), (0o600, 0, 0));
}

#[tokio::test]
async fn a_file_swapped_for_a_symlink_before_chmod_leaves_the_target_alone() {
    let attacker = Attacker::new();
    let node = Node::new(&attacker);
    let shadow = shadow(&node);
    let dir = node.service_dir("srv/svc", &attacker);
    let pem = dir.join("server.pem");
    for (how, host) in node.hosts() {
        std::fs::write(&pem, "pem\n").unwrap();
        std::fs::set_permissions(&pem, std::fs::Permissions::from_mode(0o600)).unwrap();
        let plan = observe_and_plan(&host, &pem_manifest()).await.unwrap();
        assert!(
            plan.actions().any(|a| matches!(a, Action::Chmod { .. })),
            "{plan}"
        );
        attacker.run(&["rm", "-f", pem.to_str().unwrap()]);
        attacker.run(&["ln", "-s", "/etc/shadow", pem.to_str().unwrap()]);
        let err = apply_plan(&host, &plan)
            .await
            .expect_err(&format!("{how}: chmod/chown went through the link"));
        assert!(
            err.contains("/srv/svc/server.pem") && err.contains("symlink"),
            "{how}: {err}"
        );
        assert_untouched(&shadow);
        std::fs::remove_file(&pem).unwrap();
    }
}

/// The race of item 2: while the agent chmods and chowns the file it observed, the service keeps
/// exchanging it with a link to a root-owned file (`renameat2(RENAME_EXCHANGE)` in a tight
/// loop). A check by path followed by a change by path loses this race; a change on the fd that
/// was checked cannot.
#[test]
fn a_final_component_raced_with_a_symlink_never_changes_the_target() {
    let attacker = Attacker::new();
    let node = Node::new(&attacker);
    let shadow = shadow(&node);
    let dir = node.service_dir("srv/svc", &attacker);
    std::fs::write(dir.join("server.pem"), "pem\n").unwrap();
    std::fs::set_permissions(
        dir.join("server.pem"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    // Relative, so that even code that follows it stays inside the test root.
    symlink("../../etc/shadow", dir.join("alt")).unwrap();
    attacker.chown(&dir.join("alt"));
    let path = p("/srv/svc/server.pem");
    for (how, host) in node.hosts() {
        let observed = host.stat(&path).unwrap().unwrap();
        assert_eq!(observed.kind, FileKind::File, "{how}");
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let swapper = {
            let (stop, dir, uid, gid) = (stop.clone(), dir.clone(), attacker.uid, attacker.gid);
            // This thread alone becomes the service user (Linux credentials are per thread).
            std::thread::spawn(move || {
                rustix::thread::set_thread_groups(&[]).unwrap();
                let gid = rustix::process::Gid::from_raw(gid);
                rustix::thread::set_thread_res_gid(gid, gid, gid).unwrap();
                let uid = rustix::process::Uid::from_raw(uid);
                rustix::thread::set_thread_res_uid(uid, uid, uid).unwrap();
                let fd = rustix::fs::open(
                    &dir,
                    rustix::fs::OFlags::PATH | rustix::fs::OFlags::DIRECTORY,
                    rustix::fs::Mode::empty(),
                )
                .unwrap();
                let mut swaps = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    rustix::fs::renameat_with(
                        &fd,
                        "server.pem",
                        &fd,
                        "alt",
                        rustix::fs::RenameFlags::EXCHANGE,
                    )
                    .unwrap();
                    swaps += 1;
                }
                swaps
            })
        };
        let mut changed = 0;
        for _ in 0..20_000 {
            let mode = FileMode::new(0o640).unwrap();
            changed += u32::from(host.chmod(&path, mode, &observed).is_ok());
            let _ = host.chown(&path, attacker.owner(), &observed);
            if mode_of(&shadow) != 0o600 {
                break;
            }
        }
        stop.store(true, Ordering::Relaxed);
        let swaps = swapper.join().unwrap();
        assert!(swaps > 1000, "{how}: the race barely ran ({swaps} swaps)");
        assert_untouched(&shadow);
        eprintln!("{how}: {swaps} swaps, {changed} chmods reached the file itself");
        // Leave server.pem the file again for the next host.
        if std::fs::symlink_metadata(dir.join("server.pem"))
            .unwrap()
            .file_type()
            .is_symlink()
        {
            rustix::fs::renameat_with(
                rustix::fs::CWD,
                dir.join("server.pem").as_path(),
                rustix::fs::CWD,
                dir.join("alt").as_path(),
                rustix::fs::RenameFlags::EXCHANGE,
            )
            .unwrap();
        }
    }
}

#[tokio::test]
async fn a_file_replaced_by_another_since_the_plan_is_refused() {
    let attacker = Attacker::new();
    let node = Node::new(&attacker);
    let dir = node.service_dir("srv/svc", &attacker);
    let pem = dir.join("server.pem");
    for (how, host) in node.hosts() {
        std::fs::write(&pem, "pem\n").unwrap();
        std::fs::set_permissions(&pem, std::fs::Permissions::from_mode(0o600)).unwrap();
        let plan = observe_and_plan(&host, &pem_manifest()).await.unwrap();
        // Another file (a root-owned one the service found lying around in its directory) takes
        // the name.
        let other = dir.join("other");
        std::fs::write(&other, "pem\n").unwrap();
        std::fs::set_permissions(&other, std::fs::Permissions::from_mode(0o600)).unwrap();
        attacker.run(&["mv", "-f", other.to_str().unwrap(), pem.to_str().unwrap()]);
        let err = apply_plan(&host, &plan).await.unwrap_err();
        assert!(
            err.contains("refusing /srv/svc/server.pem: it is not the object observed"),
            "{how}: {err}"
        );
        let m = std::fs::metadata(&pem).unwrap();
        assert_eq!((m.mode() & 0o7777, m.uid()), (0o600, 0), "{how}");

        // A write planned over one file is refused when another has taken its name, and when
        // something appeared where nothing was.
        std::fs::write(&pem, "stale\n").unwrap();
        let plan = observe_and_plan(&host, &pem_manifest()).await.unwrap();
        assert!(
            plan.actions()
                .any(|a| matches!(a, Action::WriteFile { .. })),
            "{plan}"
        );
        // The observed file is kept under another name: a deleted one's inode number may be
        // given to the next file made (identity is device and inode).
        let gone = pem.with_extension("gone");
        attacker.run(&["mv", pem.to_str().unwrap(), gone.to_str().unwrap()]);
        attacker.run(&["touch", pem.to_str().unwrap()]);
        let err = apply_plan(&host, &plan).await.unwrap_err();
        assert!(
            err.contains("refusing /srv/svc/server.pem: it is not the object observed"),
            "{how}: {err}"
        );
        std::fs::remove_file(&gone).unwrap();
        std::fs::remove_file(&pem).unwrap();
        // A file where nothing was is replaced by the planned one (by rename, never written
        // through: a command earlier in a pass, `initdb`, makes exactly that); a link where
        // nothing was is refused.
        let plan = observe_and_plan(&host, &pem_manifest()).await.unwrap();
        attacker.run(&["touch", pem.to_str().unwrap()]);
        apply_plan(&host, &plan).await.unwrap();
        assert_eq!(std::fs::read(&pem).unwrap(), b"pem\n", "{how}");
        std::fs::remove_file(&pem).unwrap();
        let plan = observe_and_plan(&host, &pem_manifest()).await.unwrap();
        attacker.run(&["ln", "-s", "/etc/victim.d", pem.to_str().unwrap()]);
        let err = apply_plan(&host, &plan).await.unwrap_err();
        assert!(
            err.contains("observed nothing, found Symlink"),
            "{how}: {err}"
        );
        std::fs::remove_file(&pem).unwrap();
    }
}

#[tokio::test]
async fn a_hard_link_to_a_root_file_is_neither_chowned_nor_chmodded() {
    let attacker = Attacker::new();
    let node = Node::new(&attacker);
    let shadow = shadow(&node);
    let dir = node.service_dir("srv/svc", &attacker);
    let pem = dir.join("server.pem");
    // Made by root: fs.protected_hardlinks stops the service here on this machine, and the
    // agent must not depend on that sysctl.
    std::fs::hard_link(&shadow, &pem).unwrap();
    std::fs::write(&shadow, "pem\n").unwrap();
    for (how, host) in node.hosts() {
        let plan = observe_and_plan(&host, &pem_manifest()).await.unwrap();
        assert!(
            plan.actions().any(|a| matches!(a, Action::Chown { .. })),
            "{plan}"
        );
        let err = apply_plan(&host, &plan).await.unwrap_err();
        assert!(
            err.contains("refusing /srv/svc/server.pem: it has 2 hard links"),
            "{how}: {err}"
        );
        assert_untouched(&shadow);
        // The same through the host directly.
        let st = host.stat(&p("/srv/svc/server.pem")).unwrap().unwrap();
        let r = host.chown(&p("/srv/svc/server.pem"), attacker.owner(), &st);
        assert!(
            matches!(r, Err(HostError::HardLinked { links: 2, .. })),
            "{r:?}"
        );
        assert_untouched(&shadow);
    }
}

#[tokio::test]
async fn a_directory_made_since_the_plan_gets_the_planned_mode_and_owner() {
    let attacker = Attacker::new();
    let node = Node::new(&attacker);
    let dir = node.service_dir("srv/svc", &attacker);
    let m = manifest(vec![res(json!({
        "kind": "directory", "id": "dir:data", "path": "/srv/svc/data", "mode": "0700",
        "owner": {"owner": "root", "group": "root"}
    }))]);
    for (how, host) in node.hosts() {
        let plan = observe_and_plan(&host, &m).await.unwrap();
        let data = dir.join("data");
        attacker.run(&["mkdir", "-m", "0777", data.to_str().unwrap()]);
        apply_plan(&host, &plan).await.unwrap();
        let meta = std::fs::metadata(&data).unwrap();
        assert_eq!(
            (meta.mode() & 0o7777, meta.uid(), meta.gid()),
            (0o700, 0, 0),
            "{how}"
        );
        std::fs::remove_dir(&data).unwrap();
    }
}

// ---- item 5: reads ---------------------------------------------------------------------------

/// Observing a certificate whose key file the service replaced: a FIFO, a link to `/dev/zero`,
/// a device node. Each must end promptly in an error naming the path; a thread and a deadline
/// make a hang a failure instead of a stuck test.
#[test]
fn fifo_and_dev_zero_as_key_files_fail_promptly_with_the_path() {
    let attacker = Attacker::new();
    let node = Node::new(&attacker);
    let tls = node.service_dir("etc/ai-memory/tls", &attacker);
    let key = tls.join("server.key");
    let key_str = key.to_str().unwrap().to_owned();
    let m = manifest(vec![res(json!({
        "kind": "certificate", "id": "cert:server", "purpose": "server",
        "key_path": "/etc/ai-memory/tls/server.key", "cert_path": "/etc/ai-memory/tls/server.pem",
        "key_mode": "0600", "owner": {"owner": "svc", "group": "svc"}
    }))]);
    // /dev/zero inside the root, for the link the system resolution follows from a trusted dir.
    std::fs::create_dir_all(node.path("dev")).unwrap();
    rustix::fs::mknodat(
        rustix::fs::CWD,
        node.path("dev/zero"),
        rustix::fs::FileType::CharacterDevice,
        rustix::fs::Mode::from_raw_mode(0o666),
        rustix::fs::makedev(1, 5),
    )
    .unwrap();
    type Plant<'a> = Box<dyn Fn(&Attacker) + 'a>;
    let plants: Vec<(&str, Plant, &str)> = vec![
        (
            "a FIFO",
            Box::new(|a: &Attacker| a.run(&["mkfifo", &key_str])),
            "expected a regular file",
        ),
        (
            "a link to /dev/zero",
            Box::new(|a: &Attacker| a.run(&["ln", "-s", "/dev/zero", &key_str])),
            "only followed through root-owned",
        ),
        (
            // A service cannot mknod; this stands for a device node anything else left there.
            "a /dev/zero device node",
            Box::new(|_: &Attacker| {
                rustix::fs::mknodat(
                    rustix::fs::CWD,
                    key_str.as_str(),
                    rustix::fs::FileType::CharacterDevice,
                    rustix::fs::Mode::from_raw_mode(0o666),
                    rustix::fs::makedev(1, 5),
                )
                .unwrap()
            }),
            "expected a regular file",
        ),
    ];
    for (what, plant, want) in plants {
        let _ = std::fs::remove_file(&key);
        plant(&attacker);
        for system in [false, true] {
            let root = node.dir.path().to_owned();
            let m = m.clone();
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                let host = if system {
                    RealHost::with_system_resolution(&root).unwrap()
                } else {
                    RealHost::new(&root).unwrap()
                };
                let rt = tokio::runtime::Builder::new_current_thread()
                    .build()
                    .unwrap();
                let _ = tx.send(
                    rt.block_on(observe_and_plan(&host, &m))
                        .map(|p| p.to_string()),
                );
            });
            let got = rx
                .recv_timeout(Duration::from_secs(10))
                .unwrap_or_else(|_| panic!("{what}: observe still reading after 10 s"));
            let err = got.expect_err(&format!("{what}: observed as a key"));
            assert!(
                err.contains("/etc/ai-memory/tls/server.key") && err.contains(want),
                "{what} (system resolution {system}): {err}"
            );
        }
    }
    // A link to /dev/zero where links are followed (a root-owned directory) is read as what it
    // is: a device, not a key.
    symlink("/dev/zero", node.path("etc/zero.key")).unwrap();
    let host = RealHost::with_system_resolution(node.dir.path()).unwrap();
    let err = host.read(&p("/etc/zero.key")).unwrap_err();
    assert!(
        matches!(
            &err,
            HostError::WrongKind {
                found: FileKind::Other,
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn a_file_over_the_read_cap_is_refused_naming_path_and_cap() {
    let attacker = Attacker::new();
    let node = Node::new(&attacker);
    let dir = node.service_dir("srv/svc", &attacker);
    std::fs::write(dir.join("big"), vec![b'x'; 100]).unwrap();
    let host = RealHost::new(node.dir.path()).unwrap();
    let err = host.read_limited(&p("/srv/svc/big"), 99).unwrap_err();
    assert_eq!(
        err.to_string(),
        "/srv/svc/big: larger than the 99 bytes the agent reads"
    );
    assert_eq!(
        host.read_limited(&p("/srv/svc/big"), 100)
            .unwrap()
            .unwrap()
            .len(),
        100
    );
}

// ---- item 7: temp names and set-id bits ------------------------------------------------------

/// The service pre-creates every temp name the agent's old scheme would use (`.<name>.hiveseed-
/// <pid>-<counter>`: the pid is public, the counter starts at 0): convergence must still succeed.
#[tokio::test]
async fn pre_created_temp_names_do_not_stop_convergence() {
    let attacker = Attacker::new();
    let node = Node::new(&attacker);
    let dir = node.service_dir("srv/svc", &attacker);
    let pid = std::process::id();
    let planted: Vec<String> = (0..2000)
        .map(|n| {
            let name = format!(".server.pem.hiveseed-{pid}-{n}");
            dir.join(name).to_str().unwrap().to_owned()
        })
        .collect();
    let mut touch = vec!["touch"];
    touch.extend(planted.iter().map(String::as_str));
    attacker.run(&touch);
    let before = names(&dir).len();
    for (how, host) in node.hosts() {
        let _ = std::fs::remove_file(dir.join("server.pem"));
        let plan = observe_and_plan(&host, &pem_manifest()).await.unwrap();
        apply_plan(&host, &plan)
            .await
            .unwrap_or_else(|e| panic!("{how}: {e}"));
        assert_eq!(std::fs::read(dir.join("server.pem")).unwrap(), b"pem\n");
        assert!(
            observe_and_plan(&host, &pem_manifest())
                .await
                .unwrap()
                .is_empty(),
            "{how}"
        );
        assert_eq!(names(&dir).len(), before + 1, "{how}: a temp file was left");
    }
}

/// Owner first, then mode: a chown after the chmod would clear the set-id bits it just set.
#[test]
fn set_id_bits_survive_a_write_with_an_owner() {
    let attacker = Attacker::new();
    let node = Node::new(&attacker);
    // A root-owned directory: the file is created as root and then given to the user (in a
    // service user's directory it would be created as that user, and no chown would run).
    std::fs::create_dir_all(node.path("srv")).unwrap();
    let host = RealHost::new(node.dir.path()).unwrap();
    host.write_atomic(
        &p("/srv/tool"),
        b"#!/bin/sh\n",
        Attrs {
            mode: FileMode::new(0o6750).unwrap(),
            owner: Some(attacker.owner()),
        },
    )
    .unwrap();
    assert_eq!(mode_of(&node.path("srv/tool")), 0o6750);
}

/// In a directory the service user owns, the agent creates, renames and removes names with that
/// user's fsuid/fsgid: it can do there no more than the user could. With the directory made
/// read-only by its owner, a write and a mkdir are refused with permission denied naming the
/// path, and nothing appears; with write permission back, the file lands with the owner and mode
/// asked for (root's, set by fd after the create).
#[test]
fn writes_in_a_service_users_directory_carry_that_users_rights() {
    let attacker = Attacker::new();
    let node = Node::new(&attacker);
    let dir = node.service_dir("srv/svc", &attacker);
    attacker.run(&["chmod", "0500", dir.to_str().unwrap()]);
    let root_only = Attrs {
        mode: FileMode::new(0o600).unwrap(),
        owner: Some(Owner { uid: 0, gid: 0 }),
    };
    let denied = |err: &HostError, path: &str| {
        err.to_string().starts_with(path)
            && matches!(err, HostError::Io { source, .. }
                if source.kind() == std::io::ErrorKind::PermissionDenied)
    };
    for (how, host) in node.hosts() {
        let err = host
            .write_atomic(&p("/srv/svc/key"), b"k", root_only)
            .expect_err(how);
        assert!(denied(&err, "/srv/svc/key"), "{how}: {err:?}");
        let err = host.mkdir(&p("/srv/svc/sub"), root_only).expect_err(how);
        assert!(denied(&err, "/srv/svc/sub"), "{how}: {err:?}");
        assert_eq!(names(&dir), Vec::<String>::new(), "{how}");
    }
    attacker.run(&["chmod", "0700", dir.to_str().unwrap()]);
    let host = RealHost::new(node.dir.path()).unwrap();
    host.write_atomic(&p("/srv/svc/key"), b"k", root_only)
        .unwrap();
    let meta = std::fs::symlink_metadata(dir.join("key")).unwrap();
    assert_eq!(
        (meta.uid(), meta.gid(), meta.mode() & 0o7777),
        (0, 0, 0o600)
    );
    assert_eq!(names(&dir), ["key"]);
}

/// Key and credential actions carry what plan saw at the paths they write: where plan saw no
/// key, a symlink planted before apply is refused naming the path and both observations, and
/// nothing is written through it.
#[tokio::test]
async fn a_key_planned_missing_is_not_generated_through_a_link_that_appeared() {
    let attacker = Attacker::new();
    let node = Node::new(&attacker);
    let keys = node.service_dir("etc/ai-memory/keys", &attacker);
    let region = keys.join("do-1461/nyc3");
    attacker.run(&["mkdir", "-p", region.to_str().unwrap()]);
    let target = node.path("etc/victim.d/key");
    for (how, host) in node.hosts() {
        let plan = observe_and_plan(&host, &key_manifest()).await.unwrap();
        let Some(Action::GenerateFederationKey { key_path, .. }) = plan.actions().next() else {
            panic!("{how}: {plan}");
        };
        let planted = node.path(key_path.as_str());
        std::fs::write(&target, b"").unwrap();
        attacker.run(&[
            "ln",
            "-s",
            target.to_str().unwrap(),
            planted.to_str().unwrap(),
        ]);
        let err = apply_plan(&host, &plan).await.expect_err(how);
        assert!(
            err.contains(&format!(
                "refusing {key_path}: it is not the object observed"
            )) && err.contains("observed nothing, found Symlink"),
            "{how}: {err}"
        );
        assert_eq!(std::fs::read(&target).unwrap(), b"", "{how}");
        std::fs::remove_file(&planted).unwrap();
    }
}
