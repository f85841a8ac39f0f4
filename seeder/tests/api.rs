#![allow(clippy::unwrap_used)]
//! The seeder over real TLS: the real `seeder serve` process on an ephemeral loopback port,
//! certificates and keys made in the test, clients bound to their nodes' source addresses.

mod common;

use std::time::Duration;

use common::*;
use hiveseed_proto::api::{CertRequest, CertResponse, EnrollRequest, Readiness};
use hiveseed_proto::manifest::{CertificatePurpose, FileContent};
use hiveseed_proto::status::{CheckRecord, Phase, StatusReport};
use hiveseed_proto::{verify_manifest, Generation, Manifest, Resource, SignedEnvelope};

const PG: &str = "t1-pg-r1-01";
const P1: &str = "t1-peer-r1-01";
const P2: &str = "t1-peer-r1-02";

fn manifest_key(c: &Campaign) -> ed25519_dalek::VerifyingKey {
    c.signing_key().verifying_key()
}

async fn fetch(agent: &Agent, server: &Server, etag: Option<&str>, wait: u64) -> reqwest::Response {
    let mut req = agent
        .mtls()
        .get(server.url(&format!("/v1/manifest?wait={wait}")));
    if let Some(e) = etag {
        req = req.header("if-none-match", e);
    }
    req.send().await.unwrap()
}

fn text_of(m: &Manifest, id: &str) -> String {
    m.resources
        .iter()
        .find_map(|r| match r {
            Resource::File(f) if f.id.as_str() == id => match &f.content {
                FileContent::Text { text } => Some(text.clone()),
                _ => None,
            },
            _ => None,
        })
        .unwrap_or_else(|| panic!("no text file {id}"))
}

fn report(node: &str, seq: u64, phase: Phase, m: Option<&Manifest>) -> StatusReport {
    StatusReport {
        node: node.parse().unwrap(),
        seq,
        at: now(),
        phase,
        generation: m.map(|m| m.generation),
        digest: m.map(|m| m.digest),
        resources: vec![],
        services: Vec::new(),
        checks: vec![CheckRecord::compare(
            node.parse().unwrap(),
            "demo.check",
            "ok",
            "ok",
        )],
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enroll_fetch_long_poll_publish_report_fleet_view() {
    let c = Campaign::new("t1");
    let server = c.serve(&[]);
    let key = manifest_key(&c);

    let mut pg = Agent::new(PG, "127.1.1.10", "127.0.1.10", &c.ca_pem());
    let mut p1 = Agent::new(P1, "127.1.1.11", "127.0.1.11", &c.ca_pem());

    let r = pg.enroll(&server, &c.token(PG, "pg", 600)).await;
    let m = verify_manifest(
        &r.manifest,
        &key,
        &"t1".parse().unwrap(),
        &PG.parse().unwrap(),
        now(),
        None,
    )
    .unwrap();
    assert_eq!(
        text_of(&m.manifest, "file:motd"),
        "pg t1-pg-r1-01 at 127.0.1.10\n"
    );

    let r = p1.enroll(&server, &c.token(P1, "peer", 600)).await;
    let m1 = r.manifest.verify(&key).unwrap();
    assert_eq!(text_of(&m1, "file:settings"), "catchup=30\npg=127.0.1.10\n");

    // Fetch with mTLS: 200 + ETag; the same ETag with wait=0 answers 304 at once.
    let resp = fetch(&p1, &server, None, 0).await;
    assert_eq!(resp.status(), 200);
    let etag = resp.headers()["etag"].to_str().unwrap().to_owned();
    let env: SignedEnvelope<Manifest> = resp.json().await.unwrap();
    assert_eq!(env.verify(&key).unwrap().generation, m1.generation);
    assert_eq!(fetch(&p1, &server, Some(&etag), 0).await.status(), 304);

    // A long-poll is woken by a publish that changes this node's manifest.
    let poll = {
        let etag = etag.clone();
        let p1_client = p1.mtls();
        let url = server.url("/v1/manifest?wait=60");
        tokio::spawn(async move {
            let started = std::time::Instant::now();
            let resp = p1_client
                .get(url)
                .header("if-none-match", etag)
                .send()
                .await
                .unwrap();
            (resp.status(), started.elapsed(), resp.text().await.unwrap())
        })
    };
    let fleet = std::fs::read_to_string(&c.fleet).unwrap();
    std::fs::write(
        &c.fleet,
        fleet.replace("catchup_interval_secs = 30", "catchup_interval_secs = 7"),
    )
    .unwrap();
    let out = c.seeder(&["publish"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "publish: {stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains(P1) && !stdout.contains(PG),
        "only the peer changes: {stdout}"
    );
    let (status, waited, body) = poll.await.unwrap();
    assert_eq!(status, 200);
    assert!(
        waited < Duration::from_secs(30),
        "woken by the publish, not the timeout"
    );
    let env: SignedEnvelope<Manifest> = serde_json::from_str(&body).unwrap();
    let m2 = env.verify(&key).unwrap();
    assert_eq!(m2.generation, Generation(m1.generation.0 + 1));
    assert!(text_of(&m2, "file:settings").starts_with("catchup=7\n"));
    // The pg node's generation did not move.
    let pg_env: SignedEnvelope<Manifest> = fetch(&pg, &server, None, 0).await.json().await.unwrap();
    assert_eq!(pg_env.verify(&key).unwrap().generation, Generation(1));

    // A no-op publish changes nobody.
    let out = c.seeder(&["publish"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("nothing published"));

    // Reports, readiness and the fleet view.
    let pg_m = pg_env.verify(&key).unwrap();
    let ready = |client: reqwest::Client, url: String| async move {
        client
            .get(url)
            .send()
            .await
            .unwrap()
            .json::<Readiness>()
            .await
            .unwrap()
    };
    let r = ready(p1.mtls(), server.url(&format!("/v1/ready/{PG}/converged"))).await;
    assert!(!r.ready);
    let resp = pg
        .mtls()
        .post(server.url("/v1/status"))
        .json(&report(PG, 1, Phase::Converged, Some(&pg_m)))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let r = ready(p1.mtls(), server.url(&format!("/v1/ready/{PG}/converged"))).await;
    assert!(r.ready, "{r:?}");
    // A spooled resend of the same report is accepted and changes nothing.
    let resp = pg
        .mtls()
        .post(server.url("/v1/status"))
        .json(&report(PG, 1, Phase::Converged, Some(&pg_m)))
        .send()
        .await
        .unwrap();
    assert_eq!(
        resp.json::<serde_json::Value>().await.unwrap()["stored"],
        false
    );

    let out = c.seeder(&["status", "--json"]);
    let view: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let pg_row = view["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["name"] == PG)
        .unwrap();
    assert_eq!(pg_row["converged"], true);
    assert_eq!(view["enrolled"], 2);
    assert_eq!(view["all_converged"], false);

    // The operator's fleet view over HTTPS needs the operator certificate.
    let op = c.operator();
    let v: serde_json::Value = op
        .get(server.url("/v1/status"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["total"], 3);
    let resp = p1
        .mtls()
        .get(server.url("/v1/status"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 403);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_tokens_are_refused_with_their_kind_and_change_nothing() {
    let c = Campaign::new("t1");
    let server = c.serve(&["--reenroll", "refuse", "--enroll-rate-per-source", "100"]);
    let mut p1 = Agent::new(P1, "127.1.1.11", "127.0.1.11", &c.ca_pem());
    let body = EnrollRequest {
        csr_pem: p1.csr(),
        facts: p1.facts(),
    };

    let other_key = ed25519_dalek::SigningKey::from_bytes(&[7u8; 32]);
    let good = c.token(P1, "peer", 600);
    let mut flipped = good.clone().into_bytes();
    let i = flipped.len() - 5;
    flipped[i] = if flipped[i] == b'A' { b'B' } else { b'A' };
    let cases: Vec<(String, &str, &str)> = vec![
        (
            c.token_with(&other_key, "t1", P1, "peer", 600),
            "bad_token",
            "forged",
        ),
        (
            String::from_utf8(flipped).unwrap(),
            "bad_token",
            "flipped byte",
        ),
        (c.token(P1, "peer", -10), "bad_token", "expired"),
        (
            c.token_with(&c.signing_key(), "other", P1, "peer", 600),
            "bad_token",
            "other campaign",
        ),
        (
            c.token(P2, "peer", 600),
            "bad_token",
            "token for another node",
        ),
        (
            c.token(P1, "pg", 600),
            "bad_token",
            "role differs from the fleet",
        ),
        ("garbage".into(), "bad_token", "malformed"),
    ];
    for (token, kind, what) in &cases {
        let resp = p1.enroll_raw(&server, token, &body).await;
        let status = resp.status();
        let text = resp.text().await.unwrap();
        assert_eq!(status, 401, "{what}: {text}");
        assert_eq!(error_kind(&text), *kind, "{what}");
    }
    // Unknown node: the path names a node the fleet does not have.
    let resp = p1
        .anonymous()
        .post(server.url(&format!(
            "/v1/join/t1-peer-r1-09?token={}",
            c.token("t1-peer-r1-09", "peer", 600)
        )))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    assert!(resp.text().await.unwrap().contains("not in the fleet"));

    // Source address that is not the claimed public IP.
    let mut liar = Agent::new(P1, "127.1.1.99", "127.0.1.11", &c.ca_pem());
    liar.public_ip = "127.1.1.99".parse().unwrap();
    let mut lie = EnrollRequest {
        csr_pem: liar.csr(),
        facts: liar.facts(),
    };
    lie.facts.public_ipv4 = "127.1.1.11".parse().unwrap();
    let resp = liar.enroll_raw(&server, &good, &lie).await;
    assert_eq!(resp.status(), 403);
    assert_eq!(error_kind(&resp.text().await.unwrap()), "source_mismatch");

    // A CSR that is not one.
    let bad_csr = EnrollRequest {
        csr_pem: "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n"
            .into(),
        facts: p1.facts(),
    };
    let resp = p1.enroll_raw(&server, &good, &bad_csr).await;
    assert_eq!(resp.status(), 400);
    assert_eq!(error_kind(&resp.text().await.unwrap()), "bad_csr");

    // Nothing above changed state.
    let out = c.seeder(&["status", "--json"]);
    let view: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(view["enrolled"], 0, "{view}");

    // Now a good enrollment; a second one with another key is refused: with the used token
    // because it is used, with a fresh one by policy.
    p1.enroll(&server, &good).await;
    let other = Agent::new(P1, "127.1.1.11", "127.0.1.11", &c.ca_pem());
    let other_body = EnrollRequest {
        csr_pem: other.csr(),
        facts: other.facts(),
    };
    let resp = other.enroll_raw(&server, &good, &other_body).await;
    assert_eq!(resp.status(), 401);
    assert_eq!(error_kind(&resp.text().await.unwrap()), "bad_token");
    let fresh = c.token(P1, "peer", 600);
    let resp = other.enroll_raw(&server, &fresh, &other_body).await;
    assert_eq!(resp.status(), 409);
    assert_eq!(error_kind(&resp.text().await.unwrap()), "conflict");
    // The first identity still works.
    assert_eq!(fetch(&p1, &server, None, 0).await.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificates_missing_unknown_revoked_and_superseded() {
    let c = Campaign::new("t1");
    let server = c.serve(&[]);
    let mut p1 = Agent::new(P1, "127.1.1.11", "127.0.1.11", &c.ca_pem());
    p1.enroll(&server, &c.token(P1, "peer", 600)).await;

    // No client certificate on an mTLS route.
    let resp = p1
        .anonymous()
        .get(server.url("/v1/manifest"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    assert_eq!(error_kind(&resp.text().await.unwrap()), "unauthenticated");

    // A certificate from another CA is refused at the handshake.
    let rogue_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let rogue = rcgen::CertificateParams::new(vec![])
        .unwrap()
        .self_signed(&rogue_key)
        .unwrap();
    let pem = format!("{}{}", rogue_key.serialize_pem(), rogue.pem());
    let client = c.client_with(&pem);
    assert!(client.get(server.url("/v1/manifest")).send().await.is_err());

    // A CA-signed certificate the seeder never issued to a node (the operator's) is not a node.
    let op = c.operator();
    let resp = op.get(server.url("/v1/manifest")).send().await.unwrap();
    assert_eq!(resp.status(), 401);

    // A service certificate: the seeder picks the names; a CSR for foreign names gains nothing.
    let svc_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params =
        rcgen::CertificateParams::new(vec!["evil.example".into(), "10.9.9.9".into()]).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let csr = params.serialize_request(&svc_key).unwrap().pem().unwrap();
    let resp = p1
        .mtls()
        .post(server.url("/v1/certs"))
        .json(&CertRequest {
            purpose: CertificatePurpose::Server,
            csr_pem: csr,
        })
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let chain = resp.json::<CertResponse>().await.unwrap().cert_chain_pem;
    let mut sans = hiveseed_seeder::pki::cert_sans(&chain).unwrap();
    sans.sort();
    assert_eq!(sans, ["127.1.1.11", P1]);
    let (_, pem) = x509_parser::pem::parse_x509_pem(chain.as_bytes()).unwrap();
    let cert = pem.parse_x509().unwrap();
    assert_ne!(
        cert.basic_constraints().unwrap().map(|b| b.value.ca),
        Some(true)
    );

    // The old incarnation reported up to sequence 3.
    for seq in 1..=3 {
        let resp = p1
            .mtls()
            .post(server.url("/v1/status"))
            .json(&report(P1, seq, Phase::Converged, None))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
    }

    // Re-enrollment with a new key (node replacement) supersedes the old identity.
    let mut replacement = Agent::new(P1, "127.1.1.11", "127.0.1.11", &c.ca_pem());
    replacement.enroll(&server, &c.token(P1, "peer", 600)).await;
    let resp = p1
        .mtls()
        .get(server.url("/v1/manifest"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 403);
    assert_eq!(error_kind(&resp.text().await.unwrap()), "revoked");
    assert_eq!(fetch(&replacement, &server, None, 0).await.status(), 200);
    // The new disk numbers its reports from 1 again: stored, not taken for resends.
    let resp = replacement
        .mtls()
        .post(server.url("/v1/status"))
        .json(&report(P1, 1, Phase::Applying { done: 1, total: 2 }, None))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.json::<serde_json::Value>().await.unwrap()["stored"],
        true
    );

    // Operator revocation.
    let out = c.seeder(&["revoke", P1]);
    assert!(out.status.success());
    let resp = replacement
        .mtls()
        .get(server.url("/v1/manifest"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 403);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_artifacts_and_rate_limits() {
    let c = Campaign::new("t1");
    let tool = c.tmp.path().join("tool.bin");
    std::fs::write(&tool, b"#!/bin/sh\necho tool\n").unwrap();
    let out = c.seeder(&["artifact", "add", "--name", "tool", path_str(&tool)]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // An ai-memory binary that is not the pinned one is refused.
    let out = c.seeder(&["artifact", "add", "--name", "ai-memory", path_str(&tool)]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("pins.ai_memory.sha256"));

    let server = c.serve(&[]);
    let mut pg = Agent::new(PG, "127.1.1.10", "127.0.1.10", &c.ca_pem());
    let mut p1 = Agent::new(P1, "127.1.1.11", "127.0.1.11", &c.ca_pem());
    pg.enroll(&server, &c.token(PG, "pg", 600)).await;
    let r = p1.enroll(&server, &c.token(P1, "peer", 600)).await;
    let m = r.manifest.verify(&manifest_key(&c)).unwrap();
    let sha = m
        .resources
        .iter()
        .find_map(|r| match r {
            Resource::File(f) => match &f.content {
                FileContent::Artifact { sha256, .. } => Some(*sha256),
                _ => None,
            },
            _ => None,
        })
        .expect("peer manifest names the tool artifact");

    let url = server.url(&format!("/v1/artifacts/{sha}"));
    let got = p1.mtls().get(&url).send().await.unwrap();
    assert_eq!(got.status(), 200);
    assert_eq!(
        got.bytes().await.unwrap().as_ref(),
        b"#!/bin/sh\necho tool\n"
    );
    // The pg node's manifest does not name it.
    let resp = pg.mtls().get(&url).send().await.unwrap();
    assert_eq!(resp.status(), 403);
    assert_eq!(error_kind(&resp.text().await.unwrap()), "forbidden");
    let resp = p1
        .mtls()
        .get(server.url("/v1/artifacts/not-a-sha"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);

    // Malformed and oversized bodies.
    let resp = p1
        .mtls()
        .post(server.url("/v1/status"))
        .header("content-type", "application/json")
        .body("{nope")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    assert_eq!(error_kind(&resp.text().await.unwrap()), "bad_request");
    let huge = format!("{{\"csr_pem\":\"{}\"}}", "A".repeat(200 * 1024));
    let resp = p1
        .mtls()
        .post(server.url("/v1/certs"))
        .header("content-type", "application/json")
        .body(huge)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 413);
    assert_eq!(error_kind(&resp.text().await.unwrap()), "too_large");
    // A report about another node, or with an unknown field.
    let resp = p1
        .mtls()
        .post(server.url("/v1/status"))
        .json(&report(PG, 1, Phase::Converged, None))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    assert!(resp.text().await.unwrap().contains("field node"));
    let mut v = serde_json::to_value(report(P1, 1, Phase::Enrolling, None)).unwrap();
    v["admin"] = true.into();
    let resp = p1
        .mtls()
        .post(server.url("/v1/status"))
        .json(&v)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);

    // Enrollment rate limit per source: the burst is 10, then 429 with Retry-After.
    let p2 = Agent::new(P2, "127.1.1.12", "127.0.1.12", &c.ca_pem());
    let body = EnrollRequest {
        csr_pem: p2.csr(),
        facts: p2.facts(),
    };
    let mut limited = None;
    for _ in 0..30 {
        let resp = p2.enroll_raw(&server, "bad", &body).await;
        if resp.status() == 429 {
            limited = Some(resp);
            break;
        }
    }
    let resp = limited.expect("rate limited within 30 attempts");
    assert_eq!(resp.headers()["retry-after"], "2");
    assert_eq!(error_kind(&resp.text().await.unwrap()), "rate_limited");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_seeder_keeps_every_identity_and_report() {
    let c = Campaign::new("t1");
    let mut server = c.serve(&[]);
    let mut p1 = Agent::new(P1, "127.1.1.11", "127.0.1.11", &c.ca_pem());
    let r = p1.enroll(&server, &c.token(P1, "peer", 600)).await;
    let m = r.manifest.verify(&manifest_key(&c)).unwrap();
    let resp = p1
        .mtls()
        .post(server.url("/v1/status"))
        .json(&report(P1, 1, Phase::Converged, Some(&m)))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);

    // Killed mid-way (SIGKILL: no clean shutdown), restarted on the same directory.
    server.kill();
    let server = c.serve(&[]);
    // The node continues with its existing certificate: no re-enrollment.
    let resp = fetch(&p1, &server, None, 0).await;
    assert_eq!(resp.status(), 200);
    let env: SignedEnvelope<Manifest> = resp.json().await.unwrap();
    assert_eq!(
        env.verify(&manifest_key(&c)).unwrap().generation,
        m.generation,
        "no new generation on restart"
    );
    let resp = p1
        .mtls()
        .post(server.url("/v1/status"))
        .json(&report(P1, 2, Phase::Converged, Some(&m)))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let out = c.seeder(&["status", "--json"]);
    let view: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let row = view["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["name"] == P1)
        .unwrap();
    assert_eq!(row["converged"], true, "{row}");
}

const MESH_ROLE: &str = r#"
[[resource]]
kind = "file"
id = "file:mesh"
when = "mesh.released"
path = "/etc/mesh.conf"
mode = "0644"
content = { type = "text", text = "peers={% for p in peers %}{{ p.name }} {% endfor %}\nmissing={{ mesh.missing | join(',') }}\n" }
"#;

/// The mesh sections of a peer's manifest are released when every expected peer has enrolled,
/// or when the deadline after the first peer's enrollment passes; then they say who is missing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mesh_sections_wait_for_the_mesh_or_the_deadline() {
    for (deadline, released) in [("600", false), ("0", true)] {
        let c = Campaign::new("t1");
        std::fs::write(c.fleet.parent().unwrap().join("peer.toml"), MESH_ROLE).unwrap();
        let server = c.serve(&["--mesh-deadline", deadline]);
        let mut p1 = Agent::new(P1, "127.1.1.11", "127.0.1.11", &c.ca_pem());
        let r = p1.enroll(&server, &c.token(P1, "peer", 600)).await;
        let m = r.manifest.verify(&manifest_key(&c)).unwrap();
        let mesh = m.resources.iter().find(|r| r.id().as_str() == "file:mesh");
        assert_eq!(mesh.is_some(), released, "deadline {deadline}");
        if released {
            assert_eq!(text_of(&m, "file:mesh"), format!("peers=\nmissing={P2}\n"));
        }
        // The last peer enrolling releases the mesh for everyone, deadline or not.
        let mut p2 = Agent::new(P2, "127.1.1.12", "127.0.1.12", &c.ca_pem());
        p2.enroll(&server, &c.token(P2, "peer", 600)).await;
        let env: SignedEnvelope<Manifest> =
            fetch(&p1, &server, None, 0).await.json().await.unwrap();
        let m = env.verify(&manifest_key(&c)).unwrap();
        assert_eq!(text_of(&m, "file:mesh"), format!("peers={P2} \nmissing=\n"));
    }
}

// ---- zero-touch federation credentials ---------------------------------------------------------

/// This test's own loopback addresses (the lab owns 127.0.1-3.x, 127.1.x.x and 127.0.9.1).
const CRED_SEEDER_IP: &str = "127.0.71.1";

const CRED_PEER_ROLE: &str = r#"
[[resource]]
kind = "federation_key"
id = "key:federation"
fed_id = "{{ node.fed_id }}"
key_dir = "/etc/ai-memory/keys"

[[resource]]
kind = "federation_credential"
id = "credential:federation"
fed_id = "{{ node.fed_id }}"
key_dir = "/etc/ai-memory/keys"
credential_path = "/etc/ai-memory/credential"
issuer = { id = "{{ federation.issuer_id }}", trust_domain = "{{ federation.trust_domain }}", public_key = "{{ federation.ca_pub_b64 }}" }
"#;

/// The first little-endian y (from 2) that is not on the curve: a 32-byte key that is no point.
fn off_curve_key() -> [u8; 32] {
    (2u8..=255)
        .map(|i| {
            let mut b = [0u8; 32];
            b[0] = i;
            b
        })
        .find(|b| ed25519_dalek::VerifyingKey::from_bytes(b).is_err())
        .unwrap()
}

/// The state database holds signed manifests, which carry secret files: 0600, with its WAL.
#[test]
fn the_state_database_is_private() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.db");
    std::fs::write(&path, b"").unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let store = hiveseed_seeder::store::Store::open(&path).unwrap();
    store.events(1).unwrap();
    for f in ["state.db", "state.db-wal", "state.db-shm"] {
        let p = dir.path().join(f);
        if p.exists() {
            let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{f}");
        }
    }
}

fn credential_events(c: &Campaign) -> Vec<String> {
    hiveseed_seeder::store::Store::open(&c.dir.join("state.db"))
        .unwrap()
        .events(1000)
        .unwrap()
        .into_iter()
        .filter(|e| e.kind == "credential")
        .map(|e| e.message)
        .collect()
}

async fn post_credential(
    client: &reqwest::Client,
    server: &Server,
    body: &serde_json::Value,
) -> (u16, String) {
    let resp = client
        .post(server.url("/v1/credential"))
        .json(body)
        .send()
        .await
        .unwrap();
    (resp.status().as_u16(), resp.text().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_only_for_the_callers_own_identity_and_a_valid_key() {
    use base64::Engine;
    let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
    // A TTL that is neither ai-memory's 1 h nor the fleet default: it must come from the fleet.
    let fleet = fleet_toml("t1").replace(SEEDER_IP, CRED_SEEDER_IP).replace(
        "report_interval_secs = 30",
        "report_interval_secs = 30\ncredential_secs = 5400",
    );
    let c = Campaign::with("t1", &fleet, CRED_PEER_ROLE);
    let server = c.serve_on(&format!("{CRED_SEEDER_IP}:0"), &[]);
    let mut p1 = Agent::new(P1, "127.0.71.11", "127.0.71.111", &c.ca_pem());
    let mut pg = Agent::new(PG, "127.0.71.10", "127.0.71.110", &c.ca_pem());
    p1.enroll(&server, &c.token(P1, "peer", 600)).await;
    pg.enroll(&server, &c.token(PG, "pg", 600)).await;

    let fed_id = format!("t1/r1/{P1}");
    let node_key = ed25519_dalek::SigningKey::generate(&mut rand::rngs::OsRng);
    let good = serde_json::json!({
        "fed_id": fed_id,
        "subject_pubkey": b64(node_key.verifying_key().as_bytes()),
    });
    let before = now() as i64;
    let (status, body) = post_credential(&p1.mtls(), &server, &good).await;
    assert_eq!(status, 200, "{body}");
    let resp: hiveseed_proto::api::CredentialResponse = serde_json::from_str(&body).unwrap();
    // Verified by the receiver's rules under the campaign CA as `seeder init` wrote it.
    let ca: [u8; 32] = std::fs::read(c.dir.join("federation/t1-ca.pub"))
        .unwrap()
        .try_into()
        .unwrap();
    let ca = ed25519_dalek::VerifyingKey::from_bytes(&ca).unwrap();
    let claims = hiveseed_seeder::credential::verify(
        &resp.credential,
        &[("t1-ca", ca)],
        Some("t1.fleet"),
        now() as i64,
    )
    .unwrap();
    assert_eq!(claims.subject_agent_id, fed_id);
    assert_eq!(claims.subject_pubkey, node_key.verifying_key().to_bytes());
    assert_eq!(claims.not_after, resp.not_after);
    assert_eq!(
        claims.not_after - claims.not_before,
        5400 + hiveseed_seeder::credential::CLOCK_SKEW_SECS
    );
    assert!(claims.not_before + 30 >= before && claims.not_before <= now() as i64);
    let minted = credential_events(&c);
    assert_eq!(minted.len(), 1, "{minted:?}");
    assert!(minted[0].contains(&fed_id), "{minted:?}");

    // Every refusal has its kind and a message naming what is wrong; none mints anything.
    let mut wrong_len = good.clone();
    wrong_len["subject_pubkey"] = b64(&[7u8; 31]).into();
    let mut off_curve = good.clone();
    off_curve["subject_pubkey"] = b64(&off_curve_key()).into();
    let mut not_base64 = good.clone();
    not_base64["subject_pubkey"] = "!!".into();
    let mut other_id = good.clone();
    other_id["fed_id"] = format!("t1/r1/{P2}").into();
    let mut not_an_id = good.clone();
    not_an_id["fed_id"] = "t1/../etc".into();
    let mut extra = good.clone();
    extra["subject_agent_id"] = "t1/r1/someone-else".into();
    let pg_own = serde_json::json!({
        "fed_id": format!("t1/r1/{PG}"),
        "subject_pubkey": b64(node_key.verifying_key().as_bytes()),
    });
    let cases: Vec<(&str, reqwest::Client, serde_json::Value, u16, &str, &str)> = vec![
        (
            "31-byte key",
            p1.mtls(),
            wrong_len,
            400,
            "bad_request",
            "must be exactly 32 bytes",
        ),
        (
            "no curve point",
            p1.mtls(),
            off_curve,
            400,
            "bad_request",
            "is not a valid Ed25519 point",
        ),
        (
            "not base64",
            p1.mtls(),
            not_base64,
            400,
            "bad_request",
            "is not standard base64",
        ),
        (
            "missing key",
            p1.mtls(),
            serde_json::json!({"fed_id": fed_id}),
            400,
            "bad_request",
            "subject_pubkey",
        ),
        (
            "unknown field",
            p1.mtls(),
            extra,
            400,
            "bad_request",
            "subject_agent_id",
        ),
        (
            "malformed id",
            p1.mtls(),
            not_an_id,
            400,
            "bad_request",
            "federation identity",
        ),
        (
            "another node's id",
            p1.mtls(),
            other_id,
            403,
            "forbidden",
            "may not ask for a credential as t1/r1/t1-peer-r1-02",
        ),
        (
            "a role without a credential",
            pg.mtls(),
            pg_own,
            403,
            "forbidden",
            "has no federation_credential",
        ),
        (
            "no client certificate",
            p1.anonymous(),
            good.clone(),
            401,
            "unauthenticated",
            "client certificate",
        ),
        (
            "the operator",
            c.operator(),
            good.clone(),
            401,
            "unauthenticated",
            "unknown client certificate",
        ),
    ];
    for (what, client, body, want, kind, needle) in cases {
        let (status, text) = post_credential(&client, &server, &body).await;
        assert_eq!(status, want, "{what}: {text}");
        assert_eq!(error_kind(&text), kind, "{what}: {text}");
        assert!(text.contains(needle), "{what}: {text}");
    }
    let resp = p1
        .mtls()
        .post(server.url("/v1/credential"))
        .header("content-type", "application/json")
        .body("{nope")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400, "malformed JSON");
    assert_eq!(
        credential_events(&c).len(),
        1,
        "a refusal minted a credential"
    );

    // A superseded (revoked) identity gets nothing; the replacement gets its own credential.
    let old = p1.mtls();
    let mut replacement = Agent::new(P1, "127.0.71.11", "127.0.71.111", &c.ca_pem());
    replacement.enroll(&server, &c.token(P1, "peer", 600)).await;
    let (status, text) = post_credential(&old, &server, &good).await;
    assert_eq!(
        (status, error_kind(&text).as_str()),
        (403, "revoked"),
        "{text}"
    );
    assert_eq!(credential_events(&c).len(), 1);
    let (status, text) = post_credential(&replacement.mtls(), &server, &good).await;
    assert_eq!(status, 200, "{text}");
    assert_eq!(credential_events(&c).len(), 2);
}

// ---- attested writes of namespace standards ----------------------------------------------------

const ATTEST_SEEDER_IP: &str = "127.0.74.1";

const ATTEST_PEER_ROLE: &str = r#"
[[resource]]
kind = "namespace_standard"
id = "standard:campaign"
url = "https://{{ node.public_ip }}:9077"
ca_path = "/etc/ai-memory/tls/ca.pem"
cert_path = "/etc/ai-memory/tls/client.pem"
key_path = "/etc/ai-memory/tls/client.key"
api_key_file = "/etc/ai-memory/api.key"
namespace = "{{ campaign }}"
owner = { agent_id = "{{ operator_agent.id }}", public_key = "{{ operator_agent.public_key }}" }
memory = { title = "standard ({{ node.name }})", kind = "observation", content = "Forms 2 and 6 on {{ node.name }}" }
governance = { auto_atomise = true, write = "owner" }
"#;

fn attest_events(c: &Campaign) -> usize {
    hiveseed_seeder::store::Store::open(&c.dir.join("state.db"))
        .unwrap()
        .events(1000)
        .unwrap()
        .into_iter()
        .filter(|e| e.kind == "attested")
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attestation_only_for_the_standard_the_callers_manifest_names() {
    use sha2::Digest;
    let fleet = fleet_toml("t1").replace(SEEDER_IP, ATTEST_SEEDER_IP);
    let c = Campaign::with("t1", &fleet, ATTEST_PEER_ROLE);
    let server = c.serve_on(&format!("{ATTEST_SEEDER_IP}:0"), &[]);
    let mut p1 = Agent::new(P1, "127.0.74.11", "127.0.74.111", &c.ca_pem());
    let mut pg = Agent::new(PG, "127.0.74.10", "127.0.74.110", &c.ca_pem());
    p1.enroll(&server, &c.token(P1, "peer", 600)).await;
    pg.enroll(&server, &c.token(PG, "pg", 600)).await;

    let content = format!("Forms 2 and 6 on {P1}");
    let good = serde_json::json!({
        "namespace": "t1",
        "title": format!("standard ({P1})"),
        "kind": "observation",
        "content_sha256": hex::encode(sha2::Sha256::digest(content.as_bytes())),
    });
    let post = |client: reqwest::Client, body: serde_json::Value| {
        let url = server.url("/v1/attest");
        async move {
            let r = client.post(url).json(&body).send().await.unwrap();
            (r.status().as_u16(), r.text().await.unwrap())
        }
    };
    let before = now() as i64;
    let (status, body) = post(p1.mtls(), good.clone()).await;
    assert_eq!(status, 200, "{body}");
    let resp: hiveseed_proto::api::AttestResponse = serde_json::from_str(&body).unwrap();
    assert_eq!(resp.agent_id, "ai:t1-operator@t1");
    // Verifies under the operator agent's key as `seeder init` wrote it, over the envelope the
    // daemon rebuilds from the write, dated by the seeder's clock.
    let seed: [u8; 32] = std::fs::read(c.dir.join("agent-keys/ai:t1-operator@t1.priv"))
        .unwrap()
        .try_into()
        .unwrap();
    let key = ed25519_dalek::SigningKey::from_bytes(&seed);
    let envelope = hiveseed_seeder::attest::SignableWrite {
        agent_id: &resp.agent_id,
        namespace: "t1",
        title: &format!("standard ({P1})"),
        kind: "observation",
        created_at: &resp.created_at,
        content_sha256: hiveseed_seeder::attest::content_sha256(&content),
    };
    assert_eq!(resp.signature, envelope.sign_b64(&key));
    let signed_at = time::OffsetDateTime::parse(
        &resp.created_at,
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap()
    .unix_timestamp();
    assert!(signed_at >= before && signed_at <= now() as i64, "{resp:?}");
    assert_eq!(attest_events(&c), 1);

    // Anything but exactly the named memory is refused, naming what; nothing is signed.
    let with = |field: &str, value: serde_json::Value| {
        let mut b = good.clone();
        b[field] = value;
        b
    };
    let cases: Vec<(&str, reqwest::Client, serde_json::Value, u16, &str, &str)> = vec![
        (
            "other content",
            p1.mtls(),
            with("content_sha256", hex::encode([7u8; 32]).into()),
            403,
            "forbidden",
            "names no namespace standard",
        ),
        (
            "another node's title",
            p1.mtls(),
            with("title", format!("standard ({P2})").into()),
            403,
            "forbidden",
            "titled",
        ),
        (
            "other namespace",
            p1.mtls(),
            with("namespace", "global".into()),
            403,
            "forbidden",
            "standard \\\"global\\\"",
        ),
        (
            "other kind",
            p1.mtls(),
            with("kind", "claim".into()),
            403,
            "forbidden",
            "kind \\\"claim\\\"",
        ),
        (
            "a role without a standard",
            pg.mtls(),
            good.clone(),
            403,
            "forbidden",
            "names no namespace standard",
        ),
        (
            "digest not hex",
            p1.mtls(),
            with("content_sha256", "zz".into()),
            400,
            "bad_request",
            "content_sha256",
        ),
        (
            "unknown field",
            p1.mtls(),
            with("agent_id", "ai:someone@t1".into()),
            400,
            "bad_request",
            "agent_id",
        ),
        (
            "no client certificate",
            p1.anonymous(),
            good.clone(),
            401,
            "unauthenticated",
            "client certificate",
        ),
        (
            "the operator",
            c.operator(),
            good.clone(),
            401,
            "unauthenticated",
            "unknown client certificate",
        ),
    ];
    for (what, client, body, want, kind, needle) in cases {
        let (status, text) = post(client, body).await;
        assert_eq!(status, want, "{what}: {text}");
        assert_eq!(error_kind(&text), kind, "{what}: {text}");
        assert!(text.contains(needle), "{what}: {text}");
    }
    assert_eq!(attest_events(&c), 1, "a refusal signed something");
}
