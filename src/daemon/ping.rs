//! `q2q-tun ping`: through the running daemon when there is one, else from a node of its
//! own; the report travels as a box either way, and prints like ping(8).

use super::{DaemonError, choose_identity, control, socket_path};
use crate::address::Q2qAddress;
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
    let answer = if socket_path(home).exists() {
        control::ask(home, &control::Ping { to: to.clone(), count: Some(count) }).await?
    } else {
        let me = choose_identity(home, me)?;
        let config = NodeConfig { direct: !relay_only, ..Default::default() };
        let node = Node::start(home.clone(), me, config).await?;
        let r = node.ping(to, count, INTERVAL).await?;
        node.leave().await;
        report(&r)
    };
    Ok(Summary::from_answer(&answer))
}

/// A ping report as the control socket carries it: times in whole microseconds, `rtts_us`
/// comma-separated.
pub fn report(r: &PingReport) -> control::PingAnswer {
    let rtts: Vec<String> = r.rtts.iter().map(|d| d.as_micros().to_string()).collect();
    control::PingAnswer {
        peer: Some(r.peer.to_string()),
        connect_us: Some(r.connect.as_micros().to_string()),
        rtts_us: Some(rtts.join(",")),
        path: Some(r.path.to_string()),
        why: Some(r.why.clone()),
    }
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
    /// Read a report made by [`report`]; missing fields read as `?` or nothing.
    pub fn from_answer(a: &control::PingAnswer) -> Summary {
        let us = |s: &str| s.parse::<f64>().map(|v| v / 1000.0).unwrap_or(f64::NAN);
        let text = |v: &Option<String>, or: &str| v.clone().unwrap_or_else(|| or.to_string());
        Summary {
            peer: text(&a.peer, "?"),
            connect_ms: us(a.connect_us.as_deref().unwrap_or("")),
            rtts_ms: a
                .rtts_us
                .as_deref()
                .unwrap_or("")
                .split(',')
                .filter(|s| !s.is_empty())
                .map(us)
                .collect(),
            path: text(&a.path, "?"),
            why: text(&a.why, ""),
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
