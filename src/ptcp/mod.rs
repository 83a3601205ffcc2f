//! PTCP: the tokio driver of the q2q-netstack sessions, the stream type, and TLS on streams.

mod endpoint;
mod stream;
mod sys;
pub mod tls;

pub use endpoint::{
    Endpoint, EndpointConfig, EndpointError, EndpointStats, Path, PtcpSession, SideDatagram,
};
pub use q2q_netstack::wire::SessionId;
pub use q2q_netstack::{Config, SessionError, Side};
pub use stream::{PtcpStream, StreamFailure};
