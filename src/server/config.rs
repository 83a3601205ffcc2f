//! The identity server's configuration file (`config.toml` in the data directory).

use super::ratelimit::RateLimitConfig;
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::Path;

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

/// Every setting, with its default.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub registration: Registration,
    pub cert_lifetime_days: u32,
    pub min_password_len: usize,
    pub max_connections: usize,
    pub rate_limit: RateLimitConfig,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: SocketAddr::from(([0, 0, 0, 0], crate::proto::DEFAULT_PORT)),
            registration: Registration::Open,
            cert_lifetime_days: 30,
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
}

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
        toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.display().to_string(),
            source: Box::new(e),
        })
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

# Lifetime of the certificates issued to users, in days. Default 30.
cert_lifetime_days = {days}

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
            days = self.cert_lifetime_days,
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
        let c = ServerConfig { registration: Registration::Invite, ..Default::default() };
        assert_eq!(toml::from_str::<ServerConfig>(&c.documented()).unwrap(), c);
        assert_eq!(toml::from_str::<ServerConfig>("").unwrap(), ServerConfig::default());
        assert!(toml::from_str::<ServerConfig>("bogus = 1").is_err());
    }
}
