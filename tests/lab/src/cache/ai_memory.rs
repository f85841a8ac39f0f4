//! The ai-memory 0.7.0 binary the lab's peers run, built once from crates.io.
//!
//! `--locked` is required (without it cargo resolves pgvector 0.4.2 → sqlx 0.9 and the build
//! fails) and so is `--ignore-rust-version` (the crate asks for rustc 1.96); see
//! ai-memory-runtime §0.1. The build takes about 16 minutes on 2 cores, so a running build into
//! the same place (a teammate's, or another `lab cache`) is waited for, never duplicated.
//!
//! Entry: `$CACHE/ai-memory-0.7.0-sal/{bin/ai-memory,manifest.json}`; intermediate build output in
//! `$CACHE/build-ai-memory`, the log in `$CACHE/ai-memory-build.log`.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use super::{
    commit, discard_invalid, lock_entry, run_logged, sha256_file, staging_dir, sweep_stale,
    unix_now, write_atomic, Cache, Outcome,
};
use crate::procs;

pub const VERSION: &str = "0.7.0";
pub const FEATURES: &str = "sal,sal-postgres,sqlite-bundled";
pub const ENTRY: &str = "ai-memory-0.7.0-sal";
/// How long to wait for somebody else's build of the same binary.
const FOREIGN_BUILD_DEADLINE: Duration = Duration::from_secs(60 * 60);

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AiMemoryManifest {
    pub version: String,
    pub features: String,
    pub command: Vec<String>,
    pub sha256: String,
    pub size: u64,
    pub recorded_at_unix: u64,
}

/// A verified ai-memory binary.
#[derive(Debug, Clone)]
pub struct AiMemory {
    pub bin: PathBuf,
    pub sha256: String,
    pub size: u64,
}

fn install_args(root: &Path) -> Vec<String> {
    [
        "install",
        &format!("ai-memory@{VERSION}"),
        "--locked",
        "--ignore-rust-version",
        "--features",
        FEATURES,
        "--root",
        &root.to_string_lossy(),
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect()
}

/// Pids of running `cargo install ai-memory...` processes (anyone's).
pub fn running_builds() -> Vec<i32> {
    procs::all_pids()
        .into_iter()
        .filter(|&pid| is_ai_memory_install(&procs::cmdline(pid)))
        .collect()
}

/// `cargo install ... ai-memory[@version] ...`, whichever cargo binary (rustup proxy or toolchain).
fn is_ai_memory_install(argv: &[String]) -> bool {
    let is_cargo = argv
        .first()
        .is_some_and(|a| Path::new(a).file_name().is_some_and(|n| n == "cargo"));
    is_cargo
        && argv.iter().any(|a| a == "install")
        && argv
            .iter()
            .any(|a| a == "ai-memory" || a.starts_with("ai-memory@"))
}

/// `bin --version` prints exactly `ai-memory 0.7.0`. Run with a throwaway HOME: any ai-memory
/// invocation writes a default `$HOME/.config/ai-memory/config.toml`.
fn version_ok(bin: &Path) -> bool {
    if !bin.is_file() {
        return false;
    }
    let Ok(home) = tempfile::tempdir() else {
        return false;
    };
    Command::new(bin)
        .arg("--version")
        .env_clear()
        .env("HOME", home.path())
        .env("PATH", "/usr/bin:/bin")
        .output()
        .map(|o| {
            o.status.success()
                && String::from_utf8_lossy(&o.stdout).trim() == format!("ai-memory {VERSION}")
        })
        .unwrap_or(false)
}

fn manifest_for(bin: &Path, command: Vec<String>) -> Result<AiMemoryManifest> {
    Ok(AiMemoryManifest {
        version: VERSION.to_owned(),
        features: FEATURES.to_owned(),
        command,
        sha256: sha256_file(bin)?,
        size: fs::metadata(bin)?.len(),
        recorded_at_unix: unix_now(),
    })
}

impl Cache {
    /// The binary if present and `--version` is right (never builds; the manifest is not
    /// required, so a binary installed by hand is found too).
    pub fn find_ai_memory(&self) -> Option<AiMemory> {
        let entry = self.root.join(ENTRY);
        let bin = entry.join("bin/ai-memory");
        if !running_builds().is_empty() || !version_ok(&bin) {
            return None;
        }
        let sha256 = sha256_file(&bin).ok()?;
        let size = fs::metadata(&bin).ok()?.len();
        Some(AiMemory { bin, sha256, size })
    }

    /// The binary, waiting for a build already in progress, building it if missing (~16 min).
    pub fn ensure_ai_memory(&self) -> Result<(AiMemory, Outcome)> {
        fs::create_dir_all(&self.root)?;
        let entry = self.root.join(ENTRY);
        let bin = entry.join("bin/ai-memory");
        let _lock = lock_entry(&self.root, ENTRY)?;
        wait_for_foreign_builds()?;

        if version_ok(&bin) {
            let m = self.record_manifest(&entry, &bin)?;
            return Ok((
                AiMemory {
                    bin,
                    sha256: m.sha256,
                    size: m.size,
                },
                Outcome::Reused,
            ));
        }

        sweep_stale(&self.root, ENTRY)?;
        discard_invalid(&self.root, ENTRY)?;
        let started = Instant::now();
        let tmp = staging_dir(&self.root, ENTRY)?;
        let args = install_args(&tmp);
        let log = self.root.join("ai-memory-build.log");
        let _ = fs::remove_file(&log);
        run_logged(
            Command::new("cargo")
                .args(&args)
                .env("CARGO_TARGET_DIR", self.root.join("build-ai-memory")),
            &log,
        )?;
        let tmp_bin = tmp.join("bin/ai-memory");
        if !version_ok(&tmp_bin) {
            bail!(
                "freshly built {} does not print 'ai-memory {VERSION}'",
                tmp_bin.display()
            );
        }
        let command = install_args(&entry);
        let m = manifest_for(&tmp_bin, command)?;
        write_atomic(&tmp.join("manifest.json"), &serde_json::to_vec_pretty(&m)?)?;
        commit(&tmp, &entry)?;
        let took = started.elapsed();
        tracing::info!(bin = %bin.display(), sha256 = %m.sha256, "ai-memory built");
        Ok((
            AiMemory {
                bin,
                sha256: m.sha256,
                size: m.size,
            },
            Outcome::Built { took },
        ))
    }

    /// Writes (or corrects) `manifest.json` for a binary found in place.
    fn record_manifest(&self, entry: &Path, bin: &Path) -> Result<AiMemoryManifest> {
        let path = entry.join("manifest.json");
        let fresh = manifest_for(bin, install_args(entry))?;
        let existing: Option<AiMemoryManifest> = fs::read(&path)
            .ok()
            .and_then(|raw| serde_json::from_slice(&raw).ok());
        match existing {
            Some(m) if m.sha256 == fresh.sha256 => Ok(m),
            other => {
                if let Some(old) = other {
                    tracing::warn!(old = %old.sha256, new = %fresh.sha256, "ai-memory binary changed since its manifest");
                }
                write_atomic(&path, &serde_json::to_vec_pretty(&fresh)?)
                    .context("write ai-memory manifest")?;
                Ok(fresh)
            }
        }
    }
}

fn wait_for_foreign_builds() -> Result<()> {
    let started = Instant::now();
    loop {
        let pids = running_builds();
        if pids.is_empty() {
            return Ok(());
        }
        tracing::info!(
            ?pids,
            "a `cargo install ai-memory` is already running: waiting for it instead of starting a second build"
        );
        let targets: Vec<procs::Target> = pids
            .iter()
            .map(|&pid| procs::Target {
                pid,
                start_time: procs::start_time(pid),
                group: false,
            })
            .collect();
        let left = FOREIGN_BUILD_DEADLINE.saturating_sub(started.elapsed());
        let still = procs::wait_gone(&targets, left);
        if !still.is_empty() {
            bail!("`cargo install ai-memory` (pids {still:?}) still running after {FOREIGN_BUILD_DEADLINE:?}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn install_command_has_the_required_flags() {
        let args = install_args(Path::new("/c/x"));
        for want in [
            "ai-memory@0.7.0",
            "--locked",
            "--ignore-rust-version",
            FEATURES,
            "/c/x",
        ] {
            assert!(
                args.iter().any(|a| a == want),
                "{want} missing from {args:?}"
            );
        }
    }

    #[test]
    fn detects_a_teammates_build_but_not_lookalikes() {
        let argv = |s: &str| s.split(' ').map(str::to_owned).collect::<Vec<_>>();
        assert!(is_ai_memory_install(&argv(
            "/root/.rustup/toolchains/stable-x86_64-unknown-linux-gnu/bin/cargo install ai-memory@0.7.0 \
             --locked --root /var/cache/hiveseed/ai-memory-0.7.0-sal"
        )));
        assert!(is_ai_memory_install(&argv("cargo install ai-memory")));
        assert!(!is_ai_memory_install(&argv(
            "cargo build -p ai-memory-client"
        )));
        assert!(!is_ai_memory_install(&argv("cargo install ripgrep")));
        assert!(!is_ai_memory_install(&argv(
            "tail -f ai-memory-build.log install"
        )));
        assert!(!is_ai_memory_install(&[]));
    }

    #[test]
    fn a_non_binary_is_not_valid() {
        assert!(!version_ok(Path::new("/nonexistent/ai-memory")));
        assert!(!version_ok(Path::new("/bin/true")));
    }
}
