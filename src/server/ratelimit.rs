//! Slowing password guessing, per user and per source address.
//!
//! Each key (a user, an address) may fail `free_failures` times; after that each further
//! attempt must wait `base_delay × 2^(extra failures)`, capped at `max_delay`, since the last
//! failure. Attempts during the wait are refused without checking the password, so a
//! guesser gets a handful of tries per hour, not thousands per second. Counts are forgotten
//! after `forget_after` without a failure. Sans-IO: the caller passes `now`.

use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// Settings of the limiter (the `[rate_limit]` table of the server config).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct RateLimitConfig {
    pub free_failures: u32,
    pub base_delay_ms: u64,
    pub max_delay_secs: u64,
    pub forget_after_secs: u64,
}

impl Default for RateLimitConfig {
    fn default() -> Self {
        RateLimitConfig {
            free_failures: 3,
            base_delay_ms: 1000,
            max_delay_secs: 300,
            forget_after_secs: 900,
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    failures: u32,
    last_failure: Instant,
}

/// The failure counts of users and addresses.
#[derive(Debug)]
pub struct RateLimiter {
    config: RateLimitConfig,
    entries: HashMap<String, Entry>,
}

/// Most keys tracked; past this, the oldest are forgotten first (bounds memory under a flood
/// of source addresses).
const MAX_KEYS: usize = 100_000;

impl RateLimiter {
    pub fn new(config: RateLimitConfig) -> RateLimiter {
        RateLimiter { config, entries: HashMap::new() }
    }

    /// `Err(wait)` if an attempt for any of `keys` must wait that long first.
    pub fn check(&mut self, keys: &[&str], now: Instant) -> Result<(), Duration> {
        let mut wait = Duration::ZERO;
        for key in keys {
            if let Some(e) = self.live(key, now) {
                let until = e.last_failure + self.delay(e.failures);
                wait = wait.max(until.saturating_duration_since(now));
            }
        }
        if wait.is_zero() { Ok(()) } else { Err(wait) }
    }

    /// Count a failed attempt against each of `keys`.
    pub fn failure(&mut self, keys: &[&str], now: Instant) {
        if self.entries.len() >= MAX_KEYS {
            self.sweep(now);
        }
        for key in keys {
            let failures = self.live(key, now).map_or(0, |e| e.failures) + 1;
            self.entries.insert(key.to_string(), Entry { failures, last_failure: now });
        }
    }

    /// Forget the failures of `key` (after a successful login of that user).
    pub fn success(&mut self, key: &str) {
        self.entries.remove(key);
    }

    fn live(&self, key: &str, now: Instant) -> Option<Entry> {
        let e = *self.entries.get(key)?;
        let forget = Duration::from_secs(self.config.forget_after_secs);
        (now.saturating_duration_since(e.last_failure) < forget).then_some(e)
    }

    fn delay(&self, failures: u32) -> Duration {
        let Some(extra) = failures.checked_sub(self.config.free_failures) else {
            return Duration::ZERO;
        };
        let base = Duration::from_millis(self.config.base_delay_ms);
        let max = Duration::from_secs(self.config.max_delay_secs);
        base.saturating_mul(2u32.saturating_pow(extra.min(30))).min(max)
    }

    fn sweep(&mut self, now: Instant) {
        let forget = Duration::from_secs(self.config.forget_after_secs);
        self.entries.retain(|_, e| now.saturating_duration_since(e.last_failure) < forget);
        if self.entries.len() >= MAX_KEYS {
            let mut ages: Vec<_> =
                self.entries.iter().map(|(k, e)| (e.last_failure, k.clone())).collect();
            ages.sort();
            for (_, k) in ages.into_iter().take(MAX_KEYS / 10) {
                self.entries.remove(&k);
            }
        }
    }
}

/// A token bucket's tokens after `elapsed`: `tokens` plus `per_sec` a second, at most
/// `burst`. Shared by [`Buckets`] and the buckets kept in PostgreSQL for all instances.
pub fn refill(tokens: f64, elapsed: Duration, burst: f64, per_sec: f64) -> f64 {
    (tokens + elapsed.as_secs_f64() * per_sec).min(burst)
}

/// How long until a bucket holding `tokens` has a whole one, at `per_sec` (zero: now).
pub fn wait_for_token(tokens: f64, per_sec: f64) -> Duration {
    let missing = 1.0 - tokens;
    if missing <= 0.0 { Duration::ZERO } else { Duration::from_secs_f64(missing / per_sec) }
}

/// Token buckets by key: each key may do `burst` things at once, then `per_sec` a second.
/// Sans-IO like [`RateLimiter`]; memory is bounded the same way.
#[derive(Debug)]
pub struct Buckets {
    burst: f64,
    per_sec: f64,
    /// Tokens left and when they were counted.
    entries: HashMap<String, (f64, Instant)>,
}

impl Buckets {
    pub fn new(burst: u32, per_sec: f64) -> Buckets {
        Buckets {
            burst: f64::from(burst.max(1)),
            per_sec: per_sec.max(1e-3),
            entries: HashMap::new(),
        }
    }

    fn tokens(&self, key: &str, now: Instant) -> f64 {
        self.entries.get(key).map_or(self.burst, |(t, at)| {
            refill(*t, now.saturating_duration_since(*at), self.burst, self.per_sec)
        })
    }

    /// How long until `key` has a token (zero: it has one now).
    pub fn wait(&self, key: &str, now: Instant) -> Duration {
        wait_for_token(self.tokens(key, now), self.per_sec)
    }

    /// Spend a token of `key` (call after [`Buckets::wait`] said zero).
    pub fn take(&mut self, key: &str, now: Instant) {
        if self.entries.len() >= MAX_KEYS {
            // A full bucket is the same as no entry: forget those first, then the oldest.
            let (burst, per_sec) = (self.burst, self.per_sec);
            self.entries.retain(|_, (t, at)| {
                *t + now.saturating_duration_since(*at).as_secs_f64() * per_sec < burst
            });
            if self.entries.len() >= MAX_KEYS {
                let mut ages: Vec<_> =
                    self.entries.iter().map(|(k, (_, at))| (*at, k.clone())).collect();
                ages.sort();
                for (_, k) in ages.into_iter().take(MAX_KEYS / 10) {
                    self.entries.remove(&k);
                }
            }
        }
        let left = self.tokens(key, now) - 1.0;
        self.entries.insert(key.to_string(), (left, now));
    }
}

/// Connection requests (`inbound`): a logged-in caller may ask one callee
/// [`InboundLimiter::PAIR_BURST`] times at once, then once a second, and all callees
/// together [`InboundLimiter::CALLER_BURST`] times at once, then 5 times a second. Each
/// request makes the server ask the callee and set up relay legs: without a limit, one
/// caller could flood a callee (and the server) with them.
#[derive(Debug)]
pub struct InboundLimiter {
    pair: Buckets,
    caller: Buckets,
}

impl Default for InboundLimiter {
    fn default() -> Self {
        InboundLimiter {
            pair: Buckets::new(Self::PAIR_BURST, 1.0),
            caller: Buckets::new(Self::CALLER_BURST, 5.0),
        }
    }
}

impl InboundLimiter {
    pub const PAIR_BURST: u32 = 20;
    pub const CALLER_BURST: u32 = 60;

    /// Admit a request from `caller` to `callee`, or say how long to wait (nothing spent).
    pub fn admit(&mut self, caller: &str, callee: &str, now: Instant) -> Result<(), Duration> {
        let pair = format!("{caller} {callee}");
        let wait = self.pair.wait(&pair, now).max(self.caller.wait(caller, now));
        if !wait.is_zero() {
            return Err(wait);
        }
        self.pair.take(&pair, now);
        self.caller.take(caller, now);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inbound_requests_are_limited_per_pair_and_per_caller() {
        let mut l = InboundLimiter::default();
        let t0 = Instant::now();
        for _ in 0..InboundLimiter::PAIR_BURST {
            assert_eq!(l.admit("alice@a", "bob@b", t0), Ok(()));
        }
        // The burst is spent: the next one waits a second; another callee is still fine.
        assert_eq!(l.admit("alice@a", "bob@b", t0), Err(Duration::from_secs(1)));
        assert_eq!(l.admit("alice@a", "carol@b", t0), Ok(()));
        assert_eq!(l.admit("alice@a", "bob@b", t0 + Duration::from_secs(1)), Ok(()));
        assert!(l.admit("alice@a", "bob@b", t0 + Duration::from_secs(1)).is_err());
        // Across callees: at most CALLER_BURST at once, then 5 a second.
        let mut l = InboundLimiter::default();
        for i in 0..InboundLimiter::CALLER_BURST {
            assert_eq!(l.admit("alice@a", &format!("u{i}@b"), t0), Ok(()));
        }
        assert_eq!(l.admit("alice@a", "new@b", t0), Err(Duration::from_millis(200)));
        // Others are not slowed by alice.
        assert_eq!(l.admit("dave@a", "bob@b", t0), Ok(()));
    }

    #[test]
    fn free_failures_then_doubling_waits() {
        let mut rl = RateLimiter::new(RateLimitConfig::default());
        let t0 = Instant::now();
        let keys = ["user:alice", "ip:198.51.100.2"];
        for _ in 0..3 {
            assert_eq!(rl.check(&keys, t0), Ok(()));
            rl.failure(&keys, t0);
        }
        assert_eq!(rl.check(&keys, t0), Err(Duration::from_secs(1)));
        assert_eq!(rl.check(&keys, t0 + Duration::from_secs(1)), Ok(()));
        rl.failure(&keys, t0 + Duration::from_secs(1));
        assert_eq!(rl.check(&keys, t0 + Duration::from_secs(2)), Err(Duration::from_secs(1)));
        // Another user from the same address is slowed too; the same user from elsewhere too.
        assert!(rl.check(&["user:bob", "ip:198.51.100.2"], t0 + Duration::from_secs(2)).is_err());
        assert!(rl.check(&["user:alice", "ip:203.0.113.9"], t0 + Duration::from_secs(2)).is_err());
        // Forgotten after a quiet period; a success clears the user.
        assert_eq!(rl.check(&keys, t0 + Duration::from_secs(2000)), Ok(()));
        rl.success("user:alice");
        assert_eq!(rl.check(&["user:alice"], t0 + Duration::from_secs(2)), Ok(()));
    }

    #[test]
    fn waits_are_capped() {
        let mut rl = RateLimiter::new(RateLimitConfig::default());
        let t0 = Instant::now();
        for _ in 0..100 {
            rl.failure(&["k"], t0);
        }
        assert_eq!(rl.check(&["k"], t0), Err(Duration::from_secs(300)));
    }
}
