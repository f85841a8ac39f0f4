//! The base rootfs every lab node overlays: Debian trixie minbase with the PostgreSQL 17,
//! pgvector and AGE packages *downloaded but not installed*.
//!
//! It stands for a droplet's image and nothing more: whatever a node needs beyond it comes from
//! its user_data and its manifest, so a broken role resource shows in the lab. The only files the
//! recipe writes are [`LAB_ONLY_FILES`]: chroot-only settings a droplet does not need.
//!
//! The .debs sit in the base's `/var/cache/apt/archives` and the apt lists stay, so a node's agent
//! runs a plain `apt-get install postgresql-17 ...` that needs no network (DESIGN §7: "a shared
//! .deb cache keeps this to seconds"). trixie because its postgresql-17-pgvector and -age need a
//! newer libc than the bookworm host (lab-feasibility §1).
//!
//! The entry is `$CACHE/rootfs/trixie-<key12>/{root/,manifest.json,build.log}`; the key is the
//! sha256 of the recipe (version constant + every step, serialized), so changing a step builds a
//! new entry instead of reusing a stale one. Package versions are not pinned (the suite keeps only
//! the newest point release); the resolved ones go into the manifest and the log.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{
    commit, discard_invalid, lock_entry, run_captured, run_logged, staging_dir, sweep_stale,
    unix_now, write_atomic, Cache, Outcome,
};

/// Bump when the build procedure changes in a way the step list does not show.
pub const RECIPE_VERSION: u32 = 1;
pub const SUITE: &str = "trixie";
pub const MIRROR: &str = "http://deb.debian.org/debian";
/// The packages a PG node's agent installs, by major version only.
pub const PG_PACKAGES: [&str; 3] = [
    "postgresql-17",
    "postgresql-17-pgvector",
    "postgresql-17-age",
];

const CHROOT_ENV: [(&str, &str); 3] = [
    (
        "PATH",
        "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    ),
    ("LANG", "C.UTF-8"),
    ("DEBIAN_FRONTEND", "noninteractive"),
];
/// The files the recipe writes into the image, all for the chroot only (README names them as
/// lab-only): dpkg without fsync, and maintainer scripts that never start services.
pub const LAB_ONLY_FILES: [&str; 2] = [
    "/etc/dpkg/dpkg.cfg.d/lab-unsafe-io",
    "/usr/sbin/policy-rc.d",
];
/// Stands for the rootfs being built in host-side argv.
const ROOT: &str = "{root}";

/// One step of the recipe. The serialized list is what the cache key hashes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Step {
    /// A host command; `{root}` in an argument is replaced by the rootfs path.
    Host { argv: Vec<String> },
    /// A file written into the rootfs.
    Write {
        path: String,
        mode: u32,
        contents: String,
    },
    /// A command run inside the rootfs (`chroot`, with /proc mounted and `env` only).
    Chroot { argv: Vec<String> },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Recipe {
    pub version: u32,
    pub env: Vec<(String, String)>,
    pub steps: Vec<Step>,
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| (*s).to_owned()).collect()
}

/// The recipe this code builds.
pub fn recipe() -> Recipe {
    let mut download = strings(&[
        "apt-get",
        "install",
        "--download-only",
        "-y",
        "--no-install-recommends",
    ]);
    download.extend(strings(&PG_PACKAGES));
    Recipe {
        version: RECIPE_VERSION,
        env: CHROOT_ENV
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
        steps: vec![
            Step::Host {
                argv: strings(&[
                    "debootstrap",
                    "--variant=minbase",
                    "--include=ca-certificates,curl",
                    SUITE,
                    ROOT,
                    MIRROR,
                ]),
            },
            // Lab nodes are throwaway, so dpkg's fsync per unpacked file buys nothing; under a
            // busy disk it made the nodes' offline PG install 39 s instead of 24 s (same load).
            // Docker's Debian images ship the same setting.
            Step::Write {
                path: "/etc/dpkg/dpkg.cfg.d/lab-unsafe-io".into(),
                mode: 0o644,
                contents: "force-unsafe-io\n".into(),
            },
            // Maintainer scripts must never start services in a chroot.
            Step::Write {
                path: "/usr/sbin/policy-rc.d".into(),
                mode: 0o755,
                contents: "#!/bin/sh\nexit 101\n".into(),
            },
            Step::Chroot {
                argv: strings(&["apt-get", "update"]),
            },
            Step::Chroot { argv: download },
        ],
    }
}

impl Recipe {
    /// Hex sha256 of the canonical JSON of the recipe.
    pub fn key(&self) -> String {
        let json = serde_json::to_vec(self).unwrap_or_default();
        hex::encode(Sha256::digest(json))
    }

    pub fn entry_name(&self) -> String {
        format!("{SUITE}-{}", &self.key()[..12])
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RootfsManifest {
    pub key: String,
    pub recipe: Recipe,
    pub built_at_unix: u64,
    /// `dpkg-query` version of the host's debootstrap.
    pub host_debootstrap: String,
    /// Candidate versions apt resolved for [`PG_PACKAGES`].
    pub packages: BTreeMap<String, String>,
    /// Every .deb in the base's apt archive (file names), so a node installs offline.
    pub archives: Vec<String>,
    pub timings_s: BTreeMap<String, f64>,
}

/// A valid base rootfs in the cache.
#[derive(Debug, Clone)]
pub struct BaseRootfs {
    /// `$CACHE/rootfs/trixie-<key12>`
    pub entry: PathBuf,
    /// The tree to use as an overlay lowerdir.
    pub root: PathBuf,
    pub manifest: RootfsManifest,
}

fn load(entry: &Path, key: &str) -> Option<BaseRootfs> {
    let raw = fs::read(entry.join("manifest.json")).ok()?;
    let manifest: RootfsManifest = serde_json::from_slice(&raw).ok()?;
    let root = entry.join("root");
    (manifest.key == key && root.join("etc/os-release").exists()).then(|| BaseRootfs {
        entry: entry.to_path_buf(),
        root,
        manifest,
    })
}

impl Cache {
    /// The base rootfs if it is already in the cache (never builds).
    pub fn find_rootfs(&self) -> Option<BaseRootfs> {
        let r = recipe();
        load(&self.root.join("rootfs").join(r.entry_name()), &r.key())
    }

    /// The base rootfs, building it if missing (about 2 minutes, needs deb.debian.org).
    pub fn ensure_rootfs(&self) -> Result<(BaseRootfs, Outcome)> {
        let r = recipe();
        let key = r.key();
        let name = r.entry_name();
        let parent = self.dir("rootfs")?;
        let entry = parent.join(&name);
        if let Some(base) = load(&entry, &key) {
            return Ok((base, Outcome::Reused));
        }
        let _lock = lock_entry(&parent, &name)?;
        // Someone else may have finished it while we waited for the lock.
        if let Some(base) = load(&entry, &key) {
            return Ok((base, Outcome::Reused));
        }
        sweep_stale(&parent, &name)?;
        discard_invalid(&parent, &name)?;
        let started = Instant::now();
        let tmp = staging_dir(&parent, &name)?;
        let manifest =
            build(&r, &tmp).with_context(|| format!("build base rootfs in {}", tmp.display()))?;
        write_atomic(
            &tmp.join("manifest.json"),
            &serde_json::to_vec_pretty(&manifest)?,
        )?;
        commit(&tmp, &entry)?;
        let base = load(&entry, &key).context("base rootfs not valid right after commit")?;
        let took = started.elapsed();
        tracing::info!(entry = %entry.display(), took_s = took.as_secs_f64(), "base rootfs built");
        Ok((base, Outcome::Built { took }))
    }
}

/// Installs debootstrap on the host if it is missing.
fn ensure_host_debootstrap(log: &Path) -> Result<String> {
    if !Path::new("/usr/sbin/debootstrap").exists() {
        tracing::info!("host has no debootstrap: installing it with apt-get");
        let apt = |args: &[&str]| {
            let mut c = Command::new("apt-get");
            c.args(args).env("DEBIAN_FRONTEND", "noninteractive");
            c
        };
        run_logged(&mut apt(&["update"]), log)?;
        run_logged(&mut apt(&["install", "-y", "debootstrap"]), log)?;
    }
    run_captured(Command::new("dpkg-query").args(["-W", "-f=${Version}", "debootstrap"]))
}

/// Mounts proc in the rootfs for chroot steps; unmounts on drop.
struct ProcMount(PathBuf);

impl ProcMount {
    fn new(root: &Path) -> Result<Self> {
        let target = root.join("proc");
        nix::mount::mount(
            Some("proc"),
            &target,
            Some("proc"),
            nix::mount::MsFlags::MS_NOSUID
                | nix::mount::MsFlags::MS_NODEV
                | nix::mount::MsFlags::MS_NOEXEC,
            None::<&str>,
        )
        .with_context(|| format!("mount proc on {}", target.display()))?;
        Ok(Self(target))
    }
}

impl Drop for ProcMount {
    fn drop(&mut self) {
        if let Err(e) = crate::mounts::unmount(&self.0, Duration::from_secs(10)) {
            tracing::error!(target = %self.0.display(), "unmount: {e}");
        }
    }
}

/// Runs the recipe into `<tmp>/root`.
fn build(r: &Recipe, tmp: &Path) -> Result<RootfsManifest> {
    let root = tmp.join("root");
    let log = tmp.join("build.log");
    let host_debootstrap = ensure_host_debootstrap(&log)?;
    let mut timings = BTreeMap::new();
    let mut proc_mount: Option<ProcMount> = None;

    for step in &r.steps {
        match step {
            Step::Host { argv } => {
                let args: Vec<String> = argv
                    .iter()
                    .map(|a| a.replace(ROOT, &root.to_string_lossy()))
                    .collect();
                let took = run_logged(Command::new(&args[0]).args(&args[1..]), &log)?;
                timings.insert(argv[0].clone(), took.as_secs_f64());
            }
            Step::Write {
                path,
                mode,
                contents,
            } => {
                let target = root.join(path.trim_start_matches('/'));
                if let Some(parent) = target.parent() {
                    fs::create_dir_all(parent)?;
                }
                fs::write(&target, contents)
                    .with_context(|| format!("write {}", target.display()))?;
                use std::os::unix::fs::PermissionsExt;
                fs::set_permissions(&target, fs::Permissions::from_mode(*mode))?;
            }
            Step::Chroot { argv } => {
                if proc_mount.is_none() {
                    proc_mount = Some(ProcMount::new(&root)?);
                }
                let mut cmd = Command::new("/usr/sbin/chroot");
                cmd.env_clear()
                    .envs(r.env.iter().cloned())
                    .arg(&root)
                    .args(argv);
                let took = run_logged(&mut cmd, &log)?;
                let label = if argv.iter().any(|a| a == "--download-only") {
                    "apt-get install --download-only".to_owned()
                } else {
                    argv.join(" ")
                };
                timings.insert(label, took.as_secs_f64());
            }
        }
    }

    let packages = resolved_versions(&root, r)?;
    drop(proc_mount);
    for (pkg, ver) in &packages {
        tracing::info!(package = %pkg, version = %ver, "resolved");
    }
    let archives = archive_debs(&root)?;
    for (pkg, ver) in &packages {
        // Debian encodes the epoch colon as %3a in archive file names.
        let prefix = format!("{pkg}_{}_", ver.replace(':', "%3a"));
        if !archives.iter().any(|a| a.starts_with(&prefix)) {
            bail!("download-only left no {prefix}*.deb in the archive");
        }
    }
    empty_dir(&root.join("run"))?;
    let left = crate::mounts::mounts_under(tmp)?;
    if !left.is_empty() {
        bail!("mounts left in the new base: {left:?}");
    }
    Ok(RootfsManifest {
        key: r.key(),
        recipe: r.clone(),
        built_at_unix: unix_now(),
        host_debootstrap,
        packages,
        archives,
        timings_s: timings,
    })
}

/// `apt-cache policy` candidates of the PG packages, from inside the rootfs.
fn resolved_versions(root: &Path, r: &Recipe) -> Result<BTreeMap<String, String>> {
    let mut cmd = Command::new("/usr/sbin/chroot");
    cmd.env_clear()
        .envs(r.env.iter().cloned())
        .arg(root)
        .args(["apt-cache", "policy"])
        .args(PG_PACKAGES);
    let text = run_captured(&mut cmd)?;
    let versions = parse_policy(&text);
    for p in PG_PACKAGES {
        if !versions.contains_key(p) {
            bail!("apt-cache policy has no candidate for {p}:\n{text}");
        }
    }
    Ok(versions)
}

/// Package → candidate version from `apt-cache policy` output.
pub fn parse_policy(text: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut current: Option<String> = None;
    for line in text.lines() {
        if !line.starts_with(' ') && line.ends_with(':') {
            current = Some(line.trim_end_matches(':').to_owned());
        } else if let (Some(pkg), Some(v)) = (&current, line.trim().strip_prefix("Candidate:")) {
            let v = v.trim();
            if v != "(none)" {
                out.insert(pkg.clone(), v.to_owned());
            }
        }
    }
    out
}

fn archive_debs(root: &Path) -> Result<Vec<String>> {
    let dir = root.join("var/cache/apt/archives");
    let mut debs: Vec<String> = fs::read_dir(&dir)
        .with_context(|| format!("list {}", dir.display()))?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.ends_with(".deb"))
        .collect();
    debs.sort();
    Ok(debs)
}

/// Removes everything inside `dir` (dotfiles included), keeping `dir`.
fn empty_dir(dir: &Path) -> Result<()> {
    for entry in fs::read_dir(dir).with_context(|| format!("list {}", dir.display()))? {
        super::remove_path(&entry?.path())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_is_stable_and_tracks_every_step() {
        let a = recipe();
        assert_eq!(a.key(), recipe().key());
        assert_eq!(a.key().len(), 64);
        assert!(a.entry_name().starts_with("trixie-"));
        let mut b = a.clone();
        let write = b.steps.iter_mut().find_map(|s| match s {
            Step::Write { contents, .. } => Some(contents),
            _ => None,
        });
        write.expect("the recipe writes a file").push('\n');
        assert_ne!(a.key(), b.key());
        let mut c = a.clone();
        c.version += 1;
        assert_ne!(a.key(), c.key());
    }

    #[test]
    fn recipe_pins_no_exact_debian_version() {
        let json = serde_json::to_string(&recipe()).unwrap();
        assert!(!json.contains("postgresql-17="), "{json}");
    }

    /// The image carries nothing a role should provide: the pg role's own createcluster drop-in
    /// (or anything else) in the base would hide a broken role resource.
    #[test]
    fn recipe_writes_only_the_lab_only_files() {
        let r = recipe();
        let written: Vec<&str> = r
            .steps
            .iter()
            .filter_map(|s| match s {
                Step::Write { path, .. } => Some(path.as_str()),
                _ => None,
            })
            .collect();
        assert_eq!(written, LAB_ONLY_FILES);
        let json = serde_json::to_string(&r).unwrap();
        assert!(!json.contains("createcluster"), "{json}");
    }

    #[test]
    fn policy_candidates() {
        let text = "\
postgresql-17:
  Installed: (none)
  Candidate: 17.12-0+deb13u1
  Version table:
     17.12-0+deb13u1 500
postgresql-17-age:
  Installed: (none)
  Candidate: 1.5.0~rc0-3+b1
ghost:
  Installed: (none)
  Candidate: (none)
";
        let v = parse_policy(text);
        assert_eq!(v["postgresql-17"], "17.12-0+deb13u1");
        assert_eq!(v["postgresql-17-age"], "1.5.0~rc0-3+b1");
        assert!(!v.contains_key("ghost"));
    }
}
