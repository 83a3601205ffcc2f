//! The node's servers: the home connection and re-login, other domains' servers, our
//! reflexive address (who-am-i), and the requests servers send us (`inbound`,
//! `candidates`, relayed datagrams over TCP).

use super::*;

impl Node {
    /// The current connection to the home server.
    pub(super) fn home(&self) -> Arc<ServerConn> {
        self.inner.home_server.borrow().clone()
    }

    /// Fault injection for tests: end the home connection now, as a NAT rebinding or a
    /// suspend would (the node logs back in by itself).
    #[doc(hidden)]
    pub fn drop_home_connection(&self) {
        self.home().handle().close();
    }

    /// Keep the home connection alive: a ping every 25 s (below common NAT TCP and UDP
    /// timeouts), and when the connection ends, log back in (backing off from 1 s to 30 s),
    /// at another instance of the domain if this one is gone ([`Node::log_in_again`]),
    /// and listen again for every service. Established sessions are untouched: they need
    /// no server once set up. This task owns the home connection: only it replaces it.
    pub(super) async fn stay_logged_in(self, owner: tokio::sync::watch::Sender<Arc<ServerConn>>) {
        let mut backoff = Duration::from_secs(1);
        loop {
            let home = self.home();
            let handle = home.handle();
            tokio::select! {
                _ = handle.closed() => {}
                _ = tokio::time::sleep(Duration::from_secs(25)) => {
                    let _ = tokio::time::timeout(Duration::from_secs(10), home.call(&cmd::Ping {})).await;
                    let changed = self.observe_reflexive().await;
                    // Fresh proofs (they last 10 to 20 minutes).
                    self.announce_seen(&home).await;
                    // The network changed (a new NAT mapping or address): peers in session
                    // get our fresh candidates, and we theirs. Not through a connection that
                    // has just died with the change: the re-login below refreshes instead.
                    if changed && !handle.is_closed() {
                        let node = self.clone();
                        tokio::spawn(async move { node.refresh_sessions().await });
                    }
                    continue;
                }
            }
            warn!(server = %home.server, "lost the connection to the home server; logging back in");
            loop {
                tokio::time::sleep(backoff).await;
                match self.log_in_again().await {
                    Ok(mut conn) => {
                        let incoming = conn.incoming.take();
                        let conn = Arc::new(conn);
                        self.announce_seen(&conn).await;
                        let services: Vec<(ServiceName, String)> = self
                            .inner
                            .listening
                            .lock()
                            .map(|l| {
                                l.iter().map(|(s, l)| (s.clone(), l.description.clone())).collect()
                            })
                            .unwrap_or_default();
                        let mut refused = None;
                        for (service, description) in services {
                            let listen = cmd::Listen { service, description: Some(description) };
                            // Our certificate is refused (revoked): not logged in at all.
                            if let Err(e) = conn.call(&listen).await
                                && e.error_code() == Some(&ErrorCode::BadCertificate)
                            {
                                refused = Some(e);
                                break;
                            }
                        }
                        if let Some(e) = refused {
                            warn!(error = %e, "log-in refused");
                            backoff = (backoff * 2).min(Duration::from_secs(30));
                            continue;
                        }
                        if let Some(incoming) = incoming {
                            tokio::spawn(self.clone().control_loop(incoming));
                        }
                        owner.send_replace(conn);
                        info!("logged back in");
                        // A lost home connection is the usual sign of a network change
                        // (a NAT rebinding, suspend, another Wi-Fi), and while we were out
                        // peers could not give us theirs: exchange fresh candidates with
                        // every peer in session (one call each; re-logins back off), and
                        // take our relay legs again (the server may have restarted). Off
                        // this task: who-am-i may wait 2 s for an answer that never comes.
                        let node = self.clone();
                        tokio::spawn(async move {
                            node.observe_reflexive().await;
                            node.refresh_after_login().await
                        });
                        backoff = Duration::from_secs(1);
                        break;
                    }
                    Err(e) => {
                        debug!(error = %e, "log-in failed");
                        backoff = (backoff * 2).min(Duration::from_secs(30));
                    }
                }
            }
        }
    }

    /// Ask who-am-i afresh (which also refreshes the NAT's UDP mapping towards the server)
    /// and keep the answer; true when our public addresses changed since the last answer.
    /// A change also makes the port mapping rediscover the router.
    async fn observe_reflexive(&self) -> bool {
        let all = self.ask_reflexive().await;
        let addrs = |r: &[Reflexive]| r.iter().map(|r| r.addr).collect::<Vec<_>>();
        let seen = addrs(&all);
        let before =
            self.inner.reflexive_cache.lock().ok().and_then(|mut c| {
                c.replace((std::time::Instant::now(), all)).map(|(_, r)| addrs(&r))
            });
        let changed = before.as_ref().is_some_and(|b| *b != seen) && !seen.is_empty();
        if changed {
            info!(?before, now = ?seen, "our public address changed: refreshing sessions");
            if let Some(m) = &self.inner.port_map {
                m.rediscover();
            }
        }
        changed
    }

    /// A new home connection, with the certificate we hold now (it may have been renewed).
    pub(super) async fn log_in_again(&self) -> Result<ServerConn, ClientError> {
        let i = &self.inner;
        log_in(&i.home, &i.me, &i.config.server, self.stored_identity()).await
    }

    /// The address the home server sees this node's UDP socket as (its NAT mapping): the
    /// answer at the server's first address, else at its first of the other family (an
    /// IPv6-only host asking a dual-stack name); the relay is then reached in that family.
    /// `None` when UDP to the server is blocked.
    pub async fn reflexive(&self) -> Option<SocketAddr> {
        self.reflexive_all().await.into_iter().next().map(|r| r.addr)
    }

    /// Every reflexive address: one per family the server answers on (a dual-stack node
    /// behind a dual-stack server has two), the first server address's family first.
    pub async fn reflexives(&self) -> Vec<SocketAddr> {
        self.reflexive_all().await.into_iter().map(|r| r.addr).collect()
    }

    pub(super) async fn reflexive_all(&self) -> Vec<Reflexive> {
        if self.inner.config.tcp_relay_only {
            return Vec::new();
        }
        // Asked recently: the answer (or the silence of blocked UDP) is still good, and a
        // connection should not wait 2 s for a who-am-i timeout each time.
        if let Ok(c) = self.inner.reflexive_cache.lock()
            && let Some((at, seen)) = &*c
            && at.elapsed() < REFLEXIVE_FRESH
        {
            return seen.clone();
        }
        let seen = self.ask_reflexive().await;
        if let Ok(mut c) = self.inner.reflexive_cache.lock() {
            *c = Some((std::time::Instant::now(), seen.clone()));
        }
        seen
    }

    /// Ask who-am-i (with a proof) at the home server's first address of each family, at
    /// the same time; the answers in the order of the addresses.
    pub(super) async fn ask_reflexive(&self) -> Vec<Reflexive> {
        let servers = self.home_udp().await;
        let (a, b) = tokio::join!(
            self.ask_reflexive_at(servers.first().copied()),
            self.ask_reflexive_at(servers.get(1).copied())
        );
        a.into_iter().chain(b).collect()
    }

    async fn ask_reflexive_at(&self, server: Option<SocketAddr>) -> Option<Reflexive> {
        let server = server?;
        let nonce: [u8; 8] = rand::random();
        let (tx, rx) = oneshot::channel();
        self.inner.whoami.send(WhoAmI::Wait(nonce, tx)).await.ok()?;
        let request = crate::proto::whoami::request_with(nonce, REFLEXIVE_FLAGS);
        let mut rx = rx;
        for _ in 0..3 {
            self.inner.endpoint.send_datagram(server, request.clone()).await.ok()?;
            match tokio::time::timeout(Duration::from_millis(700), &mut rx).await {
                Ok(Ok(seen)) => return Some(seen),
                Ok(Err(_)) => return None,
                Err(_) => continue,
            }
        }
        let _ = self.inner.whoami.send(WhoAmI::Forget(nonce)).await;
        None
    }

    /// The home server's UDP addresses to ask who-am-i at: the first it resolves to, and
    /// the first of the other family, if any (a host without an address of a family gets
    /// no answer there, which costs only the wait).
    pub(super) async fn home_udp(&self) -> Vec<SocketAddr> {
        let home = self.home();
        let Ok(all) = tokio::net::lookup_host(home.server.as_str()).await else {
            return Vec::new();
        };
        let mut out: Vec<SocketAddr> = Vec::new();
        for a in all.map(crate::dualstack::canonical) {
            if out.iter().all(|o| o.is_ipv4() != a.is_ipv4()) {
                out.push(a);
            }
        }
        out
    }

    /// Show `conn`'s server the proofs of our reflexive IPs (`also-seen`), so that it
    /// vouches to our peers for the one of the other family than the control connection's
    /// (it refuses the one of the same family, which it sees anyway; which family the
    /// connection took is the resolver's and the network's choice). Refusals (that one, an
    /// older server) change nothing.
    pub(super) async fn announce_seen(&self, conn: &ServerConn) {
        let cached = self.inner.reflexive_cache.lock().ok().and_then(|c| c.clone());
        let Some((_, all)) = cached else { return };
        if all.len() < 2 && self.home_udp().await.len() < 2 {
            // The server has one family: the control connection's, which it sees itself.
            return;
        }
        for r in &all {
            if let Some(proof) = r.proof {
                let ask = cmd::AlsoSeen { address: r.addr.ip(), proof };
                if let Err(e) = conn.call(&ask).await {
                    debug!(address = %r.addr.ip(), error = %e, "also-seen refused");
                }
            }
        }
    }

    /// The CA of `domain`: our own domain's (pinned when we logged in), or another
    /// domain's, pinned on first contact with its server.
    pub(super) async fn ca_for(
        &self,
        domain: &crate::address::Domain,
    ) -> Result<rustls_pki_types::CertificateDer<'static>, NodeError> {
        if *domain == self.inner.me.domain {
            return Ok(self.home().ca.clone());
        }
        if let Some(ca) = self.inner.home.pinned_ca(domain).map_err(ClientError::from)? {
            return Ok(ca);
        }
        Ok(self.server_for(domain).await?.ca.clone())
    }

    pub(super) async fn server_for(
        &self,
        domain: &crate::address::Domain,
    ) -> Result<Arc<ServerConn>, NodeError> {
        if *domain == self.inner.me.domain {
            return Ok(self.home());
        }
        // One connect at a time per domain, and a slow or unreachable domain holds up no
        // other: the table of servers is owned by one task.
        let set_up = || {
            let (node, domain) = (self.clone(), domain.clone());
            async move {
                let opts =
                    ConnectOptions { login: Some(node.stored_identity()), ..Default::default() };
                let mut conn = ServerConn::connect(&node.inner.home, &domain, &opts).await?;
                if let Some(incoming) = conn.incoming.take() {
                    // When it ends, the relay legs of sessions set up there may be gone
                    // with it (the server restarted): asked for again.
                    tokio::spawn(async move {
                        node.clone().control_loop(incoming).await;
                        node.renew_relays_at(domain).await
                    });
                }
                Ok(Arc::new(conn))
            }
        };
        self.inner.foreign.get(domain, (), set_up, |_| false).await.map_err(|e| match e {
            GetError::Failed(e) => NodeError::Shared(e),
            GetError::Gone => {
                NodeError::BadAnswer(format!("no connection to the server of {domain}"))
            }
        })
    }

    /// A control connection of our own to the instance of `via`'s domain at `relay` (TCP
    /// and UDP share the port), logged in with our certificate, to relay over when UDP is
    /// blocked and our leg is at that instance. One per instance, shared by every session
    /// relayed there (a burst of sessions opens one connection), from a table owned by one
    /// task; relayed datagrams it brings go to a control loop. The instance closes it
    /// after 10 idle minutes, and the next session opens another.
    pub(super) async fn relay_instance(
        &self,
        via: &ServerConn,
        relay: SocketAddr,
    ) -> Result<Arc<ServerConn>, NodeError> {
        let set_up = || {
            let (node, domain) = (self.clone(), via.domain.clone());
            async move {
                let opts = ConnectOptions {
                    server: Some(relay.to_string()),
                    login: Some(node.stored_identity()),
                    ..Default::default()
                };
                let mut conn = ServerConn::connect(&node.inner.home, &domain, &opts).await?;
                if let Some(incoming) = conn.incoming.take() {
                    tokio::spawn(node.clone().control_loop(incoming));
                }
                debug!(%relay, "relaying over TCP at the callee's instance");
                Ok(Arc::new(conn))
            }
        };
        self.inner.relay_instances.get(&relay, (), set_up, |_| false).await.map_err(|e| match e {
            GetError::Failed(e) => NodeError::Shared(e),
            GetError::Gone => {
                NodeError::BadAnswer(format!("no connection to the relay at {relay}"))
            }
        })
    }

    /// The TCP relay of one session: the endpoint hands its datagrams to the channel
    /// returned ([`Path::Channel`]) and a task frames them as AMP `relay` calls on `server`'s
    /// control connection, under `token`. The task ends with the channel's last sender.
    pub(super) fn tcp_relay(server: Arc<ServerConn>, token: relay::Token) -> mpsc::Sender<Vec<u8>> {
        let (tx, mut rx) = mpsc::channel::<Vec<u8>>(TCP_RELAY_QUEUE);
        tokio::spawn(async move {
            while let Some(inner) = rx.recv().await {
                let _ = server.tell(&cmd::Relay { token, data: inner }).await;
            }
        });
        tx
    }

    /// Datagrams of other kinds than PTCP on our socket. This task owns the who-am-i
    /// requests waiting for their answer.
    pub(super) async fn side_loop(
        self,
        mut side: mpsc::Receiver<crate::ptcp::SideDatagram>,
        mut whoami: mpsc::Receiver<WhoAmI>,
    ) {
        let mut pending: HashMap<[u8; 8], oneshot::Sender<Reflexive>> = HashMap::new();
        loop {
            tokio::select! {
                w = whoami.recv() => match w {
                    Some(WhoAmI::Wait(nonce, tx)) => {
                        pending.retain(|_, tx| !tx.is_closed());
                        if pending.len() < WHOAMI_PENDING {
                            pending.insert(nonce, tx);
                        }
                    }
                    Some(WhoAmI::Forget(nonce)) => {
                        pending.remove(&nonce);
                    }
                    None => return,
                },
                d = side.recv() => {
                    let Some(d) = d else { return };
                    match d.kind {
                        Kind::WhoAmIReply => {
                            if let Ok(r) =
                                proto::whoami::Reply::parse_answer(&d.data, REFLEXIVE_FLAGS)
                                && let Some(tx) = pending.remove(&r.nonce)
                            {
                                let _ = tx.send(Reflexive { addr: r.seen, proof: r.proof });
                            }
                        }
                        // Probes and relayed datagrams of our sessions are the endpoint's
                        // (their path machines); these belong to no session.
                        _ => debug!(from = %d.from, kind = ?d.kind, "ignored datagram"),
                    }
                }
            }
        }
    }

    /// Requests from a server: `inbound` (someone wants one of our services) and relayed
    /// datagrams over TCP.
    // A named, boxed future: `inbound` can reach `server_for`, which starts another control
    // loop, and an opaque recursive future cannot be proven `Send`.
    pub(super) fn control_loop(
        self,
        mut incoming: mpsc::Receiver<Incoming>,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
        Box::pin(async move {
            while let Some(req) = incoming.recv().await {
                match req.command() {
                    cmd::Relay::NAME => {
                        // A datagram relayed by the server; the endpoint authenticates
                        // what it carries.
                        if let Ok(cmd::Relay { data, .. }) = cmd::Relay::from_box(&req.request)
                            && !data.is_empty()
                        {
                            let _ = self.inner.endpoint.inject_relayed(data).await;
                        }
                        req.respond(Ok(cmd::Empty {}.to_box())).await;
                    }
                    cmd::InboundAsk::NAME => {
                        let node = self.clone();
                        tokio::spawn(async move {
                            let result = match cmd::InboundAsk::from_box(&req.request) {
                                Ok(ask) => node.inbound(ask).await,
                                Err(e) => Err(e),
                            };
                            req.respond(result.map(|a| a.to_box()).map_err(Into::into)).await;
                        });
                    }
                    cmd::CandidatesAsk::NAME => {
                        let node = self.clone();
                        tokio::spawn(async move {
                            let result = match cmd::CandidatesAsk::from_box(&req.request) {
                                Ok(ask) => node.peer_candidates(ask).await,
                                Err(e) => Err(e),
                            };
                            req.respond(result.map(|a| a.to_box()).map_err(Into::into)).await;
                        });
                    }
                    other => {
                        let why = format!("unknown command `{other}`");
                        req.respond(Err(Refusal::new(ErrorCode::Unhandled, why).into())).await;
                    }
                }
            }
            // The home connection's loss is told (and mended) by `stay_logged_in`; others
            // (another domain's, a relay instance's) are opened again when next needed.
            debug!("control connection to the server ended");
        })
    }
}

impl Node {
    /// Whether `who` is registered, asked of `who`'s domain server (for the `*.q2q`
    /// resolver: unknown users get NXDOMAIN).
    pub async fn exists(&self, who: &Q2qAddress) -> Result<bool, NodeError> {
        let server = self.server_for(&who.domain).await?;
        Ok(server.call(&cmd::Exists { address: who.clone() }).await?.exists)
    }
}

/// Log in as `me` with `identity`: at the servers `opts` gives, in order (several
/// instances of the domain may be listed); without any, at the one the identity came
/// from, then wherever discovery (client config, DNS SRV targets) says the domain's
/// servers are.
pub(super) async fn log_in(
    home: &Home,
    me: &Q2qAddress,
    opts: &ConnectOptions,
    identity: Arc<StoredIdentity>,
) -> Result<ServerConn, ClientError> {
    let places = match &opts.server {
        Some(s) => vec![Some(s.clone())],
        None => identity.server.clone().into_iter().map(Some).chain([None]).collect(),
    };
    let mut last = None;
    for server in places {
        let opts = ConnectOptions { server, login: Some(identity.clone()), ..opts.clone() };
        match ServerConn::connect(home, &me.domain, &opts).await {
            Ok(c) => return Ok(c),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| ClientError::Unreachable {
        domain: me.domain.clone(),
        tried: "nowhere".into(),
    }))
}
