//! The receiving half of the selective-repeat layer: reorders, removes duplicates, hands
//! packets on in sequence order and acknowledges with complete range lists.

use std::collections::{BTreeMap, VecDeque};

use crate::device::Arrived;
use crate::wire::{Ack, Data, Fragment, SessionId, expand};

/// At most this many ACK datagrams describe one moment's state (lowest ranges first); a
/// receive window with even more holes reports only its lower part until those fill.
const MAX_ACK_PARTS: usize = 8;

/// At most this many packets may be partly reassembled at once (each also inside the receive
/// window and at most the interface MTU long): 4096 × 1400 bytes ≈ 5.5 MiB at worst.
pub const MAX_PARTIALS: usize = 4096;

/// A partial packet may hold at most this many disjoint pieces; a peer that sends more
/// (tiny, scattered fragments) has its extra fragments dropped.
const MAX_PIECES: usize = 16;

/// A packet being reassembled from fragments.
struct Partial {
    buf: Vec<u8>,
    /// Byte ranges held, sorted, disjoint and not touching.
    have: Vec<(usize, usize)>,
}

impl Partial {
    fn new(total: usize) -> Partial {
        Partial { buf: vec![0; total], have: Vec::new() }
    }

    /// Copy a piece in; `false` (nothing changed) if it does not fit this packet or would
    /// make too many pieces.
    fn add(&mut self, total: usize, offset: u16, bytes: &[u8]) -> bool {
        if total != self.buf.len() {
            return false;
        }
        let (s, e) = (usize::from(offset), usize::from(offset) + bytes.len());
        let Some(dst) = self.buf.get_mut(s..e) else { return false };
        // Ranges that touch or overlap [s, e) merge with it.
        let first = self.have.partition_point(|r| r.1 < s);
        let last = self.have.partition_point(|r| r.0 <= e);
        if first == last && self.have.len() >= MAX_PIECES {
            return false;
        }
        dst.copy_from_slice(bytes);
        let (mut ns, mut ne) = (s, e);
        if first < last {
            ns = ns.min(self.have[first].0);
            ne = ne.max(self.have[last - 1].1);
        }
        self.have.splice(first..last, [(ns, ne)]);
        true
    }

    fn complete(&self) -> bool {
        self.have.first() == Some(&(0, self.buf.len()))
    }
}

/// Counters of the receiving side.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReceiverStats {
    /// Data datagrams received (duplicates included).
    pub packets_received: u64,
    /// Duplicates (already received or delivered).
    pub duplicates: u64,
    /// Data datagrams beyond the receive window, dropped.
    pub beyond_window: u64,
    /// ACK datagrams sent.
    pub acks_sent: u64,
    /// Fragment datagrams received (duplicates included).
    pub fragments_received: u64,
    /// Fragments dropped: bigger than the interface MTU, inconsistent with the other pieces
    /// of their packet, too scattered, or too many packets partly reassembled.
    pub fragments_dropped: u64,
    /// Packets completed from fragments.
    pub reassembled: u64,
    /// Bytes of the peer's packets taken, each once (whole or reassembled; duplicates and
    /// packets beyond the window not counted).
    pub bytes_received: u64,
}

pub(crate) struct Receiver {
    session: SessionId,
    cum: u64,
    buf: VecDeque<Option<Vec<u8>>>,
    ranges: Vec<(u64, u64)>,
    largest_pn: Option<u64>,
    largest_pn_at: i64,
    highest_seq: Option<u64>,
    unacked: u32,
    first_unacked_at: Option<i64>,
    ack_now: bool,
    window: u64,
    ack_every: u32,
    max_ack_delay: i64,
    /// Packets partly reassembled from fragments, by `seq` (all inside the window).
    partials: BTreeMap<u64, Partial>,
    /// Largest packet a fragment may build, in bytes (the interface MTU).
    max_packet: usize,
    pub stats: ReceiverStats,
}

impl Receiver {
    pub fn new(
        session: SessionId,
        window: u64,
        ack_every: u32,
        max_ack_delay_us: i64,
        max_packet: usize,
    ) -> Receiver {
        Receiver {
            session,
            cum: 0,
            buf: VecDeque::new(),
            ranges: Vec::new(),
            largest_pn: None,
            largest_pn_at: 0,
            highest_seq: None,
            unacked: 0,
            first_unacked_at: None,
            ack_now: false,
            window,
            ack_every: ack_every.max(1),
            max_ack_delay: max_ack_delay_us,
            partials: BTreeMap::new(),
            max_packet,
            stats: ReceiverStats::default(),
        }
    }

    /// Take one `Data` datagram; in-order payloads are passed to `deliver` (empty ones, the
    /// keepalive pings, are not).
    pub fn on_data(
        &mut self,
        now: i64,
        data: &Data<'_>,
        pool: &mut Vec<Vec<u8>>,
        deliver: impl FnMut(Arrived<'_>, &mut Vec<Vec<u8>>),
    ) {
        self.stats.packets_received += 1;
        self.note_pn(now, data.pn);
        let seq = expand(self.cum, data.seq);
        let Some(idx) = self.check_seq(seq) else { return };
        self.stats.bytes_received += data.payload.len() as u64;
        if !self.partials.is_empty() {
            // A whole retransmission completes what fragments had begun.
            self.partials.remove(&seq);
        }
        // The next in order goes up straight from the datagram (the device copies it once,
        // coalescing it with what came before); only a packet that must wait is copied.
        self.place(now, seq, idx, Arrived::Borrowed(data.payload), pool, deliver);
    }

    /// Take one `Fragment` datagram: its bytes join the partial packet of its `seq` (held
    /// only inside the receive window, at most [`MAX_PARTIALS`] of them, each at most the
    /// interface MTU); a completed packet goes on as if it had come whole. Malformed or
    /// out-of-bounds fragments are dropped and counted.
    pub fn on_fragment(
        &mut self,
        now: i64,
        frag: &Fragment<'_>,
        pool: &mut Vec<Vec<u8>>,
        deliver: impl FnMut(Arrived<'_>, &mut Vec<Vec<u8>>),
    ) {
        self.stats.fragments_received += 1;
        self.note_pn(now, frag.pn);
        let seq = expand(self.cum, frag.seq);
        let Some(idx) = self.check_seq(seq) else { return };
        let total = usize::from(frag.total);
        if total > self.max_packet
            || (!self.partials.contains_key(&seq) && self.partials.len() >= MAX_PARTIALS)
        {
            self.stats.fragments_dropped += 1;
            return;
        }
        let partial = self.partials.entry(seq).or_insert_with(|| Partial::new(total));
        if !partial.add(total, frag.offset, frag.bytes) {
            self.stats.fragments_dropped += 1;
            return;
        }
        if !partial.complete() {
            return;
        }
        let Some(partial) = self.partials.remove(&seq) else { return };
        self.stats.reassembled += 1;
        self.stats.bytes_received += partial.buf.len() as u64;
        self.place(now, seq, idx, Arrived::Owned(partial.buf), pool, deliver);
    }

    fn note_pn(&mut self, now: i64, pn: u32) {
        let pn = expand(self.largest_pn.map_or(0, |l| l + 1), pn);
        if self.largest_pn.is_none_or(|l| pn > l) {
            self.largest_pn = Some(pn);
            self.largest_pn_at = now;
        }
    }

    /// The index of `seq` in the receive buffer if it is new and inside the window;
    /// otherwise count it (and re-acknowledge).
    fn check_seq(&mut self, seq: u64) -> Option<usize> {
        if seq < self.cum {
            self.stats.duplicates += 1;
            self.ack_now = true; // our ACK was lost: say it again
            return None;
        }
        let idx = seq - self.cum;
        if idx >= self.window {
            self.stats.beyond_window += 1;
            self.ack_now = true;
            return None;
        }
        let idx = idx as usize;
        if self.buf.get(idx).is_some_and(Option::is_some) {
            self.stats.duplicates += 1;
            self.ack_now = true;
            return None;
        }
        Some(idx)
    }

    /// A whole new packet `seq` (at `idx` in the buffer): acknowledge, buffer, deliver.
    /// A borrowed packet is copied only when it must wait for an earlier one.
    fn place(
        &mut self,
        now: i64,
        seq: u64,
        idx: usize,
        packet: Arrived<'_>,
        pool: &mut Vec<Vec<u8>>,
        mut deliver: impl FnMut(Arrived<'_>, &mut Vec<Vec<u8>>),
    ) {
        self.unacked += 1;
        self.first_unacked_at.get_or_insert(now);
        if self.unacked >= self.ack_every {
            self.ack_now = true;
        }
        if self.highest_seq.is_some_and(|h| seq > h + 1) || (self.highest_seq.is_none() && seq > 0)
        {
            self.ack_now = true; // a new hole: report it at once
        }
        if self.highest_seq.is_none_or(|h| seq > h) {
            self.highest_seq = Some(seq);
        }
        if idx == 0 {
            if !self.ranges.is_empty() {
                self.ack_now = true; // a hole filled: let the sender move on
            }
            self.buf.pop_front();
            self.cum += 1;
            Self::hand_on(packet, pool, &mut deliver);
            while let Some(Some(_)) = self.buf.front() {
                if let Some(Some(p)) = self.buf.pop_front() {
                    self.cum += 1;
                    Self::hand_on(Arrived::Owned(p), pool, &mut deliver);
                }
            }
            let cum = self.cum;
            let drop = self.ranges.iter().take_while(|r| r.1 <= cum).count();
            self.ranges.drain(..drop);
            if self.partials.first_key_value().is_some_and(|(&k, _)| k < cum) {
                self.partials = self.partials.split_off(&cum);
            }
        } else {
            if self.buf.len() <= idx {
                self.buf.resize(idx + 1, None);
            }
            self.buf[idx] = Some(packet.into_owned(pool));
            self.insert_range(seq);
        }
    }

    fn hand_on(
        p: Arrived<'_>,
        pool: &mut Vec<Vec<u8>>,
        deliver: &mut impl FnMut(Arrived<'_>, &mut Vec<Vec<u8>>),
    ) {
        match p {
            Arrived::Owned(p) if p.is_empty() => crate::device::keep_spare(pool, p),
            Arrived::Borrowed([]) => {}
            p => deliver(p, pool),
        }
    }

    fn insert_range(&mut self, seq: u64) {
        // First range whose end is at or past seq.
        let i = self.ranges.partition_point(|r| r.1 < seq);
        let joins_prev = i < self.ranges.len() && self.ranges[i].1 == seq;
        let joins_next_at = if joins_prev { i + 1 } else { i };
        let joins_next =
            joins_next_at < self.ranges.len() && self.ranges[joins_next_at].0 == seq + 1;
        match (joins_prev, joins_next) {
            (true, true) => {
                self.ranges[i].1 = self.ranges[i + 1].1;
                self.ranges.remove(i + 1);
            }
            (true, false) => self.ranges[i].1 = seq + 1,
            (false, true) => self.ranges[i].0 = seq,
            (false, false) => self.ranges.insert(i, (seq, seq + 1)),
        }
    }

    /// When an ACK is owed at the latest.
    pub fn ack_deadline(&self) -> Option<i64> {
        if self.ack_now {
            return Some(i64::MIN);
        }
        self.first_unacked_at.map(|t| t + self.max_ack_delay)
    }

    /// Whether an ACK is owed at `now`.
    pub fn ack_due(&self, now: i64) -> bool {
        self.ack_deadline().is_some_and(|d| d <= now)
    }

    /// Build the ACK datagrams (usually one) into `out`, each at most `max_len` bytes.
    pub fn build_acks(&mut self, now: i64, max_len: usize, out: &mut VecDeque<Vec<u8>>) {
        let Some(largest) = self.largest_pn else {
            self.ack_now = false;
            self.first_unacked_at = None;
            return;
        };
        let delay = (now - self.largest_pn_at).max(0) as u64;
        let mut from = self.cum;
        let mut i = 0;
        for _ in 0..MAX_ACK_PARTS {
            let mut d = Vec::with_capacity(64);
            let n = Ack::emit(
                self.session,
                largest,
                delay,
                self.cum,
                from,
                &self.ranges[i..],
                max_len,
                &mut d,
            );
            out.push_back(d);
            self.stats.acks_sent += 1;
            i += n;
            if i >= self.ranges.len() || n == 0 {
                break;
            }
            from = self.ranges[i - 1].1;
        }
        self.ack_now = false;
        self.unacked = 0;
        self.first_unacked_at = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(seq: u64, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        Data::emit_header(SessionId(1), seq, seq, &mut out);
        out.extend_from_slice(payload);
        out
    }

    fn frag(seq: u64, pn: u64, offset: u16, total: u16, bytes: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        Fragment::emit(SessionId(1), seq, pn, offset, total, bytes, &mut out);
        out
    }

    fn feed(r: &mut Receiver, d: &[u8], got: &mut Vec<Vec<u8>>) {
        let mut pool = Vec::new();
        r.on_fragment(0, &Fragment::parse(d).unwrap(), &mut pool, |p, _| got.push(p.to_vec()));
    }

    #[test]
    fn reassembles_across_different_splits() {
        let mut r = Receiver::new(SessionId(1), 100, 4, 1000, 1500);
        let packet: Vec<u8> = (0..1000u32).map(|i| i as u8).collect();
        let mut got = Vec::new();
        // First transmission in two halves, the second half lost; the retransmission is
        // split in three other pieces, of which only the last arrives: together complete.
        feed(&mut r, &frag(0, 0, 0, 1000, &packet[..500]), &mut got);
        assert!(got.is_empty());
        feed(&mut r, &frag(0, 1, 700, 1000, &packet[700..]), &mut got);
        assert!(got.is_empty());
        feed(&mut r, &frag(0, 2, 400, 1000, &packet[400..750]), &mut got);
        assert_eq!(got, vec![packet.clone()]);
        assert!(r.partials.is_empty());
        // Late pieces of a delivered packet are duplicates.
        feed(&mut r, &frag(0, 1, 0, 1000, &packet[..10]), &mut got);
        assert_eq!((got.len(), r.stats.duplicates), (1, 1));
        assert_eq!(r.stats.reassembled, 1);
    }

    #[test]
    fn fragment_bounds() {
        let mut r = Receiver::new(SessionId(1), 100, 4, 1000, 1500);
        let mut got = Vec::new();
        // Beyond the window, longer than the interface MTU: dropped, nothing held.
        feed(&mut r, &frag(100, 0, 0, 1000, &[1]), &mut got);
        assert_eq!(r.stats.beyond_window, 1);
        feed(&mut r, &frag(5, 0, 0, 1501, &[1]), &mut got);
        assert_eq!(r.stats.fragments_dropped, 1);
        assert!(r.partials.is_empty());
        // A piece claiming another total than the first is dropped.
        feed(&mut r, &frag(5, 0, 0, 1000, &[1; 10]), &mut got);
        feed(&mut r, &frag(5, 0, 10, 1200, &[1; 10]), &mut got);
        assert_eq!(r.stats.fragments_dropped, 2);
        // Scattered one-byte pieces: only MAX_PIECES are held.
        for i in 0..40u16 {
            feed(&mut r, &frag(6, 0, 2 * i, 1000, &[1]), &mut got);
        }
        assert_eq!(r.partials[&6].have.len(), MAX_PIECES);
        assert_eq!(r.stats.fragments_dropped, 2 + 40 - MAX_PIECES as u64);
        // Whole packets fill the window in order: the partials below `cum` are freed.
        let mut pool = Vec::new();
        for seq in 0..10 {
            let d = data(seq, &[seq as u8]);
            r.on_data(0, &Data::parse(&d).unwrap(), &mut pool, |p, _| got.push(p.to_vec()));
        }
        assert!(r.partials.is_empty(), "partials below cum are dropped");
        assert_eq!(got.len(), 10);
    }

    #[test]
    fn partials_are_capped() {
        let window = 2 * MAX_PARTIALS as u64;
        let mut r = Receiver::new(SessionId(1), window, 4, 1000, 1500);
        let mut got = Vec::new();
        for seq in 1..=MAX_PARTIALS as u64 + 10 {
            feed(&mut r, &frag(seq, seq, 0, 1000, &[1; 100]), &mut got);
        }
        assert_eq!(r.partials.len(), MAX_PARTIALS);
        assert_eq!(r.stats.fragments_dropped, 10);
    }

    proptest::proptest! {
        #[test]
        fn random_fragments_never_panic(
            frags in proptest::collection::vec(
                (0u64..300, 0u16..2000, 1u16..2000, 1usize..600), 0..200)
        ) {
            let mut r = Receiver::new(SessionId(1), 256, 4, 1000, 1500);
            let mut got = Vec::new();
            for (seq, offset, total, len) in frags {
                let bytes = vec![7u8; len];
                let d = frag(seq, seq, offset, total, &bytes);
                if let Ok(f) = Fragment::parse(&d) {
                    let mut pool = Vec::new();
                    r.on_fragment(0, &f, &mut pool, |p, _| got.push(p.to_vec()));
                }
                proptest::prop_assert!(r.partials.len() <= MAX_PARTIALS);
                proptest::prop_assert!(r.partials.keys().all(|&k| k >= r.cum && k < r.cum + 256));
                proptest::prop_assert!(r.partials.values().all(|p| p.buf.len() <= 1500));
            }
            proptest::prop_assert!(got.iter().all(|p| p.iter().all(|&b| b == 7)));
        }
    }

    #[test]
    fn reorders_and_reports_ranges() {
        let mut r = Receiver::new(SessionId(1), 1000, 4, 1000, 1500);
        let mut pool = Vec::new();
        let mut got = Vec::new();
        for seq in [0u64, 2, 3, 5, 1, 9, 4] {
            let d = data(seq, &[seq as u8]);
            r.on_data(0, &Data::parse(&d).unwrap(), &mut pool, |p, _| got.push(p[0]));
            if seq == 9 {
                assert_eq!(r.ranges, vec![(5, 6), (9, 10)]);
                assert_eq!(r.cum, 4);
            }
        }
        assert_eq!(got, vec![0, 1, 2, 3, 4, 5]);
        assert_eq!(r.ranges, vec![(9, 10)]);
        let mut acks = VecDeque::new();
        r.build_acks(0, 1400, &mut acks);
        let ack = Ack::parse(&acks[0]).unwrap();
        assert_eq!((ack.cum, ack.from), (6, 6));
        assert_eq!(ack.ranges().collect::<Vec<_>>(), vec![(9, 10)]);
    }
}
