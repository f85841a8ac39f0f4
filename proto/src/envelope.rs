//! Canonical bytes and the detached-signature envelope that carries every signed document.
//!
//! The signature covers the exact payload bytes that travel, never a re-serialisation, so a
//! verifier does not depend on the signer's serde settings. Each document type signs under its own
//! context string, so a signature made for one kind of document never verifies as another.

use std::marker::PhantomData;

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::names::Sha256;

/// A document that can be signed: its context string separates its signatures from every other kind.
pub trait Signable: Serialize + DeserializeOwned {
    const CONTEXT: &'static str;
}

/// Canonical JSON: object keys sorted, no insignificant whitespace. Stable across serialisations
/// because it goes through `serde_json::Value`, whose maps are ordered.
pub fn canonical_bytes<T: Serialize>(value: &T) -> Vec<u8> {
    let v = serde_json::to_value(value).expect("wire types serialise to JSON");
    serde_json::to_vec(&v).expect("a JSON value serialises")
}

/// The bytes a signature covers: the context, a NUL, then the payload.
pub(crate) fn signed_message(context: &str, payload: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(context.len() + 1 + payload.len());
    m.extend_from_slice(context.as_bytes());
    m.push(0);
    m.extend_from_slice(payload);
    m
}

/// Short identifier of a verifying key: the first 8 bytes of its SHA-256, hex.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct KeyId(String);

impl KeyId {
    pub fn of(key: &VerifyingKey) -> Self {
        let d = Sha256::digest(key.as_bytes());
        Self(hex::encode(&d.0[..8]))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvelopeError {
    #[error("envelope is malformed: {0}")]
    Malformed(String),
    #[error("envelope was signed by key {got}, expected key {expected}")]
    UnknownKey { expected: String, got: String },
    #[error("envelope signature does not verify")]
    BadSignature,
    #[error("envelope payload is not canonical JSON")]
    NotCanonical,
}

/// Canonical payload bytes + detached Ed25519 signature + key id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignedEnvelope<T> {
    pub key_id: KeyId,
    /// Standard base64 of the canonical payload bytes.
    pub payload: String,
    /// URL-safe base64 (no padding) of the 64-byte signature.
    pub signature: String,
    #[serde(skip)]
    _type: PhantomData<fn() -> T>,
}

impl<T: Signable> SignedEnvelope<T> {
    pub fn sign(value: &T, key: &SigningKey) -> Self {
        let payload = canonical_bytes(value);
        let sig = key.sign(&signed_message(T::CONTEXT, &payload));
        Self {
            key_id: KeyId::of(&key.verifying_key()),
            payload: STANDARD.encode(&payload),
            signature: URL_SAFE_NO_PAD.encode(sig.to_bytes()),
            _type: PhantomData,
        }
    }

    /// The SHA-256 of the payload bytes: what `If-None-Match` and reports name.
    pub fn payload_digest(&self) -> Result<Sha256, EnvelopeError> {
        Ok(Sha256::digest(&self.payload_bytes()?))
    }

    fn payload_bytes(&self) -> Result<Vec<u8>, EnvelopeError> {
        STANDARD
            .decode(&self.payload)
            .map_err(|e| EnvelopeError::Malformed(format!("payload is not base64: {e}")))
    }

    /// Returns the typed value only when the signature over the exact payload bytes holds.
    pub fn verify(&self, key: &VerifyingKey) -> Result<T, EnvelopeError> {
        let expected = KeyId::of(key);
        if self.key_id != expected {
            return Err(EnvelopeError::UnknownKey {
                expected: expected.0,
                got: self.key_id.0.chars().take(32).collect(),
            });
        }
        let payload = self.payload_bytes()?;
        let sig_bytes: [u8; 64] = URL_SAFE_NO_PAD
            .decode(&self.signature)
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| {
                EnvelopeError::Malformed("signature is not 64 bytes of base64".into())
            })?;
        key.verify(
            &signed_message(T::CONTEXT, &payload),
            &Signature::from_bytes(&sig_bytes),
        )
        .map_err(|_| EnvelopeError::BadSignature)?;
        let value: T = serde_json::from_slice(&payload)
            .map_err(|e| EnvelopeError::Malformed(format!("payload: {e}")))?;
        // A signed payload that is not in canonical form came from a signer we do not recognise.
        if canonical_bytes(&value) != payload {
            return Err(EnvelopeError::NotCanonical);
        }
        Ok(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::rngs::OsRng;
    use std::collections::BTreeMap;

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    struct Doc {
        zeta: u64,
        alpha: String,
        map: BTreeMap<String, u32>,
    }
    impl Signable for Doc {
        const CONTEXT: &'static str = "hiveseed/test-doc/v1";
    }

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    struct Other {
        zeta: u64,
        alpha: String,
        map: BTreeMap<String, u32>,
    }
    impl Signable for Other {
        const CONTEXT: &'static str = "hiveseed/other-doc/v1";
    }

    fn doc() -> Doc {
        Doc {
            zeta: 7,
            alpha: "a".into(),
            map: [("b".to_string(), 2), ("a".to_string(), 1)].into(),
        }
    }

    #[test]
    fn canonical_bytes_sort_keys() {
        assert_eq!(
            String::from_utf8(canonical_bytes(&doc())).unwrap(),
            r#"{"alpha":"a","map":{"a":1,"b":2},"zeta":7}"#
        );
    }

    #[test]
    fn roundtrip_and_refusals() {
        let key = SigningKey::generate(&mut OsRng);
        let env = SignedEnvelope::sign(&doc(), &key);
        assert_eq!(env.verify(&key.verifying_key()).unwrap(), doc());

        // Survives a trip through JSON (what travels).
        let wire = serde_json::to_string(&env).unwrap();
        let back: SignedEnvelope<Doc> = serde_json::from_str(&wire).unwrap();
        assert_eq!(back.verify(&key.verifying_key()).unwrap(), doc());

        // Wrong key.
        let other = SigningKey::generate(&mut OsRng);
        assert!(matches!(
            env.verify(&other.verifying_key()),
            Err(EnvelopeError::UnknownKey { .. })
        ));

        // Same bytes and signature presented as another document type.
        let as_other: SignedEnvelope<Other> = serde_json::from_str(&wire).unwrap();
        assert_eq!(
            as_other.verify(&key.verifying_key()),
            Err(EnvelopeError::BadSignature)
        );

        // A flipped payload byte.
        let mut payload = STANDARD.decode(&env.payload).unwrap();
        payload[10] ^= 1;
        let mut tampered = env.clone();
        tampered.payload = STANDARD.encode(&payload);
        assert_eq!(
            tampered.verify(&key.verifying_key()),
            Err(EnvelopeError::BadSignature)
        );

        // Garbage signature.
        let mut bad = env.clone();
        bad.signature = "AAAA".into();
        assert!(matches!(
            bad.verify(&key.verifying_key()),
            Err(EnvelopeError::Malformed(_))
        ));
    }

    #[test]
    fn non_canonical_payload_is_refused_even_when_signed() {
        let key = SigningKey::generate(&mut OsRng);
        let payload = br#"{"zeta":7,"alpha":"a","map":{}}"#;
        let sig = key.sign(&signed_message(Doc::CONTEXT, payload));
        let env = SignedEnvelope::<Doc> {
            key_id: KeyId::of(&key.verifying_key()),
            payload: STANDARD.encode(payload),
            signature: URL_SAFE_NO_PAD.encode(sig.to_bytes()),
            _type: PhantomData,
        };
        assert_eq!(
            env.verify(&key.verifying_key()),
            Err(EnvelopeError::NotCanonical)
        );
    }

    #[test]
    fn unknown_envelope_fields_are_refused() {
        let key = SigningKey::generate(&mut OsRng);
        let mut v = serde_json::to_value(SignedEnvelope::sign(&doc(), &key)).unwrap();
        v["extra"] = serde_json::json!(1);
        assert!(serde_json::from_value::<SignedEnvelope<Doc>>(v).is_err());
    }

    proptest! {
        #[test]
        fn canonical_is_stable(zeta: u64, alpha in ".{0,20}", entries in proptest::collection::btree_map(".{0,6}", any::<u32>(), 0..6)) {
            let d = Doc { zeta, alpha, map: entries };
            let bytes = canonical_bytes(&d);
            let parsed: Doc = serde_json::from_slice(&bytes).unwrap();
            prop_assert_eq!(&parsed, &d);
            prop_assert_eq!(canonical_bytes(&parsed), bytes.clone());
            // Re-serialising through a pretty printer and back does not change the canonical form.
            let pretty = serde_json::to_string_pretty(&d).unwrap();
            let again: Doc = serde_json::from_str(&pretty).unwrap();
            prop_assert_eq!(canonical_bytes(&again), bytes);
        }
    }
}
