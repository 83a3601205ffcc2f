//! The `Data` datagram: one IP packet of a peer session, numbered for selective repeat.
//!
//! ```text
//!  0      2              10         14         18
//!  +------+--------------+----------+----------+---------------------------
//!  |prefix| session id   | seq (lo) | pn (lo)  | IP packet made by smoltcp
//!  | 1,01 | u64 BE       | u32 BE   | u32 BE   | (empty: a keepalive ping)
//!  +------+--------------+----------+----------+---------------------------
//! ```
//!
//! * `seq` numbers the packet in the delivery order (a retransmission keeps its `seq`); the
//!   receiver hands packets to smoltcp in `seq` order.
//! * `pn` numbers every transmission (a retransmission gets a new `pn`), so an ACK's echo of
//!   the largest `pn` received gives an unambiguous RTT sample and tells the sender which
//!   retransmissions are themselves lost.
//!
//! Both travel as their low 32 bits; the receiver restores the full 64-bit value with
//! [`expand`] from the value it expects next (the sender keeps far fewer than 2^31 packets
//! outstanding, so the nearest candidate is the right one).

use super::{Kind, Prefix, SessionId, WireError};

/// A checked `Data` datagram, borrowing its payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Data<'a> {
    /// The peer session it belongs to.
    pub session: SessionId,
    /// Low 32 bits of the delivery sequence number.
    pub seq: u32,
    /// Low 32 bits of the transmission (packet) number.
    pub pn: u32,
    /// The IP packet; empty for a keepalive ping.
    pub payload: &'a [u8],
}

impl<'a> Data<'a> {
    /// Bytes in front of the payload.
    pub const HEADER_LEN: usize = Prefix::LEN + 8 + 4 + 4;

    /// Parse a whole datagram, prefix included.
    pub fn parse(datagram: &'a [u8]) -> Result<Data<'a>, WireError> {
        let prefix = Prefix::parse(datagram)?;
        if prefix.kind != Kind::Data {
            return Err(WireError::Malformed("not a data datagram"));
        }
        let Some((head, payload)) = datagram.split_at_checked(Self::HEADER_LEN) else {
            return Err(WireError::Truncated { len: datagram.len(), need: Self::HEADER_LEN });
        };
        let session = SessionId(u64::from_be_bytes(be(&head[2..10])));
        let seq = u32::from_be_bytes(be(&head[10..14]));
        let pn = u32::from_be_bytes(be(&head[14..18]));
        Ok(Data { session, seq, pn, payload })
    }

    /// Append the header of a `Data` datagram to `out` (the caller appends the payload).
    pub fn emit_header(session: SessionId, seq: u64, pn: u64, out: &mut Vec<u8>) {
        out.extend_from_slice(&[super::VERSION, Kind::Data as u8]);
        out.extend_from_slice(&session.0.to_be_bytes());
        out.extend_from_slice(&(seq as u32).to_be_bytes());
        out.extend_from_slice(&(pn as u32).to_be_bytes());
    }
}

/// Copy a fixed-size big-endian field; the slice lengths are fixed by the callers above.
pub(super) fn be<const N: usize>(s: &[u8]) -> [u8; N] {
    let mut a = [0u8; N];
    a.copy_from_slice(s);
    a
}

/// Restore a 64-bit number from its low 32 bits: the candidate nearest to `expected`.
pub fn expand(expected: u64, low: u32) -> u64 {
    const WIN: u64 = 1 << 32;
    const HALF: u64 = WIN / 2;
    let candidate = (expected & !(WIN - 1)) | u64::from(low);
    if candidate.saturating_add(HALF) <= expected && candidate <= u64::MAX - WIN {
        candidate + WIN
    } else if candidate > expected.saturating_add(HALF) && candidate >= WIN {
        candidate - WIN
    } else {
        candidate
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn round_trip(session: u64, seq in 0u64..(1 << 50), pn in 0u64..(1 << 50),
                      payload in proptest::collection::vec(any::<u8>(), 0..64)) {
            let mut out = Vec::new();
            Data::emit_header(SessionId(session), seq, pn, &mut out);
            out.extend_from_slice(&payload);
            let d = Data::parse(&out).unwrap();
            prop_assert_eq!(d.session, SessionId(session));
            prop_assert_eq!(d.payload, &payload[..]);
            prop_assert_eq!(expand(seq.saturating_sub(1000), d.seq), seq);
            prop_assert_eq!(expand(pn + 1000, d.pn), pn);
        }

        #[test]
        fn expand_nearest(expected in 0u64..(1 << 60), delta in -(1i64 << 30)..(1i64 << 30)) {
            let actual = expected.saturating_add_signed(delta);
            prop_assert_eq!(expand(expected, actual as u32), actual);
        }

        #[test]
        fn parse_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..40)) {
            let _ = Data::parse(&bytes);
        }
    }

    #[test]
    fn rejects() {
        assert!(matches!(Data::parse(&[1, 1, 0]), Err(WireError::Truncated { .. })));
        assert!(Data::parse(&[1, 2, 0, 0]).is_err());
    }
}
