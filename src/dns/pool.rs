//! The virtual address pool: which IPv4 and IPv6 address stands for which person.
//!
//! ```text
//!   index:   0          1            2 ..= size-2               size-1
//!   IPv4:    network    the node     people (first lookup)      broadcast
//!   IPv6:    prefix::0  prefix::1    prefix::2 ..               (unused)
//! ```
//!
//! A mapping holds one *index* and so one address of each family: `alice@example.com` is
//! `100.64.0.2` and `fd71:7132::2` together. Index 1 is the node's own interface address
//! ([`Pool::node_ipv4`]); the network and broadcast addresses are never handed out.
//!
//! A name gets its index on first lookup and keeps it: lookups (and [`Pool::touch`], which the
//! netstack calls for traffic) refresh a mapping's `last_used`, and a mapping is reclaimed only
//! when the pool is full *and* it has been idle longer than [`PoolConfig::keep_idle_secs`]
//! (least recently used first). Short DNS TTLs and long-lived mappings mean a cached answer
//! never points at someone else.
//!
//! Sans-IO: every call that needs the time takes `now`. [`Pool::to_toml`] and
//! [`Pool::from_toml`] let the daemon keep mappings across restarts (it writes the file
//! atomically whenever [`Pool::take_dirty`] says something changed).

use crate::address::Q2qAddress;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;
use std::time::{SystemTime, UNIX_EPOCH};

/// Index of the node's own interface address.
const NODE_INDEX: u32 = 1;
/// First index handed out to people.
const FIRST_INDEX: u32 = 2;

/// Why a prefix, the pool or its saved state is unusable.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// A prefix that is not `address/length` or has host bits set.
    #[error("`{0}` is not a valid prefix: expected a network like 100.64.0.0/10 or fd71:7132::/64")]
    BadPrefix(String),
    /// The IPv4 prefix leaves room for nobody but the node.
    #[error("the IPv4 pool /{0} is too small: use a prefix of length 30 or shorter")]
    Ipv4TooSmall(u8),
    /// The IPv6 prefix has fewer host addresses than the IPv4 one (each index needs both).
    #[error(
        "the IPv6 pool /{v6} is smaller than the IPv4 pool /{v4}: it needs at least {need} host bits"
    )]
    Ipv6TooSmall { v4: u8, v6: u8, need: u8 },
    /// Every address is in use and none has been idle long enough to reclaim.
    #[error("the virtual address pool is full ({0} mappings, none idle long enough to reclaim)")]
    Exhausted(usize),
    /// The saved mappings are not valid TOML of the expected shape.
    #[error("saved address mappings are unreadable: {0}")]
    BadState(#[from] Box<toml::de::Error>),
}

/// An IPv4 network: address with host bits clear, and prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Ipv4Prefix {
    network: Ipv4Addr,
    len: u8,
}

/// An IPv6 network: address with host bits clear, and prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Ipv6Prefix {
    network: Ipv6Addr,
    len: u8,
}

fn split_prefix(s: &str) -> Option<(&str, u8)> {
    let (a, l) = s.split_once('/')?;
    if l.is_empty() || l.len() > 3 || !l.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((a, l.parse().ok()?))
}

impl Ipv4Prefix {
    pub fn new(network: Ipv4Addr, len: u8) -> Result<Ipv4Prefix, PoolError> {
        let bad = || PoolError::BadPrefix(format!("{network}/{len}"));
        if len > 32 {
            return Err(bad());
        }
        let host_mask = u32::MAX.checked_shr(u32::from(len)).unwrap_or(0);
        if u32::from(network) & host_mask != 0 {
            return Err(bad());
        }
        Ok(Ipv4Prefix { network, len })
    }
    pub fn network(&self) -> Ipv4Addr {
        self.network
    }
    pub fn prefix_len(&self) -> u8 {
        self.len
    }
    /// Number of addresses (2^(32-len)).
    fn size(&self) -> u64 {
        1u64 << (32 - u32::from(self.len))
    }
    /// The index of `ip` inside this network, if it is inside.
    fn index_of(&self, ip: Ipv4Addr) -> Option<u64> {
        let off = u32::from(ip).wrapping_sub(u32::from(self.network));
        (u64::from(off) < self.size()).then_some(u64::from(off))
    }
    fn at(&self, index: u32) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network).wrapping_add(index))
    }
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        self.index_of(ip).is_some()
    }
}

impl Ipv6Prefix {
    pub fn new(network: Ipv6Addr, len: u8) -> Result<Ipv6Prefix, PoolError> {
        let bad = || PoolError::BadPrefix(format!("{network}/{len}"));
        if len > 128 {
            return Err(bad());
        }
        let host_mask = u128::MAX.checked_shr(u32::from(len)).unwrap_or(0);
        if u128::from(network) & host_mask != 0 {
            return Err(bad());
        }
        Ok(Ipv6Prefix { network, len })
    }
    pub fn network(&self) -> Ipv6Addr {
        self.network
    }
    pub fn prefix_len(&self) -> u8 {
        self.len
    }
    fn index_of(&self, ip: Ipv6Addr) -> Option<u128> {
        let host_mask = u128::MAX.checked_shr(u32::from(self.len)).unwrap_or(0);
        let ip = u128::from(ip);
        (ip & !host_mask == u128::from(self.network)).then_some(ip & host_mask)
    }
    fn at(&self, index: u32) -> Ipv6Addr {
        Ipv6Addr::from(u128::from(self.network) | u128::from(index))
    }
    pub fn contains(&self, ip: Ipv6Addr) -> bool {
        self.index_of(ip).is_some()
    }
}

impl FromStr for Ipv4Prefix {
    type Err = PoolError;
    fn from_str(s: &str) -> Result<Self, PoolError> {
        let bad = || PoolError::BadPrefix(s.to_string());
        let (a, l) = split_prefix(s).ok_or_else(bad)?;
        Ipv4Prefix::new(a.parse().map_err(|_| bad())?, l).map_err(|_| bad())
    }
}

impl FromStr for Ipv6Prefix {
    type Err = PoolError;
    fn from_str(s: &str) -> Result<Self, PoolError> {
        let bad = || PoolError::BadPrefix(s.to_string());
        let (a, l) = split_prefix(s).ok_or_else(bad)?;
        Ipv6Prefix::new(a.parse().map_err(|_| bad())?, l).map_err(|_| bad())
    }
}

impl fmt::Display for Ipv4Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.len)
    }
}

impl fmt::Display for Ipv6Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.len)
    }
}

macro_rules! string_serde {
    ($($t:ty),*) => {$(
        impl TryFrom<String> for $t {
            type Error = PoolError;
            fn try_from(s: String) -> Result<Self, PoolError> {
                s.parse()
            }
        }
        impl From<$t> for String {
            fn from(p: $t) -> String {
                p.to_string()
            }
        }
    )*};
}
string_serde!(Ipv4Prefix, Ipv6Prefix);

/// The pool's settings (the `[dns.pool]` part of the daemon's config).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PoolConfig {
    /// IPv4 network for virtual addresses (default 100.64.0.0/10, the shared address space).
    pub ipv4: Ipv4Prefix,
    /// IPv6 network (a ULA) for virtual addresses; at least as many host bits as `ipv4`.
    pub ipv6: Ipv6Prefix,
    /// A mapping idle for longer than this (seconds) may be reclaimed when the pool is full.
    pub keep_idle_secs: u64,
    /// At most this many mappings are kept (memory bound, whatever the prefix size).
    pub max_mappings: usize,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            ipv4: Ipv4Prefix { network: Ipv4Addr::new(100, 64, 0, 0), len: 10 },
            ipv6: Ipv6Prefix { network: Ipv6Addr::new(0xfd71, 0x7132, 0, 0, 0, 0, 0, 0), len: 64 },
            keep_idle_secs: 24 * 3600,
            max_mappings: 65536,
        }
    }
}

impl PoolConfig {
    /// Check that the prefixes leave room for people and agree with each other.
    pub fn check(&self) -> Result<(), PoolError> {
        if self.ipv4.len > 30 {
            return Err(PoolError::Ipv4TooSmall(self.ipv4.len));
        }
        let need = 32 - self.ipv4.len;
        if 128 - self.ipv6.len < need {
            return Err(PoolError::Ipv6TooSmall { v4: self.ipv4.len, v6: self.ipv6.len, need });
        }
        Ok(())
    }

    /// Highest index handed out to a person (the one before broadcast).
    fn last_index(&self) -> u32 {
        // check() guarantees len <= 30, so size is in 4..=2^32.
        u32::try_from(self.ipv4.size() - 2).unwrap_or(u32::MAX - 1)
    }

    /// How many mappings fit.
    fn capacity(&self) -> usize {
        let hosts = (self.last_index() - FIRST_INDEX + 1) as usize;
        hosts.min(self.max_mappings)
    }
}

/// One person's pair of virtual addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mapping {
    pub address: Q2qAddress,
    pub ipv4: Ipv4Addr,
    pub ipv6: Ipv6Addr,
}

#[derive(Debug, Clone)]
struct Entry {
    address: Q2qAddress,
    last_used: u64,
}

/// The mappings (see the module docs).
#[derive(Debug, Clone)]
pub struct Pool {
    config: PoolConfig,
    by_address: HashMap<Q2qAddress, u32>,
    by_index: BTreeMap<u32, Entry>,
    /// (last_used, index): least recently used first.
    lru: BTreeSet<(u64, u32)>,
    /// Where the search for a free index starts (so freed addresses are reused last).
    next: u32,
    dirty: bool,
}

fn secs(now: SystemTime) -> u64 {
    now.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// The saved form.
#[derive(Serialize, Deserialize)]
struct State {
    #[serde(default)]
    next: u32,
    #[serde(default, rename = "mapping")]
    mappings: Vec<Saved>,
}

#[derive(Serialize, Deserialize)]
struct Saved {
    address: String,
    ipv4: Ipv4Addr,
    ipv6: Ipv6Addr,
    /// Seconds since the Unix epoch.
    last_used: u64,
}

impl Pool {
    /// An empty pool.
    pub fn new(config: PoolConfig) -> Result<Pool, PoolError> {
        config.check()?;
        Ok(Pool {
            config,
            by_address: HashMap::new(),
            by_index: BTreeMap::new(),
            lru: BTreeSet::new(),
            next: FIRST_INDEX,
            dirty: false,
        })
    }

    pub fn config(&self) -> &PoolConfig {
        &self.config
    }

    /// The node's own interface address (the first of the pool); never given to anyone.
    pub fn node_ipv4(&self) -> Ipv4Addr {
        self.config.ipv4.at(NODE_INDEX)
    }

    /// The node's own IPv6 interface address.
    pub fn node_ipv6(&self) -> Ipv6Addr {
        self.config.ipv6.at(NODE_INDEX)
    }

    /// Whether `ip` lies inside the pool's networks (mapped or not).
    pub fn contains(&self, ip: IpAddr) -> bool {
        match ip {
            IpAddr::V4(v4) => self.config.ipv4.contains(v4),
            IpAddr::V6(v6) => self.config.ipv6.contains(v6),
        }
    }

    pub fn len(&self) -> usize {
        self.by_index.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_index.is_empty()
    }

    fn mapping(&self, index: u32, address: &Q2qAddress) -> Mapping {
        Mapping {
            address: address.clone(),
            ipv4: self.config.ipv4.at(index),
            ipv6: self.config.ipv6.at(index),
        }
    }

    /// The index behind `ip`, if it is a person's slot (not network, node or broadcast).
    fn index_of(&self, ip: IpAddr) -> Option<u32> {
        let i = match ip {
            IpAddr::V4(v4) => u32::try_from(self.config.ipv4.index_of(v4)?).ok()?,
            IpAddr::V6(v6) => u32::try_from(self.config.ipv6.index_of(v6)?).ok()?,
        };
        (FIRST_INDEX..=self.config.last_index()).contains(&i).then_some(i)
    }

    fn set_last_used(&mut self, index: u32, now: u64) {
        if let Some(e) = self.by_index.get_mut(&index)
            && e.last_used < now
        {
            self.lru.remove(&(e.last_used, index));
            e.last_used = now;
            self.lru.insert((now, index));
        }
    }

    /// The mapping for `address`, made now if it has none; refreshes its `last_used`.
    pub fn lookup(&mut self, address: &Q2qAddress, now: SystemTime) -> Result<Mapping, PoolError> {
        let now = secs(now);
        if let Some(&i) = self.by_address.get(address) {
            self.set_last_used(i, now);
            return Ok(self.mapping(i, address));
        }
        let i = self.free_index(now)?;
        self.by_address.insert(address.clone(), i);
        self.by_index.insert(i, Entry { address: address.clone(), last_used: now });
        self.lru.insert((now, i));
        self.dirty = true;
        tracing::debug!(%address, ipv4 = %self.config.ipv4.at(i), "virtual address assigned");
        Ok(self.mapping(i, address))
    }

    /// The mapping for `address` if it has one (no allocation, no refresh).
    pub fn get(&self, address: &Q2qAddress) -> Option<Mapping> {
        self.by_address.get(address).map(|&i| self.mapping(i, address))
    }

    /// Who is behind a virtual address (`q2q-tun whois`, PTR, the netstack).
    pub fn whois(&self, ip: IpAddr) -> Option<&Q2qAddress> {
        self.by_index.get(&self.index_of(ip)?).map(|e| &e.address)
    }

    /// Mark the mapping behind `ip` as in use now (traffic); false if `ip` is not mapped.
    pub fn touch(&mut self, ip: IpAddr, now: SystemTime) -> bool {
        let Some(i) = self.index_of(ip) else { return false };
        if !self.by_index.contains_key(&i) {
            return false;
        }
        self.set_last_used(i, secs(now));
        true
    }

    /// All mappings, in address order.
    pub fn mappings(&self) -> impl Iterator<Item = Mapping> + '_ {
        self.by_index.iter().map(|(&i, e)| self.mapping(i, &e.address))
    }

    /// Whether a mapping was added or reclaimed since the last call (time to save).
    pub fn take_dirty(&mut self) -> bool {
        std::mem::take(&mut self.dirty)
    }

    fn free_index(&mut self, now: u64) -> Result<u32, PoolError> {
        if self.by_index.len() >= self.config.capacity() {
            return self.reclaim(now);
        }
        let (first, last) = (FIRST_INDEX, self.config.last_index());
        let mut i = self.next.clamp(first, last);
        // len < capacity <= number of slots, so a free one exists and the loop ends.
        for _ in first..=last {
            if !self.by_index.contains_key(&i) {
                self.next = if i == last { first } else { i + 1 };
                return Ok(i);
            }
            i = if i == last { first } else { i + 1 };
        }
        self.reclaim(now)
    }

    fn reclaim(&mut self, now: u64) -> Result<u32, PoolError> {
        let full = PoolError::Exhausted(self.by_index.len());
        let &(last_used, i) = self.lru.first().ok_or(full)?;
        if now.saturating_sub(last_used) <= self.config.keep_idle_secs {
            return Err(PoolError::Exhausted(self.by_index.len()));
        }
        self.lru.remove(&(last_used, i));
        if let Some(e) = self.by_index.remove(&i) {
            tracing::debug!(address = %e.address, idle_secs = now - last_used, "virtual address reclaimed");
            self.by_address.remove(&e.address);
        }
        self.dirty = true;
        Ok(i)
    }

    /// The mappings as TOML, for the daemon to save.
    pub fn to_toml(&self) -> String {
        let state = State {
            next: self.next,
            mappings: self
                .by_index
                .iter()
                .map(|(&i, e)| Saved {
                    address: e.address.to_string(),
                    ipv4: self.config.ipv4.at(i),
                    ipv6: self.config.ipv6.at(i),
                    last_used: e.last_used,
                })
                .collect(),
        };
        let body = toml::to_string(&state)
            .expect("strings, integers and addresses always serialize as TOML");
        format!("# q2q virtual address mappings; written by q2q-tun, safe to delete.\n{body}")
    }

    /// A pool with the mappings saved by [`Pool::to_toml`]. Entries that no longer fit the
    /// configured prefixes (or are duplicates, or unparseable) are dropped, with a warning.
    pub fn from_toml(config: PoolConfig, text: &str) -> Result<Pool, PoolError> {
        let state: State = toml::from_str(text).map_err(Box::new)?;
        let mut pool = Pool::new(config)?;
        let mut saved = state.mappings;
        // Most recently used first, so the cap keeps those.
        saved.sort_by_key(|s| std::cmp::Reverse(s.last_used));
        for s in saved {
            let Ok(address) = Q2qAddress::parse(&s.address) else {
                tracing::warn!(address = %s.address, "dropping saved mapping: not an address");
                continue;
            };
            let index = pool.index_of(IpAddr::V4(s.ipv4));
            let fits = index.is_some_and(|i| pool.config.ipv6.at(i) == s.ipv6);
            let (Some(i), true) = (index, fits) else {
                tracing::warn!(%address, ipv4 = %s.ipv4, "dropping saved mapping: outside the pool");
                continue;
            };
            if pool.by_index.len() >= pool.config.capacity()
                || pool.by_index.contains_key(&i)
                || pool.by_address.contains_key(&address)
            {
                tracing::warn!(%address, ipv4 = %s.ipv4, "dropping saved mapping: duplicate or over capacity");
                continue;
            }
            pool.by_address.insert(address.clone(), i);
            pool.by_index.insert(i, Entry { address, last_used: s.last_used });
            pool.lru.insert((s.last_used, i));
        }
        pool.next = state.next.clamp(FIRST_INDEX, pool.config.last_index());
        Ok(pool)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn a(s: &str) -> Q2qAddress {
        Q2qAddress::parse(s).unwrap()
    }

    fn t(s: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(s)
    }

    fn small(len: u8) -> PoolConfig {
        PoolConfig {
            ipv4: format!("10.9.8.0/{len}").parse().unwrap(),
            ipv6: "fd00:1::/120".parse().unwrap(),
            keep_idle_secs: 100,
            max_mappings: 1000,
        }
    }

    #[test]
    fn defaults_and_node_address() {
        let p = Pool::new(PoolConfig::default()).unwrap();
        assert_eq!(p.node_ipv4(), Ipv4Addr::new(100, 64, 0, 1));
        assert_eq!(p.node_ipv6(), "fd71:7132::1".parse::<Ipv6Addr>().unwrap());
        assert!(p.contains("100.127.255.255".parse().unwrap()));
        assert!(!p.contains("100.128.0.0".parse().unwrap()));
        assert!(!p.contains("fd71:7133::1".parse().unwrap()));
    }

    #[test]
    fn stable_and_reverse() {
        let mut p = Pool::new(PoolConfig::default()).unwrap();
        let m1 = p.lookup(&a("alice@example.com"), t(10)).unwrap();
        assert_eq!(m1.ipv4, Ipv4Addr::new(100, 64, 0, 2));
        assert_eq!(m1.ipv6, "fd71:7132::2".parse::<Ipv6Addr>().unwrap());
        let m2 = p.lookup(&a("bob@b.example"), t(11)).unwrap();
        assert_ne!(m1.ipv4, m2.ipv4);
        assert_eq!(p.lookup(&a("alice@example.com"), t(99_999)).unwrap(), m1);
        assert_eq!(p.whois(m1.ipv4.into()), Some(&a("alice@example.com")));
        assert_eq!(p.whois(m1.ipv6.into()), Some(&a("alice@example.com")));
        assert_eq!(p.whois(p.node_ipv4().into()), None);
        assert_eq!(p.whois("192.0.2.99".parse().unwrap()), None);
        assert_eq!(p.get(&a("bob@b.example")), Some(m2));
        assert!(p.take_dirty());
        assert!(!p.take_dirty());
    }

    #[test]
    fn never_network_node_or_broadcast_and_reclaims_only_idle() {
        // /29: 8 addresses: .0 network, .1 node, .2-.6 people, .7 broadcast.
        let mut p = Pool::new(small(29)).unwrap();
        let mut got = Vec::new();
        for n in 0..5 {
            got.push(p.lookup(&a(&format!("u{n}@x.example")), t(1000 + n)).unwrap().ipv4);
        }
        let want: Vec<Ipv4Addr> = (2..=6).map(|h| Ipv4Addr::new(10, 9, 8, h)).collect();
        assert_eq!(got, want);
        // Full, nobody idle long enough.
        assert!(matches!(p.lookup(&a("late@x.example"), t(1050)), Err(PoolError::Exhausted(5))));
        // Traffic keeps u0 alive; u1 is the least recently used after that.
        assert!(p.touch(Ipv4Addr::new(10, 9, 8, 2).into(), t(1200)));
        let m = p.lookup(&a("late@x.example"), t(1200)).unwrap();
        assert_eq!(m.ipv4, Ipv4Addr::new(10, 9, 8, 3));
        assert_eq!(p.get(&a("u1@x.example")), None);
        assert_eq!(p.get(&a("u0@x.example")).unwrap().ipv4, Ipv4Addr::new(10, 9, 8, 2));
        assert!(!p.touch(Ipv4Addr::new(10, 9, 8, 7).into(), t(1200)));
    }

    #[test]
    fn freed_addresses_reused_last() {
        let mut c = small(28);
        c.max_mappings = 2;
        let mut p = Pool::new(c).unwrap();
        p.lookup(&a("a@x.example"), t(0)).unwrap();
        p.lookup(&a("b@x.example"), t(0)).unwrap();
        // a reclaimed (idle); c gets a's old slot .2 since capacity, not space, is the limit.
        let m = p.lookup(&a("c@x.example"), t(500)).unwrap();
        assert_eq!(m.ipv4, Ipv4Addr::new(10, 9, 8, 2));
        assert_eq!(p.len(), 2);
    }

    #[test]
    fn bad_configs() {
        assert!("100.64.0.1/10".parse::<Ipv4Prefix>().is_err());
        assert!("100.64.0.0/33".parse::<Ipv4Prefix>().is_err());
        assert!("100.64.0.0".parse::<Ipv4Prefix>().is_err());
        assert!("100.64.0.0/+1".parse::<Ipv4Prefix>().is_err());
        assert!("fd00::1/64".parse::<Ipv6Prefix>().is_err());
        assert!("fd00::/129".parse::<Ipv6Prefix>().is_err());
        assert!(matches!(Pool::new(small(31)), Err(PoolError::Ipv4TooSmall(31))));
        let mut c = small(29);
        c.ipv4 = "10.9.0.0/16".parse().unwrap();
        c.ipv6 = "fd00::/120".parse().unwrap();
        assert!(matches!(Pool::new(c), Err(PoolError::Ipv6TooSmall { .. })));
        let text = toml::to_string(&PoolConfig::default()).unwrap();
        assert!(text.contains("\"100.64.0.0/10\""), "{text}");
        assert_eq!(toml::from_str::<PoolConfig>(&text).unwrap(), PoolConfig::default());
        assert_eq!(toml::from_str::<PoolConfig>("").unwrap(), PoolConfig::default());
        assert!(toml::from_str::<PoolConfig>("ipv4 = \"192.0.2.4/8\"").is_err());
    }

    #[test]
    fn save_and_restore() {
        let mut p = Pool::new(PoolConfig::default()).unwrap();
        let ma = p.lookup(&a("alice@example.com"), t(5)).unwrap();
        let mb = p.lookup(&a("john.doe@b.example"), t(6)).unwrap();
        let text = p.to_toml();
        let mut q = Pool::from_toml(PoolConfig::default(), &text).unwrap();
        assert_eq!(q.get(&a("alice@example.com")), Some(ma));
        assert_eq!(q.get(&a("john.doe@b.example")), Some(mb.clone()));
        // New names continue after the old ones, not on top of them.
        let mc = q.lookup(&a("carol@c.example"), t(7)).unwrap();
        assert_eq!(mc.ipv4, Ipv4Addr::new(100, 64, 0, 4));
        // A changed prefix drops what no longer fits.
        let other = PoolConfig { ipv4: "100.100.0.0/16".parse().unwrap(), ..PoolConfig::default() };
        assert!(Pool::from_toml(other, &text).unwrap().is_empty());
        // Hand-edited junk: bad entries dropped, the rest kept.
        let junk = format!(
            "{text}\n[[mapping]]\naddress = \"../x\"\nipv4 = \"100.64.0.9\"\nipv6 = \"fd71:7132::9\"\nlast_used = 1\n\
             [[mapping]]\naddress = \"dup@x.example\"\nipv4 = \"{}\"\nipv6 = \"{}\"\nlast_used = 0\n",
            mb.ipv4, mb.ipv6
        );
        let r = Pool::from_toml(PoolConfig::default(), &junk).unwrap();
        assert_eq!(r.len(), 2);
        assert_eq!(r.whois(mb.ipv4.into()), Some(&a("john.doe@b.example")));
        assert!(Pool::from_toml(PoolConfig::default(), "next = \"x\"").is_err());
        assert!(Pool::from_toml(PoolConfig::default(), "").unwrap().is_empty());
    }
}
