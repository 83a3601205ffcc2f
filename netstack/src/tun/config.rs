//! Tuning of the TUN termination [`Stack`](super::Stack), with the reasons for each default.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use smoltcp::time::Duration;
use smoltcp::wire::{Ipv4Cidr, Ipv6Cidr};

use crate::budget::Budget;

/// Settings of a [`Stack`](super::Stack). The defaults match the daemon's default address
/// pool (`src/dns/pool.rs`): 100.64.0.0/10 and fd71:7132::/64.
#[derive(Debug, Clone)]
pub struct Config {
    /// IPv4 virtual addresses: TCP, UDP and ICMP echo to these are terminated here (default
    /// 100.64.0.0/10, the shared address space). Its network and broadcast addresses are not.
    pub pool_v4: Ipv4Cidr,
    /// IPv6 virtual addresses (default the ULA fd71:7132::/64); `None` for none.
    pub pool_v6: Option<Ipv6Cidr>,
    /// IP MTU of the TUN device (default 1400: a full TCP segment then fits one PTCP
    /// datagram on a 1500-byte path without the app's segments being split again). smoltcp
    /// advertises its MSS from it (1360 over IPv4, 1340 over IPv6) and never sends a segment
    /// larger, so the kernel's segments are clamped too. Set the TUN device to the same MTU.
    /// Taken as at least 1280 (the IPv6 minimum) and at most 65535.
    pub mtu: usize,
    /// Receive buffer of each TCP flow in bytes (default 256 KiB). It is the window offered
    /// to the app (smoltcp picks the window-scale shift from it) and how far the app can run
    /// ahead of the daemon draining it into the peer stream. The path it covers is local
    /// (the app's kernel to this daemon), so it only has to outlast the daemon's pauses:
    /// 256 KiB is 2 Gbit/s even if the daemon drained once a millisecond, and under load it
    /// drains far more often. More only lets the kernel queue more on the TUN device, which
    /// the daemon then reads back from outside the caches: with 1 MiB, four parallel flows
    /// moved 0.85 × what one did in `tools/bench/lab-speed`, with 256 KiB 0.95; one flow
    /// moved the same within the machine's noise (perhaps a few percent less). A flow gets
    /// this size only while `buffer_budget` allows, else `small_buffer`.
    pub rx_buffer: usize,
    /// Send buffer of each TCP flow in bytes (default 1 MiB): data from the peer waiting for
    /// the app to acknowledge it. Budgeted with the receive buffer.
    pub tx_buffer: usize,
    /// Receive and send buffer, each, of a flow accepted while the budget is spent (default
    /// 256 KiB: 2 Gbit/s with the daemon waking every millisecond). Fixed for the flow's
    /// life: the window-scale shift is sent in the SYN.
    pub small_buffer: usize,
    /// Bytes of flow buffers (receive + send) that flows may hold at the big size (default
    /// 64 MiB: 51 flows at 256 KiB + 1 MiB). Shared by clones of this config; a burst of N flows
    /// holds at most `limit + N × 2 × small_buffer` bytes of buffers. See
    /// [`crate::budget`].
    pub buffer_budget: Arc<Budget>,
    /// A SYN held for this long without [`Stack::accept_flow`](super::Stack::accept_flow) or
    /// [`Stack::refuse_flow`](super::Stack::refuse_flow) is refused with a RST (default 10 s):
    /// an offline or silent peer becomes "connection refused" within a bounded time instead
    /// of the kernel's two-minute connect timeout.
    pub connect_timeout: Duration,
    /// Flows waiting for a decision at most (default 1024); SYNs beyond are refused at once.
    pub max_pending: usize,
    /// Flows (pending and open) at most (default 16384); SYNs beyond are refused at once.
    pub max_flows: usize,
    /// Packets queued for the kernel before smoltcp is told "not now" (default 512).
    /// Backpressure, not drops: a dropped segment costs the app a retransmission timeout.
    pub device_queue_packets: usize,
    /// Datagram and echo events waiting for [`Stack::poll_event`](super::Stack::poll_event)
    /// at most (default 1024); more are dropped and counted, as a full socket would.
    pub max_queued_datagrams: usize,
    /// Packets made by the stack itself (RSTs, UDP, echo replies, ICMP errors) waiting for
    /// [`Stack::poll_transmit`](super::Stack::poll_transmit) at most (default 1024).
    pub max_queued_packets: usize,
    /// Seed for TCP initial sequence numbers and ports. The core reads no randomness: the
    /// driver should set a random value.
    pub random_seed: u64,
    /// Leave TCP checksums to the kernel (default off). Set it when the device carries
    /// virtio-net headers with checksum offload (Linux `IFF_VNET_HDR`, `TUN_F_CSUM`): every
    /// TCP segment from [`Stack::poll_transmit`](super::Stack::poll_transmit) then holds
    /// only the pseudo-header sum in its checksum field, to be written with the header
    /// [`Stack::partial_checksum`](super::Stack::partial_checksum) describes, and the kernel
    /// neither computes nor verifies a sum over the data on this local hop. Packets the
    /// driver marks [`RxChecksum::Trusted`](super::RxChecksum::Trusted) skip verification
    /// either way. UDP and ICMP leave with complete checksums.
    pub checksum_offload: bool,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            pool_v4: Ipv4Cidr::new(Ipv4Addr::new(100, 64, 0, 0), 10),
            pool_v6: Some(Ipv6Cidr::new(Ipv6Addr::new(0xfd71, 0x7132, 0, 0, 0, 0, 0, 0), 64)),
            mtu: 1400,
            rx_buffer: 256 << 10,
            tx_buffer: 1 << 20,
            small_buffer: 256 << 10,
            buffer_budget: Budget::new(64 << 20),
            connect_timeout: Duration::from_secs(10),
            max_pending: 1024,
            max_flows: 16384,
            device_queue_packets: 512,
            max_queued_datagrams: 1024,
            max_queued_packets: 1024,
            random_seed: 0,
            checksum_offload: false,
        }
    }
}

impl Config {
    /// Whether `addr` is a virtual address this stack answers for: inside a pool, and not
    /// the IPv4 pool's network or broadcast address.
    pub fn is_virtual(&self, addr: IpAddr) -> bool {
        match addr {
            IpAddr::V4(a) => {
                let pool = self.pool_v4;
                pool.contains_addr(&a)
                    && (pool.prefix_len() >= 31
                        || (a != pool.network().address() && Some(a) != pool.broadcast()))
            }
            IpAddr::V6(a) => self.pool_v6.is_some_and(|p| p.contains_addr(&a)),
        }
    }
}
