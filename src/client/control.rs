//! A control connection from a client to a domain's identity server: TCP, TLS 1.3 with the
//! domain CA pinned, `hello`, then calls.

use super::discover::{self, Candidate};
use super::home::{Home, HomeError};
use crate::address::{Domain, Q2qAddress};
use crate::amp::{AmpBox, CallError, Incoming, PeerHandle};
use crate::identity::Fingerprint;
use crate::proto::commands::{
    Certificate, Hello, Identify, Register, Renew, Revocations, Sign, Subject, WhoAmI,
};
use crate::proto::{self, Command, ErrorCode, Message};
use crate::tls::CaPinVerifier;
use rustls_pki_types::{CertificateDer, ServerName};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpStream;
use tokio::sync::mpsc;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a client operation failed. Each is one line a person can act on.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No candidate address of the domain's server answered.
    #[error("{domain}'s server is unreachable (tried {tried})")]
    Unreachable { domain: Domain, tried: String },
    /// The server presents a different CA than the one pinned on first contact.
    #[error(
        "the CA of {domain} has changed: pinned {pinned}, the server presents {presented}. \
         This is what an attacker in the middle would look like. If {domain} really replaced \
         its CA (confirm with its admin), accept it deliberately with \
         --ca-fingerprint {presented}, or forget the old one with `q2q-tun forget-ca {domain}`"
    )]
    CaChanged { domain: Domain, pinned: Fingerprint, presented: Fingerprint },
    /// The server's CA is not the one given with `--ca-fingerprint`.
    #[error(
        "{domain}'s server presents CA {presented}, not the {expected} given with --ca-fingerprint"
    )]
    CaNotExpected { domain: Domain, expected: Fingerprint, presented: Fingerprint },
    /// TLS failed for another reason.
    #[error("secure connection to {addr} failed: {reason}")]
    Tls { addr: String, reason: String },
    /// The server refused the request; its sentence says why.
    #[error("{message}")]
    Refused { code: ErrorCode, message: String },
    /// The connection broke or the server spoke nonsense.
    #[error("talking to {domain}'s server failed: {source}")]
    Call { domain: Domain, source: CallError },
    /// The server took too long to answer.
    #[error("{domain}'s server did not answer within {secs} s")]
    Timeout { domain: Domain, secs: u64 },
    /// The server answered without a field it must send.
    #[error("{domain}'s server sent an invalid answer: {what}")]
    BadAnswer { domain: Domain, what: String },
    #[error(transparent)]
    Home(#[from] HomeError),
}

impl ClientError {
    /// The server's error code, when the server refused.
    pub fn code(&self) -> Option<&str> {
        self.error_code().map(ErrorCode::as_str)
    }

    /// The server's error code, typed, when the server refused.
    pub fn error_code(&self) -> Option<&ErrorCode> {
        match self {
            ClientError::Refused { code, .. } => Some(code),
            _ => None,
        }
    }
}

/// How to reach a domain's server.
#[derive(Debug, Clone, Default)]
pub struct ConnectOptions {
    /// `host:port`, overriding config and DNS.
    pub server: Option<String>,
    /// Accept only a CA with this fingerprint (and re-pin to it).
    pub ca_fingerprint: Option<Fingerprint>,
    /// Log in with this identity's certificate (TLS client auth).
    pub login: Option<Arc<super::home::StoredIdentity>>,
}

impl ConnectOptions {
    fn login(
        &self,
    ) -> Result<
        Option<(Vec<CertificateDer<'static>>, rustls_pki_types::PrivateKeyDer<'static>)>,
        ClientError,
    > {
        let Some(id) = &self.login else { return Ok(None) };
        let bad = |e: crate::identity::CertError| ClientError::BadAnswer {
            domain: id.address.domain.clone(),
            what: format!("stored identity of {}: {e}", id.address),
        };
        let cert = crate::identity::cert_from_pem(&id.cert_pem).map_err(bad)?;
        let key = crate::identity::key_from_pem(&id.key_pem).map_err(bad)?;
        Ok(Some((vec![cert], key)))
    }
}

/// An open control connection.
pub struct ServerConn {
    peer: PeerHandle,
    /// Requests the server sends us (taken by the presence layer).
    pub incoming: Option<mpsc::Receiver<Incoming>>,
    pub domain: Domain,
    /// The `host:port` that answered.
    pub server: String,
    pub ca: CertificateDer<'static>,
    /// True if this connection pinned the CA (first contact, or a deliberate re-pin).
    pub newly_pinned: bool,
}

impl ServerConn {
    /// Connect to `domain`'s server, verify it by its pinned CA (pinning on first contact),
    /// and say hello.
    pub async fn connect(
        home: &Home,
        domain: &Domain,
        opts: &ConnectOptions,
    ) -> Result<ServerConn, ClientError> {
        let config = home.config()?;
        let pinned = home.pinned_ca(domain)?;
        let pinned_fp = pinned.as_ref().map(|c| Fingerprint::of(c));
        let expected = opts.ca_fingerprint.or(pinned_fp);
        let candidates = discover::locate(domain, opts.server.as_deref(), &config).await;
        let mut tried = Vec::new();
        for Candidate { addr, source } in candidates {
            let tcp = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr.as_str()))
                .await
            {
                Ok(Ok(t)) => t,
                Ok(Err(e)) => {
                    tried.push(format!("{addr} from {source}: {e}"));
                    continue;
                }
                Err(_) => {
                    tried.push(format!(
                        "{addr} from {source}: no answer in {} s",
                        CONNECT_TIMEOUT.as_secs()
                    ));
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let verifier = Arc::new(CaPinVerifier::new(domain.clone(), expected));
            let tls_config = crate::tls::client_config(verifier.clone(), opts.login()?)
                .map_err(|e| ClientError::Tls { addr: addr.clone(), reason: e.to_string() })?;
            let name = ServerName::try_from(domain.to_string())
                .map_err(|e| ClientError::Tls { addr: addr.clone(), reason: e.to_string() })?;
            let connector = tokio_rustls::TlsConnector::from(Arc::new(tls_config));
            let handshake =
                tokio::time::timeout(CONNECT_TIMEOUT, connector.connect(name, tcp)).await;
            let presented = verifier.presented_ca();
            let presented_fp = presented.as_ref().map(|c| Fingerprint::of(c));
            let stream = match handshake {
                Ok(Ok(s)) => s,
                other => {
                    if let (Some(expected), Some(presented)) = (expected, presented_fp)
                        && expected != presented
                    {
                        return Err(match opts.ca_fingerprint {
                            Some(_) => ClientError::CaNotExpected {
                                domain: domain.clone(),
                                expected,
                                presented,
                            },
                            None => ClientError::CaChanged {
                                domain: domain.clone(),
                                pinned: expected,
                                presented,
                            },
                        });
                    }
                    let reason = match other {
                        Ok(Err(e)) => e.to_string(),
                        _ => format!("no TLS handshake in {} s", CONNECT_TIMEOUT.as_secs()),
                    };
                    return Err(ClientError::Tls { addr, reason });
                }
            };
            let ca = presented.ok_or_else(|| ClientError::Tls {
                addr: addr.clone(),
                reason: "server sent no CA certificate".into(),
            })?;
            let newly_pinned = pinned_fp != presented_fp;
            if newly_pinned {
                home.pin_ca(domain, &ca)?;
            }
            let (peer, incoming) = crate::amp::peer::spawn(stream);
            let sc = ServerConn {
                peer,
                incoming: Some(incoming),
                domain: domain.clone(),
                server: addr,
                ca,
                newly_pinned,
            };
            sc.call(&Hello { version: proto::VERSION.to_string() }).await?;
            return Ok(sc);
        }
        Err(ClientError::Unreachable { domain: domain.clone(), tried: tried.join("; ") })
    }

    /// The handle for calls from other tasks.
    pub fn handle(&self) -> PeerHandle {
        self.peer.clone()
    }

    /// Call `cmd` (with a timeout) and decode its answer. An error box becomes
    /// [`ClientError::Refused`], an answer that does not decode [`ClientError::BadAnswer`].
    pub async fn call<C: Command>(&self, cmd: &C) -> Result<C::Answer, ClientError> {
        let b = self.call_box(cmd.request()).await?;
        C::Answer::from_box(&b).map_err(|e| ClientError::BadAnswer {
            domain: self.domain.clone(),
            what: e.description,
        })
    }

    /// Send `cmd` without waiting for an answer (a relayed datagram).
    pub async fn tell<C: Command>(&self, cmd: &C) -> Result<(), ClientError> {
        self.tell_box(cmd.request()).await
    }

    /// Send a box as it is, wanting no answer. For tests and tools that speak the protocol
    /// by hand (malformed requests); the library uses [`ServerConn::tell`].
    pub async fn tell_box(&self, request: AmpBox) -> Result<(), ClientError> {
        self.peer
            .tell(request)
            .await
            .map_err(|source| ClientError::Call { domain: self.domain.clone(), source })
    }

    /// Call with a box as it is (with a timeout); error boxes become
    /// [`ClientError::Refused`]. For tests and tools that speak the protocol by hand
    /// (malformed requests); the library uses [`ServerConn::call`].
    pub async fn call_box(&self, request: AmpBox) -> Result<AmpBox, ClientError> {
        match tokio::time::timeout(CALL_TIMEOUT, self.peer.call(request)).await {
            Err(_) => Err(ClientError::Timeout {
                domain: self.domain.clone(),
                secs: CALL_TIMEOUT.as_secs(),
            }),
            Ok(Ok(b)) => Ok(b),
            Ok(Err(CallError::Remote { code, description })) => {
                Err(ClientError::Refused { code: ErrorCode::parse(&code), message: description })
            }
            Ok(Err(source)) => Err(ClientError::Call { domain: self.domain.clone(), source }),
        }
    }

    /// The domain CA, as the server states it in `identify`.
    pub async fn identify(&self, domain: &Domain) -> Result<CertificateDer<'static>, ClientError> {
        let Certificate { certificate } =
            self.call(&Identify { subject: Subject::Domain(domain.clone()) }).await?;
        crate::identity::cert_from_pem(&certificate).map_err(|e| ClientError::BadAnswer {
            domain: self.domain.clone(),
            what: e.to_string(),
        })
    }

    /// Create the account `address` with `password` (and an invite code, if the server
    /// takes registrations by invite).
    pub async fn register(
        &self,
        address: &Q2qAddress,
        password: &str,
        invite: Option<&str>,
    ) -> Result<(), ClientError> {
        let cmd = Register {
            address: address.clone(),
            password: password.to_string(),
            invite: invite.map(str::to_string),
        };
        self.call(&cmd).await.map(drop)
    }

    /// Have the CA sign `csr_pem` for `address`; returns the certificate PEM.
    pub async fn sign(
        &self,
        address: &Q2qAddress,
        password: &str,
        csr_pem: &str,
    ) -> Result<String, ClientError> {
        let cmd = Sign {
            address: address.clone(),
            password: password.to_string(),
            certificate_request: csr_pem.to_string(),
        };
        Ok(self.call(&cmd).await?.certificate)
    }

    /// Renew the certificate `current_pem` (for the key this connection logged in with);
    /// returns the new certificate PEM, unchecked.
    pub async fn renew(&self, current_pem: &str) -> Result<String, ClientError> {
        let cmd = Renew { certificate: Some(current_pem.to_string()) };
        Ok(self.call(&cmd).await?.certificate)
    }

    /// The revocation list of `domain` (DER, unverified: check it with
    /// [`crate::identity::revocation::RevocationList::verify`]), from its server.
    pub async fn revocations(&self, domain: &Domain) -> Result<Vec<u8>, ClientError> {
        Ok(self.call(&Revocations { domain: domain.clone() }).await?.list)
    }

    /// The address the server sees this TCP connection come from.
    pub async fn who_am_i(&self) -> Result<SocketAddr, ClientError> {
        Ok(self.call(&WhoAmI {}).await?.addr())
    }
}
