//! DNS over TCP framing (RFC 1035 §4.2.2): each message is preceded by its length as a
//! 2-byte big-endian integer. Pure functions; the server does the reading and writing.

/// The largest message a 2-byte length can describe.
pub const MAX_MESSAGE: usize = u16::MAX as usize;

/// `msg` with its length prefix, or `None` if it is too long to frame.
pub fn encode(msg: &[u8]) -> Option<Vec<u8>> {
    let len = u16::try_from(msg.len()).ok()?;
    let mut out = Vec::with_capacity(2 + msg.len());
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(msg);
    Some(out)
}

/// What the front of a receive buffer holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decoded<'a> {
    /// A whole message, and how many bytes of the buffer it used (prefix included).
    Message { message: &'a [u8], consumed: usize },
    /// Not yet a whole message: the buffer must grow to at least this many bytes.
    NeedMore(usize),
}

/// Split the first message off `buf`.
pub fn decode(buf: &[u8]) -> Decoded<'_> {
    let Some((len, rest)) = buf.split_first_chunk::<2>() else { return Decoded::NeedMore(2) };
    let len = usize::from(u16::from_be_bytes(*len));
    match rest.get(..len) {
        Some(message) => Decoded::Message { message, consumed: 2 + len },
        None => Decoded::NeedMore(2 + len),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_partial() {
        let f = encode(b"hello").unwrap();
        assert_eq!(f, b"\x00\x05hello");
        assert_eq!(decode(&f), Decoded::Message { message: b"hello", consumed: 7 });
        let mut two = f.clone();
        two.extend_from_slice(&encode(b"").unwrap());
        assert_eq!(decode(&two), Decoded::Message { message: b"hello", consumed: 7 });
        assert_eq!(decode(&two[7..]), Decoded::Message { message: b"", consumed: 2 });
        assert_eq!(decode(&f[..4]), Decoded::NeedMore(7));
        assert_eq!(decode(&f[..1]), Decoded::NeedMore(2));
        assert_eq!(decode(&[]), Decoded::NeedMore(2));
        assert_eq!(decode(&[0xff, 0xff]), Decoded::NeedMore(65537));
        assert!(encode(&vec![0; MAX_MESSAGE]).is_some());
        assert!(encode(&vec![0; MAX_MESSAGE + 1]).is_none());
    }
}
