//! Fuzz the PTCP encapsulation parsers: the prefix, `Data`, `Ack`, `Fragment`, `PmtuProbe`
//! and `PmtuAck` bodies. Nothing may panic, and whatever parses must re-encode to the same
//! bytes (the same content, for acks and probes). A `Sealed` datagram goes to a session that
//! has keys: it must not panic it, and (without the keys' tag) must never be taken.
#![no_main]

use std::cell::RefCell;

use q2q_netstack::seal::SessionKeys;
use q2q_netstack::wire::{Ack, Data, Datagram, Fragment, PmtuAck, PmtuProbe, Prefix, SessionId};
use q2q_netstack::{Config, Instant, Session, Side};

thread_local! {
    static KEYED: RefCell<Session> = RefCell::new({
        let mut s = Session::new(SessionId(7), Side::Responder, Config::default(), Instant::from_millis(0));
        s.install_keys(&SessionKeys { initiator: [1; 32], responder: [2; 32] }, true);
        s
    });
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = Prefix::parse(data);
    match Datagram::parse(data) {
        Ok(Datagram::Data(d)) => {
            let mut out = Vec::new();
            Data::emit_header(d.session, u64::from(d.seq), u64::from(d.pn), &mut out);
            out.extend_from_slice(d.payload);
            assert_eq!(out, data);
        }
        Ok(Datagram::Ack(a)) => {
            let ranges: Vec<(u64, u64)> = a.ranges().collect();
            assert_eq!(ranges.len(), a.range_count());
            let mut prev = a.from;
            for (i, &(s, e)) in ranges.iter().enumerate() {
                assert!(s < e && (s > prev || (i == 0 && s >= prev)));
                prev = e;
            }
            // Re-encode: same content (varints may be re-encoded shorter, so compare parsed).
            let mut out = Vec::new();
            let n = Ack::emit(
                a.session, a.largest_pn, a.ack_delay_us, a.cum, a.from, &ranges, usize::MAX, &mut out,
            );
            assert_eq!(n, ranges.len().min(usize::from(u16::MAX)));
            let b = Ack::parse(&out).expect("re-encoded ack parses");
            assert_eq!((b.session, b.largest_pn, b.cum, b.from), (a.session, a.largest_pn, a.cum, a.from));
            assert!(b.ranges().eq(ranges.iter().copied()));
        }
        Ok(Datagram::Fragment(f)) => {
            assert!(!f.bytes.is_empty());
            assert!(usize::from(f.offset) + f.bytes.len() <= usize::from(f.total));
            let mut out = Vec::new();
            Fragment::emit(
                f.session, u64::from(f.seq), u64::from(f.pn), f.offset, f.total, f.bytes, &mut out,
            );
            assert_eq!(out, data);
        }
        Ok(Datagram::PmtuProbe(p)) => {
            assert_eq!(p.size, data.len());
            let mut out = Vec::new();
            PmtuProbe::emit(p.session, p.id, p.size, &mut out);
            assert_eq!(PmtuProbe::parse(&out), Ok(p));
        }
        Ok(Datagram::PmtuAck(a)) => {
            let mut out = Vec::new();
            PmtuAck::emit(a.session, a.id, usize::from(a.size), &mut out);
            assert_eq!(out, data);
        }
        Ok(Datagram::Sealed(_)) => {
            KEYED.with(|s| {
                let mut s = s.borrow_mut();
                assert!(s.handle_datagram(Instant::from_millis(1), &mut data.to_vec()).is_err(), "a forged sealed datagram was taken");
            });
        }
        Ok(Datagram::Other(_)) | Err(_) => {}
    }
});
