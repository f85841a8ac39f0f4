//! Entry points for the seeder's fuzz targets in `fuzz/` and for the stable tests that replay
//! their committed corpus (`seeder/tests/fuzz_corpus.rs`); see `hiveseed_proto::fuzz`.

use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

use crate::fleet::Fleet;
use crate::pki::{generate_ca, CampaignCa, LeafSpec, LeafUsage};

/// fleet.toml: the operator's fleet description, parsed and validated as `seeder` loads it.
pub fn fleet_toml(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(fleet) = Fleet::parse(text) {
        // A fleet that validates names every node it lists.
        for node in &fleet.nodes {
            assert!(fleet.node(&node.name).is_some());
        }
    }
}

fn fuzz_ca() -> &'static CampaignCa {
    static CA: OnceLock<CampaignCa> = OnceLock::new();
    CA.get_or_init(|| {
        let (cert, key) = generate_ca(
            "fuzz",
            SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000),
        )
        .expect("a CA is generated");
        CampaignCa::load(&cert, &key).expect("and loads")
    })
}

/// The CSR path: what `POST /v1/enroll` and `POST /v1/certs` hand to the CA. The first byte picks
/// the form: even — the rest is the request's `csr_pem` text; odd — the rest is DER, wrapped in a
/// `CERTIFICATE REQUEST` PEM here so the fuzzer explores the ASN.1 rather than base64.
pub fn csr(data: &[u8]) {
    csr_is_issued(data);
}

/// [`csr`], telling whether a certificate was issued (the corpus test checks its seeds are).
pub fn csr_is_issued(data: &[u8]) -> bool {
    let Some((&mode, rest)) = data.split_first() else {
        return false;
    };
    let pem = if mode % 2 == 0 {
        String::from_utf8_lossy(rest).into_owned()
    } else {
        pem_wrap(rest)
    };
    let usage = if mode & 2 == 0 {
        LeafUsage::Client
    } else {
        LeafUsage::Server
    };
    let spec = LeafSpec {
        common_name: "fuzz-peer-1".into(),
        sans: vec!["fuzz-peer-1".into(), "10.10.0.5".into()],
        usage,
        not_before: SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000),
        lifetime: Duration::from_secs(86_400),
    };
    if let Ok((cert_pem, _der, _fpr)) = fuzz_ca().sign_csr(&pem, &spec) {
        let sans = crate::pki::cert_sans(&cert_pem).expect("an issued certificate parses");
        assert_eq!(
            sans.len(),
            spec.sans.len(),
            "issued SANs are exactly the spec's"
        );
        return true;
    }
    false
}

fn pem_wrap(der: &[u8]) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = String::from("-----BEGIN CERTIFICATE REQUEST-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE REQUEST-----\n");
    out
}
