#![allow(clippy::unwrap_used)]
//! Secrets whose characters mean something where they land (issue #15 item 7). Where they enter:
//! `seeder publish` refuses a generated secret holding a newline or a `$$`, naming the file and
//! the character class, never the value, and publishes nothing. Where they land, for any value
//! the role filters accept: the reference roles' `ai-memory.env` line stays one literal line, and
//! the reference pg role's SQL, run by the real psql against a throwaway PostgreSQL cluster, sets
//! exactly that password (the `ai_memory` role logs in with it).

mod common;

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::*;
use hiveseed_proto::manifest::FileContent;
use hiveseed_proto::Resource;
use hiveseed_seeder::fleet::Fleet;
use hiveseed_seeder::render::{read_role_tree, Renderer};
use hiveseed_seeder::state::placeholder_facts;
use hiveseed_seeder::store::Store;

const PG_NODE: &str = "do-1461-pg-nyc3-01";
const PEER_NODE: &str = "do-1461-peer-nyc3-01";

#[test]
fn publish_refuses_a_secret_with_a_newline_or_dollars_and_publishes_nothing() {
    let c = Campaign::new("s1");
    let store = || Store::open(&c.dir.join("state.db")).unwrap();
    assert!(store().latest_inputs().unwrap().is_none());
    for (file, value, class) in [
        (
            "secrets/pg-password",
            "Sv3tPw\nAI_MEMORY_FED_REQUIRE_SIG=0",
            "a newline",
        ),
        ("secrets/pg-password", "Sv3tPw$$", "a dollar sign"),
        ("secrets/api-key", "Sv3tKey\nX=1", "a newline"),
    ] {
        let path = c.dir.join(file);
        let good = std::fs::read(&path).unwrap();
        std::fs::write(&path, format!("{value}\n")).unwrap();
        let (ok, out) = c.publish();
        assert!(!ok, "{file} {value:?}: publish succeeded: {out}");
        assert!(
            out.contains(&path.display().to_string()) && out.contains(class),
            "{file} {value:?}: the error does not name the file and {class}: {out}"
        );
        assert!(!out.contains("Sv3t"), "the secret leaked: {out}");
        assert!(
            store().latest_inputs().unwrap().is_none(),
            "{file} {value:?}: inputs were published"
        );
        std::fs::write(&path, good).unwrap();
    }
    // The same campaign with its generated secrets back publishes.
    let (ok, out) = c.publish();
    assert!(ok, "{out}");
    assert!(store().latest_inputs().unwrap().is_some());
}

fn roles_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../roles")
}

/// The reference fleet's resources for `node`, rendered with `pg_password`.
fn render(node: &str, pg_password: &str) -> Result<Vec<Resource>, String> {
    let text = std::fs::read_to_string(roles_dir().join("fleet.example.toml")).unwrap();
    let fleet = Fleet::parse(&text).unwrap();
    let roles = read_role_tree(&roles_dir()).unwrap();
    let secrets = [
        ("pg_password".to_owned(), pg_password.to_owned()),
        ("api_key".to_owned(), "k".to_owned()),
    ]
    .into_iter()
    .chain(
        fleet
            .llm_key_env()
            .map(|_| ("llm_api_key".to_owned(), "k".to_owned())),
    )
    .collect();
    let facts = placeholder_facts(&fleet, secrets);
    let spec = fleet.node(&node.parse().unwrap()).unwrap();
    Renderer::new(&fleet, &roles)
        .resources(spec, &facts)
        .map(|r| r.expect("every node is enrolled"))
        .map_err(|e| format!("{e:#}"))
}

fn file_text<'a>(res: &'a [Resource], id: &str) -> &'a str {
    match res.iter().find(|r| r.id().as_str() == id) {
        Some(Resource::File(f)) => match &f.content {
            FileContent::Text { text } => text,
            other => panic!("{id}: {other:?}"),
        },
        other => panic!("{id}: {other:?}"),
    }
}

/// A password systemd would read literally only inside single quotes.
const AWKWARD: &str = "a$$b $HOME \"c\" \\d #e ;f `g`";

#[test]
fn the_environment_file_carries_any_password_on_one_literal_line_or_refuses_it() {
    for bad in ["Sv3t\nAI_MEMORY_FED_REQUIRE_SIG=0", "Sv3t'x", "Sv3t\r"] {
        match render(PEER_NODE, bad) {
            Ok(res) => {
                let lines: Vec<&str> = file_text(&res, "file:env")
                    .lines()
                    .filter(|l| l.contains("Sv3t") || l.contains("REQUIRE_SIG"))
                    .collect();
                panic!("{bad:?} rendered into ai-memory.env as {lines:?}");
            }
            Err(err) => {
                assert!(
                    err.contains("file:env") && err.contains("env_value"),
                    "{bad:?}: {err}"
                );
                assert!(!err.contains("Sv3t"), "the secret leaked: {err}");
            }
        }
    }

    let res = render(PEER_NODE, AWKWARD).unwrap();
    let env = file_text(&res, "file:env");
    let lines: Vec<&str> = env
        .lines()
        .filter(|l| l.starts_with("PGPASSWORD="))
        .collect();
    assert_eq!(lines, [format!("PGPASSWORD='{AWKWARD}'")]);
}

/// A throwaway cluster on a unix socket only: `postgres` trusted, everyone else by password.
struct Cluster {
    bins: hiveseed_test_deps::Postgres,
    dir: tempfile::TempDir,
}

impl Cluster {
    fn start(bins: hiveseed_test_deps::Postgres) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let (uid, gid) = bins.user;
        std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid)).unwrap();
        let c = Self { bins, dir };
        c.run_as_postgres(
            &c.pg_bin("initdb"),
            &["-D", &c.data(), "-U", "postgres", "-A", "trust"],
        );
        std::fs::write(
            Path::new(&c.data()).join("pg_hba.conf"),
            "local all postgres trust\nlocal all all scram-sha-256\n",
        )
        .unwrap();
        let opts = format!(
            "-c listen_addresses='' -c unix_socket_directories={}",
            c.dir.path().display()
        );
        // -w: pg_ctl returns once the server accepts sessions.
        c.run_as_postgres(
            &c.pg_bin("pg_ctl"),
            &[
                "start",
                "-w",
                "-t",
                "60",
                "-D",
                &c.data(),
                "-l",
                &c.log(),
                "-o",
                &opts,
            ],
        );
        c
    }

    fn pg_bin(&self, name: &str) -> PathBuf {
        self.bins.initdb.parent().unwrap().join(name)
    }

    fn data(&self) -> String {
        self.dir.path().join("data").display().to_string()
    }

    fn log(&self) -> String {
        self.dir.path().join("postgres.log").display().to_string()
    }

    fn run_as_postgres(&self, prog: &Path, args: &[&str]) {
        let out = Command::new(prog)
            .args(args)
            .uid(self.bins.user.0)
            .gid(self.bins.user.1)
            .current_dir(self.dir.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{} {args:?}: {}",
            prog.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// psql over the socket as `user`, the script on stdin: (success, stdout, stderr).
    fn psql(&self, user: &str, password: Option<&str>, script: &str) -> (bool, String, String) {
        use std::io::Write;
        let mut cmd = Command::new(&self.bins.psql);
        cmd.args([
            "-X",
            "-q",
            "-tA",
            "-v",
            "ON_ERROR_STOP=1",
            "-d",
            "postgres",
            "-f",
            "-",
        ])
        .args(["-h", &self.dir.path().display().to_string(), "-U", user])
        .env_remove("PGPASSWORD")
        .uid(self.bins.user.0)
        .gid(self.bins.user.1)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        if let Some(p) = password {
            cmd.env("PGPASSWORD", p);
        }
        let mut child = cmd.spawn().unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(script.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = Command::new(self.pg_bin("pg_ctl"))
            .args(["stop", "-m", "immediate", "-D", &self.data()])
            .uid(self.bins.user.0)
            .gid(self.bins.user.1)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

#[test]
fn the_pg_role_sql_sets_exactly_the_password_whatever_it_holds() {
    let Some(bins) = hiveseed_test_deps::postgres() else {
        return;
    };
    let cluster = Cluster::start(bins);
    for password in [
        AWKWARD,
        "x$$y",
        "pw$hs",
        "$hs$'; ALTER ROLE postgres NOLOGIN; --",
    ] {
        let res = render(PG_NODE, password).unwrap();
        let Some(Resource::Command(cmd)) = res.iter().find(|r| r.id().as_str() == "cmd:sql-role")
        else {
            panic!("no cmd:sql-role")
        };
        let stdin = cmd.stdin.as_deref().expect("the password goes on stdin");
        let (ok, out, err) = cluster.psql("postgres", None, stdin);
        assert!(ok, "{password:?}: the role's SQL failed: {out}{err}");
        let (ok, out, err) = cluster.psql("ai_memory", Some(password), "SELECT current_user;");
        assert!(
            ok && out.trim() == "ai_memory",
            "{password:?}: ai_memory cannot log in with it: {out}{err}"
        );
        let (ok, _, _) = cluster.psql("ai_memory", Some("wrong"), "SELECT 1;");
        assert!(!ok, "{password:?}: a wrong password logs in too");
        let (ok, out, err) = cluster.psql(
            "postgres",
            None,
            "SELECT rolcanlogin FROM pg_roles WHERE rolname = 'postgres';",
        );
        assert!(
            ok && out.trim() == "t",
            "{password:?}: postgres lost LOGIN: {out}{err}"
        );
    }
}
