//! What the seeder certifies, tried as a hostile node would, against the real seeder listener
//! (`serve_on`, real TLS) with the agent's own client and its own check of the seeder: no node
//! certificate passes for the seeder, claimed addresses are checked before they reach a
//! certificate, purposes follow the role's manifest, and a bad CSR changes nothing.
//!
//! Loopback addresses of this file: the seeder 127.0.84.1 (inside the region's VPC range
//! 127.0.84.0/24, so claiming it is refused as the seeder's address, not as out of range), the
//! nodes' private addresses 127.0.84.N and their public (source) addresses 127.0.85.N.

#![allow(clippy::unwrap_used)]

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use ed25519_dalek::pkcs8::DecodePrivateKey;
use hiveseed_bootstrap::client::{ClientError, SeederClient, SeederVerifier};
use hiveseed_proto::api::{EnrollRequest, ErrorKind, NodeFacts};
use hiveseed_proto::manifest::CertificatePurpose;
use hiveseed_proto::token::{JoinClaims, TOKEN_VERSION};
use hiveseed_proto::{JoinToken, NodeName};
use hiveseed_seeder::campaign::{self, CampaignDir};
use hiveseed_seeder::fleet::Fleet;
use hiveseed_seeder::state::Policy;
use hiveseed_seeder::store::Store;
use rcgen::{CertificateParams, KeyPair, PKCS_ECDSA_P256_SHA256};
use rustls::client::danger::ServerCertVerifier;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};

const SEEDER_IP: &str = "127.0.84.1";
const PG: &str = "cp-pg-r1-01";
const PEER: &str = "cp-peer-r1-01";

const FLEET: &str = r#"campaign = "cp"
seeder_url = "https://127.0.84.1:8443"

[regions.r1]
pg = 1
peer = 6
vpc_cidr = "127.0.84.0/24"

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

/// A pg node's manifest asks for a PostgreSQL server certificate only.
const PG_ROLE: &str = r#"
[[resource]]
kind = "certificate"
id = "cert:pg-server"
purpose = "pg_server"
key_path = "/etc/pg/server.key"
cert_path = "/etc/pg/server.pem"
key_mode = "0600"
"#;

/// A peer's manifest asks for a server and a mesh client certificate.
const PEER_ROLE: &str = r#"
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

/// A P-384 key whose request is signed with ecdsa-with-SHA256 (seeder/src/pki.rs has the recipe).
const MISMATCHED_CSR: &str = include_str!("../../seeder/tests/fixtures/p384-key-ecdsa-sha256.csr");

struct Seeder {
    _tmp: tempfile::TempDir,
    dir: CampaignDir,
    url: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Seeder {
    async fn start(policy: Policy) -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let roles = tmp.path().join("roles");
        std::fs::create_dir_all(&roles).unwrap();
        std::fs::write(roles.join("fleet.toml"), FLEET).unwrap();
        std::fs::write(roles.join("pg.toml"), PG_ROLE).unwrap();
        std::fs::write(roles.join("peer.toml"), PEER_ROLE).unwrap();
        let dir = CampaignDir::new(tmp.path().join("campaign"));
        campaign::init(
            &dir,
            &roles.join("fleet.toml"),
            &roles,
            &Fleet::parse(FLEET).unwrap(),
            std::time::SystemTime::now(),
        )
        .unwrap();
        let listener = tokio::net::TcpListener::bind(format!("{SEEDER_IP}:0"))
            .await
            .unwrap();
        let addr: SocketAddr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(hiveseed_seeder::cli::serve_on(
            dir.clone(),
            listener,
            policy,
            async {
                let _ = rx.await;
            },
        ));
        Self {
            _tmp: tmp,
            dir,
            url: format!("https://{addr}"),
            stop: Some(tx),
            task,
        }
    }

    fn ca_pem(&self) -> String {
        std::fs::read_to_string(self.dir.ca_cert()).unwrap()
    }

    fn store(&self) -> Store {
        Store::open(&self.dir.state_db()).unwrap()
    }

    /// Every certificate the store holds for `node` (any purpose, revoked or not).
    fn certs_of(&self, node: &str) -> Vec<String> {
        let node: NodeName = node.parse().unwrap();
        let store = self.store();
        ["identity", "server", "pg_server", "client"]
            .iter()
            .flat_map(|p| store.current_certs(p).unwrap())
            .filter(|c| c.node == node)
            .map(|c| c.fpr)
            .collect()
    }

    fn join_url(&self, node: &str, role: &str) -> String {
        let key = ed25519_dalek::SigningKey::from_pkcs8_pem(
            &std::fs::read_to_string(self.dir.manifest_key()).unwrap(),
        )
        .unwrap();
        let claims = JoinClaims {
            v: TOKEN_VERSION,
            campaign: "cp".parse().unwrap(),
            node: node.parse().unwrap(),
            role: role.parse().unwrap(),
            region: "r1".parse().unwrap(),
            exp: hiveseed_bootstrap::agent::unix_now() + 3600,
            nonce: hex::encode(rand::random::<[u8; 16]>()),
        };
        format!(
            "{}/v1/join/{node}?token={}",
            self.url,
            JoinToken::sign(&claims, &key).as_str()
        )
    }

    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.task.await.unwrap().unwrap();
    }
}

/// A node as the agent is: its key, its facts, the agent's own client bound to its public address.
struct Node {
    name: &'static str,
    role: &'static str,
    key: KeyPair,
    public: Ipv4Addr,
    client: SeederClient,
}

impl Node {
    fn new(s: &Seeder, name: &'static str, role: &'static str, n: u8) -> Self {
        let public = Ipv4Addr::new(127, 0, 85, n);
        Self {
            name,
            role,
            key: KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap(),
            public,
            client: SeederClient::new(&s.url, &s.ca_pem(), Some(public), None).unwrap(),
        }
    }

    fn csr(key: &KeyPair) -> String {
        CertificateParams::new(vec![])
            .unwrap()
            .serialize_request(key)
            .unwrap()
            .pem()
            .unwrap()
    }

    async fn enroll_claiming(
        &mut self,
        s: &Seeder,
        private: &str,
        csr_pem: String,
    ) -> Result<(), ClientError> {
        let req = EnrollRequest {
            csr_pem,
            facts: NodeFacts {
                droplet_id: u64::from(self.public.octets()[3]),
                region: "r1".parse().unwrap(),
                public_ipv4: self.public,
                private_ipv4: private.parse().unwrap(),
            },
        };
        let r = self
            .client
            .enroll(&s.join_url(self.name, self.role), &req)
            .await?;
        self.client
            .set_identity(&format!("{}{}", self.key.serialize_pem(), r.cert_chain_pem))
            .unwrap();
        Ok(())
    }

    async fn enroll(&mut self, s: &Seeder, private: &str) {
        let csr = Self::csr(&self.key);
        self.enroll_claiming(s, private, csr)
            .await
            .unwrap_or_else(|e| panic!("enrolling {}: {e}", self.name));
    }

    /// A service certificate for a fresh key: (chain PEM, key).
    async fn certificate(
        &self,
        purpose: CertificatePurpose,
    ) -> Result<(String, KeyPair), ClientError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let chain = self.client.certificate(purpose, &Self::csr(&key)).await?;
        Ok((chain, key))
    }
}

fn refusal(what: &str, r: Result<impl std::fmt::Debug, ClientError>) -> (ErrorKind, String) {
    match r {
        Err(ClientError::Refused { kind, message, .. }) => (kind, message),
        other => panic!("{what}: expected a refusal, got {other:?}"),
    }
}

/// The agent's own check of the seeder's certificate, for `chain_pem` presented at `host`.
fn verifies_as_seeder(ca_pem: &str, chain_pem: &str, host: &str) -> Result<(), rustls::Error> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
        .collect::<Result<_, _>>()
        .unwrap();
    let verifier = SeederVerifier::new(ca_pem).unwrap();
    verifier
        .verify_server_cert(
            &chain[0],
            &chain[1..],
            &ServerName::try_from(host.to_owned()).unwrap(),
            &[],
            UnixTime::now(),
        )
        .map(|_| ())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_node_certificate_passes_for_the_seeder_and_claimed_addresses_are_checked() {
    let s = Seeder::start(Policy::default()).await;
    let ca = s.ca_pem();

    // The seeder's own certificate passes the agent's check at the seeder's address.
    let seeder_pem = std::fs::read_to_string(s.dir.seeder_cert()).unwrap();
    verifies_as_seeder(&ca, &seeder_pem, SEEDER_IP).unwrap();

    // A pg node gets a PostgreSQL server certificate, signed by the campaign CA, naming its
    // private address: the agent's check refuses it even at that address.
    let mut pg = Node::new(&s, PG, "pg", 10);
    pg.enroll(&s, "127.0.84.10").await;
    let (pg_chain, _) = pg.certificate(CertificatePurpose::PgServer).await.unwrap();
    let mut sans = hiveseed_seeder::pki::cert_sans(&pg_chain).unwrap();
    sans.sort();
    assert_eq!(sans, ["127.0.84.10", "127.0.85.10", PG]);
    let err = verifies_as_seeder(&ca, &pg_chain, "127.0.84.10").unwrap_err();
    assert!(
        matches!(
            err,
            rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidForName)
                | rustls::Error::InvalidCertificate(
                    rustls::CertificateError::NotValidForNameContext { .. }
                )
        ),
        "a node certificate was taken for the seeder: {err:?}"
    );

    // Claims a node may not make: each refused naming the field, and nothing stored.
    let mut peer = Node::new(&s, PEER, "peer", 11);
    for (private, kind, says) in [
        (
            SEEDER_IP,
            ErrorKind::Forbidden,
            "is the seeder's own address",
        ),
        (
            "127.0.84.10",
            ErrorKind::Forbidden,
            "address of enrolled node cp-pg-r1-01",
        ),
        (
            "10.0.0.5",
            ErrorKind::BadRequest,
            "outside region r1's VPC range 127.0.84.0/24",
        ),
    ] {
        let csr = Node::csr(&peer.key);
        let (got_kind, message) = refusal(
            &format!("claiming {private}"),
            peer.enroll_claiming(&s, private, csr).await,
        );
        assert_eq!(got_kind, kind, "claiming {private}: {message}");
        assert!(
            message.contains("facts.private_ipv4") && message.contains(says),
            "claiming {private}: {message}"
        );
        assert!(s
            .store()
            .enrollment(&PEER.parse().unwrap())
            .unwrap()
            .is_none());
        assert!(
            s.certs_of(PEER).is_empty(),
            "claiming {private} stored a certificate"
        );
    }
    // Its own address in range: enrolled.
    peer.enroll(&s, "127.0.84.11").await;
    let (server_chain, _) = peer.certificate(CertificatePurpose::Server).await.unwrap();
    let mut sans = hiveseed_seeder::pki::cert_sans(&server_chain).unwrap();
    sans.sort();
    assert_eq!(sans, ["127.0.85.11", PEER]);
    assert!(verifies_as_seeder(&ca, &server_chain, "127.0.85.11").is_err());
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purposes_follow_the_role_and_a_bad_csr_changes_nothing() {
    let s = Seeder::start(Policy::default()).await;
    let mut pg = Node::new(&s, PG, "pg", 20);
    pg.enroll(&s, "127.0.84.20").await;
    let mut peer = Node::new(&s, PEER, "peer", 21);
    peer.enroll(&s, "127.0.84.21").await;

    // Purposes the node's manifest does not name: forbidden, nothing stored, no allowlist entry.
    let before_pg = s.certs_of(PG);
    for purpose in [CertificatePurpose::Client, CertificatePurpose::Server] {
        let (kind, message) = refusal(
            &format!("pg asking for {purpose:?}"),
            pg.certificate(purpose).await,
        );
        assert_eq!(kind, ErrorKind::Forbidden, "{purpose:?}: {message}");
        assert!(message.contains("no certificate of purpose"), "{message}");
    }
    assert_eq!(s.certs_of(PG), before_pg);
    let (kind, _) = refusal(
        "peer asking for pg_server",
        peer.certificate(CertificatePurpose::PgServer).await,
    );
    assert_eq!(kind, ErrorKind::Forbidden);
    // What the manifests name is issued.
    pg.certificate(CertificatePurpose::PgServer).await.unwrap();
    peer.certificate(CertificatePurpose::Client).await.unwrap();
    let clients: Vec<NodeName> = s
        .store()
        .current_certs("client")
        .unwrap()
        .into_iter()
        .map(|c| c.node)
        .collect();
    assert_eq!(clients, [PEER.parse::<NodeName>().unwrap()]);

    // A CSR whose P-384 key is signed with ecdsa-with-SHA256: refused on every path, and the
    // node's identity is what it was.
    let peer_name: NodeName = PEER.parse().unwrap();
    let identity_before = s.store().enrollment(&peer_name).unwrap().unwrap();
    let certs_before = s.certs_of(PEER);
    let (kind, message) = refusal(
        "renewal with the mismatched CSR",
        peer.client.renew_identity(MISMATCHED_CSR).await,
    );
    assert_eq!(kind, ErrorKind::BadCsr, "{message}");
    assert!(message.contains("signed with"), "{message}");
    let (kind, _) = refusal(
        "a server certificate for the mismatched CSR",
        peer.client
            .certificate(CertificatePurpose::Server, MISMATCHED_CSR)
            .await,
    );
    assert_eq!(kind, ErrorKind::BadCsr);
    let (kind, _) = refusal(
        "re-enrollment with the mismatched CSR",
        peer.enroll_claiming(&s, "127.0.84.21", MISMATCHED_CSR.to_owned())
            .await,
    );
    assert_eq!(kind, ErrorKind::BadCsr);
    assert_eq!(
        s.store().enrollment(&peer_name).unwrap().unwrap(),
        identity_before
    );
    assert_eq!(
        s.certs_of(PEER),
        certs_before,
        "a refused CSR changed the certificates"
    );
    // The old identity still works.
    peer.client
        .manifest(None, Duration::from_secs(0))
        .await
        .unwrap();
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_source_check_no_certificate_names_the_public_address() {
    let s = Seeder::start(Policy {
        check_source: false,
        ..Policy::default()
    })
    .await;
    let mut peer = Node::new(&s, PEER, "peer", 31);
    // Claims a public address it does not connect from: accepted without the source check ...
    peer.public = Ipv4Addr::new(203, 0, 113, 9);
    peer.enroll(&s, "127.0.84.31").await;
    // ... but no certificate names it.
    let (chain, _) = peer.certificate(CertificatePurpose::Server).await.unwrap();
    assert_eq!(hiveseed_seeder::pki::cert_sans(&chain).unwrap(), [PEER]);
    s.stop().await;
}

/// Six peers claim one private address at the same moment (one task each on a two-thread
/// runtime): exactly one is enrolled, the others are refused naming the holder, and the store
/// holds the address once. The seeder's enrollment lock closes the window between the check and
/// the store; that window has no await and lasts microseconds, so without the lock this test
/// still passed in 5 runs out of 5: it pins down the outcome, it does not catch the race.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_claims_of_one_address_enroll_exactly_one_node() {
    const PEERS: [&str; 6] = [
        "cp-peer-r1-01",
        "cp-peer-r1-02",
        "cp-peer-r1-03",
        "cp-peer-r1-04",
        "cp-peer-r1-05",
        "cp-peer-r1-06",
    ];
    const CLAIMED: &str = "127.0.84.40";
    let s = std::sync::Arc::new(Seeder::start(Policy::default()).await);
    let gate = std::sync::Arc::new(tokio::sync::Barrier::new(PEERS.len()));
    let mut tasks = Vec::new();
    for (i, name) in PEERS.into_iter().enumerate() {
        let mut node = Node::new(&s, name, "peer", 40 + i as u8);
        let csr = Node::csr(&node.key);
        let (s, gate) = (s.clone(), gate.clone());
        tasks.push(tokio::spawn(async move {
            gate.wait().await;
            (name, node.enroll_claiming(&s, CLAIMED, csr).await)
        }));
    }
    let mut enrolled = Vec::new();
    for t in tasks {
        match t.await.unwrap() {
            (name, Ok(())) => enrolled.push(name),
            (name, Err(e)) => {
                let (kind, message) = refusal(name, Err::<(), _>(e));
                assert_eq!(kind, ErrorKind::Forbidden, "{name}: {message}");
                assert!(
                    message.contains("is an address of enrolled node"),
                    "{message}"
                );
            }
        }
    }
    assert_eq!(enrolled.len(), 1, "enrolled with {CLAIMED}: {enrolled:?}");
    let holders = s
        .store()
        .enrollments()
        .unwrap()
        .into_iter()
        .filter(|e| e.private_ip.to_string() == CLAIMED)
        .count();
    assert_eq!(holders, 1);
    std::sync::Arc::into_inner(s).unwrap().stop().await;
}
