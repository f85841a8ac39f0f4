//! Replays the committed fuzz corpus (`fuzz/corpus/<target>/`) through the same entry points the
//! fuzz targets call, on stable, as ordinary tests: an input that once crashed a target is added
//! to its corpus and stays a regression test here.

use std::path::PathBuf;

fn corpus_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus")
}

fn replay(target: &str, entry: fn(&[u8])) {
    let dir = corpus_dir().join(target);
    let mut paths: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("corpus entry").path())
        .collect();
    paths.sort();
    assert!(!paths.is_empty(), "{} has no inputs", dir.display());
    for path in paths {
        let bytes = std::fs::read(&path).expect("corpus file");
        let result = std::panic::catch_unwind(|| entry(&bytes));
        assert!(result.is_ok(), "{} panicked", path.display());
    }
}

#[test]
fn join_token_corpus() {
    replay("join_token", hiveseed_proto::fuzz::join_token);
}

#[test]
fn signed_envelope_corpus() {
    replay("signed_envelope", hiveseed_proto::fuzz::signed_envelope);
}

#[test]
fn manifest_corpus() {
    replay("manifest", hiveseed_proto::fuzz::manifest);
}

#[test]
fn status_report_corpus() {
    replay("status_report", hiveseed_proto::fuzz::status_report);
}

/// The seeds the corpus starts from are valid, so the fuzzer begins past the signature checks.
#[test]
fn the_valid_seeds_pass_every_check() {
    use hiveseed_proto::fuzz::*;
    use hiveseed_proto::{verify_manifest, JoinToken, Manifest, SignedEnvelope, StatusReport};
    let key = fuzz_key().verifying_key();
    let dir = corpus_dir();
    let token = std::fs::read(dir.join("join_token/valid-text")).expect("seed");
    let token = JoinToken::from_text(String::from_utf8(token[1..].to_vec()).expect("text"));
    token
        .verify(&key, &fuzz_campaign(), &fuzz_node(), FUZZ_NOW)
        .expect("the valid token seed verifies");
    for role in ["agent", "peer", "pg"] {
        let bytes = std::fs::read(dir.join("signed_envelope").join(role)).expect("seed");
        let env: SignedEnvelope<Manifest> = serde_json::from_slice(&bytes).expect("envelope");
        verify_manifest(&env, &key, &fuzz_campaign(), &fuzz_node(), FUZZ_NOW, None)
            .unwrap_or_else(|e| panic!("the {role} envelope seed: {e}"));
        let bytes = std::fs::read(dir.join("status_report").join(role)).expect("seed");
        let report: StatusReport = serde_json::from_slice(&bytes).expect("report");
        report
            .validate(&fuzz_node())
            .unwrap_or_else(|e| panic!("the {role} report seed: {e}"));
    }
}
