//! The byte pump between one TCP connection and one HTTP/2 stream.
//!
//! Both directions run in one task over a shared `&TcpStream`. A read buffer is allocated only
//! when the socket is readable, so an idle session holds no copy buffer. Receive credit is
//! given back to the peer only after the bytes are written to the socket, so a slow reader
//! slows its writer and memory stays within the stream window. A FIN becomes END_STREAM and
//! END_STREAM becomes a FIN (half-close passes through); a reset on either side resets the
//! other.

use std::future::poll_fn;
use std::io;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use futures_util::FutureExt;
use h2::{Reason, RecvStream, SendStream};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;
use tracing::Instrument;

use crate::h2conf::READ_BUFFER;
use crate::metrics as m;
use crate::net;
use crate::session::{self, Progress};

/// Byte counts of a finished or failed session.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Transferred {
    /// Bytes read from the socket and sent into the stream.
    pub to_stream: u64,
    /// Bytes received from the stream and written to the socket.
    pub to_socket: u64,
}

/// Why a session ended other than by both sides closing cleanly.
#[derive(Debug, thiserror::Error)]
pub enum PumpError {
    /// The socket failed (reset, broken pipe).
    #[error("socket: {0}")]
    Socket(#[source] io::Error),
    /// The stream was reset by the peer or the tunnel failed.
    #[error("tunnel stream: {0}")]
    Stream(#[source] h2::Error),
    /// Neither side moved a byte for the idle timeout.
    #[error("idle for {0:?}")]
    Idle(Duration),
    /// One direction ended and the other stayed silent too long.
    #[error("half-closed for {0:?}")]
    HalfClosed(Duration),
    /// The relay stopped the session (shutdown deadline).
    #[error("stopped by shutdown")]
    Stopped,
    /// An operator killed the session (`DELETE /sessions/{id}`).
    #[error("killed by an operator")]
    Killed,
    /// The pump's task panicked (a bug): both sides were reset.
    #[error("internal error: the session's task panicked")]
    Panicked,
}

/// The result label of a session ended by a panic (a bug).
pub const INTERNAL_ERROR: &str = "internal_error";

/// The result label of a session that ran: `ok`, `idle`, `half_closed`, `drain_timeout`,
/// `reset` or `internal_error`.
pub fn outcome(result: &Result<(), PumpError>) -> &'static str {
    match result {
        Ok(()) => "ok",
        Err(PumpError::Idle(_)) => "idle",
        Err(PumpError::HalfClosed(_)) => "half_closed",
        Err(PumpError::Stopped) => "drain_timeout",
        Err(PumpError::Killed) => session::KILLED,
        Err(PumpError::Stream(e)) if e.reason() == Some(Reason::from(session::KILLED_CODE)) => {
            session::KILLED
        }
        Err(PumpError::Socket(_) | PumpError::Stream(_)) => "reset",
        Err(PumpError::Panicked) => INTERNAL_ERROR,
    }
}

/// Runs the part of a session that decides its result. A panic in it (a bug) ends that
/// session only and comes back as `None`, for the caller to count and audit with the result
/// [`INTERNAL_ERROR`]; the panic hook has already logged it in the session's span. What the
/// part held is dropped: its sockets close and its streams are reset.
///
/// Not an `async fn`: one would hold `part` twice (as its argument and inside the awaited
/// future; rustc does not overlap them), doubling the memory of every idle session.
pub fn catch_panic<F: Future>(part: F) -> impl Future<Output = Option<F::Output>> {
    AssertUnwindSafe(part).catch_unwind().map(Result::ok)
}

/// Counters a pump advances as bytes move, so long sessions show in metrics (and in the
/// session table) while they run.
#[derive(Debug, Clone)]
pub struct PumpCounters {
    /// Advanced by bytes sent into the stream.
    pub to_stream: metrics::Counter,
    /// Advanced by bytes written to the socket.
    pub to_socket: metrics::Counter,
    /// The session's entry in the session table.
    progress: Arc<Progress>,
    /// Whether the socket is the partner's (DMZ side) or the target's (agent side).
    partner_socket: bool,
}

impl PumpCounters {
    /// Counters of a pump whose socket is the partner's (the DMZ side).
    pub fn partner_socket(service: &str, progress: Arc<Progress>) -> Self {
        Self {
            to_stream: metrics::counter!(m::BYTES, "service" => service.to_owned(), "direction" => m::PARTNER_TO_TARGET),
            to_socket: metrics::counter!(m::BYTES, "service" => service.to_owned(), "direction" => m::TARGET_TO_PARTNER),
            progress,
            partner_socket: true,
        }
    }

    /// Counters of a pump whose socket is the trading engine's or the target's (the agent side).
    pub fn target_socket(service: &str, progress: Arc<Progress>) -> Self {
        Self {
            to_stream: metrics::counter!(m::BYTES, "service" => service.to_owned(), "direction" => m::TARGET_TO_PARTNER),
            to_socket: metrics::counter!(m::BYTES, "service" => service.to_owned(), "direction" => m::PARTNER_TO_TARGET),
            progress,
            partner_socket: false,
        }
    }

    /// The session's byte totals: (into the stream, onto the socket).
    fn totals(&self) -> (&AtomicU64, &AtomicU64) {
        let p = &self.progress;
        if self.partner_socket {
            (&p.to_target, &p.to_partner)
        } else {
            (&p.to_partner, &p.to_target)
        }
    }
}

/// The time limits of one session.
#[derive(Debug, Clone, Copy)]
pub struct PumpLimits {
    /// Neither side moved a byte for this long: the session is closed.
    pub idle_timeout: Duration,
    /// One direction ended (FIN) and the other moved no byte for this long: closed.
    pub half_closed_timeout: Duration,
}

/// Copies bytes both ways until both directions have ended, one side resets, a time limit
/// runs out, `stop` is cancelled, or the session is killed (its [`Progress`]). On error both sides are reset. `prefix` holds bytes
/// already read from the socket (after a proxy request or PROXY header); they are sent into
/// the stream first. A panic inside (a bug) resets both sides too and is returned as
/// [`PumpError::Panicked`], so the session is counted and nothing else is disturbed.
pub async fn pump(
    tcp: TcpStream,
    prefix: Bytes,
    send: SendStream<Bytes>,
    recv: RecvStream,
    counters: &PumpCounters,
    limits: PumpLimits,
    stop: &CancellationToken,
) -> (Transferred, Result<(), PumpError>) {
    let run = copy_both_ways(&tcp, prefix, send, recv, counters, limits, stop);
    match catch_panic(run).await {
        Some(done) => done,
        None => {
            // The streams were dropped with the future: h2 resets them (CANCEL).
            tracing::error!("session task panicked: both sides reset");
            net::set_reset_on_close(&tcp);
            (Transferred::default(), Err(PumpError::Panicked))
        }
    }
}

async fn copy_both_ways(
    tcp: &TcpStream,
    prefix: Bytes,
    mut send: SendStream<Bytes>,
    mut recv: RecvStream,
    counters: &PumpCounters,
    limits: PumpLimits,
    stop: &CancellationToken,
) -> (Transferred, Result<(), PumpError>) {
    let start = Instant::now();
    let since_start = || start.elapsed().as_millis() as u64;
    let last_activity = AtomicU64::new(0);
    let touch = || last_activity.store(since_start(), Ordering::Relaxed);
    // When the first direction ended, in ms since start plus one (0: both still open).
    let half_closed = AtomicU64::new(0);
    let half_closed_now = tokio::sync::Notify::new();
    let ended = |r: &Result<(), PumpError>| {
        if r.is_ok() && half_closed.load(Ordering::Relaxed) == 0 {
            half_closed.store(since_start() + 1, Ordering::Relaxed);
            half_closed_now.notify_one();
        }
    };
    let (to_stream, to_socket) = counters.totals();

    let up = async {
        let mut pacing = Pacing::default();
        if !prefix.is_empty() {
            let n = prefix.len() as u64;
            send_all(&mut send, prefix, &mut pacing).await?;
            counters.to_stream.increment(n);
            to_stream.fetch_add(n, Ordering::Relaxed);
        }
        let r = socket_to_stream(
            tcp,
            &mut send,
            &mut pacing,
            &counters.to_stream,
            to_stream,
            &touch,
        )
        .await;
        ended(&r);
        r
    };
    let down = async {
        let r = stream_to_socket(&mut recv, tcp, &counters.to_socket, to_socket, &touch).await;
        ended(&r);
        r
    };
    let watch = async {
        loop {
            let idle_deadline = start
                + Duration::from_millis(last_activity.load(Ordering::Relaxed))
                + limits.idle_timeout;
            let half = half_closed.load(Ordering::Relaxed);
            // Once half-closed, the open direction must keep moving: a long download after
            // the client's FIN is fine, a silent half-open session is reaped.
            let half_deadline = (half > 0).then(|| {
                let since = (half - 1).max(last_activity.load(Ordering::Relaxed));
                start + Duration::from_millis(since) + limits.half_closed_timeout
            });
            let now = Instant::now();
            if now >= idle_deadline {
                return PumpError::Idle(limits.idle_timeout);
            }
            if half_deadline.is_some_and(|d| now >= d) {
                return PumpError::HalfClosed(limits.half_closed_timeout);
            }
            let next = half_deadline.map_or(idle_deadline, |d| d.min(idle_deadline));
            tokio::select! {
                _ = tokio::time::sleep_until(next.into()) => {}
                _ = half_closed_now.notified() => {}
            }
        }
    };
    let result = tokio::select! {
        r = async { tokio::try_join!(up, down) } => r.map(|_| ()),
        e = watch => Err(e),
        _ = stop.cancelled() => Err(PumpError::Stopped),
        _ = counters.progress.kill.notified() => Err(PumpError::Killed),
    };
    match &result {
        Ok(()) => {}
        // The other side records the session as killed too.
        Err(PumpError::Killed) => send.send_reset(Reason::from(session::KILLED_CODE)),
        Err(_) => send.send_reset(Reason::CANCEL),
    }
    if result.is_err() {
        net::set_reset_on_close(tcp);
    }
    let moved = Transferred {
        to_stream: to_stream.load(Ordering::Relaxed),
        to_socket: to_socket.load(Ordering::Relaxed),
    };
    (moved, result)
}

/// [`pump`] on `runtime`, the shard of the stream's tunnel connection, so that the pump and
/// the HTTP/2 connection task it trades frames with share a thread (see [`crate::shards`]).
/// The socket moves to that runtime's event loop first (the caller runs on another runtime:
/// the one that accepted the socket). The caller waits for the result; if it stops waiting,
/// the pump is aborted.
#[allow(clippy::too_many_arguments)]
pub async fn pump_on(
    runtime: &tokio::runtime::Handle,
    tcp: TcpStream,
    prefix: Bytes,
    send: SendStream<Bytes>,
    recv: RecvStream,
    counters: PumpCounters,
    limits: PumpLimits,
    stop: CancellationToken,
) -> (Transferred, Result<(), PumpError>) {
    let tcp = match tcp.into_std() {
        Ok(tcp) => tcp,
        Err(e) => return (Transferred::default(), Err(PumpError::Socket(e))),
    };
    let task = AbortOnDropHandle::new(
        runtime.spawn(
            async move {
                match TcpStream::from_std(tcp) {
                    Ok(tcp) => pump(tcp, prefix, send, recv, &counters, limits, &stop).await,
                    Err(e) => (Transferred::default(), Err(PumpError::Socket(e))),
                }
            }
            .in_current_span(),
        ),
    );
    match task.await {
        Ok(result) => result,
        // Cancelled: its runtime shut down (the pump catches its own panics).
        Err(_) => (Transferred::default(), Err(PumpError::Stopped)),
    }
}

async fn socket_to_stream(
    tcp: &TcpStream,
    send: &mut SendStream<Bytes>,
    pacing: &mut Pacing,
    counter: &metrics::Counter,
    total: &AtomicU64,
    touch: &impl Fn(),
) -> Result<(), PumpError> {
    let mut buf = BytesMut::new();
    loop {
        tcp.readable().await.map_err(PumpError::Socket)?;
        // While data flows, this takes back the block of the previous read once HTTP/2 has
        // sent it; when the socket runs dry the block is let go, so idle sessions hold none.
        buf.reserve(READ_BUFFER);
        match tcp.try_read_buf(&mut buf) {
            Ok(0) => {
                send.send_data(Bytes::new(), true)
                    .map_err(PumpError::Stream)?;
                return Ok(());
            }
            Ok(n) => {
                touch();
                send_all(send, buf.split().freeze(), pacing).await?;
                counter.increment(n as u64);
                total.fetch_add(n as u64, Ordering::Relaxed);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => buf = BytesMut::new(),
            Err(e) => return Err(PumpError::Socket(e)),
        }
    }
}

/// Largest DATA frame a session queues while its tunnel connection is slower than its
/// sessions. HTTP/2 serves the busy streams of a connection one frame each in turn, so the
/// frame size sets how long a new session's frames wait behind bulk ones: 8 busy streams of
/// 16 KiB frames are 210 ms at 5 Mbit/s, of 2 KiB frames 26 ms (docs/DECISIONS.md, "Short send
/// queues").
pub const SLOW_LINK_FRAME: usize = 2 * 1024;
/// A wait for room in the connection at least this long means the link is slower than the
/// session: it queues frames of [`SLOW_LINK_FRAME`] until a wait is shorter again. On loopback
/// and fast links waits are microseconds.
pub const SLOW_LINK_WAIT: Duration = Duration::from_millis(20);

/// How one session cuts its bytes into DATA frames: whole reads while the connection takes
/// them at once, [`SLOW_LINK_FRAME`] while the session waits for room.
#[derive(Debug, Default)]
pub struct Pacing {
    slow: bool,
}

impl Pacing {
    fn frame(&self) -> usize {
        if self.slow {
            SLOW_LINK_FRAME
        } else {
            usize::MAX
        }
    }

    fn waited(&mut self, wait: Duration) {
        self.slow = wait >= SLOW_LINK_WAIT;
    }
}

/// Sends `data` as the peer's window admits it, in frames `pacing` chooses.
pub async fn send_all(
    send: &mut SendStream<Bytes>,
    mut data: Bytes,
    pacing: &mut Pacing,
) -> Result<(), PumpError> {
    while !data.is_empty() {
        send.reserve_capacity(data.len());
        let mut granted = send.capacity();
        if granted == 0 {
            let waiting = Instant::now();
            granted = match poll_fn(|cx| send.poll_capacity(cx)).await {
                Some(Ok(n)) => n,
                Some(Err(e)) => return Err(PumpError::Stream(e)),
                None => return Err(stream_gone(send).await),
            };
            pacing.waited(waiting.elapsed());
        }
        if granted == 0 {
            continue;
        }
        let chunk = data.split_to(granted.min(data.len()).min(pacing.frame()));
        send.send_data(chunk, false).map_err(PumpError::Stream)?;
    }
    Ok(())
}

/// The error of a send stream that can take no more data.
async fn stream_gone(send: &mut SendStream<Bytes>) -> PumpError {
    match poll_fn(|cx| send.poll_reset(cx)).await {
        Ok(reason) => PumpError::Stream(h2::Error::from(reason)),
        Err(e) => PumpError::Stream(e),
    }
}

async fn stream_to_socket(
    recv: &mut RecvStream,
    tcp: &TcpStream,
    counter: &metrics::Counter,
    total: &AtomicU64,
    touch: &impl Fn(),
) -> Result<(), PumpError> {
    while let Some(data) = recv.data().await {
        let mut data = data.map_err(PumpError::Stream)?;
        let n = data.len();
        touch();
        while data.has_remaining() {
            tcp.writable().await.map_err(PumpError::Socket)?;
            match tcp.try_write(data.chunk()) {
                Ok(written) => data.advance(written),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(PumpError::Socket(e)),
            }
        }
        // Credit goes back only once the bytes are in the socket: this is the backpressure.
        let _ = recv.flow_control().release_capacity(n);
        counter.increment(n as u64);
        total.fetch_add(n as u64, Ordering::Relaxed);
    }
    net::shutdown_write(tcp).map_err(PumpError::Socket)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// A counter whose every increment panics: a bug in the middle of a running pump.
    struct Broken;

    impl metrics::CounterFn for Broken {
        fn increment(&self, _: u64) {
            panic!("a bug in the pump");
        }
        fn absolute(&self, _: u64) {}
    }

    #[tokio::test]
    async fn catch_panic_gives_back_the_result_or_none_for_a_panic() {
        assert_eq!(catch_panic(async { "ok" }).await, Some("ok"));
        let bug = async {
            if std::hint::black_box(true) {
                panic!("a bug in session setup");
            }
            "ok"
        };
        assert_eq!(catch_panic(bug).await, None);
    }

    #[test]
    fn catch_panic_holds_its_part_once() {
        // Every session's task is wrapped: a copy of its state would be memory per idle session.
        let part = async {
            let state = [7u8; 4096];
            tokio::task::yield_now().await;
            std::hint::black_box(state);
        };
        let alone = std::mem::size_of_val(&part);
        let wrapped = catch_panic(part);
        assert!(
            std::mem::size_of_val(&wrapped) < alone + 64,
            "{alone} bytes alone, {} wrapped",
            std::mem::size_of_val(&wrapped)
        );
    }

    /// One HTTP/2 stream over an in-memory connection, whose server end the pump gets, and a
    /// TCP connection on loopback, whose accepted end the pump gets.
    struct Session {
        send: SendStream<Bytes>,
        recv: RecvStream,
        /// What the pump sends into the stream, as the other side receives it.
        from_pump: RecvStream,
        /// Keeps the other side's half of the stream open.
        _to_pump: SendStream<Bytes>,
        tcp: TcpStream,
        /// The other end of `tcp`.
        peer: TcpStream,
    }

    impl Session {
        async fn new() -> Self {
            let (client_io, server_io) = tokio::io::duplex(64 * 1024);
            let server = tokio::spawn(async move {
                let mut conn = h2::server::handshake(server_io).await.unwrap();
                let (request, mut respond) = conn.accept().await.unwrap().unwrap();
                let send = respond
                    .send_response(http::Response::new(()), false)
                    .unwrap();
                tokio::spawn(async move { while conn.accept().await.is_some() {} });
                (send, request.into_body())
            });
            let (mut client, conn) = h2::client::handshake(client_io).await.unwrap();
            tokio::spawn(conn);
            let (response, to_pump) = client.send_request(http::Request::new(()), false).unwrap();
            let (send, recv) = server.await.unwrap();
            let from_pump = response.await.unwrap().into_body();
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let peer = TcpStream::connect(listener.local_addr().unwrap())
                .await
                .unwrap();
            let (tcp, _) = listener.accept().await.unwrap();
            Self {
                send,
                recv,
                from_pump,
                _to_pump: to_pump,
                tcp,
                peer,
            }
        }
    }

    #[tokio::test]
    async fn a_pump_that_panics_resets_both_sides_and_says_so() {
        let Session {
            send,
            recv,
            mut from_pump,
            tcp,
            mut peer,
            ..
        } = Session::new().await;
        peer.write_all(b"first bytes").await.unwrap();

        let broken = metrics::Counter::from_arc(Arc::new(Broken));
        let counters = PumpCounters {
            to_stream: broken.clone(),
            to_socket: broken,
            progress: Default::default(),
            partner_socket: true,
        };
        let limits = PumpLimits {
            idle_timeout: Duration::from_secs(60),
            half_closed_timeout: Duration::from_secs(60),
        };
        let stop = CancellationToken::new();
        let (_, result) = tokio::time::timeout(
            Duration::from_secs(10),
            pump(tcp, Bytes::new(), send, recv, &counters, limits, &stop),
        )
        .await
        .expect("the pump returns");
        assert!(matches!(result, Err(PumpError::Panicked)), "{result:?}");
        assert_eq!(outcome(&result), "internal_error");

        let mut buf = [0u8; 16];
        let read = tokio::time::timeout(Duration::from_secs(10), peer.read(&mut buf))
            .await
            .expect("the socket's peer learns at once");
        assert_eq!(
            read.map_err(|e| e.kind()),
            Err(io::ErrorKind::ConnectionReset),
            "a reset, not a clean end of stream"
        );
        let stream_end = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match from_pump.data().await {
                    Some(Ok(_)) => continue,
                    other => return other,
                }
            }
        })
        .await
        .expect("the stream's peer learns at once");
        let reason = stream_end.and_then(|r| r.err()).and_then(|e| e.reason());
        assert_eq!(reason, Some(Reason::CANCEL), "the stream is reset");
    }

    #[tokio::test]
    async fn a_killed_session_resets_both_sides_and_tells_the_other_side() {
        let Session {
            send,
            recv,
            mut from_pump,
            tcp,
            mut peer,
            ..
        } = Session::new().await;

        let table = session::Table::new();
        let entry = table.add("00000000000000c3", "sftp", m::INBOUND, "-", "-");
        let counters = PumpCounters::partner_socket("sftp", entry.progress.clone());
        let limits = PumpLimits {
            idle_timeout: Duration::from_secs(60),
            half_closed_timeout: Duration::from_secs(60),
        };
        let pumping = tokio::spawn(async move {
            let stop = CancellationToken::new();
            let (moved, result) =
                pump(tcp, Bytes::new(), send, recv, &counters, limits, &stop).await;
            (moved, outcome(&result), result)
        });
        peer.write_all(b"before the kill").await.unwrap();
        let first = from_pump.data().await.unwrap().unwrap();
        assert_eq!(&first[..], b"before the kill");
        assert_eq!(table.list()[0].bytes_partner_to_target, 15);
        assert_eq!(table.kill("00000000000000c3"), session::Kill::Killed);
        let (moved, label, result) = tokio::time::timeout(Duration::from_secs(10), pumping)
            .await
            .expect("the pump returns")
            .unwrap();
        assert!(matches!(result, Err(PumpError::Killed)), "{result:?}");
        assert_eq!((label, moved.to_stream), (session::KILLED, 15));
        // The other side's stream is reset with the code that says "killed".
        let reset = loop {
            match from_pump.data().await {
                Some(Ok(_)) => continue,
                Some(Err(e)) => break e,
                None => panic!("stream ended without a reset"),
            }
        };
        assert_eq!(outcome(&Err(PumpError::Stream(reset))), session::KILLED);
        // The partner's socket is reset.
        let mut rest = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(10), peer.read_to_end(&mut rest)).await;
        assert!(matches!(read, Ok(Err(_))), "{read:?}");
        drop(entry);
        assert!(table.is_empty());
    }
}
