//! Bad input: what strangers, rogue partners, a rogue agent and a rogue DMZ can send, and what
//! the relay must do about it — close, count, log, never crash or leak, and leave every other
//! session alone. Each test runs a legitimate session alongside and checks it still works.
//!
//! The DMZ (and in some tests the agent) runs as a real process, so its log, metrics, file
//! descriptors, threads and memory are its own: run `cargo build --workspace` first.
//!
//! Tests whose acceptance criterion is a time bound take the [`exclusive`] lock, so the other
//! tests of this file do not run meanwhile on the 2-core machine.

#[path = "bad_input/certs.rs"]
mod certs;
#[path = "bad_input/h2raw.rs"]
mod h2raw;
#[path = "bad_input/partner.rs"]
mod partner;
#[path = "bad_input/resources.rs"]
mod resources;
#[path = "bad_input/rogue_agent.rs"]
mod rogue_agent;
#[path = "bad_input/rogue_dmz.rs"]
mod rogue_dmz;
#[path = "bad_input/tunnel_port.rs"]
mod tunnel_port;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use relay_e2e::*;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};
use tokio::task::JoinHandle;

/// Generous bound on things that happen at once on an idle machine.
const LIMIT: Duration = Duration::from_secs(20);

static SERIAL: RwLock<()> = RwLock::const_new(());

/// Held by a test whose assertion is a time bound: no other test of this file runs meanwhile.
async fn exclusive() -> RwLockWriteGuard<'static, ()> {
    SERIAL.write().await
}

/// Held by every other test: they run in parallel with each other, not with an exclusive one.
async fn shared() -> RwLockReadGuard<'static, ()> {
    SERIAL.read().await
}

fn local(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// A child process whose stderr is collected line by line.
struct Logged {
    child: ChildGuard,
    log: Arc<Mutex<String>>,
    name: &'static str,
}

impl Logged {
    /// Starts `binary --config PATH` with `RUST_LOG=info`, no colours, stderr collected.
    fn spawn(name: &'static str, config: &Path) -> Logged {
        let mut child = Command::new(bin(name))
            .arg("--config")
            .arg(config)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn binary");
        let stderr = child.stderr.take().expect("stderr piped");
        let log = Arc::new(Mutex::new(String::new()));
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let mut text = sink.lock().unwrap();
                text.push_str(&line);
                text.push('\n');
            }
        });
        Logged {
            child: ChildGuard { child },
            log,
            name,
        }
    }

    fn pid(&self) -> u32 {
        self.child.pid()
    }

    fn text(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Lines holding every one of `needles`.
    fn count_lines(&self, needles: &[&str]) -> usize {
        self.text()
            .lines()
            .filter(|l| needles.iter().all(|n| l.contains(n)))
            .count()
    }

    /// Waits until `n` lines hold every one of `needles`; returns the last, or panics.
    async fn wait_count(&self, needles: &[&str], n: usize, limit: Duration) -> String {
        let start = Instant::now();
        loop {
            let text = self.text();
            let lines: Vec<&str> = text
                .lines()
                .filter(|l| needles.iter().all(|x| l.contains(x)))
                .collect();
            if lines.len() >= n {
                return lines[lines.len() - 1].to_owned();
            }
            assert!(
                start.elapsed() < limit,
                "{} logged {} line(s) with {needles:?}, expected {n}; log:\n{}",
                self.name,
                lines.len(),
                tail(&text, 60)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits for a log line holding every one of `needles`; returns it, or panics with the log.
    async fn wait_line(&self, needles: &[&str], limit: Duration) -> String {
        let start = Instant::now();
        loop {
            if let Some(line) = self
                .text()
                .lines()
                .find(|l| needles.iter().all(|n| l.contains(n)))
            {
                return line.to_owned();
            }
            if start.elapsed() > limit {
                panic!(
                    "{} (pid {}) logged no line with {needles:?} within {limit:?}; log:\n{}",
                    self.name,
                    self.pid(),
                    tail(&self.text(), 60)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// The last `n` lines of `text`.
fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// A DMZ node process and its options.
struct Dmz {
    proc: Logged,
    opts: DmzOptions,
}

impl Dmz {
    async fn start(pki: &Pki, opts: DmzOptions) -> Dmz {
        let text = opts.toml(pki);
        Dmz::start_with(pki, opts, text).await
    }

    /// Starts a DMZ from `text`, a config made from `opts` and then edited.
    async fn start_with(pki: &Pki, opts: DmzOptions, text: String) -> Dmz {
        let path = pki.write(&format!("dmz-{}.toml", opts.tunnel.port()), &text);
        let proc = Logged::spawn("relay-dmz", &path);
        let admin = opts.admin;
        let up = wait_for(LIMIT, || async move {
            matches!(http_get(admin, "/livez").await, Ok((200, _)))
        })
        .await;
        assert!(up.is_some(), "DMZ did not come up; log:\n{}", proc.text());
        Dmz { proc, opts }
    }

    async fn metrics(&self) -> String {
        let (status, body) = http_get(self.opts.admin, "/metrics")
            .await
            .expect("scrape /metrics");
        assert_eq!(status, 200);
        body
    }

    /// A metric sample, 0 if absent.
    async fn metric(&self, name: &str, labels: &[&str]) -> f64 {
        metric(&self.metrics().await, name, labels).unwrap_or(0.0)
    }

    /// `relay_rejections_total{reason=REASON}`, 0 if absent.
    async fn rejections(&self, reason: &str) -> f64 {
        self.metric("relay_rejections_total", &[&format!("reason=\"{reason}\"")])
            .await
    }

    /// Waits until the rejection counter for `reason` reaches `at_least`; returns it.
    async fn wait_rejections(&self, reason: &str, at_least: f64) -> f64 {
        let start = Instant::now();
        loop {
            let n = self.rejections(reason).await;
            if n >= at_least {
                return n;
            }
            assert!(
                start.elapsed() < LIMIT,
                "relay_rejections_total{{reason=\"{reason}\"}} is {n}, expected >= {at_least}; log:\n{}",
                tail(&self.proc.text(), 60)
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn pid(&self) -> u32 {
        self.proc.pid()
    }
}

/// An echo target that counts the connections it accepted.
struct CountingEcho {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl CountingEcho {
    async fn start() -> CountingEcho {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind echo");
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                    let _ = w.shutdown().await;
                });
            }
        });
        CountingEcho {
            addr,
            accepted,
            task,
        }
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for CountingEcho {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Connects to `public`, sends `msg`, reads the echo; returns the time it took.
async fn roundtrip(public: SocketAddr, msg: &[u8]) -> Result<Duration, String> {
    let start = Instant::now();
    let mut s = tokio::time::timeout(LIMIT, TcpStream::connect(public))
        .await
        .map_err(|_| format!("connect to {public} timed out"))?
        .map_err(|e| format!("connect to {public}: {e}"))?;
    echo_on(&mut s, msg).await?;
    Ok(start.elapsed())
}

/// Sends `msg` on an open session and reads it back.
async fn echo_on(s: &mut TcpStream, msg: &[u8]) -> Result<(), String> {
    s.write_all(msg).await.map_err(|e| format!("write: {e}"))?;
    let mut buf = vec![0u8; msg.len()];
    match tokio::time::timeout(LIMIT, s.read_exact(&mut buf)).await {
        Ok(Ok(_)) if buf == msg => Ok(()),
        Ok(Ok(_)) => Err(format!("echo differs: {:?}", String::from_utf8_lossy(&buf))),
        Ok(Err(e)) => Err(format!("read: {e}")),
        Err(_) => Err("no echo within the limit".into()),
    }
}

/// Asserts that a legitimate session through `public` works.
async fn legit_works(public: SocketAddr, when: &str) -> Duration {
    roundtrip(public, format!("legit {when}").as_bytes())
        .await
        .unwrap_or_else(|e| panic!("legitimate session {when}: {e}"))
}

/// Waits until the peer closes `s` (EOF or reset); returns how long that took, or `None` if
/// the peer sent data or kept it open past `limit`.
async fn closed_within(s: &mut TcpStream, limit: Duration) -> Option<Duration> {
    let start = Instant::now();
    let mut buf = [0u8; 256];
    match tokio::time::timeout(limit, s.read(&mut buf)).await {
        Ok(Ok(0)) | Ok(Err(_)) => Some(start.elapsed()),
        Ok(Ok(_)) | Err(_) => None,
    }
}

/// A legitimate agent `engine-1` in-process with an echo service on its own port.
struct Legit {
    _echo: CountingEcho,
    agent: Option<InProcess>,
    public: SocketAddr,
}

impl Legit {
    async fn start(pki: &Pki, tunnel: SocketAddr) -> Legit {
        Legit::start_as(pki, tunnel, "engine-1").await
    }

    async fn start_as(pki: &Pki, tunnel: SocketAddr, identity: &str) -> Legit {
        let echo = CountingEcho::start().await;
        let port = free_port();
        let name = format!("legit-{identity}");
        let mut opts = AgentOptions::new(tunnel, vec![Service::new(&name, port, echo.addr)]);
        opts.identity = identity.into();
        opts.connections = 1;
        let agent = start_agent(pki, &opts).await;
        let public = local(port);
        wait_open(public, LIMIT).await;
        legit_works(public, "at start").await;
        Legit {
            _echo: echo,
            agent: Some(agent),
            public,
        }
    }

    async fn check(&self, when: &str) -> Duration {
        legit_works(self.public, when).await
    }
}

impl Drop for Legit {
    fn drop(&mut self) {
        drop(self.agent.take());
    }
}

fn read_certs(path: &Path) -> Vec<CertificateDer<'static>> {
    CertificateDer::pem_file_iter(path)
        .expect("read certs")
        .collect::<Result<_, _>>()
        .expect("parse certs")
}

fn read_key(path: &Path) -> PrivateKeyDer<'static> {
    PrivateKeyDer::from_pem_file(path).expect("read key")
}

fn roots(pki: &Pki) -> rustls::RootCertStore {
    let mut roots = rustls::RootCertStore::empty();
    for c in read_certs(&pki.path("ca.pem")) {
        roots.add(c).expect("add root");
    }
    roots
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// A TLS 1.3 client config presenting `identity`'s certificate with `alpn`.
fn client_config(pki: &Pki, identity: &str, alpn: &[u8]) -> Arc<rustls::ClientConfig> {
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("versions")
        .with_root_certificates(roots(pki))
        .with_client_auth_cert(
            read_certs(&pki.path(&format!("{identity}.pem"))),
            read_key(&pki.path(&format!("{identity}-key.pem"))),
        )
        .expect("client cert");
    config.alpn_protocols = vec![alpn.to_vec()];
    config.resumption = rustls::client::Resumption::disabled();
    Arc::new(config)
}

/// Dials the DMZ as `identity` with `alpn`; the TLS stream once the handshake is done.
async fn dial_tls(
    config: Arc<rustls::ClientConfig>,
    tunnel: SocketAddr,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = tokio::time::timeout(LIMIT, TcpStream::connect(tunnel))
        .await
        .map_err(|_| std::io::Error::other("connect timed out"))??;
    let connector = tokio_rustls::TlsConnector::from(config);
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    tokio::time::timeout(LIMIT, connector.connect(name, tcp))
        .await
        .map_err(|_| std::io::Error::other("TLS handshake timed out"))?
}

/// Resident memory of process `pid` in bytes (`VmRSS`).
fn rss_bytes(pid: u32) -> u64 {
    status_field(pid, "VmRSS:")
        .and_then(|v| v.trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kib| kib * 1024)
        .unwrap_or(0)
}

/// Threads of process `pid`.
fn threads(pid: u32) -> usize {
    status_field(pid, "Threads:")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn status_field(pid: u32, field: &str) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix(field).map(|v| v.trim().to_owned()))
}

/// Open file descriptors of process `pid`.
fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/fd: {e}"))
        .count()
}

/// Whether process `pid` still runs (not a zombie).
fn alive(pid: u32) -> bool {
    status_field(pid, "State:").is_some_and(|s| !s.starts_with('Z'))
}

const MIB: f64 = 1024.0 * 1024.0;
