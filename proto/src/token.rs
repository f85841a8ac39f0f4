//! Join tokens: the one secret a node's user_data carries.
//!
//! Text form `<payload>.<signature>`, both URL-safe base64 without padding, so the token fits in a
//! query string. The payload is canonical JSON of [`JoinClaims`]; the signature is Ed25519 by the
//! campaign's manifest key under its own context string. Verification is stateless; single use is
//! enforced by the seeder's enrollment policy.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use serde::{Deserialize, Serialize};

use crate::envelope::{canonical_bytes, signed_message};
use crate::names::{Campaign, NodeName, Region, RoleName};

pub const TOKEN_VERSION: u8 = 1;
const CONTEXT: &str = "hiveseed/join-token/v1";
/// Far more than a real token needs (~300 characters); anything longer is refused unread.
pub const MAX_TOKEN_LEN: usize = 2048;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JoinClaims {
    pub v: u8,
    pub campaign: Campaign,
    pub node: NodeName,
    pub role: RoleName,
    pub region: Region,
    /// Expiry, Unix seconds.
    pub exp: u64,
    /// Random, hex; makes every issued token distinct.
    pub nonce: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("join token is malformed: {0}")]
    Malformed(&'static str),
    #[error("join token version {0} is not supported")]
    UnsupportedVersion(u8),
    #[error("join token signature does not verify")]
    BadSignature,
    #[error("join token expired at {exp} (now {now})")]
    Expired { exp: u64, now: u64 },
    #[error("join token is for campaign {got}, not {expected}")]
    WrongCampaign { expected: Campaign, got: Campaign },
    /// The signature does not verify and the (unverified) payload names another campaign: most
    /// likely a token meant for another campaign's seeder. Only the message differs from
    /// [`TokenError::BadSignature`]; the token is refused all the same.
    #[error(
        "join token says it is for campaign {claimed}; this seeder serves campaign {expected}"
    )]
    OtherCampaign {
        expected: Campaign,
        claimed: Campaign,
    },
    #[error("join token is for node {got}, not {expected}")]
    WrongNode { expected: NodeName, got: NodeName },
}

impl TokenError {
    /// A short, stable tag for API error bodies and events.
    pub fn tag(&self) -> &'static str {
        match self {
            TokenError::Malformed(_) => "token_malformed",
            TokenError::UnsupportedVersion(_) => "token_unsupported_version",
            TokenError::BadSignature => "token_bad_signature",
            TokenError::Expired { .. } => "token_expired",
            TokenError::WrongCampaign { .. } => "token_wrong_campaign",
            TokenError::OtherCampaign { .. } => "token_other_campaign",
            TokenError::WrongNode { .. } => "token_wrong_node",
        }
    }
}

/// A signed join token in its text form.
#[derive(Clone, PartialEq, Eq)]
pub struct JoinToken(String);

impl std::fmt::Debug for JoinToken {
    // A token is a credential: never print it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("JoinToken(<redacted>)")
    }
}

impl JoinToken {
    pub fn sign(claims: &JoinClaims, key: &SigningKey) -> Self {
        let payload = canonical_bytes(claims);
        let sig = key.sign(&signed_message(CONTEXT, &payload));
        Self(format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(&payload),
            URL_SAFE_NO_PAD.encode(sig.to_bytes())
        ))
    }

    /// Wraps received text without checking it; [`JoinToken::verify`] does the checking.
    pub fn from_text(text: impl Into<String>) -> Self {
        Self(text.into())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Checks, in order: shape, signature, version, campaign, node, expiry. Each refusal is distinct.
    /// A signature that does not verify is always refused; only then is the unverified payload
    /// read, and only to tell a token for another campaign from a forged one.
    pub fn verify(
        &self,
        key: &VerifyingKey,
        campaign: &Campaign,
        node: &NodeName,
        now: u64,
    ) -> Result<JoinClaims, TokenError> {
        if self.0.len() > MAX_TOKEN_LEN {
            return Err(TokenError::Malformed("longer than 2048 characters"));
        }
        let (payload_b64, sig_b64) = self
            .0
            .split_once('.')
            .ok_or(TokenError::Malformed("missing '.' separator"))?;
        let payload = URL_SAFE_NO_PAD
            .decode(payload_b64)
            .map_err(|_| TokenError::Malformed("payload is not URL-safe base64"))?;
        let sig: [u8; 64] = URL_SAFE_NO_PAD
            .decode(sig_b64)
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or(TokenError::Malformed("signature is not 64 bytes of base64"))?;
        key.verify(
            &signed_message(CONTEXT, &payload),
            &Signature::from_bytes(&sig),
        )
        .map_err(|_| unverified_refusal(&payload, campaign))?;
        let claims: JoinClaims = serde_json::from_slice(&payload)
            .map_err(|_| TokenError::Malformed("payload is not valid claims"))?;
        if claims.v != TOKEN_VERSION {
            return Err(TokenError::UnsupportedVersion(claims.v));
        }
        if &claims.campaign != campaign {
            return Err(TokenError::WrongCampaign {
                expected: campaign.clone(),
                got: claims.campaign,
            });
        }
        if &claims.node != node {
            return Err(TokenError::WrongNode {
                expected: node.clone(),
                got: claims.node,
            });
        }
        if now >= claims.exp {
            return Err(TokenError::Expired {
                exp: claims.exp,
                now,
            });
        }
        Ok(claims)
    }
}

/// The refusal for a payload whose signature did not verify: [`TokenError::OtherCampaign`] when
/// the payload parses as claims naming another campaign, [`TokenError::BadSignature`] otherwise.
/// Nothing else of the unverified payload is believed or repeated.
fn unverified_refusal(payload: &[u8], campaign: &Campaign) -> TokenError {
    match serde_json::from_slice::<JoinClaims>(payload) {
        Ok(claimed) if &claimed.campaign != campaign => TokenError::OtherCampaign {
            expected: campaign.clone(),
            claimed: claimed.campaign,
        },
        _ => TokenError::BadSignature,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::rngs::OsRng;

    fn claims() -> JoinClaims {
        JoinClaims {
            v: TOKEN_VERSION,
            campaign: "do-1461".parse().unwrap(),
            node: "do-1461-peer-nyc3-01".parse().unwrap(),
            role: "peer".parse().unwrap(),
            region: "nyc3".parse().unwrap(),
            exp: 2_000,
            nonce: "00112233445566778899aabbccddeeff".into(),
        }
    }

    fn verify(t: &JoinToken, key: &SigningKey) -> Result<JoinClaims, TokenError> {
        t.verify(
            &key.verifying_key(),
            &"do-1461".parse().unwrap(),
            &"do-1461-peer-nyc3-01".parse().unwrap(),
            1_000,
        )
    }

    #[test]
    fn roundtrip_fits_a_query_string() {
        let key = SigningKey::generate(&mut OsRng);
        let t = JoinToken::sign(&claims(), &key);
        assert_eq!(verify(&t, &key).unwrap(), claims());
        assert!(t
            .as_str()
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)));
        assert!(t.as_str().len() < 400);
        assert_eq!(format!("{t:?}"), "JoinToken(<redacted>)");
    }

    #[test]
    fn each_refusal_is_distinct() {
        let key = SigningKey::generate(&mut OsRng);
        let good = JoinToken::sign(&claims(), &key);

        // Flipped byte in the signature part.
        let mut bytes = good.as_str().as_bytes().to_vec();
        let last = bytes.len() - 3;
        bytes[last] = if bytes[last] == b'A' { b'B' } else { b'A' };
        let flipped = JoinToken::from_text(String::from_utf8(bytes).unwrap());
        assert_eq!(verify(&flipped, &key), Err(TokenError::BadSignature));

        // Wrong key.
        let other = SigningKey::generate(&mut OsRng);
        assert_eq!(verify(&good, &other), Err(TokenError::BadSignature));

        // Expired.
        let mut c = claims();
        c.exp = 1_000;
        let expired = JoinToken::sign(&c, &key);
        assert!(matches!(
            verify(&expired, &key),
            Err(TokenError::Expired { .. })
        ));

        // Another campaign's token, signed by that campaign's key.
        let mut c = claims();
        c.campaign = "other".parse().unwrap();
        let t = JoinToken::sign(&c, &other);
        assert_eq!(
            verify(&t, &key),
            Err(TokenError::OtherCampaign {
                expected: claims().campaign,
                claimed: c.campaign.clone(),
            })
        );
        assert_eq!(
            verify(&t, &key).unwrap_err().to_string(),
            "join token says it is for campaign other; this seeder serves campaign do-1461"
        );

        // Other campaign, signed by this campaign's key.
        let mut c = claims();
        c.campaign = "other".parse().unwrap();
        let t = JoinToken::sign(&c, &key);
        assert!(matches!(
            verify(&t, &key),
            Err(TokenError::WrongCampaign { .. })
        ));

        // Other node.
        let mut c = claims();
        c.node = "do-1461-peer-nyc3-02".parse().unwrap();
        let t = JoinToken::sign(&c, &key);
        assert!(matches!(
            verify(&t, &key),
            Err(TokenError::WrongNode { .. })
        ));

        // Unsupported version.
        let mut c = claims();
        c.v = 9;
        let t = JoinToken::sign(&c, &key);
        assert_eq!(verify(&t, &key), Err(TokenError::UnsupportedVersion(9)));

        // Shapes.
        for text in [
            "",
            "nodot",
            "!!!.AAAA",
            &format!("{}.", "a".repeat(10)),
            &"a.".repeat(2000),
        ] {
            assert!(
                matches!(
                    verify(&JoinToken::from_text(text), &key),
                    Err(TokenError::Malformed(_))
                ),
                "{text:.20}"
            );
        }

        let tags: std::collections::BTreeSet<_> = [
            TokenError::BadSignature.tag(),
            TokenError::Expired { exp: 0, now: 0 }.tag(),
            TokenError::Malformed("x").tag(),
            TokenError::UnsupportedVersion(0).tag(),
            TokenError::WrongCampaign {
                expected: claims().campaign,
                got: claims().campaign,
            }
            .tag(),
            TokenError::WrongNode {
                expected: claims().node,
                got: claims().node,
            }
            .tag(),
            TokenError::OtherCampaign {
                expected: claims().campaign,
                claimed: claims().campaign,
            }
            .tag(),
        ]
        .into();
        assert_eq!(tags.len(), 7);
    }

    proptest! {
        #[test]
        fn any_single_byte_flip_is_refused(pos in 0usize..300, bit in 0u8..8) {
            let key = SigningKey::generate(&mut OsRng);
            let good = JoinToken::sign(&claims(), &key);
            let mut bytes = good.as_str().as_bytes().to_vec();
            let pos = pos % bytes.len();
            bytes[pos] ^= 1 << bit;
            if let Ok(text) = String::from_utf8(bytes) {
                // Base64 ignores nothing, but a flip in the final character's padding bits can
                // decode to the same bytes; only then may verification succeed.
                if let Ok(c) = verify(&JoinToken::from_text(text.clone()), &key) {
                    prop_assert_eq!(c, claims());
                    let (p1, s1) = good.as_str().split_once('.').unwrap();
                    let (p2, s2) = text.split_once('.').unwrap();
                    prop_assert_eq!(URL_SAFE_NO_PAD.decode(p1).ok(), URL_SAFE_NO_PAD.decode(p2).ok());
                    prop_assert_eq!(URL_SAFE_NO_PAD.decode(s1).ok(), URL_SAFE_NO_PAD.decode(s2).ok());
                }
            }
        }
    }
}
