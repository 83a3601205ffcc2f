//! When to renew a certificate, when to warn that it runs out, and how long to wait after
//! a failed attempt. Pure: every function takes `now` (Unix seconds, as [`CertInfo`] holds
//! validity), and the node's renewal task owns the clock.
//!
//! ```text
//!  not_before      issued                 renew_at        warn_at             not_after
//!      |── BACKDATE ──|────── 2/3 of the lifetime ──|────────────────────────────|
//!                                                        max(not_after − 7 days,
//!                                                            issued + 3/4 of the lifetime)
//! ```
//!
//! The lifetime is what the server was configured with: `not_after − issued`, where
//! `issued = not_before + BACKDATE` (the CA starts every certificate [`BACKDATE`] early, so
//! a verifier whose clock is behind the issuer's by up to that much accepts it).
//!
//! Clock skew, "a few minutes either way", means five minutes: a verifier behind the
//! issuer accepts a fresh certificate thanks to the backdating; a verifier ahead of it
//! still accepts a certificate that is renewed at two thirds of its lifetime, a third of
//! the lifetime before it ends; and the server renews a certificate that expired up to
//! [`BACKDATE`] ago by its clock, for a node whose clock is behind.

use super::CertInfo;
use std::time::Duration;

/// How far before its issue a certificate starts, and how much clock skew is tolerated
/// either way.
pub const BACKDATE: Duration = Duration::from_secs(300);

/// Warn this long before a certificate expires (unless the lifetime is so short that this
/// comes before three quarters of it).
pub const WARN_BEFORE: Duration = Duration::from_secs(7 * 86400);

/// The first wait after a failed renewal; it doubles with each further failure.
pub const RETRY_FIRST: Duration = Duration::from_secs(5);
/// The longest wait between renewal attempts.
pub const RETRY_MAX: Duration = Duration::from_secs(3600);

/// The moments that matter in a certificate's life, Unix seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Schedule {
    /// When the server issued it (`not_before` + [`BACKDATE`], at most `not_after`).
    pub issued: i64,
    /// When to ask for a new one: two thirds into its lifetime.
    pub renew_at: i64,
    /// From when on a certificate not renewed yet is worth a warning.
    pub warn_at: i64,
    pub not_after: i64,
}

impl Schedule {
    pub fn of(info: &CertInfo) -> Schedule {
        Schedule::new(info.not_before, info.not_after)
    }

    pub fn new(not_before: i64, not_after: i64) -> Schedule {
        // In i128, so that no validity, however absurd, overflows.
        let (nb, na) = (i128::from(not_before), i128::from(not_after));
        let issued = (nb + i128::from(BACKDATE.as_secs())).min(na);
        let lifetime = na - issued;
        let renew_at = issued + lifetime * 2 / 3;
        // Rounded up, so that a certificate of a few seconds warns after it is due, not with it.
        let warn_at = (na - i128::from(WARN_BEFORE.as_secs())).max(issued + (lifetime * 3 + 3) / 4);
        let clamp = |t: i128| t.clamp(i128::from(i64::MIN), i128::from(i64::MAX)) as i64;
        Schedule {
            issued: clamp(issued),
            renew_at: clamp(renew_at),
            warn_at: clamp(warn_at),
            not_after,
        }
    }

    /// The configured lifetime.
    pub fn lifetime(&self) -> Duration {
        Duration::from_secs(self.not_after.saturating_sub(self.issued).max(0) as u64)
    }

    /// How long from `now` until `t` (zero once it has passed).
    pub fn until(now: i64, t: i64) -> Duration {
        Duration::from_secs(t.saturating_sub(now).max(0) as u64)
    }

    pub fn expired(&self, now: i64) -> bool {
        now >= self.not_after
    }

    /// The warning for `address` at `now`, if its certificate is in the warning window or
    /// expired; `last_error` is the latest renewal failure, if any.
    pub fn warning(
        &self,
        now: i64,
        address: &impl std::fmt::Display,
        last_error: Option<&str>,
    ) -> Option<String> {
        if now < self.warn_at {
            return None;
        }
        let why = last_error.map_or_else(
            || "it has not been renewed yet".to_string(),
            |e| format!("renewal failed: {e}"),
        );
        Some(if self.expired(now) {
            format!(
                "the certificate of {address} has expired ({} ago); {why}; \
                 get a new one with `q2q-tun register {address} --existing`",
                human(Schedule::until(self.not_after, now))
            )
        } else {
            format!(
                "the certificate of {address} expires in {}; {why}",
                human(Schedule::until(now, self.not_after))
            )
        })
    }
}

/// How long to wait after `failures` failed attempts in a row (1 for the first), with
/// `remaining` left before the certificate expires: doubling from [`RETRY_FIRST`] up to
/// [`RETRY_MAX`], but never more than a quarter of what remains (at least a second), so a
/// short-lived certificate gets several tries before it ends.
pub fn retry_delay(failures: u32, remaining: Duration) -> Duration {
    let doubled = RETRY_FIRST.saturating_mul(1u32 << failures.saturating_sub(1).min(16));
    doubled.min(RETRY_MAX).min(remaining / 4).max(Duration::from_secs(1))
}

/// A duration as a person reads it: `45 s`, `12 min`, `5 h`, `3 days`.
pub fn human(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..120 => format!("{s} s"),
        120..7200 => format!("{} min", s / 60),
        7200..172_800 => format!("{} h", s / 3600),
        _ => format!("{} days", s / 86400),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: i64 = 86400;

    #[test]
    fn thirty_days_renew_at_day_twenty_warn_a_week_before() {
        let issued = 1_000_000;
        let s = Schedule::new(issued - 300, issued + 30 * DAY);
        assert_eq!(s.issued, issued);
        assert_eq!(s.lifetime(), Duration::from_secs(30 * 86400));
        assert_eq!(s.renew_at, issued + 20 * DAY);
        assert_eq!(s.warn_at, issued + 23 * DAY);
        assert_eq!(s.warning(issued + 22 * DAY, &"alice@example.com", None), None);
        let w = s.warning(issued + 23 * DAY, &"alice@example.com", Some("offline")).unwrap();
        assert_eq!(
            w,
            "the certificate of alice@example.com expires in 7 days; renewal failed: offline"
        );
    }

    #[test]
    fn three_minutes_renew_at_two_warn_at_two_and_a_quarter() {
        let issued = 1_000_000;
        let s = Schedule::new(issued - 300, issued + 180);
        assert_eq!(s.renew_at, issued + 120);
        assert_eq!(s.warn_at, issued + 135);
        assert!(s.warning(issued + 134, &"a@b", None).is_none());
        assert!(s.warning(issued + 135, &"a@b", None).unwrap().contains("expires in 45 s"));
        let expired = s.warning(issued + 200, &"a@b", None).unwrap();
        assert!(expired.contains("has expired (20 s ago)"), "{expired}");
        assert!(expired.contains("register a@b --existing"), "{expired}");
    }

    #[test]
    fn certificates_without_backdating_and_nonsense_do_not_panic() {
        // No backdating (not our CA's): the lifetime is the whole validity, minus nothing
        // it does not have.
        let s = Schedule::new(0, 100);
        assert_eq!((s.issued, s.not_after), (100, 100));
        assert_eq!(s.renew_at, 100);
        let s = Schedule::new(i64::MAX, i64::MIN);
        assert_eq!((s.issued, s.renew_at, s.lifetime()), (i64::MIN, i64::MIN, Duration::ZERO));
        let s = Schedule::new(i64::MIN, i64::MAX);
        assert!(s.issued < s.renew_at && s.renew_at < s.warn_at && s.warn_at < s.not_after);
    }

    #[test]
    fn retries_back_off_but_fit_in_what_remains() {
        let day = Duration::from_secs(86400);
        assert_eq!(retry_delay(1, day), Duration::from_secs(5));
        assert_eq!(retry_delay(2, day), Duration::from_secs(10));
        assert_eq!(retry_delay(5, day), Duration::from_secs(80));
        assert_eq!(retry_delay(40, day), RETRY_MAX);
        assert_eq!(retry_delay(5, Duration::from_secs(60)), Duration::from_secs(15));
        assert_eq!(retry_delay(1, Duration::ZERO), Duration::from_secs(1));
    }

    #[test]
    fn human_durations() {
        assert_eq!(human(Duration::from_secs(45)), "45 s");
        assert_eq!(human(Duration::from_secs(600)), "10 min");
        assert_eq!(human(Duration::from_secs(5 * 3600)), "5 h");
        assert_eq!(human(Duration::from_secs(7 * 86400)), "7 days");
    }
}
