//! Rendering: published inputs (fleet.toml + `roles/`) + enrollment facts → one manifest per node.
//!
//! A role file (`roles/<role>.toml`) is data: an ordered list of `[[resource]]` tables in the
//! shape of `hiveseed_proto::manifest::Resource`, where every string is a minijinja template over
//! the node's context. Three keys are the renderer's, not the resource's:
//! - `when = "expr"`: a minijinja expression; the resource exists only if it is true;
//! - `template = "path"`: file content from `roles/templates/<path>`, rendered;
//! - `artifact = "name"`: file content from the seeder's artifact store (sha256 + size).
//!
//! A string starting with `=` is rendered and then parsed as JSON, for typed values (numbers,
//! lists): `port = "={{ fleet.federation.port }}"`. Undefined variables are errors, so a typo in a
//! role never renders silently. Everything concrete (IPs, peer list, stores, allowlist, secrets)
//! is decided here; the agent never computes fleet topology. Two filters quote a value into the
//! formats secrets land in: `env_value` (an environment file line) and `pg_string` (a SQL
//! constant), see [`crate::quote`].
//!
//! A resource whose `when` is false does not exist in the node's manifest, and neither do the
//! `notify` / `refresh_on` edges that name it: a role lists every input a service may have (the
//! files of each embedder variant, say) and each node's manifest keeps the ones it renders. Any
//! other edge must name an earlier rendered resource, as the agent requires, or rendering fails.

use std::collections::BTreeMap;

use hiveseed_proto::manifest::{FederationIssuer, Resource, MANIFEST_VERSION};
use hiveseed_proto::{FedId, Generation, Manifest, NodeName, Sha256};
use minijinja::{Environment, UndefinedBehavior};
use serde::Serialize;
use serde_json::Value;

use crate::fleet::{Fleet, NodeSpec};
use crate::store::Enrollment;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RenderError {
    #[error("role file roles/{role}.toml is missing")]
    MissingRole { role: String },
    #[error("roles/{file}: {message}")]
    RoleFile { file: String, message: String },
    #[error("roles/{role}.toml resource #{index} ({id}): {message}")]
    Resource {
        role: String,
        index: usize,
        id: String,
        message: String,
    },
}

/// Role files and templates by path relative to `roles/`.
pub type RoleTree = BTreeMap<String, String>;

/// Reads every `*.toml` and everything under `templates/` of a roles directory.
pub fn read_role_tree(dir: &std::path::Path) -> std::io::Result<RoleTree> {
    fn walk(
        base: &std::path::Path,
        dir: &std::path::Path,
        out: &mut RoleTree,
    ) -> std::io::Result<()> {
        let mut entries: Vec<_> = std::fs::read_dir(dir)?.collect::<Result<_, _>>()?;
        entries.sort_by_key(|e| e.path());
        for e in entries {
            let p = e.path();
            let rel = p
                .strip_prefix(base)
                .expect("under base")
                .to_string_lossy()
                .into_owned();
            if e.file_type()?.is_dir() {
                walk(base, &p, out)?;
            } else if rel.starts_with("templates/")
                || (rel.ends_with(".toml") && !rel.contains('/'))
            {
                out.insert(rel, std::fs::read_to_string(&p)?);
            }
        }
        Ok(())
    }
    let mut out = RoleTree::new();
    walk(dir, dir, &mut out)?;
    Ok(out)
}

/// A peer or pg as other nodes see it.
#[derive(Debug, Clone, Serialize)]
pub struct NodeView {
    pub name: String,
    pub role: String,
    pub region: String,
    pub index: u32,
    pub public_ip: String,
    pub private_ip: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct AllowEntry {
    pub fpr: String,
    pub node: String,
    pub role: String,
}

/// Whether the mesh sections may be rendered: every expected peer enrolled, or the deadline passed.
#[derive(Debug, Clone, Serialize)]
pub struct MeshView {
    pub released: bool,
    pub expected: usize,
    pub enrolled: usize,
    pub missing: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ArtifactView {
    pub sha256: String,
    pub size: u64,
}

/// The campaign's operator agent as the roles see it: its id and the public half of the key the
/// seeder signs its attested writes with.
#[derive(Debug, Clone, Serialize)]
pub struct OperatorAgent {
    pub id: String,
    pub public_key: hiveseed_proto::Ed25519PublicKey,
}

impl OperatorAgent {
    pub fn new(campaign: &hiveseed_proto::Campaign, key: &ed25519_dalek::SigningKey) -> Self {
        Self {
            id: crate::campaign::CampaignDir::operator_agent_id(campaign.as_str()),
            public_key: key.verifying_key().into(),
        }
    }
}

/// Fleet-wide facts shared by every node's rendering.
#[derive(Debug, Clone)]
pub struct FleetFacts {
    pub enrollments: BTreeMap<NodeName, Enrollment>,
    /// Current mesh client certificates' fingerprints.
    pub allowlist: Vec<AllowEntry>,
    pub secrets: BTreeMap<String, String>,
    pub artifacts: BTreeMap<String, ArtifactView>,
    /// The campaign's zero-touch federation CA, as nodes trust it.
    pub federation: FederationIssuer,
    pub operator_agent: OperatorAgent,
    pub mesh_released: bool,
    /// Validation only: an artifact not yet added renders as a placeholder instead of failing.
    pub placeholder_artifacts: bool,
}

pub struct Renderer<'a> {
    fleet: &'a Fleet,
    roles: &'a RoleTree,
    env: Environment<'a>,
    /// Per role, parsed once per renderer: its dependencies and its resource tables.
    deps_cache: std::cell::RefCell<BTreeMap<String, Option<std::collections::BTreeSet<String>>>>,
    parsed: std::cell::RefCell<BTreeMap<String, Result<Vec<toml::Value>, RenderError>>>,
}

impl std::fmt::Debug for Renderer<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Renderer").finish_non_exhaustive()
    }
}

fn view(spec: &NodeSpec, e: &Enrollment) -> NodeView {
    NodeView {
        name: spec.name.to_string(),
        role: spec.role.to_string(),
        region: spec.region.to_string(),
        index: spec.index,
        public_ip: e.public_ip.to_string(),
        private_ip: e.private_ip.to_string(),
    }
}

/// Context keys that grow with the fleet; a role that does not name them does not get them, and
/// does not re-render when they change.
pub const FLEET_WIDE: [&str; 4] = ["peers", "region", "mesh", "allowlist"];

/// Every string of a TOML value, for dependency analysis.
fn strings<'v>(v: &'v toml::Value, out: &mut Vec<(&'v str, bool)>, is_when: bool) {
    match v {
        toml::Value::String(s) => out.push((s.as_str(), is_when)),
        toml::Value::Array(a) => a.iter().for_each(|x| strings(x, out, false)),
        toml::Value::Table(t) => t.iter().for_each(|(k, x)| strings(x, out, k == "when")),
        _ => {}
    }
}

impl<'a> Renderer<'a> {
    /// The top-level context variables a role refers to (`None`: cannot tell, assume all).
    pub fn role_deps(&self, role: &str) -> Option<std::collections::BTreeSet<String>> {
        let text = self.roles.get(&format!("{role}.toml"))?;
        let doc: toml::Value = toml::from_str(text).ok()?;
        let mut all = Vec::new();
        strings(&doc, &mut all, false);
        let mut deps = std::collections::BTreeSet::new();
        let mut templates = Vec::new();
        if let Some(list) = doc.get("resource").and_then(|r| r.as_array()) {
            for r in list {
                if let Some(t) = r.get("template").and_then(|t| t.as_str()) {
                    templates.push(t.to_owned());
                }
            }
        }
        for (s, is_when) in all {
            let vars = if is_when {
                self.env
                    .compile_expression(s)
                    .ok()?
                    .undeclared_variables(false)
            } else {
                let s = s.strip_prefix('=').unwrap_or(s);
                self.env
                    .template_from_str(s)
                    .ok()?
                    .undeclared_variables(false)
            };
            deps.extend(vars);
        }
        for name in templates {
            let src = self.roles.get(&format!("templates/{name}"))?;
            if src.contains("{% include")
                || src.contains("{%- include")
                || src.contains("{% import")
                || src.contains("{% extends")
            {
                return None;
            }
            deps.extend(
                self.env
                    .get_template(&name)
                    .ok()?
                    .undeclared_variables(false),
            );
        }
        Some(deps)
    }

    pub fn new(fleet: &'a Fleet, roles: &'a RoleTree) -> Self {
        let mut env = Environment::new();
        env.set_undefined_behavior(UndefinedBehavior::Strict);
        env.set_keep_trailing_newline(true);
        env.add_filter("env_value", |v: &str| crate::quote::env_value(v));
        env.add_filter("pg_string", |v: &str| crate::quote::pg_string(v));
        for (path, text) in roles {
            if let Some(name) = path.strip_prefix("templates/") {
                // Errors surface when the template is used, naming it.
                let _ = env.add_template(name, text.as_str());
            }
        }
        Self {
            fleet,
            roles,
            env,
            deps_cache: Default::default(),
            parsed: Default::default(),
        }
    }

    fn cached_deps(&self, role: &str) -> Option<std::collections::BTreeSet<String>> {
        if let Some(d) = self.deps_cache.borrow().get(role) {
            return d.clone();
        }
        let d = self.role_deps(role);
        self.deps_cache
            .borrow_mut()
            .insert(role.to_owned(), d.clone());
        d
    }

    fn role_resources(&self, role: &str) -> Result<Vec<toml::Value>, RenderError> {
        if let Some(r) = self.parsed.borrow().get(role) {
            return r.clone();
        }
        let r = self.parse_role(role);
        self.parsed.borrow_mut().insert(role.to_owned(), r.clone());
        r
    }

    fn parse_role(&self, role: &str) -> Result<Vec<toml::Value>, RenderError> {
        let file = format!("{role}.toml");
        let text = self
            .roles
            .get(&file)
            .ok_or_else(|| RenderError::MissingRole { role: role.into() })?;
        let doc: toml::Table = toml::from_str(text).map_err(|e| RenderError::RoleFile {
            file: file.clone(),
            message: e.to_string(),
        })?;
        for key in doc.keys() {
            if key != "resource" {
                return Err(RenderError::RoleFile {
                    file,
                    message: format!("unknown top-level key `{key}` (only [[resource]] tables)"),
                });
            }
        }
        match doc.get("resource") {
            None => Ok(Vec::new()),
            Some(toml::Value::Array(a)) => Ok(a.clone()),
            Some(_) => Err(RenderError::RoleFile {
                file,
                message: "`resource` must be an array of tables ([[resource]])".into(),
            }),
        }
    }

    /// The whole context a node could be rendered with (for inspection); rendering builds
    /// fleet-wide keys only for roles that use them.
    pub fn context(&self, node: &NodeSpec, facts: &FleetFacts) -> Option<Value> {
        self.context_with(node, facts, &|_: &str| true)
    }

    fn context_with(
        &self,
        node: &NodeSpec,
        facts: &FleetFacts,
        wants: &dyn Fn(&str) -> bool,
    ) -> Option<Value> {
        let me = facts.enrollments.get(&node.name)?;
        let f = self.fleet;
        let enrolled = |role: &str| {
            f.nodes_with_role(role)
                .filter_map(|n| facts.enrollments.get(&n.name).map(|e| view(n, e)))
                .collect::<Vec<_>>()
        };
        let needs_peers = wants("peers") || wants("region");
        let all_peers = if needs_peers {
            enrolled("peer")
        } else {
            Vec::new()
        };
        let expected_peers: Vec<&NodeSpec> = f.nodes_with_role("peer").collect();
        let missing: Vec<String> = expected_peers
            .iter()
            .filter(|n| !facts.enrollments.contains_key(&n.name))
            .map(|n| n.name.to_string())
            .collect();
        let mesh = MeshView {
            released: facts.mesh_released || missing.is_empty(),
            expected: expected_peers.len(),
            enrolled: expected_peers.len() - missing.len(),
            missing,
        };
        let region_pg = f
            .nodes_with_role("pg")
            .find(|n| n.region == node.region)
            .and_then(|n| facts.enrollments.get(&n.name).map(|e| view(n, e)));
        let region_peers: Vec<NodeView> = all_peers
            .iter()
            .filter(|p| p.region == node.region.as_str())
            .cloned()
            .collect();
        let counts = f.regions.get(&node.region).copied().unwrap_or_default();
        let layout = f.store_layout(&node.region);
        let stores: Vec<_> = (1..=counts.peer).map(|k| layout.store(k)).collect();
        let other_peers: Vec<NodeView> = all_peers
            .iter()
            .filter(|p| p.name != node.name.as_str())
            .cloned()
            .collect();
        let campaign = f.campaign.as_str();
        let empty = Vec::<AllowEntry>::new();
        let allowlist = if wants("allowlist") {
            &facts.allowlist
        } else {
            &empty
        };
        Some(serde_json::json!({
            "campaign": campaign,
            "seeder": { "url": f.seeder.url },
            "node": {
                "name": node.name.as_str(),
                "role": node.role.as_str(),
                "region": node.region.as_str(),
                "index": node.index,
                "service_uid": node.service_uid,
                "public_ip": me.public_ip.to_string(),
                "private_ip": me.private_ip.to_string(),
                "fed_id": FedId::new(&f.campaign, &node.region, &node.name),
                "agent_id": format!("ai:{}@{campaign}", node.name),
                "store": f.peer_store(node),
            },
            "fleet": {
                "federation": f.federation,
                "ttl": f.ttl,
                "pins": f.pins,
                "peer_count": expected_peers.len(),
                "embedder": f.embedder,
                "llm": f.llm,
                "reranker": f.reranker,
                "llm_key_env": f.llm_key_env(),
                "agent_llm": f.agent_llm,
            },
            "region": {
                "name": node.region.as_str(),
                "pg": region_pg,
                "peers": region_peers,
                "peer_count": counts.peer,
                "store_layout": layout,
                "stores": stores,
                "databases": layout.databases(counts.peer),
            },
            "peers": other_peers,
            "mesh": mesh,
            "allowlist": allowlist,
            "secrets": facts.secrets,
            "artifacts": facts.artifacts,
            "federation": {
                "issuer_id": facts.federation.id,
                "trust_domain": facts.federation.trust_domain,
                "ca_pub_b64": facts.federation.public_key,
            },
            "operator_agent": facts.operator_agent,
        }))
    }

    /// Renders a node's resources. `None` when the node has not enrolled (no facts yet).
    pub fn resources(
        &self,
        node: &NodeSpec,
        facts: &FleetFacts,
    ) -> Result<Option<Vec<Resource>>, RenderError> {
        let role = node.role.as_str();
        let list = self.role_resources(role)?;
        let deps = self.cached_deps(role);
        let wants = |k: &str| deps.as_ref().map(|d| d.contains(k)).unwrap_or(true);
        let Some(ctx) = self.context_with(node, facts, &wants) else {
            return Ok(None);
        };
        let mut out = Vec::new();
        // Ids whose `when` was false, and ids rendered so far (what an edge may name).
        let mut skipped = std::collections::BTreeSet::new();
        let mut rendered = std::collections::BTreeSet::new();
        for (index, raw) in list.into_iter().enumerate() {
            let id = raw
                .get("id")
                .and_then(|v| v.as_str())
                .unwrap_or("?")
                .to_owned();
            let err = |message: String| RenderError::Resource {
                role: role.into(),
                index: index + 1,
                id: id.clone(),
                message,
            };
            let toml::Value::Table(mut table) = raw else {
                return Err(err("is not a table".into()));
            };
            if let Some(when) = table.remove("when") {
                let when = when
                    .as_str()
                    .ok_or_else(|| err("`when` must be a string".into()))?;
                let expr = self
                    .env
                    .compile_expression(when)
                    .map_err(|e| err(format!("when: {e:#}")))?;
                let v = expr.eval(&ctx).map_err(|e| err(format!("when: {e:#}")))?;
                if !v.is_true() {
                    skipped.insert(id.clone());
                    continue;
                }
            }
            let mut value = serde_json::to_value(&table).map_err(|e| err(e.to_string()))?;
            if let Value::Object(map) = &mut value {
                if let Some(t) = map.remove("template") {
                    let name = t
                        .as_str()
                        .ok_or_else(|| err("`template` must be a string".into()))?;
                    let tpl = self
                        .env
                        .get_template(name)
                        .map_err(|e| err(format!("template {name}: {e:#}")))?;
                    let text = tpl
                        .render(&ctx)
                        .map_err(|e| err(format!("template {name}: {e:#}")))?;
                    map.insert(
                        "content".into(),
                        serde_json::json!({"type": "text", "text": text}),
                    );
                }
                if let Some(a) = map.remove("artifact") {
                    let name = a
                        .as_str()
                        .ok_or_else(|| err("`artifact` must be a string".into()))?;
                    let placeholder = ArtifactView {
                        sha256: "0".repeat(64),
                        size: 0,
                    };
                    let art = match facts.artifacts.get(name) {
                        Some(a) => a,
                        None if facts.placeholder_artifacts => &placeholder,
                        None => {
                            return Err(err(format!(
                                "artifact {name:?} has not been added (seeder artifact add)"
                            )))
                        }
                    };
                    map.insert(
                        "content".into(),
                        serde_json::json!({"type": "artifact", "sha256": art.sha256, "size": art.size}),
                    );
                }
            }
            let value_out = self.render_value(value, &ctx).map_err(err)?;
            let mut resource: Resource =
                serde_json::from_value(value_out).map_err(|e| err(e.to_string()))?;
            let (edges, field) = match &mut resource {
                Resource::Service(s) => (Some(&mut s.notify), "notify"),
                Resource::Command(c) => (Some(&mut c.refresh_on), "refresh_on"),
                _ => (None, ""),
            };
            if let Some(edges) = edges {
                edges.retain(|t| rendered.contains(t.as_str()) || !skipped.contains(t.as_str()));
                if let Some(t) = edges.iter().find(|t| !rendered.contains(t.as_str())) {
                    return Err(err(format!(
                        "{field} names {t}, which is not an earlier resource of this role"
                    )));
                }
            }
            rendered.insert(resource.id().to_string());
            out.push(resource);
        }
        Ok(Some(out))
    }

    fn render_value(&self, v: Value, ctx: &Value) -> Result<Value, String> {
        Ok(match v {
            Value::String(s) => {
                if let Some(expr) = s.strip_prefix('=') {
                    let text = self
                        .env
                        .render_str(expr, ctx)
                        .map_err(|e| format!("{e:#}"))?;
                    serde_json::from_str(&text).map_err(|e| {
                        format!("`={expr}` rendered {text:?}, which is not JSON: {e}")
                    })?
                } else if s.contains("{{") || s.contains("{%") {
                    Value::String(self.env.render_str(&s, ctx).map_err(|e| format!("{e:#}"))?)
                } else {
                    Value::String(s)
                }
            }
            Value::Array(a) => Value::Array(
                a.into_iter()
                    .map(|x| self.render_value(x, ctx))
                    .collect::<Result<_, _>>()?,
            ),
            Value::Object(m) => Value::Object(
                m.into_iter()
                    .map(|(k, x)| Ok((k, self.render_value(x, ctx)?)))
                    .collect::<Result<_, String>>()?,
            ),
            other => other,
        })
    }
}

/// A rendered, not yet signed manifest body for a node.
pub fn manifest_for(
    fleet: &Fleet,
    node: &NodeSpec,
    resources: Vec<Resource>,
    generation: Generation,
    now: u64,
) -> Manifest {
    Manifest {
        v: MANIFEST_VERSION,
        campaign: fleet.campaign.clone(),
        node: node.name.clone(),
        role: node.role.clone(),
        region: node.region.clone(),
        generation,
        issued_at: now,
        not_after: now + fleet.ttl.manifest_secs,
        digest: Manifest::digest_of(&resources),
        report_interval_secs: fleet.ttl.report_interval_secs,
        resources,
    }
}

/// The content identity of published inputs.
pub fn inputs_digest(fleet_text: &str, roles: &RoleTree) -> Sha256 {
    Sha256::digest(&hiveseed_proto::canonical_bytes(&(fleet_text, roles)))
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = include_str!("../../roles/fleet.example.toml");

    fn enrollment(name: &str, n: u8) -> Enrollment {
        Enrollment {
            node: name.parse().unwrap(),
            droplet_id: u64::from(n),
            public_ip: format!("203.0.113.{n}").parse().unwrap(),
            private_ip: format!("10.0.0.{n}").parse().unwrap(),
            identity_fpr: "f".into(),
            key_fpr: "k".into(),
            token_nonce: "n".into(),
            enrolled_at: 0,
        }
    }

    fn facts(fleet: &Fleet) -> FleetFacts {
        let enrollments = fleet
            .nodes
            .iter()
            .enumerate()
            .map(|(i, n)| (n.name.clone(), enrollment(n.name.as_str(), i as u8 + 1)))
            .collect();
        FleetFacts {
            enrollments,
            allowlist: vec![],
            secrets: [("pg_password".to_string(), "s3cret".to_string())].into(),
            artifacts: BTreeMap::new(),
            federation: crate::credential::Issuer::new(
                ed25519_dalek::SigningKey::from_bytes(&[1; 32]),
                &fleet.campaign,
            )
            .public()
            .clone(),
            operator_agent: OperatorAgent::new(
                &fleet.campaign,
                &ed25519_dalek::SigningKey::from_bytes(&[2; 32]),
            ),
            mesh_released: false,
            placeholder_artifacts: false,
        }
    }

    fn roles(peer: &str) -> RoleTree {
        [
            ("peer.toml".to_string(), peer.to_string()),
            (
                "templates/peers.txt".to_string(),
                "{% for p in peers %}{{ p.public_ip }}\n{% endfor %}".to_string(),
            ),
        ]
        .into()
    }

    #[test]
    fn renders_strings_templates_typed_values_and_when() {
        let fleet = Fleet::parse(EXAMPLE).unwrap();
        let tree = roles(
            r#"
[[resource]]
kind = "file"
id = "file:peers"
path = "/etc/x/{{ node.name }}.txt"
mode = "0644"
template = "peers.txt"

[[resource]]
kind = "wait"
id = "wait:pg"
when = "region.pg is not none"
timeout_secs = "={{ fleet.federation.quorum_timeout_ms // 1000 }}"
target = { type = "tcp", host = "{{ region.pg.private_ip }}", port = 5432 }

[[resource]]
kind = "directory"
id = "dir:never"
when = "false"
path = "/never"
mode = "0700"
"#,
        );
        let r = Renderer::new(&fleet, &tree);
        let node = fleet
            .node(&"do-1461-peer-nyc3-01".parse().unwrap())
            .unwrap();
        let res = r.resources(node, &facts(&fleet)).unwrap().unwrap();
        assert_eq!(res.len(), 2);
        let Resource::File(f) = &res[0] else { panic!() };
        assert_eq!(f.path.as_str(), "/etc/x/do-1461-peer-nyc3-01.txt");
        let hiveseed_proto::manifest::FileContent::Text { text } = &f.content else {
            panic!()
        };
        assert_eq!(text.lines().count(), 8, "every other peer: {text}");
        let Resource::Wait(w) = &res[1] else { panic!() };
        assert_eq!(w.timeout_secs, 8);
    }

    #[test]
    fn errors_name_the_role_and_resource() {
        let fleet = Fleet::parse(EXAMPLE).unwrap();
        let node = fleet
            .node(&"do-1461-peer-nyc3-01".parse().unwrap())
            .unwrap();
        let cases = [
            ("[[resource]]\nkind = \"file\"\nid = \"file:a\"\npath = \"{{ nosuch }}\"\nmode = \"0600\"\ncontent = { type = \"text\", text = \"\" }\n", "file:a"),
            ("[[resource]]\nkind = \"shell\"\nid = \"x:1\"\n", "unknown variant"),
            ("[[resource]]\nkind = \"file\"\nid = \"file:b\"\npath = \"/a/../b\"\nmode = \"0600\"\ncontent = { type = \"text\", text = \"\" }\n", "file:b"),
            ("[[resource]]\nkind = \"file\"\nid = \"file:c\"\npath = \"/c\"\nmode = \"0600\"\nartifact = \"ai-memory\"\n", "has not been added"),
            ("bogus = 1\n", "unknown top-level key"),
        ];
        for (text, needle) in cases {
            let tree = roles(text);
            let err = Renderer::new(&fleet, &tree)
                .resources(node, &facts(&fleet))
                .unwrap_err()
                .to_string();
            assert!(err.contains(needle) && err.contains("peer.toml"), "{err}");
        }
        let err = Renderer::new(&fleet, &RoleTree::new())
            .resources(node, &facts(&fleet))
            .unwrap_err();
        assert_eq!(
            err,
            RenderError::MissingRole {
                role: "peer".into()
            }
        );
    }

    /// A render error names the resource and what is wrong, never the context's values: with
    /// minijinja's `debug` feature, `{e:#}` appends every referenced variable (the `secrets` map
    /// among them), so the feature stays off in every build.
    #[test]
    fn render_errors_never_carry_the_secrets() {
        let fleet = Fleet::parse(EXAMPLE).unwrap();
        let node = fleet
            .node(&"do-1461-peer-nyc3-01".parse().unwrap())
            .unwrap();
        for text in [
            "{{ secrets.pg_password }}{{ secrets.pg_password | nosuchfilter }}",
            "{{ secrets.pg_password ~ nosuch }}",
            "{% if secrets.pg_password %}{{ nosuch.field }}{% endif %}",
        ] {
            let role = format!(
                "[[resource]]\nkind = \"file\"\nid = \"file:leak\"\npath = \"/etc/x\"\nmode = \"0600\"\ncontent = {{ type = \"text\", text = {} }}\n",
                toml::Value::String(text.into())
            );
            let err = Renderer::new(&fleet, &roles(&role))
                .resources(node, &facts(&fleet))
                .unwrap_err();
            for shown in [err.to_string(), format!("{err:?}"), format!("{err:#}")] {
                assert!(shown.contains("file:leak"), "{shown}");
                assert!(
                    !shown.contains("s3cret"),
                    "a render error shows a secret: {shown}"
                );
            }
        }
    }

    /// Edges to a resource whose `when` is false go with it; any other edge must name an earlier
    /// rendered resource, or the role does not render.
    #[test]
    fn edges_to_skipped_resources_are_dropped_and_dangling_ones_refused() {
        let fleet = Fleet::parse(EXAMPLE).unwrap();
        let node = fleet
            .node(&"do-1461-peer-nyc3-01".parse().unwrap())
            .unwrap();
        let head = r#"
[[resource]]
kind = "file"
id = "file:skipped"
when = "false"
path = "/a"
mode = "0644"
content = { type = "text", text = "" }

[[resource]]
kind = "file"
id = "file:kept"
when = "true"
path = "/b"
mode = "0644"
content = { type = "text", text = "" }
"#;
        let tree = roles(&format!(
            r#"{head}
[[resource]]
kind = "command"
id = "cmd:c"
creates = "/c"
refresh_on = ["file:skipped", "file:kept"]
argv = ["/bin/true"]

[[resource]]
kind = "service"
id = "service:s"
unit = "s.service"
notify = ["file:skipped", "file:kept", "cmd:c"]
unit_text = "[Service]\nExecStart=/bin/true\n"
"#
        ));
        let res = Renderer::new(&fleet, &tree)
            .resources(node, &facts(&fleet))
            .unwrap()
            .unwrap();
        let ids: Vec<&str> = res.iter().map(|r| r.id().as_str()).collect();
        assert_eq!(ids, ["file:kept", "cmd:c", "service:s"]);
        let Resource::Command(c) = &res[1] else {
            panic!()
        };
        assert_eq!(c.refresh_on, ["file:kept".parse().unwrap()]);
        let Resource::Service(svc) = &res[2] else {
            panic!()
        };
        assert_eq!(
            svc.notify,
            ["file:kept".parse().unwrap(), "cmd:c".parse().unwrap()]
        );

        for (edge, field) in [
            ("notify = [\"file:nosuch\"]", "notify names file:nosuch"),
            ("notify = [\"service:later\"]", "notify names service:later"),
        ] {
            let tree = roles(&format!(
                r#"{head}
[[resource]]
kind = "service"
id = "service:s"
unit = "s.service"
{edge}
unit_text = "[Service]\nExecStart=/bin/true\n"

[[resource]]
kind = "service"
id = "service:later"
unit = "l.service"
unit_text = "[Service]\nExecStart=/bin/true\n"
"#
            ));
            let err = Renderer::new(&fleet, &tree)
                .resources(node, &facts(&fleet))
                .unwrap_err()
                .to_string();
            assert!(err.contains(field) && err.contains("service:s"), "{err}");
        }
        let tree = roles(&format!(
            r#"{head}
[[resource]]
kind = "command"
id = "cmd:c"
refresh_on = ["file:nosuch"]
argv = ["/bin/true"]
"#
        ));
        let err = Renderer::new(&fleet, &tree)
            .resources(node, &facts(&fleet))
            .unwrap_err()
            .to_string();
        assert!(err.contains("refresh_on names file:nosuch"), "{err}");
    }

    #[test]
    fn the_context_carries_the_fleets_embedder_llm_and_key_variable() {
        let node_name: NodeName = "do-1461-peer-nyc3-01".parse().unwrap();
        let fleet = Fleet::parse(EXAMPLE).unwrap();
        let tree = roles("");
        let ctx = Renderer::new(&fleet, &tree)
            .context(fleet.node(&node_name).unwrap(), &facts(&fleet))
            .unwrap();
        let f = &ctx["fleet"];
        assert_eq!(f["embedder"]["kind"], "openrouter");
        assert_eq!(f["embedder"]["dim"], 768);
        assert_eq!(f["llm"]["backend"], "openrouter");
        assert_eq!(f["reranker"]["model"], "ms-marco-MiniLM-L-6-v2");
        assert_eq!(f["llm_key_env"], "OPENROUTER_API_KEY");

        let at = EXAMPLE.find("\n# The seed's embedder and LLM").unwrap();
        let local = Fleet::parse(&EXAMPLE[..at]).unwrap();
        let ctx = Renderer::new(&local, &tree)
            .context(local.node(&node_name).unwrap(), &facts(&local))
            .unwrap();
        let f = &ctx["fleet"];
        assert_eq!(f["embedder"]["kind"], "local");
        assert_eq!(
            f["embedder"]["model"],
            "sentence-transformers/all-MiniLM-L6-v2"
        );
        assert!(f["llm"].is_null() && f["reranker"].is_null() && f["llm_key_env"].is_null());
    }

    #[test]
    fn role_deps_name_the_fleet_wide_keys_a_role_uses() {
        let fleet = Fleet::parse(EXAMPLE).unwrap();
        let tree = roles(
            "[[resource]]\nkind = \"file\"\nid = \"file:a\"\nwhen = \"mesh.released\"\npath = \"/a/{{ node.name }}\"\nmode = \"0600\"\ntemplate = \"peers.txt\"\n",
        );
        let r = Renderer::new(&fleet, &tree);
        let deps = r.role_deps("peer").unwrap();
        assert!(
            deps.contains("mesh") && deps.contains("peers") && deps.contains("node"),
            "{deps:?}"
        );
        assert!(
            !deps.contains("allowlist") && !deps.contains("region"),
            "{deps:?}"
        );
    }

    /// The stores are decided here, per region: the pg node gets every store of its region, a
    /// peer its own, in the region's layout.
    #[test]
    fn context_carries_each_regions_store_layout() {
        let text = crate::fleet::fixtures::with_region_layout(
            &crate::fleet::fixtures::with_store(
                include_str!("../../roles/fleet.lab.toml"),
                Some("database"),
            ),
            "sgp1",
            "schema",
        );
        let fleet = Fleet::parse(&text).unwrap();
        let f = facts(&fleet);
        let tree = roles("");
        let r = Renderer::new(&fleet, &tree);
        let ctx = |n: &str| {
            r.context(fleet.node(&n.parse().unwrap()).unwrap(), &f)
                .unwrap()
        };

        let pg = ctx("do-1461-pg-fra1-01");
        assert_eq!(pg["region"]["store_layout"], "database");
        assert_eq!(
            pg["region"]["databases"],
            serde_json::json!([
                {"name": "ai_memory_peer_1", "schemas": []},
                {"name": "ai_memory_peer_2", "schemas": []},
                {"name": "ai_memory_peer_3", "schemas": []},
            ])
        );
        assert_eq!(pg["region"]["stores"][2]["name"], "ai_memory_peer_3");
        assert_eq!(
            pg["region"]["stores"][2]["search_path"],
            serde_json::json!(["public", "ag_catalog"])
        );
        assert!(pg["node"]["store"].is_null());

        let pg = ctx("do-1461-pg-sgp1-01");
        assert_eq!(pg["region"]["store_layout"], "schema");
        assert_eq!(
            pg["region"]["databases"],
            serde_json::json!([
                {"name": "ai_memory", "schemas": ["ic_peer_1", "ic_peer_2", "ic_peer_3"]},
            ])
        );

        let peer = ctx("do-1461-peer-sgp1-02");
        assert_eq!(
            peer["node"]["store"],
            serde_json::json!({
                "index": 2,
                "layout": "schema",
                "database": "ai_memory",
                "schema": "ic_peer_2",
                "search_path": ["ic_peer_2", "ag_catalog", "public"],
                "name": "ic_peer_2",
            })
        );
        let peer = ctx("do-1461-peer-nyc3-01");
        assert_eq!(peer["node"]["store"]["database"], "ai_memory_peer_1");
        assert_eq!(peer["node"]["store"]["schema"], "public");
        assert!(ctx("do-1461-agent-nyc3-01")["node"]["store"].is_null());
    }

    #[test]
    fn unenrolled_nodes_render_nothing_and_mesh_reports_missing() {
        let fleet = Fleet::parse(EXAMPLE).unwrap();
        let mut f = facts(&fleet);
        let missing: NodeName = "do-1461-peer-sgp1-03".parse().unwrap();
        f.enrollments.remove(&missing);
        let tree = roles("");
        let r = Renderer::new(&fleet, &tree);
        assert_eq!(
            r.resources(fleet.node(&missing).unwrap(), &f).unwrap(),
            None
        );
        let ctx = r
            .context(
                fleet
                    .node(&"do-1461-peer-nyc3-01".parse().unwrap())
                    .unwrap(),
                &f,
            )
            .unwrap();
        assert_eq!(ctx["mesh"]["released"], false);
        assert_eq!(ctx["mesh"]["missing"][0], "do-1461-peer-sgp1-03");
        assert_eq!(ctx["peers"].as_array().unwrap().len(), 7);
    }
}
