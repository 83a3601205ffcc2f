//! The `*.q2q` resolver shim: `ssh alice.q2q` resolves to a virtual IP the netstack answers.
//!
//! ```text
//!  system resolver ──(~q2q only)──▶ server (UDP+TCP, tokio; sockets and clock)
//!                                      │ query bytes, now
//!                                      ▼
//!                                    shim (sans-IO) ──▶ names: alice.example.com.q2q → alice@example.com
//!                                      │            ──▶ Exists: is alice registered? (the daemon asks)
//!                                      ▼
//!                                    pool: alice@example.com ↔ 100.64.0.2 + fd71:7132::2
//! ```
//!
//! * [`names`]: which DNS names are ours and whom they name.
//! * [`pool`]: the virtual address pool; stable mappings, LRU reclaim of long-idle ones,
//!   reverse lookup, saved as TOML.
//! * [`shim`]: [`shim::Shim::answer`] turns query bytes into response bytes given `now`; it
//!   does no I/O and reads no clock.
//! * [`framing`]: the 2-byte length prefix of DNS over TCP.
//! * [`server`]: the tokio driver owning the sockets, with limits on sizes and connections.
//!
//! Short TTLs (5 s) with long-lived mappings: a cached answer never outlives its meaning,
//! and an address keeps meaning the same person for at least a day of idleness.

pub mod framing;
pub mod names;
pub mod pool;
pub mod server;
pub mod shim;

pub use names::{Names, Parsed};
pub use pool::{Mapping, Pool, PoolConfig, PoolError};
pub use server::{Lookup, NoLookup, Server, ServerConfig, SharedShim};
pub use shim::{Existence, Exists, Pending, Shim, ShimConfig, Step};
