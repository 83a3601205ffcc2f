//! Sealed sessions in the simulated network, in virtual time: keys installed in the middle
//! of a transfer (the acceptor first, sending plain until the dialer's first sealed
//! datagram) lose nothing; a sealed session at a 1280-byte path MTU still fits its
//! datagrams; afterwards plain, forged and replayed datagrams are refused and do not count
//! as the peer being alive.

mod common;

use common::{MIB, Run, link, pair_with};
use q2q_netstack::seal::{OVERHEAD, SessionKeys};
use q2q_netstack::sim::Pair;
use q2q_netstack::wire::{Data, SessionId};
use q2q_netstack::{Config, DatagramError, Duration, Instant};

fn keys() -> SessionKeys {
    SessionKeys { initiator: [7; 32], responder: [9; 32] }
}

/// Install the keys as the node does: the acceptor (`b`, the TLS server) without sending
/// sealed, then, `gap` later, the dialer (`a`), sealing at once.
fn switch(pair: &mut Pair, gap: Duration) {
    pair.b.install_keys(&keys(), false);
    let until = pair.now + gap;
    while pair.now < until {
        assert!(pair.step());
    }
    pair.a.install_keys(&keys(), true);
}

#[test]
fn keys_installed_mid_transfer_lose_nothing_and_every_datagram_is_sealed() {
    let mut pair = pair_with(Config::default(), link(41), link(42));
    let mut run = Run::start(&mut pair, 2, 8 * MIB);
    assert!(!run.run_until(&mut pair, Instant::from_millis(300)).unwrap(), "still running");
    let plain_before = pair.ab.stats.sent + pair.ba.stats.sent;
    switch(&mut pair, Duration::from_millis(5));
    let sent_at_switch = pair.ab.stats.sent + pair.ba.stats.sent;
    let from = pair.now;
    run.finish(&mut pair, Duration::from_millis(50), Instant::from_secs(60), from).unwrap();
    run.verify();
    let (a, b) = (pair.a.stats(), pair.b.stats());
    assert!(a.sealed && b.sealed, "both sides receive sealed datagrams");
    assert_eq!(pair.rejected, 0, "no datagram refused in the switch");
    assert!(plain_before > 0 && pair.ab.stats.sent + pair.ba.stats.sent > sent_at_switch);
}

#[test]
fn sealed_datagrams_fit_a_1280_byte_path() {
    let mut pair = pair_with(Config::default(), link(43), link(44));
    // The path carries 1280-byte IP packets: 1252 bytes of UDP payload.
    pair.set_path_mtu(Some(1252));
    switch(&mut pair, Duration::from_millis(1));
    let mut run = Run::start(&mut pair, 1, 8 * MIB);
    let from = pair.now;
    let stall =
        run.finish(&mut pair, Duration::from_millis(50), Instant::from_secs(60), from).unwrap();
    run.verify();
    let a = pair.a.stats();
    assert!(a.plpmtu <= 1252, "PLPMTU {} within the path", a.plpmtu);
    assert!(a.plpmtu + 64 > 1252, "PLPMTU {} found near the path's 1252", a.plpmtu);
    assert!(a.sender.rtos < 3, "{} timeouts: sealed datagrams overflowed the path", a.sender.rtos);
    eprintln!("plpmtu {} (sealing adds {OVERHEAD}), longest stall {stall} µs", a.plpmtu);
}

#[test]
fn after_the_switch_plain_forged_and_replayed_datagrams_are_refused() {
    let config = Config { idle_timeout: Duration::from_secs(20), ..Config::default() };
    let mut pair = pair_with(config, link(45), link(46));
    switch(&mut pair, Duration::from_millis(1));
    let mut run = Run::start(&mut pair, 1, MIB);
    let from = pair.now;
    run.finish(&mut pair, Duration::from_millis(50), Instant::from_secs(30), from).unwrap();
    run.verify();
    let now = pair.now;
    let sid = SessionId(0x0123_4567_89ab_cdef);

    // A plain Data datagram of the session (what an on-path attacker could forge).
    let mut plain = Vec::new();
    Data::emit_header(sid, 1_000_000, 0, &mut plain);
    assert_eq!(pair.b.handle_datagram(now, &mut plain.clone()), Err(DatagramError::Unsealed));

    // A genuine sealed datagram, taken once; its replay and any altered copy refused.
    let mut sealed = Vec::new();
    // A keepalive is due after idle: let time pass until `a` sends something.
    let mut t = now;
    while pair.a.poll_transmit(t, &mut sealed).is_none() {
        t += Duration::from_millis(100);
        pair.a.handle_timeout(t);
        assert!(t < now + Duration::from_secs(10), "a sends a keepalive");
    }
    assert_eq!(sealed[1], q2q_netstack::wire::Kind::Sealed as u8);
    let mut forged = sealed.clone();
    let last = forged.len() - 1;
    forged[last] ^= 1;
    assert!(matches!(pair.b.handle_datagram(t, &mut forged), Err(DatagramError::Sealed(_))));
    // (Opened in place: each call gets its own copy of the bytes.)
    assert_eq!(pair.b.handle_datagram(t, &mut sealed.clone()), Ok(()));
    assert!(matches!(
        pair.b.handle_datagram(t, &mut sealed.clone()),
        Err(DatagramError::Sealed(_))
    ));
    assert_eq!(pair.b.stats().refused, 3);

    // Refused datagrams are no sign of life: a peer that only an attacker speaks for
    // times out.
    let mut t2 = t;
    let end = t + Duration::from_secs(30);
    while pair.b.error().is_none() && t2 < end {
        t2 += Duration::from_millis(500);
        let _ = pair.b.handle_datagram(t2, &mut plain.clone());
        let _ = pair.b.handle_datagram(t2, &mut sealed.clone());
        pair.b.handle_timeout(t2);
        let mut sink = Vec::new();
        while pair.b.poll_transmit(t2, &mut sink).is_some() {
            sink.clear();
        }
    }
    assert!(pair.b.error().is_some(), "b timed out although plain and replayed datagrams came");
}
