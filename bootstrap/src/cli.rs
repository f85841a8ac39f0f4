//! The `bootstrap` command line: `run` (cloud-init's entry), `agent` (the long-running loop),
//! `plan` (dry run) and `status` (local state).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

use crate::agent::{self, Agent, AgentConfig, StateDir, EXIT_PERMANENT, EXIT_RETRYABLE};
use crate::plan::{observe, plan, ObserveEnv, PlanContext, ServiceManager};

#[derive(Debug, Parser)]
#[command(name = "bootstrap", version, about = "hiveseed node agent")]
pub struct Cli {
    /// The root the agent provisions (`/` on a droplet and inside a lab node).
    #[arg(long, global = true, default_value = "/")]
    pub root: PathBuf,
    /// DigitalOcean metadata service base URL (used when there is no facts file).
    #[arg(long, global = true, default_value = crate::facts::DO_METADATA_BASE)]
    pub metadata_url: String,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// First boot: under systemd install and start hiveseed-agent.service; elsewhere start the
    /// agent in the background as the supervisor of this node's services. Returns at once.
    Run,
    /// The agent loop: enroll, fetch, verify, plan, apply, report, re-pull. Runs until stopped.
    Agent {
        /// Seconds between drift re-checks of an unchanged manifest (plus per-node splay).
        #[arg(long, default_value_t = 300)]
        drift_interval: u64,
    },
    /// Print what the agent would do for its current manifest, without doing it.
    Plan,
    /// Print the agent's local state and its last report.
    Status,
    /// Internal: the supervisor's unit launcher (see `supervisor::launch`).
    #[command(hide = true)]
    LaunchUnit {
        #[arg(long)]
        cgroup: Option<PathBuf>,
        #[arg(long, requires = "gid")]
        uid: Option<u32>,
        #[arg(long, requires = "uid")]
        gid: Option<u32>,
        #[arg(long, value_delimiter = ',')]
        groups: Vec<u32>,
        /// `soft:hard`, each a number or `infinity`.
        #[arg(long)]
        nofile: Option<String>,
        #[arg(long, allow_hyphen_values = true)]
        nice: Option<i32>,
        #[arg(last = true, required = true)]
        argv: Vec<String>,
    },
    /// Internal: the supervisor's size-rotating unit logger (stdin to `<dir>/<name>`).
    #[command(hide = true)]
    UnitLog {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        name: String,
        #[arg(long)]
        max_bytes: u64,
    },
}

pub const AGENT_UNIT: &str = "[Unit]
Description=hiveseed node agent
After=network-online.target
Wants=network-online.target

[Service]
Type=simple
ExecStart=/usr/local/bin/bootstrap agent
Restart=always
RestartSec=5
RestartPreventExitStatus=2

[Install]
WantedBy=multi-user.target
";

fn config(cli: &Cli) -> AgentConfig {
    AgentConfig {
        root: cli.root.clone(),
        metadata_base: cli.metadata_url.clone(),
        ..AgentConfig::default()
    }
}

pub fn init_logging() {
    use tracing_subscriber::prelude::*;
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    // Under systemd stderr is the journal already; the journal adds its own timestamps.
    let under_journal = std::env::var_os("JOURNAL_STREAM").is_some();
    use std::io::IsTerminal;
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    if under_journal {
        tracing_subscriber::registry()
            .with(filter)
            .with(fmt.without_time())
            .init();
    } else {
        tracing_subscriber::registry().with(filter).with(fmt).init();
    }
}

pub fn run(cli: Cli) -> ExitCode {
    let result = match &cli.command {
        Command::Run => first_boot(&cli),
        Command::Agent { drift_interval } => {
            let mut cfg = config(&cli);
            cfg.drift_interval = Duration::from_secs(*drift_interval);
            runtime().and_then(|rt| rt.block_on(async { Agent::new(cfg).await?.run().await }))
        }
        Command::Plan => runtime().and_then(|rt| rt.block_on(dry_run(config(&cli)))),
        Command::Status => status(&config(&cli)),
        Command::LaunchUnit { .. } => return launch_unit(&cli.command),
        Command::UnitLog {
            dir,
            name,
            max_bytes,
        } => crate::supervisor::launch::log_stdin(dir, name, *max_bytes)
            .with_context(|| format!("logging to {}/{name}", dir.display())),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bootstrap: {e:#}");
            ExitCode::from(exit_code(&e))
        }
    }
}

/// The exit code of a failed run: a refusal that will not heal by retrying (bad token, failed
/// attestation, bad join file) is permanent, everything else (seeder unreachable, attestation
/// unavailable) retryable.
fn exit_code(e: &anyhow::Error) -> u8 {
    let permanent = e.chain().any(|c| {
        c.downcast_ref::<crate::client::ClientError>()
            .map(|ce| !ce.retryable())
            .unwrap_or(false)
    }) || e.to_string().contains("join file");
    if permanent {
        EXIT_PERMANENT
    } else {
        EXIT_RETRYABLE
    }
}

/// Execs the unit; returns only when that failed (the message goes to the unit's log).
fn launch_unit(cmd: &Command) -> ExitCode {
    let spec = match launch_spec(cmd) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("bootstrap launch-unit: {e}");
            return ExitCode::from(127);
        }
    };
    let e = crate::supervisor::launch::launch(&spec);
    eprintln!("bootstrap launch-unit: {}: {e}", spec.argv[0]);
    ExitCode::from(127)
}

/// The launcher's arguments as the supervisor wrote them ([`LaunchSpec::to_args`]).
///
/// [`LaunchSpec::to_args`]: crate::supervisor::launch::LaunchSpec::to_args
pub fn launch_spec(cmd: &Command) -> Result<crate::supervisor::launch::LaunchSpec, String> {
    let Command::LaunchUnit {
        cgroup,
        uid,
        gid,
        groups,
        nofile,
        nice,
        argv,
    } = cmd
    else {
        return Err("not launch-unit".into());
    };
    let nofile = nofile
        .as_deref()
        .map(crate::unit::parse_limit)
        .transpose()
        .map_err(|e| format!("--nofile: {e}"))?;
    Ok(crate::supervisor::launch::LaunchSpec {
        cgroup: cgroup.clone(),
        creds: uid
            .zip(*gid)
            .map(|(uid, gid)| crate::supervisor::launch::Creds {
                uid,
                gid,
                groups: groups.clone(),
            }),
        nofile,
        nice: *nice,
        argv: argv.clone(),
    })
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
}

/// cloud-init's entry point: hand over to a long-running agent and return.
fn first_boot(cli: &Cli) -> Result<()> {
    // Fail early, before anything is started, if the join file is unusable.
    agent::load_join(&cli.root, &AgentConfig::default().join_file)?;
    let exe = std::env::current_exe().context("locating our own binary")?;
    if cli.root.join("run/systemd/system").is_dir() {
        let unit = cli.root.join("etc/systemd/system/hiveseed-agent.service");
        std::fs::create_dir_all(unit.parent().expect("has parent"))?;
        std::fs::write(&unit, AGENT_UNIT)?;
        for args in [
            &["daemon-reload"][..],
            &["enable", "--now", "hiveseed-agent.service"][..],
        ] {
            let st = std::process::Command::new("systemctl")
                .args(args)
                .status()?;
            anyhow::ensure!(st.success(), "systemctl {} failed: {st}", args.join(" "));
        }
        println!("hiveseed-agent.service installed and started");
        return Ok(());
    }
    // No systemd: one agent, in the background, supervising this node's services.
    let pid_file = cli.root.join("run/hiveseed/agent.pid");
    if let Ok(pid) = std::fs::read_to_string(&pid_file) {
        let pid = pid.trim();
        let alive = std::fs::read_link(format!("/proc/{pid}/exe"))
            .map(|p| p == exe)
            .unwrap_or(false);
        if alive {
            println!("agent already running (pid {pid})");
            return Ok(());
        }
    }
    let log_dir = cli.root.join("var/log/hiveseed");
    std::fs::create_dir_all(&log_dir)?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log_dir.join("agent.log"))?;
    let child = std::process::Command::new(&exe)
        .arg("--root")
        .arg(&cli.root)
        .arg("--metadata-url")
        .arg(&cli.metadata_url)
        .arg("agent")
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .process_group(0)
        .spawn()
        .context("starting the agent")?;
    std::fs::create_dir_all(pid_file.parent().expect("has parent"))?;
    std::fs::write(&pid_file, child.id().to_string())?;
    println!(
        "agent started in the background (pid {}), logging to /var/log/hiveseed/agent.log",
        child.id()
    );
    Ok(())
}

use std::os::unix::process::CommandExt;

async fn dry_run(cfg: AgentConfig) -> Result<()> {
    let agent = Agent::new(cfg).await?;
    let mut envelope = agent.state.saved_manifest();
    if agent.state.identity().is_some() {
        match agent.client.manifest(None, Duration::ZERO).await {
            Ok(crate::client::ManifestPoll::Changed { envelope: e, .. }) => envelope = Some(e),
            Ok(_) => {}
            Err(e) => eprintln!("seeder not reachable ({e}); planning the last manifest received"),
        }
    }
    let Some(envelope) = envelope else {
        anyhow::bail!("no manifest yet: the node has not enrolled");
    };
    let v = hiveseed_proto::verify_manifest(
        &envelope,
        &agent.manifest_key,
        &agent.join.campaign,
        &agent.join.node,
        agent::unix_now(),
        agent.state.applied_state()?,
    )?;
    let env = ObserveEnv {
        host: agent.host.as_ref(),
        supervisor: agent.supervisor.as_ref(),
        readiness: &agent.client,
        probe_timeout: Duration::from_secs(5),
    };
    if agent.manager == ServiceManager::Supervisor {
        agent.recover_services().await;
    }
    let observed = observe(&v.manifest, &env).await?;
    let p = plan(&v.manifest, &observed, &PlanContext::now())?;
    println!(
        "generation {} ({} resources)",
        v.manifest.generation,
        v.manifest.resources.len()
    );
    if p.is_empty() {
        println!("nothing to do");
    } else {
        print!("{p}");
    }
    Ok(())
}

fn status(cfg: &AgentConfig) -> Result<()> {
    let (join, _) = agent::load_join(&cfg.root, &cfg.join_file)?;
    let state = StateDir::new(&cfg.root);
    println!(
        "node        {} ({} in {})",
        join.node, join.role, join.region
    );
    println!("seeder      {}", join.seeder_url);
    println!(
        "enrolled    {}",
        if state.identity().is_some() {
            "yes"
        } else {
            "no"
        }
    );
    match state.applied_state()? {
        Some(a) => println!("applied     generation {} ({})", a.generation, a.digest),
        None => println!("applied     nothing yet"),
    }
    let pending = std::fs::read_dir(state.spool())
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter(|e| e.file_name().to_string_lossy().ends_with(".json"))
                .count()
        })
        .unwrap_or(0);
    println!("spooled     {pending} report(s) not yet delivered");
    if let Ok(b) = std::fs::read(state.last_report()) {
        let r: hiveseed_proto::StatusReport = serde_json::from_slice(&b)?;
        println!("last report #{} at {}: {}", r.seq, r.at, r.phase.label());
        for c in &r.checks {
            println!(
                "  {:<6} {:<28} expected {:?} got {:?}",
                c.status.as_str(),
                c.check,
                c.expected,
                c.got
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod exit_code_tests {
    use super::*;
    use crate::client::ClientError;
    use hiveseed_proto::api::ErrorKind;

    fn refused(kind: ErrorKind, status: u16) -> anyhow::Error {
        anyhow::Error::new(ClientError::Refused {
            status,
            kind,
            message: "m".into(),
            retry_after: None,
        })
        .context("enrollment refused")
    }

    #[test]
    fn a_failed_attestation_is_permanent_an_unavailable_one_retryable() {
        assert_eq!(
            exit_code(&refused(ErrorKind::AttestationFailed, 403)),
            EXIT_PERMANENT
        );
        assert_eq!(
            exit_code(&refused(ErrorKind::BadToken, 401)),
            EXIT_PERMANENT
        );
        assert_eq!(
            exit_code(&refused(ErrorKind::AttestationUnavailable, 503)),
            EXIT_RETRYABLE
        );
        assert_eq!(
            exit_code(&anyhow::Error::new(ClientError::Unreachable("x".into()))),
            EXIT_RETRYABLE
        );
    }
}
