//! Which control connections the server takes: at most so many per source address (per
//! /64 for IPv6, which any host has plenty of addresses in), and connections not logged in
//! yet only up to a share of the connection budget: when that share is full, a new
//! connection closes the oldest one not logged in. Strangers holding connections open
//! (idle TLS, or not even that) so leave room for clients that log in, whose connections
//! log in within a few round trips. The budget itself is bounded by the open-file limit,
//! which the server raises to its hard limit at start ([`raise_fd_limit`]).
//!
//! ```text
//!  accept ── admit(ip) ──▶ Ticket (counted per address; waiting, oldest evicted first)
//!                             │ logged_in(): no longer waiting
//!                             ▼ drop: uncounted
//! ```
//!
//! The accept loop owns the counts ([`Admission`]); a ticket, on its connection's task,
//! only tells it what happened (logged in, closed) over a channel, which the owner reads
//! before it next decides. So the counts have one writer.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::Arc;
use tokio::sync::{Notify, mpsc};

/// File descriptors kept for everything but control connections: the listening sockets,
/// the database, federation fetches, logs.
pub const RESERVED_FDS: u64 = 64;

/// Why a new connection is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// Its source address has the most connections allowed already.
    #[error("too many connections from this address")]
    PerAddress,
}

/// The limits: connections per source address, and connections not logged in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub per_address: usize,
    pub unauthenticated: usize,
}

impl Limits {
    /// Connections served at once (`max_connections`, within the open-file limit `nofile`
    /// less [`RESERVED_FDS`]), and the limits that follow from the config.
    pub fn new(
        max_connections: usize,
        per_address: usize,
        unauthenticated_percent: u8,
        nofile: Option<u64>,
    ) -> (usize, Limits) {
        let fds = nofile.map_or(usize::MAX, |n| {
            usize::try_from(n.saturating_sub(RESERVED_FDS)).unwrap_or(usize::MAX)
        });
        let budget = max_connections.min(fds).max(1);
        let unauthenticated = (budget * usize::from(unauthenticated_percent.min(100)) / 100).max(1);
        (budget, Limits { per_address: per_address.max(1), unauthenticated })
    }
}

#[derive(Debug, Default)]
struct Counts {
    per_address: HashMap<IpAddr, usize>,
    /// Connections not logged in, oldest first, with what tells each to close.
    waiting: BTreeMap<u64, Arc<Notify>>,
    next: u64,
}

/// What a ticket tells the owner of the counts.
#[derive(Debug)]
enum Event {
    LoggedIn(u64),
    Closed { seq: u64, key: IpAddr },
}

/// The connection counts of a server, owned by its accept loop.
#[derive(Debug)]
pub struct Admission {
    limits: Limits,
    counts: Counts,
    events: mpsc::UnboundedReceiver<Event>,
    tell: mpsc::UnboundedSender<Event>,
}

impl Counts {
    fn apply(&mut self, event: Event) {
        match event {
            Event::LoggedIn(seq) => {
                self.waiting.remove(&seq);
            }
            Event::Closed { seq, key } => {
                self.waiting.remove(&seq);
                if let Some(n) = self.per_address.get_mut(&key) {
                    *n -= 1;
                    if *n == 0 {
                        self.per_address.remove(&key);
                    }
                }
            }
        }
    }
}

impl Admission {
    pub fn new(limits: Limits) -> Admission {
        let (tell, events) = mpsc::unbounded_channel();
        Admission { limits, counts: Counts::default(), events, tell }
    }

    /// Take in what tickets told since the last decision (at most two events per
    /// connection admitted).
    fn catch_up(&mut self) {
        while let Ok(e) = self.events.try_recv() {
            self.counts.apply(e);
        }
    }

    /// Count a new connection from `ip`, not logged in, or refuse it. When the share of
    /// connections not logged in is full, the oldest of them is told to close
    /// ([`Ticket::evicted`]).
    pub fn admit(&mut self, ip: IpAddr) -> Result<Ticket, Refused> {
        self.catch_up();
        let key = source_key(ip);
        let c = &mut self.counts;
        let from_ip = c.per_address.get(&key).copied().unwrap_or(0);
        if from_ip >= self.limits.per_address {
            return Err(Refused::PerAddress);
        }
        while c.waiting.len() >= self.limits.unauthenticated {
            let Some((_, oldest)) = c.waiting.pop_first() else { break };
            oldest.notify_one();
        }
        c.per_address.insert(key, from_ip + 1);
        let seq = c.next;
        c.next += 1;
        let evict = Arc::new(Notify::new());
        c.waiting.insert(seq, evict.clone());
        Ok(Ticket { tell: self.tell.clone(), key, seq, evict, logged_in: false })
    }

    /// Connections from `ip` (its /64 for IPv6) and connections not logged in, now.
    pub fn counts(&mut self, ip: IpAddr) -> (usize, usize) {
        self.catch_up();
        let c = &self.counts;
        (c.per_address.get(&source_key(ip)).copied().unwrap_or(0), c.waiting.len())
    }
}

/// What per-address limits count (connections, registrations, federation fetches): the
/// IPv4 address, or the /64 of an IPv6 address.
pub fn source_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => IpAddr::V6((u128::from(v6) & !((1u128 << 64) - 1)).into()),
        v4 => v4,
    }
}

/// One admitted connection; dropping it uncounts it.
#[derive(Debug)]
pub struct Ticket {
    tell: mpsc::UnboundedSender<Event>,
    key: IpAddr,
    seq: u64,
    evict: Arc<Notify>,
    logged_in: bool,
}

impl Ticket {
    /// The connection logged in: it no longer takes from the share of those that did not,
    /// and is never evicted.
    pub fn logged_in(&mut self) {
        if !self.logged_in {
            self.logged_in = true;
            let _ = self.tell.send(Event::LoggedIn(self.seq));
        }
    }

    pub fn is_logged_in(&self) -> bool {
        self.logged_in
    }

    /// Completes when newer connections evicted this one (not logged in, the oldest while
    /// the share was full): it must close.
    pub fn evicted(&self) -> Arc<Notify> {
        self.evict.clone()
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let _ = self.tell.send(Event::Closed { seq: self.seq, key: self.key });
    }
}

/// Raise the soft limit of open files to the hard limit; returns the limits now in force
/// (soft, hard), or `None` if they cannot be read.
pub fn raise_fd_limit() -> Option<(u64, u64)> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).ok()?;
    if soft < hard {
        if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            tracing::warn!(soft, hard, error = %e, "cannot raise the open-file limit");
            return Some((soft, hard));
        }
        return Some((hard, hard));
    }
    Some((soft, hard))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn budget_follows_the_fd_limit() {
        assert_eq!(Limits::new(4096, 32, 50, Some(1024)).0, 960);
        assert_eq!(Limits::new(4096, 32, 50, Some(1024)).1.unauthenticated, 480);
        assert_eq!(Limits::new(100, 32, 50, Some(1 << 20)).0, 100);
        assert_eq!(
            Limits::new(100, 32, 50, None).1,
            Limits { per_address: 32, unauthenticated: 50 }
        );
        // Never nothing at all.
        assert_eq!(
            Limits::new(4096, 0, 0, Some(10)),
            (1, Limits { per_address: 1, unauthenticated: 1 })
        );
    }

    /// Whether `t` was told to close.
    async fn was_evicted(t: &Ticket) -> bool {
        let evict = t.evicted();
        tokio::time::timeout(std::time::Duration::from_millis(10), evict.notified()).await.is_ok()
    }

    #[tokio::test]
    async fn per_address_cap_and_the_oldest_not_logged_in_evicted() {
        let mut a = Admission::new(Limits { per_address: 2, unauthenticated: 3 });
        let t1 = a.admit(ip("192.0.2.1")).unwrap();
        let mut t2 = a.admit(ip("192.0.2.1")).unwrap();
        assert_eq!(a.admit(ip("192.0.2.1")).unwrap_err(), Refused::PerAddress);
        assert_eq!(a.admit(ip("::ffff:192.0.2.1")).unwrap_err(), Refused::PerAddress);
        let t3 = a.admit(ip("192.0.2.2")).unwrap();
        // A connection that logs in makes room for one that has not yet.
        t2.logged_in();
        assert!(t2.is_logged_in());
        let t4 = a.admit(ip("192.0.2.3")).unwrap();
        assert_eq!(a.counts(ip("192.0.2.1")), (2, 3));
        assert!(!was_evicted(&t1).await);
        // The share is full: the next one evicts the oldest not logged in (t1), never t2.
        let t5 = a.admit(ip("192.0.2.4")).unwrap();
        assert!(was_evicted(&t1).await);
        assert!(!was_evicted(&t2).await && !was_evicted(&t3).await);
        assert_eq!(a.counts(ip("192.0.2.1")), (2, 3), "t1 still counts for its address");
        drop(t1);
        assert_eq!(a.counts(ip("192.0.2.1")), (1, 3));
        drop((t2, t3, t4, t5));
        assert_eq!(a.counts(ip("192.0.2.1")), (0, 0));
        assert!(a.counts.per_address.is_empty());
    }

    #[test]
    fn ipv6_counts_per_64() {
        let mut a = Admission::new(Limits { per_address: 2, unauthenticated: 10 });
        let _t1 = a.admit(ip("2001:db8:1:2::1")).unwrap();
        let _t2 = a.admit(ip("2001:db8:1:2:ffff::9")).unwrap();
        assert_eq!(a.admit(ip("2001:db8:1:2::3")).unwrap_err(), Refused::PerAddress);
        assert!(a.admit(ip("2001:db8:1:3::1")).is_ok());
    }
}
