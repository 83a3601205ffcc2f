//! Where a domain's identity server is: `--server`, then the client config, then DNS SRV
//! `_q2q._tcp.<domain>`, then `<domain>:8788`.

use crate::address::Domain;
use crate::proto::DEFAULT_PORT;
use std::time::Duration;

/// One place to try, and why it was chosen (for error messages).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub addr: String,
    pub source: &'static str,
}

/// How long the SRV lookup may take before falling back to `<domain>:8788`.
const SRV_TIMEOUT: Duration = Duration::from_secs(3);

/// The places to try for `domain`'s server, in order.
pub async fn locate(
    domain: &Domain,
    flag: Option<&str>,
    config: &super::home::ClientConfig,
) -> Vec<Candidate> {
    if let Some(s) = flag {
        return vec![Candidate { addr: s.to_string(), source: "--server" }];
    }
    if let Some(s) = config.servers.get(domain.as_str()) {
        return vec![Candidate { addr: s.clone(), source: "config" }];
    }
    let mut out = match tokio::time::timeout(SRV_TIMEOUT, srv(domain)).await {
        Ok(Ok(list)) => list,
        Ok(Err(e)) => {
            tracing::debug!(%domain, error = %e, "no SRV record");
            vec![]
        }
        Err(_) => {
            tracing::debug!(%domain, "SRV lookup timed out");
            vec![]
        }
    };
    out.push(Candidate { addr: format!("{domain}:{DEFAULT_PORT}"), source: "default port" });
    out
}

/// The resolver: the system's, or `Q2Q_DNS_SERVER` (`ip:port`, used by tests to point at a
/// loopback DNS server).
fn resolver() -> anyhow::Result<hickory_resolver::TokioResolver> {
    use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolverConfig};
    use hickory_resolver::net::runtime::TokioRuntimeProvider;
    if let Ok(s) = std::env::var("Q2Q_DNS_SERVER") {
        let addr: std::net::SocketAddr = s.parse()?;
        let mut udp = ConnectionConfig::udp();
        udp.port = addr.port();
        let mut tcp = ConnectionConfig::tcp();
        tcp.port = addr.port();
        let ns = NameServerConfig::new(addr.ip(), true, vec![udp, tcp]);
        let config = ResolverConfig::from_name_servers(vec![ns]);
        return Ok(hickory_resolver::Resolver::builder_with_config(
            config,
            TokioRuntimeProvider::default(),
        )
        .build()?);
    }
    Ok(hickory_resolver::Resolver::builder_tokio()?.build()?)
}

async fn srv(domain: &Domain) -> anyhow::Result<Vec<Candidate>> {
    use hickory_resolver::proto::rr::{RData, RecordType};
    let name = format!("_q2q._tcp.{domain}.");
    let lookup = resolver()?.lookup(name.as_str(), RecordType::SRV).await?;
    let mut records: Vec<_> = lookup
        .answers()
        .iter()
        .filter_map(|r| match &r.data {
            RData::SRV(srv) => Some(srv.clone()),
            _ => None,
        })
        .collect();
    // Lowest priority first; within a priority, heaviest weight first (a deterministic
    // stand-in for RFC 2782's weighted random choice).
    records.sort_by_key(|s| (s.priority, std::cmp::Reverse(s.weight)));
    Ok(records
        .into_iter()
        .filter(|s| !s.target.is_root())
        .map(|s| {
            let host = s.target.to_string();
            let host = host.trim_end_matches('.');
            Candidate { addr: format!("{host}:{}", s.port), source: "DNS SRV" }
        })
        .collect())
}
