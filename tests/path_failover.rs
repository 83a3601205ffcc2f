//! A direct path that dies in the middle of a transfer (a NAT mapping flushed, a network
//! change): both nodes notice, fall back to the relay (UDP, or TCP when UDP to the server is
//! blocked) without breaking the stream, and go direct again once the path works.
//!
//! The path is killed by fault injection: each node's endpoint drops every datagram from
//! the other's port, as a NAT that forgot the mapping would; the server's relay still works.

mod common;

use common::{TestServer, addr, loopback_config, node};
use q2q::presence::node::{Node, NodeConfig, PathKind};
use q2q::server::Registration;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn is_direct(n: &Node) -> bool {
    n.status().first().is_some_and(|p| matches!(p.path, PathKind::Direct(_)))
}

/// Poll `cond` every 50 ms for at most `limit`; how long it took, or None.
async fn within(limit: Duration, cond: impl Fn() -> bool) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if cond() {
            return Some(start.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    None
}

/// Byte `i` of the test stream.
fn pattern(i: u64) -> u8 {
    (i.wrapping_mul(7) % 251) as u8
}

/// `one_way`: only what bob receives from alice is lost (a path dead in one direction);
/// bob notices the silence, alice then sees bob's datagrams come through the relay.
async fn failover(tcp_relay: bool, one_way: bool) {
    let srv = TestServer::start("example.com", loopback_config(Registration::Open)).await;
    let (_d, home) = common::home();
    let config = NodeConfig {
        probe_for: Duration::from_secs(1),
        reprobe_every: Duration::from_secs(3),
        tcp_relay_only: tcp_relay,
        ..Default::default()
    };
    let alice = node(&srv, &home, "alice@example.com", config.clone()).await;
    let bob = node(&srv, &home, "bob@example.com", config).await;
    let echo = common::serve_echo(&alice, &["bob@example.com"]).await;
    let conn = bob.connect(&addr("alice@example.com"), &echo).await.unwrap();
    assert!(
        within(Duration::from_secs(10), || is_direct(&alice) && is_direct(&bob)).await.is_some(),
        "never direct: {:?} / {:?}",
        alice.status(),
        bob.status()
    );

    // A paced stream through alice's echo, checked byte by byte as it comes back: about
    // 4 MB/s, until told to stop (at most 60 000 writes).
    let (mut r, mut w) = tokio::io::split(conn.stream);
    let stop = Arc::new(AtomicBool::new(false));
    let echoed = Arc::new(AtomicU64::new(0));
    let writer = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut at = 0u64;
            for _ in 0..60_000 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let chunk: Vec<u8> = (at..at + 16 * 1024).map(pattern).collect();
                w.write_all(&chunk).await.unwrap();
                at += chunk.len() as u64;
                tokio::time::sleep(Duration::from_millis(4)).await;
            }
            w.shutdown().await.unwrap();
            at
        })
    };
    let reader = {
        let echoed = echoed.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 64 * 1024];
            let mut at = 0u64;
            loop {
                let n = r.read(&mut buf).await.expect("the stream broke");
                if n == 0 {
                    return at;
                }
                for (k, b) in buf[..n].iter().enumerate() {
                    assert_eq!(*b, pattern(at + k as u64), "byte {} differs", at + k as u64);
                }
                at += n as u64;
                echoed.store(at, Ordering::Relaxed);
            }
        })
    };
    let flowing = |d: Duration| {
        let echoed = echoed.clone();
        async move {
            let before = echoed.load(Ordering::Relaxed);
            tokio::time::sleep(d).await;
            echoed.load(Ordering::Relaxed) - before
        }
    };
    assert!(flowing(Duration::from_secs(1)).await > 256 << 10, "the transfer is not moving");

    // The direct path dies both ways; the relay still works.
    let relayed_before = srv.running.as_ref().unwrap().stats().relayed_bytes;
    let (pa, pb) = (alice.local_addr().port(), bob.local_addr().port());
    if !one_way {
        alice.endpoint().drop_from(Some(Arc::new(move |a| a.port() == pb))).await;
    }
    bob.endpoint().drop_from(Some(Arc::new(move |a| a.port() == pa))).await;
    let want = if tcp_relay { "TCP relay" } else { "UDP relay" };
    let relayed =
        |n: &Node| n.status().first().is_some_and(|p| !matches!(p.path, PathKind::Direct(_)));
    let took = within(Duration::from_secs(15), || relayed(&alice) && relayed(&bob)).await;
    let took = took.unwrap_or_else(|| {
        panic!("no fall back to the relay: {:?} / {:?}", alice.status(), bob.status())
    });
    eprintln!("both fell back to the relay in {} ms", took.as_millis());
    for n in [&alice, &bob] {
        let s = &n.status()[0];
        assert!(s.path.to_string().starts_with(want), "{s:?}");
        assert!(s.why.contains("lost"), "{s:?}");
    }
    let moved = flowing(Duration::from_secs(2)).await;
    assert!(moved > 256 << 10, "stalled on the relay: {moved} bytes in 2 s");
    let relayed_now = srv.running.as_ref().unwrap().stats().relayed_bytes;
    assert!(relayed_now > relayed_before + (256 << 10), "the relay carried nothing");

    // The path works again: re-probing finds it.
    alice.endpoint().drop_from(None).await;
    bob.endpoint().drop_from(None).await;
    let took = within(Duration::from_secs(15), || is_direct(&alice) && is_direct(&bob)).await;
    let took = took
        .unwrap_or_else(|| panic!("not direct again: {:?} / {:?}", alice.status(), bob.status()));
    eprintln!("direct again {} ms after the path came back", took.as_millis());
    assert!(flowing(Duration::from_secs(1)).await > 256 << 10, "stalled after going direct");

    stop.store(true, Ordering::Relaxed);
    let sent = writer.await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(30), reader).await.unwrap().unwrap();
    assert_eq!(got, sent, "every byte came back, in order");
    eprintln!("{sent} bytes echoed intact across direct → relay → direct");
}

#[tokio::test]
async fn direct_path_dies_mid_transfer_udp_relay_takes_over() {
    failover(false, false).await;
}

#[tokio::test]
async fn direct_path_dies_mid_transfer_tcp_relay_takes_over() {
    failover(true, false).await;
}

#[tokio::test]
async fn direct_path_dead_one_way_both_sides_fall_back() {
    failover(false, true).await;
}

/// An idle direct session is not mistaken for a dead one: past two keepalive periods with
/// no data, it stays direct, and the stream still works.
#[tokio::test]
async fn idle_direct_session_stays_direct() {
    let srv = TestServer::start("example.com", loopback_config(Registration::Open)).await;
    let (_d, home) = common::home();
    let alice = node(&srv, &home, "alice@example.com", NodeConfig::default()).await;
    let bob = node(&srv, &home, "bob@example.com", NodeConfig::default()).await;
    let echo = common::serve_echo(&alice, &["bob@example.com"]).await;
    let conn = bob.connect(&addr("alice@example.com"), &echo).await.unwrap();
    let mut s = conn.stream;
    assert!(
        within(Duration::from_secs(10), || is_direct(&alice) && is_direct(&bob)).await.is_some()
    );
    let mut buf = [0u8; 4];
    for _ in 0..22 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(is_direct(&alice) && is_direct(&bob), "{:?} / {:?}", alice.status(), bob.status());
    }
    s.write_all(b"ping").await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut buf)).await.unwrap().unwrap();
    assert_eq!(&buf, b"ping");
}
