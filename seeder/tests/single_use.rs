#![allow(clippy::unwrap_used)]
//! Join tokens are single use, bound to the first key, over real TLS against the real
//! `seeder serve` (loopback 127.0.96.x, private addresses 127.0.97.x): a retry by the same key
//! gets the stored enrollment back, before and after a seeder restart; another key, from the same
//! address or another, is refused `bad_token` saying when the token was used, is recorded as a
//! refusal, and changes no table of the store (a logical dump of every table but `events` and
//! `refusals` is equal before and after); of concurrent uses with different keys exactly one wins.

mod common;

use std::collections::BTreeMap;

use common::*;
use hiveseed_proto::api::EnrollRequest;
use hiveseed_seeder::store::{Store, TokenUse};

const SEEDER: &str = "127.0.96.1";
const LISTEN: &str = "127.0.96.1:0";
const P1: &str = "t1-peer-r1-01";

/// A campaign whose seeder certificate names this file's seeder address.
fn campaign() -> Campaign {
    Campaign::with(
        "t1",
        &fleet_toml("t1").replace(SEEDER_IP, SEEDER),
        PEER_ROLE,
    )
}

fn agent(c: &Campaign, last: u8) -> Agent {
    Agent::new(
        P1,
        &format!("127.0.96.{last}"),
        &format!("127.0.97.{last}"),
        &c.ca_pem(),
    )
}

fn store(c: &Campaign) -> Store {
    Store::open(&c.dir.join("state.db")).unwrap()
}

/// The store's logical dump ([`store_dump`]), once P1 enrolled.
fn dump(c: &Campaign) -> BTreeMap<String, Vec<Vec<String>>> {
    let out = store_dump(&c.dir.join("state.db"));
    // The comparison covers what an enrollment writes, not an empty database.
    for t in ["certs", "enrollments", "manifests", "token_uses", "tokens"] {
        assert!(out.contains_key(t), "no table {t} in {:?}", out.keys());
    }
    assert!(!out["token_uses"].is_empty(), "no token was consumed");
    out
}

/// The enrollment that consumed P1's token.
fn token_use(c: &Campaign) -> TokenUse {
    let s = store(c);
    let node = P1.parse().unwrap();
    let nonce = s.enrollment(&node).unwrap().unwrap().token_nonce;
    s.token_use(&node, &nonce).unwrap().unwrap()
}

fn body(a: &Agent) -> EnrollRequest {
    EnrollRequest {
        csr_pem: a.csr(),
        facts: a.facts(),
    }
}

/// Asserts `a`'s use of `token` is refused as a used token: 401 `bad_token`, a message with
/// the time of the first use and neither the token nor a key, a `token_used` refusal row from
/// its address, and not one row of the store changed.
async fn assert_refused_as_used(c: &Campaign, server: &Server, a: &Agent, token: &str) {
    let before = dump(c);
    let used = token_use(c);
    let resp = a.enroll_raw(server, token, &body(a)).await;
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap();
    assert_eq!(
        (status, error_kind(&text).as_str()),
        (401, "bad_token"),
        "{text}"
    );
    let at = hiveseed_seeder::attest::rfc3339(used.used_at as i64).unwrap();
    assert!(text.contains(&format!("was used at {at}")), "{text}");
    let signature = token.rsplit('.').next().unwrap();
    assert!(!text.contains(signature), "the token is in {text}");
    assert!(!text.contains(&used.key_fpr), "the key is in {text}");
    assert_eq!(dump(c), before, "a refused use changed the store");
    let rows = store(c).refusals(1000).unwrap();
    assert!(
        rows.iter().any(|r| r.kind == "token_used"
            && r.source == std::net::IpAddr::V4(a.public_ip)
            && r.node.as_deref() == Some(P1)),
        "no token_used row from {}: {rows:?}",
        a.public_ip
    );
}

/// Asserts `a` (the key that used `token`) gets the identity `first` back, and the store is
/// unchanged: nothing issued, nothing revoked.
async fn assert_same_enrollment(
    c: &Campaign,
    server: &Server,
    a: &mut Agent,
    token: &str,
    first: &str,
) {
    let before = dump(c);
    let again = a.enroll(server, token).await;
    assert_eq!(
        again.cert_chain_pem, first,
        "a retry got another certificate"
    );
    assert_eq!(dump(c), before, "a retry changed the store");
    let status = a
        .mtls()
        .get(server.url("/v1/manifest"))
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(status, 200, "the returned identity does not authenticate");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_with_the_same_key_gets_the_same_certificate() {
    let c = campaign();
    let server = c.serve_on(LISTEN, &[]);
    let token = c.token(P1, "peer", 600);
    let mut a = agent(&c, 11);
    let first = a.enroll(&server, &token).await.cert_chain_pem;
    assert_same_enrollment(&c, &server, &mut a, &token, &first).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_key_from_the_same_address_is_refused() {
    let c = campaign();
    let server = c.serve_on(LISTEN, &[]);
    let token = c.token(P1, "peer", 600);
    let mut a = agent(&c, 21);
    let first = a.enroll(&server, &token).await.cert_chain_pem;
    // The droplet's own address, another key: a service account on the node, say.
    assert_refused_as_used(&c, &server, &agent(&c, 21), &token).await;
    // The node itself is untouched.
    assert_same_enrollment(&c, &server, &mut a, &token, &first).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_key_from_another_address_is_refused() {
    let c = campaign();
    let server = c.serve_on(LISTEN, &[]);
    let token = c.token(P1, "peer", 600);
    let mut a = agent(&c, 31);
    let first = a.enroll(&server, &token).await.cert_chain_pem;
    assert_refused_as_used(&c, &server, &agent(&c, 32), &token).await;
    assert_same_enrollment(&c, &server, &mut a, &token, &first).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_seeder_restart_keeps_the_token_used_and_bound_to_its_key() {
    let c = campaign();
    let mut server = c.serve_on(LISTEN, &[]);
    let token = c.token(P1, "peer", 600);
    let mut a = agent(&c, 41);
    let first = a.enroll(&server, &token).await.cert_chain_pem;
    server.kill();
    let server = c.serve_on(LISTEN, &[]);
    assert_refused_as_used(&c, &server, &agent(&c, 42), &token).await;
    assert_same_enrollment(&c, &server, &mut a, &token, &first).await;
}

/// Rounds of concurrent uses, each with a fresh token (a later round replaces the node): the race
/// between the look-up and the commit is not hit every round, so there are several.
const ROUNDS: usize = 8;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_uses_with_different_keys_exactly_one_wins() {
    let c = campaign();
    let server = c.serve_on(LISTEN, &["--enroll-rate-per-source", "100"]);
    let node = P1.parse().unwrap();
    for round in 0..ROUNDS {
        let token = c.token(P1, "peer", 600);
        let first = 100 + 10 * round as u8;
        let agents: Vec<Agent> = (first..first + 6).map(|last| agent(&c, last)).collect();
        // Every request ready, then all sent at once.
        let start = std::sync::Arc::new(tokio::sync::Barrier::new(agents.len()));
        let url = server.url(&format!("/v1/join/{P1}?token={token}"));
        let tasks: Vec<_> = agents
            .iter()
            .map(|a| {
                let (ip, client, url, body, start) = (
                    a.public_ip,
                    a.anonymous(),
                    url.clone(),
                    body(a),
                    start.clone(),
                );
                tokio::spawn(async move {
                    start.wait().await;
                    let resp = client.post(url).json(&body).send().await.unwrap();
                    let status = resp.status().as_u16();
                    (ip, status, resp.text().await.unwrap())
                })
            })
            .collect();
        let mut answers = Vec::new();
        for t in tasks {
            answers.push(t.await.unwrap());
        }
        let outcome: Vec<_> = answers
            .iter()
            .map(|(ip, status, text)| {
                let kind = if *status == 200 {
                    "ok".into()
                } else {
                    error_kind(text)
                };
                format!("{ip} {status} {kind}")
            })
            .collect();
        let won: Vec<_> = answers.iter().filter(|(_, s, _)| *s == 200).collect();
        assert_eq!(won.len(), 1, "round {round}: {outcome:?}");
        for (ip, status, text) in &answers {
            if *status != 200 {
                assert_eq!(
                    (*status, error_kind(text).as_str()),
                    (401, "bad_token"),
                    "{ip}: {text}"
                );
            }
        }
        // The winner's certificate is the one stored, and the node's only current identity.
        let s = store(&c);
        let e = s.enrollment(&node).unwrap().unwrap();
        let used = token_use(&c);
        assert_eq!(
            (used.key_fpr, used.cert_fpr),
            (e.key_fpr, e.identity_fpr.clone())
        );
        let identities: Vec<_> = s
            .current_certs("identity")
            .unwrap()
            .into_iter()
            .filter(|cert| cert.node.as_str() == P1)
            .collect();
        assert_eq!(identities.len(), 1, "round {round}");
        let got: hiveseed_proto::api::EnrollResponse = serde_json::from_str(&won[0].2).unwrap();
        assert!(
            got.cert_chain_pem.starts_with(&identities[0].pem),
            "round {round}: the winner got another certificate"
        );
        let events = s.events(1000).unwrap();
        let enrolled = events
            .iter()
            .filter(|e| e.kind == "enrolled" || e.kind == "superseded")
            .count();
        assert_eq!(enrolled, round + 1, "round {round}: {events:?}");
    }
}

/// `seeder tfvars`: (stdout, each node's token from its join URL).
fn tfvars(c: &Campaign) -> (String, BTreeMap<String, String>) {
    let out_file = c.tmp.path().join("nodes.auto.tfvars.json");
    let out = c.seeder(&["tfvars", "--out", out_file.to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "tfvars: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let vars: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&out_file).unwrap()).unwrap();
    let tokens = vars["nodes"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(name, v)| {
            let url = v["join_url"].as_str().unwrap();
            let token = url.split_once("?token=").unwrap().1;
            (name.clone(), token.to_owned())
        })
        .collect();
    (stdout, tokens)
}

/// The nodes `seeder tfvars` listed as given a fresh token, with the reason it printed.
fn fresh_listed(stdout: &str) -> BTreeMap<String, String> {
    stdout
        .lines()
        .filter_map(|l| {
            let (node, rest) = l.split_once("  fresh join token (")?;
            Some((node.to_owned(), rest.trim_end_matches(')').to_owned()))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tfvars_mints_a_fresh_token_for_a_used_or_half_spent_one_and_lists_it() {
    const P2: &str = "t1-peer-r1-02";
    const PG: &str = "t1-pg-r1-01";
    let c = campaign();
    let bin = c.tmp.path().join("bootstrap.bin");
    std::fs::write(&bin, b"not really an agent").unwrap();
    let out = c.seeder(&[
        "artifact",
        "add",
        "--name",
        "bootstrap",
        bin.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let (stdout, first) = tfvars(&c);
    let all: BTreeMap<String, String> = [P1, P2, PG]
        .iter()
        .map(|n| (n.to_string(), "none minted yet".to_string()))
        .collect();
    assert_eq!(fresh_listed(&stdout), all, "{stdout}");
    // Each minted token's mint time is recorded with it.
    let s = store(&c);
    let p1: hiveseed_proto::NodeName = P1.parse().unwrap();
    let minted = s.token(&p1).unwrap().unwrap();
    assert_eq!(minted.token, first[P1]);
    let nonce = minted.nonce.clone().unwrap();
    let at = s.token_minted_at(&p1, &nonce).unwrap().unwrap();
    assert!(at.abs_diff(now()) < 60, "minted at {at}");

    // Unused and fresh: reused, nothing listed.
    let (stdout, again) = tfvars(&c);
    assert_eq!(
        (fresh_listed(&stdout), &again),
        (BTreeMap::new(), &first),
        "{stdout}"
    );

    // P1 enrolls with its token; P2's token is past half its life; PG's has no mint time.
    let server = c.serve_on(LISTEN, &[]);
    let mut old = agent(&c, 61);
    old.enroll(&server, &first[P1]).await;
    let p2: hiveseed_proto::NodeName = P2.parse().unwrap();
    let mut half = s.token(&p2).unwrap().unwrap();
    half.exp = now() + 60;
    s.put_token(&p2, &half).unwrap();
    let pg: hiveseed_proto::NodeName = PG.parse().unwrap();
    let mut legacy = s.token(&pg).unwrap().unwrap();
    legacy.issued_at = None;
    s.put_token(&pg, &legacy).unwrap();

    let (stdout, third) = tfvars(&c);
    let used_at = hiveseed_seeder::attest::rfc3339(token_use(&c).used_at as i64).unwrap();
    let want: BTreeMap<String, String> = [
        (P1, format!("the last one was used at {used_at}")),
        (P2, "the last one is past half its life".into()),
        (PG, "mint time not recorded".into()),
    ]
    .into_iter()
    .map(|(n, r)| (n.to_string(), r))
    .collect();
    assert_eq!(fresh_listed(&stdout), want, "{stdout}");
    for n in [P1, P2, PG] {
        assert_ne!(third[n], first[n], "{n} kept its token");
    }
    // The replacement droplet enrolls with the fresh token and a new key; the old token stays
    // refused for any other key.
    assert_refused_as_used(&c, &server, &agent(&c, 62), &first[P1]).await;
    let mut replacement = agent(&c, 63);
    replacement.enroll(&server, &third[P1]).await;
    let (stdout, _) = tfvars(&c);
    assert_eq!(
        fresh_listed(&stdout).keys().collect::<Vec<_>>(),
        [P1],
        "{stdout}"
    );
}
