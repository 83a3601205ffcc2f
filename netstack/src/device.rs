//! The smoltcp device of a session: two packet queues between the interface and the
//! selective-repeat layer.

use std::collections::VecDeque;

use smoltcp::phy::{self, ChecksumCapabilities, DeviceCapabilities, Medium};
use smoltcp::time::Instant;

/// Keep at most this many spare packet buffers ...
const POOL_MAX: usize = 4096;
/// ... and about this many bytes of them: a TUN stack's buffers are up to 64 KiB each.
const POOL_BYTES: usize = 8 << 20;

/// Put `buf` among the spares, unless the pool already holds [`POOL_MAX`] buffers or about
/// [`POOL_BYTES`] (counted as buffers of `buf`'s capacity); else it is freed.
pub(crate) fn keep_spare(pool: &mut Vec<Vec<u8>>, buf: Vec<u8>) {
    if pool.len() < POOL_MAX.min(POOL_BYTES / buf.capacity().max(1)) {
        pool.push(buf);
    }
}

pub(crate) struct LinkDevice {
    /// In-order packets from the peer, for smoltcp to read.
    pub rx: VecDeque<Vec<u8>>,
    /// Packets smoltcp made, waiting for the selective-repeat sender.
    pub tx: VecDeque<Vec<u8>>,
    /// Spare buffers, at whatever length they had: whoever takes one sets its length.
    pub pool: Vec<Vec<u8>>,
    /// `transmit` says "not now" at this many queued packets: backpressure, never a drop.
    pub tx_limit: usize,
    /// IP MTU of the virtual link.
    pub mtu: usize,
}

impl LinkDevice {
    pub fn new(mtu: usize, tx_limit: usize) -> LinkDevice {
        LinkDevice { rx: VecDeque::new(), tx: VecDeque::new(), pool: Vec::new(), tx_limit, mtu }
    }

    pub fn tx_full(&self) -> bool {
        self.tx.len() >= self.tx_limit
    }
}

/// A spare for smoltcp to write a packet of `len` bytes into, chosen once the length is
/// known: of the newest few, the shortest that is at least `len` long, which the packet
/// then only cuts; if none is, the longest, grown (zero-filled) the least; if the pool is
/// empty, a new buffer. Buffers come back at the length of the packet they held: on the
/// sending side most received packets are ACKs, and growing such a buffer to a full
/// segment zero-fills it (4.5% of the sender's time in the lab, perf). Choosing by `len`
/// also keeps an ACK out of a full-length buffer that a full segment (or, at the TUN
/// device, the next 64 KiB read) needs at full length.
fn spare_for_write(pool: &mut Vec<Vec<u8>>, len: usize) -> Vec<u8> {
    take_spare(pool, |b| {
        Some(if b.len() >= len { (0, b.len()) } else { (1, usize::MAX - b.len()) })
    })
}

/// A spare buffer to copy a received packet of `len` bytes into (its length is then
/// reset, so any will do), from the newest few: of those whose capacity holds `len`, the
/// shortest, which leaves the full-length ones to [`spare_for_write`]; if none holds it,
/// the largest. Taking the newest instead took a buffer the peer's ACK had just released,
/// for each of the peer's short ACK packets, and turned it short for good; taking the
/// shortest regardless of capacity took buffers too small for the packet, so each copy
/// was a new allocation and the full pool freed the buffer it replaced (7% of a receiver
/// in malloc and free, perf in the lab).
pub(crate) fn spare_for_copy(pool: &mut Vec<Vec<u8>>, len: usize) -> Vec<u8> {
    take_spare(pool, |b| {
        Some(if b.capacity() >= len { (0, b.len()) } else { (1, usize::MAX - b.capacity()) })
    })
}

/// A spare to read up to `len` bytes into: of the newest spares whose capacity holds `len`,
/// the longest (the least to zero-fill up to `len`); else an empty buffer.
pub(crate) fn spare_for_read(pool: &mut Vec<Vec<u8>>, len: usize) -> Vec<u8> {
    take_spare(pool, |b| (b.capacity() >= len).then(|| usize::MAX - b.len()))
}

/// Take the spare that `rank` ranks lowest among the newest [`SPARE_SCAN`] (`None`: not a
/// candidate; on a tie, the newer), or an empty buffer when there is none. The choosers
/// above rank in two tiers, `(0, _)` for a buffer that serves as it is, `(1, _)` for the
/// fallback.
fn take_spare<K: Ord>(pool: &mut Vec<Vec<u8>>, rank: impl Fn(&Vec<u8>) -> Option<K>) -> Vec<u8> {
    let n = pool.len();
    let best = (n.saturating_sub(SPARE_SCAN)..n)
        .rev()
        .filter_map(|i| rank(&pool[i]).map(|k| (k, i)))
        .min_by(|a, b| a.0.cmp(&b.0));
    best.map_or_else(Vec::new, |(_, i)| pool.swap_remove(i))
}

/// How many of the newest spare buffers the choosers look at.
const SPARE_SCAN: usize = 16;

pub(crate) struct RxToken<'a> {
    buf: Vec<u8>,
    pool: &'a mut Vec<Vec<u8>>,
}

pub(crate) struct TxToken<'a> {
    queue: &'a mut VecDeque<Vec<u8>>,
    /// Where the packet's buffer comes from once its length is known ([`spare_for_write`]);
    /// `None` for a reply made while receiving, which gets a new buffer. Nothing is taken
    /// for a token smoltcp drops unused (it asks for one per socket it polls).
    pool: Option<&'a mut Vec<Vec<u8>>>,
}

impl phy::Device for LinkDevice {
    type RxToken<'a> = RxToken<'a>;
    type TxToken<'a> = TxToken<'a>;

    fn receive(&mut self, _now: Instant) -> Option<(RxToken<'_>, TxToken<'_>)> {
        let buf = self.rx.pop_front()?;
        // A reply made while receiving (a RST, a challenge ACK) is queued even past the
        // limit: it is rare, small, and smoltcp would not retry it. It gets a new buffer:
        // a spare one taken here was dropped with the token for nearly every packet
        // received, so the pool ran dry and each copy in allocated (7% of a receiver in
        // malloc and free, perf in the lab).
        Some((RxToken { buf, pool: &mut self.pool }, TxToken { queue: &mut self.tx, pool: None }))
    }

    fn transmit(&mut self, _now: Instant) -> Option<TxToken<'_>> {
        if self.tx.len() >= self.tx_limit {
            return None;
        }
        Some(TxToken { queue: &mut self.tx, pool: Some(&mut self.pool) })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ip;
        caps.max_transmission_unit = self.mtu;
        // Checksums are not computed or checked on this link: the UDP checksum of the
        // underlay covers every byte, and TLS authenticates the streams above. It saves
        // two passes over every packet.
        caps.checksum = ChecksumCapabilities::ignored();
        caps
    }
}

impl phy::RxToken for RxToken<'_> {
    fn consume<R, F: FnOnce(&[u8]) -> R>(mut self, f: F) -> R {
        let r = f(&self.buf);
        // Kept at its length (not cleared): a transmit reuses it without zero-filling.
        keep_spare(self.pool, std::mem::take(&mut self.buf));
        r
    }
}

impl phy::TxToken for TxToken<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut buf = self.pool.map_or_else(Vec::new, |pool| spare_for_write(pool, len));
        // Pool buffers keep their old length, so a long enough one is only cut: zero-filling
        // every packet cost about 5% of the daemon's time at Gbit/s rates (perf, lab).
        // smoltcp's emit writes every byte of the packet but the padding after a TCP
        // options list's End-of-List, which receivers ignore; any old bytes there are from
        // an earlier packet of this same link (the same peer, or the local kernel).
        if buf.len() >= len {
            buf.truncate(len);
        } else {
            buf.resize(len, 0);
        }
        let r = f(&mut buf);
        self.queue.push_back(buf);
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_packet_is_written_into_the_shortest_spare_it_only_cuts() {
        let mut pool = vec![vec![7u8; 1400], vec![0u8; 52], vec![0u8; 40], vec![0u8; 60]];
        // An ACK takes an ACK's buffer, not the full-length one.
        assert_eq!(spare_for_write(&mut pool, 52).len(), 52);
        assert_eq!(spare_for_write(&mut pool, 1400).len(), 1400);
        // None long enough: the longest, grown the least.
        assert_eq!(spare_for_write(&mut pool, 1400).len(), 60);
        assert_eq!(spare_for_write(&mut pool, 1400).len(), 40);
        assert!(spare_for_write(&mut pool, 1400).is_empty() && pool.is_empty());
    }

    #[test]
    fn a_transmit_token_takes_its_buffer_only_when_used() {
        use smoltcp::phy::{Device, TxToken as _};
        let mut d = LinkDevice::new(1400, 8);
        d.pool.extend([vec![0u8; 1400], vec![0u8; 52]]);
        for _ in 0..5 {
            // Each token is dropped unused at the end of the statement.
            let _ = d.transmit(Instant::from_millis(0));
        }
        assert_eq!(d.pool.len(), 2, "unused tokens took nothing");
        let tx = d.transmit(Instant::from_millis(0)).unwrap();
        tx.consume(1000, |p| p.fill(9));
        assert_eq!(d.tx.pop_front().map(|p| p.len()), Some(1000));
        assert_eq!(d.pool, vec![vec![0u8; 52]]);
    }

    #[test]
    fn receiving_without_a_reply_takes_nothing_from_the_pool() {
        use smoltcp::phy::{Device, RxToken as _};
        let mut d = LinkDevice::new(1400, 8);
        d.pool.extend((0..4).map(|_| vec![0u8; 1400]));
        for _ in 0..3 {
            d.rx.push_back(vec![1u8; 1400]);
        }
        // The transmit token of each pair is dropped unused.
        while let Some((rx, _tx)) = d.receive(Instant::from_millis(0)) {
            rx.consume(|p| assert_eq!(p.len(), 1400));
        }
        // Each packet's buffer came back; none of the spares went with an unused token.
        assert_eq!(d.pool.len(), 4 + 3);
    }

    #[test]
    fn the_pool_keeps_thousands_of_small_buffers_but_few_large_ones() {
        let mut pool = Vec::new();
        for _ in 0..10_000 {
            keep_spare(&mut pool, vec![0u8; 1400]);
        }
        assert_eq!(pool.len(), POOL_MAX);
        let mut pool = Vec::new();
        for _ in 0..10_000 {
            keep_spare(&mut pool, vec![0u8; 65535]);
        }
        let held: usize = pool.iter().map(|b| b.capacity()).sum();
        assert!(held <= POOL_BYTES, "{held} bytes of 64 KiB buffers kept");
        assert!(pool.len() >= 64, "enough for a batch of full-size packets: {}", pool.len());
    }

    #[test]
    fn a_copy_takes_the_shortest_spare_that_holds_it() {
        let mut pool = vec![vec![0u8; 40], vec![0u8; 1400], vec![0u8; 52]];
        assert_eq!(spare_for_copy(&mut pool, 30).len(), 40);
        assert_eq!(spare_for_copy(&mut pool, 30).len(), 52);
        assert_eq!(spare_for_copy(&mut pool, 30).len(), 1400);
        assert!(spare_for_copy(&mut pool, 30).is_empty() && pool.is_empty());
    }

    #[test]
    fn a_copy_skips_spares_too_small_for_it() {
        // Short buffers with room (an ACK in a full-size buffer) beat full-length ones;
        // buffers without room for the packet are left alone.
        let mut roomy_ack = Vec::with_capacity(1400);
        roomy_ack.extend_from_slice(&[0u8; 52]);
        let mut pool = vec![vec![0u8; 1400], Vec::new(), roomy_ack, vec![0u8; 40]];
        let got = spare_for_copy(&mut pool, 1400);
        assert_eq!((got.len(), got.capacity() >= 1400), (52, true));
        assert_eq!(spare_for_copy(&mut pool, 1400).len(), 1400);
        // None holds it: the largest is grown rather than a tiny one.
        assert_eq!(spare_for_copy(&mut pool, 1400).len(), 40);
        assert_eq!(spare_for_copy(&mut pool, 1400).capacity(), 0);
    }
}
