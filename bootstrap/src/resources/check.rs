//! `check`: node-local validation probes reported as `{node, check, expected, got, status}`.
//! GOT is always what the probe measured, never the expectation (a command's stdout trimmed of
//! surrounding whitespace, no more); a probe that cannot run is FAIL with the reason in GOT. PASS
//! by the check's `match` (hiveseed_proto::manifest::Match), never by "contains":
//! - `exact` (the default): GOT == expected;
//! - `version_prefix`: GOT is expected or continues it at a dot (expected `17`, GOT `17.12`);
//! - `regex`: expected is a pattern matching the whole of GOT (`linked \([0-9]+ events\)`).
//!
//! Checks change nothing, so they never appear in a plan.

use std::time::Duration;

use hiveseed_proto::manifest::{Check, Probe};
use hiveseed_proto::status::MAX_TEXT;
use hiveseed_proto::{AbsPath, CheckRecord, CheckStatus, Manifest, NodeName, Resource};

use super::wait::{bound_stream, error_chain, https_client, read_text};
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
    // A pattern that does not compile fails the check, with the reason, not the manifest.
    let judged = |got: String| match c.passes(&got) {
        Ok(pass) => record(got, pass),
        Err(e) => record(format!("{got} ({e})"), false),
    };
    let got = match tokio::time::timeout(env.timeout, observe(env, &c.probe)).await {
        Ok(r) => r,
        Err(_) => Err(format!("probe timed out after {:?}", env.timeout)),
    };
    match got {
        Ok(got) => judged(got),
        Err(reason) => record(reason, false),
    }
}

/// Sends `req` (a GET of `url`), and reads `field` of its JSON answer.
async fn json_get(req: reqwest::RequestBuilder, url: &str, field: &str) -> Result<String, String> {
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

/// Runs for at most `timeout`: the probe's bound, which the async timeout around a probe cannot
/// enforce on this blocking call.
fn command_output(host: &dyn Host, argv: &[String], timeout: Duration) -> Result<String, String> {
    if argv.is_empty() {
        return Err("cannot run: empty argv".into());
    }
    let exec = Exec::new(argv.iter().cloned()).timeout(timeout);
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
        Probe::CommandOutput { argv } => Ok(command_output(env.host, argv, env.timeout)?
            .trim()
            .to_owned()),
        Probe::CommandJson { argv, field } => {
            let stdout = command_output(env.host, argv, env.timeout)?;
            let v: serde_json::Value = serde_json::from_str(&stdout).map_err(|e| {
                format!(
                    "`{}` printed no JSON ({e}): {}",
                    Exec::new(argv.iter().cloned()).display(),
                    truncate_stderr(stdout.as_bytes())
                )
            })?;
            json_field(&v, field).ok_or_else(|| format!("no field {field:?} in the output"))
        }
        Probe::HttpJson { url, field } => {
            let url = loopback_http(url)?;
            let client = reqwest::Client::builder()
                .no_proxy()
                .build()
                .map_err(|e| format!("HTTP client: {}", error_chain(&e)))?;
            json_get(client.get(url.clone()), url.as_str(), field).await
        }
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
            json_get(req, url, field).await
        }
        Probe::Sql {
            dbname,
            user,
            query,
        } => sql(env.host, dbname, user, query).await,
        Probe::SignedEventsChain {
            dbname,
            user,
            schema,
        } => {
            let (client, _conn) = local_session(env.host, dbname, user).await?;
            let rows = super::signed_events::read(&client, schema).await?;
            Ok(super::signed_events::state(&rows))
        }
        Probe::PgPlaintext {
            host,
            port,
            dbname,
            user,
            password_file,
            source,
        } => {
            let server = std::net::SocketAddr::new(*host, *port);
            pg_plaintext(env.host, server, dbname, user, password_file, *source).await
        }
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
                    .exec(
                        &Exec::new(["systemctl", "is-active", unit.as_str()]).timeout(env.timeout),
                    )
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

/// A dotted path (`a.b.0.c`) into JSON; strings unquoted, anything else as JSON text. A `*`
/// segment takes the rest of the path from every element of an array, `*[k=v]` from those whose
/// field `k` is `v` (neither holding a `.`), joined with `,` in the array's order (`[]` when none).
/// `None` when the path is missing, in any selected element too.
pub fn json_field(v: &serde_json::Value, path: &str) -> Option<String> {
    let parts: Vec<&str> = path.split('.').collect();
    select(v, &parts)
}

fn select(v: &serde_json::Value, path: &[&str]) -> Option<String> {
    let Some((part, rest)) = path.split_first() else {
        return Some(match v {
            serde_json::Value::String(s) => s.clone(),
            other => other.to_string(),
        });
    };
    if let Some(filter) = part.strip_prefix('*') {
        let filter = match filter {
            "" => None,
            f => Some(f.strip_prefix('[')?.strip_suffix(']')?.split_once('=')?),
        };
        let values = v
            .as_array()?
            .iter()
            .filter(|e| filter.is_none_or(|(k, want)| select(e, &[k]).as_deref() == Some(want)))
            .map(|e| select(e, rest))
            .collect::<Option<Vec<String>>>()?;
        return Some(if values.is_empty() {
            "[]".into()
        } else {
            values.join(",")
        });
    }
    let next = match v {
        serde_json::Value::Array(a) => a.get(part.parse::<usize>().ok()?)?,
        other => other.get(part)?,
    };
    select(next, rest)
}

/// A plain-HTTP URL to this machine: nothing unauthenticated leaves the node.
fn loopback_http(url: &str) -> Result<reqwest::Url, String> {
    let parsed: reqwest::Url = url.parse().map_err(|e| format!("{url}: {e}"))?;
    let loopback = match parsed.host_str() {
        Some("localhost") => true,
        Some(h) => h
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback()),
        None => false,
    };
    if parsed.scheme() != "http" || !loopback {
        return Err(format!(
            "{url}: an http_json probe reads only http:// on a loopback address"
        ));
    }
    Ok(parsed)
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

/// A session over the local socket (`/var/run/postgresql` under the host's root) as `user`, by
/// peer authentication (the pg role maps root to postgres in pg_ident.conf). The connection task
/// ends when the returned guard drops.
async fn local_session(
    host: &dyn Host,
    dbname: &str,
    user: &str,
) -> Result<(tokio_postgres::Client, AbortOnDrop), String> {
    let socket_dir: AbsPath = "/var/run/postgresql".parse().expect("static path");
    let dir = host.dir_path(&socket_dir).map_err(|e| error_chain(&e))?;
    let connect = async {
        let stream = owners_socket(&dir, 5432).await?;
        let mut cfg = tokio_postgres::Config::new();
        cfg.dbname(dbname).user(user);
        cfg.connect_raw(stream, tokio_postgres::NoTls)
            .await
            .map_err(|e| format!("connect to {dbname}: {}", error_chain(&e)))
    };
    let (client, conn) = tokio::time::timeout(Duration::from_secs(5), connect)
        .await
        .map_err(|_| format!("connect to {dbname}: no answer within 5 s"))??;
    Ok((client, AbortOnDrop(tokio::spawn(conn))))
}

/// The server socket `.s.PGSQL.<port>` in `dir`, connected only when it is a socket (not a
/// symlink: opened `O_PATH|O_NOFOLLOW` and connected through that fd) owned by the directory's
/// owner, and the process accepting is that same user (`SO_PEERCRED`). The directory belongs to
/// postgres: without these checks it could point root's connection, with root's credentials, at
/// any socket of the node, or answer it from a process of another account. What postgres's own
/// server answers is postgres's word either way; the checks report it as such.
async fn owners_socket(dir: &std::path::Path, port: u16) -> Result<tokio::net::UnixStream, String> {
    use rustix::fs::{FileType, Mode, OFlags};
    use std::os::fd::AsRawFd;
    let path = dir.join(format!(".s.PGSQL.{port}"));
    let shown = path.display();
    let owner = rustix::fs::stat(dir)
        .map_err(|e| format!("{}: {e}", dir.display()))?
        .st_uid;
    let fd = rustix::fs::open(
        &path,
        OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| format!("{shown}: {e}"))?;
    let st = rustix::fs::fstat(&fd).map_err(|e| format!("{shown}: {e}"))?;
    let kind = FileType::from_raw_mode(st.st_mode);
    if kind != FileType::Socket {
        return Err(format!(
            "refusing {shown}: it is a {kind:?}, not a socket (a link is never followed in a \
             directory uid {owner} can write)"
        ));
    }
    if st.st_uid != owner {
        return Err(format!(
            "refusing {shown}: the socket is owned by uid {}, its directory by uid {owner}",
            st.st_uid
        ));
    }
    let stream = tokio::net::UnixStream::connect(format!("/proc/self/fd/{}", fd.as_raw_fd()))
        .await
        .map_err(|e| format!("connect {shown}: {e}"))?;
    let peer = stream
        .peer_cred()
        .map_err(|e| format!("{shown}: peer credentials: {e}"))?
        .uid();
    if peer != owner {
        return Err(format!(
            "refusing {shown}: served by uid {peer}, not by the directory's owner uid {owner}"
        ));
    }
    Ok(stream)
}

/// Aborts a spawned task when dropped.
#[derive(Debug)]
struct AbortOnDrop(tokio::task::JoinHandle<Result<(), tokio_postgres::Error>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// One value of a query's first row.
async fn sql(host: &dyn Host, dbname: &str, user: &str, query: &str) -> Result<String, String> {
    let (client, _conn) = local_session(host, dbname, user).await?;
    let rows = client
        .simple_query(query)
        .await
        .map_err(|e| format!("query: {}", error_chain(&e)))?;
    for msg in rows {
        if let tokio_postgres::SimpleQueryMessage::Row(row) = msg {
            return Ok(row.get(0).unwrap_or("NULL").to_owned());
        }
    }
    Err("query returned no rows".into())
}

/// A login over plain TCP (`sslmode=disable`) with the real password: the server's refusal in
/// its own words, or the fact that it let the session in. Only an answer from the server counts
/// as a refusal: no TCP connection or a broken one is an error.
async fn pg_plaintext(
    host: &dyn Host,
    server: std::net::SocketAddr,
    dbname: &str,
    user: &str,
    password_file: &AbsPath,
    source: Option<std::net::IpAddr>,
) -> Result<String, String> {
    let password = read_text(host, password_file)?;
    let from = source.map(|s| format!(" from {s}")).unwrap_or_default();
    let what = || format!("plaintext connect {server}/{dbname} as {user}{from}");
    let stream = bound_stream(source, server)
        .await
        .map_err(|e| format!("{}: {e}", what()))?;
    let mut cfg = tokio_postgres::Config::new();
    cfg.dbname(dbname)
        .user(user)
        .password(password.trim_end_matches(['\n', '\r']))
        .ssl_mode(tokio_postgres::config::SslMode::Disable);
    match cfg.connect_raw(stream, tokio_postgres::NoTls).await {
        Ok(_session) => Ok("connected without TLS".into()),
        Err(e) => match e.as_db_error() {
            Some(db) => Ok(format!("refused: {}", db.message())),
            None => Err(format!("{}: {}", what(), error_chain(&e))),
        },
    }
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

    #[test]
    fn json_field_selects_from_arrays() {
        let v = serde_json::json!({"result": [
            {"id": "R001", "enabled": true},
            {"id": "R002", "enabled": false},
            {"id": "R003", "enabled": true},
        ]});
        assert_eq!(
            json_field(&v, "result.*.id").as_deref(),
            Some("R001,R002,R003")
        );
        assert_eq!(
            json_field(&v, "result.*[enabled=true].id").as_deref(),
            Some("R001,R003")
        );
        assert_eq!(
            json_field(&v, "result.*[enabled=maybe].id").as_deref(),
            Some("[]")
        );
        // A path missing from one selected element is missing, not skipped.
        assert_eq!(json_field(&v, "result.*.enabled.x"), None);
        assert_eq!(json_field(&v, "result.*[enabled].id"), None);
        assert_eq!(json_field(&v, "result.*x.id"), None);
        assert_eq!(json_field(&v, "result.0.*"), None, "not an array");
    }

    async fn check(argv: &[&str], probe_field: Option<&str>, expected: &str) -> CheckRecord {
        let tmp = tempfile::tempdir().unwrap();
        let host = crate::RealHost::new(tmp.path()).unwrap();
        let node: NodeName = "do-1461-peer-nyc3-01".parse().unwrap();
        let env = CheckEnv {
            host: &host,
            node: &node,
            manager: ServiceManager::Supervisor,
            supervisor: None,
            timeout: Duration::from_secs(5),
        };
        let argv: Vec<String> = argv.iter().map(|a| (*a).to_owned()).collect();
        let probe = match probe_field {
            None => Probe::CommandOutput { argv },
            Some(f) => Probe::CommandJson {
                argv,
                field: f.into(),
            },
        };
        let c = Check {
            id: "check:t".parse().unwrap(),
            check: "t".into(),
            expected: expected.into(),
            matching: Default::default(),
            probe,
        };
        run_check(&env, &c).await
    }

    /// `governance.rules_enabled` once passed on any output holding a "4": a command's output is
    /// now the value, compared whole.
    #[tokio::test]
    async fn command_output_is_compared_exactly() {
        let cases: &[(&[&str], &str, &str, CheckStatus)] = &[
            (&["/bin/echo", "4"], "4", "4", CheckStatus::Pass),
            (&["/bin/echo", "  4  "], "4", "4", CheckStatus::Pass),
            (&["/bin/echo", "14"], "4", "14", CheckStatus::Fail),
            (&["/bin/echo", "error 4"], "4", "error 4", CheckStatus::Fail),
            (
                &["/usr/bin/printf", "4\\n4\\n"],
                "4",
                "4\n4",
                CheckStatus::Fail,
            ),
            (
                &["/bin/echo", "ai-memory 0.7.0"],
                "0.7.0",
                "ai-memory 0.7.0",
                CheckStatus::Fail,
            ),
            (
                &["/bin/echo", "ai-memory 0.7.0"],
                "ai-memory 0.7.0",
                "ai-memory 0.7.0",
                CheckStatus::Pass,
            ),
        ];
        for (argv, expected, got, status) in cases {
            let r = check(argv, None, expected).await;
            assert_eq!((r.got.as_str(), r.status), (*got, *status), "{argv:?}");
        }
        let r = check(&["/bin/false"], None, "").await;
        assert_eq!(r.status, CheckStatus::Fail);
        assert!(r.got.starts_with("`/bin/false` exit status 1"), "{}", r.got);
    }

    #[tokio::test]
    async fn command_json_reports_the_selected_value() {
        let rules = |r3: bool| {
            serde_json::json!({"verb": "rules.list", "result": [
                {"id": "R001", "enabled": true}, {"id": "R002", "enabled": true},
                {"id": "R003", "enabled": r3}, {"id": "R004", "enabled": true},
            ]})
            .to_string()
        };
        let field = Some("result.*[enabled=true].id");
        let all = "R001,R002,R003,R004";
        let r = check(&["/bin/echo", &rules(true)], field, all).await;
        assert_eq!((r.got.as_str(), r.status), (all, CheckStatus::Pass));
        let r = check(&["/bin/echo", &rules(false)], field, all).await;
        assert_eq!(
            (r.got.as_str(), r.status),
            ("R001,R002,R004", CheckStatus::Fail)
        );
        let r = check(&["/bin/echo", "4"], Some("decision"), "deny").await;
        assert_eq!(
            (r.got.as_str(), r.status),
            ("no field \"decision\" in the output", CheckStatus::Fail)
        );
        let r = check(&["/bin/echo", "Refuse: R001"], Some("decision"), "deny").await;
        assert_eq!(r.status, CheckStatus::Fail);
        assert!(r.got.contains("printed no JSON"), "{}", r.got);
    }

    /// One HTTP answer on a loopback port, as Ollama's `GET /api/tags` gives it.
    #[tokio::test]
    async fn http_json_reads_a_loopback_service() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let body = r#"{"models":[{"name":"nomic-embed-text:latest","size":274302450}]}"#;
        let server = tokio::spawn(async move {
            let (mut sock, _) = listener.accept().await.unwrap();
            let mut req = vec![0u8; 4096];
            let n = sock.read(&mut req).await.unwrap();
            let answer = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            sock.write_all(answer.as_bytes()).await.unwrap();
            String::from_utf8_lossy(&req[..n]).into_owned()
        });
        let tmp = tempfile::tempdir().unwrap();
        let host = crate::RealHost::new(tmp.path()).unwrap();
        let node: NodeName = "do-1461-peer-nyc3-01".parse().unwrap();
        let env = CheckEnv {
            host: &host,
            node: &node,
            manager: ServiceManager::Supervisor,
            supervisor: None,
            timeout: Duration::from_secs(5),
        };
        let c = Check {
            id: "check:ollama.model".parse().unwrap(),
            check: "ollama.model".into(),
            expected: "nomic-embed-text:latest".into(),
            matching: Default::default(),
            probe: Probe::HttpJson {
                url: format!("http://127.0.0.1:{port}/api/tags"),
                field: "models.*.name".into(),
            },
        };
        let r = run_check(&env, &c).await;
        assert_eq!(
            (r.got.as_str(), r.status),
            ("nomic-embed-text:latest", CheckStatus::Pass)
        );
        assert!(server.await.unwrap().starts_with("GET /api/tags HTTP/1.1"));
    }

    #[test]
    fn http_json_reads_only_loopback_http() {
        for ok in [
            "http://127.0.0.1:11434/api/tags",
            "http://localhost:11434/api/version",
            "http://[::1]:11434/api/tags",
        ] {
            assert!(loopback_http(ok).is_ok(), "{ok}");
        }
        for refused in [
            "https://127.0.0.1:11434/api/tags",
            "http://10.0.0.5:11434/api/tags",
            "http://localhost.example.com/api/tags",
            "not a url",
        ] {
            assert!(loopback_http(refused).is_err(), "{refused}");
        }
    }
}
