//! What the suite tests: the peers (in hostname order: P1 is the write anchor), the agents, the
//! regions and their pg nodes, and the evidence only the nodes themselves can gather (pg-side
//! checks, systemd state) from their latest reports. Built from a campaign directory, or by a test
//! from explicit endpoints.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use hiveseed_proto::status::CheckStatus;

use crate::campaign::CampaignDir;
use crate::fleet::Fleet;
use crate::store::Store;

use super::net::{Endpoint, FedSender, Identity};
use crate::attest::KeyStore;

/// Everything a run needs, explicit so it runs against the lab and against test daemons alike.
#[derive(Debug, Clone)]
pub struct Mesh {
    pub campaign: String,
    pub ca_pem: String,
    pub api_key: String,
    /// The client identity every peer's allowlist holds (the campaign's operator certificate).
    pub operator: Identity,
    /// An agent id the peers list under `[admin] agent_ids`: binds harness public keys
    /// (`PUT /api/v1/agents/{id}/pubkey` is admin-gated).
    pub admin_agent_id: String,
    /// The federation identity the harness pushes as (`nsa_gaps/sync_push_*`): a key made for the
    /// run with a credential from the campaign's federation issuer, which every peer trusts.
    pub fed_sender: FedSender,
    /// Peers in hostname order.
    pub peers: Vec<Peer>,
    /// Agent node names in hostname order.
    pub agents: Vec<String>,
    pub quorum_w: u32,
    pub keys: KeyStore,
    /// Why the LLM-backed group cannot run, if it cannot.
    pub llm_missing: Option<String>,
    pub evidence: Evidence,
    pub converge_within: Duration,
    pub poll_every: Duration,
    /// Roots for `wrong_server_ca`: none of the fleet's server certificates may chain to them.
    /// `None`: a CA made for the run.
    pub untrusted_ca_pem: Option<String>,
}

#[derive(Debug, Clone)]
pub struct Peer {
    pub endpoint: Endpoint,
    /// The name of its store on its region's pg node (`ic_peer_K` or `ai_memory_peer_K` by the
    /// region's store layout), which names the pg node's `signed_events.<store>` check.
    pub store: String,
}

impl Peer {
    pub fn name(&self) -> &str {
        &self.endpoint.name
    }
    pub fn region(&self) -> &str {
        &self.endpoint.region
    }
}

/// One check a node reported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reported {
    pub expected: String,
    pub got: String,
    pub status: CheckStatus,
}

#[derive(Debug, Clone, Default)]
pub struct NodeEvidence {
    pub age_secs: u64,
    pub checks: BTreeMap<String, Reported>,
}

/// The nodes' own latest reports, and how old a report may be to count.
#[derive(Debug, Clone, Default)]
pub struct Evidence {
    pub nodes: BTreeMap<String, NodeEvidence>,
    /// region → its pg node.
    pub region_pg: BTreeMap<String, String>,
    pub max_age_secs: u64,
}

/// The answer to "what did node N report for check C", as a report line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Finding {
    Reported(Reported),
    /// No usable report: the reason.
    Absent(String),
}

impl Evidence {
    pub fn check(&self, node: &str, check: &str) -> Finding {
        let Some(n) = self.nodes.get(node) else {
            return Finding::Absent(format!("{node} has not reported"));
        };
        if n.age_secs > self.max_age_secs {
            return Finding::Absent(format!(
                "{node}'s latest report is {}s old (limit {}s)",
                n.age_secs, self.max_age_secs
            ));
        }
        match n.checks.get(check) {
            Some(r) => Finding::Reported(r.clone()),
            None => Finding::Absent(format!("{node} reports no {check} check")),
        }
    }
}

impl Mesh {
    pub fn p1(&self) -> Option<&Peer> {
        self.peers.first()
    }

    /// Reads the campaign: fleet (published or on disk), enrollments (public IPs), the latest
    /// reports, the CA, the operator identity and the API key.
    pub fn from_campaign(dir: &CampaignDir, now: u64) -> Result<Self> {
        if !dir.campaign_file().exists() {
            bail!(
                "{} is not a campaign directory (run `seeder init`)",
                dir.root().display()
            );
        }
        let store = Store::open(&dir.state_db()).context("opening the state database")?;
        let fleet = match store.latest_inputs()? {
            Some(p) => Fleet::parse(&p.fleet)?,
            None => Fleet::load(&dir.read_campaign_file()?.fleet)?,
        };
        let read = |p: std::path::PathBuf| {
            std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))
        };
        let campaign = fleet.campaign.to_string();
        // The seeder host holds the campaign's federation issuer; a credential from it is what
        // the peers' trust bundles accept. No node has this id (theirs are
        // `<campaign>/<region>/<campaign>-<role>-<region>-NN`), so the peers' replay caches
        // keep the harness's nonces apart from any peer's.
        let fed_id: hiveseed_proto::FedId = format!("{campaign}/seeder/test-harness")
            .parse()
            .context("the harness federation id")?;
        let fed_sender = FedSender::mint(
            &dir.load_federation_issuer(&fleet.campaign)?,
            &fed_id,
            i64::try_from(now).context("the clock")?,
        )?;
        let enrollments = store.enrollments()?;
        let port = fleet.federation.port;
        let mut peers = Vec::new();
        let mut names: Vec<_> = fleet.nodes_with_role("peer").collect();
        names.sort_by(|a, b| a.name.as_str().cmp(b.name.as_str()));
        for spec in names {
            // A peer that never enrolled has no address: it is absent from every group, and the
            // fleet view (`seeder status`) says so.
            let Some(e) = enrollments.iter().find(|e| e.node == spec.name) else {
                continue;
            };
            let ip = e.public_ip;
            peers.push(Peer {
                endpoint: Endpoint {
                    name: spec.name.to_string(),
                    region: spec.region.to_string(),
                    base: format!("https://{ip}:{port}").parse()?,
                    connect: Some(SocketAddr::new(ip.into(), port)),
                },
                store: fleet.store_layout(&spec.region).store(spec.index).name,
            });
        }
        let mut agents: Vec<String> = fleet
            .nodes_with_role("agent")
            .filter(|n| enrollments.iter().any(|e| e.node == n.name))
            .map(|n| n.name.to_string())
            .collect();
        agents.sort();
        let mut evidence = Evidence {
            max_age_secs: 3 * u64::from(fleet.ttl.report_interval_secs),
            ..Default::default()
        };
        for n in fleet.nodes_with_role("pg") {
            evidence
                .region_pg
                .insert(n.region.to_string(), n.name.to_string());
        }
        for (r, at) in store.latest_reports()? {
            let checks = r
                .checks
                .iter()
                .map(|c| {
                    (
                        c.check.clone(),
                        Reported {
                            expected: c.expected.clone(),
                            got: c.got.clone(),
                            status: c.status,
                        },
                    )
                })
                .collect();
            evidence.nodes.insert(
                r.node.to_string(),
                NodeEvidence {
                    age_secs: now.saturating_sub(at),
                    checks,
                },
            );
        }
        // The peers have an LLM only when the fleet gives them one (`[llm]`), with the operator's
        // key from the campaign directory.
        let llm_key = dir.llm_api_key();
        let llm_missing = match (&fleet.llm, llm_key.exists()) {
            (None, _) => Some("no LLM key: the fleet has no [llm], the peers have no LLM".into()),
            (Some(_), false) => Some(format!(
                "no LLM key ({} is absent, so the peers have none)",
                llm_key.display()
            )),
            (Some(_), true) => None,
        };
        Ok(Mesh {
            admin_agent_id: CampaignDir::operator_agent_id(&campaign),
            campaign,
            ca_pem: read(dir.ca_cert())?,
            api_key: read(dir.api_key())?.trim().to_owned(),
            operator: Identity {
                label: "operator".into(),
                cert_pem: read(dir.operator_cert())?,
                key_pem: read(dir.operator_key())?,
            },
            fed_sender,
            peers,
            agents,
            quorum_w: fleet.federation.quorum_w,
            keys: KeyStore::new(dir.agent_keys_dir()),
            llm_missing,
            evidence,
            converge_within: Duration::from_secs(40),
            poll_every: Duration::from_secs(1),
            untrusted_ca_pem: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_and_missing_evidence_is_absent_with_a_reason() {
        let mut ev = Evidence {
            max_age_secs: 15,
            ..Default::default()
        };
        let mut checks = BTreeMap::new();
        checks.insert(
            "daemon_pg.tls".to_string(),
            Reported {
                expected: "e".into(),
                got: "e".into(),
                status: CheckStatus::Pass,
            },
        );
        ev.nodes.insert(
            "pg1".into(),
            NodeEvidence {
                age_secs: 5,
                checks: checks.clone(),
            },
        );
        ev.nodes.insert(
            "pg2".into(),
            NodeEvidence {
                age_secs: 16,
                checks,
            },
        );
        assert!(matches!(
            ev.check("pg1", "daemon_pg.tls"),
            Finding::Reported(_)
        ));
        let Finding::Absent(why) = ev.check("pg2", "daemon_pg.tls") else {
            panic!()
        };
        assert!(why.contains("16s old"), "{why}");
        let Finding::Absent(why) = ev.check("pg1", "other") else {
            panic!()
        };
        assert!(why.contains("reports no other"), "{why}");
        assert!(matches!(ev.check("pg3", "x"), Finding::Absent(_)));
    }

    /// `seeder test` on a campaign: the harness pushes with a credential from the campaign's own
    /// federation issuer, for the trust domain the peers are given.
    #[test]
    fn the_campaign_issuer_vouches_for_the_harness_sender() {
        let tmp = tempfile::tempdir().unwrap();
        let example = include_str!("../../../roles/fleet.example.toml");
        let fleet_path = tmp.path().join("fleet.toml");
        std::fs::write(&fleet_path, example).unwrap();
        let fleet = Fleet::parse(example).unwrap();
        let dir = CampaignDir::new(tmp.path().join("campaign"));
        let now = std::time::SystemTime::now();
        crate::campaign::init(&dir, &fleet_path, tmp.path(), &fleet, now).unwrap();
        let unix = now.duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
        let mesh = Mesh::from_campaign(&dir, unix).unwrap();

        let issuer = dir.load_federation_issuer(&fleet.campaign).unwrap();
        let p = issuer.public();
        let sender = &mesh.fed_sender;
        assert_eq!(
            sender.fed_id,
            format!("{}/seeder/test-harness", fleet.campaign)
        );
        let headers = sender.push_headers(b"{}", Some("n"));
        let cred = &headers
            .iter()
            .find(|(k, _)| *k == "x-memory-cred")
            .unwrap()
            .1;
        let claims = crate::credential::verify(
            cred,
            &[(p.id.as_str(), p.public_key.verifying_key())],
            Some(&format!("{}.fleet", fleet.campaign)),
            i64::try_from(unix).unwrap(),
        )
        .unwrap();
        assert_eq!(claims.subject_agent_id, sender.fed_id);
        assert_eq!(claims.not_after - claims.not_before, 3600 + 30);
    }
}
