//! The identity server of a domain (`q2q-server`): holds the domain CA, registers users,
//! signs their certificate requests, and tells clients the address it sees them from.
//!
//! ```text
//!  TCP :8788 ── admission ── TLS 1.3 ── AMP boxes ── handler ──┬── DomainCa (rcgen)
//!  (per-address cap, room for                                 ├── Store (SQLite, or PostgreSQL
//!   clients that log in; owned                                │   shared by several instances)
//!   by the accept loop)                                       ├── Presence* (who listens for what)
//!                                                             ├── Limits* (attempts, registrations,
//!                                                             │   `exists`), Hasher (argon2id)
//!                                                             ├── Federation* (other domains' CAs
//!                                                             │   and revocation lists, public
//!                                                             │   addresses only)
//!                                                             └── Revocations (our signed list,
//!                                                                 watched; others' lists, cached)
//!  * one task owns the state as a sans-IO value; handlers ask it through a bounded channel
//!  HTTP (optional) ── /metrics (Prometheus)
//!  UDP :8788 ── who-am-i, Relay* (owned by the UDP task, udp.rs; legs verified by tag,
//!              crate::relay framing; fair queues between legs, no fixed rate per leg)
//!  UDP :8789 ── who-am-i only (the second port, or `second_udp_addr`, for `q2q-tun
//!               netcheck`'s NAT tests)
//! ```

pub mod admin;
pub mod admission;
pub mod cluster;
pub mod config;
pub mod datadir;
pub mod db;
pub mod federation;
mod handler;
pub mod limits;
pub mod metrics;
pub mod password;
pub mod postgres;
pub mod presence;
pub mod ratelimit;
pub mod relay;
pub mod revocation;
pub mod store;
mod udp;

pub use config::{Registration, ServerConfig};
pub use datadir::{DataDir, DataDirError};

use crate::address::Domain;
use crate::identity::DomainCa;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
use tracing::{info, warn};

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error("cannot make the server's TLS certificate: {0}")]
    Tls(String),
    #[error(transparent)]
    Metrics(#[from] metrics::MetricsError),
}

pub use limits::EXISTS_BURST;

/// Ask the task that owns some state ([`presence`], [`federation`], [`limits`]): send the
/// request `make` builds around a reply channel, and wait for the answer. `None` when the
/// owner is gone (the server stopping).
async fn ask_owner<R, T>(
    requests: &tokio::sync::mpsc::Sender<R>,
    make: impl FnOnce(tokio::sync::oneshot::Sender<T>) -> R,
) -> Option<T> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    requests.send(make(tx)).await.ok()?;
    rx.await.ok()
}

/// Lifetime of the TLS certificate the server makes for itself at each start.
const SERVER_CERT_LIFETIME: Duration = Duration::from_secs(400 * 86400);

/// What every connection handler shares.
pub(crate) struct State {
    pub domain: Domain,
    pub ca: DomainCa,
    pub store: store::Store,
    /// The other instances of the domain, when the store is PostgreSQL.
    pub cluster: Option<cluster::Cluster>,
    pub config: ServerConfig,
    /// Failed password attempts, registrations (without PostgreSQL) and `exists`
    /// questions: one task owns them.
    pub limits: limits::LimitsHandle,
    pub hasher: password::Hasher,
    pub presence: presence::Presence,
    /// The relay, owned by the UDP task.
    pub relay: relay::RelayHandle,
    pub federation: federation::Federation,
    pub revocations: revocation::Revocations,
    pub metrics: metrics::Metrics,
    pub udp: Arc<UdpSocket>,
    pub udp_port: u16,
    /// The second who-am-i socket ([`ServerConfig::second_udp`]), if any.
    pub udp2: Option<Arc<UdpSocket>>,
    /// Signs who-am-i proofs of the addresses seen ([`crate::proto::whoami::ProofKey`]).
    pub proof_key: Arc<crate::proto::whoami::ProofKey>,
}

/// Counters of a running server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    /// Addresses online (listening for at least one service).
    pub online: usize,
    /// Services listened for, over all addresses.
    pub listeners: usize,
    pub relay_sessions: usize,
    pub relayed_bytes: u64,
    /// Relay datagrams refused: malformed, unknown token, bad tag, replayed, or a token
    /// used over a connection that does not own it.
    pub relay_refused: u64,
    /// Verified relay datagrams dropped because their leg's queue was full (the relay
    /// saturated) or the other end's control connection could not take them.
    pub relay_dropped: u64,
}

/// A running server; dropping it does not stop it, [`Running::shutdown`] does.
pub struct Running {
    pub tcp_addr: SocketAddr,
    pub udp_addr: SocketAddr,
    /// The second UDP port, answering who-am-i only; None when turned off.
    pub second_udp_addr: Option<SocketAddr>,
    pub domain: Domain,
    state: Arc<State>,
    stop: watch::Sender<bool>,
    tasks: JoinSet<()>,
}

impl Running {
    pub fn stats(&self) -> Stats {
        use std::sync::atomic::Ordering::Relaxed;
        let (online, listeners) = self.state.presence.counts();
        let relay = self.state.relay.stats();
        Stats {
            online,
            listeners,
            relay_sessions: relay.sessions.load(Relaxed),
            relayed_bytes: relay.relayed_bytes.load(Relaxed),
            relay_refused: relay.refused.load(Relaxed),
            relay_dropped: relay.dropped.load(Relaxed),
        }
    }

    /// Stop listening, close every connection, and wait for the tasks to end.
    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        while self.tasks.join_next().await.is_some() {}
    }

    /// Wait until the server stops (it runs until shut down).
    pub async fn wait(mut self) {
        while self.tasks.join_next().await.is_some() {}
    }
}

/// Bind TCP and UDP on `config.listen` (the same port for both) and serve `dir`'s domain.
pub async fn start(dir: DataDir, config: ServerConfig) -> Result<Running, ServerError> {
    let (tcp, udp) = bind(config.listen).await?;
    let tcp_addr =
        tcp.local_addr().map_err(|source| ServerError::Bind { addr: config.listen, source })?;
    let udp_addr =
        udp.local_addr().map_err(|source| ServerError::Bind { addr: config.listen, source })?;
    let udp2 = bind_second(&config).await?;
    let second_udp_addr = udp2.as_ref().and_then(|u| u.local_addr().ok());

    let server_key =
        crate::identity::generate_key().map_err(|e| ServerError::Tls(e.to_string()))?;
    let server_cert = dir
        .ca
        .issue_server(&server_key, SERVER_CERT_LIFETIME)
        .map_err(|e| ServerError::Tls(e.to_string()))?;
    let key_der = rustls_pki_types::PrivateKeyDer::Pkcs8(server_key.serialize_der().into());
    let tls = crate::tls::server_config(vec![server_cert.der, dir.ca.cert_der().clone()], key_der)
        .map_err(|e| ServerError::Tls(e.to_string()))?;
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));

    let domain = dir.domain.clone();
    let udp = Arc::new(udp);
    let federation = federation::Federation::new(
        crate::client::Home::new(dir.path.join("federation")),
        federation::AddressPolicy { allow: config.federation_allow.clone() },
    );
    let nofile = admission::raise_fd_limit();
    let (max_connections, limits) = admission::Limits::new(
        config.max_connections,
        config.max_connections_per_address,
        config.unauthenticated_percent,
        nofile.map(|(soft, _)| soft),
    );
    match nofile {
        Some((soft, hard)) => info!(
            open_files = soft,
            hard_limit = hard,
            max_connections,
            per_address = limits.per_address,
            not_logged_in = limits.unauthenticated,
            "connection limits"
        ),
        None => warn!(max_connections, "cannot read the open-file limit"),
    }
    let (metrics, exporter) = match config.metrics {
        Some(addr) => {
            let (m, e) = metrics::Metrics::serve(addr)?;
            info!(%addr, "metrics at /metrics");
            (m, Some(e))
        }
        None => (metrics::Metrics::off(), None),
    };
    // The dummy hash that answers for unknown users is made before the first is needed.
    tokio::task::spawn_blocking(password::warm_up);
    let store = dir.store;
    let (cluster, presence, cluster_tasks) = match store.postgres() {
        Some(pg) => {
            let (c, changes, tasks) = cluster::Cluster::new(pg.clone());
            (Some(c), presence::Presence::start(Some(changes)), Some(tasks))
        }
        None => (None, presence::Presence::start(None), None),
    };
    let relay_core = relay::Relay::new(config.relay_limits());
    let (relay_handle, relay_requests) = relay::RelayHandle::new(relay_core.stats());
    let state = Arc::new(State {
        presence,
        cluster,
        store,
        relay: relay_handle,
        federation,
        revocations: revocation::Revocations::new(config.revocation_max_age()),
        metrics,
        udp: udp.clone(),
        udp_port: udp_addr.port(),
        udp2: udp2.map(Arc::new),
        proof_key: Arc::new(crate::proto::whoami::ProofKey::random()),
        domain: dir.domain,
        ca: dir.ca,
        limits: limits::LimitsHandle::start(limits::Limits::new(
            config.rate_limit.clone(),
            &config.registration_limit,
        )),
        hasher: password::Hasher::default(),
        config,
    });
    info!(domain = %state.domain, %tcp_addr, %udp_addr, second_udp = ?second_udp_addr, ca = %state.ca.fingerprint(), "q2q-server listening");

    // The list is published before the first request can ask for it.
    revocation::refresh(&state).await;
    let (stop, stopped) = watch::channel(false);
    let mut tasks = JoinSet::new();
    tasks.spawn(revocation::watch_revocations(state.clone(), stopped.clone()));
    if let Some(exporter) = exporter {
        let mut stopped = stopped.clone();
        tasks.spawn(async move {
            tokio::select! {
                r = exporter => if let Err(e) = r { warn!(error = ?e, "metrics endpoint failed") },
                _ = stopped.changed() => {}
            }
        });
    }
    let admission = admission::Admission::new(limits);
    tasks.spawn(accept_loop(
        state.clone(),
        tcp,
        acceptor,
        (max_connections, admission),
        stopped.clone(),
    ));
    if let Some(t) = cluster_tasks {
        tasks.spawn(cluster::run(state.clone(), t, stopped.clone()));
    }
    if let Some(udp2) = state.udp2.clone() {
        tasks.spawn(second_udp_loop(state.clone(), udp2, stopped.clone()));
    }
    let owner = udp::UdpTask {
        udp: state.udp.clone(),
        udp2: state.udp2.clone(),
        relay: relay_core,
        proof_key: state.proof_key.clone(),
        requests: relay_requests,
        relayed_bytes: state.metrics.relayed_bytes.clone(),
    };
    tasks.spawn(owner.run(stopped));
    let state = state.clone();
    Ok(Running { tcp_addr, udp_addr, second_udp_addr, domain, state, stop, tasks })
}

/// The second who-am-i socket: a port set in the config must bind; the default one (the
/// port after listen's) is skipped with a warning when taken, since the server works
/// without it (only `netcheck` learns less).
async fn bind_second(config: &ServerConfig) -> Result<Option<UdpSocket>, ServerError> {
    let Some(addr) = config.second_udp() else { return Ok(None) };
    match crate::dualstack::bind_udp(addr).and_then(UdpSocket::from_std) {
        Ok(u) => Ok(Some(u)),
        Err(source) if config.second_udp_port.is_some() || config.second_udp_addr.is_some() => {
            Err(ServerError::Bind { addr, source })
        }
        Err(e) => {
            warn!(%addr, error = %e, "no second UDP port for netcheck (set second_udp_port)");
            Ok(None)
        }
    }
}

/// Send `data` to `to` from `udp`, which may be dual-stack (then an IPv4 `to` goes out
/// v4-mapped, [`crate::dualstack::for_socket`]).
async fn send_udp(udp: &UdpSocket, data: &[u8], to: SocketAddr) -> std::io::Result<usize> {
    let to = match udp.local_addr() {
        Ok(local) => crate::dualstack::for_socket(local, to),
        Err(_) => to,
    };
    udp.send_to(data, to).await
}

/// The next datagram on `udp` into `buf`, or `None` once `stopped` changes, its source
/// plain IPv4 for an IPv4 sender of a dual-stack socket ([`crate::dualstack::canonical`]).
/// Receive errors (on Linux, ICMP errors of earlier sends surface here) are logged and
/// skipped.
async fn next_datagram(
    udp: &UdpSocket,
    buf: &mut [u8],
    stopped: &mut watch::Receiver<bool>,
    port: &str,
) -> Option<(usize, SocketAddr)> {
    loop {
        tokio::select! {
            _ = stopped.changed() => return None,
            r = udp.recv_from(buf) => match r {
                Ok((n, from)) => return Some((n, crate::dualstack::canonical(from))),
                Err(e) => warn!(error = %e, port, "udp receive failed"),
            },
        }
    }
}

/// Answer who-am-i on the second port, and nothing else.
async fn second_udp_loop(
    state: Arc<State>,
    udp: Arc<UdpSocket>,
    mut stopped: watch::Receiver<bool>,
) {
    use q2q_netstack::wire::{Kind, Prefix};
    let own = udp.local_addr().ok();
    let mut buf = vec![0u8; 2048];
    loop {
        let Some((n, from)) = next_datagram(&udp, &mut buf, &mut stopped, "second").await else {
            break;
        };
        let d = &buf[..n];
        if let Ok(Kind::WhoAmIRequest) = Prefix::parse(d).map(|p| p.kind)
            && let Ok((nonce, flags)) = crate::proto::whoami::parse_request_with(d)
        {
            let reply = whoami_reply(&state.proof_key, nonce, flags, from, own);
            let _ = send_udp(&udp, &reply, from).await;
        }
    }
}

/// Seconds since the Unix epoch (the epoch of who-am-i proofs).
pub(crate) fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// The who-am-i reply to `from`, with the fields `flags` ask for (already cut to what the
/// request's length allows: [`crate::proto::whoami::parse_request_with`]): the second
/// socket (bound at `second`, if any; its address only when it has one of the asker's
/// family, not a wildcard) and the proof of `from`'s IP, signed with `proof_key`.
fn whoami_reply(
    proof_key: &crate::proto::whoami::ProofKey,
    nonce: [u8; 8],
    flags: crate::proto::whoami::Flags,
    from: SocketAddr,
    second: Option<SocketAddr>,
) -> Vec<u8> {
    let addr = second.filter(|a| !a.ip().is_unspecified() && a.is_ipv4() == from.is_ipv4());
    crate::proto::whoami::Reply {
        nonce,
        seen: from,
        second_port: flags.second_port.then(|| second.map_or(0, |a| a.port())),
        second_addr: flags.second_addr.then_some(addr),
        proof: flags.proof.then(|| proof_key.proof(from.ip(), unix_now())),
    }
    .encode()
}

/// The control listener and the UDP socket on `listen`; `[::]` serves both families with
/// one socket each ([`crate::dualstack`]; `0.0.0.0` where IPv6 is off).
async fn bind(listen: SocketAddr) -> Result<(TcpListener, UdpSocket), ServerError> {
    let err = |addr, source| ServerError::Bind { addr, source };
    // With port 0 the kernel picks the TCP port; UDP must take the same number, which may
    // be taken: try a few times.
    let mut last = None;
    for _ in 0..20 {
        let tcp = crate::dualstack::bind_tcp(listen)
            .and_then(TcpListener::from_std)
            .map_err(|e| err(listen, e))?;
        let local = tcp.local_addr().map_err(|e| err(listen, e))?;
        // The same family as the TCP side (after a fall back to IPv4).
        let udp_addr = SocketAddr::new(local.ip(), local.port());
        match crate::dualstack::bind_udp(udp_addr).and_then(UdpSocket::from_std) {
            Ok(udp) => return Ok((tcp, udp)),
            Err(e) if listen.port() == 0 => last = Some(e),
            Err(e) => return Err(err(udp_addr, e)),
        }
    }
    Err(err(listen, last.unwrap_or_else(|| std::io::Error::other("no free port"))))
}

async fn accept_loop(
    state: Arc<State>,
    tcp: TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    (max_connections, mut admission): (usize, admission::Admission),
    mut stopped: watch::Receiver<bool>,
) {
    let slots = Arc::new(Semaphore::new(max_connections));
    let mut conns = JoinSet::new();
    let mut refused: u64 = 0;
    loop {
        let permit = tokio::select! {
            _ = stopped.changed() => break,
            p = slots.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
        };
        let (stream, peer) = tokio::select! {
            _ = stopped.changed() => break,
            r = tcp.accept() => match r {
                // One spelling inside: an IPv4 client of the dual-stack listener is plain.
                Ok((stream, peer)) => (stream, crate::dualstack::canonical(peer)),
                Err(e) => {
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let ticket = match admission.admit(peer.ip()) {
            Ok(t) => t,
            Err(why) => {
                refused += 1;
                state.metrics.refusal(metrics::CONNECTION_LIMIT);
                // Logged now and then: a flood must not flood the log too.
                if refused.is_power_of_two() {
                    warn!(%peer, reason = %why, refused, "connection refused");
                }
                drop(stream);
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let (state, acceptor) = (state.clone(), acceptor.clone());
        conns.spawn(async move {
            state.metrics.open_connections.increment(1.0);
            handler::serve(state.clone(), acceptor, stream, peer, ticket).await;
            state.metrics.open_connections.decrement(1.0);
            drop(permit);
        });
        while conns.try_join_next().is_some() {}
    }
    conns.shutdown().await;
}
