//! Platform socket options of the PTCP socket.

use tokio::net::UdpSocket;
use tracing::debug;

/// Ask for `bytes` of kernel receive and send buffer. The default (about 212 KiB on Linux)
/// overflows in bursts at Gbit/s rates, and every overflow costs a retransmission. As root
/// (CAP_NET_ADMIN) the `*BUFFORCE` options bypass `net.core.{r,w}mem_max`; otherwise the
/// plain options are capped at that limit by the kernel. Failures are only logged: a small
/// buffer is slower, not wrong.
#[cfg(target_os = "linux")]
pub(crate) fn enlarge_buffers(socket: &UdpSocket, bytes: usize) {
    use nix::sys::socket::{getsockopt, setsockopt, sockopt};
    if setsockopt(socket, sockopt::RcvBufForce, &bytes).is_err() {
        let _ = setsockopt(socket, sockopt::RcvBuf, &bytes);
    }
    if setsockopt(socket, sockopt::SndBufForce, &bytes).is_err() {
        let _ = setsockopt(socket, sockopt::SndBuf, &bytes);
    }
    debug!(
        rcvbuf = getsockopt(socket, sockopt::RcvBuf).unwrap_or(0),
        sndbuf = getsockopt(socket, sockopt::SndBuf).unwrap_or(0),
        "PTCP socket buffers"
    );
}

#[cfg(not(target_os = "linux"))]
pub(crate) fn enlarge_buffers(_socket: &UdpSocket, _bytes: usize) {
    debug!("socket buffer sizing not implemented on this platform");
}
