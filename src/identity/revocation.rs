//! Revocation lists that travel: each domain publishes the certificates its CA revoked as
//! an X.509 v2 certificate revocation list (RFC 5280 §5), signed by the domain CA, and
//! everyone who checks a certificate of that domain (other servers, peers) checks it
//! against that list.
//!
//! The list (DER, at most [`MAX_LIST_BYTES`]: one AMP value) holds every revoked
//! certificate of the domain that has not expired yet, by serial, with its revocation time;
//! `thisUpdate`/`nextUpdate` say when it was made and until when its issuer vouches for it
//! ([`LIST_VALIDITY`] after), and the CRL number grows with every list made, so an older
//! list never replaces a newer one. The server answers it to anyone (`revocations`).
//!
//! [`Cache`] keeps the lists of other domains (sans-IO: it is given `now`): a list is
//! *fresh* for [`Cache::max_age`] after it was fetched and before its `nextUpdate`; a list
//! that is not fresh is fetched again; if that fails the old one is still used up to its
//! `nextUpdate`. Past that, or with no list at all, the check fails (closed): a certificate
//! whose revocation cannot be checked is not accepted. [`Lists`] owns one in a task for async
//! callers, who say how to fetch.

use crate::address::Domain;
use rustls_pki_types::CertificateDer;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};

/// Largest list accepted or published: one AMP value (35 bytes a revoked certificate:
/// about 1,800).
pub const MAX_LIST_BYTES: usize = crate::amp::MAX_VALUE_LEN;
/// How long after it was made a list is vouched for (its `nextUpdate`). A verifier that
/// cannot fetch a newer one keeps using it until then.
pub const LIST_VALIDITY: Duration = Duration::from_secs(3600);
/// Default for how long a fetched list is used before it is fetched again.
pub const DEFAULT_MAX_AGE: Duration = Duration::from_secs(60);
/// Clock skew tolerated on `thisUpdate` and `nextUpdate`, seconds.
const SKEW: i64 = 300;

/// A revoked certificate, as the issuer lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revoked {
    /// Serial number, lowercase hex (as [`crate::identity::CertInfo::serial`]).
    pub serial: String,
    /// When it was revoked, seconds since the Unix epoch.
    pub at: i64,
}

/// Why a list is not usable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ListError {
    /// Not a DER CRL, or trailing bytes, or larger than [`MAX_LIST_BYTES`].
    #[error("not a revocation list: {0}")]
    Malformed(String),
    /// Issued by another name, or the signature does not verify with the domain's CA.
    #[error("the revocation list is not signed by {0}'s CA")]
    NotSigned(String),
    /// Its `nextUpdate` has passed (or it has none), or its `thisUpdate` is in the future.
    #[error("the revocation list of {0} is out of date")]
    OutOfDate(String),
}

/// A list whose signature was checked: the revoked serials of one domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RevocationList {
    /// The CRL number: grows with every list the issuer makes.
    pub number: u128,
    /// Made at, and vouched for until, seconds since the Unix epoch.
    pub this_update: i64,
    pub next_update: i64,
    serials: HashSet<String>,
}

impl RevocationList {
    /// Parse `der` and check it is a list of `domain` signed by `ca`, current at `now`
    /// (seconds since the Unix epoch).
    pub fn verify(
        der: &[u8],
        ca: &CertificateDer<'_>,
        domain: &Domain,
        now: i64,
    ) -> Result<RevocationList, ListError> {
        use x509_parser::prelude::{CertificateRevocationList, FromDer, X509Certificate};
        let malformed = |e: &dyn std::fmt::Display| ListError::Malformed(e.to_string());
        if der.len() > MAX_LIST_BYTES {
            return Err(malformed(&format!("{} bytes", der.len())));
        }
        let (rest, crl) = CertificateRevocationList::from_der(der).map_err(|e| malformed(&e))?;
        if !rest.is_empty() {
            return Err(malformed(&"trailing bytes"));
        }
        let (_, ca) = X509Certificate::from_der(ca).map_err(|e| malformed(&e))?;
        let not_signed = || ListError::NotSigned(domain.to_string());
        if crl.issuer().as_raw() != ca.subject().as_raw() {
            return Err(not_signed());
        }
        crl.verify_signature(ca.public_key()).map_err(|_| not_signed())?;
        let this_update = crl.last_update().timestamp();
        let next_update = crl.next_update().map(|t| t.timestamp());
        let out_of_date = || ListError::OutOfDate(domain.to_string());
        let next_update = next_update.ok_or_else(out_of_date)?;
        if this_update > now + SKEW || next_update + SKEW < now {
            return Err(out_of_date());
        }
        let number = match crl.crl_number() {
            Some(n) => {
                let bytes = n.to_bytes_be();
                if bytes.len() > 16 {
                    return Err(malformed(&"CRL number longer than 128 bits"));
                }
                bytes.iter().fold(0u128, |acc, b| (acc << 8) | u128::from(*b))
            }
            None => return Err(malformed(&"no CRL number")),
        };
        let serials =
            crl.iter_revoked_certificates().map(|r| hex::encode(r.raw_serial())).collect();
        Ok(RevocationList { number, this_update, next_update, serials })
    }

    /// Whether the certificate with `serial` (lowercase hex) is on the list.
    pub fn is_revoked(&self, serial: &str) -> bool {
        self.serials.contains(serial)
    }

    /// How many certificates the list names.
    pub fn len(&self) -> usize {
        self.serials.len()
    }

    pub fn is_empty(&self) -> bool {
        self.serials.is_empty()
    }
}

/// What the cache holds for a domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    /// Fetched less than the maximum age ago, and vouched for now: use it.
    Fresh(Arc<RevocationList>),
    /// Usable (vouched for now) but due for a fetch; if the fetch fails, use it.
    Stale(Arc<RevocationList>),
    /// No usable list: fetch one, or refuse.
    Missing,
}

/// Other domains' lists, bounded in number and age (sans-IO: `now` is passed in, as an
/// [`Instant`] for ages and Unix seconds for the lists' own times).
#[derive(Debug)]
pub struct Cache {
    lists: HashMap<Domain, (Arc<RevocationList>, Instant)>,
    max_entries: usize,
    max_age: Duration,
}

impl Cache {
    /// At most `max_entries` domains, each list fetched again after `max_age`.
    pub fn new(max_entries: usize, max_age: Duration) -> Cache {
        Cache { lists: HashMap::new(), max_entries: max_entries.max(1), max_age }
    }

    pub fn max_age(&self) -> Duration {
        self.max_age
    }

    pub fn lookup(&self, domain: &Domain, now: Instant, unix_now: i64) -> Lookup {
        match self.lists.get(domain) {
            Some((list, _)) if list.next_update + SKEW < unix_now => Lookup::Missing,
            Some((list, at))
                if now.saturating_duration_since(*at) < self.max_age
                    && unix_now < list.next_update =>
            {
                Lookup::Fresh(list.clone())
            }
            Some((list, _)) => Lookup::Stale(list.clone()),
            None => Lookup::Missing,
        }
    }

    /// Keep `list` for `domain`, fetched at `now`, unless the one kept is newer (a replayed
    /// older list never undoes a revocation). Returns the list now kept. When full, the
    /// domain fetched longest ago is forgotten.
    pub fn insert(
        &mut self,
        domain: &Domain,
        list: RevocationList,
        now: Instant,
    ) -> Arc<RevocationList> {
        if let Some((kept, at)) = self.lists.get_mut(domain) {
            if kept.number > list.number {
                return kept.clone();
            }
            *kept = Arc::new(list);
            *at = now;
            return kept.clone();
        }
        if self.lists.len() >= self.max_entries
            && let Some(oldest) =
                self.lists.iter().min_by_key(|(_, (_, at))| *at).map(|(d, _)| d.clone())
        {
            self.lists.remove(&oldest);
        }
        let list = Arc::new(list);
        self.lists.insert(domain.clone(), (list.clone(), now));
        list
    }

    pub fn len(&self) -> usize {
        self.lists.len()
    }

    pub fn is_empty(&self) -> bool {
        self.lists.is_empty()
    }
}

/// Why a certificate's revocation could not be checked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unavailable {
    /// No usable list of the domain and none could be fetched (why: for the log).
    #[error("cannot check revocation for {domain}: {reason}")]
    NoList { domain: Domain, reason: String },
}

/// A fetch of a list (DER), as the owner of a [`Lists`] runs it.
pub type Fetch =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<Vec<u8>, String>> + Send>>;

/// Most domains fetched at once; a check beyond that uses what is held, or fails.
const MAX_IN_FLIGHT: usize = 64;

type Answer = Result<Arc<RevocationList>, Unavailable>;
type Waiting = (Option<Arc<RevocationList>>, Vec<oneshot::Sender<Answer>>);

enum Ask {
    Current {
        domain: Domain,
        ca: CertificateDer<'static>,
        fetch: Fetch,
        reply: oneshot::Sender<Answer>,
    },
    Fetched {
        domain: Domain,
        ca: CertificateDer<'static>,
        result: Result<Vec<u8>, String>,
    },
}

/// A [`Cache`] for async callers, owned by one task: [`Lists::current`] answers from it,
/// or has the list fetched, once per domain however many ask at the same time.
#[derive(Debug, Clone)]
pub struct Lists {
    asks: mpsc::Sender<Ask>,
    max_age: Duration,
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

impl std::fmt::Debug for Ask {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Ask::Current { domain, .. } => write!(f, "Current({domain})"),
            Ask::Fetched { domain, .. } => write!(f, "Fetched({domain})"),
        }
    }
}

impl Lists {
    /// At most `max_entries` domains, each fetched again after `max_age`. Starts the
    /// owning task (call within a tokio runtime); it ends with the last handle.
    pub fn new(max_entries: usize, max_age: Duration) -> Lists {
        let (asks, rx) = mpsc::channel(256);
        tokio::spawn(own(Cache::new(max_entries, max_age), rx, asks.downgrade()));
        Lists { asks, max_age }
    }

    /// How long a fetched list is used before it is fetched again.
    pub fn max_age(&self) -> Duration {
        self.max_age
    }

    /// The usable list of `domain` (whose CA is `ca`): the cached one while fresh, else
    /// one `fetch` brings (DER), verified; if the fetch fails, a stale cached one up to
    /// its `nextUpdate`; otherwise [`Unavailable`] (the caller refuses: fail closed).
    pub async fn current(
        &self,
        domain: &Domain,
        ca: &CertificateDer<'static>,
        fetch: Fetch,
    ) -> Answer {
        let gone =
            || Unavailable::NoList { domain: domain.clone(), reason: "shutting down".into() };
        let (reply, answer) = oneshot::channel();
        let ask = Ask::Current { domain: domain.clone(), ca: ca.clone(), fetch, reply };
        self.asks.send(ask).await.map_err(|_| gone())?;
        answer.await.map_err(|_| gone())?
    }
}

/// The owner of a [`Lists`]' cache and of the fetches under way (one per domain, its
/// askers waiting on it).
async fn own(mut cache: Cache, mut asks: mpsc::Receiver<Ask>, me: mpsc::WeakSender<Ask>) {
    // Per domain fetched now: the stale list held (if any) and who waits.
    let mut waiting: HashMap<Domain, Waiting> = HashMap::new();
    while let Some(ask) = asks.recv().await {
        match ask {
            Ask::Current { domain, ca, fetch, reply } => {
                let stale = match cache.lookup(&domain, Instant::now(), unix_now()) {
                    Lookup::Fresh(list) => {
                        let _ = reply.send(Ok(list));
                        continue;
                    }
                    Lookup::Stale(list) => Some(list),
                    Lookup::Missing => None,
                };
                if let Some((_, replies)) = waiting.get_mut(&domain) {
                    replies.push(reply);
                    continue;
                }
                let Some(me) = me.upgrade().filter(|_| waiting.len() < MAX_IN_FLIGHT) else {
                    let reason = "too many fetches under way".to_string();
                    let _ = reply.send(stale.ok_or(Unavailable::NoList { domain, reason }));
                    continue;
                };
                waiting.insert(domain.clone(), (stale, vec![reply]));
                tokio::spawn(async move {
                    let result = fetch.await;
                    let _ = me.send(Ask::Fetched { domain, ca, result }).await;
                });
            }
            Ask::Fetched { domain, ca, result } => {
                let Some((stale, replies)) = waiting.remove(&domain) else { continue };
                let verified = result.and_then(|der| {
                    RevocationList::verify(&der, &ca, &domain, unix_now())
                        .map_err(|e| e.to_string())
                });
                let answer = match (verified, stale) {
                    (Ok(list), _) => Ok(cache.insert(&domain, list, Instant::now())),
                    (Err(reason), Some(old)) => {
                        tracing::warn!(%domain, %reason, "revocation list not refreshed; using the one held");
                        Ok(old)
                    }
                    (Err(reason), None) => Err(Unavailable::NoList { domain, reason }),
                };
                for r in replies {
                    let _ = r.send(answer.clone());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::address::Q2qAddress;
    use crate::identity::{DomainCa, generate_key, signing_request};

    fn now() -> i64 {
        unix_now()
    }

    #[test]
    fn signed_lists_verify_and_name_the_revoked() {
        let d = Domain::parse("example.com").unwrap();
        let ca = DomainCa::generate(&d).unwrap();
        let alice = Q2qAddress::parse("alice@example.com").unwrap();
        let csr = signing_request(&generate_key().unwrap()).unwrap();
        let a = ca.issue_user(&alice, &csr, Duration::from_secs(3600)).unwrap();
        let b = ca.issue_user(&alice, &csr, Duration::from_secs(3600)).unwrap();
        let revoked = [Revoked { serial: a.info.serial.clone(), at: now() }];
        let der = ca.revocation_list(&revoked, 7, now(), LIST_VALIDITY).unwrap();
        let list = RevocationList::verify(&der, ca.cert_der(), &d, now()).unwrap();
        assert!(list.is_revoked(&a.info.serial));
        assert!(!list.is_revoked(&b.info.serial));
        assert_eq!((list.number, list.len()), (7, 1));
        assert!(list.next_update >= now() + 3500);

        // Another CA of the same name, a flipped byte, garbage, an expired list: refused.
        let other = DomainCa::generate(&d).unwrap();
        assert_eq!(
            RevocationList::verify(&der, other.cert_der(), &d, now()),
            Err(ListError::NotSigned("example.com".into()))
        );
        let mut bad = der.clone();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        assert!(RevocationList::verify(&bad, ca.cert_der(), &d, now()).is_err());
        assert!(matches!(
            RevocationList::verify(b"junk", ca.cert_der(), &d, now()),
            Err(ListError::Malformed(_))
        ));
        let later = now() + 2 * 3600;
        assert_eq!(
            RevocationList::verify(&der, ca.cert_der(), &d, later),
            Err(ListError::OutOfDate("example.com".into()))
        );
        let empty = ca.revocation_list(&[], 8, now(), LIST_VALIDITY).unwrap();
        assert!(RevocationList::verify(&empty, ca.cert_der(), &d, now()).unwrap().is_empty());
    }

    #[test]
    fn cache_ages_bounds_and_never_goes_back() {
        let d = Domain::parse("example.com").unwrap();
        let ca = DomainCa::generate(&d).unwrap();
        let list = |n: u64, serial: &str| {
            let r = [Revoked { serial: serial.into(), at: now() }];
            let der = ca.revocation_list(&r, n, now(), LIST_VALIDITY).unwrap();
            RevocationList::verify(&der, ca.cert_der(), &d, now()).unwrap()
        };
        let t0 = Instant::now();
        let mut c = Cache::new(2, Duration::from_secs(60));
        assert_eq!(c.lookup(&d, t0, now()), Lookup::Missing);
        c.insert(&d, list(2, "02"), t0);
        assert!(matches!(c.lookup(&d, t0 + Duration::from_secs(59), now()), Lookup::Fresh(_)));
        assert!(matches!(c.lookup(&d, t0 + Duration::from_secs(61), now()), Lookup::Stale(_)));
        // Past its nextUpdate (and the skew) it is not used at all.
        assert_eq!(c.lookup(&d, t0, now() + 3600 + 301), Lookup::Missing);
        // An older list (lower number) does not replace a newer one.
        let kept = c.insert(&d, list(1, "01"), t0);
        assert!(kept.is_revoked("02") && !kept.is_revoked("01"));
        let kept = c.insert(&d, list(3, "03"), t0);
        assert!(kept.is_revoked("03"));
        // Bounded: a third domain forgets the one fetched longest ago.
        let (e, f) = (Domain::parse("e.example").unwrap(), Domain::parse("f.example").unwrap());
        c.insert(&e, list(1, "01"), t0 + Duration::from_secs(1));
        c.insert(&f, list(1, "01"), t0 + Duration::from_secs(2));
        assert_eq!(c.len(), 2);
        assert_eq!(c.lookup(&d, t0, now()), Lookup::Missing);
    }

    #[test]
    fn fifteen_hundred_revocations_fit_in_one_amp_value() {
        let d = Domain::parse("example.com").unwrap();
        let ca = DomainCa::generate(&d).unwrap();
        let revoked: Vec<Revoked> = (0..1500u32)
            .map(|i| {
                let mut serial = [0x5au8; 16];
                serial[12..].copy_from_slice(&i.to_be_bytes());
                Revoked { serial: hex::encode(serial), at: now() }
            })
            .collect();
        let der = ca.revocation_list(&revoked, 1, now(), LIST_VALIDITY).unwrap();
        assert!(der.len() <= MAX_LIST_BYTES, "{} bytes", der.len());
        let list = RevocationList::verify(&der, ca.cert_der(), &d, now()).unwrap();
        assert_eq!(list.len(), 1500);
        assert!(list.is_revoked(&revoked[1499].serial));
    }

    #[tokio::test]
    async fn lists_fail_closed_without_a_usable_list() {
        let d = Domain::parse("example.com").unwrap();
        let ca = DomainCa::generate(&d).unwrap();
        let lists = Lists::new(4, Duration::ZERO);
        let down = || -> Fetch { Box::pin(async { Err("unreachable".to_string()) }) };
        let has = |der: Vec<u8>| -> Fetch { Box::pin(async move { Ok(der) }) };
        assert!(matches!(
            lists.current(&d, ca.cert_der(), down()).await,
            Err(Unavailable::NoList { .. })
        ));
        // A forged list (another CA's) is no list either.
        let other = DomainCa::generate(&d).unwrap();
        let forged = other.revocation_list(&[], 1, now(), LIST_VALIDITY).unwrap();
        let r = lists.current(&d, ca.cert_der(), has(forged)).await;
        assert!(r.is_err());
        // A real one is used; with max age 0 it is stale at once, and when the next fetch
        // fails it is still used (until its nextUpdate).
        let revoked = [Revoked { serial: "0a".into(), at: now() }];
        let der = ca.revocation_list(&revoked, 1, now(), LIST_VALIDITY).unwrap();
        let got = lists.current(&d, ca.cert_der(), has(der.clone())).await;
        assert!(got.unwrap().is_revoked("0a"));
        assert!(lists.current(&d, ca.cert_der(), down()).await.unwrap().is_revoked("0a"));
        // Askers at the same time share one fetch (and a later one finds it fresh).
        let lists = Lists::new(4, Duration::from_secs(3600));
        let fetches = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = |der: Vec<u8>| -> Fetch {
            let fetches = fetches.clone();
            Box::pin(async move {
                fetches.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(50)).await;
                Ok(der)
            })
        };
        let e = Domain::parse("e.example").unwrap();
        let ca_e = DomainCa::generate(&e).unwrap();
        let der_e = ca_e.revocation_list(&[], 1, now(), LIST_VALIDITY).unwrap();
        let (x, y) = tokio::join!(
            lists.current(&e, ca_e.cert_der(), counted(der_e.clone())),
            lists.current(&e, ca_e.cert_der(), counted(der_e.clone())),
        );
        assert!(x.is_ok() && y.is_ok());
        assert_eq!(fetches.load(std::sync::atomic::Ordering::SeqCst), 1);
    }
}
