//! The transfer's framing: AMP boxes for the conversation, and raw file data right after a
//! `chunk` box (up to [`CHUNK`](super::CHUNK) bytes, more than an AMP value holds), read
//! straight into the caller's buffer.

use crate::amp::{AmpBox, AmpError};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Largest box accepted (the conversation's boxes are small; data never travels in a box).
const MAX_BOX: usize = 256 * 1024;

/// How the stream failed, as a sentence (no library jargon, no URLs).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// The connection ended or failed.
    #[error("{0}")]
    Lost(String),
    /// The other side sent something that is not this protocol.
    #[error("the other side does not speak the transfer protocol ({0})")]
    Garbled(String),
}

/// A transport error as one sentence.
pub fn lost(e: &std::io::Error) -> WireError {
    use std::io::ErrorKind::*;
    let text = match e.kind() {
        UnexpectedEof => "the connection ended unexpectedly".to_string(),
        ConnectionReset | ConnectionAborted | BrokenPipe | NotConnected => {
            "the connection was lost".to_string()
        }
        TimedOut => "the connection timed out".to_string(),
        _ => format!("the connection failed: {}", without_urls(&e.to_string())),
    };
    WireError::Lost(text)
}

/// `text` with any `http(s)://…` reference (rustls appends docs.rs links) cut away.
pub fn without_urls(text: &str) -> String {
    match text.find("http://").or_else(|| text.find("https://")) {
        Some(i) => text[..i].trim_end_matches([' ', ':', '(', '-', ',']).to_string(),
        None => text.to_string(),
    }
}

fn garbled(e: AmpError) -> WireError {
    WireError::Garbled(e.to_string())
}

/// Reads boxes and raw data from one direction of the stream. Cancel-safe: a read dropped
/// midway keeps what arrived.
pub struct Reader<R> {
    inner: R,
    buf: Vec<u8>,
    /// Bytes of `buf` already consumed.
    start: usize,
}

impl<R: AsyncRead + Unpin> Reader<R> {
    pub fn new(inner: R) -> Self {
        Reader { inner, buf: Vec::with_capacity(64 * 1024), start: 0 }
    }

    /// The next box, or `Ok(None)` at a clean end of stream between boxes.
    pub async fn read_box(&mut self) -> Result<Option<AmpBox>, WireError> {
        loop {
            if let Some((b, n)) = AmpBox::decode(&self.buf[self.start..]).map_err(garbled)? {
                self.start += n;
                if self.start == self.buf.len() {
                    self.buf.clear();
                    self.start = 0;
                }
                return Ok(Some(b));
            }
            if self.buf.len() - self.start > MAX_BOX {
                return Err(WireError::Garbled("a message larger than 256 KiB".into()));
            }
            if self.start > 0 {
                self.buf.drain(..self.start);
                self.start = 0;
            }
            self.buf.reserve(16 * 1024);
            let n = self.inner.read_buf(&mut self.buf).await.map_err(|e| lost(&e))?;
            if n == 0 {
                return if self.buf.is_empty() {
                    Ok(None)
                } else {
                    Err(WireError::Lost("the connection ended in the middle of a message".into()))
                };
            }
        }
    }

    /// The next box; the end of the stream is an error.
    pub async fn expect_box(&mut self) -> Result<AmpBox, WireError> {
        self.read_box()
            .await?
            .ok_or_else(|| WireError::Lost("the other side closed the connection".into()))
    }

    /// Fill `out` with the raw bytes that follow (buffered first, then from the stream).
    /// Not cancel-safe: call it outside `select!`.
    pub async fn read_exact(&mut self, out: &mut [u8]) -> Result<(), WireError> {
        let have = (self.buf.len() - self.start).min(out.len());
        out[..have].copy_from_slice(&self.buf[self.start..self.start + have]);
        self.start += have;
        if self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        }
        if have < out.len() {
            self.inner.read_exact(&mut out[have..]).await.map_err(|e| lost(&e))?;
        }
        Ok(())
    }
}

/// Write one box without flushing (data or `end` follows).
pub async fn put<W: AsyncWrite + Unpin>(w: &mut W, b: &AmpBox) -> Result<(), WireError> {
    let bytes = b.encode().map_err(garbled)?;
    w.write_all(&bytes).await.map_err(|e| lost(&e))
}

/// Write one box and flush: the other side waits for it.
pub async fn send<W: AsyncWrite + Unpin>(w: &mut W, b: &AmpBox) -> Result<(), WireError> {
    put(w, b).await?;
    w.flush().await.map_err(|e| lost(&e))
}

/// The command of a box (`""` if none).
pub fn cmd(b: &AmpBox) -> &str {
    b.get_str(crate::amp::COMMAND).unwrap_or("")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_cut() {
        assert_eq!(
            without_urls(
                "peer closed connection without sending TLS close_notify: https://docs.rs/rustls/latest/rustls/manual/_03_howto/index.html#unexpected-eof"
            ),
            "peer closed connection without sending TLS close_notify"
        );
        let e = std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "tls: https://docs.rs/x");
        assert_eq!(lost(&e).to_string(), "the connection ended unexpectedly");
    }

    #[tokio::test]
    async fn boxes_and_raw_data_interleave() {
        let (a, b) = tokio::io::duplex(1024);
        let mut w = a;
        let writer = tokio::spawn(async move {
            put(&mut w, &AmpBox::command("chunk").with("len", "5")).await.unwrap();
            w.write_all(b"hello").await.unwrap();
            send(&mut w, &AmpBox::command("end")).await.unwrap();
        });
        let mut r = Reader::new(b);
        assert_eq!(cmd(&r.expect_box().await.unwrap()), "chunk");
        let mut data = [0u8; 5];
        r.read_exact(&mut data).await.unwrap();
        assert_eq!(&data, b"hello");
        assert_eq!(cmd(&r.expect_box().await.unwrap()), "end");
        writer.await.unwrap();
        assert_eq!(r.read_box().await.unwrap(), None);
    }
}
