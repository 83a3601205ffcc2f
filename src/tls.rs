//! TLS 1.3 configurations for control connections: one crypto provider (ring) shared by
//! rustls and rcgen, passed explicitly.
//!
//! The client trusts a server by its domain CA, pinned on first contact like an SSH
//! known_hosts entry (or up front by fingerprint): [`CaPinVerifier`] checks that the server's
//! certificate chains to the pinned CA and names the domain, and remembers which CA the
//! server presented so the caller can pin it or report exactly what changed.

use crate::address::Domain;
use crate::identity::Fingerprint;
use rustls::RootCertStore;
use rustls::client::danger::{ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use std::sync::{Arc, Mutex};

/// The three signature checks every q2q certificate verifier delegates to the provider's
/// algorithms (`self.algorithms`): one definition for the control and peer verifiers.
macro_rules! signature_checks {
    () => {
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &rustls::pki_types::CertificateDer<'_>,
            dss: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &rustls::pki_types::CertificateDer<'_>,
            dss: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
        }

        fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
            self.algorithms.supported_schemes()
        }
    };
}
pub(crate) use signature_checks;

/// The process-wide crypto provider.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Server side of a control connection: present `chain` (leaf then CA); accept an optional
/// client certificate from any domain (see [`ProvenClientCert`]).
pub fn server_config(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<rustls::ServerConfig, rustls::Error> {
    let provider = provider();
    let client_verifier =
        Arc::new(ProvenClientCert { algorithms: provider.signature_verification_algorithms });
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(client_verifier)
        .with_single_cert(chain, key)?;
    config.alpn_protocols = vec![crate::proto::ALPN.to_vec()];
    Ok(config)
}

/// Client side of a control connection to `verifier`'s domain, logged in with `identity`
/// (certificate chain and key) when given.
pub fn client_config(
    verifier: Arc<CaPinVerifier>,
    identity: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
) -> Result<rustls::ClientConfig, rustls::Error> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut config = match identity {
        Some((chain, key)) => builder.with_client_auth_cert(chain, key)?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![crate::proto::ALPN.to_vec()];
    Ok(config)
}

/// Verifies an identity server by its domain CA: pinned, or trusted on first use.
#[derive(Debug)]
pub struct CaPinVerifier {
    domain: Domain,
    expected: Option<Fingerprint>,
    presented: Mutex<Option<CertificateDer<'static>>>,
    algorithms: rustls::crypto::WebPkiSupportedAlgorithms,
}

impl CaPinVerifier {
    /// Verify servers of `domain`; with `expected`, only a CA with that fingerprint is
    /// accepted; without, any self-consistent chain is (trust on first use), and the caller
    /// pins [`CaPinVerifier::presented_ca`] afterwards.
    pub fn new(domain: Domain, expected: Option<Fingerprint>) -> CaPinVerifier {
        CaPinVerifier {
            domain,
            expected,
            presented: Mutex::new(None),
            algorithms: provider().signature_verification_algorithms,
        }
    }

    /// The CA certificate the server presented during the last handshake.
    pub fn presented_ca(&self) -> Option<CertificateDer<'static>> {
        self.presented.lock().ok()?.clone()
    }
}

impl ServerCertVerifier for CaPinVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ca = intermediates
            .last()
            .ok_or_else(|| rustls::Error::General("server sent no CA certificate".into()))?;
        if let Ok(mut p) = self.presented.lock() {
            *p = Some(ca.clone().into_owned());
        }
        if let Some(expected) = self.expected
            && Fingerprint::of(ca) != expected
        {
            return Err(rustls::Error::General(format!(
                "server's CA {} is not the expected {expected}",
                Fingerprint::of(ca)
            )));
        }
        let mut roots = RootCertStore::empty();
        roots.add(ca.clone().into_owned())?;
        let parsed = rustls::server::ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &roots,
            &[],
            now,
            self.algorithms.all,
        )?;
        // The name checked is the domain, not the host we dialled: an identity server is
        // whoever holds the domain's CA, wherever it runs.
        let name = ServerName::try_from(self.domain.to_string())
            .map_err(|e| rustls::Error::General(e.to_string()))?;
        rustls::client::verify_server_name(&parsed, &name)?;
        Ok(ServerCertVerified::assertion())
    }

    crate::tls::signature_checks!();
}

/// Accepts any well-formed client certificate whose key signed the handshake. Whose
/// certificate it is (which domain's CA, which address, revoked or not) is checked by the
/// server after the handshake, because a foreign domain's CA may first have to be fetched
/// from that domain's server (federation), which a synchronous verifier cannot do.
#[derive(Debug)]
pub struct ProvenClientCert {
    algorithms: rustls::crypto::WebPkiSupportedAlgorithms,
}

impl rustls::server::danger::ClientCertVerifier for ProvenClientCert {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<rustls::server::danger::ClientCertVerified, rustls::Error> {
        rustls::server::ParsedCertificate::try_from(end_entity)?;
        Ok(rustls::server::danger::ClientCertVerified::assertion())
    }

    crate::tls::signature_checks!();
}
