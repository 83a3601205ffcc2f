//! System resolver integration for the `*.q2q` shim: the system's lookups of `*.q2q` names
//! reach the shim, and nothing else about name resolution changes.
//!
//! | mode          | what `install` changes                                                   |
//! |---------------|--------------------------------------------------------------------------|
//! | `resolved`    | the link's DNS server and the routing-only domain `~q2q` (resolvectl)    |
//! | `resolv-conf` | one `nameserver` line first in resolv.conf (in a lab host, its own file) |
//! | `off`         | nothing                                                                  |
//!
//! Crash safety: [`install`] first undoes what an earlier run left ([`restore`]), then writes
//! `$Q2Q_HOME/resolver.toml` (and the original resolv.conf as `resolv.conf.q2q-backup`)
//! before it touches the system, so whatever a killed daemon changed, the next `up` or
//! `down` knows and undoes. Settings of systemd-resolved are per link and vanish with the
//! device anyway; a resolv.conf line would outlive the daemon, hence the backup.
//!
//! | file            | what                                                                   |
//! |-----------------|------------------------------------------------------------------------|
//! | `install.rs`    | [`detect`], [`install`], [`restore`]                                   |
//! | `keep.rs`       | [`repair`] and the [`Keeper`] that runs it when resolv.conf changes     |
//! | `file.rs`       | resolv.conf contents: our two lines, written in place                  |
//! | `state.rs`      | `$Q2Q_HOME/resolver.toml`: what `install` changed                       |
//! | `resolvectl.rs` | systemd-resolved's command, bounded in time                            |
//! | `doctor.rs`     | `q2q-tun doctor dns`: settings, a system lookup, a query to the shim   |

mod doctor;
mod file;
mod install;
mod keep;
mod resolvectl;
mod state;
#[cfg(test)]
mod tests;

pub use doctor::{Check, doctor};
pub use file::{live_file, shim_nameserver};
pub use install::{detect, install, restore};
pub use keep::{Keeper, QUIET, keep, repair};
pub use state::installed;

use serde::{Deserialize, Serialize};
use std::fmt;
use std::io;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

/// First line of a resolv.conf that carries our nameserver: how `restore` knows the file is
/// still as we left it, and how a reader of the file learns who added the line.
const MARKER: &str = "# q2q-tun: nameserver for *.q2q added; `q2q-tun down` restores the original";
/// The routing-only domain: resolved sends `*.q2q` to the link's server and nothing else.
const ROUTING_DOMAIN: &str = "~q2q";
/// How the user wants the shim hooked into the system resolver (`--dns`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Wanted {
    /// systemd-resolved where it runs, resolv.conf otherwise.
    #[default]
    Auto,
    /// systemd-resolved, per link: a routing-only `~q2q` domain.
    Resolved,
    /// A nameserver line first in /etc/resolv.conf that `down` removes.
    ResolvConf,
    /// Leave the system resolver alone.
    Off,
}

/// How the shim is hooked into the system resolver.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// systemd-resolved routes `~q2q` to the shim on the device's link.
    Resolved,
    /// The shim is the first nameserver in resolv.conf.
    ResolvConf,
    /// Not hooked in: only direct queries reach the shim.
    Off,
}

impl Mode {
    /// The name `--dns` takes for this mode.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Resolved => "resolved",
            Mode::ResolvConf => "resolv-conf",
            Mode::Off => "off",
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::Resolved => {
                "resolved: systemd-resolved sends *.q2q (routing domain ~q2q) to the shim"
            }
            Mode::ResolvConf => "resolv-conf: the shim is the first nameserver in resolv.conf",
            Mode::Off => "off: the system resolver does not know *.q2q",
        })
    }
}

/// Where the resolver settings and our state live; tests point them at temporary files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Paths {
    /// The resolver file (inside `ip netns exec`, the namespace's own bind-mounted file).
    pub resolv_conf: PathBuf,
    /// Where the state file and the backup live (`$Q2Q_HOME`).
    pub state_dir: PathBuf,
    /// The resolvectl program.
    pub resolvectl: PathBuf,
    /// Check the network namespace: in one of its own, resolved cannot serve the link, and a
    /// resolv.conf that is not the namespace's own is the whole machine's (off in tests).
    pub netns_guard: bool,
}

impl Paths {
    /// The real system's resolver, with state in `state_dir`.
    pub fn system(state_dir: &Path) -> Paths {
        Paths {
            resolv_conf: PathBuf::from("/etc/resolv.conf"),
            state_dir: state_dir.to_path_buf(),
            resolvectl: PathBuf::from("resolvectl"),
            netns_guard: true,
        }
    }

    /// Everything under `dir` (a sandbox for tests): `dir/resolv.conf`, state in
    /// `dir/home`, a `dir/resolvectl` program, no namespace check.
    pub fn sandbox(dir: &Path) -> Paths {
        Paths {
            resolv_conf: dir.join("resolv.conf"),
            state_dir: dir.join("home"),
            resolvectl: dir.join("resolvectl"),
            netns_guard: false,
        }
    }

    fn state_file(&self) -> PathBuf {
        self.state_dir.join("resolver.toml")
    }

    fn backup_file(&self) -> PathBuf {
        self.state_dir.join("resolv.conf.q2q-backup")
    }
}

/// Why the system resolver could not be changed or restored.
#[derive(Debug, thiserror::Error)]
pub enum ResolverError {
    /// A resolver or state file could not be read, written or removed.
    #[error("cannot {action} {}: {error}{hint}", path.display())]
    File { action: &'static str, path: PathBuf, error: io::Error, hint: &'static str },
    /// resolvectl could not be started.
    #[error(
        "cannot run `{command}`: {error} (is systemd-resolved installed? `--dns resolv-conf` \
         or `--dns off` do without it)"
    )]
    Spawn { command: String, error: io::Error },
    /// resolvectl ran and failed.
    #[error("`{command}` failed ({status}): {stderr}")]
    Command { command: String, status: String, stderr: String },
    /// resolvectl did not finish in time (and was killed).
    #[error(
        "`{command}` did not finish within {secs} s and was killed: is systemd-resolved stuck? \
         (`--dns resolv-conf` does without it)"
    )]
    Timeout { command: String, secs: u64 },
    /// In a network namespace of its own, the machine's resolv.conf must not change.
    #[error(
        "this process runs in a network namespace of its own, but {} is the machine's: \
         pointing it at {nameserver} would stall every lookup outside this namespace. Give \
         the namespace its own file (/etc/netns/<name>/resolv.conf, which `ip netns exec` \
         mounts over it), or pass --dns off",
        path.display()
    )]
    SharedResolvConf { path: PathBuf, nameserver: IpAddr },
}

impl ResolverError {
    pub(super) fn file(action: &'static str, path: &Path, error: io::Error) -> Self {
        let hint = if error.kind() == io::ErrorKind::PermissionDenied {
            " (changing the system resolver needs root: `sudo q2q-tun up`, or --dns off)"
        } else {
            ""
        };
        ResolverError::File { action, path: path.to_path_buf(), error, hint }
    }
}
