//! Connecting by address on loopback, in one run: connect time cold (first connection to a
//! peer: server round trips, peer session, TLS), the time to the first byte echoed on a new
//! stream in the live session (no server round trip), datagrams sent by both nodes per
//! session set-up, time to the direct path, and throughput of one stream relayed through the
//! server vs direct. Run with `tools/bench/run connect`.

use q2q::address::{Q2qAddress, ServiceName};
use q2q::client::{self, ConnectOptions, Home};
use q2q::presence::node::{Node, NodeConfig, PathKind, Policy};
use q2q::server::{self, DataDir, Registration, ServerConfig};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const PW: &str = "benchmark password";

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mib: usize = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(256);
    let dir = tempfile::tempdir()?;
    let config = ServerConfig {
        listen: "127.0.0.1:0".parse()?,
        registration: Registration::Open,
        // Loopback, like every server of the bench (a real server refuses it for federation).
        federation_allow: vec![server::config::Network::parse("127.0.0.0/8")?],
        ..Default::default()
    };
    let d = DataDir::init(&dir.path().join("srv"), &"example.com".parse()?, &config)?;
    let running = server::start(d, config).await?;
    let opts = ConnectOptions { server: Some(running.tcp_addr.to_string()), ..Default::default() };
    let home = Home::new(dir.path().join("home"));
    for who in ["alice", "bob", "carol", "dave"] {
        client::register(
            &home,
            &Q2qAddress::parse(&format!("{who}@example.com"))?,
            PW,
            None,
            false,
            &opts,
        )
        .await?;
    }
    let start = |who: &str, direct: bool| {
        let home = home.clone();
        let opts = opts.clone();
        let who = Q2qAddress::parse(&format!("{who}@example.com"));
        async move {
            let config =
                NodeConfig { include_loopback: true, server: opts, direct, ..Default::default() };
            Ok::<_, anyhow::Error>(Node::start(home, who?, config).await?)
        }
    };
    let sink = ServiceName::parse("sink")?;
    println!("loopback, one server; {mib} MiB per throughput run");

    for (label, direct, callee, caller) in
        [("direct", true, "alice", "bob"), ("relayed (UDP)", false, "carol", "dave")]
    {
        let a = start(callee, direct).await?;
        let b = start(caller, direct).await?;
        // Named: a caller named for nothing would get a relay-only session.
        let mut accepted = a.listen(&sink, "sink", Policy::allow([b.address().clone()])).await?;
        let echo = ServiceName::parse("echo")?;
        let mut echoes = a.listen(&echo, "echo", Policy::allow([b.address().clone()])).await?;
        tokio::spawn(async move {
            while let Some(acc) = echoes.recv().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = tokio::io::split(acc.stream);
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        tokio::spawn(async move {
            while let Some(acc) = accepted.recv().await {
                tokio::spawn(async move {
                    let mut s = acc.stream;
                    let mut buf = vec![0u8; 1 << 16];
                    let mut n = 0u64;
                    while let Ok(k) = s.read(&mut buf).await {
                        if k == 0 {
                            break;
                        }
                        n += k as u64;
                    }
                    let _ = s.write_all(&n.to_be_bytes()).await;
                    let _ = s.shutdown().await;
                });
            }
        });
        let target = a.address().clone();
        let sent = |n: &Node| n.endpoint().stats().sent.load(std::sync::atomic::Ordering::Relaxed);
        let before = sent(&a) + sent(&b);
        let t = Instant::now();
        let mut c = b.connect(&target, &sink).await?;
        let cold = t.elapsed();
        let setup_datagrams = sent(&a) + sent(&b) - before;
        let to_direct = loop {
            if matches!(b.status().first().map(|p| &p.path), Some(PathKind::Direct(_))) || !direct {
                break t.elapsed();
            }
            if t.elapsed() > Duration::from_secs(10) {
                break Duration::MAX;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        };
        c.stream.shutdown().await?;
        // A new stream in the live session, to the first byte echoed back (best of 20).
        let mut ttfb = Duration::MAX;
        for _ in 0..20 {
            let t = Instant::now();
            let mut e = b.connect(&target, &echo).await?;
            e.stream.write_all(b"x").await?;
            let mut one = [0u8; 1];
            e.stream.read_exact(&mut one).await?;
            ttfb = ttfb.min(t.elapsed());
        }
        // Throughput: once the path settled (direct found, or relay only).
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut conn = b.connect(&target, &sink).await?;
        let chunk = vec![0x5au8; 1 << 16];
        let t = Instant::now();
        for _ in 0..(mib * 16) {
            conn.stream.write_all(&chunk).await?;
        }
        conn.stream.shutdown().await?;
        let mut got = [0u8; 8];
        conn.stream.read_exact(&mut got).await?;
        let secs = t.elapsed().as_secs_f64();
        let bytes = u64::from_be_bytes(got);
        anyhow::ensure!(bytes == (mib as u64) << 20, "sink got {bytes} bytes");
        let path = b.status().last().map(|p| p.path.clone()).unwrap_or(PathKind::TcpRelay);
        println!(
            "{label:<14} set-up {:>7.2} ms ({setup_datagrams} datagrams sent by both, until the first stream); \
             new stream in session, first byte echoed {:>6.2} ms; direct after {}; \
             throughput {:>8.1} Mbit/s (path: {path})",
            cold.as_secs_f64() * 1e3,
            ttfb.as_secs_f64() * 1e3,
            if !direct {
                "-".to_string()
            } else if to_direct == Duration::MAX {
                "never (10 s)".to_string()
            } else {
                format!("{:.1} ms", to_direct.as_secs_f64() * 1e3)
            },
            bytes as f64 * 8.0 / secs / 1e6
        );
    }
    running.shutdown().await;
    Ok(())
}
