//! The local lab (DESIGN §7): a whole hiveseed fleet on one machine, one Debian trixie chroot per
//! node, overlaid on a cached base rootfs.
//!
//! - [`cache`]: builds and finds the content-keyed cache (base rootfs, ai-memory binary, MiniLM
//!   embedder files) outside the clone.
//! - [`node`]: [`Lab`] brings nodes up ([`Lab::node_up`]), runs commands in them
//!   ([`Node::command`]) and tears everything down ([`Lab::down`]), from a state file that
//!   survives crashes.
//! - [`addr`]: the lab's loopback address plan.
//!
//! Everything here needs root (mounts, chroot, mknod).

pub mod addr;
pub mod cache;
pub mod cloud;
pub mod cmdlines;
pub mod error;
pub mod fleet;
pub mod mounts;
pub mod node;
pub mod procs;
pub mod route;
pub mod scenario;
pub mod state;
pub mod wait;

pub use addr::{NodeAddr, SEEDER_ADDR};
pub use cache::{Cache, Outcome};
pub use error::LabError;
pub use node::{Background, DownReport, Lab, Node, NodeCommand, NodeName};
