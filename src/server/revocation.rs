//! Revocation at the server: the domain's own list (published, and enforced on live
//! logins), and other domains' lists (checked when their users log in here).
//!
//! ```text
//!  q2q-server revoke (any process) ── Store: certificates.revoked, revocation generation
//!                                            │ polled every POLL (one row read); with
//!                                            │ PostgreSQL, NOTIFY q2q_revocations wakes
//!                                            │ it at once and the poll is a safety net
//!                                            ▼
//!  watcher task ── signs a new list ── watch channel ──┬── `revocations` answers (anyone)
//!                                                      └── each logged-in connection of
//!                                                          a revoked certificate closes
//! ```
//!
//! The watcher is the one owner of the published list. It learns of a change by polling
//! [`super::store::Store::revocation_generation`]; a backend that can push changes (PostgreSQL
//! `LISTEN`/`NOTIFY`) only has to wake [`Revocations::changed`] instead of waiting out the
//! poll. It also signs the list again when half its validity has passed, so a published
//! list is always vouched for.
//!
//! Callers of other domains are checked against their issuer's list, fetched through
//! [`super::federation::Federation::revocation_list`] (its address policy, rate limits and
//! negative cache) and kept in a bounded cache ([`crate::identity::revocation::Lists`]: one
//! owning task, one fetch per domain at a time), fetched again after
//! `revocation_max_age_secs`, at most [`MAX_FOREIGN_LISTS`] domains.
//! **Fail closed**: a caller whose domain's list cannot be had (none held, or the one held
//! is past its `nextUpdate`) is refused; a list that merely could not be refreshed is used
//! until its `nextUpdate`. A logged-in caller of another domain is checked again every
//! `revocation_max_age_secs` and dropped if its certificate was revoked meanwhile.

use super::State;
use crate::address::Domain;
use crate::identity::revocation::{LIST_VALIDITY, Lists, Revoked};
use rustls_pki_types::CertificateDer;
use std::collections::HashSet;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{Notify, watch};
use tracing::{info, warn};

/// How often the watcher reads the revocation generation: a revocation made by another
/// process takes effect within this long.
pub const POLL: Duration = Duration::from_millis(250);
/// The same with PostgreSQL, where a revocation also wakes every instance's watcher by
/// `NOTIFY` ([`Revocations::changed`]): the poll only covers notifications lost while the
/// instance's notification connection was reconnecting.
pub const POLL_NOTIFIED: Duration = Duration::from_secs(30);
/// Most other domains whose lists are kept.
pub const MAX_FOREIGN_LISTS: usize = 1024;

/// The domain's list as published now.
#[derive(Debug, Clone, Default)]
pub struct Published {
    /// The database's revocation generation it was made from.
    pub generation: i64,
    /// Its CRL number.
    pub number: u64,
    /// Made at, Unix seconds.
    pub made: i64,
    /// Serials (lowercase hex) of the revoked certificates not yet expired.
    pub revoked: HashSet<String>,
    /// The signed list (DER); empty if it could not be made (too long, signing failed).
    pub der: Vec<u8>,
}

/// The server's revocation state.
pub struct Revocations {
    own: watch::Sender<Arc<Published>>,
    /// Wakes the watcher before its next poll (a backend that pushes changes).
    pub changed: Notify,
    foreign: Lists,
}

/// Why a caller's certificate is not accepted.
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    #[error("the certificate of {0} has been revoked")]
    Revoked(crate::address::Q2qAddress),
    /// The list of the caller's domain could not be had (fail closed).
    #[error("cannot check whether the certificate of {0} is revoked")]
    Unchecked(crate::address::Q2qAddress),
    /// The database failed.
    #[error("internal error")]
    Internal,
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

impl Revocations {
    pub fn new(foreign_max_age: Duration) -> Revocations {
        Revocations {
            own: watch::channel(Arc::new(Published::default())).0,
            changed: Notify::new(),
            foreign: Lists::new(MAX_FOREIGN_LISTS, foreign_max_age),
        }
    }

    /// Follow the published list (each logged-in connection does).
    pub fn subscribe(&self) -> watch::Receiver<Arc<Published>> {
        self.own.subscribe()
    }

    /// The list as published now.
    pub fn published(&self) -> Arc<Published> {
        self.own.borrow().clone()
    }

    /// How often a logged-in caller of another domain is checked again.
    pub fn recheck_every(&self) -> Duration {
        self.foreign.max_age()
    }
}

/// Make and sign the list of `revoked` for `state`'s domain after `previous`.
fn make(state: &State, generation: i64, revoked: Vec<Revoked>, previous: &Published) -> Published {
    let now = unix_now();
    // Numbers grow with every list, across restarts too (milliseconds since the epoch).
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let number = ms.max(previous.number + 1);
    let der = match state.ca.revocation_list(&revoked, number, now, LIST_VALIDITY) {
        Ok(der) if der.len() <= crate::identity::revocation::MAX_LIST_BYTES => der,
        Ok(der) => {
            warn!(
                bytes = der.len(),
                revoked = revoked.len(),
                "the revocation list is too long to publish"
            );
            Vec::new()
        }
        Err(e) => {
            warn!(error = %e, "cannot sign the revocation list");
            Vec::new()
        }
    };
    Published {
        generation,
        number,
        made: now,
        revoked: revoked.into_iter().map(|r| r.serial).collect(),
        der,
    }
}

/// The watcher: publish the list again whenever the database says the revocations
/// changed (or half the list's validity passed), until `stopped`.
pub(super) async fn watch_revocations(state: Arc<State>, mut stopped: watch::Receiver<bool>) {
    let every = if state.store.postgres().is_some() { POLL_NOTIFIED } else { POLL };
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stopped.changed() => return,
            _ = tick.tick() => {}
            _ = state.revocations.changed.notified() => {}
        }
        refresh(&state).await;
    }
}

/// Publish a new list if the revocations changed since the last (or none was made, or
/// half its validity passed).
pub(super) async fn refresh(state: &Arc<State>) {
    let generation = match state.store.revocation_generation().await {
        Ok(g) => g,
        Err(e) => return warn!(error = %e, "cannot read the revocation generation"),
    };
    let previous = state.revocations.published();
    let due = unix_now() >= previous.made + LIST_VALIDITY.as_secs() as i64 / 2;
    if generation == previous.generation && !previous.der.is_empty() && !due {
        return;
    }
    let now = unix_now();
    let revoked = match state.store.revoked_unexpired(now).await {
        Ok(r) => r,
        Err(e) => return warn!(error = %e, "cannot read the revoked certificates"),
    };
    let published = make(state, generation, revoked, &previous);
    if generation != previous.generation {
        info!(generation, revoked = published.revoked.len(), "revocations changed");
    }
    state.revocations.own.send_replace(Arc::new(published));
}

/// Check a verified caller's certificate (`serial`, issued by `ca` of `caller`'s domain)
/// for revocation: ours in the database, another domain's against its list.
pub(super) async fn check(
    state: &Arc<State>,
    caller: &crate::address::Q2qAddress,
    ca: &CertificateDer<'static>,
    serial: &str,
    source: IpAddr,
) -> Result<(), Refused> {
    let revoked = if caller.domain == state.domain {
        let serial = serial.to_string();
        match state.store.is_revoked(&serial).await {
            Ok(r) => r,
            Err(_) => return Err(Refused::Internal),
        }
    } else {
        let domain: &Domain = &caller.domain;
        let fetch = {
            let (state, domain) = (state.clone(), domain.clone());
            Box::pin(async move {
                state.federation.revocation_list(&domain, source).await.map_err(|e| e.to_string())
            })
        };
        match state.revocations.foreign.current(domain, ca, fetch).await {
            Ok(list) => list.is_revoked(serial),
            Err(e) => {
                warn!(%caller, %source, error = %e, "caller refused: revocation not checked");
                return Err(Refused::Unchecked(caller.clone()));
            }
        }
    };
    if revoked {
        return Err(Refused::Revoked(caller.clone()));
    }
    Ok(())
}
