//! `package`: Debian packages at pinned versions, all installs of one resource in ONE apt
//! transaction, from an optional extra apt source (keyring + sources entry). `apt-get update`
//! runs only when the source changed or a wanted version has no candidate.

use std::collections::BTreeMap;
use std::time::Duration;

use base64::Engine;
use hiveseed_proto::manifest::{Package, PackagePin, VersionPin};
use hiveseed_proto::{AbsPath, FileMode, Sha256};

use super::ResourceError;
use crate::host::{Attrs, Exec, Host, HostError};
use crate::plan::{Action, InstallPin, PlanError};

/// What `apt-cache policy` says about one package.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AptPolicy {
    pub candidate: Option<String>,
    pub versions: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observed {
    /// Installed version per wanted package (`None`: not installed).
    pub installed: BTreeMap<String, Option<String>>,
    /// Policy of each package that is not satisfied yet (the others are not asked about).
    pub policy: BTreeMap<String, AptPolicy>,
    pub keyring_sha256: Option<Sha256>,
    pub source_text: Option<String>,
}

const DPKG_FORMAT: &str = "-f=${Package}\t${Status}\t${Version}\n";

pub fn keyring_path(name: &str) -> AbsPath {
    format!("/usr/share/keyrings/{name}.gpg")
        .parse()
        .expect("validated source name")
}

pub fn source_path(name: &str) -> AbsPath {
    format!("/etc/apt/sources.list.d/{name}.list")
        .parse()
        .expect("validated source name")
}

fn valid_source_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        && !s.starts_with('.')
}

fn valid_package_name(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() >= 2
        && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit())
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || b"+-.".contains(c))
}

fn valid_version(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b".+~:-".contains(&b))
}

fn satisfied(pin: &VersionPin, installed: Option<&str>) -> bool {
    match (pin, installed) {
        (_, None) => false,
        (VersionPin::Exact(v), Some(i)) => v == i,
        (VersionPin::Prefix(p), Some(i)) => i.starts_with(p.as_str()),
        (VersionPin::Any, Some(_)) => true,
    }
}

/// `dpkg-query` output: `name\tstatus\tversion` lines; only "install ok installed" counts.
pub fn parse_dpkg_query(stdout: &str) -> BTreeMap<String, String> {
    stdout
        .lines()
        .filter_map(|l| {
            let mut f = l.split('\t');
            let (name, status, version) = (f.next()?, f.next()?, f.next()?);
            (status == "install ok installed" && !version.is_empty())
                .then(|| (name.to_owned(), version.to_owned()))
        })
        .collect()
}

/// `apt-cache policy a b …` output, per package.
pub fn parse_apt_policy(stdout: &str) -> BTreeMap<String, AptPolicy> {
    let mut out: BTreeMap<String, AptPolicy> = BTreeMap::new();
    let mut current: Option<String> = None;
    let mut in_table = false;
    for line in stdout.lines() {
        if !line.starts_with(' ') {
            if let Some(name) = line.strip_suffix(':') {
                current = Some(name.to_owned());
                in_table = false;
                out.entry(name.to_owned()).or_default();
            }
            continue;
        }
        let Some(name) = &current else { continue };
        let entry = out.entry(name.clone()).or_default();
        let t = line.trim();
        if let Some(c) = t.strip_prefix("Candidate:") {
            let c = c.trim();
            entry.candidate = (c != "(none)" && !c.is_empty()).then(|| c.to_owned());
        } else if t.starts_with("Version table:") {
            in_table = true;
        } else if in_table {
            let t = t.strip_prefix("*** ").unwrap_or(t);
            let toks: Vec<&str> = t.split_whitespace().collect();
            if toks.len() == 2 && toks[1].parse::<i32>().is_ok() {
                entry.versions.push(toks[0].to_owned());
            }
        }
    }
    out
}

pub fn observe(host: &dyn Host, p: &Package) -> Result<Observed, HostError> {
    let names: Vec<&str> = p.packages.iter().map(|x| x.name.as_str()).collect();
    let mut installed: BTreeMap<String, Option<String>> =
        names.iter().map(|n| ((*n).to_owned(), None)).collect();
    if !names.is_empty() {
        // Exit 1 when some package is unknown to dpkg; the known ones are still printed.
        let out = host.exec(
            &Exec::new(
                ["dpkg-query", "-W", DPKG_FORMAT]
                    .into_iter()
                    .map(str::to_owned)
                    .chain(names.iter().map(|n| (*n).to_owned())),
            )
            .timeout(Exec::OBSERVE_TIMEOUT),
        )?;
        for (n, v) in parse_dpkg_query(&out.stdout_str()) {
            if let Some(slot) = installed.get_mut(&n) {
                *slot = Some(v);
            }
        }
    }
    let unmet: Vec<&PackagePin> = p
        .packages
        .iter()
        .filter(|pin| !satisfied(&pin.version, installed[&pin.name].as_deref()))
        .collect();
    let policy = if unmet.is_empty() {
        BTreeMap::new()
    } else {
        let exec = Exec::new(
            ["apt-cache".to_owned(), "policy".to_owned()]
                .into_iter()
                .chain(unmet.iter().map(|pin| pin.name.clone())),
        )
        .timeout(Exec::OBSERVE_TIMEOUT);
        let out = host.exec(&exec)?.check(&exec)?;
        parse_apt_policy(&out.stdout_str())
    };
    let (keyring_sha256, source_text) = match &p.source {
        Some(s) if valid_source_name(&s.name) => (
            host.read(&keyring_path(&s.name))?
                .map(|b| Sha256::digest(&b)),
            host.read(&source_path(&s.name))?
                .map(|b| String::from_utf8_lossy(&b).into_owned()),
        ),
        _ => (None, None),
    };
    Ok(Observed {
        installed,
        policy,
        keyring_sha256,
        source_text,
    })
}

pub fn plan(p: &Package, o: &Observed) -> Result<Vec<Action>, PlanError> {
    let bad = |what, value: &str| PlanError::BadName {
        id: p.id.clone(),
        what,
        value: value.to_owned(),
    };
    let mut actions = Vec::new();
    let mut source_changed = false;
    if let Some(s) = &p.source {
        if !valid_source_name(&s.name) {
            return Err(bad("apt source name", &s.name));
        }
        let keyring = base64::engine::general_purpose::STANDARD
            .decode(s.keyring_b64.trim())
            .map_err(|_| bad("keyring (base64)", &s.name))?;
        let kpath = keyring_path(&s.name);
        let text = format!(
            "deb [signed-by={kpath}] {} {} {}\n",
            s.uri,
            s.suite,
            s.components.join(" ")
        );
        if s.uri.contains(char::is_whitespace) || s.suite.contains(char::is_whitespace) {
            return Err(bad("apt source uri/suite", &s.name));
        }
        if o.keyring_sha256 != Some(Sha256::digest(&keyring)) {
            actions.push(Action::WriteKeyring {
                path: kpath,
                bytes: keyring,
            });
            source_changed = true;
        }
        if o.source_text.as_deref() != Some(text.as_str()) {
            actions.push(Action::WriteAptSource {
                path: source_path(&s.name),
                text,
            });
            source_changed = true;
        }
    }
    let mut pins = Vec::new();
    let mut candidate_missing = false;
    for pin in &p.packages {
        if !valid_package_name(&pin.name) {
            return Err(bad("package name", &pin.name));
        }
        let installed = o.installed.get(&pin.name).cloned().flatten();
        if satisfied(&pin.version, installed.as_deref()) {
            continue;
        }
        let policy = o.policy.get(&pin.name).cloned().unwrap_or_default();
        let name = pin.name.clone();
        match &pin.version {
            VersionPin::Exact(v) => {
                if !valid_version(v) {
                    return Err(bad("package version", v));
                }
                candidate_missing |= !policy.versions.contains(v);
                pins.push(InstallPin::Exact {
                    name,
                    version: v.clone(),
                });
            }
            VersionPin::Prefix(prefix) => {
                if !valid_version(prefix) {
                    return Err(bad("package version prefix", prefix));
                }
                candidate_missing |= !policy
                    .candidate
                    .as_deref()
                    .is_some_and(|c| c.starts_with(prefix.as_str()));
                pins.push(InstallPin::Prefix {
                    name,
                    prefix: prefix.clone(),
                });
            }
            VersionPin::Any => {
                candidate_missing |= policy.candidate.is_none();
                pins.push(InstallPin::Any { name });
            }
        }
    }
    if !pins.is_empty() && (source_changed || candidate_missing) {
        actions.push(Action::AptUpdate);
    } else if source_changed && pins.is_empty() {
        // A changed source with everything installed still needs fresh lists for later runs.
        actions.push(Action::AptUpdate);
    }
    if !pins.is_empty() {
        actions.push(Action::AptInstall { pins });
    }
    Ok(actions)
}

/// How long one apt-get run may take, besides waiting for dpkg's lock.
const APT_TIMEOUT: Duration = Duration::from_secs(1800);

fn apt(args: &[&str], lock_timeout: Duration) -> Exec {
    let timeout = format!("DPkg::Lock::Timeout={}", lock_timeout.as_secs());
    let mut argv = vec!["apt-get".to_owned(), "-o".to_owned(), timeout];
    argv.extend(args.iter().map(|s| (*s).to_owned()));
    // Downloads and dpkg runs can be slow; the wait for dpkg's lock comes on top.
    Exec::new(argv)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .timeout(APT_TIMEOUT + lock_timeout)
}

pub fn write_keyring(host: &dyn Host, path: &AbsPath, bytes: &[u8]) -> Result<(), HostError> {
    super::ensure_parents(host, path)?;
    host.write_atomic(
        path,
        bytes,
        Attrs {
            mode: FileMode::new(0o644).expect("valid mode"),
            owner: None,
        },
    )
}

pub fn write_source(host: &dyn Host, path: &AbsPath, text: &str) -> Result<(), HostError> {
    write_keyring(host, path, text.as_bytes())
}

pub fn apt_update(host: &dyn Host, lock_timeout: Duration) -> Result<(), HostError> {
    let exec = apt(&["update", "-q"], lock_timeout);
    host.exec(&exec)?.check(&exec)?;
    Ok(())
}

/// Resolves prefix pins against the current candidate, installs everything in one transaction,
/// then confirms with dpkg that each package is at an accepted version.
pub fn apt_install(
    host: &dyn Host,
    pins: &[InstallPin],
    lock_timeout: Duration,
) -> Result<(), ResourceError> {
    let prefixed: Vec<&str> = pins
        .iter()
        .filter_map(|p| match p {
            InstallPin::Prefix { name, .. } => Some(name.as_str()),
            _ => None,
        })
        .collect();
    let policy = if prefixed.is_empty() {
        BTreeMap::new()
    } else {
        let exec = Exec::new(
            ["apt-cache", "policy"]
                .into_iter()
                .chain(prefixed.iter().copied()),
        );
        parse_apt_policy(&host.exec(&exec)?.check(&exec)?.stdout_str())
    };
    let mut args: Vec<String> = vec![
        "install".into(),
        "-y".into(),
        "-q".into(),
        "--no-install-recommends".into(),
        "-o".into(),
        "Dpkg::Options::=--force-confdef".into(),
        "-o".into(),
        "Dpkg::Options::=--force-confold".into(),
    ];
    let mut wanted: Vec<(String, String)> = Vec::new();
    for pin in pins {
        match pin {
            InstallPin::Exact { name, version } => {
                args.push(format!("{name}={version}"));
                wanted.push((name.clone(), version.clone()));
            }
            InstallPin::Prefix { name, prefix } => {
                let candidate = policy
                    .get(name)
                    .and_then(|p| p.candidate.clone())
                    .ok_or_else(|| ResourceError::NoCandidate {
                        package: name.clone(),
                    })?;
                if !candidate.starts_with(prefix.as_str()) {
                    return Err(ResourceError::PrefixMismatch {
                        package: name.clone(),
                        prefix: prefix.clone(),
                        candidate,
                    });
                }
                args.push(format!("{name}={candidate}"));
                wanted.push((name.clone(), candidate));
            }
            InstallPin::Any { name } => {
                args.push(name.clone());
                wanted.push((name.clone(), String::new()));
            }
        }
    }
    let arg_refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let exec = apt(&arg_refs, lock_timeout);
    host.exec(&exec)?.check(&exec)?;

    let query = Exec::new(
        ["dpkg-query", "-W", DPKG_FORMAT]
            .into_iter()
            .map(str::to_owned)
            .chain(wanted.iter().map(|(n, _)| n.clone())),
    )
    .timeout(Exec::OBSERVE_TIMEOUT);
    let installed = parse_dpkg_query(&host.exec(&query)?.stdout_str());
    for (name, version) in wanted {
        let got = installed.get(&name).cloned();
        let ok = match &got {
            Some(v) => version.is_empty() || *v == version,
            None => false,
        };
        if !ok {
            return Err(ResourceError::NotInstalled {
                package: name,
                got,
                wanted: if version.is_empty() {
                    "any version".into()
                } else {
                    version
                },
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn apt_policy_parses_candidate_and_version_table() {
        let out = "postgresql-17:\n  Installed: (none)\n  Candidate: 17.5-1\n  Version table:\n     17.5-1 500\n        500 http://deb.debian.org/debian trixie/main amd64 Packages\n *** 17.4-2 100\n        100 /var/lib/dpkg/status\nlibfoo:\n  Installed: (none)\n  Candidate: (none)\n  Version table:\n";
        let p = parse_apt_policy(out);
        assert_eq!(p["postgresql-17"].candidate.as_deref(), Some("17.5-1"));
        assert_eq!(p["postgresql-17"].versions, ["17.5-1", "17.4-2"]);
        assert_eq!(p["libfoo"], AptPolicy::default());
    }

    #[test]
    fn dpkg_query_counts_only_installed() {
        let m = parse_dpkg_query(
            "a\tinstall ok installed\t1.0\nb\tdeinstall ok config-files\t2.0\nc\tinstall ok installed\t\n",
        );
        assert_eq!(m.len(), 1);
        assert_eq!(m["a"], "1.0");
    }

    #[test]
    fn pins() {
        assert!(satisfied(&VersionPin::Prefix("17.".into()), Some("17.5-1")));
        assert!(!satisfied(&VersionPin::Prefix("17.".into()), Some("16.9")));
        assert!(!satisfied(&VersionPin::Exact("1".into()), Some("1.0")));
        assert!(!satisfied(&VersionPin::Any, None));
        assert!(!valid_package_name("-oAPT::x"));
        assert!(valid_package_name("postgresql-17-pgvector"));
        assert!(!valid_source_name("../x"));
    }
}
