//! The path machine ([`q2q_netstack::path::Paths`]) driven through a simulated internet in
//! virtual time: two hosts behind NATs (address-restricted cone, port-restricted cone,
//! symmetric with random ports), a server that answers who-am-i and relays, 10 ms between
//! any two public addresses, and faults: the direct path blocked, the relay down, a whole
//! outage, a NAT that forgets its mappings (rebinding).
//!
//! The machine alone is tested: "session datagrams" are small tagged datagrams each side
//! sends every 50 ms (or every 10 s when idle) along `Paths::current()`, standing in for
//! data and acks. Every probe the machine sends is checked against the network rule: to a
//! candidate it was given, to the birthday target IP, or to an address a verified probe
//! came from.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use q2q_netstack::path::{
    Birthday, Config, NatFacts, Path, PathEvent, Paths, Payload, RelayPath, Role, Setup, Socket,
    probe,
};
use q2q_netstack::sim::Rng;
use q2q_netstack::wire::{Kind, VERSION};
use q2q_netstack::{Duration, Instant};

const SESSION: u64 = 0x5e55_1011_0000_0001;
const KEY: [u8; 16] = [42; 16];
const DELAY: Duration = Duration::from_millis(10);
const MAIN_PORT: [u16; 2] = [4000, 5000];
const BIRTHDAY_PORT: u16 = 40000;
/// Session datagrams: direct, and relayed (to the relay, which forwards them).
const DATA: u8 = 0xd1;
const RELAYED: u8 = 0xd2;
const BIND: u8 = 0xb1;

fn ip(a: u8, b: u8, c: u8, d: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(a, b, c, d))
}

fn server() -> SocketAddr {
    SocketAddr::new(ip(192, 0, 2, 1), 3478)
}

fn relay() -> SocketAddr {
    SocketAddr::new(ip(192, 0, 2, 1), 3479)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NatKind {
    /// One mapping per socket (port kept if free); inbound from any port of an IP the
    /// socket sent to.
    AddressRestricted,
    /// One mapping per socket (port kept if free); inbound only from an address and port
    /// the socket sent to.
    PortRestricted,
    /// A random port per (socket, destination); inbound only from that destination.
    Symmetric,
}

struct Nat {
    kind: NatKind,
    public: IpAddr,
    /// (private source, destination if symmetric) → public port.
    out: HashMap<(SocketAddr, Option<SocketAddr>), u16>,
    /// public port → (private address, remotes it sent to).
    inbound: HashMap<u16, (SocketAddr, HashSet<SocketAddr>)>,
    rng: Rng,
    /// After a rebinding, ports are no longer kept.
    keep_ports: bool,
}

impl Nat {
    fn outbound(&mut self, src: SocketAddr, dst: SocketAddr) -> SocketAddr {
        let key = (src, (self.kind == NatKind::Symmetric).then_some(dst));
        let port = match self.out.get(&key) {
            Some(p) => *p,
            None => {
                let mut p = src.port();
                if self.kind == NatKind::Symmetric
                    || !self.keep_ports
                    || self.inbound.contains_key(&p)
                {
                    loop {
                        p = 1024 + (self.rng.next_u64() % (65536 - 1024)) as u16;
                        if !self.inbound.contains_key(&p) {
                            break;
                        }
                    }
                }
                self.out.insert(key, p);
                self.inbound.insert(p, (src, HashSet::new()));
                p
            }
        };
        if let Some((_, remotes)) = self.inbound.get_mut(&port) {
            remotes.insert(dst);
        }
        SocketAddr::new(self.public, port)
    }

    fn inbound(&self, from: SocketAddr, port: u16) -> Option<SocketAddr> {
        let (private, remotes) = self.inbound.get(&port)?;
        let ok = match self.kind {
            NatKind::AddressRestricted => remotes.iter().any(|r| r.ip() == from.ip()),
            NatKind::PortRestricted | NatKind::Symmetric => remotes.contains(&from),
        };
        ok.then_some(*private)
    }

    /// Forget every mapping; new ones get new ports.
    fn rebind(&mut self) {
        self.out.clear();
        self.inbound.clear();
        self.keep_ports = false;
    }
}

struct Peer {
    paths: Paths,
    private: IpAddr,
    nat: Nat,
    /// Open birthday sockets.
    birthday: HashSet<u16>,
    events: Vec<(Instant, PathEvent)>,
    next_data: Instant,
    data_every: Duration,
    /// Where the machine may send probes: candidates, the birthday IP, verified sources.
    allowed: HashSet<SocketAddr>,
    birthday_ip: Option<IpAddr>,
    probes_sent: u64,
    binds_sent: u64,
    data_heard: u64,
    relayed_heard: u64,
    first_direct: Option<Instant>,
}

#[derive(PartialEq, Eq, PartialOrd, Ord)]
struct Packet {
    at: i64,
    n: u64,
    src: SocketAddr,
    dst: SocketAddr,
    data: Vec<u8>,
}

struct World {
    now: Instant,
    peers: [Peer; 2],
    air: BinaryHeap<Reverse<Packet>>,
    n: u64,
    /// Relay bindings by side.
    bound: [Option<SocketAddr>; 2],
    relay_down: bool,
    /// Datagrams between the two NATs' public addresses are dropped.
    direct_blocked: bool,
    /// Nothing gets anywhere.
    down: bool,
    /// Datagrams from the first public IP to the second are dropped.
    one_way_blocked: Option<(IpAddr, IpAddr)>,
}

struct Scenario {
    nats: [NatKind; 2],
    direct_allowed: [bool; 2],
    extra_candidates: Vec<SocketAddr>,
    seed: u64,
    data_every: Duration,
}

impl Default for Scenario {
    fn default() -> Scenario {
        Scenario {
            nats: [NatKind::PortRestricted; 2],
            direct_allowed: [true; 2],
            extra_candidates: Vec::new(),
            seed: 1,
            data_every: Duration::from_millis(50),
        }
    }
}

impl World {
    fn new(s: Scenario) -> World {
        let now = Instant::from_millis(0);
        let publics = [ip(203, 0, 113, 1), ip(198, 51, 100, 2)];
        let privates = [ip(10, 0, 1, 2), ip(10, 0, 2, 2)];
        let mut nats: Vec<Nat> = (0..2)
            .map(|i| Nat {
                kind: s.nats[i],
                public: publics[i],
                out: HashMap::new(),
                inbound: HashMap::new(),
                rng: Rng::new(s.seed.wrapping_mul(31).wrapping_add(i as u64)),
                keep_ports: true,
            })
            .collect();
        // Who-am-i: the server sees each main socket's mapping.
        let reflexive: Vec<SocketAddr> = (0..2)
            .map(|i| nats[i].outbound(SocketAddr::new(privates[i], MAIN_PORT[i]), server()))
            .collect();
        let mut peers = Vec::new();
        for i in 0..2 {
            let j = 1 - i;
            // The peer's candidates: reflexive, host; the caller filters them to where the
            // server saw the peer (its public IP), and appends the predicted one.
            let mut all = vec![reflexive[j], SocketAddr::new(privates[j], MAIN_PORT[j])];
            all.extend(s.extra_candidates.iter().copied());
            let guess = SocketAddr::new(reflexive[j].ip(), MAIN_PORT[j]);
            if guess != reflexive[j] {
                all.push(guess);
            }
            let candidates: Vec<SocketAddr> =
                all.into_iter().filter(|c| c.ip() == publics[j]).collect();
            let nat = NatFacts {
                mine: Some(reflexive[i]),
                my_port: MAIN_PORT[i],
                peer: Some(reflexive[j]),
                peer_port: Some(MAIN_PORT[j]),
                peer_seen: Some(publics[j]),
            };
            let birthday_ip = match nat.birthday() {
                Some(Birthday::Spray(ip)) => Some(ip),
                Some(Birthday::Listen(a)) => Some(a.ip()),
                None => None,
            };
            let setup = Setup {
                session: SESSION,
                role: if i == 0 { Role::Caller } else { Role::Callee },
                key: KEY,
                relay: RelayPath::Udp(relay()),
                candidates: candidates.clone(),
                nat,
                direct_allowed: s.direct_allowed[i],
                seed: s.seed ^ (0xabc + i as u64),
            };
            peers.push(Peer {
                paths: Paths::new(now, Config::default(), setup),
                private: privates[i],
                nat: nats.remove(0),
                birthday: HashSet::new(),
                events: Vec::new(),
                next_data: now,
                data_every: s.data_every,
                allowed: candidates.into_iter().collect(),
                birthday_ip,
                probes_sent: 0,
                binds_sent: 0,
                data_heard: 0,
                relayed_heard: 0,
                first_direct: None,
            });
        }
        let [a, b]: [Peer; 2] = peers.try_into().ok().expect("two peers");
        World {
            now,
            peers: [a, b],
            air: BinaryHeap::new(),
            n: 0,
            bound: [None; 2],
            relay_down: false,
            direct_blocked: false,
            down: false,
            one_way_blocked: None,
        }
    }

    /// Send from side `i`'s socket.
    fn send(&mut self, i: usize, socket: Socket, to: SocketAddr, data: Vec<u8>) {
        let port = match socket {
            Socket::Main => MAIN_PORT[i],
            Socket::Birthday(k) => {
                assert!(
                    self.peers[i].birthday.contains(&k),
                    "sent from closed birthday socket {k}"
                );
                BIRTHDAY_PORT + k
            }
        };
        let p = &mut self.peers[i];
        let src = p.nat.outbound(SocketAddr::new(p.private, port), to);
        self.launch(src, to, data);
    }

    fn launch(&mut self, src: SocketAddr, dst: SocketAddr, data: Vec<u8>) {
        if self.down {
            return;
        }
        let publics = [self.peers[0].nat.public, self.peers[1].nat.public];
        if self.direct_blocked && publics.contains(&src.ip()) && publics.contains(&dst.ip()) {
            return;
        }
        if self.one_way_blocked == Some((src.ip(), dst.ip())) {
            return;
        }
        self.n += 1;
        let at = (self.now + DELAY).total_micros();
        self.air.push(Reverse(Packet { at, n: self.n, src, dst, data }));
    }

    fn deliver(&mut self, p: Packet) {
        if self.down {
            return;
        }
        if p.dst == relay() {
            if self.relay_down {
                return;
            }
            let side = *p.data.get(1).unwrap_or(&9) as usize;
            match p.data.first() {
                Some(&BIND) if side < 2 => self.bound[side] = Some(p.src),
                Some(&RELAYED) if side < 2 => {
                    if self.bound[side] == Some(p.src)
                        && let Some(to) = self.bound[1 - side]
                    {
                        self.launch(relay(), to, p.data);
                    }
                }
                _ => {}
            }
            return;
        }
        let Some(i) = self.peers.iter().position(|x| x.nat.public == p.dst.ip()) else { return };
        let Some(private) = self.peers[i].nat.inbound(p.src, p.dst.port()) else { return };
        let socket = if private.port() == MAIN_PORT[i] {
            Socket::Main
        } else {
            let k = private.port() - BIRTHDAY_PORT;
            if !self.peers[i].birthday.contains(&k) {
                return;
            }
            Socket::Birthday(k)
        };
        let now = self.now;
        let peer = &mut self.peers[i];
        match p.data.as_slice() {
            [VERSION, k, ..]
                if matches!(Kind::from_u8(*k), Some(Kind::Probe | Kind::ProbeReply))
                    && probe::session_of(&p.data) == Some(SESSION) =>
            {
                let verified = peer.paths.handle_probe(now, socket, p.src, &p.data);
                verified.then(|| peer.allowed.insert(p.src));
            }
            [DATA, ..] => {
                peer.data_heard += 1;
                peer.paths.handle_datagram(now, socket, p.src);
            }
            [RELAYED, ..] if p.src == relay() => {
                peer.relayed_heard += 1;
                peer.paths.note_relayed(now);
            }
            _ => {}
        }
    }

    /// Events, then transmits, then session traffic, for side `i`.
    fn service(&mut self, i: usize) {
        let now = self.now;
        if self.peers[i].paths.poll_timeout().is_some_and(|t| t <= now) {
            self.peers[i].paths.handle_timeout(now);
        }
        while let Some(ev) = self.peers[i].paths.poll_event() {
            let p = &mut self.peers[i];
            p.events.push((now, ev));
            match ev {
                PathEvent::OpenBirthdaySockets(n) => p.birthday.extend(0..n),
                PathEvent::CloseBirthdaySockets { keep } => p.birthday.retain(|k| Some(*k) == keep),
                PathEvent::Switched { path: Path::Direct { .. }, .. } => {
                    p.first_direct.get_or_insert(now);
                }
                PathEvent::Switched { .. } => {}
            }
            assert_eq!(
                matches!(ev, PathEvent::Switched { .. }).then(|| p.paths.current()),
                match ev {
                    PathEvent::Switched { path, .. } => Some(path),
                    _ => None,
                }
            );
        }
        while let Some(t) = self.peers[i].paths.poll_transmit(now) {
            let data = match t.payload {
                Payload::Probe(d) => {
                    let p = &mut self.peers[i];
                    assert!(
                        p.allowed.contains(&t.to) || Some(t.to.ip()) == p.birthday_ip,
                        "side {i} probed {}, which it was never given",
                        t.to
                    );
                    p.probes_sent += 1;
                    d.to_vec()
                }
                Payload::RelayBind => {
                    assert_eq!(t.to, relay());
                    self.peers[i].binds_sent += 1;
                    vec![BIND, i as u8]
                }
            };
            self.send(i, t.socket, t.to, data);
        }
        if self.peers[i].next_data <= now {
            let p = &mut self.peers[i];
            p.next_data = now + p.data_every;
            match p.paths.current() {
                Path::Direct { to, socket } => self.send(i, socket, to, vec![DATA, i as u8]),
                Path::UdpRelay(r) => self.send(i, Socket::Main, r, vec![RELAYED, i as u8]),
                Path::ControlRelay => {}
            }
        }
    }

    /// Run until `end`, or until `stop` holds.
    fn run(&mut self, end: Instant, mut stop: impl FnMut(&World) -> bool) -> bool {
        loop {
            while self.air.peek().is_some_and(|p| p.0.at <= self.now.total_micros()) {
                let Reverse(p) = self.air.pop().expect("peeked");
                self.deliver(p);
            }
            self.service(0);
            self.service(1);
            if stop(self) {
                return true;
            }
            let mut next = end;
            if let Some(p) = self.air.peek() {
                next = next.min(Instant::from_micros(p.0.at));
            }
            for p in &self.peers {
                next = next.min(p.next_data);
                if let Some(t) = p.paths.poll_timeout() {
                    next = next.min(t);
                }
            }
            if self.now >= end {
                return false;
            }
            self.now = next.max(self.now + Duration::from_micros(1)).min(end);
        }
    }

    fn both_direct(&self) -> bool {
        self.peers.iter().all(|p| matches!(p.paths.current(), Path::Direct { .. }))
    }

    fn both_relayed(&self) -> bool {
        self.peers.iter().all(|p| matches!(p.paths.current(), Path::UdpRelay(_)))
    }

    fn at(&self, secs: f64) -> Instant {
        self.now + Duration::from_micros((secs * 1e6) as u64)
    }

    fn datagrams(&self) -> u64 {
        self.peers.iter().map(|p| p.probes_sent + p.binds_sent).sum()
    }

    fn switches(&self, i: usize) -> Vec<(Instant, Path, bool)> {
        self.peers[i]
            .events
            .iter()
            .filter_map(|(t, e)| match e {
                PathEvent::Switched { path, lost } => Some((*t, *path, *lost)),
                _ => None,
            })
            .collect()
    }
}

fn direct_world(s: Scenario) -> World {
    let mut w = World::new(s);
    assert!(w.run(Instant::from_secs(6), |w| w.both_direct()), "no direct path");
    // Let the stragglers through.
    let t = w.at(1.0);
    w.run(t, |_| false);
    assert!(w.both_direct());
    w
}

#[test]
fn direct_found_cone_to_cone() {
    let mut w = World::new(Scenario::default());
    assert!(w.run(Instant::from_secs(6), |w| w.both_direct()), "no direct path");
    let t = w.now;
    let sent = w.datagrams();
    println!(
        "cone<->cone: direct after {} ms, {sent} datagrams (probes, replies, binds)",
        t.total_millis()
    );
    assert!(t <= Instant::from_millis(100), "direct only after {t}");
    assert!(sent <= 10, "{sent} datagrams to set up a direct path");
    for p in &w.peers {
        assert_eq!(p.paths.why(), "hole punched");
    }
    // Busy: data and acks keep the path alive; no watch probes.
    let before = w.peers[0].probes_sent + w.peers[1].probes_sent;
    let end = w.at(60.0);
    w.run(end, |_| false);
    assert!(w.both_direct());
    let watch = w.peers[0].probes_sent + w.peers[1].probes_sent - before;
    assert!(watch <= 4, "{watch} probes on a busy direct path");
}

#[test]
fn direct_path_lost_falls_back_to_the_relay() {
    let mut w = direct_world(Scenario::default());
    let t0 = w.now;
    w.direct_blocked = true;
    let end = w.at(10.0);
    assert!(w.run(end, |w| w.both_relayed()), "still direct");
    let took = w.now - t0;
    println!("direct path lost: both on the relay after {} ms", took.total_millis());
    assert!(took <= Duration::from_millis(4000), "{took}");
    for i in 0..2 {
        let s = w.switches(i);
        let (_, path, lost) = *s.last().expect("switched");
        assert_eq!(path, Path::UdpRelay(relay()));
        assert!(lost);
        assert!(w.peers[i].paths.why().contains("lost"), "{}", w.peers[i].paths.why());
    }
    // The relay carries the session.
    let heard = w.peers[0].relayed_heard;
    let end = w.at(5.0);
    w.run(end, |_| false);
    assert!(w.peers[0].relayed_heard > heard + 50);
    // The direct path comes back: found again by a re-probe, a whole period after the fall
    // back, not sooner.
    w.direct_blocked = false;
    let back = w.now;
    let end = w.at(40.0);
    assert!(w.run(end, |w| w.both_direct()), "not direct again");
    let found = w.now - t0;
    println!("direct again {} ms after the loss", found.total_millis());
    assert!(found >= Duration::from_secs(30), "re-found after {found}");
    assert!(w.now - back <= Duration::from_secs(31));
}

#[test]
fn nat_rebinding_moves_the_path() {
    // Alice behind an address-restricted cone NAT; Bob's port-restricted NAT forgets its
    // mappings and picks new ports.
    let s = Scenario {
        nats: [NatKind::AddressRestricted, NatKind::PortRestricted],
        ..Default::default()
    };
    let mut w = direct_world(s);
    let old = match w.peers[0].paths.current() {
        Path::Direct { to, .. } => to,
        p => panic!("{p:?}"),
    };
    let t0 = w.now;
    w.peers[1].nat.rebind();
    let end = w.at(10.0);
    let moved = w.run(end, |w| {
        w.both_direct()
            && matches!(w.peers[0].paths.current(), Path::Direct { to, .. } if to != old)
    });
    assert!(moved, "alice still sends to {old}: {:?}", w.switches(0));
    let took = w.now - t0;
    let new = w.peers[0].paths.current();
    println!("NAT rebinding: alice moved from {old} to {new} after {} ms", took.total_millis());
    assert!(took <= Duration::from_secs(3), "{took}");
    assert!(w.peers[0].paths.why().contains("rebinding"), "{}", w.peers[0].paths.why());
    // No fall back was needed, and data flows on the new path.
    assert!(w.switches(0).iter().all(|(_, p, _)| matches!(p, Path::Direct { .. })));
    let heard = w.peers[0].data_heard;
    let end = w.at(5.0);
    w.run(end, |_| false);
    assert!(w.peers[0].data_heard > heard + 50);
    assert!(w.both_direct());
}

#[test]
fn nat_rebinding_behind_port_restricted_nats_falls_back_then_refinds() {
    // Both port-restricted: Bob's new mapping is filtered by Alice's NAT, so neither can
    // reach the other directly until Alice learns of it. The path falls back to the relay
    // (nothing ends) and a re-probe of fresh candidates finds it again.
    let mut w = direct_world(Scenario::default());
    let t0 = w.now;
    w.peers[1].nat.rebind();
    let end = w.at(10.0);
    assert!(w.run(end, |w| w.both_relayed()), "no fall back");
    println!("rebinding (port-restricted): relayed after {} ms", (w.now - t0).total_millis());
    // Bob's new reflexive address reaches Alice (e.g. through the server after a network
    // change): fresh candidates are searched at once.
    let bob_new =
        w.peers[1].nat.outbound(SocketAddr::new(w.peers[1].private, MAIN_PORT[1]), server());
    let now = w.now;
    w.peers[0].allowed.insert(bob_new);
    w.peers[0].paths.update_candidates(now, vec![bob_new]);
    let end = w.at(40.0);
    assert!(w.run(end, |w| w.both_direct()), "not direct again");
    println!("rebinding (port-restricted): direct again {} ms after", (w.now - t0).total_millis());
}

#[test]
fn relay_lost_changes_nothing() {
    // While direct: the relay's loss is not even noticed.
    let mut w = direct_world(Scenario::default());
    let events = [w.peers[0].events.len(), w.peers[1].events.len()];
    w.relay_down = true;
    let end = w.at(60.0);
    w.run(end, |_| false);
    assert!(w.both_direct());
    assert_eq!([w.peers[0].events.len(), w.peers[1].events.len()], events);

    // While relayed (symmetric NATs on both sides: no direct path, no birthday): no event
    // ends anything; binds go on every 10 s, so the relay is usable once it is back.
    let s = Scenario { nats: [NatKind::Symmetric; 2], ..Default::default() };
    let mut w = World::new(s);
    let end = w.at(10.0);
    w.run(end, |_| false);
    assert!(w.both_relayed());
    w.relay_down = true;
    let binds = w.peers[0].binds_sent;
    let end = w.at(60.0);
    w.run(end, |_| false);
    assert!(w.both_relayed());
    assert!(w.peers.iter().all(|p| p.events.is_empty()), "{:?}", w.peers[0].events);
    assert!(w.peers[0].binds_sent >= binds + 5);
    w.relay_down = false;
    let heard = w.peers[0].relayed_heard;
    let end = w.at(12.0);
    w.run(end, |_| false);
    assert!(w.peers[0].relayed_heard > heard + 10, "the relay did not resume");
    for p in &w.peers {
        assert!(p.paths.why().contains("no direct path"), "{}", p.paths.why());
    }
}

#[test]
fn five_minute_outage() {
    let mut w = direct_world(Scenario::default());
    let t0 = w.now;
    let probes = [w.peers[0].probes_sent, w.peers[1].probes_sent];
    w.down = true;
    let end = w.at(300.0);
    w.run(end, |_| false);
    // Fell back once (nothing in the machine ends a session), kept binding and probing
    // within the budget.
    for (i, p) in w.peers.iter().enumerate() {
        let s = w.switches(i);
        assert_eq!(s.len(), 2, "side {i}: {s:?}"); // found, then lost
        assert!(s[1].2 && s[1].0 - t0 <= Duration::from_secs(4));
        let n = p.probes_sent - probes[i];
        println!("5-minute outage: side {i} sent {n} probes, {} binds", p.binds_sent);
        // One re-probe burst of 50 rounds × candidates every ~35 s, plus the watch.
        assert!(n <= 10 * 50 * 2 + 20, "{n} probes during the outage");
        assert!(p.events.iter().all(|(_, e)| matches!(e, PathEvent::Switched { .. })));
    }
    w.down = false;
    let back = w.now;
    let end = w.at(40.0);
    assert!(w.run(end, |w| w.both_direct()), "not direct after the outage");
    let took = w.now - back;
    println!("after a 5-minute outage: direct again {} ms after it ended", took.total_millis());
    assert!(took <= Duration::from_secs(36));
}

#[test]
fn idle_direct_path_stays_direct() {
    let s = Scenario { data_every: Duration::from_secs(10), ..Default::default() };
    let mut w = direct_world(s);
    let probes = w.peers[0].probes_sent + w.peers[1].probes_sent;
    let end = w.at(120.0);
    w.run(end, |_| false);
    assert!(w.both_direct());
    assert_eq!(w.switches(0).len(), 1);
    let n = w.peers[0].probes_sent + w.peers[1].probes_sent - probes;
    println!("idle direct path, 2 minutes: {n} watch probes and replies");
    assert!(n <= 2 * 2 * 14, "{n}");
}

#[test]
fn birthday_cone_to_symmetric() {
    let mut times = Vec::new();
    for seed in 1..=20 {
        let s = Scenario {
            nats: [NatKind::PortRestricted, NatKind::Symmetric],
            seed,
            ..Default::default()
        };
        let mut w = World::new(s);
        assert!(w.run(Instant::from_secs(20), |w| w.both_direct()), "seed {seed}: no direct path");
        times.push(w.now.total_millis());
        let sent = w.datagrams();
        assert!(sent <= 2500 + 256 * 48 + 200, "seed {seed}: {sent} datagrams");
        // Bob (symmetric) keeps only the winning socket; Alice sends from her main one.
        assert!(matches!(
            w.peers[1].paths.current(),
            Path::Direct { socket: Socket::Birthday(_), .. }
        ));
        assert!(matches!(w.peers[0].paths.current(), Path::Direct { socket: Socket::Main, .. }));
        assert_eq!(w.peers[1].birthday.len(), 1);
        assert!(w.peers[0].paths.why().contains("birthday"), "{}", w.peers[0].paths.why());
        let end = w.at(10.0);
        let heard = w.peers[1].data_heard;
        w.run(end, |_| false);
        assert!(w.both_direct() && w.peers[1].data_heard > heard + 100, "seed {seed}");
        if seed == 1 {
            println!("birthday seed 1: {sent} datagrams to direct");
        }
    }
    times.sort();
    println!(
        "birthday cone<->symmetric over 20 seeds: direct after {}..{} ms (median {})",
        times[0], times[19], times[10]
    );
    assert!(times[19] <= 8000, "{times:?}");
}

#[test]
fn symmetric_to_symmetric_stays_relayed_within_budget() {
    let s = Scenario { nats: [NatKind::Symmetric; 2], ..Default::default() };
    let mut w = World::new(s);
    let end = w.at(600.0);
    w.run(end, |_| false);
    assert!(w.both_relayed());
    for p in &w.peers {
        println!("symmetric<->symmetric, 10 min: {} probes", p.probes_sent);
        assert!(p.probes_sent <= 16384 + 8 * 600);
        assert!(p.birthday.is_empty());
    }
}

#[test]
fn strangers_candidates_are_never_probed() {
    // The peer named a third party among its candidates; the caller's filter dropped it,
    // and the machine never sends it anything (the harness asserts every probe's target).
    let third = SocketAddr::new(ip(192, 0, 2, 99), 22);
    let s = Scenario { extra_candidates: vec![third], ..Default::default() };
    let mut w = World::new(s);
    assert!(!w.peers[0].allowed.contains(&third));
    let end = w.at(60.0);
    w.run(end, |_| false);
    assert!(w.both_direct());
    // A forged probe from the third party: no reply, no move.
    let forged = probe::ProbeKey::new(&[1; 16]).encode(false, SESSION, 1, Role::Callee);
    let now = w.now;
    assert!(!w.peers[0].paths.handle_probe(now, Socket::Main, third, &forged));
    assert!(w.peers[0].paths.poll_transmit(now).is_none());
    assert_eq!(w.peers[0].paths.stats().rejected, 1);
}

#[test]
fn relay_only_session_sends_only_binds() {
    // Bob is a stranger to Alice: her end is relay-only. His probes reach her and are
    // ignored; she sends nothing but relay binds.
    let s = Scenario { direct_allowed: [false, true], ..Default::default() };
    let mut w = World::new(s);
    let end = w.at(120.0);
    w.run(end, |_| false);
    assert!(w.both_relayed());
    let a = &w.peers[0];
    assert_eq!(a.probes_sent, 0);
    assert_eq!(a.paths.stats().probes, 0);
    assert!(a.binds_sent >= 12 && a.binds_sent <= 13, "{}", a.binds_sent);
    assert!(a.events.is_empty());
    assert!(a.paths.why().contains("relay only"), "{}", a.paths.why());
    println!(
        "relay-only, 2 minutes: {} binds, 0 probes; the peer sent {} probes",
        a.binds_sent, w.peers[1].probes_sent
    );
}

#[test]
fn the_peer_moving_to_the_relay_is_followed() {
    // Alice → Bob dies one way (a mapping gone on Bob's side): Bob hears nothing, probes,
    // gets no answer and falls back; Alice still hears Bob directly, but his datagrams now
    // arrive through the relay, and she follows at once instead of waiting for silence.
    let mut w = direct_world(Scenario::default());
    let t0 = w.now;
    w.one_way_blocked = Some((w.peers[0].nat.public, w.peers[1].nat.public));
    let end = w.at(10.0);
    assert!(w.run(end, |w| w.both_relayed()), "not relayed");
    let took = w.now - t0;
    println!("one side gave up: both relayed after {} ms", took.total_millis());
    assert!(took <= Duration::from_secs(4), "{took}");
    assert!(w.peers[0].paths.why().contains("moved to the relay"), "{}", w.peers[0].paths.why());
    assert!(w.peers[1].paths.why().contains("no answer"), "{}", w.peers[1].paths.why());
}

/// Two machines wired back to back (no NAT): everything one sends to the other's
/// addresses arrives, from the family's address of the sender, unless that family is cut,
/// after the family's one-way delay (`delay_ms`: IPv4, IPv6; 1 ms unless set), give or take
/// up to `jitter_ms` (drawn from a seeded generator). Counts the transmits each handed out,
/// by destination family.
struct DualStack {
    paths: [Paths; 2],
    v4: [SocketAddr; 2],
    v6: [SocketAddr; 2],
    v6_works: bool,
    delay_ms: [i64; 2],
    jitter_ms: [i64; 2],
    air: Vec<(i64, usize, SocketAddr, [u8; probe::LEN])>,
    rng: Rng,
    sent: [(u64, u64); 2],
    switches: [Vec<(i64, Path)>; 2],
}

impl DualStack {
    fn new(v6_works: bool) -> DualStack {
        let v4 =
            [SocketAddr::new(ip(203, 0, 113, 1), 4000), SocketAddr::new(ip(198, 51, 100, 2), 5000)];
        let v6: [SocketAddr; 2] =
            ["[2001:db8:1::2]:4000".parse().unwrap(), "[2001:db8:2::2]:5000".parse().unwrap()];
        let now = Instant::from_millis(0);
        let paths = [0, 1].map(|i| {
            let j = 1 - i;
            Paths::new(
                now,
                Config::default(),
                Setup {
                    session: SESSION,
                    role: if i == 0 { Role::Caller } else { Role::Callee },
                    key: KEY,
                    relay: RelayPath::Udp(relay()),
                    // IPv4 listed first: the machine orders them itself.
                    candidates: vec![v4[j], v6[j]],
                    nat: NatFacts::default(),
                    direct_allowed: true,
                    seed: i as u64,
                },
            )
        });
        DualStack {
            paths,
            v4,
            v6,
            v6_works,
            delay_ms: [1, 1],
            jitter_ms: [0, 0],
            air: Vec::new(),
            rng: Rng::new(7),
            sent: [(0, 0); 2],
            switches: [vec![], vec![]],
        }
    }

    /// When a datagram of this family launched at `t` arrives.
    fn arrival(&mut self, t: i64, v6: bool) -> i64 {
        let f = usize::from(v6);
        let j = self.jitter_ms[f];
        let jitter = (self.rng.next_u64() % (2 * j as u64 + 1)) as i64 - j;
        t + (self.delay_ms[f] + jitter).max(1)
    }

    /// The paths of side `i`, in the order taken.
    fn paths_taken(&self, i: usize) -> Vec<Path> {
        self.switches[i].iter().map(|(_, p)| *p).collect()
    }

    /// Run `ms` milliseconds in 1 ms steps; datagrams arrive after their family's delay.
    fn run(&mut self, from_ms: i64, ms: i64) {
        for t in from_ms..from_ms + ms {
            let now = Instant::from_millis(t);
            let (due, later) = std::mem::take(&mut self.air).into_iter().partition(|a| a.0 <= t);
            self.air = later;
            let due: Vec<_> = due;
            for (_, to_side, from, data) in due {
                self.paths[to_side].handle_probe(now, Socket::Main, from, &data);
            }
            // Session data every 50 ms along each side's path (liveness for the other).
            if t % 50 == 0 {
                for i in 0..2 {
                    if let Path::Direct { to, .. } = self.paths[i].current() {
                        let from = if to.is_ipv6() { self.v6[i] } else { self.v4[i] };
                        if to.is_ipv4() || self.v6_works {
                            self.paths[1 - i].handle_datagram(now, Socket::Main, from);
                        }
                    }
                }
            }
            for i in 0..2 {
                let p = &mut self.paths[i];
                if p.poll_timeout().is_some_and(|d| d <= now) {
                    p.handle_timeout(now);
                }
                while let Some(ev) = p.poll_event() {
                    if let PathEvent::Switched { path, lost } = ev {
                        assert!(!lost, "no path died here");
                        self.switches[i].push((t, path));
                    }
                }
                while let Some(tx) = self.paths[i].poll_transmit(now) {
                    let Payload::Probe(data) = tx.payload else { continue };
                    let j = 1 - i;
                    if tx.to == self.v6[j] {
                        self.sent[i].1 += 1;
                        if self.v6_works {
                            let at = self.arrival(t, true);
                            self.air.push((at, j, self.v6[i], data));
                        }
                    } else if tx.to == self.v4[j] {
                        self.sent[i].0 += 1;
                        let at = self.arrival(t, false);
                        self.air.push((at, j, self.v4[i], data));
                    } else {
                        panic!("a probe to {} that is no candidate", tx.to);
                    }
                }
            }
        }
    }
}

#[test]
fn ipv6_is_preferred_when_both_families_work() {
    let mut w = DualStack::new(true);
    w.run(0, 8000);
    for i in 0..2 {
        let j = 1 - i;
        assert_eq!(w.paths[i].current(), Path::Direct { to: w.v6[j], socket: Socket::Main });
        assert!(
            w.paths[i].why().contains("IPv6") || w.switches[i].len() == 1,
            "{}",
            w.paths[i].why()
        );
    }
    println!("both families work: {:?}, probes (v4, v6) {:?}", w.switches, w.sent);
}

#[test]
fn ipv4_found_first_moves_to_ipv6_when_it_answers() {
    // IPv6 cut at first: both go direct over IPv4 and keep probing IPv6 only; once it
    // works, both move there without losing anything.
    let mut w = DualStack::new(false);
    w.run(0, 1000);
    for i in 0..2 {
        assert_eq!(w.paths[i].current(), Path::Direct { to: w.v4[1 - i], socket: Socket::Main });
    }
    let v4_before = [w.sent[0].0, w.sent[1].0];
    w.v6_works = true;
    w.run(1000, 1000);
    for i in 0..2 {
        let j = 1 - i;
        assert_eq!(w.paths[i].current(), Path::Direct { to: w.v6[j], socket: Socket::Main });
        assert!(w.paths[i].why().contains("preferred to the IPv4 path"), "{}", w.paths[i].why());
        assert_eq!(w.switches[i].len(), 2, "{:?}", w.switches[i]);
        // While direct over IPv4, only IPv6 candidates were probed (replies aside).
        assert!(w.sent[i].0 <= v4_before[i] + 2, "{:?} {:?}", w.sent, v4_before);
    }
}

#[test]
fn ipv6_search_while_direct_ends_with_the_search() {
    // IPv6 never works: the IPv6 probes while direct over IPv4 stop when the search
    // would have ended (50 rounds), and IPv4 stays.
    let mut w = DualStack::new(false);
    w.run(0, 20000);
    for i in 0..2 {
        assert_eq!(w.paths[i].current(), Path::Direct { to: w.v4[1 - i], socket: Socket::Main });
        let (_, v6) = w.sent[i];
        assert!((40..=51).contains(&v6), "IPv6 probes: {v6}");
    }
    let at = w.sent;
    w.run(20000, 10000);
    assert_eq!([w.sent[0].1, w.sent[1].1], [at[0].1, at[1].1], "no IPv6 probe after the search");
}

#[test]
fn ipv4_wins_when_clearly_faster() {
    // IPv4 10 ms there and back, IPv6 80 ms: IPv4 is under IPv6 by more than max(10 ms,
    // 25%), so both sides stay on IPv4 (one switch each: relay to direct IPv4), and the
    // IPv6 search spends no more probes than when IPv6 wins.
    let mut w = DualStack::new(true);
    w.delay_ms = [5, 40];
    w.run(0, 8000);
    for i in 0..2 {
        let j = 1 - i;
        assert_eq!(w.paths_taken(i), [Path::Direct { to: w.v4[j], socket: Socket::Main }]);
        assert!(w.paths[i].why().contains("clearly below IPv6's"), "{}", w.paths[i].why());
        // The search's 50 rounds over IPv6, and a reply to each of the peer's: what the
        // search costs when IPv6 never answers, plus the replies.
        let (_, v6) = w.sent[i];
        assert!((50..=102).contains(&v6), "IPv6 probes: {v6}");
    }
    println!("IPv4 clearly faster: {}; probes (v4, v6) {:?}", w.paths[0].why(), w.sent);
}

#[test]
fn ipv6_wins_when_ipv4_is_only_a_little_faster() {
    // IPv4 40 ms there and back, IPv6 50 ms: under by 10 ms, not by more than 25% of 50 ms
    // (12.5 ms): IPv6, the preferred family, wins.
    let mut w = DualStack::new(true);
    w.delay_ms = [20, 25];
    w.run(0, 8000);
    for i in 0..2 {
        let j = 1 - i;
        assert_eq!(w.paths[i].current(), Path::Direct { to: w.v6[j], socket: Socket::Main });
        assert!(w.paths_taken(i).len() <= 2, "{:?}", w.switches[i]);
    }
    println!("IPv4 a little faster: {:?}", w.switches);
}

#[test]
fn ipv4_kept_for_its_speed_yields_only_past_the_hysteresis_band() {
    // IPv4 20 ms there and back, IPv6 60 ms: IPv4 kept. Then IPv6 improves to 28 ms: not
    // clearly slower any more (20 + 10 >= 28), but still within the band (20 + 5 < 28):
    // IPv4 stays. Then IPv6 falls to 12 ms: past the band, and after the hold, both move
    // to IPv6, once.
    let mut w = DualStack::new(true);
    w.delay_ms = [10, 30];
    w.run(0, 1000);
    for i in 0..2 {
        let j = 1 - i;
        assert_eq!(w.paths_taken(i), [Path::Direct { to: w.v4[j], socket: Socket::Main }]);
    }
    w.delay_ms = [10, 14];
    w.run(1000, 2500);
    for i in 0..2 {
        assert_eq!(w.paths_taken(i).len(), 1, "inside the band: {:?}", w.switches[i]);
        assert!(w.paths[i].why().contains("clearly below"), "{}", w.paths[i].why());
    }
    w.delay_ms = [10, 6];
    w.run(3500, 2000);
    for i in 0..2 {
        let j = 1 - i;
        assert_eq!(
            w.paths_taken(i),
            [
                Path::Direct { to: w.v4[j], socket: Socket::Main },
                Path::Direct { to: w.v6[j], socket: Socket::Main }
            ]
        );
        assert!(w.paths[i].why().contains("no longer clearly above"), "{}", w.paths[i].why());
    }
    println!("IPv4 kept, then IPv6 past the band: {:?}", w.switches);
}

#[test]
fn round_trips_wobbling_around_the_threshold_do_not_flap() {
    // IPv4 20 ms there and back, IPv6 60 ms: IPv4 kept. Then IPv6 wobbles between 24 and
    // 36 ms, around the 30 ms where IPv4 stops being clearly faster (20 + max(10, 25%)),
    // but above the band's 25 ms: through the rest of the search, and a second search
    // after a network change, neither side moves.
    let mut w = DualStack::new(true);
    w.delay_ms = [10, 30];
    w.run(0, 500);
    w.delay_ms = [10, 15];
    w.jitter_ms = [0, 3];
    w.run(500, 7500);
    for i in 0..2 {
        let j = 1 - i;
        let candidates = vec![w.v4[j], w.v6[j]];
        w.paths[i].update_candidates(Instant::from_millis(8000), candidates);
    }
    let before = w.sent;
    w.run(8000, 8000);
    for (i, before) in before.iter().enumerate() {
        let j = 1 - i;
        assert_eq!(w.paths_taken(i), [Path::Direct { to: w.v4[j], socket: Socket::Main }]);
        assert!(w.paths[i].why().contains("clearly below"), "{}", w.paths[i].why());
        assert!(w.sent[i].1 >= before.1 + 50, "the second search probed IPv6: {:?}", w.sent);
    }
    println!("wobbling round trips: {:?}; probes (v4, v6) {:?}", w.switches, w.sent);
}

#[test]
fn found_over_ipv6_by_the_peers_probe_moves_to_a_clearly_faster_ipv4() {
    // The peer's IPv6 probe arrives first (no round trip known), then the replies to our
    // first round: IPv4 after 10 ms, IPv6 after 80 ms. Once both are measured, IPv4 is
    // clearly faster and the path moves there, once.
    let v4: SocketAddr = "198.51.100.2:5000".parse().unwrap();
    let v6: SocketAddr = "[2001:db8:2::2]:5000".parse().unwrap();
    let key = probe::ProbeKey::new(&KEY);
    let mut a = Paths::new(
        Instant::from_millis(0),
        Config::default(),
        Setup {
            session: SESSION,
            role: Role::Caller,
            key: KEY,
            relay: RelayPath::Udp(relay()),
            candidates: vec![v4, v6],
            nat: NatFacts::default(),
            direct_allowed: true,
            seed: 1,
        },
    );
    let t = Instant::from_millis;
    a.handle_timeout(t(0));
    let mut ours = None;
    while let Some(tx) = a.poll_transmit(t(0)) {
        if let Payload::Probe(d) = tx.payload {
            ours = key.verify(&d, Role::Caller).map(|p| p.nonce);
        }
    }
    let nonce = ours.expect("a first round");
    let theirs = key.encode(false, SESSION, 1, Role::Callee);
    assert!(a.handle_probe(t(1), Socket::Main, v6, &theirs));
    assert_eq!(a.current(), Path::Direct { to: v6, socket: Socket::Main });
    let reply = key.encode(true, SESSION, nonce, Role::Callee);
    assert!(a.handle_probe(t(10), Socket::Main, v4, &reply));
    assert_eq!(a.current(), Path::Direct { to: v6, socket: Socket::Main }, "IPv6 not measured");
    assert!(a.handle_probe(t(80), Socket::Main, v6, &reply));
    assert_eq!(a.current(), Path::Direct { to: v4, socket: Socket::Main });
    assert!(a.why().contains("clearly below IPv6's"), "{}", a.why());
    // A late IPv6 sample within the hold changes nothing.
    assert!(a.handle_probe(t(90), Socket::Main, v6, &reply));
    assert_eq!(a.current(), Path::Direct { to: v4, socket: Socket::Main });
    let switches = std::iter::from_fn(|| a.poll_event())
        .filter(|e| matches!(e, PathEvent::Switched { .. }))
        .count();
    assert_eq!(switches, 2, "relay to IPv6, IPv6 to IPv4");
}

#[test]
fn a_relay_given_again_is_bound_at_once_and_carries_a_relayed_session() {
    // A relayed session whose server restarted: its leg is given again. The machine binds
    // it at once and keeps binding it. At the same relay the path stays (no event: only
    // the framing changes); a relay at another address moves the session (not as a loss).
    let setup = |direct_allowed| Setup {
        session: SESSION,
        role: Role::Caller,
        key: KEY,
        relay: RelayPath::Udp(relay()),
        candidates: Vec::new(),
        nat: NatFacts::default(),
        direct_allowed,
        seed: 1,
    };
    let t = Instant::from_millis;
    let mut a = Paths::new(t(0), Config::default(), setup(false));
    a.handle_timeout(t(0));
    while a.poll_transmit(t(0)).is_some() {}
    while a.poll_event().is_some() {}
    let binds = |a: &mut Paths, now, to| {
        std::iter::from_fn(|| a.poll_transmit(now))
            .filter(|tx| tx.payload == Payload::RelayBind && tx.to == to)
            .count()
    };
    a.set_relay(t(2), RelayPath::Udp(relay()));
    assert_eq!(binds(&mut a, t(2), relay()), 1, "bound at once");
    assert_eq!(a.poll_event(), None, "the same relay: the path stays");
    assert_eq!(a.current(), Path::UdpRelay(relay()));
    let moved = SocketAddr::new(ip(192, 0, 2, 9), 3479);
    a.set_relay(t(5), RelayPath::Udp(moved));
    assert_eq!(a.relay(), RelayPath::Udp(moved));
    assert_eq!(a.current(), Path::UdpRelay(moved));
    assert_eq!(binds(&mut a, t(5), moved), 1, "bound at once");
    let switched = PathEvent::Switched { path: Path::UdpRelay(moved), lost: false };
    assert_eq!(a.poll_event(), Some(switched));
    let every = Config::default().relay_bind_every;
    let next = t(5) + every;
    assert_eq!(a.poll_timeout(), Some(next));
    a.handle_timeout(next);
    assert_eq!(binds(&mut a, next, moved), 1, "and again every {every:?}");
    // Over the control connection: no UDP binds.
    a.set_relay(next, RelayPath::Control);
    assert_eq!(a.current(), Path::ControlRelay);
    assert_eq!(binds(&mut a, next, moved), 0);
}
