//! `relay-dmz`: the DMZ node. It accepts agent tunnels, opens a service's public listener only
//! while an agent serving it is connected, and carries each partner connection to an agent as
//! one HTTP/2 stream. It stores nothing and never dials the protected network.
#![forbid(unsafe_code)]

pub mod admission;
pub mod config;
pub mod control;
pub mod outbound;
pub mod partner;
pub mod pending;
pub mod registry;
mod reload;
pub mod rights;
mod sandbox;
mod status;
pub mod tunnel;

use std::io;
use std::sync::Arc;
use std::time::Duration;

use relay_tunnel::admin;
use relay_tunnel::expiry::{self, Expiry};
use relay_tunnel::net::bind_reuse;
use relay_tunnel::session;
use relay_tunnel::shards::{ShardHandles, Shards};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use config::DmzConfig;
use config::Limits;
use registry::Registry;

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
        let tunnel = bind_reuse(config.tunnel_listen)?;
        let admin = match config.admin_listen {
            Some(addr) => Some(bind_reuse(addr)?),
            None => None,
        };
        Ok(Self { tunnel, admin })
    }
}

/// Tunnel settings the tunnel tasks share.
pub(crate) struct TunnelSettings {
    pub(crate) keepalive: Duration,
    pub(crate) handshake_timeout: Duration,
}

/// What a reload replaces: TLS material, the agent allow-list, the outbound policy.
pub(crate) struct Policy {
    pub(crate) acceptor: TlsAcceptor,
    pub(crate) verifier: Arc<dyn rustls::server::danger::ClientCertVerifier>,
    pub(crate) agents: Option<Vec<String>>,
    pub(crate) rights: Arc<rights::Rights>,
    pub(crate) trusted_proxies: Vec<ipnet::IpNet>,
    pub(crate) deny: Vec<ipnet::IpNet>,
}

impl Policy {
    fn from_config(config: &DmzConfig) -> Self {
        Self {
            acceptor: TlsAcceptor::from(config.tls.clone()),
            verifier: config.verifier.clone(),
            agents: config.agents.clone(),
            rights: Arc::new(config.rights.clone()),
            trusted_proxies: config.trusted_proxies.clone(),
            deny: config.deny.clone(),
        }
    }

    /// Whether an agent with this identity and chain may keep a tunnel.
    pub(crate) fn admits(
        &self,
        agent: &str,
        chain: &[rustls::pki_types::CertificateDer<'static>],
    ) -> bool {
        self.agents
            .as_ref()
            .is_none_or(|a| a.iter().any(|x| x == agent))
            && self.rights.of(agent).any_rights().is_ok()
            && relay_tunnel::tls::still_valid(self.verifier.as_ref(), chain)
    }
}

/// A tunnel that is up, so a reload can cut it when its agent is no longer admitted, and
/// `/status` can show it.
pub(crate) struct LiveTunnel {
    pub(crate) agent: String,
    pub(crate) chain: Vec<rustls::pki_types::CertificateDer<'static>>,
    pub(crate) cut: CancellationToken,
    pub(crate) peer: std::net::SocketAddr,
    pub(crate) since: std::time::SystemTime,
    /// `inbound` or `outbound`.
    pub(crate) kind: &'static str,
    /// The agent process's instance id, once it registered (inbound carriers).
    pub(crate) instance: Option<String>,
}

/// State shared by the tasks of one DMZ node.
pub struct Node {
    pub(crate) registry: Arc<Registry>,
    pub(crate) tunnel: TunnelSettings,
    pub(crate) limits: Limits,
    pub(crate) session_limit: Arc<Semaphore>,
    pub(crate) admission: Arc<admission::Admission>,
    pub(crate) sessions: TaskTracker,
    pub(crate) sessions_cancel: CancellationToken,
    pub(crate) listeners: TaskTracker,
    pub(crate) tunnels_cancel: CancellationToken,
    /// Where tunnel connections run (each with its sessions' pumps).
    pub(crate) shards: ShardHandles,
    pub(crate) policy: std::sync::RwLock<Arc<Policy>>,
    pub(crate) live: std::sync::Mutex<std::collections::HashMap<u64, LiveTunnel>>,
    config: std::sync::Mutex<DmzConfig>,
    /// Limits log lines about repeated bad input.
    pub(crate) log_limit: relay_tunnel::ratelog::RateLimit,
    /// Cancelled when the node starts draining.
    pub(crate) draining: CancellationToken,
    /// Who may use the admin endpoint; replaced on reload.
    pub(crate) admin: Arc<admin::Guard>,
    /// The sessions relaying bytes now (`/sessions`).
    pub(crate) table: Arc<session::Table>,
    /// Partner sessions accepted and refused so far, by service (`/status`).
    pub(crate) totals: std::sync::Mutex<std::collections::HashMap<String, status::Totals>>,
    pub(crate) started: std::time::SystemTime,
}

impl Node {
    /// The policy in force now.
    pub(crate) fn policy(&self) -> Arc<Policy> {
        self.policy
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// `admin.expiry_warning` as configured now.
    pub(crate) fn expiry_warning(&self) -> Duration {
        self.config
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .expiry_warning
    }

    /// When the node's TLS files and each connected agent's certificate stop working.
    fn expiries(&self) -> Vec<Expiry> {
        let mut all = self
            .config
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .expiries
            .clone();
        let live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        let mut agents: Vec<Expiry> = live
            .values()
            .filter_map(|t| Expiry::of_certificate(&format!("agent {}", t.agent), t.chain.first()?))
            .collect();
        agents.sort_by(|a, b| a.what.cmp(&b.what));
        agents.dedup_by(|a, b| a.what == b.what);
        all.extend(agents);
        all
    }

    fn readiness(&self) -> Result<(), String> {
        if self.draining.is_cancelled() {
            return Err("draining: shutting down".into());
        }
        if self.admission.over_budget() {
            return Err("over the memory budget: refusing new sessions".into());
        }
        // Ready means a partner can connect: a load balancer that checks /readyz must not send
        // partners to a node whose agents are connected but whose services were all rejected.
        if self.registry.tunnels() == 0 {
            Err("no agent connected".into())
        } else if !self.registry.any_open() {
            let withdrawn = self.registry.withdrawn();
            if withdrawn.is_empty() {
                Err("agents connected, but no public listener is open: every service they declared was rejected (see the log)".into())
            } else {
                Err(format!(
                    "agents connected, but no public listener is open: withdrawn by their agents for want of a healthy target: {}",
                    withdrawn.join(", ")
                ))
            }
        } else {
            Ok(())
        }
    }
}

/// Runs a DMZ node until `shutdown` is cancelled. Then `/readyz` turns 503 at once, the public
/// listeners close after `limits.drain_delay` (so the load balancer stops sending partners
/// first), sessions in flight get `limits.drain_timeout`, and it returns.
pub async fn run(
    config: DmzConfig,
    listeners: Listeners,
    shutdown: CancellationToken,
) -> io::Result<()> {
    let metrics = relay_tunnel::telemetry::metrics_handle();
    relay_tunnel::metrics::build_info(env!("CARGO_PKG_NAME"));
    // Stopped when this function returns, after every tunnel and session has ended.
    let shards = Shards::per_core("relay-dmz-shard")?;
    let policy = Arc::new(Policy::from_config(&config));
    let admin_guard = admin::Guard::new(config.admin_access.clone());
    let node = Arc::new(Node {
        registry: Registry::new(
            config.public_bind,
            policy.rights.clone(),
            !config.trusted_proxies.is_empty(),
        ),
        tunnel: TunnelSettings {
            keepalive: config.keepalive,
            handshake_timeout: config.limits.handshake_timeout,
        },
        limits: config.limits,
        session_limit: Arc::new(Semaphore::new(config.limits.max_sessions)),
        admission: admission::Admission::new(config.limits),
        sessions: TaskTracker::new(),
        sessions_cancel: CancellationToken::new(),
        listeners: TaskTracker::new(),
        tunnels_cancel: CancellationToken::new(),
        shards: shards.handles(),
        policy: std::sync::RwLock::new(policy),
        live: Default::default(),
        config: std::sync::Mutex::new(config),
        draining: CancellationToken::new(),
        log_limit: relay_tunnel::ratelog::RateLimit::new(Duration::from_secs(1)),
        admin: admin_guard.clone(),
        table: session::Table::new(),
        totals: Default::default(),
        started: std::time::SystemTime::now(),
    });
    tokio::spawn(node.admission.clone().watch_memory(shutdown.clone()));
    {
        let config = node.config.lock().unwrap_or_else(|p| p.into_inner());
        expiry::publish(&config.expiries);
        expiry::warn_all(&config.expiries, config.expiry_warning);
    }
    let (watched, warning) = (node.clone(), node.clone());
    tokio::spawn(expiry::watch(
        move || watched.expiries(),
        move || warning.expiry_warning(),
        shutdown.clone(),
    ));
    if let Some(l) = &listeners.admin {
        tracing::info!(addr = %display_addr(l), "admin endpoint listening");
    }
    let control = admin::start(
        listeners.admin,
        admin_guard,
        node.clone(),
        metrics,
        &shutdown,
    );

    tracing::info!(addr = %display_addr(&listeners.tunnel), "tunnel listener up; public listeners open when agents register");
    let tunnels = TaskTracker::new();
    let pending = pending::Pending::new();
    loop {
        let room = tokio::select! {
            _ = shutdown.cancelled() => break,
            room = pending.room() => room,
        };
        let Some((stream, peer)) =
            relay_tunnel::net::accept(&listeners.tunnel, &shutdown, "tunnel listener").await
        else {
            break;
        };
        let slot = match pending.take(room, peer.ip()) {
            pending::Taken::Slot(slot) | pending::Taken::Evicted(slot) => slot,
            pending::Taken::Full => {
                relay_tunnel::net::set_reset_on_close(&stream);
                let refused = tunnel::Refused::PendingLimit(pending::MAX_PENDING_PER_SOURCE);
                tunnel::refuse(&node, peer, &refused);
                continue;
            }
        };
        // The tunnel connection moves to its shard: its socket is registered there.
        let Ok(stream) = stream.into_std() else {
            continue;
        };
        let node = node.clone();
        let placement = node.shards.least_loaded();
        let shard = placement.handle().clone();
        tunnels.spawn_on(
            async move {
                let _placement = placement;
                let Ok(stream) = tokio::net::TcpStream::from_std(stream) else {
                    return;
                };
                // The slot bounds handshakes in progress; the tunnel lets it go once the
                // agent is authenticated and registered.
                tunnel::serve(stream, peer, node, slot).await;
            },
            &shard,
        );
    }

    tracing::info!(
        drain_delay = ?node.limits.drain_delay,
        drain_timeout = ?node.limits.drain_timeout,
        "shutting down: /readyz now 503; public listeners close after the drain delay"
    );
    node.draining.cancel();
    drop(listeners.tunnel);
    tokio::time::sleep(node.limits.drain_delay).await;
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
    control.stop().await;
    drop(shards);
    tracing::info!("stopped");
    Ok(())
}

fn display_addr(l: &TcpListener) -> String {
    l.local_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| "?".into())
}
