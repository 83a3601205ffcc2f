//! The tokio driver: UDP and TCP sockets on one address, feeding the [`Shim`].
//!
//! It owns the sockets and reads the clock; the shim (behind a mutex, shared with the daemon
//! for `whois`, `touch` and saving) does everything else. Each answer runs on tokio's blocking
//! pool, since [`Exists`] may block briefly. Bounded everywhere: queries above
//! [`ServerConfig::max_query_len`] are dropped, TCP connections are capped and time out, and
//! UDP is served one query at a time (a flood waits in the socket buffer, not in memory).

use super::framing;
use super::shim::{Exists, Shim};
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::Semaphore;
use tokio::time::timeout;
use tracing::Instrument;

/// The shim as shared between the server and the daemon.
pub type SharedShim<E> = Arc<Mutex<Shim<E>>>;

/// Lock the shared shim (a panic elsewhere does not make the mappings unusable).
pub fn lock<E>(shim: &SharedShim<E>) -> MutexGuard<'_, Shim<E>> {
    shim.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
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
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            max_query_len: 4096,
            max_tcp_connections: 32,
            tcp_timeout: Duration::from_secs(10),
            max_queries_per_connection: 100,
        }
    }
}

/// A bound, not yet running, DNS server.
pub struct Server<E> {
    udp: UdpSocket,
    tcp: TcpListener,
    shim: SharedShim<E>,
    config: ServerConfig,
}

impl<E: Exists + Send + 'static> Server<E> {
    /// Bind UDP and TCP on `addr`. With port 0, both get the same free port.
    pub async fn bind(
        addr: SocketAddr,
        shim: SharedShim<E>,
        config: ServerConfig,
    ) -> io::Result<Server<E>> {
        let mut last_err = None;
        for _ in 0..if addr.port() == 0 { 16 } else { 1 } {
            let udp = UdpSocket::bind(addr).await?;
            let bound = udp.local_addr()?;
            match TcpListener::bind(bound).await {
                Ok(tcp) => return Ok(Server { udp, tcp, shim, config }),
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
        let Server { udp, tcp, shim, config } = self;
        let udp_loop = serve_udp(udp, shim.clone(), config);
        let tcp_loop = serve_tcp(tcp, shim, config);
        async move {
            tracing::info!("resolver shim listening");
            tokio::try_join!(udp_loop, tcp_loop).map(|_| ())
        }
        .instrument(span)
        .await
    }
}

async fn answer<E: Exists + Send + 'static>(
    shim: &SharedShim<E>,
    query: Vec<u8>,
    tcp: bool,
) -> Option<Vec<u8>> {
    let shim = shim.clone();
    tokio::task::spawn_blocking(move || {
        let mut s = lock(&shim);
        if tcp {
            s.answer_tcp(&query, SystemTime::now())
        } else {
            s.answer(&query, SystemTime::now())
        }
    })
    .await
    .ok()
    .flatten()
}

async fn serve_udp<E: Exists + Send + 'static>(
    udp: UdpSocket,
    shim: SharedShim<E>,
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
        if let Some(resp) = answer(&shim, buf[..n].to_vec(), false).await {
            if let Err(e) = udp.send_to(&resp, from).await {
                tracing::debug!(%from, error = %e, "udp send failed");
            }
        }
    }
}

async fn serve_tcp<E: Exists + Send + 'static>(
    tcp: TcpListener,
    shim: SharedShim<E>,
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
        let shim = shim.clone();
        tokio::spawn(
            async move {
                serve_connection(stream, shim, config).await;
                drop(permit);
            }
            .instrument(tracing::debug_span!("tcp", %from)),
        );
    }
}

async fn serve_connection<E: Exists + Send + 'static>(
    mut stream: TcpStream,
    shim: SharedShim<E>,
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
        let Some(resp) = answer(&shim, query, true).await else { return };
        let Some(framed) = framing::encode(&resp) else { return };
        if !matches!(timeout(t, stream.write_all(&framed)).await, Ok(Ok(()))) {
            return;
        }
    }
}
