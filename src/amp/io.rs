//! Reading and writing AMP boxes on an async byte stream.

use super::{AmpBox, AmpError};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Largest box the reader buffers before giving up on the peer.
pub const MAX_BOX_BYTES: usize = 1 << 20;

/// What went wrong with a call.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// The transport failed.
    #[error("connection failed: {0}")]
    Io(#[from] std::io::Error),
    /// The peer sent bytes that are not AMP, or we tried to send a box the format can't carry.
    #[error("protocol error: {0}")]
    Protocol(#[from] AmpError),
    /// The peer closed the connection.
    #[error("the server closed the connection")]
    Closed,
    /// The peer answered with an error box.
    #[error("{description}")]
    Remote { code: String, description: String },
    /// The reply did not answer the question asked.
    #[error("protocol error: reply does not answer request {0}")]
    Unexpected(String),
}

impl CallError {
    /// The `_error_code` of an error box, if this is one.
    pub fn code(&self) -> Option<&str> {
        match self {
            CallError::Remote { code, .. } => Some(code),
            _ => None,
        }
    }
}

/// Reads whole boxes from a byte stream.
pub struct AmpReader<R> {
    inner: R,
    buf: Vec<u8>,
}

impl<R: AsyncRead + Unpin> AmpReader<R> {
    pub fn new(inner: R) -> Self {
        AmpReader { inner, buf: Vec::with_capacity(4096) }
    }

    /// The next box, or `Ok(None)` at a clean end of stream between boxes.
    pub async fn read_box(&mut self) -> Result<Option<AmpBox>, CallError> {
        loop {
            if let Some((b, n)) = AmpBox::decode(&self.buf)? {
                self.buf.drain(..n);
                return Ok(Some(b));
            }
            if self.buf.len() > MAX_BOX_BYTES {
                return Err(std::io::Error::other("AMP box larger than 1 MiB").into());
            }
            let mut chunk = [0u8; 16384];
            let n = self.inner.read(&mut chunk).await?;
            if n == 0 {
                return if self.buf.is_empty() { Ok(None) } else { Err(CallError::Closed) };
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    pub fn get_mut(&mut self) -> &mut R {
        &mut self.inner
    }
}

/// Write one box and flush.
pub async fn write_box<W: AsyncWrite + Unpin>(w: &mut W, b: &AmpBox) -> Result<(), CallError> {
    let bytes = b.encode()?;
    w.write_all(&bytes).await?;
    w.flush().await?;
    Ok(())
}
