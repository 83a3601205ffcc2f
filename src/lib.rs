//! q2q: networking addressed to people.
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod address;
pub mod amp;
pub mod cli;
pub mod client;
pub mod daemon;
pub mod dns;
pub mod fsutil;
pub mod identity;
pub mod presence;
pub mod proto;
pub mod ptcp;
pub mod server;
pub mod tls;
pub mod transfer;
