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
    let mut conn = ServerConn::connect(home, &address.domain, opts).await?;
    let bad = |what: String| ClientError::BadAnswer { domain: address.domain.clone(), what };
    let stated = conn.identify(address.domain.as_str()).await?;
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
    let nonce: [u8; 8] = rand::random();
    let request = crate::proto::whoami::request(nonce);
    let mut buf = [0u8; 512];
    for _ in 0..3 {
        socket.send_to(&request, server).await?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
        while let Ok(r) = tokio::time::timeout_at(deadline, socket.recv_from(&mut buf)).await {
            let (n, from) = r?;
            if from != server {
                continue;
            }
            if let Ok((got, seen)) = crate::proto::whoami::parse_reply(&buf[..n])
                && got == nonce
            {
                return Ok(seen);
            }
        }
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        format!("no who-am-i answer from {server} over UDP"),
    ))
}
