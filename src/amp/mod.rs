//! AMP boxes, byte-compatible with Twisted's AMP (the protocol Vertex spoke).
//!
//! A box is a sequence of `(2-byte big-endian key length, key, 2-byte big-endian value
//! length, value)` pairs ended by a zero key length. Keys are 1-255 bytes, values up to
//! 65535. Like Twisted's `AmpBox.serialize`, keys are written in sorted order, so equal boxes
//! have equal bytes.
//!
//! Requests carry `_command` and `_ask` (a tag); replies carry `_answer` (the tag) or
//! `_error`, `_error_code` and `_error_description`.

mod io;
pub mod peer;

pub use io::{AmpReader, CallError, write_box};
pub use peer::{Incoming, PeerHandle};

use std::collections::BTreeMap;

/// Longest key Twisted accepts.
pub const MAX_KEY_LEN: usize = 255;
/// Longest value the 2-byte length can say.
pub const MAX_VALUE_LEN: usize = 65535;
/// Most pairs one box may hold; bounds the memory a peer can make us spend on one box.
pub const MAX_PAIRS: usize = 1024;

pub const COMMAND: &str = "_command";
pub const ASK: &str = "_ask";
pub const ANSWER: &str = "_answer";
pub const ERROR: &str = "_error";
pub const ERROR_CODE: &str = "_error_code";
pub const ERROR_DESCRIPTION: &str = "_error_description";

/// Why bytes are not a box, or a box cannot be written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AmpError {
    /// A key longer than 255 bytes (on the wire or in a box to write).
    #[error("AMP key of {0} bytes is longer than the 255 allowed")]
    KeyTooLong(usize),
    /// A value longer than one box can carry.
    #[error("AMP value for `{key}` is {len} bytes, longer than the 65535 one box can carry")]
    ValueTooLong { key: String, len: usize },
    /// An empty key in a box to write (an empty key ends a box on the wire).
    #[error("AMP keys must not be empty")]
    EmptyKey,
    /// The same key twice in one box.
    #[error("AMP box repeats the key `{0}`")]
    DuplicateKey(String),
    /// More pairs than [`MAX_PAIRS`].
    #[error("AMP box has more than {MAX_PAIRS} keys")]
    TooManyPairs,
}

/// One AMP box: an ordered map of byte keys to byte values.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AmpBox {
    pairs: BTreeMap<Vec<u8>, Vec<u8>>,
}

impl AmpBox {
    pub fn new() -> AmpBox {
        AmpBox::default()
    }

    /// A request box for `command` (the `_ask` tag is set when it is sent).
    pub fn command(command: &str) -> AmpBox {
        AmpBox::new().with(COMMAND, command)
    }

    /// Builder form of [`AmpBox::insert`].
    pub fn with(mut self, key: &str, value: impl AsRef<[u8]>) -> AmpBox {
        self.insert(key, value);
        self
    }

    /// Set `key` to `value`. Lengths are checked when the box is encoded.
    pub fn insert(&mut self, key: &str, value: impl AsRef<[u8]>) {
        self.pairs.insert(key.as_bytes().to_vec(), value.as_ref().to_vec());
    }

    /// The raw value of `key`.
    pub fn get(&self, key: &str) -> Option<&[u8]> {
        self.pairs.get(key.as_bytes()).map(Vec::as_slice)
    }

    /// The value of `key` as UTF-8 text.
    pub fn get_str(&self, key: &str) -> Option<&str> {
        std::str::from_utf8(self.get(key)?).ok()
    }

    pub fn remove(&mut self, key: &str) -> Option<Vec<u8>> {
        self.pairs.remove(key.as_bytes())
    }

    pub fn len(&self) -> usize {
        self.pairs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pairs.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.pairs.iter().map(|(k, v)| (k.as_slice(), v.as_slice()))
    }

    /// Append the wire form of this box to `out`. A key or value too long for the format
    /// is an error and `out` is left as it was.
    pub fn encode_into(&self, out: &mut Vec<u8>) -> Result<(), AmpError> {
        for (k, v) in &self.pairs {
            if k.is_empty() {
                return Err(AmpError::EmptyKey);
            }
            if k.len() > MAX_KEY_LEN {
                return Err(AmpError::KeyTooLong(k.len()));
            }
            if v.len() > MAX_VALUE_LEN {
                let key = String::from_utf8_lossy(k).into_owned();
                return Err(AmpError::ValueTooLong { key, len: v.len() });
            }
        }
        if self.pairs.len() > MAX_PAIRS {
            return Err(AmpError::TooManyPairs);
        }
        for (k, v) in &self.pairs {
            // Lengths were checked above: both fit in u16.
            out.extend_from_slice(&(k.len() as u16).to_be_bytes());
            out.extend_from_slice(k);
            out.extend_from_slice(&(v.len() as u16).to_be_bytes());
            out.extend_from_slice(v);
        }
        out.extend_from_slice(&[0, 0]);
        Ok(())
    }

    /// The wire form of this box.
    pub fn encode(&self) -> Result<Vec<u8>, AmpError> {
        let mut out = Vec::new();
        self.encode_into(&mut out)?;
        Ok(out)
    }

    /// Parse one box from the front of `buf`. `Ok(None)` means `buf` holds only the start
    /// of a box: read more and call again. `Ok(Some((box, n)))` consumed `n` bytes.
    pub fn decode(buf: &[u8]) -> Result<Option<(AmpBox, usize)>, AmpError> {
        let mut pairs = BTreeMap::new();
        let mut at = 0;
        loop {
            let Some(klen) = read_u16(buf, at) else { return Ok(None) };
            at += 2;
            if klen == 0 {
                return Ok(Some((AmpBox { pairs }, at)));
            }
            if klen > MAX_KEY_LEN {
                return Err(AmpError::KeyTooLong(klen));
            }
            let Some(key) = buf.get(at..at + klen) else { return Ok(None) };
            at += klen;
            let Some(vlen) = read_u16(buf, at) else { return Ok(None) };
            at += 2;
            let Some(value) = buf.get(at..at + vlen) else { return Ok(None) };
            at += vlen;
            if pairs.len() == MAX_PAIRS {
                return Err(AmpError::TooManyPairs);
            }
            if pairs.insert(key.to_vec(), value.to_vec()).is_some() {
                return Err(AmpError::DuplicateKey(String::from_utf8_lossy(key).into_owned()));
            }
        }
    }
}

/// The code and sentence of an error box (Twisted: `_error_code`, `_error_description`),
/// as text: the typed codes of the q2q protocols are theirs ([`crate::proto::commands`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorBox {
    pub code: String,
    pub description: String,
}

/// Longest `_error_code` and `_error_description` sent: they may echo the request (a
/// 64 KiB argument must not make an answer too long to encode).
const MAX_ERROR_CODE: usize = 64;
const MAX_ERROR_DESCRIPTION: usize = 1024;

impl ErrorBox {
    /// The error box answering the request tagged `tag`, the code and sentence cut (at a
    /// character boundary, `…` marking the cut) to 64 and 1024 bytes.
    pub fn to_box(&self, tag: &[u8]) -> AmpBox {
        AmpBox::new()
            .with(ERROR, tag)
            .with(ERROR_CODE, truncate(&self.code, MAX_ERROR_CODE))
            .with(ERROR_DESCRIPTION, truncate(&self.description, MAX_ERROR_DESCRIPTION))
    }

    /// The code and sentence of an error box (one with `_error`); a missing code reads as
    /// `UNKNOWN`, a missing sentence as empty.
    pub fn from_box(b: &AmpBox) -> Option<ErrorBox> {
        b.get(ERROR)?;
        Some(ErrorBox {
            code: b.get_str(ERROR_CODE).unwrap_or("UNKNOWN").to_string(),
            description: b.get_str(ERROR_DESCRIPTION).unwrap_or("").to_string(),
        })
    }
}

/// `s` cut to at most `max` bytes at a character boundary, `…` marking the cut.
fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max.saturating_sub('…'.len_utf8());
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

fn read_u16(buf: &[u8], at: usize) -> Option<usize> {
    let b = buf.get(at..at + 2)?;
    Some(u16::from_be_bytes([b[0], b[1]]) as usize)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Bytes Twisted's (checked against Twisted 26.10) `AmpBox(_command=b"sum", _ask=b"23", a=b"13", b=b"81").serialize()`
    /// produces (keys sorted, each pair length-prefixed, a zero key length at the end).
    const TWISTED_SUM: &[u8] = b"\x00\x04_ask\x00\x0223\x00\x08_command\x00\x03sum\
\x00\x01a\x00\x0213\x00\x01b\x00\x0281\x00\x00";

    #[test]
    fn golden_bytes_match_twisted() {
        let b = AmpBox::command("sum").with(ASK, "23").with("a", "13").with("b", "81");
        assert_eq!(b.encode().unwrap(), TWISTED_SUM);
        let (d, n) = AmpBox::decode(TWISTED_SUM).unwrap().unwrap();
        assert_eq!((d, n), (b, TWISTED_SUM.len()));
    }

    #[test]
    fn error_texts_are_cut_at_a_character_boundary() {
        assert_eq!(truncate("short", 10), "short");
        let long = "é".repeat(40_000);
        let cut = truncate(&long, MAX_ERROR_DESCRIPTION);
        assert!(cut.len() <= MAX_ERROR_DESCRIPTION && cut.ends_with('…'), "{}", cut.len());
        assert_eq!(truncate("abcdef", 4), "a…");
    }

    #[test]
    fn empty_box_and_empty_value() {
        assert_eq!(AmpBox::new().encode().unwrap(), b"\x00\x00");
        let b = AmpBox::new().with("k", "");
        assert_eq!(b.encode().unwrap(), b"\x00\x01k\x00\x00\x00\x00");
    }

    #[test]
    fn truncated_input_asks_for_more() {
        for cut in 0..TWISTED_SUM.len() {
            assert_eq!(AmpBox::decode(&TWISTED_SUM[..cut]), Ok(None), "cut at {cut}");
        }
    }

    #[test]
    fn oversized_is_an_error_not_a_cut() {
        let long = vec![b'x'; MAX_VALUE_LEN + 1];
        let err = AmpBox::new().with("blob", &long).encode().unwrap_err();
        assert_eq!(err, AmpError::ValueTooLong { key: "blob".into(), len: 65536 });
        assert!(err.to_string().contains("65535"));
        let max = AmpBox::new().with("blob", &long[..MAX_VALUE_LEN]);
        let bytes = max.encode().unwrap();
        assert_eq!(AmpBox::decode(&bytes).unwrap().unwrap().0, max);
        let key = "k".repeat(256);
        assert_eq!(AmpBox::new().with(&key, "v").encode(), Err(AmpError::KeyTooLong(256)));
        let mut wire = vec![1, 0];
        wire.extend_from_slice(&[b'k'; 256]);
        assert_eq!(AmpBox::decode(&wire), Err(AmpError::KeyTooLong(256)));
    }

    #[test]
    fn duplicate_keys_rejected() {
        let wire = b"\x00\x01a\x00\x011\x00\x01a\x00\x012\x00\x00";
        assert_eq!(AmpBox::decode(wire), Err(AmpError::DuplicateKey("a".into())));
    }

    #[test]
    fn too_many_pairs_rejected() {
        let mut wire = Vec::new();
        for i in 0..=MAX_PAIRS {
            let k = format!("k{i}");
            wire.extend_from_slice(&(k.len() as u16).to_be_bytes());
            wire.extend_from_slice(k.as_bytes());
            wire.extend_from_slice(&[0, 0]);
        }
        wire.extend_from_slice(&[0, 0]);
        assert_eq!(AmpBox::decode(&wire), Err(AmpError::TooManyPairs));
    }

    proptest! {
        #[test]
        fn round_trip(pairs in proptest::collection::btree_map(
            "[a-z_]{1,40}", proptest::collection::vec(any::<u8>(), 0..300), 0..20)
        ) {
            let mut b = AmpBox::new();
            for (k, v) in &pairs { b.insert(k, v); }
            let mut bytes = b.encode().unwrap();
            let n = bytes.len();
            bytes.extend_from_slice(b"trailing");
            let (d, used) = AmpBox::decode(&bytes).unwrap().unwrap();
            prop_assert_eq!(used, n);
            prop_assert_eq!(d, b);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2000)) {
            let _ = AmpBox::decode(&bytes);
        }
    }
}
