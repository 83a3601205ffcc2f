//! The who-am-i parsers (requests with flags, replies with the fields of every combination
//! of flags): never panic, and a reply that parses encodes back to the same bytes.
#![no_main]

use q2q::proto::whoami::{Flags, Reply, parse_request, parse_request_with};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = parse_request(data);
    let _ = parse_request_with(data);
    for b in 0..16u8 {
        let asked = Flags::from_byte(b);
        if let Ok(r) = Reply::parse(data, asked) {
            assert_eq!(r.encode(), data, "one reading per datagram and flags");
            assert_eq!(Reply::parse_answer(data, asked), Ok(r));
        }
    }
});
