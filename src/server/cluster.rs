//! Several instances of one domain on one PostgreSQL database: who is logged in where, and
//! requests for a callee logged in at another instance, carried by the database itself
//! (`LISTEN`/`NOTIFY`), not by a protocol between instances.
//!
//! ```text
//!  instance A (caller's)                 PostgreSQL                  instance B (callee's)
//!  inbound to bob ─ presence row? ──▶ presence(bob, svc) = B
//!                 ─ NOTIFY q2q_B ────▶ {ask, id, from A, inbound…} ──▶ relay legs at B,
//!                                                                     bob asked as usual
//!  answer caller ◀─ NOTIFY q2q_A ◀──── {answer, id, relay at B…} ◀──┘
//! ```
//!
//! Each instance has a random id and listens on channel `q2q_<id>`, on a connection that
//! also holds an advisory lock named by the id: an instance is asked only while it holds
//! it (a killed instance's connection closes and the lock goes at once). Presence is
//! mirrored into the `presence` table in the order it changes (one writer task); an
//! instance says it is alive every [`HEARTBEAT`] in `instances`, and rows of an instance
//! silent for [`ALIVE_FOR`] are not used ([`FORGET_AFTER`]: deleted). A session across instances has
//! both relay legs at the callee's instance; the caller is told its address
//! (`relay_host`) and reaches it over UDP, or, when its UDP is blocked, over TCP through a
//! control connection of its own to that instance, which takes the caller's leg with a
//! bind ([`super::relay::Relay::claim`]).
//! Payloads are AMP boxes in base64 (a notification holds at most 7,999 bytes).

use super::State;
use super::postgres::PgDb;
use crate::amp::{self, AmpBox};
use crate::proto::code;
use base64::Engine as _;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{debug, info, warn};

/// How often an instance says it is alive.
pub const HEARTBEAT: Duration = Duration::from_secs(5);
/// An instance not heard from for this long is not asked.
pub const ALIVE_FOR: Duration = Duration::from_secs(15);
/// Rows of an instance silent this long are deleted.
pub const FORGET_AFTER: Duration = Duration::from_secs(120);
/// How long an instance waits for another's answer (the callee has 10 s to answer).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(15);
/// Longest a `listen` waits for its presence to reach the database.
pub const FLUSH_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest notification payload PostgreSQL takes.
const MAX_PAYLOAD: usize = 7999;
/// Asks waiting for their answer at once; more are refused.
const MAX_WAITING: usize = 4096;

/// A change of local presence, mirrored into the database in order.
#[derive(Debug)]
pub enum Change {
    Listen {
        address: String,
        service: String,
        conn: u64,
    },
    Unlisten {
        address: String,
        service: String,
        conn: u64,
    },
    Closed {
        conn: u64,
    },
    /// Answered once every change before it is in the database.
    Flush(oneshot::Sender<()>),
}

/// This instance's part in the domain's cluster.
pub struct Cluster {
    id: String,
    db: Arc<PgDb>,
    changes: mpsc::UnboundedSender<Change>,
    waiting: mpsc::Sender<(u64, oneshot::Sender<AmpBox>)>,
}

/// What [`run`] needs, made with the [`Cluster`].
pub struct Tasks {
    changes: mpsc::UnboundedReceiver<Change>,
    waiting: mpsc::Receiver<(u64, oneshot::Sender<AmpBox>)>,
}

impl Cluster {
    /// A new instance id on `db`; the sender is for [`super::presence::Presence`].
    pub fn new(db: Arc<PgDb>) -> (Cluster, mpsc::UnboundedSender<Change>, Tasks) {
        let id = hex::encode(rand::random::<[u8; 8]>());
        let (changes_tx, changes) = mpsc::unbounded_channel();
        let (waiting_tx, waiting) = mpsc::channel(256);
        let cluster = Cluster { id, db, changes: changes_tx.clone(), waiting: waiting_tx };
        (cluster, changes_tx, Tasks { changes, waiting })
    }

    /// Wait (at most [`FLUSH_TIMEOUT`]) until the presence changes made so far are in the
    /// database, so other instances find them: a `listen` is answered after it.
    pub async fn flushed(&self) {
        let (tx, rx) = oneshot::channel();
        if self.changes.send(Change::Flush(tx)).is_ok() {
            let _ = tokio::time::timeout(FLUSH_TIMEOUT, rx).await;
        }
    }

    /// This instance's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Ask the instance where `to` (with `service`, if given) is logged in the request
    /// `ask` (of [`crate::proto::commands`]: `RemoteInbound`, `RemoteCandidates`); its
    /// answer, or its refusal. This envelope adds `_kind`, `_id` and `_reply`.
    pub async fn ask(
        &self,
        to: &str,
        service: Option<&str>,
        mut ask: AmpBox,
    ) -> Result<AmpBox, amp::ErrorBox> {
        let refuse =
            |code: &str, description: String| amp::ErrorBox { code: code.to_string(), description };
        let internal = |e: &dyn std::fmt::Display| {
            warn!(error = %e, "asking another instance failed");
            refuse(code::INTERNAL, "internal server error".to_string())
        };
        let alive_since = super::db::now() - ALIVE_FOR.as_secs() as i64;
        let found = self
            .db
            .presence_find(to, service, &self.id, alive_since)
            .await
            .map_err(|e| internal(&e))?;
        let remote = match found {
            None => return Err(refuse(code::OFFLINE, format!("{to} is offline"))),
            Some((_, false)) => {
                let service = service.unwrap_or_default();
                return Err(refuse(
                    code::NO_SUCH_SERVICE,
                    format!("{to} does not offer service {service}"),
                ));
            }
            Some((remote, true)) => remote,
        };
        let id: u64 = rand::random();
        ask.insert("_kind", "ask");
        ask.insert("_id", format!("{id:016x}"));
        ask.insert("_reply", &self.id);
        let payload = encode(&ask).ok_or_else(|| internal(&"request too large"))?;
        let (tx, rx) = oneshot::channel();
        self.waiting.send((id, tx)).await.map_err(|e| internal(&e))?;
        debug!(%to, instance = %remote.instance, "asking another instance");
        self.db.notify(&channel(&remote.instance), &payload).await.map_err(|e| internal(&e))?;
        let answer = match tokio::time::timeout(ANSWER_TIMEOUT, rx).await {
            Ok(Ok(a)) => a,
            _ => return Err(refuse(code::OFFLINE, format!("{to} did not answer"))),
        };
        match answer.get_str(amp::ERROR_CODE) {
            Some(c) => {
                Err(refuse(c, answer.get_str(amp::ERROR_DESCRIPTION).unwrap_or("").to_string()))
            }
            None => {
                let mut a = answer;
                for k in ["_kind", "_id", "_reply"] {
                    a.remove(k);
                }
                Ok(a)
            }
        }
    }
}

fn channel(instance: &str) -> String {
    format!("q2q_{instance}")
}

fn encode(b: &AmpBox) -> Option<String> {
    let s = base64::engine::general_purpose::STANDARD.encode(b.encode().ok()?);
    (s.len() <= MAX_PAYLOAD).then_some(s)
}

fn decode(s: &str) -> Option<AmpBox> {
    let bytes = base64::engine::general_purpose::STANDARD.decode(s).ok()?;
    match AmpBox::decode(&bytes) {
        Ok(Some((b, n))) if n == bytes.len() => Some(b),
        _ => None,
    }
}

/// The instance's cluster tasks, until `stopped`: the heartbeat and the presence mirror
/// (one writer, in order), and the notification connection (reopened when it breaks) with
/// the asks waiting for answers, which it owns. Its rows go when it stops.
pub(crate) async fn run(state: Arc<State>, tasks: Tasks, mut stopped: watch::Receiver<bool>) {
    let Some(cluster) = &state.cluster else { return };
    let (db, id) = (cluster.db.clone(), cluster.id.clone());
    let mirror = tokio::spawn(mirror(state.clone(), tasks.changes));
    let mut waiting = tasks.waiting;
    let mut pending: HashMap<u64, oneshot::Sender<AmpBox>> = HashMap::new();
    let mut backoff = Duration::from_millis(200);
    info!(instance = %id, "sharing the domain with other instances through the database");
    'connect: loop {
        let (tx, mut notes) = mpsc::channel(256);
        let _client = match super::postgres::listen(db.target(), &id, tx).await {
            Ok(c) => c,
            Err(e) => {
                warn!(error = %e, "cannot listen for other instances; retrying");
                tokio::select! {
                    _ = stopped.changed() => break 'connect,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(10));
                continue;
            }
        };
        backoff = Duration::from_millis(200);
        loop {
            tokio::select! {
                _ = stopped.changed() => break 'connect,
                w = waiting.recv() => {
                    let Some((n, tx)) = w else { break 'connect };
                    pending.retain(|_, tx| !tx.is_closed());
                    if pending.len() < MAX_WAITING {
                        pending.insert(n, tx);
                    }
                }
                note = notes.recv() => {
                    let Some(note) = note else {
                        warn!("lost the notification connection; reconnecting");
                        continue 'connect;
                    };
                    if note.channel() == super::postgres::REVOCATIONS_CHANNEL {
                        state.revocations.changed.notify_one();
                        continue;
                    }
                    let Some(b) = decode(note.payload()) else {
                        debug!("dropped a malformed notification");
                        continue;
                    };
                    let n = b.get_str("_id").and_then(|i| u64::from_str_radix(i, 16).ok());
                    match (b.get_str("_kind"), n) {
                        (Some("answer"), Some(n)) => {
                            if let Some(tx) = pending.remove(&n) {
                                let _ = tx.send(b);
                            }
                        }
                        (Some("ask"), Some(n)) => {
                            tokio::spawn(answer(state.clone(), db.clone(), n, b));
                        }
                        _ => debug!("dropped a notification of no known kind"),
                    }
                }
            }
        }
    }
    mirror.abort();
    if let Err(e) = db.instance_gone(&id).await {
        warn!(error = %e, "cannot remove this instance's presence");
    }
}

/// Answer another instance's ask `b` (number `n`) on its reply channel.
async fn answer(state: Arc<State>, db: Arc<PgDb>, n: u64, b: AmpBox) {
    let Some(reply) = b.get_str("_reply").map(str::to_string) else { return };
    let mut a = match super::handler::answer_remote(&state, &b).await {
        Ok(a) => a,
        Err(e) => AmpBox::new()
            .with(amp::ERROR_CODE, e.code)
            .with(amp::ERROR_DESCRIPTION, e.description.chars().take(500).collect::<String>()),
    };
    a.insert("_kind", "answer");
    a.insert("_id", format!("{n:016x}"));
    let Some(payload) = encode(&a) else {
        return warn!("an answer to another instance is too large");
    };
    // The reply channel is named by another instance: only hex ids are used.
    if !reply.bytes().all(|c| c.is_ascii_hexdigit()) {
        return;
    }
    if let Err(e) = db.notify(&channel(&reply), &payload).await {
        warn!(error = %e, "cannot answer another instance");
    }
}

/// Mirror local presence into the database, in order, and say this instance is alive.
async fn mirror(state: Arc<State>, mut changes: mpsc::UnboundedReceiver<Change>) {
    let Some(cluster) = &state.cluster else { return };
    let (db, id) = (&cluster.db, cluster.id.as_str());
    let relay_host = state.config.relay_host().map(|h| h.to_string());
    let mut beat = tokio::time::interval(HEARTBEAT);
    // A change or heartbeat the database missed (it was unreachable): the whole presence
    // is published again at the next heartbeat that gets through.
    let mut missed = false;
    loop {
        tokio::select! {
            _ = beat.tick() => {
                let r = db
                    .heartbeat(id, relay_host.as_deref(), state.udp_port, FORGET_AFTER.as_secs() as i64)
                    .await;
                if let Err(e) = r {
                    // Silent long enough, the others forget our presence: publish it again.
                    warn!(error = %e, "heartbeat to the database failed");
                    missed = true;
                    continue;
                }
                if missed {
                    match db.presence_replace(id, &state.presence.snapshot().await).await {
                        Ok(()) => {
                            info!("presence published again after a database outage");
                            missed = false;
                        }
                        Err(e) => warn!(error = %e, "cannot publish presence again"),
                    }
                }
            }
            c = changes.recv() => {
                let Some(c) = c else { return };
                let r = match &c {
                    Change::Flush(_) => {
                        if let Change::Flush(tx) = c {
                            let _ = tx.send(());
                        }
                        continue;
                    }
                    Change::Listen { address, service, conn } => {
                        db.presence_listen(address, service, id, *conn).await
                    }
                    Change::Unlisten { address, service, conn } => {
                        db.presence_drop(id, *conn, Some((address, service))).await
                    }
                    Change::Closed { conn } => db.presence_drop(id, *conn, None).await,
                };
                if let Err(e) = r {
                    warn!(error = %e, change = ?c, "cannot record presence in the database");
                    missed = true;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_round_trip_and_are_bounded() {
        let b = AmpBox::command("inbound").with("_id", "00ff").with("candidates", "192.0.2.4:5");
        assert_eq!(decode(&encode(&b).unwrap()).unwrap(), b);
        assert!(decode("not base64!").is_none());
        assert!(decode(&base64::engine::general_purpose::STANDARD.encode([0, 5, 1])).is_none());
        let big = AmpBox::new().with("x", vec![b'a'; 6000]);
        assert!(encode(&big).is_none(), "over the notification limit");
    }
}
