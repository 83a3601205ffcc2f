//! # q2q-netstack: the sans-IO network core of q2q
//!
//! No sockets, no clock reads, no tokio: callers pass `now` and bytes in, and take bytes to
//! send and the next deadline out. The tokio drivers in the `q2q` crate own the I/O.
//!
//! ## Wire: one UDP socket, many datagram kinds
//! Every datagram on a q2q UDP socket starts with the same two bytes, `version` and `kind`
//! (see [`wire`]), so PTCP data, who-am-i, probes and relay traffic can share one socket
//! (and so one NAT mapping) and still be told apart without ambiguity.
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod wire;
