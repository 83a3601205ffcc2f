//! Relay framing, shared by the server's relay ([`crate::server::relay`]) and its clients
//! ([`crate::presence`]). A relayed session has two legs, one per end; each leg has a
//! token (an id, 16 random bytes, may be seen by anyone on the path) and a leg key (32
//! random bytes) that the server gives only to that end, over TLS (`relay_token` and
//! `relay_key` of `inbound`, see [`crate::proto`]). Over UDP every datagram is
//!
//! ```text
//! version kind=0x30 | token (16) | counter (8, BE) | tag (16) | inner datagram, encrypted
//! (encrypted inner, tag) = AES-256-GCM(leg key,
//!                                      nonce = direction (4, BE) | counter (8, BE),
//!                                      associated data = version kind | token | counter,
//!                                      plaintext = inner)
//! ```
//!
//! `inner` is a PTCP datagram, or empty for a bind (which tells the server the leg's UDP
//! address). `direction` is [`Direction::ToServer`] from a client and
//! [`Direction::ToClient`] from the server, so nothing can be reflected back to its sender.
//! Each sender numbers its datagrams per leg from 1 up; receivers refuse counters they have
//! seen (a sliding [`ReplayWindow`]), and the server moves a leg to a new UDP address only
//! for a datagram newer than any it has seen on that leg: a captured datagram replayed from
//! elsewhere cannot steal or black-hole the session. The tag of every datagram is checked,
//! by the server and by the ends ([`Receiver`]).
//!
//! **Why AES-256-GCM, with the inner datagram as its plaintext.** The tag only has to
//! authenticate: what the inner datagram carries is sealed end to end already
//! ([`q2q_netstack::seal`]), so encrypting it again on each leg hides nothing new. But ring
//! runs the associated data through GHASH one block at a time, and the plaintext through
//! its fused AES-GCM code (AES-NI, VAES and VPCLMULQDQ where the CPU has them): for a
//! 1400-byte datagram, a tag over the whole datagram as associated data (GMAC) costs about
//! what HMAC-SHA256 did, while sealing the inner datagram as plaintext costs a third of
//! that (`cargo run --release --example bench-relay-tag` prints the figures). So the inner
//! datagram is the plaintext and the header the associated data; a datagram is as long as
//! before.
//!
//! **A (key, nonce) pair is never used twice**, which AES-GCM needs (a repeated nonce
//! gives away the key that forges tags). The nonce is the direction and the counter:
//! - Each leg key has exactly one sender per direction. The relay draws it at random
//!   ([`crate::server::relay::Relay::create`]) for one leg and gives it to that leg's end
//!   only, in one `inbound` box; that end makes one [`Leg`] of it, for the one session the
//!   box sets up (a session id already on the endpoint is refused before its leg sends
//!   anything). Towards the end, only the task that owns the relay seals with it.
//! - Each sender's counter starts at 1 and only goes up: a [`Leg`]'s is one atomic counter
//!   for everything the end sends on the leg (binds too), the relay's one per leg (its
//!   `sent`). Neither
//!   wraps: a sender whose counter is spent (2^64 - 1 datagrams) seals nothing more.
//! - Nothing keeps a leg key (no file, no database): a relay that restarts has no legs, so
//!   it seals with no old key (the ends' datagrams are refused as unknown tokens; a new
//!   session gets new grants and new random keys), and an end that restarts has no
//!   sessions and no legs.
//!
//! AES-GCM's integrity bound (RFC 9001 appendix B, draft-irtf-cfrg-aead-limits) weakens
//! with the blocks sealed under one key: with every tag checked, a forgery's chance stays
//! near 2^-57 up to about 2^29 full-size datagrams (some 750 GB, both directions together)
//! on one leg, and grows slowly beyond (GMAC, with no plaintext, would seal a hundred times
//! fewer blocks). A relayed session ends after ten minutes of silence or with its control
//! connection, and a forgery could at most move one leg: the session's own seal refuses
//! what it carries. Epoch keys as the session seal has would lift the bound if legs ever
//! carry more.
//!
//! Over the TLS control connection (AMP `relay` with `token` and `data`) there is no tag:
//! TLS protects it, and the server lets only the connection owning a leg use its token.

use q2q_netstack::wire::{Kind, Prefix, VERSION};
use ring::aead;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

/// Bytes of a leg token.
pub const TOKEN_LEN: usize = 16;
/// Bytes of a leg key.
pub const KEY_LEN: usize = 32;
/// Bytes of the tag.
pub const TAG_LEN: usize = 16;
/// Bytes of the counter.
pub const COUNTER_LEN: usize = 8;
/// Bytes the framing adds in front of the inner datagram.
pub const OVERHEAD: usize = Prefix::LEN + TOKEN_LEN + COUNTER_LEN + TAG_LEN;

const TOKEN_AT: usize = Prefix::LEN;
const COUNTER_AT: usize = TOKEN_AT + TOKEN_LEN;
const TAG_AT: usize = COUNTER_AT + COUNTER_LEN;

/// The id of one leg of a relayed session.
pub type Token = [u8; TOKEN_LEN];

/// The secret key of one leg. Never logged: its `Debug` shows nothing of it.
#[derive(Clone)]
pub struct Key {
    raw: [u8; KEY_LEN],
    aead: aead::LessSafeKey,
}

impl Key {
    /// A fresh random key.
    pub fn random() -> Key {
        Key::from_bytes(&rand::random())
    }

    /// The key with these bytes.
    pub fn from_bytes(raw: &[u8; KEY_LEN]) -> Key {
        let key = aead::UnboundKey::new(&aead::AES_256_GCM, raw)
            .expect("KEY_LEN (32) bytes is AES-256's key length");
        Key { raw: *raw, aead: aead::LessSafeKey::new(key) }
    }

    /// Parse the hex form (`relay_key` of `inbound`): exactly [`KEY_LEN`] bytes.
    pub fn from_hex(s: &str) -> Option<Key> {
        let raw: [u8; KEY_LEN] = hex::decode(s).ok()?.try_into().ok()?;
        Some(Key::from_bytes(&raw))
    }

    /// The hex form, for the `inbound` box (inside TLS only).
    pub fn to_hex(&self) -> String {
        hex::encode(self.raw)
    }

    /// Encrypt `inner` in place; its tag. None only for inputs beyond AES-GCM's 64 GiB.
    fn seal(
        &self,
        dir: Direction,
        counter: u64,
        head: &[u8],
        inner: &mut [u8],
    ) -> Option<[u8; TAG_LEN]> {
        let tag = self
            .aead
            .seal_in_place_separate_tag(nonce(dir, counter), aead::Aad::from(head), inner)
            .ok()?;
        tag.as_ref().try_into().ok()
    }

    /// Check `tag` and decrypt `inner` in place (left unspecified when it does not verify).
    fn open(
        &self,
        dir: Direction,
        counter: u64,
        head: &[u8],
        tag: [u8; TAG_LEN],
        inner: &mut [u8],
    ) -> Result<(), RelayError> {
        self.aead
            .open_in_place_separate_tag(
                nonce(dir, counter),
                aead::Aad::from(head),
                aead::Tag::from(tag),
                inner,
                0..,
            )
            .map(|_| ())
            .map_err(|_| RelayError::BadTag)
    }
}

/// The nonce of datagram `counter` in direction `dir`: never the same twice under one key
/// (see the module docs).
fn nonce(dir: Direction, counter: u64) -> aead::Nonce {
    let mut n = [0u8; aead::NONCE_LEN];
    n[..4].copy_from_slice(&(dir as u32).to_be_bytes());
    n[4..].copy_from_slice(&counter.to_be_bytes());
    aead::Nonce::assume_unique_for_key(n)
}

/// Equal bytes. Not constant-time: for comparing messages (tests), never to authenticate.
impl PartialEq for Key {
    fn eq(&self, other: &Key) -> bool {
        self.raw == other.raw
    }
}

impl Eq for Key {}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("relay::Key(..)")
    }
}

/// Who sent a datagram: part of its nonce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// A client to the server.
    ToServer = 1,
    /// The server to a client.
    ToClient = 2,
}

/// Why a relay datagram was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RelayError {
    /// Not a relay datagram: wrong version or kind, or shorter than the framing.
    #[error("not a relay datagram")]
    Malformed,
    /// No leg has this token.
    #[error("unknown relay token")]
    UnknownToken,
    /// The tag does not verify with the leg's key in this direction.
    #[error("relay datagram does not verify")]
    BadTag,
    /// The counter was seen already, or is too old to tell.
    #[error("replayed relay datagram")]
    Replayed,
    /// Over a control connection: the token belongs to another connection's leg.
    #[error("relay token of another connection")]
    NotOwner,
}

impl From<q2q_netstack::replay::Replayed> for RelayError {
    fn from(_: q2q_netstack::replay::Replayed) -> RelayError {
        RelayError::Replayed
    }
}

/// A relay datagram whose framing parsed and whose tag is not checked yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unverified<'a> {
    /// The leg it claims to belong to.
    pub token: Token,
    /// The sender's counter.
    pub counter: u64,
    /// Version, kind, token and counter: the associated data.
    head: &'a [u8],
    tag: [u8; TAG_LEN],
    /// The encrypted inner datagram.
    sealed: &'a [u8],
}

/// Parse the framing of `d` (a whole UDP datagram). Checks lengths, version and kind.
pub fn parse(d: &[u8]) -> Result<Unverified<'_>, RelayError> {
    let prefix = Prefix::parse(d).map_err(|_| RelayError::Malformed)?;
    if prefix.kind != Kind::Relay {
        return Err(RelayError::Malformed);
    }
    let field = |at: usize, len: usize| d.get(at..at + len).ok_or(RelayError::Malformed);
    let token: Token = field(TOKEN_AT, TOKEN_LEN)?.try_into().map_err(|_| RelayError::Malformed)?;
    let counter: [u8; COUNTER_LEN] =
        field(COUNTER_AT, COUNTER_LEN)?.try_into().map_err(|_| RelayError::Malformed)?;
    let tag: [u8; TAG_LEN] =
        field(TAG_AT, TAG_LEN)?.try_into().map_err(|_| RelayError::Malformed)?;
    let sealed = d.get(OVERHEAD..).ok_or(RelayError::Malformed)?;
    let head = field(0, TAG_AT)?;
    Ok(Unverified { token, counter: u64::from_be_bytes(counter), head, tag, sealed })
}

impl Unverified<'_> {
    /// Check the tag with the leg's `key`, for a datagram sent in direction `dir`, and
    /// append the inner datagram to `out` (nothing when it does not verify). Replays are not
    /// checked here ([`Receiver`]).
    pub fn open_into(
        &self,
        key: &Key,
        dir: Direction,
        out: &mut Vec<u8>,
    ) -> Result<(), RelayError> {
        let start = out.len();
        out.extend_from_slice(self.sealed);
        let r = key.open(dir, self.counter, self.head, self.tag, &mut out[start..]);
        if r.is_err() {
            out.truncate(start);
        }
        r
    }
}

/// Parse and verify `d`, sent in direction `dir`, with the key `key_for` gives for its
/// token; append the inner datagram to `out`, and give its token and counter. Replays are
/// not checked here (see [`Receiver`], [`Leg::open_in_place`]).
pub fn open(
    d: &[u8],
    dir: Direction,
    key_for: impl FnOnce(&Token) -> Option<Key>,
    out: &mut Vec<u8>,
) -> Result<(Token, u64), RelayError> {
    let u = parse(d)?;
    let key = key_for(&u.token).ok_or(RelayError::UnknownToken)?;
    u.open_into(&key, dir, out)?;
    Ok((u.token, u.counter))
}

/// Append to `out` the relay datagram carrying `inner` on leg `token`. `counter` must be
/// new for (`key`, `dir`): see the module docs.
pub fn seal(
    out: &mut Vec<u8>,
    key: &Key,
    dir: Direction,
    token: &Token,
    counter: u64,
    inner: &[u8],
) {
    let start = out.len();
    out.resize(start + OVERHEAD, 0);
    out.extend_from_slice(inner);
    seal_in_place(&mut out[start..], key, dir, token, counter);
}

/// Write the framing of `datagram` in place and encrypt the inner datagram that follows its
/// first [`OVERHEAD`] bytes (reserved). The length does not change. A `datagram` shorter
/// than [`OVERHEAD`] is left alone (and will not verify).
pub fn seal_in_place(datagram: &mut [u8], key: &Key, dir: Direction, token: &Token, counter: u64) {
    let Some((head, inner)) = datagram.split_at_mut_checked(OVERHEAD) else { return };
    head[0] = VERSION;
    head[1] = Kind::Relay as u8;
    head[TOKEN_AT..COUNTER_AT].copy_from_slice(token);
    head[COUNTER_AT..TAG_AT].copy_from_slice(&counter.to_be_bytes());
    let (head, tag) = head.split_at_mut(TAG_AT);
    // Only an inner datagram beyond AES-GCM's 64 GiB fails: the tag stays zero (refused).
    if let Some(t) = key.seal(dir, counter, head, inner) {
        tag.copy_from_slice(&t);
    }
}

pub use q2q_netstack::replay::{Fresh, ReplayWindow};

/// What one side knows of the datagrams a sender sent it on one leg: which counters came
/// (the replay window) and where the newest came from. The server keeps one for what each
/// end sends, each end one for what the server sends. Every datagram's tag is checked.
#[derive(Debug, Default)]
pub struct Receiver {
    window: ReplayWindow,
    /// Where the newest datagram came from.
    at: Option<std::net::SocketAddr>,
}

impl Receiver {
    /// Take `u`, sent in direction `dir` with `key`, from `from`: refuse a replay (before
    /// the tag is checked, which costs more), check its tag, and append its inner datagram
    /// to `out`. `true` when it is the newest from its sender and came from an address
    /// (`from`), which is then where the sender is ([`Receiver::at`]): only a datagram that
    /// verifies moves the leg, and only with a counter above every one seen, so a captured
    /// datagram replayed from elsewhere moves nothing.
    pub fn accept(
        &mut self,
        u: &Unverified<'_>,
        key: &Key,
        dir: Direction,
        from: Option<std::net::SocketAddr>,
        out: &mut Vec<u8>,
    ) -> Result<bool, RelayError> {
        self.admit(u.counter, from, || u.open_into(key, dir, out))
    }

    /// The order of [`Receiver::accept`] around `open`, which checks the tag of datagram
    /// `counter` and decrypts it (into a buffer or in place).
    fn admit(
        &mut self,
        counter: u64,
        from: Option<std::net::SocketAddr>,
        open: impl FnOnce() -> Result<(), RelayError>,
    ) -> Result<bool, RelayError> {
        self.window.check(counter)?;
        open()?;
        let fresh = self.window.accept(counter)?;
        let moved = fresh == Fresh::Newest && from.is_some();
        if moved {
            self.at = from;
        }
        Ok(moved)
    }

    /// Where the newest datagram came from.
    pub fn at(&self) -> Option<std::net::SocketAddr> {
        self.at
    }
}

/// A client's end of a relay leg: its token and key, the counter of what it sends and the
/// window of what the server sent. Its [`crate::ptcp::Framing`] seals each PTCP datagram
/// of a session relayed over UDP. One per grant (see the module docs: its counter is the
/// only one that seals towards the server with its key).
pub struct Leg {
    token: Token,
    key: Key,
    counter: AtomicU64,
    rx: Mutex<Receiver>,
}

impl Leg {
    /// The leg the server granted (`relay_token`, `relay_key`).
    pub fn new(token: Token, key: Key) -> Leg {
        Leg { token, key, counter: AtomicU64::new(0), rx: Mutex::default() }
    }

    /// Its token.
    pub fn token(&self) -> &Token {
        &self.token
    }

    /// The next counter: 1, 2, ...; None once spent (never wraps to one used before).
    fn next(&self) -> Option<u64> {
        let prev =
            self.counter.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |c| c.checked_add(1));
        prev.ok().map(|c| c + 1)
    }

    /// Append the sealed datagram carrying `inner` to the server (nothing once the
    /// counter is spent).
    pub fn seal_into(&self, out: &mut Vec<u8>, inner: &[u8]) {
        if let Some(counter) = self.next() {
            seal(out, &self.key, Direction::ToServer, &self.token, counter, inner);
        }
    }

    /// A bind: the sealed empty datagram that tells the server (and the NATs on the way)
    /// where this leg is.
    pub fn bind(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(OVERHEAD);
        self.seal_into(&mut out, &[]);
        out
    }

    /// Verify a datagram from the server on this leg and refuse replays; decrypted in
    /// place, the inner datagram is the end of `d` (no copy: the receive path opens it
    /// where the socket put it). What `d` holds after an error is unspecified.
    pub fn open_in_place<'d>(&self, d: &'d mut [u8]) -> Result<&'d mut [u8], RelayError> {
        let u = parse(d)?;
        if u.token != self.token {
            return Err(RelayError::UnknownToken);
        }
        let (counter, tag) = (u.counter, u.tag);
        let head: [u8; TAG_AT] = u.head.try_into().map_err(|_| RelayError::Malformed)?;
        let inner = &mut d[OVERHEAD..];
        let mut rx = self.rx.lock().unwrap_or_else(|e| e.into_inner());
        rx.admit(counter, None, || self.key.open(Direction::ToClient, counter, &head, tag, inner))?;
        Ok(inner)
    }

    /// [`Leg::open_in_place`] on a copy of `d`: the inner datagram.
    pub fn open(&self, d: &[u8]) -> Result<Vec<u8>, RelayError> {
        let mut d = d.to_vec();
        self.open_in_place(&mut d).map(|inner| inner.to_vec())
    }
}

impl std::fmt::Debug for Leg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("relay::Leg").field("token", &hex::encode(self.token)).finish()
    }
}

impl crate::ptcp::Framing for Leg {
    fn overhead(&self) -> usize {
        OVERHEAD
    }

    fn seal(&self, datagram: &mut [u8]) {
        // A spent counter leaves the framing zero: refused as not a relay datagram.
        if let Some(counter) = self.next() {
            seal_in_place(datagram, &self.key, Direction::ToServer, &self.token, counter);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ptcp::Framing;
    use proptest::prelude::*;

    fn server_seal(key: &Key, token: &Token, counter: u64, inner: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        seal(&mut out, key, Direction::ToClient, token, counter, inner);
        out
    }

    #[test]
    fn layout_and_round_trip() {
        let key = Key::from_bytes(&[3; KEY_LEN]);
        let leg = Leg::new([9; TOKEN_LEN], key.clone());
        let mut d = Vec::new();
        leg.seal_into(&mut d, b"inner");
        assert_eq!(d.len(), OVERHEAD + 5);
        assert_eq!(OVERHEAD, 42);
        assert_eq!(&d[..2], &[VERSION, 0x30]);
        assert_eq!(&d[2..18], &[9; 16]);
        assert_eq!(&d[18..26], &1u64.to_be_bytes());
        assert_ne!(&d[OVERHEAD..], b"inner", "the inner datagram is encrypted");
        let mut inner = Vec::new();
        let key_for = |t: &Token| (t == &[9; 16]).then(|| key.clone());
        let o = open(&d, Direction::ToServer, key_for, &mut inner).unwrap();
        assert_eq!((o, &inner[..]), (([9; 16], 1), &b"inner"[..]));
        // The bind is sealed too, with the next counter.
        let b = leg.bind();
        inner.clear();
        let o = open(&b, Direction::ToServer, |_| Some(key.clone()), &mut inner).unwrap();
        assert_eq!((o.1, &inner[..]), (2, &b""[..]));
        let r = open(&b, Direction::ToServer, |_| None, &mut inner);
        assert_eq!(r, Err(RelayError::UnknownToken));
    }

    /// The construction the module docs give, assembled here from ring directly: nonce
    /// direction ‖ counter, the header before the tag as associated data, the inner
    /// datagram as plaintext.
    #[test]
    fn the_tag_is_aes_256_gcm_of_header_and_inner_under_direction_and_counter() {
        let raw = [0x42; KEY_LEN];
        let token = [7; TOKEN_LEN];
        let d = server_seal(&Key::from_bytes(&raw), &token, 0x0102_0304_0506_0708, b"payload");
        let gcm = aead::LessSafeKey::new(aead::UnboundKey::new(&aead::AES_256_GCM, &raw).unwrap());
        let nonce = [0, 0, 0, 2, 1, 2, 3, 4, 5, 6, 7, 8];
        let mut body = b"payload".to_vec();
        let tag = gcm
            .seal_in_place_separate_tag(
                aead::Nonce::assume_unique_for_key(nonce),
                aead::Aad::from(&d[..26]),
                &mut body,
            )
            .unwrap();
        assert_eq!(&d[26..42], tag.as_ref());
        assert_eq!(&d[42..], &body[..]);
    }

    #[test]
    fn framing_seals_in_place_like_seal_into() {
        let key = Key::from_bytes(&[5; KEY_LEN]);
        let (a, b) = (Leg::new([1; 16], key.clone()), Leg::new([1; 16], key.clone()));
        let mut whole = Vec::new();
        a.seal_into(&mut whole, b"payload");
        let mut in_place = vec![0u8; b.overhead()];
        in_place.extend_from_slice(b"payload");
        b.seal(&mut in_place);
        assert_eq!(whole, in_place);
        // Too short to hold the framing: left alone, never a panic.
        let mut short = vec![0u8; 10];
        b.seal(&mut short);
        assert_eq!(short, vec![0u8; 10]);
    }

    /// The client checks the tag of every datagram, from wherever it comes.
    #[test]
    fn a_client_checks_every_tag() {
        let key = Key::from_bytes(&[7; KEY_LEN]);
        let token = [4; TOKEN_LEN];
        let leg = Leg::new(token, key.clone());
        let forged = |counter| server_seal(&Key::from_bytes(&[9; KEY_LEN]), &token, counter, b"x");
        assert_eq!(leg.open(&forged(1)), Err(RelayError::BadTag));
        assert_eq!(leg.open(&server_seal(&key, &token, 1, b"hello")), Ok(b"hello".to_vec()));
        // After a genuine one, a forgery right behind it (what was once taken unchecked)
        // is refused all the same, every time, and spends no counter.
        for c in 2..600 {
            assert_eq!(leg.open(&forged(c)), Err(RelayError::BadTag), "counter {c}");
        }
        assert_eq!(leg.open(&server_seal(&key, &token, 2, b"again")), Ok(b"again".to_vec()));
        // Another leg's token.
        let other = server_seal(&key, &[5; TOKEN_LEN], 3, b"x");
        assert_eq!(leg.open(&other), Err(RelayError::UnknownToken));
    }

    #[test]
    fn refuses_flipped_bits_wrong_key_wrong_direction_and_replays() {
        let key = Key::from_bytes(&[7; KEY_LEN]);
        let token = [4; TOKEN_LEN];
        let leg = Leg::new(token, key.clone());
        let d = server_seal(&key, &token, 1, b"hello");
        for i in 0..d.len() {
            for bit in 0..8 {
                let mut bad = d.clone();
                bad[i] ^= 1 << bit;
                assert!(leg.open(&bad).is_err(), "bit {bit} of byte {i}");
            }
        }
        // Another key.
        let other = Leg::new(token, Key::from_bytes(&[8; KEY_LEN]));
        assert_eq!(other.open(&d), Err(RelayError::BadTag));
        // A client's own datagram reflected back to it (the same key, counter 1, the other
        // direction).
        let mut up = Vec::new();
        leg.seal_into(&mut up, b"hello");
        assert_eq!(&up[18..26], &1u64.to_be_bytes());
        assert_eq!(leg.open(&up), Err(RelayError::BadTag));
        // The genuine one, once.
        assert_eq!(leg.open(&d), Ok(b"hello".to_vec()));
        assert_eq!(leg.open(&d), Err(RelayError::Replayed));
        // Truncated: malformed.
        assert_eq!(leg.open(&d[..OVERHEAD - 1]), Err(RelayError::Malformed));
    }

    /// One key, one counter, the same inner datagram: the two directions seal different
    /// bytes (their nonces differ), and a sender's counter never comes back to one used.
    #[test]
    fn nonces_differ_by_direction_and_a_spent_counter_seals_nothing() {
        let key = Key::from_bytes(&[1; KEY_LEN]);
        let (mut up, mut down) = (Vec::new(), Vec::new());
        seal(&mut up, &key, Direction::ToServer, &[2; TOKEN_LEN], 5, b"same inner");
        seal(&mut down, &key, Direction::ToClient, &[2; TOKEN_LEN], 5, b"same inner");
        assert_eq!(up[..TAG_AT], down[..TAG_AT]);
        assert_ne!(up[TAG_AT..], down[TAG_AT..]);
        let leg = Leg::new([2; TOKEN_LEN], key);
        leg.counter.store(u64::MAX - 1, Ordering::Relaxed);
        let mut out = Vec::new();
        leg.seal_into(&mut out, b"last");
        assert_eq!(&out[COUNTER_AT..TAG_AT], &u64::MAX.to_be_bytes());
        out.clear();
        leg.seal_into(&mut out, b"spent");
        assert!(out.is_empty());
        let mut framed = vec![0u8; OVERHEAD + 5];
        leg.seal(&mut framed);
        assert!(framed[..OVERHEAD].iter().all(|b| *b == 0), "left unframed");
        assert_eq!(parse(&framed), Err(RelayError::Malformed));
    }

    #[test]
    fn key_hex_and_debug() {
        let k = Key::random();
        assert!(Key::from_hex(&k.to_hex()).is_some());
        assert!(Key::from_hex("00").is_none());
        assert!(Key::from_hex("zz").is_none());
        assert!(!format!("{k:?}").contains(&k.to_hex()));
        assert!(!format!("{:?}", Leg::new([0; 16], k.clone())).contains(&k.to_hex()));
    }

    proptest! {
        #[test]
        fn parse_never_panics(d in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = parse(&d);
            let mut out = Vec::new();
            let _ = open(&d, Direction::ToServer, |_| Some(Key::from_bytes(&[1; KEY_LEN])), &mut out);
            let _ = Leg::new([0; 16], Key::from_bytes(&[1; KEY_LEN])).open(&d);
        }

        #[test]
        fn any_change_is_refused(
            inner in proptest::collection::vec(any::<u8>(), 0..100),
            raw in any::<[u8; KEY_LEN]>(),
            token in any::<Token>(),
            counter in 1u64..,
            flip in any::<proptest::sample::Index>(),
            bit in 0u8..8,
        ) {
            let key = Key::from_bytes(&raw);
            let d = server_seal(&key, &token, counter, &inner);
            let leg = Leg::new(token, key.clone());
            // A flipped bit anywhere.
            let mut bad = d.clone();
            bad[flip.index(d.len())] ^= 1 << bit;
            prop_assert!(leg.open(&bad).is_err());
            // The wrong direction.
            let mut out = Vec::new();
            let wrong_way = parse(&d).unwrap().open_into(&key, Direction::ToServer, &mut out);
            prop_assert_eq!(wrong_way, Err(RelayError::BadTag));
            prop_assert!(out.is_empty());
            // A wrong key.
            let mut other = raw;
            other[0] ^= 1;
            prop_assert_eq!(Leg::new(token, Key::from_bytes(&other)).open(&d), Err(RelayError::BadTag));
            // Genuine once, then a replay.
            prop_assert_eq!(leg.open(&d), Ok(inner.clone()));
            prop_assert_eq!(leg.open(&d), Err(RelayError::Replayed));
        }
    }
}
