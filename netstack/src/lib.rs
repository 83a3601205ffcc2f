//! # q2q-netstack: the sans-IO network core of q2q
//!
//! No sockets, no clock reads, no tokio: callers pass `now` and bytes in, and take bytes to
//! send, events and the next deadline out. The tokio drivers in the `q2q` crate own the I/O,
//! and [`sim`] drives the same code in virtual time for tests and benchmarks.
//!
//! ## Layers of a PTCP session
//!
//! ```text
//!   application:  Session::open_stream / accept / send / recv / close / abort
//!        │  (streams = smoltcp TCP sockets; buffers sized to the BDP plus a repair,
//!        │   no TCP congestion control (the layer below has it), window scaling,
//!        │   no delayed ACK, 64 KiB segments, Nagle per stream)
//!   ┌────▼──────────────────────────────────────────────┐
//!   │ smoltcp Interface (Medium::Ip, 100.127.0.1 ⇄ .2)  │  session.rs
//!   │ link device: TCP segments of up to 64 KiB cut to  │  device.rs
//!   │ the link MTU (as TSO); the peer's in-order        │
//!   │ segments joined again (as GRO); the peer's ACKs   │
//!   │ kept readable through a closed window, and a      │  zero_window.rs
//!   │ reopened window resent from                       │
//!   └────┬──────────────────────────────────▲───────────┘
//!        │ IP packets of ≤ the link MTU      │ IP packets, strictly in order
//!        │ (device tx queue, backpressure)   │
//!   ┌────▼──────────────────────────────────┴───────────┐
//!   │ selective repeat: seq/pn numbering, range ACKs,   │  sr/
//!   │ retransmit on reported gap or RTO, BBR-style      │
//!   │ pacing + in-flight cap ≈ 2 × BDP (+ ACK clumps);  │
//!   │ packets larger than the path MTU split into       │
//!   │ Fragments                                         │
//!   │ path MTU discovery (RFC 8899): padded probes      │  pmtu.rs
//!   └────┬──────────────────────────────────▲───────────┘
//!        │ Data / Ack / Fragment /           │
//!        │ PmtuProbe / PmtuAck datagrams     │
//!   ┌────▼──────────────────────────────────┴───────────┐
//!   │ wire: prefix (version, kind), session id, body    │  wire/
//!   │ sealed once keyed: AES-256-GCM, counter, epochs   │  seal.rs
//!   └────┬──────────────────────────────────▲───────────┘
//!        ▼ UDP (driver: direct or relayed)   │
//! ```
//!
//! smoltcp works per segment, and at 1.4 KiB per segment that work (dispatch, header
//! building, one ACK per poll of each socket) was a fifth of a sender's time. So smoltcp
//! is told the link carries 64 KiB and builds segments that large; the device cuts each
//! into link-MTU segments before the selective-repeat layer numbers them, and joins the
//! peer's in-order segments again before smoltcp reads them ([`Config::segment_offload`]).
//! Loss is still repaired per 1.4 KiB packet.
//!
//! smoltcp drops a segment that meets its closed receive window before reading the
//! acknowledgment it carries (RFC 9293 §3.10.7, "Other States", asks it to read it), which
//! deadlocked an echo through TLS now and then; the device puts a pure ACK that smoltcp does
//! read before each such segment. And when the peer reopens a window it had closed while
//! bytes were in flight, smoltcp runs no retransmission timer, so the device adds duplicate
//! ACKs that make it resend at once (`zero_window`).
//!
//! smoltcp's TCP alone recovers poorly from random loss (1 s minimum RTO, no sender SACK);
//! the selective-repeat layer below it makes the link reliable and in order, so TCP never
//! retransmits, and does its own congestion control because TCP no longer sees losses. See
//! [`sr`] for the design and [`Config`] for every tunable and its reason.
//!
//! Every session and every path starts at 1200-byte datagrams and searches upward for what
//! the path carries ([`pmtu`]); nothing relies on ICMP. Sessions outlive outages as long as
//! kernel TCP connections do (`Config::idle_timeout`, 15 min): the selective-repeat sender
//! backs off to one datagram every `Config::max_rto` (5 s), and TCP's own clock stands still
//! meanwhile, so TCP never times out underneath.
//!
//! ## Paths
//! [`path::Paths`] is the sans-IO machine that decides where a session's datagrams go:
//! direct (found by authenticated probes to the peer's candidates, or birthday probing across
//! a symmetric NAT), the UDP relay, or the relay over the control connection. It watches the
//! direct path with every datagram of the session, falls back to the relay, follows NAT
//! rebinding and searches again, within a per-session probe budget. The driver feeds it
//! beside the [`Session`] and moves the session when it says so (step 4 below).
//!
//! ## TUN termination
//! [`tun::Stack`] is the other half of the crate: a second smoltcp interface (`any_ip`) fed
//! with the IP packets of a TUN device, terminating the TCP flows, UDP datagrams and pings
//! that unmodified programs send to virtual IPs. A SYN is held until the driver has reached
//! the person behind the address (`accept_flow`) or not (`refuse_flow`: an RST), so a
//! program's connect completes only when the far side accepted.
//!
//! ## Wire: one UDP socket, many datagram kinds
//! Every datagram on a q2q UDP socket starts with the same two bytes, `version` and `kind`
//! (see [`wire`]), so PTCP data, who-am-i, probes and relay traffic can share one socket
//! (and so one NAT mapping) and still be told apart without ambiguity. PTCP datagrams then
//! carry the 64-bit session id: a driver routes by [`wire::Datagram::session`], never by the
//! sender's address, so a session survives relay → direct moves and NAT rebinding.
//!
//! ## Sealing
//! Once the two peers have proven their identities (TLS 1.3 on the session's first stream,
//! in the `q2q` crate), [`Session::install_keys`] seals every datagram of the session
//! ([`seal`]): only datagrams that open count as the peer's, and after the switch plain
//! ones are refused. Room for the seal is always kept below the path MTU.
//!
//! ## Polling contract
//!
//! The driver owns one [`Session`] per peer (one task per session):
//!
//! 1. On each datagram for the session (routed by [`wire::Datagram::session`]):
//!    [`Session::handle_datagram`]. Errors are for counting; the datagram is dropped, and
//!    only a datagram taken (`Ok`) is a sign of the peer's life.
//! 2. After any input — datagrams, a timer, or a stream call (`send`, `recv`, `open_stream`,
//!    `close`, …) — call [`Session::poll_transmit`] until it returns `None`, sending each
//!    datagram to the peer's current address.
//! 3. Then drain [`Session::poll_event`]: `Connected`, `Incoming` (→ [`Session::accept`]),
//!    `Readable`/`Writable` (after `recv` said `Blocked` / `send` took less than offered),
//!    `Finished`, `Reset`, `TimedOut`, `Closed`, and `SessionLost` at the end.
//! 4. On every move to another path (relay → direct, direct → relay, NAT rebinding):
//!    [`Session::on_path_change`] with the new path's framing overhead in bytes, so that
//!    path MTU discovery and congestion control (round trip, bandwidth) start over; and [`Session::path_lost`] as well when the old path
//!    died, to resend at once what was in flight on it.
//! 5. Sleep until [`Session::poll_timeout`] (a time in the past means at once) or the next
//!    input, then call [`Session::handle_timeout`] and go to 2. `None` means the session is
//!    over.
//!
//! [`Stats::plpmtu`] is the current path MTU, for status displays.
//!
//! Pacing deadlines are microsecond-precise; a driver whose timers are coarser (tokio: 1 ms)
//! loses nothing as long as it wakes within [`Config::pacing_burst`].
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod budget;
pub mod config;
mod device;
pub mod path;
pub mod pmtu;
pub mod replay;
pub mod seal;
pub mod session;
pub mod sim;
pub mod sr;
mod tcp_io;
pub mod tun;
pub mod wire;
pub(crate) mod zero_window;

pub use config::Config;
pub use session::{
    ACCEPT_PORT, DatagramError, Event, Session, SessionError, Side, Stats, StreamError, StreamId,
};
pub use smoltcp::socket::tcp::State as TcpState;
pub use smoltcp::time::{Duration, Instant};
