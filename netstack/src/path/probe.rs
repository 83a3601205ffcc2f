//! Hole-punching probes, authenticated so that a stranger who sees or guesses them cannot
//! steer a session to another address.
//!
//! ```text
//! probe: version kind=0x20 | session (8) | nonce (8) | role (1) | tag (16)
//! reply: version kind=0x21 | session (8) | nonce (8) | role (1) | tag (16)
//! tag = HMAC-SHA256(probe_key, kind | session | nonce | role)[..16]
//! ```
//!
//! `probe_key` is a random 128-bit key the server gives both ends over TLS. `role` is the
//! sender's (caller 0, callee 1): a probe reflected back to its sender (a loopback candidate
//! that reaches its own socket) does not verify as the peer's.

use ring::hmac;

use crate::wire::{Kind, Prefix, VERSION};

/// Bytes of a probe or a reply.
pub const LEN: usize = Prefix::LEN + 8 + 8 + 1 + 16;

/// Which end of the session sent a probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The end that asked the server for the session.
    Caller = 0,
    /// The end the server asked.
    Callee = 1,
}

impl Role {
    /// The peer's role.
    pub fn other(self) -> Role {
        match self {
            Role::Caller => Role::Callee,
            Role::Callee => Role::Caller,
        }
    }
}

/// A verified probe or reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Probe {
    /// A reply (`ProbeReply`) rather than a probe.
    pub reply: bool,
    /// The session it is for.
    pub session: u64,
    /// The sender's nonce (a reply echoes the probe's).
    pub nonce: u64,
}

/// The session id of a probe or reply, read without verifying it (for routing only).
pub fn session_of(d: &[u8]) -> Option<u64> {
    if d.len() != LEN {
        return None;
    }
    Some(u64::from_be_bytes(d.get(2..10)?.try_into().ok()?))
}

/// The key both ends share for one session.
pub struct ProbeKey(hmac::Key);

impl std::fmt::Debug for ProbeKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ProbeKey(..)")
    }
}

impl ProbeKey {
    /// The key of a session, as the server handed it out.
    pub fn new(key: &[u8; 16]) -> ProbeKey {
        ProbeKey(hmac::Key::new(hmac::HMAC_SHA256, key))
    }

    fn tag(&self, body: &[u8]) -> [u8; 16] {
        let t = hmac::sign(&self.0, body);
        let mut out = [0u8; 16];
        out.copy_from_slice(&t.as_ref()[..16]);
        out
    }

    /// A probe (or reply) from `role`.
    pub fn encode(&self, reply: bool, session: u64, nonce: u64, role: Role) -> [u8; LEN] {
        let kind = if reply { Kind::ProbeReply } else { Kind::Probe };
        let mut out = [0u8; LEN];
        out[0] = VERSION;
        out[1] = kind as u8;
        out[2..10].copy_from_slice(&session.to_be_bytes());
        out[10..18].copy_from_slice(&nonce.to_be_bytes());
        out[18] = role as u8;
        let tag = self.tag(&out[1..19]);
        out[19..].copy_from_slice(&tag);
        out
    }

    /// The probe in `d` if it is well-formed, sent by `from_role`, and carries a valid tag.
    pub fn verify(&self, d: &[u8], from_role: Role) -> Option<Probe> {
        if d.len() != LEN || d[0] != VERSION || d[18] != from_role as u8 {
            return None;
        }
        let reply = match Kind::from_u8(d[1])? {
            Kind::Probe => false,
            Kind::ProbeReply => true,
            _ => return None,
        };
        // Compare the truncated tag without an early exit (no timing oracle).
        let expected = self.tag(&d[1..19]);
        if expected.iter().zip(&d[19..]).fold(0u8, |acc, (x, y)| acc | (x ^ y)) != 0 {
            return None;
        }
        let session = u64::from_be_bytes(d[2..10].try_into().ok()?);
        let nonce = u64::from_be_bytes(d[10..18].try_into().ok()?);
        Some(Probe { reply, session, nonce })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verifies_only_the_peers_genuine_probes() {
        let k = ProbeKey::new(&[7; 16]);
        let p = k.encode(false, 42, 9, Role::Caller);
        assert_eq!(k.verify(&p, Role::Caller), Some(Probe { reply: false, session: 42, nonce: 9 }));
        assert_eq!(session_of(&p), Some(42));
        // Reflected to its sender (expecting the callee's probes): rejected.
        assert_eq!(k.verify(&p, Role::Callee), None);
        // Another key, a flipped bit, a truncation: rejected.
        assert_eq!(ProbeKey::new(&[8; 16]).verify(&p, Role::Caller), None);
        for i in 0..LEN {
            let mut bad = p;
            bad[i] ^= 1;
            assert_eq!(k.verify(&bad, Role::Caller), None, "bit flip at {i}");
        }
        assert_eq!(k.verify(&p[..LEN - 1], Role::Caller), None);
        let r = k.encode(true, 42, 9, Role::Callee);
        assert!(k.verify(&r, Role::Callee).unwrap().reply);
    }

    #[test]
    fn same_bytes_as_before() {
        // The wire format is unchanged: a fixed vector.
        let k = ProbeKey::new(&[1; 16]);
        let p = k.encode(false, 0x0102_0304_0506_0708, 5, Role::Callee);
        assert_eq!(&p[..19], &[1, 0x20, 1, 2, 3, 4, 5, 6, 7, 8, 0, 0, 0, 0, 0, 0, 0, 5, 1]);
    }
}
