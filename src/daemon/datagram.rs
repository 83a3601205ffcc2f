//! UDP datagrams carried over a q2q stream (service `udp/<port>`): each datagram is its
//! length as a 2-byte big-endian integer, then its bytes. Both ends of a UDP flow use it:
//! the TUN side (an app's datagrams to a virtual address) and the exposing side (the local
//! UDP target).

use std::io;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::UdpSocket;

/// A UDP flow with no datagram either way for this long ends.
pub const IDLE: Duration = Duration::from_secs(60);

/// Write one datagram (at most 65535 bytes; longer is an error, nothing is written).
pub async fn write<W: AsyncWrite + Unpin>(w: &mut W, datagram: &[u8]) -> io::Result<()> {
    let len = u16::try_from(datagram.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "datagram over 65535 bytes"))?;
    let mut frame = Vec::with_capacity(2 + datagram.len());
    frame.extend_from_slice(&len.to_be_bytes());
    frame.extend_from_slice(datagram);
    w.write_all(&frame).await?;
    w.flush().await
}

/// Read one datagram; `None` at a clean end of the stream.
pub async fn read<R: AsyncRead + Unpin>(r: &mut R) -> io::Result<Option<Vec<u8>>> {
    let mut len = [0u8; 2];
    match r.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let mut d = vec![0u8; usize::from(u16::from_be_bytes(len))];
    r.read_exact(&mut d).await?;
    Ok(Some(d))
}

/// The exposing side: datagrams from `stream` go to the local UDP `target`, and what the
/// target answers comes back, until either side ends or [`IDLE`] passes in silence.
pub async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    target: SocketAddr,
) -> io::Result<()> {
    let bind: SocketAddr = if target.is_ipv4() {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let sock = UdpSocket::bind(bind).await?;
    sock.connect(target).await?;
    let (mut r, mut w) = tokio::io::split(stream);
    let mut buf = vec![0u8; 65535];
    loop {
        tokio::select! {
            d = tokio::time::timeout(IDLE, read(&mut r)) => match d {
                Ok(Ok(Some(d))) => {
                    // A refused send (nothing listening yet) is what UDP would do: dropped.
                    let _ = sock.send(&d).await;
                }
                Ok(Ok(None)) | Err(_) => return Ok(()),
                Ok(Err(e)) => return Err(e),
            },
            n = sock.recv(&mut buf) => match n {
                Ok(n) => write(&mut w, &buf[..n]).await?,
                // ICMP port unreachable from the target shows up here: not fatal.
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {}
                Err(e) => return Err(e),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn frames_round_trip_and_end_cleanly() {
        // Room for every frame: the reader starts only after the writer is done.
        let (mut a, mut b) = tokio::io::duplex(1 << 18);
        write(&mut a, b"hello").await.unwrap();
        write(&mut a, b"").await.unwrap();
        write(&mut a, &[7u8; 65535]).await.unwrap();
        assert!(write(&mut a, &[0u8; 65536]).await.is_err());
        drop(a);
        assert_eq!(read(&mut b).await.unwrap().unwrap(), b"hello");
        assert_eq!(read(&mut b).await.unwrap().unwrap(), b"");
        assert_eq!(read(&mut b).await.unwrap().unwrap().len(), 65535);
        assert!(read(&mut b).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn a_truncated_frame_is_an_error() {
        let (mut a, mut b) = tokio::io::duplex(64);
        a.write_all(&[0, 10, 1, 2]).await.unwrap();
        drop(a);
        assert!(read(&mut b).await.is_err());
    }

    #[tokio::test]
    async fn serve_carries_datagrams_to_a_udp_target_and_back() {
        let echo = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let target = echo.local_addr().unwrap();
        tokio::spawn(async move {
            let mut buf = [0u8; 100];
            for _ in 0..2 {
                let (n, from) = echo.recv_from(&mut buf).await.unwrap();
                let mut reply = b"echo:".to_vec();
                reply.extend_from_slice(&buf[..n]);
                echo.send_to(&reply, from).await.unwrap();
            }
        });
        let (mut app, far) = tokio::io::duplex(1 << 16);
        let server = tokio::spawn(serve(far, target));
        write(&mut app, b"one").await.unwrap();
        assert_eq!(read(&mut app).await.unwrap().unwrap(), b"echo:one");
        write(&mut app, b"two").await.unwrap();
        assert_eq!(read(&mut app).await.unwrap().unwrap(), b"echo:two");
        drop(app);
        server.await.unwrap().unwrap();
    }
}
