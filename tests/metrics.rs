//! Prometheus metrics: a server with `metrics` set serves /metrics over HTTP; after a
//! registration, log-ins, a refusal and a relayed ping, the counters moved.

mod common;

use common::{TestServer, addr, loopback_config, metric as get, node, scrape_metrics as scrape};
use q2q::presence::node::NodeConfig;
use q2q::server::{Registration, ServerConfig};
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_logins_registrations_refusals_and_relaying() {
    // A free loopback port for the endpoint.
    let at = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let config = ServerConfig { metrics: Some(at), ..loopback_config(Registration::Open) };
    let srv = TestServer::start("example.com", config).await;
    let before = scrape(at).await;
    assert_eq!(get(&before, "q2q_logins_total"), 0.0);
    assert_eq!(get(&before, "q2q_registrations_total"), 0.0);
    assert_eq!(get(&before, "q2q_refusals_total{reason=\"WRONG_PASSWORD\"}"), 0.0);

    let (_d, home) = common::home();
    let relayed = NodeConfig { direct: false, ..Default::default() };
    let alice = node(&srv, &home, "alice@example.com", relayed.clone()).await;
    let bob = node(&srv, &home, "bob@example.com", relayed).await;
    alice.serve_ping().await.unwrap();
    bob.ping(&addr("alice@example.com"), 3, Duration::from_millis(20)).await.unwrap();
    // A wrong password: refused.
    let conn =
        q2q::client::ServerConn::connect(&home, &addr("alice@example.com").domain, &srv.opts())
            .await
            .unwrap();
    let csr = q2q::identity::signing_request(&q2q::identity::generate_key().unwrap()).unwrap();
    let err = conn.sign(&addr("alice@example.com"), "not the password", &csr).await.unwrap_err();
    assert_eq!(err.code(), Some(q2q::proto::code::WRONG_PASSWORD));

    let after = scrape(at).await;
    assert_eq!(get(&after, "q2q_registrations_total"), 2.0);
    assert!(get(&after, "q2q_logins_total") >= 2.0, "{after:?}");
    assert_eq!(get(&after, "q2q_live_sessions"), 2.0, "alice's and bob's nodes");
    assert!(get(&after, "q2q_open_connections") >= 3.0, "{after:?}");
    assert_eq!(get(&after, "q2q_refusals_total{reason=\"WRONG_PASSWORD\"}"), 1.0);
    assert_eq!(get(&after, "q2q_inbound_requests_total"), 1.0);
    assert_eq!(get(&after, "q2q_relay_legs_total"), 2.0);
    assert!(get(&after, "q2q_relayed_bytes_total") > 0.0, "{after:?}");
}
