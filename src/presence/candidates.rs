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

/// All candidates: reflexive first (works across NATs), then host ones (same LAN).
pub fn gather(port: u16, reflexive: Option<SocketAddr>, include_loopback: bool) -> Vec<SocketAddr> {
    let mut out: Vec<SocketAddr> = reflexive.into_iter().collect();
    for c in host(port, include_loopback) {
        if !out.contains(&c) {
            out.push(c);
        }
    }
    out.truncate(crate::proto::MAX_CANDIDATES);
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
    fn loopback_only_when_asked() {
        assert!(host(9, true).iter().any(|c| c.ip().is_loopback()));
        assert!(!host(9, false).iter().any(|c| c.ip().is_loopback()));
        let r: SocketAddr = "198.51.100.2:4000".parse().unwrap();
        assert_eq!(gather(9, Some(r), true)[0], r);
    }
}
