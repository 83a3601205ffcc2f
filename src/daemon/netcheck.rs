//! `q2q-tun netcheck`: what this machine's network allows, asked of the home server.
//!
//! ```text
//!  TCP  connect + TLS + who-am-i ........ the control path works; its round trip
//!  UDP  who-am-i (flags: tell me your second socket) ── reachable? reflexive address
//!       × 6 ........................................ round trip to the relay (same socket)
//!       who-am-i, answer from the second socket .... filtering (RFC 5780 section 4.4)
//!       who-am-i to the second socket .............. mapping (RFC 5780 section 4.3)
//!  per address family the server has
//!  port mapping: one mapping asked of the router and deleted (portmap::probe)
//!  then one verdict
//! ```
//!
//! Every probe comes from one fresh UDP socket per family, which has sent nothing before:
//! the filtering test must come before the socket ever sends to the second socket, or a
//! port-restricted NAT would let the answer in. The second socket is on a second address of
//! the server where it has one (`second_udp_addr`), as RFC 5780 asks; otherwise on a second
//! port of the same address, and then a NAT that maps per destination *address* only (rare)
//! looks endpoint-independent here. [`Observations::verdict`] turns the results into the
//! verdict without I/O.

use super::DaemonError;
use crate::address::Q2qAddress;
use crate::client::{ClientError, ConnectOptions, Home, HomeError, ServerConn, UdpWhoAmI};
use crate::proto::whoami::Flags;
use serde::Serialize;
use std::fmt;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::net::UdpSocket;

/// Round trips measured to the relay (the server's UDP port).
const RTT_SAMPLES: usize = 6;

/// Why `netcheck` could not run (a network that blocks UDP is a result, not an error).
#[derive(Debug, thiserror::Error)]
pub enum NetcheckError {
    /// No identity to check for, or several and none chosen.
    #[error(transparent)]
    Daemon(#[from] DaemonError),
    /// The identity could not be read.
    #[error(transparent)]
    Home(#[from] HomeError),
    /// The home server could not be reached over TCP (nothing else can work then).
    #[error(transparent)]
    Client(#[from] ClientError),
    /// A UDP socket could not be made, or resolving the server failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// What to check: for whom, and which server.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// The identity whose home server is asked (default: the only one stored).
    pub identity: Option<Q2qAddress>,
    /// Also ask the local router for a port mapping of a fresh socket's port, and delete
    /// it at once ([`crate::presence::portmap::probe`]: PCP, then NAT-PMP to the default
    /// gateway, then UPnP IGD by SSDP on the local link; one attempt each, a few seconds at
    /// most). `q2q-tun netcheck` does unless `--no-port-mapping`.
    pub port_mapping: bool,
    /// How to reach the server (`server` overrides the one stored with the identity).
    pub server: ConnectOptions,
}

/// How the NAT chooses the external port of a socket (RFC 4787 section 4.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mapping {
    /// One external address for every destination (no NAT, or a cone NAT).
    EndpointIndependent,
    /// A new external port per destination (a symmetric NAT).
    EndpointDependent,
    /// Not measured: the server has no second port, or it did not answer.
    Unknown,
}

/// Whether the NAT lets in datagrams from a port the socket never sent to (RFC 4787
/// section 5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Filtering {
    /// Anyone may send to the mapped port (a full cone, or no NAT and no firewall).
    EndpointIndependent,
    /// Only the addresses and ports the socket sent to (a restricted cone, a firewall).
    EndpointDependent,
    /// Not measured: the server has no second port.
    Unknown,
}

/// Round trips in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Rtt {
    pub min_ms: f64,
    pub median_ms: f64,
    /// Probes answered.
    pub samples: usize,
}

impl Rtt {
    fn of(mut samples: Vec<Duration>) -> Option<Rtt> {
        samples.sort();
        let ms = |d: &Duration| d.as_secs_f64() * 1e3;
        Some(Rtt {
            min_ms: ms(samples.first()?),
            median_ms: ms(&samples[samples.len() / 2]),
            samples: samples.len(),
        })
    }
}

/// The control connection (TCP, TLS, AMP).
#[derive(Debug, Clone, Serialize)]
pub struct Tcp {
    /// The `host:port` that answered.
    pub server: String,
    /// The address the server sees the TCP connection come from.
    pub seen: SocketAddr,
    /// Connect and TLS handshake, milliseconds.
    pub connect_ms: f64,
    /// One who-am-i over the connection, milliseconds.
    pub rtt_ms: f64,
}

/// UDP to the server over one address family.
#[derive(Debug, Clone, Serialize)]
pub struct Udp {
    /// The server's UDP address asked.
    pub server: SocketAddr,
    /// Whether the server answered at all.
    pub reachable: bool,
    /// The reflexive address: where the server saw the socket.
    pub reflexive: Option<SocketAddr>,
    /// The server's second who-am-i port (None: it has none, or an older server).
    pub second_port: Option<u16>,
    /// The second who-am-i socket asked: on the server's second address where it has one,
    /// else its second port on `server`'s address.
    pub second_server: Option<SocketAddr>,
    /// The address the second socket saw the same socket at.
    pub reflexive_second: Option<SocketAddr>,
    pub mapping: Mapping,
    pub filtering: Filtering,
    /// Round trips to the relay (the server's UDP port, where relayed datagrams go).
    pub relay_rtt: Option<Rtt>,
}

/// Port mapping on the local router (UPnP IGD, NAT-PMP, PCP).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case", tag = "state")]
pub enum PortMapping {
    /// Not asked (`--no-port-mapping`).
    NotChecked,
    /// The router made a mapping (deleted again at once).
    Available { protocol: crate::presence::portmap::Protocol, external: SocketAddr },
    /// No protocol got a mapping; why.
    Unavailable { reason: String },
}

/// The one-line answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Verdict {
    /// The NAT keeps one port for every destination (or there is none): hole punching
    /// works with most peers.
    #[serde(rename = "direct to most peers")]
    DirectToMost,
    /// A symmetric NAT: direct paths only with peers whose NAT maps and filters
    /// independently of the destination (full cones, no NAT); the relay for the others.
    #[serde(rename = "direct only to cone peers")]
    DirectToConeOnly,
    /// No UDP to the server: every session goes through the relay over TCP.
    #[serde(rename = "relay only")]
    RelayOnly,
    /// UDP works but the mapping could not be measured (the server has no second port).
    #[serde(rename = "unknown")]
    Unknown,
}

impl Verdict {
    /// The verdict as printed and in JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::DirectToMost => "direct to most peers",
            Verdict::DirectToConeOnly => "direct only to cone peers",
            Verdict::RelayOnly => "relay only",
            Verdict::Unknown => "unknown",
        }
    }

    /// Why, in a sentence.
    pub fn why(self) -> &'static str {
        match self {
            Verdict::DirectToMost => {
                "the NAT keeps one port for every destination, so hole punching works"
            }
            Verdict::DirectToConeOnly => {
                "the NAT gives each destination a new port (symmetric): direct only with peers \
                 whose NAT lets anyone in, the relay for the others"
            }
            Verdict::RelayOnly => {
                "no UDP reaches the server: sessions go through its relay over TCP"
            }
            Verdict::Unknown => "the server has no second UDP port to measure the NAT's mapping",
        }
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the probes saw, before any conclusion.
#[derive(Debug, Clone, Serialize)]
pub struct Observations {
    pub tcp: Tcp,
    /// One entry per address family the server has (IPv4 first).
    pub udp: Vec<Udp>,
    pub port_mapping: PortMapping,
}

impl Observations {
    /// The verdict: the best family decides (a peer can use whichever works); a port
    /// mapping on the router makes any NAT reachable from everywhere, where UDP works.
    pub fn verdict(&self) -> Verdict {
        if self.mapping_decides() {
            return Verdict::DirectToMost;
        }
        self.nat_verdict()
    }

    /// The verdict's reason: [`Verdict::why`], or the port mapping's when it decided.
    pub fn why(&self) -> &'static str {
        if self.mapping_decides() && self.nat_verdict() != Verdict::DirectToMost {
            "the router maps a port on request: with `q2q-tun up --port-mapping` peers reach \
             this machine directly whatever its NAT does"
        } else {
            self.verdict().why()
        }
    }

    /// Whether a port mapping was made and UDP works.
    fn mapping_decides(&self) -> bool {
        matches!(self.port_mapping, PortMapping::Available { .. })
            && self.udp.iter().any(|u| u.reachable)
    }

    /// The verdict from the NAT's behaviour alone (the best family decides).
    fn nat_verdict(&self) -> Verdict {
        let of = |u: &Udp| match (u.reachable, u.mapping) {
            (false, _) => Verdict::RelayOnly,
            (true, Mapping::EndpointIndependent) => Verdict::DirectToMost,
            (true, Mapping::EndpointDependent) => Verdict::DirectToConeOnly,
            (true, Mapping::Unknown) => Verdict::Unknown,
        };
        let rank = |v: &Verdict| match v {
            Verdict::DirectToMost => 3,
            Verdict::Unknown => 2,
            Verdict::DirectToConeOnly => 1,
            Verdict::RelayOnly => 0,
        };
        self.udp.iter().map(of).max_by_key(rank).unwrap_or(Verdict::RelayOnly)
    }
}

/// What `netcheck` found, as printed or as JSON.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The identity whose home server was asked.
    pub address: String,
    #[serde(flatten)]
    pub observed: Observations,
    pub verdict: Verdict,
    /// The verdict's reason.
    pub why: &'static str,
}

/// Check the network towards the home server of `opts.identity`.
///
/// Takes about a second where UDP works, up to about 4 s per address family where it is
/// blocked (each unanswered probe waits 1 s). Sends at most 3 + 6 + 2 + 3 datagrams per
/// family, all to the home server.
///
/// # Errors
/// See [`NetcheckError`]: no identity, or no TCP connection to the server.
pub async fn check(home: &Home, opts: &Options) -> Result<Report, NetcheckError> {
    let me = super::choose_identity(home, opts.identity.as_ref())?;
    let id = home.identity(&me)?;
    let server = ConnectOptions {
        server: opts.server.server.clone().or(id.server.clone()),
        ca_fingerprint: opts.server.ca_fingerprint,
        login: None,
    };
    let started = Instant::now();
    let conn = ServerConn::connect(home, &me.domain, &server).await?;
    let connect_ms = ms(started.elapsed());
    let asked = Instant::now();
    let seen = conn.who_am_i().await?;
    let tcp = Tcp { server: conn.server.clone(), seen, connect_ms, rtt_ms: ms(asked.elapsed()) };
    drop(conn);

    let targets: Vec<SocketAddr> = tokio::net::lookup_host(tcp.server.as_str()).await?.collect();
    let mut udp = Vec::new();
    for v6 in [false, true] {
        if let Some(&target) = targets.iter().find(|a| a.is_ipv6() == v6) {
            udp.push(check_udp(target).await?);
        }
    }
    let port_mapping =
        if opts.port_mapping { port_mapping().await? } else { PortMapping::NotChecked };
    let observed = Observations { tcp, udp, port_mapping };
    let (verdict, why) = (observed.verdict(), observed.why());
    Ok(Report { address: me.to_string(), observed, verdict, why })
}

/// Ask the router for a mapping of a fresh socket's port, and delete it.
async fn port_mapping() -> Result<PortMapping, NetcheckError> {
    let socket = UdpSocket::bind("0.0.0.0:0").await?;
    let port = socket.local_addr()?.port();
    Ok(match crate::presence::portmap::probe(port, Default::default()).await {
        Ok(m) => PortMapping::Available { protocol: m.protocol, external: m.external },
        Err(e) => PortMapping::Unavailable { reason: e.to_string() },
    })
}

/// The UDP probes towards `server` from one fresh socket (order matters: see the module).
async fn check_udp(server: SocketAddr) -> Result<Udp, NetcheckError> {
    let bind = if server.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" };
    let socket = UdpSocket::bind(bind).await?;
    let plain = UdpWhoAmI { to: server, answer_from: server, ..UdpWhoAmI::default() };
    let mut out = Udp {
        server,
        reachable: false,
        reflexive: None,
        second_port: None,
        second_server: None,
        reflexive_second: None,
        mapping: Mapping::Unknown,
        filtering: Filtering::Unknown,
        relay_rtt: None,
    };
    let flags = Flags { second_port: true, second_addr: true, ..Flags::default() };
    let ask_second = UdpWhoAmI { flags, ..plain };
    let first = match ask_second.send(&socket).await {
        Ok(a) => a,
        Err(e) if e.kind() == std::io::ErrorKind::TimedOut => return Ok(out),
        Err(e) => return Err(e.into()),
    };
    out.reachable = true;
    out.reflexive = Some(first.seen);
    out.second_port = first.second_port.filter(|p| *p != 0);
    out.second_server = match first.second_addr {
        Some(Some(a)) if a.is_ipv4() == server.is_ipv4() && a.port() != 0 => Some(a),
        _ => out.second_port.map(|p| SocketAddr::new(server.ip(), p)),
    };

    let mut rtts = vec![first.rtt];
    let once = UdpWhoAmI { tries: 1, ..plain };
    for _ in 1..RTT_SAMPLES {
        if let Ok(a) = once.send(&socket).await {
            rtts.push(a.rtt);
        }
    }
    out.relay_rtt = Rtt::of(rtts);

    let Some(second) = out.second_server else { return Ok(out) };
    let from_second = UdpWhoAmI {
        flags: Flags { reply_from_second: true, ..Flags::default() },
        answer_from: second,
        tries: 2,
        ..plain
    };
    out.filtering = match from_second.send(&socket).await {
        Ok(_) => Filtering::EndpointIndependent,
        Err(e) if e.kind() == std::io::ErrorKind::TimedOut => Filtering::EndpointDependent,
        Err(e) => return Err(e.into()),
    };
    let to_second = UdpWhoAmI { to: second, answer_from: second, ..plain };
    if let Ok(a) = to_second.send(&socket).await {
        out.reflexive_second = Some(a.seen);
        out.mapping = if Some(a.seen) == out.reflexive {
            Mapping::EndpointIndependent
        } else {
            Mapping::EndpointDependent
        };
    }
    Ok(out)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

impl fmt::Display for Mapping {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mapping::EndpointIndependent => "endpoint-independent (one port for every destination)",
            Mapping::EndpointDependent => {
                "endpoint-dependent (a new port per destination: symmetric)"
            }
            Mapping::Unknown => "unknown (the server has no second socket)",
        })
    }
}

impl fmt::Display for Filtering {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Filtering::EndpointIndependent => "endpoint-independent (anyone may send in)",
            Filtering::EndpointDependent => {
                "endpoint-dependent (only where this socket sent to may answer)"
            }
            Filtering::Unknown => "unknown (the server has no second socket)",
        })
    }
}

/// The printed report: one line per finding, the verdict last.
impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Observations { tcp, udp, port_mapping } = &self.observed;
        writeln!(f, "{} at {}", self.address, tcp.server)?;
        writeln!(
            f,
            "TCP:          seen as {}; connect+TLS {:.1} ms, round trip {:.1} ms",
            tcp.seen, tcp.connect_ms, tcp.rtt_ms
        )?;
        for u in udp {
            let family = if u.server.is_ipv4() { "IPv4" } else { "IPv6" };
            let Some(seen) = u.reflexive.filter(|_| u.reachable) else {
                writeln!(f, "UDP ({family}):   blocked (no answer from {})", u.server)?;
                continue;
            };
            writeln!(f, "UDP ({family}):   seen as {seen}")?;
            writeln!(f, "  mapping:    {}", u.mapping)?;
            if let Some(second) = u.second_server {
                let what = if second.ip() == u.server.ip() { "port" } else { "address" };
                writeln!(f, "              (compared with the server's second {what}, {second})")?;
            }
            writeln!(f, "  filtering:  {}", u.filtering)?;
            if let Some(r) = u.relay_rtt {
                writeln!(
                    f,
                    "  relay:      round trip {:.2} ms min, {:.2} ms median ({} probes)",
                    r.min_ms, r.median_ms, r.samples
                )?;
            }
        }
        match port_mapping {
            PortMapping::NotChecked => {
                writeln!(f, "port mapping: not checked (--no-port-mapping)")?
            }
            PortMapping::Available { protocol, external } => {
                writeln!(f, "port mapping: available ({protocol}), e.g. {external}")?
            }
            PortMapping::Unavailable { reason } => writeln!(f, "port mapping: none ({reason})")?,
        }
        writeln!(f, "verdict: {} ({})", self.verdict, self.why)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn udp(reachable: bool, mapping: Mapping) -> Udp {
        Udp {
            server: "198.51.100.1:8788".parse().unwrap(),
            reachable,
            reflexive: reachable.then(|| "198.51.100.2:4000".parse().unwrap()),
            second_port: Some(8789),
            second_server: Some("203.0.113.1:8789".parse().unwrap()),
            reflexive_second: None,
            mapping,
            filtering: Filtering::EndpointDependent,
            relay_rtt: None,
        }
    }

    fn observed(udp: Vec<Udp>) -> Observations {
        Observations {
            tcp: Tcp {
                server: "198.51.100.1:8788".into(),
                seen: "198.51.100.2:5000".parse().unwrap(),
                connect_ms: 1.0,
                rtt_ms: 0.5,
            },
            udp,
            port_mapping: PortMapping::NotChecked,
        }
    }

    #[test]
    fn verdicts() {
        use Mapping::*;
        let v = |u: Vec<Udp>| observed(u).verdict();
        assert_eq!(v(vec![udp(true, EndpointIndependent)]), Verdict::DirectToMost);
        assert_eq!(v(vec![udp(true, EndpointDependent)]), Verdict::DirectToConeOnly);
        assert_eq!(v(vec![udp(false, Unknown)]), Verdict::RelayOnly);
        assert_eq!(v(vec![udp(true, Unknown)]), Verdict::Unknown);
        assert_eq!(v(vec![]), Verdict::RelayOnly, "a server without UDP addresses");
        assert_eq!(
            v(vec![udp(true, EndpointDependent), udp(true, EndpointIndependent)]),
            Verdict::DirectToMost,
            "the better family decides"
        );
        assert_eq!(
            v(vec![udp(false, Unknown), udp(true, EndpointDependent)]),
            Verdict::DirectToConeOnly
        );
        let mut mapped = observed(vec![udp(true, EndpointDependent)]);
        mapped.port_mapping = PortMapping::Available {
            protocol: crate::presence::portmap::Protocol::Pcp,
            external: "198.51.100.2:4000".parse().unwrap(),
        };
        assert_eq!(mapped.verdict(), Verdict::DirectToMost, "a port mapping beats a symmetric NAT");
        assert!(mapped.why().contains("--port-mapping"), "{}", mapped.why());
        mapped.udp[0].mapping = EndpointIndependent;
        assert_eq!(mapped.why(), Verdict::DirectToMost.why(), "the NAT alone decides there");
        mapped.udp[0].mapping = EndpointDependent;
        mapped.udp[0].reachable = false;
        assert_eq!(mapped.verdict(), Verdict::RelayOnly, "but not blocked UDP");
    }

    #[test]
    fn json_and_text() {
        let o = observed(vec![udp(true, Mapping::EndpointDependent)]);
        let verdict = o.verdict();
        let r = Report {
            address: "alice@example.com".into(),
            observed: o,
            verdict,
            why: verdict.why(),
        };
        let j: serde_json::Value = serde_json::to_value(&r).unwrap();
        assert_eq!(j["verdict"], "direct only to cone peers");
        assert_eq!(j["udp"][0]["mapping"], "endpoint-dependent");
        assert_eq!(j["udp"][0]["reflexive"], "198.51.100.2:4000");
        assert_eq!(j["tcp"]["seen"], "198.51.100.2:5000");
        assert_eq!(j["port_mapping"]["state"], "not-checked");
        let text = r.to_string();
        assert!(
            text.lines().last().unwrap().starts_with("verdict: direct only to cone peers"),
            "{text}"
        );
        assert!(text.contains("UDP (IPv4):   seen as 198.51.100.2:4000"), "{text}");
        assert!(text.contains("second address, 203.0.113.1:8789"), "{text}");
        assert_eq!(j["udp"][0]["second_server"], "203.0.113.1:8789");
        let blocked = observed(vec![udp(false, Mapping::Unknown)]);
        let r = Report {
            address: "a@b.c".into(),
            observed: blocked,
            verdict: Verdict::RelayOnly,
            why: "",
        };
        assert!(r.to_string().contains("UDP (IPv4):   blocked"), "{r}");
    }

    #[test]
    fn rtt_summary() {
        assert_eq!(Rtt::of(vec![]), None);
        let r = Rtt::of(vec![
            Duration::from_millis(3),
            Duration::from_millis(1),
            Duration::from_millis(2),
        ])
        .unwrap();
        assert_eq!((r.min_ms, r.median_ms, r.samples), (1.0, 2.0, 3));
    }
}
