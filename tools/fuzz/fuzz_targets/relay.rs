//! Fuzz the relay framing: parsing any datagram never panics, and what parses opens only
//! with the key and direction it was sealed with (AES-256-GCM, every tag checked), once.
#![no_main]

use q2q::relay::{self, Direction, Key, Leg};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let key = Key::from_bytes(&[7; relay::KEY_LEN]);
    let mut out = Vec::new();
    let _ = relay::parse(data);
    let _ = relay::open(data, Direction::ToServer, |_| Some(key.clone()), &mut out);
    if let Ok(u) = relay::parse(data) {
        // Random bytes essentially never carry a valid tag; a leg opens them in place, as
        // the endpoint does with its receive buffer, whatever they are.
        let leg = Leg::new(u.token, key.clone());
        let mut copy = data.to_vec();
        if let Ok(inner) = leg.open_in_place(&mut copy) {
            assert_eq!(inner.len(), data.len() - relay::OVERHEAD);
        }
        // Sealing the same inner datagram round-trips, once, in its direction only.
        let inner = &data[relay::OVERHEAD..];
        let counter = u.counter.max(1);
        let mut sealed = Vec::new();
        relay::seal(&mut sealed, &key, Direction::ToClient, &u.token, counter, inner);
        let fresh = Leg::new(u.token, key.clone());
        assert_eq!(fresh.open(&sealed), Ok(inner.to_vec()));
        assert_eq!(fresh.open(&sealed), Err(relay::RelayError::Replayed));
        out.clear();
        let wrong_way = relay::parse(&sealed).unwrap().open_into(&key, Direction::ToServer, &mut out);
        assert!(wrong_way.is_err() && out.is_empty());
        // Any flipped bit is refused.
        let mut bad = sealed.clone();
        let i = (counter as usize) % bad.len();
        bad[i] ^= 1 << (counter % 8);
        assert!(Leg::new(u.token, key.clone()).open(&bad).is_err());
    }
});
