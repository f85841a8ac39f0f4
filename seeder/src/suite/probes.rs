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

/// A memory a probe row created, to delete (and see gone) at the end.
#[derive(Debug, Clone)]
struct Created {
    group: String,
    row: String,
    peer: String,
    id: String,
    owner: String,
}

pub struct Run<'m> {
    pub mesh: &'m Mesh,
    pub checks: Vec<Check>,
    created: Vec<Created>,
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

    /// An attested `POST /api/v1/memories`; the id is remembered for cleanup, under the row
    /// `group`/`row` that reports the write (its `cleanup[row]` row follows it).
    #[allow(clippy::too_many_arguments)]
    pub async fn attested_write(
        &mut self,
        group: &str,
        row: &str,
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
        self.track(group, row, peer, &id, agent);
        Ok(id)
    }

    /// Remembers a memory the run created on `peer` (owned by `owner`) for cleanup, under the
    /// row that reports the write.
    pub fn track(&mut self, group: &str, row: &str, peer: &Peer, id: &str, owner: &str) {
        self.created.push(Created {
            group: group.to_owned(),
            row: row.to_owned(),
            peer: peer.name().to_owned(),
            id: id.to_owned(),
            owner: owner.to_owned(),
        });
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

    /// Tries `attempt` every `mesh.poll_every` until it returns `Ok` or the next try would
    /// fall after `deadline`; then the last `Err`.
    pub async fn poll_until<T, E, F, Fut>(&self, deadline: Instant, mut attempt: F) -> Result<T, E>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, E>>,
    {
        loop {
            let last = match attempt().await {
                Ok(t) => return Ok(t),
                Err(e) => e,
            };
            if Instant::now() + self.mesh.poll_every > deadline {
                return Err(last);
            }
            tokio::time::sleep(self.mesh.poll_every).await;
        }
    }

    /// Deletes what the run created and sees it gone: one row `cleanup[<row>]` per probe row
    /// that created memories, in its group, right after it. PASS only when, for each of its
    /// memories, one pass over every peer of the mesh answers `GET /api/v1/memories/{id}` 404.
    ///
    /// A memory is deleted, as its owner, on every peer where it is still found: a sqlite peer's
    /// delete federates to the others (ai-memory 0.7.0 `src/handlers/memories.rs:928-937`,
    /// `broadcast_delete_quorum`), a postgres peer's does not (`memories.rs:610-618`: the SAL
    /// delete has no quorum fan-out), so each copy is deleted where it lives.
    pub async fn cleanup(&mut self) {
        let created = std::mem::take(&mut self.created);
        let mut rows: Vec<((String, String), Vec<Created>)> = Vec::new();
        let mut seen = BTreeSet::new();
        for c in created {
            if !seen.insert(c.id.clone()) {
                continue;
            }
            let key = (c.group.clone(), c.row.clone());
            match rows.iter_mut().find(|(k, _)| *k == key) {
                Some((_, v)) => v.push(c),
                None => rows.push((key, vec![c])),
            }
        }
        for ((group, row), memories) in rows {
            let ids: Vec<&str> = memories.iter().map(|m| m.id.as_str()).collect();
            let expected = format!("{} gone: GET 404 on every peer", ids.join(", "));
            let mut got = Vec::new();
            let mut pass = true;
            for m in &memories {
                match self.remove_everywhere(m).await {
                    Ok(s) => got.push(s),
                    Err(e) => {
                        pass = false;
                        got.push(e);
                    }
                }
            }
            let check = Check {
                group: group.clone(),
                test: format!("cleanup[{row}]"),
                expected,
                got: got.join("; "),
                status: if pass {
                    CheckStatus::Pass
                } else {
                    CheckStatus::Fail
                },
            };
            let at = self
                .checks
                .iter()
                .rposition(|c| c.group == group && c.test == row)
                .map_or(self.checks.len(), |i| i + 1);
            self.checks.insert(at, check);
        }
    }

    /// Deletes `m` wherever it is found until one pass over every peer (its own first) answers
    /// 404, or the mesh's deadline passes: the measured passes as `Ok`, what stayed as `Err`.
    async fn remove_everywhere(&mut self, m: &Created) -> Result<String, String> {
        let started = Instant::now();
        let deadline = started + self.mesh.converge_within;
        let mut peers: Vec<Peer> = self.mesh.peers.clone();
        peers.sort_by_key(|p| p.name() != m.peer);
        let path = format!("/api/v1/memories/{}", m.id);
        let mut deleted_on = BTreeSet::new();
        let mut first_pass = true;
        loop {
            let mut left = Vec::new();
            let mut waiting = false;
            for p in &peers {
                let a = self
                    .call(&p.endpoint, Method::GET, &path, Some(&m.owner), None)
                    .await;
                match a.status() {
                    Some(404) => {}
                    Some(s) if (200..300).contains(&s) => {
                        let d = self
                            .call(&p.endpoint, Method::DELETE, &path, Some(&m.owner), None)
                            .await;
                        if d.is_success() {
                            deleted_on.insert(p.name().to_owned());
                        } else {
                            waiting = true;
                        }
                        left.push(format!("{}: GET {s}, DELETE {}", p.name(), d.summary()));
                    }
                    _ => {
                        waiting = true;
                        left.push(format!("{}: GET {}", p.name(), a.summary()));
                    }
                }
            }
            let s = started.elapsed().as_secs_f64();
            if left.is_empty() {
                let names: Vec<&str> = self.mesh.peers.iter().map(|p| p.name()).collect();
                let deleted: Vec<&str> = deleted_on.iter().map(String::as_str).collect();
                return Ok(format!(
                    "{} deleted on {} (DELETE 2xx), GET 404 on {} after {s:.1}s",
                    m.id,
                    if deleted.is_empty() {
                        "none".to_string()
                    } else {
                        deleted.join(", ")
                    },
                    names.join(", ")
                ));
            }
            if Instant::now() + self.mesh.poll_every > deadline {
                return Err(format!(
                    "{} not gone after {s:.0}s: {}",
                    m.id,
                    left.join("; ")
                ));
            }
            // Straight to a second pass after the first deletes; after that a copy that stays
            // or comes back (a peer's catch-up re-applying it) waits for the next poll.
            if waiting || !first_pass {
                tokio::time::sleep(self.mesh.poll_every).await;
            }
            first_pass = false;
        }
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
