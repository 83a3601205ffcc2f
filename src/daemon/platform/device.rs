//! The TUN device: whether this process may create it, and creating it.

use super::proc;
use crate::daemon::tun::TunError;
use q2q_netstack::tun::{PartialChecksum, RxChecksum};
use std::net::{Ipv4Addr, Ipv6Addr};
use tracing::warn;

/// Fail early, before logging in, when this process cannot create the device `name` (it
/// needs CAP_NET_ADMIN) or bind the shim's port 53 (CAP_NET_BIND_SERVICE). When the
/// capabilities cannot be read, the attempt itself will tell.
///
/// # Errors
/// [`TunError::NeedCapNetAdmin`] when either capability is missing.
pub fn check_privileges(name: &str) -> Result<(), TunError> {
    // Capability numbers from linux/capability.h.
    const CAP_NET_BIND_SERVICE: u32 = 10;
    const CAP_NET_ADMIN: u32 = 12;
    let Some(effective) = proc::effective_capabilities() else { return Ok(()) };
    let has = |cap: u32| effective & (1u64 << cap) != 0;
    if !has(CAP_NET_ADMIN) || !has(CAP_NET_BIND_SERVICE) {
        return Err(TunError::NeedCapNetAdmin(name.to_string()));
    }
    Ok(())
}

/// Addresses and size of a new device.
#[derive(Debug, Clone)]
pub struct DeviceConfig<'a> {
    /// Its name, like `q2q0`.
    pub name: &'a str,
    /// Its IPv4 address and prefix length (the pool's).
    pub ipv4: (Ipv4Addr, u8),
    /// Its IPv6 address and prefix length (the pool's).
    pub ipv6: (Ipv6Addr, u8),
    /// Its IP MTU in bytes.
    pub mtu: u16,
    /// Ask for checksum and TCP segmentation offload (virtio-net headers on every packet).
    pub offload: bool,
}

/// A new device, and whether each packet read or written carries a virtio-net header
/// ([`VNET_HDR_LEN`] bytes in front; see [`rx_checksum`] and [`tx_header`]).
pub struct Created {
    /// The device.
    pub device: tun_rs::AsyncDevice,
    /// Virtio-net headers in front of each packet: checksum and TCP segmentation offload.
    pub vnet: bool,
}

/// Bytes of the virtio-net header in front of each packet (`struct virtio_net_hdr`).
pub const VNET_HDR_LEN: usize = tun_rs::VIRTIO_NET_HDR_LEN;
// Fields of `struct virtio_net_hdr` (linux/virtio_net.h): flags, and GSO types.
const NEEDS_CSUM: u8 = 1;
const DATA_VALID: u8 = 2;
const GSO_NONE: u8 = 0;
const GSO_TCPV4: u8 = 1;
const GSO_TCPV6: u8 = 4;
const GSO_ECN: u8 = 0x80;

/// The offloads asked of the kernel: checksums, and TCP segmentation, so an app's TCP
/// hands over up to 64 KiB as one packet without the kernel cutting it and summing each
/// piece (`skb_segment`, 3.5% of the daemon's time in the lab). Not UDP segmentation: one
/// UDP header over many datagrams would need cutting up here.
const OFFLOADS: libc::c_uint = libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6;

/// How far the checksum of a packet read with `header` in front can be trusted; `None` for
/// a packet the stack cannot take as one (a UDP super-datagram, never asked for).
pub fn rx_checksum(header: &[u8; VNET_HDR_LEN]) -> Option<RxChecksum> {
    let (flags, gso_type) = (header[0], header[1] & !GSO_ECN);
    // A TCP super-packet (TSO) is one valid segment bigger than the MSS: smoltcp takes it.
    if ![GSO_NONE, GSO_TCPV4, GSO_TCPV6].contains(&gso_type) {
        return None;
    }
    Some(if flags & (NEEDS_CSUM | DATA_VALID) != 0 {
        RxChecksum::Trusted
    } else {
        RxChecksum::Unverified
    })
}

/// The virtio-net header to write in front of a packet: whole (no flags), or with its TCP
/// checksum left for the kernel to complete (`partial`, from
/// [`Stack::partial_checksum`](q2q_netstack::tun::Stack::partial_checksum)). Packets to
/// a local app are never segmented: smoltcp keeps to the MSS the app's kernel gave.
pub fn tx_header(partial: Option<PartialChecksum>) -> [u8; VNET_HDR_LEN] {
    let mut hdr = tun_rs::VirtioNetHdr::default();
    if let Some(p) = partial {
        hdr.flags = NEEDS_CSUM;
        hdr.csum_start = p.start;
        hdr.csum_offset = p.offset;
    }
    let mut out = [0u8; VNET_HDR_LEN];
    // Cannot fail: `out` has the header's length.
    let _ = hdr.encode(&mut out);
    out
}

/// Create the device, up, with its two addresses (hence only the pool's connected routes).
/// It is not persistent: it vanishes when the returned handle is dropped or the process ends.
///
/// # Errors
/// [`TunError::NeedCapNetAdmin`] when the kernel refuses for lack of privileges,
/// [`TunError::Device`] for any other failure.
///
/// With [`DeviceConfig::offload`], a kernel without virtio-net headers on TUN devices gets
/// a plain device, and a warning says so.
pub fn create(config: &DeviceConfig<'_>) -> Result<Created, TunError> {
    if config.offload {
        match build(config, true) {
            Ok(device) => match crate::sys::tun_set_offload(&device, OFFLOADS) {
                Ok(()) => return Ok(Created { device, vnet: true }),
                // Still carrying headers, with whatever tun-rs asked for: not usable as is.
                Err(e) => warn!(error = %e, "TUN offload not taken; a plain device instead"),
            },
            Err(e @ TunError::NeedCapNetAdmin(_)) => return Err(e),
            Err(e) => warn!(error = %e, "TUN offload not available; a plain device instead"),
        }
    }
    Ok(Created { device: build(config, false)?, vnet: false })
}

fn build(config: &DeviceConfig<'_>, offload: bool) -> Result<tun_rs::AsyncDevice, TunError> {
    tun_rs::DeviceBuilder::new()
        .name(config.name)
        .ipv4(config.ipv4.0, config.ipv4.1, None)
        .ipv6(config.ipv6.0, config.ipv6.1)
        .mtu(config.mtu)
        .offload(offload)
        .build_async()
        .map_err(|e| match e {
            _ if e.kind() == std::io::ErrorKind::PermissionDenied
                || e.raw_os_error() == Some(nix::errno::Errno::EPERM as i32) =>
            {
                TunError::NeedCapNetAdmin(config.name.to_string())
            }
            _ => TunError::Device(config.name.to_string(), e),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(flags: u8, gso_type: u8) -> [u8; VNET_HDR_LEN] {
        let mut h = [0u8; VNET_HDR_LEN];
        h[0] = flags;
        h[1] = gso_type;
        h
    }

    #[test]
    fn the_kernel_vouches_for_a_checksum_it_left_out_or_checked() {
        assert_eq!(rx_checksum(&header(0, 0)), Some(RxChecksum::Unverified));
        assert_eq!(rx_checksum(&header(NEEDS_CSUM, 0)), Some(RxChecksum::Trusted));
        assert_eq!(rx_checksum(&header(DATA_VALID, 0)), Some(RxChecksum::Trusted));
        // TCP super-packets (TSO), with and without ECN, are taken whole.
        for gso in [1, 4, 1 | 0x80, 4 | 0x80] {
            assert_eq!(rx_checksum(&header(NEEDS_CSUM, gso)), Some(RxChecksum::Trusted));
        }
        // UDP super-datagrams (UFO, USO) are not.
        for gso in [3, 5, 5 | 0x80] {
            assert_eq!(rx_checksum(&header(NEEDS_CSUM, gso)), None);
        }
    }

    #[test]
    fn a_partial_checksum_becomes_needs_csum_with_its_offsets() {
        assert_eq!(tx_header(None), [0u8; VNET_HDR_LEN]);
        let h = tx_header(Some(PartialChecksum { start: 20, offset: 16 }));
        let decoded = tun_rs::VirtioNetHdr::decode(&h).unwrap();
        assert_eq!(decoded.flags, NEEDS_CSUM);
        assert_eq!(decoded.gso_type, 0);
        assert_eq!((decoded.csum_start, decoded.csum_offset), (20, 16));
        // The kernel reads them in the host's byte order at fixed places.
        assert_eq!(&h[6..10], &[20u16.to_ne_bytes(), 16u16.to_ne_bytes()].concat()[..]);
    }
}
