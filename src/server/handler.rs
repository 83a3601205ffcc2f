//! One control connection: TLS, then AMP boxes answered one at a time.

use super::State;
use super::admission::Ticket;
use super::config::Registration;
use super::db::{CertRecord, DbError};
use super::presence::{Absent, Listener, SeenAt};
use super::relay::End;
use crate::address::{Domain, Q2qAddress, ServiceName};
use crate::amp::{self, AmpBox};
use crate::proto::commands::{
    AlsoSeen, CandidateList, Candidates, CandidatesAnswer, CandidatesAsk, Certificate, Empty,
    Exists, ExistsAnswer, Grant, Hello, HelloAnswer, Identify, Inbound, InboundAnswer, InboundAsk,
    Listen, Register, Relay, RelayGrant, RemoteCandidates, RemoteInbound, Renew, RevocationList,
    Revocations, Seen, Sign, Unlisten,
};
use crate::proto::{Command, ErrorCode, Message, Refusal, command};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::net::TcpStream;
use tracing::{debug, info, warn};

/// A logged-in control connection idle this long is closed (one not logged in goes after
/// `login_timeout_secs`).
const IDLE_TIMEOUT: Duration = Duration::from_secs(600);
/// Renewals allowed per account within one certificate lifetime: a node renews once or
/// twice per lifetime; the rest is for a lost answer and a few machines per account.
const RENEWALS_PER_LIFETIME: i64 = 6;
/// Longest password accepted (argon2 would hash more, but nobody needs it).
const MAX_PASSWORD_LEN: usize = 1024;

fn refuse(code: ErrorCode, description: impl Into<String>) -> Refusal {
    Refusal::new(code, description)
}

/// A database call whose every failure is an internal error for the client.
async fn db<T>(call: impl std::future::Future<Output = Result<T, DbError>>) -> Result<T, Refusal> {
    call.await.map_err(internal)
}

fn internal(e: impl std::fmt::Display) -> Refusal {
    warn!(error = %e, "internal error");
    refuse(ErrorCode::Internal, "internal server error")
}

pub(super) async fn serve(
    state: Arc<State>,
    acceptor: tokio_rustls::TlsAcceptor,
    tcp: TcpStream,
    peer: SocketAddr,
    ticket: Ticket,
) {
    let login_deadline = tokio::time::Instant::now() + state.config.login_timeout();
    let handshake = state.config.handshake_timeout();
    // Told to close when newer connections need the room and this one has not logged in.
    let evicted = ticket.evicted();
    let tls = tokio::select! {
        r = tokio::time::timeout(handshake, Box::pin(acceptor.accept(tcp))) => match r {
            Ok(Ok(t)) => t,
            Ok(Err(e)) => return debug!(%peer, error = %e, "TLS handshake failed"),
            Err(_) => return debug!(%peer, "TLS handshake timed out"),
        },
        _ = evicted.notified() => return debug!(%peer, "closed for newer connections"),
    };
    let client_cert =
        tls.get_ref().1.peer_certificates().and_then(|c| c.first()).map(|c| c.clone().into_owned());
    let (handle, mut incoming) = amp::peer::spawn(tls);
    let id = NEXT_CONN.fetch_add(1, Ordering::Relaxed);
    let mut conn = Conn {
        state: state.clone(),
        peer,
        hello: false,
        client_cert,
        caller: None,
        serial: None,
        handle,
        id,
        ticket,
        also_seen: tokio::sync::watch::channel(None).0,
    };
    // Our domain's list as it changes (a revoked certificate's log-in closes at once), and
    // a timer to check a caller of another domain against its domain's list again.
    let mut revocations = state.revocations.subscribe();
    let mut recheck = tokio::time::interval(state.revocations.recheck_every());
    recheck.reset();
    // A certificate of our own domain logs in at once (no network needed to check it).
    if conn.claims_our_domain() {
        let _ = Box::pin(conn.caller()).await;
    }
    // Closed because its certificate was revoked: its relayed sessions end with it (else
    // they stay for its next connection, see `Relay::drop_connection`).
    let mut revoked = false;
    loop {
        let deadline = match conn.caller {
            Some(_) => tokio::time::Instant::now() + IDLE_TIMEOUT,
            None => login_deadline,
        };
        let next = tokio::select! {
            r = tokio::time::timeout_at(deadline, incoming.recv()) => r,
            _ = evicted.notified(), if !conn.ticket.is_logged_in() => {
                debug!(%peer, "closed for newer connections: not logged in");
                break;
            }
            _ = revocations.changed(), if conn.serial.is_some() => {
                if conn.revoked_now(&revocations.borrow_and_update()) {
                    revoked = true;
                    break;
                }
                continue;
            }
            _ = recheck.tick(), if conn.is_foreign() => {
                if !Box::pin(conn.still_valid()).await {
                    revoked = true;
                    break;
                }
                continue;
            }
        };
        let request = match next {
            Ok(Some(r)) => r,
            Ok(None) => {
                debug!(%peer, "connection closed");
                break;
            }
            // Not logged in by now: a certificate that checks out still counts.
            Err(_) if conn.caller.is_none() => {
                if conn.client_cert.is_some() && Box::pin(conn.caller()).await.is_ok() {
                    continue;
                }
                debug!(%peer, "connection closed: not logged in in time");
                break;
            }
            Err(_) => {
                debug!(%peer, "idle connection closed");
                break;
            }
        };
        // `inbound` waits for the callee; answer it on its own task so this connection's
        // other requests (relayed datagrams, pings) keep flowing meanwhile.
        // So does `candidates`, which asks the peer too.
        let asks_peer = [command::INBOUND, command::CANDIDATES].contains(&request.command());
        if asks_peer && conn.hello {
            match Box::pin(conn.caller()).await {
                Err(r) => request.respond(counted(&state, Err(r))).await,
                Ok(caller) => {
                    let (state, handle, id) = (conn.state.clone(), conn.handle.clone(), conn.id);
                    let serial = conn.serial.as_ref().map(|(s, _)| s.clone());
                    let seen = SeenAt { ip: peer.ip(), also: *conn.also_seen.borrow() };
                    let me = Me { handle, id, seen, serial };
                    tokio::spawn(async move {
                        let b = &request.request;
                        let result = if request.command() == command::INBOUND {
                            answer(async { inbound(&state, &caller, &me, decode(b)?).await }).await
                        } else {
                            answer(async { candidates(&state, &caller, &me, decode(b)?).await })
                                .await
                        };
                        request.respond(counted(&state, result)).await;
                    });
                }
            }
            continue;
        }
        // Boxed, like the other calls above: the future of a whole request is large, and
        // inline it would be held by every idle connection (10,000 of them, say).
        let result = Box::pin(conn.dispatch(request.command(), &request.request)).await;
        request.respond(counted(&state, result)).await;
    }
    if conn.caller.is_some() {
        state.metrics.live_sessions.decrement(1.0);
    }
    state.presence.drop_connection(id).await;
    state.relay.drop_connection(id, revoked).await;
}

static NEXT_CONN: AtomicU64 = AtomicU64::new(1);

/// The answer to send for `result`; a refusal is counted by its code.
fn counted(state: &State, result: Result<AmpBox, Refusal>) -> Result<AmpBox, amp::ErrorBox> {
    result.map_err(|r| {
        state.metrics.refusal(r.code.as_str());
        r.into()
    })
}

struct Conn {
    state: Arc<State>,
    peer: SocketAddr,
    hello: bool,
    /// The certificate the client presented in the TLS handshake (possession of its key is
    /// proven; whose it is gets checked when a command needs an identity).
    client_cert: Option<rustls_pki_types::CertificateDer<'static>>,
    /// The verified address of the client certificate, once checked.
    caller: Option<Q2qAddress>,
    /// Its serial (lowercase hex) and issuing CA, once checked (for revocation).
    serial: Option<(String, rustls_pki_types::CertificateDer<'static>)>,
    /// For asking this client things (presence notifications).
    handle: amp::PeerHandle,
    id: u64,
    /// Its place in the admission counts.
    ticket: Ticket,
    /// The IP of the other family it proved (`also-seen`); its listeners read it.
    also_seen: tokio::sync::watch::Sender<Option<std::net::IpAddr>>,
}

/// The arguments of `C` in `b`; a missing or malformed one is `BAD_REQUEST`.
fn decode<C: Command>(b: &AmpBox) -> Result<C, Refusal> {
    C::from_box(b)
}

/// The answer box of a handler's typed answer.
async fn answer<A: Message>(
    handler: impl std::future::Future<Output = Result<A, Refusal>>,
) -> Result<AmpBox, Refusal> {
    handler.await.map(|a| a.to_box())
}

impl Conn {
    /// Decode the request, run its handler, encode its answer. A command that needs a
    /// login checks it before its arguments, so a stranger learns nothing from them.
    async fn dispatch(&mut self, name: &str, b: &AmpBox) -> Result<AmpBox, Refusal> {
        if name == command::HELLO {
            return answer(async { self.hello(decode(b)?) }).await;
        }
        if !self.hello {
            return Err(refuse(
                ErrorCode::HelloFirst,
                "say hello (with the protocol version) first",
            ));
        }
        match name {
            command::IDENTIFY => answer(async { self.identify(decode(b)?) }).await,
            command::REVOCATIONS => answer(async { self.revocations(decode(b)?) }).await,
            command::REGISTER => answer(async { self.register(decode(b)?).await }).await,
            command::SIGN => answer(async { self.sign(decode(b)?).await }).await,
            command::RENEW => answer(async { self.renew(decode(b)?).await }).await,
            command::PING => Ok(Empty {}.to_box()),
            command::LISTEN => {
                let caller = self.caller().await?;
                answer(async { self.listen(caller, decode(b)?).await }).await
            }
            command::UNLISTEN => {
                let caller = self.caller().await?;
                let Unlisten { service } = decode(b)?;
                self.state.presence.unlisten(&caller, &service, self.id).await;
                Ok(Empty {}.to_box())
            }
            command::RELAY => {
                let caller = self.caller().await?;
                // A datagram with a malformed token is dropped, as a UDP one would be.
                if let Ok(r) = decode::<Relay>(b) {
                    relay_over_tcp(&self.state, self.id, &caller, &self.handle, r).await;
                }
                Ok(Empty {}.to_box())
            }
            command::EXISTS => {
                let caller = self.caller().await?;
                answer(async { self.exists(caller, decode(b)?).await }).await
            }
            command::WHO_AM_I => Ok(Seen::from(self.peer).to_box()),
            command::ALSO_SEEN => {
                let _ = self.caller().await?;
                answer(async { self.also_seen(decode(b)?) }).await
            }
            other => Err(refuse(ErrorCode::Unhandled, format!("unknown command `{other}`"))),
        }
    }

    fn hello(&mut self, Hello { version }: Hello) -> Result<HelloAnswer, Refusal> {
        if version != crate::proto::VERSION {
            return Err(refuse(
                ErrorCode::UnsupportedVersion,
                format!(
                    "this server speaks protocol version {}, not {version}",
                    crate::proto::VERSION
                ),
            ));
        }
        self.hello = true;
        Ok(HelloAnswer {
            version: crate::proto::VERSION.to_string(),
            domain: self.state.domain.clone(),
            server: concat!("q2q-server ", env!("CARGO_PKG_VERSION")).to_string(),
        })
    }

    /// `a` if it is of our domain, else `WRONG_DOMAIN`.
    fn our_address(&self, a: Q2qAddress) -> Result<Q2qAddress, Refusal> {
        if a.domain != self.state.domain {
            return Err(self.wrong_domain(&a.domain));
        }
        Ok(a)
    }

    fn wrong_domain(&self, d: &Domain) -> Refusal {
        refuse(ErrorCode::WrongDomain, format!("this server is for {}, not {d}", self.state.domain))
    }

    fn identify(&self, Identify { subject }: Identify) -> Result<Certificate, Refusal> {
        if *subject.domain() != self.state.domain {
            return Err(self.wrong_domain(subject.domain()));
        }
        Ok(Certificate { certificate: self.state.ca.cert_pem().to_string() })
    }

    /// `revocations`: our signed revocation list, to anyone (like `identify`).
    fn revocations(&self, Revocations { domain }: Revocations) -> Result<RevocationList, Refusal> {
        if domain != self.state.domain {
            return Err(self.wrong_domain(&domain));
        }
        let list = self.state.revocations.published();
        if list.der.is_empty() {
            return Err(internal("no revocation list to publish"));
        }
        Ok(RevocationList { list: list.der.clone() })
    }

    /// Whether this connection's certificate is on `list` (our domain's): then it closes.
    fn revoked_now(&self, list: &super::revocation::Published) -> bool {
        let (Some(caller), Some((serial, _))) = (&self.caller, &self.serial) else { return false };
        if caller.domain != self.state.domain || !list.revoked.contains(serial) {
            return false;
        }
        warn!(address = %caller, %serial, peer = %self.peer, "certificate revoked: closing its log-in");
        self.state.metrics.revoked_dropped.increment(1);
        true
    }

    /// Logged in with a certificate of another domain.
    fn is_foreign(&self) -> bool {
        self.caller.as_ref().is_some_and(|c| c.domain != self.state.domain)
    }

    /// Check a caller of another domain against its domain's list again: false if it
    /// was revoked meanwhile or can no longer be checked (fail closed).
    async fn still_valid(&self) -> bool {
        let (Some(caller), Some((serial, ca))) = (&self.caller, &self.serial) else { return true };
        let checked =
            super::revocation::check(&self.state, caller, ca, serial, self.peer.ip()).await;
        if let Err(e) = checked {
            warn!(address = %caller, peer = %self.peer, reason = %e, "closing a log-in");
            self.state.metrics.revoked_dropped.increment(1);
            return false;
        }
        true
    }

    async fn register(
        &self,
        Register { address, password, invite }: Register,
    ) -> Result<Empty, Refusal> {
        let address = self.our_address(address)?;
        match (self.state.config.registration, &invite) {
            (Registration::Open, _) => {}
            (Registration::Closed, _) => {
                return Err(refuse(
                    ErrorCode::RegistrationClosed,
                    format!(
                        "{} does not take registrations; ask its admin for an account",
                        self.state.domain
                    ),
                ));
            }
            (Registration::Invite, None) => {
                return Err(refuse(
                    ErrorCode::BadInvite,
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
                ErrorCode::BadRequest,
                format!("the password must be {min} to {MAX_PASSWORD_LEN} characters long"),
            ));
        }
        self.admit_registration().await?;
        let hash = self.state.hasher.hash(password).await.map_err(internal)?;
        let user = address.user.to_string();
        let invite = invite.filter(|_| self.state.config.registration == Registration::Invite);
        match self.state.store.add_user(&user, &hash, invite.as_deref()).await {
            Ok(()) => {
                self.state.metrics.registrations.increment(1);
                info!(%address, peer = %self.peer, "registered");
                Ok(Empty {})
            }
            Err(DbError::UserExists) => {
                Err(refuse(ErrorCode::AddressTaken, format!("{address} is taken")))
            }
            Err(DbError::BadInvite) => Err(refuse(
                ErrorCode::BadInvite,
                "the invite code is not valid or was used already",
            )),
            Err(e) => Err(internal(e)),
        }
    }

    async fn sign(&self, cmd: Sign) -> Result<Certificate, Refusal> {
        let Sign { address, password, certificate_request: csr } = cmd;
        let address = self.our_address(address)?;
        let user_key = format!("user:{}", address.user);
        let ip_key = format!("ip:{}", super::admission::source_key(self.peer.ip()));
        let keys = [user_key.as_str(), ip_key.as_str()];
        self.check_rate(&keys, &address).await?;

        // An unknown user and a wrong password get the same answer after the same work
        // (a dummy hash is checked), so `sign` does not tell who has an account.
        let user = address.user.to_string();
        let hash = db(self.state.store.password_hash(&user)).await?;
        let known = hash.is_some();
        if !self.state.hasher.verify(password, hash).await.map_err(internal)? {
            self.state.limits.failed_attempt(&keys).await;
            // Never the password itself.
            warn!(%address, peer = %self.peer, known, "wrong user or password");
            return Err(refuse(
                ErrorCode::WrongPassword,
                format!("{address}: no such user or wrong password"),
            ));
        }
        self.state.limits.good_attempt(&user_key).await;

        let lifetime = self.state.config.cert_lifetime();
        let issued = self
            .state
            .ca
            .issue_user(&address, &csr, lifetime)
            .map_err(|e| refuse(ErrorCode::BadRequest, e.to_string()))?;
        let record = CertRecord::issued(&address, &issued.info);
        db(self.state.store.record_certificate(&record)).await?;
        info!(%address, serial = %issued.info.serial, peer = %self.peer, "certificate issued");
        Ok(Certificate { certificate: issued.pem })
    }

    /// `renew`: a new certificate, with a fresh validity, for the key this connection logged
    /// in with. The certificate renewed is `certificate` (a node that renewed before on this
    /// connection holds a newer one than it logged in with) or else the login certificate;
    /// it must be for that same key and the caller's address, chain to our CA, be one we
    /// issued and did not revoke, and not have expired more than the tolerated clock skew
    /// ago; the account must exist. A few renewals per account per lifetime.
    async fn renew(&mut self, Renew { certificate }: Renew) -> Result<Certificate, Refusal> {
        let caller = self.caller().await?;
        if caller.domain != self.state.domain {
            return Err(self.wrong_domain(&caller.domain));
        }
        let bad = |why: String| {
            warn!(address = %caller, peer = %self.peer, reason = %why, "renewal refused");
            refuse(ErrorCode::BadCertificate, why)
        };
        let login = self.client_cert.clone().ok_or_else(|| bad("no login certificate".into()))?;
        let current = match certificate {
            Some(pem) => crate::identity::cert_from_pem(&pem)
                .map_err(|e| refuse(ErrorCode::BadRequest, format!("`certificate`: {e}")))?,
            None => login.clone(),
        };
        let login_key =
            crate::identity::CertInfo::parse(&login).map_err(|e| bad(e.to_string()))?.public_key;
        // A node whose clock is behind ours may ask a little late.
        let skew = crate::identity::renewal::BACKDATE;
        let now =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        let at = rustls_pki_types::UnixTime::since_unix_epoch(now.saturating_sub(skew));
        let info =
            crate::identity::verify_identity(&current, self.state.ca.cert_der(), &caller, at)
                .map_err(|e| bad(e.to_string()))?;
        if info.public_key != login_key {
            return Err(bad(
                "the certificate to renew is not for the key this connection logged in with".into(),
            ));
        }
        let user = caller.user.to_string();
        if db(self.state.store.password_hash(&user)).await?.is_none() {
            warn!(address = %caller, peer = %self.peer, "renewal for a removed account");
            return Err(refuse(
                ErrorCode::UnknownUser,
                format!("{caller} is not registered on {}", self.state.domain),
            ));
        }
        let serial = info.serial.clone();
        match db(self.state.store.certificate(&serial)).await? {
            None => return Err(bad(format!("{} issued no such certificate", self.state.domain))),
            Some(r) if r.revoked => {
                return Err(bad(format!("the certificate of {caller} has been revoked")));
            }
            Some(r) if r.identity != caller.to_string() => {
                return Err(bad(format!("that certificate was not issued to {caller}")));
            }
            Some(_) => {}
        }

        let lifetime = self.state.config.cert_lifetime();
        let issued = self
            .state
            .ca
            .renew_user(&caller, &current, lifetime)
            .map_err(|e| refuse(ErrorCode::BadRequest, e.to_string()))?;
        let record = CertRecord::issued(&caller, &issued.info);
        let since = now.saturating_sub(lifetime).as_secs() as i64;
        let previous = info.serial.clone();
        let recorded = db(self.state.store.record_renewal_limited(
            &record,
            &previous,
            since,
            RENEWALS_PER_LIFETIME,
        ))
        .await?;
        if !recorded {
            warn!(address = %caller, peer = %self.peer, "renewal refused: rate limited");
            return Err(refuse(
                ErrorCode::RateLimited,
                format!(
                    "{caller} renewed {RENEWALS_PER_LIFETIME} times within one certificate \
                     lifetime already; try again later"
                ),
            ));
        }
        info!(
            address = %caller,
            previous = %info.serial,
            serial = %issued.info.serial,
            not_after = issued.info.not_after,
            peer = %self.peer,
            "certificate renewed"
        );
        Ok(Certificate { certificate: issued.pem })
    }

    /// The verified address of the client certificate: chained to its domain's CA (ours,
    /// or a federated domain's, fetched and pinned on first need), not revoked.
    async fn caller(&mut self) -> Result<Q2qAddress, Refusal> {
        if let Some(c) = &self.caller {
            return Ok(c.clone());
        }
        let cert = self.client_cert.as_ref().ok_or_else(|| {
            refuse(
                ErrorCode::NotLoggedIn,
                "log in with your certificate first (q2q-tun register gets one)",
            )
        })?;
        let bad = |why: String| refuse(ErrorCode::BadCertificate, why);
        let info = crate::identity::CertInfo::parse(cert).map_err(|e| bad(e.to_string()))?;
        let claimed =
            info.address.ok_or_else(|| bad("the certificate names no q2q address".into()))?;
        let ca = if claimed.domain == self.state.domain {
            self.state.ca.cert_der().clone()
        } else {
            self.state
                .federation
                .ca_for(&claimed.domain, cert, self.peer.ip())
                .await
                .map_err(|e| bad(e.to_string()))?
        };
        let now = rustls_pki_types::UnixTime::now();
        let info = crate::identity::verify_identity(cert, &ca, &claimed, now)
            .map_err(|e| bad(e.to_string()))?;
        super::revocation::check(&self.state, &claimed, &ca, &info.serial, self.peer.ip())
            .await
            .map_err(|e| match e {
                super::revocation::Refused::Internal => internal(e),
                e => bad(e.to_string()),
            })?;
        info!(address = %claimed, peer = %self.peer, "logged in");
        self.state.metrics.logins.increment(1);
        self.state.metrics.live_sessions.increment(1.0);
        self.serial = Some((info.serial, ca));
        self.ticket.logged_in();
        self.caller = Some(claimed.clone());
        Ok(claimed)
    }

    /// Whether the client certificate names an address of our domain.
    fn claims_our_domain(&self) -> bool {
        self.client_cert
            .as_ref()
            .and_then(|c| crate::identity::CertInfo::parse(c).ok())
            .and_then(|i| i.address)
            .is_some_and(|a| a.domain == self.state.domain)
    }

    /// `exists`: whether `address` (of our domain) is registered. Only for logged-in
    /// callers, so strangers cannot list the users, and at a limited rate per caller and
    /// per source address.
    async fn exists(&self, caller: Q2qAddress, cmd: Exists) -> Result<ExistsAnswer, Refusal> {
        let address = self.our_address(cmd.address)?;
        // Per caller, and per source address: a stranger with a domain of their own can
        // make callers at will.
        let keys = [
            format!("caller:{caller}"),
            format!("ip:{}", super::admission::source_key(self.peer.ip())),
        ];
        if let Err(wait) = self.state.limits.exists(keys.into()).await {
            warn!(%caller, peer = %self.peer, "exists refused: rate limited");
            return Err(rate_limited(&format!("too many questions from {caller}"), wait));
        }
        let user = address.user.to_string();
        let known = db(self.state.store.password_hash(&user)).await?.is_some();
        Ok(ExistsAnswer { exists: known })
    }

    /// `also-seen`: a proven IP of the other family than the connection's, vouched for to
    /// peers from now on (replacing an earlier one).
    fn also_seen(&self, AlsoSeen { address, proof }: AlsoSeen) -> Result<Empty, Refusal> {
        if address.is_ipv4() == self.peer.ip().is_ipv4() {
            return Err(refuse(
                ErrorCode::BadRequest,
                "also-seen is for the other family than the control connection's",
            ));
        }
        if !self.state.proof_key.verify(address, &proof, super::unix_now()) {
            return Err(refuse(ErrorCode::BadRequest, format!("no valid proof for {address}")));
        }
        // Logged when it changes (it is shown again every 25 s).
        if self.also_seen.send_replace(Some(address)) != Some(address) {
            info!(peer = %self.peer, %address, "also seen");
        }
        Ok(Empty {})
    }

    async fn listen(&self, caller: Q2qAddress, cmd: Listen) -> Result<Empty, Refusal> {
        let Listen { service, description } = cmd;
        let description = description.unwrap_or_default().chars().take(200).collect();
        let listener = Listener {
            conn: self.id,
            description,
            handle: self.handle.clone(),
            seen: self.peer.ip(),
            also_seen: self.also_seen.subscribe(),
        };
        if !self.state.presence.listen(&caller, service.clone(), listener).await {
            return Err(refuse(ErrorCode::BadRequest, "too many services"));
        }
        // Other instances of the domain find it once it is in the database.
        if let Some(cluster) = &self.state.cluster {
            cluster.flushed().await;
        }
        info!(address = %caller, %service, "listening");
        Ok(Empty {})
    }

    async fn check_rate(&self, keys: &[&str], address: &Q2qAddress) -> Result<(), Refusal> {
        self.state.limits.check_attempt(keys).await.map_err(|wait| {
            warn!(%address, peer = %self.peer, wait_ms = wait.as_millis() as u64, "attempt refused: rate limited");
            rate_limited(
                &format!("too many failed attempts for {address} or from {}", self.peer.ip()),
                wait,
            )
        })
    }

    /// Spend a registration of this source address and of the overall budget, or say
    /// how long to wait. With PostgreSQL the budgets are the domain's, shared by every
    /// instance (kept in the database); else this process's.
    async fn admit_registration(&self) -> Result<(), Refusal> {
        let ip = super::admission::source_key(self.peer.ip()).to_string();
        let wait = match self.state.store.postgres() {
            Some(pg) => {
                let g = &self.state.config.registration_limit;
                let bucket = |key: String, burst: u32, every: u64| {
                    (key, f64::from(burst.max(1)), 1.0 / every.max(1) as f64)
                };
                let buckets = [
                    bucket("registrations".into(), g.overall_burst, g.overall_every_secs),
                    bucket(
                        format!("registrations:{ip}"),
                        g.per_address_burst,
                        g.per_address_every_secs,
                    ),
                ];
                db(pg.take_tokens(&buckets, unix_ms())).await?
            }
            None => self.state.limits.registration(&ip).await.err().unwrap_or_default(),
        };
        if wait.is_zero() {
            return Ok(());
        }
        warn!(peer = %self.peer, wait_ms = wait.as_millis() as u64, "registration refused: rate limited");
        Err(rate_limited(&format!("too many registrations on {}", self.state.domain), wait))
    }
}

/// Now, in milliseconds since the Unix epoch.
fn unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// `RATE_LIMITED`: `what`, and how long to wait.
fn rate_limited(what: &str, wait: Duration) -> Refusal {
    refuse(
        ErrorCode::RateLimited,
        format!("{what}; try again in {} s", wait.as_millis().div_ceil(1000).max(1)),
    )
}

/// How long the callee has to answer an `inbound`.
const CALLEE_TIMEOUT: Duration = Duration::from_secs(10);

/// The caller's control connection, as `inbound` needs it.
struct Me {
    handle: amp::PeerHandle,
    id: u64,
    /// The IP address its control connection comes from, and the one it proved.
    seen: SeenAt,
    /// The serial of the certificate it logged in with (the callee checks it against its
    /// own copy of the caller's domain's revocation list).
    serial: Option<String>,
}

impl Me {
    /// This connection as the relay end of `caller` (logged in on it).
    fn end(&self, caller: &Q2qAddress) -> End {
        End { user: caller.to_string(), conn: self.id, handle: Some(self.handle.clone()) }
    }
}

/// `to`'s relay end: the connection it listens on here.
fn listener_end(to: &Q2qAddress, listener: &Listener) -> End {
    End { user: to.to_string(), conn: listener.conn, handle: Some(listener.handle.clone()) }
}

/// The `to` argument, if it is an address of this server's domain.
fn callee(state: &State, to: Q2qAddress) -> Result<Q2qAddress, Refusal> {
    if to.domain != state.domain {
        return Err(refuse(
            ErrorCode::WrongDomain,
            format!(
                "this server is for {}, not {}: ask {}'s server",
                state.domain, to.domain, to.domain
            ),
        ));
    }
    Ok(to)
}

/// `candidates` from `caller`: fresh candidates for its live session with `to` (after a
/// network change). Rate-limited per pair like `inbound`; `to` checks the session is one it
/// has with `caller`, and answers its own candidates. Each side learns the IP the server
/// sees the other's connection come from (`peer_seen`), the only public address it will
/// probe. With `relay` (after a re-login), each side also gets its leg of the session's
/// relay again ([`super::relay::Relay::renew`]): taken by its connection now, or new when
/// this server forgot it; new legs `to` does not confirm go at once.
async fn candidates(
    state: &Arc<State>,
    caller: &Q2qAddress,
    me: &Me,
    cmd: Candidates,
) -> Result<CandidatesAnswer, Refusal> {
    let Candidates { to, session, candidates, relay } = cmd;
    let to = callee(state, to)?;
    admit(state, caller, &to).await?;
    let Some(listener) = state.presence.any(&to).await else {
        if state.cluster.is_some() {
            let ask = RemoteCandidates {
                from: caller.clone(),
                to: to.clone(),
                session,
                candidates,
                peer_seen: me.seen.ip,
                peer_seen_also: me.seen.also,
            };
            return remote(state, &to, None, &ask).await;
        }
        return Err(refuse(ErrorCode::Offline, format!("{to} is offline")));
    };
    let legs = if relay == Some(true) {
        let (caller_end, callee_end) = (me.end(caller), listener_end(&to, &listener));
        let (g_caller, g_callee, new) =
            state.relay.renew(caller_end, callee_end, session).await.ok_or_else(|| {
                refuse(ErrorCode::RelayLimit, "too many relayed sessions for this user")
            })?;
        if new {
            state.metrics.relay_legs.increment(2);
        }
        let grant = |g: super::relay::Grant| RelayGrant {
            relay_token: g.token,
            relay_key: g.key,
            relay_port: state.udp_port,
        };
        Some((grant(g_caller), grant(g_callee), new))
    } else {
        None
    };
    let ask = CandidatesAsk {
        from: caller.clone(),
        session,
        candidates,
        peer_seen: Some(me.seen.ip),
        peer_seen_also: me.seen.also,
        relay: legs.as_ref().map(|(_, g, _)| g.clone()),
    };
    let mine = match ask_callee(&listener.handle, &to, &ask).await {
        Ok(m) => m,
        Err(e) => {
            // Legs made for a session `to` does not confirm: gone at once (a caller must
            // not fill anyone's relay allowance with made-up sessions).
            if let Some((g, _, true)) = &legs {
                state.relay.remove(g.relay_token).await;
            }
            return Err(e);
        }
    };
    let theirs = listener.seen_at();
    Ok(CandidatesAnswer {
        candidates: mine,
        peer_seen: Some(theirs.ip),
        peer_seen_also: theirs.also,
        relay: legs.map(|(g, _, _)| g),
    })
}

/// May `caller` ask `to` now (`inbound` and `candidates` share the per-pair and per-caller
/// limits)? Otherwise `RATE_LIMITED` with how long to wait.
async fn admit(state: &State, caller: &Q2qAddress, to: &Q2qAddress) -> Result<(), Refusal> {
    state.presence.admit_inbound(caller, to, Instant::now()).await.map_err(|wait| {
        warn!(%caller, %to, wait_ms = wait.as_millis() as u64, "request refused: rate limited");
        rate_limited(&format!("too many connection requests from {caller} to {to}"), wait)
    })
}

/// Ask the callee's connection `ask` (at most [`CALLEE_TIMEOUT`]) and return the
/// candidates it answers, checked; its refusal passes through as it is.
async fn ask_callee<C: Command<Answer = CandidateList>>(
    handle: &amp::PeerHandle,
    to: &Q2qAddress,
    ask: &C,
) -> Result<Vec<std::net::SocketAddr>, Refusal> {
    let answer = match tokio::time::timeout(CALLEE_TIMEOUT, handle.call(ask.request())).await {
        Ok(Ok(a)) => a,
        Ok(Err(amp::CallError::Remote { code, description })) => {
            return Err(amp::ErrorBox { code, description }.into());
        }
        Ok(Err(_)) | Err(_) => {
            return Err(refuse(ErrorCode::Offline, format!("{to} did not answer")));
        }
    };
    let theirs = CandidateList::from_box(&answer).map_err(|e| {
        refuse(ErrorCode::BadRequest, format!("{to} sent bad candidates: {}", e.description))
    })?;
    Ok(theirs.candidates)
}

/// `inbound` from `caller`: check the callee listens, set up the relay legs, ask the callee
/// (which says whether the caller is authorized and gives its candidates), and answer the
/// caller with the callee's candidates. Both sides start probing when they get their box.
/// Each side learns its own leg (`relay_token`, `relay_key`) and the IP address the server
/// sees the other side's control connection come from (`peer_seen`). A callee logged in at
/// another instance of the domain is asked through it ([`super::cluster`]).
async fn inbound(
    state: &Arc<State>,
    caller: &Q2qAddress,
    me: &Me,
    cmd: Inbound,
) -> Result<InboundAnswer, Refusal> {
    state.metrics.inbound_requests.increment(1);
    let Inbound { to, service, candidates } = cmd;
    let to = callee(state, to)?;
    admit(state, caller, &to).await?;
    let listener = match state.presence.find(&to, &service).await {
        Ok(l) => l,
        Err(Absent::Offline) if state.cluster.is_some() => {
            let ask = RemoteInbound {
                from: caller.clone(),
                to: to.clone(),
                service: service.clone(),
                candidates,
                peer_seen: me.seen.ip,
                peer_seen_also: me.seen.also,
                from_serial: me.serial.clone(),
            };
            return remote(state, &to, Some(&service), &ask).await;
        }
        Err(a) => return Err(absent(a, &to, &service)),
    };
    let end = me.end(caller);
    let serial = me.serial.as_deref();
    set_up(state, caller, end, me.seen, &to, &service, listener, candidates, None, serial).await
}

/// Why `to` cannot be asked for `service`.
fn absent(a: Absent, to: &Q2qAddress, service: &ServiceName) -> Refusal {
    match a {
        Absent::Offline => refuse(ErrorCode::Offline, format!("{to} is offline")),
        Absent::NoSuchService => {
            refuse(ErrorCode::NoSuchService, format!("{to} does not offer service {service}"))
        }
    }
}

/// Ask the instance where the callee of `ask` is logged in (see [`super::cluster`]); its
/// refusal passes through, an answer that does not decode is `INTERNAL`.
async fn remote<C: Command>(
    state: &Arc<State>,
    to: &Q2qAddress,
    service: Option<&ServiceName>,
    ask: &C,
) -> Result<C::Answer, Refusal> {
    let Some(cluster) = &state.cluster else {
        return Err(refuse(ErrorCode::Offline, "offline"));
    };
    let (to, service) = (to.to_string(), service.map(ServiceName::as_str));
    let answer = cluster.ask(&to, service, ask.request()).await.map_err(Refusal::from)?;
    C::Answer::from_box(&answer).map_err(internal)
}

/// Set up a session between `caller` (its relay end `caller_end`, its control connection
/// seen from `caller_seen`) and `to`'s `listener` on this instance: the relay legs here, the
/// callee asked, the caller's answer returned. `relay_host` tells a caller logged in at
/// another instance where this instance's relay is. `caller_serial`: the serial of the
/// caller's certificate, for the callee to check against its revocation list (not known
/// for a caller logged in at another instance: the callee's TLS handshake checks anyway).
#[allow(clippy::too_many_arguments)]
async fn set_up(
    state: &Arc<State>,
    caller: &Q2qAddress,
    caller_end: End,
    caller_seen: SeenAt,
    to: &Q2qAddress,
    service: &ServiceName,
    listener: Listener,
    candidates: Vec<std::net::SocketAddr>,
    relay_host: Option<std::net::IpAddr>,
    caller_serial: Option<&str>,
) -> Result<InboundAnswer, Refusal> {
    let session: u64 = rand::random();
    let probe_key: [u8; 16] = rand::random();
    let callee_end = listener_end(to, &listener);
    let (g_caller, g_callee) =
        state.relay.create(caller_end, callee_end, session).await.ok_or_else(|| {
            refuse(ErrorCode::RelayLimit, "too many relayed sessions for this user")
        })?;
    state.metrics.relay_legs.increment(2);
    let grant = |candidates, g: super::relay::Grant, peer_seen: SeenAt, relay_host| Grant {
        candidates,
        session,
        probe_key,
        relay_token: g.token,
        relay_key: g.key,
        relay_port: state.udp_port,
        relay_host,
        peer_seen: Some(peer_seen.ip),
        peer_seen_also: peer_seen.also,
    };
    let ask = InboundAsk {
        from: caller.clone(),
        service: service.clone(),
        grant: grant(candidates, g_callee, caller_seen, None),
        from_serial: caller_serial.map(str::to_string),
    };
    // Refused, silent or nonsense: the legs go at once.
    let theirs = match ask_callee(&listener.handle, to, &ask).await {
        Ok(t) => t,
        Err(e) => {
            state.relay.remove(g_caller.token).await;
            return Err(e);
        }
    };
    info!(from = %caller, %to, %service, session = format!("{session:016x}"), "connection set up");
    Ok(InboundAnswer {
        peer: to.clone(),
        grant: grant(theirs, g_caller, listener.seen_at(), relay_host),
    })
}

/// What another instance of the domain asks this one for a caller logged in there
/// ([`super::cluster`]): `inbound` for a callee logged in here (both relay legs here; the
/// caller's reached at this instance's `relay_host`: over UDP, or over TCP once a connection
/// of the caller's here takes the leg), or `candidates`.
pub(super) async fn answer_remote(state: &Arc<State>, b: &AmpBox) -> Result<AmpBox, amp::ErrorBox> {
    let name = b.get_str(amp::COMMAND).unwrap_or("");
    let r = match name {
        RemoteInbound::NAME => {
            answer(async {
                let RemoteInbound {
                    from,
                    to,
                    service,
                    candidates,
                    peer_seen,
                    peer_seen_also,
                    from_serial,
                } = decode(b)?;
                let peer_seen = SeenAt { ip: peer_seen, also: peer_seen_also };
                let to = callee(state, to)?;
                let listener = state
                    .presence
                    .find(&to, &service)
                    .await
                    .map_err(|a| absent(a, &to, &service))?;
                let end =
                    End { user: from.to_string(), conn: super::relay::REMOTE_CONN, handle: None };
                let host = state.config.relay_host();
                let serial = from_serial.as_deref();
                set_up(
                    state, &from, end, peer_seen, &to, &service, listener, candidates, host, serial,
                )
                .await
            })
            .await
        }
        RemoteCandidates::NAME => {
            answer(async {
                let RemoteCandidates { from, to, session, candidates, peer_seen, peer_seen_also } =
                    decode(b)?;
                let to = callee(state, to)?;
                let listener = state
                    .presence
                    .any(&to)
                    .await
                    .ok_or_else(|| refuse(ErrorCode::Offline, format!("{to} is offline")))?;
                // The relay legs are not given again across instances: the caller asks
                // `relay` only of the instance that set the session up.
                let ask = CandidatesAsk {
                    from,
                    session,
                    candidates,
                    peer_seen: Some(peer_seen),
                    peer_seen_also,
                    relay: None,
                };
                let mine = ask_callee(&listener.handle, &to, &ask).await?;
                let theirs = listener.seen_at();
                Ok(CandidatesAnswer {
                    candidates: mine,
                    peer_seen: Some(theirs.ip),
                    peer_seen_also: theirs.also,
                    relay: None,
                })
            })
            .await
        }
        other => Err(refuse(ErrorCode::Unhandled, format!("unknown command `{other}`"))),
    };
    r.map_err(Into::into)
}

/// A datagram a client relays over its control connection `conn`: only for a leg that
/// connection owns (checked by the relay's owner). No data is a bind, which also lets the
/// connection take its user's leg of a session set up for it at another instance
/// ([`super::relay::Relay::claim`]; sent before the bind on the one channel, so taken first).
async fn relay_over_tcp(
    state: &Arc<State>,
    conn: u64,
    caller: &Q2qAddress,
    handle: &amp::PeerHandle,
    Relay { token, data }: Relay,
) {
    if data.is_empty() {
        state.relay.claim(conn, caller.to_string(), handle.clone(), token).await;
    }
    state.relay.forward_tcp(conn, token, data).await;
}
