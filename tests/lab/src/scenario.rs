//! The lab's named scenarios (the acceptance gate): each drives a running fleet the way an
//! operator or a failure would, then checks what the fleet did. Every wait is a condition with a
//! deadline; every check is recorded with what was expected and what was seen.
//!
//! - `bring-up`: from clean to a green validation report, timed (first agent start → green).
//! - `secrets`: no secret in user_data, command lines, logs or non-root-readable files.
//! - `redeploy`: a peer setting changes → only peers get a generation and restart, pg untouched;
//!   then a no-op publish restarts nothing.
//! - `replace`: a peer is replaced as an operator does: `seeder tfvars` mints it a fresh join token
//!   (its used one is refused), and a new droplet (new id, new disk) boots from the re-rendered user_data.
//! - `stolen token`: a node's join token used by another process at another address: refused
//!   (single use; with attestation, a fresh token too), the node untouched.
//! - `hostile service`: the `ai-memory` account plants symlinks where the agent writes; the
//!   agent refuses them, naming the path, and nothing under /etc or /boot changes.
//! - `faults`: an agent killed mid-apply, a pg node rebooted, the seeder killed during a bring-up.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::fleet::{Fleet, UpConfig};

type Result<T> = anyhow::Result<T>;

/// One recorded check of a scenario.
#[derive(Debug, Clone)]
pub struct Check {
    pub scenario: &'static str,
    pub name: String,
    pub expected: String,
    pub got: String,
    pub pass: bool,
}

/// Everything the scenarios recorded, printed as a table at the end.
#[derive(Debug, Default)]
pub struct Record {
    pub checks: Vec<Check>,
    /// Free-form timings, printed after the table.
    pub notes: Vec<String>,
}

impl Record {
    fn check(
        &mut self,
        scenario: &'static str,
        name: impl Into<String>,
        expected: impl Into<String>,
        got: impl Into<String>,
        pass: bool,
    ) {
        let c = Check {
            scenario,
            name: name.into(),
            expected: expected.into(),
            got: got.into(),
            pass,
        };
        println!(
            "  {:<4} {:<10} {:<44} {}",
            if c.pass { "PASS" } else { "FAIL" },
            c.scenario,
            c.name,
            one_line(&c.got, 120)
        );
        self.checks.push(c);
    }

    /// A figure, printed now and after the table.
    pub fn note(&mut self, s: impl Into<String>) {
        let s = s.into();
        println!("  {s}");
        self.notes.push(s);
    }

    /// A scenario that could not run to its end.
    pub fn error(&mut self, scenario: &'static str, e: &anyhow::Error) {
        self.check(
            scenario,
            "ran to the end",
            "no error",
            format!("{e:#}"),
            false,
        );
    }

    pub fn failed(&self) -> usize {
        self.checks.iter().filter(|c| !c.pass).count()
    }

    pub fn table(&self) -> String {
        let mut t = String::new();
        let _ = writeln!(t, "{:<10} {:<44} {:<6} GOT", "SCENARIO", "CHECK", "STATUS");
        for c in &self.checks {
            let _ = writeln!(
                t,
                "{:<10} {:<44} {:<6} {}",
                c.scenario,
                c.name,
                if c.pass { "PASS" } else { "FAIL" },
                one_line(&c.got, 100)
            );
        }
        for n in &self.notes {
            let _ = writeln!(t, "{n}");
        }
        let _ = writeln!(
            t,
            "TOTAL={} PASS={} FAIL={}",
            self.checks.len(),
            self.checks.len() - self.failed(),
            self.failed()
        );
        t
    }
}

fn one_line(s: &str, max: usize) -> String {
    let s = s.split_whitespace().collect::<Vec<_>>().join(" ");
    if s.chars().count() > max {
        format!("{}…", s.chars().take(max).collect::<String>())
    } else {
        s
    }
}

use crate::wait::until_some as poll;

mod stolen_token;
pub use stolen_token::{join_as_impostor, stolen_token};

/// Per node: (seeder's generation, applied generation, phase).
fn generations(status: &serde_json::Value) -> BTreeMap<String, (u64, u64, String)> {
    status["nodes"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|n| {
                    (
                        n["name"].as_str().unwrap_or("?").to_owned(),
                        (
                            n["generation"].as_u64().unwrap_or(0),
                            n["applied_generation"].as_u64().unwrap_or(0),
                            n["phase"].as_str().unwrap_or("?").to_owned(),
                        ),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Polls the validation report until it is all PASS; returns the last output.
/// Polls the nodes' checks until all pass, then takes the full report (with the fleet probes)
/// until that passes too, within `deadline`; returns the last report.
pub fn report_green(f: &Fleet, deadline: Duration) -> (bool, String) {
    let mut last = String::new();
    let ok = poll(deadline, || {
        match f.report(false).and_then(|(green, out)| {
            if green {
                f.report(true)
            } else {
                Ok((false, out))
            }
        }) {
            Ok((true, out)) => {
                last = out;
                Some(())
            }
            Ok((false, out)) => {
                last = out;
                None
            }
            Err(e) => {
                last = format!("{e:#}");
                None
            }
        }
    })
    .is_some();
    (ok, last)
}

/// A report's TOTAL line when it is green, else its failing lines.
fn report_summary(green: bool, report: &str) -> String {
    if green {
        report
            .lines()
            .find(|l| l.starts_with("TOTAL="))
            .unwrap_or("")
            .to_owned()
    } else {
        fails_of(report)
    }
}

fn fails_of(report: &str) -> String {
    report
        .lines()
        .filter(|l| l.contains(" FAIL ") || l.starts_with("TOTAL="))
        .take(8)
        .collect::<Vec<_>>()
        .join(" | ")
}

const PG_BIN: &str = "/usr/lib/postgresql/17/bin/postgres";
/// The secrets scan must see every process that lives this long (a `psql` run, say).
const SAMPLED_LIFETIME: Duration = Duration::from_millis(200);
const AI_MEMORY: &str = "/usr/local/bin/ai-memory";

/// The postmaster of a pg node: the oldest `postgres -D` process in it.
fn postmaster(f: &Fleet, node: &str) -> Option<(i32, u64)> {
    f.processes(node, PG_BIN, "-D")
        .into_iter()
        .min_by_key(|&(_, start)| start)
}

fn daemon(f: &Fleet, node: &str) -> Option<(i32, u64)> {
    f.processes(node, AI_MEMORY, "serve")
        .into_iter()
        .min_by_key(|&(_, start)| start)
}

// ---- bring-up ---------------------------------------------------------------------------

/// From clean to all green: every node converged, the validation report all PASS.
pub fn bring_up(cfg: &UpConfig, rec: &mut Record, timeout: Duration) -> Result<Fleet> {
    const S: &str = "bring-up";
    let f = crate::fleet::up(cfg)?;
    for (phase, took) in &f.phases {
        rec.note(format!(
            "bring-up phase {phase:<22} {:>6.1}s",
            took.as_secs_f64()
        ));
    }
    match f.wait_converged(timeout) {
        Ok(green) => {
            per_role_times(&f, green, rec);
            rec.note(format!(
                "bring-up: first agent start -> every node converged: {:.1}s ({} nodes)",
                green.as_secs_f64(),
                f.nodes.len()
            ));
            rec.check(
                S,
                "every node converged",
                format!("{} converged", f.nodes.len()),
                format!("{:.1}s after the first agent start", green.as_secs_f64()),
                true,
            );
        }
        Err(e) => {
            rec.check(
                S,
                "every node converged",
                "all converged",
                format!("{e:#}"),
                false,
            );
            return Ok(f);
        }
    }
    let (ok, out) = report_green(&f, Duration::from_secs(60));
    let green = f.boot_started.elapsed();
    rec.check(
        S,
        "validation report all PASS",
        "FAIL=0",
        report_summary(ok, &out),
        ok,
    );
    rec.note(format!(
        "bring-up: first agent start -> report green: {:.1}s (command-line sampler on)",
        green.as_secs_f64()
    ));
    rec.note(format!(
        "bring-up: command-line sampler until green: {}",
        f.cmdlines.stats()
    ));
    pg_without_packaged_cluster(&f, rec);
    stolen_token::every_enrollment_attested(&f, rec)?;
    Ok(f)
}

/// The clusters postgresql-common made (its postinst runs initdb for `<ver>/main` unless
/// `create_main_cluster = false`): data directories `/var/lib/postgresql/<ver>/<name>` and
/// registered clusters `/etc/postgresql/<ver>/<name>`. The role's own cluster lives in
/// `/var/lib/postgresql/hiveseed/`, outside both.
pub fn packaged_clusters(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for base in ["var/lib/postgresql", "etc/postgresql"] {
        let Ok(versions) = std::fs::read_dir(root.join(base)) else {
            continue;
        };
        for v in versions.flatten() {
            let is_version = v
                .file_name()
                .to_str()
                .is_some_and(|n| n.parse::<u32>().is_ok());
            let Ok(clusters) = std::fs::read_dir(v.path()) else {
                continue;
            };
            if is_version {
                out.extend(clusters.flatten().map(|c| c.path()));
            }
        }
    }
    out.sort();
    out
}

/// The pg role's createcluster drop-in comes before its packages, and the base image has none:
/// the packages are installed and made no cluster of their own.
fn pg_without_packaged_cluster(f: &Fleet, rec: &mut Record) {
    let pg = f.with_role("pg");
    let mut bad = Vec::new();
    for n in &pg {
        if !n.root.join(PG_BIN.trim_start_matches('/')).exists() {
            bad.push(format!("{}: {PG_BIN} not installed", n.name));
        }
        for c in packaged_clusters(&n.root) {
            let inside = c.strip_prefix(&n.root).unwrap_or(&c);
            bad.push(format!("{}: /{}", n.name, inside.display()));
        }
    }
    rec.check(
        "bring-up",
        "pg nodes: packages installed, no packaged cluster",
        "postgres installed; no /var/lib/postgresql/<ver>/* nor /etc/postgresql/<ver>/*",
        if bad.is_empty() {
            format!(
                "{} pg nodes: {PG_BIN} installed, no packaged cluster",
                pg.len()
            )
        } else {
            bad.join("; ")
        },
        bad.is_empty() && !pg.is_empty(),
    );
}

/// When each role's last node converged: per node the last `phase=converged` line of its agent
/// log before the fleet was green (peers converge early without the daemon while the mesh is
/// not released, then again with it).
fn per_role_times(f: &Fleet, green: Duration, rec: &mut Record) {
    let mut by_role: BTreeMap<&str, f64> = BTreeMap::new();
    let start = f.boot_started_unix();
    let end = start + green.as_secs_f64();
    for n in &f.nodes {
        let log =
            std::fs::read_to_string(n.root.join("var/log/hiveseed/agent.log")).unwrap_or_default();
        let at = log
            .lines()
            .filter(|l| l.contains("phase=converged"))
            .filter_map(|l| l.split_whitespace().next().and_then(parse_rfc3339))
            .filter(|t| *t <= end)
            .fold(None, |m: Option<f64>, t| Some(m.map_or(t, |m| m.max(t))));
        if let Some(at) = at {
            let e = by_role.entry(n.role.as_str()).or_insert(0.0);
            *e = e.max(at - start);
        }
    }
    for (role, secs) in by_role {
        rec.note(format!(
            "bring-up: last {role} node converged {secs:.1}s after the first agent start"
        ));
    }
}

/// Seconds since the epoch of an RFC 3339 UTC timestamp as the agent logs it.
fn parse_rfc3339(s: &str) -> Option<f64> {
    let t = time::OffsetDateTime::parse(
        s.trim_end_matches(|c: char| !c.is_ascii_digit() && c != 'Z'),
        &time::format_description::well_known::Rfc3339,
    )
    .ok()?;
    Some(t.unix_timestamp_nanos() as f64 / 1e9)
}

// ---- the operator's LLM key ---------------------------------------------------------------

/// The operator's LLM keys reach their nodes: stand-in keys (nothing here can reach OpenRouter
/// or xAI) in the campaign's `secrets/llm-api-key` and `secrets/agent-llm-api-key`, and the
/// seed's `[llm]` and `[agent_llm]` added to the fleet, published; every peer applies it with the
/// daemon healthy, its key in the 0400 environment file and nowhere in config.toml, every agent
/// has its own key in its 0400 environment file, and the report is green (the LLM client
/// initialises offline; calls would need the network). The `secrets` scan that follows looks
/// for both keys too.
pub fn llm_key(f: &Fleet, rec: &mut Record) -> Result<()> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    const S: &str = "llm key";
    let peers: Vec<String> = f.with_role("peer").iter().map(|n| n.name.clone()).collect();
    let agents: Vec<String> = f
        .with_role("agent")
        .iter()
        .map(|n| n.name.clone())
        .collect();
    let before = generations(&f.status()?);
    let stand_in = |prefix: &str, file: &str| -> Result<String> {
        let key = format!("{prefix}{}", hex::encode(rand::random::<[u8; 24]>()));
        let path = f.campaign_dir.join(file);
        std::fs::write(&path, format!("{key}\n"))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
        Ok(key)
    };
    let key = stand_in("sk-or-v1-lab-", "secrets/llm-api-key")?;
    let agent_key = stand_in("xai-lab-", "secrets/agent-llm-api-key")?;
    let mut text = std::fs::read_to_string(&f.fleet_file)?;
    anyhow::ensure!(
        !text.contains("[llm]") && !text.contains("[agent_llm]"),
        "the lab fleet already has [llm] or [agent_llm]"
    );
    text.push_str(
        "\n# Added by the `llm key` scenario: the seed's LLMs, with stand-in keys.\n[llm]\nbackend = \"openrouter\"\nmodel = \"google/gemma-4-26b-a4b-it\"\napi_key_env = \"OPENROUTER_API_KEY\"\n\n[agent_llm]\nbackend = \"xai\"\nmodel = \"grok-4.3\"\napi_key_env = \"XAI_API_KEY\"\n",
    );
    std::fs::write(&f.fleet_file, text)?;
    let started = Instant::now();
    let out = f.publish()?;
    rec.note(format!(
        "llm key: [llm] + [agent_llm] + their keys; {}",
        one_line(&out, 100)
    ));
    let targets: Vec<String> = peers.iter().chain(&agents).cloned().collect();
    let when = wait_applied(f, &targets, &before, started, Duration::from_secs(90));
    rec.check(
        S,
        "every peer and agent applied the generation with the keys",
        format!("{} nodes", targets.len()),
        format!("{}/{} nodes", when.len(), targets.len()),
        when.len() == targets.len(),
    );
    // Each node: `<var>='<key>'` (single-quoted: read literally) a line of its 0400
    // ai-memory.env; its config.toml names `<var>` and does not hold the key.
    let delivered = |role: &str, config: &str, var: &str, key: &str| -> Vec<String> {
        let mut bad = Vec::new();
        for n in f.with_role(role) {
            let env = n.root.join("etc/ai-memory/ai-memory.env");
            let text = std::fs::read_to_string(&env).unwrap_or_default();
            let mode = std::fs::metadata(&env)
                .map(|m| m.mode() & 0o777)
                .unwrap_or(0);
            if !text.lines().any(|l| l == format!("{var}='{key}'")) {
                bad.push(format!("{}: no {var} line with the key", n.name));
            }
            if mode != 0o400 {
                bad.push(format!("{}: ai-memory.env is {mode:o}", n.name));
            }
            let config = std::fs::read_to_string(n.root.join(config)).unwrap_or_default();
            if !config.contains(&format!("api_key_env = \"{var}\"")) || config.contains(key) {
                bad.push(format!(
                    "{}: config.toml does not name {var}, or holds the key",
                    n.name
                ));
            }
        }
        bad
    };
    let outcome = |bad: Vec<String>, n: usize, what: &str| {
        let ok = bad.is_empty() && n > 0;
        let got = if bad.is_empty() {
            format!("{n} {what}")
        } else {
            bad.join("; ")
        };
        (got, ok)
    };
    let (got, ok) = outcome(
        delivered(
            "agent",
            "root/.config/ai-memory/config.toml",
            "XAI_API_KEY",
            &agent_key,
        ),
        agents.len(),
        "agents",
    );
    rec.check(
        S,
        "agents: key in their 0400 environment file only",
        "XAI_API_KEY='<key>', 0400; config.toml names the variable",
        got,
        ok,
    );
    let (got, ok) = outcome(
        delivered(
            "peer",
            "var/lib/ai-memory/.config/ai-memory/config.toml",
            "OPENROUTER_API_KEY",
            &key,
        ),
        peers.len(),
        "peers",
    );
    rec.check(
        S,
        "key in each peer's 0400 environment file only",
        "OPENROUTER_API_KEY='<key>', 0400; config.toml names the variable",
        got,
        ok,
    );
    let (green, out) = report_green(f, Duration::from_secs(60));
    let got = report_summary(green, &out);
    rec.check(
        S,
        "report green with [llm] and [agent_llm]",
        "FAIL=0",
        got,
        green,
    );
    Ok(())
}

// ---- secrets ----------------------------------------------------------------------------

/// The campaign's secrets as they would appear in text.
fn secret_values(f: &Fleet) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for (label, file) in [
        ("fleet PG password", "secrets/pg-password"),
        ("API key", "secrets/api-key"),
        ("LLM API key", "secrets/llm-api-key"),
        ("agents' LLM key", "secrets/agent-llm-api-key"),
    ] {
        if let Ok(v) = std::fs::read_to_string(f.campaign_dir.join(file)) {
            let v = v.trim().to_owned();
            if v.len() >= 8 {
                out.push((label.to_owned(), v));
            }
        }
    }
    out
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let Ok(ft) = e.file_type() else { continue };
        if ft.is_dir() {
            walk(&e.path(), out);
        } else if ft.is_file() {
            out.push(e.path());
        }
    }
}

/// A PEM private key block in text (`-----BEGIN [RSA |EC ]PRIVATE KEY-----`). Binaries are not
/// text: they may carry the marker as a string constant.
fn has_pem_key(text: &str) -> bool {
    text.lines().any(|l| {
        let l = l.trim();
        l.starts_with("-----BEGIN ") && l.ends_with("PRIVATE KEY-----")
    })
}

/// Files that hold key material: PEM private keys by content (text files only), raw keys by
/// name (`*.priv`, `*.key`: the agent's `enroll.key`, ai-memory's `operator.key`).
fn holds_private_key(path: &Path, bytes: &[u8]) -> bool {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    name.ends_with(".priv")
        || name.ends_with(".key")
        || std::str::from_utf8(bytes).is_ok_and(has_pem_key)
}

pub fn secrets(f: &Fleet, rec: &mut Record) -> Result<()> {
    const S: &str = "secrets";
    let secrets = secret_values(f);
    let labels: Vec<&str> = secrets.iter().map(|(l, _)| l.as_str()).collect();
    rec.check(
        S,
        "campaign has secrets to look for",
        "pg password + API key (+ the LLM keys after `llm key`)",
        labels.join(" + "),
        labels.starts_with(&["fleet PG password", "API key"]),
    );
    let leaks = |text: &str| -> Vec<String> {
        let mut l: Vec<String> = secrets
            .iter()
            .filter(|(_, v)| text.contains(v.as_str()))
            .map(|(k, _)| k.clone())
            .collect();
        if has_pem_key(text) {
            l.push("a PEM private key".into());
        }
        l
    };

    // user_data: only the node's own join token may be in it.
    let mut bad = Vec::new();
    for (node, ud) in &f.user_data {
        for l in leaks(ud) {
            bad.push(format!("{node}: {l}"));
        }
        for (other, oud) in &f.user_data {
            if other != node {
                if let Some(tok) = join_token(oud) {
                    if ud.contains(&tok) {
                        bad.push(format!("{node}: {other}'s join token"));
                    }
                }
            }
        }
    }
    rec.check(
        S,
        "user_data: no secret but the node's own token",
        "none",
        if bad.is_empty() {
            format!("{} user_data checked", f.user_data.len())
        } else {
            bad.join("; ")
        },
        bad.is_empty(),
    );

    // Every command line in the lab (nodes, the seeder, what the lab ran), sampled every 50 ms
    // since the first boot: a command that carried a secret for a moment is in it.
    let tokens: Vec<String> = f.user_data.values().filter_map(|u| join_token(u)).collect();
    f.cmdlines.stop();
    let stats = f.cmdlines.stats();
    rec.note(format!(
        "secrets: command-line sampler, first boot -> now: {stats}"
    ));
    let mut needles = secrets.clone();
    for (node, ud) in &f.user_data {
        if let Some(t) = join_token(ud) {
            needles.push((format!("{node}'s join token"), t));
        }
    }
    let sampled: Vec<String> = f
        .cmdlines
        .leaks(&needles)
        .iter()
        .map(ToString::to_string)
        .collect();
    // A process that lived longer than the longest gap between two samples was sampled.
    let gap_ok = stats.gap_max < SAMPLED_LIFETIME;
    rec.check(
        S,
        "command lines sampled every 50 ms since boot: no secret",
        format!(
            "none; every process living {} ms or more sampled",
            SAMPLED_LIFETIME.as_millis()
        ),
        if sampled.is_empty() {
            format!(
                "{} distinct command lines of {} processes in {} samples, longest gap {} ms",
                stats.distinct_cmdlines,
                stats.processes,
                stats.ticks,
                stats.gap_max.as_millis()
            )
        } else {
            sampled.join("; ")
        },
        sampled.is_empty() && gap_ok && stats.processes > 0,
    );

    // Logs: the seeder's, every node's console and /var/log.
    let mut logs = vec![f.lab.dir().join("seeder.log")];
    for n in &f.nodes {
        logs.push(n.console_log.clone());
        walk(&n.root.join("var/log"), &mut logs);
    }
    let mut bad = Vec::new();
    for p in &logs {
        let text = String::from_utf8_lossy(&std::fs::read(p).unwrap_or_default()).into_owned();
        for l in leaks(&text) {
            bad.push(format!("{}: {l}", p.display()));
        }
        if tokens.iter().any(|t| text.contains(t.as_str())) {
            bad.push(format!("{}: a join token", p.display()));
        }
    }
    rec.check(
        S,
        "log files: no secret",
        "none",
        if bad.is_empty() {
            format!("{} log files checked", logs.len())
        } else {
            bad.join("; ")
        },
        bad.is_empty(),
    );

    // Files on every node's disk (its upper dir: what the node wrote) and in the campaign dir:
    // anything with a secret or a private key is 0600/0400 (no group or other bits).
    let mut files = Vec::new();
    for n in &f.nodes {
        walk(
            &n.root.parent().unwrap_or(&n.root).join("upper"),
            &mut files,
        );
    }
    walk(&f.campaign_dir, &mut files);
    let mut bad = Vec::new();
    let mut secret_files = 0;
    for p in &files {
        use std::os::unix::fs::MetadataExt;
        let Ok(meta) = std::fs::symlink_metadata(p) else {
            continue;
        };
        if meta.len() > 64 << 20 {
            continue;
        }
        let bytes = std::fs::read(p).unwrap_or_default();
        let text = String::from_utf8_lossy(&bytes);
        // Debian's ssl-cert package makes a self-signed "snakeoil" key (0640 root:ssl-cert)
        // when postgresql is installed; nothing of hiveseed's uses it.
        if p.ends_with("etc/ssl/private/ssl-cert-snakeoil.key") {
            continue;
        }
        let has = !leaks(&text).is_empty()
            || holds_private_key(p, &bytes)
            || tokens.iter().any(|t| text.contains(t.as_str()));
        if has {
            secret_files += 1;
            if meta.mode() & 0o077 != 0 {
                bad.push(format!("{} mode {:o}", p.display(), meta.mode() & 0o7777));
            }
        }
    }
    rec.check(
        S,
        "files with secrets: 0600/0400",
        "no group/other bits",
        if bad.is_empty() {
            format!(
                "{secret_files} secret-bearing files of {} checked",
                files.len()
            )
        } else {
            bad.join("; ")
        },
        bad.is_empty() && secret_files > 0,
    );
    Ok(())
}

/// The join token in a cloud-config (the `token=` of the join URL in join.toml).
fn join_token(user_data: &str) -> Option<String> {
    let i = user_data.find("token=")?;
    let rest = &user_data[i + "token=".len()..];
    let tok: String = rest
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || "-_.".contains(*c))
        .collect();
    (tok.len() > 20).then_some(tok)
}

// ---- redeploy ---------------------------------------------------------------------------

/// Rewrites `key = value` under `[section]` of the lab's fleet file.
fn set_fleet_value(f: &Fleet, section: &str, key: &str, value: &str) -> Result<()> {
    let text = std::fs::read_to_string(&f.fleet_file)?;
    let out = crate::fleet::set_toml_value(&text, section, key, value)
        .map_err(|e| e.context(f.fleet_file.display().to_string()))?;
    std::fs::write(&f.fleet_file, out)?;
    Ok(())
}

/// Waits until every node in `names` applied a generation above `before` and converged;
/// returns the time each took.
fn wait_applied(
    f: &Fleet,
    names: &[String],
    before: &BTreeMap<String, (u64, u64, String)>,
    started: Instant,
    deadline: Duration,
) -> BTreeMap<String, f64> {
    let mut when: BTreeMap<String, f64> = BTreeMap::new();
    poll(deadline, || {
        let st = f.status().ok()?;
        let g = generations(&st);
        for n in names {
            let old = before.get(n).map(|b| b.1).unwrap_or(0);
            if let Some((gen, applied, phase)) = g.get(n) {
                if *applied > old && applied == gen && phase == "converged" && !when.contains_key(n)
                {
                    when.insert(n.clone(), started.elapsed().as_secs_f64());
                }
            }
        }
        (when.len() == names.len()).then_some(())
    });
    when
}

/// Waits until every node has reported at least twice since now (so any new manifest would
/// have reached it and been applied).
fn wait_reports(f: &Fleet, deadline: Duration) -> bool {
    let store = match hiveseed_seeder::store::Store::open(&f.campaign_dir.join("state.db")) {
        Ok(s) => s,
        Err(_) => return false,
    };
    let last = |n: &str| -> u64 {
        n.parse()
            .ok()
            .and_then(|name| store.report_seqs(&name).ok())
            .and_then(|s| s.last().copied())
            .unwrap_or(0)
    };
    let start: BTreeMap<String, u64> = f
        .nodes
        .iter()
        .map(|n| (n.name.clone(), last(&n.name)))
        .collect();
    poll(deadline, || {
        start.iter().all(|(n, s)| last(n) >= s + 2).then_some(())
    })
    .is_some()
}

/// A peer's store (`<layout> <database>.<schema>`) and, if it could be read, how many of its
/// memories have a stored embedding, of how many.
type StoreCounts = (String, Option<(u64, u64)>);

/// Per peer: [`StoreCounts`], read on the region's pg node as postgres over the local socket.
fn embedded_counts(f: &Fleet) -> Result<BTreeMap<String, StoreCounts>> {
    let spec = hiveseed_seeder::fleet::Fleet::load(&f.fleet_file)?;
    let mut out = BTreeMap::new();
    for peer in spec.nodes_with_role("peer") {
        let Some(store) = spec.peer_store(peer) else {
            continue;
        };
        let Some(pg) = spec.nodes_with_role("pg").find(|n| n.region == peer.region) else {
            continue;
        };
        let major = spec.pins.postgres.major;
        let node = f.lab.node(&pg.name.as_str().parse()?)?;
        let query = format!(
            "SELECT count(*) FILTER (WHERE embedding IS NOT NULL) || ' ' || count(*) FROM {}.memories",
            store.schema
        );
        let psql = format!("/usr/lib/postgresql/{major}/bin/psql");
        let counts = node
            .command([
                psql.as_str(),
                "-X",
                "-q",
                "-A",
                "-t",
                "-h",
                "/var/run/postgresql",
                "-p",
                "5432",
                "-d",
                store.database.as_str(),
                "-c",
                query.as_str(),
            ])
            .user("postgres")
            .run()
            .ok()
            .and_then(|o| {
                let text = String::from_utf8_lossy(&o.stdout).trim().to_owned();
                let (a, b) = text.split_once(' ')?;
                Some((a.parse().ok()?, b.parse().ok()?))
            });
        let label = format!("{} {}.{}", store.layout, store.database, store.schema);
        out.insert(peer.name.to_string(), (label, counts));
    }
    Ok(out)
}

pub fn redeploy(f: &Fleet, rec: &mut Record) -> Result<()> {
    const S: &str = "redeploy";
    // Stored embeddings before the daemons restart (what the suite and the standards wrote).
    let embedded_before = embedded_counts(f)?;
    let peers: Vec<String> = f.with_role("peer").iter().map(|n| n.name.clone()).collect();
    let pgs: Vec<String> = f.with_role("pg").iter().map(|n| n.name.clone()).collect();
    let before = generations(&f.status()?);
    let daemons: BTreeMap<String, Option<(i32, u64)>> =
        peers.iter().map(|p| (p.clone(), daemon(f, p))).collect();
    let postmasters: BTreeMap<String, Option<(i32, u64)>> =
        pgs.iter().map(|p| (p.clone(), postmaster(f, p))).collect();

    // The catch-up interval, a peer-only setting.
    let text = std::fs::read_to_string(&f.fleet_file)?;
    let current: u64 = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("catchup_interval_secs"))
        .and_then(|v| v.trim().trim_start_matches('=').trim().parse().ok())
        .unwrap_or(5);
    let new = current + 1;
    set_fleet_value(f, "federation", "catchup_interval_secs", &new.to_string())?;
    let started = Instant::now();
    let out = f.publish()?;
    rec.note(format!(
        "redeploy: catchup_interval_secs {current} -> {new}; {}",
        one_line(&out, 100)
    ));
    let when = wait_applied(f, &peers, &before, started, Duration::from_secs(60));
    let slowest = when.values().cloned().fold(0.0, f64::max);
    // The time is a figure, printed against the 5 s target, not a pass/fail line: on this
    // shared 2-core lab it measures the machine as much as the agent.
    rec.check(
        S,
        "every peer applied the new generation",
        format!("{} peers", peers.len()),
        format!(
            "{}/{} peers, slowest {slowest:.1}s",
            when.len(),
            peers.len()
        ),
        when.len() == peers.len(),
    );
    rec.note(format!(
        "redeploy: publish -> every peer applied the new generation (ai-memory restarted, healthy): {slowest:.1}s (target <= 5 s)"
    ));
    // A database per peer keeps its embeddings across a daemon restart; ai-memory 0.7.0 NULLs
    // those of a per-peer schema at every boot (its dimension probe reads only `public`).
    let embedded_after = embedded_counts(f)?;
    let mut kept = Vec::new();
    let mut lost = Vec::new();
    let mut seen = Vec::new();
    for (peer, (label, before)) in &embedded_before {
        let after = embedded_after.get(peer).and_then(|(_, a)| *a);
        let line = format!(
            "{peer} ({label}): {} -> {}",
            before.map_or("?".into(), |(e, t)| format!("{e}/{t}")),
            after.map_or("?".into(), |(e, t)| format!("{e}/{t}"))
        );
        seen.push(line.clone());
        if label.starts_with("database") {
            match (before, after) {
                (Some((e, _)), Some((a, _))) if *e > 0 && a >= *e => kept.push(peer.clone()),
                _ => lost.push(line),
            }
        }
    }
    rec.check(
        S,
        "database layout: embeddings survive the restart",
        "every database-layout peer keeps its stored embeddings",
        if lost.is_empty() {
            format!("{} peers kept theirs", kept.len())
        } else {
            lost.join("; ")
        },
        lost.is_empty() && !kept.is_empty(),
    );
    // The seed's layout, for contrast: a figure, not a pass/fail line (it is ai-memory's
    // behaviour, not ours).
    rec.note(format!(
        "redeploy: stored embeddings before -> after the restart: {}",
        seen.join("; ")
    ));
    let after = generations(&f.status()?);
    let untouched: Vec<String> = f
        .nodes
        .iter()
        .filter(|n| n.role != "peer")
        .filter(|n| after.get(&n.name).map(|a| a.0) != before.get(&n.name).map(|b| b.0))
        .map(|n| n.name.clone())
        .collect();
    rec.check(
        S,
        "no generation for pg and agent nodes",
        "unchanged",
        if untouched.is_empty() {
            "unchanged".into()
        } else {
            format!("changed: {}", untouched.join(", "))
        },
        untouched.is_empty(),
    );
    let restarted: Vec<&String> = peers
        .iter()
        .filter(|p| daemon(f, p) != daemons[*p] && daemon(f, p).is_some())
        .collect();
    rec.check(
        S,
        "ai-memory restarted on every peer",
        format!("{} restarted", peers.len()),
        format!("{} restarted", restarted.len()),
        restarted.len() == peers.len(),
    );
    let moved: Vec<&String> = pgs
        .iter()
        .filter(|p| postmaster(f, p) != postmasters[*p])
        .collect();
    rec.check(
        S,
        "pg postmasters untouched",
        "same pid and start time",
        if moved.is_empty() {
            format!("{} unchanged", pgs.len())
        } else {
            format!("restarted: {moved:?}")
        },
        moved.is_empty(),
    );
    let (ok, out) = report_green(f, Duration::from_secs(60));
    rec.check(
        S,
        "report green after redeploy",
        "FAIL=0",
        fails_of(&out),
        ok,
    );

    // No-op publish: nothing anywhere.
    let before = generations(&f.status()?);
    let daemons: BTreeMap<String, Option<(i32, u64)>> =
        peers.iter().map(|p| (p.clone(), daemon(f, p))).collect();
    let out = f.publish()?;
    let settled = wait_reports(f, Duration::from_secs(60));
    let after = generations(&f.status()?);
    let changed: Vec<&String> = after
        .keys()
        .filter(|n| after.get(*n).map(|a| a.0) != before.get(*n).map(|b| b.0))
        .collect();
    rec.check(
        S,
        "no-op publish: no generation",
        "none",
        format!("{}; changed: {changed:?}", one_line(&out, 60)),
        changed.is_empty(),
    );
    let restarted: Vec<&String> = peers
        .iter()
        .filter(|p| daemon(f, p) != daemons[*p])
        .collect();
    let moved: Vec<&String> = pgs
        .iter()
        .filter(|p| postmaster(f, p) != postmasters[*p])
        .collect();
    rec.check(
        S,
        "no-op publish: no restart anywhere",
        "none (after 2 reports from every node)",
        format!("settled={settled} ai-memory restarted={restarted:?} pg restarted={moved:?}"),
        settled && restarted.is_empty() && moved.is_empty(),
    );
    Ok(())
}

// ---- hostile service --------------------------------------------------------------------

/// One planted link of issue #15 item 1: `link` (a directory the service user may replace,
/// inside one of its own) becomes a symlink to `target`, a root-owned directory outside the
/// service's; `aside` keeps what was there, so removing the link restores the node as it was.
struct Plant {
    what: &'static str,
    link: String,
    target: &'static str,
    aside: String,
}

/// Every entry under `roots` (paths in the node) without following links: a file's sha256, a
/// link's target, `dir`; `skip` prefixes (the service's own) are left out.
fn tree_sums(root: &Path, roots: &[&str], skip: &[String]) -> BTreeMap<String, String> {
    use sha2::Digest;
    fn visit(root: &Path, dir: &str, skip: &[String], out: &mut BTreeMap<String, String>) {
        let Ok(rd) = std::fs::read_dir(root.join(dir.trim_start_matches('/'))) else {
            return;
        };
        for e in rd.flatten() {
            let path = format!("{dir}/{}", e.file_name().to_string_lossy());
            if skip
                .iter()
                .any(|s| path == *s || path.starts_with(&format!("{s}/")))
            {
                continue;
            }
            let Ok(ft) = e.file_type() else { continue };
            let sum = if ft.is_dir() {
                visit(root, &path, skip, out);
                "dir".to_owned()
            } else if ft.is_symlink() {
                format!(
                    "link {}",
                    std::fs::read_link(e.path()).unwrap_or_default().display()
                )
            } else if ft.is_file() {
                match std::fs::read(e.path()) {
                    Ok(bytes) => hex::encode(sha2::Sha256::digest(&bytes)),
                    Err(err) => format!("unreadable: {err}"),
                }
            } else {
                "special".to_owned()
            };
            out.insert(path, sum);
        }
    }
    let mut out = BTreeMap::new();
    for r in roots {
        visit(root, r, skip, &mut out);
    }
    out
}

/// The paths whose entry differs between two [`tree_sums`] (added, removed or changed).
fn tree_diff(before: &BTreeMap<String, String>, after: &BTreeMap<String, String>) -> Vec<String> {
    before
        .keys()
        .chain(after.keys())
        .filter(|p| before.get(*p) != after.get(*p))
        .cloned()
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect()
}

/// SIGKILL a node's agent and wait until it is gone; its pid, if it had one running.
fn kill_agent(f: &Fleet, node: &str) -> Option<i32> {
    let pid = f.agent_pid(node);
    if let Some(pid) = pid {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
        crate::procs::wait_gone(
            &[crate::procs::Target {
                pid,
                start_time: None,
                group: false,
            }],
            Duration::from_secs(10),
        );
    }
    pid
}

/// A node's latest report as the seeder stored it, with when it arrived (Unix seconds).
fn latest_report(f: &Fleet, node: &str) -> Option<(hiveseed_proto::StatusReport, u64)> {
    let store = hiveseed_seeder::store::Store::open(&f.campaign_dir.join("state.db")).ok()?;
    store
        .latest_reports()
        .ok()?
        .into_iter()
        .find(|(r, _)| r.node.as_str() == node)
}

/// What a report says went wrong: the failed phase's message and every failed resource's.
fn report_errors(r: &hiveseed_proto::StatusReport) -> Vec<String> {
    use hiveseed_proto::status::{Outcome, Phase};
    let mut out = Vec::new();
    if let Phase::Failed { message, .. } = &r.phase {
        out.push(message.clone());
    }
    out.extend(
        r.resources
            .iter()
            .filter(|x| x.outcome == Outcome::Failed)
            .map(|x| format!("{}: {}", x.id, x.message.as_deref().unwrap_or(""))),
    );
    out
}

/// `hostile service` (issue #15): on one peer, the `ai-memory` account (a shell as that user
/// inside the node) replaces a directory the agent writes into with a symlink to a root-owned
/// directory: its federation key's region directory -> /etc/profile.d (sourced by root's login
/// shells), the model's HF-cache snapshot -> /boot. Each time the agent's next pass must refuse,
/// naming the path, in the report it sends the seeder, and nothing under /etc or /boot may change
/// (the service's own `/etc/ai-memory/keys` and `credential` aside). The links are then removed
/// and the node converges green again.
pub fn hostile_service(f: &Fleet, rec: &mut Record) -> Result<()> {
    const S: &str = "hostile";
    let victim = f
        .with_role("peer")
        .first()
        .map(|n| n.name.clone())
        .ok_or_else(|| anyhow::anyhow!("no peer"))?;
    let root = f.node(&victim)?.root.clone();
    let node = f.lab.node(&victim.parse()?)?;
    // The key's directory: keys/<campaign>/<region> holds <node>.priv.
    let mut keys = Vec::new();
    walk(&root.join("etc/ai-memory/keys"), &mut keys);
    let key_dir = keys
        .iter()
        .find(|p| p.file_name() == Some(std::ffi::OsStr::new(&format!("{victim}.priv"))))
        .and_then(|p| p.parent())
        .and_then(|d| d.strip_prefix(&root).ok())
        .map(|d| format!("/{}", d.display()))
        .ok_or_else(|| anyhow::anyhow!("{victim}: no {victim}.priv under /etc/ai-memory/keys"))?;
    let snapshot = "/var/lib/ai-memory/.cache/huggingface/hub/models--sentence-transformers--all-MiniLM-L6-v2/snapshots/main";
    let plants = [
        Plant {
            what: "federation key directory -> /etc/profile.d",
            link: key_dir.clone(),
            target: "/etc/profile.d",
            aside: format!("{key_dir}.moved"),
        },
        Plant {
            what: "HF-cache model snapshot -> /boot",
            link: snapshot.to_owned(),
            target: "/boot",
            aside: "/var/lib/ai-memory/.cache-moved".to_owned(),
        },
    ];
    let own = [
        "/etc/ai-memory/keys".to_owned(),
        "/etc/ai-memory/credential".to_owned(),
    ];
    let as_service = |argv: &[&str]| -> Result<()> {
        node.command(argv.iter().copied())
            .user("ai-memory:ai-memory")
            .run()?;
        Ok(())
    };
    for p in &plants {
        let before = tree_sums(&root, &["/etc", "/boot"], &own);
        if p.target == "/boot" {
            // The whole .cache tree is the service's (under its home); the agent's files are
            // re-made beneath a snapshot directory that is now a link.
            as_service(&["mv", "/var/lib/ai-memory/.cache", &p.aside])?;
            let parent = Path::new(&p.link)
                .parent()
                .unwrap_or(Path::new("/"))
                .display()
                .to_string();
            as_service(&["mkdir", "-p", &parent])?;
        } else {
            as_service(&["mv", &p.link, &p.aside])?;
        }
        as_service(&["ln", "-s", p.target, &p.link])?;
        // The agent's next pass, now: a restarted agent converges its manifest at once (what a
        // drift pass does on its interval). Only reports the new agent sent count.
        kill_agent(f, &victim);
        let seq_before = latest_report(f, &victim).map_or(0, |(r, _)| r.seq);
        f.start_agent(&victim)?;
        let outcome = poll(Duration::from_secs(120), || {
            let (r, _) = latest_report(f, &victim)?;
            if r.seq <= seq_before {
                return None;
            }
            use hiveseed_proto::status::Phase;
            match &r.phase {
                Phase::Failed { .. } => Some(report_errors(&r)),
                Phase::Converged => Some(Vec::new()),
                _ => None,
            }
        });
        let named = outcome
            .as_ref()
            .and_then(|errs| errs.iter().find(|e| e.contains(&p.link)).cloned());
        rec.check(
            S,
            format!("{}: refused, path named", p.what),
            format!("the report names {}", p.link),
            match &outcome {
                None => "no finished pass within 120 s".to_owned(),
                Some(errs) if errs.is_empty() => "converged (the link was followed)".to_owned(),
                Some(errs) => named.clone().unwrap_or_else(|| errs.join("; ")),
            },
            named.is_some(),
        );
        let after = tree_sums(&root, &["/etc", "/boot"], &own);
        let changed = tree_diff(&before, &after);
        rec.check(
            S,
            format!("{}: /etc and /boot unchanged", p.what),
            "same sha256 of every file (the service's own aside)",
            if changed.is_empty() {
                format!("{} entries unchanged", after.len())
            } else {
                format!("changed: {}", changed.join(", "))
            },
            changed.is_empty(),
        );
        // Undo: the link goes, what was there comes back; anything the agent wrote through the
        // link (the code as it was) is removed, so later scenarios see the node as before.
        if p.target == "/boot" {
            as_service(&["rm", "-rf", "/var/lib/ai-memory/.cache"])?;
            as_service(&["mv", &p.aside, "/var/lib/ai-memory/.cache"])?;
        } else {
            as_service(&["rm", &p.link])?;
            as_service(&["mv", &p.aside, &p.link])?;
        }
        for path in changed.iter().filter(|c| !before.contains_key(*c)) {
            let _ = std::fs::remove_file(root.join(path.trim_start_matches('/')));
        }
    }
    kill_agent(f, &victim);
    f.start_agent(&victim)?;
    let (ok, out) = report_green(f, Duration::from_secs(120));
    rec.check(
        S,
        "links removed: report green again",
        "FAIL=0",
        fails_of(&out),
        ok,
    );
    Ok(())
}

// ---- replace ----------------------------------------------------------------------------

fn cert_fingerprint(pem_path: &Path) -> Option<String> {
    use sha2::Digest;
    let pem = std::fs::read_to_string(pem_path).ok()?;
    let b64: String = pem
        .lines()
        .skip_while(|l| !l.starts_with("-----BEGIN CERTIFICATE"))
        .skip(1)
        .take_while(|l| !l.starts_with("-----END"))
        .collect();
    use base64::Engine;
    let der = base64::engine::general_purpose::STANDARD.decode(b64).ok()?;
    Some(hex::encode(sha2::Sha256::digest(der)))
}

/// `curl` with a client identity against a peer's health endpoint: the HTTP code, or `000`
/// when TLS refuses.
/// One mTLS `GET /api/v1/health` on a peer with the identity in `ca`, `cert`, `key`, classified
/// by the suite's own probe (`net::tls_attempt`): an HTTP answer, the server's refusal (alert or
/// close before any HTTP byte) or why there is no verdict (a local error, a timeout...).
fn mtls_health(
    ca: &Path,
    cert: &Path,
    key: &Path,
    ip: std::net::Ipv4Addr,
    port: u16,
) -> hiveseed_seeder::suite::net::TlsOutcome {
    use hiveseed_seeder::suite::net::{self, Endpoint, Identity, Posture, TlsOutcome};
    let read = |p: &Path| std::fs::read_to_string(p).map_err(|e| format!("{}: {e}", p.display()));
    let (roots, cert_pem, key_pem) = match (read(ca), read(cert), read(key)) {
        (Ok(r), Ok(c), Ok(k)) => (r, c, k),
        (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => return TlsOutcome::LocalError(e),
    };
    let identity = Identity {
        label: "replaced peer's old identity".into(),
        cert_pem,
        key_pem,
    };
    let ep = Endpoint {
        name: ip.to_string(),
        region: String::new(),
        base: match format!("https://{ip}:{port}").parse() {
            Ok(u) => u,
            Err(e) => return TlsOutcome::LocalError(format!("url: {e}")),
        },
        connect: None,
    };
    let posture = Posture {
        roots_pem: &roots,
        identity: Some(&identity),
    };
    match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt.block_on(net::tls_attempt(
            &ep,
            &posture,
            "/api/v1/health",
            Duration::from_secs(10),
        )),
        Err(e) => TlsOutcome::LocalError(format!("tokio runtime: {e}")),
    }
}

pub fn replace(f: &Fleet, rec: &mut Record, timeout: Duration) -> Result<()> {
    const S: &str = "replace";
    let peers = f.with_role("peer");
    anyhow::ensure!(peers.len() >= 2, "replace needs two peers");
    let victim = peers[peers.len() / 2].name.clone();
    let witness = peers[0].clone();
    let v = f.node(&victim)?;
    // The victim's old client identity, kept outside the node (0600) to try it afterwards.
    let keep = f.lab.dir().join("replaced-identity");
    let _ = std::fs::remove_dir_all(&keep);
    std::fs::create_dir_all(&keep)?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&keep, std::fs::Permissions::from_mode(0o700))?;
    for file in ["client.pem", "client.key", "ca.pem"] {
        std::fs::copy(v.root.join("etc/ai-memory/tls").join(file), keep.join(file))?;
    }
    let old_fp = cert_fingerprint(&keep.join("client.pem")).unwrap_or_default();
    let port = 9077;
    let before = mtls_health(
        &keep.join("ca.pem"),
        &keep.join("client.pem"),
        &keep.join("client.key"),
        witness.public_ip,
        port,
    );
    let accepted = matches!(
        before,
        hiveseed_seeder::suite::net::TlsOutcome::Http {
            status: Some(200),
            ..
        }
    );
    rec.check(
        S,
        "old identity accepted before",
        "200",
        before.summary(),
        accepted,
    );

    let started = Instant::now();
    f.replace_node(&victim)?;
    // The new disk enrolls with a new key and gets a new client certificate.
    let new_pem = v.root.join("etc/ai-memory/tls/client.pem");
    let new_fp = poll(timeout, || {
        cert_fingerprint(&new_pem).filter(|fp| *fp != old_fp)
    })
    .unwrap_or_default();
    rec.check(
        S,
        format!("{victim} re-enrolled with a new client certificate"),
        "a fingerprint other than the old one",
        format!(
            "{}… (old {}…) after {:.1}s",
            new_fp.get(..12).unwrap_or(""),
            old_fp.get(..12).unwrap_or(""),
            started.elapsed().as_secs_f64()
        ),
        !new_fp.is_empty(),
    );
    // Every other peer's allowlist converges: the new fingerprint in, the old one out.
    let stale_now = || -> Vec<String> {
        peers
            .iter()
            .filter(|p| p.name != victim)
            .filter(|p| {
                let list =
                    std::fs::read_to_string(p.root.join("etc/ai-memory/tls/mtls-allowlist.txt"))
                        .unwrap_or_default()
                        .to_lowercase();
                new_fp.is_empty() || !list.contains(&new_fp) || list.contains(&old_fp)
            })
            .map(|p| p.name.clone())
            .collect()
    };
    let allowlists = poll(timeout, || stale_now().is_empty().then_some(()));
    let stale = stale_now();
    rec.check(
        S,
        "every other peer's allowlist: new in, old out",
        format!("{} peers", peers.len() - 1),
        if allowlists.is_some() {
            format!(
                "all converged after {:.1}s",
                started.elapsed().as_secs_f64()
            )
        } else {
            format!("stale: {stale:?}")
        },
        allowlists.is_some(),
    );
    let converged = f.wait_converged(timeout);
    rec.check(
        S,
        "fleet converged after the replacement",
        "every node converged",
        match &converged {
            Ok(_) => format!(
                "{:.1}s after the new disk booted",
                started.elapsed().as_secs_f64()
            ),
            Err(e) => one_line(&format!("{e:#}"), 300),
        },
        converged.is_ok(),
    );
    let after = mtls_health(
        &keep.join("ca.pem"),
        &keep.join("client.pem"),
        &keep.join("client.key"),
        witness.public_ip,
        port,
    );
    let refusal = hiveseed_seeder::suite::net::Refusal::ClientCertificate;
    rec.check(
        S,
        "old client certificate refused by the mesh",
        refusal.expected(),
        after.summary(),
        refusal.seen_in(&after),
    );
    let _ = std::fs::remove_dir_all(&keep);
    // The old droplet's token (in its user_data, in the state file) enrolled the old disk: from
    // another address with another key it is refused, as used.
    let old_token = f
        .user_data
        .get(&victim)
        .and_then(|ud| join_token(ud))
        .unwrap_or_default();
    let (impostor, impostor_private) = stolen_token::impostor_addresses(v.public_ip);
    let got = join_as_impostor(
        f,
        &victim,
        &old_token,
        impostor,
        serde_json::json!({
            "droplet_id": v.facts["droplet_id"],
            "region": v.region,
            "public_ipv4": impostor.to_string(),
            "private_ipv4": impostor_private.to_string(),
        }),
    )?;
    rec.check(
        S,
        format!("the replaced droplet's old token from {impostor}: refused"),
        "bad_token, \"was used at\"",
        got.to_string(),
        got.kind == "bad_token" && got.message.contains("was used at"),
    );
    let (ok, out) = report_green(f, Duration::from_secs(90));
    rec.check(
        S,
        "report green after replace",
        "FAIL=0",
        fails_of(&out),
        ok,
    );
    Ok(())
}

// ---- faults -----------------------------------------------------------------------------

/// An agent SIGKILLed while it applies a new generation; the init system starts it again.
pub fn agent_killed(f: &Fleet, rec: &mut Record) -> Result<()> {
    const S: &str = "faults";
    let peers = f.with_role("peer");
    let victim = peers.last().map(|n| n.name.clone()).unwrap_or_default();
    let before = generations(&f.status()?);
    let text = std::fs::read_to_string(&f.fleet_file)?;
    let current: u64 = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("catchup_interval_secs"))
        .and_then(|v| v.trim().trim_start_matches('=').trim().parse().ok())
        .unwrap_or(5);
    set_fleet_value(
        f,
        "federation",
        "catchup_interval_secs",
        &(current + 1).to_string(),
    )?;
    f.publish()?;
    // Kill it as soon as it works on the new generation (its log says so).
    let log = f.node(&victim)?.root.join("var/log/hiveseed/agent.log");
    let offset = std::fs::metadata(&log).map(|m| m.len()).unwrap_or(0);
    let caught = poll(Duration::from_secs(30), || {
        let text = std::fs::read(&log).ok()?;
        let new = String::from_utf8_lossy(text.get(offset as usize..)?).into_owned();
        new.contains("phase=applying").then_some(())
    })
    .is_some();
    let pid = kill_agent(f, &victim);
    let mid = generations(&f.status()?);
    let phase_at_kill = mid.get(&victim).map(|m| m.2.clone()).unwrap_or_default();
    rec.check(
        S,
        format!("agent on {victim} killed mid-apply"),
        "SIGKILL while applying",
        format!("caught applying={caught}, pid={pid:?}, seeder saw: {phase_at_kill}"),
        caught && pid.is_some(),
    );
    f.start_agent(&victim)?;
    let when = wait_applied(
        f,
        std::slice::from_ref(&victim),
        &before,
        Instant::now(),
        Duration::from_secs(120),
    );
    rec.check(
        S,
        "restarted agent resumes and converges",
        "converged on the new generation",
        format!("{when:?}"),
        when.len() == 1,
    );
    let n = f.processes(&victim, AI_MEMORY, "serve").len();
    rec.check(
        S,
        "still one ai-memory on the node",
        "1",
        n.to_string(),
        n == 1,
    );
    let (ok, out) = report_green(f, Duration::from_secs(90));
    rec.check(
        S,
        "report green after the agent kill",
        "FAIL=0",
        fails_of(&out),
        ok,
    );
    Ok(())
}

/// A pg node reboots: postgres and the agent die, /run is empty, the disk stays.
pub fn pg_rebooted(f: &Fleet, rec: &mut Record) -> Result<()> {
    const S: &str = "faults";
    let pg = f
        .with_role("pg")
        .first()
        .map(|n| n.name.clone())
        .ok_or_else(|| anyhow::anyhow!("no pg node"))?;
    let before = postmaster(f, &pg);
    f.reboot_node(&pg)?;
    let back = poll(Duration::from_secs(120), || {
        postmaster(f, &pg).filter(|p| Some(*p) != before)
    });
    rec.check(
        S,
        format!("{pg} rebooted, postgres back"),
        "a new postmaster",
        format!("{back:?} (was {before:?})"),
        back.is_some(),
    );
    let converged = f.wait_converged(Duration::from_secs(180));
    rec.check(
        S,
        "fleet converged after the pg reboot",
        "every node converged",
        match &converged {
            Ok(_) => "converged".into(),
            Err(e) => one_line(&format!("{e:#}"), 300),
        },
        converged.is_ok(),
    );
    // Peers reconnect: the pg node's own check sees >= 1 TLS backend of ai_memory again.
    let (ok, out) = report_green(f, Duration::from_secs(120));
    rec.check(
        S,
        "peers reconnected, report green",
        "FAIL=0",
        fails_of(&out),
        ok,
    );
    Ok(())
}

/// Reports waiting in a node's spool (`<seq>.json`; the `seq` counter file is not one).
fn spooled(root: &Path) -> usize {
    std::fs::read_dir(root.join("var/lib/hiveseed/spool"))
        .map(|d| {
            d.flatten()
                .filter(|e| e.file_name().to_string_lossy().ends_with(".json"))
                .count()
        })
        .unwrap_or(0)
}

/// A whole bring-up with the seeder SIGKILLed part-way and restarted: the fleet still
/// converges and no node's report sequence has a gap.
pub fn seeder_killed(cfg: &UpConfig, rec: &mut Record, timeout: Duration) -> Result<Fleet> {
    const S: &str = "faults";
    let mut f = crate::fleet::up(cfg)?;
    // Kill it once a pg node is busy installing (the fleet is mid bring-up).
    let busy = poll(Duration::from_secs(120), || {
        let st = f.status().ok()?;
        generations(&st)
            .iter()
            .any(|(n, (_, _, phase))| n.contains("-pg-") && phase.starts_with("applying"))
            .then_some(())
    })
    .is_some();
    f.kill_seeder()?;
    // Down until an agent notices (its report goes to the spool instead).
    let noticed = poll(Duration::from_secs(60), || {
        f.nodes.iter().any(|n| spooled(&n.root) > 0).then_some(())
    })
    .is_some();
    rec.check(
        S,
        "seeder SIGKILLed mid bring-up",
        "killed while a pg node applies; an agent spools",
        format!("pg applying={busy}, reports spooled={noticed}"),
        busy && noticed,
    );
    f.restart_seeder()?;
    let converged = f.wait_converged(timeout);
    rec.check(
        S,
        "fleet converged after the seeder restart",
        "every node converged",
        match &converged {
            Ok(t) => format!("{:.1}s after the first agent start", t.as_secs_f64()),
            Err(e) => one_line(&format!("{e:#}"), 300),
        },
        converged.is_ok(),
    );
    // Spools drain with the next reports; then every node's report sequence is gapless.
    let drained = poll(Duration::from_secs(60), || {
        f.nodes.iter().all(|n| spooled(&n.root) == 0).then_some(())
    })
    .is_some();
    let store = hiveseed_seeder::store::Store::open(&f.campaign_dir.join("state.db"))?;
    let mut gaps = Vec::new();
    for n in &f.nodes {
        let seqs = store.report_seqs(&n.name.parse()?)?;
        let first = seqs.first().copied().unwrap_or(1);
        if seqs.iter().enumerate().any(|(i, s)| *s != first + i as u64) {
            gaps.push(format!("{}: {} reports from {first}", n.name, seqs.len()));
        }
    }
    rec.check(
        S,
        "no report lost (sequences gapless)",
        "no gaps",
        if gaps.is_empty() {
            format!("spools drained={drained}; {} nodes gapless", f.nodes.len())
        } else {
            gaps.join("; ")
        },
        gaps.is_empty() && drained,
    );
    let (ok, out) = report_green(&f, Duration::from_secs(90));
    rec.check(
        S,
        "report green after the seeder kill",
        "FAIL=0",
        fails_of(&out),
        ok,
    );
    Ok(f)
}

// ---- the fleet suite --------------------------------------------------------------------

/// `seeder test` (every group) over the mesh: one check per group (PASS when the group has no
/// FAIL), each failed probe listed, SKIPs with their reasons noted (never counted as PASS).
pub fn suite(f: &Fleet, rec: &mut Record) -> Result<()> {
    const S: &str = "suite";
    let started = Instant::now();
    let out = f
        .seeder_cmd(&["test"])
        .output()
        .map_err(|e| anyhow::anyhow!("seeder test: {e}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    std::fs::write(
        f.lab.dir().join("seeder-test.txt"),
        format!("{stdout}{stderr}"),
    )?;
    let report = std::fs::read_dir(f.campaign_dir.join("reports"))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("test-") && n.ends_with(".json"))
        })
        .max();
    let Some(report) = report else {
        rec.check(
            S,
            "seeder test wrote a report",
            "reports/test-*.json",
            one_line(&stderr, 200),
            false,
        );
        return Ok(());
    };
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(&report)?)?;
    let checks = json["checks"].as_array().cloned().unwrap_or_default();
    let mut groups: BTreeMap<String, (usize, usize, usize)> = BTreeMap::new();
    for c in &checks {
        let g = groups
            .entry(c["group"].as_str().unwrap_or("?").to_owned())
            .or_default();
        match c["status"].as_str() {
            Some("PASS") => g.0 += 1,
            Some("FAIL") => g.1 += 1,
            _ => g.2 += 1,
        }
    }
    for (group, (pass, fail, skip)) in &groups {
        if *pass == 0 && *fail == 0 {
            // Nothing ran (no LLM key, say): not a PASS, not a FAIL; the reasons follow.
            rec.note(format!(
                "suite: group {group} skipped entirely ({skip} SKIP)"
            ));
        }
        let failed: Vec<String> = checks
            .iter()
            .filter(|c| c["group"] == group.as_str() && c["status"] == "FAIL")
            .map(|c| {
                format!(
                    "{}: expected {} got {}",
                    c["test"].as_str().unwrap_or("?"),
                    c["expected"].as_str().unwrap_or("?"),
                    one_line(c["got"].as_str().unwrap_or("?"), 80)
                )
            })
            .collect();
        for c in checks
            .iter()
            .filter(|c| c["group"] == group.as_str() && c["status"] == "SKIP")
        {
            rec.note(format!(
                "suite: SKIP {group}/{}: {}",
                c["test"].as_str().unwrap_or("?"),
                one_line(c["got"].as_str().unwrap_or("?"), 100)
            ));
        }
        if *pass == 0 && *fail == 0 {
            continue;
        }
        rec.check(
            S,
            format!("seeder test --group {group}"),
            "no FAIL",
            if failed.is_empty() {
                format!("PASS={pass} SKIP={skip}")
            } else {
                format!("PASS={pass} FAIL={fail} SKIP={skip}: {}", failed.join("; "))
            },
            *fail == 0 && *pass > 0,
        );
    }
    rec.check(
        S,
        "seeder test exit status",
        "0 (no FAIL)",
        format!(
            "{} in {:.1}s; {}",
            out.status,
            started.elapsed().as_secs_f64(),
            report.display()
        ),
        out.status.success(),
    );
    Ok(())
}
