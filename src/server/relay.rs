//! The relay: forwards the encapsulated datagrams of sessions the server set up, between
//! the two ends, over UDP or framed over the TLS control connection when a side's UDP is
//! blocked. It sees only what PTCP carries, which is TLS ciphertext.
//!
//! Each end of a relayed session holds its own random 128-bit token. A datagram
//!
//! ```text
//! version kind=0x30 | token (16) | inner datagram (a PTCP Data/Ack, or empty = bind)
//! ```
//!
//! arriving from address X binds that end to X (only the end holding the token could send
//! it) and is forwarded to the other end under the other end's token.

use crate::amp::{AmpBox, PeerHandle};
use q2q_netstack::wire::{Kind, Prefix};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub const TOKEN_LEN: usize = 16;
/// The AMP command carrying a relayed datagram over a control connection (no answer).
pub const RELAY_COMMAND: &str = "relay";

pub type Token = [u8; TOKEN_LEN];

/// A relay datagram: `token` and `inner`.
pub fn encode(token: &Token, inner: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(Prefix::LEN + TOKEN_LEN + inner.len());
    out.extend_from_slice(&[q2q_netstack::wire::VERSION, Kind::Relay as u8]);
    out.extend_from_slice(token);
    out.extend_from_slice(inner);
    out
}

/// The token and inner datagram of a relay datagram (kind already checked).
pub fn decode(d: &[u8]) -> Option<(Token, &[u8])> {
    let token: Token = d.get(Prefix::LEN..Prefix::LEN + TOKEN_LEN)?.try_into().ok()?;
    Some((token, &d[Prefix::LEN + TOKEN_LEN..]))
}

/// One end of a relayed session.
struct Leg {
    partner: Token,
    /// The user this end belongs to (for limits and accounting).
    user: String,
    /// The control connection it came from; the leg ends with it.
    conn: u64,
    handle: PeerHandle,
    udp: Option<SocketAddr>,
    last: Instant,
    /// Token bucket, in bytes.
    allowance: f64,
    bytes: u64,
}

/// Where to send a forwarded datagram.
pub enum Forward {
    Udp(SocketAddr, Vec<u8>),
    Tcp(PeerHandle, AmpBox),
}

/// Limits on relaying.
#[derive(Debug, Clone, Copy)]
pub struct RelayLimits {
    pub sessions_per_user: usize,
    pub bytes_per_sec: f64,
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
    pub relayed_bytes: std::sync::atomic::AtomicU64,
}

/// An end of a session to set up.
pub struct End {
    pub user: String,
    pub conn: u64,
    pub handle: PeerHandle,
}

impl Relay {
    pub fn new(limits: RelayLimits) -> Relay {
        Relay { legs: Mutex::default(), limits, relayed_bytes: Default::default() }
    }

    /// Set up a relayed session between `a` and `b`; their tokens, or None if a user has
    /// too many sessions.
    pub fn create(&self, a: End, b: End, now: Instant) -> Option<(Token, Token)> {
        let mut legs = self.legs.lock().ok()?;
        self.expire(&mut legs, now);
        for user in [&a.user, &b.user] {
            if legs.values().filter(|l| &l.user == user).count() >= self.limits.sessions_per_user {
                return None;
            }
        }
        let (ta, tb): (Token, Token) = (rand::random(), rand::random());
        let leg = |e: End, partner| Leg {
            partner,
            user: e.user,
            conn: e.conn,
            handle: e.handle,
            udp: None,
            last: now,
            allowance: self.limits.bytes_per_sec,
            bytes: 0,
        };
        legs.insert(ta, leg(a, tb));
        legs.insert(tb, leg(b, ta));
        Some((ta, tb))
    }

    /// A datagram from one end (by UDP from `from`, or over its control connection when
    /// `from` is None): where to forward it, if anywhere.
    pub fn forward(
        &self,
        token: &Token,
        inner: &[u8],
        from: Option<SocketAddr>,
        now: Instant,
    ) -> Option<Forward> {
        let mut legs = self.legs.lock().ok()?;
        let leg = legs.get_mut(token)?;
        if from.is_some() {
            leg.udp = from;
        }
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
        let other = legs.get(&partner)?;
        self.relayed_bytes.fetch_add(inner.len() as u64, std::sync::atomic::Ordering::Relaxed);
        Some(match other.udp {
            Some(addr) => Forward::Udp(addr, encode(&partner, inner)),
            None => Forward::Tcp(
                other.handle.clone(),
                AmpBox::command(RELAY_COMMAND)
                    .with("token", hex::encode(partner))
                    .with("data", inner),
            ),
        })
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
