//! Two nodes on loopback reaching each other by address through one server: relayed, direct,
//! and moved from relay to direct in the middle of a transfer.

mod common;

use common::{TestServer, addr, loopback_config, node};
use q2q::address::ServiceName;
use q2q::presence::node::{Node, NodeConfig, PathKind, Policy};
use q2q::server::Registration;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Bob connects to alice's echo service and moves `len` bytes through it, checking them.
async fn echo_round_trip(srv: &TestServer, config: NodeConfig, len: usize) -> (Node, Node) {
    let (_d, home) = common::home();
    let alice = node(srv, &home, "alice@example.com", config.clone()).await;
    let bob = node(srv, &home, "bob@example.com", config).await;
    let echo = ServiceName::parse("echo").unwrap();
    let mut accepted =
        alice.listen(&echo, "echo", Policy::allow([addr("bob@example.com")])).await.unwrap();
    tokio::spawn(async move {
        while let Some(a) = accepted.recv().await {
            assert_eq!(a.peer, addr("bob@example.com"));
            tokio::spawn(async move {
                let (mut r, mut w) = tokio::io::split(a.stream);
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    let conn = bob.connect(&addr("alice@example.com"), &echo).await.unwrap();
    assert_eq!(conn.peer, addr("alice@example.com"));
    let (mut r, mut w) = tokio::io::split(conn.stream);
    let data: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
    let sent = data.clone();
    let writer = tokio::spawn(async move {
        for chunk in sent.chunks(64 * 1024) {
            w.write_all(chunk).await.unwrap();
        }
        w.shutdown().await.unwrap();
    });
    let mut back = Vec::with_capacity(len);
    tokio::time::timeout(Duration::from_secs(60), r.read_to_end(&mut back)).await.unwrap().unwrap();
    writer.await.unwrap();
    assert!(back == data, "echoed data differs");
    drop(_d);
    (alice, bob)
}

#[tokio::test]
async fn direct_when_a_hole_can_be_punched() {
    let srv = TestServer::start("example.com", loopback_config(Registration::Open)).await;
    let (_alice, bob) = echo_round_trip(&srv, NodeConfig::default(), 1 << 20).await;
    let status = bob.status();
    assert_eq!(status.len(), 1);
    assert!(matches!(status[0].path, PathKind::Direct(_)), "{:?}", status[0]);
    // The session's keeper samples its traffic once a second for `status`: 1 MiB each way
    // (and the TLS handshakes, headers and ACKs), a round trip, the path MTU found.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let t = loop {
        let t = bob.status()[0].traffic;
        if t.is_some_and(|t| t.bytes_received > 1 << 20) || tokio::time::Instant::now() > deadline {
            break t.expect("traffic sampled");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(t.bytes_sent > 1 << 20 && t.bytes_received > 1 << 20, "{t:?}");
    assert!(t.rtt_us > 0 && t.path_mtu >= 1200 && t.packets_sent > 700, "{t:?}");
}

#[tokio::test]
async fn relayed_when_direct_is_off() {
    let srv = TestServer::start("example.com", loopback_config(Registration::Open)).await;
    let config = NodeConfig { direct: false, ..Default::default() };
    let (_alice, bob) = echo_round_trip(&srv, config, 1 << 20).await;
    let status = bob.status();
    assert!(matches!(status[0].path, PathKind::UdpRelay(_)), "{:?}", status[0]);
    assert!(status[0].why.contains("disabled"), "{:?}", status[0]);
    // Every byte went through the server: 1 MiB each way, plus headers and ACKs.
    assert!(srv.running.as_ref().unwrap().stats().relayed_bytes > 2 << 20);
}

/// alice, serving echo to bob, and bob: logged in at `srv` with `config`.
async fn echo_pair(
    srv: &TestServer,
    home: &q2q::client::Home,
    config: NodeConfig,
) -> (Node, Node, ServiceName) {
    let alice = node(srv, home, "alice@example.com", config.clone()).await;
    let bob = node(srv, home, "bob@example.com", config).await;
    let echo = common::serve_echo(&alice, &["bob@example.com"]).await;
    (alice, bob, echo)
}

/// An [`echo_pair`] with no hole between them at first: each drops what comes straight
/// from the other, so only the relay works until both stop (`drop_from(None)`). Probing
/// lasts 1 s; re-probes come every `reprobe_every`.
async fn holeless_pair(
    srv: &TestServer,
    home: &q2q::client::Home,
    reprobe_every: Duration,
) -> (Node, Node, ServiceName) {
    let config =
        NodeConfig { probe_for: Duration::from_secs(1), reprobe_every, ..Default::default() };
    let (alice, bob, echo) = echo_pair(srv, home, config).await;
    let (pa, pb) = (alice.local_addr().port(), bob.local_addr().port());
    alice.endpoint().drop_from(Some(std::sync::Arc::new(move |a| a.port() == pb))).await;
    bob.endpoint().drop_from(Some(std::sync::Arc::new(move |a| a.port() == pa))).await;
    (alice, bob, echo)
}

#[tokio::test]
async fn relay_to_direct_in_the_middle_of_a_transfer() {
    let srv = TestServer::start("example.com", loopback_config(Registration::Open)).await;
    let (_d, home) = common::home();
    let (alice, bob, echo) = holeless_pair(&srv, &home, Duration::from_secs(1)).await;
    let conn = bob.connect(&addr("alice@example.com"), &echo).await.unwrap();
    let (mut r, mut w) = tokio::io::split(conn.stream);
    let len: u64 = 48 << 20;
    let writer = tokio::spawn(async move {
        let mut sent = 0u64;
        while sent < len {
            let chunk: Vec<u8> = (sent..sent + (64 << 10)).map(|i| (i % 251) as u8).collect();
            w.write_all(&chunk).await.unwrap();
            sent += chunk.len() as u64;
        }
        w.shutdown().await.unwrap();
    });
    let mut got = 0u64;
    let mut healed = false;
    let mut buf = vec![0u8; 64 << 10];
    loop {
        // A stall fails the test (with how far it got) instead of hanging the suite.
        let n = tokio::time::timeout(Duration::from_secs(30), r.read(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("the stream stalled after {got} bytes"))
            .unwrap();
        if n == 0 {
            break;
        }
        for (k, b) in buf[..n].iter().enumerate() {
            assert_eq!(*b, ((got + k as u64) % 251) as u8, "byte {} corrupted", got + k as u64);
        }
        got += n as u64;
        if !healed && got >= 4 << 20 {
            assert!(matches!(bob.status()[0].path, PathKind::UdpRelay(_)), "{:?}", bob.status());
            // The hole opens: the next re-probe finds it, in the middle of the transfer.
            alice.endpoint().drop_from(None).await;
            bob.endpoint().drop_from(None).await;
            healed = true;
        }
    }
    writer.await.unwrap();
    assert_eq!(got, len, "the stream ended early");
    let status = bob.status();
    assert!(matches!(status[0].path, PathKind::Direct(_)), "{:?}", status[0]);
    // Part of the transfer went through the relay, the rest direct; the stream never broke.
    let relayed = srv.running.as_ref().unwrap().stats().relayed_bytes;
    eprintln!("relayed {relayed} of {} bytes", 2 * len);
    assert!(relayed > 8 << 20 && relayed < 2 * len, "relayed {relayed}");
}

#[tokio::test]
async fn server_restart_keeps_direct_streams_and_nodes_log_back_in() {
    let mut srv = TestServer::start("example.com", loopback_config(Registration::Open)).await;
    let (_d, home) = common::home();
    let (_alice, bob, echo) = echo_pair(&srv, &home, NodeConfig::default()).await;
    let conn = bob.connect(&addr("alice@example.com"), &echo).await.unwrap();
    let mut stream = conn.stream;
    let mut buf = [0u8; 5];
    // Wait for the direct path, then take the server away.
    for _ in 0..100 {
        if matches!(bob.status()[0].path, PathKind::Direct(_)) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(matches!(bob.status()[0].path, PathKind::Direct(_)));
    srv.restart().await;
    stream.write_all(b"hello").await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), stream.read_exact(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&buf, b"hello", "the direct stream survived the server restart");
    // Both log back in by themselves; a new connection works.
    let mut ok = false;
    for _ in 0..40 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        if let Ok(c) = bob.connect(&addr("alice@example.com"), &echo).await {
            let mut s = c.stream;
            s.write_all(b"again").await.unwrap();
            tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut buf))
                .await
                .unwrap()
                .unwrap();
            ok = &buf == b"again";
            break;
        }
    }
    assert!(ok, "nodes did not log back in after the server restarted");
}

/// After a re-login (here: the server restarted; in the world: a NAT rebinding or a new
/// network cut the home connection) a node exchanges fresh candidates with every peer in
/// session, so a relayed session searches for the direct path at once instead of at its
/// next periodic re-probe (an hour away here).
#[tokio::test]
async fn a_re_login_refreshes_candidates_and_a_relayed_session_goes_direct() {
    let mut srv = TestServer::start("example.com", loopback_config(Registration::Open)).await;
    let (_d, home) = common::home();
    let (alice, bob, echo) = holeless_pair(&srv, &home, Duration::from_secs(3600)).await;
    let conn = bob.connect(&addr("alice@example.com"), &echo).await.unwrap();
    let mut stream = conn.stream;
    // Past the first search (1 s): relayed, and no re-probe due for an hour.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(matches!(bob.status()[0].path, PathKind::UdpRelay(_)), "{:?}", bob.status());
    alice.endpoint().drop_from(None).await;
    bob.endpoint().drop_from(None).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(matches!(bob.status()[0].path, PathKind::UdpRelay(_)), "{:?}", bob.status());
    srv.restart().await;
    let direct = common::eventually(Duration::from_secs(20), || async {
        matches!(bob.status().first().map(|s| &s.path), Some(PathKind::Direct(_)))
            && matches!(alice.status().first().map(|s| &s.path), Some(PathKind::Direct(_)))
    })
    .await;
    assert!(direct, "still relayed after the re-login: {:?} / {:?}", bob.status(), alice.status());
    // The stream that began relayed goes on, direct.
    let mut buf = [0u8; 5];
    stream.write_all(b"hello").await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), stream.read_exact(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&buf, b"hello");
}

/// A refresh that meets the server restarting (our home connection dead, the peer not
/// yet logged back in) asks again until the peer is back, instead of giving up at once.
#[tokio::test]
async fn a_refresh_during_a_server_restart_asks_again_until_the_peer_is_back() {
    let mut srv = TestServer::start("example.com", loopback_config(Registration::Open)).await;
    let (_d, home) = common::home();
    let (_alice, bob, echo) = echo_pair(&srv, &home, NodeConfig::default()).await;
    let _conn = bob.connect(&addr("alice@example.com"), &echo).await.unwrap();
    srv.restart().await;
    // The first ask fails (bob's connection is gone, or alice is not back yet); a later
    // one, after both logged back in, is answered.
    let refreshed = tokio::time::timeout(Duration::from_secs(30), bob.refresh_sessions()).await;
    // (More than 1: bob's own re-login asked for a refresh meanwhile, made as a second pass.)
    assert!(matches!(refreshed, Ok(n) if n >= 1), "bob's session was not refreshed: {refreshed:?}");
}

/// Write `msg` on `stream` and read it back from alice's echo within `secs` (PTCP resends
/// meanwhile, so a path that heals within that time carries it).
async fn echoes(stream: &mut q2q::presence::node::PeerStream, msg: &[u8], secs: u64) -> bool {
    let mut buf = vec![0u8; msg.len()];
    stream.write_all(msg).await.unwrap();
    let read = tokio::time::timeout(Duration::from_secs(secs), stream.read_exact(&mut buf)).await;
    matches!(read, Ok(Ok(_))) && buf == msg
}

/// A session that can only be relayed outlives a restart of its server, which forgets
/// every relay leg: after logging back in each side asks for the session's legs again
/// (`candidates` with `relay`), both get one new pair, and the stream goes on.
#[tokio::test]
async fn a_relayed_session_survives_a_server_restart() {
    let mut srv = TestServer::start("example.com", loopback_config(Registration::Open)).await;
    let (_d, home) = common::home();
    let (_alice, bob, echo) = holeless_pair(&srv, &home, Duration::from_secs(3600)).await;
    let mut stream = bob.connect(&addr("alice@example.com"), &echo).await.unwrap().stream;
    assert!(echoes(&mut stream, b"before", 10).await);
    assert!(matches!(bob.status()[0].path, PathKind::UdpRelay(_)), "{:?}", bob.status());
    srv.restart().await;
    assert!(echoes(&mut stream, b"after the restart", 30).await, "{:?}", bob.status());
    assert!(matches!(bob.status()[0].path, PathKind::UdpRelay(_)), "{:?}", bob.status());
    assert!(srv.running.as_ref().unwrap().stats().relayed_bytes > 0, "not through the new relay");
    // Asking again gives both sides the legs they have: nothing changes, nothing breaks.
    assert_eq!(bob.refresh_after_login().await, 1);
    assert_eq!(srv.running.as_ref().unwrap().stats().relay_sessions, 1);
    assert!(echoes(&mut stream, b"asked again", 10).await, "{:?}", bob.status());
}

/// A relayed session's control connection ends (a NAT rebinding or a suspend cuts it) but
/// the server stays: the session's UDP relay goes on working meanwhile, and after logging
/// back in the node takes the same legs again (nothing refused as an unknown token or a
/// replay on the way).
#[tokio::test]
async fn a_relayed_session_outlives_its_control_connection() {
    let srv = TestServer::start("example.com", loopback_config(Registration::Open)).await;
    let (_d, home) = common::home();
    let (_alice, bob, echo) = holeless_pair(&srv, &home, Duration::from_secs(3600)).await;
    // Bob listens too, so that the server shows when he is back.
    bob.serve_ping().await.unwrap();
    let mut stream = bob.connect(&addr("alice@example.com"), &echo).await.unwrap().stream;
    assert!(echoes(&mut stream, b"before", 10).await);
    let stats = || srv.running.as_ref().unwrap().stats();
    let refused = stats().relay_refused;
    assert_eq!(stats().online, 2);
    bob.drop_home_connection();
    let gone = common::eventually(Duration::from_secs(5), || async { stats().online == 1 }).await;
    assert!(gone, "bob's connection did not end");
    // Before bob is back: the legs did not end with his connection.
    assert!(echoes(&mut stream, b"while logged out", 1).await, "{:?}", bob.status());
    let back = common::eventually(Duration::from_secs(10), || async { stats().online == 2 }).await;
    assert!(back, "bob did not log back in");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(echoes(&mut stream, b"after logging back in", 10).await, "{:?}", bob.status());
    assert_eq!(stats().relay_sessions, 1);
    assert_eq!(stats().relay_refused, refused, "datagrams refused by the relay");
}

/// The same over the relay on the control connection (UDP to the server blocked): the
/// session's datagrams move to the new connection.
#[tokio::test]
async fn a_session_relayed_over_tcp_survives_a_server_restart() {
    let mut srv = TestServer::start("example.com", loopback_config(Registration::Open)).await;
    let (_d, home) = common::home();
    let config = NodeConfig { direct: false, tcp_relay_only: true, ..Default::default() };
    let (_alice, bob, echo) = echo_pair(&srv, &home, config).await;
    let mut stream = bob.connect(&addr("alice@example.com"), &echo).await.unwrap().stream;
    assert!(echoes(&mut stream, b"before", 10).await);
    assert_eq!(bob.status()[0].path, PathKind::TcpRelay, "{:?}", bob.status());
    srv.restart().await;
    assert!(echoes(&mut stream, b"after the restart", 30).await, "{:?}", bob.status());
    assert!(srv.running.as_ref().unwrap().stats().relayed_bytes > 0, "not through the new relay");
}

/// Across domains the legs are at the callee's server, which only the caller asks: when
/// that server restarts, the caller's connection to it ends, and the caller asks for the
/// legs again there (the callee's own re-login does not: it would ask the caller's
/// server, which has none).
#[tokio::test]
async fn a_relayed_session_across_domains_survives_a_restart_of_the_callees_server() {
    let mut srv = TestServer::start("example.com", loopback_config(Registration::Open)).await;
    let other = TestServer::start("b.example", loopback_config(Registration::Open)).await;
    common::federate_servers(&srv, "example.com", &other, "b.example");
    let (_d, home) = common::home();
    std::fs::create_dir_all(home.root()).unwrap();
    let servers = format!(
        "[servers]\n\"example.com\" = \"{}\"\n\"b.example\" = \"{}\"\n",
        srv.addr(),
        other.addr()
    );
    std::fs::write(home.root().join("config.toml"), servers).unwrap();
    let config = NodeConfig { direct: false, ..Default::default() };
    let alice = node(&srv, &home, "alice@example.com", config.clone()).await;
    let bob = node(&other, &home, "bob@b.example", config).await;
    let echo = common::serve_echo(&alice, &["bob@b.example"]).await;
    let mut stream = bob.connect(&addr("alice@example.com"), &echo).await.unwrap().stream;
    assert!(echoes(&mut stream, b"before", 10).await);
    srv.restart().await;
    assert!(echoes(&mut stream, b"after the restart", 30).await, "{:?}", bob.status());
    assert!(srv.running.as_ref().unwrap().stats().relayed_bytes > 0, "not through the new relay");
}

/// Relay legs are given again only to a session's own ends: a user of the domain naming
/// alice and bob's session, or a made-up one, is refused and leaves nothing allocated.
#[tokio::test]
async fn relay_legs_are_given_again_only_to_the_sessions_own_ends() {
    use q2q::proto::commands::Candidates;
    let srv = TestServer::start("example.com", loopback_config(Registration::Open)).await;
    let (_d, home) = common::home();
    let config = NodeConfig { direct: false, ..Default::default() };
    let (_alice, bob, echo) = echo_pair(&srv, &home, config).await;
    let _conn = bob.connect(&addr("alice@example.com"), &echo).await.unwrap();
    let sessions = || srv.running.as_ref().unwrap().stats().relay_sessions;
    assert_eq!(sessions(), 1);
    let carol = common::login(&srv, &home, "carol@example.com").await;
    for session in [bob.status()[0].session, 7] {
        let ask = Candidates {
            to: addr("alice@example.com"),
            session,
            candidates: Vec::new(),
            relay: Some(true),
        };
        let err = carol.call(&ask).await.unwrap_err();
        assert_eq!(err.error_code(), Some(&q2q::proto::ErrorCode::NotAuthorized), "{err}");
        assert_eq!(sessions(), 1, "legs left behind for {session:x}");
    }
}

#[tokio::test]
async fn relayed_over_tcp_when_udp_to_the_server_is_blocked() {
    let srv = TestServer::start("example.com", loopback_config(Registration::Open)).await;
    let config = NodeConfig { direct: false, tcp_relay_only: true, ..Default::default() };
    let (_alice, bob) = echo_round_trip(&srv, config, 1 << 20).await;
    let status = bob.status();
    assert_eq!(status[0].path, PathKind::TcpRelay, "{:?}", status[0]);
    assert!(status[0].why.contains("blocked"), "{:?}", status[0]);
    assert!(srv.running.as_ref().unwrap().stats().relayed_bytes > 2 << 20);
}

#[tokio::test]
async fn unauthorized_caller_is_refused_before_any_stream() {
    let srv = TestServer::start("example.com", loopback_config(Registration::Open)).await;
    let (_d, home) = common::home();
    let alice = node(&srv, &home, "alice@example.com", NodeConfig::default()).await;
    let carol = node(&srv, &home, "carol@example.com", NodeConfig::default()).await;
    let echo = ServiceName::parse("echo").unwrap();
    let _accepted =
        alice.listen(&echo, "echo", Policy::allow([addr("bob@example.com")])).await.unwrap();
    let err = carol.connect(&addr("alice@example.com"), &echo).await.err().unwrap();
    assert_eq!(
        err.to_string(),
        "carol@example.com is not authorized for echo of alice@example.com"
    );
    let err = carol
        .connect(&addr("alice@example.com"), &ServiceName::parse("tcp/22").unwrap())
        .await
        .err()
        .unwrap();
    assert_eq!(err.to_string(), "alice@example.com does not offer service tcp/22");
    let err = carol.connect(&addr("nobody@example.com"), &echo).await.err().unwrap();
    assert_eq!(err.to_string(), "nobody@example.com is offline");
    assert!(carol.status().is_empty(), "no session was set up");
}
