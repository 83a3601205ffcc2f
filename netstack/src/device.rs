//! The smoltcp device of a session: two packet queues between the interface and the
//! selective-repeat layer.

use std::collections::VecDeque;

use smoltcp::phy::{self, ChecksumCapabilities, DeviceCapabilities, Medium};
use smoltcp::time::Instant;

/// Keep at most this many spare packet buffers.
pub(crate) const POOL_MAX: usize = 4096;

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

    /// A spare buffer for smoltcp to write a packet into: one of the last few that is at
    /// least an MTU long if there is one, which the packet then only cuts, else the last.
    /// Buffers come back at the length of the packet they held: on the sending side most
    /// received packets are ACKs, and growing such a buffer to a full segment zero-fills
    /// it (4.5% of the sender's time in the lab, perf).
    fn spare(&mut self) -> Vec<u8> {
        let n = self.pool.len();
        match (n.saturating_sub(SPARE_SCAN)..n).rev().find(|&i| self.pool[i].len() >= self.mtu) {
            Some(i) => self.pool.swap_remove(i),
            None => self.pool.pop().unwrap_or_default(),
        }
    }
}

/// A spare buffer to copy a received packet into (its length is then reset, so any will
/// do): the shortest of the newest few, which leaves the full-length ones to
/// [`LinkDevice::spare`]. Taking the newest instead took a buffer the peer's ACK had just
/// released, for each of the peer's short ACK packets, and turned it short for good.
pub(crate) fn spare_for_copy(pool: &mut Vec<Vec<u8>>) -> Vec<u8> {
    let n = pool.len();
    match (n.saturating_sub(SPARE_SCAN)..n).min_by_key(|&i| pool[i].len()) {
        Some(i) => pool.swap_remove(i),
        None => Vec::new(),
    }
}

/// How many of the newest spare buffers [`LinkDevice::spare`] looks at.
const SPARE_SCAN: usize = 16;

pub(crate) struct RxToken<'a> {
    buf: Vec<u8>,
    pool: &'a mut Vec<Vec<u8>>,
}

pub(crate) struct TxToken<'a> {
    queue: &'a mut VecDeque<Vec<u8>>,
    buf: Vec<u8>,
}

impl phy::Device for LinkDevice {
    type RxToken<'a> = RxToken<'a>;
    type TxToken<'a> = TxToken<'a>;

    fn receive(&mut self, _now: Instant) -> Option<(RxToken<'_>, TxToken<'_>)> {
        let buf = self.rx.pop_front()?;
        let spare = self.spare();
        // A reply made while receiving (a RST, a challenge ACK) is queued even past the
        // limit: it is rare, small, and smoltcp would not retry it.
        Some((RxToken { buf, pool: &mut self.pool }, TxToken { queue: &mut self.tx, buf: spare }))
    }

    fn transmit(&mut self, _now: Instant) -> Option<TxToken<'_>> {
        if self.tx.len() >= self.tx_limit {
            return None;
        }
        let buf = self.spare();
        Some(TxToken { queue: &mut self.tx, buf })
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
        if self.pool.len() < POOL_MAX {
            self.pool.push(std::mem::take(&mut self.buf));
        }
        r
    }
}

impl phy::TxToken for TxToken<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(mut self, len: usize, f: F) -> R {
        // Pool buffers keep their old length, so a long enough one is only cut: zero-filling
        // every packet cost about 5% of the daemon's time at Gbit/s rates (perf, lab).
        // smoltcp's emit writes every byte of the packet but the padding after a TCP
        // options list's End-of-List, which receivers ignore; any old bytes there are from
        // an earlier packet of this same link (the same peer, or the local kernel).
        if self.buf.len() >= len {
            self.buf.truncate(len);
        } else {
            self.buf.resize(len, 0);
        }
        let r = f(&mut self.buf);
        self.queue.push_back(self.buf);
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_length_spare_is_taken_over_newer_short_ones() {
        let mut d = LinkDevice::new(1400, 8);
        d.pool.push(vec![7u8; 1400]);
        d.pool.extend((0..3).map(|_| vec![0u8; 52]));
        assert_eq!(d.spare().len(), 1400);
        assert_eq!(d.pool.len(), 3);
        // None long enough: the newest.
        assert_eq!(d.spare().len(), 52);
        assert_eq!(d.pool.len(), 2);
    }

    #[test]
    fn a_copy_takes_the_shortest_spare() {
        let mut pool = vec![vec![0u8; 40], vec![0u8; 1400], vec![0u8; 52]];
        assert_eq!(spare_for_copy(&mut pool).len(), 40);
        assert_eq!(spare_for_copy(&mut pool).len(), 52);
        assert_eq!(spare_for_copy(&mut pool).len(), 1400);
        assert!(spare_for_copy(&mut pool).is_empty() && pool.is_empty());
    }
}
