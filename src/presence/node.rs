//! A node: one person's presence on the q2q network, the heir of Vertex's
//! `listenQ2Q`/`connectQ2Q`. It logs in to its home server with its certificate, listens for
//! services, and connects to other addresses, giving mutually authenticated streams.
//!
//! ```text
//!              control (AMP/TLS, logged in) ── home server ── other domains' servers
//!                       │ inbound, relay over TCP
//!  Node ── side channel ┤ who-am-i replies, probes, relayed datagrams (one UDP socket)
//!                       │
//!        Endpoint (PTCP driver) ── sessions ── streams ── TLS (q2q identities) ── app
//! ```
//!
//! A connection starts relayed and probes the peer's candidates at the same time; the first
//! authenticated probe or reply from a candidate moves the session to that direct path
//! without disturbing its streams. While relayed, a node keeps probing now and then.
//! While direct, each side watches the path: when it goes silent and stops answering
//! probes, or the peer's datagrams start coming through the relay, the session falls back
//! to the relay (streams only pause) and probing resumes. All of that is the session's path
//! machine ([`q2q_netstack::path`]), which the PTCP endpoint drives; the node only gives it
//! its set-up (`open_session`) and reads the path back for `status`.

use super::candidates;
use super::probe::Role;
use super::session::{PeerSession, StreamHeader, Verdict};
use super::table::{Lookup, Ready, Table};
use crate::address::{Q2qAddress, ServiceName};
use crate::amp::{AmpBox, Incoming};
use crate::client::{ClientError, ConnectOptions, Home, ServerConn, StoredIdentity};
use crate::proto::{self, code, command};
use crate::ptcp::{
    Endpoint, EndpointConfig, EndpointError, PathSetup, PtcpSession, PtcpStream, SessionId, Side,
};
use crate::relay;
use q2q_netstack::path::{NatFacts, RelayPath};
use q2q_netstack::wire::Kind;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};

/// Why connecting or listening failed.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(transparent)]
    Control(#[from] ClientError),
    #[error("PTCP: {0}")]
    Ptcp(#[from] EndpointError),
    #[error("cannot open the UDP socket: {0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Tls(String),
    #[error("the server sent an invalid answer: {0}")]
    BadAnswer(String),
    /// The peer refused a stream (not authorized, no such service), with its reason.
    #[error("{0}")]
    Refused(String),
    /// A stream's header or verdict did not arrive whole.
    #[error(transparent)]
    Header(#[from] super::session::HeaderError),
    /// The set-up of a session that several connections waited for failed.
    #[error(transparent)]
    Shared(Arc<NodeError>),
}

/// How a session's datagrams travel now, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathKind {
    Direct(SocketAddr),
    UdpRelay(SocketAddr),
    TcpRelay,
}

impl std::fmt::Display for PathKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PathKind::Direct(a) => write!(f, "direct {a}"),
            PathKind::UdpRelay(a) => write!(f, "UDP relay {a}"),
            PathKind::TcpRelay => write!(f, "TCP relay"),
        }
    }
}

impl From<q2q_netstack::path::Path> for PathKind {
    fn from(p: q2q_netstack::path::Path) -> PathKind {
        match p {
            q2q_netstack::path::Path::Direct { to, .. } => PathKind::Direct(to),
            q2q_netstack::path::Path::UdpRelay(a) => PathKind::UdpRelay(a),
            q2q_netstack::path::Path::ControlRelay => PathKind::TcpRelay,
        }
    }
}

/// A `std` duration as netstack's (microseconds).
fn duration(d: Duration) -> q2q_netstack::Duration {
    q2q_netstack::Duration::from_micros(d.as_micros().min(u128::from(u64::MAX)) as u64)
}

/// One peer session as `status` shows it.
#[derive(Debug, Clone)]
pub struct PeerStatus {
    pub peer: Q2qAddress,
    /// The service the session was set up for (its first stream).
    pub service: ServiceName,
    pub session: u64,
    pub path: PathKind,
    pub why: String,
    /// Streams open now (counted once a second).
    pub streams: usize,
    /// Streams opened so far on the session, by service, either direction.
    pub opened: Vec<(String, u64)>,
}

/// Who may use a service: default deny, an allow list.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    pub allowed: Vec<Q2qAddress>,
    /// Every authenticated address (only for harmless services such as `ping`).
    pub anyone: bool,
}

impl Policy {
    pub fn allow(peers: impl IntoIterator<Item = Q2qAddress>) -> Policy {
        Policy { allowed: peers.into_iter().collect(), anyone: false }
    }

    pub fn anyone() -> Policy {
        Policy { allowed: vec![], anyone: true }
    }

    pub fn permits(&self, who: &Q2qAddress) -> bool {
        self.anyone || self.allowed.contains(who)
    }
}

/// What [`Node::ping`] measured.
#[derive(Debug, Clone)]
pub struct PingReport {
    pub peer: Q2qAddress,
    /// From asking the server to an open stream.
    pub connect: Duration,
    pub rtts: Vec<Duration>,
    pub path: PathKind,
    pub why: String,
}

/// Settings of a node.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// Local address of the UDP socket (PTCP, who-am-i, probes, relay).
    pub bind: SocketAddr,
    /// Offer loopback host candidates (two nodes on one machine).
    pub include_loopback: bool,
    /// How to reach the home server.
    pub server: ConnectOptions,
    pub netstack: q2q_netstack::Config,
    /// How long to probe before settling for the relay.
    pub probe_for: Duration,
    /// While relayed, probe again this often.
    pub reprobe_every: Duration,
    /// Wait this long before the first probes (0: probe at once, with the relay).
    pub probe_after: Duration,
    /// Look for direct paths at all (false: relay only).
    pub direct: bool,
    /// Relay over the control connection even if UDP works (for tests and odd networks).
    pub tcp_relay_only: bool,
    /// A peer session with no stream for this long ends (default 60 s): a close
    /// message both sides honour. The next connection sets up a new one.
    pub session_idle: Duration,
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            bind: SocketAddr::from(([0, 0, 0, 0], 0)),
            include_loopback: false,
            server: ConnectOptions::default(),
            netstack: q2q_netstack::Config::default(),
            probe_for: Duration::from_secs(5),
            reprobe_every: Duration::from_secs(30),
            probe_after: Duration::ZERO,
            direct: true,
            tcp_relay_only: false,
            session_idle: Duration::from_secs(60),
        }
    }
}

/// An accepted stream of a listened service.
pub struct Accepted {
    /// The caller, as its certificate proved in the TLS handshake.
    pub peer: Q2qAddress,
    pub stream: PeerStream,
    pub session: Arc<PtcpSession>,
}

/// A stream between two q2q identities: TLS 1.3, both certificates verified, over PTCP.
pub type PeerStream = tokio_rustls::TlsStream<PtcpStream>;

/// A connection made by [`Node::connect`].
pub struct Connection {
    /// The callee, as its certificate proved in the TLS handshake.
    pub peer: Q2qAddress,
    pub stream: PeerStream,
    pub session: Arc<PtcpSession>,
}

struct Listening {
    policy: Policy,
    description: String,
    accepted: mpsc::Sender<Accepted>,
}

struct Inner {
    me: Q2qAddress,
    home: Home,
    identity: Arc<StoredIdentity>,
    config: NodeConfig,
    endpoint: Endpoint,
    /// The logged-in connection to the home server; replaced when the node logs back in.
    home_server: Mutex<Arc<ServerConn>>,
    /// Logged-in connections to other domains' servers: a slot per domain, each with its
    /// own lock, so that connecting to one domain never waits on another.
    foreign: tokio::sync::Mutex<HashMap<crate::address::Domain, ForeignSlot>>,
    listening: Mutex<HashMap<ServiceName, Listening>>,
    whoami: Mutex<HashMap<[u8; 8], oneshot::Sender<SocketAddr>>>,
    /// Each session's path as its endpoint driver shows it (for `status`).
    paths: Mutex<HashMap<u64, crate::ptcp::PathView>>,
    peers: Mutex<HashMap<u64, PeerStatus>>,
    reflexive_cache: Mutex<Option<(std::time::Instant, Option<SocketAddr>)>>,
    /// Our certificate and key for TLS on peer streams.
    tls_identity: crate::ptcp::tls::Identity,
    /// Callers refused by a service's policy (for programs that show it).
    refusals: tokio::sync::broadcast::Sender<(Q2qAddress, ServiceName)>,
    /// One session per peer, every stream on it.
    table: Table<NodeError>,
}

/// Datagrams of one TCP-relayed session waiting for the control connection; more are
/// dropped (selective repeat resends them).
const TCP_RELAY_QUEUE: usize = 256;

/// A new stream on a session older than a moment must be accepted within this long, or
/// the peer is taken to have forgotten the session (restarted) and a new one is set up.
const STREAM_OPEN_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a who-am-i answer (or its absence) is trusted.
const REFLEXIVE_FRESH: Duration = Duration::from_secs(20);

/// The connection to one other domain's server, once made.
type ForeignSlot = Arc<tokio::sync::Mutex<Option<Arc<ServerConn>>>>;

/// A logged-in presence.
#[derive(Clone)]
pub struct Node {
    inner: Arc<Inner>,
}

impl Node {
    /// Log in as `me` (whose identity is stored in `home`) and start serving.
    pub async fn start(
        home: Home,
        me: Q2qAddress,
        mut config: NodeConfig,
    ) -> Result<Node, NodeError> {
        let identity = Arc::new(home.identity(&me).map_err(ClientError::from)?);
        let tls_identity = {
            let bad = |e: crate::identity::CertError| {
                NodeError::Tls(format!("stored identity of {me}: {e}"))
            };
            let cert = crate::identity::cert_from_pem(&identity.cert_pem).map_err(bad)?;
            let key = crate::identity::key_from_pem(&identity.key_pem).map_err(bad)?;
            crate::ptcp::tls::Identity::new(vec![cert], key)
                .map_err(|e| NodeError::Tls(e.to_string()))?
        };
        if config.server.server.is_none() {
            config.server.server = identity.server.clone();
        }
        config.server.login = Some(identity.clone());
        let mut home_server = ServerConn::connect(&home, &me.domain, &config.server).await?;
        let incoming = home_server.incoming.take();
        let endpoint = Endpoint::bind(config.bind, EndpointConfig::default()).await?;
        let side = endpoint.take_side_channel();
        let inner = Arc::new(Inner {
            reflexive_cache: Default::default(),
            tls_identity,
            refusals: tokio::sync::broadcast::channel(16).0,
            table: Table::start(),
            me,
            home,
            identity,
            config,
            endpoint,
            home_server: Mutex::new(Arc::new(home_server)),
            foreign: Default::default(),
            listening: Default::default(),
            whoami: Default::default(),
            paths: Default::default(),
            peers: Default::default(),
        });
        let node = Node { inner };
        if let Some(side) = side {
            tokio::spawn(node.clone().side_loop(side));
        }
        if let Some(incoming) = incoming {
            tokio::spawn(node.clone().control_loop(incoming));
        }
        tokio::spawn(node.clone().stay_logged_in());
        // Learn the NAT mapping (or that UDP is blocked) before the first connection.
        node.reflexive().await;
        Ok(node)
    }

    /// The current connection to the home server.
    fn home(&self) -> Arc<ServerConn> {
        match self.inner.home_server.lock() {
            Ok(h) => h.clone(),
            Err(e) => e.into_inner().clone(),
        }
    }

    /// Keep the home connection alive: a ping every 25 s (below common NAT TCP and UDP
    /// timeouts), and when the connection ends, log back in (backing off from 1 s to 30 s)
    /// and listen again for every service. Established sessions are untouched: they need
    /// no server once set up.
    async fn stay_logged_in(self) {
        let mut backoff = Duration::from_secs(1);
        loop {
            let home = self.home();
            let handle = home.handle();
            tokio::select! {
                _ = handle.closed() => {}
                _ = tokio::time::sleep(Duration::from_secs(25)) => {
                    let _ = tokio::time::timeout(Duration::from_secs(10), home.peer_call(AmpBox::command(command::PING))).await;
                    // Also refresh the NAT's UDP mapping towards the server, and what we know of it.
                    let seen = self.ask_reflexive().await;
                    let before = self.inner.reflexive_cache.lock().ok().and_then(|mut c| {
                        c.replace((std::time::Instant::now(), seen)).map(|(_, r)| r)
                    });
                    // The network changed (a new NAT mapping or address): peers in session
                    // get our fresh candidates, and we theirs.
                    if before.is_some_and(|b| b != seen) && seen.is_some() {
                        info!(?before, now = ?seen, "our public address changed: refreshing sessions");
                        let node = self.clone();
                        tokio::spawn(async move { node.refresh_sessions().await });
                    }
                    continue;
                }
            }
            warn!(server = %home.server, "lost the connection to the home server; logging back in");
            loop {
                tokio::time::sleep(backoff).await;
                match ServerConn::connect(
                    &self.inner.home,
                    &self.inner.me.domain,
                    &self.inner.config.server,
                )
                .await
                {
                    Ok(mut conn) => {
                        let incoming = conn.incoming.take();
                        let conn = Arc::new(conn);
                        let services: Vec<(ServiceName, String)> = self
                            .inner
                            .listening
                            .lock()
                            .map(|l| {
                                l.iter().map(|(s, l)| (s.clone(), l.description.clone())).collect()
                            })
                            .unwrap_or_default();
                        for (service, description) in services {
                            let _ = conn
                                .peer_call(
                                    AmpBox::command(command::LISTEN)
                                        .with("service", service.as_str())
                                        .with("description", description),
                                )
                                .await;
                        }
                        if let Some(incoming) = incoming {
                            tokio::spawn(self.clone().control_loop(incoming));
                        }
                        if let Ok(mut h) = self.inner.home_server.lock() {
                            *h = conn;
                        }
                        info!("logged back in");
                        backoff = Duration::from_secs(1);
                        break;
                    }
                    Err(e) => {
                        debug!(error = %e, "log-in failed");
                        backoff = (backoff * 2).min(Duration::from_secs(30));
                    }
                }
            }
        }
    }

    pub fn address(&self) -> &Q2qAddress {
        &self.inner.me
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.inner.endpoint.local_addr()
    }

    /// The PTCP endpoint on the node's UDP socket (counters; fault injection in tests).
    pub fn endpoint(&self) -> &Endpoint {
        &self.inner.endpoint
    }

    /// Offer `service` to the peers `policy` allows; accepted streams arrive on the
    /// returned queue.
    pub async fn listen(
        &self,
        service: &ServiceName,
        description: &str,
        policy: Policy,
    ) -> Result<mpsc::Receiver<Accepted>, NodeError> {
        let (tx, rx) = mpsc::channel(64);
        self.inner.listening.lock().map_err(|_| NodeError::BadAnswer("lock".into()))?.insert(
            service.clone(),
            Listening { policy, description: description.to_string(), accepted: tx },
        );
        self.home()
            .peer_call(
                AmpBox::command(command::LISTEN)
                    .with("service", service.as_str())
                    .with("description", description),
            )
            .await?;
        Ok(rx)
    }

    /// Callers refused by a service's policy, as they happen.
    pub fn refusals(&self) -> tokio::sync::broadcast::Receiver<(Q2qAddress, ServiceName)> {
        self.inner.refusals.subscribe()
    }

    /// Stop offering `service`.
    pub async fn unlisten(&self, service: &ServiceName) -> Result<(), NodeError> {
        if let Ok(mut l) = self.inner.listening.lock() {
            l.remove(service);
        }
        self.home()
            .peer_call(AmpBox::command(command::UNLISTEN).with("service", service.as_str()))
            .await?;
        Ok(())
    }

    /// The services listened for now.
    pub fn listening(&self) -> Vec<ServiceName> {
        self.inner.listening.lock().map(|l| l.keys().cloned().collect()).unwrap_or_default()
    }

    /// The address the home server sees this node's UDP socket as (its NAT mapping).
    pub async fn reflexive(&self) -> Option<SocketAddr> {
        if self.inner.config.tcp_relay_only {
            return None;
        }
        // Asked recently: the answer (or the silence of blocked UDP) is still good, and a
        // connection should not wait 2 s for a who-am-i timeout each time.
        if let Ok(c) = self.inner.reflexive_cache.lock()
            && let Some((at, seen)) = *c
            && at.elapsed() < REFLEXIVE_FRESH
        {
            return seen;
        }
        let seen = self.ask_reflexive().await;
        if let Ok(mut c) = self.inner.reflexive_cache.lock() {
            *c = Some((std::time::Instant::now(), seen));
        }
        seen
    }

    async fn ask_reflexive(&self) -> Option<SocketAddr> {
        let server = self.home_udp().await?;
        let nonce: [u8; 8] = rand::random();
        let (tx, rx) = oneshot::channel();
        self.inner.whoami.lock().ok()?.insert(nonce, tx);
        let request = crate::proto::whoami::request(nonce).to_vec();
        let mut rx = rx;
        for _ in 0..3 {
            self.inner.endpoint.send_datagram(server, request.clone()).await.ok()?;
            match tokio::time::timeout(Duration::from_millis(700), &mut rx).await {
                Ok(Ok(seen)) => return Some(seen),
                Ok(Err(_)) => return None,
                Err(_) => continue,
            }
        }
        if let Ok(mut w) = self.inner.whoami.lock() {
            w.remove(&nonce);
        }
        None
    }

    async fn home_udp(&self) -> Option<SocketAddr> {
        tokio::net::lookup_host(self.home().server.as_str()).await.ok()?.next()
    }

    /// Probes and probe replies this node sent so far, over all sessions: bounded per
    /// session, and zero for relay-only sessions.
    pub fn probes_sent(&self) -> u64 {
        self.inner.endpoint.stats().probes.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Peer sessions and their paths.
    pub fn status(&self) -> Vec<PeerStatus> {
        let mut v: Vec<_> =
            self.inner.peers.lock().map(|p| p.values().cloned().collect()).unwrap_or_default();
        if let Ok(paths) = self.inner.paths.lock() {
            for p in &mut v {
                if let Some((path, why)) = paths.get(&p.session).map(|v| v.get()) {
                    p.path = PathKind::from(path);
                    p.why = why;
                }
            }
        }
        v.sort_by_key(|p| p.session);
        v
    }

    /// Offer the built-in `ping` service (an echo of 8-byte probes) to every authenticated
    /// address: it tells no more than presence does.
    pub async fn serve_ping(&self) -> Result<(), NodeError> {
        let mut accepted = self.listen(&ping_service(), "q2q ping", Policy::anyone()).await?;
        tokio::spawn(async move {
            while let Some(a) = accepted.recv().await {
                tokio::spawn(async move {
                    use tokio::io::{AsyncReadExt, AsyncWriteExt};
                    let mut s = a.stream;
                    let mut buf = [0u8; 8];
                    // At most 10 000 echoes per stream: every loop is bounded.
                    for _ in 0..10_000 {
                        if s.read_exact(&mut buf).await.is_err() || s.write_all(&buf).await.is_err()
                        {
                            break;
                        }
                    }
                });
            }
        });
        Ok(())
    }

    /// Connect to `to`'s `ping` service and time `count` round trips, `interval` apart.
    pub async fn ping(
        &self,
        to: &Q2qAddress,
        count: u32,
        interval: Duration,
    ) -> Result<PingReport, NodeError> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let start = std::time::Instant::now();
        let conn = self.connect(to, &ping_service()).await?;
        let connect = start.elapsed();
        let mut s = conn.stream;
        let mut rtts = Vec::new();
        for i in 0..count.min(10_000) {
            if i > 0 {
                tokio::time::sleep(interval).await;
            }
            let t = std::time::Instant::now();
            let mut buf = u64::from(i).to_be_bytes();
            s.write_all(&buf).await?;
            tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut buf)).await.map_err(
                |_| {
                    NodeError::Io(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "no echo within 10 s",
                    ))
                },
            )??;
            rtts.push(t.elapsed());
        }
        let _ = s.shutdown().await;
        let id = conn.session.id().0;
        let (path, why) = self
            .status()
            .into_iter()
            .find(|p| p.session == id)
            .map(|p| (p.path, p.why))
            .unwrap_or((PathKind::TcpRelay, String::new()));
        Ok(PingReport { peer: to.clone(), connect, rtts, path, why })
    }

    /// Connect to `to`'s `service`. The first connection to a peer sets up the peer
    /// session through `to`'s domain server (relayed at first, direct as soon as a hole is
    /// punched); every later one, to any service, is a new stream in that session: no
    /// server round trip, no new punching. A burst of connections sets up one session.
    pub async fn connect(
        &self,
        to: &Q2qAddress,
        service: &ServiceName,
    ) -> Result<Connection, NodeError> {
        let mut last = None;
        // A session that ended meanwhile (closed idle, lost, the peer restarted) is set up
        // anew: at most twice.
        for _ in 0..3 {
            let ps = self.session_to(to, service).await?;
            // A stream on a session that answers nothing within this long: the peer
            // forgot it (restarted); a fresh session is set up.
            let limit = if ps.started.elapsed() < Duration::from_secs(2) {
                Duration::from_secs(10)
            } else {
                STREAM_OPEN_TIMEOUT
            };
            match tokio::time::timeout(limit, self.open_on(&ps, service)).await {
                Ok(Ok(stream)) => {
                    return Ok(Connection { peer: to.clone(), stream, session: ps.ptcp.clone() });
                }
                Ok(Err(e)) if !ps.ended() && !matches!(e, NodeError::Ptcp(_)) => return Err(e),
                Ok(Err(e)) => last = Some(e),
                Err(_) => {
                    last = Some(NodeError::Io(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("{to} did not answer a new stream within {} s", limit.as_secs()),
                    )))
                }
            }
            self.end_session(&ps, "a new stream could not be opened on it").await;
        }
        Err(last.unwrap_or(NodeError::Ptcp(EndpointError::Closed)))
    }

    /// Open a stream of `service` on `ps`: TLS between the two certificates, the header
    /// naming the service, and the peer's verdict.
    async fn open_on(
        &self,
        ps: &Arc<PeerSession>,
        service: &ServiceName,
    ) -> Result<PeerStream, NodeError> {
        match self.exchange(ps, &StreamHeader::Service(service.clone())).await? {
            (tls, Verdict::Accepted) => {
                ps.note_opened(service);
                Ok(tls.into())
            }
            (_, Verdict::Refused(why)) => Err(NodeError::Refused(why)),
        }
    }

    /// Open a stream on `ps`, prove both identities (TLS 1.3, end to end: the server
    /// vouched for nobody), send `header`, and read the peer's verdict.
    async fn exchange(
        &self,
        ps: &Arc<PeerSession>,
        header: &StreamHeader,
    ) -> Result<(tokio_rustls::client::TlsStream<PtcpStream>, Verdict), NodeError> {
        use tokio::io::AsyncWriteExt;
        let stream = ps.ptcp.open_stream().await?;
        let mut tls = crate::ptcp::tls::connect(
            stream,
            &self.inner.tls_identity,
            &ps.peer,
            ps.ca.clone(),
            crate::ptcp::tls::no_revocation(),
        )
        .await
        .map_err(|e| NodeError::Tls(format!("{}: {e}", ps.peer)))?;
        tls.write_all(&header.encode()).await?;
        tls.flush().await?;
        let verdict = Verdict::read(&mut tls).await?;
        Ok((tls, verdict))
    }

    /// The live session with `to`, set up if there is none (one set-up for any number of
    /// callers; see [`Table`]).
    async fn session_to(
        &self,
        to: &Q2qAddress,
        service: &ServiceName,
    ) -> Result<Arc<PeerSession>, NodeError> {
        for _ in 0..4 {
            let wait = match self.inner.table.lookup(to, service).await {
                None => return Err(NodeError::Ptcp(EndpointError::Closed)),
                Some(Lookup::Live(s)) => return Ok(s),
                Some(Lookup::Wait(rx)) => rx,
                Some(Lookup::SetUp(rx)) => {
                    // On a task of its own: it finishes (and is reported) even if this
                    // caller gives up, so nobody waits for it forever.
                    let (node, to, service) = (self.clone(), to.clone(), service.clone());
                    tokio::spawn(async move {
                        let result = node.set_up(&to, &service).await.map_err(|e| {
                            let refused = e.refuses_service();
                            (Arc::new(e), refused)
                        });
                        node.inner.table.done(to, service, result).await;
                    });
                    rx
                }
            };
            match wait.await {
                Ok(Ready::Session(s)) => return Ok(s),
                Ok(Ready::Failed(e)) => return Err(NodeError::Shared(e)),
                Ok(Ready::Retry) | Err(_) => continue,
            }
        }
        Err(NodeError::BadAnswer(format!("no session with {to} could be set up")))
    }

    /// Set up a session with `to` through its domain server, for a first stream of
    /// `service` (the callee consents to that service, or refuses at once).
    async fn set_up(
        &self,
        to: &Q2qAddress,
        service: &ServiceName,
    ) -> Result<Arc<PeerSession>, NodeError> {
        let server = self.server_for(&to.domain).await?;
        let reflexive = self.reflexive().await;
        let mine = candidates::gather(
            self.local_addr().port(),
            reflexive,
            self.inner.config.include_loopback,
        );
        let answer = server
            .peer_call(
                AmpBox::command(command::INBOUND)
                    .with("to", to.to_string())
                    .with("service", service.as_str())
                    .with("candidates", proto::format_candidates(&mine)),
            )
            .await?;
        let setup = Setup::parse(&answer, server.server.as_str()).await?;
        // No candidates: the callee keeps this session relayed (we are a stranger to it).
        let relay_only = setup.candidates.is_empty();
        let session = self
            .open_session(
                &setup,
                Role::Caller,
                to,
                service,
                &server,
                reflexive.is_some(),
                !relay_only,
            )
            .await?;
        let ps = Arc::new(PeerSession::new(to.clone(), session, server.ca.clone(), relay_only));
        self.serve_session(&ps);
        Ok(ps)
    }

    /// Run a session's accept loop (streams the peer opens, each checked against our
    /// policies) and its keeper (stream counts for `status`, the idle close).
    fn serve_session(&self, ps: &Arc<PeerSession>) {
        let accept = tokio::spawn(self.clone().accept_loop(ps.clone()));
        ps.own_task(accept.abort_handle());
        let keep = tokio::spawn(self.clone().keep_session(ps.clone()));
        ps.own_task(keep.abort_handle());
    }

    async fn accept_loop(self, ps: Arc<PeerSession>) {
        let trust: Arc<dyn crate::ptcp::tls::Trust> = Arc::new(
            crate::ptcp::tls::TrustMap::new().with_ca(ps.peer.domain.clone(), ps.ca.clone()),
        );
        loop {
            let stream = match ps.ptcp.accept().await {
                Ok(s) => s,
                Err(e) => {
                    debug!(peer = %ps.peer, error = %e, "session ended");
                    return self.end_session(&ps, "lost").await;
                }
            };
            tokio::spawn(self.clone().accept_stream(ps.clone(), stream, trust.clone()));
        }
    }

    /// One stream the peer opened: its TLS must prove the session's peer; its header names
    /// a service the peer is authorized for (or asks to close the session).
    async fn accept_stream(
        self,
        ps: Arc<PeerSession>,
        stream: PtcpStream,
        trust: Arc<dyn crate::ptcp::tls::Trust>,
    ) {
        let handshake = async {
            let (mut tls, caller) =
                crate::ptcp::tls::accept(stream, &self.inner.tls_identity, trust).await?;
            let header = StreamHeader::read(&mut tls)
                .await
                .map_err(|e| crate::ptcp::tls::TlsError::Io(std::io::Error::other(e)))?;
            Ok::<_, crate::ptcp::tls::TlsError>((tls, caller, header))
        };
        let (mut tls, caller, header) =
            match tokio::time::timeout(Duration::from_secs(10), handshake).await {
                Ok(Ok(x)) => x,
                Ok(Err(e)) => {
                    return warn!(peer = %ps.peer, error = %e, "refused a stream: TLS failed");
                }
                Err(_) => return debug!(peer = %ps.peer, "a stream's handshake timed out"),
            };
        if caller != ps.peer {
            return warn!(%caller, session_peer = %ps.peer, "refused a stream: not the session's peer");
        }
        let me = &self.inner.me;
        let service = match header {
            StreamHeader::Leaving => {
                let _ = Verdict::Accepted.send(&mut tls).await;
                ps.ptcp.abort().await;
                return self.end_session(&ps, "the peer went offline").await;
            }
            StreamHeader::Close => {
                ps.closing(true);
                let busy = ps.count_streams().await.unwrap_or(0) > 0;
                let verdict = if busy {
                    Verdict::Refused("streams are open".into())
                } else {
                    Verdict::Accepted
                };
                let _ = verdict.send(&mut tls).await;
                ps.closing(false);
                if !busy {
                    self.end_session(&ps, "closed by the peer (idle)").await;
                }
                return;
            }
            StreamHeader::Service(s) => s,
        };
        let target = {
            let Ok(l) = self.inner.listening.lock() else { return };
            match l.get(&service) {
                None => Err(format!("{me} does not offer service {service}")),
                Some(l) if !l.policy.permits(&caller) => {
                    Err(format!("{caller} is not authorized for {service} of {me}"))
                }
                Some(l) => Ok(l.accepted.clone()),
            }
        };
        match target {
            Ok(accepted) => {
                if Verdict::Accepted.send(&mut tls).await.is_err() {
                    return;
                }
                ps.note_opened(&service);
                let a = Accepted { peer: caller, stream: tls.into(), session: ps.ptcp.clone() };
                let _ = accepted.send(a).await;
            }
            Err(why) => {
                info!(peer = %caller, %service, why, "refused a stream");
                if why.contains("not authorized") {
                    let _ = self.inner.refusals.send((caller, service));
                }
                let _ = Verdict::Refused(why).send(&mut tls).await;
            }
        }
    }

    /// Count the session's streams once a second (for `status`), and end it when it has
    /// had none for [`NodeConfig::session_idle`]: ask the peer to close, and forget it.
    async fn keep_session(self, ps: Arc<PeerSession>) {
        let idle = self.inner.config.session_idle;
        let mut idle_since = tokio::time::Instant::now();
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let Some(open) = ps.count_streams().await else {
                return self.end_session(&ps, "lost").await;
            };
            if let Ok(mut peers) = self.inner.peers.lock()
                && let Some(p) = peers.get_mut(&ps.id())
            {
                p.streams = open;
                p.opened = ps.opened();
            }
            if open > 0 {
                idle_since = tokio::time::Instant::now();
                continue;
            }
            if idle_since.elapsed() < idle {
                continue;
            }
            match tokio::time::timeout(
                Duration::from_secs(5),
                self.ask_close(&ps, StreamHeader::Close),
            )
            .await
            {
                // Busy: the peer opened a stream meanwhile.
                Ok(Ok(false)) => idle_since = tokio::time::Instant::now(),
                // Agreed, or no answer: the peer will time out or close on its own.
                _ => return self.end_session(&ps, "idle").await,
            }
        }
    }

    /// Ask the peer to end the session (`Close` or `Leaving`): `true` if it agreed.
    async fn ask_close(
        &self,
        ps: &Arc<PeerSession>,
        header: StreamHeader,
    ) -> Result<bool, NodeError> {
        ps.closing(true);
        let result = self.exchange(ps, &header).await.map(|(_, v)| v == Verdict::Accepted);
        ps.closing(false);
        result
    }

    /// Going offline: tell every peer in session (at most 1 s each, side by side), so
    /// their streams end now and their next connection learns from the server that we
    /// are offline, instead of waiting on a silent session.
    pub async fn leave(&self) {
        let sessions = self.inner.table.list().await;
        let mut told = tokio::task::JoinSet::new();
        for ps in sessions {
            let node = self.clone();
            told.spawn(async move {
                let _ = tokio::time::timeout(
                    Duration::from_secs(1),
                    node.ask_close(&ps, StreamHeader::Leaving),
                )
                .await;
                node.end_session(&ps, "we went offline").await;
            });
        }
        while told.join_next().await.is_some() {}
    }

    /// Forget a session: out of the table, its path machinery stopped, its tasks ended.
    /// Its open streams (if any) live on until they close.
    async fn end_session(&self, ps: &Arc<PeerSession>, why: &str) {
        if !ps.mark_ended() {
            return;
        }
        let id = ps.id();
        info!(peer = %ps.peer, session = format!("{id:016x}"), why, "session ended");
        self.inner.table.remove(&ps.peer, id).await;
        if let Ok(mut p) = self.inner.paths.lock() {
            p.remove(&id);
        }
        if let Ok(mut p) = self.inner.peers.lock() {
            p.remove(&id);
        }
        ps.stop_tasks();
    }

    /// The CA of `domain`: our own domain's (pinned when we logged in), or another
    /// domain's, pinned on first contact with its server.
    async fn ca_for(
        &self,
        domain: &crate::address::Domain,
    ) -> Result<rustls_pki_types::CertificateDer<'static>, NodeError> {
        if *domain == self.inner.me.domain {
            return Ok(self.home().ca.clone());
        }
        if let Some(ca) = self.inner.home.pinned_ca(domain).map_err(ClientError::from)? {
            return Ok(ca);
        }
        Ok(self.server_for(domain).await?.ca.clone())
    }

    async fn server_for(
        &self,
        domain: &crate::address::Domain,
    ) -> Result<Arc<ServerConn>, NodeError> {
        if *domain == self.inner.me.domain {
            return Ok(self.home());
        }
        // One connect at a time per domain, and a slow or unreachable domain holds up no
        // other: the map's lock is held only to find the domain's slot.
        let slot = self.inner.foreign.lock().await.entry(domain.clone()).or_default().clone();
        let mut slot = slot.lock().await;
        if let Some(c) = slot.as_ref()
            && !c.handle().is_closed()
        {
            return Ok(c.clone());
        }
        let opts =
            ConnectOptions { login: Some(self.inner.identity.clone()), ..Default::default() };
        let mut conn = ServerConn::connect(&self.inner.home, domain, &opts).await?;
        if let Some(incoming) = conn.incoming.take() {
            tokio::spawn(self.clone().control_loop(incoming));
        }
        let conn = Arc::new(conn);
        *slot = Some(conn.clone());
        Ok(conn)
    }

    /// Create the session of `setup`, bind the relay, and start probing.
    #[allow(clippy::too_many_arguments)]
    async fn open_session(
        &self,
        setup: &Setup,
        role: Role,
        peer: &Q2qAddress,
        service: &ServiceName,
        server: &Arc<ServerConn>,
        udp_ok: bool,
        probe: bool,
    ) -> Result<Arc<PtcpSession>, NodeError> {
        let side = match role {
            Role::Caller => Side::Initiator,
            Role::Callee => Side::Responder,
        };
        let leg = Arc::new(relay::Leg::new(setup.relay_token, setup.relay_key.clone()));
        // Without UDP to the server (who-am-i got no answer), relay over the control
        // connection instead.
        let (relay_path, control) = if udp_ok {
            (RelayPath::Udp(setup.relay), None)
        } else {
            (RelayPath::Control, Some(Self::tcp_relay(server.clone(), setup.relay_token)))
        };
        let setup_paths = self.path_setup(setup, role, relay_path, probe);
        let config = &self.inner.config;
        let paths = PathSetup {
            setup: setup_paths,
            config: q2q_netstack::path::Config {
                probe_for: duration(config.probe_for),
                reprobe_every: duration(config.reprobe_every),
                probe_after: duration(config.probe_after),
                ..Default::default()
            },
            leg,
            control,
        };
        let session = self
            .inner
            .endpoint
            .new_session_with_paths(
                SessionId(setup.session),
                side,
                self.inner.config.netstack.clone(),
                paths,
            )
            .await?;
        // Bind our end of the relay over TCP as well, in case UDP is blocked (the endpoint
        // binds it over UDP).
        let _ = server
            .peer_tell(
                AmpBox::command(command::RELAY)
                    .with("token", hex::encode(setup.relay_token))
                    .with("data", ""),
            )
            .await;
        let (path, why) = session.path().unwrap_or((relay_path.into(), String::new()));
        if let Some(view) = session.path_view()
            && let Ok(mut p) = self.inner.paths.lock()
        {
            p.insert(setup.session, view);
        }
        if let Ok(mut p) = self.inner.peers.lock() {
            p.insert(
                setup.session,
                PeerStatus {
                    peer: peer.clone(),
                    service: service.clone(),
                    session: setup.session,
                    streams: 0,
                    opened: Vec::new(),
                    why,
                    path: PathKind::from(path),
                },
            );
        }
        Ok(Arc::new(session))
    }

    /// What the path machine of the session of `setup` starts from. Probes go only to the
    /// peer's candidates at the address the server saw it at, or on our own networks
    /// (never a third party's); birthday probing only towards the server-observed IP.
    fn path_setup(
        &self,
        setup: &Setup,
        role: Role,
        relay: RelayPath,
        probe: bool,
    ) -> q2q_netstack::path::Setup {
        // Appended, so the order the NAT facts read stays as the peer sent it.
        let mut all = setup.candidates.clone();
        if let Some(guess) = candidates::predicted(&all) {
            all.push(guess);
        }
        let local = candidates::local_networks(self.inner.config.include_loopback);
        let direct_allowed = probe && self.inner.config.direct;
        // Even when direct paths are not allowed (they then only tell `why` apart).
        let targets = candidates::probeable(&all, setup.peer_seen, &local);
        if targets.len() < all.len() && direct_allowed {
            debug!(
                session = format!("{:016x}", setup.session),
                dropped = all.len() - targets.len(),
                "candidates the server did not see are not probed"
            );
        }
        let mine = self.inner.reflexive_cache.lock().ok().and_then(|c| c.and_then(|(_, r)| r));
        let nat = NatFacts {
            mine,
            my_port: self.local_addr().port(),
            peer: setup.candidates.first().copied(),
            peer_port: setup.candidates.get(1).map(|c| c.port()),
            peer_seen: setup.peer_seen,
        };
        q2q_netstack::path::Setup {
            session: setup.session,
            role,
            key: setup.probe_key,
            relay,
            candidates: targets,
            nat,
            direct_allowed,
            seed: rand::random(),
        }
    }

    /// The TCP relay of one session: the endpoint hands its datagrams to the channel
    /// returned ([`Path::Channel`]) and a task frames them as AMP `relay` calls on `server`'s
    /// control connection, under `token`. The task ends with the channel's last sender.
    fn tcp_relay(server: Arc<ServerConn>, token: relay::Token) -> mpsc::Sender<Vec<u8>> {
        let (tx, mut rx) = mpsc::channel::<Vec<u8>>(TCP_RELAY_QUEUE);
        tokio::spawn(async move {
            while let Some(inner) = rx.recv().await {
                let b = AmpBox::command(command::RELAY)
                    .with("token", hex::encode(token))
                    .with("data", inner);
                let _ = server.peer_tell(b).await;
            }
        });
        tx
    }

    /// Datagrams of other kinds than PTCP on our socket.
    async fn side_loop(self, mut side: mpsc::Receiver<crate::ptcp::SideDatagram>) {
        while let Some(d) = side.recv().await {
            match d.kind {
                Kind::WhoAmIReply => {
                    if let Ok((nonce, seen)) = proto::whoami::parse_reply(&d.data)
                        && let Some(tx) =
                            self.inner.whoami.lock().ok().and_then(|mut w| w.remove(&nonce))
                    {
                        let _ = tx.send(seen);
                    }
                }
                // Probes and relayed datagrams of our sessions are the endpoint's (their
                // path machines); these belong to no session.
                _ => debug!(from = %d.from, kind = ?d.kind, "ignored datagram"),
            }
        }
    }

    /// Requests from a server: `inbound` (someone wants one of our services) and relayed
    /// datagrams over TCP.
    // A named, boxed future: `inbound` can reach `server_for`, which starts another control
    // loop, and an opaque recursive future cannot be proven `Send`.
    fn control_loop(
        self,
        mut incoming: mpsc::Receiver<Incoming>,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
        Box::pin(async move {
            while let Some(req) = incoming.recv().await {
                match req.command() {
                    command::RELAY => {
                        let data = req.request.get("data").unwrap_or_default().to_vec();
                        if !data.is_empty() {
                            let _ = self.inner.endpoint.inject_relayed(data).await;
                        }
                        req.respond(Ok(AmpBox::new())).await;
                    }
                    command::INBOUND => {
                        let node = self.clone();
                        tokio::spawn(async move {
                            let result = node.inbound(&req.request).await;
                            req.respond(result).await;
                        });
                    }
                    command::CANDIDATES => {
                        let node = self.clone();
                        tokio::spawn(async move {
                            let result = node.peer_candidates(&req.request).await;
                            req.respond(result).await;
                        });
                    }
                    other => {
                        let other = other.to_string();
                        req.respond(Err((
                            code::UNHANDLED.into(),
                            format!("unknown command `{other}`"),
                        )))
                        .await;
                    }
                }
            }
            warn!("control connection to the server ended");
        })
    }

    /// A peer in session sends fresh candidates (its network changed): search them, at
    /// most where the server saw it or on our own networks, and answer ours. Only for a
    /// live session with exactly that peer and id that is not relay-only.
    async fn peer_candidates(&self, b: &AmpBox) -> Result<AmpBox, (String, String)> {
        let bad = |why: &str| (code::BAD_REQUEST.to_string(), why.to_string());
        let from = b
            .get_str("from")
            .and_then(|f| Q2qAddress::parse(f).ok())
            .ok_or_else(|| bad("bad `from`"))?;
        let id = b
            .get_str("session")
            .and_then(|s| u64::from_str_radix(s, 16).ok())
            .ok_or_else(|| bad("bad `session`"))?;
        let theirs =
            proto::parse_candidates(b.get_str("candidates").unwrap_or("")).map_err(|e| bad(&e))?;
        let seen = b.get_str("peer_seen").and_then(|s| s.parse().ok());
        let ps = self
            .inner
            .table
            .list()
            .await
            .into_iter()
            .find(|s| s.peer == from && s.id() == id && !s.relay_only)
            .ok_or_else(|| {
                (code::NOT_AUTHORIZED.to_string(), format!("no session {id:016x} with {from}"))
            })?;
        self.take_candidates(&ps, &theirs, seen).await;
        Ok(AmpBox::new().with("candidates", proto::format_candidates(&self.candidates().await)))
    }

    /// Our candidates now: the reflexive address first, then host ones.
    async fn candidates(&self) -> Vec<SocketAddr> {
        let reflexive = self.reflexive().await;
        candidates::gather(self.local_addr().port(), reflexive, self.inner.config.include_loopback)
    }

    /// Hand a peer's fresh candidates to its session's path machine: only those at the IP
    /// the server saw it at (`seen`) or on our own networks.
    async fn take_candidates(
        &self,
        ps: &PeerSession,
        theirs: &[SocketAddr],
        seen: Option<std::net::IpAddr>,
    ) {
        let mut all = theirs.to_vec();
        if let Some(guess) = candidates::predicted(&all) {
            all.push(guess);
        }
        let local = candidates::local_networks(self.inner.config.include_loopback);
        let targets = candidates::probeable(&all, seen, &local);
        info!(peer = %ps.peer, candidates = targets.len(), "fresh candidates from the peer");
        ps.ptcp.update_candidates(targets).await;
    }

    /// After a network change: give every peer in session our fresh candidates through the
    /// server where it is logged in, and search the ones it answers with. Returns how many
    /// sessions were refreshed. Relay-only sessions are left alone.
    pub async fn refresh_sessions(&self) -> usize {
        let mine = proto::format_candidates(&self.candidates().await);
        let mut done = 0;
        for ps in self.inner.table.list().await {
            if ps.relay_only {
                continue;
            }
            let asked = async {
                let server = self.server_for(&ps.peer.domain).await?;
                let answer = server
                    .peer_call(
                        AmpBox::command(command::CANDIDATES)
                            .with("to", ps.peer.to_string())
                            .with("session", format!("{:016x}", ps.id()))
                            .with("candidates", mine.as_str()),
                    )
                    .await?;
                Ok::<_, NodeError>(answer)
            };
            match tokio::time::timeout(Duration::from_secs(10), asked).await {
                Ok(Ok(answer)) => {
                    let theirs =
                        proto::parse_candidates(answer.get_str("candidates").unwrap_or(""))
                            .unwrap_or_default();
                    let seen = answer.get_str("peer_seen").and_then(|s| s.parse().ok());
                    self.take_candidates(&ps, &theirs, seen).await;
                    done += 1;
                }
                Ok(Err(e)) => debug!(peer = %ps.peer, error = %e, "fresh candidates refused"),
                Err(_) => debug!(peer = %ps.peer, "fresh candidates: no answer"),
            }
        }
        done
    }

    /// Someone asks for one of our services (their first stream): default deny unless the
    /// policy names them. A caller authorized for none of our services by name (a
    /// stranger calling `ping`, which anyone may use) gets a relay-only session: no
    /// candidates revealed, no probes sent.
    async fn inbound(&self, b: &AmpBox) -> Result<AmpBox, (String, String)> {
        let bad = |why: &str| (code::BAD_REQUEST.to_string(), why.to_string());
        let from = b
            .get_str("from")
            .and_then(|f| Q2qAddress::parse(f).ok())
            .ok_or_else(|| bad("bad `from`"))?;
        let service = b
            .get_str("service")
            .and_then(|s| ServiceName::parse(s).ok())
            .ok_or_else(|| bad("bad `service`"))?;
        let relay_only = {
            let l = self.inner.listening.lock().map_err(|_| bad("lock"))?;
            match l.get(&service) {
                None => {
                    return Err((
                        code::NO_SUCH_SERVICE.into(),
                        format!("{} does not offer service {service}", self.inner.me),
                    ));
                }
                Some(l) if !l.policy.permits(&from) => {
                    info!(%from, %service, "refused: not authorized");
                    let _ = self.inner.refusals.send((from.clone(), service.clone()));
                    return Err((
                        code::NOT_AUTHORIZED.into(),
                        format!("{from} is not authorized for {service} of {}", self.inner.me),
                    ));
                }
                Some(_) => !l.values().any(|l| l.policy.allowed.contains(&from)),
            }
        };
        let setup =
            Setup::parse(b, self.home().server.as_str()).await.map_err(|e| bad(&e.to_string()))?;
        let caller_ca = self.ca_for(&from.domain).await.map_err(|e| {
            (code::NOT_AUTHORIZED.to_string(), format!("cannot verify {from}: {e}"))
        })?;
        let reflexive = self.reflexive().await;
        let mine = if relay_only {
            Vec::new()
        } else {
            candidates::gather(
                self.local_addr().port(),
                reflexive,
                self.inner.config.include_loopback,
            )
        };
        let home = self.home();
        let session = self
            .open_session(
                &setup,
                Role::Callee,
                &from,
                &service,
                &home,
                reflexive.is_some(),
                !relay_only,
            )
            .await
            .map_err(|e| (code::INTERNAL.to_string(), e.to_string()))?;
        if relay_only {
            info!(%from, %service, "a caller authorized for no service by name: relay only");
        }
        let ps = Arc::new(PeerSession::new(from, session, caller_ca, relay_only));
        self.serve_session(&ps);
        self.inner.table.insert(ps).await;
        Ok(AmpBox::new().with("candidates", proto::format_candidates(&mine)))
    }
}

impl NodeError {
    /// The peer (or its server) refused the service asked for: another may be granted.
    fn refuses_service(&self) -> bool {
        match self {
            NodeError::Control(e) => {
                matches!(e.code(), Some(code::NOT_AUTHORIZED | code::NO_SUCH_SERVICE))
            }
            NodeError::Shared(e) => e.refuses_service(),
            _ => false,
        }
    }
}

/// What the server's `inbound` box says about a session.
struct Setup {
    session: u64,
    probe_key: [u8; 16],
    relay_token: relay::Token,
    relay_key: relay::Key,
    relay: SocketAddr,
    candidates: Vec<SocketAddr>,
    /// The IP the server saw the peer's control connection come from.
    peer_seen: Option<std::net::IpAddr>,
}

impl Setup {
    /// Parse an `inbound` answer (caller) or request (callee); the relay is the server at
    /// `server` (host:port of the control connection) on `relay_port`.
    async fn parse(b: &AmpBox, server: &str) -> Result<Setup, NodeError> {
        let bad = |what: &str| NodeError::BadAnswer(format!("`{what}` missing or malformed"));
        let session = b
            .get_str("session")
            .and_then(|s| u64::from_str_radix(s, 16).ok())
            .ok_or_else(|| bad("session"))?;
        let probe_key = b
            .get_str("probe_key")
            .and_then(|k| hex::decode(k).ok())
            .and_then(|k| k.try_into().ok())
            .ok_or_else(|| bad("probe_key"))?;
        let relay_token = b
            .get_str("relay_token")
            .and_then(|k| hex::decode(k).ok())
            .and_then(|k| k.try_into().ok())
            .ok_or_else(|| bad("relay_token"))?;
        let relay_key = b
            .get_str("relay_key")
            .and_then(relay::Key::from_hex)
            .ok_or_else(|| bad("relay_key"))?;
        let port: u16 = b
            .get_str("relay_port")
            .and_then(|p| p.parse().ok())
            .ok_or_else(|| bad("relay_port"))?;
        let candidates = proto::parse_candidates(b.get_str("candidates").unwrap_or(""))
            .map_err(NodeError::BadAnswer)?;
        let host =
            tokio::net::lookup_host(server).await?.next().ok_or_else(|| bad("server address"))?;
        Ok(Setup {
            session,
            probe_key,
            relay_token,
            relay_key,
            relay: SocketAddr::new(host.ip(), port),
            candidates,
            peer_seen: b.get_str("peer_seen").and_then(|s| s.parse().ok()),
        })
    }
}

impl Node {
    /// Whether `who` is registered, asked of `who`'s domain server (for the `*.q2q`
    /// resolver: unknown users get NXDOMAIN).
    pub async fn exists(&self, who: &Q2qAddress) -> Result<bool, NodeError> {
        let server = self.server_for(&who.domain).await?;
        let answer = server
            .peer_call(AmpBox::command(command::EXISTS).with("address", who.to_string()))
            .await?;
        Ok(answer.get_str("exists") == Some("true"))
    }
}

/// The built-in echo service `q2q-tun ping` talks to.
pub fn ping_service() -> ServiceName {
    ServiceName::parse("ping").expect("`ping` is a valid service name")
}
