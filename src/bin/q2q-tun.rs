//! `q2q-tun`: the q2q client.

use clap::{Parser, Subcommand};
use q2q::address::{Domain, Q2qAddress, ServiceName};
use q2q::cli::{format_time, read_password};
use q2q::client::{self, ConnectOptions, Home, ServerConn};
use q2q::daemon::{self, services::Services};
use q2q::identity::Fingerprint;
use q2q::outln;
use q2q::presence::node::NodeConfig;
use std::path::PathBuf;

/// The q2q client: networking addressed to people (alice@example.com), not machines.
///
/// Get an address with `q2q-tun register alice@example.com --server HOST:8788`; see it with
/// `q2q-tun whoami`. State lives in $Q2Q_HOME (default ~/.q2q, or /var/lib/q2q for root).
#[derive(Parser)]
#[command(version, max_term_width = 100)]
struct Cli {
    /// State directory (keys, certificates, pinned CAs).
    #[arg(long, global = true, env = "Q2Q_HOME")]
    home: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

/// How to reach a domain's identity server.
#[derive(clap::Args)]
struct ServerArgs {
    /// The identity server, HOST:PORT (default: config, then DNS SRV _q2q._tcp.DOMAIN,
    /// then DOMAIN:8788).
    #[arg(long)]
    server: Option<String>,
    /// Trust only a domain CA with this SHA-256 fingerprint (as `q2q-server info` prints
    /// it), and pin it, replacing an older pin.
    #[arg(long)]
    ca_fingerprint: Option<Fingerprint>,
}

impl ServerArgs {
    fn options(&self) -> ConnectOptions {
        ConnectOptions {
            server: self.server.clone(),
            ca_fingerprint: self.ca_fingerprint,
            login: None,
        }
    }
}

// The options of `up` (its help text is the doc comment of `Command::Up`).
#[derive(clap::Args)]
struct UpArgs {
    /// The identity to run as (default: the only one stored).
    #[arg(long = "as")]
    as_address: Option<String>,
    /// Stay in the foreground (logs on stderr) instead of detaching.
    #[arg(long)]
    foreground: bool,
    /// Run without the TUN device and resolver shim (no root needed): presence, ping,
    /// send and connect only.
    #[arg(long)]
    no_tun: bool,
    /// Name of the TUN device.
    #[arg(long, default_value = "q2q0")]
    tun_name: String,
    /// Read and write the TUN device without checksum and TCP segmentation offload
    /// (virtio-net headers). Offload is on by default and saves the kernel and the daemon
    /// summing every byte; this is for comparing, or a kernel that misbehaves with it.
    #[arg(long)]
    no_tun_offload: bool,
    /// IPv4 virtual address pool (the node takes the first address, people the rest).
    #[arg(long, default_value = "100.64.0.0/10")]
    pool_v4: q2q::dns::pool::Ipv4Prefix,
    /// IPv6 virtual address pool (a ULA; at least as many host bits as --pool-v4).
    #[arg(long, default_value = "fd71:7132::/64")]
    pool_v6: q2q::dns::pool::Ipv6Prefix,
    /// How *.q2q names reach the shim: systemd-resolved per link (~q2q), a nameserver
    /// line in /etc/resolv.conf that `down` removes, or not at all; auto picks
    /// resolved where it runs.
    #[arg(long, value_enum, default_value = "auto", env = "Q2Q_DNS_MODE")]
    dns: q2q::daemon::resolver::Wanted,
    /// Local UDP address for PTCP, who-am-i, probes and relay. `[::]` is one dual-stack
    /// socket serving IPv6 and IPv4 (falls back to IPv4 where IPv6 is off).
    #[arg(long, default_value = "[::]:0")]
    bind: std::net::SocketAddr,
    #[command(flatten)]
    server: ServerArgs,
    /// Do not answer the built-in `ping` service.
    #[arg(long)]
    no_ping: bool,
    /// Never look for direct paths: always use the server's relay.
    #[arg(long)]
    relay_only: bool,
    /// Ask the local router for a UDP port mapping (PCP, NAT-PMP, UPnP IGD), offer it to
    /// peers, renew it, and delete it on `down`: direct paths even behind a symmetric NAT.
    /// Off by default: it opens a port of your router to the Internet.
    #[arg(long, env = "Q2Q_PORT_MAPPING")]
    port_mapping: bool,
    /// Also offer loopback addresses as candidates (peers on the same machine).
    #[arg(long)]
    loopback_candidates: bool,
    /// Seconds a peer may stay silent (suspended laptop, Wi-Fi gone) before its session
    /// and streams fail; like kernel TCP, which gives up on unacknowledged data after
    /// about 15 minutes. Until then streams only pause, and resume when it is back.
    #[arg(long, default_value_t = 900, value_parser = clap::value_parser!(u64).range(5..=86400))]
    peer_timeout: u64,
    /// Seconds a peer session with no stream lives on before both sides close it
    /// (the next connection to that person sets up a new one).
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=86400))]
    session_idle: u64,
}

#[derive(Subcommand)]
enum Command {
    /// Register an address and get its certificate. The key is made here and never leaves
    /// this machine; the domain's CA is pinned on first contact.
    Register {
        /// The address to register, like alice@example.com.
        address: String,
        #[command(flatten)]
        server: ServerArgs,
        /// Read the password from the first line of this file (else Q2Q_PASSWORD, else a prompt).
        #[arg(long)]
        password_file: Option<PathBuf>,
        /// An invite code, for servers that register by invitation.
        #[arg(long)]
        invite: Option<String>,
        /// The account exists already (an admin made it, or you registered from another
        /// machine): only get a certificate for this machine.
        #[arg(long)]
        existing: bool,
    },
    /// Show the identities stored here: address, server, certificate expiry.
    Whoami {
        /// Also ask each identity's server which address it sees, over TCP and over UDP.
        #[arg(long)]
        reflexive: bool,
    },
    /// Print a domain's CA fingerprint (pinning it on first contact).
    Identify {
        /// The domain, like example.com.
        domain: String,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Forget the CA pinned for a domain (the next contact pins whatever it presents).
    ForgetCa { domain: String },
    /// Go online: log in to the home server with your certificate, stay logged in, answer
    /// `ping`, and serve `status`/`ping`/`whois`/`down` on a local control socket.
    ///
    /// Unless --no-tun, also create the TUN device q2q0 and the *.q2q resolver shim (needs
    /// root or CAP_NET_ADMIN), so that unmodified programs reach people by name:
    /// `ssh alice.q2q` (alice at your domain), `ssh alice.example.com.q2q`, `ping alice.q2q`.
    /// TCP port P goes to the person's service tcp/P, UDP to udp/P. `q2q-tun down` removes
    /// the device and restores the resolver settings.
    Up(UpArgs),
    /// Stop the running daemon: the TUN device goes, the resolver settings are restored.
    /// Also repairs what a killed daemon left behind.
    Down,
    /// Name the address behind a virtual IP, like 100.64.0.2.
    Whois { ip: std::net::IpAddr },
    /// Check this machine's set-up.
    Doctor {
        #[command(subcommand)]
        what: Doctor,
    },
    /// Offer a service, forwarded to a local address (tcp/N goes to 127.0.0.1:N unless
    /// --to says otherwise). Offered to nobody until you `authorize` someone.
    Expose {
        /// The service name, like tcp/22.
        service: String,
        /// Where streams of this service go on this machine.
        #[arg(long)]
        to: Option<std::net::SocketAddr>,
    },
    /// Stop offering a service.
    Unexpose { service: String },
    /// Let an address use one of your exposed services.
    Authorize {
        /// Who, like bob@b.example.
        address: String,
        /// Which service, like tcp/22.
        service: String,
    },
    /// Take an address's permission for a service away.
    Deauthorize { address: String, service: String },
    /// List the services you expose, where they go, and who may use them.
    Services,
    /// Send files and directories to a person. They must consent: be running
    /// `q2q-tun receive`, or have authorized you for `file` (their daemon's inbox).
    Send {
        /// Who, like bob@b.example.
        address: String,
        /// Files and directories (directories go whole; symbolic links are refused).
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// The identity to send as (default: the only one stored).
        #[arg(long = "as")]
        as_address: Option<String>,
    },
    /// Wait for files and accept them: from anyone who sends, or only from --from.
    Receive {
        /// Accept only from these addresses (repeatable).
        #[arg(long)]
        from: Vec<String>,
        /// Where files go (created if missing).
        #[arg(long, default_value = ".")]
        dir: PathBuf,
        /// Replace existing files with other content (otherwise the new one arrives as
        /// `name (1).ext`).
        #[arg(long)]
        overwrite: bool,
        /// Keep receiving after the first transfer.
        #[arg(long)]
        keep: bool,
        /// The identity to receive as (default: the only one stored).
        #[arg(long = "as")]
        as_address: Option<String>,
    },
    /// Connect to an address's service and join it to stdin/stdout (for ssh's ProxyCommand:
    /// `ssh -o ProxyCommand='q2q-tun connect alice@example.com tcp/22' alice`).
    Connect {
        address: String,
        service: String,
        /// The identity to connect as (default: the only one stored).
        #[arg(long = "as")]
        as_address: Option<String>,
    },
    /// Show each peer of the running daemon, its path (direct ip:port, UDP relay, TCP
    /// relay) and why.
    Status {
        /// Print it as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Check what this network allows, asking the home server: TCP, UDP, the addresses the
    /// server sees, whether the NAT keeps one port for every destination, the round trip
    /// to the relay, whether the router maps ports (PCP, NAT-PMP, UPnP IGD), and a verdict:
    /// "direct to most peers", "direct only to cone peers" or "relay only". Needs no daemon
    /// and no root.
    Netcheck {
        /// The identity whose home server to ask (default: the only one stored).
        #[arg(long = "as")]
        as_address: Option<String>,
        #[command(flatten)]
        server: ServerArgs,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
        /// Do not ask the local router for a port mapping. By default netcheck asks once
        /// (PCP, then NAT-PMP, then UPnP IGD; a few seconds at most) for a mapping of a
        /// fresh socket's port and deletes it at once, to say which protocol it offers.
        #[arg(long)]
        no_port_mapping: bool,
    },
    /// Reach an address's `ping` service: time to connect, round trips, and the path.
    Ping {
        /// Who to ping, like bob@example.com.
        address: String,
        /// How many round trips.
        #[arg(short = 'c', long, default_value_t = 4)]
        count: u32,
        /// The identity to ping from when no daemon runs (default: the only one stored).
        #[arg(long = "as")]
        as_address: Option<String>,
        /// Never look for direct paths (when no daemon runs).
        #[arg(long)]
        relay_only: bool,
    },
}

#[derive(Subcommand)]
enum Doctor {
    /// Which resolver mode is in use, and whether *.q2q names resolve through the system
    /// resolver and straight from the shim.
    Dns {
        /// The name to look up (default: your own, like alice.q2q).
        name: Option<String>,
    },
}

fn main() -> std::process::ExitCode {
    // Renewals are worth a line in the log even when all is well.
    q2q::cli::init_logging("warn,q2q::presence::node::renewal=info");
    let cli = Cli::parse();
    // The daemon has its own runtime (one worker: see `daemon::up::runtime`).
    let runtime = match cli.command {
        Command::Up(_) => daemon::up::runtime(),
        _ => tokio::runtime::Runtime::new(),
    };
    match runtime {
        Ok(rt) => q2q::cli::exit(rt.block_on(run(cli))),
        Err(e) => q2q::cli::exit(Err(anyhow::anyhow!("cannot start the async runtime: {e}"))),
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let home = cli.home.map_or_else(Home::locate, Home::new);
    match cli.command {
        Command::Register { address, server, password_file, invite, existing } => {
            register(&home, &address, &server, password_file, invite, existing).await
        }
        Command::Whoami { reflexive } => Ok(daemon::whoami::print(&home, reflexive).await?),
        Command::Identify { domain, server } => identify(&home, &domain, &server).await,
        Command::ForgetCa { domain } => forget_ca(&home, &domain),
        Command::Up(up_args) => up(home, up_args).await,
        Command::Expose { service, to } => expose(&home, &service, to).await,
        Command::Unexpose { service } => unexpose(&home, &service).await,
        Command::Authorize { address, service } => authorize(&home, &address, &service).await,
        Command::Deauthorize { address, service } => deauthorize(&home, &address, &service).await,
        Command::Services => services(&home),
        Command::Connect { address, service, as_address } => {
            let (to, service) = (Q2qAddress::parse(&address)?, ServiceName::parse(&service)?);
            let me = parse_as(as_address.as_deref())?;
            Ok(daemon::connect::connect(&home, &to, &service, me.as_ref()).await?)
        }
        Command::Send { address, files, as_address } => {
            let to = Q2qAddress::parse(&address)?;
            let me = parse_as(as_address.as_deref())?;
            Ok(daemon::send::send(&home, &to, &files, me.as_ref()).await?)
        }
        Command::Receive { from, dir, overwrite, keep, as_address } => {
            let from = from.iter().map(|f| Q2qAddress::parse(f)).collect::<Result<_, _>>()?;
            let me = parse_as(as_address.as_deref())?;
            let opts = daemon::receive::ReceiveOptions { from, dir, overwrite, keep };
            Ok(daemon::receive::receive(&home, me.as_ref(), opts).await?)
        }
        Command::Down => {
            outln!("{}", daemon::down::down(&home).await?);
            Ok(())
        }
        Command::Whois { ip } => {
            outln!("{}", daemon::control::whois_of(&home, ip).await?);
            Ok(())
        }
        Command::Doctor { what: Doctor::Dns { name } } => {
            let report = daemon::doctor::dns(&home, name).await?;
            print!("{report}");
            Ok(report.verdict()?)
        }
        Command::Status { json } => {
            let status = daemon::status::ask(&home).await?;
            if json {
                outln!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                print!("{status}");
            }
            Ok(())
        }
        Command::Netcheck { as_address, server, json, no_port_mapping } => {
            let opts = daemon::netcheck::Options {
                identity: parse_as(as_address.as_deref())?,
                port_mapping: !no_port_mapping,
                server: server.options(),
            };
            netcheck(&home, &opts, json).await
        }
        Command::Ping { address, count, as_address, relay_only } => {
            let to = Q2qAddress::parse(&address)?;
            let me = parse_as(as_address.as_deref())?;
            print!("{}", daemon::ping::ping(&home, &to, count, me.as_ref(), relay_only).await?);
            Ok(())
        }
    }
}

async fn netcheck(home: &Home, opts: &daemon::netcheck::Options, json: bool) -> anyhow::Result<()> {
    let report = daemon::netcheck::check(home, opts).await?;
    if json {
        outln!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{report}");
    }
    Ok(())
}

/// The identity named by `--as`, parsed.
fn parse_as(as_address: Option<&str>) -> anyhow::Result<Option<Q2qAddress>> {
    Ok(as_address.map(Q2qAddress::parse).transpose()?)
}

async fn register(
    home: &Home,
    address: &str,
    server: &ServerArgs,
    password_file: Option<PathBuf>,
    invite: Option<String>,
    existing: bool,
) -> anyhow::Result<()> {
    let address = Q2qAddress::parse(address)?;
    let prompt = format!("Password for {address}: ");
    let password = read_password(password_file.as_deref(), &prompt, !existing)?;
    let r =
        client::register(home, &address, &password, invite.as_deref(), existing, &server.options())
            .await?;
    if r.newly_pinned {
        outln!("pinned the CA of {}: {}", address.domain, r.ca);
    }
    outln!(
        "registered {} with {}; certificate valid until {}",
        r.address,
        r.server,
        format_time(r.info.not_after)
    );
    outln!("stored in {}", home.root().display());
    Ok(())
}

async fn identify(home: &Home, domain: &str, server: &ServerArgs) -> anyhow::Result<()> {
    let domain = Domain::parse(domain)?;
    let conn = ServerConn::connect(home, &domain, &server.options()).await?;
    let ca = conn.identify(&domain).await?;
    outln!("{domain} CA: {}", Fingerprint::of(&ca));
    outln!("server: {}", conn.server);
    if conn.newly_pinned {
        outln!("pinned (first contact): check this fingerprint with {domain}'s admin");
    } else {
        outln!("matches the pinned CA");
    }
    Ok(())
}

fn forget_ca(home: &Home, domain: &str) -> anyhow::Result<()> {
    let domain = Domain::parse(domain)?;
    if home.forget_ca(&domain)? {
        outln!("forgot the CA of {domain}");
    } else {
        outln!("no CA was pinned for {domain}");
    }
    Ok(())
}

async fn up(home: Home, a: UpArgs) -> anyhow::Result<()> {
    if !a.no_tun {
        // Say what is missing first, not in the detached daemon's log.
        daemon::platform::device::check_privileges(&a.tun_name)?;
    }
    let me = daemon::choose_identity(&home, parse_as(a.as_address.as_deref())?.as_ref())?;
    daemon::up::ensure_down(&home)?;
    if !a.foreground {
        outln!("{}", daemon::up::detach(&home)?);
        return Ok(());
    }
    let config = NodeConfig {
        bind: a.bind,
        include_loopback: a.loopback_candidates,
        server: a.server.options(),
        direct: !a.relay_only,
        port_mapping: a.port_mapping,
        session_idle: std::time::Duration::from_secs(a.session_idle),
        netstack: q2q_netstack::Config {
            idle_timeout: q2q_netstack::Duration::from_secs(a.peer_timeout),
            ..Default::default()
        },
        ..Default::default()
    };
    let tun = (!a.no_tun).then(|| daemon::tun::TunConfig {
        name: a.tun_name,
        pool: q2q::dns::pool::PoolConfig { ipv4: a.pool_v4, ipv6: a.pool_v6, ..Default::default() },
        dns: a.dns,
        offload: !a.no_tun_offload,
        ..Default::default()
    });
    Ok(daemon::run(home, me, config, !a.no_ping, tun).await?)
}

async fn expose(
    home: &Home,
    service: &str,
    to: Option<std::net::SocketAddr>,
) -> anyhow::Result<()> {
    let service = ServiceName::parse(service)?;
    let mut s = Services::load(home)?;
    let to = s.expose(&service, to)?;
    s.save(home)?;
    let target = to.map_or_else(
        || format!("the inbox {}", home.root().join("inbox").display()),
        |t| t.to_string(),
    );
    outln!(
        "exposed {service} (to {target}); nobody may use it until you `q2q-tun authorize ADDRESS {service}`"
    );
    reloaded(home).await
}

async fn unexpose(home: &Home, service: &str) -> anyhow::Result<()> {
    let service = ServiceName::parse(service)?;
    let mut s = Services::load(home)?;
    if !s.unexpose(&service) {
        anyhow::bail!("{service} is not exposed");
    }
    s.save(home)?;
    outln!("{service} is no longer offered");
    reloaded(home).await
}

async fn authorize(home: &Home, address: &str, service: &str) -> anyhow::Result<()> {
    let (who, service) = (Q2qAddress::parse(address)?, ServiceName::parse(service)?);
    let mut s = Services::load(home)?;
    s.authorize(&who, &service)?;
    s.save(home)?;
    outln!("{who} may now use {service}");
    reloaded(home).await
}

async fn deauthorize(home: &Home, address: &str, service: &str) -> anyhow::Result<()> {
    let (who, service) = (Q2qAddress::parse(address)?, ServiceName::parse(service)?);
    let mut s = Services::load(home)?;
    if !s.deauthorize(&who, &service)? {
        anyhow::bail!("{who} was not authorized for {service}");
    }
    s.save(home)?;
    outln!("{who} may no longer use {service}");
    reloaded(home).await
}

fn services(home: &Home) -> anyhow::Result<()> {
    let s = Services::load(home)?;
    if s.services.is_empty() {
        outln!("no services exposed (q2q-tun expose tcp/22)");
    }
    for (name, e) in &s.services {
        let who = if e.allow.is_empty() { "nobody yet".to_string() } else { e.allow.join(", ") };
        let to = e.to.map_or_else(|| "inbox".to_string(), |t| t.to_string());
        outln!("{name:<12} -> {to:<22} allowed: {who}");
    }
    Ok(())
}

/// Tell a running daemon to apply the services file again.
async fn reloaded(home: &Home) -> anyhow::Result<()> {
    if daemon::reload(home).await? {
        outln!("the running daemon applied the change");
    }
    Ok(())
}
