//! A simulated network in virtual time, for tests and benchmarks: two [`Session`]s joined by
//! a pair of [`Link`]s with seeded loss, delay, jitter, reordering, duplication and a
//! bandwidth cap with a drop-tail queue. Nothing here reads a clock; a run is a pure
//! function of its seeds.
//!
//! ```text
//!   Session a ──poll_transmit──▶ Link ab ──handle_datagram──▶ Session b
//!             ◀─handle_datagram── Link ba ◀──poll_transmit───
//! ```
//!
//! [`Transfer`] is a bulk-transfer application on top: `a` opens streams, `b` accepts them,
//! both send a deterministic byte pattern and FIN, both read to the end.

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};

use crate::session::{Event, Session, StreamError, StreamId};
use crate::{Duration, Instant};

/// A small seeded generator (SplitMix64): fast, deterministic, good enough for a simulation.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator from a seed.
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }
    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in `[0, 1)`.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// How a one-way link behaves.
#[derive(Debug, Clone)]
pub struct LinkConfig {
    /// Fixed one-way delay.
    pub delay: Duration,
    /// Extra delay, uniform in `[0, jitter)`; reorders packets closer than that.
    pub jitter: Duration,
    /// Probability a datagram is lost (after it used the bottleneck).
    pub loss: f64,
    /// Probability a datagram arrives twice.
    pub duplicate: f64,
    /// Probability a datagram is held back by `reorder_delay`.
    pub reorder: f64,
    /// How long a reordered datagram is held back.
    pub reorder_delay: Duration,
    /// Bottleneck rate in bits per second (`None`: unlimited).
    pub bandwidth_bps: Option<u64>,
    /// Bytes the bottleneck queue holds before it drops (tail drop).
    pub queue_bytes: usize,
    /// Seed of this link's randomness.
    pub seed: u64,
    /// IP MTU of the path in bytes (`None`: unlimited). A datagram whose IP packet (its
    /// length + 28 bytes of IPv4 and UDP headers) is larger vanishes without a word, as in a
    /// path that drops ICMP: a black hole for large datagrams. Change it mid-run with
    /// [`Link::set_mtu`].
    pub mtu: Option<usize>,
}

/// Bytes of IPv4 and UDP headers in front of a datagram's payload, for [`LinkConfig::mtu`].
pub const IP_UDP_HEADERS: usize = 28;

impl LinkConfig {
    /// A lossless link with a one-way `delay`, no bandwidth cap.
    pub fn new(delay: Duration, seed: u64) -> LinkConfig {
        LinkConfig {
            delay,
            jitter: Duration::ZERO,
            loss: 0.0,
            duplicate: 0.0,
            reorder: 0.0,
            reorder_delay: Duration::from_millis(2),
            bandwidth_bps: None,
            queue_bytes: 4 << 20,
            seed,
            mtu: None,
        }
    }
}

/// What a link did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LinkStats {
    /// Datagrams offered.
    pub sent: u64,
    /// Datagrams delivered (duplicates included).
    pub delivered: u64,
    /// Dropped at random.
    pub lost_random: u64,
    /// Dropped because the bottleneck queue was full.
    pub lost_queue: u64,
    /// Extra copies made.
    pub duplicated: u64,
    /// Dropped because they exceeded the path MTU.
    pub lost_mtu: u64,
    /// Dropped while the link was down.
    pub lost_down: u64,
    /// Datagrams offered whose length differs from the one offered before: where a driver's
    /// UDP GSO batch (equal-sized datagrams) would have to end.
    pub size_changes: u64,
}

impl LinkStats {
    /// All drops.
    pub fn lost(&self) -> u64 {
        self.lost_random + self.lost_queue + self.lost_mtu + self.lost_down
    }
}

struct InFlight {
    at: i64,
    n: u64,
    data: Vec<u8>,
}

impl PartialEq for InFlight {
    fn eq(&self, o: &Self) -> bool {
        (self.at, self.n) == (o.at, o.n)
    }
}
impl Eq for InFlight {}
impl PartialOrd for InFlight {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for InFlight {
    fn cmp(&self, o: &Self) -> Ordering {
        // Reversed: BinaryHeap is a max-heap, we want the earliest first.
        (o.at, o.n).cmp(&(self.at, self.n))
    }
}

/// A one-way link.
pub struct Link {
    cfg: LinkConfig,
    rng: Rng,
    busy_until: f64,
    heap: BinaryHeap<InFlight>,
    n: u64,
    down: bool,
    /// Length of the datagram offered last.
    last_len: usize,
    /// What it did so far.
    pub stats: LinkStats,
}

impl Link {
    /// A link behaving as `cfg` says.
    pub fn new(cfg: LinkConfig) -> Link {
        let rng = Rng::new(cfg.seed);
        Link {
            cfg,
            rng,
            busy_until: 0.0,
            heap: BinaryHeap::new(),
            n: 0,
            down: false,
            last_len: 0,
            stats: LinkStats::default(),
        }
    }

    /// Change the path MTU (see [`LinkConfig::mtu`]); datagrams already under way arrive.
    pub fn set_mtu(&mut self, mtu: Option<usize>) {
        self.cfg.mtu = mtu;
    }

    /// Take the link down (every datagram offered is dropped, an outage) or up again.
    /// Datagrams already under way arrive.
    pub fn set_down(&mut self, down: bool) {
        self.down = down;
    }

    /// Offer a datagram at `now`.
    pub fn send(&mut self, now: Instant, data: Vec<u8>) {
        let now = now.total_micros();
        self.stats.sent += 1;
        if data.len() != std::mem::replace(&mut self.last_len, data.len()) {
            self.stats.size_changes += 1;
        }
        if self.down {
            self.stats.lost_down += 1;
            return;
        }
        if self.cfg.mtu.is_some_and(|mtu| data.len() + IP_UDP_HEADERS > mtu) {
            self.stats.lost_mtu += 1;
            return;
        }
        let mut depart = now as f64;
        if let Some(bw) = self.cfg.bandwidth_bps {
            let bw = bw.max(1) as f64;
            let backlog = (self.busy_until - now as f64).max(0.0) * bw / 8e6;
            if backlog + data.len() as f64 > self.cfg.queue_bytes as f64 {
                self.stats.lost_queue += 1;
                return;
            }
            depart = self.busy_until.max(now as f64) + data.len() as f64 * 8e6 / bw;
            self.busy_until = depart;
        }
        if self.rng.next_f64() < self.cfg.loss {
            self.stats.lost_random += 1;
            return;
        }
        let mut at = depart as i64 + self.cfg.delay.total_micros() as i64;
        let jitter = self.cfg.jitter.total_micros();
        if jitter > 0 {
            at += (self.rng.next_u64() % jitter) as i64;
        }
        if self.cfg.reorder > 0.0 && self.rng.next_f64() < self.cfg.reorder {
            at += self.cfg.reorder_delay.total_micros() as i64;
        }
        if self.cfg.duplicate > 0.0 && self.rng.next_f64() < self.cfg.duplicate {
            self.stats.duplicated += 1;
            let extra = (self.rng.next_u64() % 500) as i64;
            self.push(at + 1 + extra, data.clone());
        }
        self.push(at, data);
    }

    fn push(&mut self, at: i64, data: Vec<u8>) {
        self.n += 1;
        self.heap.push(InFlight { at, n: self.n, data });
    }

    /// When the next datagram arrives.
    pub fn next_arrival(&self) -> Option<Instant> {
        self.heap.peek().map(|f| Instant::from_micros(f.at))
    }

    /// A datagram that has arrived by `now`.
    pub fn recv(&mut self, now: Instant) -> Option<Vec<u8>> {
        if self.heap.peek()?.at > now.total_micros() {
            return None;
        }
        self.stats.delivered += 1;
        self.heap.pop().map(|f| f.data)
    }
}

/// Two sessions and the links between them, advanced in virtual time.
pub struct Pair {
    /// Virtual now.
    pub now: Instant,
    /// The initiator.
    pub a: Session,
    /// The responder.
    pub b: Session,
    /// Link from `a` to `b`.
    pub ab: Link,
    /// Link from `b` to `a`.
    pub ba: Link,
    /// Earlier paths, still delivering what they carry (`true`: a to b).
    retired: Vec<(Link, bool)>,
    /// When set, `b` no longer exists for the network: datagrams to it vanish and it sends
    /// nothing (a peer that disappeared).
    pub b_gone: bool,
    /// Datagrams sent by `a` are tagged with this "source address"; the receiving side
    /// routes by session id, so changing it changes nothing (see [`Pair::change_path`]).
    pub a_address: u32,
    /// Datagrams each side dropped as not theirs or malformed.
    pub rejected: u64,
    buf: Vec<u8>,
}

impl Pair {
    /// Join two sessions.
    pub fn new(a: Session, b: Session, ab: Link, ba: Link, now: Instant) -> Pair {
        Pair {
            now,
            a,
            b,
            ab,
            ba,
            retired: Vec::new(),
            b_gone: false,
            a_address: 1,
            rejected: 0,
            buf: Vec::with_capacity(2048),
        }
    }

    /// Move to new links (relay → direct, or a NAT rebinding: `a`'s datagrams now come from
    /// another address). What the old links carry still arrives.
    pub fn change_path(&mut self, ab: Link, ba: Link) {
        let old_ab = std::mem::replace(&mut self.ab, ab);
        let old_ba = std::mem::replace(&mut self.ba, ba);
        self.retired.push((old_ab, true));
        self.retired.push((old_ba, false));
        self.a_address += 1;
    }

    /// Set the path MTU of both current links (see [`LinkConfig::mtu`]).
    pub fn set_path_mtu(&mut self, mtu: Option<usize>) {
        self.ab.set_mtu(mtu);
        self.ba.set_mtu(mtu);
    }

    /// Take both current links down (an outage: everything sent is dropped) or up again.
    pub fn set_down(&mut self, down: bool) {
        self.ab.set_down(down);
        self.ba.set_down(down);
    }

    fn flush(&mut self) -> bool {
        let mut any = false;
        while let Some(n) = {
            self.buf.clear();
            self.a.poll_transmit(self.now, &mut self.buf)
        } {
            self.ab.send(self.now, self.buf[..n].to_vec());
            any = true;
        }
        while let Some(n) = {
            self.buf.clear();
            self.b.poll_transmit(self.now, &mut self.buf)
        } {
            if !self.b_gone {
                self.ba.send(self.now, self.buf[..n].to_vec());
            }
            any = true;
        }
        any
    }

    fn deliver(&mut self) -> bool {
        let now = self.now;
        let mut any = false;
        while let Some(mut d) = self.ab.recv(now) {
            any = true;
            if !self.b_gone && self.b.handle_datagram(now, &mut d).is_err() {
                self.rejected += 1;
            }
        }
        while let Some(mut d) = self.ba.recv(now) {
            any = true;
            if self.a.handle_datagram(now, &mut d).is_err() {
                self.rejected += 1;
            }
        }
        for (link, a_to_b) in &mut self.retired {
            while let Some(mut d) = link.recv(now) {
                any = true;
                let target = if *a_to_b { &mut self.b } else { &mut self.a };
                if (*a_to_b && self.b_gone) || target.handle_datagram(now, &mut d).is_err() {
                    self.rejected += 1;
                }
            }
        }
        any
    }

    /// One step: send what both sides have, deliver what has arrived, and if nothing
    /// happened advance virtual time to the next deadline or arrival. Returns `false` when
    /// nothing at all is scheduled.
    pub fn step(&mut self) -> bool {
        self.step_until(None)
    }

    /// [`Pair::step`], advancing virtual time no further than `limit` (an application's own
    /// timer, e.g. a reader that wakes every millisecond).
    pub fn step_until(&mut self, limit: Option<Instant>) -> bool {
        let sent = self.flush();
        let delivered = self.deliver();
        if sent || delivered {
            return true;
        }
        let mut next: Option<Instant> = None;
        let mut consider = |t: Option<Instant>| {
            if let Some(t) = t {
                next = Some(next.map_or(t, |n: Instant| n.min(t)));
            }
        };
        consider(self.a.poll_timeout());
        if !self.b_gone {
            consider(self.b.poll_timeout());
        }
        consider(self.ab.next_arrival());
        consider(self.ba.next_arrival());
        for (l, _) in &self.retired {
            consider(l.next_arrival());
        }
        consider(limit);
        let Some(next) = next else { return false };
        self.now = if next > self.now { next } else { self.now + Duration::from_micros(1) };
        self.a.handle_timeout(self.now);
        if !self.b_gone {
            self.b.handle_timeout(self.now);
        }
        true
    }
}

/// Which way data goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dir {
    /// From `a` to `b`.
    AtoB,
    /// From `b` to `a`.
    BtoA,
}

/// The deterministic content of stream `index` in direction `dir`: fill `buf` with the bytes
/// at `offset`.
pub fn pattern(index: u64, dir: Dir, offset: u64, buf: &mut [u8]) {
    let salt = index.wrapping_mul(2).wrapping_add(dir as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    let mut pos = offset;
    let mut i = 0;
    while i < buf.len() {
        let block = pos / 8;
        let mut r = Rng::new(salt ^ block);
        let word = r.next_u64().to_le_bytes();
        let start = (pos % 8) as usize;
        let n = (8 - start).min(buf.len() - i);
        buf[i..i + n].copy_from_slice(&word[start..start + n]);
        i += n;
        pos += n as u64;
    }
}

#[derive(Debug, Default)]
struct End {
    index: Option<u64>,
    header: Vec<u8>,
    header_sent: usize,
    sent: u64,
    received: u64,
    fin_sent: bool,
    eof: bool,
}

/// A bulk transfer over a [`Pair`]: `streams` streams, `bytes` each way on each.
pub struct Transfer {
    bytes: u64,
    /// Bytes `b` sends back on each stream (0 for a one-way transfer).
    back: u64,
    a: HashMap<StreamId, End>,
    b: HashMap<StreamId, End>,
    /// Streams that reached the end in both directions on both sides.
    pub completed: usize,
    streams: usize,
    scratch: Vec<u8>,
    /// Errors seen (stream reset, session lost), for the test to report.
    pub errors: Vec<String>,
}

impl Transfer {
    /// Open the streams on `pair.a`.
    pub fn start(pair: &mut Pair, streams: usize, bytes: u64) -> Result<Transfer, StreamError> {
        Self::start_with(pair, streams, bytes, bytes)
    }

    /// Open the streams on `pair.a`; only `a` sends (`bytes` on each stream).
    pub fn start_one_way(
        pair: &mut Pair,
        streams: usize,
        bytes: u64,
    ) -> Result<Transfer, StreamError> {
        Self::start_with(pair, streams, bytes, 0)
    }

    fn start_with(
        pair: &mut Pair,
        streams: usize,
        bytes: u64,
        back: u64,
    ) -> Result<Transfer, StreamError> {
        let mut a = HashMap::new();
        for i in 0..streams {
            let id = pair.a.open_stream()?;
            let end = End {
                index: Some(i as u64),
                header: (i as u64).to_be_bytes().to_vec(),
                ..End::default()
            };
            a.insert(id, end);
        }
        Ok(Transfer {
            bytes,
            back,
            a,
            b: HashMap::new(),
            completed: 0,
            streams,
            scratch: vec![0u8; 64 * 1024],
            errors: Vec::new(),
        })
    }

    /// Whether every stream finished both ways.
    pub fn done(&self) -> bool {
        self.completed == 2 * self.streams
    }

    /// Run until done, `deadline` (virtual) or an error. `on_data` sees every byte received:
    /// `(direction, stream index, bytes)`.
    pub fn run(
        &mut self,
        pair: &mut Pair,
        deadline: Instant,
        mut on_data: impl FnMut(Dir, u64, &[u8]),
    ) -> Result<(), String> {
        let ids: Vec<StreamId> = self.a.keys().copied().collect();
        for id in ids {
            self.pump(pair, true, id, &mut on_data);
        }
        while !self.done() {
            if pair.now > deadline {
                return Err(format!(
                    "deadline passed with {}/{} stream ends complete",
                    self.completed,
                    2 * self.streams
                ));
            }
            if !pair.step() {
                return Err("nothing scheduled: hang".into());
            }
            while let Some(ev) = pair.a.poll_event() {
                self.on_event(pair, true, ev, &mut on_data)?;
            }
            while let Some(ev) = pair.b.poll_event() {
                self.on_event(pair, false, ev, &mut on_data)?;
            }
        }
        Ok(())
    }

    fn on_event(
        &mut self,
        pair: &mut Pair,
        is_a: bool,
        ev: Event,
        on_data: &mut impl FnMut(Dir, u64, &[u8]),
    ) -> Result<(), String> {
        match ev {
            Event::Incoming => {
                while let Some(id) = if is_a { pair.a.accept() } else { pair.b.accept() } {
                    let map = if is_a { &mut self.a } else { &mut self.b };
                    map.insert(id, End::default());
                    self.pump(pair, is_a, id, on_data);
                }
            }
            Event::Connected(id)
            | Event::Readable(id)
            | Event::Writable(id)
            | Event::Finished(id) => self.pump(pair, is_a, id, on_data),
            Event::Closed(_) => {}
            Event::Reset(id) => return Err(format!("stream {id} reset")),
            Event::TimedOut(id) => return Err(format!("stream {id} timed out")),
            Event::SessionLost(e) => return Err(format!("session lost: {e}")),
        }
        Ok(())
    }

    fn pump(
        &mut self,
        pair: &mut Pair,
        is_a: bool,
        id: StreamId,
        on_data: &mut impl FnMut(Dir, u64, &[u8]),
    ) {
        let (s, map) = if is_a { (&mut pair.a, &mut self.a) } else { (&mut pair.b, &mut self.b) };
        let Some(end) = map.get_mut(&id) else { return };
        let rx_dir = if is_a { Dir::BtoA } else { Dir::AtoB };
        let tx_dir = if is_a { Dir::AtoB } else { Dir::BtoA };
        // Read everything there is.
        while !end.eof {
            match s.recv(id, &mut self.scratch) {
                Ok(0) => {
                    end.eof = true;
                    let want = if is_a { self.back } else { self.bytes };
                    if end.received == want && end.index.is_some() {
                        self.completed += 1;
                    } else {
                        self.errors.push(format!("stream {id}: early end at {}", end.received));
                    }
                }
                Ok(n) => {
                    let mut data = &self.scratch[..n];
                    if end.index.is_none() {
                        let need = 8 - end.header.len();
                        let take = need.min(data.len());
                        end.header.extend_from_slice(&data[..take]);
                        data = &data[take..];
                        if end.header.len() == 8 {
                            let mut h = [0u8; 8];
                            h.copy_from_slice(&end.header);
                            end.index = Some(u64::from_be_bytes(h));
                        }
                    }
                    if let Some(index) = end.index
                        && !data.is_empty()
                    {
                        on_data(rx_dir, index, data);
                        end.received += data.len() as u64;
                    }
                }
                Err(StreamError::Blocked) => break,
                Err(e) => {
                    self.errors.push(format!("stream {id}: {e}"));
                    break;
                }
            }
        }
        // Write what fits (b writes once it knows the index, from the header it read).
        let Some(index) = end.index else { return };
        if is_a && end.header_sent < 8 {
            match s.send(id, &end.header[end.header_sent..]) {
                Ok(n) => end.header_sent += n,
                Err(e) => self.errors.push(format!("stream {id}: {e}")),
            }
            if end.header_sent < 8 {
                return;
            }
        }
        let total = if is_a { self.bytes } else { self.back };
        while end.sent < total {
            let space = s.send_space(id).unwrap_or(0);
            // Generate only what fits (at least one byte: a full buffer then answers 0 and
            // promises a Writable event).
            let n =
                (total - end.sent).min(self.scratch.len() as u64).min(space.max(1) as u64) as usize;
            pattern(index, tx_dir, end.sent, &mut self.scratch[..n]);
            match s.send(id, &self.scratch[..n]) {
                Ok(0) => break,
                Ok(k) => end.sent += k as u64,
                Err(e) => {
                    self.errors.push(format!("stream {id}: {e}"));
                    break;
                }
            }
        }
        if end.sent == total && !end.fin_sent {
            end.fin_sent = true;
            let _ = s.close(id);
        }
    }
}
