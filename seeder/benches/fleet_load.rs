//! Seeder load benchmark (prints its figures; asserts nothing):
//! N simulated agents (default 10,000; `HIVESEED_BENCH_AGENTS`) against the real `seeder serve`
//! over real TLS, each from its own 127.2.x.y source address:
//! 1. enrollments/s (TLS handshake + CSR signing + state write + first manifest);
//! 2. every agent holds a manifest long-poll over mTLS (HTTP/2), and reports once in a 30 s window
//!    (`HIVESEED_BENCH_REPORT_WINDOW`): seeder RSS while holding them;
//! 3. `seeder publish` of a change every manifest depends on: publish → notified p50/p99;
//! 4. manifest GETs over mTLS keep-alive (HTTP/1.1, 64 connections, 10 s) against the seeder and
//!    against nginx serving the same bytes with the same client certificates and load generator.
//!
//! Run: `cargo bench -p hiveseed-seeder --bench fleet_load` (nginx from `apt-get install nginx-light`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ed25519_dalek::pkcs8::DecodePrivateKey;
use hiveseed_proto::api::{EnrollRequest, EnrollResponse, NodeFacts};
use hiveseed_proto::status::{Phase, StatusReport};
use hiveseed_proto::token::{JoinClaims, TOKEN_VERSION};
use hiveseed_proto::JoinToken;
use rcgen::{CertificateParams, KeyPair, PKCS_ECDSA_P256_SHA256};

const PER_REGION: usize = 99;

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn agent_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(127, 2, (i / 250) as u8, (i % 250) as u8 + 1)
}

fn region(i: usize) -> String {
    format!("r{:04}", i / PER_REGION)
}

/// Inside the region's default VPC range (10.(10+r).0.0/16: regions sort as they are numbered).
fn private_ip(i: usize) -> Ipv4Addr {
    let r = i / PER_REGION;
    Ipv4Addr::new(10, (10 + r) as u8, 0, (i % PER_REGION) as u8 + 1)
}

fn node_name(i: usize) -> String {
    format!("bench-agent-{}-{:02}", region(i), i % PER_REGION + 1)
}

fn rss_kib(pid: u32) -> (u64, u64) {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |k: &str| {
        s.lines()
            .find(|l| l.starts_with(k))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

struct Agent {
    name: String,
    ip: Ipv4Addr,
    key: KeyPair,
    csr: String,
    token: String,
    chain: Option<String>,
}

fn builder(ca: &str, ip: Ipv4Addr) -> reqwest::ClientBuilder {
    reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(ca.as_bytes()).unwrap())
        .local_address(IpAddr::V4(ip))
        .no_proxy()
}

fn mtls(ca: &str, a: &Agent, http1: bool) -> reqwest::Client {
    let pem = format!("{}{}", a.key.serialize_pem(), a.chain.as_ref().unwrap());
    let mut b = builder(ca, a.ip).identity(reqwest::Identity::from_pem(pem.as_bytes()).unwrap());
    if http1 {
        b = b.http1_only();
    }
    b.build().unwrap()
}

/// 64 connections issuing GETs back to back for `secs`; returns requests per second.
async fn get_rate(clients: &[reqwest::Client], url: &str, secs: u64) -> f64 {
    let done = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut tasks = Vec::new();
    for c in clients {
        let (c, url, done, errors) = (c.clone(), url.to_owned(), done.clone(), errors.clone());
        tasks.push(tokio::spawn(async move {
            while Instant::now() < deadline {
                match c.get(&url).send().await {
                    Ok(r) if r.status() == 200 => {
                        let _ = r.bytes().await;
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                    _ => {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }
    let started = Instant::now();
    for t in tasks {
        let _ = t.await;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let e = errors.load(Ordering::Relaxed);
    if e > 0 {
        println!("  ({e} failed requests against {url})");
    }
    done.load(Ordering::Relaxed) as f64 / elapsed
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
    let n = env_num("HIVESEED_BENCH_AGENTS", 10_000) as usize;
    let window = env_num("HIVESEED_BENCH_REPORT_WINDOW", 30);
    let seeder_bin = env!("CARGO_BIN_EXE_seeder");
    let tmp = tempfile::tempdir().unwrap();
    let roles = tmp.path().join("roles");
    std::fs::create_dir_all(&roles).unwrap();
    let mut fleet = String::from(
        "campaign = \"bench\"\nseeder_url = \"https://127.0.9.1:8443\"\n\n[federation]\ncatchup_interval_secs = 30\n\n",
    );
    for r in 0..n.div_ceil(PER_REGION) {
        let count = (n - r * PER_REGION).min(PER_REGION);
        fleet.push_str(&format!("[regions.r{r:04}]\nagent = {count}\n\n"));
    }
    fleet.push_str(&format!(
        "[pins.postgres]\nmajor = 17\nsource = \"distro\"\nserver = \"*\"\npgvector = \"*\"\nage = \"*\"\nexpect_server = \"17\"\nexpect_pgvector = \"0\"\nexpect_age = \"0\"\n\n[pins.ai_memory]\nversion = \"0.7.0\"\nsha256 = \"{}\"\nschema = 57\n",
        "ab".repeat(32)
    ));
    let fleet_path = roles.join("fleet.toml");
    std::fs::write(&fleet_path, &fleet).unwrap();
    std::fs::write(
        roles.join("agent.toml"),
        "[[resource]]\nkind = \"file\"\nid = \"file:agent\"\npath = \"/etc/agent.conf\"\nmode = \"0644\"\ncontent = { type = \"text\", text = \"{{ node.name }} catchup={{ fleet.federation.catchup_interval_secs }}\\n\" }\n",
    )
    .unwrap();
    let dir = tmp.path().join("campaign");
    let out = Command::new(seeder_bin)
        .args([
            "init",
            "--fleet",
            fleet_path.to_str().unwrap(),
            "--dir",
            dir.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let mut seeder = Command::new(seeder_bin)
        .args([
            "serve",
            "--dir",
            dir.to_str().unwrap(),
            "--listen",
            "127.0.9.1:0",
        ])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = seeder.id();
    let mut line = String::new();
    BufReader::new(seeder.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap()
        .to_owned();
    let base = format!("https://{addr}");
    let ca = std::fs::read_to_string(dir.join("ca.pem")).unwrap();
    let signing = ed25519_dalek::SigningKey::from_pkcs8_pem(
        &std::fs::read_to_string(dir.join("manifest.key")).unwrap(),
    )
    .unwrap();
    println!(
        "hiveseed seeder load benchmark: {n} agents, {} cores",
        std::thread::available_parallelism()
            .map(|p| p.get())
            .unwrap_or(0)
    );
    let (rss0, _) = rss_kib(pid);
    println!("seeder idle RSS: {:.1} MiB", rss0 as f64 / 1024.0);

    // Keys and CSRs are made before timing: they are the agents' cost, not the seeder's.
    let t = Instant::now();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let mut agents: Vec<Agent> = (0..n)
        .map(|i| {
            let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
            let csr = CertificateParams::new(vec![])
                .unwrap()
                .serialize_request(&key)
                .unwrap()
                .pem()
                .unwrap();
            let name = node_name(i);
            let claims = JoinClaims {
                v: TOKEN_VERSION,
                campaign: "bench".parse().unwrap(),
                node: name.parse().unwrap(),
                role: "agent".parse().unwrap(),
                region: region(i).parse().unwrap(),
                exp: now + 3600,
                nonce: format!("{i:032x}"),
            };
            Agent {
                token: JoinToken::sign(&claims, &signing).as_str().to_owned(),
                name,
                ip: agent_ip(i),
                key,
                csr,
                chain: None,
            }
        })
        .collect();
    println!(
        "prepared {n} agent keys and CSRs in {:.1}s (not counted)",
        t.elapsed().as_secs_f64()
    );

    // 1. Enrollment.
    let sem = Arc::new(tokio::sync::Semaphore::new(64));
    let t = Instant::now();
    let mut tasks = Vec::new();
    for (i, a) in agents.iter().enumerate() {
        let client = builder(&ca, a.ip).build().unwrap();
        let url = format!("{base}/v1/join/{}?token={}", a.name, a.token);
        let body = EnrollRequest {
            csr_pem: a.csr.clone(),
            facts: NodeFacts {
                droplet_id: i as u64,
                region: region(i).parse().unwrap(),
                public_ipv4: a.ip,
                private_ipv4: private_ip(i),
            },
        };
        let sem = sem.clone();
        tasks.push(tokio::spawn(async move {
            let _p = sem.acquire_owned().await.unwrap();
            let mut limited = 0u32;
            loop {
                let resp = client.post(&url).json(&body).send().await.unwrap();
                if resp.status() == 429 {
                    limited += 1;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
                assert!(resp.status().is_success(), "{}", resp.text().await.unwrap());
                let r: EnrollResponse = resp.json().await.unwrap();
                return (r.cert_chain_pem, limited);
            }
        }));
    }
    let mut limited = 0;
    for (a, task) in agents.iter_mut().zip(tasks) {
        let (chain, l) = task.await.unwrap();
        a.chain = Some(chain);
        limited += l;
    }
    let secs = t.elapsed().as_secs_f64();
    println!("enrollments: {n} in {secs:.1}s = {:.0}/s (64 in flight; {limited} answered 429 and retried)", n as f64 / secs);

    // 2. Hold long-polls over HTTP/2, one connection per agent.
    let clients: Vec<reqwest::Client> = agents.iter().map(|a| mtls(&ca, a, false)).collect();
    let mut etags = Vec::with_capacity(n);
    for c in &clients {
        let r = c.get(format!("{base}/v1/manifest")).send().await.unwrap();
        etags.push(r.headers()["etag"].to_str().unwrap().to_owned());
        let _ = r.bytes().await;
    }
    // Some(instant): the poll returned the new manifest; None: the poll failed.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Option<Instant>>();
    let mut polls = Vec::new();
    for (i, (c, etag)) in clients.iter().zip(&etags).enumerate() {
        let (c, etag, tx, url) = (
            c.clone(),
            etag.clone(),
            tx.clone(),
            format!("{base}/v1/manifest?wait=300"),
        );
        polls.push(tokio::spawn(async move {
            let _ = i;
            match c.get(&url).header("if-none-match", etag).send().await {
                Ok(r) if r.status() == 200 => {
                    let _ = r.bytes().await;
                    let _ = tx.send(Some(Instant::now()));
                }
                Ok(r) => {
                    eprintln!("long-poll answered {}", r.status());
                    let _ = tx.send(None);
                }
                Err(e) => {
                    eprintln!("long-poll failed: {e:?}");
                    let _ = tx.send(None);
                }
            }
        }));
    }
    let t = Instant::now();
    while fd_count(pid) < n && t.elapsed() < Duration::from_secs(120) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!(
        "long-polls held: {} connections open at the seeder after {:.1}s",
        fd_count(pid),
        t.elapsed().as_secs_f64()
    );

    // Reports: every agent once within the window, on its held connection.
    let t = Instant::now();
    let mut reports = Vec::new();
    for (i, (c, a)) in clients.iter().zip(&agents).enumerate() {
        let (c, url) = (c.clone(), format!("{base}/v1/status"));
        let report = StatusReport {
            node: a.name.parse().unwrap(),
            seq: 1,
            at: now,
            phase: Phase::Converged,
            generation: None,
            digest: None,
            resources: vec![],
            services: Vec::new(),
            checks: vec![],
        };
        let offset = Duration::from_millis((i as u64 * window * 1000) / n as u64);
        reports.push(tokio::spawn(async move {
            tokio::time::sleep(offset).await;
            let started = Instant::now();
            let r = c.post(&url).json(&report).send().await.unwrap();
            assert!(r.status().is_success());
            started.elapsed()
        }));
    }
    let mut lat = Vec::new();
    for r in reports {
        lat.push(r.await.unwrap());
    }
    lat.sort();
    let (rss, hwm) = rss_kib(pid);
    println!(
        "reports: {n} over {:.1}s ({:.0}/s), latency p50 {:.1} ms p99 {:.1} ms",
        t.elapsed().as_secs_f64(),
        n as f64 / t.elapsed().as_secs_f64(),
        pct(&lat, 0.5).as_secs_f64() * 1e3,
        pct(&lat, 0.99).as_secs_f64() * 1e3
    );
    println!(
        "seeder RSS holding {n} long-polls: {:.1} MiB (peak {:.1} MiB), {:.1} KiB per agent",
        rss as f64 / 1024.0,
        hwm as f64 / 1024.0,
        (rss.saturating_sub(rss0)) as f64 / n as f64
    );

    // 3. Publish a change every manifest depends on.
    std::fs::write(
        &fleet_path,
        fleet.replace("catchup_interval_secs = 30", "catchup_interval_secs = 31"),
    )
    .unwrap();
    let t0 = Instant::now();
    let publish = Command::new(seeder_bin)
        .args([
            "publish",
            "--dir",
            dir.to_str().unwrap(),
            "--timeout",
            "300",
        ])
        .output()
        .unwrap();
    let publish_secs = t0.elapsed().as_secs_f64();
    assert!(
        publish.status.success(),
        "{}",
        String::from_utf8_lossy(&publish.stderr)
    );
    let mut arrivals = Vec::with_capacity(n);
    let mut failed = 0usize;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(300);
    while arrivals.len() + failed < n {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(Some(at))) => arrivals.push(at.saturating_duration_since(t0)),
            Ok(Some(None)) => failed += 1,
            _ => break,
        }
    }
    arrivals.sort();
    println!(
        "publish -> notified: {}/{n} agents got the new generation ({failed} long-polls had failed); p50 {:.2}s p99 {:.2}s max {:.2}s (publish command returned after {publish_secs:.2}s)",
        arrivals.len(),
        pct(&arrivals, 0.5).as_secs_f64(),
        pct(&arrivals, 0.99).as_secs_f64(),
        arrivals.last().copied().unwrap_or_default().as_secs_f64()
    );
    for p in polls {
        p.abort();
    }
    drop(clients);

    // 4. Manifest GET rate over mTLS keep-alive: the seeder vs nginx serving the same bytes.
    let conns: Vec<reqwest::Client> = agents.iter().take(64).map(|a| mtls(&ca, a, true)).collect();
    let manifest_bytes = conns[0]
        .get(format!("{base}/v1/manifest"))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let seeder_rate = get_rate(&conns, &format!("{base}/v1/manifest"), 10).await;
    println!(
        "manifest GET over mTLS keep-alive, seeder: {seeder_rate:.0}/s ({} byte manifest)",
        manifest_bytes.len()
    );
    match nginx_rate(tmp.path(), &dir, &manifest_bytes, &agents, &ca).await {
        Some(nginx) => println!(
            "manifest GET over mTLS keep-alive, nginx ({}): {nginx:.0}/s; seeder/nginx = {:.2}",
            nginx_version(),
            seeder_rate / nginx
        ),
        None => println!("nginx not found: `apt-get install nginx-light` to compare"),
    }
    let _ = seeder.kill();
    let _ = seeder.wait();
}

fn nginx_version() -> String {
    Command::new("nginx")
        .arg("-v")
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stderr)
                .trim()
                .trim_start_matches("nginx version: ")
                .to_owned()
        })
        .unwrap_or_default()
}

async fn nginx_rate(
    tmp: &Path,
    dir: &Path,
    body: &[u8],
    agents: &[Agent],
    ca: &str,
) -> Option<f64> {
    let nginx = ["/usr/sbin/nginx", "/usr/local/sbin/nginx"]
        .into_iter()
        .find(|p| Path::new(p).exists())?;
    let prefix = tmp.join("nginx");
    std::fs::create_dir_all(prefix.join("logs")).unwrap();
    std::fs::write(prefix.join("manifest.json"), body).unwrap();
    let port = {
        let l = std::net::TcpListener::bind("127.0.9.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let conf = format!(
        r#"worker_processes 2;
pid {p}/nginx.pid;
error_log {p}/logs/error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  keepalive_requests 1000000;
  keepalive_timeout 120s;
  server {{
    listen 127.0.9.1:{port} ssl;
    ssl_certificate {d}/seeder.pem;
    ssl_certificate_key {d}/seeder.key;
    ssl_client_certificate {d}/ca.pem;
    ssl_verify_client on;
    ssl_protocols TLSv1.2 TLSv1.3;
    location = /v1/manifest {{ default_type application/json; alias {p}/manifest.json; }}
  }}
}}
"#,
        p = prefix.display(),
        d = dir.display()
    );
    std::fs::write(prefix.join("nginx.conf"), conf).unwrap();
    let mut child = Command::new(nginx)
        .args([
            "-p",
            prefix.to_str().unwrap(),
            "-c",
            prefix.join("nginx.conf").to_str().unwrap(),
            "-g",
            "daemon off;",
        ])
        .spawn()
        .ok()?;
    let url = format!("https://127.0.9.1:{port}/v1/manifest");
    let conns: Vec<reqwest::Client> = agents.iter().take(64).map(|a| mtls(ca, a, true)).collect();
    let t = Instant::now();
    while conns[0].get(&url).send().await.is_err() && t.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let rate = get_rate(&conns, &url, 10).await;
    // SIGTERM to the master stops its workers too (SIGKILL would orphan them).
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status();
    let _ = child.wait();
    Some(rate)
}
