//! Presence on loopback at the control-protocol level: login by certificate, listen,
//! inbound with consent and candidates, relay over UDP and over TCP, federation.

mod common;

use common::{TestServer, addr, loopback_config};
use q2q::amp::AmpBox;
use q2q::client::{self, ConnectOptions, ServerConn};
use q2q::proto::code;
use q2q::relay::{Key, Leg};
use q2q::server::Registration;
use std::sync::Arc;

use common::{PW, login};

/// The relay leg an `inbound` box grants.
fn leg(b: &AmpBox) -> Leg {
    let token: [u8; 16] =
        hex::decode(b.get_str("relay_token").unwrap()).unwrap().try_into().unwrap();
    Leg::new(token, Key::from_hex(b.get_str("relay_key").unwrap()).unwrap())
}

fn sealed(leg: &Leg, inner: &[u8]) -> Vec<u8> {
    let mut d = Vec::new();
    leg.seal_into(&mut d, inner);
    d
}

/// Alice logged in and listening for "echo", the inbound requests she gets, and bob.
async fn alice_listening(
    srv: &TestServer,
    home: &q2q::client::Home,
) -> (ServerConn, ServerConn, tokio::sync::mpsc::Receiver<q2q::amp::peer::Incoming>) {
    let mut alice = login(srv, home, "alice@example.com").await;
    let bob = login(srv, home, "bob@example.com").await;
    alice.call_box(AmpBox::command("listen").with("service", "echo")).await.unwrap();
    let incoming = alice.incoming.take().unwrap();
    (alice, bob, incoming)
}

#[tokio::test]
async fn inbound_exchange_consent_and_relay() {
    let srv = TestServer::start("example.com", loopback_config(Registration::Open)).await;
    let (_d, home) = common::home();
    let mut alice = login(&srv, &home, "alice@example.com").await;
    let bob = login(&srv, &home, "bob@example.com").await;

    // Not logged in: refused with a reason.
    let anon =
        ServerConn::connect(&home, &addr("x@example.com").domain, &srv.opts()).await.unwrap();
    let err = anon.call_box(AmpBox::command("listen").with("service", "echo")).await.unwrap_err();
    assert_eq!(err.code(), Some(code::NOT_LOGGED_IN));

    alice
        .call_box(AmpBox::command("listen").with("service", "echo").with("description", "echo"))
        .await
        .unwrap();
    // Alice's side answers inbound: bob is authorized, carol is not.
    let mut incoming = alice.incoming.take().unwrap();
    let alice_side = tokio::spawn(async move {
        let mut seen = Vec::new();
        while let Some(req) = incoming.recv().await {
            let from = req.request.get_str("from").unwrap_or("").to_string();
            if from == "bob@example.com" {
                seen.push(req.request.clone());
                req.respond(Ok(AmpBox::new().with("candidates", "127.0.0.1:9,192.168.1.2:4000")))
                    .await;
            } else {
                let e = q2q::amp::ErrorBox {
                    code: code::NOT_AUTHORIZED.into(),
                    description: format!("{from} is not authorized"),
                };
                req.respond(Err(e)).await;
            }
            if seen.len() == 1 {
                return seen;
            }
        }
        seen
    });

    let ask = |to: &str, service: &str| {
        AmpBox::command("inbound")
            .with("to", to)
            .with("service", service)
            .with("candidates", "127.0.0.1:5555")
    };
    let err = bob.call_box(ask("nobody@example.com", "echo")).await.unwrap_err();
    assert_eq!(
        (err.code(), err.to_string().as_str()),
        (Some(code::OFFLINE), "nobody@example.com is offline")
    );
    let err = bob.call_box(ask("alice@example.com", "tcp/22")).await.unwrap_err();
    assert_eq!(err.to_string(), "alice@example.com does not offer service tcp/22");
    let err = bob.call_box(ask("alice@other.example", "echo")).await.unwrap_err();
    assert_eq!(err.code(), Some(code::WRONG_DOMAIN));

    let carol = login(&srv, &home, "carol@example.com").await;
    let err = carol.call_box(ask("alice@example.com", "echo")).await.unwrap_err();
    assert_eq!(err.code(), Some(code::NOT_AUTHORIZED), "{err}");

    let answer = bob.call_box(ask("alice@example.com", "echo")).await.unwrap();
    assert_eq!(answer.get_str("peer"), Some("alice@example.com"));
    assert_eq!(answer.get_str("candidates"), Some("127.0.0.1:9,192.168.1.2:4000"));
    assert_eq!(answer.get_str("session").unwrap().len(), 16);
    assert_eq!(answer.get_str("probe_key").unwrap().len(), 32);
    let asked = alice_side.await.unwrap().pop().unwrap();
    let (bob_leg, alice_leg) = (leg(&answer), leg(&asked));
    assert_ne!(bob_leg.token(), alice_leg.token());
    assert_ne!(answer.get_str("relay_key"), asked.get_str("relay_key"));
    // Each side learns where the server sees the other from.
    assert_eq!(answer.get_str("peer_seen"), Some("127.0.0.1"));
    assert_eq!(asked.get_str("peer_seen"), Some("127.0.0.1"));

    // Relay over UDP: each side binds, then datagrams cross, sealed for the other's leg.
    let relay = srv.running.as_ref().unwrap().udp_addr;
    let a_sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let b_sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    a_sock.send_to(&alice_leg.bind(), relay).await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    b_sock.send_to(&sealed(&bob_leg, b"hello alice"), relay).await.unwrap();
    let mut buf = [0u8; 1500];
    let (n, from) =
        tokio::time::timeout(std::time::Duration::from_secs(5), a_sock.recv_from(&mut buf))
            .await
            .unwrap()
            .unwrap();
    assert_eq!(from, relay);
    assert_eq!(alice_leg.open(&buf[..n]), Ok(b"hello alice".to_vec()));
    // A forged token goes nowhere; nor does alice's token without alice's key, nor one of
    // alice's datagrams replayed from elsewhere (which would otherwise steal her leg).
    let stranger = Leg::new([0; 16], Key::random());
    b_sock.send_to(&sealed(&stranger, b"forged"), relay).await.unwrap();
    let forger = Leg::new(*alice_leg.token(), Key::random());
    b_sock.send_to(&sealed(&forger, b"forged"), relay).await.unwrap();
    let captured = sealed(&alice_leg, b"hello bob");
    let evil = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    // Back the other way.
    a_sock.send_to(&captured, relay).await.unwrap();
    let (n, _) =
        tokio::time::timeout(std::time::Duration::from_secs(5), b_sock.recv_from(&mut buf))
            .await
            .unwrap()
            .unwrap();
    assert_eq!(bob_leg.open(&buf[..n]), Ok(b"hello bob".to_vec()));
    evil.send_to(&captured, relay).await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    // Alice's leg stayed with alice: bob's next datagram reaches her, not the thief.
    b_sock.send_to(&sealed(&bob_leg, b"still yours"), relay).await.unwrap();
    let (n, _) =
        tokio::time::timeout(std::time::Duration::from_secs(5), a_sock.recv_from(&mut buf))
            .await
            .unwrap()
            .unwrap();
    assert_eq!(alice_leg.open(&buf[..n]), Ok(b"still yours".to_vec()));
    let mut evil_buf = [0u8; 1500];
    assert!(
        tokio::time::timeout(std::time::Duration::from_millis(200), evil.recv_from(&mut evil_buf))
            .await
            .is_err()
    );
    // Nothing else reached alice (the forgeries, the replay).
    assert!(
        tokio::time::timeout(std::time::Duration::from_millis(200), a_sock.recv_from(&mut buf))
            .await
            .is_err()
    );
    let stats = srv.running.as_ref().unwrap().stats();
    assert_eq!(stats.relay_refused, 3);
}

#[tokio::test]
async fn relay_over_tcp_when_udp_is_blocked() {
    let srv = TestServer::start("example.com", loopback_config(Registration::Open)).await;
    let (_d, home) = common::home();
    let (_alice, bob, mut incoming) = alice_listening(&srv, &home).await;
    let req = tokio::spawn(async move {
        let req = incoming.recv().await.unwrap();
        let token = req.request.get_str("relay_token").unwrap().to_string();
        req.respond(Ok(AmpBox::new().with("candidates", ""))).await;
        // Then the relayed datagram arrives on the control connection.
        let relayed = incoming.recv().await.unwrap();
        (token, relayed.request.clone())
    });
    let answer = bob
        .call_box(
            AmpBox::command("inbound").with("to", "alice@example.com").with("service", "echo"),
        )
        .await
        .unwrap();
    let bob_token = answer.get_str("relay_token").unwrap().to_string();
    // Another logged-in connection that learnt bob's token cannot inject with it.
    let carol = login(&srv, &home, "carol@example.com").await;
    carol
        .tell_box(AmpBox::command("relay").with("token", &bob_token).with("data", "injected"))
        .await
        .unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    bob.tell_box(AmpBox::command("relay").with("token", &bob_token).with("data", "over tcp"))
        .await
        .unwrap();
    let (alice_token, relayed) =
        tokio::time::timeout(std::time::Duration::from_secs(5), req).await.unwrap().unwrap();
    assert_eq!(relayed.get_str("token"), Some(alice_token.as_str()));
    assert_eq!(relayed.get_str("data"), Some("over tcp"));
}

/// A fast sender's burst on one leg: the server's socket hands it over in one go (a GSO
/// sender on loopback arrives as 64 KiB GRO buffers, up to 32 of them per recvmmsg), more
/// than the leg's queue holds (256 KiB). The server must forward as it reads, not drop
/// what does not fit: it dropped a third of a session's datagrams in the lab before.
#[tokio::test]
async fn a_burst_on_one_leg_is_relayed_not_dropped() {
    let srv = TestServer::start("example.com", loopback_config(Registration::Open)).await;
    let (_d, home) = common::home();
    let (_alice, bob, mut incoming) = alice_listening(&srv, &home).await;
    let asked = tokio::spawn(async move {
        let req = incoming.recv().await.unwrap();
        let asked = req.request.clone();
        req.respond(Ok(AmpBox::new().with("candidates", ""))).await;
        asked
    });
    let answer = bob
        .call_box(
            AmpBox::command("inbound").with("to", "alice@example.com").with("service", "echo"),
        )
        .await
        .unwrap();
    let (bob_leg, alice_leg) = (leg(&answer), leg(&asked.await.unwrap()));
    let relay = srv.running.as_ref().unwrap().udp_addr;
    let a_sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    a_sock.send_to(&alice_leg.bind(), relay).await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;

    // 3 MiB in GSO batches of 48 datagrams of 1300 bytes, as fast as the socket takes them.
    const LEN: usize = 1300;
    const PER_BATCH: usize = 48;
    const BATCHES: usize = 48;
    let b_std = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    b_std.set_nonblocking(true).unwrap();
    let b_sock = tokio::net::UdpSocket::from_std(b_std).unwrap();
    let state = quinn_udp::UdpSocketState::new((&b_sock).into()).unwrap();
    assert!(state.max_gso_segments() >= PER_BATCH, "GSO on loopback");
    let reader = tokio::spawn(async move {
        let mut buf = vec![0u8; 2048];
        let mut got = 0usize;
        while let Ok(Ok((n, _))) =
            tokio::time::timeout(std::time::Duration::from_millis(500), a_sock.recv_from(&mut buf))
                .await
        {
            got += usize::from(n > 0);
        }
        got
    });
    for _ in 0..BATCHES {
        let mut batch = Vec::with_capacity(PER_BATCH * (LEN + 64));
        for i in 0..PER_BATCH {
            bob_leg.seal_into(&mut batch, &[i as u8; LEN]);
        }
        let seg = batch.len() / PER_BATCH;
        let t = quinn_udp::Transmit {
            destination: relay,
            ecn: None,
            contents: &batch,
            segment_size: Some(seg),
            src_ip: None,
        };
        b_sock
            .async_io(tokio::io::Interest::WRITABLE, || state.try_send((&b_sock).into(), &t))
            .await
            .unwrap();
    }
    let got = reader.await.unwrap();
    let stats = srv.running.as_ref().unwrap().stats();
    let sent = PER_BATCH * BATCHES;
    eprintln!(
        "relayed {} bytes, dropped {}; alice's socket kept {got} of {sent} datagrams",
        stats.relayed_bytes, stats.relay_dropped
    );
    assert_eq!(stats.relay_dropped, 0, "the relay dropped datagrams of a burst it could forward");
    // Everything went on to alice's address (whether her small socket buffer kept it all is
    // the kernel's business, not the relay's).
    assert!(stats.relayed_bytes >= (sent * LEN) as u64, "relayed {}", stats.relayed_bytes);
    assert!(got > 0);
}

#[tokio::test]
async fn presence_ends_with_the_connection() {
    let srv = TestServer::start("example.com", loopback_config(Registration::Open)).await;
    let (_d, home) = common::home();
    let alice = login(&srv, &home, "alice@example.com").await;
    let bob = login(&srv, &home, "bob@example.com").await;
    alice.call_box(AmpBox::command("listen").with("service", "echo")).await.unwrap();
    drop(alice);
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let err = bob
        .call_box(
            AmpBox::command("inbound").with("to", "alice@example.com").with("service", "echo"),
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(code::OFFLINE));
}

#[tokio::test]
async fn federation_caller_from_another_domain() {
    let a = TestServer::start("a.example", loopback_config(Registration::Open)).await;
    let b = TestServer::start("b.example", loopback_config(Registration::Open)).await;
    // b.example learns where a.example's server is from its federation config.
    let fed = b.data_dir().join("federation");
    std::fs::create_dir_all(&fed).unwrap();
    std::fs::write(
        fed.join("config.toml"),
        format!("[servers]\n\"a.example\" = \"{}\"\n", a.addr()),
    )
    .unwrap();

    let (_d, home) = common::home();
    let mut bob = login(&b, &home, "bob@b.example").await;
    bob.call_box(AmpBox::command("listen").with("service", "echo")).await.unwrap();
    let mut incoming = bob.incoming.take().unwrap();
    let callee = tokio::spawn(async move {
        let req = incoming.recv().await.unwrap();
        let from = req.request.get_str("from").unwrap().to_string();
        req.respond(Ok(AmpBox::new().with("candidates", ""))).await;
        from
    });

    // alice@a.example registers at home, then talks to b.example's server herself.
    let alice_addr = addr("alice@a.example");
    client::register(&home, &alice_addr, PW, None, false, &a.opts()).await.unwrap();
    let id = Arc::new(home.identity(&alice_addr).unwrap());
    let opts = ConnectOptions { login: Some(id), ..b.opts() };
    let alice = ServerConn::connect(&home, &addr("bob@b.example").domain, &opts).await.unwrap();
    let answer = alice
        .call_box(AmpBox::command("inbound").with("to", "bob@b.example").with("service", "echo"))
        .await
        .unwrap();
    assert_eq!(answer.get_str("peer"), Some("bob@b.example"));
    assert_eq!(callee.await.unwrap(), "alice@a.example");
    assert!(fed.join("known_cas/a.example.pem").exists(), "a.example's CA is pinned by b.example");

    // A certificate from a CA that is not a.example's (a rogue server for a.example) fails.
    let rogue = TestServer::start("a.example", loopback_config(Registration::Open)).await;
    let (_d2, home2) = common::home();
    let mallory = addr("alice@a.example");
    client::register(&home2, &mallory, PW, None, false, &rogue.opts()).await.unwrap();
    let id = Arc::new(home2.identity(&mallory).unwrap());
    let opts = ConnectOptions { login: Some(id), ..b.opts() };
    let fake = ServerConn::connect(&home2, &addr("bob@b.example").domain, &opts).await.unwrap();
    let err = fake
        .call_box(AmpBox::command("inbound").with("to", "bob@b.example").with("service", "echo"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(code::BAD_CERTIFICATE), "{err}");
    assert!(err.to_string().contains("not signed by a.example's CA"), "{err}");
}
