//! The `Ack` datagram: what a selective-repeat receiver holds, as a cumulative point and a
//! complete list of the ranges received above it.
//!
//! ```text
//!  0      2              10             18        ..          26        ..     ..+2
//!  +------+--------------+--------------+---------+-----------+---------+------+--------------
//!  |prefix| session id   | largest pn   |ack delay| cum       | from    |count | count x
//!  | 1,02 | u64 BE       | u64 BE       |varint µs| u64 BE    | varint  |u16 BE| (gap, len)
//!  +------+--------------+--------------+---------+-----------+---------+------+--------------
//! ```
//!
//! * `largest pn`: the largest transmission number received, `ack delay` how long the
//!   receiver held it before this ACK (subtracted from the RTT sample).
//! * `cum`: every `seq` below it was received (and delivered).
//! * The ranges describe `seq`s from `cum + from` upwards: the first range starts `gap`
//!   after that point, each next one `gap` (at least 1) after the end of the previous, and is
//!   `len` (at least 1) long. Everything between `cum + from` and the end of the last range
//!   that no range covers is *known missing*; nothing is said about `seq`s above the last
//!   range or in `[cum, cum + from)`.
//!
//! When the ranges do not fit in one datagram the receiver sends several ACKs, each with its
//! own `from`, lowest first.

use super::{Kind, Prefix, SessionId, WireError, varint};

/// A checked `Ack` datagram. Its ranges were validated by [`Ack::parse`], so iterating them
/// cannot fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ack<'a> {
    /// The peer session it belongs to.
    pub session: SessionId,
    /// Largest transmission number received.
    pub largest_pn: u64,
    /// Microseconds between receiving `largest_pn` and sending this ACK.
    pub ack_delay_us: u64,
    /// Every `seq` below this was received.
    pub cum: u64,
    /// Absolute start of the region the ranges describe (`cum` + the `from` field).
    pub from: u64,
    count: u16,
    ranges: &'a [u8],
}

/// Bytes of an ACK before its ranges, at most (varints at their largest).
pub const ACK_HEADER_MAX: usize = Prefix::LEN + 8 + 8 + 8 + 8 + 8 + 2;

impl<'a> Ack<'a> {
    /// Parse a whole datagram, prefix included.
    pub fn parse(datagram: &'a [u8]) -> Result<Ack<'a>, WireError> {
        let prefix = Prefix::parse(datagram)?;
        if prefix.kind != Kind::Ack {
            return Err(WireError::Malformed("not an ack datagram"));
        }
        const FIXED: usize = Prefix::LEN + 16;
        if datagram.len() < FIXED {
            return Err(WireError::Truncated { len: datagram.len(), need: FIXED });
        }
        let mut r = Reader { buf: &datagram[Prefix::LEN..] };
        let session = SessionId(r.u64()?);
        let largest_pn = r.u64()?;
        let ack_delay_us = r.varint()?;
        let cum = r.u64()?;
        let from =
            cum.checked_add(r.varint()?).ok_or(WireError::Malformed("ack from overflows"))?;
        let count = r.u16()?;
        let ranges = r.buf;
        let ack = Ack { session, largest_pn, ack_delay_us, cum, from, count, ranges };
        // Validate once: every range well-formed, no overflow, no trailing bytes.
        let mut it = RawRanges { buf: ranges, left: count, at: from, first: true };
        for item in &mut it {
            item?;
        }
        if !it.buf.is_empty() {
            return Err(WireError::Malformed("trailing bytes after ack ranges"));
        }
        Ok(ack)
    }

    /// The received ranges, ascending, as half-open `(start, end)` pairs.
    pub fn ranges(&self) -> AckRanges<'a> {
        AckRanges(RawRanges { buf: self.ranges, left: self.count, at: self.from, first: true })
    }

    /// Number of ranges.
    pub fn range_count(&self) -> usize {
        usize::from(self.count)
    }

    /// Append one ACK datagram to `out`, taking ranges from the front of `ranges` (ascending,
    /// disjoint, non-adjacent, all at or above `from`, which is at or above `cum`) while the
    /// datagram stays within `max_len` bytes. Returns how many ranges it took.
    #[allow(clippy::too_many_arguments)]
    pub fn emit(
        session: SessionId,
        largest_pn: u64,
        ack_delay_us: u64,
        cum: u64,
        from: u64,
        ranges: &[(u64, u64)],
        max_len: usize,
        out: &mut Vec<u8>,
    ) -> usize {
        let start = out.len();
        out.extend_from_slice(&[super::VERSION, Kind::Ack as u8]);
        out.extend_from_slice(&session.0.to_be_bytes());
        out.extend_from_slice(&largest_pn.to_be_bytes());
        varint::write(ack_delay_us, out);
        out.extend_from_slice(&cum.to_be_bytes());
        varint::write(from.saturating_sub(cum), out);
        let count_at = out.len();
        out.extend_from_slice(&[0, 0]);
        let mut at = from;
        let mut n = 0usize;
        for &(s, e) in ranges {
            if n == usize::from(u16::MAX) {
                break;
            }
            let gap = s.saturating_sub(at);
            let len = e.saturating_sub(s);
            if out.len() - start + varint::len(gap) + varint::len(len) > max_len {
                break;
            }
            varint::write(gap, out);
            varint::write(len, out);
            at = e;
            n += 1;
        }
        out[count_at..count_at + 2].copy_from_slice(&(n as u16).to_be_bytes());
        n
    }
}

struct Reader<'a> {
    buf: &'a [u8],
}

impl Reader<'_> {
    fn take<const N: usize>(&mut self) -> Result<[u8; N], WireError> {
        let (head, rest) =
            self.buf.split_first_chunk::<N>().ok_or(WireError::Malformed("ack truncated"))?;
        self.buf = rest;
        Ok(*head)
    }
    fn u64(&mut self) -> Result<u64, WireError> {
        Ok(u64::from_be_bytes(self.take()?))
    }
    fn u16(&mut self) -> Result<u16, WireError> {
        Ok(u16::from_be_bytes(self.take()?))
    }
    fn varint(&mut self) -> Result<u64, WireError> {
        let (v, n) = varint::read(self.buf)?;
        self.buf = &self.buf[n..];
        Ok(v)
    }
}

#[derive(Clone)]
struct RawRanges<'a> {
    buf: &'a [u8],
    left: u16,
    at: u64,
    first: bool,
}

impl Iterator for RawRanges<'_> {
    type Item = Result<(u64, u64), WireError>;
    fn next(&mut self) -> Option<Self::Item> {
        if self.left == 0 {
            return None;
        }
        self.left -= 1;
        let mut r = Reader { buf: self.buf };
        let item = (|| {
            let gap = r.varint()?;
            let len = r.varint()?;
            if gap == 0 && !self.first {
                return Err(WireError::Malformed("ack ranges touch"));
            }
            if len == 0 {
                return Err(WireError::Malformed("empty ack range"));
            }
            let s = self.at.checked_add(gap).ok_or(WireError::Malformed("ack range overflows"))?;
            let e = s.checked_add(len).ok_or(WireError::Malformed("ack range overflows"))?;
            Ok((s, e))
        })();
        self.buf = r.buf;
        self.first = false;
        match item {
            Ok((s, e)) => {
                self.at = e;
                Some(Ok((s, e)))
            }
            Err(err) => {
                self.left = 0;
                Some(Err(err))
            }
        }
    }
}

/// Iterator over the validated ranges of an [`Ack`].
#[derive(Clone)]
pub struct AckRanges<'a>(RawRanges<'a>);

impl Iterator for AckRanges<'_> {
    type Item = (u64, u64);
    fn next(&mut self) -> Option<(u64, u64)> {
        // Validated by `Ack::parse`: an error cannot occur here; stop if it somehow did.
        self.0.next().and_then(Result::ok)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ranges_strategy() -> impl Strategy<Value = (u64, u64, Vec<(u64, u64)>)> {
        (0u64..1 << 40, 0u64..100, proptest::collection::vec((1u64..300, 1u64..300), 0..200))
            .prop_map(|(cum, from_off, pairs)| {
                let from = cum + from_off;
                let mut at = from;
                let mut out = Vec::new();
                for (i, (gap, len)) in pairs.into_iter().enumerate() {
                    let gap = if i == 0 { gap - 1 } else { gap };
                    let s = at + gap;
                    out.push((s, s + len));
                    at = s + len;
                }
                (cum, from, out)
            })
    }

    proptest! {
        #[test]
        fn round_trip(session: u64, pn: u64, delay in 0u64..1 << 40,
                      (cum, from, ranges) in ranges_strategy(), max_len in 40usize..1400) {
            let mut out = Vec::new();
            let n = Ack::emit(SessionId(session), pn, delay, cum, from, &ranges, max_len, &mut out);
            prop_assert!(out.len() <= max_len.max(ACK_HEADER_MAX));
            let ack = Ack::parse(&out).unwrap();
            prop_assert_eq!(ack.session, SessionId(session));
            prop_assert_eq!(ack.largest_pn, pn);
            prop_assert_eq!(ack.ack_delay_us, delay);
            prop_assert_eq!(ack.cum, cum);
            prop_assert_eq!(ack.from, from);
            prop_assert_eq!(ack.range_count(), n);
            prop_assert_eq!(ack.ranges().collect::<Vec<_>>(), ranges[..n].to_vec());
        }

        #[test]
        fn parse_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..80)) {
            let mut b = bytes;
            if b.len() >= 2 { b[0] = 1; b[1] = 2; }
            if let Ok(ack) = Ack::parse(&b) {
                let _ = ack.ranges().count();
            }
        }
    }

    #[test]
    fn rejects_trailing_and_empty_ranges() {
        let mut out = Vec::new();
        Ack::emit(SessionId(7), 1, 0, 10, 10, &[(12, 14)], 1400, &mut out);
        assert!(Ack::parse(&out).is_ok());
        let mut t = out.clone();
        t.push(0);
        assert!(Ack::parse(&t).is_err());
        let mut z = out.clone();
        *z.last_mut().unwrap() = 0; // len 0
        assert!(Ack::parse(&z).is_err());
    }
}
