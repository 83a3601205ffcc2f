//! A full AMP peer: both ends may ask at any time. One task reads boxes and routes answers
//! to the calls waiting for them and requests to the owner's [`Incoming`] queue; one task
//! writes. Everything else holds a cloneable [`PeerHandle`].
//!
//! ```text
//!  stream ─▶ reader task ─┬─ _answer/_error ─▶ pending call (oneshot)
//!                         └─ _command ───────▶ Incoming queue (bounded) ─▶ owner
//!  PeerHandle::call / Incoming::answer ─▶ writer queue (bounded) ─▶ writer task ─▶ stream
//! ```

use super::{ANSWER, ASK, AmpBox, AmpReader, CallError, ErrorBox, write_box};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, oneshot, watch};

/// Boxes waiting to be written; a full queue makes writers wait (backpressure).
const WRITE_QUEUE: usize = 256;
/// Requests waiting for the owner.
const INCOMING_QUEUE: usize = 64;

type Pending = Arc<Mutex<HashMap<String, oneshot::Sender<Result<AmpBox, CallError>>>>>;

/// The asking side of a peer; cheap to clone.
#[derive(Clone)]
pub struct PeerHandle {
    writes: mpsc::Sender<AmpBox>,
    pending: Pending,
    next_tag: Arc<AtomicU64>,
    closed: watch::Receiver<bool>,
    /// Ends the connection now ([`PeerHandle::close`]).
    close: Arc<tokio::sync::Notify>,
}

/// A request from the other end, to be answered exactly once (or dropped: then the other
/// end gets an `UNKNOWN` error box).
pub struct Incoming {
    pub request: AmpBox,
    tag: Option<Vec<u8>>,
    writes: mpsc::Sender<AmpBox>,
}

impl Incoming {
    /// The `_command` name.
    pub fn command(&self) -> &str {
        self.request.get_str(super::COMMAND).unwrap_or("")
    }

    /// Answer with `answer`, or with an error box.
    pub async fn respond(mut self, result: Result<AmpBox, ErrorBox>) {
        let Some(tag) = self.tag.take() else { return };
        let reply = match result {
            Ok(mut a) => {
                a.insert(ANSWER, &tag);
                a
            }
            Err(e) => e.to_box(&tag),
        };
        let _ = self.writes.send(reply).await;
    }
}

impl Drop for Incoming {
    fn drop(&mut self) {
        if let Some(tag) = self.tag.take() {
            let reply = ErrorBox {
                code: "UNKNOWN".into(),
                description: "the request was not answered".into(),
            }
            .to_box(&tag);
            let _ = self.writes.try_send(reply);
        }
    }
}

/// Start reading and writing `stream`. Returns the handle for calls and the queue of
/// requests from the other end (closed when the connection ends).
pub fn spawn<S>(stream: S) -> (PeerHandle, mpsc::Receiver<Incoming>)
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (read_half, mut write_half) = tokio::io::split(stream);
    let (writes, mut write_rx) = mpsc::channel::<AmpBox>(WRITE_QUEUE);
    let (incoming_tx, incoming_rx) = mpsc::channel(INCOMING_QUEUE);
    let (closed_tx, closed) = watch::channel(false);
    let pending: Pending = Arc::default();

    let writer = tokio::spawn(async move {
        while let Some(b) = write_rx.recv().await {
            if let Err(e) = write_box(&mut write_half, &b).await {
                tracing::debug!(error = %e, "AMP write failed");
                break;
            }
        }
        let _ = tokio::io::AsyncWriteExt::shutdown(&mut write_half).await;
    });

    let reader_pending = pending.clone();
    // Weak: the connection lives while a handle or an unanswered request does; when the
    // last is dropped the writer ends, shuts its half down, and the other end sees EOF.
    let reader_writes = writes.downgrade();
    let close = Arc::new(tokio::sync::Notify::new());
    let closing = close.clone();
    tokio::spawn(async move {
        let mut reader = AmpReader::new(read_half);
        let end = loop {
            let read = tokio::select! {
                r = reader.read_box() => r,
                () = closing.notified() => break CallError::Closed,
            };
            let b = match read {
                Ok(Some(b)) => b,
                Ok(None) => break CallError::Closed,
                Err(e) => break e,
            };
            if let Some(tag) =
                b.get_str(ANSWER).or_else(|| b.get_str(super::ERROR)).map(str::to_string)
            {
                let waiter = reader_pending.lock().ok().and_then(|mut p| p.remove(&tag));
                let Some(waiter) = waiter else { continue };
                let result = match ErrorBox::from_box(&b) {
                    Some(ErrorBox { code, description }) if b.get(ANSWER).is_none() => {
                        Err(CallError::Remote { code, description })
                    }
                    _ => {
                        let mut b = b;
                        b.remove(ANSWER);
                        Ok(b)
                    }
                };
                let _ = waiter.send(result);
            } else {
                let tag = b.get(ASK).map(<[u8]>::to_vec);
                let Some(writes) = reader_writes.upgrade() else { continue };
                let incoming = Incoming { request: b, tag, writes };
                if incoming_tx.send(incoming).await.is_err() {
                    // Nobody takes requests any more; dropping `incoming` answers UNKNOWN.
                }
            }
        };
        tracing::debug!(reason = %end, "AMP connection ended");
        if let Ok(mut p) = reader_pending.lock() {
            p.clear();
        }
        let _ = closed_tx.send(true);
        writer.abort();
    });

    let next_tag = Arc::new(AtomicU64::new(1));
    (PeerHandle { writes, pending, next_tag, closed, close }, incoming_rx)
}

impl PeerHandle {
    /// Send `request` (made by [`AmpBox::command`]) and wait for its answer; an error box
    /// comes back as [`CallError::Remote`].
    pub async fn call(&self, mut request: AmpBox) -> Result<AmpBox, CallError> {
        if self.is_closed() {
            return Err(CallError::Closed);
        }
        let tag = format!("{:x}", self.next_tag.fetch_add(1, Ordering::Relaxed));
        request.insert(ASK, &tag);
        request.encode()?; // a box too big for the wire fails here, with its reason
        let (tx, rx) = oneshot::channel();
        if let Ok(mut p) = self.pending.lock() {
            p.insert(tag.clone(), tx);
        }
        if self.writes.send(request).await.is_err() {
            self.forget(&tag);
            return Err(CallError::Closed);
        }
        match rx.await {
            Ok(r) => r,
            Err(_) => Err(CallError::Closed),
        }
    }

    /// Send a box that wants no answer.
    pub async fn tell(&self, request: AmpBox) -> Result<(), CallError> {
        request.encode()?;
        self.writes.send(request).await.map_err(|_| CallError::Closed)
    }

    /// Send a box that wants no answer if the connection's write queue has room now;
    /// `false` (the box dropped) when it is full, closed, or the box cannot be encoded.
    /// For senders that must not wait on one slow connection (the relay's owner).
    pub fn try_tell(&self, request: AmpBox) -> bool {
        request.encode().is_ok() && self.writes.try_send(request).is_ok()
    }

    fn forget(&self, tag: &str) {
        if let Ok(mut p) = self.pending.lock() {
            p.remove(tag);
        }
    }

    pub fn is_closed(&self) -> bool {
        *self.closed.borrow()
    }

    /// End the connection now, as if the other end had gone: calls waiting fail, the
    /// stream is dropped (the other end sees it close).
    pub fn close(&self) {
        self.close.notify_one();
    }

    /// Resolves when the connection has ended.
    pub async fn closed(&self) {
        let mut c = self.closed.clone();
        let _ = c.wait_for(|c| *c).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn both_ends_ask_and_answer_concurrently() {
        let (a, b) = tokio::io::duplex(1 << 16);
        let (ha, mut ia) = spawn(a);
        let (hb, mut ib) = spawn(b);
        // b answers "echo" with the same value, after a's question to it is itself asked
        // a question back (calls cross in flight).
        let ha2 = ha.clone();
        tokio::spawn(async move {
            while let Some(req) = ib.recv().await {
                let v = req.request.get("v").unwrap_or_default().to_vec();
                let r = ha2.clone();
                tokio::spawn(async move {
                    let _ = r; // not used: b answers directly
                    req.respond(Ok(AmpBox::new().with("v", v))).await;
                });
            }
        });
        tokio::spawn(async move {
            while let Some(req) = ia.recv().await {
                if req.command() == "fail" {
                    let e = ErrorBox { code: "NOPE".into(), description: "refused".into() };
                    req.respond(Err(e)).await;
                } else {
                    drop(req);
                }
            }
        });
        let mut calls = Vec::new();
        for i in 0..50 {
            let ha = ha.clone();
            calls.push(tokio::spawn(async move {
                let r = ha.call(AmpBox::command("echo").with("v", i.to_string())).await.unwrap();
                assert_eq!(r.get_str("v"), Some(i.to_string().as_str()));
            }));
        }
        for c in calls {
            c.await.unwrap();
        }
        let err = hb.call(AmpBox::command("fail")).await.unwrap_err();
        assert_eq!(err.code(), Some("NOPE"));
        let err = hb.call(AmpBox::command("ignored")).await.unwrap_err();
        assert_eq!(err.code(), Some("UNKNOWN"));
        let too_big = AmpBox::command("x").with("v", vec![0u8; 70000]);
        assert!(matches!(hb.call(too_big).await, Err(CallError::Protocol(_))));
    }

    #[tokio::test]
    async fn dropping_every_handle_closes_the_connection() {
        let (a, b) = tokio::io::duplex(1 << 16);
        let (ha, ia) = spawn(a);
        let (hb, _ib) = spawn(b);
        drop((ha, ia));
        tokio::time::timeout(std::time::Duration::from_secs(5), hb.closed()).await.unwrap();
        assert!(hb.is_closed());
    }

    #[tokio::test]
    async fn close_ends_the_connection_for_both_ends_while_handles_live() {
        let (a, b) = tokio::io::duplex(1 << 16);
        let (ha, _ia) = spawn(a);
        let (hb, _ib) = spawn(b);
        let call = tokio::spawn({
            let ha = ha.clone();
            async move { ha.call(AmpBox::command("never answered")).await }
        });
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        ha.close();
        let wait = std::time::Duration::from_secs(5);
        tokio::time::timeout(wait, ha.closed()).await.unwrap();
        tokio::time::timeout(wait, hb.closed()).await.unwrap();
        assert!(matches!(call.await.unwrap(), Err(CallError::Closed)));
        assert!(ha.call(AmpBox::command("after")).await.is_err());
    }

    #[tokio::test]
    async fn pending_calls_fail_when_the_connection_ends() {
        let (a, b) = tokio::io::duplex(1 << 16);
        let (ha, _ia) = spawn(a);
        let (_hb, ib) = spawn(b);
        let call = tokio::spawn(async move { ha.call(AmpBox::command("never")).await });
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        drop(ib);
        drop(_hb);
        // b's queue is gone: the request is answered UNKNOWN or the connection closes.
        assert!(call.await.unwrap().is_err());
    }
}
