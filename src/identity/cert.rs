//! Reading what a certificate says.

use crate::address::Q2qAddress;
use crate::identity::Fingerprint;
use x509_parser::prelude::*;

/// Why a certificate could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CertError {
    /// The text holds no PEM block of the expected kind.
    #[error("not a PEM certificate or key")]
    NotPem,
    /// The DER does not parse as X.509.
    #[error("not an X.509 certificate: {0}")]
    NotX509(String),
}

/// The facts of a certificate that q2q uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    /// The address in the `q2q:` URI SAN, if there is exactly one valid one.
    pub address: Option<Q2qAddress>,
    /// Serial number, lowercase hex.
    pub serial: String,
    /// Validity, seconds since the Unix epoch.
    pub not_before: i64,
    pub not_after: i64,
    pub is_ca: bool,
    pub fingerprint: Fingerprint,
    /// The subject's public key (its SubjectPublicKeyInfo, DER): renewal keeps it.
    pub public_key: Vec<u8>,
}

impl CertInfo {
    pub fn parse(der: &[u8]) -> Result<CertInfo, CertError> {
        let (_, cert) =
            X509Certificate::from_der(der).map_err(|e| CertError::NotX509(e.to_string()))?;
        let mut uris = Vec::new();
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for name in &san.value.general_names {
                if let GeneralName::URI(u) = name {
                    uris.push(*u);
                }
            }
        }
        let address = match uris.as_slice() {
            [one] => Q2qAddress::from_uri(one),
            _ => None,
        };
        Ok(CertInfo {
            address,
            serial: hex::encode(cert.raw_serial()),
            not_before: cert.validity().not_before.timestamp(),
            not_after: cert.validity().not_after.timestamp(),
            is_ca: cert.is_ca(),
            fingerprint: Fingerprint::of(der),
            public_key: cert.public_key().raw.to_vec(),
        })
    }
}
