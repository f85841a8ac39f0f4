//! The lab's cloud: what DigitalOcean's API knows about the lab's droplets, and the stand-in
//! API (`hiveseed-do-api`) that answers the seeder's residency attestation from it.
//!
//! A droplet is recorded when the lab boots a node (Terraform created it: its id, name, region,
//! addresses, the campaign's tags and a creation time of now) and removed when the lab destroys
//! it (`replace`). The table is `<lab>/droplets.json`, rewritten atomically; the stand-in runs as
//! `lab do-api` on [`DO_API_LISTEN`], a process of its own like the seeder, reads the table on
//! every request and accepts only the bearer token in the campaign's `secrets/do-api-token`.

use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::Context;
use hiveseed_do_api::Droplet;

type Result<T> = anyhow::Result<T>;

/// Where the lab's stand-in DigitalOcean API listens (the seeder's loopback block).
pub const DO_API_LISTEN: &str = "127.0.9.1:9180";

/// The table of live droplets.
pub fn table_path(lab_dir: &Path) -> PathBuf {
    lab_dir.join("droplets.json")
}

fn pid_path(lab_dir: &Path) -> PathBuf {
    lab_dir.join("do-api.pid")
}

/// The live droplets; none before the first is created.
pub fn droplets(lab_dir: &Path) -> Result<Vec<Droplet>> {
    let path = table_path(lab_dir);
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes).with_context(|| format!("{}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

fn write_table(lab_dir: &Path, droplets: &[Droplet]) -> Result<()> {
    let path = table_path(lab_dir);
    let tmp = lab_dir.join(".droplets.json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(droplets)?)
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, &path).with_context(|| format!("renaming to {}", path.display()))
}

/// A droplet was created: it is in the table from now on. An id already there is refused (the
/// cloud never reuses one).
pub fn create(lab_dir: &Path, droplet: Droplet) -> Result<()> {
    let mut all = droplets(lab_dir)?;
    anyhow::ensure!(
        all.iter().all(|d| d.id != droplet.id),
        "droplet id {} exists already",
        droplet.id
    );
    all.push(droplet);
    write_table(lab_dir, &all)
}

/// The droplet named `name` was destroyed; the API answers 404 for its id from now on.
pub fn destroy(lab_dir: &Path, name: &str) -> Result<()> {
    let mut all = droplets(lab_dir)?;
    all.retain(|d| d.name != name);
    write_table(lab_dir, &all)
}

/// The tags terraform/main.tf puts on a droplet: the campaign's, its role's, its role-region's.
pub fn tags(campaign: &str, role: &str, region: &str) -> Vec<String> {
    vec![
        campaign.to_owned(),
        format!("{campaign}-{role}"),
        format!("{campaign}-{role}-{region}"),
    ]
}

/// Now as DigitalOcean writes `created_at`: `2026-12-06T03:10:00Z`.
pub fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::macros::format_description!(
            "[year]-[month]-[day]T[hour]:[minute]:[second]Z"
        ))
        .expect("a fixed format")
}

/// Writes a fresh API token (DigitalOcean's `dop_v1_` + 64 hex form) to `token_file`, 0600.
pub fn mint_api_token(token_file: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let token = format!("dop_v1_{}", hex::encode(rand::random::<[u8; 32]>()));
    std::fs::write(token_file, format!("{token}\n"))
        .with_context(|| format!("writing {}", token_file.display()))?;
    std::fs::set_permissions(token_file, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("chmod {}", token_file.display()))
}

/// Starts `lab do-api` (this binary) in its own process group, log appended to
/// `<lab>/do-api.log`; returns once it listens.
pub fn start_api(lab_dir: &Path, token_file: &Path) -> Result<u32> {
    let addr: SocketAddr = DO_API_LISTEN.parse().expect("static");
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(lab_dir.join("do-api.log"))
        .context("do-api log")?;
    let exe = std::env::current_exe().context("the lab's own binary")?;
    let mut child = Command::new(exe)
        .arg("do-api")
        .arg("--dir")
        .arg(lab_dir)
        .arg("--token-file")
        .arg(token_file)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .process_group(0)
        .spawn()
        .context("starting lab do-api")?;
    let pid = child.id();
    std::fs::write(pid_path(lab_dir), pid.to_string()).context("do-api.pid")?;
    let mut exited = None;
    crate::wait::until(
        "the DO API stand-in to listen",
        Duration::from_secs(20),
        || {
            if let Ok(Some(st)) = child.try_wait() {
                exited = Some(st);
                return true;
            }
            TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
        },
    )
    .map_err(|e| anyhow::anyhow!("lab do-api: {e}"))?;
    match exited {
        None => Ok(pid),
        Some(st) => anyhow::bail!(
            "lab do-api exited at start ({st}); see {}",
            lab_dir.join("do-api.log").display()
        ),
    }
}

/// Stops the stand-in if one runs.
pub fn stop_api(lab_dir: &Path) {
    crate::procs::stop_recorded(&pid_path(lab_dir), Duration::from_secs(10));
}

/// `lab do-api`: serves the stand-in from the lab's droplet table until killed.
pub fn serve(lab_dir: &Path, token_file: &Path) -> Result<()> {
    let token = std::fs::read_to_string(token_file)
        .with_context(|| format!("reading {}", token_file.display()))?
        .trim()
        .to_owned();
    let dir = lab_dir.to_path_buf();
    let source: hiveseed_do_api::Source =
        std::sync::Arc::new(move || droplets(&dir).map_err(|e| format!("{e:#}")));
    let standin = hiveseed_do_api::StandIn::logged(token, source);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(DO_API_LISTEN)
            .await
            .with_context(|| format!("binding {DO_API_LISTEN}"))?;
        tracing::info!(
            listen = DO_API_LISTEN,
            "DO API stand-in serving the lab's droplet table"
        );
        standin.serve(listener).await.context("serving")
    })
}
