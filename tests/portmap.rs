//! Port mapping against a NAT-PMP gateway of our own on 127.0.0.1:5351 (RFC 6886; it
//! answers PCP requests with "unsupported version", as RFC 6887 section 9 says a NAT-PMP-only
//! server does, so the client falls back): the mapper makes a mapping at start, publishes
//! the external address, and deletes it (lifetime 0) when stopped. UPnP is off: nothing is
//! sent beyond loopback.

use q2q::presence::portmap::{self, Mapper, Options, Protocol};
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;

const GATEWAY_PORT: u16 = 5351;
const EXTERNAL: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 2);

/// A NAT-PMP gateway: every UDP map request (internal port, lifetime) is reported.
async fn gateway() -> (mpsc::UnboundedReceiver<(u16, u32)>, tokio::task::JoinHandle<()>) {
    let sock = UdpSocket::bind(("127.0.0.1", GATEWAY_PORT)).await.expect("bind 127.0.0.1:5351");
    let (tx, rx) = mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        let mut buf = [0u8; 1100];
        let epoch = 1000u32.to_be_bytes();
        while let Ok((n, from)) = sock.recv_from(&mut buf).await {
            let d = &buf[..n];
            let reply: Vec<u8> = match d {
                // PCP (version 2): a NAT-PMP server answers "unsupported version".
                [2, op, ..] => [&[0, 0x80 | op, 0, 1][..], &epoch].concat(),
                // External address.
                [0, 0] => [&[0, 128, 0, 0][..], &epoch, &EXTERNAL.octets()].concat(),
                // Map UDP: internal port, suggested external port, lifetime.
                [0, 1, _, _, i0, i1, _, _, l0, l1, l2, l3] => {
                    let internal = u16::from_be_bytes([*i0, *i1]);
                    let lifetime = u32::from_be_bytes([*l0, *l1, *l2, *l3]);
                    let _ = tx.send((internal, lifetime));
                    let external = if lifetime == 0 { 0 } else { internal.wrapping_add(1000) };
                    [
                        &[0, 129, 0, 0][..],
                        &epoch,
                        &internal.to_be_bytes(),
                        &external.to_be_bytes(),
                        &lifetime.to_be_bytes(),
                    ]
                    .concat()
                }
                _ => continue,
            };
            let _ = sock.send_to(&reply, from).await;
        }
    });
    (rx, task)
}

#[tokio::test]
async fn a_mapping_is_made_offered_and_deleted() {
    let (mut requests, task) = gateway().await;
    let opts = Options { gateway: Some(Ipv4Addr::LOCALHOST), upnp: false };

    // netcheck's probe: made and deleted at once.
    let probed = portmap::probe(40000, opts).await.expect("a mapping");
    assert_eq!(probed.protocol, Protocol::NatPmp);
    assert_eq!(probed.external, SocketAddr::from((EXTERNAL, 41000)));
    assert_eq!(requests.recv().await, Some((40000, 600)), "asked for 10 minutes");
    assert_eq!(requests.recv().await, Some((40000, 0)), "deleted again");

    // The daemon's mapper: made at start, current until stopped, then deleted.
    let mapper = Mapper::start(40001, opts);
    let mapped = mapper.wait_mapped(Duration::from_secs(10)).await.expect("mapped");
    assert_eq!(mapped.external, SocketAddr::from((EXTERNAL, 41001)));
    assert_eq!(mapper.current(), Some(mapped));
    assert_eq!(requests.recv().await, Some((40001, 600)));
    mapper.stop().await;
    assert_eq!(mapper.current(), None);
    assert_eq!(
        tokio::time::timeout(Duration::from_secs(5), requests.recv()).await.unwrap(),
        Some((40001, 0)),
        "stop deletes the mapping on the router"
    );
    task.abort();

    // Without a gateway answering, nothing is mapped and the reason says so.
    let err = portmap::probe(40002, opts).await.expect_err("no gateway now");
    assert!(err.to_string().contains("UPnP: not tried"), "{err}");
}
