//! SHA-256 fingerprints of certificates, written `sha256:<64 hex digits>`.

use std::fmt;
use std::str::FromStr;

/// The SHA-256 digest of a certificate's DER bytes.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint([u8; 32]);

/// Why a string is not a fingerprint.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not a SHA-256 fingerprint: expected sha256: and 64 hex digits (colons allowed)")]
pub struct FingerprintError(String);

impl Fingerprint {
    pub fn of(der: &[u8]) -> Fingerprint {
        let d = ring::digest::digest(&ring::digest::SHA256, der);
        let mut out = [0u8; 32];
        out.copy_from_slice(d.as_ref());
        Fingerprint(out)
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", hex::encode(self.0))
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for Fingerprint {
    type Err = FingerprintError;

    /// Accepts `sha256:ab12…`, `SHA256:AB:12:…` or bare hex.
    fn from_str(s: &str) -> Result<Fingerprint, FingerprintError> {
        let t = s.trim();
        let t = t.strip_prefix("sha256:").or_else(|| t.strip_prefix("SHA256:")).unwrap_or(t);
        let hexdigits: String = t.chars().filter(|c| *c != ':').collect();
        let mut out = [0u8; 32];
        hex::decode_to_slice(&hexdigits, &mut out).map_err(|_| FingerprintError(s.into()))?;
        Ok(Fingerprint(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_forms() {
        let f = Fingerprint::of(b"x");
        let s = f.to_string();
        assert!(s.starts_with("sha256:"));
        assert_eq!(s.parse::<Fingerprint>().unwrap(), f);
        let colons: String = hex::encode_upper(f.0)
            .as_bytes()
            .chunks(2)
            .map(|c| std::str::from_utf8(c).unwrap())
            .collect::<Vec<_>>()
            .join(":");
        assert_eq!(format!("SHA256:{colons}").parse::<Fingerprint>().unwrap(), f);
        assert!("sha256:1234".parse::<Fingerprint>().is_err());
    }
}
