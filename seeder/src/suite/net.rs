//! How the suite talks to a daemon: explicit targets (base URL, the address to dial, the TLS
//! identity to present, the roots to trust), rustls clients built per posture, and answers that
//! never panic on what the network sends.
//!
//! A request that fails below HTTP (TCP, TLS handshake, a refusal alert) answers `000`, as
//! `curl -w '%{http_code}'` does in the seed.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore};

/// Bodies beyond this are cut: probes only look for ids and markers.
const MAX_BODY: usize = 1 << 20;
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// A client certificate and its key, PEM.
#[derive(Clone)]
pub struct Identity {
    /// What the report says about it (`operator`, `rogue self-signed`, ...).
    pub label: String,
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("label", &self.label)
            .finish_non_exhaustive()
    }
}

impl Identity {
    /// A self-signed client certificate no allowlist holds (the seed's `openssl req -x509
    /// -subj /CN=rogue`).
    pub fn rogue() -> Result<Self> {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "rogue");
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        let cert = params.self_signed(&key)?;
        Ok(Self {
            label: "rogue self-signed".into(),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

/// A federation identity the mesh accepts, as a peer holds its own (ai-memory 0.7.0
/// `src/federation/sync.rs:112-160`): an Ed25519 key that signs `POST /api/v1/sync/push` bodies
/// and the campaign issuer's credential for it, which a receiving peer verifies against its trust
/// bundle and binds to `x-peer-id` (`src/handlers/federation_signing_check.rs:579-700`).
///
/// The key is made for the run and lives only in memory; the credential is short-lived.
#[derive(Clone)]
pub struct FedSender {
    /// The credential's subject, sent as `x-peer-id` and the body's `sender_agent_id`.
    pub fed_id: String,
    key: ed25519_dalek::SigningKey,
    credential: String,
}

impl std::fmt::Debug for FedSender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FedSender")
            .field("fed_id", &self.fed_id)
            .finish_non_exhaustive()
    }
}

/// How long the harness's federation credential is valid: one suite run.
pub const FED_SENDER_TTL_SECS: i64 = 3600;

impl FedSender {
    /// A fresh key for `fed_id` and the campaign issuer's credential for it.
    pub fn mint(
        issuer: &crate::credential::Issuer,
        fed_id: &hiveseed_proto::FedId,
        now: i64,
    ) -> Result<Self> {
        let key = ed25519_dalek::SigningKey::generate(&mut rand::rngs::OsRng);
        let (credential, _) = issuer
            .mint(fed_id, key.verifying_key().into(), now, FED_SENDER_TTL_SECS)
            .context("minting the harness federation credential")?;
        Ok(Self {
            fed_id: fed_id.to_string(),
            key,
            credential,
        })
    }

    /// The headers of a signed push of `body`: with a nonce, the signature covers
    /// `body || 0x00 || nonce` (`src/federation/signing.rs:59-69`); without one, the body alone
    /// (the legacy form a receiver takes only with `AI_MEMORY_FED_REQUIRE_NONCE=0`).
    pub fn push_headers(&self, body: &[u8], nonce: Option<&str>) -> Vec<(&'static str, String)> {
        use base64::Engine;
        use ed25519_dalek::Signer;
        let mut signed = body.to_vec();
        if let Some(n) = nonce {
            signed.push(0x00);
            signed.extend_from_slice(n.as_bytes());
        }
        let sig =
            base64::engine::general_purpose::STANDARD.encode(self.key.sign(&signed).to_bytes());
        let mut h = vec![
            ("x-peer-id", self.fed_id.clone()),
            ("x-memory-cred", self.credential.clone()),
            ("x-memory-sig", format!("ed25519={sig}")),
        ];
        if let Some(n) = nonce {
            h.push(("x-memory-nonce", n.to_owned()));
        }
        h
    }
}

/// A CA that issued nothing the fleet serves: trusting only it must fail every handshake.
pub fn foreign_ca_pem() -> Result<String> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "not the campaign CA");
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    Ok(params.self_signed(&key)?.pem())
}

/// One daemon as the suite reaches it.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub name: String,
    pub region: String,
    /// `https://<host>:<port>`; the host is what the server certificate must name.
    pub base: url::Url,
    /// Dial this instead of resolving the host (the seed's `curl --resolve`).
    pub connect: Option<SocketAddr>,
}

impl Endpoint {
    pub fn url(&self, path_and_query: &str) -> String {
        let base = self.base.as_str().trim_end_matches('/');
        format!("{base}{path_and_query}")
    }

    /// The TCP address a request goes to.
    pub fn socket_addr(&self) -> Option<SocketAddr> {
        if let Some(a) = self.connect {
            return Some(a);
        }
        let host = self.base.host_str()?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let ip: std::net::IpAddr = host.parse().ok()?;
        Some(SocketAddr::new(ip, self.base.port_or_known_default()?))
    }
}

/// What a client trusts and presents.
#[derive(Debug, Clone)]
pub struct Posture<'a> {
    pub roots_pem: &'a str,
    pub identity: Option<&'a Identity>,
}

pub fn client_config(p: &Posture<'_>) -> Result<ClientConfig> {
    let mut roots = RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(p.roots_pem.as_bytes()) {
        roots.add(c.context("root certificate PEM")?)?;
    }
    // No roots would refuse every server as an unknown issuer: a local error, not a verdict.
    anyhow::ensure!(!roots.is_empty(), "no root certificate in the roots PEM");
    let builder = ClientConfig::builder_with_provider(crate::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_root_certificates(roots);
    Ok(match p.identity {
        Some(id) => {
            let certs: Vec<CertificateDer<'static>> =
                CertificateDer::pem_slice_iter(id.cert_pem.as_bytes())
                    .collect::<Result<_, _>>()
                    .with_context(|| format!("{} certificate PEM", id.label))?;
            let key = PrivateKeyDer::from_pem_slice(id.key_pem.as_bytes())
                .with_context(|| format!("{} key PEM", id.label))?;
            builder.with_client_auth_cert(certs, key)?
        }
        None => builder.with_no_client_auth(),
    })
}

/// An HTTP client for one endpoint and posture.
pub fn client(ep: &Endpoint, p: &Posture<'_>) -> Result<reqwest::Client> {
    let mut b = reqwest::Client::builder()
        .use_preconfigured_tls(client_config(p)?)
        .timeout(REQUEST_TIMEOUT)
        .connect_timeout(Duration::from_secs(5))
        .pool_max_idle_per_host(0)
        .redirect(reqwest::redirect::Policy::none());
    if let (Some(addr), Some(host)) = (ep.connect, ep.base.host_str()) {
        b = b.resolve(host, addr);
    }
    b.build().context("building the HTTP client")
}

/// An HTTP answer, or why there was none.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    Http {
        status: u16,
        body: String,
    },
    /// No HTTP status: TCP, TLS or timeout. The text is the error chain.
    Transport(String),
}

impl Answer {
    /// The seed's `%{http_code}`: `000` without an HTTP answer.
    pub fn code(&self) -> String {
        match self {
            Answer::Http { status, .. } => status.to_string(),
            Answer::Transport(_) => "000".into(),
        }
    }

    pub fn status(&self) -> Option<u16> {
        match self {
            Answer::Http { status, .. } => Some(*status),
            Answer::Transport(_) => None,
        }
    }

    pub fn is_success(&self) -> bool {
        matches!(self.status(), Some(s) if (200..300).contains(&s))
    }

    pub fn body(&self) -> &str {
        match self {
            Answer::Http { body, .. } => body,
            Answer::Transport(_) => "",
        }
    }

    pub fn json(&self) -> Option<serde_json::Value> {
        serde_json::from_str(self.body()).ok()
    }

    /// A short human form for a report's `got`.
    pub fn summary(&self) -> String {
        match self {
            Answer::Http { status, body } => {
                let b = one_line(body, 160);
                if b.is_empty() {
                    status.to_string()
                } else {
                    format!("{status} {b}")
                }
            }
            Answer::Transport(e) => format!("000 ({})", one_line(e, 200)),
        }
    }

    /// The daemon's refusal tag: `error` or `code` of a JSON body.
    pub fn error_tag(&self) -> Option<String> {
        let v = self.json()?;
        ["error", "code"]
            .iter()
            .find_map(|k| v.get(*k).and_then(|x| x.as_str()).map(str::to_owned))
    }
}

pub fn one_line(s: &str, max: usize) -> String {
    let flat: String = s
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    let flat = flat.trim();
    if flat.chars().count() <= max {
        flat.to_owned()
    } else {
        format!("{}…", flat.chars().take(max).collect::<String>())
    }
}

fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts = vec![e.to_string()];
    let mut cur = e.source();
    while let Some(s) = cur {
        let t = s.to_string();
        if !parts.iter().any(|p| p.contains(&t)) {
            parts.push(t);
        }
        cur = s.source();
    }
    parts.join(": ")
}

/// A request with headers and an optional JSON body (sent byte-exact as given).
#[derive(Debug, Clone, Default)]
pub struct Request<'a> {
    pub method: reqwest::Method,
    pub path: &'a str,
    pub headers: Vec<(&'static str, String)>,
    pub body: Option<Vec<u8>>,
}

pub async fn send(client: &reqwest::Client, ep: &Endpoint, req: Request<'_>) -> Answer {
    let mut rb = client.request(req.method.clone(), ep.url(req.path));
    for (k, v) in &req.headers {
        rb = rb.header(*k, v);
    }
    if let Some(b) = req.body {
        rb = rb.header("content-type", "application/json").body(b);
    }
    let resp = match rb.send().await {
        Ok(r) => r,
        Err(e) => return Answer::Transport(error_chain(&e)),
    };
    let status = resp.status().as_u16();
    let mut resp = resp;
    let mut body = Vec::new();
    loop {
        match resp.chunk().await {
            Ok(Some(c)) => {
                let room = MAX_BODY.saturating_sub(body.len());
                body.extend_from_slice(&c[..c.len().min(room)]);
                if body.len() >= MAX_BODY {
                    break;
                }
            }
            Ok(None) => break,
            // The status arrived; a body cut short is still an answer.
            Err(_) => break,
        }
    }
    Answer::Http {
        status,
        body: String::from_utf8_lossy(&body).into_owned(),
    }
}

/// How one TLS connection attempt ended, up to the first byte of an HTTP answer. Only the server's
/// own refusal (an alert, or closing the connection) or our verifier's refusal of its certificate
/// is a refusal; everything else says why there is no verdict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TlsOutcome {
    /// The client could not be built from local material (roots, certificate or key PEM):
    /// nothing was sent.
    LocalError(String),
    /// No TCP connection to the endpoint.
    Unreachable(String),
    /// The server sent a fatal alert. Under TLS 1.3 a refused client certificate arrives after
    /// the client's side of the handshake is done, on its first read (`stage`).
    ServerAlert { alert: String, stage: Stage },
    /// The server closed the connection (close_notify, FIN or reset) before any HTTP byte.
    ServerClosed { how: String, stage: Stage },
    /// Our verifier refused the server's certificate (the client's refusal, not the server's).
    ServerCertRejected {
        unknown_issuer: bool,
        detail: String,
    },
    /// A TLS failure that is neither an alert from the server nor a certificate refusal.
    TlsError { detail: String, stage: Stage },
    /// Other I/O failure.
    Io { detail: String, stage: Stage },
    /// Nothing (answer, alert or close) before the deadline.
    TimedOut { after: Duration, stage: Stage },
    /// The server answered HTTP: its status line.
    Http { status: Option<u16>, line: String },
}

/// Where in the attempt an outcome happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Handshake,
    /// Writing the request after the client's side of the handshake completed.
    Request,
    /// Waiting for the first byte of the answer.
    FirstRead,
}

impl Stage {
    fn as_str(self) -> &'static str {
        match self {
            Stage::Handshake => "during the TLS handshake",
            Stage::Request => "while the request was written, after the handshake",
            Stage::FirstRead => "on the first read after the handshake",
        }
    }
}

impl TlsOutcome {
    /// A report's `got`: `000 (...)` for every outcome without an HTTP status, as the seed's
    /// `curl -w '%{http_code}'`, with what actually happened.
    pub fn summary(&self) -> String {
        match self {
            TlsOutcome::LocalError(e) => {
                format!("000 (client not built, nothing sent: a local error: {e})")
            }
            TlsOutcome::Unreachable(e) => format!("000 (peer unreachable: {e})"),
            TlsOutcome::ServerAlert { alert, stage } => format!(
                "000 (server sent TLS alert {alert} {} before any HTTP answer)",
                stage.as_str()
            ),
            TlsOutcome::ServerClosed { how, stage } => format!(
                "000 (server closed the connection {} before any HTTP answer: {how})",
                stage.as_str()
            ),
            TlsOutcome::ServerCertRejected { detail, .. } => {
                format!("000 (the client refused the server certificate: {detail})")
            }
            TlsOutcome::TlsError { detail, stage } => {
                format!("000 (TLS error {}: {detail})", stage.as_str())
            }
            TlsOutcome::Io { detail, stage } => {
                format!("000 (i/o error {}: {detail})", stage.as_str())
            }
            TlsOutcome::TimedOut { after, stage } => format!(
                "000 (timed out after {:.1}s {}: no alert, close or answer)",
                after.as_secs_f64(),
                stage.as_str()
            ),
            TlsOutcome::Http { status, line } => format!(
                "{} (the server answered HTTP: {})",
                status.map_or_else(|| "HTTP".to_string(), |s| s.to_string()),
                one_line(line, 80)
            ),
        }
    }
}

/// Which refusal a negative TLS probe expects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The server refuses the client's certificate (or its absence): its alert or its close,
    /// before any HTTP answer.
    ClientCertificate,
    /// The client refuses the server's certificate: it does not chain to the roots trusted.
    ServerCertificate,
}

impl Refusal {
    pub fn expected(self) -> &'static str {
        match self {
            Refusal::ClientCertificate => {
                "000: the server's TLS alert or close before any HTTP answer"
            }
            Refusal::ServerCertificate => "000: the server certificate refused (unknown issuer)",
        }
    }

    /// Whether `o` is this refusal. A local error, an unreachable peer, a timeout or an HTTP
    /// answer never is.
    pub fn seen_in(self, o: &TlsOutcome) -> bool {
        match self {
            Refusal::ClientCertificate => matches!(
                o,
                TlsOutcome::ServerAlert { .. } | TlsOutcome::ServerClosed { .. }
            ),
            Refusal::ServerCertificate => matches!(
                o,
                TlsOutcome::ServerCertRejected {
                    unknown_issuer: true,
                    ..
                }
            ),
        }
    }
}

/// One connection with `posture` to the endpoint: TCP, the TLS handshake, `GET path`, and the
/// first read, each within what is left of `timeout`. Done with tokio-rustls directly (not an
/// HTTP client) so the server's alert, its close and our own failures stay apart.
pub async fn tls_attempt(
    ep: &Endpoint,
    p: &Posture<'_>,
    path: &str,
    timeout: Duration,
) -> TlsOutcome {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let config = match client_config(p) {
        Ok(c) => c,
        Err(e) => return TlsOutcome::LocalError(format!("{e:#}")),
    };
    let Some(host) = ep.base.host_str() else {
        return TlsOutcome::LocalError(format!("{} names no host", ep.base));
    };
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let name = match rustls::pki_types::ServerName::try_from(host.clone()) {
        Ok(n) => n,
        Err(e) => return TlsOutcome::LocalError(format!("server name {host:?}: {e}")),
    };
    let Some(addr) = ep.socket_addr() else {
        return TlsOutcome::Unreachable(format!("{} has no IP address to dial", ep.base));
    };
    let started = tokio::time::Instant::now();
    let deadline = started + timeout;
    let timed_out = |stage| TlsOutcome::TimedOut {
        after: started.elapsed(),
        stage,
    };

    let tcp = match tokio::time::timeout_at(deadline, tokio::net::TcpStream::connect(addr)).await {
        Ok(Ok(t)) => t,
        Ok(Err(e)) => return TlsOutcome::Unreachable(format!("tcp connect {addr}: {e}")),
        Err(_) => {
            return TlsOutcome::Unreachable(format!(
                "tcp connect {addr}: timed out after {:.1}s",
                started.elapsed().as_secs_f64()
            ))
        }
    };
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let mut tls = match tokio::time::timeout_at(deadline, connector.connect(name, tcp)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return classify(&e, Stage::Handshake),
        Err(_) => return timed_out(Stage::Handshake),
    };
    let request = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    let write = async {
        tls.write_all(request.as_bytes()).await?;
        tls.flush().await
    };
    match tokio::time::timeout_at(deadline, write).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return classify(&e, Stage::Request),
        Err(_) => return timed_out(Stage::Request),
    }
    // The status line, or what ended the connection before it.
    let mut got = Vec::new();
    let mut buf = [0u8; 256];
    loop {
        match tokio::time::timeout_at(deadline, tls.read(&mut buf)).await {
            Ok(Ok(0)) if got.is_empty() => {
                return TlsOutcome::ServerClosed {
                    how: "close_notify".into(),
                    stage: Stage::FirstRead,
                }
            }
            Ok(Ok(0)) => break,
            Ok(Ok(n)) => {
                got.extend_from_slice(&buf[..n]);
                if got.contains(&b'\n') || got.len() >= 256 {
                    break;
                }
            }
            Ok(Err(e)) if got.is_empty() => return classify(&e, Stage::FirstRead),
            Ok(Err(_)) => break,
            Err(_) if got.is_empty() => return timed_out(Stage::FirstRead),
            Err(_) => break,
        }
    }
    let text = String::from_utf8_lossy(&got);
    let line = text.lines().next().unwrap_or("").to_owned();
    let status = line
        .strip_prefix("HTTP/")
        .and_then(|r| r.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok());
    TlsOutcome::Http { status, line }
}

/// What an I/O error from tokio-rustls says happened: rustls errors travel inside it.
fn classify(e: &std::io::Error, stage: Stage) -> TlsOutcome {
    use std::io::ErrorKind;
    if let Some(tls) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
        return match tls {
            rustls::Error::AlertReceived(alert) => TlsOutcome::ServerAlert {
                alert: format!("{alert:?}"),
                stage,
            },
            rustls::Error::InvalidCertificate(c) => TlsOutcome::ServerCertRejected {
                unknown_issuer: matches!(c, rustls::CertificateError::UnknownIssuer),
                detail: tls.to_string(),
            },
            other => TlsOutcome::TlsError {
                detail: other.to_string(),
                stage,
            },
        };
    }
    match e.kind() {
        ErrorKind::UnexpectedEof
        | ErrorKind::ConnectionReset
        | ErrorKind::ConnectionAborted
        | ErrorKind::BrokenPipe => TlsOutcome::ServerClosed {
            how: e.to_string(),
            stage,
        },
        _ => TlsOutcome::Io {
            detail: e.to_string(),
            stage,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_summarise_without_panicking_on_odd_bodies() {
        let a = Answer::Http {
            status: 401,
            body: "{\"error\":\"peer_not_enrolled\",\"note\":\"x\"}".into(),
        };
        assert_eq!(a.code(), "401");
        assert_eq!(a.error_tag().as_deref(), Some("peer_not_enrolled"));
        let b = Answer::Http {
            status: 500,
            body: "\u{0}\u{7}not json".repeat(100),
        };
        assert!(b.json().is_none() && b.error_tag().is_none());
        assert!(b.summary().chars().count() < 200);
        let t = Answer::Transport("received fatal alert: CertificateRequired".into());
        assert_eq!(t.code(), "000");
        assert!(t.summary().starts_with("000 (received fatal alert"));
    }

    #[test]
    fn endpoint_urls_and_addresses() {
        let ep = Endpoint {
            name: "p".into(),
            region: "r".into(),
            base: "https://127.0.72.1:9077".parse().unwrap(),
            connect: None,
        };
        assert_eq!(
            ep.url("/api/v1/health"),
            "https://127.0.72.1:9077/api/v1/health"
        );
        assert_eq!(ep.socket_addr(), Some("127.0.72.1:9077".parse().unwrap()));
        let v6 = Endpoint {
            base: "https://[::1]:1234".parse().unwrap(),
            ..ep
        };
        assert_eq!(v6.socket_addr(), Some("[::1]:1234".parse().unwrap()));
    }

    #[test]
    fn harness_pushes_are_signed_as_a_receiving_peer_verifies_them() {
        use base64::Engine;
        use ed25519_dalek::Verifier;
        let campaign: hiveseed_proto::Campaign = "t1".parse().unwrap();
        let issuer = crate::credential::Issuer::new(
            ed25519_dalek::SigningKey::from_bytes(&[7; 32]),
            &campaign,
        );
        let fed_id: hiveseed_proto::FedId = "t1/seeder/test-harness".parse().unwrap();
        let sender = FedSender::mint(&issuer, &fed_id, 1_800_000_000).unwrap();
        assert!(!format!("{sender:?}").contains("key:"), "no key in Debug");
        let body = br#"{"sender_agent_id":"t1/seeder/test-harness","memories":[]}"#;
        let header =
            |h: &[(&str, String)], k: &str| h.iter().find(|(n, _)| *n == k).map(|(_, v)| v.clone());
        for nonce in [Some("n-1"), None] {
            let h = sender.push_headers(body, nonce);
            assert_eq!(header(&h, "x-peer-id").as_deref(), Some(fed_id.as_str()));
            assert_eq!(header(&h, "x-memory-nonce").as_deref(), nonce);
            // The receiver's rules: the credential verifies under the issuer and names the
            // peer id; the signature covers body || 0x00 || nonce (body alone without a nonce).
            let p = issuer.public();
            let claims = crate::credential::verify(
                &header(&h, "x-memory-cred").unwrap(),
                &[(p.id.as_str(), p.public_key.verifying_key())],
                Some(p.trust_domain.as_str()),
                1_800_000_000,
            )
            .unwrap();
            assert_eq!(claims.subject_agent_id, fed_id.as_str());
            let subject = ed25519_dalek::VerifyingKey::from_bytes(&claims.subject_pubkey).unwrap();
            let sig = header(&h, "x-memory-sig").unwrap();
            let raw = base64::engine::general_purpose::STANDARD
                .decode(sig.strip_prefix("ed25519=").unwrap())
                .unwrap();
            let sig = ed25519_dalek::Signature::from_slice(&raw).unwrap();
            let mut signed = body.to_vec();
            if let Some(n) = nonce {
                signed.push(0);
                signed.extend_from_slice(n.as_bytes());
            }
            subject.verify(&signed, &sig).unwrap();
            assert_eq!(
                subject.verify(body.as_slice(), &sig).is_ok(),
                nonce.is_none()
            );
        }
    }

    /// Real rustls servers on 127.0.77.1 (this file's loopback range) for the negative TLS
    /// probe: only the server's refusal passes it.
    mod tls_refusal {
        use super::super::*;
        use crate::pki::{generate_ca, CampaignCa, LeafSpec, LeafUsage};
        use std::sync::Arc;
        use std::time::SystemTime;
        use tokio::io::AsyncWriteExt;

        const HOST: &str = "127.0.77.1";

        struct Pki {
            ca_pem: String,
            ca: CampaignCa,
        }

        fn pki() -> Pki {
            let (ca_pem, ca_key) = generate_ca("tlsprobe", SystemTime::now()).unwrap();
            Pki {
                ca: CampaignCa::load(&ca_pem, &ca_key).unwrap(),
                ca_pem,
            }
        }

        fn leaf(p: &Pki, name: &str, usage: LeafUsage) -> (String, String) {
            p.ca.issue_with_new_key(&LeafSpec {
                common_name: name.into(),
                sans: if usage == LeafUsage::Server {
                    vec![HOST.into()]
                } else {
                    vec![]
                },
                usage,
                not_before: SystemTime::now(),
                lifetime: Duration::from_secs(3600),
            })
            .unwrap()
        }

        /// A TLS server that requires a client certificate from the CA when `require_client`,
        /// and answers every request it gets past the handshake with `200`.
        async fn server(p: &Pki, require_client: bool) -> Endpoint {
            let (cert, key) = leaf(p, "server", LeafUsage::Server);
            let certs = CertificateDer::pem_slice_iter(cert.as_bytes())
                .collect::<Result<Vec<_>, _>>()
                .unwrap();
            let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap();
            let builder = rustls::ServerConfig::builder_with_provider(crate::tls::provider())
                .with_protocol_versions(&[&rustls::version::TLS13])
                .unwrap();
            let builder = if require_client {
                let mut roots = RootCertStore::empty();
                for c in CertificateDer::pem_slice_iter(p.ca_pem.as_bytes()) {
                    roots.add(c.unwrap()).unwrap();
                }
                let v = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    Arc::new(roots),
                    crate::tls::provider(),
                )
                .build()
                .unwrap();
                builder.with_client_cert_verifier(v)
            } else {
                builder.with_no_client_auth()
            };
            let cfg = Arc::new(builder.with_single_cert(certs, key).unwrap());
            let listener = tokio::net::TcpListener::bind((HOST, 0)).await.unwrap();
            let addr = listener.local_addr().unwrap();
            tokio::spawn(async move {
                let acceptor = tokio_rustls::TlsAcceptor::from(cfg);
                while let Ok((tcp, _)) = listener.accept().await {
                    let acceptor = acceptor.clone();
                    tokio::spawn(async move {
                        // A refused handshake ends here: tokio-rustls sends the alert.
                        let Ok(mut tls) = acceptor.accept(tcp).await else {
                            return;
                        };
                        let _ = tls
                            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                            .await;
                        let _ = tls.shutdown().await;
                    });
                }
            });
            endpoint(addr)
        }

        /// Accepts TCP and never says anything.
        async fn silent() -> (Endpoint, tokio::task::JoinHandle<()>) {
            let listener = tokio::net::TcpListener::bind((HOST, 0)).await.unwrap();
            let addr = listener.local_addr().unwrap();
            let held = tokio::spawn(async move {
                let mut conns = Vec::new();
                while let Ok((tcp, _)) = listener.accept().await {
                    conns.push(tcp);
                }
            });
            (endpoint(addr), held)
        }

        fn endpoint(addr: SocketAddr) -> Endpoint {
            Endpoint {
                name: "t".into(),
                region: "r".into(),
                base: format!("https://{addr}").parse().unwrap(),
                connect: None,
            }
        }

        async fn attempt(ep: &Endpoint, roots: &str, id: Option<&Identity>) -> TlsOutcome {
            let posture = Posture {
                roots_pem: roots,
                identity: id,
            };
            tls_attempt(ep, &posture, "/api/v1/health", Duration::from_secs(5)).await
        }

        fn client(p: &Pki) -> Identity {
            let (cert_pem, key_pem) = leaf(p, "operator", LeafUsage::Client);
            Identity {
                label: "operator".into(),
                cert_pem,
                key_pem,
            }
        }

        #[tokio::test]
        async fn a_refused_client_certificate_passes_and_nothing_else_does() {
            let p = pki();
            let ep = server(&p, true).await;
            let cc = Refusal::ClientCertificate;

            // No certificate, a rogue one: the server's alert, seen after the handshake (TLS 1.3).
            for id in [None, Some(Identity::rogue().unwrap())] {
                let o = attempt(&ep, &p.ca_pem, id.as_ref()).await;
                assert!(cc.seen_in(&o), "{o:?}");
                assert!(
                    matches!(&o, TlsOutcome::ServerAlert { stage, .. } if *stage != Stage::Handshake),
                    "{o:?}"
                );
                assert!(
                    o.summary().starts_with("000 (server sent TLS alert"),
                    "{}",
                    o.summary()
                );
            }

            // The CA's client certificate: an HTTP answer, not a refusal.
            let o = attempt(&ep, &p.ca_pem, Some(&client(&p))).await;
            assert_eq!(
                o,
                TlsOutcome::Http {
                    status: Some(200),
                    line: "HTTP/1.1 200 OK".into()
                }
            );
            assert!(!cc.seen_in(&o));
            assert!(
                o.summary().starts_with("200 (the server answered HTTP"),
                "{}",
                o.summary()
            );

            // A bad local PEM never reaches the server that would have refused it.
            let mut broken = client(&p);
            broken.key_pem =
                "-----BEGIN PRIVATE KEY-----\nbm90IGEga2V5\n-----END PRIVATE KEY-----\n".into();
            let o = attempt(&ep, &p.ca_pem, Some(&broken)).await;
            assert!(matches!(o, TlsOutcome::LocalError(_)), "{o:?}");
            assert!(!cc.seen_in(&o));
            assert!(o.summary().contains("a local error"), "{}", o.summary());
            let o = attempt(&ep, "not a PEM at all", None).await;
            assert!(matches!(o, TlsOutcome::LocalError(_)), "{o:?}");
            assert!(!cc.seen_in(&o));

            // Our own refusal of the server certificate is not the server's refusal.
            let foreign = foreign_ca_pem().unwrap();
            let o = attempt(&ep, &foreign, None).await;
            assert!(!cc.seen_in(&o), "{o:?}");
        }

        #[tokio::test]
        async fn a_server_that_answers_http_or_never_answers_fails() {
            let p = pki();
            let cc = Refusal::ClientCertificate;
            let open = server(&p, false).await;
            let o = attempt(&open, &p.ca_pem, None).await;
            assert!(
                matches!(
                    o,
                    TlsOutcome::Http {
                        status: Some(200),
                        ..
                    }
                ),
                "{o:?}"
            );
            assert!(!cc.seen_in(&o));

            let (quiet, held) = silent().await;
            let posture = Posture {
                roots_pem: &p.ca_pem,
                identity: None,
            };
            let o = tls_attempt(&quiet, &posture, "/", Duration::from_millis(300)).await;
            assert!(
                matches!(
                    o,
                    TlsOutcome::TimedOut {
                        stage: Stage::Handshake,
                        ..
                    }
                ),
                "{o:?}"
            );
            assert!(!cc.seen_in(&o));
            assert!(o.summary().contains("timed out after"), "{}", o.summary());
            held.abort();

            // Nothing listening: unreachable, not refused.
            let dead = endpoint(SocketAddr::new(HOST.parse().unwrap(), 1));
            let o = attempt(&dead, &p.ca_pem, None).await;
            assert!(matches!(o, TlsOutcome::Unreachable(_)), "{o:?}");
            assert!(!cc.seen_in(&o));
        }

        #[tokio::test]
        async fn a_server_certificate_from_another_ca_is_refused_by_the_client() {
            let p = pki();
            let sc = Refusal::ServerCertificate;
            let ep = server(&p, false).await;
            let o = attempt(&ep, &foreign_ca_pem().unwrap(), None).await;
            assert!(sc.seen_in(&o), "{o:?}");
            assert!(!Refusal::ClientCertificate.seen_in(&o));
            assert!(
                o.summary().contains("refused the server certificate"),
                "{}",
                o.summary()
            );
            // Trusting the CA that issued it: the server answers, so no refusal.
            let o = attempt(&ep, &p.ca_pem, None).await;
            assert!(!sc.seen_in(&o), "{o:?}");
        }
    }
}
