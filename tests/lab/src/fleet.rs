//! Bringing a whole fleet up on one machine, the way `terraform apply` would on DigitalOcean:
//! `seeder init` + artifacts + `seeder serve` on 127.0.9.1, `seeder tfvars`, the provider-less
//! Terraform module renders every node's user_data, and each node boots from exactly that: its
//! `write_files` land in the node root, its `runcmd` runs inside the chroot (which fetches
//! `bootstrap` from the seeder and runs it). A facts file stands in for the metadata service.
//! Nothing else is done to a node from outside: the cloud-config player implements exactly the
//! keys the user_data uses, as cloud-init does on a Debian droplet, and refuses any other key.
//!
//! One lab-only substitution in the campaign: the fleet file's `[pins.ai_memory] sha256` becomes
//! the sha256 of the cache's own ai-memory build ([`pin_ai_memory`]), because a cargo build is not
//! byte-reproducible across machines; a real fleet pins the binary its operator built.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::Deserialize;

use crate::cache::Cache;
use crate::node::{Lab, Node, NodeName};

/// Where the seeder listens in the lab.
pub const SEEDER_LISTEN: &str = "127.0.9.1:8443";

type Result<T> = anyhow::Result<T>;

fn step(what: impl Into<String>, message: impl std::fmt::Display) -> anyhow::Error {
    anyhow::anyhow!("{}: {message}", what.into())
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> anyhow::Error {
    let what = what.into();
    move |source| anyhow::Error::new(source).context(what)
}

/// What `up` needs: the repository (roles, terraform), the fleet file, and the two binaries.
#[derive(Debug, Clone)]
pub struct UpConfig {
    pub lab_dir: PathBuf,
    pub fleet_file: PathBuf,
    pub roles_dir: PathBuf,
    pub terraform_dir: PathBuf,
    pub seeder_bin: PathBuf,
    /// The static agent binary served to nodes.
    pub bootstrap_bin: PathBuf,
    /// Add the ai-memory binary and the MiniLM files as artifacts (the reference roles use them).
    pub with_ai_memory: bool,
}

/// Per node: where it lives and how it is addressed.
#[derive(Debug, Clone)]
pub struct BootedNode {
    pub name: String,
    pub role: String,
    pub region: String,
    pub public_ip: Ipv4Addr,
    pub private_ip: Ipv4Addr,
    pub root: PathBuf,
    pub console_log: PathBuf,
    /// What the metadata service would answer (written to /etc/hiveseed/facts.json).
    pub facts: serde_json::Value,
    /// Its user_data, as Terraform rendered it.
    cloud_config: CloudConfig,
}

#[derive(Debug)]
pub struct Fleet {
    pub lab: Lab,
    pub campaign_dir: PathBuf,
    pub seeder_bin: PathBuf,
    pub seeder_pid: u32,
    /// The campaign's name (its droplets' tag).
    pub campaign: String,
    /// The lab's copy of the fleet file (what `seeder publish` reads).
    pub fleet_file: PathBuf,
    /// The base rootfs every node overlays.
    pub base: PathBuf,
    /// Every node's rendered user_data (cloud-config text), by name.
    pub user_data: BTreeMap<String, String>,
    pub nodes: Vec<BootedNode>,
    /// When the first node's runcmd started.
    pub boot_started: Instant,
    /// The same moment on the wall clock (to compare with log timestamps).
    pub boot_started_wall: std::time::SystemTime,
    pub phases: Vec<(String, Duration)>,
    /// Every command line in the lab, sampled from the first boot on (the `secrets` scan).
    pub cmdlines: crate::cmdlines::Sampler,
}

#[derive(Debug, Deserialize)]
struct Tfvars {
    nodes: BTreeMap<String, TfNode>,
}

#[derive(Debug, Deserialize)]
struct TfNode {
    role: String,
    region: String,
}

/// The cloud-config keys the lab plays; any other key is refused rather than ignored.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct CloudConfig {
    #[serde(default)]
    hostname: Option<String>,
    /// cloud-init's `update_etc_hosts`: `true` (or `"template"`) renders /etc/hosts.
    #[serde(default)]
    manage_etc_hosts: Option<serde_json::Value>,
    #[serde(default)]
    write_files: Vec<WriteFile>,
    #[serde(default)]
    runcmd: Vec<Vec<String>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct WriteFile {
    path: String,
    content: String,
    #[serde(default)]
    permissions: Option<String>,
    #[serde(default)]
    owner: Option<String>,
    #[serde(default)]
    encoding: Option<String>,
}

/// Runs a host command; the error carries argv, status and stderr.
fn run(what: &str, cmd: &mut Command) -> Result<String> {
    let out = cmd.output().map_err(io(format!("{what}: spawning")))?;
    if !out.status.success() {
        return Err(step(
            what,
            format!(
                "{}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `terraform <args...>` in the lab's render workspace `render`, offline.
fn terraform(render: &Path, args: &[&str]) -> Command {
    let mut c = Command::new("terraform");
    c.args(args)
        .current_dir(render)
        .env("TF_CLI_CONFIG_FILE", "/dev/null")
        .env("TF_IN_AUTOMATION", "1");
    c
}

/// `seeder <sub> --dir <campaign> <rest...>` (`artifact add` is two words).
fn seeder(cfg_bin: &Path, campaign: &Path, args: &[&str]) -> Command {
    let words = if args.first() == Some(&"artifact") {
        2
    } else {
        1
    };
    let (sub, rest) = args.split_at(words.min(args.len()));
    let mut c = Command::new(cfg_bin);
    c.args(sub).arg("--dir").arg(campaign).args(rest);
    c
}

/// Region number (1-based, sorted by name) and node number for the lab's address plan:
/// pg .10, peers .11.., agents .21.., ctrl .31.. — private 127.0.R.N, public 127.1.R.N.
pub fn address_plan(nodes: &BTreeMap<String, (String, String)>) -> BTreeMap<String, (u8, u8)> {
    let mut regions: Vec<&String> = nodes.values().map(|(_, r)| r).collect();
    regions.sort();
    regions.dedup();
    let mut out = BTreeMap::new();
    for (name, (role, region)) in nodes {
        let r = regions.iter().position(|x| *x == region).unwrap_or(0) as u8 + 1;
        let index: u8 = name
            .rsplit('-')
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or(1);
        let n = match role.as_str() {
            "pg" => 10,
            "peer" => 10 + index,
            "agent" => 20 + index,
            _ => 30 + index,
        };
        out.insert(name.clone(), (r, n));
    }
    out
}

/// `seeder serve` on the lab's seeder address, in its own process group, log appended to
/// `<lab>/seeder.log`; returns once it listens.
fn start_seeder(lab_dir: &Path, seeder_bin: &Path, campaign: &Path) -> Result<u32> {
    let addr: SocketAddr = SEEDER_LISTEN.parse().expect("static");
    // A predecessor's exit can be reported while its other threads still hold the listening
    // socket; whatever answers here before we start is not ours.
    crate::wait::until(
        "the seeder's address to be free",
        Duration::from_secs(10),
        || TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err(),
    )
    .map_err(|e| step("seeder serve", e))?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(lab_dir.join("seeder.log"))
        .map_err(io("seeder log"))?;
    let mut child = Command::new(seeder_bin)
        .args([
            "serve",
            "--listen",
            SEEDER_LISTEN,
            "--mesh-deadline",
            "120",
            "--dir",
        ])
        .arg(campaign)
        .stdin(Stdio::null())
        .stdout(log.try_clone().map_err(io("seeder log"))?)
        .stderr(log)
        .process_group(0)
        .spawn()
        .map_err(io("starting seeder serve"))?;
    let pid = child.id();
    std::fs::write(lab_dir.join("seeder.pid"), pid.to_string()).map_err(io("seeder.pid"))?;
    let mut exited = None;
    crate::wait::until("the seeder to listen", Duration::from_secs(30), || {
        let listening = TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok();
        // Only this child counts: an answer while it has already exited came from another.
        if let Ok(Some(st)) = child.try_wait() {
            exited = Some(st);
            return true;
        }
        listening
    })
    .map_err(|e| step("seeder serve", e))?;
    match exited {
        None => Ok(pid),
        Some(st) => Err(step(
            "seeder serve",
            format!(
                "exited at start ({st}); see {}",
                lab_dir.join("seeder.log").display()
            ),
        )),
    }
}

/// Brings a fleet up from clean. Any earlier lab in `lab_dir` is torn down first.
pub fn up(cfg: &UpConfig) -> Result<Fleet> {
    let mut phases = Vec::new();
    let t = Instant::now();
    let cache = Cache::from_env();
    let (base, _) = cache.ensure_rootfs()?;
    let lab = Lab::open(&cfg.lab_dir)?;
    down(&cfg.lab_dir)?;
    // From clean: no node disk survives from an earlier lab.
    lab.purge()?;
    let campaign = lab.dir().join("campaign");
    let _ = std::fs::remove_dir_all(&campaign);
    let fleet = lab.dir().join("fleet.toml");
    let mut fleet_text =
        std::fs::read_to_string(&cfg.fleet_file).map_err(io("reading the fleet file"))?;
    let ai_memory = if cfg.with_ai_memory {
        let (am, _) = cache.ensure_ai_memory()?;
        fleet_text = pin_ai_memory(&fleet_text, &am.sha256)?;
        tracing::info!(sha256 = %am.sha256, "lab only: pins.ai_memory.sha256 is the cache's build");
        Some(am)
    } else {
        None
    };
    std::fs::write(&fleet, fleet_text).map_err(io("writing the lab's fleet file"))?;
    run(
        "seeder init",
        Command::new(&cfg.seeder_bin)
            .arg("init")
            .arg("--fleet")
            .arg(&fleet)
            .arg("--roles")
            .arg(&cfg.roles_dir)
            .arg("--dir")
            .arg(&campaign),
    )?;
    let spec = hiveseed_seeder::fleet::Fleet::load(&fleet).map_err(|e| step("fleet", e))?;
    let campaign_name = spec.campaign.to_string();
    let add = |name: &str, file: &Path| -> Result<()> {
        run(
            &format!("seeder artifact add {name}"),
            seeder(
                &cfg.seeder_bin,
                &campaign,
                &["artifact", "add", "--name", name],
            )
            .arg(file),
        )
        .map(|_| ())
    };
    add("bootstrap", &cfg.bootstrap_bin)?;
    if let Some(am) = &ai_memory {
        add("ai-memory", &am.bin)?;
        let (minilm, _) = cache.ensure_minilm()?;
        for (name, file) in [
            ("minilm-config", "config.json"),
            ("minilm-tokenizer", "tokenizer.json"),
            ("minilm-model", "model.safetensors"),
        ] {
            add(name, &minilm.dir.join(file))?;
        }
    }
    phases.push(("campaign + artifacts".to_string(), t.elapsed()));

    // The seeder, on the host, on its own address; with attestation on, the cloud's API
    // first (the seeder asks it at every enrollment), with a read-only token of the operator's.
    let t = Instant::now();
    crate::cloud::stop_api(lab.dir());
    let _ = std::fs::remove_file(crate::cloud::table_path(lab.dir()));
    if spec.attestation.is_some() {
        let token_file = campaign.join("secrets/do-api-token");
        crate::cloud::mint_api_token(&token_file)?;
        crate::cloud::start_api(lab.dir(), &token_file)?;
    }
    let seeder_pid = start_seeder(lab.dir(), &cfg.seeder_bin, &campaign)?;
    phases.push(("seeder up".to_string(), t.elapsed()));

    // Terraform renders every node's user_data from the seeder's tfvars.
    let t = Instant::now();
    let tf = lab.dir().join("terraform");
    let _ = std::fs::remove_dir_all(&tf);
    for sub in ["render", "modules"] {
        copy_dir(&cfg.terraform_dir.join(sub), &tf.join(sub))?;
    }
    let tfvars = tf.join("render/nodes.auto.tfvars.json");
    run(
        "seeder tfvars",
        seeder(&cfg.seeder_bin, &campaign, &["tfvars", "--out"]).arg(&tfvars),
    )?;
    let terraform = |args: &[&str]| terraform(&tf.join("render"), args);
    run(
        "terraform init",
        &mut terraform(&["init", "-input=false", "-no-color"]),
    )?;
    run(
        "terraform apply",
        &mut terraform(&["apply", "-auto-approve", "-input=false", "-no-color"]),
    )?;
    let decoded = run(
        "terraform output",
        &mut terraform(&["output", "-json", "user_data_decoded"]),
    )?;
    let user_data: BTreeMap<String, CloudConfig> =
        serde_json::from_str(&decoded).map_err(|e| step("parsing rendered user_data", e))?;
    let tv: Tfvars = serde_json::from_slice(&std::fs::read(&tfvars).map_err(io("reading tfvars"))?)
        .map_err(|e| step("parsing tfvars", e))?;
    phases.push(("terraform render".to_string(), t.elapsed()));

    // Boot every node from its user_data.
    let t = Instant::now();
    let roles: BTreeMap<String, (String, String)> = tv
        .nodes
        .iter()
        .map(|(n, v)| (n.clone(), (v.role.clone(), v.region.clone())))
        .collect();
    let plan = address_plan(&roles);
    // Service accounts leave from their node's private address (see route.rs).
    let mut routes = Vec::new();
    for n in &spec.nodes {
        if let (Some(uid), Some(&(r, num))) = (n.service_uid, plan.get(n.name.as_str())) {
            let addr = crate::addr::NodeAddr::new(r, num).map_err(|e| step("address plan", e))?;
            routes.push(crate::route::UidRoute {
                uid,
                source: addr.private(),
            });
        }
    }
    crate::route::setup(lab.dir(), &routes)?;
    let cmdlines = crate::cmdlines::Sampler::start(crate::cmdlines::Scope {
        roots_under: lab.dir().to_path_buf(),
        children_of: Some(std::process::id() as i32),
    })
    .map_err(io("starting the command-line sampler"))?;
    let boot_started = Instant::now();
    let boot_started_wall = std::time::SystemTime::now();
    let mut nodes = Vec::new();
    for (name, cc) in &user_data {
        let (role, region) = roles
            .get(name)
            .cloned()
            .ok_or_else(|| step("user_data", format!("{name} is not in the tfvars")))?;
        let (r, n) = plan[name];
        let addr = crate::addr::NodeAddr::new(r, n).map_err(|e| step("address plan", e))?;
        let facts = serde_json::json!({
            "droplet_id": u64::from(r) * 1000 + u64::from(n),
            "region": region,
            "public_ipv4": addr.public().to_string(),
            "private_ipv4": addr.private().to_string(),
        });
        let node = BootedNode {
            name: name.clone(),
            role,
            region,
            public_ip: addr.public(),
            private_ip: addr.private(),
            root: lab.nodes_dir().join(name).join("root"),
            console_log: lab.nodes_dir().join(name).join("console.log"),
            facts,
            cloud_config: cc.clone(),
        };
        boot_node(&lab, &base.root, &campaign_name, &node)?;
        nodes.push(node);
    }
    phases.push(("nodes booted".to_string(), t.elapsed()));
    let user_data_text = serde_json::from_str::<BTreeMap<String, String>>(&run(
        "terraform output",
        &mut terraform(&["output", "-json", "user_data"]),
    )?)
    .map_err(|e| step("parsing user_data", e))?;
    Ok(Fleet {
        lab,
        campaign_dir: campaign,
        seeder_bin: cfg.seeder_bin.clone(),
        seeder_pid,
        campaign: campaign_name,
        fleet_file: fleet,
        base: base.root.clone(),
        user_data: user_data_text,
        nodes,
        boot_started,
        boot_started_wall,
        phases,
        cmdlines,
    })
}

/// The fleet file with `[pins.ai_memory] sha256` set to `sha256`, every other byte kept (the
/// lab-only substitution: the pin is the cache's build, see the module doc).
pub fn pin_ai_memory(fleet_text: &str, sha256: &str) -> Result<String> {
    set_toml_value(
        fleet_text,
        "pins.ai_memory",
        "sha256",
        &format!("\"{sha256}\""),
    )
}

/// Rewrites the first `key = value` line under `[section]` of a TOML text, keeping every other
/// line; an error if there is none.
pub fn set_toml_value(text: &str, section: &str, key: &str, value: &str) -> Result<String> {
    let mut out = String::with_capacity(text.len());
    let mut in_section = false;
    let mut done = false;
    for line in text.lines() {
        let t = line.trim();
        if t.starts_with('[') {
            in_section = t == format!("[{section}]");
        }
        let is_key = t.split('=').next().map(str::trim) == Some(key);
        if in_section && !done && is_key {
            out.push_str(&format!("{key} = {value}\n"));
            done = true;
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    if !done {
        return Err(step("fleet file", format!("no {key} under [{section}]")));
    }
    Ok(out)
}

/// A fresh node from its user_data: overlay, facts file in place of the metadata service, then
/// its cloud-config.
/// Creates the droplet `n` (the cloud's record of it, which its API answers from) and boots it.
fn boot_node(lab: &Lab, base: &Path, campaign: &str, n: &BootedNode) -> Result<()> {
    let node_name: NodeName = n.name.parse()?;
    crate::cloud::create(
        lab.dir(),
        hiveseed_do_api::Droplet {
            id: n.facts["droplet_id"]
                .as_u64()
                .ok_or_else(|| step(&n.name, "facts without a droplet_id"))?,
            name: n.name.clone(),
            region: n.region.clone(),
            public_ipv4: n.public_ip,
            private_ipv4: n.private_ip,
            tags: crate::cloud::tags(campaign, &n.role, &n.region),
            created_at: crate::cloud::now_rfc3339(),
        },
    )?;
    let node = lab.node_up(&node_name, base)?;
    node.write_file(
        "/etc/hiveseed/facts.json",
        n.facts.to_string().as_bytes(),
        0o644,
    )?;
    // The metadata service's hostname (a droplet's is its name) is where cloud-init takes the
    // fqdn from when the cloud-config's hostname has no dot.
    boot(&node, &n.cloud_config, &n.name)?;
    Ok(())
}

/// /etc/hosts as cloud-init renders it for `manage_etc_hosts: true` on Debian (its template
/// `hosts.debian.tmpl`): the node's names on 127.0.1.1, then localhost.
fn etc_hosts(fqdn: &str, hostname: &str) -> String {
    format!(
        "# manage_etc_hosts: cloud-init rewrites this file from hosts.debian.tmpl on every boot.\n\
         127.0.1.1 {fqdn} {hostname}\n\
         127.0.0.1 localhost\n\
         \n\
         ::1 localhost ip6-localhost ip6-loopback\n\
         ff02::1 ip6-allnodes\n\
         ff02::2 ip6-allrouters\n"
    )
}

/// Whether `manage_etc_hosts` asks for the template (`true` or `"template"`); `false` or absent
/// leaves /etc/hosts alone. `"localhost"` (update one line of an existing file) is not played.
fn manages_etc_hosts(value: Option<&serde_json::Value>) -> Result<bool> {
    match value {
        None | Some(serde_json::Value::Bool(false)) => Ok(false),
        Some(serde_json::Value::Bool(true)) => Ok(true),
        Some(serde_json::Value::String(s)) if s == "template" => Ok(true),
        Some(other) => Err(step(
            "cloud-config manage_etc_hosts",
            format!("{other} is not played by the lab"),
        )),
    }
}

/// Plays a node's cloud-config in cloud-init's module order on Debian: write_files,
/// set_hostname (/etc/hostname: the kernel hostname is the host's, all chroots share one UTS
/// namespace), update_etc_hosts, then runcmd in the background (the final stage), output to the
/// node's console log. `metadata_hostname` is what the metadata service would answer.
fn boot(node: &Node, cc: &CloudConfig, metadata_hostname: &str) -> Result<PathBuf> {
    let manage_hosts = manages_etc_hosts(cc.manage_etc_hosts.as_ref())?;
    for f in &cc.write_files {
        let bytes = match f.encoding.as_deref() {
            None | Some("text/plain") => f.content.clone().into_bytes(),
            Some("b64") | Some("base64") => {
                use base64::Engine;
                base64::engine::general_purpose::STANDARD
                    .decode(f.content.trim())
                    .map_err(|e| step(format!("write_files {}", f.path), e))?
            }
            Some(other) => {
                return Err(step(
                    format!("write_files {}", f.path),
                    format!("encoding {other} unsupported"),
                ))
            }
        };
        let mode = match &f.permissions {
            Some(p) => u32::from_str_radix(p.trim_start_matches("0o"), 8)
                .map_err(|e| step(format!("write_files {} permissions", f.path), e))?,
            None => 0o644,
        };
        if let Some(owner) = &f.owner {
            if owner != "root:root" && owner != "root" {
                return Err(step(
                    format!("write_files {}", f.path),
                    format!("owner {owner} unsupported in the lab"),
                ));
            }
        }
        node.write_file(&f.path, &bytes, mode)?;
    }
    let hostname = cc.hostname.as_deref().unwrap_or(metadata_hostname);
    if cc.hostname.is_some() {
        node.write_file("/etc/hostname", format!("{hostname}\n").as_bytes(), 0o644)?;
    }
    if manage_hosts {
        // A dotted hostname is its own fqdn; else the metadata service's name is.
        let (fqdn, short) = match hostname.split_once('.') {
            Some((short, _)) => (hostname, short),
            None => (metadata_hostname, hostname),
        };
        node.write_file("/etc/hosts", etc_hosts(fqdn, short).as_bytes(), 0o644)?;
    }
    let console = node.dir().join("console.log");
    // cloud-init runs runcmd as one script; each entry is an argv list.
    let mut script = String::from("set -e\n");
    for argv in &cc.runcmd {
        let quoted: Vec<String> = argv
            .iter()
            .map(|a| format!("'{}'", a.replace('\'', "'\\''")))
            .collect();
        script.push_str(&quoted.join(" "));
        script.push('\n');
    }
    node.write_file(
        "/var/lib/cloud/instance/scripts/runcmd",
        script.as_bytes(),
        0o700,
    )?;
    node.command(["/bin/sh", "/var/lib/cloud/instance/scripts/runcmd"])
        .env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        )
        .env("HOME", "/root")
        .env("LANG", "C.UTF-8")
        .spawn_background(&console)?;
    Ok(console)
}

fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to).map_err(io(format!("creating {}", to.display())))?;
    for e in std::fs::read_dir(from).map_err(io(format!("reading {}", from.display())))? {
        let e = e.map_err(io("reading a directory entry"))?;
        let name = e.file_name();
        if name.to_string_lossy().starts_with(".terraform") {
            continue;
        }
        let (src, dst) = (e.path(), to.join(&name));
        if e.file_type().map_err(io("file type"))?.is_dir() {
            copy_dir(&src, &dst)?;
        } else {
            std::fs::copy(&src, &dst).map_err(io(format!("copying {}", src.display())))?;
        }
    }
    Ok(())
}

/// Stops the seeder and every node process, unmounts everything. Safe to run twice.
pub fn down(lab_dir: &Path) -> Result<crate::node::DownReport> {
    let lab = Lab::open(lab_dir)?;
    crate::procs::stop_recorded(&lab.dir().join("seeder.pid"), Duration::from_secs(10));
    crate::cloud::stop_api(lab.dir());
    let report = lab.down()?;
    crate::route::teardown(lab.dir())?;
    Ok(report)
}

impl Fleet {
    pub fn seeder_cmd(&self, args: &[&str]) -> Command {
        seeder(&self.seeder_bin, &self.campaign_dir, args)
    }

    /// [`Fleet::boot_started_wall`] in seconds since the epoch.
    pub fn boot_started_unix(&self) -> f64 {
        self.boot_started_wall
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0)
    }

    pub fn node(&self, name: &str) -> Result<&BootedNode> {
        self.nodes
            .iter()
            .find(|n| n.name == name)
            .ok_or_else(|| step("lab", format!("no node {name}")))
    }

    /// Names of the nodes with `role`, sorted.
    pub fn with_role(&self, role: &str) -> Vec<&BootedNode> {
        self.nodes.iter().filter(|n| n.role == role).collect()
    }

    /// `seeder status --json`.
    pub fn status(&self) -> Result<serde_json::Value> {
        let out = run("seeder status", &mut self.seeder_cmd(&["status", "--json"]))?;
        serde_json::from_str(&out).map_err(|e| step("parsing seeder status --json", e))
    }

    /// One node's entry of the fleet view.
    pub fn node_status(status: &serde_json::Value, name: &str) -> Option<serde_json::Value> {
        status["nodes"]
            .as_array()?
            .iter()
            .find(|n| n["name"] == name)
            .cloned()
    }

    /// `seeder report`: whether every check passed, and its output.
    /// `seeder report`: with `fleet_probes`, also the federation write and convergence rows
    /// (a memory written and deleted), else only what the nodes reported.
    pub fn report(&self, fleet_probes: bool) -> Result<(bool, String)> {
        let args: &[&str] = if fleet_probes {
            &["report"]
        } else {
            &["report", "--node-checks-only"]
        };
        let out = self
            .seeder_cmd(args)
            .output()
            .map_err(io("seeder report"))?;
        Ok((
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        ))
    }

    /// `seeder publish` of the lab's fleet file and roles as they are on disk.
    pub fn publish(&self) -> Result<String> {
        run("seeder publish", &mut self.seeder_cmd(&["publish"]))
    }

    /// SIGKILL the seeder (no drain, no goodbye) and wait until it is gone.
    pub fn kill_seeder(&mut self) -> Result<()> {
        let pid = self.seeder_pid as i32;
        let target = crate::procs::Target {
            pid,
            start_time: crate::procs::start_time(pid),
            group: true,
        };
        nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        )
        .map_err(|e| step("killing the seeder", e))?;
        let left = crate::procs::wait_gone(&[target], Duration::from_secs(10));
        if !left.is_empty() {
            return Err(step("killing the seeder", "still running after SIGKILL"));
        }
        Ok(())
    }

    /// `seeder serve` again on the same campaign (after [`Fleet::kill_seeder`]).
    pub fn restart_seeder(&mut self) -> Result<()> {
        self.seeder_pid = start_seeder(self.lab.dir(), &self.seeder_bin, &self.campaign_dir)?;
        Ok(())
    }

    /// Replaces a node as an operator does: `seeder tfvars` mints it a fresh join token (its
    /// old one was used, and a join token is single use), Terraform renders its user_data again,
    /// and `terraform apply -replace` boots a new droplet (a new id, a new disk) from that.
    pub fn replace_node(&self, name: &str) -> Result<()> {
        let n = self.node(name)?;
        let node_name: NodeName = name.parse()?;
        let render = self.lab.dir().join("terraform/render");
        run(
            "seeder tfvars",
            seeder(&self.seeder_bin, &self.campaign_dir, &["tfvars", "--out"])
                .arg(render.join("nodes.auto.tfvars.json")),
        )?;
        run(
            "terraform apply",
            &mut terraform(
                &render,
                &["apply", "-auto-approve", "-input=false", "-no-color"],
            ),
        )?;
        let decoded = run(
            "terraform output",
            &mut terraform(&render, &["output", "-json", "user_data_decoded"]),
        )?;
        let mut user_data: BTreeMap<String, CloudConfig> =
            serde_json::from_str(&decoded).map_err(|e| step("parsing rendered user_data", e))?;
        let mut fresh = n.clone();
        fresh.cloud_config = user_data
            .remove(name)
            .ok_or_else(|| step("user_data", format!("{name} was not rendered")))?;
        let old_id = n.facts["droplet_id"].as_u64().unwrap_or_default();
        fresh.facts["droplet_id"] = serde_json::json!(old_id + 1_000_000);
        self.lab.node_down(&node_name)?;
        crate::cloud::destroy(self.lab.dir(), name)?;
        let dir = self.lab.nodes_dir().join(name);
        std::fs::remove_dir_all(&dir).map_err(io(format!("removing {}", dir.display())))?;
        boot_node(&self.lab, &self.base, &self.campaign, &fresh)
    }

    /// Reboots a node: every process in it stops, /run starts empty, its disk stays; then the
    /// init system starts the agent (`hiveseed-agent.service` on a droplet; here the agent's
    /// own no-systemd start, `bootstrap run`).
    pub fn reboot_node(&self, name: &str) -> Result<()> {
        let node_name: NodeName = name.parse()?;
        self.lab.node_reboot(&node_name, &self.base)?;
        self.start_agent(name)
    }

    /// What the init system does when the agent died (`Restart=always`): start it again.
    pub fn start_agent(&self, name: &str) -> Result<()> {
        let node = self.lab.node(&name.parse()?)?;
        let out = node
            .command(["/usr/local/bin/bootstrap", "run"])
            .env(
                "PATH",
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            )
            .env("HOME", "/root")
            .env("LANG", "C.UTF-8")
            .output()?;
        if !out.status.success() {
            return Err(step(
                format!("starting the agent on {name}"),
                String::from_utf8_lossy(&out.stderr),
            ));
        }
        Ok(())
    }

    /// The agent's pid on a node (its pidfile), if it is alive.
    pub fn agent_pid(&self, name: &str) -> Option<i32> {
        let n = self.node(name).ok()?;
        let pid: i32 = std::fs::read_to_string(n.root.join("run/hiveseed/agent.pid"))
            .ok()?
            .trim()
            .parse()
            .ok()?;
        crate::procs::is_alive(pid, None).then_some(pid)
    }

    /// Processes inside a node whose argv starts with `argv0 arg1`, with their start times
    /// (a restarted process has a new start time even if its pid were reused).
    pub fn processes(&self, name: &str, argv0: &str, arg1: &str) -> Vec<(i32, u64)> {
        let Ok(n) = self.node(name) else {
            return Vec::new();
        };
        crate::procs::rooted_under(&n.root)
            .into_iter()
            .filter(|&pid| {
                let c = crate::procs::cmdline(pid);
                c.first().map(String::as_str) == Some(argv0)
                    && c.get(1).map(String::as_str) == Some(arg1)
            })
            .filter_map(|pid| Some((pid, crate::procs::start_time(pid)?)))
            .collect()
    }

    /// Waits until every node converged; returns the time from the first runcmd to green.
    pub fn wait_converged(&self, timeout: Duration) -> Result<Duration> {
        let secs = timeout.as_secs().to_string();
        let out = self
            .seeder_cmd(&["wait", "--timeout", &secs])
            .output()
            .map_err(io("seeder wait"))?;
        if !out.status.success() {
            let logs: Vec<String> = self
                .nodes
                .iter()
                .map(|n| {
                    let console = std::fs::read_to_string(&n.console_log).unwrap_or_default();
                    let agent = std::fs::read_to_string(n.root.join("var/log/hiveseed/agent.log"))
                        .unwrap_or_default();
                    format!(
                        "--- {} console:\n{}\n--- {} agent (tail):\n{}",
                        n.name,
                        tail(&console, 10),
                        n.name,
                        tail(&agent, 20)
                    )
                })
                .collect();
            return Err(step(
                "seeder wait",
                format!(
                    "{}{}\n{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr),
                    logs.join("\n")
                ),
            ));
        }
        Ok(self.boot_started.elapsed())
    }
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

use std::os::unix::process::CommandExt;

#[cfg(test)]
mod tests {
    use super::*;

    const LAB_FLEET: &str = include_str!("../../../roles/fleet.lab.toml");
    /// The committed pin: a placeholder the lab always replaces.
    const PLACEHOLDER: &str = "0000000000000000000000000000000000000000000000000000000000000000";

    #[test]
    fn the_lab_pins_the_cache_build_and_changes_nothing_else() {
        let cache_build = "476cf390110b410d66f029d3a4efa0aa304014e08b908f3f1dd4ade3b2ff6b3f";
        let committed = hiveseed_seeder::fleet::Fleet::parse(LAB_FLEET).unwrap();
        assert_eq!(committed.pins.ai_memory.sha256.to_hex(), PLACEHOLDER);
        let pinned = pin_ai_memory(LAB_FLEET, cache_build).unwrap();
        let parsed = hiveseed_seeder::fleet::Fleet::parse(&pinned).unwrap();
        assert_eq!(parsed.pins.ai_memory.sha256.to_hex(), cache_build);
        let changed: Vec<(&str, &str)> = LAB_FLEET
            .lines()
            .zip(pinned.lines())
            .filter(|(a, b)| a != b)
            .collect();
        assert_eq!(
            changed,
            [(
                format!("sha256 = \"{PLACEHOLDER}\"").as_str(),
                format!("sha256 = \"{cache_build}\"").as_str()
            )]
        );
        assert_eq!(LAB_FLEET.lines().count(), pinned.lines().count());
    }

    /// The seeder certifies a private address only inside its region's VPC range: every lab node's
    /// address (127.0.R.N) must be inside the range the lab fleet declares, or it gets no
    /// certificate; the seeder's own address is in none.
    #[test]
    fn the_lab_fleets_vpc_ranges_hold_every_lab_address() {
        for text in [LAB_FLEET, include_str!("../fixtures/smoke/fleet.toml")] {
            let fleet = hiveseed_seeder::fleet::Fleet::parse(text).unwrap();
            let roles: BTreeMap<String, (String, String)> = fleet
                .nodes
                .iter()
                .map(|n| {
                    (
                        n.name.to_string(),
                        (n.role.to_string(), n.region.to_string()),
                    )
                })
                .collect();
            let plan = address_plan(&roles);
            for n in &fleet.nodes {
                let (r, num) = plan[n.name.as_str()];
                let private = crate::addr::NodeAddr::new(r, num).unwrap().private();
                let range = fleet.vpc_ranges[&n.region];
                assert!(
                    range.contains(private),
                    "{}: {private} outside {range}",
                    n.name
                );
            }
            for range in fleet.vpc_ranges.values() {
                assert!(!range.contains(crate::addr::SEEDER_ADDR), "{range}");
            }
        }
    }

    #[test]
    fn a_fleet_without_the_pin_is_refused() {
        let text = LAB_FLEET.replace("[pins.ai_memory]", "[pins.other]");
        let err = pin_ai_memory(&text, PLACEHOLDER).unwrap_err();
        assert!(
            err.to_string().contains("no sha256 under [pins.ai_memory]"),
            "{err}"
        );
    }

    fn cloud_config(json: serde_json::Value) -> std::result::Result<CloudConfig, String> {
        serde_json::from_value(json).map_err(|e| e.to_string())
    }

    #[test]
    fn the_player_refuses_keys_it_does_not_play() {
        let ok = cloud_config(serde_json::json!({
            "hostname": "n", "manage_etc_hosts": true, "write_files": [], "runcmd": [["true"]],
        }))
        .unwrap();
        assert!(manages_etc_hosts(ok.manage_etc_hosts.as_ref()).unwrap());
        let err =
            cloud_config(serde_json::json!({"hostname": "n", "packages": ["curl"]})).unwrap_err();
        assert!(err.contains("unknown field `packages`"), "{err}");
        let err = cloud_config(serde_json::json!({
            "write_files": [{"path": "/x", "content": "", "defer": true}],
        }))
        .unwrap_err();
        assert!(err.contains("unknown field `defer`"), "{err}");
    }

    #[test]
    fn manage_etc_hosts_as_cloud_init_reads_it() {
        use serde_json::json;
        assert!(!manages_etc_hosts(None).unwrap());
        assert!(!manages_etc_hosts(Some(&json!(false))).unwrap());
        assert!(manages_etc_hosts(Some(&json!(true))).unwrap());
        assert!(manages_etc_hosts(Some(&json!("template"))).unwrap());
        assert!(manages_etc_hosts(Some(&json!("localhost"))).is_err());
        let hosts = etc_hosts("do-1461-pg-nyc3-01", "do-1461-pg-nyc3-01");
        let entries: Vec<&str> = hosts
            .lines()
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .collect();
        assert_eq!(
            entries,
            [
                "127.0.1.1 do-1461-pg-nyc3-01 do-1461-pg-nyc3-01",
                "127.0.0.1 localhost",
                "::1 localhost ip6-localhost ip6-loopback",
                "ff02::1 ip6-allnodes",
                "ff02::2 ip6-allrouters",
            ]
        );
    }
}
