//! Other domains' CAs, for verifying callers from other domains: learned from that domain's
//! server through `identify` on first need and pinned (trust on first use), in the data
//! directory's `federation/` folder, which has the client's layout: `known_cas/<domain>.pem`
//! (pre-seed it, or pin up front, to skip trust on first use) and `config.toml` with
//! `[servers]` overrides.

use crate::address::Domain;
use crate::client::{ConnectOptions, Home, ServerConn};
use rustls_pki_types::CertificateDer;
use std::collections::HashMap;
use std::sync::Mutex;

pub struct Federation {
    home: Home,
    cache: Mutex<HashMap<Domain, CertificateDer<'static>>>,
}

impl Federation {
    pub fn new(home: Home) -> Federation {
        Federation { home, cache: Mutex::default() }
    }

    /// The CA of `domain`: cached, pinned, or fetched from its server and pinned.
    pub async fn ca_for(&self, domain: &Domain) -> Result<CertificateDer<'static>, String> {
        if let Some(ca) = self.cache.lock().ok().and_then(|c| c.get(domain).cloned()) {
            return Ok(ca);
        }
        let ca = match self.home.pinned_ca(domain).map_err(|e| e.to_string())? {
            Some(ca) => ca,
            None => {
                let conn = ServerConn::connect(&self.home, domain, &ConnectOptions::default())
                    .await
                    .map_err(|e| e.to_string())?;
                tracing::info!(%domain, ca = %crate::identity::Fingerprint::of(&conn.ca), "pinned a federated domain's CA");
                conn.ca.clone()
            }
        };
        if let Ok(mut c) = self.cache.lock() {
            c.insert(domain.clone(), ca.clone());
        }
        Ok(ca)
    }
}
