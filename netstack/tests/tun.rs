//! The TUN termination stack driven by a second smoltcp interface playing the kernel: the
//! app's connect waits for the daemon's decision, data flows both ways, refused and
//! undecided connects fail, UDP and ping reach the daemon, a refused datagram gets ICMP port
//! unreachable quoting it, and garbage never panics.

use std::collections::VecDeque;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use proptest::prelude::*;
use q2q_netstack::tun::{Config, Event, FlowError, FlowId, PartialChecksum, RxChecksum, Stack};
use smoltcp::iface::{Config as IfaceConfig, Interface, SocketHandle, SocketSet};
use smoltcp::phy::{self, Device, DeviceCapabilities, Medium};
use smoltcp::socket::{tcp, udp};
use smoltcp::time::{Duration, Instant};
use smoltcp::wire::{HardwareAddress, IpAddress, IpCidr, IpEndpoint};

// ---- the "kernel": a smoltcp interface on the other side of the TUN ---------------------

#[derive(Default)]
struct Queues {
    rx: VecDeque<Vec<u8>>,
    tx: VecDeque<Vec<u8>>,
    /// As Linux with checksum offload on the TUN device: TCP checksums of what the "kernel"
    /// sends are left out (zero here; Linux puts the pseudo-header sum), and what it gets
    /// is verified after the harness completed the stack's partial sums as a device would.
    offload: bool,
}

struct Rx(Vec<u8>);
struct Tx<'a>(&'a mut VecDeque<Vec<u8>>);

impl phy::RxToken for Rx {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

impl phy::TxToken for Tx<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut buf = vec![0u8; len];
        let r = f(&mut buf);
        self.0.push_back(buf);
        r
    }
}

impl Device for Queues {
    type RxToken<'a> = Rx;
    type TxToken<'a> = Tx<'a>;
    fn receive(&mut self, _: Instant) -> Option<(Rx, Tx<'_>)> {
        let p = self.rx.pop_front()?;
        Some((Rx(p), Tx(&mut self.tx)))
    }
    fn transmit(&mut self, _: Instant) -> Option<Tx<'_>> {
        Some(Tx(&mut self.tx))
    }
    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ip;
        caps.max_transmission_unit = 1400;
        if self.offload {
            caps.checksum.tcp = phy::Checksum::Rx;
        }
        caps
    }
}

const APP_V4: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 1);
const APP_V6: Ipv6Addr = Ipv6Addr::new(0xfd71, 0x7132, 0, 0, 0, 0, 0, 1);

fn vip(last: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(100, 64, 0, last))
}

/// Read buffers of the harness's "TUN device", and below what size a packet is copied instead.
const READ_LEN: usize = 65536;
const READ_COPY_BELOW: usize = 1024;

struct Net {
    stack: Stack,
    iface: Interface,
    dev: Queues,
    sockets: SocketSet<'static>,
    now: Instant,
    events: Vec<Event>,
    /// Every packet the stack wrote to the "TUN".
    from_stack: Vec<Vec<u8>>,
}

impl Net {
    fn new(config: Config) -> Net {
        let now = Instant::from_secs(1000);
        let mut dev = Queues { offload: config.checksum_offload, ..Queues::default() };
        let mut icfg = IfaceConfig::new(HardwareAddress::Ip);
        icfg.random_seed = 7;
        let mut iface = Interface::new(icfg, &mut dev, now);
        iface.update_ip_addrs(|a| {
            a.push(IpCidr::new(IpAddress::from(APP_V4), 10)).unwrap();
            a.push(IpCidr::new(IpAddress::from(APP_V6), 64)).unwrap();
        });
        iface.routes_mut().add_default_ipv4_route(APP_V4).unwrap();
        iface.routes_mut().add_default_ipv6_route(APP_V6).unwrap();
        Net {
            stack: Stack::new(config, now),
            iface,
            dev,
            sockets: SocketSet::new(Vec::new()),
            now,
            events: Vec::new(),
            from_stack: Vec::new(),
        }
    }

    /// Move packets both ways until quiet, then collect events.
    fn step(&mut self) {
        for _ in 0..1000 {
            self.iface.poll(self.now, &mut self.dev, &mut self.sockets);
            let mut moved = false;
            // With offload the kernel's TCP checksums are left out (it vouches for them).
            let checksum =
                if self.dev.offload { RxChecksum::Trusted } else { RxChecksum::Unverified };
            while let Some(p) = self.dev.tx.pop_front() {
                // As the daemon does: large packets are read into the stack's own buffers
                // and handed over, small ones copied.
                if p.len() >= READ_COPY_BELOW {
                    let mut buf = self.stack.read_buffer(READ_LEN);
                    buf[..p.len()].copy_from_slice(&p);
                    buf.truncate(p.len());
                    self.stack.handle_packet_buf(self.now, buf, checksum);
                } else {
                    self.stack.handle_packet(self.now, &p, checksum);
                }
                moved = true;
            }
            while let Some(mut p) = self.stack.poll_transmit(self.now) {
                self.from_stack.push(p.clone());
                if let Some(partial) = self.stack.partial_checksum(&p) {
                    complete_checksum(&mut p, partial);
                }
                self.dev.rx.push_back(p);
                moved = true;
            }
            while let Some(e) = self.stack.poll_event() {
                self.events.push(e);
            }
            if !moved {
                return;
            }
        }
    }

    /// Advance virtual time by `dt`, honouring the stack's deadline.
    fn advance(&mut self, dt: Duration) {
        let target = self.now + dt;
        while self.now < target {
            let mut next = target;
            if let Some(t) = self.stack.poll_timeout() {
                next = next.min(t.max(self.now + Duration::from_micros(1)));
            }
            if let Some(t) = self.iface.poll_at(self.now, &self.sockets) {
                next = next.min(t.max(self.now + Duration::from_micros(1)));
            }
            self.now = next;
            self.stack.handle_timeout(self.now);
            self.step();
        }
    }

    fn connect(&mut self, dst: SocketAddr, local_port: u16, buf: usize) -> SocketHandle {
        let mut s = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0; buf]),
            tcp::SocketBuffer::new(vec![0; buf]),
        );
        let remote = IpEndpoint::new(IpAddress::from(dst.ip()), dst.port());
        s.connect(self.iface.context(), remote, local_port).unwrap();
        self.sockets.add(s)
    }

    fn sock(&mut self, h: SocketHandle) -> &mut tcp::Socket<'static> {
        self.sockets.get_mut::<tcp::Socket<'static>>(h)
    }

    fn take_events(&mut self) -> Vec<Event> {
        std::mem::take(&mut self.events)
    }

    fn connects(&mut self) -> Vec<(FlowId, SocketAddr, SocketAddr)> {
        self.events
            .iter()
            .filter_map(|e| match e {
                Event::Connect { flow, dst, src } => Some((*flow, *dst, *src)),
                _ => None,
            })
            .collect()
    }
}

/// What a device does with a checksum left to it (virtio's `VIRTIO_NET_HDR_F_NEEDS_CSUM`):
/// the sum from `start` on, field included, folded and complemented, into the field.
fn complete_checksum(p: &mut [u8], partial: PartialChecksum) {
    let (start, at) = (usize::from(partial.start), usize::from(partial.start + partial.offset));
    let sum = !smoltcp::wire::checksum::data(&p[start..]);
    p[at..at + 2].copy_from_slice(&sum.to_be_bytes());
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len).map(|i| (i as u32).wrapping_mul(31).wrapping_add(u32::from(seed)) as u8).collect()
}

fn is_rst(p: &[u8]) -> bool {
    match etherparse::SlicedPacket::from_ip(p) {
        Ok(s) => matches!(s.transport, Some(etherparse::TransportSlice::Tcp(t)) if t.rst()),
        Err(_) => false,
    }
}

/// Move `a_to_b` from the client socket to the stack flow and `b_to_a` back, checking both.
fn exchange(net: &mut Net, h: SocketHandle, flow: FlowId, a_to_b: &[u8], b_to_a: &[u8]) {
    let (mut sent_a, mut sent_b) = (0, 0);
    let (mut got_b, mut got_a) = (Vec::new(), Vec::new());
    let mut buf = vec![0u8; 65536];
    for _ in 0..20_000 {
        if sent_a < a_to_b.len() && net.sock(h).can_send() {
            sent_a += net.sock(h).send_slice(&a_to_b[sent_a..]).unwrap();
        }
        if sent_b < b_to_a.len() {
            sent_b += net.stack.send(flow, &b_to_a[sent_b..]).unwrap();
        }
        loop {
            match net.stack.recv(flow, &mut buf) {
                Ok(0) => break,
                Ok(n) => got_b.extend_from_slice(&buf[..n]),
                Err(FlowError::Blocked) => break,
                Err(e) => panic!("recv: {e}"),
            }
        }
        while net.sock(h).can_recv() {
            let n = net.sock(h).recv_slice(&mut buf).unwrap();
            got_a.extend_from_slice(&buf[..n]);
        }
        if got_a.len() == b_to_a.len() && got_b.len() == a_to_b.len() {
            break;
        }
        net.advance(Duration::from_millis(1));
    }
    assert_eq!(got_b.len(), a_to_b.len(), "app → daemon bytes");
    assert!(got_b == a_to_b, "app → daemon content");
    assert_eq!(got_a.len(), b_to_a.len(), "daemon → app bytes");
    assert!(got_a == b_to_a, "daemon → app content");
}

// ---- TCP ------------------------------------------------------------------------------

fn accept_and_talk(dst: SocketAddr, config: Config) -> Net {
    let mut net = Net::new(config);
    let h = net.connect(dst, 40000, 256 << 10);
    net.step();
    let connects = net.connects();
    assert_eq!(connects.len(), 1, "one Connect: {:?}", net.events);
    let (flow, got_dst, src) = connects[0];
    assert_eq!(got_dst, dst);
    assert_eq!(src.port(), 40000);
    assert_eq!(net.stack.stats().pending, 1);
    net.take_events();

    // Held: the app's SYN is not answered, retransmissions are absorbed.
    net.advance(Duration::from_millis(3500));
    assert_eq!(net.sock(h).state(), tcp::State::SynSent);
    assert!(net.stack.stats().syn_absorbed >= 1, "{:?}", net.stack.stats());
    assert!(net.from_stack.is_empty(), "nothing sent to a pending app");
    assert!(net.connects().is_empty(), "no second Connect for a retransmitted SYN");

    // Accept: only now does the handshake complete.
    net.stack.accept_flow(flow).unwrap();
    assert_eq!(net.stack.accept_flow(flow), Err(FlowError::NotPending));
    net.step();
    assert_eq!(net.sock(h).state(), tcp::State::Established);
    assert!(net.events.contains(&Event::Established(flow)), "{:?}", net.events);
    let local = net.sock(h).remote_endpoint().unwrap();
    assert_eq!(local, IpEndpoint::new(IpAddress::from(dst.ip()), dst.port()));

    exchange(&mut net, h, flow, &pattern(1, 300_000), &pattern(2, 500_000));

    // The app closes: Finished, recv gives 0; the daemon closes: released.
    net.sock(h).close();
    net.advance(Duration::from_millis(5));
    assert!(net.events.contains(&Event::Finished(flow)), "{:?}", net.events);
    assert_eq!(net.stack.recv(flow, &mut [0u8; 16]), Ok(0));
    net.stack.close(flow).unwrap();
    net.advance(Duration::from_millis(5));
    assert!(net.events.contains(&Event::Closed(flow)), "{:?}", net.events);
    assert!(matches!(net.sock(h).state(), tcp::State::Closed | tcp::State::TimeWait));
    assert_eq!(net.stack.recv(flow, &mut [0u8; 16]), Err(FlowError::Unknown));
    assert_eq!(net.stack.stats().flows, 0);
    net
}

fn vip6(last: u16) -> IpAddr {
    IpAddr::V6(Ipv6Addr::new(0xfd71, 0x7132, 0, 0, 0, 0, 0, last))
}

#[test]
fn accept_completes_the_connect_and_data_flows_v4() {
    let net = accept_and_talk(SocketAddr::new(vip(5), 22), Config::default());
    assert!(net.from_stack.iter().all(|p| net.stack.partial_checksum(p).is_none()));
}

#[test]
fn accept_completes_the_connect_and_data_flows_v6() {
    accept_and_talk(SocketAddr::new(vip6(5), 80), Config::default());
}

/// The TCP segment of an IP packet: its addresses, where its checksum field is, its length.
fn tcp_of(p: &[u8]) -> Option<(IpAddress, IpAddress, usize, usize)> {
    let s = etherparse::SlicedPacket::from_ip(p).ok()?;
    let Some(etherparse::TransportSlice::Tcp(t)) = s.transport else { return None };
    let (src, dst, start): (IpAddr, IpAddr, usize) = match s.net? {
        etherparse::NetSlice::Ipv4(ip) => (
            ip.header().source_addr().into(),
            ip.header().destination_addr().into(),
            ip.header().slice().len(),
        ),
        etherparse::NetSlice::Ipv6(ip) => {
            (ip.header().source_addr().into(), ip.header().destination_addr().into(), 40)
        }
        _ => return None,
    };
    Some((src.into(), dst.into(), start + 16, t.slice().len()))
}

#[test]
fn with_checksum_offload_tcp_checksums_are_left_to_the_kernel_and_data_flows() {
    for dst in [SocketAddr::new(vip(5), 22), SocketAddr::new(vip6(5), 80)] {
        let config = Config { checksum_offload: true, ..Config::default() };
        // The harness's "kernel" drops any segment whose completed checksum is wrong, so
        // the data arriving proves the partial sums right.
        let net = accept_and_talk(dst, config);
        let mut segments = 0;
        for p in &net.from_stack {
            let (src, dst, at, len) = tcp_of(p).expect("only TCP in this exchange");
            let partial = net.stack.partial_checksum(p).expect("every TCP segment partial");
            assert_eq!(usize::from(partial.start + partial.offset), at);
            // The field holds the pseudo-header sum, not a checksum over the data.
            let pseudo = smoltcp::wire::checksum::pseudo_header(
                &src,
                &dst,
                smoltcp::wire::IpProtocol::Tcp,
                len as u32,
            );
            assert_eq!(u16::from_be_bytes([p[at], p[at + 1]]), pseudo, "{dst}");
            segments += 1;
        }
        assert!(segments > 100, "{segments} segments");
    }
}

/// The first segment the app's side sends after writing `data`, taken off the "TUN".
fn next_app_segment(net: &mut Net, h: SocketHandle, data: &[u8]) -> Vec<u8> {
    net.sock(h).send_slice(data).unwrap();
    net.iface.poll(net.now, &mut net.dev, &mut net.sockets);
    net.dev.tx.pop_front().expect("the app's segment")
}

/// An open flow from the app's port 40000 to vip 5, port 22.
fn open_flow(net: &mut Net) -> (SocketHandle, FlowId) {
    let h = net.connect(SocketAddr::new(vip(5), 22), 40000, 256 << 10);
    net.step();
    let (flow, _, _) = net.connects()[0];
    net.stack.accept_flow(flow).unwrap();
    net.step();
    assert_eq!(net.sock(h).state(), tcp::State::Established);
    (h, flow)
}

#[test]
fn a_segment_with_a_wrong_checksum_is_dropped_unless_the_kernel_vouches_for_it() {
    let mut net = Net::new(Config::default());
    let (h, flow) = open_flow(&mut net);
    let data = pattern(5, 1000);
    let mut p = next_app_segment(&mut net, h, &data);
    // What a TUN device with offload hands over: no checksum over the data yet.
    let (_, _, at, _) = tcp_of(&p).unwrap();
    p[at..at + 2].copy_from_slice(&[0, 0]);
    let before = net.stack.stats().malformed;
    net.stack.handle_packet(net.now, &p, RxChecksum::Unverified);
    net.step();
    assert_eq!(net.stack.stats().malformed, before + 1);
    assert_eq!(net.stack.recv(flow, &mut [0u8; 2000]), Err(FlowError::Blocked));
    net.stack.handle_packet(net.now, &p, RxChecksum::Trusted);
    net.step();
    assert_eq!(net.stack.stats().malformed, before + 1);
    let mut got = vec![0u8; 2000];
    let n = net.stack.recv(flow, &mut got).unwrap();
    assert_eq!(&got[..n], &data[..]);
    // A SYN the same: trusted, it is a connect; unverified, it is dropped.
    let mut syn = syn_packet(40001, 22, 5);
    let (_, _, at, _) = tcp_of(&syn).unwrap();
    syn[at..at + 2].copy_from_slice(&[0, 0]);
    net.take_events();
    net.stack.handle_packet(net.now, &syn, RxChecksum::Unverified);
    assert_eq!(net.stack.stats().malformed, before + 2);
    assert!(net.connects().is_empty());
    net.stack.handle_packet(net.now, &syn, RxChecksum::Trusted);
    net.step();
    assert_eq!(net.connects().len(), 1, "{:?}", net.events);
}

/// One segment made of `segments` (consecutive, IPv4, of one flow), as the kernel hands over
/// a TSO packet: the first one's headers, all the payloads, the IP length of the whole.
fn coalesce(segments: &[Vec<u8>]) -> Vec<u8> {
    let headers = |p: &[u8]| {
        usize::from(p[0] & 0x0f) * 4 + usize::from(p[usize::from(p[0] & 0x0f) * 4 + 12] >> 4) * 4
    };
    let mut out = segments[0].clone();
    for s in &segments[1..] {
        out.extend_from_slice(&s[headers(s)..]);
    }
    let mut ip = smoltcp::wire::Ipv4Packet::new_unchecked(&mut out[..]);
    ip.set_total_len(u16::try_from(ip.as_ref().len()).unwrap());
    ip.fill_checksum();
    out
}

#[test]
fn a_segment_larger_than_the_mss_is_taken_whole() {
    // With TSO offload the kernel hands over what it would have cut into MSS-sized
    // segments as one packet (up to 64 KiB): the stack takes it whole.
    let mut net = Net::new(Config { checksum_offload: true, ..Config::default() });
    let (h, flow) = open_flow(&mut net);
    let data = pattern(6, 5 * 1360);
    // No congestion window (smoltcp's CUBIC starts at 2 KiB): the segments go at once.
    net.sock(h).set_congestion_control(tcp::CongestionControl::None);
    net.sock(h).send_slice(&data).unwrap();
    let mut segments = Vec::new();
    for _ in 0..20 {
        net.iface.poll(net.now, &mut net.dev, &mut net.sockets);
        segments.extend(net.dev.tx.drain(..));
    }
    assert!(segments.len() >= 5, "{} segments", segments.len());
    let whole = coalesce(&segments);
    assert!(whole.len() > 5 * 1360, "{} bytes", whole.len());
    net.stack.handle_packet(net.now, &whole, RxChecksum::Trusted);
    net.step();
    let mut got = vec![0u8; 2 * data.len()];
    let n = net.stack.recv(flow, &mut got).unwrap();
    assert_eq!(&got[..n], &data[..]);
    assert_eq!(net.stack.stats().malformed, 0);
    assert_eq!(net.sock(h).send_queue(), 0, "all of it acknowledged");
}

#[test]
fn mss_is_clamped_to_the_mtu() {
    let config = Config { mtu: 1280, ..Config::default() };
    let mut net = Net::new(config);
    let h = net.connect(SocketAddr::new(vip(5), 22), 40000, 256 << 10);
    net.step();
    let (flow, _, _) = net.connects()[0];
    net.stack.accept_flow(flow).unwrap();
    net.step();
    let data = pattern(9, 100_000);
    assert_eq!(net.stack.send(flow, &data).unwrap(), data.len());
    net.from_stack.clear();
    net.advance(Duration::from_millis(20));
    let biggest = net.from_stack.iter().map(Vec::len).max().unwrap();
    assert!(biggest <= 1280, "packet of {biggest} bytes over a 1280 MTU");
    assert!(biggest >= 1200, "segments are full-sized: {biggest}");
    let mut got = vec![0u8; data.len()];
    let n = net.sock(h).recv_slice(&mut got).unwrap();
    assert_eq!(&got[..n], &data[..n]);
}

/// The MSS and window-scale options of the stack's SYN-ACK.
fn synack_options(packets: &[Vec<u8>]) -> (Option<u16>, Option<u8>) {
    use etherparse::TcpOptionElement::{MaximumSegmentSize, WindowScale};
    for p in packets {
        let Ok(s) = etherparse::SlicedPacket::from_ip(p) else { continue };
        let Some(etherparse::TransportSlice::Tcp(t)) = s.transport else { continue };
        if t.syn() && t.ack() {
            let (mut mss, mut ws) = (None, None);
            for o in t.options_iterator().flatten() {
                match o {
                    MaximumSegmentSize(m) => mss = Some(m),
                    WindowScale(w) => ws = Some(w),
                    _ => {}
                }
            }
            return (mss, ws);
        }
    }
    panic!("no SYN-ACK");
}

#[test]
fn synack_clamps_mss_and_scales_the_window() {
    for (mtu, v6, want) in [(1400, false, 1360), (1400, true, 1340), (9000, false, 8960)] {
        let mut net = Net::new(Config { mtu, ..Config::default() });
        let dst = if v6 {
            SocketAddr::new(IpAddr::V6(Ipv6Addr::new(0xfd71, 0x7132, 0, 0, 0, 0, 0, 5)), 22)
        } else {
            SocketAddr::new(vip(5), 22)
        };
        net.connect(dst, 40000, 4096);
        net.step();
        let (flow, _, _) = net.connects()[0];
        net.stack.accept_flow(flow).unwrap();
        net.step();
        let (mss, ws) = synack_options(&net.from_stack);
        assert_eq!(mss, Some(want), "MSS at MTU {mtu}");
        // 256 KiB receive buffer: a shift of at least 2 to offer it.
        assert!(ws.is_some_and(|w| w >= 2), "window scale {ws:?}");
    }
}

#[test]
fn a_packet_read_into_a_stack_buffer_reaches_smoltcp_in_it_and_the_buffer_comes_back() {
    let mut net = Net::new(Config::default());
    let dst = SocketAddr::new(vip(5), 22);
    let h = net.connect(dst, 40000, 1 << 20);
    net.step();
    let (flow, _, _) = net.connects()[0];
    net.stack.accept_flow(flow).unwrap();
    net.step();
    assert_eq!(net.sock(h).state(), tcp::State::Established);
    let data: Vec<u8> = (0..1300u32).map(|i| (i % 251) as u8).collect();
    net.sock(h).send_slice(&data).unwrap();
    net.iface.poll(net.now, &mut net.dev, &mut net.sockets);
    let p = net.dev.tx.pop_front().expect("the app's segment");
    let mut buf = net.stack.read_buffer(READ_LEN);
    assert_eq!(buf.len(), READ_LEN);
    let at = buf.as_ptr();
    buf[..p.len()].copy_from_slice(&p);
    buf.truncate(p.len());
    net.stack.handle_packet_buf(net.now, buf, RxChecksum::Unverified);
    net.step();
    let mut got = vec![0u8; 2 * data.len()];
    let n = net.stack.recv(flow, &mut got).unwrap();
    assert_eq!(&got[..n], &data[..]);
    // smoltcp consumed the packet in the buffer it was read into: that buffer is the next
    // read's, so no packet was copied on the way.
    let next = net.stack.read_buffer(READ_LEN);
    assert_eq!(next.as_ptr(), at);
    assert_eq!(next.len(), READ_LEN);
    // A packet the stack does not take (not to the pool's addresses) gives its buffer back.
    let mut stray = next;
    let other = udp_packet(
        SocketAddr::new(IpAddr::V4(APP_V4), 5000),
        SocketAddr::new(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)), 53),
        b"x",
    );
    stray[..other.len()].copy_from_slice(&other);
    stray.truncate(other.len());
    let before = net.stack.stats().not_in_pool;
    net.stack.handle_packet_buf(net.now, stray, RxChecksum::Unverified);
    assert_eq!(net.stack.stats().not_in_pool, before + 1);
    let returned = net.stack.read_buffer(READ_LEN);
    assert_eq!(returned.as_ptr(), at);
}

#[test]
fn events_drive_a_bulk_transfer_with_backpressure() {
    const LEN: usize = 8 << 20;
    let mut net = Net::new(Config::default());
    let h = net.connect(SocketAddr::new(vip(5), 22), 40040, 256 << 10);
    net.step();
    let (flow, _, _) = net.connects()[0];
    net.stack.accept_flow(flow).unwrap();
    net.step();
    let down = pattern(3, LEN);
    let up = pattern(4, LEN);
    let (mut sent_down, mut sent_up) = (0, 0);
    let (mut got_down, mut got_up) = (Vec::new(), Vec::new());
    let (mut can_write, mut can_read) = (true, true);
    let (mut writables, mut readables) = (0, 0);
    let mut buf = vec![0u8; 128 << 10];
    for _ in 0..100_000 {
        for e in net.take_events() {
            match e {
                Event::Writable(f) if f == flow => (can_write, writables) = (true, writables + 1),
                Event::Readable(f) if f == flow => (can_read, readables) = (true, readables + 1),
                _ => {}
            }
        }
        // The daemon writes only after Writable, reads only after Readable.
        while can_write && sent_down < LEN {
            let n = net.stack.send(flow, &down[sent_down..]).unwrap();
            sent_down += n;
            if n == 0 || sent_down < LEN && net.stack.send_space(flow).unwrap() == 0 {
                can_write = net.stack.send_space(flow).unwrap() > 0;
            }
        }
        while can_read {
            // Both ways out: into our buffer, and straight from the stack's (at most 3000
            // bytes a call), turn about.
            let r = if got_up.len().is_multiple_of(2) {
                net.stack.recv(flow, &mut buf).inspect(|&n| got_up.extend_from_slice(&buf[..n]))
            } else {
                let r = net.stack.recv_with(flow, 3000, &mut |d| got_up.extend_from_slice(d));
                assert!(r.is_err() || r.is_ok_and(|n| n <= 3000));
                r
            };
            match r {
                Ok(n) if n > 0 => {}
                Err(FlowError::Blocked) => can_read = false,
                other => panic!("recv: {other:?}"),
            }
        }
        // The app: sends what fits, reads what came.
        if sent_up < LEN && net.sock(h).can_send() {
            sent_up += net.sock(h).send_slice(&up[sent_up..]).unwrap();
        }
        while net.sock(h).can_recv() {
            let n = net.sock(h).recv_slice(&mut buf).unwrap();
            got_down.extend_from_slice(&buf[..n]);
        }
        if got_down.len() == LEN && got_up.len() == LEN {
            break;
        }
        net.advance(Duration::from_micros(200));
    }
    assert_eq!((got_down.len(), got_up.len()), (LEN, LEN));
    assert!(got_down == down && got_up == up, "content");
    assert!(writables > 0, "the send buffer filled and Writable said when it drained");
    assert!(readables > 0, "Readable followed Blocked");
}

#[test]
fn refuse_answers_rst_and_the_connect_fails() {
    let mut net = Net::new(Config::default());
    let h = net.connect(SocketAddr::new(vip(5), 22), 40001, 4096);
    net.step();
    let (flow, _, _) = net.connects()[0];
    net.stack.refuse_flow(flow).unwrap();
    net.step();
    assert_eq!(net.sock(h).state(), tcp::State::Closed, "the app sees the refusal");
    assert_eq!(net.from_stack.len(), 1);
    assert!(is_rst(&net.from_stack[0]));
    assert!(net.events.contains(&Event::Closed(flow)));
    assert_eq!(net.stack.refuse_flow(flow), Err(FlowError::Unknown));
    let s = net.stack.stats();
    assert_eq!((s.refused, s.pending, s.flows), (1, 0, 0));
}

#[test]
fn no_decision_is_refused_after_the_timeout() {
    let config = Config { connect_timeout: Duration::from_secs(10), ..Config::default() };
    let mut net = Net::new(config);
    let start = net.now;
    let h = net.connect(SocketAddr::new(vip(6), 443), 40002, 4096);
    net.step();
    let (flow, _, _) = net.connects()[0];
    net.advance(Duration::from_millis(9900));
    assert_eq!(net.sock(h).state(), tcp::State::SynSent, "still waiting before the timeout");
    net.advance(Duration::from_millis(200));
    assert_eq!(net.sock(h).state(), tcp::State::Closed, "refused at the timeout");
    assert!(net.now - start <= Duration::from_millis(10_100));
    assert!(net.events.contains(&Event::Closed(flow)));
    assert_eq!(net.stack.stats().connect_timeouts, 1);
    assert_eq!(net.stack.accept_flow(flow), Err(FlowError::Unknown));
    assert!(net.stack.poll_timeout().is_none(), "nothing left to do");
}

#[test]
fn an_app_giving_up_while_pending_ends_the_flow() {
    let mut net = Net::new(Config::default());
    let h = net.connect(SocketAddr::new(vip(5), 22), 40003, 4096);
    net.step();
    let (flow, _, _) = net.connects()[0];
    net.sock(h).abort();
    net.step();
    assert!(net.events.contains(&Event::Closed(flow)), "{:?}", net.events);
    assert_eq!(net.stack.stats().pending, 0);
    assert_eq!(net.stack.accept_flow(flow), Err(FlowError::Unknown));
}

#[test]
fn the_daemon_aborts_and_the_app_resets() {
    let mut net = Net::new(Config::default());
    let h1 = net.connect(SocketAddr::new(vip(5), 22), 40004, 4096);
    let h2 = net.connect(SocketAddr::new(vip(5), 22), 40005, 4096);
    net.step();
    let flows: Vec<FlowId> = net.connects().iter().map(|c| c.0).collect();
    assert_eq!(flows.len(), 2, "two flows to one endpoint");
    for f in &flows {
        net.stack.accept_flow(*f).unwrap();
    }
    net.step();
    assert_eq!(net.sock(h1).state(), tcp::State::Established);
    assert_eq!(net.sock(h2).state(), tcp::State::Established);
    // The daemon aborts the first (peer refused late): the app sees a reset.
    net.stack.abort(flows[0]).unwrap();
    net.step();
    assert_eq!(net.sock(h1).state(), tcp::State::Closed);
    assert!(net.events.contains(&Event::Closed(flows[0])));
    // The app resets the second: Reset, then released by the daemon.
    net.sock(h2).abort();
    net.step();
    assert!(net.events.contains(&Event::Reset(flows[1])), "{:?}", net.events);
    assert_eq!(net.stack.send(flows[1], b"x"), Err(FlowError::Reset));
    // The app connects again from the same port before the daemon released the old flow:
    // a new flow, and releasing the old one leaves it alone.
    net.take_events();
    let h3 = net.connect(SocketAddr::new(vip(5), 22), 40005, 4096);
    net.step();
    let again = net.connects();
    assert_eq!(again.len(), 1, "{:?}", net.events);
    assert_ne!(again[0].0, flows[1]);
    net.stack.abort(flows[1]).unwrap();
    net.step();
    assert!(net.events.contains(&Event::Closed(flows[1])));
    net.stack.accept_flow(again[0].0).unwrap();
    net.step();
    assert_eq!(net.sock(h3).state(), tcp::State::Established);
    exchange(&mut net, h3, again[0].0, b"second try", b"welcome back");
    assert_eq!(net.stack.stats().flows, 1);
}

#[test]
fn daemon_closes_first_and_late_data_is_kept() {
    let mut net = Net::new(Config::default());
    let h = net.connect(SocketAddr::new(vip(5), 22), 40030, 64 << 10);
    net.step();
    let (flow, _, _) = net.connects()[0];
    net.stack.accept_flow(flow).unwrap();
    net.step();
    // The daemon (the peer finished) sends its last bytes and closes first.
    assert_eq!(net.stack.send(flow, b"bye").unwrap(), 3);
    net.stack.close(flow).unwrap();
    net.advance(Duration::from_millis(5));
    let mut buf = [0u8; 64];
    let n = net.sock(h).recv_slice(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"bye");
    assert!(!net.sock(h).may_recv(), "FIN arrived");
    // The app answers after that and closes: its data waits for the daemon to read it.
    net.sock(h).send_slice(b"late words").unwrap();
    net.sock(h).close();
    net.advance(Duration::from_millis(5));
    assert!(!net.events.contains(&Event::Closed(flow)), "not released before read");
    assert_eq!(net.stack.recv(flow, &mut buf), Ok(10));
    assert_eq!(&buf[..10], b"late words");
    net.step();
    assert!(net.events.contains(&Event::Closed(flow)), "{:?}", net.events);
    assert_eq!(net.stack.stats().flows, 0);
    // Idle: nothing due at once (no spinning driver).
    net.advance(Duration::from_millis(100));
    assert!(net.stack.poll_timeout().is_none_or(|t| t > net.now), "{:?}", net.stack.poll_timeout());
}

/// The window-scale option of every SYN-ACK the stack sent.
fn synack_scales(packets: &[Vec<u8>]) -> Vec<u8> {
    let mut out = Vec::new();
    for p in packets {
        let Ok(s) = etherparse::SlicedPacket::from_ip(p) else { continue };
        let Some(etherparse::TransportSlice::Tcp(t)) = s.transport else { continue };
        if t.syn() && t.ack() {
            for o in t.options_iterator().flatten() {
                if let etherparse::TcpOptionElement::WindowScale(w) = o {
                    out.push(w);
                }
            }
        }
    }
    out
}

#[test]
fn hundred_concurrent_flows() {
    // A budget for 4 flows at the big buffers (1 + 1 MiB here, so the receive window shows
    // which size a flow got); the others get 256 + 256 KiB.
    let budget = q2q_netstack::budget::Budget::new(8 << 20);
    let config = Config { buffer_budget: budget.clone(), rx_buffer: 1 << 20, ..Config::default() };
    let mut net = Net::new(config);
    let mut clients = Vec::new();
    for i in 0..100u16 {
        let dst = SocketAddr::new(vip(10 + (i % 7) as u8), [22, 80, 443][usize::from(i % 3)]);
        clients.push((net.connect(dst, 41000 + i, 16 << 10), dst));
    }
    net.step();
    let connects = net.connects();
    assert_eq!(connects.len(), 100);
    net.take_events();
    let mut flow_of = std::collections::HashMap::new();
    for (flow, dst, src) in &connects {
        flow_of.insert(src.port(), (*flow, *dst));
        net.stack.accept_flow(*flow).unwrap();
    }
    net.step();
    assert_eq!(budget.big_leases(), 4);
    assert_eq!(budget.leased(), 4 * (2 << 20) + 96 * (512 << 10));
    // The window each flow offers follows its buffer: shift 5 for 1 MiB, 3 for 256 KiB.
    let mut scales = synack_scales(&net.from_stack);
    scales.sort_unstable();
    assert_eq!(scales, [vec![3; 96], vec![5; 4]].concat());
    for (i, (h, dst)) in clients.iter().enumerate() {
        assert_eq!(net.sock(*h).state(), tcp::State::Established, "flow {i}");
        assert_eq!(flow_of[&(41000 + i as u16)].1, *dst);
        let msg = format!("hello from {i}");
        net.sock(*h).send_slice(msg.as_bytes()).unwrap();
    }
    net.advance(Duration::from_millis(5));
    // Echo each greeting back, upper-cased, from the flow it arrived on.
    let mut buf = [0u8; 64];
    for i in 0..100u16 {
        let (flow, _) = flow_of[&(41000 + i)];
        let n = net.stack.recv(flow, &mut buf).unwrap();
        assert_eq!(&buf[..n], format!("hello from {i}").as_bytes());
        let reply = buf[..n].to_ascii_uppercase();
        assert_eq!(net.stack.send(flow, &reply).unwrap(), n);
        net.stack.close(flow).unwrap();
    }
    net.advance(Duration::from_millis(5));
    for (i, (h, _)) in clients.iter().enumerate() {
        let n = net.sock(*h).recv_slice(&mut buf).unwrap();
        assert_eq!(&buf[..n], format!("HELLO FROM {i}").as_bytes());
        assert!(!net.sock(*h).may_recv(), "FIN arrived");
        net.sock(*h).close();
    }
    net.advance(Duration::from_millis(5));
    let closed = net.events.iter().filter(|e| matches!(e, Event::Closed(_))).count();
    assert_eq!(closed, 100);
    assert_eq!(net.stack.stats().flows, 0);
    // Every flow's bytes went back to the budget.
    assert_eq!((budget.leased(), budget.big_leases()), (0, 0));
}

#[test]
fn outside_the_pool_is_dropped_and_counted() {
    let mut net = Net::new(Config::default());
    let h = net.connect(SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)), 22), 40010, 4096);
    net.step();
    assert!(net.events.is_empty());
    assert!(net.from_stack.is_empty());
    assert_eq!(net.sock(h).state(), tcp::State::SynSent);
    assert_eq!(net.stack.stats().not_in_pool, 1);
}

#[test]
fn pending_overflow_is_refused_at_once() {
    let config = Config { max_pending: 2, ..Config::default() };
    let mut net = Net::new(config);
    let hs: Vec<_> =
        (0..3).map(|i| net.connect(SocketAddr::new(vip(5), 22), 40020 + i, 4096)).collect();
    net.step();
    assert_eq!(net.connects().len(), 2);
    assert_eq!(net.sock(hs[2]).state(), tcp::State::Closed);
    assert_eq!(net.stack.stats().overflow_refused, 1);
}

// ---- UDP and ICMP ---------------------------------------------------------------------

#[test]
fn udp_round_trip() {
    let mut net = Net::new(Config::default());
    let mut s = udp::Socket::new(
        udp::PacketBuffer::new(vec![udp::PacketMetadata::EMPTY; 4], vec![0; 4096]),
        udp::PacketBuffer::new(vec![udp::PacketMetadata::EMPTY; 4], vec![0; 4096]),
    );
    s.bind(5000).unwrap();
    let h = net.sockets.add(s);
    let dst = SocketAddr::new(vip(7), 53);
    let remote = IpEndpoint::new(IpAddress::from(dst.ip()), 53);
    net.sockets.get_mut::<udp::Socket<'_>>(h).send_slice(b"query", remote).unwrap();
    net.step();
    let (src, payload) = match net.take_events().as_slice() {
        [Event::Datagram { src, dst: d, payload, .. }] if *d == dst => (*src, payload.clone()),
        other => panic!("expected one datagram, got {other:?}"),
    };
    assert_eq!(src, SocketAddr::new(IpAddr::V4(APP_V4), 5000));
    assert_eq!(payload, b"query");
    net.stack.send_datagram(dst, src, b"answer").unwrap();
    net.step();
    let mut buf = [0u8; 64];
    let (n, meta) = net.sockets.get_mut::<udp::Socket<'_>>(h).recv_slice(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"answer");
    assert_eq!(meta.endpoint, remote);
    // Not from a virtual address, or too big: refused.
    let outside = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)), 53);
    assert!(net.stack.send_datagram(outside, src, b"x").is_err());
    assert!(net.stack.send_datagram(dst, src, &[0u8; 1400]).is_err());
}

#[test]
fn datagram_events_are_bounded() {
    let config = Config { max_queued_datagrams: 2, ..Config::default() };
    let mut stack = Stack::new(config, Instant::from_secs(1));
    let now = Instant::from_secs(2);
    for _ in 0..3 {
        let mut p = Vec::new();
        etherparse::PacketBuilder::ipv4(APP_V4.octets(), [100, 64, 0, 5], 64)
            .udp(5000, 53)
            .write(&mut p, b"x")
            .unwrap();
        stack.handle_packet(now, &p, RxChecksum::Unverified);
    }
    assert_eq!(stack.stats().datagrams_dropped, 1);
    assert!(matches!(stack.poll_event(), Some(Event::Datagram { .. })));
    assert!(matches!(stack.poll_event(), Some(Event::Datagram { .. })));
    assert!(stack.poll_event().is_none());
}

fn udp_packet(src: SocketAddr, dst: SocketAddr, payload: &[u8]) -> Vec<u8> {
    let b = match (src.ip(), dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            etherparse::PacketBuilder::ipv4(s.octets(), d.octets(), 61)
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            etherparse::PacketBuilder::ipv6(s.octets(), d.octets(), 61)
        }
        _ => unreachable!(),
    };
    let mut out = Vec::new();
    b.udp(src.port(), dst.port()).write(&mut out, payload).unwrap();
    out
}

/// What a port unreachable error says, parsed back with etherparse, its checksums checked
/// with smoltcp: (source, destination, the quoted bytes).
fn parse_port_unreachable(p: &[u8]) -> (IpAddr, IpAddr, Vec<u8>) {
    use etherparse::{Icmpv4Type, Icmpv6Type, NetSlice, SlicedPacket, TransportSlice};
    let sliced = SlicedPacket::from_ip(p).expect("the error parses");
    let (src, dst) = match &sliced.net {
        Some(NetSlice::Ipv4(ip)) => {
            let h = smoltcp::wire::Ipv4Packet::new_checked(p).unwrap();
            assert!(h.verify_checksum(), "IPv4 header checksum");
            (IpAddr::V4(ip.header().source_addr()), IpAddr::V4(ip.header().destination_addr()))
        }
        Some(NetSlice::Ipv6(ip)) => {
            (IpAddr::V6(ip.header().source_addr()), IpAddr::V6(ip.header().destination_addr()))
        }
        other => panic!("not IP: {other:?}"),
    };
    let quoted = match sliced.transport {
        Some(TransportSlice::Icmpv4(i)) => {
            assert_eq!(
                i.icmp_type(),
                Icmpv4Type::DestinationUnreachable(etherparse::icmpv4::DestUnreachableHeader::Port)
            );
            assert_eq!((i.type_u8(), i.code_u8()), (3, 3));
            let icmp = smoltcp::wire::Icmpv4Packet::new_checked(i.slice()).unwrap();
            assert!(icmp.verify_checksum(), "ICMPv4 checksum");
            i.payload().to_vec()
        }
        Some(TransportSlice::Icmpv6(i)) => {
            assert_eq!(
                i.icmp_type(),
                Icmpv6Type::DestinationUnreachable(etherparse::icmpv6::DestUnreachableCode::Port)
            );
            assert_eq!((i.type_u8(), i.code_u8()), (1, 4));
            let (IpAddr::V6(s), IpAddr::V6(d)) = (src, dst) else { unreachable!() };
            let icmp = smoltcp::wire::Icmpv6Packet::new_checked(i.slice()).unwrap();
            assert!(icmp.verify_checksum(&s, &d), "ICMPv6 checksum");
            i.payload().to_vec()
        }
        other => panic!("not ICMP: {other:?}"),
    };
    (src, dst, quoted)
}

#[test]
fn port_unreachable_quotes_the_datagram_v4_and_v6() {
    let v6 = |last| IpAddr::V6(Ipv6Addr::new(0xfd71, 0x7132, 0, 0, 0, 0, 0, last));
    // (app, virtual address, payload size, bytes the error may quote at most)
    let cases = [
        (IpAddr::V4(APP_V4), vip(2), 13, 576 - 28),
        (IpAddr::V4(APP_V4), vip(2), 1200, 576 - 28),
        (IpAddr::V6(APP_V6), v6(2), 13, 1280 - 48),
        (IpAddr::V6(APP_V6), v6(2), 1300, 1280 - 48),
    ];
    for (app, vip, size, max) in cases {
        let config = Config { mtu: 1500, ..Config::default() };
        let mut stack = Stack::new(config, Instant::from_secs(1));
        let now = Instant::from_secs(2);
        let (src, dst) = (SocketAddr::new(app, 40000), SocketAddr::new(vip, 5353));
        let sent = udp_packet(src, dst, &pattern(size as u8, size));
        stack.handle_packet(now, &sent, RxChecksum::Unverified);
        let quote = match stack.poll_event() {
            Some(Event::Datagram { src: s, dst: d, quote, .. }) if (s, d) == (src, dst) => quote,
            other => panic!("expected the datagram, got {other:?}"),
        };
        let want = &sent[..sent.len().min(max)];
        assert_eq!(quote.as_bytes(), want);
        stack.port_unreachable(&quote).unwrap();
        let error = stack.poll_transmit(now).expect("the error is sent");
        assert_eq!(stack.poll_transmit(now), None, "one error per call");
        let (from, to, quoted) = parse_port_unreachable(&error);
        assert_eq!((from, to), (vip, app), "from the virtual address the app sent to");
        assert_eq!(quoted, want, "the datagram as sent, cut to what an error carries");
        // RFC 792: the IP header and 8 bytes at least (the UDP header, so the kernel finds
        // the socket); RFC 1812 / RFC 4443: the error fits 576 / 1280 bytes.
        assert!(quoted.len() >= if app.is_ipv4() { 28 } else { 48 });
        assert!(error.len() <= if app.is_ipv4() { 576 } else { 1280 });
        if size > 1000 {
            assert_eq!(error.len(), if app.is_ipv4() { 576 } else { 1280 });
        }
    }
}

#[test]
fn port_unreachable_is_bounded_by_the_transmit_queue() {
    let config = Config { max_queued_packets: 2, ..Config::default() };
    let mut stack = Stack::new(config, Instant::from_secs(1));
    let now = Instant::from_secs(2);
    let (src, dst) = (SocketAddr::new(IpAddr::V4(APP_V4), 40000), SocketAddr::new(vip(3), 9));
    stack.handle_packet(now, &udp_packet(src, dst, b"x"), RxChecksum::Unverified);
    let Some(Event::Datagram { quote, .. }) = stack.poll_event() else { panic!("no datagram") };
    stack.port_unreachable(&quote).unwrap();
    stack.port_unreachable(&quote).unwrap();
    assert_eq!(stack.port_unreachable(&quote), Err(q2q_netstack::tun::SendError::QueueFull));
    assert_eq!(std::iter::from_fn(|| stack.poll_transmit(now)).count(), 2);
}

#[test]
fn the_kernel_side_sees_the_error() {
    // The "kernel" (smoltcp) sends a datagram to a port nobody offers; the daemon refuses
    // it and the error that comes back names the kernel's own datagram.
    let mut net = Net::new(Config::default());
    let mut s = udp::Socket::new(
        udp::PacketBuffer::new(vec![udp::PacketMetadata::EMPTY; 4], vec![0; 4096]),
        udp::PacketBuffer::new(vec![udp::PacketMetadata::EMPTY; 4], vec![0; 4096]),
    );
    s.bind(5001).unwrap();
    let h = net.sockets.add(s);
    let dst = SocketAddr::new(vip(7), 5353);
    let remote = IpEndpoint::new(IpAddress::from(dst.ip()), 5353);
    net.sockets.get_mut::<udp::Socket<'_>>(h).send_slice(b"anyone?", remote).unwrap();
    net.step();
    let quote = match net.take_events().as_slice() {
        [Event::Datagram { quote, .. }] => quote.clone(),
        other => panic!("expected one datagram, got {other:?}"),
    };
    let before = net.from_stack.len();
    net.stack.port_unreachable(&quote).unwrap();
    net.step();
    let sent: Vec<_> = net.from_stack[before..].to_vec();
    assert_eq!(sent.len(), 1);
    let (from, to, quoted) = parse_port_unreachable(&sent[0]);
    assert_eq!((from, to), (dst.ip(), IpAddr::V4(APP_V4)));
    let sliced = etherparse::SlicedPacket::from_ip(&quoted).expect("the quote is the datagram");
    let Some(etherparse::TransportSlice::Udp(u)) = sliced.transport else { panic!("not UDP") };
    assert_eq!((u.source_port(), u.destination_port(), u.payload()), (5001, 5353, &b"anyone?"[..]));
}

fn echo_request(src: IpAddr, dst: IpAddr, ident: u16, seq: u16, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            etherparse::PacketBuilder::ipv4(s.octets(), d.octets(), 64)
                .icmpv4_echo_request(ident, seq)
                .write(&mut out, payload)
                .unwrap()
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            etherparse::PacketBuilder::ipv6(s.octets(), d.octets(), 64)
                .icmpv6_echo_request(ident, seq)
                .write(&mut out, payload)
                .unwrap()
        }
        _ => unreachable!(),
    }
    out
}

#[test]
fn echo_request_event_and_answer() {
    for (app, dst) in [
        (IpAddr::V4(APP_V4), vip(9)),
        (IpAddr::V6(APP_V6), IpAddr::V6(Ipv6Addr::new(0xfd71, 0x7132, 0, 0, 0, 0, 0, 9))),
    ] {
        let mut stack = Stack::new(Config::default(), Instant::from_secs(1));
        let now = Instant::from_secs(2);
        stack.handle_packet(
            now,
            &echo_request(app, dst, 0x1234, 7, b"ping data"),
            RxChecksum::Unverified,
        );
        let echo = match stack.poll_event() {
            Some(Event::EchoRequest(e)) => e,
            other => panic!("expected an echo request, got {other:?}"),
        };
        assert_eq!((echo.src, echo.dst, echo.ident, echo.seq_no), (app, dst, 0x1234, 7));
        assert_eq!(stack.poll_transmit(now), None, "not answered before the daemon says so");
        stack.answer_echo(&echo).unwrap();
        let reply = stack.poll_transmit(now).unwrap();
        // Checked by smoltcp's parser, checksums included.
        match (app, dst) {
            (IpAddr::V4(a), IpAddr::V4(d)) => {
                use smoltcp::wire::{Icmpv4Packet, Icmpv4Repr, Ipv4Packet};
                let ip = Ipv4Packet::new_checked(&reply[..]).unwrap();
                assert!(ip.verify_checksum());
                assert_eq!((ip.src_addr(), ip.dst_addr()), (d, a));
                let icmp = Icmpv4Packet::new_checked(ip.payload()).unwrap();
                let repr = Icmpv4Repr::parse(&icmp, &Default::default()).unwrap();
                assert_eq!(
                    repr,
                    Icmpv4Repr::EchoReply { ident: 0x1234, seq_no: 7, data: b"ping data" }
                );
            }
            (IpAddr::V6(a), IpAddr::V6(d)) => {
                use smoltcp::wire::{Icmpv6Packet, Icmpv6Repr, Ipv6Packet};
                let ip = Ipv6Packet::new_checked(&reply[..]).unwrap();
                assert_eq!((ip.src_addr(), ip.dst_addr()), (d, a));
                let icmp = Icmpv6Packet::new_checked(ip.payload()).unwrap();
                let repr = Icmpv6Repr::parse(&d, &a, &icmp, &Default::default()).unwrap();
                assert_eq!(
                    repr,
                    Icmpv6Repr::EchoReply { ident: 0x1234, seq_no: 7, data: b"ping data" }
                );
            }
            _ => unreachable!(),
        }
        // A ping outside the pool is not ours.
        let outside: IpAddr = if app.is_ipv4() {
            "192.0.2.99".parse().unwrap()
        } else {
            "2001:db8::1".parse().unwrap()
        };
        stack.handle_packet(now, &echo_request(app, outside, 1, 1, b""), RxChecksum::Unverified);
        assert!(stack.poll_event().is_none());
        assert_eq!(stack.stats().not_in_pool, 1);
    }
}

// ---- garbage --------------------------------------------------------------------------

fn syn_packet(sport: u16, dport: u16, last: u8) -> Vec<u8> {
    let mut out = Vec::new();
    etherparse::PacketBuilder::ipv4(APP_V4.octets(), [100, 64, 0, last], 64)
        .tcp(sport, dport, 1000, 65535)
        .syn()
        .write(&mut out, &[])
        .unwrap();
    out
}

fn drain(stack: &mut Stack, now: Instant, decide: u8) {
    while stack.poll_transmit(now).is_some() {}
    while let Some(e) = stack.poll_event() {
        if let Event::Connect { flow, .. } = e {
            let _ = match decide % 3 {
                0 => stack.accept_flow(flow),
                1 => stack.refuse_flow(flow),
                _ => Ok(()),
            };
        }
    }
    while stack.poll_transmit(now).is_some() {}
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn random_bytes_never_panic(packets in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..200), 1..20)) {
        // Odd counts run with checksum offload; even-length packets come trusted (unchecked).
        let config = Config { checksum_offload: packets.len() % 2 == 1, ..Config::default() };
        let mut stack = Stack::new(config, Instant::from_secs(1));
        let now = Instant::from_secs(2);
        for p in &packets {
            stack.handle_packet(now, p, trust(p.len() % 2 == 0));
            drain(&mut stack, now, p.len() as u8);
        }
        stack.handle_timeout(Instant::from_secs(100));
        drain(&mut stack, Instant::from_secs(100), 0);
        let s = stack.stats();
        prop_assert_eq!(s.packets_in, packets.len() as u64);
    }

    #[test]
    fn mutated_packets_never_panic(
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..8),
        kind in 0u8..4,
        decide in any::<u8>(),
        truncate in any::<prop::sample::Index>(),
    ) {
        let mut p = match kind {
            0 => syn_packet(40000, 22, 5),
            1 => echo_request(IpAddr::V4(APP_V4), vip(5), 1, 2, b"abc"),
            2 => echo_request(IpAddr::V6(APP_V6), "fd71:7132::5".parse().unwrap(), 1, 2, b"abc"),
            _ => {
                let mut out = Vec::new();
                etherparse::PacketBuilder::ipv4(APP_V4.octets(), [100, 64, 0, 5], 64)
                    .udp(5000, 53)
                    .write(&mut out, b"payload")
                    .unwrap();
                out
            }
        };
        for (i, b) in &edits {
            let at = i.index(p.len());
            p[at] = *b;
        }
        if decide & 0x80 != 0 {
            p.truncate(truncate.index(p.len() + 1));
        }
        let config = Config { checksum_offload: decide & 0x20 != 0, ..Config::default() };
        let mut stack = Stack::new(config, Instant::from_secs(1));
        let now = Instant::from_secs(2);
        // Twice: a second copy hits the pending or accepted flow.
        for _ in 0..2 {
            stack.handle_packet(now, &p, trust(decide & 0x40 != 0));
            drain(&mut stack, now, decide);
        }
        stack.handle_timeout(Instant::from_secs(100));
        drain(&mut stack, Instant::from_secs(100), decide);
        let s = stack.stats();
        prop_assert_eq!(s.packets_in, 2);
        prop_assert_eq!(s.pending, 0);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Random segments on the tuple of an established flow (any flags, sequence numbers,
    /// payloads, and truncations) reach smoltcp: nothing panics, the stack keeps answering.
    #[test]
    fn random_segments_on_an_open_flow_never_panic(
        segs in prop::collection::vec(
            (any::<u8>(), any::<u32>(), any::<u32>(), any::<u16>(), prop::collection::vec(any::<u8>(), 0..64), any::<bool>()),
            1..24,
        ),
    ) {
        let mut net = Net::new(Config::default());
        let h = net.connect(SocketAddr::new(vip(5), 22), 40050, 4096);
        net.step();
        let (flow, _, _) = net.connects()[0];
        net.stack.accept_flow(flow).unwrap();
        net.step();
        prop_assert_eq!(net.sock(h).state(), tcp::State::Established);
        for (flags, seq, ack, win, payload, v6) in &segs {
            let mut hdr = etherparse::TcpHeader::new(40050, 22, *seq, *win);
            hdr.fin = flags & 1 != 0;
            hdr.syn = flags & 2 != 0;
            hdr.rst = flags & 4 != 0;
            hdr.psh = flags & 8 != 0;
            hdr.ack = flags & 16 != 0;
            hdr.acknowledgment_number = *ack;
            let b = if *v6 {
                etherparse::PacketBuilder::ipv6(APP_V6.octets(), [0xfd, 0x71, 0x71, 0x32, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 5], 64)
            } else {
                etherparse::PacketBuilder::ipv4(APP_V4.octets(), [100, 64, 0, 5], 64)
            };
            let mut p = Vec::new();
            b.tcp_header(hdr).write(&mut p, payload).unwrap();
            if flags & 0x80 != 0 {
                p.truncate(p.len() - 3);
            }
            net.stack.handle_packet(net.now, &p, trust(flags & 0x40 != 0));
            net.advance(Duration::from_millis(1));
            // The daemon keeps using the flow as long as it exists.
            let _ = net.stack.send(flow, b"x");
            let _ = net.stack.recv(flow, &mut [0u8; 64]);
        }
        net.advance(Duration::from_secs(30));
        let s = net.stack.stats();
        prop_assert!(s.malformed + s.not_in_pool + s.unsupported <= s.packets_in);
    }
}

/// Trusted (a checksum the kernel vouches for is not checked) or not.
fn trust(trusted: bool) -> RxChecksum {
    if trusted { RxChecksum::Trusted } else { RxChecksum::Unverified }
}

#[test]
fn garbage_is_counted() {
    let mut stack = Stack::new(Config::default(), Instant::from_secs(1));
    let now = Instant::from_secs(2);
    stack.handle_packet(now, &[], RxChecksum::Unverified);
    stack.handle_packet(now, &[0x45, 0, 0], RxChecksum::Unverified);
    stack.handle_packet(now, &[0x60; 3], RxChecksum::Unverified);
    stack.handle_packet(now, &[0xff; 60], RxChecksum::Unverified);
    // A SYN or echo with a wrong checksum never becomes an event (no peer is dialled).
    let mut syn = syn_packet(40000, 22, 5);
    let last = syn.len() - 1;
    syn[last] ^= 0x40;
    stack.handle_packet(now, &syn, RxChecksum::Unverified);
    let mut ping = echo_request(IpAddr::V4(APP_V4), vip(5), 1, 1, b"abcd");
    let last = ping.len() - 1;
    ping[last] ^= 1;
    stack.handle_packet(now, &ping, RxChecksum::Unverified);
    let s = stack.stats();
    assert_eq!(s.packets_in, 6);
    assert_eq!(s.malformed, 6);
    assert!(stack.poll_event().is_none());
    assert!(stack.poll_transmit(now).is_none());
}
