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

/// Pause after a failed accept (such as running out of file descriptors), so an accept loop
/// does not spin.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(50);

/// The next connection on `listener`, or `None` once `stop` is cancelled. Accept errors are
/// logged (naming `what`) and followed by a short pause.
pub async fn accept(
    listener: &TcpListener,
    stop: &tokio_util::sync::CancellationToken,
    what: &str,
) -> Option<(TcpStream, std::net::SocketAddr)> {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return None,
            r = listener.accept() => match r {
                Ok(pair) => return Some(pair),
                Err(e) => {
                    tracing::warn!(error = %e, "{what}: accept failed");
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                }
            },
        }
    }
}

/// Unsent bytes a tunnel socket may hold in the kernel (`TCP_NOTSENT_LOWAT`): enough to keep
/// the link busy between two writes, and short enough that a PING answer, a WINDOW_UPDATE or
/// a new session's HEADERS do not wait behind megabytes of bulk data. Measured in
/// docs/DECISIONS.md ("Short send queues").
pub const TUNNEL_NOTSENT_LOWAT: u32 = 16 * 1024;

/// Socket options of a tunnel connection: no Nagle delay, and a short unsent queue
/// ([`TUNNEL_NOTSENT_LOWAT`]). Best effort: a failure costs latency, not correctness.
pub fn tune_tunnel(stream: &TcpStream) {
    let _ = stream.set_nodelay(true);
    let _ = socket2::SockRef::from(stream).set_tcp_notsent_lowat(TUNNEL_NOTSENT_LOWAT);
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
