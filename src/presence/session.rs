//! Peer sessions: one per pair of people, carrying every stream between them.
//!
//! A [`PeerSession`] is set up once through the servers (`inbound`: consent, candidates,
//! punching) and then carries every stream between the two addresses, any service, either
//! direction, with no server round trip.
//!
//! **Authenticated once.** The caller's first stream is TLS 1.3 between the two
//! certificates (end to end: the servers vouch for nobody). Both ends take the session's
//! [`SessionSecrets`] from that handshake: keys that seal every PTCP datagram of the
//! session from then on (`q2q_netstack::seal`: the relay and anyone on the path see only
//! ciphertext, and cannot inject or replay), and a stream token. That stream then closes.
//!
//! **Streams.** Every later stream, opened by either side, starts with the token and a
//! [`StreamHeader`] naming the service; the acceptor checks its policy for that service
//! and answers a [`Verdict`] before any data moves:
//!
//! ```text
//!  caller                                   callee
//!  stream 1: TLS 1.3, both certificates ◀─▶ caller == the session's peer?
//!            both: keys from the exporter, every datagram sealed from now on
//!  opener                                   acceptor
//!  PTCP stream (smoltcp SYN) ─────────────▶ accept
//!  token ‖ header: service "tcp/22" ──────▶ token of this session? authorized for tcp/22?
//!                           ◀───────────── verdict: accepted | refused + reason
//!  application bytes       ◀─────────────▶
//! ```
//!
//! A session with no streams for a while ends: one side sends the header `Close` on a
//! stream of its own; the other agrees unless it has streams open (a race with a new
//! stream), and both forget the session. A node going offline sends `Leaving` on each of
//! its sessions: the peer ends the session and its streams at once (as a host's kernel
//! resets its TCP connections when it shuts down), so its next connection asks the server
//! and learns at once that the node is offline.

use crate::address::{Q2qAddress, ServiceName};
use crate::ptcp::PtcpSession;
use crate::ptcp::tls::{STREAM_TOKEN_LEN, SessionSecrets};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// What the opener of a stream says first, inside TLS: one Rust type per message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamHeader {
    /// Open a stream to this service.
    Service(ServiceName),
    /// End the session: the sender has no streams and wants none.
    Close,
    /// The sender goes offline (its daemon stops): end the session and its streams now.
    Leaving,
}

/// The acceptor's answer to a [`StreamHeader`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The stream is accepted (for `Close`: the session ends).
    Accepted,
    /// Refused, with the reason for the opener's user (for `Close`: streams are open).
    Refused(String),
}

/// Why a header or verdict could not be read.
#[derive(Debug, thiserror::Error)]
pub enum HeaderError {
    #[error("stream header: {0}")]
    Io(#[from] std::io::Error),
    #[error("stream header: unknown kind {0}")]
    UnknownKind(u8),
    #[error("stream header: bad service name")]
    BadService,
}

const KIND_SERVICE: u8 = 1;
const KIND_CLOSE: u8 = 2;
const KIND_LEAVING: u8 = 3;
const ACCEPTED: u8 = 0;
const REFUSED: u8 = 1;
/// Longest refusal reason sent (bytes); longer ones are cut at a character boundary.
pub const MAX_REASON: usize = 512;

impl StreamHeader {
    /// `kind (1) | for Service: length (1) | name`.
    pub fn encode(&self) -> Vec<u8> {
        match self {
            StreamHeader::Service(s) => {
                let name = s.as_str().as_bytes();
                // A ServiceName is at most 64 bytes, so its length fits one byte.
                let mut out = vec![KIND_SERVICE, name.len() as u8];
                out.extend_from_slice(name);
                out
            }
            StreamHeader::Close => vec![KIND_CLOSE],
            StreamHeader::Leaving => vec![KIND_LEAVING],
        }
    }

    /// Read one header; anything malformed is an error (the stream is then dropped).
    pub async fn read<R: AsyncRead + Unpin>(r: &mut R) -> Result<StreamHeader, HeaderError> {
        match r.read_u8().await? {
            KIND_SERVICE => {
                let len = usize::from(r.read_u8().await?);
                let mut name = vec![0u8; len];
                r.read_exact(&mut name).await?;
                let name = std::str::from_utf8(&name).map_err(|_| HeaderError::BadService)?;
                ServiceName::parse(name)
                    .map(StreamHeader::Service)
                    .map_err(|_| HeaderError::BadService)
            }
            KIND_CLOSE => Ok(StreamHeader::Close),
            KIND_LEAVING => Ok(StreamHeader::Leaving),
            other => Err(HeaderError::UnknownKind(other)),
        }
    }
}

impl Verdict {
    /// `0` accepted, or `1 | length (2, BE) | reason (UTF-8)`.
    pub fn encode(&self) -> Vec<u8> {
        match self {
            Verdict::Accepted => vec![ACCEPTED],
            Verdict::Refused(why) => {
                let mut end = why.len().min(MAX_REASON);
                while !why.is_char_boundary(end) {
                    end -= 1;
                }
                let mut out = vec![REFUSED];
                out.extend_from_slice(&(end as u16).to_be_bytes());
                out.extend_from_slice(&why.as_bytes()[..end]);
                out
            }
        }
    }

    pub async fn read<R: AsyncRead + Unpin>(r: &mut R) -> Result<Verdict, HeaderError> {
        match r.read_u8().await? {
            ACCEPTED => Ok(Verdict::Accepted),
            REFUSED => {
                let len = usize::from(r.read_u16().await?).min(MAX_REASON);
                let mut why = vec![0u8; len];
                r.read_exact(&mut why).await?;
                Ok(Verdict::Refused(String::from_utf8_lossy(&why).into_owned()))
            }
            other => Err(HeaderError::UnknownKind(other)),
        }
    }

    /// Write the verdict and flush.
    pub async fn send<W: AsyncWrite + Unpin>(&self, w: &mut W) -> std::io::Result<()> {
        w.write_all(&self.encode()).await?;
        w.flush().await
    }
}

/// One live session with one peer, shared by the session table, its accept loop and its
/// keeper. The path state lives with the probing of its PTCP session (see `node`).
pub struct PeerSession {
    /// The other person, as the server announced and the session's TLS handshake proved.
    pub peer: Q2qAddress,
    /// The service of the stream the session was set up for.
    pub service: ServiceName,
    /// The PTCP session (its streams, its path).
    pub ptcp: Arc<PtcpSession>,
    /// The CA of the peer's domain, which every stream's certificate must chain to.
    pub ca: rustls_pki_types::CertificateDer<'static>,
    /// No direct path is looked for (a caller authorized for none of our services: it
    /// learns no candidate and gets no probe from us).
    pub relay_only: bool,
    /// Its relay legs are at the server we would ask for them again after a re-login
    /// (`candidates` with `relay`): we are the caller (we asked the server of the peer's
    /// domain), or the peer is of our own domain, and the legs are not at another instance.
    pub relay_renewable: bool,
    pub started: std::time::Instant,
    /// Streams open now, as the keeper last counted them (less the close handshakes).
    open: AtomicUsize,
    /// Close handshakes under way: these streams do not count as use.
    closing: AtomicUsize,
    /// Streams opened so far, by service (either direction), for `status`.
    opened: Mutex<BTreeMap<String, u64>>,
    /// The session's traffic as the keeper last sampled it (written by the keeper only).
    traffic: Mutex<Option<(Traffic, std::time::Instant)>>,
    ended: AtomicBool,
    tasks: Mutex<Vec<tokio::task::AbortHandle>>,
    /// Whether both identities are proven yet.
    auth: tokio::sync::watch::Sender<Auth>,
    /// The serial (lowercase hex) of the certificate the peer proved, once it did: checked
    /// against its domain's revocation list.
    peer_serial: std::sync::OnceLock<String>,
}

/// What a peer session has carried and how its path behaves, for `status`: a few of the
/// PTCP session's counters ([`q2q_netstack::Stats`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct Traffic {
    /// Smoothed round-trip time of the path, microseconds.
    pub rtt_us: u64,
    /// The path MTU in use (RFC 8899 PLPMTU), bytes of UDP payload.
    pub path_mtu: u64,
    /// Bytes of data datagrams sent, retransmissions included.
    pub bytes_sent: u64,
    /// Bytes of the peer's packets taken, each once.
    pub bytes_received: u64,
    /// Data datagrams sent, retransmissions included.
    pub packets_sent: u64,
    /// Of those, retransmissions (after a loss, or a timeout).
    pub retransmits: u64,
    /// Bits per second sent since the sample before (0 for the first sample).
    pub sending_bps: u64,
    /// Bits per second received since the sample before (0 for the first sample).
    pub receiving_bps: u64,
}

impl Traffic {
    /// Set the rates from what moved since `before`, taken `elapsed` earlier (none for an
    /// interval under a millisecond).
    pub fn rates_since(&mut self, before: &Traffic, elapsed: std::time::Duration) {
        let us = elapsed.as_micros();
        if us < 1000 {
            return;
        }
        let rate = |now: u64, then: u64| {
            u64::try_from(u128::from(now.saturating_sub(then)) * 8_000_000 / us).unwrap_or(u64::MAX)
        };
        self.sending_bps = rate(self.bytes_sent, before.bytes_sent);
        self.receiving_bps = rate(self.bytes_received, before.bytes_received);
    }
}

impl From<&q2q_netstack::Stats> for Traffic {
    fn from(s: &q2q_netstack::Stats) -> Traffic {
        Traffic {
            rtt_us: s.srtt.total_micros(),
            path_mtu: s.plpmtu as u64,
            bytes_sent: s.sender.bytes_sent,
            bytes_received: s.receiver.bytes_received,
            packets_sent: s.sender.packets_sent,
            retransmits: s.sender.retransmits,
            sending_bps: 0,
            receiving_bps: 0,
        }
    }
}

/// How far the session's authentication is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Auth {
    Pending,
    /// Proven; the stream token.
    Done([u8; STREAM_TOKEN_LEN]),
    /// The session ended first.
    Ended,
}

impl std::fmt::Debug for PeerSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerSession").field("peer", &self.peer).field("id", &self.id()).finish()
    }
}

impl PeerSession {
    pub fn new(
        peer: Q2qAddress,
        service: ServiceName,
        ptcp: Arc<PtcpSession>,
        ca: rustls_pki_types::CertificateDer<'static>,
        relay_only: bool,
        relay_renewable: bool,
    ) -> PeerSession {
        PeerSession {
            peer,
            service,
            ptcp,
            ca,
            relay_only,
            relay_renewable,
            started: std::time::Instant::now(),
            open: AtomicUsize::new(0),
            closing: AtomicUsize::new(0),
            opened: Mutex::new(BTreeMap::new()),
            traffic: Mutex::new(None),
            ended: AtomicBool::new(false),
            tasks: Mutex::new(Vec::new()),
            auth: tokio::sync::watch::channel(Auth::Pending).0,
            peer_serial: std::sync::OnceLock::new(),
        }
    }

    /// Record the serial of the certificate the peer proved (once).
    pub fn set_peer_serial(&self, serial: String) {
        let _ = self.peer_serial.set(serial);
    }

    /// The serial of the certificate the peer proved, once it did.
    pub fn peer_serial(&self) -> Option<&str> {
        self.peer_serial.get().map(String::as_str)
    }

    /// Both identities are proven and the session's datagrams are sealed with `secrets`:
    /// streams may open.
    pub fn authenticated(&self, secrets: &SessionSecrets) {
        self.auth.send_replace(Auth::Done(secrets.stream_token));
    }

    /// The stream token, once the session is authenticated (waits for it; `None` if the
    /// session ended first).
    pub async fn stream_token(&self) -> Option<[u8; STREAM_TOKEN_LEN]> {
        let mut rx = self.auth.subscribe();
        let auth = rx.wait_for(|a| *a != Auth::Pending).await.ok()?;
        match *auth {
            Auth::Done(token) => Some(token),
            Auth::Pending | Auth::Ended => None,
        }
    }

    /// The stream token if the session is authenticated already.
    pub fn stream_token_now(&self) -> Option<[u8; STREAM_TOKEN_LEN]> {
        match *self.auth.borrow() {
            Auth::Done(token) => Some(token),
            Auth::Pending | Auth::Ended => None,
        }
    }

    /// Whether `token` is this session's stream token (compared in constant time).
    pub fn is_stream_token(&self, token: &[u8; STREAM_TOKEN_LEN]) -> bool {
        match *self.auth.borrow() {
            Auth::Done(mine) => mine.iter().zip(token).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0,
            Auth::Pending | Auth::Ended => false,
        }
    }

    /// The PTCP session id.
    pub fn id(&self) -> u64 {
        self.ptcp.id().0
    }

    /// Whether the session was ended (closed or lost).
    pub fn ended(&self) -> bool {
        self.ended.load(Ordering::Acquire) || self.ptcp.error().is_some()
    }

    /// Count a stream of `service`.
    pub fn note_opened(&self, service: &ServiceName) {
        if let Ok(mut o) = self.opened.lock() {
            *o.entry(service.to_string()).or_default() += 1;
        }
    }

    /// Services used so far and how many streams each, for `status`.
    pub fn opened(&self) -> Vec<(String, u64)> {
        self.opened
            .lock()
            .map(|o| o.iter().map(|(k, v)| (k.clone(), *v)).collect())
            .unwrap_or_default()
    }

    /// The session's traffic as last sampled ([`PeerSession::sample_traffic`]); `None`
    /// before the first sample.
    pub fn traffic(&self) -> Option<Traffic> {
        self.traffic.lock().ok().and_then(|t| t.map(|(t, _)| t))
    }

    /// Sample the session's counters for `status` (the keeper does, once a second); the
    /// last sample stays once the session is gone.
    pub async fn sample_traffic(&self) {
        let Ok(stats) = self.ptcp.stats().await else { return };
        let now = std::time::Instant::now();
        if let Ok(mut slot) = self.traffic.lock() {
            let mut t = Traffic::from(&stats);
            if let Some((before, at)) = *slot {
                t.rates_since(&before, now.saturating_duration_since(at));
            }
            *slot = Some((t, now));
        }
    }

    /// Streams open now (sampled by the keeper).
    pub fn open_streams(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// Count the streams in use from the endpoint: the ones that are not close handshakes.
    pub async fn count_streams(&self) -> Option<usize> {
        let n = self.ptcp.streams_in_use().await.ok()?;
        let n = n.saturating_sub(self.closing.load(Ordering::Relaxed));
        self.open.store(n, Ordering::Relaxed);
        Some(n)
    }

    /// A close handshake starts (`true`) or ends (`false`).
    pub fn closing(&self, on: bool) {
        if on {
            self.closing.fetch_add(1, Ordering::Relaxed);
        } else {
            self.closing.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Tasks that live as long as the session (its accept loop, its keeper).
    pub fn own_task(&self, t: tokio::task::AbortHandle) {
        if let Ok(mut tasks) = self.tasks.lock() {
            tasks.push(t);
        }
    }

    /// Mark the session over: `true` the first time (that caller cleans up, then calls
    /// [`PeerSession::stop_tasks`]).
    pub fn mark_ended(&self) -> bool {
        self.auth.send_if_modified(|a| {
            let pending = *a == Auth::Pending;
            if pending {
                *a = Auth::Ended;
            }
            pending
        });
        !self.ended.swap(true, Ordering::AcqRel)
    }

    /// Stop the session's tasks. Last, since the caller may be one of them (an aborted
    /// task stops at its next await). Its PTCP session is released by the endpoint once its
    /// last stream is closed.
    pub fn stop_tasks(&self) {
        if let Ok(mut tasks) = self.tasks.lock() {
            for t in tasks.drain(..) {
                t.abort();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn headers_and_verdicts_round_trip() {
        for h in [
            StreamHeader::Service(ServiceName::parse("tcp/22").unwrap()),
            StreamHeader::Close,
            StreamHeader::Leaving,
        ] {
            let bytes = h.encode();
            assert_eq!(StreamHeader::read(&mut &bytes[..]).await.unwrap(), h);
        }
        for v in [Verdict::Accepted, Verdict::Refused("not authorized".into())] {
            let bytes = v.encode();
            assert_eq!(Verdict::read(&mut &bytes[..]).await.unwrap(), v);
        }
    }

    proptest::proptest! {
        /// Whatever a peer sends first, reading it is a header, a verdict or an error.
        #[test]
        fn reading_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..600)) {
            let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
            rt.block_on(async {
                let _ = StreamHeader::read(&mut &bytes[..]).await;
                if let Ok(Verdict::Refused(r)) = Verdict::read(&mut &bytes[..]).await {
                    assert!(r.len() <= MAX_REASON * 3, "a lossy reason stays bounded");
                }
            });
        }
    }

    #[tokio::test]
    async fn hostile_headers_are_errors() {
        assert!(StreamHeader::read(&mut &[9u8][..]).await.is_err());
        assert!(
            StreamHeader::read(&mut &[1u8, 5, b'.', b'.', b'/', b'x', b'y'][..]).await.is_err()
        );
        assert!(StreamHeader::read(&mut &[1u8, 200, b'a'][..]).await.is_err(), "truncated");
        assert!(StreamHeader::read(&mut &[1u8, 2, 0xff, 0xfe][..]).await.is_err(), "not UTF-8");
        // A reason longer than the limit is cut, never read past the limit.
        let long = Verdict::Refused("é".repeat(MAX_REASON));
        match Verdict::read(&mut &long.encode()[..]).await.unwrap() {
            Verdict::Refused(r) => assert!(r.len() <= MAX_REASON),
            v => panic!("{v:?}"),
        }
    }
}
