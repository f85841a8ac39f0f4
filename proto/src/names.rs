//! Newtypes for every name and number that crosses the wire: parsed once at the edge, never raw strings.

use std::fmt;
use std::str::FromStr;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use ed25519_dalek::VerifyingKey;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::Digest;

/// Why a name or number was refused, naming what kind of value it was.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {what} {value:?}: {reason}")]
pub struct NameError {
    pub what: &'static str,
    pub value: String,
    pub reason: &'static str,
}

impl NameError {
    fn new(what: &'static str, value: &str, reason: &'static str) -> Self {
        // Cap the echoed value so a hostile megabyte never lands in a log line.
        let value: String = value.chars().take(80).collect();
        Self {
            what,
            value,
            reason,
        }
    }
}

/// A DNS-label-like name: 1..=63 of `[a-z0-9-]`, starting and ending alphanumeric.
fn check_label(what: &'static str, s: &str) -> Result<(), NameError> {
    if s.is_empty() {
        return Err(NameError::new(what, s, "must not be empty"));
    }
    if s.len() > 63 {
        return Err(NameError::new(what, s, "longer than 63 characters"));
    }
    if !s
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Err(NameError::new(
            what,
            s,
            "only lowercase letters, digits and '-' are allowed",
        ));
    }
    if s.starts_with('-') || s.ends_with('-') {
        return Err(NameError::new(what, s, "must not start or end with '-'"));
    }
    Ok(())
}

/// A file-name-safe token: 1..=`max` of `[a-z0-9._-]`, starting alphanumeric (so never `.` or
/// `..`), e.g. an issuer id (`do-1461-ca`, the name of `<trust dir>/<id>.pub`) or a trust domain.
fn check_token(what: &'static str, s: &str, max: usize) -> Result<(), NameError> {
    if s.is_empty() {
        return Err(NameError::new(what, s, "must not be empty"));
    }
    if s.len() > max {
        return Err(NameError::new(what, s, "is too long"));
    }
    if !s
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
    {
        return Err(NameError::new(
            what,
            s,
            "only lowercase letters, digits and '.', '_', '-' are allowed",
        ));
    }
    if !s.as_bytes()[0].is_ascii_alphanumeric() {
        return Err(NameError::new(what, s, "must start with a letter or digit"));
    }
    Ok(())
}

fn check_issuer_id(what: &'static str, s: &str) -> Result<(), NameError> {
    check_token(what, s, 128)
}

fn check_trust_domain(what: &'static str, s: &str) -> Result<(), NameError> {
    check_token(what, s, 253)
}

macro_rules! label_newtype {
    ($(#[$doc:meta])* $name:ident, $what:literal) => {
        label_newtype!($(#[$doc])* $name, $what, check_label);
    };
    ($(#[$doc:meta])* $name:ident, $what:literal, $check:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(String);

        impl $name {
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl FromStr for $name {
            type Err = NameError;
            fn from_str(s: &str) -> Result<Self, NameError> {
                $check($what, s)?;
                Ok(Self(s.to_owned()))
            }
        }

        impl TryFrom<String> for $name {
            type Error = NameError;
            fn try_from(s: String) -> Result<Self, NameError> {
                $check($what, &s)?;
                Ok(Self(s))
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                // `pad` honours width and alignment, so names line up in tables.
                f.pad(&self.0)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.0)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                Self::try_from(s).map_err(serde::de::Error::custom)
            }
        }
    };
}

label_newtype!(
    /// A node's name, e.g. `do-1461-peer-nyc3-01`; also its hostname and certificate CN.
    NodeName,
    "node name"
);
label_newtype!(
    /// A role, e.g. `pg` or `peer`: the name of a file in `roles/`.
    RoleName,
    "role name"
);
label_newtype!(
    /// A region slug, e.g. `nyc3`.
    Region,
    "region"
);
label_newtype!(
    /// A campaign: one fleet with its own CA and keys, e.g. `do-1461`.
    Campaign,
    "campaign"
);

label_newtype!(
    /// A zero-touch federation issuer (the campaign's federation CA), e.g. `do-1461-ca`: the
    /// credential's `issuer_id` and the file name `<trust bundle dir>/<issuer id>.pub`.
    IssuerId,
    "issuer id",
    check_issuer_id
);
label_newtype!(
    /// The federation trust domain a credential is scoped to, e.g. `do-1461.fleet`.
    TrustDomain,
    "trust domain",
    check_trust_domain
);

/// A node's federation identity `<campaign>/<region>/<node>`, e.g.
/// `do-1461/nyc3/do-1461-peer-nyc3-01`: ai-memory's `--federation-identity`, the subject of its
/// credential, and the name of its key `<key dir>/<fed id>.priv` (nested directories).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FedId(String);

impl FedId {
    pub fn new(campaign: &Campaign, region: &Region, node: &NodeName) -> Self {
        Self(format!("{campaign}/{region}/{node}"))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for FedId {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, NameError> {
        const WHAT: &str = "federation identity";
        let parts: Vec<&str> = s.split('/').collect();
        if parts.len() != 3 {
            return Err(NameError::new(
                WHAT,
                s,
                "must be <campaign>/<region>/<node>",
            ));
        }
        for p in parts {
            check_label(WHAT, p).map_err(|e| NameError::new(WHAT, s, e.reason))?;
        }
        Ok(Self(s.to_owned()))
    }
}

impl fmt::Display for FedId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Serialize for FedId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for FedId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Bytes carried as canonical standard base64 (with padding) on the wire. Only the canonical
/// encoding is accepted, so the bytes and the text (and so a manifest's digest) agree.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Base64Bytes(Vec<u8>);

impl Base64Bytes {
    pub fn new(bytes: Vec<u8>) -> Self {
        Self(bytes)
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    pub fn to_base64(&self) -> String {
        STANDARD.encode(&self.0)
    }
}

impl fmt::Debug for Base64Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Base64Bytes({} bytes)", self.0.len())
    }
}

impl FromStr for Base64Bytes {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, NameError> {
        let bytes = STANDARD
            .decode(s)
            .map_err(|_| NameError::new("base64", s, "is not standard base64"))?;
        if STANDARD.encode(&bytes) != s {
            return Err(NameError::new(
                "base64",
                s,
                "is not the canonical standard base64 (with padding)",
            ));
        }
        Ok(Self(bytes))
    }
}

impl Serialize for Base64Bytes {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_base64())
    }
}

impl<'de> Deserialize<'de> for Base64Bytes {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// An Ed25519 public key (raw 32 bytes, ai-memory's `.pub` format), standard base64 on the wire.
/// Parsing refuses anything but 32 bytes that decode to a curve point of full order.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Ed25519PublicKey([u8; 32]);

impl Ed25519PublicKey {
    /// Validates raw bytes: a point on the curve that is not of small order.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, &'static str> {
        let raw: [u8; 32] = bytes.try_into().map_err(|_| "must be exactly 32 bytes")?;
        let key = VerifyingKey::from_bytes(&raw).map_err(|_| "is not a valid Ed25519 point")?;
        if key.is_weak() {
            return Err("is a small-order (weak) Ed25519 point");
        }
        Ok(Self(raw))
    }

    pub fn to_bytes(self) -> [u8; 32] {
        self.0
    }

    pub fn verifying_key(&self) -> VerifyingKey {
        VerifyingKey::from_bytes(&self.0).expect("checked when parsed")
    }

    pub fn to_base64(&self) -> String {
        STANDARD.encode(self.0)
    }
}

impl From<VerifyingKey> for Ed25519PublicKey {
    fn from(k: VerifyingKey) -> Self {
        Self(k.to_bytes())
    }
}

impl fmt::Debug for Ed25519PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Ed25519PublicKey({})", self.to_base64())
    }
}

impl fmt::Display for Ed25519PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_base64())
    }
}

impl FromStr for Ed25519PublicKey {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, NameError> {
        const WHAT: &str = "ed25519 public key";
        let bytes = s
            .parse::<Base64Bytes>()
            .map_err(|e| NameError::new(WHAT, s, e.reason))?;
        Self::from_bytes(bytes.as_bytes()).map_err(|reason| NameError::new(WHAT, s, reason))
    }
}

impl Serialize for Ed25519PublicKey {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_base64())
    }
}

impl<'de> Deserialize<'de> for Ed25519PublicKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A manifest generation. Generations only ever go up for a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Generation(pub u64);

impl Generation {
    pub fn next(self) -> Self {
        Self(self.0 + 1)
    }
}

impl fmt::Display for Generation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A SHA-256 digest, lowercase hex on the wire.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Sha256(pub [u8; 32]);

impl Sha256 {
    pub fn digest(bytes: &[u8]) -> Self {
        Self(sha2::Sha256::digest(bytes).into())
    }

    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Debug for Sha256 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Sha256({})", self.to_hex())
    }
}

impl fmt::Display for Sha256 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl FromStr for Sha256 {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, NameError> {
        if s.len() != 64 {
            return Err(NameError::new("sha256", s, "must be 64 hex characters"));
        }
        if !s
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(NameError::new("sha256", s, "must be lowercase hex"));
        }
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out)
            .map_err(|_| NameError::new("sha256", s, "must be lowercase hex"))?;
        Ok(Self(out))
    }
}

impl Serialize for Sha256 {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_hex())
    }
}

impl<'de> Deserialize<'de> for Sha256 {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A resource's identifier inside one manifest, e.g. `file:pg-hba` (what reports and `notify` name).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ResourceId(String);

impl ResourceId {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for ResourceId {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, NameError> {
        if s.is_empty() || s.len() > 128 {
            return Err(NameError::new(
                "resource id",
                s,
                "must be 1..=128 characters",
            ));
        }
        if !s
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:/@".contains(&b))
        {
            return Err(NameError::new(
                "resource id",
                s,
                "only letters, digits and -_.:/@ are allowed",
            ));
        }
        Ok(Self(s.to_owned()))
    }
}

impl fmt::Display for ResourceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Serialize for ResourceId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for ResourceId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// An absolute, normalised path on a node: no `..`, no `.`, no empty components, no NUL.
/// The agent joins it to its root in exactly one place, so a manifest can never escape the root.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AbsPath(String);

impl AbsPath {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The path's components, without the leading `/`.
    pub fn components(&self) -> impl Iterator<Item = &str> {
        self.0.split('/').filter(|c| !c.is_empty())
    }

    /// `rel` (relative, `/`-separated) below this path; the result is validated like any path.
    pub fn join(&self, rel: &str) -> Result<AbsPath, NameError> {
        if self.0 == "/" {
            format!("/{rel}").parse()
        } else {
            format!("{}/{rel}", self.0).parse()
        }
    }

    /// The parent directory, `None` for `/`.
    pub fn parent(&self) -> Option<AbsPath> {
        if self.0 == "/" {
            return None;
        }
        match self.0.rfind('/') {
            Some(0) => Some(AbsPath("/".into())),
            Some(i) => Some(AbsPath(self.0[..i].to_owned())),
            None => None,
        }
    }
}

impl FromStr for AbsPath {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, NameError> {
        const WHAT: &str = "path";
        if !s.starts_with('/') {
            return Err(NameError::new(WHAT, s, "must be absolute"));
        }
        if s.len() > 4096 {
            return Err(NameError::new(WHAT, s, "longer than 4096 bytes"));
        }
        if s.contains('\0') {
            return Err(NameError::new(WHAT, s, "contains NUL"));
        }
        if s == "/" {
            return Ok(Self(s.to_owned()));
        }
        for c in s[1..].split('/') {
            match c {
                "" => return Err(NameError::new(WHAT, s, "has an empty component")),
                "." | ".." => return Err(NameError::new(WHAT, s, "has a '.' or '..' component")),
                _ => {}
            }
        }
        Ok(Self(s.to_owned()))
    }
}

impl fmt::Display for AbsPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Serialize for AbsPath {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for AbsPath {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A Unix permission mode, written as an octal string (`"0600"`) on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FileMode(u32);

impl FileMode {
    pub const fn new(bits: u32) -> Option<Self> {
        if bits <= 0o7777 {
            Some(Self(bits))
        } else {
            None
        }
    }

    pub fn bits(self) -> u32 {
        self.0
    }

    /// True when group or others may read (or write) the file: never allowed for secrets.
    pub fn exposes_to_others(self) -> bool {
        self.0 & 0o077 != 0
    }
}

impl fmt::Display for FileMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:04o}", self.0)
    }
}

impl FromStr for FileMode {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, NameError> {
        if s.is_empty() || s.len() > 4 || !s.bytes().all(|b| (b'0'..=b'7').contains(&b)) {
            return Err(NameError::new(
                "file mode",
                s,
                "must be 1 to 4 octal digits, e.g. \"0600\"",
            ));
        }
        let bits = u32::from_str_radix(s, 8)
            .map_err(|_| NameError::new("file mode", s, "must be octal"))?;
        Ok(Self(bits))
    }
}

impl Serialize for FileMode {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for FileMode {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn labels_accept_reference_names_and_refuse_bad_ones() {
        assert!("do-1461-peer-nyc3-01".parse::<NodeName>().is_ok());
        for bad in ["", "-a", "a-", "A", "a_b", "a.b", "a b", &"x".repeat(64)] {
            let err = bad.parse::<NodeName>().unwrap_err();
            assert_eq!(err.what, "node name", "{bad:?}");
        }
    }

    #[test]
    fn abs_paths_refuse_escapes() {
        for good in ["/", "/etc/hiveseed/join.toml", "/a/b.c/..d"] {
            assert!(good.parse::<AbsPath>().is_ok(), "{good}");
        }
        for bad in [
            "etc",
            "/etc/../root",
            "/./x",
            "/a//b",
            "/a/",
            "/a\0b",
            "../x",
        ] {
            assert!(bad.parse::<AbsPath>().is_err(), "{bad:?}");
        }
        let p: AbsPath = "/etc/x/y".parse().unwrap();
        assert_eq!(p.parent().unwrap().as_str(), "/etc/x");
        assert_eq!(
            "/etc"
                .parse::<AbsPath>()
                .unwrap()
                .parent()
                .unwrap()
                .as_str(),
            "/"
        );
        assert_eq!(p.components().collect::<Vec<_>>(), ["etc", "x", "y"]);
        assert_eq!(p.join("a/b.priv").unwrap().as_str(), "/etc/x/y/a/b.priv");
        let root: AbsPath = "/".parse().unwrap();
        assert_eq!(root.join("a").unwrap().as_str(), "/a");
        assert!(p.join("../z").is_err() && p.join("").is_err());
    }

    #[test]
    fn file_modes_are_octal_strings() {
        let m: FileMode = serde_json::from_str("\"0600\"").unwrap();
        assert_eq!(m.bits(), 0o600);
        assert_eq!(serde_json::to_string(&m).unwrap(), "\"0600\"");
        assert!(!m.exposes_to_others());
        assert!("0644".parse::<FileMode>().unwrap().exposes_to_others());
        for bad in ["", "0800", "12345", "rw"] {
            assert!(bad.parse::<FileMode>().is_err(), "{bad}");
        }
    }

    #[test]
    fn sha256_is_lowercase_hex() {
        let d = Sha256::digest(b"abc");
        assert_eq!(
            d.to_hex(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(d.to_hex().parse::<Sha256>().unwrap(), d);
        assert!(d.to_hex().to_uppercase().parse::<Sha256>().is_err());
        assert!("abc".parse::<Sha256>().is_err());
    }

    #[test]
    fn fed_ids_are_three_labels() {
        let id = FedId::new(
            &"do-1461".parse().unwrap(),
            &"nyc3".parse().unwrap(),
            &"do-1461-peer-nyc3-01".parse().unwrap(),
        );
        assert_eq!(id.as_str(), "do-1461/nyc3/do-1461-peer-nyc3-01");
        assert_eq!(id.as_str().parse::<FedId>().unwrap(), id);
        for bad in [
            "a/b",
            "a/b/c/d",
            "a//c",
            "/a/b",
            "a/b/",
            "a/B/c",
            "a/../c",
            "a/b/c.priv",
        ] {
            let err = bad.parse::<FedId>().unwrap_err();
            assert_eq!(err.what, "federation identity", "{bad:?}");
        }
    }

    #[test]
    fn issuer_ids_and_trust_domains_are_file_name_safe() {
        assert!("do-1461-ca".parse::<IssuerId>().is_ok());
        assert!("do-1461.fleet".parse::<TrustDomain>().is_ok());
        for bad in [
            "",
            ".",
            "..",
            ".hidden",
            "a/b",
            "a\\b",
            "A",
            "a b",
            &"x".repeat(129),
        ] {
            assert!(bad.parse::<IssuerId>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn base64_bytes_accept_only_the_canonical_encoding() {
        let b: Base64Bytes = "AAEC".parse().unwrap();
        assert_eq!(b.as_bytes(), [0, 1, 2]);
        assert_eq!(serde_json::to_string(&b).unwrap(), "\"AAEC\"");
        for bad in ["AAE", "AAEC=", "AA-C", "AAED AA==", "AAF="] {
            assert!(bad.parse::<Base64Bytes>().is_err(), "{bad:?}");
        }
    }

    /// The first 32-byte y coordinate (little-endian counter) that is not on the curve.
    fn off_curve() -> [u8; 32] {
        (2u8..=255)
            .map(|i| {
                let mut b = [0u8; 32];
                b[0] = i;
                b
            })
            .find(|b| VerifyingKey::from_bytes(b).is_err())
            .expect("about half of all y are off the curve")
    }

    #[test]
    fn ed25519_public_keys_refuse_wrong_length_off_curve_and_weak_points() {
        let good = VerifyingKey::from_bytes(&[
            0xd7, 0x5a, 0x98, 0x01, 0x82, 0xb1, 0x0a, 0xb7, 0xd5, 0x4b, 0xfe, 0xd3, 0xc9, 0x64,
            0x07, 0x3a, 0x0e, 0xe1, 0x72, 0xf3, 0xda, 0xa6, 0x23, 0x25, 0xaf, 0x02, 0x1a, 0x68,
            0xf7, 0x07, 0x51, 0x1a,
        ])
        .unwrap();
        let k = Ed25519PublicKey::from(good);
        assert_eq!(k.to_base64().parse::<Ed25519PublicKey>().unwrap(), k);
        let reason = |s: String| s.parse::<Ed25519PublicKey>().unwrap_err().reason;
        assert_eq!(
            reason(STANDARD.encode([7u8; 31])),
            "must be exactly 32 bytes"
        );
        assert_eq!(
            reason(STANDARD.encode([7u8; 33])),
            "must be exactly 32 bytes"
        );
        assert_eq!(
            reason(STANDARD.encode(off_curve())),
            "is not a valid Ed25519 point"
        );
        // The identity point (y = 1) has order 1.
        let mut identity = [0u8; 32];
        identity[0] = 1;
        assert_eq!(
            reason(STANDARD.encode(identity)),
            "is a small-order (weak) Ed25519 point"
        );
        assert_eq!(reason("not base64!".into()), "is not standard base64");
    }

    proptest! {
        #[test]
        fn label_roundtrip(s in "[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?") {
            let n: NodeName = s.parse().unwrap();
            let json = serde_json::to_string(&n).unwrap();
            prop_assert_eq!(serde_json::from_str::<NodeName>(&json).unwrap(), n);
        }

        #[test]
        fn abs_path_parse_never_yields_dotdot(s in "(/[a-z.]{0,3}){0,5}") {
            if let Ok(p) = s.parse::<AbsPath>() {
                prop_assert!(p.components().all(|c| c != ".." && c != "."));
            }
        }
    }
}
