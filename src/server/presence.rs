//! Who is online for what: the services each logged-in address listens for, and the control
//! connection to reach it by. Presence lives exactly as long as that connection. With
//! several instances of a domain, each change is also sent, in order, to be mirrored into
//! the shared database ([`super::cluster`]).

use crate::address::{Q2qAddress, ServiceName};
use crate::amp::PeerHandle;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::cluster::Change;
use super::ratelimit::InboundLimiter;

/// One `listen` of one connection.
#[derive(Clone)]
pub struct Listener {
    pub conn: u64,
    pub description: String,
    pub handle: PeerHandle,
    /// The IP address the connection comes from (told to callers as `peer_seen`).
    pub seen: std::net::IpAddr,
    /// The IP of the other family the connection proved with `also-seen` (told to callers
    /// as `peer_seen_also`); written by the connection's handler only.
    pub also_seen: tokio::sync::watch::Receiver<Option<std::net::IpAddr>>,
}

impl Listener {
    /// Where the server vouches the listener is: its connection's IP, and the proven IP
    /// of the other family.
    pub fn seen_at(&self) -> SeenAt {
        SeenAt { ip: self.seen, also: *self.also_seen.borrow() }
    }
}

/// The IPs the server vouches for about one control connection (`peer_seen`,
/// `peer_seen_also`): where it comes from, and a proven IP of the other family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeenAt {
    pub ip: std::net::IpAddr,
    pub also: Option<std::net::IpAddr>,
}

/// Why a callee cannot be asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Absent {
    /// Not logged in for any service.
    Offline,
    /// Online, but not for this service.
    NoSuchService,
}

/// The registry of listeners.
#[derive(Default)]
pub struct Presence {
    inner: Mutex<HashMap<Q2qAddress, HashMap<ServiceName, Listener>>>,
    /// How often callers may ask for callees.
    inbound: Mutex<InboundLimiter>,
    /// Where changes go to be mirrored for other instances, if any.
    changes: Option<tokio::sync::mpsc::UnboundedSender<Change>>,
}

/// Most services one address may listen for.
pub const MAX_SERVICES: usize = 256;

impl Presence {
    /// An empty registry whose changes also go to `changes` (see [`super::cluster`]).
    pub fn mirrored(changes: tokio::sync::mpsc::UnboundedSender<Change>) -> Presence {
        Presence { changes: Some(changes), ..Default::default() }
    }

    fn mirror(&self, change: impl FnOnce() -> Change) {
        if let Some(tx) = &self.changes {
            let _ = tx.send(change());
        }
    }

    /// Record that `address` listens for `service` on connection `conn` (replacing an older
    /// listen of the same service: the newest connection wins). False if over the limit.
    pub fn listen(&self, address: &Q2qAddress, service: ServiceName, listener: Listener) -> bool {
        let Ok(mut map) = self.inner.lock() else { return false };
        let services = map.entry(address.clone()).or_default();
        if services.len() >= MAX_SERVICES && !services.contains_key(&service) {
            return false;
        }
        let conn = listener.conn;
        self.mirror(|| Change::Listen {
            address: address.to_string(),
            service: service.to_string(),
            conn,
        });
        services.insert(service, listener);
        true
    }

    pub fn unlisten(&self, address: &Q2qAddress, service: &ServiceName, conn: u64) {
        if let Ok(mut map) = self.inner.lock()
            && let Some(services) = map.get_mut(address)
        {
            services.retain(|s, l| !(s == service && l.conn == conn));
            if services.is_empty() {
                map.remove(address);
            }
        }
        self.mirror(|| Change::Unlisten {
            address: address.to_string(),
            service: service.to_string(),
            conn,
        });
    }

    /// Forget everything connection `conn` listened for.
    pub fn drop_connection(&self, conn: u64) {
        if let Ok(mut map) = self.inner.lock() {
            map.retain(|_, services| {
                services.retain(|_, l| l.conn != conn);
                !services.is_empty()
            });
        }
        self.mirror(|| Change::Closed { conn });
    }

    /// The listener for `service` of `address`.
    /// Any listener of `address` (its connection, to ask it something), if online.
    pub fn any(&self, address: &Q2qAddress) -> Option<Listener> {
        let map = self.inner.lock().ok()?;
        map.get(address)?.values().next().cloned()
    }

    pub fn find(&self, address: &Q2qAddress, service: &ServiceName) -> Result<Listener, Absent> {
        let map = self.inner.lock().map_err(|_| Absent::Offline)?;
        let services = map.get(address).ok_or(Absent::Offline)?;
        services.get(service).cloned().ok_or(Absent::NoSuchService)
    }

    /// May `caller` ask for `callee` now? `Err(wait)` if it asked too often.
    pub fn admit_inbound(
        &self,
        caller: &Q2qAddress,
        callee: &Q2qAddress,
        now: Instant,
    ) -> Result<(), Duration> {
        match self.inbound.lock() {
            Ok(mut l) => l.admit(&caller.to_string(), &callee.to_string(), now),
            Err(_) => Ok(()),
        }
    }

    /// Every listen now, as (address, service, connection): to publish again what the
    /// database may have missed.
    pub fn snapshot(&self) -> Vec<(String, String, u64)> {
        self.inner.lock().map_or(Vec::new(), |m| {
            m.iter()
                .flat_map(|(a, services)| {
                    services.iter().map(move |(s, l)| (a.to_string(), s.to_string(), l.conn))
                })
                .collect()
        })
    }

    /// Counts for status: (addresses online, listeners).
    pub fn counts(&self) -> (usize, usize) {
        self.inner.lock().map_or((0, 0), |m| (m.len(), m.values().map(HashMap::len).sum()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn changes_are_mirrored_in_order() {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let p = Presence::mirrored(tx);
        let a = Q2qAddress::parse("alice@example.com").unwrap();
        let s = ServiceName::parse("echo").unwrap();
        let handle = crate::amp::peer::spawn(tokio::io::duplex(64).0).0;
        let l = Listener {
            conn: 7,
            description: String::new(),
            handle,
            seen: [127, 0, 0, 1].into(),
            also_seen: tokio::sync::watch::channel(None).1,
        };
        assert!(p.listen(&a, s.clone(), l));
        p.unlisten(&a, &s, 7);
        p.drop_connection(7);
        let got: Vec<String> =
            std::iter::from_fn(|| rx.try_recv().ok()).map(|c| format!("{c:?}")).collect();
        assert_eq!(got.len(), 3, "{got:?}");
        assert!(
            got[0].starts_with("Listen")
                && got[0].contains("alice@example.com")
                && got[0].contains("conn: 7"),
            "{got:?}"
        );
        assert!(got[1].starts_with("Unlisten"), "{got:?}");
        assert_eq!(got[2], "Closed { conn: 7 }");
    }
}
