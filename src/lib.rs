//! # q2q: networking addressed to people
//!
//! A person has an address, `alice@example.com`, and a certificate for it from the identity
//! server of `example.com`. Anyone reaches her by that name; both ends are authenticated, and
//! the path is direct through both NATs when a hole can be punched, relayed otherwise.
//!
//! ```text
//!  q2q-tun (bin) ─ daemon/ ─┬─ presence/ Node: listen(service) / connect(address, service)
//!                           │     │ control: client/ ── AMP (amp/, proto/) over TLS 1.3 (tls.rs)
//!                           │     │            ──▶ server/ (q2q-server): identity, presence,
//!                           │     │                relay, federation; SQLite, domain CA
//!                           │     │ data: ptcp/ Endpoint (one dual-stack UDP socket, one owner)
//!                           │     │        └─ q2q-netstack sessions (smoltcp TCP over selective
//!                           │     │           repeat) ── streams ── TLS between identities
//!                           ├─ transfer/  send / receive over a `file` stream
//!                           └─ services.toml: what is exposed, to whom (default deny)
//!  identity/: CA, certificates, verification  ·  address.rs: parsed names  ·  dns/: *.q2q
//!  relay.rs: relay framing (leg tokens, keys, tags), shared by server/ and presence/
//!  dualstack.rs: `[::]` sockets for both families, v4-mapped addresses made plain at the edge
//! ```
//!
//! ## One session per pair of people
//!
//! `Node::connect(bob, service)` asks the session table (`presence/table.rs`, one owner
//! task) for the peer session with bob. The first caller sets it up through bob's server
//! (`inbound`: consent, candidates, relay legs, punching); any number of concurrent callers
//! wait for that one set-up. Every stream after that, to any service and in either
//! direction, is a new smoltcp connection inside the same PTCP session, whose datagrams are
//! sealed with keys from one TLS 1.3 handshake between the two certificates (on the
//! session's first stream); each stream starts with the session's token and a header
//! naming the service, and the callee answers its verdict (`presence/session.rs`). A session without streams closes on both sides after a while;
//! a node going offline tells its peers. Strangers (named for none of our services) get
//! relay-only sessions.
//!
//! Protocol cores take `now` and bytes (q2q-netstack, the AMP codec, the rate limiter, the
//! DNS answerer); the tokio tasks here own sockets and timers, one task per state machine,
//! reached through bounded channels.
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod address;
pub mod amp;
pub mod cli;
pub mod client;
pub mod daemon;
pub mod dns;
pub mod dualstack;
pub mod fsutil;
pub mod identity;
pub(crate) mod pipe;
pub mod presence;
pub mod proto;
pub mod ptcp;
pub mod relay;
pub mod server;
pub mod sys;
pub mod tls;
pub mod transfer;
