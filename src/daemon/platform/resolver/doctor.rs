//! `q2q-tun doctor dns`: whether the system resolver still sends `*.q2q` to the shim, and
//! whether the shim answers.

use super::file::nameservers;
use super::install::detect;
use super::resolvectl::resolvectl;
use super::state::read_state;
use super::{Mode, Paths, ROUTING_DOMAIN};
use hickory_proto::op::{Message, MessageType, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, RecordType};
use std::fs;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

const LOOKUP_LIMIT: Duration = Duration::from_secs(3);
pub(super) const SHIM_LIMIT: Duration = Duration::from_secs(2);

/// One line of `q2q-tun doctor dns`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    /// Whether this part works.
    pub ok: bool,
    /// What was checked and found, for a person.
    pub what: String,
}

impl Check {
    fn ok(what: String) -> Check {
        Check { ok: true, what }
    }
    fn bad(what: String) -> Check {
        Check { ok: false, what }
    }
}

/// Which mode is in use and whether its settings are still in place; a lookup of
/// `probe_name` through the system resolver; and the same question asked of the shim
/// directly, which tells a broken hook from a broken shim.
pub async fn doctor(paths: &Paths, link: &str, probe_name: &str, shim: SocketAddr) -> Vec<Check> {
    let mut checks = settings_checks(paths, link, shim).await;
    checks.push(system_lookup(probe_name).await);
    checks.push(query_shim(shim, probe_name).await);
    checks
}

/// The mode in use, and whether the system still has our settings.
pub(super) async fn settings_checks(paths: &Paths, link: &str, shim: SocketAddr) -> Vec<Check> {
    let state = match read_state(paths) {
        Ok(Some(Ok(s))) => s,
        Ok(Some(Err(why))) => {
            return vec![Check::bad(format!(
                "{} is unreadable ({why}): `q2q-tun down` repairs what it can",
                paths.state_file().display()
            ))];
        }
        Ok(None) => {
            return vec![Check::bad(format!(
                "no resolver settings installed (no {}): the daemon is not up in TUN mode; \
                 here it would use {}",
                paths.state_file().display(),
                detect(paths).await
            ))];
        }
        Err(e) => return vec![Check::bad(e.to_string())],
    };
    let mut checks = vec![Check::ok(format!(
        "resolver mode {} (link {}, nameserver {})",
        state.mode, state.link, state.nameserver
    ))];
    if state.link != link {
        checks.push(Check::bad(format!(
            "the settings are for link {} but the daemon's device is {link}",
            state.link
        )));
    }
    if state.mode != Mode::Off && state.nameserver != shim.ip() {
        checks.push(Check::bad(format!(
            "the system resolver asks {} but the shim answers on {shim}",
            state.nameserver
        )));
    }
    match state.mode {
        Mode::Off => {}
        Mode::ResolvConf => {
            let file = state.written_file(paths);
            let first = fs::read_to_string(&file)
                .ok()
                .and_then(|t| nameservers(&t).next().map(str::to_string));
            let ns = state.nameserver.to_string();
            checks.push(if first.as_deref() == Some(ns.as_str()) {
                Check::ok(format!("{}: nameserver {ns} comes first", file.display()))
            } else {
                Check::bad(format!(
                    "{} no longer names {ns} first (rewritten by DHCP or NetworkManager?): \
                     `q2q-tun down`, then `up` again",
                    file.display()
                ))
            });
        }
        Mode::Resolved => {
            let ns = state.nameserver.to_string();
            let dns = resolvectl(paths, &["dns", &state.link]).await.map(|r| r.stdout);
            let domain = resolvectl(paths, &["domain", &state.link]).await.map(|r| r.stdout);
            checks.push(match (dns, domain) {
                (Ok(d), Ok(m)) if d.contains(&ns) && m.contains(ROUTING_DOMAIN) => Check::ok(
                    format!("resolvectl: {} has DNS server {ns} and domain {ROUTING_DOMAIN}", state.link),
                ),
                (Ok(d), Ok(m)) => Check::bad(format!(
                    "resolvectl: {} should have DNS server {ns} and domain {ROUTING_DOMAIN}, has `{}` and `{}`",
                    state.link,
                    d.trim(),
                    m.trim()
                )),
                (Err(e), _) | (_, Err(e)) => Check::bad(e.to_string()),
            });
        }
    }
    checks
}

/// Look `name` up as any program would (getaddrinfo).
async fn system_lookup(name: &str) -> Check {
    match tokio::time::timeout(LOOKUP_LIMIT, tokio::net::lookup_host((name, 0u16))).await {
        Ok(Ok(addrs)) => {
            let mut ips: Vec<IpAddr> = addrs.map(|a| a.ip()).collect();
            ips.dedup();
            if ips.is_empty() {
                Check::bad(format!("the system resolver finds no address for {name}"))
            } else {
                Check::ok(format!("the system resolver finds {name}: {}", join(&ips)))
            }
        }
        Ok(Err(e)) => Check::bad(format!("the system resolver cannot find {name}: {e}")),
        Err(_) => Check::bad(format!(
            "the system resolver did not answer for {name} within {} s",
            LOOKUP_LIMIT.as_secs()
        )),
    }
}

/// Ask the shim for `name`'s A record over UDP, bypassing the system resolver.
pub(super) async fn query_shim(shim: SocketAddr, name: &str) -> Check {
    match tokio::time::timeout(SHIM_LIMIT, ask_shim(shim, name)).await {
        Ok(Ok(resp)) => {
            let code = resp.metadata.response_code;
            let ips: Vec<IpAddr> = resp
                .answers
                .iter()
                .filter_map(|r| match r.data {
                    RData::A(a) => Some(IpAddr::V4(a.0)),
                    _ => None,
                })
                .collect();
            match (code, ips.is_empty()) {
                (ResponseCode::NoError, false) => {
                    Check::ok(format!("the shim on {shim} answers {name}: {}", join(&ips)))
                }
                (ResponseCode::NoError, true) => {
                    Check::bad(format!("the shim on {shim} has no address for {name} (NOERROR)"))
                }
                (ResponseCode::NXDomain, _) => {
                    Check::bad(format!("the shim on {shim} says {name} does not exist (NXDOMAIN)"))
                }
                (ResponseCode::Refused, _) => Check::bad(format!(
                    "the shim on {shim} refuses {name} (REFUSED): only names ending in .q2q are its"
                )),
                (other, _) => Check::bad(format!(
                    "the shim on {shim} answers {name} with {} ({other})",
                    rcode_name(other)
                )),
            }
        }
        Ok(Err(e)) => Check::bad(format!("asking the shim on {shim} for {name}: {e}")),
        Err(_) => Check::bad(format!(
            "the shim on {shim} did not answer a query for {name} within {} s",
            SHIM_LIMIT.as_secs()
        )),
    }
}

async fn ask_shim(shim: SocketAddr, name: &str) -> Result<Message, String> {
    let mut qname =
        Name::from_ascii(name).map_err(|e| format!("`{name}` is not a DNS name: {e}"))?;
    qname.set_fqdn(true);
    let mut query = Message::query();
    query.metadata.recursion_desired = true;
    query.add_query(Query::query(qname, RecordType::A));
    let bytes = query.to_vec().map_err(|e| e.to_string())?;
    let local: SocketAddr = match shim {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let io = |e: io::Error| match e.kind() {
        io::ErrorKind::ConnectionRefused => {
            "nothing listens there (connection refused)".to_string()
        }
        _ => e.to_string(),
    };
    let sock = tokio::net::UdpSocket::bind(local).await.map_err(io)?;
    sock.connect(shim).await.map_err(io)?;
    sock.send(&bytes).await.map_err(io)?;
    let mut buf = vec![0u8; 4096];
    loop {
        let n = sock.recv(&mut buf).await.map_err(io)?;
        // Anything that is not the answer to this query is ignored until the deadline.
        if let Ok(m) = Message::from_vec(&buf[..n])
            && m.metadata.id == query.metadata.id
            && m.metadata.message_type == MessageType::Response
        {
            return Ok(m);
        }
    }
}

fn rcode_name(code: ResponseCode) -> String {
    match code {
        ResponseCode::NoError => "NOERROR".into(),
        ResponseCode::FormErr => "FORMERR".into(),
        ResponseCode::ServFail => "SERVFAIL".into(),
        ResponseCode::NXDomain => "NXDOMAIN".into(),
        ResponseCode::NotImp => "NOTIMP".into(),
        ResponseCode::Refused => "REFUSED".into(),
        other => format!("rcode {}", u16::from(other)),
    }
}

fn join(ips: &[IpAddr]) -> String {
    ips.iter().map(IpAddr::to_string).collect::<Vec<_>>().join(", ")
}
