//! The identity server's configuration file (`config.toml` in the data directory).

use super::ratelimit::RateLimitConfig;
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
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

/// Every setting, with its default.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub registration: Registration,
    /// Lifetime of the certificates issued to users; default 30 days.
    pub cert_lifetime: Option<Lifetime>,
    /// The older spelling, in whole days; [`ServerConfig::cert_lifetime`] wins.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cert_lifetime_days: Option<u32>,
    pub min_password_len: usize,
    pub max_connections: usize,
    pub rate_limit: RateLimitConfig,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: SocketAddr::from(([0, 0, 0, 0], crate::proto::DEFAULT_PORT)),
            registration: Registration::Open,
            cert_lifetime: None,
            cert_lifetime_days: None,
            min_password_len: 8,
            max_connections: 4096,
            rate_limit: RateLimitConfig::default(),
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

    /// The commented config file `init` writes: every setting, its default and meaning.
    pub fn documented(&self) -> String {
        let r = &self.rate_limit;
        let registration = match self.registration {
            Registration::Open => "open",
            Registration::Closed => "closed",
            Registration::Invite => "invite",
        };
        format!(
            r#"# q2q-server configuration. Every setting is shown; delete a line to use its default.

# Address the server listens on, for TCP (control connections, AMP over TLS 1.3) and UDP
# (who-am-i) alike. Default "0.0.0.0:8788".
listen = "{listen}"

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

# Most control connections served at once; more wait. Default 4096.
max_connections = {maxconn}

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
"#,
            listen = self.listen,
            lifetime = Lifetime(self.cert_lifetime()),
            minpw = self.min_password_len,
            maxconn = self.max_connections,
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
            ..Default::default()
        };
        assert_eq!(toml::from_str::<ServerConfig>(&c.documented()).unwrap(), c);
        assert_eq!(toml::from_str::<ServerConfig>("").unwrap(), ServerConfig::default());
        assert!(toml::from_str::<ServerConfig>("bogus = 1").is_err());
        let d = ServerConfig::default();
        assert_eq!(
            toml::from_str::<ServerConfig>(&d.documented()).unwrap().cert_lifetime(),
            d.cert_lifetime()
        );
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
