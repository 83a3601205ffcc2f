//! Outage survival in the simulated network: a session and its streams live through the
//! peer being silent for minutes (as kernel TCP connections do), send little while it is,
//! and resume within seconds once it is back.

mod common;

use common::{MIB, Run, link, pair_with};
use q2q_netstack::{Config, Duration, Instant};

const OUTAGE: Duration = Duration::from_secs(300);

/// An upper bound on the datagrams one side may send during an outage of `outage` once its
/// first retransmission timeout fired (before it, the sender cannot know and fills its
/// window once): the timeout doubles from at least `min_rto` up to `max_rto`, each timeout
/// allows one transmission (two after the first), and a transmission made during the
/// timeout's recovery is at most two fragments (a 1400-byte packet at the 1200-byte BASE).
fn outage_bound(config: &Config, outage: Duration) -> u64 {
    let (min, max) = (config.min_rto.total_micros(), config.max_rto.total_micros());
    let mut periods = 0;
    let mut rto = min;
    let mut t = 0;
    while t < outage.total_micros() {
        t += rto;
        rto = (rto * 2).min(max);
        periods += 1;
    }
    let per_period = 2; // fragments per transmission
    // One extra transmission after the first timeout, and a keepalive.
    (periods + 2) * per_period
}

#[test]
fn five_minute_outage_mid_transfer_is_survived() {
    let config = Config::default();
    let mut pair = pair_with(config.clone(), link(41), link(42));
    let bytes = 32 * MIB;
    let mut run = Run::start(&mut pair, 1, bytes);
    assert!(!run.run_until(&mut pair, Instant::from_millis(300)).expect("runs"));
    let before = run.received.get();
    assert!(before > MIB && before < 2 * bytes, "{before}");

    pair.set_down(true);
    let down_at = pair.now;
    let sent_before = pair.ab.stats.sent + pair.ba.stats.sent;
    // The first second: the window in flight goes out once, then the timeouts back off.
    let settle = Duration::from_secs(1);
    assert!(!run.run_until(&mut pair, down_at + settle).expect("runs"));
    let first = pair.ab.stats.sent + pair.ba.stats.sent - sent_before;
    let sent_settled = pair.ab.stats.sent + pair.ba.stats.sent;
    assert!(!run.run_until(&mut pair, down_at + OUTAGE).expect("session survives the outage"));
    let during = pair.ab.stats.sent + pair.ba.stats.sent - sent_settled;
    let stuck = run.received.get();
    assert!(pair.a.error().is_none() && pair.b.error().is_none());

    pair.set_down(false);
    let up_at = pair.now;
    // Resumption: the first new byte after the link is back.
    while run.received.get() == stuck {
        let until = pair.now + Duration::from_millis(10);
        assert!(!run.run_until(&mut pair, until).expect("runs"));
        assert!(pair.now < up_at + Duration::from_secs(30), "no progress 30 s after the return");
    }
    let resumed = (pair.now - up_at).total_millis();
    let rest_from = pair.now;
    run.finish(&mut pair, Duration::from_millis(10), up_at + Duration::from_secs(60), rest_from)
        .expect("transfer completes after the outage");
    let rest = (pair.now - rest_from).total_micros() as f64 / 1e6;
    let left = (2 * bytes - stuck) as f64;
    let (a, b) = (pair.a.stats(), pair.b.stats());
    let bound = 2 * outage_bound(&config, OUTAGE);
    eprintln!(
        "5 min outage: {first} datagrams in its first second (the window in flight), \
         {during} in the rest (bound {bound}), resumed {resumed} ms \
         after the link returned, the remaining {:.1} MiB in {rest:.2} s ({:.0} Mbit/s); \
         rtos a {} b {}, plpmtu a {} b {}, black holes a {} b {}",
        left / MIB as f64,
        left * 8.0 / rest / 1e6,
        a.sender.rtos,
        b.sender.rtos,
        a.plpmtu,
        b.plpmtu,
        a.sender.pmtu_black_holes,
        b.sender.pmtu_black_holes,
    );
    run.verify();
    assert!(during < bound, "{during} datagrams during the outage, bound {bound}");
    let cwnd_datagrams = (a.cwnd.max(b.cwnd) / 1000) * 2;
    assert!(first < cwnd_datagrams, "{first} datagrams in the first second");
    let max_rto = config.max_rto.total_millis();
    assert!(resumed <= max_rto + 1000, "resumed {resumed} ms after the return");
    assert!(resumed < 10_000);
    // Congestion control recovered: the rest ran at a good fraction of the 500 Mbit/s link.
    assert!(left * 8.0 / rest / 1e6 > 100.0, "{rest} s for the rest");
    assert!(pair.a.error().is_none() && pair.b.error().is_none());
}

#[test]
fn idle_session_survives_five_minutes_of_silence() {
    let config = Config::default();
    let mut pair = pair_with(config.clone(), link(43), link(44));
    while pair.now < Instant::from_secs(2) {
        assert!(pair.step());
    }
    pair.set_down(true);
    let down_at = pair.now;
    let sent_before = pair.ab.stats.sent + pair.ba.stats.sent;
    while pair.now < down_at + OUTAGE {
        assert!(pair.step());
    }
    let during = pair.ab.stats.sent + pair.ba.stats.sent - sent_before;
    assert!(pair.a.error().is_none() && pair.b.error().is_none());
    pair.set_down(false);
    // A stream opened after the silence works at once.
    let up_at = pair.now;
    let mut run = Run::start(&mut pair, 1, MIB);
    run.finish(&mut pair, Duration::from_millis(10), up_at + Duration::from_secs(15), up_at)
        .expect("a new stream after the silence");
    eprintln!(
        "idle 5 min outage: {during} datagrams during it, a new 1 MiB stream done {} ms after",
        (pair.now - up_at).total_millis()
    );
    run.verify();
    assert!(during < 2 * outage_bound(&config, OUTAGE), "{during}");
    assert!(pair.now < up_at + Duration::from_secs(10));
}
