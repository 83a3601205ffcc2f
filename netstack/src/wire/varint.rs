//! QUIC-style variable-length integers (RFC 9000 §16): the two high bits of the first byte
//! give the length (1, 2, 4 or 8 bytes), the rest is the value, big-endian. Values up to
//! 2^62 - 1.

use super::WireError;

/// The largest value a varint can hold.
pub const MAX: u64 = (1 << 62) - 1;

/// How many bytes `v` takes on the wire (`v` must be at most [`MAX`]).
pub fn len(v: u64) -> usize {
    match v {
        0..=63 => 1,
        64..=16_383 => 2,
        16_384..=1_073_741_823 => 4,
        _ => 8,
    }
}

/// Read a varint at the front of `buf`; returns the value and the bytes it took.
pub fn read(buf: &[u8]) -> Result<(u64, usize), WireError> {
    let first = *buf.first().ok_or(WireError::Malformed("varint truncated"))?;
    let n = 1usize << (first >> 6);
    let bytes = buf.get(..n).ok_or(WireError::Malformed("varint truncated"))?;
    let mut v = u64::from(first & 0x3f);
    for b in &bytes[1..] {
        v = (v << 8) | u64::from(*b);
    }
    Ok((v, n))
}

/// Append `v` (clamped to [`MAX`]) to `out`.
pub fn write(v: u64, out: &mut Vec<u8>) {
    let v = v.min(MAX);
    match len(v) {
        1 => out.push(v as u8),
        2 => out.extend_from_slice(&((v as u16) | 0x4000).to_be_bytes()),
        4 => out.extend_from_slice(&((v as u32) | 0x8000_0000).to_be_bytes()),
        _ => out.extend_from_slice(&(v | 0xc000_0000_0000_0000).to_be_bytes()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn round_trip(v in 0..=MAX) {
            let mut out = Vec::new();
            write(v, &mut out);
            prop_assert_eq!(out.len(), len(v));
            prop_assert_eq!(read(&out).unwrap(), (v, out.len()));
        }
    }

    #[test]
    fn truncated() {
        assert!(read(&[]).is_err());
        assert!(read(&[0x40]).is_err());
        assert_eq!(read(&[0x25]).unwrap(), (0x25, 1));
    }
}
