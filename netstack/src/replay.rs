//! An anti-replay window over 64-bit datagram counters, as IPsec's (RFC 4303 §3.4.3) and
//! WireGuard's: the highest counter accepted, and a bitmap of which of the
//! [`ReplayWindow::SIZE`] counters below it were seen. Used by the sealed PTCP datagrams
//! ([`crate::seal`]) and by the relay's authenticated legs.

/// A counter refused by [`ReplayWindow::accept`]: seen already, 0, or older than the
/// window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("replayed or too old (counter {0})")]
pub struct Replayed(pub u64);

/// What [`ReplayWindow::accept`] made of a counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fresh {
    /// Higher than any seen before.
    Newest,
    /// Not seen before, but lower than the highest (reordered).
    Late,
}

const WORDS: usize = 16;

/// The counters seen from one sender. Counters start at 1; 0 is never accepted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReplayWindow {
    highest: u64,
    /// Bit `c % SIZE` is set when counter `c` (within the window) was seen.
    seen: [u64; WORDS],
}

impl ReplayWindow {
    /// How far below the highest counter a late datagram is still taken (datagrams). Wide
    /// enough for the reordering of a move between paths at gigabit rates (a relayed
    /// path's datagrams still arriving after the direct path's).
    pub const SIZE: u64 = (WORDS * 64) as u64;

    /// The highest counter accepted so far (0: none).
    pub fn highest(&self) -> u64 {
        self.highest
    }

    fn bit(counter: u64) -> (usize, u64) {
        let i = counter % Self::SIZE;
        ((i / 64) as usize, 1u64 << (i % 64))
    }

    /// Whether `counter` would be accepted, without recording it (check before spending
    /// work on a datagram, record with [`ReplayWindow::accept`] once it is verified).
    pub fn check(&self, counter: u64) -> Result<Fresh, Replayed> {
        if counter == 0 {
            return Err(Replayed(counter));
        }
        if counter > self.highest {
            return Ok(Fresh::Newest);
        }
        if self.highest - counter >= Self::SIZE {
            return Err(Replayed(counter));
        }
        let (w, b) = Self::bit(counter);
        if self.seen[w] & b != 0 { Err(Replayed(counter)) } else { Ok(Fresh::Late) }
    }

    /// Record `counter` of a verified datagram, or refuse it as a replay.
    pub fn accept(&mut self, counter: u64) -> Result<Fresh, Replayed> {
        let fresh = self.check(counter)?;
        if fresh == Fresh::Newest {
            let advance = counter - self.highest;
            if advance >= Self::SIZE {
                self.seen = [0; WORDS];
            } else {
                // Forget the counters that fall out of the window (at most SIZE bits).
                for c in self.highest + 1..counter {
                    let (w, b) = Self::bit(c);
                    self.seen[w] &= !b;
                }
            }
            self.highest = counter;
        }
        let (w, b) = Self::bit(counter);
        self.seen[w] |= b;
        Ok(fresh)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn window_accepts_new_and_late_refuses_repeats_and_old() {
        let mut w = ReplayWindow::default();
        assert_eq!(w.accept(0), Err(Replayed(0)));
        assert_eq!(w.accept(1), Ok(Fresh::Newest));
        assert_eq!(w.accept(1), Err(Replayed(1)));
        assert_eq!(w.accept(5), Ok(Fresh::Newest));
        assert_eq!(w.accept(3), Ok(Fresh::Late));
        assert_eq!(w.accept(3), Err(Replayed(3)));
        assert_eq!(w.accept(2000), Ok(Fresh::Newest));
        assert_eq!(w.accept(5), Err(Replayed(5)), "older than the window");
        let low = 2000 - ReplayWindow::SIZE + 1;
        assert_eq!(w.accept(low), Ok(Fresh::Late));
        assert_eq!(w.accept(low - 1), Err(Replayed(low - 1)));
        assert_eq!(w.highest(), 2000);
        // The bottom edge: seen stays refused, unseen is taken.
        let edge = 2000 + ReplayWindow::SIZE - 1;
        assert_eq!(w.accept(edge), Ok(Fresh::Newest));
        assert_eq!(w.accept(2000), Err(Replayed(2000)));
        assert_eq!(w.accept(2001), Ok(Fresh::Late));
        assert_eq!(w.accept(u64::MAX), Ok(Fresh::Newest));
        assert_eq!(w.accept(u64::MAX), Err(Replayed(u64::MAX)));
    }

    proptest! {
        /// Against a model (the set of every counter seen): a counter is taken exactly
        /// when it is new and within the window.
        #[test]
        fn window_matches_model(counters in proptest::collection::vec(1u64..3000, 1..400)) {
            let mut w = ReplayWindow::default();
            let mut seen = std::collections::HashSet::new();
            let mut highest = 0u64;
            for c in counters {
                let fresh = !seen.contains(&c) && (c > highest || highest - c < ReplayWindow::SIZE);
                prop_assert_eq!(w.accept(c).is_ok(), fresh, "counter {}", c);
                if fresh {
                    seen.insert(c);
                    highest = highest.max(c);
                }
            }
        }
    }
}
