#![allow(clippy::unwrap_used)]
//! Residency attestation against the real `seeder serve` over real TLS (loopback 127.0.98.x,
//! private addresses 127.0.99.x), with the DigitalOcean stand-in (`tests/do-api`) in this process
//! on 127.0.98.250 as the fleet's `[attestation] api_url`: every field in which the droplet is
//! not the node is refused `attestation_failed` naming it, an API that refuses the token, rate
//! limits, fails or hangs is refused `attestation_unavailable` (503, retry-after), each refusal is
//! recorded, and none changes a table of the store or consumes the token: the real droplet then
//! enrolls with the same token. The happy path binds the node to its droplet, which
//! `seeder status` shows.

mod common;

use std::sync::Arc;

use common::*;
use hiveseed_do_api::{Droplet, Fault, StandIn, Table};
use hiveseed_proto::api::{EnrollRequest, EnrollResponse, NodeFacts};
use hiveseed_proto::token::{JoinClaims, TOKEN_VERSION};
use hiveseed_proto::{JoinToken, NodeName};
use hiveseed_seeder::store::{MintedToken, Store};

const SEEDER: &str = "127.0.98.1";
const LISTEN: &str = "127.0.98.1:0";
const API: &str = "127.0.98.250:0";
const CAMPAIGN: &str = "a1";
const P1: &str = "a1-peer-r1-01";
const P2: &str = "a1-peer-r1-02";
const DO_TOKEN: &str = "dop_v1_attestation_test_token_0123";
/// When each test's tokens are minted, relative to now; droplets are created after it.
const MINTED_AGO: u64 = 100;

/// A campaign with `[attestation]` pointing at a stand-in, the stand-in, and a serving seeder.
struct Fixture {
    c: Campaign,
    server: Server,
    api: Arc<StandIn>,
    table: Table,
    _api_task: tokio::task::JoinHandle<std::io::Result<()>>,
}

async fn fixture(serve_extra: &[&str]) -> Fixture {
    let (api, table) = StandIn::fixed(DO_TOKEN, vec![]);
    let listener = tokio::net::TcpListener::bind(API).await.unwrap();
    let api_url = format!("http://{}", listener.local_addr().unwrap());
    let task = tokio::spawn(api.clone().serve(listener));
    let fleet = format!(
        "{}\n[attestation]\nprovider = \"digitalocean\"\napi_url = \"{api_url}\"\n",
        fleet_toml(CAMPAIGN).replace(SEEDER_IP, SEEDER)
    );
    let c = Campaign::with(CAMPAIGN, &fleet, PEER_ROLE);
    write_do_token(&c, DO_TOKEN);
    let mut extra = vec!["--enroll-rate-per-source", "100"];
    extra.extend_from_slice(serve_extra);
    let server = c.serve_on(LISTEN, &extra);
    Fixture {
        c,
        server,
        api,
        table,
        _api_task: task,
    }
}

fn write_do_token(c: &Campaign, token: &str) {
    use std::os::unix::fs::PermissionsExt;
    let path = c.dir.join("secrets/do-api-token");
    std::fs::write(&path, format!("{token}\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

fn store(c: &Campaign) -> Store {
    Store::open(&c.dir.join("state.db")).unwrap()
}

/// A join token for `node`, recorded in the store as minted `MINTED_AGO` seconds ago (what
/// `seeder tfvars` does).
fn mint(c: &Campaign, node: &str) -> String {
    let nonce = hex::encode(rand::random::<[u8; 16]>());
    let exp = now() + 600;
    let claims = JoinClaims {
        v: TOKEN_VERSION,
        campaign: CAMPAIGN.parse().unwrap(),
        node: node.parse().unwrap(),
        role: "peer".parse().unwrap(),
        region: "r1".parse().unwrap(),
        exp,
        nonce: nonce.clone(),
    };
    let token = JoinToken::sign(&claims, &c.signing_key())
        .as_str()
        .to_owned();
    let name: NodeName = node.parse().unwrap();
    store(c)
        .put_token(
            &name,
            &MintedToken {
                token: token.clone(),
                nonce: Some(nonce),
                issued_at: Some(now() - MINTED_AGO),
                exp,
            },
        )
        .unwrap();
    token
}

fn agent(c: &Campaign, name: &str, last: u8) -> Agent {
    Agent::new(
        name,
        &format!("127.0.98.{last}"),
        &format!("127.0.99.{last}"),
        &c.ca_pem(),
    )
}

/// DigitalOcean's time format.
fn do_time(unix: u64) -> String {
    hiveseed_seeder::attest::rfc3339(unix as i64)
        .unwrap()
        .replace("+00:00", "Z")
}

/// The droplet `a` runs on, as DigitalOcean records it: created after the token was minted.
fn droplet_of(a: &Agent, id: u64) -> Droplet {
    Droplet {
        id,
        name: a.name.clone(),
        region: "r1".into(),
        public_ipv4: a.public_ip,
        private_ipv4: a.private_ip,
        tags: vec![CAMPAIGN.into(), "peer".into()],
        created_at: do_time(now() - MINTED_AGO / 2),
    }
}

fn body(a: &Agent, droplet_id: u64) -> EnrollRequest {
    EnrollRequest {
        csr_pem: a.csr(),
        facts: NodeFacts {
            droplet_id,
            ..a.facts()
        },
    }
}

/// How many refusals of `kind` naming `node` the store counted.
fn refusals(c: &Campaign, kind: &str, node: &str) -> u64 {
    store(c)
        .refusals(10_000)
        .unwrap()
        .iter()
        .filter(|r| r.kind == kind && r.node.as_deref() == Some(node))
        .map(|r| r.count)
        .sum()
}

/// Asserts `a`'s enrollment with `token` claiming droplet `droplet_id` is refused with `status`
/// and `kind`, a message containing `field`, and neither the join token nor the API token in
/// it; that one refusal of `kind` is recorded (the `token_used` refusal for `bad_token`); and
/// that no table of the store changed. Returns the message.
async fn assert_refused(
    f: &Fixture,
    a: &Agent,
    token: &str,
    droplet_id: u64,
    (status, kind): (u16, &str),
    field: &str,
) -> String {
    let before = store_dump(&f.c.dir.join("state.db"));
    let recorded = if kind == "bad_token" {
        "token_used"
    } else {
        kind
    };
    let counted = refusals(&f.c, recorded, &a.name);
    let resp = a.enroll_raw(&f.server, token, &body(a, droplet_id)).await;
    let got_status = resp.status().as_u16();
    let retry_after = resp.headers().get("retry-after").is_some();
    let text = resp.text().await.unwrap();
    assert_ne!(
        got_status, 200,
        "{field}: accepted where {kind} was expected"
    );
    assert_eq!(
        (got_status, error_kind(&text).as_str()),
        (status, kind),
        "{field}: {text}"
    );
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let message = v["message"].as_str().unwrap().to_owned();
    assert!(
        message.contains(field),
        "the message does not name {field}: {message}"
    );
    let signature = token.rsplit('.').next().unwrap();
    assert!(!text.contains(signature), "the join token is in {text}");
    assert!(!text.contains(DO_TOKEN), "the API token is in {text}");
    if status == 503 {
        assert!(retry_after, "503 without retry-after: {text}");
    }
    assert_eq!(
        refusals(&f.c, recorded, &a.name),
        counted + 1,
        "{field}: no {recorded} refusal recorded"
    );
    assert_eq!(
        store_dump(&f.c.dir.join("state.db")),
        before,
        "{field}: a refused enrollment changed the store"
    );
    message
}

async fn enroll(f: &Fixture, a: &mut Agent, token: &str, droplet_id: u64) -> EnrollResponse {
    let resp = a.enroll_raw(&f.server, token, &body(a, droplet_id)).await;
    let status = resp.status();
    let text = resp.text().await.unwrap();
    assert!(status.is_success(), "enroll {}: {status} {text}", a.name);
    let r: EnrollResponse = serde_json::from_str(&text).unwrap();
    a.cert_chain = Some(r.cert_chain_pem.clone());
    r
}

fn bound_droplet(c: &Campaign, node: &str) -> Option<u64> {
    store(c)
        .enrollment(&node.parse().unwrap())
        .unwrap()
        .map(|e| e.droplet_id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_droplet_that_is_the_node_enrolls_and_is_bound_to_it() {
    let f = fixture(&[]).await;
    let mut a = agent(&f.c, P1, 11);
    f.table.set(vec![droplet_of(&a, 1011)]);
    let token = mint(&f.c, P1);
    enroll(&f, &mut a, &token, 1011).await;
    assert_eq!(bound_droplet(&f.c, P1), Some(1011));
    assert_eq!(f.api.requests(), 1);

    // `seeder status` shows the binding; `seeder check` the mode.
    let out = f.c.seeder(&["status"]);
    let text = String::from_utf8_lossy(&out.stdout);
    let row = text.lines().find(|l| l.starts_with(P1)).unwrap();
    let columns: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(columns[4], "1011", "{text}");
    let out = run_seeder(&[
        "check",
        "--fleet",
        path_str(&f.c.fleet),
        "--dir",
        f.c.dir_str(),
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    let line = text
        .lines()
        .find(|l| l.starts_with("attestation:"))
        .unwrap();
    assert!(
        line.starts_with("attestation: digitalocean (api http://127.0.98.250:")
            && line.ends_with(", tag a1)"),
        "{line}"
    );

    // The same key retrying from the same droplet gets its enrollment back, not from another.
    let first = a.cert_chain.clone().unwrap();
    let again = enroll(&f, &mut a, &token, 1011).await;
    assert_eq!(again.cert_chain_pem, first);
    assert_refused(
        &f,
        &a,
        &token,
        1012,
        (403, "attestation_failed"),
        "facts.droplet_id 1012 is not droplet 1011",
    )
    .await;

    // The used token, stolen: another key, from another address, is refused as used before
    // anything asks DigitalOcean.
    let asked = f.api.requests();
    let thief = agent(&f.c, P1, 12);
    assert_refused(&f, &thief, &token, 1011, (401, "bad_token"), "was used at").await;
    assert_eq!(f.api.requests(), asked, "a used token reached attestation");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_mismatch_is_refused_naming_its_field_and_consumes_nothing() {
    let f = fixture(&[]).await;
    let mut a = agent(&f.c, P1, 21);
    let token = mint(&f.c, P1);
    let real = droplet_of(&a, 1021);
    type Change = fn(&mut Droplet);
    let cases: [(&str, Change); 6] = [
        ("name is \"a1-peer-r1-09\"", |d| {
            d.name = "a1-peer-r1-09".into()
        }),
        (
            "does not include the connection's source address 127.0.98.21",
            |d| d.public_ipv4 = "127.0.98.29".parse().unwrap(),
        ),
        ("is not facts.private_ipv4 127.0.99.21", |d| {
            d.private_ipv4 = "127.0.99.29".parse().unwrap()
        }),
        ("region is r2", |d| d.region = "r2".into()),
        ("do not include the campaign's tag a1", |d| {
            d.tags = vec!["peer".into()]
        }),
        ("before its join token was minted", |d| {
            d.created_at = do_time(now() - 2 * MINTED_AGO)
        }),
    ];
    for (field, change) in cases {
        let mut d = real.clone();
        change(&mut d);
        f.table.set(vec![d]);
        assert_refused(&f, &a, &token, 1021, (403, "attestation_failed"), field).await;
    }
    // A droplet id the account does not have.
    f.table.set(vec![real.clone()]);
    assert_refused(
        &f,
        &a,
        &token,
        1029,
        (403, "attestation_failed"),
        "facts.droplet_id: droplet 1029 does not exist",
    )
    .await;
    // A token whose mint time the seeder did not record (not the latest minted for the node).
    let unrecorded = f.c.token(P1, "peer", 600);
    assert_refused(
        &f,
        &a,
        &unrecorded,
        1021,
        (403, "attestation_failed"),
        "has no recorded mint time",
    )
    .await;
    // Nothing was consumed: the real droplet enrolls with the token.
    assert!(store(&f.c).enrollments().unwrap().is_empty());
    enroll(&f, &mut a, &token, 1021).await;
    assert_eq!(bound_droplet(&f.c, P1), Some(1021));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_droplet_bound_to_another_node_is_refused() {
    let f = fixture(&[]).await;
    let mut a = agent(&f.c, P1, 31);
    let mut b = agent(&f.c, P2, 32);
    f.table.set(vec![droplet_of(&a, 1031)]);
    enroll(&f, &mut a, &mint(&f.c, P1), 1031).await;
    // DigitalOcean now says droplet 1031 is P2 (renamed and re-addressed): it is still P1's.
    f.table
        .set(vec![droplet_of(&b, 1031), droplet_of(&b, 1032)]);
    let token = mint(&f.c, P2);
    assert_refused(
        &f,
        &b,
        &token,
        1031,
        (403, "attestation_failed"),
        "facts.droplet_id 1031 is bound to enrolled node a1-peer-r1-01",
    )
    .await;
    enroll(&f, &mut b, &token, 1032).await;
    assert_eq!(
        (bound_droplet(&f.c, P1), bound_droplet(&f.c, P2)),
        (Some(1031), Some(1032))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_for_one_node_with_another_nodes_droplet_is_refused() {
    let f = fixture(&[]).await;
    let mut a = agent(&f.c, P1, 41);
    let b = agent(&f.c, P2, 42);
    f.table
        .set(vec![droplet_of(&a, 1041), droplet_of(&b, 1042)]);
    let token = mint(&f.c, P1);
    // P1's token and address, P2's droplet id.
    assert_refused(
        &f,
        &a,
        &token,
        1042,
        (403, "attestation_failed"),
        "droplet 1042's name is \"a1-peer-r1-02\", not the node's name a1-peer-r1-01",
    )
    .await;
    enroll(&f, &mut a, &token, 1041).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_that_cannot_answer_gives_a_retryable_refusal_and_consumes_nothing() {
    let f = fixture(&["--attestation-budget", "1.5"]).await;
    let mut a = agent(&f.c, P1, 51);
    f.table.set(vec![droplet_of(&a, 1051)]);
    let token = mint(&f.c, P1);
    let unavailable = (503, "attestation_unavailable");

    // The API refuses the seeder's token (read again at each enrollment).
    write_do_token(&f.c, "dop_v1_revoked_token_0000000000000");
    assert_refused(
        &f,
        &a,
        &token,
        1051,
        unavailable,
        "refuses the seeder's token (HTTP 401)",
    )
    .await;
    write_do_token(&f.c, DO_TOKEN);

    for (what, fault) in [
        (
            "429",
            Fault::RateLimited {
                retry_after_secs: 1,
            },
        ),
        ("500", Fault::ServerError),
        ("503", Fault::Unavailable),
        ("a hung answer", Fault::Hang),
    ] {
        f.api.push_faults(std::iter::repeat_n(fault, 50));
        let text = assert_refused(
            &f,
            &a,
            &token,
            1051,
            unavailable,
            "the DigitalOcean API did not answer within 1.5s",
        )
        .await;
        assert!(text.contains("retry later"), "{what}: {text}");
        // The faults the look-up did not reach are dropped, so the next case starts clean.
        f.api.clear_faults();
    }
    // One failure then an answer: retried within the budget, enrolled.
    f.api.push_faults([Fault::ServerError]);
    enroll(&f, &mut a, &token, 1051).await;
    assert_eq!(bound_droplet(&f.c, P1), Some(1051));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_with_attestation_needs_the_api_token_and_check_says_the_mode() {
    let fleet = format!(
        "{}\n[attestation]\nprovider = \"digitalocean\"\n",
        fleet_toml(CAMPAIGN).replace(SEEDER_IP, SEEDER)
    );
    let c = Campaign::with(CAMPAIGN, &fleet, PEER_ROLE);
    let out = c.seeder(&["serve", "--listen", LISTEN]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "serve started without the token: {err}"
    );
    assert!(
        err.contains("secrets/do-api-token") && err.contains("[attestation]"),
        "{err}"
    );
    let check = |dir: bool| {
        let mut args = vec!["check", "--fleet", path_str(&c.fleet)];
        if dir {
            args.extend_from_slice(&["--dir", c.dir_str()]);
        }
        let out = run_seeder(&args);
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    };
    let (ok, text) = check(true);
    assert!(!ok && text.contains("secrets/do-api-token"), "{text}");
    let (ok, text) = c.publish();
    assert!(!ok && text.contains("secrets/do-api-token"), "{text}");
    write_do_token(&c, DO_TOKEN);
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(
        c.dir.join("secrets/do-api-token"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let (ok, text) = check(true);
    assert!(!ok && text.contains("mode 0644"), "{text}");
    assert!(!text.contains(DO_TOKEN), "the token is in {text}");
    // A usable token, but no source address to compare with the droplet's.
    write_do_token(&c, DO_TOKEN);
    let out = c.seeder(&["serve", "--listen", LISTEN, "--no-source-check"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("--no-source-check leaves it nothing to check"),
        "{err}"
    );
    // Without --dir the fleet alone is checked, and the mode said.
    let (ok, text) = check(false);
    assert!(ok, "{text}");
    assert!(
        text.contains("attestation: digitalocean (api https://api.digitalocean.com, tag a1)"),
        "{text}"
    );

    let plain = Campaign::with(CAMPAIGN, &fleet_toml(CAMPAIGN), PEER_ROLE);
    let out = run_seeder(&["check", "--fleet", path_str(&plain.fleet)]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(
            "attestation: off — enrollment trusts the join token, single use, and the connection's source address"
        ),
        "{text}"
    );
}
