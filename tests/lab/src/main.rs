//! `lab`: builds the lab cache and brings lab nodes up and down by hand.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use hiveseed_lab::{Cache, Lab, NodeName};

#[derive(Debug, Parser)]
#[command(name = "lab", about = "hiveseed local lab")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Bring a whole fleet up from clean, as `terraform apply` would: seeder, rendered user_data,
    /// one chroot per node booted from it. Waits until converged, then prints `seeder status`
    /// and the validation report (exit status = the report's).
    Up {
        #[arg(long, default_value = "/var/tmp/hiveseed-lab")]
        dir: PathBuf,
        #[arg(long, default_value = "roles/fleet.lab.toml")]
        fleet: PathBuf,
        #[arg(long, default_value = "roles")]
        roles: PathBuf,
        #[arg(long, default_value = "terraform")]
        terraform: PathBuf,
        #[arg(long, default_value = "target/release/seeder")]
        seeder: PathBuf,
        #[arg(
            long,
            default_value = "target/x86_64-unknown-linux-gnu/agent/bootstrap"
        )]
        bootstrap: PathBuf,
        /// Also serve ai-memory and the MiniLM files (the reference roles need them).
        #[arg(long)]
        with_ai_memory: bool,
        /// Seconds to wait for convergence.
        #[arg(long, default_value_t = 900)]
        timeout: u64,
    },
    /// The acceptance scenarios, in order, on one lab: bring-up (timed, from clean), the fleet
    /// suite (`seeder test`), secrets,
    /// redeploy, replace, faults (agent killed mid-apply, pg node rebooted, seeder killed during
    /// a second bring-up). Prints every check and a table; exit status 0 iff none failed.
    /// The lab stays up afterwards (`lab down` stops it).
    Scenarios {
        #[arg(long, default_value = "/var/tmp/hiveseed-lab")]
        dir: PathBuf,
        #[arg(long, default_value = "roles/fleet.lab.toml")]
        fleet: PathBuf,
        #[arg(long, default_value = "roles")]
        roles: PathBuf,
        #[arg(long, default_value = "terraform")]
        terraform: PathBuf,
        #[arg(long, default_value = "target/release/seeder")]
        seeder: PathBuf,
        #[arg(
            long,
            default_value = "target/x86_64-unknown-linux-gnu/agent/bootstrap"
        )]
        bootstrap: PathBuf,
        /// Only these scenarios (bring-up always runs first).
        #[arg(long, value_delimiter = ',')]
        only: Vec<Scenario>,
        /// Seconds to wait for each convergence.
        #[arg(long, default_value_t = 600)]
        timeout: u64,
    },
    /// The lab's stand-in for DigitalOcean's API (`GET /v2/droplets/{id}`), answering from the
    /// lab's droplet table; `lab up` starts it when the fleet has `[attestation]`.
    DoApi {
        #[arg(long, default_value = "/var/tmp/hiveseed-lab")]
        dir: PathBuf,
        /// The bearer token it accepts (the campaign's secrets/do-api-token).
        #[arg(long)]
        token_file: PathBuf,
    },
    /// `seeder status` of a running lab.
    Status {
        #[arg(long, default_value = "/var/tmp/hiveseed-lab")]
        dir: PathBuf,
        #[arg(long, default_value = "target/release/seeder")]
        seeder: PathBuf,
    },
    /// Build whatever is missing in the cache ($HIVESEED_CACHE or /var/cache/hiveseed).
    Cache {
        /// Only these entries (rootfs, ai-memory, minilm); default all.
        #[arg(long, value_delimiter = ',')]
        only: Vec<Entry>,
    },
    /// Bring up a node: overlay on the base plus proc, /dev, /dev/shm and /run mounts.
    NodeUp {
        name: NodeName,
        /// Base rootfs (default: the cached one; run `lab cache` first).
        #[arg(long)]
        base: Option<PathBuf>,
        #[arg(long)]
        dir: PathBuf,
    },
    /// Run a command inside a node (foreground, or --background with output to --log).
    NodeRun {
        name: NodeName,
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, requires = "log")]
        background: bool,
        #[arg(long)]
        log: Option<PathBuf>,
        /// `user[:group]` inside the node.
        #[arg(long)]
        user: Option<String>,
        #[arg(last = true, required = true)]
        argv: Vec<String>,
    },
    /// Stop one node's processes and unmount it.
    NodeDown {
        name: NodeName,
        #[arg(long)]
        dir: PathBuf,
    },
    /// Stop every node's processes, unmount everything under <dir>/nodes, remove the state.
    Down {
        #[arg(long)]
        dir: PathBuf,
        /// Also delete the node directories (upper dirs).
        #[arg(long)]
        purge: bool,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Scenario {
    Suite,
    Secrets,
    Redeploy,
    Hostile,
    StolenToken,
    Replace,
    Faults,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Entry {
    Rootfs,
    AiMemory,
    Minilm,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("lab: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.cmd {
        Cmd::Cache { only } => cache(&only)?,
        Cmd::NodeUp { name, base, dir } => {
            let base = match base {
                Some(b) => b,
                None => {
                    Cache::from_env()
                        .find_rootfs()
                        .context("no cached base rootfs: run `lab cache` or pass --base")?
                        .root
                }
            };
            let node = Lab::open(&dir)?.node_up(&name, &base)?;
            println!("{}", node.root().display());
        }
        Cmd::NodeRun {
            name,
            dir,
            background,
            log,
            user,
            argv,
        } => {
            let node = Lab::open(&dir)?.node(&name)?;
            let mut cmd = node.command(&argv);
            if let Some(u) = user {
                cmd = cmd.user(u);
            }
            match (background, log) {
                (true, Some(log)) => println!("{}", cmd.spawn_background(&log)?.pid),
                _ => {
                    let status = cmd.status()?;
                    let code = status.code().unwrap_or(1).clamp(0, 255) as u8;
                    return Ok(ExitCode::from(code));
                }
            }
        }
        Cmd::DoApi { dir, token_file } => hiveseed_lab::cloud::serve(&dir, &token_file)?,
        Cmd::NodeDown { name, dir } => println!("{}", Lab::open(&dir)?.node_down(&name)?),
        Cmd::Down { dir, purge } => {
            if !dir.exists() {
                println!("{}: no such lab dir, nothing to do", dir.display());
                return Ok(ExitCode::SUCCESS);
            }
            // The seeder first, then every node.
            let report = hiveseed_lab::fleet::down(&dir)?;
            println!("{report}");
            if purge {
                println!("{}", Lab::open(&dir)?.purge()?);
            }
        }
        Cmd::Up {
            dir,
            fleet,
            roles,
            terraform,
            seeder,
            bootstrap,
            with_ai_memory,
            timeout,
        } => {
            let abs = |p: PathBuf| {
                std::fs::canonicalize(&p).map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))
            };
            let cfg = hiveseed_lab::fleet::UpConfig {
                lab_dir: dir,
                fleet_file: abs(fleet)?,
                roles_dir: abs(roles)?,
                terraform_dir: abs(terraform)?,
                seeder_bin: abs(seeder)?,
                bootstrap_bin: abs(bootstrap)?,
                with_ai_memory,
            };
            let f = hiveseed_lab::fleet::up(&cfg)?;
            for (phase, took) in &f.phases {
                println!("{phase:<24} {:>6.1}s", took.as_secs_f64());
            }
            println!(
                "{} nodes booted from their rendered user_data; waiting for convergence",
                f.nodes.len()
            );
            let green = f.wait_converged(std::time::Duration::from_secs(timeout))?;
            println!(
                "first agent start -> fleet converged: {:.1}s",
                green.as_secs_f64()
            );
            println!("command-line sampler: {}", f.cmdlines.stats());
            let status = f.seeder_cmd(&["status"]).output()?;
            print!("{}", String::from_utf8_lossy(&status.stdout));
            // Node checks are re-run every report interval: a check taken just before the last
            // node converged (a peer's tables not migrated yet) is retaken within seconds.
            let (green, report) =
                hiveseed_lab::scenario::report_green(&f, std::time::Duration::from_secs(60));
            print!("{report}");
            return Ok(if green {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            });
        }
        Cmd::Scenarios {
            dir,
            fleet,
            roles,
            terraform,
            seeder,
            bootstrap,
            only,
            timeout,
        } => {
            let abs = |p: PathBuf| {
                std::fs::canonicalize(&p).map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))
            };
            let cfg = hiveseed_lab::fleet::UpConfig {
                lab_dir: dir.clone(),
                fleet_file: abs(fleet)?,
                roles_dir: abs(roles)?,
                terraform_dir: abs(terraform)?,
                seeder_bin: abs(seeder)?,
                bootstrap_bin: abs(bootstrap)?,
                with_ai_memory: true,
            };
            let record = scenarios(&cfg, &only, std::time::Duration::from_secs(timeout));
            print!("{}", record.table());
            let path = dir.join("scenarios.txt");
            std::fs::write(&path, record.table())?;
            println!("table: {}", path.display());
            return Ok(if record.failed() == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            });
        }
        Cmd::Status { dir, seeder } => {
            let out = std::process::Command::new(seeder)
                .args(["status", "--dir"])
                .arg(dir.join("campaign"))
                .output()?;
            print!("{}", String::from_utf8_lossy(&out.stdout));
            eprint!("{}", String::from_utf8_lossy(&out.stderr));
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Runs the scenarios; a scenario that errors out (rather than failing a check) is recorded as
/// a failed check and the rest still run where they can.
fn scenarios(
    cfg: &hiveseed_lab::fleet::UpConfig,
    only: &[Scenario],
    timeout: std::time::Duration,
) -> hiveseed_lab::scenario::Record {
    use hiveseed_lab::scenario as sc;
    let want = |s| only.is_empty() || only.contains(&s);
    let mut rec = sc::Record::default();
    let took = |rec: &mut sc::Record, name: &str, started: std::time::Instant| {
        rec.note(format!(
            "scenario {name:<44} took {:>6.1}s",
            started.elapsed().as_secs_f64()
        ));
    };
    println!("== bring-up");
    let started = std::time::Instant::now();
    let fleet = match sc::bring_up(cfg, &mut rec, timeout) {
        Ok(f) => f,
        Err(e) => {
            rec.error("bring-up", &e);
            return rec;
        }
    };
    took(&mut rec, "bring-up", started);
    type Step =
        fn(&hiveseed_lab::fleet::Fleet, &mut sc::Record, std::time::Duration) -> anyhow::Result<()>;
    let steps: [(Scenario, &'static str, &str, Step); 9] = [
        (Scenario::Suite, "suite", "suite", |f, r, _| sc::suite(f, r)),
        (Scenario::Secrets, "llm key", "llm key", |f, r, _| {
            sc::llm_key(f, r)
        }),
        (Scenario::Secrets, "secrets", "secrets", |f, r, _| {
            sc::secrets(f, r)
        }),
        (Scenario::Redeploy, "redeploy", "redeploy", |f, r, _| {
            sc::redeploy(f, r)
        }),
        (
            Scenario::Hostile,
            "hostile",
            "hostile service",
            |f, r, _| sc::hostile_service(f, r),
        ),
        (
            Scenario::StolenToken,
            "stolen token",
            "stolen token",
            |f, r, _| sc::stolen_token(f, r),
        ),
        (Scenario::Replace, "replace", "replace", sc::replace),
        (
            Scenario::Faults,
            "faults",
            "faults (agent killed mid-apply)",
            |f, r, _| sc::agent_killed(f, r),
        ),
        (
            Scenario::Faults,
            "faults",
            "faults (pg node rebooted)",
            |f, r, _| sc::pg_rebooted(f, r),
        ),
    ];
    for (s, name, title, step) in steps {
        if want(s) {
            println!("== {title}");
            let started = std::time::Instant::now();
            if let Err(e) = step(&fleet, &mut rec, timeout) {
                rec.error(name, &e);
            }
            took(&mut rec, title, started);
        }
    }
    // The second bring-up has its own sampler.
    fleet.cmdlines.stop();
    if want(Scenario::Faults) {
        let title = "faults (seeder killed during a second bring-up)";
        println!("== {title}");
        let started = std::time::Instant::now();
        if let Err(e) = sc::seeder_killed(cfg, &mut rec, timeout) {
            rec.error("faults", &e);
        }
        took(&mut rec, title, started);
    }
    rec
}

fn cache(only: &[Entry]) -> Result<()> {
    let cache = Cache::from_env();
    let want = |e| only.is_empty() || only.contains(&e);
    println!("cache: {}", cache.root().display());
    if want(Entry::Rootfs) {
        let (base, outcome) = cache.ensure_rootfs()?;
        let versions: Vec<String> = base
            .manifest
            .packages
            .iter()
            .map(|(p, v)| format!("{p}={v}"))
            .collect();
        println!(
            "rootfs     {outcome:<16} {}  [{}]",
            base.root.display(),
            versions.join(" ")
        );
    }
    if want(Entry::AiMemory) {
        let (bin, outcome) = cache.ensure_ai_memory()?;
        println!(
            "ai-memory  {outcome:<16} {}  sha256={}",
            bin.bin.display(),
            bin.sha256
        );
    }
    if want(Entry::Minilm) {
        let (m, outcome) = cache.ensure_minilm()?;
        println!(
            "minilm     {outcome:<16} {}  ({} {})",
            m.dir.display(),
            m.manifest.package,
            m.manifest.version
        );
    }
    Ok(())
}
