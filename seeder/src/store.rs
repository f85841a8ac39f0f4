//! The seeder's state in SQLite (one WAL file in the campaign directory): published inputs,
//! enrollments, certificates issued and revoked, manifests by generation, reports, events.
//!
//! Every mutation is one transaction, so a seeder killed at any point restarts on consistent state.

use std::path::Path;
use std::sync::Mutex;

use hiveseed_proto::status::StatusReport;
use hiveseed_proto::{Generation, NodeName, Sha256};
use rusqlite::{params, Connection, OptionalExtension};
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("state database")]
    Sqlite(#[from] rusqlite::Error),
    #[error("state database holds an unreadable value in {what}: {message}")]
    Corrupt { what: &'static str, message: String },
    #[error("{what} {value} does not fit the state database's signed 64-bit integers")]
    OutOfRange { what: &'static str, value: u64 },
    #[error("state database {path}")]
    Io {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
}

type Result<T> = std::result::Result<T, StoreError>;

fn corrupt(what: &'static str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt {
        what,
        message: e.to_string(),
    }
}

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS inputs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    digest TEXT NOT NULL,
    fleet TEXT NOT NULL,
    roles TEXT NOT NULL,
    published_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS enrollments (
    node TEXT PRIMARY KEY,
    droplet_id INTEGER NOT NULL,
    public_ip TEXT NOT NULL,
    private_ip TEXT NOT NULL,
    identity_fpr TEXT NOT NULL,
    key_fpr TEXT NOT NULL,
    token_nonce TEXT NOT NULL,
    enrolled_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS certs (
    fpr TEXT PRIMARY KEY,
    node TEXT NOT NULL,
    purpose TEXT NOT NULL,
    pem TEXT NOT NULL,
    issued_at INTEGER NOT NULL,
    not_after INTEGER NOT NULL,
    revoked_at INTEGER
);
CREATE INDEX IF NOT EXISTS certs_node ON certs(node, purpose);
CREATE INDEX IF NOT EXISTS enrollments_private_ip ON enrollments(private_ip);
CREATE INDEX IF NOT EXISTS enrollments_public_ip ON enrollments(public_ip);
CREATE TABLE IF NOT EXISTS manifests (
    node TEXT PRIMARY KEY,
    generation INTEGER NOT NULL,
    digest TEXT NOT NULL,
    envelope TEXT NOT NULL,
    published_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS reports (
    node TEXT PRIMARY KEY,
    seq INTEGER NOT NULL,
    received_at INTEGER NOT NULL,
    report TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS report_log (
    node TEXT NOT NULL,
    seq INTEGER NOT NULL,
    received_at INTEGER NOT NULL,
    report TEXT NOT NULL,
    PRIMARY KEY (node, seq)
);
-- Reports of a node's earlier identities (a replaced droplet starts its sequence again).
CREATE TABLE IF NOT EXISTS report_archive (
    node TEXT NOT NULL,
    seq INTEGER NOT NULL,
    received_at INTEGER NOT NULL,
    report TEXT NOT NULL,
    superseded_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at INTEGER NOT NULL,
    node TEXT,
    kind TEXT NOT NULL,
    message TEXT NOT NULL
);
-- Refused requests, one row per source, kind and minute with a count (see `record_refusal`).
CREATE TABLE IF NOT EXISTS refusals (
    source TEXT NOT NULL,
    kind TEXT NOT NULL,
    minute INTEGER NOT NULL,
    node TEXT,
    count INTEGER NOT NULL,
    first_at INTEGER NOT NULL,
    last_at INTEGER NOT NULL,
    PRIMARY KEY (source, kind, minute)
);
CREATE INDEX IF NOT EXISTS refusals_last_at ON refusals(last_at);
-- The latest join token minted for each node (`seeder tfvars`). issued_at and nonce are NULL in
-- rows minted before they were recorded (see `migrate`).
CREATE TABLE IF NOT EXISTS tokens (
    node TEXT PRIMARY KEY,
    token TEXT NOT NULL,
    exp INTEGER NOT NULL,
    issued_at INTEGER,
    nonce TEXT
);
-- Join tokens consumed by an enrollment: one row per token (a token is its node and nonce), bound
-- to the key that used it and the identity certificate issued then. The primary key is what makes
-- a token single use, across seeder processes sharing this file.
CREATE TABLE IF NOT EXISTS token_uses (
    node TEXT NOT NULL,
    nonce TEXT NOT NULL,
    key_fpr TEXT NOT NULL,
    cert_fpr TEXT NOT NULL,
    used_at INTEGER NOT NULL,
    PRIMARY KEY (node, nonce)
);
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS artifacts (
    sha256 TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    size INTEGER NOT NULL,
    added_at INTEGER NOT NULL
);
"#;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Enrollment {
    pub node: NodeName,
    pub droplet_id: u64,
    pub public_ip: std::net::Ipv4Addr,
    pub private_ip: std::net::Ipv4Addr,
    /// SHA-256 of the identity (enrollment) certificate's DER.
    pub identity_fpr: String,
    /// SHA-256 of the node's identity public key (SPKI), to tell a retry from a replacement.
    pub key_fpr: String,
    pub token_nonce: String,
    pub enrolled_at: u64,
}

/// A join token as `seeder tfvars` minted it. Never logged: the text is a credential.
#[derive(Clone, PartialEq, Eq)]
pub struct MintedToken {
    pub token: String,
    /// `None` for a token minted before nonces were recorded.
    pub nonce: Option<String>,
    /// Mint time, Unix seconds; `None` for a token minted before it was recorded.
    pub issued_at: Option<u64>,
    pub exp: u64,
}

impl std::fmt::Debug for MintedToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MintedToken")
            .field("token", &"<redacted>")
            .field("nonce", &self.nonce)
            .field("issued_at", &self.issued_at)
            .field("exp", &self.exp)
            .finish()
    }
}

/// The enrollment that consumed a join token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TokenUse {
    pub node: NodeName,
    pub nonce: String,
    /// The key that used it ([`Enrollment::key_fpr`]): the only key a retry may come with.
    pub key_fpr: String,
    /// The identity certificate issued by that enrollment, returned again to a retry.
    pub cert_fpr: String,
    pub used_at: u64,
}

/// What [`Store::enroll`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Enrolled {
    /// Stored; the fingerprints of the certificates it revoked.
    Stored(Vec<String>),
    /// Nothing stored: the token was consumed already (by another seeder process, or a
    /// concurrent request), by this use.
    TokenUsed(TokenUse),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertRecord {
    pub fpr: String,
    pub node: NodeName,
    pub purpose: String,
    pub pem: String,
    pub issued_at: u64,
    pub not_after: u64,
    pub revoked_at: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StoredManifest {
    pub node: NodeName,
    pub generation: Generation,
    pub digest: Sha256,
    /// The signed envelope, JSON, exactly as served.
    pub envelope: String,
    pub published_at: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Event {
    pub id: i64,
    pub at: u64,
    pub node: Option<String>,
    pub kind: String,
    pub message: String,
}

/// Refusals of one kind from one source within one minute.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Refusal {
    pub source: std::net::IpAddr,
    /// A short stable tag such as `token_expired` or `rate_limited`.
    pub kind: String,
    /// Start of the minute, Unix seconds.
    pub minute: u64,
    /// The node the last of these requests named, when it named a valid one.
    pub node: Option<String>,
    pub count: u64,
    pub first_at: u64,
    pub last_at: u64,
}

/// The most refusal rows kept; past it the least recently refused rows are dropped, so a flood
/// from many sources cannot grow the state database without bound.
pub const MAX_REFUSAL_ROWS: u64 = 10_000;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublishedInputs {
    pub id: i64,
    pub digest: Sha256,
    /// fleet.toml text.
    pub fleet: String,
    /// Role files and templates: relative path → text, JSON object.
    pub roles: String,
    pub published_at: u64,
}

/// What happened to a report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReportFate {
    Stored,
    /// Already stored (a spooled resend): accepted, changes nothing.
    Duplicate,
}

#[derive(Debug)]
pub struct Store {
    conn: Mutex<Connection>,
}

fn node_name(s: String) -> Result<NodeName> {
    s.parse().map_err(|e| corrupt("node name", e))
}

impl Store {
    /// Opens (creating) the state database, 0600: it holds signed manifests, and a manifest
    /// carries its node's secret files. SQLite gives the -wal and -shm files the same mode.
    pub fn open(path: &Path) -> Result<Self> {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        let private = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(path)
            .and_then(|f| f.set_permissions(std::fs::Permissions::from_mode(0o600)));
        if let Err(e) = private {
            return Err(StoreError::Io {
                path: path.to_path_buf(),
                source: e,
            });
        }
        let conn = Connection::open(path)?;
        Self::setup(conn)
    }

    pub fn open_in_memory() -> Result<Self> {
        Self::setup(Connection::open_in_memory()?)
    }

    fn setup(mut conn: Connection) -> Result<Self> {
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.busy_timeout(std::time::Duration::from_secs(10))?;
        conn.execute_batch(SCHEMA)?;
        migrate(&mut conn)?;
        Ok(Self {
            conn: Mutex::new(conn),
        })
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave SQLite inconsistent (transactions roll back).
        self.conn.lock().unwrap_or_else(|e| e.into_inner())
    }

    // ---- inputs ----

    pub fn publish_inputs(
        &self,
        digest: Sha256,
        fleet: &str,
        roles: &str,
        now: u64,
    ) -> Result<PublishedInputs> {
        let conn = self.conn();
        if let Some(cur) = latest_inputs(&conn)? {
            if cur.digest == digest {
                return Ok(cur);
            }
        }
        conn.execute(
            "INSERT INTO inputs (digest, fleet, roles, published_at) VALUES (?1, ?2, ?3, ?4)",
            params![digest.to_hex(), fleet, roles, now as i64],
        )?;
        Ok(latest_inputs(&conn)?.expect("just inserted"))
    }

    pub fn latest_inputs(&self) -> Result<Option<PublishedInputs>> {
        latest_inputs(&self.conn())
    }

    // ---- enrollments and certificates ----

    pub fn enrollment(&self, node: &NodeName) -> Result<Option<Enrollment>> {
        let conn = self.conn();
        conn.query_row(
            "SELECT node, droplet_id, public_ip, private_ip, identity_fpr, key_fpr, token_nonce, enrolled_at
             FROM enrollments WHERE node = ?1",
            params![node.as_str()],
            row_enrollment,
        )
        .optional()?
        .transpose()
    }

    /// The enrollments of nodes other than `except` that hold `ip` as their private or public
    /// address (indexed: one lookup per enrollment, however large the fleet).
    pub fn enrollments_with_address(
        &self,
        ip: std::net::Ipv4Addr,
        except: &NodeName,
    ) -> Result<Vec<Enrollment>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT node, droplet_id, public_ip, private_ip, identity_fpr, key_fpr, token_nonce, enrolled_at
             FROM enrollments WHERE private_ip = ?1 AND node != ?2
             UNION
             SELECT node, droplet_id, public_ip, private_ip, identity_fpr, key_fpr, token_nonce, enrolled_at
             FROM enrollments WHERE public_ip = ?1 AND node != ?2",
        )?;
        let rows = stmt.query_map(params![ip.to_string(), except.as_str()], row_enrollment)?;
        rows.map(|r| r?).collect()
    }

    /// The enrollments of nodes other than `except` bound to droplet `droplet_id`.
    pub fn enrollments_with_droplet(
        &self,
        droplet_id: u64,
        except: &NodeName,
    ) -> Result<Vec<Enrollment>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT node, droplet_id, public_ip, private_ip, identity_fpr, key_fpr, token_nonce, enrolled_at
             FROM enrollments WHERE droplet_id = ?1 AND node != ?2 ORDER BY node",
        )?;
        let rows = stmt.query_map(params![droplet_id as i64, except.as_str()], row_enrollment)?;
        rows.map(|r| r?).collect()
    }

    pub fn enrollments(&self) -> Result<Vec<Enrollment>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT node, droplet_id, public_ip, private_ip, identity_fpr, key_fpr, token_nonce, enrolled_at
             FROM enrollments ORDER BY node",
        )?;
        let rows = stmt.query_map([], row_enrollment)?;
        rows.map(|r| r?).collect()
    }

    /// Records an enrollment and its identity certificate in one transaction, revoking every
    /// earlier certificate of that node (a replacement supersedes the old identity) and consuming
    /// its join token (`e.token_nonce`), first: a token consumed already stores nothing.
    pub fn enroll(&self, e: &Enrollment, cert: &CertRecord) -> Result<Enrolled> {
        let mut conn = self.conn();
        // IMMEDIATE: the write lock is taken before the token's row is looked at, so two
        // processes cannot both find the token unused.
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let consumed = tx.execute(
            "INSERT INTO token_uses (node, nonce, key_fpr, cert_fpr, used_at) VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT(node, nonce) DO NOTHING",
            params![
                e.node.as_str(),
                e.token_nonce,
                e.key_fpr,
                cert.fpr,
                e.enrolled_at as i64
            ],
        )?;
        if consumed == 0 {
            let used = token_use(&tx, &e.node, &e.token_nonce)?
                .ok_or_else(|| corrupt("token_uses", "a conflicting row is not there"))?;
            return Ok(Enrolled::TokenUsed(used));
        }
        let revoked: Vec<String> = {
            let mut stmt = tx.prepare(
                "SELECT fpr FROM certs WHERE node = ?1 AND revoked_at IS NULL ORDER BY issued_at",
            )?;
            let rows = stmt.query_map(params![e.node.as_str()], |r| r.get::<_, String>(0))?;
            rows.collect::<std::result::Result<_, _>>()?
        };
        tx.execute(
            "UPDATE certs SET revoked_at = ?2 WHERE node = ?1 AND revoked_at IS NULL",
            params![e.node.as_str(), e.enrolled_at as i64],
        )?;
        tx.execute(
            "INSERT INTO enrollments (node, droplet_id, public_ip, private_ip, identity_fpr, key_fpr, token_nonce, enrolled_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
             ON CONFLICT(node) DO UPDATE SET droplet_id=excluded.droplet_id, public_ip=excluded.public_ip,
               private_ip=excluded.private_ip, identity_fpr=excluded.identity_fpr, key_fpr=excluded.key_fpr,
               token_nonce=excluded.token_nonce, enrolled_at=excluded.enrolled_at",
            params![
                e.node.as_str(),
                e.droplet_id as i64,
                e.public_ip.to_string(),
                e.private_ip.to_string(),
                e.identity_fpr,
                e.key_fpr,
                e.token_nonce,
                e.enrolled_at as i64
            ],
        )?;
        insert_cert(&tx, cert)?;
        // A new identity starts a new report sequence: the old one's log moves to the archive,
        // or the new agent's reports would be taken for resends of numbers already held.
        tx.execute(
            "DELETE FROM reports WHERE node = ?1",
            params![e.node.as_str()],
        )?;
        tx.execute(
            "INSERT INTO report_archive (node, seq, received_at, report, superseded_at)
             SELECT node, seq, received_at, report, ?2 FROM report_log WHERE node = ?1",
            params![e.node.as_str(), e.enrolled_at as i64],
        )?;
        tx.execute(
            "DELETE FROM report_log WHERE node = ?1",
            params![e.node.as_str()],
        )?;
        tx.commit()?;
        Ok(Enrolled::Stored(revoked))
    }

    /// The enrollment that consumed node's token `nonce`, if one did.
    pub fn token_use(&self, node: &NodeName, nonce: &str) -> Result<Option<TokenUse>> {
        token_use(&self.conn(), node, nonce)
    }

    /// Points a node's enrollment at its renewed identity certificate.
    pub fn set_identity(&self, node: &NodeName, fpr: &str) -> Result<()> {
        let conn = self.conn();
        conn.execute(
            "UPDATE enrollments SET identity_fpr = ?2 WHERE node = ?1",
            params![node.as_str(), fpr],
        )?;
        Ok(())
    }

    pub fn add_cert(&self, cert: &CertRecord) -> Result<()> {
        let conn = self.conn();
        insert_cert(&conn, cert)
    }

    /// Supersedes a node's earlier certificates of one purpose by a new one.
    pub fn replace_cert(&self, cert: &CertRecord) -> Result<()> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        tx.execute(
            "UPDATE certs SET revoked_at = ?3 WHERE node = ?1 AND purpose = ?2 AND revoked_at IS NULL",
            params![cert.node.as_str(), cert.purpose, cert.issued_at as i64],
        )?;
        insert_cert(&tx, cert)?;
        tx.commit()?;
        Ok(())
    }

    pub fn cert(&self, fpr: &str) -> Result<Option<CertRecord>> {
        let conn = self.conn();
        conn.query_row(
            "SELECT fpr, node, purpose, pem, issued_at, not_after, revoked_at FROM certs WHERE fpr = ?1",
            params![fpr],
            row_cert,
        )
        .optional()?
        .transpose()
    }

    /// Current (unrevoked) certificates of a purpose, newest per node.
    pub fn current_certs(&self, purpose: &str) -> Result<Vec<CertRecord>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT fpr, node, purpose, pem, issued_at, not_after, revoked_at FROM certs
             WHERE purpose = ?1 AND revoked_at IS NULL ORDER BY node, issued_at DESC",
        )?;
        let rows = stmt.query_map(params![purpose], row_cert)?;
        let mut out: Vec<CertRecord> = Vec::new();
        for r in rows {
            let c = r??;
            if out.last().map(|l| l.node != c.node).unwrap_or(true) {
                out.push(c);
            }
        }
        Ok(out)
    }

    /// Revokes every certificate of a node and forgets its enrollment. Returns how many were revoked.
    pub fn revoke_node(&self, node: &NodeName, now: u64) -> Result<usize> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let n = tx.execute(
            "UPDATE certs SET revoked_at = ?2 WHERE node = ?1 AND revoked_at IS NULL",
            params![node.as_str(), now as i64],
        )?;
        tx.execute(
            "DELETE FROM enrollments WHERE node = ?1",
            params![node.as_str()],
        )?;
        tx.commit()?;
        Ok(n)
    }

    // ---- manifests ----

    pub fn manifest(&self, node: &NodeName) -> Result<Option<StoredManifest>> {
        let conn = self.conn();
        conn.query_row(
            "SELECT node, generation, digest, envelope, published_at FROM manifests WHERE node = ?1",
            params![node.as_str()],
            row_manifest,
        )
        .optional()?
        .transpose()
    }

    pub fn manifests(&self) -> Result<Vec<StoredManifest>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT node, generation, digest, envelope, published_at FROM manifests ORDER BY node",
        )?;
        let rows = stmt.query_map([], row_manifest)?;
        rows.map(|r| r?).collect()
    }

    /// The generation a new manifest for `node` with `digest` gets: unchanged when the digest is
    /// the current one, else current + 1 (1 for the first).
    pub fn next_generation(&self, node: &NodeName, digest: &Sha256) -> Result<(Generation, bool)> {
        Ok(match self.manifest(node)? {
            Some(m) if &m.digest == digest => (m.generation, false),
            Some(m) => (m.generation.next(), true),
            None => (Generation(1), true),
        })
    }

    pub fn put_manifest(&self, m: &StoredManifest) -> Result<()> {
        let conn = self.conn();
        conn.execute(
            "INSERT INTO manifests (node, generation, digest, envelope, published_at) VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT(node) DO UPDATE SET generation=excluded.generation, digest=excluded.digest,
               envelope=excluded.envelope, published_at=excluded.published_at",
            params![
                m.node.as_str(),
                m.generation.0 as i64,
                m.digest.to_hex(),
                m.envelope,
                m.published_at as i64
            ],
        )?;
        Ok(())
    }

    /// Manifests and their generation events, in one transaction.
    pub fn put_manifests(
        &self,
        manifests: &[StoredManifest],
        events: &[(NodeName, String)],
        at: u64,
    ) -> Result<()> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        {
            let mut put = tx.prepare_cached(
                "INSERT INTO manifests (node, generation, digest, envelope, published_at) VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT(node) DO UPDATE SET generation=excluded.generation, digest=excluded.digest,
                   envelope=excluded.envelope, published_at=excluded.published_at",
            )?;
            for m in manifests {
                put.execute(params![
                    m.node.as_str(),
                    m.generation.0 as i64,
                    m.digest.to_hex(),
                    m.envelope,
                    m.published_at as i64
                ])?;
            }
            let mut ev = tx.prepare_cached(
                "INSERT INTO events (at, node, kind, message) VALUES (?1, ?2, 'generation', ?3)",
            )?;
            for (node, msg) in events {
                ev.execute(params![at as i64, node.as_str(), msg])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    // ---- reports ----

    pub fn put_report(&self, report: &StatusReport, now: u64) -> Result<ReportFate> {
        // A seq that does not fit would wrap negative and freeze the view; the API refuses it
        // first (`StatusReport::validate`), this keeps any other caller from storing it.
        let seq = i64::try_from(report.seq).map_err(|_| StoreError::OutOfRange {
            what: "report seq",
            value: report.seq,
        })?;
        let json = serde_json::to_string(report).map_err(|e| corrupt("report", e))?;
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let inserted = tx.execute(
            "INSERT OR IGNORE INTO report_log (node, seq, received_at, report) VALUES (?1, ?2, ?3, ?4)",
            params![report.node.as_str(), seq, now as i64, json],
        )?;
        if inserted == 0 {
            tx.commit()?;
            return Ok(ReportFate::Duplicate);
        }
        // The latest view only moves forward: a spooled older report fills the log, not the view.
        tx.execute(
            "INSERT INTO reports (node, seq, received_at, report) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT(node) DO UPDATE SET seq=excluded.seq, received_at=excluded.received_at, report=excluded.report
             WHERE excluded.seq > reports.seq",
            params![report.node.as_str(), seq, now as i64, json],
        )?;
        tx.commit()?;
        Ok(ReportFate::Stored)
    }

    /// The latest report of every node with its receive time.
    pub fn latest_reports(&self) -> Result<Vec<(StatusReport, u64)>> {
        let conn = self.conn();
        let mut stmt = conn.prepare("SELECT report, received_at FROM reports ORDER BY node")?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?;
        let mut out = Vec::new();
        for r in rows {
            let (json, at) = r?;
            let rep: StatusReport =
                serde_json::from_str(&json).map_err(|e| corrupt("report", e))?;
            out.push((rep, at as u64));
        }
        Ok(out)
    }

    pub fn latest_report(&self, node: &NodeName) -> Result<Option<(StatusReport, u64)>> {
        let conn = self.conn();
        let row: Option<(String, i64)> = conn
            .query_row(
                "SELECT report, received_at FROM reports WHERE node = ?1",
                params![node.as_str()],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        row.map(|(json, at)| {
            serde_json::from_str(&json)
                .map(|r| (r, at as u64))
                .map_err(|e| corrupt("report", e))
        })
        .transpose()
    }

    pub fn report_seqs(&self, node: &NodeName) -> Result<Vec<u64>> {
        let conn = self.conn();
        let mut stmt = conn.prepare("SELECT seq FROM report_log WHERE node = ?1 ORDER BY seq")?;
        let rows = stmt.query_map(params![node.as_str()], |r| r.get::<_, i64>(0))?;
        rows.map(|r| Ok(r? as u64)).collect()
    }

    // ---- events ----

    pub fn event(&self, at: u64, node: Option<&NodeName>, kind: &str, message: &str) -> Result<()> {
        let conn = self.conn();
        conn.execute(
            "INSERT INTO events (at, node, kind, message) VALUES (?1, ?2, ?3, ?4)",
            params![at as i64, node.map(|n| n.as_str()), kind, message],
        )?;
        Ok(())
    }

    pub fn events(&self, limit: u32) -> Result<Vec<Event>> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare("SELECT id, at, node, kind, message FROM events ORDER BY id DESC LIMIT ?1")?;
        let rows = stmt.query_map(params![limit], |r| {
            Ok(Event {
                id: r.get(0)?,
                at: r.get::<_, i64>(1)? as u64,
                node: r.get(2)?,
                kind: r.get(3)?,
                message: r.get(4)?,
            })
        })?;
        rows.map(|r| r.map_err(StoreError::from)).collect()
    }

    // ---- refusals ----

    /// Counts one refused request of `kind` from `source` (naming `node`, if a valid one) at
    /// `at`, in the row of its source, kind and minute. Returns that row's count so far.
    pub fn record_refusal(
        &self,
        at: u64,
        source: std::net::IpAddr,
        kind: &str,
        node: Option<&NodeName>,
    ) -> Result<u64> {
        self.record_refusal_capped(at, source, kind, node, MAX_REFUSAL_ROWS)
    }

    fn record_refusal_capped(
        &self,
        at: u64,
        source: std::net::IpAddr,
        kind: &str,
        node: Option<&NodeName>,
        cap: u64,
    ) -> Result<u64> {
        let minute = (at - at % 60) as i64;
        let source = source.to_string();
        let node = node.map(|n| n.as_str());
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let count: Option<i64> = tx
            .query_row(
                "UPDATE refusals SET count = count + 1, last_at = ?4, node = coalesce(?5, node)
                 WHERE source = ?1 AND kind = ?2 AND minute = ?3 RETURNING count",
                params![source, kind, minute, at as i64, node],
                |r| r.get(0),
            )
            .optional()?;
        let count = match count {
            Some(c) => c as u64,
            None => {
                tx.execute(
                    "INSERT INTO refusals (source, kind, minute, node, count, first_at, last_at)
                     VALUES (?1, ?2, ?3, ?4, 1, ?5, ?5)",
                    params![source, kind, minute, node, at as i64],
                )?;
                // Only a new row can pass the cap: drop the least recently refused rows.
                tx.execute(
                    "DELETE FROM refusals WHERE rowid IN (
                         SELECT rowid FROM refusals ORDER BY last_at, rowid
                         LIMIT max(0, (SELECT count(*) FROM refusals) - ?1))",
                    params![cap as i64],
                )?;
                1
            }
        };
        tx.commit()?;
        Ok(count)
    }

    /// Refusal rows, most recent first.
    pub fn refusals(&self, limit: u32) -> Result<Vec<Refusal>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT source, kind, minute, node, count, first_at, last_at FROM refusals
             ORDER BY last_at DESC, rowid DESC LIMIT ?1",
        )?;
        let rows = stmt.query_map(params![limit], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, i64>(2)?,
                r.get::<_, Option<String>>(3)?,
                [
                    r.get::<_, i64>(4)?,
                    r.get::<_, i64>(5)?,
                    r.get::<_, i64>(6)?,
                ],
            ))
        })?;
        rows.map(|r| {
            let (source, kind, minute, node, [count, first_at, last_at]) = r?;
            Ok(Refusal {
                source: source.parse().map_err(|e| corrupt("refusal source", e))?,
                kind,
                minute: minute as u64,
                node,
                count: count as u64,
                first_at: first_at as u64,
                last_at: last_at as u64,
            })
        })
        .collect()
    }

    // ---- meta ----

    pub fn meta(&self, key: &str) -> Result<Option<String>> {
        let conn = self.conn();
        Ok(conn
            .query_row("SELECT value FROM meta WHERE key = ?1", params![key], |r| {
                r.get(0)
            })
            .optional()?)
    }

    pub fn set_meta(&self, key: &str, value: &str) -> Result<()> {
        let conn = self.conn();
        conn.execute(
            "INSERT INTO meta (key, value) VALUES (?1, ?2) ON CONFLICT(key) DO UPDATE SET value=excluded.value",
            params![key, value],
        )?;
        Ok(())
    }

    // ---- tokens and artifacts ----

    /// The latest token minted for `node`.
    pub fn token(&self, node: &NodeName) -> Result<Option<MintedToken>> {
        let conn = self.conn();
        Ok(conn
            .query_row(
                "SELECT token, nonce, issued_at, exp FROM tokens WHERE node = ?1",
                params![node.as_str()],
                |r| {
                    Ok(MintedToken {
                        token: r.get(0)?,
                        nonce: r.get(1)?,
                        issued_at: r.get::<_, Option<i64>>(2)?.map(|v| v as u64),
                        exp: r.get::<_, i64>(3)? as u64,
                    })
                },
            )
            .optional()?)
    }

    /// When node's token `nonce` was minted, if it is the node's latest token and its mint
    /// time was recorded.
    pub fn token_minted_at(&self, node: &NodeName, nonce: &str) -> Result<Option<u64>> {
        let conn = self.conn();
        Ok(conn
            .query_row(
                "SELECT issued_at FROM tokens WHERE node = ?1 AND nonce = ?2",
                params![node.as_str(), nonce],
                |r| r.get::<_, Option<i64>>(0),
            )
            .optional()?
            .flatten()
            .map(|v| v as u64))
    }

    pub fn put_token(&self, node: &NodeName, t: &MintedToken) -> Result<()> {
        let conn = self.conn();
        conn.execute(
            "INSERT INTO tokens (node, token, exp, issued_at, nonce) VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT(node) DO UPDATE SET token=excluded.token, exp=excluded.exp,
               issued_at=excluded.issued_at, nonce=excluded.nonce",
            params![
                node.as_str(),
                t.token,
                t.exp as i64,
                t.issued_at.map(|v| v as i64),
                t.nonce
            ],
        )?;
        Ok(())
    }

    pub fn put_artifact(&self, sha256: &Sha256, name: &str, size: u64, now: u64) -> Result<()> {
        let conn = self.conn();
        conn.execute(
            "INSERT INTO artifacts (sha256, name, size, added_at) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT(sha256) DO UPDATE SET name=excluded.name",
            params![sha256.to_hex(), name, size as i64, now as i64],
        )?;
        Ok(())
    }

    /// Artifacts by name: the newest added under each name.
    pub fn artifacts(&self) -> Result<Vec<(String, Sha256, u64)>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT name, sha256, size FROM artifacts a WHERE added_at = (SELECT max(added_at) FROM artifacts b WHERE b.name = a.name) ORDER BY name",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, i64>(2)?,
            ))
        })?;
        let mut out = Vec::new();
        for r in rows {
            let (name, sha, size) = r?;
            out.push((
                name,
                sha.parse().map_err(|e| corrupt("artifact sha256", e))?,
                size as u64,
            ));
        }
        Ok(out)
    }
}

/// Columns added to tables of [`SCHEMA`] since they were first made: (table, column, type).
const ADDED_COLUMNS: [(&str, &str, &str); 2] = [
    ("tokens", "issued_at", "INTEGER"),
    ("tokens", "nonce", "TEXT"),
];

/// Brings a store made by an earlier version up to [`SCHEMA`]: `CREATE TABLE IF NOT EXISTS`
/// makes new tables, columns added to an existing table are added here, under the write lock, so
/// two processes opening an old store do not both add one.
fn migrate(conn: &mut Connection) -> Result<()> {
    let missing = |c: &Connection| -> Result<Vec<(&str, &str, &str)>> {
        let mut out = Vec::new();
        for (table, column, decl) in ADDED_COLUMNS {
            let present: bool = c.query_row(
                "SELECT count(*) > 0 FROM pragma_table_info(?1) WHERE name = ?2",
                params![table, column],
                |r| r.get(0),
            )?;
            if !present {
                out.push((table, column, decl));
            }
        }
        Ok(out)
    };
    if missing(conn)?.is_empty() {
        return Ok(());
    }
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    for (table, column, decl) in missing(&tx)? {
        tx.execute_batch(&format!("ALTER TABLE {table} ADD COLUMN {column} {decl}"))?;
    }
    tx.commit()?;
    Ok(())
}

fn token_use(conn: &Connection, node: &NodeName, nonce: &str) -> Result<Option<TokenUse>> {
    conn.query_row(
        "SELECT key_fpr, cert_fpr, used_at FROM token_uses WHERE node = ?1 AND nonce = ?2",
        params![node.as_str(), nonce],
        |r| {
            Ok(TokenUse {
                node: node.clone(),
                nonce: nonce.to_owned(),
                key_fpr: r.get(0)?,
                cert_fpr: r.get(1)?,
                used_at: r.get::<_, i64>(2)? as u64,
            })
        },
    )
    .optional()
    .map_err(StoreError::from)
}

fn latest_inputs(conn: &Connection) -> Result<Option<PublishedInputs>> {
    let row: Option<(i64, String, String, String, i64)> = conn
        .query_row(
            "SELECT id, digest, fleet, roles, published_at FROM inputs ORDER BY id DESC LIMIT 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)),
        )
        .optional()?;
    row.map(|(id, digest, fleet, roles, at)| {
        Ok(PublishedInputs {
            id,
            digest: digest.parse().map_err(|e| corrupt("inputs digest", e))?,
            fleet,
            roles,
            published_at: at as u64,
        })
    })
    .transpose()
}

fn insert_cert(conn: &Connection, c: &CertRecord) -> Result<()> {
    conn.execute(
        "INSERT INTO certs (fpr, node, purpose, pem, issued_at, not_after, revoked_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        params![
            c.fpr,
            c.node.as_str(),
            c.purpose,
            c.pem,
            c.issued_at as i64,
            c.not_after as i64,
            c.revoked_at.map(|v| v as i64)
        ],
    )?;
    Ok(())
}

fn row_enrollment(r: &rusqlite::Row<'_>) -> rusqlite::Result<Result<Enrollment>> {
    let node: String = r.get(0)?;
    let public: String = r.get(2)?;
    let private: String = r.get(3)?;
    let e = (|| {
        Ok(Enrollment {
            node: node_name(node)?,
            droplet_id: r.get::<_, i64>(1).map_err(StoreError::from)? as u64,
            public_ip: public.parse().map_err(|e| corrupt("public_ip", e))?,
            private_ip: private.parse().map_err(|e| corrupt("private_ip", e))?,
            identity_fpr: r.get(4)?,
            key_fpr: r.get(5)?,
            token_nonce: r.get(6)?,
            enrolled_at: r.get::<_, i64>(7)? as u64,
        })
    })();
    Ok(e)
}

fn row_cert(r: &rusqlite::Row<'_>) -> rusqlite::Result<Result<CertRecord>> {
    let node: String = r.get(1)?;
    let c = (|| {
        Ok(CertRecord {
            fpr: r.get(0)?,
            node: node_name(node)?,
            purpose: r.get(2)?,
            pem: r.get(3)?,
            issued_at: r.get::<_, i64>(4)? as u64,
            not_after: r.get::<_, i64>(5)? as u64,
            revoked_at: r.get::<_, Option<i64>>(6)?.map(|v| v as u64),
        })
    })();
    Ok(c)
}

fn row_manifest(r: &rusqlite::Row<'_>) -> rusqlite::Result<Result<StoredManifest>> {
    let node: String = r.get(0)?;
    let digest: String = r.get(2)?;
    let m = (|| {
        Ok(StoredManifest {
            node: node_name(node)?,
            generation: Generation(r.get::<_, i64>(1)? as u64),
            digest: digest.parse().map_err(|e| corrupt("manifest digest", e))?,
            envelope: r.get(3)?,
            published_at: r.get::<_, i64>(4)? as u64,
        })
    })();
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;
    use hiveseed_proto::status::Phase;

    fn node() -> NodeName {
        "do-1461-peer-nyc3-01".parse().unwrap()
    }

    fn report(seq: u64) -> StatusReport {
        StatusReport {
            node: node(),
            seq,
            at: seq,
            phase: Phase::Converged,
            generation: None,
            digest: None,
            resources: vec![],
            services: Vec::new(),
            checks: vec![],
        }
    }

    #[test]
    fn reports_are_idempotent_and_the_view_only_moves_forward() {
        let s = Store::open_in_memory().unwrap();
        assert_eq!(s.put_report(&report(2), 10).unwrap(), ReportFate::Stored);
        assert_eq!(s.put_report(&report(2), 11).unwrap(), ReportFate::Duplicate);
        assert_eq!(s.put_report(&report(1), 12).unwrap(), ReportFate::Stored);
        assert_eq!(s.latest_report(&node()).unwrap().unwrap().0.seq, 2);
        assert_eq!(s.report_seqs(&node()).unwrap(), [1, 2]);
    }

    /// The suite's `curator_no_crashloop` reads restart counts from the stored latest report.
    #[test]
    fn restart_counts_are_kept_with_the_report() {
        let s = Store::open_in_memory().unwrap();
        let mut r = report(3);
        r.services = vec![hiveseed_proto::ServiceRestarts {
            unit: "ai-memory-curator.service".into(),
            restarts: 5,
        }];
        s.put_report(&r, 10).unwrap();
        let (latest, at) = s.latest_reports().unwrap().remove(0);
        assert_eq!((latest.services, at), (r.services, 10));
    }

    fn cert(fpr: &str, purpose: &str, at: u64) -> CertRecord {
        CertRecord {
            fpr: fpr.into(),
            node: node(),
            purpose: purpose.into(),
            pem: "pem".into(),
            issued_at: at,
            not_after: at + 100,
            revoked_at: None,
        }
    }

    fn enrollment(fpr: &str, at: u64) -> Enrollment {
        Enrollment {
            node: node(),
            droplet_id: 7,
            public_ip: "127.1.1.11".parse().unwrap(),
            private_ip: "127.0.1.11".parse().unwrap(),
            identity_fpr: fpr.into(),
            key_fpr: format!("k{fpr}"),
            token_nonce: format!("n{fpr}"),
            enrolled_at: at,
        }
    }

    #[test]
    fn re_enrollment_revokes_every_earlier_certificate() {
        let s = Store::open_in_memory().unwrap();
        s.enroll(&enrollment("a", 1), &cert("a", "identity", 1))
            .unwrap();
        s.add_cert(&cert("a-client", "client", 2)).unwrap();
        let revoked = s
            .enroll(&enrollment("b", 3), &cert("b", "identity", 3))
            .unwrap();
        assert_eq!(
            revoked,
            Enrolled::Stored(vec!["a".into(), "a-client".into()])
        );
        assert_eq!(s.cert("a").unwrap().unwrap().revoked_at, Some(3));
        assert_eq!(s.cert("b").unwrap().unwrap().revoked_at, None);
        assert!(s.current_certs("client").unwrap().is_empty());
        assert_eq!(s.enrollment(&node()).unwrap().unwrap().identity_fpr, "b");
    }

    #[test]
    fn a_consumed_token_stores_nothing_more() {
        let s = Store::open_in_memory().unwrap();
        s.enroll(&enrollment("a", 1), &cert("a", "identity", 1))
            .unwrap();
        let again = Enrollment {
            token_nonce: "na".into(),
            ..enrollment("b", 2)
        };
        let got = s.enroll(&again, &cert("b", "identity", 2)).unwrap();
        let want = TokenUse {
            node: node(),
            nonce: "na".into(),
            key_fpr: "ka".into(),
            cert_fpr: "a".into(),
            used_at: 1,
        };
        assert_eq!(got, Enrolled::TokenUsed(want.clone()));
        assert_eq!(s.token_use(&node(), "na").unwrap(), Some(want));
        assert_eq!(s.cert("b").unwrap(), None);
        assert_eq!(s.cert("a").unwrap().unwrap().revoked_at, None);
        assert_eq!(s.enrollment(&node()).unwrap().unwrap().identity_fpr, "a");
    }

    /// Several connections to one file, as several seeder processes would hold: of concurrent
    /// enrollments with one token and different keys exactly one is stored.
    #[test]
    fn one_token_is_consumed_once_across_connections() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        Store::open(&path).unwrap();
        let start = std::sync::Arc::new(std::sync::Barrier::new(8));
        let outcomes: Vec<Enrolled> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..8)
                .map(|i| {
                    let (path, start) = (path.clone(), start.clone());
                    scope.spawn(move || {
                        let s = Store::open(&path).unwrap();
                        let fpr = format!("c{i}");
                        let e = Enrollment {
                            token_nonce: "one".into(),
                            ..enrollment(&fpr, 10 + i)
                        };
                        start.wait();
                        s.enroll(&e, &cert(&fpr, "identity", 10 + i)).unwrap()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let stored = outcomes
            .iter()
            .filter(|o| matches!(o, Enrolled::Stored(_)))
            .count();
        assert_eq!(stored, 1, "{outcomes:?}");
        let s = Store::open(&path).unwrap();
        let winner = s.token_use(&node(), "one").unwrap().unwrap();
        for o in &outcomes {
            if let Enrolled::TokenUsed(u) = o {
                assert_eq!(u, &winner);
            }
        }
        assert_eq!(s.current_certs("identity").unwrap().len(), 1);
        assert_eq!(
            s.enrollment(&node()).unwrap().unwrap().identity_fpr,
            winner.cert_fpr
        );
    }

    #[test]
    fn a_token_table_without_mint_times_is_migrated() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        {
            let c = Connection::open(&path).unwrap();
            c.execute_batch(
                "CREATE TABLE tokens (node TEXT PRIMARY KEY, token TEXT NOT NULL, exp INTEGER NOT NULL);
                 INSERT INTO tokens VALUES ('do-1461-peer-nyc3-01', 'old', 99);",
            )
            .unwrap();
        }
        let s = Store::open(&path).unwrap();
        let old = s.token(&node()).unwrap().unwrap();
        assert_eq!((old.nonce, old.issued_at, old.exp), (None, None, 99));
        let minted = MintedToken {
            token: "new".into(),
            nonce: Some("ab".into()),
            issued_at: Some(50),
            exp: 150,
        };
        s.put_token(&node(), &minted).unwrap();
        drop(s);
        let s = Store::open(&path).unwrap();
        assert_eq!(s.token(&node()).unwrap(), Some(minted));
        assert_eq!(s.token_minted_at(&node(), "ab").unwrap(), Some(50));
        assert_eq!(s.token_minted_at(&node(), "cd").unwrap(), None);
    }

    #[test]
    fn generations_move_only_on_a_new_digest() {
        let s = Store::open_in_memory().unwrap();
        let d1 = Sha256::digest(b"1");
        assert_eq!(
            s.next_generation(&node(), &d1).unwrap(),
            (Generation(1), true)
        );
        s.put_manifest(&StoredManifest {
            node: node(),
            generation: Generation(1),
            digest: d1,
            envelope: "{}".into(),
            published_at: 1,
        })
        .unwrap();
        assert_eq!(
            s.next_generation(&node(), &d1).unwrap(),
            (Generation(1), false)
        );
        assert_eq!(
            s.next_generation(&node(), &Sha256::digest(b"2")).unwrap(),
            (Generation(2), true)
        );
    }

    #[test]
    fn state_survives_reopening_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        {
            let s = Store::open(&path).unwrap();
            s.put_report(&report(5), 1).unwrap();
            s.event(1, Some(&node()), "enrolled", "first").unwrap();
        }
        let s = Store::open(&path).unwrap();
        assert_eq!(s.latest_report(&node()).unwrap().unwrap().0.seq, 5);
        assert_eq!(s.events(10).unwrap()[0].kind, "enrolled");
    }

    #[test]
    fn a_seq_that_does_not_fit_is_refused_and_nothing_is_stored() {
        let s = Store::open_in_memory().unwrap();
        s.put_report(&report(1), 1).unwrap();
        let err = s.put_report(&report(i64::MAX as u64 + 1), 2).unwrap_err();
        assert!(matches!(err, StoreError::OutOfRange { .. }), "{err}");
        assert_eq!(s.report_seqs(&node()).unwrap(), [1]);
        s.put_report(&report(2), 3).unwrap();
        assert_eq!(s.latest_report(&node()).unwrap().unwrap().0.seq, 2);
    }

    #[test]
    fn refusals_are_counted_per_source_kind_and_minute_and_capped() {
        let s = Store::open_in_memory().unwrap();
        let a: std::net::IpAddr = "192.0.2.1".parse().unwrap();
        let b: std::net::IpAddr = "192.0.2.2".parse().unwrap();
        for at in 600..660 {
            s.record_refusal(at, a, "rate_limited", Some(&node()))
                .unwrap();
        }
        assert_eq!(s.record_refusal(660, a, "rate_limited", None).unwrap(), 1);
        s.record_refusal(661, a, "token_expired", None).unwrap();
        s.record_refusal(662, b, "rate_limited", None).unwrap();
        let rows = s.refusals(100).unwrap();
        let counts: Vec<_> = rows
            .iter()
            .map(|r| (r.source, r.kind.as_str(), r.minute, r.count))
            .collect();
        assert_eq!(
            counts,
            [
                (b, "rate_limited", 660, 1),
                (a, "token_expired", 660, 1),
                (a, "rate_limited", 660, 1),
                (a, "rate_limited", 600, 60),
            ]
        );
        assert_eq!(rows[3].node.as_deref(), Some(node().as_str()));
        assert_eq!((rows[3].first_at, rows[3].last_at), (600, 659));

        // Past the cap, the least recently refused rows go first.
        for (i, at) in (700..705).enumerate() {
            let source = std::net::IpAddr::from([198, 51, 100, i as u8]);
            s.record_refusal_capped(at, source, "bad_csr", None, 3)
                .unwrap();
        }
        let kept: Vec<_> = s
            .refusals(100)
            .unwrap()
            .iter()
            .map(|r| r.source.to_string())
            .collect();
        assert_eq!(kept, ["198.51.100.4", "198.51.100.3", "198.51.100.2"]);
    }
}
