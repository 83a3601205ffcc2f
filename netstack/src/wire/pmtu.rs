//! The path-MTU probe and its acknowledgement (DPLPMTUD, RFC 8899 §4.1: padded probe
//! packets, confirmed by the peer, never relying on ICMP).
//!
//! ```text
//!  PmtuProbe:
//!  0      2              10          14
//!  +------+--------------+-----------+------------------------------------------
//!  |prefix| session id   | probe id  | padding (zeros) up to the probed size:
//!  | 1,04 | u64 BE       | u32 BE    | the datagram's own length is the size
//!  +------+--------------+-----------+------------------------------------------
//!
//!  PmtuAck:
//!  0      2              10          14       16
//!  +------+--------------+-----------+--------+
//!  |prefix| session id   | probe id  | size   |  the length of the probe received
//!  | 1,05 | u64 BE       | u32 BE    | u16 BE |
//!  +------+--------------+-----------+--------+
//! ```
//!
//! Probes are not sequenced: a lost probe is never retransmitted as such, it only tells the
//! searching side that the size did not pass. The ack is small, so a probe cannot be used to
//! make a peer send more than it received.

use super::data::be;
use super::{Kind, Prefix, SessionId, WireError};

/// A checked `PmtuProbe` datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PmtuProbe {
    /// The peer session it belongs to.
    pub session: SessionId,
    /// Chosen by the sender, echoed in the ack.
    pub id: u32,
    /// Length of the whole datagram in bytes (what the path carried).
    pub size: usize,
}

impl PmtuProbe {
    /// The smallest probe: prefix, session id and probe id, no padding.
    pub const HEADER_LEN: usize = Prefix::LEN + 8 + 4;

    /// Parse a whole datagram, prefix included. The padding is not looked at.
    pub fn parse(datagram: &[u8]) -> Result<PmtuProbe, WireError> {
        let prefix = Prefix::parse(datagram)?;
        if prefix.kind != Kind::PmtuProbe {
            return Err(WireError::Malformed("not a pmtu probe"));
        }
        let Some(head) = datagram.get(..Self::HEADER_LEN) else {
            return Err(WireError::Truncated { len: datagram.len(), need: Self::HEADER_LEN });
        };
        Ok(PmtuProbe {
            session: SessionId(u64::from_be_bytes(be(&head[2..10]))),
            id: u32::from_be_bytes(be(&head[10..14])),
            size: datagram.len(),
        })
    }

    /// Append a probe of `size` bytes (at least [`PmtuProbe::HEADER_LEN`]) to `out`.
    pub fn emit(session: SessionId, id: u32, size: usize, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(&[super::VERSION, Kind::PmtuProbe as u8]);
        out.extend_from_slice(&session.0.to_be_bytes());
        out.extend_from_slice(&id.to_be_bytes());
        out.resize(start + size.max(Self::HEADER_LEN), 0);
    }
}

/// A checked `PmtuAck` datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PmtuAck {
    /// The peer session it belongs to.
    pub session: SessionId,
    /// The id of the probe acknowledged.
    pub id: u32,
    /// The length of that probe as received, in bytes (saturated at 65535).
    pub size: u16,
}

impl PmtuAck {
    /// Length of the datagram in bytes.
    pub const LEN: usize = Prefix::LEN + 8 + 4 + 2;

    /// Parse a whole datagram, prefix included.
    pub fn parse(datagram: &[u8]) -> Result<PmtuAck, WireError> {
        let prefix = Prefix::parse(datagram)?;
        if prefix.kind != Kind::PmtuAck {
            return Err(WireError::Malformed("not a pmtu ack"));
        }
        if datagram.len() != Self::LEN {
            return Err(if datagram.len() < Self::LEN {
                WireError::Truncated { len: datagram.len(), need: Self::LEN }
            } else {
                WireError::Malformed("trailing bytes after pmtu ack")
            });
        }
        Ok(PmtuAck {
            session: SessionId(u64::from_be_bytes(be(&datagram[2..10]))),
            id: u32::from_be_bytes(be(&datagram[10..14])),
            size: u16::from_be_bytes(be(&datagram[14..16])),
        })
    }

    /// Append the ack of a probe to `out`.
    pub fn emit(session: SessionId, id: u32, size: usize, out: &mut Vec<u8>) {
        out.extend_from_slice(&[super::VERSION, Kind::PmtuAck as u8]);
        out.extend_from_slice(&session.0.to_be_bytes());
        out.extend_from_slice(&id.to_be_bytes());
        out.extend_from_slice(&u16::try_from(size).unwrap_or(u16::MAX).to_be_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn round_trip(session: u64, id: u32, size in 0usize..3000) {
            let mut out = Vec::new();
            PmtuProbe::emit(SessionId(session), id, size, &mut out);
            prop_assert_eq!(out.len(), size.max(PmtuProbe::HEADER_LEN));
            let p = PmtuProbe::parse(&out).unwrap();
            prop_assert_eq!(p, PmtuProbe { session: SessionId(session), id, size: out.len() });
            let mut ack = Vec::new();
            PmtuAck::emit(p.session, p.id, p.size, &mut ack);
            let a = PmtuAck::parse(&ack).unwrap();
            prop_assert_eq!(a, PmtuAck { session: SessionId(session), id, size: p.size as u16 });
        }

        #[test]
        fn parse_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..40), k in 4u8..6) {
            let mut b = bytes;
            if b.len() >= 2 { b[0] = 1; b[1] = k; }
            let _ = PmtuProbe::parse(&b);
            let _ = PmtuAck::parse(&b);
        }
    }

    #[test]
    fn rejects() {
        assert!(PmtuProbe::parse(&[1, 4, 0]).is_err());
        let mut ack = Vec::new();
        PmtuAck::emit(SessionId(1), 2, 70_000, &mut ack);
        assert_eq!(PmtuAck::parse(&ack).unwrap().size, u16::MAX);
        ack.push(0);
        assert!(PmtuAck::parse(&ack).is_err());
    }
}
