//! The session table: which [`PeerSession`] carries our streams with each peer. One task
//! owns the map; everything else asks it through a bounded channel, so a burst of
//! connections to one peer sets up exactly one session through the servers and every other
//! connection waits for it. The task also publishes every session it knows that has not
//! ended (the current one per peer, and one superseded while its streams finish) for
//! `status`, which reads it without asking ([`Table::snapshot`]).

use super::session::PeerSession;
use crate::address::{Q2qAddress, ServiceName};
use std::collections::HashMap;
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot, watch};

/// What a waiter learns when the session it waited for is set up, or not.
pub enum Ready<E> {
    Session(Arc<PeerSession>),
    Failed(Arc<E>),
    /// The set-up failed for another service than the waiter's (it was refused that one):
    /// ask again.
    Retry,
}

/// The answer to [`Table::lookup`].
pub enum Lookup<E> {
    /// A live session: open a stream on it.
    Live(Arc<PeerSession>),
    /// A set-up is under way: wait for it.
    Wait(oneshot::Receiver<Ready<E>>),
    /// Nobody is setting one up: the asker must (on a task of its own, so that it finishes
    /// even if the asker gives up), report it with [`Table::done`], and wait like the others.
    SetUp(oneshot::Receiver<Ready<E>>),
}

enum Slot<E> {
    Live(Arc<PeerSession>),
    Pending(Vec<(ServiceName, oneshot::Sender<Ready<E>>)>),
}

enum Cmd<E> {
    Lookup {
        peer: Q2qAddress,
        service: ServiceName,
        reply: oneshot::Sender<Lookup<E>>,
    },
    Done {
        peer: Q2qAddress,
        service: ServiceName,
        result: Result<Arc<PeerSession>, (Arc<E>, bool)>,
    },
    Insert(Arc<PeerSession>),
    Remove {
        peer: Q2qAddress,
        id: u64,
    },
    List(oneshot::Sender<Vec<Arc<PeerSession>>>),
}

/// A handle to the table's task. The task ends when every handle is dropped.
pub struct Table<E> {
    tx: mpsc::Sender<Cmd<E>>,
    sessions: watch::Receiver<Vec<Arc<PeerSession>>>,
}

impl<E> Clone for Table<E> {
    fn clone(&self) -> Self {
        Table { tx: self.tx.clone(), sessions: self.sessions.clone() }
    }
}

/// Commands the table's task may have queued (bounded: callers wait, they are not dropped).
const QUEUE: usize = 1024;

impl<E: Send + Sync + 'static> Table<E> {
    /// Start the table's task on the current runtime.
    pub fn start() -> Table<E> {
        let (tx, rx) = mpsc::channel(QUEUE);
        let (publish, sessions) = watch::channel(Vec::new());
        tokio::spawn(run(rx, publish));
        Table { tx, sessions }
    }

    /// Every session set up and not yet removed, as the table's task last published it
    /// (sorted by id; the ones that ended meanwhile left out).
    pub fn snapshot(&self) -> Vec<Arc<PeerSession>> {
        self.sessions.borrow().iter().filter(|s| !s.ended()).cloned().collect()
    }

    /// The session with `peer`, or a wait for it (see [`Lookup`]). `None`: the table is gone.
    pub async fn lookup(&self, peer: &Q2qAddress, service: &ServiceName) -> Option<Lookup<E>> {
        let (reply, rx) = oneshot::channel();
        let cmd = Cmd::Lookup { peer: peer.clone(), service: service.clone(), reply };
        self.tx.send(cmd).await.ok()?;
        rx.await.ok()
    }

    /// Report the set-up a [`Lookup::SetUp`] asked for. `refused_service`: the error is a
    /// refusal of `service` only (another service may still be granted).
    pub async fn done(
        &self,
        peer: Q2qAddress,
        service: ServiceName,
        result: Result<Arc<PeerSession>, (Arc<E>, bool)>,
    ) {
        let _ = self.tx.send(Cmd::Done { peer, service, result }).await;
    }

    /// A session the peer set up with us (we are the callee): it becomes the one our
    /// streams to that peer use.
    pub async fn insert(&self, s: Arc<PeerSession>) {
        let _ = self.tx.send(Cmd::Insert(s)).await;
    }

    /// Forget session `id` with `peer` (closed or lost), if it is still the current one.
    pub async fn remove(&self, peer: &Q2qAddress, id: u64) {
        let _ = self.tx.send(Cmd::Remove { peer: peer.clone(), id }).await;
    }

    /// The live sessions.
    pub async fn list(&self) -> Vec<Arc<PeerSession>> {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Cmd::List(tx)).await.is_err() {
            return Vec::new();
        }
        rx.await.unwrap_or_default()
    }
}

async fn run<E>(mut rx: mpsc::Receiver<Cmd<E>>, publish: watch::Sender<Vec<Arc<PeerSession>>>) {
    let mut slots: HashMap<Q2qAddress, Slot<E>> = HashMap::new();
    // Every session set up, until removed: what `snapshot` shows.
    let mut known: Vec<Arc<PeerSession>> = Vec::new();
    while let Some(cmd) = rx.recv().await {
        let before = known.len();
        match &cmd {
            Cmd::Done { result: Ok(s), .. } | Cmd::Insert(s)
                if !known.iter().any(|k| Arc::ptr_eq(k, s)) =>
            {
                known.push(s.clone());
            }
            Cmd::Remove { id, .. } => known.retain(|k| k.id() != *id && !k.ended()),
            _ => {}
        }
        if known.len() != before {
            known.sort_by_key(|s| s.id());
            publish.send_replace(known.clone());
        }
        match cmd {
            Cmd::Lookup { peer, service, reply } => match slots.get_mut(&peer) {
                Some(Slot::Live(s)) if !s.ended() => {
                    let _ = reply.send(Lookup::Live(s.clone()));
                }
                Some(Slot::Pending(waiters)) => {
                    let (tx, rx) = oneshot::channel();
                    if reply.send(Lookup::Wait(rx)).is_ok() {
                        waiters.push((service, tx));
                    }
                }
                _ => {
                    let (tx, rx) = oneshot::channel();
                    // An asker that gave up before hearing it must set up does not leave a
                    // set-up pending forever.
                    if reply.send(Lookup::SetUp(rx)).is_ok() {
                        slots.insert(peer, Slot::Pending(vec![(service, tx)]));
                    } else {
                        slots.remove(&peer);
                    }
                }
            },
            Cmd::Done { peer, service, result } => {
                let waiters = match slots.remove(&peer) {
                    Some(Slot::Pending(w)) => w,
                    Some(Slot::Live(live)) => {
                        // The peer set one up with us meanwhile; the newer one serves.
                        if let Ok(s) = &result {
                            slots.insert(peer, Slot::Live(s.clone()));
                        } else {
                            slots.insert(peer, Slot::Live(live));
                        }
                        continue;
                    }
                    None => Vec::new(),
                };
                match result {
                    Ok(s) => {
                        for (_, w) in waiters {
                            let _ = w.send(Ready::Session(s.clone()));
                        }
                        slots.insert(peer, Slot::Live(s));
                    }
                    Err((e, refused_service)) => {
                        for (svc, w) in waiters {
                            let r = if refused_service && svc != service {
                                Ready::Retry
                            } else {
                                Ready::Failed(e.clone())
                            };
                            let _ = w.send(r);
                        }
                    }
                }
            }
            Cmd::Insert(s) => {
                if let Some(Slot::Pending(waiters)) = slots.remove(&s.peer) {
                    for (_, w) in waiters {
                        let _ = w.send(Ready::Session(s.clone()));
                    }
                }
                slots.insert(s.peer.clone(), Slot::Live(s));
            }
            Cmd::Remove { peer, id } => {
                if matches!(slots.get(&peer), Some(Slot::Live(s)) if s.id() == id) {
                    slots.remove(&peer);
                }
            }
            Cmd::List(reply) => {
                let live = slots
                    .values()
                    .filter_map(|s| match s {
                        Slot::Live(s) if !s.ended() => Some(s.clone()),
                        _ => None,
                    })
                    .collect();
                let _ = reply.send(live);
            }
        }
    }
}
