//! The campaign directory: every key, certificate and generated secret of one fleet, and `init`.
//!
//! Layout (directories 0700, private files 0600, public files 0644):
//! ```text
//! campaign.toml                 campaign name + the fleet file it was made for
//! ca.pem ca.key                 campaign CA (signs every leaf)
//! seeder.pem seeder.key         the seeder's own server certificate
//! manifest.key manifest.pub     Ed25519: signs manifests and join tokens
//! federation/<campaign>-ca.priv federation/<campaign>-ca.pub
//!                               Ed25519 zero-touch issuer, raw 32 bytes (ai-memory's format)
//! secrets/pg-password           fleet PostgreSQL password (48 alphanumerics)
//! secrets/api-key               ai-memory daemon API key (64 hex)
//! secrets/llm-api-key           the operator's LLM/embedding API key: put there by the operator
//!                               (never generated), one line, 0600 or 0400; read only when the
//!                               fleet's [embedder] or [llm] needs a key
//! secrets/do-api-token          a read-only DigitalOcean API token, put there by the operator,
//!                               same rules; read only when the fleet has [attestation]
//! ```
//! Nothing secret ever leaves this directory except inside a node's own manifest.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::{bail, Context, Result};
use ed25519_dalek::pkcs8::{DecodePrivateKey, EncodePrivateKey, EncodePublicKey};
use ed25519_dalek::{SigningKey, VerifyingKey};
use hiveseed_proto::Campaign;
use rand::rngs::OsRng;
use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::credential::Issuer;
use crate::fleet::Fleet;
use crate::pki::{self, CampaignCa, LeafSpec, LeafUsage};

const PRIVATE: u32 = 0o600;
const PUBLIC: u32 = 0o644;
const DIR: u32 = 0o700;

/// Paths inside a campaign directory; the one place that knows the layout.
#[derive(Debug, Clone)]
pub struct CampaignDir {
    root: PathBuf,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CampaignFile {
    pub campaign: String,
    /// Absolute path of the fleet.toml this campaign serves; `publish` re-reads it.
    pub fleet: PathBuf,
    /// Absolute path of the roles directory (role files + templates/).
    pub roles: PathBuf,
}

impl CampaignDir {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn campaign_file(&self) -> PathBuf {
        self.root.join("campaign.toml")
    }
    pub fn ca_cert(&self) -> PathBuf {
        self.root.join("ca.pem")
    }
    pub fn ca_key(&self) -> PathBuf {
        self.root.join("ca.key")
    }
    pub fn seeder_cert(&self) -> PathBuf {
        self.root.join("seeder.pem")
    }
    pub fn seeder_key(&self) -> PathBuf {
        self.root.join("seeder.key")
    }
    pub fn manifest_key(&self) -> PathBuf {
        self.root.join("manifest.key")
    }
    pub fn manifest_pub(&self) -> PathBuf {
        self.root.join("manifest.pub")
    }
    pub fn federation_dir(&self) -> PathBuf {
        self.root.join("federation")
    }
    pub fn federation_issuer_id(campaign: &str) -> String {
        format!("{campaign}-ca")
    }
    pub fn federation_priv(&self, campaign: &str) -> PathBuf {
        self.federation_dir()
            .join(format!("{}.priv", Self::federation_issuer_id(campaign)))
    }
    pub fn federation_pub(&self, campaign: &str) -> PathBuf {
        self.federation_dir()
            .join(format!("{}.pub", Self::federation_issuer_id(campaign)))
    }
    /// Ed25519 keys of the ai-memory agents the seeder signs for (`<agent_id>.priv`, raw seeds):
    /// the operator agent, and the `seeder test` harness agents.
    pub fn agent_keys_dir(&self) -> PathBuf {
        self.root.join("agent-keys")
    }
    /// The campaign's operator agent on every peer: the daemons' admin, and owner of the
    /// campaign namespace's standard (its key stays here; the seeder signs for it).
    pub fn operator_agent_id(campaign: &str) -> String {
        format!("ai:{campaign}-operator@{campaign}")
    }
    pub fn load_operator_agent(&self, campaign: &Campaign) -> Result<SigningKey> {
        crate::attest::KeyStore::new(self.agent_keys_dir())
            .ensure(&Self::operator_agent_id(campaign.as_str()))
    }
    pub fn secrets_dir(&self) -> PathBuf {
        self.root.join("secrets")
    }
    pub fn pg_password(&self) -> PathBuf {
        self.secrets_dir().join("pg-password")
    }
    pub fn api_key(&self) -> PathBuf {
        self.secrets_dir().join("api-key")
    }
    pub fn llm_api_key(&self) -> PathBuf {
        self.secrets_dir().join("llm-api-key")
    }
    pub fn agent_llm_api_key(&self) -> PathBuf {
        self.secrets_dir().join("agent-llm-api-key")
    }
    pub fn do_api_token(&self) -> PathBuf {
        self.secrets_dir().join("do-api-token")
    }
    pub fn operator_cert(&self) -> PathBuf {
        self.root.join("operator.pem")
    }
    pub fn operator_key(&self) -> PathBuf {
        self.root.join("operator.key")
    }
    pub fn state_db(&self) -> PathBuf {
        self.root.join("state.db")
    }
    pub fn artifacts_dir(&self) -> PathBuf {
        self.root.join("artifacts")
    }
    pub fn reports_dir(&self) -> PathBuf {
        self.root.join("reports")
    }
    pub fn serve_lock(&self) -> PathBuf {
        self.root.join("serve.lock")
    }

    pub fn read_campaign_file(&self) -> Result<CampaignFile> {
        let path = self.campaign_file();
        let text = fs::read_to_string(&path)
            .with_context(|| format!("reading {} (run `seeder init` first)", path.display()))?;
        toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))
    }

    pub fn load_ca(&self) -> Result<CampaignCa> {
        let cert = read_text(&self.ca_cert())?;
        let key = read_text(&self.ca_key())?;
        CampaignCa::load(&cert, &key).context("loading the campaign CA")
    }

    /// The campaign's zero-touch federation CA (raw 32-byte seed, ai-memory's format).
    pub fn load_federation_issuer(&self, campaign: &Campaign) -> Result<Issuer> {
        let path = self.federation_priv(campaign.as_str());
        let seed: [u8; 32] = fs::read(&path)
            .with_context(|| format!("reading {} (run `seeder init`)", path.display()))?
            .try_into()
            .map_err(|_| anyhow::anyhow!("{} is not a raw 32-byte Ed25519 seed", path.display()))?;
        Ok(Issuer::new(SigningKey::from_bytes(&seed), campaign))
    }

    /// The operator's LLM/embedding API key. Refused, naming the file and never quoting it,
    /// unless it is a regular file of mode 0600 or 0400 holding one line of key characters: the
    /// value becomes a `NAME=value` line of the peers' environment file, where a newline, a quote
    /// or a `$` would change what systemd reads.
    pub fn read_llm_api_key(&self) -> Result<String> {
        read_operator_key(&self.llm_api_key(), "the fleet's [embedder] or [llm]")
    }

    /// The operator's key for the agent nodes' LLM (`[agent_llm]`), by the same rules.
    pub fn read_agent_llm_api_key(&self) -> Result<String> {
        read_operator_key(&self.agent_llm_api_key(), "the fleet's [agent_llm]")
    }

    /// The read-only DigitalOcean API token residency attestation asks the API with
    /// (`[attestation]`), by the same rules as the LLM key.
    pub fn read_do_api_token(&self) -> Result<crate::digitalocean::ApiToken> {
        read_operator_key(&self.do_api_token(), "the fleet's [attestation]")
            .map(crate::digitalocean::ApiToken::new)
    }

    pub fn load_manifest_key(&self) -> Result<SigningKey> {
        let pem = read_text(&self.manifest_key())?;
        SigningKey::from_pkcs8_pem(&pem)
            .map_err(|e| anyhow::anyhow!("{}: {e}", self.manifest_key().display()))
    }
}

/// An API key the operator put in the campaign directory (see [`CampaignDir::read_llm_api_key`]).
fn read_operator_key(path: &Path, needed_by: &str) -> Result<String> {
    let shown = path.display();
    let meta = fs::metadata(path).with_context(|| {
        format!("{shown}: {needed_by} needs the operator's API key there (one line, chmod 600)")
    })?;
    if !meta.is_file() {
        bail!("{shown} is not a regular file");
    }
    let mode = meta.permissions().mode() & 0o7777;
    if mode != 0o600 && mode != 0o400 {
        bail!("{shown} has mode {mode:04o}; the operator's API key must be 0600 or 0400 (chmod 600 {shown})");
    }
    let bytes = fs::read(path).with_context(|| format!("reading {shown}"))?;
    let text = String::from_utf8(bytes)
        .map_err(|_| anyhow::anyhow!("{shown} is not text (the key is withheld)"))?;
    let key = text.trim();
    if key.is_empty() {
        bail!("{shown} is empty; put the operator's API key there (one line)");
    }
    if key.len() > 1024 {
        bail!("{shown} holds more than 1024 bytes; it must be one API key (withheld)");
    }
    check_secret_chars(&shown.to_string(), key)?;
    Ok(key.to_owned())
}

/// The characters a secret may hold, checked where secrets enter (`seeder publish`, and every
/// render of a running seeder): letters, digits and `- _ . ~ + / = :`. Every secret lands in a
/// line-oriented environment file, a SQL statement or an HTTP header, where a newline, a quote, a
/// `$` or a backslash means something; none of those is in the set. The error names the file and
/// the class of the first character outside it, never the value.
pub fn check_secret_chars(shown: &str, value: &str) -> Result<()> {
    let Some(bad) = value
        .chars()
        .find(|&c| !(c.is_ascii_alphanumeric() || "-_.~+/=:".contains(c)))
    else {
        return Ok(());
    };
    let class = match bad {
        '\n' => "a newline",
        '\r' => "a carriage return",
        ' ' | '\t' => "whitespace",
        c if c.is_control() => "a control character",
        '\'' | '"' | '`' => "a quote",
        '$' => "a dollar sign",
        '\\' => "a backslash",
        c if !c.is_ascii() => "a non-ASCII character",
        _ => "punctuation other than - _ . ~ + / = :",
    };
    bail!(
        "{shown} holds {class}; a secret must be one line of letters, digits and - _ . ~ + / = : (the value is withheld)"
    )
}

fn read_text(path: &Path) -> Result<String> {
    fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}

/// Create-or-tighten a directory to 0700.
fn ensure_dir(path: &Path, log: &mut Vec<String>) -> Result<()> {
    match fs::metadata(path) {
        Ok(m) if m.is_dir() => {
            if m.permissions().mode() & 0o7777 != DIR {
                fs::set_permissions(path, fs::Permissions::from_mode(DIR))
                    .with_context(|| format!("chmod 0700 {}", path.display()))?;
                log.push(format!("tightened {} to 0700", path.display()));
            }
            Ok(())
        }
        Ok(_) => bail!("{} exists and is not a directory", path.display()),
        Err(_) => {
            fs::create_dir_all(path).with_context(|| format!("creating {}", path.display()))?;
            fs::set_permissions(path, fs::Permissions::from_mode(DIR))
                .with_context(|| format!("chmod 0700 {}", path.display()))?;
            log.push(format!("created {}/", path.display()));
            Ok(())
        }
    }
}

/// Writes `bytes` to `path` with `mode` atomically: the file never exists with looser permissions
/// or partial content. The temp file's name is unique per process and call and it is created
/// exclusively with its final mode, so concurrent writers never share one.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let dir = path.parent().context("path has no parent")?;
    let tmp = dir.join(format!(
        ".{}.tmp{}-{}",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("file"),
        std::process::id(),
        COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    let written = (|| {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)
            .with_context(|| format!("creating {}", tmp.display()))?;
        f.write_all(bytes)
            .and_then(|_| f.sync_all())
            .with_context(|| format!("writing {}", tmp.display()))?;
        // The umask may have narrowed the mode at creation; never widened it.
        fs::set_permissions(&tmp, fs::Permissions::from_mode(mode))?;
        fs::rename(&tmp, path).with_context(|| format!("renaming into {}", path.display()))
    })();
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    written?;
    fs::File::open(dir).and_then(|d| d.sync_all()).ok();
    Ok(())
}

/// Ensures a file exists with `mode`; creates it from `make` only when missing.
fn ensure_file(
    path: &Path,
    mode: u32,
    log: &mut Vec<String>,
    make: impl FnOnce() -> Result<Vec<u8>>,
) -> Result<bool> {
    if let Ok(m) = fs::symlink_metadata(path) {
        if !m.is_file() {
            bail!("{} exists and is not a regular file", path.display());
        }
        if m.permissions().mode() & 0o7777 != mode {
            fs::set_permissions(path, fs::Permissions::from_mode(mode))?;
            log.push(format!(
                "kept {} (mode reset to {mode:04o})",
                path.display()
            ));
        } else {
            log.push(format!("kept {}", path.display()));
        }
        return Ok(false);
    }
    write_atomic(path, &make()?, mode)?;
    log.push(format!("created {} ({mode:04o})", path.display()));
    Ok(true)
}

fn alphanumeric(n: usize) -> String {
    OsRng
        .sample_iter(&rand::distributions::Alphanumeric)
        .take(n)
        .map(char::from)
        .collect()
}

/// `seeder init`: creates what is missing, keeps what exists, and says which. Idempotent.
pub fn init(
    dir: &CampaignDir,
    fleet_path: &Path,
    roles_dir: &Path,
    fleet: &Fleet,
    now: SystemTime,
) -> Result<Vec<String>> {
    let mut log = Vec::new();
    let campaign = fleet.campaign.as_str();
    ensure_dir(dir.root(), &mut log)?;

    let fleet_abs = fs::canonicalize(fleet_path)
        .with_context(|| format!("resolving {}", fleet_path.display()))?;
    if let Ok(existing) = dir.read_campaign_file() {
        if existing.campaign != campaign {
            bail!(
                "{} belongs to campaign {}, but {} describes campaign {campaign}; use another directory",
                dir.root().display(),
                existing.campaign,
                fleet_path.display()
            );
        }
    }
    let roles_abs = fs::canonicalize(roles_dir)
        .with_context(|| format!("resolving {}", roles_dir.display()))?;
    let cf = CampaignFile {
        campaign: campaign.to_owned(),
        fleet: fleet_abs,
        roles: roles_abs,
    };
    let cf_text = toml::to_string(&cf)?;
    if fs::read_to_string(dir.campaign_file()).ok().as_deref() != Some(cf_text.as_str()) {
        let existed = dir.campaign_file().exists();
        write_atomic(&dir.campaign_file(), cf_text.as_bytes(), PUBLIC)?;
        log.push(format!(
            "{} {}",
            if existed { "updated" } else { "created" },
            dir.campaign_file().display()
        ));
    } else {
        log.push(format!("kept {}", dir.campaign_file().display()));
    }

    // Campaign CA: the key and certificate only ever exist together.
    match (dir.ca_cert().exists(), dir.ca_key().exists()) {
        (true, true) => {
            ensure_file(&dir.ca_key(), PRIVATE, &mut log, || unreachable!())?;
            ensure_file(&dir.ca_cert(), PUBLIC, &mut log, || unreachable!())?;
        }
        (false, false) => {
            let (cert, key) = pki::generate_ca(campaign, now)?;
            ensure_file(&dir.ca_key(), PRIVATE, &mut log, || Ok(key.into_bytes()))?;
            ensure_file(&dir.ca_cert(), PUBLIC, &mut log, || Ok(cert.into_bytes()))?;
        }
        _ => bail!(
            "{} has only one of ca.pem and ca.key; restore the other from backup (regenerating would orphan every issued certificate)",
            dir.root().display()
        ),
    }
    let ca = dir.load_ca()?;

    // The seeder's server certificate must name the host droplets dial, and the seeder's own name
    // that agents require and no node certificate carries; reissue when it does not.
    let mut wanted: Vec<String> = vec![fleet.seeder.host.clone(), pki::SEEDER_CERT_NAME.to_owned()];
    wanted.extend(fleet.seeder_extra_sans.iter().cloned());
    wanted.sort();
    wanted.dedup();
    let current = fs::read_to_string(dir.seeder_cert())
        .ok()
        .and_then(|pem| pki::cert_sans(&pem).ok())
        .map(|mut s| {
            s.sort();
            s
        });
    if current.as_ref() != Some(&wanted) || !dir.seeder_key().exists() {
        let (cert, key) = ca.issue_with_new_key(&LeafSpec {
            common_name: format!("{campaign} seeder"),
            sans: wanted.clone(),
            usage: LeafUsage::Server,
            not_before: now,
            lifetime: Duration::from_secs(825 * 24 * 3600),
        })?;
        write_atomic(&dir.seeder_key(), key.as_bytes(), PRIVATE)?;
        write_atomic(&dir.seeder_cert(), cert.as_bytes(), PUBLIC)?;
        log.push(match current {
            None => format!(
                "created {} for {}",
                dir.seeder_cert().display(),
                wanted.join(", ")
            ),
            Some(old) => format!(
                "reissued {}: names changed from {} to {}",
                dir.seeder_cert().display(),
                old.join(", "),
                wanted.join(", ")
            ),
        });
    } else {
        ensure_file(&dir.seeder_key(), PRIVATE, &mut log, || unreachable!())?;
        ensure_file(&dir.seeder_cert(), PUBLIC, &mut log, || unreachable!())?;
    }

    // The operator's client identity: the fleet view, and the ctrl identity `seeder test` uses.
    if !(dir.operator_cert().exists() && dir.operator_key().exists()) {
        let (cert, key) = ca.issue_with_new_key(&LeafSpec {
            common_name: format!("{campaign}-operator"),
            sans: vec![],
            usage: LeafUsage::Client,
            not_before: now,
            lifetime: Duration::from_secs(825 * 24 * 3600),
        })?;
        write_atomic(&dir.operator_key(), key.as_bytes(), PRIVATE)?;
        write_atomic(&dir.operator_cert(), cert.as_bytes(), PUBLIC)?;
        log.push(format!("created {}", dir.operator_cert().display()));
    } else {
        ensure_file(&dir.operator_key(), PRIVATE, &mut log, || unreachable!())?;
        ensure_file(&dir.operator_cert(), PUBLIC, &mut log, || unreachable!())?;
    }

    // Manifest + join-token signing key.
    let created = ensure_file(&dir.manifest_key(), PRIVATE, &mut log, || {
        let key = SigningKey::generate(&mut OsRng);
        Ok(key
            .to_pkcs8_pem(Default::default())
            .map_err(|e| anyhow::anyhow!("encoding manifest key: {e}"))?
            .as_bytes()
            .to_vec())
    })?;
    let signing = dir.load_manifest_key()?;
    let pub_pem = signing
        .verifying_key()
        .to_public_key_pem(Default::default())
        .map_err(|e| anyhow::anyhow!("encoding manifest public key: {e}"))?;
    if created || fs::read_to_string(dir.manifest_pub()).ok().as_deref() != Some(pub_pem.as_str()) {
        write_atomic(&dir.manifest_pub(), pub_pem.as_bytes(), PUBLIC)?;
        log.push(format!("wrote {}", dir.manifest_pub().display()));
    } else {
        log.push(format!("kept {}", dir.manifest_pub().display()));
    }

    // Zero-touch federation issuer, in ai-memory's raw 32-byte key format.
    ensure_dir(&dir.federation_dir(), &mut log)?;
    ensure_file(&dir.federation_priv(campaign), PRIVATE, &mut log, || {
        Ok(SigningKey::generate(&mut OsRng).to_bytes().to_vec())
    })?;
    let seed: [u8; 32] = fs::read(dir.federation_priv(campaign))?
        .try_into()
        .map_err(|_| {
            anyhow::anyhow!(
                "{} is not 32 bytes",
                dir.federation_priv(campaign).display()
            )
        })?;
    let issuer_pub: VerifyingKey = SigningKey::from_bytes(&seed).verifying_key();
    if fs::read(dir.federation_pub(campaign)).ok().as_deref()
        != Some(issuer_pub.as_bytes().as_slice())
    {
        write_atomic(&dir.federation_pub(campaign), issuer_pub.as_bytes(), PUBLIC)?;
        log.push(format!("wrote {}", dir.federation_pub(campaign).display()));
    } else {
        log.push(format!("kept {}", dir.federation_pub(campaign).display()));
    }

    // Generated fleet secrets.
    ensure_dir(&dir.secrets_dir(), &mut log)?;
    ensure_file(&dir.pg_password(), PRIVATE, &mut log, || {
        Ok(alphanumeric(48).into_bytes())
    })?;
    ensure_file(&dir.api_key(), PRIVATE, &mut log, || {
        let bytes: [u8; 32] = rand::random();
        Ok(hex::encode(bytes).into_bytes())
    })?;
    // The operator agent's attestation key (made once; `seeder serve` signs with it).
    let agent_key = dir
        .agent_keys_dir()
        .join(format!("{}.priv", CampaignDir::operator_agent_id(campaign)));
    let existed = agent_key.exists();
    crate::attest::KeyStore::new(dir.agent_keys_dir())
        .ensure(&CampaignDir::operator_agent_id(campaign))?;
    log.push(format!(
        "{} {}",
        if existed { "kept" } else { "wrote" },
        agent_key.display()
    ));

    Ok(log)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    const EXAMPLE: &str = include_str!("../../roles/fleet.example.toml");

    fn snapshot(root: &Path) -> BTreeMap<PathBuf, (u32, Vec<u8>)> {
        let mut out = BTreeMap::new();
        let mut stack = vec![root.to_path_buf()];
        while let Some(d) = stack.pop() {
            let mode = fs::metadata(&d).unwrap().permissions().mode() & 0o7777;
            out.insert(d.clone(), (mode, Vec::new()));
            for e in fs::read_dir(&d).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() {
                    stack.push(p);
                } else {
                    let mode = fs::metadata(&p).unwrap().permissions().mode() & 0o7777;
                    out.insert(p.clone(), (mode, fs::read(&p).unwrap()));
                }
            }
        }
        out
    }

    fn setup() -> (tempfile::TempDir, PathBuf, Fleet) {
        let tmp = tempfile::tempdir().unwrap();
        let fleet_path = tmp.path().join("fleet.toml");
        fs::write(&fleet_path, EXAMPLE).unwrap();
        let fleet = Fleet::parse(EXAMPLE).unwrap();
        (tmp, fleet_path, fleet)
    }

    #[test]
    fn init_creates_files_with_modes_and_is_idempotent() {
        let (tmp, fleet_path, fleet) = setup();
        let dir = CampaignDir::new(tmp.path().join("campaign"));
        init(
            &dir,
            &fleet_path,
            fleet_path.parent().unwrap(),
            &fleet,
            SystemTime::now(),
        )
        .unwrap();

        let snap = snapshot(dir.root());
        let mode = |p: PathBuf| {
            snap.get(&p)
                .unwrap_or_else(|| panic!("missing {}", p.display()))
                .0
        };
        assert_eq!(mode(dir.root().to_path_buf()), 0o700);
        assert_eq!(mode(dir.secrets_dir()), 0o700);
        assert_eq!(mode(dir.federation_dir()), 0o700);
        for private in [
            dir.ca_key(),
            dir.seeder_key(),
            dir.manifest_key(),
            dir.federation_priv("do-1461"),
            dir.operator_key(),
            dir.pg_password(),
            dir.api_key(),
        ] {
            assert_eq!(mode(private.clone()), 0o600, "{}", private.display());
        }
        for public in [
            dir.ca_cert(),
            dir.seeder_cert(),
            dir.manifest_pub(),
            dir.federation_pub("do-1461"),
        ] {
            assert_eq!(mode(public.clone()), 0o644, "{}", public.display());
        }
        let pw = fs::read_to_string(dir.pg_password()).unwrap();
        assert_eq!(pw.len(), 48);
        assert!(pw.bytes().all(|b| b.is_ascii_alphanumeric()));
        let key = fs::read_to_string(dir.api_key()).unwrap();
        assert_eq!(key.len(), 64);
        assert_eq!(fs::read(dir.federation_pub("do-1461")).unwrap().len(), 32);
        assert_eq!(
            pki::cert_sans(&fs::read_to_string(dir.seeder_cert()).unwrap()).unwrap(),
            ["seeder.do-1461.example", pki::SEEDER_CERT_NAME]
        );

        // Second run: byte-for-byte and mode-for-mode the same, and it says it kept everything.
        let log = init(
            &dir,
            &fleet_path,
            fleet_path.parent().unwrap(),
            &fleet,
            SystemTime::now(),
        )
        .unwrap();
        assert_eq!(snapshot(dir.root()), snap);
        assert!(log.iter().all(|l| l.starts_with("kept")), "{log:#?}");
    }

    #[test]
    fn init_refuses_another_campaign_and_half_a_ca() {
        let (tmp, fleet_path, fleet) = setup();
        let dir = CampaignDir::new(tmp.path().join("campaign"));
        init(
            &dir,
            &fleet_path,
            fleet_path.parent().unwrap(),
            &fleet,
            SystemTime::now(),
        )
        .unwrap();

        let other =
            Fleet::parse(&EXAMPLE.replace("campaign = \"do-1461\"", "campaign = \"other\""))
                .unwrap();
        let err = init(
            &dir,
            &fleet_path,
            fleet_path.parent().unwrap(),
            &other,
            SystemTime::now(),
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("belongs to campaign do-1461"),
            "{err}"
        );

        let before = fs::read(dir.ca_cert()).unwrap();
        fs::remove_file(dir.ca_key()).unwrap();
        let err = init(
            &dir,
            &fleet_path,
            fleet_path.parent().unwrap(),
            &fleet,
            SystemTime::now(),
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("only one of ca.pem and ca.key"),
            "{err}"
        );
        assert_eq!(
            fs::read(dir.ca_cert()).unwrap(),
            before,
            "nothing regenerated"
        );
    }

    /// The operator's key: refused with the file's name and never its content when missing,
    /// empty, loose, not a regular file, or not one line of key characters; 0600 and 0400 work.
    #[test]
    fn a_secret_outside_the_safe_set_is_refused_by_class_never_shown() {
        let generated = [alphanumeric(48), hex::encode([0xa5u8; 32])];
        for ok in generated
            .iter()
            .map(String::as_str)
            .chain(["sk-or-v1_a.b~c+d/e=f:g"])
        {
            check_secret_chars("secrets/x", ok).unwrap();
        }
        for (bad, class) in [
            ("Sv3t\nAI_MEMORY_FED_REQUIRE_SIG=0", "a newline"),
            ("Sv3t\r", "a carriage return"),
            ("Sv3t\0", "a control character"),
            ("Sv3t Sv3t", "whitespace"),
            ("Sv3t\tSv3t", "whitespace"),
            ("Sv3t'", "a quote"),
            ("Sv3t\"", "a quote"),
            ("Sv3t$$", "a dollar sign"),
            ("Sv3t\\", "a backslash"),
            ("Sv3t\u{e9}", "a non-ASCII character"),
            ("Sv3t#", "punctuation"),
        ] {
            let err = format!(
                "{:#}",
                check_secret_chars("secrets/pg-password", bad).unwrap_err()
            );
            assert!(err.contains("secrets/pg-password"), "{bad:?}: {err}");
            assert!(err.contains(class), "{bad:?}: {err}");
            assert!(!err.contains("Sv3t"), "{bad:?}: the value leaked: {err}");
        }
    }

    #[test]
    fn the_do_api_token_follows_the_operator_key_rules() {
        const TOKEN: &str = "dop_v1_FakeTestToken0123456789abcdef";
        let tmp = tempfile::tempdir().unwrap();
        let dir = CampaignDir::new(tmp.path());
        fs::create_dir_all(dir.secrets_dir()).unwrap();
        let path = dir.do_api_token();
        let err = format!("{:#}", dir.read_do_api_token().unwrap_err());
        assert!(
            err.contains("secrets/do-api-token") && err.contains("[attestation]"),
            "{err}"
        );
        fs::write(&path, TOKEN).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        let err = format!("{:#}", dir.read_do_api_token().unwrap_err());
        assert!(err.contains("mode 0644"), "{err}");
        assert!(!err.contains("FakeTestToken"), "the token leaked: {err}");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o400)).unwrap();
        let token = dir.read_do_api_token().unwrap();
        assert_eq!(token.expose(), TOKEN);
        assert!(!format!("{token:?}").contains("FakeTestToken"));
    }

    #[test]
    fn the_operator_key_file_is_strict_and_never_quoted() {
        const KEY: &str = "sk-or-v1-FakeTestKey0123456789abcdef";
        let tmp = tempfile::tempdir().unwrap();
        let dir = CampaignDir::new(tmp.path());
        fs::create_dir_all(dir.secrets_dir()).unwrap();
        let path = dir.llm_api_key();
        let shown = path.display().to_string();
        let write = |bytes: &[u8], mode: u32| {
            let _ = fs::remove_file(&path);
            let _ = fs::remove_dir(&path);
            fs::write(&path, bytes).unwrap();
            fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
        };
        let refused = |why: &str| {
            let err = format!("{:#}", dir.read_llm_api_key().unwrap_err());
            assert!(err.contains(&shown), "{why}: {err}");
            assert!(!err.contains("FakeTestKey"), "{why}: the key leaked: {err}");
            err
        };

        assert!(refused("missing").contains("operator's API key"));
        write(b"", 0o600);
        assert!(refused("empty").contains("is empty"));
        write(b" \n\n", 0o600);
        assert!(refused("blank").contains("is empty"));
        for mode in [0o644, 0o640, 0o604, 0o700, 0o660] {
            write(KEY.as_bytes(), mode);
            let err = refused("loose");
            assert!(err.contains(&format!("{mode:04o}")), "{err}");
        }
        for bad in [
            format!("{KEY}\nAI_MEMORY_FED_REQUIRE_SIG=0"),
            format!("{KEY} {KEY}"),
            format!("\"{KEY}\""),
            format!("{KEY}$HOME"),
            format!("{KEY}#"),
            "x".repeat(1025),
        ] {
            write(bad.as_bytes(), 0o600);
            refused(&bad);
        }
        write(&[0xff, 0xfe, b'k'], 0o600);
        refused("not utf-8");
        let _ = fs::remove_file(&path);
        fs::create_dir(&path).unwrap();
        refused("a directory");
        fs::remove_dir(&path).unwrap();

        for mode in [0o600, 0o400] {
            write(format!("{KEY}\n").as_bytes(), mode);
            assert_eq!(dir.read_llm_api_key().unwrap(), KEY);
        }
    }

    #[test]
    fn loose_modes_are_tightened_and_a_changed_seeder_host_reissues_only_its_cert() {
        let (tmp, fleet_path, fleet) = setup();
        let dir = CampaignDir::new(tmp.path().join("campaign"));
        init(
            &dir,
            &fleet_path,
            fleet_path.parent().unwrap(),
            &fleet,
            SystemTime::now(),
        )
        .unwrap();
        fs::set_permissions(dir.pg_password(), fs::Permissions::from_mode(0o644)).unwrap();
        let ca_before = fs::read(dir.ca_key()).unwrap();

        let moved = Fleet::parse(&EXAMPLE.replace("seeder.do-1461.example", "127.0.9.1")).unwrap();
        let log = init(
            &dir,
            &fleet_path,
            fleet_path.parent().unwrap(),
            &moved,
            SystemTime::now(),
        )
        .unwrap();
        assert_eq!(
            fs::metadata(dir.pg_password())
                .unwrap()
                .permissions()
                .mode()
                & 0o777,
            0o600
        );
        assert!(log.iter().any(|l| l.starts_with("reissued")), "{log:#?}");
        assert_eq!(
            pki::cert_sans(&fs::read_to_string(dir.seeder_cert()).unwrap()).unwrap(),
            ["127.0.9.1", pki::SEEDER_CERT_NAME]
        );
        assert_eq!(fs::read(dir.ca_key()).unwrap(), ca_before);
    }
}
