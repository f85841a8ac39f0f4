//! One run of the suite: the report lines it records, the daemon API calls the groups share
//! (enrollment, attested writes, polling), and the cleanup of what it created.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

use hiveseed_proto::status::CheckStatus;
use rand::Rng;
use reqwest::Method;
use serde::{Deserialize, Serialize};

use super::mesh::{Finding, Mesh, Peer};
use super::net::{self, Answer, Endpoint, Identity, Posture, Refusal, Request};
use crate::attest::{rfc3339_now, AttestedWrite};

/// One report line, in the seed's format.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Check {
    pub group: String,
    pub test: String,
    pub expected: String,
    pub got: String,
    pub status: CheckStatus,
}

/// Letters and digits, for titles and markers.
pub fn nonce(n: usize) -> String {
    rand::thread_rng()
        .sample_iter(&rand::distributions::Alphanumeric)
        .take(n)
        .map(char::from)
        .collect()
}

/// Letters only (the seed's provenance marker must survive tokenisers).
pub fn letters(n: usize) -> String {
    let mut r = rand::thread_rng();
    (0..n)
        .map(|_| char::from(b'a' + r.gen_range(0..26)))
        .collect()
}

/// A memory id fit to go into a URL path: what the daemon mints (UUIDs), nothing else.
pub fn parse_id(a: &Answer) -> Result<String, String> {
    if !a.is_success() {
        return Err(a.summary());
    }
    let Some(v) = a.json() else {
        return Err(format!(
            "{} with a body that is not JSON: {}",
            a.code(),
            net::one_line(a.body(), 120)
        ));
    };
    let id = v
        .get("id")
        .or_else(|| v.get("memory").and_then(|m| m.get("id")))
        .and_then(|x| x.as_str());
    match id {
        Some(id)
            if !id.is_empty()
                && id.len() <= 128
                && id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') =>
        {
            Ok(id.to_owned())
        }
        Some(id) => Err(format!(
            "{} with an unusable id {:?}",
            a.code(),
            net::one_line(id, 60)
        )),
        None => Err(format!(
            "{} without an id: {}",
            a.code(),
            net::one_line(a.body(), 120)
        )),
    }
}

pub struct Run<'m> {
    pub mesh: &'m Mesh,
    pub checks: Vec<Check>,
    /// (peer name, memory id, owner agent id) to delete at the end.
    created: Vec<(String, String, String)>,
    clients: BTreeMap<String, reqwest::Client>,
    enrolled: BTreeMap<(String, String), Result<(), String>>,
    pub stamp: String,
}

impl std::fmt::Debug for Run<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Run")
            .field("checks", &self.checks.len())
            .finish_non_exhaustive()
    }
}

impl<'m> Run<'m> {
    pub fn new(mesh: &'m Mesh) -> Self {
        let stamp = time::OffsetDateTime::now_utc()
            .format(&time::macros::format_description!(
                "[year][month][day]T[hour][minute][second]Z"
            ))
            .unwrap_or_else(|_| "now".into());
        Self {
            mesh,
            checks: Vec::new(),
            created: Vec::new(),
            clients: BTreeMap::new(),
            enrolled: BTreeMap::new(),
            stamp,
        }
    }

    pub fn aid(&self, who: &str) -> String {
        format!("ai:{who}@{}", self.mesh.campaign)
    }

    pub fn record(
        &mut self,
        group: &str,
        test: impl Into<String>,
        expected: impl Into<String>,
        got: impl Into<String>,
        pass: bool,
    ) {
        self.checks.push(Check {
            group: group.into(),
            test: test.into(),
            expected: expected.into(),
            got: got.into(),
            status: if pass {
                CheckStatus::Pass
            } else {
                CheckStatus::Fail
            },
        });
    }

    pub fn skip(
        &mut self,
        group: &str,
        test: impl Into<String>,
        expected: impl Into<String>,
        why: impl Into<String>,
    ) {
        self.checks.push(Check {
            group: group.into(),
            test: test.into(),
            expected: expected.into(),
            got: format!("SKIP: {}", why.into()),
            status: CheckStatus::Skip,
        });
    }

    /// A check the node reported itself: PASS iff it reported PASS, recently.
    pub fn from_evidence(
        &mut self,
        group: &str,
        test: impl Into<String>,
        node: &str,
        check: &str,
        expected: &str,
    ) {
        match self.mesh.evidence.check(node, check) {
            Finding::Reported(r) => {
                let pass = r.status == CheckStatus::Pass;
                let got = format!("{} (reported by {node} as {check})", r.got);
                self.record(group, test, expected, got, pass);
            }
            Finding::Absent(why) => self.record(group, test, expected, why, false),
        }
    }

    /// The operator's mTLS client for a peer (built once).
    pub fn client(&mut self, ep: &Endpoint) -> Result<reqwest::Client, String> {
        if let Some(c) = self.clients.get(&ep.name) {
            return Ok(c.clone());
        }
        let c = net::client(
            ep,
            &Posture {
                roots_pem: &self.mesh.ca_pem,
                identity: Some(&self.mesh.operator),
            },
        )
        .map_err(|e| format!("client: {e:#}"))?;
        self.clients.insert(ep.name.clone(), c.clone());
        Ok(c)
    }

    /// A request as the operator, with the API key and optionally an agent id.
    pub async fn call(
        &mut self,
        ep: &Endpoint,
        method: Method,
        path: &str,
        agent: Option<&str>,
        body: Option<serde_json::Value>,
    ) -> Answer {
        let client = match self.client(ep) {
            Ok(c) => c,
            Err(e) => return Answer::Transport(e),
        };
        let mut headers = vec![("x-api-key", self.mesh.api_key.clone())];
        if let Some(a) = agent {
            headers.push(("x-agent-id", a.to_owned()));
        }
        let body = body.map(|b| b.to_string().into_bytes());
        net::send(
            &client,
            ep,
            Request {
                method,
                path,
                headers,
                body,
            },
        )
        .await
    }

    /// A request with another TLS posture (no cert, rogue cert, foreign roots): a fresh client.
    pub async fn call_as(
        &self,
        ep: &Endpoint,
        roots_pem: &str,
        identity: Option<&Identity>,
        req: Request<'_>,
    ) -> Answer {
        match net::client(
            ep,
            &Posture {
                roots_pem,
                identity,
            },
        ) {
            Ok(c) => net::send(&c, ep, req).await,
            Err(e) => Answer::Transport(format!("client: {e:#}")),
        }
    }

    /// Records whether one connection with this posture was refused the way `refusal` says:
    /// by the server's alert or close before any HTTP answer, or by our verifier's refusal of the
    /// server's certificate. A local client error, an unreachable peer, a timeout or an HTTP
    /// answer fails, and GOT says which.
    #[allow(clippy::too_many_arguments)]
    pub async fn expect_tls_refusal(
        &mut self,
        group: &str,
        test: String,
        ep: &Endpoint,
        roots_pem: &str,
        identity: Option<&Identity>,
        path: &str,
        refusal: Refusal,
    ) {
        let o = net::tls_attempt(
            ep,
            &Posture {
                roots_pem,
                identity,
            },
            path,
            net::REQUEST_TIMEOUT,
        )
        .await;
        self.record(
            group,
            test,
            refusal.expected(),
            o.summary(),
            refusal.seen_in(&o),
        );
    }

    /// Registers `agent` on the peer and binds its harness public key (admin-gated, as the
    /// mesh's admin agent id). Both over the daemon's HTTP API; remembered per (peer, agent).
    pub async fn enroll(&mut self, group: &str, peer: &Peer, agent: &str) -> Result<(), String> {
        let key = (peer.name().to_owned(), agent.to_owned());
        if let Some(r) = self.enrolled.get(&key) {
            return r.clone();
        }
        let r = self.enroll_once(peer, agent).await;
        let got = match &r {
            Ok(()) => "registered + key bound".to_string(),
            Err(e) => e.clone(),
        };
        self.record(
            group,
            format!("enroll[{agent} on {}]", peer.name()),
            "registered + key bound",
            got,
            r.is_ok(),
        );
        self.enrolled.insert(key, r.clone());
        r
    }

    async fn enroll_once(&mut self, peer: &Peer, agent: &str) -> Result<(), String> {
        let key = self
            .mesh
            .keys
            .ensure(agent)
            .map_err(|e| format!("harness key: {e:#}"))?;
        let ep = &peer.endpoint;
        let reg = self
            .call(
                ep,
                Method::POST,
                "/api/v1/agents",
                Some(agent),
                Some(serde_json::json!({
                    "agent_id": agent,
                    "agent_type": "ai:harness",
                    "capabilities": ["attested-write"],
                })),
            )
            .await;
        // Registering twice is fine; a refusal here shows up in the bind below anyway.
        if !reg.is_success() && reg.status() != Some(409) {
            return Err(format!("POST /api/v1/agents: {}", reg.summary()));
        }
        let admin = self.mesh.admin_agent_id.clone();
        let bind = self
            .call(
                ep,
                Method::PUT,
                &format!("/api/v1/agents/{agent}/pubkey"),
                Some(&admin),
                Some(serde_json::json!({ "pubkey_b64": crate::attest::pubkey_b64(&key) })),
            )
            .await;
        if bind.is_success() {
            Ok(())
        } else {
            Err(format!(
                "PUT /api/v1/agents/{agent}/pubkey as {admin}: {}",
                bind.summary()
            ))
        }
    }

    /// An attested `POST /api/v1/memories`; the id is remembered for cleanup.
    #[allow(clippy::too_many_arguments)]
    pub async fn attested_write(
        &mut self,
        peer: &Peer,
        agent: &str,
        namespace: &str,
        title: &str,
        kind: &str,
        scope: &str,
        content: &str,
    ) -> Result<String, String> {
        let key = self
            .mesh
            .keys
            .ensure(agent)
            .map_err(|e| format!("harness key: {e:#}"))?;
        let body = AttestedWrite {
            agent_id: agent.into(),
            namespace: namespace.into(),
            title: title.into(),
            kind: kind.into(),
            scope: scope.into(),
            content: content.into(),
            created_at: rfc3339_now(),
        }
        .body(&key);
        let a = self
            .call(
                &peer.endpoint,
                Method::POST,
                "/api/v1/memories",
                Some(agent),
                Some(body),
            )
            .await;
        let id = parse_id(&a)?;
        self.created
            .push((peer.name().to_owned(), id.clone(), agent.to_owned()));
        Ok(id)
    }

    /// Polls `path` on a peer until the body contains `needle` or the mesh's deadline passes.
    /// Returns the seconds it took, or the last answer.
    pub async fn poll_contains(
        &mut self,
        ep: &Endpoint,
        path: &str,
        agent: Option<&str>,
        needle: &str,
        started: Instant,
    ) -> Result<f64, String> {
        let deadline = started + self.mesh.converge_within;
        loop {
            let a = self.call(ep, Method::GET, path, agent, None).await;
            if a.is_success() && a.body().contains(needle) {
                return Ok(started.elapsed().as_secs_f64());
            }
            if Instant::now() + self.mesh.poll_every > deadline {
                return Err(format!(
                    "absent after {:.0}s; last answer {}",
                    started.elapsed().as_secs_f64(),
                    a.summary()
                ));
            }
            tokio::time::sleep(self.mesh.poll_every).await;
        }
    }

    /// Deletes what the run created, on the peer it was written to (deletes federate).
    pub async fn cleanup(&mut self) -> Vec<String> {
        let mut problems = Vec::new();
        let created = std::mem::take(&mut self.created);
        let peers: BTreeMap<String, Peer> = self
            .mesh
            .peers
            .iter()
            .map(|p| (p.name().to_owned(), p.clone()))
            .collect();
        let mut seen = BTreeSet::new();
        for (peer, id, owner) in created {
            if !seen.insert(id.clone()) {
                continue;
            }
            let Some(p) = peers.get(&peer) else { continue };
            let a = self
                .call(
                    &p.endpoint,
                    Method::DELETE,
                    &format!("/api/v1/memories/{id}"),
                    Some(&owner),
                    None,
                )
                .await;
            if !a.is_success() && a.status() != Some(404) {
                problems.push(format!("delete {id} on {peer}: {}", a.summary()));
            }
        }
        problems
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn http(status: u16, body: &str) -> Answer {
        Answer::Http {
            status,
            body: body.into(),
        }
    }

    #[test]
    fn ids_are_taken_only_from_well_formed_answers() {
        assert_eq!(
            parse_id(&http(201, r#"{"id":"3f2a-9","quorum_acks":2}"#)).unwrap(),
            "3f2a-9"
        );
        assert_eq!(
            parse_id(&http(200, r#"{"memory":{"id":"abc"}}"#)).unwrap(),
            "abc"
        );
        for bad in [
            http(201, "not json"),
            http(201, r#"{"id":"../../stats"}"#),
            http(201, r#"{"id":42}"#),
            http(201, r#"{"id":""}"#),
            http(201, "[]"),
            http(503, r#"{"error":"quorum_not_met","got":1,"needed":2}"#),
            Answer::Transport("reset".into()),
        ] {
            let e = parse_id(&bad).unwrap_err();
            assert!(!e.is_empty());
        }
        let e = parse_id(&http(503, r#"{"error":"quorum_not_met"}"#)).unwrap_err();
        assert!(e.starts_with("503"), "{e}");
    }

    #[test]
    fn markers_have_the_right_alphabet() {
        assert!(letters(12).bytes().all(|b| b.is_ascii_lowercase()));
        assert!(nonce(12).bytes().all(|b| b.is_ascii_alphanumeric()));
    }
}
