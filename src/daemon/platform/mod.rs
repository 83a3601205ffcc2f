//! Everything the daemon asks of Linux itself, in one place: the TUN device and the
//! capabilities it needs ([`device`]), the system resolver ([`resolver`]), what /proc says
//! about this process ([`proc`]) and running system programs with a time limit
//! ([`command`]). The rest of `daemon/` is portable tokio code on top of these.

pub mod command;
pub mod device;
pub mod proc;
pub mod resolver;
