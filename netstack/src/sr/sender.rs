//! The sending half of the selective-repeat layer.

use std::collections::VecDeque;

use super::bbr::{Bbr, RateSample};
use super::rtt::Rtt;
use crate::pmtu::Pmtud;
use crate::wire::{Ack, Data, Fragment, PmtuProbe, SessionId};

/// Reordering tolerance at start: a packet is lost once one sent this many transmissions
/// later arrived (RFC 9002). Doubled, up to [`MAX_PACKET_THRESHOLD`], each time a
/// retransmission turns out to have been spurious (the original arrived after all), so a
/// path that reorders stops costing retransmissions.
const PACKET_THRESHOLD: u64 = 3;
const MAX_PACKET_THRESHOLD: u64 = 1024;

/// Transmissions allowed after the first retransmission timeout until an ACK shows the path
/// alive again, and after each further one: the path may be down for minutes, so it is
/// probed with a retransmission of the oldest packet, not flooded with the whole window
/// each period (TCP likewise restarts from one segment after a timeout, RFC 5681 §3.1).
const RTO_FIRST_BUDGET: u32 = 2;
const RTO_LATER_BUDGET: u32 = 1;

#[derive(Debug)]
struct Slot {
    payload: Vec<u8>,
    pn: u64,
    sent: i64,
    in_flight: bool,
    acked: bool,
    queued: bool,
    retransmitted: bool,
    /// Largest datagram of its latest transmission, bytes (less than `wire_len` when it
    /// went out in fragments).
    dgram: usize,
    // Delivery-rate snapshot at the latest transmission.
    delivered: u64,
    delivered_time: i64,
    first_sent_time: i64,
    app_limited: bool,
}

impl Slot {
    fn wire_len(&self) -> u64 {
        (Data::HEADER_LEN + self.payload.len()) as u64
    }
}

/// Counters of the sending side.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SenderStats {
    /// Data datagrams sent, retransmissions included.
    pub packets_sent: u64,
    /// Retransmissions (a `seq` sent again).
    pub retransmits: u64,
    /// Transmissions declared lost (by a reported gap, the time threshold or a timeout).
    pub declared_lost: u64,
    /// Retransmission timeouts.
    pub rtos: u64,
    /// Retransmissions found needless (the original arrived).
    pub spurious: u64,
    /// Bytes of data datagrams sent.
    pub bytes_sent: u64,
    /// Fragment datagrams sent (a packet split in `n` counts `n`).
    pub fragments_sent: u64,
    /// Path-MTU probes sent.
    pub pmtu_probes_sent: u64,
    /// Path-MTU probes acknowledged.
    pub pmtu_probes_acked: u64,
    /// Black holes detected: the PLPMTU fell back to BASE.
    pub pmtu_black_holes: u64,
    /// Times the sender stopped with data waiting because pacing held it.
    pub paced: u64,
    /// Times the sender stopped with data waiting because the in-flight cap held it (until
    /// an ACK).
    pub capped: u64,
}

/// What [`Sender::next`] did.
pub(crate) enum Next {
    /// A datagram was appended to the buffer.
    Sent,
    /// Nothing to send now; try again at this time (pacing) or on an ACK (`None`).
    Wait(Option<i64>),
    /// Nothing queued at all.
    Idle,
}

pub(crate) struct Sender {
    session: SessionId,
    base: u64,
    next_seq: u64,
    slots: VecDeque<Slot>,
    retx: VecDeque<u64>,
    pns: VecDeque<(u64, i64)>,
    next_pn: u64,
    largest_echo: Option<u64>,
    in_flight: u64,
    pub rtt: Rtt,
    /// The RTT assumed before the first sample of a path, µs.
    initial_rtt: i64,
    pub cc: Bbr,
    /// The first transmission on the current path: older ones (sent on a path the session
    /// left) give no RTT or delivery-rate samples.
    path_pn: u64,
    pacer_next: f64,
    burst_us: f64,
    window: u64,
    delivered: u64,
    delivered_time: i64,
    first_sent_time: i64,
    app_limited_until: u64,
    last_sent: i64,
    rto_backoff: u32,
    reorder_threshold: u64,
    min_rto: i64,
    /// Longest backed-off retransmission timeout, µs.
    max_rto: i64,
    peer_max_ack_delay: i64,
    /// Transmissions left until an ACK, after a retransmission timeout (`None`: no limit).
    rto_budget: Option<u32>,
    /// Path MTU discovery: the current PLPMTU and its search.
    pub pmtu: Pmtud,
    /// The remaining fragments of the transmission last sent, sent before anything else.
    pending: VecDeque<Vec<u8>>,
    spare: Vec<Vec<u8>>,
    pub stats: SenderStats,
}

impl Sender {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        session: SessionId,
        mss: u64,
        initial_cwnd_packets: u64,
        initial_rtt_us: i64,
        window: u64,
        burst_us: i64,
        min_rto_us: i64,
        max_rto_us: i64,
        peer_max_ack_delay_us: i64,
        max_plpmtu: usize,
    ) -> Sender {
        Sender {
            session,
            base: 0,
            next_seq: 0,
            slots: VecDeque::new(),
            retx: VecDeque::new(),
            pns: VecDeque::new(),
            next_pn: 0,
            largest_echo: None,
            in_flight: 0,
            rtt: Rtt::new(initial_rtt_us),
            initial_rtt: initial_rtt_us,
            cc: Bbr::new(mss, initial_cwnd_packets),
            path_pn: 0,
            pacer_next: f64::MIN,
            burst_us: burst_us as f64,
            window,
            delivered: 0,
            delivered_time: 0,
            first_sent_time: 0,
            app_limited_until: 0,
            last_sent: 0,
            rto_backoff: 0,
            reorder_threshold: PACKET_THRESHOLD,
            min_rto: min_rto_us,
            max_rto: max_rto_us,
            peer_max_ack_delay: peer_max_ack_delay_us,
            rto_budget: None,
            pmtu: Pmtud::new(max_plpmtu),
            pending: VecDeque::new(),
            spare: Vec::new(),
            stats: SenderStats::default(),
        }
    }

    /// Bytes sent and neither acknowledged nor declared lost.
    pub fn bytes_in_flight(&self) -> u64 {
        self.in_flight
    }

    /// Whether the window of sequence numbers has room for new packets.
    pub fn has_window(&self) -> bool {
        self.next_seq - self.base < self.window
    }

    /// The application (TCP) has nothing for us although the window has room: rate samples
    /// taken until this flight is acknowledged say little about the path.
    pub fn mark_app_limited(&mut self) {
        if self.in_flight < self.cc.cwnd {
            self.app_limited_until = (self.delivered + self.in_flight).max(1);
        }
    }

    /// The retransmission timeout without backoff, µs.
    fn base_rto(&self) -> i64 {
        self.rtt.rto(self.peer_max_ack_delay, self.min_rto)
    }

    /// The retransmission timeout with its exponential backoff, capped at `max_rto` (or the
    /// unbacked-off timeout if that is larger), µs.
    fn backed_off_rto(&self) -> i64 {
        let rto = self.base_rto();
        rto.saturating_mul(1 << self.rto_backoff.min(20)).min(self.max_rto.max(rto))
    }

    /// The retransmission deadline, if anything is in flight.
    pub fn rto_deadline(&self) -> Option<i64> {
        (self.in_flight > 0).then(|| self.last_sent + self.backed_off_rto())
    }

    /// Whether any packet is sent or queued and not acknowledged yet.
    pub fn has_unacked(&self) -> bool {
        self.base < self.next_seq
    }

    /// Whether the retransmission timer fired and nothing was acknowledged since.
    pub fn backing_off(&self) -> bool {
        self.rto_backoff > 0
    }

    /// Whether fragments of the last transmission wait to be sent.
    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Append the next waiting fragment to `out`, if any.
    pub fn pop_pending(&mut self, now: i64, out: &mut Vec<u8>) -> bool {
        let Some(mut d) = self.pending.pop_front() else { return false };
        out.extend_from_slice(&d);
        self.stats.fragments_sent += 1;
        self.last_sent = now;
        d.clear();
        if self.spare.len() < 64 {
            self.spare.push(d);
        }
        true
    }

    /// Whether a path-MTU probe may go out now.
    pub fn probe_ready(&self) -> bool {
        self.pmtu.probe_ready(self.rto_backoff == 0)
    }

    /// Append a path-MTU probe to `out` if one is due; returns whether it did.
    ///
    /// The probe's size is what goes on the wire: a probe the session will seal is
    /// written [`crate::seal::OVERHEAD`] bytes shorter.
    pub fn next_probe(&mut self, now: i64, sealed: bool, out: &mut Vec<u8>) -> bool {
        let timeout = self.base_rto();
        let alive = self.rto_backoff == 0;
        let Some((id, size)) = self.pmtu.take_probe(now, alive, timeout, self.next_pn) else {
            return false;
        };
        let seal = if sealed { crate::seal::OVERHEAD } else { 0 };
        PmtuProbe::emit(self.session, id, size.saturating_sub(seal), out);
        self.stats.pmtu_probes_sent += 1;
        true
    }

    /// The peer acknowledged a path-MTU probe.
    pub fn on_probe_ack(&mut self, now: i64, id: u32, size: usize) {
        let acked = self.pmtu.probes_acked;
        self.pmtu.on_probe_ack(now, id, size);
        if self.pmtu.probes_acked != acked {
            self.stats.pmtu_probes_acked += 1;
        }
    }

    /// Run the path-MTU timers.
    pub fn on_pmtu_timer(&mut self, now: i64) {
        let probes = crate::pmtu::probes_for_loss(self.cc.loss_ewma);
        self.pmtu.on_timer(now, probes);
    }

    /// A new path, whose framing adds `overhead` bytes in front of each datagram: the
    /// PLPMTU goes back to BASE and the search starts over, and the path's round trip and
    /// bandwidth are measured afresh (RFC 9000 §9.4: the congestion controller and the RTT
    /// estimator start from their initial values). Transmissions made before give no
    /// samples: their round trips and delivery rates are the old path's. Kept, the old
    /// path's minimum RTT sized the in-flight cap for BBR's 10 s window: from a 0.1 ms path
    /// to a 20 ms one that cap let 4 packets through per round trip.
    pub fn on_path_change(&mut self, now: i64, overhead: usize) {
        self.pmtu.reset(overhead);
        self.rtt = Rtt::new(self.initial_rtt);
        self.cc.restart();
        self.path_pn = self.next_pn;
        self.delivered_time = now;
        self.first_sent_time = now;
    }

    /// Send the next datagram if congestion control and pacing allow: retransmissions first,
    /// then new packets taken from `new` (the device's transmit queue).
    pub fn next(&mut self, now: i64, new: &mut VecDeque<Vec<u8>>, out: &mut Vec<u8>) -> Next {
        while let Some(&seq) = self.retx.front() {
            match self.slot(seq) {
                Some(s) if !s.acked && s.queued => break,
                _ => {
                    self.retx.pop_front();
                }
            }
        }
        let (len, retx) = if let Some(&seq) = self.retx.front() {
            match self.slot(seq) {
                Some(s) => (s.wire_len(), Some(seq)),
                None => return Next::Wait(None),
            }
        } else if let Some(p) = new.front().filter(|_| self.has_window()) {
            ((Data::HEADER_LEN + p.len()) as u64, None)
        } else {
            return Next::Idle;
        };
        if self.rto_budget == Some(0) && self.in_flight > 0 {
            return Next::Wait(None);
        }
        if self.in_flight + len > self.cc.cwnd && self.in_flight > 0 {
            self.stats.capped += 1;
            return Next::Wait(None);
        }
        let now_f = now as f64;
        if self.pacer_next > now_f {
            self.stats.paced += 1;
            return Next::Wait(Some(self.pacer_next.ceil() as i64));
        }
        let rate = self.cc.pacing_rate(self.rtt.smoothed);
        self.pacer_next = self.pacer_next.max(now_f - self.burst_us) + len as f64 * 1e6 / rate;

        if self.in_flight == 0 {
            self.first_sent_time = now;
            self.delivered_time = now;
        }
        let pn = self.next_pn;
        self.next_pn += 1;
        let seq = match retx {
            Some(seq) => {
                self.retx.pop_front();
                self.stats.retransmits += 1;
                if let Some(s) =
                    seq.checked_sub(self.base).and_then(|i| self.slots.get_mut(i as usize))
                {
                    s.retransmitted = true;
                }
                seq
            }
            None => {
                let Some(payload) = new.pop_front() else { return Next::Wait(None) };
                let seq = self.next_seq;
                self.next_seq += 1;
                self.slots.push_back(Slot {
                    payload,
                    pn,
                    sent: now,
                    in_flight: false,
                    acked: false,
                    queued: false,
                    retransmitted: false,
                    dgram: 0,
                    delivered: 0,
                    delivered_time: 0,
                    first_sent_time: 0,
                    app_limited: false,
                });
                seq
            }
        };
        let (delivered, delivered_time, first_sent_time, app_limited) =
            (self.delivered, self.delivered_time, self.first_sent_time, self.app_limited_until > 0);
        let session = self.session;
        let Some(i) = seq.checked_sub(self.base) else { return Next::Wait(None) };
        let Some(slot) = self.slots.get_mut(i as usize) else { return Next::Wait(None) };
        slot.pn = pn;
        slot.sent = now;
        slot.in_flight = true;
        slot.queued = false;
        slot.delivered = delivered;
        slot.delivered_time = delivered_time;
        slot.first_sent_time = first_sent_time;
        slot.app_limited = app_limited;
        // While a timeout's recovery lasts, send at BASE: small enough for any path, which
        // is what black-hole detection needs (see `pmtu`).
        // Room is kept for sealing (`seal::OVERHEAD`) whether or not the session seals yet.
        let plpmtu = if self.rto_budget.is_some() { self.pmtu.base } else { self.pmtu.plpmtu };
        let plpmtu = plpmtu.saturating_sub(crate::seal::OVERHEAD);
        let total = slot.payload.len();
        match u16::try_from(total) {
            Ok(total16) if Data::HEADER_LEN + total > plpmtu => {
                // Split into equal pieces that each fit the PLPMTU; the first goes out now,
                // the rest before anything else.
                let room = plpmtu.saturating_sub(Fragment::HEADER_LEN).max(1);
                let n = total.div_ceil(room);
                let piece = total.div_ceil(n);
                let mut offset = 0;
                while offset < total {
                    let end = (offset + piece).min(total);
                    let bytes = &slot.payload[offset..end];
                    if offset == 0 {
                        Fragment::emit(session, seq, pn, 0, total16, bytes, out);
                    } else {
                        let mut d = self.spare.pop().unwrap_or_default();
                        Fragment::emit(session, seq, pn, offset as u16, total16, bytes, &mut d);
                        self.pending.push_back(d);
                    }
                    offset = end;
                }
                slot.dgram = Fragment::HEADER_LEN + piece;
                self.stats.fragments_sent += 1;
            }
            _ => {
                Data::emit_header(session, seq, pn, out);
                out.extend_from_slice(&slot.payload);
                slot.dgram = Data::HEADER_LEN + total;
            }
        }
        if let Some(b) = &mut self.rto_budget {
            *b = b.saturating_sub(1);
            // Limited by the timeout's budget, not the path: rate samples of this flight
            // say nothing about the bandwidth.
            self.app_limited_until = (self.delivered + self.in_flight + len).max(1);
        }
        self.in_flight += len;
        self.last_sent = now;
        self.pns.push_back((pn, now));
        if self.pns.len() > 1 << 20 {
            self.pns.pop_front();
        }
        self.stats.packets_sent += 1;
        self.stats.bytes_sent += len;
        Next::Sent
    }

    fn slot(&self, seq: u64) -> Option<&Slot> {
        seq.checked_sub(self.base).and_then(|i| self.slots.get(i as usize))
    }

    /// Process one ACK datagram.
    pub fn on_ack(&mut self, now: i64, ack: &Ack<'_>, pool: &mut Vec<Vec<u8>>) {
        // RTT from the echo of the largest transmission number received.
        if ack.largest_pn < self.next_pn && self.largest_echo.is_none_or(|l| ack.largest_pn > l) {
            self.largest_echo = Some(ack.largest_pn);
            while self.pns.front().is_some_and(|&(pn, _)| pn < ack.largest_pn) {
                self.pns.pop_front();
            }
            if let Some(&(pn, sent)) = self.pns.front()
                && pn == ack.largest_pn
                && pn >= self.path_pn
            {
                let sample = now - sent;
                let delay = (ack.ack_delay_us.min(1 << 40) as i64).min(self.peer_max_ack_delay * 4);
                self.rtt.update(sample, delay);
                self.cc.on_rtt(now, sample);
            }
        }
        let largest = self.largest_echo.unwrap_or(0);
        if self.largest_echo.is_some() {
            self.pmtu.on_largest_acked(largest);
        }
        let loss_delay = self.rtt.loss_delay();

        let mut acked = 0u64;
        let mut lost = 0u64;
        let mut newest: Option<Snapshot> = None;
        let end = self.next_seq;
        for seq in self.base..ack.cum.min(end) {
            self.mark_acked(seq, largest, &mut acked, &mut newest);
        }
        let mut at = ack.from.max(self.base);
        for (s, e) in ack.ranges() {
            if s >= end {
                break;
            }
            for seq in at.max(self.base)..s {
                self.maybe_lost(seq, now, largest, loss_delay, &mut lost);
            }
            for seq in s.max(self.base)..e.min(end) {
                self.mark_acked(seq, largest, &mut acked, &mut newest);
            }
            at = e;
        }
        self.release_acked(pool);
        if acked > 0 {
            self.rto_backoff = 0;
            self.rto_budget = None;
            self.delivered_time = now;
        }
        if self.app_limited_until > 0 && self.delivered > self.app_limited_until {
            self.app_limited_until = 0;
        }
        // A packet sent on the path the session left says nothing about this one.
        let rs = newest.filter(|snap| snap.pn >= self.path_pn).and_then(|snap| {
            self.first_sent_time = snap.sent;
            let send_elapsed = snap.sent - snap.first_sent_time;
            let ack_elapsed = now - snap.delivered_time;
            let interval = send_elapsed.max(ack_elapsed);
            let floor = if self.rtt.min == i64::MAX { 1 } else { self.rtt.min.max(1) };
            (interval >= floor).then(|| RateSample {
                rate: (self.delivered - snap.delivered) as f64 * 1e6 / interval as f64,
                app_limited: snap.app_limited,
                prior_delivered: snap.delivered,
            })
        });
        self.cc.on_ack(now, self.delivered, acked, lost, rs, self.in_flight);
    }

    fn release_acked(&mut self, pool: &mut Vec<Vec<u8>>) {
        while self.slots.front().is_some_and(|s| s.acked) {
            if let Some(s) = self.slots.pop_front() {
                // Kept at its length, not cleared: the device's next transmit then only
                // cuts it instead of zero-filling it up to a segment again.
                crate::device::keep_spare(pool, s.payload);
            }
            self.base += 1;
        }
    }

    fn mark_acked(
        &mut self,
        seq: u64,
        largest: u64,
        acked: &mut u64,
        newest: &mut Option<Snapshot>,
    ) {
        let Some(i) = seq.checked_sub(self.base) else { return };
        let Some(slot) = self.slots.get_mut(i as usize) else { return };
        if slot.acked {
            return;
        }
        slot.acked = true;
        if self.pmtu.is_big(slot.dgram) {
            self.pmtu.on_big_acked();
        }
        if slot.retransmitted && slot.pn > largest {
            // Acknowledged before its latest transmission can have arrived: an earlier copy
            // was only late, not lost.
            self.stats.spurious += 1;
            self.reorder_threshold = (self.reorder_threshold * 2).min(MAX_PACKET_THRESHOLD);
        }
        let len = slot.wire_len();
        if slot.in_flight {
            slot.in_flight = false;
            self.in_flight -= len;
        }
        self.delivered += len;
        *acked += len;
        if newest.is_none_or(|n| slot.pn > n.pn) {
            *newest = Some(Snapshot {
                pn: slot.pn,
                sent: slot.sent,
                delivered: slot.delivered,
                delivered_time: slot.delivered_time,
                first_sent_time: slot.first_sent_time,
                app_limited: slot.app_limited,
            });
        }
    }

    fn maybe_lost(&mut self, seq: u64, now: i64, largest: u64, loss_delay: i64, lost: &mut u64) {
        let Some(i) = seq.checked_sub(self.base) else { return };
        let Some(slot) = self.slots.get_mut(i as usize) else { return };
        if !slot.in_flight || slot.acked || slot.pn >= largest {
            return;
        }
        if slot.pn + self.reorder_threshold <= largest || now - slot.sent >= loss_delay {
            Self::declare_lost(
                slot,
                seq,
                &mut self.in_flight,
                &mut self.retx,
                &mut self.stats,
                &self.pmtu,
                &mut false,
            );
            *lost += slot.wire_len();
        }
    }

    fn declare_lost(
        slot: &mut Slot,
        seq: u64,
        in_flight: &mut u64,
        retx: &mut VecDeque<u64>,
        stats: &mut SenderStats,
        pmtu: &Pmtud,
        big: &mut bool,
    ) {
        *big |= pmtu.is_big(slot.dgram);
        slot.in_flight = false;
        *in_flight -= slot.wire_len();
        if !slot.queued {
            slot.queued = true;
            retx.push_back(seq);
        }
        stats.declared_lost += 1;
    }

    /// Declare lost every transmission in flight, not yet acknowledged, that `older`
    /// picks; whether there was any, and whether any was larger than BASE.
    fn lose_in_flight(&mut self, older: impl Fn(&Slot) -> bool) -> (bool, bool) {
        let mut any = false;
        let mut big = false;
        for (i, slot) in self.slots.iter_mut().enumerate() {
            if slot.in_flight && !slot.acked && older(slot) {
                Self::declare_lost(
                    slot,
                    self.base + i as u64,
                    &mut self.in_flight,
                    &mut self.retx,
                    &mut self.stats,
                    &self.pmtu,
                    &mut big,
                );
                any = true;
            }
        }
        (any, big)
    }

    /// The path the datagrams took died and the driver moved to another: whatever is in
    /// flight went into the void. Resend it at once instead of after a timeout that backed
    /// off while the path was dead, and time the new path afresh. Congestion control keeps
    /// what the timeouts taught it.
    pub fn on_path_lost(&mut self, now: i64) {
        self.lose_in_flight(|_| true);
        self.pending.clear();
        self.rto_backoff = 0;
        self.rto_budget = None;
        self.last_sent = now;
        self.retx.make_contiguous().sort_unstable();
    }

    /// The retransmission timer fired: every transmission older than the timeout is lost.
    /// Until an ACK arrives, only [`RTO_FIRST_BUDGET`] transmissions may follow (then
    /// [`RTO_LATER_BUDGET`] per further timeout), oldest first.
    pub fn on_rto(&mut self, now: i64) {
        let rto = self.backed_off_rto();
        let (any, big) = self.lose_in_flight(|slot| now - slot.sent >= rto);
        if any {
            self.stats.rtos += 1;
            self.rto_backoff = self.rto_backoff.saturating_add(1);
            self.rto_budget =
                Some(if self.rto_backoff == 1 { RTO_FIRST_BUDGET } else { RTO_LATER_BUDGET });
            self.cc.on_rto();
            if big && self.pmtu.on_big_rto() {
                // A black hole (see `pmtu`): resend what is still out at larger sizes.
                self.stats.pmtu_black_holes += 1;
                let base = self.pmtu.base;
                self.pending.clear();
                self.lose_in_flight(|s| s.dgram > base);
            }
            // Retransmit oldest first.
            self.retx.make_contiguous().sort_unstable();
        } else {
            // Nothing old enough: push the deadline out.
            self.last_sent = now;
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Snapshot {
    pn: u64,
    sent: i64,
    delivered: u64,
    delivered_time: i64,
    first_sent_time: i64,
    app_limited: bool,
}
