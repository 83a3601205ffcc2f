//! Where a domain's identity server is: `--server`, then the client config, then DNS SRV
//! `_q2q._tcp.<domain>`, then `<domain>:8788`. `--server` and the config may list several
//! instances of the domain, comma-separated (`a.example.com:8788, b.example.com:8788`),
//! as SRV may name several targets: they are tried in order.
//!
//! The SRV look-up never goes through our own `*.q2q` shim: in resolv-conf mode the shim is
//! the first nameserver, and the daemon asks these questions *while the shim waits for the
//! answer* (whether a person of another domain exists). So the resolver here is built from
//! the system's resolv.conf minus the shim's addresses (those the daemon declares with
//! [`use_system_resolver`], and the one q2q-tun's marker line names), built once and kept
//! while the file stays the same, so its cache (answers for their TTL, negative answers for
//! 5 to 30 s) lives on. A look-up that failed outright (no answer in time) is remembered for
//! [`FAILED_FOR`] too.

use crate::address::Domain;
use crate::proto::DEFAULT_PORT;
use hickory_resolver::TokioResolver;
use hickory_resolver::config::{ResolverConfig, ResolverOpts};
use std::collections::HashMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{LazyLock, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// One place to try, and why it was chosen (for error messages).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub addr: String,
    pub source: &'static str,
}

/// How long the SRV lookup may take before falling back to `<domain>:8788`.
const SRV_TIMEOUT: Duration = Duration::from_secs(3);
/// How long an SRV look-up that got no answer at all is not repeated.
pub const FAILED_FOR: Duration = Duration::from_secs(5);
/// Negative answers (no such name, no SRV record) are cached at least and at most this long.
const NEGATIVE_TTL: (Duration, Duration) = (Duration::from_secs(5), Duration::from_secs(30));

/// Why no resolver could be set up for the SRV look-up.
#[derive(Debug, thiserror::Error)]
pub enum ResolverSetupError {
    /// The resolver settings could not be read.
    #[error("cannot read {}: {error}", path.display())]
    Read { path: PathBuf, error: std::io::Error },
    /// resolv.conf names no nameserver but the q2q shim (or none at all).
    #[error("{} names no nameserver but the q2q shim", path.display())]
    OnlyShim { path: PathBuf },
    /// The settings do not make a resolver (`Q2Q_DNS_SERVER` unparseable, and the like).
    #[error("resolver settings: {0}")]
    Invalid(String),
}

/// Why the SRV look-up found nothing.
#[derive(Debug, thiserror::Error)]
pub enum SrvError {
    #[error(transparent)]
    Setup(#[from] ResolverSetupError),
    /// The DNS said no, or did not answer.
    #[error("{0}")]
    Lookup(String),
    /// It got no answer a moment ago: not asked again yet.
    #[error("no answer a moment ago (not asked again for {} s)", FAILED_FOR.as_secs())]
    FailedRecently,
}

/// The places to try for `domain`'s server, in order.
pub async fn locate(
    domain: &Domain,
    flag: Option<&str>,
    config: &super::home::ClientConfig,
) -> Vec<Candidate> {
    if let Some(s) = flag {
        return list(s, "--server");
    }
    if let Some(s) = config.servers.get(domain.as_str()) {
        return list(s, "config");
    }
    let mut out = match tokio::time::timeout(SRV_TIMEOUT, srv(domain)).await {
        Ok(Ok(list)) => list,
        Ok(Err(e)) => {
            tracing::debug!(%domain, error = %e, "no SRV record");
            vec![]
        }
        Err(_) => {
            tracing::debug!(%domain, "SRV lookup timed out");
            failed(domain);
            vec![]
        }
    };
    out.push(Candidate { addr: format!("{domain}:{DEFAULT_PORT}"), source: "default port" });
    out
}

/// The `host:port`s of a comma-separated list, in order.
fn list(s: &str, source: &'static str) -> Vec<Candidate> {
    s.split(',')
        .map(str::trim)
        .filter(|a| !a.is_empty())
        .map(|a| Candidate { addr: a.to_string(), source })
        .collect()
}

/// What the process's own DNS look-ups use: the resolv.conf actually in force and the
/// addresses of our own shim, never to be asked.
struct System {
    resolv_conf: PathBuf,
    shim: Vec<IpAddr>,
    built: Option<(Key, TokioResolver)>,
    failed: HashMap<Domain, Instant>,
}

/// What a built resolver depends on.
#[derive(PartialEq, Eq)]
struct Key {
    settings: Vec<u8>,
    shim: Vec<IpAddr>,
    runtime: Option<tokio::runtime::Id>,
}

static SYSTEM: LazyLock<Mutex<System>> = LazyLock::new(|| {
    Mutex::new(System {
        resolv_conf: PathBuf::from("/etc/resolv.conf"),
        shim: Vec::new(),
        built: None,
        failed: HashMap::new(),
    })
});

fn system() -> MutexGuard<'static, System> {
    SYSTEM.lock().unwrap_or_else(|p| p.into_inner())
}

/// Tell this process's look-ups which resolv.conf is in force (in a lab namespace, the file
/// bind-mounted over /etc/resolv.conf) and where our own shim answers (never asked).
pub fn use_system_resolver(resolv_conf: PathBuf, shim: Vec<IpAddr>) {
    let mut s = system();
    s.resolv_conf = resolv_conf;
    s.shim = shim;
}

/// The settings of a resolv.conf text without the nameservers in `shim` and the one
/// q2q-tun's marker line names: what the daemon's own look-ups use. Negative answers are
/// cached 5 to 30 s.
pub fn settings_without_shim(
    text: &[u8],
    shim: &[IpAddr],
) -> Result<(ResolverConfig, ResolverOpts), String> {
    let marked = crate::daemon::resolver::shim_nameserver(text);
    let (config, mut opts) =
        hickory_resolver::system_conf::parse_resolv_conf(text).map_err(|e| e.to_string())?;
    let (domain, search, servers) = config.into_parts();
    let kept: Vec<_> =
        servers.into_iter().filter(|ns| !shim.contains(&ns.ip) && Some(ns.ip) != marked).collect();
    if kept.is_empty() {
        return Err("no nameserver but the q2q shim".into());
    }
    opts.negative_min_ttl = Some(NEGATIVE_TTL.0);
    opts.negative_max_ttl = Some(NEGATIVE_TTL.1);
    Ok((ResolverConfig::from_parts(domain, search, kept), opts))
}

/// The resolver: `Q2Q_DNS_SERVER` (`ip:port`, used by tests to point at a loopback DNS
/// server), else the system's without our shim. Built again only when its settings change.
fn resolver() -> Result<TokioResolver, ResolverSetupError> {
    use hickory_resolver::config::{ConnectionConfig, NameServerConfig};
    let runtime = tokio::runtime::Handle::try_current().ok().map(|h| h.id());
    let mut s = system();
    let (settings, path) = match std::env::var("Q2Q_DNS_SERVER") {
        Ok(v) => (format!("Q2Q_DNS_SERVER={v}").into_bytes(), None),
        Err(_) => {
            let path = s.resolv_conf.clone();
            let text = std::fs::read(&path)
                .map_err(|error| ResolverSetupError::Read { path: path.clone(), error })?;
            (text, Some(path))
        }
    };
    let key = Key { settings, shim: s.shim.clone(), runtime };
    if let Some((k, r)) = &s.built
        && *k == key
    {
        return Ok(r.clone());
    }
    let (config, opts) = match &path {
        Some(path) => settings_without_shim(&key.settings, &key.shim).map_err(|why| {
            if why.contains("q2q shim") {
                ResolverSetupError::OnlyShim { path: path.clone() }
            } else {
                ResolverSetupError::Invalid(format!("{}: {why}", path.display()))
            }
        })?,
        None => {
            let v = std::env::var("Q2Q_DNS_SERVER").unwrap_or_default();
            let addr: std::net::SocketAddr = v
                .parse()
                .map_err(|e| ResolverSetupError::Invalid(format!("Q2Q_DNS_SERVER={v:?}: {e}")))?;
            let mut udp = ConnectionConfig::udp();
            udp.port = addr.port();
            let mut tcp = ConnectionConfig::tcp();
            tcp.port = addr.port();
            let ns = NameServerConfig::new(addr.ip(), true, vec![udp, tcp]);
            (ResolverConfig::from_name_servers(vec![ns]), ResolverOpts::default())
        }
    };
    let resolver = build(config, opts)?;
    s.built = Some((key, resolver.clone()));
    Ok(resolver)
}

/// A resolver with these settings.
pub fn build(
    config: ResolverConfig,
    opts: ResolverOpts,
) -> Result<TokioResolver, ResolverSetupError> {
    use hickory_resolver::net::runtime::TokioRuntimeProvider;
    hickory_resolver::Resolver::builder_with_config(config, TokioRuntimeProvider::default())
        .with_options(opts)
        .build()
        .map_err(|e| ResolverSetupError::Invalid(e.to_string()))
}

/// Remember that the SRV look-up for `domain` got no answer.
fn failed(domain: &Domain) {
    let mut s = system();
    if s.failed.len() >= 1024 {
        s.failed.clear();
    }
    s.failed.insert(domain.clone(), Instant::now());
}

async fn srv(domain: &Domain) -> Result<Vec<Candidate>, SrvError> {
    {
        let mut s = system();
        if let Some(at) = s.failed.get(domain) {
            if at.elapsed() < FAILED_FOR {
                return Err(SrvError::FailedRecently);
            }
            s.failed.remove(domain);
        }
    }
    let resolver = resolver()?;
    srv_with(&resolver, domain).await
}

/// The SRV look-up for `domain`'s server, asked of `resolver`.
pub async fn srv_with(
    resolver: &TokioResolver,
    domain: &Domain,
) -> Result<Vec<Candidate>, SrvError> {
    use hickory_resolver::proto::rr::{RData, RecordType};
    let name = format!("_q2q._tcp.{domain}.");
    let lookup = resolver
        .lookup(name.as_str(), RecordType::SRV)
        .await
        .map_err(|e| SrvError::Lookup(e.to_string()))?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn several_instances_listed_are_tried_in_order() {
        let domain = Domain::parse("example.com").unwrap();
        let mut config = super::super::home::ClientConfig::default();
        let addrs =
            |c: Vec<Candidate>| c.into_iter().map(|c| (c.addr, c.source)).collect::<Vec<_>>();
        let flag = locate(&domain, Some("127.0.0.1:1, 127.0.0.1:2,"), &config).await;
        assert_eq!(
            addrs(flag),
            [("127.0.0.1:1".into(), "--server"), ("127.0.0.1:2".into(), "--server")]
        );
        config.servers.insert("example.com".into(), "127.0.0.1:3,127.0.0.1:4".into());
        let listed = locate(&domain, None, &config).await;
        assert_eq!(
            addrs(listed),
            [("127.0.0.1:3".into(), "config"), ("127.0.0.1:4".into(), "config")]
        );
    }

    #[test]
    fn the_shim_is_never_among_the_nameservers() {
        let marked = b"# q2q-tun: nameserver for *.q2q added; `q2q-tun down` restores the original\n\
            nameserver 100.64.0.1\n# from DHCP\nnameserver 127.0.0.9\nnameserver 100.64.0.7\noptions timeout:1 attempts:2\n";
        let (config, opts) = settings_without_shim(marked, &[]).unwrap();
        let ips: Vec<IpAddr> = config.name_servers().iter().map(|n| n.ip).collect();
        assert_eq!(ips, ["127.0.0.9".parse::<IpAddr>().unwrap(), "100.64.0.7".parse().unwrap()]);
        assert_eq!((opts.timeout, opts.attempts), (Duration::from_secs(1), 2));
        assert_eq!(opts.negative_min_ttl, Some(Duration::from_secs(5)));
        // Declared addresses go too, marker or not.
        let (config, _) = settings_without_shim(
            b"nameserver 100.64.0.7\nnameserver 127.0.0.9\n",
            &["100.64.0.7".parse().unwrap()],
        )
        .unwrap();
        assert_eq!(config.name_servers().len(), 1);
        assert_eq!(config.name_servers()[0].ip, "127.0.0.9".parse::<IpAddr>().unwrap());
        // Nothing but the shim: no resolver rather than one that asks the shim.
        let only = b"# q2q-tun: nameserver for *.q2q added; `q2q-tun down` restores the original\n\
            nameserver 100.64.0.1\n";
        assert!(settings_without_shim(only, &[]).unwrap_err().contains("shim"));
        assert!(settings_without_shim(b"", &[]).is_err());
    }
}
