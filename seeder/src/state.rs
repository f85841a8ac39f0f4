//! The running seeder: loaded keys, the store, the published inputs, and per-node manifest
//! watchers that wake long-polls. Rendering happens here and only here.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use ed25519_dalek::SigningKey;
use hiveseed_proto::manifest::FileContent;
use hiveseed_proto::{Manifest, NodeName, Resource, Sha256, SignedEnvelope};
use tokio::sync::watch;

use crate::campaign::CampaignDir;
use crate::fleet::Fleet;
use crate::pki::CampaignCa;
use crate::render::{self, AllowEntry, ArtifactView, FleetFacts, RoleTree};
use crate::store::{Store, StoredManifest};

/// Injected clock: Unix seconds.
pub type Clock = Arc<dyn Fn() -> u64 + Send + Sync>;

pub fn system_clock() -> Clock {
    Arc::new(|| {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
    })
}

/// What to do when a node that already enrolled enrolls again with another key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReenrollPolicy {
    /// Allowed while the token is valid; the old identity is revoked (node replacement).
    Supersede,
    /// Refused; only a retry with the same key is accepted.
    Refuse,
}

#[derive(Debug, Clone)]
pub struct Policy {
    /// The enrollment's source address must equal the claimed public IPv4 (off behind a load balancer).
    pub check_source: bool,
    pub reenroll: ReenrollPolicy,
    /// After the first peer enrolls, release the mesh sections this long later even if peers are missing.
    pub mesh_deadline_secs: u64,
    /// Enrollments per second per source address (burst = 2x).
    pub enroll_rate_per_source: f64,
    /// Enrollments per second overall (burst = 2x).
    pub enroll_rate_total: f64,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            check_source: true,
            reenroll: ReenrollPolicy::Supersede,
            mesh_deadline_secs: 600,
            enroll_rate_per_source: 5.0,
            enroll_rate_total: 2000.0,
        }
    }
}

/// The published inputs, parsed.
#[derive(Debug)]
pub struct Inputs {
    pub id: i64,
    pub fleet: Fleet,
    pub roles: RoleTree,
}

/// Signals that a node's manifest changed: the value is the current ETag.
type Watchers = Mutex<HashMap<NodeName, watch::Sender<String>>>;

pub struct Seeder {
    pub dir: CampaignDir,
    pub store: Store,
    pub ca: CampaignCa,
    pub signing: SigningKey,
    pub policy: Policy,
    pub clock: Clock,
    inputs: RwLock<Arc<Inputs>>,
    watchers: Watchers,
    render_lock: tokio::sync::Mutex<()>,
    pub limiter: crate::limit::EnrollLimiter,
    /// Fingerprint of the operator's client certificate (fleet view, admin).
    pub operator_fpr: Option<String>,
}

impl std::fmt::Debug for Seeder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Seeder")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

/// SHA-256 of DER bytes, lowercase hex: how certificates are named everywhere.
pub fn fingerprint(der: &[u8]) -> String {
    Sha256::digest(der).to_hex()
}

/// The ETag of a stored manifest.
pub fn etag(m: &StoredManifest) -> String {
    format!(
        "\"{}-{}\"",
        m.generation,
        &Sha256::digest(m.envelope.as_bytes()).to_hex()[..16]
    )
}

fn parse_inputs(id: i64, fleet_text: &str, roles_json: &str) -> Result<Inputs> {
    let fleet = Fleet::parse(fleet_text)?;
    let roles: RoleTree = serde_json::from_str(roles_json).context("published role tree")?;
    Ok(Inputs { id, fleet, roles })
}

/// Reads fleet.toml and the roles directory named by the campaign directory.
pub fn read_inputs_from_disk(dir: &CampaignDir) -> Result<(String, RoleTree)> {
    let cf = dir.read_campaign_file()?;
    let fleet_text = std::fs::read_to_string(&cf.fleet)
        .with_context(|| format!("reading {}", cf.fleet.display()))?;
    let roles_dir: PathBuf = cf.roles.clone();
    let roles = render::read_role_tree(&roles_dir)
        .with_context(|| format!("reading roles from {}", roles_dir.display()))?;
    Ok((fleet_text, roles))
}

impl Seeder {
    /// Loads the campaign directory and the state database. Publishes the inputs on disk when
    /// nothing was published yet. Does no network I/O.
    pub fn open(dir: CampaignDir, policy: Policy, clock: Clock) -> Result<Arc<Self>> {
        let ca = dir.load_ca()?;
        let signing = dir.load_manifest_key()?;
        let store = Store::open(&dir.state_db()).context("opening the state database")?;
        let inputs = match store.latest_inputs()? {
            Some(p) => parse_inputs(p.id, &p.fleet, &p.roles)?,
            None => {
                let (fleet_text, roles) = read_inputs_from_disk(&dir)?;
                let fleet = Fleet::parse(&fleet_text)?;
                validate_roles(&fleet, &roles)?;
                let roles_json = serde_json::to_string(&roles)?;
                let p = store.publish_inputs(
                    render::inputs_digest(&fleet_text, &roles),
                    &fleet_text,
                    &roles_json,
                    clock(),
                )?;
                parse_inputs(p.id, &p.fleet, &p.roles)?
            }
        };
        let operator_fpr = std::fs::read_to_string(dir.operator_cert())
            .ok()
            .and_then(|pem| {
                use rustls::pki_types::pem::PemObject;
                rustls::pki_types::CertificateDer::from_pem_slice(pem.as_bytes()).ok()
            })
            .map(|der| fingerprint(&der));
        let limiter = crate::limit::EnrollLimiter::new(
            policy.enroll_rate_per_source,
            policy.enroll_rate_total,
        );
        Ok(Arc::new(Self {
            dir,
            store,
            ca,
            signing,
            policy,
            clock,
            inputs: RwLock::new(Arc::new(inputs)),
            watchers: Mutex::new(HashMap::new()),
            render_lock: tokio::sync::Mutex::new(()),
            limiter,
            operator_fpr,
        }))
    }

    pub fn now(&self) -> u64 {
        (self.clock)()
    }

    pub fn inputs(&self) -> Arc<Inputs> {
        self.inputs
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Picks up inputs published by another process (`seeder publish`), if any.
    pub fn reload_inputs(&self) -> Result<bool> {
        let Some(p) = self.store.latest_inputs()? else {
            return Ok(false);
        };
        if p.id == self.inputs().id {
            return Ok(false);
        }
        let parsed = parse_inputs(p.id, &p.fleet, &p.roles)?;
        *self.inputs.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(parsed);
        Ok(true)
    }

    /// A receiver that changes whenever `node`'s manifest does.
    pub fn watch(&self, node: &NodeName) -> watch::Receiver<String> {
        let mut w = self.watchers.lock().unwrap_or_else(|e| e.into_inner());
        w.entry(node.clone())
            .or_insert_with(|| {
                let current = self
                    .store
                    .manifest(node)
                    .ok()
                    .flatten()
                    .map(|m| etag(&m))
                    .unwrap_or_default();
                watch::channel(current).0
            })
            .subscribe()
    }

    fn notify(&self, node: &NodeName, tag: String) {
        let w = self.watchers.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(tx) = w.get(node) {
            tx.send_replace(tag);
        }
    }

    /// Everything rendering needs besides the inputs.
    fn facts(&self, fleet: &Fleet) -> Result<FleetFacts> {
        let enrollments: BTreeMap<_, _> = self
            .store
            .enrollments()?
            .into_iter()
            .filter(|e| fleet.node(&e.node).is_some())
            .map(|e| (e.node.clone(), e))
            .collect();
        let mut allowlist: Vec<AllowEntry> = self
            .store
            .current_certs("client")?
            .into_iter()
            .filter_map(|c| {
                let spec = fleet.node(&c.node)?;
                Some(AllowEntry {
                    fpr: c.fpr,
                    node: c.node.to_string(),
                    role: spec.role.to_string(),
                })
            })
            .collect();
        if let Some(op) = &self.operator_fpr {
            allowlist.push(AllowEntry {
                fpr: op.clone(),
                node: format!("{}-operator", fleet.campaign),
                role: "ctrl".into(),
            });
        }
        let mut secrets = BTreeMap::new();
        secrets.insert("pg_password".into(), read_secret(&self.dir.pg_password())?);
        secrets.insert("api_key".into(), read_secret(&self.dir.api_key())?);
        let artifacts = self
            .store
            .artifacts()?
            .into_iter()
            .map(|(name, sha, size)| {
                (
                    name,
                    ArtifactView {
                        sha256: sha.to_hex(),
                        size,
                    },
                )
            })
            .collect();
        let first_peer = enrollments
            .values()
            .filter(|e| {
                fleet
                    .node(&e.node)
                    .map(|n| n.role.as_str() == "peer")
                    .unwrap_or(false)
            })
            .map(|e| e.enrolled_at)
            .min();
        let mesh_released = first_peer
            .map(|t| self.now() >= t + self.policy.mesh_deadline_secs)
            .unwrap_or(false);
        Ok(FleetFacts {
            enrollments,
            allowlist,
            secrets,
            artifacts,
            mesh_released,
            placeholder_artifacts: false,
        })
    }

    /// Renders every enrolled node; stores and announces a new generation for each node whose
    /// resources changed, and re-signs unchanged ones whose signature is past half its lifetime.
    /// Returns the nodes that got a new generation.
    pub async fn rerender(&self, reason: &str) -> Result<Vec<(NodeName, u64)>> {
        let _guard = self.render_lock.lock().await;
        let inputs = self.inputs();
        let fleet = &inputs.fleet;
        let facts = self.facts(fleet)?;
        let renderer = render::Renderer::new(fleet, &inputs.roles);
        let now = self.now();
        let mut changed = Vec::new();
        for node in &fleet.nodes {
            let Some(resources) = renderer.resources(node, &facts)? else {
                continue;
            };
            let digest = Manifest::digest_of(&resources);
            let (generation, is_new) = self.store.next_generation(&node.name, &digest)?;
            if !is_new {
                let stale = self.store.manifest(&node.name)?.map(|m| {
                    let signed: Option<SignedEnvelope<Manifest>> =
                        serde_json::from_str(&m.envelope).ok();
                    signed
                        .and_then(|s| s.verify(&self.signing.verifying_key()).ok())
                        .map(|mf| now >= mf.issued_at + (mf.not_after - mf.issued_at) / 2)
                        .unwrap_or(true)
                });
                if stale != Some(true) {
                    continue;
                }
            }
            let manifest = render::manifest_for(fleet, node, resources, generation, now);
            let envelope = SignedEnvelope::sign(&manifest, &self.signing);
            let stored = StoredManifest {
                node: node.name.clone(),
                generation,
                digest,
                envelope: serde_json::to_string(&envelope)?,
                published_at: now,
            };
            self.store.put_manifest(&stored)?;
            if is_new {
                self.store.event(
                    now,
                    Some(&node.name),
                    "generation",
                    &format!("generation {generation} ({reason})"),
                )?;
                tracing::info!(node = %node.name, generation = generation.0, reason, "new manifest generation");
                changed.push((node.name.clone(), generation.0));
            }
            self.notify(&node.name, etag(&stored));
        }
        Ok(changed)
    }

    /// Whether a node's current manifest names this artifact.
    pub fn manifest_references(&self, node: &NodeName, sha: &Sha256) -> Result<bool> {
        let Some(m) = self.store.manifest(node)? else {
            return Ok(false);
        };
        let env: SignedEnvelope<Manifest> = serde_json::from_str(&m.envelope)?;
        let manifest = env.verify(&self.signing.verifying_key())?;
        Ok(manifest.resources.iter().any(|r| {
            matches!(r, Resource::File(f) if matches!(&f.content, FileContent::Artifact { sha256, .. } if sha256 == sha))
        }))
    }
}

fn read_secret(path: &std::path::Path) -> Result<String> {
    let s = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let s = s.trim().to_owned();
    if s.is_empty() {
        bail!("{} is empty", path.display());
    }
    Ok(s)
}

/// Renders every node of the fleet with placeholder facts, so a broken role is refused at publish
/// time rather than when a node enrolls.
pub fn validate_roles(fleet: &Fleet, roles: &RoleTree) -> Result<()> {
    let enrollments = fleet
        .nodes
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let b = (i % 250) as u8 + 1;
            (
                n.name.clone(),
                crate::store::Enrollment {
                    node: n.name.clone(),
                    droplet_id: i as u64,
                    public_ip: std::net::Ipv4Addr::new(192, 0, 2, b),
                    private_ip: std::net::Ipv4Addr::new(10, 0, 0, b),
                    identity_fpr: String::new(),
                    key_fpr: String::new(),
                    token_nonce: String::new(),
                    enrolled_at: 0,
                },
            )
        })
        .collect();
    let facts = FleetFacts {
        enrollments,
        allowlist: vec![AllowEntry {
            fpr: "0".repeat(64),
            node: "placeholder".into(),
            role: "ctrl".into(),
        }],
        secrets: [
            ("pg_password".to_string(), "x".to_string()),
            ("api_key".to_string(), "x".to_string()),
        ]
        .into(),
        artifacts: BTreeMap::new(),
        mesh_released: true,
        placeholder_artifacts: true,
    };
    let r = render::Renderer::new(fleet, roles);
    for n in &fleet.nodes {
        r.resources(n, &facts)?;
    }
    Ok(())
}
