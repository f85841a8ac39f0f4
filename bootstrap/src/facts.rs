//! A node's facts: droplet id, region, public and private IPv4. From the DigitalOcean metadata
//! service (`/metadata/v1.json`, base URL injected), or from a facts file on other platforms and
//! in the lab. Constructors do no I/O.

use std::net::Ipv4Addr;
use std::time::Duration;

use hiveseed_proto::api::NodeFacts;
use hiveseed_proto::Region;
use serde::Deserialize;

/// Where a lab node (or any non-DigitalOcean platform) keeps its facts, relative to the root.
pub const FACTS_FILE: &str = "/etc/hiveseed/facts.json";
pub const DO_METADATA_BASE: &str = "http://169.254.169.254";

#[derive(Debug, thiserror::Error)]
pub enum FactsError {
    #[error("facts file {path}: {message}")]
    File { path: String, message: String },
    #[error("metadata service {url}: {message}")]
    Metadata { url: String, message: String },
    #[error("metadata document: {0}")]
    Document(String),
}

impl FactsError {
    /// The metadata service not answering yet is worth retrying; a bad document is not.
    pub fn retryable(&self) -> bool {
        matches!(self, FactsError::Metadata { .. })
    }
}

/// The parts of DigitalOcean's `/metadata/v1.json` we use.
#[derive(Debug, Deserialize)]
struct DoMetadata {
    droplet_id: u64,
    region: String,
    interfaces: DoInterfaces,
}

#[derive(Debug, Deserialize)]
struct DoInterfaces {
    #[serde(default)]
    public: Vec<DoInterface>,
    #[serde(default)]
    private: Vec<DoInterface>,
}

#[derive(Debug, Deserialize)]
struct DoInterface {
    ipv4: Option<DoIpv4>,
}

#[derive(Debug, Deserialize)]
struct DoIpv4 {
    ip_address: Ipv4Addr,
}

/// Parses a DigitalOcean metadata document.
pub fn parse_do_metadata(body: &[u8]) -> Result<NodeFacts, FactsError> {
    let m: DoMetadata =
        serde_json::from_slice(body).map_err(|e| FactsError::Document(e.to_string()))?;
    let region: Region = m
        .region
        .parse()
        .map_err(|e: hiveseed_proto::NameError| FactsError::Document(e.to_string()))?;
    let first = |list: &[DoInterface], which: &str| {
        list.iter()
            .find_map(|i| i.ipv4.as_ref().map(|v| v.ip_address))
            .ok_or_else(|| FactsError::Document(format!("no {which} IPv4 interface")))
    };
    Ok(NodeFacts {
        droplet_id: m.droplet_id,
        region,
        public_ipv4: first(&m.interfaces.public, "public")?,
        private_ipv4: first(&m.interfaces.private, "private")?,
    })
}

/// Reads a facts file (the lab's stand-in for the metadata service).
pub fn parse_facts_file(path: &str, body: &[u8]) -> Result<NodeFacts, FactsError> {
    serde_json::from_slice(body).map_err(|e| FactsError::File {
        path: path.into(),
        message: e.to_string(),
    })
}

/// Fetches the DigitalOcean metadata document from `base` (no retry here; the caller backs off).
pub async fn fetch_do_metadata(base: &str) -> Result<NodeFacts, FactsError> {
    let url = format!("{}/metadata/v1.json", base.trim_end_matches('/'));
    let err = |message: String| FactsError::Metadata {
        url: url.clone(),
        message,
    };
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .no_proxy()
        .build()
        .map_err(|e| err(e.to_string()))?;
    let resp = client
        .get(&url)
        .send()
        .await
        .map_err(|e| err(e.to_string()))?;
    if !resp.status().is_success() {
        return Err(err(format!("HTTP {}", resp.status())));
    }
    let body = resp.bytes().await.map_err(|e| err(e.to_string()))?;
    if body.len() > 1024 * 1024 {
        return Err(FactsError::Document("larger than 1 MiB".into()));
    }
    parse_do_metadata(&body)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Shape of a real droplet's document (abridged by DigitalOcean's docs, values made up).
    pub const SAMPLE: &str = r##"{
      "droplet_id": 2756294,
      "hostname": "do-1461-peer-nyc3-01",
      "vendor_data": "#cloud-config\n...",
      "public_keys": ["ssh-ed25519 AAAA"],
      "auth_key": "secret-we-ignore",
      "region": "nyc3",
      "interfaces": {
        "private": [{"ipv4": {"ip_address": "10.132.255.113", "netmask": "255.255.0.0", "gateway": "0.0.0.0"},
                     "mac": "04:01:2a:0f:2a:02", "type": "private"}],
        "public": [{"ipv4": {"ip_address": "104.131.20.105", "netmask": "255.255.192.0", "gateway": "104.131.0.1"},
                    "ipv6": {"ip_address": "2604:A880:0800:0010:0000:0000:017D:2001", "cidr": 64, "gateway": "2604:A880:0800:0010:0000:0000:0000:0001"},
                    "anchor_ipv4": {"ip_address": "10.17.0.5", "netmask": "255.255.0.0", "gateway": "10.17.0.1"},
                    "mac": "04:01:2a:0f:2a:01", "type": "public"}]
      },
      "floating_ip": {"ipv4": {"active": false}},
      "dns": {"nameservers": ["2001:4860:4860::8844", "8.8.8.8"]},
      "features": {"dhcp_enabled": false}
    }"##;

    #[test]
    fn parses_the_digitalocean_document() {
        let f = parse_do_metadata(SAMPLE.as_bytes()).unwrap();
        assert_eq!(f.droplet_id, 2756294);
        assert_eq!(f.region.as_str(), "nyc3");
        assert_eq!(f.public_ipv4, Ipv4Addr::new(104, 131, 20, 105));
        assert_eq!(f.private_ipv4, Ipv4Addr::new(10, 132, 255, 113));
    }

    #[test]
    fn refuses_broken_documents_naming_the_problem() {
        let no_private = SAMPLE.replace("\"private\": [{", "\"private_x\": [{");
        let e = parse_do_metadata(no_private.as_bytes())
            .unwrap_err()
            .to_string();
        assert!(e.contains("no private IPv4"), "{e}");
        let bad_region = SAMPLE.replace("\"nyc3\"", "\"NYC 3\"");
        assert!(parse_do_metadata(bad_region.as_bytes()).is_err());
        assert!(parse_do_metadata(b"not json").is_err());
        let e = parse_facts_file("/etc/hiveseed/facts.json", b"{\"droplet_id\": 1}").unwrap_err();
        assert!(e.to_string().contains("/etc/hiveseed/facts.json"));
    }
}
