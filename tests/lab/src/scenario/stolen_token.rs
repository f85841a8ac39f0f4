//! `stolen token`: a node's join token, copied out of its user_data (what a service account on
//! the droplet can read from the metadata service, or anyone from a Terraform state file), is
//! used by another process at another lab address with a key of its own.
//!
//! - The node's token was used at its enrollment: refused `bad_token` ("was used at …"), the
//!   single-use check, which runs before attestation.
//! - With `[attestation]`, a fresh token the operator minted for that node (`seeder tfvars`, as
//!   before replacing it) is refused `attestation_failed` when presented with the node's droplet
//!   id from another address, and with a droplet id that does not exist; it stays unused, so
//!   the real replacement can still enroll with it.
//!
//! Each refusal is a refusal event; the node keeps its identity certificate and stays converged.

use std::net::Ipv4Addr;
use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use hiveseed_seeder::store::Store;

use super::{join_token, wait_reports, Record};
use crate::fleet::Fleet;

type Result<T> = anyhow::Result<T>;

const S: &str = "stolen token";

/// What the seeder answered a join attempt: the HTTP status and, for a refusal, its kind and
/// message.
#[derive(Debug)]
pub struct JoinAnswer {
    pub status: u16,
    pub kind: String,
    pub message: String,
}

impl std::fmt::Display for JoinAnswer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.status, self.kind, self.message)
    }
}

/// Another lab address in the region of the node whose public address is `public_of_node`,
/// used by no node: `127.1.R.200` (public) and `127.0.R.200` (inside the region's VPC range, so
/// the address checks pass and attestation is what decides).
pub fn impostor_addresses(public_of_node: Ipv4Addr) -> (Ipv4Addr, Ipv4Addr) {
    let [_, _, r, _] = public_of_node.octets();
    (Ipv4Addr::new(127, 1, r, 200), Ipv4Addr::new(127, 0, r, 200))
}

/// `POST /v1/join/{node}?token=…` from `source` with a fresh key of the caller's own and the
/// given facts, trusting the campaign CA.
pub fn join_as_impostor(
    f: &Fleet,
    node: &str,
    token: &str,
    source: Ipv4Addr,
    facts: serde_json::Value,
) -> Result<JoinAnswer> {
    let key = rcgen::KeyPair::generate().context("a key of the impostor's own")?;
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, node);
    let csr = params.serialize_request(&key)?.pem()?;
    let ca = std::fs::read(f.campaign_dir.join("ca.pem")).context("campaign ca.pem")?;
    let url = format!(
        "https://{}/v1/join/{node}?token={token}",
        crate::fleet::SEEDER_LISTEN
    );
    let body = serde_json::json!({"csr_pem": csr, "facts": facts});
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let client = reqwest::Client::builder()
            .local_address(std::net::IpAddr::V4(source))
            .add_root_certificate(reqwest::Certificate::from_pem(&ca)?)
            .timeout(Duration::from_secs(60))
            .build()?;
        let resp = client.post(&url).json(&body).send().await?;
        let status = resp.status().as_u16();
        let v: serde_json::Value = resp.json().await.unwrap_or_default();
        let text = |k: &str| v.get(k).and_then(|x| x.as_str()).unwrap_or("").to_owned();
        Ok(JoinAnswer {
            status,
            kind: if status == 200 {
                "enrolled".into()
            } else {
                text("kind")
            },
            message: text("message"),
        })
    })
}

/// The nonce of a join token, read from its payload (the seeder verified the token when it
/// minted it; this only names which use to look up).
pub fn token_nonce(token: &str) -> Option<String> {
    use base64::Engine;
    let payload = token.split_once('.')?.0;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .ok()?;
    let v: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    v.get("nonce")?.as_str().map(str::to_owned)
}

/// The refusal row of `kind` from `source`, described; empty when there is none.
fn refusal_recorded(store: &Store, source: Ipv4Addr, kind: &str) -> Result<String> {
    let rows = store.refusals(500)?;
    Ok(rows
        .iter()
        .find(|r| r.source == std::net::IpAddr::V4(source) && r.kind == kind)
        .map(|r| {
            format!(
                "{} from {} (node {}), {} time(s)",
                r.kind,
                r.source,
                r.node.as_deref().unwrap_or("-"),
                r.count
            )
        })
        .unwrap_or_default())
}

/// The node's standing identity: its enrollment's certificate fingerprint, if not revoked.
fn identity(store: &Store, node: &str) -> Result<Option<String>> {
    let name = node.parse()?;
    let Some(e) = store.enrollment(&name)? else {
        return Ok(None);
    };
    let standing = store
        .cert(&e.identity_fpr)?
        .is_some_and(|c| c.revoked_at.is_none());
    Ok(standing.then_some(e.identity_fpr))
}

/// A fresh join token for `node` from `seeder tfvars` (it mints one for every node whose token
/// was used), as the operator gets one before replacing a droplet.
fn fresh_token(f: &Fleet, node: &str, out: &Path) -> Result<String> {
    let run = f
        .seeder_cmd(&["tfvars", "--out"])
        .arg(out)
        .output()
        .context("seeder tfvars")?;
    anyhow::ensure!(
        run.status.success(),
        "seeder tfvars: {}",
        String::from_utf8_lossy(&run.stderr).trim()
    );
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(out)?)?;
    let url = v["nodes"][node]["join_url"]
        .as_str()
        .with_context(|| format!("no join_url for {node} in the tfvars"))?;
    join_token(url).with_context(|| format!("no token in {node}'s join_url"))
}

/// Bring-up: the seeder asked the cloud's API for every node's droplet and got it (the lab fleet
/// has `[attestation]`; without it, or with a seeder that never asks, this fails).
pub fn every_enrollment_attested(f: &Fleet, rec: &mut Record) -> Result<()> {
    let attested = hiveseed_seeder::fleet::Fleet::load(&f.fleet_file)?
        .attestation
        .is_some();
    let log = std::fs::read_to_string(f.lab.dir().join("do-api.log")).unwrap_or_default();
    let answered: std::collections::BTreeSet<String> = log
        .lines()
        .filter_map(|l| l.strip_prefix("GET /v2/droplets/"))
        .filter_map(|rest| rest.strip_suffix(" 200"))
        .map(str::to_owned)
        .collect();
    let missing: Vec<&str> = f
        .nodes
        .iter()
        .filter(|n| !answered.contains(&n.facts["droplet_id"].to_string()))
        .map(|n| n.name.as_str())
        .collect();
    rec.check(
        "bring-up",
        "every node's droplet looked up in the cloud's API at enrollment",
        format!(
            "{} of {} droplets answered 200",
            f.nodes.len(),
            f.nodes.len()
        ),
        if !attested {
            "the fleet has no [attestation]: no look-up".to_owned()
        } else if missing.is_empty() {
            format!(
                "{} of {} droplets answered 200",
                f.nodes.len(),
                f.nodes.len()
            )
        } else {
            format!(
                "{} of {} droplets answered 200; never looked up: {}",
                f.nodes.len() - missing.len(),
                f.nodes.len(),
                missing.join(", ")
            )
        },
        attested && missing.is_empty(),
    );
    Ok(())
}

pub fn stolen_token(f: &Fleet, rec: &mut Record) -> Result<()> {
    let victim = f
        .with_role("agent")
        .into_iter()
        .chain(f.with_role("peer"))
        .next()
        .cloned()
        .context("no agent or peer to steal a token from")?;
    let store = Store::open(&f.campaign_dir.join("state.db"))?;
    let before = identity(&store, &victim.name)?;
    let (impostor, impostor_private) = impostor_addresses(victim.public_ip);
    let droplet_id = victim.facts["droplet_id"].as_u64().unwrap_or_default();
    let facts = |droplet_id: u64| {
        serde_json::json!({
            "droplet_id": droplet_id,
            "region": victim.region,
            "public_ipv4": impostor.to_string(),
            "private_ipv4": impostor_private.to_string(),
        })
    };

    // 1. The token in the node's user_data, used at its enrollment.
    let used = f
        .user_data
        .get(&victim.name)
        .and_then(|ud| join_token(ud))
        .with_context(|| format!("no join token in {}'s user_data", victim.name))?;
    let got = join_as_impostor(f, &victim.name, &used, impostor, facts(droplet_id))?;
    rec.check(
        S,
        format!(
            "{}'s used token from {impostor} with another key: refused",
            victim.name
        ),
        "bad_token, \"was used at\"",
        got.to_string(),
        got.kind == "bad_token" && got.message.contains("was used at"),
    );
    let event = refusal_recorded(&store, impostor, "token_used")?;
    rec.check(
        S,
        "the used-token refusal is a refusal event",
        "token_used from the impostor's address",
        if event.is_empty() {
            "no such refusal row".into()
        } else {
            event.clone()
        },
        !event.is_empty(),
    );

    // 2. A fresh token for the node, stolen before the replacement droplet uses it.
    let attested = hiveseed_seeder::fleet::Fleet::load(&f.fleet_file)?
        .attestation
        .is_some();
    if attested {
        let out = f.lab.dir().join("stolen-token.tfvars.json");
        let fresh = fresh_token(f, &victim.name, &out)?;
        let _ = std::fs::remove_file(&out);
        for (what, id, field) in [
            ("the node's droplet id", droplet_id, "public"),
            (
                "a droplet id that does not exist",
                999_999_999,
                "does not exist",
            ),
        ] {
            let got = join_as_impostor(f, &victim.name, &fresh, impostor, facts(id))?;
            rec.check(
                S,
                format!(
                    "a fresh token for {} with {what} from {impostor}: refused",
                    victim.name
                ),
                format!("attestation_failed naming \"{field}\""),
                got.to_string(),
                got.kind == "attestation_failed" && got.message.contains(field),
            );
        }
        let event = refusal_recorded(&store, impostor, "attestation_failed")?;
        rec.check(
            S,
            "the attestation refusal is a refusal event",
            "attestation_failed from the impostor's address",
            if event.is_empty() {
                "no such refusal row".into()
            } else {
                event.clone()
            },
            !event.is_empty(),
        );
        let nonce = token_nonce(&fresh).context("the fresh token's nonce")?;
        let use_ = store.token_use(&victim.name.parse()?, &nonce)?;
        rec.check(
            S,
            "the fresh token is still unused after the refusals",
            "no use recorded",
            match &use_ {
                None => "no use recorded".into(),
                Some(u) => format!("used at {}", u.used_at),
            },
            use_.is_none(),
        );
    } else {
        rec.note("stolen token: the fleet has no [attestation]; only the used token was tried");
    }

    // The node is untouched.
    let after = identity(&store, &victim.name)?;
    rec.check(
        S,
        format!("{} keeps its identity certificate", victim.name),
        "the same unrevoked certificate",
        match (&before, &after) {
            (Some(b), Some(a)) if a == b => {
                format!("{}… unchanged, not revoked", a.get(..12).unwrap_or(a))
            }
            _ => format!("before {before:?}, after {after:?}"),
        },
        before.is_some() && before == after,
    );
    let reported = wait_reports(f, Duration::from_secs(120));
    let status = f.status()?;
    let phase = Fleet::node_status(&status, &victim.name)
        .and_then(|s| s["phase"].as_str().map(str::to_owned))
        .unwrap_or_default();
    rec.check(
        S,
        format!("{} reports and stays converged", victim.name),
        "reports, phase converged",
        format!(
            "{}, phase {phase}",
            if reported {
                "reported twice since"
            } else {
                "no new reports"
            }
        ),
        reported && phase == "converged",
    );
    Ok(())
}
