//! The lab's address plan: every node and the seeder get their own loopback address.
//!
//! All nodes share the host's `lo`. Binding any `127.x.y.z` works without `ip addr add`
//! (lab-feasibility §8), so this module only computes addresses; it configures nothing.
//! Region R, node N: private `127.0.R.N`, public `127.1.R.N`; the seeder is `127.0.9.1`.

use std::fmt;
use std::net::Ipv4Addr;

/// The seeder's address. Region 9 is reserved for it.
pub const SEEDER_ADDR: Ipv4Addr = Ipv4Addr::new(127, 0, 9, 1);

/// Region number reserved for the seeder's own `127.0.9.x` block.
const SEEDER_REGION: u8 = 9;

/// A region/node pair that is valid in the lab's address plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeAddr {
    region: u8,
    node: u8,
}

/// Why a region/node pair has no lab address.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddrError {
    #[error("region {0} is outside 1..=254 or is the seeder's region 9")]
    Region(u8),
    #[error("node {0} is outside 1..=254")]
    Node(u8),
}

impl NodeAddr {
    /// Region 1..=254 except 9 (the seeder's), node 1..=254 (0 and 255 would be the network and
    /// broadcast addresses of a /24 and confuse anyone reading pg_hba.conf).
    pub fn new(region: u8, node: u8) -> Result<Self, AddrError> {
        if region == 0 || region == 255 || region == SEEDER_REGION {
            return Err(AddrError::Region(region));
        }
        if node == 0 || node == 255 {
            return Err(AddrError::Node(node));
        }
        Ok(Self { region, node })
    }

    pub fn region(self) -> u8 {
        self.region
    }

    pub fn node(self) -> u8 {
        self.node
    }

    /// `127.0.R.N`: the node's VPC-side address.
    pub fn private(self) -> Ipv4Addr {
        Ipv4Addr::new(127, 0, self.region, self.node)
    }

    /// `127.1.R.N`: the node's internet-side address.
    pub fn public(self) -> Ipv4Addr {
        Ipv4Addr::new(127, 1, self.region, self.node)
    }

    /// The region's private /24 (`127.0.R.0/24`), as used in pg_hba.conf lines.
    pub fn private_cidr(self) -> String {
        format!("127.0.{}.0/24", self.region)
    }
}

impl fmt::Display for NodeAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "r{}n{}", self.region, self.node)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_matches_design() {
        let a = NodeAddr::new(2, 10).unwrap();
        assert_eq!(a.private(), Ipv4Addr::new(127, 0, 2, 10));
        assert_eq!(a.public(), Ipv4Addr::new(127, 1, 2, 10));
        assert_eq!(a.private_cidr(), "127.0.2.0/24");
        assert_eq!(a.to_string(), "r2n10");
    }

    #[test]
    fn seeder_region_and_edges_are_refused() {
        assert_eq!(NodeAddr::new(9, 1), Err(AddrError::Region(9)));
        assert_eq!(NodeAddr::new(0, 1), Err(AddrError::Region(0)));
        assert_eq!(NodeAddr::new(255, 1), Err(AddrError::Region(255)));
        assert_eq!(NodeAddr::new(1, 0), Err(AddrError::Node(0)));
        assert_eq!(NodeAddr::new(1, 255), Err(AddrError::Node(255)));
        assert!(NodeAddr::new(254, 254).is_ok());
    }

    #[test]
    fn no_node_address_is_the_seeders() {
        for r in 1..=254u8 {
            for n in [1u8, 254] {
                if let Ok(a) = NodeAddr::new(r, n) {
                    assert_ne!(a.private(), SEEDER_ADDR);
                    assert_ne!(a.public(), SEEDER_ADDR);
                }
            }
        }
    }
}
