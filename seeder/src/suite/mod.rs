//! `seeder test`: the seed's full-spectrum fleet suite (reference spec §8), run from the operator
//! host as an mTLS client of the mesh with the campaign's operator identity, CA and API key.
//!
//! Probes take explicit targets ([`mesh::Mesh`]), so the same code runs against the lab fleet
//! and against daemons a test starts. What only a node can see (pg-side TLS, the signed-events
//! chain, systemd state) comes from that node's own latest report, and only while it is fresh.
//! SKIP says why and never counts as PASS.

pub use crate::attest;
pub mod groups;
pub mod mesh;
pub mod net;
pub mod probes;

use hiveseed_proto::status::{CheckRecord, CheckStatus};
use hiveseed_proto::NodeName;
use serde::{Deserialize, Serialize};

pub use mesh::Mesh;
pub use probes::Check;

/// The suite's groups, in the seed's order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub enum Group {
    #[value(name = "regression")]
    Regression,
    #[value(name = "crypto")]
    Crypto,
    #[value(name = "federation")]
    Federation,
    #[value(name = "zerotouch")]
    Zerotouch,
    #[value(name = "a2a")]
    A2a,
    #[value(name = "ai_nhi")]
    AiNhi,
    #[value(name = "nsa_gaps")]
    NsaGaps,
    #[value(name = "encrypted_legs")]
    EncryptedLegs,
    #[value(name = "curator")]
    Curator,
}

impl Group {
    pub const ALL: [Group; 9] = [
        Group::Regression,
        Group::Crypto,
        Group::Federation,
        Group::Zerotouch,
        Group::A2a,
        Group::AiNhi,
        Group::NsaGaps,
        Group::EncryptedLegs,
        Group::Curator,
    ];
}

/// Runs the groups (all when empty) in the seed's order, then deletes what it created and checks
/// it gone (a `cleanup[<row>]` row after each probe row that created memories).
pub async fn run(mesh: &Mesh, groups: &[Group]) -> Vec<Check> {
    let mut chosen: Vec<Group> = if groups.is_empty() {
        Group::ALL.to_vec()
    } else {
        groups.to_vec()
    };
    chosen.sort();
    chosen.dedup();
    let mut run = probes::Run::new(mesh);
    for g in chosen {
        tracing::info!(group = ?g, "suite group");
        match g {
            Group::Regression => groups::regression(&mut run).await,
            Group::Crypto => groups::crypto(&mut run).await,
            Group::Federation => groups::federation(&mut run).await,
            Group::Zerotouch => groups::zerotouch(&mut run).await,
            Group::A2a => groups::a2a(&mut run).await,
            Group::AiNhi => groups::ai_nhi(&mut run).await,
            Group::NsaGaps => groups::nsa_gaps(&mut run).await,
            Group::EncryptedLegs => groups::encrypted_legs(&mut run).await,
            Group::Curator => groups::curator(&mut run).await,
        }
    }
    run.cleanup().await;
    run.checks
}

/// `seeder test --dir`: runs against the campaign's fleet, writes `reports/test-<ts>.json`,
/// prints the table; whether nothing failed.
/// `seeder report`'s fleet rows (reference spec §7): the seed's `federation.write` on P1 (the
/// first peer by name, attested, collective, namespace `_verify`) and `federation.convergence`
/// on every other peer (the seed read it on P2 only, the same region; here every region), from
/// the `federation` group's probe; the memory is deleted afterwards, and `federation.write` fails
/// unless it is then gone (GET 404) on every peer.
pub fn fleet_probes(dir: &crate::campaign::CampaignDir) -> anyhow::Result<Vec<CheckRecord>> {
    let now = (crate::state::system_clock())();
    let mesh = Mesh::from_campaign(dir, now)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let checks = rt.block_on(run(&mesh, &[Group::Federation]));
    Ok(fleet_rows(&mesh, &checks))
}

/// The federation group's checks as report rows. A failed enrollment shows in the write row's
/// GOT (the write fails); a failed cleanup of the written memory fails the write row.
pub fn fleet_rows(mesh: &Mesh, checks: &[Check]) -> Vec<CheckRecord> {
    let Some(p1) = mesh.p1() else {
        return Vec::new();
    };
    let p1_name: NodeName = match p1.name().parse() {
        Ok(n) => n,
        Err(_) => return Vec::new(),
    };
    let cleanup = checks
        .iter()
        .find(|c| c.group == "federation" && c.test == "cleanup[write]");
    let mut rows = Vec::new();
    for c in checks {
        if c.group != "federation" {
            continue;
        }
        let (node, check) = if c.test == "write" {
            if let Some(cl) = cleanup.filter(|cl| cl.status == CheckStatus::Fail) {
                rows.push(CheckRecord {
                    node: p1_name.clone(),
                    check: "federation.write".into(),
                    expected: format!("{}; then {}", c.expected, cl.expected),
                    got: format!("{}; cleanup: {}", c.got, cl.got),
                    status: CheckStatus::Fail,
                });
                continue;
            }
            (p1_name.clone(), "federation.write")
        } else if let Some(peer) = c
            .test
            .strip_prefix("converge_same_region[")
            .or_else(|| c.test.strip_prefix("converge_cross_region["))
            .and_then(|r| r.strip_suffix(']'))
        {
            match peer.parse() {
                Ok(n) => (n, "federation.convergence"),
                Err(_) => continue,
            }
        } else {
            continue;
        };
        rows.push(CheckRecord {
            node,
            check: check.into(),
            expected: c.expected.clone(),
            got: c.got.clone(),
            status: c.status,
        });
    }
    if mesh.peers.len() < 2 {
        rows.push(CheckRecord {
            node: p1_name,
            check: "federation.convergence".into(),
            expected: "a second peer".into(),
            got: format!("{} peer(s) enrolled", mesh.peers.len()),
            status: CheckStatus::Fail,
        });
    }
    rows
}

pub fn run_campaign(dir: &crate::campaign::CampaignDir, groups: &[Group]) -> anyhow::Result<bool> {
    use anyhow::Context;
    let now = (crate::state::system_clock())();
    let mesh = Mesh::from_campaign(dir, now)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let checks = rt.block_on(run(&mesh, groups));
    let timestamp = time::OffsetDateTime::now_utc().format(&time::macros::format_description!(
        "[year][month][day]T[hour][minute][second]Z"
    ))?;
    let report = SuiteReport {
        campaign: mesh.campaign.clone(),
        timestamp: timestamp.clone(),
        suite: "p3-full-spectrum".into(),
        checks,
    };
    std::fs::create_dir_all(dir.reports_dir())?;
    let path = dir.reports_dir().join(format!("test-{timestamp}.json"));
    crate::campaign::write_atomic(
        &path,
        serde_json::to_string_pretty(&report)?.as_bytes(),
        0o644,
    )
    .with_context(|| format!("writing {}", path.display()))?;
    print!("{}", report.table());
    println!("report: {}", path.display());
    Ok(report.passed())
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SuiteReport {
    pub campaign: String,
    pub timestamp: String,
    pub suite: String,
    pub checks: Vec<Check>,
}

impl SuiteReport {
    pub fn count(&self, s: CheckStatus) -> usize {
        self.checks.iter().filter(|c| c.status == s).count()
    }

    /// Exit 0 iff nothing failed (SKIP is not a failure, and not a pass).
    pub fn passed(&self) -> bool {
        self.count(CheckStatus::Fail) == 0
    }

    pub fn table(&self) -> String {
        let mut out = format!("{:<15} {:<48} {:<6} {}\n", "GROUP", "TEST", "STATUS", "GOT");
        for c in &self.checks {
            out.push_str(&format!(
                "{:<15} {:<48} {:<6} {}\n",
                c.group,
                c.test,
                c.status.as_str(),
                net::one_line(&c.got, 200)
            ));
        }
        out.push_str(&format!(
            "TOTAL={} PASS={} FAIL={} SKIP={}\n",
            self.checks.len(),
            self.count(CheckStatus::Pass),
            self.count(CheckStatus::Fail),
            self.count(CheckStatus::Skip)
        ));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(status: CheckStatus) -> Check {
        Check {
            group: "g".into(),
            test: "t".into(),
            expected: "e".into(),
            got: "x\ny".into(),
            status,
        }
    }

    #[test]
    fn skip_is_neither_pass_nor_fail() {
        let mut r = SuiteReport {
            campaign: "c".into(),
            timestamp: "t".into(),
            suite: "p3-full-spectrum".into(),
            checks: vec![check(CheckStatus::Pass), check(CheckStatus::Skip)],
        };
        assert!(r.passed());
        let t = r.table();
        assert!(t.contains("TOTAL=2 PASS=1 FAIL=0 SKIP=1"), "{t}");
        assert!(!t.contains("x\ny"), "got is one line");
        r.checks.push(check(CheckStatus::Fail));
        assert!(!r.passed());
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["checks"][2]["status"], "FAIL");
        assert_eq!(json["suite"], "p3-full-spectrum");
    }

    #[test]
    fn group_names_are_the_seeds() {
        use clap::ValueEnum;
        let names: Vec<String> = Group::ALL
            .iter()
            .map(|g| g.to_possible_value().unwrap().get_name().to_owned())
            .collect();
        assert_eq!(
            names,
            [
                "regression",
                "crypto",
                "federation",
                "zerotouch",
                "a2a",
                "ai_nhi",
                "nsa_gaps",
                "encrypted_legs",
                "curator"
            ]
        );
    }
}
