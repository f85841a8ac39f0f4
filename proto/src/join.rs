//! `/etc/hiveseed/join.toml`: what cloud-init hands the agent (written 0600 from user_data).
//!
//! It holds public trust anchors (the campaign CA, the manifest verifying key) and one secret: the
//! node's own join token, inside `join_url`.

use serde::{Deserialize, Serialize};

use crate::names::{Campaign, NodeName, Region, RoleName};

pub const JOIN_FILE: &str = "/etc/hiveseed/join.toml";

#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JoinConfig {
    /// `https://host:port` of the seeder.
    pub seeder_url: String,
    pub campaign: Campaign,
    pub node: NodeName,
    pub role: RoleName,
    pub region: Region,
    /// `https://<seeder>/v1/join/<node>?token=<payload>.<signature>`: carries the join token.
    pub join_url: String,
    /// The campaign CA certificate (PEM): the only root the agent trusts for the seeder.
    pub ca_pem: String,
    /// The manifest verifying key (SPKI PEM, Ed25519).
    pub manifest_key_pem: String,
}

impl std::fmt::Debug for JoinConfig {
    // join_url carries the token: never print it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JoinConfig")
            .field("seeder_url", &self.seeder_url)
            .field("campaign", &self.campaign)
            .field("node", &self.node)
            .field("role", &self.role)
            .field("region", &self.region)
            .field("join_url", &"<redacted>")
            .finish_non_exhaustive()
    }
}
