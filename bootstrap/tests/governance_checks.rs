//! The peer role's command checks (`binary.version`, `governance.rules_enabled`,
//! `governance.refuses_tmp_write`) as roles/peer.toml writes them, run by the agent's check code
//! against the real ai-memory 0.7.0 CLI on a scratch database set up as the role's commands set
//! up the node's: each PASSes on exactly the measured value, and each FAILs against a database
//! misconfigured for it (a rule disabled). No daemon, no port.
//!
//! Needs the ai-memory binary (`HIVESEED_AI_MEMORY_BIN`, default the lab cache's): without it
//! the test fails (tests/deps).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{node, temp_root};
use hiveseed_bootstrap::resources::check::run_check;
use hiveseed_bootstrap::{CheckEnv, RealHost, ServiceManager};
use hiveseed_proto::manifest::{Check, Probe};
use hiveseed_proto::{CheckStatus, Resource};

/// Where the role installs the binary and keeps the daemon's sqlite sidecar.
const ROLE_BIN: &str = "/usr/local/bin/ai-memory";
const ROLE_DB: &str = "/var/lib/ai-memory/ai-memory.db";

/// The role's check `id`, its argv moved onto this machine: no `setpriv` (the test is not root's
/// `ai-memory` user), the binary, database, HOME and key dir of the scratch node.
fn role_check(id: &str, bin: &Path, home: &Path) -> Check {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../roles/peer.toml");
    let role: toml::Value = toml::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let table = role["resource"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["id"].as_str() == Some(id))
        .unwrap_or_else(|| panic!("roles/peer.toml has no {id}"))
        .clone();
    let Resource::Check(mut c) = table.try_into().unwrap() else {
        panic!("{id} is not a check")
    };
    c.expected = c
        .expected
        .replace("{{ fleet.pins.ai_memory.version }}", "0.7.0");
    let (Probe::CommandOutput { argv } | Probe::CommandJson { argv, .. }) = &mut c.probe else {
        panic!("{id} is not a command check")
    };
    let env = argv.iter().position(|a| a == "/usr/bin/env").unwrap();
    *argv = argv[env..]
        .iter()
        .map(|a| match a.as_str() {
            ROLE_BIN => bin.display().to_string(),
            ROLE_DB => home.join("ai-memory.db").display().to_string(),
            "HOME=/var/lib/ai-memory" => format!("HOME={}", home.display()),
            "AI_MEMORY_KEY_DIR=/etc/ai-memory/keys" => {
                format!("AI_MEMORY_KEY_DIR={}", home.join("keys").display())
            }
            _ => a.clone(),
        })
        .collect();
    c
}

/// One `ai-memory --db <scratch> ...` as the role's commands run it.
fn ai_memory(bin: &Path, home: &Path, args: &[&str]) {
    let out = Command::new(bin)
        .env("HOME", home)
        .env("AI_MEMORY_KEY_DIR", home.join("keys"))
        .arg("--db")
        .arg(home.join("ai-memory.db"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "ai-memory {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn the_roles_command_checks_pass_on_the_measured_value_and_fail_when_it_differs() {
    let Some(bin) = hiveseed_test_deps::ai_memory() else {
        return;
    };
    let root = temp_root();
    let home = root.path().join("var/lib/ai-memory");
    std::fs::create_dir_all(home.join("keys")).unwrap();
    let host = RealHost::new(root.path()).unwrap();
    let node = node();
    let env = CheckEnv {
        host: &host,
        node: &node,
        manager: ServiceManager::Supervisor,
        supervisor: None,
        timeout: Duration::from_secs(30),
    };
    let version = role_check("check:binary.version", &bin, &home);
    let rules = role_check("check:governance.rules", &bin, &home);
    let refuses = role_check("check:governance.refuses_tmp_write", &bin, &home);
    let run = |c: &Check| {
        let c = c.clone();
        let env = &env;
        async move {
            let r = run_check(env, &c).await;
            (r.got, r.status)
        }
    };

    assert_eq!(
        run(&version).await,
        ("ai-memory 0.7.0".into(), CheckStatus::Pass)
    );

    // The sidecar's schema as the daemon leaves it, then the role's cmd:governance-key and
    // cmd:governance-rules.
    ai_memory(&bin, &home, &["stats"]);
    ai_memory(&bin, &home, &["rules", "keygen"]);
    ai_memory(&bin, &home, &["rules", "sign-seed"]);
    // The seed rules land disabled: nothing enabled, nothing refused.
    assert_eq!(run(&rules).await, ("[]".into(), CheckStatus::Fail));
    let (got, status) = run(&refuses).await;
    assert_eq!(status, CheckStatus::Fail, "{got}");
    for id in ["R001", "R002", "R003", "R004"] {
        ai_memory(&bin, &home, &["rules", "enable", "--id", id, "--sign"]);
    }
    assert_eq!(
        run(&rules).await,
        ("R001,R002,R003,R004".into(), CheckStatus::Pass)
    );
    assert_eq!(run(&refuses).await, ("deny".into(), CheckStatus::Pass));

    // Three of the four enabled: FAIL, naming which.
    ai_memory(&bin, &home, &["rules", "disable", "--id", "R003", "--sign"]);
    assert_eq!(
        run(&rules).await,
        ("R001,R002,R004".into(), CheckStatus::Fail)
    );
    // The /tmp rule off: the write is allowed, and the check says so.
    ai_memory(&bin, &home, &["rules", "disable", "--id", "R001", "--sign"]);
    let (got, status) = run(&refuses).await;
    assert_eq!(status, CheckStatus::Fail, "{got}");
    assert!(got.contains("allow"), "{got}");
}
