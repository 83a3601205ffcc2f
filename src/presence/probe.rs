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

use q2q_netstack::wire::{Kind, Prefix, VERSION};
use ring::hmac;

pub const LEN: usize = Prefix::LEN + 8 + 8 + 1 + 16;

/// Which end of the connection sent a probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Caller = 0,
    Callee = 1,
}

impl Role {
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
    pub reply: bool,
    pub session: u64,
    pub nonce: u64,
}

/// The key both ends share for one connection.
pub struct ProbeKey(hmac::Key);

impl ProbeKey {
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
}
