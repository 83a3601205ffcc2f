//! The resolv.conf file: our marker and nameserver lines first, written in place.

use super::{MARKER, Paths, ResolverError};
use crate::daemon::platform::proc;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// The `nameserver` addresses of a resolv.conf text, in order.
pub(super) fn nameservers(text: &str) -> impl Iterator<Item = &str> {
    text.lines().filter_map(|l| {
        let mut words = l.split_whitespace();
        (words.next() == Some("nameserver")).then(|| words.next()).flatten()
    })
}

pub(super) fn sha256(bytes: &[u8]) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, bytes))
}

/// `content` without our marker line and the nameserver line after it (unchanged when it
/// does not start with the marker).
pub(super) fn strip_ours(content: &[u8]) -> &[u8] {
    let Some(rest) = content.strip_prefix(format!("{MARKER}\n").as_bytes()) else {
        return content;
    };
    if rest.starts_with(b"nameserver ") {
        match rest.iter().position(|&b| b == b'\n') {
            Some(end) => &rest[end + 1..],
            None => &[],
        }
    } else {
        rest
    }
}

/// The shim's address in a resolv.conf that carries our lines (the nameserver right after
/// our marker): what this machine's own look-ups of other names must not ask.
pub fn shim_nameserver(content: &[u8]) -> Option<IpAddr> {
    let rest = content.strip_prefix(format!("{MARKER}\n").as_bytes())?;
    let line = rest.split(|&b| b == b'\n').next()?;
    let line = std::str::from_utf8(line).ok()?;
    line.strip_prefix("nameserver ")?.trim().parse().ok()
}

pub(super) fn has_marker(content: &[u8]) -> bool {
    content.starts_with(format!("{MARKER}\n").as_bytes())
}

/// Overwrite `path` in place (truncate, write, fsync), never by rename: inside
/// `ip netns exec`, /etc/resolv.conf is a bind mount, and renaming over a mount point fails
/// with EBUSY. A reader may see the file short for an instant; resolvers reread it later.
pub(super) fn write_in_place(path: &Path, bytes: &[u8]) -> Result<(), ResolverError> {
    let result = (|| {
        let mut f =
            OpenOptions::new().write(true).create(true).truncate(true).mode(0o644).open(path)?;
        f.write_all(bytes)?;
        f.sync_all()
    })();
    result.map_err(|e| ResolverError::file("write", path, e))
}

/// `path` with symbolic links followed, also to a target that does not exist (yet), so a
/// file we create is the one the link names and the one `restore` removes.
pub(super) fn follow_links(path: &Path) -> PathBuf {
    let mut p = path.to_path_buf();
    for _ in 0..16 {
        match fs::read_link(&p) {
            Ok(target) => {
                p = match p.parent() {
                    Some(dir) if target.is_relative() => dir.join(target),
                    _ => target,
                }
            }
            Err(_) => break,
        }
    }
    p
}

/// The resolv.conf in force for this process's look-ups: links followed, and the file
/// mounted over it (see [`proc::mount_source`]).
pub fn live_file(paths: &Paths) -> PathBuf {
    let file = follow_links(&paths.resolv_conf);
    proc::mount_source(&file).unwrap_or(file)
}
