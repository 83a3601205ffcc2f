//! The client daemon behind `q2q-tun up`: a [`Node`](crate::presence::node::Node) that
//! stays logged in, serves the built-in `ping`, and answers the other `q2q-tun` verbs on a
//! local control socket; and the library side of every `q2q-tun` verb, so that the binary
//! only parses arguments.
//!
//! The control socket is `$Q2Q_HOME/q2q.sock` (mode 0600 in a 0700 directory: only the
//! owner, root for `/var/lib/q2q`, can use it) and speaks AMP boxes, like the servers:
//! `status`, `whois` (`ip`), `ping` (`to`, `count`), `reload`, `shutdown`.
//!
//! ```text
//!  up.rs       the daemon: run (node, services, TUN mode, control socket), detach
//!  control.rs  the control socket, both ends: serve (daemon) and ask (verbs)
//!  status.rs   `status`: the box the daemon answers, and the table it prints as
//!  ping.rs     `ping`: through the daemon or a node of its own; the report
//!  down.rs     `down`: stop the daemon, repair what a killed one left
//!  doctor.rs   `doctor dns`
//!  send.rs, receive.rs, connect.rs   one-shot verbs with a node of their own
//!  whoami.rs   the addresses a server sees us at
//!  netcheck.rs `netcheck`: UDP, reflexive addresses, NAT mapping and filtering, verdict
//!  services.rs services.toml: what is exposed, to whom
//!  forward.rs  the daemon listening for those services and forwarding their streams
//!  tun.rs      TUN mode: device, resolver shim and the driver of apps' flows
//!  datagram.rs UDP datagrams framed on a stream
//!  platform/   Linux itself: TUN device and capabilities, system resolver, /proc, commands
//! ```

pub mod connect;
pub mod control;
pub mod datagram;
pub mod doctor;
pub mod down;
pub mod forward;
pub mod netcheck;
pub mod ping;
pub mod platform;
pub mod receive;
pub mod send;
pub mod services;
pub mod status;
pub mod tun;
pub mod up;
pub mod whoami;

pub use control::{ask, reload};
pub use platform::resolver;
pub use up::run;

use crate::address::Q2qAddress;
use crate::client::{Home, HomeError};
use crate::presence::node::NodeError;
use std::path::PathBuf;

/// Why the daemon could not start or be reached, or a verb that needs a node failed.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// A daemon already answers on the control socket of this state directory.
    #[error("q2q-tun is already up for {0}: `q2q-tun status` shows it")]
    AlreadyRunning(String),
    /// Nothing answers on the control socket of this state directory.
    #[error("no q2q-tun daemon is running for {0}: start it with `q2q-tun up`")]
    NotRunning(String),
    /// The control socket (path) could not be made, or the connection to it broke.
    #[error("control socket {0}: {1}")]
    Socket(String, std::io::Error),
    /// The daemon refused the request; its sentence says why.
    #[error("the daemon refused: {0}")]
    Refused(String),
    /// Several identities are stored and none was chosen (their addresses, comma-separated).
    #[error("which identity? {0} are stored here: pass --as ADDRESS")]
    WhichIdentity(String),
    /// The state directory (identities, services.toml) could not be read.
    #[error(transparent)]
    Home(#[from] HomeError),
    /// The node could not log in, listen or reach a person.
    #[error(transparent)]
    Node(#[from] NodeError),
    /// TUN mode could not start.
    #[error(transparent)]
    Tun(#[from] tun::TunError),
    /// The system resolver could not be restored.
    #[error(transparent)]
    Resolver(#[from] resolver::ResolverError),
}

/// The control socket of `home`: `$Q2Q_HOME/q2q.sock`.
pub fn socket_path(home: &Home) -> PathBuf {
    home.root().join("q2q.sock")
}

/// The identity to run as: `wanted`, or the only one stored.
///
/// # Errors
/// `wanted` is not stored, none is, or several are ([`DaemonError::WhichIdentity`]).
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
