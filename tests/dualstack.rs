//! The dual-stack underlay on loopback (127.0.0.1 and ::1): a server on `[::]` answers
//! who-am-i in both families with plain (not v4-mapped) addresses and proves the address it
//! saw; `also-seen` takes only a valid proof of the other family; two nodes on dual-stack
//! sockets go direct over IPv6 when both families work; over an IPv6-only server nodes go
//! direct and relayed over IPv6. The NATs and firewalls are in the lab (tools/lab-ipv6).

mod common;

use common::{TestServer, addr, loopback_config, node, serve_echo};
use q2q::client::ConnectOptions;
use q2q::presence::node::{NodeConfig, PathKind};
use q2q::proto::ErrorCode;
use q2q::proto::commands::AlsoSeen;
use q2q::proto::whoami;
use q2q::server::{Registration, ServerConfig};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn config(listen: &str) -> ServerConfig {
    ServerConfig { listen: listen.parse().unwrap(), ..loopback_config(Registration::Open) }
}

/// Ask who-am-i with a proof from a fresh socket bound to `local`.
const PROOF: whoami::Flags = whoami::Flags { proof: true, ..whoami::Flags::NONE };

async fn who_am_i(local: &str, server: SocketAddr) -> whoami::Reply {
    let sock = tokio::net::UdpSocket::bind(local).await.unwrap();
    sock.send_to(&whoami::request_with(*b"dualstak", PROOF), server).await.unwrap();
    let mut buf = [0u8; 512];
    let (n, from) = tokio::time::timeout(Duration::from_secs(5), sock.recv_from(&mut buf))
        .await
        .expect("an answer")
        .unwrap();
    assert_eq!(from, server);
    let r = whoami::Reply::parse(&buf[..n], PROOF).unwrap();
    assert_eq!(r.seen, sock.local_addr().unwrap(), "plain, as the socket is");
    r
}

#[tokio::test]
async fn a_dual_stack_server_answers_both_families_and_checks_proofs() {
    let srv = TestServer::start("example.com", config("[::]:0")).await;
    let port = srv.running.as_ref().unwrap().udp_addr.port();
    let v4 = who_am_i("127.0.0.1:0", SocketAddr::from(([127, 0, 0, 1], port))).await;
    let v6 = who_am_i("[::1]:0", format!("[::1]:{port}").parse().unwrap()).await;
    assert!(v4.seen.is_ipv4() && v6.seen.is_ipv6());
    let (p4, p6) = (v4.proof.expect("a proof"), v6.proof.expect("a proof"));
    // A short request gets no proof (the reply would be larger than the request).
    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let short = whoami::request_with(*b"short-rq", PROOF);
    sock.send_to(&short[..whoami::REQUEST_LEN], ("127.0.0.1", port)).await.unwrap();
    let mut buf = [0u8; 512];
    let (n, _) = tokio::time::timeout(Duration::from_secs(5), sock.recv_from(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert!(whoami::Reply::parse(&buf[..n], PROOF).is_err(), "not the reply with a proof");
    assert_eq!(whoami::Reply::parse_answer(&buf[..n], PROOF).unwrap().proof, None);

    // Logged in over IPv4: the server sees 127.0.0.1 (not ::ffff:127.0.0.1).
    let (_d, home) = common::home();
    let conn = {
        let a = addr("alice@example.com");
        let opts = ConnectOptions { server: Some(format!("127.0.0.1:{port}")), ..srv.opts() };
        q2q::client::register(&home, &a, common::PW, None, false, &opts).await.unwrap();
        let id = std::sync::Arc::new(home.identity(&a).unwrap());
        let opts = ConnectOptions { login: Some(id), ..opts };
        q2q::client::ServerConn::connect(&home, &a.domain, &opts).await.unwrap()
    };
    assert_eq!(conn.who_am_i().await.unwrap().ip(), v4.seen.ip());
    conn.call(&AlsoSeen { address: v6.seen.ip(), proof: p6 }).await.expect("a valid proof");
    let mut bent = p6;
    bent[3] ^= 0x40;
    let e = conn.call(&AlsoSeen { address: v6.seen.ip(), proof: bent }).await.unwrap_err();
    assert_eq!(e.error_code(), Some(&ErrorCode::BadRequest), "{e}");
    let e = conn.call(&AlsoSeen { address: v4.seen.ip(), proof: p4 }).await.unwrap_err();
    assert_eq!(e.error_code(), Some(&ErrorCode::BadRequest), "same family: {e}");
    let e = conn.call(&AlsoSeen { address: "::2".parse().unwrap(), proof: p6 }).await.unwrap_err();
    assert_eq!(e.error_code(), Some(&ErrorCode::BadRequest), "another IP: {e}");
}

/// Bob sends 256 KiB through alice's echo service and checks what comes back.
async fn echo(bob: &q2q::presence::node::Node) {
    let conn = bob
        .connect(&addr("alice@example.com"), &q2q::address::ServiceName::parse("echo").unwrap())
        .await
        .unwrap();
    let (mut r, mut w) = tokio::io::split(conn.stream);
    let data: Vec<u8> = (0..256 << 10).map(|i| (i * 13 % 251) as u8).collect();
    let sent = data.clone();
    let writer = tokio::spawn(async move {
        w.write_all(&sent).await.unwrap();
        w.shutdown().await.unwrap();
    });
    let mut back = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), r.read_to_end(&mut back)).await.unwrap().unwrap();
    writer.await.unwrap();
    assert!(back == data, "echoed data differs");
}

fn path_of(n: &q2q::presence::node::Node) -> Option<PathKind> {
    n.status().first().map(|s| s.path.clone())
}

#[tokio::test]
async fn both_families_work_and_ipv6_wins() {
    // The server on IPv4 loopback; the nodes' dual-stack sockets have host candidates
    // 127.0.0.1 and ::1 (loopback allowed): both families answer probes, IPv6 is taken.
    let srv = TestServer::start("example.com", config("127.0.0.1:0")).await;
    let (_d, home) = common::home();
    let alice = node(&srv, &home, "alice@example.com", NodeConfig::default()).await;
    let bob = node(&srv, &home, "bob@example.com", NodeConfig::default()).await;
    assert!(alice.local_addr().is_ipv6(), "dual-stack by default: {}", alice.local_addr());
    serve_echo(&alice, &["bob@example.com"]).await;
    echo(&bob).await;
    let v6 = |n: &q2q::presence::node::Node| matches!(path_of(n), Some(PathKind::Direct(a)) if a.is_ipv6() && a.ip().is_loopback());
    let both =
        common::eventually(Duration::from_secs(15), || async { v6(&alice) && v6(&bob) }).await;
    assert!(both, "alice {:?}, bob {:?}", alice.status(), bob.status());
    echo(&bob).await;
}

#[tokio::test]
async fn an_ipv6_only_server_direct_and_relayed() {
    let srv = TestServer::start("example.com", config("[::1]:0")).await;
    let server = srv.addr();
    assert!(server.starts_with("[::1]:"), "{server}");
    let (_d, home) = common::home();
    let alice = node(&srv, &home, "alice@example.com", NodeConfig::default()).await;
    let bob = node(&srv, &home, "bob@example.com", NodeConfig::default()).await;
    assert!(alice.reflexive().await.is_some_and(|r| r.is_ipv6()));
    serve_echo(&alice, &["bob@example.com"]).await;
    echo(&bob).await;
    assert!(
        matches!(path_of(&bob), Some(PathKind::Direct(a)) if a.is_ipv6()),
        "{:?}",
        bob.status()
    );

    let relayed = NodeConfig { direct: false, ..Default::default() };
    let carol = node(&srv, &home, "carol@example.com", relayed.clone()).await;
    let dave = node(&srv, &home, "dave@example.com", relayed).await;
    let echo_svc = serve_echo(&carol, &["dave@example.com"]).await;
    let conn = dave.connect(&addr("carol@example.com"), &echo_svc).await.unwrap();
    let (mut r, mut w) = tokio::io::split(conn.stream);
    w.write_all(b"over the relay, in IPv6").await.unwrap();
    w.shutdown().await.unwrap();
    let mut back = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), r.read_to_end(&mut back)).await.unwrap().unwrap();
    assert_eq!(back, b"over the relay, in IPv6");
    let relay: SocketAddr = server.parse().unwrap();
    assert_eq!(path_of(&dave), Some(PathKind::UdpRelay(relay)), "{:?}", dave.status());
}
