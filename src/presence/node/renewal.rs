//! Renewing our certificate before it ends: a task owned by the node asks the home server
//! (over the logged-in control connection; the key proves who we are, no password) at two
//! thirds of the certificate's lifetime, stores the new certificate atomically beside the
//! unchanged key, and swaps it in, so new log-ins and new TLS handshakes use it. Streams
//! already open keep the certificate they were set up with; they need nothing more.
//!
//! When it is due is [`crate::identity::renewal`]'s business (pure, given `now`); this
//! task owns the clock. Failures are retried with a backoff that fits in what is left of
//! the certificate's life; a certificate in its last week (or past three quarters of its
//! lifetime, for short ones) not renewed yet is a warning in the log and in
//! [`Node::certificate_status`].

use super::*;
use crate::identity::renewal::{BACKDATE, Schedule, human, retry_delay};

/// Longest single sleep: the task looks at the wall clock after each, so a machine that
/// was suspended, or whose clock was set, still renews in time.
const LOOK_AGAIN: Duration = Duration::from_secs(60);

/// Our certificate as `status` shows it. Times are Unix seconds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateStatus {
    pub address: Q2qAddress,
    /// Serial of the certificate in use, lowercase hex.
    pub serial: String,
    pub not_after: i64,
    /// When the node asks (asked) for the next certificate.
    pub renew_at: i64,
    /// When this node last renewed, if it did since it started.
    pub renewed_at: Option<i64>,
    /// The last renewal attempt's failure, until one succeeds.
    pub last_error: Option<String>,
    /// Set when the certificate is about to expire (or has) without being renewed.
    pub warning: Option<String>,
}

impl CertificateStatus {
    /// What `q2q-tun status` prints of it at `now` (Unix seconds): one line, then the
    /// warning, if any, on a line of its own that starts with `warning:`.
    pub fn describe(&self, now: i64) -> Vec<String> {
        use crate::cli::format_time;
        let when = |t: i64| {
            if t > now {
                format!("{} (in {})", format_time(t), human(Schedule::until(now, t)))
            } else {
                format!("{} ({} ago)", format_time(t), human(Schedule::until(t, now)))
            }
        };
        let mut line = format!(
            "certificate {} (serial {}): expires {}",
            self.address,
            self.serial.get(..8).unwrap_or(&self.serial),
            when(self.not_after)
        );
        if self.renew_at > now {
            line.push_str(&format!("; renews {}", when(self.renew_at)));
        } else if self.not_after > now {
            line.push_str("; renewing now");
        }
        if let Some(at) = self.renewed_at {
            line.push_str(&format!("; last renewed {}", when(at)));
        }
        if let (None, Some(e)) = (&self.warning, &self.last_error) {
            line.push_str(&format!("; last attempt failed: {e}"));
        }
        let mut lines = vec![line];
        lines.extend(self.warning.as_ref().map(|w| format!("warning: {w}")));
        lines
    }
}

/// How renewal has gone so far.
#[derive(Debug, Default)]
pub(super) struct State {
    renewed_at: Option<i64>,
    last_error: Option<String>,
    /// Failed attempts in a row.
    failures: u32,
    /// When to try again after a failure.
    retry_at: Option<i64>,
    /// The serial whose warning was logged (once per certificate).
    warned: Option<String>,
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

impl Node {
    /// Our certificate: when it ends, when it is renewed, and a warning when it is about
    /// to end without having been renewed.
    pub fn certificate_status(&self) -> CertificateStatus {
        let id = self.stored_identity();
        let schedule = Schedule::of(&id.info);
        let (renewed_at, last_error) = self
            .inner
            .renewal
            .lock()
            .map(|s| (s.renewed_at, s.last_error.clone()))
            .unwrap_or_default();
        CertificateStatus {
            address: id.address.clone(),
            serial: id.info.serial.clone(),
            not_after: schedule.not_after,
            renew_at: schedule.renew_at,
            renewed_at,
            warning: schedule.warning(unix_now(), &id.address, last_error.as_deref()),
            last_error,
        }
    }

    /// The renewal task: sleep until the certificate is due, renew, repeat.
    pub(super) async fn renew_when_due(self) {
        let me = self.inner.me.clone();
        loop {
            let id = self.stored_identity();
            let schedule = Schedule::of(&id.info);
            let now = unix_now();
            self.warn_once(&id, &schedule, now);
            let renewable_until = schedule.not_after.saturating_add(BACKDATE.as_secs() as i64);
            if now >= renewable_until {
                error!(
                    address = %me,
                    serial = %id.info.serial,
                    "the certificate has expired and can no longer be renewed; get a new one \
                     with `q2q-tun register {me} --existing`"
                );
                return;
            }
            let (failures, retry_at) =
                self.inner.renewal.lock().map(|s| (s.failures, s.retry_at)).unwrap_or_default();
            let wake = retry_at.unwrap_or(schedule.renew_at);
            if now < wake {
                // Wake for the warning too, if it comes first.
                let warned = self.warned(&id);
                let next = if warned { wake } else { wake.min(schedule.warn_at.max(now + 1)) };
                tokio::time::sleep(Schedule::until(now, next).min(LOOK_AGAIN)).await;
                continue;
            }
            let attempt = failures + 1;
            info!(address = %me, serial = %id.info.serial, attempt, "renewing the certificate");
            match self.renew_once(&id).await {
                Ok(new) => {
                    info!(
                        address = %me,
                        previous = %id.info.serial,
                        serial = %new.info.serial,
                        not_after = new.info.not_after,
                        renew_at = Schedule::of(&new.info).renew_at,
                        "certificate renewed"
                    );
                    if let Ok(mut s) = self.inner.renewal.lock() {
                        s.renewed_at = Some(unix_now());
                        s.last_error = None;
                        s.failures = 0;
                        s.retry_at = None;
                    }
                }
                Err(e) => {
                    let now = unix_now();
                    let remaining = Schedule::until(now, schedule.not_after);
                    let retry_in = retry_delay(attempt, Schedule::until(now, renewable_until));
                    warn!(
                        address = %me,
                        attempt,
                        error = %e,
                        retry_in_s = retry_in.as_secs(),
                        expires_in = %human(remaining),
                        "certificate renewal failed"
                    );
                    if let Ok(mut s) = self.inner.renewal.lock() {
                        s.last_error = Some(e.to_string());
                        s.failures = attempt;
                        s.retry_at = Some(now.saturating_add(retry_in.as_secs() as i64));
                    }
                }
            }
        }
    }

    fn warned(&self, id: &StoredIdentity) -> bool {
        self.inner
            .renewal
            .lock()
            .map(|s| s.warned.as_deref() == Some(id.info.serial.as_str()))
            .unwrap_or(true)
    }

    /// Log the certificate's warning, once per certificate.
    fn warn_once(&self, id: &StoredIdentity, schedule: &Schedule, now: i64) {
        let Ok(mut s) = self.inner.renewal.lock() else { return };
        if s.warned.as_deref() == Some(id.info.serial.as_str()) {
            return;
        }
        if let Some(w) = schedule.warning(now, &id.address, s.last_error.as_deref()) {
            warn!(address = %id.address, serial = %id.info.serial, "{w}");
            s.warned = Some(id.info.serial.clone());
        }
    }

    /// One renewal: ask the home server, check its answer, store it (certificate only,
    /// atomically; the key stays as it is), then use it.
    async fn renew_once(&self, id: &Arc<StoredIdentity>) -> Result<Arc<StoredIdentity>, NodeError> {
        let home = self.home();
        let renewed = crate::client::renew(&home, id).await?;
        let current = Current::new(renewed)?;
        let stored = current.stored.clone();
        let (dir, to_save) = (self.inner.home.clone(), stored.clone());
        tokio::task::spawn_blocking(move || dir.save_renewed(&to_save))
            .await
            .map_err(|e| NodeError::Tls(format!("saving the renewed certificate: {e}")))?
            .map_err(ClientError::from)?;
        match self.inner.identity.write() {
            Ok(mut c) => *c = current,
            Err(e) => *e.into_inner() = current,
        }
        Ok(stored)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_lines() {
        let mut s = CertificateStatus {
            address: Q2qAddress::parse("alice@example.com").unwrap(),
            serial: "55a790653cecf8bd".into(),
            not_after: 1_000_180,
            renew_at: 1_000_120,
            renewed_at: None,
            last_error: None,
            warning: None,
        };
        let lines = s.describe(1_000_000);
        assert_eq!(lines.len(), 1);
        assert!(lines[0].starts_with("certificate alice@example.com (serial 55a79065): expires "));
        assert!(lines[0].contains("(in 3 min); renews "), "{}", lines[0]);
        assert!(lines[0].ends_with("(in 2 min)"), "{}", lines[0]);
        s.renewed_at = Some(999_990);
        s.last_error = Some("offline".into());
        let lines = s.describe(1_000_130);
        assert!(lines[0].contains("renewing now; last renewed "), "{}", lines[0]);
        assert!(lines[0].ends_with("(2 min ago); last attempt failed: offline"), "{}", lines[0]);
        s.warning = Some("the certificate of alice@example.com expires in 45 s".into());
        let lines = s.describe(1_000_135);
        assert_eq!(lines[1], "warning: the certificate of alice@example.com expires in 45 s");
        assert!(!lines[0].contains("offline"));
    }
}
