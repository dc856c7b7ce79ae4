//! Liveness of a tunnel connection. Any byte received proves the peer alive. Bytes of ours that
//! its TCP acknowledges prove the path and its kernel alive, so they excuse its silence while our
//! own queue may be holding our PING or our PING answer, but not once our PING has reached it.
//! PINGs make an idle peer speak.
//!
//! A PING answer on a saturated link waits behind everything queued toward us, and the peer's
//! frames to a sender wait behind the sender's own queue, so "no PONG within the interval" or
//! "nothing read for two intervals" alone would kill a busy, healthy tunnel; acknowledged bytes
//! alone would keep a stopped peer "alive" for as long as anything is sent to it
//! (docs/DECISIONS.md, "Liveness").

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::task::Poll;
use std::time::Duration;

use h2::{Ping, PingPong};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// Why a keepalive loop ended.
#[derive(Debug, thiserror::Error)]
pub enum KeepaliveError {
    /// Nothing was received, and nothing sent was acknowledged, for two intervals.
    #[error(
        "nothing received, and nothing sent acknowledged, for {0:?} (two keepalive intervals): tunnel is silent"
    )]
    Silent(Duration),
    /// Our PING reached the peer an interval ago, and nothing was received for two intervals.
    #[error(
        "nothing received for {0:?} (two keepalive intervals), though the PING reached the peer: tunnel is silent"
    )]
    Unanswered(Duration),
    /// The connection failed while pinging.
    #[error("PING failed: {0}")]
    Failed(#[from] h2::Error),
}

/// Bytes that may lie between what the socket had taken when a PING was sent and the PING
/// itself: what TLS and HTTP/2 had buffered (`net::TUNNEL_TLS_SEND_BUFFER`, a frame or two).
const PING_SLACK: u64 = 64 * 1024;

/// A connection's signs of life, shared by its socket ([`crate::net::TunnelSocket`]), which
/// records reads and writes, and its keepalive loop, which looks at the acknowledged bytes.
#[derive(Debug, Clone)]
pub struct Activity {
    since: Instant,
    /// Milliseconds from `since` to the last read that returned bytes.
    read: Arc<AtomicU64>,
    /// Milliseconds from `since` to the last growth of `acked`.
    ack: Arc<AtomicU64>,
    /// Bytes written to the socket.
    written: Arc<AtomicU64>,
    /// The socket whose acknowledged bytes count; held weakly, so it closes with its owner.
    socket: Weak<TcpStream>,
    /// Bytes of ours acknowledged when [`Activity::refresh`] last looked, and when it was made
    /// (the handshake's SYN counts as one).
    acked: Arc<AtomicU64>,
    acked_at_start: u64,
}

impl Activity {
    /// A clock that counts "now" as the last activity, with no socket to look at.
    pub fn new() -> Self {
        Self::watching(Weak::new())
    }

    /// As [`Activity::new`], also counting the bytes `socket`'s peer acknowledges.
    pub(crate) fn of(socket: &Arc<TcpStream>) -> Self {
        Self::watching(Arc::downgrade(socket))
    }

    fn watching(socket: Weak<TcpStream>) -> Self {
        let acked = socket
            .upgrade()
            .and_then(|s| crate::net::bytes_acked(&s))
            .unwrap_or(0);
        Self {
            since: Instant::now(),
            read: Arc::new(AtomicU64::new(0)),
            ack: Arc::new(AtomicU64::new(0)),
            written: Arc::new(AtomicU64::new(0)),
            socket,
            acked: Arc::new(AtomicU64::new(acked)),
            acked_at_start: acked,
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.since.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn ago(&self, ms: &AtomicU64) -> Duration {
        let at = Duration::from_millis(ms.load(Ordering::Relaxed));
        self.since.elapsed().saturating_sub(at)
    }

    /// Bytes were read.
    pub(crate) fn touch(&self) {
        self.read.fetch_max(self.now_ms(), Ordering::Relaxed);
    }

    /// `n` bytes were written to the socket.
    pub(crate) fn wrote(&self, n: usize) {
        self.written.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// Looks at how many of our bytes the peer acknowledged: more than at the last look is
    /// acknowledgement progress now.
    pub fn refresh(&self) {
        let Some(acked) = self
            .socket
            .upgrade()
            .and_then(|s| crate::net::bytes_acked(&s))
        else {
            return;
        };
        if self.acked.fetch_max(acked, Ordering::Relaxed) < acked {
            self.ack.fetch_max(self.now_ms(), Ordering::Relaxed);
        }
    }

    /// Time since bytes were last read.
    pub fn since_read(&self) -> Duration {
        self.ago(&self.read)
    }

    /// Time since bytes were last read or acknowledged, whichever was later.
    pub fn idle(&self) -> Duration {
        self.since_read().min(self.ago(&self.ack))
    }

    /// Bytes written to the socket so far.
    pub fn written(&self) -> u64 {
        self.written.load(Ordering::Relaxed)
    }

    /// Whether a frame handed to the connection when [`Activity::written`] was `mark` has
    /// surely been acknowledged: everything written since, or `mark` plus what TLS and HTTP/2
    /// may have held ahead of it.
    pub fn acknowledged(&self, mark: u64) -> bool {
        let acked = self
            .acked
            .load(Ordering::Relaxed)
            .saturating_sub(self.acked_at_start);
        acked >= self.written().min(mark.saturating_add(PING_SLACK))
    }
}

impl Default for Activity {
    fn default() -> Self {
        Self::new()
    }
}

/// An outstanding PING: when it was sent, what the socket had taken then, and when its bytes
/// were seen acknowledged.
struct Outstanding {
    sent: Instant,
    mark: u64,
    reached: Option<Instant>,
}

/// Sends a PING `interval` after the previous answer (one at a time; its round trip goes to
/// `rtt`) and fails when nothing was received for two intervals and either nothing sent was
/// acknowledged for two intervals either, or the PING reached the peer's TCP an interval ago.
/// So a silent link or a peer that stopped answering is detected within two intervals, and a
/// peer that is sending, or whose answers wait behind what we send, is alive however late its
/// PING answer comes. The socket's acknowledged bytes are looked at sixteen times per interval.
/// Runs until it fails; the HTTP/2 connection must be driven concurrently.
pub async fn run(
    mut ping_pong: PingPong,
    interval: Duration,
    activity: Activity,
    rtt: metrics::Histogram,
) -> KeepaliveError {
    let dead_after = interval * 2;
    let look_every = interval / 16;
    let mut next_ping = Instant::now() + interval;
    let mut outstanding: Option<Outstanding> = None;
    loop {
        activity.refresh();
        let now = Instant::now();
        match outstanding.as_mut() {
            Some(ping) if ping.reached.is_none() && activity.acknowledged(ping.mark) => {
                ping.reached = Some(now);
            }
            _ => {}
        }
        if activity.since_read() >= dead_after {
            if activity.idle() >= dead_after {
                return KeepaliveError::Silent(dead_after);
            }
            let reached = outstanding.as_ref().and_then(|p| p.reached);
            if reached.is_some_and(|at| now - at >= interval) {
                return KeepaliveError::Unanswered(dead_after);
            }
        }
        if outstanding.is_none() && now >= next_ping {
            let mark = activity.written();
            if let Err(e) = ping_pong.send_ping(Ping::opaque()) {
                return KeepaliveError::Failed(e);
            }
            outstanding = Some(Outstanding {
                sent: now,
                mark,
                reached: None,
            });
            next_ping = now + interval;
        }
        // Wake for the next PING, the next look at the socket, or when the connection would
        // have been silent too long either way, whichever comes first; a PONG wakes us earlier.
        let silent_at = now + dead_after.saturating_sub(activity.idle());
        let mut wake = silent_at.min(now + look_every);
        if let Some(reached) = outstanding.as_ref().and_then(|p| p.reached) {
            let unread_at = now + dead_after.saturating_sub(activity.since_read());
            wake = wake.min(unread_at.max(reached + interval));
        }
        if outstanding.is_none() {
            wake = wake.min(next_ping);
        }
        let waiting = outstanding.is_some();
        let pong = std::future::poll_fn(|cx| {
            if waiting {
                ping_pong.poll_pong(cx)
            } else {
                Poll::Pending
            }
        });
        tokio::select! {
            r = pong => match r {
                Ok(_pong) => {
                    if let Some(ping) = outstanding.take() {
                        rtt.record(ping.sent.elapsed().as_secs_f64());
                    }
                    // Counted from the answer, so an idle tunnel sees one PING per interval.
                    next_ping = Instant::now() + interval;
                }
                Err(e) => return KeepaliveError::Failed(e),
            },
            _ = tokio::time::sleep_until(wake) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An HTTP/2 client connection whose peer never answers (nobody reads the other end), its
    /// connection driven in the background; the keepalive's `PingPong`.
    async fn unanswered() -> (PingPong, tokio::io::DuplexStream) {
        let (ours, theirs) = tokio::io::duplex(1 << 20);
        let (_send, mut connection) = h2::client::handshake(ours).await.expect("handshake");
        let ping_pong = connection.ping_pong().expect("ping_pong");
        tokio::spawn(async move {
            let _keep_send = _send;
            let _ = connection.await;
        });
        (ping_pong, theirs)
    }

    /// Keepalive interval of these tests: short, on the real clock.
    const INTERVAL: Duration = Duration::from_millis(200);

    #[tokio::test]
    async fn a_silent_peer_is_dead_after_two_intervals() {
        let (ping_pong, _theirs) = unanswered().await;
        let start = Instant::now();
        let e = run(
            ping_pong,
            INTERVAL,
            Activity::new(),
            metrics::histogram!("test"),
        )
        .await;
        assert!(matches!(e, KeepaliveError::Silent(_)), "{e}");
        let took = start.elapsed();
        assert!(
            took >= INTERVAL * 2 && took < INTERVAL * 2 + Duration::from_millis(300),
            "declared dead after {took:?}"
        );
    }

    #[tokio::test]
    async fn a_peer_that_sends_is_alive_without_ping_answers() {
        let (ping_pong, _theirs) = unanswered().await;
        let activity = Activity::new();
        let feed = activity.clone();
        // Bytes arrive every interval; the one PING sent is never answered.
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(INTERVAL).await;
                feed.touch();
            }
        });
        let keepalive = run(ping_pong, INTERVAL, activity, metrics::histogram!("test"));
        if let Ok(e) = tokio::time::timeout(INTERVAL * 15, keepalive).await {
            panic!("a peer sending every interval was declared dead: {e}");
        }
    }
}
