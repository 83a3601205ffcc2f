//! `q2q-tun whoami`: the identities stored here, and with `--reflexive` the addresses their
//! servers see this machine at.

use crate::cli::format_time;
use crate::client::{self, ClientError, ConnectOptions, Home, HomeError, ServerConn};
use std::net::SocketAddr;

/// Why `whoami` stopped.
#[derive(Debug, thiserror::Error)]
pub enum WhoamiError {
    /// The identities could not be read.
    #[error(transparent)]
    Home(#[from] HomeError),
    /// The server could not be reached or refused.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// Resolving the server's address or asking it over UDP failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// The server's name resolved to no address.
    #[error("cannot resolve {0}")]
    Unresolved(String),
}

/// Print each identity of `home` on stdout (address, server, certificate serial and
/// expiry); with `reflexive`, ask each one's server over TCP and over UDP which address it
/// sees, printing each answer as it comes.
///
/// # Errors
/// See [`WhoamiError`]; lines printed before the error stay printed.
pub async fn print(home: &Home, reflexive: bool) -> Result<(), WhoamiError> {
    let ids = home.identities()?;
    if ids.is_empty() {
        crate::outln!(
            "no identity in {}: run `q2q-tun register you@domain` first",
            home.root().display()
        );
    }
    for id in ids {
        crate::outln!("{}", id.address);
        crate::outln!("  server:      {}", id.server.as_deref().unwrap_or("(unknown)"));
        crate::outln!(
            "  certificate: serial {}, valid until {}",
            id.info.serial,
            format_time(id.info.not_after)
        );
        if reflexive {
            let opts =
                ConnectOptions { server: id.server.clone(), ca_fingerprint: None, login: None };
            let conn = ServerConn::connect(home, &id.address.domain, &opts).await?;
            crate::outln!("  seen over TCP as {}", conn.who_am_i().await?);
            crate::outln!("  seen over UDP as {}", seen_over_udp(&conn.server).await?);
        }
    }
    Ok(())
}

/// The address `server` (`host:port`) sees a fresh UDP socket of this machine at.
async fn seen_over_udp(server: &str) -> Result<SocketAddr, WhoamiError> {
    let target = tokio::net::lookup_host(server)
        .await?
        .next()
        .ok_or_else(|| WhoamiError::Unresolved(server.to_string()))?;
    let bind = if target.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" };
    let sock = tokio::net::UdpSocket::bind(bind).await?;
    Ok(client::udp_who_am_i(&sock, target).await?)
}
