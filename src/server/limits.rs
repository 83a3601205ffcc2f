//! The limits a connection handler checks before work an attacker could repeat: failed
//! password attempts per user and per source address, registrations per source address
//! and overall (this process's; with PostgreSQL the domain's, kept in the database), and
//! `exists` questions per caller and per source address. One task owns them all as a
//! sans-IO value ([`Limits`], `now` passed in); handlers ask it through a bounded channel
//! ([`LimitsHandle`]), so no table is written by several tasks.

use super::config::RegistrationLimit;
use super::ratelimit::{Buckets, RateLimitConfig, RateLimiter};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};

/// `exists` questions a caller (and a source address) may ask at once, then so many a
/// second.
pub const EXISTS_BURST: u32 = 30;
const EXISTS_PER_SEC: f64 = 1.0;

/// Every per-process limit of the handlers.
pub struct Limits {
    attempts: RateLimiter,
    /// Registrations per source address, and overall.
    registrations: (Buckets, Buckets),
    exists: Buckets,
}

impl Limits {
    pub fn new(attempts: RateLimitConfig, registration: &RegistrationLimit) -> Limits {
        let every = |secs: u64| 1.0 / secs.max(1) as f64;
        let r = registration;
        Limits {
            attempts: RateLimiter::new(attempts),
            registrations: (
                Buckets::new(r.per_address_burst, every(r.per_address_every_secs)),
                Buckets::new(r.overall_burst, every(r.overall_every_secs)),
            ),
            exists: Buckets::new(EXISTS_BURST, EXISTS_PER_SEC),
        }
    }

    /// A registration from source address `ip` (its [`super::admission::source_key`]).
    pub fn registration(&mut self, ip: &str, now: Instant) -> Result<(), Duration> {
        let (per_address, overall) = &mut self.registrations;
        let wait = per_address.wait(ip, now).max(overall.wait("", now));
        if !wait.is_zero() {
            return Err(wait);
        }
        per_address.take(ip, now);
        overall.take("", now);
        Ok(())
    }

    /// An `exists` question counted against each of `keys` (the caller, its source).
    pub fn exists(&mut self, keys: &[String], now: Instant) -> Result<(), Duration> {
        let wait = keys.iter().map(|k| self.exists.wait(k, now)).max().unwrap_or_default();
        if !wait.is_zero() {
            return Err(wait);
        }
        keys.iter().for_each(|k| self.exists.take(k, now));
        Ok(())
    }
}

enum Request {
    Check { keys: Vec<String>, reply: oneshot::Sender<Result<(), Duration>> },
    Failure { keys: Vec<String> },
    Success { key: String },
    Registration { ip: String, reply: oneshot::Sender<Result<(), Duration>> },
    Exists { keys: Vec<String>, reply: oneshot::Sender<Result<(), Duration>> },
}

/// Requests that may wait for the owner at once; more make their handler wait.
const QUEUE: usize = 1024;

/// A handle to the task that owns the [`Limits`]; the task ends with the last handle. If
/// it is gone (the server stopping), every check passes.
pub struct LimitsHandle {
    requests: mpsc::Sender<Request>,
}

impl LimitsHandle {
    /// Start the owner of `limits` on the current runtime.
    pub fn start(limits: Limits) -> LimitsHandle {
        let (requests, rx) = mpsc::channel(QUEUE);
        tokio::spawn(own(limits, rx));
        LimitsHandle { requests }
    }

    async fn ask(
        &self,
        request: impl FnOnce(oneshot::Sender<Result<(), Duration>>) -> Request,
    ) -> Result<(), Duration> {
        super::ask_owner(&self.requests, request).await.unwrap_or(Ok(()))
    }

    /// `Err(wait)` if a password attempt for any of `keys` must wait that long first.
    pub async fn check_attempt(&self, keys: &[&str]) -> Result<(), Duration> {
        let keys = keys.iter().map(|k| k.to_string()).collect();
        self.ask(|reply| Request::Check { keys, reply }).await
    }

    /// Count a failed password attempt against each of `keys`.
    pub async fn failed_attempt(&self, keys: &[&str]) {
        let keys = keys.iter().map(|k| k.to_string()).collect();
        let _ = self.requests.send(Request::Failure { keys }).await;
    }

    /// Forget the failed attempts of `key` (a user who just logged in).
    pub async fn good_attempt(&self, key: &str) {
        let _ = self.requests.send(Request::Success { key: key.to_string() }).await;
    }

    /// [`Limits::registration`].
    pub async fn registration(&self, ip: &str) -> Result<(), Duration> {
        let ip = ip.to_string();
        self.ask(|reply| Request::Registration { ip, reply }).await
    }

    /// [`Limits::exists`].
    pub async fn exists(&self, keys: Vec<String>) -> Result<(), Duration> {
        self.ask(|reply| Request::Exists { keys, reply }).await
    }
}

/// The owner: answers requests in order until every handle is gone.
async fn own(mut limits: Limits, mut requests: mpsc::Receiver<Request>) {
    while let Some(r) = requests.recv().await {
        let now = Instant::now();
        match r {
            Request::Check { keys, reply } => {
                let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
                let _ = reply.send(limits.attempts.check(&keys, now));
            }
            Request::Failure { keys } => {
                let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
                limits.attempts.failure(&keys, now);
            }
            Request::Success { key } => limits.attempts.success(&key),
            Request::Registration { ip, reply } => {
                let _ = reply.send(limits.registration(&ip, now));
            }
            Request::Exists { keys, reply } => {
                let _ = reply.send(limits.exists(&keys, now));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registrations_per_address_and_overall() {
        let g = RegistrationLimit {
            per_address_burst: 2,
            per_address_every_secs: 60,
            overall_burst: 3,
            overall_every_secs: 60,
        };
        let mut l = Limits::new(RateLimitConfig::default(), &g);
        let t0 = Instant::now();
        assert_eq!(l.registration("192.0.2.1", t0), Ok(()));
        assert_eq!(l.registration("192.0.2.1", t0), Ok(()));
        assert!(l.registration("192.0.2.1", t0).is_err(), "the address's budget is spent");
        assert_eq!(l.registration("192.0.2.2", t0), Ok(()));
        // The overall budget is spent now; a refused one spent nothing of the address's.
        assert!(l.registration("192.0.2.3", t0).is_err());
        assert_eq!(l.registration("192.0.2.3", t0 + Duration::from_secs(60)), Ok(()));
    }

    #[test]
    fn exists_per_caller_and_per_source() {
        let mut l = Limits::new(RateLimitConfig::default(), &RegistrationLimit::default());
        let t0 = Instant::now();
        let keys = |c: &str, ip: &str| vec![format!("caller:{c}"), format!("ip:{ip}")];
        for _ in 0..EXISTS_BURST {
            assert_eq!(l.exists(&keys("a@x", "192.0.2.1"), t0), Ok(()));
        }
        assert!(l.exists(&keys("a@x", "192.0.2.2"), t0).is_err(), "the caller's are spent");
        assert!(l.exists(&keys("b@x", "192.0.2.1"), t0).is_err(), "the source's are spent");
        assert_eq!(l.exists(&keys("b@x", "192.0.2.2"), t0), Ok(()));
    }

    #[tokio::test]
    async fn the_owner_answers_in_order() {
        let h = LimitsHandle::start(Limits::new(
            RateLimitConfig { free_failures: 1, ..Default::default() },
            &RegistrationLimit::default(),
        ));
        let keys = ["user:alice", "ip:192.0.2.1"];
        assert_eq!(h.check_attempt(&keys).await, Ok(()));
        h.failed_attempt(&keys).await;
        h.failed_attempt(&keys).await;
        assert!(h.check_attempt(&["ip:192.0.2.1"]).await.is_err());
        h.good_attempt("user:alice").await;
        assert_eq!(h.check_attempt(&["user:alice"]).await, Ok(()));
    }
}
