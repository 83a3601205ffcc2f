//! Who-am-i over UDP: the server tells a client the address and port it sees, like a STUN
//! binding request, on the same socket the client later uses for PTCP (so the answer is the
//! NAT mapping PTCP will get).
//!
//! ```text
//! request: version kind=0x10 | nonce (8) | flags (1) | zero padding to 32 bytes
//! reply:   version kind=0x11 | nonce (8) | family (4 or 6) | port (2, BE) | address (4 or 16)
//!          [ | second port (2, BE; 0: none) ]   only when the request asked (flag 0x01)
//! ```
//!
//! The flags byte was padding before, so older servers ignore it and answer the plain reply.
//! They serve NAT behaviour discovery in the way of RFC 5780 (with a second port, not a
//! second address): `q2q-tun netcheck` asks the server's second UDP port from the same socket
//! to see whether the NAT keeps one mapping for both destinations (section 4.3), and asks
//! for an answer *from* the second port to see whether the NAT lets in datagrams from a port
//! the socket never sent to (section 4.4, filtering).

use q2q_netstack::wire::{Kind, Prefix, WireError};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// Length of a request: padded to at least the longest reply (29 bytes), so the server never
/// sends more than it received (no amplification for a spoofed source address).
pub const REQUEST_LEN: usize = 32;

/// What a request asks beyond the plain answer (the byte after the nonce).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Flags {
    /// Put the server's second UDP port in the reply (0x01).
    pub second_port: bool,
    /// Send the reply from the second port instead of the one asked (0x02).
    pub reply_from_second: bool,
}

impl Flags {
    const SECOND_PORT: u8 = 0x01;
    const REPLY_FROM_SECOND: u8 = 0x02;

    fn byte(self) -> u8 {
        (if self.second_port { Self::SECOND_PORT } else { 0 })
            | (if self.reply_from_second { Self::REPLY_FROM_SECOND } else { 0 })
    }

    /// Unknown bits are ignored, so later flags do not break this server.
    fn from_byte(b: u8) -> Flags {
        Flags {
            second_port: b & Self::SECOND_PORT != 0,
            reply_from_second: b & Self::REPLY_FROM_SECOND != 0,
        }
    }
}

/// The request datagram for `nonce`.
pub fn request(nonce: [u8; 8]) -> [u8; REQUEST_LEN] {
    request_with(nonce, Flags::default())
}

/// The request datagram for `nonce` asking what `flags` say.
pub fn request_with(nonce: [u8; 8], flags: Flags) -> [u8; REQUEST_LEN] {
    let mut out = [0u8; REQUEST_LEN];
    out[0] = q2q_netstack::wire::VERSION;
    out[1] = Kind::WhoAmIRequest as u8;
    out[2..10].copy_from_slice(&nonce);
    out[10] = flags.byte();
    out
}

/// The nonce of a request datagram (already known to be of kind `WhoAmIRequest`).
pub fn parse_request(datagram: &[u8]) -> Result<[u8; 8], WireError> {
    parse_request_with(datagram).map(|(nonce, _)| nonce)
}

/// The nonce and flags of a request datagram (already known to be of kind `WhoAmIRequest`).
pub fn parse_request_with(datagram: &[u8]) -> Result<([u8; 8], Flags), WireError> {
    if datagram.len() < REQUEST_LEN {
        return Err(WireError::Truncated { len: datagram.len(), need: REQUEST_LEN });
    }
    let nonce = &datagram[Prefix::LEN..Prefix::LEN + 8];
    let mut out = [0u8; 8];
    out.copy_from_slice(nonce);
    Ok((out, Flags::from_byte(datagram[Prefix::LEN + 8])))
}

/// The reply datagram telling the asker it is seen as `seen`; with `second_port` (the
/// request asked for it) the server's second UDP port follows, 0 when it has none.
pub fn reply_with(nonce: [u8; 8], seen: SocketAddr, second_port: Option<u16>) -> Vec<u8> {
    let mut out = reply(nonce, seen);
    if let Some(port) = second_port {
        out.extend_from_slice(&port.to_be_bytes());
    }
    out
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

/// The nonce and address of a reply datagram (a second port, if any, is ignored).
pub fn parse_reply(d: &[u8]) -> Result<([u8; 8], SocketAddr), WireError> {
    parse_reply_with(d).map(|(nonce, seen, _)| (nonce, seen))
}

/// The nonce, address and second port of a reply datagram: `None` when the reply has no
/// second-port field (an older server, or not asked), `Some(0)` when the server has no
/// second port.
pub fn parse_reply_with(d: &[u8]) -> Result<([u8; 8], SocketAddr, Option<u16>), WireError> {
    let prefix = Prefix::parse(d)?;
    if prefix.kind != Kind::WhoAmIReply {
        return Err(WireError::Malformed("not a who-am-i reply"));
    }
    let truncated = |need| WireError::Truncated { len: d.len(), need };
    let fixed = d.get(Prefix::LEN..Prefix::LEN + 11).ok_or(truncated(Prefix::LEN + 11))?;
    let mut nonce = [0u8; 8];
    nonce.copy_from_slice(&fixed[..8]);
    let port = u16::from_be_bytes([fixed[9], fixed[10]]);
    let rest = &d[Prefix::LEN + 11..];
    let (ip, tail) = match (fixed[8], rest.len()) {
        (4, 4 | 6) => (IpAddr::V4(Ipv4Addr::new(rest[0], rest[1], rest[2], rest[3])), &rest[4..]),
        (6, 16 | 18) => {
            let mut o = [0u8; 16];
            o.copy_from_slice(&rest[..16]);
            (IpAddr::V6(Ipv6Addr::from(o)), &rest[16..])
        }
        _ => return Err(WireError::Malformed("who-am-i reply address")),
    };
    let second = match tail {
        [a, b] => Some(u16::from_be_bytes([*a, *b])),
        _ => None,
    };
    Ok((nonce, SocketAddr::new(ip, port), second))
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

    #[test]
    fn flags_and_second_port_round_trip() {
        let n = *b"abcdefgh";
        for (second_port, reply_from_second) in
            [(false, false), (true, false), (false, true), (true, true)]
        {
            let f = Flags { second_port, reply_from_second };
            assert_eq!(parse_request_with(&request_with(n, f)).unwrap(), (n, f));
        }
        assert_eq!(parse_request_with(&request(n)).unwrap().1, Flags::default());
        let mut unknown = request(n);
        unknown[10] = 0xfc;
        assert_eq!(parse_request_with(&unknown).unwrap().1, Flags::default());
        for seen in ["198.51.100.2:4000", "[2001:db8::1]:9"] {
            let seen: SocketAddr = seen.parse().unwrap();
            for second in [None, Some(0), Some(8789)] {
                let r = reply_with(n, seen, second);
                assert!(r.len() <= REQUEST_LEN, "never more than the request");
                assert_eq!(parse_reply_with(&r).unwrap(), (n, seen, second));
                assert_eq!(parse_reply(&r).unwrap(), (n, seen), "older readers still parse");
                for cut in 0..Prefix::LEN + 11 + if seen.is_ipv4() { 4 } else { 16 } {
                    assert!(parse_reply_with(&r[..cut]).is_err());
                }
            }
            let mut odd = reply_with(n, seen, Some(1));
            odd.push(0);
            assert!(parse_reply_with(&odd).is_err(), "a stray byte is malformed");
        }
    }
}
