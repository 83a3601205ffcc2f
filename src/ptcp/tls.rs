//! TLS 1.3 between two q2q identities, over a [`super::PtcpStream`] or any other
//! `AsyncRead + AsyncWrite` (a TCP stream works the same).
//!
//! Both ends present their `user@domain` certificate and check the other's:
//!
//! * the **dialer** names the exact [`Q2qAddress`] it means to reach and the CA it trusts for
//!   that domain; the acceptor's chain must end at that CA and its URI SAN must be exactly
//!   `q2q:<that address>` ([`connect`]);
//! * the **acceptor** requires a client certificate, reads the address it claims, looks up
//!   the CA of that domain in its [`Trust`] and checks the chain and the name the same way;
//!   it learns the caller's verified address ([`accept`]).
//!
//! Both check revocation through a hook (certificate serial in lowercase hex → revoked?).
//! webpki matches only DNS and IP names, so the chain is checked by webpki
//! ([`crate::identity::verify_identity`]) and the URI SAN by comparison. The reason a check
//! failed is recorded by the verifier and returned as a [`TlsError`] that names it (another
//! CA, another name, expired, revoked), not as a bare "bad certificate".
//!
//! In TLS 1.3 the client finishes its handshake before the server has checked the client's
//! certificate, so a dialer would learn of its rejection only at its first read. To give
//! the dialer a definite answer, the acceptor writes one byte ([`ACCEPTED`]) right after
//! the handshake and [`connect`] reads it: a rejection surfaces in [`connect`] as
//! [`TlsError::RejectedByPeer`] with the TLS alert (e.g. `CertificateExpired`).

use std::io;
use std::sync::{Arc, Mutex};

use rustls::client::danger::{ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DistinguishedName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_rustls::{TlsAcceptor, TlsConnector, client, server};

use crate::address::{Domain, Q2qAddress};
use crate::identity::{CertInfo, IdentityError, verify_identity};

/// ALPN of q2q peer streams: a peer certificate can never be mistaken for a control
/// connection's, and the reverse.
pub const ALPN: &[u8] = b"q2q-stream/1";

/// The byte an acceptor sends after it verified the dialer.
pub const ACCEPTED: u8 = 0x01;

/// Why a TLS stream between two identities could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The peer's certificate is not the identity expected: another CA, another name,
    /// expired, not yet valid, or unreadable.
    #[error(transparent)]
    Identity(#[from] IdentityError),
    /// The peer's certificate was revoked.
    #[error("the certificate of {address} (serial {serial}) is revoked")]
    Revoked {
        /// Whose certificate.
        address: Q2qAddress,
        /// Its serial, lowercase hex.
        serial: String,
    },
    /// The acceptor trusts no CA for the caller's domain.
    #[error("no CA is trusted for {0}")]
    UnknownDomain(Domain),
    /// The peer's certificate names no `q2q:` address.
    #[error("the peer's certificate names no q2q address")]
    NoAddress,
    /// The peer sent no certificate.
    #[error("the peer sent no certificate")]
    NoCertificate,
    /// The peer refused our certificate (the TLS alert it sent says why).
    #[error("the peer rejected our certificate: {0}")]
    RejectedByPeer(String),
    /// Our own identity cannot be used (key and certificate do not match, no address).
    #[error("invalid local identity: {0}")]
    LocalIdentity(String),
    /// Another TLS failure.
    #[error("TLS failed: {0}")]
    Tls(rustls::Error),
    /// The stream failed during the handshake.
    #[error("stream failed during the TLS handshake: {0}")]
    Io(io::Error),
}

/// Our side of a peer stream: our certificate chain (leaf first) and key.
#[derive(Debug)]
pub struct Identity {
    address: Q2qAddress,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

impl Clone for Identity {
    fn clone(&self) -> Identity {
        Identity {
            address: self.address.clone(),
            chain: self.chain.clone(),
            key: self.key.clone_key(),
        }
    }
}

impl Identity {
    /// An identity from its chain (leaf first; the CA may follow) and private key. The
    /// address is read from the leaf's URI SAN.
    pub fn new(
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    ) -> Result<Identity, TlsError> {
        let leaf = chain.first().ok_or_else(|| TlsError::LocalIdentity("no certificate".into()))?;
        let info = CertInfo::parse(leaf).map_err(|e| TlsError::LocalIdentity(e.to_string()))?;
        let address = info.address.ok_or_else(|| {
            TlsError::LocalIdentity("the certificate names no q2q address".into())
        })?;
        Ok(Identity { address, chain, key })
    }

    /// Whose identity this is.
    pub fn address(&self) -> &Q2qAddress {
        &self.address
    }
}

/// What an acceptor trusts: the CA of each domain it accepts callers from, and which
/// certificates are revoked.
pub trait Trust: Send + Sync + std::fmt::Debug {
    /// The CA certificate trusted for `domain`, if any.
    fn ca_for(&self, domain: &Domain) -> Option<CertificateDer<'static>>;
    /// Whether the certificate with this serial (lowercase hex) was revoked.
    fn is_revoked(&self, serial: &str) -> bool {
        let _ = serial;
        false
    }
}

/// A [`Trust`] held in memory.
#[derive(Debug, Clone, Default)]
pub struct TrustMap {
    cas: std::collections::HashMap<Domain, CertificateDer<'static>>,
    revoked: std::collections::HashSet<String>,
}

impl TrustMap {
    /// Trust nothing yet.
    pub fn new() -> TrustMap {
        TrustMap::default()
    }
    /// Trust `ca` for `domain`.
    pub fn with_ca(mut self, domain: Domain, ca: CertificateDer<'static>) -> TrustMap {
        self.cas.insert(domain, ca);
        self
    }
    /// Treat the certificate with this serial (hex) as revoked.
    pub fn with_revoked(mut self, serial: &str) -> TrustMap {
        self.revoked.insert(serial.to_ascii_lowercase());
        self
    }
}

impl Trust for TrustMap {
    fn ca_for(&self, domain: &Domain) -> Option<CertificateDer<'static>> {
        self.cas.get(domain).cloned()
    }
    fn is_revoked(&self, serial: &str) -> bool {
        self.revoked.contains(serial)
    }
}

/// Revocation check for a dialer: serial (lowercase hex) → revoked?
pub type RevocationCheck = Arc<dyn Fn(&str) -> bool + Send + Sync>;

/// A revocation check that revokes nothing.
pub fn no_revocation() -> RevocationCheck {
    Arc::new(|_| false)
}

/// Dial: TLS client on `io`, expecting exactly `peer`, whose domain's CA is `peer_ca`.
/// Returns once the acceptor has verified us too.
pub async fn connect<S>(
    io: S,
    me: &Identity,
    peer: &Q2qAddress,
    peer_ca: CertificateDer<'static>,
    is_revoked: RevocationCheck,
) -> Result<client::TlsStream<S>, TlsError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let verifier = Arc::new(ServerVerifier {
        expected: peer.clone(),
        ca: peer_ca,
        is_revoked,
        reason: Mutex::new(None),
        algorithms: crate::tls::provider().signature_verification_algorithms,
    });
    let mut config = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(TlsError::Tls)?
        .dangerous()
        .with_custom_certificate_verifier(verifier.clone())
        .with_client_auth_cert(me.chain.clone(), me.key.clone_key())
        .map_err(|e| TlsError::LocalIdentity(e.to_string()))?;
    config.alpn_protocols = vec![ALPN.to_vec()];
    // rustls wants a DNS name even though the verifier checks the URI SAN: the domain.
    let name = ServerName::try_from(peer.domain.to_string())
        .map_err(|e| TlsError::LocalIdentity(e.to_string()))?;
    let connector = TlsConnector::from(Arc::new(config));
    let taken = |v: &ServerVerifier| v.reason.lock().ok().and_then(|mut r| r.take());
    let mut tls = match connector.connect(name, io).await {
        Ok(t) => t,
        Err(e) => return Err(taken(&verifier).unwrap_or_else(|| from_io(e))),
    };
    let mut ok = [0u8; 1];
    match tls.read_exact(&mut ok).await {
        Ok(_) if ok[0] == ACCEPTED => Ok(tls),
        Ok(_) => Err(TlsError::Tls(rustls::Error::General("unexpected acceptance byte".into()))),
        Err(e) => Err(from_io(e)),
    }
}

/// Accept: TLS server on `io`, requiring a client certificate that `trust` vouches for.
/// Returns the stream and the caller's verified address.
pub async fn accept<S>(
    io: S,
    me: &Identity,
    trust: Arc<dyn Trust>,
) -> Result<(server::TlsStream<S>, Q2qAddress), TlsError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (mut tls, caller) = accept_unconfirmed(io, me, trust).await?;
    confirm(&mut tls).await?;
    Ok((tls, caller))
}

/// [`accept`] without the confirmation the dialer waits for: the caller is verified, and
/// the acceptor can act on it (install the session's keys) before it [`confirm`]s.
pub async fn accept_unconfirmed<S>(
    io: S,
    me: &Identity,
    trust: Arc<dyn Trust>,
) -> Result<(server::TlsStream<S>, Q2qAddress), TlsError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let verifier = Arc::new(ClientVerifier {
        trust,
        reason: Mutex::new(None),
        verified: Mutex::new(None),
        algorithms: crate::tls::provider().signature_verification_algorithms,
    });
    let mut config = rustls::ServerConfig::builder_with_provider(crate::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(TlsError::Tls)?
        .with_client_cert_verifier(verifier.clone())
        .with_single_cert(me.chain.clone(), me.key.clone_key())
        .map_err(|e| TlsError::LocalIdentity(e.to_string()))?;
    config.alpn_protocols = vec![ALPN.to_vec()];
    // No resumption: each stream proves both identities afresh.
    config.send_tls13_tickets = 0;
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let tls = match acceptor.accept(io).await {
        Ok(t) => t,
        Err(e) => {
            let reason = verifier.reason.lock().ok().and_then(|mut r| r.take());
            return Err(reason.unwrap_or_else(|| from_io(e)));
        }
    };
    let caller =
        verifier.verified.lock().ok().and_then(|mut v| v.take()).ok_or(TlsError::NoCertificate)?;
    Ok((tls, caller))
}

/// Tell the dialer it was accepted (the [`ACCEPTED`] byte its [`connect`] waits for).
pub async fn confirm<S>(tls: &mut server::TlsStream<S>) -> Result<(), TlsError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    tls.write_all(&[ACCEPTED]).await.map_err(TlsError::Io)?;
    tls.flush().await.map_err(TlsError::Io)
}

/// What both ends of a peer session take from its TLS handshake (RFC 8446 §7.5 exporter,
/// label [`SESSION_EXPORTER_LABEL`], the session id as context, so the secrets are bound
/// to both certificates, this handshake and this session).
#[derive(Clone, PartialEq, Eq)]
pub struct SessionSecrets {
    /// The keys that seal every datagram of the session, one per direction.
    pub keys: q2q_netstack::seal::SessionKeys,
    /// Proves, at the start of each later stream, that the stream belongs to this session
    /// (16 bytes).
    pub stream_token: [u8; STREAM_TOKEN_LEN],
}

impl std::fmt::Debug for SessionSecrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SessionSecrets(..)")
    }
}

/// The TLS exporter label of [`SessionSecrets`].
pub const SESSION_EXPORTER_LABEL: &[u8] = b"EXPORTER-q2q-session-v1";

/// Length of [`SessionSecrets::stream_token`], bytes.
pub const STREAM_TOKEN_LEN: usize = 16;

/// The secrets of session `session` from a finished handshake (either end: both derive
/// the same).
pub fn export_session<D>(
    conn: &rustls::ConnectionCommon<D>,
    session: u64,
) -> Result<SessionSecrets, TlsError> {
    use q2q_netstack::seal::KEY_LEN;
    let out = conn
        .export_keying_material(
            [0u8; 2 * KEY_LEN + STREAM_TOKEN_LEN],
            SESSION_EXPORTER_LABEL,
            Some(&session.to_be_bytes()),
        )
        .map_err(TlsError::Tls)?;
    let mut keys =
        q2q_netstack::seal::SessionKeys { initiator: [0; KEY_LEN], responder: [0; KEY_LEN] };
    keys.initiator.copy_from_slice(&out[..KEY_LEN]);
    keys.responder.copy_from_slice(&out[KEY_LEN..2 * KEY_LEN]);
    let mut stream_token = [0u8; STREAM_TOKEN_LEN];
    stream_token.copy_from_slice(&out[2 * KEY_LEN..]);
    Ok(SessionSecrets { keys, stream_token })
}

fn from_io(e: io::Error) -> TlsError {
    if e.get_ref().is_some_and(|i| i.is::<rustls::Error>()) {
        match e.into_inner().map(|i| i.downcast::<rustls::Error>()) {
            Some(Ok(tls)) => match *tls {
                rustls::Error::AlertReceived(alert) => {
                    TlsError::RejectedByPeer(format!("{alert:?}"))
                }
                other => TlsError::Tls(other),
            },
            _ => TlsError::Tls(rustls::Error::General("unreadable TLS error".into())),
        }
    } else {
        TlsError::Io(e)
    }
}

/// The alert-bearing rustls error for a failed identity check (the peer sees the alert).
fn as_rustls(e: &TlsError) -> rustls::Error {
    let c = match e {
        TlsError::Identity(IdentityError::Expired(_)) => CertificateError::Expired,
        TlsError::Identity(IdentityError::NotYetValid(_)) => CertificateError::NotValidYet,
        TlsError::Identity(IdentityError::OtherCa { .. }) | TlsError::UnknownDomain(_) => {
            CertificateError::UnknownIssuer
        }
        TlsError::Identity(IdentityError::WrongAddress { .. }) | TlsError::NoAddress => {
            CertificateError::NotValidForName
        }
        TlsError::Revoked { .. } => CertificateError::Revoked,
        _ => CertificateError::BadEncoding,
    };
    rustls::Error::InvalidCertificate(c)
}

fn check_revoked(
    info: &CertInfo,
    address: &Q2qAddress,
    is_revoked: impl Fn(&str) -> bool,
) -> Result<(), TlsError> {
    if is_revoked(&info.serial) {
        return Err(TlsError::Revoked { address: address.clone(), serial: info.serial.clone() });
    }
    Ok(())
}

struct ServerVerifier {
    expected: Q2qAddress,
    ca: CertificateDer<'static>,
    is_revoked: RevocationCheck,
    reason: Mutex<Option<TlsError>>,
    algorithms: rustls::crypto::WebPkiSupportedAlgorithms,
}

impl std::fmt::Debug for ServerVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerVerifier").field("expected", &self.expected).finish()
    }
}

impl ServerCertVerifier for ServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let r = verify_identity(end_entity, &self.ca, &self.expected, now)
            .map_err(TlsError::from)
            .and_then(|info| check_revoked(&info, &self.expected, |s| (self.is_revoked)(s)));
        match r {
            Ok(()) => Ok(ServerCertVerified::assertion()),
            Err(e) => {
                let out = as_rustls(&e);
                if let Ok(mut slot) = self.reason.lock() {
                    *slot = Some(e);
                }
                Err(out)
            }
        }
    }

    crate::tls::signature_checks!();
}

#[derive(Debug)]
struct ClientVerifier {
    trust: Arc<dyn Trust>,
    reason: Mutex<Option<TlsError>>,
    verified: Mutex<Option<Q2qAddress>>,
    algorithms: rustls::crypto::WebPkiSupportedAlgorithms,
}

impl ClientVerifier {
    fn check(
        &self,
        end_entity: &CertificateDer<'_>,
        now: UnixTime,
    ) -> Result<Q2qAddress, TlsError> {
        let info = CertInfo::parse(end_entity)
            .map_err(|e| TlsError::Identity(IdentityError::Invalid(e.to_string())))?;
        let address = info.address.clone().ok_or(TlsError::NoAddress)?;
        let ca = self
            .trust
            .ca_for(&address.domain)
            .ok_or_else(|| TlsError::UnknownDomain(address.domain.clone()))?;
        verify_identity(end_entity, &ca, &address, now)?;
        check_revoked(&info, &address, |s| self.trust.is_revoked(s))?;
        Ok(address)
    }
}

impl ClientCertVerifier for ClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        match self.check(end_entity, now) {
            Ok(address) => {
                if let Ok(mut v) = self.verified.lock() {
                    *v = Some(address);
                }
                Ok(ClientCertVerified::assertion())
            }
            Err(e) => {
                let out = as_rustls(&e);
                if let Ok(mut slot) = self.reason.lock() {
                    *slot = Some(e);
                }
                Err(out)
            }
        }
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    crate::tls::signature_checks!();
}
