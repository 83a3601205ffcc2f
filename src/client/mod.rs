//! The client side of the identity server: registering an address, getting its
//! certificate, learning a domain's CA, asking what address the server sees.

pub mod control;
pub mod discover;
pub mod home;

pub use control::{ClientError, ConnectOptions, ServerConn};
pub use home::{Home, HomeError, StoredIdentity};

use crate::address::Q2qAddress;
use crate::identity::{self, CertInfo, Fingerprint};
use std::net::SocketAddr;
use std::time::Duration;

/// What `register` produced.
#[derive(Debug)]
pub struct Registered {
    pub address: Q2qAddress,
    pub server: String,
    pub info: CertInfo,
    pub ca: Fingerprint,
    pub newly_pinned: bool,
}

/// Register `address` (unless `existing`), make a key here, have the domain CA sign it,
/// check the certificate, and store key (0600), certificate and CA pin under `home`.
pub async fn register(
    home: &Home,
    address: &Q2qAddress,
    password: &str,
    invite: Option<&str>,
    existing: bool,
    opts: &ConnectOptions,
) -> Result<Registered, ClientError> {
    let conn = ServerConn::connect(home, &address.domain, opts).await?;
    let bad = |what: String| ClientError::BadAnswer { domain: address.domain.clone(), what };
    let stated = conn.identify(&address.domain).await?;
    if stated != conn.ca {
        return Err(bad("`identify` names a different CA than the TLS handshake".into()));
    }
    if !existing {
        conn.register(address, password, invite).await?;
    }
    let key = identity::generate_key().map_err(|e| bad(e.to_string()))?;
    let csr = identity::signing_request(&key).map_err(|e| bad(e.to_string()))?;
    let cert_pem = conn.sign(address, password, &csr).await?;
    let der = identity::cert_from_pem(&cert_pem).map_err(|e| bad(e.to_string()))?;
    let info =
        identity::verify_identity(&der, &conn.ca, address, rustls::pki_types::UnixTime::now())
            .map_err(|e| bad(e.to_string()))?;
    home.save_identity(address, &key.serialize_pem(), &cert_pem, &conn.server)?;
    Ok(Registered {
        address: address.clone(),
        server: conn.server.clone(),
        info,
        ca: Fingerprint::of(&conn.ca),
        newly_pinned: conn.newly_pinned,
    })
}

/// Renew `id`'s certificate over `conn`, a connection to its domain's server logged in
/// with `id`'s key. The answer is checked (it is `id`'s address, signed by the domain CA
/// the connection verified, for the same key) and returned as an identity to store;
/// nothing is written here.
pub async fn renew(conn: &ServerConn, id: &StoredIdentity) -> Result<StoredIdentity, ClientError> {
    let cert_pem = conn.renew(&id.cert_pem).await?;
    let bad = |what: String| ClientError::BadAnswer { domain: id.address.domain.clone(), what };
    let der = identity::cert_from_pem(&cert_pem).map_err(|e| bad(e.to_string()))?;
    let info =
        identity::verify_identity(&der, &conn.ca, &id.address, rustls::pki_types::UnixTime::now())
            .map_err(|e| bad(format!("the renewed certificate: {e}")))?;
    if info.public_key != id.info.public_key {
        return Err(bad("the renewed certificate is for another key".into()));
    }
    Ok(StoredIdentity { cert_pem, info, ..id.clone() })
}

/// Ask the server at `server` over UDP which address it sees; up to 3 tries, 1 s each.
pub async fn udp_who_am_i(
    socket: &tokio::net::UdpSocket,
    server: SocketAddr,
) -> std::io::Result<SocketAddr> {
    let ask = UdpWhoAmI { to: server, answer_from: server, ..UdpWhoAmI::default() };
    Ok(ask.send(socket).await?.seen)
}

/// A UDP who-am-i question ([`crate::proto::whoami`]) as `netcheck` asks it.
#[derive(Debug, Clone, Copy)]
pub struct UdpWhoAmI {
    /// The server's UDP address asked.
    pub to: SocketAddr,
    /// The flags of the request.
    pub flags: crate::proto::whoami::Flags,
    /// The address the answer must come from (`to`, or the server's second socket when the
    /// flags ask for the answer from there); answers from elsewhere are ignored.
    pub answer_from: SocketAddr,
    /// Requests sent, each waiting `wait` for its answer.
    pub tries: u32,
    pub wait: Duration,
}

impl Default for UdpWhoAmI {
    fn default() -> Self {
        let any = SocketAddr::from(([0, 0, 0, 0], 0));
        UdpWhoAmI {
            to: any,
            flags: crate::proto::whoami::Flags::default(),
            answer_from: any,
            tries: 3,
            wait: Duration::from_secs(1),
        }
    }
}

/// What a UDP who-am-i answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UdpAnswer {
    /// The address the server saw the request come from.
    pub seen: SocketAddr,
    /// The server's second UDP port as the reply gave it (None: not in the reply, as from a
    /// server that ignored the flags; 0: the server has none).
    pub second_port: Option<u16>,
    /// The server's second address as the reply gave it (None: not in the reply; Some(None):
    /// the server has none of this family).
    pub second_addr: Option<Option<SocketAddr>>,
    /// From the last request sent to the answer.
    pub rtt: Duration,
}

impl UdpWhoAmI {
    /// Send the question from `socket` and wait for its answer.
    ///
    /// # Errors
    /// `TimedOut` when no answer came from `answer_from` after every try; the socket's
    /// own errors.
    pub async fn send(&self, socket: &tokio::net::UdpSocket) -> std::io::Result<UdpAnswer> {
        let nonce: [u8; 8] = rand::random();
        let request = crate::proto::whoami::request_with(nonce, self.flags);
        let mut buf = [0u8; 512];
        for _ in 0..self.tries {
            // Timed from before the send: on a veth or loopback path the answer can be
            // queued before send_to returns.
            let sent = tokio::time::Instant::now();
            socket.send_to(&request, self.to).await?;
            let deadline = sent + self.wait;
            while let Ok(r) = tokio::time::timeout_at(deadline, socket.recv_from(&mut buf)).await {
                let (n, from) = r?;
                if from != self.answer_from {
                    continue;
                }
                if let Ok(r) = crate::proto::whoami::Reply::parse_answer(&buf[..n], self.flags)
                    && r.nonce == nonce
                {
                    return Ok(UdpAnswer {
                        seen: r.seen,
                        second_port: r.second_port,
                        second_addr: r.second_addr,
                        rtt: sent.elapsed(),
                    });
                }
            }
        }
        Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("no who-am-i answer from {} over UDP", self.answer_from),
        ))
    }
}
