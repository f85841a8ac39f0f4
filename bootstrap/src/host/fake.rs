//! A fake for tests and benchmarks: real files under a temp root, and an in-memory Debian for the
//! few commands that would change the machine running the tests (`apt-get`, `apt-cache`,
//! `dpkg-query`, `useradd`, `systemctl`). Every other argv runs for real. A fake, not a mock: it
//! keeps state, so "apply then re-plan is empty" is tested against its behaviour, not a script.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard};

use hiveseed_proto::{AbsPath, FileMode};

use super::{
    Attrs, Exec, ExecOutput, ExitCode, Host, HostError, Owner, RealHost, StagedFile, Stat,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FakeUnit {
    pub enabled: bool,
    pub active: bool,
    pub starts: u32,
    /// `systemctl restart` calls.
    pub restarts: u32,
    /// systemd's `NRestarts`: automatic restarts after crashes (a test sets it to stage a crash
    /// loop); a start or restart on request resets it.
    pub n_restarts: u32,
}

/// The in-memory state behind the faked commands.
#[derive(Debug, Default)]
pub struct FakeSystem {
    /// dpkg database: package → installed version.
    pub installed: BTreeMap<String, String>,
    /// What apt can install now: package → versions, newest first (the candidate).
    pub available: BTreeMap<String, Vec<String>>,
    /// What appears after the next `apt-get update` (a newly added source).
    pub after_update: BTreeMap<String, Vec<String>>,
    pub updates: u32,
    pub units: BTreeMap<String, FakeUnit>,
    pub daemon_reloads: u32,
    /// Every argv the fake handled, in order.
    pub calls: Vec<Vec<String>>,
}

#[derive(Debug)]
pub struct FakeHost {
    inner: RealHost,
    sys: Mutex<FakeSystem>,
}

impl FakeHost {
    pub fn new(root: impl Into<PathBuf>) -> Result<Self, HostError> {
        Ok(Self {
            inner: RealHost::new(root)?,
            sys: Mutex::new(FakeSystem::default()),
        })
    }

    pub fn sys(&self) -> MutexGuard<'_, FakeSystem> {
        self.sys.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn root(&self) -> &std::path::Path {
        self.inner.root()
    }

    fn useradd(&self, argv: &[String]) -> Result<ExecOutput, HostError> {
        let name = argv.last().cloned().unwrap_or_default();
        if self.inner.lookup_user(&name)?.is_some() {
            return Ok(out(
                9,
                "",
                &format!("useradd: user '{name}' already exists"),
            ));
        }
        let flag = |f: &str| {
            argv.iter()
                .position(|a| a == f)
                .and_then(|i| argv.get(i + 1))
                .cloned()
        };
        let home = flag("--home-dir").unwrap_or_else(|| format!("/home/{name}"));
        let shell = flag("--shell").unwrap_or_else(|| "/bin/sh".into());
        let passwd: AbsPath = "/etc/passwd".parse().expect("static");
        let group: AbsPath = "/etc/group".parse().expect("static");
        let pw = self.inner.read(&passwd)?.unwrap_or_default();
        let gr = self.inner.read(&group)?.unwrap_or_default();
        let id = 900 + String::from_utf8_lossy(&pw).lines().count() as u32;
        let mut pw = pw;
        pw.extend_from_slice(format!("{name}:x:{id}:{id}::{home}:{shell}\n").as_bytes());
        let mut gr = gr;
        gr.extend_from_slice(format!("{name}:x:{id}:\n").as_bytes());
        let attrs = Attrs {
            mode: FileMode::new(0o644).expect("valid"),
            owner: None,
        };
        self.inner.write_atomic(&passwd, &pw, attrs)?;
        self.inner.write_atomic(&group, &gr, attrs)?;
        Ok(out(0, "", ""))
    }
}

fn out(code: i32, stdout: &str, stderr: &str) -> ExecOutput {
    ExecOutput {
        status: ExitCode::Code(code),
        stdout: stdout.as_bytes().to_vec(),
        stderr: stderr.as_bytes().to_vec(),
    }
}

impl FakeSystem {
    fn dpkg_query(&self, argv: &[String]) -> ExecOutput {
        let mut stdout = String::new();
        let mut stderr = String::new();
        for name in argv.iter().skip(1).filter(|a| !a.starts_with('-')) {
            match self.installed.get(name) {
                Some(v) => stdout.push_str(&format!("{name}\tinstall ok installed\t{v}\n")),
                None => {
                    stderr.push_str(&format!("dpkg-query: no packages found matching {name}\n"))
                }
            }
        }
        out(i32::from(!stderr.is_empty()), &stdout, &stderr)
    }

    fn apt_cache(&self, argv: &[String]) -> ExecOutput {
        let mut s = String::new();
        for name in argv.iter().skip(2) {
            let installed = self
                .installed
                .get(name)
                .cloned()
                .unwrap_or_else(|| "(none)".into());
            let versions = self.available.get(name).cloned().unwrap_or_default();
            let candidate = versions.first().cloned().unwrap_or_else(|| "(none)".into());
            s.push_str(&format!(
                "{name}:\n  Installed: {installed}\n  Candidate: {candidate}\n  Version table:\n"
            ));
            for v in versions {
                s.push_str(&format!(
                    "     {v} 500\n        500 http://fake trixie/main amd64 Packages\n"
                ));
            }
        }
        out(0, &s, "")
    }

    fn apt_get(&mut self, argv: &[String]) -> ExecOutput {
        if argv.iter().any(|a| a == "update") {
            self.updates += 1;
            for (k, v) in std::mem::take(&mut self.after_update) {
                self.available.insert(k, v);
            }
            return out(0, "", "");
        }
        let Some(i) = argv.iter().position(|a| a == "install") else {
            return out(100, "", "E: fake apt-get: unsupported");
        };
        let mut want = Vec::new();
        let mut args = argv[i + 1..].iter();
        let mut names = Vec::new();
        while let Some(a) = args.next() {
            if a == "-o" {
                args.next();
            } else if !a.starts_with('-') {
                names.push(a);
            }
        }
        for a in names {
            let (name, version) = match a.split_once('=') {
                Some((n, v)) => (n.to_owned(), Some(v.to_owned())),
                None => (a.clone(), None),
            };
            let versions = self.available.get(&name).cloned().unwrap_or_default();
            let v = match version {
                Some(v) if versions.contains(&v) => v,
                Some(v) => {
                    return out(
                        100,
                        "",
                        &format!("E: Version '{v}' for '{name}' was not found"),
                    )
                }
                None => match versions.first() {
                    Some(v) => v.clone(),
                    None => return out(100, "", &format!("E: Unable to locate package {name}")),
                },
            };
            want.push((name, v));
        }
        // One transaction: all or nothing.
        for (n, v) in want {
            self.installed.insert(n, v);
        }
        out(0, "", "")
    }

    fn systemctl(&mut self, argv: &[String]) -> ExecOutput {
        let verb = argv.get(1).map(String::as_str).unwrap_or("");
        let unit = argv.get(2).cloned().unwrap_or_default();
        match verb {
            "daemon-reload" => {
                self.daemon_reloads += 1;
                out(0, "", "")
            }
            "enable" => {
                self.units.entry(unit).or_default().enabled = true;
                out(0, "", "")
            }
            "start" => {
                let u = self.units.entry(unit).or_default();
                if !u.active {
                    u.active = true;
                    u.starts += 1;
                    u.n_restarts = 0;
                }
                out(0, "", "")
            }
            "restart" => {
                let u = self.units.entry(unit).or_default();
                u.active = true;
                u.restarts += 1;
                u.n_restarts = 0;
                out(0, "", "")
            }
            // Only the one property the agent reads; systemd shows 0 for a unit it has not loaded.
            "show" if argv.len() == 5 && argv[2..4] == ["--property=NRestarts", "--value"] => {
                let n = argv
                    .get(4)
                    .and_then(|u| self.units.get(u))
                    .map_or(0, |u| u.n_restarts);
                out(0, &format!("{n}\n"), "")
            }
            "is-enabled" => match self.units.get(&unit) {
                Some(u) if u.enabled => out(0, "enabled\n", ""),
                _ => out(1, "disabled\n", ""),
            },
            "is-active" => match self.units.get(&unit) {
                Some(u) if u.active => out(0, "active\n", ""),
                _ => out(3, "inactive\n", ""),
            },
            _ => out(1, "", "fake systemctl: unsupported verb"),
        }
    }
}

impl Host for FakeHost {
    fn read_limited(&self, path: &AbsPath, cap: u64) -> Result<Option<Vec<u8>>, HostError> {
        self.inner.read_limited(path, cap)
    }
    fn sha256(&self, path: &AbsPath) -> Result<Option<hiveseed_proto::Sha256>, HostError> {
        self.inner.sha256(path)
    }
    fn stat(&self, path: &AbsPath) -> Result<Option<Stat>, HostError> {
        self.inner.stat(path)
    }
    fn write_atomic(&self, path: &AbsPath, content: &[u8], attrs: Attrs) -> Result<(), HostError> {
        self.inner.write_atomic(path, content, attrs)
    }
    fn stage_file(&self, path: &AbsPath, attrs: Attrs) -> Result<StagedFile, HostError> {
        self.inner.stage_file(path, attrs)
    }
    fn commit_staged(&self, staged: StagedFile) -> Result<(), HostError> {
        self.inner.commit_staged(staged)
    }
    fn mkdir(&self, path: &AbsPath, attrs: Attrs) -> Result<(), HostError> {
        self.inner.mkdir(path, attrs)
    }
    fn chmod(&self, path: &AbsPath, mode: FileMode, observed: &Stat) -> Result<(), HostError> {
        self.inner.chmod(path, mode, observed)
    }
    fn chown(&self, path: &AbsPath, owner: Owner, observed: &Stat) -> Result<(), HostError> {
        self.inner.chown(path, owner, observed)
    }
    fn remove(&self, path: &AbsPath) -> Result<(), HostError> {
        self.inner.remove(path)
    }
    fn open_append(&self, path: &AbsPath, mode: FileMode) -> Result<std::fs::File, HostError> {
        self.inner.open_append(path, mode)
    }
    fn dir_path(&self, path: &AbsPath) -> Result<PathBuf, HostError> {
        self.inner.dir_path(path)
    }

    fn exec(&self, exec: &Exec) -> Result<ExecOutput, HostError> {
        let program = exec
            .argv
            .first()
            .ok_or(HostError::EmptyArgv)?
            .rsplit('/')
            .next()
            .unwrap_or_default()
            .to_owned();
        let faked = ["dpkg-query", "apt-cache", "apt-get", "useradd", "systemctl"];
        if !faked.contains(&program.as_str()) {
            return self.inner.exec(exec);
        }
        self.sys().calls.push(exec.argv.clone());
        match program.as_str() {
            "useradd" => self.useradd(&exec.argv),
            "dpkg-query" => Ok(self.sys().dpkg_query(&exec.argv)),
            "apt-cache" => Ok(self.sys().apt_cache(&exec.argv)),
            "apt-get" => Ok(self.sys().apt_get(&exec.argv)),
            _ => Ok(self.sys().systemctl(&exec.argv)),
        }
    }
}
