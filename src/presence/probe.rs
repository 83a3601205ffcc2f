//! Hole-punching probes: their wire format and keys live beside the path machine that sends
//! them ([`q2q_netstack::path::probe`]).

pub use q2q_netstack::path::probe::{LEN, Probe, ProbeKey, Role};
