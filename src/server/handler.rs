//! One control connection: TLS, then AMP boxes answered one at a time.

use super::State;
use super::admission::Ticket;
use super::config::Registration;
use super::db::{CertRecord, DbError};
use super::presence::{Absent, Listener};
use super::relay::End;
use crate::address::{Domain, Q2qAddress, ServiceName};
use crate::amp::{self, AmpBox};
use crate::proto::{code, command};
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

/// An error box to send: its code and sentence.
struct Refusal {
    code: String,
    description: String,
}

fn refuse(code: &str, description: impl Into<String>) -> Refusal {
    Refusal { code: code.to_string(), description: description.into() }
}

/// A database call whose every failure is an internal error for the client.
async fn db<T>(call: impl std::future::Future<Output = Result<T, DbError>>) -> Result<T, Refusal> {
    call.await.map_err(internal)
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
    ticket: Ticket,
) {
    let login_deadline = tokio::time::Instant::now() + state.config.login_timeout();
    let handshake = state.config.handshake_timeout();
    // Told to close when newer connections need the room and this one has not logged in.
    let evicted = ticket.evicted();
    let tls = tokio::select! {
        r = tokio::time::timeout(handshake, acceptor.accept(tcp)) => match r {
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
        handle,
        id,
        ticket,
    };
    // A certificate of our own domain logs in at once (no network needed to check it).
    if conn.claims_our_domain() {
        let _ = conn.caller().await;
    }
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
        };
        let request = match next {
            Ok(Some(r)) => r,
            Ok(None) => {
                debug!(%peer, "connection closed");
                break;
            }
            // Not logged in by now: a certificate that checks out still counts.
            Err(_) if conn.caller.is_none() => {
                if conn.client_cert.is_some() && conn.caller().await.is_ok() {
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
            match conn.caller().await {
                Err(r) => request.respond(Err((r.code, r.description))).await,
                Ok(caller) => {
                    let (state, handle, id) = (conn.state.clone(), conn.handle.clone(), conn.id);
                    let me = Me { handle, id, seen: peer.ip() };
                    tokio::spawn(async move {
                        let result = if request.command() == command::INBOUND {
                            inbound(&state, &caller, &me, &request.request).await
                        } else {
                            candidates(&state, &caller, &me, &request.request).await
                        };
                        request.respond(result.map_err(|r| (r.code, r.description))).await;
                    });
                }
            }
            continue;
        }
        let result = conn.dispatch(&request.request).await;
        request.respond(result.map_err(|r| (r.code, r.description))).await;
    }
    state.presence.drop_connection(id);
    state.relay.drop_connection(id);
}

static NEXT_CONN: AtomicU64 = AtomicU64::new(1);

struct Conn {
    state: Arc<State>,
    peer: SocketAddr,
    hello: bool,
    /// The certificate the client presented in the TLS handshake (possession of its key is
    /// proven; whose it is gets checked when a command needs an identity).
    client_cert: Option<rustls_pki_types::CertificateDer<'static>>,
    /// The verified address of the client certificate, once checked.
    caller: Option<Q2qAddress>,
    /// For asking this client things (presence notifications).
    handle: amp::PeerHandle,
    id: u64,
    /// Its place in the admission counts.
    ticket: Ticket,
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
            command::RENEW => self.renew(b).await,
            command::PING => Ok(AmpBox::new()),
            command::LISTEN => self.listen(b).await,
            command::UNLISTEN => {
                let caller = self.caller().await?;
                let service = service_arg(b)?;
                self.state.presence.unlisten(&caller, &service, self.id);
                Ok(AmpBox::new())
            }
            command::RELAY => {
                let _ = self.caller().await?;
                relay_over_tcp(&self.state, self.id, b).await;
                Ok(AmpBox::new())
            }
            command::EXISTS => self.exists(b).await,
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
        self.admit_registration()?;
        let hash = self.state.hasher.hash(password).await.map_err(internal)?;
        let user = address.user.to_string();
        let invite = invite.filter(|_| self.state.config.registration == Registration::Invite);
        match self.state.store.add_user(&user, &hash, invite.as_deref()).await {
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

        // An unknown user and a wrong password get the same answer after the same work
        // (a dummy hash is checked), so `sign` does not tell who has an account.
        let user = address.user.to_string();
        let hash = db(self.state.store.password_hash(&user)).await?;
        let known = hash.is_some();
        if !self.state.hasher.verify(password, hash).await.map_err(internal)? {
            self.fail(&keys);
            // Never the password itself.
            warn!(%address, peer = %self.peer, known, "wrong user or password");
            return Err(refuse(
                code::WRONG_PASSWORD,
                format!("{address}: no such user or wrong password"),
            ));
        }
        if let Ok(mut l) = self.state.limiter.lock() {
            l.success(&user_key);
        }

        let lifetime = self.state.config.cert_lifetime();
        let issued = self
            .state
            .ca
            .issue_user(&address, &csr, lifetime)
            .map_err(|e| refuse(code::BAD_REQUEST, e.to_string()))?;
        let record = CertRecord::issued(&address, &issued.info);
        db(self.state.store.record_certificate(&record)).await?;
        info!(%address, serial = %issued.info.serial, peer = %self.peer, "certificate issued");
        Ok(AmpBox::new().with("certificate", issued.pem))
    }

    /// `renew`: a new certificate, with a fresh validity, for the key this connection logged
    /// in with. The certificate renewed is `certificate` (a node that renewed before on this
    /// connection holds a newer one than it logged in with) or else the login certificate;
    /// it must be for that same key and the caller's address, chain to our CA, be one we
    /// issued and did not revoke, and not have expired more than the tolerated clock skew
    /// ago; the account must exist. A few renewals per account per lifetime.
    async fn renew(&mut self, b: &AmpBox) -> Result<AmpBox, Refusal> {
        let caller = self.caller().await?;
        if caller.domain != self.state.domain {
            return Err(self.wrong_domain(&caller.domain));
        }
        let bad = |why: String| {
            warn!(address = %caller, peer = %self.peer, reason = %why, "renewal refused");
            refuse(code::BAD_CERTIFICATE, why)
        };
        let login = self.client_cert.clone().ok_or_else(|| bad("no login certificate".into()))?;
        let current = match b.get_str("certificate") {
            Some(pem) => crate::identity::cert_from_pem(pem)
                .map_err(|e| refuse(code::BAD_REQUEST, format!("`certificate`: {e}")))?,
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
                code::UNKNOWN_USER,
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
            .map_err(|e| refuse(code::BAD_REQUEST, e.to_string()))?;
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
                code::RATE_LIMITED,
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
        Ok(AmpBox::new().with("certificate", issued.pem))
    }

    /// The verified address of the client certificate: chained to its domain's CA (ours,
    /// or a federated domain's, fetched and pinned on first need), not revoked.
    async fn caller(&mut self) -> Result<Q2qAddress, Refusal> {
        if let Some(c) = &self.caller {
            return Ok(c.clone());
        }
        let cert = self.client_cert.as_ref().ok_or_else(|| {
            refuse(
                code::NOT_LOGGED_IN,
                "log in with your certificate first (q2q-tun register gets one)",
            )
        })?;
        let bad = |why: String| refuse(code::BAD_CERTIFICATE, why);
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
        if claimed.domain == self.state.domain {
            let serial = info.serial.clone();
            let revoked = db(self.state.store.is_revoked(&serial)).await?;
            if revoked {
                return Err(bad(format!("the certificate of {claimed} has been revoked")));
            }
        }
        info!(address = %claimed, peer = %self.peer, "logged in");
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
    async fn exists(&mut self, b: &AmpBox) -> Result<AmpBox, Refusal> {
        let caller = self.caller().await?;
        let address = self.our_address(arg(b, "address")?)?;
        // Per caller, and per source address: a stranger with a domain of their own can
        // make callers at will.
        let keys = [
            format!("caller:{caller}"),
            format!("ip:{}", super::admission::source_key(self.peer.ip())),
        ];
        let wait = match self.state.exists_limit.lock() {
            Ok(mut l) => {
                let now = Instant::now();
                let wait = keys.iter().map(|k| l.wait(k, now)).max().unwrap_or_default();
                if wait.is_zero() {
                    keys.iter().for_each(|k| l.take(k, now));
                }
                wait
            }
            Err(_) => Duration::ZERO,
        };
        if !wait.is_zero() {
            warn!(%caller, peer = %self.peer, "exists refused: rate limited");
            return Err(rate_limited(&format!("too many questions from {caller}"), wait));
        }
        let user = address.user.to_string();
        let known = db(self.state.store.password_hash(&user)).await?.is_some();
        Ok(AmpBox::new().with("exists", if known { "true" } else { "false" }))
    }

    async fn listen(&mut self, b: &AmpBox) -> Result<AmpBox, Refusal> {
        let caller = self.caller().await?;
        let service = service_arg(b)?;
        let description = b.get_str("description").unwrap_or("").chars().take(200).collect();
        let listener = Listener {
            conn: self.id,
            description,
            handle: self.handle.clone(),
            seen: self.peer.ip(),
        };
        if !self.state.presence.listen(&caller, service.clone(), listener) {
            return Err(refuse(code::BAD_REQUEST, "too many services"));
        }
        // Other instances of the domain find it once it is in the database.
        if let Some(cluster) = &self.state.cluster {
            cluster.flushed().await;
        }
        info!(address = %caller, %service, "listening");
        Ok(AmpBox::new())
    }

    fn check_rate(&self, keys: &[&str], address: &Q2qAddress) -> Result<(), Refusal> {
        let verdict = match self.state.limiter.lock() {
            Ok(mut l) => l.check(keys, Instant::now()),
            Err(_) => Ok(()),
        };
        verdict.map_err(|wait| {
            warn!(%address, peer = %self.peer, wait_ms = wait.as_millis() as u64, "attempt refused: rate limited");
            rate_limited(
                &format!("too many failed attempts for {address} or from {}", self.peer.ip()),
                wait,
            )
        })
    }

    /// Spend a registration of this source address and of the overall budget, or say
    /// how long to wait.
    fn admit_registration(&self) -> Result<(), Refusal> {
        let Ok(mut l) = self.state.registrations.lock() else { return Ok(()) };
        let (per_address, overall) = &mut *l;
        let now = Instant::now();
        let ip = super::admission::source_key(self.peer.ip()).to_string();
        let (mine, all) = (per_address.wait(&ip, now), overall.wait("", now));
        if mine.is_zero() && all.is_zero() {
            per_address.take(&ip, now);
            overall.take("", now);
            return Ok(());
        }
        warn!(peer = %self.peer, wait_ms = mine.max(all).as_millis() as u64, "registration refused: rate limited");
        Err(rate_limited(
            &format!("too many registrations on {}", self.state.domain),
            mine.max(all),
        ))
    }

    fn fail(&self, keys: &[&str]) {
        if let Ok(mut l) = self.state.limiter.lock() {
            l.failure(keys, Instant::now());
        }
    }
}

/// `RATE_LIMITED`: `what`, and how long to wait.
fn rate_limited(what: &str, wait: Duration) -> Refusal {
    refuse(
        code::RATE_LIMITED,
        format!("{what}; try again in {} s", wait.as_millis().div_ceil(1000).max(1)),
    )
}

fn service_arg(b: &AmpBox) -> Result<ServiceName, Refusal> {
    ServiceName::parse(arg(b, "service")?).map_err(|e| refuse(code::BAD_REQUEST, e.to_string()))
}

/// How long the callee has to answer an `inbound`.
const CALLEE_TIMEOUT: Duration = Duration::from_secs(10);

/// The caller's control connection, as `inbound` needs it.
struct Me {
    handle: amp::PeerHandle,
    id: u64,
    /// The IP address its control connection comes from.
    seen: std::net::IpAddr,
}

/// The `to` argument: an address of this server's domain.
fn callee_arg(state: &State, b: &AmpBox) -> Result<Q2qAddress, Refusal> {
    let to =
        Q2qAddress::parse(arg(b, "to")?).map_err(|e| refuse(code::BAD_REQUEST, e.to_string()))?;
    if to.domain != state.domain {
        return Err(refuse(
            code::WRONG_DOMAIN,
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
/// probe.
async fn candidates(
    state: &Arc<State>,
    caller: &Q2qAddress,
    me: &Me,
    b: &AmpBox,
) -> Result<AmpBox, Refusal> {
    let to = callee_arg(state, b)?;
    let session = arg(b, "session")?;
    if session.len() != 16 || u64::from_str_radix(session, 16).is_err() {
        return Err(refuse(code::BAD_REQUEST, "bad `session`"));
    }
    admit(state, caller, &to)?;
    let theirs = b.get_str("candidates").unwrap_or("");
    crate::proto::parse_candidates(theirs).map_err(|e| refuse(code::BAD_REQUEST, e))?;
    let Some(listener) = state.presence.any(&to) else {
        if state.cluster.is_some() {
            let ask = super::cluster::ask_candidates(caller, &to, session, theirs, me.seen);
            return remote(state, ask).await;
        }
        return Err(refuse(code::OFFLINE, format!("{to} is offline")));
    };
    let ask = AmpBox::command(command::CANDIDATES)
        .with("from", caller.to_string())
        .with("session", session)
        .with("candidates", theirs)
        .with("peer_seen", me.seen.to_string());
    let mine = ask_callee(&listener.handle, &to, ask).await?;
    Ok(AmpBox::new().with("candidates", mine).with("peer_seen", listener.seen.to_string()))
}

/// May `caller` ask `to` now (`inbound` and `candidates` share the per-pair and per-caller
/// limits)? Otherwise `RATE_LIMITED` with how long to wait.
fn admit(state: &State, caller: &Q2qAddress, to: &Q2qAddress) -> Result<(), Refusal> {
    state.presence.admit_inbound(caller, to, Instant::now()).map_err(|wait| {
        warn!(%caller, %to, wait_ms = wait.as_millis() as u64, "request refused: rate limited");
        rate_limited(&format!("too many connection requests from {caller} to {to}"), wait)
    })
}

/// Ask the callee's connection `ask` (at most [`CALLEE_TIMEOUT`]) and return the
/// candidates it answers, checked; its refusal passes through as it is.
async fn ask_callee(
    handle: &amp::PeerHandle,
    to: &Q2qAddress,
    ask: AmpBox,
) -> Result<String, Refusal> {
    let answer = match tokio::time::timeout(CALLEE_TIMEOUT, handle.call(ask)).await {
        Ok(Ok(a)) => a,
        Ok(Err(amp::CallError::Remote { code, description })) => {
            return Err(Refusal { code, description });
        }
        Ok(Err(_)) | Err(_) => return Err(refuse(code::OFFLINE, format!("{to} did not answer"))),
    };
    let theirs = answer.get_str("candidates").unwrap_or("").to_string();
    crate::proto::parse_candidates(&theirs)
        .map_err(|e| refuse(code::BAD_REQUEST, format!("{to} sent bad candidates: {e}")))?;
    Ok(theirs)
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
    b: &AmpBox,
) -> Result<AmpBox, Refusal> {
    let to = callee_arg(state, b)?;
    let service = service_arg(b)?;
    admit(state, caller, &to)?;
    let candidates = b.get_str("candidates").unwrap_or("");
    crate::proto::parse_candidates(candidates).map_err(|e| refuse(code::BAD_REQUEST, e))?;
    let listener = match state.presence.find(&to, &service) {
        Ok(l) => l,
        Err(Absent::Offline) if state.cluster.is_some() => {
            return remote(
                state,
                super::cluster::ask_inbound(caller, &to, &service, candidates, me.seen),
            )
            .await;
        }
        Err(a) => return Err(absent(a, &to, &service)),
    };
    let end = End { user: caller.to_string(), conn: me.id, handle: Some(me.handle.clone()) };
    set_up(state, caller, end, me.seen, &to, &service, listener, candidates, None).await
}

/// Why `to` cannot be asked for `service`.
fn absent(a: Absent, to: &Q2qAddress, service: &ServiceName) -> Refusal {
    match a {
        Absent::Offline => refuse(code::OFFLINE, format!("{to} is offline")),
        Absent::NoSuchService => {
            refuse(code::NO_SUCH_SERVICE, format!("{to} does not offer service {service}"))
        }
    }
}

/// Ask the instance where the callee of `ask` is logged in (see [`super::cluster`]); its
/// refusal passes through.
async fn remote(state: &Arc<State>, ask: AmpBox) -> Result<AmpBox, Refusal> {
    let Some(cluster) = &state.cluster else {
        return Err(refuse(code::OFFLINE, "offline"));
    };
    cluster.ask(ask).await.map_err(|(code, description)| Refusal { code, description })
}

/// Set up a session between `caller` (its relay end `caller_end`, its control connection
/// seen from `caller_seen`) and `to`'s `listener` on this instance: the relay legs here, the
/// callee asked, the caller's answer returned. `relay_host` tells a caller logged in at
/// another instance where this instance's relay is.
#[allow(clippy::too_many_arguments)]
async fn set_up(
    state: &Arc<State>,
    caller: &Q2qAddress,
    caller_end: End,
    caller_seen: std::net::IpAddr,
    to: &Q2qAddress,
    service: &ServiceName,
    listener: Listener,
    candidates: &str,
    relay_host: Option<std::net::IpAddr>,
) -> Result<AmpBox, Refusal> {
    let session: u64 = rand::random();
    let probe_key: [u8; 16] = rand::random();
    let now = Instant::now();
    let callee_end =
        End { user: to.to_string(), conn: listener.conn, handle: Some(listener.handle.clone()) };
    let (g_caller, g_callee) = state
        .relay
        .create(caller_end, callee_end, now)
        .ok_or_else(|| refuse(code::RELAY_LIMIT, "too many relayed sessions for this user"))?;
    let ask = AmpBox::command(command::INBOUND)
        .with("from", caller.to_string())
        .with("service", service.as_str())
        .with("candidates", candidates)
        .with("session", format!("{session:016x}"))
        .with("probe_key", hex::encode(probe_key))
        .with("relay_token", hex::encode(g_callee.token))
        .with("relay_key", g_callee.key.to_hex())
        .with("relay_port", state.udp_port.to_string())
        .with("peer_seen", caller_seen.to_string());
    // Refused, silent or nonsense: the legs go at once.
    let theirs = ask_callee(&listener.handle, to, ask)
        .await
        .inspect_err(|_| state.relay.remove(&g_caller.token))?;
    info!(from = %caller, %to, %service, session = format!("{session:016x}"), "connection set up");
    let mut answer = AmpBox::new()
        .with("peer", to.to_string())
        .with("candidates", theirs)
        .with("session", format!("{session:016x}"))
        .with("probe_key", hex::encode(probe_key))
        .with("relay_token", hex::encode(g_caller.token))
        .with("relay_key", g_caller.key.to_hex())
        .with("relay_port", state.udp_port.to_string())
        .with("peer_seen", listener.seen.to_string());
    if let Some(host) = relay_host {
        answer.insert("relay_host", host.to_string());
    }
    Ok(answer)
}

/// What another instance of the domain asks this one for a caller logged in there
/// ([`super::cluster`]): `inbound` for a callee logged in here (both relay legs here; the
/// caller's reached over UDP only, at this instance's `relay_host`), or `candidates`.
pub(super) async fn answer_remote(
    state: &Arc<State>,
    b: &AmpBox,
) -> Result<AmpBox, (String, String)> {
    let r = async {
        let caller = Q2qAddress::parse(arg(b, "from")?)
            .map_err(|e| refuse(code::BAD_REQUEST, e.to_string()))?;
        let to = callee_arg(state, b)?;
        let seen: std::net::IpAddr = arg(b, "peer_seen")?
            .parse()
            .map_err(|_| refuse(code::BAD_REQUEST, "bad `peer_seen`"))?;
        let candidates = b.get_str("candidates").unwrap_or("");
        match b.get_str(amp::COMMAND).unwrap_or("") {
            command::INBOUND => {
                let service = service_arg(b)?;
                let listener =
                    state.presence.find(&to, &service).map_err(|a| absent(a, &to, &service))?;
                let end =
                    End { user: caller.to_string(), conn: super::relay::REMOTE_CONN, handle: None };
                let host = state.config.relay_host();
                set_up(state, &caller, end, seen, &to, &service, listener, candidates, host).await
            }
            command::CANDIDATES => {
                let listener = state
                    .presence
                    .any(&to)
                    .ok_or_else(|| refuse(code::OFFLINE, format!("{to} is offline")))?;
                let ask = AmpBox::command(command::CANDIDATES)
                    .with("from", caller.to_string())
                    .with("session", arg(b, "session")?)
                    .with("candidates", candidates)
                    .with("peer_seen", seen.to_string());
                let mine = ask_callee(&listener.handle, &to, ask).await?;
                Ok(AmpBox::new()
                    .with("candidates", mine)
                    .with("peer_seen", listener.seen.to_string()))
            }
            other => Err(refuse(code::UNHANDLED, format!("unknown command `{other}`"))),
        }
    }
    .await;
    r.map_err(|r| (r.code, r.description))
}

/// A datagram a client relays over its control connection `conn`: only for a leg that
/// connection owns.
async fn relay_over_tcp(state: &Arc<State>, conn: u64, b: &AmpBox) {
    let Some(token) =
        b.get_str("token").and_then(|t| hex::decode(t).ok()).and_then(|t| t.try_into().ok())
    else {
        return;
    };
    let data = b.get("data").unwrap_or_default();
    match state.relay.forward_tcp(conn, &token, data, Instant::now()) {
        Ok(Some(f)) => state.send_forward(f).await,
        Ok(None) => {}
        Err(e) => debug!(conn, error = %e, "refused a datagram relayed over TCP"),
    }
}
