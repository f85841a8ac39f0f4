//! The fleet view (`seeder status`, `GET /v1/status`) and the validation report (`seeder report`).
//!
//! A node silent for longer than twice its report interval is **missing**, never healthy.

use hiveseed_proto::status::{CheckRecord, CheckStatus, Phase};
use hiveseed_proto::NodeName;
use serde::{Deserialize, Serialize};

use crate::fleet::Fleet;
use crate::store::{Store, StoreError};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeStatus {
    pub name: String,
    pub role: String,
    pub region: String,
    pub enrolled: bool,
    pub public_ip: Option<String>,
    pub private_ip: Option<String>,
    /// The droplet the node's enrollment is bound to (attested when the fleet has
    /// `[attestation]`, else as the agent reported it).
    #[serde(default)]
    pub droplet_id: Option<u64>,
    /// The generation the seeder publishes for this node.
    pub generation: Option<u64>,
    /// The generation the node last reported applying.
    pub applied_generation: Option<u64>,
    pub phase: String,
    pub last_report_age_secs: Option<u64>,
    pub missing: bool,
    pub converged: bool,
    pub checks_pass: usize,
    pub checks_fail: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FleetView {
    pub campaign: String,
    pub at: u64,
    pub nodes: Vec<NodeStatus>,
    pub total: usize,
    pub enrolled: usize,
    pub converged: usize,
    pub missing: usize,
    /// Every node enrolled, reported converged on its current generation, and not missing.
    pub all_converged: bool,
}

pub fn fleet_view(store: &Store, fleet: &Fleet, now: u64) -> Result<FleetView, StoreError> {
    let enrollments = store.enrollments()?;
    let manifests = store.manifests()?;
    let reports = store.latest_reports()?;
    let silent_after = 2 * u64::from(fleet.ttl.report_interval_secs);
    let mut nodes = Vec::new();
    for spec in &fleet.nodes {
        let e = enrollments.iter().find(|e| e.node == spec.name);
        let generation = manifests
            .iter()
            .find(|m| m.node == spec.name)
            .map(|m| m.generation.0);
        let report = reports.iter().find(|(r, _)| r.node == spec.name);
        let age = report.map(|(_, at)| now.saturating_sub(*at));
        let missing = e.is_some() && age.map(|a| a > silent_after).unwrap_or(true);
        let applied = report.and_then(|(r, _)| r.generation.map(|g| g.0));
        let phase = match report {
            Some((r, _)) => r.phase.label(),
            None if e.is_some() => "enrolled, not reported".into(),
            None => "not enrolled".into(),
        };
        let converged = !missing
            && matches!(report, Some((r, _)) if r.phase == Phase::Converged)
            && applied.is_some()
            && applied == generation;
        let (checks_pass, checks_fail) = report
            .map(|(r, _)| {
                (
                    r.checks
                        .iter()
                        .filter(|c| c.status == CheckStatus::Pass)
                        .count(),
                    r.checks
                        .iter()
                        .filter(|c| c.status == CheckStatus::Fail)
                        .count(),
                )
            })
            .unwrap_or((0, 0));
        nodes.push(NodeStatus {
            name: spec.name.to_string(),
            role: spec.role.to_string(),
            region: spec.region.to_string(),
            enrolled: e.is_some(),
            public_ip: e.map(|e| e.public_ip.to_string()),
            private_ip: e.map(|e| e.private_ip.to_string()),
            droplet_id: e.map(|e| e.droplet_id),
            generation,
            applied_generation: applied,
            phase,
            last_report_age_secs: age,
            missing,
            converged,
            checks_pass,
            checks_fail,
        });
    }
    let total = nodes.len();
    let enrolled = nodes.iter().filter(|n| n.enrolled).count();
    let converged = nodes.iter().filter(|n| n.converged).count();
    let missing = nodes.iter().filter(|n| n.missing).count();
    Ok(FleetView {
        campaign: fleet.campaign.to_string(),
        at: now,
        nodes,
        total,
        enrolled,
        converged,
        missing,
        all_converged: total > 0 && converged == total,
    })
}

/// A human table of the fleet view.
pub fn status_table(v: &FleetView) -> String {
    let mut out = format!(
        "{:<28} {:<6} {:<6} {:<15} {:<12} {:>4} {:>4} {:<6} {}\n",
        "NODE", "ROLE", "REGION", "PUBLIC_IP", "DROPLET", "GEN", "APPL", "CHECKS", "PHASE"
    );
    for n in &v.nodes {
        let opt = |g: Option<u64>| g.map(|g| g.to_string()).unwrap_or_else(|| "-".into());
        let phase = if n.missing && n.enrolled {
            format!(
                "MISSING (last report {}s ago; was {})",
                opt(n.last_report_age_secs),
                n.phase
            )
        } else {
            n.phase.clone()
        };
        out.push_str(&format!(
            "{:<28} {:<6} {:<6} {:<15} {:<12} {:>4} {:>4} {:<6} {}\n",
            n.name,
            n.role,
            n.region,
            n.public_ip.as_deref().unwrap_or("-"),
            opt(n.droplet_id),
            opt(n.generation),
            opt(n.applied_generation),
            format!("{}/{}", n.checks_pass, n.checks_pass + n.checks_fail),
            phase
        ));
    }
    out.push_str(&format!(
        "TOTAL={} ENROLLED={} CONVERGED={} MISSING={}\n",
        v.total, v.enrolled, v.converged, v.missing
    ));
    out
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ValidationReport {
    pub campaign: String,
    pub timestamp: String,
    pub expected: serde_json::Value,
    pub checks: Vec<CheckRecord>,
}

impl ValidationReport {
    pub fn passed(&self) -> bool {
        !self.checks.is_empty() && self.checks.iter().all(|c| c.status == CheckStatus::Pass)
    }
}

/// The validation report: per node, whether it is present and converged, then every node-local
/// check it reported (reference spec §7), then `fleet` records from the seeder's own probes.
pub fn validation_report(
    store: &Store,
    fleet: &Fleet,
    now: u64,
    timestamp: String,
    fleet_checks: Vec<CheckRecord>,
) -> Result<ValidationReport, StoreError> {
    let view = fleet_view(store, fleet, now)?;
    let reports = store.latest_reports()?;
    let mut checks = Vec::new();
    for n in &view.nodes {
        let node: NodeName = n.name.parse().expect("fleet names are valid");
        let presence = if !n.enrolled {
            "not enrolled".to_string()
        } else if n.missing {
            format!(
                "missing (silent {}s)",
                n.last_report_age_secs
                    .map(|a| a.to_string())
                    .unwrap_or("-".into())
            )
        } else {
            "reporting".to_string()
        };
        checks.push(CheckRecord::compare(
            node.clone(),
            "node.present",
            "reporting",
            presence,
        ));
        let gen = |g: Option<u64>| g.map(|g| g.to_string()).unwrap_or_else(|| "-".into());
        checks.push(CheckRecord::compare(
            node.clone(),
            "node.converged",
            format!("converged on generation {}", gen(n.generation)),
            if n.phase == "converged" {
                format!("converged on generation {}", gen(n.applied_generation))
            } else {
                n.phase.clone()
            },
        ));
        if let Some((r, _)) = reports.iter().find(|(r, _)| r.node == node) {
            // A missing node's old checks are not evidence of anything now.
            if !n.missing {
                checks.extend(r.checks.iter().cloned());
            }
        }
    }
    checks.extend(fleet_checks);
    Ok(ValidationReport {
        campaign: fleet.campaign.to_string(),
        timestamp,
        expected: serde_json::json!({
            "version": fleet.pins.ai_memory.version,
            "schema": fleet.pins.ai_memory.schema,
            "golden_sha256": fleet.pins.ai_memory.sha256.to_hex(),
        }),
        checks,
    })
}

pub fn validation_table(r: &ValidationReport) -> String {
    let mut out = format!("{:<28} {:<28} {:<6} {}\n", "NODE", "CHECK", "STATUS", "GOT");
    for c in &r.checks {
        out.push_str(&format!(
            "{:<28} {:<28} {:<6} {}\n",
            c.node,
            c.check,
            c.status.as_str(),
            c.got
        ));
    }
    let pass = r
        .checks
        .iter()
        .filter(|c| c.status == CheckStatus::Pass)
        .count();
    let fail = r
        .checks
        .iter()
        .filter(|c| c.status == CheckStatus::Fail)
        .count();
    let skip = r
        .checks
        .iter()
        .filter(|c| c.status == CheckStatus::Skip)
        .count();
    out.push_str(&format!(
        "TOTAL={} PASS={pass} FAIL={fail} SKIP={skip}\n",
        r.checks.len()
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Enrollment, StoredManifest};
    use hiveseed_proto::status::StatusReport;
    use hiveseed_proto::{Generation, Sha256};

    const EXAMPLE: &str = include_str!("../../roles/fleet.example.toml");

    #[test]
    fn silent_nodes_are_missing_and_fail_the_report() {
        let fleet = Fleet::parse(EXAMPLE).unwrap();
        let store = Store::open_in_memory().unwrap();
        let node: NodeName = "do-1461-pg-nyc3-01".parse().unwrap();
        store
            .enroll(
                &Enrollment {
                    node: node.clone(),
                    droplet_id: 1,
                    public_ip: "127.1.1.10".parse().unwrap(),
                    private_ip: "127.0.1.10".parse().unwrap(),
                    identity_fpr: "a".into(),
                    key_fpr: "k".into(),
                    token_nonce: "n".into(),
                    enrolled_at: 100,
                },
                &crate::store::CertRecord {
                    fpr: "a".into(),
                    node: node.clone(),
                    purpose: "identity".into(),
                    pem: String::new(),
                    issued_at: 100,
                    not_after: 1000,
                    revoked_at: None,
                },
            )
            .unwrap();
        store
            .put_manifest(&StoredManifest {
                node: node.clone(),
                generation: Generation(1),
                digest: Sha256::digest(b""),
                envelope: "{}".into(),
                published_at: 100,
            })
            .unwrap();
        store
            .put_report(
                &StatusReport {
                    node: node.clone(),
                    seq: 1,
                    at: 100,
                    phase: Phase::Converged,
                    generation: Some(Generation(1)),
                    digest: Some(Sha256::digest(b"")),
                    resources: vec![],
                    services: Vec::new(),
                    checks: vec![CheckRecord::compare(
                        node.clone(),
                        "store.pg_version",
                        "17",
                        "17",
                    )],
                },
                100,
            )
            .unwrap();

        let v = fleet_view(&store, &fleet, 110).unwrap();
        let n = v.nodes.iter().find(|n| n.name == node.as_str()).unwrap();
        assert!(n.converged && !n.missing);
        assert!(!v.all_converged, "11 nodes never enrolled");

        // 61 s later with a 30 s interval: missing, not converged, and its old checks are dropped.
        let v = fleet_view(&store, &fleet, 161).unwrap();
        let n = v.nodes.iter().find(|n| n.name == node.as_str()).unwrap();
        assert!(n.missing && !n.converged);
        let r = validation_report(&store, &fleet, 161, "t".into(), vec![]).unwrap();
        assert!(!r.passed());
        let present = r
            .checks
            .iter()
            .find(|c| c.node == node && c.check == "node.present")
            .unwrap();
        assert_eq!(present.status, CheckStatus::Fail);
        assert!(present.got.starts_with("missing"), "{}", present.got);
        assert!(!r.checks.iter().any(|c| c.check == "store.pg_version"));
        assert!(validation_table(&r).contains("FAIL"));
    }
}
