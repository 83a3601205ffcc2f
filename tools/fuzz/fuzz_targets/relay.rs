//! Fuzz the relay framing: parsing any datagram never panics, and what parses verifies
//! only with the key and direction it was sealed with, once.
#![no_main]

use q2q::relay::{self, Direction, Key, Leg};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let key = Key::from_bytes(&[7; relay::KEY_LEN]);
    let _ = relay::parse(data);
    let _ = relay::open(data, Direction::ToServer, |_| Some(key.clone()));
    if let Ok(u) = relay::parse(data) {
        // Random bytes essentially never carry a valid tag; a leg must refuse them.
        let leg = Leg::new(u.token, key.clone());
        let _ = leg.open(data);
        // Sealing the same inner datagram round-trips, once.
        let inner = &data[relay::OVERHEAD..];
        let mut sealed = Vec::new();
        relay::seal(&mut sealed, &key, Direction::ToClient, &u.token, u.counter.max(1), inner);
        let fresh = Leg::new(u.token, key.clone());
        assert_eq!(fresh.open(&sealed), Ok(inner));
        assert_eq!(fresh.open(&sealed), Err(relay::RelayError::Replayed));
        assert!(relay::parse(&sealed).unwrap().verify(&key, Direction::ToServer).is_err());
    }
});
