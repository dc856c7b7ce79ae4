//! `relay-dmz`: the DMZ node. It accepts agent tunnels, opens a service's public listener only
//! while an agent serving it is connected, and carries each partner connection to an agent as
//! one HTTP/2 stream. It stores nothing and never dials the protected network.
#![forbid(unsafe_code)]

pub mod config;
pub mod outbound;
pub mod partner;
pub mod registry;
pub mod tunnel;

use std::io;
use std::sync::Arc;
use std::time::Duration;

use relay_tunnel::admin;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use config::DmzConfig;
use config::Limits;
use registry::Registry;

/// Unauthenticated agent connections handled at once; more wait in the kernel backlog.
const MAX_PENDING_TUNNELS: usize = 256;
/// Pause after a failed accept on the tunnel listener.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(50);

/// The sockets a DMZ node serves, bound by the caller (port 0 in tests).
#[derive(Debug)]
pub struct Listeners {
    /// Where agents dial.
    pub tunnel: TcpListener,
    /// The admin endpoint, if configured.
    pub admin: Option<TcpListener>,
}

impl Listeners {
    /// Binds the addresses of `config`.
    pub async fn bind(config: &DmzConfig) -> io::Result<Self> {
        let tunnel = TcpListener::bind(config.tunnel_listen).await?;
        let admin = match config.admin_listen {
            Some(addr) => Some(TcpListener::bind(addr).await?),
            None => None,
        };
        Ok(Self { tunnel, admin })
    }
}

/// Tunnel settings the tunnel tasks share.
pub(crate) struct TunnelSettings {
    pub(crate) acceptor: TlsAcceptor,
    pub(crate) agents: Option<Vec<String>>,
    pub(crate) keepalive: Duration,
    pub(crate) handshake_timeout: Duration,
}

/// State shared by the tasks of one DMZ node.
pub struct Node {
    pub(crate) registry: Arc<Registry>,
    pub(crate) tunnel: TunnelSettings,
    pub(crate) limits: Limits,
    pub(crate) session_limit: Arc<Semaphore>,
    pub(crate) sessions: TaskTracker,
    pub(crate) sessions_cancel: CancellationToken,
    pub(crate) listeners: TaskTracker,
    pub(crate) tunnels_cancel: CancellationToken,
    pub(crate) connect_allow: Vec<relay_tunnel::config::ConnectRule>,
    /// Cancelled when the node starts draining.
    pub(crate) draining: CancellationToken,
}

impl Node {
    fn readiness(&self) -> Result<(), String> {
        if self.draining.is_cancelled() {
            return Err("draining: shutting down".into());
        }
        match self.registry.tunnels() {
            0 => Err("no agent connected".into()),
            _ => Ok(()),
        }
    }
}

/// Runs a DMZ node until `shutdown` is cancelled, then closes the public listeners, gives
/// in-flight sessions `limits.drain_timeout`, and returns.
pub async fn run(
    config: DmzConfig,
    listeners: Listeners,
    shutdown: CancellationToken,
) -> io::Result<()> {
    let metrics = relay_tunnel::telemetry::metrics_handle();
    let node = Arc::new(Node {
        registry: Registry::new(config.public_bind, config.listen_allow.clone()),
        tunnel: TunnelSettings {
            acceptor: TlsAcceptor::from(config.tls.clone()),
            agents: config.agents.clone(),
            keepalive: config.keepalive,
            handshake_timeout: config.limits.handshake_timeout,
        },
        limits: config.limits,
        session_limit: Arc::new(Semaphore::new(config.limits.max_sessions)),
        sessions: TaskTracker::new(),
        sessions_cancel: CancellationToken::new(),
        listeners: TaskTracker::new(),
        tunnels_cancel: CancellationToken::new(),
        connect_allow: config.connect_allow.clone(),
        draining: CancellationToken::new(),
    });

    let admin_stop = CancellationToken::new();
    let admin_task = listeners.admin.map(|l| {
        let n = node.clone();
        tracing::info!(addr = %display_addr(&l), "admin endpoint listening");
        tokio::spawn(admin::serve(
            l,
            Arc::new(move || n.readiness()),
            metrics,
            admin_stop.clone(),
        ))
    });

    tracing::info!(addr = %display_addr(&listeners.tunnel), "tunnel listener up; public listeners open when agents register");
    let tunnels = TaskTracker::new();
    let pending = Arc::new(Semaphore::new(MAX_PENDING_TUNNELS));
    loop {
        let permit = tokio::select! {
            _ = shutdown.cancelled() => break,
            p = pending.clone().acquire_owned() => p.expect("semaphore is never closed"),
        };
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = listeners.tunnel.accept() => match r {
                Ok(pair) => pair,
                Err(e) => {
                    tracing::warn!(error = %e, "tunnel accept failed");
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                    continue;
                }
            },
        };
        let node = node.clone();
        tunnels.spawn(async move {
            // The permit bounds handshakes in progress; a registered tunnel releases it.
            let _permit = permit;
            tunnel::serve(stream, peer, node).await;
        });
    }

    tracing::info!(drain_timeout = ?node.limits.drain_timeout, "shutting down: closing public listeners, draining sessions");
    node.draining.cancel();
    drop(listeners.tunnel);
    node.registry.close_all();
    node.listeners.close();
    node.listeners.wait().await;
    node.sessions.close();
    if tokio::time::timeout(node.limits.drain_timeout, node.sessions.wait())
        .await
        .is_err()
    {
        tracing::warn!("drain timeout reached: resetting the remaining sessions");
        node.sessions_cancel.cancel();
        node.sessions.wait().await;
    }
    node.tunnels_cancel.cancel();
    tunnels.close();
    tunnels.wait().await;
    admin_stop.cancel();
    if let Some(task) = admin_task {
        let _ = task.await;
    }
    tracing::info!("stopped");
    Ok(())
}

fn display_addr(l: &TcpListener) -> String {
    l.local_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| "?".into())
}
