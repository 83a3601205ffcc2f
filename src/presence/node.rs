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
//!
//! The node renews its own certificate two thirds into its lifetime (`renewal`), over the
//! logged-in home connection, and swaps it in: everything reads our identity through
//! `Node::stored_identity` and `Node::tls_identity`, never a copy.

use super::candidates;
use super::probe::Role;
use super::session::{PeerSession, StreamHeader, Traffic, Verdict};
use super::table::{GetError, ServerTable, SessionTable};
use crate::address::{Q2qAddress, ServiceName};
use crate::amp::Incoming;
use crate::client::{ClientError, ConnectOptions, Home, ServerConn, StoredIdentity};
use crate::proto::commands::{self as cmd, Command, Message};
use crate::proto::{self, ErrorCode, Refusal};
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
use tracing::{debug, error, info, warn};

mod consent;
mod renewal;
mod revocation;
mod servers;
mod streams;

pub use renewal::CertificateStatus;

use consent::Setup;

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
    /// The revocation list of the peer's domain could not be had (the peer is refused).
    #[error("{0}")]
    Revocation(String),
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
    /// Its traffic, as sampled once a second (`None` before the first sample).
    pub traffic: Option<Traffic>,
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
    /// Local address of the UDP socket (PTCP, who-am-i, probes, relay). The default,
    /// `[::]:0`, is one dual-stack socket for both families ([`crate::dualstack`]).
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
    /// Ask the local router for a UDP port mapping (PCP, NAT-PMP, UPnP IGD) and offer it as
    /// a candidate ([`crate::presence::portmap`]); deleted by [`Node::leave`]. Off by
    /// default: it talks to the router of whatever network this machine is on.
    pub port_mapping: bool,
    /// How long a peer domain's revocation list is used before it is fetched again
    /// (default 60 s); a session with a peer whose certificate was revoked ends within
    /// about this long.
    pub revocation_max_age: Duration,
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            bind: SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, 0)),
            include_loopback: false,
            server: ConnectOptions::default(),
            netstack: q2q_netstack::Config::default(),
            probe_for: Duration::from_secs(5),
            reprobe_every: Duration::from_secs(30),
            probe_after: Duration::ZERO,
            direct: true,
            tcp_relay_only: false,
            session_idle: Duration::from_secs(60),
            port_mapping: false,
            revocation_max_age: crate::identity::revocation::DEFAULT_MAX_AGE,
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

/// A stream between two q2q identities: a stream of their peer session, whose datagrams
/// are sealed with keys from one TLS 1.3 handshake between both certificates.
pub type PeerStream = PtcpStream;

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

/// Our identity as it is now: the stored certificate and key, and the same for TLS.
struct Current {
    stored: Arc<StoredIdentity>,
    tls: crate::ptcp::tls::Identity,
}

impl Current {
    fn new(stored: StoredIdentity) -> Result<Current, NodeError> {
        let me = &stored.address;
        let bad =
            |e: crate::identity::CertError| NodeError::Tls(format!("stored identity of {me}: {e}"));
        let cert = crate::identity::cert_from_pem(&stored.cert_pem).map_err(bad)?;
        let key = crate::identity::key_from_pem(&stored.key_pem).map_err(bad)?;
        let tls = crate::ptcp::tls::Identity::new(vec![cert], key)
            .map_err(|e| NodeError::Tls(e.to_string()))?;
        Ok(Current { stored: Arc::new(stored), tls })
    }
}

struct Inner {
    me: Q2qAddress,
    home: Home,
    /// Replaced whole when the certificate is renewed; read through
    /// [`Node::stored_identity`] and [`Node::tls_identity`].
    identity: std::sync::RwLock<Current>,
    /// How renewal went (for `status`).
    renewal: Mutex<renewal::State>,
    config: NodeConfig,
    endpoint: Endpoint,
    /// The logged-in connection to the home server, as the task that keeps it (and logs
    /// back in, replacing it) last published it.
    home_server: tokio::sync::watch::Receiver<Arc<ServerConn>>,
    /// Logged-in connections to other domains' servers, one per domain (a table owned by
    /// one task: connecting to one domain never waits on another).
    foreign: ServerTable<NodeError>,
    /// Logged-in connections to other instances of a domain that hold our relay legs,
    /// one per instance address, shared by every session relayed over TCP there.
    relay_instances: ServerTable<NodeError, SocketAddr>,
    listening: Mutex<HashMap<ServiceName, Listening>>,
    /// Who-am-i requests waiting for their answer, to the task that owns them (the loop
    /// taking our socket's non-PTCP datagrams).
    whoami: mpsc::Sender<WhoAmI>,
    /// Our reflexive addresses (one per family the server answered on, the control
    /// connection's family first) with the server's proofs, and when they were asked.
    reflexive_cache: Mutex<Option<(std::time::Instant, Vec<Reflexive>)>>,
    /// A refresh of the sessions' candidates runs, and another was asked for meanwhile
    /// ([`Node::refresh_sessions`]: one at a time, however often we log back in).
    refreshing: std::sync::atomic::AtomicBool,
    refresh_again: std::sync::atomic::AtomicBool,
    /// The next refresh pass also asks for the sessions' relay legs again (after a re-login).
    refresh_relay: std::sync::atomic::AtomicBool,
    /// Callers refused by a service's policy (for programs that show it).
    refusals: tokio::sync::broadcast::Sender<(Q2qAddress, ServiceName)>,
    /// One session per peer, every stream on it.
    table: SessionTable<NodeError>,
    /// The task that owns our port mapping, when `config.port_mapping`.
    port_map: Option<crate::presence::portmap::Mapper>,
    /// Peer domains' revocation lists (bounded in number and age).
    revocations: crate::identity::revocation::Lists,
}

/// Datagrams of one TCP-relayed session waiting for the control connection; more are
/// dropped (selective repeat resends them).
const TCP_RELAY_QUEUE: usize = 256;

/// A new stream on a session older than a moment must be accepted within this long, or
/// the peer is taken to have forgotten the session (restarted) and a new one is set up.
const STREAM_OPEN_TIMEOUT: Duration = Duration::from_secs(5);

/// How long the caller of a new session has to prove its identity on the session's first
/// stream.
const AUTH_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a who-am-i answer (or its absence) is trusted.
const REFLEXIVE_FRESH: Duration = Duration::from_secs(20);

/// The waits before asking a peer again for fresh candidates when its server could not
/// reach it ([`Node::refresh_sessions`]): 15 s in all, long enough for a peer that lost its
/// connection to the same network change to log back in (its backoff starts at 1 s).
const REFRESH_RETRY: [Duration; 4] = [
    Duration::from_secs(1),
    Duration::from_secs(2),
    Duration::from_secs(4),
    Duration::from_secs(8),
];

/// To the owner of the pending who-am-i requests: wait for the answer to `nonce`, or stop
/// waiting.
enum WhoAmI {
    Wait([u8; 8], oneshot::Sender<Reflexive>),
    Forget([u8; 8]),
}

/// One reflexive address of our socket (RFC 8445 server-reflexive candidate) and the
/// server's proof of its IP ([`crate::proto::whoami::ProofKey`]), when it gave one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Reflexive {
    pub(crate) addr: SocketAddr,
    pub(crate) proof: Option<[u8; crate::proto::whoami::PROOF_LEN]>,
}

/// What the node's who-am-i asks: the proof of the address seen (for `also-seen`).
const REFLEXIVE_FLAGS: crate::proto::whoami::Flags =
    crate::proto::whoami::Flags { proof: true, ..crate::proto::whoami::Flags::NONE };

/// Who-am-i requests waiting at most (more are not asked until some are answered).
const WHOAMI_PENDING: usize = 64;

/// A logged-in presence.
#[derive(Clone)]
pub struct Node {
    inner: Arc<Inner>,
}

impl Node {
    /// Our stored identity (certificate and key) as it is now: renewal replaces it, so
    /// read it here at each use rather than keeping a copy.
    pub(super) fn stored_identity(&self) -> Arc<StoredIdentity> {
        match self.inner.identity.read() {
            Ok(c) => c.stored.clone(),
            Err(e) => e.into_inner().stored.clone(),
        }
    }

    /// Our certificate and key for TLS with peers, as they are now (see
    /// [`Node::stored_identity`]).
    pub(super) fn tls_identity(&self) -> crate::ptcp::tls::Identity {
        match self.inner.identity.read() {
            Ok(c) => c.tls.clone(),
            Err(e) => e.into_inner().tls.clone(),
        }
    }

    /// Log in as `me` (whose identity is stored in `home`) and start serving.
    pub async fn start(
        home: Home,
        me: Q2qAddress,
        mut config: NodeConfig,
    ) -> Result<Node, NodeError> {
        let current = Current::new(home.identity(&me).map_err(ClientError::from)?)?;
        let identity = current.stored.clone();
        // Log-ins after this one take the identity as it is then (renewal replaces it).
        config.server.login = Some(identity.clone());
        let mut home_server = servers::log_in(&home, &me, &config.server, identity).await?;
        let incoming = home_server.incoming.take();
        // The home connection's one owner is `stay_logged_in`; everyone else reads it.
        let (home_owner, home_server) = tokio::sync::watch::channel(Arc::new(home_server));
        let endpoint = Endpoint::bind(config.bind, EndpointConfig::default()).await?;
        let side = endpoint.take_side_channel();
        let (whoami_tx, whoami_rx) = mpsc::channel(64);
        let port_map = config.port_mapping.then(|| {
            crate::presence::portmap::Mapper::start(
                endpoint.local_addr().port(),
                Default::default(),
            )
        });
        let inner = Arc::new(Inner {
            port_map,
            reflexive_cache: Default::default(),
            refreshing: Default::default(),
            refresh_again: Default::default(),
            refresh_relay: Default::default(),
            identity: std::sync::RwLock::new(current),
            renewal: Default::default(),
            refusals: tokio::sync::broadcast::channel(16).0,
            table: SessionTable::start(),
            revocations: crate::identity::revocation::Lists::new(
                revocation::MAX_LISTS,
                config.revocation_max_age,
            ),
            me,
            home,
            config,
            endpoint,
            home_server,
            foreign: ServerTable::start(),
            relay_instances: ServerTable::start(),
            listening: Default::default(),
            whoami: whoami_tx,
        });
        let node = Node { inner };
        if let Some(side) = side {
            tokio::spawn(node.clone().side_loop(side, whoami_rx));
        }
        if let Some(incoming) = incoming {
            tokio::spawn(node.clone().control_loop(incoming));
        }
        tokio::spawn(node.clone().stay_logged_in(home_owner));
        tokio::spawn(node.clone().renew_when_due());
        // Learn the NAT mapping (or that UDP is blocked) before the first connection, and
        // have the server vouch for our IP of the other family before the first `listen`.
        node.reflexive().await;
        node.announce_seen(&node.home()).await;
        Ok(node)
    }

    pub fn address(&self) -> &Q2qAddress {
        &self.inner.me
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.inner.endpoint.local_addr()
    }

    /// The router's port mapping for our socket, when there is one.
    pub fn port_mapping(&self) -> Option<crate::presence::portmap::Mapped> {
        self.inner.port_map.as_ref().and_then(|m| m.current())
    }

    /// The mapped address, as a candidate.
    pub(super) fn mapped(&self) -> Option<SocketAddr> {
        self.port_mapping().map(|m| m.external)
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
        let listen =
            cmd::Listen { service: service.clone(), description: Some(description.to_string()) };
        self.home().call(&listen).await?;
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
        self.home().call(&cmd::Unlisten { service: service.clone() }).await?;
        Ok(())
    }

    /// The services listened for now.
    pub fn listening(&self) -> Vec<ServiceName> {
        self.inner.listening.lock().map(|l| l.keys().cloned().collect()).unwrap_or_default()
    }

    /// Probes and probe replies this node sent so far, over all sessions: bounded per
    /// session, and zero for relay-only sessions.
    pub fn probes_sent(&self) -> u64 {
        self.inner.endpoint.stats().probes.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Peer sessions and their paths.
    pub fn status(&self) -> Vec<PeerStatus> {
        self.inner
            .table
            .snapshot()
            .into_iter()
            .map(|ps| {
                let (path, why) = match ps.ptcp.path() {
                    Some((path, why)) => (PathKind::from(path), why),
                    None => (PathKind::TcpRelay, String::new()),
                };
                PeerStatus {
                    peer: ps.peer.clone(),
                    service: ps.service.clone(),
                    session: ps.id(),
                    path,
                    why,
                    streams: ps.open_streams(),
                    opened: ps.opened(),
                    traffic: ps.traffic(),
                }
            })
            .collect()
    }
}

impl NodeError {
    /// The peer (or its server) refused the service asked for: another may be granted.
    fn refuses_service(&self) -> bool {
        match self {
            NodeError::Control(e) => {
                matches!(e.error_code(), Some(ErrorCode::NotAuthorized | ErrorCode::NoSuchService))
            }
            NodeError::Shared(e) => e.refuses_service(),
            _ => false,
        }
    }
}

/// The built-in echo service `q2q-tun ping` talks to.
pub fn ping_service() -> ServiceName {
    ServiceName::parse("ping").expect("`ping` is a valid service name")
}
