//! Source-address identity for lab nodes (lab-feasibility §8).
//!
//! Every lab node shares the host's kernel and `lo`, so a daemon inside a node that connects to
//! another node's 127.x address leaves from 127.0.0.1 — and pg_hba, which admits each peer's
//! private /32 like a VPC would, refuses it. On DigitalOcean the kernel picks the droplet's VPC
//! address. The lab gets the same by policy routing on uid: each node's service account has its own
//! uid (fleet `accounts.service_uid_base`), and a rule sends that uid's lookups to a table whose
//! only route is `local 127.0.0.0/8 src <the node's private address>`.
//!
//! The kernel's `lookup local` rule sits at preference 0, ahead of everything; it is moved to 1000
//! so the uid rules (preference 100) are consulted first. [`teardown`] puts it back. Both are safe
//! to run twice and record what they did in `<lab>/routes.json`, so a crashed run can be undone.

use std::net::Ipv4Addr;
use std::path::Path;
use std::process::Command;

use serde::{Deserialize, Serialize};

type Result<T> = anyhow::Result<T>;

/// Preference of the per-uid rules; below [`LOCAL_PREF`].
const UID_PREF: u32 = 100;
/// Where the `lookup local` rule moves while the lab runs.
const LOCAL_PREF: u32 = 1000;

/// One node's rule: processes of `uid` connect from `source`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct UidRoute {
    pub uid: u32,
    pub source: Ipv4Addr,
}

impl UidRoute {
    /// The routing table carries the uid's number (uids start at 1000, clear of the kernel's
    /// reserved tables 253..=255).
    fn table(&self) -> String {
        self.uid.to_string()
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Recorded {
    routes: Vec<UidRoute>,
}

fn ip(args: &[&str]) -> Result<String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| anyhow::anyhow!("ip {}: {e}", args.join(" ")))?;
    if !out.status.success() {
        anyhow::bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Whether `ip rule` lists a rule at `pref` whose text contains `what`.
fn has_rule(pref: u32, what: &str) -> Result<bool> {
    let rules = ip(&["rule", "show"])?;
    let prefix = format!("{pref}:");
    Ok(rules
        .lines()
        .any(|l| l.starts_with(&prefix) && l.contains(what)))
}

fn record_path(lab_dir: &Path) -> std::path::PathBuf {
    lab_dir.join("routes.json")
}

/// Installs the rules for `routes` (replacing any earlier lab's).
pub fn setup(lab_dir: &Path, routes: &[UidRoute]) -> Result<()> {
    teardown(lab_dir)?;
    // Record first: if anything below fails half-way, teardown still knows what to remove.
    let rec = Recorded {
        routes: routes.to_vec(),
    };
    std::fs::write(record_path(lab_dir), serde_json::to_vec_pretty(&rec)?)
        .map_err(|e| anyhow::anyhow!("writing routes.json: {e}"))?;
    if routes.is_empty() {
        return Ok(());
    }
    if !has_rule(LOCAL_PREF, "lookup local")? {
        ip(&[
            "rule",
            "add",
            "pref",
            &LOCAL_PREF.to_string(),
            "lookup",
            "local",
        ])?;
    }
    if has_rule(0, "lookup local")? {
        ip(&["rule", "del", "pref", "0", "lookup", "local"])?;
    }
    for r in routes {
        let src = r.source.to_string();
        ip(&[
            "route",
            "replace",
            "local",
            "127.0.0.0/8",
            "dev",
            "lo",
            "src",
            &src,
            "table",
            &r.table(),
        ])?;
        let range = format!("{0}-{0}", r.uid);
        ip(&[
            "rule",
            "add",
            "pref",
            &UID_PREF.to_string(),
            "uidrange",
            &range,
            "lookup",
            &r.table(),
        ])?;
    }
    Ok(())
}

/// Removes what [`setup`] recorded and restores the `lookup local` rule at preference 0.
pub fn teardown(lab_dir: &Path) -> Result<()> {
    let path = record_path(lab_dir);
    let rec: Recorded = match std::fs::read(&path) {
        Ok(b) => serde_json::from_slice(&b).unwrap_or_default(),
        Err(_) => Recorded::default(),
    };
    for r in &rec.routes {
        let range = format!("{0}-{0}", r.uid);
        // Every copy (an interrupted setup may have added one twice).
        while has_rule(UID_PREF, &format!("uidrange {range}"))? {
            ip(&[
                "rule",
                "del",
                "pref",
                &UID_PREF.to_string(),
                "uidrange",
                &range,
            ])?;
        }
        let _ = ip(&["route", "flush", "table", &r.table()]);
    }
    if !has_rule(0, "lookup local")? {
        ip(&["rule", "add", "pref", "0", "lookup", "local"])?;
    }
    if has_rule(LOCAL_PREF, "lookup local")? {
        ip(&[
            "rule",
            "del",
            "pref",
            &LOCAL_PREF.to_string(),
            "lookup",
            "local",
        ])?;
    }
    let _ = std::fs::remove_file(&path);
    Ok(())
}
