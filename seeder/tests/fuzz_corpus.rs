//! Replays the committed fuzz corpus of the seeder's targets (`fuzz/corpus/{fleet_toml,csr}/`)
//! through the entry points the fuzz targets call, on stable; see `proto/tests/fuzz_corpus.rs`.

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
fn fleet_toml_corpus() {
    replay("fleet_toml", hiveseed_seeder::fuzz::fleet_toml);
}

#[test]
fn csr_corpus() {
    replay("csr", hiveseed_seeder::fuzz::csr);
}

/// The seeds the corpus starts from are valid, so the fuzzer begins past the first refusal.
#[test]
fn the_valid_seeds_are_accepted() {
    let dir = corpus_dir();
    for name in ["lab", "test"] {
        let text = std::fs::read_to_string(dir.join("fleet_toml").join(name)).expect("seed");
        hiveseed_seeder::fleet::Fleet::parse(&text)
            .unwrap_or_else(|e| panic!("the {name} fleet seed: {e}"));
    }
    for name in [
        "p256-pem",
        "ed25519-pem",
        "p256-der-server",
        "ed25519-der-server",
    ] {
        let bytes = std::fs::read(dir.join("csr").join(name)).expect("seed");
        assert!(
            hiveseed_seeder::fuzz::csr_is_issued(&bytes),
            "the {name} CSR seed is not issued a certificate"
        );
    }
}
