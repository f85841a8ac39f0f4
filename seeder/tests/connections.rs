//! The listener's connection limits against the real `seeder serve` over real TLS: idle, header
//! and body timeouts, the long-poll exemption from the idle timeout, and the per-source and
//! overall caps. Timeouts are set short through the same `seeder serve` flags an operator uses.
//! Each test owns its seeder; this file's loopback addresses are 127.0.78.x.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use hiveseed_proto::api::EnrollRequest;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::client::TlsStream;

const SEEDER: &str = "127.0.78.1";
const PEER: &str = "t1-peer-r1-01";

/// How long a test waits for what a limit of one or two seconds must cause.
const DEADLINE: Duration = Duration::from_secs(10);

fn campaign() -> Campaign {
    Campaign::with(
        "t1",
        &fleet_toml("t1").replace(SEEDER_IP, SEEDER),
        PEER_ROLE,
    )
}

/// A raw TLS connection from `source` (no client certificate) with the given ALPN protocols.
async fn connect(
    server: SocketAddr,
    source: &str,
    ca_pem: &str,
    alpn: &[&[u8]],
) -> std::io::Result<TlsStream<TcpStream>> {
    connect_after(server, source, ca_pem, alpn, &[]).await
}

/// Like [`connect`], with `prefix` (a PROXY header) sent before the TLS handshake.
async fn connect_after(
    server: SocketAddr,
    source: &str,
    ca_pem: &str,
    alpn: &[&[u8]],
    prefix: &[u8],
) -> std::io::Result<TlsStream<TcpStream>> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(source.parse().unwrap(), 0))?;
    let mut tcp = socket.connect(server).await?;
    tcp.write_all(prefix).await?;
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let mut config = rustls::ClientConfig::builder_with_provider(hiveseed_seeder::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let name = ServerName::try_from(SEEDER).unwrap().to_owned();
    match tokio::time::timeout(DEADLINE, connector.connect(name, tcp)).await {
        Ok(r) => r,
        Err(_) => Err(std::io::Error::other(
            "TLS handshake did not finish in time",
        )),
    }
}

/// Reads until the server closes the connection (EOF or reset); None if it is still open at the
/// deadline. Returns how long that took and what was read.
async fn until_closed(
    s: &mut (impl AsyncRead + Unpin),
    started: Instant,
) -> Option<(Duration, Vec<u8>)> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let left = DEADLINE.checked_sub(started.elapsed())?;
        match tokio::time::timeout(left, s.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some((started.elapsed(), got)),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
}

/// Writes `head` at once, then `trickle` one byte per `pace` (the pace is the attack under test,
/// not a wait), reading meanwhile. Returns when the server closed the connection, or None if it
/// was still open at the deadline.
async fn trickle(
    s: &mut TlsStream<TcpStream>,
    head: &[u8],
    trickle: &[u8],
    pace: Duration,
) -> Option<Duration> {
    let started = Instant::now();
    s.write_all(head).await.ok()?;
    s.flush().await.ok()?;
    let mut tick = tokio::time::interval(pace);
    let mut next = trickle.iter();
    let mut buf = [0u8; 4096];
    let until_cut = async {
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    let Some(b) = next.next() else { continue };
                    if s.write_all(&[*b]).await.is_err() || s.flush().await.is_err() {
                        return started.elapsed();
                    }
                }
                r = s.read(&mut buf) => match r {
                    Ok(0) | Err(_) => return started.elapsed(),
                    Ok(_) => {}
                },
            }
        }
    };
    // Not cut within the deadline: None.
    tokio::time::timeout(DEADLINE.checked_sub(started.elapsed())?, until_cut)
        .await
        .ok()
}

#[tokio::test]
async fn idle_connections_are_closed_after_the_idle_timeout() {
    let c = campaign();
    // The header timeout is long, so only the idle timeout can close these.
    let server = c.serve_on(
        &format!("{SEEDER}:0"),
        &["--idle-timeout", "1", "--header-timeout", "60"],
    );
    let ca = c.ca_pem();

    // A connection that sends nothing after the handshake.
    let mut silent = connect(server.addr, "127.0.78.10", &ca, &[]).await.unwrap();
    let (took, _) = until_closed(&mut silent, Instant::now())
        .await
        .expect("a silent connection was still open 10 s after a 1 s idle timeout");
    assert!(
        took >= Duration::from_millis(900),
        "closed after {took:?}, before the 1 s idle timeout"
    );

    // A keep-alive connection after one answered request.
    let mut kept = connect(server.addr, "127.0.78.10", &ca, &[b"http/1.1"])
        .await
        .unwrap();
    kept.write_all(b"GET /v1/no-such-route HTTP/1.1\r\nHost: seeder\r\n\r\n")
        .await
        .unwrap();
    let (took, got) = until_closed(&mut kept, Instant::now())
        .await
        .expect("a keep-alive connection was still open 10 s after a 1 s idle timeout");
    let got = String::from_utf8_lossy(&got);
    assert!(
        got.starts_with("HTTP/1.1 404"),
        "the request was answered before the idle close: {got:?}"
    );
    assert!(took >= Duration::from_millis(900), "closed after {took:?}");
}

#[tokio::test]
async fn trickled_headers_are_cut_at_the_header_timeout() {
    let c = campaign();
    let server = c.serve_on(
        &format!("{SEEDER}:0"),
        &["--header-timeout", "1", "--idle-timeout", "60"],
    );
    let mut s = connect(server.addr, "127.0.78.11", &c.ca_pem(), &[b"http/1.1"])
        .await
        .unwrap();
    let headers = "X-Slow: 1\r\n".repeat(200);
    let took = trickle(
        &mut s,
        b"GET /v1/no-such-route HTTP/1.1\r\n",
        headers.as_bytes(),
        Duration::from_millis(20),
    )
    .await
    .expect("headers trickled for 10 s were not cut by a 1 s header timeout");
    assert!(
        took >= Duration::from_millis(900),
        "cut after {took:?}, before the 1 s header timeout"
    );
}

#[tokio::test]
async fn a_body_slower_than_the_minimum_rate_is_cut_and_not_applied() {
    let c = campaign();
    let server = c.serve_on(
        &format!("{SEEDER}:0"),
        &[
            "--body-timeout",
            "1",
            "--min-body-rate",
            "100",
            "--header-timeout",
            "60",
            "--idle-timeout",
            "60",
        ],
    );
    let source = "127.0.78.12";
    let agent = Agent::new(PEER, source, "127.0.78.112", &c.ca_pem());
    let body = serde_json::to_vec(&EnrollRequest {
        csr_pem: agent.csr(),
        facts: agent.facts(),
    })
    .unwrap();
    let head = format!(
        "POST /v1/join/{PEER}?token={} HTTP/1.1\r\nHost: seeder\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        c.token(PEER, "peer", 600),
        body.len()
    );
    let mut s = connect(server.addr, source, &c.ca_pem(), &[b"http/1.1"])
        .await
        .unwrap();
    // 50 bytes/s, under the 100 bytes/s minimum; the whole body would take ~30 s.
    let took = trickle(&mut s, head.as_bytes(), &body, Duration::from_millis(20))
        .await
        .expect("a body at 50 bytes/s was not cut within 10 s (minimum 100 bytes/s after 1 s)");
    assert!(
        took >= Duration::from_millis(900),
        "cut after {took:?}, before the 1 s body timeout"
    );
    let out = c.seeder(&["status", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let view: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let node = view["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["name"] == PEER)
        .unwrap();
    assert_eq!(
        node["phase"], "not enrolled",
        "the cut enrollment was applied"
    );
}

#[tokio::test]
async fn a_long_poll_outlives_the_idle_timeout_on_http1_and_http2() {
    let c = campaign();
    let server = c.serve_on(
        &format!("{SEEDER}:0"),
        &["--idle-timeout", "1", "--header-timeout", "1"],
    );
    let mut agent = Agent::new(PEER, "127.0.78.13", "127.0.78.113", &c.ca_pem());
    agent.enroll(&server, &c.token(PEER, "peer", 600)).await;
    let pem = format!(
        "{}{}",
        agent.key.serialize_pem(),
        agent.cert_chain.as_ref().unwrap()
    );
    for http1 in [true, false] {
        let mut b = reqwest::Client::builder()
            .use_rustls_tls()
            .tls_built_in_root_certs(false)
            .add_root_certificate(reqwest::Certificate::from_pem(c.ca_pem().as_bytes()).unwrap())
            .identity(reqwest::Identity::from_pem(pem.as_bytes()).unwrap())
            .local_address(std::net::IpAddr::V4(agent.public_ip))
            .timeout(DEADLINE);
        if http1 {
            b = b.http1_only();
        }
        let client = b.build().unwrap();
        let first = client.get(server.url("/v1/manifest")).send().await.unwrap();
        assert_eq!(first.status(), 200);
        let etag = first.headers()["etag"].to_str().unwrap().to_owned();
        let _ = first.bytes().await.unwrap();
        let started = Instant::now();
        let polled = client
            .get(server.url("/v1/manifest?wait=3"))
            .header("if-none-match", etag)
            .send()
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "http1={http1}: a 3 s long-poll failed after {:?} (idle timeout 1 s): {e:?}",
                    started.elapsed()
                )
            });
        assert_eq!(polled.status(), 304, "http1={http1}");
        assert!(
            started.elapsed() >= Duration::from_millis(2900),
            "http1={http1}: the long-poll answered after {:?}, before its 3 s wait",
            started.elapsed()
        );
    }
}

/// Connects from each source in turn and keeps the connections; returns them.
async fn hold(server: SocketAddr, ca: &str, sources: &[&str]) -> Vec<TlsStream<TcpStream>> {
    let mut held = Vec::new();
    for s in sources {
        match connect(server, s, ca, &[]).await {
            Ok(c) => held.push(c),
            Err(e) => panic!(
                "connection {} from {s} under the cap refused: {e}",
                held.len()
            ),
        }
    }
    held
}

#[tokio::test]
async fn the_per_source_cap_refuses_the_next_connection_from_that_source_only() {
    let c = campaign();
    let server = c.serve_on(
        &format!("{SEEDER}:0"),
        &[
            "--max-connections-per-source",
            "3",
            "--max-connections",
            "100",
        ],
    );
    let ca = c.ca_pem();
    let a = "127.0.78.20";
    let mut held = hold(server.addr, &ca, &[a, a, a]).await;
    let refused = connect(server.addr, a, &ca, &[]).await;
    assert!(
        refused.is_err(),
        "a 4th connection from {a} completed its handshake under a per-source cap of 3"
    );
    let other = connect(server.addr, "127.0.78.21", &ca, &[]).await;
    assert!(other.is_ok(), "another source was refused: {other:?}");
    // A closed connection frees its place.
    drop(held.pop());
    let again = eventually("a place freed for 127.0.78.20", DEADLINE, || async {
        connect(server.addr, a, &ca, &[]).await.ok()
    })
    .await;
    drop(again);
}

#[tokio::test]
async fn the_overall_cap_refuses_the_next_connection_from_any_source() {
    let c = campaign();
    let server = c.serve_on(
        &format!("{SEEDER}:0"),
        &[
            "--max-connections-per-source",
            "100",
            "--max-connections",
            "4",
        ],
    );
    let ca = c.ca_pem();
    let mut held = hold(
        server.addr,
        &ca,
        &["127.0.78.30", "127.0.78.31", "127.0.78.32", "127.0.78.33"],
    )
    .await;
    let refused = connect(server.addr, "127.0.78.34", &ca, &[]).await;
    assert!(
        refused.is_err(),
        "a 5th connection completed its handshake under an overall cap of 4"
    );
    drop(held.pop());
    let again = eventually("a place freed under the overall cap", DEADLINE, || async {
        connect(server.addr, "127.0.78.34", &ca, &[]).await.ok()
    })
    .await;
    drop(again);
}

#[tokio::test]
async fn serve_refuses_to_start_when_the_overall_cap_cannot_fit_the_open_file_limit() {
    let c = campaign();
    let mut child = std::process::Command::new(seeder_bin())
        .args([
            "serve",
            "--dir",
            c.dir_str(),
            "--listen",
            &format!("{SEEDER}:0"),
        ])
        .args(["--max-connections", "100000000"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    // A seeder that did start must not outlive the test.
    let mut child = KillOnDrop(child);
    let status = eventually("serve to exit", DEADLINE, || {
        let status = child.0.try_wait().unwrap();
        async move { status }
    })
    .await;
    let mut err = String::new();
    std::io::Read::read_to_string(&mut { stderr }, &mut err).unwrap();
    assert!(!status.success(), "serve exited with success: {err}");
    let hard = rustix::process::getrlimit(rustix::process::Resource::Nofile)
        .maximum
        .unwrap();
    assert!(
        err.contains("100000256") && err.contains(&hard.to_string()),
        "the refusal names what the cap needs and the hard limit {hard}: {err}"
    );
}

/// A PROXY protocol v2 header as HAProxy's specification lays it out: the 12-byte signature,
/// version 2 + PROXY command (0x21), TCP over IPv4 (0x11), the address block's length (12), then
/// source address, destination address, source port, destination port.
fn proxy_v2(source: std::net::Ipv4Addr, dest: SocketAddr) -> Vec<u8> {
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    h.extend_from_slice(&[0x21, 0x11, 0x00, 0x0c]);
    h.extend_from_slice(&source.octets());
    let std::net::IpAddr::V4(d) = dest.ip() else {
        unreachable!()
    };
    h.extend_from_slice(&d.octets());
    h.extend_from_slice(&40_000u16.to_be_bytes());
    h.extend_from_slice(&dest.port().to_be_bytes());
    h
}

#[tokio::test]
async fn behind_a_balancer_the_per_source_cap_counts_the_proxy_source() {
    let c = campaign();
    let balancer = "127.0.78.50";
    let server = c.serve_on(
        &format!("{SEEDER}:0"),
        &[
            "--proxy-protocol-from",
            "127.0.78.48/30",
            "--max-connections-per-source",
            "2",
        ],
    );
    let ca = c.ca_pem();
    let (x, y) = ("192.0.2.10".parse().unwrap(), "192.0.2.11".parse().unwrap());
    let via = |src| proxy_v2(src, server.addr);
    let mut held = Vec::new();
    for _ in 0..2 {
        let conn = connect_after(server.addr, balancer, &ca, &[], &via(x)).await;
        held.push(conn.expect("a client's first two connections through the balancer"));
    }
    assert!(
        connect_after(server.addr, balancer, &ca, &[], &via(x))
            .await
            .is_err(),
        "a 3rd connection of 192.0.2.10 through the balancer got in under a per-source cap of 2"
    );
    let other = connect_after(server.addr, balancer, &ca, &[], &via(y)).await;
    assert!(
        other.is_ok(),
        "another client behind the same balancer was refused: {other:?}"
    );
    assert!(
        connect(server.addr, balancer, &ca, &[]).await.is_err(),
        "a connection from the balancer's range without a PROXY header got in"
    );
    let outsider = "127.0.78.60";
    assert!(
        connect_after(server.addr, outsider, &ca, &[], &via(y))
            .await
            .is_err(),
        "a PROXY header from outside --proxy-protocol-from was accepted"
    );
    let plain = connect(server.addr, outsider, &ca, &[]).await;
    assert!(plain.is_ok(), "a direct client was refused: {plain:?}");

    // Handlers see the PROXY source too: an enrollment claiming 192.0.2.20 as its public
    // address passes the source check only if its source is the header's, not the balancer's.
    let agent = Agent::new(PEER, "192.0.2.20", "127.0.78.120", &ca);
    let body = serde_json::to_vec(&EnrollRequest {
        csr_pem: agent.csr(),
        facts: agent.facts(),
    })
    .unwrap();
    let mut s = connect_after(
        server.addr,
        balancer,
        &ca,
        &[b"http/1.1"],
        &via(agent.public_ip),
    )
    .await
    .unwrap();
    let head = format!(
        "POST /v1/join/{PEER}?token={} HTTP/1.1\r\nHost: seeder\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        c.token(PEER, "peer", 600),
        body.len()
    );
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(&body).await.unwrap();
    let (_, got) = until_closed(&mut s, Instant::now())
        .await
        .expect("the enrollment was answered and the connection closed");
    let got = String::from_utf8_lossy(&got);
    assert!(
        got.starts_with("HTTP/1.1 200"),
        "enrollment through the balancer from the claimed address: {}",
        got.lines().last().unwrap_or_default()
    );
}

struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
