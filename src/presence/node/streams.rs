//! The session layer: connecting by address (one session per peer, through the session
//! table), streams with their service header and verdict, the accept loop, the idle close,
//! leaving, and `ping`.

use super::*;

impl Node {
    /// Offer the built-in `ping` service (an echo of 8-byte probes) to every authenticated
    /// address: it tells no more than presence does.
    pub async fn serve_ping(&self) -> Result<(), NodeError> {
        let mut accepted = self.listen(&ping_service(), "q2q ping", Policy::anyone()).await?;
        tokio::spawn(async move {
            while let Some(a) = accepted.recv().await {
                tokio::spawn(async move {
                    use tokio::io::{AsyncReadExt, AsyncWriteExt};
                    let mut s = a.stream;
                    let mut buf = [0u8; 8];
                    // At most 10 000 echoes per stream: every loop is bounded.
                    for _ in 0..10_000 {
                        if s.read_exact(&mut buf).await.is_err() || s.write_all(&buf).await.is_err()
                        {
                            break;
                        }
                    }
                });
            }
        });
        Ok(())
    }

    /// Connect to `to`'s `ping` service and time `count` round trips, `interval` apart.
    pub async fn ping(
        &self,
        to: &Q2qAddress,
        count: u32,
        interval: Duration,
    ) -> Result<PingReport, NodeError> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let start = std::time::Instant::now();
        let conn = self.connect(to, &ping_service()).await?;
        let connect = start.elapsed();
        let mut s = conn.stream;
        let mut rtts = Vec::new();
        for i in 0..count.min(10_000) {
            if i > 0 {
                tokio::time::sleep(interval).await;
            }
            let t = std::time::Instant::now();
            let mut buf = u64::from(i).to_be_bytes();
            s.write_all(&buf).await?;
            tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut buf)).await.map_err(
                |_| {
                    NodeError::Io(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "no echo within 10 s",
                    ))
                },
            )??;
            rtts.push(t.elapsed());
        }
        let _ = s.shutdown().await;
        let id = conn.session.id().0;
        let (path, why) = self
            .status()
            .into_iter()
            .find(|p| p.session == id)
            .map(|p| (p.path, p.why))
            .unwrap_or((PathKind::TcpRelay, String::new()));
        Ok(PingReport { peer: to.clone(), connect, rtts, path, why })
    }

    /// Connect to `to`'s `service`. The first connection to a peer sets up the peer
    /// session through `to`'s domain server (relayed at first, direct as soon as a hole is
    /// punched); every later one, to any service, is a new stream in that session: no
    /// server round trip, no new punching. A burst of connections sets up one session.
    pub async fn connect(
        &self,
        to: &Q2qAddress,
        service: &ServiceName,
    ) -> Result<Connection, NodeError> {
        let mut last = None;
        // A session that ended meanwhile (closed idle, lost, the peer restarted) is set up
        // anew: at most twice.
        for _ in 0..3 {
            let ps = self.session_to(to, service).await?;
            // A stream on a session that answers nothing within this long: the peer
            // forgot it (restarted); a fresh session is set up.
            let limit = if ps.started.elapsed() < Duration::from_secs(2) {
                Duration::from_secs(10)
            } else {
                STREAM_OPEN_TIMEOUT
            };
            match tokio::time::timeout(limit, self.open_on(&ps, service)).await {
                Ok(Ok(stream)) => {
                    return Ok(Connection { peer: to.clone(), stream, session: ps.ptcp.clone() });
                }
                Ok(Err(e)) if !ps.ended() && !matches!(e, NodeError::Ptcp(_)) => return Err(e),
                Ok(Err(e)) => last = Some(e),
                Err(_) => {
                    last = Some(NodeError::Io(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("{to} did not answer a new stream within {} s", limit.as_secs()),
                    )))
                }
            }
            self.end_session(&ps, "a new stream could not be opened on it").await;
        }
        Err(last.unwrap_or(NodeError::Ptcp(EndpointError::Closed)))
    }

    /// Open a stream of `service` on `ps`: the header naming the service, and the peer's
    /// verdict.
    pub(super) async fn open_on(
        &self,
        ps: &Arc<PeerSession>,
        service: &ServiceName,
    ) -> Result<PeerStream, NodeError> {
        match self.exchange(ps, &StreamHeader::Service(service.clone())).await? {
            (stream, Verdict::Accepted) => {
                ps.note_opened(service);
                Ok(stream)
            }
            (_, Verdict::Refused(why)) => Err(NodeError::Refused(why)),
        }
    }

    /// Open a stream on `ps` (once the session is authenticated), send the session's
    /// stream token and `header`, and read the peer's verdict.
    pub(super) async fn exchange(
        &self,
        ps: &Arc<PeerSession>,
        header: &StreamHeader,
    ) -> Result<(PtcpStream, Verdict), NodeError> {
        use tokio::io::AsyncWriteExt;
        let token = ps.stream_token().await.ok_or(NodeError::Ptcp(EndpointError::Closed))?;
        let mut stream = ps.ptcp.open_stream().await?;
        let mut first = token.to_vec();
        first.extend_from_slice(&header.encode());
        stream.write_all(&first).await?;
        stream.flush().await?;
        let verdict = Verdict::read(&mut stream).await?;
        Ok((stream, verdict))
    }

    /// The caller's half of proving both identities, once per session: TLS 1.3 between
    /// the two certificates on the session's first stream (end to end: the servers vouch
    /// for nobody), then the session's keys from the handshake. The callee confirmed only
    /// after installing its keys, so ours seal at once.
    pub(super) async fn authenticate_dialer(&self, ps: &Arc<PeerSession>) -> Result<(), NodeError> {
        use tokio::io::AsyncWriteExt;
        let tls_error = |e: crate::ptcp::tls::TlsError| NodeError::Tls(format!("{}: {e}", ps.peer));
        // The callee's certificate must not be on its domain's list either.
        let list = self.revocation_list(&ps.peer.domain, &ps.ca).await?;
        let stream = ps.ptcp.open_stream().await?;
        let mut tls = crate::ptcp::tls::connect(
            stream,
            &self.tls_identity(),
            &ps.peer,
            ps.ca.clone(),
            Arc::new(move |serial: &str| list.is_revoked(serial)),
        )
        .await
        .map_err(tls_error)?;
        if let Some(serial) = revocation::peer_serial(tls.get_ref().1) {
            ps.set_peer_serial(serial);
        }
        let secrets =
            crate::ptcp::tls::export_session(&**tls.get_ref().1, ps.id()).map_err(tls_error)?;
        ps.ptcp.install_keys(secrets.keys.clone(), true).await;
        ps.authenticated(&secrets);
        let _ = tls.shutdown().await;
        Ok(())
    }

    /// The callee's half (see [`Node::authenticate_dialer`]): the session's first stream
    /// must prove the session's peer; the keys are installed before the dialer is told.
    pub(super) async fn authenticate_acceptor(
        &self,
        ps: &Arc<PeerSession>,
        trust: Arc<dyn crate::ptcp::tls::Trust>,
    ) -> Result<(), String> {
        use tokio::io::AsyncReadExt;
        let stream = ps.ptcp.accept().await.map_err(|e| e.to_string())?;
        let (mut tls, caller) =
            crate::ptcp::tls::accept_unconfirmed(stream, &self.tls_identity(), trust)
                .await
                .map_err(|e| format!("TLS failed: {e}"))?;
        if caller != ps.peer {
            return Err(format!("{caller} is not the session's peer"));
        }
        if let Some(serial) = revocation::peer_serial(tls.get_ref().1) {
            ps.set_peer_serial(serial);
        }
        let secrets = crate::ptcp::tls::export_session(&**tls.get_ref().1, ps.id())
            .map_err(|e| e.to_string())?;
        ps.ptcp.install_keys(secrets.keys.clone(), false).await;
        crate::ptcp::tls::confirm(&mut tls).await.map_err(|e| e.to_string())?;
        ps.authenticated(&secrets);
        // The dialer closes this stream; read its end (bounded) so it is released.
        tokio::spawn(async move {
            let mut sink = [0u8; 64];
            let _ = tokio::time::timeout(Duration::from_secs(10), async {
                while matches!(tls.read(&mut sink).await, Ok(n) if n > 0) {}
            })
            .await;
        });
        Ok(())
    }

    /// The live session with `to`, set up if there is none (one set-up for any number of
    /// callers; see [`SessionTable`]).
    pub(super) async fn session_to(
        &self,
        to: &Q2qAddress,
        service: &ServiceName,
    ) -> Result<Arc<PeerSession>, NodeError> {
        let set_up = || {
            let (node, to, service) = (self.clone(), to.clone(), service.clone());
            async move { node.set_up(&to, &service).await }
        };
        self.inner.table.get(to, service.clone(), set_up, NodeError::refuses_service).await.map_err(
            |e| match e {
                GetError::Failed(e) => NodeError::Shared(e),
                GetError::Gone => {
                    NodeError::BadAnswer(format!("no session with {to} could be set up"))
                }
            },
        )
    }

    /// Set up a session with `to` through its domain server, for a first stream of
    /// `service` (the callee consents to that service, or refuses at once).
    pub(super) async fn set_up(
        &self,
        to: &Q2qAddress,
        service: &ServiceName,
    ) -> Result<Arc<PeerSession>, NodeError> {
        let server = self.server_for(&to.domain).await?;
        let reflexive = self.reflexive().await;
        let mine = candidates::gather(
            self.local_addr().port(),
            &self.reflexives().await,
            self.mapped(),
            self.inner.config.include_loopback,
        );
        let inbound = cmd::Inbound { to: to.clone(), service: service.clone(), candidates: mine };
        let answer = server.call(&inbound).await?;
        let setup = Setup::new(&answer.grant, server.server.as_str(), reflexive).await?;
        // No candidates: the callee keeps this session relayed (we are a stranger to it).
        let relay_only = setup.candidates.is_empty();
        let session = self
            .open_session(&setup, Role::Caller, &server, reflexive.is_some(), !relay_only)
            .await?;
        let ps = Arc::new(PeerSession::new(
            to.clone(),
            service.clone(),
            session,
            server.ca.clone(),
            relay_only,
            !setup.relay_elsewhere,
        ));
        let auth = tokio::time::timeout(AUTH_TIMEOUT, self.authenticate_dialer(&ps)).await;
        let auth = auth.unwrap_or_else(|_| {
            Err(NodeError::Io(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("{to} did not prove its identity within {} s", AUTH_TIMEOUT.as_secs()),
            )))
        });
        if let Err(e) = auth {
            ps.ptcp.abort().await;
            return Err(e);
        }
        self.serve_session(&ps);
        Ok(ps)
    }

    /// Run a session's accept loop (streams the peer opens, each checked against our
    /// policies) and its keeper (stream counts for `status`, the idle close).
    pub(super) fn serve_session(&self, ps: &Arc<PeerSession>) {
        let accept = tokio::spawn(self.clone().accept_loop(ps.clone()));
        ps.own_task(accept.abort_handle());
        let keep = tokio::spawn(self.clone().keep_session(ps.clone()));
        ps.own_task(keep.abort_handle());
    }

    pub(super) async fn accept_loop(self, ps: Arc<PeerSession>) {
        if ps.stream_token_now().is_none() {
            // We are the callee: the caller's first stream proves who it is, with a
            // certificate its domain did not revoke.
            let list = match self.revocation_list(&ps.peer.domain, &ps.ca).await {
                Ok(list) => list,
                Err(e) => {
                    warn!(peer = %ps.peer, error = %e, "session refused: revocation not checked");
                    ps.ptcp.abort().await;
                    return self.end_session(&ps, "revocation not checked").await;
                }
            };
            let trust: Arc<dyn crate::ptcp::tls::Trust> = Arc::new(revocation::PeerTrust {
                domain: ps.peer.domain.clone(),
                ca: ps.ca.clone(),
                list,
            });
            let auth = self.authenticate_acceptor(&ps, trust);
            let failed = match tokio::time::timeout(AUTH_TIMEOUT, auth).await {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(e),
                Err(_) => Some(format!("no proof of identity within {} s", AUTH_TIMEOUT.as_secs())),
            };
            if let Some(why) = failed {
                warn!(peer = %ps.peer, why, "session refused: authentication failed");
                ps.ptcp.abort().await;
                return self.end_session(&ps, "authentication failed").await;
            }
        }
        loop {
            let stream = match ps.ptcp.accept().await {
                Ok(s) => s,
                Err(e) => {
                    debug!(peer = %ps.peer, error = %e, "session ended");
                    return self.end_session(&ps, "lost").await;
                }
            };
            tokio::spawn(self.clone().accept_stream(ps.clone(), stream));
        }
    }

    /// One stream the peer opened: it must start with the session's stream token (the
    /// session's datagrams are sealed, so only the peer can open it); its header names a
    /// service the peer is authorized for (or asks to close the session).
    pub(super) async fn accept_stream(self, ps: Arc<PeerSession>, mut tls: PtcpStream) {
        use tokio::io::AsyncReadExt;
        let handshake = async {
            let mut token = [0u8; crate::ptcp::tls::STREAM_TOKEN_LEN];
            tls.read_exact(&mut token).await.map_err(|e| e.to_string())?;
            if !ps.is_stream_token(&token) {
                return Err("not this session's stream token".to_string());
            }
            StreamHeader::read(&mut tls).await.map_err(|e| e.to_string())
        };
        let header = match tokio::time::timeout(Duration::from_secs(10), handshake).await {
            Ok(Ok(h)) => h,
            Ok(Err(e)) => return warn!(peer = %ps.peer, error = %e, "refused a stream"),
            Err(_) => return debug!(peer = %ps.peer, "a stream's header timed out"),
        };
        let caller = ps.peer.clone();
        let me = &self.inner.me;
        let service = match header {
            StreamHeader::Leaving => {
                let _ = Verdict::Accepted.send(&mut tls).await;
                ps.ptcp.abort().await;
                return self.end_session(&ps, "the peer went offline").await;
            }
            StreamHeader::Close => {
                ps.closing(true);
                let busy = ps.count_streams().await.unwrap_or(0) > 0;
                let verdict = if busy {
                    Verdict::Refused("streams are open".into())
                } else {
                    Verdict::Accepted
                };
                let _ = verdict.send(&mut tls).await;
                ps.closing(false);
                if !busy {
                    self.end_session(&ps, "closed by the peer (idle)").await;
                }
                return;
            }
            StreamHeader::Service(s) => s,
        };
        if let Some(why) = self.peer_refused(&ps).await {
            warn!(peer = %caller, %service, why, "refused a stream: revoked");
            let _ = Verdict::Refused(why).send(&mut tls).await;
            ps.ptcp.abort().await;
            return self.end_session(&ps, "the peer's certificate is revoked").await;
        }
        let target = {
            let Ok(l) = self.inner.listening.lock() else { return };
            match l.get(&service) {
                None => Err(format!("{me} does not offer service {service}")),
                Some(l) if !l.policy.permits(&caller) => {
                    Err(format!("{caller} is not authorized for {service} of {me}"))
                }
                Some(l) => Ok(l.accepted.clone()),
            }
        };
        match target {
            Ok(accepted) => {
                if Verdict::Accepted.send(&mut tls).await.is_err() {
                    return;
                }
                ps.note_opened(&service);
                let a = Accepted { peer: caller, stream: tls, session: ps.ptcp.clone() };
                let _ = accepted.send(a).await;
            }
            Err(why) => {
                info!(peer = %caller, %service, why, "refused a stream");
                if why.contains("not authorized") {
                    let _ = self.inner.refusals.send((caller, service));
                }
                let _ = Verdict::Refused(why).send(&mut tls).await;
            }
        }
    }

    /// Count the session's streams and sample its traffic once a second (for `status`), and
    /// end it when it has had none for [`NodeConfig::session_idle`]: ask the peer to close,
    /// and forget it.
    pub(super) async fn keep_session(self, ps: Arc<PeerSession>) {
        let idle = self.inner.config.session_idle;
        let mut idle_since = tokio::time::Instant::now();
        let recheck = self.inner.config.revocation_max_age.max(Duration::from_secs(1));
        let mut checked = tokio::time::Instant::now();
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            // The peer's certificate revoked meanwhile: the session ends.
            if checked.elapsed() >= recheck {
                checked = tokio::time::Instant::now();
                if let Some(why) = self.peer_refused(&ps).await {
                    warn!(peer = %ps.peer, why, "session ended: revoked");
                    ps.ptcp.abort().await;
                    return self.end_session(&ps, "the peer's certificate is revoked").await;
                }
            }
            let Some(open) = ps.count_streams().await else {
                return self.end_session(&ps, "lost").await;
            };
            ps.sample_traffic().await;
            if open > 0 {
                idle_since = tokio::time::Instant::now();
                continue;
            }
            if idle_since.elapsed() < idle {
                continue;
            }
            match tokio::time::timeout(
                Duration::from_secs(5),
                self.ask_close(&ps, StreamHeader::Close),
            )
            .await
            {
                // Busy: the peer opened a stream meanwhile.
                Ok(Ok(false)) => idle_since = tokio::time::Instant::now(),
                // Agreed, or no answer: the peer will time out or close on its own.
                _ => return self.end_session(&ps, "idle").await,
            }
        }
    }

    /// Ask the peer to end the session (`Close` or `Leaving`): `true` if it agreed.
    pub(super) async fn ask_close(
        &self,
        ps: &Arc<PeerSession>,
        header: StreamHeader,
    ) -> Result<bool, NodeError> {
        ps.closing(true);
        let result = self.exchange(ps, &header).await.map(|(_, v)| v == Verdict::Accepted);
        ps.closing(false);
        result
    }

    /// Going offline: tell every peer in session (at most 1 s each, side by side), so
    /// their streams end now and their next connection learns from the server that we
    /// are offline, instead of waiting on a silent session.
    pub async fn leave(&self) {
        if let Some(m) = &self.inner.port_map {
            m.stop().await;
        }
        let sessions = self.inner.table.list().await;
        let mut told = tokio::task::JoinSet::new();
        for ps in sessions {
            let node = self.clone();
            told.spawn(async move {
                let _ = tokio::time::timeout(
                    Duration::from_secs(1),
                    node.ask_close(&ps, StreamHeader::Leaving),
                )
                .await;
                node.end_session(&ps, "we went offline").await;
            });
        }
        while told.join_next().await.is_some() {}
    }

    /// Forget a session: out of the table, its path machinery stopped, its tasks ended.
    /// Its open streams (if any) live on until they close.
    pub(super) async fn end_session(&self, ps: &Arc<PeerSession>, why: &str) {
        if !ps.mark_ended() {
            return;
        }
        let id = ps.id();
        info!(peer = %ps.peer, session = format!("{id:016x}"), why, "session ended");
        self.inner.table.remove(&ps.peer, ps).await;
        ps.stop_tasks();
    }
}
