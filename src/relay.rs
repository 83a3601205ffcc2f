//! Relay framing, shared by the server's relay ([`crate::server::relay`]) and its clients
//! ([`crate::presence`]). A relayed session has two legs, one per end; each leg has a
//! token (an id, 16 random bytes, may be seen by anyone on the path) and a leg key (32
//! random bytes) that the server gives only to that end, over TLS (`relay_token` and
//! `relay_key` of `inbound`, see [`crate::proto`]). Over UDP every datagram is
//!
//! ```text
//! version kind=0x30 | token (16) | counter (8, BE) | tag (16) | inner datagram
//! tag = HMAC-SHA256(leg key, direction (1) | token | counter | inner)[..16]
//! ```
//!
//! `inner` is a PTCP datagram, or empty for a bind (which tells the server the leg's UDP
//! address). `direction` is [`Direction::ToServer`] from a client and
//! [`Direction::ToClient`] from the server, so nothing can be reflected back to its sender.
//! Each sender numbers its datagrams per leg from 1 up; receivers refuse counters they have
//! seen (a sliding [`ReplayWindow`]), and the server moves a leg to a new UDP address only
//! for a datagram newer than any it has seen on that leg: a captured datagram replayed from
//! elsewhere cannot steal or black-hole the session.
//!
//! Over the TLS control connection (AMP `relay` with `token` and `data`) there is no tag:
//! TLS protects it, and the server lets only the connection owning a leg use its token.

use q2q_netstack::wire::{Kind, Prefix, VERSION};
use ring::hmac;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

/// Bytes of a leg token.
pub const TOKEN_LEN: usize = 16;
/// Bytes of a leg key.
pub const KEY_LEN: usize = 32;
/// Bytes of the (truncated) tag.
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
    mac: hmac::Key,
}

impl Key {
    /// A fresh random key.
    pub fn random() -> Key {
        Key::from_bytes(&rand::random())
    }

    /// The key with these bytes.
    pub fn from_bytes(raw: &[u8; KEY_LEN]) -> Key {
        Key { raw: *raw, mac: hmac::Key::new(hmac::HMAC_SHA256, raw) }
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

    fn tag(&self, dir: Direction, token: &Token, counter: u64, inner: &[u8]) -> [u8; TAG_LEN] {
        let mut ctx = hmac::Context::with_key(&self.mac);
        ctx.update(&[dir as u8]);
        ctx.update(token);
        ctx.update(&counter.to_be_bytes());
        ctx.update(inner);
        let full = ctx.sign();
        let mut out = [0u8; TAG_LEN];
        out.copy_from_slice(&full.as_ref()[..TAG_LEN]);
        out
    }
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

/// Who sent a datagram: part of what the tag covers.
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
    tag: [u8; TAG_LEN],
    inner: &'a [u8],
}

/// A verified relay datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Opened<'a> {
    /// Its leg.
    pub token: Token,
    /// The sender's counter (not checked against replays here: see [`ReplayWindow`]).
    pub counter: u64,
    /// The inner datagram (empty: a bind).
    pub inner: &'a [u8],
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
    let inner = d.get(OVERHEAD..).ok_or(RelayError::Malformed)?;
    Ok(Unverified { token, counter: u64::from_be_bytes(counter), tag, inner })
}

impl<'a> Unverified<'a> {
    /// Check the tag with the leg's `key`, for a datagram sent in direction `dir`.
    pub fn verify(&self, key: &Key, dir: Direction) -> Result<Opened<'a>, RelayError> {
        let expected = key.tag(dir, &self.token, self.counter, self.inner);
        // No early exit: no timing oracle on the tag.
        if expected.iter().zip(&self.tag).fold(0u8, |acc, (x, y)| acc | (x ^ y)) != 0 {
            return Err(RelayError::BadTag);
        }
        Ok(Opened { token: self.token, counter: self.counter, inner: self.inner })
    }
}

/// Parse and verify `d`, sent in direction `dir`, with the key `key_for` gives for its
/// token. Replays are not checked here (see [`ReplayWindow`], [`Leg::open`]).
pub fn open<'a>(
    d: &'a [u8],
    dir: Direction,
    key_for: impl FnOnce(&Token) -> Option<Key>,
) -> Result<Opened<'a>, RelayError> {
    let u = parse(d)?;
    let key = key_for(&u.token).ok_or(RelayError::UnknownToken)?;
    u.verify(&key, dir)
}

/// Append to `out` the relay datagram carrying `inner` on leg `token`.
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

/// Write the framing of `datagram` in place: its first [`OVERHEAD`] bytes are reserved, the
/// inner datagram follows. The length does not change. A `datagram` shorter than
/// [`OVERHEAD`] is left alone (and will not verify).
pub fn seal_in_place(datagram: &mut [u8], key: &Key, dir: Direction, token: &Token, counter: u64) {
    let Some((head, inner)) = datagram.split_at_mut_checked(OVERHEAD) else { return };
    let tag = key.tag(dir, token, counter, inner);
    head[0] = VERSION;
    head[1] = Kind::Relay as u8;
    head[TOKEN_AT..COUNTER_AT].copy_from_slice(token);
    head[COUNTER_AT..TAG_AT].copy_from_slice(&counter.to_be_bytes());
    head[TAG_AT..].copy_from_slice(&tag);
}

pub use q2q_netstack::replay::{Fresh, ReplayWindow};

/// How far above the highest verified counter of a sender a datagram from where that
/// sender's newest verified datagram came is taken without checking its tag: one datagram
/// in this many is checked ([`Receiver`]). Below the replay window's width, so unchecked
/// counters never push a verified one out of it.
pub const TRUST_AHEAD: u64 = 256;
const _: () = assert!(TRUST_AHEAD < ReplayWindow::SIZE);

/// What one side knows of the datagrams a sender sent it on one leg: which counters came
/// (the replay window), the highest verified one, and where the newest verified one came
/// from. It decides which tags to check (the server of what each end sends, each end of
/// what the server sends).
///
/// **Tags checked once in a while.** Checking the HMAC of every datagram was half of the
/// relay's CPU. A datagram from the sender's address (where its newest verified datagram
/// came from) whose counter is at most [`TRUST_AHEAD`] above the highest verified one is
/// taken without checking its tag; its counter still goes through the replay window. Any
/// other datagram (another address, a counter further ahead, or one at or below the
/// highest verified) is checked, so the genuine sender has one datagram in
/// [`TRUST_AHEAD`] checked; and every datagram is checked while the leg is *contested* (a
/// verified datagram came from elsewhere without being the newest). Why this is safe:
/// - Nobody can move (hijack) a leg: only a datagram whose tag verifies moves it
///   ([`Accepted::moved`]), and only with a counter above every one seen (the window also
///   holds the counters taken unchecked, so a captured datagram replayed from elsewhere is
///   refused as a replay).
/// - A stranger off the path cannot inject: without the 16 random bytes of the token,
///   which only the two ends and the path see, every datagram is refused before its tag is
///   even looked at, and an unchecked one must also come from the sender's address.
/// - A stranger on the path who can forge the sender's source address can get at most
///   [`TRUST_AHEAD`] datagrams per verified one through. It gains nothing by it: every
///   PTCP datagram of a session is sealed end to end with the session's keys (AES-256-GCM,
///   [`q2q_netstack::seal`]), so the peer refuses them, as it refuses what such an
///   attacker sends it straight on a direct path. It can spend counters the genuine sender
///   will use (those datagrams are then refused as replays): the disruption anyone who can
///   forge packets on the path can cause to any UDP flow. It cannot hold a leg at an
///   address the sender left (by keeping the highest counter above the sender's): the
///   sender's verified datagram from its new address makes the leg contested, and from
///   then on the forgeries are checked and refused until the sender's counter is the
///   newest and moves it.
#[derive(Debug, Default)]
pub struct Receiver {
    window: ReplayWindow,
    /// The highest counter of a verified datagram (0: none yet).
    verified: u64,
    /// Where the newest verified datagram came from.
    at: Option<std::net::SocketAddr>,
    contested: bool,
}

/// A datagram a [`Receiver`] took.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Accepted<'a> {
    /// The inner datagram (empty: a bind).
    pub inner: &'a [u8],
    /// Its tag verified and it is the newest: the sender is at its source address now.
    pub moved: bool,
}

impl Receiver {
    /// Take `u`, sent in direction `dir` with `key`, from `from`: check its tag if it must
    /// be checked (see the type's docs; always when `from` is None, which moves nothing)
    /// and refuse a replay.
    pub fn accept<'a>(
        &mut self,
        u: &Unverified<'a>,
        key: &Key,
        dir: Direction,
        from: Option<std::net::SocketAddr>,
    ) -> Result<Accepted<'a>, RelayError> {
        let unchecked = !self.contested
            && from.is_some()
            && self.at == from
            && u.counter > self.verified
            && u.counter - self.verified <= TRUST_AHEAD;
        if unchecked {
            self.window.accept(u.counter)?;
            return Ok(Accepted { inner: u.inner, moved: false });
        }
        let opened = u.verify(key, dir)?;
        let fresh = self.window.accept(opened.counter)?;
        self.verified = self.verified.max(opened.counter);
        let moved = fresh == Fresh::Newest && from.is_some();
        if moved {
            self.at = from;
            self.contested = false;
        } else if from.is_some() && self.at != from {
            // The sender may have moved while someone forging its old address keeps the
            // highest counter out of its reach: check everything until it is the newest.
            self.contested = true;
        }
        Ok(Accepted { inner: opened.inner, moved })
    }

    /// Where the newest verified datagram came from.
    pub fn at(&self) -> Option<std::net::SocketAddr> {
        self.at
    }
}

/// A client's end of a relay leg: its token and key, the counter of what it sends and the
/// window of what the server sent. Its [`crate::ptcp::Framing`] seals each PTCP datagram
/// of a session relayed over UDP.
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

    fn next(&self) -> u64 {
        self.counter.fetch_add(1, Ordering::Relaxed).wrapping_add(1)
    }

    /// Append the sealed datagram carrying `inner` to the server.
    pub fn seal_into(&self, out: &mut Vec<u8>, inner: &[u8]) {
        seal(out, &self.key, Direction::ToServer, &self.token, self.next(), inner);
    }

    /// A bind: the sealed empty datagram that tells the server (and the NATs on the way)
    /// where this leg is.
    pub fn bind(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(OVERHEAD);
        self.seal_into(&mut out, &[]);
        out
    }

    /// Verify a datagram from the server on this leg and refuse replays; the inner datagram.
    pub fn open<'a>(&self, d: &'a [u8]) -> Result<&'a [u8], RelayError> {
        self.receive(d, None)
    }

    /// [`Leg::open`] for a datagram that came from `from`: from where the server's newest
    /// verified datagram came, only one tag in [`TRUST_AHEAD`] is checked ([`Receiver`]).
    pub fn open_from<'a>(
        &self,
        d: &'a [u8],
        from: std::net::SocketAddr,
    ) -> Result<&'a [u8], RelayError> {
        self.receive(d, Some(from))
    }

    fn receive<'a>(
        &self,
        d: &'a [u8],
        from: Option<std::net::SocketAddr>,
    ) -> Result<&'a [u8], RelayError> {
        let u = parse(d)?;
        if u.token != self.token {
            return Err(RelayError::UnknownToken);
        }
        let mut rx = self.rx.lock().unwrap_or_else(|e| e.into_inner());
        Ok(rx.accept(&u, &self.key, Direction::ToClient, from)?.inner)
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
        seal_in_place(datagram, &self.key, Direction::ToServer, &self.token, self.next());
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
        let o = open(&d, Direction::ToServer, |t| (t == &[9; 16]).then(|| key.clone())).unwrap();
        assert_eq!((o.token, o.counter, o.inner), ([9; 16], 1, &b"inner"[..]));
        // The bind is sealed too, with the next counter.
        let b = leg.bind();
        let o = open(&b, Direction::ToServer, |_| Some(key.clone())).unwrap();
        assert_eq!((o.counter, o.inner), (2, &b""[..]));
        assert_eq!(open(&b, Direction::ToServer, |_| None), Err(RelayError::UnknownToken));
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

    /// The client's side of [`Receiver`]: from the relay's address one tag in
    /// [`TRUST_AHEAD`] is checked; from anywhere else, or further ahead, every one.
    #[test]
    fn a_client_checks_the_relays_tags_once_in_a_while() {
        let key = Key::from_bytes(&[7; KEY_LEN]);
        let token = [4; TOKEN_LEN];
        let leg = Leg::new(token, key.clone());
        let relay: std::net::SocketAddr = "192.0.2.1:8788".parse().unwrap();
        let evil: std::net::SocketAddr = "203.0.113.66:8788".parse().unwrap();
        let forged = |counter| server_seal(&Key::from_bytes(&[9; KEY_LEN]), &token, counter, b"x");
        // Nothing verified yet: checked.
        assert_eq!(leg.open_from(&forged(1), relay), Err(RelayError::BadTag));
        let d = server_seal(&key, &token, 1, b"hello");
        assert_eq!(leg.open_from(&d, relay), Ok(&b"hello"[..]));
        // From the relay's address within TRUST_AHEAD: not checked (the session's seal
        // refuses what is inside), but replays still refused.
        assert_eq!(leg.open_from(&forged(2), relay), Ok(&b"x"[..]));
        assert_eq!(leg.open_from(&forged(2), relay), Err(RelayError::Replayed));
        assert_eq!(leg.open_from(&forged(2 + TRUST_AHEAD), relay), Err(RelayError::BadTag));
        assert_eq!(leg.open_from(&forged(3), evil), Err(RelayError::BadTag));
        // Without an address (Leg::open) every tag is checked.
        assert_eq!(leg.open(&forged(4)), Err(RelayError::BadTag));
        let d = server_seal(&key, &token, 5, b"again");
        assert_eq!(leg.open_from(&d, relay), Ok(&b"again"[..]));
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
        // A client's own datagram reflected back to it.
        let mut up = Vec::new();
        leg.seal_into(&mut up, b"hello");
        assert_eq!(leg.open(&up), Err(RelayError::BadTag));
        // The genuine one, once.
        assert_eq!(leg.open(&d), Ok(&b"hello"[..]));
        assert_eq!(leg.open(&d), Err(RelayError::Replayed));
        // Truncated: malformed.
        assert_eq!(leg.open(&d[..OVERHEAD - 1]), Err(RelayError::Malformed));
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
            let _ = open(&d, Direction::ToServer, |_| Some(Key::from_bytes(&[1; KEY_LEN])));
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
            prop_assert_eq!(parse(&d).unwrap().verify(&key, Direction::ToServer), Err(RelayError::BadTag));
            // A wrong key.
            let mut other = raw;
            other[0] ^= 1;
            prop_assert_eq!(Leg::new(token, Key::from_bytes(&other)).open(&d), Err(RelayError::BadTag));
            // Genuine once, then a replay.
            prop_assert_eq!(leg.open(&d), Ok(&inner[..]));
            prop_assert_eq!(leg.open(&d), Err(RelayError::Replayed));
        }
    }
}
