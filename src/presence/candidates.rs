//! Candidate UDP endpoints a peer may be reached at: host (this machine's interface
//! addresses with the PTCP socket's port) and reflexive (what the server saw on that same
//! socket, i.e. the NAT's mapping), in the order worth trying.

use std::net::{IpAddr, SocketAddr};

/// Host candidates: every IPv4 address of an interface that is up, with `port`. Loopback is
/// included only when `include_loopback` (two peers on one machine).
pub fn host(port: u16, include_loopback: bool) -> Vec<SocketAddr> {
    let mut out = Vec::new();
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else { return out };
    for ifa in addrs {
        if !ifa.flags.contains(nix::net::if_::InterfaceFlags::IFF_UP) {
            continue;
        }
        let Some(ip) =
            ifa.address.as_ref().and_then(|a| a.as_sockaddr_in()).map(|s| IpAddr::V4(s.ip()))
        else {
            continue;
        };
        if ip.is_loopback() && !include_loopback {
            continue;
        }
        let c = SocketAddr::new(ip, port);
        if !out.contains(&c) {
            out.push(c);
        }
    }
    out
}

/// The networks this machine is on: every address of an interface that is up, with its
/// prefix (loopback only when `include_loopback`).
pub fn local_networks(include_loopback: bool) -> Vec<ipnet::IpNet> {
    let mut out = Vec::new();
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else { return out };
    for ifa in addrs {
        if !ifa.flags.contains(nix::net::if_::InterfaceFlags::IFF_UP) {
            continue;
        }
        let (Some(a), Some(m)) = (
            ifa.address.as_ref().and_then(|a| a.as_sockaddr_in()),
            ifa.netmask.as_ref().and_then(|m| m.as_sockaddr_in()),
        ) else {
            continue;
        };
        if a.ip().is_loopback() && !include_loopback {
            continue;
        }
        let prefix = u32::from(m.ip()).leading_ones() as u8;
        if let Ok(net) = ipnet::Ipv4Net::new(a.ip(), prefix) {
            out.push(ipnet::IpNet::V4(net.trunc()));
        }
    }
    out
}

/// Which of a peer's candidates we may send probes to: those at the address the server saw
/// the peer's own connection come from (`seen`: its public address, any port, since a NAT
/// picks ports), and those on a network this machine is on (`local`: the same LAN, or
/// loopback). Never a third party's address that a peer chose: a peer cannot turn our probes
/// into a flood aimed elsewhere. Without `seen` only local candidates remain.
pub fn probeable(
    peer: &[SocketAddr],
    seen: Option<IpAddr>,
    local: &[ipnet::IpNet],
) -> Vec<SocketAddr> {
    peer.iter()
        .copied()
        .filter(|c| Some(c.ip()) == seen || local.iter().any(|n| n.contains(&c.ip())))
        .collect()
}

/// All candidates: reflexive first (works across NATs), then host ones (same LAN), then
/// the router's port mapping (`mapped`, [`super::portmap`]; reachable from anywhere, even
/// behind a symmetric NAT). The mapping comes last so that [`predicted`] still reads the
/// reflexive and a host candidate first, and it is kept when host candidates are cut.
pub fn gather(
    port: u16,
    reflexive: Option<SocketAddr>,
    mapped: Option<SocketAddr>,
    include_loopback: bool,
) -> Vec<SocketAddr> {
    let mut out: Vec<SocketAddr> = reflexive.into_iter().collect();
    for c in host(port, include_loopback) {
        if !out.contains(&c) {
            out.push(c);
        }
    }
    let room = crate::proto::MAX_CANDIDATES - usize::from(mapped.is_some());
    out.truncate(room);
    if let Some(m) = mapped
        && !out.contains(&m)
    {
        out.push(m);
    }
    out
}

/// A guess from a peer's candidates (reflexive first, then host ones): its public address
/// with its socket's own port. A NAT that moved the port once (symmetric, or before a
/// network change) may keep it now, e.g. a cone NAT after a rebinding; the reflexive
/// address learnt at setup would then be stale, and this is where the peer is.
pub fn predicted(peer: &[SocketAddr]) -> Option<SocketAddr> {
    let (reflexive, host) = (peer.first()?, peer.get(1)?);
    let guess = SocketAddr::new(reflexive.ip(), host.port());
    (reflexive.port() != host.port() && !peer.contains(&guess)).then_some(guess)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn predicts_the_public_address_with_the_host_port() {
        let c = |s: &str| s.parse::<SocketAddr>().unwrap();
        let moved = [c("203.0.113.2:61000"), c("192.168.2.2:4000")];
        assert_eq!(predicted(&moved), Some(c("203.0.113.2:4000")));
        let kept = [c("203.0.113.2:4000"), c("192.168.2.2:4000")];
        assert_eq!(predicted(&kept), None);
        assert_eq!(predicted(&kept[..1]), None);
    }

    #[test]
    fn only_what_the_server_saw_or_our_own_networks_is_probed() {
        let c = |s: &str| s.parse::<SocketAddr>().unwrap();
        let lan: ipnet::IpNet = "192.168.1.0/24".parse().unwrap();
        let peer = [
            c("203.0.113.2:61000"), // its reflexive address: the server saw 203.0.113.2
            c("192.168.1.7:4000"),  // on our LAN
            c("192.168.9.7:4000"),  // a LAN we are not on
            c("198.51.100.99:22"),  // a third party the peer chose
        ];
        let seen = Some("203.0.113.2".parse().unwrap());
        assert_eq!(probeable(&peer, seen, &[lan]), vec![peer[0], peer[1]]);
        assert_eq!(probeable(&peer, None, &[lan]), vec![peer[1]]);
        assert!(probeable(&peer, None, &[]).is_empty());
        assert!(
            local_networks(true)
                .iter()
                .any(|n| n.contains(&"127.0.0.1".parse::<IpAddr>().unwrap()))
        );
    }

    #[test]
    fn loopback_only_when_asked() {
        assert!(host(9, true).iter().any(|c| c.ip().is_loopback()));
        assert!(!host(9, false).iter().any(|c| c.ip().is_loopback()));
        let r: SocketAddr = "198.51.100.2:4000".parse().unwrap();
        assert_eq!(gather(9, Some(r), None, true)[0], r);
        let m: SocketAddr = "198.51.100.2:4001".parse().unwrap();
        let all = gather(9, Some(r), Some(m), true);
        assert_eq!((all[0], all.last()), (r, Some(&m)));
        assert!(all.len() <= crate::proto::MAX_CANDIDATES);
    }
}
