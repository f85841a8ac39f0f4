//! The `seeder` command line: one subcommand per operator step.
//!
//! Commands other than `serve` work on the campaign directory's state database directly, so they
//! run whether or not a seeder is serving. A running `serve` notices what they change (published
//! inputs, revocations, artifacts) within half a second.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use hiveseed_proto::token::{JoinClaims, TOKEN_VERSION};
use hiveseed_proto::{JoinToken, NodeName};

use crate::artifact::DownloadSettings;
use crate::campaign::{self, write_atomic, CampaignDir};
use crate::fleet::Fleet;
use crate::report;
use crate::state::{self, Policy, ReenrollPolicy, Seeder};
use crate::store::{MintedToken, Store};

#[derive(Debug, Parser)]
#[command(name = "seeder", version, about = "hiveseed control plane")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Reenroll {
    Supersede,
    Refuse,
}

/// The listener's connection limits (README, Trust): timeouts in seconds, fractions allowed.
#[derive(Debug, clap::Args)]
pub struct ConnFlags {
    /// Seconds from accept to the end of the TLS handshake.
    #[arg(long, default_value = "10", value_parser = parse_secs)]
    handshake_timeout: Duration,
    /// Seconds to receive a whole HTTP/1.1 request head (also the wait for the next one on a
    /// keep-alive connection).
    #[arg(long, default_value = "10", value_parser = parse_secs)]
    header_timeout: Duration,
    /// Seconds a connection may stay open with no request in flight (long-polls and event
    /// streams in flight do not count as idle).
    #[arg(long, default_value = "60", value_parser = parse_secs)]
    idle_timeout: Duration,
    /// Seconds a request body may take before it must keep up --min-body-rate.
    #[arg(long, default_value = "10", value_parser = parse_secs)]
    body_timeout: Duration,
    /// Bytes per second a request body must average after --body-timeout, or the connection is cut.
    #[arg(long, default_value_t = 1024)]
    min_body_rate: u64,
    /// Open connections allowed from one source address (a NAT counts as one).
    #[arg(long, default_value_t = 256)]
    max_connections_per_source: usize,
    /// Open connections allowed overall; with 256 more it must fit the open-file hard limit.
    #[arg(long, default_value_t = 16_384)]
    max_connections: usize,
    /// A load balancer's address range (CIDR; repeatable): its connections must start with a
    /// PROXY protocol v2 header, whose source the per-source cap and the handlers then use.
    #[arg(long = "proxy-protocol-from", value_name = "CIDR")]
    proxy_protocol_from: Vec<crate::proxy_protocol::Cidr>,
}

impl ConnFlags {
    fn limits(&self) -> crate::conn::ConnLimits {
        crate::conn::ConnLimits {
            handshake_timeout: self.handshake_timeout,
            header_timeout: self.header_timeout,
            idle_timeout: self.idle_timeout,
            body_timeout: self.body_timeout,
            min_body_rate: self.min_body_rate,
            max_per_source: self.max_connections_per_source,
            max_total: self.max_connections,
            proxy_from: self.proxy_protocol_from.clone(),
        }
    }
}

fn parse_secs(s: &str) -> Result<Duration, String> {
    let secs: f64 = s.parse().map_err(|e| format!("{s:?}: {e}"))?;
    if !(secs > 0.0 && secs <= 86_400.0) {
        return Err(format!("{s:?}: seconds must be above 0 and at most 86400"));
    }
    Ok(Duration::from_secs_f64(secs))
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create the campaign directory: CA, seeder and operator certificates, signing keys, fleet
    /// secrets. Keeps whatever already exists.
    Init {
        /// The fleet description.
        #[arg(long)]
        fleet: PathBuf,
        /// The roles directory (default: the directory of the fleet file).
        #[arg(long)]
        roles: Option<PathBuf>,
        /// The campaign directory (created 0700).
        #[arg(long)]
        dir: PathBuf,
    },
    /// Validate a fleet file and print the nodes it declares and the enrollment mode.
    Check {
        #[arg(long)]
        fleet: PathBuf,
        /// The campaign directory: with it, the secrets the fleet needs from it are checked too
        /// (`secrets/do-api-token` under `[attestation]`).
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// Serve the control plane over TLS (mTLS for node routes).
    Serve {
        #[arg(long)]
        dir: PathBuf,
        /// Address to listen on.
        #[arg(long, default_value = "0.0.0.0:8443")]
        listen: SocketAddr,
        /// Do not require an enrollment to come from the public IPv4 it claims (behind a load balancer).
        #[arg(long)]
        no_source_check: bool,
        /// What a second enrollment of the same node with a new key does.
        #[arg(long, value_enum, default_value = "supersede")]
        reenroll: Reenroll,
        /// Seconds after the first peer enrolls to release the mesh with the peers present.
        #[arg(long, default_value_t = 600)]
        mesh_deadline: u64,
        /// Enrollments per second allowed from one source address (burst twice that).
        #[arg(long, default_value_t = 5.0)]
        enroll_rate_per_source: f64,
        #[command(flatten)]
        conn: ConnFlags,
        /// Artifact and bootstrap downloads served at once, over all clients; more get 503 busy.
        #[arg(long, default_value_t = DownloadSettings::default().max_concurrent)]
        max_downloads: usize,
        /// Seconds a download may make no progress (its client stopped reading) before its
        /// connection is closed.
        #[arg(long, default_value_t = DownloadSettings::default().write_timeout.as_secs())]
        download_write_timeout: u64,
        /// Seconds an enrollment's DigitalOcean look-up (`[attestation]`) may take, retries
        /// included, before the node is told to retry later.
        #[arg(long, default_value = "15", value_parser = parse_secs)]
        attestation_budget: Duration,
    },
    /// Publish fleet.toml and roles/ as they are on disk: a new generation for every node whose
    /// manifest changes, none for the rest.
    Publish {
        #[arg(long)]
        dir: PathBuf,
        /// How long to wait for a running seeder to render.
        #[arg(long, default_value_t = 30)]
        timeout: u64,
    },
    /// Content-addressed artifacts the seeder serves (the bootstrap binary, ai-memory, model files).
    Artifact {
        #[command(subcommand)]
        command: ArtifactCommand,
    },
    /// Write terraform/nodes.auto.tfvars.json: per node role, region, size and join URL; the CA,
    /// the manifest key and the bootstrap URL + sha256.
    Tfvars {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, default_value = "terraform/nodes.auto.tfvars.json")]
        out: PathBuf,
    },
    /// The fleet view.
    Status {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Wait until every node is converged on its current generation.
    Wait {
        #[arg(long)]
        dir: PathBuf,
        /// Seconds.
        #[arg(long, default_value_t = 900)]
        timeout: u64,
    },
    /// The validation report: reports/verify-<ts>.json and a table; exit 0 iff every check passes.
    Report {
        #[arg(long)]
        dir: PathBuf,
        /// Only what the nodes reported: skip the fleet probes (federation.write and
        /// federation.convergence write a memory on the first peer and read it on the others).
        #[arg(long)]
        node_checks_only: bool,
    },
    /// The full-spectrum fleet suite (reference spec §8): reports/test-<ts>.json and a table;
    /// exit 0 iff no check fails.
    Test {
        #[arg(long)]
        dir: PathBuf,
        /// Run only these groups (repeatable); all when absent.
        #[arg(long = "group", value_enum)]
        groups: Vec<crate::suite::Group>,
    },
    /// Revoke every certificate of a node; it must enroll again.
    Revoke {
        #[arg(long)]
        dir: PathBuf,
        node: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum ArtifactCommand {
    /// Add a file under a name; `ai-memory` (and `ollama` for an Ollama embedder) must match
    /// the fleet's pinned sha256.
    Add {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        name: String,
        file: PathBuf,
    },
    /// List artifacts.
    List {
        #[arg(long)]
        dir: PathBuf,
    },
}

fn unix_now() -> u64 {
    (state::system_clock())()
}

fn open_store(dir: &CampaignDir) -> Result<Store> {
    if !dir.campaign_file().exists() {
        bail!(
            "{} is not a campaign directory (run `seeder init`)",
            dir.root().display()
        );
    }
    Store::open(&dir.state_db()).context("opening the state database")
}

/// The published fleet, or the one on disk when nothing was published yet.
fn current_fleet(dir: &CampaignDir, store: &Store) -> Result<Fleet> {
    match store.latest_inputs()? {
        Some(p) => Ok(Fleet::parse(&p.fleet)?),
        None => {
            let cf = dir.read_campaign_file()?;
            Ok(Fleet::load(&cf.fleet)?)
        }
    }
}

/// Tells a running `serve` that the state changed underneath it (revocation, artifacts), and
/// waits until it has dropped its caches and re-rendered, so the change is in effect on return.
fn bump_epoch(dir: &CampaignDir, store: &Store) -> Result<()> {
    let e: u64 = store
        .meta("epoch")?
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
        + 1;
    store.set_meta("epoch", &e.to_string())?;
    if !serve_running(dir)? {
        return Ok(());
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let seen: u64 = store
            .meta("seen_epoch")?
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        if seen >= e {
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            bail!("the running seeder did not pick up the change within 30s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Whether a `serve` holds the campaign's lock.
fn serve_running(dir: &CampaignDir) -> Result<bool> {
    let f = match std::fs::File::open(dir.serve_lock()) {
        Ok(f) => f,
        Err(_) => return Ok(false),
    };
    match rustix::fs::flock(f.as_fd(), rustix::fs::FlockOperation::NonBlockingLockShared) {
        Ok(()) => Ok(false),
        Err(rustix::io::Errno::WOULDBLOCK) => Ok(true),
        Err(e) => Err(e.into()),
    }
}

pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Init { fleet, roles, dir } => {
            let parsed = Fleet::load(&fleet)?;
            let roles = roles.unwrap_or_else(|| {
                fleet
                    .parent()
                    .map(Path::to_path_buf)
                    .unwrap_or_else(|| PathBuf::from("."))
            });
            let roles = if roles.as_os_str().is_empty() {
                PathBuf::from(".")
            } else {
                roles
            };
            let log = campaign::init(
                &CampaignDir::new(&dir),
                &fleet,
                &roles,
                &parsed,
                SystemTime::now(),
            )
            .with_context(|| format!("initialising {}", dir.display()))?;
            for line in log {
                println!("{line}");
            }
            let key = CampaignDir::new(&dir).llm_api_key();
            if let (Some(var), false) = (parsed.llm_key_env(), key.exists()) {
                println!(
                    "missing {}: the fleet's [embedder]/[llm] needs the operator's API key (delivered to the peers as {var}); write it there, one line, chmod 600, before `seeder publish`",
                    key.display()
                );
            }
            let token = CampaignDir::new(&dir).do_api_token();
            if let (Some(a), false) = (&parsed.attestation, token.exists()) {
                println!(
                    "missing {}: the fleet's [attestation] ({a}) needs a read-only DigitalOcean API token; write it there, one line, chmod 600, before `seeder serve`",
                    token.display()
                );
            }
            let key = CampaignDir::new(&dir).agent_llm_api_key();
            if let (Some(var), false) = (parsed.agent_llm_key_env(), key.exists()) {
                println!(
                    "missing {}: the fleet's [agent_llm] needs the operator's API key for the agent nodes (delivered as {var}); write it there, one line, chmod 600, before `seeder publish`",
                    key.display()
                );
            }
            Ok(())
        }
        Command::Check { fleet, dir } => {
            let f = Fleet::load(&fleet)?;
            if let (Some(_), Some(dir)) = (&f.attestation, &dir) {
                CampaignDir::new(dir).read_do_api_token()?;
            }
            println!(
                "campaign {}: {} nodes in {} regions, W={} (requested {})",
                f.campaign,
                f.nodes.len(),
                f.regions.len(),
                f.federation.quorum_w,
                f.federation.quorum_w_requested
            );
            let layouts: Vec<String> = f
                .store_layouts
                .iter()
                .map(|(region, layout)| format!("{region} {layout}"))
                .collect();
            println!("store layout: {}", layouts.join(", "));
            match &f.attestation {
                Some(a) => println!("attestation: {a}"),
                None => println!(
                    "attestation: off — enrollment trusts the join token, single use, and the connection's source address"
                ),
            }
            for n in &f.nodes {
                println!("{:<28} {:<6} {:<6} {}", n.name, n.role, n.region, n.size);
            }
            Ok(())
        }
        Command::Serve {
            dir,
            listen,
            no_source_check,
            reenroll,
            mesh_deadline,
            enroll_rate_per_source,
            conn,
            max_downloads,
            download_write_timeout,
            attestation_budget,
        } => {
            if max_downloads == 0 || download_write_timeout == 0 {
                bail!("--max-downloads and --download-write-timeout must be at least 1");
            }
            let policy = Policy {
                check_source: !no_source_check,
                reenroll: match reenroll {
                    Reenroll::Supersede => ReenrollPolicy::Supersede,
                    Reenroll::Refuse => ReenrollPolicy::Refuse,
                },
                mesh_deadline_secs: mesh_deadline,
                enroll_rate_per_source,
                conn: conn.limits(),
                downloads: DownloadSettings {
                    max_concurrent: max_downloads,
                    write_timeout: Duration::from_secs(download_write_timeout),
                },
                attestation_budget: crate::digitalocean::Budget::within(attestation_budget),
                ..Policy::default()
            };
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            rt.block_on(serve(CampaignDir::new(dir), listen, policy))
        }
        Command::Publish { dir, timeout } => publish(&CampaignDir::new(dir), timeout),
        Command::Artifact { command } => match command {
            ArtifactCommand::Add { dir, name, file } => {
                artifact_add(&CampaignDir::new(dir), &name, &file)
            }
            ArtifactCommand::List { dir } => {
                let store = open_store(&CampaignDir::new(dir))?;
                for (name, sha, size) in store.artifacts()? {
                    println!("{name:<24} {sha} {size}");
                }
                Ok(())
            }
        },
        Command::Tfvars { dir, out } => tfvars(&CampaignDir::new(dir), &out),
        Command::Status { dir, json } => {
            let dir = CampaignDir::new(dir);
            let store = open_store(&dir)?;
            let fleet = current_fleet(&dir, &store)?;
            let view = report::fleet_view(&store, &fleet, unix_now())?;
            if json {
                println!("{}", serde_json::to_string_pretty(&view)?);
            } else {
                print!("{}", report::status_table(&view));
            }
            Ok(())
        }
        Command::Wait { dir, timeout } => {
            wait(&CampaignDir::new(dir), Duration::from_secs(timeout))
        }
        Command::Report {
            dir,
            node_checks_only,
        } => {
            let dir = CampaignDir::new(dir);
            let passed = write_report(&dir, !node_checks_only)?;
            if !passed {
                std::process::exit(1);
            }
            Ok(())
        }
        Command::Test { dir, groups } => {
            if !crate::suite::run_campaign(&CampaignDir::new(dir), &groups)? {
                std::process::exit(1);
            }
            Ok(())
        }
        Command::Revoke { dir, node } => {
            let dir = CampaignDir::new(dir);
            let store = open_store(&dir)?;
            let node: NodeName = node.parse()?;
            let n = store.revoke_node(&node, unix_now())?;
            store.event(
                unix_now(),
                Some(&node),
                "revoked",
                &format!("operator revoked {n} certificate(s)"),
            )?;
            bump_epoch(&dir, &store)?;
            println!("revoked {n} certificate(s) of {node}; it must enroll again");
            Ok(())
        }
    }
}

async fn serve(dir: CampaignDir, listen: SocketAddr, policy: Policy) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding {listen}"))?;
    serve_on(dir, listener, policy, shutdown_signal()).await
}

/// Serves the campaign on an already bound listener until `shutdown` resolves. Takes the
/// campaign's serve lock, so other `seeder` commands know a server is running.
pub async fn serve_on(
    dir: CampaignDir,
    listener: tokio::net::TcpListener,
    policy: Policy,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<()> {
    let limits = policy.conn.clone();
    let nofile = crate::conn::raise_fd_limit(&limits)?;
    tracing::info!(open_files = nofile, ?limits, "connection limits");
    // One serving seeder per campaign directory.
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.serve_lock())
        .with_context(|| format!("opening {}", dir.serve_lock().display()))?;
    if rustix::fs::flock(
        lock.as_fd(),
        rustix::fs::FlockOperation::NonBlockingLockExclusive,
    )
    .is_err()
    {
        bail!("another seeder is already serving {}", dir.root().display());
    }
    let seeder = Seeder::open(dir.clone(), policy, state::system_clock())?;
    let ca = std::fs::read_to_string(dir.ca_cert())?;
    let cert = std::fs::read_to_string(dir.seeder_cert())?;
    let key = std::fs::read_to_string(dir.seeder_key())?;
    let config = crate::tls::server_config(&ca, &cert, &key)?;
    seeder.rerender(state::Change::All, "startup").await?;
    seeder
        .store
        .set_meta("rendered_inputs", &seeder.inputs().id.to_string())?;
    let bound = listener.local_addr()?;
    tracing::info!(listen = %bound, campaign = %seeder.inputs().fleet.campaign, "seeder serving");
    // The first line on stdout is the bound address (tests and the lab listen on port 0).
    println!("listening on {bound}");
    let _ = std::io::stdout().flush();
    let watcher = tokio::spawn(watch_changes(seeder.clone()));
    let app = crate::api::app(seeder.clone());
    let result = crate::tls::serve(listener, config, app, limits, shutdown).await;
    watcher.abort();
    tracing::info!("seeder stopped");
    drop(lock);
    result
}

async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// Picks up what other `seeder` commands changed, and refreshes manifests periodically (mesh
/// deadline, signature lifetime).
async fn watch_changes(seeder: Arc<Seeder>) {
    let mut epoch = seeder.store.meta("epoch").ok().flatten();
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    let mut since_refresh = 0u32;
    loop {
        tick.tick().await;
        since_refresh += 1;
        let mut reason = None;
        match seeder.reload_inputs() {
            Ok(true) => reason = Some("publish"),
            Ok(false) => {}
            Err(e) => tracing::error!(error = %format!("{e:#}"), "published inputs are unreadable"),
        }
        let now_epoch = seeder.store.meta("epoch").ok().flatten();
        if now_epoch != epoch {
            epoch = now_epoch;
            seeder.forget_caches();
            reason = reason.or(Some("operator change"));
        }
        if since_refresh >= 150 {
            reason = reason.or(Some("refresh"));
        }
        if let Some(reason) = reason {
            since_refresh = 0;
            match seeder.rerender(state::Change::All, reason).await {
                Ok(_) => {
                    let _ = seeder
                        .store
                        .set_meta("rendered_inputs", &seeder.inputs().id.to_string());
                    if let Some(e) = &epoch {
                        let _ = seeder.store.set_meta("seen_epoch", e);
                    }
                }
                Err(e) => tracing::error!(error = %format!("{e:#}"), "rendering failed"),
            }
        }
    }
}

/// `seeder publish`: validates and publishes the inputs on disk; waits for a running seeder to
/// render them, or renders them itself when none is serving.
pub fn publish(dir: &CampaignDir, timeout: u64) -> Result<()> {
    let store = open_store(dir)?;
    let (fleet_text, roles) = state::read_inputs_from_disk(dir)?;
    let fleet = Fleet::parse(&fleet_text)?;
    let cf = dir.read_campaign_file()?;
    if fleet.campaign.as_str() != cf.campaign {
        bail!(
            "{} describes campaign {}, this directory serves {}",
            cf.fleet.display(),
            fleet.campaign,
            cf.campaign
        );
    }
    state::validate_roles(&fleet, &roles).context("the roles do not render")?;
    // The real secrets, now: a missing or loose operator key refuses the publish, rather than a
    // running seeder failing to render it.
    state::load_secrets(dir, &fleet).context("the campaign's secrets are not ready")?;
    // Not a render secret (it never reaches a manifest), but a running seeder needs it to enroll.
    if fleet.attestation.is_some() {
        dir.read_do_api_token()
            .context("the fleet's [attestation] needs the DigitalOcean API token")?;
    }
    check_artifact_pins(&store, &fleet)?;
    let digest = crate::render::inputs_digest(&fleet_text, &roles);
    let before = store.latest_inputs()?.map(|p| p.id);
    let p = store.publish_inputs(
        digest,
        &fleet_text,
        &serde_json::to_string(&roles)?,
        unix_now(),
    )?;
    if before == Some(p.id) {
        println!("inputs unchanged (digest {}); nothing published", digest);
    } else {
        println!("published inputs #{} (digest {})", p.id, digest);
    }
    let last_event = store.events(1)?.first().map(|e| e.id).unwrap_or(0);
    if serve_running(dir)? {
        let deadline = std::time::Instant::now() + Duration::from_secs(timeout);
        loop {
            let rendered: i64 = store
                .meta("rendered_inputs")?
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            if rendered >= p.id {
                break;
            }
            if std::time::Instant::now() > deadline {
                bail!(
                    "the running seeder did not render inputs #{} within {timeout}s",
                    p.id
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let mut changed: Vec<_> = store
            .events(10_000)?
            .into_iter()
            .filter(|e| e.id > last_event && e.kind == "generation")
            .collect();
        changed.reverse();
        for e in &changed {
            println!("{:<28} {}", e.node.as_deref().unwrap_or("-"), e.message);
        }
        println!("{} node(s) got a new generation", changed.len());
    } else {
        let seeder = Seeder::open(dir.clone(), Policy::default(), state::system_clock())?;
        seeder.reload_inputs()?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let changed = rt.block_on(seeder.rerender(state::Change::All, "publish"))?;
        store.set_meta("rendered_inputs", &p.id.to_string())?;
        for (node, g) in &changed {
            println!("{node:<28} generation {g}");
        }
        println!(
            "{} node(s) got a new generation (no seeder is serving; they get it when one does)",
            changed.len()
        );
    }
    Ok(())
}

/// Pinned artifacts (`ai-memory`, and `ollama` for an Ollama embedder) must be the pinned bytes:
/// served bytes are what the fleet pins.
fn check_artifact_pins(store: &Store, fleet: &Fleet) -> Result<()> {
    let pins = fleet.artifact_pins();
    for (name, sha, _) in store.artifacts()? {
        for (pinned, pin, field) in &pins {
            if name == *pinned && sha != *pin {
                bail!("artifact {name} is {sha}, but {field} is {pin}; add the pinned file");
            }
        }
    }
    Ok(())
}

fn artifact_add(dir: &CampaignDir, name: &str, file: &Path) -> Result<()> {
    let store = open_store(dir)?;
    if name.is_empty()
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
    {
        bail!("artifact name {name:?}: use letters, digits, '-', '_' and '.'");
    }
    // Copied and hashed in bounded memory; the digest computed here is the one served.
    let staged = crate::artifact::stage(&dir.artifacts_dir(), file)?;
    let (sha, size) = (staged.sha, staged.size);
    let fleet = current_fleet(dir, &store)?;
    if let Some((_, pin, field)) = fleet
        .artifact_pins()
        .into_iter()
        .find(|(n, _, _)| *n == name)
    {
        if sha != pin {
            bail!(
                "{} is {sha}, but {field} is {pin}; refusing to serve an unpinned {name}",
                file.display()
            );
        }
    }
    staged.commit()?;
    store.put_artifact(&sha, name, size, unix_now())?;
    bump_epoch(dir, &store)?;
    println!("{name} {sha} ({size} bytes)");
    Ok(())
}

fn tfvars(dir: &CampaignDir, out: &Path) -> Result<()> {
    let store = open_store(dir)?;
    let fleet = current_fleet(dir, &store)?;
    let signing = dir.load_manifest_key()?;
    let (_, bootstrap_sha, _) = store
        .artifacts()?
        .into_iter()
        .find(|(n, _, _)| n == "bootstrap")
        .context("no bootstrap binary: `seeder artifact add --name bootstrap <path>` first")?;
    let now = unix_now();
    let ttl = fleet.ttl.join_token_secs;
    let mut nodes = BTreeMap::new();
    let mut fresh = Vec::new();
    for n in &fleet.nodes {
        let minted = store.token(&n.name)?;
        let token = match (
            stale_token(&store, &n.name, minted.as_ref(), now, ttl)?,
            minted,
        ) {
            (None, Some(m)) => m.token,
            (reason, _) => {
                let nonce = hex::encode(rand::random::<[u8; 16]>());
                let claims = JoinClaims {
                    v: TOKEN_VERSION,
                    campaign: fleet.campaign.clone(),
                    node: n.name.clone(),
                    role: n.role.clone(),
                    region: n.region.clone(),
                    exp: now + ttl,
                    nonce: nonce.clone(),
                };
                let t = JoinToken::sign(&claims, &signing).as_str().to_owned();
                store.put_token(
                    &n.name,
                    &MintedToken {
                        token: t.clone(),
                        nonce: Some(nonce),
                        issued_at: Some(now),
                        exp: now + ttl,
                    },
                )?;
                fresh.push((n.name.clone(), reason.unwrap_or_default()));
                t
            }
        };
        nodes.insert(
            n.name.to_string(),
            serde_json::json!({
                "role": n.role.as_str(),
                "region": n.region.as_str(),
                "size": n.size,
                "join_url": format!("{}/v1/join/{}?token={token}", fleet.seeder.url, n.name),
            }),
        );
    }
    let doc = serde_json::json!({
        "campaign": fleet.campaign.as_str(),
        "seeder_url": fleet.seeder.url,
        "campaign_ca_pem": std::fs::read_to_string(dir.ca_cert())?,
        "manifest_key_pem": std::fs::read_to_string(dir.manifest_pub())?,
        "bootstrap_url": format!("{}/v1/bootstrap/{}", fleet.seeder.url, bootstrap_sha),
        "bootstrap_sha256": bootstrap_sha.to_hex(),
        "nodes": nodes,
        // The VPC ranges the seeder certifies private addresses in: Terraform creates them.
        "region_cidrs": fleet
            .vpc_ranges
            .iter()
            .map(|(r, c)| (r.to_string(), c.to_string()))
            .collect::<BTreeMap<_, _>>(),
    });
    if let Some(parent) = out.parent() {
        if !parent.as_os_str().is_empty() {
            std::fs::create_dir_all(parent)?;
        }
    }
    let mut text = serde_json::to_string_pretty(&doc)?;
    text.push('\n');
    // Join tokens are credentials: the file is the operator's alone.
    write_atomic(out, text.as_bytes(), 0o600)?;
    for (node, reason) in &fresh {
        println!("{node}  fresh join token ({reason})");
    }
    println!(
        "wrote {} ({} nodes, {} fresh join tokens, join tokens valid {}s)",
        out.display(),
        fleet.nodes.len(),
        fresh.len(),
        ttl
    );
    Ok(())
}

/// Why a node's latest token must not go out again, or `None` to reuse it: a token is reused
/// only while unused, with its mint time recorded and more than half its life left, so
/// re-running tfvars churns nothing, and a replaced droplet always gets a token it can enroll with.
fn stale_token(
    store: &Store,
    node: &NodeName,
    minted: Option<&MintedToken>,
    now: u64,
    ttl: u64,
) -> Result<Option<String>> {
    let Some(t) = minted else {
        return Ok(Some("none minted yet".into()));
    };
    let (Some(nonce), Some(_)) = (&t.nonce, t.issued_at) else {
        return Ok(Some("mint time not recorded".into()));
    };
    if let Some(u) = store.token_use(node, nonce)? {
        let at = crate::attest::rfc3339(u.used_at as i64).unwrap_or_else(|| u.used_at.to_string());
        return Ok(Some(format!("the last one was used at {at}")));
    }
    if t.exp <= now + ttl / 2 {
        return Ok(Some("the last one is past half its life".into()));
    }
    Ok(None)
}

fn wait(dir: &CampaignDir, timeout: Duration) -> Result<()> {
    let store = open_store(dir)?;
    let deadline = std::time::Instant::now() + timeout;
    let mut last = String::new();
    loop {
        let fleet = current_fleet(dir, &store)?;
        let v = report::fleet_view(&store, &fleet, unix_now())?;
        let line = format!(
            "enrolled {}/{}  converged {}/{}  missing {}",
            v.enrolled, v.total, v.converged, v.total, v.missing
        );
        if line != last {
            println!("{line}");
            let _ = std::io::stdout().flush();
            last = line;
        }
        if v.all_converged {
            println!("fleet converged");
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            print!("{}", report::status_table(&v));
            bail!("fleet not converged after {}s", timeout.as_secs());
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Writes reports/verify-<ts>.json, prints the table, returns whether every check passed.
pub fn write_report(dir: &CampaignDir, fleet_probes: bool) -> Result<bool> {
    let store = open_store(dir)?;
    let fleet = current_fleet(dir, &store)?;
    let ts = time::OffsetDateTime::now_utc().format(&time::macros::format_description!(
        "[year][month][day]T[hour][minute][second]Z"
    ))?;
    let probes = if fleet_probes {
        crate::suite::fleet_probes(dir)?
    } else {
        Vec::new()
    };
    let r = report::validation_report(&store, &fleet, unix_now(), ts.clone(), probes)?;
    std::fs::create_dir_all(dir.reports_dir())?;
    let path = dir.reports_dir().join(format!("verify-{ts}.json"));
    write_atomic(&path, serde_json::to_string_pretty(&r)?.as_bytes(), 0o644)?;
    print!("{}", report::validation_table(&r));
    println!("report: {}", path.display());
    Ok(r.passed())
}
