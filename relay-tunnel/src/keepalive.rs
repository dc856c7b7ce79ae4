//! Liveness of a tunnel connection: any byte received proves the peer alive; PINGs make an
//! idle peer speak; a connection that received nothing for two intervals is dead.
//!
//! A PING answer on a saturated link waits behind everything queued toward us, so "no PONG
//! within the interval" would kill a busy, healthy tunnel (docs/DECISIONS.md, "Liveness").

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::Poll;
use std::time::Duration;

use h2::{Ping, PingPong};
use tokio::time::Instant;

/// Why a keepalive loop ended.
#[derive(Debug, thiserror::Error)]
pub enum KeepaliveError {
    /// Nothing at all was received for two intervals.
    #[error("nothing received for {0:?} (two keepalive intervals): tunnel is silent")]
    Silent(Duration),
    /// The connection failed while pinging.
    #[error("PING failed: {0}")]
    Failed(#[from] h2::Error),
}

/// When a connection last received bytes; shared by the connection's socket
/// ([`crate::net::TunnelSocket`]) and
/// its keepalive loop.
#[derive(Debug, Clone)]
pub struct Activity {
    since: Instant,
    /// Milliseconds from `since` to the last read that returned bytes.
    last: Arc<AtomicU64>,
}

impl Activity {
    /// A clock that counts "now" as the last activity.
    pub fn new() -> Self {
        Self {
            since: Instant::now(),
            last: Arc::new(AtomicU64::new(0)),
        }
    }

    pub(crate) fn touch(&self) {
        let now = u64::try_from(self.since.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last.fetch_max(now, Ordering::Relaxed);
    }

    /// Time since bytes were last received.
    pub fn idle(&self) -> Duration {
        let last = Duration::from_millis(self.last.load(Ordering::Relaxed));
        self.since.elapsed().saturating_sub(last)
    }
}

impl Default for Activity {
    fn default() -> Self {
        Self::new()
    }
}

/// Sends a PING `interval` after the previous answer (one at a time; its round trip goes to
/// `rtt`) and fails once nothing at all was received for two intervals: a silent peer is
/// detected within two intervals, and a peer that is sending is alive however late its PING
/// answer comes. Runs until it fails; the HTTP/2 connection must be driven concurrently.
pub async fn run(
    mut ping_pong: PingPong,
    interval: Duration,
    activity: Activity,
    rtt: metrics::Histogram,
) -> KeepaliveError {
    let dead_after = interval * 2;
    let mut next_ping = Instant::now() + interval;
    let mut outstanding: Option<Instant> = None;
    loop {
        let idle = activity.idle();
        if idle >= dead_after {
            return KeepaliveError::Silent(dead_after);
        }
        let now = Instant::now();
        if outstanding.is_none() && now >= next_ping {
            if let Err(e) = ping_pong.send_ping(Ping::opaque()) {
                return KeepaliveError::Failed(e);
            }
            outstanding = Some(now);
            next_ping = now + interval;
        }
        // Wake for the next PING or when the connection would have been silent too long,
        // whichever comes first; a PONG wakes us earlier.
        let silent_at = now + (dead_after - idle);
        let wake = if outstanding.is_none() {
            next_ping.min(silent_at)
        } else {
            silent_at
        };
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
                    if let Some(sent) = outstanding.take() {
                        rtt.record(sent.elapsed().as_secs_f64());
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
