//! `federation_key` and `federation_credential`: the node's zero-touch federation identity
//! (reference spec §6) in the layout ai-memory loads. The Ed25519 key is generated here, written
//! with its final mode, and never leaves the node; only its public half goes to the seeder
//! (through the injected [`CredentialIssuer`]), which answers with a credential signed by the
//! campaign's federation CA. A credential on disk is judged by the rules a receiving peer applies
//! (issuer, trust domain, signature) plus subject and key, and renewed past 2/3 of its lifetime.
//!
//! Two resources, not one, because the daemon treats them differently: it loads the key once at
//! start (a new key needs a restart), but re-reads the credential file every 60 s (a renewal
//! needs none).

use ed25519_dalek::SigningKey;
use hiveseed_proto::api::CredentialRequest;
use hiveseed_proto::credential::{CredentialError, SignedCredential};
use hiveseed_proto::manifest::{
    FederationCredential, FederationIssuer, FederationKey, Ownership, FEDERATION_CREDENTIAL_MODE,
    FEDERATION_KEY_MODE, FEDERATION_PUB_MODE,
};
use hiveseed_proto::{AbsPath, FedId, FileMode, NameError, ResourceId};
use zeroize::Zeroize;

use super::certificate::renewal_due;
use super::directory::{attr_actions, expect_kind, OwnerCache};
use super::{CredentialIssuer, ResourceError};
use crate::host::{Attrs, FileKind, Host, HostError, Owner, Stat};
use crate::plan::{Action, CredentialReason, PlanError};

/// A credential is a few hundred bytes; anything much larger is not one and is not read.
const CREDENTIAL_MAX_BYTES: u64 = 16 * 1024;
/// Nested directories of a slashed federation id.
const KEY_DIR_MODE: u32 = 0o700;

fn mode(bits: u32) -> FileMode {
    FileMode::new(bits).expect("valid mode")
}

fn bad_path(id: &ResourceId, e: NameError) -> PlanError {
    PlanError::BadName {
        id: id.clone(),
        what: "path",
        value: e.value,
    }
}

/// The seed at a key path, as much as observing needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyState {
    Missing,
    /// Not a raw 32-byte seed.
    Invalid,
    /// The public half of the seed on disk.
    Present {
        public: [u8; 32],
    },
}

/// Reads a raw seed (nothing past 32 bytes is read); the bytes are wiped once the public half
/// is derived.
fn read_seed(host: &dyn Host, path: &AbsPath) -> Result<Option<SigningKey>, HostError> {
    let mut bytes = match host.read_limited(path, 32) {
        Ok(Some(b)) => b,
        Ok(None) | Err(HostError::TooLarge { .. }) => return Ok(None),
        Err(e) => return Err(e),
    };
    let key = <[u8; 32]>::try_from(bytes.as_slice()).ok().map(|mut seed| {
        let key = SigningKey::from_bytes(&seed);
        seed.zeroize();
        key
    });
    bytes.zeroize();
    Ok(key)
}

fn observe_seed(host: &dyn Host, path: &AbsPath) -> Result<(KeyState, Option<Stat>), HostError> {
    let stat = host.stat(path)?;
    let state = match &stat {
        None => KeyState::Missing,
        Some(s) if s.kind == FileKind::File && s.size == 32 => match read_seed(host, path)? {
            Some(key) => KeyState::Present {
                public: key.verifying_key().to_bytes(),
            },
            None => KeyState::Missing,
        },
        Some(_) => KeyState::Invalid,
    };
    Ok((state, stat))
}

fn owner_of(
    host: &dyn Host,
    owners: &mut OwnerCache,
    owner: Option<&Ownership>,
) -> Result<Option<Owner>, HostError> {
    match owner {
        Some(o) => owners.resolve(host, o),
        None => Ok(None),
    }
}

// ---- federation_key ----------------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyObserved {
    pub key: KeyState,
    pub key_stat: Option<Stat>,
    /// `.pub` when it is 32 bytes (anything else differs anyway and is not read).
    pub public_file: Option<Vec<u8>>,
    pub pub_stat: Option<Stat>,
    pub owner: Option<Owner>,
}

pub fn observe_key(
    host: &dyn Host,
    owners: &mut OwnerCache,
    k: &FederationKey,
) -> Result<KeyObserved, HostError> {
    // An unusable path is refused by `plan`; there is nothing to observe at it.
    let (Ok(key_path), Ok(pub_path)) = (k.key_path(), k.pub_path()) else {
        return Ok(KeyObserved {
            key: KeyState::Missing,
            key_stat: None,
            public_file: None,
            pub_stat: None,
            owner: None,
        });
    };
    let (key, key_stat) = observe_seed(host, &key_path)?;
    let pub_stat = host.stat(&pub_path)?;
    let public_file = match &pub_stat {
        Some(s) if s.kind == FileKind::File && s.size == 32 => {
            match host.read_limited(&pub_path, 32) {
                Err(HostError::TooLarge { .. }) => None,
                r => r?,
            }
        }
        _ => None,
    };
    Ok(KeyObserved {
        key,
        key_stat,
        public_file,
        pub_stat,
        owner: owner_of(host, owners, k.owner.as_ref())?,
    })
}

pub fn plan_key(k: &FederationKey, o: &KeyObserved) -> Result<Vec<Action>, PlanError> {
    let key_path = k.key_path().map_err(|e| bad_path(&k.id, e))?;
    let pub_path = k.pub_path().map_err(|e| bad_path(&k.id, e))?;
    // A directory or link where a key belongs is refused, never replaced or followed.
    for (path, stat) in [(&key_path, &o.key_stat), (&pub_path, &o.pub_stat)] {
        if let Some(st) = stat {
            expect_kind(&k.id, path, st, FileKind::File)?;
        }
    }
    let public = match &o.key {
        KeyState::Missing | KeyState::Invalid => {
            return Ok(vec![Action::GenerateFederationKey {
                key_dir: k.key_dir.clone(),
                key_path,
                pub_path,
                owner: k.owner.clone(),
                key_observed: o.key_stat,
                pub_observed: o.pub_stat,
            }])
        }
        KeyState::Present { public } => public,
    };
    let owner = k.owner.as_ref();
    let mut actions = match &o.key_stat {
        Some(st) => attr_actions(&key_path, st, mode(FEDERATION_KEY_MODE), owner, o.owner),
        None => Vec::new(),
    };
    match (&o.pub_stat, &o.public_file) {
        (Some(st), Some(on_disk)) if on_disk == public => actions.extend(attr_actions(
            &pub_path,
            st,
            mode(FEDERATION_PUB_MODE),
            owner,
            o.owner,
        )),
        _ => actions.push(Action::WriteFederationPub {
            key_path,
            pub_path,
            owner: k.owner.clone(),
            pub_observed: o.pub_stat,
        }),
    }
    Ok(actions)
}

/// The key's directories from `key_dir` down: missing ones are made 0700, owned like the key
/// (ai-memory's daemon creates its own `daemon` key in `key_dir`, so it must be able to write).
fn ensure_key_dirs(
    host: &dyn Host,
    key_dir: &AbsPath,
    key_path: &AbsPath,
    owner: Option<Owner>,
) -> Result<(), HostError> {
    super::ensure_parents(host, key_dir)?;
    let mut dirs = Vec::new();
    let mut cur = key_path.parent();
    while let Some(d) = cur {
        let last = &d == key_dir;
        cur = if last { None } else { d.parent() };
        dirs.push(d);
    }
    let attrs = Attrs {
        mode: mode(KEY_DIR_MODE),
        owner,
    };
    for d in dirs.iter().rev() {
        if host.stat(d)?.is_none() {
            host.mkdir(d, attrs)?;
        }
    }
    Ok(())
}

fn write_pub(
    host: &dyn Host,
    key: &SigningKey,
    pub_path: &AbsPath,
    owner: Option<Owner>,
) -> Result<(), HostError> {
    host.write_atomic(
        pub_path,
        key.verifying_key().as_bytes(),
        Attrs {
            mode: mode(FEDERATION_PUB_MODE),
            owner,
        },
    )
}

/// A fresh key: the seed first (0400), then its public half (0444), both atomically.
pub fn generate_key(
    host: &dyn Host,
    key_dir: &AbsPath,
    key_path: &AbsPath,
    pub_path: &AbsPath,
    owner: Option<&Ownership>,
) -> Result<(), ResourceError> {
    let owner = super::directory::resolve(host, key_path, owner)?;
    ensure_key_dirs(host, key_dir, key_path, owner)?;
    let key = SigningKey::generate(&mut rand::rngs::OsRng);
    let mut seed = key.to_bytes();
    let written = host.write_atomic(
        key_path,
        &seed,
        Attrs {
            mode: mode(FEDERATION_KEY_MODE),
            owner,
        },
    );
    seed.zeroize();
    written?;
    write_pub(host, &key, pub_path, owner)?;
    Ok(())
}

/// Rewrites `.pub` from the seed on disk.
pub fn write_public(
    host: &dyn Host,
    key_path: &AbsPath,
    pub_path: &AbsPath,
    owner: Option<&Ownership>,
) -> Result<(), ResourceError> {
    let key = read_seed(host, key_path)?.ok_or_else(|| ResourceError::FederationKey {
        path: key_path.clone(),
        reason: "missing or not a raw 32-byte seed".into(),
    })?;
    let owner = super::directory::resolve(host, pub_path, owner)?;
    write_pub(host, &key, pub_path, owner)?;
    Ok(())
}

// ---- federation_credential ---------------------------------------------------------------------

/// The credential file as read: text is judged by `plan`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CredentialFile {
    Missing,
    /// Too large or not UTF-8: not a credential.
    NotACredential,
    Text(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CredentialObserved {
    /// The key the credential must bind.
    pub key: KeyState,
    pub file: CredentialFile,
    pub stat: Option<Stat>,
    pub owner: Option<Owner>,
}

pub fn observe_credential(
    host: &dyn Host,
    owners: &mut OwnerCache,
    c: &FederationCredential,
) -> Result<CredentialObserved, HostError> {
    let key = match c.key_path() {
        Ok(p) => observe_seed(host, &p)?.0,
        Err(_) => KeyState::Missing,
    };
    let stat = host.stat(&c.credential_path)?;
    let file = match &stat {
        None => CredentialFile::Missing,
        Some(s) if s.kind == FileKind::File && s.size <= CREDENTIAL_MAX_BYTES => {
            match host.read_limited(&c.credential_path, CREDENTIAL_MAX_BYTES) {
                Ok(None) => CredentialFile::Missing,
                Ok(Some(b)) => String::from_utf8(b)
                    .map(CredentialFile::Text)
                    .unwrap_or(CredentialFile::NotACredential),
                // Grew since it was stat'ed.
                Err(HostError::TooLarge { .. }) => CredentialFile::NotACredential,
                Err(e) => return Err(e),
            }
        }
        Some(_) => CredentialFile::NotACredential,
    };
    Ok(CredentialObserved {
        key,
        file,
        stat,
        owner: owner_of(host, owners, c.owner.as_ref())?,
    })
}

fn trusted(issuer: &FederationIssuer) -> [(&str, ed25519_dalek::VerifyingKey); 1] {
    [(issuer.id.as_str(), issuer.public_key.verifying_key())]
}

/// Why the credential on disk will not do, `None` when it does.
fn credential_reason(
    c: &FederationCredential,
    o: &CredentialObserved,
    now: i64,
) -> Option<CredentialReason> {
    let KeyState::Present { public } = &o.key else {
        return Some(CredentialReason::NoKey);
    };
    let text = match &o.file {
        CredentialFile::Missing => return Some(CredentialReason::Missing),
        CredentialFile::NotACredential => {
            return Some(CredentialReason::Unreadable(CredentialError::Malformed))
        }
        CredentialFile::Text(t) => t,
    };
    let cred = match SignedCredential::parse(text) {
        Ok(cred) => cred,
        Err(e) => return Some(CredentialReason::Unreadable(e)),
    };
    if let Err(e) = cred.check_issuer(&trusted(&c.issuer), Some(c.issuer.trust_domain.as_str())) {
        return Some(CredentialReason::NotTrusted(e));
    }
    if cred.claims.subject_agent_id != c.fed_id.as_str() {
        return Some(CredentialReason::OtherIdentity);
    }
    if &cred.claims.subject_pubkey != public {
        return Some(CredentialReason::OtherKey);
    }
    if renewal_due(cred.claims.not_before, cred.claims.not_after, now) {
        return Some(CredentialReason::Renew);
    }
    None
}

pub fn plan_credential(
    c: &FederationCredential,
    o: &CredentialObserved,
    now: i64,
) -> Result<Vec<Action>, PlanError> {
    let key_path = c.key_path().map_err(|e| bad_path(&c.id, e))?;
    if let Some(st) = &o.stat {
        expect_kind(&c.id, &c.credential_path, st, FileKind::File)?;
    }
    if let Some(reason) = credential_reason(c, o, now) {
        return Ok(vec![Action::RequestCredential {
            fed_id: c.fed_id.clone(),
            key_path,
            credential_path: c.credential_path.clone(),
            issuer: c.issuer.clone(),
            owner: c.owner.clone(),
            reason,
            credential_observed: o.stat,
        }]);
    }
    Ok(match &o.stat {
        Some(st) => attr_actions(
            &c.credential_path,
            st,
            mode(FEDERATION_CREDENTIAL_MODE),
            c.owner.as_ref(),
            o.owner,
        ),
        None => Vec::new(),
    })
}

/// Sends the public half of the key on disk, checks that the answer is a credential `issuer`
/// signed for this identity and key and not already expired, and writes it atomically (0400).
#[allow(clippy::too_many_arguments)]
pub async fn request_credential(
    host: &dyn Host,
    client: &dyn CredentialIssuer,
    fed_id: &FedId,
    key_path: &AbsPath,
    credential_path: &AbsPath,
    issuer: &FederationIssuer,
    owner: Option<&Ownership>,
    now: i64,
) -> Result<(), ResourceError> {
    let err = |reason: String| ResourceError::Credential {
        path: credential_path.clone(),
        reason,
    };
    let key = read_seed(host, key_path)?.ok_or_else(|| {
        err(format!(
            "the key {key_path} is missing or not a raw 32-byte seed (a federation_key resource \
             must come first)"
        ))
    })?;
    let public = key.verifying_key();
    drop(key);
    let req = CredentialRequest {
        fed_id: fed_id.clone(),
        subject_pubkey: public.into(),
    };
    let resp = client
        .issue(&req)
        .await
        .map_err(|source| ResourceError::CredentialRefused {
            path: credential_path.clone(),
            source,
        })?;
    let cred = SignedCredential::parse(&resp.credential).map_err(|e| {
        err(format!(
            "the seeder answered something that is not a credential: {e}"
        ))
    })?;
    cred.check_issuer(&trusted(issuer), Some(issuer.trust_domain.as_str()))
        .map_err(|e| {
            err(format!(
                "the seeder's credential is not {}'s: {e}",
                issuer.id
            ))
        })?;
    if cred.claims.subject_agent_id != fed_id.as_str() {
        return Err(err(format!(
            "the seeder's credential is for {:?}, not {fed_id}",
            cred.claims.subject_agent_id
        )));
    }
    if cred.claims.subject_pubkey != public.to_bytes() {
        return Err(err("the seeder's credential is for another key".into()));
    }
    if now > cred.claims.not_after {
        return Err(err(format!(
            "the seeder's credential expired at {} (now {now}): are the clocks apart?",
            cred.claims.not_after
        )));
    }
    let owner = super::directory::resolve(host, credential_path, owner)?;
    super::ensure_parents(host, credential_path)?;
    host.write_atomic(
        credential_path,
        format!("{}\n", resp.credential.trim()).as_bytes(),
        Attrs {
            mode: mode(FEDERATION_CREDENTIAL_MODE),
            owner,
        },
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use hiveseed_proto::credential::mint;

    const NOW: i64 = 1_800_000_000;

    fn ca() -> SigningKey {
        SigningKey::from_bytes(&[3; 32])
    }

    fn resource() -> FederationCredential {
        serde_json::from_value(serde_json::json!({
            "id": "credential:federation",
            "fed_id": "t1/r1/t1-peer-r1-01",
            "key_dir": "/etc/ai-memory/keys",
            "credential_path": "/etc/ai-memory/credential",
            "issuer": {
                "id": "t1-ca",
                "trust_domain": "t1.fleet",
                "public_key": hiveseed_proto::Ed25519PublicKey::from(ca().verifying_key()),
            },
        }))
        .unwrap()
    }

    fn node() -> SigningKey {
        SigningKey::from_bytes(&[5; 32])
    }

    fn observed(text: Option<String>) -> CredentialObserved {
        CredentialObserved {
            key: KeyState::Present {
                public: node().verifying_key().to_bytes(),
            },
            file: text
                .map(CredentialFile::Text)
                .unwrap_or(CredentialFile::Missing),
            stat: None,
            owner: None,
        }
    }

    fn cred(
        issuer: &SigningKey,
        issuer_id: &str,
        domain: &str,
        subject: &str,
        key: &SigningKey,
        at: i64,
    ) -> String {
        mint(
            issuer,
            issuer_id,
            domain,
            subject,
            key.verifying_key().to_bytes(),
            at,
            3000,
        )
        .unwrap()
        .0
    }

    #[test]
    fn each_unusable_credential_has_its_reason_and_a_good_one_has_none() {
        let c = resource();
        let good = |at| {
            cred(
                &ca(),
                "t1-ca",
                "t1.fleet",
                "t1/r1/t1-peer-r1-01",
                &node(),
                at,
            )
        };
        let other = SigningKey::from_bytes(&[8; 32]);
        let cases: Vec<(CredentialObserved, Option<CredentialReason>)> = vec![
            (observed(Some(good(NOW))), None),
            (observed(Some(format!("  {}\n", good(NOW)))), None),
            (
                CredentialObserved {
                    key: KeyState::Missing,
                    ..observed(Some(good(NOW)))
                },
                Some(CredentialReason::NoKey),
            ),
            (observed(None), Some(CredentialReason::Missing)),
            (
                observed(Some("garbage".into())),
                Some(CredentialReason::Unreadable(CredentialError::Malformed)),
            ),
            (
                observed(Some(cred(
                    &other,
                    "t1-ca",
                    "t1.fleet",
                    "t1/r1/t1-peer-r1-01",
                    &node(),
                    NOW,
                ))),
                Some(CredentialReason::NotTrusted(CredentialError::BadSignature)),
            ),
            (
                observed(Some(cred(
                    &ca(),
                    "t2-ca",
                    "t1.fleet",
                    "t1/r1/t1-peer-r1-01",
                    &node(),
                    NOW,
                ))),
                Some(CredentialReason::NotTrusted(CredentialError::UnknownIssuer)),
            ),
            (
                observed(Some(cred(
                    &ca(),
                    "t1-ca",
                    "t2.fleet",
                    "t1/r1/t1-peer-r1-01",
                    &node(),
                    NOW,
                ))),
                Some(CredentialReason::NotTrusted(
                    CredentialError::WrongTrustDomain,
                )),
            ),
            (
                observed(Some(cred(
                    &ca(),
                    "t1-ca",
                    "t1.fleet",
                    "t1/r1/t1-peer-r1-02",
                    &node(),
                    NOW,
                ))),
                Some(CredentialReason::OtherIdentity),
            ),
            (
                observed(Some(cred(
                    &ca(),
                    "t1-ca",
                    "t1.fleet",
                    "t1/r1/t1-peer-r1-01",
                    &other,
                    NOW,
                ))),
                Some(CredentialReason::OtherKey),
            ),
            // Lifetime 3030 s from NOW-30: due from NOW-30+2020.
            (
                observed(Some(good(NOW - 2000))),
                Some(CredentialReason::Renew),
            ),
            (observed(Some(good(NOW - 1980))), None),
            (
                observed(Some(good(NOW - 10_000))),
                Some(CredentialReason::Renew),
            ),
        ];
        for (i, (o, want)) in cases.into_iter().enumerate() {
            assert_eq!(credential_reason(&c, &o, NOW), want, "case {i}");
            let actions = plan_credential(&c, &o, NOW).unwrap();
            assert_eq!(actions.is_empty(), want.is_none(), "case {i}: {actions:?}");
        }
    }

    fn stat(kind: FileKind, mode: u32, size: u64) -> Option<Stat> {
        Some(Stat {
            kind,
            mode,
            uid: 0,
            gid: 0,
            size,
            dev: 1,
            ino: 2,
            nlink: 1,
        })
    }

    #[test]
    fn key_plans_generate_rewrite_the_public_half_or_fix_modes() {
        let k: FederationKey = serde_json::from_value(serde_json::json!({
            "id": "key:federation", "fed_id": "t1/r1/t1-peer-r1-01",
            "key_dir": "/etc/ai-memory/keys",
        }))
        .unwrap();
        let public = node().verifying_key().to_bytes();
        let good = KeyObserved {
            key: KeyState::Present { public },
            key_stat: stat(FileKind::File, 0o400, 32),
            public_file: Some(public.to_vec()),
            pub_stat: stat(FileKind::File, 0o444, 32),
            owner: None,
        };
        assert_eq!(plan_key(&k, &good).unwrap(), vec![]);
        for key in [KeyState::Missing, KeyState::Invalid] {
            let o = KeyObserved {
                key,
                ..good.clone()
            };
            let a = plan_key(&k, &o).unwrap();
            assert!(
                matches!(&a[..], [Action::GenerateFederationKey { key_path, .. }]
                    if key_path.as_str() == "/etc/ai-memory/keys/t1/r1/t1-peer-r1-01.priv"),
                "{a:?}"
            );
        }
        let stale_pub = KeyObserved {
            public_file: Some(vec![0; 32]),
            ..good.clone()
        };
        assert!(matches!(
            &plan_key(&k, &stale_pub).unwrap()[..],
            [Action::WriteFederationPub { .. }]
        ));
        let loose = KeyObserved {
            key_stat: stat(FileKind::File, 0o644, 32),
            ..good.clone()
        };
        assert!(matches!(
            &plan_key(&k, &loose).unwrap()[..],
            [Action::Chmod { mode, .. }] if mode.bits() == 0o400
        ));
        let linked = KeyObserved {
            key_stat: stat(FileKind::Symlink, 0o777, 10),
            ..good
        };
        assert!(matches!(
            plan_key(&k, &linked),
            Err(PlanError::WrongKind { .. })
        ));
    }

    #[test]
    fn a_directory_at_the_credential_path_is_refused() {
        let c = resource();
        let mut o = observed(None);
        o.stat = stat(FileKind::Directory, 0o700, 0);
        assert!(matches!(
            plan_credential(&c, &o, NOW),
            Err(PlanError::WrongKind { .. })
        ));
    }
}
