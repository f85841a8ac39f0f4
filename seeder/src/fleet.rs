//! `fleet.toml`: the operator's description of a campaign, parsed (`FleetConfig`) then validated
//! (`Fleet`). Every refusal names the field, the way the seed's Terraform validations do.

use std::collections::BTreeMap;
use std::fmt;
use std::net::Ipv4Addr;
use std::path::Path;

use hiveseed_proto::manifest::VersionPin;
use hiveseed_proto::{Campaign, NodeName, Region, RoleName, Sha256};
use serde::{Deserialize, Serialize};

/// The roles the reference hive knows. Role files in `roles/` must be one of these.
pub const KNOWN_ROLES: [&str; 4] = ["pg", "peer", "agent", "ctrl"];
/// Node names carry a two-digit index.
const MAX_PER_ROLE: u32 = 99;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FleetError {
    #[error("fleet file {path}: {message}")]
    Read { path: String, message: String },
    #[error("fleet.toml: {message}")]
    Parse { message: String },
    #[error("fleet.toml field `{field}`: {problem}")]
    Field { field: String, problem: String },
}

fn field(field: impl Into<String>, problem: impl Into<String>) -> FleetError {
    FleetError::Field {
        field: field.into(),
        problem: problem.into(),
    }
}

// ---- raw input -------------------------------------------------------------------------------

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetConfig {
    pub campaign: String,
    pub seeder_url: String,
    /// Extra names or addresses for the seeder's server certificate (load balancer, lab address).
    #[serde(default)]
    pub seeder_extra_sans: Vec<String>,
    pub regions: BTreeMap<String, RegionConfig>,
    #[serde(default)]
    pub sizes: SizesConfig,
    #[serde(default)]
    pub federation: FederationConfig,
    #[serde(default)]
    pub ttl: TtlConfig,
    #[serde(default)]
    pub accounts: AccountsConfig,
    #[serde(default)]
    pub store: StoreConfig,
    pub pins: PinsConfig,
    /// Where the peers' embeddings come from; absent: `local`.
    #[serde(default)]
    pub embedder: Option<EmbedderConfig>,
    /// The peers' LLM; absent: none (no LLM-backed features).
    #[serde(default)]
    pub llm: Option<LlmConfig>,
    /// The agent nodes' LLM (the seed's: xAI grok-4.3); absent: the agents' CLI has none.
    #[serde(default)]
    pub agent_llm: Option<LlmConfig>,
    /// The peers' cross-encoder reranker; absent: none.
    #[serde(default)]
    pub reranker: Option<RerankerConfig>,
    /// Residency attestation of enrollments; absent: off (the join token, single use, and the
    /// connection's source address are what an enrollment rests on).
    #[serde(default)]
    pub attestation: Option<AttestationConfig>,
}

/// `[attestation]`: enrollment asks the cloud whether the enrolling droplet is the node.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttestationConfig {
    /// `digitalocean`, the only provider.
    pub provider: String,
    /// The API's base URL; default `https://api.digitalocean.com`.
    pub api_url: Option<String>,
    /// The tag every droplet of the campaign carries; default the campaign name (Terraform's).
    pub tag: Option<String>,
}

/// `[embedder]`: one shape for every kind, checked per kind in `validate_embedder` so that each
/// refusal names its field (serde's tagged enums would say "unknown variant" and nothing else).
/// Unset fields take the seed's values (reference spec §1.6).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmbedderConfig {
    /// `local`, `openrouter` or `ollama`.
    pub kind: String,
    pub model: Option<String>,
    pub dim: Option<u32>,
    /// `openrouter`: the variable the daemon reads the operator's key from.
    pub api_key_env: Option<String>,
    /// `ollama`: the release the `ollama` artifact is.
    pub version: Option<String>,
    /// `ollama`: sha256 of `ollama-linux-amd64.tgz`; the `ollama` artifact must be exactly this.
    pub sha256: Option<String>,
    /// `ollama`: where the sidecar listens, `http://127.0.0.1:<port>`.
    pub url: Option<String>,
}

/// `[llm]`: unset fields take the seed's values (reference spec §1.6).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LlmConfig {
    pub backend: Option<String>,
    pub model: Option<String>,
    pub api_key_env: Option<String>,
}

/// `[reranker]`: the daemon's cross-encoder (reference spec §3.2).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RerankerConfig {
    pub model: Option<String>,
}

/// Where the peers' ai-memory stores live on their region's pg node (README "Store layout").
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    /// `"schema"` (the seed's: one database, a schema per peer) or `"database"` (a database per
    /// peer); absent means `"schema"`. `[regions.<name>] store_layout` overrides it per region.
    pub layout: Option<String>,
}

/// Service accounts. Production leaves this out (useradd picks the uid).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccountsConfig {
    /// Lab only: every node's service account gets uid `service_uid_base + N`, N the node's
    /// 1-based position in the fleet's name-sorted node list. All lab nodes share one kernel, so
    /// the lab's per-uid policy routing is what gives a node's daemons the node's own source
    /// address (lab-feasibility §8); distinct uids per node make that possible.
    pub service_uid_base: Option<u32>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegionConfig {
    #[serde(default)]
    pub pg: u32,
    #[serde(default)]
    pub peer: u32,
    #[serde(default)]
    pub agent: u32,
    #[serde(default)]
    pub ctrl: u32,
    /// Overrides `[store] layout` for this region's pg node and peers.
    pub store_layout: Option<String>,
    /// The region's VPC range (`a.b.c.d/p`): Terraform creates the VPC with it and the seeder
    /// certifies only private addresses inside it. Default: `10.(10+i).0.0/16` for the i-th region
    /// in name order, what terraform/main.tf computed before the range was fleet data.
    pub vpc_cidr: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SizesConfig {
    pub pg: String,
    pub peer: String,
    pub agent: String,
    pub ctrl: String,
}

impl Default for SizesConfig {
    fn default() -> Self {
        Self {
            pg: "s-4vcpu-8gb".into(),
            peer: "s-4vcpu-8gb".into(),
            agent: "s-1vcpu-2gb".into(),
            ctrl: "s-1vcpu-2gb".into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FederationConfig {
    pub port: u16,
    /// Requested synchronous write quorum (local commit counts as one); clamped to 1..=peers+1.
    pub quorum_w: u32,
    pub quorum_timeout_ms: u32,
    pub catchup_interval_secs: u32,
    pub shutdown_grace_secs: u32,
}

impl Default for FederationConfig {
    fn default() -> Self {
        Self {
            port: 9077,
            quorum_w: 2,
            quorum_timeout_ms: 8000,
            catchup_interval_secs: 30,
            shutdown_grace_secs: 30,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TtlConfig {
    pub join_token_secs: u64,
    pub certificate_secs: u64,
    pub credential_secs: u64,
    pub manifest_secs: u64,
    pub report_interval_secs: u32,
}

impl Default for TtlConfig {
    fn default() -> Self {
        Self {
            join_token_secs: 7 * 24 * 3600,
            certificate_secs: 30 * 24 * 3600,
            credential_secs: 7 * 24 * 3600,
            manifest_secs: 7 * 24 * 3600,
            report_interval_secs: 30,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PinsConfig {
    pub postgres: PostgresPinsConfig,
    pub ai_memory: AiMemoryPinsConfig,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresPinsConfig {
    pub major: u32,
    /// `pgdg` adds apt.postgresql.org for `pgdg_suite`; `distro` uses the node's own suites.
    pub source: String,
    #[serde(default)]
    pub pgdg_suite: Option<String>,
    /// Version pins: `"18.4-1.pgdg24.04+1"` is exact, `"17.*"` a prefix, `"*"` any.
    pub server: String,
    pub pgvector: String,
    pub age: String,
    /// What the live server must report (`server_version`, `extversion`s).
    pub expect_server: String,
    pub expect_pgvector: String,
    pub expect_age: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AiMemoryPinsConfig {
    pub version: String,
    pub sha256: String,
    pub schema: u32,
}

// ---- validated -------------------------------------------------------------------------------

/// A validated fleet: every node named, every pin parsed, W clamped.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Fleet {
    pub campaign: Campaign,
    pub seeder: SeederEndpoint,
    pub seeder_extra_sans: Vec<String>,
    pub regions: BTreeMap<Region, RegionCounts>,
    pub nodes: Vec<NodeSpec>,
    pub federation: Federation,
    pub ttl: Ttl,
    pub pins: Pins,
    pub embedder: Embedder,
    pub llm: Option<Llm>,
    pub reranker: Option<Reranker>,
    /// The agent nodes' LLM, keyed by the campaign's `secrets/agent-llm-api-key`.
    pub agent_llm: Option<Llm>,
    /// The effective store layout of every region with a pg node (`[store] layout`, or the
    /// region's own `store_layout`).
    pub store_layouts: BTreeMap<Region, StoreLayout>,
    /// Every region's VPC range (`[regions.X] vpc_cidr`, or its default).
    pub vpc_ranges: BTreeMap<Region, VpcRange>,
    /// `[attestation]`; `None`: enrollments are not attested.
    pub attestation: Option<Attestation>,
    /// Node name → position in `nodes`.
    #[serde(skip)]
    index: std::collections::HashMap<NodeName, usize>,
}

/// DigitalOcean's API, where `[attestation] api_url` points by default.
pub const DIGITALOCEAN_API: &str = "https://api.digitalocean.com";

/// Validated `[attestation]`: enrollment checks the droplet against DigitalOcean's record of it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Attestation {
    /// `https://host[:port]`, or `http://` to a loopback address (the lab's stand-in); no
    /// path, no trailing slash.
    pub api_url: String,
    pub tag: String,
}

impl fmt::Display for Attestation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "digitalocean (api {}, tag {})", self.api_url, self.tag)
    }
}

fn validate_attestation(
    raw: &AttestationConfig,
    campaign: &Campaign,
) -> Result<Attestation, FleetError> {
    if raw.provider != "digitalocean" {
        return Err(field(
            "attestation.provider",
            format!(
                "must be \"digitalocean\" (the only provider), not {:?}",
                raw.provider
            ),
        ));
    }
    let text = raw.api_url.as_deref().unwrap_or(DIGITALOCEAN_API);
    let api_url = url::Url::parse(text)
        .map_err(|e| field("attestation.api_url", format!("{text:?}: {e}")))?;
    if !api_url.username().is_empty()
        || api_url.password().is_some()
        || api_url.query().is_some()
        || api_url.fragment().is_some()
        || api_url.path() != "/"
    {
        return Err(field(
            "attestation.api_url",
            "must be scheme://host[:port] with no user, path, query or fragment",
        ));
    }
    let loopback = match api_url.host() {
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        _ => false,
    };
    match api_url.scheme() {
        "https" => {}
        "http" if loopback => {}
        "http" => {
            return Err(field(
                "attestation.api_url",
                "http:// is accepted only to a loopback IP address (a stand-in on this machine); the API token must travel over TLS",
            ))
        }
        other => {
            return Err(field(
                "attestation.api_url",
                format!("scheme {other:?} is not https"),
            ))
        }
    }
    let tag = raw.tag.clone().unwrap_or_else(|| campaign.to_string());
    // DigitalOcean's tag names: letters, digits, `:`, `-` and `_`, at most 255.
    if tag.is_empty()
        || tag.len() > 255
        || !tag
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_:".contains(&b))
    {
        return Err(field(
            "attestation.tag",
            format!("{tag:?} is not a DigitalOcean tag (letters, digits, - _ :, at most 255)"),
        ));
    }
    Ok(Attestation {
        api_url: api_url.as_str().trim_end_matches('/').to_owned(),
        tag,
    })
}

/// An IPv4 network (`a.b.c.d/p`, host bits zero): a region's VPC range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VpcRange {
    network: Ipv4Addr,
    prefix: u8,
}

impl VpcRange {
    /// DigitalOcean VPCs are /16 to /28; the lab's per-region /24 fits too.
    pub fn parse(s: &str) -> Result<Self, String> {
        let (addr, prefix) = s
            .split_once('/')
            .ok_or_else(|| format!("{s:?} is not a.b.c.d/prefix"))?;
        let network: Ipv4Addr = addr
            .parse()
            .map_err(|_| format!("{addr:?} is not an IPv4 address"))?;
        let prefix: u8 = prefix
            .parse()
            .ok()
            .filter(|p| (8..=28).contains(p))
            .ok_or_else(|| format!("prefix {prefix:?} is not 8..=28"))?;
        let range = Self { network, prefix };
        if range.mask() & u32::from(network) != u32::from(network) {
            return Err(format!("{s} has host bits set"));
        }
        Ok(range)
    }

    fn mask(self) -> u32 {
        u32::MAX << (32 - u32::from(self.prefix))
    }

    pub fn contains(self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & self.mask() == u32::from(self.network)
    }

    pub fn overlaps(self, other: VpcRange) -> bool {
        self.contains(other.network) || other.contains(self.network)
    }
}

impl std::fmt::Display for VpcRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

impl Serialize for VpcRange {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SeederEndpoint {
    /// `https://host:port`, no path.
    pub url: String,
    pub host: String,
    pub port: u16,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct RegionCounts {
    pub pg: u32,
    pub peer: u32,
    pub agent: u32,
    pub ctrl: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NodeSpec {
    pub name: NodeName,
    pub role: RoleName,
    pub region: Region,
    /// 1-based position among the nodes of this role in this region: a peer's K, which names its
    /// store (`ic_peer_K` or `ai_memory_peer_K`).
    pub index: u32,
    pub size: String,
    /// The uid of the node's service account when the fleet pins one (`accounts`).
    pub service_uid: Option<u32>,
}

/// How a region's pg node holds its peers' ai-memory stores.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StoreLayout {
    /// The seed's: one database `ai_memory`, a schema `ic_peer_K` per peer. ai-memory 0.7.0
    /// NULLs a per-schema store's embeddings at every boot (its dimension probe reads `public`).
    #[default]
    Schema,
    /// A database `ai_memory_peer_K` per peer, the daemon's tables in its `public` schema.
    Database,
}

/// The one database of the schema layout.
pub const SHARED_DATABASE: &str = "ai_memory";

/// Where one peer's store lives on its region's pg node; K is the peer's index in its region.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PeerStore {
    pub index: u32,
    pub layout: StoreLayout,
    /// `ai_memory` (schema layout) or `ai_memory_peer_K` (database layout).
    pub database: String,
    /// The schema the daemon's tables live in: `ic_peer_K`, or `public`.
    pub schema: String,
    /// The daemon's search_path: its schema first, `public` (pgvector's types) always, and
    /// `ag_catalog` as the seed has it.
    pub search_path: Vec<String>,
    /// The store's name in check names (`signed_events.<name>`): the schema in the schema
    /// layout, the database in the database layout.
    pub name: String,
}

impl StoreLayout {
    fn parse(field_name: &str, s: &str) -> Result<Self, FleetError> {
        match s {
            "schema" => Ok(Self::Schema),
            "database" => Ok(Self::Database),
            _ => Err(field(
                field_name,
                format!("must be \"schema\" or \"database\", not {s:?}"),
            )),
        }
    }

    /// The store of the region's K-th peer.
    pub fn store(self, index: u32) -> PeerStore {
        match self {
            Self::Schema => {
                let schema = format!("ic_peer_{index}");
                PeerStore {
                    index,
                    layout: self,
                    database: SHARED_DATABASE.into(),
                    schema: schema.clone(),
                    search_path: vec![schema.clone(), "ag_catalog".into(), "public".into()],
                    name: schema,
                }
            }
            Self::Database => {
                let database = format!("{SHARED_DATABASE}_peer_{index}");
                PeerStore {
                    index,
                    layout: self,
                    database: database.clone(),
                    schema: "public".into(),
                    search_path: vec!["public".into(), "ag_catalog".into()],
                    name: database,
                }
            }
        }
    }

    /// The databases a pg node with `peers` peers holds, in peer order. The schema layout's one
    /// database exists even before the region has a peer, as in the seed.
    pub fn databases(self, peers: u32) -> Vec<StoreDatabase> {
        match self {
            Self::Schema => vec![StoreDatabase {
                name: SHARED_DATABASE.into(),
                schemas: (1..=peers).map(|k| self.store(k).schema).collect(),
            }],
            Self::Database => (1..=peers)
                .map(|k| StoreDatabase {
                    name: self.store(k).database,
                    schemas: Vec::new(),
                })
                .collect(),
        }
    }
}

/// One database of a pg node's stores, with the peer schemas it holds besides `public`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StoreDatabase {
    pub name: String,
    pub schemas: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Federation {
    pub port: u16,
    /// Effective W after clamping to 1..=peers+1 (reference spec §1.3).
    pub quorum_w: u32,
    pub quorum_w_requested: u32,
    pub quorum_timeout_ms: u32,
    pub catchup_interval_secs: u32,
    pub shutdown_grace_secs: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Ttl {
    pub join_token_secs: u64,
    pub certificate_secs: u64,
    pub credential_secs: u64,
    pub manifest_secs: u64,
    pub report_interval_secs: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Pins {
    pub postgres: PostgresPins,
    pub ai_memory: AiMemoryPins,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PackageSource {
    Pgdg,
    Distro,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PostgresPins {
    pub major: u32,
    pub source: PackageSource,
    pub pgdg_suite: Option<String>,
    pub server: VersionPin,
    pub pgvector: VersionPin,
    pub age: VersionPin,
    pub expect_server: String,
    pub expect_pgvector: String,
    pub expect_age: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AiMemoryPins {
    pub version: String,
    pub sha256: Sha256,
    pub schema: u32,
}

/// The seed's choices (reference spec §1.6).
pub const SEED_OPENROUTER_EMBED_MODEL: &str = "google/gemini-embedding-2";
pub const SEED_EMBED_DIM: u32 = 768;
pub const SEED_KEY_ENV: &str = "OPENROUTER_API_KEY";
pub const SEED_OLLAMA_VERSION: &str = "0.6.8";
pub const SEED_OLLAMA_URL: &str = "http://127.0.0.1:11434";
pub const SEED_LLM_MODEL: &str = "google/gemma-4-26b-a4b-it";
/// The seed's agent-role LLM (reference spec §1.6 AGENT_LLM_MODEL, §3.2 agent config).
pub const SEED_AGENT_LLM_MODEL: &str = "grok-4.3";
pub const SEED_AGENT_KEY_ENV: &str = "XAI_API_KEY";
pub const SEED_RERANKER_MODEL: &str = "ms-marco-MiniLM-L-6-v2";
/// The local model: what the seeder's `minilm-*` artifacts are.
pub const LOCAL_EMBED_MODEL: &str = "sentence-transformers/all-MiniLM-L6-v2";
pub const LOCAL_EMBED_DIM: u32 = 384;
/// The one model ai-memory 0.7.0 embeds with through Ollama: it asks the sidecar for exactly this
/// tag (`NOMIC_OLLAMA_MODEL`), whatever the config names.
pub const OLLAMA_EMBED_MODEL: &str = "nomic-embed-text";

/// Where the peers' embeddings come from. Serialized with its `kind`, for the roles.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Embedder {
    /// all-MiniLM-L6-v2 on the node, from the seeder's `minilm-*` artifacts: offline, no key.
    Local { model: String, dim: u32 },
    /// The seed's choice: an OpenRouter embedding model, with the operator's key.
    Openrouter {
        model: String,
        dim: u32,
        api_key_env: EnvVarName,
    },
    /// The seed's older choice: an Ollama sidecar on each peer, its release served by the seeder
    /// as the `ollama` artifact (pinned by `sha256`), the model pulled from Ollama's registry.
    Ollama {
        version: String,
        sha256: Sha256,
        model: String,
        dim: u32,
        /// `http://127.0.0.1:<port>`.
        url: String,
        /// `127.0.0.1:<port>`: the sidecar's `OLLAMA_HOST`.
        listen: String,
        port: u16,
    },
}

impl Embedder {
    pub fn kind(&self) -> &'static str {
        match self {
            Embedder::Local { .. } => "local",
            Embedder::Openrouter { .. } => "openrouter",
            Embedder::Ollama { .. } => "ollama",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LlmBackend {
    Openrouter,
    /// xAI's API (the seed's agent nodes).
    Xai,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Llm {
    pub backend: LlmBackend,
    pub model: String,
    pub api_key_env: EnvVarName,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Reranker {
    pub model: String,
}

/// A process environment variable name the fleet chooses (`OPENROUTER_API_KEY`): upper-case
/// letters, digits and `_`, not starting with a digit, and none the peers' environment file
/// already sets or the daemon reads for itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct EnvVarName(String);

impl EnvVarName {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    fn parse(field_name: &str, s: &str) -> Result<Self, FleetError> {
        let mut chars = s.chars();
        let well_formed = matches!(chars.next(), Some(c) if c.is_ascii_uppercase() || c == '_')
            && chars.all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
            && s.len() <= 128;
        if !well_formed {
            return Err(field(
                field_name,
                "must be an environment variable name: A-Z, 0-9 and _, not starting with a digit",
            ));
        }
        // The environment file sets these (or the daemon reads them as its own settings): the
        // key must not replace one of them.
        const TAKEN: [&str; 7] = [
            "AI_MEMORY_",
            "PG",
            "LD_",
            "HF_",
            "OLLAMA_",
            "SYSTEMD_",
            "RUST_",
        ];
        const TAKEN_EXACT: [&str; 6] = ["HOME", "PATH", "USER", "SHELL", "LANG", "TZ"];
        if TAKEN.iter().any(|p| s.starts_with(p)) || TAKEN_EXACT.contains(&s) {
            return Err(field(
                field_name,
                format!(
                    "{s} is a variable the peers' environment already uses (AI_MEMORY_*, PG*, \
                     LD_*, HF_*, OLLAMA_*, SYSTEMD_*, RUST_*, HOME, PATH, ...)"
                ),
            ));
        }
        Ok(Self(s.to_owned()))
    }
}

impl fmt::Display for EnvVarName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Display for StoreLayout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Schema => "schema",
            Self::Database => "database",
        })
    }
}

impl fmt::Display for RegionCounts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "pg={} peer={} agent={} ctrl={}",
            self.pg, self.peer, self.agent, self.ctrl
        )
    }
}

impl Fleet {
    pub fn load(path: &Path) -> Result<Self, FleetError> {
        let text = std::fs::read_to_string(path).map_err(|e| FleetError::Read {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        Self::parse(&text)
    }

    pub fn parse(text: &str) -> Result<Self, FleetError> {
        let raw: FleetConfig = toml::from_str(text).map_err(|e| FleetError::Parse {
            message: e.to_string(),
        })?;
        Self::validate(raw)
    }

    pub fn validate(raw: FleetConfig) -> Result<Self, FleetError> {
        let campaign: Campaign = raw
            .campaign
            .parse()
            .map_err(|e: hiveseed_proto::NameError| field("campaign", e.reason))?;
        let seeder = parse_seeder_url(&raw.seeder_url)?;
        for (i, san) in raw.seeder_extra_sans.iter().enumerate() {
            if san.is_empty() || san.len() > 253 || san.contains(char::is_whitespace) {
                return Err(field(
                    format!("seeder_extra_sans[{i}]"),
                    "must be a DNS name or an IP address",
                ));
            }
        }

        if raw.regions.is_empty() {
            return Err(field("regions", "at least one region is required"));
        }
        let default_layout = match &raw.store.layout {
            Some(s) => StoreLayout::parse("store.layout", s)?,
            None => StoreLayout::default(),
        };
        let mut regions = BTreeMap::new();
        let mut store_layouts = BTreeMap::new();
        let mut vpc_ranges: BTreeMap<Region, VpcRange> = BTreeMap::new();
        for (i, (name, counts)) in raw.regions.iter().enumerate() {
            let region: Region = name.parse().map_err(|e: hiveseed_proto::NameError| {
                field(format!("regions.{name}"), e.reason)
            })?;
            let vpc = match &counts.vpc_cidr {
                Some(c) => {
                    VpcRange::parse(c).map_err(|e| field(format!("regions.{name}.vpc_cidr"), e))?
                }
                None => VpcRange::parse(&format!("10.{}.0.0/16", 10 + i))
                    .map_err(|e| field(format!("regions.{name}.vpc_cidr"), e))?,
            };
            if let Some((other, _)) = vpc_ranges.iter().find(|(_, r)| r.overlaps(vpc)) {
                return Err(field(
                    format!("regions.{name}.vpc_cidr"),
                    format!("{vpc} overlaps the VPC range of region {other}"),
                ));
            }
            vpc_ranges.insert(region.clone(), vpc);
            for (role, n) in [
                ("pg", counts.pg),
                ("peer", counts.peer),
                ("agent", counts.agent),
                ("ctrl", counts.ctrl),
            ] {
                if n > MAX_PER_ROLE {
                    return Err(field(
                        format!("regions.{name}.{role}"),
                        format!("at most {MAX_PER_ROLE} nodes per role and region"),
                    ));
                }
            }
            if counts.pg > 1 {
                return Err(field(
                    format!("regions.{name}.pg"),
                    "a region has at most one pg node",
                ));
            }
            if counts.peer > 0 && counts.pg != 1 {
                return Err(field(
                    format!("regions.{name}.pg"),
                    "a region with peers needs exactly one pg node",
                ));
            }
            let c = RegionCounts {
                pg: counts.pg,
                peer: counts.peer,
                agent: counts.agent,
                ctrl: counts.ctrl,
            };
            if c == RegionCounts::default() {
                return Err(field(format!("regions.{name}"), "declares no nodes"));
            }
            let layout = match &counts.store_layout {
                Some(_) if c.pg == 0 => {
                    return Err(field(
                        format!("regions.{name}.store_layout"),
                        "the region has no pg node to hold stores",
                    ))
                }
                Some(s) => StoreLayout::parse(&format!("regions.{name}.store_layout"), s)?,
                None => default_layout,
            };
            if c.pg == 1 {
                store_layouts.insert(region.clone(), layout);
            }
            regions.insert(region, c);
        }

        let sizes = &raw.sizes;
        for (role, size) in [
            ("pg", &sizes.pg),
            ("peer", &sizes.peer),
            ("agent", &sizes.agent),
            ("ctrl", &sizes.ctrl),
        ] {
            if size.is_empty() || !size.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
                return Err(field(
                    format!("sizes.{role}"),
                    "must be a droplet size slug",
                ));
            }
        }

        let mut nodes = Vec::new();
        for (region, c) in &regions {
            for (role, n, size) in [
                ("pg", c.pg, &sizes.pg),
                ("peer", c.peer, &sizes.peer),
                ("agent", c.agent, &sizes.agent),
                ("ctrl", c.ctrl, &sizes.ctrl),
            ] {
                for index in 1..=n {
                    let name = format!("{campaign}-{role}-{region}-{index:02}");
                    let name: NodeName = name.parse().map_err(|e: hiveseed_proto::NameError| {
                        field("campaign", format!("node name {name}: {}", e.reason))
                    })?;
                    nodes.push(NodeSpec {
                        name,
                        role: role.parse().expect("known roles are valid names"),
                        region: region.clone(),
                        index,
                        size: size.clone(),
                        service_uid: None,
                    });
                }
            }
        }
        nodes.sort_by(|a, b| a.name.cmp(&b.name));
        if let Some(base) = raw.accounts.service_uid_base {
            // Below 1000 are the distribution's system accounts; the top must stay clear of
            // nobody (65534) and the 32-bit overflow.
            let top = u64::from(base) + nodes.len() as u64;
            if base < 1000 || top >= 65534 {
                return Err(field(
                    "accounts.service_uid_base",
                    format!(
                        "{base} + {} nodes must stay within 1000..65534",
                        nodes.len()
                    ),
                ));
            }
            for (n, node) in nodes.iter_mut().enumerate() {
                node.service_uid = Some(base + n as u32 + 1);
            }
        }

        let f = &raw.federation;
        if f.port == 0 {
            return Err(field("federation.port", "must not be 0"));
        }
        if f.quorum_timeout_ms == 0 {
            return Err(field("federation.quorum_timeout_ms", "must be positive"));
        }
        if f.shutdown_grace_secs == 0 {
            return Err(field("federation.shutdown_grace_secs", "must be positive"));
        }
        let peers: u32 = regions.values().map(|c| c.peer).sum();
        // Reference spec §1.3: W counts the local commit; clamp to 1..=peers+1.
        let quorum_w = f.quorum_w.clamp(1, peers + 1);
        let federation = Federation {
            port: f.port,
            quorum_w,
            quorum_w_requested: f.quorum_w,
            quorum_timeout_ms: f.quorum_timeout_ms,
            catchup_interval_secs: f.catchup_interval_secs,
            shutdown_grace_secs: f.shutdown_grace_secs,
        };

        let t = &raw.ttl;
        for (name, v) in [
            ("ttl.join_token_secs", t.join_token_secs),
            ("ttl.certificate_secs", t.certificate_secs),
            ("ttl.credential_secs", t.credential_secs),
            ("ttl.manifest_secs", t.manifest_secs),
        ] {
            if v < 60 {
                return Err(field(name, "must be at least 60 seconds"));
            }
        }
        if t.report_interval_secs == 0 {
            return Err(field("ttl.report_interval_secs", "must be positive"));
        }
        if t.credential_secs < 3 * u64::from(t.report_interval_secs) {
            return Err(field(
                "ttl.credential_secs",
                "too short to be renewed at 2/3 of its lifetime",
            ));
        }
        let ttl = Ttl {
            join_token_secs: t.join_token_secs,
            certificate_secs: t.certificate_secs,
            credential_secs: t.credential_secs,
            manifest_secs: t.manifest_secs,
            report_interval_secs: t.report_interval_secs,
        };

        let pins = validate_pins(&raw.pins)?;
        let embedder = validate_embedder(raw.embedder.as_ref())?;
        let llm = raw.llm.as_ref().map(validate_llm).transpose()?;
        let agent_llm = raw.agent_llm.as_ref().map(validate_agent_llm).transpose()?;
        let reranker = raw
            .reranker
            .as_ref()
            .map(|r| validate_reranker(r, &embedder, llm.as_ref()))
            .transpose()?;
        if let (Embedder::Openrouter { api_key_env, .. }, Some(l)) = (&embedder, &llm) {
            if l.api_key_env != *api_key_env {
                return Err(field(
                    "llm.api_key_env",
                    format!(
                        "must equal embedder.api_key_env ({api_key_env}): the campaign holds one \
                         operator key (secrets/llm-api-key)"
                    ),
                ));
            }
        }
        let attestation = raw
            .attestation
            .as_ref()
            .map(|a| validate_attestation(a, &campaign))
            .transpose()?;
        let index = nodes
            .iter()
            .enumerate()
            .map(|(i, n)| (n.name.clone(), i))
            .collect();

        Ok(Fleet {
            campaign,
            seeder,
            seeder_extra_sans: raw.seeder_extra_sans,
            regions,
            nodes,
            federation,
            ttl,
            pins,
            embedder,
            llm,
            reranker,
            agent_llm,
            store_layouts,
            vpc_ranges,
            attestation,
            index,
        })
    }

    /// The variable the agent nodes' key (`secrets/agent-llm-api-key`) reaches them as, when the
    /// fleet gives them an LLM.
    pub fn agent_llm_key_env(&self) -> Option<&EnvVarName> {
        self.agent_llm.as_ref().map(|l| &l.api_key_env)
    }

    /// The variable the operator's API key (`secrets/llm-api-key`) reaches the peers' daemon as,
    /// when the embedder or the LLM needs one; `None`: the fleet needs no key.
    pub fn llm_key_env(&self) -> Option<&EnvVarName> {
        match &self.embedder {
            Embedder::Openrouter { api_key_env, .. } => Some(api_key_env),
            Embedder::Local { .. } | Embedder::Ollama { .. } => {
                self.llm.as_ref().map(|l| &l.api_key_env)
            }
        }
    }

    /// Artifacts whose bytes the fleet pins: `(artifact name, sha256, the field that pins it)`.
    /// The seeder refuses to serve any other bytes under these names.
    pub fn artifact_pins(&self) -> Vec<(&'static str, Sha256, &'static str)> {
        let mut pins = vec![(
            "ai-memory",
            self.pins.ai_memory.sha256,
            "pins.ai_memory.sha256",
        )];
        if let Embedder::Ollama { sha256, .. } = &self.embedder {
            pins.push(("ollama", *sha256, "embedder.sha256"));
        }
        pins
    }

    pub fn node(&self, name: &NodeName) -> Option<&NodeSpec> {
        self.index.get(name).map(|&i| &self.nodes[i])
    }

    pub fn nodes_with_role<'a>(&'a self, role: &'a str) -> impl Iterator<Item = &'a NodeSpec> {
        self.nodes.iter().filter(move |n| n.role.as_str() == role)
    }

    /// The store layout of a region (the fleet's default for a region without a pg node, which
    /// holds no stores).
    pub fn store_layout(&self, region: &Region) -> StoreLayout {
        self.store_layouts.get(region).copied().unwrap_or_default()
    }

    /// Where a peer's store lives; `None` for the other roles.
    pub fn peer_store(&self, node: &NodeSpec) -> Option<PeerStore> {
        (node.role.as_str() == "peer").then(|| self.store_layout(&node.region).store(node.index))
    }
}

fn parse_seeder_url(s: &str) -> Result<SeederEndpoint, FleetError> {
    let url = url::Url::parse(s).map_err(|e| field("seeder_url", e.to_string()))?;
    if url.scheme() != "https" {
        return Err(field("seeder_url", "must be an https:// URL"));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(field("seeder_url", "must not carry credentials"));
    }
    if url.path() != "/" || url.query().is_some() || url.fragment().is_some() {
        return Err(field(
            "seeder_url",
            "must be scheme://host[:port] with no path",
        ));
    }
    let host = match url.host() {
        Some(url::Host::Domain(d)) => d.to_owned(),
        Some(url::Host::Ipv4(a)) => a.to_string(),
        Some(url::Host::Ipv6(_)) => {
            return Err(field("seeder_url", "IPv6 hosts are not supported"))
        }
        None => return Err(field("seeder_url", "has no host")),
    };
    let port = url.port_or_known_default().unwrap_or(443);
    Ok(SeederEndpoint {
        url: format!("https://{host}:{port}"),
        host,
        port,
    })
}

fn parse_pin(name: &str, s: &str) -> Result<VersionPin, FleetError> {
    if s.is_empty() || s.contains(char::is_whitespace) || s.contains('=') {
        return Err(field(
            name,
            "must be an exact version, a prefix ending in '*', or '*'",
        ));
    }
    if s == "*" {
        return Ok(VersionPin::Any);
    }
    match s.strip_suffix('*') {
        Some(prefix) if !prefix.contains('*') => Ok(VersionPin::Prefix(prefix.to_owned())),
        Some(_) => Err(field(name, "only one trailing '*' is allowed")),
        None if s.contains('*') => Err(field(name, "'*' may only end the version")),
        None => Ok(VersionPin::Exact(s.to_owned())),
    }
}

fn validate_pins(p: &PinsConfig) -> Result<Pins, FleetError> {
    let pg = &p.postgres;
    if !(12..=99).contains(&pg.major) {
        return Err(field(
            "pins.postgres.major",
            "must be a PostgreSQL major version",
        ));
    }
    let source = match pg.source.as_str() {
        "pgdg" => PackageSource::Pgdg,
        "distro" => PackageSource::Distro,
        _ => {
            return Err(field(
                "pins.postgres.source",
                "must be \"pgdg\" or \"distro\"",
            ))
        }
    };
    if source == PackageSource::Pgdg && pg.pgdg_suite.as_deref().unwrap_or("").is_empty() {
        return Err(field(
            "pins.postgres.pgdg_suite",
            "is required when source = \"pgdg\"",
        ));
    }
    for (name, v) in [
        ("pins.postgres.expect_server", &pg.expect_server),
        ("pins.postgres.expect_pgvector", &pg.expect_pgvector),
        ("pins.postgres.expect_age", &pg.expect_age),
    ] {
        if v.is_empty() {
            return Err(field(name, "must not be empty"));
        }
    }
    let am = &p.ai_memory;
    if am.version.is_empty() {
        return Err(field("pins.ai_memory.version", "must not be empty"));
    }
    let sha256: Sha256 = am
        .sha256
        .parse()
        .map_err(|e: hiveseed_proto::NameError| field("pins.ai_memory.sha256", e.reason))?;
    if am.schema == 0 {
        return Err(field("pins.ai_memory.schema", "must be positive"));
    }
    Ok(Pins {
        postgres: PostgresPins {
            major: pg.major,
            source,
            pgdg_suite: pg.pgdg_suite.clone(),
            server: parse_pin("pins.postgres.server", &pg.server)?,
            pgvector: parse_pin("pins.postgres.pgvector", &pg.pgvector)?,
            age: parse_pin("pins.postgres.age", &pg.age)?,
            expect_server: pg.expect_server.clone(),
            expect_pgvector: pg.expect_pgvector.clone(),
            expect_age: pg.expect_age.clone(),
        },
        ai_memory: AiMemoryPins {
            version: am.version.clone(),
            sha256,
            schema: am.schema,
        },
    })
}

/// A model identifier as the daemon's config and Ollama take it: no spaces, quotes or controls.
fn model_name(field_name: &str, s: &str) -> Result<String, FleetError> {
    if s.is_empty() {
        return Err(field(field_name, "must not be empty"));
    }
    if s.len() > 200
        || !s
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./:@+".contains(&b))
    {
        return Err(field(
            field_name,
            "must be a model id: letters, digits and - _ . / : @ +, at most 200 characters",
        ));
    }
    Ok(s.to_owned())
}

fn positive_dim(field_name: &str, dim: u32) -> Result<u32, FleetError> {
    if dim == 0 || dim > 65_536 {
        return Err(field(field_name, "must be a vector dimension in 1..=65536"));
    }
    Ok(dim)
}

/// The fields each embedder kind accepts, so a stray one is refused by name.
fn refuse_fields(kind: &str, present: &[(&str, bool)]) -> Result<(), FleetError> {
    match present.iter().find(|(_, set)| *set) {
        Some((name, _)) => Err(field(
            format!("embedder.{name}"),
            format!("does not apply to kind = \"{kind}\""),
        )),
        None => Ok(()),
    }
}

fn validate_embedder(raw: Option<&EmbedderConfig>) -> Result<Embedder, FleetError> {
    let Some(e) = raw else {
        return Ok(Embedder::Local {
            model: LOCAL_EMBED_MODEL.into(),
            dim: LOCAL_EMBED_DIM,
        });
    };
    match e.kind.as_str() {
        "local" => {
            // The model is whatever the seeder's minilm-* artifacts are; nothing to choose.
            refuse_fields(
                "local",
                &[
                    ("model", e.model.is_some()),
                    ("dim", e.dim.is_some()),
                    ("api_key_env", e.api_key_env.is_some()),
                    ("version", e.version.is_some()),
                    ("sha256", e.sha256.is_some()),
                    ("url", e.url.is_some()),
                ],
            )?;
            Ok(Embedder::Local {
                model: LOCAL_EMBED_MODEL.into(),
                dim: LOCAL_EMBED_DIM,
            })
        }
        "openrouter" => {
            refuse_fields(
                "openrouter",
                &[
                    ("version", e.version.is_some()),
                    ("sha256", e.sha256.is_some()),
                    ("url", e.url.is_some()),
                ],
            )?;
            Ok(Embedder::Openrouter {
                model: model_name(
                    "embedder.model",
                    e.model.as_deref().unwrap_or(SEED_OPENROUTER_EMBED_MODEL),
                )?,
                dim: positive_dim("embedder.dim", e.dim.unwrap_or(SEED_EMBED_DIM))?,
                api_key_env: EnvVarName::parse(
                    "embedder.api_key_env",
                    e.api_key_env.as_deref().unwrap_or(SEED_KEY_ENV),
                )?,
            })
        }
        "ollama" => {
            refuse_fields("ollama", &[("api_key_env", e.api_key_env.is_some())])?;
            let version = e.version.as_deref().unwrap_or(SEED_OLLAMA_VERSION);
            if version.is_empty()
                || !version
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b".-+".contains(&b))
            {
                return Err(field(
                    "embedder.version",
                    "must be an Ollama release such as 0.6.8",
                ));
            }
            let sha256: Sha256 = e
                .sha256
                .as_deref()
                .ok_or_else(|| {
                    field(
                        "embedder.sha256",
                        "is required for kind = \"ollama\": the sha256 of the release's \
                         ollama-linux-amd64.tgz (the `ollama` artifact)",
                    )
                })?
                .parse()
                .map_err(|e: hiveseed_proto::NameError| field("embedder.sha256", e.reason))?;
            let model = model_name(
                "embedder.model",
                e.model.as_deref().unwrap_or(OLLAMA_EMBED_MODEL),
            )?;
            if model != OLLAMA_EMBED_MODEL {
                return Err(field(
                    "embedder.model",
                    format!(
                        "ai-memory 0.7.0 embeds through Ollama with {OLLAMA_EMBED_MODEL} only \
                         (it asks the sidecar for that tag whatever the config names)"
                    ),
                ));
            }
            let dim = positive_dim("embedder.dim", e.dim.unwrap_or(SEED_EMBED_DIM))?;
            if dim != SEED_EMBED_DIM {
                return Err(field(
                    "embedder.dim",
                    format!("{OLLAMA_EMBED_MODEL} makes {SEED_EMBED_DIM}-dimensional vectors"),
                ));
            }
            let url = e.url.as_deref().unwrap_or(SEED_OLLAMA_URL);
            let port = ollama_port(url)?;
            let listen = format!("127.0.0.1:{port}");
            Ok(Embedder::Ollama {
                version: version.to_owned(),
                sha256,
                model,
                dim,
                url: format!("http://{listen}"),
                listen,
                port,
            })
        }
        other => Err(field(
            "embedder.kind",
            format!("unknown kind {other:?} (local, openrouter or ollama)"),
        )),
    }
}

/// The sidecar serves its node only: `http://127.0.0.1:<port>` → the port.
fn ollama_port(s: &str) -> Result<u16, FleetError> {
    let bad = || {
        field(
            "embedder.url",
            "must be http://127.0.0.1:<port> (the sidecar listens on the peer's loopback only)",
        )
    };
    let url = url::Url::parse(s).map_err(|_| bad())?;
    let loopback =
        matches!(url.host(), Some(url::Host::Ipv4(a)) if a == std::net::Ipv4Addr::LOCALHOST);
    if url.scheme() != "http"
        || !loopback
        || !url.username().is_empty()
        || url.password().is_some()
        || url.path() != "/"
        || url.query().is_some()
        || url.fragment().is_some()
    {
        return Err(bad());
    }
    match url.port() {
        Some(port) if port != 0 => Ok(port),
        _ => Err(bad()),
    }
}

/// `[llm]`: the peers' LLM; the seed's is OpenRouter's gemma-4-26b-a4b-it.
fn validate_llm(l: &LlmConfig) -> Result<Llm, FleetError> {
    validate_llm_section(
        "llm",
        l,
        &[("openrouter", LlmBackend::Openrouter)],
        SEED_LLM_MODEL,
        SEED_KEY_ENV,
    )
}

/// `[agent_llm]`: the seed's agent nodes use xAI's grok-4.3 with `XAI_API_KEY`; OpenRouter is
/// the other backend ai-memory's CLI speaks here.
fn validate_agent_llm(l: &LlmConfig) -> Result<Llm, FleetError> {
    validate_llm_section(
        "agent_llm",
        l,
        &[
            ("xai", LlmBackend::Xai),
            ("openrouter", LlmBackend::Openrouter),
        ],
        SEED_AGENT_LLM_MODEL,
        SEED_AGENT_KEY_ENV,
    )
}

/// An LLM section: `backends` in order (the first is the default), then the model and key
/// variable, each defaulting to the seed's; refusals name `<section>.<field>`.
fn validate_llm_section(
    section: &str,
    l: &LlmConfig,
    backends: &[(&str, LlmBackend)],
    default_model: &str,
    default_key_env: &str,
) -> Result<Llm, FleetError> {
    let name = l.backend.as_deref().unwrap_or(backends[0].0);
    let Some(&(_, backend)) = backends.iter().find(|(n, _)| *n == name) else {
        let supported: Vec<&str> = backends.iter().map(|(n, _)| *n).collect();
        return Err(field(
            format!("{section}.backend"),
            format!(
                "unknown backend {name:?} (supported: {})",
                supported.join(", ")
            ),
        ));
    };
    Ok(Llm {
        backend,
        model: model_name(
            &format!("{section}.model"),
            l.model.as_deref().unwrap_or(default_model),
        )?,
        api_key_env: EnvVarName::parse(
            &format!("{section}.api_key_env"),
            l.api_key_env.as_deref().unwrap_or(default_key_env),
        )?,
    })
}

fn validate_reranker(
    r: &RerankerConfig,
    embedder: &Embedder,
    llm: Option<&Llm>,
) -> Result<Reranker, FleetError> {
    // The cross-encoder is ai-memory's `autonomous` tier, which presumes an LLM; and the daemon
    // downloads its model from the HuggingFace Hub at start, which the offline local embedder's
    // fleet cannot reach.
    if llm.is_none() {
        return Err(field(
            "reranker",
            "needs an [llm] (the reranker is ai-memory's autonomous tier)",
        ));
    }
    if matches!(embedder, Embedder::Local { .. }) {
        return Err(field(
            "reranker",
            "needs the HuggingFace Hub at daemon start; the local embedder is the offline choice",
        ));
    }
    Ok(Reranker {
        model: model_name(
            "reranker.model",
            r.model.as_deref().unwrap_or(SEED_RERANKER_MODEL),
        )?,
    })
}

/// Fleet texts with a chosen store layout, whatever the fleet files themselves say (for tests,
/// here and in `seeder/tests`).
#[doc(hidden)]
pub mod fixtures {
    /// `text` with its `[store]` table replaced by one naming `layout` (`None`: no table) and no
    /// region overriding it.
    pub fn with_store(text: &str, layout: Option<&str>) -> String {
        let mut out = String::new();
        let mut in_store = false;
        for line in text.lines() {
            if line.starts_with('[') {
                in_store = line == "[store]";
                if line.starts_with("[regions.") && !out.contains("\n[regions.") {
                    if let Some(l) = layout {
                        out.push_str(&format!("[store]\nlayout = \"{l}\"\n\n"));
                    }
                }
            }
            if !in_store && !line.starts_with("store_layout") {
                out.push_str(line);
                out.push('\n');
            }
        }
        out
    }

    /// `text` with `[regions.<region>]` overriding the store layout.
    pub fn with_region_layout(text: &str, region: &str, layout: &str) -> String {
        let header = format!("[regions.{region}]\n");
        assert!(text.contains(&header), "no {header}");
        text.replacen(
            &header,
            &format!("{header}store_layout = \"{layout}\"\n"),
            1,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = include_str!("../../roles/fleet.example.toml");
    const LAB: &str = include_str!("../../roles/fleet.lab.toml");

    #[test]
    fn reference_fleet_parses() {
        let f = Fleet::parse(EXAMPLE).unwrap();
        assert_eq!(f.campaign.as_str(), "do-1461");
        assert_eq!(f.nodes.len(), 12);
        assert_eq!(f.nodes_with_role("peer").count(), 9);
        assert_eq!(f.nodes_with_role("pg").count(), 3);
        assert_eq!(f.federation.quorum_w, 2);
        assert_eq!(f.federation.quorum_timeout_ms, 8000);
        assert_eq!(f.ttl.credential_secs, 604_800);
        assert_eq!(f.pins.ai_memory.schema, 57);
        assert_eq!(
            f.pins.postgres.server,
            VersionPin::Exact("18.4-1.pgdg24.04+1".into())
        );
        let p = f.node(&"do-1461-peer-sgp1-03".parse().unwrap()).unwrap();
        assert_eq!(
            (p.role.as_str(), p.region.as_str(), p.index),
            ("peer", "sgp1", 3)
        );
        assert_eq!(f.seeder.port, 8443);
        for (region, layout) in &f.store_layouts {
            assert_eq!(*layout, StoreLayout::Database, "{region}");
        }
        assert_eq!(f.store_layouts.len(), 3);
        // The seed's embedder, LLM and reranker (spec §1.6, §3.2).
        assert_eq!(
            f.embedder,
            Embedder::Openrouter {
                model: "google/gemini-embedding-2".into(),
                dim: 768,
                api_key_env: EnvVarName("OPENROUTER_API_KEY".into()),
            }
        );
        assert_eq!(
            f.llm,
            Some(Llm {
                backend: LlmBackend::Openrouter,
                model: "google/gemma-4-26b-a4b-it".into(),
                api_key_env: EnvVarName("OPENROUTER_API_KEY".into()),
            })
        );
        assert_eq!(
            f.reranker,
            Some(Reranker {
                model: "ms-marco-MiniLM-L-6-v2".into()
            })
        );
        assert_eq!(
            f.llm_key_env().map(EnvVarName::as_str),
            Some("OPENROUTER_API_KEY")
        );
        assert_eq!(f.artifact_pins().len(), 1);
    }

    /// The reference fleet with `choice` in place of its `[embedder]`/`[llm]`/`[reranker]`.
    fn with_choice(choice: &str) -> String {
        let at = EXAMPLE
            .find("\n# The seed's embedder and LLM")
            .expect("the reference fleet ends with its embedder choice");
        format!("{}\n{choice}", &EXAMPLE[..at])
    }

    const OLLAMA_SHA: &str = "5a0e7ab1c2d3e4f5061728394a5b6c7d8e9fa0b1c2d3e4f5061728394a5b6c7d";

    #[test]
    fn no_embedder_section_is_the_local_model_and_needs_no_key() {
        for text in [
            with_choice(""),
            with_choice("[embedder]\nkind = \"local\"\n"),
            include_str!("../../roles/fleet.lab.toml").to_owned(),
        ] {
            let f = Fleet::parse(&text).unwrap();
            assert_eq!(
                f.embedder,
                Embedder::Local {
                    model: "sentence-transformers/all-MiniLM-L6-v2".into(),
                    dim: 384
                }
            );
            assert_eq!((f.llm.as_ref(), f.reranker.as_ref()), (None, None));
            assert_eq!(f.llm_key_env(), None);
            assert_eq!(f.artifact_pins().len(), 1);
        }
        // A local embedder with an LLM: the key is the LLM's.
        let f = Fleet::parse(&with_choice("[embedder]\nkind = \"local\"\n[llm]\n")).unwrap();
        assert_eq!(
            f.llm_key_env().map(EnvVarName::as_str),
            Some("OPENROUTER_API_KEY")
        );
    }

    #[test]
    fn unset_fields_take_the_seeds_values() {
        let f = Fleet::parse(&with_choice(
            "[embedder]\nkind = \"openrouter\"\n[llm]\n[reranker]\n",
        ))
        .unwrap();
        assert_eq!(f, Fleet::parse(EXAMPLE).unwrap());
    }

    #[test]
    fn ollama_embedder_pins_its_artifact_and_needs_no_key() {
        let f = Fleet::parse(&with_choice(&format!(
            "[embedder]\nkind = \"ollama\"\nsha256 = \"{OLLAMA_SHA}\"\n"
        )))
        .unwrap();
        let sha: Sha256 = OLLAMA_SHA.parse().unwrap();
        assert_eq!(
            f.embedder,
            Embedder::Ollama {
                version: "0.6.8".into(),
                sha256: sha,
                model: "nomic-embed-text".into(),
                dim: 768,
                url: "http://127.0.0.1:11434".into(),
                listen: "127.0.0.1:11434".into(),
                port: 11434,
            }
        );
        assert_eq!(f.llm_key_env(), None);
        assert_eq!(
            f.artifact_pins(),
            [
                (
                    "ai-memory",
                    f.pins.ai_memory.sha256,
                    "pins.ai_memory.sha256"
                ),
                ("ollama", sha, "embedder.sha256"),
            ]
        );
        let f = Fleet::parse(&with_choice(&format!(
            "[embedder]\nkind = \"ollama\"\nversion = \"0.6.9\"\nsha256 = \"{OLLAMA_SHA}\"\nurl = \"http://127.0.0.1:11500\"\n[llm]\n[reranker]\n"
        )))
        .unwrap();
        let Embedder::Ollama {
            version, listen, ..
        } = &f.embedder
        else {
            panic!("{:?}", f.embedder)
        };
        assert_eq!(
            (version.as_str(), listen.as_str()),
            ("0.6.9", "127.0.0.1:11500")
        );
        assert_eq!(
            f.llm_key_env().map(EnvVarName::as_str),
            Some("OPENROUTER_API_KEY")
        );
    }

    /// Hostile and mistaken choices are refused naming the field.
    #[test]
    fn embedder_llm_and_reranker_refusals_name_the_field() {
        let ollama = |extra: &str| {
            format!("[embedder]\nkind = \"ollama\"\nsha256 = \"{OLLAMA_SHA}\"\n{extra}")
        };
        let cases: Vec<(String, &str)> = vec![
            ("[embedder]\nkind = \"gpu\"\n".into(), "embedder.kind"),
            ("[embedder]\nkind = \"\"\n".into(), "embedder.kind"),
            ("[embedder]\nkind = \"Local\"\n".into(), "embedder.kind"),
            ("[embedder]\nmodel = \"x\"\n".into(), "kind"),
            ("[embedder]\nkind = \"local\"\nsurprise = 1\n".into(), "surprise"),
            ("[embedder]\nkind = \"local\"\nmodel = \"x\"\n".into(), "embedder.model"),
            (
                "[embedder]\nkind = \"local\"\napi_key_env = \"OPENROUTER_API_KEY\"\n".into(),
                "embedder.api_key_env",
            ),
            ("[embedder]\nkind = \"openrouter\"\nmodel = \"\"\n".into(), "embedder.model"),
            (
                "[embedder]\nkind = \"openrouter\"\nmodel = \"a model\"\n".into(),
                "embedder.model",
            ),
            (
                "[embedder]\nkind = \"openrouter\"\nmodel = \"m\\\"\\n[evil]\"\n".into(),
                "embedder.model",
            ),
            ("[embedder]\nkind = \"openrouter\"\ndim = 0\n".into(), "embedder.dim"),
            ("[embedder]\nkind = \"openrouter\"\ndim = -1\n".into(), "dim"),
            ("[embedder]\nkind = \"openrouter\"\ndim = 100000\n".into(), "embedder.dim"),
            (
                "[embedder]\nkind = \"openrouter\"\napi_key_env = \"\"\n".into(),
                "embedder.api_key_env",
            ),
            (
                "[embedder]\nkind = \"openrouter\"\napi_key_env = \"openrouter_api_key\"\n".into(),
                "embedder.api_key_env",
            ),
            (
                "[embedder]\nkind = \"openrouter\"\napi_key_env = \"1KEY\"\n".into(),
                "embedder.api_key_env",
            ),
            (
                "[embedder]\nkind = \"openrouter\"\napi_key_env = \"API-KEY\"\n".into(),
                "embedder.api_key_env",
            ),
            (
                "[embedder]\nkind = \"openrouter\"\napi_key_env = \"KEY\\nAI_MEMORY_FED_REQUIRE_SIG\"\n".into(),
                "embedder.api_key_env",
            ),
            (
                "[embedder]\nkind = \"openrouter\"\napi_key_env = \"PGPASSWORD\"\n".into(),
                "embedder.api_key_env",
            ),
            (
                "[embedder]\nkind = \"openrouter\"\napi_key_env = \"AI_MEMORY_FED_REQUIRE_SIG\"\n".into(),
                "embedder.api_key_env",
            ),
            (
                "[embedder]\nkind = \"openrouter\"\napi_key_env = \"LD_PRELOAD\"\n".into(),
                "embedder.api_key_env",
            ),
            (
                "[embedder]\nkind = \"openrouter\"\napi_key_env = \"PATH\"\n".into(),
                "embedder.api_key_env",
            ),
            (
                format!("[embedder]\nkind = \"openrouter\"\nsha256 = \"{OLLAMA_SHA}\"\n"),
                "embedder.sha256",
            ),
            ("[embedder]\nkind = \"ollama\"\n".into(), "embedder.sha256"),
            (
                "[embedder]\nkind = \"ollama\"\nsha256 = \"xyz\"\n".into(),
                "embedder.sha256",
            ),
            (ollama("model = \"mxbai-embed-large\"\n"), "embedder.model"),
            (ollama("dim = 1024\n"), "embedder.dim"),
            (ollama("version = \"\"\n"), "embedder.version"),
            (ollama("version = \"0.6.8; rm -rf /\"\n"), "embedder.version"),
            (ollama("url = \"http://10.0.0.1:11434\"\n"), "embedder.url"),
            (ollama("url = \"https://127.0.0.1:11434\"\n"), "embedder.url"),
            (ollama("url = \"http://127.0.0.1\"\n"), "embedder.url"),
            (ollama("url = \"http://localhost:11434\"\n"), "embedder.url"),
            (ollama("url = \"http://u:p@127.0.0.1:11434\"\n"), "embedder.url"),
            (ollama("url = \"http://127.0.0.1:11434/api\"\n"), "embedder.url"),
            (ollama("url = \"not a url\"\n"), "embedder.url"),
            (ollama("api_key_env = \"OLLAMA_KEY\"\n"), "embedder.api_key_env"),
            ("[llm]\nbackend = \"xai\"\n".into(), "llm.backend"),
            ("[llm]\nmodel = \"\"\n".into(), "llm.model"),
            ("[llm]\napi_key_env = \"x y\"\n".into(), "llm.api_key_env"),
            ("[llm]\nbase_url = \"https://evil.example\"\n".into(), "base_url"),
            ("[llm]\napi_key = \"sk-inline\"\n".into(), "api_key"),
            (
                "[embedder]\nkind = \"openrouter\"\n[llm]\napi_key_env = \"XAI_API_KEY\"\n".into(),
                "llm.api_key_env",
            ),
            ("[embedder]\nkind = \"openrouter\"\n[reranker]\n".into(), "reranker"),
            ("[llm]\n[reranker]\n".into(), "reranker"),
            (
                "[embedder]\nkind = \"openrouter\"\n[llm]\n[reranker]\nmodel = \"\"\n".into(),
                "reranker.model",
            ),
            (
                "[embedder]\nkind = \"openrouter\"\n[llm]\n[reranker]\nenabled = false\n".into(),
                "enabled",
            ),
        ];
        for (choice, needle) in &cases {
            let err = Fleet::parse(&with_choice(choice))
                .expect_err(choice)
                .to_string();
            assert!(
                err.contains(needle),
                "{choice:?}: error {err:?} does not name {needle:?}"
            );
        }
    }

    #[test]
    fn lab_fleet_runs_both_store_layouts() {
        let lab = Fleet::parse(LAB).unwrap();
        let layouts: Vec<(&str, StoreLayout)> = lab
            .store_layouts
            .iter()
            .map(|(r, l)| (r.as_str(), *l))
            .collect();
        assert_eq!(
            layouts,
            [
                ("fra1", StoreLayout::Database),
                ("nyc3", StoreLayout::Database),
                ("sgp1", StoreLayout::Schema),
            ]
        );
    }

    #[test]
    fn vpc_ranges_are_fleet_data_with_terraforms_old_default() {
        let f = Fleet::parse(EXAMPLE).unwrap();
        let ranges: Vec<(String, String)> = f
            .vpc_ranges
            .iter()
            .map(|(r, c)| (r.to_string(), c.to_string()))
            .collect();
        assert_eq!(
            ranges,
            [
                ("fra1".to_owned(), "10.10.0.0/16".to_owned()),
                ("nyc3".to_owned(), "10.11.0.0/16".to_owned()),
                ("sgp1".to_owned(), "10.12.0.0/16".to_owned())
            ]
        );
        // Undeclared: the i-th region in name order gets 10.(10+i).0.0/16, what terraform computed.
        let undeclared = EXAMPLE
            .lines()
            .filter(|l| !l.starts_with("vpc_cidr"))
            .collect::<Vec<_>>()
            .join("\n");
        assert_eq!(Fleet::parse(&undeclared).unwrap().vpc_ranges, f.vpc_ranges);
        let nyc3 = f.vpc_ranges[&"nyc3".parse::<Region>().unwrap()];
        assert!(nyc3.contains("10.11.255.254".parse().unwrap()));
        assert!(!nyc3.contains("10.10.0.5".parse().unwrap()));
        for (bad, why) in [
            ("10.11.0.1/16", "host bits"),
            ("10.11.0.0/4", "prefix"),
            ("10.11.0.0", "a.b.c.d/prefix"),
            ("10.10.128.0/24", "overlaps the VPC range of region fra1"),
        ] {
            let text = EXAMPLE.replace(
                "vpc_cidr = \"10.11.0.0/16\"",
                &format!("vpc_cidr = {bad:?}"),
            );
            let err = Fleet::parse(&text).unwrap_err().to_string();
            assert!(
                err.contains("regions.nyc3.vpc_cidr") && err.contains(why),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn w_is_clamped_to_the_peer_count() {
        let one_peer = EXAMPLE
            .replace("quorum_w = 2", "quorum_w = 50")
            .replace(
                "[regions.fra1]\npg = 1\npeer = 3\nvpc_cidr = \"10.10.0.0/16\"\n",
                "",
            )
            .replace(
                "[regions.sgp1]\npg = 1\npeer = 3\nvpc_cidr = \"10.12.0.0/16\"\n",
                "",
            )
            .replace(
                "[regions.nyc3]\npg = 1\npeer = 3",
                "[regions.nyc3]\npg = 1\npeer = 1",
            );
        let f = Fleet::parse(&one_peer).unwrap();
        assert_eq!(f.nodes_with_role("peer").count(), 1);
        assert_eq!(
            (f.federation.quorum_w, f.federation.quorum_w_requested),
            (2, 50)
        );
        let zero = EXAMPLE.replace("quorum_w = 2", "quorum_w = 0");
        assert_eq!(Fleet::parse(&zero).unwrap().federation.quorum_w, 1);
    }

    /// Each broken variant must be refused with a message that names the offending field.
    #[test]
    fn broken_variants_name_the_field() {
        let cases: &[(&str, &str, &str)] = &[
            (
                "campaign = \"do-1461\"",
                "campaign = \"DO_1461\"",
                "campaign",
            ),
            (
                "seeder_url = \"https://seeder.do-1461.example:8443\"",
                "seeder_url = \"http://seeder.do-1461.example:8443\"",
                "seeder_url",
            ),
            (
                "seeder_url = \"https://seeder.do-1461.example:8443\"",
                "seeder_url = \"https://seeder.do-1461.example:8443/x?y\"",
                "seeder_url",
            ),
            (
                "[regions.nyc3]\npg = 1\n",
                "[regions.nyc3]\npg = 0\n",
                "regions.nyc3.pg",
            ),
            (
                "[regions.fra1]\npg = 1\n",
                "[regions.fra1]\npg = 2\n",
                "regions.fra1.pg",
            ),
            (
                "[regions.sgp1]\npg = 1\npeer = 3\n",
                "[regions.sgp1]\npg = 1\npeer = 3\ngpu = 1\n",
                "gpu",
            ),
            ("[regions.sgp1]", "[regions.SGP1]", "regions.SGP1"),
            (
                "[regions.sgp1]\npg = 1\npeer = 3\n",
                "[regions.sgp1]\npg = 1\npeer = 300\n",
                "regions.sgp1.peer",
            ),
            (
                "quorum_timeout_ms = 8000",
                "quorum_timeout_ms = 0",
                "federation.quorum_timeout_ms",
            ),
            ("quorum_w = 2", "quorum_w = -1", "quorum_w"),
            (
                "credential_secs = 604800",
                "credential_secs = 10",
                "ttl.credential_secs",
            ),
            ("schema = 57", "schema = 0", "pins.ai_memory.schema"),
            ("sha256 = \"537a", "sha256 = \"XYZ", "pins.ai_memory.sha256"),
            (
                "source = \"pgdg\"",
                "source = \"ppa\"",
                "pins.postgres.source",
            ),
            (
                "server = \"18.4-1.pgdg24.04+1\"",
                "server = \"18.*.1\"",
                "pins.postgres.server",
            ),
            (
                "campaign = \"do-1461\"",
                "campaign = \"do-1461\"\nsurprise = 1",
                "surprise",
            ),
            ("peer = \"s-4vcpu-8gb\"", "peer = \"s 4vcpu\"", "sizes.peer"),
        ];
        for (from, to, needle) in cases {
            assert!(EXAMPLE.contains(from), "fixture lost {from:?}");
            let broken = EXAMPLE.replacen(from, to, 1);
            let err = Fleet::parse(&broken).expect_err(to).to_string();
            assert!(
                err.contains(needle),
                "{to:?}: error {err:?} does not name {needle:?}"
            );
        }
        assert!(cases.len() >= 8);
    }

    /// Store-layout refusals name their field (on a fleet with a `[store]` table to break).
    #[test]
    fn store_layout_refusals_name_the_field() {
        let base = fixtures::with_store(EXAMPLE, Some("database"));
        let cases: &[(&str, &str, &str)] = &[
            (
                "layout = \"database\"",
                "layout = \"tablespace\"",
                "store.layout",
            ),
            ("layout = \"database\"", "layout = \"\"", "store.layout"),
            ("layout = \"database\"", "layout = 1", "layout"),
            ("[store]\nlayout", "[store]\nlayouts", "layouts"),
            (
                "[store]\n",
                "[store]\nregions = { nyc3 = \"schema\" }\n",
                "regions",
            ),
            (
                "[regions.sgp1]\n",
                "[regions.sgp1]\nstore_layout = \"Database\"\n",
                "regions.sgp1.store_layout",
            ),
            (
                "[regions.sgp1]\n",
                "[regions.sgp1]\nstorage_layout = \"schema\"\n",
                "storage_layout",
            ),
            (
                "[regions.sgp1]\n",
                "[regions.ams3]\nagent = 1\nstore_layout = \"schema\"\n\n[regions.sgp1]\n",
                "regions.ams3.store_layout",
            ),
        ];
        for (from, to, needle) in cases {
            assert!(base.contains(from), "fixture lost {from:?}");
            let broken = base.replacen(from, to, 1);
            let err = Fleet::parse(&broken).expect_err(to).to_string();
            assert!(
                err.contains(needle),
                "{to:?}: error {err:?} does not name {needle:?}"
            );
        }
    }

    #[test]
    fn store_layout_defaults_to_the_seeds_and_a_region_overrides_it() {
        let region = |r: &str| -> Region { r.parse().unwrap() };
        // No [store]: the seed's layout everywhere, so older fleet files keep their stores.
        let without = fixtures::with_store(EXAMPLE, None);
        let f = Fleet::parse(&without).unwrap();
        for r in ["nyc3", "fra1", "sgp1"] {
            assert_eq!(f.store_layout(&region(r)), StoreLayout::Schema);
        }

        // The override works both ways, and only for its own region.
        let to_schema = fixtures::with_region_layout(
            &fixtures::with_store(EXAMPLE, Some("database")),
            "fra1",
            "schema",
        );
        let f = Fleet::parse(&to_schema).unwrap();
        assert_eq!(f.store_layout(&region("fra1")), StoreLayout::Schema);
        assert_eq!(f.store_layout(&region("nyc3")), StoreLayout::Database);
        assert_eq!(f.store_layout(&region("sgp1")), StoreLayout::Database);
        let to_database = fixtures::with_region_layout(&without, "sgp1", "database");
        let f = Fleet::parse(&to_database).unwrap();
        assert_eq!(f.store_layout(&region("sgp1")), StoreLayout::Database);
        assert_eq!(f.store_layout(&region("fra1")), StoreLayout::Schema);
    }

    #[test]
    fn peer_stores_are_named_by_layout_and_index() {
        let s = StoreLayout::Schema.store(2);
        assert_eq!(
            (s.database.as_str(), s.schema.as_str(), s.name.as_str()),
            ("ai_memory", "ic_peer_2", "ic_peer_2")
        );
        assert_eq!(s.search_path, ["ic_peer_2", "ag_catalog", "public"]);
        let d = StoreLayout::Database.store(2);
        assert_eq!(
            (d.database.as_str(), d.schema.as_str(), d.name.as_str()),
            ("ai_memory_peer_2", "public", "ai_memory_peer_2")
        );
        assert_eq!(d.search_path, ["public", "ag_catalog"]);

        let names = |l: StoreLayout, n| -> Vec<(String, Vec<String>)> {
            l.databases(n)
                .into_iter()
                .map(|d| (d.name, d.schemas))
                .collect()
        };
        assert_eq!(
            names(StoreLayout::Schema, 2),
            [(
                "ai_memory".to_string(),
                vec!["ic_peer_1".to_string(), "ic_peer_2".to_string()]
            )]
        );
        assert_eq!(
            names(StoreLayout::Schema, 0),
            [("ai_memory".into(), vec![])]
        );
        assert_eq!(
            names(StoreLayout::Database, 2),
            [
                ("ai_memory_peer_1".to_string(), vec![]),
                ("ai_memory_peer_2".to_string(), vec![])
            ]
        );
        assert!(names(StoreLayout::Database, 0).is_empty());

        let mixed = fixtures::with_region_layout(
            &fixtures::with_store(LAB, Some("database")),
            "sgp1",
            "schema",
        );
        let f = Fleet::parse(&mixed).unwrap();
        let node = |n: &str| f.node(&n.parse().unwrap()).unwrap();
        assert_eq!(
            f.peer_store(node("do-1461-peer-fra1-03")).unwrap().name,
            "ai_memory_peer_3"
        );
        assert_eq!(
            f.peer_store(node("do-1461-peer-sgp1-03")).unwrap().name,
            "ic_peer_3"
        );
        assert_eq!(f.peer_store(node("do-1461-pg-fra1-01")), None);
        assert_eq!(f.peer_store(node("do-1461-agent-fra1-01")), None);
    }

    #[test]
    fn a_fleet_without_regions_is_refused() {
        let start = EXAMPLE.find("[regions.").unwrap();
        let end = EXAMPLE.find("[sizes]").unwrap();
        let mut text = EXAMPLE.to_string();
        text.replace_range(start..end, "[regions]\n");
        let err = Fleet::parse(&text).unwrap_err().to_string();
        assert!(err.contains("`regions`"), "{err}");
    }

    #[test]
    fn pins_parse_prefix_and_any() {
        assert_eq!(
            parse_pin("x", "17.*").unwrap(),
            VersionPin::Prefix("17.".into())
        );
        assert_eq!(parse_pin("x", "*").unwrap(), VersionPin::Any);
        assert!(parse_pin("x", "=17").is_err());
        assert!(parse_pin("x", "").is_err());
    }

    #[test]
    fn agent_llm_takes_the_seeds_defaults_and_names_bad_fields() {
        let base = include_str!("../../roles/fleet.lab.toml");
        let f = Fleet::parse(&format!("{base}\n[agent_llm]\n")).unwrap();
        let l = f.agent_llm.as_ref().unwrap();
        assert_eq!(l.backend, LlmBackend::Xai);
        assert_eq!(l.model, "grok-4.3");
        assert_eq!(
            f.agent_llm_key_env().map(EnvVarName::as_str),
            Some("XAI_API_KEY")
        );
        assert_eq!(Fleet::parse(base).unwrap().agent_llm_key_env(), None);
        for (extra, needle) in [
            ("backend = \"anthropic\"", "agent_llm.backend"),
            ("model = \"grok 4\"", "agent_llm.model"),
            ("api_key_env = \"xai-key\"", "agent_llm.api_key_env"),
            ("api_key_env = \"PGPASSWORD\"", "agent_llm.api_key_env"),
            ("key = \"inline\"", "key"),
        ] {
            let err = Fleet::parse(&format!("{base}\n[agent_llm]\n{extra}\n"))
                .unwrap_err()
                .to_string();
            assert!(err.contains(needle), "{extra}: {err}");
        }
    }

    #[test]
    fn attestation_is_off_without_the_table_and_defaults_to_digitalocean_and_the_campaign_tag() {
        assert_eq!(Fleet::parse(EXAMPLE).unwrap().attestation, None);
        let f = Fleet::parse(&format!(
            "{EXAMPLE}\n[attestation]\nprovider = \"digitalocean\"\n"
        ))
        .unwrap();
        let a = f.attestation.unwrap();
        assert_eq!(
            (a.api_url.as_str(), a.tag.as_str()),
            ("https://api.digitalocean.com", "do-1461")
        );
        assert_eq!(
            a.to_string(),
            "digitalocean (api https://api.digitalocean.com, tag do-1461)"
        );
        let f = Fleet::parse(&format!(
            "{EXAMPLE}\n[attestation]\nprovider = \"digitalocean\"\napi_url = \"http://127.0.9.2:8080/\"\ntag = \"lab:fleet\"\n"
        ))
        .unwrap();
        let a = f.attestation.unwrap();
        assert_eq!(
            (a.api_url.as_str(), a.tag.as_str()),
            ("http://127.0.9.2:8080", "lab:fleet")
        );
    }

    #[test]
    fn attestation_refusals_name_the_field() {
        for (table, needle) in [
            (
                "provider = \"aws\"",
                "`attestation.provider`: must be \"digitalocean\"",
            ),
            ("api_url = \"https://x\"", "missing field `provider`"),
            (
                "provider = \"digitalocean\"\napi_url = \"http://api.digitalocean.com\"",
                "`attestation.api_url`: http:// is accepted only to a loopback IP",
            ),
            (
                "provider = \"digitalocean\"\napi_url = \"http://10.0.0.1:80\"",
                "`attestation.api_url`: http:// is accepted only",
            ),
            (
                "provider = \"digitalocean\"\napi_url = \"http://localhost:80\"",
                "`attestation.api_url`: http:// is accepted only",
            ),
            (
                "provider = \"digitalocean\"\napi_url = \"ftp://127.0.0.1\"",
                "`attestation.api_url`: scheme \"ftp\"",
            ),
            (
                "provider = \"digitalocean\"\napi_url = \"https://api.digitalocean.com/v2\"",
                "`attestation.api_url`: must be scheme://host[:port]",
            ),
            (
                "provider = \"digitalocean\"\napi_url = \"not a url\"",
                "`attestation.api_url`",
            ),
            (
                "provider = \"digitalocean\"\ntag = \"two words\"",
                "`attestation.tag`",
            ),
            (
                "provider = \"digitalocean\"\ntoken = \"x\"",
                "unknown field `token`",
            ),
        ] {
            let err = Fleet::parse(&format!("{EXAMPLE}\n[attestation]\n{table}\n"))
                .unwrap_err()
                .to_string();
            assert!(err.contains(needle), "{table}: {err}");
        }
    }
}
