//! Socket helpers: listeners that rebind at once, and resets.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::{TcpListener, TcpSocket, TcpStream};

/// Accept backlog for every listener.
const BACKLOG: u32 = 1024;

/// Binds a listener with `SO_REUSEADDR`, so a port closed a moment ago (sockets in TIME_WAIT)
/// can be bound again at once. `SO_REUSEPORT` is not set: a second bind still fails.
pub fn bind_reuse(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(BACKLOG)
}

/// Makes the next close of this socket send a TCP RST instead of a FIN.
pub fn set_reset_on_close(stream: &TcpStream) {
    // Best effort: the socket may already be gone.
    let _ = socket2::SockRef::from(stream).set_linger(Some(Duration::ZERO));
}

/// Closes the write direction (sends FIN) and keeps the read direction open.
pub fn shutdown_write(stream: &TcpStream) -> io::Result<()> {
    socket2::SockRef::from(stream).shutdown(std::net::Shutdown::Write)
}
