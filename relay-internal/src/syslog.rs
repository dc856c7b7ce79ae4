//! Audit records to a syslog collector (`[audit] syslog`): RFC 5424 messages over TCP or TLS,
//! octet-counted. The tap ([`relay_tunnel::audit`]) queues each record without blocking its
//! session; the sender task here takes them from the queue, keeps one connection to the
//! collector, reconnects with backoff, and at shutdown sends what it can within
//! [`FLUSH_LIMIT`]. The log on stderr is unchanged.

mod config;
pub mod format;

use std::collections::VecDeque;
use std::io;
use std::time::Duration;

use relay_tunnel::audit::{self, AuditRecord};
use relay_tunnel::backoff::Backoff;
use relay_tunnel::metrics as m;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_rustls::TlsConnector;
use tokio_util::sync::CancellationToken;

pub use config::{RawAudit, SyslogConfig, SyslogTls, check};
use format::Origin;

/// Time to resolve the collector's name and connect.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Time for the TLS handshake with the collector.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Time one batch of records may take to be written; a collector slower than that is
/// disconnected, and the records not written go on the next connection.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Time the sender gets at shutdown to send the records still queued.
pub const FLUSH_LIMIT: Duration = Duration::from_secs(2);
/// First reconnect delay (then doubling, with full jitter).
const RECONNECT_BASE: Duration = Duration::from_millis(200);
/// Longest reconnect delay: a collector that is back gets records within this.
const RECONNECT_CAP: Duration = Duration::from_secs(5);
/// Unacknowledged data older than this breaks the connection (`TCP_USER_TIMEOUT`), and an idle
/// connection is probed after this: a collector gone without a word is noticed in a minute,
/// not after TCP's fifteen of retransmissions.
const DEAD_PEER: Duration = Duration::from_secs(30);
/// The most bytes written in one batch.
const BATCH_BYTES: usize = 64 * 1024;

/// Why a connection to the collector failed or ended.
#[derive(Debug, thiserror::Error)]
pub enum SyslogError {
    /// TCP connect or name resolution failed.
    #[error("cannot connect to the collector: {0}")]
    Connect(io::Error),
    /// TCP connect took longer than [`CONNECT_TIMEOUT`].
    #[error("no connection to the collector within {0:?}")]
    ConnectTimeout(Duration),
    /// The TLS handshake failed (certificate, name, protocol).
    #[error("TLS handshake with the collector failed: {0}")]
    Handshake(io::Error),
    /// The TLS handshake took longer than [`HANDSHAKE_TIMEOUT`].
    #[error("no TLS handshake with the collector within {0:?}")]
    HandshakeTimeout(Duration),
    /// Writing failed: the collector went away.
    #[error("writing to the collector failed: {0}")]
    Write(io::Error),
    /// Writing a batch took longer than [`WRITE_TIMEOUT`]: the collector does not read.
    #[error("the collector took more than {0:?} to take a batch of records")]
    WriteTimeout(Duration),
    /// The collector closed the connection.
    #[error("the collector closed the connection")]
    Closed,
    /// The connection failed while idle (reset, keepalive or user timeout).
    #[error("the connection to the collector failed: {0}")]
    Broken(io::Error),
}

/// The sender task and what stops it.
pub struct Sender {
    task: JoinHandle<()>,
    stop: CancellationToken,
}

/// Opens the audit queue and starts the task that sends it to the collector of `config`.
pub fn start(config: &SyslogConfig) -> Sender {
    let records = audit::open(config.queue);
    let stop = CancellationToken::new();
    tracing::info!(collector = %config.url, queue = config.queue, "audit records go to syslog");
    Sender {
        task: tokio::spawn(run(config.clone(), records, stop.clone())),
        stop,
    }
}

impl Sender {
    /// Closes the queue and gives the task [`FLUSH_LIMIT`] to send the records in it; those
    /// it could not send are counted as dropped.
    pub async fn finish(self) {
        audit::close();
        let mut task = self.task;
        if tokio::time::timeout(FLUSH_LIMIT, &mut task).await.is_err() {
            self.stop.cancel();
            let _ = task.await;
        }
    }
}

/// A connection to the collector, plain or TLS.
trait Conn: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Conn for T {}

/// Sends `records` to the collector of `config` until the queue is closed and empty, or
/// `stop` is cancelled.
pub async fn run(
    config: SyslogConfig,
    mut records: mpsc::Receiver<AuditRecord>,
    stop: CancellationToken,
) {
    let origin = Origin::here(config.facility);
    let connected = metrics::gauge!(m::AUDIT_CONNECTED);
    let mut backoff = Backoff::new(RECONNECT_BASE, RECONNECT_CAP);
    let mut pending = Pending::default();
    let mut last_failure: Option<String> = None;
    loop {
        if pending.frames.is_empty() && records.is_closed() && records.is_empty() {
            // Shutting down with nothing left to send: no need to reach the collector.
            return;
        }
        let attempt = tokio::select! {
            c = connect(&config) => c,
            _ = stop.cancelled() => break,
        };
        let error = match attempt {
            Ok(mut conn) => {
                backoff.reset();
                connected.set(1.0);
                if last_failure.take().is_some() {
                    tracing::info!(collector = %config.url, "syslog collector connected again");
                } else {
                    tracing::info!(collector = %config.url, "syslog collector connected");
                }
                let ended = serve(&mut *conn, &mut records, &mut pending, &origin, &stop).await;
                connected.set(0.0);
                match ended {
                    Ok(()) => return close(conn).await,
                    Err(None) => break,
                    Err(Some(e)) => e,
                }
            }
            Err(e) => e,
        };
        let text = error.to_string();
        if last_failure.as_deref() != Some(text.as_str()) {
            tracing::warn!(collector = %config.url, error = %text, "audit records cannot reach the syslog collector; retrying with backoff");
            last_failure = Some(text);
        } else {
            tracing::debug!(collector = %config.url, error = %text, "syslog collector still unreachable");
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff.next_delay()) => {}
            _ = stop.cancelled() => break,
        }
    }
    // Stopped at the flush deadline: what is left is lost.
    let lost = pending.frames.len() + records.len();
    if lost > 0 {
        metrics::counter!(m::AUDIT_DROPPED).increment(lost as u64);
        tracing::warn!(
            collector = %config.url,
            records = lost,
            "audit records not sent to the syslog collector before the shutdown deadline"
        );
    }
}

/// TCP, then TLS if configured, each step within its timeout.
async fn connect(config: &SyslogConfig) -> Result<Box<dyn Conn>, SyslogError> {
    let tcp = tokio::time::timeout(
        CONNECT_TIMEOUT,
        TcpStream::connect((config.host.as_str(), config.port)),
    )
    .await
    .map_err(|_| SyslogError::ConnectTimeout(CONNECT_TIMEOUT))?
    .map_err(SyslogError::Connect)?;
    let socket = socket2::SockRef::from(&tcp);
    let _ = tcp.set_nodelay(true);
    let _ = socket.set_tcp_user_timeout(Some(DEAD_PEER));
    let _ = socket.set_tcp_keepalive(
        &socket2::TcpKeepalive::new()
            .with_time(DEAD_PEER)
            .with_interval(DEAD_PEER / 3)
            .with_retries(3),
    );
    let Some(tls) = &config.tls else {
        return Ok(Box::new(tcp));
    };
    let handshake = TlsConnector::from(tls.config.clone()).connect(tls.server_name.clone(), tcp);
    let stream = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake)
        .await
        .map_err(|_| SyslogError::HandshakeTimeout(HANDSHAKE_TIMEOUT))?
        .map_err(SyslogError::Handshake)?;
    Ok(Box::new(stream))
}

/// Records taken from the queue and framed, not yet written.
#[derive(Default)]
struct Pending {
    frames: VecDeque<Vec<u8>>,
}

/// Writes records to `conn` as they come. `Ok` when the queue is closed and every record is
/// written; `Err(None)` when stopped; `Err(Some(e))` when the connection failed (the records
/// not written stay in `pending`).
async fn serve(
    conn: &mut dyn Conn,
    records: &mut mpsc::Receiver<AuditRecord>,
    pending: &mut Pending,
    origin: &Origin,
    stop: &CancellationToken,
) -> Result<(), Option<SyslogError>> {
    let sent = metrics::counter!(m::AUDIT_SENT);
    let mut batch = Vec::with_capacity(BATCH_BYTES);
    let mut scratch = [0u8; 512];
    loop {
        if pending.frames.is_empty() {
            // Collectors send nothing: a read that ends is the collector gone, noticed now
            // rather than by losing the next record to a dead connection.
            tokio::select! {
                _ = stop.cancelled() => return Err(None),
                record = records.recv() => match record {
                    Some(r) => pending.push(&r, origin),
                    None => return Ok(()),
                },
                read = conn.read(&mut scratch) => match read {
                    Ok(0) => return Err(Some(SyslogError::Closed)),
                    Ok(_) => continue,
                    Err(e) => return Err(Some(SyslogError::Broken(e))),
                },
            }
        }
        while pending.bytes() < BATCH_BYTES {
            match records.try_recv() {
                Ok(r) => pending.push(&r, origin),
                Err(_) => break,
            }
        }
        // One write for as many whole records as fit in a batch.
        batch.clear();
        let mut ends = Vec::new();
        for frame in &pending.frames {
            if !batch.is_empty() && batch.len() + frame.len() > BATCH_BYTES {
                break;
            }
            batch.extend_from_slice(frame);
            ends.push(batch.len());
        }
        let mut written = 0;
        let result = tokio::select! {
            _ = stop.cancelled() => Err(None),
            r = tokio::time::timeout(WRITE_TIMEOUT, write(conn, &batch, &mut written)) => match r {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(Some(SyslogError::Write(e))),
                Err(_) => Err(Some(SyslogError::WriteTimeout(WRITE_TIMEOUT))),
            },
        };
        // Records the connection took whole are sent; the rest go again on the next one.
        let done = ends.iter().take_while(|end| **end <= written).count();
        pending.frames.drain(..done);
        sent.increment(done as u64);
        result?;
    }
}

impl Pending {
    fn push(&mut self, record: &AuditRecord, origin: &Origin) {
        let mut frame = Vec::with_capacity(512);
        format::frame(record, origin, &mut frame);
        self.frames.push_back(frame);
    }

    fn bytes(&self) -> usize {
        self.frames.iter().map(Vec::len).sum()
    }
}

/// Writes `buf` and flushes, counting in `written` the bytes the connection took.
async fn write(conn: &mut dyn Conn, buf: &[u8], written: &mut usize) -> io::Result<()> {
    while *written < buf.len() {
        match conn.write(&buf[*written..]).await? {
            0 => return Err(io::ErrorKind::WriteZero.into()),
            n => *written += n,
        }
    }
    conn.flush().await
}

/// Ends the connection politely (TLS `close_notify`, FIN), within [`WRITE_TIMEOUT`].
async fn close(mut conn: Box<dyn Conn>) {
    let _ = tokio::time::timeout(WRITE_TIMEOUT, conn.shutdown()).await;
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use tokio::io::AsyncBufReadExt;
    use tokio::net::TcpListener;

    use super::*;

    fn config(port: u16) -> SyslogConfig {
        let raw = RawAudit::new(&format!("tcp://127.0.0.1:{port}"));
        let mut err = relay_tunnel::config::ConfigError::default();
        check(&raw, &mut err, std::path::Path::new(".")).expect("valid")
    }

    fn record(n: u32) -> AuditRecord {
        AuditRecord {
            time: SystemTime::now(),
            sequence: n,
            message: "session".into(),
            fields: vec![("session", format!("s{n}")), ("outcome", "ok".into())],
        }
    }

    /// Reads octet-counted frames from `stream` until `n` arrived.
    async fn frames(stream: TcpStream, n: usize) -> Vec<String> {
        let mut reader = tokio::io::BufReader::new(stream);
        let mut out = Vec::new();
        while out.len() < n {
            let mut len = Vec::new();
            reader.read_until(b' ', &mut len).await.expect("length");
            let len: usize = std::str::from_utf8(&len[..len.len() - 1])
                .expect("ascii")
                .parse()
                .expect("a length");
            let mut msg = vec![0u8; len];
            reader.read_exact(&mut msg).await.expect("message");
            out.push(String::from_utf8(msg).expect("utf-8"));
        }
        out
    }

    const LIMIT: Duration = Duration::from_secs(10);

    #[tokio::test]
    async fn sends_reconnects_and_flushes() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (tx, rx) = mpsc::channel(16);
        let stop = CancellationToken::new();
        let task = tokio::spawn(run(config(port), rx, stop.clone()));
        tx.send(record(1)).await.unwrap();
        tx.send(record(2)).await.unwrap();
        let (first, _) = tokio::time::timeout(LIMIT, listener.accept())
            .await
            .expect("a connection")
            .unwrap();
        let got = tokio::time::timeout(LIMIT, frames(first, 2))
            .await
            .expect("two records");
        assert!(got[0].contains("[meta sequenceId=\"1\"][relay@32473 session=\"s1\""));
        assert!(got[1].contains("session=\"s2\""));
        // The collector goes away (the stream was dropped): the sender notices and comes back.
        let (second, _) = tokio::time::timeout(LIMIT, listener.accept())
            .await
            .expect("a second connection")
            .unwrap();
        tx.send(record(3)).await.unwrap();
        drop(tx);
        let got = tokio::time::timeout(LIMIT, frames(second, 1))
            .await
            .expect("the third record");
        assert!(got[0].contains("session=\"s3\""), "{got:?}");
        // The queue closed and empty: the task ends on its own.
        tokio::time::timeout(LIMIT, task)
            .await
            .expect("the sender ends")
            .unwrap();
    }

    #[tokio::test]
    async fn stopped_without_a_collector_counts_what_is_left() {
        let port = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let (tx, rx) = mpsc::channel(16);
        let stop = CancellationToken::new();
        let task = tokio::spawn(run(config(port), rx, stop.clone()));
        tx.send(record(1)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        stop.cancel();
        tokio::time::timeout(LIMIT, task)
            .await
            .expect("the sender ends when stopped")
            .unwrap();
    }
}
