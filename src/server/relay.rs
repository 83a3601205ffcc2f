//! The relay: forwards the encapsulated datagrams of sessions the server set up, between
//! the two ends, over UDP or framed over the TLS control connection when a side's UDP is
//! blocked. It sees only what PTCP carries, which is TLS ciphertext.
//!
//! Each end of a relayed session holds its own leg: a token and a secret key, given to
//! that end only, over TLS (framing in [`crate::relay`]). A UDP datagram on a leg is
//! forwarded only if its counter is not a replay and its tag verifies with the leg's key
//! (every datagram's: [`relay::Receiver`]). Only a verified datagram newer than any seen on
//! the leg moves the leg to the address it came from, so a captured datagram replayed from
//! elsewhere moves nothing. What the relay forwards to an end over UDP it seals with that
//! end's key and its own counter for the leg (the only sender towards that end with that
//! key: [`crate::relay`] says why no nonce comes twice). Over a control connection (AMP
//! `relay`, inside TLS) there is no tag, and only the connection that owns a leg may use
//! its token.
//!
//! [`Relay`] is the sans-IO core: it does no I/O and reads no clock (`now` is passed in).
//! One task owns it ([`super::udp`], the task that owns the server's main UDP socket);
//! connection handlers reach it through a bounded channel ([`RelayHandle`]).
//!
//! ```text
//!  handle_udp / handle_tcp ──▶ per-leg queue (bounded: drop when full, counted)
//!                                   │ deficit round robin over the legs with data,
//!                                   │ within the overall budget (if any)
//!  poll_transmit ◀──────────────────┘ sealed for the partner: UDP, or AMP `relay`
//! ```
//!
//! There is no fixed rate per leg. When the relay is not saturated every queue drains at
//! each pass and a leg alone gets the whole link. When it is (the socket's send buffer is
//! full, or the optional overall budget [`RelayLimits::budget`] is spent), the queues fill
//! and deficit round robin (Shreedhar and Varghese, "Efficient fair queuing using deficit
//! round robin", 1995) gives each leg with data an equal share of bytes; a flooding leg
//! loses what overflows its own queue, not the other legs' share.

use crate::amp::PeerHandle;
use crate::proto::commands;
use crate::relay::{self, Direction, Key, Receiver, RelayError, Token};
use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};

/// Bytes a leg may send per round of deficit round robin: about one full-size datagram,
/// so the legs take turns datagram by datagram (a larger datagram waits a few rounds).
const QUANTUM: usize = 2048;

/// One end of a relayed session.
struct Leg {
    partner: Token,
    /// The session the server set the leg up for (the id both ends know it by).
    session: u64,
    key: Key,
    /// The user this end belongs to (for limits and accounting).
    user: String,
    /// The control connection it came from: only it may use the token over TCP. When it
    /// closes the leg stays ([`REMOTE_CONN`], reached over UDP) until the end logs back
    /// in and takes it again ([`Relay::claim`], [`Relay::renew`]), for at most
    /// [`RelayLimits::orphan_grace`].
    conn: u64,
    /// When its connection closed, if no other took the leg since.
    orphaned: Option<Instant>,
    /// None for an end whose control connection is at another instance of the domain:
    /// reached over UDP, or over TCP once a connection of its user here takes the leg
    /// ([`Relay::claim`]).
    handle: Option<PeerHandle>,
    /// What came from this end over UDP; where it is ([`relay::Receiver::at`]).
    rx: Receiver,
    /// The counter of the last datagram sealed to this end (0: none yet); only goes up.
    sent: u64,
    last: Instant,
    /// Inner datagrams from this end waiting to go to its partner, oldest first (each
    /// opened into a buffer of [`Relay::pool`], the one copy on the way through).
    queue: VecDeque<Vec<u8>>,
    /// Bytes in `queue`.
    queued: usize,
    /// Deficit round robin: bytes this leg may still send in the current round.
    deficit: usize,
    /// In [`Relay::active`].
    active: bool,
}

/// Where to send a forwarded datagram.
pub enum Transmit {
    /// A sealed relay datagram of `len` bytes, appended to the caller's buffer, to this
    /// UDP address.
    Udp { to: SocketAddr, len: usize },
    /// An AMP `relay` command (told, not asked), over this control connection.
    Tcp(PeerHandle, commands::Relay),
}

/// Limits on relaying.
#[derive(Debug, Clone, Copy)]
pub struct RelayLimits {
    /// Relayed sessions one user may take part in at once.
    pub sessions_per_user: usize,
    /// Bytes per second the relay forwards over all legs; None: as fast as the socket
    /// takes them. Shared fairly between the legs with data when spent.
    pub budget: Option<f64>,
    /// Bytes one leg may have waiting (beyond them its datagrams are dropped, counted in
    /// [`RelayStats::dropped`]; PTCP resends).
    pub queue_per_leg: usize,
    /// Bytes all legs together may have waiting.
    pub queue_total: usize,
    /// A session silent this long ends.
    pub idle: Duration,
    /// A session one of whose ends lost its control connection ends unless that end logs
    /// back in and takes its leg again within this long (its UDP keeps flowing meanwhile).
    /// Long enough for a re-login after a network change (backoff up to 30 s); short, so
    /// that an end that cannot log in again (revoked) does not keep a relay.
    pub orphan_grace: Duration,
}

impl Default for RelayLimits {
    fn default() -> Self {
        RelayLimits {
            sessions_per_user: 64,
            budget: None,
            queue_per_leg: 256 << 10,
            queue_total: 64 << 20,
            idle: Duration::from_secs(600),
            orphan_grace: Duration::from_secs(120),
        }
    }
}

/// Counters of the relay, written by its owner only, read by anyone.
#[derive(Debug, Default)]
pub struct RelayStats {
    /// Relayed sessions now.
    pub sessions: AtomicUsize,
    /// Inner bytes forwarded, both ways, over all sessions.
    pub relayed_bytes: AtomicU64,
    /// Datagrams refused: malformed, unknown token, bad tag, replayed, or a token used by
    /// a connection that does not own it.
    pub refused: AtomicU64,
    /// Verified datagrams dropped because their leg's queue (or all queues) was full, or
    /// the control connection to the other end could not take them.
    pub dropped: AtomicU64,
}

/// All relayed sessions: the sans-IO core, owned by one task.
pub struct Relay {
    /// By token. Hashed with foldhash, not SipHash (3% of the relay's CPU): the keys are
    /// tokens this server drew at random, never chosen by a sender, so nobody can fill
    /// the map with colliding keys.
    legs: HashMap<Token, Leg, foldhash::fast::RandomState>,
    limits: RelayLimits,
    /// Legs with queued datagrams, in round-robin order.
    active: VecDeque<Token>,
    /// Bytes queued over all legs.
    queued: usize,
    /// Overall budget (token bucket of [`BUDGET_BURST`] worth): bytes that may go now.
    allowance: f64,
    refilled: Option<Instant>,
    stats: Arc<RelayStats>,
    /// Spent inner buffers, for the next datagrams.
    pool: Vec<Vec<u8>>,
}

/// How much of the overall budget may go at once.
const BUDGET_BURST: Duration = Duration::from_millis(10);
/// Spent buffers kept for reuse.
const POOL: usize = 1024;
/// Only buffers this small are kept (a few odd large datagrams must not pin memory).
const POOLED_CAPACITY: usize = 4096;

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
            legs: HashMap::default(),
            limits,
            active: VecDeque::new(),
            queued: 0,
            allowance: 0.0,
            refilled: None,
            stats: Arc::default(),
            pool: Vec::new(),
        }
    }

    /// The counters, for readers in other tasks.
    pub fn stats(&self) -> Arc<RelayStats> {
        self.stats.clone()
    }

    /// Set up the relay of session `session` between `a` and `b`; their legs, or None if a
    /// user has too many sessions.
    pub fn create(&mut self, a: End, b: End, session: u64, now: Instant) -> Option<(Grant, Grant)> {
        self.expire(now);
        for user in [&a.user, &b.user] {
            if self.legs.values().filter(|l| &l.user == user).count()
                >= self.limits.sessions_per_user
            {
                return None;
            }
        }
        let ga = Grant { token: rand::random(), key: Key::random() };
        let gb = Grant { token: rand::random(), key: Key::random() };
        let leg = |e: End, key: &Key, partner| Leg {
            partner,
            session,
            key: key.clone(),
            user: e.user,
            conn: e.conn,
            orphaned: None,
            handle: e.handle,
            rx: Receiver::default(),
            sent: 0,
            last: now,
            queue: VecDeque::new(),
            queued: 0,
            deficit: 0,
            active: false,
        };
        self.legs.insert(ga.token, leg(a, &ga.key, gb.token));
        self.legs.insert(gb.token, leg(b, &gb.key, ga.token));
        self.count_sessions();
        Some((ga, gb))
    }

    /// The relay of session `session` between `a` and `b` for the ends that ask again
    /// (after logging back in, or after the server restarted and forgot it): the legs it
    /// has, now owned by `a`'s and `b`'s control connections (the same tokens and keys,
    /// so asking twice, or from both ends at once, gives both ends one pair), or else new
    /// ones ([`Relay::create`]). Only legs set up between these two users are found: an id
    /// alone gets nobody another pair's legs. The bool says whether the legs are new.
    /// Looks at every leg (O(legs)); asking is rate-limited per pair by the handler.
    pub fn renew(
        &mut self,
        a: End,
        b: End,
        session: u64,
        now: Instant,
    ) -> Option<(Grant, Grant, bool)> {
        self.expire(now);
        // Between two devices of one user both legs match: the one `a`'s connection owns.
        let mut found: Option<(Token, Token)> = None;
        for (t, l) in &self.legs {
            let partner_user = self.legs.get(&l.partner).map(|p| p.user.as_str());
            if l.session == session && l.user == a.user && partner_user == Some(b.user.as_str()) {
                found = Some((*t, l.partner));
                if l.conn == a.conn {
                    break;
                }
            }
        }
        let Some((ta, tb)) = found else {
            return self.create(a, b, session, now).map(|(ga, gb)| (ga, gb, true));
        };
        let mut grant = |t: Token, e: End| {
            let leg = self.legs.get_mut(&t)?;
            leg.conn = e.conn;
            leg.orphaned = None;
            leg.handle = e.handle;
            leg.last = now;
            Some(Grant { token: t, key: leg.key.clone() })
        };
        Some((grant(ta, a)?, grant(tb, b)?, false))
    }

    /// A relay datagram that came by UDP from `from`. Refused unless its tag verifies with
    /// the leg's key and its counter is new; the leg moves to `from` only if the counter is
    /// higher than any seen on it. A verified datagram with data is queued for the partner
    /// ([`Relay::poll_transmit`]), or dropped (and counted) when the queues are full.
    pub fn handle_udp(
        &mut self,
        datagram: &[u8],
        from: SocketAddr,
        now: Instant,
    ) -> Result<(), RelayError> {
        let r = self.handle_udp_inner(datagram, from, now);
        if r.is_err() {
            self.stats.refused.fetch_add(1, Ordering::Relaxed);
        }
        r
    }

    fn handle_udp_inner(
        &mut self,
        datagram: &[u8],
        from: SocketAddr,
        now: Instant,
    ) -> Result<(), RelayError> {
        let u = relay::parse(datagram)?;
        let leg = self.legs.get_mut(&u.token).ok_or(RelayError::UnknownToken)?;
        let mut inner = self.pool.pop().unwrap_or_default();
        inner.clear();
        if let Err(e) = leg.rx.accept(&u, &leg.key, Direction::ToServer, Some(from), &mut inner) {
            self.recycle(inner);
            return Err(e);
        }
        self.enqueue(&u.token, inner, now);
        Ok(())
    }

    /// A datagram relayed over control connection `conn`, queued like a UDP one. Refused
    /// unless `conn` owns the leg `token`.
    pub fn handle_tcp(
        &mut self,
        conn: u64,
        token: &Token,
        inner: Vec<u8>,
        now: Instant,
    ) -> Result<(), RelayError> {
        let r = match self.legs.get(token) {
            None => Err(RelayError::UnknownToken),
            Some(leg) if leg.conn != conn => Err(RelayError::NotOwner),
            Some(_) => {
                self.enqueue(token, inner, now);
                Ok(())
            }
        };
        if r.is_err() {
            self.stats.refused.fetch_add(1, Ordering::Relaxed);
        }
        r
    }

    /// Control connection `conn`, logged in as `user`, takes the leg `token` of an end whose
    /// control connection is at another instance ([`REMOTE_CONN`]): a caller without UDP
    /// relays over a connection of its own to this instance (AMP `relay` with no data, the
    /// bind over TCP). Only the leg's own user may take it, and only once: the token alone,
    /// which only that end was given (over TLS), is not enough. From then on the leg is
    /// that connection's, as if set up by it ([`Relay::handle_tcp`], and it ends with it).
    pub fn claim(
        &mut self,
        conn: u64,
        user: &str,
        handle: PeerHandle,
        token: &Token,
    ) -> Result<(), RelayError> {
        let r = match self.legs.get_mut(token) {
            None => Err(RelayError::UnknownToken),
            Some(leg) if leg.conn == conn => Ok(()),
            Some(leg) if leg.conn != REMOTE_CONN || leg.user != user => Err(RelayError::NotOwner),
            Some(leg) => {
                leg.conn = conn;
                leg.orphaned = None;
                leg.handle = Some(handle);
                Ok(())
            }
        };
        if r.is_err() {
            self.stats.refused.fetch_add(1, Ordering::Relaxed);
        }
        r
    }

    /// Queue `inner` from leg `token` (known to exist) for its partner.
    fn enqueue(&mut self, token: &Token, inner: Vec<u8>, now: Instant) {
        let Some(leg) = self.legs.get_mut(token) else { return self.recycle(inner) };
        leg.last = now;
        let len = inner.len();
        if len == 0 {
            return self.recycle(inner); // a bind
        }
        if leg.queued + len > self.limits.queue_per_leg
            || self.queued + len > self.limits.queue_total
        {
            // Over its share of memory: dropped, PTCP recovers.
            self.stats.dropped.fetch_add(1, Ordering::Relaxed);
            return self.recycle(inner);
        }
        leg.queue.push_back(inner);
        leg.queued += len;
        self.queued += len;
        if !leg.active {
            leg.active = true;
            leg.deficit = 0;
            self.active.push_back(*token);
        }
    }

    /// The next datagram to send, by deficit round robin over the legs with data, within
    /// the overall budget; None when nothing is queued or the budget is spent (see
    /// [`Relay::poll_timeout`]). For UDP the sealed datagram is appended to `out`.
    pub fn poll_transmit(&mut self, now: Instant, out: &mut Vec<u8>) -> Option<Transmit> {
        self.refill(now);
        loop {
            let token = *self.active.front()?;
            let Some(leg) = self.legs.get_mut(&token) else {
                self.active.pop_front();
                continue;
            };
            let Some(len) = leg.queue.front().map(Vec::len) else {
                leg.active = false;
                leg.deficit = 0;
                self.active.pop_front();
                continue;
            };
            if leg.deficit < len {
                // This leg's turn is over: the next leg's, with a new quantum for it later.
                leg.deficit += QUANTUM;
                self.active.rotate_left(1);
                continue;
            }
            if self.limits.budget.is_some() && self.allowance < len as f64 {
                return None;
            }
            leg.deficit -= len;
            leg.queued -= len;
            self.queued -= len;
            let inner = leg.queue.pop_front()?;
            if leg.queue.is_empty() {
                leg.active = false;
                leg.deficit = 0;
                self.active.pop_front();
            }
            if self.limits.budget.is_some() {
                self.allowance -= len as f64;
            }
            let partner = leg.partner;
            if let Some(t) = self.for_partner(&partner, inner, out) {
                return Some(t);
            }
        }
    }

    /// `inner` sealed or framed for leg `to`; None (dropped) when that end cannot be
    /// reached yet (a remote end that has not bound its leg by UDP: PTCP recovers).
    fn for_partner(&mut self, to: &Token, inner: Vec<u8>, out: &mut Vec<u8>) -> Option<Transmit> {
        let other = self.legs.get_mut(to)?;
        self.stats.relayed_bytes.fetch_add(inner.len() as u64, Ordering::Relaxed);
        let t = match (other.rx.at(), &other.handle) {
            (Some(addr), _) => {
                // Never a counter used before with this key (a spent one: dropped).
                let Some(counter) = other.sent.checked_add(1) else {
                    self.stats.dropped.fetch_add(1, Ordering::Relaxed);
                    return None;
                };
                other.sent = counter;
                relay::seal(out, &other.key, Direction::ToClient, to, counter, &inner);
                let len = relay::OVERHEAD + inner.len();
                self.recycle(inner);
                Transmit::Udp { to: addr, len }
            }
            (None, Some(handle)) => {
                Transmit::Tcp(handle.clone(), commands::Relay { token: *to, data: inner })
            }
            (None, None) => return None,
        };
        Some(t)
    }

    /// Keep a spent buffer for the next datagram, if it is small and the pool not full.
    fn recycle(&mut self, buf: Vec<u8>) {
        if self.pool.len() < POOL && buf.capacity() <= POOLED_CAPACITY {
            self.pool.push(buf);
        }
    }

    /// Bytes of datagrams queued over all legs, waiting for [`Relay::poll_transmit`].
    pub fn queued(&self) -> usize {
        self.queued
    }

    /// When [`Relay::poll_transmit`] can give more, if it is waiting for the budget.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let rate = self.limits.budget?;
        let refilled = self.refilled?;
        let next = self.active.iter().find_map(|t| self.legs.get(t)?.queue.front())?;
        let missing = (next.len() as f64 - self.allowance).max(0.0);
        Some(refilled + Duration::from_secs_f64(missing / rate.max(1.0)))
    }

    fn refill(&mut self, now: Instant) {
        let Some(rate) = self.limits.budget else { return };
        // At least the largest datagram, or one that large would never go.
        let cap = (rate * BUDGET_BURST.as_secs_f64()).max(65536.0);
        let elapsed = self.refilled.map_or(BUDGET_BURST, |t| now.saturating_duration_since(t));
        self.allowance = (self.allowance + elapsed.as_secs_f64() * rate).min(cap);
        self.refilled = Some(now);
    }

    /// Datagrams some end could not take: counted as dropped.
    pub fn count_dropped(&self, n: u64) {
        self.stats.dropped.fetch_add(n, Ordering::Relaxed);
    }

    /// The UDP address leg `token` is bound to, if any.
    pub fn bound(&self, token: &Token) -> Option<SocketAddr> {
        self.legs.get(token)?.rx.at()
    }

    /// A control connection closed: its legs stay, reached over UDP where they are bound,
    /// for the end to take again when it logs back in ([`Relay::claim`], [`Relay::renew`]),
    /// so a relayed session outlives a lost control connection (a NAT rebinding, a
    /// suspend). Not taken within [`RelayLimits::orphan_grace`], they go.
    pub fn drop_connection(&mut self, conn: u64, now: Instant) {
        for leg in self.legs.values_mut().filter(|l| l.conn == conn) {
            leg.conn = REMOTE_CONN;
            leg.orphaned = Some(now);
            leg.handle = None;
        }
    }

    /// A control connection was closed for good (its certificate was revoked): every
    /// session it took part in ends now.
    pub fn end_connection(&mut self, conn: u64) {
        let gone: Vec<Token> = self
            .legs
            .iter()
            .filter(|(_, l)| l.conn == conn)
            .flat_map(|(t, l)| [*t, l.partner])
            .collect();
        self.remove_legs(gone);
    }

    /// End the session `token` belongs to.
    pub fn remove(&mut self, token: &Token) {
        if let Some(leg) = self.legs.get(token) {
            let gone = vec![*token, leg.partner];
            self.remove_legs(gone);
        }
    }

    /// Relayed sessions now.
    pub fn sessions(&self) -> usize {
        self.legs.len() / 2
    }

    /// End the sessions silent for longer than [`RelayLimits::idle`], and those with a leg
    /// orphaned for longer than [`RelayLimits::orphan_grace`].
    pub fn expire(&mut self, now: Instant) {
        let (idle, grace) = (self.limits.idle, self.limits.orphan_grace);
        let stale: Vec<Token> = self
            .legs
            .iter()
            .filter(|(_, l)| {
                now.saturating_duration_since(l.last) > idle
                    || l.orphaned.is_some_and(|t| now.saturating_duration_since(t) > grace)
            })
            .flat_map(|(t, l)| [*t, l.partner])
            .collect();
        self.remove_legs(stale);
    }

    fn remove_legs(&mut self, tokens: Vec<Token>) {
        if tokens.is_empty() {
            return;
        }
        for t in tokens {
            if let Some(leg) = self.legs.remove(&t) {
                self.queued -= leg.queued;
            }
        }
        // Removed legs leave `active` lazily in poll_transmit.
        self.count_sessions();
    }

    fn count_sessions(&self) {
        self.stats.sessions.store(self.sessions(), Ordering::Relaxed);
    }
}

/// What connection handlers ask the relay's owner.
pub(crate) enum Request {
    Create { a: End, b: End, session: u64, reply: oneshot::Sender<Option<(Grant, Grant)>> },
    Renew { a: End, b: End, session: u64, reply: oneshot::Sender<Option<(Grant, Grant, bool)>> },
    Remove(Token),
    DropConnection { conn: u64, end: bool },
    Tcp { conn: u64, token: Token, data: Vec<u8> },
    Claim { conn: u64, user: String, handle: PeerHandle, token: Token },
}

/// How connection handlers reach the relay, owned by the UDP task: a bounded channel, so
/// a control connection relaying faster than the relay forwards waits (TCP backpressure).
#[derive(Clone)]
pub struct RelayHandle {
    requests: mpsc::Sender<Request>,
    stats: Arc<RelayStats>,
}

/// Requests waiting for the relay's owner.
pub const REQUESTS: usize = 1024;

impl RelayHandle {
    /// A handle, and the receiving end for the owner of `stats`' relay.
    pub(crate) fn new(stats: Arc<RelayStats>) -> (RelayHandle, mpsc::Receiver<Request>) {
        let (requests, rx) = mpsc::channel(REQUESTS);
        (RelayHandle { requests, stats }, rx)
    }

    /// [`Relay::create`] (None too when the relay has stopped).
    pub async fn create(&self, a: End, b: End, session: u64) -> Option<(Grant, Grant)> {
        let ask = |reply| Request::Create { a, b, session, reply };
        super::ask_owner(&self.requests, ask).await.flatten()
    }

    /// [`Relay::renew`] (None too when the relay has stopped).
    pub async fn renew(&self, a: End, b: End, session: u64) -> Option<(Grant, Grant, bool)> {
        let ask = |reply| Request::Renew { a, b, session, reply };
        super::ask_owner(&self.requests, ask).await.flatten()
    }

    /// [`Relay::remove`].
    pub async fn remove(&self, token: Token) {
        let _ = self.requests.send(Request::Remove(token)).await;
    }

    /// [`Relay::drop_connection`], or with `end` (revoked) [`Relay::end_connection`].
    pub async fn drop_connection(&self, conn: u64, end: bool) {
        let _ = self.requests.send(Request::DropConnection { conn, end }).await;
    }

    /// [`Relay::handle_tcp`]: a datagram relayed over control connection `conn`.
    pub async fn forward_tcp(&self, conn: u64, token: Token, data: Vec<u8>) {
        let _ = self.requests.send(Request::Tcp { conn, token, data }).await;
    }

    /// [`Relay::claim`]: control connection `conn` of `user` takes leg `token`.
    pub async fn claim(&self, conn: u64, user: String, handle: PeerHandle, token: Token) {
        let _ = self.requests.send(Request::Claim { conn, user, handle, token }).await;
    }

    /// The counters.
    pub fn stats(&self) -> &RelayStats {
        &self.stats
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::relay::Leg as ClientLeg;

    /// A handle to nowhere (the other half of the pipe is dropped). Within a tokio
    /// runtime (the handle's tasks).
    fn handle() -> PeerHandle {
        crate::amp::peer::spawn(tokio::io::duplex(64).0).0
    }

    /// One session between conn `ca` (`a`) and conn `cb` (`b`), and both clients' legs.
    fn open_session(
        relay: &mut Relay,
        (a, ca): (&str, u64),
        (b, cb): (&str, u64),
        now: Instant,
    ) -> (ClientLeg, ClientLeg, Grant, Grant) {
        let end = |user: &str, conn| End { user: user.into(), conn, handle: Some(handle()) };
        let (ga, gb) = relay.create(end(a, ca), end(b, cb), rand::random(), now).unwrap();
        let la = ClientLeg::new(ga.token, ga.key.clone());
        let lb = ClientLeg::new(gb.token, gb.key.clone());
        (la, lb, ga, gb)
    }

    /// A relay with one session between conn 1 (alice) and conn 2 (bob), and both clients'
    /// legs.
    fn session() -> (Relay, ClientLeg, ClientLeg, Grant, Grant) {
        let mut relay = Relay::new(RelayLimits::default());
        let (a, b, ga, gb) = open_session(&mut relay, ("alice", 1), ("bob", 2), Instant::now());
        (relay, a, b, ga, gb)
    }

    fn sealed(leg: &ClientLeg, inner: &[u8]) -> Vec<u8> {
        let mut d = Vec::new();
        leg.seal_into(&mut d, inner);
        d
    }

    /// Handle `d` from `from`, then what goes out: the UDP datagram (address and bytes) or
    /// the TCP frame.
    fn forward(
        relay: &mut Relay,
        d: &[u8],
        from: &str,
        now: Instant,
    ) -> Result<Option<(Transmit, Vec<u8>)>, RelayError> {
        relay.handle_udp(d, from.parse().unwrap(), now)?;
        Ok(next(relay, now))
    }

    fn next(relay: &mut Relay, now: Instant) -> Option<(Transmit, Vec<u8>)> {
        let mut out = Vec::new();
        relay.poll_transmit(now, &mut out).map(|t| (t, out))
    }

    const A: &str = "192.0.2.1:1000";
    const B: &str = "192.0.2.2:2000";
    const EVIL: &str = "203.0.113.66:6666";

    #[tokio::test]
    async fn verified_datagrams_are_forwarded_sealed_for_the_other_end() {
        let (mut relay, a, b, _, _) = session();
        let now = Instant::now();
        assert!(forward(&mut relay, &a.bind(), A, now).unwrap().is_none());
        let f = forward(&mut relay, &sealed(&b, b"hi alice"), B, now).unwrap();
        let Some((Transmit::Udp { to, len }, d)) = f else { panic!("not forwarded over UDP") };
        assert_eq!((to, len), (A.parse().unwrap(), d.len()));
        assert_eq!(a.open(&d), Ok(b"hi alice".to_vec()));
        // Bob cannot read it as his, nor can it be sent back to the relay as alice's: with
        // counter 1 (her bind's) a replay, with a counter new to her leg a bad tag (the
        // direction is part of the nonce).
        assert!(b.open(&d).is_err());
        assert_eq!(forward(&mut relay, &d, EVIL, now).err(), Some(RelayError::Replayed));
        let (_, d2) = forward(&mut relay, &sealed(&b, b"again"), B, now).unwrap().unwrap();
        assert_eq!(relay::parse(&d2).map(|u| u.counter), Ok(2));
        assert_eq!(forward(&mut relay, &d2, EVIL, now).err(), Some(RelayError::BadTag));
        assert_eq!(a.open(&d2), Ok(b"again".to_vec()));
        // And the way back.
        let Some((Transmit::Udp { to, .. }, d)) =
            forward(&mut relay, &sealed(&a, b"hi bob"), A, now).unwrap()
        else {
            panic!("not forwarded over UDP")
        };
        assert_eq!((to, b.open(&d)), (B.parse().unwrap(), Ok(b"hi bob".to_vec())));
        assert_eq!(relay.stats.relayed_bytes.load(Ordering::Relaxed), 19);
    }

    #[tokio::test]
    async fn forged_tags_and_unknown_tokens_are_dropped() {
        let (mut relay, a, b, ga, _) = session();
        let now = Instant::now();
        forward(&mut relay, &a.bind(), A, now).unwrap();
        // Knowing the token (it travels in clear) is not enough without the key; a
        // counter seen already is refused before the tag is looked at.
        let r = forward(&mut relay, &forged(&ga.token, 2, b"x"), EVIL, now);
        assert_eq!(r.err(), Some(RelayError::BadTag));
        let r = forward(&mut relay, &forged(&ga.token, 1, b"x"), EVIL, now);
        assert_eq!(r.err(), Some(RelayError::Replayed));
        assert_eq!(relay.bound(&ga.token), Some(A.parse().unwrap()));
        // A bit flipped on the way.
        let mut d = sealed(&b, b"hello");
        d[relay::OVERHEAD] ^= 1;
        assert_eq!(forward(&mut relay, &d, B, now).err(), Some(RelayError::BadTag));
        let stranger = ClientLeg::new([0; 16], Key::random());
        let r = forward(&mut relay, &sealed(&stranger, b"x"), EVIL, now);
        assert_eq!(r.err(), Some(RelayError::UnknownToken));
        assert_eq!(
            forward(&mut relay, b"\x01\x30short", EVIL, now).err(),
            Some(RelayError::Malformed)
        );
        assert_eq!(relay.stats.refused.load(Ordering::Relaxed), 5);
        assert!(next(&mut relay, now).is_none(), "nothing refused was queued");
    }

    #[tokio::test]
    async fn a_replayed_datagram_does_not_move_the_leg() {
        let (mut relay, a, b, ga, _) = session();
        let now = Instant::now();
        forward(&mut relay, &b.bind(), B, now).unwrap();
        let captured = sealed(&a, b"data");
        assert!(forward(&mut relay, &captured, A, now).unwrap().is_some());
        assert_eq!(relay.bound(&ga.token), Some(A.parse().unwrap()));
        // Replayed from elsewhere: refused, and the leg stays.
        let r = forward(&mut relay, &captured, EVIL, now);
        assert_eq!(r.err(), Some(RelayError::Replayed));
        assert_eq!(relay.bound(&ga.token), Some(A.parse().unwrap()));
        // A late (reordered) datagram is forwarded but moves nothing either.
        let older = sealed(&a, b"older");
        let newer = sealed(&a, b"newer");
        assert!(forward(&mut relay, &newer, A, now).unwrap().is_some());
        assert!(forward(&mut relay, &older, EVIL, now).unwrap().is_some());
        assert_eq!(relay.bound(&ga.token), Some(A.parse().unwrap()));
        // The genuine end moving (NAT rebinding): its next datagram moves the leg.
        let moved: SocketAddr = "192.0.2.1:1001".parse().unwrap();
        relay.handle_udp(&a.bind(), moved, now).unwrap();
        assert_eq!(relay.bound(&ga.token), Some(moved));
    }

    #[tokio::test]
    async fn only_the_owning_connection_relays_over_tcp() {
        let (mut relay, _, _, ga, gb) = session();
        let now = Instant::now();
        // Conn 2 (bob) knows alice's token but does not own it; nor does a stranger.
        assert_eq!(
            relay.handle_tcp(2, &ga.token, b"x".to_vec(), now).err(),
            Some(RelayError::NotOwner)
        );
        assert_eq!(
            relay.handle_tcp(3, &ga.token, b"x".to_vec(), now).err(),
            Some(RelayError::NotOwner)
        );
        assert_eq!(
            relay.handle_tcp(1, &[0; 16], b"x".to_vec(), now).err(),
            Some(RelayError::UnknownToken)
        );
        assert!(next(&mut relay, now).is_none(), "nothing refused was queued");
        // Alice over her own connection: to bob, over his (no UDP bound).
        relay.handle_tcp(1, &ga.token, b"over tcp".to_vec(), now).unwrap();
        let Some((Transmit::Tcp(_, r), _)) = next(&mut relay, now) else {
            panic!("not forwarded over TCP")
        };
        assert_eq!(r, commands::Relay { token: gb.token, data: b"over tcp".to_vec() });
        relay.handle_tcp(1, &ga.token, b"".to_vec(), now).unwrap();
        assert!(next(&mut relay, now).is_none(), "a bind is not forwarded");
    }

    #[tokio::test]
    async fn sessions_per_user_and_idle_expiry() {
        let limits = RelayLimits { sessions_per_user: 2, ..RelayLimits::default() };
        let mut relay = Relay::new(limits);
        let t0 = Instant::now();
        open_session(&mut relay, ("alice", 1), ("bob", 2), t0);
        open_session(&mut relay, ("alice", 1), ("carol", 3), t0);
        let end = |user: &str, conn| End { user: user.into(), conn, handle: None };
        assert!(relay.create(end("alice", 1), end("dave", 4), 9, t0).is_none(), "alice's third");
        assert!(relay.create(end("erin", 5), end("dave", 4), 9, t0).is_some());
        assert_eq!(relay.stats.sessions.load(Ordering::Relaxed), 3);
        // A closed connection's legs stay (for its end to take again), until idle.
        relay.drop_connection(3, t0);
        assert_eq!(relay.sessions(), 3);
        relay.expire(t0 + limits.idle + Duration::from_secs(1));
        assert_eq!(relay.sessions(), 0);
        assert_eq!(relay.stats.sessions.load(Ordering::Relaxed), 0);
    }

    /// Two sessions through a relay with an overall budget of 1 MB/s: leg F floods, leg Q
    /// sends at a tenth of that. Over each 100 ms, F alone would get the whole budget; with
    /// Q sending, Q gets all it sent (under its fair half) and F the rest; F's overflow is
    /// dropped from F's own queue. When both flood, each gets half.
    #[tokio::test]
    async fn a_flooding_leg_does_not_take_the_other_legs_share() {
        const SIZE: usize = 1000;
        let limits =
            RelayLimits { budget: Some(1e6), queue_per_leg: 50 * SIZE, ..RelayLimits::default() };
        let mut relay = Relay::new(limits);
        let t0 = Instant::now();
        let (f, f_peer, _, _) = open_session(&mut relay, ("flood", 1), ("x", 2), t0);
        let (q, q_peer, _, _) = open_session(&mut relay, ("quiet", 3), ("y", 4), t0);
        let (fa, qa): (SocketAddr, SocketAddr) =
            ("192.0.2.1:1".parse().unwrap(), "192.0.2.3:3".parse().unwrap());
        let (fpa, qpa): (SocketAddr, SocketAddr) =
            ("192.0.2.2:2".parse().unwrap(), "192.0.2.4:4".parse().unwrap());
        for (leg, addr) in [(&f_peer, fpa), (&q_peer, qpa)] {
            relay.handle_udp(&leg.bind(), addr, t0).unwrap();
        }
        // Per 10 ms step: F offers 100 datagrams (10× the budget), Q 1 (a tenth); then
        // the relay sends what the budget allows.
        let mut got = HashMap::<SocketAddr, usize>::new();
        let mut run = |relay: &mut Relay, start: Instant, steps: u32, q_per_step: usize| {
            got.clear();
            for step in 1..=steps {
                let now = start + Duration::from_millis(10) * step;
                for i in 0..100 {
                    relay.handle_udp(&sealed(&f, &[1; SIZE]), fa, now).unwrap();
                    if i < q_per_step {
                        relay.handle_udp(&sealed(&q, &[2; SIZE]), qa, now).unwrap();
                    }
                }
                let mut out = Vec::new();
                while let Some(t) = relay.poll_transmit(now, &mut out) {
                    let Transmit::Udp { to, .. } = t else { panic!("not over UDP") };
                    *got.entry(to).or_default() += 1;
                }
                assert!(relay.poll_timeout().is_some_and(|t| t > now), "waits for the budget");
            }
            got.clone()
        };
        // Warm up (the first burst), then 100 ms = 100 kB of budget = 100 datagrams.
        run(&mut relay, t0, 1, 0);
        let flood_alone = run(&mut relay, t0 + Duration::from_millis(10), 10, 0);
        assert_eq!(flood_alone.get(&qpa), None);
        let alone = flood_alone[&fpa];
        assert!((95..=105).contains(&alone), "a leg alone gets the whole budget: {alone}");
        let mixed = run(&mut relay, t0 + Duration::from_millis(110), 10, 1);
        assert_eq!(mixed[&qpa], 10, "the quiet leg gets all it sent: {mixed:?}");
        assert!((85..=95).contains(&mixed[&fpa]), "the flood gets the rest: {mixed:?}");
        let both = run(&mut relay, t0 + Duration::from_millis(210), 10, 100);
        let (bf, bq) = (both[&fpa] as i64, both[&qpa] as i64);
        assert!((bf - bq).abs() <= 2 && bf + bq >= 95, "two floods share equally: {both:?}");
        assert!(relay.stats.dropped.load(Ordering::Relaxed) > 0, "the overflow is counted");
        // Memory stays bounded: no leg holds more than its queue.
        assert!(relay.queued <= 2 * limits.queue_per_leg);
    }

    #[tokio::test]
    async fn without_a_budget_everything_queued_goes_at_once() {
        let (mut relay, a, b, _, _) = session();
        let now = Instant::now();
        relay.handle_udp(&b.bind(), B.parse().unwrap(), now).unwrap();
        for _ in 0..200 {
            relay.handle_udp(&sealed(&a, &[0; 1200]), A.parse().unwrap(), now).unwrap();
        }
        let mut out = Vec::new();
        let mut n = 0;
        while relay.poll_transmit(now, &mut out).is_some() {
            n += 1;
        }
        assert_eq!(n, 200);
        assert_eq!(out.len(), 200 * (1200 + relay::OVERHEAD));
        assert_eq!(relay.poll_timeout(), None);
    }

    #[tokio::test]
    async fn only_its_own_user_takes_a_leg_set_up_at_another_instance() {
        let mut relay = Relay::new(RelayLimits::default());
        // Alice's control connection is at another instance; bob's is conn 2 here.
        let alice = End { user: "alice@a.test".into(), conn: REMOTE_CONN, handle: None };
        let bob = End { user: "bob@a.test".into(), conn: 2, handle: Some(handle()) };
        let now = Instant::now();
        let (ga, gb) = relay.create(alice, bob, 1, now).unwrap();
        // Not over TCP before it is taken: no connection owns it.
        assert_eq!(
            relay.handle_tcp(3, &ga.token, b"x".to_vec(), now).err(),
            Some(RelayError::NotOwner)
        );
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
        assert_eq!(relay.stats.refused.load(Ordering::Relaxed), 5);
        // Both ways over TCP now.
        relay.handle_tcp(3, &ga.token, b"to bob".to_vec(), now).unwrap();
        let Some((Transmit::Tcp(_, r), _)) = next(&mut relay, now) else {
            panic!("not forwarded over TCP")
        };
        assert_eq!(r, commands::Relay { token: gb.token, data: b"to bob".to_vec() });
        relay.handle_tcp(2, &gb.token, b"to alice".to_vec(), now).unwrap();
        let Some((Transmit::Tcp(_, r), _)) = next(&mut relay, now) else {
            panic!("not forwarded to alice over TCP")
        };
        assert_eq!(r, commands::Relay { token: ga.token, data: b"to alice".to_vec() });
        // When the connection that took it closes, the leg is free for her next one.
        relay.drop_connection(3, now);
        assert_eq!(
            relay.handle_tcp(3, &ga.token, b"x".to_vec(), now).err(),
            Some(RelayError::NotOwner)
        );
        relay.claim(6, "alice@a.test", handle(), &ga.token).unwrap();
        relay.handle_tcp(6, &ga.token, b"again".to_vec(), now).unwrap();
        assert!(next(&mut relay, now).is_some(), "forwarded from her new connection");
        assert_eq!(relay.sessions(), 1);
    }

    /// A control connection closes (a NAT rebinding, a suspend): the session's UDP legs
    /// still forward both ways, and its end's next connection takes its leg again
    /// (`renew`: the same token and key, so both ends keep one pair).
    #[tokio::test]
    async fn a_closed_control_connection_leaves_the_udp_relay_working() {
        let (mut relay, a, b, ga, gb) = session();
        let now = Instant::now();
        relay.handle_udp(&b.bind(), B.parse().unwrap(), now).unwrap();
        relay.drop_connection(1, now);
        let (_, d) = forward(&mut relay, &sealed(&a, b"still"), A, now).unwrap().unwrap();
        assert_eq!(b.open(&d), Ok(b"still".to_vec()));
        let (_, d) = forward(&mut relay, &sealed(&b, b"here"), B, now).unwrap().unwrap();
        assert_eq!(a.open(&d), Ok(b"here".to_vec()));
        // Over TCP only its new connection may use it, once it took the leg again.
        assert_eq!(
            relay.handle_tcp(1, &ga.token, b"x".to_vec(), now).err(),
            Some(RelayError::NotOwner)
        );
        let end = |user: &str, conn| End { user: user.into(), conn, handle: Some(handle()) };
        let session = relay.legs[&ga.token].session;
        let (ra, rb, new) = relay.renew(end("alice", 7), end("bob", 2), session, now).unwrap();
        assert!(!new);
        assert_eq!((ra.token, rb.token), (ga.token, gb.token));
        assert_eq!((ra.key, rb.key), (ga.key, gb.key));
        relay.handle_tcp(7, &ga.token, b"y".to_vec(), now).unwrap();
        // From bob's side, as he would ask: the same pair, the other way round.
        let (rb2, ra2, new) = relay.renew(end("bob", 2), end("alice", 7), session, now).unwrap();
        assert!(!new);
        assert_eq!((ra2.token, rb2.token), (ga.token, gb.token));
        assert_eq!(relay.sessions(), 1);
        // Taken again, it stays past the grace; orphaned and not taken, it goes.
        let grace = relay.limits.orphan_grace;
        relay.expire(now + grace + Duration::from_secs(1));
        assert_eq!(relay.sessions(), 1);
        relay.drop_connection(7, now);
        relay.expire(now + grace);
        assert_eq!(relay.sessions(), 1, "within the grace");
        relay.expire(now + grace + Duration::from_secs(1));
        assert_eq!(relay.sessions(), 0, "orphaned past the grace");
    }

    /// A connection closed because its certificate was revoked ends its sessions at once.
    #[tokio::test]
    async fn a_revoked_connection_ends_its_sessions_at_once() {
        let (mut relay, a, _, _, _) = session();
        let now = Instant::now();
        relay.end_connection(1);
        assert_eq!(relay.sessions(), 0);
        let r = forward(&mut relay, &sealed(&a, b"x"), A, now);
        assert_eq!(r.err(), Some(RelayError::UnknownToken));
    }

    /// After a restart the relay knows no session: `renew` sets one up, once; another
    /// pair naming the same session id gets its own legs, never these.
    #[tokio::test]
    async fn renew_sets_up_a_forgotten_session_once_and_only_for_its_pair() {
        let mut relay = Relay::new(RelayLimits::default());
        let now = Instant::now();
        let end = |user: &str, conn| End { user: user.into(), conn, handle: Some(handle()) };
        let (ga, gb, new) = relay.renew(end("alice", 1), end("bob", 2), 42, now).unwrap();
        assert!(new);
        let (gb2, ga2, new) = relay.renew(end("bob", 2), end("alice", 1), 42, now).unwrap();
        assert!(!new);
        assert_eq!((ga2.token, gb2.token), (ga.token, gb.token));
        let (ge, gb3, new) = relay.renew(end("eve", 3), end("bob", 2), 42, now).unwrap();
        assert!(new, "eve's id is not alice's session");
        assert!(ge.token != ga.token && gb3.token != gb.token);
        assert_eq!(relay.sessions(), 2);
        // The per-user limit holds for renewals as for new sessions.
        let limits = RelayLimits { sessions_per_user: 1, ..RelayLimits::default() };
        let mut relay = Relay::new(limits);
        relay.renew(end("alice", 1), end("bob", 2), 1, now).unwrap();
        assert!(relay.renew(end("alice", 1), end("carol", 3), 2, now).is_none());
        assert!(relay.renew(end("alice", 1), end("bob", 2), 1, now).is_some(), "its own again");
    }

    /// A datagram on leg `token` with counter `counter` sealed with a key that is not the
    /// leg's (what a stranger who saw the token can make).
    fn forged(token: &Token, counter: u64, inner: &[u8]) -> Vec<u8> {
        let mut d = Vec::new();
        relay::seal(&mut d, &Key::random(), Direction::ToServer, token, counter, inner);
        d
    }

    /// Every tag is checked, also of datagrams from a leg's bound address right behind a
    /// verified one (where one in 256 was once taken unchecked): a forgery from there is
    /// refused, forwards nothing, spends no counter and moves nothing.
    #[tokio::test]
    async fn every_tag_is_checked_even_from_the_bound_address() {
        let (mut relay, a, b, ga, _) = session();
        let now = Instant::now();
        let (a_at, b_at): (SocketAddr, SocketAddr) = (A.parse().unwrap(), B.parse().unwrap());
        relay.handle_udp(&b.bind(), b_at, now).unwrap();
        relay.handle_udp(&a.bind(), a_at, now).unwrap(); // counter 1
        for c in 2..300 {
            let r = forward(&mut relay, &forged(&ga.token, c, b"junk"), A, now);
            assert_eq!(r.err(), Some(RelayError::BadTag), "counter {c}");
        }
        assert_eq!(relay.stats.refused.load(Ordering::Relaxed), 298);
        assert!(next(&mut relay, now).is_none(), "nothing forged was queued");
        assert_eq!(relay.bound(&ga.token), Some(a_at));
        // The genuine end's counter 2 was not spent by the forgeries.
        let (_, d) = forward(&mut relay, &sealed(&a, b"data"), A, now).unwrap().unwrap();
        assert_eq!(b.open(&d), Ok(b"data".to_vec()));
    }
}
