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

/// Bytes asked of the stream at a time, and the buffer kept between boxes.
const READ_SIZE: usize = 4096;

/// Reads whole boxes from a byte stream.
pub struct AmpReader<R> {
    inner: R,
    buf: Vec<u8>,
}

impl<R: AsyncRead + Unpin> AmpReader<R> {
    pub fn new(inner: R) -> Self {
        AmpReader { inner, buf: Vec::with_capacity(READ_SIZE) }
    }

    /// The next box, or `Ok(None)` at a clean end of stream between boxes.
    pub async fn read_box(&mut self) -> Result<Option<AmpBox>, CallError> {
        loop {
            if let Some((b, n)) = AmpBox::decode(&self.buf)? {
                self.buf.drain(..n);
                // One large box must not leave every idle connection holding its size.
                if self.buf.capacity() > 4 * READ_SIZE && self.buf.len() <= READ_SIZE {
                    self.buf.shrink_to(READ_SIZE);
                }
                return Ok(Some(b));
            }
            if self.buf.len() > MAX_BOX_BYTES {
                return Err(std::io::Error::other("AMP box larger than 1 MiB").into());
            }
            // Read straight into the buffer: a chunk on the stack would make every
            // connection's reading task that much larger, idle or not.
            self.buf.reserve(READ_SIZE);
            let n = self.inner.read_buf(&mut self.buf).await?;
            if n == 0 {
                return if self.buf.is_empty() { Ok(None) } else { Err(CallError::Closed) };
            }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Boxes split across reads come out whole, and a large box does not leave the
    /// buffer at its size for the rest of the connection.
    #[tokio::test]
    async fn boxes_across_reads_and_the_buffer_shrinks_after_a_large_one() {
        let big = AmpBox::command("big").with("v", vec![7u8; 60_000]);
        let small = AmpBox::command("small").with("v", "x");
        let mut wire = big.encode().unwrap();
        wire.extend(small.encode().unwrap());
        wire.extend(small.encode().unwrap());
        let (mut w, r) = tokio::io::duplex(1000);
        let writer = tokio::spawn(async move { w.write_all(&wire).await });
        let mut reader = AmpReader::new(r);
        assert_eq!(reader.read_box().await.unwrap(), Some(big));
        assert!(reader.buf.capacity() <= READ_SIZE * 2, "kept {}", reader.buf.capacity());
        assert_eq!(reader.read_box().await.unwrap(), Some(small.clone()));
        assert_eq!(reader.read_box().await.unwrap(), Some(small));
        writer.await.unwrap().unwrap();
        assert_eq!(reader.read_box().await.unwrap(), None);
    }
}
