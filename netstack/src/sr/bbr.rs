//! Congestion control for the selective-repeat layer: a compact BBR (v1 shape).
//!
//! The layer hides every loss from TCP, so TCP's own congestion control never backs off;
//! this is the only thing that keeps the link from being flooded. A loss-based controller
//! (Reno, CUBIC) would read random loss as congestion and collapse exactly where this layer
//! is meant to help (1–5 % loss), so it models the path instead: the bottleneck bandwidth is
//! the windowed maximum of measured delivery rates, the propagation delay the windowed
//! minimum RTT, and
//!
//! * in-flight data is capped near **2 × BDP** (`cwnd_gain`), plus what ACKs deliver in
//!   bursts beyond the bandwidth (`extra_acked`, BBR's ACK aggregation estimate: a busy
//!   relay or a peer's scheduler releases ACKs in clumps, and without it the cap idles the
//!   sender between them),
//! * packets are **paced** at `pacing_gain × bandwidth`, cycling 1.25 / 0.75 / 1 … to probe
//!   for more bandwidth and drain the queue it made,
//! * start-up doubles the rate each round until the bandwidth stops growing.
//!
//! Random loss: delivery rates count only what arrived, so at a loss rate `p` they read
//! `(1 - p)` of what the path carried and BBR v1 would spiral down once `1.25 (1 - p) < 1`.
//! While the RTT shows no queue (the round's smallest RTT within a quarter of the minimum),
//! losses are taken as random and samples are scaled by `1 / (1 - p)` (`p` smoothed per
//! round, at most 1/2). With a queue building, samples are used as they are, so real
//! congestion drops are never mistaken for capacity.

use std::collections::VecDeque;

const STARTUP_GAIN: f64 = 2.885;
const CYCLE: [f64; 8] = [1.25, 0.75, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0];
const BW_WINDOW_ROUNDS: u64 = 10;
const MIN_RTT_WINDOW_US: i64 = 10_000_000;
/// The ACK aggregation allowance is at most this much time at the estimated bandwidth
/// (Linux `tcp_bbr`: 100 ms).
const EXTRA_ACKED_MAX_US: f64 = 100_000.0;

/// The largest value of the last [`BW_WINDOW_ROUNDS`] rounds (the windowed max filters of
/// BBR: bandwidth, ACK aggregation).
#[derive(Debug, Default)]
struct RoundMax<T> {
    /// (round, largest value seen in it), oldest first.
    rounds: VecDeque<(u64, T)>,
}

impl<T: Copy + PartialOrd + Default> RoundMax<T> {
    fn update(&mut self, round: u64, value: T) {
        while self.rounds.front().is_some_and(|&(r, _)| r + BW_WINDOW_ROUNDS <= round) {
            self.rounds.pop_front();
        }
        match self.rounds.back_mut() {
            Some((r, v)) if *r == round => {
                if value > *v {
                    *v = value;
                }
            }
            _ => self.rounds.push_back((round, value)),
        }
    }

    fn get(&self) -> T {
        self.rounds.iter().map(|&(_, v)| v).fold(T::default(), |a, v| if v > a { v } else { a })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    Startup,
    Drain,
    ProbeBw,
}

/// One delivery-rate sample (draft-cheng-iccrg-delivery-rate-estimation).
#[derive(Debug, Clone, Copy)]
pub(crate) struct RateSample {
    /// Bytes per second.
    pub rate: f64,
    pub app_limited: bool,
    /// `delivered` when the acknowledged packet was sent (for round counting).
    pub prior_delivered: u64,
}

#[derive(Debug)]
pub(crate) struct Bbr {
    mss: u64,
    initial_cwnd_packets: u64,
    pub mode: Mode,
    /// Delivery rates, bytes per second.
    bw: RoundMax<f64>,
    /// Bytes acknowledged beyond what the bandwidth explains (draft-ietf-ccwg-bbr
    /// `BBR.extra_acked`), and the epoch it is measured over: since `ack_epoch_start`
    /// (µs), `ack_epoch_acked` bytes were acknowledged.
    extra_acked: RoundMax<u64>,
    ack_epoch_start: i64,
    ack_epoch_acked: u64,
    pub min_rtt: i64,
    min_rtt_stamp: i64,
    round: u64,
    next_round_delivered: u64,
    full_bw: f64,
    full_bw_count: u32,
    filled_pipe: bool,
    cycle_index: usize,
    cycle_stamp: i64,
    pacing_gain: f64,
    cwnd_gain: f64,
    pub cwnd: u64,
    round_lost: u64,
    last_round_lost: u64,
    round_acked: u64,
    round_min_rtt: i64,
    pub loss_ewma: f64,
    queue_seen: bool,
    queue_rounds: u8,
    /// The in-flight cap uses at least this RTT (µs); see `Config::cwnd_rtt_floor`.
    pub rtt_floor: i64,
}

impl Bbr {
    pub fn new(mss: u64, initial_cwnd_packets: u64) -> Bbr {
        Bbr {
            mss,
            initial_cwnd_packets,
            mode: Mode::Startup,
            bw: RoundMax::default(),
            extra_acked: RoundMax::default(),
            ack_epoch_start: 0,
            ack_epoch_acked: 0,
            min_rtt: i64::MAX,
            min_rtt_stamp: 0,
            round: 0,
            next_round_delivered: 0,
            full_bw: 0.0,
            full_bw_count: 0,
            filled_pipe: false,
            cycle_index: 0,
            cycle_stamp: 0,
            pacing_gain: STARTUP_GAIN,
            cwnd_gain: STARTUP_GAIN,
            cwnd: initial_cwnd_packets.max(4) * mss,
            round_lost: 0,
            last_round_lost: 0,
            round_acked: 0,
            round_min_rtt: i64::MAX,
            loss_ewma: 0.0,
            queue_seen: false,
            queue_rounds: 0,
            rtt_floor: 0,
        }
    }

    /// Forget the path: start-up again from the initial window, with no bandwidth or RTT
    /// known (the session moved to another path). The RTT floor is a setting: it stays.
    pub fn restart(&mut self) {
        *self = Bbr { rtt_floor: self.rtt_floor, ..Bbr::new(self.mss, self.initial_cwnd_packets) };
    }

    /// Estimated bottleneck bandwidth in bytes per second (0 before the first sample).
    pub fn bandwidth(&self) -> f64 {
        self.bw.get()
    }

    fn bdp(&self) -> Option<f64> {
        let bw = self.bandwidth();
        (bw > 0.0 && self.min_rtt != i64::MAX).then(|| bw * self.min_rtt as f64 / 1e6)
    }

    /// Pacing rate in bytes per second; `srtt` is used before there is a bandwidth sample.
    pub fn pacing_rate(&self, srtt_us: i64) -> f64 {
        let bw = self.bandwidth();
        let base = if bw > 0.0 { bw } else { self.cwnd as f64 * 1e6 / srtt_us.max(1) as f64 };
        (self.pacing_gain * base).max(self.mss as f64 * 100.0)
    }

    /// A new RTT sample.
    pub fn on_rtt(&mut self, now: i64, rtt: i64) {
        if rtt <= self.min_rtt || now - self.min_rtt_stamp > MIN_RTT_WINDOW_US {
            self.min_rtt = rtt;
            self.min_rtt_stamp = now;
        }
        self.round_min_rtt = self.round_min_rtt.min(rtt);
    }

    /// Process an ACK: `acked` bytes newly delivered (total `delivered`), `lost` bytes newly
    /// declared lost, and the rate sample of the newest packet acknowledged.
    pub fn on_ack(
        &mut self,
        now: i64,
        delivered: u64,
        acked: u64,
        lost: u64,
        sample: Option<RateSample>,
        in_flight: u64,
    ) {
        self.round_acked += acked;
        self.round_lost += lost;
        let mut round_start = false;
        if let Some(rs) = sample {
            if rs.prior_delivered >= self.next_round_delivered {
                self.next_round_delivered = delivered;
                self.round += 1;
                round_start = true;
                self.end_round();
            }
            // Scale for random loss only once start-up is over and no queue shows.
            let correction = if self.queue_seen || self.mode != Mode::ProbeBw {
                1.0
            } else {
                1.0 / (1.0 - self.loss_ewma.min(0.5))
            };
            let rate = rs.rate * correction;
            if rate > 0.0 && (!rs.app_limited || rate >= self.bandwidth()) {
                self.bw_update(rate);
            }
        }
        if round_start
            && !self.filled_pipe
            && in_flight >= self.cwnd / 2
            && self.queue_rounds & 1 != 0
            && self.last_round_lost > 0
        {
            // Losses while a queue shows: start-up overshot the bottleneck's buffer. Only
            // when the flight fills at least half the window: a flight far below it (a
            // session that only acknowledges the other side's data) made neither the queue
            // (it is the other traffic's) nor the losses (random), and leaving start-up
            // there froze the estimate at the ACK traffic's rate. BBR exits start-up only
            // on rounds that could have filled the pipe (non-app-limited ones:
            // draft-cardwell-iccrg-bbr-congestion-control-02 §4.3.1 (its second part),
            // draft-ietf-ccwg-bbr `BBRCheckStartupFullBandwidth`); the sample's app-limited
            // mark itself is too broad here, since TCP's own slow start marks most of a
            // fresh start-up.
            self.filled_pipe = true;
        }
        if round_start && !self.filled_pipe {
            let bw = self.bandwidth();
            if bw >= self.full_bw * 1.25 {
                self.full_bw = bw;
                self.full_bw_count = 0;
            } else if sample.is_some_and(|s| !s.app_limited) {
                self.full_bw_count += 1;
                if self.full_bw_count >= 3 {
                    self.filled_pipe = true;
                }
            }
        }
        self.update_ack_aggregation(now, acked);
        let bdp = self.bdp();
        match self.mode {
            Mode::Startup if self.filled_pipe => {
                self.mode = Mode::Drain;
                self.pacing_gain = 1.0 / STARTUP_GAIN;
                self.cwnd_gain = STARTUP_GAIN;
            }
            Mode::Drain if bdp.is_none_or(|b| (in_flight as f64) <= b) => {
                self.enter_probe_bw(now);
            }
            Mode::ProbeBw => {
                let phase = self.min_rtt.clamp(1000, 1_000_000);
                let gain = CYCLE[self.cycle_index];
                let elapsed = now - self.cycle_stamp > phase;
                let advance = if gain > 1.0 {
                    elapsed && (lost > 0 || bdp.is_none_or(|b| in_flight as f64 >= gain * b))
                        || now - self.cycle_stamp > 2 * phase
                } else if gain < 1.0 {
                    elapsed || bdp.is_some_and(|b| in_flight as f64 <= b)
                } else {
                    elapsed
                };
                if advance {
                    self.cycle_index = (self.cycle_index + 1) % CYCLE.len();
                    self.cycle_stamp = now;
                    self.pacing_gain = CYCLE[self.cycle_index];
                }
            }
            _ => {}
        }
        // In-flight cap, with the RTT floored for coarse drivers (`Config::cwnd_rtt_floor`).
        let floor = (self.min_rtt != i64::MAX && self.min_rtt < self.rtt_floor)
            .then(|| self.bandwidth() * self.rtt_floor as f64 / 1e6);
        // Once the pipe is full, room for the ACKs that come in clumps (Linux adds it then).
        let aggregation = if self.filled_pipe {
            self.extra_acked.get().min((self.bandwidth() * EXTRA_ACKED_MAX_US / 1e6) as u64)
        } else {
            0
        };
        let target = match bdp.map(|b| floor.map_or(b, |f| b.max(f))) {
            Some(b) => (self.cwnd_gain * b) as u64 + 4 * self.mss + aggregation,
            None => u64::MAX,
        };
        if self.filled_pipe {
            self.cwnd = (self.cwnd + acked).min(target);
        } else if self.cwnd < target {
            self.cwnd += acked;
        }
        self.cwnd = self.cwnd.max(4 * self.mss);
    }

    fn enter_probe_bw(&mut self, now: i64) {
        self.mode = Mode::ProbeBw;
        self.cwnd_gain = 2.0;
        self.cycle_index = 2; // start cruising; the probe comes around soon
        self.cycle_stamp = now;
        self.pacing_gain = CYCLE[self.cycle_index];
    }

    fn end_round(&mut self) {
        let total = self.round_acked + self.round_lost;
        // A standing queue: the best RTT this round is well above the path's minimum.
        if self.round_min_rtt != i64::MAX && self.min_rtt != i64::MAX {
            let slack = (self.min_rtt / 4).max(2000);
            let queue = self.round_min_rtt > self.min_rtt + slack;
            self.queue_rounds = (self.queue_rounds << 1) | u8::from(queue);
            self.queue_seen = self.queue_rounds & 0b111 != 0;
        }
        // Losses count as random only when no queue showed in this or the two rounds before
        // (a drop is detected about a round after it happened).
        if total > 0 && !self.queue_seen {
            let p = self.round_lost as f64 / total as f64;
            self.loss_ewma = 0.75 * self.loss_ewma + 0.25 * p;
        }
        self.last_round_lost = self.round_lost;
        self.round_acked = 0;
        self.round_lost = 0;
        self.round_min_rtt = i64::MAX;
    }

    fn bw_update(&mut self, rate: f64) {
        self.bw.update(self.round, rate);
    }

    /// ACK aggregation (draft-ietf-ccwg-bbr `BBRUpdateACKAggregation`, Linux
    /// `bbr_update_ack_aggregation`): within an epoch that starts whenever ACKs fall behind
    /// the bandwidth, the bytes acknowledged beyond `bandwidth × time`, kept as a windowed
    /// max and at most a window's worth.
    fn update_ack_aggregation(&mut self, now: i64, acked: u64) {
        let bw = self.bandwidth();
        if bw <= 0.0 || acked == 0 {
            return;
        }
        let mut expected = bw * (now - self.ack_epoch_start).max(0) as f64 / 1e6;
        if self.ack_epoch_acked as f64 <= expected {
            self.ack_epoch_acked = 0;
            self.ack_epoch_start = now;
            expected = 0.0;
        }
        self.ack_epoch_acked += acked;
        let extra = (self.ack_epoch_acked as f64 - expected).max(0.0) as u64;
        self.extra_acked.update(self.round, extra.min(self.cwnd));
    }

    /// The retransmission timer fired: nothing came back for a while. Keep the model (BBR
    /// does not trust a timeout as a congestion signal) but stop bursting.
    pub fn on_rto(&mut self) {
        self.cycle_index = 2;
        self.pacing_gain = if self.mode == Mode::ProbeBw { 1.0 } else { self.pacing_gain };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MSS: u64 = 1400;
    /// 1 Gbit/s in bytes per second.
    const BW: f64 = 125e6;

    /// A BBR past start-up on a 1 ms path at [`BW`], fed ACKs of `every_us` worth of
    /// delivery each, for 200 ms; its window at the end.
    fn window_with_acks_every(every_us: i64) -> u64 {
        let mut b = Bbr::new(MSS, 32);
        b.on_rtt(0, 1000);
        b.filled_pipe = true;
        b.enter_probe_bw(0);
        let per_ack = (BW * every_us as f64 / 1e6) as u64;
        let mut delivered = 0;
        let mut now = 0;
        while now < 200_000 {
            now += every_us;
            let prior = delivered;
            delivered += per_ack;
            let sample = RateSample { rate: BW, app_limited: false, prior_delivered: prior };
            b.on_ack(now, delivered, per_ack, 0, Some(sample), u64::MAX / 2);
        }
        b.cwnd
    }

    #[test]
    fn acks_in_clumps_widen_the_window_by_what_a_clump_delivers() {
        let bdp = (BW * 1e-3) as u64;
        // ACKs every 100 µs: the window is 2 × BDP and a little.
        let smooth = window_with_acks_every(100);
        assert!(smooth >= 2 * bdp, "{smooth}");
        assert!(smooth <= 2 * bdp + 4 * MSS + 2 * (BW * 100e-6) as u64, "{smooth}");
        // One ACK every 4 ms (a clump of 4 ms of delivery): without room for a clump the
        // sender would idle until the next one.
        let clumped = window_with_acks_every(4000);
        assert!(clumped >= 2 * bdp + (BW * 3.5e-3) as u64, "{clumped} vs {smooth}");
    }

    #[test]
    fn the_aggregation_allowance_is_bounded() {
        // ACKs a whole second apart: at most 100 ms at the bandwidth is added.
        let w = window_with_acks_every(1_000_000);
        let bdp = (BW * 1e-3) as u64;
        assert!(w <= 2 * bdp + 4 * MSS + (BW * 0.1) as u64, "{w}");
    }

    #[test]
    fn round_max_keeps_the_largest_of_the_last_rounds() {
        let mut m = RoundMax::<u64>::default();
        m.update(0, 5);
        m.update(0, 3);
        m.update(1, 4);
        assert_eq!(m.get(), 5);
        m.update(BW_WINDOW_ROUNDS, 1);
        assert_eq!(m.get(), 4, "round 0 left the window");
        m.update(3 * BW_WINDOW_ROUNDS, 2);
        assert_eq!(m.get(), 2);
    }
}
