//! Socket helpers: listeners that rebind at once, and resets.

use std::io::{self, IoSlice};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

use crate::keepalive::Activity;

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

/// Encrypted bytes a tunnel connection's TLS layer may hold that the socket has not taken
/// (rustls' default is 64 KiB): with [`TUNNEL_NOTSENT_LOWAT`], what a new frame can find queued
/// ahead of it below HTTP/2. One full DATA frame with its header and record overhead, so that a
/// frame written to an empty buffer is never cut in two (docs/DECISIONS.md, "Short send
/// queues").
pub const TUNNEL_TLS_SEND_BUFFER: usize = 17 * 1024;

/// Bytes a tunnel socket reads ahead while a write waits for room ([`TunnelSocket`]).
pub const TUNNEL_READ_AHEAD: usize = 512 * 1024;

/// Socket options of a tunnel connection: no Nagle delay, and a short unsent queue
/// ([`TUNNEL_NOTSENT_LOWAT`]). Best effort: a failure costs latency, not correctness.
pub fn tune_tunnel(stream: &TcpStream) {
    let _ = stream.set_nodelay(true);
    let _ = socket2::SockRef::from(stream).set_tcp_notsent_lowat(TUNNEL_NOTSENT_LOWAT);
}

/// The socket of a tunnel connection (tuned by [`tune_tunnel`]), for two things HTTP/2 needs
/// below it on a slow link:
///
/// - Writes end the kernel's packet buffer (`MSG_EOR`). Without that, the kernel appends a write
///   to its last unsent buffer, up to 64 KiB, before it looks at [`TUNNEL_NOTSENT_LOWAT`], so
///   the unsent queue reached the mark plus 64 KiB (`ss -ti`: 65,160 bytes unsent with a 4 KiB
///   mark), and everything a new session sent waited behind it.
/// - While a write waits for room, the socket keeps reading, up to [`TUNNEL_READ_AHEAD`], and
///   hands those bytes to the next reads. An h2 connection with a control frame to write (a
///   PING answer) reads nothing until the write goes out; on a link saturated both ways, both
///   ends could wait for the other to read, for ever (libp2p/rust-yamux#227 has the same
///   shape). Reading ahead lets the peer's write, and so its reads, go on.
///
/// It also feeds the keepalive's proof of life ([`Activity`]): the time of the last read that
/// returned bytes, and the socket itself, whose acknowledged bytes the keepalive reads
/// ([`bytes_acked`]).
///
/// See docs/DECISIONS.md, "Short send queues" and "Liveness".
#[derive(Debug)]
pub struct TunnelSocket {
    /// Shared only with [`Activity`], which holds it weakly: the socket closes with this.
    tcp: Arc<TcpStream>,
    /// When bytes were last read, direct or ahead, and the socket's acknowledged bytes.
    activity: Activity,
    /// Bytes read while a write waited, handed out before the socket is read again.
    ahead: BytesMut,
    /// The end of the stream or a read error met while reading ahead, reported after `ahead`.
    ended: Option<io::Result<()>>,
}

impl TunnelSocket {
    /// Tunes `stream` ([`tune_tunnel`]) and wraps it.
    pub fn new(stream: TcpStream) -> Self {
        tune_tunnel(&stream);
        let tcp = Arc::new(stream);
        Self {
            activity: Activity::of(&tcp),
            tcp,
            ahead: BytesMut::new(),
            ended: None,
        }
    }

    /// The TCP stream underneath.
    pub fn get_ref(&self) -> &TcpStream {
        &self.tcp
    }

    /// The peer's signs of life on this socket, for [`crate::keepalive::run`].
    pub fn activity(&self) -> Activity {
        self.activity.clone()
    }

    /// Reads what the socket has, up to [`TUNNEL_READ_AHEAD`] held; registers `cx` to be woken
    /// when more arrives.
    fn read_ahead(&mut self, cx: &mut Context<'_>) {
        while self.ended.is_none() && self.ahead.len() < TUNNEL_READ_AHEAD {
            match self.tcp.poll_read_ready(cx) {
                Poll::Pending => return,
                Poll::Ready(Err(e)) => self.ended = Some(Err(e)),
                Poll::Ready(Ok(())) => {
                    self.ahead.reserve(16 * 1024);
                    match self.tcp.try_read_buf(&mut self.ahead) {
                        Ok(0) => self.ended = Some(Ok(())),
                        Ok(_) => self.activity.touch(),
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        Err(e) => self.ended = Some(Err(e)),
                    }
                }
            }
        }
    }

    fn poll_send(&mut self, cx: &mut Context<'_>, bufs: &[IoSlice<'_>]) -> Poll<io::Result<usize>> {
        loop {
            match self.tcp.poll_write_ready(cx) {
                Poll::Pending => {
                    self.read_ahead(cx);
                    return Poll::Pending;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) => {}
            }
            let sent = self.tcp.try_io(Interest::WRITABLE, || {
                socket2::SockRef::from(&self.tcp).send_vectored_with_flags(bufs, libc::MSG_EOR)
            });
            match sent {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Ok(n) => {
                    self.activity.wrote(n);
                    return Poll::Ready(Ok(n));
                }
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl AsyncRead for TunnelSocket {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.ahead.is_empty() {
            let n = buf.remaining().min(this.ahead.len());
            buf.put_slice(&this.ahead[..n]);
            this.ahead.advance(n);
            if this.ahead.is_empty() {
                // Held only while a write waits: let the block go.
                this.ahead = BytesMut::new();
            }
            return Poll::Ready(Ok(()));
        }
        if let Some(ended) = this.ended.take() {
            return Poll::Ready(ended);
        }
        loop {
            std::task::ready!(this.tcp.poll_read_ready(cx))?;
            let before = buf.filled().len();
            match this.tcp.try_read_buf(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
                Ok(_) => {
                    if buf.filled().len() > before {
                        this.activity.touch();
                    }
                    return Poll::Ready(Ok(()));
                }
            }
        }
    }
}

impl AsyncWrite for TunnelSocket {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().poll_send(cx, &[IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().poll_send(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(shutdown_write(&self.tcp))
    }
}

/// Bytes of ours that the peer acknowledged on `tcp` (`tcpi_bytes_acked` of `TCP_INFO`), or
/// `None` where the kernel does not say (not Linux, before 4.2). The keepalive counts their
/// growth as a sign of life: the peer's kernel took our data (docs/DECISIONS.md, "Liveness").
///
/// The one `unsafe` of the project: no maintained crate reads `TCP_INFO` without bindgen.
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
pub fn bytes_acked(tcp: &TcpStream) -> Option<u64> {
    use std::mem::{MaybeUninit, offset_of, size_of};
    use std::os::fd::AsRawFd;
    let mut info = MaybeUninit::<libc::tcp_info>::zeroed();
    let mut len = libc::socklen_t::try_from(size_of::<libc::tcp_info>()).ok()?;
    // SAFETY: `info` is `len` writable bytes and `len` a valid `socklen_t`; the kernel writes at
    // most `len` bytes of `struct tcp_info` and the length it wrote. The descriptor belongs to
    // `tcp`, borrowed for the call.
    let rc = unsafe {
        libc::getsockopt(
            tcp.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            info.as_mut_ptr().cast(),
            &mut len,
        )
    };
    let written = usize::try_from(len).ok()?;
    if rc != 0 || written < offset_of!(libc::tcp_info, tcpi_bytes_received) {
        return None;
    }
    // SAFETY: zeroed, then partly written by the kernel; every field is an integer, valid for
    // any bytes.
    Some(unsafe { info.assume_init() }.tcpi_bytes_acked)
}

/// Bytes of ours that the peer acknowledged: not known on this system.
#[cfg(not(target_os = "linux"))]
pub fn bytes_acked(_: &TcpStream) -> Option<u64> {
    None
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

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A tunnel socket and its peer, a plain TCP stream, on loopback with small kernel buffers.
    async fn pair() -> (TunnelSocket, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let socket = TcpSocket::new_v4().expect("socket");
        socket.set_send_buffer_size(16 * 1024).expect("sndbuf");
        socket.set_recv_buffer_size(16 * 1024).expect("rcvbuf");
        let (a, b) = tokio::join!(
            socket.connect(listener.local_addr().expect("addr")),
            async { listener.accept().await.expect("accept").0 }
        );
        let a = a.expect("connect");
        for s in [&a, &b] {
            let s = socket2::SockRef::from(s);
            s.set_send_buffer_size(16 * 1024).expect("sndbuf");
            s.set_recv_buffer_size(16 * 1024).expect("rcvbuf");
        }
        (TunnelSocket::new(a), b)
    }

    /// Each end writes 256 KiB before it reads anything: more than the kernel's buffers hold
    /// both ways, so plain sockets would wait for each other for ever (as two h2 connections
    /// with a PING answer to write do). Reading ahead while a write waits lets both finish, with
    /// every byte in order.
    #[tokio::test]
    async fn ends_that_write_before_they_read_do_not_wait_for_each_other() {
        const LEN: usize = 256 * 1024;
        let (a, b) = pair().await;
        let b = TunnelSocket::new(b);
        let exchange = |mut s: TunnelSocket, seed: u8| async move {
            let out: Vec<u8> = (0..LEN).map(|i| (i as u8).wrapping_mul(seed)).collect();
            s.write_all(&out).await.expect("write");
            let mut back = vec![0u8; LEN];
            s.read_exact(&mut back).await.expect("read");
            back
        };
        let both = async { tokio::join!(exchange(a, 3), exchange(b, 7)) };
        let (from_b, from_a) = tokio::time::timeout(Duration::from_secs(10), both)
            .await
            .expect("both ends waited for each other: the writes never finished");
        assert!(
            from_b
                .iter()
                .enumerate()
                .all(|(i, &x)| x == (i as u8).wrapping_mul(7))
        );
        assert!(
            from_a
                .iter()
                .enumerate()
                .all(|(i, &x)| x == (i as u8).wrapping_mul(3))
        );
    }

    /// Reads that return bytes, direct or ahead, count as activity.
    #[tokio::test]
    async fn reads_that_return_bytes_are_recorded() {
        let (mut a, mut b) = pair().await;
        let activity = a.activity();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(activity.idle() >= Duration::from_millis(50));
        b.write_all(b"x").await.expect("write");
        let mut buf = [0u8; 1];
        a.read_exact(&mut buf).await.expect("read");
        assert!(
            activity.idle() < Duration::from_millis(50),
            "{:?}",
            activity.idle()
        );
    }

    /// Writes until one waits for room; how many bytes went in.
    async fn fill(s: &mut TunnelSocket) -> usize {
        let chunk = vec![0u8; 64 * 1024];
        let mut total = 0;
        tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                let n = std::future::poll_fn(|cx| match Pin::new(&mut *s).poll_write(cx, &chunk) {
                    Poll::Pending => Poll::Ready(None),
                    other => other.map(|r| Some(r.expect("write"))),
                })
                .await;
                match n {
                    Some(n) => total += n,
                    None => break,
                }
            }
        })
        .await
        .expect("the writes never waited");
        total
    }

    /// Bytes the peer's kernel acknowledged count as activity when the keepalive looks, though
    /// nothing was read and the peer's process read nothing either; no new acknowledgement, no
    /// activity.
    #[tokio::test]
    async fn acknowledged_bytes_are_recorded_when_looked_at() {
        let (mut a, _b) = pair().await;
        let activity = a.activity();
        tokio::time::sleep(Duration::from_millis(100)).await;
        activity.refresh();
        assert!(
            activity.idle() >= Duration::from_millis(100),
            "nothing sent, yet counted: {:?}",
            activity.idle()
        );
        let mark = activity.written();
        a.write_all(b"taken by the peer's kernel")
            .await
            .expect("write");
        tokio::time::sleep(Duration::from_millis(50)).await;
        activity.refresh();
        assert!(activity.acknowledged(mark), "the write is acknowledged");
        assert!(
            activity.since_read() >= Duration::from_millis(150),
            "nothing was read"
        );
        assert!(
            activity.idle() < Duration::from_millis(50),
            "{:?}",
            activity.idle()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        activity.refresh();
        assert!(
            activity.idle() >= Duration::from_millis(100),
            "no new acknowledgement, yet counted: {:?}",
            activity.idle()
        );
    }

    /// End of stream and bytes read ahead reach the reader in order.
    #[tokio::test]
    async fn the_end_of_stream_comes_after_the_bytes_read_ahead() {
        let (mut a, mut b) = pair().await;
        b.write_all(b"last words").await.expect("write");
        b.shutdown().await.expect("shutdown");
        // Fill a's send side until a write waits, which reads ahead.
        fill(&mut a).await;
        let mut got = Vec::new();
        a.read_to_end(&mut got).await.expect("read");
        assert_eq!(got, b"last words");
    }
}
