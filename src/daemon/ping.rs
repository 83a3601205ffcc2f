//! `q2q-tun ping`: through the running daemon when there is one, else from a node of its
//! own; the report travels as a box either way, and prints like ping(8).

use super::{DaemonError, choose_identity, control, socket_path};
use crate::address::Q2qAddress;
use crate::amp::AmpBox;
use crate::client::Home;
use crate::presence::node::{Node, NodeConfig, PingReport};
use std::fmt;
use std::time::Duration;

/// Pause between two round trips.
const INTERVAL: Duration = Duration::from_millis(200);

/// Ping `to` `count` times: through the daemon of `home` when its control socket exists,
/// else as `me` (or the only identity stored) from a node started for this, direct paths
/// allowed unless `relay_only`.
///
/// # Errors
/// The daemon's refusal (`PING_FAILED` with its reason), or the node's failure to start or
/// to reach `to`.
pub async fn ping(
    home: &Home,
    to: &Q2qAddress,
    count: u32,
    me: Option<&Q2qAddress>,
    relay_only: bool,
) -> Result<Summary, DaemonError> {
    let b = if socket_path(home).exists() {
        let request =
            AmpBox::command("ping").with("to", to.to_string()).with("count", count.to_string());
        control::ask(home, request).await?
    } else {
        let me = choose_identity(home, me)?;
        let config = NodeConfig { direct: !relay_only, ..Default::default() };
        let node = Node::start(home.clone(), me, config).await?;
        let r = node.ping(to, count, INTERVAL).await?;
        node.leave().await;
        report_box(&r)
    };
    Ok(Summary::from_box(&b))
}

/// A ping report as a box (for the control socket): times in whole microseconds,
/// `rtts_us` comma-separated.
pub fn report_box(r: &PingReport) -> AmpBox {
    let rtts: Vec<String> = r.rtts.iter().map(|d| d.as_micros().to_string()).collect();
    AmpBox::new()
        .with("peer", r.peer.to_string())
        .with("connect_us", r.connect.as_micros().to_string())
        .with("rtts_us", rtts.join(","))
        .with("path", r.path.to_string())
        .with("why", &r.why)
}

/// A ping report as printed.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    /// Who answered.
    pub peer: String,
    /// Milliseconds from asking the server to an open stream (NaN when not given).
    pub connect_ms: f64,
    /// Each round trip, in milliseconds.
    pub rtts_ms: Vec<f64>,
    /// The path the session took.
    pub path: String,
    /// Why that path.
    pub why: String,
}

impl Summary {
    /// Read a box made by [`report_box`]; missing fields read as `?` or nothing.
    pub fn from_box(b: &AmpBox) -> Summary {
        let us = |s: &str| s.parse::<f64>().map(|v| v / 1000.0).unwrap_or(f64::NAN);
        Summary {
            peer: b.get_str("peer").unwrap_or("?").to_string(),
            connect_ms: us(b.get_str("connect_us").unwrap_or("")),
            rtts_ms: b
                .get_str("rtts_us")
                .unwrap_or("")
                .split(',')
                .filter(|s| !s.is_empty())
                .map(us)
                .collect(),
            path: b.get_str("path").unwrap_or("?").to_string(),
            why: b.get_str("why").unwrap_or("").to_string(),
        }
    }
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "PING {}: connected in {:.1} ms", self.peer, self.connect_ms)?;
        for (i, rtt) in self.rtts_ms.iter().enumerate() {
            writeln!(f, "reply {} from {}: time={rtt:.2} ms", i + 1, self.peer)?;
        }
        let n = self.rtts_ms.len().max(1) as f64;
        let min = self.rtts_ms.iter().cloned().fold(f64::INFINITY, f64::min);
        let max = self.rtts_ms.iter().cloned().fold(0.0, f64::max);
        let avg = self.rtts_ms.iter().sum::<f64>() / n;
        writeln!(f, "{} replies, min/avg/max = {min:.2}/{avg:.2}/{max:.2} ms", self.rtts_ms.len())?;
        writeln!(f, "path: {} ({})", self.path, self.why)
    }
}
