//! The domain CA of an identity server.

use crate::address::{Domain, Q2qAddress};
use crate::identity::{CertInfo, Fingerprint};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls_pki_types::CertificateDer;
use std::time::Duration;
use time::OffsetDateTime;

/// Why the CA could not be made, loaded or used.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// rcgen refused (bad key, bad parameters).
    #[error("certificate operation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
    /// The certificate signing request is not a valid, self-signed CSR.
    #[error("the certificate request is not valid: {0}")]
    BadRequest(rcgen::Error),
    /// The stored CA certificate is not for this domain or not a CA.
    #[error("the CA certificate is not a CA for {0}")]
    NotOurCa(Domain),
}

/// A certificate the CA issued.
#[derive(Debug, Clone)]
pub struct IssuedCert {
    pub pem: String,
    pub der: CertificateDer<'static>,
    pub info: CertInfo,
}

/// A domain's certificate authority: signs user and server certificates for the domain.
pub struct DomainCa {
    domain: Domain,
    cert_pem: String,
    cert_der: CertificateDer<'static>,
    key_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

/// How long a new CA is valid.
const CA_LIFETIME: Duration = Duration::from_secs(20 * 365 * 86400);
/// Certificates start a little in the past so clocks slightly behind still accept them.
use super::renewal::BACKDATE;

impl DomainCa {
    /// A new CA for `domain`, with a new key.
    pub fn generate(domain: &Domain) -> Result<DomainCa, CaError> {
        let key = crate::identity::generate_key()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(DnType::CommonName, format!("q2q CA for {domain}"));
        params.distinguished_name.push(DnType::OrganizationName, domain.as_str());
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.serial_number = Some(random_serial());
        let now = OffsetDateTime::now_utc();
        params.not_before = now - BACKDATE;
        params.not_after = now + CA_LIFETIME;
        let cert = params.self_signed(&key)?;
        Self::load(domain, &cert.pem(), &key.serialize_pem())
    }

    /// The CA from its stored certificate and key.
    pub fn load(domain: &Domain, cert_pem: &str, key_pem: &str) -> Result<DomainCa, CaError> {
        let key = KeyPair::from_pem(key_pem)?;
        let cert_der = crate::identity::cert_from_pem(cert_pem)
            .map_err(|_| CaError::NotOurCa(domain.clone()))?;
        let info = CertInfo::parse(&cert_der).map_err(|_| CaError::NotOurCa(domain.clone()))?;
        if !info.is_ca {
            return Err(CaError::NotOurCa(domain.clone()));
        }
        let issuer = Issuer::from_ca_cert_der(&cert_der, key)?;
        Ok(DomainCa {
            domain: domain.clone(),
            cert_pem: cert_pem.to_string(),
            cert_der,
            key_pem: key_pem.to_string(),
            issuer,
        })
    }

    pub fn domain(&self) -> &Domain {
        &self.domain
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// The CA's private key in PEM: for writing to the 0600 key file, nowhere else.
    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    pub fn fingerprint(&self) -> Fingerprint {
        Fingerprint::of(&self.cert_der)
    }

    /// Sign a user's certificate request. Only the request's public key is used (after its
    /// self-signature proves the requester holds the key): every name in it is replaced, so
    /// the certificate says exactly `address`.
    pub fn issue_user(
        &self,
        address: &Q2qAddress,
        csr_pem: &str,
        lifetime: Duration,
    ) -> Result<IssuedCert, CaError> {
        let csr =
            CertificateSigningRequestParams::from_pem(csr_pem).map_err(CaError::BadRequest)?;
        self.finish_leaf(user_params(address)?, &csr.public_key, lifetime)
    }

    /// Renew: a certificate for `address` with a fresh validity, for the public key of
    /// `current` (DER), a certificate whose holder proved they hold its key. Only the key
    /// is taken from it; names and validity are made anew, as for [`DomainCa::issue_user`].
    pub fn renew_user(
        &self,
        address: &Q2qAddress,
        current: &[u8],
        lifetime: Duration,
    ) -> Result<IssuedCert, CaError> {
        use x509_parser::prelude::{FromDer, X509Certificate};
        let (_, cert) = X509Certificate::from_der(current)
            .map_err(|e| CaError::BadRequest(rcgen::Error::X509(e.to_string())))?;
        let key = rcgen::SubjectPublicKeyInfo::from_der(cert.public_key().raw)
            .map_err(CaError::BadRequest)?;
        self.finish_leaf(user_params(address)?, &key, lifetime)
    }

    /// A TLS server certificate for the identity server itself (DNS name = the domain),
    /// for `key`.
    pub fn issue_server(&self, key: &KeyPair, lifetime: Duration) -> Result<IssuedCert, CaError> {
        let mut params = CertificateParams::new(vec![self.domain.to_string()])?;
        params.distinguished_name.push(DnType::CommonName, self.domain.as_str());
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.finish_leaf(params, key, lifetime)
    }

    fn finish_leaf(
        &self,
        mut params: CertificateParams,
        public_key: &impl rcgen::PublicKeyData,
        lifetime: Duration,
    ) -> Result<IssuedCert, CaError> {
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.serial_number = Some(random_serial());
        params.use_authority_key_identifier_extension = true;
        let now = OffsetDateTime::now_utc();
        params.not_before = now - BACKDATE;
        params.not_after = now + lifetime;
        let cert = params.signed_by(public_key, &self.issuer)?;
        let der = cert.der().clone();
        let info = CertInfo::parse(&der).map_err(|_| CaError::NotOurCa(self.domain.clone()))?;
        Ok(IssuedCert { pem: cert.pem(), der, info })
    }
}

impl DomainCa {
    /// The domain's revocation list (X.509 v2 CRL, DER; see [`super::revocation`]):
    /// `revoked` certificates, CRL number `number`, made at `now` (Unix seconds, backdated
    /// a little for clocks behind) and vouched for `valid_for`.
    pub fn revocation_list(
        &self,
        revoked: &[super::revocation::Revoked],
        number: u64,
        now: i64,
        valid_for: Duration,
    ) -> Result<Vec<u8>, CaError> {
        use rcgen::{CertificateRevocationListParams, KeyIdMethod, RevokedCertParams};
        let at = |secs: i64| {
            OffsetDateTime::from_unix_timestamp(secs)
                .map_err(|_| CaError::Rcgen(rcgen::Error::Time))
        };
        let this_update = at(now)? - BACKDATE;
        let mut revoked_certs = Vec::with_capacity(revoked.len());
        for r in revoked {
            let serial = hex::decode(&r.serial)
                .map_err(|_| CaError::Rcgen(rcgen::Error::X509(format!("serial {}", r.serial))))?;
            revoked_certs.push(RevokedCertParams {
                serial_number: SerialNumber::from_slice(&serial),
                revocation_time: at(r.at)?,
                reason_code: None,
                invalidity_date: None,
            });
        }
        let params = CertificateRevocationListParams {
            this_update,
            next_update: at(now)? + valid_for,
            crl_number: SerialNumber::from(number),
            issuing_distribution_point: None,
            revoked_certs,
            key_identifier_method: KeyIdMethod::Sha256,
        };
        Ok(params.signed_by(&self.issuer)?.der().to_vec())
    }
}

/// The names and uses of a user certificate: exactly `address`, client and server auth.
fn user_params(address: &Q2qAddress) -> Result<CertificateParams, CaError> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name.push(DnType::CommonName, address.to_string());
    params.subject_alt_names =
        vec![SanType::URI(address.uri().try_into().map_err(CaError::Rcgen)?)];
    params.extended_key_usages =
        vec![ExtendedKeyUsagePurpose::ClientAuth, ExtendedKeyUsagePurpose::ServerAuth];
    Ok(params)
}

/// A random positive 128-bit serial (Vertex used one serial for everything).
fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    bytes[0] &= 0x7f;
    bytes[0] |= 0x01;
    SerialNumber::from_slice(&bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issues_exactly_the_proven_address() {
        let domain = Domain::parse("example.com").unwrap();
        let ca = DomainCa::generate(&domain).unwrap();
        let again = DomainCa::load(&domain, ca.cert_pem(), ca.key_pem()).unwrap();
        assert_eq!(again.fingerprint(), ca.fingerprint());

        let key = crate::identity::generate_key().unwrap();
        // The request claims to be the CA and mallory; the certificate must say alice only.
        let mut params = CertificateParams::new(vec!["mallory.example.com".to_string()]).unwrap();
        params.distinguished_name.push(DnType::CommonName, "mallory@example.com");
        let csr = params.serialize_request(&key).unwrap().pem().unwrap();
        let alice = Q2qAddress::parse("alice@example.com").unwrap();
        let issued = ca.issue_user(&alice, &csr, Duration::from_secs(86400)).unwrap();
        assert_eq!(issued.info.address, Some(alice));
        assert!(!issued.info.is_ca);
        assert!(issued.info.not_after - issued.info.not_before <= 86400 + 300);
        let again =
            ca.issue_user(&issued.info.address.clone().unwrap(), &csr, Duration::from_secs(60));
        assert_ne!(again.unwrap().info.serial, issued.info.serial);
        assert!(
            ca.issue_user(&issued.info.address.unwrap(), "garbage", Duration::from_secs(1))
                .is_err()
        );
    }

    #[test]
    fn renewal_keeps_the_key_and_makes_the_rest_anew() {
        let domain = Domain::parse("example.com").unwrap();
        let ca = DomainCa::generate(&domain).unwrap();
        let key = crate::identity::generate_key().unwrap();
        let csr = crate::identity::signing_request(&key).unwrap();
        let alice = Q2qAddress::parse("alice@example.com").unwrap();
        let first = ca.issue_user(&alice, &csr, Duration::from_secs(60)).unwrap();
        let renewed = ca.renew_user(&alice, &first.der, Duration::from_secs(3600)).unwrap();
        assert_eq!(renewed.info.address, Some(alice.clone()));
        assert_ne!(renewed.info.serial, first.info.serial);
        assert!(renewed.info.not_after >= first.info.not_after + 3600 - 60 - 1);
        let spki = |der: &[u8]| {
            use x509_parser::prelude::{FromDer, X509Certificate};
            X509Certificate::from_der(der).unwrap().1.public_key().raw.to_vec()
        };
        assert_eq!(spki(&renewed.der), spki(&first.der));
        assert_eq!(spki(&renewed.der), rcgen::PublicKeyData::subject_public_key_info(&key));
        // It verifies as alice, and the key signs for it (a TLS identity accepts the pair).
        let now = rustls_pki_types::UnixTime::now();
        crate::identity::verify_identity(&renewed.der, ca.cert_der(), &alice, now).unwrap();
        assert!(ca.renew_user(&alice, b"garbage", Duration::from_secs(1)).is_err());
    }
}
