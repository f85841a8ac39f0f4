//! The campaign's X.509 PKI: the CA, the seeder's server certificate, and signing node CSRs.
//!
//! The seeder decides every certificate's subject, SANs, usages and lifetime; of a CSR only the
//! public key (after its self-signature verifies and its key and signature algorithms agree) is
//! used. Every certificate issued from a CSR is parsed back and checked before anyone sees it.
//!
//! The seeder's own server certificate alone carries [`SEEDER_CERT_NAME`], a DNS name with a dot
//! that no node name (a single DNS label) can be, and agents require it (bootstrap's client): a node
//! certificate never authenticates as the seeder, whatever addresses it names.

use std::net::IpAddr;
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
    PKCS_ECDSA_P256_SHA256,
};
use time::OffsetDateTime;

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("CSR is not a valid, self-signed PKCS#10 request: {0}")]
    BadCsr(String),
    #[error("CSR key is not allowed: {0} (ECDSA P-256 with SHA-256, P-384 with SHA-384, Ed25519, RSA 2048-4096 with SHA-256 only)")]
    BadCsrKey(String),
    #[error("the issued certificate failed its check: {0}")]
    IssuedMismatch(String),
    #[error("invalid subject alternative name {0:?}")]
    BadSan(String),
    #[error("certificate generation failed")]
    Generate(#[source] rcgen::Error),
    #[error("stored certificate could not be parsed: {0}")]
    Parse(String),
}

/// What a leaf certificate is for; decides key and extended key usages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeafUsage {
    Server,
    Client,
}

/// A leaf the seeder has decided on: subject CN, SANs, usage, lifetime.
#[derive(Debug, Clone)]
pub struct LeafSpec {
    pub common_name: String,
    pub sans: Vec<String>,
    pub usage: LeafUsage,
    pub not_before: SystemTime,
    pub lifetime: Duration,
}

/// The name only the seeder's own server certificate carries; agents require it of the seeder.
pub use hiveseed_proto::api::SEEDER_CERT_NAME;

fn to_offset(t: SystemTime) -> OffsetDateTime {
    OffsetDateTime::from(t)
}

fn san(s: &str) -> Result<SanType, PkiError> {
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Ok(SanType::IpAddress(ip));
    }
    let dns = s.try_into().map_err(|_| PkiError::BadSan(s.to_owned()))?;
    Ok(SanType::DnsName(dns))
}

fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    bytes[0] &= 0x7f; // positive
    SerialNumber::from_slice(&bytes)
}

/// A new campaign CA: ECDSA P-256, ten years.
pub fn generate_ca(campaign: &str, now: SystemTime) -> Result<(String, String), PkiError> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(PkiError::Generate)?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "hiveseed");
    dn.push(DnType::CommonName, format!("{campaign} fleet CA"));
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = to_offset(now - Duration::from_secs(3600));
    params.not_after = to_offset(now + Duration::from_secs(10 * 365 * 24 * 3600));
    params.serial_number = Some(random_serial());
    let cert = params.self_signed(&key).map_err(PkiError::Generate)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// The loaded CA, able to sign leaves.
pub struct CampaignCa {
    issuer: Issuer<'static, KeyPair>,
    pub cert_pem: String,
    cert_der: Vec<u8>,
}

impl std::fmt::Debug for CampaignCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CampaignCa(<key redacted>)")
    }
}

impl CampaignCa {
    pub fn load(cert_pem: &str, key_pem: &str) -> Result<Self, PkiError> {
        let key = KeyPair::from_pem(key_pem).map_err(PkiError::Generate)?;
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key).map_err(PkiError::Generate)?;
        let (_, pem) = x509_parser::pem::parse_x509_pem(cert_pem.as_bytes())
            .map_err(|e| PkiError::Parse(e.to_string()))?;
        Ok(Self {
            issuer,
            cert_pem: cert_pem.to_owned(),
            cert_der: pem.contents,
        })
    }

    fn leaf_params(&self, spec: &LeafSpec) -> Result<CertificateParams, PkiError> {
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "hiveseed");
        dn.push(DnType::CommonName, spec.common_name.clone());
        params.distinguished_name = dn;
        params.subject_alt_names = spec.sans.iter().map(|s| san(s)).collect::<Result<_, _>>()?;
        params.is_ca = IsCa::ExplicitNoCa;
        params.use_authority_key_identifier_extension = true;
        match spec.usage {
            LeafUsage::Server => {
                params.key_usages = vec![
                    KeyUsagePurpose::DigitalSignature,
                    KeyUsagePurpose::KeyEncipherment,
                ];
                params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
            }
            LeafUsage::Client => {
                params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
                params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
            }
        }
        // A little backdating absorbs clock skew without eating into short lifetimes.
        let skew = Duration::from_secs(60).min(spec.lifetime / 10);
        params.not_before = to_offset(spec.not_before - skew);
        params.not_after = to_offset(spec.not_before + spec.lifetime);
        params.serial_number = Some(random_serial());
        Ok(params)
    }

    /// A leaf whose key is generated here (only the seeder's own server certificate).
    pub fn issue_with_new_key(&self, spec: &LeafSpec) -> Result<(String, String), PkiError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(PkiError::Generate)?;
        let cert = self
            .leaf_params(spec)?
            .signed_by(&key, &self.issuer)
            .map_err(PkiError::Generate)?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    /// Signs a node's CSR. Only the CSR's public key is used: subject, SANs, usages and lifetime
    /// are the seeder's decision, so a CSR asking for CA:true or foreign SANs gains nothing.
    /// Returns the leaf PEM, its DER, and the SHA-256 (hex) of the node's public key.
    pub fn sign_csr(
        &self,
        csr_pem: &str,
        spec: &LeafSpec,
    ) -> Result<(String, Vec<u8>, String), PkiError> {
        let (spki, csr, key_fpr) = parse_csr(csr_pem)?;
        let cert = self
            .leaf_params(spec)?
            .signed_by(&csr.public_key, &self.issuer)
            .map_err(PkiError::Generate)?;
        self.check_issued(cert.der(), spec, &spki)?;
        Ok((cert.pem(), cert.der().to_vec(), key_fpr))
    }

    /// Parses an issued leaf back and checks it is exactly what `spec` decided: issued and signed
    /// by this CA, the CSR's key, the subject, the SANs, the usages, not a CA, and never the
    /// seeder's name. Nothing is stored or returned unless this passes.
    fn check_issued(&self, der: &[u8], spec: &LeafSpec, spki: &[u8]) -> Result<(), PkiError> {
        let bad = |what: &str| PkiError::IssuedMismatch(what.to_owned());
        let (_, ca) = x509_parser::parse_x509_certificate(&self.cert_der)
            .map_err(|e| PkiError::Parse(e.to_string()))?;
        let (rest, cert) = x509_parser::parse_x509_certificate(der)
            .map_err(|e| bad(&format!("unparsable: {e}")))?;
        if !rest.is_empty() {
            return Err(bad("trailing bytes"));
        }
        if cert.issuer() != ca.subject() {
            return Err(bad("issuer is not the campaign CA"));
        }
        cert.verify_signature(Some(ca.public_key()))
            .map_err(|e| bad(&format!("signature does not verify with the CA key: {e}")))?;
        if cert.public_key().raw != spki {
            return Err(bad("public key is not the CSR's"));
        }
        cert.public_key()
            .parsed()
            .map_err(|e| bad(&format!("public key does not parse: {e}")))?;
        let cn = cert
            .subject()
            .iter_common_name()
            .next()
            .and_then(|c| c.as_str().ok());
        if cn != Some(spec.common_name.as_str()) {
            return Err(bad("subject common name"));
        }
        let mut got = issued_sans(&cert);
        got.sort();
        let mut want = spec.sans.clone();
        want.sort();
        if got != want {
            return Err(bad("subject alternative names"));
        }
        if got.iter().any(|n| n == SEEDER_CERT_NAME) {
            return Err(bad("names the seeder"));
        }
        if cert
            .basic_constraints()
            .ok()
            .flatten()
            .is_some_and(|bc| bc.value.ca)
        {
            return Err(bad("is a CA"));
        }
        let eku = cert
            .extended_key_usage()
            .ok()
            .flatten()
            .map(|e| e.value)
            .ok_or_else(|| bad("no extended key usage"))?;
        let usage_ok = match spec.usage {
            LeafUsage::Server => eku.server_auth && !eku.client_auth,
            LeafUsage::Client => eku.client_auth && !eku.server_auth,
        };
        if !usage_ok || eku.any || !eku.other.is_empty() {
            return Err(bad("extended key usage"));
        }
        Ok(())
    }
}

/// The SHA-256 (hex) of a CSR's public key, as [`CampaignCa::sign_csr`] returns it, once the CSR
/// passed the same checks; nothing is signed.
pub fn csr_key_fpr(csr_pem: &str) -> Result<String, PkiError> {
    parse_csr(csr_pem).map(|(_, _, key_fpr)| key_fpr)
}

/// A CSR's subject public key info (DER), its parameters, and its key's fingerprint.
fn parse_csr(
    csr_pem: &str,
) -> Result<(Vec<u8>, CertificateSigningRequestParams, String), PkiError> {
    if csr_pem.len() > 16 * 1024 {
        return Err(PkiError::BadCsr("larger than 16 KiB".into()));
    }
    let (_, pem) = x509_parser::pem::parse_x509_pem(csr_pem.as_bytes())
        .map_err(|e| PkiError::BadCsr(e.to_string()))?;
    if pem.label != "CERTIFICATE REQUEST" {
        return Err(PkiError::BadCsr(format!("PEM label is {:?}", pem.label)));
    }
    let spki = check_csr(&pem.contents)?;
    let csr = CertificateSigningRequestParams::from_der(&pem.contents.clone().into())
        .map_err(|e| PkiError::BadCsr(e.to_string()))?;
    use rcgen::PublicKeyData;
    let key_fpr = hiveseed_proto::Sha256::digest(csr.public_key.der_bytes()).to_hex();
    Ok((spki, csr, key_fpr))
}

/// Checks a CSR's self-signature, that its key's algorithm and curve or size are allowed, and that
/// the signature algorithm is the one that key signs with. rcgen takes the key's algorithm from the
/// signature algorithm, so a P-384 key signed with ecdsa-with-SHA256 would become a P-256 key in
/// the certificate (malformed): refused here. Returns the subject public key info (DER).
fn check_csr(der: &[u8]) -> Result<Vec<u8>, PkiError> {
    use x509_parser::oid_registry as oids;
    use x509_parser::prelude::FromDer;
    let (rest, csr) = x509_parser::certification_request::X509CertificationRequest::from_der(der)
        .map_err(|e| PkiError::BadCsr(e.to_string()))?;
    if !rest.is_empty() {
        return Err(PkiError::BadCsr("trailing bytes after the request".into()));
    }
    csr.verify_signature()
        .map_err(|_| PkiError::BadCsr("the self-signature does not verify".into()))?;
    let spki = &csr.certification_request_info.subject_pki;
    let key_alg = &spki.algorithm.algorithm;
    let sig_alg = &csr.signature_algorithm.algorithm;
    let curve = spki
        .algorithm
        .parameters
        .as_ref()
        .and_then(|p| p.as_oid().ok());
    let want_sig = if *key_alg == oids::OID_KEY_TYPE_EC_PUBLIC_KEY {
        match curve {
            Some(c) if c == oids::OID_EC_P256 => oids::OID_SIG_ECDSA_WITH_SHA256,
            Some(c) if c == oids::OID_NIST_EC_P384 => oids::OID_SIG_ECDSA_WITH_SHA384,
            Some(c) => return Err(PkiError::BadCsrKey(format!("EC curve {c}"))),
            None => return Err(PkiError::BadCsrKey("EC key without a named curve".into())),
        }
    } else if *key_alg == oids::OID_SIG_ED25519 {
        oids::OID_SIG_ED25519
    } else if *key_alg == oids::OID_PKCS1_RSAENCRYPTION {
        let bits = match spki.parsed() {
            Ok(x509_parser::public_key::PublicKey::RSA(k)) => k.key_size(),
            _ => return Err(PkiError::BadCsrKey("RSA key does not parse".into())),
        };
        if !(2048..=4096).contains(&bits) {
            return Err(PkiError::BadCsrKey(format!("RSA key of {bits} bits")));
        }
        oids::OID_PKCS1_SHA256WITHRSA
    } else {
        return Err(PkiError::BadCsrKey(format!("key algorithm {key_alg}")));
    };
    if *sig_alg != want_sig {
        return Err(PkiError::BadCsrKey(format!(
            "the key signs with {want_sig}, the request is signed with {sig_alg}"
        )));
    }
    Ok(spki.raw.to_vec())
}

fn issued_sans(cert: &x509_parser::certificate::X509Certificate<'_>) -> Vec<String> {
    let mut out = Vec::new();
    if let Ok(Some(ext)) = cert.subject_alternative_name() {
        for name in &ext.value.general_names {
            match name {
                x509_parser::extensions::GeneralName::DNSName(d) => out.push((*d).to_owned()),
                x509_parser::extensions::GeneralName::IPAddress(b) => match b.len() {
                    4 => {
                        out.push(IpAddr::from(<[u8; 4]>::try_from(*b).expect("len 4")).to_string())
                    }
                    16 => out
                        .push(IpAddr::from(<[u8; 16]>::try_from(*b).expect("len 16")).to_string()),
                    // An address of another length is no name we issue: it fails the comparison.
                    _ => out.push(format!("ip:{}", hex::encode(b))),
                },
                other => out.push(format!("{other:?}")),
            }
        }
    }
    out
}

/// The SANs (DNS names and IPs, as strings) of a PEM certificate.
pub fn cert_sans(cert_pem: &str) -> Result<Vec<String>, PkiError> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(cert_pem.as_bytes())
        .map_err(|e| PkiError::Parse(e.to_string()))?;
    let cert = pem
        .parse_x509()
        .map_err(|e| PkiError::Parse(e.to_string()))?;
    Ok(issued_sans(&cert))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(usage: LeafUsage) -> LeafSpec {
        LeafSpec {
            common_name: "do-1461-peer-nyc3-01".into(),
            sans: vec!["203.0.113.5".into(), "do-1461-peer-nyc3-01".into()],
            usage,
            not_before: SystemTime::now(),
            lifetime: Duration::from_secs(86400),
        }
    }

    #[test]
    fn csr_asking_for_ca_and_foreign_sans_gets_only_what_the_seeder_decides() {
        let now = SystemTime::now();
        let (ca_pem, ca_key) = generate_ca("do-1461", now).unwrap();
        let ca = CampaignCa::load(&ca_pem, &ca_key).unwrap();

        // A hostile CSR: CA:true, foreign SANs, a CN of another node.
        let node_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let mut req =
            CertificateParams::new(vec!["seeder.do-1461.example".into(), "10.9.9.9".into()])
                .unwrap();
        req.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        req.distinguished_name
            .push(DnType::CommonName, "do-1461-pg-nyc3-01");
        let csr = req.serialize_request(&node_key).unwrap().pem().unwrap();

        let (pem, der, _) = ca.sign_csr(&csr, &spec(LeafUsage::Client)).unwrap();
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        let bc = cert.basic_constraints().unwrap().map(|e| e.value.ca);
        assert_ne!(bc, Some(true), "issued certificate must not be a CA");
        let mut sans = cert_sans(&pem).unwrap();
        sans.sort();
        assert_eq!(sans, ["203.0.113.5", "do-1461-peer-nyc3-01"]);
        let cn = cert
            .subject()
            .iter_common_name()
            .next()
            .unwrap()
            .as_str()
            .unwrap();
        assert_eq!(cn, "do-1461-peer-nyc3-01");
        // The public key is the node's.
        assert_eq!(
            &*cert.public_key().subject_public_key.data,
            node_key.public_key_raw()
        );
    }

    #[test]
    fn garbage_and_tampered_csrs_are_refused() {
        let (ca_pem, ca_key) = generate_ca("do-1461", SystemTime::now()).unwrap();
        let ca = CampaignCa::load(&ca_pem, &ca_key).unwrap();
        assert!(matches!(
            ca.sign_csr("not a csr", &spec(LeafUsage::Server)),
            Err(PkiError::BadCsr(_))
        ));
        let node_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let req = CertificateParams::new(vec!["a.example".into()]).unwrap();
        let der = req.serialize_request(&node_key).unwrap().der().to_vec();
        // Flip a byte inside the signed part: the self-signature no longer verifies.
        let mut bad = der.clone();
        let i = bad.len() / 2;
        bad[i] ^= 0x01;
        let pem = pem_encode("CERTIFICATE REQUEST", &bad);
        assert!(matches!(
            ca.sign_csr(&pem, &spec(LeafUsage::Server)),
            Err(PkiError::BadCsr(_))
        ));
    }

    /// A P-384 key whose request is signed with ecdsa-with-SHA256 (made once with
    /// `openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-384 -sha256 -nodes`).
    pub(crate) const MISMATCHED_CSR: &str =
        include_str!("../tests/fixtures/p384-key-ecdsa-sha256.csr");

    #[test]
    fn a_csr_whose_key_and_signature_algorithms_disagree_is_refused() {
        let (ca_pem, ca_key) = generate_ca("do-1461", SystemTime::now()).unwrap();
        let ca = CampaignCa::load(&ca_pem, &ca_key).unwrap();
        let err = ca
            .sign_csr(MISMATCHED_CSR, &spec(LeafUsage::Client))
            .unwrap_err();
        assert!(
            matches!(&err, PkiError::BadCsrKey(m) if m.contains("1.2.840.10045.4.3.3")),
            "{err}"
        );
        // The agreeing pairs are all accepted.
        for alg in [
            &PKCS_ECDSA_P256_SHA256,
            &rcgen::PKCS_ECDSA_P384_SHA384,
            &rcgen::PKCS_ED25519,
        ] {
            let key = KeyPair::generate_for(alg).unwrap();
            let csr = CertificateParams::new(vec![])
                .unwrap()
                .serialize_request(&key)
                .unwrap()
                .pem()
                .unwrap();
            let (_, der, _) = ca.sign_csr(&csr, &spec(LeafUsage::Server)).unwrap();
            let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
            assert_eq!(
                &*cert.public_key().subject_public_key.data,
                key.public_key_raw()
            );
        }
    }

    #[test]
    fn the_parse_back_check_alone_catches_the_malformed_certificate_of_a_mismatched_csr() {
        // What issuance did before the CSR check: rcgen takes the key's algorithm from the
        // signature, so the P-384 key lands in a certificate that calls it P-256.
        let (ca_pem, ca_key) = generate_ca("do-1461", SystemTime::now()).unwrap();
        let ca = CampaignCa::load(&ca_pem, &ca_key).unwrap();
        let der = x509_parser::pem::parse_x509_pem(MISMATCHED_CSR.as_bytes())
            .unwrap()
            .1
            .contents;
        let csr = CertificateSigningRequestParams::from_der(&der.clone().into()).unwrap();
        let good = spec(LeafUsage::Client);
        let cert = ca
            .leaf_params(&good)
            .unwrap()
            .signed_by(&csr.public_key, &ca.issuer)
            .unwrap();
        let spki = {
            use x509_parser::prelude::FromDer;
            x509_parser::certification_request::X509CertificationRequest::from_der(&der)
                .unwrap()
                .1
                .certification_request_info
                .subject_pki
                .raw
                .to_vec()
        };
        let err = ca.check_issued(cert.der(), &good, &spki).unwrap_err();
        assert!(err.to_string().contains("public key"), "{err}");
    }

    #[test]
    fn the_parse_back_check_refuses_a_certificate_other_than_the_spec() {
        let (ca_pem, ca_key) = generate_ca("do-1461", SystemTime::now()).unwrap();
        let ca = CampaignCa::load(&ca_pem, &ca_key).unwrap();
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let csr = CertificateParams::new(vec![])
            .unwrap()
            .serialize_request(&key)
            .unwrap()
            .pem()
            .unwrap();
        let good = spec(LeafUsage::Server);
        let (_, der, _) = ca.sign_csr(&csr, &good).unwrap();
        let spki = check_csr(
            &x509_parser::pem::parse_x509_pem(csr.as_bytes())
                .unwrap()
                .1
                .contents,
        )
        .unwrap();
        ca.check_issued(&der, &good, &spki).unwrap();
        // Another usage, other names, another key, another issuer: each refused.
        let err = ca
            .check_issued(&der, &spec(LeafUsage::Client), &spki)
            .unwrap_err();
        assert!(err.to_string().contains("extended key usage"), "{err}");
        let mut other = good.clone();
        other.sans.push("10.0.0.1".into());
        let err = ca.check_issued(&der, &other, &spki).unwrap_err();
        assert!(err.to_string().contains("alternative names"), "{err}");
        let other_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let other_pem = other_key.public_key_pem();
        let other_spki = x509_parser::pem::parse_x509_pem(other_pem.as_bytes())
            .unwrap()
            .1
            .contents;
        let err = ca.check_issued(&der, &good, &other_spki).unwrap_err();
        assert!(err.to_string().contains("public key"), "{err}");
        let (ca2_pem, ca2_key) = generate_ca("do-1461", SystemTime::now()).unwrap();
        let ca2 = CampaignCa::load(&ca2_pem, &ca2_key).unwrap();
        let err = ca2.check_issued(&der, &good, &spki).unwrap_err();
        assert!(err.to_string().contains("signature"), "{err}");
        // A node's certificate never carries the seeder's name, even if a caller asked.
        let mut seeder = good.clone();
        seeder.sans.push(SEEDER_CERT_NAME.into());
        let err = ca.sign_csr(&csr, &seeder).unwrap_err();
        assert!(err.to_string().contains("names the seeder"), "{err}");
    }

    fn pem_encode(tag: &str, der: &[u8]) -> String {
        use base64::Engine;
        let b64 = base64::engine::general_purpose::STANDARD.encode(der);
        let mut s = format!("-----BEGIN {tag}-----\n");
        for chunk in b64.as_bytes().chunks(64) {
            s.push_str(std::str::from_utf8(chunk).unwrap());
            s.push('\n');
        }
        s.push_str(&format!("-----END {tag}-----\n"));
        s
    }
}
