//! The sending half of the selective-repeat layer.

use std::collections::VecDeque;

use super::bbr::{Bbr, RateSample};
use super::rtt::Rtt;
use crate::wire::{Ack, Data, SessionId};

/// Reordering tolerance at start: a packet is lost once one sent this many transmissions
/// later arrived (RFC 9002). Doubled, up to [`MAX_PACKET_THRESHOLD`], each time a
/// retransmission turns out to have been spurious (the original arrived after all), so a
/// path that reorders stops costing retransmissions.
const PACKET_THRESHOLD: u64 = 3;
const MAX_PACKET_THRESHOLD: u64 = 1024;

#[derive(Debug)]
struct Slot {
    payload: Vec<u8>,
    pn: u64,
    sent: i64,
    in_flight: bool,
    acked: bool,
    queued: bool,
    retransmitted: bool,
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
    pub cc: Bbr,
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
    peer_max_ack_delay: i64,
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
        peer_max_ack_delay_us: i64,
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
            cc: Bbr::new(mss, initial_cwnd_packets),
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
            peer_max_ack_delay: peer_max_ack_delay_us,
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

    /// The retransmission deadline, if anything is in flight.
    pub fn rto_deadline(&self) -> Option<i64> {
        (self.in_flight > 0).then(|| {
            let rto = self.rtt.rto(self.peer_max_ack_delay, self.min_rto);
            self.last_sent + (rto << self.rto_backoff.min(6))
        })
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
        if self.in_flight + len > self.cc.cwnd && self.in_flight > 0 {
            return Next::Wait(None);
        }
        let now_f = now as f64;
        if self.pacer_next > now_f {
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
        Data::emit_header(session, seq, pn, out);
        out.extend_from_slice(&slot.payload);
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
            {
                let sample = now - sent;
                let delay = (ack.ack_delay_us.min(1 << 40) as i64).min(self.peer_max_ack_delay * 4);
                self.rtt.update(sample, delay);
                self.cc.on_rtt(now, sample);
            }
        }
        let largest = self.largest_echo.unwrap_or(0);
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
            self.delivered_time = now;
        }
        if self.app_limited_until > 0 && self.delivered > self.app_limited_until {
            self.app_limited_until = 0;
        }
        let rs = newest.and_then(|snap| {
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
            if let Some(mut s) = self.slots.pop_front() {
                s.payload.clear();
                if pool.len() < 4096 {
                    pool.push(s.payload);
                }
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
            Self::declare_lost(slot, seq, &mut self.in_flight, &mut self.retx, &mut self.stats);
            *lost += slot.wire_len();
        }
    }

    fn declare_lost(
        slot: &mut Slot,
        seq: u64,
        in_flight: &mut u64,
        retx: &mut VecDeque<u64>,
        stats: &mut SenderStats,
    ) {
        slot.in_flight = false;
        *in_flight -= slot.wire_len();
        if !slot.queued {
            slot.queued = true;
            retx.push_back(seq);
        }
        stats.declared_lost += 1;
    }

    /// Declare lost every transmission in flight, not yet acknowledged, that `older`
    /// picks; whether there was any.
    fn lose_in_flight(&mut self, older: impl Fn(&Slot) -> bool) -> bool {
        let mut any = false;
        for (i, slot) in self.slots.iter_mut().enumerate() {
            if slot.in_flight && !slot.acked && older(slot) {
                Self::declare_lost(
                    slot,
                    self.base + i as u64,
                    &mut self.in_flight,
                    &mut self.retx,
                    &mut self.stats,
                );
                any = true;
            }
        }
        any
    }

    /// The path the datagrams took died and the driver moved to another: whatever is in
    /// flight went into the void. Resend it at once instead of after a timeout that backed
    /// off while the path was dead, and time the new path afresh. Congestion control keeps
    /// what the timeouts taught it.
    pub fn on_path_lost(&mut self, now: i64) {
        self.lose_in_flight(|_| true);
        self.rto_backoff = 0;
        self.last_sent = now;
        self.retx.make_contiguous().sort_unstable();
    }

    /// The retransmission timer fired: every transmission older than the timeout is lost.
    pub fn on_rto(&mut self, now: i64) {
        let rto = self.rtt.rto(self.peer_max_ack_delay, self.min_rto) << self.rto_backoff.min(6);
        if self.lose_in_flight(|slot| now - slot.sent >= rto) {
            self.stats.rtos += 1;
            self.rto_backoff += 1;
            self.cc.on_rto();
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
