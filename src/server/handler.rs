//! One control connection: TLS, then AMP boxes answered one at a time.

use super::State;
use super::config::Registration;
use super::db::{CertRecord, DbError};
use crate::address::{Domain, Q2qAddress};
use crate::amp::{self, AmpBox};
use crate::proto::{code, command};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpStream;
use tracing::{debug, info, warn};

/// A control connection idle this long is closed.
const IDLE_TIMEOUT: Duration = Duration::from_secs(600);
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest password accepted (argon2 would hash more, but nobody needs it).
const MAX_PASSWORD_LEN: usize = 1024;

/// An error box to send: its code and sentence.
struct Refusal {
    code: &'static str,
    description: String,
}

fn refuse(code: &'static str, description: impl Into<String>) -> Refusal {
    Refusal { code, description: description.into() }
}

fn internal(e: impl std::fmt::Display) -> Refusal {
    warn!(error = %e, "internal error");
    refuse(code::INTERNAL, "internal server error")
}

pub(super) async fn serve(
    state: Arc<State>,
    acceptor: tokio_rustls::TlsAcceptor,
    tcp: TcpStream,
    peer: SocketAddr,
) {
    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(t)) => t,
        Ok(Err(e)) => return debug!(%peer, error = %e, "TLS handshake failed"),
        Err(_) => return debug!(%peer, "TLS handshake timed out"),
    };
    let client_cert =
        tls.get_ref().1.peer_certificates().and_then(|c| c.first()).map(|c| c.clone().into_owned());
    let (handle, mut incoming) = amp::peer::spawn(tls);
    let mut conn = Conn { state, peer, hello: false, client_cert, handle };
    loop {
        let request = match tokio::time::timeout(IDLE_TIMEOUT, incoming.recv()).await {
            Ok(Some(r)) => r,
            Ok(None) => return debug!(%peer, "connection closed"),
            Err(_) => return debug!(%peer, "idle connection closed"),
        };
        let result = conn.dispatch(&request.request).await;
        request.respond(result.map_err(|r| (r.code.to_string(), r.description))).await;
    }
}

#[allow(dead_code)] // client_cert and handle are used by presence (next)
struct Conn {
    state: Arc<State>,
    peer: SocketAddr,
    hello: bool,
    /// The certificate the client presented in the TLS handshake (possession of its key is
    /// proven; whose it is gets checked when a command needs an identity).
    client_cert: Option<rustls_pki_types::CertificateDer<'static>>,
    /// For asking this client things (presence notifications).
    handle: amp::PeerHandle,
}

fn arg<'a>(b: &'a AmpBox, key: &str) -> Result<&'a str, Refusal> {
    b.get_str(key).ok_or_else(|| refuse(code::BAD_REQUEST, format!("missing argument `{key}`")))
}

impl Conn {
    async fn dispatch(&mut self, b: &AmpBox) -> Result<AmpBox, Refusal> {
        let name = b.get_str(amp::COMMAND).unwrap_or("");
        if name == command::HELLO {
            return self.hello(b);
        }
        if !self.hello {
            return Err(refuse(code::HELLO_FIRST, "say hello (with the protocol version) first"));
        }
        match name {
            command::IDENTIFY => self.identify(b),
            command::REGISTER => self.register(b).await,
            command::SIGN => self.sign(b).await,
            command::WHO_AM_I => Ok(AmpBox::new()
                .with("host", self.peer.ip().to_string())
                .with("port", self.peer.port().to_string())),
            other => Err(refuse(code::UNHANDLED, format!("unknown command `{other}`"))),
        }
    }

    fn hello(&mut self, b: &AmpBox) -> Result<AmpBox, Refusal> {
        let version = arg(b, "version")?;
        if version != crate::proto::VERSION {
            return Err(refuse(
                code::UNSUPPORTED_VERSION,
                format!(
                    "this server speaks protocol version {}, not {version}",
                    crate::proto::VERSION
                ),
            ));
        }
        self.hello = true;
        Ok(AmpBox::new()
            .with("version", crate::proto::VERSION)
            .with("domain", self.state.domain.as_str())
            .with("server", concat!("q2q-server ", env!("CARGO_PKG_VERSION"))))
    }

    fn our_address(&self, s: &str) -> Result<Q2qAddress, Refusal> {
        let a = Q2qAddress::parse(s).map_err(|e| refuse(code::BAD_REQUEST, e.to_string()))?;
        if a.domain != self.state.domain {
            return Err(self.wrong_domain(&a.domain));
        }
        Ok(a)
    }

    fn wrong_domain(&self, d: &Domain) -> Refusal {
        refuse(code::WRONG_DOMAIN, format!("this server is for {}, not {d}", self.state.domain))
    }

    fn identify(&self, b: &AmpBox) -> Result<AmpBox, Refusal> {
        let subject = arg(b, "subject")?;
        let domain = match Q2qAddress::parse(subject) {
            Ok(a) => a.domain,
            Err(_) => {
                Domain::parse(subject).map_err(|e| refuse(code::BAD_REQUEST, e.to_string()))?
            }
        };
        if domain != self.state.domain {
            return Err(self.wrong_domain(&domain));
        }
        Ok(AmpBox::new().with("certificate", self.state.ca.cert_pem()))
    }

    async fn register(&self, b: &AmpBox) -> Result<AmpBox, Refusal> {
        let address = self.our_address(arg(b, "address")?)?;
        let password = arg(b, "password")?.to_string();
        let invite = b.get_str("invite").map(str::to_string);
        match (self.state.config.registration, &invite) {
            (Registration::Open, _) => {}
            (Registration::Closed, _) => {
                return Err(refuse(
                    code::REGISTRATION_CLOSED,
                    format!(
                        "{} does not take registrations; ask its admin for an account",
                        self.state.domain
                    ),
                ));
            }
            (Registration::Invite, None) => {
                return Err(refuse(
                    code::BAD_INVITE,
                    format!(
                        "{} takes registrations by invite only: pass an invite code",
                        self.state.domain
                    ),
                ));
            }
            (Registration::Invite, Some(_)) => {}
        }
        let min = self.state.config.min_password_len;
        if password.chars().count() < min || password.len() > MAX_PASSWORD_LEN {
            return Err(refuse(
                code::BAD_REQUEST,
                format!("the password must be {min} to {MAX_PASSWORD_LEN} characters long"),
            ));
        }
        let hash = self.state.hasher.hash(password).await.map_err(internal)?;
        let user = address.user.to_string();
        let invite = invite.filter(|_| self.state.config.registration == Registration::Invite);
        match self
            .state
            .with_db(move |db| db.add_user(&user, &hash, invite.as_deref()))
            .await
            .map_err(internal)?
        {
            Ok(()) => {
                info!(%address, peer = %self.peer, "registered");
                Ok(AmpBox::new())
            }
            Err(DbError::UserExists) => {
                Err(refuse(code::ADDRESS_TAKEN, format!("{address} is taken")))
            }
            Err(DbError::BadInvite) => {
                Err(refuse(code::BAD_INVITE, "the invite code is not valid or was used already"))
            }
            Err(e) => Err(internal(e)),
        }
    }

    async fn sign(&self, b: &AmpBox) -> Result<AmpBox, Refusal> {
        let address = self.our_address(arg(b, "address")?)?;
        let password = arg(b, "password")?.to_string();
        let csr = arg(b, "certificate_request")?.to_string();
        let user_key = format!("user:{}", address.user);
        let ip_key = format!("ip:{}", self.peer.ip());
        let keys = [user_key.as_str(), ip_key.as_str()];
        self.check_rate(&keys, &address)?;

        let user = address.user.to_string();
        let hash = self
            .state
            .with_db(move |db| db.password_hash(&user))
            .await
            .map_err(internal)?
            .map_err(internal)?;
        let Some(hash) = hash else {
            self.fail(&[&ip_key]);
            warn!(%address, peer = %self.peer, "sign for an unknown user");
            return Err(refuse(
                code::UNKNOWN_USER,
                format!("{address} is not registered on {}", self.state.domain),
            ));
        };
        if !self.state.hasher.verify(password, hash).await.map_err(internal)? {
            self.fail(&keys);
            // Never the password itself.
            warn!(%address, peer = %self.peer, "wrong password");
            return Err(refuse(code::WRONG_PASSWORD, format!("wrong password for {address}")));
        }
        if let Ok(mut l) = self.state.limiter.lock() {
            l.success(&user_key);
        }

        let lifetime = Duration::from_secs(u64::from(self.state.config.cert_lifetime_days) * 86400);
        let issued = self
            .state
            .ca
            .issue_user(&address, &csr, lifetime)
            .map_err(|e| refuse(code::BAD_REQUEST, e.to_string()))?;
        let record = CertRecord {
            serial: issued.info.serial.clone(),
            identity: address.to_string(),
            not_before: issued.info.not_before,
            not_after: issued.info.not_after,
            revoked: false,
        };
        self.state
            .with_db(move |db| db.record_certificate(&record))
            .await
            .map_err(internal)?
            .map_err(internal)?;
        info!(%address, serial = %issued.info.serial, peer = %self.peer, "certificate issued");
        Ok(AmpBox::new().with("certificate", issued.pem))
    }

    fn check_rate(&self, keys: &[&str], address: &Q2qAddress) -> Result<(), Refusal> {
        let verdict = match self.state.limiter.lock() {
            Ok(mut l) => l.check(keys, Instant::now()),
            Err(_) => Ok(()),
        };
        verdict.map_err(|wait| {
            warn!(%address, peer = %self.peer, wait_ms = wait.as_millis() as u64, "attempt refused: rate limited");
            refuse(
                code::RATE_LIMITED,
                format!(
                    "too many failed attempts for {address} or from {}; try again in {} s",
                    self.peer.ip(),
                    wait.as_millis().div_ceil(1000).max(1)
                ),
            )
        })
    }

    fn fail(&self, keys: &[&str]) {
        if let Ok(mut l) = self.state.limiter.lock() {
            l.failure(keys, Instant::now());
        }
    }
}
