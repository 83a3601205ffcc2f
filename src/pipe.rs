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
//!
//! A driver can also join one of its own streams to another driver's stream without a task
//! in between ([`Splice`]): the TUN daemon does so with an app's flow and its peer stream.

use std::any::Any;
use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Wake, Waker};

use tokio::io::{AsyncBufRead, AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Notify;

/// Bytes each pipe of a stream holds (each direction).
pub(crate) const PIPE_BYTES: usize = 512 << 10;

/// Bytes [`bridge`] reads from the local stream at a time. tokio's default (8 KiB) makes a
/// lock, a copy and often a cross-task wake-up per 8 KiB on the pipe; at Gbit/s rates that
/// is hundreds of thousands of them a second.
pub(crate) const BRIDGE_BYTES: usize = 64 << 10;

/// Most bytes one direction of [`bridge`] moves per poll before it lets the other direction
/// and other tasks run.
const BRIDGE_TURN: u64 = 1 << 20;

/// Copy between a peer stream `a` and a local stream `b`, both ways, until both are done
/// (what tokio's `copy_bidirectional` does): each direction ends with a shutdown of the
/// stream it writes to, and an error either way ends both. `a` is read in place
/// ([`AsyncBufRead`]: from its pipe's buffer, no copy in between), `b` through a
/// [`BRIDGE_BYTES`] buffer. The daemon's bridge between a local TCP connection and a peer
/// stream. Returns the bytes moved (a → b, b → a).
pub(crate) async fn bridge<A, B>(a: &mut A, b: &mut B) -> io::Result<(u64, u64)>
where
    A: AsyncBufRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    // A BufReader passes writes through to the stream it reads.
    let mut b = tokio::io::BufReader::with_capacity(BRIDGE_BYTES, b);
    let (mut down, mut up) = (Flow::default(), Flow::default());
    std::future::poll_fn(|cx| {
        let d = down.poll(cx, &mut *a, &mut b)?;
        let u = up.poll(cx, &mut b, &mut *a)?;
        std::task::ready!(d);
        std::task::ready!(u);
        Poll::Ready(Ok((down.moved, up.moved)))
    })
    .await
}

/// One direction of [`bridge`].
#[derive(Default)]
struct Flow {
    moved: u64,
    /// Written since the last flush.
    unflushed: bool,
    /// The reader ended: the writer is being shut down, or is.
    eof: bool,
    done: bool,
}

impl Flow {
    /// Move what `r` has into `w` until `r` has nothing now (then flush `w`), or ends (then
    /// shut `w` down).
    fn poll<R, W>(&mut self, cx: &mut Context<'_>, r: &mut R, w: &mut W) -> Poll<io::Result<()>>
    where
        R: AsyncBufRead + Unpin + ?Sized,
        W: AsyncWrite + Unpin + ?Sized,
    {
        let mut turn = 0u64;
        while !self.eof {
            if turn >= BRIDGE_TURN {
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            let data = match Pin::new(&mut *r).poll_fill_buf(cx) {
                Poll::Ready(d) => d?,
                Poll::Pending => {
                    if self.unflushed {
                        std::task::ready!(Pin::new(&mut *w).poll_flush(cx))?;
                        self.unflushed = false;
                    }
                    return Poll::Pending;
                }
            };
            if data.is_empty() {
                self.eof = true;
                break;
            }
            let n = std::task::ready!(Pin::new(&mut *w).poll_write(cx, data))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            Pin::new(&mut *r).consume(n);
            self.moved += n as u64;
            self.unflushed = true;
            turn += n as u64;
        }
        if !self.done {
            std::task::ready!(Pin::new(&mut *w).poll_shutdown(cx))?;
            self.done = true;
        }
        Poll::Ready(Ok(()))
    }
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
    /// Received bytes the reader took out of `rx` and has not consumed yet (as of its last
    /// look): they count against the pipe's [`PIPE_BYTES`] too.
    pub held: usize,
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
    /// Received bytes taken from the pipe for the reader: the pipe's whole buffer, swapped
    /// out under the lock (no copy), served from here by `poll_fill_buf` / `poll_read`.
    held: VecDeque<u8>,
    /// Whatever keeps the driver running while the stream lives (its command channel).
    _alive: Box<dyn Any + Send + Sync>,
}

impl<K> PipeStream<K> {
    pub fn new(
        pipes: Arc<Pipes<K>>,
        wake: Arc<DriverWake<K>>,
        alive: Box<dyn Any + Send + Sync>,
    ) -> PipeStream<K> {
        PipeStream { pipes, wake, held: VecDeque::new(), _alive: alive }
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

impl<K> AsyncBufRead for PipeStream<K> {
    /// The received bytes, without a copy: when what the reader holds is used up, the
    /// pipe's buffer is swapped for the reader's empty one under the lock.
    fn poll_fill_buf(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<&[u8]>> {
        let this = self.get_mut();
        let mut st = this.pipes.lock();
        if st.abort {
            // Our own reset: what was received is discarded (see `abort`).
            this.held.clear();
        }
        if this.held.is_empty() {
            std::mem::swap(&mut st.rx, &mut this.held);
        }
        st.held = this.held.len();
        // Restart the driver once half the pipe is free, not on every read.
        let restart = st.rx_stalled && st.rx.len() + st.held <= PIPE_BYTES / 2;
        if restart {
            st.rx_stalled = false;
        }
        let pending = if !this.held.is_empty() {
            None
        } else if let Some(e) = st.error {
            Some(Poll::Ready(Err(e.into())))
        } else if st.rx_eof {
            None
        } else {
            st.read_waker = Some(cx.waker().clone());
            Some(Poll::Pending)
        };
        drop(st);
        if restart {
            this.wake.schedule(&this.pipes);
        }
        match pending {
            Some(p) => p,
            None => Poll::Ready(Ok(this.held.as_slices().0)),
        }
    }

    fn consume(self: Pin<&mut Self>, amt: usize) {
        let held = &mut self.get_mut().held;
        held.drain(..amt.min(held.len()));
    }
}

impl<K> AsyncRead for PipeStream<K> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        let data = std::task::ready!(self.as_mut().poll_fill_buf(cx))?;
        let n = data.len().min(buf.remaining());
        buf.put_slice(&data[..n]);
        self.consume(n);
        Poll::Ready(Ok(()))
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

/// A `Waker` that puts one stream of a driver on that driver's work list.
struct ScheduleWaker<K> {
    wake: Arc<DriverWake<K>>,
    pipes: Arc<Pipes<K>>,
}

impl<K: Send + Sync + 'static> Wake for ScheduleWaker<K> {
    fn wake(self: Arc<Self>) {
        self.wake.schedule(&self.pipes);
    }
    fn wake_by_ref(self: &Arc<Self>) {
        self.wake.schedule(&self.pipes);
    }
}

/// One stream of this driver's stack joined straight to another driver's stream: the TUN
/// daemon's app flow and the peer stream that carries it.
///
/// ```text
///   this driver (flow)                       other driver (peer stream)
///   stack.recv_with ──copy──▶ peer's tx pipe ──▶ pump ──▶ other stack
///   stack.send ◀────────────── peer's rx pipe ◀── pump ◀── other stack
/// ```
///
/// [`Splice::pump`] does in this driver what a task holding the [`PipeStream`] and copying
/// (`bridge`) would do, without that task and its buffer: bytes move once, from this stack's
/// buffer into the peer stream's pipe and back, two copies a byte fewer each way and no task
/// wake-up in between (in the lab about a fifth of the TUN daemon's time went to them).
/// The peer stream's wakers are set to put this driver's stream on this driver's work list,
/// so the other driver needs to know nothing of it. The stream's own [`Pipes`] (`ours`)
/// carry no bytes: they are the work-list entry.
pub(crate) struct Splice<P> {
    peer: PipeStream<P>,
    waker: Waker,
    /// This stack's stream ended (its FIN was read): the peer stream was shut down.
    sent_fin: bool,
    /// The peer stream ended: this stack's stream was closed (FIN after the queued bytes).
    closed: bool,
    /// Bytes moved (to the peer, from the peer).
    up: u64,
    down: u64,
}

/// How a [`Splice`] stands after [`Splice::pump`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SpliceState {
    /// Bytes may still move.
    Open,
    /// Both directions finished with FIN.
    Finished,
    /// One side reset or failed: the other side was reset too.
    Failed(StreamFailure),
}

impl<P> Splice<P> {
    /// Join a stream of this driver (its work-list entry `ours` on `wake`) to `peer`.
    pub fn new<K: Send + Sync + 'static>(
        peer: PipeStream<P>,
        wake: &Arc<DriverWake<K>>,
        ours: &Arc<Pipes<K>>,
    ) -> Splice<P> {
        let waker =
            Waker::from(Arc::new(ScheduleWaker { wake: wake.clone(), pipes: ours.clone() }));
        Splice { peer, waker, sent_fin: false, closed: false, up: 0, down: 0 }
    }

    /// Bytes moved so far: (this stack → peer, peer → this stack).
    pub fn moved(&self) -> (u64, u64) {
        (self.up, self.down)
    }

    /// Both directions finished with FIN.
    pub fn finished(&self) -> bool {
        self.sent_fin && self.closed
    }

    /// The peer stream, for its settings (Nagle).
    pub fn peer(&self) -> &PipeStream<P> {
        &self.peer
    }

    /// Move bytes both ways between `io` (this driver's stream) and the peer stream, and
    /// pass on FIN and resets. Call it when the stream is scheduled (the peer stream has
    /// bytes, room or news) and when this stack says the stream is readable, writable or
    /// finished. After `Failed` both sides are reset; drop the splice once the stack
    /// forgets the stream.
    pub fn pump(&mut self, io: &mut impl StreamIo) -> SpliceState {
        let mut st = self.peer.pipes.lock();
        if let Some(e) = st.error {
            drop(st);
            io.abort();
            return SpliceState::Failed(e);
        }
        let mut schedule = false;
        // This stack → the peer's send pipe (what `poll_write` does).
        if !self.sent_fin {
            let was_empty = st.tx.is_empty();
            loop {
                let room = PIPE_BYTES.saturating_sub(st.tx.len());
                if room == 0 {
                    st.write_waker = Some(self.waker.clone());
                    break;
                }
                let tx = &mut st.tx;
                match io.recv_with(room, &mut |data| tx.extend(data)) {
                    Ok(0) => {
                        st.shutdown = true;
                        self.sent_fin = true;
                        schedule = true;
                        break;
                    }
                    Ok(n) => self.up += n as u64,
                    Err(IoError::Blocked) | Err(IoError::Closed) => break,
                    Err(IoError::Reset) => {
                        drop(st);
                        self.peer.abort();
                        return SpliceState::Failed(StreamFailure::Reset);
                    }
                }
            }
            schedule |= was_empty && !st.tx.is_empty();
        }
        // The peer's receive pipe → this stack (what `poll_read` does).
        while !st.rx.is_empty() {
            let (a, _) = st.rx.as_slices();
            match io.send(a) {
                // This stack is full: it says when it is writable again.
                Ok(0) => break,
                Ok(n) => {
                    st.rx.drain(..n);
                    self.down += n as u64;
                }
                Err(e) => {
                    drop(st);
                    self.peer.abort();
                    let why = if e == IoError::Reset {
                        StreamFailure::Reset
                    } else {
                        StreamFailure::WriteAfterShutdown
                    };
                    return SpliceState::Failed(why);
                }
            }
        }
        if st.rx_stalled && st.rx.len() <= PIPE_BYTES / 2 {
            st.rx_stalled = false;
            schedule = true;
        }
        if st.rx.is_empty() {
            if st.rx_eof {
                if !self.closed {
                    io.close();
                    self.closed = true;
                }
            } else {
                st.read_waker = Some(self.waker.clone());
            }
        }
        drop(st);
        if schedule {
            self.peer.wake.schedule(&self.peer.pipes);
        }
        if self.finished() { SpliceState::Finished } else { SpliceState::Open }
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
        let room =
            if st.dropped { usize::MAX } else { PIPE_BYTES.saturating_sub(st.rx.len() + st.held) };
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A stack's stream in memory: `inbox` is what its far end sent (read with `recv_with`),
    /// `outbox` what was queued to it (`send`, at most `room` bytes waiting).
    #[derive(Default)]
    struct MemIo {
        inbox: VecDeque<u8>,
        fin_in: bool,
        reset: bool,
        outbox: Vec<u8>,
        room: usize,
        closed: bool,
        aborted: bool,
    }

    impl StreamIo for MemIo {
        fn recv_with(&mut self, max: usize, f: &mut dyn FnMut(&[u8])) -> Result<usize, IoError> {
            if self.reset {
                return Err(IoError::Reset);
            }
            if self.inbox.is_empty() {
                return if self.fin_in { Ok(0) } else { Err(IoError::Blocked) };
            }
            let (a, _) = self.inbox.as_slices();
            let n = a.len().min(max);
            f(&a[..n]);
            self.inbox.drain(..n);
            Ok(n)
        }
        fn send(&mut self, data: &[u8]) -> Result<usize, IoError> {
            if self.aborted || self.closed {
                return Err(IoError::Closed);
            }
            let n = self.room.saturating_sub(self.outbox.len()).min(data.len());
            self.outbox.extend_from_slice(&data[..n]);
            Ok(n)
        }
        fn close(&mut self) {
            self.closed = true;
        }
        fn abort(&mut self) {
            self.aborted = true;
        }
        fn set_nodelay(&mut self, _: bool) {}
    }

    fn bytes(n: usize, seed: u8) -> Vec<u8> {
        (0..n).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
    }

    /// This driver's flow (`ours`, on `wake`) spliced to a stream of another driver
    /// (`theirs`, on `their_wake`).
    struct Rig {
        wake: Arc<DriverWake<u8>>,
        their_wake: Arc<DriverWake<u16>>,
        theirs: Arc<Pipes<u16>>,
        splice: Splice<u16>,
    }

    fn rig() -> Rig {
        let wake = DriverWake::new();
        let ours = Pipes::new(1u8);
        let their_wake = DriverWake::new();
        let theirs = Pipes::new(2u16);
        let handle = PipeStream::new(theirs.clone(), their_wake.clone(), Box::new(()));
        let splice = Splice::new(handle, &wake, &ours);
        Rig { wake, their_wake, theirs, splice }
    }

    fn scheduled<K>(wake: &DriverWake<K>) -> usize {
        let mut v = Vec::new();
        wake.take(&mut v);
        for p in &v {
            p.queued.store(false, Ordering::Release);
        }
        v.len()
    }

    #[test]
    fn bytes_and_fin_cross_both_ways_with_backpressure() {
        let mut r = rig();
        let up = bytes(3 * PIPE_BYTES + 12345, 7);
        let down = bytes(2 * PIPE_BYTES + 999, 3);
        // The app's stream: it sent `up` and FIN, and takes 64 KiB at a time.
        let mut app =
            MemIo { inbox: up.iter().copied().collect(), fin_in: true, ..Default::default() };
        app.room = 64 << 10;
        // The far stream: it sent `down` and FIN, and takes 100 KiB at a time.
        let mut far =
            MemIo { inbox: down.iter().copied().collect(), fin_in: true, ..Default::default() };
        far.room = 100 << 10;
        let (mut got_up, mut got_down) = (Vec::new(), Vec::new());
        let mut woken = 0;
        for _ in 0..10_000 {
            r.splice.pump(&mut app);
            pump(&mut far, &r.theirs);
            woken += scheduled(&r.wake);
            scheduled(&r.their_wake);
            got_up.append(&mut far.outbox);
            got_down.append(&mut app.outbox);
            if r.splice.finished() && far.closed {
                break;
            }
        }
        assert!(r.splice.finished(), "both FINs passed on");
        assert!(far.closed, "the far stream got the app's FIN");
        assert!(app.closed, "the app got the far stream's FIN");
        assert_eq!(got_up, up);
        assert_eq!(got_down, down);
        assert_eq!(r.splice.moved(), (up.len() as u64, down.len() as u64));
        // The pipe filled (`up` is 3 pipes long): the other driver woke this one as it drained.
        assert!(woken > 0, "the other driver's progress scheduled the flow here");
        assert!(!app.aborted && !far.aborted);
    }

    #[test]
    fn a_full_pipe_waits_for_the_other_driver_and_is_woken_by_it() {
        let mut r = rig();
        let mut app =
            MemIo { inbox: bytes(PIPE_BYTES + 10, 1).into(), room: 1, ..Default::default() };
        assert_eq!(r.splice.pump(&mut app), SpliceState::Open);
        assert_eq!(r.theirs.lock().tx.len(), PIPE_BYTES, "the pipe holds no more than its size");
        assert_eq!(app.inbox.len(), 10, "the rest stays in the stack (its window closes)");
        assert_eq!(scheduled(&r.their_wake), 1, "the other driver was told once");
        assert_eq!(scheduled(&r.wake), 0);
        let mut far = MemIo { room: 1000, ..Default::default() };
        pump(&mut far, &r.theirs);
        assert_eq!(far.outbox.len(), 1000);
        assert_eq!(scheduled(&r.wake), 1, "room in the pipe wakes this driver's flow");
        r.splice.pump(&mut app);
        assert!(app.inbox.is_empty());
    }

    #[test]
    fn a_reset_on_either_side_resets_the_other() {
        // The app resets: the peer stream is aborted.
        let mut r = rig();
        let mut app = MemIo { reset: true, ..Default::default() };
        assert_eq!(r.splice.pump(&mut app), SpliceState::Failed(StreamFailure::Reset));
        assert!(r.theirs.lock().abort);
        assert_eq!(scheduled(&r.their_wake), 1);

        // The peer resets: this driver is woken and resets the app's flow.
        let mut r = rig();
        let mut app = MemIo { room: 100, ..Default::default() };
        assert_eq!(r.splice.pump(&mut app), SpliceState::Open);
        let mut far = MemIo { reset: true, ..Default::default() };
        pump(&mut far, &r.theirs);
        assert_eq!(scheduled(&r.wake), 1, "the failure woke the flow");
        assert_eq!(r.splice.pump(&mut app), SpliceState::Failed(StreamFailure::Reset));
        assert!(app.aborted);
    }

    #[test]
    fn a_fin_waits_for_the_bytes_before_it() {
        let mut r = rig();
        {
            let mut st = r.theirs.lock();
            st.rx.extend(bytes(5000, 9));
            st.rx_eof = true;
        }
        let mut app = MemIo { room: 3000, ..Default::default() };
        r.splice.pump(&mut app);
        assert_eq!(app.outbox.len(), 3000);
        assert!(!app.closed, "no FIN while bytes wait");
        app.outbox.clear();
        r.splice.pump(&mut app);
        assert_eq!(app.outbox.len(), 2000);
        assert!(app.closed, "FIN after the last byte");
    }

    /// A stream handle, its pipes and its driver's wake list (the driver: `pump` by hand).
    fn stream() -> (Arc<DriverWake<u8>>, Arc<Pipes<u8>>, PipeStream<u8>) {
        let wake = DriverWake::new();
        let pipes = Pipes::new(1u8);
        let handle = PipeStream::new(pipes.clone(), wake.clone(), Box::new(()));
        (wake, pipes, handle)
    }

    #[tokio::test]
    async fn a_reader_takes_the_whole_pipe_and_what_it_holds_counts_against_the_pipe() {
        use tokio::io::{AsyncBufReadExt, AsyncReadExt};
        let (wake, pipes, mut reader) = stream();
        let sent = bytes(2 * PIPE_BYTES + 4321, 4);
        let mut far = MemIo { inbox: sent.iter().copied().collect(), ..Default::default() };
        pump(&mut far, &pipes);
        assert_eq!(pipes.lock().rx.len(), PIPE_BYTES);
        // The reader takes the pipe's buffer whole (swapped out, not copied).
        assert_eq!(reader.fill_buf().await.unwrap().len(), PIPE_BYTES);
        assert!(pipes.lock().rx.is_empty());
        // What it holds still counts: the driver moves nothing more meanwhile.
        pump(&mut far, &pipes);
        assert!(pipes.lock().rx.is_empty(), "the reader's bytes fill the pipe");
        assert!(pipes.lock().rx_stalled);
        assert_eq!(scheduled(&wake), 0);
        // Once half is consumed, its next look restarts the driver.
        Pin::new(&mut reader).consume(PIPE_BYTES / 2 + 1);
        assert_eq!(reader.fill_buf().await.unwrap().len(), PIPE_BYTES / 2 - 1);
        assert_eq!(scheduled(&wake), 1, "half the pipe free: the driver is told");
        pump(&mut far, &pipes);
        assert_eq!(pipes.lock().rx.len(), PIPE_BYTES / 2 + 1);
        // The rest arrives in order, through poll_read as well.
        far.fin_in = true;
        let mut got = Vec::new();
        let mut chunk = vec![0u8; 100_000];
        for _ in 0..100 {
            let n = reader.read(&mut chunk).await.unwrap();
            if n == 0 {
                break;
            }
            got.extend_from_slice(&chunk[..n]);
            pump(&mut far, &pipes);
        }
        assert_eq!(got.len(), sent.len() - (PIPE_BYTES / 2 + 1));
        assert!(got == sent[PIPE_BYTES / 2 + 1..], "the bytes after those consumed, in order");
    }

    #[tokio::test]
    async fn an_abort_discards_what_the_reader_holds() {
        use tokio::io::AsyncBufReadExt;
        let (_wake, pipes, mut reader) = stream();
        let mut far = MemIo { inbox: bytes(1000, 1).into(), ..Default::default() };
        pump(&mut far, &pipes);
        assert_eq!(reader.fill_buf().await.unwrap().len(), 1000);
        reader.abort();
        let e = reader.fill_buf().await.unwrap_err();
        assert_eq!(e.get_ref().and_then(|e| e.downcast_ref()), Some(&StreamFailure::Aborted));
    }

    #[tokio::test]
    async fn bridge_moves_both_ways_and_passes_each_fin_on() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (_wake, pipes, mut peer) = stream();
        // From the peer (through the pipe) and from the local program.
        let down = bytes(3 * PIPE_BYTES + 777, 5);
        let up = bytes(5 * BRIDGE_BYTES + 3, 6);
        let mut far = MemIo {
            inbox: down.iter().copied().collect(),
            fin_in: true,
            room: 100 << 10,
            ..Default::default()
        };
        let (mut local, mut app) = tokio::io::duplex(64 << 10);
        let pipes2 = pipes.clone();
        let driver = async move {
            let mut got = Vec::new();
            for _ in 0..100_000 {
                pump(&mut far, &pipes2);
                got.append(&mut far.outbox);
                let drained = {
                    let st = pipes2.lock();
                    st.rx_eof && st.rx.is_empty()
                };
                if far.closed && drained {
                    return got;
                }
                tokio::task::yield_now().await;
            }
            panic!("the bridge stalled");
        };
        let app_side = async {
            let (mut r, mut w) = tokio::io::split(&mut app);
            let write = async {
                w.write_all(&up).await.unwrap();
                w.shutdown().await.unwrap();
            };
            let mut got = Vec::new();
            let read = r.read_to_end(&mut got);
            let (_, n) = tokio::join!(write, read);
            n.unwrap();
            got
        };
        let (far_got, moved, app_got) =
            tokio::join!(driver, bridge(&mut peer, &mut local), app_side);
        assert_eq!(moved.unwrap(), (down.len() as u64, up.len() as u64));
        assert!(app_got == down, "the peer's bytes and FIN reached the program");
        assert!(far_got == up, "the program's bytes and FIN reached the peer");
    }
}
