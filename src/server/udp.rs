//! The task that owns the server's main UDP socket and the relay ([`super::relay::Relay`]):
//! it answers who-am-i, feeds relay datagrams to the relay, takes the connection
//! handlers' requests ([`super::relay::RelayHandle`]) and sends what the relay gives.
//!
//! ```text
//!  socket ── recvmmsg + GRO (quinn-udp) ──┬─ who-am-i ── reply
//!                                         └─ Relay::handle_udp ─┐
//!  handlers ── bounded channel ── create, remove, handle_tcp ───┤
//!                                                               ▼
//!  socket ◀── sendmsg + GSO (quinn-udp, one call per run of ◀── Relay::poll_transmit
//!             same-size datagrams to one address)               (AMP `relay` over TCP:
//!                                                                 try_tell, dropped if full)
//! ```
//!
//! Receiving and sending interleave: whenever the relay holds a GSO batch's worth, it is
//! sent before the next receive buffer is read, so a burst that one recvmmsg call returns
//! (megabytes, with GRO) streams through instead of overflowing a leg's queue.
//!
//! When the socket's send buffer is full the task stops taking datagrams from the relay
//! until it is writable again, but keeps receiving: the relay's per-leg queues fill and
//! overflow (counted), which is where fairness between legs takes over.

use super::relay::{Relay, Request, Transmit};
use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, watch};
use tracing::{debug, trace, warn};

/// Bytes of one receive buffer: a GRO super-datagram is at most 64 KiB.
const RECV_SLOT: usize = 64 << 10;
/// recvmmsg calls per wakeup before what the relay queued is sent.
const RECV_BATCH: usize = 4;
/// Largest GSO batch (the UDP length field and the kernel's limit).
const GSO_BYTES: usize = 65000;
/// Requests taken per pass.
const REQUEST_BATCH: usize = 256;
/// Kernel socket buffers asked for (see [`crate::ptcp::sys::enlarge_buffers`]).
const SOCKET_BUFFER: usize = 8 << 20;
/// How often idle sessions are looked for.
const EXPIRY_EVERY: Duration = Duration::from_secs(10);

/// The socket's owner: who-am-i and the relay.
pub(crate) struct UdpTask {
    pub udp: Arc<UdpSocket>,
    /// The second who-am-i port, for replies "from the other port".
    pub udp2: Option<Arc<UdpSocket>>,
    pub relay: Relay,
    /// Signs who-am-i proofs (the one key of [`super::State::proof_key`]).
    pub proof_key: Arc<crate::proto::whoami::ProofKey>,
    pub requests: mpsc::Receiver<Request>,
    /// `q2q_relayed_bytes_total`.
    pub relayed_bytes: metrics::Counter,
}

/// The sending half: batches being built or waiting for the socket.
struct Sender<'a> {
    socket: &'a UdpSocket,
    state: &'a quinn_udp::UdpSocketState,
    /// The socket's address: on a dual-stack `[::]` socket an IPv4 destination goes out
    /// v4-mapped ([`crate::dualstack::for_socket`]; quinn-udp does not map).
    local: Option<SocketAddr>,
    /// The batch being built: datagrams of `seg` bytes (the last may be shorter) to `to`.
    out: Vec<u8>,
    to: Option<SocketAddr>,
    seg: usize,
    count: usize,
    /// A shorter datagram ended the batch (GSO allows only the last to be short).
    closed: bool,
    /// Batches the socket would not take yet: nothing else is sent until they went.
    stalled: VecDeque<(SocketAddr, Vec<u8>, usize)>,
    send_errors: u64,
}

impl UdpTask {
    /// Run until `stopped` changes.
    pub async fn run(mut self, mut stopped: watch::Receiver<bool>) {
        crate::ptcp::sys::enlarge_buffers(&self.udp, SOCKET_BUFFER);
        let state = match quinn_udp::UdpSocketState::new((&*self.udp).into()) {
            Ok(s) => s,
            Err(e) => {
                warn!(error = %e, "cannot set up the UDP socket");
                return;
            }
        };
        debug!(gso = state.max_gso_segments(), gro = state.gro_segments(), "relay socket offloads");
        let udp = self.udp.clone();
        let mut tx = Sender {
            socket: &udp,
            state: &state,
            local: udp.local_addr().ok(),
            out: Vec::with_capacity(GSO_BYTES + RECV_SLOT),
            to: None,
            seg: 0,
            count: 0,
            closed: false,
            stalled: VecDeque::new(),
            send_errors: 0,
        };
        let mut buf = vec![0u8; RECV_SLOT * quinn_udp::BATCH_SIZE];
        let mut dropped: u64 = 0;
        let far = tokio::time::Instant::now() + Duration::from_secs(86400 * 365);
        let budget = tokio::time::sleep_until(far);
        tokio::pin!(budget);
        let mut expiry = tokio::time::interval(EXPIRY_EVERY);
        let mut requests_open = true;
        let mut requests = Vec::with_capacity(REQUEST_BATCH);
        loop {
            self.pump(&mut tx);
            let wait = self
                .relay
                .poll_timeout()
                .map_or(far, |t| tokio::time::Instant::from_std(t.max(Instant::now())));
            if budget.deadline() != wait {
                budget.as_mut().reset(wait);
            }
            let stalled = !tx.stalled.is_empty();
            tokio::select! {
                _ = stopped.changed() => break,
                r = udp.readable() => {
                    if let Err(e) = r {
                        warn!(error = %e, "UDP socket failed");
                        break;
                    }
                    self.recv_batch(&state, &mut buf, &mut dropped, &mut tx);
                }
                r = udp.writable(), if stalled => if r.is_err() { break },
                n = self.requests.recv_many(&mut requests, REQUEST_BATCH), if requests_open => {
                    requests_open = n > 0;
                    for r in requests.drain(..) {
                        self.request(r);
                    }
                }
                _ = &mut budget => {}
                _ = expiry.tick() => self.relay.expire(Instant::now()),
            }
        }
    }

    /// Receive what is waiting (a few recvmmsg calls) and hand it on, sending what the
    /// relay queued whenever it holds a GSO batch's worth. One recvmmsg call can return
    /// `quinn_udp::BATCH_SIZE` GRO buffers of up to 64 KiB each, megabytes for one leg:
    /// taken in whole before anything was sent, they overflowed the leg's queue
    /// ([`super::relay::RelayLimits::queue_per_leg`]), and the relay dropped a third of a
    /// fast session's datagrams in the lab (`tools/bench/lab-relay`, `LAB_RELAY_LOGS`).
    fn recv_batch(
        &mut self,
        state: &quinn_udp::UdpSocketState,
        buf: &mut [u8],
        dropped: &mut u64,
        tx: &mut Sender<'_>,
    ) {
        let mut meta = [quinn_udp::RecvMeta::default(); quinn_udp::BATCH_SIZE];
        let udp = self.udp.clone();
        for _ in 0..RECV_BATCH {
            let mut slices: Vec<io::IoSliceMut<'_>> =
                buf.chunks_mut(RECV_SLOT).map(io::IoSliceMut::new).collect();
            let r = udp.try_io(tokio::io::Interest::READABLE, || {
                state.recv((&*udp).into(), &mut slices, &mut meta)
            });
            drop(slices);
            match r {
                Ok(n) => {
                    let now = Instant::now();
                    for (m, slot) in meta.iter().zip(buf.chunks(RECV_SLOT)).take(n) {
                        let data = slot.get(..m.len).unwrap_or(slot);
                        // One spelling inside: an IPv4 sender of the dual-stack socket is
                        // plain IPv4 ([`crate::dualstack::canonical`]).
                        let from = crate::dualstack::canonical(m.addr);
                        // With GRO one buffer holds several datagrams of `stride` bytes.
                        for d in data.chunks(m.stride.max(1)) {
                            self.on_datagram(d, from, now, dropped);
                        }
                        if self.relay.queued() >= GSO_BYTES {
                            self.pump(tx);
                        }
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                // On Linux, ICMP errors of earlier sends surface here: not fatal.
                Err(e) => trace!(error = %e, "udp receive failed"),
            }
        }
    }

    fn on_datagram(&mut self, d: &[u8], from: SocketAddr, now: Instant, dropped: &mut u64) {
        use q2q_netstack::wire::{Kind, Prefix};
        match Prefix::parse(d).map(|p| p.kind) {
            Ok(Kind::Relay) => {
                if let Err(e) = self.relay.handle_udp(d, from, now) {
                    *dropped += 1;
                    debug!(%from, error = %e, dropped, "refused a relay datagram");
                }
            }
            Ok(Kind::WhoAmIRequest) => match crate::proto::whoami::parse_request_with(d) {
                Ok((nonce, flags)) => {
                    let udp2 = self.udp2.as_ref();
                    let second = udp2.and_then(|u| u.local_addr().ok());
                    let reply = super::whoami_reply(&self.proof_key, nonce, flags, from, second);
                    // Answering from the other socket tests the asker's NAT filtering (RFC
                    // 5780 section 4.4); the reply is no bigger than the request. A reply
                    // the socket cannot take now is dropped: the asker asks again.
                    let out = match udp2 {
                        Some(u) if flags.reply_from_second => u,
                        _ => &self.udp,
                    };
                    let to = match out.local_addr() {
                        Ok(local) => crate::dualstack::for_socket(local, from),
                        Err(_) => from,
                    };
                    let _ = out.try_send_to(&reply, to);
                }
                Err(_) => *dropped += 1,
            },
            _ => {
                *dropped += 1;
                debug!(%from, dropped, "dropped a datagram this server does not handle");
            }
        }
    }

    fn request(&mut self, r: Request) {
        let now = Instant::now();
        match r {
            Request::Create { a, b, session, reply } => {
                let _ = reply.send(self.relay.create(a, b, session, now));
            }
            Request::Renew { a, b, session, reply } => {
                let _ = reply.send(self.relay.renew(a, b, session, now));
            }
            Request::Remove(token) => self.relay.remove(&token),
            Request::DropConnection { conn, end: false } => self.relay.drop_connection(conn, now),
            Request::DropConnection { conn, end: true } => self.relay.end_connection(conn),
            Request::Tcp { conn, token, data } => {
                if let Err(e) = self.relay.handle_tcp(conn, &token, data, now) {
                    debug!(conn, error = %e, "refused a datagram relayed over TCP");
                }
            }
            Request::Claim { conn, user, handle, token } => {
                if let Err(e) = self.relay.claim(conn, &user, handle, &token) {
                    debug!(conn, error = %e, "refused a relay bind over TCP");
                }
            }
        }
    }

    /// Send what the relay has ready, while the socket takes it.
    fn pump(&mut self, tx: &mut Sender<'_>) {
        if !tx.flush() {
            return;
        }
        let now = Instant::now();
        loop {
            let start = tx.out.len();
            match self.relay.poll_transmit(now, &mut tx.out) {
                None => break,
                Some(Transmit::Tcp(handle, r)) => {
                    let len = r.data.len() as u64;
                    if handle.try_tell(crate::proto::Command::request(&r)) {
                        self.relayed_bytes.increment(len);
                    } else {
                        // That control connection is slow or gone: dropped, PTCP resends.
                        self.relay.count_dropped(1);
                    }
                }
                Some(Transmit::Udp { to, len }) => {
                    self.relayed_bytes.increment(len as u64);
                    if !tx.add(start, to, len) {
                        return; // stalled
                    }
                }
            }
        }
        tx.end_batch();
        tx.flush();
    }
}

impl Sender<'_> {
    /// A datagram of `len` bytes to `to` was appended at `start`: add it to the batch, or
    /// end the batch before it. `false`: the socket is full.
    fn add(&mut self, start: usize, to: SocketAddr, len: usize) -> bool {
        let max = self.state.max_gso_segments().max(1);
        let fits = self.to == Some(to)
            && len <= self.seg
            && !self.closed
            && self.count < max
            && start + len <= GSO_BYTES;
        if start == 0 {
            (self.to, self.seg, self.count, self.closed) = (Some(to), len, 1, false);
        } else if fits {
            self.count += 1;
            self.closed = len < self.seg;
        } else {
            let tail = self.out.split_off(start);
            let batch = std::mem::replace(&mut self.out, tail);
            if let Some(prev) = self.to {
                self.stalled.push_back((prev, batch, self.seg));
            }
            (self.to, self.seg, self.count, self.closed) = (Some(to), len, 1, false);
            return self.flush();
        }
        true
    }

    /// Move the batch being built to the send queue.
    fn end_batch(&mut self) {
        if let Some(to) = self.to.take()
            && !self.out.is_empty()
        {
            let batch = std::mem::replace(&mut self.out, Vec::with_capacity(GSO_BYTES + RECV_SLOT));
            self.stalled.push_back((to, batch, self.seg));
        }
        self.out.clear();
    }

    /// Send the queued batches; `false` when the socket would not take them all.
    fn flush(&mut self) -> bool {
        while let Some((to, data, seg)) = self.stalled.front() {
            let t = quinn_udp::Transmit {
                destination: self.local.map_or(*to, |l| crate::dualstack::for_socket(l, *to)),
                ecn: None,
                contents: data,
                segment_size: (data.len() > *seg).then_some(*seg),
                src_ip: None,
            };
            let (socket, state) = (self.socket, self.state);
            match socket.try_io(tokio::io::Interest::WRITABLE, || state.try_send(socket.into(), &t))
            {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
                Err(e) => {
                    // An unreachable network, a GSO the device refuses: dropped, PTCP
                    // resends.
                    self.send_errors += 1;
                    trace!(error = %e, to = %t.destination, errors = self.send_errors, "relay send failed");
                }
            }
            self.stalled.pop_front();
        }
        true
    }
}
