//! `q2q-tun up`: the daemon itself ([`run`]) and its detaching into the background
//! ([`detach`]).

use super::control::{self, Control};
use super::{DaemonError, forward, socket_path, tun};
use crate::address::Q2qAddress;
use crate::client::Home;
use crate::presence::node::{Node, NodeConfig};
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::UnixListener;

/// Allocations from this size up get their own mapping in the daemon (glibc's default
/// starting threshold, 128 KiB, held fixed): every TCP buffer, none of the packet-sized ones.
const STREAM_BUFFER_MAPPED_FROM: usize = 128 << 10;
/// Freed heap memory each of glibc's heaps keeps for reuse (see `crate::sys::keep_freed_heap`).
const FREED_HEAP_KEPT: usize = 16 << 20;
use tracing::{info, warn};

/// The runtime the daemon runs on: one worker thread, unless `TOKIO_WORKER_THREADS` asks for
/// more (tokio reads it; any count works).
///
/// Why one: the daemon's data plane is two tasks, the PTCP endpoint and the TUN driver, that
/// hand every byte to each other. On one worker they share a core's caches and wake each
/// other without a futex or an inter-processor interrupt; on two, the runtime spreads them
/// and each hand-off crosses cores. In the lab (`tools/bench/lab-speed`, 2 cores, both
/// daemons and both iperf3 ends on them; 6 interleaved pairs) one worker moved 18% more
/// with 4 streams (4.25 against 3.61 Gbit/s, ahead in all 6 pairs) and 7% more with one,
/// at 13-15% less daemon CPU per byte. One core carries several Gbit/s through the sealed
/// session, more than a machine's uplink usually is; blocking work goes to tokio's
/// blocking pool, not this worker.
///
/// # Errors
/// The runtime's, when its threads or its I/O driver cannot be created.
pub fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if std::env::var_os("TOKIO_WORKER_THREADS").is_none() {
        builder.worker_threads(1);
    }
    builder.enable_all().build()
}

/// Fail when a daemon already answers on the control socket of `home`.
///
/// # Errors
/// [`DaemonError::AlreadyRunning`] naming the state directory.
pub fn ensure_down(home: &Home) -> Result<(), DaemonError> {
    if std::os::unix::net::UnixStream::connect(socket_path(home)).is_ok() {
        return Err(DaemonError::AlreadyRunning(home.root().display().to_string()));
    }
    Ok(())
}

/// Run the daemon until `shutdown` or a signal (SIGINT, SIGTERM): log in as `me`, serve the
/// built-in `ping` when `ping`, the exposed services, TUN mode when `tun` is given, and the
/// control socket. Prints two lines on stdout once up (address, UDP port, control socket;
/// then the TUN summary). On the way out, peers are told and the resolver is restored.
///
/// # Errors
/// Already running, missing privileges for TUN mode, the login, the services or the TUN
/// set-up failing, or the control socket not being creatable.
pub async fn run(
    home: Home,
    me: Q2qAddress,
    config: NodeConfig,
    ping: bool,
    tun: Option<tun::TunConfig>,
) -> Result<(), DaemonError> {
    let path = socket_path(&home);
    let shown = path.display().to_string();
    ensure_down(&home)?;
    // Stream buffers (256 KiB and up) from fresh mappings: memory follows the bytes in
    // flight and returns when a stream closes (see `crate::sys`).
    crate::sys::fix_mmap_threshold(STREAM_BUFFER_MAPPED_FROM);
    // Packet buffers (up to 64 KiB) are freed and taken again all the time: keep what the
    // heap frees for the next one rather than fault it in again.
    crate::sys::keep_freed_heap(FREED_HEAP_KEPT);
    if let Some(t) = &tun {
        super::platform::device::check_privileges(&t.name)?;
    }
    let node = Node::start(home.clone(), me.clone(), config).await?;
    if ping {
        node.serve_ping().await?;
    }
    forward::apply_services(&node, &home).await?;
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
                    tokio::spawn(control::serve(ctl, stream, stop_tx.clone()));
                }
                Err(e) => warn!(error = %e, "control socket accept failed"),
            },
        }
    };
    // No new control connections; the socket file goes last, since `q2q-tun down` waits
    // for it: when down returns, the router's port mapping and the TUN are gone too.
    drop(listener);
    // Peers in session hear we are going: their streams end now, not after a long silence.
    node.leave().await;
    if let Some(t) = tun {
        // The control tasks may still hold a handle; they end with their connections.
        match Arc::try_unwrap(t) {
            Ok(t) => t.stop().await,
            Err(t) => t.restore_now().await,
        }
    }
    let _ = std::fs::remove_file(&path);
    info!("q2q-tun is down");
    result
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

/// A daemon started in the background by [`detach`].
#[derive(Debug, Clone)]
pub struct Detached {
    /// Its process id.
    pub pid: u32,
    /// Where it logs (`$Q2Q_HOME/q2q-tun.log`).
    pub log: PathBuf,
}

impl fmt::Display for Detached {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "q2q-tun is up (pid {}); log: {}", self.pid, self.log.display())
    }
}

/// Why [`detach`] did not leave a daemon running.
#[derive(Debug, thiserror::Error)]
pub enum DetachError {
    /// The state directory or the log file could not be made or opened.
    #[error("{}: {error}", path.display())]
    Log {
        /// The directory or file.
        path: PathBuf,
        /// What went wrong.
        error: std::io::Error,
    },
    /// This program could not be started again.
    #[error("cannot start q2q-tun in the background: {0}")]
    Spawn(std::io::Error),
    /// It started and exited; `reason` is the last `error:` line of its log.
    #[error("q2q-tun up failed ({status}): {reason}")]
    Failed {
        /// How it exited.
        status: std::process::ExitStatus,
        /// What it said last, or "see the log".
        reason: String,
    },
    /// Its control socket did not answer within 10 s (it may still be starting).
    #[error("q2q-tun up did not come up within 10 s; see {}", .0.display())]
    Slow(PathBuf),
}

/// Start this program again with the same arguments plus `--foreground`, detached (its own
/// process group, stdin closed, stdout and stderr appended to `$Q2Q_HOME/q2q-tun.log`),
/// and return once its control socket answers (polled every 100 ms, 10 s at most).
///
/// # Errors
/// See [`DetachError`]: when it exits early, the last `error:` line of its log says why.
pub fn detach(home: &Home) -> Result<Detached, DetachError> {
    use std::os::unix::process::CommandExt;
    let log_path = home.root().join("q2q-tun.log");
    let at_log = |error| DetachError::Log { path: log_path.clone(), error };
    crate::fsutil::create_private_dir(home.root())
        .map_err(|error| DetachError::Log { path: home.root().to_path_buf(), error })?;
    let log =
        std::fs::OpenOptions::new().create(true).append(true).open(&log_path).map_err(at_log)?;
    let mut args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    args.push("--foreground".into());
    let mut child =
        std::process::Command::new(std::env::current_exe().map_err(DetachError::Spawn)?)
            .args(&args)
            .env("Q2Q_HOME", home.root())
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone().map_err(at_log)?)
            .stderr(log)
            .process_group(0)
            .spawn()
            .map_err(DetachError::Spawn)?;
    for _ in 0..100 {
        std::thread::sleep(Duration::from_millis(100));
        if let Some(status) = child.try_wait().map_err(DetachError::Spawn)? {
            let text = std::fs::read_to_string(&log_path).unwrap_or_default();
            let last =
                text.lines().rev().find(|l| l.starts_with("error:")).unwrap_or("see the log");
            let reason = last.trim_start_matches("error: ").to_string();
            return Err(DetachError::Failed { status, reason });
        }
        if std::os::unix::net::UnixStream::connect(socket_path(home)).is_ok() {
            return Ok(Detached { pid: child.id(), log: log_path });
        }
    }
    Err(DetachError::Slow(log_path))
}
