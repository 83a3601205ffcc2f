//! `q2q-tun`: the q2q client.

use clap::{Parser, Subcommand};
use q2q::address::{Domain, Q2qAddress};
use q2q::cli::{format_time, read_password};
use q2q::client::{self, ConnectOptions, Home, ServerConn};
use q2q::identity::Fingerprint;
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
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    q2q::cli::init_logging("warn");
    match run(Cli::parse()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
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
    }
    Ok(())
}
