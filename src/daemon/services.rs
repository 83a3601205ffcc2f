//! What this node offers, to whom, and where it goes locally: `$Q2Q_HOME/services.toml`.
//! Every service is default-deny: exposing it offers it to nobody until someone is
//! authorized for it.
//!
//! ```toml
//! [services."tcp/22"]
//! to = "127.0.0.1:22"
//! allow = ["bob@b.example"]
//! ```

use crate::address::{Q2qAddress, ServiceName};
use crate::client::{Home, HomeError};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::SocketAddr;

/// One exposed service.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Exposed {
    /// The local TCP address a stream of this service is forwarded to (none for `file`,
    /// which goes to the inbox, `$Q2Q_HOME/inbox`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<SocketAddr>,
    /// Who may use it.
    #[serde(default)]
    pub allow: Vec<String>,
}

/// The services file.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Services {
    #[serde(default)]
    pub services: BTreeMap<String, Exposed>,
}

/// Why the services file could not be changed.
#[derive(Debug, thiserror::Error)]
pub enum ServicesError {
    #[error(transparent)]
    Home(#[from] HomeError),
    #[error("{0} is not exposed: `q2q-tun expose {0}` first")]
    NotExposed(ServiceName),
    #[error(
        "say where {0} goes locally with --to HOST:PORT (only tcp/N and udp/N default to 127.0.0.1:N)"
    )]
    NoTarget(ServiceName),
}

fn path(home: &Home) -> std::path::PathBuf {
    home.root().join("services.toml")
}

impl Services {
    pub fn load(home: &Home) -> Result<Services, HomeError> {
        let p = path(home);
        match std::fs::read_to_string(&p) {
            Ok(t) => toml::from_str(&t).map_err(|e| HomeError::Invalid {
                path: p.display().to_string(),
                reason: e.to_string(),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Services::default()),
            Err(source) => Err(HomeError::Io { path: p.display().to_string(), source }),
        }
    }

    /// Write atomically (a crash leaves the old file or the new one, never half of one).
    pub fn save(&self, home: &Home) -> Result<(), HomeError> {
        let p = path(home);
        let io = |source| HomeError::Io { path: p.display().to_string(), source };
        crate::fsutil::create_private_dir(home.root()).map_err(io)?;
        let text = toml::to_string_pretty(self).map_err(|e| HomeError::Invalid {
            path: p.display().to_string(),
            reason: e.to_string(),
        })?;
        crate::fsutil::write_atomic(&p, text.as_bytes(), 0o600).map_err(io)
    }

    /// Offer `service`, forwarded to `to` (tcp/N and udp/N default to 127.0.0.1:N; a
    /// `udp/` service carries datagrams). Keeps who is
    /// authorized if it was exposed before.
    pub fn expose(
        &mut self,
        service: &ServiceName,
        to: Option<SocketAddr>,
    ) -> Result<Option<SocketAddr>, ServicesError> {
        if service.as_str() == "file" {
            self.services.entry("file".into()).or_insert(Exposed { to: None, allow: vec![] }).to =
                None;
            return Ok(None);
        }
        let to = match to {
            Some(t) => t,
            None => service
                .as_str()
                .strip_prefix("tcp/")
                .or_else(|| service.as_str().strip_prefix("udp/"))
                .and_then(|p| p.parse::<u16>().ok())
                .map(|port| SocketAddr::from(([127, 0, 0, 1], port)))
                .ok_or_else(|| ServicesError::NoTarget(service.clone()))?,
        };
        let entry = self
            .services
            .entry(service.to_string())
            .or_insert(Exposed { to: Some(to), allow: vec![] });
        entry.to = Some(to);
        Ok(Some(to))
    }

    pub fn unexpose(&mut self, service: &ServiceName) -> bool {
        self.services.remove(service.as_str()).is_some()
    }

    pub fn authorize(
        &mut self,
        who: &Q2qAddress,
        service: &ServiceName,
    ) -> Result<(), ServicesError> {
        if service.as_str() == "file" {
            // The inbox needs no target: authorizing a sender is consent enough.
            self.expose(service, None)?;
        }
        let e = self
            .services
            .get_mut(service.as_str())
            .ok_or_else(|| ServicesError::NotExposed(service.clone()))?;
        if !e.allow.contains(&who.to_string()) {
            e.allow.push(who.to_string());
        }
        Ok(())
    }

    pub fn deauthorize(
        &mut self,
        who: &Q2qAddress,
        service: &ServiceName,
    ) -> Result<bool, ServicesError> {
        let e = self
            .services
            .get_mut(service.as_str())
            .ok_or_else(|| ServicesError::NotExposed(service.clone()))?;
        let before = e.allow.len();
        e.allow.retain(|a| a != &who.to_string());
        Ok(e.allow.len() != before)
    }

    /// The exposed services, parsed (entries that do not parse are skipped).
    pub fn parsed(&self) -> Vec<(ServiceName, Option<SocketAddr>, Vec<Q2qAddress>)> {
        self.services
            .iter()
            .filter_map(|(name, e)| {
                let service = ServiceName::parse(name).ok()?;
                let allow = e.allow.iter().filter_map(|a| Q2qAddress::parse(a).ok()).collect();
                Some((service, e.to, allow))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_deny_and_persistence() {
        let d = tempfile::tempdir().unwrap();
        let home = Home::new(d.path());
        let ssh = ServiceName::parse("tcp/22").unwrap();
        let bob = Q2qAddress::parse("bob@b.example").unwrap();
        let mut s = Services::load(&home).unwrap();
        assert!(matches!(s.authorize(&bob, &ssh), Err(ServicesError::NotExposed(_))));
        assert_eq!(s.expose(&ssh, None).unwrap(), Some("127.0.0.1:22".parse().unwrap()));
        assert!(s.parsed()[0].2.is_empty(), "exposed to nobody yet");
        s.authorize(&bob, &ssh).unwrap();
        s.authorize(&bob, &ssh).unwrap();
        s.save(&home).unwrap();
        let again = Services::load(&home).unwrap();
        assert_eq!(again.parsed()[0].2, vec![bob.clone()]);
        assert!(matches!(
            again.clone().expose(&ServiceName::parse("tcp/x").unwrap(), None),
            Err(ServicesError::NoTarget(_))
        ));
        let mut with_inbox = again.clone();
        with_inbox.authorize(&bob, &ServiceName::parse("file").unwrap()).unwrap();
        assert_eq!(with_inbox.services["file"].to, None);
        let mut again = again;
        assert!(again.deauthorize(&bob, &ssh).unwrap());
        assert!(again.unexpose(&ssh));
    }
}
