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

pub mod whoami;

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
}
