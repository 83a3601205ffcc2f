//! Helpers shared by the path-MTU and outage simulations.
#![allow(dead_code)]

use std::cell::Cell;
use std::collections::HashMap;
use std::rc::Rc;

use q2q_netstack::sim::{Dir, Link, LinkConfig, Pair, Transfer, pattern};
use q2q_netstack::wire::SessionId;
use q2q_netstack::{Config, Duration, Instant, Session, Side};
use ring::digest::{Context, SHA256};

pub const MIB: u64 = 1 << 20;

/// A 20 ms RTT, 500 Mbit/s path with a little jitter and reordering.
pub fn link(seed: u64) -> LinkConfig {
    let mut c = LinkConfig::new(Duration::from_millis(10), seed);
    c.jitter = Duration::from_micros(300);
    c.reorder = 0.002;
    c.reorder_delay = Duration::from_millis(3);
    c.bandwidth_bps = Some(500_000_000);
    c.queue_bytes = 1_500_000;
    c
}

pub fn pair_with(config: Config, ab: LinkConfig, ba: LinkConfig) -> Pair {
    let now = Instant::from_millis(0);
    let a = Session::new(SessionId(0x0123_4567_89ab_cdef), Side::Initiator, config.clone(), now);
    let b = Session::new(SessionId(0x0123_4567_89ab_cdef), Side::Responder, config, now);
    Pair::new(a, b, Link::new(ab), Link::new(ba), now)
}

pub fn expected_digest(index: u64, dir: Dir, bytes: u64) -> Vec<u8> {
    let mut ctx = Context::new(&SHA256);
    let mut buf = vec![0u8; 1 << 16];
    let mut off = 0;
    while off < bytes {
        let n = (bytes - off).min(buf.len() as u64) as usize;
        pattern(index, dir, off, &mut buf[..n]);
        ctx.update(&buf[..n]);
        off += n as u64;
    }
    ctx.finish().as_ref().to_vec()
}

/// A both-ways transfer run in slices of virtual time, hashing what arrives and noting
/// when data last moved.
pub struct Run {
    pub t: Transfer,
    hashes: HashMap<(Dir, u64), Context>,
    /// Bytes received so far, both ways.
    pub received: Rc<Cell<u64>>,
    streams: usize,
    bytes: u64,
}

impl Run {
    pub fn start(pair: &mut Pair, streams: usize, bytes: u64) -> Run {
        let t = Transfer::start(pair, streams, bytes).expect("open streams");
        Run { t, hashes: HashMap::new(), received: Rc::new(Cell::new(0)), streams, bytes }
    }

    /// Run until `until` (virtual) or done; `Ok(true)` when done.
    pub fn run_until(&mut self, pair: &mut Pair, until: Instant) -> Result<bool, String> {
        let hashes = &mut self.hashes;
        let received = self.received.clone();
        match self.t.run(pair, until, |dir, index, data| {
            received.set(received.get() + data.len() as u64);
            hashes.entry((dir, index)).or_insert_with(|| Context::new(&SHA256)).update(data);
        }) {
            Ok(()) => Ok(true),
            Err(e) if e.starts_with("deadline passed") => Ok(false),
            Err(e) => Err(format!("{e}; errors {:?}", self.t.errors)),
        }
    }

    /// Run to the end in `slice` steps, until `deadline`; returns the longest time (µs)
    /// data did not move at all, measured in slices, after `from`.
    pub fn finish(
        &mut self,
        pair: &mut Pair,
        slice: Duration,
        deadline: Instant,
        from: Instant,
    ) -> Result<i64, String> {
        let mut last_move = pair.now;
        let mut last_bytes = self.received.get();
        let mut longest = 0;
        loop {
            let until = pair.now + slice;
            let done = self.run_until(pair, until)?;
            if self.received.get() != last_bytes || done {
                if pair.now >= from {
                    longest = longest.max((pair.now - last_move.max(from)).total_micros() as i64);
                }
                last_bytes = self.received.get();
                last_move = pair.now;
            }
            if done {
                return Ok(longest);
            }
            if pair.now > deadline {
                return Err(format!("deadline passed: {} bytes received", last_bytes));
            }
        }
    }

    /// Check every stream's content.
    pub fn verify(mut self) {
        assert!(self.t.errors.is_empty(), "{:?}", self.t.errors);
        assert_eq!(self.hashes.len(), 2 * self.streams);
        for dir in [Dir::AtoB, Dir::BtoA] {
            for i in 0..self.streams as u64 {
                let got = self.hashes.remove(&(dir, i)).expect("stream data").finish();
                assert_eq!(
                    got.as_ref(),
                    &expected_digest(i, dir, self.bytes)[..],
                    "stream {i} {dir:?} content"
                );
            }
        }
    }
}
