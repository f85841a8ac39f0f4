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

/// Whether anything listens at the endpoint's TCP address (tells a TLS refusal from a dead peer).
pub async fn tcp_reachable(ep: &Endpoint) -> Result<(), String> {
    let addr = ep
        .socket_addr()
        .ok_or_else(|| format!("{} has no IP address to dial", ep.base))?;
    match tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(addr)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(format!("tcp connect {addr}: {e}")),
        Err(_) => Err(format!("tcp connect {addr}: timed out")),
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
}
