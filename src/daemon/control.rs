//! The control socket `$Q2Q_HOME/q2q.sock`, both ends: [`serve`] in the daemon, [`ask`] in
//! the verbs. Requests and answers are AMP boxes; a refusal carries a code and a sentence.

use super::status::Status;
use super::{DaemonError, forward, ping, socket_path, tun};
use crate::address::Q2qAddress;
use crate::amp::{self, AmpBox};
use crate::client::Home;
use crate::presence::node::Node;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::UnixStream;

/// What a control connection can reach.
pub(super) struct Control {
    pub node: Node,
    pub home: Home,
    pub tun: Option<Arc<tun::Running>>,
}

/// A refusal: an error code and a sentence for a person.
type Refusal = (String, String);

/// Answer the requests of one control connection until it closes; `shutdown` asks the
/// daemon's loop to end through `stop`.
pub(super) async fn serve(ctl: Control, stream: UnixStream, stop: tokio::sync::mpsc::Sender<()>) {
    let Control { node, home, tun } = ctl;
    let (_handle, mut incoming) = amp::peer::spawn(stream);
    while let Some(req) = incoming.recv().await {
        let result = match req.command() {
            "status" => Ok(Status::of(&node, tun.as_deref()).to_box()),
            "whois" => whois(tun.as_deref(), &req.request),
            "ping" => ping(&node, &req.request).await,
            "reload" => match forward::apply_services(&node, &home).await {
                Ok(()) => Ok(AmpBox::new()),
                Err(e) => Err(("RELOAD_FAILED".to_string(), e.to_string())),
            },
            "shutdown" => {
                let _ = stop.send(()).await;
                Ok(AmpBox::new())
            }
            other => Err(("UNHANDLED".to_string(), format!("unknown command `{other}`"))),
        };
        req.respond(result).await;
    }
}

fn whois(tun: Option<&tun::Running>, b: &AmpBox) -> Result<AmpBox, Refusal> {
    let Some(tun) = tun else {
        return Err(("NO_TUN".into(), "this daemon runs without the TUN device (--no-tun)".into()));
    };
    let ip: std::net::IpAddr = b
        .get_str("ip")
        .unwrap_or("")
        .parse()
        .map_err(|_| ("BAD_REQUEST".to_string(), "not an IP address".to_string()))?;
    match tun.whois(ip) {
        Some(who) => Ok(AmpBox::new().with("address", who.to_string())),
        None => Err(("UNKNOWN".into(), format!("{ip} stands for no one"))),
    }
}

async fn ping(node: &Node, b: &AmpBox) -> Result<AmpBox, Refusal> {
    let bad = |e: String| ("BAD_REQUEST".to_string(), e);
    let to = Q2qAddress::parse(b.get_str("to").unwrap_or("")).map_err(|e| bad(e.to_string()))?;
    let count: u32 = b.get_str("count").and_then(|c| c.parse().ok()).unwrap_or(4).clamp(1, 1000);
    let report = node
        .ping(&to, count, Duration::from_millis(200))
        .await
        .map_err(|e| ("PING_FAILED".to_string(), e.to_string()))?;
    Ok(ping::report_box(&report))
}

/// Ask the running daemon of `home` one request (`status`, `whois`, `ping`, `reload`,
/// `shutdown`) and wait for its answer.
///
/// # Errors
/// [`DaemonError::NotRunning`] when nothing answers the socket, [`DaemonError::Refused`]
/// with the daemon's sentence, [`DaemonError::Socket`] when the connection breaks.
pub async fn ask(home: &Home, request: AmpBox) -> Result<AmpBox, DaemonError> {
    let path = socket_path(home);
    let stream = UnixStream::connect(&path)
        .await
        .map_err(|_| DaemonError::NotRunning(home.root().display().to_string()))?;
    let (handle, _incoming) = amp::peer::spawn(stream);
    match handle.call(request).await {
        Ok(b) => Ok(b),
        Err(amp::CallError::Remote { description, .. }) => Err(DaemonError::Refused(description)),
        Err(e) => Err(DaemonError::Socket(
            path.display().to_string(),
            std::io::Error::other(e.to_string()),
        )),
    }
}

/// Tell a running daemon to apply services.toml again: `Ok(true)` when one did, `Ok(false)`
/// when none runs (nothing to do).
///
/// # Errors
/// As [`ask`]; `RELOAD_FAILED` comes back as [`DaemonError::Refused`].
pub async fn reload(home: &Home) -> Result<bool, DaemonError> {
    if !socket_path(home).exists() {
        return Ok(false);
    }
    ask(home, AmpBox::command("reload")).await.map(|_| true)
}

/// Who stands behind the virtual address `ip`, asked of the running daemon.
///
/// # Errors
/// As [`ask`]: no daemon, no TUN mode (`NO_TUN`), or nobody behind `ip` (`UNKNOWN`).
pub async fn whois_of(home: &Home, ip: std::net::IpAddr) -> Result<String, DaemonError> {
    let b = ask(home, AmpBox::command("whois").with("ip", ip.to_string())).await?;
    Ok(b.get_str("address").unwrap_or("?").to_string())
}
