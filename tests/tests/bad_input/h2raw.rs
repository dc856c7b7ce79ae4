//! Raw HTTP/2 frames over any byte stream, for abuse that a well-behaved HTTP/2 library will not
//! send: floods of resets, CONTINUATION without end, empty DATA frames. A frame is a 9-byte
//! header (length 24 bits, type 8, flags 8, stream id 31) and its payload (RFC 9113 §4.1).
//!
//! [`RawConn`] writes what the test queues and, in the background, reads and records what the
//! peer sends (answering SETTINGS and PING as a live peer would) until the peer closes.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, watch};

/// The client connection preface.
pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

pub const DATA: u8 = 0x0;
pub const HEADERS: u8 = 0x1;
pub const RST_STREAM: u8 = 0x3;
pub const SETTINGS: u8 = 0x4;
pub const PING: u8 = 0x6;
pub const GOAWAY: u8 = 0x7;
pub const CONTINUATION: u8 = 0x9;

pub const END_STREAM: u8 = 0x1;
pub const ACK: u8 = 0x1;
pub const END_HEADERS: u8 = 0x4;

/// Error code CANCEL.
pub const CANCEL: u32 = 0x8;
/// Error code ENHANCE_YOUR_CALM.
pub const ENHANCE_YOUR_CALM: u32 = 0xb;

/// HPACK: `:status: 200` from the static table (index 8).
pub const STATUS_200: &[u8] = &[0x88];

/// One frame.
pub fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    assert!(len < 1 << 24, "frame payload too long");
    let mut out = Vec::with_capacity(9 + payload.len());
    out.extend_from_slice(&len.to_be_bytes()[1..]);
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// RST_STREAM with `code`.
pub fn rst(stream: u32, code: u32) -> Vec<u8> {
    frame(RST_STREAM, 0, stream, &code.to_be_bytes())
}

/// An HPACK integer with an `n`-bit prefix whose upper bits are `first` (RFC 7541 §5.1).
fn hpack_int(out: &mut Vec<u8>, first: u8, n: u32, value: usize) {
    let max = (1usize << n) - 1;
    if value < max {
        out.push(first | value as u8);
        return;
    }
    out.push(first | max as u8);
    let mut rest = value - max;
    while rest >= 128 {
        out.push((rest % 128) as u8 | 0x80);
        rest /= 128;
    }
    out.push(rest as u8);
}

/// An HPACK string literal without Huffman coding.
fn hpack_str(out: &mut Vec<u8>, s: &[u8]) {
    hpack_int(out, 0, 7, s.len());
    out.extend_from_slice(s);
}

/// A literal header field without indexing whose name is static table entry `index`.
pub fn indexed_name(index: usize, value: &str) -> Vec<u8> {
    let mut out = Vec::new();
    hpack_int(&mut out, 0, 4, index);
    hpack_str(&mut out, value.as_bytes());
    out
}

/// A literal header field without indexing, new name.
pub fn literal(name: &str, value: &[u8]) -> Vec<u8> {
    let mut out = vec![0];
    hpack_str(&mut out, name.as_bytes());
    hpack_str(&mut out, value);
    out
}

/// The header block of `CONNECT authority` with extra headers.
pub fn connect_block(authority: &str, extra: &[(&str, &str)]) -> Vec<u8> {
    // Static table: 1 is :authority, 2 is :method.
    let mut out = indexed_name(2, "CONNECT");
    out.extend(indexed_name(1, authority));
    for (name, value) in extra {
        out.extend(literal(name, value.as_bytes()));
    }
    out
}

/// What the peer sent, as recorded by the reader.
#[derive(Debug, Clone, Default)]
pub struct Stats {
    /// Frames received by type (index = type, 10 and above counted at 10).
    pub frames: [usize; 11],
    /// RST_STREAM received: (stream, error code).
    pub resets: Vec<(u32, u32)>,
    /// Streams on which the peer sent HEADERS.
    pub headers: Vec<u32>,
    /// The GOAWAY received, if any: (last stream id, error code, debug data).
    pub goaway: Option<(u32, u32, String)>,
    /// When the connection ended, and why (EOF, reset, bad frame).
    pub ended: Option<(Instant, String)>,
    /// Whether our writes failed (the peer stopped reading or closed).
    pub write_failed: bool,
}

impl Stats {
    pub fn count(&self, kind: u8) -> usize {
        self.frames[usize::from(kind).min(10)]
    }

    /// A one-line summary for test output.
    pub fn summary(&self) -> String {
        format!(
            "HEADERS {} DATA {} RST_STREAM {} (codes {:?}) GOAWAY {:?} SETTINGS {} PING {}; ended: {:?}; our writes failed: {}",
            self.count(HEADERS),
            self.count(DATA),
            self.count(RST_STREAM),
            code_histogram(&self.resets),
            self.goaway.as_ref().map(|(last, code, debug)| format!(
                "last_stream={last} code={} debug={debug:?}",
                code_name(*code)
            )),
            self.count(SETTINGS),
            self.count(PING),
            self.ended.as_ref().map(|(_, why)| why.clone()),
            self.write_failed,
        )
    }
}

fn code_histogram(resets: &[(u32, u32)]) -> Vec<(String, usize)> {
    let mut out: Vec<(String, usize)> = Vec::new();
    for (_, code) in resets {
        let name = code_name(*code);
        match out.iter_mut().find(|(n, _)| *n == name) {
            Some((_, n)) => *n += 1,
            None => out.push((name, 1)),
        }
    }
    out
}

/// The name of an HTTP/2 error code.
pub fn code_name(code: u32) -> String {
    match code {
        0x0 => "NO_ERROR".into(),
        0x1 => "PROTOCOL_ERROR".into(),
        0x2 => "INTERNAL_ERROR".into(),
        0x3 => "FLOW_CONTROL_ERROR".into(),
        0x5 => "STREAM_CLOSED".into(),
        0x6 => "FRAME_SIZE_ERROR".into(),
        0x7 => "REFUSED_STREAM".into(),
        0x8 => "CANCEL".into(),
        0x9 => "COMPRESSION_ERROR".into(),
        0xb => "ENHANCE_YOUR_CALM".into(),
        other => format!("0x{other:x}"),
    }
}

/// Which end of the connection we are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// We send the preface.
    Client,
    /// We read the peer's preface.
    Server,
}

/// A raw HTTP/2 connection: queue bytes with [`RawConn::send`]; the peer's frames are recorded.
pub struct RawConn {
    tx: mpsc::Sender<Vec<u8>>,
    stats: Arc<Mutex<Stats>>,
    ended: watch::Receiver<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for RawConn {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl RawConn {
    /// Starts the writer and the reader on `io`; sends the preface (client) and an empty
    /// SETTINGS frame.
    pub fn start<S>(io: S, role: Role) -> RawConn
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (mut reader, mut writer) = tokio::io::split(io);
        let (tx, mut rx) = mpsc::channel::<Vec<u8>>(64);
        let stats = Arc::new(Mutex::new(Stats::default()));
        let (ended_tx, ended) = watch::channel(false);
        let ended_tx = Arc::new(ended_tx);

        let mut first = Vec::new();
        if role == Role::Client {
            first.extend_from_slice(PREFACE);
        }
        first.extend(frame(SETTINGS, 0, 0, &[]));
        tx.try_send(first).expect("fresh channel");

        let w_stats = stats.clone();
        let writer_task = tokio::spawn(async move {
            while let Some(bytes) = rx.recv().await {
                if writer.write_all(&bytes).await.is_err() || writer.flush().await.is_err() {
                    w_stats.lock().unwrap().write_failed = true;
                    return;
                }
            }
        });

        let r_stats = stats.clone();
        let answers = tx.clone();
        let reader_task = tokio::spawn(async move {
            let why = read_frames(&mut reader, role, &r_stats, &answers).await;
            r_stats.lock().unwrap().ended = Some((Instant::now(), why));
            let _ = ended_tx.send(true);
        });

        RawConn {
            tx,
            stats,
            ended,
            tasks: vec![writer_task, reader_task],
        }
    }

    /// Queues bytes; false once the writer has stopped, or when the peer has not read what
    /// was queued before within 20 s (it stopped reading without closing).
    pub async fn send(&self, bytes: Vec<u8>) -> bool {
        let queued = tokio::time::timeout(Duration::from_secs(20), self.tx.send(bytes)).await;
        matches!(queued, Ok(Ok(()))) && !self.stats.lock().unwrap().write_failed
    }

    /// Whether the peer has closed the connection (or it failed).
    pub fn is_ended(&self) -> bool {
        *self.ended.borrow()
    }

    pub fn stats(&self) -> Stats {
        self.stats.lock().unwrap().clone()
    }

    /// Waits until the peer closes the connection; `false` if it is still open after `limit`.
    pub async fn wait_end(&self, limit: Duration) -> bool {
        let mut ended = self.ended.clone();
        tokio::time::timeout(limit, ended.wait_for(|e| *e))
            .await
            .is_ok()
    }

    /// Waits until `check` holds for the stats; `false` after `limit`.
    pub async fn wait_until(&self, limit: Duration, check: impl Fn(&Stats) -> bool) -> bool {
        let start = Instant::now();
        while start.elapsed() < limit {
            if check(&self.stats()) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        false
    }
}

/// Reads frames until the connection ends; returns why it ended.
async fn read_frames<R: AsyncRead + Unpin>(
    reader: &mut R,
    role: Role,
    stats: &Mutex<Stats>,
    answers: &mpsc::Sender<Vec<u8>>,
) -> String {
    if role == Role::Server {
        let mut preface = [0u8; 24];
        if let Err(e) = reader.read_exact(&mut preface).await {
            return format!("no client preface: {e}");
        }
        if preface != PREFACE {
            return "bad client preface".into();
        }
    }
    loop {
        let mut head = [0u8; 9];
        if let Err(e) = reader.read_exact(&mut head).await {
            return if e.kind() == std::io::ErrorKind::UnexpectedEof {
                "EOF".into()
            } else {
                format!("read error: {e}")
            };
        }
        let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        let kind = head[3];
        let flags = head[4];
        let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
        if len > 16 << 20 {
            return format!("frame of {len} bytes");
        }
        let mut payload = vec![0u8; len];
        if let Err(e) = reader.read_exact(&mut payload).await {
            return format!("read error in a frame: {e}");
        }
        let answer = {
            let mut s = stats.lock().unwrap();
            s.frames[usize::from(kind).min(10)] += 1;
            match kind {
                HEADERS => {
                    s.headers.push(stream);
                    None
                }
                RST_STREAM if len == 4 => {
                    let code = u32::from_be_bytes(payload[..4].try_into().unwrap());
                    s.resets.push((stream, code));
                    None
                }
                GOAWAY if len >= 8 => {
                    let last = u32::from_be_bytes(payload[..4].try_into().unwrap()) & 0x7fff_ffff;
                    let code = u32::from_be_bytes(payload[4..8].try_into().unwrap());
                    let debug = String::from_utf8_lossy(&payload[8..]).into_owned();
                    s.goaway = Some((last, code, debug));
                    None
                }
                SETTINGS if flags & ACK == 0 => Some(frame(SETTINGS, ACK, 0, &[])),
                PING if flags & ACK == 0 => Some(frame(PING, ACK, 0, &payload)),
                _ => None,
            }
        };
        if let Some(answer) = answer {
            // The writer may be busy with a flood; an answer that cannot be queued is dropped.
            let _ = answers.try_send(answer);
        }
    }
}
