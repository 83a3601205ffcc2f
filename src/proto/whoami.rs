//! Who-am-i over UDP: the server tells a client the address and port it sees, like a STUN
//! binding request, on the same socket the client later uses for PTCP (so the answer is the
//! NAT mapping PTCP will get).
//!
//! ```text
//! request: version kind=0x10 | nonce (8) | flags (1) | zero padding to 32 bytes
//!          (64 bytes when it asks for a proof, flag 0x04)
//! reply:   version kind=0x11 | nonce (8) | family (4 or 6) | port (2, BE) | address (4 or 16)
//!          [ | second port (2, BE; 0: none) ]   only when the request asked (flag 0x01)
//!          [ | proof (16) ]                     only when the request asked (flag 0x04)
//! ```
//!
//! The proof is the server's MAC of the address it saw (HMAC-SHA256 under a key only the
//! server holds, over the IP and a ten-minute epoch, cut to 16 bytes): whoever shows it
//! on the control connection (`also-seen`) has received a datagram at that IP lately. It
//! is how a dual-stack node gets the IP of its other family vouched for: the server sees
//! the control connection's IP itself, and peers probe only IPs the server vouches for
//! ([`crate::presence::candidates::probeable`]).
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
    /// Append the server's proof of the address seen (0x04); only honoured in a request of
    /// [`PROOF_REQUEST_LEN`] bytes, so the reply is still no bigger than the request.
    pub proof: bool,
}

/// Length of a request asking for a proof (the longest reply with one is 47 bytes).
pub const PROOF_REQUEST_LEN: usize = 64;

/// Length of a proof.
pub const PROOF_LEN: usize = 16;

impl Flags {
    const SECOND_PORT: u8 = 0x01;
    const REPLY_FROM_SECOND: u8 = 0x02;
    const PROOF: u8 = 0x04;

    fn byte(self) -> u8 {
        (if self.second_port { Self::SECOND_PORT } else { 0 })
            | (if self.reply_from_second { Self::REPLY_FROM_SECOND } else { 0 })
            | (if self.proof { Self::PROOF } else { 0 })
    }

    /// Unknown bits are ignored, so later flags do not break this server.
    fn from_byte(b: u8) -> Flags {
        Flags {
            second_port: b & Self::SECOND_PORT != 0,
            reply_from_second: b & Self::REPLY_FROM_SECOND != 0,
            proof: b & Self::PROOF != 0,
        }
    }
}

/// The request datagram for `nonce` asking for a proof of the address seen (padded to
/// [`PROOF_REQUEST_LEN`]).
pub fn request_proof(nonce: [u8; 8]) -> [u8; PROOF_REQUEST_LEN] {
    let mut out = [0u8; PROOF_REQUEST_LEN];
    out[..REQUEST_LEN]
        .copy_from_slice(&request_with(nonce, Flags { proof: true, ..Flags::default() }));
    out
}

/// The server's key for proofs of addresses seen (see the module docs). Random per server
/// process: a restart only costs nodes one more who-am-i.
pub struct ProofKey(ring::hmac::Key);

/// A proof's epoch length in seconds; the current and the previous epoch are accepted.
const EPOCH_SECS: u64 = 600;

impl std::fmt::Debug for ProofKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ProofKey(..)")
    }
}

impl ProofKey {
    /// A fresh random key.
    pub fn random() -> ProofKey {
        ProofKey(ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &rand::random::<[u8; 32]>()))
    }

    fn at_epoch(&self, ip: IpAddr, epoch: u64) -> [u8; PROOF_LEN] {
        let ip = match ip {
            IpAddr::V4(v4) => v4.to_ipv6_mapped(),
            IpAddr::V6(v6) => v6,
        };
        let mut ctx = ring::hmac::Context::with_key(&self.0);
        ctx.update(b"q2q who-am-i proof\0");
        ctx.update(&ip.octets());
        ctx.update(&epoch.to_be_bytes());
        let mut out = [0u8; PROOF_LEN];
        out.copy_from_slice(&ctx.sign().as_ref()[..PROOF_LEN]);
        out
    }

    /// The proof that `ip` was seen at `unix_secs`.
    pub fn proof(&self, ip: IpAddr, unix_secs: u64) -> [u8; PROOF_LEN] {
        self.at_epoch(ip, unix_secs / EPOCH_SECS)
    }

    /// Whether `proof` is this key's for `ip`, made in this epoch or the one before (10 to
    /// 20 minutes). Compared in constant time.
    pub fn verify(&self, ip: IpAddr, proof: &[u8; PROOF_LEN], unix_secs: u64) -> bool {
        let epoch = unix_secs / EPOCH_SECS;
        [epoch, epoch.saturating_sub(1)].into_iter().any(|e| {
            let want = self.at_epoch(ip, e);
            want.iter().zip(proof).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
        })
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
    parse_reply_full(d).map(|r| (r.nonce, r.seen, r.second_port))
}

/// A parsed reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reply {
    pub nonce: [u8; 8],
    /// The address the server saw.
    pub seen: SocketAddr,
    /// See [`parse_reply_with`].
    pub second_port: Option<u16>,
    /// The server's proof of `seen`'s IP, when asked for and given.
    pub proof: Option<[u8; PROOF_LEN]>,
}

/// The reply with a proof (asked for with [`Flags::proof`]) appended.
pub fn reply_proof(
    nonce: [u8; 8],
    seen: SocketAddr,
    second_port: Option<u16>,
    proof: [u8; PROOF_LEN],
) -> Vec<u8> {
    let mut out = reply_with(nonce, seen, second_port);
    out.extend_from_slice(&proof);
    out
}

/// Every field of a reply datagram (the trailing fields tell themselves apart by length:
/// 2 a second port, 16 a proof, 18 both).
pub fn parse_reply_full(d: &[u8]) -> Result<Reply, WireError> {
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
        (4, 4 | 6 | 20 | 22) => {
            (IpAddr::V4(Ipv4Addr::new(rest[0], rest[1], rest[2], rest[3])), &rest[4..])
        }
        (6, 16 | 18 | 32 | 34) => {
            let mut o = [0u8; 16];
            o.copy_from_slice(&rest[..16]);
            (IpAddr::V6(Ipv6Addr::from(o)), &rest[16..])
        }
        _ => return Err(WireError::Malformed("who-am-i reply address")),
    };
    let (second, proof) = tail.split_at(tail.len() % PROOF_LEN);
    let second_port = match second {
        [a, b] => Some(u16::from_be_bytes([*a, *b])),
        _ => None,
    };
    let proof = <[u8; PROOF_LEN]>::try_from(proof).ok();
    Ok(Reply { nonce, seen: SocketAddr::new(ip, port), second_port, proof })
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
            let f = Flags { second_port, reply_from_second, proof: false };
            assert_eq!(parse_request_with(&request_with(n, f)).unwrap(), (n, f));
        }
        assert_eq!(parse_request_with(&request(n)).unwrap().1, Flags::default());
        let mut unknown = request(n);
        unknown[10] = 0xf8;
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

    #[test]
    fn proofs_round_trip_and_bind_the_ip_and_the_time() {
        let n = *b"proofnon";
        let req = request_proof(n);
        let (got, f) = parse_request_with(&req).unwrap();
        assert_eq!((got, f.proof, f.second_port), (n, true, false));
        let key = ProofKey::random();
        let t = 1_800_000_000;
        for seen in ["198.51.100.2:4000", "[2001:db8::1]:9"] {
            let seen: SocketAddr = seen.parse().unwrap();
            let proof = key.proof(seen.ip(), t);
            for second in [None, Some(8789)] {
                let r = reply_proof(n, seen, second, proof);
                assert!(r.len() <= PROOF_REQUEST_LEN, "never more than the request");
                let parsed = parse_reply_full(&r).unwrap();
                assert_eq!(
                    parsed,
                    Reply { nonce: n, seen, second_port: second, proof: Some(proof) }
                );
                assert_eq!(parse_reply(&r).unwrap(), (n, seen), "older readers still parse");
            }
            assert!(key.verify(seen.ip(), &proof, t));
            assert!(key.verify(seen.ip(), &proof, t + EPOCH_SECS), "the next epoch still");
            assert!(!key.verify(seen.ip(), &proof, t + 2 * EPOCH_SECS), "stale");
            assert!(!key.verify("192.0.2.1".parse().unwrap(), &proof, t), "another IP");
            assert!(!ProofKey::random().verify(seen.ip(), &proof, t), "another server");
            let mut bent = proof;
            bent[0] ^= 1;
            assert!(!key.verify(seen.ip(), &bent, t));
        }
    }
}
