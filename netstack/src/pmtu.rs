//! Path MTU discovery for PTCP: Datagram Packetization Layer PMTUD (DPLPMTUD, RFC 8899), the
//! way QUIC does it (RFC 9000 §14.3), with no reliance on ICMP.
//!
//! ```text
//!   session start / path change ──▶ PLPMTU = BASE_PLPMTU − framing overhead
//!        │
//!        ▼  Search: padded PmtuProbe datagrams, one outstanding, MAX_PROBES per size;
//!        │  first the configured maximum, then a binary search between the largest size
//!        │  acknowledged and the smallest that failed, down to SEARCH_GRANULARITY bytes
//!        ▼
//!   Search complete ──(PMTU_RAISE_TIMER, 600 s)──▶ Search again, upward only
//!        │
//!        └── black hole (datagrams above BASE keep being lost, see below) ──▶ back to BASE
//! ```
//!
//! The smoltcp interface keeps its own MTU (`Config::link_payload`); the selective-repeat
//! sender splits a packet whose `Data` datagram would exceed the current PLPMTU into
//! [`crate::wire::Fragment`]s, and every retransmission is split at the PLPMTU of *its* time,
//! so data first sent at a size the path no longer carries is resent in smaller pieces: a
//! shrinking path stalls a transfer for a few timeouts, it does not kill it.
//!
//! **When a probe counts as lost.** Only when the path is shown to be alive without it: a
//! transmission sent *after* the probe was acknowledged, and a retransmission timeout's
//! worth of time has passed since the probe (QUIC's packet- and time-threshold loss
//! detection, RFC 9002 §6.1, rather than RFC 8899's generic 15 s `PROBE_TIMER`, which is
//! meant for packetization layers without an RTT estimate). A probe sent on an idle session
//! is followed by a keepalive to provide that evidence. During an outage nothing is acked,
//! so probes are neither counted lost nor repeated: an outage cannot talk the search down.
//! No probe is sent while retransmission timeouts are backing off.
//!
//! **Black-hole detection (RFC 8899 §4.3).** After a retransmission timeout the sender
//! resends only a couple of packets until an ACK arrives, and sends them at BASE size (in
//! fragments): small enough for any path. A black hole then looks like this: the timeout
//! declares transmissions larger than BASE lost, the small retransmissions get through and
//! are acknowledged, sending resumes at the PLPMTU, and the next timeout again finds only
//! large transmissions lost. The PLPMTU falls back to BASE after [`BLACK_HOLE_RTOS`] such
//! timeouts with no transmission larger than BASE acknowledged in between (Linux's TCP
//! PLPMTUD likewise falls back after 3 timeouts, `tcp_mtu_probing`). Random loss does not
//! look like that: once the small retransmissions are through, the window resent at the
//! PLPMTU gets some large datagrams acknowledged, which resets the count. An outage does
//! not either: after its first timeout only small retransmissions are in flight, so further
//! timeouts do not count. The rule does not wait for proof that small datagrams pass while
//! large ones do not before the timeouts, because on a one-way transfer into a black hole
//! the peer has nothing to acknowledge and sends nothing.
//!
//! **Probes on a lossy path.** A probe (and its ack) is lost at random as often as data.
//! [`MAX_PROBES`] is RFC 8899's default; where the selective-repeat layer measures random
//! loss, more probes per size are sent so that a size the path carries is wrongly given up
//! with a chance below 1 % ([`probes_for_loss`]).

use smoltcp::time::Duration;

/// The PLPMTU every session and every path starts at, in bytes of UDP payload per datagram
/// (RFC 9000 §14: every IPv4 and IPv6 path used by QUIC carries 1200-byte UDP payloads;
/// RFC 8899 §5.1.2 `BASE_PLPMTU`). The driver's framing overhead is subtracted from it.
pub const BASE_PLPMTU: usize = 1200;

/// Probes of one size before the size counts as not carried (RFC 8899 §5.1.2).
pub const MAX_PROBES: u32 = 3;

/// After a completed search below the maximum, search again this much later in case the
/// path grew (RFC 8899 §5.1.1 `PMTU_RAISE_TIMER`, 600 s).
pub const PMTU_RAISE_TIMER: Duration = Duration::from_secs(600);

/// The search stops when the largest size known to pass and the smallest known to fail are
/// closer than this, in bytes.
pub const SEARCH_GRANULARITY: usize = 4;

/// Retransmission timeouts that declared transmissions larger than BASE lost, with none
/// larger than BASE acknowledged in between, that make a black hole (see the module docs).
pub const BLACK_HOLE_RTOS: u32 = 3;

/// Probes per size on a path losing a fraction `loss` of datagrams at random: at least
/// [`MAX_PROBES`], and enough that a probe and its ack both fail every time with a chance
/// below 1 % (at most 10).
pub fn probes_for_loss(loss: f64) -> u32 {
    let fail = 1.0 - (1.0 - loss.clamp(0.0, 0.9)).powi(2);
    if fail <= 0.0 {
        return MAX_PROBES;
    }
    let n = (0.01f64.ln() / fail.ln()).ceil();
    if n.is_finite() { (n as u32).clamp(MAX_PROBES, 10) } else { MAX_PROBES }
}

/// The smallest BASE a large framing overhead may leave, in bytes.
const MIN_BASE: usize = 256;

#[derive(Debug, Clone, Copy)]
struct Search {
    /// Largest size known to pass.
    lo: usize,
    /// Largest size not known to fail.
    hi: usize,
    /// Whether `hi` was probed already (the first probe of a search is the maximum).
    tried_hi: bool,
    /// Probes lost at the current size.
    fails: u32,
}

#[derive(Debug, Clone, Copy)]
struct Probe {
    id: u32,
    size: usize,
    sent: i64,
    timeout: i64,
    /// Transmissions numbered from here on were sent after the probe.
    mark_pn: u64,
    /// One of them was acknowledged: the path is alive.
    evidence: bool,
}

/// The DPLPMTUD state of one session's path. Times in µs.
#[derive(Debug)]
pub(crate) struct Pmtud {
    /// BASE_PLPMTU minus the path's framing overhead, bytes.
    pub base: usize,
    /// The configured maximum, bytes.
    pub max: usize,
    /// The current PLPMTU: the largest datagram sent outside probes, bytes.
    pub plpmtu: usize,
    search: Option<Search>,
    raise_at: Option<i64>,
    probe: Option<Probe>,
    next_id: u32,
    big_rtos: u32,
    /// Probes sent, acknowledged, and black holes detected.
    pub probes_sent: u64,
    pub probes_acked: u64,
    pub black_holes: u64,
}

impl Pmtud {
    pub fn new(max: usize) -> Pmtud {
        let mut p = Pmtud {
            base: BASE_PLPMTU,
            max,
            plpmtu: BASE_PLPMTU,
            search: None,
            raise_at: None,
            probe: None,
            next_id: 0,
            big_rtos: 0,
            probes_sent: 0,
            probes_acked: 0,
            black_holes: 0,
        };
        p.reset(0);
        p
    }

    /// A new path whose framing adds `overhead` bytes in front of each datagram: back to
    /// BASE and search anew.
    pub fn reset(&mut self, overhead: usize) {
        self.base = BASE_PLPMTU.saturating_sub(overhead).max(MIN_BASE);
        self.max = self.max.max(self.base);
        self.plpmtu = self.base;
        self.probe = None;
        self.big_rtos = 0;
        self.start_search();
    }

    fn start_search(&mut self) {
        self.raise_at = None;
        self.search = (self.plpmtu < self.max).then_some(Search {
            lo: self.plpmtu,
            hi: self.max,
            tried_hi: false,
            fails: 0,
        });
    }

    /// The size to probe next, finishing the search when there is none.
    fn next_size(&mut self, now: i64) -> Option<usize> {
        let s = self.search?;
        let size = if s.hi <= s.lo {
            None
        } else if !s.tried_hi {
            Some(s.hi)
        } else if s.hi - s.lo < SEARCH_GRANULARITY {
            None
        } else {
            Some(s.lo + (s.hi - s.lo).div_ceil(2))
        };
        if size.is_none() {
            self.search = None;
            self.raise_at =
                (self.plpmtu < self.max).then(|| now + PMTU_RAISE_TIMER.total_micros() as i64);
        }
        size
    }

    /// Whether a probe may be sent now: searching, none outstanding, and the path is not in
    /// retransmission-timeout backoff (`alive`).
    pub fn probe_ready(&self, alive: bool) -> bool {
        alive && self.probe.is_none() && self.search.is_some()
    }

    /// Take the next probe to send: `(id, size)`. `timeout` (µs) is how long after it was
    /// sent, with evidence of a live path, it counts as lost; `mark_pn` the first
    /// transmission number sent after it.
    pub fn take_probe(
        &mut self,
        now: i64,
        alive: bool,
        timeout: i64,
        mark_pn: u64,
    ) -> Option<(u32, usize)> {
        if !self.probe_ready(alive) {
            return None;
        }
        let size = self.next_size(now)?;
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        self.probe = Some(Probe { id, size, sent: now, timeout, mark_pn, evidence: false });
        self.probes_sent += 1;
        Some((id, size))
    }

    /// The peer acknowledged probe `id` of `size` bytes. Returns whether the PLPMTU grew.
    pub fn on_probe_ack(&mut self, now: i64, id: u32, size: usize) -> bool {
        let Some(p) = self.probe.filter(|p| p.id == id && p.size == size) else { return false };
        self.probe = None;
        self.probes_acked += 1;
        let grew = size > self.plpmtu;
        self.plpmtu = self.plpmtu.max(size);
        if let Some(s) = &mut self.search {
            s.lo = s.lo.max(p.size);
            s.hi = s.hi.max(s.lo);
            s.fails = 0;
            if !s.tried_hi && s.lo >= s.hi {
                s.tried_hi = true;
            }
        }
        // Finish the search at once if nothing is left to probe.
        if self.search.is_some_and(|s| s.tried_hi && s.hi - s.lo < SEARCH_GRANULARITY) {
            let _ = self.next_size(now);
        }
        grew
    }

    /// The largest transmission number acknowledged so far.
    pub fn on_largest_acked(&mut self, largest_pn: u64) {
        if let Some(p) = &mut self.probe
            && largest_pn >= p.mark_pn
        {
            p.evidence = true;
        }
    }

    /// Run the probe and raise timers; `probes` is how many probes of one size must be lost
    /// before the size counts as not carried ([`probes_for_loss`]).
    pub fn on_timer(&mut self, now: i64, probes: u32) {
        if let Some(p) = self.probe
            && p.evidence
            && now - p.sent >= p.timeout
        {
            self.probe = None;
            if let Some(s) = &mut self.search {
                s.fails += 1;
                if s.fails >= probes.max(1) {
                    s.fails = 0;
                    s.tried_hi = true;
                    s.hi = p.size.saturating_sub(1).max(s.lo);
                }
            }
            if self.search.is_some_and(|s| s.tried_hi && s.hi - s.lo < SEARCH_GRANULARITY) {
                let _ = self.next_size(now);
            }
        }
        if self.raise_at.is_some_and(|t| t <= now) {
            self.start_search();
        }
    }

    /// When [`Pmtud::on_timer`] has something to do.
    pub fn deadline(&self) -> Option<i64> {
        let probe = self.probe.filter(|p| p.evidence).map(|p| p.sent + p.timeout);
        match (probe, self.raise_at) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Whether a datagram of `len` bytes counts as larger than BASE.
    pub fn is_big(&self, len: usize) -> bool {
        len > self.base
    }

    /// A transmission larger than BASE was acknowledged.
    pub fn on_big_acked(&mut self) {
        self.big_rtos = 0;
    }

    /// A retransmission timeout declared transmissions larger than BASE lost. Returns
    /// whether that makes a black hole (see the module docs): then the PLPMTU is back at
    /// BASE and a new search starts; the caller resends what was in flight at larger sizes.
    pub fn on_big_rto(&mut self) -> bool {
        self.big_rtos += 1;
        if self.big_rtos < BLACK_HOLE_RTOS {
            return false;
        }
        self.black_holes += 1;
        self.plpmtu = self.base;
        self.probe = None;
        self.big_rtos = 0;
        self.start_search();
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Drive a search against a path carrying `path` bytes; returns the final PLPMTU and the
    /// probes it took.
    fn search(max: usize, path: usize) -> (usize, u64) {
        let mut p = Pmtud::new(max);
        let mut now = 0;
        let mut pn = 0;
        for _ in 0..200 {
            now += 1000;
            p.on_timer(now, MAX_PROBES);
            let Some((id, size)) = p.take_probe(now, true, 500, pn) else { break };
            if size <= path {
                assert!(p.on_probe_ack(now + 10, id, size) || size <= p.plpmtu);
            } else {
                pn += 1;
                p.on_largest_acked(pn);
            }
        }
        assert!(p.search.is_none(), "search finished");
        (p.plpmtu, p.probes_sent)
    }

    #[test]
    fn finds_the_path_mtu() {
        assert_eq!(search(1452, 1472), (1452, 1));
        let (mtu, probes) = search(1452, 1252);
        assert!((1252 - SEARCH_GRANULARITY..=1252).contains(&mtu), "{mtu}");
        assert!(probes <= 30, "{probes}");
        assert_eq!(search(1452, 1100).0, BASE_PLPMTU);
    }

    #[test]
    fn more_probes_on_lossy_paths() {
        assert_eq!(probes_for_loss(0.0), MAX_PROBES);
        assert_eq!(probes_for_loss(0.01), MAX_PROBES);
        assert_eq!(probes_for_loss(1.0 / 3.0), 8);
        assert_eq!(probes_for_loss(0.9), 10);
        assert_eq!(probes_for_loss(f64::NAN), MAX_PROBES);
    }

    #[test]
    fn no_evidence_no_loss() {
        let mut p = Pmtud::new(1452);
        let (id, size) = p.take_probe(0, true, 500, 10).unwrap();
        assert_eq!(size, 1452);
        p.on_timer(1_000_000_000, MAX_PROBES);
        assert!(p.take_probe(1_000_000_000, true, 500, 10).is_none(), "still outstanding");
        p.on_largest_acked(9);
        p.on_timer(1_000_000_001, MAX_PROBES);
        assert!(p.probe.is_some());
        assert!(p.on_probe_ack(1_000_000_002, id, size));
        assert_eq!(p.plpmtu, 1452);
    }

    #[test]
    fn black_hole_needs_timeouts_in_a_row() {
        let mut p = Pmtud::new(1452);
        let (id, size) = p.take_probe(0, true, 500, 0).unwrap();
        p.on_probe_ack(1, id, size);
        assert_eq!(p.plpmtu, 1452);
        assert!(!p.on_big_rto());
        assert!(!p.on_big_rto());
        p.on_big_acked();
        assert!(!p.on_big_rto());
        assert!(!p.on_big_rto());
        assert!(p.on_big_rto());
        assert_eq!(p.plpmtu, BASE_PLPMTU);
        assert!(p.probe_ready(true));
        p.reset(18);
        assert_eq!(p.plpmtu, BASE_PLPMTU - 18);
    }
}
