//! The file-transfer header parsers: the AMP box of an offer and the file name in it.
//! Never panics; an accepted name never escapes the target directory.
#![no_main]

use q2q::transfer::names::SafeName;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(Some((b, _))) = q2q::amp::AmpBox::decode(data)
        && let Some(name) = b.get_str("name")
        && let Ok(n) = SafeName::parse(name)
    {
        let p = n.under(std::path::Path::new("/target"));
        assert!(p.starts_with("/target/"));
        assert!(!p.components().any(|c| matches!(c, std::path::Component::ParentDir)));
    }
    if let Ok(s) = std::str::from_utf8(data) {
        let _ = SafeName::parse(s);
    }
});
