//! Checking that a certificate is a valid q2q identity: it chains to the expected domain CA
//! and its `q2q:` URI SAN is exactly the address expected. webpki checks only DNS and IP
//! names, so the chain is checked by webpki and the URI SAN here.

use super::CertInfo;
use crate::address::Q2qAddress;
use rustls::RootCertStore;
use rustls::pki_types::{CertificateDer, UnixTime};

/// Why a certificate is not the identity expected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    #[error("the certificate is not signed by {domain}'s CA")]
    OtherCa { domain: String },
    #[error("the certificate is for {found}, not {expected}")]
    WrongAddress { expected: Q2qAddress, found: String },
    #[error("the certificate of {0} has expired")]
    Expired(Q2qAddress),
    #[error("the certificate of {0} is not valid yet")]
    NotYetValid(Q2qAddress),
    #[error("invalid certificate: {0}")]
    Invalid(String),
}

/// Verify `cert` as the identity `expected`, issued by `ca`, at time `now`.
pub fn verify_identity(
    cert: &CertificateDer<'_>,
    ca: &CertificateDer<'_>,
    expected: &Q2qAddress,
    now: UnixTime,
) -> Result<CertInfo, IdentityError> {
    let info = CertInfo::parse(cert).map_err(|e| IdentityError::Invalid(e.to_string()))?;
    let found =
        info.address.as_ref().map_or_else(|| "no q2q address".to_string(), ToString::to_string);
    if info.address.as_ref() != Some(expected) {
        return Err(IdentityError::WrongAddress { expected: expected.clone(), found });
    }
    let mut roots = RootCertStore::empty();
    roots.add(ca.clone().into_owned()).map_err(|e| IdentityError::Invalid(format!("CA: {e}")))?;
    let parsed = rustls::server::ParsedCertificate::try_from(cert)
        .map_err(|e| IdentityError::Invalid(e.to_string()))?;
    let algs = crate::tls::provider().signature_verification_algorithms.all;
    rustls::client::verify_server_cert_signed_by_trust_anchor(&parsed, &roots, &[], now, algs)
        .map_err(|e| {
            use rustls::{CertificateError as C, Error as E};
            match e {
                E::InvalidCertificate(C::Expired | C::ExpiredContext { .. }) => {
                    IdentityError::Expired(expected.clone())
                }
                E::InvalidCertificate(C::NotValidYet | C::NotValidYetContext { .. }) => {
                    IdentityError::NotYetValid(expected.clone())
                }
                E::InvalidCertificate(C::UnknownIssuer | C::BadSignature) => {
                    IdentityError::OtherCa { domain: expected.domain.to_string() }
                }
                other => IdentityError::Invalid(other.to_string()),
            }
        })?;
    Ok(info)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::address::Domain;
    use crate::identity::{DomainCa, generate_key, signing_request};
    use std::time::Duration;

    #[test]
    fn names_the_reason() {
        let d = Domain::parse("example.com").unwrap();
        let ca = DomainCa::generate(&d).unwrap();
        let other = DomainCa::generate(&d).unwrap();
        let alice = Q2qAddress::parse("alice@example.com").unwrap();
        let bob = Q2qAddress::parse("bob@example.com").unwrap();
        let csr = signing_request(&generate_key().unwrap()).unwrap();
        let cert = ca.issue_user(&alice, &csr, Duration::from_secs(3600)).unwrap().der;
        let now = UnixTime::now();
        assert!(verify_identity(&cert, ca.cert_der(), &alice, now).is_ok());
        assert!(matches!(
            verify_identity(&cert, ca.cert_der(), &bob, now),
            Err(IdentityError::WrongAddress { .. })
        ));
        assert!(matches!(
            verify_identity(&cert, other.cert_der(), &alice, now),
            Err(IdentityError::OtherCa { .. })
        ));
        let later = UnixTime::since_unix_epoch(Duration::from_secs(now.as_secs() + 7200));
        assert_eq!(
            verify_identity(&cert, ca.cert_der(), &alice, later),
            Err(IdentityError::Expired(alice))
        );
    }
}
