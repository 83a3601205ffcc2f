//! Who-am-i over UDP: the server tells a client the address and port it sees, like a STUN
//! binding request, on the same socket the client later uses for PTCP (so the answer is the
//! NAT mapping PTCP will get).
//!
//! ```text
//! request: version kind=0x10 | nonce (8) | flags (1) | zero padding to Flags::request_len
//!          (32 bytes; 64 or 96 when the reply the flags ask for may be longer than 32)
//! reply:   version kind=0x11 | nonce (8) | family (4 or 6) | port (2, BE) | address (4 or 16)
//!          then, each present exactly when the request asked for it, in this order:
//!          [ | second port (2, BE; 0: none) ]                              flag 0x01
//!          [ | family (0, 4 or 6) | port (2, BE) | address (0, 4 or 16) ]  flag 0x08
//!          [ | proof (16) ]                                                flag 0x04
//! flag 0x02 adds no field: the reply comes from the server's second socket.
//! ```
//!
//! The trailing fields are never told apart by their length: the asker knows the flags it
//! sent, so it reads exactly the fields they name, in the order above, and a reply with a
//! byte more or less is rejected ([`Reply::parse`]). A server honours every flag it knows
//! when the request is long enough for the longest reply those flags may ask for
//! ([`Flags::request_len`]: never more bytes out than in, so no amplification for a spoofed
//! source address); otherwise, and in a server older than the flags, the flags are ignored
//! and the reply is the plain one. [`Reply::parse_answer`] reads either.
//!
//! The proof (flag 0x04) is the server's MAC of the address it saw (HMAC-SHA256 under a key
//! only the server holds, over the IP and a ten-minute epoch, cut to 16 bytes): whoever shows
//! it on the control connection (`also-seen`) has received a datagram at that IP lately. It
//! is how a dual-stack node gets the IP of its other family vouched for: the server sees
//! the control connection's IP itself, and peers probe only IPs the server vouches for
//! ([`crate::presence::candidates::probeable`]).
//!
//! The second socket (flags 0x01, 0x02, 0x08) serves NAT behaviour discovery in the way of
//! RFC 5780: `q2q-tun netcheck` asks the server's second socket from the same socket to see
//! whether the NAT keeps one mapping for both destinations (section 4.3), and asks for an
//! answer *from* the second socket to see whether the NAT lets in datagrams from where the
//! socket never sent to (section 4.4, filtering). The second socket is a second port of the
//! server's address, or, where the server has one (`second_udp_addr`), a second address:
//! RFC 5780's own test, which also tells a NAT that maps per destination address. Its address
//! field (flag 0x08) has family 0, port 0 and no address when the server has no second
//! address of the asker's family.

use q2q_netstack::wire::{Kind, Prefix, WireError};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// Length of the shortest request: padded to at least the longest plain reply (29 bytes),
/// so the server never sends more than it received.
pub const REQUEST_LEN: usize = 32;

/// Length of a proof.
pub const PROOF_LEN: usize = 16;

/// Lengths of the reply's parts: the fixed part with an IPv6 address seen (the longest),
/// the second port, the second address (IPv6, the longest) and the proof.
const PLAIN_MAX: usize = Prefix::LEN + 8 + 19;
const SECOND_PORT_LEN: usize = 2;
const SECOND_ADDR_MAX: usize = 19;

/// What a request asks beyond the plain answer (the byte after the nonce).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Flags {
    /// Put the server's second UDP port in the reply (0x01).
    pub second_port: bool,
    /// Send the reply from the second socket instead of the one asked (0x02).
    pub reply_from_second: bool,
    /// Append the server's proof of the address seen (0x04).
    pub proof: bool,
    /// Put the second socket's address in the reply (0x08).
    pub second_addr: bool,
}

impl Flags {
    /// No flags: the plain reply (the `Default`, usable in a `const`).
    pub const NONE: Flags =
        Flags { second_port: false, reply_from_second: false, proof: false, second_addr: false };

    const SECOND_PORT: u8 = 0x01;
    const REPLY_FROM_SECOND: u8 = 0x02;
    const PROOF: u8 = 0x04;
    const SECOND_ADDR: u8 = 0x08;

    /// The flags as the request's byte.
    pub fn byte(self) -> u8 {
        (if self.second_port { Self::SECOND_PORT } else { 0 })
            | (if self.reply_from_second { Self::REPLY_FROM_SECOND } else { 0 })
            | (if self.proof { Self::PROOF } else { 0 })
            | (if self.second_addr { Self::SECOND_ADDR } else { 0 })
    }

    /// The flags of a request's byte. Unknown bits are ignored, so later flags do not break
    /// this server (the asker then gets a reply without their fields).
    pub fn from_byte(b: u8) -> Flags {
        Flags {
            second_port: b & Self::SECOND_PORT != 0,
            reply_from_second: b & Self::REPLY_FROM_SECOND != 0,
            proof: b & Self::PROOF != 0,
            second_addr: b & Self::SECOND_ADDR != 0,
        }
    }

    /// The longest reply these flags may ask for, in bytes (an IPv6 address seen, an IPv6
    /// second address).
    fn longest_reply(self) -> usize {
        PLAIN_MAX
            + if self.second_port { SECOND_PORT_LEN } else { 0 }
            + if self.second_addr { SECOND_ADDR_MAX } else { 0 }
            + if self.proof { PROOF_LEN } else { 0 }
    }

    /// The length of a request with these flags, in bytes: the smallest multiple of
    /// [`REQUEST_LEN`] that holds the longest reply they may ask for (32, 64 or 96).
    pub fn request_len(self) -> usize {
        self.longest_reply().div_ceil(REQUEST_LEN) * REQUEST_LEN
    }
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
pub fn request(nonce: [u8; 8]) -> Vec<u8> {
    request_with(nonce, Flags::default())
}

/// The request datagram for `nonce` asking what `flags` say, [`Flags::request_len`] long.
pub fn request_with(nonce: [u8; 8], flags: Flags) -> Vec<u8> {
    let mut out = vec![0u8; flags.request_len()];
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

/// The nonce and the flags to honour of a request datagram (already known to be of kind
/// `WhoAmIRequest`): the flags it asks for, or none of the reply's fields when the request
/// is shorter than [`Flags::request_len`] of its flags (the reply is then the plain one).
///
/// # Errors
/// `Truncated` under [`REQUEST_LEN`] bytes (unpadded requests get no answer).
pub fn parse_request_with(datagram: &[u8]) -> Result<([u8; 8], Flags), WireError> {
    if datagram.len() < REQUEST_LEN {
        return Err(WireError::Truncated { len: datagram.len(), need: REQUEST_LEN });
    }
    let mut nonce = [0u8; 8];
    nonce.copy_from_slice(&datagram[Prefix::LEN..Prefix::LEN + 8]);
    let mut flags = Flags::from_byte(datagram[Prefix::LEN + 8]);
    if datagram.len() < flags.request_len() {
        flags = Flags { reply_from_second: flags.reply_from_second, ..Flags::default() };
    }
    Ok((nonce, flags))
}

/// A who-am-i reply. Each optional field is `Some` exactly when the reply carries it, that
/// is when the request asked for it and the server honoured the flag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reply {
    pub nonce: [u8; 8],
    /// The address the server saw.
    pub seen: SocketAddr,
    /// The server's second UDP port (flag 0x01); `Some(0)` when it has none.
    pub second_port: Option<u16>,
    /// The server's second socket's address (flag 0x08); `Some(None)` when it has none of
    /// the asker's family.
    pub second_addr: Option<Option<SocketAddr>>,
    /// The server's proof of `seen`'s IP (flag 0x04).
    pub proof: Option<[u8; PROOF_LEN]>,
}

impl Reply {
    /// The plain reply: the address seen and nothing more.
    pub fn plain(nonce: [u8; 8], seen: SocketAddr) -> Reply {
        Reply { nonce, seen, second_port: None, second_addr: None, proof: None }
    }

    /// The flags whose fields this reply carries.
    pub fn fields(&self) -> Flags {
        Flags {
            second_port: self.second_port.is_some(),
            reply_from_second: false,
            proof: self.proof.is_some(),
            second_addr: self.second_addr.is_some(),
        }
    }

    /// The datagram, its fields in the module's order. No longer than a request asking for
    /// its fields ([`Flags::request_len`]).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![q2q_netstack::wire::VERSION, Kind::WhoAmIReply as u8];
        out.extend_from_slice(&self.nonce);
        put_addr(&mut out, Some(self.seen));
        if let Some(port) = self.second_port {
            out.extend_from_slice(&port.to_be_bytes());
        }
        if let Some(addr) = self.second_addr {
            put_addr(&mut out, addr);
        }
        if let Some(proof) = self.proof {
            out.extend_from_slice(&proof);
        }
        out
    }

    /// The reply to a request that asked for `asked`: exactly the fields `asked` names, in
    /// the module's order, and nothing after them.
    ///
    /// # Errors
    /// `Malformed` for another kind, an unknown family or bytes left over; `Truncated` when
    /// a field is cut short (such as a server that ignored a flag: see
    /// [`Reply::parse_answer`]).
    pub fn parse(d: &[u8], asked: Flags) -> Result<Reply, WireError> {
        let prefix = Prefix::parse(d)?;
        if prefix.kind != Kind::WhoAmIReply {
            return Err(WireError::Malformed("not a who-am-i reply"));
        }
        let mut r = Reader { d, at: Prefix::LEN };
        let nonce = r.take::<8>()?;
        let seen = r.addr()?.ok_or(WireError::Malformed("who-am-i reply without an address"))?;
        let second_port =
            if asked.second_port { Some(u16::from_be_bytes(r.take()?)) } else { None };
        let second_addr = if asked.second_addr { Some(r.addr()?) } else { None };
        let proof = if asked.proof { Some(r.take::<PROOF_LEN>()?) } else { None };
        if r.at != d.len() {
            return Err(WireError::Malformed("bytes after the who-am-i reply's fields"));
        }
        Ok(Reply { nonce, seen, second_port, second_addr, proof })
    }

    /// The answer to a request that asked for `asked`: the reply with those fields, or the
    /// plain reply of a server that ignored the flags (too short a request, an older server).
    ///
    /// # Errors
    /// What [`Reply::parse`] says of the reply with the asked fields.
    pub fn parse_answer(d: &[u8], asked: Flags) -> Result<Reply, WireError> {
        Reply::parse(d, asked).or_else(|e| Reply::parse(d, Flags::default()).map_err(|_| e))
    }
}

/// family (4 or 6) | port | address, or family 0 | port 0 for none.
fn put_addr(out: &mut Vec<u8>, a: Option<SocketAddr>) {
    match a {
        None => out.extend_from_slice(&[0, 0, 0]),
        Some(a) => {
            out.push(if a.is_ipv4() { 4 } else { 6 });
            out.extend_from_slice(&a.port().to_be_bytes());
            match a.ip() {
                IpAddr::V4(ip) => out.extend_from_slice(&ip.octets()),
                IpAddr::V6(ip) => out.extend_from_slice(&ip.octets()),
            }
        }
    }
}

/// Reads a reply's fields in order; every read is bounds-checked.
struct Reader<'a> {
    d: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn take<const N: usize>(&mut self) -> Result<[u8; N], WireError> {
        let need = self.at + N;
        let got =
            self.d.get(self.at..need).ok_or(WireError::Truncated { len: self.d.len(), need })?;
        self.at = need;
        let mut out = [0u8; N];
        out.copy_from_slice(got);
        Ok(out)
    }

    /// family | port | address; `None` for family 0 with port 0.
    fn addr(&mut self) -> Result<Option<SocketAddr>, WireError> {
        let [family] = self.take::<1>()?;
        let port = u16::from_be_bytes(self.take()?);
        let ip = match family {
            0 if port == 0 => return Ok(None),
            4 => IpAddr::V4(Ipv4Addr::from(self.take::<4>()?)),
            6 => IpAddr::V6(Ipv6Addr::from(self.take::<16>()?)),
            _ => return Err(WireError::Malformed("who-am-i reply address")),
        };
        Ok(Some(SocketAddr::new(ip, port)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const ALL_FLAGS: std::ops::Range<u8> = 0..16;

    /// The fields of a reply to `f` (`reply_from_second` adds none).
    fn fields(f: Flags) -> Flags {
        Flags { reply_from_second: false, ..f }
    }

    fn addr() -> impl Strategy<Value = SocketAddr> {
        prop_oneof![
            any::<([u8; 4], u16)>().prop_map(|(ip, p)| SocketAddr::from((ip, p))),
            any::<([u8; 16], u16)>().prop_map(|(ip, p)| SocketAddr::from((ip, p))),
        ]
    }

    /// Every reply any request may get: each combination of fields, both families.
    fn reply() -> impl Strategy<Value = Reply> {
        (
            any::<[u8; 8]>(),
            addr(),
            proptest::option::of(any::<u16>()),
            proptest::option::of(proptest::option::of(addr())),
            proptest::option::of(any::<[u8; PROOF_LEN]>()),
        )
            .prop_map(|(nonce, seen, second_port, second_addr, proof)| Reply {
                nonce,
                seen,
                second_port,
                second_addr,
                proof,
            })
    }

    proptest! {
        /// Every combination of fields round-trips through the flags that ask for it, fits
        /// in the request that asks, and every cut or extended datagram is rejected.
        #[test]
        fn every_reply_round_trips_and_no_cut_parses(r in reply(), extra in any::<u8>()) {
            let asked = r.fields();
            let d = r.encode();
            prop_assert!(d.len() <= asked.request_len(), "never more than the request");
            prop_assert_eq!(Reply::parse(&d, asked), Ok(r));
            prop_assert_eq!(Reply::parse(&d, Flags { reply_from_second: true, ..asked }), Ok(r));
            prop_assert_eq!(Reply::parse_answer(&d, asked), Ok(r));
            let plain = Reply::plain(r.nonce, r.seen);
            for cut in 0..d.len() {
                prop_assert!(Reply::parse(&d[..cut], asked).is_err());
                // Cut right after the address seen, it is the plain reply of a server that
                // ignored the flags, and read as that: without any of the fields.
                match Reply::parse_answer(&d[..cut], asked) {
                    Ok(got) => prop_assert_eq!((got, cut), (plain, plain.encode().len())),
                    Err(_) => prop_assert!(cut != plain.encode().len()),
                }
            }
            let mut longer = d.clone();
            longer.push(extra);
            prop_assert!(Reply::parse(&longer, asked).is_err(), "a stray byte is malformed");
        }

        /// A plain reply (a server that ignored the flags) is read as plain whatever was
        /// asked, and never as carrying fields.
        #[test]
        fn a_plain_answer_reads_as_plain(nonce in any::<[u8; 8]>(), seen in addr()) {
            let d = Reply::plain(nonce, seen).encode();
            for b in ALL_FLAGS {
                let asked = Flags::from_byte(b);
                prop_assert_eq!(Reply::parse_answer(&d, asked), Ok(Reply::plain(nonce, seen)));
                if fields(asked) != Flags::default() {
                    prop_assert!(Reply::parse(&d, asked).is_err());
                }
            }
        }

        /// Any bytes at all: no panic, and whatever parses encodes back to the same bytes
        /// (one reading per datagram and flags).
        #[test]
        fn any_bytes_parse_without_panic(d in proptest::collection::vec(any::<u8>(), 0..80)) {
            let _ = parse_request_with(&d);
            for b in ALL_FLAGS {
                let asked = Flags::from_byte(b);
                if let Ok(r) = Reply::parse(&d, asked) {
                    prop_assert_eq!(r.fields(), fields(asked));
                    prop_assert_eq!(r.encode(), d.clone());
                }
            }
        }
    }

    #[test]
    fn requests_round_trip_and_short_ones_get_the_plain_reply() {
        let n = *b"12345678";
        for b in ALL_FLAGS {
            let f = Flags::from_byte(b);
            assert_eq!(f.byte(), b);
            let r = request_with(n, f);
            assert_eq!(r.len(), f.request_len());
            assert!([32, 64, 96].contains(&r.len()));
            assert_eq!(parse_request_with(&r).unwrap(), (n, f));
            assert_eq!(parse_request(&r).unwrap(), n);
            // Cut to the shortest request: the flags whose reply would not fit are dropped.
            let (_, short) = parse_request_with(&r[..REQUEST_LEN]).unwrap();
            let expect = if f.request_len() > REQUEST_LEN {
                Flags { reply_from_second: f.reply_from_second, ..Flags::default() }
            } else {
                f
            };
            assert_eq!(short, expect);
            assert!(parse_request(&r[..REQUEST_LEN - 1]).is_err(), "unpadded: no answer");
        }
        assert_eq!(request(n).len(), REQUEST_LEN);
        assert_eq!(Flags { proof: true, ..Flags::default() }.request_len(), 64);
        assert_eq!(Flags { second_addr: true, proof: true, ..Flags::default() }.request_len(), 64);
        assert_eq!(Flags::from_byte(0x0d).request_len(), 96);
        let mut unknown = request(n);
        unknown[10] = 0xf0;
        assert_eq!(parse_request_with(&unknown).unwrap().1, Flags::default());
    }

    #[test]
    fn the_fields_keep_their_order() {
        let n = *b"abcdefgh";
        let seen: SocketAddr = "198.51.100.2:4000".parse().unwrap();
        let r = Reply {
            second_port: Some(8789),
            second_addr: Some(Some("203.0.113.1:8790".parse().unwrap())),
            proof: Some([0xaa; PROOF_LEN]),
            ..Reply::plain(n, seen)
        };
        let d = r.encode();
        let fixed = Prefix::LEN + 8 + 7;
        assert_eq!(d[fixed..fixed + 2], 8789u16.to_be_bytes());
        assert_eq!(d[fixed + 2..fixed + 9], [4, 0x22, 0x56, 203, 0, 113, 1]);
        assert_eq!(d[fixed + 9..], [0xaa; PROOF_LEN]);
        // A reply with the port and the proof but not the address (a server that does not
        // know flag 0x08) is not misread as having one.
        let no_addr = Reply { second_addr: None, ..r }.encode();
        assert!(Reply::parse(&no_addr, r.fields()).is_err());
        // Family 0 with a port, or an unknown family, is malformed.
        let mut bad = Reply::plain(n, seen).encode();
        bad.extend_from_slice(&[0, 0, 1]);
        assert!(Reply::parse(&bad, Flags { second_addr: true, ..Flags::default() }).is_err());
        let mut unknown = Reply::plain(n, seen).encode();
        unknown[Prefix::LEN + 8] = 5;
        assert!(Reply::parse(&unknown, Flags::default()).is_err());
    }

    #[test]
    fn proofs_bind_the_ip_and_the_time() {
        let key = ProofKey::random();
        let t = 1_800_000_000;
        for seen in ["198.51.100.2:4000", "[2001:db8::1]:9"] {
            let seen: SocketAddr = seen.parse().unwrap();
            let proof = key.proof(seen.ip(), t);
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
