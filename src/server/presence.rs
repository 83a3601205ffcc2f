//! Who is online for what: the services each logged-in address listens for, and the control
//! connection to reach it by. Presence lives exactly as long as that connection. With
//! several instances of a domain, each change is also sent, in order, to be mirrored into
//! the shared database ([`super::cluster`]).

use crate::address::{Q2qAddress, ServiceName};
use crate::amp::PeerHandle;
use std::collections::HashMap;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot, watch};

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

/// The registry of listeners and the inbound limits, as a value: owned by one task
/// ([`Presence`]), every change made in the order it arrives and mirrored in that order.
#[derive(Default)]
struct Registry {
    listeners: HashMap<Q2qAddress, HashMap<ServiceName, Listener>>,
    /// How often callers may ask for callees.
    inbound: InboundLimiter,
    /// Where changes go to be mirrored for other instances, if any.
    changes: Option<mpsc::UnboundedSender<Change>>,
}

/// Most services one address may listen for.
pub const MAX_SERVICES: usize = 256;

impl Registry {
    fn mirror(&self, change: impl FnOnce() -> Change) {
        if let Some(tx) = &self.changes {
            let _ = tx.send(change());
        }
    }

    fn listen(&mut self, address: Q2qAddress, service: ServiceName, listener: Listener) -> bool {
        let services = self.listeners.entry(address.clone()).or_default();
        if services.len() >= MAX_SERVICES && !services.contains_key(&service) {
            return false;
        }
        let conn = listener.conn;
        services.insert(service.clone(), listener);
        self.mirror(|| Change::Listen {
            address: address.to_string(),
            service: service.to_string(),
            conn,
        });
        true
    }

    fn unlisten(&mut self, address: &Q2qAddress, service: &ServiceName, conn: u64) {
        if let Some(services) = self.listeners.get_mut(address) {
            services.retain(|s, l| !(s == service && l.conn == conn));
            if services.is_empty() {
                self.listeners.remove(address);
            }
        }
        self.mirror(|| Change::Unlisten {
            address: address.to_string(),
            service: service.to_string(),
            conn,
        });
    }

    fn drop_connection(&mut self, conn: u64) {
        self.listeners.retain(|_, services| {
            services.retain(|_, l| l.conn != conn);
            !services.is_empty()
        });
        self.mirror(|| Change::Closed { conn });
    }

    fn find(&self, address: &Q2qAddress, service: &ServiceName) -> Result<Listener, Absent> {
        let services = self.listeners.get(address).ok_or(Absent::Offline)?;
        services.get(service).cloned().ok_or(Absent::NoSuchService)
    }

    fn snapshot(&self) -> Vec<(String, String, u64)> {
        self.listeners
            .iter()
            .flat_map(|(a, services)| {
                services.iter().map(move |(s, l)| (a.to_string(), s.to_string(), l.conn))
            })
            .collect()
    }

    fn counts(&self) -> (usize, usize) {
        (self.listeners.len(), self.listeners.values().map(HashMap::len).sum())
    }
}

/// What connection handlers ask the registry's owner.
enum Request {
    Listen {
        address: Q2qAddress,
        service: ServiceName,
        listener: Listener,
        ok: oneshot::Sender<bool>,
    },
    Unlisten {
        address: Q2qAddress,
        service: ServiceName,
        conn: u64,
    },
    DropConnection(u64),
    Find {
        address: Q2qAddress,
        service: ServiceName,
        found: oneshot::Sender<Result<Listener, Absent>>,
    },
    Any {
        address: Q2qAddress,
        found: oneshot::Sender<Option<Listener>>,
    },
    AdmitInbound {
        caller: String,
        callee: String,
        now: Instant,
        verdict: oneshot::Sender<Result<(), Duration>>,
    },
    Snapshot(oneshot::Sender<Vec<(String, String, u64)>>),
}

/// Requests that may wait for the owner at once; more make their handler wait.
const QUEUE: usize = 1024;

/// Who is online for what, and how often callers may ask for callees: a handle to the one
/// task that owns the registry (connection handlers ask it through a bounded channel, so
/// changes and their mirror keep one order). The task ends with the last handle.
pub struct Presence {
    requests: mpsc::Sender<Request>,
    /// (addresses online, listeners), as the owner last published them.
    counts: watch::Receiver<(usize, usize)>,
}

impl Presence {
    /// An empty registry whose changes also go to `changes`, if given (to be mirrored for
    /// other instances, see [`super::cluster`]); its owner started on the current runtime.
    pub fn start(changes: Option<mpsc::UnboundedSender<Change>>) -> Presence {
        let (requests, rx) = mpsc::channel(QUEUE);
        let (publish, counts) = watch::channel((0, 0));
        tokio::spawn(own(Registry { changes, ..Default::default() }, rx, publish));
        Presence { requests, counts }
    }

    async fn ask<T>(&self, request: impl FnOnce(oneshot::Sender<T>) -> Request) -> Option<T> {
        super::ask_owner(&self.requests, request).await
    }

    /// Record that `address` listens for `service` on `listener`'s connection (replacing an
    /// older listen of the same service: the newest connection wins). False if over
    /// [`MAX_SERVICES`].
    pub async fn listen(
        &self,
        address: &Q2qAddress,
        service: ServiceName,
        listener: Listener,
    ) -> bool {
        let address = address.clone();
        self.ask(|ok| Request::Listen { address, service, listener, ok }).await.unwrap_or(false)
    }

    /// `address` no longer listens for `service` on connection `conn`.
    pub async fn unlisten(&self, address: &Q2qAddress, service: &ServiceName, conn: u64) {
        let (address, service) = (address.clone(), service.clone());
        let _ = self.requests.send(Request::Unlisten { address, service, conn }).await;
    }

    /// Forget everything connection `conn` listened for.
    pub async fn drop_connection(&self, conn: u64) {
        let _ = self.requests.send(Request::DropConnection(conn)).await;
    }

    /// Any listener of `address` (its connection, to ask it something), if online.
    pub async fn any(&self, address: &Q2qAddress) -> Option<Listener> {
        let address = address.clone();
        self.ask(|found| Request::Any { address, found }).await.flatten()
    }

    /// The listener for `service` of `address`.
    pub async fn find(
        &self,
        address: &Q2qAddress,
        service: &ServiceName,
    ) -> Result<Listener, Absent> {
        let (address, service) = (address.clone(), service.clone());
        self.ask(|found| Request::Find { address, service, found })
            .await
            .unwrap_or(Err(Absent::Offline))
    }

    /// May `caller` ask for `callee` now? `Err(wait)` if it asked too often.
    pub async fn admit_inbound(
        &self,
        caller: &Q2qAddress,
        callee: &Q2qAddress,
        now: Instant,
    ) -> Result<(), Duration> {
        let (caller, callee) = (caller.to_string(), callee.to_string());
        self.ask(|verdict| Request::AdmitInbound { caller, callee, now, verdict })
            .await
            .unwrap_or(Ok(()))
    }

    /// Every listen now, as (address, service, connection): to publish again what the
    /// database may have missed.
    pub async fn snapshot(&self) -> Vec<(String, String, u64)> {
        self.ask(Request::Snapshot).await.unwrap_or_default()
    }

    /// Counts for status: (addresses online, listeners).
    pub fn counts(&self) -> (usize, usize) {
        *self.counts.borrow()
    }
}

/// The owner: answer requests in order until every handle is gone.
async fn own(
    mut registry: Registry,
    mut requests: mpsc::Receiver<Request>,
    counts: watch::Sender<(usize, usize)>,
) {
    while let Some(request) = requests.recv().await {
        match request {
            Request::Listen { address, service, listener, ok } => {
                let _ = ok.send(registry.listen(address, service, listener));
            }
            Request::Unlisten { address, service, conn } => {
                registry.unlisten(&address, &service, conn)
            }
            Request::DropConnection(conn) => registry.drop_connection(conn),
            Request::Find { address, service, found } => {
                let _ = found.send(registry.find(&address, &service));
            }
            Request::Any { address, found } => {
                let any = registry.listeners.get(&address).and_then(|s| s.values().next().cloned());
                let _ = found.send(any);
            }
            Request::AdmitInbound { caller, callee, now, verdict } => {
                let _ = verdict.send(registry.inbound.admit(&caller, &callee, now));
            }
            Request::Snapshot(reply) => {
                let _ = reply.send(registry.snapshot());
            }
        }
        counts.send_if_modified(|c| {
            let now = registry.counts();
            std::mem::replace(c, now) != now
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn changes_are_mirrored_in_order() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let p = Presence::start(Some(tx));
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
        assert!(p.listen(&a, s.clone(), l).await);
        assert_eq!(p.counts(), (1, 1));
        p.unlisten(&a, &s, 7).await;
        p.drop_connection(7).await;
        // The owner has handled all three once it answers a later request.
        assert!(p.snapshot().await.is_empty());
        assert_eq!(p.counts(), (0, 0));
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
