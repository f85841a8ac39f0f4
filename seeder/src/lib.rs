//! The hiveseed seeder: campaign PKI, fleet description, enrollment, signed manifests, status.

pub mod campaign;
pub mod cli;
pub mod fleet;
pub mod pki;
