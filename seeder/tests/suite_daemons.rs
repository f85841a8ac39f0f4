//! `seeder test`'s probes against real ai-memory 0.7.0 daemons (sqlite backend) on 127.0.72.x:
//! two federated peers in the Batman posture (mTLS allowlist, API key, the env battery, zero-touch
//! credentials minted by the seeder's issuer code) must pass; deliberately misconfigured daemons
//! (no allowlist, no API key, attestation and federation signatures off, the nonce gate off) must
//! make each negative probe FAIL, and so must a cleanup that leaves a probe memory behind.
//!
//! Needs the ai-memory binary (`HIVESEED_AI_MEMORY_BIN`, default the lab cache's): without it
//! the test fails (tests/deps).

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use ed25519_dalek::SigningKey;
use hiveseed_proto::status::CheckStatus;
use hiveseed_seeder::pki::{self, CampaignCa, LeafSpec, LeafUsage};
use hiveseed_seeder::suite::mesh::{Evidence, Peer};
use hiveseed_seeder::suite::net::{Endpoint, FedSender, Identity};
use hiveseed_seeder::suite::{self, attest::KeyStore, Check, Group, Mesh};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use sha2::Digest;

const CAMPAIGN: &str = "suite";
const API_KEY: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
const ADMIN: &str = "ai:suite-operator@suite";
const ISSUER: &str = "suite-ca";
const DOMAIN: &str = "suite.fleet";

struct Pki {
    ca: CampaignCa,
    ca_pem: String,
    dir: PathBuf,
}

impl Pki {
    fn leaf(&self, name: &str, sans: &[&str], usage: LeafUsage) -> (PathBuf, PathBuf, String) {
        let (cert, key) = self
            .ca
            .issue_with_new_key(&LeafSpec {
                common_name: name.into(),
                sans: sans.iter().map(|s| s.to_string()).collect(),
                usage,
                not_before: SystemTime::now(),
                lifetime: Duration::from_secs(86400),
            })
            .unwrap();
        let c = self.dir.join(format!("{name}.pem"));
        let k = self.dir.join(format!("{name}.key"));
        std::fs::write(&c, &cert).unwrap();
        std::fs::write(&k, &key).unwrap();
        (c, k, cert)
    }
}

fn fingerprint(pem: &str) -> String {
    let der = CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
    hex::encode(sha2::Sha256::digest(der.as_ref()))
}

fn write_private(path: &Path, bytes: &[u8]) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, bytes).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

/// How a test daemon deviates from the Batman posture.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Posture {
    Batman,
    /// No --mtls-allowlist: any client (or none) gets through TLS.
    NoAllowlist,
    /// No api_key (loopback-only by the daemon's own rule, hence ::1; the daemon formats
    /// `{host}:{port}`, so the flag is `[::1]`).
    NoApiKey,
    /// AI_MEMORY_REQUIRE_AGENT_ATTESTATION, FED_REQUIRE_SIG and PEER_ENROLLMENT off; the harness
    /// is an admin.
    Lax,
    /// Batman but AI_MEMORY_FED_REQUIRE_NONCE=0 (`src/federation/signing.rs:191-196`).
    NoNonce,
}

struct Daemon {
    name: String,
    child: Option<Child>,
    endpoint: Endpoint,
    log: PathBuf,
}

impl Daemon {
    fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let pid = rustix::process::Pid::from_raw(child.id() as i32);
        if let Some(pid) = pid {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::INT);
        }
        // SIGINT drains; wait for the exit itself (not a poll), SIGKILL after 15 s.
        let (tx, rx) = std::sync::mpsc::channel();
        let waiter = std::thread::spawn(move || {
            let _ = tx.send(child.wait());
        });
        if rx.recv_timeout(Duration::from_secs(15)).is_err() {
            if let Some(pid) = pid {
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
            }
        }
        let _ = waiter.join();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop();
    }
}

struct Spec<'a> {
    name: &'a str,
    host: &'a str,
    port: u16,
    posture: Posture,
    /// Quorum peers (base URLs) and this node's federation id.
    peers: Vec<String>,
    fed_id: String,
}

#[allow(clippy::too_many_arguments)]
fn start(
    bin: &Path,
    root: &Path,
    pki: &Pki,
    allowlist: &Path,
    issuer: &SigningKey,
    bundle: &Path,
    spec: Spec<'_>,
) -> Daemon {
    let dir = root.join(spec.name);
    let home = dir.join("home");
    std::fs::create_dir_all(home.join(".config/ai-memory")).unwrap();
    let (scert, skey, _) = pki.leaf(
        &format!("{}-server", spec.name),
        &[spec.host.trim_start_matches('[').trim_end_matches(']')],
        LeafUsage::Server,
    );
    // Issued before any daemon starts, so the allowlist names it.
    let ccert = pki.dir.join(format!("{}-client.pem", spec.name));
    let ckey = pki.dir.join(format!("{}-client.key", spec.name));
    let mut config = format!(
        "tier = \"keyword\"\ndb = \"{}\"\n",
        dir.join("ai-memory.db").display()
    );
    if spec.posture != Posture::NoApiKey {
        config.push_str(&format!("api_key = \"{API_KEY}\"\n"));
    }
    let admins = if spec.posture == Posture::Lax {
        format!("[\"{ADMIN}\", \"ai:test-harness@{CAMPAIGN}\"]")
    } else {
        format!("[\"{ADMIN}\"]")
    };
    config.push_str(&format!("\n[admin]\nagent_ids = {admins}\n"));
    write_private(
        &home.join(".config/ai-memory/config.toml"),
        config.as_bytes(),
    );

    // Zero-touch: the node's own federation key under the key dir by its id, and a credential
    // for it from the campaign issuer (what the seeder mints).
    let keys = dir.join("keys");
    let node_key = SigningKey::generate(&mut rand::rngs::OsRng);
    write_private(
        &keys.join(format!("{}.priv", spec.fed_id)),
        node_key.as_bytes(),
    );
    std::fs::write(
        keys.join(format!("{}.pub", spec.fed_id)),
        node_key.verifying_key().as_bytes(),
    )
    .unwrap();
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let (cred, _) = hiveseed_seeder::credential::mint(
        issuer,
        ISSUER,
        DOMAIN,
        &spec.fed_id,
        node_key.verifying_key().to_bytes(),
        now,
        86400,
    )
    .unwrap();
    write_private(&dir.join("credential"), cred.as_bytes());

    let mut args: Vec<String> = vec![
        "serve".into(),
        "--host".into(),
        spec.host.into(),
        "--port".into(),
        spec.port.to_string(),
        "--tls-cert".into(),
        scert.display().to_string(),
        "--tls-key".into(),
        skey.display().to_string(),
    ];
    if spec.posture != Posture::NoAllowlist {
        args.extend(["--mtls-allowlist".into(), allowlist.display().to_string()]);
    }
    if !spec.peers.is_empty() {
        args.extend([
            "--quorum-writes".into(),
            "2".into(),
            "--quorum-peers".into(),
            spec.peers.join(","),
            "--quorum-client-cert".into(),
            ccert.display().to_string(),
            "--quorum-client-key".into(),
            ckey.display().to_string(),
            "--quorum-ca-cert".into(),
            pki.dir.join("ca.pem").display().to_string(),
            "--quorum-timeout-ms".into(),
            "3000".into(),
            "--catchup-interval-secs".into(),
            "5".into(),
        ]);
    }
    args.extend([
        "--federation-identity".into(),
        spec.fed_id.clone(),
        "--shutdown-grace-secs".into(),
        "2".into(),
    ]);
    let on = |b: bool| if b { "1" } else { "0" };
    let strict = spec.posture != Posture::Lax;
    // The Batman battery (reference spec §1.4) and the zero-touch wiring (§3.3).
    let env: Vec<(&str, String)> = vec![
        ("HOME", home.display().to_string()),
        ("PATH", "/usr/bin:/bin".into()),
        ("RUST_LOG", "warn".into()),
        ("AI_MEMORY_KEY_DIR", keys.display().to_string()),
        (
            "AI_MEMORY_FED_TRUST_BUNDLE_DIR",
            bundle.display().to_string(),
        ),
        ("AI_MEMORY_FED_TRUST_DOMAIN", DOMAIN.into()),
        (
            "AI_MEMORY_FED_CRED_PATH",
            dir.join("credential").display().to_string(),
        ),
        ("AI_MEMORY_FED_REQUIRE_SIG", on(strict).into()),
        (
            "AI_MEMORY_FED_REQUIRE_NONCE",
            on(spec.posture != Posture::NoNonce).into(),
        ),
        ("AI_MEMORY_FED_REQUIRE_PEER_ENROLLMENT", on(strict).into()),
        ("AI_MEMORY_REQUIRE_AGENT_ATTESTATION", on(strict).into()),
        ("AI_MEMORY_PERMISSIONS_MODE", "enforce".into()),
        ("AI_MEMORY_GOVERNANCE_FAIL_OPEN_ON_ERROR", "0".into()),
        ("AI_MEMORY_AUTO_CONFIDENCE", "1".into()),
        ("AI_MEMORY_CONFIDENCE_SHADOW", "1".into()),
        ("AI_MEMORY_CONFIDENCE_DECAY", "1".into()),
    ];
    let log = dir.join("daemon.log");
    let out = std::fs::File::create(&log).unwrap();
    let child = Command::new(bin)
        .args(&args)
        .env_clear()
        .envs(env)
        .current_dir(&dir)
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .unwrap();
    let base = format!("https://{}:{}", spec.host, spec.port);
    Daemon {
        name: spec.name.into(),
        child: Some(child),
        endpoint: Endpoint {
            name: spec.name.into(),
            region: "r1".into(),
            base: base.parse().unwrap(),
            connect: None,
        },
        log,
    }
}

/// Waits for `/health` to answer 200 over mTLS, failing fast if the process exits.
async fn wait_healthy(d: &mut Daemon, ca_pem: &str, operator: &Identity) {
    let client = hiveseed_seeder::suite::net::client(
        &d.endpoint,
        &hiveseed_seeder::suite::net::Posture {
            roots_pem: ca_pem,
            identity: Some(operator),
        },
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        tick.tick().await;
        let r = client.get(d.endpoint.url("/api/v1/health")).send().await;
        if matches!(&r, Ok(resp) if resp.status() == 200) {
            return;
        }
        if let Some(Ok(Some(status))) = d.child.as_mut().map(|c| c.try_wait()) {
            panic!(
                "{} exited with {status}:\n{}",
                d.name,
                std::fs::read_to_string(&d.log).unwrap_or_default()
            );
        }
        assert!(
            Instant::now() < deadline,
            "{} not healthy within 60s ({r:?}):\n{}",
            d.name,
            std::fs::read_to_string(&d.log).unwrap_or_default()
        );
    }
}

fn free_v6_port() -> u16 {
    std::net::TcpListener::bind("[::1]:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// What the suite's view of a fleet shares across these meshes.
struct Harness<'a> {
    ca_pem: &'a str,
    operator: &'a Identity,
    keys: &'a Path,
    /// The harness's federation identity, from the same issuer as the daemons' credentials
    /// (as `Mesh::from_campaign` mints it from the campaign's).
    fed_sender: &'a FedSender,
}

fn mesh(h: &Harness<'_>, peers: &[&Daemon], api_key: &str) -> Mesh {
    Mesh {
        campaign: CAMPAIGN.into(),
        ca_pem: h.ca_pem.into(),
        api_key: api_key.into(),
        operator: h.operator.clone(),
        admin_agent_id: ADMIN.into(),
        fed_sender: h.fed_sender.clone(),
        peers: peers
            .iter()
            .enumerate()
            .map(|(i, d)| Peer {
                endpoint: d.endpoint.clone(),
                store: format!("ic_peer_{}", i + 1),
            })
            .collect(),
        agents: vec!["suite-agent-r1-01".into()],
        quorum_w: 2,
        keys: KeyStore::new(h.keys),
        llm_missing: Some("no LLM key in this test".into()),
        evidence: Evidence {
            max_age_secs: 15,
            ..Default::default()
        },
        converge_within: Duration::from_secs(40),
        poll_every: Duration::from_millis(250),
        untrusted_ca_pem: None,
    }
}

fn by_test(checks: &[Check]) -> BTreeMap<String, Check> {
    checks.iter().map(|c| (c.test.clone(), c.clone())).collect()
}

fn table(checks: &[Check]) -> String {
    suite::SuiteReport {
        campaign: CAMPAIGN.into(),
        timestamp: "t".into(),
        suite: "p3-full-spectrum".into(),
        checks: checks.to_vec(),
    }
    .table()
}

#[test]
fn suite_probes_pass_on_a_batman_pair_and_fail_on_misconfigured_daemons() {
    let Some(bin) = hiveseed_test_deps::ai_memory() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let pki_dir = root.join("pki");
    std::fs::create_dir_all(&pki_dir).unwrap();
    let (ca_pem, ca_key) = pki::generate_ca(CAMPAIGN, SystemTime::now()).unwrap();
    std::fs::write(pki_dir.join("ca.pem"), &ca_pem).unwrap();
    let pki = Pki {
        ca: CampaignCa::load(&ca_pem, &ca_key).unwrap(),
        ca_pem: ca_pem.clone(),
        dir: pki_dir.clone(),
    };
    let (_, _, op_cert) = pki.leaf("operator", &[], LeafUsage::Client);
    let operator = Identity {
        label: "operator".into(),
        cert_pem: op_cert.clone(),
        key_pem: std::fs::read_to_string(pki_dir.join("operator.key")).unwrap(),
    };

    // Issuer and trust bundle, shared by every daemon.
    let issuer = SigningKey::generate(&mut rand::rngs::OsRng);
    let bundle = root.join("trust");
    std::fs::create_dir_all(&bundle).unwrap();
    std::fs::write(
        bundle.join(format!("{ISSUER}.pub")),
        issuer.verifying_key().as_bytes(),
    )
    .unwrap();

    let v6_port = free_v6_port();
    let spec =
        |name: &'static str, host: &'static str, port: u16, posture, peer: Option<&str>| Spec {
            name,
            host,
            port,
            posture,
            peers: peer.map(|p| vec![p.to_string()]).unwrap_or_default(),
            fed_id: format!("{CAMPAIGN}/r1/{name}"),
        };
    let specs = vec![
        spec(
            "node1",
            "127.0.72.1",
            9077,
            Posture::Batman,
            Some("https://127.0.72.2:9077"),
        ),
        spec(
            "node2",
            "127.0.72.2",
            9077,
            Posture::Batman,
            Some("https://127.0.72.1:9077"),
        ),
        spec("open", "127.0.72.3", 9077, Posture::NoAllowlist, None),
        spec("lax", "127.0.72.4", 9077, Posture::Lax, None),
        spec("nonceless", "127.0.72.5", 9077, Posture::NoNonce, None),
        spec("keyless", "[::1]", v6_port, Posture::NoApiKey, None),
    ];
    // The allowlist: the operator and every daemon's outbound client certificate.
    let allowlist = root.join("allowlist.txt");
    let mut allow = format!(
        "# suite test allowlist\n{}  # operator\n",
        fingerprint(&op_cert)
    );
    for s in &specs {
        let (_, _, cert) = pki.leaf(&format!("{}-client", s.name), &[], LeafUsage::Client);
        allow.push_str(&format!("{}  # {}\n", fingerprint(&cert), s.name));
    }
    std::fs::write(&allowlist, &allow).unwrap();
    let mut daemons: Vec<Daemon> = specs
        .into_iter()
        .map(|s| start(&bin, root, &pki, &allowlist, &issuer, &bundle, s))
        .collect();

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        for d in daemons.iter_mut() {
            wait_healthy(d, &ca_pem, &operator).await;
        }
    });
    let keys = root.join("agent-keys");
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let fed_sender = FedSender::mint(
        &hiveseed_seeder::credential::Issuer::new(issuer.clone(), &CAMPAIGN.parse().unwrap()),
        &format!("{CAMPAIGN}/seeder/test-harness").parse().unwrap(),
        now,
    )
    .unwrap();
    let hx = Harness {
        ca_pem: &ca_pem,
        operator: &operator,
        keys: &keys,
        fed_sender: &fed_sender,
    };
    let d = |n: &str| daemons.iter().find(|d| d.name == n).unwrap();

    // 1. The Batman pair: every probe the suite can prove without a node report passes.
    let good = mesh(&hx, &[d("node1"), d("node2")], API_KEY);
    let checks = rt.block_on(suite::run(
        &good,
        &[
            Group::Regression,
            Group::Crypto,
            Group::Federation,
            Group::Zerotouch,
            Group::A2a,
            Group::AiNhi,
            Group::NsaGaps,
            Group::EncryptedLegs,
            Group::Curator,
        ],
    ));
    eprintln!("batman pair:\n{}", table(&checks));
    let t = by_test(&checks);
    let must_pass = [
        "enroll[ai:test-harness@suite on node1]",
        "create",
        "get_by_id",
        // Not search_semantic: on sqlite, search shows a private row only when its namespace is
        // the caller's own (storage::visibility_clause: scope 'private' AND namespace = as_agent),
        // so the seed's private `_test` probe is not found there. The lab runs postgres, whose
        // SAL filter goes by owner.
        "list_namespace",
        "private_isolation",
        "ns_cross_isolation",
        "no_client_cert[node1]",
        "rogue_client_cert[node1]",
        "wrong_server_ca[node1]",
        "apikey_required[node1]",
        "apikey_accepted[node1]",
        "health_exempt[node1]",
        "admin_gated[node1]",
        "no_client_cert[node2]",
        "rogue_client_cert[node2]",
        "wrong_server_ca[node2]",
        "apikey_required[node2]",
        "apikey_accepted[node2]",
        "health_exempt[node2]",
        "admin_gated[node2]",
        "write",
        "converge_same_region[node2]",
        "enrolled_write",
        "enrolled_converge[node2]",
        "unenrolled_status[node1]",
        "unenrolled_reason[node1]",
        "unenrolled_status[node2]",
        "unenrolled_reason[node2]",
        "agent_write",
        "beta_read_writepeer",
        "beta_read_fedpeer[node2]",
        "unsigned_write_403[node1]",
        "unsigned_write_reason[node1]",
        "sync_push_missing_sig_401[node1]",
        "sync_push_replay_refused[node1]",
        "sync_push_nonce_required[node1]",
        "unsigned_write_403[node2]",
        "sync_push_missing_sig_401[node2]",
        "sync_push_replay_refused[node2]",
        "sync_push_nonce_required[node2]",
        "leg1.mtls+key_priv_200[node1]",
        "leg1.no_client_cert_refused[node1]",
        "leg1.rogue_client_cert_refused[node2]",
        "leg1.no_apikey_priv_401[node2]",
        "leg1.health_exempt_200[node1]",
        "leg2.quorum_write_W2ofN2",
        "leg2.converge[node2]",
        "leg2.sync_no_client_cert_refused",
        // Every memory a probe row created is deleted and then gone (GET 404) on both peers.
        "cleanup[create]",
        "cleanup[ns_cross_isolation]",
        "cleanup[write]",
        "cleanup[enrolled_write]",
        "cleanup[agent_write]",
        "cleanup[leg2.quorum_write_W2ofN2]",
    ];
    for name in must_pass {
        let c = t
            .get(name)
            .unwrap_or_else(|| panic!("no check {name}:\n{}", table(&checks)));
        assert_eq!(c.status, CheckStatus::Pass, "{name}: {c:?}");
    }
    // The replay probe measured both requests: the signed push accepted, its replay refused.
    for p in ["node1", "node2"] {
        let got = &t[&format!("sync_push_replay_refused[{p}]")].got;
        assert!(
            got.starts_with("first 200") && got.ends_with("replay 401 x_memory_nonce_replay"),
            "{got}"
        );
        let got = &t[&format!("sync_push_nonce_required[{p}]")].got;
        assert_eq!(got, "401 x_memory_nonce_missing");
    }
    // Each cleanup row follows the row that created its memory, and every one passed.
    let at = |name: &str| checks.iter().position(|c| c.test == name).unwrap();
    assert_eq!(at("cleanup[create]"), at("create") + 1);
    assert_eq!(at("cleanup[write]"), at("write") + 1);
    for c in checks.iter().filter(|c| c.test.starts_with("cleanup[")) {
        assert_eq!(c.status, CheckStatus::Pass, "{c:?}");
        assert!(c.got.contains("GET 404 on node1, node2"), "{c:?}");
    }
    // `seeder report`'s fleet rows from the same probe: the write on P1, convergence per peer.
    let rows: Vec<(String, String, CheckStatus)> = suite::fleet_rows(&good, &checks)
        .into_iter()
        .map(|r| (r.node.to_string(), r.check, r.status))
        .collect();
    assert_eq!(
        rows,
        [
            (
                "node1".to_string(),
                "federation.write".to_string(),
                CheckStatus::Pass
            ),
            (
                "node2".to_string(),
                "federation.convergence".to_string(),
                CheckStatus::Pass
            ),
        ]
    );

    // Without an LLM key ai_nhi is a SKIP, and a SKIP is never a PASS; node-report evidence
    // that does not exist here fails with the reason.
    assert_eq!(t["llm_decision"].status, CheckStatus::Skip);
    assert!(t["llm_decision"].got.contains("no LLM key"));
    assert_eq!(
        t["curator_active[node1]"].status,
        CheckStatus::Fail,
        "no report, no pass"
    );
    assert!(t["curator_active[node1]"].got.contains("has not reported"));
    // Created probe memories were deleted: the regression memory is gone on both peers, asked
    // here apart from the cleanup's own check.
    let id = t["create"].got.trim_start_matches("id ").to_owned();
    for p in ["node1", "node2"] {
        let gone = rt.block_on(async {
            let mut run = hiveseed_seeder::suite::probes::Run::new(&good);
            let a = run
                .call(
                    &d(p).endpoint,
                    reqwest::Method::GET,
                    &format!("/api/v1/memories/{id}"),
                    Some("ai:test-harness@suite"),
                    None,
                )
                .await;
            a.status()
        });
        assert_eq!(gone, Some(404), "probe memory {id} was not deleted on {p}");
    }

    // 2. Each negative probe fails against a daemon misconfigured for it.
    let fails = |checks: &[Check], names: &[&str]| {
        let t = by_test(checks);
        for name in names {
            let c = t
                .get(*name)
                .unwrap_or_else(|| panic!("no check {name}:\n{}", table(checks)));
            assert_eq!(c.status, CheckStatus::Fail, "{name} must FAIL: {c:?}");
        }
    };
    let open = mesh(&hx, &[d("open")], API_KEY);
    let checks = rt.block_on(suite::run(&open, &[Group::Crypto, Group::EncryptedLegs]));
    eprintln!("no allowlist:\n{}", table(&checks));
    fails(
        &checks,
        &[
            "no_client_cert[open]",
            "rogue_client_cert[open]",
            "leg1.no_client_cert_refused[open]",
            "leg1.rogue_client_cert_refused[open]",
            "leg2.sync_no_client_cert_refused",
        ],
    );

    let keyless = mesh(&hx, &[d("keyless")], API_KEY);
    let checks = rt.block_on(suite::run(&keyless, &[Group::Crypto]));
    eprintln!("no api key:\n{}", table(&checks));
    fails(&checks, &["apikey_required[keyless]"]);

    let lax = mesh(&hx, &[d("lax")], API_KEY);
    let checks = rt.block_on(suite::run(
        &lax,
        &[Group::Crypto, Group::Zerotouch, Group::NsaGaps],
    ));
    eprintln!(
        "attestation and federation signatures off:\n{}",
        table(&checks)
    );
    fails(
        &checks,
        &[
            "admin_gated[lax]",
            "unenrolled_status[lax]",
            "unenrolled_reason[lax]",
            "unsigned_write_403[lax]",
            "unsigned_write_reason[lax]",
            "sync_push_missing_sig_401[lax]",
            "sync_push_replay_refused[lax]",
            "sync_push_nonce_required[lax]",
        ],
    );
    let t = by_test(&checks);
    // Signatures off: the replayed push is accepted too (no nonce cache without the check).
    let got = &t["sync_push_replay_refused[lax]"].got;
    assert!(
        got.starts_with("first 200") && got.contains("replay 200"),
        "{got}"
    );
    // The unsigned write landed; the cleanup deleted it, saw it gone and says so in its own row.
    let c = &t["cleanup[unsigned_write_403[lax]]"];
    assert_eq!(c.status, CheckStatus::Pass, "{c:?}");
    assert!(c.got.contains("GET 404 on lax"), "{c:?}");

    // The nonce gate off: a signed push without a nonce (replayable byte for byte) is accepted.
    // A push that carries a nonce is still checked against the replay cache, which 0.7.0 runs
    // whenever a nonce is sent (src/handlers/federation_signing_check.rs:772-797): only the
    // nonce_required probe can see this gate.
    let mut nonceless = mesh(&hx, &[d("nonceless")], API_KEY);
    nonceless.converge_within = Duration::from_secs(5);
    let checks = rt.block_on(suite::run(&nonceless, &[Group::NsaGaps]));
    eprintln!("nonce gate off:\n{}", table(&checks));
    fails(&checks, &["sync_push_nonce_required[nonceless]"]);
    let t = by_test(&checks);
    assert!(
        t["sync_push_nonce_required[nonceless]"]
            .got
            .starts_with("200"),
        "{:?}",
        t["sync_push_nonce_required[nonceless]"]
    );
    assert_eq!(
        t["sync_push_replay_refused[nonceless]"].status,
        CheckStatus::Pass
    );

    // wrong_server_ca fails when the "wrong" roots are the ones that issued the server cert.
    let mut trusting = mesh(&hx, &[d("node1")], API_KEY);
    trusting.untrusted_ca_pem = Some(pki.ca_pem.clone());
    let checks = rt.block_on(suite::run(&trusting, &[Group::Crypto]));
    fails(&checks, &["wrong_server_ca[node1]"]);

    // A dead peer is not a TLS refusal.
    let dead = Daemon {
        name: "dead".into(),
        child: None,
        endpoint: Endpoint {
            name: "dead".into(),
            region: "r1".into(),
            base: "https://127.0.72.9:9077".parse().unwrap(),
            connect: Some("127.0.72.9:9077".parse::<SocketAddr>().unwrap()),
        },
        log: root.join("none"),
    };
    let gone = mesh(&hx, &[&dead], API_KEY);
    let checks = rt.block_on(suite::run(&gone, &[Group::Crypto]));
    fails(
        &checks,
        &[
            "no_client_cert[dead]",
            "rogue_client_cert[dead]",
            "health_exempt[dead]",
        ],
    );
    assert!(by_test(&checks)["no_client_cert[dead]"]
        .got
        .contains("peer unreachable"));

    // 3. A cleanup that cannot see its memory gone fails the row named for the probe's row, and
    // `seeder report`'s federation.write with it: node2 stops after the write converged there,
    // so the copy on node2 is left behind (node1's delete is local; its fan-out finds no quorum).
    let mut leaving = mesh(&hx, &[d("node1"), d("node2")], API_KEY);
    leaving.converge_within = Duration::from_secs(3);
    let mut run = suite::probes::Run::new(&leaving);
    rt.block_on(suite::groups::federation(&mut run));
    let t = by_test(&run.checks);
    assert_eq!(t["write"].status, CheckStatus::Pass, "{:?}", t["write"]);
    assert_eq!(t["converge_same_region[node2]"].status, CheckStatus::Pass);
    daemons
        .iter_mut()
        .find(|d| d.name == "node2")
        .unwrap()
        .stop();
    rt.block_on(run.cleanup());
    eprintln!("cleanup with node2 gone:\n{}", table(&run.checks));
    let t = by_test(&run.checks);
    let c = &t["cleanup[write]"];
    assert_eq!(c.status, CheckStatus::Fail, "{c:?}");
    assert!(c.got.contains("node2: GET 000"), "{c:?}");
    let rows = suite::fleet_rows(&leaving, &run.checks);
    let w = rows.iter().find(|r| r.check == "federation.write").unwrap();
    assert_eq!(w.status, CheckStatus::Fail, "{w:?}");
    assert!(w.got.contains("cleanup: "), "{w:?}");

    for d in daemons.iter_mut() {
        d.stop();
    }
}
