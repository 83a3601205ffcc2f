//! Tuning of a PTCP session, with the reasons for each default.

use std::sync::Arc;

use smoltcp::time::Duration;

use crate::budget::Budget;
use crate::wire::Data;

/// Settings of a [`crate::Session`]. `Config::default()` suits a path of up to about
/// 1 Gbit/s × 30 ms; the doc of each field says what to change for other paths.
#[derive(Debug, Clone)]
pub struct Config {
    /// The largest `Data` datagram, in bytes of UDP payload (default 1400: fits a 1500-byte
    /// path MTU behind IPv6, UDP and a relay's framing). The virtual link's IP MTU is this
    /// minus the 18-byte [`Data`] header, and smoltcp derives its TCP MSS from that MTU.
    /// When the path carries less (the PLPMTU found by [`crate::pmtu`], which starts at
    /// 1200 bytes), the selective-repeat layer sends such a packet as several `Fragment`
    /// datagrams; the smoltcp MTU never changes during a session.
    pub link_payload: usize,
    /// Largest PLPMTU the path-MTU search probes for, in bytes of UDP payload (default 1452
    /// = 1500-byte Ethernet MTU − 20 IPv4 − 8 UDP − 20 of slack for a relay's framing).
    /// The search starts at [`crate::pmtu::BASE_PLPMTU`] (1200) and climbs to what the
    /// path carries, up to this (RFC 8899 `MAX_PLPMTU`). Raise it on paths known to carry
    /// jumbo frames, together with `link_payload`.
    pub max_plpmtu: usize,
    /// Largest TCP segment smoltcp builds, as an IP packet in bytes (default 65535): the
    /// session's link splits each longer one into segments that fit [`Config::ip_mtu`]
    /// before the selective-repeat layer numbers them, as a NIC's TCP segmentation offload
    /// does. smoltcp's work per segment (and TCP's MSS, advertised from it) is then paid
    /// once per 64 KiB instead of once per 1.4 KiB, while losses are still repaired packet
    /// by packet. At most `ip_mtu` turns it off. A peer whose link has no offload
    /// advertises its own smaller MSS, which smoltcp then keeps to.
    pub segment_offload: usize,
    /// Receive buffer of each TCP stream in bytes (default 8 MiB). It *is* the TCP window
    /// (smoltcp picks the window-scale shift from it), so throughput per stream is at most
    /// `buffer / RTT`, where RTT is what TCP sees: the selective-repeat layer hands packets
    /// up in order, so on a lossy path the packets behind a lost one wait for its
    /// retransmission, about one more round trip, and TCP counts them in flight meanwhile.
    /// With random loss the window must therefore cover about two round trips: 8 MiB
    /// carries 3.3 Gbit/s at 20 ms on a clean path, and 1 Gbit/s at 20 ms through 1 % loss
    /// (4 MiB gave 535 Mbit/s there in `sim_bench`). A stream gets this size only while
    /// `stream_buffer_budget` allows, else `stream_small_buffer`.
    pub stream_rx_buffer: usize,
    /// Send buffer of each TCP stream in bytes (default 8 MiB), for the same reason: data
    /// waits here until acknowledged, a repaired loss included. Budgeted like the receive
    /// buffer, together with it.
    pub stream_tx_buffer: usize,
    /// Receive and send buffer, each, of a stream opened while the budget is spent
    /// (default 256 KiB: a window of 2 Gbit/s at 1 ms, 100 Mbit/s at 20 ms). Fixed for the
    /// stream's life: the window-scale shift is sent in the SYN.
    pub stream_small_buffer: usize,
    /// Bytes of stream buffers (receive + send) that streams may hold at the big size
    /// (default 128 MiB: eight bulk streams at 8 + 8 MiB). Shared by every session made
    /// from clones of this config (a node's sessions share one), so a burst of N streams
    /// holds at most `limit + N × 2 × stream_small_buffer` bytes of buffers; a stream's
    /// bytes return when it is removed. See [`crate::budget`].
    pub stream_buffer_budget: Arc<Budget>,
    /// Disable Nagle's algorithm on new streams (default `false`: bulk streams should fill
    /// segments). Set it for interactive streams (a shell, RPC), or per stream with
    /// [`crate::Session::set_nodelay`].
    pub nodelay: bool,
    /// Selective-repeat window: at most this many packets between the oldest unacknowledged
    /// and the newest sent (default 16384, about 22 MiB at the default MTU). It bounds the
    /// receiver's reorder buffer; it must exceed about 2 × BDP in packets plus the packets
    /// sent while a loss is repaired.
    pub window_packets: u64,
    /// RTT assumed before the first measurement (default 100 ms).
    pub initial_rtt: Duration,
    /// Lower bound of the retransmission timeout (default 20 ms; smoltcp's own minimum of
    /// 1 s is what makes plain smoltcp collapse under random loss).
    pub min_rto: Duration,
    /// Upper bound of the backed-off retransmission timeout (default 5 s). While the peer is
    /// unreachable the timeout doubles up to this, and each period sends one datagram (the
    /// oldest packet again); so when the peer comes back, the next retransmission reaches
    /// it within about this long plus a round trip, and the transfer resumes at the rate
    /// congestion control had learnt. RFC 6298 allows a cap of at least 60 s; a short one
    /// costs a datagram every few seconds during an outage and buys a fast resumption.
    pub max_rto: Duration,
    /// Longest the receiver holds an ACK (default 1 ms). Also told to the sender's RTO.
    pub max_ack_delay: Duration,
    /// Acknowledge at least every this many data packets (default 8). A new hole is
    /// reported at once regardless.
    pub ack_every: u32,
    /// Packets the congestion window starts with (default 32).
    pub initial_cwnd_packets: u64,
    /// Pacing may catch up at most this much time in one burst (default 2 ms), so a driver
    /// whose timers fire late (tokio: 1 ms) still reaches the paced rate.
    pub pacing_burst: Duration,
    /// Packets smoltcp may queue for the selective-repeat sender before `Device::transmit`
    /// answers "not now" (default 256). Backpressure, not drops: a dropped packet would
    /// cost TCP a 1 s timeout.
    pub device_queue_packets: usize,
    /// The session ends with [`crate::SessionError::TimedOut`] when nothing arrived from the
    /// peer for this long (default 900 s = 15 min). Streams are meant to outlive outages as
    /// long as kernel TCP connections do: Linux gives up on unacknowledged data after about
    /// 15 minutes (`tcp_retries2` = 15, RFC 1122 section 4.2.3, item 5, asks for at least 100 s). Lower it
    /// to notice a vanished peer sooner at the cost of losing sessions across outages.
    pub idle_timeout: Duration,
    /// Send a keepalive ping when nothing was sent for this long (default 10 s, below
    /// common NAT timeouts of 30 s and more); the peer's ACK keeps `idle_timeout` away.
    pub keepalive: Duration,
    /// Incoming streams that may wait for [`crate::Session::accept`] (default 1024); more
    /// are refused with a reset.
    pub accept_backlog: usize,
    /// Concurrent streams per session, both directions together (default 16384).
    pub max_streams: usize,
    /// The in-flight cap is computed as if the path's minimum RTT were at least this
    /// (default 1 ms). A driver's timers and wakeups are coarse (tokio: 1 ms), so on a LAN
    /// or loopback, where the RTT is tens of microseconds, ACKs arrive in bursts a driver
    /// tick apart; a cap of 2 × (bandwidth × 30 µs) would then idle the sender for most of
    /// each tick, the measured bandwidth would fall with it, and the session settle at one
    /// window per tick. No effect on paths whose RTT is above it.
    pub cwnd_rtt_floor: Duration,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            link_payload: 1400,
            max_plpmtu: 1452,
            segment_offload: 65535,
            stream_rx_buffer: 8 << 20,
            stream_tx_buffer: 8 << 20,
            stream_small_buffer: 256 << 10,
            stream_buffer_budget: Budget::new(128 << 20),
            nodelay: false,
            window_packets: 16384,
            initial_rtt: Duration::from_millis(100),
            min_rto: Duration::from_millis(20),
            max_rto: Duration::from_secs(5),
            max_ack_delay: Duration::from_millis(1),
            ack_every: 8,
            initial_cwnd_packets: 32,
            pacing_burst: Duration::from_millis(2),
            device_queue_packets: 256,
            idle_timeout: Duration::from_secs(900),
            keepalive: Duration::from_secs(10),
            accept_backlog: 1024,
            max_streams: 16384,
            cwnd_rtt_floor: Duration::from_millis(1),
        }
    }
}

impl Config {
    /// IP MTU of the virtual link: the underlay payload minus the `Data` header.
    pub fn ip_mtu(&self) -> usize {
        self.link_payload.saturating_sub(Data::HEADER_LEN)
    }
}
