//! Stream buffer memory under a burst of streams ([`q2q_netstack::budget`]): a burst of
//! 200 streams on one session holds at most the budget plus small buffers, the bytes come
//! back when the streams close, and a lone bulk stream still advertises the big window.
//! In the simulator, in virtual time; counts bytes through the budget, no timing.

mod common;

use common::link;
use q2q_netstack::budget::Budget;
use q2q_netstack::sim::{Pair, Transfer};
use q2q_netstack::wire::{Datagram, SessionId};
use q2q_netstack::{Config, Instant, Session, Side};

const STREAMS: usize = 200;

fn config() -> Config {
    // The defaults, each session with its own budget.
    Config {
        stream_buffer_budget: Budget::new(Config::default().stream_buffer_budget.limit()),
        ..Config::default()
    }
}

/// The window-scale shift in the SYN `s` sends for the stream it just opened.
fn syn_window_scale(s: &mut Session, now: Instant) -> u8 {
    let mut out = Vec::new();
    for _ in 0..64 {
        out.clear();
        let Some(_) = s.poll_transmit(now, &mut out) else { break };
        let Ok(Datagram::Data(d)) = Datagram::parse(&out) else { continue };
        let Ok(ip) = etherparse::SlicedPacket::from_ip(d.payload) else { continue };
        let Some(etherparse::TransportSlice::Tcp(tcp)) = ip.transport else { continue };
        if !tcp.syn() {
            continue;
        }
        for opt in tcp.options_iterator() {
            if let Ok(etherparse::TcpOptionElement::WindowScale(shift)) = opt {
                return shift;
            }
        }
        panic!("SYN without a window scale option");
    }
    panic!("no SYN sent");
}

/// Step the pair until neither side holds a stream (TIME-WAIT included).
fn settle(pair: &mut Pair) {
    let deadline = pair.now + q2q_netstack::Duration::from_secs(120);
    while pair.a.stats().streams + pair.b.stats().streams > 0 {
        assert!(
            pair.now < deadline,
            "streams left: a {} b {}",
            pair.a.stats().streams,
            pair.b.stats().streams
        );
        assert!(pair.step(), "nothing scheduled with streams left");
        while pair.a.poll_event().is_some() {}
        while pair.b.poll_event().is_some() {}
    }
}

#[test]
fn burst_of_streams_stays_within_the_budget_and_bulk_keeps_the_big_window() {
    let (ca, cb) = (config(), config());
    let (ba, bb) = (ca.stream_buffer_budget.clone(), cb.stream_buffer_budget.clone());
    let big = ca.stream_rx_buffer + ca.stream_tx_buffer;
    let small = 2 * ca.stream_small_buffer;
    let limit = ba.limit();
    let now = Instant::from_millis(0);
    let a = Session::new(SessionId(7), Side::Initiator, ca.clone(), now);
    let b = Session::new(SessionId(7), Side::Responder, cb, now);
    let mut pair = Pair::new(
        a,
        b,
        q2q_netstack::sim::Link::new(link(1)),
        q2q_netstack::sim::Link::new(link(2)),
        now,
    );

    // 200 streams opened at once: the first limit / big get the big buffers, the rest
    // small ones.
    let mut t = Transfer::start(&mut pair, STREAMS, 64 << 10).expect("open streams");
    let n_big = limit / big;
    assert!((1..STREAMS).contains(&n_big), "the test needs a budget for some, not all");
    assert_eq!(ba.big_leases(), n_big);
    assert_eq!(ba.leased(), n_big * big + (STREAMS - n_big) * small);
    // The leases are what the sockets hold.
    assert_eq!(pair.a.stats().buffer_bytes, ba.leased());
    let bound = limit + STREAMS * small;
    eprintln!(
        "{STREAMS} streams: {} MiB of stream buffers leased (bound {} MiB; without the budget {} MiB)",
        ba.leased() >> 20,
        bound >> 20,
        (STREAMS * big) >> 20
    );
    // Run the transfer in slices, checking that the accepting side's sockets (listeners
    // included) hold what they leased, within the same bound.
    let mut b_max = 0;
    loop {
        let until = pair.now + q2q_netstack::Duration::from_millis(5);
        match t.run(&mut pair, until, |_, _, _| {}) {
            Ok(()) => break,
            Err(e) if e.starts_with("deadline passed") && pair.now < Instant::from_secs(120) => {}
            Err(e) => panic!("{e}; {:?}", t.errors),
        }
        assert_eq!(pair.b.stats().buffer_bytes, bb.leased());
        assert_eq!(pair.a.stats().buffer_bytes, ba.leased());
        b_max = b_max.max(bb.leased());
    }
    eprintln!("accepting side: at most {} MiB of stream buffers at once", b_max >> 20);
    assert!(t.errors.is_empty(), "{:?}", t.errors);
    // The accepting side (listeners included) stayed within the same bound.
    assert!(ba.peak() <= bound, "a peak {} > bound {bound}", ba.peak());
    assert!(bb.peak() <= bound, "b peak {} > bound {bound}", bb.peak());
    assert!(bb.peak() >= n_big * big, "b never leased the big buffers: {bb:?}");

    // Closed streams return their bytes.
    settle(&mut pair);
    assert_eq!((ba.leased(), ba.big_leases()), (0, 0), "{ba:?}");
    assert_eq!((bb.leased(), bb.big_leases()), (0, 0), "{bb:?}");

    // A lone bulk stream gets the big buffers and a window scale that can offer them.
    let id = pair.a.open_stream().expect("open");
    assert_eq!(ba.big_leases(), 1);
    let shift = syn_window_scale(&mut pair.a, pair.now);
    assert!(65535usize << shift >= ca.stream_rx_buffer, "shift {shift}");
    eprintln!(
        "bulk stream: {} MiB receive buffer, window scale {shift} in its SYN",
        ca.stream_rx_buffer >> 20
    );
    let _ = id;

    // While the budget is spent, a stream's window is the small one.
    let hog: Vec<_> = (0..n_big).map(|_| ba.lease(big, small)).collect();
    assert!(hog.iter().filter(|l| l.is_big()).count() < n_big);
    pair.a.open_stream().expect("open");
    let shift = syn_window_scale(&mut pair.a, pair.now);
    assert!(65535usize << shift < ca.stream_rx_buffer, "shift {shift}");
    assert!(65535usize << shift >= ca.stream_small_buffer, "shift {shift}");
}
