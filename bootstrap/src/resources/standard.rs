//! `namespace_standard`: the node's own ai-memory daemon binds a namespace to its standard memory
//! (Batman Forms 2 and 6, reference spec §3.4), over the daemon's HTTP API with the node's mesh
//! client certificate and the API key, as the campaign's operator agent.
//!
//! The standard memory is an attested write (the daemon runs with
//! `AI_MEMORY_REQUIRE_AGENT_ATTESTATION=1`) by the owner, whose key only the seeder holds: the agent
//! registers the owner and binds its public key (the owner is the daemons' admin agent, which
//! the bind needs), asks the seeder to sign exactly the memory the manifest names, writes it and
//! points the namespace at it. The daemon allows only the standard memory's author to set the
//! pointer, and with `write: owner` only that author writes into the namespace afterwards.
//!
//! Each peer writes its own memory (the title names the node): the memory is collective and
//! federates, and one shared title would race between peers binding at the same time. A memory
//! that is already there (409, e.g. a replaced node whose store survived) is reused.

use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hiveseed_proto::api::AttestRequest;
use hiveseed_proto::manifest::NamespaceStandard;
use hiveseed_proto::{AbsPath, Sha256};
use reqwest::{Method, Url};
use serde_json::Value;

use super::wait::{error_chain, https_client};
use super::{CredentialIssuer, ResourceError};
use crate::host::Host;
use crate::plan::Action;

/// An answer body is quoted in errors up to this many characters.
const QUOTE_MAX: usize = 300;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Observed {
    /// The daemon reports a standard with the manifest's title and every governance field.
    InForce,
    /// Why not: unset, another memory or policy, or the daemon not answering (yet).
    Differs(String),
}

pub async fn observe(host: &dyn Host, s: &NamespaceStandard, timeout: Duration) -> Observed {
    let probe = async {
        let api = Daemon::for_standard(host, s)?;
        Ok::<_, String>(in_force(
            s,
            api.standard_memory(&s.namespace).await?.as_ref(),
        ))
    };
    match tokio::time::timeout(timeout, probe).await {
        Ok(Ok(None)) => Observed::InForce,
        Ok(Ok(Some(why)) | Err(why)) => Observed::Differs(why),
        Err(_) => Observed::Differs(format!("the daemon did not answer within {timeout:?}")),
    }
}

pub fn plan(s: &NamespaceStandard, o: &Observed) -> Vec<Action> {
    match o {
        Observed::InForce => Vec::new(),
        Observed::Differs(why) => vec![Action::SetNamespaceStandard {
            standard: Box::new(s.clone()),
            reason: why.clone(),
        }],
    }
}

/// `None` when `memory` (the namespace's standard memory, if any) is the manifest's standard
/// in force, else what differs.
fn in_force(s: &NamespaceStandard, memory: Option<&Value>) -> Option<String> {
    let Some(m) = memory else {
        return Some(format!("namespace {} has no standard", s.namespace));
    };
    let title = m.get("title").and_then(Value::as_str).unwrap_or("");
    if title != s.memory.title {
        return Some(format!(
            "the standard is {title:?}, not {:?}",
            s.memory.title
        ));
    }
    let got = m.pointer("/metadata/governance").and_then(Value::as_object);
    let want = s.governance.as_object()?;
    for (k, w) in want {
        let g = got.and_then(|g| g.get(k));
        if g != Some(w) {
            return Some(format!(
                "governance {k} is {}, not {w}",
                g.map_or("absent".to_string(), Value::to_string)
            ));
        }
    }
    None
}

fn quote(body: &str) -> String {
    let t: String = body.chars().take(QUOTE_MAX).collect();
    if t.len() < body.len() {
        format!("{t}…")
    } else {
        t
    }
}

fn fail(s: &NamespaceStandard, reason: impl Into<String>) -> ResourceError {
    ResourceError::Standard {
        namespace: s.namespace.clone(),
        reason: reason.into(),
    }
}

/// A step the daemon refused: what, its status and (the start of) its answer.
fn refused(s: &NamespaceStandard, what: &str, status: u16, body: &str) -> ResourceError {
    fail(s, format!("{what} answered {status}: {}", quote(body)))
}

/// Registers and binds the owner, has the seeder sign the memory, writes it (or finds it) and
/// sets the namespace's standard to it.
pub async fn ensure(
    host: &dyn Host,
    issuer: &dyn CredentialIssuer,
    s: &NamespaceStandard,
) -> Result<(), ResourceError> {
    let api = Daemon::for_standard(host, s).map_err(|e| fail(s, e))?;
    let owner = &s.owner.agent_id;

    let (status, body) = api
        .call(
            Method::POST,
            &["api", "v1", "agents"],
            &[],
            Some(serde_json::json!({
                "agent_id": owner,
                "agent_type": "ai:operator",
                "capabilities": ["attested-write"],
            })),
        )
        .await
        .map_err(|e| fail(s, e))?;
    // Registered before (this node's earlier run, or a federated registration) is fine.
    if !(200..300).contains(&status) && status != 409 {
        return Err(refused(s, &format!("registering {owner}"), status, &body));
    }

    let pubkey = URL_SAFE_NO_PAD.encode(s.owner.public_key.to_bytes());
    let (status, body) = api
        .call(
            Method::PUT,
            &["api", "v1", "agents", owner, "pubkey"],
            &[],
            Some(serde_json::json!({ "pubkey_b64": pubkey })),
        )
        .await
        .map_err(|e| fail(s, e))?;
    if !(200..300).contains(&status) {
        return Err(refused(
            s,
            &format!("binding {owner}'s public key"),
            status,
            &body,
        ));
    }

    let signed = issuer
        .attest(&AttestRequest {
            namespace: s.namespace.clone(),
            title: s.memory.title.clone(),
            kind: s.memory.kind.clone(),
            content_sha256: Sha256::digest(s.memory.content.as_bytes()),
        })
        .await
        .map_err(|e| fail(s, format!("the seeder did not sign the memory: {e}")))?;
    if &signed.agent_id != owner {
        return Err(fail(
            s,
            format!(
                "the seeder signed as {}, the manifest names {owner}",
                signed.agent_id
            ),
        ));
    }

    let (status, body) = api
        .call(
            Method::POST,
            &["api", "v1", "memories"],
            &[],
            Some(serde_json::json!({
                "title": s.memory.title,
                "content": s.memory.content,
                "namespace": s.namespace,
                "kind": s.memory.kind,
                "scope": "collective",
                // The default `mid` tier expires after seven days.
                "tier": "long",
                "signature": signed.signature,
                "created_at": signed.created_at,
            })),
        )
        .await
        .map_err(|e| fail(s, e))?;
    let field = match status {
        200..=299 => "id",
        409 => "existing_id",
        _ => return Err(refused(s, "writing the standard memory", status, &body)),
    };
    let memory_id = serde_json::from_str::<Value>(&body)
        .ok()
        .and_then(|v| v.get(field).and_then(Value::as_str).map(str::to_owned))
        .ok_or_else(|| {
            fail(
                s,
                format!(
                    "writing the standard memory answered {status} without {field}: {}",
                    quote(&body)
                ),
            )
        })?;

    let (status, body) = api
        .call(
            Method::POST,
            &["api", "v1", "namespaces", &s.namespace, "standard"],
            &[],
            Some(serde_json::json!({ "id": memory_id, "governance": s.governance })),
        )
        .await
        .map_err(|e| fail(s, e))?;
    if !(200..300).contains(&status) {
        return Err(refused(s, "setting the standard", status, &body));
    }
    tracing::info!(namespace = %s.namespace, memory = %memory_id, "namespace standard set");
    Ok(())
}

/// An ai-memory daemon's HTTP API as one agent: mTLS client, API key, base URL.
pub struct Daemon {
    client: reqwest::Client,
    base: Url,
    api_key: String,
    agent_id: String,
}

impl std::fmt::Debug for Daemon {
    // The API key stays out of debug output.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Daemon")
            .field("base", &self.base.as_str())
            .field("agent_id", &self.agent_id)
            .finish_non_exhaustive()
    }
}

impl Daemon {
    pub fn connect(
        host: &dyn Host,
        url: &str,
        ca_path: &AbsPath,
        cert_path: &AbsPath,
        key_path: &AbsPath,
        api_key_file: &AbsPath,
        agent_id: &str,
    ) -> Result<Self, String> {
        let base: Url = url.parse().map_err(|e| format!("url {url:?}: {e}"))?;
        if base.cannot_be_a_base() {
            return Err(format!("url {url:?} cannot take a path"));
        }
        let client = https_client(host, ca_path, cert_path, key_path)?;
        let key = host
            .read(api_key_file)
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("{api_key_file} is missing"))?;
        // Never echo the key: errors name the file only.
        let api_key = String::from_utf8(key)
            .map_err(|_| format!("{api_key_file} is not text"))?
            .trim()
            .to_owned();
        if api_key.is_empty() {
            return Err(format!("{api_key_file} is empty"));
        }
        Ok(Self {
            client,
            base,
            api_key,
            agent_id: agent_id.to_owned(),
        })
    }

    fn for_standard(host: &dyn Host, s: &NamespaceStandard) -> Result<Self, String> {
        Self::connect(
            host,
            &s.url,
            &s.ca_path,
            &s.cert_path,
            &s.key_path,
            &s.api_key_file,
            &s.owner.agent_id,
        )
    }

    /// The namespace's standard memory as the daemon stores it (`title`, `metadata.governance`,
    /// ...), `None` when the namespace has none. Through the two reads a postgres-backed 0.7.0
    /// serves (`GET /api/v1/namespaces/{ns}/standard` answers 501 there).
    pub async fn standard_memory(&self, namespace: &str) -> Result<Option<Value>, String> {
        let (status, body) = self
            .call(
                Method::GET,
                &["api", "v1", "namespaces"],
                &[("namespace", namespace)],
                None,
            )
            .await?;
        if status != 200 {
            return Err(format!(
                "GET /api/v1/namespaces?namespace={namespace} answered {status}: {}",
                quote(&body)
            ));
        }
        let v: Value = serde_json::from_str(&body)
            .map_err(|_| format!("the namespace answer is not JSON: {}", quote(&body)))?;
        let Some(id) = v.get("standard_id").and_then(Value::as_str) else {
            return Ok(None);
        };
        let (status, body) = self
            .call(Method::GET, &["api", "v1", "memories", id], &[], None)
            .await?;
        if status != 200 {
            return Err(format!(
                "GET the standard memory {id} answered {status}: {}",
                quote(&body)
            ));
        }
        let v: Value = serde_json::from_str(&body)
            .map_err(|_| format!("the memory answer is not JSON: {}", quote(&body)))?;
        // `{"memory": {...}, "links": [...]}`, or the bare memory.
        Ok(Some(match v.get("memory") {
            Some(m) => m.clone(),
            None => v,
        }))
    }

    /// One request; the status and body, or why there is none.
    async fn call(
        &self,
        method: Method,
        segments: &[&str],
        query: &[(&str, &str)],
        body: Option<Value>,
    ) -> Result<(u16, String), String> {
        let mut url = self.base.clone();
        url.path_segments_mut()
            .expect("checked in connect")
            .clear()
            .extend(segments);
        if !query.is_empty() {
            url.query_pairs_mut().extend_pairs(query);
        }
        let mut req = self
            .client
            .request(method.clone(), url.clone())
            .header("x-api-key", &self.api_key)
            .header("x-agent-id", &self.agent_id);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req
            .send()
            .await
            .map_err(|e| format!("{method} {}: {}", url.path(), error_chain(&e)))?;
        let status = resp.status().as_u16();
        let text = resp
            .text()
            .await
            .map_err(|e| format!("{method} {}: {}", url.path(), error_chain(&e)))?;
        Ok((status, text))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn standard() -> NamespaceStandard {
        serde_json::from_value(serde_json::json!({
            "id": "standard:campaign",
            "url": "https://127.1.1.2:9077",
            "ca_path": "/etc/ai-memory/tls/ca.pem",
            "cert_path": "/etc/ai-memory/tls/client.pem",
            "key_path": "/etc/ai-memory/tls/client.key",
            "api_key_file": "/etc/ai-memory/api.key",
            "namespace": "do-1461",
            "owner": {
                "agent_id": "ai:do-1461-operator@do-1461",
                "public_key": "11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo=",
            },
            "memory": {"title": "std (p1)", "kind": "observation", "content": "c"},
            "governance": {"auto_atomise": true, "write": "owner"},
        }))
        .unwrap()
    }

    #[test]
    fn in_force_needs_the_title_and_every_governance_field() {
        let s = standard();
        let m = |v: &str| serde_json::from_str::<Value>(v).unwrap();
        let set = m(
            r#"{"title":"std (p1)","metadata":{"governance":{"auto_atomise":true,"write":"owner","inherit":true}}}"#,
        );
        assert_eq!(in_force(&s, Some(&set)), None);
        let why = in_force(&s, None).unwrap();
        assert!(why.contains("has no standard"), "{why}");
        let cases = [
            (r#"{"title":"other","metadata":{}}"#, "not \"std (p1)\""),
            (
                r#"{"title":"std (p1)","metadata":{"governance":{"auto_atomise":false,"write":"owner"}}}"#,
                "governance auto_atomise is false",
            ),
            (
                r#"{"title":"std (p1)","metadata":{"governance":{"auto_atomise":true}}}"#,
                "governance write is absent",
            ),
            (
                r#"{"title":"std (p1)"}"#,
                "governance auto_atomise is absent",
            ),
        ];
        for (body, needle) in cases {
            let why = in_force(&s, Some(&m(body))).expect(body);
            assert!(why.contains(needle), "{body}: {why}");
        }
    }

    #[test]
    fn plan_sets_only_what_differs() {
        let s = standard();
        assert!(plan(&s, &Observed::InForce).is_empty());
        let a = plan(&s, &Observed::Differs("unset".into()));
        assert!(
            matches!(&a[..], [Action::SetNamespaceStandard { reason, .. }] if reason == "unset")
        );
    }

    #[test]
    fn long_answers_are_quoted_short() {
        let q = quote(&"x".repeat(1000));
        assert!(q.chars().count() <= QUOTE_MAX + 1);
        assert_eq!(quote("short"), "short");
    }
}
