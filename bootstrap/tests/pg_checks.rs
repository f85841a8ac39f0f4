//! The pg-side checks against a real PostgreSQL, run exactly as rendered (read from the roles'
//! golden files) through the agent's own check path: the signed_events chain as ai-memory 0.7.0
//! writes it, intact, empty and tampered; the versions the server really runs; and the refusal of
//! a plaintext login from a peer's address, shown passing against hostssl-only pg_hba and failing
//! against a server misconfigured with a `host` rule.
//!
//! Loopback addresses of this file: 127.0.76.1 (the server), 127.0.76.2 (the peer).

#![allow(clippy::unwrap_used)] // test helpers outside #[test] fns

mod common;

use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::time::Duration;

use chrono::{DateTime, Utc};
use common::*;
use hiveseed_bootstrap::resources::check::run_check;
use hiveseed_bootstrap::{CheckEnv, RealHost, ServiceManager};
use hiveseed_proto::manifest::Check;
use hiveseed_proto::{CheckRecord, CheckStatus, Resource};
use sha2::{Digest, Sha256};

const SERVER: Ipv4Addr = Ipv4Addr::new(127, 0, 76, 1);
const PEER: Ipv4Addr = Ipv4Addr::new(127, 0, 76, 2);
/// The rendered nodes of seeder/tests/roles_golden.rs (the reference fleet, schema layout).
const PG_GOLDEN: &str = "schema-layout/do-1461-pg-nyc3-01";
const PEER_GOLDEN: &str = "schema-layout/do-1461-peer-nyc3-01";
const AI_MEMORY_PASSWORD: &str = "Pl41ntextProbePassw0rd";

/// A check as the seeder renders it: the golden file's JSON (`# check <id>` then the resource).
fn golden_check(node: &str, check: &str, edit: impl Fn(String) -> String) -> Check {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../seeder/tests/golden")
        .join(node)
        .join(format!("check_{check}.txt"));
    let text = std::fs::read_to_string(&path).unwrap();
    let json = text.split_once('\n').unwrap().1;
    match serde_json::from_str(&edit(json.to_owned())).unwrap() {
        Resource::Check(c) => c,
        other => panic!("{}: {other:?}", path.display()),
    }
}

/// A node root the `postgres` account can reach its socket dir in (`/var/run/postgresql`).
fn node_root() -> tempfile::TempDir {
    use std::os::unix::fs::PermissionsExt;
    let root = temp_root();
    for d in ["", "var", "var/run"] {
        let p = root.path().join(d);
        std::fs::create_dir_all(&p).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    root
}

/// A node root and a cluster on 127.0.76.1 whose socket is the root's `/var/run/postgresql`.
async fn cluster(bins: &hiveseed_test_deps::Postgres, hba: &str) -> (tempfile::TempDir, Pg) {
    let root = node_root();
    let pg = start_pg_with(
        bins,
        PgSetup {
            ca: &TestCa::new(),
            listen: SERVER.into(),
            socket: Some(root.path().join("var/run/postgresql")),
            hba: Some(hba),
        },
    )
    .await;
    // The agent's probes dial the default port, and a cluster's socket is named after its (here
    // ephemeral) port: `.s.PGSQL.5432` is made a hard link to it (the agent follows no symlink
    // in a directory postgres owns).
    let socket = pg.socket.join(format!(".s.PGSQL.{}", pg.port));
    std::fs::hard_link(socket, pg.socket.join(".s.PGSQL.5432")).unwrap();
    (root, pg)
}

const TRUST_LOCAL: &str = "local all all trust\n";

/// The superuser over the cluster's socket (pg_hba `local all all trust` in these clusters).
async fn superuser(pg: &Pg, dbname: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::Config::new()
        .host_path(&pg.socket)
        .port(pg.port)
        .user("postgres")
        .dbname(dbname)
        .connect(tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    client
}

async fn run(root: &Path, check: &Check) -> CheckRecord {
    let host = RealHost::new(root).unwrap();
    let node = node();
    let env = CheckEnv {
        host: &host,
        node: &node,
        manager: ServiceManager::Supervisor,
        supervisor: None,
        timeout: Duration::from_secs(10),
    };
    run_check(&env, check).await
}

// ---- the signed_events chain -------------------------------------------------------------------

/// ai-memory 0.7.0's `canonical_chain_bytes` (src/signed_events.rs:327-359), transcribed.
#[allow(clippy::too_many_arguments)]
fn canonical_chain_bytes(
    id: &str,
    agent_id: &str,
    event_type: &str,
    payload_hash: &[u8],
    signature: Option<&[u8]>,
    attest_level: &str,
    timestamp: &str,
    sequence: i64,
) -> Vec<u8> {
    const FIELD_SEP: u8 = 0x1F;
    let mut out = Vec::new();
    out.extend_from_slice(id.as_bytes());
    out.push(FIELD_SEP);
    out.extend_from_slice(agent_id.as_bytes());
    out.push(FIELD_SEP);
    out.extend_from_slice(event_type.as_bytes());
    out.push(FIELD_SEP);
    out.extend_from_slice(payload_hash);
    out.push(FIELD_SEP);
    if let Some(sig) = signature {
        out.extend_from_slice(sig);
    }
    out.push(FIELD_SEP);
    out.extend_from_slice(attest_level.as_bytes());
    out.push(FIELD_SEP);
    out.extend_from_slice(timestamp.as_bytes());
    out.push(FIELD_SEP);
    out.extend_from_slice(&sequence.to_be_bytes());
    out
}

/// One event appended the way ai-memory 0.7.0 appends on postgres
/// (`pg_append_signed_event_with_chain_in_tx`, src/store/postgres.rs:6995-7073): the head is the
/// row with the highest sequence, read back (its TIMESTAMPTZ as chrono's `to_rfc3339`), and its
/// canonical bytes hash into the new row's prev_hash; an empty table starts at ZERO_HASH, 1.
async fn append(
    db: &tokio_postgres::Client,
    n: u8,
    signature: Option<Vec<u8>>,
    timestamp: DateTime<Utc>,
) {
    let head = db
        .query_opt(
            "SELECT id, agent_id, event_type, payload_hash, signature, attest_level, timestamp, \
                    sequence \
             FROM ic_peer_1.signed_events \
             ORDER BY COALESCE(sequence, 0) DESC, ctid DESC \
             LIMIT 1",
            &[],
        )
        .await
        .unwrap();
    let (next_seq, prev_hash) = match head {
        None => (1_i64, vec![0u8; 32]),
        Some(h) => {
            let seq: Option<i64> = h.get(7);
            let seq = seq.unwrap_or(0);
            let sig: Option<Vec<u8>> = h.get(4);
            let ts: DateTime<Utc> = h.get(6);
            let canon = canonical_chain_bytes(
                h.get(0),
                h.get(1),
                h.get(2),
                h.get::<_, Vec<u8>>(3).as_slice(),
                sig.as_deref(),
                h.get(5),
                &ts.to_rfc3339(),
                seq,
            );
            (seq + 1, Sha256::digest(canon).to_vec())
        }
    };
    let attest = if signature.is_some() {
        "daemon_signed"
    } else {
        "unsigned"
    };
    db.execute(
        "INSERT INTO ic_peer_1.signed_events \
            (id, agent_id, event_type, payload_hash, signature, attest_level, timestamp, \
             prev_hash, sequence) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        &[
            &format!("7f1c2b3a-0000-4000-8000-0000000000{n:02}"),
            &"ai:test-harness@do-1461",
            &"capture_turn",
            &Sha256::digest([n]).to_vec(),
            &signature,
            &attest,
            &timestamp,
            &prev_hash,
            &next_seq,
        ],
    )
    .await
    .unwrap();
}

/// `signed_events` as ai-memory 0.7.0 creates it on postgres (src/store/postgres_schema.sql:598-618).
const SIGNED_EVENTS: &str = "CREATE SCHEMA ic_peer_1;
CREATE TABLE ic_peer_1.signed_events (
    id           TEXT PRIMARY KEY,
    agent_id     TEXT NOT NULL,
    event_type   TEXT NOT NULL,
    payload_hash BYTEA NOT NULL,
    signature    BYTEA,
    attest_level TEXT NOT NULL DEFAULT 'unsigned',
    timestamp    TIMESTAMPTZ NOT NULL,
    prev_hash    BYTEA,
    sequence     BIGINT
);
CREATE UNIQUE INDEX idx_signed_events_sequence ON ic_peer_1.signed_events (sequence);";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_chain_check_follows_ai_memorys_hashing_and_finds_a_tampered_row() {
    let Some(bins) = hiveseed_test_deps::postgres() else {
        return;
    };
    let (root, pg) = cluster(&bins, TRUST_LOCAL).await;
    superuser(&pg, "postgres")
        .await
        .batch_execute("CREATE DATABASE ai_memory")
        .await
        .unwrap();
    let db = superuser(&pg, "ai_memory").await;
    let chain = golden_check(PG_GOLDEN, "signed_events.ic_peer_1", |j| j);

    // Before ai-memory has made its table, the check cannot run: FAIL, saying why.
    let r = run(root.path(), &chain).await;
    assert_eq!(r.status, CheckStatus::Fail);
    assert!(r.got.contains("signed_events"), "{}", r.got);

    db.batch_execute(SIGNED_EVENTS).await.unwrap();
    let r = run(root.path(), &chain).await;
    assert_eq!(
        (r.status, r.got.as_str()),
        (CheckStatus::Pass, "linked (0 events)"),
        "an empty chain is intact at bring-up"
    );

    // Timestamps of every shape chrono prints (no fraction, millis, micros; nanoseconds that
    // postgres rounds), signed and unsigned rows.
    let at = |secs: i64, nanos: u32| DateTime::<Utc>::from_timestamp(secs, nanos).unwrap();
    let t = 1_780_000_000;
    let events = [
        (None, at(t, 0)),
        (Some(vec![0xA5; 64]), at(t + 1, 120_000_000)),
        (None, at(t + 2, 1_000)),
        (Some(vec![0x5A; 64]), at(t + 3, 123_456_789)),
        (None, at(946_684_799, 500_000_000)),
    ];
    for (n, (sig, ts)) in events.into_iter().enumerate() {
        append(&db, n as u8 + 1, sig, ts).await;
    }
    let r = run(root.path(), &chain).await;
    assert_eq!(
        (r.status, r.got.as_str()),
        (CheckStatus::Pass, "linked (5 events)")
    );
    assert_eq!(r.expected, r"linked \([0-9]+ events\)");

    // The middle row altered: its own prev_hash still holds, the next row's no longer does.
    db.batch_execute(
        "UPDATE ic_peer_1.signed_events SET event_type = 'memory_link.created' WHERE sequence = 3",
    )
    .await
    .unwrap();
    let r = run(root.path(), &chain).await;
    assert_eq!(
        (r.status, r.got.as_str()),
        (
            CheckStatus::Fail,
            "broken at event 4 of 5: prev_hash is not the hash of event 3"
        )
    );
    db.batch_execute(
        "UPDATE ic_peer_1.signed_events SET event_type = 'capture_turn' WHERE sequence = 3",
    )
    .await
    .unwrap();
    assert_eq!(run(root.path(), &chain).await.status, CheckStatus::Pass);

    // A row deleted from the middle: the sequence is no longer dense.
    db.batch_execute("DELETE FROM ic_peer_1.signed_events WHERE sequence = 2")
        .await
        .unwrap();
    let r = run(root.path(), &chain).await;
    assert_eq!(
        (r.status, r.got.as_str()),
        (
            CheckStatus::Fail,
            "broken at event 2 of 4: sequence 3 where 2 belongs"
        )
    );
}

// ---- versions ----------------------------------------------------------------------------------

/// GOT is the version the server runs, never the pin; the pin is a prefix ending at a dot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn version_checks_report_the_installed_version() {
    let Some(bins) = hiveseed_test_deps::postgres() else {
        return;
    };
    let (root, pg) = cluster(&bins, TRUST_LOCAL).await;
    let installed: String = superuser(&pg, "postgres")
        .await
        .query_one(
            "SELECT split_part(current_setting('server_version'), ' ', 1)",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let major = installed.split('.').next().unwrap().to_owned();
    assert_ne!(
        major, "18",
        "the fixture's pin must differ from the local server"
    );

    // The rendered check pins 18.4: this server is another version, and GOT says which.
    let pinned = golden_check(PG_GOLDEN, "store.pg_version", |j| j);
    assert_eq!(pinned.expected, "18.4");
    let r = run(root.path(), &pinned).await;
    assert_eq!(
        (r.status, r.got.as_str()),
        (CheckStatus::Fail, installed.as_str())
    );

    let with = |expected: &str| {
        golden_check(PG_GOLDEN, "store.pg_version", |j| {
            j.replace(
                "\"expected\": \"18.4\"",
                &format!("\"expected\": \"{expected}\""),
            )
        })
    };
    let r = run(root.path(), &with(&major)).await;
    assert_eq!(
        (r.status, r.got.as_str()),
        (CheckStatus::Pass, installed.as_str())
    );
    let r = run(root.path(), &with(&installed)).await;
    assert_eq!(r.status, CheckStatus::Pass);
    // "1" is a prefix of "15" but not a version prefix of it.
    let r = run(root.path(), &with(&major[..1])).await;
    assert_eq!(
        (r.status, r.got.as_str()),
        (CheckStatus::Fail, installed.as_str())
    );

    // An extension that is not installed says so instead of echoing its pin.
    superuser(&pg, "postgres")
        .await
        .batch_execute("CREATE DATABASE ai_memory")
        .await
        .unwrap();
    let r = run(
        root.path(),
        &golden_check(PG_GOLDEN, "store.age_version", |j| j),
    )
    .await;
    assert_eq!(
        (r.status, r.got.as_str()),
        (CheckStatus::Fail, "age is not installed")
    );
}

// ---- the plaintext refusal ---------------------------------------------------------------------

const HOSTSSL_ONLY: &str = "local    all  all                      trust\n\
                            hostssl  all  ai_memory  127.0.76.2/32  scram-sha-256\n";
const WITH_HOST_RULE: &str = "local    all  all                      trust\n\
                              host     all  ai_memory  127.0.76.2/32  scram-sha-256\n";

/// The peer's rendered check aimed at this server: the reference peer's addresses (pg 10.11.0.6,
/// the peer 10.11.0.11) become this file's, the port the cluster's.
fn plaintext_check(port: u16) -> Check {
    golden_check(PEER_GOLDEN, "store.plaintext_refused", |j| {
        j.replace("10.11.0.6", &SERVER.to_string())
            .replace("10.11.0.11", &PEER.to_string())
            .replace("\"port\": 5432", &format!("\"port\": {port}"))
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plaintext_login_is_refused_by_hostssl_only_and_admitted_by_a_host_rule() {
    let Some(bins) = hiveseed_test_deps::postgres() else {
        return;
    };
    let (root, pg) = cluster(&bins, HOSTSSL_ONLY).await;
    std::fs::create_dir_all(root.path().join("etc/ai-memory")).unwrap();
    std::fs::write(
        root.path().join("etc/ai-memory/pg.password"),
        format!("{AI_MEMORY_PASSWORD}\n"),
    )
    .unwrap();
    let admin = superuser(&pg, "postgres").await;
    admin
        .batch_execute(&format!(
            "CREATE ROLE ai_memory LOGIN PASSWORD '{AI_MEMORY_PASSWORD}'"
        ))
        .await
        .unwrap();
    admin
        .batch_execute("CREATE DATABASE ai_memory OWNER ai_memory")
        .await
        .unwrap();
    let refused = plaintext_check(pg.port);
    let hba = golden_check(PG_GOLDEN, "store.hba_hostssl_only", |j| j);

    // hostssl only: the server refuses before authentication, in its own words.
    let r = run(root.path(), &refused).await;
    assert_eq!(r.status, CheckStatus::Pass, "{}", r.got);
    assert_eq!(
        r.got,
        "refused: no pg_hba.conf entry for host \"127.0.76.2\", user \"ai_memory\", database \"ai_memory\", no encryption"
    );
    assert_eq!(r.got, r.expected);
    let r = run(root.path(), &hba).await;
    assert_eq!(
        (r.status, r.got.as_str()),
        (CheckStatus::Pass, "ssl on, hostssl /32 scram-sha-256 only")
    );

    // Misconfigured with a `host` rule: the same login gets in, and both checks say so.
    std::fs::write(pg.data.join("pg_hba.conf"), WITH_HOST_RULE).unwrap();
    admin
        .batch_execute("SELECT pg_reload_conf()")
        .await
        .unwrap();
    eventually(
        "the host rule in force",
        Duration::from_secs(10),
        || async { run(root.path(), &refused).await.status == CheckStatus::Fail },
    )
    .await;
    let r = run(root.path(), &refused).await;
    assert_eq!(
        (r.status, r.got.as_str()),
        (CheckStatus::Fail, "connected without TLS")
    );
    let r = run(root.path(), &hba).await;
    assert_eq!(r.status, CheckStatus::Fail);
    assert!(r.got.contains("1 non-hostssl TCP rules"), "{}", r.got);

    // No server at all is no refusal: FAIL with the transport error.
    drop(admin);
    let port = pg.port;
    drop(pg);
    let r = run(root.path(), &plaintext_check(port)).await;
    assert_eq!(r.status, CheckStatus::Fail);
    assert!(!r.got.starts_with("refused"), "{}", r.got);
    assert!(r.got.contains("from 127.0.76.2"), "{}", r.got);
    assert!(!r.got.contains(AI_MEMORY_PASSWORD));
}

#[test]
fn the_golden_checks_are_the_ones_tested_here() {
    let c = golden_check(PG_GOLDEN, "signed_events.ic_peer_1", |j| j);
    assert_eq!(c.check, "signed_events.ic_peer_1");
    let c = plaintext_check(5432);
    assert_eq!(c.check, "store.plaintext_refused");
    let hiveseed_proto::manifest::Probe::PgPlaintext { host, source, .. } = c.probe else {
        panic!("{:?}", c.probe)
    };
    assert_eq!((host, source), (IpAddr::V4(SERVER), Some(IpAddr::V4(PEER))));
}
