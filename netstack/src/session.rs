//! A PTCP peer session: a smoltcp interface whose link is the selective-repeat layer,
//! carrying many TCP streams to one peer.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Wake, Waker};

use smoltcp::iface::{Config as IfaceConfig, Interface, SocketHandle, SocketSet};
use smoltcp::socket::{AnySocket, tcp};
use smoltcp::time::{Duration, Instant};
use smoltcp::wire::{HardwareAddress, IpAddress, IpCidr, IpEndpoint, Ipv4Address};
use tracing::{debug, trace};

use crate::budget::Lease;
use crate::config::Config;
use crate::device::{Arrived, LinkDevice};
use crate::seal::{self, SealError, Sealer, SessionKeys};
use crate::sr::receiver::{Receiver, ReceiverStats};
use crate::sr::sender::{Next, Sender, SenderStats};
use crate::tcp_io;
use crate::wire::{Data, Datagram, Fragment, Kind, PmtuAck, SessionId, WireError};

/// The TCP port every stream is opened to and accepted on, on both sides. Streams are told
/// apart by the opener's (ephemeral) port; nothing here ever reaches a kernel.
pub const ACCEPT_PORT: u16 = 1;
const EPHEMERAL_FIRST: u16 = 1024;
/// Probe acknowledgements queued at most; a flood of probes gets no more answers.
const MAX_QUEUED_PROBE_ACKS: usize = 64;
/// The TCP clock stops when the selective-repeat layer has unacknowledged packets and
/// nothing arrived from the peer for this long (µs), well below smoltcp's 1 s minimum RTO.
const TCP_FREEZE_SILENCE_US: i64 = 250_000;

/// The least a stream's TCP send buffer may hold, sent and unsent (bytes): see
/// [`Session::send_limit`].
const SEND_QUEUE_MIN: usize = 512 << 10;

/// Which end of the session this is. It only picks the overlay addresses (initiator
/// `100.127.0.1`, responder `100.127.0.2`, from the shared address space no kernel sees
/// here); both ends open and accept streams alike.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The end that started the session (the caller of `connect`).
    Initiator,
    /// The end that answered.
    Responder,
}

impl Side {
    /// (local, remote) overlay addresses.
    fn addresses(self) -> (Ipv4Address, Ipv4Address) {
        let a = Ipv4Address::new(100, 127, 0, 1);
        let b = Ipv4Address::new(100, 127, 0, 2);
        match self {
            Side::Initiator => (a, b),
            Side::Responder => (b, a),
        }
    }
}

/// A stream of a session. Ids are never reused within a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StreamId(pub u64);

impl std::fmt::Display for StreamId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// What happened, for the driver to act on ([`Session::poll_event`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// A stream opened by the peer is established: take it with [`Session::accept`].
    Incoming,
    /// A stream opened with [`Session::open_stream`] is established.
    Connected(StreamId),
    /// [`Session::recv`] returned `Blocked` and now has data, the end of the stream or an
    /// error to give.
    Readable(StreamId),
    /// [`Session::send`] accepted less than offered and now has room (or an error to give).
    Writable(StreamId),
    /// The peer finished sending (FIN): once the buffered data is read, `recv` returns 0.
    Finished(StreamId),
    /// The stream was reset by the peer (or refused); calls now fail with `Reset`. Release
    /// it with [`Session::close`] or [`Session::abort`].
    Reset(StreamId),
    /// The session was lost while this stream was open.
    TimedOut(StreamId),
    /// The stream is closed in both directions and released; its id is gone.
    Closed(StreamId),
    /// The session is over (after `TimedOut` for each open stream).
    SessionLost(SessionError),
}

/// Why a session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SessionError {
    /// Nothing arrived from the peer for the idle timeout: it is gone or unreachable.
    #[error("peer silent for {0} ms: session timed out")]
    TimedOut(u64),
    /// More sealed datagrams failed to open than the AEAD's integrity limit allows
    /// ([`seal::INTEGRITY_LIMIT`]): the keys may no longer be trusted.
    #[error("too many forged datagrams: session ended")]
    Forgeries,
}

/// Why a datagram was not taken by a session. The caller counts and drops it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DatagramError {
    /// It does not parse (unknown version or kind, truncated, malformed).
    #[error(transparent)]
    Wire(#[from] WireError),
    /// It belongs to another session.
    #[error("datagram for session {got}, this is {expected}")]
    WrongSession {
        /// This session.
        expected: SessionId,
        /// The datagram's.
        got: SessionId,
    },
    /// It is not a PTCP datagram (who-am-i, probe, relay).
    #[error("not a PTCP datagram: {0:?}")]
    NotPtcp(Kind),
    /// The session has ended.
    #[error("session lost")]
    SessionLost,
    /// A sealed datagram that did not open (forged, replayed, or before our keys).
    #[error(transparent)]
    Sealed(#[from] SealError),
    /// A plain PTCP datagram after the peer's datagrams are sealed: injected by someone
    /// else.
    #[error("plain datagram in a sealed session")]
    Unsealed,
}

/// Why a stream operation failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum StreamError {
    /// No such stream (never opened, or closed and released).
    #[error("unknown stream")]
    Unknown,
    /// Nothing to read now; an [`Event::Readable`] follows when there is.
    #[error("no data yet")]
    Blocked,
    /// The sending half is closed (by [`Session::close`]).
    #[error("stream closed for sending")]
    Closed,
    /// The peer reset the stream, or refused it.
    #[error("stream reset by peer")]
    Reset,
    /// The session is lost: the peer timed out.
    #[error("session lost: peer timed out")]
    SessionLost,
    /// No stream can be opened: too many open, or no free port.
    #[error("too many streams")]
    TooManyStreams,
}

/// Counters and estimates of a session.
#[derive(Debug, Clone, Copy, Default)]
pub struct Stats {
    /// Selective-repeat sender counters.
    pub sender: SenderStats,
    /// Selective-repeat receiver counters.
    pub receiver: ReceiverStats,
    /// Smoothed RTT of the link.
    pub srtt: Duration,
    /// Smallest RTT seen.
    pub min_rtt: Duration,
    /// Congestion window (in-flight cap) in bytes.
    pub cwnd: u64,
    /// Bytes in flight.
    pub in_flight: u64,
    /// Estimated bottleneck bandwidth in bits per second.
    pub bandwidth_bps: f64,
    /// Datagrams dropped because they did not parse (unknown version/kind, malformed).
    pub malformed: u64,
    /// Datagrams for another session.
    pub wrong_session: u64,
    /// Open streams.
    pub streams: usize,
    /// Bytes of TCP buffers (receive + send) the session's sockets hold now, sockets
    /// listening for the peer's streams included: what the streams lease from
    /// [`crate::Config::stream_buffer_budget`].
    pub buffer_bytes: usize,
    /// Whether the peer's datagrams arrive sealed ([`crate::seal`]).
    pub sealed: bool,
    /// Datagrams refused by sealing: forged, replayed, or plain after the switch.
    pub refused: u64,
    /// The current packetization-layer path MTU (RFC 8899): the largest datagram this
    /// session sends outside probes, in bytes of UDP payload. Packets that would make
    /// larger `Data` datagrams go out as several `Fragment`s.
    pub plpmtu: usize,
    /// TCP segments longer than the link's MTU that segmentation offload cut
    /// ([`crate::Config::segment_offload`]), and the packets cut from them.
    pub segmented: (u64, u64),
    /// TCP segments from the peer joined to the one before them for smoltcp (receive
    /// offload, on with segmentation offload).
    pub coalesced: u64,
    /// Pure ACKs put before segments that met this side's closed receive window, so smoltcp
    /// reads their acknowledgment (see the `zero_window` module).
    pub zero_window_acks: u64,
    /// Windows the peer reopened after closing them, each followed by duplicate ACKs that
    /// make smoltcp resend what the peer dropped (see `zero_window`).
    pub reopened_windows: u64,
}

struct StreamWaker {
    id: StreamId,
    flagged: AtomicBool,
    dirty: Arc<Mutex<Vec<StreamId>>>,
}

impl Wake for StreamWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }
    fn wake_by_ref(self: &Arc<Self>) {
        if !self.flagged.swap(true, Ordering::Relaxed) {
            self.dirty.lock().unwrap_or_else(|e| e.into_inner()).push(self.id);
        }
    }
}

struct Stream {
    handle: SocketHandle,
    incoming: bool,
    local_port: u16,
    remote_port: u16,
    connected: bool,
    peer_fin: bool,
    reset: bool,
    released: bool,
    want_read: bool,
    want_write: bool,
    prev: tcp::State,
    waker: Arc<StreamWaker>,
}

/// A PTCP session with one peer. See the crate docs for the polling contract.
pub struct Session {
    id: SessionId,
    config: Config,
    local: Ipv4Address,
    remote: Ipv4Address,
    iface: Interface,
    sockets: SocketSet<'static>,
    /// What each socket's buffers hold of the config's budget; dropped with the socket.
    leases: HashMap<SocketHandle, Lease>,
    device: LinkDevice,
    sender: Sender,
    receiver: Receiver,
    streams: HashMap<StreamId, Stream>,
    next_stream: u64,
    listeners: Vec<SocketHandle>,
    incoming_ports: HashSet<u16>,
    accept_queue: VecDeque<StreamId>,
    used_ports: HashSet<u16>,
    next_port: u16,
    dirty: Arc<Mutex<Vec<StreamId>>>,
    events: VecDeque<Event>,
    ctrl: VecDeque<Vec<u8>>,
    need_poll: bool,
    iface_next: Option<i64>,
    pacer_wait: Option<i64>,
    last_rx: i64,
    last_send: i64,
    lost: Option<SessionError>,
    malformed: u64,
    wrong_session: u64,
    side: Side,
    /// The session's keys, once installed ([`Session::install_keys`]).
    sealer: Option<Sealer>,
    /// Datagrams refused by sealing.
    refused: u64,
    /// Segments joined by receive offload (`Stats::coalesced`).
    coalesced: u64,
    /// Probe acknowledgements waiting in `ctrl`.
    probe_acks: usize,
    /// The TCP clock (what smoltcp is given) runs this many µs behind `now`: the time it
    /// stood still. See [`Session::tcp_time`].
    tcp_lag: i64,
    /// Since when (µs, real time) the TCP clock stands still, if it does.
    tcp_frozen_since: Option<i64>,
    /// The last real time the TCP clock was read while running.
    tcp_read_at: i64,
    /// The latest `now` we were given: deadlines already due are reported as this.
    last_now: i64,
}

fn micros(t: Instant) -> i64 {
    t.total_micros()
}

/// What [`Session::take_packet`] takes: a whole packet, or a fragment of one.
enum Packet<'a, 'd> {
    Whole(&'a Data<'d>),
    Piece(&'a Fragment<'d>),
}

fn dur_us(d: Duration) -> i64 {
    d.total_micros() as i64
}

impl Session {
    /// A new session with id `id` (random, chosen by the caller and agreed with the peer).
    pub fn new(id: SessionId, side: Side, config: Config, now: Instant) -> Session {
        let (local, remote) = side.addresses();
        let mtu = config.ip_mtu().max(576);
        let mut device = LinkDevice::new(mtu, config.device_queue_packets.max(4))
            .with_segmentation(config.segment_offload);
        let mut icfg = IfaceConfig::new(HardwareAddress::Ip);
        icfg.random_seed = id.0 ^ if side == Side::Initiator { 0x5a5a } else { 0xa5a5 };
        let mut iface = Interface::new(icfg, &mut device, now);
        iface.update_ip_addrs(|addrs| {
            // A fresh interface has room for this one address.
            let _ = addrs.push(IpCidr::new(IpAddress::Ipv4(local), 24));
        });
        let now_us = micros(now);
        let mut sender = Sender::new(
            id,
            config.link_payload as u64,
            config.initial_cwnd_packets,
            dur_us(config.initial_rtt),
            config.window_packets.clamp(16, 1 << 30),
            dur_us(config.pacing_burst),
            dur_us(config.min_rto),
            dur_us(config.max_rto),
            dur_us(config.max_ack_delay),
            config.max_plpmtu,
        );
        sender.cc.rtt_floor = dur_us(config.cwnd_rtt_floor);
        let receiver = Receiver::new(
            id,
            config.window_packets.clamp(16, 1 << 30),
            config.ack_every,
            dur_us(config.max_ack_delay),
            mtu,
        );
        Session {
            id,
            local,
            remote,
            iface,
            sockets: SocketSet::new(Vec::new()),
            leases: HashMap::new(),
            device,
            sender,
            receiver,
            streams: HashMap::new(),
            next_stream: 0,
            listeners: Vec::new(),
            incoming_ports: HashSet::new(),
            accept_queue: VecDeque::new(),
            used_ports: HashSet::new(),
            next_port: EPHEMERAL_FIRST,
            dirty: Arc::new(Mutex::new(Vec::new())),
            events: VecDeque::new(),
            ctrl: VecDeque::new(),
            need_poll: false,
            iface_next: None,
            pacer_wait: None,
            last_rx: now_us,
            last_send: now_us,
            lost: None,
            malformed: 0,
            wrong_session: 0,
            side,
            sealer: None,
            refused: 0,
            coalesced: 0,
            probe_acks: 0,
            tcp_lag: 0,
            tcp_frozen_since: None,
            tcp_read_at: now_us,
            last_now: now_us,
            config,
        }
    }

    /// This session's id.
    pub fn id(&self) -> SessionId {
        self.id
    }

    /// The settings it runs with.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Why the session ended, if it has.
    pub fn error(&self) -> Option<SessionError> {
        self.lost
    }

    /// Counters and estimates.
    pub fn stats(&self) -> Stats {
        Stats {
            sender: self.sender.stats,
            receiver: self.receiver.stats,
            srtt: Duration::from_micros(self.sender.rtt.smoothed.max(0) as u64),
            min_rtt: Duration::from_micros(if self.sender.rtt.min == i64::MAX {
                0
            } else {
                self.sender.rtt.min as u64
            }),
            cwnd: self.sender.cc.cwnd,
            in_flight: self.sender.bytes_in_flight(),
            bandwidth_bps: self.sender.cc.bandwidth() * 8.0,
            malformed: self.malformed,
            wrong_session: self.wrong_session,
            streams: self.streams.len(),
            buffer_bytes: self
                .sockets
                .iter()
                .filter_map(|(_, s)| tcp::Socket::downcast(s))
                .map(|t| t.recv_capacity() + t.send_capacity())
                .sum(),
            plpmtu: self.sender.pmtu.plpmtu,
            sealed: self.sealer.as_ref().is_some_and(|s| s.peer_sealed),
            refused: self.refused,
            segmented: self.device.segmented(),
            coalesced: self.coalesced,
            zero_window_acks: self.device.closed.rescued,
            reopened_windows: self.device.closed.reopened,
        }
    }

    /// Install the session's keys (taken from the TLS exporter once both identities are
    /// proven; see [`crate::seal`]). `send_sealed`: seal what we send from now on. The
    /// side that confirms the handshake passes `false` and starts sealing when the
    /// peer's first sealed datagram opens; the other side learns from that confirmation
    /// that its peer has the keys, and passes `true`. Installing twice keeps the first.
    pub fn install_keys(&mut self, keys: &SessionKeys, send_sealed: bool) {
        if self.sealer.is_some() {
            return;
        }
        let (tx, rx) = match self.side {
            Side::Initiator => (&keys.initiator, &keys.responder),
            Side::Responder => (&keys.responder, &keys.initiator),
        };
        self.sealer = Some(Sealer::new(tx, rx, send_sealed));
        debug!(session = %self.id, send_sealed, "session keys installed");
    }

    // ---- datagrams in and out -------------------------------------------------------

    /// Take a datagram received from the peer (from whatever address: the session is keyed
    /// by its id only). Errors are for counting; the datagram is dropped.
    ///
    /// Once the session has keys, a sealed datagram is opened first (and refused if it
    /// does not open); once the peer's datagrams arrive sealed, plain ones are refused. Only
    /// a datagram taken (`Ok`) shows that the peer is alive. A sealed datagram is opened
    /// in place: `datagram` holds something else afterwards (the caller's receive buffer,
    /// so no copy is made on the way in).
    pub fn handle_datagram(
        &mut self,
        now: Instant,
        datagram: &mut [u8],
    ) -> Result<(), DatagramError> {
        if self.lost.is_some() {
            return Err(DatagramError::SessionLost);
        }
        let parsed = match Datagram::parse(datagram) {
            Ok(d) => d,
            Err(e) => {
                self.malformed += 1;
                return Err(e.into());
            }
        };
        match parsed {
            Datagram::Sealed(id) if id == self.id => self.handle_sealed(now, datagram),
            Datagram::Sealed(_) => self.handle(now, parsed, datagram.len()),
            Datagram::Other(kind) => Err(DatagramError::NotPtcp(kind)),
            _ if self.sealer.as_ref().is_some_and(|s| s.refuses_plain(micros(now))) => {
                self.refused += 1;
                Err(DatagramError::Unsealed)
            }
            _ => self.handle(now, parsed, datagram.len()),
        }
    }

    fn handle_sealed(&mut self, now: Instant, datagram: &mut [u8]) -> Result<(), DatagramError> {
        let Some(sealer) = &mut self.sealer else {
            self.refused += 1;
            return Err(SealError::NoKeys.into());
        };
        let wire_len = datagram.len();
        let opened = sealer.open(micros(now), datagram);
        let forged = sealer.forged;
        match opened {
            Err(e) => {
                self.refused += 1;
                if forged >= seal::INTEGRITY_LIMIT {
                    self.lose(SessionError::Forgeries);
                }
                Err(e.into())
            }
            Ok(plain) => match Datagram::parse(plain) {
                Ok(Datagram::Sealed(_) | Datagram::Other(_)) => {
                    self.malformed += 1;
                    Err(WireError::Malformed("sealed datagram holds no PTCP datagram").into())
                }
                Ok(inner) => self.handle(now, inner, wire_len),
                Err(e) => {
                    self.malformed += 1;
                    Err(e.into())
                }
            },
        }
    }

    /// Take a parsed plain datagram (opened already if it came sealed); `wire_len` is the
    /// length it had on the wire (what a path-MTU probe measured).
    fn handle(
        &mut self,
        now: Instant,
        datagram: Datagram<'_>,
        wire_len: usize,
    ) -> Result<(), DatagramError> {
        let now_us = micros(now);
        self.last_now = self.last_now.max(now_us);
        if datagram.session() == Some(self.id) {
            self.thaw_tcp(now_us);
        }
        match datagram {
            Datagram::Data(d) if d.session == self.id => {
                self.take_packet(now_us, Packet::Whole(&d));
                Ok(())
            }
            Datagram::Ack(a) if a.session == self.id => {
                self.last_rx = now_us;
                self.sender.on_ack(now_us, &a, &mut self.device.pool);
                Ok(())
            }
            Datagram::Fragment(f) if f.session == self.id => {
                self.take_packet(now_us, Packet::Piece(&f));
                Ok(())
            }
            Datagram::PmtuProbe(p) if p.session == self.id => {
                self.last_rx = now_us;
                if self.probe_acks < MAX_QUEUED_PROBE_ACKS {
                    let mut out = Vec::with_capacity(PmtuAck::LEN);
                    PmtuAck::emit(self.id, p.id, wire_len, &mut out);
                    self.ctrl.push_back(out);
                    self.probe_acks += 1;
                }
                Ok(())
            }
            Datagram::PmtuAck(a) if a.session == self.id => {
                self.last_rx = now_us;
                self.sender.on_probe_ack(now_us, a.id, usize::from(a.size));
                Ok(())
            }
            Datagram::Data(_)
            | Datagram::Ack(_)
            | Datagram::Fragment(_)
            | Datagram::PmtuProbe(_)
            | Datagram::PmtuAck(_)
            | Datagram::Sealed(_) => {
                self.wrong_session += 1;
                let got = datagram.session().unwrap_or(SessionId(0));
                Err(DatagramError::WrongSession { expected: self.id, got })
            }
            Datagram::Other(kind) => Err(DatagramError::NotPtcp(kind)),
        }
    }

    /// The driver moved the session off a path that died (e.g. from a direct path back to a
    /// relay): resend what was in flight on it now, and restart the retransmission timer
    /// without the backoff the dead path built up.
    pub fn path_lost(&mut self, now: Instant) {
        let now = micros(now);
        self.last_now = self.last_now.max(now);
        self.sender.on_path_lost(now);
    }

    /// The driver moved the session to another path (relay → direct, direct → relay, a new
    /// address) whose framing adds `overhead` bytes in front of each datagram (0 for a
    /// direct path, the relay header for a relayed one). The path MTU is unknown again:
    /// the PLPMTU goes back to [`crate::pmtu::BASE_PLPMTU`] minus `overhead` and the search
    /// starts over (RFC 8899 §5.2). So are its round trip and bandwidth: congestion control
    /// starts up again from the initial window and RTT (RFC 9000 §9.4), and what was sent on
    /// the old path gives no samples. Call it on every move, and [`Session::path_lost`] as
    /// well when the old path died.
    pub fn on_path_change(&mut self, now: Instant, overhead: usize) {
        let now = micros(now);
        self.last_now = self.last_now.max(now);
        self.sender.on_path_change(now, overhead);
    }

    /// Run timers that are due. [`Session::poll_transmit`] does this too.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.run_timers(micros(now));
    }

    fn run_timers(&mut self, now: i64) {
        self.last_now = self.last_now.max(now);
        if self.lost.is_some() {
            return;
        }
        let idle = dur_us(self.config.idle_timeout);
        if now - self.last_rx >= idle {
            self.lose(SessionError::TimedOut((idle / 1000) as u64));
            return;
        }
        if self.sender.rto_deadline().is_some_and(|d| d <= now) {
            self.sender.on_rto(now);
            trace!(session = %self.id, rto = self.sender.stats.rtos, "retransmission timeout");
        }
        self.tcp_time(now);
        let plpmtu = self.sender.pmtu.plpmtu;
        self.sender.on_pmtu_timer(now);
        if self.sender.pmtu.plpmtu != plpmtu {
            debug!(session = %self.id, plpmtu = self.sender.pmtu.plpmtu, "path mtu changed");
        }
        if now - self.last_send >= dur_us(self.config.keepalive) && self.device.tx.is_empty() {
            // An empty Data datagram: sequenced, acknowledged, never handed to smoltcp.
            self.device.tx.push_back(Vec::new());
            self.last_send = now;
        }
    }

    fn lose(&mut self, err: SessionError) {
        debug!(session = %self.id, error = %err, "session lost");
        self.lost = Some(err);
        let mut ids: Vec<StreamId> = self.streams.keys().copied().collect();
        ids.sort_unstable();
        for id in ids {
            self.events.push_back(Event::TimedOut(id));
        }
        self.events.push_back(Event::SessionLost(err));
        self.ctrl.clear();
    }

    /// Append the next datagram to send to `out` and return its length, or `None` when there
    /// is nothing to send now (call again after [`Session::poll_timeout`] or any input).
    ///
    /// Once the session seals ([`Session::install_keys`]), every datagram comes out sealed.
    pub fn poll_transmit(&mut self, now: Instant, out: &mut Vec<u8>) -> Option<usize> {
        let start = out.len();
        self.poll_plain(now, out)?;
        if let Some(s) = self.sealer.as_mut().filter(|s| s.sending) {
            s.seal(out, start);
        }
        Some(out.len() - start)
    }

    /// Append the next plain datagram to `out`.
    fn poll_plain(&mut self, now: Instant, out: &mut Vec<u8>) -> Option<usize> {
        let now_us = micros(now);
        self.run_timers(now_us);
        if self.lost.is_some() {
            return None;
        }
        if self.ctrl.is_empty() && self.receiver.ack_due(now_us) {
            // ACKs stay within the path MTU too.
            let max_len = self
                .sender
                .pmtu
                .plpmtu
                .min(self.config.link_payload)
                .saturating_sub(seal::OVERHEAD);
            self.receiver.build_acks(now_us, max_len, &mut self.ctrl);
        }
        if let Some(d) = self.ctrl.pop_front() {
            if d.get(1) == Some(&(Kind::PmtuAck as u8)) {
                self.probe_acks = self.probe_acks.saturating_sub(1);
            }
            out.extend_from_slice(&d);
            return Some(d.len());
        }
        let start = out.len();
        if self.sender.pop_pending(now_us, out) {
            self.last_send = now_us;
            return Some(out.len() - start);
        }
        let sealed = self.sealer.as_ref().is_some_and(|s| s.sending);
        if self.sender.next_probe(now_us, sealed, out) {
            if self.sender.bytes_in_flight() == 0 && self.device.tx.is_empty() {
                // Nothing else would show whether the path is alive while the probe is
                // out: a keepalive's ACK does (see `pmtu`).
                self.device.tx.push_back(Vec::new());
            }
            self.last_send = now_us;
            return Some(out.len() - start);
        }
        let mut polled = false;
        if self.iface_wanted(now_us) {
            self.poll_iface(now);
            polled = true;
        }
        loop {
            match self.sender.next(now_us, &mut self.device.tx, out) {
                Next::Sent => {
                    self.pacer_wait = None;
                    self.last_send = now_us;
                    return Some(out.len() - start);
                }
                Next::Wait(t) => {
                    self.pacer_wait = t;
                    return None;
                }
                Next::Idle if !polled && self.iface_next.is_some_and(|t| t <= now_us) => {
                    // The queue ran dry but smoltcp has more: ask it before calling
                    // ourselves application-limited.
                    self.poll_iface(now);
                    polled = true;
                }
                Next::Idle => {
                    self.sender.mark_app_limited();
                    self.pacer_wait = None;
                    return None;
                }
            }
        }
    }

    /// The next time [`Session::poll_transmit`] (or [`Session::handle_timeout`]) must be
    /// called if nothing arrives before; never earlier than the latest `now` passed in, which
    /// it returns when something is due at once. `None` once the session is lost.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.lost.is_some() {
            return None;
        }
        if !self.ctrl.is_empty()
            || self.need_poll
            || self.sender.has_pending()
            || self.sender.probe_ready()
        {
            return Some(Instant::from_micros(self.last_now));
        }
        let mut t = self.last_rx + dur_us(self.config.idle_timeout);
        t = t.min(self.last_send + dur_us(self.config.keepalive));
        let candidates = [
            self.receiver.ack_deadline(),
            self.pacer_wait,
            self.sender.rto_deadline(),
            self.sender.pmtu.deadline(),
            self.iface_next.filter(|_| self.device.tx.len() <= self.device.tx_limit / 2),
        ];
        for c in candidates.into_iter().flatten() {
            t = t.min(c);
        }
        Some(Instant::from_micros(t.max(self.last_now)))
    }

    /// The next event, if any.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    fn iface_wanted(&self, now: i64) -> bool {
        self.need_poll
            || (self.iface_next.is_some_and(|t| t <= now)
                && self.device.tx.len() <= self.device.tx_limit / 2)
    }

    fn poll_iface(&mut self, now: Instant) {
        self.need_poll = false;
        self.prepare_listeners();
        let now_us = micros(now);
        let tcp_now = self.tcp_time(now_us);
        self.iface.poll(tcp_now, &mut self.device, &mut self.sockets);
        self.after_poll();
        let tcp_now_us = micros(tcp_now);
        let frozen = self.tcp_frozen_since.is_some();
        let lag = self.tcp_lag;
        self.iface_next = self.iface.poll_at(tcp_now, &self.sockets).and_then(|t| {
            let t = micros(t);
            if t <= tcp_now_us {
                // smoltcp says "now" while it has something to send; if the queue still
                // has room it was not able to, so do not spin on it.
                Some(if !self.device.tx_full() { now_us + 100 } else { now_us })
            } else if frozen {
                None // TCP timers wait for the clock to run again
            } else {
                Some(t + lag)
            }
        });
    }

    /// The clock smoltcp's TCP runs on: real time, except that it stands still while the
    /// selective-repeat layer has packets the peer has not acknowledged and nothing arrives
    /// from the peer (an outage) or its retransmission timer is backing off.
    ///
    /// The link below TCP is reliable, so a TCP retransmission timeout is never needed; and
    /// after an outage it is harmful: smoltcp rewinds its send sequence to the oldest
    /// unacknowledged byte on a timeout and stamps its ACKs with that rewound number. When
    /// both ends of a stream do so while their earlier segments are still on their way
    /// (held by the selective-repeat layer during the outage), each end later finds the
    /// other's ACKs below its receive window, drops them (RFC 9293, the segment-arrives rules of section 3.10.7) and the
    /// stream never moves again. Freezing TCP's clock during outages keeps its timers from
    /// firing; the selective-repeat layer does the retransmitting.
    fn tcp_time(&mut self, now: i64) -> Instant {
        let unacked = self.sender.has_unacked();
        let silent = now - self.last_rx >= TCP_FREEZE_SILENCE_US;
        let freeze = unacked && (silent || self.sender.backing_off());
        match self.tcp_frozen_since {
            None if freeze => {
                let from = if silent { self.last_rx + TCP_FREEZE_SILENCE_US } else { now };
                let from = from.max(self.tcp_read_at).min(now);
                self.tcp_frozen_since = Some(from);
            }
            Some(_) if !freeze => self.thaw_tcp(now),
            _ => {}
        }
        let t = match self.tcp_frozen_since {
            Some(from) => from,
            None => {
                self.tcp_read_at = now;
                now
            }
        };
        Instant::from_micros(t - self.tcp_lag)
    }

    fn thaw_tcp(&mut self, now: i64) {
        if let Some(from) = self.tcp_frozen_since.take() {
            self.tcp_lag += (now - from).max(0);
            self.tcp_read_at = now;
            // Its timers are due again, in real time.
            self.need_poll = true;
        }
    }

    // ---- accepting --------------------------------------------------------------------

    /// Make sure a listening socket waits for every new SYN in the receive queue: smoltcp
    /// answers a SYN nobody listens for with a RST, and a listening socket takes only one.
    fn prepare_listeners(&mut self) {
        let mut seen: Vec<u16> = Vec::new();
        for p in &self.device.rx {
            if let Some(port) = syn_to_accept_port(p)
                && !self.incoming_ports.contains(&port)
                && !seen.contains(&port)
            {
                seen.push(port);
            }
        }
        if seen.is_empty() {
            return;
        }
        let pending = self.accept_queue.len()
            + self.streams.values().filter(|s| s.incoming && !s.connected).count();
        let room = self.config.accept_backlog.saturating_sub(pending);
        let room = room.min(self.config.max_streams.saturating_sub(self.streams.len()));
        let want = seen.len().min(room);
        while self.listeners.len() < want {
            let (mut sock, lease) = self.new_socket();
            if sock.listen(ACCEPT_PORT).is_err() {
                break;
            }
            let h = self.add_socket(sock, lease);
            self.listeners.push(h);
        }
    }

    /// A packet (or a fragment of one) from the peer: through the selective-repeat
    /// receiver to smoltcp's queue, joined to the segment before where it continues it.
    fn take_packet(&mut self, now_us: i64, packet: Packet<'_, '_>) {
        self.last_rx = now_us;
        let dev = &mut self.device;
        let coalescing = dev.coalescing();
        let (rx, closed) = (&mut dev.rx, &mut dev.closed);
        let (mut delivered, mut joined) = (false, 0);
        let deliver = |p: Arrived<'_>, pool: &mut Vec<Vec<u8>>| {
            joined += u64::from(crate::device::push_rx(rx, pool, closed, coalescing, p));
            delivered = true;
        };
        match packet {
            Packet::Whole(d) => self.receiver.on_data(now_us, d, &mut dev.pool, deliver),
            Packet::Piece(f) => self.receiver.on_fragment(now_us, f, &mut dev.pool, deliver),
        }
        self.coalesced += joined;
        self.need_poll |= delivered;
    }

    /// A socket with buffers as big as the budget allows (see [`crate::budget`]); the
    /// lease goes with it into [`Session::add_socket`].
    fn new_socket(&self) -> (tcp::Socket<'static>, Lease) {
        let c = &self.config;
        let (rx, tx, lease) = c.stream_buffer_budget.buffers(
            c.stream_rx_buffer,
            c.stream_tx_buffer,
            c.stream_small_buffer,
        );
        let mut s = tcp::Socket::new(rx, tx);
        // No TCP congestion control: the selective-repeat layer below paces and caps what is
        // in flight (`sr::bbr`) and hides every loss, so a TCP controller has nothing to
        // react to and only gets in the way. smoltcp's CUBIC grows by one MSS per ACK, not
        // per MSS acknowledged, so with one coalesced ACK per poll its slow start took
        // seconds on a long path (1.4 s to reach 500 Mbit/s at 20 ms in `sim_bench`).
        s.set_congestion_control(tcp::CongestionControl::None);
        // Delayed ACKs would hold the window back (and made smoltcp send many tiny
        // segments); one ACK per interface poll is already coalesced.
        s.set_ack_delay(None);
        s.set_nagle_enabled(!self.config.nodelay);
        // Liveness is the session's job (keepalive + idle timeout), not each stream's.
        s.set_timeout(None);
        s.set_keep_alive(None);
        (s, lease)
    }

    fn add_socket(&mut self, sock: tcp::Socket<'static>, lease: Lease) -> SocketHandle {
        let h = self.sockets.add(sock);
        self.leases.insert(h, lease);
        h
    }

    /// Remove a socket and return its buffers' bytes to the budget.
    fn remove_socket(&mut self, h: SocketHandle) {
        self.sockets.remove(h);
        self.leases.remove(&h);
    }

    fn after_poll(&mut self) {
        if !self.listeners.is_empty() {
            let mut i = 0;
            while i < self.listeners.len() {
                let h = self.listeners[i];
                let sock = self.sockets.get_mut::<tcp::Socket<'static>>(h);
                match sock.state() {
                    tcp::State::Listen => i += 1,
                    tcp::State::Closed => {
                        self.listeners.swap_remove(i);
                        self.remove_socket(h);
                    }
                    _ => {
                        self.listeners.swap_remove(i);
                        let remote_port = sock.remote_endpoint().map_or(0, |e| e.port);
                        self.incoming_ports.insert(remote_port);
                        let id = self.add_stream(h, true, ACCEPT_PORT, remote_port);
                        self.process_stream(id);
                    }
                }
            }
        }
        let dirty = std::mem::take(&mut *self.dirty.lock().unwrap_or_else(|e| e.into_inner()));
        for id in dirty {
            self.process_stream(id);
        }
    }

    fn add_stream(
        &mut self,
        handle: SocketHandle,
        incoming: bool,
        local_port: u16,
        remote_port: u16,
    ) -> StreamId {
        let id = StreamId(self.next_stream);
        self.next_stream += 1;
        let waker = Arc::new(StreamWaker {
            id,
            flagged: AtomicBool::new(false),
            dirty: self.dirty.clone(),
        });
        let sock = self.sockets.get_mut::<tcp::Socket<'static>>(handle);
        let prev = sock.state();
        let w = Waker::from(waker.clone());
        sock.register_recv_waker(&w);
        sock.register_send_waker(&w);
        self.streams.insert(
            id,
            Stream {
                handle,
                incoming,
                local_port,
                remote_port,
                connected: false,
                peer_fin: false,
                reset: false,
                released: false,
                want_read: false,
                want_write: false,
                prev,
                waker,
            },
        );
        id
    }

    /// Look at a stream whose socket changed and report what the application can see.
    fn process_stream(&mut self, id: StreamId) {
        use tcp::State::*;
        let limit = self.send_limit();
        let Some(st) = self.streams.get_mut(&id) else { return };
        st.waker.flagged.store(false, Ordering::Relaxed);
        let sock = self.sockets.get_mut::<tcp::Socket<'static>>(st.handle);
        let state = sock.state();
        if !st.connected
            && matches!(
                state,
                Established | FinWait1 | FinWait2 | CloseWait | Closing | LastAck | TimeWait
            )
        {
            st.connected = true;
            if st.incoming {
                self.accept_queue.push_back(id);
                self.events.push_back(Event::Incoming);
            } else {
                self.events.push_back(Event::Connected(id));
            }
        }
        if !st.peer_fin && matches!(state, CloseWait | LastAck | Closing | TimeWait) {
            st.peer_fin = true;
            self.events.push_back(Event::Finished(id));
        }
        if state == Closed
            && !st.reset
            && !matches!(st.prev, LastAck | TimeWait | Closed)
            && !st.released
        {
            st.reset = true;
            self.events.push_back(Event::Reset(id));
        }
        if st.want_read && (sock.can_recv() || !sock.may_recv()) {
            st.want_read = false;
            self.events.push_back(Event::Readable(id));
        }
        // Writable again once a quarter of the limit is free, not for every ACK.
        if st.want_write
            && ((sock.can_send() && sock.send_queue() <= limit - limit / 4)
                || (!sock.may_send() && !matches!(state, SynSent | SynReceived)))
        {
            st.want_write = false;
            self.events.push_back(Event::Writable(id));
        }
        st.prev = state;
        if state == Closed && st.released {
            let st_handle = st.handle;
            let (incoming, lp, rp) = (st.incoming, st.local_port, st.remote_port);
            self.streams.remove(&id);
            self.remove_socket(st_handle);
            if incoming {
                self.incoming_ports.remove(&rp);
            } else {
                self.used_ports.remove(&lp);
            }
            self.events.push_back(Event::Closed(id));
            return;
        }
        let w = Waker::from(st.waker.clone());
        sock.register_recv_waker(&w);
        sock.register_send_waker(&w);
    }

    // ---- streams ----------------------------------------------------------------------

    /// Open a stream to the peer. [`Event::Connected`] follows when it is established (or
    /// [`Event::Reset`] if the peer refuses); data sent before is queued.
    pub fn open_stream(&mut self) -> Result<StreamId, StreamError> {
        if self.lost.is_some() {
            return Err(StreamError::SessionLost);
        }
        if self.streams.len() >= self.config.max_streams {
            return Err(StreamError::TooManyStreams);
        }
        let port = self.alloc_port().ok_or(StreamError::TooManyStreams)?;
        let (mut sock, lease) = self.new_socket();
        let remote = IpEndpoint::new(IpAddress::Ipv4(self.remote), ACCEPT_PORT);
        let local = IpEndpoint::new(IpAddress::Ipv4(self.local), port);
        if sock.connect(self.iface.context(), remote, local).is_err() {
            return Err(StreamError::TooManyStreams);
        }
        self.used_ports.insert(port);
        let handle = self.add_socket(sock, lease);
        let id = self.add_stream(handle, false, port, ACCEPT_PORT);
        self.need_poll = true;
        trace!(session = %self.id, stream = %id, port, "open stream");
        Ok(id)
    }

    fn alloc_port(&mut self) -> Option<u16> {
        for _ in 0..=(u16::MAX - EPHEMERAL_FIRST) {
            let p = self.next_port;
            self.next_port = if p == u16::MAX { EPHEMERAL_FIRST } else { p + 1 };
            if !self.used_ports.contains(&p) {
                return Some(p);
            }
        }
        None
    }

    /// Take the next established incoming stream.
    pub fn accept(&mut self) -> Option<StreamId> {
        self.accept_queue.pop_front()
    }

    fn stream_socket(
        &mut self,
        id: StreamId,
    ) -> Result<(&mut Stream, &mut tcp::Socket<'static>), StreamError> {
        if self.lost.is_some() {
            return Err(StreamError::SessionLost);
        }
        let st = self.streams.get_mut(&id).ok_or(StreamError::Unknown)?;
        let sock = self.sockets.get_mut::<tcp::Socket<'static>>(st.handle);
        Ok((st, sock))
    }

    /// Queue bytes on a stream; returns how many were taken (0 when the send buffer is full:
    /// an [`Event::Writable`] follows when there is room).
    pub fn send(&mut self, id: StreamId, data: &[u8]) -> Result<usize, StreamError> {
        let limit = self.send_limit();
        let (st, sock) = self.stream_socket(id)?;
        let room = limit.saturating_sub(sock.send_queue());
        let data = if room < data.len() && sock.may_send() {
            // What the limit held back is asked for again on the Writable event.
            st.want_write = true;
            &data[..room]
        } else {
            data
        };
        let n = tcp_io::send(sock, data, st.reset, HANDSHAKING, &mut st.want_write)?;
        if n > 0 {
            self.need_poll = true;
        }
        Ok(n)
    }

    /// The bytes a stream's TCP send buffer may hold (sent and not yet acknowledged, plus
    /// queued): twice the congestion window, at least [`SEND_QUEUE_MIN`]; the buffer's
    /// own size bounds it too. More than that only waits: on a fast path with a short RTT
    /// the window is small, and filling an 8 MiB buffer anyway put 8 MiB between each
    /// byte's copy in and its copy out, so both missed the CPU caches (with 4 streams,
    /// copying out of smoltcp took 10% of the sender instead of 3%, perf in the lab).
    /// The bytes held back stay in the caller's pipe, which is bounded already; on a long
    /// path the window is large and the buffer's size is the only bound.
    fn send_limit(&self) -> usize {
        let cwnd = usize::try_from(self.sender.cc.cwnd).unwrap_or(usize::MAX);
        cwnd.saturating_mul(2).max(SEND_QUEUE_MIN)
    }

    /// Read bytes from a stream: `Ok(n > 0)` data, `Ok(0)` the end of the stream (the peer
    /// closed and everything was read), `Err(Blocked)` nothing yet (an [`Event::Readable`]
    /// follows).
    pub fn recv(&mut self, id: StreamId, buf: &mut [u8]) -> Result<usize, StreamError> {
        let (st, sock) = self.stream_socket(id)?;
        let n = tcp_io::recv(sock, buf, st.reset, HANDSHAKING, &mut st.want_read)?;
        if n > 0 {
            // Freed receive buffer may open the window: let smoltcp say so.
            self.need_poll = true;
        }
        Ok(n)
    }

    /// [`Session::recv`] without a buffer of the caller's: `f` is given at most `max`
    /// received bytes straight from the stream's buffer, one contiguous piece (call again
    /// for more). Returns how many, with the same `Ok(0)` and errors as [`Session::recv`].
    pub fn recv_with(
        &mut self,
        id: StreamId,
        max: usize,
        f: &mut dyn FnMut(&[u8]),
    ) -> Result<usize, StreamError> {
        let (st, sock) = self.stream_socket(id)?;
        let n = tcp_io::recv_with(sock, max, f, st.reset, HANDSHAKING, &mut st.want_read)?;
        if n > 0 {
            self.need_poll = true;
        }
        Ok(n)
    }

    /// Bytes waiting to be read on a stream.
    pub fn recv_queue(&mut self, id: StreamId) -> Result<usize, StreamError> {
        let (_, sock) = self.stream_socket(id)?;
        Ok(sock.recv_queue())
    }

    /// Bytes [`Session::send`] would take now on a stream.
    pub fn send_space(&mut self, id: StreamId) -> Result<usize, StreamError> {
        let limit = self.send_limit();
        let (_, sock) = self.stream_socket(id)?;
        let free = sock.send_capacity().min(limit).saturating_sub(sock.send_queue());
        Ok(if sock.may_send() { free } else { 0 })
    }

    /// Bytes queued on a stream and not yet acknowledged by the peer.
    pub fn send_queue(&mut self, id: StreamId) -> Result<usize, StreamError> {
        let (_, sock) = self.stream_socket(id)?;
        Ok(sock.send_queue())
    }

    /// Finish sending (FIN after the queued data); reading goes on. The stream is released
    /// (and [`Event::Closed`] reported) once both directions are closed.
    pub fn close(&mut self, id: StreamId) -> Result<(), StreamError> {
        let (st, sock) = self.stream_socket(id)?;
        st.released = true;
        sock.close();
        self.need_poll = true;
        self.process_stream(id);
        Ok(())
    }

    /// Reset the stream (RST) and release it at once; queued data is discarded.
    pub fn abort(&mut self, id: StreamId) -> Result<(), StreamError> {
        let (st, sock) = self.stream_socket(id)?;
        st.released = true;
        sock.abort();
        self.need_poll = true;
        Ok(())
    }

    /// Turn Nagle's algorithm off (`true`) for an interactive stream, or back on.
    pub fn set_nodelay(&mut self, id: StreamId, nodelay: bool) -> Result<(), StreamError> {
        let (_, sock) = self.stream_socket(id)?;
        sock.set_nagle_enabled(!nodelay);
        Ok(())
    }

    /// The TCP state of a stream, for status displays.
    pub fn stream_state(&mut self, id: StreamId) -> Result<tcp::State, StreamError> {
        let (_, sock) = self.stream_socket(id)?;
        Ok(sock.state())
    }

    /// Ids of the open streams.
    pub fn streams(&self) -> impl Iterator<Item = StreamId> + '_ {
        self.streams.keys().copied()
    }
}

/// The source port of a TCP SYN (without ACK) to [`ACCEPT_PORT`] in an IPv4 packet.
fn syn_to_accept_port(p: &[u8]) -> Option<u16> {
    let first = *p.first()?;
    if first >> 4 != 4 || *p.get(9)? != 6 {
        return None;
    }
    let ihl = usize::from(first & 0x0f) * 4;
    let tcp = p.get(ihl..)?;
    let src = u16::from_be_bytes([*tcp.first()?, *tcp.get(1)?]);
    let dst = u16::from_be_bytes([*tcp.get(2)?, *tcp.get(3)?]);
    let flags = *tcp.get(13)?;
    (dst == ACCEPT_PORT && flags & 0x02 != 0 && flags & 0x10 == 0).then_some(src)
}

/// States in which a stream cannot move data yet (its handshake is under way).
const HANDSHAKING: &[tcp::State] = &[tcp::State::SynSent, tcp::State::SynReceived];

impl From<tcp_io::IoError> for StreamError {
    fn from(e: tcp_io::IoError) -> StreamError {
        match e {
            tcp_io::IoError::Blocked => StreamError::Blocked,
            tcp_io::IoError::Closed => StreamError::Closed,
            tcp_io::IoError::Reset => StreamError::Reset,
        }
    }
}
