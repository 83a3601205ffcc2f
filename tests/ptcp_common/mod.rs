//! Helpers shared by the PTCP loopback tests.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use q2q::ptcp::{Config, Endpoint, EndpointConfig, PtcpSession, SessionId};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::UdpSocket;

pub fn lo() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

pub async fn endpoint() -> Endpoint {
    Endpoint::bind(lo(), EndpointConfig::default()).await.unwrap()
}

/// Two endpoints joined by one session (a initiates).
pub async fn pair(config: Config) -> (Endpoint, PtcpSession, Endpoint, PtcpSession) {
    let a = endpoint().await;
    let b = endpoint().await;
    let id = SessionId(rand::random());
    let sb = b.accept(id, a.local_addr(), config.clone()).await.unwrap();
    let sa = a.connect(id, b.local_addr(), config).await.unwrap();
    (a, sa, b, sb)
}

/// Deterministic content for stream `seed`.
pub fn fill(seed: u64, offset: u64, buf: &mut [u8]) {
    for (i, b) in buf.iter_mut().enumerate() {
        let x = (offset + i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ seed;
        *b = (x >> 29) as u8;
    }
}

/// Write `len` bytes of `seed`'s content, then FIN; returns their SHA-256.
pub async fn send_all<W: AsyncWrite + Unpin>(w: &mut W, seed: u64, len: u64) -> Vec<u8> {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0u8; 50_000];
    let mut off = 0u64;
    while off < len {
        let n = ((len - off) as usize).min(buf.len());
        fill(seed, off, &mut buf[..n]);
        w.write_all(&buf[..n]).await.unwrap();
        ctx.update(&buf[..n]);
        off += n as u64;
    }
    w.shutdown().await.unwrap();
    ctx.finish().as_ref().to_vec()
}

/// Read to EOF; returns (bytes, SHA-256).
pub async fn recv_all<R: AsyncRead + Unpin>(r: &mut R) -> (u64, Vec<u8>) {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0u8; 70_000];
    let mut total = 0u64;
    loop {
        let n = r.read(&mut buf).await.unwrap();
        if n == 0 {
            return (total, ctx.finish().as_ref().to_vec());
        }
        ctx.update(&buf[..n]);
        total += n as u64;
    }
}

/// A UDP relay between two fixed addresses, stoppable: what `x` sends to it goes to `y`
/// and the reverse.
pub struct Relay {
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Relay {
    pub async fn start(x: SocketAddr, y: SocketAddr) -> Relay {
        let sock = UdpSocket::bind(lo()).await.unwrap();
        let addr = sock.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let s2 = stop.clone();
        let task = tokio::spawn(async move {
            let mut buf = vec![0u8; 65536];
            while let Ok((n, from)) = sock.recv_from(&mut buf).await {
                if s2.load(Ordering::Relaxed) {
                    continue;
                }
                let to = if from == x { y } else { x };
                let _ = sock.send_to(&buf[..n], to).await;
            }
        });
        Relay { addr, stop, task }
    }

    /// Drop everything from now on.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}
