//! The real agent binary against the real seeder (in-process, real TLS on loopback): two nodes in
//! temp roots enroll, converge (the peer waits for its pg), pick up a redeploy, repair drift,
//! and spool reports while the seeder is down, delivering them in order when it returns.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ed25519_dalek::pkcs8::DecodePrivateKey;
use hiveseed_proto::token::{JoinClaims, TOKEN_VERSION};
use hiveseed_proto::JoinToken;
use hiveseed_seeder::campaign::{self, CampaignDir};
use hiveseed_seeder::fleet::Fleet;
use hiveseed_seeder::state::Policy;
use hiveseed_seeder::store::Store;

const FLEET: &str = r#"campaign = "e2e"
seeder_url = "https://127.0.9.1:8443"

[regions.r1]
pg = 1
peer = 1
vpc_cidr = "127.0.1.0/24"

[federation]
catchup_interval_secs = 30

[ttl]
report_interval_secs = 5

[pins.postgres]
major = 17
source = "distro"
server = "*"
pgvector = "*"
age = "*"
expect_server = "17"
expect_pgvector = "0"
expect_age = "0"

[pins.ai_memory]
version = "0.7.0"
sha256 = "abababababababababababababababababababababababababababababababab"
schema = 57
"#;

const PG: &str = r#"
[[resource]]
kind = "directory"
id = "dir:app"
path = "/etc/app"
mode = "0755"

[[resource]]
kind = "file"
id = "file:app-conf"
path = "/etc/app/app.conf"
mode = "0600"
secret = true
content = { type = "text", text = "node={{ node.name }}\npassword={{ secrets.pg_password }}\n" }

[[resource]]
kind = "service"
id = "service:app"
unit = "e2e-app.service"
notify = ["file:app-conf"]
unit_text = """[Unit]
Description=e2e workload
[Service]
Type=simple
ExecStart=/bin/sleep 100000
Restart=always
RestartSec=1
"""

[[resource]]
kind = "check"
id = "check:app"
check = "app.active"
expected = "active"
probe = { type = "service_active", unit = "e2e-app.service" }
"#;

/// Holds the pg in a wait until the test opens this address: long enough to see heartbeats.
const GATE_ADDR: &str = "127.0.9.2:47123";
const PG_GATE: &str = r#"
[[resource]]
kind = "wait"
id = "wait:gate"
timeout_secs = 120
target = { type = "tcp", host = "127.0.9.2", port = 47123 }
"#;

const PEER: &str = r#"
[[resource]]
kind = "wait"
id = "wait:pg"
when = "region.pg is not none"
timeout_secs = 120
target = { type = "node", node = "{{ region.pg.name }}", gate = "converged" }

[[resource]]
kind = "file"
id = "file:peer-conf"
when = "region.pg is not none"
path = "/etc/peer/peer.conf"
mode = "0644"
content = { type = "text", text = "pg={{ region.pg.private_ip }}\ncatchup={{ fleet.federation.catchup_interval_secs }}\n" }
"#;

struct Server {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

async fn serve(dir: &CampaignDir, addr: SocketAddr) -> Server {
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let dir = dir.clone();
    let task = tokio::spawn(async move {
        hiveseed_seeder::cli::serve_on(dir, listener, Policy::default(), async {
            let _ = rx.await;
        })
        .await
    });
    Server {
        stop: Some(tx),
        task,
    }
}

impl Server {
    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.task.await.unwrap().unwrap();
    }
}

struct Node {
    root: PathBuf,
    child: Option<Child>,
}

impl Node {
    fn new(tmp: &Path, dir: &CampaignDir, name: &str, role: &str, n: u8, seeder: &str) -> Self {
        let root = tmp.join(name);
        std::fs::create_dir_all(root.join("etc/hiveseed")).unwrap();
        let key = ed25519_dalek::SigningKey::from_pkcs8_pem(
            &std::fs::read_to_string(dir.manifest_key()).unwrap(),
        )
        .unwrap();
        let claims = JoinClaims {
            v: TOKEN_VERSION,
            campaign: "e2e".parse().unwrap(),
            node: name.parse().unwrap(),
            role: role.parse().unwrap(),
            region: "r1".parse().unwrap(),
            exp: hiveseed_bootstrap::agent::unix_now() + 3600,
            nonce: format!("{n:032x}"),
        };
        let token = JoinToken::sign(&claims, &key);
        let join = hiveseed_proto::join::JoinConfig {
            seeder_url: seeder.into(),
            campaign: "e2e".parse().unwrap(),
            node: name.parse().unwrap(),
            role: role.parse().unwrap(),
            region: "r1".parse().unwrap(),
            join_url: format!("{seeder}/v1/join/{name}?token={}", token.as_str()),
            ca_pem: std::fs::read_to_string(dir.ca_cert()).unwrap(),
            manifest_key_pem: std::fs::read_to_string(dir.manifest_pub()).unwrap(),
        };
        std::fs::write(
            root.join("etc/hiveseed/join.toml"),
            toml::to_string(&join).unwrap(),
        )
        .unwrap();
        std::fs::write(
            root.join("etc/hiveseed/facts.json"),
            format!(
                r#"{{"droplet_id": {n}, "region": "r1", "public_ipv4": "127.1.1.{n}", "private_ipv4": "127.0.1.{n}"}}"#
            ),
        )
        .unwrap();
        Self { root, child: None }
    }

    fn start(&mut self) {
        let log = std::fs::File::create(self.root.join("agent.log")).unwrap();
        self.child = Some(
            Command::new(env!("CARGO_BIN_EXE_bootstrap"))
                .args([
                    "--root",
                    self.root.to_str().unwrap(),
                    "agent",
                    "--drift-interval",
                    "2",
                ])
                .env("RUST_LOG", "info")
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .stdin(Stdio::null())
                .spawn()
                .unwrap(),
        );
    }

    fn read(&self, p: &str) -> Option<String> {
        std::fs::read_to_string(self.root.join(p)).ok()
    }

    fn service_pid(&self, unit: &str) -> Option<u32> {
        // The supervisor's pid record (JSON, `pid` among the process's recorded identity).
        let rec: serde_json::Value =
            serde_json::from_str(&self.read(&format!("run/hiveseed/{unit}.pid"))?).ok()?;
        rec["pid"].as_u64().and_then(|p| u32::try_from(p).ok())
    }

    fn spooled(&self) -> usize {
        std::fs::read_dir(self.root.join("var/lib/hiveseed/spool"))
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .filter(|e| e.file_name().to_string_lossy().ends_with(".json"))
                    .count()
            })
            .unwrap_or(0)
    }

    fn log(&self) -> String {
        self.read("agent.log").unwrap_or_default()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        // Supervised children outlive a killed agent (by design: the next agent adopts them).
        if let Ok(d) = std::fs::read_dir(self.root.join("run/hiveseed")) {
            for e in d.flatten() {
                if let Some(pid) = std::fs::read_to_string(e.path())
                    .ok()
                    .and_then(|s| s.trim().parse::<i32>().ok())
                {
                    let _ = Command::new("kill")
                        .arg("-KILL")
                        .arg(pid.to_string())
                        .status();
                }
            }
        }
    }
}

async fn eventually<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        tick.tick().await;
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
    }
}

fn view(store: &Store, fleet_text: &str) -> hiveseed_seeder::report::FleetView {
    let fleet = Fleet::parse(fleet_text).unwrap();
    hiveseed_seeder::report::fleet_view(store, &fleet, hiveseed_bootstrap::agent::unix_now())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_converge_redeploy_repair_and_spool_through_a_seeder_outage() {
    let tmp = tempfile::tempdir().unwrap();
    let roles = tmp.path().join("roles");
    std::fs::create_dir_all(&roles).unwrap();
    std::fs::write(roles.join("fleet.toml"), FLEET).unwrap();
    std::fs::write(roles.join("pg.toml"), format!("{PG_GATE}{PG}")).unwrap();
    std::fs::write(roles.join("peer.toml"), PEER).unwrap();
    let dir = CampaignDir::new(tmp.path().join("campaign"));
    let fleet = Fleet::parse(FLEET).unwrap();
    campaign::init(
        &dir,
        &roles.join("fleet.toml"),
        &roles,
        &fleet,
        std::time::SystemTime::now(),
    )
    .unwrap();

    // An ephemeral port, reused when the seeder comes back.
    let addr = std::net::TcpListener::bind("127.0.9.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let seeder_url = format!("https://{addr}");
    let server = serve(&dir, addr).await;

    let mut pg = Node::new(tmp.path(), &dir, "e2e-pg-r1-01", "pg", 10, &seeder_url);
    let mut peer = Node::new(tmp.path(), &dir, "e2e-peer-r1-01", "peer", 11, &seeder_url);
    // The peer starts first: it must wait for its pg. The pg itself is held in a wait until the
    // test opens GATE_ADDR, and keeps reporting while it waits, so the seeder never counts it
    // missing.
    peer.start();
    pg.start();
    let store = Store::open(&dir.state_db()).unwrap();
    let pg_name: hiveseed_proto::NodeName = "e2e-pg-r1-01".parse().unwrap();
    let waiting = |store: &Store| {
        store
            .latest_report(&pg_name)
            .unwrap()
            .map(|(r, _)| matches!(r.phase, hiveseed_proto::status::Phase::Waiting { .. }))
            .unwrap_or(false)
    };
    eventually("the pg waits at its gate", Duration::from_secs(30), || {
        waiting(&store).then_some(())
    })
    .await;
    let before = store.report_seqs(&pg_name).unwrap().len();
    eventually(
        "heartbeats while waiting (report interval 5 s)",
        Duration::from_secs(30),
        || {
            (store.report_seqs(&pg_name).unwrap().len() >= before + 2 && waiting(&store))
                .then_some(())
        },
    )
    .await;
    let v = view(&store, FLEET);
    let row = v.nodes.iter().find(|n| n.name == "e2e-pg-r1-01").unwrap();
    assert!(
        !row.missing && row.last_report_age_secs.unwrap_or(99) <= 10,
        "{row:?}"
    );
    let _gate = std::net::TcpListener::bind(GATE_ADDR).unwrap();

    eventually("both nodes converged", Duration::from_secs(60), || {
        view(&store, FLEET).all_converged.then_some(())
    })
    .await;
    let conf = pg.read("etc/app/app.conf").unwrap();
    assert!(conf.starts_with("node=e2e-pg-r1-01\npassword="), "{conf}");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(pg.root.join("etc/app/app.conf"))
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);
    assert_eq!(
        peer.read("etc/peer/peer.conf").unwrap(),
        "pg=127.0.1.10\ncatchup=30\n"
    );
    // The peer reported waiting on its pg before the pg converged.
    let waited = peer.log().contains("waiting blocked_on=");
    let app_pid = pg
        .service_pid("e2e-app.service")
        .expect("service started by the supervisor");
    // The pg's node-local check reached the seeder.
    let (r, _) = store
        .latest_report(&"e2e-pg-r1-01".parse().unwrap())
        .unwrap()
        .unwrap();
    assert!(
        r.checks
            .iter()
            .any(|c| c.check == "app.active" && c.got == "active"),
        "{:?}",
        r.checks
    );

    // Redeploy: a setting only the peer uses. The peer converges on the new generation within
    // seconds; the pg gets no new generation and its service is not restarted.
    let pg_gen = store
        .manifest(&"e2e-pg-r1-01".parse().unwrap())
        .unwrap()
        .unwrap()
        .generation;
    std::fs::write(
        roles.join("fleet.toml"),
        FLEET.replace("catchup_interval_secs = 30", "catchup_interval_secs = 7"),
    )
    .unwrap();
    let d2 = dir.clone();
    let published = Instant::now();
    tokio::task::spawn_blocking(move || hiveseed_seeder::cli::publish(&d2, 30))
        .await
        .unwrap()
        .unwrap();
    eventually(
        "the peer applied the new generation",
        Duration::from_secs(30),
        || {
            (peer.read("etc/peer/peer.conf").as_deref() == Some("pg=127.0.1.10\ncatchup=7\n"))
                .then_some(())
        },
    )
    .await;
    let took = published.elapsed();
    eprintln!(
        "redeploy: publish -> peer applied in {:.2}s",
        took.as_secs_f64()
    );
    assert_eq!(
        store
            .manifest(&"e2e-pg-r1-01".parse().unwrap())
            .unwrap()
            .unwrap()
            .generation,
        pg_gen
    );
    assert_eq!(
        pg.service_pid("e2e-app.service"),
        Some(app_pid),
        "pg service not restarted"
    );

    // The seeder goes down. Drift on the pg is repaired anyway (the agent has its manifest);
    // its reports wait in the spool.
    server.stop().await;
    std::fs::remove_file(pg.root.join("etc/app/app.conf")).unwrap();
    eventually(
        "the pg repaired its drift with the seeder down",
        Duration::from_secs(30),
        || {
            pg.read("etc/app/app.conf")
                .filter(|c| c.starts_with("node="))
                .map(|_| ())
        },
    )
    .await;
    eventually(
        "reports spooled while the seeder is down",
        Duration::from_secs(30),
        || (pg.spooled() > 0).then_some(()),
    )
    .await;
    // The repaired config is a notify input of the service: it was restarted once.
    let new_pid = pg.service_pid("e2e-app.service");
    assert_ne!(
        new_pid,
        Some(app_pid),
        "the service restarts after its config was rewritten"
    );

    // The seeder returns on the same address: everything spooled arrives, in order, no gaps.
    let server = serve(&dir, addr).await;
    eventually("the spool drained", Duration::from_secs(60), || {
        (pg.spooled() == 0).then_some(())
    })
    .await;
    let seqs = store.report_seqs(&"e2e-pg-r1-01".parse().unwrap()).unwrap();
    let first = seqs[0];
    assert_eq!(
        seqs,
        (first..first + seqs.len() as u64).collect::<Vec<_>>(),
        "no report lost"
    );
    assert!(seqs.len() >= 5, "{seqs:?}");
    eventually(
        "the fleet is converged again",
        Duration::from_secs(60),
        || view(&store, FLEET).all_converged.then_some(()),
    )
    .await;
    assert!(waited, "peer log:\n{}", peer.log());
    server.stop().await;
}

/// Files under a root, excluding the agent's own state (its spool and manifest copy).
fn tree(root: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.starts_with(root.join("var/lib/hiveseed")) || p.ends_with("agent.log") {
                continue;
            }
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push((p.clone(), std::fs::read(&p).unwrap_or_default()));
            }
        }
    }
    out.sort();
    out
}

/// Signs arbitrary payload bytes as a manifest envelope (what a compromised or buggy signer
/// could produce), so shapes the typed API cannot build can be offered to the agent.
fn raw_envelope(
    key: &ed25519_dalek::SigningKey,
    payload: &[u8],
) -> hiveseed_proto::SignedEnvelope<hiveseed_proto::Manifest> {
    use base64::Engine;
    use ed25519_dalek::Signer;
    let mut msg = b"hiveseed/manifest/v1\0".to_vec();
    msg.extend_from_slice(payload);
    let sig = key.sign(&msg);
    serde_json::from_value(serde_json::json!({
        "key_id": hiveseed_proto::KeyId::of(&key.verifying_key()),
        "payload": base64::engine::general_purpose::STANDARD.encode(payload),
        "signature": base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(sig.to_bytes()),
    }))
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_manifests_change_nothing_and_identity_renews() {
    let tmp = tempfile::tempdir().unwrap();
    let roles = tmp.path().join("roles");
    std::fs::create_dir_all(&roles).unwrap();
    // Certificates live 120 s: renewal is due after 80 s.
    let fleet_text = FLEET.replace(
        "report_interval_secs = 5",
        "report_interval_secs = 5\ncertificate_secs = 120",
    );
    std::fs::write(roles.join("fleet.toml"), &fleet_text).unwrap();
    std::fs::write(
        roles.join("pg.toml"),
        PG.split("[[resource]]\nkind = \"service\"").next().unwrap(),
    )
    .unwrap();
    std::fs::write(roles.join("peer.toml"), PEER).unwrap();
    let dir = CampaignDir::new(tmp.path().join("campaign"));
    let fleet = Fleet::parse(&fleet_text).unwrap();
    campaign::init(
        &dir,
        &roles.join("fleet.toml"),
        &roles,
        &fleet,
        std::time::SystemTime::now(),
    )
    .unwrap();
    let addr = std::net::TcpListener::bind("127.0.9.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let seeder_url = format!("https://{addr}");
    let server = serve(&dir, addr).await;

    let node = Node::new(tmp.path(), &dir, "e2e-pg-r1-01", "pg", 10, &seeder_url);
    let cfg = hiveseed_bootstrap::agent::AgentConfig {
        root: node.root.clone(),
        ..Default::default()
    };
    let mut agent = hiveseed_bootstrap::agent::Agent::new(cfg.clone())
        .await
        .unwrap();
    let first = agent
        .ensure_enrolled()
        .await
        .unwrap()
        .expect("enrolled now");
    assert!(agent.converge(&first).await, "{}", node.log());
    let good = hiveseed_proto::verify_manifest(
        &first,
        &agent.manifest_key,
        &agent.join.campaign,
        &agent.join.node,
        hiveseed_bootstrap::agent::unix_now(),
        None,
    )
    .unwrap()
    .manifest;
    let before = tree(&node.root);
    let applied = agent.state.applied_state().unwrap();
    assert!(
        applied.is_some(),
        "converged without recording the applied generation"
    );

    let key = ed25519_dalek::SigningKey::from_pkcs8_pem(
        &std::fs::read_to_string(dir.manifest_key()).unwrap(),
    )
    .unwrap();
    let other_key = ed25519_dalek::SigningKey::from_bytes(&[9u8; 32]);
    let resign = |m: &hiveseed_proto::Manifest| hiveseed_proto::SignedEnvelope::sign(m, &key);
    let mut expired = good.clone();
    expired.issued_at -= 100;
    expired.not_after = expired.issued_at + 50;
    let mut other_node = good.clone();
    other_node.node = "e2e-peer-r1-01".parse().unwrap();
    let mut rolled_back = good.clone();
    rolled_back.generation = hiveseed_proto::Generation(good.generation.0 - 1);
    let mut escaping = serde_json::to_value(&good).unwrap();
    escaping["resources"][1]["path"] = "/etc/../root/.ssh/authorized_keys".into();
    let mut unknown_kind = serde_json::to_value(&good).unwrap();
    unknown_kind["resources"][0]["kind"] = "shell".into();
    let cases: Vec<(
        &str,
        hiveseed_proto::SignedEnvelope<hiveseed_proto::Manifest>,
    )> = vec![
        (
            "bad signature",
            hiveseed_proto::SignedEnvelope::sign(&good, &other_key),
        ),
        ("another node's manifest", resign(&other_node)),
        ("expired", resign(&expired)),
        ("rolled-back generation", resign(&rolled_back)),
        (
            "path outside the root",
            raw_envelope(&key, &serde_json::to_vec(&escaping).unwrap()),
        ),
        (
            "unknown resource kind",
            raw_envelope(&key, &serde_json::to_vec(&unknown_kind).unwrap()),
        ),
    ];
    for (what, env) in cases {
        assert!(!agent.converge(&env).await, "{what} was accepted");
        assert_eq!(tree(&node.root), before, "{what} changed the node");
        assert_eq!(
            agent.state.applied_state().unwrap(),
            applied,
            "{what} changed the applied generation"
        );
    }

    // The applied-generation ledger guards against rollback after a restart: a ledger that
    // cannot be written fails the apply, and a corrupt one stops the agent instead of reading
    // as "never applied" (which would accept the rolled-back generation above).
    let ledger = agent.state.applied();
    let kept = std::fs::read(&ledger).unwrap();
    std::fs::remove_file(&ledger).unwrap();
    std::fs::create_dir(&ledger).unwrap();
    assert!(
        !agent.converge(&first).await,
        "an apply whose ledger write failed counted as converged"
    );
    let last: hiveseed_proto::StatusReport =
        serde_json::from_slice(&std::fs::read(agent.state.last_report()).unwrap()).unwrap();
    match &last.phase {
        hiveseed_proto::status::Phase::Failed { kind, message, .. } => {
            assert_eq!(*kind, hiveseed_proto::status::FailureKind::Internal);
            assert!(
                message.contains("recording the applied generation"),
                "{message}"
            );
        }
        other => panic!("reported {other:?} after the ledger write failed"),
    }
    std::fs::remove_dir(&ledger).unwrap();
    for corrupt in [
        &b""[..],
        b"{\"generation\":",
        b"null",
        &kept[..kept.len() - 1],
    ] {
        std::fs::write(&ledger, corrupt).unwrap();
        let err = hiveseed_bootstrap::agent::Agent::new(cfg.clone())
            .await
            .err()
            .unwrap_or_else(|| panic!("an agent started on the corrupt ledger {corrupt:?}"));
        assert!(format!("{err:#}").contains("is corrupt"), "{err:#}");
    }
    std::fs::write(&ledger, &kept).unwrap();
    assert_eq!(agent.state.applied_state().unwrap(), applied);

    // A seeder whose certificate does not chain to the CA in join.toml is never trusted.
    let rogue_ca = rcgen::CertificateParams::new(vec!["127.0.9.1".into()])
        .unwrap()
        .self_signed(&rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap())
        .unwrap()
        .pem();
    let wrong = hiveseed_bootstrap::client::SeederClient::new(
        &seeder_url,
        &rogue_ca,
        Some("127.1.1.10".parse().unwrap()),
        None,
    )
    .unwrap();
    let req = hiveseed_proto::api::EnrollRequest {
        csr_pem: "x".into(),
        facts: agent.facts.clone(),
    };
    let err = wrong.enroll(&agent.join.join_url, &req).await.unwrap_err();
    assert!(format!("{err}").contains("unreachable"), "{err}");

    // Identity renewal at 2/3 of the lifetime: nothing before, a new identity after; the old
    // certificate is refused, the new one works.
    let old = agent.state.identity().unwrap();
    let now = hiveseed_bootstrap::agent::unix_now();
    agent.renew_identity_if_due(now).await;
    assert_eq!(agent.state.identity().unwrap(), old, "renewed too early");
    agent.renew_identity_if_due(now + 90).await;
    let new = agent.state.identity().unwrap();
    assert_ne!(new, old);
    let mode = std::fs::metadata(agent.state.identity_file())
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);
    use std::os::unix::fs::PermissionsExt;
    let old_client = hiveseed_bootstrap::client::SeederClient::new(
        &seeder_url,
        &agent.join.ca_pem,
        Some("127.1.1.10".parse().unwrap()),
        Some(&old),
    )
    .unwrap();
    let err = old_client.manifest(None, Duration::ZERO).await.unwrap_err();
    assert!(format!("{err}").contains("revoked"), "{err}");
    assert!(matches!(
        agent.client.manifest(None, Duration::ZERO).await.unwrap(),
        hiveseed_bootstrap::client::ManifestPoll::Changed { .. }
    ));
    server.stop().await;
}

/// An agent that died after the seeder stored its enrollment but before it wrote its identity
/// (or whose reply the seeder never sent): the agent started again finds its enroll key on disk,
/// 0600, retries with it, and gets the certificate the seeder stored the first time. The join
/// token is single use: with a fresh key the retry would be refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_that_died_mid_enrollment_retries_with_its_kept_key() {
    let tmp = tempfile::tempdir().unwrap();
    let roles = tmp.path().join("roles");
    std::fs::create_dir_all(&roles).unwrap();
    std::fs::write(roles.join("fleet.toml"), FLEET).unwrap();
    std::fs::write(roles.join("pg.toml"), PG).unwrap();
    std::fs::write(roles.join("peer.toml"), PEER).unwrap();
    let dir = CampaignDir::new(tmp.path().join("campaign"));
    let fleet = Fleet::parse(FLEET).unwrap();
    campaign::init(
        &dir,
        &roles.join("fleet.toml"),
        &roles,
        &fleet,
        std::time::SystemTime::now(),
    )
    .unwrap();
    let addr = std::net::TcpListener::bind("127.0.9.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let seeder_url = format!("https://{addr}");
    let server = serve(&dir, addr).await;
    let mut pg = Node::new(tmp.path(), &dir, "e2e-pg-r1-01", "pg", 20, &seeder_url);

    // The first life of the agent: its key on disk, its enrollment stored by the seeder, the
    // reply lost.
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let state = pg.root.join(hiveseed_bootstrap::agent::STATE_DIR);
    std::fs::create_dir_all(&state).unwrap();
    hiveseed_bootstrap::state_file::write(
        &state.join("enroll.key"),
        key.serialize_pem().as_bytes(),
        0o600,
    )
    .unwrap();
    let join: hiveseed_proto::join::JoinConfig =
        toml::from_str(&pg.read("etc/hiveseed/join.toml").unwrap()).unwrap();
    let csr = rcgen::CertificateParams::new(Vec::<String>::new())
        .unwrap()
        .serialize_request(&key)
        .unwrap()
        .pem()
        .unwrap();
    let body = serde_json::json!({
        "csr_pem": csr,
        "facts": serde_json::from_str::<serde_json::Value>(&pg.read("etc/hiveseed/facts.json").unwrap()).unwrap(),
    });
    let client = reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(join.ca_pem.as_bytes()).unwrap())
        .local_address(std::net::IpAddr::from([127, 1, 1, 20]))
        .build()
        .unwrap();
    let resp = client
        .post(&join.join_url)
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = resp.status();
    let first: hiveseed_proto::api::EnrollResponse =
        serde_json::from_str(&resp.text().await.unwrap()).unwrap();
    assert!(status.is_success(), "{status}");
    let leaf_end = first
        .cert_chain_pem
        .find("-----END CERTIFICATE-----")
        .unwrap();
    let first_leaf = &first.cert_chain_pem[..leaf_end];

    // The agent again: it enrolls with the key it kept and stores the first certificate.
    pg.start();
    let identity = eventually("the identity", Duration::from_secs(60), || {
        pg.read("var/lib/hiveseed/identity.pem")
    })
    .await;
    assert!(
        identity.contains(first_leaf),
        "the agent holds another certificate than the stored enrollment's:\n{}",
        pg.log()
    );
    assert!(identity.starts_with(&key.serialize_pem()), "another key");
    eventually("the enroll key removed", Duration::from_secs(10), || {
        pg.read("var/lib/hiveseed/enroll.key")
            .is_none()
            .then_some(())
    })
    .await;
    let store = Store::open(&dir.state_db()).unwrap();
    let node: hiveseed_proto::NodeName = "e2e-pg-r1-01".parse().unwrap();
    let issued = store
        .current_certs("identity")
        .unwrap()
        .into_iter()
        .filter(|c| c.node == node)
        .count();
    assert_eq!(issued, 1, "a second identity was issued");
    drop(pg);
    server.stop().await;
}
