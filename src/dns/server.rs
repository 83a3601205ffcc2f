//! The tokio driver: UDP and TCP sockets on one address, feeding the [`Shim`].
//!
//! It owns the sockets, reads the clock and makes the look-ups; the shim (behind a mutex,
//! shared with the daemon for `whois`, `touch` and saving) does everything else, and the lock
//! is held only while the shim computes, never across a look-up or a send. A query about a
//! person the shim's [`Exists`] does not know ([`Step::Ask`]) waits in a task of its own for
//! the [`Lookup`] while every other query is answered at once; a second query about the same
//! person waits for the same look-up.
//!
//! Bounded everywhere: queries above [`ServerConfig::max_query_len`] are dropped; at most
//! [`ServerConfig::max_lookups`] queries wait for look-ups at once (beyond that a query is
//! answered as if the identity service were unsure: the existing mapping, else SERVFAIL), each
//! for at most [`ServerConfig::lookup_timeout`]; TCP connections are capped and time out.
//! Other UDP queries wait in the socket buffer, not in memory.

use super::framing;
use super::shim::{Existence, Exists, Shim, Step};
use crate::address::Q2qAddress;
use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::time::timeout;
use tracing::Instrument;

/// The shim as shared between the server and the daemon.
pub type SharedShim<E> = Arc<Mutex<Shim<E>>>;

/// Lock the shared shim (a panic elsewhere does not make the mappings unusable).
pub fn lock<E>(shim: &SharedShim<E>) -> MutexGuard<'_, Shim<E>> {
    shim.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Asks the identity service whether a person exists (the daemon asks their domain's
/// server). Called with no lock held; the server bounds how many wait and for how long.
pub trait Lookup: Send + Sync + 'static {
    fn lookup(&self, address: &Q2qAddress) -> impl Future<Output = Existence> + Send;
}

/// Nobody to ask: whoever the shim's [`Exists`] does not know is unsure.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoLookup;

impl Lookup for NoLookup {
    fn lookup(&self, _: &Q2qAddress) -> impl Future<Output = Existence> + Send {
        std::future::ready(Existence::Unsure)
    }
}

/// Limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerConfig {
    /// Longest query accepted (UDP datagram or TCP message); longer ones are dropped.
    pub max_query_len: usize,
    /// TCP connections served at once; more are closed on accept.
    pub max_tcp_connections: usize,
    /// A TCP connection idle (or slow to send a message) this long is closed.
    pub tcp_timeout: Duration,
    /// Queries answered on one TCP connection before it is closed.
    pub max_queries_per_connection: usize,
    /// Queries waiting for a look-up at once; more are answered at once as unsure (the
    /// existing mapping, else SERVFAIL).
    pub max_lookups: usize,
    /// How long a query waits for its look-up before it is answered as unsure.
    pub lookup_timeout: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            max_query_len: 4096,
            max_tcp_connections: 32,
            tcp_timeout: Duration::from_secs(10),
            max_queries_per_connection: 100,
            max_lookups: 64,
            lookup_timeout: Duration::from_secs(3),
        }
    }
}

/// A bound, not yet running, DNS server.
pub struct Server<E, L> {
    udp: UdpSocket,
    tcp: TcpListener,
    shim: SharedShim<E>,
    asker: Arc<Asker<L>>,
    config: ServerConfig,
}

impl<E: Exists + Send + 'static, L: Lookup> Server<E, L> {
    /// Bind UDP and TCP on `addr`. With port 0, both get the same free port.
    pub async fn bind(
        addr: SocketAddr,
        shim: SharedShim<E>,
        lookup: L,
        config: ServerConfig,
    ) -> io::Result<Server<E, L>> {
        let asker = Arc::new(Asker {
            lookup,
            slots: Arc::new(Semaphore::new(config.max_lookups)),
            inflight: Mutex::new(HashMap::new()),
            timeout: config.lookup_timeout,
        });
        let mut last_err = None;
        for _ in 0..if addr.port() == 0 { 16 } else { 1 } {
            let udp = UdpSocket::bind(addr).await?;
            let bound = udp.local_addr()?;
            match TcpListener::bind(bound).await {
                Ok(tcp) => return Ok(Server { udp, tcp, shim, asker, config }),
                Err(e) => last_err = Some(e),
            }
        }
        Err(last_err.unwrap_or_else(|| io::Error::other("cannot bind")))
    }

    /// Where the server listens (UDP and TCP alike).
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.udp.local_addr()
    }

    pub fn shim(&self) -> SharedShim<E> {
        self.shim.clone()
    }

    /// Serve until the task is dropped or a socket fails for good.
    pub async fn run(self) -> io::Result<()> {
        let span = tracing::info_span!("dns", addr = %self.local_addr()?);
        let Server { udp, tcp, shim, asker, config } = self;
        let udp_loop = serve_udp(Arc::new(udp), shim.clone(), asker.clone(), config);
        let tcp_loop = serve_tcp(tcp, shim, asker, config);
        async move {
            tracing::info!("resolver shim listening");
            tokio::try_join!(udp_loop, tcp_loop).map(|_| ())
        }
        .instrument(span)
        .await
    }
}

/// The look-ups in flight: one per person, however many queries wait for it.
struct Asker<L> {
    lookup: L,
    /// One permit per query waiting for a look-up.
    slots: Arc<Semaphore>,
    inflight: Mutex<HashMap<Q2qAddress, watch::Receiver<Option<Existence>>>>,
    timeout: Duration,
}

impl<L: Lookup> Asker<L> {
    /// A place among the queries waiting for look-ups, if one is free.
    fn slot(&self) -> Option<OwnedSemaphorePermit> {
        let permit = self.slots.clone().try_acquire_owned().ok();
        if permit.is_none() {
            tracing::debug!("too many look-ups in flight: answered as unsure");
        }
        permit
    }

    /// Whether `address` exists: the look-up in flight for it, or a new one. Never longer
    /// than the timeout; no answer in time is [`Existence::Unsure`].
    async fn ask(&self, address: &Q2qAddress) -> Existence {
        let joined = {
            let mut inflight = self.inflight.lock().unwrap_or_else(|p| p.into_inner());
            match inflight.get(address) {
                Some(rx) => Err(rx.clone()),
                None => {
                    let (tx, rx) = watch::channel(None);
                    inflight.insert(address.clone(), rx);
                    Ok(tx)
                }
            }
        };
        match joined {
            Ok(tx) => {
                // Whatever happens to this future, the entry goes with it.
                let _entry = Entry { inflight: &self.inflight, address };
                let e = match timeout(self.timeout, self.lookup.lookup(address)).await {
                    Ok(Existence::Ask) | Err(_) => Existence::Unsure,
                    Ok(e) => e,
                };
                tx.send_replace(Some(e));
                e
            }
            Err(mut rx) => match timeout(self.timeout, rx.wait_for(Option::is_some)).await {
                Ok(Ok(e)) => e.unwrap_or(Existence::Unsure),
                _ => Existence::Unsure,
            },
        }
    }
}

/// Removes a look-up from the table when it ends (or is dropped).
struct Entry<'a> {
    inflight: &'a Mutex<HashMap<Q2qAddress, watch::Receiver<Option<Existence>>>>,
    address: &'a Q2qAddress,
}

impl Drop for Entry<'_> {
    fn drop(&mut self) {
        self.inflight.lock().unwrap_or_else(|p| p.into_inner()).remove(self.address);
    }
}

async fn serve_udp<E: Exists + Send + 'static, L: Lookup>(
    udp: Arc<UdpSocket>,
    shim: SharedShim<E>,
    asker: Arc<Asker<L>>,
    config: ServerConfig,
) -> io::Result<()> {
    // One byte more than allowed, to tell "exactly the limit" from "too long".
    let mut buf = vec![0u8; config.max_query_len + 1];
    loop {
        let (n, from) = match udp.recv_from(&mut buf).await {
            Ok(x) => x,
            Err(e) => {
                tracing::debug!(error = %e, "udp receive failed");
                continue;
            }
        };
        if n > config.max_query_len {
            tracing::debug!(%from, len = n, "query too long, dropped");
            continue;
        }
        let step = lock(&shim).start(&buf[..n], SystemTime::now(), true);
        let reply = match step {
            Step::Reply(reply) => reply,
            Step::Ask(pending) => match asker.slot() {
                Some(permit) => {
                    let (udp, shim, asker) = (udp.clone(), shim.clone(), asker.clone());
                    tokio::spawn(async move {
                        let existence = asker.ask(pending.address()).await;
                        let reply = lock(&shim).finish(*pending, existence, SystemTime::now());
                        if let Some(resp) = reply {
                            send(&udp, &resp, from).await;
                        }
                        drop(permit);
                    });
                    None
                }
                None => lock(&shim).finish(*pending, Existence::Unsure, SystemTime::now()),
            },
        };
        if let Some(resp) = reply {
            send(&udp, &resp, from).await;
        }
    }
}

async fn send(udp: &UdpSocket, resp: &[u8], to: SocketAddr) {
    if let Err(e) = udp.send_to(resp, to).await {
        tracing::debug!(%to, error = %e, "udp send failed");
    }
}

async fn serve_tcp<E: Exists + Send + 'static, L: Lookup>(
    tcp: TcpListener,
    shim: SharedShim<E>,
    asker: Arc<Asker<L>>,
    config: ServerConfig,
) -> io::Result<()> {
    let slots = Arc::new(Semaphore::new(config.max_tcp_connections));
    loop {
        let (stream, from) = match tcp.accept().await {
            Ok(x) => x,
            Err(e) => {
                // Out of file descriptors and the like: wait instead of spinning.
                tracing::warn!(error = %e, "tcp accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            tracing::debug!(%from, "too many tcp connections, closing");
            continue;
        };
        let (shim, asker) = (shim.clone(), asker.clone());
        tokio::spawn(
            async move {
                serve_connection(stream, shim, asker, config).await;
                drop(permit);
            }
            .instrument(tracing::debug_span!("tcp", %from)),
        );
    }
}

async fn serve_connection<E: Exists + Send + 'static, L: Lookup>(
    mut stream: TcpStream,
    shim: SharedShim<E>,
    asker: Arc<Asker<L>>,
    config: ServerConfig,
) {
    let t = config.tcp_timeout;
    for _ in 0..config.max_queries_per_connection {
        let mut len = [0u8; 2];
        if !matches!(timeout(t, stream.read_exact(&mut len)).await, Ok(Ok(_))) {
            return;
        }
        let len = usize::from(u16::from_be_bytes(len));
        if len > config.max_query_len {
            tracing::debug!(len, "query too long, closing");
            return;
        }
        let mut query = vec![0u8; len];
        if !matches!(timeout(t, stream.read_exact(&mut query)).await, Ok(Ok(_))) {
            return;
        }
        let step = lock(&shim).start(&query, SystemTime::now(), false);
        let reply = match step {
            Step::Reply(reply) => reply,
            Step::Ask(pending) => {
                let existence = match asker.slot() {
                    Some(_permit) => asker.ask(pending.address()).await,
                    None => Existence::Unsure,
                };
                lock(&shim).finish(*pending, existence, SystemTime::now())
            }
        };
        let Some(resp) = reply else { return };
        let Some(framed) = framing::encode(&resp) else { return };
        if !matches!(timeout(t, stream.write_all(&framed)).await, Ok(Ok(()))) {
            return;
        }
    }
}
