//! Revocation that travels: a domain publishes its revoked certificates as a list signed by
//! its CA; another domain's server refuses (and drops) a revoked caller; a callee's node
//! refuses a revoked caller even when a server let it through; the home server drops the
//! live log-in of a certificate revoked by `q2q-server cert revoke` in another process.

mod common;

use common::{TestServer, addr, eventually, loopback_config, node, serial};
use q2q::address::{Domain, ServiceName};
use q2q::client::{ConnectOptions, Home, ServerConn};
use q2q::identity::revocation::RevocationList;
use q2q::presence::node::{NodeConfig, Policy};
use q2q::server::{Registration, ServerConfig};
use std::time::Duration;

fn now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64
}

/// Two domains whose servers (and the nodes of `home`) find each other on loopback.
fn federate(a: &TestServer, b: &TestServer, home: &Home) {
    common::federate_servers(a, "a.example", b, "b.example");
    std::fs::create_dir_all(home.root()).unwrap();
    std::fs::write(
        home.root().join("config.toml"),
        format!("[servers]\n\"a.example\" = \"{}\"\n\"b.example\" = \"{}\"\n", a.addr(), b.addr()),
    )
    .unwrap();
}

/// Log in at `at` (a server of any domain) as `who`.
async fn login_at(home: &Home, who: &str, at: &TestServer) -> Result<ServerConn, String> {
    let id = std::sync::Arc::new(home.identity(&addr(who)).map_err(|e| e.to_string())?);
    let opts = ConnectOptions { login: Some(id), ..at.opts() };
    let conn = ServerConn::connect(home, &at_domain(at), &opts).await.map_err(|e| e.to_string())?;
    // Any command that needs the log-in: `exists` of someone at that server.
    let address = addr(&format!("nobody@{}", at_domain(at)));
    conn.call(&q2q::proto::commands::Exists { address }).await.map_err(|e| e.to_string())?;
    Ok(conn)
}

fn at_domain(s: &TestServer) -> Domain {
    s.running.as_ref().unwrap().domain.clone()
}

/// The revoked serials in `domain`'s published list, verified with its CA.
async fn published(home: &Home, srv: &TestServer) -> RevocationList {
    let conn = ServerConn::connect(home, &at_domain(srv), &srv.opts()).await.unwrap();
    let der = conn.revocations(&at_domain(srv)).await.unwrap();
    RevocationList::verify(&der, &conn.ca, &at_domain(srv), now()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_list_is_published_to_anyone_signed_and_follows_revocations() {
    let a = TestServer::start("a.example", loopback_config(Registration::Open)).await;
    let (_d, home) = common::home();
    let _alice = common::login(&a, &home, "alice@a.example").await;
    let s = serial(&home, "alice@a.example");
    // No log-in needed; the list verifies with the domain's CA and names nobody yet.
    let first = published(&home, &a).await;
    assert!(first.is_empty());
    assert!(first.next_update > now());
    q2q::server::admin::revoke(&a.data_dir(), &s).await.unwrap();
    let ok =
        eventually(Duration::from_secs(10), || async { published(&home, &a).await.is_revoked(&s) })
            .await;
    assert!(ok, "the revocation reaches the published list");
    let again = published(&home, &a).await;
    assert!(again.number > first.number, "every list has a higher number");
    // Another domain's list is not this server's to give.
    let conn = ServerConn::connect(&home, &at_domain(&a), &a.opts()).await.unwrap();
    let err = conn.revocations(&Domain::parse("b.example").unwrap()).await.unwrap_err();
    assert_eq!(err.code(), Some(q2q::proto::code::WRONG_DOMAIN), "{err}");
}

/// Alice of a.example logs in at b.example's server; her certificate is revoked at home:
/// her live log-in there is dropped within b's recheck time, and a new one is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_domain_refuses_and_drops_a_revoked_caller() {
    let a = TestServer::start("a.example", loopback_config(Registration::Open)).await;
    let b_config =
        ServerConfig { revocation_max_age_secs: 1, ..loopback_config(Registration::Open) };
    let b = TestServer::start("b.example", b_config).await;
    let (_d, home) = common::home();
    federate(&a, &b, &home);
    let _alice_home = common::login(&a, &home, "alice@a.example").await;
    let at_b = login_at(&home, "alice@a.example", &b).await.expect("alice logs in at b");
    q2q::server::admin::revoke(&a.data_dir(), &serial(&home, "alice@a.example")).await.unwrap();

    let handle = at_b.handle();
    let dropped = tokio::time::timeout(Duration::from_secs(15), handle.closed()).await;
    assert!(dropped.is_ok(), "b drops alice's live log-in");
    let err = login_at(&home, "alice@a.example", &b).await.err().expect("refused");
    assert!(err.contains("revoked"), "{err}");
    // Others of a.example are not affected.
    let _bob = common::login(&a, &home, "bob@a.example").await;
    login_at(&home, "bob@a.example", &b).await.expect("bob still logs in at b");
}

/// Bob (b.example) offers `echo` to alice and carol (a.example). B's server trusts its
/// copy of a.example's list for an hour, so it lets revoked alice through; bob's node
/// checks a.example's list itself and refuses her. Meanwhile alice's home server, told by
/// `q2q-server cert revoke` run as another process, drops her daemon's log-in: she is
/// offline and unreachable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_callee_node_refuses_a_revoked_caller_and_her_daemon_is_dropped() {
    let a = TestServer::start("a.example", loopback_config(Registration::Open)).await;
    let b_config =
        ServerConfig { revocation_max_age_secs: 3600, ..loopback_config(Registration::Open) };
    let b = TestServer::start("b.example", b_config).await;
    let (_d, home) = common::home();
    federate(&a, &b, &home);
    let quick = NodeConfig { revocation_max_age: Duration::from_secs(1), ..Default::default() };
    let bob = node(&b, &home, "bob@b.example", quick.clone()).await;
    let alice = node(&a, &home, "alice@a.example", quick.clone()).await;
    let carol = node(&a, &home, "carol@a.example", quick).await;
    alice.serve_ping().await.unwrap();
    let echo = ServiceName::parse("echo").unwrap();
    let mut accepted = bob
        .listen(&echo, "echo", Policy::allow([addr("alice@a.example"), addr("carol@a.example")]))
        .await
        .unwrap();
    tokio::spawn(async move { while accepted.recv().await.is_some() {} });
    // Carol's call makes b's server fetch (and keep) a.example's list, naming nobody.
    carol.connect(&addr("bob@b.example"), &echo).await.expect("carol reaches bob");
    // Alice is online at home, reachable by carol.
    carol.ping(&addr("alice@a.example"), 1, Duration::ZERO).await.expect("alice is reachable");
    let online_before = a.running.as_ref().unwrap().stats().online;

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_q2q-server"))
        .arg("--data-dir")
        .arg(a.data_dir())
        .args(["cert", "revoke", &serial(&home, "alice@a.example")])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    // Her home server drops her daemon's log-in: she goes offline.
    let ok = eventually(Duration::from_secs(10), || async {
        a.running.as_ref().unwrap().stats().online < online_before
    })
    .await;
    assert!(ok, "alice's live log-in is dropped");
    // Carol's session with alice ended with the revocation too, or a new one finds her
    // offline: either way she is unreachable.
    let ok = eventually(Duration::from_secs(15), || async {
        carol.ping(&addr("alice@a.example"), 1, Duration::ZERO).await.is_err()
    })
    .await;
    assert!(ok, "alice is unreachable");

    // b's server still has the old list and lets her through, but bob's node refuses her.
    let err = alice.connect(&addr("bob@b.example"), &echo).await.err().expect("refused");
    let err = err.to_string();
    assert!(err.contains("bob@b.example refuses alice@a.example"), "{err}");
    assert!(err.contains("revoked"), "{err}");
    assert!(bob.status().iter().all(|s| s.peer != addr("alice@a.example")), "{:?}", bob.status());
    // Carol's streams still go through.
    carol.connect(&addr("bob@b.example"), &echo).await.expect("carol still reaches bob");
}

/// Fail closed: b.example knows a.example's CA (pinned up front) but cannot fetch its
/// revocation list (its server is down), so alice of a.example is refused there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_whose_list_cannot_be_had_is_refused() {
    let mut a = TestServer::start("a.example", loopback_config(Registration::Open)).await;
    let b = TestServer::start("b.example", loopback_config(Registration::Open)).await;
    let (_d, home) = common::home();
    federate(&a, &b, &home);
    let _alice = common::login(&a, &home, "alice@a.example").await;
    let known = b.data_dir().join("federation").join("known_cas");
    std::fs::create_dir_all(&known).unwrap();
    std::fs::copy(a.data_dir().join("ca.pem"), known.join("a.example.pem")).unwrap();
    a.running.take().unwrap().shutdown().await;
    let err = login_at(&home, "alice@a.example", &b).await.err().expect("refused");
    assert!(err.contains("cannot check whether the certificate of alice@a.example"), "{err}");
}
