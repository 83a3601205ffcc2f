//! The PTCP driver over real UDP on 127.0.0.1: streams, FIN, reset, timeouts, path changes,
//! the side channel and garbage.

#[path = "ptcp_common/mod.rs"]
mod common;

use std::io::ErrorKind;
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::*;
use q2q::ptcp::{Config, Endpoint, EndpointConfig, SessionId, StreamFailure};
use q2q_netstack::wire::Kind;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UdpSocket;
use tokio::time::timeout;

const T: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_concurrent_streams_both_ways_hashed() {
    let (_a, sa, _b, sb) = pair(Config::default()).await;
    let (sa, sb) = (std::sync::Arc::new(sa), std::sync::Arc::new(sb));
    const STREAMS: u64 = 48;
    const LEN: u64 = 300_000;
    // Half the streams are opened by each side; on each, both ends send and hash.
    let mut tasks = Vec::new();
    for i in 0..STREAMS {
        let (opener, acceptor) =
            if i % 2 == 0 { (sa.clone(), sb.clone()) } else { (sb.clone(), sa.clone()) };
        tasks.push(tokio::spawn(async move {
            let s = opener.open_stream().await.unwrap();
            let (mut r, mut w) = tokio::io::split(s);
            // The first 8 bytes name the stream so the acceptor knows what to expect.
            w.write_all(&i.to_be_bytes()).await.unwrap();
            let send = tokio::spawn(async move { send_all(&mut w, i, LEN).await });
            let (n, got) = recv_all(&mut r).await;
            let sent = send.await.unwrap();
            (i, n, got, sent)
        }));
        tasks.push(tokio::spawn(async move {
            let s = acceptor.accept().await.unwrap();
            let (mut r, mut w) = tokio::io::split(s);
            let mut tag = [0u8; 8];
            r.read_exact(&mut tag).await.unwrap();
            let j = u64::from_be_bytes(tag) + 1000;
            let send = tokio::spawn(async move { send_all(&mut w, j, LEN).await });
            let (n, got) = recv_all(&mut r).await;
            let sent = send.await.unwrap();
            (j, n, got, sent)
        }));
    }
    let mut sent = std::collections::HashMap::new();
    let mut got = std::collections::HashMap::new();
    for t in tasks {
        let (seed, n, g, s) = timeout(T, t).await.unwrap().unwrap();
        assert_eq!(n, LEN, "stream {seed}: wrong length");
        sent.insert(seed, s);
        // What this end received was sent by the other: opener (i) ↔ acceptor (i + 1000).
        let from = if seed >= 1000 { seed - 1000 } else { seed + 1000 };
        got.insert(from, g);
    }
    for (seed, s) in &sent {
        assert_eq!(got.get(seed), Some(s), "content of stream seed {seed} differs");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fin_reads_as_eof_after_all_data_both_halves() {
    let (_a, sa, _b, sb) = pair(Config::default()).await;
    let mut x = sa.open_stream().await.unwrap();
    x.set_nodelay(true);
    let mut y = sb.accept().await.unwrap();
    x.write_all(b"hello").await.unwrap();
    x.shutdown().await.unwrap();
    let mut got = Vec::new();
    timeout(T, y.read_to_end(&mut got)).await.unwrap().unwrap();
    assert_eq!(got, b"hello");
    // The other half stays open after the FIN.
    y.write_all(b"bye").await.unwrap();
    y.shutdown().await.unwrap();
    let mut got = Vec::new();
    timeout(T, x.read_to_end(&mut got)).await.unwrap().unwrap();
    assert_eq!(got, b"bye");
    // Writing after shutdown says so.
    let e = x.write_all(b"more").await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::BrokenPipe);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_stream_still_delivers_then_fin() {
    let (_a, sa, _b, sb) = pair(Config::default()).await;
    let mut x = sa.open_stream().await.unwrap();
    let data = vec![7u8; 3_000_000];
    x.write_all(&data).await.unwrap();
    drop(x);
    let mut y = sb.accept().await.unwrap();
    let mut got = Vec::new();
    timeout(T, y.read_to_end(&mut got)).await.unwrap().unwrap();
    assert_eq!(got.len(), data.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_resets_the_peer() {
    let (_a, sa, _b, sb) = pair(Config::default()).await;
    let mut x = sa.open_stream().await.unwrap();
    x.write_all(b"x").await.unwrap();
    let mut y = sb.accept().await.unwrap();
    let mut one = [0u8; 1];
    y.read_exact(&mut one).await.unwrap();
    x.abort();
    let e = timeout(T, async {
        loop {
            let mut buf = [0u8; 100];
            match y.read(&mut buf).await {
                Ok(0) => panic!("EOF instead of reset"),
                Ok(_) => continue,
                Err(e) => return e,
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(e.kind(), ErrorKind::ConnectionReset);
    assert_eq!(e.to_string(), "peer reset the stream");
    assert_eq!(y.failure(), Some(StreamFailure::Reset));
    // The aborting side's own calls say it was aborted.
    assert_eq!(x.write(b"z").await.unwrap_err().kind(), ErrorKind::ConnectionAborted);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vanished_peer_ends_streams_with_timeout() {
    let config = Config {
        idle_timeout: q2q_netstack::Duration::from_millis(600),
        keepalive: q2q_netstack::Duration::from_millis(100),
        ..Config::default()
    };
    let (a, sa, b, sb) = pair(config).await;
    let mut x = sa.open_stream().await.unwrap();
    x.write_all(b"ping").await.unwrap();
    let mut y = sb.accept().await.unwrap();
    let mut buf = [0u8; 4];
    y.read_exact(&mut buf).await.unwrap();
    // The peer's machine disappears without a word.
    b.shutdown().await;
    let started = std::time::Instant::now();
    let e = timeout(T, x.read(&mut buf)).await.unwrap().unwrap_err();
    assert_eq!(e.kind(), ErrorKind::TimedOut);
    assert!(e.to_string().starts_with("stream timed out: session lost"), "{e}");
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(sa.open_stream().await.unwrap_err().to_string().starts_with("session lost"));
    assert!(sa.error().is_some());
    // The shut-down side's stream says why too.
    assert_eq!(y.read(&mut buf).await.unwrap_err().to_string(), "PTCP endpoint shut down");
    drop(a);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_to_direct_mid_transfer_breaks_no_stream() {
    // a ⇄ relay ⇄ b first (each side sends to the relay), then both move to direct and the
    // relay goes silent. Sessions are keyed by id, so no stream notices.
    let a = endpoint().await;
    let b = endpoint().await;
    let relay = Relay::start(a.local_addr(), b.local_addr()).await;
    let id = SessionId(rand::random());
    let sb = b.accept(id, relay.addr, Config::default()).await.unwrap();
    let sa = a.connect(id, relay.addr, Config::default()).await.unwrap();
    const LEN: u64 = 24 << 20;
    let mut x = sa.open_stream().await.unwrap();
    let sender = tokio::spawn(async move { send_all(&mut x, 5, LEN).await });
    let mut y = sb.accept().await.unwrap();
    // A slow reader (at most ~70 MB/s) keeps the transfer going while the path changes.
    let progress = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let p2 = progress.clone();
    let receiver = tokio::spawn(async move {
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        let mut buf = vec![0u8; 70_000];
        loop {
            let n = y.read(&mut buf).await.unwrap();
            if n == 0 {
                return (p2.load(Ordering::Relaxed), ctx.finish().as_ref().to_vec());
            }
            ctx.update(&buf[..n]);
            p2.fetch_add(n as u64, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    });
    while progress.load(Ordering::Relaxed) < 4 << 20 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(progress.load(Ordering::Relaxed) < LEN / 2, "switching paths too late");
    sa.set_peer_addr(b.local_addr()).await.unwrap();
    sb.set_peer_addr(a.local_addr()).await.unwrap();
    relay.stop();
    let sent = timeout(T, sender).await.unwrap().unwrap();
    let (n, got) = timeout(T, receiver).await.unwrap().unwrap();
    assert_eq!(n, LEN);
    assert_eq!(got, sent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn side_channel_gets_other_kinds_and_garbage_is_counted() {
    let (a, sa, _b, sb) = pair(Config::default()).await;
    let mut side = a.take_side_channel().unwrap();
    assert!(a.take_side_channel().is_none());
    let raw = UdpSocket::bind(lo()).await.unwrap();
    // A who-am-i request and a probe reach the side channel whole.
    raw.send_to(&[1, Kind::WhoAmIRequest as u8, 9, 9], a.local_addr()).await.unwrap();
    raw.send_to(&[1, Kind::Probe as u8, 1], a.local_addr()).await.unwrap();
    let d = timeout(T, side.recv()).await.unwrap().unwrap();
    assert_eq!(
        (d.kind, d.data.as_slice(), d.from),
        (Kind::WhoAmIRequest, &[1u8, 0x10, 9, 9][..], raw.local_addr().unwrap())
    );
    assert_eq!(timeout(T, side.recv()).await.unwrap().unwrap().kind, Kind::Probe);
    // Garbage: empty, unknown version, unknown kind, truncated PTCP headers, a PTCP
    // datagram for an unknown session, random bytes.
    let mut unknown = vec![1u8, Kind::Ack as u8];
    unknown.extend_from_slice(&[0xee; 40]);
    let mut junk: Vec<Vec<u8>> =
        vec![vec![], vec![7], vec![9, 1, 2], vec![1, 0xee], vec![1, 1, 0], vec![1, 2, 3, 4]];
    for i in 0..200u64 {
        let mut v = vec![1u8, 1 + (i % 2) as u8];
        v.extend((0..(i % 60)).map(|j| (j * 31 + i * 7) as u8));
        junk.push(v);
    }
    junk.push(unknown);
    for j in &junk {
        raw.send_to(j, a.local_addr()).await.unwrap();
    }
    // The endpoint raw-sends too.
    a.send_datagram(raw.local_addr().unwrap(), vec![1, Kind::ProbeReply as u8]).await.unwrap();
    let mut buf = [0u8; 16];
    let (n, _) = timeout(T, raw.recv_from(&mut buf)).await.unwrap().unwrap();
    assert_eq!(&buf[..n], &[1, Kind::ProbeReply as u8]);
    // Still working.
    let mut x = sa.open_stream().await.unwrap();
    x.write_all(b"still fine").await.unwrap();
    x.shutdown().await.unwrap();
    let mut y = sb.accept().await.unwrap();
    let mut got = Vec::new();
    y.read_to_end(&mut got).await.unwrap();
    assert_eq!(got, b"still fine");
    let st = a.stats();
    let dropped = st.malformed.load(Ordering::Relaxed) + st.unknown_session.load(Ordering::Relaxed);
    assert!(dropped >= junk.len() as u64 - 10, "dropped {dropped} of {}", junk.len());
    assert_eq!(st.side.load(Ordering::Relaxed), 2);
}

/// A framing that writes a fixed 4-byte header in front of each datagram.
#[derive(Debug)]
struct Rly;

impl q2q::ptcp::Framing for Rly {
    fn overhead(&self) -> usize {
        4
    }

    fn seal(&self, datagram: &mut [u8]) {
        datagram[..4].copy_from_slice(b"RLY!");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_path_frames_each_datagram() {
    // A fake relay that strips the 4-byte header and forwards to b.
    let a = endpoint().await;
    let b = endpoint().await;
    let fake = UdpSocket::bind(lo()).await.unwrap();
    let fake_addr = fake.local_addr().unwrap();
    let b_addr = b.local_addr();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65536];
        while let Ok((n, _)) = fake.recv_from(&mut buf).await {
            if n >= 4 && &buf[..4] == b"RLY!" {
                let _ = fake.send_to(&buf[4..n], b_addr).await;
            }
        }
    });
    let id = SessionId(rand::random());
    let sb = b.accept(id, a.local_addr(), Config::default()).await.unwrap();
    let framing: std::sync::Arc<dyn q2q::ptcp::Framing> = std::sync::Arc::new(Rly);
    let path = q2q::ptcp::Path::Relay { server: fake_addr, framing: framing.clone() };
    assert_eq!(path, q2q::ptcp::Path::Relay { server: fake_addr, framing });
    let sa = a.new_session(id, q2q::ptcp::Side::Initiator, path, Config::default()).await.unwrap();
    let mut x = sa.open_stream().await.unwrap();
    // Enough for full-sized datagrams sent in GSO batches.
    let data: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
    x.write_all(&data).await.unwrap();
    x.shutdown().await.unwrap();
    let mut y = sb.accept().await.unwrap();
    let mut got = Vec::new();
    timeout(T, y.read_to_end(&mut got)).await.unwrap().unwrap();
    assert!(got == data, "corrupted through the framing relay");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channel_path_hands_datagrams_out() {
    // a's datagrams leave by channel and are handed to b as if from a.
    let a = endpoint().await;
    let b = endpoint().await;
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<u8>>(64);
    let (b2, a_addr) = (b.clone(), a.local_addr());
    tokio::spawn(async move {
        while let Some(d) = rx.recv().await {
            let _ = b2.inject(a_addr, d).await;
        }
    });
    let id = SessionId(rand::random());
    let sb = b.accept(id, a.local_addr(), Config::default()).await.unwrap();
    let path = q2q::ptcp::Path::Channel(tx);
    assert_eq!(path, path.clone());
    let sa = a.new_session(id, q2q::ptcp::Side::Initiator, path, Config::default()).await.unwrap();
    let mut x = sa.open_stream().await.unwrap();
    let data: Vec<u8> = (0..300_000u32).map(|i| (i % 253) as u8).collect();
    x.write_all(&data).await.unwrap();
    x.shutdown().await.unwrap();
    let mut y = sb.accept().await.unwrap();
    let mut got = Vec::new();
    timeout(T, y.read_to_end(&mut got)).await.unwrap().unwrap();
    assert!(got == data, "corrupted through the channel");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_session_and_unknown_session_errors() {
    let a = Endpoint::bind(lo(), EndpointConfig::default()).await.unwrap();
    let id = SessionId(1);
    let _s = a.connect(id, "127.0.0.1:9".parse().unwrap(), Config::default()).await.unwrap();
    let e = a.connect(id, "127.0.0.1:9".parse().unwrap(), Config::default()).await.unwrap_err();
    assert_eq!(e.to_string(), "session 0000000000000001 already exists");
    let e = a.set_peer_addr(SessionId(2), "127.0.0.1:9".parse().unwrap()).await.unwrap_err();
    assert_eq!(e.to_string(), "no session 0000000000000002");
}
