//! Zero-touch federation credentials in ai-memory 0.7.0's wire format (reference spec §6):
//! `v1=` + standard base64 of the CBOR map `{"claims": bstr, "sig": bstr}`, where `claims` are the
//! canonical CBOR bytes of `{cred_version, issuer_id, not_after, not_before, subject_agent_id,
//! subject_pubkey, trust_domain}` (keys in that lexicographic order) and `sig` is the issuer's
//! Ed25519 signature over exactly those bytes.
//!
//! Shared by both binaries: the seeder [`mint`]s a credential for a node's own federation key
//! (generated on the node; only the public half is sent), with the fleet's TTL instead of
//! ai-memory's 1 h default that partitions a hive; the agent checks what it received and what is
//! on disk with [`SignedCredential`]. [`verify`] applies the same rules a receiving ai-memory peer
//! does (`src/federation/identity/credential.rs`, `trust_bundle.rs`). Pure: no I/O.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use ciborium::Value;
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};

pub const CRED_VERSION: u16 = 1;
pub const PREFIX: &str = "v1=";
/// ai-memory's issuer backdates `not_before` by this much for clock skew.
pub const CLOCK_SKEW_SECS: i64 = 30;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claims {
    pub subject_agent_id: String,
    pub subject_pubkey: [u8; 32],
    pub issuer_id: String,
    pub trust_domain: String,
    pub not_before: i64,
    pub not_after: i64,
    pub cred_version: u16,
}

/// The refusals of a receiving peer, with ai-memory's tags.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CredentialError {
    #[error("credential_malformed")]
    Malformed,
    #[error("credential_bad_signature")]
    BadSignature,
    #[error("credential_not_yet_valid")]
    NotYetValid,
    #[error("credential_expired")]
    Expired,
    #[error("credential_unsupported_version")]
    UnsupportedVersion(u16),
    #[error("credential_bad_subject_key")]
    BadSubjectKey,
    #[error("credential_unknown_issuer")]
    UnknownIssuer,
    #[error("credential_wrong_trust_domain")]
    WrongTrustDomain,
}

fn int(n: i64) -> Value {
    Value::Integer(n.into())
}

impl Claims {
    /// Canonical CBOR of the claims: a map with text keys in lexicographic order.
    pub fn canonical_bytes(&self) -> Vec<u8> {
        let entries = vec![
            (
                Value::Text("cred_version".into()),
                int(i64::from(self.cred_version)),
            ),
            (
                Value::Text("issuer_id".into()),
                Value::Text(self.issuer_id.clone()),
            ),
            (Value::Text("not_after".into()), int(self.not_after)),
            (Value::Text("not_before".into()), int(self.not_before)),
            (
                Value::Text("subject_agent_id".into()),
                Value::Text(self.subject_agent_id.clone()),
            ),
            (
                Value::Text("subject_pubkey".into()),
                Value::Bytes(self.subject_pubkey.to_vec()),
            ),
            (
                Value::Text("trust_domain".into()),
                Value::Text(self.trust_domain.clone()),
            ),
        ];
        let mut out = Vec::with_capacity(160);
        ciborium::ser::into_writer(&Value::Map(entries), &mut out).expect("writing to a Vec");
        out
    }

    fn from_bytes(bytes: &[u8]) -> Result<Self, CredentialError> {
        let Value::Map(entries) =
            ciborium::de::from_reader(bytes).map_err(|_| CredentialError::Malformed)?
        else {
            return Err(CredentialError::Malformed);
        };
        let mut map = std::collections::BTreeMap::new();
        for (k, v) in entries {
            let Value::Text(k) = k else {
                return Err(CredentialError::Malformed);
            };
            map.insert(k, v);
        }
        let text = |m: &mut std::collections::BTreeMap<String, Value>, k: &str| match m.remove(k) {
            Some(Value::Text(s)) => Ok(s),
            _ => Err(CredentialError::Malformed),
        };
        let num = |m: &mut std::collections::BTreeMap<String, Value>, k: &str| match m.remove(k) {
            Some(Value::Integer(i)) => {
                i64::try_from(i128::from(i)).map_err(|_| CredentialError::Malformed)
            }
            _ => Err(CredentialError::Malformed),
        };
        let pubkey: [u8; 32] = match map.remove("subject_pubkey") {
            Some(Value::Bytes(b)) => b.try_into().map_err(|_| CredentialError::Malformed)?,
            _ => return Err(CredentialError::Malformed),
        };
        let version = u16::try_from(num(&mut map, "cred_version")?)
            .map_err(|_| CredentialError::Malformed)?;
        Ok(Self {
            subject_agent_id: text(&mut map, "subject_agent_id")?,
            subject_pubkey: pubkey,
            issuer_id: text(&mut map, "issuer_id")?,
            trust_domain: text(&mut map, "trust_domain")?,
            not_before: num(&mut map, "not_before")?,
            not_after: num(&mut map, "not_after")?,
            cred_version: version,
        })
    }
}

/// Mints a credential for `subject_pubkey`, valid from `now - skew` to `now + ttl`.
pub fn mint(
    issuer: &SigningKey,
    issuer_id: &str,
    trust_domain: &str,
    subject_agent_id: &str,
    subject_pubkey: [u8; 32],
    now: i64,
    ttl_secs: i64,
) -> Result<(String, Claims), CredentialError> {
    VerifyingKey::from_bytes(&subject_pubkey).map_err(|_| CredentialError::BadSubjectKey)?;
    let claims = Claims {
        subject_agent_id: subject_agent_id.to_owned(),
        subject_pubkey,
        issuer_id: issuer_id.to_owned(),
        trust_domain: trust_domain.to_owned(),
        not_before: now - CLOCK_SKEW_SECS,
        not_after: now + ttl_secs,
        cred_version: CRED_VERSION,
    };
    let bytes = claims.canonical_bytes();
    let sig = issuer.sign(&bytes);
    let wire = vec![
        (Value::Text("claims".into()), Value::Bytes(bytes)),
        (
            Value::Text("sig".into()),
            Value::Bytes(sig.to_bytes().to_vec()),
        ),
    ];
    let mut out = Vec::new();
    ciborium::ser::into_writer(&Value::Map(wire), &mut out).expect("writing to a Vec");
    Ok((format!("{PREFIX}{}", STANDARD.encode(out)), claims))
}

/// A parsed credential: the claims, the exact bytes the issuer signed, and the signature. Parsing
/// checks only the shape; [`SignedCredential::check_issuer`] and [`SignedCredential::check_window`]
/// apply the receiver's rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedCredential {
    pub claims: Claims,
    claims_bytes: Vec<u8>,
    sig: [u8; 64],
}

impl SignedCredential {
    /// Parses a header value or credential file (`v1=<base64>`, surrounding whitespace ignored as
    /// ai-memory does when it loads `AI_MEMORY_FED_CRED_PATH`).
    pub fn parse(header: &str) -> Result<Self, CredentialError> {
        let header = header.trim();
        let b64 = match header.strip_prefix(PREFIX) {
            Some(b) => b,
            None => {
                let v = header
                    .strip_prefix('v')
                    .and_then(|r| r.split_once('='))
                    .and_then(|(d, _)| d.parse::<u16>().ok());
                return Err(v
                    .map(CredentialError::UnsupportedVersion)
                    .unwrap_or(CredentialError::Malformed));
            }
        };
        let wire = STANDARD
            .decode(b64)
            .map_err(|_| CredentialError::Malformed)?;
        let Value::Map(entries) =
            ciborium::de::from_reader(&wire[..]).map_err(|_| CredentialError::Malformed)?
        else {
            return Err(CredentialError::Malformed);
        };
        let (mut claims_bytes, mut sig) = (None, None);
        for (k, v) in entries {
            match (k, v) {
                (Value::Text(k), Value::Bytes(b)) if k == "claims" => claims_bytes = Some(b),
                (Value::Text(k), Value::Bytes(b)) if k == "sig" => sig = Some(b),
                _ => return Err(CredentialError::Malformed),
            }
        }
        let claims_bytes = claims_bytes.ok_or(CredentialError::Malformed)?;
        let sig: [u8; 64] = sig
            .ok_or(CredentialError::Malformed)?
            .try_into()
            .map_err(|_| CredentialError::Malformed)?;
        let claims = Claims::from_bytes(&claims_bytes)?;
        Ok(Self {
            claims,
            claims_bytes,
            sig,
        })
    }

    /// Trust domain, known issuer, version and the issuer's signature over the exact claims bytes.
    pub fn check_issuer(
        &self,
        issuers: &[(&str, VerifyingKey)],
        trust_domain: Option<&str>,
    ) -> Result<(), CredentialError> {
        if let Some(d) = trust_domain {
            if self.claims.trust_domain != d {
                return Err(CredentialError::WrongTrustDomain);
            }
        }
        let issuer = issuers
            .iter()
            .find(|(id, _)| *id == self.claims.issuer_id)
            .map(|(_, k)| k)
            .ok_or(CredentialError::UnknownIssuer)?;
        if self.claims.cred_version > CRED_VERSION {
            return Err(CredentialError::UnsupportedVersion(
                self.claims.cred_version,
            ));
        }
        issuer
            .verify(&self.claims_bytes, &Signature::from_bytes(&self.sig))
            .map_err(|_| CredentialError::BadSignature)
    }

    /// The key the credential binds, if it is a curve point.
    pub fn subject_key(&self) -> Result<VerifyingKey, CredentialError> {
        VerifyingKey::from_bytes(&self.claims.subject_pubkey)
            .map_err(|_| CredentialError::BadSubjectKey)
    }

    /// `not_before <= now <= not_after`, as the receiver checks it.
    pub fn check_window(&self, now: i64) -> Result<(), CredentialError> {
        if now < self.claims.not_before {
            return Err(CredentialError::NotYetValid);
        }
        if now > self.claims.not_after {
            return Err(CredentialError::Expired);
        }
        Ok(())
    }
}

/// Verifies a credential as a receiving ai-memory peer does: prefix and version, CBOR shape,
/// trust domain, known issuer, signature over the exact claims bytes, validity window.
pub fn verify(
    header: &str,
    issuers: &[(&str, VerifyingKey)],
    trust_domain: Option<&str>,
    now: i64,
) -> Result<Claims, CredentialError> {
    let c = SignedCredential::parse(header)?;
    c.check_issuer(issuers, trust_domain)?;
    c.check_window(now)?;
    c.subject_key()?;
    Ok(c.claims)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::OsRng;

    const NOW: i64 = 1_800_000_000;
    const WEEK: i64 = 604_800;

    fn setup() -> (SigningKey, SigningKey, String) {
        let issuer = SigningKey::generate(&mut OsRng);
        let node = SigningKey::generate(&mut OsRng);
        let (cred, _) = mint(
            &issuer,
            "do-1461-ca",
            "do-1461.fleet",
            "do-1461/nyc3/do-1461-peer-nyc3-01",
            node.verifying_key().to_bytes(),
            NOW,
            WEEK,
        )
        .unwrap();
        (issuer, node, cred)
    }

    #[test]
    fn verifies_under_the_receivers_rules_for_the_whole_ttl() {
        let (issuer, node, cred) = setup();
        let keys = [("do-1461-ca", issuer.verifying_key())];
        let c = verify(&cred, &keys, Some("do-1461.fleet"), NOW).unwrap();
        assert_eq!(c.subject_pubkey, node.verifying_key().to_bytes());
        assert_eq!(c.subject_agent_id, "do-1461/nyc3/do-1461-peer-nyc3-01");
        assert_eq!((c.not_before, c.not_after), (NOW - 30, NOW + WEEK));
        assert!(verify(&cred, &keys, Some("do-1461.fleet"), NOW + WEEK).is_ok());
        assert_eq!(
            verify(&cred, &keys, None, NOW + WEEK + 1),
            Err(CredentialError::Expired)
        );
        assert_eq!(
            verify(&cred, &keys, None, NOW - 31),
            Err(CredentialError::NotYetValid)
        );
    }

    #[test]
    fn each_refusal_has_its_tag() {
        let (issuer, _, cred) = setup();
        let keys = [("do-1461-ca", issuer.verifying_key())];
        let other = SigningKey::generate(&mut OsRng);
        assert_eq!(
            verify(&cred, &[("do-1461-ca", other.verifying_key())], None, NOW),
            Err(CredentialError::BadSignature)
        );
        assert_eq!(
            verify(&cred, &[("other-ca", issuer.verifying_key())], None, NOW),
            Err(CredentialError::UnknownIssuer)
        );
        assert_eq!(
            verify(&cred, &keys, Some("other.fleet"), NOW),
            Err(CredentialError::WrongTrustDomain)
        );
        assert_eq!(
            verify(&cred.replacen("v1=", "v2=", 1), &keys, None, NOW),
            Err(CredentialError::UnsupportedVersion(2))
        );
        assert_eq!(
            verify("v1=!!!", &keys, None, NOW),
            Err(CredentialError::Malformed)
        );
        assert_eq!(CredentialError::Expired.to_string(), "credential_expired");
        // A flipped byte inside the signed claims.
        let mut wire = STANDARD.decode(cred.strip_prefix("v1=").unwrap()).unwrap();
        let i = wire.len() / 3;
        wire[i] ^= 0x01;
        let flipped = format!("v1={}", STANDARD.encode(&wire));
        assert!(verify(&flipped, &keys, None, NOW).is_err());
        // Not a point on the curve: refused at minting.
        let mut bad = [0u8; 32];
        bad[31] = 0x80;
        bad[0] = 2;
        let r = mint(&issuer, "do-1461-ca", "d", "s", bad, NOW, WEEK);
        assert!(r.is_err() || verify(&r.unwrap().0, &keys, None, NOW).is_err());
    }

    #[test]
    fn claims_are_canonical_cbor_with_sorted_text_keys() {
        let (_, _, cred) = setup();
        let wire = STANDARD.decode(cred.strip_prefix("v1=").unwrap()).unwrap();
        let Value::Map(outer) = ciborium::de::from_reader::<Value, _>(&wire[..]).unwrap() else {
            panic!()
        };
        assert_eq!(outer[0].0, Value::Text("claims".into()));
        assert_eq!(outer[1].0, Value::Text("sig".into()));
        let Value::Bytes(claims) = &outer[0].1 else {
            panic!()
        };
        let Value::Map(inner) = ciborium::de::from_reader::<Value, _>(&claims[..]).unwrap() else {
            panic!()
        };
        let keys: Vec<String> = inner
            .iter()
            .map(|(k, _)| k.as_text().unwrap().to_owned())
            .collect();
        let mut sorted = keys.clone();
        sorted.sort();
        assert_eq!(keys, sorted);
        assert_eq!(keys.len(), 7);
        // Re-encoding the decoded claims gives the same bytes (canonical).
        let c = Claims::from_bytes(claims).unwrap();
        assert_eq!(&c.canonical_bytes(), claims);
    }
}
