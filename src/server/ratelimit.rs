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

#[cfg(test)]
mod tests {
    use super::*;

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
