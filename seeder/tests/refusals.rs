#![allow(clippy::unwrap_used)]
//! Refusals over real TLS against the real `seeder serve` (loopback 127.0.78.x): a report `seq`
//! that does not fit the store, every refused enrollment counted in the store and logged without
//! its token, a flood that stays a few rows, `{kind, message}` bodies on every error, and another
//! campaign's token told apart from a forged one.

mod common;

use std::collections::BTreeSet;
use std::time::Instant;

use common::*;
use hiveseed_proto::api::EnrollRequest;
use hiveseed_proto::status::{Phase, StatusReport};
use hiveseed_seeder::store::{Refusal, Store};

const SEEDER: &str = "127.0.78.1";
const LISTEN: &str = "127.0.78.1:0";
const PG: &str = "t1-pg-r1-01";
const P1: &str = "t1-peer-r1-01";
const P2: &str = "t1-peer-r1-02";

/// A campaign whose seeder certificate names this file's seeder address.
fn campaign(name: &str) -> Campaign {
    Campaign::with(
        name,
        &fleet_toml(name).replace(SEEDER_IP, SEEDER),
        PEER_ROLE,
    )
}

/// A source address of its own for each case, so rows and log lines are told apart by source.
fn ip(last: u8) -> String {
    format!("127.0.78.{last}")
}

fn refusals(c: &Campaign) -> Vec<Refusal> {
    Store::open(&c.dir.join("state.db"))
        .unwrap()
        .refusals(100_000)
        .unwrap()
}

fn report(node: &str, seq: u64) -> StatusReport {
    StatusReport {
        node: node.parse().unwrap(),
        seq,
        at: now(),
        phase: Phase::Converged,
        generation: None,
        digest: None,
        resources: vec![],
        checks: vec![],
        services: vec![],
    }
}

async fn post_report(agent: &Agent, server: &Server, seq: u64) -> (u16, String) {
    let resp = agent
        .mtls()
        .post(server.url("/v1/status"))
        .json(&report(&agent.name, seq))
        .send()
        .await
        .unwrap();
    (resp.status().as_u16(), resp.text().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_seq_above_i64_max_is_refused_and_the_view_still_advances() {
    let c = campaign("t1");
    let server = c.serve_on(LISTEN, &[]);
    let mut p1 = Agent::new(P1, &ip(11), "127.0.79.11", &c.ca_pem());
    p1.enroll(&server, &c.token(P1, "peer", 600)).await;
    let store = Store::open(&c.dir.join("state.db")).unwrap();

    assert_eq!(post_report(&p1, &server, 1).await.0, 200);
    for seq in [i64::MAX as u64 + 1, u64::MAX] {
        let (status, body) = post_report(&p1, &server, seq).await;
        assert_eq!(status, 400, "seq {seq}: {body}");
        assert_eq!(error_kind(&body), "bad_request", "seq {seq}");
        assert!(body.contains("field seq"), "seq {seq}: {body}");
    }
    assert_eq!(store.report_seqs(&P1.parse().unwrap()).unwrap(), [1]);

    // The largest seq that fits is stored; the node's view follows it.
    let (status, body) = post_report(&p1, &server, 2).await;
    assert_eq!((status, body.as_str()), (200, r#"{"stored":true}"#));
    let (view, _) = store.latest_report(&P1.parse().unwrap()).unwrap().unwrap();
    assert_eq!(view.seq, 2);
    assert_eq!(post_report(&p1, &server, i64::MAX as u64).await.0, 200);
    let (view, _) = store.latest_report(&P1.parse().unwrap()).unwrap().unwrap();
    assert_eq!(view.seq, i64::MAX as u64);
    assert_eq!(
        store.report_seqs(&P1.parse().unwrap()).unwrap(),
        [1, 2, i64::MAX as u64]
    );
}

/// One refused enrollment: what was sent, from where, and what must be recorded.
struct Case {
    what: &'static str,
    source: String,
    path_node: &'static str,
    token: String,
    body: EnrollRequest,
    status: u16,
    kind: &'static str,
    /// The node the row and the log line name (`-` when the request named no valid node).
    node: &'static str,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_refused_enrollment_is_recorded_and_logged_without_the_token() {
    let c = campaign("t1");
    let log = c.tmp.path().join("seeder.log");
    let server = c.serve_logged(LISTEN, &["--reenroll", "refuse"], &log);
    let other_key = ed25519_dalek::SigningKey::from_bytes(&[7u8; 32]);
    let body_from = |source: &str| {
        let a = Agent::new(P1, source, "127.0.79.11", &c.ca_pem());
        EnrollRequest {
            csr_pem: a.csr(),
            facts: a.facts(),
        }
    };
    let case = |what, last, path_node, token: String, status, kind, node| {
        let source = ip(last);
        Case {
            what,
            body: body_from(&source),
            source,
            path_node,
            token,
            status,
            kind,
            node,
        }
    };
    let mut lie = body_from(&ip(29));
    lie.facts.public_ipv4 = ip(11).parse().unwrap();
    let mut bad_csr = body_from(&ip(30));
    bad_csr.csr_pem =
        "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n".into();
    let mut cases = vec![
        case(
            "forged",
            20,
            P1,
            c.token_with(&other_key, "t1", P1, "peer", 600),
            401,
            "token_bad_signature",
            P1,
        ),
        case(
            "expired",
            21,
            P1,
            c.token(P1, "peer", -10),
            401,
            "token_expired",
            P1,
        ),
        case(
            "wrong node",
            22,
            P1,
            c.token(P2, "peer", 600),
            401,
            "token_wrong_node",
            P1,
        ),
        case(
            "other campaign",
            23,
            P1,
            c.token_with(&other_key, "other", P1, "peer", 600),
            401,
            "token_other_campaign",
            P1,
        ),
        case(
            "malformed",
            24,
            P1,
            "garbage".into(),
            401,
            "token_malformed",
            P1,
        ),
        case("no token", 25, P1, String::new(), 401, "token_missing", P1),
        case(
            "not in the fleet",
            26,
            "t1-peer-r1-09",
            c.token("t1-peer-r1-09", "peer", 600),
            401,
            "not_in_fleet",
            "t1-peer-r1-09",
        ),
        case(
            "role differs",
            27,
            P1,
            c.token(P1, "pg", 600),
            401,
            "token_role_mismatch",
            P1,
        ),
        case(
            "bad node name",
            28,
            "NOT..a-name",
            c.token(P1, "peer", 600),
            400,
            "bad_node_name",
            "-",
        ),
    ];
    cases.push(Case {
        what: "source mismatch",
        source: ip(29),
        path_node: P1,
        token: c.token(P1, "peer", 600),
        body: lie,
        status: 403,
        kind: "source_mismatch",
        node: P1,
    });
    cases.push(Case {
        what: "bad csr",
        source: ip(30),
        path_node: P1,
        token: c.token(P1, "peer", 600),
        body: bad_csr,
        status: 400,
        kind: "bad_csr",
        node: P1,
    });

    for case in &cases {
        let agent = Agent::new(case.path_node, &case.source, "127.0.79.11", &c.ca_pem());
        let url = if case.what == "no token" {
            server.url(&format!("/v1/join/{}", case.path_node))
        } else {
            server.url(&format!("/v1/join/{}?token={}", case.path_node, case.token))
        };
        let resp = agent
            .anonymous()
            .post(url)
            .json(&case.body)
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        assert_eq!(status, case.status, "{}: {text}", case.what);
    }

    // A body that is not an enrollment request, after a token that verifies.
    let resp = Agent::new(P1, &ip(33), "127.0.79.11", &c.ca_pem())
        .anonymous()
        .post(server.url(&format!("/v1/join/{P1}?token={}", c.token(P1, "peer", 600))))
        .header("content-type", "application/json")
        .body(r#"{"csr_pem":"x"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    cases.push(Case {
        what: "bad body",
        source: ip(33),
        path_node: P1,
        token: c.token(P1, "peer", 600),
        body: body_from(&ip(33)),
        status: 400,
        kind: "bad_body",
        node: P1,
    });

    // Rate limited: one source past its burst, with a token that would otherwise enroll.
    let p2 = Agent::new(P2, &ip(31), "127.0.79.12", &c.ca_pem());
    let p2_body = EnrollRequest {
        csr_pem: p2.csr(),
        facts: p2.facts(),
    };
    let mut limited = false;
    for _ in 0..30 {
        if p2.enroll_raw(&server, "bad", &p2_body).await.status() == 429 {
            limited = true;
            break;
        }
    }
    assert!(limited, "rate limited within 30 attempts");
    cases.push(Case {
        what: "rate limited",
        source: ip(31),
        path_node: P2,
        token: "bad".into(),
        body: p2_body,
        status: 429,
        kind: "rate_limited",
        node: P2,
    });

    // Re-enrollment with another key, refused by policy.
    let mut p1 = Agent::new(P1, &ip(32), "127.0.79.11", &c.ca_pem());
    let good = c.token(P1, "peer", 600);
    p1.enroll(&server, &good).await;
    let again = Agent::new(P1, &ip(32), "127.0.79.11", &c.ca_pem());
    // A fresh token: the used one would be refused as used before the policy is asked.
    let fresh = c.token(P1, "peer", 600);
    let resp = again
        .enroll_raw(
            &server,
            &fresh,
            &EnrollRequest {
                csr_pem: again.csr(),
                facts: again.facts(),
            },
        )
        .await;
    assert_eq!(resp.status(), 409);
    cases.push(Case {
        what: "re-enrollment refused",
        source: ip(32),
        path_node: P1,
        token: fresh.clone(),
        body: EnrollRequest {
            csr_pem: again.csr(),
            facts: again.facts(),
        },
        status: 409,
        kind: "reenroll_refused",
        node: P1,
    });

    let rows = refusals(&c);
    let log_text = std::fs::read_to_string(&log).unwrap();
    for case in &cases {
        let row = rows
            .iter()
            .find(|r| r.source.to_string() == case.source && r.kind == case.kind)
            .unwrap_or_else(|| {
                panic!(
                    "{}: no {} row from {}: {rows:?}",
                    case.what, case.kind, case.source
                )
            });
        assert_eq!(
            row.node.as_deref().unwrap_or("-"),
            case.node,
            "{}: node of {row:?}",
            case.what
        );
        let line = log_text
            .lines()
            .find(|l| {
                l.contains(" refused ")
                    && l.contains(&format!("kind={} ", case.kind))
                    && l.contains(&format!("source={} ", case.source))
            })
            .unwrap_or_else(|| {
                panic!(
                    "{}: no log line for {} from {}:\n{log_text}",
                    case.what, case.kind, case.source
                )
            });
        assert!(
            line.contains(&format!("node={} ", case.node)),
            "{}: {line}",
            case.what
        );
    }
    // Nothing but the cases was refused.
    let kinds: BTreeSet<_> = rows.iter().map(|r| r.kind.as_str()).collect();
    assert_eq!(kinds, cases.iter().map(|c| c.kind).collect(), "{rows:?}");
    // No token, nor a token's signature part, anywhere in the log.
    for case in cases.iter().filter(|c| c.token.len() > 20) {
        let signature = case.token.rsplit('.').next().unwrap();
        assert!(
            !log_text.contains(&case.token) && !log_text.contains(signature),
            "{}: the token is in the log:\n{log_text}",
            case.what
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_refused_enrollments_stays_a_few_counted_rows() {
    const FLOOD: usize = 10_000;
    const TASKS: usize = 4;
    let c = campaign("t1");
    let log = c.tmp.path().join("seeder.log");
    let server = c.serve_logged(LISTEN, &[], &log);
    let source = ip(40);
    let flooder = Agent::new(P1, &source, "127.0.79.11", &c.ca_pem());
    let client = flooder.anonymous();
    let url = server.url(&format!("/v1/join/{P1}?token=garbage"));
    let body = serde_json::to_string(&EnrollRequest {
        csr_pem: flooder.csr(),
        facts: flooder.facts(),
    })
    .unwrap();

    let started = now();
    let clock = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..TASKS {
        let (client, url, body) = (client.clone(), url.clone(), body.clone());
        tasks.spawn(async move {
            let mut statuses = Vec::with_capacity(FLOOD / TASKS);
            for _ in 0..FLOOD / TASKS {
                let resp = client
                    .post(&url)
                    .header("content-type", "application/json")
                    .body(body.clone())
                    .send()
                    .await
                    .unwrap();
                statuses.push(resp.status().as_u16());
            }
            statuses
        });
    }
    let mut statuses = Vec::new();
    while let Some(done) = tasks.join_next().await {
        statuses.extend(done.unwrap());
    }
    let minutes = (now() / 60 - started / 60) as usize + 1;
    println!(
        "{FLOOD} refused enrollments in {:.1}s over {minutes} minute(s)",
        clock.elapsed().as_secs_f64()
    );
    assert_eq!(statuses.len(), FLOOD);
    assert!(
        statuses.iter().all(|s| *s == 401 || *s == 429),
        "every one refused"
    );

    let rows: Vec<_> = refusals(&c)
        .into_iter()
        .filter(|r| r.source.to_string() == source)
        .collect();
    let counted: u64 = rows.iter().map(|r| r.count).sum();
    println!("rows {} counting {counted}", rows.len());
    let first = rows.iter().take(4).collect::<Vec<_>>();
    assert_eq!(counted, FLOOD as u64, "every refusal counted: {first:?}...");
    // Two kinds (the burst's malformed tokens, then rate_limited) per minute the flood spanned.
    assert!(
        rows.len() <= 2 * minutes,
        "{} rows: {first:?}...",
        rows.len()
    );
    let kinds: BTreeSet<_> = rows.iter().map(|r| r.kind.as_str()).collect();
    assert_eq!(
        kinds,
        BTreeSet::from(["rate_limited", "token_malformed"]),
        "{first:?}..."
    );
    // The log shows the flood without repeating it: the first and every power of ten per row.
    let lines = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .filter(|l| l.contains(&format!("source={source} ")))
        .count();
    println!("log lines {lines}");
    assert!(lines >= 2 && lines <= 6 * rows.len(), "{lines} log lines");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_error_answer_is_kind_and_message_json() {
    let c = campaign("t1");
    let server = c.serve_on(LISTEN, &[]);
    let mut pg = Agent::new(PG, &ip(50), "127.0.79.10", &c.ca_pem());
    pg.enroll(&server, &c.token(PG, "pg", 600)).await;
    let client = pg.mtls();

    let cases: Vec<(&str, reqwest::RequestBuilder, u16, &str)> = vec![
        (
            "wrong method on the manifest",
            client.delete(server.url("/v1/manifest")),
            405,
            "method_not_allowed",
        ),
        (
            "GET on the join route",
            client.get(server.url(&format!("/v1/join/{PG}"))),
            405,
            "method_not_allowed",
        ),
        (
            "PUT on status",
            client.put(server.url("/v1/status")),
            405,
            "method_not_allowed",
        ),
        (
            "no such route",
            client.get(server.url("/v1/nope")),
            404,
            "not_found",
        ),
        (
            "wait is not a number",
            client.get(server.url("/v1/manifest?wait=soon")),
            400,
            "bad_request",
        ),
        (
            "unknown query parameter",
            client.get(server.url("/v1/manifest?wait=1&admin=1")),
            400,
            "bad_request",
        ),
        (
            "path that is not UTF-8",
            client.get(server.url("/v1/bootstrap/%FF%FE")),
            400,
            "bad_request",
        ),
        (
            "readiness path that is not UTF-8",
            client.get(server.url(&format!("/v1/ready/{PG}/%FF"))),
            400,
            "bad_request",
        ),
    ];
    for (what, req, status, kind) in cases {
        let resp = req.send().await.unwrap();
        let got = resp.status().as_u16();
        let content_type = resp.headers().get("content-type").cloned();
        let allow = resp.headers().get("allow").cloned();
        let body = resp.text().await.unwrap();
        assert_eq!(got, status, "{what}: {body}");
        assert_eq!(
            content_type.as_ref().and_then(|v| v.to_str().ok()),
            Some("application/json"),
            "{what}: {body}"
        );
        let v: serde_json::Value =
            serde_json::from_str(&body).unwrap_or_else(|_| panic!("{what}: not JSON: {body:?}"));
        assert_eq!(v["kind"], kind, "{what}: {body}");
        assert!(
            v["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{what}: {body}"
        );
        assert_eq!(v.as_object().unwrap().len(), 2, "{what}: {body}");
        if status == 405 {
            assert!(allow.is_some(), "{what}: a 405 names the allowed methods");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_campaigns_token_is_told_apart_from_a_forged_one() {
    let c = campaign("t1");
    let server = c.serve_on(LISTEN, &[]);
    // Another campaign's seeder: its own key, its own campaign name.
    let elsewhere = campaign("t2");
    let p1 = Agent::new(P1, &ip(60), "127.0.79.11", &c.ca_pem());
    let body = EnrollRequest {
        csr_pem: p1.csr(),
        facts: p1.facts(),
    };
    let forged_key = ed25519_dalek::SigningKey::from_bytes(&[9u8; 32]);
    let mut messages = Vec::new();
    for (what, token) in [
        ("another campaign's", elsewhere.token(P1, "peer", 600)),
        ("forged", c.token_with(&forged_key, "t1", P1, "peer", 600)),
    ] {
        let resp = p1.enroll_raw(&server, &token, &body).await;
        assert_eq!(resp.status(), 401, "{what}");
        let v: serde_json::Value = resp.json().await.unwrap();
        assert_eq!(v["kind"], "bad_token", "{what}");
        messages.push(v["message"].as_str().unwrap().to_owned());
    }
    assert_eq!(
        messages[0],
        "join token says it is for campaign t2; this seeder serves campaign t1"
    );
    assert_eq!(messages[1], "join token signature does not verify");
    let view: serde_json::Value =
        serde_json::from_slice(&c.seeder(&["status", "--json"]).stdout).unwrap();
    assert_eq!(view["enrolled"], 0, "{view}");
}

/// Refusals on node routes past the TLS handshake are recorded and logged as refused
/// enrollments are: no client certificate, a CA-signed certificate that is no node's (the
/// operator's), and a superseded (revoked) identity, each a row of its kind and source, the
/// revoked one naming its node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_on_node_routes_are_recorded_and_logged() {
    let c = campaign("t1");
    let log = c.tmp.path().join("seeder.log");
    let server = c.serve_logged(LISTEN, &[], &log);
    let mut old = Agent::new(P1, &ip(60), "127.0.79.60", &c.ca_pem());
    old.enroll(&server, &c.token(P1, "peer", 600)).await;
    let mut replacement = Agent::new(P1, &ip(60), "127.0.79.60", &c.ca_pem());
    replacement.enroll(&server, &c.token(P1, "peer", 600)).await;
    let anonymous = Agent::new(P2, &ip(61), "127.0.79.61", &c.ca_pem());

    let manifest = |client: reqwest::Client| {
        let url = server.url("/v1/manifest");
        async move {
            let resp = client.get(url).send().await.unwrap();
            (resp.status().as_u16(), resp.text().await.unwrap())
        }
    };
    let (status, body) = manifest(old.mtls()).await;
    assert_eq!(
        (status, error_kind(&body).as_str()),
        (403, "revoked"),
        "{body}"
    );
    let (status, body) = manifest(anonymous.anonymous()).await;
    assert_eq!(
        (status, error_kind(&body).as_str()),
        (401, "unauthenticated"),
        "{body}"
    );

    let rows = refusals(&c);
    let row = |kind: &str, source: &str| {
        rows.iter()
            .find(|r| r.kind == kind && r.source.to_string() == source)
            .unwrap_or_else(|| panic!("no {kind} row from {source}: {rows:?}"))
    };
    let revoked = row("revoked_cert", &ip(60));
    assert_eq!((revoked.count, revoked.node.as_deref()), (1, Some(P1)));
    assert_eq!(row("no_client_cert", &ip(61)).count, 1);
    let text = std::fs::read_to_string(&log).unwrap();
    for (kind, source) in [("revoked_cert", ip(60)), ("no_client_cert", ip(61))] {
        assert!(
            text.lines()
                .any(|l| l.contains(&format!("kind={kind}"))
                    && l.contains(&format!("source={source}"))),
            "no log line for {kind} from {source}"
        );
    }
}
