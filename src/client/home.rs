//! The client's state directory (`Q2Q_HOME`, default `~/.q2q`, or `/var/lib/q2q` for root):
//!
//! ```text
//! config.toml                    [servers] "example.com" = "host:port"   (optional)
//! known_cas/<domain>.pem         CA certificates pinned on first contact
//! identities/<user@domain>/      key.pem (0600), cert.pem, server (host:port it came from)
//! ```
//!
//! Path components come only from parsed [`Domain`]s and [`Q2qAddress`]es, which cannot
//! contain `/` or `..`.

use crate::address::{Domain, Q2qAddress};
use crate::fsutil;
use crate::identity::{CertInfo, Fingerprint};
use rustls_pki_types::CertificateDer;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Why the state directory could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum HomeError {
    #[error("{path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("{path} is not valid: {reason}")]
    Invalid { path: String, reason: String },
    #[error("no identity for {0} here: run `q2q-tun register {0}` first")]
    NoIdentity(Q2qAddress),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> HomeError + '_ {
    move |source| HomeError::Io { path: path.display().to_string(), source }
}

/// The client config file.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClientConfig {
    /// Where the identity server of a domain is, overriding DNS: domain → `host:port`.
    pub servers: BTreeMap<String, String>,
}

/// A stored identity.
#[derive(Debug, Clone)]
pub struct StoredIdentity {
    pub address: Q2qAddress,
    pub cert_pem: String,
    pub key_pem: String,
    pub server: Option<String>,
    pub info: CertInfo,
}

/// The state directory.
#[derive(Debug, Clone)]
pub struct Home {
    root: PathBuf,
}

impl Home {
    pub fn new(root: impl Into<PathBuf>) -> Home {
        Home { root: root.into() }
    }

    /// `Q2Q_HOME`, else `/var/lib/q2q` for root, else `~/.q2q`.
    pub fn locate() -> Home {
        if let Some(h) = std::env::var_os("Q2Q_HOME").filter(|h| !h.is_empty()) {
            return Home::new(h);
        }
        if nix::unistd::geteuid().is_root() {
            return Home::new("/var/lib/q2q");
        }
        let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("."), PathBuf::from);
        Home::new(home.join(".q2q"))
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn config(&self) -> Result<ClientConfig, HomeError> {
        let path = self.root.join("config.toml");
        match std::fs::read_to_string(&path) {
            Ok(text) => toml::from_str(&text).map_err(|e| HomeError::Invalid {
                path: path.display().to_string(),
                reason: e.to_string(),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(ClientConfig::default()),
            Err(e) => Err(io_err(&path)(e)),
        }
    }

    fn ca_path(&self, domain: &Domain) -> PathBuf {
        self.root.join("known_cas").join(format!("{domain}.pem"))
    }

    /// The CA pinned for `domain`, if any.
    pub fn pinned_ca(&self, domain: &Domain) -> Result<Option<CertificateDer<'static>>, HomeError> {
        let path = self.ca_path(domain);
        match std::fs::read_to_string(&path) {
            Ok(pem) => crate::identity::cert_from_pem(&pem).map(Some).map_err(|e| {
                HomeError::Invalid { path: path.display().to_string(), reason: e.to_string() }
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err(&path)(e)),
        }
    }

    /// Pin (or re-pin) `ca` as the CA of `domain`.
    pub fn pin_ca(
        &self,
        domain: &Domain,
        ca: &CertificateDer<'_>,
    ) -> Result<Fingerprint, HomeError> {
        let path = self.ca_path(domain);
        let dir = self.root.join("known_cas");
        fsutil::create_private_dir(&self.root).map_err(io_err(&self.root))?;
        fsutil::create_private_dir(&dir).map_err(io_err(&dir))?;
        fsutil::write_atomic(&path, crate::identity::cert_to_pem(ca).as_bytes(), 0o644)
            .map_err(io_err(&path))?;
        Ok(Fingerprint::of(ca))
    }

    /// How many domains' CAs are pinned (files in `known_cas`).
    pub fn pinned_count(&self) -> usize {
        std::fs::read_dir(self.root.join("known_cas")).map_or(0, Iterator::count)
    }

    /// Forget the pinned CA of `domain`; true if there was one.
    pub fn forget_ca(&self, domain: &Domain) -> Result<bool, HomeError> {
        let path = self.ca_path(domain);
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(io_err(&path)(e)),
        }
    }

    fn identity_dir(&self, address: &Q2qAddress) -> PathBuf {
        self.root.join("identities").join(address.to_string())
    }

    /// Store an identity: the key first (0600), then the certificate, each atomically.
    pub fn save_identity(
        &self,
        address: &Q2qAddress,
        key_pem: &str,
        cert_pem: &str,
        server: &str,
    ) -> Result<(), HomeError> {
        let dir = self.identity_dir(address);
        for d in [self.root.clone(), self.root.join("identities"), dir.clone()] {
            fsutil::create_private_dir(&d).map_err(io_err(&d))?;
        }
        for (name, bytes, mode) in [
            ("key.pem", key_pem.as_bytes(), 0o600),
            ("cert.pem", cert_pem.as_bytes(), 0o644),
            ("server", server.as_bytes(), 0o644),
        ] {
            let p = dir.join(name);
            fsutil::write_atomic(&p, bytes, mode).map_err(io_err(&p))?;
        }
        Ok(())
    }

    /// Replace the certificate of a stored identity with a renewed one, for the same key:
    /// the key file is not touched, and the certificate is replaced atomically (the old
    /// one stays until the new one is complete on disk). Refused when the key on disk is
    /// no longer `renewed.key_pem` (someone registered the address anew meanwhile).
    pub fn save_renewed(&self, renewed: &StoredIdentity) -> Result<(), HomeError> {
        let dir = self.identity_dir(&renewed.address);
        let key_path = dir.join("key.pem");
        let on_disk = std::fs::read_to_string(&key_path).map_err(io_err(&key_path))?;
        if on_disk != renewed.key_pem {
            return Err(HomeError::Invalid {
                path: key_path.display().to_string(),
                reason: "the key changed on disk since it was loaded (registered anew?); \
                         not replacing its certificate"
                    .into(),
            });
        }
        let p = dir.join("cert.pem");
        fsutil::write_atomic(&p, renewed.cert_pem.as_bytes(), 0o644).map_err(io_err(&p))
    }

    pub fn identity(&self, address: &Q2qAddress) -> Result<StoredIdentity, HomeError> {
        let dir = self.identity_dir(address);
        if !dir.join("cert.pem").exists() {
            return Err(HomeError::NoIdentity(address.clone()));
        }
        let read = |name: &str| {
            let p = dir.join(name);
            std::fs::read_to_string(&p).map_err(io_err(&p))
        };
        let cert_pem = read("cert.pem")?;
        let key_pem = read("key.pem")?;
        let server = read("server").ok().map(|s| s.trim().to_string());
        let invalid = |reason: String| HomeError::Invalid {
            path: dir.join("cert.pem").display().to_string(),
            reason,
        };
        let der = crate::identity::cert_from_pem(&cert_pem).map_err(|e| invalid(e.to_string()))?;
        let info = CertInfo::parse(&der).map_err(|e| invalid(e.to_string()))?;
        Ok(StoredIdentity { address: address.clone(), cert_pem, key_pem, server, info })
    }

    /// Every identity stored here, sorted by address.
    pub fn identities(&self) -> Result<Vec<StoredIdentity>, HomeError> {
        let dir = self.root.join("identities");
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(vec![]),
            Err(e) => return Err(io_err(&dir)(e)),
        };
        let mut out = Vec::new();
        for entry in entries.flatten() {
            let Some(address) = entry.file_name().to_str().and_then(|n| Q2qAddress::parse(n).ok())
            else {
                continue;
            };
            out.push(self.identity(&address)?);
        }
        out.sort_by(|a, b| a.address.cmp(&b.address));
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_renewed_certificate_replaces_only_the_certificate() {
        let d = tempfile::tempdir().unwrap();
        let home = Home::new(d.path().join("q2q"));
        let ca =
            crate::identity::DomainCa::generate(&Domain::parse("example.com").unwrap()).unwrap();
        let alice = Q2qAddress::parse("alice@example.com").unwrap();
        let key = crate::identity::generate_key().unwrap();
        let csr = crate::identity::signing_request(&key).unwrap();
        let first = ca.issue_user(&alice, &csr, std::time::Duration::from_secs(60)).unwrap();
        home.save_identity(&alice, &key.serialize_pem(), &first.pem, "127.0.0.1:8788").unwrap();
        let stored = home.identity(&alice).unwrap();

        let renewed =
            ca.renew_user(&alice, &first.der, std::time::Duration::from_secs(60)).unwrap();
        let new = StoredIdentity {
            cert_pem: renewed.pem.clone(),
            info: renewed.info.clone(),
            ..stored.clone()
        };
        home.save_renewed(&new).unwrap();
        let again = home.identity(&alice).unwrap();
        assert_eq!(again.cert_pem, renewed.pem);
        assert_eq!(again.key_pem, stored.key_pem);
        let dir = d.path().join("q2q/identities/alice@example.com");
        let mode = std::fs::metadata(dir.join("key.pem")).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let mut names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, ["cert.pem", "key.pem", "server"], "no temporary files left");

        // Registered anew meanwhile (another key on disk): the renewal is not written.
        let other = crate::identity::generate_key().unwrap();
        std::fs::write(dir.join("key.pem"), other.serialize_pem()).unwrap();
        assert!(matches!(home.save_renewed(&new), Err(HomeError::Invalid { .. })));
    }
}
