//! The typed control protocol: any box decodes as any command (or its answer) without
//! panicking, and whatever decodes encodes back to a box that decodes to the same value.
#![no_main]

use q2q::amp::AmpBox;
use q2q::daemon::control as daemon;
use q2q::proto::Message;
use q2q::proto::commands::*;

fn check<M: Message + PartialEq + std::fmt::Debug>(b: &AmpBox) {
    if let Ok(m) = M::from_box(b) {
        let again = M::from_box(&m.to_box()).expect("an encoded message decodes");
        assert_eq!(again, m);
    }
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Ok(Some((b, _))) = AmpBox::decode(data) else { return };
    check::<Hello>(&b);
    check::<HelloAnswer>(&b);
    check::<Identify>(&b);
    check::<Certificate>(&b);
    check::<Register>(&b);
    check::<Sign>(&b);
    check::<Renew>(&b);
    check::<Seen>(&b);
    check::<Listen>(&b);
    check::<Unlisten>(&b);
    check::<Inbound>(&b);
    check::<InboundAnswer>(&b);
    check::<InboundAsk>(&b);
    check::<Revocations>(&b);
    check::<RevocationList>(&b);
    check::<CandidateList>(&b);
    check::<Candidates>(&b);
    check::<CandidatesAnswer>(&b);
    check::<CandidatesAsk>(&b);
    check::<RemoteInbound>(&b);
    check::<RemoteCandidates>(&b);
    check::<Relay>(&b);
    check::<Exists>(&b);
    check::<ExistsAnswer>(&b);
    check::<daemon::StatusAnswer>(&b);
    check::<daemon::Whois>(&b);
    check::<daemon::WhoisAnswer>(&b);
    check::<daemon::Ping>(&b);
    check::<daemon::PingAnswer>(&b);
});
