//! The q2q control protocol: command names, argument keys and error codes shared by the
//! identity server and its clients. Carried as AMP boxes over TLS 1.3 on TCP port 8788.
//!
//! The first call on every connection is `hello` naming [`VERSION`]; an unknown version is
//! answered with an `UNSUPPORTED_VERSION` error box and the connection stays open, so a
//! client can retry with a version the server speaks.
//!
//! | command | arguments | answer |
//! |---|---|---|
//! | `hello` | `version` | `version`, `domain`, `server` |
//! | `identify` | `subject` (a domain or address) | `certificate` (the domain CA, PEM) |
//! | `register` | `address`, `password`, `invite`? | (empty) |
//! | `sign` | `certificate_request` (PEM), `password` | `certificate` (PEM) |
//! | `who-am-i` | (none) | `host`, `port`: the address the server sees |
//! | `ping` | (none) | (empty): keeps the connection and NAT state alive |
//! | `revocations` | `domain` (the server's) | `list`: the domain's revocation list, an X.509 v2 CRL (DER, at most 65535 bytes) signed by the domain CA |
//!
//! Logged in (TLS client certificate of any domain, verified against that domain's CA):
//!
//! | command | arguments | answer |
//! |---|---|---|
//! | `listen` | `service`, `description` | (empty); presence lasts as long as the connection |
//! | `unlisten` | `service` | (empty) |
//! | `inbound` | `to`, `service`, `candidates` | `peer`, `candidates`, `session`, `probe_key`, `relay_token`, `relay_key`, `relay_port`, `relay_host`?, `peer_seen` |
//! | `relay` | `token`, `data` | none: a relayed datagram over TCP, either direction; only for a leg of this connection |
//! | `exists` | `address` (of the server's domain) | `exists`: `true` or `false` |
//! | `renew` | `certificate`? (PEM; default: the login certificate) | `certificate` (PEM): the same key, a fresh validity |
//!
//! `renew` is for callers of the server's own domain only. The certificate renewed must be
//! for the key the connection logged in with (the TLS handshake proved it is held) and the
//! caller's address, one the server issued and did not revoke, expired at most 5 minutes
//! ago (clock skew); the account must exist. Refusals: `BAD_CERTIFICATE`, `UNKNOWN_USER`
//! (account removed), `RATE_LIMITED` (6 renewals per account per lifetime).
//!
//! The server asks the callee `inbound` with `from`, `service`, `candidates`, `session`,
//! `probe_key`, `relay_token`, `relay_key`, `relay_port`, `peer_seen` (and `from_serial`, the
//! serial of the caller's certificate, which the callee checks against its own copy of the
//! caller's domain's revocation list), and the callee
//! answers its `candidates` or an error (`NOT_AUTHORIZED`). `candidates` is a
//! comma-separated list of `ip:port`.
//!
//! - `relay_token` (hex, 16 bytes) and `relay_key` (hex, 32 bytes): the receiver's own leg
//!   of the relayed session. The token names the leg and travels in clear in each relay
//!   datagram; the key is secret, given only here (inside TLS), and authenticates the
//!   leg's UDP datagrams both ways ([`crate::relay`]). `relay_port`: the server's UDP port.
//!   `relay_host` (an IP address, optional): where that relay is when it is not the server
//!   the caller is connected to (the callee is logged in at another instance of the
//!   domain, [`crate::server::cluster`]); absent, the relay is the caller's own server.
//! - `peer_seen`: the IP address (no port) the server sees the *other* side's control
//!   connection come from, to check the other side's `candidates` against.

//!
//! `candidates` (`to`, `session`, `candidates`, `relay`?): after a network change, a node gives a peer
//! it has a live session with its fresh candidates, through the server where the peer is
//! logged in. The server asks the peer the same command with `from`, `session`,
//! `candidates` and `peer_seen` (the IP it sees the caller's connection come from), and
//! answers the caller with the peer's `candidates` and `peer_seen`. Either side probes only
//! candidates at the other's `peer_seen` or on its own networks.
//!
//! With `relay` = `true` (after logging back in) both sides also get their own leg of the
//! session's relay again: `relay_token`, `relay_key`, `relay_port`, in the answer and in
//! the peer's ask. The server gives the legs it has (now owned by the two connections
//! asking and asked: a control connection that closes leaves its legs working over UDP
//! until then, for up to 2 minutes, unless it was closed for a revoked certificate) or,
//! when it forgot them (it restarted), sets up new ones, which go at once
//! if the peer does not confirm the session. Asking twice, or from both sides at once,
//! gives one pair. A node asks this only of the server that set the session up.
//!
//! Each command is a type in [`commands`] (its arguments, its answer, its error codes),
//! the one place these boxes are written and read.
pub mod commands;
pub mod whoami;

pub use commands::{Command, ErrorCode, Message, Refusal};

/// The control-protocol version this build speaks.
pub const VERSION: &str = "1";
/// The default TCP and UDP port of an identity server.
pub const DEFAULT_PORT: u16 = 8788;
/// TLS ALPN protocol id of the control connection.
pub const ALPN: &[u8] = b"q2q/1";

pub mod command {
    pub const HELLO: &str = "hello";
    pub const IDENTIFY: &str = "identify";
    pub const REGISTER: &str = "register";
    pub const SIGN: &str = "sign";
    pub const WHO_AM_I: &str = "who-am-i";
    pub const PING: &str = "ping";
    pub const LISTEN: &str = "listen";
    pub const UNLISTEN: &str = "unlisten";
    pub const INBOUND: &str = "inbound";
    pub const RELAY: &str = "relay";
    /// Whether an address of the server's domain is registered (for the `*.q2q` resolver:
    /// unknown users get NXDOMAIN). Logged-in callers only.
    pub const EXISTS: &str = "exists";
    /// Fresh candidates for a live peer session after a network change (see the module
    /// docs). Logged-in callers only, rate-limited per pair like `inbound`.
    pub const CANDIDATES: &str = "candidates";
    /// A new certificate for the logged-in key, with a fresh validity (no password).
    pub const RENEW: &str = "renew";
    /// The domain's signed revocation list ([`crate::identity::revocation`]); anyone may
    /// ask, like `identify`.
    pub const REVOCATIONS: &str = "revocations";
    /// The proof that the caller's UDP socket was seen at an IP of the other family
    /// ([`super::commands::AlsoSeen`]). Logged-in callers only.
    pub const ALSO_SEEN: &str = "also-seen";
}

/// `_error_code` values. Every error box carries one of these and a human sentence.
pub mod code {
    /// The command is not one this server knows (Twisted's own code for it).
    pub const UNHANDLED: &str = "UNHANDLED";
    pub const UNSUPPORTED_VERSION: &str = "UNSUPPORTED_VERSION";
    pub const HELLO_FIRST: &str = "HELLO_FIRST";
    pub const BAD_REQUEST: &str = "BAD_REQUEST";
    pub const WRONG_DOMAIN: &str = "WRONG_DOMAIN";
    pub const ADDRESS_TAKEN: &str = "ADDRESS_TAKEN";
    pub const REGISTRATION_CLOSED: &str = "REGISTRATION_CLOSED";
    pub const BAD_INVITE: &str = "BAD_INVITE";
    pub const UNKNOWN_USER: &str = "UNKNOWN_USER";
    pub const WRONG_PASSWORD: &str = "WRONG_PASSWORD";
    pub const RATE_LIMITED: &str = "RATE_LIMITED";
    pub const INTERNAL: &str = "INTERNAL";
    pub const NOT_LOGGED_IN: &str = "NOT_LOGGED_IN";
    pub const BAD_CERTIFICATE: &str = "BAD_CERTIFICATE";
    pub const OFFLINE: &str = "OFFLINE";
    pub const NO_SUCH_SERVICE: &str = "NO_SUCH_SERVICE";
    pub const NOT_AUTHORIZED: &str = "NOT_AUTHORIZED";
    pub const RELAY_LIMIT: &str = "RELAY_LIMIT";
    /// The other end dropped the request without answering ([`crate::amp::peer`]).
    pub const UNKNOWN: &str = "UNKNOWN";
    /// The daemon's control socket ([`crate::daemon::control`]): no TUN device.
    pub const NO_TUN: &str = "NO_TUN";
    /// The daemon's control socket: services.toml could not be applied.
    pub const RELOAD_FAILED: &str = "RELOAD_FAILED";
    /// The daemon's control socket: the peer could not be pinged.
    pub const PING_FAILED: &str = "PING_FAILED";
}

/// Most candidates one side may offer.
pub const MAX_CANDIDATES: usize = 32;

/// Parse a `candidates` value: comma-separated `ip:port`, at most [`MAX_CANDIDATES`].
pub fn parse_candidates(s: &str) -> Result<Vec<std::net::SocketAddr>, String> {
    let list: Vec<_> = s.split(',').map(str::trim).filter(|c| !c.is_empty()).collect();
    if list.len() > MAX_CANDIDATES {
        return Err(format!("more than {MAX_CANDIDATES} candidates"));
    }
    list.iter()
        .map(|c| c.parse().map_err(|_| format!("`{c}` is not an ip:port candidate")))
        .collect()
}

/// The `candidates` value for `list`.
pub fn format_candidates(list: &[std::net::SocketAddr]) -> String {
    list.iter().map(ToString::to_string).collect::<Vec<_>>().join(",")
}
