//! PING keepalive: a tunnel that stays silent for two intervals is dead.

use std::time::{Duration, Instant};

use h2::{Ping, PingPong};

/// Why a keepalive loop ended.
#[derive(Debug, thiserror::Error)]
pub enum KeepaliveError {
    /// No PONG came back within one interval after the PING.
    #[error("no PING answer within {0:?}: tunnel is silent")]
    Silent(Duration),
    /// The connection failed while pinging.
    #[error("PING failed: {0}")]
    Failed(#[from] h2::Error),
}

/// Sends a PING every `interval` and fails when one is not answered within `interval`, so a
/// tunnel silent since just after the last PONG is declared dead within two intervals. Runs
/// until it fails; the HTTP/2 connection must be driven concurrently.
pub async fn run(
    mut ping_pong: PingPong,
    interval: Duration,
    rtt: metrics::Histogram,
) -> KeepaliveError {
    loop {
        tokio::time::sleep(interval).await;
        let sent = Instant::now();
        match tokio::time::timeout(interval, ping_pong.ping(Ping::opaque())).await {
            Ok(Ok(_pong)) => rtt.record(sent.elapsed().as_secs_f64()),
            Ok(Err(e)) => return KeepaliveError::Failed(e),
            Err(_) => return KeepaliveError::Silent(interval),
        }
    }
}
