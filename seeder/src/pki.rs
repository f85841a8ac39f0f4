//! The campaign's X.509 PKI: the CA, the seeder's server certificate, and signing node CSRs.
//!
//! The seeder decides every certificate's subject, SANs, usages and lifetime; of a CSR only the
//! public key (after its self-signature verifies) is used.

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
    #[error("CSR key algorithm is not allowed (ECDSA P-256/P-384, Ed25519, RSA only)")]
    BadCsrKey,
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
        Ok(Self {
            issuer,
            cert_pem: cert_pem.to_owned(),
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
        if csr_pem.len() > 16 * 1024 {
            return Err(PkiError::BadCsr("larger than 16 KiB".into()));
        }
        let csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| PkiError::BadCsr(e.to_string()))?;
        let alg = csr.public_key.algorithm();
        let allowed = [
            &rcgen::PKCS_ECDSA_P256_SHA256,
            &rcgen::PKCS_ECDSA_P384_SHA384,
            &rcgen::PKCS_ED25519,
            &rcgen::PKCS_RSA_SHA256,
        ];
        if !allowed.contains(&alg) {
            return Err(PkiError::BadCsrKey);
        }
        let cert = self
            .leaf_params(spec)?
            .signed_by(&csr.public_key, &self.issuer)
            .map_err(PkiError::Generate)?;
        use rcgen::PublicKeyData;
        let key_fpr = hiveseed_proto::Sha256::digest(csr.public_key.der_bytes()).to_hex();
        Ok((cert.pem(), cert.der().to_vec(), key_fpr))
    }
}

/// The SANs (DNS names and IPs, as strings) of a PEM certificate.
pub fn cert_sans(cert_pem: &str) -> Result<Vec<String>, PkiError> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(cert_pem.as_bytes())
        .map_err(|e| PkiError::Parse(e.to_string()))?;
    let cert = pem
        .parse_x509()
        .map_err(|e| PkiError::Parse(e.to_string()))?;
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
                    _ => {}
                },
                _ => {}
            }
        }
    }
    Ok(out)
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
