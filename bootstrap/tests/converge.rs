//! The convergence property, per resource kind, in a temp root: the first apply changes
//! something, the second plan is empty and restarts nothing.

#![allow(clippy::unwrap_used)] // test helpers outside #[test] fns

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use hiveseed_bootstrap::plan::{Action, CertReason, CredentialReason, RunReason};
use hiveseed_bootstrap::{
    observe, plan, run_checks, ApplyEvent, CheckEnv, Host, ObserveEnv, PlanContext, PlanError,
    RealHost, ServiceManager, Supervisor, SupervisorSettings,
};
use hiveseed_proto::status::Outcome;
use hiveseed_proto::{CheckStatus, Sha256};
use serde_json::json;

fn mode_of(p: &std::path::Path) -> u32 {
    std::fs::metadata(p).expect("metadata").permissions().mode() & 0o7777
}

#[tokio::test]
async fn package_with_source_installs_in_one_transaction_and_then_does_nothing() {
    let root = temp_root();
    let host = fake_host(&root);
    {
        let mut sys = host.sys();
        sys.available.insert("curl".into(), vec!["8.14.1-2".into()]);
        sys.after_update.insert(
            "postgresql-17".into(),
            vec!["17.5-1".into(), "17.4-3".into()],
        );
        sys.after_update
            .insert("postgresql-17-pgvector".into(), vec!["0.8.0-1".into()]);
    }
    let keyring = b"\x99\x01binary keyring";
    use base64::Engine;
    let m = manifest(vec![res(json!({
        "kind": "package", "id": "pkg:pg",
        "packages": [
            {"name": "postgresql-17", "version": {"prefix": "17."}},
            {"name": "postgresql-17-pgvector", "version": {"exact": "0.8.0-1"}},
            {"name": "curl", "version": "any"}
        ],
        "source": {
            "name": "pgdg", "uri": "http://apt.postgresql.org/pub/repos/apt",
            "suite": "trixie-pgdg", "components": ["main"],
            "keyring_b64": base64::engine::general_purpose::STANDARD.encode(keyring)
        }
    }))]);
    let env = Env::new(&host);
    let (first, _) = env.converge(&m).await;
    let actions: Vec<&Action> = first.actions().collect();
    assert!(matches!(actions[0], Action::WriteKeyring { .. }));
    assert!(matches!(actions[1], Action::WriteAptSource { .. }));
    assert!(matches!(actions[2], Action::AptUpdate));
    assert!(matches!(actions[3], Action::AptInstall { pins } if pins.len() == 3));
    assert_eq!(actions.len(), 4);

    assert_eq!(
        std::fs::read(root.path().join("usr/share/keyrings/pgdg.gpg")).unwrap(),
        keyring
    );
    assert_eq!(
        std::fs::read_to_string(root.path().join("etc/apt/sources.list.d/pgdg.list")).unwrap(),
        "deb [signed-by=/usr/share/keyrings/pgdg.gpg] http://apt.postgresql.org/pub/repos/apt trixie-pgdg main\n"
    );
    let sys = host.sys();
    assert_eq!(sys.updates, 1);
    let installs: Vec<&Vec<String>> = sys
        .calls
        .iter()
        .filter(|c| c[0] == "apt-get" && c.contains(&"install".to_string()))
        .collect();
    assert_eq!(installs.len(), 1, "one transaction: {installs:?}");
    let install = installs[0];
    for want in [
        "postgresql-17=17.5-1",
        "postgresql-17-pgvector=0.8.0-1",
        "curl",
        "--no-install-recommends",
        "-y",
        "DPkg::Lock::Timeout=60",
    ] {
        assert!(install.contains(&want.to_string()), "{want} in {install:?}");
    }
    assert_eq!(sys.installed["postgresql-17"], "17.5-1");
}

#[tokio::test]
async fn package_update_only_when_a_candidate_is_missing() {
    let root = temp_root();
    let host = fake_host(&root);
    host.sys()
        .available
        .insert("jq".into(), vec!["1.7.1-6".into()]);
    let m = manifest(vec![res(json!({
        "kind": "package", "id": "pkg:jq",
        "packages": [{"name": "jq", "version": {"exact": "1.7.1-6"}}]
    }))]);
    let (first, _) = Env::new(&host).converge(&m).await;
    assert!(!first.actions().any(|a| matches!(a, Action::AptUpdate)));
    assert_eq!(host.sys().updates, 0);

    // A prefix no candidate satisfies: apt-get update, then a typed refusal, nothing installed.
    let m = manifest(vec![res(json!({
        "kind": "package", "id": "pkg:pg18",
        "packages": [{"name": "postgresql-18", "version": {"prefix": "18."}}]
    }))]);
    host.sys()
        .after_update
        .insert("postgresql-18".into(), vec!["17.9-1".into()]);
    let env = Env::new(&host);
    let p = env.plan(&m).await;
    let node = node();
    let apply_env = hiveseed_bootstrap::ApplyEnv {
        host: &host,
        node: &node,
        fetcher: &hiveseed_bootstrap::Unavailable,
        signer: &hiveseed_bootstrap::Unavailable,
        issuer: &hiveseed_bootstrap::Unavailable,
        readiness: &hiveseed_bootstrap::Unavailable,
        supervisor: None,
        settings: Default::default(),
    };
    let err = hiveseed_bootstrap::apply(&p, &apply_env, &mut |_| {})
        .await
        .unwrap_err();
    assert!(
        matches!(
            err.source,
            hiveseed_bootstrap::ResourceError::PrefixMismatch { ref candidate, .. } if candidate == "17.9-1"
        ),
        "{err:?}"
    );
    assert_eq!(err.reports.last().unwrap().outcome, Outcome::Failed);
    assert!(!host.sys().installed.contains_key("postgresql-18"));
}

#[tokio::test]
async fn directories_and_files_get_content_mode_and_owner_then_nothing() {
    let root = temp_root();
    let host = RealHost::new(root.path()).unwrap();
    let blob = b"#!/bin/sh\necho ai-memory 0.7.0\n".to_vec();
    let fetcher = MemFetcher::with(&blob);
    let m = manifest(vec![
        res(
            json!({"kind": "directory", "id": "dir:tls", "path": "/etc/ai-memory/tls",
                   "mode": "0750", "owner": {"owner": "postgres", "group": "postgres"}}),
        ),
        res(
            json!({"kind": "file", "id": "file:conf", "path": "/etc/ai-memory/config.toml",
                   "mode": "0640", "owner": {"owner": "postgres", "group": "postgres"},
                   "content": {"type": "text", "text": "tier = \"keyword\"\n"}}),
        ),
        res(
            json!({"kind": "file", "id": "file:env", "path": "/etc/ai-memory/ai-memory.env",
                   "mode": "0400", "secret": true,
                   "content": {"type": "text", "text": "AI_MEMORY_STORE_URL=postgres://u:hunter2@x/db\n"}}),
        ),
        res(
            json!({"kind": "file", "id": "file:bin", "path": "/usr/local/bin/ai-memory",
                   "mode": "0755",
                   "content": {"type": "artifact", "sha256": Sha256::digest(&blob).to_hex(), "size": blob.len()}}),
        ),
    ]);
    let mut env = Env::new(&host);
    env.fetcher = &fetcher;
    let (first, _) = env.converge(&m).await;
    let shown = first.to_string();
    assert!(
        shown.contains("write /etc/ai-memory/ai-memory.env 0400 (secret,"),
        "{shown}"
    );
    assert!(
        !shown.contains("hunter2"),
        "secret in plan display: {shown}"
    );
    assert!(
        !format!("{first:?}").contains("hunter2"),
        "secret in plan debug"
    );

    let r = root.path();
    let tls = std::fs::metadata(r.join("etc/ai-memory/tls")).unwrap();
    assert!(tls.is_dir());
    assert_eq!(
        (tls.mode() & 0o7777, tls.uid(), tls.gid()),
        (0o750, 101, 104)
    );
    let conf = std::fs::metadata(r.join("etc/ai-memory/config.toml")).unwrap();
    assert_eq!(
        (conf.mode() & 0o7777, conf.uid(), conf.gid()),
        (0o640, 101, 104)
    );
    assert_eq!(mode_of(&r.join("etc/ai-memory/ai-memory.env")), 0o400);
    assert_eq!(
        std::fs::read(r.join("usr/local/bin/ai-memory")).unwrap(),
        blob
    );
    assert_eq!(mode_of(&r.join("usr/local/bin/ai-memory")), 0o755);
    assert_eq!(fetcher.fetches.load(Ordering::SeqCst), 1);
    // No temp files left behind by the atomic writes.
    let leftovers: Vec<_> = std::fs::read_dir(r.join("etc/ai-memory"))
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().contains("hiveseed"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    // Drift: a mode changed behind our back is repaired by a chmod alone, not a rewrite.
    std::fs::set_permissions(
        r.join("etc/ai-memory/config.toml"),
        std::fs::Permissions::from_mode(0o666),
    )
    .unwrap();
    let repair = env.plan(&m).await;
    let actions: Vec<&Action> = repair.actions().collect();
    assert_eq!(actions.len(), 1, "{repair}");
    assert!(matches!(actions[0], Action::Chmod { .. }));
    env.apply(&repair).await;
    assert!(env.plan(&m).await.is_empty());
    assert_eq!(fetcher.fetches.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_corrupted_artifact_is_refused_before_it_is_written() {
    let root = temp_root();
    let host = RealHost::new(root.path()).unwrap();
    let fetcher = MemFetcher::default();
    let wanted = Sha256::digest(b"the real binary");
    fetcher
        .blobs
        .lock()
        .unwrap()
        .insert(wanted, b"something else".to_vec());
    let m = manifest(vec![res(json!({"kind": "file", "id": "file:bin",
        "path": "/usr/local/bin/x", "mode": "0755",
        "content": {"type": "artifact", "sha256": wanted.to_hex(), "size": 15}}))]);
    let mut env = Env::new(&host);
    env.fetcher = &fetcher;
    let p = env.plan(&m).await;
    let node = node();
    let apply_env = hiveseed_bootstrap::ApplyEnv {
        host: &host,
        node: &node,
        fetcher: &fetcher,
        signer: &hiveseed_bootstrap::Unavailable,
        issuer: &hiveseed_bootstrap::Unavailable,
        readiness: &hiveseed_bootstrap::Unavailable,
        supervisor: None,
        settings: Default::default(),
    };
    let err = hiveseed_bootstrap::apply(&p, &apply_env, &mut |_| {})
        .await
        .unwrap_err();
    assert!(
        matches!(
            err.source,
            hiveseed_bootstrap::ResourceError::ArtifactMismatch { .. }
        ),
        "{err:?}"
    );
    assert!(!root.path().join("usr/local/bin/x").exists());
}

#[tokio::test]
async fn secret_file_with_group_or_other_bits_is_refused_before_writing() {
    let root = temp_root();
    let host = RealHost::new(root.path()).unwrap();
    let m = manifest(vec![res(json!({"kind": "file", "id": "file:pw",
        "path": "/etc/ai-memory/pg-password", "mode": "0644", "secret": true,
        "content": {"type": "text", "text": "hunter2"}}))]);
    let observed = observe(
        &m,
        &ObserveEnv {
            host: &host,
            supervisor: None,
            readiness: &hiveseed_bootstrap::Unavailable,
            probe_timeout: Duration::from_secs(1),
        },
    )
    .await
    .unwrap();
    let err = plan(&m, &observed, &PlanContext::now()).unwrap_err();
    assert!(matches!(err, PlanError::SecretExposed { .. }), "{err}");
    assert!(!err.to_string().contains("hunter2"));
    assert!(!root.path().join("etc/ai-memory").exists());
}

#[tokio::test]
async fn user_is_created_once() {
    let root = temp_root();
    let host = fake_host(&root);
    let m = manifest(vec![res(
        json!({"kind": "user", "id": "user:aim", "name": "ai-memory",
        "system": true, "home": "/var/lib/ai-memory", "shell": "/usr/sbin/nologin"}),
    )]);
    let (first, _) = Env::new(&host).converge(&m).await;
    let Some(Action::CreateUser { argv }) = first.actions().next() else {
        panic!("{first}")
    };
    assert_eq!(
        argv,
        &[
            "useradd",
            "--system",
            "--user-group",
            "--home-dir",
            "/var/lib/ai-memory",
            "--shell",
            "/usr/sbin/nologin",
            "ai-memory"
        ]
    );
    assert!(host.lookup_user("ai-memory").unwrap().is_some());
    let useradds = host
        .sys()
        .calls
        .iter()
        .filter(|c| c[0] == "useradd")
        .count();
    assert_eq!(useradds, 1);
    // A name that useradd could read as an option is refused at plan time.
    let bad = manifest(vec![res(
        json!({"kind": "user", "id": "user:bad", "name": "-ohno"}),
    )]);
    let observed = observe(
        &bad,
        &ObserveEnv {
            host: &host,
            supervisor: None,
            readiness: &hiveseed_bootstrap::Unavailable,
            probe_timeout: Duration::from_secs(1),
        },
    )
    .await
    .unwrap();
    assert!(matches!(
        plan(&bad, &observed, &PlanContext::now()),
        Err(PlanError::BadName { .. })
    ));
}

#[tokio::test]
async fn certificate_key_stays_on_node_and_renews_at_two_thirds() {
    let root = temp_root();
    let host = RealHost::new(root.path()).unwrap();
    let ca = TestCa::new();
    let m = manifest(vec![res(
        json!({"kind": "certificate", "id": "cert:server",
        "purpose": "server", "key_path": "/etc/ai-memory/tls/server.key",
        "cert_path": "/etc/ai-memory/tls/server.pem", "key_mode": "0600",
        "owner": {"owner": "postgres", "group": "postgres"}}),
    )]);
    let mut env = Env::new(&host);
    env.signer = &ca;
    let (first, _) = env.converge(&m).await;
    let actions: Vec<&Action> = first.actions().collect();
    assert!(
        matches!(actions[0], Action::GenerateKey { .. }),
        "key first"
    );
    assert!(matches!(
        actions[1],
        Action::RequestCertificate {
            reason: CertReason::NoKey,
            ..
        }
    ));
    let key = std::fs::metadata(root.path().join("etc/ai-memory/tls/server.key")).unwrap();
    assert_eq!((key.mode() & 0o7777, key.uid()), (0o600, 101));
    let key_pem =
        std::fs::read_to_string(root.path().join("etc/ai-memory/tls/server.key")).unwrap();
    assert!(key_pem.contains("PRIVATE KEY"));
    assert_eq!(ca.signed.load(Ordering::SeqCst), 1);

    // A certificate past 2/3 of its lifetime is renewed with the same key.
    *ca.validity.lock().unwrap() = (100 * 86400, 86400);
    std::fs::remove_file(root.path().join("etc/ai-memory/tls/server.pem")).unwrap();
    env.apply(&env.plan(&m).await).await;
    let due = env.plan(&m).await;
    assert!(
        due.actions().any(|a| matches!(
            a,
            Action::RequestCertificate {
                reason: CertReason::Renew,
                ..
            }
        )),
        "{due}"
    );
    *ca.validity.lock().unwrap() = (3600, 30 * 86400);
    env.apply(&due).await;
    assert!(env.plan(&m).await.is_empty());
    assert_eq!(
        std::fs::read_to_string(root.path().join("etc/ai-memory/tls/server.key")).unwrap(),
        key_pem,
        "renewal keeps the key"
    );

    // A certificate for another key is replaced.
    let other = rcgen::KeyPair::generate().unwrap();
    std::fs::write(
        root.path().join("etc/ai-memory/tls/server.key"),
        other.serialize_pem(),
    )
    .unwrap();
    let mismatch = env.plan(&m).await;
    assert!(
        mismatch.actions().any(|a| matches!(
            a,
            Action::RequestCertificate {
                reason: CertReason::KeyMismatch,
                ..
            }
        )),
        "{mismatch}"
    );
}

#[tokio::test]
async fn commands_run_on_guards_and_refresh_only() {
    let root = temp_root();
    let host = RealHost::new(root.path()).unwrap();
    let r = root.path().to_str().unwrap().to_owned();
    std::fs::write(
        root.path().join("count.sh"),
        "echo run >> \"$1\"\ncat > \"$2\"\n",
    )
    .unwrap();
    let base = |conf: &str| {
        manifest(vec![
            res(
                json!({"kind": "file", "id": "file:conf", "path": "/etc/app.conf",
                       "mode": "0644", "content": {"type": "text", "text": conf}}),
            ),
            res(json!({"kind": "command", "id": "cmd:init",
                       "argv": ["/usr/bin/touch", format!("{r}/initialized")],
                       "creates": "/initialized"})),
            res(json!({"kind": "command", "id": "cmd:unless",
                       "argv": ["/usr/bin/touch", format!("{r}/unless-made")],
                       "unless": ["/usr/bin/test", "-e", format!("{r}/unless-made")]})),
            res(json!({"kind": "command", "id": "cmd:reload",
                       "argv": ["/bin/sh", format!("{r}/count.sh"), format!("{r}/reloads"), format!("{r}/stdin-copy")],
                       "stdin": "PASSWORD 'hunter2'",
                       "refresh_on": ["file:conf"]})),
        ])
    };
    let env = Env::new(&host);
    let m1 = base("a=1\n");
    let (first, _) = env.converge(&m1).await;
    assert!(!first.to_string().contains("hunter2"), "{first}");
    assert!(root.path().join("initialized").exists());
    assert!(root.path().join("unless-made").exists());
    assert_eq!(
        std::fs::read_to_string(root.path().join("reloads")).unwrap(),
        "run\n"
    );
    assert_eq!(
        std::fs::read_to_string(root.path().join("stdin-copy")).unwrap(),
        "PASSWORD 'hunter2'"
    );

    // A changed input re-runs the refresh command, and only it.
    let m2 = base("a=2\n");
    let p = env.plan(&m2).await;
    let runs: Vec<&Action> = p
        .actions()
        .filter(|a| matches!(a, Action::RunCommand { .. }))
        .collect();
    assert_eq!(runs.len(), 1, "{p}");
    assert!(
        matches!(runs[0], Action::RunCommand { reason: RunReason::Refresh(ids), .. } if ids[0].as_str() == "file:conf")
    );
    env.apply(&p).await;
    assert!(env.plan(&m2).await.is_empty());
    assert_eq!(
        std::fs::read_to_string(root.path().join("reloads")).unwrap(),
        "run\nrun\n"
    );

    // A command with no guard at all would run forever: refused.
    let unguarded = manifest(vec![res(
        json!({"kind": "command", "id": "cmd:x", "argv": ["/bin/true"]}),
    )]);
    let observed = observe(
        &unguarded,
        &ObserveEnv {
            host: &host,
            supervisor: None,
            readiness: &hiveseed_bootstrap::Unavailable,
            probe_timeout: Duration::from_secs(1),
        },
    )
    .await
    .unwrap();
    assert!(matches!(
        plan(&unguarded, &observed, &PlanContext::now()),
        Err(PlanError::UnguardedCommand { .. })
    ));
}

#[tokio::test]
async fn failing_command_with_secret_stdin_keeps_the_secret_out_of_the_error() {
    let root = temp_root();
    let host = RealHost::new(root.path()).unwrap();
    let m = manifest(vec![res(json!({"kind": "command", "id": "cmd:psql",
        "argv": ["/bin/sh", "-c", "cat >&2; exit 3"],
        "stdin": "ALTER ROLE x PASSWORD 'hunter2'", "creates": "/never"}))]);
    let env = Env::new(&host);
    let p = env.plan(&m).await;
    let node = node();
    let apply_env = hiveseed_bootstrap::ApplyEnv {
        host: &host,
        node: &node,
        fetcher: &hiveseed_bootstrap::Unavailable,
        signer: &hiveseed_bootstrap::Unavailable,
        issuer: &hiveseed_bootstrap::Unavailable,
        readiness: &hiveseed_bootstrap::Unavailable,
        supervisor: None,
        settings: Default::default(),
    };
    let mut events = Vec::new();
    let err = hiveseed_bootstrap::apply(&p, &apply_env, &mut |e| events.push(e))
        .await
        .unwrap_err();
    let msg = format!("{:#}", anyhow::Error::new(err));
    assert!(msg.contains("exit status 3"), "{msg}");
    assert!(msg.contains("/bin/sh -c"), "argv in error: {msg}");
    assert!(!msg.contains("hunter2"), "{msg}");
    let Some(ApplyEvent::Finished(report)) = events.last() else {
        panic!("{events:?}")
    };
    assert_eq!(report.outcome, Outcome::Failed);
    assert!(!report.message.as_deref().unwrap().contains("hunter2"));
}

const UNIT: &str = "[Unit]\nDescription=test daemon\nAfter=network-online.target\n\n[Service]\nType=simple\nEnvironmentFile=/etc/app.env\nExecStart=/bin/sleep 1000\nRestart=on-failure\nKillSignal=SIGINT\n\n[Install]\nWantedBy=multi-user.target\n";

fn service_manifest(env_text: &str, unit_text: &str) -> hiveseed_proto::Manifest {
    manifest(vec![
        res(
            json!({"kind": "file", "id": "file:env", "path": "/etc/app.env", "mode": "0400",
                   "secret": true, "content": {"type": "text", "text": env_text}}),
        ),
        res(
            json!({"kind": "service", "id": "service:app", "unit": "app.service",
                   "unit_text": unit_text, "notify": ["file:env"]}),
        ),
    ])
}

#[tokio::test]
async fn systemd_service_enables_starts_and_restarts_only_on_change() {
    let root = temp_root();
    std::fs::create_dir_all(root.path().join("run/systemd/system")).unwrap();
    let host = fake_host(&root);
    let env = Env::new(&host);
    let m = service_manifest("A=1\n", UNIT);
    let (first, _) = env.converge(&m).await;
    let svc: Vec<String> = first.steps[1]
        .actions
        .iter()
        .map(|a| a.to_string())
        .collect();
    assert_eq!(
        svc,
        [
            "write unit /etc/systemd/system/app.service",
            "systemctl daemon-reload",
            "systemctl enable app.service",
            "start app.service (systemd)"
        ]
    );
    assert_eq!(
        std::fs::read_to_string(root.path().join("etc/systemd/system/app.service")).unwrap(),
        UNIT
    );
    {
        let sys = host.sys();
        let u = sys.units["app.service"];
        assert_eq!(
            (u.enabled, u.active, u.starts, u.restarts),
            (true, true, 1, 0)
        );
    }
    // A no-op apply restarts nothing.
    let (noop, _) = env.apply(&env.plan(&m).await).await;
    assert!(noop.changed().next().is_none());
    assert_eq!(host.sys().units["app.service"].restarts, 0);

    // The notify input changes: one restart, no daemon-reload.
    let m2 = service_manifest("A=2\n", UNIT);
    let p = env.plan(&m2).await;
    let svc: Vec<String> = p.steps[1].actions.iter().map(|a| a.to_string()).collect();
    assert_eq!(svc, ["restart app.service (systemd; notified by file:env)"]);
    env.apply(&p).await;
    assert_eq!(host.sys().units["app.service"].restarts, 1);
    assert_eq!(host.sys().daemon_reloads, 1);
    assert!(env.plan(&m2).await.is_empty());

    // The unit text changes: write, reload, restart.
    let m3 = service_manifest("A=2\n", &UNIT.replace("1000", "2000"));
    let p = env.plan(&m3).await;
    assert_eq!(p.steps[1].actions.len(), 3, "{p}");
    env.apply(&p).await;
    assert_eq!(host.sys().units["app.service"].restarts, 2);
    assert!(env.plan(&m3).await.is_empty());
}

#[tokio::test]
async fn a_unit_with_an_unknown_key_is_refused_before_anything_is_written() {
    let root = temp_root();
    let host = fake_host(&root);
    let m = service_manifest(
        "A=1\n",
        &UNIT.replace("Type=simple", "ProtectSystem=strict"),
    );
    let observed = observe(
        &m,
        &ObserveEnv {
            host: &host,
            supervisor: None,
            readiness: &hiveseed_bootstrap::Unavailable,
            probe_timeout: Duration::from_secs(1),
        },
    )
    .await
    .unwrap();
    let err = plan(&m, &observed, &PlanContext::now()).unwrap_err();
    let msg = format!("{:#}", anyhow::Error::new(err));
    assert!(msg.contains("ProtectSystem"), "{msg}");
    assert!(!root.path().join("etc/app.env").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn supervised_service_starts_once_and_restarts_only_on_change() {
    let root = temp_root();
    let host: Arc<dyn Host> = Arc::new(RealHost::new(root.path()).unwrap());
    let sup = Supervisor::new(
        host.clone(),
        SupervisorSettings {
            launcher: env!("CARGO_BIN_EXE_bootstrap").into(),
            ..SupervisorSettings::default()
        },
    );
    let mut env = Env::new(host.as_ref());
    env.supervisor = Some(&sup);
    let m = service_manifest("A=1\n", UNIT);
    let (first, _) = env.converge(&m).await;
    assert!(first.actions().any(|a| matches!(
        a,
        Action::StartUnit {
            manager: ServiceManager::Supervisor,
            ..
        }
    )));
    let s1 = sup.status("app.service").unwrap();
    assert_eq!(s1.starts, 1);
    let pid1 = s1.pid.unwrap();

    // No-op apply: same process.
    let (noop, _) = env.apply(&env.plan(&m).await).await;
    assert!(noop.changed().next().is_none());
    let s = sup.status("app.service").unwrap();
    assert_eq!((s.starts, s.pid), (1, Some(pid1)));

    // Input change: restarted, new pid.
    let m2 = service_manifest("A=2\n", UNIT);
    let p = env.plan(&m2).await;
    assert!(
        p.actions().any(|a| matches!(a, Action::RestartUnit { .. })),
        "{p}"
    );
    env.apply(&p).await;
    let s = sup.status("app.service").unwrap();
    assert_eq!(s.starts, 2);
    assert_ne!(s.pid, Some(pid1));
    assert!(env.plan(&m2).await.is_empty());
    sup.stop("app.service").await.unwrap();
    assert!(!sup.is_active("app.service"));
}

#[tokio::test(start_paused = true)]
async fn wait_for_a_node_blocks_reports_then_is_satisfied() {
    let root = temp_root();
    let host = RealHost::new(root.path()).unwrap();
    // Not ready at observe (1st call), nor on the 1st apply probe (2nd), ready on the 3rd.
    let readiness = CountingReadiness::new(3);
    let mut env = Env::new(&host);
    env.readiness = &readiness;
    let m = manifest(vec![res(json!({"kind": "wait", "id": "wait:pg",
        "target": {"type": "node", "node": "do-1461-pg-nyc3-01", "gate": "ready"},
        "timeout_secs": 60}))]);
    let first = env.plan(&m).await;
    assert!(!first.is_empty());
    let (summary, events) = env.apply(&first).await;
    assert_eq!(summary.reports[0].outcome, Outcome::Changed);
    assert!(events.contains(&ApplyEvent::Waiting {
        id: "wait:pg".parse().unwrap(),
        blocked_on: "do-1461-pg-nyc3-01:ready".into()
    }));
    assert_eq!(readiness.calls.load(Ordering::SeqCst), 3);
    assert!(env.plan(&m).await.is_empty());
}

#[tokio::test]
async fn wait_for_tcp_is_empty_when_listening() {
    let root = temp_root();
    let host = RealHost::new(root.path()).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let m = manifest(vec![res(json!({"kind": "wait", "id": "wait:tcp",
        "target": {"type": "tcp", "host": "127.0.0.1", "port": port}, "timeout_secs": 5}))]);
    let env = Env::new(&host);
    assert!(env.plan(&m).await.is_empty());
    drop(listener);
    let p = env.plan(&m).await;
    assert!(
        matches!(p.actions().next(), Some(Action::Wait { .. })),
        "{p}"
    );
}

#[tokio::test]
async fn checks_report_pass_fail_and_why() {
    let root = temp_root();
    let host = RealHost::new(root.path()).unwrap();
    std::fs::write(root.path().join("bin.dat"), b"abc").unwrap();
    let mut child = std::process::Command::new("/bin/sleep")
        .arg("321")
        .spawn()
        .unwrap();
    let m = manifest(vec![
        res(
            json!({"kind": "check", "id": "check:sha", "check": "binary.sha256",
            "expected": Sha256::digest(b"abc").to_hex(), "probe": {"type": "file_sha256", "path": "/bin.dat"}}),
        ),
        res(
            json!({"kind": "check", "id": "check:missing", "check": "missing.sha256",
            "expected": "x", "probe": {"type": "file_sha256", "path": "/nope"}}),
        ),
        res(json!({"kind": "check", "id": "check:echo", "check": "echo",
            "expected": "ai-memory 0.7.0", "probe": {"type": "command_output", "argv": ["/bin/echo", "ai-memory 0.7.0"]}})),
        res(
            json!({"kind": "check", "id": "check:contains", "check": "echo.contains",
            "expected": "0.7.0", "probe": {"type": "command_output", "argv": ["/bin/echo", "ai-memory 0.7.0"]}}),
        ),
        res(
            json!({"kind": "check", "id": "check:norun", "check": "norun",
            "expected": "x", "probe": {"type": "command_output", "argv": ["/nonexistent/binary"]}}),
        ),
        res(
            json!({"kind": "check", "id": "check:procs", "check": "daemon.count",
            "expected": "1", "probe": {"type": "process_count", "exe": "/bin/sleep", "arg": "321"}}),
        ),
        res(
            json!({"kind": "check", "id": "check:active", "check": "service.active",
            "expected": "active", "probe": {"type": "service_active", "unit": "app.service"}}),
        ),
    ]);
    // Checks never plan anything and apply reports them unchanged.
    let env = Env::new(&host);
    let p = env.plan(&m).await;
    assert!(p.is_empty());
    let (summary, _) = env.apply(&p).await;
    assert!(summary
        .reports
        .iter()
        .all(|r| r.outcome == Outcome::Unchanged));

    let node = node();
    let records = run_checks(
        &m,
        &CheckEnv {
            host: &host,
            node: &node,
            manager: ServiceManager::Supervisor,
            supervisor: None,
            timeout: Duration::from_secs(5),
        },
    )
    .await;
    let _ = child.kill();
    let _ = child.wait();
    let status: Vec<(&str, CheckStatus)> = records
        .iter()
        .map(|r| (r.check.as_str(), r.status))
        .collect();
    assert_eq!(
        status,
        [
            ("binary.sha256", CheckStatus::Pass),
            ("missing.sha256", CheckStatus::Fail),
            ("echo", CheckStatus::Pass),
            ("echo.contains", CheckStatus::Fail),
            ("norun", CheckStatus::Fail),
            ("daemon.count", CheckStatus::Pass),
            ("service.active", CheckStatus::Fail),
        ]
    );
    assert!(
        records[1].got.contains("/nope is missing"),
        "{}",
        records[1].got
    );
    assert_eq!(records[2].got, "ai-memory 0.7.0");
    assert_eq!(records[3].got, "ai-memory 0.7.0");
    assert!(records[4].got.contains("cannot run"), "{}", records[4].got);
    assert_eq!(records[6].got, "inactive");
    assert!(records.iter().all(|r| r.node == node));
}

const FED_ID: &str = "do-1461/nyc3/do-1461-peer-nyc3-01";

fn federation_manifest(issuer: &TestIssuer) -> hiveseed_proto::Manifest {
    let owner = json!({"owner": "postgres", "group": "postgres"});
    manifest(vec![
        res(
            json!({"kind": "federation_key", "id": "key:federation", "fed_id": FED_ID,
            "key_dir": "/etc/ai-memory/keys", "owner": owner}),
        ),
        res(
            json!({"kind": "federation_credential", "id": "credential:federation",
            "fed_id": FED_ID, "key_dir": "/etc/ai-memory/keys",
            "credential_path": "/etc/ai-memory/credential", "issuer": issuer.public,
            "owner": owner}),
        ),
    ])
}

/// Every encoding of a secret a log line, request body or database could carry it in.
fn encodings(secret: &[u8]) -> Vec<Vec<u8>> {
    use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
    use base64::Engine;
    vec![
        secret.to_vec(),
        hex::encode(secret).into_bytes(),
        hex::encode_upper(secret).into_bytes(),
        STANDARD.encode(secret).into_bytes(),
        STANDARD_NO_PAD.encode(secret).into_bytes(),
        URL_SAFE.encode(secret).into_bytes(),
        URL_SAFE_NO_PAD.encode(secret).into_bytes(),
    ]
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

fn credential_plan_reason(p: &hiveseed_bootstrap::Plan) -> Option<CredentialReason> {
    p.actions().find_map(|a| match a {
        Action::RequestCredential { reason, .. } => Some(*reason),
        _ => None,
    })
}

#[tokio::test]
async fn federation_key_stays_on_node_and_credential_renews_at_two_thirds() {
    let root = temp_root();
    let host = RealHost::new(root.path()).unwrap();
    let issuer = TestIssuer::new();
    let m = federation_manifest(&issuer);
    let mut env = Env::new(&host);
    env.issuer = &issuer;
    let (first, _) = env.converge(&m).await;
    let actions: Vec<&Action> = first.actions().collect();
    assert!(
        matches!(
            actions[..],
            [
                Action::GenerateFederationKey { .. },
                Action::RequestCredential {
                    reason: CredentialReason::NoKey,
                    ..
                }
            ]
        ),
        "{first}"
    );

    // ai-memory's layout: nested directories for the slashed id, raw 32-byte seed and public key.
    let p = |rel: &str| root.path().join(rel);
    let priv_path = p("etc/ai-memory/keys/do-1461/nyc3/do-1461-peer-nyc3-01.priv");
    let pub_path = p("etc/ai-memory/keys/do-1461/nyc3/do-1461-peer-nyc3-01.pub");
    let cred_path = p("etc/ai-memory/credential");
    let meta = |path: &std::path::Path| {
        let m = std::fs::metadata(path).unwrap();
        (m.mode() & 0o7777, m.uid(), m.gid())
    };
    assert_eq!(meta(&priv_path), (0o400, 101, 104));
    assert_eq!(meta(&pub_path), (0o444, 101, 104));
    assert_eq!(meta(&cred_path), (0o400, 101, 104));
    for d in [
        "etc/ai-memory/keys",
        "etc/ai-memory/keys/do-1461",
        "etc/ai-memory/keys/do-1461/nyc3",
    ] {
        assert_eq!(meta(&p(d)), (0o700, 101, 104), "{d}");
    }
    let seed: [u8; 32] = std::fs::read(&priv_path).unwrap().try_into().unwrap();
    let public = ed25519_dalek::SigningKey::from_bytes(&seed).verifying_key();
    assert_eq!(std::fs::read(&pub_path).unwrap(), public.as_bytes());

    // The credential is the campaign CA's, for this identity and this key.
    let text = std::fs::read_to_string(&cred_path).unwrap();
    let trusted = [(
        issuer.public.id.as_str(),
        issuer.public.public_key.verifying_key(),
    )];
    let claims =
        hiveseed_proto::credential::verify(&text, &trusted, Some("do-1461.fleet"), unix_now())
            .unwrap();
    assert_eq!(claims.subject_agent_id, FED_ID);
    assert_eq!(claims.subject_pubkey, public.to_bytes());

    // Only the public half went out: the one request carries no encoding of the seed.
    {
        let requests = issuer.requests.lock().unwrap();
        assert_eq!(requests.len(), 1);
        let req: hiveseed_proto::api::CredentialRequest =
            serde_json::from_str(&requests[0]).unwrap();
        assert_eq!(req.subject_pubkey.to_bytes(), public.to_bytes());
        assert_eq!(req.fed_id.as_str(), FED_ID);
        for e in encodings(&seed) {
            assert!(
                !contains(requests[0].as_bytes(), &e),
                "the seed left the node"
            );
        }
    }

    // Past 2/3 of its lifetime (or expired, or from another CA): renewed, same key, nothing else.
    let other_ca = TestIssuer::new();
    for (what, stale) in [
        (
            "past 2/3",
            issuer.mint_for(FED_ID, public.to_bytes(), 2500, 3600),
        ),
        (
            "expired",
            issuer.mint_for(FED_ID, public.to_bytes(), 7200, 3600),
        ),
        (
            "another CA's",
            other_ca.mint_for(FED_ID, public.to_bytes(), 0, 3600),
        ),
        (
            "another identity's",
            issuer.mint_for("do-1461/nyc3/x", public.to_bytes(), 0, 3600),
        ),
    ] {
        std::fs::write(&cred_path, &stale).unwrap();
        let due = env.plan(&m).await;
        assert_eq!(due.changing().count(), 1, "{what}: {due}");
        assert!(credential_plan_reason(&due).is_some(), "{what}: {due}");
        env.apply(&due).await;
        assert!(env.plan(&m).await.is_empty(), "{what}");
        let renewed = std::fs::read_to_string(&cred_path).unwrap();
        assert_ne!(renewed, stale, "{what}");
        hiveseed_proto::credential::verify(&renewed, &trusted, Some("do-1461.fleet"), unix_now())
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(meta(&cred_path), (0o400, 101, 104), "{what}");
    }
    assert_eq!(
        std::fs::read(&priv_path).unwrap(),
        seed,
        "renewal keeps the key"
    );
    assert_eq!(issuer.requests.lock().unwrap().len(), 5);

    // Loosened modes are restored without a new credential.
    std::fs::set_permissions(&priv_path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let fix = env.plan(&m).await;
    assert!(
        matches!(
            fix.actions().collect::<Vec<_>>()[..],
            [Action::Chmod { .. }]
        ),
        "{fix}"
    );
    env.apply(&fix).await;
    assert_eq!(meta(&priv_path).0, 0o400);

    // A stale .pub is rewritten from the seed; the credential stays.
    let cred_before = std::fs::read(&cred_path).unwrap();
    std::fs::write(&pub_path, [0u8; 32]).unwrap();
    let fix = env.plan(&m).await;
    assert!(
        matches!(
            fix.actions().collect::<Vec<_>>()[..],
            [Action::WriteFederationPub { .. }]
        ),
        "{fix}"
    );
    env.apply(&fix).await;
    assert_eq!(std::fs::read(&pub_path).unwrap(), public.as_bytes());
    assert_eq!(std::fs::read(&cred_path).unwrap(), cred_before);

    // A lost key: a new one, and a credential for it.
    std::fs::remove_file(&priv_path).unwrap();
    let regen = env.plan(&m).await;
    assert_eq!(
        credential_plan_reason(&regen),
        Some(CredentialReason::NoKey),
        "{regen}"
    );
    env.apply(&regen).await;
    assert!(env.plan(&m).await.is_empty());
    let new_seed = std::fs::read(&priv_path).unwrap();
    assert_ne!(new_seed, seed);
    let new_public = ed25519_dalek::SigningKey::from_bytes(&new_seed.try_into().unwrap())
        .verifying_key()
        .to_bytes();
    let claims = hiveseed_proto::credential::verify(
        &std::fs::read_to_string(&cred_path).unwrap(),
        &trusted,
        None,
        unix_now(),
    )
    .unwrap();
    assert_eq!(claims.subject_pubkey, new_public);

    // A seeder answering with a credential for another key is refused; nothing is written.
    std::fs::write(&cred_path, issuer.mint_for(FED_ID, new_public, 3000, 3600)).unwrap();
    let before = std::fs::read(&cred_path).unwrap();
    *issuer.substitute.lock().unwrap() = Some(public.to_bytes());
    let due = env.plan(&m).await;
    let node = node();
    let apply_env = hiveseed_bootstrap::ApplyEnv {
        host: &host,
        node: &node,
        fetcher: &hiveseed_bootstrap::Unavailable,
        signer: &hiveseed_bootstrap::Unavailable,
        issuer: &issuer,
        readiness: &hiveseed_bootstrap::Unavailable,
        supervisor: None,
        settings: Default::default(),
    };
    let err = hiveseed_bootstrap::apply(&due, &apply_env, &mut |_| {})
        .await
        .unwrap_err();
    let msg = format!("{:#}", anyhow::Error::new(err));
    assert!(msg.contains("credential is for another key"), "{msg}");
    assert_eq!(std::fs::read(&cred_path).unwrap(), before);
}
