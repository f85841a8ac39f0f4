//! `certificate`: an ECDSA P-256 key generated on the node (written first, with its final mode,
//! never sent anywhere), and a certificate obtained by sending a CSR through the injected
//! [`CertSigner`]. Renewed past 2/3 of its lifetime or when it does not match the key.

use hiveseed_proto::manifest::{Certificate, CertificatePurpose, Ownership};
use hiveseed_proto::{AbsPath, FileMode, NodeName};
use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair, PKCS_ECDSA_P256_SHA256};

use super::directory::{attr_actions, OwnerCache};
use super::{CertSigner, ResourceError};
use crate::host::{Attrs, Host, HostError, Owner, Stat};
use crate::plan::{Action, CertReason, PlanError};

pub const CERT_MODE: u32 = 0o644;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyState {
    Missing,
    Invalid,
    /// The raw public key (EC point).
    Present {
        public_key: Vec<u8>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CertState {
    Missing,
    Invalid,
    Present {
        not_before: i64,
        not_after: i64,
        public_key: Vec<u8>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observed {
    pub key: KeyState,
    pub key_stat: Option<Stat>,
    pub cert: CertState,
    pub cert_stat: Option<Stat>,
    pub owner: Option<Owner>,
    /// Whether `ca_path` exists (`None`: the resource has none).
    pub ca_exists: Option<bool>,
}

fn key_state(bytes: Option<Vec<u8>>) -> KeyState {
    let Some(bytes) = bytes else {
        return KeyState::Missing;
    };
    match std::str::from_utf8(&bytes)
        .ok()
        .and_then(|s| KeyPair::from_pem(s).ok())
    {
        Some(k) => KeyState::Present {
            public_key: k.public_key_raw().to_vec(),
        },
        None => KeyState::Invalid,
    }
}

/// Validity and public key of the first certificate of a PEM chain.
pub fn parse_leaf(pem: &[u8]) -> Option<(i64, i64, Vec<u8>)> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(pem).ok()?;
    let cert = pem.parse_x509().ok()?;
    let v = cert.validity();
    Some((
        v.not_before.timestamp(),
        v.not_after.timestamp(),
        cert.public_key().subject_public_key.data.to_vec(),
    ))
}

pub fn observe(
    host: &dyn Host,
    owners: &mut OwnerCache,
    c: &Certificate,
) -> Result<Observed, HostError> {
    let key = key_state(host.read(&c.key_path)?);
    let cert = match host.read(&c.cert_path)? {
        None => CertState::Missing,
        Some(b) => match parse_leaf(&b) {
            Some((not_before, not_after, public_key)) => CertState::Present {
                not_before,
                not_after,
                public_key,
            },
            None => CertState::Invalid,
        },
    };
    let owner = match &c.owner {
        Some(o) => owners.resolve(host, o)?,
        None => None,
    };
    Ok(Observed {
        key,
        key_stat: host.stat(&c.key_path)?,
        cert,
        cert_stat: host.stat(&c.cert_path)?,
        owner,
        ca_exists: match &c.ca_path {
            Some(p) => Some(host.stat(p)?.is_some()),
            None => None,
        },
    })
}

/// True once `now` is past 2/3 of the certificate's lifetime.
pub fn renewal_due(not_before: i64, not_after: i64, now: i64) -> bool {
    let lifetime = (not_after - not_before).max(0);
    now >= not_before + lifetime * 2 / 3
}

pub fn plan(c: &Certificate, o: &Observed, now: i64) -> Result<Vec<Action>, PlanError> {
    // Group access is allowed (Debian's ssl-cert group); world access never.
    if c.key_mode.bits() & 0o007 != 0 {
        return Err(PlanError::KeyExposed {
            id: c.id.clone(),
            path: c.key_path.clone(),
            mode: c.key_mode,
        });
    }
    let request = |reason| Action::RequestCertificate {
        purpose: c.purpose,
        key_path: c.key_path.clone(),
        cert_path: c.cert_path.clone(),
        owner: c.owner.clone(),
        ca_path: c.ca_path.clone(),
        reason,
        cert_observed: o.cert_stat,
    };
    let public_key = match &o.key {
        KeyState::Missing | KeyState::Invalid => {
            return Ok(vec![
                Action::GenerateKey {
                    path: c.key_path.clone(),
                    mode: c.key_mode,
                    owner: c.owner.clone(),
                    observed: o.key_stat,
                },
                request(CertReason::NoKey),
            ])
        }
        KeyState::Present { public_key } => public_key,
    };
    let mut actions = match &o.key_stat {
        Some(st) => attr_actions(&c.key_path, st, c.key_mode, c.owner.as_ref(), o.owner),
        None => Vec::new(),
    };
    match &o.cert {
        // The CA is written with the certificate, from the seeder's answer: a missing one is
        // asked for again rather than copied out of a file the owner can write.
        CertState::Missing | CertState::Present { .. } if o.ca_exists == Some(false) => {
            actions.push(request(CertReason::Missing))
        }
        CertState::Missing => actions.push(request(CertReason::Missing)),
        CertState::Invalid => actions.push(request(CertReason::Unreadable)),
        CertState::Present { public_key: pk, .. } if pk != public_key => {
            actions.push(request(CertReason::KeyMismatch))
        }
        CertState::Present {
            not_before,
            not_after,
            ..
        } if renewal_due(*not_before, *not_after, now) => actions.push(request(CertReason::Renew)),
        CertState::Present { .. } => {
            if let Some(st) = &o.cert_stat {
                let mode = FileMode::new(CERT_MODE).expect("valid mode");
                actions.extend(attr_actions(
                    &c.cert_path,
                    st,
                    mode,
                    c.owner.as_ref(),
                    o.owner,
                ));
            }
        }
    }
    Ok(actions)
}

pub fn generate_key(
    host: &dyn Host,
    path: &AbsPath,
    mode: FileMode,
    owner: Option<&Ownership>,
) -> Result<(), ResourceError> {
    let owner = super::directory::resolve(host, path, owner)?;
    let key =
        KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|e| ResourceError::Certificate {
            path: path.clone(),
            reason: format!("key generation failed: {e}"),
        })?;
    super::ensure_parents(host, path)?;
    host.write_atomic(path, key.serialize_pem().as_bytes(), Attrs { mode, owner })?;
    Ok(())
}

/// Where a requested certificate's files are.
#[derive(Debug, Clone, Copy)]
pub struct CertFiles<'a> {
    pub key_path: &'a AbsPath,
    pub cert_path: &'a AbsPath,
    /// The chain's CA, when the resource wants it.
    pub ca_path: Option<&'a AbsPath>,
}

/// Builds a CSR from the key on disk, has it signed, checks the leaf carries our key, writes the
/// chain.
pub async fn request_certificate(
    host: &dyn Host,
    signer: &dyn CertSigner,
    node: &NodeName,
    purpose: CertificatePurpose,
    files: CertFiles<'_>,
    owner: Option<&Ownership>,
) -> Result<(), ResourceError> {
    let CertFiles {
        key_path,
        cert_path,
        ca_path,
    } = files;
    let cert_err = |reason: String| ResourceError::Certificate {
        path: cert_path.clone(),
        reason,
    };
    let key_pem = host
        .read(key_path)?
        .ok_or_else(|| cert_err(format!("key {key_path} is missing")))?;
    let key = std::str::from_utf8(&key_pem)
        .ok()
        .and_then(|s| KeyPair::from_pem(s).ok())
        .ok_or_else(|| cert_err(format!("key {key_path} is not a PEM private key")))?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, node.as_str());
    params.distinguished_name = dn;
    let csr = params
        .serialize_request(&key)
        .and_then(|r| r.pem())
        .map_err(|e| cert_err(format!("CSR: {e}")))?;
    let chain = signer
        .sign(purpose, &csr)
        .await
        .map_err(|source| ResourceError::Sign {
            path: cert_path.clone(),
            source,
        })?;
    let (_, _, public_key) = parse_leaf(chain.as_bytes())
        .ok_or_else(|| cert_err("signer returned no PEM certificate".into()))?;
    if public_key != key.public_key_raw() {
        return Err(cert_err(
            "signer returned a certificate for another key".into(),
        ));
    }
    let owner_ids = super::directory::resolve(host, cert_path, owner)?;
    super::ensure_parents(host, cert_path)?;
    host.write_atomic(
        cert_path,
        chain.as_bytes(),
        Attrs {
            mode: FileMode::new(CERT_MODE).expect("valid mode"),
            owner: owner_ids,
        },
    )?;
    if let Some(ca_path) = ca_path {
        let ca = chain_after_leaf(&chain)
            .ok_or_else(|| cert_err("signer returned no CA after the leaf".into()))?;
        super::ensure_parents(host, ca_path)?;
        host.write_atomic(
            ca_path,
            ca.as_bytes(),
            Attrs {
                mode: FileMode::new(CERT_MODE).expect("valid mode"),
                owner: Some(crate::host::Owner { uid: 0, gid: 0 }),
            },
        )?;
    }
    Ok(())
}

/// The PEM blocks after the first one (the leaf): the issuing CA of a chain.
fn chain_after_leaf(chain: &str) -> Option<String> {
    const END: &str = "-----END CERTIFICATE-----";
    let rest = &chain[chain.find(END)? + END.len()..];
    let rest = rest.trim_start();
    rest.contains(END).then(|| rest.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_at_two_thirds() {
        assert!(!renewal_due(0, 300, 199));
        assert!(renewal_due(0, 300, 200));
        assert!(renewal_due(0, 300, 400));
        assert!(renewal_due(100, 100, 100));
    }
}
