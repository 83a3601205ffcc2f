//! Loopback integration tests of the identity server and its client.

mod common;

use common::{TestServer, addr, loopback_config};
use q2q::amp::AmpBox;
use q2q::client::{self, ClientError, ConnectOptions, ServerConn};
use q2q::identity::{self, Fingerprint, verify_identity};
use q2q::proto::code;
use q2q::server::{DataDir, Registration, ServerConfig};
use rustls::pki_types::UnixTime;

const PW: &str = "correct horse battery";

#[tokio::test]
async fn register_survives_restart() {
    let mut srv = TestServer::start("example.com", loopback_config(Registration::Open)).await;
    let (_d, home) = common::home();
    let alice = addr("alice@example.com");
    let r = client::register(&home, &alice, PW, None, false, &srv.opts()).await.unwrap();
    assert!(r.newly_pinned);
    assert_eq!(r.info.address.as_ref(), Some(&alice));

    srv.restart().await;

    // Alice's certificate still verifies against the (same) CA, and her address is taken.
    let stored = home.identity(&alice).unwrap();
    let der = identity::cert_from_pem(&stored.cert_pem).unwrap();
    let ca = DataDir::open(&srv.data_dir()).unwrap().ca;
    verify_identity(&der, ca.cert_der(), &alice, UnixTime::now()).unwrap();
    let (_d2, other_home) = common::home();
    let err = client::register(&other_home, &alice, "another password", None, false, &srv.opts())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(code::ADDRESS_TAKEN), "{err}");
    assert_eq!(err.to_string(), "alice@example.com is taken");
    // The pinned CA still matches after the restart (no CA regeneration).
    let again = client::register(&home, &alice, PW, None, true, &srv.opts()).await.unwrap();
    assert!(!again.newly_pinned);
    let certs =
        q2q::server::admin::list_certificates(&srv.data_dir(), Some("alice")).await.unwrap();
    assert_eq!(certs.len(), 2);
    assert_ne!(certs[0].serial, certs[1].serial);
}

#[tokio::test]
async fn bob_cannot_get_alices_certificate() {
    let srv = TestServer::start("example.com", loopback_config(Registration::Open)).await;
    let (_d, home) = common::home();
    let alice = addr("alice@example.com");
    let bob = addr("bob@example.com");
    client::register(&home, &alice, PW, None, false, &srv.opts()).await.unwrap();
    client::register(&home, &bob, "bobs own password", None, false, &srv.opts()).await.unwrap();

    let conn = ServerConn::connect(&home, &alice.domain, &srv.opts()).await.unwrap();
    let key = identity::generate_key().unwrap();
    // A request that names alice, signed with bob's password: refused.
    let mut params = rcgen::CertificateParams::new(vec![]).unwrap();
    params.distinguished_name.push(rcgen::DnType::CommonName, "alice@example.com");
    let csr = params.serialize_request(&key).unwrap().pem().unwrap();
    let err = conn.sign(&alice, "bobs own password", &csr).await.unwrap_err();
    assert_eq!(err.code(), Some(code::WRONG_PASSWORD));
    // The same request with bob's own credentials: the certificate says bob, not alice.
    let pem = conn.sign(&bob, "bobs own password", &csr).await.unwrap();
    let info = identity::CertInfo::parse(&identity::cert_from_pem(&pem).unwrap()).unwrap();
    assert_eq!(info.address, Some(bob));
}

#[tokio::test]
async fn wrong_password_is_refused_and_guessing_slowed() {
    let mut config = loopback_config(Registration::Open);
    config.rate_limit.base_delay_ms = 60_000;
    let srv = TestServer::start("example.com", config).await;
    let (_d, home) = common::home();
    let alice = addr("alice@example.com");
    client::register(&home, &alice, PW, None, false, &srv.opts()).await.unwrap();
    let conn = ServerConn::connect(&home, &alice.domain, &srv.opts()).await.unwrap();
    let csr = identity::signing_request(&identity::generate_key().unwrap()).unwrap();
    for guess in ["guess one!", "guess two!", "guess three!"] {
        let err = conn.sign(&alice, guess, &csr).await.unwrap_err();
        assert_eq!(err.code(), Some(code::WRONG_PASSWORD));
        assert_eq!(err.to_string(), "alice@example.com: no such user or wrong password");
    }
    // Now every attempt waits, even one with the right password.
    let err = conn.sign(&alice, "guess four!", &csr).await.unwrap_err();
    assert_eq!(err.code(), Some(code::RATE_LIMITED), "{err}");
    assert!(err.to_string().contains("try again in 60 s"), "{err}");
    let err = conn.sign(&alice, PW, &csr).await.unwrap_err();
    assert_eq!(err.code(), Some(code::RATE_LIMITED));
    // The same source guessing at another account is slowed as well.
    let err = conn.sign(&addr("bob@example.com"), "x", &csr).await.unwrap_err();
    assert_eq!(err.code(), Some(code::RATE_LIMITED));
}

#[tokio::test]
async fn hundred_concurrent_registrations_are_consistent() {
    // All from 127.0.0.1: lift the per-address limits (tests/server_hardening.rs has them).
    let config = ServerConfig {
        max_connections_per_address: 1000,
        registration_limit: q2q::server::config::RegistrationLimit {
            per_address_burst: 1000,
            overall_burst: 1000,
            ..Default::default()
        },
        ..loopback_config(Registration::Open)
    };
    let srv = TestServer::start("example.com", config).await;
    let opts = srv.opts();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..100 {
        let opts = opts.clone();
        tasks.spawn(async move {
            let (d, home) = common::home();
            let a = addr(&format!("user{i}@example.com"));
            let r = client::register(&home, &a, PW, None, false, &opts).await;
            drop(d);
            r.map(|r| r.info.serial)
        });
    }
    // Two more racing for the same name: exactly one wins.
    for _ in 0..2 {
        let opts = opts.clone();
        tasks.spawn(async move {
            let (_d, home) = common::home();
            client::register(&home, &addr("contested@example.com"), PW, None, false, &opts)
                .await
                .map(|r| r.info.serial)
        });
    }
    let mut serials = std::collections::HashSet::new();
    let mut taken = 0;
    while let Some(r) = tasks.join_next().await {
        match r.unwrap() {
            Ok(serial) => assert!(serials.insert(serial)),
            Err(e) if e.code() == Some(code::ADDRESS_TAKEN) => taken += 1,
            Err(e) => panic!("registration failed: {e}"),
        }
    }
    assert_eq!((serials.len(), taken), (101, 1));
    let (_, users) = q2q::server::admin::list_users(&srv.data_dir()).await.unwrap();
    assert_eq!(users.len(), 101);
    assert!(users.iter().all(|u| u.certificates == 1));
    let certs = q2q::server::admin::list_certificates(&srv.data_dir(), None).await.unwrap();
    assert_eq!(certs.len(), 101);
}

#[tokio::test]
async fn unknown_command_and_version_get_error_boxes_and_connection_survives() {
    let srv = TestServer::start("example.com", loopback_config(Registration::Open)).await;
    let (_d, home) = common::home();
    let domain = addr("x@example.com").domain;
    let conn = ServerConn::connect(&home, &domain, &srv.opts()).await.unwrap();
    let err = conn.call_box(AmpBox::command("no-such-command").with("x", "1")).await.unwrap_err();
    assert_eq!(err.code(), Some(code::UNHANDLED));
    assert_eq!(err.to_string(), "unknown command `no-such-command`");
    let err = conn.call_box(AmpBox::command("hello").with("version", "99")).await.unwrap_err();
    assert_eq!(err.code(), Some(code::UNSUPPORTED_VERSION));
    assert!(err.to_string().contains("version 1, not 99"), "{err}");
    let err =
        conn.call_box(AmpBox::command("identify").with("subject", "../../etc")).await.unwrap_err();
    assert_eq!(err.code(), Some(code::BAD_REQUEST));
    let err = conn
        .call_box(AmpBox::command("identify").with("subject", "other.example"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(code::WRONG_DOMAIN));
    // Still usable.
    let seen = conn.who_am_i().await.unwrap();
    assert!(seen.ip().is_loopback());
    assert_eq!(
        Fingerprint::of(&conn.identify(&addr("x@example.com").domain).await.unwrap()),
        Fingerprint::of(&conn.ca)
    );
}

#[tokio::test]
async fn who_am_i_over_udp() {
    let srv = TestServer::start("example.com", loopback_config(Registration::Open)).await;
    let udp_addr = srv.running.as_ref().unwrap().udp_addr;
    assert_eq!(udp_addr.port(), srv.running.as_ref().unwrap().tcp_addr.port());
    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let seen = client::udp_who_am_i(&sock, udp_addr).await.unwrap();
    assert_eq!(seen, sock.local_addr().unwrap());
    // Garbage and unknown kinds are dropped; the server still answers afterwards.
    for junk in [&b""[..], b"\x01", b"\x09\x10abcdefgh", b"\x01\xee", b"\x01\x10short"] {
        sock.send_to(junk, udp_addr).await.unwrap();
    }
    assert_eq!(client::udp_who_am_i(&sock, udp_addr).await.unwrap(), seen);
}

#[tokio::test]
async fn changed_ca_stops_the_client_until_accepted_deliberately() {
    let srv1 = TestServer::start("example.com", loopback_config(Registration::Open)).await;
    let (_d, home) = common::home();
    let domain = addr("x@example.com").domain;
    let first = ServerConn::connect(&home, &domain, &srv1.opts()).await.unwrap();
    assert!(first.newly_pinned);
    let old = Fingerprint::of(&first.ca);

    // Another server claiming the same domain with another CA.
    let srv2 = TestServer::start("example.com", loopback_config(Registration::Open)).await;
    let err = ServerConn::connect(&home, &domain, &srv2.opts()).await.err().unwrap();
    let new = DataDir::open(&srv2.data_dir()).unwrap().ca.fingerprint();
    match &err {
        ClientError::CaChanged { pinned, presented, .. } => {
            assert_eq!((*pinned, *presented), (old, new))
        }
        other => panic!("expected CaChanged, got {other}"),
    }
    let msg = err.to_string();
    assert!(
        msg.contains(&old.to_string())
            && msg.contains(&new.to_string())
            && msg.contains("--ca-fingerprint")
    );

    // A wrong fingerprint up front is refused; the right one is accepted and re-pins.
    let wrong =
        ConnectOptions { server: Some(srv2.addr()), ca_fingerprint: Some(old), login: None };
    assert!(matches!(
        ServerConn::connect(&home, &domain, &wrong).await.err().unwrap(),
        ClientError::CaNotExpected { .. }
    ));
    let right =
        ConnectOptions { server: Some(srv2.addr()), ca_fingerprint: Some(new), login: None };
    assert!(ServerConn::connect(&home, &domain, &right).await.unwrap().newly_pinned);
    assert!(!ServerConn::connect(&home, &domain, &srv2.opts()).await.unwrap().newly_pinned);
    assert!(ServerConn::connect(&home, &domain, &srv1.opts()).await.is_err());
}

#[tokio::test]
async fn registration_policies() {
    let closed = TestServer::start("example.com", loopback_config(Registration::Closed)).await;
    let (_d, home) = common::home();
    let alice = addr("alice@example.com");
    let err = client::register(&home, &alice, PW, None, false, &closed.opts()).await.unwrap_err();
    assert_eq!(err.code(), Some(code::REGISTRATION_CLOSED));
    // The admin adds her; then she gets a certificate with --existing.
    q2q::server::admin::add_user(&closed.data_dir(), "alice", PW.into()).await.unwrap();
    client::register(&home, &alice, PW, None, true, &closed.opts()).await.unwrap();

    let invite = TestServer::start("example.com", loopback_config(Registration::Invite)).await;
    let (_d2, home2) = common::home();
    let err = client::register(&home2, &alice, PW, None, false, &invite.opts()).await.unwrap_err();
    assert_eq!(err.code(), Some(code::BAD_INVITE));
    let err = client::register(&home2, &alice, PW, Some("bogus"), false, &invite.opts())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(code::BAD_INVITE));
    let code_ = q2q::server::admin::create_invite(&invite.data_dir()).await.unwrap();
    client::register(&home2, &alice, PW, Some(&code_), false, &invite.opts()).await.unwrap();
    let err =
        client::register(&home2, &addr("bob@example.com"), PW, Some(&code_), false, &invite.opts())
            .await
            .unwrap_err();
    assert_eq!(err.code(), Some(code::BAD_INVITE), "an invite registers one address only");

    // Short passwords and foreign domains are refused with a reason.
    let open =
        TestServer::start("example.com", ServerConfig { ..loopback_config(Registration::Open) })
            .await;
    let (_d3, home3) = common::home();
    let err =
        client::register(&home3, &addr("carol@example.com"), "short", None, false, &open.opts())
            .await
            .unwrap_err();
    assert!(err.to_string().contains("at least") || err.to_string().contains("8 to"), "{err}");
    let err = client::register(&home3, &addr("carol@other.example"), PW, None, false, &open.opts())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("other.example"), "{err}");
}

#[tokio::test]
async fn unreachable_server_names_what_was_tried() {
    let (_d, home) = common::home();
    let sock = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = sock.local_addr().unwrap().port();
    drop(sock);
    let opts = ConnectOptions {
        server: Some(format!("127.0.0.1:{port}")),
        ca_fingerprint: None,
        login: None,
    };
    let err = ServerConn::connect(&home, &addr("a@example.com").domain, &opts).await.err().unwrap();
    let msg = err.to_string();
    assert!(msg.starts_with("example.com's server is unreachable (tried 127.0.0.1:"), "{msg}");
}
