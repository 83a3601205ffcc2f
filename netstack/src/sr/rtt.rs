//! Round-trip time estimation (RFC 9002 §5), in microseconds.

/// Smoothed RTT, its variation and the minimum, from unambiguous samples (every transmission
/// has its own packet number, so a retransmission never confuses a sample).
#[derive(Debug, Clone)]
pub(crate) struct Rtt {
    pub latest: i64,
    pub smoothed: i64,
    pub var: i64,
    pub min: i64,
    pub has_sample: bool,
}

impl Rtt {
    pub fn new(initial_us: i64) -> Rtt {
        Rtt {
            latest: initial_us,
            smoothed: initial_us,
            var: initial_us / 2,
            min: i64::MAX,
            has_sample: false,
        }
    }

    /// Feed a sample; `ack_delay` is what the receiver said it held the packet.
    pub fn update(&mut self, sample: i64, ack_delay: i64) {
        let sample = sample.max(1);
        self.latest = sample;
        self.min = self.min.min(sample);
        let adjusted =
            if sample >= self.min.saturating_add(ack_delay) { sample - ack_delay } else { sample };
        if !self.has_sample {
            self.has_sample = true;
            self.smoothed = adjusted;
            self.var = adjusted / 2;
        } else {
            let dev = (self.smoothed - adjusted).abs();
            self.var = (3 * self.var + dev) / 4;
            self.smoothed = (7 * self.smoothed + adjusted) / 8;
        }
    }

    /// The retransmission timeout: smoothed + 4 × variation + the peer's ACK delay, at least
    /// `min_us`.
    pub fn rto(&self, max_ack_delay: i64, min_us: i64) -> i64 {
        (self.smoothed + (4 * self.var).max(1000) + max_ack_delay).max(min_us)
    }

    /// How long after a later packet was acknowledged a missing one counts as lost
    /// (RFC 9002's time threshold, 9/8 of the larger of smoothed and latest RTT).
    pub fn loss_delay(&self) -> i64 {
        (self.smoothed.max(self.latest) * 9 / 8).max(1000)
    }
}
