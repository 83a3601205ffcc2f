//! The who-am-i parsers (requests with flags, replies with a second port and a proof):
//! never panic, and a reply that parses parses the same through the older readers.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = q2q::proto::whoami::parse_request(data);
    let _ = q2q::proto::whoami::parse_request_with(data);
    if let Ok((nonce, seen, second)) = q2q::proto::whoami::parse_reply_with(data) {
        assert_eq!(q2q::proto::whoami::parse_reply(data).ok(), Some((nonce, seen)));
        let full = q2q::proto::whoami::parse_reply_full(data).expect("the same reply");
        assert_eq!((full.nonce, full.seen, full.second_port), (nonce, seen, second));
    }
});
