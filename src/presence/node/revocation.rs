//! Revocation at the node: a callee refuses sessions and streams from a caller whose
//! certificate its domain revoked, and a caller refuses a callee's the same way.
//!
//! The list of the peer's domain comes from that domain's server (the home connection for
//! our own domain, else the logged-in connection to that server), verified with the
//! domain's CA, and is kept in a bounded cache ([`crate::identity::revocation::Lists`], at
//! most [`MAX_LISTS`] domains of at most 64 KiB each), fetched again after
//! [`NodeConfig::revocation_max_age`]. It is checked when a session is authenticated
//! (the TLS handshake's revocation hook), on every stream the peer opens, and every
//! `revocation_max_age` while the session lives, so a session set up before the
//! revocation ends within that long. **Fail closed**: when no usable list can be had
//! (none held, or the one held is past its `nextUpdate`), the peer is refused.

use super::*;
use crate::address::Domain;
use crate::identity::revocation::RevocationList;
use rustls_pki_types::CertificateDer;

/// Most domains whose lists a node keeps.
pub(super) const MAX_LISTS: usize = 256;

/// What a callee trusts for one session's caller: its domain's CA and revocation list.
#[derive(Debug)]
pub(super) struct PeerTrust {
    pub(super) domain: Domain,
    pub(super) ca: CertificateDer<'static>,
    pub(super) list: Arc<RevocationList>,
}

impl crate::ptcp::tls::Trust for PeerTrust {
    fn ca_for(&self, domain: &Domain) -> Option<CertificateDer<'static>> {
        (*domain == self.domain).then(|| self.ca.clone())
    }
    fn is_revoked(&self, serial: &str) -> bool {
        self.list.is_revoked(serial)
    }
}

impl Node {
    /// The usable revocation list of `domain`, whose CA is `ca`: cached, or fetched from
    /// the domain's server and verified.
    pub(super) async fn revocation_list(
        &self,
        domain: &Domain,
        ca: &CertificateDer<'static>,
    ) -> Result<Arc<RevocationList>, NodeError> {
        let fetch = {
            let (node, domain) = (self.clone(), domain.clone());
            Box::pin(async move {
                let server = node.server_for(&domain).await.map_err(|e| e.to_string())?;
                server.revocations(&domain).await.map_err(|e| e.to_string())
            })
        };
        self.inner
            .revocations
            .current(domain, ca, fetch)
            .await
            .map_err(|e| NodeError::Revocation(e.to_string()))
    }

    /// Why the session's peer may no longer be served (its certificate is revoked, or
    /// that cannot be checked), or `None`. A session not authenticated yet has nothing
    /// to check.
    pub(super) async fn peer_refused(&self, ps: &PeerSession) -> Option<String> {
        let serial = ps.peer_serial()?;
        match self.revocation_list(&ps.peer.domain, &ps.ca).await {
            Ok(list) if list.is_revoked(serial) => {
                Some(format!("the certificate of {} has been revoked", ps.peer))
            }
            Ok(_) => None,
            Err(e) => Some(e.to_string()),
        }
    }
}

/// The serial (lowercase hex) of the certificate a TLS peer presented.
pub(super) fn peer_serial(conn: &rustls::CommonState) -> Option<String> {
    let cert = conn.peer_certificates()?.first()?;
    crate::identity::CertInfo::parse(cert).ok().map(|i| i.serial)
}
