//! Which control connections the server takes: at most so many per source address, and
//! connections not logged in yet only up to a share of the connection budget, so that
//! strangers holding connections open (idle TLS, or not even that) leave room for clients
//! that log in. The budget itself is bounded by the open-file limit, which the server
//! raises to its hard limit at start ([`raise_fd_limit`]).
//!
//! ```text
//!  accept ── admit(ip) ──▶ Ticket (counted: per address, not logged in)
//!                             │ logged_in(): no longer counted as not logged in
//!                             ▼ drop: uncounted
//! ```

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

/// File descriptors kept for everything but control connections: the listening sockets,
/// the database, federation fetches, logs.
pub const RESERVED_FDS: u64 = 64;

/// Why a new connection is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// Its source address has the most connections allowed already.
    #[error("too many connections from this address")]
    PerAddress,
    /// Connections not logged in hold their whole share of the budget.
    #[error("too many connections not logged in")]
    Unauthenticated,
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
    unauthenticated: usize,
}

/// The connection counts of a server.
#[derive(Debug)]
pub struct Admission {
    limits: Limits,
    counts: Mutex<Counts>,
}

impl Admission {
    pub fn new(limits: Limits) -> Arc<Admission> {
        Arc::new(Admission { limits, counts: Mutex::default() })
    }

    /// Count a new connection from `ip`, not logged in, or refuse it.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<Ticket, Refused> {
        let ip = ip.to_canonical();
        let mut c = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        let from_ip = c.per_address.get(&ip).copied().unwrap_or(0);
        if from_ip >= self.limits.per_address {
            return Err(Refused::PerAddress);
        }
        if c.unauthenticated >= self.limits.unauthenticated {
            return Err(Refused::Unauthenticated);
        }
        c.per_address.insert(ip, from_ip + 1);
        c.unauthenticated += 1;
        Ok(Ticket { admission: self.clone(), ip, logged_in: false })
    }

    /// Connections from `ip` and connections not logged in, now.
    pub fn counts(&self, ip: IpAddr) -> (usize, usize) {
        let c = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        (c.per_address.get(&ip.to_canonical()).copied().unwrap_or(0), c.unauthenticated)
    }
}

/// One admitted connection; dropping it uncounts it.
#[derive(Debug)]
pub struct Ticket {
    admission: Arc<Admission>,
    ip: IpAddr,
    logged_in: bool,
}

impl Ticket {
    /// The connection logged in: it no longer takes from the share of those that did not.
    pub fn logged_in(&mut self) {
        if !self.logged_in {
            self.logged_in = true;
            let mut c = self.admission.counts.lock().unwrap_or_else(|p| p.into_inner());
            c.unauthenticated = c.unauthenticated.saturating_sub(1);
        }
    }

    pub fn is_logged_in(&self) -> bool {
        self.logged_in
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut c = self.admission.counts.lock().unwrap_or_else(|p| p.into_inner());
        if !self.logged_in {
            c.unauthenticated = c.unauthenticated.saturating_sub(1);
        }
        if let Some(n) = c.per_address.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                c.per_address.remove(&self.ip);
            }
        }
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

    #[test]
    fn per_address_and_unauthenticated_caps() {
        let a = Admission::new(Limits { per_address: 2, unauthenticated: 3 });
        let t1 = a.admit(ip("192.0.2.1")).unwrap();
        let mut t2 = a.admit(ip("192.0.2.1")).unwrap();
        assert_eq!(a.admit(ip("192.0.2.1")).unwrap_err(), Refused::PerAddress);
        assert_eq!(a.admit(ip("::ffff:192.0.2.1")).unwrap_err(), Refused::PerAddress);
        let t3 = a.admit(ip("192.0.2.2")).unwrap();
        assert_eq!(a.admit(ip("192.0.2.3")).unwrap_err(), Refused::Unauthenticated);
        // A connection that logs in makes room for one that has not yet.
        t2.logged_in();
        assert!(t2.is_logged_in());
        let t4 = a.admit(ip("192.0.2.3")).unwrap();
        assert_eq!(a.counts(ip("192.0.2.1")), (2, 3));
        drop((t1, t2, t3, t4));
        assert_eq!(a.counts(ip("192.0.2.1")), (0, 0));
        assert!(a.counts.lock().unwrap().per_address.is_empty());
    }
}
