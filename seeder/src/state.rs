//! The running seeder: loaded keys, the store, the published inputs, and per-node manifest
//! watchers that wake long-polls. Rendering happens here and only here.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use ed25519_dalek::SigningKey;
use hiveseed_proto::manifest::FileContent;
use hiveseed_proto::{FedId, Manifest, NodeName, Resource, Sha256, SignedEnvelope};
use tokio::sync::watch;

use crate::campaign::CampaignDir;
use crate::credential::Issuer;
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
    /// Caps and timeouts of the listener's connections.
    pub conn: crate::conn::ConnLimits,
    pub downloads: crate::artifact::DownloadSettings,
    /// How long an enrollment's DigitalOcean look-up may take, retries included (`[attestation]`).
    pub attestation_budget: crate::digitalocean::Budget,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            check_source: true,
            reenroll: ReenrollPolicy::Supersede,
            mesh_deadline_secs: 600,
            enroll_rate_per_source: 5.0,
            enroll_rate_total: 2000.0,
            conn: crate::conn::ConnLimits::default(),
            downloads: crate::artifact::DownloadSettings::default(),
            attestation_budget: crate::digitalocean::Budget::default(),
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

/// What changed, so that only the manifests that can depend on it are re-rendered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Inputs, artifacts, revocations, periodic refresh: everything.
    All,
    /// A node enrolled (or re-enrolled): itself, and roles that name fleet-wide keys.
    Enrolled(NodeName),
    /// A node got a mesh client certificate: roles that name the allowlist.
    ClientCert(NodeName),
}

/// A certificate as the request path needs it.
#[derive(Debug, Clone)]
pub struct CertInfo {
    pub node: NodeName,
    pub purpose: String,
    pub revoked: bool,
}

/// A stored manifest with its ETag, shared with request handlers without copying.
#[derive(Debug)]
pub struct ManifestEntry {
    pub stored: StoredManifest,
    pub etag: String,
}

pub struct Seeder {
    pub dir: CampaignDir,
    pub store: Store,
    pub ca: CampaignCa,
    pub signing: SigningKey,
    /// The zero-touch federation CA: mints node credentials (`POST /v1/credential`).
    pub federation: Issuer,
    /// The operator agent's attestation key: signs the writes manifests ask for (`POST /v1/attest`).
    pub operator_agent: SigningKey,
    pub policy: Policy,
    pub clock: Clock,
    inputs: RwLock<Arc<Inputs>>,
    watchers: Watchers,
    render_lock: tokio::sync::Mutex<RenderMemo>,
    pub limiter: crate::limit::EnrollLimiter,
    /// Held from an enrollment's address check until it is stored: two nodes claiming one
    /// address at the same moment cannot both pass the uniqueness check.
    pub enroll_lock: tokio::sync::Mutex<()>,
    /// Artifact and bootstrap download slots.
    pub downloads: crate::artifact::Downloads,
    /// Asks DigitalOcean about enrolling droplets when the fleet has `[attestation]`.
    pub digitalocean: crate::digitalocean::Client,
    /// Fingerprint of the operator's client certificate (fleet view, admin).
    pub operator_fpr: Option<String>,
    /// Rendering facts, kept in memory and updated as enrollments and certificates happen.
    facts: Mutex<Option<FleetFacts>>,
    manifests: RwLock<HashMap<NodeName, Arc<ManifestEntry>>>,
    certs: RwLock<HashMap<String, CertInfo>>,
}

/// What the last render saw, to notice when the mesh release flips.
#[derive(Debug, Default)]
struct RenderMemo {
    mesh_released: Option<bool>,
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
        if inputs.fleet.attestation.is_some() {
            // Read again at each enrollment (the operator may rotate it); here only so that a
            // seeder without a usable token does not start.
            dir.read_do_api_token()
                .context("the fleet's [attestation] needs the DigitalOcean API token")?;
            if !policy.check_source {
                bail!(
                    "the fleet's [attestation] checks the connection's source against the droplet's public addresses; \
                     --no-source-check leaves it nothing to check (behind a load balancer, use --proxy-protocol-from)"
                );
            }
        }
        let digitalocean = crate::digitalocean::Client::new(policy.attestation_budget)
            .context("building the DigitalOcean API client")?;
        let federation = dir.load_federation_issuer(&inputs.fleet.campaign)?;
        let operator_agent = dir.load_operator_agent(&inputs.fleet.campaign)?;
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
        let downloads = crate::artifact::Downloads::new(policy.downloads);
        let manifests = store
            .manifests()?
            .into_iter()
            .map(|m| {
                let tag = etag(&m);
                (
                    m.node.clone(),
                    Arc::new(ManifestEntry {
                        stored: m,
                        etag: tag,
                    }),
                )
            })
            .collect();
        Ok(Arc::new(Self {
            dir,
            store,
            ca,
            signing,
            federation,
            operator_agent,
            policy,
            clock,
            inputs: RwLock::new(Arc::new(inputs)),
            watchers: Mutex::new(HashMap::new()),
            render_lock: tokio::sync::Mutex::new(RenderMemo::default()),
            enroll_lock: tokio::sync::Mutex::new(()),
            limiter,
            downloads,
            digitalocean,
            operator_fpr,
            facts: Mutex::new(None),
            manifests: RwLock::new(manifests),
            certs: RwLock::new(HashMap::new()),
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
        self.forget_caches();
        Ok(true)
    }

    /// Drops every in-memory cache; the next use reloads from the state database. Used when
    /// another process changed the state (revocation, artifacts, publish).
    pub fn forget_caches(&self) {
        *self.facts.lock().unwrap_or_else(|e| e.into_inner()) = None;
        self.certs
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }

    /// A certificate by fingerprint, from memory or the state database.
    pub fn cert_info(&self, fpr: &str) -> Result<Option<CertInfo>> {
        if let Some(c) = self
            .certs
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(fpr)
        {
            return Ok(Some(c.clone()));
        }
        let Some(rec) = self.store.cert(fpr)? else {
            return Ok(None);
        };
        let info = CertInfo {
            node: rec.node,
            purpose: rec.purpose,
            revoked: rec.revoked_at.is_some(),
        };
        let mut certs = self.certs.write().unwrap_or_else(|e| e.into_inner());
        if certs.len() > 200_000 {
            certs.clear();
        }
        certs.insert(fpr.to_owned(), info.clone());
        Ok(Some(info))
    }

    /// Marks cached certificates revoked after the store revoked them.
    pub fn note_revoked(&self, fprs: &[String]) {
        let mut certs = self.certs.write().unwrap_or_else(|e| e.into_inner());
        for f in fprs {
            if let Some(c) = certs.get_mut(f) {
                c.revoked = true;
            }
        }
    }

    pub fn manifest(&self, node: &NodeName) -> Option<Arc<ManifestEntry>> {
        self.manifests
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(node)
            .cloned()
    }

    /// A receiver that changes whenever `node`'s manifest does.
    pub fn watch(&self, node: &NodeName) -> watch::Receiver<String> {
        let mut w = self.watchers.lock().unwrap_or_else(|e| e.into_inner());
        w.entry(node.clone())
            .or_insert_with(|| {
                let current = self
                    .manifest(node)
                    .map(|m| m.etag.clone())
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

    /// Everything rendering needs besides the inputs, loaded from the state database.
    fn load_facts(&self, fleet: &Fleet) -> Result<FleetFacts> {
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
            .filter(|c| {
                // Only a node whose manifest asks for a client certificate is allowlisted, so a
                // client certificate issued before its role dropped one (or before purposes
                // followed roles) lets no one in.
                self.manifest_wants_certificate(
                    &c.node,
                    hiveseed_proto::manifest::CertificatePurpose::Client,
                )
                .unwrap_or(false)
            })
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
        let secrets = load_secrets(&self.dir, fleet)?;
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
        Ok(FleetFacts {
            enrollments,
            allowlist,
            secrets,
            artifacts,
            federation: self.federation.public().clone(),
            operator_agent: crate::render::OperatorAgent::new(
                &fleet.campaign,
                &self.operator_agent,
            ),
            mesh_released: false,
            placeholder_artifacts: false,
        })
    }

    /// Updates the in-memory facts after the store recorded an enrollment.
    pub fn note_enrollment(&self, e: &crate::store::Enrollment) {
        let mut f = self.facts.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(f) = f.as_mut() {
            f.enrollments.insert(e.node.clone(), e.clone());
            // A re-enrolled node's old client certificate was revoked with its identity.
            f.allowlist.retain(|a| a.node != e.node.as_str());
        }
    }

    /// Updates the in-memory allowlist after the store recorded a client certificate.
    pub fn note_client_cert(&self, node: &NodeName, fpr: &str) {
        let role = self
            .inputs()
            .fleet
            .node(node)
            .map(|n| n.role.to_string())
            .unwrap_or_default();
        let mut f = self.facts.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(f) = f.as_mut() {
            f.allowlist.retain(|a| a.node != node.as_str());
            f.allowlist.push(AllowEntry {
                fpr: fpr.to_owned(),
                node: node.to_string(),
                role,
            });
            f.allowlist.sort_by(|a, b| a.node.cmp(&b.node));
        }
    }

    /// Re-renders what `change` can affect; stores and announces a new generation for each node
    /// whose resources changed, and re-signs unchanged ones whose signature is past half its
    /// lifetime. Returns the nodes that got a new generation.
    pub async fn rerender(&self, change: Change, reason: &str) -> Result<Vec<(NodeName, u64)>> {
        let mut memo = self.render_lock.lock().await;
        let inputs = self.inputs();
        let fleet = &inputs.fleet;
        let mut cached = self.facts.lock().unwrap_or_else(|e| e.into_inner());
        if cached.is_none() {
            *cached = Some(self.load_facts(fleet)?);
        }
        let facts = cached.as_mut().expect("just filled");
        let now = self.now();
        let first_peer = fleet
            .nodes_with_role("peer")
            .filter_map(|n| facts.enrollments.get(&n.name))
            .map(|e| e.enrolled_at)
            .min();
        facts.mesh_released = first_peer
            .map(|t| now >= t + self.policy.mesh_deadline_secs)
            .unwrap_or(false);
        let facts: &FleetFacts = facts;
        let renderer = render::Renderer::new(fleet, &inputs.roles);
        // The mesh release flipping changes every peer: render everything then.
        let change = if memo.mesh_released != Some(facts.mesh_released) {
            memo.mesh_released = Some(facts.mesh_released);
            Change::All
        } else {
            change
        };
        // Per role, which fleet-wide keys it names (None: cannot tell, so all).
        let mut deps: HashMap<String, Option<std::collections::BTreeSet<String>>> = HashMap::new();
        for role in fleet.nodes.iter().map(|n| n.role.as_str()) {
            if !deps.contains_key(role) {
                deps.insert(role.to_owned(), renderer.role_deps(role));
            }
        }
        let uses = |role: &str, key: &str| -> bool {
            match deps.get(role) {
                Some(Some(d)) => d.contains(key),
                _ => true,
            }
        };
        let fleet_wide_roles: Vec<&str> = deps
            .keys()
            .filter(|r| render::FLEET_WIDE.iter().any(|k| uses(r, k)))
            .map(String::as_str)
            .collect();
        let enrolled = |n: &&crate::fleet::NodeSpec| facts.enrollments.contains_key(&n.name);
        let targets: Vec<&crate::fleet::NodeSpec> = match &change {
            Change::All => fleet.nodes.iter().filter(enrolled).collect(),
            Change::Enrolled(x) => {
                let xr = fleet.node(x).map(|n| n.region.clone());
                let mut t: Vec<_> = fleet.node(x).into_iter().filter(enrolled).collect();
                for role in &fleet_wide_roles {
                    t.extend(fleet.nodes_with_role(role).filter(enrolled).filter(|n| {
                        &n.name != x
                            && (uses(role, "peers")
                                || uses(role, "mesh")
                                || (uses(role, "region") && Some(&n.region) == xr.as_ref()))
                    }));
                }
                t
            }
            Change::ClientCert(_) => fleet_wide_roles
                .iter()
                .filter(|r| uses(r, "allowlist"))
                .flat_map(|r| fleet.nodes_with_role(r).filter(enrolled))
                .collect(),
        };
        let mut changed = Vec::new();
        let mut batch: Vec<StoredManifest> = Vec::new();
        let mut batch_events: Vec<(NodeName, String)> = Vec::new();
        for node in targets {
            let Some(resources) = renderer.resources(node, facts)? else {
                continue;
            };
            let digest = Manifest::digest_of(&resources);
            let current = self.manifest(&node.name);
            let (generation, is_new) = match &current {
                Some(m) if m.stored.digest == digest => (m.stored.generation, false),
                Some(m) => (m.stored.generation.next(), true),
                None => (hiveseed_proto::Generation(1), true),
            };
            if !is_new {
                let stale = current
                    .as_ref()
                    .and_then(|m| {
                        serde_json::from_str::<SignedEnvelope<Manifest>>(&m.stored.envelope).ok()
                    })
                    .and_then(|s| s.verify(&self.signing.verifying_key()).ok())
                    .map(|mf| now >= mf.issued_at + (mf.not_after - mf.issued_at) / 2)
                    .unwrap_or(true);
                if !stale {
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
            if is_new {
                tracing::info!(node = %node.name, generation = generation.0, reason, "new manifest generation");
                changed.push((node.name.clone(), generation.0));
                batch_events.push((
                    node.name.clone(),
                    format!("generation {generation} ({reason})"),
                ));
            }
            batch.push(stored);
            // Commit in batches: one transaction per batch, then wake those nodes' long-polls.
            if batch.len() >= 256 {
                self.commit(&mut batch, &mut batch_events, now)?;
            }
        }
        self.commit(&mut batch, &mut batch_events, now)?;
        Ok(changed)
    }

    /// Stores a batch of manifests and their events in one transaction, then publishes them to
    /// the cache and wakes their long-polls.
    fn commit(
        &self,
        batch: &mut Vec<StoredManifest>,
        events: &mut Vec<(NodeName, String)>,
        now: u64,
    ) -> Result<()> {
        if batch.is_empty() {
            return Ok(());
        }
        self.store.put_manifests(batch, events, now)?;
        let mut cache = self.manifests.write().unwrap_or_else(|e| e.into_inner());
        let mut wake = Vec::with_capacity(batch.len());
        for stored in batch.drain(..) {
            let tag = etag(&stored);
            wake.push((stored.node.clone(), tag.clone()));
            cache.insert(
                stored.node.clone(),
                Arc::new(ManifestEntry { stored, etag: tag }),
            );
        }
        drop(cache);
        events.clear();
        for (node, tag) in wake {
            self.notify(&node, tag);
        }
        Ok(())
    }

    /// The resources of a node's current manifest (empty before it has one).
    fn current_resources(&self, node: &NodeName) -> Result<Vec<Resource>> {
        let Some(m) = self.manifest(node) else {
            return Ok(Vec::new());
        };
        let env: SignedEnvelope<Manifest> = serde_json::from_str(&m.stored.envelope)?;
        Ok(env.verify(&self.signing.verifying_key())?.resources)
    }

    /// Whether a node's current manifest names this artifact.
    pub fn manifest_references(&self, node: &NodeName, sha: &Sha256) -> Result<bool> {
        Ok(self.current_resources(node)?.iter().any(|r| {
            matches!(r, Resource::File(f) if matches!(&f.content, FileContent::Artifact { sha256, .. } if sha256 == sha))
        }))
    }

    /// Whether a node's current manifest has a `namespace_standard` whose memory is exactly this
    /// write, owned by the operator agent with the key the seeder holds.
    pub fn manifest_names_standard(
        &self,
        node: &NodeName,
        req: &hiveseed_proto::api::AttestRequest,
    ) -> Result<bool> {
        let operator =
            crate::render::OperatorAgent::new(&self.inputs().fleet.campaign, &self.operator_agent);
        Ok(self.current_resources(node)?.iter().any(|r| {
            matches!(r, Resource::NamespaceStandard(n)
                if n.namespace == req.namespace
                    && n.memory.title == req.title
                    && n.memory.kind == req.kind
                    && Sha256::digest(n.memory.content.as_bytes()) == req.content_sha256
                    && n.owner.agent_id == operator.id
                    && n.owner.public_key == operator.public_key)
        }))
    }

    /// Whether a node's current manifest has a certificate resource of this purpose: a node gets
    /// only the certificates its role's manifest asks for (a pg node no client certificate, an
    /// agent no server certificate).
    pub fn manifest_wants_certificate(
        &self,
        node: &NodeName,
        purpose: hiveseed_proto::manifest::CertificatePurpose,
    ) -> Result<bool> {
        Ok(self
            .current_resources(node)?
            .iter()
            .any(|r| matches!(r, Resource::Certificate(c) if c.purpose == purpose)))
    }

    /// Whether a node's current manifest asks for a federation credential for `fed_id`: a node
    /// whose role has no federation identity gets none.
    pub fn manifest_wants_credential(&self, node: &NodeName, fed_id: &FedId) -> Result<bool> {
        Ok(self
            .current_resources(node)?
            .iter()
            .any(|r| matches!(r, Resource::FederationCredential(c) if &c.fed_id == fed_id)))
    }
}

/// The fleet secrets the roles render with (`secrets.*`): the generated ones, the operator's
/// LLM/embedding key when the fleet's embedder or LLM needs it, and the agents' LLM key when the
/// fleet has `[agent_llm]` (and only then, so a role that
/// names it for a fleet without one fails to render instead of delivering nothing).
pub fn load_secrets(dir: &CampaignDir, fleet: &Fleet) -> Result<BTreeMap<String, String>> {
    let mut secrets = BTreeMap::new();
    secrets.insert("pg_password".into(), read_secret(&dir.pg_password())?);
    secrets.insert("api_key".into(), read_secret(&dir.api_key())?);
    if fleet.llm_key_env().is_some() {
        secrets.insert("llm_api_key".into(), dir.read_llm_api_key()?);
    }
    if fleet.agent_llm_key_env().is_some() {
        secrets.insert("agent_llm_api_key".into(), dir.read_agent_llm_api_key()?);
    }
    Ok(secrets)
}

fn read_secret(path: &std::path::Path) -> Result<String> {
    let s = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let s = s.trim().to_owned();
    if s.is_empty() {
        bail!("{} is empty", path.display());
    }
    crate::campaign::check_secret_chars(&path.display().to_string(), &s)?;
    Ok(s)
}

/// Renders every node of the fleet with placeholder facts, so a broken role is refused at publish
/// time rather than when a node enrolls.
pub fn validate_roles(fleet: &Fleet, roles: &RoleTree) -> Result<()> {
    let secrets = ["pg_password", "api_key"]
        .into_iter()
        .chain(fleet.llm_key_env().map(|_| "llm_api_key"))
        .chain(fleet.agent_llm_key_env().map(|_| "agent_llm_api_key"))
        .map(|name| (name.to_owned(), "x".to_owned()))
        .collect();
    let facts = placeholder_facts(fleet, secrets);
    let r = render::Renderer::new(fleet, roles);
    for n in &fleet.nodes {
        r.resources(n, &facts)?;
    }
    Ok(())
}

/// Facts for rendering without a running seeder: every node enrolled at a documentation address,
/// stand-in keys with the campaign's real ids, placeholder artifacts, the mesh released; the
/// secrets are the caller's.
pub fn placeholder_facts(fleet: &Fleet, secrets: BTreeMap<String, String>) -> FleetFacts {
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
    FleetFacts {
        enrollments,
        allowlist: vec![AllowEntry {
            fpr: "0".repeat(64),
            node: "placeholder".into(),
            role: "ctrl".into(),
        }],
        secrets,
        artifacts: BTreeMap::new(),
        // A stand-in key with the campaign's real issuer id and domain.
        federation: Issuer::new(SigningKey::from_bytes(&[1; 32]), &fleet.campaign)
            .public()
            .clone(),
        operator_agent: crate::render::OperatorAgent::new(
            &fleet.campaign,
            &SigningKey::from_bytes(&[2; 32]),
        ),
        mesh_released: true,
        placeholder_artifacts: true,
    }
}
