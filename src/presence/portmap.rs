//! Port mapping: ask the local router to forward a public UDP port to the PTCP socket, with
//! PCP (RFC 6887), NAT-PMP (RFC 6886) or UPnP IGD, so that peers reach us directly even
//! behind a symmetric NAT. The mapped address becomes a candidate
//! ([`super::candidates::gather`]).
//!
//! ```text
//!  Mapper task (one owner of the mapping)
//!    start / network change ── discover: PCP, then NAT-PMP (crab_nat, unicast to the
//!                               default gateway), then UPnP IGD (igd-next, SSDP multicast
//!                               on the local link); one attempt each, a few seconds at most
//!    half the lifetime ─────── renew (the same external port); on failure: no mapping
//!    stop (`down`) ─────────── delete it on the router
//!  watch channel ── the mapped address, read by whoever gathers candidates
//! ```
//!
//! Off by default ([`crate::presence::node::NodeConfig::port_mapping`], `q2q-tun up
//! --port-mapping`): it opens a port of the router to the whole Internet, which the user
//! should choose, and its discovery talks to whatever network the machine is on.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::num::NonZeroU16;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{info, warn};

/// The lifetime asked for a mapping; it is renewed at half of what the router grants.
pub const LIFETIME: Duration = Duration::from_secs(600);

/// The shortest wait between renewals (a router granting seconds must not make us spin).
const MIN_RENEW: Duration = Duration::from_secs(10);

/// How long UPnP discovery (SSDP) waits for a router to answer.
const SSDP_WAIT: Duration = Duration::from_secs(2);

/// The description UPnP routers show for our mappings.
const DESCRIPTION: &str = "q2q";

/// Where and how to ask.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// The PCP/NAT-PMP server (default: the default IPv4 gateway).
    pub gateway: Option<Ipv4Addr>,
    /// Also try UPnP IGD (SSDP multicast on the local link) when PCP and NAT-PMP fail.
    pub upnp: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options { gateway: None, upnp: true }
    }
}

/// Which protocol made a mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Protocol {
    /// Port Control Protocol, RFC 6887.
    Pcp,
    /// NAT Port Mapping Protocol, RFC 6886.
    NatPmp,
    /// UPnP Internet Gateway Device (WANIPConnection).
    Upnp,
}

impl std::fmt::Display for Protocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Protocol::Pcp => "PCP",
            Protocol::NatPmp => "NAT-PMP",
            Protocol::Upnp => "UPnP IGD",
        })
    }
}

/// A mapping in force: its public address and how it was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Mapped {
    pub external: SocketAddr,
    pub protocol: Protocol,
}

/// Why no mapping was made.
#[derive(Debug, thiserror::Error)]
pub enum PortMapError {
    /// No default IPv4 gateway (read from /proc/net/route).
    #[error("no default gateway")]
    NoGateway,
    /// The local port is 0.
    #[error("the socket has no port yet")]
    NoPort,
    /// Neither PCP/NAT-PMP nor UPnP answered or agreed (each one's reason).
    #[error("the router offers no port mapping (PCP/NAT-PMP: {pmp}; UPnP: {upnp})")]
    Unavailable { pmp: String, upnp: String },
    /// Renewing or deleting failed.
    #[error("{0}")]
    Router(String),
}

/// A mapping and what is needed to renew and delete it.
enum Mapping {
    Pmp {
        mapping: crab_nat::PortMapping,
        external: SocketAddr,
    },
    Upnp {
        gateway: igd_next::aio::Gateway<igd_next::aio::tokio::Tokio>,
        external: SocketAddr,
        local: SocketAddr,
    },
}

impl Mapping {
    fn mapped(&self) -> Mapped {
        match self {
            Mapping::Pmp { mapping, external } => Mapped {
                external: *external,
                protocol: match mapping.mapping_type() {
                    crab_nat::PortMappingType::NatPmp => Protocol::NatPmp,
                    crab_nat::PortMappingType::Pcp { .. } => Protocol::Pcp,
                },
            },
            Mapping::Upnp { external, .. } => {
                Mapped { external: *external, protocol: Protocol::Upnp }
            }
        }
    }

    /// When to renew: half the granted lifetime.
    fn renew_after(&self) -> Duration {
        let granted = match self {
            Mapping::Pmp { mapping, .. } => Duration::from_secs(u64::from(mapping.lifetime())),
            Mapping::Upnp { .. } => LIFETIME,
        };
        (granted / 2).max(MIN_RENEW)
    }

    async fn renew(&mut self) -> Result<(), PortMapError> {
        match self {
            Mapping::Pmp { mapping, external } => {
                mapping.renew().await.map_err(|e| PortMapError::Router(e.to_string()))?;
                external.set_port(mapping.external_port().get());
                Ok(())
            }
            Mapping::Upnp { gateway, external, local } => gateway
                .add_port(
                    igd_next::PortMappingProtocol::UDP,
                    external.port(),
                    *local,
                    lease_secs(),
                    DESCRIPTION,
                )
                .await
                .map_err(|e| PortMapError::Router(e.to_string())),
        }
    }

    async fn delete(self) -> Result<(), PortMapError> {
        match self {
            Mapping::Pmp { mapping, .. } => {
                mapping.try_drop().await.map_err(|(e, _)| PortMapError::Router(e.to_string()))
            }
            Mapping::Upnp { gateway, external, .. } => gateway
                .remove_port(igd_next::PortMappingProtocol::UDP, external.port())
                .await
                .map_err(|e| PortMapError::Router(e.to_string())),
        }
    }
}

fn lease_secs() -> u32 {
    u32::try_from(LIFETIME.as_secs()).unwrap_or(u32::MAX)
}

/// The default IPv4 gateway, from the kernel's routing table (`/proc/net/route`: the
/// destination 0 route's gateway, hex in host byte order).
pub fn default_gateway() -> Option<Ipv4Addr> {
    let table = std::fs::read_to_string("/proc/net/route").ok()?;
    parse_route_table(&table)
}

fn parse_route_table(table: &str) -> Option<Ipv4Addr> {
    table.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (dest, gateway, mask) = (f.get(1)?, f.get(2)?, f.get(7)?);
        if *dest != "00000000" || *mask != "00000000" {
            return None;
        }
        let g = u32::from_str_radix(gateway, 16).ok()?;
        (g != 0).then(|| Ipv4Addr::from(g.to_le_bytes()))
    })
}

/// Our address towards `gateway` (the source address the kernel would pick; nothing is
/// sent: connecting a UDP socket only chooses the route).
fn local_ip_towards(gateway: Ipv4Addr) -> Option<IpAddr> {
    let s = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
    s.connect((gateway, crab_nat::GATEWAY_PORT)).ok()?;
    Some(s.local_addr().ok()?.ip())
}

/// One discovery: ask the default gateway for a UDP mapping of `port` with PCP, then
/// NAT-PMP, then UPnP IGD (SSDP on the local link). The external port asked is `port`
/// itself; the router may give another.
async fn discover(port: u16, opts: Options) -> Result<Mapping, PortMapError> {
    let internal = NonZeroU16::new(port).ok_or(PortMapError::NoPort)?;
    let gateway = opts.gateway.or_else(default_gateway).ok_or(PortMapError::NoGateway)?;
    let client = local_ip_towards(gateway).ok_or(PortMapError::NoGateway)?;
    let timeouts = crab_nat::TimeoutConfig {
        initial_timeout: Duration::from_millis(250),
        max_retries: 2,
        max_retry_timeout: Some(Duration::from_secs(1)),
    };
    let options = crab_nat::PortMappingOptions {
        external_port: Some(internal),
        lifetime_seconds: Some(lease_secs()),
        timeout_config: Some(timeouts),
    };
    let pmp = match crab_nat::PortMapping::new(
        gateway.into(),
        client,
        crab_nat::InternetProtocol::Udp,
        internal,
        options,
    )
    .await
    {
        Ok(mapping) => {
            let ip = match mapping.mapping_type() {
                crab_nat::PortMappingType::Pcp { external_ip, .. } => Some(external_ip),
                crab_nat::PortMappingType::NatPmp => {
                    crab_nat::natpmp::external_address(gateway.into(), Some(timeouts))
                        .await
                        .ok()
                        .map(IpAddr::V4)
                }
            };
            match ip {
                Some(ip) => {
                    let external = SocketAddr::new(ip, mapping.external_port().get());
                    return Ok(Mapping::Pmp { mapping, external });
                }
                None => {
                    let _ = mapping.try_drop().await;
                    "no external address".to_string()
                }
            }
        }
        Err(e) => e.to_string(),
    };
    let local = SocketAddr::new(client, port);
    if !opts.upnp {
        return Err(PortMapError::Unavailable { pmp, upnp: "not tried".into() });
    }
    let upnp = match upnp(local).await {
        Ok(m) => return Ok(m),
        Err(e) => e,
    };
    Err(PortMapError::Unavailable { pmp, upnp })
}

async fn upnp(local: SocketAddr) -> Result<Mapping, String> {
    let mut options = igd_next::SearchOptions::default();
    options.timeout = Some(SSDP_WAIT);
    options.single_search_timeout = Some(SSDP_WAIT);
    let gateway = igd_next::aio::tokio::search_gateway(options).await.map_err(|e| e.to_string())?;
    let ip = gateway.get_external_ip().await.map_err(|e| e.to_string())?;
    let udp = igd_next::PortMappingProtocol::UDP;
    let port = match gateway.add_port(udp, local.port(), local, lease_secs(), DESCRIPTION).await {
        Ok(()) => local.port(),
        Err(_) => gateway
            .add_any_port(udp, local, lease_secs(), DESCRIPTION)
            .await
            .map_err(|e| e.to_string())?,
    };
    Ok(Mapping::Upnp { gateway, external: SocketAddr::new(ip, port), local })
}

/// Ask once for a mapping of `port`, report it, and delete it (for `netcheck`).
///
/// # Errors
/// [`PortMapError::Unavailable`] with each protocol's reason, or no gateway.
pub async fn probe(port: u16, opts: Options) -> Result<Mapped, PortMapError> {
    let m = discover(port, opts).await?;
    let mapped = m.mapped();
    if let Err(e) = m.delete().await {
        warn!(error = %e, "could not delete netcheck's test mapping");
    }
    Ok(mapped)
}

enum Command {
    /// The network changed: discover again.
    Rediscover,
    /// Delete the mapping and end.
    Stop(oneshot::Sender<()>),
}

/// The handle of the task that owns the mapping.
#[derive(Clone)]
pub struct Mapper {
    current: watch::Receiver<Option<Mapped>>,
    commands: mpsc::Sender<Command>,
}

impl Mapper {
    /// Start the task for the UDP socket on `port`: it discovers at once.
    pub fn start(port: u16, opts: Options) -> Mapper {
        let (tx, current) = watch::channel(None);
        let (commands, rx) = mpsc::channel(4);
        tokio::spawn(run(port, opts, tx, rx));
        Mapper { current, commands }
    }

    /// The mapping in force, if any.
    pub fn current(&self) -> Option<Mapped> {
        *self.current.borrow()
    }

    /// Wait until a discovery has produced a mapping, at most `wait`.
    pub async fn wait_mapped(&self, wait: Duration) -> Option<Mapped> {
        let mut rx = self.current.clone();
        tokio::time::timeout(wait, rx.wait_for(Option::is_some)).await.ok()?.ok().and_then(|m| *m)
    }

    /// The network changed: discover again (once).
    pub fn rediscover(&self) {
        let _ = self.commands.try_send(Command::Rediscover);
    }

    /// Delete the mapping on the router (a few seconds at most) and end the task.
    pub async fn stop(&self) {
        let (tx, rx) = oneshot::channel();
        if self.commands.send(Command::Stop(tx)).await.is_ok() {
            let _ = tokio::time::timeout(Duration::from_secs(5), rx).await;
        }
    }
}

async fn run(
    port: u16,
    opts: Options,
    current: watch::Sender<Option<Mapped>>,
    mut commands: mpsc::Receiver<Command>,
) {
    let mut mapping = discovered(port, opts, &current).await;
    loop {
        let renew_in =
            mapping.as_ref().map_or(Duration::from_secs(86400 * 365), Mapping::renew_after);
        tokio::select! {
            cmd = commands.recv() => match cmd {
                Some(Command::Rediscover) => {
                    if let Some(m) = mapping.take() {
                        let _ = m.delete().await;
                    }
                    mapping = discovered(port, opts, &current).await;
                }
                Some(Command::Stop(done)) => {
                    if let Some(m) = mapping.take() {
                        let external = m.mapped().external;
                        match m.delete().await {
                            Ok(()) => info!(%external, "port mapping deleted"),
                            Err(e) => warn!(%external, error = %e, "could not delete the port mapping"),
                        }
                    }
                    current.send_replace(None);
                    let _ = done.send(());
                    return;
                }
                None => return,
            },
            _ = tokio::time::sleep(renew_in) => {
                if let Some(m) = mapping.as_mut()
                    && let Err(e) = m.renew().await
                {
                    warn!(error = %e, "port mapping renewal failed: no mapped candidate until the network changes");
                    mapping = None;
                }
                current.send_replace(mapping.as_ref().map(Mapping::mapped));
            }
        }
    }
}

async fn discovered(
    port: u16,
    opts: Options,
    current: &watch::Sender<Option<Mapped>>,
) -> Option<Mapping> {
    match discover(port, opts).await {
        Ok(m) => {
            let mapped = m.mapped();
            info!(external = %mapped.external, protocol = %mapped.protocol, "port mapping made");
            current.send_replace(Some(mapped));
            Some(m)
        }
        Err(e) => {
            info!(error = %e, "no port mapping");
            current.send_replace(None);
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_route_from_the_kernel_table() {
        let table = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
                     eth0\t0001A8C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n\
                     eth0\t00000000\t0101A8C0\t0003\t0\t0\t0\t00000000\t0\t0\t0\n";
        assert_eq!(parse_route_table(table), Some(Ipv4Addr::new(192, 168, 1, 1)));
        assert_eq!(parse_route_table("Iface\n"), None);
        assert_eq!(parse_route_table("Iface\neth0 00000000 00000000 0 0 0 0 00000000\n"), None);
        assert_eq!(parse_route_table("Iface\neth0 zz\n"), None);
    }
}
