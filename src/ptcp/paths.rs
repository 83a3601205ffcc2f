//! The driver's side of a session's path machine ([`q2q_netstack::path::Paths`]): the
//! relay leg and the birthday sockets it owns, turning the machine's transmits into
//! datagrams and its events into the session's send path.
//!
//! Everything here runs on the endpoint's driver task; the birthday sockets' reader tasks
//! only hand what they receive to the driver's command channel.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use q2q_netstack::Instant;
use q2q_netstack::path::{self, PathEvent, Paths, Payload, Socket};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tracing::{debug, info};

use super::endpoint::{Command, Path};
use crate::relay;

/// What the endpoint needs to run a session's paths: the machine's setup and timers, and
/// the relay leg (framing, binds, checking what comes back).
#[derive(Debug)]
pub struct PathSetup {
    /// Candidates, keys, relay, NAT facts (see [`path::Setup`]).
    pub setup: path::Setup,
    /// Timers and bounds.
    pub config: path::Config,
    /// Our leg of the session's relay: it frames relayed datagrams and binds.
    pub leg: Arc<relay::Leg>,
    /// For [`path::RelayPath::Control`]: where datagrams for the relay over the control
    /// connection go (one datagram per message).
    pub control: Option<mpsc::Sender<Vec<u8>>>,
}

/// A session's current path and why, as the driver last set it (for `status`).
#[derive(Debug, Clone)]
pub struct PathView(Arc<Mutex<(path::Path, String)>>);

impl PathView {
    /// The current path and why the session is on it.
    pub fn get(&self) -> (path::Path, String) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn set(&self, p: path::Path, why: &str) {
        let mut v = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if v.0 != p || v.1 != why {
            *v = (p, why.to_string());
        }
    }
}

/// A session's paths, on the driver.
pub(crate) struct PathState {
    pub(crate) paths: Paths,
    pub(crate) leg: Arc<relay::Leg>,
    control: Option<mpsc::Sender<Vec<u8>>>,
    birthday: HashMap<u16, (Arc<UdpSocket>, tokio::task::AbortHandle)>,
    pub(crate) view: PathView,
}

impl Drop for PathState {
    fn drop(&mut self) {
        for (_, (_, task)) in self.birthday.drain() {
            task.abort();
        }
    }
}

/// Where a datagram of a session came from, for its path machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Via {
    /// One of our sockets (the main one, or a birthday socket).
    Socket(Socket),
    /// Through the relay (UDP or the control connection).
    Relayed,
}

impl PathState {
    pub(crate) fn new(now: Instant, s: PathSetup) -> PathState {
        let paths = Paths::new(now, s.config, s.setup);
        let view = PathView(Arc::new(Mutex::new((paths.current(), paths.why().to_string()))));
        PathState { paths, leg: s.leg, control: s.control, birthday: HashMap::new(), view }
    }

    pub(crate) fn view(&self) -> PathView {
        self.view.clone()
    }

    /// The session's relay leg given again: `leg`, at `udp` or through `control`, whichever
    /// kind the session's relay is (the machine binds it at once and, while relayed, moves
    /// the session to it). The same leg again keeps the one we have: its counters go on
    /// (the relay refuses a counter it has seen, as a replay). Returns the token of the leg
    /// replaced, if it was another.
    pub(crate) fn renew_relay(
        &mut self,
        now: Instant,
        leg: Arc<relay::Leg>,
        udp: std::net::SocketAddr,
        control: mpsc::Sender<Vec<u8>>,
    ) -> Option<relay::Token> {
        let replaced = (leg.token() != self.leg.token()).then(|| *self.leg.token());
        if replaced.is_some() {
            self.leg = leg;
        }
        let relay = match self.paths.relay() {
            path::RelayPath::Udp(_) => path::RelayPath::Udp(udp),
            path::RelayPath::Control => {
                self.control = Some(control);
                path::RelayPath::Control
            }
        };
        self.paths.set_relay(now, relay);
        replaced
    }

    /// The endpoint path for the machine's path.
    pub(crate) fn endpoint_path(&self, p: path::Path) -> Option<Path> {
        match p {
            path::Path::Direct { to, socket: Socket::Main } => Some(Path::Direct(to)),
            path::Path::Direct { to, socket: Socket::Birthday(i) } => {
                let (socket, _) = self.birthday.get(&i)?;
                Some(Path::Via { socket: socket.clone(), to })
            }
            path::Path::UdpRelay(server) => Some(Path::Relay { server, framing: self.leg.clone() }),
            path::Path::ControlRelay => self.control.clone().map(Path::Channel),
        }
    }

    /// Open `n` birthday sockets on `ip`, each read by a task handing datagrams to the
    /// driver (`cmds`) as from that socket.
    pub(crate) fn open_birthday(
        &mut self,
        id: q2q_netstack::wire::SessionId,
        n: u16,
        ip: std::net::IpAddr,
        cmds: &mpsc::Sender<Command>,
    ) {
        let mut opened = 0;
        for i in 0..n {
            if self.birthday.contains_key(&i) {
                continue;
            }
            let Ok(std) = crate::dualstack::bind_udp((ip, 0).into()) else { continue };
            let Ok(socket) = UdpSocket::from_std(std) else { continue };
            let socket = Arc::new(socket);
            let (reader, cmds) = (socket.clone(), cmds.clone());
            let task = tokio::spawn(async move {
                let mut buf = vec![0u8; 65536];
                while let Ok((len, from)) = reader.recv_from(&mut buf).await {
                    let from = crate::dualstack::canonical(from);
                    let data = buf[..len].to_vec();
                    let c = Command::Birthday { id, socket: i, from, data };
                    if cmds.send(c).await.is_err() {
                        return;
                    }
                }
            });
            self.birthday.insert(i, (socket, task.abort_handle()));
            opened += 1;
        }
        debug!(session = %id, opened, "birthday: sockets open");
    }

    pub(crate) fn close_birthday(&mut self, keep: Option<u16>) {
        self.birthday.retain(|i, (_, task)| {
            let kept = Some(*i) == keep;
            if !kept {
                task.abort();
            }
            kept
        });
    }

    /// Send one of the machine's transmits; `false` if it went nowhere.
    pub(crate) fn send(&self, main: &UdpSocket, t: path::Transmit) -> bool {
        let data = match t.payload {
            Payload::Probe(d) => d.to_vec(),
            Payload::RelayBind => self.leg.bind(),
        };
        let socket = match t.socket {
            Socket::Main => main,
            Socket::Birthday(i) => match self.birthday.get(&i) {
                Some((s, _)) => s,
                None => return false,
            },
        };
        let to = match socket.local_addr() {
            Ok(local) => crate::dualstack::for_socket(local, t.to),
            Err(_) => t.to,
        };
        socket.try_send_to(&data, to).is_ok()
    }

    /// Log and show a move.
    pub(crate) fn note_event(&self, id: q2q_netstack::wire::SessionId, ev: &PathEvent) {
        if let PathEvent::Switched { path, lost } = ev {
            info!(session = %id, %path, lost, why = self.paths.why(), "path changed");
        }
        self.view.set(self.paths.current(), self.paths.why());
    }
}
