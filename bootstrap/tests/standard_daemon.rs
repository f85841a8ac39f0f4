//! The `namespace_standard` resource against a real ai-memory 0.7.0 daemon in the peers' posture
//! (mTLS allowlist, API key, attested writes required, the operator agent as admin) on 127.0.73.1:
//! unset → set (owner registered and bound, memory signed by the seeder's signing code, standard
//! pointed at it) → in force; a second run reuses the memory; the owner alone writes into the
//! namespace afterwards; a memory signed with another key is refused and nothing is set. The
//! role's governance table is the pinned binary's `namespace batman-policy`.
//!
//! Needs the ai-memory binary (`HIVESEED_AI_MEMORY_BIN`, default the lab cache's): without it
//! the test fails (tests/deps).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use ed25519_dalek::SigningKey;
use hiveseed_bootstrap::resources::standard::{self, Observed};
use hiveseed_bootstrap::{BoxFuture, CredentialIssuer, RealHost, SignError};
use hiveseed_proto::api::{AttestRequest, AttestResponse, CredentialRequest, CredentialResponse};
use hiveseed_proto::manifest::NamespaceStandard;
use hiveseed_seeder::attest::{self, AttestedWrite};
use hiveseed_seeder::pki::{self, CampaignCa, LeafSpec, LeafUsage};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use sha2::Digest;

/// This file's loopback address (the lab owns 127.0.1-3.x, 127.1.x.x and 127.0.9.1).
const DAEMON_IP: &str = "127.0.73.1";
const API_KEY: &str = "73737373737373737373737373737373";
const OWNER: &str = "ai:std-operator@std";
const NAMESPACE: &str = "std";

/// The seeder's signing code (`POST /v1/attest` answers with exactly this) behind the agent's
/// collaborator trait, with the key the test chooses.
struct Signer(SigningKey);

impl CredentialIssuer for Signer {
    fn issue<'a>(
        &'a self,
        _: &'a CredentialRequest,
    ) -> BoxFuture<'a, Result<CredentialResponse, SignError>> {
        Box::pin(async {
            Err(SignError {
                message: "not in this test".into(),
                retryable: false,
            })
        })
    }

    fn attest<'a>(
        &'a self,
        req: &'a AttestRequest,
    ) -> BoxFuture<'a, Result<AttestResponse, SignError>> {
        Box::pin(async move {
            Ok(attest::sign_request(
                OWNER,
                &self.0,
                req,
                attest::rfc3339_now(),
            ))
        })
    }
}

/// The daemon, SIGINTed and reaped when dropped.
struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(pid) = rustix::process::Pid::from_raw(self.0.id() as i32) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
        }
        let _ = self.0.wait();
    }
}

fn write_private(path: &Path, bytes: &[u8]) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, bytes).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

/// The governance table of `roles/peer.toml`'s namespace_standard, as JSON.
fn role_governance() -> serde_json::Value {
    let role: toml::Value = toml::from_str(include_str!("../../roles/peer.toml")).unwrap();
    let r = role["resource"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["kind"].as_str() == Some("namespace_standard"))
        .expect("roles/peer.toml has no namespace_standard");
    serde_json::to_value(&r["governance"]).unwrap()
}

fn standard(port: u16, owner_key: &SigningKey, ns: &str) -> NamespaceStandard {
    serde_json::from_value(serde_json::json!({
        "id": "standard:campaign",
        "url": format!("https://{DAEMON_IP}:{port}"),
        "ca_path": "/tls/ca.pem",
        "cert_path": "/tls/client.pem",
        "key_path": "/tls/client.key",
        "api_key_file": "/api.key",
        "namespace": ns,
        "owner": {
            "agent_id": OWNER,
            "public_key": hiveseed_proto::Ed25519PublicKey::from(owner_key.verifying_key()),
        },
        "memory": {
            "title": format!("batman-active standard for {ns} (std-peer-r1-01)"),
            "kind": "observation",
            "content": format!("Form 2 + Form 6 namespace standard for {ns}."),
        },
        "governance": role_governance(),
    }))
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_standard_is_set_once_in_force_and_owner_only() {
    let Some(bin) = hiveseed_test_deps::ai_memory() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("node");
    let home = tmp.path().join("home");

    // The role's table is the pinned binary's canonical Batman policy. Any ai-memory command
    // opens ./ai-memory.db, so it runs in the temp dir, never in the source tree.
    std::fs::create_dir_all(&home).unwrap();
    let out = Command::new(&bin)
        .args(["namespace", "batman-policy", "--json"])
        .env_clear()
        .env("HOME", &home)
        .current_dir(&home)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    let policy: serde_json::Value = serde_json::from_str(&text[text.find('{').unwrap()..]).unwrap();
    assert_eq!(
        policy,
        role_governance(),
        "roles/peer.toml governance drifted"
    );

    // PKI, allowlist and the node-side files the resource reads (paths under the node root).
    let (ca_pem, ca_key) = pki::generate_ca("std", SystemTime::now()).unwrap();
    let ca = CampaignCa::load(&ca_pem, &ca_key).unwrap();
    let leaf = |name: &str, sans: Vec<String>, usage| {
        ca.issue_with_new_key(&LeafSpec {
            common_name: name.into(),
            sans,
            usage,
            not_before: SystemTime::now(),
            lifetime: Duration::from_secs(3600),
        })
        .unwrap()
    };
    let (server_pem, server_key) = leaf("std-server", vec![DAEMON_IP.into()], LeafUsage::Server);
    let (client_pem, client_key) = leaf("std-client", vec![], LeafUsage::Client);
    write_private(&root.join("tls/ca.pem"), ca_pem.as_bytes());
    write_private(&root.join("tls/client.pem"), client_pem.as_bytes());
    write_private(&root.join("tls/client.key"), client_key.as_bytes());
    write_private(&root.join("api.key"), format!("{API_KEY}\n").as_bytes());
    let daemon_dir = tmp.path().join("daemon");
    write_private(&daemon_dir.join("server.pem"), server_pem.as_bytes());
    write_private(&daemon_dir.join("server.key"), server_key.as_bytes());
    let der = CertificateDer::from_pem_slice(client_pem.as_bytes()).unwrap();
    let allowlist = daemon_dir.join("allowlist.txt");
    std::fs::write(
        &allowlist,
        format!(
            "{}  # std-client\n",
            hex::encode(sha2::Sha256::digest(der.as_ref()))
        ),
    )
    .unwrap();
    write_private(
        &home.join(".config/ai-memory/config.toml"),
        format!(
            "tier = \"keyword\"\ndb = \"{}\"\napi_key = \"{API_KEY}\"\n\n[admin]\nagent_ids = [\"{OWNER}\"]\n",
            daemon_dir.join("ai-memory.db").display()
        )
        .as_bytes(),
    );

    let port = std::net::TcpListener::bind(format!("{DAEMON_IP}:0"))
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let log = daemon_dir.join("daemon.log");
    let _daemon = Daemon(
        Command::new(&bin)
            .args(["serve", "--host", DAEMON_IP, "--port", &port.to_string()])
            .args([
                "--tls-cert",
                &daemon_dir.join("server.pem").display().to_string(),
            ])
            .args([
                "--tls-key",
                &daemon_dir.join("server.key").display().to_string(),
            ])
            .args(["--mtls-allowlist", &allowlist.display().to_string()])
            .env_clear()
            .env("HOME", &home)
            .env("RUST_LOG", "warn")
            .env("AI_MEMORY_REQUIRE_AGENT_ATTESTATION", "1")
            .env("AI_MEMORY_PERMISSIONS_MODE", "enforce")
            .env("AI_MEMORY_GOVERNANCE_FAIL_OPEN_ON_ERROR", "0")
            .current_dir(&daemon_dir)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(std::fs::File::create(daemon_dir.join("daemon.err")).unwrap())
            .spawn()
            .unwrap(),
    );

    let host = RealHost::new(&root).unwrap();
    let owner_key = SigningKey::from_bytes(&[73; 32]);
    let s = standard(port, &owner_key, NAMESPACE);
    let seeder = Signer(owner_key.clone());

    // Unset until set; the first observations may find the daemon still starting.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let first = loop {
        tick.tick().await;
        match standard::observe(&host, &s, Duration::from_secs(5)).await {
            Observed::Differs(why) if why.contains("GET") || why.contains("answer") => {
                assert!(
                    Instant::now() < deadline,
                    "daemon not answering: {why}\n{}",
                    std::fs::read_to_string(daemon_dir.join("daemon.err")).unwrap_or_default()
                );
            }
            o => break o,
        }
    };
    assert_eq!(
        first,
        Observed::Differs(format!("namespace {NAMESPACE} has no standard"))
    );
    assert_eq!(standard::plan(&s, &first).len(), 1);

    standard::ensure(&host, &seeder, &s).await.unwrap();
    let now = standard::observe(&host, &s, Duration::from_secs(5)).await;
    assert_eq!(now, Observed::InForce);
    assert!(standard::plan(&s, &now).is_empty());

    // The node checks' probe reads the same standard memory.
    let daemon = standard::Daemon::connect(
        &host,
        &s.url,
        &s.ca_path,
        &s.cert_path,
        &s.key_path,
        &s.api_key_file,
        OWNER,
    )
    .unwrap();
    let m = daemon.standard_memory(NAMESPACE).await.unwrap().unwrap();
    assert_eq!(m["title"], s.memory.title.as_str());
    assert_eq!(
        m["metadata"]["governance"]["auto_classify_kind"],
        "regex_then_llm"
    );
    assert_eq!(daemon.standard_memory("std-none").await.unwrap(), None);

    // A second run (a re-bind after drift, or a replaced node whose store survived) reuses the
    // memory: the write answers 409 with the existing id.
    standard::ensure(&host, &seeder, &s).await.unwrap();
    assert_eq!(
        standard::observe(&host, &s, Duration::from_secs(5)).await,
        Observed::InForce
    );

    // Owner-only writes into the namespace: the owner's attested write lands, another agent's
    // (registered, bound, correctly signed) is refused by governance.
    let client = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(ca_pem.as_bytes()).unwrap())
        .identity(
            reqwest::Identity::from_pem(format!("{client_pem}{client_key}").as_bytes()).unwrap(),
        )
        .build()
        .unwrap();
    let base = format!("https://{DAEMON_IP}:{port}/api/v1");
    let call = |method: reqwest::Method, path: String, agent: &str, body: serde_json::Value| {
        client
            .request(method, format!("{base}{path}"))
            .header("x-api-key", API_KEY)
            .header("x-agent-id", agent)
            .json(&body)
            .send()
    };
    let other = "ai:someone-else@std";
    let other_key = SigningKey::from_bytes(&[74; 32]);
    let r = call(
        reqwest::Method::POST,
        "/agents".into(),
        other,
        serde_json::json!({"agent_id": other, "agent_type": "ai:harness", "capabilities": ["attested-write"]}),
    )
    .await
    .unwrap();
    assert!(r.status().is_success(), "{r:?}");
    let r = call(
        reqwest::Method::PUT,
        format!("/agents/{other}/pubkey"),
        OWNER,
        serde_json::json!({"pubkey_b64": attest::pubkey_b64(&other_key)}),
    )
    .await
    .unwrap();
    assert!(r.status().is_success(), "{r:?}");
    let write = |agent: &str, key: &SigningKey, title: &str| {
        AttestedWrite {
            agent_id: agent.into(),
            namespace: NAMESPACE.into(),
            title: title.into(),
            kind: "observation".into(),
            scope: "collective".into(),
            content: format!("{title} content"),
            created_at: attest::rfc3339_now(),
        }
        .body(key)
    };
    let r = call(
        reqwest::Method::POST,
        "/memories".into(),
        OWNER,
        write(OWNER, &owner_key, "owner write"),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 201, "{:?}", r.text().await);
    let r = call(
        reqwest::Method::POST,
        "/memories".into(),
        other,
        write(other, &other_key, "other write"),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 403);
    let body = r.text().await.unwrap();
    assert!(body.contains("not the owner"), "{body}");

    // A memory signed with a key other than the one bound is refused, and nothing is set.
    let forged = standard(port, &owner_key, "std-forged");
    let err = standard::ensure(&host, &Signer(SigningKey::from_bytes(&[75; 32])), &forged)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("namespace standard std-forged: writing the standard memory answered 403"),
        "{err}"
    );
    assert!(!err.contains(API_KEY), "{err}");
    assert_eq!(
        standard::observe(&host, &forged, Duration::from_secs(5)).await,
        Observed::Differs("namespace std-forged has no standard".into())
    );

    // A wrong API key file: refused before anything is sent, and the key is not echoed.
    write_private(&root.join("api.key"), b"wrong-key\n");
    let err = standard::ensure(&host, &seeder, &s)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("registering ai:std-operator@std answered 401"),
        "{err}"
    );
    assert!(!err.contains("wrong-key"), "{err}");
}
