//! Test harness: a campaign directory, the real `seeder serve` process on an ephemeral loopback
//! port, and agent-like clients that enroll over real TLS with keys made in the test.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ed25519_dalek::pkcs8::DecodePrivateKey;
use ed25519_dalek::SigningKey;
use hiveseed_proto::api::{EnrollRequest, EnrollResponse, NodeFacts};
use hiveseed_proto::token::{JoinClaims, TOKEN_VERSION};
use hiveseed_proto::JoinToken;
use rcgen::{CertificateParams, KeyPair, PKCS_ECDSA_P256_SHA256};

pub const SEEDER_IP: &str = "127.0.9.1";

pub fn fleet_toml(campaign: &str) -> String {
    format!(
        r#"campaign = "{campaign}"
seeder_url = "https://{SEEDER_IP}:8443"

[regions.r1]
pg = 1
peer = 2
# Every test's private addresses (127.0.x.y); the cert-policy tests claim addresses outside it.
vpc_cidr = "127.0.0.0/16"

[federation]
catchup_interval_secs = 30

[ttl]
report_interval_secs = 30

[pins.postgres]
major = 17
source = "distro"
server = "17.*"
pgvector = "*"
age = "*"
expect_server = "17"
expect_pgvector = "0.8.0"
expect_age = "1.5.0"

[pins.ai_memory]
version = "0.7.0"
sha256 = "{}"
schema = 57
"#,
        "ab".repeat(32)
    )
}

pub const PG_ROLE: &str = r#"
[[resource]]
kind = "file"
id = "file:motd"
path = "/etc/motd"
mode = "0644"
content = { type = "text", text = "pg {{ node.name }} at {{ node.private_ip }}\n" }

[[resource]]
kind = "certificate"
id = "cert:pg-server"
purpose = "pg_server"
key_path = "/etc/pg/server.key"
cert_path = "/etc/pg/server.pem"
key_mode = "0600"
"#;

pub const PEER_ROLE: &str = r#"
[[resource]]
kind = "file"
id = "file:settings"
path = "/etc/peer.conf"
mode = "0600"
secret = true
content = { type = "text", text = "catchup={{ fleet.federation.catchup_interval_secs }}\npg={{ region.pg.private_ip if region.pg else 'none' }}\n" }

[[resource]]
kind = "file"
id = "file:tool"
when = "artifacts.tool is defined"
path = "/usr/local/bin/tool"
mode = "0755"
artifact = "tool"

[[resource]]
kind = "certificate"
id = "cert:server"
purpose = "server"
key_path = "/etc/peer/server.key"
cert_path = "/etc/peer/server.pem"
key_mode = "0400"

[[resource]]
kind = "certificate"
id = "cert:client"
purpose = "client"
key_path = "/etc/peer/client.key"
cert_path = "/etc/peer/client.pem"
key_mode = "0400"
"#;

pub struct Campaign {
    pub tmp: tempfile::TempDir,
    pub dir: PathBuf,
    pub fleet: PathBuf,
    pub campaign: String,
}

pub fn seeder_bin() -> &'static str {
    env!("CARGO_BIN_EXE_seeder")
}

pub fn run_seeder(args: &[&str]) -> std::process::Output {
    let out = Command::new(seeder_bin())
        .args(args)
        .output()
        .expect("run seeder");
    out
}

impl Campaign {
    pub fn new(campaign: &str) -> Self {
        Self::with(campaign, &fleet_toml(campaign), PEER_ROLE)
    }

    /// A campaign with its own fleet text and peer role (the pg role is `PG_ROLE`).
    pub fn with(campaign: &str, fleet_text: &str, peer_role: &str) -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let roles = tmp.path().join("roles");
        std::fs::create_dir_all(&roles).unwrap();
        let fleet = roles.join("fleet.toml");
        std::fs::write(&fleet, fleet_text).unwrap();
        std::fs::write(roles.join("pg.toml"), PG_ROLE).unwrap();
        std::fs::write(roles.join("peer.toml"), peer_role).unwrap();
        let dir = tmp.path().join("campaign");
        let out = run_seeder(&[
            "init",
            "--fleet",
            fleet.to_str().unwrap(),
            "--dir",
            dir.to_str().unwrap(),
        ]);
        assert!(
            out.status.success(),
            "init: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Self {
            tmp,
            dir,
            fleet,
            campaign: campaign.into(),
        }
    }

    pub fn dir_str(&self) -> &str {
        self.dir.to_str().unwrap()
    }

    pub fn ca_pem(&self) -> String {
        std::fs::read_to_string(self.dir.join("ca.pem")).unwrap()
    }

    pub fn signing_key(&self) -> SigningKey {
        let pem = std::fs::read_to_string(self.dir.join("manifest.key")).unwrap();
        SigningKey::from_pkcs8_pem(&pem).unwrap()
    }

    pub fn token(&self, node: &str, role: &str, exp_in: i64) -> String {
        self.token_with(&self.signing_key(), &self.campaign, node, role, exp_in)
    }

    pub fn token_with(
        &self,
        key: &SigningKey,
        campaign: &str,
        node: &str,
        role: &str,
        exp_in: i64,
    ) -> String {
        let claims = JoinClaims {
            v: TOKEN_VERSION,
            campaign: campaign.parse().unwrap(),
            node: node.parse().unwrap(),
            role: role.parse().unwrap(),
            region: "r1".parse().unwrap(),
            exp: (now() as i64 + exp_in) as u64,
            // Every token is a fresh one: a token is single use.
            nonce: hex::encode(rand::random::<[u8; 16]>()),
        };
        JoinToken::sign(&claims, key).as_str().to_owned()
    }

    pub fn serve(&self, extra: &[&str]) -> Server {
        self.serve_on(&format!("{SEEDER_IP}:0"), extra)
    }

    /// `seeder serve` listening on `listen` (`ip:0` for an ephemeral port).
    pub fn serve_on(&self, listen: &str, extra: &[&str]) -> Server {
        self.spawn_serve(listen, extra, Stdio::inherit())
    }

    /// `seeder serve` whose log (stderr, WARN and above) goes to `log`, for tests that read it.
    pub fn serve_logged(&self, listen: &str, extra: &[&str], log: &Path) -> Server {
        self.spawn_serve(listen, extra, std::fs::File::create(log).unwrap().into())
    }

    fn spawn_serve(&self, listen: &str, extra: &[&str], stderr: Stdio) -> Server {
        let mut args = vec!["serve", "--dir", self.dir_str(), "--listen", listen];
        args.extend_from_slice(extra);
        let mut child = Command::new(seeder_bin())
            .args(&args)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).unwrap();
        let addr: SocketAddr = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .parse()
            .unwrap();
        Server { child, addr }
    }

    /// A client that trusts only the campaign CA and presents `identity_pem` (key + chain).
    pub fn client_with(&self, identity_pem: &str) -> reqwest::Client {
        reqwest::Client::builder()
            .use_rustls_tls()
            .tls_built_in_root_certs(false)
            .add_root_certificate(reqwest::Certificate::from_pem(self.ca_pem().as_bytes()).unwrap())
            .identity(reqwest::Identity::from_pem(identity_pem.as_bytes()).unwrap())
            .build()
            .unwrap()
    }

    /// A client presenting the operator certificate `seeder init` made.
    pub fn operator(&self) -> reqwest::Client {
        let pem = format!(
            "{}{}",
            std::fs::read_to_string(self.dir.join("operator.key")).unwrap(),
            std::fs::read_to_string(self.dir.join("operator.pem")).unwrap()
        );
        self.client_with(&pem)
    }

    pub fn seeder(&self, args: &[&str]) -> std::process::Output {
        let mut full: Vec<&str> = args.to_vec();
        full.extend_from_slice(&["--dir", self.dir_str()]);
        run_seeder(&full)
    }

    /// `seeder publish`: (success, stdout + stderr).
    pub fn publish(&self) -> (bool, String) {
        let out = self.seeder(&["publish"]);
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    }
}

pub struct Server {
    pub child: Child,
    pub addr: SocketAddr,
}

impl Server {
    pub fn url(&self, path: &str) -> String {
        format!("https://{}{}", self.addr, path)
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// An agent-like client: its own key, a CSR, its source address bound to its public IP.
pub struct Agent {
    pub name: String,
    pub public_ip: Ipv4Addr,
    pub private_ip: Ipv4Addr,
    pub key: KeyPair,
    pub cert_chain: Option<String>,
    ca_pem: String,
}

impl Agent {
    pub fn new(name: &str, public_ip: &str, private_ip: &str, ca_pem: &str) -> Self {
        Self {
            name: name.into(),
            public_ip: public_ip.parse().unwrap(),
            private_ip: private_ip.parse().unwrap(),
            key: KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap(),
            cert_chain: None,
            ca_pem: ca_pem.into(),
        }
    }

    pub fn csr(&self) -> String {
        CertificateParams::new(vec![])
            .unwrap()
            .serialize_request(&self.key)
            .unwrap()
            .pem()
            .unwrap()
    }

    pub fn facts(&self) -> NodeFacts {
        NodeFacts {
            droplet_id: 42,
            region: "r1".parse().unwrap(),
            public_ipv4: self.public_ip,
            private_ipv4: self.private_ip,
        }
    }

    fn builder(&self) -> reqwest::ClientBuilder {
        reqwest::Client::builder()
            .use_rustls_tls()
            .tls_built_in_root_certs(false)
            .add_root_certificate(reqwest::Certificate::from_pem(self.ca_pem.as_bytes()).unwrap())
            .local_address(std::net::IpAddr::V4(self.public_ip))
            .timeout(Duration::from_secs(60))
    }

    /// A client without a client certificate.
    pub fn anonymous(&self) -> reqwest::Client {
        self.builder().build().unwrap()
    }

    /// A client presenting the node's identity certificate.
    pub fn mtls(&self) -> reqwest::Client {
        let chain = self.cert_chain.as_ref().expect("enrolled");
        let pem = format!("{}{}", self.key.serialize_pem(), chain);
        self.builder()
            .identity(reqwest::Identity::from_pem(pem.as_bytes()).unwrap())
            .build()
            .unwrap()
    }

    pub async fn enroll_raw(
        &self,
        server: &Server,
        token: &str,
        body: &EnrollRequest,
    ) -> reqwest::Response {
        self.anonymous()
            .post(server.url(&format!("/v1/join/{}?token={token}", self.name)))
            .json(body)
            .send()
            .await
            .unwrap()
    }

    pub async fn enroll(&mut self, server: &Server, token: &str) -> EnrollResponse {
        let body = EnrollRequest {
            csr_pem: self.csr(),
            facts: self.facts(),
        };
        let resp = self.enroll_raw(server, token, &body).await;
        let status = resp.status();
        let text = resp.text().await.unwrap();
        assert!(status.is_success(), "enroll {}: {status} {text}", self.name);
        let r: EnrollResponse = serde_json::from_str(&text).unwrap();
        self.cert_chain = Some(r.cert_chain_pem.clone());
        r
    }
}

/// Polls `f` until it returns Some or the deadline passes.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    let mut poll = tokio::time::interval(Duration::from_millis(50));
    loop {
        poll.tick().await;
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
    }
}

pub fn error_kind(body: &str) -> String {
    let v: serde_json::Value =
        serde_json::from_str(body).unwrap_or_else(|_| panic!("not JSON: {body}"));
    v["kind"]
        .as_str()
        .unwrap_or_else(|| panic!("no kind: {body}"))
        .to_owned()
}

pub fn path_str(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Every row of every table of the state database at `db` but `events` and `refusals` (which a
/// refusal is meant to write), each value in its SQLite form, rows sorted: what "a refusal
/// changes nothing" is compared on.
pub fn store_dump(db: &Path) -> std::collections::BTreeMap<String, Vec<Vec<String>>> {
    let conn = rusqlite::Connection::open(db).unwrap();
    let tables: Vec<String> = conn
        .prepare(
            "SELECT name FROM sqlite_master WHERE type = 'table'
             AND name NOT IN ('events', 'refusals') AND name NOT LIKE 'sqlite_%' ORDER BY rowid",
        )
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let mut out = std::collections::BTreeMap::new();
    for t in tables {
        let mut stmt = conn.prepare(&format!("SELECT * FROM {t}")).unwrap();
        let n = stmt.column_count();
        let mut rows: Vec<Vec<String>> = stmt
            .query_map([], |r| {
                (0..n)
                    .map(|i| {
                        r.get::<_, rusqlite::types::Value>(i)
                            .map(|v| format!("{v:?}"))
                    })
                    .collect()
            })
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        rows.sort();
        out.insert(t, rows);
    }
    out
}
