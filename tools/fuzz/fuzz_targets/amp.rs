//! The AMP box parser: never panics, and whatever it accepts re-encodes to the same bytes
//! (boxes are canonical: sorted keys, no duplicates).
#![no_main]

use q2q::amp::AmpBox;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(Some((b, used))) = AmpBox::decode(data) {
        let again = b.encode().expect("a decoded box always re-encodes");
        let (b2, used2) = AmpBox::decode(&again).expect("re-encoded box parses").expect("complete");
        assert_eq!((b2, used2), (b, again.len()));
        assert!(used <= data.len());
    }
});
