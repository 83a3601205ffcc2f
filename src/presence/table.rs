//! Single-flight tables, each owned by one task: the session table (which [`PeerSession`]
//! carries our streams with each peer) and the table of other domains' servers (one
//! logged-in connection per domain). Everything else asks the task through a bounded
//! channel, so a burst of connections to one peer sets up exactly one session (one
//! connection to one domain's server), every other asker waits for it, and a slow key holds
//! up no other. The task also publishes every entry it knows that has not ended (the
//! current one per key, and one superseded while it finishes) for `status`, which reads it
//! without asking ([`Table::snapshot`]).

use super::session::PeerSession;
use crate::address::{Q2qAddress, ServiceName};
use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot, watch};

/// What a table holds: something that ends (a session lost, a connection closed).
pub trait Entry: Send + Sync + 'static {
    /// Whether it ended: a lookup then sets up a new one.
    fn ended(&self) -> bool;
    /// Where it sorts in [`Table::snapshot`].
    fn order(&self) -> u64 {
        0
    }
}

impl Entry for PeerSession {
    fn ended(&self) -> bool {
        PeerSession::ended(self)
    }
    fn order(&self) -> u64 {
        self.id()
    }
}

impl Entry for crate::client::ServerConn {
    fn ended(&self) -> bool {
        self.handle().is_closed()
    }
}

/// A table of servers: one logged-in connection per key (other domains' servers, by
/// domain; instances that hold our relay legs, by address).
pub type ServerTable<E, K = crate::address::Domain> = Table<K, crate::client::ServerConn, (), E>;

/// Why [`Table::get`] has no entry.
pub enum GetError<E> {
    /// The set-up failed (shared by everyone who waited for it).
    Failed(Arc<E>),
    /// The table's task is gone, or set-ups kept failing for other purposes.
    Gone,
}

/// The session table: one session per peer; a set-up is for a service (a refusal of
/// that service sends the askers for other services to ask again).
pub type SessionTable<E> = Table<Q2qAddress, PeerSession, ServiceName, E>;

/// What a waiter learns when the entry it waited for is set up, or not.
pub enum Ready<V, E> {
    Session(Arc<V>),
    Failed(Arc<E>),
    /// The set-up failed for another purpose than the waiter's (it was refused that one):
    /// ask again.
    Retry,
}

/// The answer to [`Table::lookup`].
pub enum Lookup<V, E> {
    /// A live entry: use it.
    Live(Arc<V>),
    /// A set-up is under way: wait for it.
    Wait(oneshot::Receiver<Ready<V, E>>),
    /// Nobody is setting one up: the asker must (on a task of its own, so that it finishes
    /// even if the asker gives up), report it with [`Table::done`], and wait like the others.
    SetUp(oneshot::Receiver<Ready<V, E>>),
}

enum Slot<V, T, E> {
    Live(Arc<V>),
    Pending(Vec<(T, oneshot::Sender<Ready<V, E>>)>),
}

enum Cmd<K, V, T, E> {
    Lookup { key: K, purpose: T, reply: oneshot::Sender<Lookup<V, E>> },
    Done { key: K, purpose: T, result: Result<Arc<V>, (Arc<E>, bool)> },
    Insert(K, Arc<V>),
    Remove(K, Arc<V>),
    List(oneshot::Sender<Vec<Arc<V>>>),
}

/// A handle to the table's task. The task ends when every handle is dropped.
pub struct Table<K, V, T, E> {
    tx: mpsc::Sender<Cmd<K, V, T, E>>,
    entries: watch::Receiver<Vec<Arc<V>>>,
}

impl<K, V, T, E> Clone for Table<K, V, T, E> {
    fn clone(&self) -> Self {
        Table { tx: self.tx.clone(), entries: self.entries.clone() }
    }
}

/// Commands the table's task may have queued (bounded: callers wait, they are not dropped).
const QUEUE: usize = 1024;

impl<K, V, T, E> Table<K, V, T, E>
where
    K: Eq + Hash + Clone + Send + 'static,
    V: Entry,
    T: PartialEq + Send + 'static,
    E: Send + Sync + 'static,
{
    /// Start the table's task on the current runtime.
    pub fn start() -> Self {
        let (tx, rx) = mpsc::channel(QUEUE);
        let (publish, entries) = watch::channel(Vec::new());
        tokio::spawn(run(rx, publish));
        Table { tx, entries }
    }

    /// Every entry set up and not yet removed, as the table's task last published it
    /// (sorted by [`Entry::order`]; the ones that ended meanwhile left out).
    pub fn snapshot(&self) -> Vec<Arc<V>> {
        self.entries.borrow().iter().filter(|s| !s.ended()).cloned().collect()
    }

    /// The entry for `key`, or a wait for it (see [`Lookup`]), asked for `purpose` (a
    /// service). `None`: the table is gone.
    pub async fn lookup(&self, key: &K, purpose: T) -> Option<Lookup<V, E>> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(Cmd::Lookup { key: key.clone(), purpose, reply }).await.ok()?;
        rx.await.ok()
    }

    /// Report the set-up a [`Lookup::SetUp`] asked for. `refused_purpose`: the error is a
    /// refusal of `purpose` only (another may still be granted).
    pub async fn done(&self, key: K, purpose: T, result: Result<Arc<V>, (Arc<E>, bool)>) {
        let _ = self.tx.send(Cmd::Done { key, purpose, result }).await;
    }

    /// An entry set up from the other side (a session the peer set up with us): it becomes
    /// the one used for `key`.
    pub async fn insert(&self, key: K, v: Arc<V>) {
        let _ = self.tx.send(Cmd::Insert(key, v)).await;
    }

    /// Forget `v` (closed or lost); `key` looks it up anew unless another replaced it.
    pub async fn remove(&self, key: &K, v: &Arc<V>) {
        let _ = self.tx.send(Cmd::Remove(key.clone(), v.clone())).await;
    }

    /// The entry for `key`, asked for `purpose`: the live one, the one being set up (wait
    /// for it), or a new one from `set_up`, which runs on a task of its own so that it
    /// finishes (and is reported to everyone waiting) even if this asker gives up.
    /// `refuses_purpose`: whether a set-up error refuses only its purpose (askers for
    /// another purpose then ask again, at most a few times).
    pub async fn get<F, Fut>(
        &self,
        key: &K,
        purpose: T,
        set_up: F,
        refuses_purpose: fn(&E) -> bool,
    ) -> Result<Arc<V>, GetError<E>>
    where
        T: Clone,
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<Arc<V>, E>> + Send + 'static,
    {
        for _ in 0..4 {
            let wait = match self.lookup(key, purpose.clone()).await {
                None => return Err(GetError::Gone),
                Some(Lookup::Live(v)) => return Ok(v),
                Some(Lookup::Wait(rx)) => rx,
                Some(Lookup::SetUp(rx)) => {
                    let fut = set_up();
                    let (table, key, purpose) = (self.clone(), key.clone(), purpose.clone());
                    tokio::spawn(async move {
                        let result = fut.await.map_err(|e| {
                            let refused = refuses_purpose(&e);
                            (Arc::new(e), refused)
                        });
                        table.done(key, purpose, result).await;
                    });
                    rx
                }
            };
            match wait.await {
                Ok(Ready::Session(v)) => return Ok(v),
                Ok(Ready::Failed(e)) => return Err(GetError::Failed(e)),
                Ok(Ready::Retry) | Err(_) => continue,
            }
        }
        Err(GetError::Gone)
    }

    /// The live entries.
    pub async fn list(&self) -> Vec<Arc<V>> {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Cmd::List(tx)).await.is_err() {
            return Vec::new();
        }
        rx.await.unwrap_or_default()
    }
}

async fn run<K, V, T, E>(
    mut rx: mpsc::Receiver<Cmd<K, V, T, E>>,
    publish: watch::Sender<Vec<Arc<V>>>,
) where
    K: Eq + Hash + Clone,
    V: Entry,
    T: PartialEq,
{
    let mut slots: HashMap<K, Slot<V, T, E>> = HashMap::new();
    // Every entry set up, until removed: what `snapshot` shows.
    let mut known: Vec<Arc<V>> = Vec::new();
    while let Some(cmd) = rx.recv().await {
        let before = known.len();
        match &cmd {
            Cmd::Done { result: Ok(v), .. } | Cmd::Insert(_, v)
                if !known.iter().any(|k| Arc::ptr_eq(k, v)) =>
            {
                known.push(v.clone());
            }
            Cmd::Remove(_, v) => known.retain(|k| !Arc::ptr_eq(k, v) && !k.ended()),
            _ => {}
        }
        if known.len() != before {
            known.sort_by_key(|v| v.order());
            publish.send_replace(known.clone());
        }
        match cmd {
            Cmd::Lookup { key, purpose, reply } => match slots.get_mut(&key) {
                Some(Slot::Live(v)) if !v.ended() => {
                    let _ = reply.send(Lookup::Live(v.clone()));
                }
                Some(Slot::Pending(waiters)) => {
                    let (tx, rx) = oneshot::channel();
                    if reply.send(Lookup::Wait(rx)).is_ok() {
                        waiters.push((purpose, tx));
                    }
                }
                _ => {
                    let (tx, rx) = oneshot::channel();
                    // An asker that gave up before hearing it must set up does not leave a
                    // set-up pending forever.
                    if reply.send(Lookup::SetUp(rx)).is_ok() {
                        slots.insert(key, Slot::Pending(vec![(purpose, tx)]));
                    } else {
                        slots.remove(&key);
                    }
                }
            },
            Cmd::Done { key, purpose, result } => {
                let waiters = match slots.remove(&key) {
                    Some(Slot::Pending(w)) => w,
                    Some(Slot::Live(live)) => {
                        // Set up from the other side meanwhile; the newer one serves.
                        if let Ok(v) = &result {
                            slots.insert(key, Slot::Live(v.clone()));
                        } else {
                            slots.insert(key, Slot::Live(live));
                        }
                        continue;
                    }
                    None => Vec::new(),
                };
                match result {
                    Ok(v) => {
                        for (_, w) in waiters {
                            let _ = w.send(Ready::Session(v.clone()));
                        }
                        slots.insert(key, Slot::Live(v));
                    }
                    Err((e, refused_purpose)) => {
                        for (p, w) in waiters {
                            let r = if refused_purpose && p != purpose {
                                Ready::Retry
                            } else {
                                Ready::Failed(e.clone())
                            };
                            let _ = w.send(r);
                        }
                    }
                }
            }
            Cmd::Insert(key, v) => {
                if let Some(Slot::Pending(waiters)) = slots.remove(&key) {
                    for (_, w) in waiters {
                        let _ = w.send(Ready::Session(v.clone()));
                    }
                }
                slots.insert(key, Slot::Live(v));
            }
            Cmd::Remove(key, v) => {
                if matches!(slots.get(&key), Some(Slot::Live(cur)) if Arc::ptr_eq(cur, &v)) {
                    slots.remove(&key);
                }
            }
            Cmd::List(reply) => {
                let live = slots
                    .values()
                    .filter_map(|s| match s {
                        Slot::Live(v) if !v.ended() => Some(v.clone()),
                        _ => None,
                    })
                    .collect();
                let _ = reply.send(live);
            }
        }
    }
}
