//! Inbound and consent: the callee's answer to `inbound` (default deny; strangers get a
//! relay-only session), the path set-up of a new session (candidates we may probe), and
//! fresh candidates after a network change.

use super::*;

impl Node {
    /// Create the session of `setup`, bind the relay, and start probing.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn open_session(
        &self,
        setup: &Setup,
        role: Role,
        server: &Arc<ServerConn>,
        udp_ok: bool,
        probe: bool,
    ) -> Result<Arc<PtcpSession>, NodeError> {
        let side = match role {
            Role::Caller => Side::Initiator,
            Role::Callee => Side::Responder,
        };
        let leg = Arc::new(relay::Leg::new(setup.relay_token, setup.relay_key.clone()));
        // Without UDP to the server (who-am-i got no answer), relay over a control
        // connection instead: the one we asked through, or, when our leg is at another
        // instance of the domain (the callee's), one of our own to that instance.
        let relay_conn = match (udp_ok, setup.relay_elsewhere) {
            (false, true) => self.relay_instance(server, setup.relay).await?,
            _ => server.clone(),
        };
        let (relay_path, control) = if udp_ok {
            (RelayPath::Udp(setup.relay), None)
        } else {
            (RelayPath::Control, Some(Self::tcp_relay(relay_conn.clone(), setup.relay_token)))
        };
        let setup_paths = self.path_setup(setup, role, relay_path, probe);
        let config = &self.inner.config;
        let paths = PathSetup {
            setup: setup_paths,
            config: q2q_netstack::path::Config {
                probe_for: duration(config.probe_for),
                reprobe_every: duration(config.reprobe_every),
                probe_after: duration(config.probe_after),
                ..Default::default()
            },
            leg,
            control,
        };
        let session = self
            .inner
            .endpoint
            .new_session_with_paths(
                SessionId(setup.session),
                side,
                self.inner.config.netstack.clone(),
                paths,
            )
            .await?;
        // Bind our end of the relay over TCP as well, in case UDP is blocked (the endpoint
        // binds it over UDP); at another instance this makes the leg our connection's.
        let _ = relay_conn.tell(&cmd::Relay { token: setup.relay_token, data: Vec::new() }).await;
        Ok(Arc::new(session))
    }

    /// What the path machine of the session of `setup` starts from. Probes go only to the
    /// peer's candidates at the address the server saw it at, or on our own networks
    /// (never a third party's); birthday probing only towards the server-observed IP.
    pub(super) fn path_setup(
        &self,
        setup: &Setup,
        role: Role,
        relay: RelayPath,
        probe: bool,
    ) -> q2q_netstack::path::Setup {
        // Appended, so the order the NAT facts read stays as the peer sent it.
        let mut all = setup.candidates.clone();
        if let Some(guess) = candidates::predicted(&all) {
            all.push(guess);
        }
        let local = candidates::local_networks(self.inner.config.include_loopback);
        let direct_allowed = probe && self.inner.config.direct;
        // Even when direct paths are not allowed (they then only tell `why` apart).
        let targets = candidates::probeable(&all, &setup.peer_seen, &local);
        if targets.len() < all.len() && direct_allowed {
            debug!(
                session = format!("{:016x}", setup.session),
                dropped = all.len() - targets.len(),
                "candidates the server did not see are not probed"
            );
        }
        // Birthday probing is for IPv4 NATs only: the IPv4 facts.
        let mine = self.inner.reflexive_cache.lock().ok().and_then(|c| {
            c.as_ref().and_then(|(_, r)| r.iter().map(|r| r.addr).find(SocketAddr::is_ipv4))
        });
        let nat = NatFacts {
            mine,
            my_port: self.local_addr().port(),
            peer: setup.candidates.first().copied(),
            peer_port: setup.candidates.get(1).map(|c| c.port()),
            peer_seen: setup.peer_seen.iter().copied().find(std::net::IpAddr::is_ipv4),
        };
        q2q_netstack::path::Setup {
            session: setup.session,
            role,
            key: setup.probe_key,
            relay,
            candidates: targets,
            nat,
            direct_allowed,
            seed: rand::random(),
        }
    }

    /// A peer in session sends fresh candidates (its network changed): search them, at
    /// most where the server saw it or on our own networks, and answer ours; take our relay
    /// leg if the server gives it again. Only for a live session with exactly that peer and
    /// id; a relay-only one takes only its relay leg (no candidates, and answers none).
    pub(super) async fn peer_candidates(
        &self,
        ask: cmd::CandidatesAsk,
    ) -> Result<cmd::CandidateList, Refusal> {
        let cmd::CandidatesAsk {
            from,
            session: id,
            candidates: theirs,
            peer_seen,
            peer_seen_also,
            relay,
        } = ask;
        let seen: Vec<std::net::IpAddr> = peer_seen.into_iter().chain(peer_seen_also).collect();
        let ps = self
            .inner
            .table
            .list()
            .await
            .into_iter()
            // A relay-only session only takes its relay leg again.
            .find(|s| s.peer == from && s.id() == id && (!s.relay_only || relay.is_some()))
            .ok_or_else(|| {
                Refusal::new(ErrorCode::NotAuthorized, format!("no session {id:016x} with {from}"))
            })?;
        // Only the server that holds our legs gives them (see `relay_renewable`): ours.
        if let Some(g) = relay {
            self.take_relay(&ps, &g, &self.home()).await;
        }
        if ps.relay_only {
            return Ok(cmd::CandidateList { candidates: Vec::new() });
        }
        self.take_candidates(&ps, &theirs, &seen).await;
        Ok(cmd::CandidateList { candidates: self.candidates().await })
    }

    /// Our relay leg of `ps`'s session given again by `server` (after a re-login): the
    /// session binds it at once and relays through it. Without UDP to the server, over
    /// `server`'s control connection (bound there too, as when the session was set up).
    async fn take_relay(&self, ps: &PeerSession, g: &cmd::RelayGrant, server: &Arc<ServerConn>) {
        let reflexive = self.reflexive().await;
        let udp = match relay_at(&server.server, None, g.relay_port, reflexive).await {
            Ok(a) => a,
            Err(e) => {
                debug!(peer = %ps.peer, error = %e, "relay leg given again: no relay address");
                return;
            }
        };
        let leg = Arc::new(relay::Leg::new(g.relay_token, g.relay_key.clone()));
        let control = Self::tcp_relay(server.clone(), g.relay_token);
        let changed = ps.ptcp.renew_relay(leg, udp, control).await;
        let _ = server.tell(&cmd::Relay { token: g.relay_token, data: Vec::new() }).await;
        // Logged once per new leg: the same leg given again (a peer may ask once a
        // second) is not news.
        match changed {
            Ok(true) => info!(peer = %ps.peer, relay = %udp, "relay leg given again"),
            Ok(false) => debug!(peer = %ps.peer, relay = %udp, "relay leg confirmed"),
            Err(e) => debug!(peer = %ps.peer, error = %e, "relay leg given again: no session"),
        }
    }

    /// Our candidates now: a reflexive address first, then host ones, then the other
    /// reflexive address ([`candidates::gather`]).
    pub(super) async fn candidates(&self) -> Vec<SocketAddr> {
        let reflexive = self.reflexives().await;
        candidates::gather(
            self.local_addr().port(),
            &reflexive,
            self.mapped(),
            self.inner.config.include_loopback,
        )
    }

    /// Hand a peer's fresh candidates to its session's path machine: only those at the IP
    /// the server saw it at (`seen`) or on our own networks.
    pub(super) async fn take_candidates(
        &self,
        ps: &PeerSession,
        theirs: &[SocketAddr],
        seen: &[std::net::IpAddr],
    ) {
        let mut all = theirs.to_vec();
        if let Some(guess) = candidates::predicted(&all) {
            all.push(guess);
        }
        let local = candidates::local_networks(self.inner.config.include_loopback);
        let targets = candidates::probeable(&all, seen, &local);
        info!(peer = %ps.peer, candidates = targets.len(), "fresh candidates from the peer");
        ps.ptcp.update_candidates(targets).await;
    }

    /// After a network change or a re-login: give every peer in session our fresh
    /// candidates through the server where it is logged in, and search the ones it answers
    /// with. Returns how many sessions were refreshed. Relay-only sessions are left alone.
    ///
    /// One refresh runs at a time: asked for while one runs, this returns 0 at once and the
    /// running one makes one more pass when it is done (with candidates gathered then).
    pub async fn refresh_sessions(&self) -> usize {
        use std::sync::atomic::Ordering::SeqCst;
        let (running, again) = (&self.inner.refreshing, &self.inner.refresh_again);
        again.store(true, SeqCst);
        let mut done = 0;
        // Whoever sets `running` makes the passes; `again` is cleared by the pass it asks
        // for, and looked at once more after `running` is released (no request is lost).
        while again.load(SeqCst) && !running.swap(true, SeqCst) {
            while again.swap(false, SeqCst) {
                let relay = self.inner.refresh_relay.swap(false, SeqCst);
                done += self.refresh_pass(relay).await;
            }
            running.store(false, SeqCst);
        }
        done
    }

    /// [`Node::refresh_sessions`] after logging back in: the pass also asks for the
    /// sessions' relay legs again, for every session whose legs are at the server asked
    /// ([`PeerSession::relay_renewable`], relay-only ones too). The server gives the legs
    /// it has (taken by our new connection) or, if it restarted, new ones; either way both
    /// ends get the same pair.
    pub async fn refresh_after_login(&self) -> usize {
        self.inner.refresh_relay.store(true, std::sync::atomic::Ordering::SeqCst);
        self.refresh_sessions().await
    }

    /// One refresh of every session (with `relay`: [`Node::refresh_after_login`]).
    async fn refresh_pass(&self, relay: bool) -> usize {
        let wanted = |ps: &PeerSession| !ps.relay_only || (relay && ps.relay_renewable);
        let sessions = self.inner.table.list().await.into_iter().filter(|ps| wanted(ps)).collect();
        self.refresh(sessions, relay).await
    }

    /// Our connection to `domain`'s server (another domain's) ended: it may have restarted
    /// and forgotten the relay legs of our sessions set up there (we were the caller). Ask
    /// for them again through a new connection, a second later. Returns how many sessions
    /// got theirs.
    // A named, boxed future (as `control_loop`): it reaches `server_for`, whose new
    // connections spawn it again, and an opaque recursive future cannot be proven `Send`.
    pub(super) fn renew_relays_at(
        self,
        domain: crate::address::Domain,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = usize> + Send>> {
        Box::pin(async move {
            let sessions: Vec<_> = self
                .inner
                .table
                .list()
                .await
                .into_iter()
                .filter(|ps| ps.peer.domain == domain && ps.relay_renewable)
                .collect();
            if sessions.is_empty() {
                return 0;
            }
            tokio::time::sleep(REFRESH_RETRY[0]).await;
            debug!(%domain, sessions = sessions.len(), "asking for our relay legs there again");
            self.refresh(sessions, true).await
        })
    }

    /// Exchange candidates with the peers of `sessions` (with `relay`, also asking for
    /// our relay legs again). A peer its server cannot reach now (offline there: it is
    /// logging back in after the same change, or it listens for nothing), a rate limit, a
    /// failed connection or no answer is asked again after 1, 2, 4 and 8 s
    /// ([`REFRESH_RETRY`]); a refusal (no such session) is final. At most five asks per
    /// session; one answered ask refreshes both sides.
    async fn refresh(&self, sessions: Vec<Arc<PeerSession>>, relay: bool) -> usize {
        let mut left = sessions;
        let mut waits = REFRESH_RETRY.iter();
        let mut done = 0;
        while !left.is_empty() {
            let mine = self.candidates().await;
            let mut again = Vec::new();
            for ps in left {
                match self.exchange_candidates(&ps, &mine, relay).await {
                    Ok(()) => done += 1,
                    Err(e) => {
                        let retry = e.as_ref().is_none_or(worth_asking_again);
                        match e {
                            Some(e) => {
                                debug!(peer = %ps.peer, error = %e, retry, "fresh candidates refused")
                            }
                            None => debug!(peer = %ps.peer, retry, "fresh candidates: no answer"),
                        }
                        if retry {
                            again.push(ps);
                        }
                    }
                }
            }
            left = again;
            let Some(wait) = waits.next().filter(|_| !left.is_empty()) else { break };
            tokio::time::sleep(*wait).await;
        }
        done
    }

    /// One `candidates` call for `ps`, its answer handed to the path machine (and, with
    /// `relay`, our relay leg given again to the session). `Err(None)`: no answer within
    /// 10 s. A relay-only session sends no candidates and takes none.
    async fn exchange_candidates(
        &self,
        ps: &PeerSession,
        mine: &[SocketAddr],
        relay: bool,
    ) -> Result<(), Option<NodeError>> {
        let asked = async {
            let server = self.server_for(&ps.peer.domain).await?;
            let ask = cmd::Candidates {
                to: ps.peer.clone(),
                session: ps.id(),
                candidates: if ps.relay_only { Vec::new() } else { mine.to_vec() },
                relay: (relay && ps.relay_renewable).then_some(true),
            };
            Ok::<_, NodeError>((server.call(&ask).await?, server))
        };
        let (answer, server) = tokio::time::timeout(Duration::from_secs(10), asked)
            .await
            .map_err(|_| None)?
            .map_err(Some)?;
        if let Some(g) = &answer.relay {
            self.take_relay(ps, g, &server).await;
        }
        if !ps.relay_only {
            let seen: Vec<std::net::IpAddr> =
                answer.peer_seen.into_iter().chain(answer.peer_seen_also).collect();
            self.take_candidates(ps, &answer.candidates, &seen).await;
        }
        Ok(())
    }

    /// Someone asks for one of our services (their first stream): default deny unless the
    /// policy names them. A caller authorized for none of our services by name (a
    /// stranger calling `ping`, which anyone may use) gets a relay-only session: no
    /// candidates revealed, no probes sent.
    pub(super) async fn inbound(
        &self,
        ask: cmd::InboundAsk,
    ) -> Result<cmd::CandidateList, Refusal> {
        let cmd::InboundAsk { from, service, grant, from_serial } = ask;
        let relay_only = {
            let l = self
                .inner
                .listening
                .lock()
                .map_err(|_| Refusal::new(ErrorCode::Internal, "lock"))?;
            match l.get(&service) {
                None => {
                    return Err(Refusal::new(
                        ErrorCode::NoSuchService,
                        format!("{} does not offer service {service}", self.inner.me),
                    ));
                }
                Some(l) if !l.policy.permits(&from) => {
                    info!(%from, %service, "refused: not authorized");
                    let _ = self.inner.refusals.send((from.clone(), service.clone()));
                    return Err(Refusal::new(
                        ErrorCode::NotAuthorized,
                        format!("{from} is not authorized for {service} of {}", self.inner.me),
                    ));
                }
                Some(_) => !l.values().any(|l| l.policy.allowed.contains(&from)),
            }
        };
        let reflexive = self.reflexive().await;
        let setup = Setup::new(&grant, self.home().server.as_str(), reflexive)
            .await
            .map_err(|e| Refusal::bad_request(e.to_string()))?;
        let caller_ca = self.ca_for(&from.domain).await.map_err(|e| {
            Refusal::new(ErrorCode::NotAuthorized, format!("cannot verify {from}: {e}"))
        })?;
        // Fail closed: no usable revocation list of the caller's domain, no session. The
        // serial the server names is checked now, for a clear answer; the TLS handshake
        // checks the certificate itself.
        let list = self.revocation_list(&from.domain, &caller_ca).await.map_err(|e| {
            Refusal::new(ErrorCode::NotAuthorized, format!("cannot verify {from}: {e}"))
        })?;
        if from_serial.as_deref().is_some_and(|s| list.is_revoked(s)) {
            info!(%from, %service, "refused: revoked");
            return Err(Refusal::new(
                ErrorCode::NotAuthorized,
                format!("{} refuses {from}: that certificate has been revoked", self.inner.me),
            ));
        }
        let mine = if relay_only {
            Vec::new()
        } else {
            candidates::gather(
                self.local_addr().port(),
                &self.reflexives().await,
                self.mapped(),
                self.inner.config.include_loopback,
            )
        };
        let home = self.home();
        let session = self
            .open_session(&setup, Role::Callee, &home, reflexive.is_some(), !relay_only)
            .await
            .map_err(|e| Refusal::new(ErrorCode::Internal, e.to_string()))?;
        if relay_only {
            info!(%from, %service, "a caller authorized for no service by name: relay only");
        }
        // Our legs are at our server; we ask it for them again only when the peer's domain
        // is ours (else we would ask the peer's server, which has none).
        let renewable = from.domain == self.inner.me.domain;
        let ps = Arc::new(PeerSession::new(
            from,
            service.clone(),
            session,
            caller_ca,
            relay_only,
            renewable,
        ));
        self.serve_session(&ps);
        self.inner.table.insert(ps.peer.clone(), ps).await;
        Ok(cmd::CandidateList { candidates: mine })
    }
}

/// Whether a `candidates` call that failed with `e` may succeed a little later: the peer
/// is offline at its server (logging back in), a rate limit, or a connection that failed
/// (no error code: it is being replaced, or the server is restarting).
fn worth_asking_again(e: &NodeError) -> bool {
    match e {
        NodeError::Control(c) => c
            .error_code()
            .is_none_or(|code| matches!(code, ErrorCode::Offline | ErrorCode::RateLimited)),
        NodeError::Shared(e) => worth_asking_again(e),
        _ => false,
    }
}

/// What the server's `inbound` box says about a session.
pub(super) struct Setup {
    pub(super) session: u64,
    pub(super) probe_key: [u8; 16],
    pub(super) relay_token: relay::Token,
    pub(super) relay_key: relay::Key,
    pub(super) relay: SocketAddr,
    /// The relay is at another instance of the domain than the server we asked through
    /// (the callee's: the server gave `relay_host`).
    pub(super) relay_elsewhere: bool,
    pub(super) candidates: Vec<SocketAddr>,
    /// The IPs the server vouches the peer is at: where its control connection comes
    /// from, and a proven IP of the other family (`also-seen`).
    pub(super) peer_seen: Vec<std::net::IpAddr>,
}

impl Setup {
    /// The session of an `inbound` answer (caller) or request (callee), asked through the
    /// server at `server` (host:port of the control connection); where its relay is:
    /// [`relay_at`].
    pub(super) async fn new(
        grant: &cmd::Grant,
        server: &str,
        reflexive: Option<SocketAddr>,
    ) -> Result<Setup, NodeError> {
        let relay = relay_at(server, grant.relay_host, grant.relay_port, reflexive).await?;
        Ok(Setup {
            session: grant.session,
            probe_key: grant.probe_key,
            relay_token: grant.relay_token,
            relay_key: grant.relay_key.clone(),
            relay,
            relay_elsewhere: grant.relay_host.is_some(),
            candidates: grant.candidates.clone(),
            peer_seen: grant.peer_seen.into_iter().chain(grant.peer_seen_also).collect(),
        })
    }
}

/// Where the relay is: at `relay_host` (given when it is at another instance of the
/// domain) or else the server at `server` (host:port of the control connection), on
/// `port`: its first address of the family our `reflexive` address is of (the family UDP
/// to the server works in), or its first address.
async fn relay_at(
    server: &str,
    relay_host: Option<std::net::IpAddr>,
    port: u16,
    reflexive: Option<SocketAddr>,
) -> Result<SocketAddr, NodeError> {
    let host = match relay_host {
        Some(h) => h,
        None => {
            let all: Vec<SocketAddr> =
                tokio::net::lookup_host(server).await?.map(crate::dualstack::canonical).collect();
            let family = |a: &&SocketAddr| reflexive.is_none_or(|r| r.is_ipv4() == a.is_ipv4());
            all.iter()
                .find(family)
                .or(all.first())
                .ok_or_else(|| {
                    NodeError::BadAnswer("`server address` missing or malformed".to_string())
                })?
                .ip()
        }
    };
    Ok(SocketAddr::new(host, port))
}
