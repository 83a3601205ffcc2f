//! The TUN device: whether this process may create it, and creating it.

use super::proc;
use crate::daemon::tun::TunError;
use std::net::{Ipv4Addr, Ipv6Addr};

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
}

/// Create the device, up, with its two addresses (hence only the pool's connected routes).
/// It is not persistent: it vanishes when the returned handle is dropped or the process ends.
///
/// # Errors
/// [`TunError::NeedCapNetAdmin`] when the kernel refuses for lack of privileges,
/// [`TunError::Device`] for any other failure.
pub fn create(config: &DeviceConfig<'_>) -> Result<tun_rs::AsyncDevice, TunError> {
    tun_rs::DeviceBuilder::new()
        .name(config.name)
        .ipv4(config.ipv4.0, config.ipv4.1, None)
        .ipv6(config.ipv6.0, config.ipv6.1)
        .mtu(config.mtu)
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
