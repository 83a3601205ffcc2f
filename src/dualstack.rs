//! Dual-stack sockets: one IPv6 socket bound to `[::]` with `IPV6_V6ONLY` off serves IPv4
//! too (RFC 3493 §3.7, RFC 4038 §4.2), so one port, one NAT mapping per family and one
//! path machine serve both families. IPv4 peers then appear as v4-mapped addresses
//! (`::ffff:a.b.c.d`); they are made plain IPv4 at the edge ([`canonical`]) as they come in,
//! and mapped back ([`for_socket`]) as they go out, so nothing inside ever sees a mapped
//! address (one address, one spelling: candidates, `peer_seen` and relay legs compare
//! equal).
//!
//! Why one socket rather than one per family: the path machine, who-am-i and the relay
//! all key on "our socket", and the host candidates of both families share its port. A
//! host without IPv6 (the kernel's `ipv6.disable=1`) cannot open `[::]`: [`bind_udp`] then
//! falls back to `0.0.0.0` on the same port.

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use socket2::{Domain, Protocol, Socket, Type};

/// `addr` with a v4-mapped IPv6 address (`::ffff:a.b.c.d`) made plain IPv4; anything else
/// unchanged.
pub fn canonical(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), v6.port()),
            None => addr,
        },
        SocketAddr::V4(_) => addr,
    }
}

/// The spelling of `to` a socket whose local address is `local` can send to: an IPv4
/// destination becomes v4-mapped on an IPv6 (dual-stack) socket.
pub fn for_socket(local: SocketAddr, to: SocketAddr) -> SocketAddr {
    match (local, to) {
        (SocketAddr::V6(_), SocketAddr::V4(v4)) => {
            SocketAddr::new(IpAddr::V6(v4.ip().to_ipv6_mapped()), v4.port())
        }
        _ => to,
    }
}

/// A UDP socket bound to `addr`, non-blocking (ready for tokio). `[::]` is bound
/// dual-stack (`IPV6_V6ONLY` off, whatever the system default); when IPv6 is unavailable
/// it falls back to `0.0.0.0` with the same port. Any other address binds as given.
pub fn bind_udp(addr: SocketAddr) -> io::Result<std::net::UdpSocket> {
    let s = bind(addr, Type::DGRAM, Protocol::UDP)?;
    Ok(s.into())
}

/// A listening TCP socket on `addr` (backlog 1024), non-blocking, dual-stack as
/// [`bind_udp`].
pub fn bind_tcp(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let s = bind(addr, Type::STREAM, Protocol::TCP)?;
    s.listen(1024)?;
    Ok(s.into())
}

fn bind(addr: SocketAddr, ty: Type, proto: Protocol) -> io::Result<Socket> {
    let open = |addr: SocketAddr| -> io::Result<Socket> {
        let s = Socket::new(Domain::for_address(addr), ty, Some(proto))?;
        if addr.is_ipv6() && addr.ip().is_unspecified() {
            s.set_only_v6(false)?;
        }
        if ty == Type::STREAM {
            // As tokio's TcpListener::bind does: a restarted server rebinds at once.
            s.set_reuse_address(true)?;
        }
        s.set_nonblocking(true)?;
        s.bind(&addr.into())?;
        Ok(s)
    };
    match open(addr) {
        Err(e) if addr.is_ipv6() && addr.ip().is_unspecified() && no_ipv6(&e) => {
            open(SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), addr.port()))
        }
        r => r,
    }
}

/// The errors of a system without IPv6.
fn no_ipv6(e: &io::Error) -> bool {
    e.raw_os_error() == Some(nix::libc::EAFNOSUPPORT)
        || e.kind() == io::ErrorKind::AddrNotAvailable
        || e.kind() == io::ErrorKind::Unsupported
}

/// Whether `ip` is an address a peer may be probed at (for both families): not
/// unspecified, multicast, broadcast, v4-mapped or v4-compatible, nor IPv6 link-local
/// (which needs an interface scope a candidate does not carry). Loopback and private
/// ranges pass: whether they are reachable is the caller's filter (`seen` or our own
/// networks).
pub fn probe_worthy(addr: SocketAddr) -> bool {
    if addr.port() == 0 {
        return false;
    }
    match addr.ip() {
        IpAddr::V4(a) => !(a.is_unspecified() || a.is_multicast() || a.is_broadcast()),
        IpAddr::V6(a) => {
            let s = a.segments();
            !(a.is_unspecified()
                || a.is_multicast()
                || a.to_ipv4_mapped().is_some()
                || (s[..6] == [0; 6] && !a.is_loopback())
                || (s[0] & 0xffc0) == 0xfe80)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn mapped_addresses_are_plain_inside_and_mapped_outside() {
        assert_eq!(canonical(a("[::ffff:198.51.100.1]:8788")), a("198.51.100.1:8788"));
        assert_eq!(canonical(a("[2001:db8::1]:8788")), a("[2001:db8::1]:8788"));
        assert_eq!(canonical(a("198.51.100.1:1")), a("198.51.100.1:1"));
        let v6 = a("[::]:4000");
        assert_eq!(for_socket(v6, a("198.51.100.1:1")), a("[::ffff:198.51.100.1]:1"));
        assert_eq!(for_socket(v6, a("[2001:db8::1]:1")), a("[2001:db8::1]:1"));
        assert_eq!(for_socket(a("0.0.0.0:4000"), a("198.51.100.1:1")), a("198.51.100.1:1"));
    }

    #[test]
    fn a_dual_stack_socket_talks_to_both_families() {
        let s = bind_udp(a("[::]:0")).unwrap();
        let local = s.local_addr().unwrap();
        let v4 = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let to = for_socket(local, v4.local_addr().unwrap());
        s.send_to(b"x", to).unwrap();
        v4.set_read_timeout(Some(std::time::Duration::from_secs(5))).unwrap();
        let mut buf = [0u8; 4];
        let (n, from) = v4.recv_from(&mut buf).unwrap();
        assert_eq!((n, from.port()), (1, local.port()));
        v4.send_to(b"y", ("127.0.0.1", local.port())).unwrap();
        s.set_nonblocking(false).unwrap();
        s.set_read_timeout(Some(std::time::Duration::from_secs(5))).unwrap();
        let (_, from) = s.recv_from(&mut buf).unwrap();
        assert_eq!(canonical(from), v4.local_addr().unwrap());
    }

    #[test]
    fn kinds_never_probed() {
        for bad in [
            "0.0.0.0:1",
            "224.0.0.0:1",
            "255.255.255.255:1",
            "198.51.100.1:0",
            "[::]:1",
            "[ff02::1]:1",
            "[::ffff:198.51.100.1]:1",
            "[::198.51.100.1]:1",
            "[fe80::1]:1",
        ] {
            assert!(!probe_worthy(a(bad)), "{bad}");
        }
        for good in ["198.51.100.1:1", "127.0.0.1:1", "[2001:db8::1]:1", "[fd00::1]:1", "[::1]:1"] {
            assert!(probe_worthy(a(good)), "{good}");
        }
    }
}
