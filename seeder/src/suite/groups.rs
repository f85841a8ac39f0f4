//! The groups of the seed's full-spectrum suite (reference spec §8.2, §8.3), each a list of
//! probes with the seed's test names and expected results.

use std::time::Instant;

use reqwest::Method;

use hiveseed_proto::status::CheckStatus;

use super::mesh::{Evidence, Finding, NodeEvidence, Peer, Reported};
use super::net::{self, Refusal, Request};
use super::probes::{letters, nonce, Run};

const HEALTH: &str = "/api/v1/health";
const CAPS: &str = "/api/v1/capabilities";
const STATS: &str = "/api/v1/stats";
const SINCE: &str = "/api/v1/sync/since?since=1970-01-01T00:00:00Z";

fn other_peers<'a>(run: &Run<'a>) -> Vec<Peer> {
    run.mesh.peers.iter().skip(1).cloned().collect()
}

/// `regression` (on P1): CRUD, search, list, private and namespace isolation.
pub async fn regression(run: &mut Run<'_>) {
    const G: &str = "regression";
    let Some(p1) = run.mesh.p1().cloned() else {
        run.record(G, "create", "2xx with id", "no peer enrolled", false);
        return;
    };
    let h = run.aid("test-harness");
    let beta = run.aid("agent-beta");
    let n = nonce(12);
    let ep = p1.endpoint.clone();
    let id = match run.enroll(G, &p1, &h).await {
        Err(e) => Err(format!("harness not enrolled: {e}")),
        Ok(()) => {
            run.attested_write(
                G,
                "create",
                &p1,
                &h,
                "_test",
                &format!("reg-{n}"),
                "observation",
                "private",
                &format!("regression probe sentinel {n} quaternion"),
            )
            .await
        }
    };
    let id = match id {
        Ok(id) => {
            run.record(G, "create", "2xx with id", format!("id {id}"), true);
            id
        }
        Err(e) => {
            run.record(G, "create", "2xx with id", e, false);
            for t in [
                "get_by_id",
                "search_semantic",
                "list_namespace",
                "private_isolation",
            ] {
                run.record(G, t, "a created memory", "no memory: create failed", false);
            }
            return ns_cross_isolation(run, &p1, &h).await;
        }
    };
    let a = run
        .call(
            &ep,
            Method::GET,
            &format!("/api/v1/memories/{id}"),
            Some(&h),
            None,
        )
        .await;
    let ok = a.is_success() && a.body().contains(&n);
    run.record(
        G,
        "get_by_id",
        format!("body contains {n}"),
        a.summary(),
        ok,
    );

    let a = run
        .call(
            &ep,
            Method::GET,
            &format!("/api/v1/search?q={n}&namespace=_test&limit=5"),
            Some(&h),
            None,
        )
        .await;
    let ok = a.is_success() && a.body().contains(&id);
    run.record(
        G,
        "search_semantic",
        format!("body contains {id}"),
        a.summary(),
        ok,
    );

    let a = run
        .call(
            &ep,
            Method::GET,
            "/api/v1/memories?namespace=_test&limit=20",
            Some(&h),
            None,
        )
        .await;
    let ok = a.is_success() && a.body().contains(&id);
    run.record(
        G,
        "list_namespace",
        format!("body contains {id}"),
        a.summary(),
        ok,
    );

    // Another agent must not read a private memory: an HTTP answer without the marker.
    let a = run
        .call(
            &ep,
            Method::GET,
            &format!("/api/v1/memories/{id}"),
            Some(&beta),
            None,
        )
        .await;
    let ok = a.status().is_some() && !a.body().contains(&n);
    run.record(
        G,
        "private_isolation",
        format!("{n} not visible to {beta}"),
        a.summary(),
        ok,
    );
    ns_cross_isolation(run, &p1, &h).await;
}

async fn ns_cross_isolation(run: &mut Run<'_>, p1: &Peer, h: &str) {
    const G: &str = "regression";
    let n = nonce(12);
    let id = match run
        .attested_write(
            G,
            "ns_cross_isolation",
            p1,
            h,
            "_test_a",
            &format!("nsa-{n}"),
            "observation",
            "private",
            &format!("namespace isolation probe {n}"),
        )
        .await
    {
        Ok(id) => id,
        Err(e) => {
            run.record(
                G,
                "ns_cross_isolation",
                "id absent from _test_b",
                format!("write to _test_a failed: {e}"),
                false,
            );
            return;
        }
    };
    let a = run
        .call(
            &p1.endpoint,
            Method::GET,
            "/api/v1/memories?namespace=_test_b&limit=50",
            Some(h),
            None,
        )
        .await;
    let ok = a.is_success() && !a.body().contains(&id);
    run.record(
        G,
        "ns_cross_isolation",
        format!("{id} absent from _test_b"),
        a.summary(),
        ok,
    );
}

/// `crypto` (on P1): the mTLS and API-key gates.
pub async fn crypto(run: &mut Run<'_>) {
    const G: &str = "crypto";
    let mesh = run.mesh;
    if mesh.peers.is_empty() {
        run.record(G, "no_client_cert", "000", "no peer enrolled", false);
        return;
    }
    // The seed probes P1; every peer is probed here, so each refusal is seen on every peer.
    for p in &mesh.peers {
        let ep = &p.endpoint;
        let n = |t: &str| format!("{t}[{}]", p.name());
        let h = run.aid("test-harness");
        client_cert_refusals(run, G, ep, n("no_client_cert"), n("rogue_client_cert")).await;
        let foreign = match &mesh.untrusted_ca_pem {
            Some(pem) => Ok(pem.clone()),
            None => net::foreign_ca_pem(),
        };
        match foreign {
            Ok(foreign) => {
                run.expect_tls_refusal(
                    G,
                    n("wrong_server_ca"),
                    ep,
                    &foreign,
                    Some(&mesh.operator),
                    HEALTH,
                    Refusal::ServerCertificate,
                )
                .await
            }
            Err(e) => run.record(
                G,
                n("wrong_server_ca"),
                Refusal::ServerCertificate.expected(),
                format!("rcgen: {e:#}"),
                false,
            ),
        }
        api_key_gates(
            run,
            G,
            ep,
            &n("apikey_required"),
            &n("apikey_accepted"),
            &n("health_exempt"),
        )
        .await;
        let a = run.call(ep, Method::GET, STATS, Some(&h), None).await;
        let ok = a.status() == Some(403);
        run.record(G, n("admin_gated"), "403", a.summary(), ok);
    }
}

/// The peer refuses a client without a certificate and one with a self-signed certificate.
async fn client_cert_refusals(
    run: &mut Run<'_>,
    g: &str,
    ep: &net::Endpoint,
    no_cert_test: String,
    rogue_test: String,
) {
    let mesh = run.mesh;
    let refusal = Refusal::ClientCertificate;
    run.expect_tls_refusal(g, no_cert_test, ep, &mesh.ca_pem, None, HEALTH, refusal)
        .await;
    match net::Identity::rogue() {
        Ok(rogue) => {
            run.expect_tls_refusal(
                g,
                rogue_test,
                ep,
                &mesh.ca_pem,
                Some(&rogue),
                HEALTH,
                refusal,
            )
            .await
        }
        Err(e) => run.record(
            g,
            rogue_test,
            refusal.expected(),
            format!("rcgen: {e:#}"),
            false,
        ),
    }
}

/// Without the key a privileged route is 401, with it 200; health needs no key.
async fn api_key_gates(
    run: &mut Run<'_>,
    g: &str,
    ep: &net::Endpoint,
    required: &str,
    accepted: &str,
    exempt: &str,
) {
    let mesh = run.mesh;
    let a = run
        .call_as(
            ep,
            &mesh.ca_pem,
            Some(&mesh.operator),
            Request {
                method: Method::GET,
                path: CAPS,
                ..Default::default()
            },
        )
        .await;
    let ok = a.status() == Some(401);
    run.record(g, required, "401", a.summary(), ok);
    let a = run.call(ep, Method::GET, CAPS, None, None).await;
    let ok = a.status() == Some(200) && a.json().is_some();
    let got = if ok { "200".to_string() } else { a.summary() };
    run.record(g, accepted, "200", got, ok);
    let a = run
        .call_as(
            ep,
            &mesh.ca_pem,
            Some(&mesh.operator),
            Request {
                method: Method::GET,
                path: HEALTH,
                ..Default::default()
            },
        )
        .await;
    let ok = a.status() == Some(200);
    run.record(g, exempt, "200", a.summary(), ok);
}

/// An attested collective write on P1, then the marker read back on every other peer.
async fn write_and_converge(
    run: &mut Run<'_>,
    g: &str,
    write_test: &str,
    converge_test: &dyn Fn(&Peer, &Peer) -> String,
    agent: &str,
    namespace: &str,
    title: &str,
) -> Option<String> {
    let p1 = run.mesh.p1()?.clone();
    let marker = nonce(16);
    let content = format!("federation convergence probe {marker}");
    let id = match run.enroll(g, &p1, agent).await {
        Err(e) => Err(format!("{agent} not enrolled on {}: {e}", p1.name())),
        Ok(()) => {
            run.attested_write(
                g,
                write_test,
                &p1,
                agent,
                namespace,
                title,
                "observation",
                "collective",
                &content,
            )
            .await
        }
    };
    let started = Instant::now();
    let id = match id {
        Ok(id) => {
            run.record(g, write_test, "memory id", format!("id {id}"), true);
            id
        }
        Err(e) => {
            run.record(g, write_test, "memory id", e, false);
            for p in other_peers(run) {
                let t = converge_test(&p1, &p);
                run.record(g, t, "converged", "nothing written", false);
            }
            return None;
        }
    };
    for p in other_peers(run) {
        let t = converge_test(&p1, &p);
        let r = run
            .poll_contains(
                &p.endpoint,
                &format!("/api/v1/memories/{id}"),
                Some(agent),
                &marker,
                started,
            )
            .await;
        let expected = format!("{id} on {}", p.name());
        match r {
            Ok(s) => run.record(g, t, &expected, format!("{expected} after {s:.1}s"), true),
            Err(e) => run.record(g, t, &expected, e, false),
        }
    }
    Some(id)
}

/// `federation`: a write on P1 reaches every other peer, same region and cross region.
pub async fn federation(run: &mut Run<'_>) {
    let h = run.aid("test-harness");
    let title = format!("fed-{}-{}", run.stamp, nonce(6));
    let name = |p1: &Peer, p: &Peer| {
        if p.region() == p1.region() {
            format!("converge_same_region[{}]", p.name())
        } else {
            format!("converge_cross_region[{}]", p.name())
        }
    };
    if run.mesh.p1().is_none() {
        run.record(
            "federation",
            "write",
            "memory id",
            "no peer enrolled",
            false,
        );
        return;
    }
    write_and_converge(run, "federation", "write", &name, &h, "_verify", &title).await;
}

/// `zerotouch`: enrolled peers converge, an unenrolled peer id is refused everywhere.
pub async fn zerotouch(run: &mut Run<'_>) {
    const G: &str = "zerotouch";
    let h = run.aid("test-harness");
    let title = format!("zt-{}-{}", run.stamp, nonce(6));
    let name = |_: &Peer, p: &Peer| format!("enrolled_converge[{}]", p.name());
    if run.mesh.p1().is_none() {
        run.record(G, "enrolled_write", "memory id", "no peer enrolled", false);
        return;
    }
    write_and_converge(run, G, "enrolled_write", &name, &h, "_zerotouch", &title).await;
    let rogue = format!("rogue-unenrolled-{}", run.stamp);
    let mesh = run.mesh;
    for p in &mesh.peers {
        let client = match run.client(&p.endpoint) {
            Ok(c) => c,
            Err(e) => {
                run.record(
                    G,
                    format!("unenrolled_status[{}]", p.name()),
                    "401",
                    e,
                    false,
                );
                continue;
            }
        };
        let a = net::send(
            &client,
            &p.endpoint,
            Request {
                method: Method::GET,
                path: SINCE,
                headers: vec![
                    ("x-api-key", mesh.api_key.clone()),
                    ("x-peer-id", rogue.clone()),
                ],
                body: None,
            },
        )
        .await;
        let ok = a.status() == Some(401);
        run.record(
            G,
            format!("unenrolled_status[{}]", p.name()),
            "401",
            a.summary(),
            ok,
        );
        let ok = a.body().contains("peer_not_enrolled");
        run.record(
            G,
            format!("unenrolled_reason[{}]", p.name()),
            "peer_not_enrolled",
            a.error_tag().unwrap_or_else(|| a.summary()),
            ok,
        );
        // The seed's `verify_cred_chain <h>`: the peer's own check verifies its credential file
        // against its trust bundle and domain, as a receiving daemon would, and names the subject.
        run.from_evidence(
            G,
            format!("cred_ca_chain[{}]", p.name()),
            p.name(),
            "zerotouch.cred_ca_chain",
            &format!("{}/{}/{}", mesh.campaign, p.region(), p.name()),
        );
    }
}

/// `a2a`: an agent's attested write on P1 read by another agent on every peer.
pub async fn a2a(run: &mut Run<'_>) {
    const G: &str = "a2a";
    let mesh = run.mesh;
    if mesh.agents.is_empty() {
        run.skip(G, "agent_write", "memory id", "no agent node in the fleet");
        return;
    }
    let Some(p1) = mesh.p1().cloned() else {
        run.record(G, "agent_write", "memory id", "no peer enrolled", false);
        return;
    };
    let alpha = run.aid("agent-alpha");
    let beta = run.aid("agent-beta");
    let n = nonce(12);
    // The seed runs this on agent node A1 with A1's mesh identity. The seeder host holds no
    // agent-role client certificate (agent keys are made on the agents), so it presents the
    // operator's and says so.
    let via = format!(
        "from the seeder host with the operator's client certificate (no agent-role identity here; the seed runs it on {})",
        mesh.agents[0]
    );
    let id = match run.enroll(G, &p1, &alpha).await {
        Err(e) => Err(e),
        Ok(()) => {
            run.attested_write(
                G,
                "agent_write",
                &p1,
                &alpha,
                "_verify",
                &format!("a2a-{n}"),
                "observation",
                "collective",
                &format!("agent to agent probe {n}"),
            )
            .await
        }
    };
    let started = Instant::now();
    let id = match id {
        Ok(id) => {
            run.record(
                G,
                "agent_write",
                "memory id",
                format!("id {id}, {via}"),
                true,
            );
            id
        }
        Err(e) => {
            run.record(G, "agent_write", "memory id", format!("{e}; {via}"), false);
            return;
        }
    };
    let path = format!("/api/v1/memories/{id}");
    let r = run
        .poll_contains(&p1.endpoint, &path, Some(&beta), &n, started)
        .await;
    match r {
        Ok(s) => run.record(
            G,
            "beta_read_writepeer",
            format!("{n} readable by {beta}"),
            format!("read after {s:.1}s"),
            true,
        ),
        Err(e) => run.record(G, "beta_read_writepeer", format!("{n} readable"), e, false),
    }
    for p in other_peers(run) {
        let r = run
            .poll_contains(&p.endpoint, &path, Some(&beta), &n, started)
            .await;
        let t = format!("beta_read_fedpeer[{}]", p.name());
        match r {
            Ok(s) => run.record(
                G,
                t,
                format!("{n} readable"),
                format!("read after {s:.1}s"),
                true,
            ),
            Err(e) => run.record(G, t, format!("{n} readable"), e, false),
        }
    }
}

/// `ai_nhi`: an LLM-expanded query committed as an attested memory that converges.
pub async fn ai_nhi(run: &mut Run<'_>) {
    const G: &str = "ai_nhi";
    let mesh = run.mesh;
    if mesh.agents.is_empty() || mesh.peers.len() < 2 {
        run.skip(
            G,
            "llm_decision",
            "non-empty expanded_terms[0]",
            "needs an agent node and at least two peers",
        );
        return;
    }
    if let Some(why) = &mesh.llm_missing {
        run.skip(
            G,
            "llm_decision",
            "non-empty expanded_terms[0]",
            why.clone(),
        );
        return;
    }
    let Some(p1) = mesh.p1().cloned() else { return };
    let alpha = run.aid("agent-alpha");
    let beta = run.aid("agent-beta");
    let query = "distributed consensus quorum replication";
    let a = run
        .call(
            &p1.endpoint,
            Method::POST,
            "/api/v1/expand_query",
            Some(&alpha),
            Some(serde_json::json!({"query": query, "namespace": "_test"})),
        )
        .await;
    let term = a
        .json()
        .and_then(|v| {
            v.get("expanded_terms")?
                .as_array()?
                .first()?
                .as_str()
                .map(str::to_owned)
        })
        .filter(|t| !t.trim().is_empty());
    let Some(term) = term else {
        run.record(
            G,
            "llm_decision",
            "non-empty expanded_terms[0]",
            a.summary(),
            false,
        );
        return;
    };
    run.record(
        G,
        "llm_decision",
        "non-empty expanded_terms[0]",
        net::one_line(&term, 80),
        true,
    );
    let n = nonce(12);
    let content = format!(
        "grok expansion of [{query}] -> {} ({n})",
        net::one_line(&term, 80)
    );
    let id = match run.enroll(G, &p1, &alpha).await {
        Err(e) => Err(e),
        Ok(()) => {
            run.attested_write(
                G,
                "nhi_commit",
                &p1,
                &alpha,
                "_verify",
                &format!("nhi-{n}"),
                "observation",
                "collective",
                &content,
            )
            .await
        }
    };
    let started = Instant::now();
    let id = match id {
        Ok(id) => {
            run.record(G, "nhi_commit", "memory id", format!("id {id}"), true);
            id
        }
        Err(e) => {
            run.record(G, "nhi_commit", "memory id", e, false);
            return;
        }
    };
    for p in other_peers(run) {
        let r = run
            .poll_contains(
                &p.endpoint,
                &format!("/api/v1/memories/{id}"),
                Some(&beta),
                &n,
                started,
            )
            .await;
        let t = format!("nhi_converge[{}]", p.name());
        match r {
            Ok(s) => run.record(G, t, "converged", format!("converged after {s:.1}s"), true),
            Err(e) => run.record(G, t, "converged", e, false),
        }
    }
}

/// `nsa_gaps` (every peer): unsigned writes and unsigned or replayed federation pushes are
/// refused; the signed-events chain is intact; recall carries the provenance envelope.
pub async fn nsa_gaps(run: &mut Run<'_>) {
    const G: &str = "nsa_gaps";
    let mesh = run.mesh;
    let h = run.aid("test-harness");
    for p in &mesh.peers {
        let ep = &p.endpoint;
        let name = p.name();
        let a = run
            .call(
                ep,
                Method::POST,
                "/api/v1/memories",
                Some(&h),
                Some(serde_json::json!({
                    "title": format!("nsa-unsigned-{}", nonce(10)),
                    "content": "unsigned write probe",
                    "namespace": "_test",
                })),
            )
            .await;
        let write_row = format!("unsigned_write_403[{name}]");
        if a.is_success() {
            // A write that should have been refused landed: the cleanup removes it and reports
            // under `cleanup[unsigned_write_403[peer]]` (an id it cannot parse stays behind, said here).
            match super::probes::parse_id(&a) {
                Ok(id) => run.track(G, &write_row, p, &id, &h),
                Err(e) => run.record(
                    G,
                    format!("cleanup[{write_row}]"),
                    "the landed write's id, to delete it",
                    format!("left behind, no id to delete: {e}"),
                    false,
                ),
            }
        }
        let ok = a.status() == Some(403);
        run.record(G, write_row, "403", a.summary(), ok);
        let body = a.body();
        let ok = body.contains("ATTESTATION_FAILED") || body.contains("attestation");
        run.record(
            G,
            format!("unsigned_write_reason[{name}]"),
            "ATTESTATION_FAILED",
            a.error_tag().unwrap_or_else(|| a.summary()),
            ok,
        );
        sync_push_gates(run, p).await;

        signed_events_chain(run, p).await;
        provenance_envelope(run, p).await;
        standard_owner_only(run, p).await;
    }
}

/// `POST /api/v1/sync/push` gates (ai-memory 0.7.0 `src/handlers/federation_signing_check.rs`
/// `verify_signature_or_reject`, lines 721-900):
/// - unsigned: 401;
/// - signed by the harness's federation identity (a credential from the campaign's issuer) with
///   a nonce, sent twice: the first is accepted, the second refused as a replay
///   (`x_memory_nonce_replay`, the peer's nonce cache, lines 773-795). The cache runs whenever a
///   nonce is sent; only `AI_MEMORY_FED_REQUIRE_SIG=0` skips it (line 727);
/// - signed without a nonce (the legacy form, replayable byte for byte): refused as
///   `x_memory_nonce_missing` (lines 798-812), which `AI_MEMORY_FED_REQUIRE_NONCE=0` turns off.
///
/// The signed pushes carry no memories and `dry_run`: accepted, they change nothing but the
/// peer's nonce cache.
async fn sync_push_gates(run: &mut Run<'_>, p: &Peer) {
    const G: &str = "nsa_gaps";
    const PUSH: &str = "/api/v1/sync/push";
    let mesh = run.mesh;
    let ep = &p.endpoint;
    let name = p.name();
    let sender = &mesh.fed_sender;
    let push = |headers: Vec<(&'static str, String)>, body: &[u8]| {
        let mut h = vec![("x-api-key", mesh.api_key.clone())];
        h.extend(headers);
        Request {
            method: Method::POST,
            path: PUSH,
            headers: h,
            body: Some(body.to_vec()),
        }
    };
    // An accepted push's body is a long tally: its status is the measurement.
    let tagged = |a: &net::Answer| match a.error_tag() {
        Some(t) => format!("{} {t}", a.code()),
        None if a.is_success() => a.code(),
        None => a.summary(),
    };
    let unsigned = br#"{"memories":[]}"#.to_vec();
    let signed = serde_json::json!({
        "sender_agent_id": sender.fed_id,
        "memories": [],
        "dry_run": true,
    })
    .to_string()
    .into_bytes();
    let nonce = format!("{}-{}", run.stamp, nonce(16));
    let (missing, first, replay, unnonced) = match run.client(ep) {
        Ok(c) => {
            let missing = net::send(&c, ep, push(vec![], &unsigned)).await;
            let with_nonce = sender.push_headers(&signed, Some(&nonce));
            let first = net::send(&c, ep, push(with_nonce.clone(), &signed)).await;
            let replay = net::send(&c, ep, push(with_nonce, &signed)).await;
            let unnonced =
                net::send(&c, ep, push(sender.push_headers(&signed, None), &signed)).await;
            (missing, first, replay, unnonced)
        }
        Err(e) => {
            let t = net::Answer::Transport(e);
            (t.clone(), t.clone(), t.clone(), t)
        }
    };
    let ok = missing.status() == Some(401);
    run.record(
        G,
        format!("sync_push_missing_sig_401[{name}]"),
        "401",
        tagged(&missing),
        ok,
    );
    let ok = first.is_success()
        && replay.status() == Some(401)
        && replay.error_tag().as_deref() == Some("x_memory_nonce_replay");
    run.record(
        G,
        format!("sync_push_replay_refused[{name}]"),
        format!(
            "signed as {}: 2xx, then the same nonce: 401 x_memory_nonce_replay",
            sender.fed_id
        ),
        format!("first {}, replay {}", tagged(&first), tagged(&replay)),
        ok,
    );
    let ok = unnonced.status() == Some(401)
        && unnonced.error_tag().as_deref() == Some("x_memory_nonce_missing");
    run.record(
        G,
        format!("sync_push_nonce_required[{name}]"),
        format!(
            "signed as {} without a nonce: 401 x_memory_nonce_missing",
            sender.fed_id
        ),
        tagged(&unnonced),
        ok,
    );
}

/// Forms 2 and 6 in force: the campaign namespace's standard lets only its owner (the operator
/// agent) write there, so the enrolled harness's correctly signed write is refused.
async fn standard_owner_only(run: &mut Run<'_>, p: &Peer) {
    const G: &str = "nsa_gaps";
    let mesh = run.mesh;
    let h = run.aid("test-harness");
    let test = format!("standard_owner_only[{}]", p.name());
    let expected = "403 owner-only";
    if let Err(e) = run.enroll(G, p, &h).await {
        return run.record(
            G,
            test,
            expected,
            format!("harness not enrolled: {e}"),
            false,
        );
    }
    let n = letters(12);
    let written = run
        .attested_write(
            G,
            &test,
            p,
            &h,
            &mesh.campaign,
            &format!("nsa-non-owner-{n}"),
            "observation",
            "collective",
            &format!("a non-owner write into the campaign namespace {n}"),
        )
        .await;
    match written {
        Ok(id) => run.record(
            G,
            test,
            expected,
            format!("written as {id}: no standard in force"),
            false,
        ),
        Err(e) => {
            // sqlite: "is not the owner"; postgres: "owner-only namespace ...".
            let ok = e.contains("403") && (e.contains("not the owner") || e.contains("owner-only"));
            run.record(G, test, expected, e, ok)
        }
    }
}

/// capture_turn writes `signed_events_chain_ok` makes: two, so the chain holds at least one
/// prev_hash that is a hash (the first event's is 32 zero bytes) and the pg node's check verifies
/// the daemon's own hashing, not only the genesis rule.
const CHAIN_WRITES: u64 = 2;

/// What `signed_events_chain_ok` expects of the pg node's chain check.
const CHAIN_EXPECTED: &str =
    "linked (N events), N at least 2 more than before the two writes, in a report made after them";

/// `signed_events_chain_ok`: each capture_turn appends an event to the peer's signed_events
/// chain (ai-memory 0.7.0 writes it in the turn's own transaction); only the region's pg node can
/// read that chain, so the row takes that node's `signed_events.<store>` check from a report the
/// node made after the writes (the seeder keeps storing reports while the suite runs), waiting
/// for one up to the evidence age limit, and requires the chain linked and longer by the writes
/// than in the latest report before them.
async fn signed_events_chain(run: &mut Run<'_>, p: &Peer) {
    const G: &str = "nsa_gaps";
    let mesh = run.mesh;
    // The campaign namespace's standard admits only its owner, the operator agent.
    let h = mesh.admin_agent_id.clone();
    let test = format!("signed_events_chain_ok[{}]", p.name());
    let Some(pg) = mesh.evidence.region_pg.get(p.region()).cloned() else {
        let got = format!("no pg node in region {}", p.region());
        return run.record(G, test, CHAIN_EXPECTED, got, false);
    };
    let check = format!("signed_events.{}", p.store);
    let now = crate::state::system_clock();
    let before = mesh
        .evidence
        .latest(&pg, now())
        .ok()
        .and_then(|n| n.checks.get(&check).and_then(|r| chain_length(&r.got)));
    let written_at = now();
    let session = format!("p3se-{}-{}", run.stamp, nonce(6));
    for turn in 0..CHAIN_WRITES {
        let a = run
            .call(
                &p.endpoint,
                Method::POST,
                "/api/v1/capture_turn",
                Some(&h),
                Some(serde_json::json!({
                    "host_session_id": session,
                    "host_turn_index": turn,
                    "role": "assistant",
                    "content": format!("signed-events chain probe {}", nonce(8)),
                    "host_kind": "p3-nsa-probe",
                    "namespace": mesh.campaign,
                })),
            )
            .await;
        if !a.is_success() {
            let got = format!("capture_turn {turn}: {}", a.summary());
            return run.record(G, test, CHAIN_EXPECTED, got, false);
        }
    }
    let deadline = Instant::now() + std::time::Duration::from_secs(mesh.evidence.max_age_secs);
    let seen = |n: NodeEvidence| match n.checks.get(&check) {
        Some(r) => Ok((n.reported_at, r.clone())),
        None => Err(format!("{pg} reports no {check} check")),
    };
    let after = run
        .poll_until(deadline, || async {
            let s = mesh.evidence.latest(&pg, now()).and_then(seen);
            match &s {
                Ok((at, r)) if chain_verdict(before, written_at, Ok((*at, r.clone()))).1 => Ok(s),
                _ => Err(s),
            }
        })
        .await
        .unwrap_or_else(|last| last);
    let (got, pass) = chain_verdict(before, written_at, after);
    let got = format!("{got} (reported by {pg} as {check})");
    run.record(G, test, CHAIN_EXPECTED, got, pass);
}

/// N of a chain check's `linked (N events)`.
pub(crate) fn chain_length(got: &str) -> Option<u64> {
    got.strip_prefix("linked (")?
        .strip_suffix(" events)")?
        .parse()
        .ok()
}

/// The verdict on the chain check as last seen after the writes made at `written_at`: (GOT,
/// pass). `before` is the chain's length in the latest report before them, if there was one.
pub(crate) fn chain_verdict(
    before: Option<u64>,
    written_at: u64,
    seen: Result<(u64, Reported), String>,
) -> (String, bool) {
    let (reported_at, r) = match seen {
        Ok(s) => s,
        Err(why) => return (why, false),
    };
    let was = before.map_or("no chain report before the writes".into(), |b| {
        format!("{b} before the writes")
    });
    if reported_at <= written_at {
        let ago = written_at - reported_at;
        return (
            format!(
                "{}, in a report made {ago}s before the writes (none made after them in time)",
                r.got
            ),
            false,
        );
    }
    let when = format!("made {}s after the writes", reported_at - written_at);
    let Some(n) = chain_length(&r.got) else {
        return (format!("{} ({when})", r.got), false);
    };
    let got = format!("{}: {was}, {when}", r.got);
    let wanted = before.unwrap_or(0) + CHAIN_WRITES;
    (got, r.status == CheckStatus::Pass && n >= wanted)
}

async fn provenance_envelope(run: &mut Run<'_>, p: &Peer) {
    const G: &str = "nsa_gaps";
    let mesh = run.mesh;
    // The campaign namespace's standard admits only its owner, the operator agent.
    let h = mesh.admin_agent_id.clone();
    let test = format!("provenance_envelope[{}]", p.name());
    let expected = "citation | ConfidenceTier | confidence_tier | MemoryKind | memory_kind";
    if let Err(e) = run.enroll(G, p, &h).await {
        run.record(
            G,
            test,
            expected,
            format!("harness not enrolled: {e}"),
            false,
        );
        return;
    }
    let pn = letters(14);
    let written = run
        .attested_write(
            G,
            &test,
            p,
            &h,
            &mesh.campaign,
            &format!("prov-{pn}"),
            "claim",
            "collective",
            &format!("provenance envelope probe {pn} for verbose recall"),
        )
        .await;
    if let Err(e) = written {
        run.record(G, test, expected, format!("write: {e}"), false);
        return;
    }
    let started = Instant::now();
    let deadline = started + mesh.converge_within;
    let client = match run.client(&p.endpoint) {
        Ok(c) => c,
        Err(e) => return run.record(G, test, expected, e, false),
    };
    let path = format!(
        "/api/v1/recall?q={pn}&namespace={}&limit=3&verbose_provenance=true",
        mesh.campaign
    );
    loop {
        let a = net::send(
            &client,
            &p.endpoint,
            Request {
                method: Method::GET,
                path: &path,
                headers: vec![
                    ("x-api-key", mesh.api_key.clone()),
                    ("x-agent-id", h.clone()),
                    ("accept-provenance", "verbose".into()),
                ],
                body: None,
            },
        )
        .await;
        let b = a.body();
        let keys = [
            "citation",
            "ConfidenceTier",
            "confidence_tier",
            "MemoryKind",
            "memory_kind",
        ];
        let hit = if a.is_success() && b.contains(&pn) {
            keys.iter().find(|k| b.contains(**k))
        } else {
            None
        };
        if let Some(k) = hit {
            let s = started.elapsed().as_secs_f64();
            return run.record(
                G,
                test,
                expected,
                format!("recall carries {k} after {s:.1}s"),
                true,
            );
        }
        if Instant::now() + mesh.poll_every > deadline {
            return run.record(
                G,
                test,
                expected,
                format!("not recalled: {}", a.summary()),
                false,
            );
        }
        tokio::time::sleep(mesh.poll_every).await;
    }
}

/// `encrypted_legs`: leg 1 client→peer mTLS + key, leg 2 peer↔peer quorum over mTLS, leg 3
/// peer→pg TLS (from the pg and peer nodes' own reports).
pub async fn encrypted_legs(run: &mut Run<'_>) {
    const G: &str = "encrypted_legs";
    let mesh = run.mesh;
    for p in &mesh.peers {
        let ep = &p.endpoint;
        let n = p.name();
        let a = run.call(ep, Method::GET, CAPS, None, None).await;
        let ok = a.status() == Some(200);
        let got = if ok { "200".into() } else { a.summary() };
        run.record(G, format!("leg1.mtls+key_priv_200[{n}]"), "200", got, ok);
        client_cert_refusals(
            run,
            G,
            ep,
            format!("leg1.no_client_cert_refused[{n}]"),
            format!("leg1.rogue_client_cert_refused[{n}]"),
        )
        .await;
        let a = run
            .call_as(
                ep,
                &mesh.ca_pem,
                Some(&mesh.operator),
                Request {
                    method: Method::GET,
                    path: CAPS,
                    ..Default::default()
                },
            )
            .await;
        let ok = a.status() == Some(401);
        run.record(
            G,
            format!("leg1.no_apikey_priv_401[{n}]"),
            "401",
            a.summary(),
            ok,
        );
        let a = run
            .call_as(
                ep,
                &mesh.ca_pem,
                Some(&mesh.operator),
                Request {
                    method: Method::GET,
                    path: HEALTH,
                    ..Default::default()
                },
            )
            .await;
        let ok = a.status() == Some(200);
        run.record(
            G,
            format!("leg1.health_exempt_200[{n}]"),
            "200",
            a.summary(),
            ok,
        );
    }

    // Leg 2: a quorum write under W, converged everywhere, then removed.
    if let Some(p1) = mesh.p1().cloned() {
        let legs = run.aid("legs-harness");
        let test = format!(
            "leg2.quorum_write_W{}ofN{}",
            mesh.quorum_w,
            mesh.peers.len()
        );
        let title = format!("leg2-{}-{}", run.stamp, nonce(6));
        let name = |_: &Peer, p: &Peer| format!("leg2.converge[{}]", p.name());
        write_and_converge(run, G, &test, &name, &legs, "_legs", &title).await;
        run.expect_tls_refusal(
            G,
            "leg2.sync_no_client_cert_refused".into(),
            &p1.endpoint,
            &mesh.ca_pem,
            None,
            SINCE,
            Refusal::ClientCertificate,
        )
        .await;
    }

    // Leg 3, per region with a pg node: pg_hba admits only the region's peers, so the seeder
    // takes the pg's and a peer's own latest (fresh) reports.
    for (region, pg) in &mesh.evidence.region_pg {
        run.from_evidence(
            G,
            format!("leg3.all_backends_tls[{region}]"),
            pg,
            "daemon_pg.tls",
            "encrypted (>=1 ssl, 0 plain)",
        );
        run.from_evidence(
            G,
            format!("leg3.tls_version_negotiated[{region}]"),
            pg,
            "daemon_pg.tls_version",
            "TLSv1.2 or TLSv1.3 only",
        );
        match mesh.peers.iter().find(|p| p.region() == region) {
            Some(p) => run.from_evidence(
                G,
                format!("leg3.store_url_verify_full[{region}]"),
                p.name(),
                "store_url.verify_full",
                "sslmode=verify-full",
            ),
            None => run.record(
                G,
                format!("leg3.store_url_verify_full[{region}]"),
                "sslmode=verify-full",
                format!("no enrolled peer in {region}"),
                false,
            ),
        }
        // Configured and measured: the pg node's loaded pg_hba, and each of the region's peers'
        // real plaintext login, which the server must refuse.
        let mut reading = vec![(pg.clone(), "store.hba_hostssl_only")];
        for p in mesh.peers.iter().filter(|p| p.region() == region) {
            reading.push((p.name().to_owned(), "store.plaintext_refused"));
        }
        let (mut got, mut pass) = all_pass(&mesh.evidence, &reading);
        if reading.len() == 1 {
            got.push_str(&format!(
                "; no enrolled peer in {region} tried a plaintext login"
            ));
            pass = false;
        }
        run.record(
            G,
            format!("leg3.plaintext_tcp_refused[{region}]"),
            "pg_hba hostssl only (pg) and every peer's plaintext login refused by the server",
            got,
            pass,
        );
    }
}

/// Several nodes' reported checks as one row: PASS iff each reported its check PASS, recently.
pub(crate) fn all_pass(evidence: &Evidence, reading: &[(String, &str)]) -> (String, bool) {
    let mut parts = Vec::new();
    let mut pass = !reading.is_empty();
    for (node, check) in reading {
        match evidence.check(node, check) {
            Finding::Reported(r) => {
                pass &= r.status == CheckStatus::Pass;
                parts.push(format!("{node} {check}: {}", r.got));
            }
            Finding::Absent(why) => {
                pass = false;
                parts.push(why);
            }
        }
    }
    (parts.join("; "), pass)
}

/// `curator` (every peer): the curator service runs and does not crash-loop: at most 3 automatic
/// restarts, as the peer's service manager counts them (systemd's `NRestarts`, or the agent's
/// supervisor), from the peer's latest fresh report.
pub async fn curator(run: &mut Run<'_>) {
    const G: &str = "curator";
    const UNIT: &str = "ai-memory-curator.service";
    const MAX_RESTARTS: u32 = 3;
    let mesh = run.mesh;
    for p in &mesh.peers {
        run.from_evidence(
            G,
            format!("curator_active[{}]", p.name()),
            p.name(),
            "curator.active",
            "active",
        );
        let test = format!("curator_no_crashloop[{}]", p.name());
        let expected = format!("NRestarts <= {MAX_RESTARTS}");
        match mesh.evidence.restarts(p.name(), UNIT) {
            Ok(r) => {
                let at = crate::attest::rfc3339(r.reported_at as i64)
                    .unwrap_or_else(|| r.reported_at.to_string());
                let got = format!(
                    "{} (NRestarts of {UNIT}, reported by {} at {at}, {}s ago)",
                    r.restarts,
                    p.name(),
                    r.age_secs
                );
                run.record(G, test, expected, got, r.restarts <= MAX_RESTARTS);
            }
            Err(why) => run.record(G, test, expected, why, false),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reported(got: &str, status: CheckStatus) -> Reported {
        Reported {
            expected: r"linked \([0-9]+ events\)".into(),
            got: got.into(),
            status,
        }
    }

    #[test]
    fn chain_lengths_are_read_only_from_a_linked_chain() {
        assert_eq!(chain_length("linked (0 events)"), Some(0));
        assert_eq!(chain_length("linked (12 events)"), Some(12));
        for other in [
            "broken at event 4 of 5: prev_hash is not the hash of event 3",
            "linked (x events)",
            "ok",
            "",
        ] {
            assert_eq!(chain_length(other), None, "{other}");
        }
    }

    /// The row passes only on a linked chain longer by both writes (so at least two events: one
    /// real prev_hash) than before them, in a report the pg node made after them.
    #[test]
    fn the_chain_row_wants_a_longer_chain_reported_after_the_writes() {
        let w = 1_000;
        let pass = CheckStatus::Pass;
        let after = |at: u64, got: &str, status| Ok((at, reported(got, status)));

        let (got, ok) = chain_verdict(Some(3), w, after(w + 4, "linked (5 events)", pass));
        assert!(ok, "{got}");
        assert_eq!(
            got,
            "linked (5 events): 3 before the writes, made 4s after the writes"
        );
        let (got, ok) = chain_verdict(None, w, after(w + 1, "linked (2 events)", pass));
        assert!(ok, "{got}");
        assert!(got.contains("no chain report before the writes"), "{got}");

        // Empty, or one event (only the genesis rule checked), after the writes.
        let (got, ok) = chain_verdict(None, w, after(w + 2, "linked (0 events)", pass));
        assert!(!ok, "{got}");
        let (got, ok) = chain_verdict(None, w, after(w + 2, "linked (1 events)", pass));
        assert!(!ok, "{got}");
        // The latest report predates the writes (nothing newer came in time).
        let (got, ok) = chain_verdict(None, w, after(w - 3, "linked (7 events)", pass));
        assert!(!ok);
        assert!(got.contains("made 3s before the writes"), "{got}");
        let (_, ok) = chain_verdict(Some(2), w, after(w, "linked (7 events)", pass));
        assert!(
            !ok,
            "a report made in the second of the writes may predate them"
        );
        // After the writes, but not longer by both.
        let (got, ok) = chain_verdict(Some(4), w, after(w + 5, "linked (4 events)", pass));
        assert!(!ok, "{got}");
        let (got, ok) = chain_verdict(Some(4), w, after(w + 5, "linked (5 events)", pass));
        assert!(!ok, "{got}");
        // Broken, or not reported.
        let broken = "broken at event 4 of 5: prev_hash is not the hash of event 3";
        let (got, ok) = chain_verdict(Some(3), w, after(w + 5, broken, CheckStatus::Fail));
        assert!(!ok);
        assert!(got.starts_with(broken), "{got}");
        let (got, ok) = chain_verdict(None, w, Err("pg1 has not reported".into()));
        assert_eq!((got.as_str(), ok), ("pg1 has not reported", false));
        // The node's own verdict counts too.
        let (_, ok) = chain_verdict(
            None,
            w,
            after(w + 1, "linked (2 events)", CheckStatus::Fail),
        );
        assert!(!ok);
    }

    #[test]
    fn the_plaintext_row_needs_the_pg_and_every_peer_to_pass() {
        let mut ev = Evidence {
            max_age_secs: 15,
            ..Default::default()
        };
        let node = |checks: &[(&str, &str, CheckStatus)]| NodeEvidence {
            age_secs: 2,
            checks: checks
                .iter()
                .map(|(c, got, s)| (c.to_string(), reported(got, *s)))
                .collect(),
            ..Default::default()
        };
        let refused = "refused: no pg_hba.conf entry for host \"10.11.0.11\", user \"ai_memory\", database \"ai_memory\", no encryption";
        ev.nodes.insert(
            "pg1".into(),
            node(&[(
                "store.hba_hostssl_only",
                "ssl on, hostssl /32 scram-sha-256 only",
                CheckStatus::Pass,
            )]),
        );
        ev.nodes.insert(
            "peer1".into(),
            node(&[("store.plaintext_refused", refused, CheckStatus::Pass)]),
        );
        ev.nodes.insert(
            "peer2".into(),
            node(&[(
                "store.plaintext_refused",
                "connected without TLS",
                CheckStatus::Fail,
            )]),
        );
        let read = |nodes: &[&str]| -> Vec<(String, &'static str)> {
            nodes
                .iter()
                .map(|n| {
                    let check = if n.starts_with("pg") {
                        "store.hba_hostssl_only"
                    } else {
                        "store.plaintext_refused"
                    };
                    (n.to_string(), check)
                })
                .collect()
        };
        let (got, ok) = all_pass(&ev, &read(&["pg1", "peer1"]));
        assert!(ok, "{got}");
        assert!(
            got.contains("peer1 store.plaintext_refused: refused: no pg_hba.conf"),
            "{got}"
        );
        let (got, ok) = all_pass(&ev, &read(&["pg1", "peer1", "peer2"]));
        assert!(!ok);
        assert!(got.contains("connected without TLS"), "{got}");
        let (got, ok) = all_pass(&ev, &read(&["pg1", "peer3"]));
        assert!(!ok);
        assert!(got.contains("peer3 has not reported"), "{got}");
        assert!(!all_pass(&ev, &[]).1);
    }
}
