#![allow(clippy::unwrap_used)]
//! The seeder's DigitalOcean client (`seeder::digitalocean`) against the stand-in that speaks
//! DigitalOcean's documented droplet JSON and errors (`tests/do-api`), on loopback 127.0.99.250:
//! a droplet, a refused token, a missing droplet, 429 with `retry-after` (honoured, and capped),
//! 5xx and a hung answer retried, and persistent failures given up within the budget.

use std::time::{Duration, Instant};

use hiveseed_do_api::{Droplet as Record, Fault, StandIn};
use hiveseed_seeder::digitalocean::{ApiToken, Budget, Client, DoError, Droplet};

const TOKEN: &str = "dop_v1_client_test_token";
const LISTEN: &str = "127.0.99.250:0";

fn record() -> Record {
    Record {
        id: 4242,
        name: "t1-peer-r1-01".into(),
        region: "r1".into(),
        public_ipv4: "127.0.98.11".parse().unwrap(),
        private_ipv4: "127.0.99.11".parse().unwrap(),
        tags: vec!["t1".into(), "peer".into()],
        created_at: "2026-12-06T02:00:00Z".into(),
    }
}

/// The stand-in serving `record()` on loopback, and its base URL.
async fn stand_in() -> (std::sync::Arc<StandIn>, String) {
    let (s, _table) = StandIn::fixed(TOKEN, vec![record()]);
    let listener = tokio::net::TcpListener::bind(LISTEN).await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(s.clone().serve(listener));
    (s, base)
}

fn budget(total_ms: u64) -> Budget {
    Budget {
        total: Duration::from_millis(total_ms),
        connect_timeout: Duration::from_millis(500),
        request_timeout: Duration::from_millis(400),
        retry_after_cap: Duration::from_millis(700),
        first_backoff: Duration::from_millis(50),
    }
}

fn token() -> ApiToken {
    ApiToken::new(TOKEN.into())
}

fn expected() -> Droplet {
    Droplet {
        id: 4242,
        name: "t1-peer-r1-01".into(),
        region: "r1".into(),
        public_v4: vec!["127.0.98.11".parse().unwrap()],
        private_v4: vec!["127.0.99.11".parse().unwrap()],
        tags: vec!["t1".into(), "peer".into()],
        created_at: 1_796_522_400,
    }
}

#[tokio::test]
async fn a_droplet_is_read_from_the_documented_answer() {
    let (s, base) = stand_in().await;
    let client = Client::new(budget(2000)).unwrap();
    assert_eq!(client.droplet(&base, &token(), 4242).await, Ok(expected()));
    assert_eq!(s.requests(), 1);
}

#[tokio::test]
async fn a_refused_token_is_answered_at_once() {
    let (s, base) = stand_in().await;
    let client = Client::new(budget(2000)).unwrap();
    let got = client
        .droplet(&base, &ApiToken::new("dop_v1_wrong".into()), 4242)
        .await;
    assert_eq!(got, Err(DoError::TokenRefused { status: 401 }));
    assert_eq!(s.requests(), 1, "a refused token was retried");
    let text = got.unwrap_err().to_string();
    assert!(!text.contains("dop_v1"), "the token is in {text}");
}

#[tokio::test]
async fn a_missing_droplet_is_answered_at_once() {
    let (s, base) = stand_in().await;
    let client = Client::new(budget(2000)).unwrap();
    assert_eq!(
        client.droplet(&base, &token(), 4343).await,
        Err(DoError::NotFound { id: 4343 })
    );
    assert_eq!(s.requests(), 1);
}

#[tokio::test]
async fn rate_limited_then_answered_waits_as_asked_up_to_the_cap() {
    let (s, base) = stand_in().await;
    let client = Client::new(budget(3000)).unwrap();
    // retry-after 1 s is above the 0.7 s cap: the wait is the cap, not the backoff (50 ms).
    s.push_faults([Fault::RateLimited {
        retry_after_secs: 1,
    }]);
    let start = Instant::now();
    assert_eq!(client.droplet(&base, &token(), 4242).await, Ok(expected()));
    let took = start.elapsed();
    assert_eq!(s.requests(), 2);
    assert!(
        took >= Duration::from_millis(700) && took < Duration::from_millis(1000),
        "waited {took:?} for retry-after 1 s capped at 0.7 s"
    );
    // An hour's retry-after is capped too: the look-up ends within the budget.
    s.push_faults([Fault::RateLimited {
        retry_after_secs: 3600,
    }]);
    let start = Instant::now();
    assert_eq!(client.droplet(&base, &token(), 4242).await, Ok(expected()));
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "{:?}",
        start.elapsed()
    );
}

#[tokio::test]
async fn server_errors_then_an_answer_are_retried() {
    let (s, base) = stand_in().await;
    let client = Client::new(budget(3000)).unwrap();
    s.push_faults([Fault::ServerError, Fault::Unavailable]);
    assert_eq!(client.droplet(&base, &token(), 4242).await, Ok(expected()));
    assert_eq!(s.requests(), 3);
}

#[tokio::test]
async fn a_hung_answer_is_timed_out_and_retried() {
    let (s, base) = stand_in().await;
    let client = Client::new(budget(3000)).unwrap();
    s.push_faults([Fault::Hang]);
    let start = Instant::now();
    assert_eq!(client.droplet(&base, &token(), 4242).await, Ok(expected()));
    assert_eq!(s.requests(), 2);
    assert!(start.elapsed() >= Duration::from_millis(400));
}

/// Asserts a look-up with a 1.5 s budget ends `Unavailable` within it (plus scheduling slack).
async fn assert_unavailable_within_budget(base: &str, what: &str) -> u32 {
    let client = Client::new(budget(1500)).unwrap();
    let start = Instant::now();
    let got = client.droplet(base, &token(), 4242).await;
    let took = start.elapsed();
    assert!(took < Duration::from_millis(1900), "{what}: took {took:?}");
    match got {
        Err(DoError::Unavailable {
            attempts, budget, ..
        }) => {
            assert_eq!(budget, Duration::from_millis(1500));
            attempts
        }
        other => panic!("{what}: {other:?}"),
    }
}

#[tokio::test]
async fn persistent_server_errors_are_unavailable_within_the_budget() {
    let (s, base) = stand_in().await;
    s.push_faults(std::iter::repeat_n(Fault::ServerError, 100));
    let attempts = assert_unavailable_within_budget(&base, "500s").await;
    assert!(attempts > 2, "{attempts} attempts");
}

#[tokio::test]
async fn a_persistently_hung_api_is_unavailable_within_the_budget() {
    let (s, base) = stand_in().await;
    s.push_faults(std::iter::repeat_n(Fault::Hang, 100));
    let attempts = assert_unavailable_within_budget(&base, "hangs").await;
    assert!(attempts >= 2, "{attempts} attempts");
}

#[tokio::test]
async fn an_api_that_refuses_connections_is_unavailable_within_the_budget() {
    // A port bound and closed again: nothing listens there.
    let port = std::net::TcpListener::bind("127.0.99.250:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let base = format!("http://127.0.99.250:{port}");
    let attempts = assert_unavailable_within_budget(&base, "connection refused").await;
    assert!(attempts > 2, "{attempts} attempts");
}
