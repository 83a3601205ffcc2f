//! The selective-repeat layer between smoltcp's interface and the UDP link.
//!
//! smoltcp's TCP recovers badly from random loss (1 s minimum RTO, no SACK on the sending
//! side, a timeout resends the whole window). This layer makes the link below it reliable
//! and in order, so TCP sees a clean (if sometimes slower) path and never retransmits:
//!
//! * every IP packet gets a delivery sequence number `seq` and, per transmission, a packet
//!   number `pn` ([`crate::wire::Data`]);
//! * the receiver ([`receiver`]) buffers out-of-order packets, hands them to smoltcp strictly
//!   in `seq` order and acknowledges with a cumulative point plus the complete list of
//!   received ranges ([`crate::wire::Ack`]) — at once when a new hole appears, otherwise every
//!   few packets or after a short delay;
//! * the sender ([`sender`]) retransmits a packet as soon as an ACK reports it missing while
//!   a packet sent 3 transmissions later (or 9/8 RTT later) has arrived, and on a timeout
//!   computed from the measured RTT (tens of milliseconds, not smoltcp's 1 s);
//! * since TCP no longer sees losses, congestion control lives here (`bbr.rs`): pacing and an
//!   in-flight cap near twice the measured bandwidth-delay product, plus what ACKs deliver
//!   in clumps (BBR's ACK aggregation estimate).

pub(crate) mod bbr;
pub mod receiver;
pub(crate) mod rtt;
pub mod sender;

pub use receiver::ReceiverStats;
pub use sender::SenderStats;
