//! `check`: node-local validation probes reported as `{node, check, expected, got, status}`.
//! PASS iff got == expected (CommandOutput: stdout contains expected); a probe that cannot run is
//! FAIL with the reason in `got`. Checks change nothing, so they never appear in a plan.

use std::time::Duration;

use hiveseed_proto::manifest::{Check, Probe};
use hiveseed_proto::status::MAX_TEXT;
use hiveseed_proto::{AbsPath, CheckRecord, CheckStatus, Manifest, NodeName, Resource};

use super::wait::{error_chain, https_client, read_text};
use crate::host::{truncate_stderr, Exec, Host};
use crate::plan::ServiceManager;
use crate::supervisor::Supervisor;

/// Where the probes look besides the Host.
#[derive(Clone, Copy)]
pub struct CheckEnv<'a> {
    pub host: &'a dyn Host,
    pub node: &'a NodeName,
    pub manager: ServiceManager,
    pub supervisor: Option<&'a Supervisor>,
    /// Bound on one probe.
    pub timeout: Duration,
}

impl std::fmt::Debug for CheckEnv<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CheckEnv")
            .field("node", &self.node)
            .field("manager", &self.manager)
            .finish_non_exhaustive()
    }
}

/// Every check of the manifest, in order.
pub async fn run_checks(manifest: &Manifest, env: &CheckEnv<'_>) -> Vec<CheckRecord> {
    let mut out = Vec::new();
    for r in &manifest.resources {
        if let Resource::Check(c) = r {
            out.push(run_check(env, c).await);
        }
    }
    out
}

fn bounded(s: &str) -> String {
    if s.len() <= MAX_TEXT {
        return s.to_owned();
    }
    let mut end = MAX_TEXT - 3;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &s[..end])
}

pub async fn run_check(env: &CheckEnv<'_>, c: &Check) -> CheckRecord {
    let record = |got: String, pass: bool| CheckRecord {
        node: env.node.clone(),
        check: c.check.clone(),
        expected: c.expected.clone(),
        got: bounded(&got),
        status: if pass {
            CheckStatus::Pass
        } else {
            CheckStatus::Fail
        },
    };
    if let Probe::CommandOutput { argv } = &c.probe {
        return match command_output(env.host, argv) {
            Ok(stdout) => {
                let pass = stdout.contains(&c.expected);
                record(stdout.trim().to_owned(), pass)
            }
            Err(reason) => record(reason, false),
        };
    }
    let got = match tokio::time::timeout(env.timeout, observe(env, &c.probe)).await {
        Ok(r) => r,
        Err(_) => Err(format!("probe timed out after {:?}", env.timeout)),
    };
    match got {
        Ok(got) => {
            let pass = got == c.expected;
            record(got, pass)
        }
        Err(reason) => record(reason, false),
    }
}

fn command_output(host: &dyn Host, argv: &[String]) -> Result<String, String> {
    if argv.is_empty() {
        return Err("cannot run: empty argv".into());
    }
    let exec = Exec::new(argv.iter().cloned());
    let out = host
        .exec(&exec)
        .map_err(|e| format!("cannot run: {}", error_chain(&e)))?;
    if !out.status.success() {
        return Err(format!(
            "`{}` {}: {}",
            exec.display(),
            out.status,
            truncate_stderr(&out.stderr)
        ));
    }
    Ok(out.stdout_str())
}

async fn observe(env: &CheckEnv<'_>, probe: &Probe) -> Result<String, String> {
    match probe {
        Probe::FileSha256 { path } => match env.host.sha256(path) {
            Ok(Some(d)) => Ok(d.to_hex()),
            Ok(None) => Err(format!("{path} is missing")),
            Err(e) => Err(error_chain(&e)),
        },
        Probe::CommandOutput { argv } => command_output(env.host, argv),
        Probe::HttpsJson {
            url,
            field,
            ca_path,
            cert_path,
            key_path,
            api_key_file,
        } => {
            let client = https_client(env.host, ca_path, cert_path, key_path)?;
            let mut req = client.get(url);
            if let Some(f) = api_key_file {
                req = req.header("x-api-key", read_text(env.host, f)?.trim());
            }
            let resp = req
                .send()
                .await
                .map_err(|e| format!("GET {url}: {}", error_chain(&e)))?;
            if !resp.status().is_success() {
                return Err(format!("GET {url}: {}", resp.status()));
            }
            let v: serde_json::Value = resp
                .json()
                .await
                .map_err(|e| format!("GET {url}: body is not JSON: {e}"))?;
            json_field(&v, field).ok_or_else(|| format!("no field {field:?} in the response"))
        }
        Probe::Sql {
            dbname,
            user,
            query,
        } => sql(env.host, dbname, user, query).await,
        Probe::ProcessCount { exe, arg } => Ok(process_count(exe, arg).to_string()),
        Probe::FederationCredential {
            credential_path,
            issuer_keys,
            trust_domain,
        } => federation_credential(env.host, credential_path, issuer_keys, trust_domain),
        Probe::NamespaceStandard {
            url,
            ca_path,
            cert_path,
            key_path,
            api_key_file,
            namespace,
            agent_id,
            field,
        } => {
            let daemon = super::standard::Daemon::connect(
                env.host,
                url,
                ca_path,
                cert_path,
                key_path,
                api_key_file,
                agent_id,
            )?;
            match daemon.standard_memory(namespace).await? {
                None => Ok("unset".into()),
                Some(m) => json_field(&m, field)
                    .ok_or_else(|| format!("no field {field:?} in the standard memory")),
            }
        }
        Probe::ServiceActive { unit } => match env.manager {
            ServiceManager::Systemd => {
                let out = env
                    .host
                    .exec(&Exec::new(["systemctl", "is-active", unit.as_str()]))
                    .map_err(|e| error_chain(&e))?;
                Ok(out.stdout_str().trim().to_owned())
            }
            ServiceManager::Supervisor => {
                Ok(if env.supervisor.is_some_and(|s| s.is_active(unit)) {
                    "active"
                } else {
                    "inactive"
                }
                .to_owned())
            }
        },
    }
}

/// A dotted path (`a.b.0.c`) into JSON; strings unquoted, anything else as JSON text.
pub fn json_field(v: &serde_json::Value, path: &str) -> Option<String> {
    let mut cur = v;
    for part in path.split('.') {
        cur = match cur {
            serde_json::Value::Array(a) => a.get(part.parse::<usize>().ok()?)?,
            other => other.get(part)?,
        };
    }
    Some(match cur {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    })
}

/// Processes (in the agent's pid namespace) whose argv[0] is `exe` and argv[1] is `arg`.
pub fn process_count(exe: &AbsPath, arg: &str) -> usize {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0;
    };
    // Only processes that share our root: in a container or a lab chroot, the host's other
    // nodes run the same binaries in the same pid namespace.
    let our_root = std::fs::read_link("/proc/self/root").ok();
    let matching: std::collections::HashMap<u32, u32> = dir
        .filter_map(Result::ok)
        .filter_map(|e| Some((e.file_name().to_str()?.parse::<u32>().ok()?, e.path())))
        .filter(|(_, p)| std::fs::read_link(p.join("root")).ok() == our_root)
        .filter(|(_, p)| {
            std::fs::read(p.join("cmdline")).is_ok_and(|c| {
                let mut parts = c.split(|b| *b == 0);
                parts.next() == Some(exe.as_str().as_bytes())
                    && parts.next() == Some(arg.as_bytes())
            })
        })
        .filter_map(|(pid, p)| Some((pid, parent_pid(&p)?)))
        .collect();
    // A child forked by a matching process (a PostgreSQL backend before it retitles itself) is
    // part of the same instance, not a second one.
    matching
        .values()
        .filter(|ppid| !matching.contains_key(ppid))
        .count()
}

/// The parent pid from `/proc/<pid>/stat` (the field after the parenthesised command name).
fn parent_pid(proc_dir: &std::path::Path) -> Option<u32> {
    let stat = std::fs::read_to_string(proc_dir.join("stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// The subject of a credential file that verifies against the given issuer keys and trust
/// domain now; otherwise ai-memory's refusal tag. Never the credential itself.
fn federation_credential(
    host: &dyn Host,
    credential_path: &AbsPath,
    issuer_keys: &[AbsPath],
    trust_domain: &str,
) -> Result<String, String> {
    let text = match host.read(credential_path) {
        Ok(Some(b)) => {
            String::from_utf8(b).map_err(|_| format!("{credential_path} is not text"))?
        }
        Ok(None) => return Err(format!("{credential_path} is missing")),
        Err(e) => return Err(error_chain(&e)),
    };
    let mut issuers = Vec::new();
    for path in issuer_keys {
        let id = path
            .as_str()
            .rsplit('/')
            .next()
            .and_then(|n| n.strip_suffix(".pub"))
            .ok_or_else(|| format!("{path}: an issuer key file is named <issuer_id>.pub"))?
            .to_owned();
        let bytes = match host.read(path) {
            Ok(Some(b)) => b,
            Ok(None) => return Err(format!("{path} is missing")),
            Err(e) => return Err(error_chain(&e)),
        };
        let raw: [u8; 32] = bytes.as_slice().try_into().map_err(|_| {
            format!(
                "{path}: not a raw 32-byte Ed25519 key ({} bytes)",
                bytes.len()
            )
        })?;
        let key = ed25519_dalek::VerifyingKey::from_bytes(&raw)
            .map_err(|_| format!("{path}: not a valid Ed25519 public key"))?;
        issuers.push((id, key));
    }
    let issuers: Vec<(&str, ed25519_dalek::VerifyingKey)> =
        issuers.iter().map(|(id, k)| (id.as_str(), *k)).collect();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    hiveseed_proto::credential::verify(text.trim(), &issuers, Some(trust_domain), now)
        .map(|claims| claims.subject_agent_id)
        .map_err(|e| e.to_string())
}

/// One value over the local socket as the `postgres` superuser (pg_hba `local all all trust`).
async fn sql(host: &dyn Host, dbname: &str, user: &str, query: &str) -> Result<String, String> {
    let socket_dir: AbsPath = "/var/run/postgresql".parse().expect("static path");
    let dir = host.dir_path(&socket_dir).map_err(|e| error_chain(&e))?;
    let mut cfg = tokio_postgres::Config::new();
    cfg.host_path(dir)
        .dbname(dbname)
        .user(user)
        .connect_timeout(Duration::from_secs(5));
    let (client, conn) = cfg
        .connect(tokio_postgres::NoTls)
        .await
        .map_err(|e| format!("connect to {dbname}: {}", error_chain(&e)))?;
    let conn = tokio::spawn(conn);
    let rows = client
        .simple_query(query)
        .await
        .map_err(|e| format!("query: {}", error_chain(&e)));
    drop(client);
    conn.abort();
    for msg in rows? {
        if let tokio_postgres::SimpleQueryMessage::Row(row) = msg {
            return Ok(row.get(0).unwrap_or("NULL").to_owned());
        }
    }
    Err("query returned no rows".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The node-side `verify_cred_chain`: the subject when the credential verifies, ai-memory's
    /// refusal tag when it does not, a clear message for a missing or malformed file.
    #[test]
    fn federation_credential_probe() {
        use ed25519_dalek::SigningKey;
        let tmp = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(tmp.path().join("etc/ai-memory/trust")).unwrap();
        let host = crate::RealHost::new(tmp.path()).unwrap();
        let ca = SigningKey::generate(&mut rand::rngs::OsRng);
        let other = SigningKey::generate(&mut rand::rngs::OsRng);
        let node = SigningKey::generate(&mut rand::rngs::OsRng);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        let fed_id = "c1/r1/c1-peer-r1-01";
        let mint = |issuer: &SigningKey| {
            hiveseed_proto::credential::mint(
                issuer,
                "c1-ca",
                "c1.fleet",
                fed_id,
                node.verifying_key().to_bytes(),
                now,
                3600,
            )
            .unwrap()
            .0
        };
        let p = |s: &str| -> AbsPath { s.parse().unwrap() };
        let cred = p("/etc/ai-memory/credential");
        let keys = vec![p("/etc/ai-memory/trust/c1-ca.pub")];
        std::fs::write(
            tmp.path().join("etc/ai-memory/trust/c1-ca.pub"),
            ca.verifying_key().to_bytes(),
        )
        .unwrap();
        let probe = |domain: &str| federation_credential(&host, &cred, &keys, domain);

        assert!(probe("c1.fleet").unwrap_err().contains("missing"));
        std::fs::write(
            tmp.path().join("etc/ai-memory/credential"),
            mint(&ca) + "\n",
        )
        .unwrap();
        assert_eq!(probe("c1.fleet").unwrap(), fed_id);
        assert_eq!(
            probe("other.fleet").unwrap_err(),
            "credential_wrong_trust_domain"
        );
        // Signed by another key under the same issuer id.
        std::fs::write(tmp.path().join("etc/ai-memory/credential"), mint(&other)).unwrap();
        assert_eq!(probe("c1.fleet").unwrap_err(), "credential_bad_signature");
        std::fs::write(tmp.path().join("etc/ai-memory/credential"), "v1=AAAA").unwrap();
        assert_eq!(probe("c1.fleet").unwrap_err(), "credential_malformed");
        std::fs::write(tmp.path().join("etc/ai-memory/trust/c1-ca.pub"), [0u8; 31]).unwrap();
        assert!(probe("c1.fleet").unwrap_err().contains("31 bytes"));
    }

    #[test]
    fn json_fields() {
        let v = serde_json::json!({"status": "ok", "n": 57, "a": [{"b": true}]});
        assert_eq!(json_field(&v, "status").as_deref(), Some("ok"));
        assert_eq!(json_field(&v, "n").as_deref(), Some("57"));
        assert_eq!(json_field(&v, "a.0.b").as_deref(), Some("true"));
        assert_eq!(json_field(&v, "missing"), None);
    }
}
