//! The resolver shim's DNS parser and answerer (UDP and TCP framing): never panics, and a
//! UDP answer never exceeds what the query allowed (512 bytes without EDNS, 1232 at most).
#![no_main]

use q2q::address::{Domain, Q2qAddress};
use q2q::dns::{Existence, Names, Pool, PoolConfig, Shim, ShimConfig};
use std::time::{Duration, UNIX_EPOCH};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let names = Names::new(Domain::parse("home.example").expect("valid"));
    let pool = Pool::new(PoolConfig::default()).expect("default pool");
    let exists = |a: &Q2qAddress| if a.user.as_str() == "alice" { Existence::Known } else { Existence::Unknown };
    let mut shim = Shim::new(names, pool, exists, ShimConfig::default());
    let now = UNIX_EPOCH + Duration::from_secs(1_000_000);
    if let Some(r) = shim.answer(data, now) {
        assert!(r.len() <= 1232);
    }
    let _ = shim.answer_tcp(data, now);
    let _ = q2q::dns::framing::decode(data);
});
