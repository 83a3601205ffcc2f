//! What this process learns from /proc: its network namespace, its mounts, its capabilities.

use std::fs;
use std::path::{Path, PathBuf};

/// Whether this process runs in another network namespace than PID 1 (readable as root;
/// when it cannot be told, no).
pub fn in_own_netns() -> bool {
    match (fs::read_link("/proc/self/ns/net"), fs::read_link("/proc/1/ns/net")) {
        (Ok(mine), Ok(init)) => mine != init,
        _ => false,
    }
}

/// Whether something is mounted on `path` (as `ip netns exec` mounts the namespace's own
/// resolv.conf).
pub fn is_mount_point(path: &Path) -> bool {
    let Ok(info) = fs::read_to_string("/proc/self/mountinfo") else { return false };
    let wanted = path.to_string_lossy();
    info.lines().filter_map(|l| l.split(' ').nth(4)).any(|m| unescape_mount(m) == wanted)
}

/// The file mounted over `path` when it is a bind mount of a file this process can see
/// (`ip netns exec` mounts /etc/netns/<ns>/resolv.conf over /etc/resolv.conf), checked to be
/// the same file. Someone rewriting the namespace's resolver writes that file, maybe by
/// renaming a new one over it, which this process's mount would never show.
pub fn mount_source(path: &Path) -> Option<PathBuf> {
    use std::os::unix::fs::MetadataExt;
    let path = fs::canonicalize(path).ok()?;
    let info = fs::read_to_string("/proc/self/mountinfo").ok()?;
    let root = mount_root(&info, &path.to_string_lossy())?;
    let (a, b) = (fs::metadata(&root).ok()?, fs::metadata(&path).ok()?);
    (root != path && a.dev() == b.dev() && a.ino() == b.ino()).then_some(root)
}

/// The root (within its filesystem) of the topmost mount at `mount_point`, from a
/// /proc/self/mountinfo text; for a bind-mounted file, the file's own path.
pub fn mount_root(mountinfo: &str, mount_point: &str) -> Option<PathBuf> {
    mountinfo
        .lines()
        .filter_map(|l| {
            let mut fields = l.split(' ');
            let root = fields.nth(3)?;
            let point = fields.next()?;
            (unescape_mount(point) == mount_point).then(|| PathBuf::from(unescape_mount(root)))
        })
        .next_back()
        .filter(|root| root != Path::new("/"))
}

/// mountinfo writes space, tab, newline and backslash as octal escapes (`\040`).
pub fn unescape_mount(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('\\') {
        out.push_str(&rest[..i]);
        let code = rest.get(i + 1..i + 4).and_then(|o| u8::from_str_radix(o, 8).ok());
        match code {
            Some(c) => {
                out.push(char::from(c));
                rest = &rest[i + 4..];
            }
            None => {
                out.push('\\');
                rest = &rest[i + 1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// The effective capability set of this process (`CapEff` in /proc/self/status; None when
/// it cannot be read).
pub fn effective_capabilities() -> Option<u64> {
    let status = fs::read_to_string("/proc/self/status").ok()?;
    let hex = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?.trim();
    u64::from_str_radix(hex, 16).ok()
}
