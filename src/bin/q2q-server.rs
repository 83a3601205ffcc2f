//! `q2q-server`: the identity server of one domain.

use anyhow::Context;
use clap::{Parser, Subcommand};
use q2q::address::Domain;
use q2q::cli::{format_time, read_password};
use q2q::outln;
use q2q::server::{self, DataDir, Registration, ServerConfig, admin};
use std::net::SocketAddr;
use std::path::PathBuf;

/// The identity server of a q2q domain: it holds the domain's CA, registers people as
/// user@domain, signs their certificates, and answers who-am-i.
///
/// Start with `q2q-server init --domain example.com --data-dir DIR`, then
/// `q2q-server run --data-dir DIR`. Clients then run
/// `q2q-tun register alice@example.com --server HOST:8788`.
#[derive(Parser)]
#[command(version, max_term_width = 100)]
struct Cli {
    /// The server's data directory (CA, database, config.toml).
    #[arg(long, global = true, env = "Q2Q_SERVER_DIR", default_value = "/var/lib/q2q-server")]
    data_dir: PathBuf,
    /// Where the state lives, overriding config.toml's `database`: `sqlite` (the data
    /// directory's file) or a PostgreSQL URL shared by several instances of the domain
    /// (`postgres://user@host:port/db`). With `init`, written to config.toml; the admin
    /// verbs follow config.toml.
    #[arg(long, global = true, env = "Q2Q_DATABASE", hide_env_values = true)]
    database: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create the data directory: a new domain CA (key file mode 0600), the database and a
    /// config.toml documenting every setting. Refuses to touch an existing server.
    Init {
        /// The domain this server issues addresses for, e.g. example.com.
        #[arg(long)]
        domain: String,
        /// Who may register (written to config.toml).
        #[arg(long, value_enum, default_value = "open")]
        registration: Registration,
        /// Address to listen on for TCP and UDP (written to config.toml). `[::]` serves
        /// IPv6 and IPv4 alike.
        #[arg(long, default_value = "[::]:8788")]
        listen: SocketAddr,
    },
    /// Serve the domain: control connections on TCP, who-am-i on UDP (same port).
    Run {
        /// Config file (default: config.toml in the data directory).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Override the config's listen address.
        #[arg(long)]
        listen: Option<SocketAddr>,
    },
    /// Manage users (works while the server runs).
    #[command(subcommand)]
    User(UserCommand),
    /// Invite codes, for `registration = "invite"`.
    #[command(subcommand)]
    Invite(InviteCommand),
    /// Issued certificates.
    #[command(subcommand)]
    Cert(CertCommand),
    /// Print the domain and its CA fingerprint (for clients' --ca-fingerprint).
    Info,
}

#[derive(Subcommand)]
enum UserCommand {
    /// Add a user (the way to create accounts when registration is closed).
    Add {
        /// The user name, or user@domain.
        name: String,
        /// Read the password from the first line of this file (else Q2Q_PASSWORD, else a prompt).
        #[arg(long)]
        password_file: Option<PathBuf>,
    },
    /// Remove a user and revoke their certificates.
    Remove { name: String },
    /// List users with their number of issued certificates.
    List,
    /// Set a new password for a user.
    Passwd {
        name: String,
        #[arg(long)]
        password_file: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum InviteCommand {
    /// Create invite codes (each registers one address).
    Create {
        #[arg(long, default_value_t = 1)]
        count: u32,
    },
    /// List invite codes and who used them.
    List,
}

#[derive(Subcommand)]
enum CertCommand {
    /// List issued certificates (all, or one user's).
    List {
        #[arg(long)]
        user: Option<String>,
    },
    /// Mark a certificate revoked.
    Revoke { serial: String },
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    q2q::cli::init_logging("info");
    q2q::cli::exit(run(Cli::parse()).await)
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let dir = cli.data_dir;
    // The admin verbs work on the store config.toml names; a different --database would
    // be silently ignored, so it is refused.
    let admin_verb =
        matches!(cli.command, Command::User(_) | Command::Invite(_) | Command::Cert(_));
    if let Some(d) = cli.database.as_deref().filter(|_| admin_verb) {
        let path = dir.join(server::datadir::CONFIG_FILE);
        let config = ServerConfig::load(&path)?;
        if d != config.database.as_deref().unwrap_or("sqlite") {
            anyhow::bail!(
                "--database (or Q2Q_DATABASE) differs from the `database` of {}; the admin \
                 verbs use the one in config.toml",
                path.display()
            );
        }
    }
    match cli.command {
        Command::Init { domain, registration, listen } => {
            let domain = Domain::parse(&domain)?;
            let database = cli.database.filter(|d| d != "sqlite");
            let config = ServerConfig { registration, listen, database, ..Default::default() };
            let d = DataDir::init_at(&dir, &domain, &config).await?;
            outln!("initialised {} for {}", dir.display(), d.domain);
            outln!("CA fingerprint: {}", d.ca.fingerprint());
            outln!("config: {}", d.config_path().display());
            outln!("next: q2q-server run --data-dir {}", dir.display());
        }
        Command::Run { config, listen } => {
            let path = config.unwrap_or_else(|| dir.join(server::datadir::CONFIG_FILE));
            let mut config = ServerConfig::load(&path)?;
            if let Some(d) = cli.database {
                config.database = Some(d);
            }
            let d = DataDir::open_at(&dir, config.database.as_deref()).await?;
            if let Some(l) = listen {
                config.listen = l;
            }
            let running = server::start(d, config).await?;
            outln!(
                "q2q-server for {} listening on {} (tcp) and {} (udp)",
                running.domain,
                running.tcp_addr,
                running.udp_addr
            );
            tokio::select! {
                _ = running_wait_signal() => {}
            }
            running.shutdown().await;
        }
        Command::User(UserCommand::Add { name, password_file }) => {
            let pw = read_password(password_file.as_deref(), "Password for the new user: ", true)?;
            outln!("added {}", admin::add_user(&dir, &name, pw).await?);
        }
        Command::User(UserCommand::Remove { name }) => {
            outln!(
                "removed {} and revoked their certificates",
                admin::remove_user(&dir, &name).await?
            );
        }
        Command::User(UserCommand::List) => {
            let (domain, users) = admin::list_users(&dir).await?;
            outln!("{} users on {domain}", users.len());
            for u in users {
                outln!(
                    "{}@{domain}\tregistered {}\t{} certificates",
                    u.name,
                    format_time(u.created),
                    u.certificates
                );
            }
        }
        Command::User(UserCommand::Passwd { name, password_file }) => {
            let pw = read_password(password_file.as_deref(), "New password: ", true)?;
            outln!("password of {} changed", admin::set_password(&dir, &name, pw).await?);
        }
        Command::Invite(InviteCommand::Create { count }) => {
            for _ in 0..count.clamp(1, 1000) {
                outln!("{}", admin::create_invite(&dir).await?);
            }
        }
        Command::Invite(InviteCommand::List) => {
            for (code, used) in admin::list_invites(&dir).await? {
                outln!(
                    "{code}\t{}",
                    used.map_or_else(|| "unused".to_string(), |u| format!("used by {u}"))
                );
            }
        }
        Command::Cert(CertCommand::List { user }) => {
            for c in admin::list_certificates(&dir, user.as_deref()).await? {
                let state = if c.revoked { "revoked" } else { "valid" };
                outln!("{}\t{}\tuntil {}\t{state}", c.serial, c.identity, format_time(c.not_after));
            }
        }
        Command::Cert(CertCommand::Revoke { serial }) => {
            admin::revoke(&dir, &serial).await?;
            outln!("revoked {serial}");
        }
        Command::Info => {
            let d = DataDir::open_at(&dir, cli.database.as_deref())
                .await
                .context("cannot open the data directory")?;
            outln!("domain: {}", d.domain);
            outln!("CA fingerprint: {}", d.ca.fingerprint());
            outln!("users: {}", d.store.user_count().await?);
        }
    }
    Ok(())
}

/// Wait for SIGINT or SIGTERM.
async fn running_wait_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut term) = signal(SignalKind::terminate()) else {
        let _ = tokio::signal::ctrl_c().await;
        return;
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
