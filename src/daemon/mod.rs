//! The client daemon behind `q2q-tun up`: a [`Node`] that stays logged in, serves the
//! built-in `ping`, and answers the other `q2q-tun` verbs on a local control socket.
//!
//! The control socket is `$Q2Q_HOME/q2q.sock` (mode 0600 in a 0700 directory: only the
//! owner, root for `/var/lib/q2q`, can use it) and speaks AMP boxes, like the servers:
//! `status`, `ping` (`to`, `count`), `shutdown`.

pub mod datagram;
pub mod resolver;
pub mod services;
pub mod tun;

use crate::address::Q2qAddress;
use crate::amp::{self, AmpBox};
use crate::client::{Home, HomeError};
use crate::presence::node::Policy;
use crate::presence::node::{Node, NodeConfig, NodeError, PingReport};
use services::Services;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{UnixListener, UnixStream};
use tracing::{info, warn};

/// Why the daemon could not start or be reached.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("a q2q-tun daemon is already running for {0} (control socket {1})")]
    AlreadyRunning(String, String),
    #[error("no q2q-tun daemon is running for {0}: start it with `q2q-tun up`")]
    NotRunning(String),
    #[error("control socket {0}: {1}")]
    Socket(String, std::io::Error),
    #[error("the daemon refused: {0}")]
    Refused(String),
    #[error("which identity? {0} are stored here: pass --as ADDRESS")]
    WhichIdentity(String),
    #[error(transparent)]
    Home(#[from] HomeError),
    #[error(transparent)]
    Node(#[from] NodeError),
    #[error(transparent)]
    Tun(#[from] tun::TunError),
}

/// The control socket of `home`.
pub fn socket_path(home: &Home) -> PathBuf {
    home.root().join("q2q.sock")
}

/// The identity to run as: `wanted`, or the only one stored.
pub fn choose_identity(
    home: &Home,
    wanted: Option<&Q2qAddress>,
) -> Result<Q2qAddress, DaemonError> {
    if let Some(w) = wanted {
        return Ok(home.identity(w)?.address);
    }
    let ids = home.identities()?;
    match ids.as_slice() {
        [one] => Ok(one.address.clone()),
        [] => Err(HomeError::Invalid {
            path: home.root().display().to_string(),
            reason: "no identity: run `q2q-tun register you@domain` first".into(),
        }
        .into()),
        many => Err(DaemonError::WhichIdentity(
            many.iter().map(|i| i.address.to_string()).collect::<Vec<_>>().join(", "),
        )),
    }
}

/// Run the daemon until `shutdown` or a signal: log in, serve ping, answer the control socket.
pub async fn run(
    home: Home,
    me: Q2qAddress,
    config: NodeConfig,
    ping: bool,
    tun: Option<tun::TunConfig>,
) -> Result<(), DaemonError> {
    let path = socket_path(&home);
    let shown = path.display().to_string();
    if UnixStream::connect(&path).await.is_ok() {
        return Err(DaemonError::AlreadyRunning(me.to_string(), shown));
    }
    if let Some(t) = &tun {
        tun::check_privileges(t)?;
    }
    let node = Node::start(home.clone(), me.clone(), config).await?;
    if ping {
        node.serve_ping().await?;
    }
    apply_services(&node, &home).await?;
    let tun = match tun {
        Some(t) => Some(Arc::new(tun::start(node.clone(), &home, t).await?)),
        None => None,
    };
    // The control socket appears only once the node is online and listening, so whoever
    // waits for it (scripts, `q2q-tun up` itself) can use the daemon right away.
    // A socket left by a killed daemon: nothing answers it, so it is safe to replace.
    let _ = std::fs::remove_file(&path);
    crate::fsutil::create_private_dir(home.root())
        .map_err(|e| DaemonError::Socket(shown.clone(), e))?;
    let listener = UnixListener::bind(&path).map_err(|e| DaemonError::Socket(shown.clone(), e))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| DaemonError::Socket(shown.clone(), e))?;

    info!(address = %me, udp = %node.local_addr(), control = %shown, "q2q-tun is up");
    println!("q2q-tun up as {me}: UDP {} ; control socket {shown}", node.local_addr());
    if let Some(t) = &tun {
        println!("{}", t.summary);
    }

    let (stop_tx, mut stop_rx) = tokio::sync::mpsc::channel::<()>(1);
    let result = loop {
        tokio::select! {
            _ = stop_rx.recv() => break Ok(()),
            _ = signal() => break Ok(()),
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let ctl = Control { node: node.clone(), home: home.clone(), tun: tun.clone() };
                    tokio::spawn(serve_control(ctl, stream, stop_tx.clone()));
                }
                Err(e) => warn!(error = %e, "control socket accept failed"),
            },
        }
    };
    let _ = std::fs::remove_file(&path);
    // Peers in session hear we are going: their streams end now, not after a long silence.
    node.leave().await;
    if let Some(t) = tun {
        // The control tasks may still hold a handle; they end with their connections.
        match Arc::try_unwrap(t) {
            Ok(t) => t.stop().await,
            Err(t) => t.restore_now(),
        }
    }
    info!("q2q-tun is down");
    result
}

/// Listen for every exposed service with its allow list, forwarding accepted streams to
/// the local target; stop listening for services no longer exposed.
async fn apply_services(node: &Node, home: &Home) -> Result<(), DaemonError> {
    let services = Services::load(home)?.parsed();
    for old in node.listening() {
        if old != crate::presence::node::ping_service()
            && !services.iter().any(|(s, _, _)| *s == old)
        {
            node.unlisten(&old).await?;
        }
    }
    for (service, to, allow) in services {
        let Some(to) = to else {
            let inbox = home.root().join("inbox");
            let mut accepted = node.listen(&service, "inbox", Policy::allow(allow)).await?;
            tokio::spawn(async move {
                while let Some(a) = accepted.recv().await {
                    // One folder per sender: nobody's files land among another's.
                    let dir = inbox.join(a.peer.to_string());
                    let opts = crate::transfer::ReceiveOptions { dir, overwrite: false };
                    tokio::spawn(async move {
                        match crate::transfer::receive(a.stream, &opts, &mut crate::transfer::Quiet)
                            .await
                        {
                            Ok(s) => {
                                info!(from = %a.peer, files = s.files, bytes = s.transferred, "received into the inbox")
                            }
                            Err(e) => warn!(from = %a.peer, error = %e, "transfer failed"),
                        }
                    });
                }
            });
            continue;
        };
        let mut accepted =
            node.listen(&service, &format!("forwarded to {to}"), Policy::allow(allow)).await?;
        let udp = service.as_str().starts_with("udp/");
        tokio::spawn(async move {
            while let Some(a) = accepted.recv().await {
                let service = service.clone();
                if udp {
                    tokio::spawn(async move {
                        info!(peer = %a.peer, %service, %to, "forwarding datagrams");
                        if let Err(e) = datagram::serve(a.stream, to).await {
                            warn!(peer = %a.peer, %service, %to, error = %e, "UDP flow ended");
                        }
                    });
                    continue;
                }
                tokio::spawn(async move {
                    let mut peer = a.stream;
                    match tokio::time::timeout(
                        Duration::from_secs(5),
                        tokio::net::TcpStream::connect(to),
                    )
                    .await
                    {
                        Ok(Ok(mut local)) => {
                            info!(peer = %a.peer, %service, %to, "forwarding");
                            let _ = tokio::io::copy_bidirectional(&mut peer, &mut local).await;
                        }
                        _ => warn!(peer = %a.peer, %service, %to, "local target unreachable"),
                    }
                });
            }
        });
    }
    Ok(())
}

/// Tell a running daemon to apply services.toml again (no daemon: nothing to do).
pub async fn reload(home: &Home) -> Result<bool, DaemonError> {
    if !socket_path(home).exists() {
        return Ok(false);
    }
    ask(home, AmpBox::command("reload")).await.map(|_| true)
}

async fn signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// What a control connection can reach.
struct Control {
    node: Node,
    home: Home,
    tun: Option<Arc<tun::Running>>,
}

async fn serve_control(ctl: Control, stream: UnixStream, stop: tokio::sync::mpsc::Sender<()>) {
    let Control { node, home, tun } = ctl;
    let (_handle, mut incoming) = amp::peer::spawn(stream);
    while let Some(req) = incoming.recv().await {
        let result = match req.command() {
            "status" => Ok(status_box(&node, tun.as_deref())),
            "whois" => whois(tun.as_deref(), &req.request),
            "ping" => ping(&node, &req.request).await,
            "reload" => match apply_services(&node, &home).await {
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

fn whois(tun: Option<&tun::Running>, b: &AmpBox) -> Result<AmpBox, (String, String)> {
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

fn status_box(node: &Node, tun: Option<&tun::Running>) -> AmpBox {
    let lines: Vec<String> = node
        .status()
        .into_iter()
        .map(|p| {
            let opened: Vec<String> = p.opened.iter().map(|(s, n)| format!("{s}:{n}")).collect();
            let opened = if opened.is_empty() { "-".to_string() } else { opened.join(",") };
            format!("{}\t{}\t{}\t{}\t{}", p.peer, p.streams, opened, p.path, p.why)
        })
        .collect();
    AmpBox::new()
        .with("address", node.address().to_string())
        .with("udp", node.local_addr().to_string())
        .with("peers", lines.join("\n"))
        .with("tun", tun.map(|t| t.summary.clone()).unwrap_or_default())
        .with("tun_device", tun.map(|t| t.device.clone()).unwrap_or_default())
        .with("dns", tun.map(|t| t.dns_addr.to_string()).unwrap_or_default())
}

async fn ping(node: &Node, b: &AmpBox) -> Result<AmpBox, (String, String)> {
    let bad = |e: String| ("BAD_REQUEST".to_string(), e);
    let to = Q2qAddress::parse(b.get_str("to").unwrap_or("")).map_err(|e| bad(e.to_string()))?;
    let count: u32 = b.get_str("count").and_then(|c| c.parse().ok()).unwrap_or(4).clamp(1, 1000);
    let report = node
        .ping(&to, count, Duration::from_millis(200))
        .await
        .map_err(|e| ("PING_FAILED".to_string(), e.to_string()))?;
    Ok(report_box(&report))
}

/// A ping report as a box (for the control socket).
pub fn report_box(r: &PingReport) -> AmpBox {
    let rtts: Vec<String> = r.rtts.iter().map(|d| d.as_micros().to_string()).collect();
    AmpBox::new()
        .with("peer", r.peer.to_string())
        .with("connect_us", r.connect.as_micros().to_string())
        .with("rtts_us", rtts.join(","))
        .with("path", r.path.to_string())
        .with("why", &r.why)
}

/// Ask the running daemon of `home` (`status`, `ping`, `shutdown`).
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
