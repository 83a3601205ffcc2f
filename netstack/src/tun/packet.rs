//! What a packet from the kernel is, seen with etherparse before smoltcp sees it, and the
//! few packets the stack builds itself (RSTs, UDP, echo replies, port unreachable).

use std::net::{IpAddr, SocketAddr};

use etherparse::{
    Icmpv4Type, Icmpv6Type, NetSlice, PacketBuilder, SlicedPacket, TransportSlice, icmpv4, icmpv6,
};

use smoltcp::wire::{
    Icmpv4Packet, Icmpv6Packet, IpAddress, IpProtocol, Ipv4Packet, Ipv6Packet, TcpPacket,
    UdpPacket, checksum,
};

use super::config::Config;
use super::{PartialChecksum, RxChecksum};

/// Hop limit of the packets the stack builds.
const HOP_LIMIT: u8 = 64;

/// A packet from the kernel, classified.
#[derive(Debug)]
pub(crate) enum Inbound<'a> {
    /// TCP to a virtual address.
    Tcp {
        /// The app's endpoint.
        src: SocketAddr,
        /// The virtual endpoint it dialled.
        dst: SocketAddr,
        /// A connection request: SYN without ACK.
        syn: bool,
        /// The RST flag.
        rst: bool,
    },
    /// UDP to a virtual address.
    Udp {
        src: SocketAddr,
        dst: SocketAddr,
        payload: &'a [u8],
        /// The whole IP packet (without bytes past its IP length), to quote in an error.
        packet: &'a [u8],
    },
    /// ICMP or ICMPv6 echo request to a virtual address.
    Echo { src: IpAddr, dst: IpAddr, ident: u16, seq_no: u16, payload: &'a [u8] },
}

/// Why a packet from the kernel was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Drop {
    /// It does not parse as IPv4/IPv6, a checksum checked here is wrong, or its addresses
    /// or ports are impossible.
    Malformed,
    /// Its destination is not a virtual address.
    NotInPool,
    /// A protocol, ICMP type or IP fragment the stack does not carry.
    Unsupported,
}

fn unicast(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(a) => !(a.is_unspecified() || a.is_multicast() || a.is_broadcast()),
        IpAddr::V6(a) => !(a.is_unspecified() || a.is_multicast()),
    }
}

/// Classify a packet read from the TUN device. Never panics. Transport checksums are
/// checked here (smoltcp checks none) unless the kernel vouches for them (`checksum`): a
/// corrupt packet must not make the daemon dial a peer or take data. IPv4 header checksums
/// are always checked (the kernel computes those even when it leaves the rest to us).
pub(crate) fn classify<'a>(
    packet: &'a [u8],
    config: &Config,
    checksum: RxChecksum,
) -> Result<Inbound<'a>, Drop> {
    let verify = checksum == RxChecksum::Unverified;
    let sliced = SlicedPacket::from_ip(packet).map_err(|_| Drop::Malformed)?;
    let (src, dst, fragmented, transport, ip_len) = match &sliced.net {
        Some(NetSlice::Ipv4(ip)) => {
            let header = Ipv4Packet::new_checked(packet).map_err(|_| Drop::Malformed)?;
            if !header.verify_checksum() {
                return Err(Drop::Malformed);
            }
            (
                IpAddr::V4(ip.header().source_addr()),
                IpAddr::V4(ip.header().destination_addr()),
                ip.is_payload_fragmented(),
                ip.payload().payload,
                usize::from(ip.header().total_len()),
            )
        }
        Some(NetSlice::Ipv6(ip)) => (
            IpAddr::V6(ip.header().source_addr()),
            IpAddr::V6(ip.header().destination_addr()),
            ip.is_payload_fragmented(),
            ip.payload().payload,
            40 + usize::from(ip.header().payload_length()),
        ),
        _ => return Err(Drop::Malformed),
    };
    if !unicast(src) {
        return Err(Drop::Malformed);
    }
    if !config.is_virtual(dst) {
        return Err(Drop::NotInPool);
    }
    if fragmented {
        return Err(Drop::Unsupported);
    }
    let (s, d) = (IpAddress::from(src), IpAddress::from(dst));
    match sliced.transport {
        Some(TransportSlice::Tcp(t)) => {
            if t.source_port() == 0 || t.destination_port() == 0 {
                return Err(Drop::Malformed);
            }
            let syn = t.syn() && !t.ack() && !t.rst();
            if verify && !TcpPacket::new_checked(transport).is_ok_and(|p| p.verify_checksum(&s, &d))
            {
                return Err(Drop::Malformed);
            }
            Ok(Inbound::Tcp {
                src: SocketAddr::new(src, t.source_port()),
                dst: SocketAddr::new(dst, t.destination_port()),
                syn,
                rst: t.rst(),
            })
        }
        Some(TransportSlice::Udp(u)) => {
            let checked = !verify
                || UdpPacket::new_checked(transport).is_ok_and(|p| p.verify_checksum(&s, &d));
            if u.source_port() == 0 || u.destination_port() == 0 || !checked {
                return Err(Drop::Malformed);
            }
            Ok(Inbound::Udp {
                src: SocketAddr::new(src, u.source_port()),
                dst: SocketAddr::new(dst, u.destination_port()),
                payload: u.payload(),
                packet: packet.get(..ip_len).unwrap_or(packet),
            })
        }
        Some(TransportSlice::Icmpv4(i)) => match i.icmp_type() {
            Icmpv4Type::EchoRequest(e) if src.is_ipv4() => {
                if verify
                    && !Icmpv4Packet::new_checked(transport).is_ok_and(|p| p.verify_checksum())
                {
                    return Err(Drop::Malformed);
                }
                Ok(Inbound::Echo { src, dst, ident: e.id, seq_no: e.seq, payload: i.payload() })
            }
            _ => Err(Drop::Unsupported),
        },
        Some(TransportSlice::Icmpv6(i)) => match i.icmp_type() {
            Icmpv6Type::EchoRequest(e) => {
                let (IpAddr::V6(s6), IpAddr::V6(d6)) = (src, dst) else {
                    return Err(Drop::Malformed);
                };
                if verify
                    && !Icmpv6Packet::new_checked(transport)
                        .is_ok_and(|p| p.verify_checksum(&s6, &d6))
                {
                    return Err(Drop::Malformed);
                }
                Ok(Inbound::Echo { src, dst, ident: e.id, seq_no: e.seq, payload: i.payload() })
            }
            _ => Err(Drop::Unsupported),
        },
        _ => Err(Drop::Unsupported),
    }
}

/// Offset of the TCP checksum within the TCP header (RFC 9293, section 3.1).
const TCP_CHECKSUM_AT: usize = 16;

/// Where the TCP segment of an IP packet lies: its addresses, its first byte and its length
/// (to the IP length). `None` for anything else: not TCP, an IPv4 fragment, an IPv6
/// extension header in front, or too short. Never panics.
fn tcp_span(packet: &[u8]) -> Option<(IpAddress, IpAddress, usize, usize)> {
    match packet.first()? >> 4 {
        4 => {
            let ip = Ipv4Packet::new_checked(packet).ok()?;
            if ip.next_header() != IpProtocol::Tcp || ip.more_frags() || ip.frag_offset() != 0 {
                return None;
            }
            let start = usize::from(ip.header_len());
            let len = usize::from(ip.total_len()).checked_sub(start)?;
            let addrs = (IpAddress::from(ip.src_addr()), IpAddress::from(ip.dst_addr()));
            Some((addrs.0, addrs.1, start, len))
        }
        6 => {
            let ip = Ipv6Packet::new_checked(packet).ok()?;
            if ip.next_header() != IpProtocol::Tcp {
                return None;
            }
            let len = usize::from(ip.payload_len());
            Some((IpAddress::from(ip.src_addr()), IpAddress::from(ip.dst_addr()), 40, len))
        }
        _ => None,
    }
    .filter(|&(_, _, start, len)| len >= 20 && start + len <= packet.len())
}

/// Leave the checksum of a TCP packet to the kernel: write the pseudo-header sum (RFC 9293,
/// section 3.1) into its checksum field, as a device completing it expects (virtio's
/// `VIRTIO_NET_HDR_F_NEEDS_CSUM`: the sum from [`partial_checksum`]'s `start` on, folded and
/// complemented, is the checksum). Anything not TCP is left untouched.
pub(crate) fn leave_tcp_checksum(packet: &mut [u8]) {
    let Some((src, dst, start, len)) = tcp_span(packet) else { return };
    let Ok(len) = u32::try_from(len) else { return };
    let sum = checksum::pseudo_header(&src, &dst, IpProtocol::Tcp, len);
    let at = start + TCP_CHECKSUM_AT;
    if let Some(field) = packet.get_mut(at..at + 2) {
        field.copy_from_slice(&sum.to_be_bytes());
    }
}

/// Where the partial checksum of a TCP packet made by [`leave_tcp_checksum`] is to be
/// completed; `None` for anything not TCP.
pub(crate) fn partial_checksum(packet: &[u8]) -> Option<PartialChecksum> {
    let (_, _, start, _) = tcp_span(packet)?;
    Some(PartialChecksum { start: u16::try_from(start).ok()?, offset: TCP_CHECKSUM_AT as u16 })
}

/// The sequence number and segment length (SYN and FIN count one each) of a TCP packet.
pub(crate) fn tcp_seq_len(packet: &[u8]) -> Option<(u32, u32)> {
    let sliced = SlicedPacket::from_ip(packet).ok()?;
    let Some(TransportSlice::Tcp(t)) = sliced.transport else { return None };
    let len = t.payload().len() as u32 + u32::from(t.syn()) + u32::from(t.fin());
    Some((t.sequence_number(), len))
}

/// Start a packet from `src` to `dst` (same family, checked by the caller).
fn ip(src: IpAddr, dst: IpAddr) -> Option<etherparse::PacketBuilderStep<etherparse::IpHeaders>> {
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            Some(PacketBuilder::ipv4(s.octets(), d.octets(), HOP_LIMIT))
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            Some(PacketBuilder::ipv6(s.octets(), d.octets(), HOP_LIMIT))
        }
        _ => None,
    }
}

/// The RST|ACK that refuses the connection request `syn` (from the app to a virtual
/// endpoint): the kernel then fails `connect` with ECONNREFUSED.
pub(crate) fn refuse(syn: &[u8], app: SocketAddr, vip: SocketAddr) -> Option<Vec<u8>> {
    let (seq, len) = tcp_seq_len(syn)?;
    let b =
        ip(vip.ip(), app.ip())?.tcp(vip.port(), app.port(), 0, 0).rst().ack(seq.wrapping_add(len));
    let mut out = Vec::with_capacity(b.size(0));
    b.write(&mut out, &[]).ok()?;
    Some(out)
}

/// A UDP packet.
pub(crate) fn udp(src: SocketAddr, dst: SocketAddr, payload: &[u8]) -> Option<Vec<u8>> {
    let b = ip(src.ip(), dst.ip())?.udp(src.port(), dst.port());
    let mut out = Vec::with_capacity(b.size(payload.len()));
    b.write(&mut out, payload).ok()?;
    Some(out)
}

/// An echo reply from `vip` to `app`.
pub(crate) fn echo_reply(
    vip: IpAddr,
    app: IpAddr,
    ident: u16,
    seq_no: u16,
    payload: &[u8],
) -> Option<Vec<u8>> {
    let b = ip(vip, app)?;
    let mut out = Vec::with_capacity(echo_overhead(vip) + payload.len());
    if vip.is_ipv4() {
        b.icmpv4_echo_reply(ident, seq_no).write(&mut out, payload).ok()?;
    } else {
        b.icmpv6_echo_reply(ident, seq_no).write(&mut out, payload).ok()?;
    }
    Some(out)
}

/// At most this much of an IPv4 datagram is quoted in an ICMP error: the error then fits
/// 576 bytes, the size every IPv4 host takes (RFC 1812, section 4.3.2, item 3; RFC 792 asks for the IP
/// header and 8 bytes at least).
pub(crate) const QUOTE_MAX_V4: usize = 576 - 20 - 8;
/// At most this much of an IPv6 packet is quoted in an ICMPv6 error: the error then fits
/// the IPv6 minimum MTU of 1280 bytes (RFC 4443 2.4 (c)).
pub(crate) const QUOTE_MAX_V6: usize = 1280 - 40 - 8;

/// The destination unreachable / port unreachable error (ICMPv4 type 3 code 3, ICMPv6
/// type 1 code 4) from `vip` to `app` that carries `quote`, the start of the offending packet.
pub(crate) fn port_unreachable(vip: IpAddr, app: IpAddr, quote: &[u8]) -> Option<Vec<u8>> {
    let b = ip(vip, app)?;
    let mut out = Vec::with_capacity(echo_overhead(vip) + quote.len());
    if vip.is_ipv4() {
        let t = Icmpv4Type::DestinationUnreachable(icmpv4::DestUnreachableHeader::Port);
        b.icmpv4(t).write(&mut out, quote).ok()?;
    } else {
        let t = Icmpv6Type::DestinationUnreachable(icmpv6::DestUnreachableCode::Port);
        b.icmpv6(t).write(&mut out, quote).ok()?;
    }
    Some(out)
}

/// Bytes of IP and transport headers in front of a UDP payload.
pub(crate) fn udp_overhead(ip: IpAddr) -> usize {
    8 + if ip.is_ipv4() { 20 } else { 40 }
}

/// Bytes of IP and ICMP headers in front of an echo payload.
pub(crate) fn echo_overhead(ip: IpAddr) -> usize {
    8 + if ip.is_ipv4() { 20 } else { 40 }
}
