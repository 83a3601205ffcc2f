//! TUN mode of the daemon: the `q2q0` device, the `*.q2q` resolver shim and the driver that
//! turns apps' connections to virtual addresses into q2q streams.
//!
//! ```text
//!  app: ssh alice.q2q ──DNS──▶ shim on 100.64.0.1:53 ── alice@example.com ↔ 100.64.0.2
//!    │ connect 100.64.0.2:22
//!    ▼
//!  q2q0 (tun-rs) ──IP packets──▶ driver task ──▶ netstack::tun::Stack (smoltcp, any_ip)
//!                                    │ Connect{flow, 100.64.0.2:22}: SYN held
//!                                    ▼
//!                  flow task: whois 100.64.0.2 = alice ─▶ Node::connect(alice, tcp/22)
//!                                    │ accepted: accept_flow (SYN-ACK) / refused: RST
//!                                    ▼
//!                  driver: Splice(flow ⇄ the peer stream's pipes), no task in between
//! ```
//!
//! One task owns the stack ([`Driver`]). It reads each large packet from `q2q0` into a
//! buffer of the stack's pool, which smoltcp then consumes in place (no copy on the way in).
//! An accepted flow is joined to its peer stream with a [`Splice`]: the driver copies the app's bytes from the stack straight into the peer
//! stream's bounded pipe and back, and the PTCP driver takes them from there (one copy
//! between the two stacks, backpressure both ways). Everything else reaches the driver
//! through a bounded command channel. UDP to a virtual address goes to service
//! `udp/<port>` ([`super::datagram`]), and an ICMP echo is answered only after a round trip
//! to the peer's `ping` service, so `ping alice.q2q` tells the truth.
//!
//! Routes: the device gets the pool's node addresses with the pool prefixes, so the only
//! routes are the pool's connected routes; never a default route, no firewall rules. The
//! device is not persistent: it vanishes with the process, also when it is killed.

use super::datagram;
use super::platform::{device, resolver};
use crate::address::{Q2qAddress, ServiceName};
use crate::client::Home;
use crate::dns::names::Names;
use crate::dns::pool::{Pool, PoolConfig};
use crate::dns::server::{self as dns_server, Lookup, ServerConfig, SharedShim};
use crate::dns::shim::{Existence, Exists, Shim, ShimConfig};
use crate::pipe::{DriverWake, IoError, Pipes, Splice, SpliceState, StreamIo};
use crate::presence::node::{Connection, Node};
use crate::ptcp::StreamKey;
use q2q_netstack::tun::{Config as StackConfig, Echo, Event, FlowError, FlowId, Quote, Stack};
use q2q_netstack::tun::{Ipv4Cidr, Ipv6Cidr};
use q2q_netstack::tun::{PartialChecksum, RxChecksum};
use std::collections::HashMap;
use std::io::{IoSlice, IoSliceMut};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};

/// Settings of TUN mode.
#[derive(Debug, Clone)]
pub struct TunConfig {
    /// Device name (default `q2q0`).
    pub name: String,
    /// Virtual address pool.
    pub pool: PoolConfig,
    /// How to hook the shim into the system resolver.
    pub dns: resolver::Wanted,
    /// IP MTU of the device (default 65535). TCP to a virtual address ends in this
    /// process, so the MTU never meets a real link: the largest one lets the kernel and
    /// smoltcp exchange 64 KiB segments, and the per-packet costs (a read or write, a
    /// parse, a checksum) fall about 45-fold. In the lab this alone took iperf3 through
    /// the overlay from 1.5 to 2.7 Gbit/s.
    pub mtu: u16,
    /// Checksum and TCP segmentation offload on the device (default on; a kernel without
    /// it gets a plain device): the app's kernel and this daemon stop summing every byte
    /// they pass each other, and the kernel hands over an app's writes in packets of up
    /// to 64 KiB without cutting them to the MSS first. `q2q-tun up --no-tun-offload`
    /// turns it off.
    pub offload: bool,
}

impl Default for TunConfig {
    fn default() -> Self {
        TunConfig {
            name: "q2q0".into(),
            pool: PoolConfig::default(),
            dns: resolver::Wanted::Auto,
            mtu: 65535,
            offload: true,
        }
    }
}

/// Why TUN mode could not start.
#[derive(Debug, thiserror::Error)]
pub enum TunError {
    /// Creating a TUN device needs CAP_NET_ADMIN.
    #[error(
        "q2q-tun up needs CAP_NET_ADMIN to create the TUN device {0} (and CAP_NET_BIND_SERVICE \
         for the resolver shim's port 53), which this process lacks: run `sudo q2q-tun up`, or \
         grant them once with `sudo setcap cap_net_admin,cap_net_bind_service+ep \
         $(command -v q2q-tun)`; `q2q-tun up --no-tun` runs without the device (no `ssh \
         alice.q2q`; ping, send and connect work)"
    )]
    NeedCapNetAdmin(String),
    /// The device could not be created.
    #[error("cannot create the TUN device {0}: {1}")]
    Device(String, std::io::Error),
    /// The pool settings are unusable.
    #[error("address pool: {0}")]
    Pool(#[from] crate::dns::pool::PoolError),
    /// The resolver shim could not bind its address.
    #[error("resolver shim on {0}: {1}")]
    Dns(SocketAddr, std::io::Error),
    /// The system resolver could not be pointed at the shim.
    #[error("system resolver: {0}")]
    Resolver(#[from] resolver::ResolverError),
}

/// A running TUN mode; [`Running::stop`] undoes what [`start`] changed.
pub struct Running {
    stop: Option<oneshot::Sender<()>>,
    driver: tokio::task::JoinHandle<()>,
    dns: tokio::task::JoinHandle<()>,
    saver: tokio::task::JoinHandle<()>,
    shim: SharedShim<Oracle>,
    pool_file: PathBuf,
    resolver: resolver::Paths,
    /// Puts our resolv.conf line back when someone rewrites the file (resolv-conf mode).
    keeper: Mutex<Option<resolver::Keeper>>,
    /// What the status shows: device, node address, resolver mode.
    pub summary: String,
    /// The device's name.
    pub device: String,
    /// Where the resolver shim answers.
    pub dns_addr: SocketAddr,
}

/// The file that keeps the virtual address mappings across restarts.
pub fn pool_file(home: &Home) -> PathBuf {
    home.root().join("pool.toml")
}

/// The resolver paths of this daemon (its state lives in `$Q2Q_HOME`).
pub fn resolver_paths(home: &Home) -> resolver::Paths {
    resolver::Paths::system(home.root())
}

/// Create the device, serve the shim, point the system resolver at it and start the driver.
pub async fn start(node: Node, home: &Home, config: TunConfig) -> Result<Running, TunError> {
    config.pool.check()?;
    let paths = resolver_paths(home);
    let pool_file = pool_file(home);
    let pool = load_pool(&pool_file, &config.pool)?;
    let node_v4 = pool.node_ipv4();
    let node_v6 = pool.node_ipv6();

    let created = device::create(&device::DeviceConfig {
        name: &config.name,
        ipv4: (node_v4, config.pool.ipv4.prefix_len()),
        ipv6: (node_v6, config.pool.ipv6.prefix_len()),
        mtu: config.mtu,
        offload: config.offload,
    })?;

    let oracle = Oracle { node: node.clone(), cache: Arc::new(Mutex::new(HashMap::new())) };
    let shim: SharedShim<Oracle> = Arc::new(Mutex::new(Shim::new(
        Names::new(node.address().domain.clone()),
        pool,
        oracle.clone(),
        ShimConfig::default(),
    )));
    let dns_addr = SocketAddr::from((node_v4, 53));
    let server = dns_server::Server::bind(dns_addr, shim.clone(), oracle, ServerConfig::default())
        .await
        .map_err(|e| TunError::Dns(dns_addr, e))?;
    let dns = tokio::spawn(async move {
        if let Err(e) = server.run().await {
            warn!(error = %e, "resolver shim stopped");
        }
    });
    // `install` first repairs what a daemon killed earlier left in the resolver settings.
    let mode = resolver::install(&paths, config.dns, &config.name, IpAddr::V4(node_v4)).await?;
    // The daemon's own look-ups of domain servers never ask the shim (they would wait on
    // themselves); they read the resolv.conf really in force.
    crate::client::discover::use_system_resolver(
        resolver::live_file(&paths),
        vec![IpAddr::V4(node_v4), IpAddr::V6(node_v6)],
    );
    let keeper = match resolver::keep(&paths) {
        Ok(k) => k,
        Err(e) => {
            warn!(error = %e, "resolv.conf is not watched: a rewrite by someone else stays until `down` and `up`");
            None
        }
    };

    let stack_config = StackConfig {
        pool_v4: Ipv4Cidr::new(config.pool.ipv4.network(), config.pool.ipv4.prefix_len()),
        pool_v6: Some(Ipv6Cidr::new(config.pool.ipv6.network(), config.pool.ipv6.prefix_len())),
        mtu: usize::from(config.mtu),
        random_seed: rand::random(),
        checksum_offload: created.vnet,
        ..StackConfig::default()
    };
    let (stop_tx, stop_rx) = oneshot::channel();
    let (cmd_tx, cmd_rx) = mpsc::channel(1024);
    let ctx = Arc::new(Ctx { node, shim: shim.clone(), cmds: cmd_tx });
    let offload = if created.vnet { "offload" } else { "no offload" };
    let driver = Driver::new(Tun(created), stack_config, ctx, cmd_rx);
    let driver = tokio::spawn(driver.run(stop_rx));
    let saver = tokio::spawn(save_pool_every(shim.clone(), pool_file.clone()));
    let summary = format!(
        "TUN {} {node_v4}/{} {node_v6}/{} ({offload}); resolver shim {dns_addr} ({mode})",
        config.name,
        config.pool.ipv4.prefix_len(),
        config.pool.ipv6.prefix_len()
    );
    info!(device = %config.name, %node_v4, %node_v6, %mode, offload, "TUN mode up");
    Ok(Running {
        stop: Some(stop_tx),
        driver,
        dns,
        saver,
        shim,
        pool_file,
        resolver: paths,
        keeper: Mutex::new(keeper),
        summary,
        device: config.name,
        dns_addr,
    })
}

impl Running {
    /// Who is behind a virtual address.
    pub fn whois(&self, ip: IpAddr) -> Option<Q2qAddress> {
        dns_server::lock(&self.shim).pool().whois(ip).cloned()
    }

    /// Restore the resolver and save the pool now (when [`Running::stop`] cannot be used);
    /// the device goes when the process ends.
    pub async fn restore_now(&self) {
        self.restore_resolver().await;
        save_pool(&self.shim, &self.pool_file, true);
    }

    /// Restore the resolver, save the pool, and remove the device (closing it does).
    pub async fn stop(mut self) {
        self.restore_resolver().await;
        self.dns.abort();
        self.saver.abort();
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        let _ = (&mut self.driver).await;
        save_pool(&self.shim, &self.pool_file, true);
    }

    /// Stop watching resolv.conf, then undo the resolver settings (failures are logged).
    async fn restore_resolver(&self) {
        // The watch ends first: nothing may put our line back after the restore.
        let keeper = self.keeper.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(k) = keeper {
            k.stop();
        }
        if let Err(e) = resolver::restore(&self.resolver).await {
            warn!(error = %e, "could not restore the resolver settings");
        }
    }
}

/// Load saved mappings; a file that does not parse is kept aside (never lost) and the pool
/// starts empty.
fn load_pool(path: &std::path::Path, config: &PoolConfig) -> Result<Pool, TunError> {
    match std::fs::read_to_string(path) {
        Ok(text) => match Pool::from_toml(config.clone(), &text) {
            Ok(p) => Ok(p),
            Err(e) => {
                let aside = path.with_extension(format!(
                    "toml.bad-{}",
                    SystemTime::now()
                        .duration_since(SystemTime::UNIX_EPOCH)
                        .map(|d| d.as_secs())
                        .unwrap_or(0)
                ));
                warn!(file = %path.display(), kept = %aside.display(), error = %e, "unusable pool file kept aside; starting with an empty pool");
                let _ = std::fs::rename(path, &aside);
                Ok(Pool::new(config.clone())?)
            }
        },
        Err(_) => Ok(Pool::new(config.clone())?),
    }
}

/// Write the pool atomically if it changed (or `always`).
fn save_pool(shim: &SharedShim<Oracle>, path: &std::path::Path, always: bool) {
    let text = {
        let mut s = dns_server::lock(shim);
        let dirty = s.pool_mut().take_dirty();
        if !dirty && !always {
            return;
        }
        s.pool().to_toml()
    };
    if let Err(e) = crate::fsutil::write_atomic(path, text.as_bytes(), 0o600) {
        warn!(file = %path.display(), error = %e, "could not save the address pool");
    }
}

async fn save_pool_every(shim: SharedShim<Oracle>, path: PathBuf) {
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    loop {
        tick.tick().await;
        let (shim, path) = (shim.clone(), path.clone());
        let _ = tokio::task::spawn_blocking(move || save_pool(&shim, &path, false)).await;
    }
}

/// Whether a person exists, for the shim: asked of their domain server, remembered briefly.
/// The shim reads the memory ([`Exists`], under its lock); the DNS server asks the network
/// ([`Lookup`], with no lock held) and the answer is remembered here.
#[derive(Clone)]
pub struct Oracle {
    node: Node,
    cache: Arc<Mutex<HashMap<Q2qAddress, (Existence, Instant)>>>,
}

/// How long an answer about existence is remembered (a new registration shows up after the
/// negative one expires).
const KNOWN_FOR: Duration = Duration::from_secs(300);
const UNKNOWN_FOR: Duration = Duration::from_secs(5);
/// Answers remembered at most (then the memory starts afresh).
const MAX_REMEMBERED: usize = 10_000;

impl Oracle {
    fn cache(&self) -> std::sync::MutexGuard<'_, HashMap<Q2qAddress, (Existence, Instant)>> {
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Exists for Oracle {
    fn exists(&mut self, address: &Q2qAddress) -> Existence {
        if self.node.address() == address {
            return Existence::Known;
        }
        if let Some((e, at)) = self.cache().get(address) {
            let fresh = if *e == Existence::Known { KNOWN_FOR } else { UNKNOWN_FOR };
            if at.elapsed() < fresh {
                return *e;
            }
        }
        Existence::Ask
    }
}

impl Lookup for Oracle {
    async fn lookup(&self, address: &Q2qAddress) -> Existence {
        // The DNS server bounds the wait (ServerConfig::lookup_timeout).
        let e = match self.node.exists(address).await {
            Ok(true) => Existence::Known,
            Ok(false) => Existence::Unknown,
            Err(e) => {
                debug!(%address, error = %e, "existence unknown");
                // No server for that domain (no such domain) is as good as no such user.
                if matches!(
                    e,
                    crate::presence::node::NodeError::Control(
                        crate::client::ClientError::Unreachable { .. }
                    )
                ) {
                    Existence::Unknown
                } else {
                    Existence::Unsure
                }
            }
        };
        if e != Existence::Unsure {
            let mut cache = self.cache();
            if cache.len() >= MAX_REMEMBERED {
                cache.clear();
            }
            cache.insert(address.clone(), (e, Instant::now()));
        }
        e
    }
}

/// What the tasks around the driver share.
struct Ctx {
    node: Node,
    shim: SharedShim<Oracle>,
    cmds: mpsc::Sender<Cmd>,
}

impl Ctx {
    /// The person behind a virtual address (and a touch, so the mapping stays).
    async fn whois(&self, ip: IpAddr) -> Option<Q2qAddress> {
        let shim = self.shim.clone();
        tokio::task::spawn_blocking(move || {
            let mut s = dns_server::lock(&shim);
            let who = s.pool().whois(ip).cloned();
            if who.is_some() {
                s.pool_mut().touch(ip, SystemTime::now());
            }
            who
        })
        .await
        .ok()
        .flatten()
    }
}

/// What tasks ask of the driver.
enum Cmd {
    /// The peer accepted the stream of a held flow.
    Accept { flow: FlowId, conn: Box<Connection> },
    /// The peer is offline, refused, or does not offer the service: RST.
    Refuse { flow: FlowId },
    /// A datagram from a peer's UDP service back to the app.
    Datagram { from: SocketAddr, to: SocketAddr, payload: Vec<u8> },
    /// The peer does not serve `udp/<port>` of `dst` (or is offline, or no one has the
    /// address): port unreachable for each datagram quoted, and the refusal remembered.
    UdpRefused { dst: SocketAddr, quotes: Vec<Quote> },
    /// The peer answered: reply to the app's echo.
    EchoReply(Echo),
}

/// UDP flows and pingers at most (each a task and, while in use, a q2q stream).
const MAX_UDP_FLOWS: usize = 1024;
const MAX_PINGERS: usize = 256;
/// Packets read from the device in one go before the stack is serviced.
const READ_BATCH: usize = 64;
/// Bytes of a TUN read buffer: the largest IP packet (the device's MTU is at most 65535).
const READ_LEN: usize = 65536;
/// Packets shorter than this (ACKs, small writes) are copied out of the read buffer rather
/// than handed over in it: a queued ACK would hold 64 KiB, and the next read buffer would
/// be zero-filled from its short length back to `READ_LEN`.
const READ_COPY_BELOW: usize = 4096;

/// Datagrams of one UDP flow waiting for its stream at most; more are dropped.
const UDP_QUEUE: usize = 64;
/// How long a refused `udp/<port>` of a virtual address is answered with port unreachable
/// without asking the peer again (a resolver's retries, a game's probes), and how many
/// such refusals are remembered at most.
const UDP_REFUSAL_MEMORY: Duration = Duration::from_secs(10);
const MAX_UDP_REFUSALS: usize = 4096;

/// A datagram of an app's UDP flow: the payload for the peer, the quote for an error.
type UdpItem = (Vec<u8>, Quote);

/// Virtual endpoints whose `udp/<port>` was refused lately, each until when. Bounded: when
/// full of live entries, a new refusal is not remembered (its datagrams still get their
/// error after asking).
#[derive(Default)]
struct UdpRefusals(HashMap<SocketAddr, Instant>);

impl UdpRefusals {
    fn remember(&mut self, dst: SocketAddr, now: Instant) {
        if self.0.len() >= MAX_UDP_REFUSALS {
            self.0.retain(|_, until| *until > now);
        }
        if self.0.len() < MAX_UDP_REFUSALS || self.0.contains_key(&dst) {
            self.0.insert(dst, now + UDP_REFUSAL_MEMORY);
        }
    }

    fn refused(&mut self, dst: SocketAddr, now: Instant) -> bool {
        match self.0.get(&dst) {
            Some(until) if *until > now => true,
            Some(_) => {
                self.0.remove(&dst);
                false
            }
            None => false,
        }
    }
}

/// An accepted app flow, joined to the peer stream that carries it.
struct Flow {
    splice: Splice<StreamKey>,
    peer: Q2qAddress,
}

/// The TUN device, read and written with or without a virtio-net header in front of each
/// packet ([`device::Created::vnet`]).
struct Tun(device::Created);

impl Tun {
    /// Read a packet into `buf`: its length and how far its checksum can be trusted (`None`:
    /// a packet the stack cannot take).
    async fn recv(&self, buf: &mut [u8]) -> std::io::Result<(usize, Option<RxChecksum>)> {
        if !self.0.vnet {
            return Ok((self.0.device.recv(buf).await?, Some(RxChecksum::Unverified)));
        }
        let mut hdr = [0u8; device::VNET_HDR_LEN];
        let n = self
            .0
            .device
            .recv_vectored(&mut [IoSliceMut::new(&mut hdr), IoSliceMut::new(buf)])
            .await?;
        Ok(Self::split(n, &hdr))
    }

    /// [`Tun::recv`] if a packet is waiting now (else `WouldBlock`).
    fn try_recv(&self, buf: &mut [u8]) -> std::io::Result<(usize, Option<RxChecksum>)> {
        if !self.0.vnet {
            return Ok((self.0.device.try_recv(buf)?, Some(RxChecksum::Unverified)));
        }
        let mut hdr = [0u8; device::VNET_HDR_LEN];
        let n = self
            .0
            .device
            .try_recv_vectored(&mut [IoSliceMut::new(&mut hdr), IoSliceMut::new(buf)])?;
        Ok(Self::split(n, &hdr))
    }

    fn split(n: usize, hdr: &[u8; device::VNET_HDR_LEN]) -> (usize, Option<RxChecksum>) {
        match n.checked_sub(device::VNET_HDR_LEN) {
            Some(len) => (len, device::rx_checksum(hdr)),
            None => (0, None),
        }
    }

    /// Write a packet, its checksum left to the kernel where `partial` says.
    async fn send(&self, packet: &[u8], partial: Option<PartialChecksum>) -> std::io::Result<()> {
        if self.0.vnet {
            let hdr = device::tx_header(partial);
            self.0.device.send_vectored(&[IoSlice::new(&hdr), IoSlice::new(packet)]).await?;
        } else {
            self.0.device.send(packet).await?;
        }
        Ok(())
    }
}

struct Driver {
    device: Tun,
    stack: Stack,
    start: tokio::time::Instant,
    wake: Arc<DriverWake<FlowId>>,
    flows: HashMap<FlowId, Flow>,
    dirty: Vec<Arc<Pipes<FlowId>>>,
    udp: HashMap<(SocketAddr, SocketAddr), mpsc::Sender<UdpItem>>,
    udp_refused: UdpRefusals,
    pingers: HashMap<IpAddr, mpsc::Sender<Echo>>,
    ctx: Arc<Ctx>,
    cmds: mpsc::Receiver<Cmd>,
}

/// One flow of the stack, as the pipes see it.
struct FlowIo<'a> {
    stack: &'a mut Stack,
    id: FlowId,
}

fn flow_error(e: FlowError) -> IoError {
    match e {
        FlowError::Blocked | FlowError::Pending => IoError::Blocked,
        FlowError::Reset => IoError::Reset,
        _ => IoError::Closed,
    }
}

impl StreamIo for FlowIo<'_> {
    fn recv_with(&mut self, max: usize, f: &mut dyn FnMut(&[u8])) -> Result<usize, IoError> {
        self.stack.recv_with(self.id, max, f).map_err(flow_error)
    }
    fn send(&mut self, data: &[u8]) -> Result<usize, IoError> {
        self.stack.send(self.id, data).map_err(flow_error)
    }
    fn close(&mut self) {
        let _ = self.stack.close(self.id);
    }
    fn abort(&mut self) {
        let _ = self.stack.abort(self.id);
    }
    // Flows run with Nagle off already: the kernel's TCP coalesces the app's writes.
    fn set_nodelay(&mut self, _nodelay: bool) {}
}

impl Driver {
    fn new(device: Tun, config: StackConfig, ctx: Arc<Ctx>, cmds: mpsc::Receiver<Cmd>) -> Driver {
        Driver {
            device,
            stack: Stack::new(config, q2q_netstack::Instant::from_micros(0)),
            start: tokio::time::Instant::now(),
            wake: DriverWake::new(),
            flows: HashMap::new(),
            dirty: Vec::new(),
            udp: HashMap::new(),
            udp_refused: UdpRefusals::default(),
            pingers: HashMap::new(),
            ctx,
            cmds,
        }
    }

    fn now(&self) -> q2q_netstack::Instant {
        q2q_netstack::Instant::from_micros(
            i64::try_from(self.start.elapsed().as_micros()).unwrap_or(i64::MAX),
        )
    }

    fn deadline(&self) -> tokio::time::Instant {
        match self.stack.poll_timeout() {
            Some(t) => {
                let micros = u64::try_from(t.total_micros()).unwrap_or(0);
                self.start + Duration::from_micros(micros)
            }
            None => tokio::time::Instant::now() + Duration::from_secs(3600),
        }
    }

    async fn run(mut self, mut stop: oneshot::Receiver<()>) {
        let mut buf = self.stack.read_buffer(READ_LEN);
        loop {
            self.service().await;
            let deadline = self.deadline();
            tokio::select! {
                _ = &mut stop => break,
                r = self.device.recv(&mut buf) => match r {
                    Ok(read) => {
                        let now = self.now();
                        self.take_read(now, &mut buf, read);
                        // Take what else is waiting, bounded, before servicing.
                        for _ in 0..READ_BATCH {
                            match self.device.try_recv(&mut buf) {
                                Ok(read) => self.take_read(now, &mut buf, read),
                                Err(_) => break,
                            }
                        }
                    }
                    Err(e) => {
                        warn!(error = %e, "TUN device read failed; TUN mode stops");
                        break;
                    }
                },
                _ = self.wake.notify.notified() => {}
                Some(cmd) = self.cmds.recv() => self.command(cmd),
                _ = tokio::time::sleep_until(deadline) => {}
            }
        }
        for f in self.flows.values() {
            f.splice.peer().abort();
        }
    }

    /// Hand the stack the `n`-byte packet read into `buf`: a large one in `buf` itself (no
    /// copy), `buf` then replaced by a spare of the stack's; a small one copied, `buf` kept.
    fn take_read(
        &mut self,
        now: q2q_netstack::Instant,
        buf: &mut Vec<u8>,
        (n, checksum): (usize, Option<RxChecksum>),
    ) {
        let Some(checksum) = checksum else {
            // Shorter than its virtio-net header, or a UDP super-datagram (never asked for).
            debug!(len = n, "TUN read the stack cannot take, dropped");
            return;
        };
        if n < READ_COPY_BELOW {
            self.stack.handle_packet(now, &buf[..n], checksum);
        } else {
            let mut packet = std::mem::take(buf);
            packet.truncate(n);
            self.stack.handle_packet_buf(now, packet, checksum);
            *buf = self.stack.read_buffer(READ_LEN);
        }
    }

    /// Timers, streams with work, then packets out and events, until quiet (bounded).
    async fn service(&mut self) {
        let now = self.now();
        self.stack.handle_timeout(now);
        let mut dirty = std::mem::take(&mut self.dirty);
        self.wake.take(&mut dirty);
        for p in dirty.drain(..) {
            p.queued.store(false, std::sync::atomic::Ordering::Release);
            self.pump(&p);
        }
        self.dirty = dirty;
        for _ in 0..16 {
            while let Some(packet) = self.stack.poll_transmit(now) {
                let partial = self.stack.partial_checksum(&packet);
                if let Err(e) = self.device.send(&packet, partial).await {
                    debug!(error = %e, "TUN write failed; packet dropped");
                }
                self.stack.recycle(packet);
            }
            let mut any = false;
            while let Some(ev) = self.stack.poll_event() {
                any = true;
                self.event(ev);
            }
            if !any {
                break;
            }
        }
    }

    fn pump(&mut self, p: &Arc<Pipes<FlowId>>) {
        self.pump_flow(p.key);
    }

    fn pump_flow(&mut self, id: FlowId) {
        let Some(f) = self.flows.get_mut(&id) else { return };
        let mut io = FlowIo { stack: &mut self.stack, id };
        if let SpliceState::Failed(why) = f.splice.pump(&mut io) {
            let (up, down) = f.splice.moved();
            debug!(peer = %f.peer, %why, up, down, "flow reset");
        }
    }

    fn event(&mut self, ev: Event) {
        match ev {
            Event::Connect { flow, dst, src } => {
                debug!(%flow, %src, %dst, "app connects");
                tokio::spawn(open_flow(self.ctx.clone(), flow, dst));
            }
            Event::Established(_) => {}
            Event::Readable(f) | Event::Writable(f) | Event::Finished(f) => self.pump_flow(f),
            Event::Reset(f) => {
                if let Some(fl) = self.flows.get(&f) {
                    fl.splice.peer().abort();
                }
                let _ = self.stack.abort(f);
            }
            Event::Closed(f) => {
                if let Some(fl) = self.flows.remove(&f) {
                    let (up, down) = fl.splice.moved();
                    if fl.splice.finished() {
                        debug!(peer = %fl.peer, up, down, "flow done");
                    } else {
                        debug!(peer = %fl.peer, up, down, "flow closed before both ends finished");
                        fl.splice.peer().abort();
                    }
                }
            }
            Event::Datagram { src, dst, payload, quote } => self.datagram(src, dst, payload, quote),
            Event::EchoRequest(echo) => self.echo(echo),
        }
    }

    fn command(&mut self, cmd: Cmd) {
        match cmd {
            Cmd::Accept { flow, conn } => match self.stack.accept_flow(flow) {
                Ok(()) => {
                    let Connection { peer, stream, .. } = *conn;
                    // Interactive programs (ssh) must not wait for Nagle; bulk data comes in
                    // big writes.
                    stream.set_nodelay(true);
                    let pipes = Pipes::new(flow);
                    let splice = Splice::new(stream.into_pipe(), &self.wake, &pipes);
                    self.flows.insert(flow, Flow { splice, peer });
                    self.pump_flow(flow);
                }
                Err(e) => debug!(%flow, error = %e, "app gave up before the peer answered"),
            },
            Cmd::Refuse { flow } => {
                let _ = self.stack.refuse_flow(flow);
            }
            Cmd::Datagram { from, to, payload } => {
                if let Err(e) = self.stack.send_datagram(from, to, &payload) {
                    debug!(%from, %to, error = %e, "datagram to the app dropped");
                }
            }
            Cmd::EchoReply(echo) => {
                let _ = self.stack.answer_echo(&echo);
            }
            Cmd::UdpRefused { dst, quotes } => {
                self.udp_refused.remember(dst, Instant::now());
                for quote in &quotes {
                    if let Err(e) = self.stack.port_unreachable(quote) {
                        debug!(%dst, error = %e, "port unreachable to the app dropped");
                    }
                }
            }
        }
    }

    fn datagram(&mut self, src: SocketAddr, dst: SocketAddr, payload: Vec<u8>, quote: Quote) {
        if self.udp_refused.refused(dst, Instant::now()) {
            // Refused moments ago: say so at once rather than ask the peer again.
            if let Err(e) = self.stack.port_unreachable(&quote) {
                debug!(%dst, error = %e, "port unreachable to the app dropped");
            }
            return;
        }
        let ctx = self.ctx.clone();
        dispatch(&mut self.udp, (src, dst), (payload, quote), MAX_UDP_FLOWS, UDP_QUEUE, |rx| {
            tokio::spawn(udp_flow(ctx, src, dst, rx));
        });
    }

    fn echo(&mut self, echo: Echo) {
        let (ctx, vip) = (self.ctx.clone(), echo.dst);
        dispatch(&mut self.pingers, vip, echo, MAX_PINGERS, 16, |rx| {
            tokio::spawn(pinger(ctx, vip, rx));
        });
    }
}

/// Hand `item` to the task for `key`, starting one (with a queue of `depth`, at most `max`
/// tasks) when there is none or it ended. A full queue drops the item, as a full socket
/// buffer would.
fn dispatch<K: std::hash::Hash + Eq, T>(
    tasks: &mut HashMap<K, mpsc::Sender<T>>,
    key: K,
    item: T,
    max: usize,
    depth: usize,
    start: impl FnOnce(mpsc::Receiver<T>),
) {
    let item = match tasks.get(&key) {
        Some(tx) => match tx.try_send(item) {
            Ok(()) | Err(mpsc::error::TrySendError::Full(_)) => return,
            Err(mpsc::error::TrySendError::Closed(item)) => item,
        },
        None => item,
    };
    tasks.retain(|_, tx| !tx.is_closed());
    if tasks.len() >= max {
        return;
    }
    let (tx, rx) = mpsc::channel(depth);
    let _ = tx.try_send(item);
    tasks.insert(key, tx);
    start(rx);
}

/// A stream to the person behind virtual address `dst`, service `<proto>/<port>` (at most
/// 9 s, below the 10 s an app waits at most), or why not.
async fn connect_vip(ctx: &Ctx, dst: SocketAddr, proto: &str) -> Result<Connection, &'static str> {
    let peer = ctx.whois(dst.ip()).await.ok_or("no one has this virtual address")?;
    let service =
        ServiceName::parse(&format!("{proto}/{}", dst.port())).map_err(|_| "not a service name")?;
    match tokio::time::timeout(Duration::from_secs(9), ctx.node.connect(&peer, &service)).await {
        Ok(Ok(conn)) => Ok(conn),
        Ok(Err(e)) => {
            info!(%peer, %service, error = %e, "connection refused");
            Err("refused")
        }
        Err(_) => {
            info!(%peer, %service, "no answer within 9 s");
            Err("timed out")
        }
    }
}

/// Open the peer stream for a held flow and tell the driver the verdict.
async fn open_flow(ctx: Arc<Ctx>, flow: FlowId, dst: SocketAddr) {
    let cmd = match connect_vip(&ctx, dst, "tcp").await {
        Ok(conn) => Cmd::Accept { flow, conn: Box::new(conn) },
        Err(why) => {
            debug!(%flow, %dst, why, "flow refused");
            Cmd::Refuse { flow }
        }
    };
    let _ = ctx.cmds.send(cmd).await;
}

/// Carry one app's UDP flow (src → dst) to the peer's `udp/<port>` and the answers back.
/// When the stream cannot be opened, every datagram waiting for it gets port unreachable.
async fn udp_flow(
    ctx: Arc<Ctx>,
    src: SocketAddr,
    dst: SocketAddr,
    mut rx: mpsc::Receiver<UdpItem>,
) {
    let conn = match connect_vip(&ctx, dst, "udp").await {
        Ok(c) => c,
        Err(why) => {
            // Closed, nothing more lands here unanswered (a datagram that comes before the
            // driver has the refusal starts a new flow, which asks again). At most UDP_QUEUE.
            rx.close();
            let mut quotes = Vec::new();
            while let Ok((_, quote)) = rx.try_recv() {
                quotes.push(quote);
            }
            debug!(%src, %dst, why, datagrams = quotes.len(), "UDP flow: port unreachable");
            let _ = ctx.cmds.send(Cmd::UdpRefused { dst, quotes }).await;
            return;
        }
    };
    let (mut r, mut w) = tokio::io::split(conn.stream);
    loop {
        tokio::select! {
            d = tokio::time::timeout(datagram::IDLE, rx.recv()) => match d {
                Ok(Some((d, _))) => if datagram::write(&mut w, &d).await.is_err() { break },
                _ => break,
            },
            d = datagram::read(&mut r) => match d {
                Ok(Some(payload)) => {
                    if ctx.cmds.send(Cmd::Datagram { from: dst, to: src, payload }).await.is_err() {
                        break;
                    }
                }
                _ => break,
            },
        }
    }
}

/// Answer an app's pings to `vip` once a round trip to the peer's `ping` service succeeds.
async fn pinger(ctx: Arc<Ctx>, vip: IpAddr, mut rx: mpsc::Receiver<Echo>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Some(peer) = ctx.whois(vip).await else { return };
    let ping = crate::presence::node::ping_service();
    let mut stream = None;
    let mut quiet_until = None;
    let mut seq = 0u64;
    while let Ok(Some(echo)) = tokio::time::timeout(datagram::IDLE, rx.recv()).await {
        if quiet_until.is_some_and(|t| Instant::now() < t) {
            continue;
        }
        if stream.is_none() {
            match tokio::time::timeout(Duration::from_secs(5), ctx.node.connect(&peer, &ping)).await
            {
                Ok(Ok(c)) => stream = Some(c.stream),
                _ => {
                    // Unreachable: drop echoes for a while rather than reconnect per ping.
                    quiet_until = Some(Instant::now() + Duration::from_secs(2));
                    continue;
                }
            }
        }
        let Some(s) = stream.as_mut() else { continue };
        seq += 1;
        let mut buf = seq.to_be_bytes();
        let round = async {
            s.write_all(&buf).await?;
            s.read_exact(&mut buf).await
        };
        match tokio::time::timeout(Duration::from_secs(3), round).await {
            Ok(Ok(_)) => {
                if ctx.cmds.send(Cmd::EchoReply(echo)).await.is_err() {
                    return;
                }
            }
            _ => stream = None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn udp_refusals_are_remembered_briefly_and_bounded() {
        let mut r = UdpRefusals::default();
        let t0 = Instant::now();
        let a: SocketAddr = "100.64.0.2:5353".parse().unwrap();
        assert!(!r.refused(a, t0));
        r.remember(a, t0);
        assert!(r.refused(a, t0 + Duration::from_secs(9)));
        assert!(!r.refused(a, t0 + UDP_REFUSAL_MEMORY), "forgotten after the memory");
        assert!(r.0.is_empty(), "an expired refusal is dropped when looked at");
        for port in 1..=(MAX_UDP_REFUSALS + 10) as u16 {
            r.remember(SocketAddr::new(a.ip(), port), t0);
        }
        assert_eq!(r.0.len(), MAX_UDP_REFUSALS, "live refusals are capped");
        // Once they expire, new ones take their place.
        let later = t0 + UDP_REFUSAL_MEMORY + Duration::from_secs(1);
        r.remember(a, later);
        assert_eq!(r.0.len(), 1);
        assert!(r.refused(a, later));
    }
}
