//! The agent's run loop, an explicit state machine (zincati-style): enrolling → fetched →
//! applying → waiting → converged | failed{kind, retryable}. The same states are what it reports.
//!
//! Every report is spooled before it is sent, so a seeder outage loses nothing. A manifest is
//! verified (signature, campaign, node, expiry, digest, generation) before anything is planned;
//! a refused manifest leaves the node as it was.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use ed25519_dalek::pkcs8::DecodePublicKey;
use ed25519_dalek::VerifyingKey;
use hiveseed_proto::api::{EnrollRequest, NodeFacts};
use hiveseed_proto::join::JoinConfig;
use hiveseed_proto::manifest::Applied;
use hiveseed_proto::status::{
    CheckRecord, FailureKind, Phase, ResourceReport, ServiceRestarts, StatusReport,
};
use hiveseed_proto::{verify_manifest, Manifest, Resource, SignedEnvelope};
use rcgen::{CertificateParams, KeyPair, PKCS_ECDSA_P256_SHA256};

use crate::apply::{apply, ApplyEnv, ApplyEvent, ApplySettings};
use crate::client::{ClientError, ManifestPoll, SeederClient};
use crate::facts;
use crate::host::{Host, RealHost};
use crate::plan::{observe, observe_manager, plan, ObserveEnv, PlanContext, ServiceManager};
use crate::resources::check::{run_checks, CheckEnv};
use crate::spool::Spool;
use crate::supervisor::{Supervisor, SupervisorSettings};

/// Exit codes are a contract: a retryable failure may be retried by whoever started us.
pub const EXIT_PERMANENT: u8 = 2;
pub const EXIT_RETRYABLE: u8 = 75;

/// Where the agent keeps its own state, relative to the root.
pub const STATE_DIR: &str = "var/lib/hiveseed";

#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// `/` on a droplet and inside a lab chroot.
    pub root: PathBuf,
    /// join.toml, relative to the root.
    pub join_file: String,
    pub metadata_base: String,
    /// How long one manifest long-poll waits.
    pub poll_wait: Duration,
    /// How often the node re-checks for drift with an unchanged manifest (before splay).
    pub drift_interval: Duration,
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            root: PathBuf::from("/"),
            join_file: hiveseed_proto::join::JOIN_FILE
                .trim_start_matches('/')
                .to_owned(),
            metadata_base: facts::DO_METADATA_BASE.to_owned(),
            poll_wait: Duration::from_secs(25),
            drift_interval: Duration::from_secs(300),
        }
    }
}

/// Paths of the agent's state directory (0700).
#[derive(Debug, Clone)]
pub struct StateDir {
    pub dir: PathBuf,
}

impl StateDir {
    pub fn new(root: &Path) -> Self {
        Self {
            dir: root.join(STATE_DIR),
        }
    }
    /// The key made for enrollment, kept until the identity exists so a retry reuses it.
    pub fn enroll_key(&self) -> PathBuf {
        self.dir.join("enroll.key")
    }
    /// Key PEM followed by the certificate chain: one file, replaced atomically on renewal.
    pub fn identity_file(&self) -> PathBuf {
        self.dir.join("identity.pem")
    }
    pub fn manifest(&self) -> PathBuf {
        self.dir.join("manifest.json")
    }
    pub fn applied(&self) -> PathBuf {
        self.dir.join("applied.json")
    }
    pub fn last_report(&self) -> PathBuf {
        self.dir.join("last-report.json")
    }
    pub fn spool(&self) -> PathBuf {
        self.dir.join("spool")
    }

    pub fn ensure(&self) -> Result<()> {
        use std::os::unix::fs::PermissionsExt;
        std::fs::create_dir_all(&self.dir)
            .with_context(|| format!("creating {}", self.dir.display()))?;
        std::fs::set_permissions(&self.dir, std::fs::Permissions::from_mode(0o700))?;
        Ok(())
    }

    pub fn write(&self, path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
        crate::state_file::write(path, bytes, mode)
            .with_context(|| format!("writing {}", path.display()))
    }

    /// The applied-generation ledger: `None` only when no manifest was ever applied (no file).
    /// An unreadable or corrupt ledger is an error, never "never applied": that would let an
    /// older generation be applied again (rollback).
    pub fn applied_state(&self) -> Result<Option<Applied>> {
        let path = self.applied();
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => {
                return Err(e).with_context(|| {
                    format!("reading the applied-generation ledger {}", path.display())
                })
            }
        };
        serde_json::from_slice::<Applied>(&bytes)
            .map(Some)
            .with_context(|| {
                format!(
                    "the applied-generation ledger {} is corrupt; refusing to run without it                      (it guards against applying an older generation): restore it, or remove                      it on purpose to accept any generation",
                    path.display()
                )
            })
    }

    pub fn saved_manifest(&self) -> Option<SignedEnvelope<Manifest>> {
        std::fs::read(self.manifest())
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
    }

    /// Key PEM + chain PEM, if enrolled.
    pub fn identity(&self) -> Option<String> {
        std::fs::read_to_string(self.identity_file()).ok()
    }
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Loads and checks join.toml: the trust anchors must parse before anything is contacted.
pub fn load_join(root: &Path, rel: &str) -> Result<(JoinConfig, VerifyingKey)> {
    let path = root.join(rel);
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let join: JoinConfig = toml::from_str(&text)
        .with_context(|| format!("{} is not a valid join file", path.display()))?;
    let key = VerifyingKey::from_public_key_pem(&join.manifest_key_pem)
        .map_err(|e| anyhow::anyhow!("{}: manifest_key_pem: {e}", path.display()))?;
    if !join
        .join_url
        .starts_with(&format!("{}/v1/join/{}?token=", join.seeder_url, join.node))
    {
        bail!(
            "{}: join_url is not this node's join URL on seeder_url",
            path.display()
        );
    }
    if !join.ca_pem.contains("-----BEGIN CERTIFICATE-----") {
        bail!("{}: ca_pem is not a PEM certificate", path.display());
    }
    Ok((join, key))
}

/// Facts from the facts file when there is one (lab, other platforms), else DigitalOcean's
/// metadata service, retried with backoff while it does not answer.
pub async fn discover_facts(root: &Path, metadata_base: &str) -> Result<NodeFacts> {
    let file = root.join(facts::FACTS_FILE.trim_start_matches('/'));
    if let Ok(body) = std::fs::read(&file) {
        return Ok(facts::parse_facts_file(&file.display().to_string(), &body)?);
    }
    let mut delay = Duration::from_millis(500);
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        match facts::fetch_do_metadata(metadata_base).await {
            Ok(f) => return Ok(f),
            Err(e) if e.retryable() && Instant::now() < deadline => {
                tracing::warn!(error = %e, "metadata service not answering; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(15));
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// The agent: owns the spool, the client and (without systemd) the supervisor.
pub struct Agent {
    pub config: AgentConfig,
    pub join: JoinConfig,
    pub manifest_key: VerifyingKey,
    pub facts: NodeFacts,
    pub state: StateDir,
    pub client: SeederClient,
    pub host: Arc<dyn Host>,
    pub manager: ServiceManager,
    pub supervisor: Option<Supervisor>,
    spool: Spool,
    last_checks: Vec<CheckRecord>,
    /// Measured with the checks and reported with them.
    last_services: Vec<ServiceRestarts>,
    applied: Option<Applied>,
    etag: Option<String>,
    /// A newer manifest that arrived while a wait blocked the current one; converged next.
    superseded: Option<SignedEnvelope<Manifest>>,
    last_phase: String,
    /// The phase last reported, re-sent as a heartbeat while a long step (a wait) runs.
    current_phase: Phase,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("node", &self.join.node)
            .finish_non_exhaustive()
    }
}

/// Backoff for talking to the seeder: honours Retry-After, else doubles to a cap.
fn next_delay(current: Duration, e: &ClientError) -> Duration {
    e.retry_after()
        .unwrap_or_else(|| (current * 2).min(Duration::from_secs(30)))
}

impl Agent {
    pub async fn new(config: AgentConfig) -> Result<Self> {
        let (join, manifest_key) = load_join(&config.root, &config.join_file)?;
        let facts = discover_facts(&config.root, &config.metadata_base).await?;
        if facts.region != join.region {
            bail!(
                "facts say region {}, join.toml says {}",
                facts.region,
                join.region
            );
        }
        let state = StateDir::new(&config.root);
        state.ensure()?;
        let identity = state.identity();
        let client = SeederClient::new(
            &join.seeder_url,
            &join.ca_pem,
            Some(facts.public_ipv4),
            identity.as_deref(),
        )?;
        let host: Arc<dyn Host> = Arc::new(RealHost::new(&config.root)?);
        let manager = observe_manager(host.as_ref())?;
        let supervisor = (manager == ServiceManager::Supervisor)
            .then(|| Supervisor::new(host.clone(), SupervisorSettings::default()));
        let spool = Spool::open(&state.spool())?;
        let applied = state.applied_state()?;
        Ok(Self {
            config,
            join,
            manifest_key,
            facts,
            state,
            client,
            host,
            manager,
            supervisor,
            spool,
            last_checks: Vec::new(),
            last_services: Vec::new(),
            applied,
            etag: None,
            superseded: None,
            last_phase: String::new(),
            current_phase: Phase::Enrolling,
        })
    }

    /// Spools a report and tries to deliver everything spooled, in order.
    async fn report(&mut self, phase: Phase, resources: Vec<ResourceReport>) {
        let report = StatusReport {
            node: self.join.node.clone(),
            seq: 0,
            at: unix_now(),
            phase: phase.clone(),
            generation: self.applied.map(|a| a.generation),
            digest: self.applied.map(|a| a.digest),
            resources,
            checks: self.last_checks.clone(),
            services: self.last_services.clone(),
        };
        // INFO for state transitions, DEBUG for heartbeats that change nothing.
        self.current_phase = phase.clone();
        let label = phase.label();
        if label != self.last_phase {
            tracing::info!(node = %self.join.node, phase = %label, "state");
            self.last_phase = label;
        } else {
            tracing::debug!(node = %self.join.node, phase = %label, "heartbeat");
        }
        let mut last = report.clone();
        match self.spool.push(report) {
            Ok(seq) => last.seq = seq,
            Err(e) => tracing::error!(error = %e, "could not spool a report"),
        }
        if let Ok(json) = serde_json::to_vec(&last) {
            let _ = self.state.write(&self.state.last_report(), &json, 0o600);
        }
        self.flush().await;
    }

    async fn flush(&self) {
        match self.spool.flush(&self.client).await {
            Ok(f) if f.dropped > 0 => {
                tracing::warn!(dropped = f.dropped, "reports refused by the seeder")
            }
            Ok(_) => {}
            Err(e) => tracing::debug!(error = %e, "reports stay spooled"),
        }
    }

    /// Enrolls unless an identity is already stored. Retries while the seeder is unreachable.
    pub async fn ensure_enrolled(&mut self) -> Result<Option<SignedEnvelope<Manifest>>> {
        if self.state.identity().is_some() {
            return Ok(None);
        }
        // The key is on disk (0600) before it is used, so a retry after a crash reuses it (the
        // seeder sees the same key, not a replacement).
        let key = match std::fs::read_to_string(self.state.enroll_key())
            .ok()
            .and_then(|pem| KeyPair::from_pem(&pem).ok())
        {
            Some(k) => k,
            None => {
                let k = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
                self.state.write(
                    &self.state.enroll_key(),
                    k.serialize_pem().as_bytes(),
                    0o600,
                )?;
                k
            }
        };
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, self.join.node.as_str());
        let csr = params.serialize_request(&key)?.pem()?;
        let req = EnrollRequest {
            csr_pem: csr,
            facts: self.facts.clone(),
        };
        let mut delay = Duration::from_secs(1);
        loop {
            tracing::info!(node = %self.join.node, seeder = %self.join.seeder_url, "enrolling");
            match self.client.enroll(&self.join.join_url, &req).await {
                Ok(resp) => {
                    let identity = format!("{}{}", key.serialize_pem(), resp.cert_chain_pem);
                    self.state
                        .write(&self.state.identity_file(), identity.as_bytes(), 0o600)?;
                    let _ = std::fs::remove_file(self.state.enroll_key());
                    self.client.set_identity(&identity)?;
                    self.report(Phase::Enrolling, vec![]).await;
                    return Ok(Some(resp.manifest));
                }
                Err(e) if e.retryable() => {
                    tracing::warn!(error = %e, retry_in = ?delay, "enrollment failed; retrying");
                    tokio::time::sleep(delay).await;
                    delay = next_delay(delay, &e);
                }
                Err(e) => {
                    return Err(anyhow::Error::new(e).context("enrollment refused"));
                }
            }
        }
    }

    /// Renews the identity certificate once it is past 2/3 of its lifetime. The new key and
    /// chain replace the old ones in one atomic write, after the seeder signed them.
    pub async fn renew_identity_if_due(&mut self, now: u64) {
        let Some(identity) = self.state.identity() else {
            return;
        };
        // The identity file holds the key first, then the chain: the leaf is the first certificate.
        let leaf = identity
            .find("-----BEGIN CERTIFICATE-----")
            .map(|i| &identity[i..])
            .unwrap_or("");
        let Some((nb, na, _)) = crate::resources::certificate::parse_leaf(leaf.as_bytes()) else {
            tracing::warn!("the identity certificate cannot be parsed; not renewing");
            return;
        };
        if !crate::resources::certificate::renewal_due(nb, na, now as i64) {
            return;
        }
        let renewed = async {
            let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
            let mut params = CertificateParams::new(Vec::<String>::new())?;
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, self.join.node.as_str());
            let csr = params.serialize_request(&key)?.pem()?;
            let chain = self.client.renew_identity(&csr).await?;
            let identity = format!("{}{chain}", key.serialize_pem());
            self.state
                .write(&self.state.identity_file(), identity.as_bytes(), 0o600)?;
            self.client.set_identity(&identity)?;
            anyhow::Ok(())
        };
        match renewed.await {
            Ok(()) => tracing::info!(node = %self.join.node, "identity certificate renewed"),
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "identity renewal failed; retrying later")
            }
        }
    }

    /// Units the last manifest asked for: adopted after an agent restart.
    pub async fn recover_services(&self) {
        let (Some(sup), Some(env)) = (&self.supervisor, self.state.saved_manifest()) else {
            return;
        };
        let Ok(m) = env.verify(&self.manifest_key) else {
            return;
        };
        let units: Vec<String> = m
            .resources
            .iter()
            .filter_map(|r| match r {
                Resource::Service(s) => Some(s.unit.clone()),
                _ => None,
            })
            .collect();
        for (unit, outcome) in sup.recover(units.iter().map(String::as_str)).await {
            tracing::info!(unit, outcome = ?outcome.as_ref().map_err(|e| e.to_string()), "recovered service");
        }
    }

    /// One convergence pass over a manifest. Returns whether the node converged.
    pub async fn converge(&mut self, envelope: &SignedEnvelope<Manifest>) -> bool {
        let verified = match verify_manifest(
            envelope,
            &self.manifest_key,
            &self.join.campaign,
            &self.join.node,
            unix_now(),
            self.applied,
        ) {
            Ok(v) => v,
            Err(e) => {
                tracing::error!(error = %e, "manifest refused; nothing applied");
                self.report(
                    Phase::Failed {
                        kind: FailureKind::Verify,
                        retryable: false,
                        message: e.to_string(),
                    },
                    vec![],
                )
                .await;
                return false;
            }
        };
        let manifest = verified.manifest;
        if let Ok(json) = serde_json::to_vec(envelope) {
            let _ = self.state.write(&self.state.manifest(), &json, 0o600);
        }
        self.report(Phase::Fetched, vec![]).await;
        let host = self.host.clone();
        let observed = {
            let env = ObserveEnv {
                host: host.as_ref(),
                supervisor: self.supervisor.as_ref(),
                readiness: &self.client,
                probe_timeout: Duration::from_secs(10),
            };
            match observe(&manifest, &env).await {
                Ok(o) => o,
                Err(e) => {
                    // The whole chain: the host's error names the path (a refused link, say).
                    self.fail(FailureKind::Apply, true, chain(&e), vec![]).await;
                    return false;
                }
            }
        };
        let the_plan = match plan(&manifest, &observed, &PlanContext::now()) {
            Ok(p) => p,
            Err(e) => {
                self.fail(FailureKind::Apply, false, format!("planning: {e}"), vec![])
                    .await;
                return false;
            }
        };
        if !the_plan.is_empty() {
            tracing::info!(generation = manifest.generation.0, "plan:\n{the_plan}");
        }
        let total = the_plan.steps.len() as u32;
        let mut progress = 0u32;
        // Events are collected during apply and reported as they come.
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<ApplyEvent>();
        let node = self.join.node.clone();
        let client = self.client.clone();
        let supervisor = self.supervisor.take();
        let result = {
            let env = ApplyEnv {
                host: host.as_ref(),
                node: &node,
                fetcher: &client,
                signer: &client,
                issuer: &client,
                readiness: &client,
                supervisor: supervisor.as_ref(),
                settings: ApplySettings::default(),
            };
            let mut on_event = move |ev: ApplyEvent| {
                let _ = tx.send(ev);
            };
            let run = apply(&the_plan, &env, &mut on_event);
            tokio::pin!(run);
            // A step may take long (a wait for another node): keep reporting meanwhile, or the
            // seeder would count this node as missing.
            let every = Duration::from_secs(u64::from(manifest.report_interval_secs.max(1)));
            let mut heartbeat =
                tokio::time::interval_at(tokio::time::Instant::now() + every, every);
            // While a wait blocks, a newer generation may be what unblocks it (a peer waiting
            // for its own health behind an allowlist the next generation completes): keep
            // long-polling, and give up the wait for the newer manifest. Only between steps that
            // change nothing: a wait is a probe, so abandoning it leaves no half-applied step.
            let newer = self.newer_manifest(&envelope.payload);
            tokio::pin!(newer);
            let mut waiting = false;
            loop {
                tokio::select! {
                    r = &mut run => break Some(r),
                    Some(ev) = rx.recv() => {
                        waiting = matches!(ev, ApplyEvent::Waiting { .. });
                        self.on_apply_event(ev, &mut progress, total).await;
                    }
                    (env, etag) = &mut newer, if waiting => {
                        tracing::info!("a newer manifest arrived during a wait: applying it instead");
                        self.etag = etag;
                        self.superseded = Some(env);
                        break None;
                    }
                    _ = heartbeat.tick() => {
                        let phase = self.current_phase.clone();
                        self.report(phase, vec![]).await;
                    }
                }
            }
        };
        let Some(result) = result else {
            self.supervisor = supervisor;
            return false;
        };
        while let Ok(ev) = rx.try_recv() {
            self.on_apply_event(ev, &mut progress, total).await;
        }
        self.supervisor = supervisor;
        match result {
            Ok(summary) => {
                let applied = Applied {
                    generation: manifest.generation,
                    digest: manifest.digest,
                };
                // The ledger is what refuses an older generation after a restart: without it
                // durably written, this apply does not count.
                if let Err(e) = serde_json::to_vec(&applied)
                    .map_err(anyhow::Error::from)
                    .and_then(|json| self.state.write(&self.state.applied(), &json, 0o600))
                {
                    let message = format!("recording the applied generation: {e:#}");
                    self.fail(FailureKind::Internal, true, message, summary.reports)
                        .await;
                    return false;
                }
                self.applied = Some(applied);
                self.last_checks = self.checks(&manifest).await;
                self.last_services = self.restart_counts(&manifest);
                self.report(Phase::Converged, summary.reports).await;
                true
            }
            Err(e) => {
                let retryable = true;
                let message = chain(&e);
                self.fail(FailureKind::Apply, retryable, message, e.reports)
                    .await;
                false
            }
        }
    }

    /// Long-polls until the seeder has a manifest other than `current`.
    fn newer_manifest(
        &self,
        current: &str,
    ) -> impl std::future::Future<Output = (SignedEnvelope<Manifest>, Option<String>)> + 'static
    {
        let client = self.client.clone();
        let etag = self.etag.clone();
        let current = current.to_owned();
        async move {
            loop {
                match client
                    .manifest(etag.as_deref(), Duration::from_secs(30))
                    .await
                {
                    Ok(ManifestPoll::Changed { envelope, etag }) if envelope.payload != current => {
                        return (envelope, etag)
                    }
                    Ok(_) => {}
                    Err(e) => {
                        let delay = e.retry_after().unwrap_or(Duration::from_secs(2));
                        tokio::time::sleep(delay).await;
                    }
                }
            }
        }
    }

    async fn on_apply_event(&mut self, ev: ApplyEvent, progress: &mut u32, total: u32) {
        match ev {
            ApplyEvent::Started { index, .. } => {
                *progress = index as u32;
                self.report(
                    Phase::Applying {
                        done: *progress,
                        total,
                    },
                    vec![],
                )
                .await;
            }
            ApplyEvent::Waiting { blocked_on, .. } => {
                self.report(Phase::Waiting { blocked_on }, vec![]).await;
            }
            ApplyEvent::Finished(r) => {
                if r.outcome != hiveseed_proto::status::Outcome::Unchanged {
                    tracing::info!(resource = %r.id, outcome = ?r.outcome, ms = r.duration_ms, "resource");
                }
                *progress = (*progress + 1).min(total);
                self.report(
                    Phase::Applying {
                        done: *progress,
                        total,
                    },
                    vec![r],
                )
                .await;
            }
        }
    }

    async fn fail(
        &mut self,
        kind: FailureKind,
        retryable: bool,
        message: String,
        resources: Vec<ResourceReport>,
    ) {
        tracing::error!(kind = kind.as_str(), retryable, %message, "convergence failed");
        self.report(
            Phase::Failed {
                kind,
                retryable,
                message,
            },
            resources,
        )
        .await;
    }

    async fn checks(&self, manifest: &Manifest) -> Vec<CheckRecord> {
        let env = CheckEnv {
            host: self.host.as_ref(),
            node: &self.join.node,
            manager: self.manager,
            supervisor: self.supervisor.as_ref(),
            timeout: Duration::from_secs(10),
        };
        run_checks(manifest, &env).await
    }

    fn restart_counts(&self, manifest: &Manifest) -> Vec<ServiceRestarts> {
        crate::resources::service::restart_counts(
            manifest,
            self.host.as_ref(),
            self.manager,
            self.supervisor.as_ref(),
        )
    }

    /// Re-runs the node-local checks and reports them (heartbeat).
    async fn heartbeat(&mut self, manifest: Option<&Manifest>, converged: bool) {
        if let Some(m) = manifest {
            self.last_checks = self.checks(m).await;
            self.last_services = self.restart_counts(m);
        }
        let phase = if converged {
            Phase::Converged
        } else {
            Phase::Failed {
                kind: FailureKind::Apply,
                retryable: true,
                message: "last convergence failed; retrying".into(),
            }
        };
        self.report(phase, vec![]).await;
    }

    /// The loop: converge, then long-poll for a new generation; repair drift on an interval
    /// with per-node splay; heartbeat every report interval; retry failures with backoff.
    pub async fn run(mut self) -> Result<()> {
        let first = self.ensure_enrolled().await?;
        self.recover_services().await;
        let splay = splay_for(self.join.node.as_str(), self.config.drift_interval);
        let mut current: Option<SignedEnvelope<Manifest>> =
            first.or_else(|| self.state.saved_manifest());
        let mut converged = false;
        let mut last_converge = Instant::now() - self.config.drift_interval;
        let mut retry_delay = Duration::from_secs(2);
        let mut last_heartbeat = Instant::now();
        loop {
            let report_interval = current
                .as_ref()
                .and_then(|e| e.verify(&self.manifest_key).ok())
                .map(|m| Duration::from_secs(u64::from(m.report_interval_secs.max(5))))
                .unwrap_or(Duration::from_secs(30));
            let due_drift = last_converge.elapsed() >= self.config.drift_interval + splay;
            let due_retry = !converged && last_converge.elapsed() >= retry_delay;
            if let Some(env) = current.clone() {
                if due_drift || due_retry {
                    converged = self.converge(&env).await;
                    if let Some(newer) = self.superseded.take() {
                        current = Some(newer);
                        last_converge = Instant::now() - self.config.drift_interval - splay;
                        retry_delay = Duration::from_secs(0);
                        continue;
                    }
                    last_converge = Instant::now();
                    last_heartbeat = Instant::now();
                    retry_delay = if converged {
                        Duration::from_secs(2)
                    } else {
                        (retry_delay * 2).min(Duration::from_secs(60))
                    };
                }
            }
            if last_heartbeat.elapsed() >= report_interval {
                let m = current
                    .as_ref()
                    .and_then(|e| e.verify(&self.manifest_key).ok());
                self.heartbeat(m.as_ref(), converged).await;
                last_heartbeat = Instant::now();
            }
            // Wait for a new manifest, at most until the next heartbeat or retry is due.
            let until_heartbeat = report_interval.saturating_sub(last_heartbeat.elapsed());
            let mut wait = self.config.poll_wait.min(until_heartbeat);
            if !converged {
                wait = wait.min(retry_delay.saturating_sub(last_converge.elapsed()));
            }
            match self.client.manifest(self.etag.as_deref(), wait).await {
                Ok(ManifestPoll::Changed { envelope, etag }) => {
                    self.etag = etag;
                    let changed = current
                        .as_ref()
                        .map(|c| c.payload != envelope.payload)
                        .unwrap_or(true);
                    current = Some(envelope);
                    if changed {
                        // A new manifest converges now, not at the next drift check.
                        last_converge = Instant::now() - self.config.drift_interval - splay;
                        retry_delay = Duration::from_secs(0);
                        converged = false;
                    }
                }
                Ok(ManifestPoll::NotModified) => {}
                Err(e) => {
                    let delay = e.retry_after().unwrap_or(Duration::from_secs(2));
                    tracing::warn!(error = %e, retry_in = ?delay, "manifest poll failed");
                    tokio::time::sleep(delay).await;
                }
            }
            self.flush().await;
            self.renew_identity_if_due(unix_now()).await;
        }
    }
}

/// An error and its sources on one line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// A per-node offset in `[0, interval/4)`, stable across restarts, so a fleet's drift checks
/// do not all land at once.
pub fn splay_for(node: &str, interval: Duration) -> Duration {
    let h = hiveseed_proto::Sha256::digest(node.as_bytes());
    let n = u64::from_le_bytes(h.0[..8].try_into().expect("8 bytes"));
    let quarter = (interval.as_millis() as u64 / 4).max(1);
    Duration::from_millis(n % quarter)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splay_is_stable_and_bounded() {
        let i = Duration::from_secs(300);
        let a = splay_for("do-1461-peer-nyc3-01", i);
        assert_eq!(a, splay_for("do-1461-peer-nyc3-01", i));
        assert!(a < Duration::from_secs(75));
        assert_ne!(a, splay_for("do-1461-peer-nyc3-02", i));
    }
}
