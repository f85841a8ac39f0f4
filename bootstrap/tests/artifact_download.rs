//! The agent's artifact download against the real seeder (in-process, real TLS on loopback): the
//! bytes stream into a temp file beside the destination while they are hashed, and a download
//! whose digest or size is not the manifest's is refused and leaves no file, temp or final.
//! The seeder is made to serve tampered bytes by changing its stored file and forging the stamp
//! `artifact add` recorded (what a corrupted or compromised store looks like to the agent).
//! Addresses: 127.0.94.x.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use clap::Parser;
use hiveseed_bootstrap::client::SeederClient;
use hiveseed_bootstrap::plan::Content;
use hiveseed_bootstrap::resources::file::ensure_file;
use hiveseed_bootstrap::resources::ResourceError;
use hiveseed_bootstrap::RealHost;
use hiveseed_proto::api::{EnrollRequest, NodeFacts};
use hiveseed_proto::token::{JoinClaims, TOKEN_VERSION};
use hiveseed_proto::{AbsPath, FileMode, JoinToken, Sha256};
use hiveseed_seeder::artifact::Stamp;
use hiveseed_seeder::campaign::{self, CampaignDir};
use hiveseed_seeder::fleet::Fleet;
use hiveseed_seeder::state::Policy;

const SEEDER_IP: &str = "127.0.94.1";
const NODE_IP: &str = "127.0.94.10";
const NODE: &str = "dl-peer-r1-01";

const FLEET: &str = r#"campaign = "dl"
seeder_url = "https://127.0.94.1:8443"

[regions.r1]
pg = 1
peer = 1
# The node claims 127.0.94.10 as its private address.
vpc_cidr = "127.0.94.0/24"

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

const PEER: &str = r#"
[[resource]]
kind = "file"
id = "file:tool"
path = "/usr/local/bin/tool"
mode = "0755"
artifact = "tool"
"#;

const SIZE: usize = 8 * 1024 * 1024;

fn tool_bytes() -> Vec<u8> {
    (0..SIZE).map(|i| (i * 31 % 251) as u8).collect()
}

struct Setup {
    _tmp: tempfile::TempDir,
    dir: CampaignDir,
    root: PathBuf,
    sha: Sha256,
    client: SeederClient,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

/// A campaign with the `tool` artifact added, its seeder serving, and the node enrolled.
async fn setup() -> Setup {
    let tmp = tempfile::tempdir().unwrap();
    let roles = tmp.path().join("roles");
    std::fs::create_dir_all(&roles).unwrap();
    std::fs::write(roles.join("fleet.toml"), FLEET).unwrap();
    std::fs::write(roles.join("peer.toml"), PEER).unwrap();
    std::fs::write(roles.join("pg.toml"), "").unwrap();
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
    let tool = tmp.path().join("tool");
    std::fs::write(&tool, tool_bytes()).unwrap();
    hiveseed_seeder::cli::run(hiveseed_seeder::cli::Cli::parse_from([
        "seeder",
        "artifact",
        "add",
        "--dir",
        dir.root().to_str().unwrap(),
        "--name",
        "tool",
        tool.to_str().unwrap(),
    ]))
    .unwrap();

    let listener = tokio::net::TcpListener::bind(format!("{SEEDER_IP}:0"))
        .await
        .unwrap();
    let addr: SocketAddr = listener.local_addr().unwrap();
    let (stop, rx) = tokio::sync::oneshot::channel::<()>();
    let serve_dir = dir.clone();
    let task = tokio::spawn(async move {
        hiveseed_seeder::cli::serve_on(serve_dir, listener, Policy::default(), async {
            let _ = rx.await;
        })
        .await
    });

    let ca = std::fs::read_to_string(dir.ca_cert()).unwrap();
    let key = ed25519_dalek::SigningKey::from_pkcs8_pem(
        &std::fs::read_to_string(dir.manifest_key()).unwrap(),
    )
    .unwrap();
    let claims = JoinClaims {
        v: TOKEN_VERSION,
        campaign: "dl".parse().unwrap(),
        node: NODE.parse().unwrap(),
        role: "peer".parse().unwrap(),
        region: "r1".parse().unwrap(),
        exp: hiveseed_bootstrap::agent::unix_now() + 3600,
        nonce: "00".repeat(16),
    };
    let token = JoinToken::sign(&claims, &key);
    let base = format!("https://{addr}");
    let mut client = SeederClient::new(&base, &ca, Some(NODE_IP.parse().unwrap()), None).unwrap();
    let node_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let csr = rcgen::CertificateParams::new(vec![])
        .unwrap()
        .serialize_request(&node_key)
        .unwrap()
        .pem()
        .unwrap();
    let enrolled = client
        .enroll(
            &format!("{base}/v1/join/{NODE}?token={}", token.as_str()),
            &EnrollRequest {
                csr_pem: csr,
                facts: NodeFacts {
                    droplet_id: 94,
                    region: "r1".parse().unwrap(),
                    public_ipv4: NODE_IP.parse().unwrap(),
                    private_ipv4: NODE_IP.parse().unwrap(),
                },
            },
        )
        .await
        .unwrap();
    client
        .set_identity(&format!(
            "{}{}",
            node_key.serialize_pem(),
            enrolled.cert_chain_pem
        ))
        .unwrap();
    let root = tmp.path().join("node");
    std::fs::create_dir_all(&root).unwrap();
    Setup {
        _tmp: tmp,
        dir,
        root,
        sha: Sha256::digest(&tool_bytes()),
        client,
        stop: Some(stop),
        task,
    }
}

impl Setup {
    async fn download(&self) -> Result<(), ResourceError> {
        let host = RealHost::new(&self.root).unwrap();
        let path: AbsPath = "/usr/local/bin/tool".parse().unwrap();
        // Observed right before the write, as a plan would have.
        let observed = hiveseed_bootstrap::Host::stat(&host, &path).unwrap();
        ensure_file(
            &host,
            &self.client,
            &path,
            &Content::Artifact {
                sha256: self.sha,
                size: SIZE as u64,
            },
            FileMode::new(0o755).unwrap(),
            None,
            observed.as_ref(),
        )
        .await
    }

    fn stored(&self) -> PathBuf {
        self.dir.artifacts_dir().join(self.sha.to_hex())
    }

    /// Rewrites the seeder's stored file and forges its stamp so the seeder serves `bytes`.
    fn tamper(&self, bytes: &[u8]) {
        std::fs::write(self.stored(), bytes).unwrap();
        let m = std::fs::metadata(self.stored()).unwrap();
        let ns = |s: i64, n: i64| i128::from(s) * 1_000_000_000 + i128::from(n);
        let stamp = Stamp {
            size: m.size(),
            dev: m.dev(),
            ino: m.ino(),
            mtime_ns: ns(m.mtime(), m.mtime_nsec()),
            ctime_ns: ns(m.ctime(), m.ctime_nsec()),
        };
        std::fs::write(
            self.dir
                .artifacts_dir()
                .join(format!("{}.stamp", self.sha.to_hex())),
            serde_json::to_vec(&stamp).unwrap(),
        )
        .unwrap();
    }

    /// Every entry under the destination directory (a temp file would show here).
    fn dest_entries(&self) -> Vec<String> {
        list(&self.root.join("usr/local/bin"))
    }

    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.task.await.unwrap().unwrap();
    }
}

fn list(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

use ed25519_dalek::pkcs8::DecodePrivateKey;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tampered_artifact_is_refused_and_leaves_no_file() {
    let s = setup().await;

    // Same size, other bytes: the digest is wrong.
    let mut tampered = tool_bytes();
    tampered[SIZE / 2] ^= 0xff;
    s.tamper(&tampered);
    let err = s
        .download()
        .await
        .expect_err("a tampered artifact was installed");
    assert!(
        matches!(err, ResourceError::ArtifactMismatch { got_len, .. } if got_len == SIZE as u64),
        "{err}"
    );
    assert_eq!(s.dest_entries(), Vec::<String>::new(), "left behind");

    // Longer than the manifest says: refused as soon as it runs over.
    let mut longer = tool_bytes();
    longer.extend_from_slice(&[0u8; 4096]);
    s.tamper(&longer);
    let err = s
        .download()
        .await
        .expect_err("an oversized artifact was installed");
    assert!(
        matches!(&err, ResourceError::Fetch { source, .. } if source.message.contains("8388608")),
        "{err}"
    );
    assert_eq!(s.dest_entries(), Vec::<String>::new(), "left behind");

    // The genuine bytes are installed, byte-identical, with nothing else beside them.
    s.tamper(&tool_bytes());
    s.download().await.unwrap();
    assert_eq!(s.dest_entries(), vec!["tool".to_owned()]);
    let got = std::fs::read(s.root.join("usr/local/bin/tool")).unwrap();
    assert!(got == tool_bytes(), "installed bytes differ");
    s.stop().await;
}
