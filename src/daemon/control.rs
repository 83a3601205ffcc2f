//! The control socket `$Q2Q_HOME/q2q.sock`, both ends: [`serve`] in the daemon, [`ask`] in
//! the verbs. Requests and answers are AMP boxes, one type per command below (encoded by
//! [`crate::proto::commands`], like the identity server's); a refusal carries a code and a
//! sentence.

use super::status::Status;
use super::{DaemonError, forward, ping, socket_path, tun};
use crate::address::Q2qAddress;
use crate::amp;
use crate::client::Home;
use crate::presence::node::Node;
use crate::proto::commands::{
    Command, Empty, ErrorCode, Message, Refusal, amp_command, amp_message,
};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::UnixStream;

amp_message! {
    /// `status`: the daemon's state.
    pub struct StatusAsk {}
}
amp_command!(StatusAsk = "status", answer StatusAnswer, errors []);

amp_message! {
    /// The daemon's state as it travels: every field there, empty when absent ([`Status`]
    /// reads it).
    pub struct StatusAnswer {
        pub address: Option<String>,
        pub udp: Option<String>,
        /// One line per peer session, its five fields and the eight numbers of its traffic
        /// (when sampled) separated by tabs ([`Status::to_answer`]).
        pub peers: Option<String>,
        pub tun: Option<String>,
        pub tun_device: Option<String>,
        pub dns: Option<String>,
        /// One line per sentence.
        pub certificate: Option<String>,
        /// The router's port mapping, `ip:port via PROTOCOL`.
        pub port_mapping: Option<String>,
    }
}

amp_message! {
    /// `whois`: who stands behind a virtual address (TUN mode).
    pub struct Whois {
        pub ip: IpAddr,
    }
}
amp_command!(Whois = "whois", answer WhoisAnswer, errors [NoTun, Unknown]);

amp_message! {
    pub struct WhoisAnswer {
        pub address: Q2qAddress,
    }
}

amp_message! {
    /// `ping`: round trips to a person through the daemon's node.
    pub struct Ping {
        pub to: Q2qAddress,
        /// How many (default 4, at most 1000).
        pub count: Option<u32>,
    }
}
amp_command!(Ping = "ping", answer PingAnswer, errors [PingFailed]);

amp_message! {
    /// A ping report ([`ping::report`]): times in whole microseconds, `rtts_us`
    /// comma-separated; absent fields read as unknown.
    pub struct PingAnswer {
        pub peer: Option<String>,
        pub connect_us: Option<String>,
        pub rtts_us: Option<String>,
        pub path: Option<String>,
        pub why: Option<String>,
    }
}

amp_message! {
    /// `reload`: apply services.toml again.
    pub struct Reload {}
}
amp_command!(Reload = "reload", answer Empty, errors [ReloadFailed]);

amp_message! {
    /// `shutdown`: end the daemon.
    pub struct Shutdown {}
}
amp_command!(Shutdown = "shutdown", answer Empty, errors []);

/// What a control connection can reach.
pub(super) struct Control {
    pub node: Node,
    pub home: Home,
    pub tun: Option<Arc<tun::Running>>,
}

/// Answer the requests of one control connection until it closes; `shutdown` asks the
/// daemon's loop to end through `stop`.
pub(super) async fn serve(ctl: Control, stream: UnixStream, stop: tokio::sync::mpsc::Sender<()>) {
    let Control { node, home, tun } = ctl;
    let (_handle, mut incoming) = amp::peer::spawn(stream);
    while let Some(req) = incoming.recv().await {
        let b = &req.request;
        let result = match req.command() {
            StatusAsk::NAME => Ok(Status::of(&node, tun.as_deref()).to_answer().to_box()),
            Whois::NAME => answer(Whois::from_box(b).and_then(|w| whois(tun.as_deref(), w))),
            Ping::NAME => answer(match Ping::from_box(b) {
                Ok(p) => ping(&node, p).await,
                Err(e) => Err(e),
            }),
            Reload::NAME => answer(
                forward::apply_services(&node, &home)
                    .await
                    .map(|()| Empty {})
                    .map_err(|e| Refusal::new(ErrorCode::ReloadFailed, e.to_string())),
            ),
            Shutdown::NAME => {
                let _ = stop.send(()).await;
                Ok(Empty {}.to_box())
            }
            other => answer::<Empty>(Err(Refusal::new(
                ErrorCode::Unhandled,
                format!("unknown command `{other}`"),
            ))),
        };
        req.respond(result).await;
    }
}

/// A handler's result as the box to answer.
fn answer<A: Message>(r: Result<A, Refusal>) -> Result<amp::AmpBox, amp::ErrorBox> {
    r.map(|a| a.to_box()).map_err(Into::into)
}

fn whois(tun: Option<&tun::Running>, Whois { ip }: Whois) -> Result<WhoisAnswer, Refusal> {
    let Some(tun) = tun else {
        return Err(Refusal::new(
            ErrorCode::NoTun,
            "this daemon runs without the TUN device (--no-tun)",
        ));
    };
    match tun.whois(ip) {
        Some(address) => Ok(WhoisAnswer { address }),
        None => Err(Refusal::new(ErrorCode::Unknown, format!("{ip} stands for no one"))),
    }
}

async fn ping(node: &Node, Ping { to, count }: Ping) -> Result<PingAnswer, Refusal> {
    let count = count.unwrap_or(4).clamp(1, 1000);
    let report = node
        .ping(&to, count, Duration::from_millis(200))
        .await
        .map_err(|e| Refusal::new(ErrorCode::PingFailed, e.to_string()))?;
    Ok(ping::report(&report))
}

/// Ask the running daemon of `home` one request (`status`, `whois`, `ping`, `reload`,
/// `shutdown`) and wait for its answer.
///
/// # Errors
/// [`DaemonError::NotRunning`] when nothing answers the socket, [`DaemonError::Refused`]
/// with the daemon's sentence, [`DaemonError::Socket`] when the connection breaks or the
/// answer does not decode.
pub async fn ask<C: Command>(home: &Home, request: &C) -> Result<C::Answer, DaemonError> {
    let path = socket_path(home);
    let stream = UnixStream::connect(&path)
        .await
        .map_err(|_| DaemonError::NotRunning(home.root().display().to_string()))?;
    let (handle, _incoming) = amp::peer::spawn(stream);
    let broken =
        |why: String| DaemonError::Socket(path.display().to_string(), std::io::Error::other(why));
    match handle.call(request.request()).await {
        Ok(b) => C::Answer::from_box(&b).map_err(|e| broken(e.description)),
        Err(amp::CallError::Remote { description, .. }) => Err(DaemonError::Refused(description)),
        Err(e) => Err(broken(e.to_string())),
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
    ask(home, &Reload {}).await.map(|_| true)
}

/// Who stands behind the virtual address `ip`, asked of the running daemon.
///
/// # Errors
/// As [`ask`]: no daemon, no TUN mode (`NO_TUN`), or nobody behind `ip` (`UNKNOWN`).
pub async fn whois_of(home: &Home, ip: IpAddr) -> Result<String, DaemonError> {
    Ok(ask(home, &Whois { ip }).await?.address.to_string())
}
