//! `q2q-tun doctor dns`: the resolver checks of [`super::resolver::doctor`], pointed at what
//! the running daemon says about itself.

use super::resolver::{self, Check};
use super::{status, tun};
use crate::address::Q2qAddress;
use crate::client::Home;
use std::fmt;
use std::net::SocketAddr;

/// Why `doctor dns` could not run, or what it found wrong.
#[derive(Debug, thiserror::Error)]
pub enum DoctorError {
    /// No daemon to ask for our own name, and no name given.
    #[error(
        "no q2q-tun daemon is running for {0}: start it with `sudo q2q-tun up`, or name a lookup to try"
    )]
    NoName(String),
    /// The default pool (for the shim's address) is unusable.
    #[error(transparent)]
    Pool(#[from] crate::dns::pool::PoolError),
    /// Some checks failed (each is printed with the report).
    #[error("{failed} of {total} DNS checks failed")]
    Failed {
        /// How many failed.
        failed: usize,
        /// How many ran.
        total: usize,
    },
}

/// The findings of `doctor dns`, printed one `ok - …` or `not ok - …` line each.
#[derive(Debug, Clone)]
pub struct DnsReport {
    /// The daemon runs without the device and shim (or does not run).
    pub no_tun: bool,
    /// The checks, in order: settings, a system lookup, a query to the shim.
    pub checks: Vec<Check>,
}

impl DnsReport {
    /// `Ok` when every check passed.
    ///
    /// # Errors
    /// [`DoctorError::Failed`] with the counts.
    pub fn verdict(&self) -> Result<(), DoctorError> {
        let failed = self.checks.iter().filter(|c| !c.ok).count();
        if failed > 0 {
            return Err(DoctorError::Failed { failed, total: self.checks.len() });
        }
        Ok(())
    }
}

impl fmt::Display for DnsReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.no_tun {
            writeln!(f, "not ok - the daemon runs without the TUN device and shim (--no-tun)")?;
        }
        for c in &self.checks {
            writeln!(f, "{} - {}", if c.ok { "ok" } else { "not ok" }, c.what)?;
        }
        Ok(())
    }
}

/// Check the resolver set-up of the daemon of `home` with a lookup of `name` (default: our
/// own, like `alice.q2q`): the mode and its settings, the system resolver, the shim asked
/// directly (on the daemon's shim address, else the default pool's `100.64.0.1:53`).
///
/// # Errors
/// [`DoctorError::NoName`] with no daemon and no name; the checks' failures are in the
/// report ([`DnsReport::verdict`]).
pub async fn dns(home: &Home, name: Option<String>) -> Result<DnsReport, DoctorError> {
    let status = status::ask(home).await.unwrap_or_default();
    let me = status.address.as_deref().and_then(|a| Q2qAddress::parse(a).ok());
    let name = match (name, &me) {
        (Some(n), _) => n,
        (None, Some(me)) => format!("{}.q2q", me.user),
        (None, None) => return Err(DoctorError::NoName(home.root().display().to_string())),
    };
    let shim = match status.dns.as_deref().map(str::parse::<SocketAddr>) {
        Some(Ok(a)) => a,
        _ => {
            let pool = crate::dns::pool::Pool::new(Default::default())?;
            SocketAddr::from((pool.node_ipv4(), 53))
        }
    };
    let link = status.tun_device.as_deref().unwrap_or("q2q0");
    let checks = resolver::doctor(&tun::resolver_paths(home), link, &name, shim).await;
    Ok(DnsReport { no_tun: status.tun.is_none(), checks })
}
