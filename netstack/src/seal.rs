//! Sealed PTCP datagrams: every datagram of a session authenticated and encrypted with the
//! session's keys, so that nobody but the two peers can inject, alter, replay or read
//! them, and a datagram that opens is proof that the peer is alive on its path.
//!
//! The two peers prove their identities once per session, with TLS 1.3 between their
//! certificates on the session's first stream; both then take the session keys from the
//! TLS exporter (RFC 8446 §7.5), one per direction ([`SessionKeys`]), and hand them to
//! [`crate::Session::install_keys`]. From then on, each datagram is sealed as QUIC
//! protects packets (RFC 9001 §5), with ChaCha20-Poly1305 (RFC 8439) and a per-direction
//! counter as nonce:
//!
//! ```text
//!  0      2            10                                   len-24     len-16     len
//!  +------+------------+-------------------------------------+----------+----------+
//!  |1,06  | session id | ciphertext of (inner body ‖ kind)   | counter  | tag      |
//!  |      | u64 BE     | inner body: the plain datagram      | u64 BE   | 16 bytes |
//!  |      |            | after its session id                |          |          |
//!  +------+------------+-------------------------------------+----------+----------+
//!  associated data: prefix ‖ session id ‖ counter      nonce: 0u32 ‖ counter
//! ```
//!
//! A sealed datagram is [`OVERHEAD`] bytes longer than the plain one. Retransmissions are
//! sealed anew with a new counter, so a counter is never used twice under one key; the
//! receiver refuses repeated and too old counters ([`crate::replay::ReplayWindow`]).
//! ChaCha20-Poly1305 has no practical confidentiality limit on the number of datagrams
//! (RFC 9001 §6.6; AES-GCM's 2^23 packets would need key updates within one long
//! transfer); its integrity limit is [`INTEGRITY_LIMIT`] forgeries, after which the
//! session ends.
//!
//! **The switch.** The TLS handshake itself runs over plain datagrams. The acceptor
//! installs the keys *before* it confirms the handshake to the dialer, but keeps sending
//! plain until a sealed datagram arrives (the dialer may not have its keys yet); the
//! dialer installs them when it reads the confirmation, which proves the acceptor has
//! them, and seals at once. Once a peer's first sealed datagram has opened, plain PTCP
//! datagrams from it are refused (after [`PLAIN_GRACE_US`] for those overtaken on the way): an attacker on the path can disturb the handshake (TLS
//! then fails), never a keyed session.

use ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, Nonce, UnboundKey};

use crate::replay::{ReplayWindow, Replayed};
use crate::wire::{Kind, Prefix};

/// Bytes a sealed datagram adds to the plain one: the inner kind moved into the
/// ciphertext, the counter and the tag.
pub const OVERHEAD: usize = 1 + 8 + TAG_LEN;

/// Length of each direction's key, bytes (ChaCha20-Poly1305).
pub const KEY_LEN: usize = 32;

/// Forged (unopenable) datagrams a session takes before it ends (RFC 9001 §6.6: 2^36 for
/// AEAD_CHACHA20_POLY1305).
pub const INTEGRITY_LIMIT: u64 = 1 << 36;

/// How long after the peer's first sealed datagram its plain ones are still taken (µs):
/// those it sent just before, overtaken on the way (jitter, a move between paths).
pub const PLAIN_GRACE_US: i64 = 100_000;

const TAG_LEN: usize = 16;
/// Prefix and session id: the part of a sealed datagram in clear at its start.
const HEAD: usize = Prefix::LEN + 8;

/// The keys of one session, one per direction, as both peers derive them.
#[derive(Clone, PartialEq, Eq)]
pub struct SessionKeys {
    /// Seals what the session's initiator sends.
    pub initiator: [u8; KEY_LEN],
    /// Seals what the responder sends.
    pub responder: [u8; KEY_LEN],
}

impl std::fmt::Debug for SessionKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SessionKeys(..)")
    }
}

/// Why a sealed datagram was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    /// Too short to be a sealed datagram.
    #[error("sealed datagram truncated: {0} bytes")]
    Truncated(usize),
    /// The session has no keys yet (the peer sealed before our handshake finished: its
    /// retransmission will be opened).
    #[error("sealed datagram before the session has keys")]
    NoKeys,
    /// The tag does not verify: forged, altered, or sealed with other keys.
    #[error("sealed datagram does not open")]
    Forged,
    /// Its counter was seen already or is too old.
    #[error(transparent)]
    Replayed(#[from] Replayed),
}

/// One session's sealing state: keys, the next counter to send, the window of counters
/// received.
pub(crate) struct Sealer {
    tx: LessSafeKey,
    rx: LessSafeKey,
    next: u64,
    window: ReplayWindow,
    /// Seal what we send (the peer has its keys).
    pub sending: bool,
    /// A sealed datagram from the peer opened: plain ones are refused after
    /// [`PLAIN_GRACE_US`].
    pub peer_sealed: bool,
    /// When the first sealed datagram from the peer opened (µs, the session's clock).
    pub peer_sealed_at: Option<i64>,
    /// Datagrams that did not open.
    pub forged: u64,
}

fn key(raw: &[u8; KEY_LEN]) -> LessSafeKey {
    // A 32-byte key is what CHACHA20_POLY1305 takes: `new` cannot fail here.
    match UnboundKey::new(&CHACHA20_POLY1305, raw) {
        Ok(k) => LessSafeKey::new(k),
        Err(_) => unreachable!("ChaCha20-Poly1305 takes 32-byte keys"),
    }
}

fn nonce(counter: u64) -> Nonce {
    let mut n = [0u8; 12];
    n[4..].copy_from_slice(&counter.to_be_bytes());
    Nonce::assume_unique_for_key(n)
}

fn aad(head: &[u8], counter: u64) -> [u8; HEAD + 8] {
    let mut a = [0u8; HEAD + 8];
    a[..HEAD].copy_from_slice(&head[..HEAD]);
    a[HEAD..].copy_from_slice(&counter.to_be_bytes());
    a
}

impl Sealer {
    /// Keys for the side that sends with `tx` and receives with `rx`.
    pub fn new(tx: &[u8; KEY_LEN], rx: &[u8; KEY_LEN], sending: bool) -> Sealer {
        Sealer {
            tx: key(tx),
            rx: key(rx),
            next: 1,
            window: ReplayWindow::default(),
            sending,
            peer_sealed: false,
            peer_sealed_at: None,
            forged: 0,
        }
    }

    /// Seal the plain PTCP datagram `out[start..]` in place (it grows by [`OVERHEAD`]).
    /// A datagram too short to carry a session id is left alone.
    pub fn seal(&mut self, out: &mut Vec<u8>, start: usize) {
        if out.len() < start + HEAD {
            return;
        }
        let counter = self.next;
        self.next += 1;
        let kind = out[start + 1];
        out[start + 1] = Kind::Sealed as u8;
        out.push(kind);
        let aad = aad(&out[start..], counter);
        let Ok(tag) = self.tx.seal_in_place_separate_tag(
            nonce(counter),
            Aad::from(aad),
            &mut out[start + HEAD..],
        ) else {
            // Only inputs beyond ChaCha20's 256 GiB per nonce fail: never a datagram. Drop
            // it rather than send it plain.
            out.truncate(start);
            return;
        };
        out.extend_from_slice(&counter.to_be_bytes());
        out.extend_from_slice(tag.as_ref());
    }

    /// Open the sealed datagram `d` into `plain` (cleared first): the plain datagram it
    /// carries, prefix and session id included.
    pub fn open(&mut self, now: i64, d: &[u8], plain: &mut Vec<u8>) -> Result<(), SealError> {
        let len = d.len();
        if len < HEAD + OVERHEAD {
            return Err(SealError::Truncated(len));
        }
        let (body, trailer) = d.split_at(len - 8 - TAG_LEN);
        let mut c = [0u8; 8];
        c.copy_from_slice(&trailer[..8]);
        let counter = u64::from_be_bytes(c);
        self.window.check(counter)?;
        plain.clear();
        plain.extend_from_slice(body);
        plain.extend_from_slice(&trailer[8..]);
        let aad = aad(d, counter);
        let opened = self
            .rx
            .open_in_place(nonce(counter), Aad::from(aad), &mut plain[HEAD..])
            .map(|p| p.len());
        let Ok(n) = opened else {
            self.forged += 1;
            return Err(SealError::Forged);
        };
        self.window.accept(counter)?;
        plain.truncate(HEAD + n);
        // The inner kind is the last byte of the plaintext (n >= 1: the length check).
        let kind = plain.pop().unwrap_or(0);
        plain[1] = kind;
        self.peer_sealed = true;
        self.peer_sealed_at.get_or_insert(now);
        self.sending = true;
        Ok(())
    }

    /// Whether a plain datagram arriving at `now` is refused: once the peer seals, after a
    /// grace for its plain datagrams still on the way (reordered past its first sealed
    /// one).
    pub fn refuses_plain(&self, now: i64) -> bool {
        self.peer_sealed_at.is_some_and(|t| now - t > PLAIN_GRACE_US)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn pair() -> (Sealer, Sealer) {
        let (a, b) = ([1u8; 32], [2u8; 32]);
        (Sealer::new(&a, &b, true), Sealer::new(&b, &a, true))
    }

    fn plain(kind: Kind, body: &[u8]) -> Vec<u8> {
        let mut d = vec![crate::wire::VERSION, kind as u8];
        d.extend_from_slice(&0x0102_0304_0506_0708u64.to_be_bytes());
        d.extend_from_slice(body);
        d
    }

    #[test]
    fn seal_open_round_trip_and_refusals() {
        let (mut a, mut b) = pair();
        let d = plain(Kind::Data, b"hello");
        let mut out = vec![9, 9];
        out.extend_from_slice(&d);
        a.seal(&mut out, 2);
        let sealed = out[2..].to_vec();
        assert_eq!(sealed.len(), d.len() + OVERHEAD);
        assert_eq!(sealed[1], Kind::Sealed as u8);
        assert!(!sealed.windows(5).any(|w| w == b"hello"), "the body is encrypted");
        let mut got = Vec::new();
        b.open(0, &sealed, &mut got).unwrap();
        assert_eq!(got, d);
        assert!(b.peer_sealed);
        // The same datagram again: a replay.
        assert!(matches!(b.open(0, &sealed, &mut got), Err(SealError::Replayed(_))));
        // Any flipped bit: forged (the session id and counter are authenticated too).
        for i in 0..sealed.len() {
            let mut bad = sealed.clone();
            bad[i] ^= 0x40;
            let (mut a2, mut b2) = pair();
            let mut o = d.clone();
            a2.seal(&mut o, 0);
            assert_eq!(o, sealed);
            assert!(b2.open(0, &bad, &mut got).is_err(), "bit flipped at byte {i}");
        }
        // Its own direction's key does not open it.
        assert_eq!(a.open(0, &sealed, &mut got), Err(SealError::Forged));
        assert_eq!(a.forged, 1);
        assert_eq!(b.open(0, &sealed[..20], &mut got), Err(SealError::Truncated(20)));
    }

    proptest! {
        /// Arbitrary bytes never panic the opener and never open.
        #[test]
        fn arbitrary_bytes_never_open(d in proptest::collection::vec(any::<u8>(), 0..200)) {
            let (_, mut b) = pair();
            let mut got = Vec::new();
            prop_assert!(b.open(0, &d, &mut got).is_err());
        }
    }
}
