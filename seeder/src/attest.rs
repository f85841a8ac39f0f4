//! Attested writes as ai-memory 0.7.0 verifies them (#626 Layer-3): the `SignableWrite` envelope in
//! the daemon's canonical CBOR, Ed25519 over it, and the harness keys that sign.
//!
//! The envelope is a CBOR map of six entries whose text keys come out in the order of a Rust
//! `BTreeMap<&str, _>` (plain bytewise order: `agent_id`, `content_sha256`, `created_at`, `kind`,
//! `namespace`, `title`), which is what `identity::sign::canonical_cbor_write` emits. That is not
//! RFC 8949's length-first order; matching the daemon is what counts.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use ciborium::Value;
use ed25519_dalek::{Signer, SigningKey};
use hiveseed_proto::api::{AttestRequest, AttestResponse};
use sha2::{Digest, Sha256};

/// The six fields a store-path write signature commits to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignableWrite<'a> {
    pub agent_id: &'a str,
    pub namespace: &'a str,
    pub title: &'a str,
    /// The daemon's normalised kind (`observation`, `claim`, ...): an unknown kind is stored as
    /// `observation`, and the daemon verifies against what it stores.
    pub kind: &'a str,
    /// RFC 3339; the daemon adopts it verbatim within ±300 s of its clock.
    pub created_at: &'a str,
    pub content_sha256: [u8; 32],
}

impl SignableWrite<'_> {
    pub fn canonical_cbor(&self) -> Vec<u8> {
        let text = |s: &str| Value::Text(s.to_owned());
        // Already in the daemon's key order (see the module doc).
        let entries = vec![
            (text("agent_id"), text(self.agent_id)),
            (
                text("content_sha256"),
                Value::Bytes(self.content_sha256.to_vec()),
            ),
            (text("created_at"), text(self.created_at)),
            (text("kind"), text(self.kind)),
            (text("namespace"), text(self.namespace)),
            (text("title"), text(self.title)),
        ];
        let mut out = Vec::with_capacity(256);
        ciborium::ser::into_writer(&Value::Map(entries), &mut out)
            .expect("CBOR into a Vec cannot fail");
        out
    }

    /// The detached signature in the wire form the daemon decodes: standard base64.
    pub fn sign_b64(&self, key: &SigningKey) -> String {
        STANDARD.encode(key.sign(&self.canonical_cbor()).to_bytes())
    }
}

/// The signature an attested write described by `req` needs, as `agent_id` with `key`, dated
/// `created_at`: what `POST /v1/attest` answers.
pub fn sign_request(
    agent_id: &str,
    key: &SigningKey,
    req: &AttestRequest,
    created_at: String,
) -> AttestResponse {
    let signature = SignableWrite {
        agent_id,
        namespace: &req.namespace,
        title: &req.title,
        kind: &req.kind,
        created_at: &created_at,
        content_sha256: req.content_sha256.0,
    }
    .sign_b64(key);
    AttestResponse {
        agent_id: agent_id.to_owned(),
        created_at,
        signature,
    }
}

pub fn content_sha256(content: &str) -> [u8; 32] {
    Sha256::digest(content.as_bytes()).into()
}

/// A public key as `PUT /api/v1/agents/{id}/pubkey` takes it (URL-safe base64, no padding).
pub fn pubkey_b64(key: &SigningKey) -> String {
    URL_SAFE_NO_PAD.encode(key.verifying_key().as_bytes())
}

/// The JSON body of an attested `POST /api/v1/memories`.
#[derive(Debug, Clone)]
pub struct AttestedWrite {
    pub agent_id: String,
    pub namespace: String,
    pub title: String,
    pub kind: String,
    pub scope: String,
    pub content: String,
    pub created_at: String,
}

impl AttestedWrite {
    pub fn body(&self, key: &SigningKey) -> serde_json::Value {
        let envelope = SignableWrite {
            agent_id: &self.agent_id,
            namespace: &self.namespace,
            title: &self.title,
            kind: &self.kind,
            created_at: &self.created_at,
            content_sha256: content_sha256(&self.content),
        };
        serde_json::json!({
            "title": self.title,
            "content": self.content,
            "namespace": self.namespace,
            "kind": self.kind,
            "scope": self.scope,
            // Default `mid` expires after seven days; probes are deleted anyway.
            "tier": "long",
            "signature": envelope.sign_b64(key),
            "created_at": self.created_at,
        })
    }
}

/// `2026-06-01T12:00:00+00:00`, the form the seed signs.
pub fn rfc3339_now() -> String {
    format_utc(time::OffsetDateTime::now_utc())
}

/// Unix seconds as [`rfc3339_now`] writes them; `None` outside the calendar `time` handles.
pub fn rfc3339(unix: i64) -> Option<String> {
    time::OffsetDateTime::from_unix_timestamp(unix)
        .ok()
        .map(format_utc)
}

fn format_utc(t: time::OffsetDateTime) -> String {
    t.format(&time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second]+00:00"
    ))
    .expect("a fixed format")
}

/// Harness keys: `<dir>/<agent_id>.priv`, the raw 32-byte seed ai-memory's keypair module
/// writes, 0600 in a 0700 directory of the campaign.
#[derive(Debug, Clone)]
pub struct KeyStore {
    dir: PathBuf,
}

impl KeyStore {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The key of `agent_id`, made on first use.
    pub fn ensure(&self, agent_id: &str) -> Result<SigningKey> {
        if agent_id.is_empty() || agent_id.contains('/') || agent_id.starts_with('.') {
            bail!("agent id {agent_id:?} cannot name a key file");
        }
        let path = self.dir.join(format!("{agent_id}.priv"));
        match std::fs::read(&path) {
            Ok(bytes) => {
                let seed: [u8; 32] = bytes
                    .try_into()
                    .map_err(|_| anyhow::anyhow!("{} is not 32 bytes", path.display()))?;
                Ok(SigningKey::from_bytes(&seed))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                use std::os::unix::fs::PermissionsExt;
                std::fs::create_dir_all(&self.dir)
                    .with_context(|| format!("creating {}", self.dir.display()))?;
                std::fs::set_permissions(&self.dir, std::fs::Permissions::from_mode(0o700))?;
                let key = SigningKey::generate(&mut rand::rngs::OsRng);
                crate::campaign::write_atomic(&path, key.as_bytes(), 0o600)?;
                Ok(key)
            }
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// ai-memory's own write fixture (`identity::sign::tests::write_fixture` with
    /// `body_hash_fixture(0x20)`), encoded by hand from RFC 8949 major types with the keys in
    /// the daemon's BTreeMap order; not by ciborium.
    const FIXTURE_CBOR: &str = "a6686167656e745f69646a61693a63757261746f726e636f6e74656e745f736861323536582085202020202020202020202020202020202020202020202020202020202020206a637265617465645f61747819323032362d30362d30315431323a30303a30302b30303a3030646b696e646466616374696e616d6573706163656a7465616d2f616c706861657469746c65781b6b756265726e65746573206465706c6f796d656e74206775696465";
    /// Ed25519 (RFC 8032, deterministic) over FIXTURE_CBOR with seed [7; 32], computed with
    /// Python's `cryptography` package.
    const FIXTURE_SIG: &str =
        "t2mDvD6t51sf+MT1JTQRtgSAraNHF+elVVsJyfG0/YwICitbfxXaUgYPlgmZYMjMB0MdN8urpCS6Vl9ErGrSBg==";
    const FIXTURE_PUB: &str = "6kpsY-KcUgq-9VB7Ey7F-ZVHdq6-vnuSQh7qaRRG0iw";

    fn fixture() -> SignableWrite<'static> {
        let mut h = [0x20u8; 32];
        h[0] ^= 0xA5;
        SignableWrite {
            agent_id: "ai:curator",
            namespace: "team/alpha",
            title: "kubernetes deployment guide",
            kind: "fact",
            created_at: "2026-06-01T12:00:00+00:00",
            content_sha256: h,
        }
    }

    #[test]
    fn envelope_matches_the_daemons_encoding() {
        assert_eq!(hex::encode(fixture().canonical_cbor()), FIXTURE_CBOR);
    }

    #[test]
    fn signature_and_public_key_match_the_vector() {
        let key = SigningKey::from_bytes(&[7u8; 32]);
        assert_eq!(fixture().sign_b64(&key), FIXTURE_SIG);
        assert_eq!(pubkey_b64(&key), FIXTURE_PUB);
    }

    #[test]
    fn every_field_is_inside_the_signature() {
        let base = fixture();
        let key = SigningKey::from_bytes(&[7u8; 32]);
        let sig = base.sign_b64(&key);
        let variants = [
            SignableWrite {
                agent_id: "ai:impostor",
                ..base.clone()
            },
            SignableWrite {
                namespace: "team/beta",
                ..base.clone()
            },
            SignableWrite {
                title: "other",
                ..base.clone()
            },
            SignableWrite {
                kind: "plan",
                ..base.clone()
            },
            SignableWrite {
                created_at: "2026-06-01T12:00:01+00:00",
                ..base.clone()
            },
            SignableWrite {
                content_sha256: content_sha256("x"),
                ..base.clone()
            },
        ];
        for v in variants {
            assert_ne!(v.sign_b64(&key), sig, "{v:?}");
        }
    }

    #[test]
    fn content_hash_is_sha256_of_utf8() {
        assert_eq!(
            hex::encode(content_sha256("regression probe sentinel ABC quaternion")),
            "8ec726bd8a26a6919fb882794a30f79e3628271cd82818738532a350f26ee00a"
        );
    }

    #[test]
    fn keys_are_kept_0600_and_reused() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let store = KeyStore::new(tmp.path().join("harness-keys"));
        let a = store.ensure("ai:test-harness@c").unwrap();
        let b = store.ensure("ai:test-harness@c").unwrap();
        assert_eq!(a.to_bytes(), b.to_bytes());
        let path = store.dir().join("ai:test-harness@c.priv");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let dmode = std::fs::metadata(store.dir()).unwrap().permissions().mode() & 0o777;
        assert_eq!(dmode, 0o700);
        assert!(store.ensure("../escape").is_err());
    }

    proptest::proptest! {
        #[test]
        fn encoding_is_a_six_entry_map_that_round_trips(
            agent in ".{0,40}", ns in ".{0,40}", title in ".{0,80}", kind in "[a-z]{0,12}",
        ) {
            let w = SignableWrite {
                agent_id: &agent, namespace: &ns, title: &title, kind: &kind,
                created_at: "2026-06-01T12:00:00+00:00", content_sha256: [1; 32],
            };
            let bytes = w.canonical_cbor();
            let v: Value = ciborium::de::from_reader(&bytes[..]).unwrap();
            let Value::Map(m) = v else { panic!("not a map") };
            let keys: Vec<_> = m.iter().map(|(k, _)| k.as_text().unwrap().to_owned()).collect();
            proptest::prop_assert_eq!(keys, ["agent_id", "content_sha256", "created_at", "kind", "namespace", "title"]);
            proptest::prop_assert_eq!(m[0].1.as_text().unwrap(), agent.as_str());
            proptest::prop_assert_eq!(m[5].1.as_text().unwrap(), title.as_str());
        }
    }
}
