#![allow(clippy::unwrap_used)]
//! Artifact and bootstrap downloads against the real `seeder serve` over real TLS (issue #14
//! item 2): streamed from disk with the digest recorded at `artifact add`, a file changed on disk
//! after `add` refused, a cap on concurrent downloads, and a write timeout that cuts a client that
//! stopped reading. Addresses: 127.0.93.x.

mod common;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use hiveseed_proto::Sha256;
use rustls_pki_types::pem::PemObject;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const IP: &str = "127.0.93.1";
/// Large enough that a client that stops reading leaves most of it unsent: far more than the
/// loopback socket buffers and the server's write buffers hold.
const SIZE: usize = 24 * 1024 * 1024;

/// Deterministic bytes (xorshift64), cheap to make in a debug build.
fn artifact_bytes() -> Vec<u8> {
    let mut out = Vec::with_capacity(SIZE);
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    while out.len() < SIZE {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out
}

/// A campaign whose seeder answers at `IP`, with `bytes` added as the bootstrap binary.
fn campaign_with_bootstrap(bytes: &[u8]) -> (Campaign, Sha256) {
    let c = Campaign::with("t93", &fleet_toml("t93").replace(SEEDER_IP, IP), PEER_ROLE);
    let file = c.tmp.path().join("bootstrap.bin");
    std::fs::write(&file, bytes).unwrap();
    let out = c.seeder(&["artifact", "add", "--name", "bootstrap", path_str(&file)]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    (c, Sha256::digest(bytes))
}

fn stored(c: &Campaign, sha: &Sha256) -> std::path::PathBuf {
    c.dir.join("artifacts").join(sha.to_hex())
}

fn anonymous(c: &Campaign) -> reqwest::Client {
    reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(c.ca_pem().as_bytes()).unwrap())
        .local_address(IP.parse::<IpAddr>().unwrap())
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap()
}

type Tls = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

/// An HTTP/1.1 download over a raw TLS connection that reads the response head and then stops
/// reading: the stalled client of the issue.
struct Stalled {
    tls: Tls,
    status: u16,
    content_length: u64,
    /// Body bytes that arrived with the head.
    body_read: u64,
}

async fn stalled_download(c: &Campaign, server: &Server, sha: &Sha256) -> Stalled {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pki_types::CertificateDer::pem_slice_iter(c.ca_pem().as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind(SocketAddr::new(IP.parse().unwrap(), 0)).unwrap();
    let tcp = sock.connect(server.addr).await.unwrap();
    let name = rustls_pki_types::ServerName::IpAddress(server.addr.ip().into());
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(name, tcp)
        .await
        .unwrap();
    let req = format!(
        "GET /v1/bootstrap/{sha} HTTP/1.1\r\nhost: {}\r\n\r\n",
        server.addr
    );
    tls.write_all(req.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    let end = loop {
        let n = tls.read(&mut buf).await.unwrap();
        assert!(n > 0, "connection closed before the response head");
        head.extend_from_slice(&buf[..n]);
        if let Some(i) = head.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
    };
    let text = String::from_utf8_lossy(&head[..end]).to_lowercase();
    let status = text[9..12].parse().unwrap();
    let content_length = text
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .map(|v| v.trim().parse().unwrap())
        .unwrap_or(0);
    Stalled {
        tls,
        status,
        content_length,
        body_read: (head.len() - end) as u64,
    }
}

impl Stalled {
    /// Reads what is left until the connection ends; the body bytes received in all.
    async fn drain(mut self) -> u64 {
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            match self.tls.read(&mut buf).await {
                Ok(0) | Err(_) => return self.body_read,
                Ok(n) => self.body_read += n as u64,
            }
        }
    }
}

/// Bytes the seeder process has read through read(2) and friends so far (`rchar`).
fn seeder_rchar(server: &Server) -> u64 {
    let io = std::fs::read_to_string(format!("/proc/{}/io", server.child.id())).unwrap();
    io.lines()
        .find_map(|l| l.strip_prefix("rchar:"))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

async fn get_bootstrap(c: &Campaign, server: &Server, sha: &Sha256) -> reqwest::Response {
    anonymous(c)
        .get(server.url(&format!("/v1/bootstrap/{sha}")))
        .send()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_artifact_streams_byte_identical_and_a_file_changed_after_add_is_refused() {
    let bytes = artifact_bytes();
    let (c, sha) = campaign_with_bootstrap(&bytes);
    let server = c.serve_on(&format!("{IP}:0"), &[]);

    let resp = get_bootstrap(&c, &server, &sha).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.content_length(), Some(SIZE as u64));
    let got = resp.bytes().await.unwrap();
    assert_eq!(got.len(), SIZE, "body length");
    assert!(
        got.as_ref() == bytes.as_slice(),
        "body is not the added file"
    );

    // Served as read, not read whole (and hashed) before the first byte: a client that reads the
    // head and stops costs the seeder a small part of the file in reads.
    let before = seeder_rchar(&server);
    let stalled = stalled_download(&c, &server, &sha).await;
    assert_eq!(stalled.status, 200);
    let read = seeder_rchar(&server) - before;
    assert!(
        read < (SIZE / 2) as u64,
        "the seeder read {read} bytes for a download whose client read only the head (file: {SIZE})"
    );
    drop(stalled);

    // Changed in place after `add`: same inode, same size, mtime put back. Only the ctime, which
    // no caller can set, tells; the file must not be served under its recorded digest.
    let path = stored(&c, &sha);
    let mtime = std::fs::metadata(&path).unwrap().modified().unwrap();
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(b"tampered", 4096).unwrap();
        f.set_modified(mtime).unwrap();
    }
    let resp = get_bootstrap(&c, &server, &sha).await;
    let status = resp.status();
    let body = resp.text().await.unwrap();
    assert_eq!(status, 500, "tampered file served ({} bytes)", body.len());
    assert_eq!(error_kind(&body), "internal");

    // Replaced by another file with the original bytes: a new inode is refused too (add again).
    let other = c.tmp.path().join("replacement");
    std::fs::write(&other, &bytes).unwrap();
    std::fs::rename(&other, &path).unwrap();
    let resp = get_bootstrap(&c, &server, &sha).await;
    assert_eq!(resp.status(), 500);
    assert_eq!(error_kind(&resp.text().await.unwrap()), "internal");

    // `add` again records the new file, and it is served.
    let file = c.tmp.path().join("bootstrap.bin");
    let out = c.seeder(&["artifact", "add", "--name", "bootstrap", path_str(&file)]);
    assert!(out.status.success());
    let resp = get_bootstrap(&c, &server, &sha).await;
    assert_eq!(resp.status(), 200);
    assert!(resp.bytes().await.unwrap().as_ref() == bytes.as_slice());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn downloads_over_the_cap_get_503_busy_with_retry_after() {
    let (c, sha) = campaign_with_bootstrap(&artifact_bytes());
    let server = c.serve_on(
        &format!("{IP}:0"),
        &["--max-downloads", "2", "--download-write-timeout", "300"],
    );
    let first = stalled_download(&c, &server, &sha).await;
    let second = stalled_download(&c, &server, &sha).await;
    assert_eq!((first.status, second.status), (200, 200));

    let resp = get_bootstrap(&c, &server, &sha).await;
    assert_eq!(resp.status(), 503, "the download over the cap");
    let retry_after = resp.headers().get("retry-after").cloned();
    let body = resp.text().await.unwrap();
    assert_eq!(error_kind(&body), "busy");
    assert!(body.contains("2 downloads"), "message: {body}");
    assert!(retry_after.is_some(), "no Retry-After");

    // A closed download gives its slot back.
    drop(first);
    eventually("a freed download slot", Duration::from_secs(20), || async {
        let resp = get_bootstrap(&c, &server, &sha).await;
        (resp.status() == 200).then_some(())
    })
    .await;
    drop(second);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_cut_after_the_write_timeout_and_frees_its_slot() {
    let (c, sha) = campaign_with_bootstrap(&artifact_bytes());
    let server = c.serve_on(
        &format!("{IP}:0"),
        &["--max-downloads", "1", "--download-write-timeout", "1"],
    );
    let stalled = stalled_download(&c, &server, &sha).await;
    assert_eq!(stalled.status, 200);
    assert_eq!(stalled.content_length, SIZE as u64);

    // The one slot comes back only when the stalled download is cut.
    eventually(
        "the stalled download's slot to be freed",
        Duration::from_secs(30),
        || async {
            let resp = get_bootstrap(&c, &server, &sha).await;
            (resp.status() == 200).then_some(())
        },
    )
    .await;
    // And its connection ended short of the body.
    let got = stalled.drain().await;
    assert!(
        got < SIZE as u64,
        "the stalled client received the whole body ({got} bytes): it was not cut"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_http2_stream_is_cut_after_the_write_timeout_and_frees_its_slot() {
    let (c, sha) = campaign_with_bootstrap(&artifact_bytes());
    let server = c.serve_on(
        &format!("{IP}:0"),
        &["--max-downloads", "1", "--download-write-timeout", "1"],
    );
    // reqwest negotiates HTTP/2; holding the response without reading stops the stream at the
    // flow-control window while the connection itself stays writable.
    let stalled = get_bootstrap(&c, &server, &sha).await;
    assert_eq!(stalled.version(), reqwest::Version::HTTP_2);
    assert_eq!(stalled.status(), 200);
    eventually(
        "the stalled stream's slot to be freed",
        Duration::from_secs(30),
        || async {
            let resp = get_bootstrap(&c, &server, &sha).await;
            (resp.status() == 200).then_some(())
        },
    )
    .await;
    let body = stalled.bytes().await;
    assert!(
        body.as_ref().map_or(true, |b| b.len() < SIZE),
        "the stalled stream received the whole body: it was not cut"
    );
}

/// Written to in place while a download of it is under way (same inode, same size, mtime put
/// back): the download ends short of its Content-Length, so the client never takes it for the
/// whole artifact; the one that follows is refused before its first byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_written_to_during_a_download_cuts_that_download_short() {
    let bytes = artifact_bytes();
    let (c, sha) = campaign_with_bootstrap(&bytes);
    let server = c.serve_on(&format!("{IP}:0"), &[]);
    let stalled = stalled_download(&c, &server, &sha).await;
    assert_eq!((stalled.status, stalled.content_length), (200, SIZE as u64));
    let path = stored(&c, &sha);
    let mtime = std::fs::metadata(&path).unwrap().modified().unwrap();
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(b"tampered", (SIZE - 4096) as u64).unwrap();
        f.set_modified(mtime).unwrap();
    }
    let received = stalled.drain().await;
    assert!(
        received < SIZE as u64,
        "the whole {SIZE} bytes went out after the file was written to"
    );
    let resp = get_bootstrap(&c, &server, &sha).await;
    assert_eq!(resp.status(), 500);
}
