//! [`PtcpStream`]: one TCP stream of a PTCP session, as tokio `AsyncRead + AsyncWrite`.
//!
//! A stream handle never touches the session: it shares two bounded byte pipes with the
//! endpoint's driver task ([`Pipes`]). Writing copies into the send pipe (full pipe =
//! `Pending`, that is backpressure) and wakes the driver, which moves the bytes into the
//! session; the driver moves received bytes from the session into the receive pipe and wakes
//! the reader. A pipe is a few hundred KiB; the session's own TCP buffers (MiB) are behind it.

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use q2q_netstack::StreamId;
use q2q_netstack::wire::SessionId;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::endpoint::Link;

/// Bytes each pipe of a stream holds (each direction).
pub(crate) const PIPE_BYTES: usize = 512 << 10;

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
    /// This side aborted the stream ([`PtcpStream::abort`]).
    #[error("stream aborted")]
    Aborted,
    /// Writing after `shutdown`.
    #[error("stream already shut down for writing")]
    WriteAfterShutdown,
    /// The endpoint's driver is gone (the endpoint was shut down).
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
    /// The driver stopped reading the session because `rx` was full.
    pub rx_stalled: bool,
    pub read_waker: Option<Waker>,
    /// Bytes written, for the driver to hand to the session.
    pub tx: VecDeque<u8>,
    /// The writer asked for FIN (after `tx`).
    pub shutdown: bool,
    /// The driver handed the FIN to the session.
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

/// A stream's pipes and the way to wake the driver about them.
pub(crate) struct Pipes {
    pub session: SessionId,
    pub stream: StreamId,
    pub state: Mutex<PipeState>,
    /// Set while the stream is in the driver's dirty list (so it is queued once).
    pub queued: AtomicBool,
}

impl Pipes {
    pub fn new(session: SessionId, stream: StreamId) -> Arc<Pipes> {
        Arc::new(Pipes {
            session,
            stream,
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

/// A bidirectional byte stream to the peer of a PTCP session.
///
/// * Reading returns 0 (EOF) after the peer's FIN, once everything before it was read.
/// * `shutdown` (tokio `AsyncWriteExt::shutdown`) sends FIN after everything written; reading
///   goes on.
/// * [`PtcpStream::abort`] resets the stream (RST): queued bytes are discarded both ways.
/// * Errors are `io::Error`s carrying a [`StreamFailure`] that says what happened.
/// * **Dropping** a stream closes it like `close(2)` closes a TCP socket: bytes already
///   written are still delivered, then FIN; bytes arriving afterwards are discarded. Call
///   [`PtcpStream::abort`] first to reset instead.
pub struct PtcpStream {
    pipes: Arc<Pipes>,
    /// Wakes the driver, and keeps it running while the stream lives.
    link: Link,
}

impl std::fmt::Debug for PtcpStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PtcpStream")
            .field("session", &self.pipes.session)
            .field("stream", &self.pipes.stream)
            .finish()
    }
}

impl PtcpStream {
    pub(crate) fn new(pipes: Arc<Pipes>, link: Link) -> PtcpStream {
        PtcpStream { pipes, link }
    }

    /// The session this stream belongs to.
    pub fn session_id(&self) -> SessionId {
        self.pipes.session
    }

    /// The stream's id within its session.
    pub fn id(&self) -> StreamId {
        self.pipes.stream
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
        self.link.wake.schedule(&self.pipes);
    }

    /// Turn Nagle's algorithm off (`true`) for an interactive stream (a shell, RPC), or
    /// back on. New streams follow `Config::nodelay` (default: Nagle on, for bulk).
    pub fn set_nodelay(&self, nodelay: bool) {
        self.pipes.lock().nodelay = Some(nodelay);
        self.link.wake.schedule(&self.pipes);
    }

    /// Why the stream ended, if it did.
    pub fn failure(&self) -> Option<StreamFailure> {
        self.pipes.lock().error
    }
}

impl AsyncRead for PtcpStream {
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
                this.link.wake.schedule(&this.pipes);
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

impl AsyncWrite for PtcpStream {
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
        // for the session to have room and will look again then).
        if was_empty {
            this.link.wake.schedule(&this.pipes);
        }
        Poll::Ready(Ok(n))
    }

    /// Ready once everything written was handed to the session (like a kernel socket's
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

    /// Sends FIN after everything written; ready once the FIN is queued in the session.
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
            this.link.wake.schedule(&this.pipes);
        }
        Poll::Pending
    }
}

impl Drop for PtcpStream {
    fn drop(&mut self) {
        {
            let mut st = self.pipes.lock();
            st.dropped = true;
            st.shutdown = true;
            st.rx.clear();
            st.read_waker = None;
            st.write_waker = None;
        }
        self.link.wake.schedule(&self.pipes);
    }
}
