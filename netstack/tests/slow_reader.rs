//! A receiver that reads slower than the path can carry, steadily or in bursts, or that
//! sleeps for half a minute between reads (a laptop lid, a disk that flushes): the receive
//! window closes and opens again over and over. The transfer must go at the reader's pace
//! (or what the window allows per round trip), with no pause longer than the reader's own
//! plus a few round trips: a pause of a retransmission timeout or more would mean bytes were
//! dropped at the window's edge or an acknowledgment was lost in a closed window, and only
//! a timer brought the stream back. Virtual time: the bounds are deterministic.
//!
//! Then random shapes at both ends (writes and reads of any size and pace, any buffer, delay,
//! rate, loss, link MTU): each stream must finish, byte for byte.

mod common;

use common::{MIB, pair_with};
use q2q_netstack::sim::{LinkConfig, Pair};
use q2q_netstack::{Config, Duration};

/// The stream's content: byte `offset` of it is `offset mod 251` (a prime, so a shifted or
/// repeated piece shows).
fn content(offset: u64, buf: &mut [u8]) {
    let mut v = (offset % 251) as u8;
    for b in buf {
        *b = v;
        v = if v == 250 { 0 } else { v + 1 };
    }
}

struct Reader {
    /// Stream buffers (receive and send), bytes.
    buffer: usize,
    /// What the application reads, bits per second, ...
    rate_bps: u64,
    /// ... taken once every this many milliseconds.
    period_ms: u64,
    /// One-way delay of the path, microseconds.
    delay_us: u64,
}

/// What happened: rate in Mbit/s, the longest time between two reads that found data, and
/// the pure ACKs the receiver put before segments that met its closed window.
struct Outcome {
    mbps: f64,
    longest: Duration,
    zero_window_acks: u64,
}

/// What the two applications do: `a` writes `total` bytes, at most `w_chunk` at a time and
/// then waits `w_period`; `b` reads at most `r_chunk` at a time, then waits `r_period`.
struct Shape {
    total: u64,
    w_chunk: usize,
    w_period: Duration,
    r_chunk: usize,
    r_period: Duration,
}

/// Run one stream from `pair.a` to `pair.b` shaped as `s`, checking every byte, until all
/// arrived or `limit` (virtual) passed. Returns the time it took and the longest pause
/// between reads that found data, or what went wrong.
fn transfer(pair: &mut Pair, s: &Shape, limit: Duration) -> Result<(Duration, Duration), String> {
    let id = pair.a.open_stream().map_err(|e| format!("open: {e:?}"))?;
    let mut chunk = vec![0u8; s.w_chunk];
    let (mut scratch, mut expect) = (vec![0u8; s.r_chunk], vec![0u8; s.r_chunk]);
    let (mut sent, mut received) = (0u64, 0u64);
    // The offset `chunk` holds the content of (a blocked send is offered it again).
    let mut filled = None;
    let mut peer = None;
    let start = pair.now;
    let (mut next_write, mut next_read, mut last_data) = (pair.now, pair.now, pair.now);
    let mut longest = Duration::from_micros(0);
    while received < s.total {
        if pair.now > start + limit {
            return Err(format!("stuck at {received} of {} bytes, {sent} sent", s.total));
        }
        // A writer the stream refused waits for room, not for its clock.
        let mut blocked = false;
        while sent < s.total && pair.now >= next_write {
            let n = (s.total - sent).min(s.w_chunk as u64) as usize;
            if filled != Some(sent) {
                content(sent, &mut chunk[..n]);
                filled = Some(sent);
            }
            match pair.a.send(id, &chunk[..n]) {
                Ok(0) | Err(_) => {
                    blocked = true;
                    break;
                }
                Ok(k) => sent += k as u64,
            }
            next_write = pair.now + s.w_period;
        }
        // Time moves no further than either application's next wake-up.
        let writing = sent < s.total && !blocked;
        let wake = if writing { next_read.min(next_write) } else { next_read };
        pair.step_until(Some(wake));
        while pair.a.poll_event().is_some() {}
        while pair.b.poll_event().is_some() {}
        if peer.is_none() {
            peer = pair.b.accept();
        }
        let Some(p) = peer.filter(|_| pair.now >= next_read) else { continue };
        next_read = pair.now + s.r_period;
        if let Ok(n) = pair.b.recv(p, &mut scratch)
            && n > 0
        {
            content(received, &mut expect[..n]);
            if scratch[..n] != expect[..n] {
                return Err(format!("wrong content at {received}"));
            }
            longest = longest.max(pair.now - last_data);
            last_data = pair.now;
            received += n as u64;
        }
    }
    Ok((pair.now - start, longest))
}

fn run(seed: u64, r: &Reader) -> Outcome {
    let mut cfg = LinkConfig::new(Duration::from_micros(r.delay_us), seed);
    cfg.bandwidth_bps = Some(1_000_000_000);
    cfg.queue_bytes = 1_000_000;
    let mut back = cfg.clone();
    back.seed = seed + 1;
    let config =
        Config { stream_rx_buffer: r.buffer, stream_tx_buffer: r.buffer, ..Config::default() };
    let mut pair = pair_with(config, cfg, back);
    let shape = Shape {
        total: 32 * MIB,
        w_chunk: 1 << 16,
        w_period: Duration::from_micros(0),
        r_chunk: (r.rate_bps / 8 * r.period_ms / 1000) as usize,
        r_period: Duration::from_millis(r.period_ms),
    };
    let (took, longest) =
        transfer(&mut pair, &shape, Duration::from_secs(36_000)).unwrap_or_else(|e| panic!("{e}"));
    Outcome {
        mbps: shape.total as f64 * 8.0 / (took.total_micros() as f64 / 1e6) / 1e6,
        longest,
        zero_window_acks: pair.b.stats().zero_window_acks,
    }
}

#[test]
fn a_slow_or_sleeping_reader_sets_the_pace_without_stalls() {
    let cases = [
        // Steady readers, slower than the 1 Gbit/s path.
        Reader { buffer: 256 << 10, rate_bps: 80_000_000, period_ms: 1, delay_us: 100 },
        Reader { buffer: 1 << 20, rate_bps: 200_000_000, period_ms: 1, delay_us: 1000 },
        Reader { buffer: 8 << 20, rate_bps: 100_000_000, period_ms: 1, delay_us: 10_000 },
        // A fast reader: the window per round trip is the limit.
        Reader { buffer: 256 << 10, rate_bps: 1_000_000_000, period_ms: 1, delay_us: 10_000 },
        Reader { buffer: 1 << 20, rate_bps: 1_000_000_000, period_ms: 1, delay_us: 10_000 },
        // Bursts: more than the buffer holds, every 50 to 500 ms.
        Reader { buffer: 256 << 10, rate_bps: 80_000_000, period_ms: 100, delay_us: 100 },
        Reader { buffer: 1 << 20, rate_bps: 200_000_000, period_ms: 50, delay_us: 1000 },
        Reader { buffer: 8 << 20, rate_bps: 100_000_000, period_ms: 200, delay_us: 10_000 },
        Reader { buffer: 256 << 10, rate_bps: 10_000_000, period_ms: 500, delay_us: 10_000 },
        // Asleep for 30 s between reads: the sender probes the closed window meanwhile.
        Reader { buffer: 256 << 10, rate_bps: 1 << 20, period_ms: 30_000, delay_us: 10_000 },
    ];
    for (i, r) in cases.iter().enumerate() {
        let o = run(i as u64 * 2 + 1, r);
        let rtt_s = 2.0 * r.delay_us as f64 / 1e6;
        let window_bits = r.buffer as f64 * 8.0;
        // The most the reader can take: its rate, at most a buffer per read, at most a window
        // per round trip.
        let can = (r.rate_bps as f64)
            .min(window_bits / (r.period_ms as f64 / 1000.0))
            .min(window_bits / rtt_s)
            / 1e6;
        let pause_bound =
            Duration::from_millis(r.period_ms + 50) + Duration::from_micros(8 * r.delay_us);
        eprintln!(
            "buffer {} KiB, reader {} Mbit/s every {} ms, RTT {} ms: {:.2} Mbit/s of {can:.2}, \
             longest pause {} (bound {pause_bound}), zero-window ACKs {}",
            r.buffer >> 10,
            r.rate_bps / 1_000_000,
            r.period_ms,
            rtt_s * 1000.0,
            o.mbps,
            o.longest,
            o.zero_window_acks
        );
        assert!(
            o.mbps >= 0.6 * can,
            "case {i}: {:.2} Mbit/s, the reader could take {can:.2}",
            o.mbps
        );
        assert!(o.longest <= pause_bound, "case {i}: a pause of {}", o.longest);
    }
}

/// One stream with random shapes at both ends: what a writer offers and how often, what a
/// reader takes and how often, stream buffers of any size (so any window scale), links of
/// any delay, rate and loss, segmentation offload on or off and any link MTU. Returns the
/// virtual time it took and the longest pause between reads that found data, or where it
/// got stuck.
fn run_random(seed: u64) -> Result<(Duration, Duration, String), String> {
    let mut rng = q2q_netstack::sim::Rng::new(seed);
    let mut pick = |lo: u64, hi: u64| lo + rng.next_u64() % (hi - lo + 1);
    // Log-uniform: as many small buffers (2-64 KiB, small windows) as large ones.
    let exp = pick(11, 19);
    let buffer = ((1 << exp) + pick(0, (1 << exp) - 1)) as usize;
    let (w_chunk, w_period_us) = (pick(1, 64 << 10) as usize, pick(0, 3) * pick(0, 2000));
    let (r_chunk, r_period_us) =
        (pick(1, 2 * buffer as u64) as usize, pick(0, 3) * pick(0, 20_000));
    let delay_us = pick(50, 10_000);
    let rate = pick(10, 1000) * 1_000_000;
    let loss = [0.0, 0.0, 0.01, 0.05][pick(0, 3) as usize];
    let reorder = [0.0, 0.01][pick(0, 1) as usize];
    let (payload, offload) = (pick(1200, 1400) as usize, [0, 65535][pick(0, 1) as usize]);
    let total = pick(64 << 10, 2 << 20);
    let what = format!(
        "seed {seed}: {total} bytes, buffer {buffer}, writes {w_chunk} every {w_period_us} us, \
         reads {r_chunk} every {r_period_us} us, delay {delay_us} us, {} Mbit/s, loss {loss}, \
         reorder {reorder}, link payload {payload}, offload {offload}",
        rate / 1_000_000
    );
    let mut cfg = LinkConfig::new(Duration::from_micros(delay_us), seed);
    cfg.bandwidth_bps = Some(rate);
    cfg.queue_bytes = 1_000_000;
    cfg.loss = loss;
    cfg.reorder = reorder;
    cfg.reorder_delay = Duration::from_micros(2 * delay_us);
    cfg.duplicate = reorder / 2.0;
    let mut back = cfg.clone();
    back.seed = seed + 1;
    let config = Config {
        stream_rx_buffer: buffer,
        stream_tx_buffer: buffer,
        link_payload: payload,
        segment_offload: offload,
        ..Config::default()
    };
    let mut pair = pair_with(config, cfg, back);
    let shape = Shape {
        total,
        w_chunk,
        w_period: Duration::from_micros(w_period_us),
        r_chunk,
        r_period: Duration::from_micros(r_period_us),
    };
    // Far beyond any honest finish: the applications' own waits, and ten minutes.
    let waits = total / r_chunk as u64 * r_period_us + total / w_chunk as u64 * w_period_us;
    let limit = Duration::from_micros(waits) + Duration::from_secs(600);
    match transfer(&mut pair, &shape, limit) {
        Ok((took, longest)) => Ok((took, longest, what)),
        Err(e) => Err(format!("{what}: {e}")),
    }
}

/// Random shapes at both ends never stall a stream for good, and never lose or change a
/// byte. `Q2Q_STALL_SEEDS=N` runs seeds 0..N (default 200, some 20 s). Without the device's
/// remedy for a reopened window (`zero_window`), 7 of the first 1000 seeds (105 the first)
/// stalled for good a few KiB before their end; with it, 3000 pass.
#[test]
fn any_writer_and_reader_shape_finishes() {
    let seeds = std::env::var("Q2Q_STALL_SEEDS").ok().and_then(|v| v.parse().ok()).unwrap_or(200);
    let mut failures = Vec::new();
    for seed in 0..seeds {
        match run_random(seed) {
            Ok((took, longest, what)) => {
                eprintln!("{what}: {took} virtual, longest pause {longest}")
            }
            Err(e) => failures.push(e),
        }
    }
    assert!(failures.is_empty(), "{} stalled:\n{}", failures.len(), failures.join("\n"));
}
