//! Who-am-i over UDP: the server tells a client the address and port it sees, like a STUN
//! binding request, on the same socket the client later uses for PTCP (so the answer is the
//! NAT mapping PTCP will get).
//!
//! ```text
//! request: version kind=0x10 | nonce (8) | zero padding to 32 bytes
//! reply:   version kind=0x11 | nonce (8) | family (4 or 6) | port (2, BE) | address (4 or 16)
//! ```

use q2q_netstack::wire::{Kind, Prefix, WireError};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// Length of a request.
/// Length of a request: padded to at least the longest reply (29 bytes), so the server never
/// sends more than it received (no amplification for a spoofed source address).
pub const REQUEST_LEN: usize = 32;

/// The request datagram for `nonce`.
pub fn request(nonce: [u8; 8]) -> [u8; REQUEST_LEN] {
    let mut out = [0u8; REQUEST_LEN];
    out[0] = q2q_netstack::wire::VERSION;
    out[1] = Kind::WhoAmIRequest as u8;
    out[2..10].copy_from_slice(&nonce);
    out
}

/// The nonce of a request datagram (already known to be of kind `WhoAmIRequest`).
pub fn parse_request(datagram: &[u8]) -> Result<[u8; 8], WireError> {
    if datagram.len() < REQUEST_LEN {
        return Err(WireError::Truncated { len: datagram.len(), need: REQUEST_LEN });
    }
    let nonce = &datagram[Prefix::LEN..Prefix::LEN + 8];
    let mut out = [0u8; 8];
    out.copy_from_slice(nonce);
    Ok(out)
}

/// The reply datagram telling the asker it is seen as `seen`.
pub fn reply(nonce: [u8; 8], seen: SocketAddr) -> Vec<u8> {
    let mut out = vec![q2q_netstack::wire::VERSION, Kind::WhoAmIReply as u8];
    out.extend_from_slice(&nonce);
    match seen.ip() {
        IpAddr::V4(ip) => {
            out.push(4);
            out.extend_from_slice(&seen.port().to_be_bytes());
            out.extend_from_slice(&ip.octets());
        }
        IpAddr::V6(ip) => {
            out.push(6);
            out.extend_from_slice(&seen.port().to_be_bytes());
            out.extend_from_slice(&ip.octets());
        }
    }
    out
}

/// The nonce and address of a reply datagram.
pub fn parse_reply(d: &[u8]) -> Result<([u8; 8], SocketAddr), WireError> {
    let prefix = Prefix::parse(d)?;
    if prefix.kind != Kind::WhoAmIReply {
        return Err(WireError::Malformed("not a who-am-i reply"));
    }
    let truncated = |need| WireError::Truncated { len: d.len(), need };
    let fixed = d.get(Prefix::LEN..Prefix::LEN + 11).ok_or(truncated(Prefix::LEN + 11))?;
    let mut nonce = [0u8; 8];
    nonce.copy_from_slice(&fixed[..8]);
    let port = u16::from_be_bytes([fixed[9], fixed[10]]);
    let addr = &d[Prefix::LEN + 11..];
    let ip = match (fixed[8], addr.len()) {
        (4, 4) => IpAddr::V4(Ipv4Addr::new(addr[0], addr[1], addr[2], addr[3])),
        (6, 16) => {
            let mut o = [0u8; 16];
            o.copy_from_slice(addr);
            IpAddr::V6(Ipv6Addr::from(o))
        }
        _ => return Err(WireError::Malformed("who-am-i reply address")),
    };
    Ok((nonce, SocketAddr::new(ip, port)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let n = *b"12345678";
        assert_eq!(parse_request(&request(n)).unwrap(), n);
        for seen in ["198.51.100.2:4000", "[fd00::1]:9"] {
            let seen: SocketAddr = seen.parse().unwrap();
            assert_eq!(parse_reply(&reply(n, seen)).unwrap(), (n, seen));
        }
        assert!(
            parse_request(&request(n)[..REQUEST_LEN - 1]).is_err(),
            "unpadded requests get no answer"
        );
        assert!(reply(n, "[fd00::1]:9".parse().unwrap()).len() <= REQUEST_LEN);
        let r = reply(n, "198.51.100.2:4000".parse().unwrap());
        for cut in 0..r.len() {
            assert!(parse_reply(&r[..cut]).is_err());
        }
    }
}
