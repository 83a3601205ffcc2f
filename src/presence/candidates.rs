//! Candidate UDP endpoints a peer may be reached at (RFC 8445 §5.1.1): host (this
//! machine's interface addresses with the PTCP socket's port) and server-reflexive (what
//! the server saw on that same socket, i.e. the NAT's mapping), of both families, in the
//! order worth trying.

use std::net::{IpAddr, SocketAddr};

/// An interface address, as an IP with its prefix length.
fn interface_addresses(include_loopback: bool) -> Vec<(IpAddr, u8)> {
    let mut out = Vec::new();
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else { return out };
    for ifa in addrs {
        if !ifa.flags.contains(nix::net::if_::InterfaceFlags::IFF_UP) {
            continue;
        }
        let (Some(a), m) = (ifa.address.as_ref(), ifa.netmask.as_ref()) else { continue };
        let (ip, prefix) = if let Some(a) = a.as_sockaddr_in() {
            let m =
                m.and_then(|m| m.as_sockaddr_in()).map_or(32, |m| m.ip().to_bits().leading_ones());
            (IpAddr::V4(a.ip()), m as u8)
        } else if let Some(a) = a.as_sockaddr_in6() {
            let m = m
                .and_then(|m| m.as_sockaddr_in6())
                .map_or(128, |m| m.ip().to_bits().leading_ones());
            (IpAddr::V6(a.ip()), m as u8)
        } else {
            continue;
        };
        if ip.is_loopback() && !include_loopback {
            continue;
        }
        // Link-local IPv6 needs a scope a candidate cannot carry; the other kinds are never
        // a peer's way to us either.
        if !crate::dualstack::probe_worthy(SocketAddr::new(ip, 1)) {
            continue;
        }
        out.push((ip, prefix));
    }
    out
}

/// Host candidates: every address of an interface that is up, with `port`: IPv4, and IPv6
/// global and unique-local (RFC 4193) addresses, IPv4 first. Link-local IPv6 is left out
/// (it needs an interface scope). Loopback is included only when `include_loopback` (two
/// peers on one machine).
pub fn host(port: u16, include_loopback: bool) -> Vec<SocketAddr> {
    let mut out: Vec<SocketAddr> = Vec::new();
    let mut all = interface_addresses(include_loopback);
    all.sort_by_key(|(ip, _)| ip.is_ipv6());
    for (ip, _) in all {
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
    for (ip, prefix) in interface_addresses(include_loopback) {
        if let Ok(net) = ipnet::IpNet::new(ip, prefix) {
            let net = net.trunc();
            if !out.contains(&net) {
                out.push(net);
            }
        }
    }
    out
}

/// Which of a peer's candidates we may send probes to: those at the address the server saw
/// the peer's own connection come from (`seen`: its public address, any port, since a NAT
/// picks ports), and those on a network this machine is on (`local`: the same LAN, or
/// loopback). Never a third party's address that a peer chose: a peer cannot turn our probes
/// into a flood aimed elsewhere. `seen` holds at most one address per family (the control
/// connection's, and the other family's the server verified, see
/// [`crate::proto::commands::AlsoSeen`]); without any only local candidates remain. Kinds no
/// peer can be reached at (unspecified, multicast, broadcast, v4-mapped, IPv6 link-local,
/// port 0: [`crate::dualstack::probe_worthy`]) are never probed, whoever named them.
pub fn probeable(peer: &[SocketAddr], seen: &[IpAddr], local: &[ipnet::IpNet]) -> Vec<SocketAddr> {
    peer.iter()
        .copied()
        .filter(|c| crate::dualstack::probe_worthy(*c))
        .filter(|c| seen.contains(&c.ip()) || local.iter().any(|n| n.contains(&c.ip())))
        .collect()
}

/// All candidates: the first reflexive address (works across NATs; IPv4 when there is
/// one), then host ones (same LAN, and global IPv6), then the reflexive address of the other
/// family, then the router's port mapping (`mapped`, [`super::portmap`]; reachable from
/// anywhere, even behind a symmetric NAT). The first two places are what [`predicted`] and
/// the NAT facts of birthday probing read (a reflexive address, then a host one with the
/// socket's own port); the other reflexive address and the mapping are kept when host
/// candidates are cut. The order says nothing of preference: the path machine tries both
/// families at once and prefers IPv6 (RFC 8305 §4) unless IPv4 measures clearly faster.
pub fn gather(
    port: u16,
    reflexive: &[SocketAddr],
    mapped: Option<SocketAddr>,
    include_loopback: bool,
) -> Vec<SocketAddr> {
    let mut reflexive = reflexive.to_vec();
    reflexive.sort_by_key(|r| r.is_ipv6());
    reflexive.dedup();
    let mut out: Vec<SocketAddr> = reflexive.first().copied().into_iter().collect();
    for c in host(port, include_loopback) {
        if !out.contains(&c) {
            out.push(c);
        }
    }
    let tail: Vec<SocketAddr> =
        reflexive.iter().skip(1).copied().chain(mapped).filter(|c| !out.contains(c)).collect();
    out.truncate(crate::proto::MAX_CANDIDATES.saturating_sub(tail.len()).max(1));
    for c in tail {
        if !out.contains(&c) && out.len() < crate::proto::MAX_CANDIDATES {
            out.push(c);
        }
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
    fn either_family_only_where_seen_and_never_a_refused_kind() {
        let c = |s: &str| s.parse::<SocketAddr>().unwrap();
        let lan6: ipnet::IpNet = "2001:db8:1::/64".parse().unwrap();
        let peer = [
            c("[2001:db8:2::2]:4000"),       // where the server saw it over IPv6
            c("203.0.113.2:61000"),          // where the server saw it over IPv4
            c("[2001:db8:1::7]:4000"),       // on our IPv6 LAN
            c("[2001:db8:9::9]:22"),         // a third party
            c("[ff02::1]:4000"),             // multicast, even if "on" a local network
            c("[::ffff:203.0.113.2]:61000"), // v4-mapped: the IPv4 rules, not these
            c("[fe80::1]:4000"),             // link-local: no scope
            c("[2001:db8:2::2]:0"),          // port 0
        ];
        let seen = ["2001:db8:2::2".parse().unwrap(), "203.0.113.2".parse().unwrap()];
        let all: ipnet::IpNet = "::/0".parse().unwrap();
        assert_eq!(probeable(&peer, &seen, &[lan6]), vec![peer[0], peer[1], peer[2]]);
        assert_eq!(probeable(&peer, &seen[..1], &[]), vec![peer[0]]);
        assert_eq!(probeable(&peer, &[], &[all]), vec![peer[0], peer[2], peer[3]]);
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
        let seen = ["203.0.113.2".parse().unwrap()];
        assert_eq!(probeable(&peer, &seen, &[lan]), vec![peer[0], peer[1]]);
        assert_eq!(probeable(&peer, &[], &[lan]), vec![peer[1]]);
        assert!(probeable(&peer, &[], &[]).is_empty());
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
        assert_eq!(gather(9, &[r], None, true)[0], r);
        let m: SocketAddr = "198.51.100.2:4001".parse().unwrap();
        let all = gather(9, &[r], Some(m), true);
        assert_eq!((all[0], all.last()), (r, Some(&m)));
        assert!(all.len() <= crate::proto::MAX_CANDIDATES);
        // Both families: the IPv4 reflexive address leads, the IPv6 one follows the host
        // candidates, before the mapping.
        let r6: SocketAddr = "[2001:db8:2::2]:4000".parse().unwrap();
        let all = gather(9, &[r6, r], Some(m), true);
        assert_eq!(all[0], r);
        let at = |c| all.iter().position(|x| *x == c).unwrap();
        assert!(at(r6) > 0 && at(r6) < at(m));
        assert_eq!(gather(9, &[r6], None, true)[0], r6);
    }
}
