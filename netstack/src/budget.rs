//! A budget of TCP buffer memory, shared by every stream or flow made from one config.
//!
//! smoltcp allocates a socket's receive and send buffers whole when the socket is made
//! (`tcp::SocketBuffer` owns a `Vec<u8>`), and the receive buffer is the window: the
//! window-scale shift sent in the SYN is derived from its size (RFC 7323 allows the shift
//! only in the SYN), so a buffer cannot grow once the stream is open. A big default
//! (8 MiB each way for a PTCP stream, for 1 Gbit/s through 1 % loss at 20 ms) times a burst
//! of a few hundred connections would be gigabytes. So each new socket asks the budget:
//! it gets the big buffers while the bytes leased by all live sockets stay within the
//! limit, and small ones otherwise (always granted: a stream is never refused for memory).
//! A lease returns its bytes when the socket is removed. The bytes leased at any time are
//! therefore at most `limit + sockets × small`.
//!
//! This is a bound on what may be committed, not a measure of it: the buffers are zeroed
//! allocations (`calloc`), which glibc serves from a fresh anonymous mapping when they are
//! above its mmap threshold, and those pages only take memory once touched. glibc raises
//! that threshold after freeing such a block (up to 32 MiB), and then serves buffers of the
//! same size from the heap and zeroes them, which commits them whole; the budget bounds
//! both cases. The q2q daemon holds the threshold fixed (`q2q::sys::fix_mmap_threshold`),
//! so there a buffer's pages take memory as data touches them and return when it is freed.
//!
//! The counters are atomics so that sessions driven by different tasks can share one
//! budget; nothing else is shared.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use smoltcp::socket::tcp;

/// Bytes of TCP buffers (receive + send) that sockets may lease at their big size. Shared
/// by cloning the `Arc` (a [`crate::Config`] clone shares its budget).
pub struct Budget {
    limit: usize,
    leased: AtomicUsize,
    peak: AtomicUsize,
    big_leases: AtomicUsize,
}

impl Budget {
    /// A budget of `limit` bytes.
    pub fn new(limit: usize) -> Arc<Budget> {
        Arc::new(Budget {
            limit,
            leased: AtomicUsize::new(0),
            peak: AtomicUsize::new(0),
            big_leases: AtomicUsize::new(0),
        })
    }

    /// Lease `big` bytes if the bytes leased stay within the limit with them, else `small`
    /// (granted regardless of the limit). The bytes return when the [`Lease`] is dropped.
    pub fn lease(self: &Arc<Budget>, big: usize, small: usize) -> Lease {
        let mut cur = self.leased.load(Ordering::Relaxed);
        let (bytes, is_big) = loop {
            let (bytes, is_big) =
                if cur.saturating_add(big) <= self.limit { (big, true) } else { (small, false) };
            match self.leased.compare_exchange_weak(
                cur,
                cur.saturating_add(bytes),
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => break (bytes, is_big),
                Err(now) => cur = now,
            }
        };
        self.peak.fetch_max(cur.saturating_add(bytes), Ordering::Relaxed);
        if is_big {
            self.big_leases.fetch_add(1, Ordering::Relaxed);
        }
        Lease { budget: self.clone(), bytes, big: is_big }
    }

    /// Receive and send buffers for a new TCP socket, with the lease that holds their
    /// bytes: `big_rx` and `big_tx` bytes if the budget allows both, else `small` each (each
    /// size taken as at least 1024). Zeroed allocations (`calloc`): see the module docs for
    /// when their pages are committed.
    pub fn buffers(
        self: &Arc<Budget>,
        big_rx: usize,
        big_tx: usize,
        small: usize,
    ) -> (tcp::SocketBuffer<'static>, tcp::SocketBuffer<'static>, Lease) {
        let (big_rx, big_tx, small) = (big_rx.max(1024), big_tx.max(1024), small.max(1024));
        let lease = self.lease(big_rx + big_tx, 2 * small);
        let (rx, tx) = if lease.is_big() { (big_rx, big_tx) } else { (small, small) };
        (tcp::SocketBuffer::new(vec![0u8; rx]), tcp::SocketBuffer::new(vec![0u8; tx]), lease)
    }

    /// The limit, in bytes.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Bytes leased now (big and small leases).
    pub fn leased(&self) -> usize {
        self.leased.load(Ordering::Relaxed)
    }

    /// The most bytes ever leased at once.
    pub fn peak(&self) -> usize {
        self.peak.load(Ordering::Relaxed)
    }

    /// Big leases held now.
    pub fn big_leases(&self) -> usize {
        self.big_leases.load(Ordering::Relaxed)
    }
}

impl fmt::Debug for Budget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Budget")
            .field("limit", &self.limit)
            .field("leased", &self.leased())
            .field("peak", &self.peak())
            .field("big_leases", &self.big_leases())
            .finish()
    }
}

/// Bytes leased from a [`Budget`] for one socket's buffers; returned on drop.
#[derive(Debug)]
pub struct Lease {
    budget: Arc<Budget>,
    bytes: usize,
    big: bool,
}

impl Lease {
    /// Whether the big size was granted.
    pub fn is_big(&self) -> bool {
        self.big
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.budget.leased.fetch_sub(self.bytes, Ordering::Relaxed);
        if self.big {
            self.budget.big_leases.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn big_while_within_limit_then_small_and_returned_on_drop() {
        let b = Budget::new(100);
        let l1 = b.lease(40, 4);
        let l2 = b.lease(40, 4);
        let l3 = b.lease(40, 4);
        assert!(l1.is_big() && l2.is_big() && !l3.is_big());
        assert_eq!((b.leased(), b.big_leases()), (84, 2));
        // 84 + 40 > 100 still: small again.
        let l4 = b.lease(40, 4);
        assert!(!l4.is_big());
        drop(l1);
        assert_eq!(b.leased(), 48);
        let l5 = b.lease(40, 4);
        assert!(l5.is_big());
        drop((l2, l3, l4, l5));
        assert_eq!((b.leased(), b.big_leases(), b.peak()), (0, 0, 88));
    }
}
