//! The `*.q2q` naming rules: which DNS names are ours and whom they name.
//!
//! * `alice.example.com.q2q` is `alice@example.com`: the first label is the user, the labels
//!   between it and `q2q` are the domain.
//! * `alice.q2q` is alice at the node's own domain.
//! * `q2q` itself is the zone apex (it has an SOA, no addresses).
//! * Anything that does not end in the label `q2q` is not ours, whatever it looks like.
//!
//! Matching is case-insensitive (resolvers may randomise case). A user name may contain `.`;
//! in DNS that is one label holding a literal dot (`john\.doe.example.com.q2q` in presentation
//! form), never two labels. User and domain are parsed by [`crate::address`], so a name that
//! parses here is a valid [`Q2qAddress`]; everything else under `q2q` is [`Parsed::Malformed`]
//! (answered NXDOMAIN).

use crate::address::{Domain, Q2qAddress, User};
use hickory_proto::rr::Name;

/// The top-level label the shim answers for.
pub const TLD: &str = "q2q";

/// What a DNS name means to the shim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    /// Not under `q2q`: never answered as ours.
    NotOurs,
    /// `q2q.` itself.
    Apex,
    /// Under `q2q` but naming no valid address (bad characters, empty labels, a domain that is
    /// itself under `q2q`, …).
    Malformed,
    /// A person.
    Address(Q2qAddress),
}

/// The rules, bound to the node's own domain (for the short form `alice.q2q`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Names {
    own_domain: Domain,
}

impl Names {
    pub fn new(own_domain: Domain) -> Names {
        Names { own_domain }
    }

    /// The domain `alice.q2q` refers to.
    pub fn own_domain(&self) -> &Domain {
        &self.own_domain
    }

    /// Interpret a name given as raw labels, most significant last (as on the wire; no root
    /// label).
    pub fn parse_labels<'a, I>(&self, labels: I) -> Parsed
    where
        I: IntoIterator<Item = &'a [u8]>,
    {
        let labels: Vec<&[u8]> = labels.into_iter().collect();
        let Some((last, rest)) = labels.split_last() else { return Parsed::NotOurs };
        if !last.eq_ignore_ascii_case(TLD.as_bytes()) {
            return Parsed::NotOurs;
        }
        let Some((user, domain)) = rest.split_first() else { return Parsed::Apex };
        let Ok(user) = std::str::from_utf8(user) else { return Parsed::Malformed };
        let Ok(user) = User::parse(user) else { return Parsed::Malformed };
        let domain = if domain.is_empty() {
            self.own_domain.clone()
        } else {
            // The labels are joined with '.' for Domain::parse, so a label that itself holds a
            // '.' would silently become two labels: refuse it.
            if domain.iter().any(|l| l.contains(&b'.')) {
                return Parsed::Malformed;
            }
            let Some(joined) = domain
                .iter()
                .map(|l| std::str::from_utf8(l).ok())
                .collect::<Option<Vec<&str>>>()
                .map(|v| v.join("."))
            else {
                return Parsed::Malformed;
            };
            match Domain::parse(&joined) {
                Ok(d) => d,
                Err(_) => return Parsed::Malformed,
            }
        };
        // `alice.bob.q2q.q2q` would name a domain inside our own pseudo-TLD: refuse loops.
        if domain.as_str().rsplit('.').next() == Some(TLD) {
            return Parsed::Malformed;
        }
        Parsed::Address(Q2qAddress::new(user, domain))
    }

    /// Interpret a hickory [`Name`] (from a query).
    pub fn parse_name(&self, name: &Name) -> Parsed {
        self.parse_labels(name.iter())
    }

    /// Interpret a name in presentation form (`alice.q2q`, `Alice.Example.COM.q2q.`,
    /// `john\.doe.example.com.q2q`).
    pub fn parse(&self, s: &str) -> Parsed {
        match Name::from_ascii(s) {
            Ok(n) => self.parse_name(&n),
            // Unparseable text is ours only if it visibly ends in the TLD.
            Err(_) => {
                let t = s.strip_suffix('.').unwrap_or(s);
                let ours = t.len() >= TLD.len()
                    && t.get(t.len() - TLD.len()..).is_some_and(|x| x.eq_ignore_ascii_case(TLD))
                    && (t.len() == TLD.len() || t.as_bytes()[t.len() - TLD.len() - 1] == b'.');
                if ours { Parsed::Malformed } else { Parsed::NotOurs }
            }
        }
    }
}

/// The canonical (long) DNS name of an address: `alice.example.com.q2q.`; used for PTR.
pub fn dns_name(addr: &Q2qAddress) -> Name {
    let labels = std::iter::once(addr.user.as_str().as_bytes())
        .chain(addr.domain.as_str().split('.').map(str::as_bytes))
        .chain(std::iter::once(TLD.as_bytes()));
    // User is 1-64 characters, which is one more than a DNS label may hold: the 64-character
    // case (and a domain of 253 characters with the suffix) cannot be expressed in DNS.
    Name::from_labels(labels).unwrap_or_else(|_| Name::root())
}

/// Whether [`dns_name`] can express this address (user fits a 63-octet label, whole name
/// fits 255 octets).
pub fn has_dns_name(addr: &Q2qAddress) -> bool {
    !dns_name(addr).is_root()
}

/// The name of the zone apex, `q2q.`.
pub fn apex() -> Name {
    Name::from_labels([TLD.as_bytes()]).unwrap_or_else(|_| Name::root())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names() -> Names {
        Names::new(Domain::parse("home.example").unwrap())
    }

    fn addr(s: &str) -> Parsed {
        Parsed::Address(Q2qAddress::parse(s).unwrap())
    }

    #[test]
    fn long_and_short_forms() {
        let n = names();
        assert_eq!(n.parse("alice.example.com.q2q"), addr("alice@example.com"));
        assert_eq!(n.parse("alice.example.com.q2q."), addr("alice@example.com"));
        assert_eq!(n.parse("alice.q2q"), addr("alice@home.example"));
        assert_eq!(n.parse("alice.q2q."), addr("alice@home.example"));
        assert_eq!(n.parse("ALiCe.ExAmple.COM.Q2Q."), addr("alice@example.com"));
        assert_eq!(n.parse("q2q."), Parsed::Apex);
        assert_eq!(n.parse("Q2Q"), Parsed::Apex);
        // A dot inside the user label.
        assert_eq!(n.parse(r"john\.doe.example.com.q2q."), addr("john.doe@example.com"));
    }

    #[test]
    fn not_ours() {
        let n = names();
        for s in [
            "example.com",
            "example.com.",
            "alice.example.com",
            "q2q.example.com",
            "alice.q2q.example.com.",
            "alice.q2qq.",
            "alice.xq2q.",
            "",
            ".",
            "q2q-evil.",
            "in-addr.arpa.",
            concat!("1.0.64", ".100.in-addr.arpa."),
        ] {
            assert_eq!(n.parse(s), Parsed::NotOurs, "{s:?}");
        }
    }

    #[test]
    fn hostile_and_malformed() {
        let n = names();
        for s in [
            r"..\..\x.q2q",
            r"a\/b.example.com.q2q",
            r"\..example.com.q2q",
            r"alice.exa_mple.com.q2q",
            r"alice.-example.com.q2q",
            r"al\ ice.q2q",
            r"\000.q2q",
            r"alice\000.q2q",
            r"_ssh._tcp.alice.q2q",
            r"*.q2q",
            r"alice.bob.q2q.q2q",
            r"alice.q2q.q2q",
            r"alice.ex\.ample.com.q2q",
            r"a..b.q2q",
            r"\195\169lise.q2q",
            r"xn--lise-bsa.q2q.",
        ] {
            let got = n.parse(s);
            assert!(
                matches!(got, Parsed::Malformed) || s == "xn--lise-bsa.q2q.",
                "{s:?} gave {got:?}"
            );
        }
        // Punycode is a valid user charset (it is just ASCII); it names that literal user.
        assert_eq!(n.parse("xn--lise-bsa.q2q."), addr("xn--lise-bsa@home.example"));
        // Over-long label: 64 characters cannot be a DNS label at all.
        let long = format!("{}.q2q", "a".repeat(64));
        assert_eq!(n.parse(&long), Parsed::Malformed);
        // Raw non-UTF-8 bytes.
        assert_eq!(n.parse_labels([&b"\xff\xfe"[..], b"q2q"]), Parsed::Malformed);
        assert_eq!(n.parse_labels([&b"alice"[..], b"\xff", b"q2q"]), Parsed::Malformed);
        assert_eq!(n.parse_labels(std::iter::empty()), Parsed::NotOurs);
    }

    #[test]
    fn canonical_names_round_trip() {
        let n = names();
        for s in ["alice@example.com", "john.doe@a.b.example", "x-1_y@home.example"] {
            let a = Q2qAddress::parse(s).unwrap();
            assert!(has_dns_name(&a));
            let name = dns_name(&a);
            assert_eq!(n.parse_name(&name), Parsed::Address(a.clone()));
            assert_eq!(n.parse(&name.to_ascii()), Parsed::Address(a));
        }
        assert_eq!(
            dns_name(&Q2qAddress::parse("alice@example.com").unwrap()).to_ascii(),
            "alice.example.com.q2q."
        );
        let too_long = Q2qAddress::parse(&format!("{}@example.com", "a".repeat(64))).unwrap();
        assert!(!has_dns_name(&too_long));
        assert_eq!(apex().to_ascii(), "q2q.");
    }
}
