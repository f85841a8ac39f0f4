//! TLS for the seeder's listener: rustls with TLS 1.3/1.2 only, client certificates optional at
//! the handshake (enrollment and the bootstrap download are server-auth only) and required per
//! route. Each connection's verified client certificate travels to handlers as [`ConnInfo`].

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio_rustls::TlsAcceptor;
use tower::Service;

use crate::conn::{Activity, ConnLimits, Gate, RateLimited, Tally, Tracked, LOG_INTERVAL};
use crate::proxy_protocol::read_header;

/// What a handler knows about the connection a request came on.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    pub remote: SocketAddr,
    /// DER of the client's leaf certificate, already verified against the campaign CA.
    pub client_cert: Option<Arc<Vec<u8>>>,
}

pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Closes the connection a request came on (a stalled download). In every request's extensions.
#[derive(Debug, Clone, Default)]
pub struct ConnCloser(Arc<tokio::sync::Notify>);

impl ConnCloser {
    pub fn close(&self) {
        // notify_one keeps the signal if the connection is not waiting on it at this instant.
        self.0.notify_one();
    }
}

/// Server config: the seeder's certificate, client certificates optional but verified against the
/// campaign CA when presented.
pub fn server_config(ca_pem: &str, cert_pem: &str, key_pem: &str) -> Result<Arc<ServerConfig>> {
    let mut roots = RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c.context("campaign CA PEM")?)?;
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
        .allow_unauthenticated()
        .build()
        .context("client verifier")?;
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<Result<_, _>>()
        .context("seeder certificate PEM")?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).context("seeder key PEM")?;
    let mut cfg = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)
        .context("seeder certificate and key")?;
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// Accepts connections until `shutdown` resolves, under `limits`: a connection over a cap is
/// closed at accept, before the handshake; the handshake, the request head, the body and idleness
/// each have a deadline, so a client that stalls holds nothing for long.
pub async fn serve(
    listener: TcpListener,
    config: Arc<ServerConfig>,
    app: Router,
    limits: ConnLimits,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<()> {
    let acceptor = TlsAcceptor::from(config);
    let gate = Gate::new(&limits);
    let limits = Arc::new(limits);
    let tally = Arc::new(Tally::default());
    let mut summary = tokio::time::interval(LOG_INTERVAL);
    summary.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut backoff = ACCEPT_BACKOFF_MIN;
    tokio::pin!(shutdown);
    // Connections end with the listener: a stopped seeder holds no long-poll open.
    let mut conns: tokio::task::JoinSet<()> = tokio::task::JoinSet::new();
    loop {
        while conns.try_join_next().is_some() {}
        let (tcp, remote) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: back off (doubling, reset by the next accept) instead of
                    // spinning; counted and summarised once per interval.
                    tally.accept_error(&e);
                    tokio::select! {
                        () = tokio::time::sleep(backoff) => {}
                        () = &mut shutdown => {
                            conns.abort_all();
                            return Ok(());
                        }
                    }
                    backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
                    continue;
                }
            },
            _ = summary.tick() => {
                tally.flush();
                continue;
            }
            () = &mut shutdown => {
                conns.abort_all();
                return Ok(());
            }
        };
        backoff = ACCEPT_BACKOFF_MIN;
        // A load balancer's connections are counted per source once their PROXY header names it.
        let balanced = limits.proxy_from.iter().any(|c| c.contains(remote.ip()));
        let slot = match gate.admit((!balanced).then_some(remote.ip())) {
            Ok(slot) => slot,
            Err(why) => {
                tally.refused(why);
                drop(tcp);
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let app = app.clone();
        let (limits, tally) = (limits.clone(), tally.clone());
        conns.spawn(async move {
            let mut slot = slot;
            let mut tcp = tcp;
            // The PROXY header and the handshake share one deadline.
            let deadline = tokio::time::Instant::now() + limits.handshake_timeout;
            let remote = if balanced {
                match tokio::time::timeout_at(deadline, read_header(&mut tcp, remote)).await {
                    Ok(Ok(source)) => {
                        if let Err(why) = slot.attribute(source.ip()) {
                            tally.refused(why);
                            return;
                        }
                        source
                    }
                    Ok(Err(e)) => {
                        tracing::debug!(balancer = %remote, error = %e, "PROXY header refused");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!(balancer = %remote, "PROXY header timed out");
                        return;
                    }
                }
            } else {
                remote
            };
            let _slot = slot;
            let tls = match tokio::time::timeout_at(deadline, acceptor.accept(tcp)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::debug!(%remote, error = %e, "TLS handshake refused");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%remote, "TLS handshake timed out");
                    return;
                }
            };
            let client_cert = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .map(|c| Arc::new(c.to_vec()));
            let info = ConnInfo {
                remote,
                client_cert,
            };
            serve_connection(tls, info, app, limits).await;
        });
    }
}

const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(10);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// HTTP on one TLS connection until the client closes it, it stays idle past the idle timeout,
/// or a request body falls below the minimum rate.
async fn serve_connection(
    tls: tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
    info: ConnInfo,
    app: Router,
    limits: Arc<ConnLimits>,
) {
    let remote = info.remote;
    let activity = Activity::new();
    let cut = Arc::new(Notify::new());
    // A handler (a stalled download's watchdog) may close the whole connection.
    let closer = ConnCloser::default();
    let svc = {
        let (activity, cut, limits, closer) = (
            activity.clone(),
            cut.clone(),
            limits.clone(),
            closer.clone(),
        );
        hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
            let in_flight = activity.begin();
            let mut req =
                req.map(|b| axum::body::Body::new(RateLimited::new(b, &limits, cut.clone())));
            req.extensions_mut().insert(info.clone());
            req.extensions_mut().insert(closer.clone());
            let mut app = app.clone();
            async move {
                let resp = app.call(req).await?;
                Ok::<_, std::convert::Infallible>(
                    resp.map(|b| axum::body::Body::new(Tracked::new(b, in_flight))),
                )
            }
        })
    };
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        // hyper buffers up to ~400 KiB of a response per connection by default; a client that
        // stops reading would pin that much (100 stalled downloads: 40 MiB).
        .max_buf_size(64 * 1024);
    let conn = builder.serve_connection(TokioIo::new(tls), svc);
    tokio::pin!(conn);
    let idle = tokio::time::sleep(limits.idle_timeout);
    tokio::pin!(idle);
    loop {
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(%remote, error = %e, "connection ended with an error");
                }
                return;
            }
            () = cut.notified() => {
                tracing::debug!(%remote, "request body below the minimum rate: connection closed");
                return;
            }
            () = closer.0.notified() => {
                tracing::info!(%remote, "connection closed by the seeder");
                return;
            }
            () = idle.as_mut() => {
                let now = tokio::time::Instant::now();
                match activity.idle_deadline(limits.idle_timeout) {
                    // Busy (a long-poll, an event stream): look again one idle period later.
                    None => idle.as_mut().reset(now + limits.idle_timeout),
                    Some(at) if at <= now.into_std() => {
                        tracing::debug!(%remote, "idle timeout: connection closed");
                        return;
                    }
                    Some(at) => idle.as_mut().reset(at.into()),
                }
            }
        }
    }
}
