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

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use relay_e2e::process::{Captured, Dmz};
use relay_e2e::*;
use relay_tunnel::tls::provider;
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

/// A TLS 1.3 client config presenting `identity`'s certificate with `alpn`.
fn client_config(pki: &Pki, identity: &str, alpn: &[u8]) -> Arc<rustls::ClientConfig> {
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("versions")
        .with_root_certificates(pem::roots(pki))
        .with_client_auth_cert(
            pem::certs(&pki.path(&format!("{identity}.pem"))),
            pem::key(&pki.path(&format!("{identity}-key.pem"))),
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

/// Threads of process `pid`.
fn threads(pid: u32) -> usize {
    procfs::status_field(pid, "Threads:")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Whether process `pid` still runs (not a zombie).
fn alive(pid: u32) -> bool {
    procfs::status_field(pid, "State:").is_some_and(|s| !s.starts_with('Z'))
}

const MIB: f64 = 1024.0 * 1024.0;
