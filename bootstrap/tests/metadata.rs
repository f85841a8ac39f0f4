//! The DigitalOcean metadata client against a mock metadata server on loopback (the real
//! service is only reachable from a droplet).

#![allow(clippy::unwrap_used)]

use hiveseed_bootstrap::facts::{fetch_do_metadata, FactsError};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const DOCUMENT: &str = r#"{"droplet_id":3164444,"hostname":"do-1461-pg-fra1-01","region":"fra1",
"interfaces":{"public":[{"ipv4":{"ip_address":"164.90.1.2","netmask":"255.255.240.0","gateway":"164.90.0.1"},"type":"public"}],
"private":[{"ipv4":{"ip_address":"10.110.0.3","netmask":"255.255.240.0","gateway":"0.0.0.0"},"type":"private"}]}}"#;

/// Serves one canned response per connection; returns the base URL and the requested paths.
async fn mock(
    status: &'static str,
    body: &'static str,
) -> (String, tokio::sync::mpsc::UnboundedReceiver<String>) {
    let listener = tokio::net::TcpListener::bind("127.0.8.254:0")
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = vec![0u8; 4096];
            let n = s.read(&mut buf).await.unwrap();
            let req = String::from_utf8_lossy(&buf[..n]).to_string();
            let path = req.split_whitespace().nth(1).unwrap_or("").to_owned();
            let _ = tx.send(path);
            let resp = format!(
                "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = s.write_all(resp.as_bytes()).await;
        }
    });
    (format!("http://{addr}"), rx)
}

#[tokio::test]
async fn reads_facts_from_the_metadata_document() {
    let (base, mut paths) = mock("200 OK", DOCUMENT).await;
    let f = fetch_do_metadata(&base).await.unwrap();
    assert_eq!(paths.recv().await.unwrap(), "/metadata/v1.json");
    assert_eq!(f.droplet_id, 3164444);
    assert_eq!(f.region.as_str(), "fra1");
    assert_eq!(f.public_ipv4.to_string(), "164.90.1.2");
    assert_eq!(f.private_ipv4.to_string(), "10.110.0.3");
}

#[tokio::test]
async fn errors_say_whether_to_retry() {
    let (base, _) = mock("503 Service Unavailable", "{}").await;
    let e = fetch_do_metadata(&base).await.unwrap_err();
    assert!(
        matches!(e, FactsError::Metadata { .. }) && e.retryable(),
        "{e}"
    );

    let (base, _) = mock(
        "200 OK",
        r#"{"droplet_id": 1, "region": "fra1", "interfaces": {"public": []}}"#,
    )
    .await;
    let e = fetch_do_metadata(&base).await.unwrap_err();
    assert!(
        matches!(e, FactsError::Document(_)) && !e.retryable(),
        "{e}"
    );
    assert!(e.to_string().contains("no public IPv4"), "{e}");

    // Nothing listening: retryable.
    let e = fetch_do_metadata("http://127.0.8.253:9").await.unwrap_err();
    assert!(e.retryable(), "{e}");
}
