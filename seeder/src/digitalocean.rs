//! DigitalOcean's record of a droplet, the one API call residency attestation makes
//! (`GET /v2/droplets/{id}`), and the comparison of that record with an enrollment.
//!
//! The client retries what can heal (429, 5xx, timeouts, connection errors) with jittered
//! backoff, honours `retry-after` up to a cap, and gives up within a total budget: an enrollment
//! waits at most that long, then gets a retryable refusal. A refused token (401/403) and a
//! missing droplet (404) are answered at once. The base URL and the budget are parameters, so the
//! same code runs against the stand-in (`tests/do-api`) in tests and the lab.

use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use rand::Rng;
use serde::Deserialize;

/// The read-only API token from the campaign's `secrets/do-api-token`. Never displayed.
#[derive(Clone)]
pub struct ApiToken(String);

impl ApiToken {
    pub fn new(token: String) -> Self {
        Self(token)
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for ApiToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ApiToken(<redacted>)")
    }
}

/// How long one look-up may take, in all and per request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    /// Everything, retries and waits included: past it the look-up is `Unavailable`.
    pub total: Duration,
    pub connect_timeout: Duration,
    /// One request, from sending to the last byte of the answer.
    pub request_timeout: Duration,
    /// The longest `retry-after` honoured.
    pub retry_after_cap: Duration,
    /// The first retry's delay before jitter; doubled per retry up to `MAX_BACKOFF`.
    pub first_backoff: Duration,
}

const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// A droplet object is a few KiB; an answer larger than this is not one.
const MAX_ANSWER: usize = 1024 * 1024;

impl Budget {
    /// A budget of `total`, each request and wait within it.
    pub fn within(total: Duration) -> Self {
        Self {
            total,
            connect_timeout: Duration::from_secs(3).min(total / 2),
            request_timeout: Duration::from_secs(5).min(total / 2),
            retry_after_cap: Duration::from_secs(5).min(total / 2),
            first_backoff: Duration::from_millis(250),
        }
    }
}

impl Default for Budget {
    fn default() -> Self {
        Self::within(Duration::from_secs(15))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DoError {
    #[error("droplet {id} does not exist in the fleet's DigitalOcean account")]
    NotFound { id: u64 },
    /// The seeder's API token is wrong or revoked: a configuration error of the seeder.
    #[error("the DigitalOcean API refuses the seeder's token (HTTP {status}); check secrets/do-api-token")]
    TokenRefused { status: u16 },
    #[error("the DigitalOcean API did not answer within {budget:?} ({attempts} attempt(s), last: {last})")]
    Unavailable {
        budget: Duration,
        attempts: u32,
        last: String,
    },
    #[error("the DigitalOcean API's answer for droplet {id} is not a droplet: {message}")]
    Protocol { id: u64, message: String },
}

/// The fields of a droplet attestation compares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Droplet {
    pub id: u64,
    pub name: String,
    /// `region.slug`.
    pub region: String,
    /// `networks.v4` entries of type `public`.
    pub public_v4: Vec<Ipv4Addr>,
    /// `networks.v4` entries of type `private`.
    pub private_v4: Vec<Ipv4Addr>,
    pub tags: Vec<String>,
    /// `created_at`, Unix seconds.
    pub created_at: i64,
}

#[derive(Deserialize)]
struct Answer {
    droplet: RawDroplet,
}

#[derive(Deserialize)]
struct RawDroplet {
    id: u64,
    name: String,
    created_at: String,
    networks: RawNetworks,
    region: RawRegion,
    tags: Vec<String>,
}

#[derive(Deserialize)]
struct RawNetworks {
    v4: Vec<RawV4>,
}

#[derive(Deserialize)]
struct RawV4 {
    ip_address: Ipv4Addr,
    #[serde(rename = "type")]
    kind: String,
}

#[derive(Deserialize)]
struct RawRegion {
    slug: String,
}

/// Parses the body of a 200 answer to `GET /v2/droplets/{id}`.
pub fn parse_droplet(id: u64, body: &[u8]) -> Result<Droplet, DoError> {
    let protocol = |message: String| DoError::Protocol { id, message };
    let a: Answer = serde_json::from_slice(body).map_err(|e| protocol(e.to_string()))?;
    let d = a.droplet;
    if d.id != id {
        return Err(protocol(format!("it is droplet {}", d.id)));
    }
    let created = time::OffsetDateTime::parse(
        &d.created_at,
        &time::format_description::well_known::Rfc3339,
    )
    .map_err(|e| protocol(format!("created_at {:?}: {e}", d.created_at)))?;
    let of = |kind: &str| -> Vec<Ipv4Addr> {
        d.networks
            .v4
            .iter()
            .filter(|n| n.kind == kind)
            .map(|n| n.ip_address)
            .collect()
    };
    Ok(Droplet {
        id: d.id,
        public_v4: of("public"),
        private_v4: of("private"),
        name: d.name,
        region: d.region.slug,
        tags: d.tags,
        created_at: created.unix_timestamp(),
    })
}

/// What the enrolling droplet must be, from the request, the connection, the fleet and the token.
#[derive(Debug, Clone)]
pub struct Expected<'a> {
    pub node: &'a str,
    /// The connection's source address.
    pub source: IpAddr,
    pub private_ipv4: Ipv4Addr,
    /// The node's region (facts.region, checked equal to the fleet's before).
    pub region: &'a str,
    pub tag: &'a str,
    /// When the join token was minted, Unix seconds.
    pub minted_at: u64,
}

impl Droplet {
    /// The first field in which the droplet is not the node, as a message naming it; `None`
    /// when it is.
    pub fn mismatch(&self, e: &Expected<'_>) -> Option<String> {
        let id = self.id;
        if self.name != e.node {
            return Some(format!(
                "droplet {id}'s name is {:?}, not the node's name {}",
                self.name, e.node
            ));
        }
        if !self.public_v4.iter().any(|ip| IpAddr::V4(*ip) == e.source) {
            return Some(format!(
                "droplet {id}'s public IPv4 {:?} does not include the connection's source address {}",
                self.public_v4, e.source
            ));
        }
        if !self.private_v4.contains(&e.private_ipv4) {
            return Some(format!(
                "droplet {id}'s private IPv4 {:?} is not facts.private_ipv4 {}",
                self.private_v4, e.private_ipv4
            ));
        }
        if self.region != e.region {
            return Some(format!(
                "droplet {id}'s region is {}, but facts.region and the fleet have {} in {}",
                self.region, e.node, e.region
            ));
        }
        if !self.tags.iter().any(|t| t == e.tag) {
            return Some(format!(
                "droplet {id}'s tags {:?} do not include the campaign's tag {}",
                self.tags, e.tag
            ));
        }
        // Both times have whole seconds: a droplet created in the second of the mint passes.
        if self.created_at < e.minted_at as i64 {
            let at = |t: i64| crate::attest::rfc3339(t).unwrap_or_else(|| t.to_string());
            return Some(format!(
                "droplet {id} was created at {}, before its join token was minted at {}; a droplet made before the token cannot have been given it",
                at(self.created_at),
                at(e.minted_at as i64)
            ));
        }
        None
    }
}

/// What one request came to.
enum Attempt {
    Done(Result<Droplet, DoError>),
    /// Worth another try: what happened, and the server's `retry-after`.
    Retry(String, Option<Duration>),
}

/// The HTTP client; holds no token and no base URL, which come from the campaign per look-up.
#[derive(Debug, Clone)]
pub struct Client {
    http: reqwest::Client,
    budget: Budget,
}

impl Client {
    /// Builds the client; no network I/O.
    pub fn new(budget: Budget) -> Result<Self, reqwest::Error> {
        let http = reqwest::Client::builder()
            .use_rustls_tls()
            .connect_timeout(budget.connect_timeout)
            // A redirect would carry the question elsewhere; the API does not redirect.
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("hiveseed-seeder/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Self { http, budget })
    }

    pub fn budget(&self) -> Budget {
        self.budget
    }

    /// `GET {base}/v2/droplets/{id}`, retried within the budget.
    pub async fn droplet(&self, base: &str, token: &ApiToken, id: u64) -> Result<Droplet, DoError> {
        let b = self.budget;
        let deadline = Instant::now() + b.total;
        let mut backoff = b.first_backoff;
        let mut attempts = 0;
        loop {
            attempts += 1;
            let remaining = deadline.saturating_duration_since(Instant::now());
            let timeout = b.request_timeout.min(remaining);
            let (last, retry_after) =
                match tokio::time::timeout(timeout, self.attempt(base, token, id)).await {
                    Ok(Attempt::Done(result)) => return result,
                    Ok(Attempt::Retry(what, retry_after)) => (what, retry_after),
                    Err(_) => (format!("no answer within {timeout:?}"), None),
                };
            let wait = match retry_after {
                Some(asked) => asked.min(b.retry_after_cap),
                None => backoff.mul_f64(rand::thread_rng().gen_range(0.5..=1.0)),
            };
            backoff = (backoff * 2).min(MAX_BACKOFF);
            if Instant::now() + wait >= deadline {
                return Err(DoError::Unavailable {
                    budget: b.total,
                    attempts,
                    last,
                });
            }
            tracing::debug!(droplet = id, attempt = attempts, retry_in = ?wait, last = %last, "DigitalOcean API look-up retried");
            tokio::time::sleep(wait).await;
        }
    }

    async fn attempt(&self, base: &str, token: &ApiToken, id: u64) -> Attempt {
        let sent = self
            .http
            .get(format!("{base}/v2/droplets/{id}"))
            .bearer_auth(token.expose())
            .header("accept", "application/json")
            .send()
            .await;
        let mut resp = match sent {
            Ok(r) => r,
            Err(e) => return Attempt::Retry(format!("{e}"), None),
        };
        let status = resp.status().as_u16();
        let retry_after = resp
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        match status {
            200 => {}
            401 | 403 => return Attempt::Done(Err(DoError::TokenRefused { status })),
            404 => return Attempt::Done(Err(DoError::NotFound { id })),
            429 | 500..=599 => return Attempt::Retry(format!("HTTP {status}"), retry_after),
            other => {
                return Attempt::Done(Err(DoError::Protocol {
                    id,
                    message: format!("HTTP {other}"),
                }))
            }
        }
        let mut body = Vec::new();
        loop {
            match resp.chunk().await {
                Ok(Some(chunk)) if body.len() + chunk.len() <= MAX_ANSWER => {
                    body.extend_from_slice(&chunk)
                }
                Ok(Some(_)) => {
                    return Attempt::Done(Err(DoError::Protocol {
                        id,
                        message: format!("the answer is larger than {MAX_ANSWER} bytes"),
                    }))
                }
                Ok(None) => break,
                Err(e) => return Attempt::Retry(format!("reading the answer: {e}"), None),
            }
        }
        Attempt::Done(parse_droplet(id, &body))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn droplet() -> Droplet {
        Droplet {
            id: 7,
            name: "c-peer-r1-01".into(),
            region: "r1".into(),
            public_v4: vec![Ipv4Addr::new(203, 0, 113, 7)],
            private_v4: vec![Ipv4Addr::new(10, 10, 0, 7)],
            tags: vec!["c".into(), "peer".into()],
            created_at: 1_000,
        }
    }

    fn expected() -> Expected<'static> {
        Expected {
            node: "c-peer-r1-01",
            source: IpAddr::V4(Ipv4Addr::new(203, 0, 113, 7)),
            private_ipv4: Ipv4Addr::new(10, 10, 0, 7),
            region: "r1",
            tag: "c",
            minted_at: 999,
        }
    }

    #[test]
    fn each_field_that_differs_is_named() {
        assert_eq!(droplet().mismatch(&expected()), None);
        let same_second = Expected {
            minted_at: 1_000,
            ..expected()
        };
        assert_eq!(droplet().mismatch(&same_second), None);
        type Change = fn(&mut Expected<'static>);
        let cases: [(Change, &str); 6] = [
            (|e| e.node = "c-peer-r1-02", "name"),
            (
                |e| e.source = IpAddr::V4(Ipv4Addr::new(198, 51, 100, 1)),
                "public IPv4",
            ),
            (
                |e| e.private_ipv4 = Ipv4Addr::new(10, 10, 0, 8),
                "facts.private_ipv4",
            ),
            (|e| e.region = "r2", "region"),
            (|e| e.tag = "other", "tags"),
            (|e| e.minted_at = 1_001, "before its join token was minted"),
        ];
        for (change, field) in cases {
            let mut e = expected();
            change(&mut e);
            let m = droplet().mismatch(&e).expect(field);
            assert!(m.contains(field), "{field}: {m}");
        }
    }

    #[test]
    fn the_documented_droplet_object_parses() {
        let body = br#"{"droplet": {"id": 3164444, "name": "example.com", "memory": 1024,
            "created_at": "2020-07-21T18:37:44Z", "status": "active",
            "networks": {"v4": [
                {"ip_address": "10.128.192.124", "netmask": "255.255.0.0", "gateway": "nil", "type": "private"},
                {"ip_address": "192.241.165.154", "netmask": "255.255.240.0", "gateway": "192.241.160.1", "type": "public"}],
                "v6": []},
            "region": {"name": "New York 3", "slug": "nyc3", "available": true},
            "tags": ["web", "env:prod"], "vpc_uuid": "760e09ef"}}"#;
        let d = parse_droplet(3164444, body).unwrap();
        assert_eq!(
            d,
            Droplet {
                id: 3164444,
                name: "example.com".into(),
                region: "nyc3".into(),
                public_v4: vec![Ipv4Addr::new(192, 241, 165, 154)],
                private_v4: vec![Ipv4Addr::new(10, 128, 192, 124)],
                tags: vec!["web".into(), "env:prod".into()],
                created_at: 1_595_356_664,
            }
        );
        let err = parse_droplet(3164445, body).unwrap_err().to_string();
        assert!(err.contains("it is droplet 3164444"), "{err}");
        let err = parse_droplet(1, br#"{"id": "not_found"}"#).unwrap_err();
        assert!(matches!(err, DoError::Protocol { id: 1, .. }), "{err}");
    }

    #[test]
    fn the_token_is_never_shown() {
        let t = ApiToken::new("dop_v1_secret".into());
        assert!(!format!("{t:?}").contains("secret"));
    }
}
