//! Identities: the domain CA that an identity server holds, the `user@domain` certificates it
//! issues, and what a certificate says (its q2q address, expiry, fingerprint).
//!
//! Certificates are X.509 v3: random 128-bit serials, a URI SAN `q2q:user@domain` (and CN
//! the same), both client and server auth EKUs, so one certificate serves both ends of a
//! mutually authenticated TLS stream.
//!
//! [`renewal`] says when a certificate is due for renewal and when it is worth a warning,
//! and what clock skew is tolerated (pure: it takes `now`). [`revocation`]: the signed lists
//! of revoked certificates each domain publishes, and a bounded cache of other domains'.

mod ca;
mod cert;
mod fingerprint;
pub mod renewal;
pub mod revocation;
mod verify;

pub use ca::{CaError, DomainCa, IssuedCert};
pub use cert::{CertError, CertInfo};
pub use fingerprint::{Fingerprint, FingerprintError};
pub use verify::{IdentityError, verify_identity};

use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};

/// A fresh key pair for an identity (ECDSA P-256), generated locally: private keys never
/// leave the machine that made them.
pub fn generate_key() -> Result<rcgen::KeyPair, rcgen::Error> {
    rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
}

/// A certificate signing request for `key`. Its names do not matter: the server overwrites
/// every name with the address the password proved.
pub fn signing_request(key: &rcgen::KeyPair) -> Result<String, rcgen::Error> {
    rcgen::CertificateParams::new(Vec::<String>::new())?.serialize_request(key)?.pem()
}

/// The first certificate in a PEM text.
pub fn cert_from_pem(pem: &str) -> Result<CertificateDer<'static>, CertError> {
    CertificateDer::from_pem_slice(pem.as_bytes()).map_err(|_| CertError::NotPem)
}

/// A private key from PEM text.
pub fn key_from_pem(pem: &str) -> Result<PrivateKeyDer<'static>, CertError> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|_| CertError::NotPem)
}

/// PEM text for a DER certificate.
pub fn cert_to_pem(der: &CertificateDer<'_>) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der.as_ref());
    let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).unwrap_or_default());
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}
