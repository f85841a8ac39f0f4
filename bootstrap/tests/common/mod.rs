//! Shared fixtures: a temp root with its own passwd/group, manifests, and in-process fakes for the
//! seeder-backed collaborators (signer, fetcher, readiness).
#![allow(dead_code, clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use hiveseed_bootstrap::host::fake::FakeHost;
use hiveseed_bootstrap::resources::BoxFuture;
use hiveseed_bootstrap::{
    apply, observe, plan, ApplyEnv, ApplyEvent, ApplySettings, ApplySummary, ArtifactFetcher,
    CertSigner, CredentialIssuer, FetchError, Host, NodeReadiness, ObserveEnv, Plan, PlanContext,
    ReadinessError, SignError, Supervisor, WaitPolicy,
};
use hiveseed_proto::api::{CredentialRequest, CredentialResponse};
use hiveseed_proto::manifest::{CertificatePurpose, FederationIssuer, MANIFEST_VERSION};
use hiveseed_proto::{Generation, Manifest, NodeName, Resource, Sha256};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, IsCa, Issuer, KeyPair,
};

pub const PASSWD: &str = "root:x:0:0:root:/root:/bin/bash\nnobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\npostgres:x:101:104::/var/lib/postgresql:/bin/bash\n";
pub const GROUP: &str = "root:x:0:\nnogroup:x:65534:\npostgres:x:104:\n";

/// A temp dir laid out like a minimal node root.
pub fn temp_root() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir_all(dir.path().join("etc")).unwrap();
    std::fs::write(dir.path().join("etc/passwd"), PASSWD).unwrap();
    std::fs::write(dir.path().join("etc/group"), GROUP).unwrap();
    dir
}

pub fn node() -> NodeName {
    "do-1461-peer-nyc3-01".parse().unwrap()
}

pub fn manifest(resources: Vec<Resource>) -> Manifest {
    Manifest {
        v: MANIFEST_VERSION,
        campaign: "do-1461".parse().unwrap(),
        node: node(),
        role: "peer".parse().unwrap(),
        region: "nyc3".parse().unwrap(),
        generation: Generation(1),
        issued_at: 1,
        not_after: u64::MAX / 2,
        digest: Manifest::digest_of(&resources),
        report_interval_secs: 30,
        resources,
    }
}

pub fn res(json: serde_json::Value) -> Resource {
    serde_json::from_value(json).expect("resource json")
}

/// Signs CSRs with a CA made in the test; validity chosen per test.
pub struct TestCa {
    pub cert_pem: String,
    issuer: Mutex<Issuer<'static, KeyPair>>,
    /// (seconds before now, seconds after now) of issued certificates.
    pub validity: Mutex<(i64, i64)>,
    pub signed: AtomicU32,
}

impl TestCa {
    pub fn new() -> Self {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "test campaign CA");
        let cert = params.self_signed(&key).unwrap();
        Self {
            cert_pem: cert.pem(),
            issuer: Mutex::new(Issuer::new(params, key)),
            validity: Mutex::new((3600, 30 * 86400)),
            signed: AtomicU32::new(0),
        }
    }

    /// A server certificate for `sans` (IPs or DNS names), with its key, signed by this CA.
    pub fn issue(&self, sans: &[&str], client: bool) -> (String, String) {
        let key = KeyPair::generate().unwrap();
        let mut params =
            CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
        params.extended_key_usages = vec![if client {
            rcgen::ExtendedKeyUsagePurpose::ClientAuth
        } else {
            rcgen::ExtendedKeyUsagePurpose::ServerAuth
        }];
        let issuer = self.issuer.lock().unwrap();
        let cert = params.signed_by(&key, &issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

impl CertSigner for TestCa {
    fn sign<'a>(
        &'a self,
        _purpose: CertificatePurpose,
        csr_pem: &'a str,
    ) -> BoxFuture<'a, Result<String, SignError>> {
        Box::pin(async move {
            let mut csr =
                CertificateSigningRequestParams::from_pem(csr_pem).map_err(|e| SignError {
                    message: e.to_string(),
                    retryable: false,
                })?;
            let (before, after) = *self.validity.lock().unwrap();
            let now = time::OffsetDateTime::now_utc();
            csr.params.not_before = now - time::Duration::seconds(before);
            csr.params.not_after = now + time::Duration::seconds(after);
            let issuer = self.issuer.lock().unwrap();
            let cert = csr.signed_by(&issuer).map_err(|e| SignError {
                message: e.to_string(),
                retryable: false,
            })?;
            self.signed.fetch_add(1, Ordering::SeqCst);
            Ok(format!("{}{}", cert.pem(), self.cert_pem))
        })
    }
}

/// Mints federation credentials like the seeder does, with a CA made in the test; records every
/// request exactly as it would go over the wire.
pub struct TestIssuer {
    key: ed25519_dalek::SigningKey,
    pub public: FederationIssuer,
    /// (seconds before now the next credential starts, its TTL).
    pub validity: Mutex<(i64, i64)>,
    /// Answer with a credential for this key instead of the one asked for (a broken seeder).
    pub substitute: Mutex<Option<[u8; 32]>>,
    pub requests: Mutex<Vec<String>>,
}

impl TestIssuer {
    pub fn new() -> Self {
        let key = ed25519_dalek::SigningKey::generate(&mut rand::rngs::OsRng);
        Self {
            public: FederationIssuer {
                id: "do-1461-ca".parse().unwrap(),
                trust_domain: "do-1461.fleet".parse().unwrap(),
                public_key: key.verifying_key().into(),
            },
            key,
            validity: Mutex::new((0, 3600)),
            substitute: Mutex::new(None),
            requests: Mutex::new(Vec::new()),
        }
    }

    /// A credential from this CA for `subject`, starting `ago` seconds before now.
    pub fn mint_for(&self, fed_id: &str, subject: [u8; 32], ago: i64, ttl: i64) -> String {
        hiveseed_proto::credential::mint(
            &self.key,
            self.public.id.as_str(),
            self.public.trust_domain.as_str(),
            fed_id,
            subject,
            unix_now() - ago,
            ttl,
        )
        .unwrap()
        .0
    }
}

pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

impl CredentialIssuer for TestIssuer {
    fn issue<'a>(
        &'a self,
        req: &'a CredentialRequest,
    ) -> BoxFuture<'a, Result<CredentialResponse, SignError>> {
        Box::pin(async move {
            self.requests
                .lock()
                .unwrap()
                .push(serde_json::to_string(req).unwrap());
            let (ago, ttl) = *self.validity.lock().unwrap();
            let subject = self
                .substitute
                .lock()
                .unwrap()
                .unwrap_or(req.subject_pubkey.to_bytes());
            let credential = self.mint_for(req.fed_id.as_str(), subject, ago, ttl);
            let not_after = unix_now() - ago + ttl;
            Ok(CredentialResponse {
                credential,
                not_after,
            })
        })
    }
}

/// Serves artifacts from memory, counting fetches.
#[derive(Default)]
pub struct MemFetcher {
    pub blobs: Mutex<BTreeMap<Sha256, Vec<u8>>>,
    pub fetches: AtomicU32,
}

impl MemFetcher {
    pub fn with(blob: &[u8]) -> Self {
        let f = Self::default();
        f.blobs
            .lock()
            .unwrap()
            .insert(Sha256::digest(blob), blob.to_vec());
        f
    }
}

impl ArtifactFetcher for MemFetcher {
    fn fetch<'a>(
        &'a self,
        sha256: &'a Sha256,
        _size: u64,
        out: &'a mut (dyn std::io::Write + Send),
    ) -> BoxFuture<'a, Result<(), FetchError>> {
        Box::pin(async move {
            self.fetches.fetch_add(1, Ordering::SeqCst);
            let blob = self
                .blobs
                .lock()
                .unwrap()
                .get(sha256)
                .cloned()
                .ok_or_else(|| FetchError {
                    message: format!("no artifact {sha256}"),
                    retryable: false,
                })?;
            out.write_all(&blob).map_err(|e| FetchError {
                message: e.to_string(),
                retryable: false,
            })
        })
    }
}

/// Ready after `after` calls.
pub struct CountingReadiness {
    pub after: u32,
    pub calls: AtomicU32,
}

impl CountingReadiness {
    pub fn new(after: u32) -> Self {
        Self {
            after,
            calls: AtomicU32::new(0),
        }
    }
}

impl NodeReadiness for CountingReadiness {
    fn is_ready<'a>(
        &'a self,
        _node: &'a NodeName,
        _gate: &'a str,
    ) -> BoxFuture<'a, Result<bool, ReadinessError>> {
        Box::pin(async move { Ok(self.calls.fetch_add(1, Ordering::SeqCst) + 1 >= self.after) })
    }
}

pub struct Env<'a> {
    pub host: &'a dyn Host,
    pub fetcher: &'a dyn ArtifactFetcher,
    pub signer: &'a dyn CertSigner,
    pub issuer: &'a dyn CredentialIssuer,
    pub readiness: &'a dyn NodeReadiness,
    pub supervisor: Option<&'a Supervisor>,
}

impl<'a> Env<'a> {
    pub fn new(host: &'a dyn Host) -> Self {
        Self {
            host,
            fetcher: &hiveseed_bootstrap::Unavailable,
            signer: &hiveseed_bootstrap::Unavailable,
            issuer: &hiveseed_bootstrap::Unavailable,
            readiness: &hiveseed_bootstrap::Unavailable,
            supervisor: None,
        }
    }

    pub async fn plan(&self, m: &Manifest) -> Plan {
        let observed = observe(
            m,
            &ObserveEnv {
                host: self.host,
                supervisor: self.supervisor,
                readiness: self.readiness,
                probe_timeout: Duration::from_secs(2),
            },
        )
        .await
        .expect("observe");
        plan(m, &observed, &PlanContext::now()).expect("plan")
    }

    pub async fn apply(&self, p: &Plan) -> (ApplySummary, Vec<ApplyEvent>) {
        let mut events = Vec::new();
        let node = node();
        let env = ApplyEnv {
            host: self.host,
            node: &node,
            fetcher: self.fetcher,
            signer: self.signer,
            issuer: self.issuer,
            readiness: self.readiness,
            supervisor: self.supervisor,
            settings: ApplySettings {
                apt_lock_timeout: Duration::from_secs(60),
                wait: WaitPolicy {
                    first_delay: Duration::from_millis(10),
                    max_delay: Duration::from_millis(100),
                    max_local_delay: Duration::from_millis(100),
                    attempt_timeout: Duration::from_secs(2),
                },
            },
        };
        let summary = apply(p, &env, &mut |e| events.push(e))
            .await
            .unwrap_or_else(|e| panic!("apply failed: {:#}", anyhow::Error::new(e)));
        (summary, events)
    }

    /// First plan changes something, apply reports it changed, second plan is empty.
    pub async fn converge(&self, m: &Manifest) -> (Plan, ApplySummary) {
        let first = self.plan(m).await;
        assert!(
            !first.is_empty(),
            "first plan should change something:\n{first}"
        );
        let (summary, _) = self.apply(&first).await;
        for step in first.changing() {
            let r = summary.reports.iter().find(|r| r.id == step.id).unwrap();
            assert_eq!(
                r.outcome,
                hiveseed_proto::status::Outcome::Changed,
                "{}",
                step.id
            );
        }
        let second = self.plan(m).await;
        assert!(second.is_empty(), "second plan must be empty:\n{second}");
        assert_eq!(second.actions().count(), 0);
        (first, summary)
    }
}

pub fn fake_host(root: &tempfile::TempDir) -> FakeHost {
    FakeHost::new(root.path()).unwrap()
}

/// Polls `cond` until it holds or `deadline` passes: waiting on a condition, never a fixed sleep.
pub async fn eventually<F, Fut>(what: &str, deadline: Duration, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let end = std::time::Instant::now() + deadline;
    let mut poll = tokio::time::interval(Duration::from_millis(5));
    loop {
        poll.tick().await;
        if cond().await {
            return;
        }
        assert!(
            std::time::Instant::now() < end,
            "timed out after {deadline:?} waiting for {what}"
        );
    }
}

/// The text of the file at `path` once it exists and ends with a newline (a unit's marker
/// written whole), within `deadline`.
pub async fn wait_file(path: &std::path::Path, deadline: Duration) -> String {
    let p = path.to_owned();
    eventually(&format!("{}", p.display()), deadline, || {
        let p = p.clone();
        async move { std::fs::read_to_string(&p).is_ok_and(|s| s.ends_with('\n')) }
    })
    .await;
    std::fs::read_to_string(path).unwrap()
}

/// The first status of `unit` that satisfies `cond`, within `deadline`; the panic names `what`
/// and the status last seen.
pub async fn wait_status(
    sup: &Supervisor,
    unit: &str,
    what: &str,
    deadline: Duration,
    cond: impl Fn(&hiveseed_bootstrap::supervisor::ServiceStatus) -> bool,
) -> hiveseed_bootstrap::supervisor::ServiceStatus {
    let mut rx = sup.watch(unit).expect("unit is supervised");
    let got = tokio::time::timeout(deadline, rx.wait_for(|s| cond(s)))
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}: {:?}", sup.status(unit)))
        .expect("status channel open")
        .clone();
    got
}

/// A throwaway PostgreSQL cluster run by the `postgres` account; stopped (fast shutdown) on drop.
pub struct Pg {
    _dir: tempfile::TempDir,
    child: std::process::Child,
    pub port: u16,
    /// The directory of its unix socket.
    pub socket: std::path::PathBuf,
    pub data: std::path::PathBuf,
}

impl Drop for Pg {
    fn drop(&mut self) {
        let _ = rustix::process::kill_process(
            rustix::process::Pid::from_raw(self.child.id() as i32).unwrap(),
            rustix::process::Signal::INT,
        );
        let _ = self.child.wait();
    }
}

/// How [`start_pg_with`] lays a cluster out.
pub struct PgSetup<'a> {
    /// Issues the server certificate (TLS is on), for `listen`.
    pub ca: &'a TestCa,
    pub listen: std::net::IpAddr,
    /// Where the unix socket goes (created for postgres); `None`: the cluster's temp dir.
    pub socket: Option<std::path::PathBuf>,
    /// The pg_hba.conf; `None`: initdb's, scram-sha-256 for everything.
    pub hba: Option<&'a str>,
}

/// [`start_pg_with`] on 127.0.0.1, initdb's pg_hba.conf, the socket in the cluster's temp dir.
pub async fn start_pg(bins: &hiveseed_test_deps::Postgres, ca: &TestCa) -> Pg {
    start_pg_with(
        bins,
        PgSetup {
            ca,
            listen: std::net::Ipv4Addr::LOCALHOST.into(),
            socket: None,
            hba: None,
        },
    )
    .await
}

/// A throwaway cluster on an ephemeral port: superuser `postgres` with password `s3cret-pg`, TLS
/// on. Any failure to start it fails the test.
pub async fn start_pg_with(bins: &hiveseed_test_deps::Postgres, setup: PgSetup<'_>) -> Pg {
    use std::os::unix::process::CommandExt;
    let pw = bins.user;
    let dir = tempfile::tempdir().unwrap();
    let chown = |p: &std::path::Path| std::os::unix::fs::chown(p, Some(pw.0), Some(pw.1)).unwrap();
    chown(dir.path());
    let data = dir.path().join("data");
    std::fs::write(dir.path().join("pw"), "s3cret-pg\n").unwrap();
    chown(&dir.path().join("pw"));
    let ok = std::process::Command::new(&bins.initdb)
        .args([
            "-D",
            data.to_str().unwrap(),
            "-U",
            "postgres",
            "-A",
            "scram-sha-256",
        ])
        .arg(format!("--pwfile={}", dir.path().join("pw").display()))
        .uid(pw.0)
        .gid(pw.1)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap()
        .success();
    assert!(ok, "{} failed", bins.initdb.display());
    let (cert, key) = setup.ca.issue(&[&setup.listen.to_string()], false);
    let hba = setup.hba.map(|h| ("pg_hba.conf", h.to_owned(), 0o600));
    for (name, text, mode) in [("server.crt", cert, 0o644), ("server.key", key, 0o600)]
        .into_iter()
        .chain(hba)
    {
        let p = data.join(name);
        std::fs::write(&p, text).unwrap();
        std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(mode)).unwrap();
        chown(&p);
    }
    let socket = match setup.socket {
        Some(s) => {
            std::fs::create_dir_all(&s).unwrap();
            chown(&s);
            s
        }
        None => dir.path().to_owned(),
    };
    let port = {
        let l = std::net::TcpListener::bind((setup.listen, 0)).unwrap();
        l.local_addr().unwrap().port()
    };
    let log = std::fs::File::create(dir.path().join("postgres.log")).unwrap();
    let child = std::process::Command::new(&bins.postgres)
        .args(["-D", data.to_str().unwrap(), "-p", &port.to_string()])
        .arg("-c")
        .arg(format!("listen_addresses={}", setup.listen))
        .args(["-c", "ssl=on"])
        .arg("-c")
        .arg(format!("unix_socket_directories={}", socket.display()))
        .uid(pw.0)
        .gid(pw.1)
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let pg = Pg {
        _dir: dir,
        child,
        port,
        socket,
        data,
    };
    // TCP listens before the unix socket exists, and both before the server admits a session
    // ("the database system is starting up"): any other answer over the socket means it does.
    let listen = setup.listen;
    let mut session = tokio_postgres::Config::new();
    session
        .host_path(&pg.socket)
        .port(port)
        .user("postgres")
        .password("s3cret-pg")
        .dbname("postgres");
    eventually(
        "postgres accepting sessions",
        Duration::from_secs(30),
        || async {
            let answered = match session.connect(tokio_postgres::NoTls).await {
                Ok(_) => true,
                Err(e) => e.as_db_error().is_some_and(|d| {
                    *d.code() != tokio_postgres::error::SqlState::CANNOT_CONNECT_NOW
                }),
            };
            answered && tokio::net::TcpStream::connect((listen, port)).await.is_ok()
        },
    )
    .await;
    pg
}
