//! What the suite tests: the peers (in hostname order: P1 is the write anchor), the agents, the
//! regions and their pg nodes, and the evidence only the nodes themselves can gather (pg-side
//! checks, systemd state) from their latest reports. Built from a campaign directory, or by a test
//! from explicit endpoints.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use hiveseed_proto::status::{CheckStatus, StatusReport};
use hiveseed_proto::NodeName;

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
    /// Since the seeder received it.
    pub age_secs: u64,
    /// Unix seconds when the node measured it (the report's own `at`, made right after its
    /// checks ran).
    pub reported_at: u64,
    pub checks: BTreeMap<String, Reported>,
    /// unit → automatic restarts, as the node's service manager counts them.
    pub restarts: BTreeMap<String, u32>,
}

impl NodeEvidence {
    fn of(report: &StatusReport, received_at: u64, now: u64) -> Self {
        let checks = report
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
        let restarts = report
            .services
            .iter()
            .map(|s| (s.unit.clone(), s.restarts))
            .collect();
        NodeEvidence {
            age_secs: now.saturating_sub(received_at),
            reported_at: report.at,
            checks,
            restarts,
        }
    }
}

/// A unit's restart count as a node reported it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Restarts {
    pub restarts: u32,
    pub reported_at: u64,
    pub age_secs: u64,
}

/// The nodes' own latest reports, and how old a report may be to count.
#[derive(Debug, Clone, Default)]
pub struct Evidence {
    pub nodes: BTreeMap<String, NodeEvidence>,
    /// region → its pg node.
    pub region_pg: BTreeMap<String, String>,
    pub max_age_secs: u64,
    /// The campaign's state database, where the seeder keeps receiving reports while the suite
    /// runs: [`Evidence::latest`] reads it again for a check taken after a probe's own write.
    /// `None` (daemons a test started): the snapshot is all there is.
    pub state_db: Option<PathBuf>,
}

/// The answer to "what did node N report for check C", as a report line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Finding {
    Reported(Reported),
    /// No usable report: the reason.
    Absent(String),
}

impl Evidence {
    /// `node`'s latest report as it is now in the state database (the snapshot without one).
    pub fn latest(&self, node: &str, now: u64) -> Result<NodeEvidence, String> {
        let Some(db) = &self.state_db else {
            return self
                .nodes
                .get(node)
                .cloned()
                .ok_or_else(|| format!("{node} has not reported"));
        };
        let name: NodeName = node.parse().map_err(|e| format!("{node}: {e}"))?;
        let latest = Store::open(db)
            .and_then(|s| s.latest_report(&name))
            .map_err(|e| format!("reading {node}'s latest report: {e}"))?;
        match latest {
            Some((report, received_at)) => Ok(NodeEvidence::of(&report, received_at, now)),
            None => Err(format!("{node} has not reported")),
        }
    }

    /// The node's latest report if it is recent enough to count; else why not.
    fn fresh(&self, node: &str) -> Result<&NodeEvidence, String> {
        let Some(n) = self.nodes.get(node) else {
            return Err(format!("{node} has not reported"));
        };
        if n.age_secs > self.max_age_secs {
            return Err(format!(
                "{node}'s latest report is {}s old (limit {}s)",
                n.age_secs, self.max_age_secs
            ));
        }
        Ok(n)
    }

    pub fn check(&self, node: &str, check: &str) -> Finding {
        let n = match self.fresh(node) {
            Ok(n) => n,
            Err(why) => return Finding::Absent(why),
        };
        match n.checks.get(check) {
            Some(r) => Finding::Reported(r.clone()),
            None => Finding::Absent(format!("{node} reports no {check} check")),
        }
    }

    /// `unit`'s restart count from the node's latest fresh report; else why there is none.
    pub fn restarts(&self, node: &str, unit: &str) -> Result<Restarts, String> {
        let n = self.fresh(node)?;
        match n.restarts.get(unit) {
            Some(&restarts) => Ok(Restarts {
                restarts,
                reported_at: n.reported_at,
                age_secs: n.age_secs,
            }),
            None => Err(format!("{node} reports no restart count for {unit}")),
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
            state_db: Some(dir.state_db()),
            ..Default::default()
        };
        for n in fleet.nodes_with_role("pg") {
            evidence
                .region_pg
                .insert(n.region.to_string(), n.name.to_string());
        }
        for (r, received_at) in store.latest_reports()? {
            evidence
                .nodes
                .insert(r.node.to_string(), NodeEvidence::of(&r, received_at, now));
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
                ..Default::default()
            },
        );
        ev.nodes.insert(
            "pg2".into(),
            NodeEvidence {
                age_secs: 16,
                checks,
                ..Default::default()
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

    /// Peers whose latest reports (4 s old, measured at `AT`) count the curator's restarts as
    /// given; `None`: the peer reported no count.
    fn mesh_with_curator_restarts(peers: &[(&str, Option<u32>)]) -> Mesh {
        const AT: u64 = 1_780_000_000;
        let mut evidence = Evidence {
            max_age_secs: 15,
            ..Default::default()
        };
        for (name, count) in peers {
            let mut restarts = BTreeMap::new();
            restarts.insert("ai-memory.service".to_owned(), 0);
            if let Some(n) = count {
                restarts.insert("ai-memory-curator.service".to_owned(), *n);
            }
            evidence.nodes.insert(
                (*name).into(),
                NodeEvidence {
                    age_secs: 4,
                    reported_at: AT,
                    checks: BTreeMap::new(),
                    restarts,
                },
            );
        }
        Mesh {
            campaign: "c1".into(),
            ca_pem: String::new(),
            api_key: String::new(),
            operator: Identity {
                label: "operator".into(),
                cert_pem: String::new(),
                key_pem: String::new(),
            },
            admin_agent_id: "ai:c1-operator@c1".into(),
            fed_sender: FedSender::mint(
                &crate::credential::Issuer::new(
                    ed25519_dalek::SigningKey::from_bytes(&[7; 32]),
                    &"c1".parse().unwrap(),
                ),
                &"c1/seeder/test-harness".parse().unwrap(),
                i64::try_from(AT).unwrap(),
            )
            .unwrap(),
            peers: peers
                .iter()
                .map(|(name, _)| Peer {
                    endpoint: Endpoint {
                        name: (*name).into(),
                        region: "r1".into(),
                        base: "https://127.0.0.1:9077".parse().unwrap(),
                        connect: None,
                    },
                    store: "ai_memory_peer_1".into(),
                })
                .collect(),
            agents: Vec::new(),
            quorum_w: 2,
            keys: KeyStore::new("/nonexistent"),
            llm_missing: None,
            evidence,
            converge_within: Duration::from_secs(1),
            poll_every: Duration::from_millis(100),
            untrusted_ca_pem: None,
        }
    }

    /// `curator_no_crashloop` was a permanent SKIP: it now PASSes on at most 3 reported
    /// restarts, FAILs on more, and FAILs when the peer reported no count (or is stale).
    #[tokio::test]
    async fn curator_no_crashloop_uses_the_reported_restart_count() {
        let mut mesh = mesh_with_curator_restarts(&[
            ("p-calm", Some(0)),
            ("p-limit", Some(3)),
            ("p-looping", Some(5)),
            ("p-silent", None),
        ]);
        let stale = NodeEvidence {
            age_secs: 60,
            ..mesh.evidence.nodes["p-calm"].clone()
        };
        mesh.evidence.nodes.insert("p-stale".into(), stale);
        mesh.peers.push(Peer {
            endpoint: Endpoint {
                name: "p-stale".into(),
                ..mesh.peers[0].endpoint.clone()
            },
            store: "ai_memory_peer_5".into(),
        });
        let mut run = super::super::probes::Run::new(&mesh);
        super::super::groups::curator(&mut run).await;
        let rows: BTreeMap<&str, (&str, CheckStatus)> = run
            .checks
            .iter()
            .filter(|c| c.test.starts_with("curator_no_crashloop"))
            .map(|c| (c.test.as_str(), (c.got.as_str(), c.status)))
            .collect();
        let row = |peer: &str| rows[format!("curator_no_crashloop[{peer}]").as_str()];
        assert_eq!(
            row("p-calm"),
            (
                "0 (NRestarts of ai-memory-curator.service, reported by p-calm at \
                 2026-05-28T20:26:40+00:00, 4s ago)",
                CheckStatus::Pass
            )
        );
        assert_eq!(row("p-limit").1, CheckStatus::Pass);
        assert!(row("p-limit").0.starts_with("3 ("), "{:?}", row("p-limit"));
        assert_eq!(row("p-looping").1, CheckStatus::Fail);
        assert!(
            row("p-looping").0.starts_with("5 ("),
            "{:?}",
            row("p-looping")
        );
        assert_eq!(
            row("p-silent"),
            (
                "p-silent reports no restart count for ai-memory-curator.service",
                CheckStatus::Fail
            )
        );
        assert_eq!(row("p-stale").1, CheckStatus::Fail);
        assert!(row("p-stale").0.contains("60s old"), "{:?}", row("p-stale"));
        assert!(run.checks.iter().all(|c| c.status != CheckStatus::Skip));
    }

    /// A check taken after the suite started is read from the state database, as the seeder
    /// stores it; without one, only the snapshot exists.
    #[test]
    fn latest_reads_the_reports_stored_since_the_snapshot() {
        use hiveseed_proto::status::{CheckRecord, Phase};
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("state.db");
        let store = Store::open(&db).unwrap();
        let report = |seq: u64, at: u64, got: &str| StatusReport {
            node: "do-1461-pg-nyc3-01".parse().unwrap(),
            seq,
            at,
            phase: Phase::Converged,
            generation: None,
            digest: None,
            resources: vec![],
            services: vec![],
            checks: vec![CheckRecord {
                node: "do-1461-pg-nyc3-01".parse().unwrap(),
                check: "signed_events.ic_peer_1".into(),
                expected: r"linked \([0-9]+ events\)".into(),
                got: got.into(),
                status: CheckStatus::Pass,
            }],
        };
        store
            .put_report(&report(1, 100, "linked (0 events)"), 101)
            .unwrap();
        let mut ev = Evidence {
            max_age_secs: 15,
            state_db: Some(db.clone()),
            ..Default::default()
        };
        let pg = "do-1461-pg-nyc3-01";
        let n = ev.latest(pg, 105).unwrap();
        assert_eq!((n.reported_at, n.age_secs), (100, 4));
        ev.nodes.insert(pg.into(), n);

        store
            .put_report(&report(2, 110, "linked (1 events)"), 111)
            .unwrap();
        let n = ev.latest(pg, 112).unwrap();
        assert_eq!(n.reported_at, 110);
        assert_eq!(n.checks["signed_events.ic_peer_1"].got, "linked (1 events)");
        assert!(ev
            .latest("do-1461-pg-fra1-01", 112)
            .unwrap_err()
            .contains("has not reported"));

        ev.state_db = None;
        assert_eq!(ev.latest(pg, 112).unwrap().reported_at, 100, "the snapshot");
    }
}
