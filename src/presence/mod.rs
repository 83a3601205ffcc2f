//! The client side of presence: candidates, authenticated hole-punching probes, and (with
//! the PTCP driver) connecting to and listening as an address.

pub mod candidates;
pub mod node;
pub mod portmap;
pub mod probe;
pub mod session;
pub mod table;
