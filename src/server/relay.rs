//! The relay: forwards the encapsulated datagrams of sessions the server set up, between
//! the two ends, over UDP or framed over the TLS control connection when a side's UDP is
//! blocked. It sees only what PTCP carries, which is TLS ciphertext.
//!
//! Each end of a relayed session holds its own leg: a token and a secret key, given to
//! that end only, over TLS (framing in [`crate::relay`]). A UDP datagram on a leg is
//! forwarded only if its tag verifies with the leg's key and its counter is not a replay;
//! only a verified datagram newer than any seen on the leg moves the leg to the address it
//! came from, so a captured datagram replayed from elsewhere moves nothing. What the relay
//! forwards to an end over UDP it seals with that end's key and its own counter. Over a
//! control connection (AMP `relay`, inside TLS) there is no tag, and only the connection
//! that owns a leg may use its token.

use crate::amp::PeerHandle;
use crate::proto::commands;
use crate::relay::{self, Direction, Fresh, Key, RelayError, ReplayWindow, Token};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// One end of a relayed session.
struct Leg {
    partner: Token,
    key: Key,
    /// The user this end belongs to (for limits and accounting).
    user: String,
    /// The control connection it came from; the leg ends with it, and only it may use
    /// the token over TCP.
    conn: u64,
    /// None for an end whose control connection is at another instance of the domain:
    /// reached over UDP, or over TCP once a connection of its user here takes the leg
    /// ([`Relay::claim`]).
    handle: Option<PeerHandle>,
    udp: Option<SocketAddr>,
    /// Counters of the verified UDP datagrams from this end.
    window: ReplayWindow,
    /// The counter of the last datagram sealed to this end.
    sent: u64,
    last: Instant,
    /// Token bucket, in bytes.
    allowance: f64,
    bytes: u64,
}

/// Where to send a forwarded datagram.
pub enum Forward {
    /// A sealed relay datagram, to this UDP address.
    Udp(SocketAddr, Vec<u8>),
    /// An AMP `relay` command (told, not asked), over this control connection.
    Tcp(PeerHandle, commands::Relay),
}

/// Limits on relaying.
#[derive(Debug, Clone, Copy)]
pub struct RelayLimits {
    /// Relayed sessions one user may take part in at once.
    pub sessions_per_user: usize,
    /// Rate of one leg (token bucket of one second's worth).
    pub bytes_per_sec: f64,
    /// A session silent this long ends.
    pub idle: Duration,
}

impl Default for RelayLimits {
    fn default() -> Self {
        RelayLimits { sessions_per_user: 64, bytes_per_sec: 100e6, idle: Duration::from_secs(600) }
    }
}

/// All relayed sessions.
pub struct Relay {
    legs: Mutex<HashMap<Token, Leg>>,
    limits: RelayLimits,
    /// Inner bytes forwarded, both ways, over all sessions.
    pub relayed_bytes: AtomicU64,
    /// Datagrams refused: malformed, unknown token, bad tag, replayed, or a token used by
    /// a connection that does not own it.
    pub refused: AtomicU64,
}

/// The `conn` of an end whose control connection is at another instance (connection ids
/// start at 1): no local connection owns its leg.
pub const REMOTE_CONN: u64 = 0;

/// An end of a session to set up.
pub struct End {
    /// The user's address.
    pub user: String,
    /// Its control connection ([`REMOTE_CONN`] for one at another instance).
    pub conn: u64,
    /// For relaying to it over that connection; None when the connection is at another
    /// instance of the domain (the end is then reached over UDP, or over TCP once it takes
    /// its leg with a connection here).
    pub handle: Option<PeerHandle>,
}

/// What one end is given (over TLS) for its leg.
#[derive(Debug, Clone)]
pub struct Grant {
    /// The leg's token (`relay_token`).
    pub token: Token,
    /// The leg's key (`relay_key`).
    pub key: Key,
}

impl Relay {
    /// No sessions yet.
    pub fn new(limits: RelayLimits) -> Relay {
        Relay {
            legs: Mutex::default(),
            limits,
            relayed_bytes: AtomicU64::default(),
            refused: AtomicU64::default(),
        }
    }

    /// Set up a relayed session between `a` and `b`; their legs, or None if a user has
    /// too many sessions.
    pub fn create(&self, a: End, b: End, now: Instant) -> Option<(Grant, Grant)> {
        let mut legs = self.legs.lock().ok()?;
        self.expire(&mut legs, now);
        for user in [&a.user, &b.user] {
            if legs.values().filter(|l| &l.user == user).count() >= self.limits.sessions_per_user {
                return None;
            }
        }
        let ga = Grant { token: rand::random(), key: Key::random() };
        let gb = Grant { token: rand::random(), key: Key::random() };
        let leg = |e: End, key: &Key, partner| Leg {
            partner,
            key: key.clone(),
            user: e.user,
            conn: e.conn,
            handle: e.handle,
            udp: None,
            window: ReplayWindow::default(),
            sent: 0,
            last: now,
            allowance: self.limits.bytes_per_sec,
            bytes: 0,
        };
        legs.insert(ga.token, leg(a, &ga.key, gb.token));
        legs.insert(gb.token, leg(b, &gb.key, ga.token));
        Some((ga, gb))
    }

    /// A relay datagram that came by UDP from `from`: where to forward it, if anywhere
    /// (`Ok(None)`: a bind, or over the rate). Refused unless its tag verifies with the
    /// leg's key and its counter is new; the leg moves to `from` only if the counter is
    /// higher than any seen on it.
    pub fn forward_udp(
        &self,
        datagram: &[u8],
        from: SocketAddr,
        now: Instant,
    ) -> Result<Option<Forward>, RelayError> {
        let r = self.forward_udp_inner(datagram, from, now);
        if r.is_err() {
            self.refused.fetch_add(1, Ordering::Relaxed);
        }
        r
    }

    fn forward_udp_inner(
        &self,
        datagram: &[u8],
        from: SocketAddr,
        now: Instant,
    ) -> Result<Option<Forward>, RelayError> {
        let u = relay::parse(datagram)?;
        let mut legs = self.legs.lock().map_err(|_| RelayError::UnknownToken)?;
        let leg = legs.get_mut(&u.token).ok_or(RelayError::UnknownToken)?;
        let opened = u.verify(&leg.key, Direction::ToServer)?;
        if leg.window.accept(opened.counter)? == Fresh::Newest {
            leg.udp = Some(from);
        }
        Ok(self.relay(&mut legs, &opened.token, opened.inner, now))
    }

    /// A datagram relayed over control connection `conn`: where to forward it, if
    /// anywhere. Refused unless `conn` owns the leg `token`.
    pub fn forward_tcp(
        &self,
        conn: u64,
        token: &Token,
        inner: &[u8],
        now: Instant,
    ) -> Result<Option<Forward>, RelayError> {
        let r = (|| {
            let mut legs = self.legs.lock().map_err(|_| RelayError::UnknownToken)?;
            let leg = legs.get(token).ok_or(RelayError::UnknownToken)?;
            if leg.conn != conn {
                return Err(RelayError::NotOwner);
            }
            Ok(self.relay(&mut legs, token, inner, now))
        })();
        if r.is_err() {
            self.refused.fetch_add(1, Ordering::Relaxed);
        }
        r
    }

    /// Control connection `conn`, logged in as `user`, takes the leg `token` of an end whose
    /// control connection is at another instance ([`REMOTE_CONN`]): a caller without UDP
    /// relays over a connection of its own to this instance (AMP `relay` with no data, the
    /// bind over TCP). Only the leg's own user may take it, and only once: the token alone,
    /// which only that end was given (over TLS), is not enough. From then on the leg is
    /// that connection's, as if set up by it ([`Relay::forward_tcp`], and it ends with it).
    pub fn claim(
        &self,
        conn: u64,
        user: &str,
        handle: PeerHandle,
        token: &Token,
    ) -> Result<(), RelayError> {
        let r = (|| {
            let mut legs = self.legs.lock().map_err(|_| RelayError::UnknownToken)?;
            let leg = legs.get_mut(token).ok_or(RelayError::UnknownToken)?;
            if leg.conn == conn {
                return Ok(());
            }
            if leg.conn != REMOTE_CONN || leg.user != user {
                return Err(RelayError::NotOwner);
            }
            leg.conn = conn;
            leg.handle = Some(handle);
            Ok(())
        })();
        if r.is_err() {
            self.refused.fetch_add(1, Ordering::Relaxed);
        }
        r
    }

    /// Account `inner` from leg `token` (known to exist) and build what goes to its partner.
    fn relay(
        &self,
        legs: &mut HashMap<Token, Leg>,
        token: &Token,
        inner: &[u8],
        now: Instant,
    ) -> Option<Forward> {
        let leg = legs.get_mut(token)?;
        let elapsed = now.saturating_duration_since(leg.last).as_secs_f64();
        leg.last = now;
        leg.allowance =
            (leg.allowance + elapsed * self.limits.bytes_per_sec).min(self.limits.bytes_per_sec);
        if inner.is_empty() {
            return None; // a bind
        }
        if leg.allowance < inner.len() as f64 {
            return None; // over the rate: dropped, PTCP recovers
        }
        leg.allowance -= inner.len() as f64;
        leg.bytes += inner.len() as u64;
        let partner = leg.partner;
        let other = legs.get_mut(&partner)?;
        self.relayed_bytes.fetch_add(inner.len() as u64, Ordering::Relaxed);
        match (other.udp, &other.handle) {
            (Some(addr), _) => {
                other.sent += 1;
                let mut out = Vec::with_capacity(relay::OVERHEAD + inner.len());
                relay::seal(&mut out, &other.key, Direction::ToClient, &partner, other.sent, inner);
                Some(Forward::Udp(addr, out))
            }
            (None, Some(handle)) => Some(Forward::Tcp(
                handle.clone(),
                commands::Relay { token: partner, data: inner.to_vec() },
            )),
            // A remote end that has not bound its leg by UDP yet: dropped, PTCP recovers.
            (None, None) => None,
        }
    }

    /// The UDP address leg `token` is bound to, if any.
    pub fn bound(&self, token: &Token) -> Option<SocketAddr> {
        self.legs.lock().ok()?.get(token)?.udp
    }

    /// End every session a connection took part in.
    pub fn drop_connection(&self, conn: u64) {
        if let Ok(mut legs) = self.legs.lock() {
            let gone: Vec<Token> = legs
                .iter()
                .filter(|(_, l)| l.conn == conn)
                .flat_map(|(t, l)| [*t, l.partner])
                .collect();
            for t in gone {
                legs.remove(&t);
            }
        }
    }

    /// End the session `token` belongs to.
    pub fn remove(&self, token: &Token) {
        if let Ok(mut legs) = self.legs.lock()
            && let Some(leg) = legs.remove(token)
        {
            legs.remove(&leg.partner);
        }
    }

    /// Relayed sessions now.
    pub fn sessions(&self) -> usize {
        self.legs.lock().map_or(0, |l| l.len() / 2)
    }

    fn expire(&self, legs: &mut HashMap<Token, Leg>, now: Instant) {
        let idle = self.limits.idle;
        let stale: Vec<Token> = legs
            .iter()
            .filter(|(_, l)| now.saturating_duration_since(l.last) > idle)
            .flat_map(|(t, l)| [*t, l.partner])
            .collect();
        for t in stale {
            legs.remove(&t);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::relay::Leg as ClientLeg;

    /// A relay with one session between conn 1 (alice) and conn 2 (bob), and both clients'
    /// legs. Within a tokio runtime (the handles' tasks).
    fn session() -> (Relay, ClientLeg, ClientLeg, Grant, Grant) {
        let relay = Relay::new(RelayLimits::default());
        // A handle to nowhere (the other half of the pipe is dropped).
        let handle = || crate::amp::peer::spawn(tokio::io::duplex(64).0).0;
        let end = |user: &str, conn| End { user: user.into(), conn, handle: Some(handle()) };
        let (ga, gb) = relay.create(end("alice", 1), end("bob", 2), Instant::now()).unwrap();
        let a = ClientLeg::new(ga.token, ga.key.clone());
        let b = ClientLeg::new(gb.token, gb.key.clone());
        (relay, a, b, ga, gb)
    }

    fn sealed(leg: &ClientLeg, inner: &[u8]) -> Vec<u8> {
        let mut d = Vec::new();
        leg.seal_into(&mut d, inner);
        d
    }

    const A: &str = "192.0.2.1:1000";
    const B: &str = "192.0.2.2:2000";
    const EVIL: &str = "203.0.113.66:6666";

    #[tokio::test]
    async fn verified_datagrams_are_forwarded_sealed_for_the_other_end() {
        let (relay, a, b, _, _) = session();
        let now = Instant::now();
        assert!(relay.forward_udp(&a.bind(), A.parse().unwrap(), now).unwrap().is_none());
        let f = relay.forward_udp(&sealed(&b, b"hi alice"), B.parse().unwrap(), now).unwrap();
        let Some(Forward::Udp(to, d)) = f else { panic!("not forwarded over UDP") };
        assert_eq!(to, A.parse().unwrap());
        assert_eq!(a.open(&d), Ok(&b"hi alice"[..]));
        // Bob cannot read it as his, nor can it be sent back to the relay as alice's.
        assert!(b.open(&d).is_err());
        assert_eq!(
            relay.forward_udp(&d, EVIL.parse().unwrap(), now).err(),
            Some(RelayError::BadTag)
        );
        // And the way back.
        let Some(Forward::Udp(to, d)) =
            relay.forward_udp(&sealed(&a, b"hi bob"), A.parse().unwrap(), now).unwrap()
        else {
            panic!("not forwarded over UDP")
        };
        assert_eq!((to, b.open(&d)), (B.parse().unwrap(), Ok(&b"hi bob"[..])));
        assert_eq!(relay.relayed_bytes.load(Ordering::Relaxed), 14);
    }

    #[tokio::test]
    async fn forged_tags_and_unknown_tokens_are_dropped() {
        let (relay, a, b, ga, _) = session();
        let now = Instant::now();
        relay.forward_udp(&a.bind(), A.parse().unwrap(), now).unwrap();
        // Knowing the token (it travels in clear) is not enough without the key.
        let forger = ClientLeg::new(ga.token, Key::random());
        let r = relay.forward_udp(&sealed(&forger, b"x"), EVIL.parse().unwrap(), now);
        assert_eq!(r.err(), Some(RelayError::BadTag));
        assert_eq!(relay.bound(&ga.token), Some(A.parse().unwrap()));
        // A bit flipped on the way.
        let mut d = sealed(&b, b"hello");
        d[relay::OVERHEAD] ^= 1;
        assert_eq!(relay.forward_udp(&d, B.parse().unwrap(), now).err(), Some(RelayError::BadTag));
        let stranger = ClientLeg::new([0; 16], Key::random());
        let r = relay.forward_udp(&sealed(&stranger, b"x"), EVIL.parse().unwrap(), now);
        assert_eq!(r.err(), Some(RelayError::UnknownToken));
        assert_eq!(
            relay.forward_udp(b"\x01\x30short", EVIL.parse().unwrap(), now).err(),
            Some(RelayError::Malformed)
        );
        assert_eq!(relay.refused.load(Ordering::Relaxed), 4);
    }

    #[tokio::test]
    async fn a_replayed_datagram_does_not_move_the_leg() {
        let (relay, a, b, ga, _) = session();
        let now = Instant::now();
        relay.forward_udp(&b.bind(), B.parse().unwrap(), now).unwrap();
        let captured = sealed(&a, b"data");
        assert!(relay.forward_udp(&captured, A.parse().unwrap(), now).unwrap().is_some());
        assert_eq!(relay.bound(&ga.token), Some(A.parse().unwrap()));
        // Replayed from elsewhere: refused, and the leg stays.
        let r = relay.forward_udp(&captured, EVIL.parse().unwrap(), now);
        assert_eq!(r.err(), Some(RelayError::Replayed));
        assert_eq!(relay.bound(&ga.token), Some(A.parse().unwrap()));
        // A late (reordered) datagram is forwarded but moves nothing either.
        let older = sealed(&a, b"older");
        let newer = sealed(&a, b"newer");
        assert!(relay.forward_udp(&newer, A.parse().unwrap(), now).unwrap().is_some());
        assert!(relay.forward_udp(&older, EVIL.parse().unwrap(), now).unwrap().is_some());
        assert_eq!(relay.bound(&ga.token), Some(A.parse().unwrap()));
        // The genuine end moving (NAT rebinding): its next datagram moves the leg.
        let moved: SocketAddr = "192.0.2.1:1001".parse().unwrap();
        relay.forward_udp(&a.bind(), moved, now).unwrap();
        assert_eq!(relay.bound(&ga.token), Some(moved));
    }

    #[tokio::test]
    async fn only_the_owning_connection_relays_over_tcp() {
        let (relay, _, _, ga, gb) = session();
        let now = Instant::now();
        // Conn 2 (bob) knows alice's token but does not own it; nor does a stranger.
        assert_eq!(relay.forward_tcp(2, &ga.token, b"x", now).err(), Some(RelayError::NotOwner));
        assert_eq!(relay.forward_tcp(3, &ga.token, b"x", now).err(), Some(RelayError::NotOwner));
        assert_eq!(relay.forward_tcp(1, &[0; 16], b"x", now).err(), Some(RelayError::UnknownToken));
        // Alice over her own connection: to bob, over his (no UDP bound).
        let f = relay.forward_tcp(1, &ga.token, b"over tcp", now).unwrap();
        let Some(Forward::Tcp(_, r)) = f else { panic!("not forwarded over TCP") };
        assert_eq!(r, commands::Relay { token: gb.token, data: b"over tcp".to_vec() });
        assert!(relay.forward_tcp(1, &ga.token, b"", now).unwrap().is_none());
    }

    #[tokio::test]
    async fn only_its_own_user_takes_a_leg_set_up_at_another_instance() {
        let relay = Relay::new(RelayLimits::default());
        let handle = || crate::amp::peer::spawn(tokio::io::duplex(64).0).0;
        // Alice's control connection is at another instance; bob's is conn 2 here.
        let alice = End { user: "alice@a.test".into(), conn: REMOTE_CONN, handle: None };
        let bob = End { user: "bob@a.test".into(), conn: 2, handle: Some(handle()) };
        let now = Instant::now();
        let (ga, gb) = relay.create(alice, bob, now).unwrap();
        // Not over TCP before it is taken: no connection owns it.
        assert_eq!(relay.forward_tcp(3, &ga.token, b"x", now).err(), Some(RelayError::NotOwner));
        // Bob's leg is his connection's; a leg is not taken by another user, even one who
        // knows the token, nor an unknown token.
        assert_eq!(relay.claim(3, "alice@a.test", handle(), &gb.token), Err(RelayError::NotOwner));
        assert_eq!(relay.claim(4, "eve@a.test", handle(), &ga.token), Err(RelayError::NotOwner));
        assert_eq!(
            relay.claim(4, "alice@a.test", handle(), &[7; 16]),
            Err(RelayError::UnknownToken)
        );
        // Alice's own connection here takes it, again idempotently; then no other may.
        relay.claim(3, "alice@a.test", handle(), &ga.token).unwrap();
        relay.claim(3, "alice@a.test", handle(), &ga.token).unwrap();
        assert_eq!(relay.claim(5, "alice@a.test", handle(), &ga.token), Err(RelayError::NotOwner));
        assert_eq!(relay.refused.load(Ordering::Relaxed), 5);
        // Both ways over TCP now.
        let f = relay.forward_tcp(3, &ga.token, b"to bob", now).unwrap();
        let Some(Forward::Tcp(_, r)) = f else { panic!("not forwarded over TCP") };
        assert_eq!(r, commands::Relay { token: gb.token, data: b"to bob".to_vec() });
        let f = relay.forward_tcp(2, &gb.token, b"to alice", now).unwrap();
        let Some(Forward::Tcp(_, r)) = f else { panic!("not forwarded to alice over TCP") };
        assert_eq!(r, commands::Relay { token: ga.token, data: b"to alice".to_vec() });
        // The session ends with the connection that took it.
        relay.drop_connection(3);
        assert_eq!(relay.sessions(), 0);
    }
}
