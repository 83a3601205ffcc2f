//! Acknowledgments that reach a closed receive window: the ones smoltcp would throw away.
//!
//! RFC 9293 §3.10.7 ("Other States"): "If the RCV.WND is zero, no segments will be
//! acceptable, but special allowance should be made to accept valid ACKs, URGs, and RSTs."
//! smoltcp 0.14 makes none: with its receive window at zero, a segment that carries data, or
//! whose sequence number is not exactly the next one expected, is answered with an ACK and
//! dropped *before its acknowledgment number is read*. Two such segments are common:
//!
//! - the peer's zero-window probe, one byte of new data at the window's edge;
//! - every pure ACK the peer sends after that probe (or after a retransmission timeout
//!   that rewound it): a pure ACK carries the sender's next sequence number, which the
//!   probe moved one past what this side accepted.
//!
//! So while this side's window is closed it learns nothing of what the peer received. An
//! application that reads only what it can write back (an echo, a proxy, TLS) then waits
//! on its send buffer, which waits on those ACKs, and never reopens the window: both ends
//! stall for good (`tests/node_loopback.rs` caught it, about one run in ten, through TLS).
//!
//! The remedy, at the device, before smoltcp reads the segment: while the last segment this
//! side sent on a connection advertised a zero window, every segment from the peer on it
//! that smoltcp would refuse so is preceded by a copy of its header alone (no payload, ACK
//! as its only flag) whose sequence number is the acknowledgment number this side sent.
//! That is a pure ACK smoltcp accepts: it reads its acknowledgment and window, as RFC 9293
//! asks. The original segment follows unchanged, so smoltcp still answers it as before.
//!
//! Nothing here is decided by what the peer says alone: a connection is tracked only after
//! this side sent a zero window on it, and at most [`MAX_FLOWS`] at once.
//!
//! ## A window reopened with bytes in flight
//!
//! The other direction has a smoltcp 0.14 flaw too. smoltcp rounds its advertised window
//! down to its scale (RFC 7323 §2.3), so as it acknowledges bytes its window's right edge
//! can move left by up to 2^shift − 1 bytes; bytes the peer already sent up to the old edge
//! are then dropped, unacknowledged. When that window is zero, the sending smoltcp swaps its
//! retransmission timer for the zero-window-probe timer, and when the window reopens it
//! stops that timer and starts none, although those bytes are still unacknowledged. Nagle's
//! algorithm then holds back any segment shorter than the MSS while bytes are in flight, so
//! a stream whose last bytes are fewer than one MSS never sends them: the transfer stops
//! for good a few hundred bytes before its end (`tests/slow_reader.rs`, a reader that reads
//! in bursts).
//!
//! The remedy: when a segment from the peer reopens a window the peer had closed, the
//! device puts before it the pure ACK it makes of it (as above) and [`DUP_ACKS`] copies.
//! smoltcp reads the first as the window update and the copies as duplicate ACKs, and on
//! the third it retransmits from the acknowledged byte (RFC 5681 §3.2 fast retransmit),
//! which restarts its retransmission timer. When nothing is in flight, smoltcp does not
//! count them as duplicates and they change nothing. The connections whose peer closed its
//! window are tracked from what the peer sends, at most [`MAX_FLOWS`]; each reopening
//! costs at most four header-sized packets, handled locally, never sent.

use std::collections::{HashMap, HashSet};

use smoltcp::wire::{IpProtocol, Ipv4Packet, TcpPacket};

/// Connections tracked at once. A connection's entry goes when it advertises an open window
/// again or sends a RST; past this many (stale entries of sockets gone while closed), the
/// table starts over, and each connection still closed is tracked again from its next
/// segment.
pub(crate) const MAX_FLOWS: usize = 1024;

/// Duplicate ACKs that make smoltcp retransmit (its fast-retransmit threshold, RFC 5681).
pub(crate) const DUP_ACKS: usize = 3;

/// TCP flag bits (RFC 9293 §3.1).
const FIN: u8 = 0x01;
const SYN: u8 = 0x02;
const RST: u8 = 0x04;
const ACK: u8 = 0x10;

/// The connections whose last segment to the peer advertised a zero window, by (local port,
/// remote port), with the acknowledgment number that segment carried (the next sequence
/// number this side expects, RCV.NXT).
#[derive(Default)]
pub(crate) struct ClosedWindows {
    flows: HashMap<(u16, u16), u32>,
    /// Pure ACKs made by [`ClosedWindows::rescue`].
    pub rescued: u64,
    /// The connections whose peer's last segment advertised a zero window, by (local port,
    /// remote port).
    peer_closed: HashSet<(u16, u16)>,
    /// Windows the peer reopened, each answered by [`ClosedWindows::reopen`].
    pub reopened: u64,
}

/// The parts of an IPv4 TCP segment this module reads.
struct Segment {
    /// IP and TCP header length, options included (where the payload starts).
    head: usize,
    /// Source and destination port.
    ports: (u16, u16),
    seq: u32,
    ack: u32,
    flags: u8,
    window: u16,
    payload: usize,
}

/// The TCP window field of an IPv4 TCP packet, read without checking the rest: what the
/// receive path looks at for every packet.
fn window_field(p: &[u8]) -> Option<u16> {
    let first = *p.first()?;
    if first >> 4 != 4 || *p.get(9)? != 6 {
        return None;
    }
    let at = usize::from(first & 0x0f) * 4 + 14;
    let w = p.get(at..at + 2)?;
    Some(u16::from_be_bytes([w[0], w[1]]))
}

/// A pure ACK made of `packet`'s headers (`s`, its parse): no payload, ACK its only flag,
/// sequence number `seq`, the packet's own acknowledgment number and window. In a buffer
/// from `pool`.
fn pure_ack(packet: &[u8], s: &Segment, seq: u32, pool: &mut Vec<Vec<u8>>) -> Vec<u8> {
    let mut ack = crate::device::spare_for_copy(pool, s.head);
    ack.clear();
    ack.extend_from_slice(&packet[..s.head]);
    let mut ip = Ipv4Packet::new_unchecked(&mut ack[..]);
    // `head` <= the packet's total length, a 16-bit field.
    ip.set_total_len(s.head as u16);
    let ihl = usize::from(ip.header_len());
    let mut tcp = TcpPacket::new_unchecked(&mut ack[ihl..]);
    tcp.set_seq_number(smoltcp::wire::TcpSeqNumber(seq as i32));
    ack[ihl + 13] = ACK;
    debug_assert_eq!(parse(&ack).map(|a| (a.ack, a.window)), Some((s.ack, s.window)));
    ack
}

fn parse(p: &[u8]) -> Option<Segment> {
    let ip = Ipv4Packet::new_checked(p).ok()?;
    let (ihl, total) = (usize::from(ip.header_len()), usize::from(ip.total_len()));
    if ip.next_header() != IpProtocol::Tcp || ip.more_frags() || ip.frag_offset() != 0 {
        return None;
    }
    let tcp = TcpPacket::new_checked(p.get(ihl..total)?).ok()?;
    let head = ihl + usize::from(tcp.header_len());
    Some(Segment {
        head,
        ports: (tcp.src_port(), tcp.dst_port()),
        seq: tcp.seq_number().0 as u32,
        ack: tcp.ack_number().0 as u32,
        flags: p[ihl + 13],
        window: tcp.window_len(),
        payload: total - head,
    })
}

impl ClosedWindows {
    /// Note a packet this side sends to the peer (smoltcp's, before any cutting).
    pub fn on_sent(&mut self, packet: &[u8]) {
        let Some(s) = parse(packet) else { return };
        let key = s.ports;
        if s.flags & ACK == 0 || s.flags & (SYN | RST) != 0 || s.window != 0 {
            if !self.flows.is_empty() {
                self.flows.remove(&key);
            }
            return;
        }
        if self.flows.len() >= MAX_FLOWS && !self.flows.contains_key(&key) {
            self.flows.clear();
        }
        self.flows.insert(key, s.ack);
    }

    /// For a packet from the peer, about to go to smoltcp: the pure ACK to put before it
    /// (in a buffer from `pool`), when this side's window on its connection is closed and
    /// smoltcp would refuse the packet without reading its acknowledgment (it carries data,
    /// or its sequence number is not the one this side acknowledged). `None` otherwise: not
    /// IPv4 TCP, a SYN or RST, no ACK flag, or a segment smoltcp accepts as it is.
    pub fn rescue(&mut self, packet: &[u8], pool: &mut Vec<Vec<u8>>) -> Option<Vec<u8>> {
        if self.flows.is_empty() {
            return None;
        }
        let s = parse(packet)?;
        if s.flags & ACK == 0 || s.flags & (SYN | RST) != 0 {
            return None;
        }
        let expected = *self.flows.get(&(s.ports.1, s.ports.0))?;
        // A FIN occupies a sequence number too: smoltcp refuses it in a closed window.
        if s.seq == expected && s.payload == 0 && s.flags & FIN == 0 {
            return None;
        }
        self.rescued += 1;
        Some(pure_ack(packet, &s, expected, pool))
    }

    /// For a packet from the peer, about to go to smoltcp: when it reopens a window the
    /// peer had closed, the pure ACK made of it (in a buffer from `pool`), which the caller
    /// queues `1 + DUP_ACKS` times before the packet (see the module's second part). Its
    /// sequence number is the one smoltcp accepts: the acknowledgment this side sent if its
    /// own window is closed, else the packet's. `None` otherwise; a packet that closes the
    /// peer's window marks its connection.
    pub fn reopen(&mut self, packet: &[u8], pool: &mut Vec<Vec<u8>>) -> Option<Vec<u8>> {
        if window_field(packet)? != 0 && self.peer_closed.is_empty() {
            return None;
        }
        let s = parse(packet)?;
        let key = (s.ports.1, s.ports.0);
        if s.flags & ACK == 0 || s.flags & (SYN | RST) != 0 {
            self.peer_closed.remove(&key);
            return None;
        }
        if s.window == 0 {
            if self.peer_closed.len() >= MAX_FLOWS && !self.peer_closed.contains(&key) {
                self.peer_closed.clear();
            }
            self.peer_closed.insert(key);
            return None;
        }
        if !self.peer_closed.remove(&key) {
            return None;
        }
        let seq = self.flows.get(&key).copied().unwrap_or(s.seq);
        self.reopened += 1;
        Some(pure_ack(packet, &s, seq, pool))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::{Arrived, LinkDevice, push_rx};
    use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
    use smoltcp::phy::ChecksumCapabilities;
    use smoltcp::socket::tcp;
    use smoltcp::time::Instant;
    use smoltcp::wire::{
        HardwareAddress, IpAddress, IpCidr, Ipv4Address, Ipv4Repr, TcpControl, TcpRepr,
        TcpSeqNumber,
    };

    const LOCAL: Ipv4Address = Ipv4Address::new(10, 0, 0, 1);
    const PEER: Ipv4Address = Ipv4Address::new(10, 0, 0, 2);

    /// A segment from the peer (port 5000) to the local socket (port 80).
    fn from_peer(control: TcpControl, seq: u32, ack: Option<u32>, payload: &[u8]) -> Vec<u8> {
        let tcp = TcpRepr {
            src_port: 5000,
            dst_port: 80,
            control,
            seq_number: TcpSeqNumber(seq as i32),
            ack_number: ack.map(|a| TcpSeqNumber(a as i32)),
            window_len: 65535,
            window_scale: None,
            max_seg_size: None,
            sack_permitted: false,
            sack_ranges: [None; 3],
            timestamp: None,
            payload,
        };
        let ip = Ipv4Repr {
            src_addr: PEER,
            dst_addr: LOCAL,
            next_header: IpProtocol::Tcp,
            payload_len: tcp.buffer_len(),
            hop_limit: 64,
        };
        let mut buf = vec![0u8; ip.buffer_len() + tcp.buffer_len()];
        let caps = ChecksumCapabilities::ignored();
        let mut p = Ipv4Packet::new_unchecked(&mut buf[..]);
        ip.emit(&mut p, &caps);
        let mut t = TcpPacket::new_unchecked(p.payload_mut());
        tcp.emit(&mut t, &PEER.into(), &LOCAL.into(), &caps);
        buf
    }

    /// One end of a connection in smoltcp behind a [`LinkDevice`], with a 1 KiB receive
    /// buffer; the test plays the peer by hand.
    struct Local {
        dev: LinkDevice,
        iface: Interface,
        sockets: SocketSet<'static>,
        h: SocketHandle,
        /// The local side's initial sequence number.
        isn: u32,
        now: Instant,
        rescue: bool,
    }

    impl Local {
        /// Connected: the peer's initial sequence number is 1000.
        fn connected(rescue: bool) -> Local {
            let mut dev = LinkDevice::new(1400, 64);
            let now = Instant::from_millis(0);
            let mut iface = Interface::new(Config::new(HardwareAddress::Ip), &mut dev, now);
            iface.update_ip_addrs(|a| {
                let _ = a.push(IpCidr::new(IpAddress::Ipv4(LOCAL), 24));
            });
            let mut sock = tcp::Socket::new(
                tcp::SocketBuffer::new(vec![0; 1024]),
                tcp::SocketBuffer::new(vec![0; 4096]),
            );
            sock.set_ack_delay(None);
            sock.listen(80).unwrap();
            let mut sockets = SocketSet::new(Vec::new());
            let h = sockets.add(sock);
            let mut l = Local { dev, iface, sockets, h, isn: 0, now, rescue };
            l.take(&from_peer(TcpControl::Syn, 1000, None, &[]));
            let synack = l.sent().pop().expect("SYN-ACK");
            l.isn = parse(&synack).unwrap().seq;
            l.take(&from_peer(TcpControl::None, 1001, Some(l.isn + 1), &[]));
            assert_eq!(l.socket().state(), tcp::State::Established);
            l
        }

        fn socket(&mut self) -> &mut tcp::Socket<'static> {
            self.sockets.get_mut(self.h)
        }

        /// Hand smoltcp a segment from the peer (through [`push_rx`] when rescuing, else
        /// straight onto the queue) and poll.
        fn take(&mut self, p: &[u8]) {
            if self.rescue {
                let d = &mut self.dev;
                push_rx(&mut d.rx, &mut d.pool, &mut d.closed, false, Arrived::Borrowed(p));
            } else {
                self.dev.rx.push_back(p.to_vec());
            }
            self.poll();
        }

        fn poll(&mut self) {
            self.now += smoltcp::time::Duration::from_millis(1);
            self.iface.poll(self.now, &mut self.dev, &mut self.sockets);
        }

        fn sent(&mut self) -> Vec<Vec<u8>> {
            self.dev.tx.drain(..).collect()
        }
    }

    /// The three segments smoltcp refuses in a closed window, each acknowledging the local
    /// side's 100 bytes: without the rescue smoltcp never reads that acknowledgment (the
    /// bytes stay queued for good); with it, it does.
    #[test]
    fn acknowledgments_reach_smoltcp_through_a_closed_window() {
        type Make = fn(u32) -> Vec<u8>;
        let cases: [(&str, Make); 3] = [
            ("a zero-window probe", |isn| from_peer(TcpControl::None, 2025, Some(isn + 101), &[2])),
            ("a pure ACK after the probe", |isn| {
                from_peer(TcpControl::None, 2026, Some(isn + 101), &[])
            }),
            ("a pure ACK rewound by a timeout", |isn| {
                from_peer(TcpControl::None, 1500, Some(isn + 101), &[])
            }),
        ];
        for (what, make) in cases {
            for rescue in [false, true] {
                let mut l = Local::connected(rescue);
                assert_eq!(l.socket().send_slice(&[7; 100]), Ok(100));
                l.poll();
                let data = l.sent();
                assert_eq!(data.len(), 1);
                assert_eq!(parse(&data[0]).map(|s| s.payload), Some(100));
                // The peer fills the 1 KiB window without acknowledging those bytes yet.
                l.take(&from_peer(TcpControl::Psh, 1001, Some(l.isn + 1), &[1; 1024]));
                let ack = l.sent().pop().expect("an ACK");
                let ack = parse(&ack).unwrap();
                assert_eq!((ack.ack, ack.window), (2025, 0), "{what}: the window closed");
                assert_eq!(l.dev.closed.flows.get(&(80, 5000)), Some(&2025));
                l.take(&make(l.isn));
                let queued = l.socket().send_queue();
                if rescue {
                    assert_eq!(queued, 0, "{what}: the acknowledgment was read");
                    assert_eq!(l.dev.closed.rescued, 1, "{what}");
                } else {
                    // smoltcp 0.14 alone: if this fails, smoltcp reads such ACKs itself
                    // now, and this module may go.
                    assert_eq!(queued, 100, "{what}: smoltcp alone ignores it");
                }
            }
        }
    }

    /// smoltcp's other flaw: the peer dropped the last 4 bytes sent (past its window's
    /// edge, which rounding moved left) and closed its window; when it reopens it, smoltcp
    /// alone never sends again (no timer runs, and Nagle holds the 50 bytes written since).
    /// With the duplicate ACKs it resends from the acknowledged byte at once.
    #[test]
    fn a_reopened_window_resends_what_the_peer_dropped() {
        for remedy in [false, true] {
            let mut l = Local::connected(remedy);
            assert_eq!(l.socket().send_slice(&[7; 100]), Ok(100));
            l.poll();
            assert_eq!(l.sent().len(), 1);
            let mut closing = from_peer(TcpControl::None, 1001, Some(l.isn + 97), &[]);
            TcpPacket::new_unchecked(&mut closing[20..]).set_window_len(0);
            l.take(&closing);
            assert_eq!(l.socket().send_slice(&[8; 50]), Ok(50));
            l.poll();
            assert!(l.sent().is_empty(), "nothing to send into a closed window yet");
            l.take(&from_peer(TcpControl::None, 1001, Some(l.isn + 97), &[]));
            // Ten seconds: any timer smoltcp had running would have fired.
            for _ in 0..100 {
                l.now += smoltcp::time::Duration::from_millis(100);
                l.poll();
            }
            let data: Vec<Segment> =
                l.sent().iter().filter_map(|p| parse(p)).filter(|s| s.payload > 0).collect();
            if remedy {
                assert_eq!(data.first().map(|s| s.seq), Some(l.isn + 97), "resent at once");
                assert_eq!(l.dev.closed.reopened, 1);
            } else {
                // smoltcp 0.14 alone: if this fails, smoltcp restarts its timer itself now,
                // and the reopening remedy may go.
                assert!(data.is_empty(), "smoltcp alone stays silent");
            }
        }
    }

    #[test]
    fn an_open_window_is_left_alone_and_forgotten() {
        let mut l = Local::connected(true);
        l.take(&from_peer(TcpControl::Psh, 1001, Some(l.isn + 1), &[1; 1024]));
        l.sent();
        // The segment smoltcp accepts as it is needs no help.
        l.take(&from_peer(TcpControl::None, 2025, Some(l.isn + 1), &[]));
        assert_eq!(l.dev.closed.rescued, 0);
        // Another connection's segments, a RST, a SYN: none.
        let mut pool = Vec::new();
        let mut other = from_peer(TcpControl::None, 7, Some(1), &[1]);
        other[20] ^= 1;
        for p in [
            other,
            from_peer(TcpControl::Rst, 7, Some(1), &[]),
            from_peer(TcpControl::Syn, 7, Some(1), &[]),
            from_peer(TcpControl::None, 7, None, &[]),
            vec![0x45; 60],
        ] {
            assert!(l.dev.closed.rescue(&p, &mut pool).is_none());
        }
        // The application reads: the window opens, and the connection is no longer tracked.
        let read = l.socket().recv(|b| (b.len(), b.len())).unwrap();
        assert_eq!(read, 1024);
        l.poll();
        assert!(parse(&l.sent().pop().expect("a window update")).unwrap().window > 0);
        assert!(l.dev.closed.flows.is_empty());
    }

    #[test]
    fn at_most_max_flows_are_tracked() {
        let mut c = ClosedWindows::default();
        let mut ack = from_peer(TcpControl::None, 1, Some(2), &[]);
        TcpPacket::new_unchecked(&mut ack[20..]).set_window_len(0);
        for port in 0..3 * MAX_FLOWS as u16 {
            TcpPacket::new_unchecked(&mut ack[20..]).set_src_port(port);
            c.on_sent(&ack);
            assert!(c.flows.len() <= MAX_FLOWS);
            // The peer closing its window on as many connections.
            assert!(c.reopen(&ack, &mut Vec::new()).is_none());
            assert!(c.peer_closed.len() <= MAX_FLOWS);
        }
        assert!(!c.flows.is_empty());
        assert!(!c.peer_closed.is_empty());
    }

    proptest::proptest! {
        /// Whatever the peer sends: no panic, and a rescue or a reopening is always a pure
        /// ACK at the acknowledged sequence number, carrying the packet's own ACK and window.
        #[test]
        fn any_packet_is_rescued_only_as_a_pure_ack(
            bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..120),
            real: bool,
        ) {
            let mut c = ClosedWindows::default();
            c.flows.insert((80, 5000), 2025);
            let p = if real {
                let mut p = from_peer(TcpControl::None, 9, Some(3), &bytes);
                p[33] = bytes.first().copied().unwrap_or(0);
                p
            } else {
                bytes
            };
            if let Some(a) = c.rescue(&p, &mut Vec::new()) {
                let (a, s) = (parse(&a).unwrap(), parse(&p).unwrap());
                proptest::prop_assert_eq!((a.seq, a.flags, a.payload), (2025, ACK, 0));
                proptest::prop_assert_eq!((a.ack, a.window, a.ports), (s.ack, s.window, s.ports));
            }
            // The same for a window the peer reopens.
            c.peer_closed.insert((80, 5000));
            if let Some(a) = c.reopen(&p, &mut Vec::new()) {
                let (a, s) = (parse(&a).unwrap(), parse(&p).unwrap());
                proptest::prop_assert_eq!((a.seq, a.flags, a.payload), (2025, ACK, 0));
                proptest::prop_assert_eq!((a.ack, a.window, a.ports), (s.ack, s.window, s.ports));
                proptest::prop_assert!(s.window > 0);
            }
        }
    }
}
