//! The hiveseed seeder: campaign PKI, fleet description, enrollment, signed manifests, status.

pub mod api;
pub mod artifact;
pub mod attest;
pub mod campaign;
pub mod cli;
pub mod conn;
pub mod credential;
pub mod digitalocean;
pub mod error;
pub mod fleet;
#[doc(hidden)]
pub mod fuzz;
pub mod limit;
pub mod pki;
pub mod proxy_protocol;
pub mod quote;
pub mod refusal;
pub mod render;
pub mod report;
pub mod state;
pub mod store;
pub mod suite;
pub mod tls;
