//! The endpoint: one UDP socket, the driver task that owns it and every session on it, and
//! the handles that reach the driver ([`Endpoint`], [`PtcpSession`]).

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use q2q_netstack::wire::{Datagram, Kind, SessionId};
use q2q_netstack::{
    Config, Event, Instant, Session, SessionError, Side, Stats, StreamError, StreamId,
};
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, trace, warn};

use super::paths::{PathSetup, PathState, PathView, Via};
use super::stream::{Key, Pipes, PtcpStream, StreamFailure};
use super::sys;
use crate::pipe::{IoError, StreamIo, wake_both};
use q2q_netstack::path::PathEvent;

/// How datagrams sent through a relay are framed (the presence layer's business, e.g.
/// [`crate::relay::Leg`]): the endpoint reserves [`Framing::overhead`] bytes in front of
/// each datagram and has [`Framing::seal`] fill them in, in place, so that equal-sized
/// datagrams stay equal-sized and still go out in one GSO batch.
pub trait Framing: Send + Sync + std::fmt::Debug {
    /// Bytes reserved in front of each datagram.
    fn overhead(&self) -> usize;
    /// Fill in the framing of one datagram: `datagram[..overhead()]` is reserved (zeros),
    /// the inner datagram follows. The length must not change.
    fn seal(&self, datagram: &mut [u8]);
}

/// Where a session's datagrams go. The driver routes *incoming* datagrams by session id
/// only, so changing the path never disturbs a stream.
#[derive(Debug, Clone)]
pub enum Path {
    /// Straight to the peer's UDP address.
    Direct(SocketAddr),
    /// Through a relay: every datagram is framed by `framing` and sent to `server`.
    /// Datagrams coming back through the relay arrive as [`Kind::Relay`] on the side
    /// channel; the presence layer checks and unwraps them and hands the inner datagram back
    /// with [`Endpoint::inject`].
    Relay {
        /// The relay's UDP address.
        server: SocketAddr,
        /// How each datagram is framed.
        framing: Arc<dyn Framing>,
    },
    /// Out of the endpoint by channel, one datagram per message, unframed (e.g. the relay
    /// over the server's control connection, which frames them itself). A full channel
    /// drops the datagram (selective repeat resends it); what comes back is handed in with
    /// [`Endpoint::inject`].
    Channel(mpsc::Sender<Vec<u8>>),
    /// Straight to the peer's address `to`, but from another socket than the endpoint's
    /// (a birthday socket holding the NAT mapping of the path), one datagram at a time.
    Via {
        /// Our socket.
        socket: Arc<UdpSocket>,
        /// The peer's address.
        to: SocketAddr,
    },
}

/// Paths are equal if they send to the same place the same way: the same framing object
/// (by pointer) or the same channel.
impl PartialEq for Path {
    fn eq(&self, other: &Path) -> bool {
        match (self, other) {
            (Path::Direct(a), Path::Direct(b)) => a == b,
            (Path::Relay { server: a, framing: fa }, Path::Relay { server: b, framing: fb }) => {
                a == b && std::ptr::addr_eq(Arc::as_ptr(fa), Arc::as_ptr(fb))
            }
            (Path::Channel(a), Path::Channel(b)) => a.same_channel(b),
            (Path::Via { socket: a, to: x }, Path::Via { socket: b, to: y }) => {
                Arc::ptr_eq(a, b) && x == y
            }
            _ => false,
        }
    }
}

impl Eq for Path {}

impl Path {
    /// Bytes this path puts in front of each datagram (they count against the path MTU).
    pub fn overhead(&self) -> usize {
        match self {
            Path::Relay { framing, .. } => framing.overhead(),
            Path::Direct(_) | Path::Channel(_) | Path::Via { .. } => 0,
        }
    }
}

/// Settings of an [`Endpoint`].
#[derive(Debug, Clone)]
pub struct EndpointConfig {
    /// Requested SO_RCVBUF and SO_SNDBUF in bytes (default 8 MiB). The kernel default
    /// (212 KiB) drops bursts at Gbit/s rates; as root the limit `net.core.rmem_max` is
    /// bypassed with SO_RCVBUFFORCE, otherwise the kernel caps the request at that limit.
    pub socket_buffer: usize,
    /// Capacity of the side channel of non-PTCP datagrams (default 1024). When it is full,
    /// datagrams are dropped and counted: the data path never waits for the presence layer.
    pub side_channel: usize,
    /// Capacity of the command channel from handles to the driver (default 256).
    pub commands: usize,
    /// Incoming streams per session waiting for [`PtcpSession::accept`] (default 1024); more
    /// are refused with a reset.
    pub accept_backlog: usize,
}

impl Default for EndpointConfig {
    fn default() -> EndpointConfig {
        EndpointConfig {
            socket_buffer: 8 << 20,
            side_channel: 1024,
            commands: 256,
            accept_backlog: 1024,
        }
    }
}

/// A datagram of another kind than PTCP (who-am-i, probes, relay), for the presence layer.
#[derive(Debug, Clone)]
pub struct SideDatagram {
    /// Who sent it.
    pub from: SocketAddr,
    /// Its kind (from the checked prefix).
    pub kind: Kind,
    /// The whole datagram, prefix included.
    pub data: Vec<u8>,
}

/// Why an endpoint or session operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EndpointError {
    /// The driver is gone.
    #[error("PTCP endpoint shut down")]
    Closed,
    /// A session with this id already exists on the endpoint.
    #[error("session {0} already exists")]
    SessionExists(SessionId),
    /// No session with this id (never created, lost, or released).
    #[error("no session {0}")]
    NoSuchSession(SessionId),
    /// The session ended.
    #[error("session lost: {}", match .0 {
        SessionError::TimedOut(ms) => format!("peer unreachable for {} s", ms / 1000),
        other => other.to_string(),
    })]
    SessionLost(SessionError),
    /// The stream could not be opened.
    #[error("cannot open stream: {0}")]
    Stream(StreamError),
    /// The peer refused or reset a stream being opened.
    #[error("cannot open stream: {0}")]
    Refused(StreamFailure),
}

/// Counters of an endpoint, readable at any time.
#[derive(Debug, Default)]
pub struct EndpointStats {
    /// Datagrams received on the socket.
    pub received: AtomicU64,
    /// Datagrams sent.
    pub sent: AtomicU64,
    /// Datagrams that did not parse (unknown version or kind, malformed): dropped.
    pub malformed: AtomicU64,
    /// PTCP datagrams for a session this endpoint does not have: dropped.
    pub unknown_session: AtomicU64,
    /// Non-PTCP datagrams handed to the side channel.
    pub side: AtomicU64,
    /// Non-PTCP datagrams dropped because the side channel was full or not taken.
    pub side_dropped: AtomicU64,
    /// Probes and probe replies sent by the sessions' path machines.
    pub probes: AtomicU64,
    /// Send errors other than "would block" (e.g. ICMP unreachable reported back), and
    /// datagrams dropped because a [`Path::Channel`] was full or closed.
    pub send_errors: AtomicU64,
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// How stream handles wake the driver (see [`crate::pipe`]).
pub(crate) type DriverWake = crate::pipe::DriverWake<Key>;

pub(crate) enum Command {
    NewSession {
        id: SessionId,
        side: Side,
        path: Path,
        config: Config,
        paths: Option<Box<PathSetup>>,
        reply: oneshot::Sender<Result<PtcpSession, EndpointError>>,
    },
    /// `lost`: away from a path that died (what was in flight is resent at once).
    SetPath {
        id: SessionId,
        path: Path,
        lost: bool,
        reply: oneshot::Sender<Result<(), EndpointError>>,
    },
    OpenStream {
        id: SessionId,
        reply: oneshot::Sender<Result<PtcpStream, EndpointError>>,
    },
    Stats {
        id: SessionId,
        reply: oneshot::Sender<Result<Stats, EndpointError>>,
    },
    Liveness {
        id: SessionId,
        from: SocketAddr,
        reply: oneshot::Sender<Result<Liveness, EndpointError>>,
    },
    InUse {
        id: SessionId,
        reply: oneshot::Sender<Result<usize, EndpointError>>,
    },
    Abort {
        id: SessionId,
    },
    Candidates {
        id: SessionId,
        candidates: Vec<SocketAddr>,
    },
    RenewRelay {
        id: SessionId,
        leg: Arc<crate::relay::Leg>,
        udp: SocketAddr,
        control: mpsc::Sender<Vec<u8>>,
        reply: oneshot::Sender<Result<bool, EndpointError>>,
    },
    InstallKeys {
        id: SessionId,
        keys: Box<q2q_netstack::seal::SessionKeys>,
        send_sealed: bool,
        reply: oneshot::Sender<()>,
    },
    DropFrom(Option<DropFilter>),
    Send {
        to: SocketAddr,
        data: Vec<u8>,
    },
    Inject {
        from: SocketAddr,
        data: Vec<u8>,
    },
    /// A session datagram that came through the relay over the control connection.
    InjectRelayed {
        data: Vec<u8>,
    },
    /// A datagram that arrived on a session's birthday socket.
    Birthday {
        id: SessionId,
        socket: u16,
        from: SocketAddr,
        data: Vec<u8>,
    },
    Shutdown,
}

/// How alive one path of a session looks (see [`PtcpSession::liveness`]).
#[derive(Debug, Clone, Copy)]
pub struct Liveness {
    /// Time since the last datagram of the session from the watched address (since the
    /// watch began, if none came yet).
    pub since_heard: std::time::Duration,
    /// Bytes sent and not yet acknowledged.
    pub in_flight: u64,
}

/// Which source addresses to drop (fault injection, see [`Endpoint::drop_from`]).
pub type DropFilter = Arc<dyn Fn(SocketAddr) -> bool + Send + Sync>;

/// What a handle holds to reach the driver.
#[derive(Clone)]
pub(crate) struct Link {
    cmds: mpsc::Sender<Command>,
    pub(crate) wake: Arc<DriverWake>,
}

impl Link {
    async fn call<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, EndpointError>>) -> Command,
    ) -> Result<T, EndpointError> {
        let (tx, rx) = oneshot::channel();
        self.cmds.send(make(tx)).await.map_err(|_| EndpointError::Closed)?;
        rx.await.map_err(|_| EndpointError::Closed)?
    }
}

/// A UDP socket carrying PTCP sessions and other datagram kinds. Cloning gives another
/// handle to the same endpoint; the driver runs while any handle, session or stream lives.
#[derive(Clone)]
pub struct Endpoint {
    link: Link,
    local: SocketAddr,
    stats: Arc<EndpointStats>,
    side: Arc<Mutex<Option<mpsc::Receiver<SideDatagram>>>>,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint").field("local", &self.local).finish()
    }
}

impl Endpoint {
    /// Bind a UDP socket on `addr` and start the driver on the current tokio runtime.
    /// `[::]:port` is one dual-stack socket for both families ([`crate::dualstack`]).
    pub async fn bind(addr: SocketAddr, config: EndpointConfig) -> io::Result<Endpoint> {
        let socket = UdpSocket::from_std(crate::dualstack::bind_udp(addr)?)?;
        Endpoint::from_socket(socket, config)
    }

    /// Run an endpoint on an already bound socket (the one the presence layer used for
    /// who-am-i, so the NAT mapping is the same).
    pub fn from_socket(socket: UdpSocket, config: EndpointConfig) -> io::Result<Endpoint> {
        sys::enlarge_buffers(&socket, config.socket_buffer);
        let local = socket.local_addr()?;
        let (cmd_tx, cmd_rx) = mpsc::channel(config.commands.max(1));
        let (side_tx, side_rx) = mpsc::channel(config.side_channel.max(1));
        let wake = DriverWake::new();
        let stats = Arc::new(EndpointStats::default());
        let udp = quinn_udp::UdpSocketState::new((&socket).into())?;
        debug!(gso = udp.max_gso_segments(), gro = udp.gro_segments(), "PTCP socket offloads");
        let driver = Driver {
            udp,
            local,
            socket,
            cmds: cmd_rx,
            cmds_open: true,
            shutdown: false,
            wake: wake.clone(),
            self_link: Link { cmds: cmd_tx.clone(), wake: wake.clone() }.downgrade(),
            side: side_tx,
            stats: stats.clone(),
            sessions: HashMap::new(),
            start: tokio::time::Instant::now(),
            out: Vec::with_capacity(65536),
            stalled: VecDeque::new(),
            dirty: Vec::new(),
            accept_backlog: config.accept_backlog.max(1),
            drop_from: None,
            relay_tokens: HashMap::new(),
            reported_at: Instant::from_micros(0),
        };
        tokio::spawn(driver.run());
        Ok(Endpoint {
            link: Link { cmds: cmd_tx, wake },
            local,
            stats,
            side: Arc::new(Mutex::new(Some(side_rx))),
        })
    }

    /// The socket's local address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Counters.
    pub fn stats(&self) -> &EndpointStats {
        &self.stats
    }

    /// Take the receiver of non-PTCP datagrams (once; `None` afterwards). Until it is taken,
    /// and whenever it is full, such datagrams are dropped and counted.
    pub fn take_side_channel(&self) -> Option<mpsc::Receiver<SideDatagram>> {
        self.side.lock().unwrap_or_else(|e| e.into_inner()).take()
    }

    /// Send a raw datagram from the endpoint's socket (who-am-i, probes, relay framing).
    pub async fn send_datagram(&self, to: SocketAddr, data: Vec<u8>) -> Result<(), EndpointError> {
        self.link.cmds.send(Command::Send { to, data }).await.map_err(|_| EndpointError::Closed)
    }

    /// Hand the driver a datagram as if it had arrived on the socket from `from` (the inner
    /// datagram of a relayed one).
    pub async fn inject(&self, from: SocketAddr, data: Vec<u8>) -> Result<(), EndpointError> {
        self.link.cmds.send(Command::Inject { from, data }).await.map_err(|_| EndpointError::Closed)
    }

    /// Fault injection for tests: drop every datagram arriving on the socket from an
    /// address `filter` picks (a NAT mapping that vanished, a path that died), until called
    /// again with `None`. Injected datagrams are not filtered.
    #[doc(hidden)]
    pub async fn drop_from(&self, filter: Option<DropFilter>) {
        let _ = self.link.cmds.send(Command::DropFrom(filter)).await;
    }

    /// Stop the driver now: every stream fails with "PTCP endpoint shut down", sessions end
    /// without notice to their peers (which time out), and the socket is closed.
    pub async fn shutdown(&self) {
        let _ = self.link.cmds.send(Command::Shutdown).await;
    }

    /// Start a session as the initiator, sending to `peer`.
    pub async fn connect(
        &self,
        id: SessionId,
        peer: SocketAddr,
        config: Config,
    ) -> Result<PtcpSession, EndpointError> {
        self.new_session(id, Side::Initiator, Path::Direct(peer), config).await
    }

    /// Create the responder end of session `id`, whose initiator is at `peer` (both learnt
    /// through the presence layer).
    pub async fn accept(
        &self,
        id: SessionId,
        peer: SocketAddr,
        config: Config,
    ) -> Result<PtcpSession, EndpointError> {
        self.new_session(id, Side::Responder, Path::Direct(peer), config).await
    }

    /// Create a session with any side and path.
    pub async fn new_session(
        &self,
        id: SessionId,
        side: Side,
        path: Path,
        config: Config,
    ) -> Result<PtcpSession, EndpointError> {
        self.link
            .call(|reply| Command::NewSession { id, side, path, config, paths: None, reply })
            .await
    }

    /// Create a session whose paths the endpoint runs itself ([`q2q_netstack::path`]): it
    /// starts on the relay of `paths`, searches for a direct path, watches it, falls back
    /// and moves as the machine says. Probes, probe replies and relay datagrams for the
    /// session are handled here, not on the side channel.
    pub async fn new_session_with_paths(
        &self,
        id: SessionId,
        side: Side,
        config: Config,
        paths: PathSetup,
    ) -> Result<PtcpSession, EndpointError> {
        let path = match (paths.setup.relay, &paths.control) {
            (q2q_netstack::path::RelayPath::Udp(server), _) => {
                Path::Relay { server, framing: paths.leg.clone() }
            }
            (q2q_netstack::path::RelayPath::Control, Some(tx)) => Path::Channel(tx.clone()),
            (q2q_netstack::path::RelayPath::Control, None) => {
                return Err(EndpointError::NoSuchSession(id));
            }
        };
        let paths = Some(Box::new(paths));
        self.link.call(|reply| Command::NewSession { id, side, path, config, paths, reply }).await
    }

    /// Hand the driver a session datagram that came through the relay over the control
    /// connection (its path machine counts it as the peer using the relay).
    pub async fn inject_relayed(&self, data: Vec<u8>) -> Result<(), EndpointError> {
        self.link
            .cmds
            .send(Command::InjectRelayed { data })
            .await
            .map_err(|_| EndpointError::Closed)
    }

    /// Send session `id`'s datagrams to `peer` from now on (relay → direct, NAT rebinding).
    pub async fn set_peer_addr(
        &self,
        id: SessionId,
        peer: SocketAddr,
    ) -> Result<(), EndpointError> {
        self.set_path(id, Path::Direct(peer)).await
    }

    /// Send session `id`'s datagrams along `path` from now on.
    pub async fn set_path(&self, id: SessionId, path: Path) -> Result<(), EndpointError> {
        self.link.call(|reply| Command::SetPath { id, path, lost: false, reply }).await
    }
}

/// A handle to one PTCP session of an [`Endpoint`]. Dropping it stops accepting streams; the
/// session is released once its open streams are closed too.
pub struct PtcpSession {
    id: SessionId,
    link: Link,
    incoming: tokio::sync::Mutex<mpsc::Receiver<PtcpStream>>,
    lost: Arc<Mutex<Option<SessionError>>>,
    path: Option<PathView>,
}

impl std::fmt::Debug for PtcpSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PtcpSession").field("id", &self.id).finish()
    }
}

impl PtcpSession {
    /// The session id.
    pub fn id(&self) -> SessionId {
        self.id
    }

    /// The current path and why, for a session whose paths the endpoint runs
    /// ([`Endpoint::new_session_with_paths`]).
    pub fn path(&self) -> Option<(q2q_netstack::path::Path, String)> {
        self.path.as_ref().map(PathView::get)
    }

    /// A handle on the session's path as the driver shows it (it outlives this handle).
    pub fn path_view(&self) -> Option<PathView> {
        self.path.clone()
    }

    /// Open a stream to the peer; returns once the peer's stack has accepted it.
    pub async fn open_stream(&self) -> Result<PtcpStream, EndpointError> {
        let id = self.id;
        self.link.call(|reply| Command::OpenStream { id, reply }).await.map_err(|e| self.explain(e))
    }

    /// The next stream the peer opened. Fails once the session is lost.
    pub async fn accept(&self) -> Result<PtcpStream, EndpointError> {
        let next = self.incoming.lock().await.recv().await;
        next.ok_or_else(|| self.explain(EndpointError::NoSuchSession(self.id)))
    }

    /// Send datagrams to `peer` from now on (see [`Endpoint::set_peer_addr`]).
    pub async fn set_peer_addr(&self, peer: SocketAddr) -> Result<(), EndpointError> {
        self.set_path(Path::Direct(peer)).await
    }

    /// Send datagrams along `path` from now on.
    pub async fn set_path(&self, path: Path) -> Result<(), EndpointError> {
        let id = self.id;
        self.link
            .call(|reply| Command::SetPath { id, path, lost: false, reply })
            .await
            .map_err(|e| self.explain(e))
    }

    /// The session's counters and estimates (RTT, congestion window, retransmissions).
    pub async fn stats(&self) -> Result<Stats, EndpointError> {
        let id = self.id;
        self.link.call(|reply| Command::Stats { id, reply }).await.map_err(|e| self.explain(e))
    }

    /// Send datagrams along `path` from now on because the current path died: what was in
    /// flight on it is resent at once along `path` (see [`q2q_netstack::Session::path_lost`]).
    pub async fn fall_back(&self, path: Path) -> Result<(), EndpointError> {
        let id = self.id;
        self.link
            .call(|reply| Command::SetPath { id, path, lost: true, reply })
            .await
            .map_err(|e| self.explain(e))
    }

    /// How alive the path from `from` looks: the time since the session last heard from
    /// that address (datagrams arriving on the socket or injected as from it) and the bytes
    /// in flight. The first call for an address starts watching it.
    pub async fn liveness(&self, from: SocketAddr) -> Result<Liveness, EndpointError> {
        let id = self.id;
        self.link
            .call(|reply| Command::Liveness { id, from, reply })
            .await
            .map_err(|e| self.explain(e))
    }

    /// Streams in use: opening, or held by a handle the application has not dropped (a
    /// stream the application closed may linger in TCP's closing states; it is not counted).
    pub async fn streams_in_use(&self) -> Result<usize, EndpointError> {
        let id = self.id;
        self.link.call(|reply| Command::InUse { id, reply }).await.map_err(|e| self.explain(e))
    }

    /// End the session now: every stream fails with "peer reset the stream" and the session
    /// is forgotten, without a word to the peer (for a peer known to be gone).
    pub async fn abort(&self) {
        let _ = self.link.cmds.send(Command::Abort { id: self.id }).await;
    }

    /// Fresh candidates of the peer (after a network change, already filtered to what may be
    /// probed): the session's path machine searches them at once while relayed.
    pub async fn update_candidates(&self, candidates: Vec<SocketAddr>) {
        let _ = self.link.cmds.send(Command::Candidates { id: self.id, candidates }).await;
    }

    /// The session's relay leg, given again by the server (after a re-login; see
    /// [`PathState::renew_relay`]): `leg`, at the UDP relay `udp`, or over the control
    /// connection through `control`, whichever kind of relay the session has. True when
    /// it is another leg than the session had (the server had forgotten it).
    ///
    /// [`PathState::renew_relay`]: super::paths::PathState::renew_relay
    pub async fn renew_relay(
        &self,
        leg: Arc<crate::relay::Leg>,
        udp: SocketAddr,
        control: mpsc::Sender<Vec<u8>>,
    ) -> Result<bool, EndpointError> {
        let id = self.id;
        self.link
            .call(|reply| Command::RenewRelay { id, leg, udp, control, reply })
            .await
            .map_err(|e| self.explain(e))
    }

    /// Seal every datagram of the session from now on with `keys` (taken from the TLS
    /// exporter once both identities are proven; see [`q2q_netstack::seal`] for the switch
    /// and what `send_sealed` means). Returns once the driver has them, so a confirmation
    /// written afterwards is sent after they are in place.
    pub async fn install_keys(&self, keys: q2q_netstack::seal::SessionKeys, send_sealed: bool) {
        let (reply, done) = oneshot::channel();
        let cmd = Command::InstallKeys { id: self.id, keys: Box::new(keys), send_sealed, reply };
        if self.link.cmds.send(cmd).await.is_ok() {
            let _ = done.await;
        }
    }

    /// Why the session ended, if it did.
    pub fn error(&self) -> Option<SessionError> {
        *self.lost.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn explain(&self, e: EndpointError) -> EndpointError {
        match (e, self.error()) {
            (EndpointError::NoSuchSession(_), Some(lost)) => EndpointError::SessionLost(lost),
            (e, _) => e,
        }
    }
}

// ---- the driver ------------------------------------------------------------------------

/// A weak link the driver gives to the handles it creates (a strong one would keep its own
/// command channel open forever).
struct WeakLink {
    cmds: mpsc::WeakSender<Command>,
    wake: Arc<DriverWake>,
}

impl Link {
    fn downgrade(self) -> WeakLink {
        WeakLink { cmds: self.cmds.downgrade(), wake: self.wake }
    }
}

impl WeakLink {
    fn upgrade(&self) -> Option<Link> {
        Some(Link { cmds: self.cmds.upgrade()?, wake: self.wake.clone() })
    }
}

struct SessionState {
    session: Session,
    path: Path,
    streams: HashMap<StreamId, Arc<Pipes>>,
    /// Streams being opened, answered on `Connected` or `Reset`.
    opening: HashMap<StreamId, oneshot::Sender<Result<PtcpStream, EndpointError>>>,
    incoming: mpsc::Sender<PtcpStream>,
    lost: Arc<Mutex<Option<SessionError>>>,
    /// Needs a transmit/event pass.
    touched: bool,
    deadline: Option<Instant>,
    /// The address whose datagrams [`PtcpSession::liveness`] watches, and when the last came.
    watch: Option<(SocketAddr, Instant)>,
    /// The session's path machine, when the endpoint runs its paths.
    paths: Option<PathState>,
}

struct Driver {
    socket: UdpSocket,
    /// The socket's local address: an IPv6 one means dual-stack, so IPv4 destinations are
    /// sent v4-mapped ([`crate::dualstack::for_socket`]).
    local: SocketAddr,
    /// quinn-udp's view of the socket: GSO sends, recvmmsg + GRO receives.
    udp: quinn_udp::UdpSocketState,
    cmds: mpsc::Receiver<Command>,
    cmds_open: bool,
    /// Asked to stop.
    shutdown: bool,
    wake: Arc<DriverWake>,
    self_link: WeakLink,
    side: mpsc::Sender<SideDatagram>,
    stats: Arc<EndpointStats>,
    sessions: HashMap<SessionId, SessionState>,
    start: tokio::time::Instant,
    /// The datagram being built.
    out: Vec<u8>,
    /// Batches the socket would not take yet (send buffer full): nothing else is sent
    /// until they went. At most one session's ready datagrams plus a few raw ones.
    stalled: VecDeque<Batch>,
    dirty: Vec<Arc<Pipes>>,
    accept_backlog: usize,
    /// Fault injection: sources whose datagrams are dropped on arrival.
    drop_from: Option<DropFilter>,
    /// Sessions by relay token, for relayed datagrams coming back.
    relay_tokens: HashMap<crate::relay::Token, SessionId>,
    /// When the sessions were last reported in the log (debug level, [`REPORT_EVERY_US`]).
    reported_at: Instant,
}

/// How often the driver logs each busy session's counters and queues at debug level (µs).
const REPORT_EVERY_US: i64 = 1_000_000;

/// recvmmsg calls per wakeup before the sessions are polled (each takes up to
/// `quinn_udp::BATCH_SIZE` buffers, each holding one datagram or, with GRO, several).
const RECV_BATCH: usize = 4;
/// Bytes of one receive buffer: a GRO super-datagram is at most 64 KiB.
const RECV_SLOT: usize = 64 << 10;
/// Largest GSO batch (the UDP length field and the kernel's limit).
const GSO_BYTES: usize = 65000;
/// Commands taken per pass.
const CMD_BATCH: usize = 64;

impl Driver {
    fn now(&self) -> Instant {
        Instant::from_micros(self.start.elapsed().as_micros() as i64)
    }

    fn to_tokio(&self, t: Instant) -> tokio::time::Instant {
        self.start + std::time::Duration::from_micros(t.total_micros().max(0) as u64)
    }

    async fn run(mut self) {
        let far = self.start + std::time::Duration::from_secs(86400 * 365);
        let sleep = tokio::time::sleep_until(far);
        tokio::pin!(sleep);
        let mut buf = vec![0u8; RECV_SLOT * quinn_udp::BATCH_SIZE];
        loop {
            self.service();
            if self.shutdown || (!self.cmds_open && self.sessions.is_empty()) {
                debug!("PTCP endpoint driver done");
                break;
            }
            let deadline = self
                .sessions
                .values()
                .filter_map(|s| s.deadline)
                .min()
                .map_or(far, |t| self.to_tokio(t));
            if sleep.deadline() != deadline {
                sleep.as_mut().reset(deadline);
            }
            let stalled = !self.stalled.is_empty();
            tokio::select! {
                // Reading goes on while sends are stalled: ACKs are what frees the peer.
                r = self.socket.readable() => {
                    if let Err(e) = r {
                        warn!(error = %e, "PTCP socket failed");
                        break;
                    }
                    self.recv_batch(&mut buf);
                }
                r = self.socket.writable(), if stalled => {
                    if r.is_err() { break; }
                    self.flush_stalled();
                }
                cmd = self.cmds.recv(), if self.cmds_open && !stalled => match cmd {
                    Some(c) => self.command(c),
                    None => self.cmds_open = false,
                },
                _ = self.wake.notify.notified() => {}
                _ = &mut sleep => {}
            }
        }
        for s in self.sessions.values_mut() {
            for p in s.streams.values() {
                p.fail(StreamFailure::EndpointGone);
            }
            for (_, reply) in s.opening.drain() {
                let _ = reply.send(Err(EndpointError::Closed));
            }
        }
    }

    fn recv_batch(&mut self, buf: &mut [u8]) {
        let mut meta = [quinn_udp::RecvMeta::default(); quinn_udp::BATCH_SIZE];
        for _ in 0..RECV_BATCH {
            let mut slices: Vec<std::io::IoSliceMut<'_>> =
                buf.chunks_mut(RECV_SLOT).map(std::io::IoSliceMut::new).collect();
            let (socket, udp) = (&self.socket, &self.udp);
            let r = socket.try_io(tokio::io::Interest::READABLE, || {
                udp.recv(socket.into(), &mut slices, &mut meta)
            });
            drop(slices);
            match r {
                Ok(n) => {
                    let now = self.now();
                    for (m, slot) in meta.iter().zip(buf.chunks_mut(RECV_SLOT)).take(n) {
                        // One spelling inside: IPv4 peers of a dual-stack socket are plain.
                        let from = crate::dualstack::canonical(m.addr);
                        if self.drop_from.as_ref().is_some_and(|f| f(from)) {
                            continue;
                        }
                        let len = m.len.min(slot.len());
                        let data = &mut slot[..len];
                        if data.is_empty() {
                            self.on_datagram(now, from, data);
                        }
                        // With GRO one buffer holds several datagrams of `stride` bytes.
                        for d in data.chunks_mut(m.stride.max(1)) {
                            self.on_datagram(now, from, d);
                        }
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                // ICMP errors for earlier sends surface here on some systems: not fatal.
                Err(e) => {
                    trace!(error = %e, "recv error");
                    bump(&self.stats.send_errors);
                }
            }
        }
    }

    /// `data` is opened in place (relay framing, session seal): the receive buffer, not
    /// a copy.
    fn on_datagram(&mut self, now: Instant, from: SocketAddr, data: &mut [u8]) {
        self.on_datagram_via(now, from, data, Via::Socket(q2q_netstack::path::Socket::Main));
    }

    fn on_datagram_via(&mut self, now: Instant, from: SocketAddr, data: &mut [u8], via: Via) {
        bump(&self.stats.received);
        match Datagram::parse(data) {
            Err(_) => bump(&self.stats.malformed),
            Ok(Datagram::Other(kind)) => {
                if self.on_path_datagram(now, from, kind, data, via) {
                    return;
                }
                let d = SideDatagram { from, kind, data: data.to_vec() };
                match self.side.try_send(d) {
                    Ok(()) => bump(&self.stats.side),
                    Err(_) => bump(&self.stats.side_dropped),
                }
            }
            Ok(d) => {
                let Some(sid) = d.session() else { return };
                self.on_session_datagram(now, from, sid, data, via);
            }
        }
    }

    /// Probes and relayed datagrams of a session whose paths the endpoint runs: `true` if
    /// taken here.
    fn on_path_datagram(
        &mut self,
        now: Instant,
        from: SocketAddr,
        kind: Kind,
        data: &mut [u8],
        via: Via,
    ) -> bool {
        match kind {
            Kind::Probe | Kind::ProbeReply => {
                let Some(id) = q2q_netstack::path::probe::session_of(data) else { return false };
                let Some(s) = self.sessions.get_mut(&SessionId(id)) else { return false };
                let Some(p) = &mut s.paths else { return false };
                if let Via::Socket(socket) = via {
                    p.paths.handle_probe(now, socket, from, data);
                    s.touched = true;
                }
                true
            }
            Kind::Relay if via != Via::Relayed => {
                let Ok(u) = crate::relay::parse(data) else { return false };
                let Some(id) = self.relay_tokens.get(&u.token).copied() else { return false };
                let Some(leg) =
                    self.sessions.get(&id).and_then(|s| s.paths.as_ref()).map(|p| p.leg.clone())
                else {
                    self.relay_tokens.remove(&u.token);
                    return false;
                };
                // Opened in place (a relayed datagram holds no relayed one: `via` is then
                // Relayed, so this arm is not reached again inside).
                if let Ok(inner) = leg.open_in_place(data)
                    && !inner.is_empty()
                {
                    self.on_datagram_via(now, from, inner, Via::Relayed);
                }
                true
            }
            _ => false,
        }
    }

    /// A PTCP datagram of session `sid`: to its session, and to its path machine
    /// (liveness, or the peer using the relay).
    fn on_session_datagram(
        &mut self,
        now: Instant,
        from: SocketAddr,
        sid: SessionId,
        raw: &mut [u8],
        via: Via,
    ) {
        match self.sessions.get_mut(&sid) {
            Some(s) => {
                // Only a datagram the session takes (sealed and opened, once it has keys)
                // shows the path is alive.
                if s.session.handle_datagram(now, raw).is_err() {
                    bump(&self.stats.malformed);
                } else {
                    if let Some((watched, heard)) = &mut s.watch
                        && *watched == from
                    {
                        *heard = now;
                    }
                    if let Some(p) = &mut s.paths {
                        match via {
                            Via::Socket(socket) => p.paths.handle_datagram(now, socket, from),
                            Via::Relayed => p.paths.note_relayed(now),
                        }
                    }
                }
                s.touched = true;
            }
            None => bump(&self.stats.unknown_session),
        }
    }

    fn command(&mut self, c: Command) {
        match c {
            Command::NewSession { id, side, path, config, paths, reply } => {
                let r = self.new_session(id, side, path, config, paths);
                let _ = reply.send(r);
            }
            Command::SetPath { id, path, lost, reply } => {
                let now = self.now();
                let r = match self.sessions.get_mut(&id) {
                    Some(s) => {
                        debug!(session = %id, path = ?path, lost, "path changed");
                        // Another path: its MTU is unknown again (RFC 8899 §5.2).
                        s.session.on_path_change(now, path.overhead());
                        s.path = path;
                        s.watch = None;
                        if lost {
                            s.session.path_lost(now);
                        }
                        s.touched = true;
                        Ok(())
                    }
                    None => Err(EndpointError::NoSuchSession(id)),
                };
                let _ = reply.send(r);
            }
            Command::OpenStream { id, reply } => {
                let Some(s) = self.sessions.get_mut(&id) else {
                    let _ = reply.send(Err(EndpointError::NoSuchSession(id)));
                    return;
                };
                match s.session.open_stream() {
                    Ok(stream) => {
                        s.streams.insert(stream, Pipes::new((id, stream)));
                        s.opening.insert(stream, reply);
                        s.touched = true;
                    }
                    Err(e) => {
                        let _ = reply.send(Err(EndpointError::Stream(e)));
                    }
                }
            }
            Command::Stats { id, reply } => {
                let r = self
                    .sessions
                    .get(&id)
                    .map(|s| s.session.stats())
                    .ok_or(EndpointError::NoSuchSession(id));
                let _ = reply.send(r);
            }
            Command::Liveness { id, from, reply } => {
                let now = self.now();
                let r = match self.sessions.get_mut(&id) {
                    Some(s) => {
                        let heard = match s.watch {
                            Some((a, t)) if a == from => t,
                            _ => {
                                s.watch = Some((from, now));
                                now
                            }
                        };
                        let since = (now - heard).total_micros();
                        Ok(Liveness {
                            since_heard: std::time::Duration::from_micros(since),
                            in_flight: s.session.stats().in_flight,
                        })
                    }
                    None => Err(EndpointError::NoSuchSession(id)),
                };
                let _ = reply.send(r);
            }
            Command::InUse { id, reply } => {
                let r = self
                    .sessions
                    .get(&id)
                    .map(|s| {
                        let held = s.streams.values().filter(|p| !p.lock().dropped).count();
                        held + s.opening.len()
                    })
                    .ok_or(EndpointError::NoSuchSession(id));
                let _ = reply.send(r);
            }
            Command::Abort { id } => {
                if let Some(mut s) = self.sessions.remove(&id) {
                    debug!(session = %id, "session aborted");
                    self.relay_tokens.retain(|_, s| *s != id);
                    for (_, reply) in s.opening.drain() {
                        let _ = reply.send(Err(EndpointError::Refused(StreamFailure::Reset)));
                    }
                    for (_, p) in s.streams.drain() {
                        p.fail(StreamFailure::Reset);
                    }
                }
            }
            Command::InstallKeys { id, keys, send_sealed, reply } => {
                if let Some(s) = self.sessions.get_mut(&id) {
                    s.session.install_keys(&keys, send_sealed);
                    s.touched = true;
                }
                let _ = reply.send(());
            }
            Command::Candidates { id, candidates } => {
                let now = self.now();
                if let Some(s) = self.sessions.get_mut(&id)
                    && let Some(p) = &mut s.paths
                {
                    p.paths.update_candidates(now, candidates);
                    s.touched = true;
                }
            }
            Command::RenewRelay { id, leg, udp, control, reply } => {
                let now = self.now();
                let Some(s) = self.sessions.get_mut(&id) else {
                    let _ = reply.send(Err(EndpointError::NoSuchSession(id)));
                    return;
                };
                let Some(p) = &mut s.paths else {
                    let _ = reply.send(Ok(false));
                    return;
                };
                let replaced = p.renew_relay(now, leg, udp, control);
                if let Some(old) = replaced {
                    self.relay_tokens.remove(&old);
                    self.relay_tokens.insert(*p.leg.token(), id);
                }
                // Relayed: frame for the new leg from now on (a relay that moved is also a
                // `Switched` event, which resets the path MTU).
                let current = p.paths.current();
                if matches!(
                    current,
                    q2q_netstack::path::Path::UdpRelay(_) | q2q_netstack::path::Path::ControlRelay
                ) && let Some(ep) = p.endpoint_path(current)
                {
                    s.path = ep;
                }
                s.touched = true;
                let _ = reply.send(Ok(replaced.is_some()));
            }
            Command::DropFrom(filter) => self.drop_from = filter,
            Command::Send { to, data } => self.send_to(to, data),
            Command::Inject { from, mut data } => {
                let now = self.now();
                self.on_datagram(now, from, &mut data);
            }
            Command::InjectRelayed { mut data } => {
                let now = self.now();
                let from = SocketAddr::from(([0, 0, 0, 0], 0));
                self.on_datagram_via(now, from, &mut data, Via::Relayed);
            }
            Command::Birthday { id, socket, from, mut data } => {
                let now = self.now();
                if self.drop_from.as_ref().is_some_and(|f| f(from)) {
                    return;
                }
                bump(&self.stats.received);
                let via = Via::Socket(q2q_netstack::path::Socket::Birthday(socket));
                match Datagram::parse(&data) {
                    Ok(Datagram::Other(Kind::Probe | Kind::ProbeReply)) => {
                        if let Some(s) = self.sessions.get_mut(&id)
                            && let Some(p) = &mut s.paths
                        {
                            let socket = q2q_netstack::path::Socket::Birthday(socket);
                            p.paths.handle_probe(now, socket, from, &data);
                            s.touched = true;
                        }
                    }
                    Ok(d) if d.session() == Some(id) => {
                        self.on_session_datagram(now, from, id, &mut data, via)
                    }
                    _ => bump(&self.stats.malformed),
                }
            }
            Command::Shutdown => self.shutdown = true,
        }
    }

    fn new_session(
        &mut self,
        id: SessionId,
        side: Side,
        path: Path,
        config: Config,
        paths: Option<Box<PathSetup>>,
    ) -> Result<PtcpSession, EndpointError> {
        if self.sessions.contains_key(&id) {
            return Err(EndpointError::SessionExists(id));
        }
        let link = self.self_link.upgrade().ok_or(EndpointError::Closed)?;
        let (tx, rx) = mpsc::channel(self.accept_backlog);
        let lost = Arc::new(Mutex::new(None));
        let mut session = Session::new(id, side, config, self.now());
        session.on_path_change(self.now(), path.overhead());
        let paths = paths.map(|p| {
            self.relay_tokens.insert(*p.leg.token(), id);
            PathState::new(self.now(), *p)
        });
        let view = paths.as_ref().map(PathState::view);
        debug!(session = %id, ?side, ?path, "new session");
        self.sessions.insert(
            id,
            SessionState {
                session,
                path,
                streams: HashMap::new(),
                opening: HashMap::new(),
                incoming: tx,
                lost: lost.clone(),
                touched: true,
                deadline: None,
                watch: None,
                paths,
            },
        );
        Ok(PtcpSession { id, link, incoming: tokio::sync::Mutex::new(rx), lost, path: view })
    }

    /// Send one raw datagram now, or after the stalled ones.
    fn send_to(&mut self, to: SocketAddr, data: Vec<u8>) {
        let io = Io { socket: &self.socket, local: self.local, udp: &self.udp, stats: &self.stats };
        let seg = data.len().max(1);
        if !self.stalled.is_empty() || !io.send(to, &data, seg) {
            self.stalled.push_back(Batch { to, data, seg });
        }
    }

    fn flush_stalled(&mut self) {
        let io = Io { socket: &self.socket, local: self.local, udp: &self.udp, stats: &self.stats };
        while let Some(b) = self.stalled.front() {
            if !io.send(b.to, &b.data, b.seg) {
                return;
            }
            self.stalled.pop_front();
        }
    }

    /// One pass: commands, streams with work, then every session that needs it: transmit,
    /// events, deadline.
    fn service(&mut self) {
        if self.cmds_open && self.stalled.is_empty() {
            for _ in 0..CMD_BATCH {
                match self.cmds.try_recv() {
                    Ok(c) => self.command(c),
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    Err(mpsc::error::TryRecvError::Disconnected) => {
                        self.cmds_open = false;
                        break;
                    }
                }
            }
        }
        let mut dirty = std::mem::take(&mut self.dirty);
        self.wake.take(&mut dirty);
        for p in dirty.drain(..) {
            p.queued.store(false, Ordering::Release);
            if let Some(s) = self.sessions.get_mut(&p.key.0) {
                s.touched = true;
                pump(s, &p);
            }
        }
        self.dirty = dirty;

        let now = self.now();
        let ids: Vec<SessionId> = self
            .sessions
            .iter()
            .filter(|(_, s)| s.touched || s.deadline.is_none_or(|d| d <= now))
            .map(|(id, _)| *id)
            .collect();
        for id in ids {
            self.service_session(id, now);
        }
        if now.total_micros() - self.reported_at.total_micros() >= REPORT_EVERY_US
            && tracing::enabled!(tracing::Level::DEBUG)
        {
            self.reported_at = now;
            for (id, s) in &mut self.sessions {
                report(*id, s);
            }
        }
    }

    fn service_session(&mut self, id: SessionId, now: Instant) {
        let link = self.self_link.upgrade();
        let Driver { sessions, socket, local, udp, stats, stalled, out, relay_tokens, .. } = self;
        let Some(s) = sessions.get_mut(&id) else { return };
        s.touched = false;
        drive_paths(id, s, now, socket, stats, link.as_ref());
        let io = Io { socket, local: *local, udp, stats };
        for _ in 0..16 {
            if stalled.is_empty() {
                io.transmit_session(s, now, out, stalled);
            }
            let mut any = false;
            while let Some(ev) = s.session.poll_event() {
                any = true;
                on_event(s, ev, link.as_ref());
            }
            if !any {
                break;
            }
        }
        s.deadline = s.session.poll_timeout();
        if let (Some(d), Some(p)) =
            (s.deadline, s.paths.as_ref().and_then(|p| p.paths.poll_timeout()))
        {
            s.deadline = Some(d.min(p));
        }
        if s.deadline.is_none() {
            // Lost: every stream already got `TimedOut`.
            let err = s.session.error();
            debug!(session = %id, error = ?err, "session removed");
            sessions.remove(&id);
            relay_tokens.retain(|_, s| *s != id);
        } else if s.incoming.is_closed() && s.streams.is_empty() {
            debug!(session = %id, "session released");
            sessions.remove(&id);
            relay_tokens.retain(|_, s| *s != id);
        }
    }
}

/// A batch of datagrams to one address: `seg`-byte datagrams, the last may be shorter.
struct Batch {
    to: SocketAddr,
    data: Vec<u8>,
    seg: usize,
}

/// The socket, borrowed for sending.
struct Io<'a> {
    socket: &'a UdpSocket,
    /// The socket's local address (see [`Driver::local`]).
    local: SocketAddr,
    udp: &'a quinn_udp::UdpSocketState,
    stats: &'a EndpointStats,
}

impl Io<'_> {
    /// Send a batch in one system call where the kernel can segment it (GSO). `false`: the
    /// socket is full, try again when it is writable.
    fn send(&self, to: SocketAddr, data: &[u8], seg: usize) -> bool {
        let t = quinn_udp::Transmit {
            destination: crate::dualstack::for_socket(self.local, to),
            ecn: None,
            contents: data,
            segment_size: (data.len() > seg).then_some(seg),
            src_ip: None,
        };
        let (socket, udp) = (self.socket, self.udp);
        match socket.try_io(tokio::io::Interest::WRITABLE, || udp.try_send(socket.into(), &t)) {
            Ok(()) => {
                let n = data.len().div_ceil(seg.max(1)) as u64;
                self.stats.sent.fetch_add(n, Ordering::Relaxed);
                true
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => false,
            Err(e) => {
                // Unreachable networks, EMSGSIZE for a path-MTU probe larger than the
                // interface: counted and dropped; the selective-repeat layer resends
                // whatever is lost.
                trace!(error = %e, %to, "send error");
                bump(&self.stats.send_errors);
                true
            }
        }
    }

    /// Send `out[..upto]` as one batch (or keep it in `stalled`) and remove it from `out`.
    fn flush(
        &self,
        to: SocketAddr,
        out: &mut Vec<u8>,
        seg: usize,
        upto: usize,
        stalled: &mut VecDeque<Batch>,
    ) {
        if upto == 0 {
            return;
        }
        if !stalled.is_empty() || !self.send(to, &out[..upto], seg) {
            stalled.push_back(Batch { to, data: out[..upto].to_vec(), seg });
        }
        out.drain(..upto);
    }

    /// Take every datagram the session has ready and send them in batches of equal-sized
    /// datagrams to one destination.
    fn transmit_session(
        &self,
        s: &mut SessionState,
        now: Instant,
        out: &mut Vec<u8>,
        stalled: &mut VecDeque<Batch>,
    ) {
        let (to, framing) = match &s.path {
            Path::Direct(a) => (*a, None),
            Path::Relay { server, framing } => (*server, Some(framing.clone())),
            Path::Channel(tx) => return self.transmit_channel(s, now, out, tx.clone()),
            Path::Via { socket, to } => return self.transmit_via(s, now, out, socket.clone(), *to),
        };
        let overhead = framing.as_ref().map_or(0, |f| f.overhead());
        let max_segs = self.udp.max_gso_segments().clamp(1, 64);
        out.clear();
        let (mut seg, mut count) = (0usize, 0usize);
        while stalled.is_empty() {
            let start = out.len();
            out.resize(start + overhead, 0);
            if s.session.poll_transmit(now, out).is_none() {
                out.truncate(start);
                break;
            }
            if let Some(f) = &framing {
                f.seal(&mut out[start..]);
            }
            let len = out.len() - start;
            let fits = count < max_segs && out.len() <= GSO_BYTES;
            if count > 0 && len == seg && fits {
                count += 1;
            } else if count > 0 && len < seg && fits {
                // A shorter datagram ends a batch.
                self.flush(to, out, seg, out.len(), stalled);
                count = 0;
                continue;
            } else {
                // The first of a batch, or one that does not fit: start a new batch.
                self.flush(to, out, seg, start, stalled);
                (seg, count) = (len, 1);
            }
            if count >= max_segs {
                self.flush(to, out, seg, out.len(), stalled);
                count = 0;
            }
        }
        // What is left (after a stall, too) is kept in order.
        self.flush(to, out, seg.max(1), out.len(), stalled);
    }

    /// Send every datagram the session has ready from `socket` (a birthday socket), one at a
    /// time; drop those the socket will not take now (selective repeat resends them).
    fn transmit_via(
        &self,
        s: &mut SessionState,
        now: Instant,
        out: &mut Vec<u8>,
        socket: Arc<UdpSocket>,
        to: SocketAddr,
    ) {
        let to = match socket.local_addr() {
            Ok(local) => crate::dualstack::for_socket(local, to),
            Err(_) => to,
        };
        loop {
            out.clear();
            if s.session.poll_transmit(now, out).is_none() {
                break;
            }
            match socket.try_send_to(out, to) {
                Ok(_) => bump(&self.stats.sent),
                Err(_) => bump(&self.stats.send_errors),
            }
        }
        out.clear();
    }

    /// Hand every datagram the session has ready to `tx`, one message each; drop those
    /// that do not fit (the selective-repeat layer resends what is lost).
    fn transmit_channel(
        &self,
        s: &mut SessionState,
        now: Instant,
        out: &mut Vec<u8>,
        tx: mpsc::Sender<Vec<u8>>,
    ) {
        loop {
            out.clear();
            if s.session.poll_transmit(now, out).is_none() {
                break;
            }
            match tx.try_send(out.clone()) {
                Ok(()) => bump(&self.stats.sent),
                Err(_) => bump(&self.stats.send_errors),
            }
        }
        out.clear();
    }
}

/// Run a session's path machine: its timers, its events (birthday sockets, moves of the
/// session's send path) and its transmits (probes, replies, relay binds).
fn drive_paths(
    id: SessionId,
    s: &mut SessionState,
    now: Instant,
    main: &UdpSocket,
    stats: &EndpointStats,
    link: Option<&Link>,
) {
    let SessionState { paths: Some(p), session, path, watch, .. } = s else { return };
    if p.paths.poll_timeout().is_some_and(|t| t <= now) {
        p.paths.handle_timeout(now);
    }
    while let Some(ev) = p.paths.poll_event() {
        match ev {
            PathEvent::OpenBirthdaySockets(n) => {
                if let (Some(link), Ok(local)) = (link, main.local_addr()) {
                    p.open_birthday(id, n, local.ip(), &link.cmds);
                }
            }
            PathEvent::CloseBirthdaySockets { keep } => p.close_birthday(keep),
            PathEvent::Switched { path: to, lost } => {
                if let Some(ep) = p.endpoint_path(to) {
                    // Another path: its MTU is unknown again (RFC 8899 §5.2).
                    session.on_path_change(now, ep.overhead());
                    if lost {
                        session.path_lost(now);
                    }
                    *path = ep;
                    *watch = None;
                }
            }
        }
        p.note_event(id, &ev);
    }
    p.paths.set_in_flight(session.stats().in_flight);
    while let Some(t) = p.paths.poll_transmit(now) {
        if matches!(t.payload, q2q_netstack::path::Payload::Probe(_)) {
            bump(&stats.probes);
        }
        if p.send(main, t) {
            bump(&stats.sent);
        } else {
            bump(&stats.send_errors);
        }
    }
}

/// Act on one session event.
fn on_event(s: &mut SessionState, ev: Event, link: Option<&Link>) {
    trace!(session = %s.session.id(), event = ?ev, "event");
    match ev {
        Event::Incoming => {
            while let Some(stream) = s.session.accept() {
                let sid = s.session.id();
                let Some(link) = link else {
                    let _ = s.session.abort(stream);
                    continue;
                };
                let pipes = Pipes::new((sid, stream));
                let handle = PtcpStream::new(pipes.clone(), link.clone());
                s.streams.insert(stream, pipes.clone());
                if s.incoming.try_send(handle).is_err() {
                    // Backlog full or nobody accepts: refuse. The handle just dropped
                    // marked the pipes; the abort wins.
                    let _ = s.session.abort(stream);
                    s.streams.remove(&stream);
                } else {
                    pump(s, &pipes);
                }
            }
        }
        Event::Connected(stream) => {
            if let Some(reply) = s.opening.remove(&stream) {
                let pipes = s.streams.get(&stream).cloned();
                match (pipes, link) {
                    (Some(pipes), Some(link)) => {
                        let handle = PtcpStream::new(pipes.clone(), link.clone());
                        if let Err(Ok(h)) = reply.send(Ok(handle)) {
                            // The opener went away: dropping the handle closes the stream.
                            drop(h);
                        }
                        pump(s, &pipes);
                    }
                    _ => {
                        let _ = s.session.abort(stream);
                    }
                }
            }
        }
        Event::Readable(stream) | Event::Writable(stream) | Event::Finished(stream) => {
            if let Some(p) = s.streams.get(&stream).cloned() {
                pump(s, &p);
            }
        }
        Event::Reset(stream) => {
            if let Some(reply) = s.opening.remove(&stream) {
                let _ = reply.send(Err(EndpointError::Refused(StreamFailure::Refused)));
            }
            if let Some(p) = s.streams.get(&stream) {
                p.fail(StreamFailure::Reset);
            }
            // Release it in the session.
            let _ = s.session.abort(stream);
        }
        Event::TimedOut(stream) => {
            let failure = match s.session.error() {
                Some(err) => stream_failure(err),
                None => StreamFailure::TimedOut(s.session.config().idle_timeout.total_millis()),
            };
            if let Some(reply) = s.opening.remove(&stream) {
                let _ = reply.send(Err(EndpointError::Refused(failure)));
            }
            if let Some(p) = s.streams.remove(&stream) {
                p.fail(failure);
            }
        }
        Event::Closed(stream) => {
            if let Some(reply) = s.opening.remove(&stream) {
                let _ = reply.send(Err(EndpointError::Refused(StreamFailure::Reset)));
            }
            if let Some(p) = s.streams.remove(&stream) {
                let mut st = p.lock();
                if !st.rx_eof && st.error.is_none() && !st.dropped {
                    st.rx_eof = true;
                }
                wake_both(&mut st);
            }
        }
        Event::SessionLost(err) => {
            *s.lost.lock().unwrap_or_else(|e| e.into_inner()) = Some(err);
            for (_, reply) in s.opening.drain() {
                let _ = reply.send(Err(EndpointError::SessionLost(err)));
            }
            for (_, p) in s.streams.drain() {
                p.fail(stream_failure(err));
            }
            // Closing the accept channel ends `accept()` with the reason in `lost`.
            let (closed, _) = mpsc::channel(1);
            s.incoming = closed;
        }
    }
}

/// What a stream's user is told when its session ended for `err`.
fn stream_failure(err: SessionError) -> StreamFailure {
    match err {
        SessionError::TimedOut(ms) => StreamFailure::TimedOut(ms),
        // The session ended under attack: its streams are reset.
        SessionError::Forgeries => StreamFailure::Reset,
    }
}

/// Log a session's counters and, per stream, what waits where (debug level): the stack's
/// send and receive queues and the pipes' bytes. Where a transfer stalls shows here.
fn report(id: SessionId, s: &mut SessionState) {
    if s.streams.is_empty() {
        return;
    }
    let st = s.session.stats();
    debug!(
        session = %id,
        srtt_us = st.srtt.total_micros(),
        min_rtt_us = st.min_rtt.total_micros(),
        cwnd = st.cwnd,
        in_flight = st.in_flight,
        bw_mbps = st.bandwidth_bps / 1e6,
        sent = st.sender.packets_sent,
        retx = st.sender.retransmits,
        lost = st.sender.declared_lost,
        rtos = st.sender.rtos,
        spurious = st.sender.spurious,
        received = st.receiver.packets_received,
        dups = st.receiver.duplicates,
        acks = st.receiver.acks_sent,
        beyond = st.receiver.beyond_window,
        frags = st.receiver.fragments_received,
        fdrop = st.receiver.fragments_dropped,
        reasm = st.receiver.reassembled,
        fsent = st.sender.fragments_sent,
        plpmtu = st.plpmtu,
        seg = ?st.segmented,
        coal = st.coalesced,
        zwack = st.zero_window_acks,
        reopened = st.reopened_windows,
        buffers = st.buffer_bytes,
        paced = st.sender.paced,
        capped = st.sender.capped,
        "session report"
    );
    for (sid, p) in &s.streams {
        let (pipe_rx, pipe_tx, stalled) = {
            let l = p.lock();
            (l.rx.len(), l.tx.len(), l.rx_stalled)
        };
        debug!(
            session = %id,
            stream = %sid,
            state = ?s.session.stream_state(*sid).ok(),
            send_queue = s.session.send_queue(*sid).unwrap_or(0),
            recv_queue = s.session.recv_queue(*sid).unwrap_or(0),
            pipe_rx,
            pipe_tx,
            stalled,
            "stream report"
        );
    }
}

/// Move bytes between a stream's pipes and its session (see [`crate::pipe::pump`]).
fn pump(s: &mut SessionState, p: &Arc<Pipes>) {
    let id = p.key.1;
    if s.opening.contains_key(&id) {
        return;
    }
    crate::pipe::pump(&mut SessionStream { s, id }, p);
}

/// One stream of a session, as the pipes see it.
struct SessionStream<'a> {
    s: &'a mut SessionState,
    id: StreamId,
}

impl StreamIo for SessionStream<'_> {
    fn recv_with(&mut self, max: usize, f: &mut dyn FnMut(&[u8])) -> Result<usize, IoError> {
        self.s.session.recv_with(self.id, max, f).map_err(io_error)
    }

    fn send(&mut self, data: &[u8]) -> Result<usize, IoError> {
        self.s.session.send(self.id, data).map_err(io_error)
    }

    fn close(&mut self) {
        let _ = self.s.session.close(self.id);
    }

    fn abort(&mut self) {
        if self.s.streams.remove(&self.id).is_some() {
            let _ = self.s.session.abort(self.id);
        }
    }

    fn set_nodelay(&mut self, nodelay: bool) {
        let _ = self.s.session.set_nodelay(self.id, nodelay);
    }
}

fn io_error(e: StreamError) -> IoError {
    match e {
        StreamError::Blocked => IoError::Blocked,
        StreamError::Reset => IoError::Reset,
        _ => IoError::Closed,
    }
}
