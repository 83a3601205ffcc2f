//! `q2q-tun down`: stop the running daemon, and repair what a killed one left (its resolver
//! settings and control socket).

use super::{DaemonError, control, socket_path, tun};
use crate::client::Home;
use std::fmt;
use std::time::Duration;

/// What `down` found and did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Down {
    /// A daemon was running and has stopped (it restores what it changed itself).
    Stopped,
    /// No daemon ran, and what a killed one left was repaired, in words.
    Repaired(String),
    /// No daemon ran, and nothing was left.
    Nothing,
}

impl fmt::Display for Down {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Down::Stopped => write!(f, "q2q-tun is down"),
            Down::Repaired(what) => {
                write!(f, "q2q-tun was not running; repaired what it left: {what}")
            }
            Down::Nothing => write!(f, "q2q-tun is not running; nothing to repair"),
        }
    }
}

/// Ask the daemon of `home` to shut down and wait (10 s at most, polled every 100 ms) for
/// its control socket to go; then undo resolver settings that are still recorded. Without
/// a daemon, also remove its stale control socket.
///
/// # Errors
/// The daemon answered but refused, or the resolver settings could not be restored.
pub async fn down(home: &Home) -> Result<Down, DaemonError> {
    let was_up = match control::ask(home, &control::Shutdown {}).await {
        Ok(_) => true,
        Err(DaemonError::NotRunning(_)) => false,
        Err(e) => return Err(e),
    };
    for _ in 0..100 {
        if !was_up || !socket_path(home).exists() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A killed daemon leaves its resolver settings (and control socket) behind.
    let repaired = super::resolver::restore(&tun::resolver_paths(home)).await?;
    if !was_up {
        let _ = std::fs::remove_file(socket_path(home));
    }
    Ok(match (was_up, repaired) {
        (true, _) => Down::Stopped,
        (false, Some(what)) => Down::Repaired(what),
        (false, None) => Down::Nothing,
    })
}
