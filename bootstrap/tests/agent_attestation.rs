//! The real agent binary against the real seeder (in-process, real TLS on loopback 127.0.98.1)
//! with `[attestation]` and the DigitalOcean stand-in (127.0.98.250): a droplet that is not the
//! node makes the agent exit 2 (permanent), so systemd does not restart it
//! (`RestartPreventExitStatus=2`); an API outage is retryable: the agent keeps trying and enrolls
//! once the API answers. The node is at 127.0.98.71 (public) / 127.0.99.71 (private).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ed25519_dalek::pkcs8::DecodePrivateKey;
use hiveseed_do_api::{Droplet, Fault, StandIn, Table};
use hiveseed_proto::token::{JoinClaims, TOKEN_VERSION};
use hiveseed_proto::JoinToken;
use hiveseed_seeder::campaign::{self, CampaignDir};
use hiveseed_seeder::fleet::Fleet;
use hiveseed_seeder::state::Policy;
use hiveseed_seeder::store::{MintedToken, Store};

const NODE: &str = "at-agent-r1-01";
const DROPLET: u64 = 7071;
const DO_TOKEN: &str = "dop_v1_agent_attestation_test_token";

const ROLE: &str = r#"
[[resource]]
kind = "file"
id = "file:motd"
path = "/etc/motd"
mode = "0644"
content = { type = "text", text = "attested\n" }
"#;

fn fleet_text(api_url: &str) -> String {
    format!(
        r#"campaign = "at"
seeder_url = "https://127.0.98.1:8443"

[regions.r1]
agent = 1
vpc_cidr = "127.0.99.0/24"

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

[attestation]
provider = "digitalocean"
api_url = "{api_url}"
"#
    )
}

/// The campaign, the stand-in, the seeder (1 s attestation budget) and one node's root.
struct Fixture {
    _tmp: tempfile::TempDir,
    dir: CampaignDir,
    root: PathBuf,
    api: Arc<StandIn>,
    table: Table,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    agent: Option<Child>,
}

impl Drop for Fixture {
    fn drop(&mut self) {
        if let Some(mut c) = self.agent.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

fn droplet(created_at: &str) -> Droplet {
    Droplet {
        id: DROPLET,
        name: NODE.into(),
        region: "r1".into(),
        public_ipv4: "127.0.98.71".parse().unwrap(),
        private_ipv4: "127.0.99.71".parse().unwrap(),
        tags: vec!["at".into(), "at-agent".into()],
        created_at: created_at.into(),
    }
}

fn do_time(unix: u64) -> String {
    hiveseed_seeder::attest::rfc3339(unix as i64)
        .unwrap()
        .replace("+00:00", "Z")
}

async fn fixture() -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let (api, table) = StandIn::fixed(DO_TOKEN, vec![]);
    let api_listener = tokio::net::TcpListener::bind("127.0.98.250:0")
        .await
        .unwrap();
    let api_url = format!("http://{}", api_listener.local_addr().unwrap());
    tokio::spawn(api.clone().serve(api_listener));

    let roles = tmp.path().join("roles");
    std::fs::create_dir_all(&roles).unwrap();
    let text = fleet_text(&api_url);
    std::fs::write(roles.join("fleet.toml"), &text).unwrap();
    std::fs::write(roles.join("agent.toml"), ROLE).unwrap();
    let dir = CampaignDir::new(tmp.path().join("campaign"));
    campaign::init(
        &dir,
        &roles.join("fleet.toml"),
        &roles,
        &Fleet::parse(&text).unwrap(),
        std::time::SystemTime::now(),
    )
    .unwrap();
    let token_file = dir.do_api_token();
    std::fs::write(&token_file, DO_TOKEN).unwrap();
    std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o600)).unwrap();

    let listener = tokio::net::TcpListener::bind("127.0.98.1:0").await.unwrap();
    let seeder_url = format!("https://{}", listener.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let policy = Policy {
        attestation_budget: hiveseed_seeder::digitalocean::Budget::within(Duration::from_secs(1)),
        ..Policy::default()
    };
    let serving = dir.clone();
    tokio::spawn(async move {
        hiveseed_seeder::cli::serve_on(serving, listener, policy, async {
            let _ = stopped.await;
        })
        .await
    });

    let root = tmp.path().join(NODE);
    write_node(&root, &dir, &seeder_url);
    Fixture {
        _tmp: tmp,
        dir,
        root,
        api,
        table,
        stop: Some(stop),
        agent: None,
    }
}

/// The node's join file and facts, and its token recorded as minted a minute ago.
fn write_node(root: &Path, dir: &CampaignDir, seeder_url: &str) {
    std::fs::create_dir_all(root.join("etc/hiveseed")).unwrap();
    let key = ed25519_dalek::SigningKey::from_pkcs8_pem(
        &std::fs::read_to_string(dir.manifest_key()).unwrap(),
    )
    .unwrap();
    let now = hiveseed_bootstrap::agent::unix_now();
    let nonce = hex::encode(rand::random::<[u8; 16]>());
    let claims = JoinClaims {
        v: TOKEN_VERSION,
        campaign: "at".parse().unwrap(),
        node: NODE.parse().unwrap(),
        role: "agent".parse().unwrap(),
        region: "r1".parse().unwrap(),
        exp: now + 3600,
        nonce: nonce.clone(),
    };
    let token = JoinToken::sign(&claims, &key).as_str().to_owned();
    Store::open(&dir.state_db())
        .unwrap()
        .put_token(
            &NODE.parse().unwrap(),
            &MintedToken {
                token: token.clone(),
                nonce: Some(nonce),
                issued_at: Some(now - 60),
                exp: now + 3600,
            },
        )
        .unwrap();
    let join = hiveseed_proto::join::JoinConfig {
        seeder_url: seeder_url.into(),
        campaign: "at".parse().unwrap(),
        node: NODE.parse().unwrap(),
        role: "agent".parse().unwrap(),
        region: "r1".parse().unwrap(),
        join_url: format!("{seeder_url}/v1/join/{NODE}?token={token}"),
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
            r#"{{"droplet_id": {DROPLET}, "region": "r1", "public_ipv4": "127.0.98.71", "private_ipv4": "127.0.99.71"}}"#
        ),
    )
    .unwrap();
}

impl Fixture {
    fn start_agent(&mut self) {
        let log = std::fs::File::create(self.root.join("agent.log")).unwrap();
        self.agent = Some(
            Command::new(env!("CARGO_BIN_EXE_bootstrap"))
                .args(["--root", self.root.to_str().unwrap(), "agent"])
                .env("RUST_LOG", "info")
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .stdin(Stdio::null())
                .spawn()
                .unwrap(),
        );
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.root.join("agent.log")).unwrap_or_default()
    }

    fn enrolled_droplet(&self) -> Option<u64> {
        Store::open(&self.dir.state_db())
            .unwrap()
            .enrollment(&NODE.parse().unwrap())
            .unwrap()
            .map(|e| e.droplet_id)
    }
}

async fn until<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_droplet_that_is_not_the_node_makes_the_agent_exit_2() {
    let mut f = fixture().await;
    // Created two minutes before its token was minted: not the droplet the token was made for.
    let now = hiveseed_bootstrap::agent::unix_now();
    f.table.set(vec![droplet(&do_time(now - 180))]);
    f.start_agent();
    let mut child = f.agent.take().unwrap();
    let status = until("the agent to exit", Duration::from_secs(60), || {
        child.try_wait().unwrap()
    })
    .await;
    let log = f.log();
    assert_eq!(status.code(), Some(2), "{log}");
    assert!(log.contains("AttestationFailed"), "{log}");
    assert!(log.contains("before its join token was minted"), "{log}");
    assert_eq!(f.enrolled_droplet(), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_outage_keeps_the_agent_retrying_until_it_enrolls() {
    let mut f = fixture().await;
    let now = hiveseed_bootstrap::agent::unix_now();
    f.table.set(vec![droplet(&do_time(now - 30))]);
    f.api
        .push_faults(std::iter::repeat_n(Fault::Unavailable, 10_000));
    f.start_agent();
    // Refused twice as unavailable, and still running.
    until("two refused attempts", Duration::from_secs(60), || {
        if let Some(status) = f.agent.as_mut().unwrap().try_wait().unwrap() {
            panic!("the agent exited ({status}) on an API outage: {}", f.log());
        }
        (f.log().matches("AttestationUnavailable").count() >= 2).then_some(())
    })
    .await;
    assert_eq!(f.enrolled_droplet(), None);
    // The API is back: the agent's next attempt enrolls, bound to its droplet.
    f.api.clear_faults();
    until("the enrollment", Duration::from_secs(60), || {
        f.enrolled_droplet()
    })
    .await;
    assert_eq!(f.enrolled_droplet(), Some(DROPLET));
    until("the manifest applied", Duration::from_secs(60), || {
        std::fs::read_to_string(f.root.join("etc/motd"))
            .ok()
            .filter(|m| m == "attested\n")
    })
    .await;
}
