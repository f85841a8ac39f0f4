//! A stand-in for the one DigitalOcean API call the seeder's residency attestation makes,
//! `GET /v2/droplets/{id}`, speaking the documented format
//! (<https://docs.digitalocean.com/reference/api/digitalocean/#tag/Droplets/operation/droplets_get>):
//! the droplet object with `networks.v4` entries typed `public`/`private`, `region.slug`, `tags` and
//! `created_at`, the `ratelimit-*` headers on every answer, and the documented error body
//! `{"id": ..., "message": ...}` for 401, 404, 429 (with `retry-after`) and 500.
//!
//! DigitalOcean's API cannot be reached from the lab, so the seeder's real client is tested against
//! this, and the lab runs it on loopback answering from its own node table. What it does not prove:
//! that DigitalOcean answers exactly so today (the shapes are the documented ones), TLS to
//! api.digitalocean.com, and DigitalOcean's real rate limits.

use std::collections::VecDeque;
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use serde::{Deserialize, Serialize};

/// What the cloud knows about one droplet: the fields attestation compares.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Droplet {
    pub id: u64,
    pub name: String,
    /// Region slug (`nyc3`).
    pub region: String,
    pub public_ipv4: Ipv4Addr,
    pub private_ipv4: Ipv4Addr,
    pub tags: Vec<String>,
    /// RFC 3339 in UTC with a `Z`, as DigitalOcean writes it (`2020-07-21T18:37:44Z`).
    pub created_at: String,
}

impl Droplet {
    /// The documented droplet object, with the fields attestation does not read filled in as a
    /// real answer has them.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "id": self.id,
            "name": self.name,
            "memory": 2048,
            "vcpus": 1,
            "disk": 50,
            "locked": false,
            "status": "active",
            "kernel": null,
            "created_at": self.created_at,
            "features": ["monitoring", "private_networking"],
            "backup_ids": [],
            "next_backup_window": null,
            "snapshot_ids": [],
            "image": {"id": 106569146, "name": "12 x64", "distribution": "Debian", "slug": "debian-12-x64", "public": true},
            "volume_ids": [],
            "size": {"slug": "s-1vcpu-2gb", "memory": 2048, "vcpus": 1, "disk": 50},
            "size_slug": "s-1vcpu-2gb",
            "networks": {
                "v4": [
                    {"ip_address": self.private_ipv4.to_string(), "netmask": "255.255.240.0", "gateway": "nil", "type": "private"},
                    {"ip_address": self.public_ipv4.to_string(), "netmask": "255.255.240.0", "gateway": gateway(self.public_ipv4), "type": "public"}
                ],
                "v6": []
            },
            "region": {
                "name": region_name(&self.region),
                "slug": self.region,
                "features": ["backups", "ipv6", "metadata", "install_agent", "storage", "image_transfer"],
                "available": true,
                "sizes": ["s-1vcpu-1gb", "s-1vcpu-2gb", "s-2vcpu-4gb"]
            },
            "tags": self.tags,
            "vpc_uuid": "5a4981aa-9653-4bd1-bef5-d6bff52042e4"
        })
    }
}

fn gateway(ip: Ipv4Addr) -> String {
    let [a, b, c, _] = ip.octets();
    Ipv4Addr::new(a, b, c, 1).to_string()
}

fn region_name(slug: &str) -> String {
    match slug {
        "nyc3" => "New York 3".into(),
        "fra1" => "Frankfurt 1".into(),
        "sgp1" => "Singapore 1".into(),
        other => other.to_uppercase(),
    }
}

/// One answer the stand-in gives instead of the droplet, once, to the next authorised request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// 429 with `ratelimit-remaining: 0` and `retry-after: <secs>`.
    RateLimited { retry_after_secs: u64 },
    /// 500 with DigitalOcean's `server_error` body.
    ServerError,
    /// 503, as DigitalOcean's edge answers during an outage.
    Unavailable,
    /// The connection is accepted and the request read, and nothing is ever answered.
    Hang,
}

/// A test that panicked while holding the lock leaves the data as it was; the stand-in goes on.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Where the droplet table comes from: read on every request, so a table the lab rewrites (a
/// droplet replaced) is what the next request sees.
pub type Source = Arc<dyn Fn() -> Result<Vec<Droplet>, String> + Send + Sync>;

/// The stand-in's state: the token it accepts, the droplets, queued faults, and a count of the
/// requests it got (authorised or not).
pub struct StandIn {
    token: String,
    source: Source,
    faults: Mutex<VecDeque<Fault>>,
    requests: AtomicU64,
    /// Print one line per answer to stdout (`lab do-api`'s log).
    log: bool,
}

impl std::fmt::Debug for StandIn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StandIn")
            .field("requests", &self.requests)
            .finish_non_exhaustive()
    }
}

impl StandIn {
    /// A stand-in accepting `Authorization: Bearer <token>` only.
    pub fn new(token: impl Into<String>, source: Source) -> Arc<Self> {
        Arc::new(Self {
            token: token.into(),
            source,
            faults: Mutex::new(VecDeque::new()),
            requests: AtomicU64::new(0),
            log: false,
        })
    }

    /// A stand-in that prints `GET /v2/droplets/<id> <status>` for every answer it gives.
    pub fn logged(token: impl Into<String>, source: Source) -> Arc<Self> {
        Arc::new(Self {
            token: token.into(),
            source,
            faults: Mutex::new(VecDeque::new()),
            requests: AtomicU64::new(0),
            log: true,
        })
    }

    /// A stand-in over a fixed table, which `set` can change.
    pub fn fixed(token: impl Into<String>, droplets: Vec<Droplet>) -> (Arc<Self>, Table) {
        let table = Table(Arc::new(Mutex::new(droplets)));
        let t = table.clone();
        let source: Source = Arc::new(move || Ok(lock(&t.0).clone()));
        (Self::new(token, source), table)
    }

    /// The next `faults.len()` authorised requests get these answers, in order.
    pub fn push_faults(&self, faults: impl IntoIterator<Item = Fault>) {
        lock(&self.faults).extend(faults);
    }

    /// Drops the faults not yet answered.
    pub fn clear_faults(&self) {
        lock(&self.faults).clear();
    }

    /// Requests received so far.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::SeqCst)
    }

    pub fn router(self: &Arc<Self>) -> Router {
        Router::new()
            .route("/v2/droplets/{id}", get(get_droplet))
            .fallback(not_found)
            .with_state(self.clone())
    }

    /// Serves on `listener` until the task is dropped.
    pub async fn serve(self: Arc<Self>, listener: tokio::net::TcpListener) -> std::io::Result<()> {
        axum::serve(listener, self.router()).await
    }
}

/// A fixed droplet table a test can change while the stand-in serves it.
#[derive(Debug, Clone)]
pub struct Table(Arc<Mutex<Vec<Droplet>>>);

impl Table {
    pub fn set(&self, droplets: Vec<Droplet>) {
        *lock(&self.0) = droplets;
    }

    pub fn update(&self, f: impl FnOnce(&mut Vec<Droplet>)) {
        f(&mut lock(&self.0));
    }
}

const RATE_LIMIT: u64 = 5000;

/// DigitalOcean's `ratelimit-*` headers: the hourly limit, what is left, and when it resets.
fn rate_headers(remaining: u64) -> HeaderMap {
    let reset = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() + 3600)
        .unwrap_or(0);
    let mut h = HeaderMap::new();
    h.insert("ratelimit-limit", HeaderValue::from(RATE_LIMIT));
    h.insert("ratelimit-remaining", HeaderValue::from(remaining));
    h.insert("ratelimit-reset", HeaderValue::from(reset));
    h
}

fn error(status: StatusCode, id: &str, message: &str, headers: HeaderMap) -> Response {
    (
        status,
        headers,
        axum::Json(serde_json::json!({"id": id, "message": message})),
    )
        .into_response()
}

async fn not_found() -> Response {
    error(
        StatusCode::NOT_FOUND,
        "not_found",
        "The resource you were accessing could not be found.",
        HeaderMap::new(),
    )
}

async fn get_droplet(
    State(s): State<Arc<StandIn>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let log = s.log;
    let shown: String = id.chars().take(24).filter(char::is_ascii_graphic).collect();
    let answer = answer_droplet(s, id, headers).await;
    if log {
        println!("GET /v2/droplets/{shown} {}", answer.status().as_u16());
    }
    answer
}

async fn answer_droplet(s: Arc<StandIn>, id: String, headers: HeaderMap) -> Response {
    let n = s.requests.fetch_add(1, Ordering::SeqCst) + 1;
    let remaining = RATE_LIMIT.saturating_sub(n);
    let authorised = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|t| t == s.token);
    if !authorised {
        return error(
            StatusCode::UNAUTHORIZED,
            "Unauthorized",
            "Unable to authenticate you",
            HeaderMap::new(),
        );
    }
    let fault = lock(&s.faults).pop_front();
    match fault {
        Some(Fault::RateLimited { retry_after_secs }) => {
            let mut h = rate_headers(0);
            h.insert("retry-after", HeaderValue::from(retry_after_secs));
            return error(
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_requests",
                "API Rate limit exceeded.",
                h,
            );
        }
        Some(Fault::ServerError) => {
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                "Unexpected server-side error",
                rate_headers(remaining),
            );
        }
        Some(Fault::Unavailable) => {
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                "service_unavailable",
                "The service is temporarily unavailable.",
                HeaderMap::new(),
            );
        }
        Some(Fault::Hang) => std::future::pending::<()>().await,
        None => {}
    }
    let droplets = match (s.source)() {
        Ok(d) => d,
        Err(e) => {
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                &format!("stand-in droplet table: {e}"),
                rate_headers(remaining),
            )
        }
    };
    // DigitalOcean answers an id that is not a number like one that does not exist.
    let found = id
        .parse::<u64>()
        .ok()
        .and_then(|id| droplets.into_iter().find(|d| d.id == id));
    match found {
        Some(d) => (
            StatusCode::OK,
            rate_headers(remaining),
            axum::Json(serde_json::json!({"droplet": d.to_json()})),
        )
            .into_response(),
        None => error(
            StatusCode::NOT_FOUND,
            "not_found",
            "The resource you were accessing could not be found.",
            rate_headers(remaining),
        ),
    }
}
