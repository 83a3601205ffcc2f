//! One Rust type per control-protocol command: its arguments (the type itself), its answer
//! ([`Command::Answer`]) and the error codes it may answer with ([`Command::ERRORS`]). This
//! file is the one place boxes of the control protocol are written and read: the server,
//! the node and the clients build these types and get them back, parsed into domain types
//! ([`Q2qAddress`], [`ServiceName`], candidate lists, fixed-size keys); no key string or
//! value text goes further in.
//!
//! The wire stays what it was (Twisted AMP boxes, [`crate::amp`]): the same command names,
//! the same keys, values written as before (addresses and names as text, `session` as 16
//! lowercase hex digits, keys and tokens as lowercase hex, `candidates` comma-separated
//! `ip:port`, `exists` as `true`/`false`, `data` as raw bytes).
//!
//! Decoding a box that lacks a required argument or holds a malformed one gives a
//! [`Refusal`] with [`ErrorCode::BadRequest`] and a sentence naming the argument, which
//! the server sends back as its error box. Optional arguments are `Option`s; absent
//! `candidates` read as none, as before.

use super::{code, command};
use crate::address::{Domain, Q2qAddress, ServiceName};
use crate::amp::{self, AmpBox};
use crate::relay;
use std::net::{IpAddr, SocketAddr};

/// An `_error_code`: the codes of [`super::code`], typed.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// `UNHANDLED`: the command is not one the other end knows (Twisted's own code).
    Unhandled,
    /// `UNSUPPORTED_VERSION`: `hello` named a protocol version the server does not speak.
    UnsupportedVersion,
    /// `HELLO_FIRST`: a command before `hello`.
    HelloFirst,
    /// `BAD_REQUEST`: an argument is missing or malformed.
    BadRequest,
    /// `WRONG_DOMAIN`: an address of another domain than the server's.
    WrongDomain,
    /// `ADDRESS_TAKEN`: `register` of an address that has an account.
    AddressTaken,
    /// `REGISTRATION_CLOSED`: the server takes no registrations.
    RegistrationClosed,
    /// `BAD_INVITE`: no invite code, or one not valid or used already.
    BadInvite,
    /// `UNKNOWN_USER`: the account does not exist (any more).
    UnknownUser,
    /// `WRONG_PASSWORD`: no such user or a wrong password (deliberately the same answer).
    WrongPassword,
    /// `RATE_LIMITED`: too many requests; the sentence says how long to wait.
    RateLimited,
    /// `INTERNAL`: the server failed (its log says why).
    Internal,
    /// `NOT_LOGGED_IN`: the command needs a client certificate.
    NotLoggedIn,
    /// `BAD_CERTIFICATE`: the client certificate does not check out (or was revoked).
    BadCertificate,
    /// `OFFLINE`: the callee has no control connection, or did not answer.
    Offline,
    /// `NO_SUCH_SERVICE`: the callee does not offer the service.
    NoSuchService,
    /// `NOT_AUTHORIZED`: the callee refuses the caller.
    NotAuthorized,
    /// `RELAY_LIMIT`: too many relayed sessions for the user.
    RelayLimit,
    /// `UNKNOWN`: the other end dropped the request unanswered ([`crate::amp::peer`]), or
    /// (the daemon's `whois`) nobody stands behind the address.
    Unknown,
    /// `NO_TUN` (daemon control socket): the daemon runs without the TUN device.
    NoTun,
    /// `RELOAD_FAILED` (daemon control socket): services.toml could not be applied.
    ReloadFailed,
    /// `PING_FAILED` (daemon control socket): the peer could not be pinged.
    PingFailed,
    /// A code this build does not know (a newer peer's), kept as it came.
    Other(String),
}

/// Every code this build knows, with its wire name.
const CODES: &[(ErrorCode, &str)] = &[
    (ErrorCode::Unhandled, code::UNHANDLED),
    (ErrorCode::UnsupportedVersion, code::UNSUPPORTED_VERSION),
    (ErrorCode::HelloFirst, code::HELLO_FIRST),
    (ErrorCode::BadRequest, code::BAD_REQUEST),
    (ErrorCode::WrongDomain, code::WRONG_DOMAIN),
    (ErrorCode::AddressTaken, code::ADDRESS_TAKEN),
    (ErrorCode::RegistrationClosed, code::REGISTRATION_CLOSED),
    (ErrorCode::BadInvite, code::BAD_INVITE),
    (ErrorCode::UnknownUser, code::UNKNOWN_USER),
    (ErrorCode::WrongPassword, code::WRONG_PASSWORD),
    (ErrorCode::RateLimited, code::RATE_LIMITED),
    (ErrorCode::Internal, code::INTERNAL),
    (ErrorCode::NotLoggedIn, code::NOT_LOGGED_IN),
    (ErrorCode::BadCertificate, code::BAD_CERTIFICATE),
    (ErrorCode::Offline, code::OFFLINE),
    (ErrorCode::NoSuchService, code::NO_SUCH_SERVICE),
    (ErrorCode::NotAuthorized, code::NOT_AUTHORIZED),
    (ErrorCode::RelayLimit, code::RELAY_LIMIT),
    (ErrorCode::Unknown, code::UNKNOWN),
    (ErrorCode::NoTun, code::NO_TUN),
    (ErrorCode::ReloadFailed, code::RELOAD_FAILED),
    (ErrorCode::PingFailed, code::PING_FAILED),
];

impl ErrorCode {
    /// The wire name, like `BAD_REQUEST`.
    pub fn as_str(&self) -> &str {
        match self {
            ErrorCode::Other(s) => s,
            known => CODES.iter().find(|(c, _)| c == known).map_or("UNKNOWN", |(_, s)| s),
        }
    }

    /// The code named `s` ([`ErrorCode::Other`] for a name this build does not know).
    pub fn parse(s: &str) -> ErrorCode {
        CODES
            .iter()
            .find(|(_, name)| *name == s)
            .map_or_else(|| ErrorCode::Other(s.to_string()), |(c, _)| c.clone())
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An error box: a code and a sentence for a person. What a handler refuses with, and
/// what a call to the other end comes back with when it refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{description}")]
pub struct Refusal {
    pub code: ErrorCode,
    pub description: String,
}

impl Refusal {
    pub fn new(code: ErrorCode, description: impl Into<String>) -> Refusal {
        Refusal { code, description: description.into() }
    }

    /// `BAD_REQUEST` with `description`.
    pub fn bad_request(description: impl Into<String>) -> Refusal {
        Refusal::new(ErrorCode::BadRequest, description)
    }
}

impl From<Refusal> for amp::ErrorBox {
    fn from(r: Refusal) -> amp::ErrorBox {
        amp::ErrorBox { code: r.code.as_str().to_string(), description: r.description }
    }
}

impl From<amp::ErrorBox> for Refusal {
    fn from(e: amp::ErrorBox) -> Refusal {
        Refusal { code: ErrorCode::parse(&e.code), description: e.description }
    }
}

/// A set of named values that travels as the keys of one box: a command's arguments or
/// its answer.
pub trait Message: Sized {
    /// The box of these values (no `_command`, `_ask` or `_answer`: the AMP layer adds
    /// those).
    fn to_box(&self) -> AmpBox;
    /// The values of `b`; keys this message does not know are ignored (as Twisted does).
    ///
    /// # Errors
    /// `BAD_REQUEST`, naming the argument missing or malformed.
    fn from_box(b: &AmpBox) -> Result<Self, Refusal>;
}

/// A control-protocol command: its arguments are `Self`.
pub trait Command: Message {
    /// The `_command` name.
    const NAME: &'static str;
    /// What a successful call answers.
    type Answer: Message;
    /// The error codes it may be refused with (besides those any command may get:
    /// `HELLO_FIRST`, `BAD_REQUEST`, `INTERNAL`, `UNKNOWN`).
    const ERRORS: &'static [ErrorCode];

    /// The request box: the arguments and `_command`.
    fn request(&self) -> AmpBox {
        let mut b = self.to_box();
        b.insert(amp::COMMAND, Self::NAME);
        b
    }
}

/// How one value is written under its key and read back.
pub trait Field: Sized {
    fn put(&self, b: &mut AmpBox, key: &str);
    /// # Errors
    /// `BAD_REQUEST` when the key is missing (for a required value) or malformed.
    fn take(b: &AmpBox, key: &str) -> Result<Self, Refusal>;
}

/// A value written as UTF-8 text.
pub trait Text: Sized {
    fn to_text(&self) -> String;
    /// `key` names the argument in the error sentence.
    fn from_text(s: &str, key: &str) -> Result<Self, String>;
}

fn missing(key: &str) -> Refusal {
    Refusal::bad_request(format!("missing argument `{key}`"))
}

fn malformed(key: &str) -> String {
    format!("bad `{key}`")
}

impl<T: Text> Field for T {
    fn put(&self, b: &mut AmpBox, key: &str) {
        b.insert(key, self.to_text());
    }
    fn take(b: &AmpBox, key: &str) -> Result<T, Refusal> {
        let s = b.get_str(key).ok_or_else(|| missing(key))?;
        T::from_text(s, key).map_err(Refusal::bad_request)
    }
}

/// An optional argument: absent is `None`.
impl<T: Text> Field for Option<T> {
    fn put(&self, b: &mut AmpBox, key: &str) {
        if let Some(v) = self {
            v.put(b, key);
        }
    }
    fn take(b: &AmpBox, key: &str) -> Result<Option<T>, Refusal> {
        match b.get(key) {
            None => Ok(None),
            Some(_) => T::take(b, key).map(Some),
        }
    }
}

/// `candidates`: comma-separated `ip:port`, at most [`super::MAX_CANDIDATES`]; absent
/// reads as none.
impl Field for Vec<SocketAddr> {
    fn put(&self, b: &mut AmpBox, key: &str) {
        b.insert(key, super::format_candidates(self));
    }
    fn take(b: &AmpBox, key: &str) -> Result<Vec<SocketAddr>, Refusal> {
        super::parse_candidates(b.get_str(key).unwrap_or("")).map_err(Refusal::bad_request)
    }
}

/// Raw bytes (`data` of `relay`), not text.
impl Field for Vec<u8> {
    fn put(&self, b: &mut AmpBox, key: &str) {
        b.insert(key, self);
    }
    fn take(b: &AmpBox, key: &str) -> Result<Vec<u8>, Refusal> {
        b.get(key).map(<[u8]>::to_vec).ok_or_else(|| missing(key))
    }
}

impl Text for String {
    fn to_text(&self) -> String {
        self.clone()
    }
    fn from_text(s: &str, _: &str) -> Result<String, String> {
        Ok(s.to_string())
    }
}

impl Text for Q2qAddress {
    fn to_text(&self) -> String {
        self.to_string()
    }
    fn from_text(s: &str, _: &str) -> Result<Q2qAddress, String> {
        Q2qAddress::parse(s).map_err(|e| e.to_string())
    }
}

impl Text for Domain {
    fn to_text(&self) -> String {
        self.to_string()
    }
    fn from_text(s: &str, _: &str) -> Result<Domain, String> {
        Domain::parse(s).map_err(|e| e.to_string())
    }
}

impl Text for ServiceName {
    fn to_text(&self) -> String {
        self.to_string()
    }
    fn from_text(s: &str, _: &str) -> Result<ServiceName, String> {
        ServiceName::parse(s).map_err(|e| e.to_string())
    }
}

impl Text for IpAddr {
    fn to_text(&self) -> String {
        self.to_string()
    }
    fn from_text(s: &str, key: &str) -> Result<IpAddr, String> {
        s.parse().map_err(|_| malformed(key))
    }
}

impl Text for u16 {
    fn to_text(&self) -> String {
        self.to_string()
    }
    fn from_text(s: &str, key: &str) -> Result<u16, String> {
        s.parse().map_err(|_| malformed(key))
    }
}

impl Text for u32 {
    fn to_text(&self) -> String {
        self.to_string()
    }
    fn from_text(s: &str, key: &str) -> Result<u32, String> {
        s.parse().map_err(|_| malformed(key))
    }
}

/// `true` or `false`.
impl Text for bool {
    fn to_text(&self) -> String {
        self.to_string()
    }
    fn from_text(s: &str, key: &str) -> Result<bool, String> {
        s.parse().map_err(|_| malformed(key))
    }
}

/// A session id: exactly 16 hex digits (written lowercase).
impl Text for u64 {
    fn to_text(&self) -> String {
        format!("{self:016x}")
    }
    fn from_text(s: &str, key: &str) -> Result<u64, String> {
        if s.len() != 16 || !s.bytes().all(|c| c.is_ascii_hexdigit()) {
            return Err(malformed(key));
        }
        u64::from_str_radix(s, 16).map_err(|_| malformed(key))
    }
}

/// 16 bytes (`probe_key`, `relay_token`) as 32 hex digits.
impl Text for [u8; 16] {
    fn to_text(&self) -> String {
        hex::encode(self)
    }
    fn from_text(s: &str, key: &str) -> Result<[u8; 16], String> {
        hex::decode(s).ok().and_then(|v| v.try_into().ok()).ok_or_else(|| malformed(key))
    }
}

/// `relay_key`: 32 bytes as 64 hex digits.
impl Text for relay::Key {
    fn to_text(&self) -> String {
        self.to_hex()
    }
    fn from_text(s: &str, key: &str) -> Result<relay::Key, String> {
        relay::Key::from_hex(s).ok_or_else(|| malformed(key))
    }
}

/// Define a [`Message`]: a struct whose fields travel under their own names as keys, each
/// written and read by its type's [`Field`] impl.
macro_rules! amp_message {
    ($(#[$m:meta])* pub struct $name:ident { $($(#[$fm:meta])* pub $field:ident : $ty:ty),* $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone, PartialEq, Eq)]
        pub struct $name { $($(#[$fm])* pub $field: $ty),* }

        impl $crate::proto::commands::Message for $name {
            #[allow(unused_mut)]
            fn to_box(&self) -> $crate::amp::AmpBox {
                let mut b = $crate::amp::AmpBox::new();
                $($crate::proto::commands::Field::put(&self.$field, &mut b, stringify!($field));)*
                b
            }
            #[allow(unused_variables)]
            fn from_box(
                b: &$crate::amp::AmpBox,
            ) -> Result<Self, $crate::proto::commands::Refusal> {
                Ok($name {
                    $($field: $crate::proto::commands::Field::take(b, stringify!($field))?,)*
                })
            }
        }
    };
}

/// Define a [`Command`] on a [`Message`].
macro_rules! amp_command {
    ($name:ident = $wire:expr, answer $answer:ty, errors [$($e:ident),* $(,)?]) => {
        impl $crate::proto::commands::Command for $name {
            const NAME: &'static str = $wire;
            type Answer = $answer;
            const ERRORS: &'static [$crate::proto::commands::ErrorCode] =
                &[$($crate::proto::commands::ErrorCode::$e),*];
        }
    };
}

pub(crate) use {amp_command, amp_message};

amp_message! {
    /// An answer with nothing in it.
    pub struct Empty {}
}

amp_message! {
    /// `hello`: the first call on every connection.
    pub struct Hello {
        /// The protocol version the client speaks ([`super::VERSION`]).
        pub version: String,
    }
}
amp_command!(Hello = command::HELLO, answer HelloAnswer, errors [UnsupportedVersion]);

amp_message! {
    /// What the server says to `hello`.
    pub struct HelloAnswer {
        /// The version both speak now.
        pub version: String,
        /// The server's domain.
        pub domain: Domain,
        /// Its software, like `q2q-server 0.1.0`.
        pub server: String,
    }
}

/// What `identify` asks about: a domain, or an address (meaning its domain).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Subject {
    Address(Q2qAddress),
    Domain(Domain),
}

impl Subject {
    /// The domain asked about.
    pub fn domain(&self) -> &Domain {
        match self {
            Subject::Address(a) => &a.domain,
            Subject::Domain(d) => d,
        }
    }
}

/// An address if it is one, else a domain; the error is the domain's.
impl Text for Subject {
    fn to_text(&self) -> String {
        match self {
            Subject::Address(a) => a.to_string(),
            Subject::Domain(d) => d.to_string(),
        }
    }
    fn from_text(s: &str, _: &str) -> Result<Subject, String> {
        match Q2qAddress::parse(s) {
            Ok(a) => Ok(Subject::Address(a)),
            Err(_) => Domain::parse(s).map(Subject::Domain).map_err(|e| e.to_string()),
        }
    }
}

amp_message! {
    /// `identify`: the domain CA.
    pub struct Identify {
        pub subject: Subject,
    }
}
amp_command!(Identify = command::IDENTIFY, answer Certificate, errors [WrongDomain]);

amp_message! {
    /// `revocations`: the domain's signed revocation list, to anyone after `hello`.
    pub struct Revocations {
        pub domain: Domain,
    }
}
amp_command!(Revocations = command::REVOCATIONS, answer RevocationList, errors [
    WrongDomain, Internal,
]);

amp_message! {
    /// A revocation list: an X.509 v2 CRL, DER, signed by the domain CA (RFC 5280 §5).
    pub struct RevocationList {
        pub list: Vec<u8>,
    }
}

amp_message! {
    /// A certificate, PEM (the answer of `identify`, `sign` and `renew`).
    pub struct Certificate {
        pub certificate: String,
    }
}

amp_message! {
    /// `register`: create an account.
    pub struct Register {
        /// The address, of the server's domain.
        pub address: Q2qAddress,
        pub password: String,
        /// The invite code, when the server takes registrations by invite.
        pub invite: Option<String>,
    }
}
amp_command!(Register = command::REGISTER, answer Empty, errors [
    WrongDomain, AddressTaken, RegistrationClosed, BadInvite, RateLimited,
]);

amp_message! {
    /// `sign`: a certificate for a key, with the account's password.
    pub struct Sign {
        pub address: Q2qAddress,
        pub password: String,
        /// PKCS#10, PEM.
        pub certificate_request: String,
    }
}
amp_command!(Sign = command::SIGN, answer Certificate, errors [
    WrongDomain, WrongPassword, RateLimited,
]);

amp_message! {
    /// `renew`: a fresh validity for the key the connection logged in with.
    pub struct Renew {
        /// The certificate to renew, PEM (default: the login certificate).
        pub certificate: Option<String>,
    }
}
amp_command!(Renew = command::RENEW, answer Certificate, errors [
    NotLoggedIn, BadCertificate, WrongDomain, UnknownUser, RateLimited,
]);

amp_message! {
    /// `who-am-i`: the address the server sees the connection come from.
    pub struct WhoAmI {}
}
amp_command!(WhoAmI = command::WHO_AM_I, answer Seen, errors []);

amp_message! {
    /// `also-seen`: the node shows the server's proof ([`super::whoami::ProofKey`]) that its
    /// UDP socket was seen at `address`, an IP of the other family than its control
    /// connection's. The server then vouches for that IP to the node's peers too
    /// (`peer_seen_also`), so they probe the node's candidates there (a dual-stack node's
    /// IPv6 while it is logged in over IPv4, or the other way round).
    pub struct AlsoSeen {
        pub address: IpAddr,
        pub proof: [u8; 16],
    }
}
amp_command!(AlsoSeen = command::ALSO_SEEN, answer Empty, errors [NotLoggedIn, BadRequest]);

amp_message! {
    /// What the server sees: `host` and `port`.
    pub struct Seen {
        pub host: IpAddr,
        pub port: u16,
    }
}

impl Seen {
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::new(self.host, self.port)
    }
}

impl From<SocketAddr> for Seen {
    fn from(a: SocketAddr) -> Seen {
        Seen { host: a.ip(), port: a.port() }
    }
}

amp_message! {
    /// `ping`: keeps the connection and NAT state alive.
    pub struct Ping {}
}
amp_command!(Ping = command::PING, answer Empty, errors []);

amp_message! {
    /// `listen`: offer a service while the connection lasts.
    pub struct Listen {
        pub service: ServiceName,
        /// Free text; the server keeps 200 characters.
        pub description: Option<String>,
    }
}
amp_command!(Listen = command::LISTEN, answer Empty, errors [NotLoggedIn, BadCertificate]);

amp_message! {
    /// `unlisten`: stop offering a service.
    pub struct Unlisten {
        pub service: ServiceName,
    }
}
amp_command!(Unlisten = command::UNLISTEN, answer Empty, errors [NotLoggedIn, BadCertificate]);

amp_message! {
    /// `inbound`, caller to server: set up a session with `to` for a first stream of
    /// `service`.
    pub struct Inbound {
        /// The callee, of the server's domain.
        pub to: Q2qAddress,
        pub service: ServiceName,
        /// The caller's candidates.
        pub candidates: Vec<SocketAddr>,
    }
}
amp_command!(Inbound = command::INBOUND, answer InboundAnswer, errors [
    NotLoggedIn, BadCertificate, WrongDomain, RateLimited, Offline, NoSuchService,
    NotAuthorized, RelayLimit,
]);

amp_message! {
    /// What one side of a new session is given (in `inbound`, either direction): the
    /// other side's candidates, the session, and this side's own relay leg (see
    /// [`super`]).
    pub struct Grant {
        /// The other side's candidates.
        pub candidates: Vec<SocketAddr>,
        pub session: u64,
        pub probe_key: [u8; 16],
        pub relay_token: relay::Token,
        pub relay_key: relay::Key,
        /// The relay's UDP port.
        pub relay_port: u16,
        /// The relay's IP, when it is not the server asked (the callee is logged in at
        /// another instance of the domain).
        pub relay_host: Option<IpAddr>,
        /// The IP the server sees the other side's control connection come from.
        pub peer_seen: Option<IpAddr>,
        /// The other side's IP of the other family, proven with [`AlsoSeen`].
        pub peer_seen_also: Option<IpAddr>,
    }
}

/// Every key of `from` into `b` (a message whose keys sit in another's box).
fn put_all(b: &mut AmpBox, from: &AmpBox) {
    for (k, v) in from.iter() {
        if let Ok(k) = std::str::from_utf8(k) {
            b.insert(k, v);
        }
    }
}

/// A [`Grant`] inside another message: its keys sit in the same box (the key it is
/// declared under is not used).
impl Field for Grant {
    fn put(&self, b: &mut AmpBox, _: &str) {
        put_all(b, &self.to_box());
    }
    fn take(b: &AmpBox, _: &str) -> Result<Grant, Refusal> {
        Grant::from_box(b)
    }
}

amp_message! {
    /// The server's answer to the caller's `inbound`.
    pub struct InboundAnswer {
        /// The callee.
        pub peer: Q2qAddress,
        pub grant: Grant,
    }
}

amp_message! {
    /// `inbound`, server to callee: `from` asks for `service`; the callee answers its
    /// candidates or refuses (`NOT_AUTHORIZED`, `NO_SUCH_SERVICE`).
    pub struct InboundAsk {
        pub from: Q2qAddress,
        pub service: ServiceName,
        pub grant: Grant,
        /// The serial of the caller's certificate (lowercase hex), for the callee to check
        /// against its copy of the caller's domain's revocation list.
        pub from_serial: Option<String>,
    }
}
amp_command!(InboundAsk = command::INBOUND, answer CandidateList, errors [
    NotAuthorized, NoSuchService,
]);

amp_message! {
    /// A side's candidates (the callee's answer to `inbound` and `candidates`).
    pub struct CandidateList {
        pub candidates: Vec<SocketAddr>,
    }
}

amp_message! {
    /// `candidates`, node to server: fresh candidates for the live session with `to`.
    pub struct Candidates {
        pub to: Q2qAddress,
        pub session: u64,
        pub candidates: Vec<SocketAddr>,
        /// Also the session's relay legs, after logging back in: the ones the server has,
        /// taken by our new connection, or new ones if it forgot them (it restarted). Only
        /// asked of the server that set the session up.
        pub relay: Option<bool>,
    }
}

amp_message! {
    /// A relay leg of a live session, given again (`candidates` with `relay`): the
    /// receiver's own leg, at the server asked, as in [`Grant`].
    pub struct RelayGrant {
        pub relay_token: relay::Token,
        pub relay_key: relay::Key,
        /// The relay's UDP port.
        pub relay_port: u16,
    }
}

/// An optional [`RelayGrant`] inside another message: its keys sit in the same box, and
/// it is there when `relay_token` is.
impl Field for Option<RelayGrant> {
    fn put(&self, b: &mut AmpBox, _: &str) {
        if let Some(g) = self {
            put_all(b, &g.to_box());
        }
    }
    fn take(b: &AmpBox, _: &str) -> Result<Option<RelayGrant>, Refusal> {
        match b.get("relay_token") {
            None => Ok(None),
            Some(_) => RelayGrant::from_box(b).map(Some),
        }
    }
}
amp_command!(Candidates = command::CANDIDATES, answer CandidatesAnswer, errors [
    NotLoggedIn, BadCertificate, WrongDomain, RateLimited, Offline, NotAuthorized, RelayLimit,
]);

amp_message! {
    /// The peer's fresh candidates and where the server sees it.
    pub struct CandidatesAnswer {
        pub candidates: Vec<SocketAddr>,
        pub peer_seen: Option<IpAddr>,
        /// See [`Grant::peer_seen_also`].
        pub peer_seen_also: Option<IpAddr>,
        /// Our relay leg, when asked for (`relay`).
        pub relay: Option<RelayGrant>,
    }
}

amp_message! {
    /// `candidates`, server to peer: `from` has fresh candidates for session `session`.
    pub struct CandidatesAsk {
        pub from: Q2qAddress,
        pub session: u64,
        pub candidates: Vec<SocketAddr>,
        /// The IP the server sees `from`'s connection come from.
        pub peer_seen: Option<IpAddr>,
        /// See [`Grant::peer_seen_also`].
        pub peer_seen_also: Option<IpAddr>,
        /// The receiver's relay leg, when `from` asked for the legs again.
        pub relay: Option<RelayGrant>,
    }
}
amp_command!(CandidatesAsk = command::CANDIDATES, answer CandidateList, errors [NotAuthorized]);

amp_message! {
    /// `inbound`, instance to instance of one domain (PostgreSQL, [`crate::server`]'s
    /// cluster): `from`, logged in at the asking instance, asks `to`, logged in at the
    /// asked one.
    pub struct RemoteInbound {
        pub from: Q2qAddress,
        pub to: Q2qAddress,
        pub service: ServiceName,
        pub candidates: Vec<SocketAddr>,
        /// The IP the asking instance sees `from`'s connection come from.
        pub peer_seen: IpAddr,
        /// See [`Grant::peer_seen_also`].
        pub peer_seen_also: Option<IpAddr>,
        /// The serial of `from`'s certificate, passed on to the callee (see [`InboundAsk`]).
        pub from_serial: Option<String>,
    }
}
amp_command!(RemoteInbound = command::INBOUND, answer InboundAnswer, errors [
    WrongDomain, Offline, NoSuchService, NotAuthorized, RelayLimit,
]);

amp_message! {
    /// `candidates`, instance to instance of one domain: as [`RemoteInbound`].
    pub struct RemoteCandidates {
        pub from: Q2qAddress,
        pub to: Q2qAddress,
        pub session: u64,
        pub candidates: Vec<SocketAddr>,
        pub peer_seen: IpAddr,
        pub peer_seen_also: Option<IpAddr>,
    }
}
amp_command!(RemoteCandidates = command::CANDIDATES, answer CandidatesAnswer, errors [
    WrongDomain, Offline, NotAuthorized,
]);

amp_message! {
    /// `relay`: one relayed datagram over the control connection, either direction;
    /// sent without `_ask` (no answer). Empty `data` binds the leg.
    pub struct Relay {
        pub token: relay::Token,
        pub data: Vec<u8>,
    }
}
amp_command!(Relay = command::RELAY, answer Empty, errors []);

amp_message! {
    /// `exists`: whether an address of the server's domain is registered.
    pub struct Exists {
        pub address: Q2qAddress,
    }
}
amp_command!(Exists = command::EXISTS, answer ExistsAnswer, errors [
    NotLoggedIn, BadCertificate, WrongDomain, RateLimited,
]);

amp_message! {
    pub struct ExistsAnswer {
        pub exists: bool,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Through the wire: encode (as a request, answer or error box, with its tag), decode.
    fn wire(b: &AmpBox) -> AmpBox {
        let bytes = b.encode().expect("encodes");
        let (d, used) = AmpBox::decode(&bytes).expect("decodes").expect("complete");
        assert_eq!(used, bytes.len());
        d
    }

    /// `cmd` as a request and `answer` as an answer survive the wire, and so does every
    /// error box the command may send.
    fn round_trip<C: Command + PartialEq + std::fmt::Debug>(
        cmd: &C,
        answer: &C::Answer,
        description: &str,
    ) -> Result<(), TestCaseError>
    where
        C::Answer: PartialEq + std::fmt::Debug,
    {
        let mut req = cmd.request();
        req.insert(amp::ASK, "1");
        let got = wire(&req);
        prop_assert_eq!(got.get_str(amp::COMMAND), Some(C::NAME));
        prop_assert_eq!(&C::from_box(&got).map_err(|e| TestCaseError::fail(e.to_string()))?, cmd);
        let mut ans = answer.to_box();
        ans.insert(amp::ANSWER, "1");
        let got =
            C::Answer::from_box(&wire(&ans)).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(&got, answer);
        let common = [ErrorCode::HelloFirst, ErrorCode::BadRequest, ErrorCode::Internal];
        for code in C::ERRORS.iter().chain(&common) {
            let sent = Refusal::new(code.clone(), description);
            let b = amp::ErrorBox::from(sent.clone()).to_box(b"1");
            let back = amp::ErrorBox::from_box(&wire(&b)).expect("an error box");
            prop_assert_eq!(Refusal::from(back), sent);
        }
        Ok(())
    }

    fn address() -> impl Strategy<Value = Q2qAddress> {
        ("[a-z][a-z0-9._-]{0,20}", "[a-z][a-z0-9-]{0,10}(\\.[a-z][a-z0-9-]{0,10}){1,3}")
            .prop_filter_map("valid address", |(u, d)| Q2qAddress::parse(&format!("{u}@{d}")).ok())
    }

    fn domain() -> impl Strategy<Value = Domain> {
        address().prop_map(|a| a.domain)
    }

    fn service() -> impl Strategy<Value = ServiceName> {
        prop_oneof![
            Just("echo".to_string()),
            Just("ping".to_string()),
            (1u16..).prop_map(|p| format!("tcp/{p}")),
            "[a-z][a-z0-9-]{0,20}",
        ]
        .prop_filter_map("valid service", |s| ServiceName::parse(&s).ok())
    }

    fn ip() -> impl Strategy<Value = IpAddr> {
        prop_oneof![
            any::<[u8; 4]>().prop_map(IpAddr::from),
            any::<[u8; 16]>().prop_map(IpAddr::from),
        ]
    }

    fn candidates() -> impl Strategy<Value = Vec<SocketAddr>> {
        proptest::collection::vec(
            (ip(), any::<u16>()).prop_map(|(i, p)| SocketAddr::new(i, p)),
            0..=crate::proto::MAX_CANDIDATES,
        )
    }

    /// Text of any kind, as people and other programs send it (not only ASCII).
    fn text() -> impl Strategy<Value = String> {
        proptest::collection::vec(any::<char>(), 0..200).prop_map(String::from_iter)
    }

    fn key_bytes16(x: u64) -> [u8; 16] {
        let mut k = [0u8; 16];
        k[..8].copy_from_slice(&x.to_be_bytes());
        k
    }

    fn grant() -> impl Strategy<Value = Grant> {
        (
            candidates(),
            any::<u64>(),
            any::<[u8; 16]>(),
            any::<[u8; 16]>(),
            any::<[u8; 32]>(),
            any::<u16>(),
            proptest::option::of(ip()),
            (proptest::option::of(ip()), proptest::option::of(ip())),
        )
            .prop_map(
                |(candidates, session, probe_key, token, key, port, seen, (host, also))| Grant {
                    candidates,
                    session,
                    probe_key,
                    relay_token: token,
                    relay_key: relay::Key::from_bytes(&key),
                    relay_port: port,
                    relay_host: host,
                    peer_seen: seen,
                    peer_seen_also: also,
                },
            )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Every command of the control protocol, its arguments, its answer and its
        /// error boxes, through the AMP box encoding and back.
        #[test]
        fn every_command_round_trips_through_amp(
            a in address(), b in address(), d in domain(), s in service(),
            t1 in text(), t2 in text(), t3 in proptest::option::of(text()),
            c1 in candidates(), c2 in candidates(), g in grant(),
            ip1 in ip(), seen in proptest::option::of(ip()), port in any::<u16>(),
            session in any::<u64>(), token in any::<[u8; 16]>(),
            data in proptest::collection::vec(any::<u8>(), 0..2000),
            yes in any::<bool>(), as_address in any::<bool>(),
        ) {
            let pem = Certificate { certificate: t1.clone() };
            round_trip(&Hello { version: t1.clone() },
                &HelloAnswer { version: t2.clone(), domain: d.clone(), server: t1.clone() }, &t2)?;
            let subject = if as_address { Subject::Address(a.clone()) } else { Subject::Domain(d.clone()) };
            round_trip(&Identify { subject }, &pem, &t1)?;
            round_trip(&Register { address: a.clone(), password: t1.clone(), invite: t3.clone() },
                &Empty {}, &t2)?;
            round_trip(&Sign { address: a.clone(), password: t2.clone(), certificate_request: t1.clone() },
                &pem, &t1)?;
            round_trip(&Renew { certificate: t3.clone() }, &pem, &t1)?;
            round_trip(&WhoAmI {}, &Seen { host: ip1, port }, &t1)?;
            round_trip(&Ping {}, &Empty {}, &t1)?;
            round_trip(&Listen { service: s.clone(), description: t3.clone() }, &Empty {}, &t1)?;
            round_trip(&Unlisten { service: s.clone() }, &Empty {}, &t1)?;
            round_trip(&Inbound { to: a.clone(), service: s.clone(), candidates: c1.clone() },
                &InboundAnswer { peer: a.clone(), grant: g.clone() }, &t1)?;
            round_trip(&InboundAsk { from: b.clone(), service: s.clone(), grant: g.clone(),
                from_serial: t3.clone() },
                &CandidateList { candidates: c2.clone() }, &t2)?;
            round_trip(&Revocations { domain: d.clone() },
                &RevocationList { list: data.clone() }, &t1)?;
            let rg = yes.then(|| RelayGrant {
                relay_token: g.relay_token, relay_key: g.relay_key.clone(), relay_port: g.relay_port });
            round_trip(&Candidates { to: a.clone(), session, candidates: c1.clone(), relay: yes.then_some(as_address) },
                &CandidatesAnswer { candidates: c2.clone(), peer_seen: seen, peer_seen_also: seen, relay: rg.clone() }, &t1)?;
            round_trip(&CandidatesAsk { from: b.clone(), session, candidates: c1.clone(), peer_seen: seen, peer_seen_also: seen, relay: rg },
                &CandidateList { candidates: c2 }, &t1)?;
            round_trip(&RemoteInbound { from: b.clone(), to: a.clone(), service: s.clone(),
                candidates: c1.clone(), peer_seen: ip1, peer_seen_also: seen, from_serial: t3.clone() },
                &InboundAnswer { peer: a.clone(), grant: g.clone() }, &t1)?;
            round_trip(&RemoteCandidates { from: b.clone(), to: a.clone(), session,
                candidates: c1.clone(), peer_seen: ip1, peer_seen_also: None },
                &CandidatesAnswer { candidates: c1.clone(), peer_seen: seen, peer_seen_also: seen, relay: None }, &t1)?;
            round_trip(&Relay { token, data }, &Empty {}, &t1)?;
            round_trip(&Exists { address: b }, &ExistsAnswer { exists: yes }, &t1)?;
            round_trip(&AlsoSeen { address: ip1, proof: key_bytes16(session) }, &Empty {}, &t1)?;
        }

        /// Decoding any box as any command never panics.
        #[test]
        fn decoding_arbitrary_boxes_never_panics(
            pairs in proptest::collection::btree_map(
                prop_oneof![
                    Just("to".to_string()), Just("session".to_string()),
                    Just("candidates".to_string()), Just("relay_key".to_string()),
                    Just("probe_key".to_string()), Just("peer_seen".to_string()),
                    Just("peer_seen_also".to_string()), Just("proof".to_string()),
                    Just("address".to_string()), Just("subject".to_string()),
                    "[a-z_]{1,12}",
                ],
                proptest::collection::vec(any::<u8>(), 0..80), 0..12)
        ) {
            let mut b = AmpBox::new();
            for (k, v) in &pairs { b.insert(k, v); }
            decode_all(&b);
        }
    }

    /// Decode `b` as every message of the protocol.
    pub(crate) fn decode_all(b: &AmpBox) {
        let _ = Hello::from_box(b);
        let _ = HelloAnswer::from_box(b);
        let _ = Identify::from_box(b);
        let _ = Certificate::from_box(b);
        let _ = Register::from_box(b);
        let _ = Sign::from_box(b);
        let _ = Renew::from_box(b);
        let _ = Seen::from_box(b);
        let _ = Listen::from_box(b);
        let _ = Unlisten::from_box(b);
        let _ = Inbound::from_box(b);
        let _ = InboundAnswer::from_box(b);
        let _ = InboundAsk::from_box(b);
        let _ = Revocations::from_box(b);
        let _ = RevocationList::from_box(b);
        let _ = CandidateList::from_box(b);
        let _ = Candidates::from_box(b);
        let _ = CandidatesAnswer::from_box(b);
        let _ = CandidatesAsk::from_box(b);
        let _ = RemoteInbound::from_box(b);
        let _ = RemoteCandidates::from_box(b);
        let _ = AlsoSeen::from_box(b);
        let _ = Relay::from_box(b);
        let _ = Exists::from_box(b);
        let _ = ExistsAnswer::from_box(b);
    }

    /// The bytes of a request are those the string-typed code wrote (Twisted peers and
    /// older builds read them).
    #[test]
    fn requests_are_the_bytes_they_were() {
        let to = Q2qAddress::parse("alice@example.com").unwrap();
        let typed = Inbound {
            to: to.clone(),
            service: ServiceName::parse("tcp/22").unwrap(),
            candidates: vec!["127.0.0.1:9".parse().unwrap(), "[fd00::1]:4000".parse().unwrap()],
        }
        .request();
        let by_hand = AmpBox::command("inbound")
            .with("to", "alice@example.com")
            .with("service", "tcp/22")
            .with("candidates", "127.0.0.1:9,[fd00::1]:4000");
        assert_eq!(typed.encode().unwrap(), by_hand.encode().unwrap());

        let g = Grant {
            candidates: vec![],
            session: 0xab,
            probe_key: [1; 16],
            relay_token: [2; 16],
            relay_key: relay::Key::from_bytes(&[3; 32]),
            relay_port: 8788,
            relay_host: None,
            peer_seen: Some("127.0.0.1".parse().unwrap()),
            peer_seen_also: None,
        };
        let typed = InboundAnswer { peer: to, grant: g }.to_box();
        let by_hand = AmpBox::new()
            .with("peer", "alice@example.com")
            .with("candidates", "")
            .with("session", "00000000000000ab")
            .with("probe_key", "01".repeat(16))
            .with("relay_token", "02".repeat(16))
            .with("relay_key", "03".repeat(32))
            .with("relay_port", "8788")
            .with("peer_seen", "127.0.0.1");
        assert_eq!(typed.encode().unwrap(), by_hand.encode().unwrap());
        assert_eq!(ExistsAnswer { exists: true }.to_box(), AmpBox::new().with("exists", "true"));
    }

    #[test]
    fn malformed_arguments_are_bad_requests_naming_them() {
        let e = Exists::from_box(&AmpBox::new()).unwrap_err();
        assert_eq!(
            (e.code, e.description.as_str()),
            (ErrorCode::BadRequest, "missing argument `address`")
        );
        let b = AmpBox::new().with("to", "a@b.example").with("session", "12");
        assert_eq!(Candidates::from_box(&b).unwrap_err().description, "bad `session`");
        let b = b.with("session", "+000000000000001");
        assert_eq!(Candidates::from_box(&b).unwrap_err().description, "bad `session`");
        let b =
            AmpBox::new().with("to", "a@b.example").with("service", "echo").with("candidates", "x");
        assert_eq!(Inbound::from_box(&b).unwrap_err().code, ErrorCode::BadRequest);
        assert_eq!(ErrorCode::parse("NEW_CODE"), ErrorCode::Other("NEW_CODE".into()));
        for (c, s) in CODES {
            assert_eq!((c.as_str(), &ErrorCode::parse(s)), (*s, c));
        }
    }
}
