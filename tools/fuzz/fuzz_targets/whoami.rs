//! The who-am-i reply parser: never panics.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = q2q::proto::whoami::parse_reply(data);
    let _ = q2q::proto::whoami::parse_request(data);
});
