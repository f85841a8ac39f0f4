//! Seeder memory under stalled downloads (issue #14 item 2; prints its figures, asserts nothing):
//! the real `seeder serve` over real TLS with a 50 MiB bootstrap binary, then N clients
//! (default 100; `HIVESEED_BENCH_DOWNLOADS`) that each open a TLS connection, request it, read the
//! response head and stop reading. The cap is raised to N and the write timeout to 10 minutes so
//! every download is in progress while RSS is measured. Prints idle RSS, RSS under load, and the
//! difference against the bound of idle + 64 MiB.
//!
//! Run: `cargo bench -p hiveseed-seeder --bench stalled_downloads`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls_pki_types::pem::PemObject;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const IP: &str = "127.0.95.1";
const SIZE: usize = 50 * 1024 * 1024;

fn status_kib(pid: u32, key: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn rchar(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/io"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("rchar:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(run());
}

async fn run() {
    let n: usize = std::env::var("HIVESEED_BENCH_DOWNLOADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    let seeder_bin = env!("CARGO_BIN_EXE_seeder");
    let tmp = tempfile::tempdir().unwrap();
    let roles = tmp.path().join("roles");
    std::fs::create_dir_all(&roles).unwrap();
    let fleet = format!(
        "campaign = \"dlbench\"\nseeder_url = \"https://{IP}:8443\"\n\n[regions.r1]\nagent = 1\n\n[pins.postgres]\nmajor = 17\nsource = \"distro\"\nserver = \"*\"\npgvector = \"*\"\nage = \"*\"\nexpect_server = \"17\"\nexpect_pgvector = \"0\"\nexpect_age = \"0\"\n\n[pins.ai_memory]\nversion = \"0.7.0\"\nsha256 = \"{}\"\nschema = 57\n",
        "ab".repeat(32)
    );
    let fleet_path = roles.join("fleet.toml");
    std::fs::write(&fleet_path, fleet).unwrap();
    std::fs::write(roles.join("agent.toml"), "").unwrap();
    let dir = tmp.path().join("campaign");
    let seeder = |args: &[&str]| {
        let out = Command::new(seeder_bin).args(args).output().unwrap();
        assert!(
            out.status.success(),
            "seeder {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    seeder(&[
        "init",
        "--fleet",
        fleet_path.to_str().unwrap(),
        "--dir",
        dir.to_str().unwrap(),
    ]);
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let bytes: Vec<u8> = (0..SIZE / 8)
        .flat_map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()
        })
        .collect();
    let file = tmp.path().join("bootstrap.bin");
    std::fs::write(&file, &bytes).unwrap();
    let sha = hiveseed_proto::Sha256::digest(&bytes);
    drop(bytes);
    seeder(&[
        "artifact",
        "add",
        "--dir",
        dir.to_str().unwrap(),
        "--name",
        "bootstrap",
        file.to_str().unwrap(),
    ]);

    let cap = n.to_string();
    let mut child = Command::new(seeder_bin)
        .args([
            "serve",
            "--dir",
            dir.to_str().unwrap(),
            "--listen",
            &format!("{IP}:0"),
            "--max-downloads",
            &cap,
            "--download-write-timeout",
            "600",
        ])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr: SocketAddr = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap()
        .parse()
        .unwrap();

    let mut roots = rustls::RootCertStore::empty();
    let ca = std::fs::read_to_string(dir.join("ca.pem")).unwrap();
    for c in rustls_pki_types::CertificateDer::pem_slice_iter(ca.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));

    let idle = status_kib(pid, "VmRSS:");
    println!(
        "hiveseed stalled-download benchmark: {n} clients, a {} MiB artifact, {} cores",
        SIZE / (1024 * 1024),
        std::thread::available_parallelism()
            .map(|p| p.get())
            .unwrap_or(0)
    );
    println!("seeder idle RSS: {:.1} MiB", mib(idle));

    let t = Instant::now();
    let mut held = Vec::with_capacity(n);
    for _ in 0..n {
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut tls = connector
            .connect(
                rustls_pki_types::ServerName::IpAddress(addr.ip().into()),
                tcp,
            )
            .await
            .unwrap();
        tls.write_all(
            format!("GET /v1/bootstrap/{sha} HTTP/1.1\r\nhost: {addr}\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let mut head = Vec::new();
        let mut buf = [0u8; 512];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            let got = tls.read(&mut buf).await.unwrap();
            assert!(got > 0, "closed before the response head");
            head.extend_from_slice(&buf[..got]);
        }
        assert!(
            head.starts_with(b"HTTP/1.1 200"),
            "{}",
            String::from_utf8_lossy(&head)
        );
        held.push(tls);
    }
    println!(
        "{n} downloads started (head read, then no more reads) in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    // Wait until the seeder stops reading the file: every download is as far as the connection's
    // buffers let it get.
    let mut last = rchar(pid);
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = rchar(pid);
        if now == last {
            break;
        }
        last = now;
    }
    let loaded = status_kib(pid, "VmRSS:");
    let peak = status_kib(pid, "VmHWM:");
    let diff = loaded.saturating_sub(idle);
    println!(
        "seeder RSS with {n} stalled downloads: {:.1} MiB (peak {:.1} MiB)",
        mib(loaded),
        mib(peak)
    );
    println!(
        "difference: {:.1} MiB (bound: 64 MiB) -> {}",
        mib(diff),
        if diff <= 64 * 1024 { "within" } else { "OVER" }
    );
    drop(held);
    let _ = child.kill();
    let _ = child.wait();
}
