//! Certificate renewal on loopback: a node renews at two thirds of a short lifetime, with
//! its key and no password; the new certificate is on disk beside the unchanged key and
//! in use for new log-ins and new streams after the first one expired. The server renews
//! only for a certificate log-in, only the logged-in key's own, unrevoked certificate of an
//! account that exists, a few times per lifetime.

mod common;

use common::{TestServer, addr, loopback_config, node, serve_echo};
use q2q::client::{ConnectOptions, Home, ServerConn};
use q2q::identity::CertInfo;
use q2q::presence::node::NodeConfig;
use q2q::proto::code;
use q2q::server::config::Lifetime;
use q2q::server::{Registration, admin};
use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn unix_now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() as i64
}

fn on_disk(home: &Home, who: &str) -> (String, String, u32) {
    let dir = home.root().join("identities").join(who);
    let key = std::fs::read_to_string(dir.join("key.pem")).unwrap();
    let mode = std::fs::metadata(dir.join("key.pem")).unwrap().permissions().mode() & 0o777;
    (key, std::fs::read_to_string(dir.join("cert.pem")).unwrap(), mode)
}

fn info(pem: &str) -> CertInfo {
    CertInfo::parse(&q2q::identity::cert_from_pem(pem).unwrap()).unwrap()
}

async fn short_lived_server(lifetime: &str) -> TestServer {
    let config = q2q::server::ServerConfig {
        cert_lifetime: Some(Lifetime::parse(lifetime).unwrap()),
        ..loopback_config(Registration::Open)
    };
    TestServer::start("example.com", config).await
}

/// Bob opens a stream to alice's echo service and gets his bytes back.
async fn echo_once(bob: &q2q::presence::node::Node, echo: &q2q::address::ServiceName) {
    let conn = tokio::time::timeout(
        Duration::from_secs(20),
        bob.connect(&addr("alice@example.com"), echo),
    )
    .await
    .expect("connect in time")
    .expect("connect");
    let (mut r, mut w) = tokio::io::split(conn.stream);
    w.write_all(b"renewed?").await.unwrap();
    w.shutdown().await.unwrap();
    let mut back = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), r.read_to_end(&mut back)).await.unwrap().unwrap();
    assert_eq!(back, b"renewed?");
}

#[tokio::test]
async fn renews_at_two_thirds_and_the_new_certificate_is_used() {
    // 9 s: renewal 6 s after issue, then every 6 s.
    let srv = short_lived_server("9s").await;
    let (_d, home) = common::home();
    let config = NodeConfig { session_idle: Duration::from_secs(1), ..Default::default() };
    let alice = node(&srv, &home, "alice@example.com", config.clone()).await;
    let bob = node(&srv, &home, "bob@example.com", config).await;
    let echo = serve_echo(&alice, &["bob@example.com"]).await;
    let (key0, cert0, _) = on_disk(&home, "alice@example.com");
    let bob0 = info(&on_disk(&home, "bob@example.com").1).serial;
    let first = info(&cert0);
    assert_eq!(alice.certificate_status().serial, first.serial);
    assert_eq!(alice.certificate_status().renewed_at, None);
    assert_eq!(alice.certificate_status().renew_at, first.not_before + 300 + 6);
    echo_once(&bob, &echo).await;

    // Wait until the original certificate has expired and both renewed at least once (on
    // a loaded machine renewal may come a little late: 30 s at most).
    let renewed_on_disk = |who: &str, was: &str| info(&on_disk(&home, who).1).serial != was;
    let deadline = unix_now() + 30;
    while unix_now() <= first.not_after + 1
        || !renewed_on_disk("alice@example.com", &first.serial)
        || !renewed_on_disk("bob@example.com", &bob0)
    {
        assert!(unix_now() < deadline, "no renewal in time: {:?}", alice.certificate_status());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (key1, cert1, mode) = on_disk(&home, "alice@example.com");
    assert_eq!(key1, key0, "the key is kept");
    assert_eq!(mode, 0o600, "the key stays private");
    let renewed = info(&cert1);
    assert_ne!(renewed.serial, first.serial, "renewed on disk");
    assert_eq!(renewed.public_key, first.public_key);
    assert!(renewed.not_after > first.not_after);
    assert!(renewed.not_after > unix_now());
    let status = alice.certificate_status();
    assert!(status.renewed_at.is_some(), "{status:?}");
    assert_eq!(status.last_error, None, "{status:?}");
    assert_eq!(status.warning, None, "{status:?}");
    assert!(status.not_after >= renewed.not_after, "{status:?}");
    assert_ne!(bob.certificate_status().serial, bob0, "bob renewed too");

    // New TLS handshakes (a new session: the old one went idle) use the new certificates:
    // the originals have expired, and each side checks the other's.
    tokio::time::sleep(Duration::from_secs(2)).await;
    echo_once(&bob, &echo).await;

    // A new log-in with what is stored now.
    let id = Arc::new(home.identity(&addr("alice@example.com")).unwrap());
    let opts = ConnectOptions { login: Some(id), ..srv.opts() };
    let conn = ServerConn::connect(&home, &addr("alice@example.com").domain, &opts).await.unwrap();
    let exists = conn
        .call_box(
            q2q::amp::AmpBox::command(q2q::proto::command::EXISTS)
                .with("address", "bob@example.com"),
        )
        .await
        .unwrap();
    assert_eq!(exists.get_str("exists"), Some("true"));

    // The server recorded every renewal like any issued certificate.
    let certs = admin::list_certificates(&srv.data_dir(), Some("alice")).await.unwrap();
    assert!(certs.len() >= 3, "registration and at least two renewals: {certs:?}");
    assert!(certs.iter().any(|c| c.serial == alice.certificate_status().serial));
}

/// A logged-in connection for `who` (registered now) and its stored certificate.
async fn logged_in(srv: &TestServer, home: &Home, who: &str) -> (ServerConn, String) {
    let conn = common::login(srv, home, who).await;
    let cert = home.identity(&addr(who)).unwrap().cert_pem;
    (conn, cert)
}

#[tokio::test]
async fn renewal_needs_a_certificate_log_in() {
    let srv = short_lived_server("1h").await;
    let (_d, home) = common::home();
    let (_, cert) = logged_in(&srv, &home, "alice@example.com").await;
    let anonymous =
        ServerConn::connect(&home, &addr("alice@example.com").domain, &srv.opts()).await.unwrap();
    let e = anonymous.renew(&cert).await.unwrap_err();
    assert_eq!(e.code(), Some(code::NOT_LOGGED_IN), "{e}");
}

#[tokio::test]
async fn renewal_only_of_the_logged_in_key_and_address() {
    let srv = short_lived_server("1h").await;
    let (_d, home) = common::home();
    let (alice, alice_cert) = logged_in(&srv, &home, "alice@example.com").await;
    let (_bob, bob_cert) = logged_in(&srv, &home, "bob@example.com").await;
    // Without `certificate`, the login certificate is renewed; with it, that one.
    let renewed = alice.renew(&alice_cert).await.unwrap();
    assert_eq!(info(&renewed).public_key, info(&alice_cert).public_key);
    assert_eq!(info(&renewed).address, Some(addr("alice@example.com")));
    assert!(alice.renew(&renewed).await.is_ok(), "a renewed certificate renews again");
    let e = alice.renew(&bob_cert).await.unwrap_err();
    assert_eq!(e.code(), Some(code::BAD_CERTIFICATE), "{e}");
    // Alice registered on a second machine: another key, same address.
    let (_d2, home2) = common::home();
    q2q::client::register(&home2, &addr("alice@example.com"), common::PW, None, true, &srv.opts())
        .await
        .unwrap();
    let other_key = home2.identity(&addr("alice@example.com")).unwrap().cert_pem;
    let e = alice.renew(&other_key).await.unwrap_err();
    assert_eq!(e.code(), Some(code::BAD_CERTIFICATE), "{e}");
    assert!(e.to_string().contains("not for the key"), "{e}");
    let e = alice.renew("not a certificate").await.unwrap_err();
    assert_eq!(e.code(), Some(code::BAD_REQUEST), "{e}");
}

#[tokio::test]
async fn renewal_refused_once_revoked_or_removed_and_rate_limited() {
    let srv = short_lived_server("1h").await;
    let (_d, home) = common::home();
    let (alice, cert) = logged_in(&srv, &home, "alice@example.com").await;
    admin::revoke(&srv.data_dir(), &info(&cert).serial).await.unwrap();
    let e = alice.renew(&cert).await.unwrap_err();
    assert_eq!(e.code(), Some(code::BAD_CERTIFICATE), "{e}");
    assert!(e.to_string().contains("revoked"), "{e}");

    let (bob, cert) = logged_in(&srv, &home, "bob@example.com").await;
    for _ in 0..6 {
        bob.renew(&cert).await.unwrap();
    }
    let e = bob.renew(&cert).await.unwrap_err();
    assert_eq!(e.code(), Some(code::RATE_LIMITED), "{e}");

    let (carol, cert) = logged_in(&srv, &home, "carol@example.com").await;
    admin::remove_user(&srv.data_dir(), "carol").await.unwrap();
    let e = carol.renew(&cert).await.unwrap_err();
    assert!([code::UNKNOWN_USER, code::BAD_CERTIFICATE].contains(&e.code().unwrap_or("")), "{e}");
}

#[tokio::test]
async fn a_node_whose_account_was_removed_warns_and_keeps_its_certificate() {
    let srv = short_lived_server("6s").await;
    let (_d, home) = common::home();
    let alice = node(&srv, &home, "alice@example.com", NodeConfig::default()).await;
    let (_, cert0, _) = on_disk(&home, "alice@example.com");
    admin::remove_user(&srv.data_dir(), "alice").await.unwrap();
    let first = info(&cert0);
    // Past three quarters of the lifetime: refused attempts, and a warning.
    let deadline = unix_now() + 30;
    let status = loop {
        let status = alice.certificate_status();
        if unix_now() >= first.not_before + 300 + 5 && status.last_error.is_some() {
            break status;
        }
        assert!(unix_now() < deadline, "no refused attempt in time: {status:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(status.serial, first.serial, "{status:?}");
    let error = status.last_error.as_deref().unwrap_or("");
    assert!(error.contains("not registered") || error.contains("revoked"), "{status:?}");
    let warning = status.warning.unwrap_or_default();
    assert!(
        warning.contains("alice@example.com expires in")
            || warning.contains("alice@example.com has expired"),
        "{warning}"
    );
    assert_eq!(on_disk(&home, "alice@example.com").1, cert0, "the old certificate stays");
}
