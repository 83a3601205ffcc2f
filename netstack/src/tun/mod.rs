//! TUN termination: a sans-IO stack that ends the kernel's TCP, UDP and ICMP echo to virtual
//! addresses, so unmodified programs (`ssh alice.q2q`) can talk to a peer through q2q.
//!
//! The driver reads IP packets from the TUN device and hands them to [`Stack::handle_packet`];
//! the stack gives back IP packets to write to it ([`Stack::poll_transmit`]), events
//! ([`Stack::poll_event`]) and the next deadline ([`Stack::poll_timeout`]). No sockets, no
//! clock, no TUN here.
//!
//! ## Layers
//!
//! ```text
//!   kernel (app's connect / send / sendto / ping)
//!        │ IP packets from the TUN device          ▲ IP packets to write to it
//!   ┌────▼─────────────────────────────────────────┴─────┐
//!   │ classify (etherparse): destination in the pool?    │  packet.rs
//!   │  checksums checked unless the kernel vouches       │
//!   │  TCP SYN ─▶ held; Event::Connect ─▶ accept/refuse  │
//!   │  UDP ─────▶ Event::Datagram    (send_datagram ◀─)  │
//!   │             no such service:  port_unreachable ◀─  │
//!   │  echo ────▶ Event::EchoRequest (answer_echo ◀───)  │
//!   │  other TCP (and SYNs replayed on accept) ──┐       │
//!   └────────────────────────────────────────────┼───────┘
//!   ┌────────────────────────────────────────────▼───────┐
//!   │ smoltcp Interface (Medium::Ip, any_ip), one TCP    │  mod.rs
//!   │ socket per accepted flow, listening on exactly the │
//!   │ dialled endpoint; budgeted buffers, Nagle off, MSS │
//!   │ from the TUN MTU, TCP checksums computed (or left  │
//!   │ to the kernel: Config::checksum_offload)           │
//!   └────────────────────────────────────────────┬───────┘
//!        flows: send / recv / close / abort;     ▼ Established / Readable / Writable /
//!        the daemon copies them to and from        Finished / Reset / Closed
//!        PTCP streams (service tcp/<port>)
//! ```
//!
//! A datagram nobody takes is refused as a host would: [`Stack::port_unreachable`] answers
//! it with ICMP (or ICMPv6) port unreachable quoting it ([`Quote`]), so the app's
//! `recv` fails with "connection refused" at once instead of waiting out its timeout.
//!
//! Packets to addresses outside the pool ([`Config::pool_v4`], [`Config::pool_v6`]) are
//! dropped and counted, as is anything that does not parse: nothing from the kernel panics.
//!
//! ## The SYN-hold contract
//!
//! A SYN for a 4-tuple the stack does not know never reaches smoltcp. It becomes a pending
//! flow and [`Event::Connect`] `{ flow, dst, src }`, and the SYN is held unanswered, so the
//! app's `connect` is still waiting. Retransmitted SYNs of a pending flow are absorbed.
//! The driver then opens the peer stream (service `tcp/<dst port>`) and decides:
//!
//! - [`Stack::accept_flow`]: a socket listens on exactly `dst` and the held SYN is replayed
//!   into it; the SYN-ACK follows, so the app's `connect` completes only now
//!   ([`Event::Established`] when the handshake is done).
//! - [`Stack::refuse_flow`] (or `close`/`abort` of a pending flow): a RST answers the SYN,
//!   and the app sees "connection refused".
//! - No decision within [`Config::connect_timeout`]: refused the same way, so an offline
//!   peer is a bounded failure.
//!
//! Every flow reported by `Connect` ends with exactly one [`Event::Closed`], after which its
//! id is unknown. An app that gives up while pending (its RST) ends the flow the same way.
//!
//! ## Polling contract
//!
//! One task owns the stack:
//!
//! 1. Each packet read from the TUN device: [`Stack::handle_packet`]. Drops are counted in
//!    [`Stack::stats`].
//! 2. After any input — packets, a timer, or a flow call (`accept_flow`, `send`, `recv`,
//!    `close`, `send_datagram`, …) — call [`Stack::poll_transmit`] until it returns `None`,
//!    writing each packet to the TUN device.
//! 3. Then drain [`Stack::poll_event`]: `Connect` (→ decide), `Datagram` (→ forward, or
//!    `port_unreachable`), `EchoRequest`, and per flow `Established`, `Readable` (after
//!    `recv` said `Blocked`, and for the first data), `Writable` (after `send` took less than
//!    offered), `Finished`, `Reset`, `Closed`.
//! 4. Sleep until [`Stack::poll_timeout`] (a time in the past means at once) or the next
//!    input, then call [`Stack::handle_timeout`] and go to 2.

mod config;
mod device;
mod packet;

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Wake, Waker};

use smoltcp::iface::{Config as IfaceConfig, Interface, SocketHandle, SocketSet};
use smoltcp::socket::tcp;
use smoltcp::time::Instant;
use smoltcp::wire::{HardwareAddress, IpAddress, IpListenEndpoint};
use tracing::{debug, trace};

use crate::budget::Lease;
use crate::tcp_io;

pub use config::Config;
pub use smoltcp::wire::{Ipv4Cidr, Ipv6Cidr};

use crate::device::LinkDevice;
use device::TunDevice;
use packet::{Drop, Inbound};

/// Feed smoltcp once this many packets wait, even before `poll_transmit`.
const RX_BATCH: usize = 256;

/// A TCP flow from an app to a virtual endpoint. Ids are never reused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FlowId(pub u64);

impl std::fmt::Display for FlowId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// An ICMP (or ICMPv6) echo request from an app to a virtual address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Echo {
    /// The app's address.
    pub src: IpAddr,
    /// The virtual address pinged.
    pub dst: IpAddr,
    /// Echo identifier.
    pub ident: u16,
    /// Echo sequence number.
    pub seq_no: u16,
    /// Echo data, returned as is in the reply.
    pub payload: Vec<u8>,
}

/// The start of a datagram as the app sent it, IP header on, kept to quote in an ICMP
/// error ([`Stack::port_unreachable`]): as much as the error may carry (IPv4: the error
/// fits 576 bytes, RFC 1812; IPv6: it fits 1280, RFC 4443), and so always the IP header
/// and the UDP header at least. Only the stack makes one, from a datagram it took.
#[derive(Clone, PartialEq, Eq)]
pub struct Quote {
    /// The virtual address the datagram went to: the error comes from it.
    vip: IpAddr,
    /// The app's address: the error goes to it.
    app: IpAddr,
    bytes: Vec<u8>,
}

impl Quote {
    fn new(app: IpAddr, vip: IpAddr, packet: &[u8]) -> Quote {
        let max = if vip.is_ipv4() { packet::QUOTE_MAX_V4 } else { packet::QUOTE_MAX_V6 };
        let bytes = packet.get(..max).unwrap_or(packet).to_vec();
        Quote { vip, app, bytes }
    }

    /// The quoted bytes: the datagram from its IP header on, cut to what an error carries.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }
}

impl std::fmt::Debug for Quote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Quote({} -> {}, {} bytes)", self.app, self.vip, self.bytes.len())
    }
}

/// What happened, for the driver to act on ([`Stack::poll_event`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// An app asked to connect to `dst` (a virtual endpoint) from `src`. Its SYN is held:
    /// decide with [`Stack::accept_flow`] or [`Stack::refuse_flow`] within
    /// [`Config::connect_timeout`].
    Connect {
        /// The new, pending flow.
        flow: FlowId,
        /// The virtual endpoint dialled.
        dst: SocketAddr,
        /// The app's endpoint.
        src: SocketAddr,
    },
    /// The handshake of an accepted flow is complete: the app's `connect` returned.
    Established(FlowId),
    /// [`Stack::recv`] has data, the end of the flow or an error to give (reported once after
    /// `recv` said `Blocked`, and for the first data of a flow).
    Readable(FlowId),
    /// [`Stack::send`] took less than offered and now has room (or an error to give).
    Writable(FlowId),
    /// The app finished sending (FIN): once the buffered data is read, `recv` returns 0.
    Finished(FlowId),
    /// The app reset the flow; calls now fail with `Reset`. Release it with
    /// [`Stack::close`] or [`Stack::abort`].
    Reset(FlowId),
    /// The flow is over and released (or was refused, timed out, or given up while
    /// pending); its id is gone. Reported once for every flow reported by `Connect`.
    Closed(FlowId),
    /// A UDP datagram from an app (`src`) to a virtual endpoint (`dst`). Answer with
    /// [`Stack::send_datagram`]`(dst, src, ..)`, or refuse it with
    /// [`Stack::port_unreachable`]`(&quote)` when nothing serves `dst`.
    Datagram {
        /// The app's endpoint.
        src: SocketAddr,
        /// The virtual endpoint it was sent to.
        dst: SocketAddr,
        /// The UDP payload.
        payload: Vec<u8>,
        /// The datagram's start, for an ICMP error about it.
        quote: Quote,
    },
    /// A ping to a virtual address: [`Stack::answer_echo`] it when the peer is reachable,
    /// or drop it.
    EchoRequest(Echo),
}

/// Why a flow operation failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FlowError {
    /// No such flow (never reported, or closed and released).
    #[error("unknown flow")]
    Unknown,
    /// The flow is not waiting for a decision (already accepted).
    #[error("flow already accepted")]
    NotPending,
    /// The flow is still waiting for a decision: accept it first.
    #[error("flow not accepted yet")]
    Pending,
    /// Nothing to read now; an [`Event::Readable`] follows when there is.
    #[error("no data yet")]
    Blocked,
    /// The sending half is closed (by [`Stack::close`]).
    #[error("flow closed for sending")]
    Closed,
    /// The app reset the flow.
    #[error("flow reset by the app")]
    Reset,
    /// The app gave up before the accepted flow's handshake could start; it is refused.
    #[error("the app gave up connecting")]
    Gone,
}

/// Why a datagram or echo reply was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    /// The source is not a virtual address of this stack.
    #[error("source is not a virtual address")]
    NotVirtual,
    /// Source and destination are of different address families.
    #[error("source and destination are of different address families")]
    FamilyMismatch,
    /// The packet would exceed the TUN MTU.
    #[error("packet larger than the TUN MTU")]
    TooLarge,
    /// Too many packets wait for [`Stack::poll_transmit`]; drain it and retry.
    #[error("transmit queue full")]
    QueueFull,
}

/// Counters of a stack.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Packets taken by [`Stack::handle_packet`].
    pub packets_in: u64,
    /// Packets given by [`Stack::poll_transmit`].
    pub packets_out: u64,
    /// Packets dropped because they do not parse, carry impossible addresses or ports, or a
    /// wrong checksum (checked unless the driver said [`RxChecksum::Trusted`]).
    pub malformed: u64,
    /// Packets dropped because their destination is not a virtual address.
    pub not_in_pool: u64,
    /// Packets dropped because the stack does not carry them (other protocols, ICMP other
    /// than echo, IP fragments).
    pub unsupported: u64,
    /// Retransmitted SYNs of pending flows, absorbed.
    pub syn_absorbed: u64,
    /// Segments of a pending flow other than a SYN or RST, dropped.
    pub pending_dropped: u64,
    /// Flows refused by [`Stack::refuse_flow`] (or `close`/`abort` while pending).
    pub refused: u64,
    /// Flows refused because no decision came within [`Config::connect_timeout`].
    pub connect_timeouts: u64,
    /// SYNs refused at once because of [`Config::max_pending`] or [`Config::max_flows`].
    pub overflow_refused: u64,
    /// Datagram and echo events dropped because [`Config::max_queued_datagrams`] wait.
    pub datagrams_dropped: u64,
    /// Packets the stack made (RSTs) dropped because [`Config::max_queued_packets`] wait.
    pub packets_dropped: u64,
    /// Flows known now (pending and open).
    pub flows: usize,
    /// Flows waiting for a decision now.
    pub pending: usize,
}

struct FlowWaker {
    id: FlowId,
    flagged: AtomicBool,
    dirty: Arc<Mutex<Vec<FlowId>>>,
}

impl Wake for FlowWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }
    fn wake_by_ref(self: &Arc<Self>) {
        if !self.flagged.swap(true, Ordering::Relaxed) {
            self.dirty.lock().unwrap_or_else(|e| e.into_inner()).push(self.id);
        }
    }
}

struct Pending {
    /// The latest SYN of the flow, replayed on accept.
    syn: Vec<u8>,
    deadline: i64,
}

struct Flow {
    /// The app's endpoint.
    src: SocketAddr,
    /// The virtual endpoint.
    dst: SocketAddr,
    /// `Some` until accepted or refused.
    pending: Option<Pending>,
    /// The socket, once accepted.
    handle: Option<SocketHandle>,
    /// What the socket's buffers hold of the config's budget, returned with the flow.
    lease: Option<Lease>,
    established: bool,
    peer_fin: bool,
    reset: bool,
    released: bool,
    want_read: bool,
    want_write: bool,
    waker: Arc<FlowWaker>,
}

/// How far the transport checksum of a packet from the TUN device can be trusted, as the
/// driver learnt from the device (on Linux, the flags of the packet's virtio-net header).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RxChecksum {
    /// Nobody has checked it: the stack does, and drops the packet when it is wrong. A
    /// plain TUN device, or a virtio-net header without flags.
    Unverified,
    /// The kernel vouches for the data, so it is not checked: the checksum is left to the
    /// device (`VIRTIO_NET_HDR_F_NEEDS_CSUM`: only the pseudo-header sum is in place, the
    /// packet was made on this host) or already valid (`VIRTIO_NET_HDR_F_DATA_VALID`).
    Trusted,
}

/// A checksum left for the device to complete (virtio-net's `csum_start` and
/// `csum_offset`): the ones' complement sum of the packet from `start` on, folded and
/// complemented, goes at `start + offset`. Offsets in bytes from the IP header's first byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartialChecksum {
    /// Where the sum starts: the transport header.
    pub start: u16,
    /// Where the checksum field is, from `start`.
    pub offset: u16,
}

/// The TUN termination stack. See the module docs for the polling contract.
pub struct Stack {
    config: Config,
    iface: Interface,
    sockets: SocketSet<'static>,
    device: TunDevice,
    flows: HashMap<FlowId, Flow>,
    by_tuple: HashMap<(SocketAddr, SocketAddr), FlowId>,
    next_flow: u64,
    /// Decision deadlines in order (entries of flows decided since are skipped).
    deadlines: VecDeque<(i64, FlowId)>,
    pending: usize,
    dirty: Arc<Mutex<Vec<FlowId>>>,
    events: VecDeque<Event>,
    queued_datagrams: usize,
    /// Packets made here (RSTs, UDP, echo replies, ICMP errors), sent before smoltcp's.
    ctrl: VecDeque<Vec<u8>>,
    need_poll: bool,
    iface_next: Option<i64>,
    stats: Stats,
    /// The latest `now` we were given.
    last_now: i64,
}

fn micros(t: Instant) -> i64 {
    t.total_micros()
}

impl Stack {
    /// A new stack.
    pub fn new(config: Config, now: Instant) -> Stack {
        let mtu = config.mtu.clamp(1280, 65535);
        let link = LinkDevice::new(mtu, config.device_queue_packets.max(4));
        let mut device = TunDevice::new(link, config.checksum_offload);
        let mut icfg = IfaceConfig::new(HardwareAddress::Ip);
        icfg.random_seed = config.random_seed;
        let mut iface = Interface::new(icfg, &mut device, now);
        iface.set_any_ip(true);
        // With any_ip smoltcp takes packets to every address (we filter by pool before) and
        // needs no address of its own: sockets reply from the endpoint the app dialled.
        // Default routes give replies to any app address a way out (on Medium::Ip the
        // gateway is never looked at, and a route table has room for these two).
        let _ = iface.routes_mut().add_default_ipv4_route(config.pool_v4.address());
        if let Some(v6) = config.pool_v6 {
            let _ = iface.routes_mut().add_default_ipv6_route(v6.address());
        }
        Stack {
            iface,
            sockets: SocketSet::new(Vec::new()),
            device,
            flows: HashMap::new(),
            by_tuple: HashMap::new(),
            next_flow: 0,
            deadlines: VecDeque::new(),
            pending: 0,
            dirty: Arc::new(Mutex::new(Vec::new())),
            events: VecDeque::new(),
            queued_datagrams: 0,
            ctrl: VecDeque::new(),
            need_poll: false,
            iface_next: None,
            stats: Stats::default(),
            last_now: micros(now),
            config,
        }
    }

    /// The settings it runs with.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Counters.
    pub fn stats(&self) -> Stats {
        Stats { flows: self.flows.len(), pending: self.pending, ..self.stats }
    }

    fn touch(&mut self, now: Instant) -> i64 {
        self.last_now = self.last_now.max(micros(now));
        self.last_now
    }

    fn now(&self) -> Instant {
        Instant::from_micros(self.last_now)
    }

    // ---- packets in and out -----------------------------------------------------------

    /// Take an IP packet read from the TUN device, whose transport checksum is as
    /// `checksum` says. Anything unexpected (a wrong checksum included) is dropped and
    /// counted in [`Stack::stats`].
    pub fn handle_packet(&mut self, now: Instant, packet: &[u8], checksum: RxChecksum) {
        if self.take_packet(now, packet, checksum) {
            self.feed_smoltcp(packet);
        }
        self.poll_if_batch_full();
    }

    /// [`Stack::handle_packet`] for a packet read into a buffer from [`Stack::read_buffer`]
    /// and truncated to its length: a packet for smoltcp is queued in that buffer, not
    /// copied (at a 64 KiB MTU the copy was about 3% of the daemon's time); the buffer of
    /// anything else goes back to the pool. Worth it for large packets: a small one keeps a
    /// whole read buffer while it waits (copy those with `handle_packet`).
    pub fn handle_packet_buf(&mut self, now: Instant, packet: Vec<u8>, checksum: RxChecksum) {
        if self.take_packet(now, &packet, checksum) {
            self.queue_for_smoltcp(packet);
        } else {
            self.recycle(packet);
        }
        self.poll_if_batch_full();
    }

    /// A buffer of `len` bytes to read the next TUN packet into, for
    /// [`Stack::handle_packet_buf`]: a spare from the pool when one has the capacity (the
    /// packets smoltcp consumed come back there), else a new one.
    pub fn read_buffer(&mut self, len: usize) -> Vec<u8> {
        let mut buf = crate::device::spare_for_read(&mut self.device.0.pool, len);
        buf.resize(len, 0);
        buf
    }

    fn poll_if_batch_full(&mut self) {
        if self.device.0.rx.len() >= RX_BATCH {
            self.poll_iface(self.now());
        }
    }

    /// Classify a packet from the TUN device and act on it: `true` when it goes to smoltcp.
    fn take_packet(&mut self, now: Instant, packet: &[u8], checksum: RxChecksum) -> bool {
        self.touch(now);
        self.stats.packets_in += 1;
        match packet::classify(packet, &self.config, checksum) {
            Err(Drop::Malformed) => self.stats.malformed += 1,
            Err(Drop::NotInPool) => self.stats.not_in_pool += 1,
            Err(Drop::Unsupported) => self.stats.unsupported += 1,
            Ok(Inbound::Tcp { src, dst, syn, rst }) => {
                return self.handle_tcp(packet, src, dst, syn, rst);
            }
            Ok(Inbound::Udp { src, dst, payload, packet }) => {
                if self.room_for_datagram() {
                    let quote = Quote::new(src.ip(), dst.ip(), packet);
                    let payload = payload.to_vec();
                    self.events.push_back(Event::Datagram { src, dst, payload, quote });
                }
            }
            Ok(Inbound::Echo { src, dst, ident, seq_no, payload }) => {
                if self.room_for_datagram() {
                    let payload = payload.to_vec();
                    self.events.push_back(Event::EchoRequest(Echo {
                        src,
                        dst,
                        ident,
                        seq_no,
                        payload,
                    }));
                }
            }
        }
        false
    }

    fn room_for_datagram(&mut self) -> bool {
        if self.queued_datagrams >= self.config.max_queued_datagrams {
            self.stats.datagrams_dropped += 1;
            return false;
        }
        self.queued_datagrams += 1;
        true
    }

    /// A TCP segment from an app: `true` when smoltcp is to take it.
    fn handle_tcp(
        &mut self,
        packet: &[u8],
        src: SocketAddr,
        dst: SocketAddr,
        syn: bool,
        rst: bool,
    ) -> bool {
        if let Some(&id) = self.by_tuple.get(&(src, dst))
            && let Some(flow) = self.flows.get_mut(&id)
        {
            if let Some(p) = &mut flow.pending {
                if syn {
                    // Keep the latest (its timestamp option is the freshest).
                    p.syn.clear();
                    p.syn.extend_from_slice(packet);
                    self.stats.syn_absorbed += 1;
                } else if rst {
                    debug!(flow = %id, "app gave up while pending");
                    self.end_pending(id);
                } else {
                    self.stats.pending_dropped += 1;
                }
                return false;
            }
            let reset = flow.handle.is_some_and(|h| {
                self.sockets.get::<tcp::Socket<'static>>(h).state() == tcp::State::Closed
            });
            if !(syn && reset) {
                // An open flow: its socket takes it (a retransmitted SYN included).
                return true;
            }
            // The app connects again from the same port while the old, reset flow waits
            // for its release: the tuple belongs to a new flow from now on.
            self.by_tuple.remove(&(src, dst));
        }
        if !syn {
            // smoltcp answers a segment of no connection with a RST, as a kernel would.
            return true;
        }
        if self.pending >= self.config.max_pending || self.flows.len() >= self.config.max_flows {
            self.stats.overflow_refused += 1;
            if let Some(rst) = packet::refuse(packet, src, dst) {
                self.queue_ctrl(rst);
            }
            return false;
        }
        let id = FlowId(self.next_flow);
        self.next_flow += 1;
        let deadline = self.last_now + self.config.connect_timeout.total_micros() as i64;
        let waker =
            Arc::new(FlowWaker { id, flagged: AtomicBool::new(false), dirty: self.dirty.clone() });
        self.flows.insert(
            id,
            Flow {
                src,
                dst,
                pending: Some(Pending { syn: packet.to_vec(), deadline }),
                handle: None,
                lease: None,
                established: false,
                peer_fin: false,
                reset: false,
                released: false,
                want_read: true,
                want_write: false,
                waker,
            },
        );
        self.by_tuple.insert((src, dst), id);
        self.pending += 1;
        self.deadlines.push_back((deadline, id));
        trace!(flow = %id, %src, %dst, "connect");
        self.events.push_back(Event::Connect { flow: id, dst, src });
        false
    }

    fn feed_smoltcp(&mut self, packet: &[u8]) {
        let mut buf = crate::device::spare_for_copy(&mut self.device.0.pool, packet.len());
        buf.clear();
        buf.extend_from_slice(packet);
        self.queue_for_smoltcp(buf);
    }

    /// Queue a packet for smoltcp's next poll.
    fn queue_for_smoltcp(&mut self, packet: Vec<u8>) {
        self.device.0.rx.push_back(packet);
        self.need_poll = true;
    }

    fn queue_ctrl(&mut self, packet: Vec<u8>) -> bool {
        if self.ctrl.len() >= self.config.max_queued_packets {
            self.stats.packets_dropped += 1;
            return false;
        }
        self.ctrl.push_back(packet);
        true
    }

    /// Run timers that are due (decision deadlines, smoltcp's timers).
    /// [`Stack::poll_transmit`] does this too.
    pub fn handle_timeout(&mut self, now: Instant) {
        let now_us = self.touch(now);
        self.run_timers(now_us);
        if self.iface_wanted(now_us) {
            self.poll_iface(now);
        }
    }

    fn run_timers(&mut self, now: i64) {
        while let Some(&(deadline, id)) = self.deadlines.front() {
            if deadline > now {
                break;
            }
            self.deadlines.pop_front();
            if self
                .flows
                .get(&id)
                .and_then(|f| f.pending.as_ref())
                .is_some_and(|p| p.deadline == deadline)
            {
                debug!(flow = %id, "no decision in time: refused");
                self.stats.connect_timeouts += 1;
                self.refuse_pending(id);
            }
        }
    }

    /// The next packet to write to the TUN device, or `None` when there is nothing to send
    /// now (call again after [`Stack::poll_timeout`] or any input).
    pub fn poll_transmit(&mut self, now: Instant) -> Option<Vec<u8>> {
        let now_us = self.touch(now);
        self.run_timers(now_us);
        let mut p = match self.ctrl.pop_front() {
            Some(p) => p,
            None => {
                if self.device.0.tx.is_empty() && self.iface_wanted(now_us) {
                    self.poll_iface(now);
                }
                self.device.0.tx.pop_front()?
            }
        };
        if self.config.checksum_offload {
            // smoltcp left the field zero; our own RSTs came complete: both partial now.
            packet::leave_tcp_checksum(&mut p);
        }
        self.stats.packets_out += 1;
        Some(p)
    }

    /// Where the device must complete the checksum of `packet` (from
    /// [`Stack::poll_transmit`]): `Some` for every TCP segment under
    /// [`Config::checksum_offload`], `None` for every other packet (its checksum is whole).
    pub fn partial_checksum(&self, packet: &[u8]) -> Option<PartialChecksum> {
        self.config.checksum_offload.then(|| packet::partial_checksum(packet)).flatten()
    }

    /// Give back a packet [`Stack::poll_transmit`] returned, once written: its buffer
    /// carries a later packet (the device keeps a bounded number of spare buffers).
    /// Without it every packet to the app was a fresh allocation of up to the MTU.
    pub fn recycle(&mut self, packet: Vec<u8>) {
        crate::device::keep_spare(&mut self.device.0.pool, packet);
    }

    /// The next time [`Stack::handle_timeout`] (or [`Stack::poll_transmit`]) must be called
    /// if nothing arrives before; never earlier than the latest `now` passed in, which it
    /// returns when something is due at once. `None`: nothing is scheduled.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if !self.ctrl.is_empty() || self.need_poll || !self.device.0.tx.is_empty() {
            return Some(self.now());
        }
        let t =
            [self.iface_next, self.deadlines.front().map(|d| d.0)].into_iter().flatten().min()?;
        Some(Instant::from_micros(t.max(self.last_now)))
    }

    /// The next event, if any.
    pub fn poll_event(&mut self) -> Option<Event> {
        let e = self.events.pop_front()?;
        if matches!(e, Event::Datagram { .. } | Event::EchoRequest(_)) {
            self.queued_datagrams = self.queued_datagrams.saturating_sub(1);
        }
        Some(e)
    }

    fn iface_wanted(&self, now: i64) -> bool {
        self.need_poll || self.iface_next.is_some_and(|t| t <= now)
    }

    fn poll_iface(&mut self, now: Instant) {
        self.need_poll = false;
        self.iface.poll(now, &mut self.device, &mut self.sockets);
        self.after_poll();
        let now_us = micros(now);
        self.iface_next = self.iface.poll_at(now, &self.sockets).map(|t| {
            let t = micros(t);
            // smoltcp says "now" while it has something to send; if the queue still has
            // room it was not able to, so do not spin on it.
            if t <= now_us && !self.device.0.tx_full() { now_us + 100 } else { t }
        });
    }

    fn after_poll(&mut self) {
        let dirty = std::mem::take(&mut *self.dirty.lock().unwrap_or_else(|e| e.into_inner()));
        for id in dirty {
            self.process_flow(id);
        }
    }

    // ---- decisions --------------------------------------------------------------------

    /// Accept a pending flow: a socket listens on exactly its virtual endpoint and the held
    /// SYN is replayed into it, so the app's `connect` completes now
    /// ([`Event::Established`] follows). Data may be sent at once; it is queued.
    pub fn accept_flow(&mut self, id: FlowId) -> Result<(), FlowError> {
        let flow = self.flows.get_mut(&id).ok_or(FlowError::Unknown)?;
        let pending = flow.pending.take().ok_or(FlowError::NotPending)?;
        self.pending -= 1;
        let dst = flow.dst;
        let waker = Waker::from(flow.waker.clone());
        // Let smoltcp take what waits first, so the new listener sees only this SYN.
        let now = self.now();
        if !self.device.0.rx.is_empty() {
            self.poll_iface(now);
        }
        let (mut sock, lease) = self.new_socket();
        let endpoint = IpListenEndpoint { addr: Some(IpAddress::from(dst.ip())), port: dst.port() };
        if sock.listen(endpoint).is_err() {
            // Port 0 never gets here (classify drops it); refuse rather than panic.
            self.refuse_syn(&pending.syn, id);
            return Err(FlowError::Gone);
        }
        sock.register_recv_waker(&waker);
        sock.register_send_waker(&waker);
        let handle = self.sockets.add(sock);
        if let Some(flow) = self.flows.get_mut(&id) {
            flow.handle = Some(handle);
            flow.lease = Some(lease);
        }
        self.feed_smoltcp(&pending.syn);
        self.poll_iface(now);
        let sock = self.sockets.get_mut::<tcp::Socket<'static>>(handle);
        if sock.state() == tcp::State::Listen {
            // smoltcp did not take the SYN (a corrupt checksum): no listener may stay behind.
            self.sockets.remove(handle);
            if let Some(flow) = self.flows.get_mut(&id) {
                flow.handle = None;
                flow.lease = None;
            }
            self.refuse_syn(&pending.syn, id);
            return Err(FlowError::Gone);
        }
        trace!(flow = %id, "accepted");
        Ok(())
    }

    /// Refuse a pending flow: a RST answers its SYN, the app sees "connection refused", and
    /// [`Event::Closed`] follows.
    pub fn refuse_flow(&mut self, id: FlowId) -> Result<(), FlowError> {
        let flow = self.flows.get(&id).ok_or(FlowError::Unknown)?;
        if flow.pending.is_none() {
            return Err(FlowError::NotPending);
        }
        self.stats.refused += 1;
        self.refuse_pending(id);
        Ok(())
    }

    fn refuse_pending(&mut self, id: FlowId) {
        let Some(p) = self.flows.get_mut(&id).and_then(|f| f.pending.take()) else { return };
        self.pending -= 1;
        self.refuse_syn(&p.syn, id);
    }

    /// Answer `syn` with a RST and forget flow `id`.
    fn refuse_syn(&mut self, syn: &[u8], id: FlowId) {
        if let Some(flow) = self.flows.get(&id)
            && let Some(rst) = packet::refuse(syn, flow.src, flow.dst)
        {
            self.queue_ctrl(rst);
        }
        self.forget(id);
    }

    /// A pending flow ended by the app (RST): forget it.
    fn end_pending(&mut self, id: FlowId) {
        if self.flows.get_mut(&id).and_then(|f| f.pending.take()).is_some() {
            self.pending -= 1;
        }
        self.forget(id);
    }

    fn forget(&mut self, id: FlowId) {
        if let Some(flow) = self.flows.remove(&id) {
            let key = (flow.src, flow.dst);
            if self.by_tuple.get(&key) == Some(&id) {
                self.by_tuple.remove(&key);
            }
            if let Some(h) = flow.handle {
                self.sockets.remove(h);
            }
            self.events.push_back(Event::Closed(id));
        }
    }

    /// A socket with buffers as big as the budget allows (see [`crate::budget`]).
    fn new_socket(&self) -> (tcp::Socket<'static>, Lease) {
        let c = &self.config;
        let (rx, tx, lease) = c.buffer_budget.buffers(c.rx_buffer, c.tx_buffer, c.small_buffer);
        let mut s = tcp::Socket::new(rx, tx);
        // The app's data is forwarded as it comes; the kernel side coalesces anyway.
        s.set_nagle_enabled(false);
        // One ACK per interface poll is already coalesced (see `Session::new_socket`).
        s.set_ack_delay(None);
        // The kernel is always there; a gone app sends FIN or RST.
        s.set_timeout(None);
        s.set_keep_alive(None);
        (s, lease)
    }

    /// Look at a flow whose socket changed and report what the daemon can see.
    fn process_flow(&mut self, id: FlowId) {
        use tcp::State::*;
        let Some(f) = self.flows.get_mut(&id) else { return };
        f.waker.flagged.store(false, Ordering::Relaxed);
        let Some(handle) = f.handle else { return };
        let sock = self.sockets.get_mut::<tcp::Socket<'static>>(handle);
        let mut state = sock.state();
        if state == Listen {
            // The app's RST during the handshake sends a listener back to listening: it must
            // not take another SYN. Closing a listener sends nothing.
            sock.abort();
            state = Closed;
        }
        if !f.established
            && matches!(
                state,
                Established | FinWait1 | FinWait2 | CloseWait | Closing | LastAck | TimeWait
            )
        {
            f.established = true;
            self.events.push_back(Event::Established(id));
        }
        if !f.peer_fin && matches!(state, CloseWait | LastAck | Closing | TimeWait) {
            f.peer_fin = true;
            self.events.push_back(Event::Finished(id));
        }
        if state == Closed && !f.reset && !f.released {
            f.reset = true;
            self.events.push_back(Event::Reset(id));
        }
        if f.want_read
            && (sock.can_recv() || (f.established && !sock.may_recv()) || state == Closed)
        {
            f.want_read = false;
            self.events.push_back(Event::Readable(id));
        }
        if f.want_write && (sock.can_send() || (!sock.may_send() && !matches!(state, SynReceived)))
        {
            f.want_write = false;
            self.events.push_back(Event::Writable(id));
        }
        let done = match state {
            // After an abort the RST goes out first; then the endpoint is forgotten.
            Closed => sock.remote_endpoint().is_none(),
            // Both directions are closed: nothing more can arrive; keep unread data.
            TimeWait => sock.recv_queue() == 0,
            _ => false,
        };
        if f.released && done {
            trace!(flow = %id, "released");
            self.forget(id);
            return;
        }
        let w = Waker::from(f.waker.clone());
        sock.register_recv_waker(&w);
        sock.register_send_waker(&w);
    }

    // ---- flows ------------------------------------------------------------------------

    fn flow_socket(
        &mut self,
        id: FlowId,
    ) -> Result<(&mut Flow, &mut tcp::Socket<'static>), FlowError> {
        let f = self.flows.get_mut(&id).ok_or(FlowError::Unknown)?;
        let h = f.handle.ok_or(FlowError::Pending)?;
        let sock = self.sockets.get_mut::<tcp::Socket<'static>>(h);
        Ok((f, sock))
    }

    /// Queue bytes for the app; returns how many were taken (0 when the send buffer is full,
    /// or the handshake is not done yet: an [`Event::Writable`] follows when there is room).
    pub fn send(&mut self, id: FlowId, data: &[u8]) -> Result<usize, FlowError> {
        let (f, sock) = self.flow_socket(id)?;
        let n = tcp_io::send(sock, data, f.reset, HANDSHAKING, &mut f.want_write)?;
        if n > 0 {
            self.need_poll = true;
        }
        Ok(n)
    }

    /// Read bytes the app sent: `Ok(n > 0)` data, `Ok(0)` the end of the flow (the app
    /// closed and everything was read), `Err(Blocked)` nothing yet (an [`Event::Readable`]
    /// follows).
    pub fn recv(&mut self, id: FlowId, buf: &mut [u8]) -> Result<usize, FlowError> {
        let (f, sock) = self.flow_socket(id)?;
        let r = tcp_io::recv(sock, buf, f.reset, HANDSHAKING, &mut f.want_read)
            .map_err(FlowError::from);
        let time_wait = f.released && sock.state() == tcp::State::TimeWait;
        self.after_recv(id, r, time_wait)
    }

    /// After a read: freed receive buffer may open the window (let smoltcp say so), and a
    /// released flow in TIME-WAIT is looked at again.
    fn after_recv(
        &mut self,
        id: FlowId,
        r: Result<usize, FlowError>,
        time_wait: bool,
    ) -> Result<usize, FlowError> {
        if matches!(r, Ok(n) if n > 0) {
            self.need_poll = true;
        }
        if time_wait {
            self.process_flow(id);
        }
        r
    }

    /// [`Stack::recv`] without a buffer of the caller's: `f` is given at most `max` bytes
    /// straight from the flow's buffer, one contiguous piece (call again for more). Returns
    /// how many, with the same `Ok(0)` and errors as [`Stack::recv`].
    pub fn recv_with(
        &mut self,
        id: FlowId,
        max: usize,
        f: &mut dyn FnMut(&[u8]),
    ) -> Result<usize, FlowError> {
        let (fl, sock) = self.flow_socket(id)?;
        let r = tcp_io::recv_with(sock, max, f, fl.reset, HANDSHAKING, &mut fl.want_read)
            .map_err(FlowError::from);
        let time_wait = fl.released && sock.state() == tcp::State::TimeWait;
        self.after_recv(id, r, time_wait)
    }

    /// Bytes waiting to be read on a flow.
    pub fn recv_queue(&mut self, id: FlowId) -> Result<usize, FlowError> {
        let (_, sock) = self.flow_socket(id)?;
        Ok(sock.recv_queue())
    }

    /// Bytes [`Stack::send`] would take now.
    pub fn send_space(&mut self, id: FlowId) -> Result<usize, FlowError> {
        let (_, sock) = self.flow_socket(id)?;
        Ok(if sock.may_send() { sock.send_capacity() - sock.send_queue() } else { 0 })
    }

    /// Bytes queued for the app and not yet acknowledged by it.
    pub fn send_queue(&mut self, id: FlowId) -> Result<usize, FlowError> {
        let (_, sock) = self.flow_socket(id)?;
        Ok(sock.send_queue())
    }

    /// Finish sending (FIN after the queued data); reading goes on. The flow is released
    /// ([`Event::Closed`]) once both directions are closed and the data read. On a pending
    /// flow: [`Stack::refuse_flow`].
    pub fn close(&mut self, id: FlowId) -> Result<(), FlowError> {
        if self.flows.get(&id).is_some_and(|f| f.pending.is_some()) {
            return self.refuse_flow(id);
        }
        let (f, sock) = self.flow_socket(id)?;
        f.released = true;
        sock.close();
        self.need_poll = true;
        self.process_flow(id);
        Ok(())
    }

    /// Reset the flow (RST) and release it; queued data is discarded. On a pending flow:
    /// [`Stack::refuse_flow`].
    pub fn abort(&mut self, id: FlowId) -> Result<(), FlowError> {
        if self.flows.get(&id).is_some_and(|f| f.pending.is_some()) {
            return self.refuse_flow(id);
        }
        let (f, sock) = self.flow_socket(id)?;
        f.released = true;
        sock.abort();
        self.need_poll = true;
        self.process_flow(id);
        Ok(())
    }

    /// The endpoints of a flow: (the app's, the virtual one it dialled).
    pub fn flow_endpoints(&self, id: FlowId) -> Option<(SocketAddr, SocketAddr)> {
        self.flows.get(&id).map(|f| (f.src, f.dst))
    }

    /// The TCP state of an accepted flow, for status displays.
    pub fn flow_state(&mut self, id: FlowId) -> Result<tcp::State, FlowError> {
        let (_, sock) = self.flow_socket(id)?;
        Ok(sock.state())
    }

    /// Ids of the known flows (pending and open).
    pub fn flows(&self) -> impl Iterator<Item = FlowId> + '_ {
        self.flows.keys().copied()
    }

    // ---- datagrams and echo -----------------------------------------------------------

    /// Send a UDP datagram to an app: from `src` (a virtual endpoint) to `dst` (the app's
    /// endpoint, the `src` of an [`Event::Datagram`]). No fragmentation: at most the MTU.
    pub fn send_datagram(
        &mut self,
        src: SocketAddr,
        dst: SocketAddr,
        payload: &[u8],
    ) -> Result<(), SendError> {
        self.check_out(src.ip(), dst.ip(), packet::udp_overhead(src.ip()) + payload.len())?;
        let p = packet::udp(src, dst, payload).ok_or(SendError::TooLarge)?;
        self.ctrl.push_back(p);
        Ok(())
    }

    /// Refuse a datagram: ICMP destination unreachable / port unreachable (ICMPv6 type 1
    /// code 4 for IPv6) from the virtual address it went to, quoting it, so the app's
    /// socket reports "connection refused". Call it at most once per datagram.
    pub fn port_unreachable(&mut self, quote: &Quote) -> Result<(), SendError> {
        let len = packet::echo_overhead(quote.vip) + quote.bytes.len();
        self.check_out(quote.vip, quote.app, len)?;
        let p = packet::port_unreachable(quote.vip, quote.app, &quote.bytes)
            .ok_or(SendError::TooLarge)?;
        self.ctrl.push_back(p);
        Ok(())
    }

    /// Answer a ping (the peer behind `echo.dst` is reachable).
    pub fn answer_echo(&mut self, echo: &Echo) -> Result<(), SendError> {
        let len = packet::echo_overhead(echo.dst) + echo.payload.len();
        self.check_out(echo.dst, echo.src, len)?;
        let p = packet::echo_reply(echo.dst, echo.src, echo.ident, echo.seq_no, &echo.payload)
            .ok_or(SendError::TooLarge)?;
        self.ctrl.push_back(p);
        Ok(())
    }

    fn check_out(&self, src: IpAddr, dst: IpAddr, len: usize) -> Result<(), SendError> {
        if src.is_ipv4() != dst.is_ipv4() {
            return Err(SendError::FamilyMismatch);
        }
        if !self.config.is_virtual(src) {
            return Err(SendError::NotVirtual);
        }
        if len > self.config.mtu.clamp(1280, 65535) {
            return Err(SendError::TooLarge);
        }
        if self.ctrl.len() >= self.config.max_queued_packets {
            return Err(SendError::QueueFull);
        }
        Ok(())
    }
}

/// States in which a flow cannot move data yet (its handshake is under way).
const HANDSHAKING: &[tcp::State] = &[tcp::State::SynReceived, tcp::State::Listen];

impl From<crate::tcp_io::IoError> for FlowError {
    fn from(e: crate::tcp_io::IoError) -> FlowError {
        match e {
            crate::tcp_io::IoError::Blocked => FlowError::Blocked,
            crate::tcp_io::IoError::Closed => FlowError::Closed,
            crate::tcp_io::IoError::Reset => FlowError::Reset,
        }
    }
}
