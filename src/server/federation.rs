//! Other domains' CAs, for verifying callers from other domains: learned from that domain's
//! server through a TLS handshake on first need and pinned (trust on first use), in the data
//! directory's `federation/` folder, which has the client's layout: `known_cas/<domain>.pem`
//! (pre-seed it, or pin up front, to skip trust on first use) and `config.toml` with
//! `[servers]` overrides.
//!
//! A stranger picks the domain (a self-signed certificate for `x@their.domain` is enough),
//! so a fetch is a connection to an address of the stranger's choosing. It is made only
//!
//! - for a well-formed q2q certificate of that domain (one `q2q:` address, not a CA, not
//!   self-signed, valid now),
//! - to public unicast addresses ([`public_unicast`]) or networks the operator allows
//!   (`federation_allow`): the name is resolved first and the address checked is the one
//!   connected to, so DNS cannot swap it in between,
//! - within a rate per source address and over all ([`Buckets`]), and not again for
//!   [`FAILED_FOR`] after a failure (a bounded negative cache).
//!
//! Whatever failed, the client hears one sentence, [`CannotVerify`]: never the connect
//! error, the state of a port or the name another server presents. The log has the reason.

use super::config::Network;
use super::ratelimit::Buckets;
use crate::address::Domain;
use crate::client::{ConnectOptions, Home, ServerConn};
use ipnet::IpNet;
use rustls_pki_types::CertificateDer;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};

/// How long a domain whose CA could not be fetched is not tried again.
pub const FAILED_FOR: Duration = Duration::from_secs(60);
/// Most domains remembered as failed; past this the oldest are forgotten.
const MAX_FAILED: usize = 4096;
/// Most CAs kept in memory.
const MAX_CACHED: usize = 4096;
/// Fetches one source address may cause: this many at once, then one a minute.
const PER_SOURCE: (u32, f64) = (5, 1.0 / 60.0);
/// Fetches over all sources: this many at once, then one a second.
const OVERALL: (u32, f64) = (30, 1.0);
/// Most other domains' CAs pinned on disk: past it no new domain is pinned (a stranger who
/// names a new domain every second would otherwise fill the disk, 86,400 files a day).
const MAX_PINNED: usize = 10_000;
/// The longest a fetch may take, resolving and every address tried included.
const FETCH_TIMEOUT: Duration = Duration::from_secs(15);
/// Clock skew tolerated when checking a certificate's validity before a fetch.
const SKEW: i64 = 300;

/// What the client hears when the CA of a domain cannot be had, whatever the reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot verify domain {domain}")]
pub struct CannotVerify {
    pub domain: Domain,
    /// Why, for the log only.
    pub reason: Reason,
}

/// Why a domain's CA could not be had (logged, never sent).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Reason {
    /// The certificate is not one a q2q CA of that domain issues.
    #[error("not a well-formed q2q certificate: {0}")]
    NotWellFormed(&'static str),
    /// A fetch for this domain failed less than [`FAILED_FOR`] ago.
    #[error("failed a moment ago")]
    FailedRecently,
    /// The source address, or all sources together, caused too many fetches.
    #[error("too many fetches")]
    RateLimited,
    /// Every address the domain's server has is one the policy refuses.
    #[error("no address allowed to connect to (refused {0})")]
    NotPublic(String),
    /// No allowed address answered as the domain's server.
    #[error("unreachable: {0}")]
    Unreachable(String),
    /// The data directory's federation folder could not be read.
    #[error("{0}")]
    Local(String),
}

/// Which addresses the server may connect to for a fetch.
#[derive(Debug, Clone, Default)]
pub struct AddressPolicy {
    /// Networks allowed although not public unicast.
    pub allow: Vec<Network>,
}

impl AddressPolicy {
    pub fn permits(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.allow.iter().any(|n| n.contains(ip)) || public_unicast(ip)
    }
}

/// Networks that are not public unicast: unspecified, "this network", loopback, private
/// (RFC 1918, ULA), link-local, shared (RFC 6598), IETF protocol assignments, documentation,
/// benchmarking, reserved, multicast, broadcast, discard-only.
const NOT_PUBLIC: &[&str] = &[
    "0.0.0.0/8",
    "10.0.0.0/8",
    "100.64.0.0/10",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "172.16.0.0/12",
    "192.0.0.0/24",
    "192.0.2.0/24",
    "192.168.0.0/16",
    "198.18.0.0/15",
    "198.51.100.0/24",
    "203.0.113.0/24",
    "224.0.0.0/4",
    "240.0.0.0/4",
    "::/128",
    "::1/128",
    "100::/64",
    "2001:db8::/32",
    "fc00::/7",
    "fe80::/10",
    "fec0::/10",
    "ff00::/8",
];

static NOT_PUBLIC_NETS: LazyLock<Vec<IpNet>> = LazyLock::new(|| {
    NOT_PUBLIC.iter().map(|s| s.parse().expect("NOT_PUBLIC holds CIDR literals")).collect()
});

/// Whether `ip` is a public unicast address. IPv4 addresses embedded in IPv6 (mapped,
/// NAT64 `64:ff9b::/96`, 6to4 `2002::/16`) are judged by the IPv4 address.
pub fn public_unicast(ip: IpAddr) -> bool {
    let ip = ip.to_canonical();
    if let IpAddr::V6(v6) = ip {
        let s = v6.segments();
        let embedded = match s {
            [0x64, 0xff9b, 0, 0, 0, 0, _, _] => Some(v6.octets()[12..16].try_into()),
            [0x2002, ..] => Some(v6.octets()[2..6].try_into()),
            _ => None,
        };
        if let Some(v4) = embedded {
            return v4.is_ok_and(|o: [u8; 4]| public_unicast(IpAddr::from(o)));
        }
    }
    !NOT_PUBLIC_NETS.iter().any(|n| n.contains(&ip))
}

/// Whether `cert` is one a q2q CA of `domain` would issue, as far as can be told without
/// that CA: one `q2q:` address of `domain`, not a CA, not self-signed, valid at `now`
/// (seconds since the epoch, with [`SKEW`] either way).
pub fn well_formed(cert: &[u8], domain: &Domain, now: i64) -> Result<(), Reason> {
    use x509_parser::prelude::{FromDer, X509Certificate};
    let info =
        crate::identity::CertInfo::parse(cert).map_err(|_| Reason::NotWellFormed("not X.509"))?;
    match &info.address {
        Some(a) if a.domain == *domain => {}
        _ => return Err(Reason::NotWellFormed("no q2q address of that domain")),
    }
    if info.is_ca {
        return Err(Reason::NotWellFormed("a CA certificate"));
    }
    if now + SKEW < info.not_before || now - SKEW > info.not_after {
        return Err(Reason::NotWellFormed("not valid now"));
    }
    let (_, x) = X509Certificate::from_der(cert).map_err(|_| Reason::NotWellFormed("not X.509"))?;
    if x.issuer() == x.subject() {
        return Err(Reason::NotWellFormed("self-signed"));
    }
    Ok(())
}

/// What the federation remembers, as a value (`now` passed in), owned by one task
/// ([`Federation`]): the CAs in memory, the domains that failed, the fetch budgets, and the
/// CA fetches under way with whoever waits for each (one fetch per domain at a time).
struct Ledger {
    cache: HashMap<Domain, CertificateDer<'static>>,
    failed: HashMap<Domain, Instant>,
    per_source: Buckets,
    overall: Buckets,
    fetching: HashMap<Domain, Vec<oneshot::Sender<Fetched>>>,
}

/// The end of a CA fetch, as every waiter hears it.
type Fetched = Result<CertificateDer<'static>, Reason>;

impl Default for Ledger {
    fn default() -> Self {
        Ledger {
            cache: HashMap::new(),
            failed: HashMap::new(),
            per_source: Buckets::new(PER_SOURCE.0, PER_SOURCE.1),
            overall: Buckets::new(OVERALL.0, OVERALL.1),
            fetching: HashMap::new(),
        }
    }
}

impl Ledger {
    /// May `source` cause a fetch for `domain` now? Spends a token of its bucket and the
    /// overall one.
    fn admit(&mut self, domain: &Domain, source: IpAddr, now: Instant) -> Result<(), Reason> {
        if let Some(at) = self.failed.get(domain) {
            if now.saturating_duration_since(*at) < FAILED_FOR {
                return Err(Reason::FailedRecently);
            }
            self.failed.remove(domain);
        }
        let key = super::admission::source_key(source).to_string();
        if !self.per_source.wait(&key, now).is_zero() || !self.overall.wait("", now).is_zero() {
            return Err(Reason::RateLimited);
        }
        self.per_source.take(&key, now);
        self.overall.take("", now);
        Ok(())
    }

    fn remember_failure(&mut self, domain: &Domain, now: Instant) {
        let f = &mut self.failed;
        if f.len() >= MAX_FAILED {
            f.retain(|_, at| now.saturating_duration_since(*at) < FAILED_FOR);
        }
        if f.len() >= MAX_FAILED
            && let Some(oldest) = f.iter().min_by_key(|(_, at)| **at).map(|(d, _)| d.clone())
        {
            f.remove(&oldest);
        }
        f.insert(domain.clone(), now);
    }

    fn cache(&mut self, domain: Domain, ca: CertificateDer<'static>) {
        // Bounded: the pinned files stay, and are read again when needed.
        if self.cache.len() >= MAX_CACHED {
            self.cache.clear();
        }
        self.cache.insert(domain, ca);
    }

    /// Join the fetch of `domain`'s CA under way, or start one if `source` may cause it
    /// (then the caller must fetch, and report with [`Ledger::fetched`]).
    fn join(&mut self, domain: &Domain, source: IpAddr, now: Instant) -> Join {
        let (tx, rx) = oneshot::channel();
        if let Some(waiting) = self.fetching.get_mut(domain) {
            waiting.push(tx);
            return Join::Wait(rx);
        }
        match self.admit(domain, source, now) {
            Ok(()) => {
                self.fetching.insert(domain.clone(), vec![tx]);
                Join::Fetch(rx)
            }
            Err(reason) => Join::Refused(reason),
        }
    }

    /// A CA fetch ended: every waiter hears how. `remember`: a failure of the domain's
    /// (not of ours) is not tried again for [`FAILED_FOR`].
    fn fetched(&mut self, domain: Domain, result: Fetched, remember: bool, now: Instant) {
        match &result {
            Ok(ca) => self.cache(domain.clone(), ca.clone()),
            Err(_) if remember => self.remember_failure(&domain, now),
            Err(_) => {}
        }
        for tx in self.fetching.remove(&domain).unwrap_or_default() {
            let _ = tx.send(result.clone());
        }
    }
}

/// The answer to [`Ledger::join`].
enum Join {
    /// Fetch it (on a task of its own), then wait like the others.
    Fetch(oneshot::Receiver<Fetched>),
    /// Another asker's fetch is under way: wait for it.
    Wait(oneshot::Receiver<Fetched>),
    Refused(Reason),
}

/// What handlers ask the ledger's owner.
enum Request {
    Cached { domain: Domain, reply: oneshot::Sender<Option<CertificateDer<'static>>> },
    Cache { domain: Domain, ca: CertificateDer<'static> },
    Join { domain: Domain, source: IpAddr, reply: oneshot::Sender<Join> },
    Fetched { domain: Domain, result: Fetched, remember: bool },
    Admit { domain: Domain, source: IpAddr, reply: oneshot::Sender<Result<(), Reason>> },
    Failed { domain: Domain },
}

/// Requests that may wait for the owner at once; more make their handler wait.
const QUEUE: usize = 1024;

/// The owner of the ledger: answers requests in order until every handle is gone.
async fn own(mut ledger: Ledger, mut requests: mpsc::Receiver<Request>) {
    while let Some(r) = requests.recv().await {
        let now = Instant::now();
        match r {
            Request::Cached { domain, reply } => {
                let _ = reply.send(ledger.cache.get(&domain).cloned());
            }
            Request::Cache { domain, ca } => ledger.cache(domain, ca),
            Request::Join { domain, source, reply } => {
                let _ = reply.send(ledger.join(&domain, source, now));
            }
            Request::Fetched { domain, result, remember } => {
                ledger.fetched(domain, result, remember, now)
            }
            Request::Admit { domain, source, reply } => {
                let _ = reply.send(ledger.admit(&domain, source, now));
            }
            Request::Failed { domain } => ledger.remember_failure(&domain, now),
        }
    }
}

/// Where and how fetches go: the federation folder and the address policy.
struct Fetcher {
    home: Home,
    policy: AddressPolicy,
    max_pinned: usize,
}

/// The federated CAs a server knows, and the limits on learning more: a handle to the task
/// that owns the [`Ledger`] (handlers ask it through a bounded channel), and the fetcher.
pub struct Federation {
    fetcher: Arc<Fetcher>,
    requests: mpsc::Sender<Request>,
}

impl Federation {
    /// A federation learning into `home`'s folder, under `policy`; its owner started on
    /// the current runtime.
    pub fn new(home: Home, policy: AddressPolicy) -> Federation {
        let (requests, rx) = mpsc::channel(QUEUE);
        tokio::spawn(own(Ledger::default(), rx));
        Federation { fetcher: Arc::new(Fetcher { home, policy, max_pinned: MAX_PINNED }), requests }
    }

    async fn ask<T>(&self, request: impl FnOnce(oneshot::Sender<T>) -> Request) -> Option<T> {
        super::ask_owner(&self.requests, request).await
    }

    /// The CA of `domain`, to check `cert` (a certificate presented from `source`): cached,
    /// pinned, or fetched from its server and pinned. Askers for one domain at once share
    /// one fetch.
    pub async fn ca_for(
        &self,
        domain: &Domain,
        cert: &[u8],
        source: IpAddr,
    ) -> Result<CertificateDer<'static>, CannotVerify> {
        let fail = |reason: Reason| {
            match reason {
                // Fetches that failed (rate-limited themselves): worth the operator's eye.
                Reason::NotPublic(_) | Reason::Unreachable(_) | Reason::Local(_) => {
                    tracing::warn!(%domain, %source, %reason, "cannot verify a federated domain")
                }
                // Refused before any fetch: as often as a stranger likes, so not loud.
                _ => tracing::debug!(%domain, %source, %reason, "cannot verify a federated domain"),
            }
            CannotVerify { domain: domain.clone(), reason }
        };
        let d = domain.clone();
        if let Some(ca) = self.ask(|reply| Request::Cached { domain: d, reply }).await.flatten() {
            return Ok(ca);
        }
        let pinned =
            self.fetcher.home.pinned_ca(domain).map_err(|e| fail(Reason::Local(e.to_string())))?;
        if let Some(ca) = pinned {
            let request = Request::Cache { domain: domain.clone(), ca: ca.clone() };
            let _ = self.requests.send(request).await;
            return Ok(ca);
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        well_formed(cert, domain, now).map_err(fail)?;
        let d = domain.clone();
        let join = self.ask(|reply| Request::Join { domain: d, source, reply }).await;
        let wait = match join {
            None => return Err(fail(Reason::Local("the federation task is gone".into()))),
            Some(Join::Refused(reason)) => return Err(fail(reason)),
            Some(Join::Wait(rx)) => rx,
            Some(Join::Fetch(rx)) => {
                // On a task of its own: it ends (and is reported to every waiter) even if
                // this asker's connection goes meanwhile.
                let (fetcher, requests, domain) =
                    (self.fetcher.clone(), self.requests.clone(), domain.clone());
                tokio::spawn(async move {
                    let (result, remember) = match fetcher.room_to_pin() {
                        Err(reason) => (Err(reason), false),
                        Ok(()) => {
                            let fetched =
                                tokio::time::timeout(FETCH_TIMEOUT, fetcher.fetch(&domain))
                                    .await
                                    .unwrap_or_else(|_| {
                                        Err(Reason::Unreachable("timed out".into()))
                                    });
                            if let Ok(ca) = &fetched {
                                tracing::info!(%domain, ca = %crate::identity::Fingerprint::of(ca), "pinned a federated domain's CA");
                            }
                            (fetched, true)
                        }
                    };
                    let _ = requests.send(Request::Fetched { domain, result, remember }).await;
                });
                rx
            }
        };
        match wait.await {
            Ok(result) => result.map_err(fail),
            Err(_) => Err(fail(Reason::Local("the federation task is gone".into()))),
        }
    }

    /// The revocation list of `domain` (DER, as its server sent it: the caller verifies
    /// it with the domain's CA), fetched for a caller at `source` under the same address
    /// policy, rate limits, timeout and negative cache as a CA. (One fetch per domain at
    /// a time is [`crate::identity::revocation::Lists`]' part.)
    pub async fn revocation_list(
        &self,
        domain: &Domain,
        source: IpAddr,
    ) -> Result<Vec<u8>, CannotVerify> {
        let fail = |reason: Reason| {
            tracing::warn!(%domain, %source, %reason, "cannot fetch a federated domain's revocation list");
            CannotVerify { domain: domain.clone(), reason }
        };
        let d = domain.clone();
        let admitted = self.ask(|reply| Request::Admit { domain: d, source, reply }).await;
        admitted.unwrap_or(Err(Reason::RateLimited)).map_err(fail)?;
        let fetch = async {
            let conn = self.fetcher.connect(domain).await?;
            conn.revocations(domain).await.map_err(|e| Reason::Unreachable(e.to_string()))
        };
        let result = tokio::time::timeout(FETCH_TIMEOUT, fetch)
            .await
            .unwrap_or_else(|_| Err(Reason::Unreachable("timed out".into())));
        if result.is_err() {
            let _ = self.requests.send(Request::Failed { domain: domain.clone() }).await;
        }
        result.map_err(fail)
    }
}

impl Fetcher {
    /// Whether another domain's CA may still be pinned ([`MAX_PINNED`]).
    fn room_to_pin(&self) -> Result<(), Reason> {
        if self.home.pinned_count() >= self.max_pinned {
            return Err(Reason::Local(format!(
                "{} domains' CAs are pinned already (the most kept): remove some from known_cas",
                self.max_pinned
            )));
        }
        Ok(())
    }

    async fn fetch(&self, domain: &Domain) -> Result<CertificateDer<'static>, Reason> {
        Ok(self.connect(domain).await?.ca)
    }

    /// Find `domain`'s server as a client would (config, SRV, default port; but not the
    /// default port when there are SRV records), resolve each place, and connect only to
    /// the addresses the policy permits.
    async fn connect(&self, domain: &Domain) -> Result<ServerConn, Reason> {
        let config = self.home.config().map_err(|e| Reason::Local(e.to_string()))?;
        let mut candidates = crate::client::discover::locate(domain, None, &config).await;
        // With SRV records, the domain's own name is not a server (RFC 2782): not tried.
        if candidates.iter().any(|c| c.source == "DNS SRV") {
            candidates.retain(|c| c.source == "DNS SRV");
        }
        let (mut refused, mut failures) = (Vec::<SocketAddr>::new(), Vec::new());
        for candidate in candidates {
            let addrs: Vec<SocketAddr> =
                match tokio::net::lookup_host(candidate.addr.as_str()).await {
                    Ok(a) => a.collect(),
                    Err(e) => {
                        failures.push(format!("{} ({}): {e}", candidate.addr, candidate.source));
                        continue;
                    }
                };
            for addr in addrs {
                if !self.policy.permits(addr.ip()) {
                    refused.push(addr);
                    continue;
                }
                let opts = ConnectOptions { server: Some(addr.to_string()), ..Default::default() };
                match ServerConn::connect(&self.home, domain, &opts).await {
                    Ok(conn) => return Ok(conn),
                    Err(e) => failures.push(format!("{addr}: {e}")),
                }
            }
        }
        if failures.is_empty() && !refused.is_empty() {
            let list: Vec<String> = refused.iter().map(ToString::to_string).collect();
            return Err(Reason::NotPublic(list.join(", ")));
        }
        Err(Reason::Unreachable(failures.join("; ")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    /// An IPv4 address from its octets (addresses here are only classified, never used).
    fn v4(o: [u8; 4]) -> IpAddr {
        IpAddr::from(o)
    }

    /// The IPv4-mapped IPv6 address (`::ffff:a.b.c.d`) of these octets.
    fn mapped(o: [u8; 4]) -> IpAddr {
        IpAddr::V6(std::net::Ipv4Addr::from(o).to_ipv6_mapped())
    }

    #[test]
    fn only_public_unicast_unless_allowed() {
        for bad in [
            v4([0, 0, 0, 0]),
            v4([127, 0, 0, 1]),
            v4([127, 9, 9, 9]),
            v4([10, 1, 2, 3]),
            v4([172, 16, 0, 1]),
            v4([172, 31, 255, 255]),
            v4([192, 168, 1, 1]),
            v4([169, 254, 169, 254]),
            v4([100, 64, 0, 1]),
            v4([100, 127, 255, 255]),
            v4([192, 0, 2, 1]),
            v4([198, 51, 100, 1]),
            v4([203, 0, 113, 9]),
            v4([198, 18, 0, 1]),
            v4([224, 0, 0, 1]),
            v4([239, 255, 255, 250]),
            v4([255, 255, 255, 255]),
            ip("::"),
            ip("::1"),
            ip("fd00::1"),
            ip("fe80::1"),
            ip("ff02::1"),
            ip("2001:db8::1"),
            mapped([127, 0, 0, 1]),
            mapped([10, 0, 0, 1]),
            ip("64:ff9b::a00:1"),
            ip("2002:c0a8:101::1"),
        ] {
            assert!(!public_unicast(bad), "{bad} is not public");
            assert!(!AddressPolicy::default().permits(bad), "{bad} refused by default");
        }
        for good in [
            v4([1, 1, 1, 1]),
            v4([8, 8, 8, 8]),
            v4([172, 32, 0, 1]),
            v4([100, 128, 0, 1]),
            ip("2606:4700::1111"),
            mapped([1, 1, 1, 1]),
            ip("64:ff9b::101:101"),
        ] {
            assert!(public_unicast(good), "{good} is public");
        }
        let lab = AddressPolicy {
            allow: vec![
                Network::parse("198.51.100.0/24").unwrap(),
                Network::parse("127.0.0.0/8").unwrap(),
            ],
        };
        assert!(lab.permits(v4([198, 51, 100, 1])));
        assert!(lab.permits(v4([127, 0, 0, 1])));
        assert!(lab.permits(mapped([127, 0, 0, 1])));
        assert!(!lab.permits(v4([192, 0, 2, 1])));
        assert!(!lab.permits(ip("::1")));
        assert!(lab.permits(v4([1, 1, 1, 1])));
    }

    #[test]
    fn only_well_formed_certificates() {
        use crate::address::Q2qAddress;
        use crate::identity::{DomainCa, generate_key, signing_request};
        let d = Domain::parse("a.example").unwrap();
        let ca = DomainCa::generate(&d).unwrap();
        let alice = Q2qAddress::parse("alice@a.example").unwrap();
        let csr = signing_request(&generate_key().unwrap()).unwrap();
        let cert = ca.issue_user(&alice, &csr, Duration::from_secs(3600)).unwrap().der;
        let now =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()
                as i64;
        assert_eq!(well_formed(&cert, &d, now), Ok(()));
        let other = Domain::parse("b.example").unwrap();
        assert!(well_formed(&cert, &other, now).is_err(), "another domain's address");
        assert!(well_formed(&cert, &d, now + 7200).is_err(), "expired");
        assert!(well_formed(&cert, &d, now - 7200).is_err(), "not yet valid");
        assert!(well_formed(ca.cert_der(), &d, now).is_err(), "a CA");
        assert!(well_formed(b"garbage", &d, now).is_err());
        // Self-signed, with a q2q address.
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(rcgen::DnType::CommonName, "alice@a.example");
        params.subject_alt_names =
            vec![rcgen::SanType::URI("q2q:alice@a.example".try_into().unwrap())];
        let key = generate_key().unwrap();
        let selfsigned = params.self_signed(&key).unwrap();
        assert_eq!(
            well_formed(selfsigned.der(), &d, now),
            Err(Reason::NotWellFormed("self-signed"))
        );
    }

    #[test]
    fn pinning_stops_at_the_most_kept() {
        let dir = tempfile::tempdir().unwrap();
        let home = Home::new(dir.path().join("f"));
        let f = Fetcher { home: home.clone(), policy: AddressPolicy::default(), max_pinned: 2 };
        let key = crate::identity::generate_key().unwrap();
        let ca =
            rcgen::CertificateParams::new(Vec::<String>::new()).unwrap().self_signed(&key).unwrap();
        for (i, d) in ["a.example", "b.example"].into_iter().enumerate() {
            assert_eq!(f.room_to_pin(), Ok(()), "{i} pinned");
            home.pin_ca(&Domain::parse(d).unwrap(), ca.der()).unwrap();
        }
        assert!(matches!(f.room_to_pin(), Err(Reason::Local(_))));
        home.forget_ca(&Domain::parse("a.example").unwrap()).unwrap();
        assert_eq!(f.room_to_pin(), Ok(()));
    }

    #[test]
    fn fetches_are_limited_and_failures_remembered() {
        let mut f = Ledger::default();
        let t0 = Instant::now();
        let src = ip("192.0.2.7");
        let domains: Vec<Domain> =
            (0..10).map(|i| Domain::parse(&format!("d{i}.example")).unwrap()).collect();
        for d in &domains[..PER_SOURCE.0 as usize] {
            assert_eq!(f.admit(d, src, t0), Ok(()));
        }
        assert_eq!(f.admit(&domains[9], src, t0), Err(Reason::RateLimited));
        assert_eq!(f.admit(&domains[9], ip("192.0.2.8"), t0), Ok(()), "another source");
        assert_eq!(f.admit(&domains[9], src, t0 + Duration::from_secs(60)), Ok(()));
        // A failed domain is not tried again for a while, by anyone.
        f.remember_failure(&domains[0], t0);
        assert_eq!(f.admit(&domains[0], ip("192.0.2.9"), t0), Err(Reason::FailedRecently));
        assert_eq!(f.admit(&domains[0], ip("192.0.2.9"), t0 + FAILED_FOR), Ok(()));
        // The negative cache stays bounded.
        for i in 0..MAX_FAILED + 10 {
            f.remember_failure(&Domain::parse(&format!("x{i}.example")).unwrap(), t0);
        }
        assert!(f.failed.len() <= MAX_FAILED);
    }

    /// Askers for one domain at once share one fetch (one token spent, one connection),
    /// and all hear its end; a failure is remembered, and the next asker is refused
    /// without a fetch.
    #[test]
    fn one_fetch_per_domain_at_a_time() {
        let mut f = Ledger::default();
        let t0 = Instant::now();
        let d = Domain::parse("new.example").unwrap();
        let Join::Fetch(mut first) = f.join(&d, ip("192.0.2.1"), t0) else { panic!("no fetch") };
        let mut waiters = Vec::new();
        for i in 2..40u8 {
            match f.join(&d, ip(&format!("192.0.2.{i}")), t0) {
                Join::Wait(rx) => waiters.push(rx),
                _ => panic!("a second fetch of one domain"),
            }
        }
        // Only the first asker spent a token: its source can still ask 4 more times.
        for i in 0..PER_SOURCE.0 - 1 {
            assert_eq!(
                f.admit(&Domain::parse(&format!("o{i}.example")).unwrap(), ip("192.0.2.1"), t0),
                Ok(())
            );
        }
        f.fetched(d.clone(), Err(Reason::Unreachable("refused".into())), true, t0);
        assert!(matches!(first.try_recv(), Ok(Err(Reason::Unreachable(_)))));
        for mut w in waiters {
            assert!(matches!(w.try_recv(), Ok(Err(Reason::Unreachable(_)))));
        }
        assert!(matches!(f.join(&d, ip("192.0.2.99"), t0), Join::Refused(Reason::FailedRecently)));
        // A fetch that worked is cached for everyone.
        let e = Domain::parse("ok.example").unwrap();
        let Join::Fetch(mut rx) = f.join(&e, ip("192.0.2.50"), t0) else { panic!("no fetch") };
        let ca = CertificateDer::from(vec![1, 2, 3]);
        f.fetched(e.clone(), Ok(ca.clone()), true, t0);
        assert_eq!(rx.try_recv().unwrap(), Ok(ca.clone()));
        assert_eq!(f.cache.get(&e), Some(&ca));
        assert!(f.fetching.is_empty());
    }
}
