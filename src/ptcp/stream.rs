//! [`PtcpStream`]: one TCP stream of a PTCP session, as tokio `AsyncRead + AsyncWrite`.
//!
//! A stream handle never touches the session: it shares two bounded byte pipes with the
//! endpoint's driver task ([`Pipes`]). Writing copies into the send pipe (full pipe =
//! `Pending`, that is backpressure) and wakes the driver, which moves the bytes into the
//! session; the driver moves received bytes from the session into the receive pipe and wakes
//! the reader. A pipe is a few hundred KiB; the session's own TCP buffers (MiB) are behind it.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use q2q_netstack::StreamId;
use q2q_netstack::wire::SessionId;
use tokio::io::{AsyncBufRead, AsyncRead, AsyncWrite, ReadBuf};

use super::endpoint::Link;
use crate::pipe::PipeStream;
pub use crate::pipe::StreamFailure;

/// How the endpoint's driver names a stream's pipes.
pub(crate) type Key = (SessionId, StreamId);
pub(crate) type Pipes = crate::pipe::Pipes<Key>;

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
pub struct PtcpStream(PipeStream<Key>);

impl std::fmt::Debug for PtcpStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PtcpStream")
            .field("session", &self.session_id())
            .field("stream", &self.id())
            .finish()
    }
}

impl PtcpStream {
    pub(crate) fn new(pipes: std::sync::Arc<Pipes>, link: Link) -> PtcpStream {
        let wake = link.wake.clone();
        // The link (the command channel) keeps the driver running while the stream lives.
        PtcpStream(PipeStream::new(pipes, wake, Box::new(link)))
    }

    /// The session this stream belongs to.
    pub fn session_id(&self) -> SessionId {
        self.0.key().0
    }

    /// The stream's id within its session.
    pub fn id(&self) -> StreamId {
        self.0.key().1
    }

    /// Reset the stream (RST): queued bytes are discarded, the peer's reads and writes fail
    /// with "peer reset the stream", and so do ours from now on.
    pub fn abort(&self) {
        self.0.abort()
    }

    /// Turn Nagle's algorithm off (`true`) for an interactive stream (a shell, RPC), or
    /// back on. New streams follow `Config::nodelay` (default: Nagle on, for bulk).
    pub fn set_nodelay(&self, nodelay: bool) {
        self.0.set_nodelay(nodelay)
    }

    /// Why the stream ended, if it did.
    pub fn failure(&self) -> Option<StreamFailure> {
        self.0.failure()
    }

    /// The pipe handle inside, for a [`crate::pipe::Splice`] (the TUN daemon joins an app's
    /// flow to the stream with one).
    pub(crate) fn into_pipe(self) -> PipeStream<Key> {
        self.0
    }
}

impl AsyncRead for PtcpStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_read(cx, buf)
    }
}

/// The received bytes straight from the stream's pipe (no copy into a caller's buffer):
/// `tokio::io::copy_buf` and [`crate::pipe::bridge`] read this way.
impl AsyncBufRead for PtcpStream {
    fn poll_fill_buf(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<&[u8]>> {
        Pin::new(&mut self.get_mut().0).poll_fill_buf(cx)
    }

    fn consume(self: Pin<&mut Self>, amt: usize) {
        Pin::new(&mut self.get_mut().0).consume(amt)
    }
}

impl AsyncWrite for PtcpStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write(cx, data)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_shutdown(cx)
    }
}
