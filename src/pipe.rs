//! Byte pipes between a driver task that owns a TCP stack and the tokio tasks using its
//! streams: one idea shared by the PTCP endpoint ([`crate::ptcp`], streams of a session) and
//! the TUN daemon ([`crate::daemon::tun`], flows from apps to virtual addresses).
//!
//! ```text
//!   task: PipeStream (AsyncRead + AsyncWrite)          driver task (owns the stack)
//!        write ──▶ Pipes.tx ──┐   schedule()    ┌──▶ pump(): tx ─▶ stack.send
//!        read  ◀── Pipes.rx ◀─┘ ──────────────▶ └──── stack.recv ─▶ rx
//! ```
//!
//! A stream handle never touches the stack: it shares two bounded byte pipes with the driver
//! ([`Pipes`]). Writing copies into the send pipe (full pipe = `Pending`, that is
//! backpressure) and wakes the driver through [`DriverWake`], which moves the bytes into the
//! stack with [`pump`]; the driver moves received bytes from the stack into the receive pipe
//! and wakes the reader. A pipe holds [`PIPE_BYTES`]; the stack's own TCP buffers are behind
//! it.

use std::any::Any;
use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Notify;

/// Bytes each pipe of a stream holds (each direction).
pub(crate) const PIPE_BYTES: usize = 512 << 10;

/// Bytes [`bridge`] moves per read and per write, each direction. tokio's default (8 KiB)
/// makes a lock, a copy and often a cross-task wake-up per 8 KiB on both pipes; at
/// Gbit/s rates that is hundreds of thousands of them a second.
pub(crate) const BRIDGE_BYTES: usize = 64 << 10;

/// Copy between two streams, both ways, until both are done (tokio's
/// `copy_bidirectional`, with [`BRIDGE_BYTES`] buffers): the daemon's bridge between an
/// app's flow or local TCP connection and a peer stream. Returns the bytes moved
/// (a → b, b → a).
pub(crate) async fn bridge<A, B>(a: &mut A, b: &mut B) -> io::Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    tokio::io::copy_bidirectional_with_sizes(a, b, BRIDGE_BYTES, BRIDGE_BYTES).await
}

/// Why a stream cannot go on. Carried inside the `io::Error`s a stream returns (get it back
/// with `err.get_ref().and_then(|e| e.downcast_ref::<StreamFailure>())`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum StreamFailure {
    /// The peer reset the stream (RST), or refused it when it was opened.
    #[error("peer reset the stream")]
    Reset,
    /// The peer refused to accept the stream (its accept queue was full or closed).
    #[error("peer refused the stream")]
    Refused,
    /// The session under the stream ended: nothing arrived from the peer for this long.
    #[error("stream timed out: session lost, peer unreachable for {} s", .0 / 1000)]
    TimedOut(u64),
    /// This side aborted the stream ([`PipeStream::abort`]).
    #[error("stream aborted")]
    Aborted,
    /// Writing after `shutdown`.
    #[error("stream already shut down for writing")]
    WriteAfterShutdown,
    /// The driver is gone (its endpoint or device was shut down).
    #[error("PTCP endpoint shut down")]
    EndpointGone,
}

impl StreamFailure {
    fn kind(self) -> io::ErrorKind {
        match self {
            StreamFailure::Reset => io::ErrorKind::ConnectionReset,
            StreamFailure::Refused => io::ErrorKind::ConnectionRefused,
            StreamFailure::TimedOut(_) => io::ErrorKind::TimedOut,
            StreamFailure::Aborted => io::ErrorKind::ConnectionAborted,
            StreamFailure::WriteAfterShutdown | StreamFailure::EndpointGone => {
                io::ErrorKind::BrokenPipe
            }
        }
    }
}

impl From<StreamFailure> for io::Error {
    fn from(f: StreamFailure) -> io::Error {
        io::Error::new(f.kind(), f)
    }
}

/// The state a stream handle shares with the driver. Locked briefly by either side, never
/// across an `.await`.
#[derive(Default)]
pub(crate) struct PipeState {
    /// Received bytes, for the reader.
    pub rx: VecDeque<u8>,
    /// The peer finished and everything before the FIN is in `rx`.
    pub rx_eof: bool,
    /// The driver stopped reading the stack because `rx` was full.
    pub rx_stalled: bool,
    pub read_waker: Option<Waker>,
    /// Bytes written, for the driver to hand to the stack.
    pub tx: VecDeque<u8>,
    /// The writer asked for FIN (after `tx`).
    pub shutdown: bool,
    /// The driver handed the FIN to the stack.
    pub fin_sent: bool,
    pub write_waker: Option<Waker>,
    /// The handle asked for a reset.
    pub abort: bool,
    /// The handle is gone: received bytes are discarded.
    pub dropped: bool,
    /// A Nagle setting for the driver to apply (`true` = no delay).
    pub nodelay: Option<bool>,
    /// Why the stream ended, if it did.
    pub error: Option<StreamFailure>,
}

/// A stream's pipes, named by the driver's `key` for it.
pub(crate) struct Pipes<K> {
    pub key: K,
    pub state: Mutex<PipeState>,
    /// Set while the stream is in the driver's dirty list (so it is queued once).
    pub queued: AtomicBool,
}

impl<K> Pipes<K> {
    pub fn new(key: K) -> Arc<Pipes<K>> {
        Arc::new(Pipes {
            key,
            state: Mutex::new(PipeState::default()),
            queued: AtomicBool::new(false),
        })
    }

    pub fn lock(&self) -> MutexGuard<'_, PipeState> {
        // A panic while holding this lock leaves plain bytes and flags: still usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// End the stream with `error` (unless it already ended) and wake both halves.
    pub fn fail(&self, error: StreamFailure) {
        let mut st = self.lock();
        st.error.get_or_insert(error);
        wake_both(&mut st);
    }
}

pub(crate) fn wake_both(st: &mut PipeState) {
    if let Some(w) = st.read_waker.take() {
        w.wake();
    }
    if let Some(w) = st.write_waker.take() {
        w.wake();
    }
}

/// How stream handles wake the driver: a list of streams with work, and a notification.
/// The list holds each stream at most once (the `queued` flag), so it is bounded by the
/// number of streams.
pub(crate) struct DriverWake<K> {
    dirty: Mutex<Vec<Arc<Pipes<K>>>>,
    pub notify: Notify,
}

impl<K> DriverWake<K> {
    pub fn new() -> Arc<DriverWake<K>> {
        Arc::new(DriverWake { dirty: Mutex::new(Vec::new()), notify: Notify::new() })
    }

    pub fn schedule(&self, pipes: &Arc<Pipes<K>>) {
        if !pipes.queued.swap(true, Ordering::AcqRel) {
            self.dirty.lock().unwrap_or_else(|e| e.into_inner()).push(pipes.clone());
            self.notify.notify_one();
        }
    }

    /// Swap the streams with work into `into` (empty); the driver clears each one's
    /// `queued` flag before pumping it.
    pub fn take(&self, into: &mut Vec<Arc<Pipes<K>>>) {
        let mut d = self.dirty.lock().unwrap_or_else(|e| e.into_inner());
        std::mem::swap(&mut *d, into);
    }
}

/// A bidirectional byte stream whose other end a driver task owns.
///
/// * Reading returns 0 (EOF) after the peer's FIN, once everything before it was read.
/// * `shutdown` (tokio `AsyncWriteExt::shutdown`) sends FIN after everything written; reading
///   goes on.
/// * [`PipeStream::abort`] resets the stream (RST): queued bytes are discarded both ways.
/// * Errors are `io::Error`s carrying a [`StreamFailure`] that says what happened.
/// * **Dropping** a stream closes it like `close(2)` closes a TCP socket: bytes already
///   written are still delivered, then FIN; bytes arriving afterwards are discarded.
pub(crate) struct PipeStream<K> {
    pipes: Arc<Pipes<K>>,
    wake: Arc<DriverWake<K>>,
    /// Whatever keeps the driver running while the stream lives (its command channel).
    _alive: Box<dyn Any + Send + Sync>,
}

impl<K> PipeStream<K> {
    pub fn new(
        pipes: Arc<Pipes<K>>,
        wake: Arc<DriverWake<K>>,
        alive: Box<dyn Any + Send + Sync>,
    ) -> PipeStream<K> {
        PipeStream { pipes, wake, _alive: alive }
    }

    pub fn key(&self) -> &K {
        &self.pipes.key
    }

    /// Reset the stream (RST): queued bytes are discarded, the peer's reads and writes fail
    /// with "peer reset the stream", and so do ours from now on.
    pub fn abort(&self) {
        {
            let mut st = self.pipes.lock();
            st.abort = true;
            st.error.get_or_insert(StreamFailure::Aborted);
            st.tx.clear();
            st.rx.clear();
            wake_both(&mut st);
        }
        self.wake.schedule(&self.pipes);
    }

    /// Turn Nagle's algorithm off (`true`) or back on.
    pub fn set_nodelay(&self, nodelay: bool) {
        self.pipes.lock().nodelay = Some(nodelay);
        self.wake.schedule(&self.pipes);
    }

    /// Why the stream ended, if it did.
    pub fn failure(&self) -> Option<StreamFailure> {
        self.pipes.lock().error
    }
}

impl<K> AsyncRead for PipeStream<K> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let mut st = this.pipes.lock();
        if !st.rx.is_empty() {
            let n = buf.remaining().min(st.rx.len());
            let (a, b) = st.rx.as_slices();
            let na = n.min(a.len());
            buf.put_slice(&a[..na]);
            if n > na {
                buf.put_slice(&b[..n - na]);
            }
            st.rx.drain(..n);
            // Restart the driver once half the pipe is free, not on every read.
            let restart = st.rx_stalled && st.rx.len() <= PIPE_BYTES / 2;
            if restart {
                st.rx_stalled = false;
            }
            drop(st);
            if restart {
                this.wake.schedule(&this.pipes);
            }
            return Poll::Ready(Ok(()));
        }
        if let Some(e) = st.error {
            return Poll::Ready(Err(e.into()));
        }
        if st.rx_eof || buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        st.read_waker = Some(cx.waker().clone());
        Poll::Pending
    }
}

impl<K> AsyncWrite for PipeStream<K> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let mut st = this.pipes.lock();
        if let Some(e) = st.error {
            return Poll::Ready(Err(e.into()));
        }
        if st.shutdown {
            return Poll::Ready(Err(StreamFailure::WriteAfterShutdown.into()));
        }
        if data.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let room = PIPE_BYTES.saturating_sub(st.tx.len());
        if room == 0 {
            st.write_waker = Some(cx.waker().clone());
            return Poll::Pending;
        }
        let n = room.min(data.len());
        let was_empty = st.tx.is_empty();
        st.tx.extend(&data[..n]);
        drop(st);
        // When the pipe was not empty the driver already knows (it is queued, or waits
        // for the stack to have room and will look again then).
        if was_empty {
            this.wake.schedule(&this.pipes);
        }
        Poll::Ready(Ok(n))
    }

    /// Ready once everything written was handed to the stack (like a kernel socket's
    /// buffer: not yet acknowledged by the peer).
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let mut st = this.pipes.lock();
        if st.tx.is_empty() {
            return Poll::Ready(Ok(()));
        }
        if let Some(e) = st.error {
            return Poll::Ready(Err(e.into()));
        }
        st.write_waker = Some(cx.waker().clone());
        Poll::Pending
    }

    /// Sends FIN after everything written; ready once the FIN is queued in the stack.
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let mut st = this.pipes.lock();
        if st.fin_sent {
            return Poll::Ready(Ok(()));
        }
        if let Some(e) = st.error {
            return Poll::Ready(Err(e.into()));
        }
        let first = !st.shutdown;
        st.shutdown = true;
        st.write_waker = Some(cx.waker().clone());
        drop(st);
        if first {
            this.wake.schedule(&this.pipes);
        }
        Poll::Pending
    }
}

impl<K> Drop for PipeStream<K> {
    fn drop(&mut self) {
        {
            let mut st = self.pipes.lock();
            st.dropped = true;
            st.shutdown = true;
            st.rx.clear();
            st.read_waker = None;
            st.write_waker = None;
        }
        self.wake.schedule(&self.pipes);
    }
}

/// Why the stack did not move bytes, as [`pump`] needs to know it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum IoError {
    /// Nothing to read now (an event follows when there is).
    Blocked,
    /// The other end reset the stream.
    Reset,
    /// The stream's half is closed or released.
    Closed,
}

/// One stream of a stack, as [`pump`] drives it.
pub(crate) trait StreamIo {
    /// Give `f` at most `max` received bytes straight from the stack's buffer (one piece;
    /// call again for more): how many, `Ok(0)` at the end of the stream.
    fn recv_with(&mut self, max: usize, f: &mut dyn FnMut(&[u8])) -> Result<usize, IoError>;
    /// Queue `data`: how much was taken (`Ok(0)`: no room, or not open yet).
    fn send(&mut self, data: &[u8]) -> Result<usize, IoError>;
    /// Send FIN after what was queued.
    fn close(&mut self);
    /// Reset the stream and release it.
    fn abort(&mut self);
    fn set_nodelay(&mut self, nodelay: bool);
}

/// Move bytes between a stream's pipes and the stack, both ways, and carry out a shutdown or
/// abort the handle asked for. The driver calls it when the handle scheduled the stream and
/// when the stack says the stream is readable, writable or finished. Received bytes go
/// from the stack's buffer straight into the pipe (one copy).
pub(crate) fn pump<K>(io: &mut impl StreamIo, p: &Pipes<K>) {
    let mut st = p.lock();
    if st.abort {
        drop(st);
        io.abort();
        return;
    }
    if let Some(nodelay) = st.nodelay.take() {
        io.set_nodelay(nodelay);
    }
    if st.error.is_some() && !st.dropped {
        return;
    }
    // Stack → reader.
    let mut woke_reader = false;
    loop {
        // A dropped handle's bytes are read and discarded.
        let room = if st.dropped { usize::MAX } else { PIPE_BYTES - st.rx.len() };
        if room == 0 {
            st.rx_stalled = true;
            break;
        }
        let keep = !st.dropped;
        let rx = &mut st.rx;
        let r = io.recv_with(room, &mut |data| {
            if keep {
                rx.extend(data);
            }
        });
        match r {
            Ok(0) => {
                st.rx_eof = true;
                woke_reader = true;
                break;
            }
            Ok(_) => woke_reader |= keep,
            Err(IoError::Blocked) => break,
            Err(IoError::Reset) => {
                st.error.get_or_insert(StreamFailure::Reset);
                woke_reader = true;
                break;
            }
            Err(IoError::Closed) => break,
        }
    }
    if woke_reader && let Some(w) = st.read_waker.take() {
        w.wake();
    }
    // Writer → stack.
    let before = st.tx.len();
    while !st.tx.is_empty() {
        let (a, _) = st.tx.as_slices();
        match io.send(a) {
            Ok(0) => break,
            Ok(n) => {
                st.tx.drain(..n);
            }
            Err(IoError::Reset) => {
                st.error.get_or_insert(StreamFailure::Reset);
                st.tx.clear();
                break;
            }
            Err(_) => {
                // The stream's sending half is gone (closed, released): say so rather than
                // drop the bytes silently.
                st.error.get_or_insert(StreamFailure::WriteAfterShutdown);
                st.tx.clear();
                break;
            }
        }
    }
    if st.tx.is_empty() && st.shutdown && !st.fin_sent {
        io.close();
        st.fin_sent = true;
    }
    if (st.tx.len() < before || st.fin_sent)
        && let Some(w) = st.write_waker.take()
    {
        w.wake();
    }
}
