//! PROXY protocol v2 (HAProxy's binary header, as a load balancer sends it before the TLS
//! handshake): only connections from the operator's `--proxy-protocol-from` ranges may carry one,
//! and from there it must; its source address is the connection's source for the per-source cap
//! and for every handler (the enrollment's source check included).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;

use tokio::io::{AsyncRead, AsyncReadExt};

/// The 12 bytes every v2 header starts with.
pub const SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";

/// Longest address block accepted (addresses plus TLVs); a balancer sends well under this.
const MAX_LEN: usize = 1024;

/// An address range in CIDR notation (`10.0.0.0/8`, `2001:db8::/32`, or one address).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    net: IpAddr,
    prefix: u8,
}

impl Cidr {
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        match (self.net, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(n) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(n) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (addr, prefix) = s.split_once('/').unwrap_or((s, ""));
        let net: IpAddr = addr
            .parse()
            .map_err(|e| format!("{s:?}: not an address: {e}"))?;
        let max = if net.is_ipv4() { 32 } else { 128 };
        let prefix = if prefix.is_empty() {
            max
        } else {
            prefix
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("{s:?}: prefix length must be 0..={max}"))?
        };
        Ok(Self { net, prefix })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HeaderError {
    #[error("reading the PROXY header")]
    Io(#[from] std::io::Error),
    #[error("no PROXY v2 signature from a balancer that must send one")]
    NoSignature,
    #[error("PROXY header version/command byte {0:#04x} is not v2 LOCAL or PROXY")]
    VersionCommand(u8),
    #[error("PROXY header address block of {0} bytes is too long or too short for its family")]
    Length(usize),
}

/// Reads one v2 header from the start of `io` and returns the source it names; a LOCAL header
/// (the balancer's own health check) or an address family other than TCP over IPv4/IPv6 keeps
/// `peer`. Reads exactly the header, so the TLS handshake follows on the same stream.
pub async fn read_header(
    io: &mut (impl AsyncRead + Unpin),
    peer: SocketAddr,
) -> Result<SocketAddr, HeaderError> {
    let mut fixed = [0u8; 16];
    io.read_exact(&mut fixed).await?;
    if fixed[..12] != SIGNATURE {
        return Err(HeaderError::NoSignature);
    }
    let ver_cmd = fixed[12];
    let family = fixed[13];
    let len = usize::from(u16::from_be_bytes([fixed[14], fixed[15]]));
    if len > MAX_LEN {
        return Err(HeaderError::Length(len));
    }
    let mut block = vec![0u8; len];
    io.read_exact(&mut block).await?;
    match ver_cmd {
        0x20 => return Ok(peer),
        0x21 => {}
        other => return Err(HeaderError::VersionCommand(other)),
    }
    let port = |b: &[u8]| u16::from_be_bytes([b[0], b[1]]);
    match family {
        // TCP over IPv4: source, destination, source port, destination port.
        0x11 => {
            if len < 12 {
                return Err(HeaderError::Length(len));
            }
            let ip = Ipv4Addr::new(block[0], block[1], block[2], block[3]);
            Ok(SocketAddr::new(IpAddr::V4(ip), port(&block[8..10])))
        }
        // TCP over IPv6.
        0x21 => {
            if len < 36 {
                return Err(HeaderError::Length(len));
            }
            let mut a = [0u8; 16];
            a.copy_from_slice(&block[..16]);
            Ok(SocketAddr::new(
                IpAddr::V6(Ipv6Addr::from(a)),
                port(&block[32..34]),
            ))
        }
        _ => Ok(peer),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidr_contains() {
        let c: Cidr = "10.1.0.0/16".parse().unwrap();
        assert!(c.contains("10.1.200.3".parse().unwrap()));
        assert!(!c.contains("10.2.0.1".parse().unwrap()));
        assert!(c.contains("::ffff:10.1.0.9".parse().unwrap()));
        let one: Cidr = "127.0.78.50".parse().unwrap();
        assert!(one.contains("127.0.78.50".parse().unwrap()));
        assert!(!one.contains("127.0.78.51".parse().unwrap()));
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains("192.0.2.1".parse().unwrap()));
        assert!("10.0.0.0/33".parse::<Cidr>().is_err());
        assert!("fd00::/8"
            .parse::<Cidr>()
            .unwrap()
            .contains("fd12::1".parse().unwrap()));
    }

    #[tokio::test]
    async fn reads_v4_v6_and_local_headers_and_stops_at_their_end() {
        let peer: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let mut v4 = SIGNATURE.to_vec();
        v4.extend_from_slice(&[
            0x21, 0x11, 0, 12, 192, 0, 2, 7, 10, 0, 0, 1, 0x30, 0x39, 0x20, 0xfb,
        ]);
        v4.extend_from_slice(b"\x16\x03\x01");
        let mut r = &v4[..];
        assert_eq!(
            read_header(&mut r, peer).await.unwrap(),
            "192.0.2.7:12345".parse().unwrap()
        );
        assert_eq!(
            r, b"\x16\x03\x01",
            "the TLS bytes after the header are left"
        );

        let mut v6 = SIGNATURE.to_vec();
        v6.extend_from_slice(&[0x21, 0x21, 0, 36]);
        let src: Ipv6Addr = "2001:db8::5".parse().unwrap();
        v6.extend_from_slice(&src.octets());
        v6.extend_from_slice(&[0u8; 16]);
        v6.extend_from_slice(&[0x01, 0xbb, 0x20, 0xfb]);
        assert_eq!(
            read_header(&mut &v6[..], peer).await.unwrap(),
            "[2001:db8::5]:443".parse().unwrap()
        );

        let mut local = SIGNATURE.to_vec();
        local.extend_from_slice(&[0x20, 0x00, 0, 0]);
        assert_eq!(read_header(&mut &local[..], peer).await.unwrap(), peer);

        let tls = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\x00\x00\x00\x00\x00";
        assert!(matches!(
            read_header(&mut &tls[..], peer).await,
            Err(HeaderError::NoSignature)
        ));
        let mut v1 = SIGNATURE.to_vec();
        v1.extend_from_slice(&[0x11, 0x11, 0, 12]);
        v1.extend_from_slice(&[0; 12]);
        assert!(matches!(
            read_header(&mut &v1[..], peer).await,
            Err(HeaderError::VersionCommand(0x11))
        ));
    }
}
