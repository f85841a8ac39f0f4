//! Waits and network probes: the bounded backoff on tokio's paused clock, HTTPS with mTLS against
//! an in-process rustls server, and PostgreSQL verify-full against a real server when one is
//! installed on the machine.

#![allow(clippy::unwrap_used)] // test helpers outside #[test] fns

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use hiveseed_bootstrap::resources::check::run_check;
use hiveseed_bootstrap::resources::wait::{probe, wait_for, WaitError};
use hiveseed_bootstrap::{CheckEnv, RealHost, ServiceManager, Unavailable, WaitPolicy};
use hiveseed_proto::manifest::{Check, Match, Probe, WaitTarget};
use hiveseed_proto::CheckStatus;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn abs(s: &str) -> hiveseed_proto::AbsPath {
    s.parse().unwrap()
}

#[tokio::test(start_paused = true)]
async fn a_wait_is_bounded_by_its_deadline_with_capped_backoff() {
    let root = temp_root();
    let host = RealHost::new(root.path()).unwrap();
    let never = CountingReadiness::new(u32::MAX);
    let target = WaitTarget::Node {
        node: "do-1461-pg-nyc3-01".parse().unwrap(),
        gate: "ready".into(),
    };
    let policy = WaitPolicy {
        first_delay: Duration::from_millis(250),
        max_delay: Duration::from_secs(2),
        max_local_delay: Duration::from_secs(1),
        attempt_timeout: Duration::from_secs(1),
    };
    let start = tokio::time::Instant::now();
    let err = wait_for(&host, &never, &target, Duration::from_secs(10), &policy)
        .await
        .unwrap_err();
    // Probes at 0, .25, .75, 1.75, 3.75, 5.75, 7.75, 9.75 and the deadline itself.
    let WaitError::Deadline {
        blocked_on,
        waited,
        attempts,
        last,
    } = err;
    assert_eq!(attempts, 9);
    assert_eq!(waited, Duration::from_secs(10));
    assert_eq!(start.elapsed(), Duration::from_secs(10));
    assert_eq!(blocked_on, "do-1461-pg-nyc3-01:ready");
    assert!(last.contains("has not passed ready"), "{last}");
    assert_eq!(never.calls.load(std::sync::atomic::Ordering::SeqCst), 9);
}

/// A local probe (a daemon coming up after a restart) backs off to at most 1 s, so readiness is
/// seen within a second of it, not after a long doubling sleep.
#[tokio::test(start_paused = true)]
async fn local_probes_back_off_to_one_second() {
    let root = temp_root();
    let host = RealHost::new(root.path()).unwrap();
    let never = CountingReadiness::new(u32::MAX);
    // Nothing listens on this loopback port: every probe fails at once.
    let target = WaitTarget::Tcp {
        host: "127.0.71.250".into(),
        port: 9,
    };
    let policy = WaitPolicy {
        first_delay: Duration::from_millis(250),
        max_delay: Duration::from_secs(5),
        max_local_delay: Duration::from_secs(1),
        attempt_timeout: Duration::from_secs(1),
    };
    let err = wait_for(&host, &never, &target, Duration::from_secs(10), &policy)
        .await
        .unwrap_err();
    // Probes at 0, .25, .75, then every second 1.75 .. 9.75, and the deadline itself: 13
    // (a wait on another node, capped at 5 s, makes 9 in the same 10 s).
    let WaitError::Deadline { attempts, .. } = err;
    assert_eq!(attempts, 13);
}

fn server_config(ca: &TestCa, server_cert: &str, server_key: &str) -> rustls::ServerConfig {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(ca.cert_pem.as_bytes()).unwrap())
        .unwrap();
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()
    .unwrap();
    rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            CertificateDer::pem_slice_iter(server_cert.as_bytes())
                .collect::<Result<Vec<_>, _>>()
                .unwrap(),
            PrivateKeyDer::from_pem_slice(server_key.as_bytes()).unwrap(),
        )
        .unwrap()
}

/// An HTTPS server that demands a client certificate from the CA and an API key.
async fn serve_https(config: rustls::ServerConfig) -> u16 {
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut req = Vec::new();
                let mut buf = [0u8; 1024];
                while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                    match tls.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => req.extend_from_slice(&buf[..n]),
                    }
                }
                let req = String::from_utf8_lossy(&req).to_lowercase();
                let body = r#"{"status":"ok","version":"0.7.0"}"#;
                let resp = if req.starts_with("get /api/v1/capabilities")
                    && !req.contains("x-api-key: k3y")
                {
                    "HTTP/1.1 401 Unauthorized\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                        .to_owned()
                } else {
                    format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    )
                };
                let _ = tls.write_all(resp.as_bytes()).await;
                let _ = tls.shutdown().await;
            });
        }
    });
    port
}

#[tokio::test]
async fn https_wait_and_check_use_the_client_certificate_and_only_the_given_ca() {
    let root = temp_root();
    let ca = TestCa::new();
    let (server_cert, server_key) = ca.issue(&["127.0.0.1"], false);
    let (client_cert, client_key) = ca.issue(&["do-1461-peer-nyc3-01"], true);
    let port = serve_https(server_config(&ca, &server_cert, &server_key)).await;
    let tls = root.path().join("etc/tls");
    std::fs::create_dir_all(&tls).unwrap();
    std::fs::write(tls.join("ca.pem"), &ca.cert_pem).unwrap();
    std::fs::write(tls.join("client.pem"), &client_cert).unwrap();
    std::fs::write(tls.join("client.key"), &client_key).unwrap();
    std::fs::write(tls.join("other-ca.pem"), &TestCa::new().cert_pem).unwrap();
    std::fs::write(root.path().join("etc/api-key"), "k3y\n").unwrap();
    let host = RealHost::new(root.path()).unwrap();

    let target = |ca: &str, cert: &str| WaitTarget::Https {
        url: format!("https://127.0.0.1:{port}/api/v1/health"),
        ca_path: abs(ca),
        cert_path: abs(cert),
        key_path: abs("/etc/tls/client.key"),
    };
    probe(
        &host,
        &Unavailable,
        &target("/etc/tls/ca.pem", "/etc/tls/client.pem"),
    )
    .await
    .unwrap();
    let err = probe(
        &host,
        &Unavailable,
        &target("/etc/tls/other-ca.pem", "/etc/tls/client.pem"),
    )
    .await
    .unwrap_err();
    assert!(err.to_lowercase().contains("certificate"), "{err}");
    // Without a client certificate the server refuses the handshake.
    std::fs::write(tls.join("self.pem"), TestCa::new().issue(&["x"], true).0).unwrap();
    assert!(
        probe(
            &host,
            &Unavailable,
            &target("/etc/tls/ca.pem", "/etc/tls/self.pem")
        )
        .await
        .is_err(),
        "a certificate for another key must not be accepted"
    );

    let node = node();
    let env = CheckEnv {
        host: &host,
        node: &node,
        manager: ServiceManager::Supervisor,
        supervisor: None,
        timeout: Duration::from_secs(5),
    };
    let check = |api_key_file: Option<&str>, field: &str, expected: &str| Check {
        id: "check:caps".parse().unwrap(),
        check: "daemon.version".into(),
        expected: expected.into(),
        matching: Match::Exact,
        probe: Probe::HttpsJson {
            url: format!("https://127.0.0.1:{port}/api/v1/capabilities"),
            field: field.into(),
            ca_path: abs("/etc/tls/ca.pem"),
            cert_path: abs("/etc/tls/client.pem"),
            key_path: abs("/etc/tls/client.key"),
            api_key_file: api_key_file.map(abs),
        },
    };
    let pass = run_check(&env, &check(Some("/etc/api-key"), "version", "0.7.0")).await;
    assert_eq!(
        (pass.status, pass.got.as_str()),
        (CheckStatus::Pass, "0.7.0")
    );
    let unauth = run_check(&env, &check(None, "version", "0.7.0")).await;
    assert_eq!(unauth.status, CheckStatus::Fail);
    assert!(unauth.got.contains("401"), "{}", unauth.got);
    let wrong = run_check(&env, &check(Some("/etc/api-key"), "status", "degraded")).await;
    assert_eq!(
        (wrong.status, wrong.got.as_str()),
        (CheckStatus::Fail, "ok")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_wait_verifies_the_server_name_the_password_and_the_schema() {
    let ca = TestCa::new();
    let Some(bins) = hiveseed_test_deps::postgres() else {
        return;
    };
    let pg = start_pg(&bins, &ca).await;
    let root = temp_root();
    let tls = root.path().join("etc/tls");
    std::fs::create_dir_all(&tls).unwrap();
    std::fs::write(tls.join("ca.pem"), &ca.cert_pem).unwrap();
    std::fs::write(tls.join("other-ca.pem"), &TestCa::new().cert_pem).unwrap();
    std::fs::write(root.path().join("etc/pg-password"), "s3cret-pg\n").unwrap();
    std::fs::write(root.path().join("etc/wrong-password"), "nope\n").unwrap();
    let host = RealHost::new(root.path()).unwrap();
    let target = |host: &str, ca: &str, pwfile: &str, schema: &str| WaitTarget::Postgres {
        host: host.into(),
        port: pg.port,
        dbname: "postgres".into(),
        user: "postgres".into(),
        password_file: abs(pwfile),
        ca_path: abs(ca),
        schema: schema.into(),
        source: None,
    };
    let good = |schema: &str| target("127.0.0.1", "/etc/tls/ca.pem", "/etc/pg-password", schema);

    // The product's own wait covers "the database system is starting up".
    wait_for(
        &host,
        &Unavailable,
        &good("public"),
        Duration::from_secs(30),
        &WaitPolicy {
            first_delay: Duration::from_millis(20),
            max_delay: Duration::from_millis(200),
            max_local_delay: Duration::from_millis(200),
            attempt_timeout: Duration::from_secs(5),
        },
    )
    .await
    .unwrap();
    let err = probe(&host, &Unavailable, &good("ic_peer_1"))
        .await
        .unwrap_err();
    assert!(err.contains("schema ic_peer_1 does not exist"), "{err}");
    assert!(!err.contains("s3cret"), "{err}");

    let status = std::process::Command::new(&bins.psql)
        .args([
            "-h",
            pg.socket.to_str().unwrap(),
            "-p",
            &pg.port.to_string(),
        ])
        .args(["-U", "postgres", "-d", "postgres", "-v", "ON_ERROR_STOP=1"])
        .args(["-c", "CREATE SCHEMA ic_peer_1"])
        .env("PGPASSWORD", "s3cret-pg")
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    probe(&host, &Unavailable, &good("ic_peer_1"))
        .await
        .unwrap();

    // verify-full: the name must match the certificate (IP SAN 127.0.0.1 only) ...
    let err = probe(
        &host,
        &Unavailable,
        &target(
            "localhost",
            "/etc/tls/ca.pem",
            "/etc/pg-password",
            "ic_peer_1",
        ),
    )
    .await
    .unwrap_err();
    assert!(err.to_lowercase().contains("certificate"), "{err}");
    // ... and the chain must end at the given CA.
    let err = probe(
        &host,
        &Unavailable,
        &target(
            "127.0.0.1",
            "/etc/tls/other-ca.pem",
            "/etc/pg-password",
            "ic_peer_1",
        ),
    )
    .await
    .unwrap_err();
    assert!(err.to_lowercase().contains("certificate"), "{err}");
    let err = probe(
        &host,
        &Unavailable,
        &target(
            "127.0.0.1",
            "/etc/tls/ca.pem",
            "/etc/wrong-password",
            "ic_peer_1",
        ),
    )
    .await
    .unwrap_err();
    assert!(err.contains("password"), "{err}");
    assert!(!err.contains("nope"), "{err}");
}
