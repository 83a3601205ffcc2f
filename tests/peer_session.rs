//! One session per pair of people: a burst of connections sets up one session, every later
//! stream (any service, either direction) rides it with no server round trip, each stream's
//! service is checked by the callee, idle sessions end on both sides, and a stranger gets a
//! relay-only session.

mod common;

use common::{TestServer, addr, loopback_config, node, serve_echo};
use q2q::address::ServiceName;
use q2q::presence::node::{Node, NodeConfig, PathKind, Policy};
use q2q::server::Registration;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn echo_once(bob: &Node, to: &str, service: &ServiceName, i: u32) -> Result<(), String> {
    let conn = bob.connect(&addr(to), service).await.map_err(|e| e.to_string())?;
    let (mut r, mut w) = tokio::io::split(conn.stream);
    let msg = format!("hello {i}").into_bytes();
    w.write_all(&msg).await.map_err(|e| e.to_string())?;
    w.shutdown().await.map_err(|e| e.to_string())?;
    let mut back = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), r.read_to_end(&mut back))
        .await
        .map_err(|_| "no echo".to_string())?
        .map_err(|e| e.to_string())?;
    if back == msg { Ok(()) } else { Err(format!("stream {i} echoed {back:?}")) }
}

/// A server, and alice offering `echo` to bob; both online.
struct Pair {
    srv: TestServer,
    _d: tempfile::TempDir,
    alice: Node,
    bob: Node,
    echo: ServiceName,
}

async fn pair(config: NodeConfig) -> Pair {
    let srv = TestServer::start("example.com", loopback_config(Registration::Open)).await;
    let (_d, home) = common::home();
    let alice = node(&srv, &home, "alice@example.com", config.clone()).await;
    let bob = node(&srv, &home, "bob@example.com", config).await;
    let echo = serve_echo(&alice, &["bob@example.com"]).await;
    Pair { srv, _d, alice, bob, echo }
}

fn relay_sessions(srv: &TestServer) -> usize {
    srv.running.as_ref().unwrap().stats().relay_sessions
}

/// Wait until `cond` holds, polling every 50 ms; false after `limit`.
async fn eventually(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let start = tokio::time::Instant::now();
    while start.elapsed() < limit {
        if cond() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    cond()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_connections_shares_one_session() {
    let Pair { srv, _d, alice: _alice, bob, echo } = pair(NodeConfig::default()).await;

    // 200 at once, before any session exists: one `inbound`, one relayed session on the
    // server, every stream echoes.
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..200 {
        let (bob, echo) = (bob.clone(), echo.clone());
        tasks.spawn(async move { echo_once(&bob, "alice@example.com", &echo, i).await });
    }
    let mut failures = Vec::new();
    while let Some(r) = tasks.join_next().await {
        if let Err(e) = r.unwrap() {
            failures.push(e);
        }
    }
    assert!(failures.is_empty(), "{} of 200 failed, e.g. {:?}", failures.len(), failures.first());
    assert_eq!(relay_sessions(&srv), 1, "one set-up through the server");
    assert_eq!(bob.status().len(), 1, "{:?}", bob.status());
    // `status` counts streams once a second.
    let opened = vec![("echo".to_string(), 200)];
    assert!(
        eventually(Duration::from_secs(3), || bob.status()[0].opened == opened).await,
        "{:?}",
        bob.status()
    );

    // The next one needs no server: still one set-up, and it is direct from its first
    // packet (the session already is).
    assert!(
        eventually(Duration::from_secs(10), || matches!(bob.status()[0].path, PathKind::Direct(_)))
            .await
    );
    echo_once(&bob, "alice@example.com", &echo, 1000).await.unwrap();
    assert_eq!(relay_sessions(&srv), 1);
}

#[tokio::test]
async fn each_stream_is_authorized_for_its_service_and_either_side_opens() {
    let Pair { srv, _d, alice, bob, echo } = pair(NodeConfig::default()).await;
    let secret = ServiceName::parse("secret").unwrap();
    let _s =
        alice.listen(&secret, "secret", Policy::allow([addr("carol@example.com")])).await.unwrap();
    echo_once(&bob, "alice@example.com", &echo, 0).await.unwrap();

    // On the live session: a service bob may not use is refused with the reason, and the
    // session goes on carrying the ones he may.
    let err = bob.connect(&addr("alice@example.com"), &secret).await.err().unwrap();
    assert_eq!(
        err.to_string(),
        "bob@example.com is not authorized for secret of alice@example.com"
    );
    let err = bob.connect(&addr("alice@example.com"), &ServiceName::parse("nope").unwrap()).await;
    assert_eq!(err.err().unwrap().to_string(), "alice@example.com does not offer service nope");
    echo_once(&bob, "alice@example.com", &echo, 1).await.unwrap();

    // The callee opens a stream back on the same session: no second set-up.
    let back = ServiceName::parse("back").unwrap();
    let mut accepted =
        bob.listen(&back, "back", Policy::allow([addr("alice@example.com")])).await.unwrap();
    let conn = alice.connect(&addr("bob@example.com"), &back).await.unwrap();
    let got =
        tokio::time::timeout(Duration::from_secs(10), accepted.recv()).await.unwrap().unwrap();
    assert_eq!(got.peer, addr("alice@example.com"));
    assert_eq!(conn.session.id(), got.session.id(), "the same session carries both directions");
    assert_eq!(relay_sessions(&srv), 1);
    assert_eq!(alice.status().len(), 1);
}

#[tokio::test]
async fn an_idle_session_ends_on_both_sides() {
    let config = NodeConfig { session_idle: Duration::from_secs(2), ..NodeConfig::default() };
    let Pair { srv: _srv, _d, alice, bob, echo } = pair(config).await;
    echo_once(&bob, "alice@example.com", &echo, 0).await.unwrap();
    assert_eq!(alice.status().len(), 1);
    assert_eq!(bob.status().len(), 1);
    // A stream kept open keeps the session.
    let conn = bob.connect(&addr("alice@example.com"), &echo).await.unwrap();
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(bob.status().len(), 1, "a session with an open stream stays");
    // The open one (and maybe the first, in TIME-WAIT for a moment).
    assert!(bob.status()[0].streams >= 1);
    drop(conn);
    assert!(
        eventually(Duration::from_secs(10), || alice.status().is_empty()
            && bob.status().is_empty())
        .await,
        "idle session still listed: alice {:?}, bob {:?}",
        alice.status(),
        bob.status()
    );
    // The next connection sets up a new session.
    echo_once(&bob, "alice@example.com", &echo, 1).await.unwrap();
    assert_eq!(bob.status().len(), 1);
}

#[tokio::test]
async fn a_stranger_gets_a_relay_only_session() {
    let srv = TestServer::start("example.com", loopback_config(Registration::Open)).await;
    let (_d, home) = common::home();
    let alice = node(&srv, &home, "alice@example.com", NodeConfig::default()).await;
    let carol = node(&srv, &home, "carol@example.com", NodeConfig::default()).await;
    alice.serve_ping().await.unwrap();
    // Anyone may ping; carol is named for nothing: she is a stranger.
    let report =
        carol.ping(&addr("alice@example.com"), 3, Duration::from_millis(100)).await.unwrap();
    assert_eq!(report.rtts.len(), 3);
    tokio::time::sleep(Duration::from_secs(2)).await;
    for (who, n) in [("carol", &carol), ("alice", &alice)] {
        let s = n.status();
        assert_eq!(s.len(), 1, "{who}: {s:?}");
        assert!(matches!(s[0].path, PathKind::UdpRelay(_)), "{who} is not relayed: {s:?}");
        assert!(s[0].why.contains("relay only"), "{who}: {}", s[0].why);
    }
    // Not one probe went from alice to carol's candidates, nor the other way.
    assert_eq!(alice.probes_sent(), 0);
    assert_eq!(carol.probes_sent(), 0);
}

#[tokio::test]
async fn a_node_going_offline_ends_its_sessions_on_the_peer_at_once() {
    let Pair { srv: _srv, _d, alice, bob, echo } = pair(NodeConfig::default()).await;
    let conn = bob.connect(&addr("alice@example.com"), &echo).await.unwrap();
    let (mut r, _w) = tokio::io::split(conn.stream);
    alice.leave().await;
    // Bob's open stream ends now (not after the 15-minute peer timeout), and the session
    // is gone from his status.
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(Duration::from_secs(5), r.read(&mut buf)).await;
    assert!(matches!(read, Ok(Err(_)) | Ok(Ok(0))), "stream still open: {read:?}");
    assert!(eventually(Duration::from_secs(3), || bob.status().is_empty()).await);
    assert!(alice.status().is_empty());
}

#[tokio::test]
async fn fresh_candidates_reach_a_peer_in_session_and_no_one_else() {
    let Pair { srv, _d, alice, bob, echo } = pair(NodeConfig::default()).await;
    // Online both (a node listening for nothing cannot be asked anything by its server).
    bob.serve_ping().await.unwrap();
    echo_once(&bob, "alice@example.com", &echo, 0).await.unwrap();
    // After a network change either side gives the other its fresh candidates through the
    // other's server, and gets the other's back.
    assert_eq!(bob.refresh_sessions().await, 1);
    assert_eq!(alice.refresh_sessions().await, 1);
    echo_once(&bob, "alice@example.com", &echo, 1).await.unwrap();
    // A logged-in stranger who names a live session (even its real id) cannot feed it
    // candidates: it is not carol's session.
    let (_e, home) = common::home();
    let carol = common::login(&srv, &home, "carol@example.com").await;
    let id = format!("{:016x}", alice.status()[0].session);
    let err = carol
        .call_box(
            q2q::amp::AmpBox::command(q2q::proto::command::CANDIDATES)
                .with("to", "alice@example.com")
                .with("session", id.as_str())
                .with("candidates", "198.51.100.99:22"),
        )
        .await
        .err()
        .unwrap();
    assert_eq!(err.code(), Some(q2q::proto::code::NOT_AUTHORIZED), "{err}");
}

/// Refreshes do not pile up: one asked for while another waits on its retries (bob
/// listens for nothing, so his server answers alice "offline") returns at once, and the
/// running one ends within its budget (two passes: the one it made and the one asked for).
#[tokio::test]
async fn a_refresh_asked_for_while_one_runs_starts_no_second() {
    let Pair { srv: _srv, _d, alice, bob, echo } = pair(NodeConfig::default()).await;
    echo_once(&bob, "alice@example.com", &echo, 0).await.unwrap();
    let first = tokio::spawn({
        let alice = alice.clone();
        async move { alice.refresh_sessions().await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let second = tokio::time::timeout(Duration::from_secs(1), alice.refresh_sessions()).await;
    assert_eq!(second, Ok(0), "a second refresh ran beside the first");
    assert!(!first.is_finished(), "the first refresh did not wait to ask again");
    let first = tokio::time::timeout(Duration::from_secs(60), first).await;
    assert!(matches!(first, Ok(Ok(0))), "{first:?}");
}

/// A stranger with a valid certificate of a domain of their own (and a server of their
/// own) may ping, like anyone, but gets a relay-only session: no candidate of alice's, no
/// probe from her, and no way to feed her session candidates of their choosing.
#[tokio::test]
async fn a_stranger_from_their_own_domain_gets_relay_only_and_cannot_steer_probes() {
    let srv = TestServer::start("example.com", loopback_config(Registration::Open)).await;
    let evil = TestServer::start("evil.example", loopback_config(Registration::Open)).await;
    // Each server finds the other domain's server (and so its CA) from its config.
    common::federate_servers(&srv, "example.com", &evil, "evil.example");
    let (_d, home) = common::home();
    std::fs::create_dir_all(home.root()).unwrap();
    std::fs::write(
        home.root().join("config.toml"),
        format!(
            "[servers]\n\"example.com\" = \"{}\"\n\"evil.example\" = \"{}\"\n",
            srv.addr(),
            evil.addr()
        ),
    )
    .unwrap();
    let alice = node(&srv, &home, "alice@example.com", NodeConfig::default()).await;
    let mallory = node(&evil, &home, "mallory@evil.example", NodeConfig::default()).await;
    alice.serve_ping().await.unwrap();
    let report =
        mallory.ping(&addr("alice@example.com"), 3, Duration::from_millis(50)).await.unwrap();
    assert_eq!(report.rtts.len(), 3);
    let s = alice.status();
    assert_eq!(s.len(), 1, "{s:?}");
    assert!(matches!(s[0].path, PathKind::UdpRelay(_)), "{s:?}");
    assert!(s[0].why.contains("relay only"), "{}", s[0].why);
    assert_eq!(alice.probes_sent(), 0);
    // Mallory, logged in at alice's server, names her real session with alice and offers a
    // third party's address.
    let fake = q2q::client::ServerConn::connect(
        &home,
        &addr("alice@example.com").domain,
        &q2q::client::ConnectOptions {
            login: Some(std::sync::Arc::new(home.identity(&addr("mallory@evil.example")).unwrap())),
            ..srv.opts()
        },
    )
    .await
    .unwrap();
    let err = fake
        .call_box(
            q2q::amp::AmpBox::command(q2q::proto::command::CANDIDATES)
                .with("to", "alice@example.com")
                .with("session", format!("{:016x}", s[0].session))
                .with("candidates", "198.51.100.99:22"),
        )
        .await
        .err()
        .unwrap();
    assert_eq!(err.code(), Some(q2q::proto::code::NOT_AUTHORIZED), "{err}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(alice.probes_sent(), 0, "no probe went anywhere");
}

#[tokio::test]
async fn a_session_is_authenticated_once_and_every_datagram_is_sealed() {
    let Pair { srv: _srv, _d, alice, bob, echo } = pair(NodeConfig::default()).await;
    for i in 0..3 {
        echo_once(&bob, "alice@example.com", &echo, i).await.unwrap();
    }
    let conn = bob.connect(&addr("alice@example.com"), &echo).await.unwrap();
    let session = conn.session.clone();
    let stats = session.stats().await.unwrap();
    assert!(stats.sealed, "alice's datagrams reach bob sealed");
    assert_eq!(stats.refused, 0);

    // Someone on the path injects datagrams of the session (a plain Data with the right
    // session id, and a sealed one not sealed with the keys): refused and counted, and the
    // session carries on. (Plain datagrams overtaken on the way are taken for a moment
    // after the switch: wait that out.)
    tokio::time::sleep(Duration::from_micros(2 * q2q_netstack::seal::PLAIN_GRACE_US as u64)).await;
    let id = session.id();
    let from = alice.local_addr();
    let mut data = Vec::new();
    q2q_netstack::wire::Data::emit_header(id, 1 << 20, 1 << 20, &mut data);
    data.extend_from_slice(b"not from alice");
    let mut sealed_lookalike = data.clone();
    sealed_lookalike[1] = q2q_netstack::wire::Kind::Sealed as u8;
    sealed_lookalike.extend_from_slice(&[0u8; q2q_netstack::seal::OVERHEAD]);
    for d in [data, sealed_lookalike] {
        bob.endpoint().inject(from, d).await.unwrap();
    }
    let mut refused = 0;
    for _ in 0..40 {
        refused = session.stats().await.unwrap().refused;
        if refused >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(refused, 2, "both injected datagrams refused");
    drop(conn);
    echo_once(&bob, "alice@example.com", &echo, 9).await.unwrap();
    assert_eq!(bob.status().len(), 1, "still one session");
}
