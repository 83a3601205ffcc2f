//! The calls into libc that need `unsafe` (STYLE.md: only here, each with its `SAFETY`).
#![allow(unsafe_code)]

/// Serve every heap allocation of at least `bytes` from its own fresh anonymous mapping,
/// unmapped when freed: glibc's `M_MMAP_THRESHOLD` (mallopt(3)). Returns whether it took
/// effect (`false` on other C libraries, or when `bytes` is out of range).
///
/// Why: the daemon's TCP buffers (`q2q_netstack::budget`) are zeroed allocations of 256 KiB
/// to 8 MiB. Served from a fresh mapping, calloc skips the zeroing and a page takes memory
/// only once data touches it, so resident memory follows the bytes in flight, and a
/// stream's buffers go back to the system when it closes. Left alone, glibc raises the
/// threshold to the size of each mapped block freed (up to 32 MiB), so after the first
/// bulk stream closes, buffers come from the heap, are zeroed (committed) whole, and stay
/// with the process. Setting the threshold fixes it, which turns that adjustment off.
pub fn fix_mmap_threshold(bytes: usize) -> bool {
    mallopt(MallocParam::MmapThreshold, bytes)
}

/// Let glibc keep up to `bytes` of freed memory at the top of each heap instead of giving
/// it back at once: `M_TRIM_THRESHOLD` (mallopt(3)). Returns whether it took effect.
///
/// Why: fixing the mmap threshold ([`fix_mmap_threshold`]) also freezes this one at its
/// default, 128 KiB. The TUN daemon allocates and frees 64 KiB packet buffers many
/// thousand times a second; at 128 KiB each free that empties the top of the heap handed
/// the pages back and the next allocation faulted them in again (page faults took 17% of
/// the daemon's time in the lab, perf). Blocks of the mmap threshold and up are not
/// affected (they are unmapped when freed), so this holds at most `bytes` per heap.
pub fn keep_freed_heap(bytes: usize) -> bool {
    mallopt(MallocParam::TrimThreshold, bytes)
}

enum MallocParam {
    MmapThreshold,
    TrimThreshold,
}

fn mallopt(param: MallocParam, bytes: usize) -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let Ok(v) = libc::c_int::try_from(bytes) else { return false };
        let param = match param {
            MallocParam::MmapThreshold => libc::M_MMAP_THRESHOLD,
            MallocParam::TrimThreshold => libc::M_TRIM_THRESHOLD,
        };
        // SAFETY: mallopt only sets an allocator parameter; glibc takes its own lock, so
        // it is safe to call with other threads allocating. It reads no memory of ours.
        unsafe { libc::mallopt(param, v) == 1 }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        let _ = (param, bytes);
        false
    }
}

/// Set the offloads the kernel may use on the TUN device behind `fd` (`TUNSETOFFLOAD`,
/// `TUN_F_*` bits of linux/if_tun.h); the device must carry virtio-net headers
/// (`IFF_VNET_HDR`).
///
/// Why ours: tun-rs's `offload(true)` also asks for UDP segmentation (`TUN_F_USO4/6`),
/// whose super-datagrams the TUN stack would have to cut up; we take TCP's only.
///
/// # Errors
/// The `ioctl`'s: `EINVAL` when the kernel does not know a bit or the device has no
/// virtio-net headers, `EBADF`/`ENOTTY` when `fd` is not a TUN device.
#[cfg(target_os = "linux")]
pub fn tun_set_offload(
    device: &impl std::os::fd::AsRawFd,
    flags: libc::c_uint,
) -> std::io::Result<()> {
    let fd = device.as_raw_fd();
    // SAFETY: TUNSETOFFLOAD takes its argument by value (an unsigned long of flags), so no
    // memory of ours is read or written; the descriptor lives as long as `device`, which
    // is borrowed for the call.
    let rc = unsafe { libc::ioctl(fd, libc::TUNSETOFFLOAD, libc::c_ulong::from(flags)) };
    if rc < 0 { Err(std::io::Error::last_os_error()) } else { Ok(()) }
}
