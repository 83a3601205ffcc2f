//! `q2q-tun netcheck` on loopback: against a server with its second UDP port (no NAT:
//! endpoint-independent mapping and filtering, "direct to most peers"), one with a second
//! address (127.0.0.2), one without either (mapping unknown), and one reached through a
//! TCP-only forwarder (UDP gets no answer: "relay only"). The NAT types themselves are
//! proven in the lab (tools/lab-netcheck).

mod common;

use common::{PW, TestServer, addr, home, loopback_config};
use q2q::client::{ConnectOptions, Home};
use q2q::daemon::netcheck::{self, Filtering, Mapping, Verdict};
use q2q::proto::whoami;
use q2q::server::{Registration, ServerConfig};
use std::time::Duration;

async fn registered(srv: &TestServer) -> (tempfile::TempDir, Home) {
    let (dir, h) = home();
    q2q::client::register(&h, &addr("alice@example.com"), PW, None, false, &srv.opts())
        .await
        .unwrap();
    (dir, h)
}

async fn check(h: &Home, server: Option<String>) -> netcheck::Report {
    let opts = netcheck::Options {
        identity: None,
        port_mapping: false,
        server: ConnectOptions { server, ..Default::default() },
    };
    tokio::time::timeout(Duration::from_secs(30), netcheck::check(h, &opts))
        .await
        .expect("netcheck ends in time")
        .expect("netcheck")
}

#[tokio::test]
async fn no_nat_is_direct_to_most_peers() {
    let srv = TestServer::start("example.com", loopback_config(Registration::Open)).await;
    let second = srv.running.as_ref().unwrap().second_udp_addr.expect("a second port by default");
    assert_ne!(second.port(), srv.running.as_ref().unwrap().udp_addr.port());
    let (_d, h) = registered(&srv).await;
    let r = check(&h, None).await;
    assert_eq!(r.observed.udp.len(), 1, "the server has one IPv4 address: {r:?}");
    let u = &r.observed.udp[0];
    assert!(u.reachable, "{r}");
    assert_eq!(u.second_port, Some(second.port()));
    assert_eq!(u.second_server, Some(second), "the second port, on the same address");
    let seen = u.reflexive.expect("a reflexive address");
    assert!(seen.ip().is_loopback(), "{seen}");
    assert_eq!(u.reflexive_second, Some(seen), "no NAT: one address for both ports");
    assert_eq!(u.mapping, Mapping::EndpointIndependent);
    assert_eq!(u.filtering, Filtering::EndpointIndependent, "nothing filters loopback");
    assert!(u.relay_rtt.is_some_and(|r| r.samples >= 1));
    assert!(r.observed.tcp.seen.ip().is_loopback());
    assert_eq!(r.verdict, Verdict::DirectToMost);
    let j = serde_json::to_value(&r).unwrap();
    assert_eq!(j["verdict"], "direct to most peers");
    assert_eq!(j["address"], "alice@example.com");
}

#[tokio::test]
async fn without_a_second_port_the_mapping_is_unknown() {
    let config = ServerConfig { second_udp_port: Some(0), ..loopback_config(Registration::Open) };
    let srv = TestServer::start("example.com", config).await;
    assert_eq!(srv.running.as_ref().unwrap().second_udp_addr, None);
    let (_d, h) = registered(&srv).await;
    let r = check(&h, None).await;
    let u = &r.observed.udp[0];
    assert!(u.reachable);
    assert_eq!(
        (u.second_port, u.mapping, u.filtering),
        (None, Mapping::Unknown, Filtering::Unknown)
    );
    assert_eq!(r.verdict, Verdict::Unknown);
}

/// With `second_udp_addr` the tests ask the server's second address (RFC 5780's way).
#[tokio::test]
async fn a_second_address_is_asked_when_the_server_has_one() {
    let config = ServerConfig {
        second_udp_addr: Some("127.0.0.2:0".parse().unwrap()),
        ..loopback_config(Registration::Open)
    };
    let srv = TestServer::start("example.com", config).await;
    let second = srv.running.as_ref().unwrap().second_udp_addr.expect("bound");
    assert_eq!(second.ip().to_string(), "127.0.0.2");
    let (_d, h) = registered(&srv).await;
    let r = check(&h, None).await;
    let u = &r.observed.udp[0];
    assert_eq!(u.second_server, Some(second), "{r}");
    assert_eq!(u.reflexive_second, u.reflexive, "no NAT: one address for both");
    assert_eq!(
        (u.mapping, u.filtering),
        (Mapping::EndpointIndependent, Filtering::EndpointIndependent)
    );
    assert!(r.to_string().contains("second address, 127.0.0.2:"), "{r}");
}

/// The server answers from its second port when asked, and only then; the second port
/// answers who-am-i itself.
#[tokio::test]
async fn the_server_answers_from_its_second_port_when_asked() {
    let srv = TestServer::start("example.com", loopback_config(Registration::Open)).await;
    let running = srv.running.as_ref().unwrap();
    let (main, second) = (running.udp_addr, running.second_udp_addr.unwrap());
    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut buf = [0u8; 512];
    // Every combination of flags, to either socket: the reply carries exactly the fields
    // asked for, in their order, from the socket asked (or the second one when asked).
    for (b, to) in (0..16u8).flat_map(|b| [(b, main), (b, second)]) {
        let flags = whoami::Flags::from_byte(b);
        let from = if flags.reply_from_second { second } else { to };
        sock.send_to(&whoami::request_with(*b"nonce-12", flags), to).await.unwrap();
        let (n, got_from) = tokio::time::timeout(Duration::from_secs(5), sock.recv_from(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got_from, from, "{flags:?}");
        let r = whoami::Reply::parse(&buf[..n], flags).unwrap();
        assert_eq!((r.nonce, r.seen), (*b"nonce-12", sock.local_addr().unwrap()));
        assert_eq!(r.second_port, flags.second_port.then_some(second.port()));
        // The second socket is bound to 127.0.0.1, not a wildcard: its address is told.
        assert_eq!(r.second_addr, flags.second_addr.then_some(Some(second)), "{flags:?}");
        assert_eq!(r.proof.is_some(), flags.proof, "{flags:?}");
    }
}

/// Through a forwarder that carries TCP only, UDP to the same address gets no answer.
#[tokio::test]
async fn no_udp_is_relay_only() {
    let srv = TestServer::start("example.com", loopback_config(Registration::Open)).await;
    let (_d, h) = registered(&srv).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let forwarder = listener.local_addr().unwrap();
    let target = srv.addr();
    let task = tokio::spawn(async move {
        while let Ok((mut inside, _)) = listener.accept().await {
            let target = target.clone();
            tokio::spawn(async move {
                if let Ok(mut out) = tokio::net::TcpStream::connect(target).await {
                    let _ = tokio::io::copy_bidirectional(&mut inside, &mut out).await;
                }
            });
        }
    });
    let r = check(&h, Some(forwarder.to_string())).await;
    task.abort();
    assert_eq!(r.observed.tcp.server, forwarder.to_string());
    let u = &r.observed.udp[0];
    assert!(!u.reachable, "{r}");
    assert_eq!(u.reflexive, None);
    assert_eq!(r.verdict, Verdict::RelayOnly);
    assert!(r.to_string().contains("blocked"), "{r}");
}
