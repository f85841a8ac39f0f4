//! terraform/: `fmt -check`, and the provider-less render module applied offline to check each node's
//! `#cloud-config`: join.toml, trust anchors, the fetch script, secrets, stability and validations.
//!
//! The DigitalOcean root module cannot be initialised offline, so what it shares with `render/`
//! (variable declarations, the `fleet` and `cloud_init` module calls) is compared as text.

// Helpers outside #[test] fns too: a panic is how a test reports.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use ed25519_dalek::pkcs8::{EncodePrivateKey, EncodePublicKey};
use ed25519_dalek::SigningKey;
use hiveseed_proto::join::JoinConfig;
use rand::rngs::OsRng;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
use serde_json::{json, Value};

const SEEDER_URL: &str = "https://seeder.do-1461.example:8443";
const JOIN_PATH: &str = "/etc/hiveseed/join.toml";
const CA_PATH: &str = "/etc/hiveseed/ca.pem";
const FETCH_PATH: &str = "/usr/local/lib/hiveseed/fetch-bootstrap";
const SSH_FINGERPRINT: &str = "bf:0b:e1:92:6f:ea:0d:1d:e4:96:ee:ac:71:73:ed:4e";

fn terraform_src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../terraform")
}

/// The terraform CLI, run hermetically: no CLI config, no version check, no TF_VAR_* from outside.
struct Terraform;

impl Terraform {
    /// `None` only when skipped on purpose off CI; a missing terraform fails the test (tests/deps).
    fn get() -> Option<Self> {
        hiveseed_test_deps::terraform().map(|_| Self)
    }

    fn run(&self, dir: &Path, args: &[&str]) -> Output {
        let mut cmd = Command::new("terraform");
        cmd.args(args)
            .current_dir(dir)
            .env("TF_CLI_CONFIG_FILE", "/dev/null")
            .env("CHECKPOINT_DISABLE", "1")
            .env("TF_IN_AUTOMATION", "1")
            .env("TF_INPUT", "0");
        for (key, _) in std::env::vars_os() {
            let key = key.to_string_lossy();
            if key.starts_with("TF_VAR_")
                || key.starts_with("TF_CLI_ARGS")
                || key == "TF_DATA_DIR"
                || key == "TF_WORKSPACE"
            {
                cmd.env_remove(key.as_ref());
            }
        }
        cmd.output()
            .unwrap_or_else(|e| panic!("running terraform {args:?} in {}: {e}", dir.display()))
    }

    fn ok(&self, dir: &Path, args: &[&str]) -> String {
        let out = self.run(dir, args);
        assert!(
            out.status.success(),
            "terraform {args:?} in {} failed ({}):\n{}\n{}",
            dir.display(),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("terraform output is UTF-8")
    }
}

/// Copies a module tree, leaving out local state, lock files and tfvars someone may have left there.
fn copy_tree(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for entry in fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name();
        let name_str = name.to_string_lossy();
        if name_str == ".terraform"
            || name_str == ".terraform.lock.hcl"
            || name_str.starts_with("terraform.tfstate")
            || name_str.ends_with(".tfvars")
            || name_str.ends_with(".tfvars.json")
        {
            continue;
        }
        let target = to.join(&name);
        if entry.file_type().unwrap().is_dir() {
            copy_tree(&entry.path(), &target);
        } else {
            fs::copy(entry.path(), &target).unwrap();
        }
    }
}

/// A fresh, initialised copy of `render/` + `modules/` (the layout `../modules/cloud-init` expects).
fn render_workspace(tf: &Terraform) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    copy_tree(&terraform_src().join("render"), &tmp.path().join("render"));
    copy_tree(
        &terraform_src().join("modules"),
        &tmp.path().join("modules"),
    );
    let dir = tmp.path().join("render");
    tf.ok(&dir, &["init", "-input=false", "-no-color"]);
    (tmp, dir)
}

/// The campaign's public material plus the private keys that must never reach user_data.
struct Campaign {
    ca_pem: String,
    ca_key_pem: String,
    manifest_key_pem: String,
    manifest_signing_pem: String,
    bootstrap_sha256: String,
}

impl Campaign {
    fn generate() -> Self {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::CommonName, "do-1461 fleet CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca = params.self_signed(&key).unwrap();

        let signing = SigningKey::generate(&mut OsRng);
        Self {
            ca_pem: ca.pem(),
            ca_key_pem: key.serialize_pem(),
            manifest_key_pem: signing
                .verifying_key()
                .to_public_key_pem(Default::default())
                .unwrap(),
            manifest_signing_pem: signing
                .to_pkcs8_pem(Default::default())
                .unwrap()
                .to_string(),
            bootstrap_sha256: hex::encode(rand::random::<[u8; 32]>()),
        }
    }

    fn bootstrap_url(&self) -> String {
        format!("{SEEDER_URL}/v1/bootstrap/{}", self.bootstrap_sha256)
    }

    /// The body lines of both private keys: none may appear anywhere in user_data.
    fn private_key_lines(&self) -> Vec<String> {
        [&self.ca_key_pem, &self.manifest_signing_pem]
            .iter()
            .flat_map(|pem| pem.lines())
            .filter(|l| !l.starts_with("-----") && l.len() >= 16)
            .map(str::to_owned)
            .collect()
    }
}

struct NodeFixture {
    name: &'static str,
    role: &'static str,
    region: &'static str,
    token: String,
}

impl NodeFixture {
    fn new(name: &'static str, role: &'static str, region: &'static str) -> Self {
        // Shaped like a real token (<payload>.<signature>) and unique, so every occurrence is found.
        let token = format!(
            "{}.{}",
            hex::encode(rand::random::<[u8; 16]>()),
            hex::encode(rand::random::<[u8; 32]>())
        );
        Self {
            name,
            role,
            region,
            token,
        }
    }

    fn join_url(&self) -> String {
        format!("{SEEDER_URL}/v1/join/{}?token={}", self.name, self.token)
    }
}

/// What `seeder tfvars` writes.
fn tfvars(campaign: &Campaign, nodes: &[NodeFixture]) -> Value {
    let nodes: serde_json::Map<String, Value> = nodes
        .iter()
        .map(|n| {
            (
                n.name.to_owned(),
                json!({"role": n.role, "region": n.region, "size": "s-4vcpu-8gb", "join_url": n.join_url()}),
            )
        })
        .collect();
    json!({
        "campaign": "do-1461",
        "seeder_url": SEEDER_URL,
        "campaign_ca_pem": campaign.ca_pem,
        "manifest_key_pem": campaign.manifest_key_pem,
        "bootstrap_url": campaign.bootstrap_url(),
        "bootstrap_sha256": campaign.bootstrap_sha256,
        "nodes": nodes,
        "region_cidrs": {"fra1": "10.10.0.0/16", "nyc3": "10.11.0.0/16", "sgp1": "10.12.0.0/16"},
    })
}

fn write_json(path: &Path, value: &Value) {
    fs::write(path, serde_json::to_string_pretty(value).unwrap()).unwrap();
}

/// `terraform output -json` of the render module: (raw user_data, decoded user_data) per node.
fn rendered(tf: &Terraform, dir: &Path) -> (BTreeMap<String, String>, BTreeMap<String, Value>) {
    let out: Value = serde_json::from_str(&tf.ok(dir, &["output", "-json"])).unwrap();
    let raw = serde_json::from_value(out["user_data"]["value"].clone()).unwrap();
    let decoded = serde_json::from_value(out["user_data_decoded"]["value"].clone()).unwrap();
    (raw, decoded)
}

fn apply(tf: &Terraform, dir: &Path) {
    tf.ok(
        dir,
        &["apply", "-auto-approve", "-input=false", "-no-color"],
    );
}

fn write_file<'a>(doc: &'a Value, path: &str) -> &'a Value {
    doc["write_files"]
        .as_array()
        .expect("write_files is a list")
        .iter()
        .find(|f| f["path"] == path)
        .unwrap_or_else(|| panic!("write_files has no {path}"))
}

fn content(file: &Value) -> &str {
    file["content"].as_str().expect("content is a string")
}

#[test]
fn terraform_fmt_check_passes() {
    let Some(tf) = Terraform::get() else { return };
    let src = terraform_src();
    let out = tf.run(
        &src,
        &[
            "fmt",
            "-check",
            "-recursive",
            "-no-color",
            src.to_str().unwrap(),
        ],
    );
    assert!(
        out.status.success(),
        "terraform fmt -check -recursive terraform/ failed ({}); files needing `terraform fmt`:\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn render_writes_join_config_and_fetch_script_for_pg_and_peer() {
    let Some(tf) = Terraform::get() else { return };
    let campaign = Campaign::generate();
    let nodes = [
        NodeFixture::new("do-1461-pg-nyc3-01", "pg", "nyc3"),
        NodeFixture::new("do-1461-peer-nyc3-01", "peer", "nyc3"),
    ];
    let vars = tfvars(&campaign, &nodes);

    let (_tmp, dir) = render_workspace(&tf);
    write_json(&dir.join("nodes.auto.tfvars.json"), &vars);
    apply(&tf, &dir);
    let (raw, decoded) = rendered(&tf, &dir);

    let names: Vec<&str> = raw.keys().map(String::as_str).collect();
    assert_eq!(names, ["do-1461-peer-nyc3-01", "do-1461-pg-nyc3-01"]);
    let today = time::OffsetDateTime::now_utc().date().to_string();

    for node in &nodes {
        let user_data = &raw[node.name];
        let doc = &decoded[node.name];
        assert!(user_data.starts_with("#cloud-config\n"), "{user_data}");

        // Only what the lab plays (tests/lab/src/fleet.rs refuses any other key).
        let keys: Vec<&str> = doc
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(
            keys,
            ["hostname", "manage_etc_hosts", "runcmd", "write_files"]
        );
        assert_eq!(doc["hostname"], node.name);
        assert_eq!(doc["manage_etc_hosts"], true);
        let files = doc["write_files"].as_array().unwrap();
        let paths: Vec<&str> = files.iter().map(|f| f["path"].as_str().unwrap()).collect();
        assert_eq!(paths, [JOIN_PATH, CA_PATH, FETCH_PATH]);
        for file in files {
            for key in file.as_object().unwrap().keys() {
                assert!(
                    ["path", "content", "permissions", "owner", "encoding"].contains(&key.as_str()),
                    "write_files key {key} is not emulated by the lab"
                );
            }
            assert_eq!(file["owner"], "root:root");
        }

        // join.toml: 0600, parses as the agent's JoinConfig with this node's values.
        let join = write_file(doc, JOIN_PATH);
        assert_eq!(join["permissions"], "0600");
        let config: JoinConfig = toml::from_str(content(join))
            .unwrap_or_else(|e| panic!("join.toml of {} does not parse: {e}", node.name));
        assert_eq!(config.node.as_str(), node.name);
        assert_eq!(config.role.as_str(), node.role);
        assert_eq!(config.region.as_str(), node.region);
        assert_eq!(config.campaign.as_str(), "do-1461");
        assert_eq!(config.seeder_url, SEEDER_URL);
        assert_eq!(config.join_url, node.join_url());
        assert_eq!(config.ca_pem, campaign.ca_pem);
        assert_eq!(config.manifest_key_pem, campaign.manifest_key_pem);

        // ca.pem: the campaign CA, public.
        let ca = write_file(doc, CA_PATH);
        assert_eq!(ca["permissions"], "0644");
        assert_eq!(content(ca), campaign.ca_pem);

        // The fetch script: TLS against the campaign CA only, sha256 checked, then hand over.
        let fetch = write_file(doc, FETCH_PATH);
        assert_eq!(fetch["permissions"], "0755");
        let script = content(fetch);
        assert!(script.starts_with("#!/bin/sh\n"));
        for needle in [
            format!("url='{}'", campaign.bootstrap_url()),
            format!("sha256='{}'", campaign.bootstrap_sha256),
            "curl --fail --silent --show-error".to_owned(),
            "--cacert /etc/hiveseed/ca.pem --capath \"$nocapath\"".to_owned(),
            "sha256sum -c".to_owned(),
            "dest=/usr/local/bin/bootstrap".to_owned(),
            "mv -f \"$tmp\" \"$dest\"".to_owned(),
            "exec /usr/local/bin/bootstrap run\n".to_owned(),
        ] {
            assert!(
                script.contains(&needle),
                "fetch script lacks {needle:?}:\n{script}"
            );
        }
        assert!(
            !script.contains("set -x"),
            "the fetch script must not trace"
        );
        let syntax = Command::new("sh")
            .args(["-n", "-c", script])
            .output()
            .unwrap();
        assert!(
            syntax.status.success(),
            "fetch script is not valid sh: {}",
            String::from_utf8_lossy(&syntax.stderr)
        );

        assert_eq!(doc["runcmd"], json!([[FETCH_PATH]]));

        // Secrets: no private key, and of the tokens only this node's, once, inside join.toml.
        assert!(!user_data.contains("PRIVATE KEY"));
        for line in campaign.private_key_lines() {
            assert!(!user_data.contains(&line), "a private key line leaked");
        }
        assert_eq!(user_data.matches(node.token.as_str()).count(), 1);
        for file in doc["write_files"].as_array().unwrap() {
            let holds = content(file).contains(node.token.as_str());
            assert_eq!(
                holds,
                file["path"] == JOIN_PATH,
                "token in {}",
                file["path"]
            );
        }
        for other in nodes.iter().filter(|o| o.name != node.name) {
            assert!(!user_data.contains(other.token.as_str()));
        }

        // Nothing that changes on redeploy.
        assert!(!user_data.contains(&today), "user_data holds today's date");
        assert!(!user_data.to_lowercase().contains("generation"));
    }

    // Byte-identical: re-applied in place, and rendered from scratch in a fresh copy.
    apply(&tf, &dir);
    assert_eq!(rendered(&tf, &dir).0, raw, "re-apply changed user_data");
    let (_tmp2, dir2) = render_workspace(&tf);
    write_json(&dir2.join("nodes.auto.tfvars.json"), &vars);
    apply(&tf, &dir2);
    assert_eq!(rendered(&tf, &dir2).0, raw, "a fresh render differs");
}

#[test]
fn example_tfvars_renders_the_reference_fleet() {
    let Some(tf) = Terraform::get() else { return };
    let (_tmp, dir) = render_workspace(&tf);
    fs::copy(
        terraform_src().join("examples/nodes.auto.tfvars.json.example"),
        dir.join("nodes.auto.tfvars.json"),
    )
    .unwrap();
    apply(&tf, &dir);
    let (raw, decoded) = rendered(&tf, &dir);
    assert_eq!(raw.len(), 12, "3 regions x (1 pg + 3 peers)");
    for (name, doc) in &decoded {
        let config: JoinConfig = toml::from_str(content(write_file(doc, JOIN_PATH))).unwrap();
        assert_eq!(config.node.as_str(), name);
    }
}

type Mutation = fn(&mut Value);

/// (what, mutation, error expected in terraform's output, also refused by the root variables.tf
/// alone). Fleet rules live in modules/fleet and modules/cloud-init, which the root module calls
/// exactly as render/ does (`render_module_matches_what_droplets_receive`).
fn bad_fleets() -> Vec<(&'static str, Mutation, &'static str, bool)> {
    fn node<'a>(v: &'a mut Value, name: &str) -> &'a mut Value {
        &mut v["nodes"][name]
    }
    vec![
        (
            "unknown role",
            |v| node(v, "do-1461-peer-nyc3-01")["role"] = json!("db"),
            "role must be one of pg, peer, agent, ctrl",
            false,
        ),
        (
            "two pg in one region",
            |v| {
                let mut second = node(v, "do-1461-pg-nyc3-01").clone();
                second["join_url"] = json!(format!(
                    "{SEEDER_URL}/v1/join/do-1461-pg-nyc3-02?token=AAAA.BBBB"
                ));
                v["nodes"]["do-1461-pg-nyc3-02"] = second;
            },
            "at most one pg node per region",
            false,
        ),
        (
            "peer region without pg",
            |v| {
                v["nodes"]
                    .as_object_mut()
                    .unwrap()
                    .remove("do-1461-pg-nyc3-01");
            },
            "every region that has a peer must have exactly one pg node",
            false,
        ),
        (
            "sha256 not 64 lowercase hex",
            |v| v["bootstrap_sha256"] = json!("ABC123"),
            "bootstrap_sha256 must be 64 lowercase hex characters",
            true,
        ),
        (
            "seeder_url over http",
            |v| v["seeder_url"] = json!("http://seeder.do-1461.example:8443"),
            "seeder_url must be https://host[:port]",
            true,
        ),
        (
            "a private key instead of the CA certificate",
            |v| {
                v["campaign_ca_pem"] =
                    json!("-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIA==\n-----END PRIVATE KEY-----\n")
            },
            "campaign_ca_pem must be exactly one PEM CERTIFICATE block",
            true,
        ),
        (
            "manifest key not a public key PEM",
            |v| v["manifest_key_pem"] = json!("not a pem"),
            "manifest_key_pem must be exactly one PEM PUBLIC KEY block",
            true,
        ),
        (
            "join_url of another node",
            |v| {
                node(v, "do-1461-peer-nyc3-01")["join_url"] = json!(format!(
                    "{SEEDER_URL}/v1/join/do-1461-pg-nyc3-01?token=AAAA.BBBB"
                ))
            },
            "join_url must be",
            false,
        ),
        (
            "join_url on another host",
            |v| {
                node(v, "do-1461-peer-nyc3-01")["join_url"] = json!(
                    "https://elsewhere.example:8443/v1/join/do-1461-peer-nyc3-01?token=AAAA.BBBB"
                )
            },
            "join_url must be <seeder_url>/v1/join/do-1461-peer-nyc3-01?token=",
            false,
        ),
        (
            "token with characters that need quoting",
            |v| {
                node(v, "do-1461-peer-nyc3-01")["join_url"] = json!(format!(
                    "{SEEDER_URL}/v1/join/do-1461-peer-nyc3-01?token=AAAA BBBB\"\n"
                ))
            },
            "join_url must be <seeder_url>/v1/join/do-1461-peer-nyc3-01?token=",
            false,
        ),
        (
            "bootstrap served by another host",
            |v| {
                v["bootstrap_url"] = json!("https://elsewhere.example/bootstrap");
            },
            "bootstrap_url must be served by the seeder",
            false,
        ),
        (
            "node not named <campaign>-<role>-<region>-<NN>",
            |v| {
                let mut n = node(v, "do-1461-peer-nyc3-01").clone();
                n["join_url"] = json!(format!(
                    "{SEEDER_URL}/v1/join/do-1461-pg-nyc3-07?token=AAAA.BBBB"
                ));
                v["nodes"]["do-1461-pg-nyc3-07"] = n;
            },
            "must be named <campaign>-<role>-<region>-<NN>",
            false,
        ),
    ]
}

fn squash(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes)
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

#[test]
fn bad_fleets_are_refused_by_render_and_root_variables() {
    let Some(tf) = Terraform::get() else { return };
    let campaign = Campaign::generate();
    let nodes = [
        NodeFixture::new("do-1461-pg-nyc3-01", "pg", "nyc3"),
        NodeFixture::new("do-1461-peer-nyc3-01", "peer", "nyc3"),
    ];
    let good = tfvars(&campaign, &nodes);

    // render/ (with the cloud-init module's own checks), and the root module's variables.tf on its
    // own: the DigitalOcean resources cannot be planned offline, its variable validations can.
    let (_tmp, render) = render_workspace(&tf);
    let vars_only = tempfile::tempdir().unwrap();
    fs::copy(
        terraform_src().join("variables.tf"),
        vars_only.path().join("variables.tf"),
    )
    .unwrap();
    tf.ok(vars_only.path(), &["init", "-input=false", "-no-color"]);
    let fingerprint = format!("-var=ssh_key_fingerprint={SSH_FINGERPRINT}");
    let plan = |dir: &Path, file: &Path, extra: &[&str]| {
        let file = format!("-var-file={}", file.display());
        let mut args = vec!["plan", "-input=false", "-no-color", file.as_str()];
        args.extend_from_slice(extra);
        tf.run(dir, &args)
    };

    let cases_dir = tempfile::tempdir().unwrap();
    let good_file = cases_dir.path().join("good.json");
    write_json(&good_file, &good);
    // -var-file parses JSON only under a .json name.
    let example = cases_dir.path().join("example.json");
    fs::copy(
        terraform_src().join("examples/nodes.auto.tfvars.json.example"),
        &example,
    )
    .unwrap();
    for file in [&good_file, &example] {
        let out = plan(&render, file, &[]);
        assert!(
            out.status.success(),
            "render refused {}: {}",
            file.display(),
            squash(&out.stderr)
        );
        let out = plan(vars_only.path(), file, &[&fingerprint]);
        assert!(
            out.status.success(),
            "variables.tf refused {}: {}",
            file.display(),
            squash(&out.stderr)
        );
    }

    for (what, mutate, expected, root_too) in bad_fleets() {
        let mut vars = good.clone();
        mutate(&mut vars);
        let file = cases_dir.path().join("case.json");
        write_json(&file, &vars);
        let mut targets = vec![("render", plan(&render, &file, &[]))];
        if root_too {
            targets.push((
                "variables.tf",
                plan(vars_only.path(), &file, &[&fingerprint]),
            ));
        }
        for (target, out) in targets {
            let stderr = squash(&out.stderr);
            assert!(!out.status.success(), "{target} accepted {what}");
            assert!(
                stderr.contains(expected),
                "{target} refused {what} without {expected:?}: {stderr}"
            );
            // No refusal may print a token: a failing root-variable validation would quote the whole
            // tfvars value, which is why the fleet rules live in modules/fleet.
            for node in &nodes {
                assert!(
                    !stderr.contains(node.token.as_str()),
                    "{target} printed a join token ({what})"
                );
            }
        }
    }

    // DigitalOcean-only inputs: SSH and the peer port are never opened to the world.
    for cidr in ["0.0.0.0/0", "::/0"] {
        let var = format!("-var=admin_source_cidrs=[\"{cidr}\"]");
        let out = plan(vars_only.path(), &good_file, &[&fingerprint, &var]);
        assert!(!out.status.success(), "admin_source_cidrs accepted {cidr}");
        assert!(squash(&out.stderr).contains("never 0.0.0.0/0 or ::/0"));
    }
    let var = "-var=admin_source_cidrs=[\"203.0.113.7/32\"]";
    let out = plan(vars_only.path(), &good_file, &[&fingerprint, var]);
    assert!(out.status.success(), "{}", squash(&out.stderr));
}

/// Every top-level `<kind> "<label>"... {` … `}` block of a formatted .tf file, by its labels.
fn blocks(text: &str, kind: &str) -> BTreeMap<String, String> {
    let mut found = BTreeMap::new();
    let mut lines = text.lines();
    let prefix = format!("{kind} \"");
    while let Some(line) = lines.next() {
        if !line.starts_with(&prefix) {
            continue;
        }
        // `resource "a" "b" {` => "a.b"; `variable "x" {` => "x".
        let name = line
            .split('"')
            .skip(1)
            .step_by(2)
            .collect::<Vec<_>>()
            .join(".");
        let mut block = vec![line];
        for body in lines.by_ref() {
            block.push(body);
            if body == "}" {
                break;
            }
        }
        found.insert(name, block.join("\n"));
    }
    found
}

fn read(rel: &str) -> String {
    fs::read_to_string(terraform_src().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

#[test]
fn render_module_matches_what_droplets_receive() {
    // Pure text: runs with or without terraform.
    let root_vars = blocks(&read("variables.tf"), "variable");
    let render_vars = blocks(&read("render/variables.tf"), "variable");
    assert_eq!(
        render_vars.keys().collect::<Vec<_>>(),
        [
            "bootstrap_sha256",
            "bootstrap_url",
            "campaign",
            "campaign_ca_pem",
            "manifest_key_pem",
            "nodes",
            "seeder_url"
        ]
    );
    for (name, block) in &render_vars {
        assert_eq!(
            Some(block),
            root_vars.get(name),
            "variable {name} differs between render/variables.tf and variables.tf"
        );
    }

    // A failing validation on a root variable quotes its whole tfvars value: join tokens included.
    assert!(!root_vars["nodes"].contains("validation {"));

    let root_main = read("main.tf");
    let root_calls = blocks(&root_main, "module");
    let render_calls = blocks(&read("render/main.tf"), "module");
    assert_eq!(
        root_calls.keys().collect::<Vec<_>>(),
        ["cloud_init", "fleet"]
    );
    assert_eq!(
        root_calls.keys().collect::<Vec<_>>(),
        render_calls.keys().collect::<Vec<_>>()
    );
    for (name, root_call) in &root_calls {
        assert!(root_call.contains("\"./modules/"), "{root_call}");
        assert_eq!(
            render_calls[name].replace("\"../modules/", "\"./modules/"),
            *root_call,
            "render/main.tf calls module {name} differently from main.tf"
        );
    }

    let droplet = &blocks(&root_main, "resource")["digitalocean_droplet.node"];
    assert!(droplet.contains("for_each = var.nodes"));
    assert!(droplet.contains("user_data = module.cloud_init[each.key].user_data"));
    assert!(droplet.contains("ignore_changes = [user_data]"));

    let ignored = read(".gitignore");
    assert!(ignored.lines().any(|l| l == "nodes.auto.tfvars.json"));
}

fn seeder_ok(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_seeder"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "seeder {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// `seeder tfvars` + the render module give every node the same user_data before and after a
/// `seeder publish` (user_data must never change, or DigitalOcean replaces the droplet).
#[test]
fn user_data_is_byte_identical_across_publishes() {
    let Some(tf) = Terraform::get() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let roles = tmp.path().join("roles");
    copy_tree(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("../roles"),
        &roles,
    );
    let fleet = roles.join("fleet.example.toml");
    let dir = tmp.path().join("campaign");
    let d = dir.to_str().unwrap();
    seeder_ok(&["init", "--fleet", fleet.to_str().unwrap(), "--dir", d]);
    // The reference fleet's embedder and LLM need the operator's key (a fake one: nothing here
    // calls the API). It never reaches user_data: checked below.
    const LLM_KEY: &str = "sk-or-v1-FakeTerraformTestKey0123456789";
    let key = dir.join("secrets/llm-api-key");
    fs::write(&key, LLM_KEY).unwrap();
    fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let bin = tmp.path().join("bootstrap.bin");
    fs::write(&bin, b"not really an agent").unwrap();
    seeder_ok(&[
        "artifact",
        "add",
        "--dir",
        d,
        "--name",
        "bootstrap",
        bin.to_str().unwrap(),
    ]);

    let (_ws, render) = render_workspace(&tf);
    let tfvars = render.join("nodes.auto.tfvars.json");
    let user_data = || {
        seeder_ok(&["tfvars", "--dir", d, "--out", tfvars.to_str().unwrap()]);
        apply(&tf, &render);
        rendered(&tf, &render).0
    };
    let first = user_data();
    assert_eq!(first.len(), 12);
    // The VPC ranges come from the fleet, the same values the seeder certifies addresses in.
    let vars: Value = serde_json::from_str(&fs::read_to_string(&tfvars).unwrap()).unwrap();
    assert_eq!(
        vars["region_cidrs"],
        json!({"fra1": "10.10.0.0/16", "nyc3": "10.11.0.0/16", "sgp1": "10.12.0.0/16"})
    );
    assert!(read("main.tf").contains("var.region_cidrs[r]"));
    for (node, ud) in &first {
        assert!(
            !ud.contains(LLM_KEY),
            "{node}: the operator's key in user_data"
        );
    }

    let text = fs::read_to_string(&fleet).unwrap();
    fs::write(
        &fleet,
        text.replace("catchup_interval_secs = 30", "catchup_interval_secs = 31"),
    )
    .unwrap();
    let out = seeder_ok(&["publish", "--dir", d]);
    assert!(out.contains("published inputs"), "{out}");
    assert_eq!(user_data(), first, "a publish changed user_data");
    let out = seeder_ok(&["publish", "--dir", d]);
    assert!(out.contains("nothing published"), "{out}");
    assert_eq!(user_data(), first, "a no-op publish changed user_data");
}
