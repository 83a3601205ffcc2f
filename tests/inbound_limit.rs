//! A logged-in caller cannot flood a callee with connection requests: past a burst, the
//! server refuses `inbound` with RATE_LIMITED (and asks the callee nothing).

mod common;

use common::{TestServer, addr, loopback_config};
use q2q::address::ServiceName;
use q2q::client::{self, ConnectOptions};
use q2q::presence::node::{Node, NodeConfig};
use q2q::server::Registration;

#[tokio::test]
async fn inbound_flood_is_rate_limited() {
    let srv = TestServer::start("example.com", loopback_config(Registration::Open)).await;
    let (_d, home) = common::home();
    let me = addr("carol@example.com");
    client::register(&home, &me, "correct horse battery", None, false, &srv.opts()).await.unwrap();
    let config = NodeConfig {
        include_loopback: true,
        server: ConnectOptions { server: Some(srv.addr()), ..Default::default() },
        ..Default::default()
    };
    let carol = Node::start(home, me, config).await.unwrap();
    let echo = ServiceName::parse("echo").unwrap();
    let target = addr("alice@example.com");
    let mut answers = Vec::new();
    for _ in 0..25 {
        answers.push(carol.connect(&target, &echo).await.err().unwrap().to_string());
    }
    // The burst is answered (alice is offline), then the server refuses to go on.
    assert!(answers[..20].iter().all(|a| a == "alice@example.com is offline"), "{answers:?}");
    assert!(
        answers[20..].iter().all(|a| a.starts_with(
            "too many connection requests from carol@example.com to alice@example.com; try again in"
        )),
        "{answers:?}"
    );
    // Another callee is not affected.
    let other = carol.connect(&addr("dave@example.com"), &echo).await.err().unwrap();
    assert_eq!(other.to_string(), "dave@example.com is offline");
}
