//! The smoltcp device of a session: two packet queues between the interface and the
//! selective-repeat layer.

use std::collections::VecDeque;

use smoltcp::phy::{self, ChecksumCapabilities, DeviceCapabilities, Medium};
use smoltcp::time::Instant;
use smoltcp::wire::{IpProtocol, Ipv4Packet, TcpPacket};

use crate::zero_window::ClosedWindows;

/// Keep at most this many spare packet buffers ...
const POOL_MAX: usize = 4096;
/// ... and about this many bytes of them: a TUN stack's buffers are up to 64 KiB each.
const POOL_BYTES: usize = 8 << 20;

/// Put `buf` among the spares, unless the pool already holds [`POOL_MAX`] buffers or about
/// [`POOL_BYTES`] (counted as buffers of `buf`'s capacity); else it is freed.
pub(crate) fn keep_spare(pool: &mut Vec<Vec<u8>>, buf: Vec<u8>) {
    if pool.len() < POOL_MAX.min(POOL_BYTES / buf.capacity().max(1)) {
        pool.push(buf);
    }
}

/// A packet the selective-repeat receiver hands up: in a buffer of its own (it waited for
/// an earlier one, or was reassembled from fragments), or borrowed from the datagram it
/// came in (the next in order, handed up at once: copied only by the device).
pub(crate) enum Arrived<'a> {
    Owned(Vec<u8>),
    Borrowed(&'a [u8]),
}

impl Arrived<'_> {
    /// The packet in a buffer of its own (from `pool` if it was borrowed).
    pub fn into_owned(self, pool: &mut Vec<Vec<u8>>) -> Vec<u8> {
        match self {
            Arrived::Owned(p) => p,
            Arrived::Borrowed(b) => {
                let mut p = spare_for_copy(pool, b.len());
                p.clear();
                p.extend_from_slice(b);
                p
            }
        }
    }
}

impl std::ops::Deref for Arrived<'_> {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Arrived::Owned(p) => p,
            Arrived::Borrowed(b) => b,
        }
    }
}

pub(crate) struct LinkDevice {
    /// In-order packets from the peer, for smoltcp to read.
    pub rx: VecDeque<Vec<u8>>,
    /// Packets smoltcp made, waiting for the selective-repeat sender.
    pub tx: VecDeque<Vec<u8>>,
    /// Spare buffers, at whatever length they had: whoever takes one sets its length.
    pub pool: Vec<Vec<u8>>,
    /// `transmit` says "not now" at this many queued packets: backpressure, never a drop.
    pub tx_limit: usize,
    /// IP MTU of the virtual link.
    pub mtu: usize,
    /// Segmentation offload ([`LinkDevice::with_segmentation`]): the largest packet smoltcp
    /// may build, and the buffer it builds such packets in. `None`: off, smoltcp builds
    /// packets of at most `mtu` bytes.
    segmentation: Option<Segmentation>,
    /// The connections whose receive window this side last advertised as zero, for
    /// [`push_rx`] to pass their peer's acknowledgments to smoltcp (see
    /// [`crate::zero_window`]).
    pub closed: ClosedWindows,
}

/// See [`LinkDevice::with_segmentation`].
struct Segmentation {
    max_packet: usize,
    /// Where smoltcp writes a packet longer than the MTU before it is split; allocated
    /// with the first such packet and kept at `max_packet` bytes, so it is never
    /// zero-filled again.
    scratch: Vec<u8>,
    /// Long TCP segments cut, and the packets cut from them.
    cut: (u64, u64),
}

impl LinkDevice {
    pub fn new(mtu: usize, tx_limit: usize) -> LinkDevice {
        LinkDevice {
            rx: VecDeque::new(),
            tx: VecDeque::new(),
            pool: Vec::new(),
            tx_limit,
            mtu,
            segmentation: None,
            closed: ClosedWindows::default(),
        }
    }

    /// Turn on TCP segmentation offload, as a NIC's TSO: smoltcp is told the link's MTU is
    /// `max_packet` bytes (so it advertises an MSS that large and builds TCP segments up to
    /// it, doing its per-segment work once per such segment), and each IPv4 TCP packet
    /// longer than the real `mtu` is split here into packets of at most `mtu` bytes
    /// ([`segment`]). What reaches the queue is never longer than `mtu` unless it is not
    /// TCP over IPv4 (the selective-repeat layer fragments such a packet, as any other
    /// packet over the path MTU). No effect when `max_packet` is at most `mtu`.
    ///
    /// `max_packet` is rounded down so that a full segment's payload is a whole number of
    /// the cut packets' payloads ([`segment_size`]): every packet cut from a full segment
    /// then has the same length, and the driver's UDP GSO batches (which need equal-sized
    /// datagrams, the last one excepted) run across segments instead of ending at each
    /// segment's short last piece (which ended a batch every 49 datagrams: 22 datagrams
    /// per `sendmsg` on average in the lab before, 29 after).
    pub fn with_segmentation(mut self, max_packet: usize) -> LinkDevice {
        let max_packet = segment_size(max_packet.min(65535), self.mtu);
        self.segmentation = (max_packet > self.mtu).then(|| Segmentation {
            max_packet,
            scratch: Vec::new(),
            cut: (0, 0),
        });
        self
    }

    /// TCP segments longer than the MTU that segmentation offload cut, and the packets
    /// cut from them (both 0 when it is off).
    pub fn segmented(&self) -> (u64, u64) {
        self.segmentation.as_ref().map_or((0, 0), |s| s.cut)
    }

    /// Whether [`push_rx`] should coalesce: with segmentation offload on.
    pub fn coalescing(&self) -> bool {
        self.segmentation.is_some()
    }

    pub fn tx_full(&self) -> bool {
        self.tx.len() >= self.tx_limit
    }
}

/// IPv4 and TCP headers of the data segments smoltcp sends on a session's link, in bytes:
/// no IP options, and no TCP options (a session's sockets use no timestamps, and SACK
/// blocks go only with out-of-order data, which this link never delivers).
const SEGMENT_HEAD: usize = 20 + 20;

/// The largest IP packet of at most `max_packet` bytes whose TCP payload is a multiple of
/// the payload of a packet of `mtu` bytes (both with [`SEGMENT_HEAD`] bytes of headers);
/// `max_packet` itself when `mtu` leaves no payload.
fn segment_size(max_packet: usize, mtu: usize) -> usize {
    match (mtu.checked_sub(SEGMENT_HEAD), max_packet.checked_sub(SEGMENT_HEAD)) {
        (Some(piece @ 1..), Some(payload)) => SEGMENT_HEAD + payload / piece * piece,
        _ => max_packet,
    }
}

/// A spare for smoltcp to write a packet of `len` bytes into, chosen once the length is
/// known: of the newest few, the shortest that is at least `len` long, which the packet
/// then only cuts; if none is, the longest, grown (zero-filled) the least; if the pool is
/// empty, a new buffer. Buffers come back at the length of the packet they held: on the
/// sending side most received packets are ACKs, and growing such a buffer to a full
/// segment zero-fills it (4.5% of the sender's time in the lab, perf). Choosing by `len`
/// also keeps an ACK out of a full-length buffer that a full segment (or, at the TUN
/// device, the next 64 KiB read) needs at full length.
fn spare_for_write(pool: &mut Vec<Vec<u8>>, len: usize) -> Vec<u8> {
    take_spare(pool, |b| {
        Some(if b.len() >= len { (0, b.len()) } else { (1, usize::MAX - b.len()) })
    })
}

/// A spare buffer to copy a received packet of `len` bytes into (its length is then
/// reset, so any will do), from the newest few: of those whose capacity holds `len`, the
/// shortest, which leaves the full-length ones to [`spare_for_write`]; if none holds it,
/// the largest. Taking the newest instead took a buffer the peer's ACK had just released,
/// for each of the peer's short ACK packets, and turned it short for good; taking the
/// shortest regardless of capacity took buffers too small for the packet, so each copy
/// was a new allocation and the full pool freed the buffer it replaced (7% of a receiver
/// in malloc and free, perf in the lab).
pub(crate) fn spare_for_copy(pool: &mut Vec<Vec<u8>>, len: usize) -> Vec<u8> {
    take_spare(pool, |b| {
        Some(if b.capacity() >= len { (0, b.len()) } else { (1, usize::MAX - b.capacity()) })
    })
}

/// A spare to read up to `len` bytes into: of the newest spares whose capacity holds `len`,
/// the longest (the least to zero-fill up to `len`); else an empty buffer.
pub(crate) fn spare_for_read(pool: &mut Vec<Vec<u8>>, len: usize) -> Vec<u8> {
    take_spare(pool, |b| (b.capacity() >= len).then(|| usize::MAX - b.len()))
}

/// Take the spare that `rank` ranks lowest among the newest [`SPARE_SCAN`] (`None`: not a
/// candidate; on a tie, the newer), or an empty buffer when there is none. The choosers
/// above rank in two tiers, `(0, _)` for a buffer that serves as it is, `(1, _)` for the
/// fallback.
fn take_spare<K: Ord>(pool: &mut Vec<Vec<u8>>, rank: impl Fn(&Vec<u8>) -> Option<K>) -> Vec<u8> {
    let n = pool.len();
    let best = (n.saturating_sub(SPARE_SCAN)..n)
        .rev()
        .filter_map(|i| rank(&pool[i]).map(|k| (k, i)))
        .min_by(|a, b| a.0.cmp(&b.0));
    best.map_or_else(Vec::new, |(_, i)| pool.swap_remove(i))
}

/// How many of the newest spare buffers the choosers look at.
const SPARE_SCAN: usize = 16;

pub(crate) struct RxToken<'a> {
    buf: Vec<u8>,
    pool: &'a mut Vec<Vec<u8>>,
}

pub(crate) struct TxToken<'a> {
    queue: &'a mut VecDeque<Vec<u8>>,
    /// The real MTU and the scratch buffer, when segmentation offload is on.
    segmentation: Option<(usize, &'a mut Segmentation)>,
    /// Where the packet's buffer comes from once its length is known ([`spare_for_write`]);
    /// `None` for a reply made while receiving, which gets a new buffer. Nothing is taken
    /// for a token smoltcp drops unused (it asks for one per socket it polls).
    pool: Option<&'a mut Vec<Vec<u8>>>,
    /// Told of every packet sent (its window and acknowledgment).
    closed: &'a mut ClosedWindows,
}

impl phy::Device for LinkDevice {
    type RxToken<'a> = RxToken<'a>;
    type TxToken<'a> = TxToken<'a>;

    fn receive(&mut self, _now: Instant) -> Option<(RxToken<'_>, TxToken<'_>)> {
        let buf = self.rx.pop_front()?;
        // A reply made while receiving (a RST, a challenge ACK) is queued even past the
        // limit: it is rare, small, and smoltcp would not retry it. It gets a new buffer:
        // a spare one taken here was dropped with the token for nearly every packet
        // received, so the pool ran dry and each copy in allocated (7% of a receiver in
        // malloc and free, perf in the lab).
        let segmentation = self.segmentation.as_mut().map(|s| (self.mtu, s));
        Some((
            RxToken { buf, pool: &mut self.pool },
            TxToken { queue: &mut self.tx, segmentation, pool: None, closed: &mut self.closed },
        ))
    }

    fn transmit(&mut self, _now: Instant) -> Option<TxToken<'_>> {
        if self.tx.len() >= self.tx_limit {
            return None;
        }
        let segmentation = self.segmentation.as_mut().map(|s| (self.mtu, s));
        Some(TxToken {
            queue: &mut self.tx,
            segmentation,
            pool: Some(&mut self.pool),
            closed: &mut self.closed,
        })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ip;
        caps.max_transmission_unit = self.segmentation.as_ref().map_or(self.mtu, |s| s.max_packet);
        // Checksums are not computed or checked on this link: the UDP checksum of the
        // underlay covers every byte, and TLS authenticates the streams above. It saves
        // two passes over every packet.
        caps.checksum = ChecksumCapabilities::ignored();
        caps
    }
}

impl phy::RxToken for RxToken<'_> {
    fn consume<R, F: FnOnce(&[u8]) -> R>(mut self, f: F) -> R {
        let r = f(&self.buf);
        // Kept at its length (not cleared): a transmit reuses it without zero-filling.
        keep_spare(self.pool, std::mem::take(&mut self.buf));
        r
    }
}

impl phy::TxToken for TxToken<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        if let Some((mtu, seg)) = self.segmentation.filter(|(mtu, _)| len > *mtu) {
            if seg.scratch.len() < seg.max_packet {
                seg.scratch.resize(seg.max_packet, 0);
            }
            let Some(packet) = seg.scratch.get_mut(..len) else {
                // Longer than the MTU smoltcp was given: it never asks for that.
                return f(&mut vec![0; len]);
            };
            let r = f(packet);
            self.closed.on_sent(packet);
            let mut none = Vec::new();
            let queued = self.queue.len();
            if segment(packet, mtu, self.pool.unwrap_or(&mut none), self.queue) {
                seg.cut.0 += 1;
                seg.cut.1 += (self.queue.len() - queued) as u64;
            }
            return r;
        }
        let mut buf = self.pool.map_or_else(Vec::new, |pool| spare_for_write(pool, len));
        // Pool buffers keep their old length, so a long enough one is only cut: zero-filling
        // every packet cost about 5% of the daemon's time at Gbit/s rates (perf, lab).
        // smoltcp's emit writes every byte of the packet but the padding after a TCP
        // options list's End-of-List, which receivers ignore; any old bytes there are from
        // an earlier packet of this same link (the same peer, or the local kernel).
        if buf.len() >= len {
            buf.truncate(len);
        } else {
            buf.resize(len, 0);
        }
        let r = f(&mut buf);
        self.closed.on_sent(&buf);
        self.queue.push_back(buf);
        r
    }
}

/// Queue `packet` as packets of at most `mtu` bytes: an IPv4 TCP segment is cut into
/// segments that each carry the packet's IP and TCP headers (options included), the next
/// share of its payload, and the sequence number that share starts at; FIN and PSH only
/// on the last, the IP identification counting up (RFC 9293 §3.7.1 segmentation, as a
/// NIC's TSO does it). No checksums: this link carries none (see `capabilities`).
/// Anything else (a SYN, a header as long as the MTU, not TCP over IPv4) is queued whole.
/// Buffers come from `pool`. Returns whether it cut the packet.
fn segment(
    packet: &[u8],
    mtu: usize,
    pool: &mut Vec<Vec<u8>>,
    queue: &mut VecDeque<Vec<u8>>,
) -> bool {
    let whole = |pool: &mut Vec<Vec<u8>>, queue: &mut VecDeque<Vec<u8>>| {
        queue.push_back(Arrived::Borrowed(packet).into_owned(pool));
        false
    };
    let Ok(ip) = Ipv4Packet::new_checked(packet) else { return whole(pool, queue) };
    let (ihl, total) = (usize::from(ip.header_len()), usize::from(ip.total_len()));
    if ip.next_header() != IpProtocol::Tcp || ip.more_frags() || ip.frag_offset() != 0 {
        return whole(pool, queue);
    }
    let Some(Ok(tcp)) = packet.get(ihl..total).map(TcpPacket::new_checked) else {
        return whole(pool, queue);
    };
    let head = ihl + usize::from(tcp.header_len());
    if tcp.syn() || head >= mtu || total <= mtu {
        return whole(pool, queue);
    }
    let (seq, fin, psh, ident) = (tcp.seq_number(), tcp.fin(), tcp.psh(), ip.ident());
    let payload = &packet[head..total];
    let mut offset = 0;
    for (i, share) in payload.chunks(mtu - head).enumerate() {
        let len = head + share.len();
        let mut buf = spare_for_write(pool, len);
        buf.resize(len, 0);
        buf[..head].copy_from_slice(&packet[..head]);
        buf[head..].copy_from_slice(share);
        let mut ip = Ipv4Packet::new_unchecked(&mut buf[..]);
        // `len` <= mtu < total, which fits 16 bits.
        ip.set_total_len(len as u16);
        ip.set_ident(ident.wrapping_add(i as u16));
        let mut tcp = TcpPacket::new_unchecked(&mut buf[ihl..]);
        tcp.set_seq_number(seq + offset);
        offset += share.len();
        let last = offset == payload.len();
        tcp.set_fin(fin && last);
        tcp.set_psh(psh && last);
        queue.push_back(buf);
    }
    true
}

/// Queue a packet from the peer for smoltcp on `rx` (a [`LinkDevice`]'s). When
/// `coalescing`, a TCP segment that continues the one queued last is joined to it instead
/// ([`coalesce`]), as a NIC's receive offload does: smoltcp then takes up to 64 KiB in one
/// segment, and acknowledges it once. A segment that meets a closed window (`closed`) is
/// queued after the pure ACK [`ClosedWindows::rescue`] makes for it, one that reopens the
/// peer's window after the ACKs [`ClosedWindows::reopen`] makes, and neither is joined.
/// Buffers come from and go back to `pool`. Returns whether it joined `p` to the segment
/// before.
pub(crate) fn push_rx(
    rx: &mut VecDeque<Vec<u8>>,
    pool: &mut Vec<Vec<u8>>,
    closed: &mut ClosedWindows,
    coalescing: bool,
    p: Arrived<'_>,
) -> bool {
    let rescue = closed.rescue(&p, pool);
    let reopen = closed.reopen(&p, pool);
    if rescue.is_some() || reopen.is_some() {
        rx.extend(rescue);
        if let Some(ack) = reopen {
            for _ in 0..crate::zero_window::DUP_ACKS {
                rx.push_back(Arrived::Borrowed(&ack).into_owned(pool));
            }
            rx.push_back(ack);
        }
        rx.push_back(p.into_owned(pool));
        return false;
    }
    if let Some(tail) = rx.back_mut().filter(|_| coalescing)
        && coalesce(tail, &p)
    {
        if let Arrived::Owned(p) = p {
            keep_spare(pool, p);
        }
        return true;
    }
    rx.push_back(p.into_owned(pool));
    false
}

/// Largest packet [`coalesce`] makes: the IPv4 total length field's limit.
const COALESCED_MAX: usize = 65535;

/// Append the payload of TCP segment `next` to the segment `tail` if it continues it: both
/// IPv4 without options or fragmentation, the same addresses, ports, TCP options (their
/// bytes) and a plain ACK on `tail`; `next`'s sequence number where `tail`'s payload ends;
/// `next` carrying data with ACK and at most PSH; the sum no longer than 64 KiB. The
/// joined segment takes `next`'s acknowledgment number, window and PSH (the later ones:
/// the peer sent them in this order). Returns whether it joined them; `tail` is unchanged
/// when not. No checksums: this link carries none.
fn coalesce(tail: &mut Vec<u8>, next: &[u8]) -> bool {
    const IP: usize = 20;
    // Flags other than ACK and PSH end a run: SYN, FIN, RST, URG, ECE, CWR.
    const ACK: u8 = 0x10;
    const PSH: u8 = 0x08;
    let tcp_head = |p: &[u8]| -> Option<(usize, u32, u8)> {
        let ip = Ipv4Packet::new_checked(p).ok()?;
        let plain = usize::from(ip.header_len()) == IP
            && usize::from(ip.total_len()) == p.len()
            && ip.next_header() == IpProtocol::Tcp
            && !ip.more_frags()
            && ip.frag_offset() == 0;
        let tcp = TcpPacket::new_checked(p.get(IP..)?).ok()?;
        plain.then(|| (IP + usize::from(tcp.header_len()), tcp.seq_number().0 as u32, p[IP + 13]))
    };
    let (Some((head, seq, flags)), Some((next_head, next_seq, next_flags))) =
        (tcp_head(tail), tcp_head(next))
    else {
        return false;
    };
    let more = next.len() - next_head;
    if flags != ACK
        || next_flags & !PSH != ACK
        || head != next_head
        || more == 0
        || tail.len() + more > COALESCED_MAX
        || seq.wrapping_add((tail.len() - head) as u32) != next_seq
        // Addresses (IPv4 12..20), ports (TCP 0..4), options (TCP 20..head).
        || tail[12..IP + 4] != next[12..IP + 4]
        || tail[IP + 20..head] != next[IP + 20..head]
    {
        return false;
    }
    if tail.capacity() < tail.len() + more {
        // Grown once to the most it can take, not piece by piece.
        tail.reserve_exact(COALESCED_MAX - tail.len());
    }
    tail.extend_from_slice(&next[next_head..]);
    let len = tail.len() as u16; // <= COALESCED_MAX
    let mut ip = Ipv4Packet::new_unchecked(&mut tail[..]);
    ip.set_total_len(len);
    // Acknowledgment number (TCP 8..12), flags (13), window (14..16) from `next`.
    tail[IP + 8..IP + 12].copy_from_slice(&next[IP + 8..IP + 12]);
    tail[IP + 13] = next_flags;
    tail[IP + 14..IP + 16].copy_from_slice(&next[IP + 14..IP + 16]);
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An IPv4 TCP packet from 127.0.0.1:1000 to 127.0.0.2:2000 with `payload`, sequence
    /// number 4_000_000_000 (so the pieces wrap around 2^32), the given flags, and a
    /// 12-byte timestamp option, as smoltcp emits it.
    fn tcp_packet(payload: &[u8], syn: bool, fin: bool) -> Vec<u8> {
        use smoltcp::phy::ChecksumCapabilities as Caps;
        use smoltcp::wire::{Ipv4Address, Ipv4Repr, TcpControl, TcpRepr, TcpSeqNumber};
        let (src, dst) = (Ipv4Address::new(127, 0, 0, 1), Ipv4Address::new(127, 0, 0, 2));
        let control = match (syn, fin) {
            (true, _) => TcpControl::Syn,
            (_, true) => TcpControl::Fin,
            _ => TcpControl::Psh,
        };
        let tcp = TcpRepr {
            src_port: 1000,
            dst_port: 2000,
            control,
            seq_number: TcpSeqNumber(4_000_000_000u32 as i32),
            ack_number: Some(TcpSeqNumber(77)),
            window_len: 512,
            window_scale: None,
            max_seg_size: None,
            sack_permitted: false,
            sack_ranges: [None; 3],
            timestamp: Some(smoltcp::wire::TcpTimestampRepr::new(5, 6)),
            payload,
        };
        let ip = Ipv4Repr {
            src_addr: src,
            dst_addr: dst,
            next_header: IpProtocol::Tcp,
            payload_len: tcp.buffer_len(),
            hop_limit: 64,
        };
        let mut buf = vec![0u8; ip.buffer_len() + tcp.buffer_len()];
        let mut p = Ipv4Packet::new_unchecked(&mut buf[..]);
        ip.emit(&mut p, &Caps::ignored());
        p.set_ident(9);
        tcp.emit(
            &mut TcpPacket::new_unchecked(p.payload_mut()),
            &src.into(),
            &dst.into(),
            &Caps::ignored(),
        );
        buf
    }

    #[test]
    fn a_tcp_segment_longer_than_the_mtu_is_cut_into_segments_that_fit() {
        let payload: Vec<u8> = (0..10_000u32).map(|i| (i * 7) as u8).collect();
        let packet = tcp_packet(&payload, false, true);
        let (mut pool, mut queue) = (Vec::new(), VecDeque::new());
        assert!(segment(&packet, 1382, &mut pool, &mut queue));
        let head = 20 + 20 + 12;
        assert_eq!(queue.len(), 10_000usize.div_ceil(1382 - head));
        let mut joined = Vec::new();
        for (i, p) in queue.iter().enumerate() {
            assert!(p.len() <= 1382, "piece {i}: {} bytes", p.len());
            let ip = Ipv4Packet::new_checked(&p[..]).unwrap();
            assert_eq!(usize::from(ip.total_len()), p.len());
            assert_eq!(ip.ident(), 9 + i as u16);
            let tcp = TcpPacket::new_checked(ip.payload()).unwrap();
            assert_eq!((tcp.src_port(), tcp.dst_port(), tcp.ack_number().0), (1000, 2000, 77));
            assert_eq!(usize::from(tcp.header_len()), 32, "options kept");
            let expect = smoltcp::wire::TcpSeqNumber(4_000_000_000u32 as i32) + joined.len();
            assert_eq!(tcp.seq_number(), expect, "piece {i}");
            let last = i == queue.len() - 1;
            assert_eq!((tcp.fin(), tcp.psh()), (last, false), "piece {i}");
            joined.extend_from_slice(tcp.payload());
        }
        assert_eq!(joined, payload);
    }

    #[test]
    fn what_is_not_a_long_tcp_segment_is_queued_whole() {
        let (mut pool, mut queue) = (Vec::new(), VecDeque::new());
        let short = tcp_packet(&[1; 1000], false, false);
        let syn = tcp_packet(&[], true, false);
        let mut long_syn = tcp_packet(&[], true, false);
        long_syn.resize(3000, 0);
        Ipv4Packet::new_unchecked(&mut long_syn[..]).set_total_len(3000);
        let mut udp = tcp_packet(&[2; 3000], false, false);
        Ipv4Packet::new_unchecked(&mut udp[..]).set_next_header(IpProtocol::Udp);
        let garbage = vec![0xff; 3000];
        for p in [&short, &syn, &long_syn, &udp, &garbage] {
            assert!(!segment(p, 1382, &mut pool, &mut queue));
            assert_eq!(queue.pop_front().as_ref(), Some(p));
            assert!(queue.is_empty());
        }
    }

    #[test]
    fn segments_cut_by_the_sender_are_joined_again_by_the_receiver() {
        let payload: Vec<u8> = (0..20_000u32).map(|i| (i * 13) as u8).collect();
        let mut pieces = VecDeque::new();
        let mut pool = Vec::new();
        assert!(segment(&tcp_packet(&payload, false, false), 1382, &mut pool, &mut pieces));
        assert!(pieces.len() > 10);
        let (mut rx, n) = (VecDeque::new(), pieces.len());
        let joined = pieces
            .iter()
            .enumerate()
            .filter(|(i, p)| {
                // Alternate the two ways a packet arrives.
                let p = if i % 2 == 0 { Arrived::Borrowed(p) } else { Arrived::Owned(p.to_vec()) };
                push_rx(&mut rx, &mut pool, &mut ClosedWindows::default(), true, p)
            })
            .count();
        assert_eq!((joined, rx.len()), (n - 1, 1));
        // The original segment again, byte for byte (PSH came back with the last piece).
        assert_eq!(rx[0], tcp_packet(&payload, false, false));
        // Without coalescing each piece stays one packet.
        let mut rx = VecDeque::new();
        for p in &pieces {
            assert!(!push_rx(
                &mut rx,
                &mut pool,
                &mut ClosedWindows::default(),
                false,
                Arrived::Borrowed(p)
            ));
        }
        assert_eq!(rx.len(), n);
    }

    #[test]
    fn only_a_continuing_data_segment_of_the_same_flow_is_joined() {
        let first = tcp_packet(&[1; 1000], false, false);
        // tcp_packet sets PSH on data without FIN: a plain ACK is what can be continued.
        let mut tail = first.clone();
        tail[20 + 13] = 0x10;
        let next_seq = (4_000_000_000u32).wrapping_add(1000);
        let mut next = tcp_packet(&[2; 500], false, false);
        next[20 + 4..20 + 8].copy_from_slice(&next_seq.to_be_bytes());
        let mut joined = tail.clone();
        assert!(coalesce(&mut joined, &next));
        assert_eq!(joined.len(), tail.len() + 500);
        assert_eq!(joined[20 + 13], 0x18, "the later PSH is kept");
        type Change = Box<dyn Fn(&mut Vec<u8>)>;
        let variants: [(&str, Change); 7] = [
            ("a gap", Box::new(|p| p[20 + 7] ^= 1)),
            ("another port", Box::new(|p| p[20] ^= 1)),
            ("another source", Box::new(|p| p[12] ^= 1)),
            ("a FIN", Box::new(|p| p[20 + 13] |= 0x01)),
            ("a RST", Box::new(|p| p[20 + 13] |= 0x04)),
            ("other options", Box::new(|p| p[20 + 27] ^= 1)),
            (
                "no data",
                Box::new(|p| {
                    p.truncate(52);
                    Ipv4Packet::new_unchecked(&mut p[..]).set_total_len(52);
                }),
            ),
        ];
        for (what, change) in variants {
            let mut other = next.clone();
            change(&mut other);
            let mut t = tail.clone();
            assert!(!coalesce(&mut t, &other), "{what}");
            assert_eq!(t, tail, "{what}: the tail is unchanged");
        }
        // A tail that is not a plain ACK (here PSH) ends the run.
        let mut t = first.clone();
        assert!(!coalesce(&mut t, &next));
        // Never past the IPv4 length limit.
        let mut big = tcp_packet(&vec![0; 65_000], false, false);
        big[20 + 13] = 0x10;
        let seq = (4_000_000_000u32).wrapping_add(65_000);
        next[20 + 4..20 + 8].copy_from_slice(&seq.to_be_bytes());
        assert!(!coalesce(&mut big, &next));
        // Garbage on either side is left alone.
        assert!(!coalesce(&mut vec![0xff; 100], &next));
        assert!(!coalesce(&mut tail.clone(), &[0x45; 60]));
    }

    proptest::proptest! {
        /// Whatever a peer sends: joining never panics, leaves the tail as it was when it
        /// says no, and never makes a packet longer than IPv4 allows.
        #[test]
        fn coalescing_arbitrary_packets_never_panics(
            tail in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200),
            next in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200),
            real_tail: bool,
        ) {
            let mut t = if real_tail {
                let mut p = tcp_packet(&tail, false, false);
                p[20 + 13] = 0x10;
                p
            } else {
                tail.clone()
            };
            let before = t.clone();
            if coalesce(&mut t, &next) {
                proptest::prop_assert!(t.len() > before.len() && t.len() <= COALESCED_MAX);
                let ip = Ipv4Packet::new_checked(&t[..]).unwrap();
                proptest::prop_assert_eq!(usize::from(ip.total_len()), t.len());
            } else {
                proptest::prop_assert_eq!(t, before);
            }
        }

        /// Cut at any MTU and joined again, a segment is what it was; garbage is queued
        /// whole, never cut.
        #[test]
        fn cut_and_joined_at_any_mtu_a_segment_is_unchanged(
            len in 0usize..20_000,
            mtu in 60usize..3000,
            garbage in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..3000),
        ) {
            let payload: Vec<u8> = (0..len).map(|i| (i * 31) as u8).collect();
            let packet = tcp_packet(&payload, false, false);
            let (mut pool, mut pieces) = (Vec::new(), VecDeque::new());
            let cut = segment(&packet, mtu, &mut pool, &mut pieces);
            proptest::prop_assert_eq!(cut, packet.len() > mtu && mtu > 52);
            if cut {
                proptest::prop_assert!(pieces.iter().all(|p| p.len() <= mtu));
            }
            let mut rx = VecDeque::new();
            for p in &pieces {
                push_rx(&mut rx, &mut pool, &mut ClosedWindows::default(), true, Arrived::Borrowed(p));
            }
            proptest::prop_assert_eq!(rx.len(), 1);
            proptest::prop_assert_eq!(&rx[0], &packet);
            let mut q = VecDeque::new();
            if segment(&garbage, mtu, &mut pool, &mut q) {
                proptest::prop_assert!(q.iter().all(|p| p.len() <= mtu));
            } else {
                proptest::prop_assert_eq!(q.len(), 1);
                proptest::prop_assert_eq!(&q[0], &garbage);
            }
        }
    }

    #[test]
    fn smoltcp_builds_long_segments_only_when_segmentation_is_on() {
        use smoltcp::phy::Device;
        let off = LinkDevice::new(1382, 8);
        assert_eq!(off.capabilities().max_transmission_unit, 1382);
        assert_eq!(
            LinkDevice::new(1382, 8).with_segmentation(1000).capabilities().max_transmission_unit,
            1382
        );
        let mut on = LinkDevice::new(1382, 8).with_segmentation(1 << 20);
        // Rounded down to 48 pieces of 1342 bytes of payload (below).
        assert_eq!(on.capabilities().max_transmission_unit, 40 + 48 * 1342);
        use smoltcp::phy::TxToken as _;
        let packet = tcp_packet(&[3; 5000], false, false);
        let tx = on.transmit(Instant::from_millis(0)).unwrap();
        tx.consume(packet.len(), |b| b.copy_from_slice(&packet));
        assert_eq!(on.tx.len(), 4);
        assert_eq!(on.segmented(), (1, 4));
        assert!(on.tx.iter().all(|p| p.len() <= 1382));
    }

    #[test]
    fn a_packet_is_written_into_the_shortest_spare_it_only_cuts() {
        let mut pool = vec![vec![7u8; 1400], vec![0u8; 52], vec![0u8; 40], vec![0u8; 60]];
        // An ACK takes an ACK's buffer, not the full-length one.
        assert_eq!(spare_for_write(&mut pool, 52).len(), 52);
        assert_eq!(spare_for_write(&mut pool, 1400).len(), 1400);
        // None long enough: the longest, grown the least.
        assert_eq!(spare_for_write(&mut pool, 1400).len(), 60);
        assert_eq!(spare_for_write(&mut pool, 1400).len(), 40);
        assert!(spare_for_write(&mut pool, 1400).is_empty() && pool.is_empty());
    }

    #[test]
    fn a_transmit_token_takes_its_buffer_only_when_used() {
        use smoltcp::phy::{Device, TxToken as _};
        let mut d = LinkDevice::new(1400, 8);
        d.pool.extend([vec![0u8; 1400], vec![0u8; 52]]);
        for _ in 0..5 {
            // Each token is dropped unused at the end of the statement.
            let _ = d.transmit(Instant::from_millis(0));
        }
        assert_eq!(d.pool.len(), 2, "unused tokens took nothing");
        let tx = d.transmit(Instant::from_millis(0)).unwrap();
        tx.consume(1000, |p| p.fill(9));
        assert_eq!(d.tx.pop_front().map(|p| p.len()), Some(1000));
        assert_eq!(d.pool, vec![vec![0u8; 52]]);
    }

    #[test]
    fn receiving_without_a_reply_takes_nothing_from_the_pool() {
        use smoltcp::phy::{Device, RxToken as _};
        let mut d = LinkDevice::new(1400, 8);
        d.pool.extend((0..4).map(|_| vec![0u8; 1400]));
        for _ in 0..3 {
            d.rx.push_back(vec![1u8; 1400]);
        }
        // The transmit token of each pair is dropped unused.
        while let Some((rx, _tx)) = d.receive(Instant::from_millis(0)) {
            rx.consume(|p| assert_eq!(p.len(), 1400));
        }
        // Each packet's buffer came back; none of the spares went with an unused token.
        assert_eq!(d.pool.len(), 4 + 3);
    }

    #[test]
    fn the_pool_keeps_thousands_of_small_buffers_but_few_large_ones() {
        let mut pool = Vec::new();
        for _ in 0..10_000 {
            keep_spare(&mut pool, vec![0u8; 1400]);
        }
        assert_eq!(pool.len(), POOL_MAX);
        let mut pool = Vec::new();
        for _ in 0..10_000 {
            keep_spare(&mut pool, vec![0u8; 65535]);
        }
        let held: usize = pool.iter().map(|b| b.capacity()).sum();
        assert!(held <= POOL_BYTES, "{held} bytes of 64 KiB buffers kept");
        assert!(pool.len() >= 64, "enough for a batch of full-size packets: {}", pool.len());
    }

    #[test]
    fn a_copy_takes_the_shortest_spare_that_holds_it() {
        let mut pool = vec![vec![0u8; 40], vec![0u8; 1400], vec![0u8; 52]];
        assert_eq!(spare_for_copy(&mut pool, 30).len(), 40);
        assert_eq!(spare_for_copy(&mut pool, 30).len(), 52);
        assert_eq!(spare_for_copy(&mut pool, 30).len(), 1400);
        assert!(spare_for_copy(&mut pool, 30).is_empty() && pool.is_empty());
    }

    #[test]
    fn a_copy_skips_spares_too_small_for_it() {
        // Short buffers with room (an ACK in a full-size buffer) beat full-length ones;
        // buffers without room for the packet are left alone.
        let mut roomy_ack = Vec::with_capacity(1400);
        roomy_ack.extend_from_slice(&[0u8; 52]);
        let mut pool = vec![vec![0u8; 1400], Vec::new(), roomy_ack, vec![0u8; 40]];
        let got = spare_for_copy(&mut pool, 1400);
        assert_eq!((got.len(), got.capacity() >= 1400), (52, true));
        assert_eq!(spare_for_copy(&mut pool, 1400).len(), 1400);
        // None holds it: the largest is grown rather than a tiny one.
        assert_eq!(spare_for_copy(&mut pool, 1400).len(), 40);
        assert_eq!(spare_for_copy(&mut pool, 1400).capacity(), 0);
    }
}
