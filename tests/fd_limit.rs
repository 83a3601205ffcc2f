//! The attack from the issue under a low open-file limit: one address (no per-address cap
//! here) opens a thousand connections and holds them idle; the server keeps those not
//! logged in to their share of its descriptors, and a real client still registers and
//! logs in.
//!
//! The only test of this binary: the limit it lowers is the whole process's, for good.

mod common;

use common::{TestServer, loopback_config};
use q2q::amp::AmpBox;
use q2q::server::{Registration, ServerConfig};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::AsyncReadExt;
use tokio::net::{TcpSocket, TcpStream};

const NOFILE: u64 = 512;

/// The streams of `held` the server has not closed.
async fn still_open(held: Vec<TcpStream>) -> Vec<TcpStream> {
    let mut set = tokio::task::JoinSet::new();
    for mut s in held {
        set.spawn(async move {
            let mut buf = [0u8; 16];
            match tokio::time::timeout(Duration::from_millis(50), s.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => None,
                _ => Some(s),
            }
        });
    }
    let mut open = Vec::new();
    while let Some(r) = set.join_next().await {
        open.extend(r.unwrap());
    }
    open
}

#[tokio::test]
async fn a_thousand_idle_connections_under_a_low_fd_limit_leave_room_for_a_client() {
    use nix::sys::resource::{Resource, setrlimit};
    setrlimit(Resource::RLIMIT_NOFILE, NOFILE, NOFILE).unwrap();
    let config = ServerConfig {
        max_connections_per_address: 100_000,
        unauthenticated_percent: 25,
        handshake_timeout_secs: 60,
        login_timeout_secs: 60,
        ..loopback_config(Registration::Open)
    };
    let srv = TestServer::start("example.com", config).await;
    // (512 - 64 reserved) connections, a quarter of them for those not logged in.
    let share = (NOFILE as usize - 64) / 4;
    let server: SocketAddr = srv.addr().parse().unwrap();
    let mut held = Vec::new();
    for _ in 0..40 {
        for _ in 0..25 {
            let s = TcpSocket::new_v4().unwrap();
            s.bind("127.0.0.2:0".parse().unwrap()).unwrap();
            held.push(s.connect(server).await.unwrap());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        held = still_open(held).await;
        // A round's evictions may lag by a round on a busy machine.
        assert!(held.len() <= share + 50, "{} held", held.len());
    }
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        held = still_open(held).await;
        if held.len() <= share {
            break;
        }
    }
    assert!(held.len() <= share, "{} connections not logged in held", held.len());
    assert!(held.len() >= share / 2, "the attack held only {}", held.len());

    // Meanwhile a real client registers and logs in.
    let (_d, home) = common::home();
    let alice = common::login(&srv, &home, "alice@example.com").await;
    alice.call_box(AmpBox::command("ping")).await.unwrap();
}
