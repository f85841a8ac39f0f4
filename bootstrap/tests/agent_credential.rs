//! Zero-touch federation credentials end to end: the real agent binary against the real seeder
//! (in-process, real TLS on 127.0.71.x) converging the federation section of the shipped
//! `roles/peer.toml` in a temp root — key made on the node, credential and bundle written,
//! nothing changes on the next runs, renewal past 2/3, the seed nowhere but in its file — and a
//! real ai-memory 0.7.0 accepting what they produced.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ed25519_dalek::pkcs8::DecodePrivateKey;
use ed25519_dalek::{Signer, SigningKey, VerifyingKey};
use hiveseed_proto::status::{Outcome, Phase};
use hiveseed_proto::token::{JoinClaims, TOKEN_VERSION};
use hiveseed_proto::{JoinToken, NodeName};
use hiveseed_seeder::campaign::{self, CampaignDir};
use hiveseed_seeder::credential::verify;
use hiveseed_seeder::fleet::Fleet;
use hiveseed_seeder::state::Policy;
use hiveseed_seeder::store::Store;

/// This file's loopback addresses (the lab owns 127.0.1-3.x, 127.1.x.x and 127.0.9.1).
const SEEDER_IP: &str = "127.0.71.1";
const NODE_PUBLIC: &str = "127.0.71.21";
const NODE_PRIVATE: &str = "127.0.71.22";
const SENDER_IP: &str = "127.0.71.31";
const RECEIVER_IP: &str = "127.0.71.32";

const NODE: &str = "e2e-peer-r1-01";
const FED_ID: &str = "e2e/r1/e2e-peer-r1-01";
const DAEMON_UID: u32 = 4242;

const FLEET: &str = r#"campaign = "e2e"
seeder_url = "https://127.0.71.1:8443"

[regions.r1]
pg = 1
peer = 1
vpc_cidr = "127.0.71.0/24"

[ttl]
report_interval_secs = 5
credential_secs = 600

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
"#;

/// The federation resources of the shipped peer role, verbatim: from `dir:keys` up to the
/// resource after the trust bundle.
fn federation_section() -> String {
    let role = include_str!("../../roles/peer.toml");
    let start = role
        .find("[[resource]]\nkind = \"directory\"\nid = \"dir:keys\"")
        .expect("roles/peer.toml has no dir:keys resource");
    let end = start
        + role[start..]
            .find("[[resource]]\nkind = \"file\"\nid = \"file:config\"")
            .expect("roles/peer.toml: file:config no longer follows the federation resources");
    let section = &role[start..end];
    for id in [
        "key:federation",
        "credential:federation",
        "file:trust-bundle",
    ] {
        assert!(section.contains(&format!("id = \"{id}\"")), "{id} moved");
    }
    section.to_owned()
}

struct Server {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
    addr: SocketAddr,
}

impl Server {
    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.task.await.unwrap().unwrap();
    }
}

async fn serve(dir: &CampaignDir) -> Server {
    let listener = tokio::net::TcpListener::bind(format!("{SEEDER_IP}:0"))
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap();
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
        addr,
    }
}

/// A child process killed (and reaped) when dropped.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct Fixture {
    tmp: tempfile::TempDir,
    dir: CampaignDir,
    root: PathBuf,
    server: Server,
    store: Store,
}

impl Fixture {
    async fn new() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let roles = tmp.path().join("roles");
        std::fs::create_dir_all(&roles).unwrap();
        std::fs::write(roles.join("fleet.toml"), FLEET).unwrap();
        std::fs::write(roles.join("pg.toml"), PG).unwrap();
        std::fs::write(roles.join("peer.toml"), federation_section()).unwrap();
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
        let server = serve(&dir).await;
        let root = tmp.path().join(NODE);
        std::fs::create_dir_all(root.join("etc/hiveseed")).unwrap();
        std::fs::write(
            root.join("etc/passwd"),
            format!("root:x:0:0:root:/root:/bin/bash\nai-memory:x:{DAEMON_UID}:{DAEMON_UID}::/var/lib/ai-memory:/usr/sbin/nologin\n"),
        )
        .unwrap();
        std::fs::write(
            root.join("etc/group"),
            format!("root:x:0:\nai-memory:x:{DAEMON_UID}:\n"),
        )
        .unwrap();
        let seeder = format!("https://{}", server.addr);
        let key = SigningKey::from_pkcs8_pem(&std::fs::read_to_string(dir.manifest_key()).unwrap())
            .unwrap();
        let claims = JoinClaims {
            v: TOKEN_VERSION,
            campaign: "e2e".parse().unwrap(),
            node: NODE.parse().unwrap(),
            role: "peer".parse().unwrap(),
            region: "r1".parse().unwrap(),
            exp: hiveseed_bootstrap::agent::unix_now() + 3600,
            nonce: "71".repeat(16),
        };
        let join = hiveseed_proto::join::JoinConfig {
            seeder_url: seeder.clone(),
            campaign: "e2e".parse().unwrap(),
            node: NODE.parse().unwrap(),
            role: "peer".parse().unwrap(),
            region: "r1".parse().unwrap(),
            join_url: format!(
                "{seeder}/v1/join/{NODE}?token={}",
                JoinToken::sign(&claims, &key).as_str()
            ),
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
                r#"{{"droplet_id": 71, "region": "r1", "public_ipv4": "{NODE_PUBLIC}", "private_ipv4": "{NODE_PRIVATE}"}}"#
            ),
        )
        .unwrap();
        let store = Store::open(&dir.state_db()).unwrap();
        Self {
            tmp,
            dir,
            root,
            server,
            store,
        }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.root.join(rel)
    }

    fn priv_path(&self) -> PathBuf {
        self.path(&format!("etc/ai-memory/keys/{FED_ID}.priv"))
    }

    fn credential(&self) -> String {
        std::fs::read_to_string(self.path("etc/ai-memory/credential")).unwrap()
    }

    /// The real agent binary, re-checking drift every 2 s.
    fn start_agent(&self) -> Killed {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.tmp.path().join("agent.log"))
            .unwrap();
        Killed(
            Command::new(env!("CARGO_BIN_EXE_bootstrap"))
                .args(["--root", self.root.to_str().unwrap(), "agent"])
                .args(["--drift-interval", "2"])
                .env("RUST_LOG", "info")
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .stdin(Stdio::null())
                .spawn()
                .unwrap(),
        )
    }

    fn agent_log(&self) -> String {
        std::fs::read_to_string(self.tmp.path().join("agent.log")).unwrap_or_default()
    }

    /// `bootstrap plan` for the node: what the agent would do now.
    fn dry_run(&self) -> String {
        let out = Command::new(env!("CARGO_BIN_EXE_bootstrap"))
            .args(["--root", self.root.to_str().unwrap(), "plan"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "bootstrap plan: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// The node's latest report: converged, with every resource's outcome.
    fn converged_outcomes(&self) -> Option<Vec<Outcome>> {
        let node: NodeName = NODE.parse().unwrap();
        let (r, _) = self.store.latest_report(&node).unwrap()?;
        (r.phase == Phase::Converged && !r.resources.is_empty())
            .then(|| r.resources.iter().map(|x| x.outcome).collect())
    }

    fn credentials_minted(&self) -> usize {
        self.store
            .events(10_000)
            .unwrap()
            .iter()
            .filter(|e| e.kind == "credential")
            .count()
    }

    fn campaign_ca(&self) -> VerifyingKey {
        let raw: [u8; 32] = std::fs::read(self.dir.federation_pub("e2e"))
            .unwrap()
            .try_into()
            .unwrap();
        VerifyingKey::from_bytes(&raw).unwrap()
    }

    /// Waits up to a minute for `f`, failing with the agent's log.
    async fn until<T>(&self, what: &str, f: impl FnMut() -> Option<T>) -> T {
        eventually(what, Duration::from_secs(60), f)
            .await
            .unwrap_or_else(|e| panic!("{e}\nagent log:\n{}", self.agent_log()))
    }

    /// Runs the agent until the node reported converged, then stops it.
    async fn converge_once(&self) {
        let _agent = self.start_agent();
        self.until("the node converged", || self.converged_outcomes())
            .await;
    }
}

async fn eventually<T>(
    what: &str,
    timeout: Duration,
    mut f: impl FnMut() -> Option<T>,
) -> Result<T, String> {
    let deadline = Instant::now() + timeout;
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        tick.tick().await;
        if let Some(v) = f() {
            return Ok(v);
        }
        if Instant::now() >= deadline {
            return Err(format!("timed out after {timeout:?} waiting for {what}"));
        }
    }
}

fn meta(p: &Path) -> (u32, u32, u32) {
    let m = std::fs::metadata(p).unwrap();
    (m.mode() & 0o7777, m.uid(), m.gid())
}

/// Every encoding of a secret a log line, report, request or database could carry it in.
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
        format!("{secret:?}").into_bytes(),
    ]
}

/// Files under `dir` (recursively) whose bytes contain any encoding of `secret`.
fn files_containing(dir: &Path, secret: &[u8], except: &Path) -> Vec<PathBuf> {
    let needles = encodings(secret);
    let mut hits = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            let ft = e.file_type().unwrap();
            if ft.is_dir() {
                stack.push(p);
            } else if ft.is_file() && p != except {
                let bytes = std::fs::read(&p).unwrap();
                if needles
                    .iter()
                    .any(|n| bytes.windows(n.len()).any(|w| w == n.as_slice()))
                {
                    hits.push(p);
                }
            }
        }
    }
    hits
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_makes_its_key_gets_a_credential_and_renews_it_past_two_thirds() {
    let fx = Fixture::new().await;
    let agent = fx.start_agent();

    // First convergence: everything changed.
    let first = fx
        .until("first convergence", || fx.converged_outcomes())
        .await;
    assert!(first.iter().all(|o| *o == Outcome::Changed), "{first:?}");

    // The key: made on the node in ai-memory's layout, owned by the daemon's user.
    let seed: [u8; 32] = std::fs::read(fx.priv_path()).unwrap().try_into().unwrap();
    let public = SigningKey::from_bytes(&seed).verifying_key();
    let daemon = (DAEMON_UID, DAEMON_UID);
    assert_eq!(meta(&fx.priv_path()), (0o400, daemon.0, daemon.1));
    let pub_path = fx.path(&format!("etc/ai-memory/keys/{FED_ID}.pub"));
    assert_eq!(meta(&pub_path), (0o444, daemon.0, daemon.1));
    assert_eq!(std::fs::read(&pub_path).unwrap(), public.as_bytes());
    for d in [
        "etc/ai-memory/keys",
        "etc/ai-memory/keys/e2e",
        "etc/ai-memory/keys/e2e/r1",
    ] {
        assert_eq!(meta(&fx.path(d)), (0o700, daemon.0, daemon.1), "{d}");
    }

    // The credential: the campaign CA's, for this node's identity and key, the fleet's TTL.
    let cred_path = fx.path("etc/ai-memory/credential");
    assert_eq!(meta(&cred_path), (0o400, daemon.0, daemon.1));
    let text = fx.credential();
    let ca = fx.campaign_ca();
    let claims = verify(&text, &[("e2e-ca", ca)], Some("e2e.fleet"), unix_now()).unwrap();
    assert_eq!(claims.subject_agent_id, FED_ID);
    assert_eq!(claims.subject_pubkey, public.to_bytes());
    assert_eq!(claims.not_after - claims.not_before, 600 + 30);
    // The trust bundle: the CA's raw key under its issuer id.
    let bundle = fx.path("etc/ai-memory/trust/e2e-ca.pub");
    assert_eq!(std::fs::read(&bundle).unwrap(), ca.as_bytes());
    assert_eq!(meta(&bundle).0, 0o444);
    assert_eq!(fx.credentials_minted(), 1);

    // Later drift checks change nothing: a converged report with every resource unchanged.
    fx.until("a drift check that changes nothing", || {
        fx.converged_outcomes()
            .filter(|o| o.iter().all(|x| *x == Outcome::Unchanged))
    })
    .await;
    assert_eq!(fx.credential(), text);
    assert_eq!(fx.credentials_minted(), 1);

    // A credential past 2/3 of its lifetime (minted by the campaign CA 500 s ago, 600 s TTL) is
    // renewed by the running agent on its next drift check, for the same key.
    let issuer = fx
        .dir
        .load_federation_issuer(&"e2e".parse().unwrap())
        .unwrap();
    let (old, _) = issuer
        .mint(
            &FED_ID.parse().unwrap(),
            public.into(),
            unix_now() - 500,
            600,
        )
        .unwrap();
    std::fs::write(&cred_path, format!("{old}\n")).unwrap();
    let renewed = fx
        .until("the renewed credential", || {
            let now = fx.credential();
            (now.trim() != old && fx.credentials_minted() == 2).then_some(now)
        })
        .await;
    let claims = verify(&renewed, &[("e2e-ca", ca)], Some("e2e.fleet"), unix_now()).unwrap();
    assert!(claims.not_before >= unix_now() - 60, "{claims:?}");
    assert_eq!(claims.subject_pubkey, public.to_bytes());
    assert_eq!(
        std::fs::read(fx.priv_path()).unwrap(),
        seed,
        "renewal keeps the key"
    );
    assert_eq!(meta(&cred_path), (0o400, daemon.0, daemon.1));
    assert!(
        fx.agent_log().contains("past 2/3 of its lifetime"),
        "the plan said why:\n{}",
        fx.agent_log()
    );
    drop(agent);

    // And now the agent's own dry run has nothing to do.
    let plan = fx.dry_run();
    assert!(plan.contains("nothing to do"), "{plan}");

    // The seed is in its file and nowhere else: not on the seeder (database, reports, events),
    // not in the agent's log, state, spool or manifest copy.
    let hits = files_containing(fx.tmp.path(), &seed, &fx.priv_path());
    assert!(hits.is_empty(), "the seed leaked into {hits:?}");
    // The scan finds what it looks for: the public half is in .pub (and the credential).
    assert!(files_containing(fx.tmp.path(), public.as_bytes(), Path::new("/")).contains(&pub_path));
    fx.server.stop().await;
}

fn unix_now() -> i64 {
    hiveseed_bootstrap::agent::unix_now() as i64
}

// ---- a real ai-memory 0.7.0 accepts it ---------------------------------------------------------

const API_KEY: &str = "e2e-zero-touch-api-key";

fn free_port(ip: &str) -> u16 {
    std::net::TcpListener::bind(format!("{ip}:0"))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `ai-memory serve` on `ip` with its own HOME (config: keyword tier, its own sqlite, the api key
/// that binding a non-loopback address requires), logging to `<home>/serve.log`.
fn ai_memory(
    bin: &Path,
    home: &Path,
    ip: &str,
    port: u16,
    args: &[&str],
    env: &[(&str, &str)],
) -> Killed {
    let config = home.join(".config/ai-memory");
    std::fs::create_dir_all(&config).unwrap();
    std::fs::write(
        config.join("config.toml"),
        format!(
            "tier = \"keyword\"\ndb = \"{}\"\napi_key = \"{API_KEY}\"\n",
            home.join("ai-memory.db").display()
        ),
    )
    .unwrap();
    let log = std::fs::File::create(home.join("serve.log")).unwrap();
    let mut cmd = Command::new(bin);
    cmd.args(["serve", "--host", ip, "--port", &port.to_string()])
        .args(args)
        .env_clear()
        .env("HOME", home)
        .env("PATH", "/usr/bin:/bin")
        .env("RUST_LOG", "info")
        .env("AI_MEMORY_EMBED_OFFLINE", "1")
        .current_dir(home)
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .stdin(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    Killed(cmd.spawn().unwrap())
}

async fn healthy(daemon: &mut Killed, base: &str, home: &Path) {
    let client = reqwest::Client::new();
    let url = format!("{base}/api/v1/health");
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    loop {
        tick.tick().await;
        if let Some(st) = daemon.0.try_wait().unwrap() {
            panic!(
                "ai-memory exited ({st}):\n{}",
                std::fs::read_to_string(home.join("serve.log")).unwrap_or_default()
            );
        }
        if let Ok(r) = client.get(&url).send().await {
            if r.status().is_success() {
                return;
            }
        }
        assert!(Instant::now() < deadline, "{url} never answered");
    }
}

/// A `/api/v1/sync/push` as an ai-memory peer sends it: body signed with `key` over
/// `body || 0x00 || nonce`, `X-Memory-Cred` when given.
async fn push(base: &str, peer_id: &str, key: &SigningKey, cred: Option<&str>) -> (u16, String) {
    use base64::Engine;
    let body = serde_json::to_vec(&serde_json::json!({
        "sender_agent_id": peer_id,
        "memories": [],
    }))
    .unwrap();
    let nonce = hex::encode(rand::random::<[u8; 16]>());
    let mut signed = body.clone();
    signed.push(0);
    signed.extend_from_slice(nonce.as_bytes());
    let sig = base64::engine::general_purpose::STANDARD.encode(key.sign(&signed).to_bytes());
    let mut req = reqwest::Client::new()
        .post(format!("{base}/api/v1/sync/push"))
        .header("content-type", "application/json")
        .header("x-api-key", API_KEY)
        .header("x-peer-id", peer_id)
        .header("x-memory-nonce", nonce)
        .header("x-memory-sig", format!("ed25519={sig}"))
        .body(body);
    if let Some(c) = cred {
        req = req.header("x-memory-cred", c);
    }
    let resp = req.send().await.unwrap();
    (resp.status().as_u16(), resp.text().await.unwrap())
}

/// The files the agent wrote, used as ai-memory uses them: a receiver with the node's trust
/// bundle and domain and no enrolled peer keys refuses a push without a valid credential, and
/// accepts one signed by the node's key with its credential; a sender with the node's key
/// directory and credential file gets its quorum write acknowledged by that receiver.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ai_memory_accepts_what_the_agent_and_seeder_produced() {
    let Some(bin) = hiveseed_test_deps::ai_memory() else {
        return;
    };
    let fx = Fixture::new().await;
    fx.converge_once().await;
    let seed: [u8; 32] = std::fs::read(fx.priv_path()).unwrap().try_into().unwrap();
    let node_key = SigningKey::from_bytes(&seed);
    let cred = fx.credential();
    let cred = cred.trim();

    // The receiver: the node's bundle directory and domain, fail closed for unknown peers.
    let rport = free_port(RECEIVER_IP);
    let rbase = format!("http://{RECEIVER_IP}:{rport}");
    let rhome = fx.tmp.path().join("receiver");
    let bundle_dir = fx.path("etc/ai-memory/trust");
    let empty_keys = rhome.join("keys");
    std::fs::create_dir_all(&empty_keys).unwrap();
    let mut receiver = ai_memory(
        &bin,
        &rhome,
        RECEIVER_IP,
        rport,
        &[],
        &[
            (
                "AI_MEMORY_FED_TRUST_BUNDLE_DIR",
                bundle_dir.to_str().unwrap(),
            ),
            ("AI_MEMORY_FED_TRUST_DOMAIN", "e2e.fleet"),
            ("AI_MEMORY_FED_REQUIRE_SIG", "1"),
            ("AI_MEMORY_FED_REQUIRE_NONCE", "1"),
            ("AI_MEMORY_FED_REQUIRE_PEER_ENROLLMENT", "1"),
            ("AI_MEMORY_KEY_DIR", empty_keys.to_str().unwrap()),
        ],
    );
    healthy(&mut receiver, &rbase, &rhome).await;

    // Without a valid credential the receiver has no key for the peer: each is refused.
    let other_ca = hiveseed_seeder::credential::Issuer::new(
        SigningKey::from_bytes(&[0x5a; 32]),
        &"e2e".parse().unwrap(),
    );
    let (forged, _) = other_ca
        .mint(
            &FED_ID.parse().unwrap(),
            node_key.verifying_key().into(),
            unix_now(),
            600,
        )
        .unwrap();
    let stranger = SigningKey::from_bytes(&[0x33; 32]);
    let refusals = [
        (
            "no credential",
            FED_ID,
            &node_key,
            None,
            "x_memory_sig_no_enrolled_key",
        ),
        (
            "another CA's credential",
            FED_ID,
            &node_key,
            Some(forged.as_str()),
            "x_memory_sig_no_enrolled_key",
        ),
        (
            "another identity",
            "e2e/r1/e2e-peer-r1-02",
            &node_key,
            Some(cred),
            "x_memory_sig_no_enrolled_key",
        ),
        (
            "signed by another key",
            FED_ID,
            &stranger,
            Some(cred),
            "x_memory_sig_bad_signature",
        ),
    ];
    for (what, peer, key, c, tag) in refusals {
        let (status, body) = push(&rbase, peer, key, c).await;
        assert_eq!(status, 401, "{what}: {body}");
        assert!(body.contains(tag), "{what}: {body}");
    }
    let (status, body) = push(&rbase, FED_ID, &node_key, Some(cred)).await;
    assert_eq!(
        status, 200,
        "the node's own signed push with its credential: {body}"
    );

    // The sender: ai-memory itself loads <key dir>/<fed id>.priv and the credential file the
    // agent wrote, and the receiver acknowledges its quorum write (W = 2: local + receiver).
    let sport = free_port(SENDER_IP);
    let sbase = format!("http://{SENDER_IP}:{sport}");
    let shome = fx.tmp.path().join("sender");
    let key_dir = fx.path("etc/ai-memory/keys");
    let cred_path = fx.path("etc/ai-memory/credential");
    let mut sender = ai_memory(
        &bin,
        &shome,
        SENDER_IP,
        sport,
        &[
            "--quorum-writes",
            "2",
            "--quorum-peers",
            &rbase,
            "--quorum-timeout-ms",
            "5000",
            "--catchup-interval-secs",
            "0",
            "--federation-identity",
            FED_ID,
        ],
        &[
            ("AI_MEMORY_KEY_DIR", key_dir.to_str().unwrap()),
            ("AI_MEMORY_FED_CRED_PATH", cred_path.to_str().unwrap()),
            ("AI_MEMORY_FED_IDENTITY", FED_ID),
        ],
    );
    healthy(&mut sender, &sbase, &shome).await;
    let resp = reqwest::Client::new()
        .post(format!("{sbase}/api/v1/memories"))
        .header("x-api-key", API_KEY)
        .header("x-agent-id", "ai:e2e-probe@e2e")
        .json(&serde_json::json!({
            "title": "zero-touch probe",
            "content": "pushed with the seeder's credential",
            "namespace": "probe",
            "tier": "long",
            "scope": "collective",
        }))
        .send()
        .await
        .unwrap();
    let status = resp.status();
    let body = resp.text().await.unwrap();
    assert!(
        status.is_success(),
        "quorum write {status}: {body}\nsender log:\n{}\nreceiver log:\n{}",
        std::fs::read_to_string(shome.join("serve.log")).unwrap_or_default(),
        std::fs::read_to_string(rhome.join("serve.log")).unwrap_or_default()
    );
    let id = serde_json::from_str::<serde_json::Value>(&body).unwrap()["id"]
        .as_str()
        .expect("the created memory's id")
        .to_owned();
    let got = reqwest::Client::new()
        .get(format!("{rbase}/api/v1/memories/{id}"))
        .header("x-api-key", API_KEY)
        .header("x-agent-id", "ai:e2e-probe@e2e")
        .send()
        .await
        .unwrap();
    assert_eq!(got.status(), 200, "the receiver holds the pushed memory");
    drop(sender);

    // The same sender with another CA's credential file: the receiver refuses its pushes, so
    // the quorum write fails. The acknowledgement above was the credential's doing.
    let forged_path = fx.tmp.path().join("forged.credential");
    std::fs::write(&forged_path, format!("{forged}\n")).unwrap();
    let fport = free_port(SENDER_IP);
    let fbase = format!("http://{SENDER_IP}:{fport}");
    let fhome = fx.tmp.path().join("forger");
    let mut forger = ai_memory(
        &bin,
        &fhome,
        SENDER_IP,
        fport,
        &[
            "--quorum-writes",
            "2",
            "--quorum-peers",
            &rbase,
            "--quorum-timeout-ms",
            "2000",
            "--catchup-interval-secs",
            "0",
            "--federation-identity",
            FED_ID,
        ],
        &[
            ("AI_MEMORY_KEY_DIR", key_dir.to_str().unwrap()),
            ("AI_MEMORY_FED_CRED_PATH", forged_path.to_str().unwrap()),
            ("AI_MEMORY_FED_IDENTITY", FED_ID),
        ],
    );
    healthy(&mut forger, &fbase, &fhome).await;
    let resp = reqwest::Client::new()
        .post(format!("{fbase}/api/v1/memories"))
        .header("x-api-key", API_KEY)
        .header("x-agent-id", "ai:e2e-probe@e2e")
        .json(&serde_json::json!({
            "title": "forged probe", "content": "x", "namespace": "probe",
            "tier": "long", "scope": "collective",
        }))
        .send()
        .await
        .unwrap();
    let status = resp.status();
    let body = resp.text().await.unwrap();
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("quorum_not_met"), "{body}");
    drop(forger);
    drop(receiver);
    fx.server.stop().await;
}
