//! PTCP: the tokio driver of the q2q-netstack sessions, the stream type, and TLS on streams.
//!
//! ```text
//!  app tasks            PtcpStream (AsyncRead/AsyncWrite)       PtcpSession / Endpoint
//!     │                   │ bounded byte pipes (512 KiB each way)     │ bounded command
//!     │                   │ + "stream has work" list, Notify          │ channel (oneshot replies)
//!     ▼                   ▼                                           ▼
//!  ┌──────────────────────── driver task (one per Endpoint) ────────────────────────┐
//!  │ owns: the UDP socket, every netstack Session, their streams' pipes             │
//!  │ loop { wait: socket readable | command | stream woke us | earliest deadline    │
//!  │        recvmmsg/GRO up to 4×32 buffers → parse prefix → Data/Ack: session by id│
//!  │                                          other kinds: side channel (bounded)   │
//!  │        streams with work: pipe ⇄ Session::send/recv, FIN, RST                  │
//!  │        each touched or due session: poll_transmit → GSO batches → sendmsg      │
//!  │                                     poll_event → pump streams, accept, errors  │
//!  │                                     poll_timeout → next deadline }             │
//!  └────────────────────────────────────────────────────────────────────────────────┘
//!        │ one UDP socket: PTCP sessions + who-am-i + probes + relay (one NAT mapping)
//! ```
//!
//! ## Who owns what
//! * [`Endpoint`] is a handle: the **driver task** it spawns owns the socket and every
//!   session (STYLE: one owner per state machine). The sans-IO [`q2q_netstack::Session`]
//!   never leaves that task, so it needs no lock and the data path is one thread: on two
//!   cores one busy data-path thread does better than several that hand packets around.
//! * A [`PtcpStream`] shares two bounded byte pipes with the driver. Writing copies into the
//!   send pipe (full = `Pending`: backpressure all the way to the peer's TCP window) and, if
//!   the pipe was empty, puts the stream on the driver's work list; the driver moves bytes
//!   into the session until its TCP buffer is full, then waits for the session's `Writable`
//!   event. The receive side mirrors it. Nothing is queued without bound and nothing is
//!   broadcast (onetun's traps: an unbounded local read and a lagging broadcast bus).
//! * Control calls ([`Endpoint::connect`], [`PtcpSession::open_stream`], [`Endpoint::set_path`],
//!   raw sends) go through a bounded command channel with a oneshot reply.
//! * Non-PTCP datagrams (who-am-i, probes, relay) go to a bounded side channel taken with
//!   [`Endpoint::take_side_channel`]; when it is full they are dropped and counted, the data
//!   path never waits for the presence layer. [`Endpoint::send_datagram`] sends raw
//!   datagrams from the same socket, so the NAT mapping the presence layer discovers is the
//!   one PTCP uses.
//!
//! ## The polling loop (netstack's contract)
//! After any input (a batch of datagrams, a command, a stream call, a timer) the driver calls
//! `poll_transmit` until it returns `None`, drains `poll_event`, repeats while events made
//! more work, and sleeps until the earliest `poll_timeout` of its sessions (tokio's 1 ms
//! timer; the session's pacing tolerates that, see `Config::pacing_burst` and
//! `Config::cwnd_rtt_floor`). Datagrams are read with `recvmmsg` and GRO and sent in GSO
//! batches of equal-sized datagrams (quinn-udp): the cost of PTCP is per packet, and one
//! system call per 1400-byte datagram was most of it (1-1.5 Gbit/s on loopback before,
//! 4-8 after).
//!
//! ## Paths
//! A session's peer address is set by the caller ([`Endpoint::connect`],
//! [`Endpoint::accept`]) and changed with [`Endpoint::set_peer_addr`] /
//! [`PtcpSession::set_path`]; incoming datagrams are routed by session id only, so moving
//! from relay to direct, or a NAT rebinding, is invisible to streams. [`Path::Relay`] is
//! the seam for relaying: every datagram is framed in place by a [`Framing`] the presence
//! layer gives (the relay's token, counter and tag, [`crate::relay::Leg`]) and sent to the
//! relay; relayed datagrams coming back arrive on the side channel as `Kind::Relay` and are
//! handed back, checked and unwrapped, with [`Endpoint::inject`]. [`Path::Channel`] hands
//! datagrams out by channel instead (the relay over the server's control connection).
//!
//! ## Streams and errors
//! `shutdown` sends FIN after everything written, the peer reads EOF after all data;
//! [`PtcpStream::abort`] sends RST. Errors are `io::Error`s carrying a [`StreamFailure`]:
//! "peer reset the stream", "stream timed out: session lost, peer unreachable for N s",
//! "PTCP endpoint shut down", … Dropping a stream without `shutdown` closes it like
//! `close(2)`: what was written is still delivered, then FIN.
//!
//! Sessions end when the peer is silent for `Config::idle_timeout` (every stream then
//! fails with the timeout error), when the endpoint shuts down, or when the
//! [`PtcpSession`] handle is dropped and its last stream closed. There is no "session
//! closed" message on the wire: the peer's session times out.
//!
//! ## TLS
//! [`tls`] runs TLS 1.3 with mutual q2q-certificate authentication over any
//! `AsyncRead + AsyncWrite`, `PtcpStream` included. A peer session runs it once, on its
//! first stream, and takes the keys that seal every datagram of the session from it
//! ([`tls::export_session`], [`PtcpSession::install_keys`], `q2q_netstack::seal`).

mod endpoint;
mod paths;
mod stream;
pub(crate) mod sys;
pub mod tls;

pub use endpoint::{
    DropFilter, Endpoint, EndpointConfig, EndpointError, EndpointStats, Framing, Liveness, Path,
    PtcpSession, SideDatagram,
};
pub use paths::{PathSetup, PathView};
pub use q2q_netstack::wire::SessionId;
pub use q2q_netstack::{Config, SessionError, Side};
pub(crate) use stream::Key as StreamKey;
pub use stream::{PtcpStream, StreamFailure};
