//! `q2q-tun`: the q2q client.

use clap::{Parser, Subcommand};
use q2q::address::{Domain, Q2qAddress, ServiceName};
use q2q::amp::AmpBox;
use q2q::cli::{format_time, read_password};
use q2q::client::{self, ConnectOptions, Home, ServerConn};
use q2q::daemon;
use q2q::daemon::services::Services;
use q2q::identity::Fingerprint;
use q2q::presence::node::{Node, NodeConfig, Policy};
use q2q::transfer;
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
    Up {
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
        /// Local UDP address for PTCP, who-am-i, probes and relay.
        #[arg(long, default_value = "0.0.0.0:0")]
        bind: std::net::SocketAddr,
        #[command(flatten)]
        server: ServerArgs,
        /// Do not answer the built-in `ping` service.
        #[arg(long)]
        no_ping: bool,
        /// Never look for direct paths: always use the server's relay.
        #[arg(long)]
        relay_only: bool,
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
    },
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
    Status,
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

#[tokio::main]
async fn main() -> std::process::ExitCode {
    q2q::cli::init_logging("warn");
    q2q::cli::exit(run(Cli::parse()).await)
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let home = cli.home.map_or_else(Home::locate, Home::new);
    match cli.command {
        Command::Register { address, server, password_file, invite, existing } => {
            let address = Q2qAddress::parse(&address)?;
            let password = read_password(
                password_file.as_deref(),
                &format!("Password for {address}: "),
                !existing,
            )?;
            let r = client::register(
                &home,
                &address,
                &password,
                invite.as_deref(),
                existing,
                &server.options(),
            )
            .await?;
            if r.newly_pinned {
                println!("pinned the CA of {}: {}", address.domain, r.ca);
            }
            println!(
                "registered {} with {}; certificate valid until {}",
                r.address,
                r.server,
                format_time(r.info.not_after)
            );
            println!("stored in {}", home.root().display());
        }
        Command::Whoami { reflexive } => {
            let ids = home.identities()?;
            if ids.is_empty() {
                println!(
                    "no identity in {}: run `q2q-tun register you@domain` first",
                    home.root().display()
                );
            }
            for id in ids {
                println!("{}", id.address);
                println!("  server:      {}", id.server.as_deref().unwrap_or("(unknown)"));
                println!(
                    "  certificate: serial {}, valid until {}",
                    id.info.serial,
                    format_time(id.info.not_after)
                );
                if reflexive {
                    let opts = ConnectOptions {
                        server: id.server.clone(),
                        ca_fingerprint: None,
                        login: None,
                    };
                    let mut conn = ServerConn::connect(&home, &id.address.domain, &opts).await?;
                    println!("  seen over TCP as {}", conn.who_am_i().await?);
                    let target = tokio::net::lookup_host(conn.server.as_str())
                        .await?
                        .next()
                        .ok_or_else(|| anyhow::anyhow!("cannot resolve {}", conn.server))?;
                    let bind = if target.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" };
                    let sock = tokio::net::UdpSocket::bind(bind).await?;
                    println!("  seen over UDP as {}", client::udp_who_am_i(&sock, target).await?);
                }
            }
        }
        Command::Identify { domain, server } => {
            let domain = Domain::parse(&domain)?;
            let mut conn = ServerConn::connect(&home, &domain, &server.options()).await?;
            let ca = conn.identify(domain.as_str()).await?;
            println!("{domain} CA: {}", Fingerprint::of(&ca));
            println!("server: {}", conn.server);
            if conn.newly_pinned {
                println!("pinned (first contact): check this fingerprint with {domain}'s admin");
            } else {
                println!("matches the pinned CA");
            }
        }
        Command::ForgetCa { domain } => {
            let domain = Domain::parse(&domain)?;
            if home.forget_ca(&domain)? {
                println!("forgot the CA of {domain}");
            } else {
                println!("no CA was pinned for {domain}");
            }
        }
        Command::Up {
            as_address,
            foreground,
            no_tun,
            tun_name,
            pool_v4,
            pool_v6,
            dns,
            bind,
            server,
            no_ping,
            relay_only,
            loopback_candidates,
            peer_timeout,
            session_idle,
        } => {
            if !no_tun {
                // Say what is missing first, not in the detached daemon's log.
                let probe = daemon::tun::TunConfig { name: tun_name.clone(), ..Default::default() };
                daemon::tun::check_privileges(&probe)?;
            }
            let wanted = as_address.as_deref().map(Q2qAddress::parse).transpose()?;
            let me = daemon::choose_identity(&home, wanted.as_ref())?;
            if std::os::unix::net::UnixStream::connect(daemon::socket_path(&home)).is_ok() {
                anyhow::bail!(
                    "q2q-tun is already up for {}: `q2q-tun status` shows it",
                    home.root().display()
                );
            }
            if !foreground {
                return detach(&home);
            }
            let config = NodeConfig {
                bind,
                include_loopback: loopback_candidates,
                server: server.options(),
                direct: !relay_only,
                session_idle: std::time::Duration::from_secs(session_idle),
                netstack: q2q_netstack::Config {
                    idle_timeout: q2q_netstack::Duration::from_secs(peer_timeout),
                    ..Default::default()
                },
                ..Default::default()
            };
            let tun = (!no_tun).then(|| daemon::tun::TunConfig {
                name: tun_name,
                pool: q2q::dns::pool::PoolConfig {
                    ipv4: pool_v4,
                    ipv6: pool_v6,
                    ..Default::default()
                },
                dns,
                ..Default::default()
            });
            daemon::run(home, me, config, !no_ping, tun).await?;
        }
        Command::Expose { service, to } => {
            let service = ServiceName::parse(&service)?;
            let mut s = Services::load(&home)?;
            let to = s.expose(&service, to)?;
            s.save(&home)?;
            let target = to.map_or_else(
                || format!("the inbox {}", home.root().join("inbox").display()),
                |t| t.to_string(),
            );
            println!(
                "exposed {service} (to {target}); nobody may use it until you `q2q-tun authorize ADDRESS {service}`"
            );
            reloaded(&home).await?;
        }
        Command::Unexpose { service } => {
            let service = ServiceName::parse(&service)?;
            let mut s = Services::load(&home)?;
            if !s.unexpose(&service) {
                anyhow::bail!("{service} is not exposed");
            }
            s.save(&home)?;
            println!("{service} is no longer offered");
            reloaded(&home).await?;
        }
        Command::Authorize { address, service } => {
            let (who, service) = (Q2qAddress::parse(&address)?, ServiceName::parse(&service)?);
            let mut s = Services::load(&home)?;
            s.authorize(&who, &service)?;
            s.save(&home)?;
            println!("{who} may now use {service}");
            reloaded(&home).await?;
        }
        Command::Deauthorize { address, service } => {
            let (who, service) = (Q2qAddress::parse(&address)?, ServiceName::parse(&service)?);
            let mut s = Services::load(&home)?;
            if !s.deauthorize(&who, &service)? {
                anyhow::bail!("{who} was not authorized for {service}");
            }
            s.save(&home)?;
            println!("{who} may no longer use {service}");
            reloaded(&home).await?;
        }
        Command::Services => {
            let s = Services::load(&home)?;
            if s.services.is_empty() {
                println!("no services exposed (q2q-tun expose tcp/22)");
            }
            for (name, e) in &s.services {
                let who =
                    if e.allow.is_empty() { "nobody yet".to_string() } else { e.allow.join(", ") };
                let to = e.to.map_or_else(|| "inbox".to_string(), |t| t.to_string());
                println!("{name:<12} -> {to:<22} allowed: {who}");
            }
        }
        Command::Connect { address, service, as_address } => {
            let to = Q2qAddress::parse(&address)?;
            let service = ServiceName::parse(&service)?;
            let wanted = as_address.as_deref().map(Q2qAddress::parse).transpose()?;
            let me = daemon::choose_identity(&home, wanted.as_ref())?;
            let node = Node::start(home.clone(), me, NodeConfig::default()).await?;
            let conn = node.connect(&to, &service).await?;
            let (mut r, mut w) = tokio::io::split(conn.stream);
            // stdin to the peer; when stdin ends, half-close and keep reading.
            let up = tokio::spawn(async move {
                let mut stdin = tokio::io::stdin();
                let _ = tokio::io::copy(&mut stdin, &mut w).await;
                let _ = tokio::io::AsyncWriteExt::shutdown(&mut w).await;
            });
            let mut stdout = tokio::io::stdout();
            let _ = tokio::io::copy(&mut r, &mut stdout).await;
            let _ = tokio::io::AsyncWriteExt::flush(&mut stdout).await;
            up.abort();
            // The peer ends the session now rather than watching it go silent.
            node.leave().await;
        }
        Command::Send { address, files, as_address } => {
            let to = Q2qAddress::parse(&address)?;
            let files = transfer::collect(&files)?;
            let wanted = as_address.as_deref().map(Q2qAddress::parse).transpose()?;
            let me = daemon::choose_identity(&home, wanted.as_ref())?;
            let node = Node::start(home.clone(), me, NodeConfig::default()).await?;
            let conn = node.connect(&to, &ServiceName::parse("file")?).await?;
            let started = std::time::Instant::now();
            let summary = transfer::send(conn.stream, &files, &mut Bar::new("sending")).await?;
            let path = node.status().last().map(|p| p.path.to_string()).unwrap_or_default();
            node.leave().await;
            println!(
                "sent {} to {to} in {:.1} s over {path}",
                summary.line("sent"),
                started.elapsed().as_secs_f64()
            );
            for (offered, saved) in &summary.renamed {
                println!("{offered} arrived as {saved} (the name was taken by other content)");
            }
            for r in &summary.refused {
                eprintln!("not sent: {}", r.reason);
            }
            if !summary.refused.is_empty() {
                anyhow::bail!(
                    "{} of {} refused by the receiver",
                    summary.refused.len(),
                    summary.files + summary.dirs
                );
            }
        }
        Command::Receive { from, dir, overwrite, keep, as_address } => {
            let from: Vec<Q2qAddress> =
                from.iter().map(|f| Q2qAddress::parse(f)).collect::<Result<_, _>>()?;
            let policy =
                if from.is_empty() { Policy::anyone() } else { Policy::allow(from.clone()) };
            let wanted = as_address.as_deref().map(Q2qAddress::parse).transpose()?;
            let me = daemon::choose_identity(&home, wanted.as_ref())?;
            let node = Node::start(home.clone(), me.clone(), NodeConfig::default()).await?;
            let mut refused = node.refusals();
            let mut accepted =
                node.listen(&ServiceName::parse("file")?, "q2q-tun receive", policy).await?;
            let who = if from.is_empty() {
                "anyone".to_string()
            } else {
                from.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
            };
            eprintln!(
                "{me} is waiting for files from {who} into {} (Ctrl-C to stop)",
                dir.display()
            );
            // Transfers run side by side: one whose sender vanished (and which only times
            // out after the session does) never holds up the next, e.g. its resumption.
            let (done_tx, mut done_rx) = tokio::sync::mpsc::channel(16);
            loop {
                tokio::select! {
                    Ok((peer, service)) = refused.recv() => eprintln!("refused {peer}: not authorized for {service}"),
                    a = accepted.recv() => {
                        let Some(a) = a else { break };
                        let opts = transfer::ReceiveOptions { dir: dir.clone(), overwrite };
                        let done_tx = done_tx.clone();
                        tokio::spawn(async move {
                            let started = std::time::Instant::now();
                            let result = transfer::receive(a.stream, &opts, &mut Bar::new("receiving")).await;
                            let _ = done_tx.send((a.peer, result, started.elapsed())).await;
                        });
                    }
                    Some((peer, result, took)) = done_rx.recv() => match result {
                        Ok(s) => {
                            println!(
                                "received {} from {peer} in {:.1} s into {}",
                                s.line("transferred"), took.as_secs_f64(), dir.display()
                            );
                            for (offered, saved) in &s.renamed {
                                println!("{offered} saved as {saved} (the name was taken by other content)");
                            }
                            for r in &s.refused {
                                eprintln!("refused: {}", r.reason);
                            }
                            if !keep {
                                break;
                            }
                        }
                        Err(e) => eprintln!("error: transfer from {peer} failed: {e}"),
                    },
                }
            }
        }
        Command::Down => {
            let was_up = match daemon::ask(&home, AmpBox::command("shutdown")).await {
                Ok(_) => true,
                Err(daemon::DaemonError::NotRunning(_)) => false,
                Err(e) => return Err(e.into()),
            };
            for _ in 0..100 {
                if !was_up || !daemon::socket_path(&home).exists() {
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            // A killed daemon leaves its resolver settings (and control socket) behind.
            let paths = daemon::tun::resolver_paths(&home);
            let repaired = daemon::resolver::restore(&paths)?;
            if !was_up {
                let _ = std::fs::remove_file(daemon::socket_path(&home));
            }
            match (was_up, repaired) {
                (true, _) => println!("q2q-tun is down"),
                (false, Some(what)) => {
                    println!("q2q-tun was not running; repaired what it left: {what}")
                }
                (false, None) => println!("q2q-tun is not running; nothing to repair"),
            }
        }
        Command::Whois { ip } => {
            let b = daemon::ask(&home, AmpBox::command("whois").with("ip", ip.to_string())).await?;
            println!("{}", b.get_str("address").unwrap_or("?"));
        }
        Command::Doctor { what: Doctor::Dns { name } } => {
            let status = daemon::ask(&home, AmpBox::command("status")).await.ok();
            let me = status
                .as_ref()
                .and_then(|b| b.get_str("address"))
                .and_then(|a| Q2qAddress::parse(a).ok());
            let name = match (name, &me) {
                (Some(n), _) => n,
                (None, Some(me)) => format!("{}.q2q", me.user),
                (None, None) => anyhow::bail!(
                    "no q2q-tun daemon is running for {}: start it with `sudo q2q-tun up`, or name a lookup to try",
                    home.root().display()
                ),
            };
            let tun = status.as_ref().and_then(|b| b.get_str("tun")).unwrap_or("");
            if tun.is_empty() {
                println!("not ok - the daemon runs without the TUN device and shim (--no-tun)");
            }
            let field = |k: &str| status.as_ref().and_then(|b| b.get_str(k)).unwrap_or("");
            let shim_addr = match field("dns").parse() {
                Ok(a) => a,
                Err(_) => {
                    let pool = q2q::dns::pool::Pool::new(Default::default())?;
                    std::net::SocketAddr::from((pool.node_ipv4(), 53))
                }
            };
            let paths = daemon::tun::resolver_paths(&home);
            let link = match field("tun_device") {
                "" => "q2q0".to_string(),
                d => d.to_string(),
            };
            let checks = daemon::resolver::doctor(&paths, &link, &name, shim_addr).await;
            let mut bad = 0;
            for c in &checks {
                println!("{} - {}", if c.ok { "ok" } else { "not ok" }, c.what);
                bad += usize::from(!c.ok);
            }
            if bad > 0 {
                anyhow::bail!("{bad} of {} DNS checks failed", checks.len());
            }
        }
        Command::Status => {
            let b = daemon::ask(&home, AmpBox::command("status")).await?;
            println!(
                "{} (UDP {})",
                b.get_str("address").unwrap_or("?"),
                b.get_str("udp").unwrap_or("?")
            );
            match b.get_str("tun") {
                Some(t) if !t.is_empty() => println!("{t}"),
                _ => println!("no TUN device (--no-tun)"),
            }
            let peers = b.get_str("peers").unwrap_or("");
            if peers.is_empty() {
                println!("no peers yet");
            } else {
                // One line per peer session: every stream with that person shares it.
                println!("{:<28} {:<7} {:<20} {:<32} why", "peer", "streams", "opened", "path");
                for line in peers.lines() {
                    let f: Vec<&str> = line.split('\t').collect();
                    if let [peer, streams, opened, path, why] = f.as_slice() {
                        println!("{peer:<28} {streams:<7} {opened:<20} {path:<32} {why}");
                    }
                }
            }
        }
        Command::Ping { address, count, as_address, relay_only } => {
            let to = Q2qAddress::parse(&address)?;
            let report = if daemon::socket_path(&home).exists() {
                let b = daemon::ask(
                    &home,
                    AmpBox::command("ping")
                        .with("to", to.to_string())
                        .with("count", count.to_string()),
                )
                .await?;
                PrintedPing::from_box(&b)
            } else {
                let wanted = as_address.as_deref().map(Q2qAddress::parse).transpose()?;
                let me = daemon::choose_identity(&home, wanted.as_ref())?;
                let config = NodeConfig { direct: !relay_only, ..Default::default() };
                let node = Node::start(home.clone(), me, config).await?;
                let r = node.ping(&to, count, std::time::Duration::from_millis(200)).await?;
                node.leave().await;
                PrintedPing::from_box(&daemon::report_box(&r))
            };
            report.print();
        }
    }
    Ok(())
}

/// A progress bar on stderr (hidden when stderr is not a terminal).
struct Bar(indicatif::ProgressBar);

impl Bar {
    fn new(verb: &str) -> Bar {
        use std::io::IsTerminal;
        let target = if std::io::stderr().is_terminal() {
            indicatif::ProgressDrawTarget::stderr()
        } else {
            indicatif::ProgressDrawTarget::hidden()
        };
        let bar = indicatif::ProgressBar::with_draw_target(Some(0), target);
        let style = indicatif::ProgressStyle::with_template(&format!(
            "{verb} {{msg}} [{{bar:30}}] {{bytes}}/{{total_bytes}} {{bytes_per_sec}} {{eta}} left"
        ))
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
        bar.set_style(style);
        Bar(bar)
    }
}

impl transfer::Progress for Bar {
    fn start(&mut self, total: u64) {
        self.0.set_length(total);
    }
    fn file(&mut self, name: &str) {
        self.0.set_message(name.to_string());
    }
    fn advance(&mut self, bytes: u64) {
        self.0.inc(bytes);
    }
    fn finish(&mut self) {
        self.0.finish_and_clear();
    }
}

/// Tell a running daemon to apply the services file again.
async fn reloaded(home: &Home) -> anyhow::Result<()> {
    if daemon::reload(home).await? {
        println!("the running daemon applied the change");
    }
    Ok(())
}

/// Start `q2q-tun up --foreground` in the background, logging to $Q2Q_HOME/q2q-tun.log,
/// and return once its control socket answers.
fn detach(home: &Home) -> anyhow::Result<()> {
    use std::os::unix::process::CommandExt;
    q2q::fsutil::create_private_dir(home.root())?;
    let log_path = home.root().join("q2q-tun.log");
    let log = std::fs::OpenOptions::new().create(true).append(true).open(&log_path)?;
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    args.push("--foreground".into());
    let mut child = std::process::Command::new(std::env::current_exe()?)
        .args(&args)
        .env("Q2Q_HOME", home.root())
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .process_group(0)
        .spawn()?;
    for _ in 0..100 {
        std::thread::sleep(std::time::Duration::from_millis(100));
        if let Some(status) = child.try_wait()? {
            let text = std::fs::read_to_string(&log_path).unwrap_or_default();
            let last =
                text.lines().rev().find(|l| l.starts_with("error:")).unwrap_or("see the log");
            anyhow::bail!("q2q-tun up failed ({status}): {}", last.trim_start_matches("error: "));
        }
        if std::os::unix::net::UnixStream::connect(daemon::socket_path(home)).is_ok() {
            println!("q2q-tun is up (pid {}); log: {}", child.id(), log_path.display());
            return Ok(());
        }
    }
    anyhow::bail!("q2q-tun up did not come up within 10 s; see {}", log_path.display())
}

/// A ping report as printed.
struct PrintedPing {
    peer: String,
    connect_ms: f64,
    rtts_ms: Vec<f64>,
    path: String,
    why: String,
}

impl PrintedPing {
    fn from_box(b: &AmpBox) -> PrintedPing {
        let us = |s: &str| s.parse::<f64>().map(|v| v / 1000.0).unwrap_or(f64::NAN);
        PrintedPing {
            peer: b.get_str("peer").unwrap_or("?").to_string(),
            connect_ms: us(b.get_str("connect_us").unwrap_or("")),
            rtts_ms: b
                .get_str("rtts_us")
                .unwrap_or("")
                .split(',')
                .filter(|s| !s.is_empty())
                .map(us)
                .collect(),
            path: b.get_str("path").unwrap_or("?").to_string(),
            why: b.get_str("why").unwrap_or("").to_string(),
        }
    }

    fn print(&self) {
        println!("PING {}: connected in {:.1} ms", self.peer, self.connect_ms);
        for (i, rtt) in self.rtts_ms.iter().enumerate() {
            println!("reply {} from {}: time={rtt:.2} ms", i + 1, self.peer);
        }
        let n = self.rtts_ms.len().max(1) as f64;
        let min = self.rtts_ms.iter().cloned().fold(f64::INFINITY, f64::min);
        let max = self.rtts_ms.iter().cloned().fold(0.0, f64::max);
        let avg = self.rtts_ms.iter().sum::<f64>() / n;
        println!("{} replies, min/avg/max = {min:.2}/{avg:.2}/{max:.2} ms", self.rtts_ms.len());
        println!("path: {} ({})", self.path, self.why);
    }
}
