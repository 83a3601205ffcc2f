//! Path MTU discovery in the simulated network (RFC 8899): a path of MTU 1280 from the
//! start, a path whose MTU drops from 1500 to 1280 in the middle of a transfer (a black
//! hole: no ICMP), a 1500 path, and a move to a relayed path.

mod common;

use common::{MIB, Run, link, pair_with};
use q2q_netstack::pmtu::BASE_PLPMTU;
use q2q_netstack::sim::IP_UDP_HEADERS;
use q2q_netstack::{Config, Duration, Instant};

/// The largest UDP payload a path of IP MTU 1280 carries.
const CARRIED_1280: usize = 1280 - IP_UDP_HEADERS;

fn mtu_link(mtu: usize, seed: u64) -> q2q_netstack::sim::LinkConfig {
    let mut c = link(seed);
    c.mtu = Some(mtu);
    c
}

#[test]
fn path_of_mtu_1280_carries_a_bulk_transfer() {
    let mut pair = pair_with(Config::default(), mtu_link(1280, 31), mtu_link(1280, 32));
    let bytes = 32 * MIB;
    let mut run = Run::start(&mut pair, 2, bytes);
    let start = pair.now;
    let stall = run
        .finish(&mut pair, Duration::from_millis(10), Instant::from_secs(60), start)
        .expect("transfer completes");
    let secs = (pair.now - start).total_micros() as f64 / 1e6;
    let (a, b) = (pair.a.stats(), pair.b.stats());
    eprintln!(
        "MTU 1280: 2 x {} MiB each way in {secs:.2} s virtual, {:.0} Mbit/s each way; \
         plpmtu a {} b {}; longest stall {} ms; dropped for size ab {} ba {}; \
         fragments sent a {} b {}; probes a {}/{} b {}/{}",
        bytes / MIB,
        (2 * bytes) as f64 * 8.0 / secs / 1e6,
        a.plpmtu,
        b.plpmtu,
        stall / 1000,
        pair.ab.stats.lost_mtu,
        pair.ba.stats.lost_mtu,
        a.sender.fragments_sent,
        b.sender.fragments_sent,
        a.sender.pmtu_probes_acked,
        a.sender.pmtu_probes_sent,
        b.sender.pmtu_probes_acked,
        b.sender.pmtu_probes_sent,
    );
    run.verify();
    for s in [a, b] {
        assert!((BASE_PLPMTU..=CARRIED_1280).contains(&s.plpmtu), "plpmtu {}", s.plpmtu);
        assert!(s.plpmtu >= CARRIED_1280 - 8, "search got close: {}", s.plpmtu);
        // Only probes were too big: data and ACKs always fit.
        assert!(s.sender.pmtu_probes_sent <= 40, "{:?}", s.sender);
        assert_eq!(s.sender.pmtu_black_holes, 0);
        // Segmentation offload under a small path: 64 KiB segments were cut to the link
        // MTU, the pieces that still did not fit went as fragments, and the peer joined
        // reassembled pieces into segments again.
        assert!(s.segmented.0 > 0 && s.segmented.1 > 40 * s.segmented.0, "{:?}", s.segmented);
        assert!(s.coalesced > 0, "nothing joined");
    }
    assert!(a.sender.fragments_sent > 0 && b.receiver.reassembled > 0, "pieces were fragmented");
    let dropped = pair.ab.stats.lost_mtu + pair.ba.stats.lost_mtu;
    let probes = a.sender.pmtu_probes_sent + b.sender.pmtu_probes_sent;
    assert!(dropped <= probes, "only probes exceed the MTU: {dropped} > {probes}");
    assert!(secs < 10.0, "{secs}");
}

#[test]
fn mtu_drop_mid_transfer_stalls_and_recovers() {
    let mut pair = pair_with(Config::default(), mtu_link(1500, 33), mtu_link(1500, 34));
    let bytes = 32 * MIB;
    let mut run = Run::start(&mut pair, 2, bytes);
    assert!(!run.run_until(&mut pair, Instant::from_millis(600)).expect("runs"));
    assert_eq!(pair.a.stats().plpmtu, Config::default().max_plpmtu);
    assert_eq!(pair.b.stats().plpmtu, Config::default().max_plpmtu);
    let before = run.received.get();
    assert!(before > 4 * MIB, "{before}");
    // The path now carries 1280-byte packets; larger ones vanish (no ICMP).
    pair.set_path_mtu(Some(1280));
    let drop_at = pair.now;
    let stall = run
        .finish(&mut pair, Duration::from_millis(5), Instant::from_secs(60), drop_at)
        .expect("transfer completes after the MTU drop");
    let secs = (pair.now - drop_at).total_micros() as f64 / 1e6;
    let (a, b) = (pair.a.stats(), pair.b.stats());
    eprintln!(
        "MTU 1500 -> 1280 mid-transfer: longest stall {} ms, rest in {secs:.2} s; \
         plpmtu a {} b {}; black holes a {} b {}; rtos a {} b {}; dropped for size ab {} ba {}",
        stall / 1000,
        a.plpmtu,
        b.plpmtu,
        a.sender.pmtu_black_holes,
        b.sender.pmtu_black_holes,
        a.sender.rtos,
        b.sender.rtos,
        pair.ab.stats.lost_mtu,
        pair.ba.stats.lost_mtu,
    );
    run.verify();
    for s in [a, b] {
        assert!((BASE_PLPMTU..=CARRIED_1280).contains(&s.plpmtu), "plpmtu {}", s.plpmtu);
        assert!(s.sender.pmtu_black_holes >= 1);
    }
    assert!(stall < 2_000_000, "a stall, not a failure: {stall} µs");
}

#[test]
fn path_of_mtu_1500_reaches_the_maximum_and_a_new_path_starts_over() {
    let mut pair = pair_with(Config::default(), mtu_link(1500, 35), mtu_link(1500, 36));
    let mut run = Run::start(&mut pair, 1, 4 * MIB);
    assert_eq!(pair.a.stats().plpmtu, BASE_PLPMTU);
    assert!(!run.run_until(&mut pair, Instant::from_millis(200)).expect("runs"));
    let max = Config::default().max_plpmtu;
    assert_eq!((pair.a.stats().plpmtu, pair.b.stats().plpmtu), (max, max));
    // A move to a relay whose framing takes 18 bytes: back to BASE − 18, then up again.
    let now = pair.now;
    pair.a.on_path_change(now, 18);
    pair.b.on_path_change(now, 18);
    assert_eq!(pair.a.stats().plpmtu, BASE_PLPMTU - 18);
    let done = run.run_until(&mut pair, now + Duration::from_millis(300)).expect("runs");
    assert_eq!((pair.a.stats().plpmtu, pair.b.stats().plpmtu), (max, max));
    if !done {
        let now = pair.now;
        run.finish(&mut pair, Duration::from_millis(10), Instant::from_secs(30), now)
            .expect("completes");
    }
    let s = pair.a.stats().sender;
    assert!(s.pmtu_probes_sent <= 4, "{s:?}");
    run.verify();
}

#[test]
fn idle_session_finds_the_path_mtu_too() {
    let mut pair = pair_with(Config::default(), mtu_link(1280, 37), mtu_link(1280, 38));
    while pair.now < Instant::from_secs(20) {
        assert!(pair.step());
    }
    for s in [pair.a.stats(), pair.b.stats()] {
        assert!((CARRIED_1280 - 8..=CARRIED_1280).contains(&s.plpmtu), "{}", s.plpmtu);
        // Bounded: a binary search, then quiet until the raise timer.
        assert!(s.sender.pmtu_probes_sent <= 40, "{:?}", s.sender);
    }
}
