//! The `Fragment` datagram: one piece of an IP packet whose `Data` datagram would exceed the
//! path's current PLPMTU (see [`crate::pmtu`]).
//!
//! ```text
//!  0      2              10         14         18       20       22
//!  +------+--------------+----------+----------+--------+--------+------------------------
//!  |prefix| session id   | seq (lo) | pn (lo)  | offset | total  | bytes [offset, offset +
//!  | 1,03 | u64 BE       | u32 BE   | u32 BE   | u16 BE | u16 BE | len) of the IP packet
//!  +------+--------------+----------+----------+--------+--------+------------------------
//! ```
//!
//! * `seq` and `pn` mean what they mean in [`super::Data`]: every fragment of one
//!   transmission carries the same pair, and the receiver acknowledges the `seq` only once
//!   it holds all `total` bytes. A retransmission may be split at other offsets (it is split
//!   at the PLPMTU of its own time), so the receiver reassembles by byte ranges, not by
//!   fragment number.
//! * `offset < total`, `len ≥ 1` and `offset + len ≤ total` are checked by
//!   [`Fragment::parse`]; `total` is at most 65535 bytes on the wire and bounded further by
//!   the receiver (its interface MTU).

use super::data::be;
use super::{Kind, Prefix, SessionId, WireError};

/// A checked `Fragment` datagram, borrowing its bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fragment<'a> {
    /// The peer session it belongs to.
    pub session: SessionId,
    /// Low 32 bits of the delivery sequence number of the whole packet.
    pub seq: u32,
    /// Low 32 bits of the transmission number (the same in every fragment of it).
    pub pn: u32,
    /// Where `bytes` start in the packet, in bytes.
    pub offset: u16,
    /// Length of the whole packet in bytes.
    pub total: u16,
    /// This piece: never empty, ends at or before `total`.
    pub bytes: &'a [u8],
}

impl<'a> Fragment<'a> {
    /// Bytes in front of the piece.
    pub const HEADER_LEN: usize = Prefix::LEN + 8 + 4 + 4 + 2 + 2;

    /// Parse a whole datagram, prefix included.
    pub fn parse(datagram: &'a [u8]) -> Result<Fragment<'a>, WireError> {
        let prefix = Prefix::parse(datagram)?;
        if prefix.kind != Kind::Fragment {
            return Err(WireError::Malformed("not a fragment datagram"));
        }
        let Some((head, bytes)) = datagram.split_at_checked(Self::HEADER_LEN) else {
            return Err(WireError::Truncated { len: datagram.len(), need: Self::HEADER_LEN });
        };
        let session = SessionId(u64::from_be_bytes(be(&head[2..10])));
        let seq = u32::from_be_bytes(be(&head[10..14]));
        let pn = u32::from_be_bytes(be(&head[14..18]));
        let offset = u16::from_be_bytes(be(&head[18..20]));
        let total = u16::from_be_bytes(be(&head[20..22]));
        if bytes.is_empty() {
            return Err(WireError::Malformed("empty fragment"));
        }
        if usize::from(offset) + bytes.len() > usize::from(total) {
            return Err(WireError::Malformed("fragment beyond its packet's end"));
        }
        Ok(Fragment { session, seq, pn, offset, total, bytes })
    }

    /// Append one fragment datagram to `out`: bytes `[offset, offset + bytes.len())` of a
    /// packet `total` bytes long. The caller keeps `offset + bytes.len() ≤ total ≤ 65535`
    /// and `bytes` non-empty (else the peer drops it as malformed).
    pub fn emit(
        session: SessionId,
        seq: u64,
        pn: u64,
        offset: u16,
        total: u16,
        bytes: &[u8],
        out: &mut Vec<u8>,
    ) {
        out.extend_from_slice(&[super::VERSION, Kind::Fragment as u8]);
        out.extend_from_slice(&session.0.to_be_bytes());
        out.extend_from_slice(&(seq as u32).to_be_bytes());
        out.extend_from_slice(&(pn as u32).to_be_bytes());
        out.extend_from_slice(&offset.to_be_bytes());
        out.extend_from_slice(&total.to_be_bytes());
        out.extend_from_slice(bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn round_trip(session: u64, seq: u32, pn: u32, total in 1u16..=u16::MAX,
                      a in any::<u16>(), b in any::<u16>()) {
            let offset = a % total;
            let len = 1 + usize::from(b) % usize::from(total - offset);
            let bytes: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let mut out = Vec::new();
            Fragment::emit(SessionId(session), u64::from(seq), u64::from(pn), offset, total,
                           &bytes, &mut out);
            prop_assert_eq!(out.len(), Fragment::HEADER_LEN + len);
            let f = Fragment::parse(&out).unwrap();
            prop_assert_eq!(f, Fragment { session: SessionId(session), seq, pn, offset, total,
                                          bytes: &bytes[..] });
        }

        #[test]
        fn parse_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let mut b = bytes;
            if b.len() >= 2 { b[0] = 1; b[1] = 3; }
            if let Ok(f) = Fragment::parse(&b) {
                prop_assert!(!f.bytes.is_empty());
                prop_assert!(usize::from(f.offset) + f.bytes.len() <= usize::from(f.total));
            }
        }
    }

    #[test]
    fn rejects_empty_and_overlong() {
        let mut out = Vec::new();
        Fragment::emit(SessionId(1), 2, 3, 10, 12, &[1, 2], &mut out);
        assert!(Fragment::parse(&out).is_ok());
        let mut long = out.clone();
        long.push(3);
        assert!(Fragment::parse(&long).is_err());
        assert!(Fragment::parse(&out[..Fragment::HEADER_LEN]).is_err());
        assert!(matches!(Fragment::parse(&out[..5]), Err(WireError::Truncated { .. })));
    }
}
