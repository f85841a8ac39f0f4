#![allow(clippy::unwrap_used)]
//! The operator's LLM/embedding key (`secrets/llm-api-key`) through the real `seeder` binary:
//! `publish` refuses a missing, empty, loose or malformed key file, naming the file and never
//! printing the key; a fleet that needs no key publishes without one; with the key in place, an
//! enrolled peer's manifest carries it in exactly one place, the secret file its role names.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;

use common::*;
use hiveseed_proto::manifest::FileContent;
use hiveseed_proto::{Manifest, Resource};

/// A fake key with the shape of an OpenRouter key; distinctive, so a leak is found by substring.
const KEY: &str = "sk-or-v1-FakeOperatorKey-5e1f0c2a9b8d7e6f5a4b3c2d1e0f9a8b7c6d5e4f3a2b1c0d";

const PG: &str = "k1-pg-r1-01";
const P1: &str = "k1-peer-r1-01";

/// A peer role that delivers the key the way roles/peer.toml does: a `NAME=value` line of a 0400
/// secret file, and the variable's name (only) in a readable config.
const PEER_ROLE_WITH_KEY: &str = r#"
[[resource]]
kind = "file"
id = "file:env"
path = "/etc/peer.env"
mode = "0400"
secret = true
content = { type = "text", text = "{{ fleet.llm_key_env }}={{ secrets.llm_api_key }}\n" }

[[resource]]
kind = "file"
id = "file:config"
path = "/etc/peer.toml"
mode = "0644"
content = { type = "text", text = "[embeddings]\nbackend = \"{{ fleet.embedder.kind }}\"\napi_key_env = \"{{ fleet.llm_key_env }}\"\n" }
"#;

fn openrouter_fleet(campaign: &str) -> String {
    format!(
        "{}\n[embedder]\nkind = \"openrouter\"\n",
        fleet_toml(campaign)
    )
}

fn key_path(c: &Campaign) -> PathBuf {
    c.dir.join("secrets/llm-api-key")
}

fn put_key(c: &Campaign, bytes: &[u8], mode: u32) {
    let path = key_path(c);
    std::fs::write(&path, bytes).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
}

#[test]
fn publish_refuses_a_missing_empty_or_loose_key_and_never_prints_it() {
    let c = Campaign::with("k1", &openrouter_fleet("k1"), PEER_ROLE);
    let shown = key_path(&c).display().to_string();

    let refused = |why: &str| -> String {
        let (ok, out) = c.publish();
        assert!(!ok, "{why}: publish succeeded: {out}");
        assert!(
            out.contains(&shown),
            "{why}: the error does not name {shown}: {out}"
        );
        assert!(
            !out.contains("FakeOperatorKey"),
            "{why}: the key leaked: {out}"
        );
        out
    };
    let out = refused("missing");
    assert!(out.contains("operator's API key"), "{out}");
    put_key(&c, b"", 0o600);
    assert!(refused("empty").contains("is empty"));
    put_key(&c, KEY.as_bytes(), 0o644);
    assert!(refused("0644").contains("0644"));
    put_key(&c, KEY.as_bytes(), 0o640);
    assert!(refused("0640").contains("0640"));
    put_key(
        &c,
        format!("{KEY}\nAI_MEMORY_FED_REQUIRE_SIG=0\n").as_bytes(),
        0o600,
    );
    refused("two lines");

    for mode in [0o600, 0o400] {
        put_key(&c, format!("{KEY}\n").as_bytes(), mode);
        let (ok, out) = c.publish();
        assert!(ok, "{mode:o}: {out}");
        assert!(!out.contains("FakeOperatorKey"), "{out}");
        std::fs::remove_file(key_path(&c)).unwrap();
    }
}

/// `[agent_llm]` needs the agents' key (`secrets/agent-llm-api-key`) by the same rules: publish
/// refuses a missing or loose file naming it, never the key; `init` says where it goes.
#[test]
fn the_agents_key_is_refused_and_named_like_the_peers() {
    const AGENT_KEY: &str = "xai-FakeAgentKey-0a1b2c3d4e5f60718293a4b5c6d7e8f9";
    let fleet = format!("{}\n[agent_llm]\n", fleet_toml("k2"));
    let c = Campaign::with("k2", &fleet, PEER_ROLE);
    let path = c.dir.join("secrets/agent-llm-api-key");
    let shown = path.display().to_string();
    let out = c.seeder(&["init", "--fleet", c.fleet.to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains(&format!("missing {shown}")), "{stdout}");
    assert!(stdout.contains("XAI_API_KEY"), "{stdout}");

    let (ok, out) = c.publish();
    assert!(
        !ok && out.contains(&shown) && out.contains("[agent_llm]"),
        "{out}"
    );
    std::fs::write(&path, format!("{AGENT_KEY}\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (ok, out) = c.publish();
    assert!(!ok && out.contains(&shown) && out.contains("0644"), "{out}");
    assert!(!out.contains("FakeAgentKey"), "the key leaked: {out}");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    let (ok, out) = c.publish();
    assert!(ok, "{out}");
    assert!(!out.contains("FakeAgentKey"), "{out}");
}

/// `seeder init` says where the key goes when the fleet needs one, and only then.
#[test]
fn init_names_the_missing_key_file_only_when_the_fleet_needs_it() {
    for (fleet, needs) in [(openrouter_fleet("k1"), true), (fleet_toml("k1"), false)] {
        let c = Campaign::with("k1", &fleet, PEER_ROLE);
        let out = c.seeder(&["init", "--fleet", c.fleet.to_str().unwrap()]);
        assert!(out.status.success());
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(
            stdout.contains(&format!("missing {}", key_path(&c).display())),
            needs,
            "{stdout}"
        );
        assert!(
            !key_path(&c).exists(),
            "init never makes the operator's key"
        );
        // Without a key need, publish works with no key file at all.
        if !needs {
            let (ok, out) = c.publish();
            assert!(ok, "{out}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_enrolled_peer_gets_the_key_only_in_its_secret_file() {
    let c = Campaign::with("k1", &openrouter_fleet("k1"), PEER_ROLE_WITH_KEY);
    put_key(&c, format!("{KEY}\n").as_bytes(), 0o600);
    let server = c.serve(&[]);
    let mut pg = Agent::new(PG, "127.1.2.10", "127.0.2.10", &c.ca_pem());
    let mut p1 = Agent::new(P1, "127.1.2.11", "127.0.2.11", &c.ca_pem());
    pg.enroll(&server, &c.token(PG, "pg", 600)).await;
    let r = p1.enroll(&server, &c.token(P1, "peer", 600)).await;
    let m: Manifest = r.manifest.verify(&c.signing_key().verifying_key()).unwrap();

    let carriers: Vec<&str> = m
        .resources
        .iter()
        .filter(|r| serde_json::to_string(r).unwrap().contains(KEY))
        .map(|r| r.id().as_str())
        .collect();
    assert_eq!(carriers, ["file:env"]);
    let Some(Resource::File(env)) = m.resources.iter().find(|r| r.id().as_str() == "file:env")
    else {
        panic!("no file:env")
    };
    assert!(env.secret);
    assert_eq!(env.mode.to_string(), "0400");
    assert!(
        matches!(&env.content, FileContent::Text { text } if text == &format!("OPENROUTER_API_KEY={KEY}\n"))
    );
    let Some(Resource::File(config)) = m
        .resources
        .iter()
        .find(|r| r.id().as_str() == "file:config")
    else {
        panic!("no file:config")
    };
    assert!(
        matches!(&config.content, FileContent::Text { text } if text.contains("api_key_env = \"OPENROUTER_API_KEY\""))
    );
    // The whole manifest: the key once, inside that file.
    assert_eq!(serde_json::to_string(&m).unwrap().matches(KEY).count(), 1);

    // A loosened key file stops rendering, and the refusal names the file, not the key.
    std::fs::set_permissions(key_path(&c), std::fs::Permissions::from_mode(0o644)).unwrap();
    let fleet = std::fs::read_to_string(&c.fleet).unwrap();
    std::fs::write(
        &c.fleet,
        fleet.replace("catchup_interval_secs = 30", "catchup_interval_secs = 31"),
    )
    .unwrap();
    let (ok, out) = c.publish();
    assert!(
        !ok && out.contains("0644") && !out.contains("FakeOperatorKey"),
        "{out}"
    );
}
