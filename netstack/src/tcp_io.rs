//! Reading and writing a smoltcp TCP socket with the contract both of this crate's stacks
//! (PTCP [`crate::session`] and TUN termination [`crate::tun`]) offer: `Ok(0)` from `send`
//! while the handshake is still under way, `Blocked` from `recv` when nothing has arrived
//! yet, and a reset reported as such.

use smoltcp::socket::tcp;

/// Why a read or write did not move bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum IoError {
    /// Nothing to read now.
    Blocked,
    /// The sending half is closed.
    Closed,
    /// The other end reset the connection.
    Reset,
}

/// Queue `data`; `want_write` is set when more could not be taken (the caller then reports
/// writability), and `handshaking` are the states in which the socket cannot take data yet.
pub(crate) fn send(
    sock: &mut tcp::Socket<'_>,
    data: &[u8],
    reset: bool,
    handshaking: &[tcp::State],
    want_write: &mut bool,
) -> Result<usize, IoError> {
    if reset {
        return Err(IoError::Reset);
    }
    match sock.send_slice(data) {
        Ok(n) => {
            if n < data.len() {
                *want_write = true;
            }
            Ok(n)
        }
        Err(tcp::SendError::InvalidState) if handshaking.contains(&sock.state()) => {
            *want_write = true;
            Ok(0)
        }
        Err(tcp::SendError::InvalidState) => Err(IoError::Closed),
    }
}

/// Read into `buf`: `Ok(0)` at the end of the stream, `Blocked` (and `want_read` set) when
/// nothing has arrived yet.
pub(crate) fn recv(
    sock: &mut tcp::Socket<'_>,
    buf: &mut [u8],
    reset: bool,
    handshaking: &[tcp::State],
    want_read: &mut bool,
) -> Result<usize, IoError> {
    let r = sock.recv_slice(buf);
    recv_result(sock, r, !buf.is_empty(), reset, handshaking, want_read)
}

/// [`recv`] without a buffer of the caller's: `f` is given at most `max` received bytes
/// straight from the socket's buffer (one contiguous piece; call again for more).
pub(crate) fn recv_with(
    sock: &mut tcp::Socket<'_>,
    max: usize,
    f: &mut dyn FnMut(&[u8]),
    reset: bool,
    handshaking: &[tcp::State],
    want_read: &mut bool,
) -> Result<usize, IoError> {
    let r = sock.recv(|data| {
        let n = data.len().min(max);
        f(&data[..n]);
        (n, n)
    });
    recv_result(sock, r, max > 0, reset, handshaking, want_read)
}

fn recv_result(
    sock: &tcp::Socket<'_>,
    r: Result<usize, tcp::RecvError>,
    wanted: bool,
    reset: bool,
    handshaking: &[tcp::State],
    want_read: &mut bool,
) -> Result<usize, IoError> {
    match r {
        Ok(0) if wanted => {
            *want_read = true;
            Err(IoError::Blocked)
        }
        Ok(n) => Ok(n),
        Err(tcp::RecvError::Finished) => Ok(0),
        Err(tcp::RecvError::InvalidState) if reset => Err(IoError::Reset),
        Err(tcp::RecvError::InvalidState) if handshaking.contains(&sock.state()) => {
            *want_read = true;
            Err(IoError::Blocked)
        }
        Err(tcp::RecvError::InvalidState) => Ok(0),
    }
}
