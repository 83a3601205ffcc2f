//! Q2Q addresses: `user@domain`, parsed into types before anything else touches them.
//!
//! Vertex built file paths from network-supplied subjects (`../../x` wrote outside its data
//! directory). Here a [`Q2qAddress`] can only hold a [`User`] from a small charset and a
//! [`Domain`] of DNS labels, so neither can ever name a path component like `..`.

use std::fmt;
use std::str::FromStr;

/// Why a string is not a valid address, user or domain.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddressError {
    /// No `@` between user and domain.
    #[error("`{0}` is not a q2q address: expected user@domain, like alice@example.com")]
    MissingAt(String),
    /// The user part is empty, too long or has characters outside `a-z 0-9 . _ -`.
    #[error(
        "`{0}` is not a valid user name: use 1-64 of a-z 0-9 . _ -, starting with a letter or digit"
    )]
    BadUser(String),
    /// The domain is not a sequence of DNS labels.
    #[error("`{0}` is not a valid domain: use DNS labels of a-z 0-9 -, like example.com")]
    BadDomain(String),
    /// A service name outside `a-z 0-9 / . _ -`.
    #[error("`{0}` is not a valid service name: use 1-64 of a-z 0-9 / . _ -, like tcp/22 or file")]
    BadService(String),
}

/// The user part of an address: 1-64 characters of `a-z 0-9 . _ -`, starting with a letter
/// or digit, no `..`. Stored lowercase.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct User(String);

impl User {
    /// Parse and normalise (lowercase) a user name.
    pub fn parse(s: &str) -> Result<User, AddressError> {
        let lower = s.to_ascii_lowercase();
        let ok = (1..=64).contains(&lower.len())
            && lower
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
            && lower.as_bytes()[0].is_ascii_alphanumeric()
            && !lower.contains("..");
        if ok { Ok(User(lower)) } else { Err(AddressError::BadUser(s.to_string())) }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A domain: dot-separated DNS labels (1-63 of `a-z 0-9 -`, not starting or ending with
/// `-`), at most 253 characters. Stored lowercase, without a trailing dot.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Domain(String);

impl Domain {
    /// Parse and normalise (lowercase, trailing dot removed) a domain.
    pub fn parse(s: &str) -> Result<Domain, AddressError> {
        let lower = s.strip_suffix('.').unwrap_or(s).to_ascii_lowercase();
        let label_ok = |l: &str| {
            (1..=63).contains(&l.len())
                && l.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        };
        if !lower.is_empty() && lower.len() <= 253 && lower.split('.').all(label_ok) {
            Ok(Domain(lower))
        } else {
            Err(AddressError::BadDomain(s.to_string()))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// `user@domain`: who a person is on the q2q network.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Q2qAddress {
    pub user: User,
    pub domain: Domain,
}

impl Q2qAddress {
    /// Parse `user@domain`.
    pub fn parse(s: &str) -> Result<Q2qAddress, AddressError> {
        let (user, domain) = s.rsplit_once('@').ok_or_else(|| AddressError::MissingAt(s.into()))?;
        Ok(Q2qAddress { user: User::parse(user)?, domain: Domain::parse(domain)? })
    }

    pub fn new(user: User, domain: Domain) -> Q2qAddress {
        Q2qAddress { user, domain }
    }

    /// The URI put in certificates' subject alternative name: `q2q:user@domain`.
    pub fn uri(&self) -> String {
        format!("q2q:{self}")
    }

    /// The address named by a `q2q:user@domain` URI.
    pub fn from_uri(uri: &str) -> Option<Q2qAddress> {
        Q2qAddress::parse(uri.strip_prefix("q2q:")?).ok()
    }
}

impl fmt::Display for User {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Display for Domain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Display for Q2qAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.user, self.domain)
    }
}

/// A service a person offers: `tcp/22`, `udp/53`, `file`, or an application's own name.
/// 1-64 characters of `a-z 0-9 / . _ -`, starting with a letter or digit.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceName(String);

impl ServiceName {
    pub fn parse(s: &str) -> Result<ServiceName, AddressError> {
        let ok = (1..=64).contains(&s.len())
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"/._-".contains(&b))
            && s.as_bytes()[0].is_ascii_alphanumeric()
            && !s.contains("..");
        if ok {
            Ok(ServiceName(s.to_string()))
        } else {
            Err(AddressError::BadService(s.to_string()))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ServiceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

macro_rules! from_str_via_parse {
    ($($t:ty),*) => {$(
        impl FromStr for $t {
            type Err = AddressError;
            fn from_str(s: &str) -> Result<Self, AddressError> {
                <$t>::parse(s)
            }
        }
    )*};
}
from_str_via_parse!(User, Domain, Q2qAddress, ServiceName);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_normalises() {
        let a = Q2qAddress::parse("Alice@Example.COM.").unwrap();
        assert_eq!(a.to_string(), "alice@example.com");
        assert_eq!(a.uri(), "q2q:alice@example.com");
        assert_eq!(Q2qAddress::from_uri("q2q:alice@example.com"), Some(a));
    }

    #[test]
    fn rejects_hostile_and_malformed() {
        for bad in [
            "alice",
            "@example.com",
            "alice@",
            "../../x@example.com",
            "a/b@example.com",
            "a..b@example.com",
            ".alice@example.com",
            "alice@exa_mple.com",
            "alice@-example.com",
            "alice@example..com",
            "alice@ex/ample.com",
            "al ice@example.com",
        ] {
            assert!(Q2qAddress::parse(bad).is_err(), "{bad} should be rejected");
        }
        assert!(User::parse(&"a".repeat(65)).is_err());
        assert!(Domain::parse(&format!("{}.com", "a".repeat(64))).is_err());
    }
}
