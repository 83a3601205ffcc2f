//! The identity server's configuration file (`config.toml` in the data directory).

use super::ratelimit::RateLimitConfig;
use serde::{Deserialize, Serialize};
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::Duration;

/// Who may register an address.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Registration {
    /// Anyone who can reach the server.
    Open,
    /// Nobody: the admin adds users with `q2q-server user add`.
    Closed,
    /// Whoever holds an unused code from `q2q-server invite create`.
    Invite,
}

/// How long the certificates issued to users last: a number and a unit, `90s`, `3m`,
/// `12h` or `30d`; at least a second.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Lifetime(Duration);

/// Why a lifetime does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not a lifetime: give a whole number and a unit, like 90s, 3m, 12h or 30d")]
pub struct LifetimeError(String);

impl Lifetime {
    pub fn from_days(days: u32) -> Lifetime {
        Lifetime(Duration::from_secs(u64::from(days) * 86400))
    }

    pub fn parse(s: &str) -> Result<Lifetime, LifetimeError> {
        let bad = || LifetimeError(s.to_string());
        let t = s.trim();
        let split = t.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
        let (n, unit) = t.split_at(split);
        let n: u64 = n.parse().map_err(|_| bad())?;
        let unit_secs = match unit.trim() {
            "s" => 1,
            "m" => 60,
            "h" => 3600,
            "d" => 86400,
            _ => return Err(bad()),
        };
        match n.checked_mul(unit_secs) {
            // Ten years at most: beyond that rcgen's and X.509's dates are no fun.
            Some(secs @ 1..=315_360_000) => Ok(Lifetime(Duration::from_secs(secs))),
            _ => Err(bad()),
        }
    }

    pub fn duration(self) -> Duration {
        self.0
    }
}

impl std::fmt::Display for Lifetime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = self.0.as_secs();
        match s {
            _ if s.is_multiple_of(86400) => write!(f, "{}d", s / 86400),
            _ if s.is_multiple_of(3600) => write!(f, "{}h", s / 3600),
            _ if s.is_multiple_of(60) => write!(f, "{}m", s / 60),
            _ => write!(f, "{s}s"),
        }
    }
}

impl TryFrom<String> for Lifetime {
    type Error = LifetimeError;
    fn try_from(s: String) -> Result<Lifetime, LifetimeError> {
        Lifetime::parse(&s)
    }
}

impl From<Lifetime> for String {
    fn from(l: Lifetime) -> String {
        l.to_string()
    }
}

/// An IP network in CIDR notation (`198.51.100.0/24`, `::1/128`); a bare address is its
/// own network.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Network(pub ipnet::IpNet);

/// Why a network does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not a network: give an address and prefix length, like 198.51.100.0/24")]
pub struct NetworkError(String);

impl Network {
    pub fn parse(s: &str) -> Result<Network, NetworkError> {
        let t = s.trim();
        t.parse::<ipnet::IpNet>()
            .or_else(|_| t.parse::<IpAddr>().map(ipnet::IpNet::from))
            .map(|n| Network(n.trunc()))
            .map_err(|_| NetworkError(s.to_string()))
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        self.0.contains(&ip)
    }
}

impl std::fmt::Display for Network {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl TryFrom<String> for Network {
    type Error = NetworkError;
    fn try_from(s: String) -> Result<Network, NetworkError> {
        Network::parse(&s)
    }
}

impl From<Network> for String {
    fn from(n: Network) -> String {
        n.to_string()
    }
}

/// How many accounts may be registered: per source address and over all (the
/// `[registration_limit]` table). Each is a token bucket: `burst` at once, then one every
/// `every_secs`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct RegistrationLimit {
    pub per_address_burst: u32,
    pub per_address_every_secs: u64,
    pub overall_burst: u32,
    pub overall_every_secs: u64,
}

impl Default for RegistrationLimit {
    fn default() -> Self {
        RegistrationLimit {
            per_address_burst: 10,
            per_address_every_secs: 600,
            overall_burst: 100,
            overall_every_secs: 10,
        }
    }
}

/// Every setting, with its default.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    /// A second UDP port on `listen`'s address that answers only who-am-i, for
    /// `q2q-tun netcheck` (see [`ServerConfig::second_udp`]): absent, the port after
    /// `listen`'s (any free port when that is 0); 0, none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub second_udp_port: Option<u16>,
    /// A second address of this host (and port) for that socket instead: with it
    /// `netcheck` compares two server addresses, as RFC 5780 does, and also sees a NAT that
    /// maps per destination address. Wins over `second_udp_port`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub second_udp_addr: Option<SocketAddr>,
    pub registration: Registration,
    /// Lifetime of the certificates issued to users; default 30 days.
    pub cert_lifetime: Option<Lifetime>,
    /// The older spelling, in whole days; [`ServerConfig::cert_lifetime`] wins.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cert_lifetime_days: Option<u32>,
    pub min_password_len: usize,
    pub max_connections: usize,
    pub max_connections_per_address: usize,
    /// The share of `max_connections`, in percent, that connections not logged in may hold.
    pub unauthenticated_percent: u8,
    pub handshake_timeout_secs: u64,
    pub login_timeout_secs: u64,
    /// Networks the server may fetch other domains' CAs from although they are not public
    /// unicast (loopback, private, documentation…): none by default.
    pub federation_allow: Vec<Network>,
    /// Seconds another domain's revocation list is used before it is fetched again.
    pub revocation_max_age_secs: u64,
    /// Address of the Prometheus endpoint (`http://ADDR/metrics`); none (off) by default.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics: Option<SocketAddr>,
    pub rate_limit: RateLimitConfig,
    pub registration_limit: RegistrationLimit,
    /// Where the state lives: None (or `sqlite`) for the data directory's SQLite file, or a
    /// PostgreSQL URL shared by several instances of the domain.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub database: Option<String>,
    /// With PostgreSQL: a PEM file of the CA that signed the database server's certificate.
    /// Set, every connection is TLS and verified against it; unset, connections are plain.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub database_ca: Option<std::path::PathBuf>,
    /// The address other instances of the domain tell callers to reach this instance's
    /// relay at (with PostgreSQL); default: the listen address, if it names one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub relay_host: Option<IpAddr>,
    /// Mbit/s the relay forwards over all its sessions; none (the default): as fast as the
    /// host sends. When the relay is saturated, each relayed leg with data gets an equal
    /// share (deficit round robin); there is no fixed rate per leg.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub relay_budget_mbit: Option<u64>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, crate::proto::DEFAULT_PORT)),
            second_udp_port: None,
            second_udp_addr: None,
            registration: Registration::Open,
            cert_lifetime: None,
            cert_lifetime_days: None,
            min_password_len: 8,
            max_connections: 4096,
            max_connections_per_address: 32,
            unauthenticated_percent: 50,
            handshake_timeout_secs: 10,
            login_timeout_secs: 30,
            federation_allow: Vec::new(),
            revocation_max_age_secs: 60,
            metrics: None,
            rate_limit: RateLimitConfig::default(),
            registration_limit: RegistrationLimit::default(),
            database: None,
            database_ca: None,
            relay_host: None,
            relay_budget_mbit: None,
        }
    }
}

/// Why the config could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("{path} is not a valid config: {source}")]
    Parse { path: String, source: Box<toml::de::Error> },
    #[error("{path}: {reason}")]
    Invalid { path: String, reason: String },
}

/// The default lifetime of user certificates.
pub const DEFAULT_CERT_LIFETIME: Duration = Duration::from_secs(30 * 86400);

impl ServerConfig {
    /// Read `path`; a missing file means all defaults.
    pub fn load(path: &Path) -> Result<ServerConfig, ConfigError> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Self::default()),
            Err(source) => {
                return Err(ConfigError::Read { path: path.display().to_string(), source });
            }
        };
        let config: ServerConfig = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.display().to_string(),
            source: Box::new(e),
        })?;
        if config.cert_lifetime.is_some() && config.cert_lifetime_days.is_some() {
            return Err(ConfigError::Invalid {
                path: path.display().to_string(),
                reason: "give `cert_lifetime` or the older `cert_lifetime_days`, not both".into(),
            });
        }
        if config.unauthenticated_percent > 100 {
            return Err(ConfigError::Invalid {
                path: path.display().to_string(),
                reason: "`unauthenticated_percent` is a percentage: 0 to 100".into(),
            });
        }
        if config.cert_lifetime_days == Some(0) {
            return Err(ConfigError::Invalid {
                path: path.display().to_string(),
                reason: "`cert_lifetime_days` must be at least 1".into(),
            });
        }
        Ok(config)
    }

    /// How long the certificates issued to users last: `cert_lifetime`, else
    /// `cert_lifetime_days`, else 30 days.
    pub fn cert_lifetime(&self) -> Duration {
        match (self.cert_lifetime, self.cert_lifetime_days) {
            (Some(l), _) => l.duration(),
            (None, Some(days)) => Lifetime::from_days(days.max(1)).duration(),
            (None, None) => DEFAULT_CERT_LIFETIME,
        }
    }

    /// Where the second who-am-i socket binds, or None when it is turned off:
    /// `second_udp_addr` if set, else the port after `listen`'s unless `second_udp_port`
    /// says otherwise (port 0: any free port).
    pub fn second_udp(&self) -> Option<SocketAddr> {
        if let Some(a) = self.second_udp_addr {
            return Some(a);
        }
        let port = match self.second_udp_port {
            Some(0) => return None,
            Some(p) => p,
            None if self.listen.port() == 0 => 0,
            None => self.listen.port().checked_add(1)?,
        };
        Some(SocketAddr::new(self.listen.ip(), port))
    }

    /// How long a new connection has for its TLS handshake (at least a second).
    pub fn handshake_timeout(&self) -> Duration {
        Duration::from_secs(self.handshake_timeout_secs.max(1))
    }

    /// How long a connection may stay open without logging in (at least a second).
    pub fn login_timeout(&self) -> Duration {
        Duration::from_secs(self.login_timeout_secs.max(1))
    }

    /// The IP address callers reach this instance's relay at, as other instances tell
    /// them: `relay_host`, else the listen address unless it is unspecified.
    pub fn relay_host(&self) -> Option<IpAddr> {
        self.relay_host.or(Some(self.listen.ip()).filter(|ip| !ip.is_unspecified()))
    }

    /// The relay's limits: the overall budget from `relay_budget_mbit` (a value that is not
    /// positive means none), the rest the defaults.
    pub fn relay_limits(&self) -> super::relay::RelayLimits {
        let budget = self.relay_budget_mbit.filter(|m| *m > 0);
        super::relay::RelayLimits {
            budget: budget.map(|m| m as f64 * 1e6 / 8.0),
            ..Default::default()
        }
    }

    /// How long another domain's revocation list is used before it is fetched again (at
    /// least a second).
    pub fn revocation_max_age(&self) -> Duration {
        Duration::from_secs(self.revocation_max_age_secs.max(1))
    }

    /// The commented config file `init` writes: every setting, its default and meaning.
    pub fn documented(&self) -> String {
        let database = match &self.database {
            Some(d) => format!("database = {}", toml::Value::from(d.as_str())),
            None => "# database = \"postgres://q2q@127.0.0.1/q2q\"".to_string(),
        };
        let relay_host = match &self.relay_host {
            Some(h) => format!("relay_host = \"{h}\""),
            None => "# relay_host = \"198.51.100.7\"".to_string(),
        };
        let relay_budget = match self.relay_budget_mbit {
            Some(m) => format!("relay_budget_mbit = {m}"),
            None => "# relay_budget_mbit = 1000".to_string(),
        };
        let r = &self.rate_limit;
        let g = &self.registration_limit;
        let allow: Vec<String> = self.federation_allow.iter().map(|n| format!("\"{n}\"")).collect();
        let registration = match self.registration {
            Registration::Open => "open",
            Registration::Closed => "closed",
            Registration::Invite => "invite",
        };
        format!(
            r#"# q2q-server configuration. Every setting is shown; delete a line to use its default.

# Address the server listens on, for TCP (control connections, AMP over TLS 1.3) and UDP
# (who-am-i) alike. Default "[::]:8788": IPv6 and IPv4 on one dual-stack socket each
# ("0.0.0.0:8788" where IPv6 is off).
listen = "{listen}"

# A second UDP port, on the address of `listen`, that answers only who-am-i. With it
# `q2q-tun netcheck` sees whether a client's NAT gives each destination a new port (a
# symmetric NAT: direct paths only to peers behind friendlier NATs) and whether it lets in
# datagrams from a port the client never sent to (RFC 5780's mapping and filtering tests,
# with a second port instead of a second address). Open it in the firewall as you do
# `listen`. 0 turns it off. Default: the port after listen's (8789).
{second}
# Better, where this host has a second public address: that socket on it instead (an
# address and port, like "203.0.113.1:8789"); then netcheck compares two server addresses,
# as RFC 5780 does, and also sees a NAT that gives each destination address a new port.
# Wins over second_udp_port. Default: none.
{second_addr}

# Who may register an address: "open" (anyone), "closed" (only `q2q-server user add`), or
# "invite" (whoever holds a code from `q2q-server invite create`). Default "open".
registration = "{registration}"

# Lifetime of the certificates issued to users: a number and a unit, s, m, h or d
# ("90s", "3m", "12h", "30d"). Nodes renew their certificate at two thirds of it, with
# its key and no password, and warn a week before it ends (or at three quarters of it,
# when that is later). Certificates start 5 minutes before they are issued, so clocks up
# to 5 minutes behind accept them. (The older `cert_lifetime_days = 30` is still read.)
# Default "30d".
cert_lifetime = "{lifetime}"

# Shortest password accepted at registration. Default 8.
min_password_len = {minpw}

# Most control connections served at once; more wait. Never more than the open-file limit
# allows: the server raises its soft RLIMIT_NOFILE to the hard limit at start, keeps 64
# descriptors for itself and logs the result. Default 4096.
max_connections = {maxconn}

# Most connections from one IP address (an IPv6 /64) at once; more are closed as soon as
# they are accepted. Default 32.
max_connections_per_address = {perip}

# The share of max_connections, in percent, that connections not logged in yet may hold;
# when it is full, a new connection closes the oldest of them, so strangers holding
# connections open leave room for clients that log in. A client logs in by presenting
# its certificate (one of this domain counts at once). Default 50.
unauthenticated_percent = {unauth}

# Seconds a new connection has to finish its TLS handshake. Default 10.
handshake_timeout_secs = {handshake}

# Seconds a connection may stay open without logging in (time enough to register and get
# a certificate). Logged-in connections stay while they are used. Default 30.
login_timeout_secs = {login}

# The CA of another domain is fetched from that domain's server (its `[servers]` entry in
# federation/config.toml, else DNS SRV _q2q._tcp.DOMAIN, else DOMAIN:8788) only at public
# unicast addresses: loopback, private (RFC 1918, fc00::/7), link-local, shared
# (100.64.0.0/10), documentation, benchmarking, multicast, unspecified and broadcast
# addresses are refused unless listed here, in CIDR notation, e.g.
# ["198.51.100.0/24", "127.0.0.0/8"]. Default [] (public addresses only).
federation_allow = [{allow}]

# Where users, certificates, invites and the CA fingerprint live: "sqlite" (the file
# q2q.db in the data directory; one instance per domain) or a PostgreSQL URL
# ("postgres://user@host:port/db", or libpq's "host=/run/postgresql dbname=q2q") that
# several instances of the domain share, each with a copy of this data directory (the CA
# key file). Instances then also find each other's logged-in users through the database.
# With a password in the URL, keep this file mode 0600. `--database` overrides. Default
# "sqlite".
{database}

# With PostgreSQL: the CA (a PEM file) that signed the database server's certificate.
# Set, every connection to the database is TLS (sslmode=require, whatever the URL says)
# and the server's certificate is verified against this CA and the URL's host. Unset,
# connections are plain: then use a Unix socket or a trusted network.
{database_ca}

# With PostgreSQL: the IP address callers reach this instance's relay (UDP, same port as
# `listen`) at, told them when their own instance sets up a session with a user logged in
# here. Default: the listen address, unless it is 0.0.0.0 or ::, in which case callers
# try their own instance's address.
{relay_host}

# Mbit/s the relay forwards over all its sessions together. When that (or the host's
# link) is the limit, every relayed leg with data gets an equal share and a flooding leg
# loses only its own excess; a leg alone gets all of it. No fixed rate per leg. Default:
# no budget (as fast as the host sends).
{relay_budget}

# Callers of other domains are checked against their domain's revocation list (signed by
# that domain's CA, fetched like its CA). A list is used for this many seconds, then
# fetched again; if that fails, the list held is used until its own nextUpdate (an hour
# after it was made), and after that the domain's callers are refused until a list can
# be had (fail closed). Logged-in callers of other domains are checked again as often.
# Default 60.
revocation_max_age_secs = {revage}

# Prometheus metrics at http://ADDR/metrics (logins, live sessions, open connections,
# inbound requests, relay legs and bytes, registrations, refusals by reason). Off unless
# set, e.g. metrics = "127.0.0.1:9788". Anyone who reaches the address can read them.
{metrics}

# Password guessing is slowed per user and per source address.
[rate_limit]
# Failed attempts allowed before each further attempt must wait. Default 3.
free_failures = {free}
# The first wait in milliseconds; it doubles with each further failure. Default 1000.
base_delay_ms = {base}
# The longest wait, in seconds. Default 300.
max_delay_secs = {max}
# Failures are forgotten after this many seconds without one. Default 900.
forget_after_secs = {forget}

# Registrations (each costs a password hash and a database row): per source address and
# over all, `burst` at once, then one every `every_secs` seconds. More are refused with
# RATE_LIMITED.
[registration_limit]
# Default 10 at once, then one every 600 s.
per_address_burst = {gpb}
per_address_every_secs = {gpe}
# Default 100 at once, then one every 10 s.
overall_burst = {gob}
overall_every_secs = {goe}
"#,
            listen = self.listen,
            second = match self.second_udp_port {
                Some(p) => format!("second_udp_port = {p}"),
                None => format!(
                    "# second_udp_port = {}",
                    self.listen.port().checked_add(1).unwrap_or(0)
                ),
            },
            second_addr = match self.second_udp_addr {
                Some(a) => format!("second_udp_addr = \"{a}\""),
                None => "# second_udp_addr = \"203.0.113.1:8789\"".to_string(),
            },
            lifetime = Lifetime(self.cert_lifetime()),
            minpw = self.min_password_len,
            maxconn = self.max_connections,
            perip = self.max_connections_per_address,
            unauth = self.unauthenticated_percent,
            handshake = self.handshake_timeout_secs,
            login = self.login_timeout_secs,
            allow = allow.join(", "),
            database = database,
            database_ca = match &self.database_ca {
                Some(p) => format!("database_ca = {}", toml::Value::from(p.display().to_string())),
                None => "# database_ca = \"/etc/q2q/database-ca.pem\"".to_string(),
            },
            relay_host = relay_host,
            relay_budget = relay_budget,
            revage = self.revocation_max_age_secs,
            metrics = match self.metrics {
                Some(a) => format!("metrics = \"{a}\""),
                None => "# metrics = \"127.0.0.1:9788\"".to_string(),
            },
            gpb = g.per_address_burst,
            gpe = g.per_address_every_secs,
            gob = g.overall_burst,
            goe = g.overall_every_secs,
            free = r.free_failures,
            base = r.base_delay_ms,
            max = r.max_delay_secs,
            forget = r.forget_after_secs,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documented_file_parses_to_itself() {
        let c = ServerConfig {
            registration: Registration::Invite,
            cert_lifetime: Some(Lifetime::from_days(30)),
            federation_allow: vec![
                Network::parse("198.51.100.0/24").unwrap(),
                Network::parse("::1").unwrap(),
            ],
            database: Some("postgres://q2q@127.0.0.1:5432/q2q".into()),
            relay_host: Some("192.0.2.1".parse().unwrap()),
            relay_budget_mbit: Some(2500),
            revocation_max_age_secs: 5,
            metrics: Some("127.0.0.1:9788".parse().unwrap()),
            ..Default::default()
        };
        assert_eq!(toml::from_str::<ServerConfig>(&c.documented()).unwrap(), c);
        assert_eq!(toml::from_str::<ServerConfig>("").unwrap(), ServerConfig::default());
        assert!(toml::from_str::<ServerConfig>("bogus = 1").is_err());
        let d = ServerConfig::default();
        let off = ServerConfig { second_udp_port: Some(0), ..Default::default() };
        let read = toml::from_str::<ServerConfig>(&off.documented()).unwrap();
        assert_eq!((read.second_udp_port, read.second_udp()), (Some(0), None));
        let read = toml::from_str::<ServerConfig>(&d.documented()).unwrap();
        assert_eq!(read.second_udp_port, None, "the default is written commented out");
        assert_eq!(
            toml::from_str::<ServerConfig>(&d.documented()).unwrap().cert_lifetime(),
            d.cert_lifetime()
        );
    }

    #[test]
    fn second_udp_port() {
        let c = |t: &str| toml::from_str::<ServerConfig>(t).unwrap().second_udp();
        assert_eq!(c(""), Some("[::]:8789".parse().unwrap()));
        assert_eq!(c("listen = \"127.0.0.1:0\""), Some("127.0.0.1:0".parse().unwrap()));
        assert_eq!(c("second_udp_port = 0"), None);
        assert_eq!(
            c("listen = \"127.0.0.1:9000\"\nsecond_udp_port = 4000"),
            Some("127.0.0.1:4000".parse().unwrap())
        );
        assert_eq!(c("listen = \"127.0.0.1:65535\""), None, "no port after the last");
        assert_eq!(
            c("second_udp_port = 0\nsecond_udp_addr = \"203.0.113.1:8789\""),
            Some("203.0.113.1:8789".parse().unwrap()),
            "a second address wins"
        );
        let with = ServerConfig {
            second_udp_addr: Some("203.0.113.1:8789".parse().unwrap()),
            ..Default::default()
        };
        let read = toml::from_str::<ServerConfig>(&with.documented()).unwrap();
        assert_eq!(read.second_udp_addr, with.second_udp_addr);
        let read = toml::from_str::<ServerConfig>(&ServerConfig::default().documented()).unwrap();
        assert_eq!(read.second_udp_addr, None, "written commented out");
    }

    #[test]
    fn networks() {
        let n = |s: &str| Network::parse(s).map(|n| n.to_string());
        assert_eq!(n("198.51.100.0/24").unwrap(), "198.51.100.0/24");
        assert_eq!(n("198.51.100.7/24").unwrap(), "198.51.100.0/24");
        assert_eq!(n("127.0.0.1").unwrap(), "127.0.0.1/32");
        assert_eq!(n("2001:db8::/32").unwrap(), "2001:db8::/32");
        for bad in ["", "10.0.0.0/33", "example.com", "10.0.0/8"] {
            assert!(Network::parse(bad).is_err(), "{bad}");
        }
        let c: ServerConfig = toml::from_str("federation_allow = [\"127.0.0.0/8\"]").unwrap();
        assert!(c.federation_allow[0].contains("127.0.0.2".parse().unwrap()));
        assert!(toml::from_str::<ServerConfig>("federation_allow = [\"nonsense\"]").is_err());
    }

    #[test]
    fn lifetimes() {
        let secs = |s: &str| Lifetime::parse(s).map(|l| l.duration().as_secs());
        assert_eq!(secs("90s"), Ok(90));
        assert_eq!(secs("3m"), Ok(180));
        assert_eq!(secs(" 12h "), Ok(43200));
        assert_eq!(secs("30d"), Ok(30 * 86400));
        assert_eq!(secs("3 m"), Ok(180));
        for bad in
            ["", "3", "m", "0s", "-3m", "3x", "1.5h", "3mm", "99999999999999999999d", "4000d"]
        {
            assert!(Lifetime::parse(bad).is_err(), "{bad}");
        }
        for s in ["90s", "3m", "12h", "30d", "61s"] {
            assert_eq!(Lifetime::parse(s).unwrap().to_string(), s);
        }
    }

    #[test]
    fn lifetime_settings_old_and_new() {
        let parse = |t: &str| toml::from_str::<ServerConfig>(t).unwrap().cert_lifetime();
        assert_eq!(parse(""), DEFAULT_CERT_LIFETIME);
        assert_eq!(parse("cert_lifetime_days = 7"), Duration::from_secs(7 * 86400));
        assert_eq!(parse("cert_lifetime = \"3m\""), Duration::from_secs(180));
        assert!(toml::from_str::<ServerConfig>("cert_lifetime = \"3 fortnights\"").is_err());
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("config.toml");
        std::fs::write(&p, "cert_lifetime = \"3m\"\ncert_lifetime_days = 1\n").unwrap();
        assert!(matches!(ServerConfig::load(&p), Err(ConfigError::Invalid { .. })));
        std::fs::write(&p, "cert_lifetime_days = 0\n").unwrap();
        assert!(matches!(ServerConfig::load(&p), Err(ConfigError::Invalid { .. })));
        std::fs::write(&p, "cert_lifetime = \"3m\"\n").unwrap();
        assert_eq!(ServerConfig::load(&p).unwrap().cert_lifetime(), Duration::from_secs(180));
    }
}
