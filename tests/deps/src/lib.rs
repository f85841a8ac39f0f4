//! The real programs hiveseed's tests run against — the ai-memory 0.7.0 daemon, PostgreSQL,
//! Terraform — found, or the test fails.
//!
//! A test whose real dependency is missing never passes by returning early. The one way not to
//! run it is `HIVESEED_SKIP_<DEP>=1` on a developer's machine; under `CI=true` every
//! `HIVESEED_SKIP_*` variable is refused (the test fails naming it), and `tests/run-all.sh`
//! refuses them too, so CI and the documented test command always run everything.

use std::path::{Path, PathBuf};

/// Where `lab cache` builds ai-memory; `HIVESEED_AI_MEMORY_BIN` overrides.
pub const AI_MEMORY_DEFAULT: &str = "/var/cache/hiveseed/ai-memory-0.7.0-sal/bin/ai-memory";

/// A dependency: how it is named in messages, the variable that may skip it off CI, and how to
/// get it.
#[derive(Debug, Clone, Copy)]
pub struct Dep {
    pub what: &'static str,
    pub skip_var: &'static str,
    pub how_to_get: &'static str,
}

pub const AI_MEMORY: Dep = Dep {
    what: "the ai-memory 0.7.0 binary",
    skip_var: "HIVESEED_SKIP_AI_MEMORY",
    how_to_get: "build it with `target/release/lab cache --only ai-memory` (or `cargo install \
                 ai-memory@0.7.0 --locked --ignore-rust-version --features \
                 sal,sal-postgres,sqlite-bundled`) and point HIVESEED_AI_MEMORY_BIN at it",
};

pub const POSTGRES: Dep = Dep {
    what: "PostgreSQL (initdb, postgres, psql and the postgres user)",
    skip_var: "HIVESEED_SKIP_POSTGRES",
    how_to_get: "apt-get install postgresql (tests/run-all.sh does)",
};

pub const TERRAFORM: Dep = Dep {
    what: "terraform",
    skip_var: "HIVESEED_SKIP_TERRAFORM",
    how_to_get: "install Terraform >= 1.5 on PATH (HashiCorp's packages are not in Debian)",
};

/// What the environment says, read once per call; tests pass their own.
pub trait Env {
    fn var(&self, name: &str) -> Option<String>;
}

/// The process environment.
#[derive(Debug, Clone, Copy)]
pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }
}

fn under_ci(env: &dyn Env) -> bool {
    env.var("CI")
        .is_some_and(|v| !v.is_empty() && v != "false" && v != "0")
}

/// What a test does about `dep` given what was found: run with it (`Ok(Some)`), not run on
/// purpose (`Ok(None)`: the skip variable is set and this is not CI), or fail (`Err`, the
/// message names the dependency, why it is missing and how to get it).
pub fn decide<T>(env: &dyn Env, dep: &Dep, found: Result<T, String>) -> Result<Option<T>, String> {
    let skip = env.var(dep.skip_var);
    if under_ci(env) {
        if let Some(v) = skip {
            return Err(format!(
                "{}={v} is refused under CI=true: CI runs every test against {}",
                dep.skip_var, dep.what
            ));
        }
    }
    match found {
        Ok(t) => Ok(Some(t)),
        Err(why) if skip.as_deref() == Some("1") => {
            eprintln!(
                "not run: {} is missing ({why}) and {}=1",
                dep.what, dep.skip_var
            );
            Ok(None)
        }
        Err(why) => Err(format!(
            "{} is missing: {why}. To run this test, {}.{}",
            dep.what,
            dep.how_to_get,
            if under_ci(env) {
                ""
            } else {
                " (Off CI only, the variable to not run it is named in tests/deps.)"
            }
        )),
    }
}

/// [`decide`] on the process environment; panics (fails the test) instead of returning `Err`.
pub fn require<T>(dep: &Dep, found: Result<T, String>) -> Option<T> {
    decide(&ProcessEnv, dep, found).unwrap_or_else(|e| panic!("{e}"))
}

/// Refuses a variable that would make a test pass without measuring (e.g. one that rewrites
/// golden files instead of comparing them) under CI.
pub fn refuse_under_ci(env: &dyn Env, var: &str) -> Result<(), String> {
    match env.var(var) {
        Some(v) if under_ci(env) => Err(format!(
            "{var}={v} is refused under CI=true: it would make the test pass without comparing"
        )),
        _ => Ok(()),
    }
}

/// The ai-memory 0.7.0 binary, or the test fails (see the crate doc).
pub fn ai_memory() -> Option<PathBuf> {
    let bin = PathBuf::from(
        std::env::var("HIVESEED_AI_MEMORY_BIN").unwrap_or_else(|_| AI_MEMORY_DEFAULT.to_owned()),
    );
    let found = if bin.is_file() {
        Ok(bin.clone())
    } else {
        Err(format!("no file at {}", bin.display()))
    };
    require(&AI_MEMORY, found)
}

/// PostgreSQL's server programs and the account they run as.
#[derive(Debug, Clone)]
pub struct Postgres {
    pub initdb: PathBuf,
    pub postgres: PathBuf,
    pub psql: PathBuf,
    /// uid, gid of the `postgres` account.
    pub user: (u32, u32),
}

/// Debian keeps the server programs in `/usr/lib/postgresql/<major>/bin` (newest major first),
/// not on PATH; PATH is searched after them.
fn postgres_dirs(lib: &Path, path_var: Option<String>) -> Vec<PathBuf> {
    let mut majors: Vec<(u32, PathBuf)> = std::fs::read_dir(lib)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let major = e.file_name().to_str()?.parse::<u32>().ok()?;
            Some((major, e.path().join("bin")))
        })
        .collect();
    majors.sort_by_key(|m| std::cmp::Reverse(m.0));
    let mut dirs: Vec<PathBuf> = majors.into_iter().map(|(_, d)| d).collect();
    dirs.extend(std::env::split_paths(&path_var.unwrap_or_default()));
    dirs
}

fn find_in(dirs: &[PathBuf], prog: &str) -> Result<PathBuf, String> {
    dirs.iter()
        .map(|d| d.join(prog))
        .find(|p| p.is_file())
        .ok_or_else(|| format!("no {prog} in /usr/lib/postgresql/*/bin or on PATH"))
}

/// `name`'s uid and gid from an `/etc/passwd` text.
fn passwd_ids(text: &str, name: &str) -> Option<(u32, u32)> {
    text.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.len() >= 4 && f[0] == name).then(|| Some((f[2].parse().ok()?, f[3].parse().ok()?)))?
    })
}

fn find_postgres() -> Result<Postgres, String> {
    let dirs = postgres_dirs(Path::new("/usr/lib/postgresql"), std::env::var("PATH").ok());
    // All three from one directory, so initdb and the server are the same major.
    let dir = dirs
        .iter()
        .find(|d| d.join("initdb").is_file() && d.join("postgres").is_file())
        .ok_or_else(|| "no directory with both initdb and postgres".to_owned())?;
    let passwd = std::fs::read_to_string("/etc/passwd").map_err(|e| format!("/etc/passwd: {e}"))?;
    let user = passwd_ids(&passwd, "postgres").ok_or("no postgres user in /etc/passwd")?;
    Ok(Postgres {
        initdb: dir.join("initdb"),
        postgres: dir.join("postgres"),
        psql: find_in(&dirs, "psql")?,
        user,
    })
}

/// PostgreSQL, or the test fails (see the crate doc).
pub fn postgres() -> Option<Postgres> {
    require(&POSTGRES, find_postgres())
}

/// Terraform on PATH (`terraform version` succeeds), or the test fails (see the crate doc).
pub fn terraform() -> Option<PathBuf> {
    let found = match std::process::Command::new("terraform")
        .arg("version")
        .output()
    {
        Ok(out) if out.status.success() => Ok(PathBuf::from("terraform")),
        Ok(out) => Err(format!(
            "`terraform version` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )),
        Err(e) => Err(format!("terraform is not on PATH ({e})")),
    };
    require(&TERRAFORM, found)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    struct Vars(BTreeMap<&'static str, &'static str>);
    impl Env for Vars {
        fn var(&self, name: &str) -> Option<String> {
            self.0.get(name).map(|v| (*v).to_owned())
        }
    }
    fn env(pairs: &[(&'static str, &'static str)]) -> Vars {
        Vars(pairs.iter().copied().collect())
    }
    const MISSING: fn() -> Result<u8, String> = || Err("no file at /x".to_owned());

    #[test]
    fn a_missing_dependency_fails_under_ci_even_with_the_skip_variable() {
        let e = decide(&env(&[("CI", "true")]), &AI_MEMORY, MISSING()).unwrap_err();
        assert!(
            e.contains("ai-memory 0.7.0 binary is missing: no file at /x"),
            "{e}"
        );
        let e = decide(
            &env(&[("CI", "true"), ("HIVESEED_SKIP_AI_MEMORY", "1")]),
            &AI_MEMORY,
            MISSING(),
        )
        .unwrap_err();
        assert!(
            e.contains("HIVESEED_SKIP_AI_MEMORY=1 is refused under CI=true"),
            "{e}"
        );
    }

    #[test]
    fn the_skip_variable_is_refused_under_ci_even_when_the_dependency_is_there() {
        let e = decide(
            &env(&[("CI", "1"), ("HIVESEED_SKIP_POSTGRES", "0")]),
            &POSTGRES,
            Ok(7u8),
        )
        .unwrap_err();
        assert!(e.contains("HIVESEED_SKIP_POSTGRES=0 is refused"), "{e}");
    }

    #[test]
    fn a_missing_dependency_fails_off_ci_unless_skipped_on_purpose() {
        let e = decide(&env(&[]), &TERRAFORM, MISSING()).unwrap_err();
        assert!(e.contains("terraform is missing"), "{e}");
        let e = decide(
            &env(&[("HIVESEED_SKIP_TERRAFORM", "yes")]),
            &TERRAFORM,
            MISSING(),
        )
        .unwrap_err();
        assert!(e.contains("terraform is missing"), "{e}");
        assert_eq!(
            decide(
                &env(&[("HIVESEED_SKIP_TERRAFORM", "1")]),
                &TERRAFORM,
                MISSING()
            )
            .unwrap(),
            None
        );
        assert_eq!(
            decide(&env(&[("CI", "false")]), &TERRAFORM, Ok(3u8)).unwrap(),
            Some(3)
        );
    }

    #[test]
    fn golden_rewrites_are_refused_under_ci() {
        let e = refuse_under_ci(
            &env(&[("CI", "true"), ("HIVESEED_UPDATE_GOLDEN", "1")]),
            "HIVESEED_UPDATE_GOLDEN",
        )
        .unwrap_err();
        assert!(e.contains("HIVESEED_UPDATE_GOLDEN=1 is refused"), "{e}");
        refuse_under_ci(
            &env(&[("HIVESEED_UPDATE_GOLDEN", "1")]),
            "HIVESEED_UPDATE_GOLDEN",
        )
        .unwrap();
        refuse_under_ci(&env(&[("CI", "true")]), "HIVESEED_UPDATE_GOLDEN").unwrap();
    }

    #[test]
    fn debian_server_directories_come_before_path_newest_major_first() {
        let lib = std::env::temp_dir().join(format!("hiveseed-deps-{}", std::process::id()));
        for m in ["15", "18", "9", "not-a-major"] {
            std::fs::create_dir_all(lib.join(m).join("bin")).unwrap();
        }
        let dirs = postgres_dirs(&lib, Some("/usr/bin:/bin".to_owned()));
        std::fs::remove_dir_all(&lib).unwrap();
        let want: Vec<PathBuf> = vec![
            lib.join("18/bin"),
            lib.join("15/bin"),
            lib.join("9/bin"),
            "/usr/bin".into(),
            "/bin".into(),
        ];
        assert_eq!(dirs, want);
    }

    #[test]
    fn passwd_lines_give_ids_by_exact_name() {
        let t = "root:x:0:0::/root:/bin/sh\npostgres2:x:5:5::/:/bin/false\npostgres:x:104:110::/var/lib/postgresql:/bin/bash\n";
        assert_eq!(passwd_ids(t, "postgres"), Some((104, 110)));
        assert_eq!(passwd_ids(t, "nobody"), None);
        assert_eq!(passwd_ids("postgres:x:a:1::/:/bin/sh", "postgres"), None);
    }
}
