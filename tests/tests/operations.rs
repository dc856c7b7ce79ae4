//! Operations: exact metrics on both sides, JSON logs and the agent's audit trail, graceful
//! drain of a DMZ node behind HAProxy, hot reload on both sides, the admin endpoint's token,
//! and the Grafana dashboard.
//!
//! Metrics and logs of one component are isolated by running it as a real process: in-process
//! components share one global metrics recorder and one tracing subscriber. The tests of this
//! file run one at a time (two cores; some measure time bounds; in-process tests compare metric
//! deltas of the shared recorder).

#[path = "operations/admin_auth.rs"]
mod admin_auth;
#[path = "operations/alerts.rs"]
mod alerts;
#[path = "operations/console.rs"]
mod console;
#[path = "operations/dashboard.rs"]
mod dashboard;
#[path = "operations/drain.rs"]
mod drain;
#[path = "operations/expiry.rs"]
mod expiry;
#[path = "operations/logs.rs"]
mod logs;
#[path = "operations/metrics.rs"]
mod metrics;
#[path = "operations/reload_agent.rs"]
mod reload_agent;
#[path = "operations/reload_dmz.rs"]
mod reload_dmz;
#[path = "operations/sandbox.rs"]
mod sandbox;

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use relay_e2e::process::Logged;
use relay_e2e::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// The tests of this file run one at a time.
pub static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Bound on setup waits (processes starting, tunnels registering) on a loaded machine.
pub const SETUP_LIMIT: Duration = Duration::from_secs(20);
/// Bound on one short client exchange.
pub const EXCHANGE_LIMIT: Duration = Duration::from_secs(10);
/// The loopback address partners connect from, so a test can look for it in metrics and logs.
pub const PARTNER_IP: [u8; 4] = [127, 0, 0, 9];

// ---------------------------------------------------------------------------------------------
// Processes

/// Writes the config of a DMZ node and starts it as a process.
pub fn spawn_dmz_logged(pki: &Pki, opts: &DmzOptions, args: &[&str], name: &str) -> Logged {
    let path = pki.write(&format!("{name}.toml"), &opts.toml(pki));
    Logged::spawn(pki, "relay-dmz", &path, args, name)
}

/// Writes the config of an agent and starts it as a process; returns it and its config path.
pub fn spawn_agent_logged(
    pki: &Pki,
    opts: &AgentOptions,
    args: &[&str],
    name: &str,
) -> (Logged, PathBuf) {
    let path = pki.write(&format!("{name}.toml"), &opts.toml(pki));
    (
        Logged::spawn(pki, "relay-internal", &path, args, name),
        path,
    )
}

// ---------------------------------------------------------------------------------------------
// Admin endpoints

/// `/metrics` of an admin endpoint, parsed with a Prometheus text-format parser.
pub async fn scrape(admin: SocketAddr) -> (String, prometheus_parse::Scrape) {
    let (status, body) = http_get(admin, "/metrics").await.expect("GET /metrics");
    assert_eq!(status, 200, "GET /metrics on {admin}: {body}");
    let lines = body.lines().map(|l| Ok(l.to_owned()));
    let parsed = prometheus_parse::Scrape::parse(lines).expect("parse /metrics");
    (body, parsed)
}

/// The value of a counter, gauge or untyped sample `name` whose labels include all of `labels`;
/// the sum over every matching series. `None` if no series matches.
pub fn value(
    scrape: &prometheus_parse::Scrape,
    name: &str,
    labels: &[(&str, &str)],
) -> Option<f64> {
    use prometheus_parse::Value;
    let matching: Vec<f64> = scrape
        .samples
        .iter()
        .filter(|s| s.metric == name)
        .filter(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(v)))
        .filter_map(|s| match s.value {
            Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => Some(v),
            _ => None,
        })
        .collect();
    (!matching.is_empty()).then(|| matching.iter().sum())
}

/// The same as [`value`] on a fresh scrape: 0 when the series is absent, NaN (equal to
/// nothing) when the endpoint does not answer.
pub async fn current(admin: SocketAddr, name: &str, labels: &[(&str, &str)]) -> f64 {
    let Ok((200, body)) = http_get(admin, "/metrics").await else {
        return f64::NAN;
    };
    let lines = body.lines().map(|l| Ok(l.to_owned()));
    let s = prometheus_parse::Scrape::parse(lines).expect("parse /metrics");
    value(&s, name, labels).unwrap_or(0.0)
}

/// `POST /reload` on an admin endpoint: status code and body (trimmed).
pub async fn post_reload(admin: SocketAddr) -> (u16, String) {
    let (status, body) = http_post(admin, "/reload", EXCHANGE_LIMIT)
        .await
        .expect("POST /reload");
    (status, body.trim().to_owned())
}

/// Waits until `value` of a metric on `admin` equals `want`; panics with `what` after `limit`.
pub async fn wait_metric(
    admin: SocketAddr,
    name: &str,
    labels: &[(&str, &str)],
    want: f64,
    limit: Duration,
    what: &str,
) -> Duration {
    let t = wait_for(limit, || async {
        current(admin, name, labels).await == want
    })
    .await;
    match t {
        Some(t) => t,
        None => panic!(
            "{what}: {name}{labels:?} is {} on {admin}, expected {want} within {limit:?}",
            current(admin, name, labels).await
        ),
    }
}

// ---------------------------------------------------------------------------------------------
// Partners and targets

/// Connects to `addr` from `source` (port 0).
pub async fn connect_from(source: [u8; 4], addr: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::from((source, 0)))?;
    tokio::time::timeout(EXCHANGE_LIMIT, socket.connect(addr))
        .await
        .map_err(|_| std::io::Error::other("connect timed out"))?
}

/// Deterministic bytes for a transfer: `len` bytes from `seed` (xorshift).
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Sends `data` on `stream`, half-closes, reads until EOF; returns what came back.
pub async fn echo_exchange(mut stream: TcpStream, data: &[u8]) -> std::io::Result<Vec<u8>> {
    let (mut r, mut w) = stream.split();
    let write = async {
        w.write_all(data).await?;
        w.shutdown().await
    };
    let mut back = Vec::with_capacity(data.len());
    let read = r.read_to_end(&mut back);
    let (wr, rd) =
        tokio::time::timeout(Duration::from_secs(60), async { tokio::join!(write, read) })
            .await
            .map_err(|_| std::io::Error::other("echo exchange timed out"))?;
    wr?;
    rd?;
    Ok(back)
}

/// One echo session from `source` through `public` with `data`; returns the partner address
/// it used. Panics if the bytes do not come back unchanged.
pub async fn echo_session(source: [u8; 4], public: SocketAddr, data: &[u8]) -> SocketAddr {
    let stream = connect_from(source, public)
        .await
        .expect("connect to the public port");
    let local = stream.local_addr().expect("local addr");
    let back = echo_exchange(stream, data).await.expect("echo session");
    assert_eq!(back.len(), data.len(), "echoed length through {public}");
    assert!(back == data, "echoed bytes differ through {public}");
    local
}

/// A session kept open: a partner connected through the relay to a tagged echo target.
pub struct OpenSession {
    pub stream: TcpStream,
    /// The tag byte of the target that answered.
    pub tag: u8,
}

impl OpenSession {
    /// Connects to `public` and reads the target's tag byte.
    pub async fn open(public: SocketAddr) -> std::io::Result<Self> {
        let mut stream = tokio::time::timeout(EXCHANGE_LIMIT, TcpStream::connect(public))
            .await
            .map_err(|_| std::io::Error::other("connect timed out"))??;
        let mut tag = [0u8; 1];
        tokio::time::timeout(EXCHANGE_LIMIT, stream.read_exact(&mut tag))
            .await
            .map_err(|_| std::io::Error::other("no tag byte in time"))??;
        Ok(Self {
            stream,
            tag: tag[0],
        })
    }

    /// Sends `data` and reads the same number of bytes back; they must be equal.
    pub async fn round_trip(&mut self, data: &[u8]) -> std::io::Result<()> {
        let exchange = async {
            self.stream.write_all(data).await?;
            let mut back = vec![0u8; data.len()];
            self.stream.read_exact(&mut back).await?;
            Ok::<_, std::io::Error>(back)
        };
        let back = tokio::time::timeout(EXCHANGE_LIMIT, exchange)
            .await
            .map_err(|_| std::io::Error::other("round trip timed out"))??;
        if back != data {
            return Err(std::io::Error::other("echoed bytes differ"));
        }
        Ok(())
    }

    /// Half-closes and expects a clean EOF with nothing more.
    pub async fn finish(mut self) -> std::io::Result<()> {
        self.stream.shutdown().await?;
        let mut rest = Vec::new();
        tokio::time::timeout(EXCHANGE_LIMIT, self.stream.read_to_end(&mut rest))
            .await
            .map_err(|_| std::io::Error::other("no EOF in time"))??;
        if !rest.is_empty() {
            return Err(std::io::Error::other(format!(
                "{} unexpected bytes",
                rest.len()
            )));
        }
        Ok(())
    }
}

/// A public address on `ip`:`port`.
pub fn addr(ip: [u8; 4], port: u16) -> SocketAddr {
    SocketAddr::from((IpAddr::from(ip), port))
}
