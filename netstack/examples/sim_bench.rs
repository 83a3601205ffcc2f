//! Goodput of PTCP in the simulated network: 20 ms RTT, 1 Gbit/s each way, 0 / 1 / 5 % random
//! loss: goodput of a bulk transfer from a to b (64 MiB on one stream by default) and the
//! ratio of retransmissions to datagrams the link lost.
//!
//! `cargo run --release -p q2q-netstack --example sim_bench [MiB] [streams]`

use q2q_netstack::sim::{Link, LinkConfig, Pair, Transfer};
use q2q_netstack::wire::SessionId;
use q2q_netstack::{Config, Duration, Instant, Session, Side};

fn main() {
    let mut args = std::env::args().skip(1);
    let mib: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(64);
    let streams: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(1);
    println!(
        "PTCP in virtual time: 1 Gbit/s, 20 ms RTT, {streams} stream(s) x {mib} MiB, a to b only"
    );
    println!(
        "{:>6} {:>12} {:>10} {:>10} {:>10} {:>8} {:>9}",
        "loss", "goodput", "lost", "retx", "retx/lost", "rtos", "wall"
    );
    for loss in [0.0, 0.01, 0.05] {
        let wall = std::time::Instant::now();
        let r = run(loss, mib << 20, streams);
        println!(
            "{:>5.1}% {:>7.1} Mb/s {:>10} {:>10} {:>10.2} {:>8} {:>8.1}s",
            loss * 100.0,
            r.goodput_mbps,
            r.lost,
            r.retx,
            if r.lost > 0 { r.retx as f64 / r.lost as f64 } else { 0.0 },
            r.rtos,
            wall.elapsed().as_secs_f64()
        );
    }
}

struct Result {
    goodput_mbps: f64,
    lost: u64,
    retx: u64,
    rtos: u64,
}

fn link(loss: f64, seed: u64) -> Link {
    let mut c = LinkConfig::new(Duration::from_millis(10), seed);
    c.loss = loss;
    c.bandwidth_bps = Some(1_000_000_000);
    c.queue_bytes = 2_500_000; // one BDP
    Link::new(c)
}

fn run(loss: f64, bytes: u64, streams: usize) -> Result {
    let now = Instant::from_millis(0);
    let mut config = Config::default();
    if let Some(mib) = std::env::var("BUF_MIB").ok().and_then(|v| v.parse::<usize>().ok()) {
        config.stream_rx_buffer = mib << 20;
        config.stream_tx_buffer = mib << 20;
    }
    let a = Session::new(SessionId(42), Side::Initiator, config.clone(), now);
    let b = Session::new(SessionId(42), Side::Responder, config, now);
    let mut pair = Pair::new(a, b, link(loss, 1), link(loss, 2), now);
    let mut t = Transfer::start_one_way(&mut pair, streams, bytes).expect("open streams");
    let start = pair.now;
    t.run(&mut pair, Instant::from_secs(600), |_, _, _| {}).expect("transfer completes");
    let secs = (pair.now - start).total_micros() as f64 / 1e6;
    let s = pair.a.stats();
    if std::env::var("VERBOSE").is_ok() {
        eprintln!("{s:?}");
    }
    Result {
        goodput_mbps: (bytes * streams as u64) as f64 * 8.0 / secs / 1e6,
        lost: pair.ab.stats.lost(),
        retx: s.sender.retransmits,
        rtos: s.sender.rtos,
    }
}
