//! Wire formats of datagrams on a q2q UDP socket.
//!
//! Every datagram begins with a two-byte prefix:
//!
//! ```text
//!  0        1        2
//!  +--------+--------+------------------------
//!  |version |  kind  | kind-specific body ...
//!  +--------+--------+------------------------
//! ```
//!
//! [`Prefix::parse`] reads it; unknown versions and kinds are errors the caller counts and
//! drops, never a panic.
//!
//! PTCP's kinds carry the peer session id right after the prefix, so a driver can route a
//! datagram to its session with [`Datagram::parse`] without knowing the sender's address:
//! [`Data`] (one IP packet, numbered for selective repeat), [`Ack`] (a cumulative point
//! and the complete list of received ranges), [`Fragment`] (a piece of an IP packet whose
//! `Data` datagram would exceed the path MTU) and the path-MTU probe [`PmtuProbe`] with its
//! answer [`PmtuAck`] (RFC 8899). Once a session has keys, each of these travels sealed
//! inside a [`Kind::Sealed`] datagram ([`crate::seal`]).

mod ack;
mod data;
mod fragment;
mod pmtu;
pub mod varint;

pub use ack::{ACK_HEADER_MAX, Ack, AckRanges};
pub use data::{Data, expand};
pub use fragment::Fragment;
pub use pmtu::{PmtuAck, PmtuProbe};

/// The only version of the datagram format this crate speaks.
pub const VERSION: u8 = 1;

/// What a datagram on the shared UDP socket is. The numeric values are part of the wire
/// format and never change meaning.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Kind {
    /// PTCP: an IP packet of a peer session (selective-repeat data).
    Data = 0x01,
    /// PTCP: an acknowledgement of a peer session (selective-repeat range list).
    Ack = 0x02,
    /// PTCP: a piece of an IP packet too big for the path's current PLPMTU.
    Fragment = 0x03,
    /// PTCP: a padded path-MTU probe (RFC 8899).
    PmtuProbe = 0x04,
    /// PTCP: the acknowledgement of a path-MTU probe.
    PmtuAck = 0x05,
    /// PTCP: any of the kinds above, sealed with the session's keys ([`crate::seal`]).
    Sealed = 0x06,
    /// Ask the server for the address it sees (like a STUN binding request).
    WhoAmIRequest = 0x10,
    /// The server's answer: the reflexive address of the asker.
    WhoAmIReply = 0x11,
    /// Hole-punching probe between peers.
    Probe = 0x20,
    /// Answer to a probe.
    ProbeReply = 0x21,
    /// A datagram to be forwarded by a relay.
    Relay = 0x30,
}

impl Kind {
    /// The kind for a wire value, if it is one this version knows.
    pub fn from_u8(v: u8) -> Option<Kind> {
        Some(match v {
            0x01 => Kind::Data,
            0x02 => Kind::Ack,
            0x03 => Kind::Fragment,
            0x04 => Kind::PmtuProbe,
            0x05 => Kind::PmtuAck,
            0x06 => Kind::Sealed,
            0x10 => Kind::WhoAmIRequest,
            0x11 => Kind::WhoAmIReply,
            0x20 => Kind::Probe,
            0x21 => Kind::ProbeReply,
            0x30 => Kind::Relay,
            _ => return None,
        })
    }
}

/// Why a datagram was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// Shorter than its fixed header.
    #[error("datagram truncated: {len} bytes, need at least {need}")]
    Truncated { len: usize, need: usize },
    /// A version this implementation does not speak.
    #[error("unknown datagram version {0}")]
    UnknownVersion(u8),
    /// A kind this version does not define.
    #[error("unknown datagram kind {0:#04x}")]
    UnknownKind(u8),
    /// A field holds a value its kind forbids.
    #[error("malformed datagram: {0}")]
    Malformed(&'static str),
}

/// The checked two-byte prefix of every datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Prefix {
    pub kind: Kind,
}

impl Prefix {
    /// Length of the prefix in bytes.
    pub const LEN: usize = 2;

    /// Read the prefix of a datagram.
    pub fn parse(datagram: &[u8]) -> Result<Prefix, WireError> {
        let [version, kind, ..] = *datagram else {
            return Err(WireError::Truncated { len: datagram.len(), need: Self::LEN });
        };
        if version != VERSION {
            return Err(WireError::UnknownVersion(version));
        }
        let kind = Kind::from_u8(kind).ok_or(WireError::UnknownKind(kind))?;
        Ok(Prefix { kind })
    }

    /// Write the prefix into the first two bytes of `buf` (which must hold at least two).
    pub fn emit(kind: Kind, buf: &mut [u8]) -> Result<(), WireError> {
        let Some(head) = buf.get_mut(..Self::LEN) else {
            return Err(WireError::Truncated { len: buf.len(), need: Self::LEN });
        };
        head.copy_from_slice(&[VERSION, kind as u8]);
        Ok(())
    }
}

/// The random 64-bit id of a PTCP peer session, chosen by the caller. Sessions are keyed by
/// it, never by the peer's UDP address, so a session survives a change of path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionId(pub u64);

impl std::fmt::Display for SessionId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// A checked datagram of one of the PTCP kinds, or the kind of any other datagram (which
/// belongs to someone else on the shared socket: who-am-i, probes, relay).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Datagram<'a> {
    /// A numbered IP packet of a session.
    Data(Data<'a>),
    /// A selective-repeat acknowledgement of a session.
    Ack(Ack<'a>),
    /// A piece of a numbered IP packet of a session.
    Fragment(Fragment<'a>),
    /// A path-MTU probe of a session.
    PmtuProbe(PmtuProbe),
    /// The acknowledgement of a path-MTU probe.
    PmtuAck(PmtuAck),
    /// One of the kinds above, sealed with the session's keys: only its session id is
    /// read here ([`crate::seal`] opens it).
    Sealed(SessionId),
    /// A known kind that is not PTCP; its body is not parsed here.
    Other(Kind),
}

impl<'a> Datagram<'a> {
    /// Parse the prefix and, for PTCP kinds, the whole datagram.
    pub fn parse(datagram: &'a [u8]) -> Result<Datagram<'a>, WireError> {
        Ok(match Prefix::parse(datagram)?.kind {
            Kind::Data => Datagram::Data(Data::parse(datagram)?),
            Kind::Ack => Datagram::Ack(Ack::parse(datagram)?),
            Kind::Fragment => Datagram::Fragment(Fragment::parse(datagram)?),
            Kind::PmtuProbe => Datagram::PmtuProbe(PmtuProbe::parse(datagram)?),
            Kind::PmtuAck => Datagram::PmtuAck(PmtuAck::parse(datagram)?),
            Kind::Sealed => {
                let Some(id) = datagram.get(Prefix::LEN..Prefix::LEN + 8) else {
                    return Err(WireError::Truncated {
                        len: datagram.len(),
                        need: Prefix::LEN + 8,
                    });
                };
                Datagram::Sealed(SessionId(u64::from_be_bytes(data::be(id))))
            }
            other => Datagram::Other(other),
        })
    }

    /// The session of a PTCP datagram.
    pub fn session(&self) -> Option<SessionId> {
        match self {
            Datagram::Data(d) => Some(d.session),
            Datagram::Ack(a) => Some(a.session),
            Datagram::Fragment(f) => Some(f.session),
            Datagram::PmtuProbe(p) => Some(p.session),
            Datagram::PmtuAck(a) => Some(a.session),
            Datagram::Sealed(s) => Some(*s),
            Datagram::Other(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_round_trip_and_rejects() {
        let mut b = [0u8; 4];
        Prefix::emit(Kind::WhoAmIRequest, &mut b).unwrap();
        assert_eq!(Prefix::parse(&b).unwrap().kind, Kind::WhoAmIRequest);
        assert_eq!(Prefix::parse(&[1]), Err(WireError::Truncated { len: 1, need: 2 }));
        assert_eq!(Prefix::parse(&[9, 1]), Err(WireError::UnknownVersion(9)));
        assert_eq!(Prefix::parse(&[1, 0xee]), Err(WireError::UnknownKind(0xee)));
    }
}
