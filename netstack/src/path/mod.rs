//! The paths of one peer session, as a sans-IO state machine: where the session's datagrams
//! go (direct to the peer, through the UDP relay, or through the relay over the control
//! connection), how a direct path is found (authenticated probes to the peer's candidates,
//! birthday probing across a symmetric NAT), how it is watched, and when the session falls
//! back to the relay and looks again. Like quinn-proto's path validation: no sockets, no
//! clock; the driver passes `now` and what arrived, and takes datagrams to send (and from
//! which socket), the next deadline and events.
//!
//! ```text
//!            verified probe / reply from an address
//!   Relayed ─────────────────────────────────────────▶ Direct { to, socket }
//!   (probe candidates 10/s for `probe_for`,                │ silent ≥ suspect_after:
//!    then a burst every `reprobe_every`;                   │ probe it 2/s; no answer for
//!    birthday after 10 rounds where the NATs call for it)  │ dead_after more, or the peer's
//!      ▲                                                   │ datagrams come via the relay
//!      └──────────── fall back (wait a whole period) ◀─────┘ (≥ direct_grace after moving)
//!   A verified probe from another address while the direct path is silent: NAT rebinding,
//!   move there.
//! ```
//!
//! ## Both families
//! Candidates of both families are probed in the same rounds, IPv6 first; the first
//! verified answer wins, as in RFC 8445's aggressive nomination. IPv6 is preferred when
//! both work (RFC 8305 §4, RFC 6724: no NAT state to keep alive on most IPv6 paths, and it
//! is the one family that works where IPv4 is symmetric↔symmetric): while direct over
//! IPv4, the rest of the search keeps probing the IPv6 candidates only, and a verified
//! reply from an IPv6 address moves the path there ("upgrade"). The probes come out of the
//! same budget as every other: no probe is sent only to measure.
//!
//! Unless IPv4 is clearly faster. Every reply to one of our probes is a round-trip sample
//! of the path it came back on, smoothed per family as in RFC 6298 (`srtt = 7/8 srtt + 1/8
//! sample`; the first sample sets it). When a reply validates the other family's path
//! while direct, the two are compared:
//!
//! ```text
//!   margin = max(Config::v4_faster_by, Config::v4_faster_by_percent of IPv6's srtt)
//!   to IPv4 (or keep IPv4 instead of upgrading)   when srtt4 + margin   < srtt6
//!   back to IPv6 from an IPv4 kept for its speed  when srtt4 + margin/2 >= srtt6
//! ```
//!
//! The half margin is the hysteresis band, and a family chosen for its round trip is kept
//! at least [`Config::family_hold`] whatever the samples say: samples that wobble around
//! the threshold do not move the path back and forth. A path whose round trip is unknown
//! (it was found by the peer's probe, not a reply to ours) loses to nothing: IPv6 stays
//! preferred. While direct over IPv4 and still searching over IPv6, a probe from the peer
//! over IPv6 is only answered (its reply to our own probes brings the measurement); after
//! that search, it upgrades at once as before. The samples come from the search rounds and
//! the watch's probes, so a choice is made again only by a later search (a network change,
//! a fall back).
//!
//! ## Polling contract
//! The driver owns one [`Paths`] per session (beside its [`crate::Session`]):
//!
//! 1. Probes and replies addressed to the session ([`probe::session_of`]):
//!    [`Paths::handle_probe`] with the socket they arrived on and their source.
//! 2. Every other datagram of the session that arrived on one of our sockets:
//!    [`Paths::handle_datagram`] (liveness: data and acks alike); one that came through the
//!    relay (UDP or control connection): [`Paths::note_relayed`].
//! 3. When [`Paths::poll_timeout`] has passed: [`Paths::handle_timeout`].
//! 4. After any input or timer: drain [`Paths::poll_event`] first (open or close birthday
//!    sockets; on [`PathEvent::Switched`] send the session's datagrams along
//!    [`Paths::current`], calling [`crate::Session::on_path_change`], and
//!    [`crate::Session::path_lost`] when `lost`), then [`Paths::poll_transmit`] until `None`.
//! 5. Sleep until [`Paths::poll_timeout`] or the next input.
//!
//! [`Paths::current`] is the one place the path lives; [`Paths::why`] says why, for status
//! displays.
//!
//! ## Bounds
//! Probes go only to the candidates given (already filtered by the caller to the addresses
//! the server saw the peer at, or our own networks), to the birthday target the NAT facts
//! name (the peer's server-observed IP), or as replies to the address a verified probe came
//! from. Every probe and reply is taken from a token bucket ([`Config::probe_burst`],
//! refilled at [`Config::probe_refill`] a second): no peer can make a session send more. A
//! relay-only session sends nothing but relay binds and ignores probes.

pub mod probe;

use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};

use tracing::{debug, info, warn};

use crate::sim::Rng;
use crate::{Duration, Instant};
pub use probe::{ProbeKey, Role};

/// Timers and bounds of the path machine. The defaults are those q2q runs with.
#[derive(Debug, Clone)]
pub struct Config {
    /// Probe the candidates this often while searching (100 ms).
    pub probe_every: Duration,
    /// How long one search lasts (5 s: 50 rounds).
    pub probe_for: Duration,
    /// While relayed, search again this long after the last one ended (30 s); also the wait
    /// after a fall back before probing again.
    pub reprobe_every: Duration,
    /// Wait this long before the first search (0: at once).
    pub probe_after: Duration,
    /// Refresh the UDP relay binding this often (10 s, below NAT UDP timeouts).
    pub relay_bind_every: Duration,
    /// Search rounds before birthday probing starts (10).
    pub birthday_after_rounds: u32,
    /// Extra sockets (mappings) a symmetric side opens (256).
    pub birthday_sockets: u16,
    /// A symmetric side probes from every extra socket this often (250 ms)...
    pub birthday_every: Duration,
    /// ... for this long (12 s), then closes them.
    pub birthday_for: Duration,
    /// Most probes a cone side sprays at random ports (2500)...
    pub birthday_probes: u32,
    /// ... this many a second (500).
    pub birthday_rate: u32,
    /// A direct path silent this long (no datagram of the session from its address) is
    /// suspect and gets probed (1 s: well above a round trip and an ACK delay).
    pub suspect_after: Duration,
    /// A suspect path is probed at most this often (500 ms).
    pub suspect_probe_every: Duration,
    /// A suspect path that neither answers probes nor carries data for this long more is
    /// dead (2.5 s).
    pub dead_after: Duration,
    /// A path that answered probes but stays silent is idle; ask it again after this long
    /// (15 s, above the session keepalive of 10 s).
    pub reask_idle_after: Duration,
    /// The peer's datagrams arriving through the relay within this long of going direct are
    /// stragglers, not a sign that the peer gave up on the path (3 s).
    pub direct_grace: Duration,
    /// Probes (and replies) a session may send at once (16384: a first search over 33
    /// candidates, birthday probing and the watch fit in it).
    pub probe_burst: u32,
    /// Probes a second the budget grows back by (8).
    pub probe_refill: u32,
    /// IPv4 wins over IPv6 only when its smoothed round trip is lower by more than this
    /// (10 ms) ...
    pub v4_faster_by: Duration,
    /// ... and by more than this share of IPv6's, in percent (25). See "Both families".
    pub v4_faster_by_percent: u32,
    /// A family chosen for its round trip is kept at least this long (2 s, within a
    /// search's 5 s, so that the rest of the search may still take it back).
    pub family_hold: Duration,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            probe_every: Duration::from_millis(100),
            probe_for: Duration::from_secs(5),
            reprobe_every: Duration::from_secs(30),
            probe_after: Duration::ZERO,
            relay_bind_every: Duration::from_secs(10),
            birthday_after_rounds: 10,
            birthday_sockets: 256,
            birthday_every: Duration::from_millis(250),
            birthday_for: Duration::from_secs(12),
            birthday_probes: 2500,
            birthday_rate: 500,
            suspect_after: Duration::from_secs(1),
            suspect_probe_every: Duration::from_millis(500),
            dead_after: Duration::from_millis(2500),
            reask_idle_after: Duration::from_secs(15),
            direct_grace: Duration::from_secs(3),
            probe_burst: 16384,
            probe_refill: 8,
            v4_faster_by: Duration::from_millis(10),
            v4_faster_by_percent: 25,
            family_hold: Duration::from_secs(2),
        }
    }
}

/// A socket of ours: the endpoint's main socket, or one of the extra sockets a symmetric
/// side opens for birthday probing (index `0..n` of [`PathEvent::OpenBirthdaySockets`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Socket {
    /// The endpoint's socket (PTCP, who-am-i, relay).
    Main,
    /// Extra birthday socket number `i`.
    Birthday(u16),
}

/// The relay a session starts on and falls back to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelayPath {
    /// The UDP relay at this address (bound with [`Payload::RelayBind`]).
    Udp(SocketAddr),
    /// The relay over the control connection (UDP to the server is blocked).
    Control,
}

/// How a session's datagrams travel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    /// Straight to the peer's address `to`, from `socket`.
    Direct {
        /// The peer's address (its NAT's mapping).
        to: SocketAddr,
        /// Our socket holding the mapping on our side.
        socket: Socket,
    },
    /// Through the UDP relay at this address.
    UdpRelay(SocketAddr),
    /// Through the relay over the control connection.
    ControlRelay,
}

impl From<RelayPath> for Path {
    fn from(r: RelayPath) -> Path {
        match r {
            RelayPath::Udp(a) => Path::UdpRelay(a),
            RelayPath::Control => Path::ControlRelay,
        }
    }
}

impl std::fmt::Display for Path {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Path::Direct { to, socket: Socket::Main } => write!(f, "direct {to}"),
            Path::Direct { to, socket: Socket::Birthday(i) } => {
                write!(f, "direct {to} (birthday socket {i})")
            }
            Path::UdpRelay(a) => write!(f, "UDP relay {a}"),
            Path::ControlRelay => write!(f, "TCP relay"),
        }
    }
}

/// What to send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Payload {
    /// A probe or reply, ready as is.
    Probe([u8; probe::LEN]),
    /// A bind of our relay leg (the driver frames it: it holds the relay key).
    RelayBind,
}

/// One datagram to send: `payload` from `socket` to `to`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transmit {
    /// Which of our sockets it leaves from.
    pub socket: Socket,
    /// Where to.
    pub to: SocketAddr,
    /// What.
    pub payload: Payload,
}

/// What happened, for the driver to act on ([`Paths::poll_event`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathEvent {
    /// The session's datagrams go along `path` from now on. `lost`: the old path died, so
    /// what was in flight on it is to be resent ([`crate::Session::path_lost`]).
    Switched {
        /// The new path (also [`Paths::current`]).
        path: Path,
        /// The old path died.
        lost: bool,
    },
    /// Open this many extra UDP sockets, [`Socket::Birthday`] `0..n`, and hand what they
    /// receive to [`Paths::handle_probe`] / [`Paths::handle_datagram`]. Comes before the
    /// first transmit from them.
    OpenBirthdaySockets(u16),
    /// Close the extra sockets, except `keep` (the one holding the direct path).
    CloseBirthdaySockets {
        /// The socket to keep open.
        keep: Option<u16>,
    },
}

/// What each side knows of the NATs, for birthday probing: the reflexive addresses (what
/// the server saw on the main socket) and the main sockets' own ports. A side whose
/// reflexive port differs from its host port is taken as symmetric (NATs that keep ports
/// are the cone kind); both sides read the same facts from the candidates, so they agree
/// on their roles without another message.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NatFacts {
    /// Our reflexive address (`None`: UDP to the server is blocked).
    pub mine: Option<SocketAddr>,
    /// Our main socket's port.
    pub my_port: u16,
    /// The peer's reflexive address (the first of its candidates).
    pub peer: Option<SocketAddr>,
    /// The peer's main socket's port (the port of its host candidates).
    pub peer_port: Option<u16>,
    /// The IP the server saw the peer's control connection come from: birthday probing
    /// only ever goes there.
    pub peer_seen: Option<IpAddr>,
}

/// Which birthday role a session plays, if any.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Birthday {
    /// We are behind a symmetric NAT, the peer behind a cone: open many mappings, each
    /// probing the peer's reflexive address.
    Listen(SocketAddr),
    /// We are behind a cone NAT, the peer behind a symmetric one: spray probes at random
    /// ports of its IP.
    Spray(IpAddr),
}

impl NatFacts {
    /// The birthday role these facts call for: only across IPv4 NATs with distinct public
    /// addresses, exactly one side symmetric, and only towards the address the server saw.
    pub fn birthday(&self) -> Option<Birthday> {
        let (mine, peer, peer_port) = (self.mine?, self.peer?, self.peer_port?);
        if !peer.is_ipv4() || peer.ip() == mine.ip() || self.peer_seen != Some(peer.ip()) {
            return None;
        }
        match (mine.port() != self.my_port, peer.port() != peer_port) {
            (true, false) => Some(Birthday::Listen(peer)),
            (false, true) => Some(Birthday::Spray(peer.ip())),
            _ => None,
        }
    }
}

/// Everything a session's paths start from (what the server's `inbound` set up).
#[derive(Debug, Clone)]
pub struct Setup {
    /// The session id (probes carry it).
    pub session: u64,
    /// Our role.
    pub role: Role,
    /// The session's probe key.
    pub key: [u8; 16],
    /// The relay the session starts on.
    pub relay: RelayPath,
    /// The peer's candidates we may probe: already filtered to where the server saw the peer
    /// and our own networks. Nothing else is ever sent a probe unasked (and nothing at all
    /// when `direct_allowed` is false; they then only tell `why` apart).
    pub candidates: Vec<SocketAddr>,
    /// NAT facts for birthday probing.
    pub nat: NatFacts,
    /// Look for a direct path at all. `false`: a relay-only session (a stranger's, or direct
    /// paths disabled): no probe is sent, no probe is answered.
    pub direct_allowed: bool,
    /// Seed of the machine's randomness (birthday spray ports).
    pub seed: u64,
}

/// Counters of a session's paths.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PathStats {
    /// Probes and replies handed out to send.
    pub probes: u64,
    /// Relay binds handed out.
    pub binds: u64,
    /// Probes that did not verify (wrong key, session, role or shape).
    pub rejected: u64,
    /// Moves to a direct path.
    pub direct: u64,
    /// Falls back to the relay.
    pub fell_back: u64,
}

/// A token bucket in milli-probes.
#[derive(Debug)]
struct Budget {
    milli: u64,
    at: Instant,
    burst: u64,
    refill: u64,
}

impl Budget {
    fn take(&mut self, now: Instant, n: u64) -> bool {
        let dt = (now - self.at.min(now)).total_millis();
        self.milli = (self.milli + dt.saturating_mul(self.refill)).min(self.burst * 1000);
        self.at = self.at.max(now);
        if self.milli < n * 1000 {
            return false;
        }
        self.milli -= n * 1000;
        true
    }
}

#[derive(Debug)]
struct Suspicion {
    since: Instant,
    probed: Instant,
    answered: Option<Instant>,
}

#[derive(Debug)]
struct Direct {
    to: SocketAddr,
    socket: Socket,
    since: Instant,
    heard: Instant,
    suspicion: Option<Suspicion>,
    /// Direct over IPv4 while IPv6 candidates remain: the search goes on over IPv6 only,
    /// round `.0` of it due at `.1` (see "Both families" in the module docs).
    upgrade: Option<(u32, Instant)>,
    /// Over IPv4 because it measured clearly faster than IPv6: IPv6 wins back only past
    /// the hysteresis band.
    faster_v4: bool,
}

/// The smoothed round trip of a verified direct path (RFC 6298's SRTT, without RTTVAR).
#[derive(Debug, Clone, Copy)]
struct Measured {
    to: SocketAddr,
    socket: Socket,
    srtt: Duration,
    /// When its latest sample came.
    at: Instant,
}

/// What a verified probe or reply does to the path ([`Paths::handle_probe`]).
enum Act {
    /// Relayed: go direct to where it came from.
    Find(&'static str),
    /// The peer's NAT moved the direct path away from this address.
    Rebind(SocketAddr),
    /// To the other family's path: where, why, and whether chosen for its round trip.
    Family(SocketAddr, String, bool),
    /// Stay, for this reason (IPv4 kept for its round trip).
    Why(String),
    Nothing,
}

/// Our probes whose replies are still timed: the last this many.
const TIMED_PROBES: usize = 64;

/// Direct paths whose round trip is kept: the latest this many.
const MEASURED_PATHS: usize = 16;

#[derive(Debug)]
enum State {
    /// On the relay; the next search round (`round` of a search) is due at `next` (`None`:
    /// nothing to search for).
    Relayed {
        round: u32,
        next: Option<Instant>,
    },
    Direct(Direct),
}

#[derive(Debug)]
enum BirthdayRun {
    Listen { peer: SocketAddr, next: Instant, until: Instant },
    Spray { ip: IpAddr, next: Instant, left: u32 },
}

/// The paths of one session. See the [module documentation](self).
#[derive(Debug)]
pub struct Paths {
    config: Config,
    session: u64,
    role: Role,
    key: ProbeKey,
    relay: RelayPath,
    candidates: Vec<SocketAddr>,
    birthday_role: Option<Birthday>,
    direct_allowed: bool,
    rng: Rng,
    current: Path,
    why: String,
    state: State,
    birthday: Option<BirthdayRun>,
    next_bind: Option<Instant>,
    budget: Budget,
    in_flight: u64,
    nonce: u64,
    transmits: VecDeque<Transmit>,
    events: VecDeque<PathEvent>,
    stats: PathStats,
    /// Our latest probes and when they left (replies to them are round-trip samples; at
    /// most [`TIMED_PROBES`]).
    sent: VecDeque<(u64, Instant)>,
    /// The latest measured direct paths (at most [`MEASURED_PATHS`]).
    measured: Vec<Measured>,
    /// When the path last moved (or stayed) for its round trip: [`Config::family_hold`].
    rtt_chosen: Option<Instant>,
    /// The next search round is the first after a fall back: it lasts three times as long,
    /// so that both sides' rounds overlap even when one side noticed the loss seconds after
    /// the other (a port-restricted NAT only lets the peer's probes in while we probe too).
    after_loss: bool,
}

impl Paths {
    /// The paths of a new session: on the relay, searching for a direct path (after
    /// [`Config::probe_after`]) unless `setup` makes it relay-only. The first relay bind
    /// is due at once.
    pub fn new(now: Instant, config: Config, setup: Setup) -> Paths {
        let searching = setup.direct_allowed && !setup.candidates.is_empty();
        let why = match (setup.relay, setup.direct_allowed, searching) {
            (RelayPath::Control, ..) => "UDP to the server is blocked: relayed over TCP".into(),
            (_, false, _) if setup.candidates.is_empty() => {
                "relay only: no candidate to probe (a stranger's session, or none where the server saw the peer)".into()
            }
            (_, false, _) => "relay only: direct paths disabled for this session".to_string(),
            (_, true, false) => {
                "relay only: no candidate to probe (none where the server saw the peer)".into()
            }
            (RelayPath::Udp(_), ..) => "relayed while probing for a direct path".into(),
        };
        let next = searching.then(|| now + config.probe_after);
        let mut candidates = setup.candidates;
        sort_by_family(&mut candidates);
        Paths {
            session: setup.session,
            role: setup.role,
            key: ProbeKey::new(&setup.key),
            relay: setup.relay,
            birthday_role: if setup.direct_allowed { setup.nat.birthday() } else { None },
            candidates,
            direct_allowed: setup.direct_allowed,
            rng: Rng::new(setup.seed),
            current: setup.relay.into(),
            why,
            state: State::Relayed { round: 0, next },
            birthday: None,
            next_bind: matches!(setup.relay, RelayPath::Udp(_)).then_some(now),
            budget: Budget {
                milli: u64::from(config.probe_burst) * 1000,
                at: now,
                burst: u64::from(config.probe_burst),
                refill: u64::from(config.probe_refill),
            },
            in_flight: 0,
            nonce: 0,
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            stats: PathStats::default(),
            sent: VecDeque::new(),
            measured: Vec::new(),
            rtt_chosen: None,
            after_loss: false,
            config,
        }
    }

    /// The path the session's datagrams take now: the one place it is kept.
    pub fn current(&self) -> Path {
        self.current
    }

    /// Why the session is on [`Paths::current`], for status displays.
    pub fn why(&self) -> &str {
        &self.why
    }

    /// Counters.
    pub fn stats(&self) -> PathStats {
        self.stats
    }

    /// The session id.
    pub fn session(&self) -> u64 {
        self.session
    }

    /// Bytes the session has in flight (unacknowledged), as of the last transmit: a
    /// silent direct path with data in flight is asked again sooner than an idle one.
    pub fn set_in_flight(&mut self, bytes: u64) {
        self.in_flight = bytes;
    }

    /// A probe or reply for this session arrived on `socket` from `from`. Verified ones
    /// are answered (probes) and may move the session to a direct path: the first while
    /// relayed, or one from a new address while the direct path is silent (NAT
    /// rebinding). Returns whether it verified.
    pub fn handle_probe(
        &mut self,
        now: Instant,
        socket: Socket,
        from: SocketAddr,
        d: &[u8],
    ) -> bool {
        if !self.direct_allowed {
            return false;
        }
        let Some(p) = self.key.verify(d, self.role.other()).filter(|p| p.session == self.session)
        else {
            self.stats.rejected += 1;
            debug!(session = format!("{:016x}", self.session), %from, "dropped a probe that does not verify");
            return false;
        };
        if !p.reply && self.budget.take(now, 1) {
            let data = self.key.encode(true, self.session, p.nonce, self.role);
            self.push(Transmit { socket, to: from, payload: Payload::Probe(data) });
        }
        // A reply to one of our probes: a round-trip sample of the path it came back on.
        let sample = p.reply && self.sample(now, p.nonce, from, socket);
        let act = match &self.state {
            State::Relayed { .. } => match socket {
                Socket::Birthday(_) => Act::Find("hole punched (birthday probing)"),
                Socket::Main if matches!(self.birthday, Some(BirthdayRun::Spray { .. })) => {
                    Act::Find("hole punched (birthday probing)")
                }
                Socket::Main => Act::Find("hole punched"),
            },
            // The other family answers while the path is silent and unanswered: move there
            // whatever it measures (the old path's in-flight data is resent).
            State::Direct(d)
                if d.to.is_ipv4() != from.is_ipv4()
                    && socket == Socket::Main
                    && d.suspicion.as_ref().is_some_and(|s| s.answered.is_none()) =>
            {
                let family = if from.is_ipv6() { "IPv6" } else { "IPv4" };
                let why = format!("hole punched over {family} while {} is silent", d.to);
                Act::Family(from, why, false)
            }
            // The peer's probe over IPv6 while we are direct over IPv4: the preferred family
            // works, unless our own search is still measuring it, or IPv4 was chosen as
            // faster ("Both families").
            State::Direct(d)
                if d.to.is_ipv4() && from.is_ipv6() && socket == Socket::Main && !sample =>
            {
                if d.upgrade.is_some() || d.faster_v4 {
                    Act::Nothing
                } else {
                    let why =
                        format!("hole punched over IPv6 (preferred to the IPv4 path {})", d.to);
                    Act::Family(from, why, false)
                }
            }
            // A round trip of this path or of the other family's: compare them.
            State::Direct(d)
                if sample
                    && ((d.to == from && d.socket == socket)
                        || (d.to.is_ipv4() != from.is_ipv4() && socket == Socket::Main)) =>
            {
                self.compare_families(now, d)
            }
            State::Direct(d) if d.to == from && d.socket == socket => Act::Nothing,
            // From another address while the path is silent and unanswered: the peer's
            // NAT moved it (rebinding).
            State::Direct(d) if d.suspicion.as_ref().is_some_and(|s| s.answered.is_none()) => {
                Act::Rebind(d.to)
            }
            State::Direct(_) => Act::Nothing,
        };
        if let State::Direct(d) = &mut self.state
            && d.to == from
            && d.socket == socket
            && let Some(s) = &mut d.suspicion
            && p.reply
            && s.answered.is_none()
        {
            // Answers the watch's probes: the path works both ways.
            s.answered = Some(now);
        }
        match act {
            Act::Find(how) => self.go_direct(now, from, socket, how.to_string(), false),
            Act::Rebind(old) => {
                let why = format!("NAT rebinding: the peer moved from {old} to {from}");
                self.go_direct(now, from, socket, why, true);
            }
            Act::Family(to, why, for_rtt) => {
                // What was in flight on a silent, unanswered path is resent.
                let lost = matches!(&self.state, State::Direct(d)
                    if d.suspicion.as_ref().is_some_and(|s| s.answered.is_none()));
                self.go_direct(now, to, Socket::Main, why, lost);
                if for_rtt {
                    self.rtt_chosen = Some(now);
                    if let State::Direct(d) = &mut self.state {
                        d.faster_v4 = to.is_ipv4();
                    }
                }
            }
            Act::Why(why) => {
                // IPv4 stays, chosen for its round trip.
                if let State::Direct(d) = &mut self.state
                    && !d.faster_v4
                {
                    info!(session = format!("{:016x}", self.session), why, "direct path kept");
                    d.faster_v4 = true;
                    self.why = why;
                    self.rtt_chosen = Some(now);
                }
            }
            Act::Nothing => {}
        }
        true
    }

    /// A datagram of the session (data, ack, anything authenticated as the session's)
    /// arrived on `socket` from `from`: the direct path from there is alive.
    pub fn handle_datagram(&mut self, now: Instant, socket: Socket, from: SocketAddr) {
        if let State::Direct(d) = &mut self.state
            && d.to == from
            && d.socket == socket
        {
            d.heard = d.heard.max(now);
        }
    }

    /// A datagram of the session arrived through the relay. While direct (for longer than a
    /// straggler could take), the peer has given up on the direct path: follow it.
    pub fn note_relayed(&mut self, now: Instant) {
        if let State::Direct(d) = &self.state
            && now >= d.since + self.config.direct_grace
        {
            let why = format!("the peer moved to the relay; {} is no longer used", d.to);
            self.fall_back(now, &why);
        }
    }

    /// The relay the session falls back to.
    pub fn relay(&self) -> RelayPath {
        self.relay
    }

    /// The session's relay leg was given again (after a re-login: the server may have
    /// restarted and forgotten the old one), at `relay`: bind it at once. A relayed session
    /// whose relay moved moves with it (a [`PathEvent::Switched`], nothing lost); at the
    /// same relay only the driver's framing changes (no event: the path, and so its MTU,
    /// stays).
    pub fn set_relay(&mut self, now: Instant, relay: RelayPath) {
        let relayed = self.current == Path::from(self.relay);
        let moved = relay != self.relay;
        self.relay = relay;
        if relayed && moved {
            self.current = relay.into();
            self.events.push_back(PathEvent::Switched { path: self.current, lost: false });
        }
        self.next_bind = match relay {
            RelayPath::Udp(a) => {
                self.bind(a);
                Some(now + self.config.relay_bind_every)
            }
            RelayPath::Control => None,
        };
    }

    /// Fresh candidates (after a network change, already filtered as for [`Setup`]): while
    /// relayed, search them at once.
    pub fn update_candidates(&mut self, now: Instant, candidates: Vec<SocketAddr>) {
        self.candidates = candidates;
        sort_by_family(&mut self.candidates);
        let v6 = self.candidates.iter().any(SocketAddr::is_ipv6);
        match &mut self.state {
            State::Relayed { round, next } if self.direct_allowed => {
                *round = 0;
                *next = (!self.candidates.is_empty()).then_some(now);
            }
            State::Direct(d) if self.direct_allowed && d.to.is_ipv4() && v6 => {
                d.upgrade = Some((0, now));
            }
            _ => {}
        }
    }

    /// The next datagram to send (probes, replies, relay binds). `now` is not used to run
    /// timers (that is [`Paths::handle_timeout`]'s job, so that events always come before
    /// the transmits that need them); it is taken for symmetry with the session.
    pub fn poll_transmit(&mut self, _now: Instant) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    /// The next event for the driver.
    pub fn poll_event(&mut self) -> Option<PathEvent> {
        self.events.pop_front()
    }

    /// When [`Paths::handle_timeout`] is next due (a time in the past: at once); `None`:
    /// nothing until the next input.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let c = &self.config;
        let mut t: Option<Instant> = self.next_bind;
        let mut at = |x: Instant| t = Some(t.map_or(x, |t| t.min(x)));
        if let Some(b) = &self.birthday {
            match b {
                BirthdayRun::Listen { next, until, .. } => at((*next).min(*until)),
                BirthdayRun::Spray { next, .. } => at(*next),
            }
        }
        match &self.state {
            State::Relayed { next, .. } => {
                if let Some(n) = next {
                    at(*n)
                }
            }
            State::Direct(d) => match &d.suspicion {
                None => at(d.heard + c.suspect_after),
                Some(s) => match s.answered {
                    Some(a) if self.in_flight > 0 => {
                        at(a + c.suspect_after.min(c.reask_idle_after))
                    }
                    Some(a) => at(a + c.reask_idle_after),
                    None => at((s.since + c.dead_after).min(s.probed + c.suspect_probe_every)),
                },
            },
        }
        if let State::Direct(Direct { upgrade: Some((_, next)), .. }) = &self.state {
            at(*next);
        }
        if !self.transmits.is_empty() {
            at(Instant::from_micros(0));
        }
        t
    }

    /// Run the timers due at `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        if let Some(b) = self.next_bind
            && b <= now
            && let RelayPath::Udp(relay) = self.relay
        {
            self.bind(relay);
            self.next_bind = Some(now + self.config.relay_bind_every);
        }
        self.search(now);
        self.search_ipv6(now);
        self.run_birthday(now);
        self.watch(now);
    }

    fn push(&mut self, t: Transmit) {
        match t.payload {
            Payload::Probe(_) => self.stats.probes += 1,
            Payload::RelayBind => self.stats.binds += 1,
        }
        self.transmits.push_back(t);
    }

    fn bind(&mut self, relay: SocketAddr) {
        self.push(Transmit { socket: Socket::Main, to: relay, payload: Payload::RelayBind });
    }

    /// A new probe sent at `now` (its reply will be timed).
    fn probe(&mut self, now: Instant) -> [u8; probe::LEN] {
        self.nonce += 1;
        if self.sent.len() == TIMED_PROBES {
            self.sent.pop_front();
        }
        self.sent.push_back((self.nonce, now));
        self.key.encode(false, self.session, self.nonce, self.role)
    }

    /// A reply to our probe `nonce` came back at `now` from `from` on `socket`: one more
    /// sample of that path's smoothed round trip (RFC 6298 section 2). False when the probe
    /// is not among the timed ones.
    fn sample(&mut self, now: Instant, nonce: u64, from: SocketAddr, socket: Socket) -> bool {
        let Some(&(_, sent)) = self.sent.iter().find(|(n, _)| *n == nonce) else { return false };
        let rtt = now - sent.min(now);
        let srtt = match self.measured.iter().position(|m| m.to == from && m.socket == socket) {
            Some(i) => {
                let m = self.measured.remove(i);
                (m.srtt * 7 + rtt) / 8
            }
            None => rtt,
        };
        if self.measured.len() == MEASURED_PATHS {
            self.measured.remove(0);
        }
        self.measured.push(Measured { to: from, socket, srtt, at: now });
        true
    }

    /// Direct over `d`, with a new round-trip sample: which family the path should take
    /// (see "Both families" in the module docs). The other family's path counts only if it
    /// answered within [`Config::suspect_after`].
    fn compare_families(&self, now: Instant, d: &Direct) -> Act {
        let c = &self.config;
        let held = self.rtt_chosen.is_some_and(|t| now < t + c.family_hold);
        let cur = self.measured.iter().find(|m| m.to == d.to && m.socket == d.socket);
        let Some(other) = self.measured.iter().rev().find(|m| {
            m.to.is_ipv4() != d.to.is_ipv4()
                && m.socket == Socket::Main
                && now < m.at + c.suspect_after
        }) else {
            return Act::Nothing;
        };
        let (to, them) = (other.to, other.srtt);
        match (d.to.is_ipv4(), cur.map(|m| m.srtt)) {
            // Over IPv4, IPv6 answers: it wins unless IPv4 is clearly faster.
            (true, Some(v4)) if d.faster_v4 => {
                if held || v4_faster(c, v4, them, 2) {
                    Act::Nothing
                } else {
                    let why = format!(
                        "hole punched over IPv6: its round trip ({}) is no longer clearly above \
                         IPv4's ({} on {})",
                        ms(them),
                        ms(v4),
                        d.to
                    );
                    Act::Family(to, why, true)
                }
            }
            (true, Some(v4)) if v4_faster(c, v4, them, 1) => Act::Why(format!(
                "direct over IPv4 {}: its round trip ({}) is clearly below IPv6's ({} on {to})",
                d.to,
                ms(v4),
                ms(them)
            )),
            (true, _) => {
                let why = format!("hole punched over IPv6 (preferred to the IPv4 path {})", d.to);
                Act::Family(to, why, false)
            }
            // Over IPv6, IPv4 answers: it wins only clearly faster.
            (false, Some(v6)) if !held && v4_faster(c, them, v6, 1) => {
                let why = format!(
                    "hole punched over IPv4: its round trip ({}) is clearly below IPv6's ({} on \
                     {})",
                    ms(them),
                    ms(v6),
                    d.to
                );
                Act::Family(to, why, true)
            }
            (false, _) => Act::Nothing,
        }
    }

    /// The rounds of one search.
    fn rounds(&self) -> u32 {
        (self.config.probe_for.total_millis() / self.config.probe_every.total_millis().max(1))
            .max(1) as u32
            * if self.after_loss { 3 } else { 1 }
    }

    /// Direct over IPv4: a round of probes to the IPv6 candidates only, if one is due.
    fn search_ipv6(&mut self, now: Instant) {
        let rounds = self.rounds();
        let State::Direct(d) = &mut self.state else { return };
        let Some((round, due)) = d.upgrade else { return };
        if due > now {
            return;
        }
        d.upgrade = (round + 1 < rounds).then(|| (round + 1, now + self.config.probe_every));
        let v6: Vec<SocketAddr> =
            self.candidates.iter().copied().filter(SocketAddr::is_ipv6).collect();
        if !v6.is_empty() && self.budget.take(now, v6.len() as u64) {
            let data = self.probe(now);
            for to in v6 {
                self.push(Transmit { socket: Socket::Main, to, payload: Payload::Probe(data) });
            }
        }
    }

    /// Relayed: a search round if one is due.
    fn search(&mut self, now: Instant) {
        let State::Relayed { round, next: Some(due) } = self.state else { return };
        if due > now {
            return;
        }
        let rounds = self.rounds();
        let n = self.candidates.len() as u64;
        if n > 0 && self.budget.take(now, n) {
            let data = self.probe(now);
            for i in 0..self.candidates.len() {
                let to = self.candidates[i];
                self.push(Transmit { socket: Socket::Main, to, payload: Payload::Probe(data) });
            }
        }
        if round == self.config.birthday_after_rounds {
            self.start_birthday(now);
        }
        let next_round = round + 1;
        if next_round >= rounds {
            self.after_loss = false;
        }
        self.state = if next_round >= rounds {
            if matches!(self.current, Path::UdpRelay(_)) {
                self.why = format!(
                    "no direct path: none of {} candidates answered probes",
                    self.candidates.len()
                );
            }
            let wait = self.config.probe_every + self.config.reprobe_every;
            State::Relayed { round: 0, next: Some(now + wait) }
        } else {
            State::Relayed { round: next_round, next: Some(now + self.config.probe_every) }
        };
    }

    fn start_birthday(&mut self, now: Instant) {
        if self.birthday.is_some() {
            return;
        }
        match self.birthday_role {
            Some(Birthday::Listen(peer)) => {
                debug!(session = format!("{:016x}", self.session), %peer, "birthday: opening mappings");
                self.events.push_back(PathEvent::OpenBirthdaySockets(self.config.birthday_sockets));
                self.birthday = Some(BirthdayRun::Listen {
                    peer,
                    next: now,
                    until: now + self.config.birthday_for,
                });
            }
            Some(Birthday::Spray(ip)) => {
                debug!(session = format!("{:016x}", self.session), %ip, "birthday: spraying probes");
                self.birthday =
                    Some(BirthdayRun::Spray { ip, next: now, left: self.config.birthday_probes });
            }
            None => {}
        }
    }

    fn stop_birthday(&mut self, keep: Option<u16>) {
        if let Some(BirthdayRun::Listen { .. }) = self.birthday.take() {
            self.events.push_back(PathEvent::CloseBirthdaySockets { keep });
        }
    }

    fn run_birthday(&mut self, now: Instant) {
        match self.birthday {
            Some(BirthdayRun::Listen { peer, next, until }) => {
                if now >= until {
                    return self.stop_birthday(None);
                }
                if next > now {
                    return;
                }
                let n = self.config.birthday_sockets;
                if !self.budget.take(now, u64::from(n)) {
                    return self.stop_birthday(None);
                }
                let data = self.probe(now);
                for i in 0..n {
                    let t = Transmit {
                        socket: Socket::Birthday(i),
                        to: peer,
                        payload: Payload::Probe(data),
                    };
                    self.push(t);
                }
                let next = now + self.config.birthday_every;
                self.birthday = Some(BirthdayRun::Listen { peer, next, until });
            }
            Some(BirthdayRun::Spray { ip, next, left }) => {
                if next > now {
                    return;
                }
                // Steps of 20 ms, each `rate / 50` probes.
                let step = (self.config.birthday_rate / 50).clamp(1, left.max(1));
                if left == 0 || !self.budget.take(now, u64::from(step)) {
                    self.birthday = None;
                    return;
                }
                for _ in 0..step {
                    let data = self.probe(now);
                    let port = 1024 + (self.rng.next_u64() % (65536 - 1024)) as u16;
                    let to = SocketAddr::new(ip, port);
                    self.push(Transmit { socket: Socket::Main, to, payload: Payload::Probe(data) });
                }
                let left = left - step;
                self.birthday = (left > 0).then_some(BirthdayRun::Spray {
                    ip,
                    next: now + Duration::from_millis(20),
                    left,
                });
            }
            None => {}
        }
    }

    /// Direct: watch the path. Silent for `suspect_after`: probe it every
    /// `suspect_probe_every`; no answer and no data for `dead_after` more: fall back.
    fn watch(&mut self, now: Instant) {
        let c = self.config.clone();
        let State::Direct(d) = &mut self.state else { return };
        if now < d.heard + c.suspect_after {
            d.suspicion = None;
            return;
        }
        let ask = match &mut d.suspicion {
            None => true,
            Some(s) => match s.answered {
                Some(at) => {
                    let waited = now - at.min(now);
                    (self.in_flight > 0 && waited >= c.suspect_after)
                        || waited >= c.reask_idle_after
                }
                None if now >= s.since + c.dead_after => {
                    let why = format!(
                        "no answer from {} for {} ms",
                        d.to,
                        (now - d.heard.min(now)).total_millis()
                    );
                    return self.fall_back(now, &why);
                }
                None if now >= s.probed + c.suspect_probe_every => {
                    s.probed = now;
                    let (to, socket) = (d.to, d.socket);
                    self.watch_probe(now, to, socket);
                    return;
                }
                None => return,
            },
        };
        if ask {
            debug!(session = format!("{:016x}", self.session), to = %d.to, "direct path silent: probing it");
            d.suspicion = Some(Suspicion { since: now, probed: now, answered: None });
            let (to, socket) = (d.to, d.socket);
            self.watch_probe(now, to, socket);
        }
    }

    fn watch_probe(&mut self, now: Instant, to: SocketAddr, socket: Socket) {
        if self.budget.take(now, 1) {
            let data = self.probe(now);
            self.push(Transmit { socket, to, payload: Payload::Probe(data) });
        }
    }

    fn go_direct(&mut self, now: Instant, to: SocketAddr, socket: Socket, why: String, lost: bool) {
        let keep = match socket {
            Socket::Birthday(i) => Some(i),
            Socket::Main => None,
        };
        // Leaving a birthday path (rebinding) closes its socket; a running search stops.
        if let Path::Direct { socket: Socket::Birthday(_), .. } = self.current
            && keep.is_none()
        {
            self.events.push_back(PathEvent::CloseBirthdaySockets { keep: None });
        }
        if matches!(self.birthday, Some(BirthdayRun::Listen { .. })) {
            self.stop_birthday(keep);
        } else {
            self.birthday = None;
        }
        info!(session = format!("{:016x}", self.session), %to, ?socket, why, "direct path found");
        // Found over IPv4 during a search, with IPv6 candidates to try: the rest of the
        // search goes on over IPv6 (a path found by rebinding or after a search keeps on).
        let upgrade = match self.state {
            State::Relayed { round, next: Some(_) }
                if to.is_ipv4() && self.candidates.iter().any(SocketAddr::is_ipv6) =>
            {
                Some((round, now + self.config.probe_every))
            }
            State::Direct(Direct { upgrade, .. }) if to.is_ipv4() => upgrade,
            _ => None,
        };
        self.current = Path::Direct { to, socket };
        self.why = why;
        self.state = State::Direct(Direct {
            to,
            socket,
            since: now,
            heard: now,
            suspicion: None,
            upgrade,
            faster_v4: false,
        });
        self.stats.direct += 1;
        self.events.push_back(PathEvent::Switched { path: self.current, lost });
    }

    fn fall_back(&mut self, now: Instant, why: &str) {
        let State::Direct(d) = &self.state else { return };
        let lost = d.to;
        if let Socket::Birthday(_) = d.socket {
            self.events.push_back(PathEvent::CloseBirthdaySockets { keep: None });
        }
        warn!(session = format!("{:016x}", self.session), direct = %lost, why, "direct path lost: back to the relay");
        self.current = self.relay.into();
        self.why = format!("direct path {lost} lost ({why}); relayed, probing again later");
        // Wait a whole period before probing again: a path that died one way would
        // otherwise be found and lost again every few seconds.
        let next = (!self.candidates.is_empty()).then(|| now + self.config.reprobe_every);
        self.state = State::Relayed { round: 0, next };
        self.after_loss = true;
        // The next search measures afresh.
        self.measured.clear();
        self.rtt_chosen = None;
        self.stats.fell_back += 1;
        self.events.push_back(PathEvent::Switched { path: self.current, lost: true });
        // Bind at once: our NAT mapping towards the relay may have changed with the one
        // that broke the direct path.
        if let RelayPath::Udp(relay) = self.relay {
            self.bind(relay);
            self.next_bind = Some(now + self.config.relay_bind_every);
        }
    }
}

/// Whether IPv4's smoothed round trip `v4` is below IPv6's `v6` by more than the margin
/// divided by `div` (1: to choose IPv4; 2: to keep it, the hysteresis band).
fn v4_faster(c: &Config, v4: Duration, v6: Duration, div: u32) -> bool {
    let margin = c.v4_faster_by.max(v6 * c.v4_faster_by_percent / 100);
    v4 + margin / div.max(1) < v6
}

/// A round trip for `why`, in milliseconds.
fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.total_micros() as f64 / 1000.0)
}

/// IPv6 candidates first (RFC 8305 §4), keeping the order within a family.
fn sort_by_family(candidates: &mut [SocketAddr]) {
    candidates.sort_by_key(|c| c.is_ipv4());
}
