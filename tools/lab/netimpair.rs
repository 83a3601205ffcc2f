//! A userspace impairment hop for the network lab, in place of `tc netem` (missing from
//! these kernels, see `shared/LAB.md`): random loss, a fixed one-way delay and a rate-limited
//! bottleneck with a tail-drop queue, applied to every IP packet a router forwards.
//!
//! It creates one TUN device per direction (`--dev NAME`, repeatable) and one output device
//! (`--out NAME`). The lab routes what arrives on a router interface into a direction's
//! device with policy routing (`ip rule add iif to-a lookup 101`, table 101: `default dev
//! imp-a`); the program reads the packet, decides its fate, and writes it to the output
//! device at its due time, where the kernel routes it on as if it had arrived there (so the
//! router's reverse-path filter must be off for that device). Each direction has its own
//! bottleneck, as in `q2q_netstack::sim::Link`: the packet waits for the bottleneck
//! (`--rate-mbit`; dropped when more than `--queue-bytes` wait), then is lost with
//! probability `--loss`, else arrives `--delay-ms` later. Order within a direction is kept.
//!
//! Packets are read by one thread per direction and written by another, which sleeps until
//! the head of its delay line is due (`std::thread::sleep`: tens of µs late at most, no 1 ms
//! timer tick). Runs for `--seconds` (bounded), then prints per-direction counters and exits;
//! the devices vanish with the process.
//!
//! `netimpair --dev imp-a --dev imp-b --out imp-o --loss 0.01 --delay-ms 10 --rate-mbit 1000`

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Parser;
use rand::{Rng as _, SeedableRng as _};

#[derive(Parser, Debug)]
#[command(about = "Impair forwarded packets: random loss, delay, a rate-limited bottleneck")]
struct Args {
    /// Input TUN device to create, one per direction (each gets its own bottleneck).
    #[arg(long = "dev", required = true)]
    devs: Vec<String>,
    /// Output TUN device to create: packets re-enter the kernel here.
    #[arg(long)]
    out: String,
    /// Probability that a packet is lost, after it used the bottleneck.
    #[arg(long, default_value_t = 0.0)]
    loss: f64,
    /// One-way delay added to every packet, milliseconds.
    #[arg(long, default_value_t = 0.0)]
    delay_ms: f64,
    /// Bottleneck rate in Mbit/s (bits of IP packets); 0: unlimited.
    #[arg(long, default_value_t = 0.0)]
    rate_mbit: f64,
    /// Bytes that may wait for the bottleneck before packets are dropped (tail drop).
    #[arg(long, default_value_t = 2_500_000)]
    queue_bytes: u64,
    /// Seed of the loss decisions (direction `i` uses `seed + i`).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Exit after this many seconds.
    #[arg(long, default_value_t = 600)]
    seconds: u64,
    /// Rewrite the counters to this file every second (and print them at the end).
    #[arg(long)]
    stats: Option<std::path::PathBuf>,
}

#[derive(Default)]
struct Counters {
    packets: AtomicU64,
    bytes: AtomicU64,
    lost_random: AtomicU64,
    lost_queue: AtomicU64,
    forwarded: AtomicU64,
}

/// The fate of one packet, decided when it arrives (sans-IO: times in µs since the start).
struct Bottleneck {
    /// µs per byte; 0 when unlimited.
    us_per_byte: f64,
    queue_bytes: f64,
    busy_until: f64,
    delay_us: f64,
    loss: f64,
    rng: rand::rngs::StdRng,
}

enum Fate {
    LostQueue,
    LostRandom,
    Deliver(f64),
}

impl Bottleneck {
    fn decide(&mut self, now_us: f64, len: usize) -> Fate {
        let mut depart = now_us;
        if self.us_per_byte > 0.0 {
            let backlog = (self.busy_until - now_us).max(0.0) / self.us_per_byte;
            if backlog + len as f64 > self.queue_bytes {
                return Fate::LostQueue;
            }
            depart = self.busy_until.max(now_us) + len as f64 * self.us_per_byte;
            self.busy_until = depart;
        }
        if self.loss > 0.0 && self.rng.random::<f64>() < self.loss {
            return Fate::LostRandom;
        }
        Fate::Deliver(depart + self.delay_us)
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!((0.0..=1.0).contains(&args.loss), "--loss must be within 0..1");
    anyhow::ensure!(args.delay_ms >= 0.0 && args.rate_mbit >= 0.0, "negative delay or rate");
    let out = Arc::new(
        tun_rs::DeviceBuilder::new()
            .name(&args.out)
            .build_sync()
            .with_context(|| format!("creating {}", args.out))?,
    );
    let start = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let mut handles = Vec::new();
    let mut all = Vec::new();
    for (i, name) in args.devs.iter().enumerate() {
        let dev = tun_rs::DeviceBuilder::new()
            .name(name)
            .build_sync()
            .with_context(|| format!("creating {name}"))?;
        let counters = Arc::new(Counters::default());
        all.push((name.clone(), counters.clone()));
        let mut bottleneck = Bottleneck {
            us_per_byte: if args.rate_mbit > 0.0 { 8.0 / args.rate_mbit } else { 0.0 },
            queue_bytes: args.queue_bytes as f64,
            busy_until: 0.0,
            delay_us: args.delay_ms * 1000.0,
            loss: args.loss,
            rng: rand::rngs::StdRng::seed_from_u64(args.seed.wrapping_add(i as u64)),
        };
        let (tx, rx) = mpsc::channel::<(f64, Vec<u8>)>();
        let c = counters.clone();
        handles.push(std::thread::spawn(move || {
            let mut buf = vec![0u8; 65536];
            loop {
                let n = match dev.recv(&mut buf) {
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        eprintln!("netimpair: reading: {e}");
                        return;
                    }
                };
                let now = start.elapsed().as_secs_f64() * 1e6;
                c.packets.fetch_add(1, Ordering::Relaxed);
                c.bytes.fetch_add(n as u64, Ordering::Relaxed);
                match bottleneck.decide(now, n) {
                    Fate::LostQueue => {
                        c.lost_queue.fetch_add(1, Ordering::Relaxed);
                    }
                    Fate::LostRandom => {
                        c.lost_random.fetch_add(1, Ordering::Relaxed);
                    }
                    Fate::Deliver(at) => {
                        if tx.send((at, buf[..n].to_vec())).is_err() {
                            return;
                        }
                    }
                }
            }
        }));
        let (out, c, stop) = (out.clone(), counters, stop.clone());
        handles.push(std::thread::spawn(move || {
            let mut line: VecDeque<(f64, Vec<u8>)> = VecDeque::new();
            while !stop.load(Ordering::Relaxed) {
                while let Ok(p) = rx.try_recv() {
                    line.push_back(p);
                }
                let Some(&(at, _)) = line.front() else {
                    match rx.recv_timeout(Duration::from_millis(100)) {
                        Ok(p) => line.push_back(p),
                        Err(mpsc::RecvTimeoutError::Timeout) => {}
                        Err(mpsc::RecvTimeoutError::Disconnected) => return,
                    }
                    continue;
                };
                let now = start.elapsed().as_secs_f64() * 1e6;
                if at > now {
                    std::thread::sleep(Duration::from_micros(((at - now) as u64).min(100_000)));
                    continue;
                }
                while line.front().is_some_and(|&(at, _)| at <= now) {
                    if let Some((_, p)) = line.pop_front() {
                        // A full output queue drops the packet as a router would.
                        if out.send(&p).is_ok() {
                            c.forwarded.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            }
        }));
    }
    println!("netimpair: ready");
    let report = || {
        let mut text = String::new();
        for (name, c) in &all {
            text += &format!(
                "{name}: {} packets {} bytes, lost {} at random, {} to the full queue, {} forwarded\n",
                c.packets.load(Ordering::Relaxed),
                c.bytes.load(Ordering::Relaxed),
                c.lost_random.load(Ordering::Relaxed),
                c.lost_queue.load(Ordering::Relaxed),
                c.forwarded.load(Ordering::Relaxed),
            );
        }
        text
    };
    let end = start + Duration::from_secs(args.seconds);
    while Instant::now() < end {
        std::thread::sleep(Duration::from_secs(1).min(end - Instant::now()));
        if let Some(path) = &args.stats {
            let tmp = path.with_extension("tmp");
            std::fs::write(&tmp, report()).and_then(|()| std::fs::rename(&tmp, path))?;
        }
    }
    stop.store(true, Ordering::Relaxed);
    print!("{}", report());
    // The reader threads block in `recv`; the process ends with them.
    Ok(())
}
