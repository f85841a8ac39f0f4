//! The reference hive's role data (`roles/*.toml` + `roles/templates/`), rendered by the real
//! renderer with fixed facts: every rendered file, unit and command against golden files, the
//! content that matters checked against the reference spec explicitly, and the properties the
//! seeder relies on (deterministic, scoped re-rendering, validation of both fleet files).
//!
//! Regenerate the golden files with `HIVESEED_UPDATE_GOLDEN=1 cargo test -p hiveseed-seeder --test
//! roles_golden` and review the diff.

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use hiveseed_proto::manifest::{
    CertificatePurpose, FileContent, Match, Probe, Resource, VersionPin, WaitTarget,
    MANIFEST_VERSION,
};
use hiveseed_proto::{Generation, Manifest, Sha256};
use hiveseed_seeder::fleet::fixtures::with_store;
use hiveseed_seeder::fleet::{Fleet, NodeSpec};
use hiveseed_seeder::render::{
    read_role_tree, AllowEntry, ArtifactView, FleetFacts, OperatorAgent, Renderer, RoleTree,
};
use hiveseed_seeder::state::validate_roles;
use hiveseed_seeder::store::Enrollment;

/// Fleet secrets of the fixture: distinctive, so a leak is found by substring.
const PG_PASSWORD: &str = "GoldenPgPassw0rdGoldenPgPassw0rdGoldenPgPassw0rd";
const API_KEY: &str = "a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f90";
/// The operator's LLM/embedding key of the fixture (fake; the shape of an OpenRouter key).
const LLM_KEY: &str = "sk-or-v1-GoldenFakeLlmKey-0f1e2d3c4b5a69788796a5b4c3d2e1f0-0f1e2d3c4b5a6978";
/// The agents' key of the fixture (`secrets/agent-llm-api-key`).
const AGENT_LLM_KEY: &str = "xai-GoldenFakeAgentKey-a1b2c3d4e5f60718293a4b5c6d7e8f90";
/// The fixture's pin of ollama-linux-amd64.tgz (fake: nothing here downloads the release).
const OLLAMA_SHA256: &str = "5a0e7ab1c2d3e4f5061728394a5b6c7d8e9fa0b1c2d3e4f5061728394a5b6c7d";

/// The fixture's federation CA seed (the campaign's `federation/do-1461-ca.priv`).
const FEDERATION_CA_SEED: [u8; 32] = [0x42; 32];

const PG_NODE: &str = "do-1461-pg-nyc3-01";
const PEER_NODE: &str = "do-1461-peer-nyc3-01";

fn roles_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../roles")
}

fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden")
}

fn fleet_text(file: &str) -> String {
    std::fs::read_to_string(roles_dir().join(file)).unwrap()
}

fn roles() -> RoleTree {
    read_role_tree(&roles_dir()).unwrap()
}

/// Addresses the way the seed's Terraform lays them out: a /16 per region in sorted order
/// (fra1 10.10, nyc3 10.11, sgp1 10.12); public addresses from TEST-NET-3.
fn enrollment(fleet: &Fleet, position: usize, n: &NodeSpec) -> Enrollment {
    let region = fleet.regions.keys().position(|r| r == &n.region).unwrap() as u8;
    let host = match n.role.as_str() {
        "pg" => 5,
        "peer" => 10,
        "agent" => 20,
        _ => 30,
    } + n.index as u8;
    Enrollment {
        node: n.name.clone(),
        droplet_id: 1000 + position as u64,
        public_ip: Ipv4Addr::new(203, 0, 113, 10 + position as u8),
        private_ip: Ipv4Addr::new(10, 10 + region, 0, host),
        identity_fpr: "i".into(),
        key_fpr: "k".into(),
        token_nonce: "n".into(),
        enrolled_at: 0,
    }
}

fn artifact(sha256: &str, size: u64) -> ArtifactView {
    ArtifactView {
        sha256: sha256.into(),
        size,
    }
}

/// Every node enrolled, every non-pg node with a mesh client certificate, the operator, the
/// pinned binary, the MiniLM files (digests as the lab cache has them) and the pinned Ollama
/// release, mesh released; the operator's key only when the fleet needs one, as the seeder does.
fn facts(fleet: &Fleet) -> FleetFacts {
    let enrollments = fleet
        .nodes
        .iter()
        .enumerate()
        .map(|(i, n)| (n.name.clone(), enrollment(fleet, i, n)))
        .collect();
    let mut allowlist: Vec<AllowEntry> = fleet
        .nodes
        .iter()
        .filter(|n| n.role.as_str() != "pg")
        .map(|n| AllowEntry {
            fpr: Sha256::digest(n.name.as_str().as_bytes()).to_hex(),
            node: n.name.to_string(),
            role: n.role.to_string(),
        })
        .collect();
    allowlist.push(AllowEntry {
        fpr: Sha256::digest(b"operator").to_hex(),
        node: format!("{}-operator", fleet.campaign),
        role: "ctrl".into(),
    });
    FleetFacts {
        enrollments,
        allowlist,
        secrets: [
            ("pg_password".to_string(), PG_PASSWORD.to_string()),
            ("api_key".to_string(), API_KEY.to_string()),
        ]
        .into_iter()
        .chain(
            fleet
                .llm_key_env()
                .map(|_| ("llm_api_key".to_string(), LLM_KEY.to_string())),
        )
        .chain(
            fleet
                .agent_llm_key_env()
                .map(|_| ("agent_llm_api_key".to_string(), AGENT_LLM_KEY.to_string())),
        )
        .collect(),
        artifacts: [
            (
                "ai-memory".to_string(),
                artifact(&fleet.pins.ai_memory.sha256.to_hex(), 32_971_680),
            ),
            (
                "minilm-config".to_string(),
                artifact(
                    "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41",
                    612,
                ),
            ),
            (
                "minilm-tokenizer".to_string(),
                artifact(
                    "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
                    466_247,
                ),
            ),
            (
                "minilm-model".to_string(),
                artifact(
                    "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
                    90_868_376,
                ),
            ),
            ("ollama".to_string(), artifact(OLLAMA_SHA256, 1_211_000_000)),
        ]
        .into(),
        federation: federation_issuer(fleet).public().clone(),
        operator_agent: OperatorAgent::new(
            &fleet.campaign,
            &ed25519_dalek::SigningKey::from_bytes(&[9; 32]),
        ),
        mesh_released: true,
        placeholder_artifacts: false,
    }
}

fn federation_issuer(fleet: &Fleet) -> hiveseed_seeder::credential::Issuer {
    hiveseed_seeder::credential::Issuer::new(
        ed25519_dalek::SigningKey::from_bytes(&FEDERATION_CA_SEED),
        &fleet.campaign,
    )
}

fn render_with(fleet: &Fleet, roles: &RoleTree, facts: &FleetFacts, node: &str) -> Vec<Resource> {
    let spec = fleet.node(&node.parse().unwrap()).unwrap();
    Renderer::new(fleet, roles)
        .resources(spec, facts)
        .unwrap_or_else(|e| panic!("rendering {node}: {e}"))
        .expect("the node is enrolled")
}

/// Every node of a fleet file rendered with the fixture facts.
fn render_all(text: &str) -> (Fleet, BTreeMap<String, Vec<Resource>>) {
    let fleet = Fleet::parse(text).unwrap();
    let roles = roles();
    let facts = facts(&fleet);
    let r = Renderer::new(&fleet, &roles);
    let out = fleet
        .nodes
        .iter()
        .map(|n| {
            let res = r
                .resources(n, &facts)
                .unwrap_or_else(|e| panic!("rendering {}: {e}", n.name))
                .unwrap();
            (n.name.to_string(), res)
        })
        .collect();
    (fleet, out)
}

fn reference() -> (Fleet, BTreeMap<String, Vec<Resource>>) {
    render_all(&fleet_text("fleet.example.toml"))
}

/// Where the reference fleet's embedder/LLM choice starts (everything after is that choice).
const CHOICE_MARKER: &str = "\n# The seed's embedder and LLM";

/// The reference fleet with `choice` in place of the seed's `[embedder]`/`[llm]`/`[reranker]`.
fn reference_with(choice: &str) -> String {
    let text = fleet_text("fleet.example.toml");
    let at = text
        .find(CHOICE_MARKER)
        .expect("fleet.example.toml ends with its embedder choice");
    format!("{}\n{choice}", &text[..at])
}

/// No `[embedder]` at all: the default, the local MiniLM model.
fn local_choice() -> String {
    reference_with("")
}

fn ollama_choice() -> String {
    reference_with(&format!(
        "[embedder]\nkind = \"ollama\"\nversion = \"0.6.8\"\nsha256 = \"{OLLAMA_SHA256}\"\n"
    ))
}

/// The Ollama embedder with the seed's LLM: the key is needed for the LLM alone.
fn ollama_llm_choice() -> String {
    reference_with(&format!(
        "[embedder]\nkind = \"ollama\"\nversion = \"0.6.8\"\nsha256 = \"{OLLAMA_SHA256}\"\n\n[llm]\n"
    ))
}

/// The reference fleet with every region in one store layout.
fn reference_with_layout(layout: &str) -> (Fleet, BTreeMap<String, Vec<Resource>>) {
    let (fleet, nodes) = render_all(&with_store(&fleet_text("fleet.example.toml"), Some(layout)));
    for l in fleet.store_layouts.values() {
        assert_eq!(l.to_string(), layout);
    }
    (fleet, nodes)
}

fn find<'a>(res: &'a [Resource], id: &str) -> &'a Resource {
    res.iter()
        .find(|r| r.id().as_str() == id)
        .unwrap_or_else(|| panic!("no resource {id}"))
}

fn text_of<'a>(res: &'a [Resource], id: &str) -> &'a str {
    match find(res, id) {
        Resource::File(f) => match &f.content {
            FileContent::Text { text } => text,
            FileContent::Artifact { .. } => panic!("{id} is an artifact"),
            FileContent::Base64 { .. } => panic!("{id} is binary"),
        },
        Resource::Service(s) => &s.unit_text,
        other => panic!("{id} is a {}", other.kind()),
    }
}

// ---- golden files ------------------------------------------------------------------------------

/// A reviewable rendering of one resource: its JSON without the long texts, then each text.
fn describe(r: &Resource) -> String {
    let mut v = serde_json::to_value(r).unwrap();
    let mut texts = Vec::new();
    let map = v.as_object_mut().unwrap();
    for key in ["unit_text", "stdin"] {
        if let Some(serde_json::Value::String(s)) = map.get(key).cloned() {
            map.insert(key.into(), format!("<{} bytes, below>", s.len()).into());
            texts.push((key.to_string(), s));
        }
    }
    if let Some(content) = map.get_mut("content").and_then(|c| c.as_object_mut()) {
        if let Some(serde_json::Value::String(s)) = content.get("text").cloned() {
            content.insert("text".into(), format!("<{} bytes, below>", s.len()).into());
            texts.push(("content".into(), s));
        }
    }
    let mut out = format!("# {} {}\n", r.kind(), r.id());
    out.push_str(&serde_json::to_string_pretty(&v).unwrap());
    out.push('\n');
    for (key, text) in texts {
        out.push_str(&format!("----- {key} -----\n{text}"));
        if !text.ends_with('\n') {
            out.push_str("\n(no newline at end)\n");
        }
    }
    out
}

fn golden_name(id: &str) -> String {
    let safe: String = id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("{safe}.txt")
}

/// Expected files of one node's golden directory: `index.txt` (order) + one file per resource.
fn golden_files(res: &[Resource]) -> BTreeMap<String, String> {
    let mut files = BTreeMap::new();
    let mut index = String::new();
    for r in res {
        let name = golden_name(r.id().as_str());
        index.push_str(&format!("{} {} -> {name}\n", r.kind(), r.id()));
        assert!(
            files.insert(name.clone(), describe(r)).is_none(),
            "two resources map to {name}"
        );
    }
    files.insert("index.txt".into(), index);
    files
}

fn first_difference(want: &str, got: &str) -> String {
    for (i, (w, g)) in want.lines().zip(got.lines()).enumerate() {
        if w != g {
            return format!("line {}:\n  golden:   {w}\n  rendered: {g}", i + 1);
        }
    }
    format!(
        "golden has {} lines, rendered {}",
        want.lines().count(),
        got.lines().count()
    )
}

/// `dir`: the node's golden directory, relative to `tests/golden`.
fn check_golden(dir: &str, res: &[Resource]) {
    let node = dir;
    let dir = golden_dir().join(dir);
    let want = golden_files(res);
    hiveseed_test_deps::refuse_under_ci(&hiveseed_test_deps::ProcessEnv, "HIVESEED_UPDATE_GOLDEN")
        .unwrap_or_else(|e| panic!("{e}"));
    if std::env::var_os("HIVESEED_UPDATE_GOLDEN").is_some() {
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        for (name, text) in &want {
            std::fs::write(dir.join(name), text).unwrap();
        }
        return;
    }
    let mut problems = Vec::new();
    let on_disk: BTreeSet<String> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| {
            panic!(
                "{}: {e} (HIVESEED_UPDATE_GOLDEN=1 writes it)",
                dir.display()
            )
        })
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    for extra in on_disk.iter().filter(|n| !want.contains_key(*n)) {
        problems.push(format!(
            "{extra}: golden file of a resource no longer rendered"
        ));
    }
    for (name, text) in &want {
        match std::fs::read_to_string(dir.join(name)) {
            Err(_) => problems.push(format!("{name}: rendered, but no golden file")),
            Ok(golden) if golden != *text => {
                problems.push(format!("{name}: {}", first_difference(&golden, text)))
            }
            Ok(_) => {}
        }
    }
    assert!(
        problems.is_empty(),
        "{node} differs from {} (HIVESEED_UPDATE_GOLDEN=1 regenerates):\n{}",
        dir.display(),
        problems.join("\n")
    );
}

/// The reference fleet (a database per peer) in `golden/<node>`, the seed's layout (a schema per
/// peer) in `golden/schema-layout/<node>`.
#[test]
fn reference_pg_and_peer_match_the_golden_files() {
    let (_, nodes) = reference();
    for node in [PG_NODE, PEER_NODE] {
        check_golden(node, &nodes[node]);
    }
    let (_, nodes) = reference_with_layout("schema");
    for node in [PG_NODE, PEER_NODE] {
        check_golden(&format!("schema-layout/{node}"), &nodes[node]);
    }
}

/// The peer of the reference fleet with the other two embedders, as golden files too.
#[test]
fn embedder_variants_match_their_golden_files() {
    for (suffix, text) in [("local", local_choice()), ("ollama", ollama_choice())] {
        let (_, nodes) = render_all(&text);
        check_golden(&format!("{PEER_NODE}+{suffix}"), &nodes[PEER_NODE]);
    }
}

// ---- the pg role against the spec --------------------------------------------------------------

#[test]
fn pg_node_is_the_spec_cluster_hostssl_only() {
    let (fleet, nodes) = reference();
    let res = &nodes[PG_NODE];
    let facts = facts(&fleet);
    let me = &facts.enrollments[&PG_NODE.parse().unwrap()];

    // Packages: pinned per fleet.pins.postgres, from pgdg for pgdg_suite.
    let Resource::Package(p) = find(res, "package:postgresql") else {
        panic!()
    };
    let pins: Vec<(&str, &VersionPin)> = p
        .packages
        .iter()
        .map(|x| (x.name.as_str(), &x.version))
        .collect();
    assert_eq!(
        pins,
        [
            ("postgresql-18", &fleet.pins.postgres.server),
            ("postgresql-18-pgvector", &fleet.pins.postgres.pgvector),
            ("postgresql-18-age", &fleet.pins.postgres.age),
        ]
    );
    let source = p.source.as_ref().expect("pgdg source");
    assert_eq!(
        (source.name.as_str(), source.suite.as_str()),
        ("pgdg", "noble-pgdg")
    );
    assert!(source.uri.starts_with("http://apt.postgresql.org/"));
    assert!(!source.keyring_b64.is_empty());

    // No packaged cluster, and the drop-in is in place before the packages.
    let ids: Vec<&str> = res.iter().map(|r| r.id().as_str()).collect();
    let pos = |id: &str| ids.iter().position(|x| *x == id).unwrap();
    assert!(text_of(res, "file:createcluster-dropin").contains("create_main_cluster = false"));
    assert!(pos("file:createcluster-dropin") < pos("package:postgresql"));

    // initdb once, with checksums, outside /etc/postgresql (postgresql-common's registry).
    let Resource::Command(initdb) = find(res, "cmd:initdb") else {
        panic!()
    };
    assert!(initdb.argv.contains(&"--data-checksums".to_string()));
    assert_eq!(
        initdb.creates.as_ref().unwrap().as_str(),
        "/var/lib/postgresql/hiveseed/18/PG_VERSION"
    );
    assert_eq!(initdb.user.as_deref(), Some("postgres"));
    for r in res {
        let json = serde_json::to_string(r).unwrap();
        assert!(
            !json.contains("/etc/postgresql/"),
            "{} touches postgresql-common's cluster registry",
            r.id()
        );
    }
    // Data files come after initdb (which needs an empty directory), the unit after them.
    assert!(pos("cmd:initdb") < pos("file:postgresql.conf"));
    assert!(pos("cert:pg-server") < pos("service:postgresql"));
    assert!(pos("file:pg_hba.conf") < pos("service:postgresql"));

    let Resource::Certificate(c) = find(res, "cert:pg-server") else {
        panic!()
    };
    assert_eq!(c.purpose, CertificatePurpose::PgServer);
    assert_eq!(c.key_mode.to_string(), "0600");
    assert_eq!(c.owner.as_ref().unwrap().owner, "postgres");

    // postgresql.conf: the seed's ALTER SYSTEM list.
    let conf = text_of(res, "file:postgresql.conf");
    for line in [
        format!("listen_addresses = 'localhost,{}'", me.private_ip),
        "port = 5432".into(),
        "unix_socket_directories = '/var/run/postgresql'".into(),
        "ssl = on".into(),
        "ssl_cert_file = '/var/lib/postgresql/hiveseed/tls/server.pem'".into(),
        "ssl_key_file = '/var/lib/postgresql/hiveseed/tls/server.key'".into(),
        "shared_preload_libraries = 'age'".into(),
        "password_encryption = 'scram-sha-256'".into(),
    ] {
        assert!(
            conf.lines().any(|l| l == line),
            "postgresql.conf lacks {line:?}"
        );
    }
    assert!(!conf.contains(&me.public_ip.to_string()));

    // pg_hba: hostssl + scram for exactly the region's peers, local peer auth for postgres only.
    let hba = text_of(res, "file:pg_hba.conf");
    let rules: Vec<Vec<&str>> = hba
        .lines()
        .map(|l| {
            l.split('#')
                .next()
                .unwrap()
                .split_whitespace()
                .collect::<Vec<_>>()
        })
        .filter(|f| !f.is_empty())
        .collect();
    assert_eq!(
        rules[0],
        ["local", "all", "postgres", "peer", "map=hiveseed"]
    );
    // Each peer to its own store's database (the layout tests say which that is).
    let mut region_peers: Vec<(String, String)> = fleet
        .nodes_with_role("peer")
        .filter(|n| n.region.as_str() == "nyc3")
        .map(|n| {
            (
                fleet.peer_store(n).unwrap().database,
                format!("{}/32", facts.enrollments[&n.name].private_ip),
            )
        })
        .collect();
    region_peers.sort();
    let mut hostssl: Vec<(String, String)> = Vec::new();
    for r in &rules[1..] {
        assert_eq!(r[0], "hostssl", "only hostssl over TCP: {r:?}");
        assert_eq!(r[2], "ai_memory");
        assert_eq!(r[4], "scram-sha-256");
        hostssl.push((r[1].to_string(), r[3].to_string()));
    }
    hostssl.sort();
    assert_eq!(hostssl, region_peers);
    assert!(!hba.contains("0.0.0.0") && !hba.contains("::/0") && !hba.contains("trust"));
    assert!(!hba.lines().any(|l| l.starts_with("host ")));
    let ident = text_of(res, "file:pg_ident.conf");
    assert!(ident
        .lines()
        .any(|l| l.split_whitespace().eq(["hiveseed", "root", "postgres"])));

    // The unit runs the postgres binary itself, fast shutdown, restarted on failure.
    let unit = text_of(res, "service:postgresql");
    for line in [
        "Type=simple",
        "User=postgres",
        "ExecStart=/usr/lib/postgresql/18/bin/postgres -D /var/lib/postgresql/hiveseed/18",
        "KillSignal=SIGINT",
        "Restart=on-failure",
    ] {
        assert!(unit.lines().any(|l| l == line), "unit lacks {line}");
    }
    let Resource::Service(s) = find(res, "service:postgresql") else {
        panic!()
    };
    assert_eq!(s.unit, "hiveseed-postgresql.service");
    assert!(s
        .notify
        .iter()
        .any(|n| n.as_str() == "file:postgresql.conf"));

    // SQL: after the server listens; the password on stdin only (the stores: see the layout tests).
    assert!(pos("wait:pg-listening") < pos("cmd:sql-role"));
    let Resource::Wait(w) = find(res, "wait:pg-listening") else {
        panic!()
    };
    assert!(
        matches!(&w.target, WaitTarget::Tcp { host, port: 5432 } if host == &me.private_ip.to_string())
    );
    let Resource::Command(role) = find(res, "cmd:sql-role") else {
        panic!()
    };
    assert!(role.argv.ends_with(&["-f".to_string(), "-".to_string()]));
    assert!(role.argv.contains(&"ON_ERROR_STOP=1".to_string()));
    let stdin = role.stdin.as_deref().unwrap();
    assert!(stdin.contains(&format!("LOGIN PASSWORD $hs${PG_PASSWORD}$hs$;")));
    assert!(
        !stdin.contains("DO $$"),
        "a `$$` in the password would end the block"
    );
    assert!(stdin.contains("\\gexec"));
    let Resource::Command(sql) = find(res, "cmd:sql-init") else {
        panic!()
    };
    assert!(sql
        .refresh_on
        .iter()
        .any(|r| r.as_str() == "file:init-age.sql"));
    assert!(pos("cmd:sql-role") < pos("cmd:sql-init"));
    assert!(pos("file:init-ready.sql") < pos("cmd:sql-init"));

    // Checks: §7 names, expected values from the pins.
    let checks = checks_of(res);
    assert_eq!(checks["store.pg_version"].0, "18.4");
    assert_eq!(checks["store.age_version"].0, "1.7.0");
    assert_eq!(checks["store.pgvector_version"].0, "0.8.6");
    assert_eq!(checks["store.age_graph"].0, "1");
    assert_eq!(checks["daemon_pg.tls"].0, "encrypted (>=1 ssl, 0 plain)");
    // Cluster-wide facts from the postgres database, which exists in either layout.
    for name in [
        "store.pg_version",
        "daemon_pg.tls",
        "daemon_pg.tls_version",
        "store.hba_hostssl_only",
        "store.data_checksums",
    ] {
        assert!(
            matches!(&checks[name].1, Probe::Sql { user, dbname, .. } if user == "postgres" && dbname == "postgres"),
            "{name}"
        );
    }
    let Probe::Sql { query, .. } = &checks["daemon_pg.tls"].1 else {
        panic!()
    };
    assert!(query.contains("pg_stat_ssl"));
}

fn checks_of(res: &[Resource]) -> BTreeMap<String, (String, Probe)> {
    res.iter()
        .filter_map(|r| match r {
            Resource::Check(c) => Some((c.check.clone(), (c.expected.clone(), c.probe.clone()))),
            _ => None,
        })
        .collect()
}

// ---- the peer role against the spec ------------------------------------------------------------

/// `ExecStart=` of a unit: continuation lines joined, split into words (the roles quote nothing).
fn exec_start(unit: &str) -> Vec<String> {
    let joined = unit.replace("\\\n", " ");
    let line = joined
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .expect("ExecStart=");
    line.split_whitespace().map(str::to_owned).collect()
}

fn flags(argv: &[String]) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut it = argv.iter().skip(2).peekable();
    while let Some(flag) = it.next() {
        assert!(flag.starts_with("--"), "{flag} is not a flag");
        let value = match it.peek() {
            Some(v) if !v.starts_with("--") => it.next().unwrap().clone(),
            _ => String::new(),
        };
        assert!(out.insert(flag.clone(), value).is_none(), "{flag} twice");
    }
    out
}

#[test]
fn peer_node_serves_with_the_spec_flags() {
    let (fleet, nodes) = reference();
    let res = &nodes[PEER_NODE];
    let facts = facts(&fleet);
    let me = &facts.enrollments[&PEER_NODE.parse().unwrap()];
    let pg = &facts.enrollments[&PG_NODE.parse().unwrap()];

    let unit = text_of(res, "service:ai-memory");
    let argv = exec_start(unit);
    assert_eq!(&argv[..2], ["/usr/local/bin/ai-memory", "serve"]);
    let others: Vec<String> = fleet
        .nodes_with_role("peer")
        .filter(|n| n.name.as_str() != PEER_NODE)
        .map(|n| format!("https://{}:9077", facts.enrollments[&n.name].public_ip))
        .collect();
    assert_eq!(others.len(), 8);
    let want: BTreeMap<String, String> = [
        ("--host", me.public_ip.to_string()),
        ("--port", "9077".into()),
        ("--store-url", "${AI_MEMORY_STORE_URL}".into()),
        ("--tls-cert", "/etc/ai-memory/tls/server.pem".into()),
        ("--tls-key", "/etc/ai-memory/tls/server.key".into()),
        (
            "--mtls-allowlist",
            "/etc/ai-memory/tls/mtls-allowlist.txt".into(),
        ),
        ("--quorum-writes", "2".into()),
        ("--quorum-peers", others.join(",")),
        (
            "--quorum-client-cert",
            "/etc/ai-memory/tls/client.pem".into(),
        ),
        (
            "--quorum-client-key",
            "/etc/ai-memory/tls/client.key".into(),
        ),
        ("--quorum-ca-cert", "/etc/ai-memory/tls/ca.pem".into()),
        ("--quorum-timeout-ms", "8000".into()),
        ("--catchup-interval-secs", "30".into()),
        (
            "--federation-identity",
            "do-1461/nyc3/do-1461-peer-nyc3-01".into(),
        ),
        ("--shutdown-grace-secs", "30".into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    assert_eq!(flags(&argv), want);
    assert!(!unit.contains("0.0.0.0"));
    for line in [
        "Type=simple",
        "User=ai-memory",
        "Environment=HOME=/var/lib/ai-memory",
        "EnvironmentFile=/etc/ai-memory/ai-memory.env",
        "WorkingDirectory=/var/lib/ai-memory",
        "KillSignal=SIGINT",
        "Restart=on-failure",
        "RestartPreventExitStatus=75",
        "TimeoutStopSec=90",
    ] {
        assert!(unit.lines().any(|l| l == line), "unit lacks {line}");
    }

    // The curator: --store-url right after `curator` (#1547), same environment.
    let curator = exec_start(text_of(res, "service:curator"));
    assert_eq!(
        curator,
        [
            "/usr/local/bin/ai-memory",
            "curator",
            "--daemon",
            "--store-url",
            "${AI_MEMORY_STORE_URL}",
            "--interval-secs",
            "300",
            "--max-ops",
            "100"
        ]
    );

    // The environment file: password as PGPASSWORD, a password-free verify-full URL to the
    // region's pg private address and the peer's own database (the reference fleet's layout; the
    // seed's: see the layout tests), identities, the Batman battery.
    let vars = env_vars(text_of(res, "file:env"));
    assert_eq!(vars["PGPASSWORD"], PG_PASSWORD);
    let url = vars["AI_MEMORY_STORE_URL"];
    assert_eq!(
        url,
        format!(
            "postgres://ai_memory@{}:5432/ai_memory_peer_1?options=-csearch_path%3Dpublic%2Cag_catalog&sslmode=verify-full&sslrootcert=/etc/ai-memory/tls/ca.pem",
            pg.private_ip
        )
    );
    assert!(!url.contains(PG_PASSWORD));
    assert_eq!(
        vars["AI_MEMORY_AGENT_ID"],
        "ai:do-1461-peer-nyc3-01@do-1461"
    );
    assert_eq!(
        vars["AI_MEMORY_FED_IDENTITY"],
        "do-1461/nyc3/do-1461-peer-nyc3-01"
    );
    let battery = [
        ("AI_MEMORY_FED_REQUIRE_SIG", "1"),
        ("AI_MEMORY_FED_REQUIRE_NONCE", "1"),
        ("AI_MEMORY_FED_REQUIRE_PEER_ENROLLMENT", "1"),
        ("AI_MEMORY_REQUIRE_AGENT_ATTESTATION", "1"),
        ("AI_MEMORY_PERMISSIONS_MODE", "enforce"),
        ("AI_MEMORY_GOVERNANCE_FAIL_OPEN_ON_ERROR", "0"),
        ("AI_MEMORY_AUTO_CONFIDENCE", "1"),
        ("AI_MEMORY_CONFIDENCE_SHADOW", "1"),
        ("AI_MEMORY_CONFIDENCE_DECAY", "1"),
    ];
    for (k, v) in battery {
        assert_eq!(vars.get(k), Some(&v), "{k}");
    }
    assert!(!vars.contains_key("AI_MEMORY_ENCRYPT_AT_REST"));

    // config.toml: top-level api_key under the daemon's HOME.
    let Resource::File(config) = find(res, "file:config") else {
        panic!()
    };
    assert_eq!(
        config.path.as_str(),
        "/var/lib/ai-memory/.config/ai-memory/config.toml"
    );
    let parsed: toml::Table = toml::from_str(text_of(res, "file:config")).unwrap();
    assert_eq!(parsed["api_key"].as_str(), Some(API_KEY));
    assert_eq!(parsed["permissions"]["mode"].as_str(), Some("enforce"));
    assert!(!parsed.contains_key("api") && !parsed.contains_key("db"));

    // The allowlist in the seed's format: every mesh client certificate and the operator.
    let allow = text_of(res, "file:allowlist");
    assert!(allow.starts_with("# do-1461 fleet mTLS client-cert allowlist (SHA-256 of DER)\n"));
    let entries: Vec<&str> = allow.lines().filter(|l| !l.starts_with('#')).collect();
    assert_eq!(entries.len(), facts.allowlist.len());
    for (line, a) in entries.iter().zip(&facts.allowlist) {
        assert_eq!(*line, format!("{}  # {} ({})", a.fpr, a.node, a.role));
    }

    // TLS: keys on the node, modes as spec §5, the artifact binary 0755.
    for (id, purpose, key) in [
        (
            "cert:server",
            CertificatePurpose::Server,
            "/etc/ai-memory/tls/server.key",
        ),
        (
            "cert:client",
            CertificatePurpose::Client,
            "/etc/ai-memory/tls/client.key",
        ),
    ] {
        let Resource::Certificate(c) = find(res, id) else {
            panic!()
        };
        assert_eq!((c.purpose, c.key_path.as_str()), (purpose, key));
        assert_eq!(c.key_mode.to_string(), "0400");
    }
    let Resource::File(bin) = find(res, "file:binary") else {
        panic!()
    };
    assert_eq!(
        (bin.path.as_str(), bin.mode.to_string().as_str()),
        ("/usr/local/bin/ai-memory", "0755")
    );
    assert!(
        matches!(&bin.content, FileContent::Artifact { sha256, .. } if *sha256 == fleet.pins.ai_memory.sha256)
    );

    // Waits: the pg node's gate, then verify-full login into this peer's own store, before the unit.
    let ids: Vec<&str> = res.iter().map(|r| r.id().as_str()).collect();
    let pos = |id: &str| ids.iter().position(|x| *x == id).unwrap();
    assert!(pos("wait:pg-converged") < pos("wait:pg-schema"));
    assert!(pos("wait:pg-schema") < pos("service:ai-memory"));
    let Resource::Wait(w) = find(res, "wait:pg-converged") else {
        panic!()
    };
    assert!(
        matches!(&w.target, WaitTarget::Node { node, gate } if node.as_str() == PG_NODE && gate == "converged")
    );
    let Resource::Wait(w) = find(res, "wait:pg-schema") else {
        panic!()
    };
    let WaitTarget::Postgres {
        host,
        dbname,
        schema,
        ca_path,
        user,
        ..
    } = &w.target
    else {
        panic!()
    };
    assert_eq!(
        (
            host.as_str(),
            dbname.as_str(),
            schema.as_str(),
            ca_path.as_str(),
            user.as_str()
        ),
        (
            pg.private_ip.to_string().as_str(),
            "ai_memory_peer_1",
            "public",
            "/etc/ai-memory/tls/ca.pem",
            "ai_memory"
        )
    );

    // Checks: §7 names with expected values from the pins, probing the node's public address.
    let checks = checks_of(res);
    assert_eq!(
        checks["binary.sha256"].0,
        fleet.pins.ai_memory.sha256.to_hex()
    );
    assert_eq!(checks["binary.version"].0, "ai-memory 0.7.0");
    assert_eq!(checks["health.version"].0, "0.7.0");
    assert_eq!(checks["governance.rules_enabled"].0, "R001,R002,R003,R004");
    assert_eq!(checks["governance.refuses_tmp_write"].0, "deny");
    // Command checks run an argv, never a shell: their output is the value, compared whole.
    for (name, (_, probe)) in &checks {
        if let Probe::CommandOutput { argv } | Probe::CommandJson { argv, .. } = probe {
            assert!(
                !argv.iter().any(|a| a.ends_with("/sh") || a == "sh"),
                "{name}: {argv:?}"
            );
        }
    }
    let Probe::CommandJson { argv, field } = &checks["governance.rules_enabled"].1 else {
        panic!()
    };
    assert_eq!(field, "result.*[enabled=true].id");
    assert!(argv.ends_with(&[
        "/usr/local/bin/ai-memory".to_owned(),
        "--db".into(),
        "/var/lib/ai-memory/ai-memory.db".into(),
        "rules".into(),
        "list".into(),
        "--json".into()
    ]));
    assert_eq!(checks["caps.db_schema_version"].0, "57");
    assert_eq!(checks["caps.storage_backend"].0, "postgres");
    assert_eq!(checks["single_instance"].0, "1");
    let Probe::HttpsJson { url, .. } = &checks["health.status"].1 else {
        panic!()
    };
    assert_eq!(url, &format!("https://{}:9077/api/v1/health", me.public_ip));
}

/// `KEY=value` lines, a single-quoted value unquoted as systemd's `EnvironmentFile=` reads it.
fn env_vars(env: &str) -> BTreeMap<&str, &str> {
    env.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| l.split_once('=').unwrap())
        .map(|(k, v)| {
            let literal = v.strip_prefix('\'').and_then(|v| v.strip_suffix('\''));
            (k, literal.unwrap_or(v))
        })
        .collect()
}

/// Spec §6 on the node: key named by the federation identity under AI_MEMORY_KEY_DIR, credential
/// at AI_MEMORY_FED_CRED_PATH, the CA's raw key as `<issuer id>.pub` in the bundle directory; the
/// daemon restarts for a new key or bundle, not for a renewed credential (it re-reads that file).
#[test]
fn peer_node_holds_a_zero_touch_identity_wired_as_the_daemon_loads_it() {
    let (fleet, nodes) = reference();
    let res = &nodes[PEER_NODE];
    let issuer = federation_issuer(&fleet);
    let fed_id = "do-1461/nyc3/do-1461-peer-nyc3-01";
    let daemon = Some(hiveseed_proto::manifest::Ownership {
        owner: "ai-memory".into(),
        group: "ai-memory".into(),
    });

    let Resource::Directory(keys) = find(res, "dir:keys") else {
        panic!()
    };
    assert_eq!(
        (keys.path.as_str(), keys.mode.to_string().as_str()),
        ("/etc/ai-memory/keys", "0700")
    );
    assert_eq!(keys.owner, daemon);
    let Resource::FederationKey(k) = find(res, "key:federation") else {
        panic!()
    };
    assert_eq!((k.fed_id.as_str(), &k.key_dir), (fed_id, &keys.path));
    assert_eq!(
        k.key_path().unwrap().as_str(),
        "/etc/ai-memory/keys/do-1461/nyc3/do-1461-peer-nyc3-01.priv"
    );
    assert_eq!(k.owner, daemon);
    let Resource::FederationCredential(c) = find(res, "credential:federation") else {
        panic!()
    };
    assert_eq!(
        (c.fed_id.as_str(), &c.key_dir, c.credential_path.as_str()),
        (fed_id, &keys.path, "/etc/ai-memory/credential")
    );
    assert_eq!(&c.issuer, issuer.public());
    assert_eq!(c.owner, daemon);
    let Resource::File(bundle) = find(res, "file:trust-bundle") else {
        panic!()
    };
    assert_eq!(
        (bundle.path.as_str(), bundle.mode.to_string().as_str()),
        ("/etc/ai-memory/trust/do-1461-ca.pub", "0444")
    );
    let FileContent::Base64 { base64 } = &bundle.content else {
        panic!("the bundle is the raw key")
    };
    assert_eq!(base64.as_bytes(), issuer.public().public_key.to_bytes());

    let env = env_vars(text_of(res, "file:env"));
    assert_eq!(env["AI_MEMORY_KEY_DIR"], keys.path.as_str());
    assert_eq!(
        env["AI_MEMORY_FED_TRUST_BUNDLE_DIR"],
        "/etc/ai-memory/trust"
    );
    assert_eq!(env["AI_MEMORY_FED_TRUST_DOMAIN"], "do-1461.fleet");
    assert_eq!(env["AI_MEMORY_FED_CRED_PATH"], c.credential_path.as_str());
    assert_eq!(env["AI_MEMORY_FED_IDENTITY"], fed_id);
    assert_eq!(
        flags(&exec_start(text_of(res, "service:ai-memory")))["--federation-identity"],
        fed_id
    );

    // What the node will hold verifies under what its peers trust: the bundle file's name and
    // bytes, the env file's domain.
    let node_key = ed25519_dalek::SigningKey::from_bytes(&[7; 32]);
    let (cred, _) = issuer
        .mint(
            &c.fed_id,
            node_key.verifying_key().into(),
            1_800_000_000,
            fleet.ttl.credential_secs as i64,
        )
        .unwrap();
    let bundle_id = bundle
        .path
        .as_str()
        .strip_prefix(&format!("{}/", env["AI_MEMORY_FED_TRUST_BUNDLE_DIR"]))
        .and_then(|n| n.strip_suffix(".pub"))
        .unwrap();
    let bundle_key =
        ed25519_dalek::VerifyingKey::from_bytes(&base64.as_bytes().try_into().unwrap()).unwrap();
    let claims = hiveseed_seeder::credential::verify(
        &cred,
        &[(bundle_id, bundle_key)],
        Some(env["AI_MEMORY_FED_TRUST_DOMAIN"]),
        1_800_000_000,
    )
    .unwrap();
    assert_eq!(claims.subject_agent_id, env["AI_MEMORY_FED_IDENTITY"]);

    let ids: Vec<&str> = res.iter().map(|r| r.id().as_str()).collect();
    let pos = |id: &str| ids.iter().position(|x| *x == id).unwrap();
    assert!(pos("dir:keys") < pos("key:federation"));
    assert!(pos("key:federation") < pos("credential:federation"));
    assert!(pos("file:trust-bundle") < pos("service:ai-memory"));
    let Resource::Service(s) = find(res, "service:ai-memory") else {
        panic!()
    };
    let notify: BTreeSet<&str> = s.notify.iter().map(|n| n.as_str()).collect();
    assert!(notify.contains("key:federation") && notify.contains("file:trust-bundle"));
    assert!(!notify.contains("credential:federation"));
}

#[test]
fn unreleased_mesh_or_unenrolled_pg_renders_no_daemon() {
    let fleet = Fleet::parse(&fleet_text("fleet.example.toml")).unwrap();
    let roles = roles();
    let mut f = facts(&fleet);
    f.mesh_released = false;
    f.enrollments
        .remove(&"do-1461-peer-sgp1-03".parse().unwrap());
    let res = render_with(&fleet, &roles, &f, PEER_NODE);
    let ids: BTreeSet<&str> = res.iter().map(|r| r.id().as_str()).collect();
    for gone in ["service:ai-memory", "service:curator", "file:allowlist"] {
        assert!(
            !ids.contains(gone),
            "{gone} rendered before the mesh is released"
        );
    }
    assert!(ids.contains("file:env") && ids.contains("wait:pg-schema"));

    f.mesh_released = true;
    f.enrollments.remove(&PG_NODE.parse().unwrap());
    let res = render_with(&fleet, &roles, &f, PEER_NODE);
    let ids: BTreeSet<&str> = res.iter().map(|r| r.id().as_str()).collect();
    for gone in [
        "file:env",
        "file:pg-password",
        "wait:pg-schema",
        "service:ai-memory",
    ] {
        assert!(
            !ids.contains(gone),
            "{gone} rendered without an enrolled pg"
        );
    }
    assert!(ids.contains("file:allowlist") && ids.contains("cert:client"));
}

// ---- store layouts -----------------------------------------------------------------------------

/// The SQL statements of a psql script, one per line as the templates write them (comments and
/// blank lines dropped).
fn sql_lines(text: &str) -> Vec<&str> {
    text.lines()
        .filter(|l| !l.is_empty() && !l.starts_with("--"))
        .collect()
}

fn wait_pg(res: &[Resource]) -> (String, String) {
    let Resource::Wait(w) = find(res, "wait:pg-schema") else {
        panic!()
    };
    let WaitTarget::Postgres { dbname, schema, .. } = &w.target else {
        panic!()
    };
    (dbname.clone(), schema.clone())
}

/// The (database, schema) a `signed_events.<store>` check verifies the chain in.
fn chain_probe(checks: &BTreeMap<String, (String, Probe)>, name: &str) -> (String, String) {
    match &checks
        .get(name)
        .unwrap_or_else(|| panic!("no check {name}"))
        .1
    {
        Probe::SignedEventsChain { dbname, schema, .. } => (dbname.clone(), schema.clone()),
        other => panic!("{name}: {other:?}"),
    }
}

fn sql_probe(checks: &BTreeMap<String, (String, Probe)>, name: &str) -> (String, String) {
    match &checks
        .get(name)
        .unwrap_or_else(|| panic!("no check {name}"))
        .1
    {
        Probe::Sql { dbname, query, .. } => (dbname.clone(), query.clone()),
        other => panic!("{name}: {other:?}"),
    }
}

/// The seed's layout: one database ai_memory, a schema ic_peer_K per peer, K = 3 in nyc3.
#[test]
fn schema_layout_pg_holds_one_database_with_a_schema_per_peer() {
    let (_, nodes) = reference_with_layout("schema");
    let res = &nodes[PG_NODE];

    let Resource::Command(role) = find(res, "cmd:sql-role") else {
        panic!()
    };
    let stdin = role.stdin.as_deref().unwrap();
    assert_eq!(stdin.matches("CREATE DATABASE").count(), 1);
    assert!(stdin.contains("'CREATE DATABASE %I OWNER %I', 'ai_memory', 'ai_memory'"));
    assert!(role
        .unless
        .as_ref()
        .unwrap()
        .last()
        .unwrap()
        .contains("d.datname = ANY ('{ai_memory}'::text[])) = 1"));

    let init = sql_lines(text_of(res, "file:init-age.sql"));
    assert_eq!(
        init.iter()
            .filter(|l| l.starts_with("\\connect"))
            .collect::<Vec<_>>(),
        [&"\\connect ai_memory"]
    );
    for k in 1..=3 {
        assert!(init.contains(
            &format!("CREATE SCHEMA IF NOT EXISTS ic_peer_{k} AUTHORIZATION ai_memory;").as_str()
        ));
    }
    assert!(!init.iter().any(|l| l.contains("ic_peer_4")));
    for stmt in [
        "CREATE EXTENSION IF NOT EXISTS age;",
        "CREATE EXTENSION IF NOT EXISTS vector WITH SCHEMA public;",
        "GRANT ALL PRIVILEGES ON DATABASE ai_memory TO ai_memory;",
        "GRANT ALL PRIVILEGES ON SCHEMA public, ic_peer_1, ic_peer_2, ic_peer_3, ag_catalog TO ai_memory;",
        "  ALTER SCHEMA memory_graph OWNER TO ai_memory;",
    ] {
        assert_eq!(
            init.iter().filter(|l| **l == stmt).count(),
            1,
            "init-age.sql: {stmt}"
        );
    }
    let ready = text_of(res, "file:init-ready.sql");
    assert_eq!(ready.matches("\\connect ").count(), 1);
    assert!(ready.contains("\\connect ai_memory\n"));
    assert!(ready.contains("'{ic_peer_1,ic_peer_2,ic_peer_3}'::text[])) = 3"));

    let hba = text_of(res, "file:pg_hba.conf");
    assert_eq!(
        hba.lines()
            .filter(|l| l.starts_with("hostssl  ai_memory  ai_memory  "))
            .count(),
        3
    );

    let checks = checks_of(res);
    for k in 1..=3 {
        let (db, schema) = chain_probe(&checks, &format!("signed_events.ic_peer_{k}"));
        assert_eq!((db.as_str(), schema), ("ai_memory", format!("ic_peer_{k}")));
    }
    assert!(!checks.keys().any(|c| c.contains("ai_memory_peer")));
    for name in [
        "store.age_version",
        "store.pgvector_version",
        "store.age_graph",
    ] {
        assert_eq!(sql_probe(&checks, name).0, "ai_memory", "{name}");
    }

    // The peer: ai_memory, its schema first on the search path, ag_catalog, then public.
    let peer = &nodes[PEER_NODE];
    let vars = env_vars(text_of(peer, "file:env"));
    assert!(vars["AI_MEMORY_STORE_URL"].contains(
        ":5432/ai_memory?options=-csearch_path%3Dic_peer_1%2Cag_catalog%2Cpublic&sslmode=verify-full&"
    ));
    assert_eq!(wait_pg(peer), ("ai_memory".into(), "ic_peer_1".into()));
}

/// The reference fleet's layout: a database ai_memory_peer_K per peer, each with the objects the
/// seed's one database has, the daemon's tables in its public schema.
#[test]
fn database_layout_pg_holds_a_database_per_peer() {
    let (_, nodes) = reference_with_layout("database");
    let res = &nodes[PG_NODE];
    let dbs = ["ai_memory_peer_1", "ai_memory_peer_2", "ai_memory_peer_3"];

    // The role and the three databases, the password on stdin; re-run while one is missing.
    let Resource::Command(role) = find(res, "cmd:sql-role") else {
        panic!()
    };
    let stdin = role.stdin.as_deref().unwrap();
    assert_eq!(stdin.matches("CREATE DATABASE").count(), 3);
    for db in dbs {
        assert!(stdin.contains(&format!(
            "SELECT format('CREATE DATABASE %I OWNER %I', '{db}', 'ai_memory')\nWHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = '{db}')\\gexec\n"
        )));
    }
    assert!(!stdin.contains("'ai_memory', 'ai_memory'"));
    assert!(role.unless.as_ref().unwrap().last().unwrap().contains(
        "d.datname = ANY ('{ai_memory_peer_1,ai_memory_peer_2,ai_memory_peer_3}'::text[])) = 3"
    ));

    // init-age.sql: in each database, in order, the seed's objects and no peer schema.
    let init = sql_lines(text_of(res, "file:init-age.sql"));
    let connects: Vec<&str> = init
        .iter()
        .filter_map(|l| l.strip_prefix("\\connect "))
        .collect();
    assert_eq!(connects, dbs);
    let blocks: Vec<&[&str]> = {
        let at: Vec<usize> = init
            .iter()
            .enumerate()
            .filter(|(_, l)| l.starts_with("\\connect"))
            .map(|(i, _)| i)
            .collect();
        at.iter()
            .enumerate()
            .map(|(n, &i)| &init[i..*at.get(n + 1).unwrap_or(&init.len())])
            .collect()
    };
    for (db, block) in dbs.iter().zip(&blocks) {
        for stmt in [
            "CREATE EXTENSION IF NOT EXISTS age;".to_string(),
            "CREATE EXTENSION IF NOT EXISTS vector WITH SCHEMA public;".into(),
            "LOAD 'age';".into(),
            "    PERFORM ag_catalog.create_graph('memory_graph');".into(),
            format!("GRANT ALL PRIVILEGES ON DATABASE {db} TO ai_memory;"),
            "GRANT ALL PRIVILEGES ON SCHEMA public, ag_catalog TO ai_memory;".into(),
            "GRANT ALL PRIVILEGES ON ALL FUNCTIONS IN SCHEMA ag_catalog TO ai_memory;".into(),
            "  ALTER SCHEMA memory_graph OWNER TO ai_memory;".into(),
        ] {
            assert_eq!(
                block.iter().filter(|l| **l == stmt).count(),
                1,
                "{db}: {stmt}"
            );
        }
        assert!(!block.iter().any(|l| l.contains("CREATE SCHEMA")), "{db}");
        // The blocks differ only in the database they name.
        assert_eq!(
            block.join("\n").replace(db, "DB"),
            blocks[0].join("\n").replace(dbs[0], "DB")
        );
    }
    let ready = text_of(res, "file:init-ready.sql");
    let connects: Vec<&str> = ready
        .lines()
        .filter_map(|l| l.strip_prefix("\\connect "))
        .collect();
    assert_eq!(connects, dbs);
    assert_eq!(ready.matches("SELECT 1 / (").count(), 3);
    assert!(!ready.contains("ic_peer"));

    // pg_hba: each peer to its own database only.
    let hba = text_of(res, "file:pg_hba.conf");
    let rules: Vec<(&str, &str)> = hba
        .lines()
        .filter(|l| l.starts_with("hostssl"))
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f[1], f[6])
        })
        .collect();
    assert_eq!(
        rules,
        [
            ("ai_memory_peer_1", "do-1461-peer-nyc3-01"),
            ("ai_memory_peer_2", "do-1461-peer-nyc3-02"),
            ("ai_memory_peer_3", "do-1461-peer-nyc3-03"),
        ]
    );

    // Checks: the chain per database in its public schema; extensions and graph in the first.
    let checks = checks_of(res);
    for (k, db) in dbs.iter().enumerate() {
        let (dbname, schema) = chain_probe(&checks, &format!("signed_events.{db}"));
        assert_eq!((dbname.as_str(), schema.as_str()), (*db, "public"));
        assert!(
            res.iter()
                .any(|r| r.id().as_str() == format!("check:signed_events.{db}")),
            "{k}"
        );
    }
    assert!(!checks.keys().any(|c| c.contains("ic_peer")));
    for name in [
        "store.age_version",
        "store.pgvector_version",
        "store.age_graph",
    ] {
        assert_eq!(sql_probe(&checks, name).0, "ai_memory_peer_1", "{name}");
    }

    // The peer: its own database, public first on the search path (the dimension probe reads
    // public), ag_catalog for AGE; still verify-full and no password in the URL.
    let peer = &nodes["do-1461-peer-nyc3-02"];
    let vars = env_vars(text_of(peer, "file:env"));
    let url = vars["AI_MEMORY_STORE_URL"];
    assert!(url.starts_with("postgres://ai_memory@10.11.0.6:5432/ai_memory_peer_2?options=-csearch_path%3Dpublic%2Cag_catalog&sslmode=verify-full&sslrootcert=/etc/ai-memory/tls/ca.pem"), "{url}");
    assert!(!url.contains(PG_PASSWORD) && !url.contains("ic_peer"));
    assert_eq!(wait_pg(peer), ("ai_memory_peer_2".into(), "public".into()));
}

/// A mixed fleet (the lab's: nyc3 and fra1 a database per peer, sgp1 a schema per peer): every
/// peer's store URL, wait and pg_hba rule agree with its region's pg node, which creates its
/// database and reports its chain under the name `seeder test` reads (`signed_events.<store>`).
#[test]
fn a_mixed_fleet_renders_each_region_in_its_own_layout() {
    let (fleet, nodes) = render_all(&fleet_text("fleet.lab.toml"));
    let facts = facts(&fleet);
    let mut seen = BTreeSet::new();
    for peer in fleet.nodes_with_role("peer") {
        let store = fleet.peer_store(peer).unwrap();
        let layout = fleet.store_layout(&peer.region);
        seen.insert(layout.to_string());
        let pg = fleet
            .nodes_with_role("pg")
            .find(|n| n.region == peer.region)
            .unwrap();
        let pg_res = &nodes[pg.name.as_str()];
        let res = &nodes[peer.name.as_str()];
        let me = &facts.enrollments[&peer.name];
        let pg_ip = facts.enrollments[&pg.name].private_ip;

        let want_url = format!(
            "postgres://ai_memory@{pg_ip}:5432/{}?options=-csearch_path%3D{}&sslmode=verify-full&sslrootcert=/etc/ai-memory/tls/ca.pem",
            store.database,
            store.search_path.join("%2C")
        );
        assert_eq!(
            env_vars(text_of(res, "file:env"))["AI_MEMORY_STORE_URL"],
            want_url
        );
        assert_eq!(wait_pg(res), (store.database.clone(), store.schema.clone()));
        let rule = format!(
            "hostssl  {}  ai_memory  {}/32  scram-sha-256  # {}",
            store.database, me.private_ip, peer.name
        );
        assert!(
            text_of(pg_res, "file:pg_hba.conf")
                .lines()
                .any(|l| l == rule),
            "{}: {rule}",
            pg.name
        );
        // The peer's measured refusal: from the address that rule names, to the same database,
        // as the server words it for exactly that address, user and database.
        let Resource::Check(refused) = find(res, "check:store.plaintext_refused") else {
            panic!()
        };
        let Probe::PgPlaintext {
            host,
            port,
            dbname,
            user,
            source,
            ..
        } = &refused.probe
        else {
            panic!("{:?}", refused.probe)
        };
        assert_eq!(
            (*host, *port, dbname, user.as_str(), *source),
            (
                std::net::IpAddr::V4(pg_ip),
                5432,
                &store.database,
                "ai_memory",
                Some(std::net::IpAddr::V4(me.private_ip))
            )
        );
        assert_eq!(
            refused.expected,
            format!(
                "refused: no pg_hba.conf entry for host \"{}\", user \"ai_memory\", database \"{}\", no encryption",
                me.private_ip, store.database
            )
        );
        assert_eq!(refused.matching, Match::Exact);
        let Resource::Command(role) = find(pg_res, "cmd:sql-role") else {
            panic!()
        };
        assert!(role
            .stdin
            .as_deref()
            .unwrap()
            .contains(&format!("WHERE datname = '{}')", store.database)));
        assert!(text_of(pg_res, "file:init-age.sql")
            .contains(&format!("\n\\connect {}\n", store.database)));
        let (dbname, schema) =
            chain_probe(&checks_of(pg_res), &format!("signed_events.{}", store.name));
        assert_eq!(
            (dbname, schema),
            (store.database.clone(), store.schema.clone())
        );
        match layout.to_string().as_str() {
            "schema" => assert_eq!(store.name, format!("ic_peer_{}", peer.index)),
            _ => assert_eq!(store.name, format!("ai_memory_peer_{}", peer.index)),
        }
    }
    assert_eq!(seen.len(), 2, "the lab fleet runs both layouts: {seen:?}");
}

/// A region's pg node before its peers: the seed's layout still makes its one database, the
/// database layout none, and neither renders a store check it cannot run.
#[test]
fn a_pg_only_region_renders_in_both_layouts() {
    let text = fleet_text("fleet.example.toml").replacen(
        "[regions.sgp1]\npg = 1\npeer = 3\n",
        "[regions.sgp1]\npg = 1\n",
        1,
    );
    for (layout, databases) in [("database", 0), ("schema", 1)] {
        let (fleet, nodes) = render_all(&with_store(&text, Some(layout)));
        validate_roles(&fleet, &roles()).unwrap();
        let res = &nodes["do-1461-pg-sgp1-01"];
        let Resource::Command(role) = find(res, "cmd:sql-role") else {
            panic!()
        };
        assert_eq!(
            role.stdin
                .as_deref()
                .unwrap()
                .matches("CREATE DATABASE")
                .count(),
            databases,
            "{layout}"
        );
        let checks = checks_of(res);
        assert!(
            !checks.keys().any(|c| c.starts_with("signed_events.")),
            "{layout}"
        );
        assert_eq!(
            checks.contains_key("store.age_graph"),
            databases == 1,
            "{layout}"
        );
        assert!(checks.contains_key("store.pg_version"), "{layout}");
        assert_eq!(
            text_of(res, "file:init-age.sql")
                .matches("\\connect ")
                .count(),
            databases,
            "{layout}"
        );
    }
}

// ---- properties of every node of both fleets ---------------------------------------------------

// ---- the embedder and the operator's key ----------------------------------------------------------

/// Assignment names of an environment file, in file order.
fn env_names(env: &str) -> Vec<&str> {
    env.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| l.split_once('=').unwrap().0)
        .collect()
}

/// The reference peer against the seed's config.toml (spec §3.2) and EnvironmentFile (§3.3).
#[test]
fn reference_peer_config_and_environment_are_the_seeds() {
    let (_, nodes) = reference();
    let res = &nodes[PEER_NODE];

    // §3.2 verbatim (the api_key is the fixture's), parsed: ours is it, less the legacy flat
    // `cross_encoder` (written as [reranker] enabled), plus [admin].
    let seed = format!(
        r#"
schema_version = 2
tier = "autonomous"
api_key = "{API_KEY}"
cross_encoder = true

[embeddings]
backend = "openrouter"
model = "google/gemini-embedding-2"
dim = 768
api_key_env = "OPENROUTER_API_KEY"

[llm]
backend = "openrouter"
model = "google/gemma-4-26b-a4b-it"
api_key_env = "OPENROUTER_API_KEY"

[reranker]
enabled = true
model = "ms-marco-MiniLM-L-6-v2"

[storage]
default_namespace = "do-1461"
archive_on_gc = true

[audit]
enabled = true
path = "/var/log/ai-memory/audit"
redact_content = true
hash_chain = true

[mcp]
profile = "full"

[permissions]
mode = "enforce"
"#
    );
    let mut seed: toml::Table = toml::from_str(&seed).unwrap();
    assert_eq!(
        seed.remove("cross_encoder"),
        Some(toml::Value::Boolean(true))
    );
    let config = text_of(res, "file:config");
    let mut ours: toml::Table = toml::from_str(config).unwrap();
    assert!(ours.remove("admin").is_some());
    assert_eq!(ours, seed);
    assert!(
        !config.contains(LLM_KEY),
        "config.toml names the variable only"
    );

    // §3.3: the key first, then the seed's order; PGPASSWORD is ours (the seed put the password in
    // the URL), and no offline switch for a cloud embedder.
    let env = text_of(res, "file:env");
    let names = env_names(env);
    let seed_order = [
        "OPENROUTER_API_KEY",
        "AI_MEMORY_KEY_DIR",
        "AI_MEMORY_FED_TRUST_BUNDLE_DIR",
        "AI_MEMORY_FED_TRUST_DOMAIN",
        "AI_MEMORY_FED_CRED_PATH",
        "AI_MEMORY_FED_REQUIRE_SIG",
        "AI_MEMORY_FED_REQUIRE_NONCE",
        "AI_MEMORY_FED_REQUIRE_PEER_ENROLLMENT",
        "AI_MEMORY_REQUIRE_AGENT_ATTESTATION",
        "AI_MEMORY_PERMISSIONS_MODE",
        "AI_MEMORY_GOVERNANCE_FAIL_OPEN_ON_ERROR",
        "AI_MEMORY_AUTO_CONFIDENCE",
        "AI_MEMORY_CONFIDENCE_SHADOW",
        "AI_MEMORY_CONFIDENCE_DECAY",
        "AI_MEMORY_STORE_URL",
        "AI_MEMORY_AGENT_ID",
        "AI_MEMORY_FED_IDENTITY",
    ];
    let without_pg: Vec<&str> = names
        .iter()
        .copied()
        .filter(|n| *n != "PGPASSWORD")
        .collect();
    assert_eq!(without_pg, seed_order);
    assert_eq!(env_vars(env)["OPENROUTER_API_KEY"], LLM_KEY);
    let Resource::File(f) = find(res, "file:env") else {
        panic!()
    };
    assert!(f.secret);
    assert_eq!(
        (f.path.as_str(), f.mode.to_string().as_str()),
        ("/etc/ai-memory/ai-memory.env", "0400")
    );
}

fn table(text: &str) -> toml::Table {
    toml::from_str(text).unwrap()
}

const MINILM_IDS: [&str; 3] = [
    "file:minilm-config",
    "file:minilm-tokenizer",
    "file:minilm-model",
];
const OLLAMA_IDS: [&str; 10] = [
    "user:ollama",
    "dir:ollama-home",
    "dir:ollama-models",
    "file:ollama-archive",
    "cmd:ollama-install",
    "service:ollama",
    "wait:ollama",
    "cmd:ollama-pull",
    "check:ollama.version",
    "check:ollama.model",
];

/// Each embedder choice renders its own resources and settings and nothing of the others'; only
/// peers depend on the choice.
#[test]
fn each_embedder_variant_renders_only_its_own_resources() {
    let (_, openrouter) = reference();
    for (kind, text) in [
        ("openrouter", fleet_text("fleet.example.toml")),
        ("local", local_choice()),
        ("ollama", ollama_choice()),
    ] {
        let (fleet, nodes) = render_all(&text);
        assert_eq!(fleet.embedder.kind(), kind);
        for (node, res) in &nodes {
            if !node.contains("-peer-") {
                assert_eq!(
                    res, &openrouter[node],
                    "{kind}: {node} depends on the embedder"
                );
            }
        }
        let res = &nodes[PEER_NODE];
        let ids: BTreeSet<&str> = res.iter().map(|r| r.id().as_str()).collect();
        let Resource::Service(daemon) = find(res, "service:ai-memory") else {
            panic!()
        };
        let notify: BTreeSet<&str> = daemon.notify.iter().map(|n| n.as_str()).collect();
        for id in MINILM_IDS {
            assert_eq!(ids.contains(id), kind == "local", "{kind}: {id}");
            assert_eq!(notify.contains(id), kind == "local", "{kind}: notify {id}");
        }
        for id in OLLAMA_IDS {
            assert_eq!(ids.contains(id), kind == "ollama", "{kind}: {id}");
        }
        assert_eq!(notify.contains("cmd:ollama-pull"), kind == "ollama");
        for always in ["file:binary", "file:config", "file:env", "key:federation"] {
            assert!(notify.contains(always), "{kind}: notify {always}");
        }
        let unit = text_of(res, "service:ai-memory");
        let (after, wants) = if kind == "ollama" {
            (
                "After=network-online.target ollama.service",
                "Wants=network-online.target ollama.service",
            )
        } else {
            ("After=network-online.target", "Wants=network-online.target")
        };
        assert!(unit.lines().any(|l| l == after), "{kind}: {unit}");
        assert!(unit.lines().any(|l| l == wants), "{kind}: {unit}");
        let checks = checks_of(res);
        assert_eq!(checks["health.embedder_ready"].0, "true", "{kind}");

        let env = text_of(res, "file:env");
        let vars = env_vars(env);
        assert_eq!(
            vars.get("AI_MEMORY_EMBED_OFFLINE"),
            (kind == "local").then_some(&"1"),
            "{kind}"
        );
        assert_eq!(
            vars.contains_key("OPENROUTER_API_KEY"),
            kind == "openrouter"
        );
        let config: toml::Table = toml::from_str(text_of(res, "file:config")).unwrap();
        let embeddings = config["embeddings"].as_table().unwrap();
        match kind {
            "local" => {
                assert_eq!(config["tier"].as_str(), Some("semantic"));
                assert_eq!(
                    embeddings,
                    &table(r#"model = "sentence-transformers/all-MiniLM-L6-v2""#)
                );
            }
            "ollama" => {
                assert_eq!(config["tier"].as_str(), Some("semantic"));
                assert_eq!(
                    embeddings,
                    &table(
                        r#"
backend = "ollama"
url = "http://127.0.0.1:11434"
model = "nomic-embed-text"
dim = 768
"#
                    )
                );
            }
            _ => assert_eq!(embeddings["backend"].as_str(), Some("openrouter")),
        }
        if kind != "openrouter" {
            for absent in ["llm", "reranker"] {
                assert!(!config.contains_key(absent), "{kind}: [{absent}]");
            }
        }
    }
}

/// The Ollama sidecar as the seed's step 25 installs it: the pinned release from the seeder,
/// unpacked into /usr/local, the seed's unit, the model pulled once, before the daemon.
#[test]
fn ollama_sidecar_is_the_seeds_from_the_pinned_artifact() {
    let (fleet, nodes) = render_all(&ollama_choice());
    let res = &nodes[PEER_NODE];
    let ids: Vec<&str> = res.iter().map(|r| r.id().as_str()).collect();
    let pos = |id: &str| ids.iter().position(|x| *x == id).unwrap();
    let order = [
        "user:ollama",
        "dir:ollama-home",
        "dir:ollama-models",
        "file:ollama-archive",
        "cmd:ollama-install",
        "service:ollama",
        "wait:ollama",
        "cmd:ollama-pull",
        "service:ai-memory",
    ];
    for w in order.windows(2) {
        assert!(pos(w[0]) < pos(w[1]), "{} before {}", w[0], w[1]);
    }

    let Resource::User(u) = find(res, "user:ollama") else {
        panic!()
    };
    assert_eq!(
        (
            u.name.as_str(),
            u.system,
            u.home.as_ref().map(|h| h.as_str())
        ),
        ("ollama", true, Some("/var/lib/ollama"))
    );
    for (id, path) in [
        ("dir:ollama-home", "/var/lib/ollama"),
        ("dir:ollama-models", "/var/lib/ollama/models"),
    ] {
        let Resource::Directory(d) = find(res, id) else {
            panic!()
        };
        assert_eq!(
            (d.path.as_str(), d.mode.to_string().as_str()),
            (path, "0750")
        );
        assert_eq!(d.owner.as_ref().unwrap().owner, "ollama");
    }
    let Resource::File(archive) = find(res, "file:ollama-archive") else {
        panic!()
    };
    assert!(
        matches!(&archive.content, FileContent::Artifact { sha256, .. } if sha256.to_hex() == OLLAMA_SHA256)
    );
    assert_eq!(fleet.artifact_pins()[1].0, "ollama");
    let Resource::Command(install) = find(res, "cmd:ollama-install") else {
        panic!()
    };
    assert_eq!(
        install.argv,
        [
            "/usr/bin/tar",
            "-xzf",
            archive.path.as_str(),
            "-C",
            "/usr/local",
            "--no-same-owner"
        ]
    );
    assert_eq!(
        install.creates.as_ref().unwrap().as_str(),
        "/usr/local/bin/ollama"
    );
    assert_eq!(install.refresh_on[0].as_str(), "file:ollama-archive");

    // The seed's unit, less the sandboxing keys the agent's unit subset lacks.
    let unit = text_of(res, "service:ollama");
    let seed_unit = [
        "[Unit]",
        "Description=Ollama CPU embedder (do-1461 peer sidecar, pinned 0.6.8)",
        "After=network-online.target",
        "Wants=network-online.target",
        "[Service]",
        "Type=simple",
        "Environment=OLLAMA_HOST=127.0.0.1:11434",
        "Environment=OLLAMA_MODELS=/var/lib/ollama/models",
        "ExecStart=/usr/local/bin/ollama serve",
        "User=ollama",
        "Group=ollama",
        "Restart=always",
        "RestartSec=3",
        "ReadWritePaths=/var/lib/ollama",
        "ProtectSystem=full",
        "NoNewPrivileges=true",
        "[Install]",
        "WantedBy=multi-user.target",
    ];
    let sandboxing = ["ReadWritePaths=", "ProtectSystem=", "NoNewPrivileges="];
    let want: Vec<&str> = seed_unit
        .iter()
        .copied()
        .filter(|l| !sandboxing.iter().any(|k| l.starts_with(k)))
        .collect();
    let got: Vec<&str> = unit.lines().filter(|l| !l.is_empty()).collect();
    assert_eq!(got, want);
    let Resource::Service(s) = find(res, "service:ollama") else {
        panic!()
    };
    assert_eq!(s.unit, "ollama.service");
    assert_eq!(s.notify[0].as_str(), "cmd:ollama-install");

    let Resource::Wait(w) = find(res, "wait:ollama") else {
        panic!()
    };
    assert!(matches!(&w.target, WaitTarget::Tcp { host, port: 11434 } if host == "127.0.0.1"));
    let Resource::Command(pull) = find(res, "cmd:ollama-pull") else {
        panic!()
    };
    assert_eq!(
        pull.argv,
        [
            "/usr/bin/env",
            "OLLAMA_HOST=127.0.0.1:11434",
            "/usr/local/bin/ollama",
            "pull",
            "nomic-embed-text"
        ]
    );
    // `ollama show` decides (it exits 0 for a model the server has, and never pulls): no shell,
    // and both run as the sidecar's user, not root.
    assert_eq!(
        pull.unless.as_deref().unwrap(),
        [
            "/usr/bin/env",
            "OLLAMA_HOST=127.0.0.1:11434",
            "/usr/local/bin/ollama",
            "show",
            "nomic-embed-text"
        ]
    );
    assert_eq!(pull.user.as_deref(), Some("ollama"));

    let checks = checks_of(res);
    assert_eq!(checks["ollama.version"].0, "0.6.8");
    // Ollama names a model `<model>:<tag>` in `GET /api/tags`; the fleet's is untagged.
    assert_eq!(checks["ollama.model"].0, "nomic-embed-text:latest");
    assert_eq!(
        checks["ollama.model"].1,
        Probe::HttpJson {
            url: "http://127.0.0.1:11434/api/tags".into(),
            field: "models.*.name".into()
        }
    );
    assert_eq!(checks["ollama.active"].0, "active");
}

/// The operator's key is in exactly one place of the whole manifest of a peer whose fleet needs
/// one, the 0400 environment file, and nowhere for any other node or fleet.
#[test]
fn the_operator_key_is_only_in_the_peers_environment_file() {
    for text in [
        fleet_text("fleet.example.toml"),
        fleet_text("fleet.lab.toml"),
        local_choice(),
        ollama_choice(),
        ollama_llm_choice(),
    ] {
        let (fleet, nodes) = render_all(&text);
        let needs_key = fleet.llm_key_env().is_some();
        for (node, res) in &nodes {
            let carriers: Vec<&str> = res
                .iter()
                .filter(|r| serde_json::to_string(r).unwrap().contains(LLM_KEY))
                .map(|r| r.id().as_str())
                .collect();
            let want: &[&str] = if needs_key && node.contains("-peer-") {
                &["file:env"]
            } else {
                &[]
            };
            assert_eq!(carriers, want, "{node} ({})", fleet.embedder.kind());
            if !want.is_empty() {
                let env = text_of(res, "file:env");
                assert_eq!(env.matches(LLM_KEY).count(), 1, "{node}");
                let var = fleet.llm_key_env().unwrap().as_str();
                assert!(env.lines().any(|l| l == format!("{var}='{LLM_KEY}'")));
            }
        }
    }
    // The Ollama embedder with an LLM: the key for the LLM alone, the tier with an LLM.
    let (_, nodes) = render_all(&ollama_llm_choice());
    let config: toml::Table = toml::from_str(text_of(&nodes[PEER_NODE], "file:config")).unwrap();
    assert_eq!(config["tier"].as_str(), Some("smart"));
    assert_eq!(
        config["llm"]["api_key_env"].as_str(),
        Some("OPENROUTER_API_KEY")
    );
    assert!(config["embeddings"].get("api_key_env").is_none());
}

/// The rendered sidecar unit passes `systemd-analyze verify` (offline; any output on stderr is a
/// failure, since unknown keys only warn), as the agent's own unit does.
#[test]
fn ollama_unit_verifies_with_systemd_analyze() {
    let Ok(out) = std::process::Command::new("systemd-analyze")
        .arg("--version")
        .output()
    else {
        panic!("systemd-analyze is not installed (Debian package systemd)");
    };
    assert!(out.status.success());
    let (_, nodes) = render_all(&ollama_choice());
    // ExecStart must exist at verify time.
    let unit =
        text_of(&nodes[PEER_NODE], "service:ollama").replace("/usr/local/bin/ollama", "/bin/true");
    assert!(unit.contains("ExecStart=/bin/true serve"));
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("ollama.service");
    std::fs::write(&path, unit).unwrap();
    let out = std::process::Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stderr.trim().is_empty(),
        "systemd-analyze verify: {stderr}"
    );
}

// ---- properties of every node of every fleet ---------------------------------------------------

/// Both fleet files, and the reference fleet with the Ollama embedder.
fn every_fleet() -> Vec<(Fleet, BTreeMap<String, Vec<Resource>>)> {
    vec![
        reference(),
        render_all(&fleet_text("fleet.lab.toml")),
        render_all(&ollama_choice()),
    ]
}

#[test]
fn secrets_appear_only_in_secret_files_and_stdin() {
    for (fleet, nodes) in every_fleet() {
        for (node, res) in &nodes {
            let spec = fleet.node(&node.parse().unwrap()).unwrap();
            let mut carriers = BTreeSet::new();
            for r in res {
                let mut v = serde_json::to_value(r).unwrap();
                let allowed = match r {
                    Resource::File(f) if f.secret => {
                        if let FileContent::Text { text } = &f.content {
                            if text.contains(PG_PASSWORD) || text.contains(API_KEY) {
                                carriers.insert(r.id().to_string());
                            }
                        }
                        v["content"] = serde_json::Value::Null;
                        true
                    }
                    Resource::Command(c) => {
                        if c.stdin.as_deref().is_some_and(|s| s.contains(PG_PASSWORD)) {
                            carriers.insert(r.id().to_string());
                        }
                        v["stdin"] = serde_json::Value::Null;
                        true
                    }
                    _ => false,
                };
                let rest = v.to_string();
                assert!(
                    !rest.contains(PG_PASSWORD) && !rest.contains(API_KEY),
                    "{node} {}: a secret outside a secret file's content or a command's stdin (allowed part: {allowed})",
                    r.id()
                );
                if let Resource::File(f) = r {
                    if f.secret {
                        assert_eq!(f.mode.bits() & 0o077, 0, "{node} {}", r.id());
                    }
                }
                if let Resource::Certificate(c) = r {
                    assert_eq!(c.key_mode.bits() & 0o077, 0, "{node} {}", r.id());
                }
            }
            let want: BTreeSet<String> = match spec.role.as_str() {
                "pg" => ["cmd:sql-role"].iter().map(|s| s.to_string()).collect(),
                "peer" => [
                    "file:config",
                    "file:api-key",
                    "file:pg-password",
                    "file:env",
                ]
                .iter()
                .map(|s| s.to_string())
                .collect(),
                _ => ["file:api-key"].iter().map(|s| s.to_string()).collect(),
            };
            assert_eq!(carriers, want, "{node}: where the secrets are");
        }
    }
}

const UNIT_KEYS: [(&str, &str); 18] = [
    ("Unit", "Description"),
    ("Unit", "After"),
    ("Unit", "Wants"),
    ("Service", "Type"),
    ("Service", "ExecStart"),
    ("Service", "Environment"),
    ("Service", "EnvironmentFile"),
    ("Service", "User"),
    ("Service", "Group"),
    ("Service", "WorkingDirectory"),
    ("Service", "Restart"),
    ("Service", "RestartSec"),
    ("Service", "RestartPreventExitStatus"),
    ("Service", "KillSignal"),
    ("Service", "TimeoutStopSec"),
    ("Service", "LimitNOFILE"),
    ("Service", "Nice"),
    ("Install", "WantedBy"),
];

/// The unit subset both executors run (bootstrap/src/unit.rs), and no systemd specifiers: `%`
/// would mean one thing to systemd and another to the supervisor.
fn assert_unit_subset(node: &str, unit: &str, text: &str) {
    assert!(
        !text.contains('%'),
        "{node} {unit}: '%' is a systemd specifier"
    );
    let mut section = None;
    let joined = text.replace("\\\n", " ");
    for line in joined.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some(s) = line.strip_prefix('[') {
            section = Some(s.trim_end_matches(']').to_owned());
            continue;
        }
        let (k, v) = line.split_once('=').unwrap();
        let s = section.as_deref().expect("a section first");
        assert!(
            UNIT_KEYS.contains(&(s, k)),
            "{node} {unit}: [{s}] {k}= is not in the agent's unit subset"
        );
        if k == "Type" {
            assert_eq!(v, "simple", "{node} {unit}");
        }
        if k == "ExecStart" {
            assert!(v.starts_with('/'), "{node} {unit}: absolute program");
        }
    }
    assert_eq!(
        joined.matches("\nExecStart=").count(),
        1,
        "{node} {unit}: one ExecStart"
    );
}

#[test]
fn manifests_are_consistent_guarded_and_in_the_unit_subset() {
    for (fleet, nodes) in every_fleet() {
        for (node, res) in nodes {
            let spec = fleet.node(&node.parse().unwrap()).unwrap();
            let m = Manifest {
                v: MANIFEST_VERSION,
                campaign: fleet.campaign.clone(),
                node: spec.name.clone(),
                role: spec.role.clone(),
                region: spec.region.clone(),
                generation: Generation(1),
                issued_at: 1,
                not_after: 2,
                digest: Manifest::digest_of(&res),
                report_interval_secs: fleet.ttl.report_interval_secs,
                resources: res.clone(),
            };
            m.check_consistency()
                .unwrap_or_else(|e| panic!("{node}: {e}"));
            let mut earlier = BTreeSet::new();
            for r in &res {
                match r {
                    Resource::Command(c) => {
                        assert!(
                            c.creates.is_some() || c.unless.is_some() || !c.refresh_on.is_empty(),
                            "{node} {}: unguarded command",
                            c.id
                        );
                        assert!(c.argv[0].starts_with('/'), "{node} {}", c.id);
                        for t in &c.refresh_on {
                            assert!(earlier.contains(t), "{node} {}: refresh_on {t}", c.id);
                        }
                    }
                    Resource::Service(s) => assert_unit_subset(&node, &s.unit, &s.unit_text),
                    _ => {}
                }
                earlier.insert(r.id().clone());
            }
        }
    }
}

#[test]
fn re_rendering_unchanged_inputs_is_byte_identical() {
    let (_, a) = reference();
    let (_, b) = reference();
    for (node, res) in &a {
        assert_eq!(
            hiveseed_proto::canonical_bytes(res),
            hiveseed_proto::canonical_bytes(&b[node]),
            "{node}"
        );
    }
    // And the manifest digest the seeder signs is stable too.
    assert_eq!(
        Manifest::digest_of(&a[PEER_NODE]),
        Manifest::digest_of(&b[PEER_NODE])
    );
}

/// Resources that differ between two renderings, as `node id`; the id lists must be equal.
fn changed(
    a: &BTreeMap<String, Vec<Resource>>,
    b: &BTreeMap<String, Vec<Resource>>,
) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for (node, ra) in a {
        let rb = &b[node];
        let ids = |r: &[Resource]| r.iter().map(|x| x.id().to_string()).collect::<Vec<_>>();
        assert_eq!(ids(ra), ids(rb), "{node}: the resource list changed");
        for (x, y) in ra.iter().zip(rb) {
            if x != y {
                out.insert(format!("{node} {}", x.id()));
            }
        }
    }
    out
}

#[test]
fn changing_one_pin_changes_only_the_affected_resources() {
    let base_text = fleet_text("fleet.example.toml");
    let (fleet, base) = reference();
    let nodes_of = |role: &str| -> Vec<String> {
        fleet
            .nodes_with_role(role)
            .map(|n| n.name.to_string())
            .collect()
    };
    let cases: [(&str, &str, &str, &[&str]); 4] = [
        (
            "pgvector = \"0.8.6-1.pgdg24.04+1\"",
            "pgvector = \"0.8.7-1.pgdg24.04+1\"",
            "pg",
            &["package:postgresql"],
        ),
        (
            "expect_age = \"1.7.0\"",
            "expect_age = \"1.7.1\"",
            "pg",
            &["check:store.age_version"],
        ),
        (
            "version = \"0.7.0\"",
            "version = \"0.7.1\"",
            "peer",
            &["check:binary.version", "check:health.version"],
        ),
        (
            "schema = 57",
            "schema = 58",
            "peer",
            &["check:caps.db_schema_version"],
        ),
    ];
    for (from, to, role, ids) in cases {
        assert!(base_text.contains(from), "fixture lost {from}");
        let (_, after) = render_all(&base_text.replacen(from, to, 1));
        let want: BTreeSet<String> = nodes_of(role)
            .iter()
            .flat_map(|n| ids.iter().map(move |id| format!("{n} {id}")))
            .collect();
        assert_eq!(changed(&base, &after), want, "{from} -> {to}");
    }
}

#[test]
fn both_fleet_files_validate() {
    let roles = roles();
    for file in ["fleet.example.toml", "fleet.lab.toml"] {
        let fleet = Fleet::parse(&fleet_text(file)).unwrap();
        validate_roles(&fleet, &roles).unwrap_or_else(|e| panic!("{file}: {e:#}"));
    }
}

#[test]
fn lab_fleet_uses_distro_prefix_pins_and_has_agents() {
    let (fleet, nodes) = render_all(&fleet_text("fleet.lab.toml"));
    assert_eq!(fleet.nodes_with_role("agent").count(), 2);
    assert_eq!(fleet.nodes.len(), 14);
    let pg = &nodes["do-1461-pg-fra1-01"];
    let Resource::Package(p) = find(pg, "package:postgresql") else {
        panic!()
    };
    assert!(p.source.is_none(), "distro: the node's own suites");
    let pins: Vec<(&str, &VersionPin)> = p
        .packages
        .iter()
        .map(|x| (x.name.as_str(), &x.version))
        .collect();
    assert_eq!(
        pins,
        [
            ("postgresql-17", &VersionPin::Prefix("17.".into())),
            ("postgresql-17-pgvector", &VersionPin::Prefix("0.8.".into())),
            ("postgresql-17-age", &VersionPin::Prefix("1.5.".into())),
        ]
    );
    let checks = checks_of(pg);
    assert_eq!(checks["store.pg_version"].0, "17");
    // GOT is the installed version; "17" holds for 17.x by the check's match, not by the SQL.
    let Resource::Check(c) = find(pg, "check:store.pg_version") else {
        panic!()
    };
    assert_eq!(c.matching, Match::VersionPrefix);
    let Probe::Sql { query, .. } = &c.probe else {
        panic!()
    };
    assert!(!query.contains("17"), "{query}");

    let agent = &nodes["do-1461-agent-nyc3-01"];
    assert!(
        agent.iter().all(|r| !matches!(r, Resource::Service(_))),
        "no daemon on an agent"
    );
    let Resource::Certificate(c) = find(agent, "cert:client") else {
        panic!()
    };
    assert_eq!(c.purpose, CertificatePurpose::Client);
    // No [agent_llm] in the lab fleet: the agents' CLI gets no LLM (the `llm key` scenario adds one).
    let config: toml::Table = toml::from_str(text_of(agent, "file:config")).unwrap();
    assert!(config.get("llm").is_none(), "{config:?}");

    let peer = &nodes["do-1461-peer-fra1-02"];
    let f = flags(&exec_start(text_of(peer, "service:ai-memory")));
    assert_eq!(f["--quorum-timeout-ms"], "2000");
    assert_eq!(f["--catchup-interval-secs"], "5");
    assert_eq!(f["--quorum-peers"].split(',').count(), 8);
    assert!(text_of(peer, "file:env")
        .contains(":5432/ai_memory_peer_2?options=-csearch_path%3Dpublic%2Cag_catalog&"));
    let peer = &nodes["do-1461-peer-sgp1-02"];
    assert!(text_of(peer, "file:env")
        .contains(":5432/ai_memory?options=-csearch_path%3Dic_peer_2%2Cag_catalog%2Cpublic&"));
    // The committed pin is a placeholder; the lab substitutes its cache's build (README).
    let checks = checks_of(peer);
    assert_eq!(
        checks["binary.sha256"].0,
        "0000000000000000000000000000000000000000000000000000000000000000"
    );
}

/// The seeder re-renders a role only for the fleet-wide keys it names (render::FLEET_WIDE): a peer
/// enrolling must not touch agents, and a new client certificate must not touch pg nodes.
#[test]
fn roles_name_only_the_fleet_wide_keys_they_need() {
    let fleet = Fleet::parse(&fleet_text("fleet.lab.toml")).unwrap();
    let roles = roles();
    let r = Renderer::new(&fleet, &roles);
    let wide = |role: &str| -> BTreeSet<String> {
        r.role_deps(role)
            .unwrap_or_else(|| panic!("{role}: dependencies cannot be analysed"))
            .into_iter()
            .filter(|k| hiveseed_seeder::render::FLEET_WIDE.contains(&k.as_str()))
            .collect()
    };
    let set = |keys: &[&str]| keys.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>();
    assert_eq!(wide("pg"), set(&["region"]));
    assert_eq!(wide("peer"), set(&["allowlist", "mesh", "peers", "region"]));
    assert_eq!(wide("agent"), set(&[]));
    assert_eq!(wide("ctrl"), set(&[]));
}

// ---- the agents' LLM key ------------------------------------------------------------------------

/// `[agent_llm]` gives agent nodes the seed's §3.2 `[llm]` (xAI grok-4.3 by XAI_API_KEY) and the
/// key as the one line of a 0400 environment file; without it an agent has neither. The key is
/// in no other resource of any node.
#[test]
fn agents_get_their_llm_key_only_with_agent_llm() {
    let lab = fleet_text("fleet.lab.toml");
    let (_, without) = render_all(&lab);
    let agent = "do-1461-agent-nyc3-01";
    let res = &without[agent];
    assert!(res.iter().all(|r| r.id().as_str() != "file:env"));
    assert!(!text_of(res, "file:config").contains("[llm]"));

    let (_, with) = render_all(&format!("{lab}\n[agent_llm]\n"));
    let res = &with[agent];
    let Resource::File(env) = find(res, "file:env") else {
        panic!("file:env is not a file")
    };
    assert_eq!(env.path.as_str(), "/etc/ai-memory/ai-memory.env");
    assert_eq!(env.mode.to_string(), "0400");
    assert!(env.secret);
    assert_eq!(
        text_of(res, "file:env"),
        format!("XAI_API_KEY='{AGENT_LLM_KEY}'\n")
    );
    let config = text_of(res, "file:config");
    assert!(
        config.contains(
            "[llm]\nbackend = \"xai\"\nmodel = \"grok-4.3\"\napi_key_env = \"XAI_API_KEY\""
        ),
        "{config}"
    );
    for (node, res) in &with {
        for r in res {
            let text = serde_json::to_string(r).unwrap();
            if text.contains(AGENT_LLM_KEY) {
                assert_eq!(
                    (node.starts_with("do-1461-agent-"), r.id().as_str()),
                    (true, "file:env"),
                    "the agents' key leaked into {node} {}",
                    r.id()
                );
            }
        }
    }
}
