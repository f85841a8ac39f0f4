//! Entry points for the fuzz targets in `fuzz/` and for the stable tests that replay their
//! committed corpus (`proto/tests/fuzz_corpus.rs`): the same function runs under both, so a crash
//! the fuzzer finds becomes a failing ordinary test once its input is added to the corpus.
//!
//! Each entry point takes untrusted bytes exactly as they cross a trust boundary and must return
//! (never panic, never hang). Where a signature would stop the fuzzer at the first check, the
//! entry point also signs the bytes with a fixed fuzzing key, so the code behind the signature
//! (claims, payload decoding, canonical form, consistency checks) sees arbitrary input too.

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use ed25519_dalek::{Signer, SigningKey};

use crate::envelope::signed_message;
use crate::manifest::{verify_manifest, Applied, Manifest};
use crate::names::{Campaign, Generation, NodeName};
use crate::status::StatusReport;
use crate::token::JoinToken;
use crate::{canonical_bytes, KeyId, Sha256, Signable, SignedEnvelope};

/// The fixed key the corpus's valid seeds are signed with. Not a secret: it signs nothing real.
pub fn fuzz_key() -> SigningKey {
    SigningKey::from_bytes(&[7u8; 32])
}

/// The campaign and node every entry point verifies against (the seeds use them).
pub fn fuzz_campaign() -> Campaign {
    "fuzz".parse().expect("valid campaign name")
}

pub fn fuzz_node() -> NodeName {
    "fuzz-peer-1".parse().expect("valid node name")
}

/// A time inside the seeds' validity (their `exp`/`not_after` are far in the future).
pub const FUZZ_NOW: u64 = 1_800_000_000;

/// Join token: the text a node's user_data carries, as the seeder receives it at enrollment.
/// The first byte picks the path: even — the bytes are the token's text; odd — the rest is a
/// claims payload, signed here, so claim parsing, version, campaign, node and expiry run on it.
pub fn join_token(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let key = fuzz_key();
    let text = if mode % 2 == 0 {
        String::from_utf8_lossy(rest).into_owned()
    } else {
        let sig = key.sign(&signed_message("hiveseed/join-token/v1", rest));
        format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(rest),
            URL_SAFE_NO_PAD.encode(sig.to_bytes())
        )
    };
    let token = JoinToken::from_text(text);
    if let Ok(claims) = token.verify(
        &key.verifying_key(),
        &fuzz_campaign(),
        &fuzz_node(),
        FUZZ_NOW,
    ) {
        // A token that verifies re-signs to one that verifies to the same claims.
        let again = JoinToken::sign(&claims, &key)
            .verify(
                &key.verifying_key(),
                &fuzz_campaign(),
                &fuzz_node(),
                FUZZ_NOW,
            )
            .expect("a re-signed valid token verifies");
        assert_eq!(again, claims);
    }
}

/// Signed envelope: the JSON body an agent receives for its manifest, verified with the campaign
/// key. A valid envelope must verify to a value whose canonical bytes are exactly its payload.
pub fn signed_envelope(data: &[u8]) {
    let Ok(envelope) = serde_json::from_slice::<SignedEnvelope<Manifest>>(data) else {
        return;
    };
    let _ = envelope.payload_digest();
    let key = fuzz_key();
    if let Ok(manifest) = envelope.verify(&key.verifying_key()) {
        let payload = STANDARD
            .decode(&envelope.payload)
            .expect("a verified payload is base64");
        assert_eq!(canonical_bytes(&manifest), payload);
    }
}

/// Manifest: arbitrary payload bytes, signed here, through everything an agent checks before it
/// plans (`verify_manifest`: signature, campaign, node, expiry, consistency, generation).
pub fn manifest(data: &[u8]) {
    let key = fuzz_key();
    let sig = key.sign(&signed_message(Manifest::CONTEXT, data));
    let envelope = serde_json::json!({
        "key_id": KeyId::of(&key.verifying_key()).as_str(),
        "payload": STANDARD.encode(data),
        "signature": URL_SAFE_NO_PAD.encode(sig.to_bytes()),
    });
    let envelope: SignedEnvelope<Manifest> =
        serde_json::from_value(envelope).expect("an envelope built here parses");
    let applied = Applied {
        generation: Generation(3),
        digest: Sha256::digest(b"applied"),
    };
    for applied in [None, Some(applied)] {
        let _ = verify_manifest(
            &envelope,
            &key.verifying_key(),
            &fuzz_campaign(),
            &fuzz_node(),
            FUZZ_NOW,
            applied,
        );
    }
}

/// Status report: the JSON body a node posts, parsed and validated as the seeder does before it
/// stores anything. A report that validates serialises and parses back to itself.
pub fn status_report(data: &[u8]) {
    let Ok(report) = serde_json::from_slice::<StatusReport>(data) else {
        return;
    };
    if report.validate(&fuzz_node()).is_ok() {
        let bytes = serde_json::to_vec(&report).expect("a report serialises");
        let back: StatusReport = serde_json::from_slice(&bytes).expect("and parses back");
        assert_eq!(back, report);
    }
}
