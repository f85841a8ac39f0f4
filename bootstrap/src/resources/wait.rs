//! `wait`: block until a dependency is ready — another node's gate (asked through the injected
//! [`NodeReadiness`]), a TCP port, an HTTPS endpoint (mTLS, the given CA only), or PostgreSQL
//! (TLS verified against the CA and the host name/IP, password from a file, schema present).
//! Always bounded by the manifest's deadline, with capped exponential backoff on tokio's clock.

use std::sync::Arc;
use std::time::Duration;

use hiveseed_proto::manifest::{Wait, WaitTarget};
use hiveseed_proto::AbsPath;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::time::Instant;

use super::NodeReadiness;
use crate::host::Host;
use crate::plan::Action;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observed {
    pub ready: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WaitPolicy {
    pub first_delay: Duration,
    /// Backoff cap for waits on another node (the seeder answers those for the whole fleet).
    pub max_delay: Duration,
    /// Backoff cap for local probes (a daemon's health, a port, the region's pg): cheap, and
    /// usually ready within seconds, so a long sleep would only add latency to a restart.
    pub max_local_delay: Duration,
    /// Bound on one probe.
    pub attempt_timeout: Duration,
}

impl Default for WaitPolicy {
    fn default() -> Self {
        Self {
            first_delay: Duration::from_millis(250),
            max_delay: Duration::from_secs(5),
            max_local_delay: Duration::from_secs(1),
            attempt_timeout: Duration::from_secs(5),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WaitError {
    #[error("still blocked on {blocked_on} after {waited:?} ({attempts} attempts): {last}")]
    Deadline {
        blocked_on: String,
        waited: Duration,
        attempts: u32,
        last: String,
    },
}

/// What a report says the node is waiting for (`waiting blocked_on=<this>`). Never a password.
pub fn blocked_on(target: &WaitTarget) -> String {
    match target {
        WaitTarget::Node { node, gate } => format!("{node}:{gate}"),
        WaitTarget::Tcp { host, port } => format!("tcp://{host}:{port}"),
        WaitTarget::Https { url, .. } => url.clone(),
        WaitTarget::Postgres {
            host,
            port,
            dbname,
            user,
            schema,
            ..
        } => format!("postgres://{user}@{host}:{port}/{dbname}#{schema}"),
    }
}

pub async fn observe(
    host: &dyn Host,
    readiness: &dyn NodeReadiness,
    target: &WaitTarget,
    timeout: Duration,
) -> Observed {
    let ready = matches!(
        tokio::time::timeout(timeout, probe(host, readiness, target)).await,
        Ok(Ok(()))
    );
    Observed { ready }
}

pub fn plan(w: &Wait, o: &Observed) -> Vec<Action> {
    if o.ready {
        return Vec::new();
    }
    vec![Action::Wait {
        target: w.target.clone(),
        timeout: Duration::from_secs(u64::from(w.timeout_secs)),
    }]
}

/// Probes until ready or the deadline passes; returns the number of probes.
pub async fn wait_for(
    host: &dyn Host,
    readiness: &dyn NodeReadiness,
    target: &WaitTarget,
    timeout: Duration,
    policy: &WaitPolicy,
) -> Result<u32, WaitError> {
    let start = Instant::now();
    let deadline = start + timeout;
    let mut delay = policy.first_delay;
    let mut attempts = 0u32;
    loop {
        attempts += 1;
        let remaining = deadline.saturating_duration_since(Instant::now());
        let bound = policy
            .attempt_timeout
            .min(remaining)
            .max(Duration::from_millis(1));
        let last = match tokio::time::timeout(bound, probe(host, readiness, target)).await {
            Ok(Ok(())) => return Ok(attempts),
            Ok(Err(e)) => e,
            Err(_) => format!("probe timed out after {bound:?}"),
        };
        let now = Instant::now();
        if now >= deadline {
            return Err(WaitError::Deadline {
                blocked_on: blocked_on(target),
                waited: now - start,
                attempts,
                last,
            });
        }
        tokio::time::sleep(delay.min(deadline - now)).await;
        let cap = match target {
            WaitTarget::Node { .. } => policy.max_delay,
            _ => policy.max_local_delay,
        };
        delay = (delay * 2).min(cap);
    }
}

/// One readiness probe; the error says why not ready.
pub async fn probe(
    host: &dyn Host,
    readiness: &dyn NodeReadiness,
    target: &WaitTarget,
) -> Result<(), String> {
    match target {
        WaitTarget::Node { node, gate } => match readiness.is_ready(node, gate).await {
            Ok(true) => Ok(()),
            Ok(false) => Err(format!("{node} has not passed {gate}")),
            Err(e) => Err(format!("readiness of {node}: {e}")),
        },
        WaitTarget::Tcp { host: h, port } => tokio::net::TcpStream::connect((h.as_str(), *port))
            .await
            .map(drop)
            .map_err(|e| format!("connect {h}:{port}: {e}")),
        WaitTarget::Https {
            url,
            ca_path,
            cert_path,
            key_path,
        } => {
            let client = https_client(host, ca_path, cert_path, key_path)?;
            let resp = client
                .get(url)
                .send()
                .await
                .map_err(|e| format!("GET {url}: {}", error_chain(&e)))?;
            if resp.status().is_success() {
                Ok(())
            } else {
                Err(format!("GET {url}: {}", resp.status()))
            }
        }
        WaitTarget::Postgres {
            host: h,
            port,
            dbname,
            user,
            password_file,
            ca_path,
            schema,
            source,
        } => {
            let password = read_text(host, password_file)?;
            let tls = tls_config(host, ca_path, None)?;
            let mut cfg = tokio_postgres::Config::new();
            cfg.host(h)
                .port(*port)
                .dbname(dbname)
                .user(user)
                .password(password.trim_end_matches(['\n', '\r']))
                .ssl_mode(tokio_postgres::config::SslMode::Require)
                .connect_timeout(Duration::from_secs(5));
            let what = || format!("connect {h}:{port}/{dbname} as {user}");
            let mut make = tokio_postgres_rustls::MakeRustlsConnect::new(tls);
            let (client, conn) = match source {
                None => {
                    let (client, conn) = cfg
                        .connect(make)
                        .await
                        .map_err(|e| format!("{}: {}", what(), error_chain(&e)))?;
                    (client, tokio::spawn(conn))
                }
                Some(src) => {
                    let ip: std::net::IpAddr = h
                        .parse()
                        .map_err(|_| format!("{}: a source address needs an IP host", what()))?;
                    let stream = bound_stream(Some(*src), (ip, *port).into())
                        .await
                        .map_err(|e| format!("{} from {src}: {e}", what()))?;
                    let tls = tokio_postgres::tls::MakeTlsConnect::<tokio::net::TcpStream>::make_tls_connect(&mut make, h)
                        .map_err(|e| format!("{}: {}", what(), error_chain(&e)))?;
                    let (client, conn) = cfg
                        .connect_raw(stream, tls)
                        .await
                        .map_err(|e| format!("{} from {src}: {}", what(), error_chain(&e)))?;
                    (client, tokio::spawn(conn))
                }
            };
            let row = client
                .query_opt(
                    "SELECT 1 FROM pg_catalog.pg_namespace WHERE nspname = $1",
                    &[schema],
                )
                .await
                .map_err(|e| format!("schema query: {}", error_chain(&e)));
            drop(client);
            conn.abort();
            match row? {
                Some(_) => Ok(()),
                None => Err(format!("schema {schema} does not exist in {dbname}")),
            }
        }
    }
}

/// A TCP connection, from a given local address when there is one (bound before connect),
/// bounded by 5 s.
pub(crate) async fn bound_stream(
    src: Option<std::net::IpAddr>,
    dst: std::net::SocketAddr,
) -> std::io::Result<tokio::net::TcpStream> {
    let socket = match dst {
        std::net::SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        std::net::SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    if let Some(src) = src {
        socket.bind((src, 0).into())?;
    }
    tokio::time::timeout(Duration::from_secs(5), socket.connect(dst))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))?
}

pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

pub(crate) fn read_text(host: &dyn Host, path: &AbsPath) -> Result<String, String> {
    match host.read(path) {
        Ok(Some(b)) => String::from_utf8(b).map_err(|_| format!("{path} is not UTF-8")),
        Ok(None) => Err(format!("{path} is missing")),
        Err(e) => Err(e.to_string()),
    }
}

/// A rustls client config that trusts only the CA in `ca_path` and, when given, presents the
/// node's certificate and key.
pub(crate) fn tls_config(
    host: &dyn Host,
    ca_path: &AbsPath,
    identity: Option<(&AbsPath, &AbsPath)>,
) -> Result<rustls::ClientConfig, String> {
    let ca = read_text(host, ca_path)?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca.as_bytes()) {
        let cert = cert.map_err(|e| format!("{ca_path}: {e}"))?;
        roots.add(cert).map_err(|e| format!("{ca_path}: {e}"))?;
    }
    if roots.is_empty() {
        return Err(format!("{ca_path} holds no certificate"));
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_root_certificates(roots);
    match identity {
        None => Ok(builder.with_no_client_auth()),
        Some((cert_path, key_path)) => {
            let chain = read_text(host, cert_path)?;
            let certs = CertificateDer::pem_slice_iter(chain.as_bytes())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| format!("{cert_path}: {e}"))?;
            let key = host
                .read(key_path)
                .map_err(|e| e.to_string())?
                .ok_or_else(|| format!("{key_path} is missing"))?;
            // Never echo key material: the error names the file only.
            let key = PrivateKeyDer::from_pem_slice(&key)
                .map_err(|_| format!("{key_path} is not a PEM private key"))?;
            builder
                .with_client_auth_cert(certs, key)
                .map_err(|e| format!("{cert_path}: {e}"))
        }
    }
}

pub(crate) fn https_client(
    host: &dyn Host,
    ca_path: &AbsPath,
    cert_path: &AbsPath,
    key_path: &AbsPath,
) -> Result<reqwest::Client, String> {
    let tls = tls_config(host, ca_path, Some((cert_path, key_path)))?;
    reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .timeout(Duration::from_secs(10))
        .build()
        .map_err(|e| error_chain(&e))
}
