//! `relay-internal`: the agent inside the protected network. It dials every DMZ node over
//! mutually authenticated TLS, pushes its service definitions, and serves the sessions the
//! DMZ opens by connecting the targets named in its own config.
#![forbid(unsafe_code)]

pub mod config;
pub mod control;
pub mod dialer;
pub mod health;
pub mod inbound;
pub mod outbound;
pub mod pool;
pub mod proxy;
mod reload;
pub mod socks5;
mod status;
pub mod syslog;

use std::collections::HashMap;
use std::io;
use std::sync::{Arc, Mutex};

use relay_tunnel::admin;
use relay_tunnel::metrics as m;
use relay_tunnel::net::bind_reuse;
use relay_tunnel::protocol::{Registration, ServiceVerdict};
use relay_tunnel::shards::Shards;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsConnector;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use config::AgentConfig;
use config::{InboundService, Limits};

/// How long, at most, tunnels wait for their DMZ node to confirm the drain before they close.
const DRAIN_CONFIRM_LIMIT: std::time::Duration = std::time::Duration::from_secs(2);

/// State shared by the tasks of one agent.
pub struct Agent {
    /// Random id of this process, the same on all its tunnels.
    pub(crate) instance: String,
    /// Limits log lines about repeated bad input.
    pub(crate) log_limit: relay_tunnel::ratelog::RateLimit,
    /// What a reload can change; tunnels watch it to re-register.
    pub(crate) settings: tokio::sync::watch::Sender<Arc<Settings>>,
    /// Bumped when a service is withdrawn or declared again: control streams re-register.
    pub(crate) declarations: tokio::sync::watch::Sender<u64>,
    /// Configured DMZ node addresses, by index.
    pub(crate) nodes: Vec<String>,
    pub(crate) pool: Arc<pool::Pool>,
    pub(crate) keepalive: std::time::Duration,
    pub(crate) limits: Limits,
    pub(crate) session_limit: Arc<Semaphore>,
    pub(crate) sessions: TaskTracker,
    /// Cancelled on shutdown: tunnels announce the drain and refuse new sessions.
    pub(crate) drain: CancellationToken,
    /// One token per inbound control stream whose DMZ node has not confirmed the drain.
    pub(crate) drain_unconfirmed: TaskTracker,
    /// Cancelled after the drain: tunnels close.
    pub(crate) stop_tunnels: CancellationToken,
    /// Cancelled at the drain deadline: sessions still running are reset.
    pub(crate) stop_sessions: CancellationToken,
    connected: Mutex<HashMap<String, usize>>,
    /// The DMZ nodes' latest verdicts: node, then service, then the reason when rejected.
    verdicts: Mutex<HashMap<String, std::collections::BTreeMap<String, Option<String>>>>,
    config: Mutex<AgentConfig>,
    /// Who may use the admin endpoint; replaced on reload.
    pub(crate) admin: Arc<admin::Guard>,
    /// The sessions relaying bytes now (`/sessions`).
    pub(crate) table: Arc<relay_tunnel::session::Table>,
    /// Set by `POST /drain`: no service is declared, so the DMZ nodes send new sessions to
    /// other agents; `POST /resume` clears it.
    pub(crate) paused: std::sync::atomic::AtomicBool,
    /// What `/status` says about each DMZ node.
    pub(crate) links: Mutex<HashMap<String, status::Link>>,
    pub(crate) started: std::time::SystemTime,
}

/// The part of the config a reload replaces: TLS material and inbound services.
pub struct Settings {
    pub(crate) connector: TlsConnector,
    pub(crate) connector_out: TlsConnector,
    pub(crate) services: HashMap<String, Arc<InboundService>>,
    pub(crate) decls: Vec<relay_tunnel::protocol::ServiceDecl>,
    /// Target state of each inbound service.
    pub(crate) health: HashMap<String, Arc<health::ServiceState>>,
}

impl Settings {
    /// The reloadable part of `config`.
    pub fn from_config(config: &AgentConfig) -> Self {
        Self {
            connector: TlsConnector::from(config.tls.clone()),
            connector_out: TlsConnector::from(config.tls_outbound.clone()),
            services: config
                .inbound
                .iter()
                .map(|s| (s.name.clone(), Arc::new(s.clone())))
                .collect(),
            decls: config.inbound.iter().map(InboundService::decl).collect(),
            health: config
                .inbound
                .iter()
                .map(|s| (s.name.clone(), Arc::new(health::ServiceState::new(s))))
                .collect(),
        }
    }

    /// The services to declare now: all but those withdrawn for want of a healthy target.
    pub(crate) fn declared(&self) -> Vec<relay_tunnel::protocol::ServiceDecl> {
        self.decls
            .iter()
            .filter(|d| !self.health.get(&d.name).is_some_and(|h| h.withdrawn()))
            .cloned()
            .collect()
    }
}

/// Counts a tunnel as up until dropped.
pub(crate) struct TunnelUp<'a> {
    agent: &'a Agent,
    node: String,
    gauge: metrics::Gauge,
}

impl Drop for TunnelUp<'_> {
    fn drop(&mut self) {
        self.gauge.decrement(1.0);
        let mut connected = self
            .agent
            .connected
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(n) = connected.get_mut(&self.node) {
            *n -= 1;
            if *n == 0 {
                self.agent.link_up(&self.node, false);
            }
        }
    }
}

impl Agent {
    /// The settings in force now.
    pub(crate) fn settings(&self) -> Arc<Settings> {
        self.settings.borrow().clone()
    }

    /// The registration a new inbound tunnel sends.
    pub(crate) fn registration(&self) -> Registration {
        Registration {
            instance: self.instance.clone(),
            services: self.declared(),
        }
    }

    /// The services to declare now: none while drained by an operator, else every service
    /// not withdrawn for want of a healthy target.
    pub(crate) fn declared(&self) -> Vec<relay_tunnel::protocol::ServiceDecl> {
        if self.paused.load(std::sync::atomic::Ordering::Relaxed) {
            return Vec::new();
        }
        self.settings().declared()
    }

    /// Tells every control stream to declare the services again (one was withdrawn or is back).
    pub(crate) fn declarations_changed(&self) {
        self.declarations.send_modify(|n| *n += 1);
    }

    pub(crate) fn tunnel_up(&self, node: &str) -> TunnelUp<'_> {
        let gauge = metrics::gauge!(m::TUNNELS_CONNECTED, "dmz" => node.to_owned());
        gauge.increment(1.0);
        let mut connected = self.connected.lock().unwrap_or_else(|p| p.into_inner());
        let n = connected.entry(node.to_owned()).or_default();
        *n += 1;
        if *n == 1 {
            self.link_up(node, true);
        }
        drop(connected);
        TunnelUp {
            agent: self,
            node: node.to_owned(),
            gauge,
        }
    }

    /// Logs the verdicts of DMZ node `dmz` and keeps them for readiness. A full answer (to a
    /// registration) replaces what the node said before; a partial one (a service withdrawn
    /// by the DMZ's reload) updates the services it names. Connection `index` 0 speaks for
    /// all at warn level.
    pub(crate) fn record_verdicts(
        &self,
        dmz: &str,
        verdicts: &[ServiceVerdict],
        full: bool,
        index: usize,
    ) {
        for v in verdicts {
            match (&v.reason, v.accepted) {
                (_, true) => tracing::debug!(service = %v.name, "service accepted"),
                // Every connection registers; the first one speaks for all.
                (Some(reason), false) if index == 0 => {
                    tracing::warn!(service = %v.name, %reason, "service rejected by the DMZ")
                }
                (reason, false) => {
                    tracing::debug!(service = %v.name, ?reason, "service rejected by the DMZ")
                }
            }
        }
        let declared = self.declared();
        let mut all = self.verdicts.lock().unwrap_or_else(|p| p.into_inner());
        let node = all.entry(dmz.to_owned()).or_default();
        if full {
            node.clear();
        }
        for v in verdicts {
            let reason = (!v.accepted).then(|| v.reason.clone().unwrap_or_default());
            node.insert(v.name.clone(), reason);
        }
        node.retain(|name, _| declared.iter().any(|d| &d.name == name));
    }

    fn readiness(&self) -> Result<(), String> {
        if self.drain.is_cancelled() {
            return Err("draining: shutting down".into());
        }
        if self.paused.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(
                "drained by an operator: no service declared (POST /resume to undo)".into(),
            );
        }
        let connected: Vec<String> = self
            .connected
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|(_, n)| **n > 0)
            .map(|(node, _)| node.clone())
            .collect();
        if connected.is_empty() {
            return Err("no DMZ node connected".into());
        }
        // Connected but serving nothing (every service rejected by every connected node) is
        // not ready either: the reason is the operator's first clue.
        let verdicts = self.verdicts.lock().unwrap_or_else(|p| p.into_inner());
        let mut rejected = None;
        for node in &connected {
            let Some(services) = verdicts.get(node) else {
                return Ok(());
            };
            if services.is_empty() || services.values().any(Option::is_none) {
                return Ok(());
            }
            if rejected.is_none() {
                rejected = services.iter().next().map(|(name, reason)| {
                    format!("{name} on {node}: {}", reason.as_deref().unwrap_or(""))
                });
            }
        }
        Err(format!(
            "connected, but the DMZ rejected every service (first: {})",
            rejected.unwrap_or_default()
        ))
    }
}

/// Creates `relay_sessions_total` at 0 for every result each configured service can end with.
fn zero_sessions(config: &AgentConfig) {
    use relay_tunnel::metrics as m;
    for service in &config.inbound {
        m::zero_sessions(&service.name, m::INBOUND, m::AGENT_INBOUND_RESULTS);
    }
    for service in &config.outbound {
        m::zero_sessions(&service.name, m::OUTBOUND, m::OUTBOUND_RESULTS);
    }
    if config.outbound_proxy.is_some() {
        m::zero_sessions(proxy::SERVICE, m::OUTBOUND, m::OUTBOUND_RESULTS);
    }
}

/// Runs the agent until `shutdown` is cancelled; then it sends GOAWAY on every tunnel, gives
/// sessions in flight `limits.drain_timeout`, and returns.
pub async fn run(
    config: AgentConfig,
    admin_listener: Option<TcpListener>,
    shutdown: CancellationToken,
) -> io::Result<()> {
    let metrics = relay_tunnel::telemetry::metrics_handle();
    relay_tunnel::metrics::build_info(env!("CARGO_PKG_NAME"));
    let admin_guard = admin::Guard::new(config.admin_access.clone());
    let agent = Arc::new(Agent {
        instance: format!("{:016x}", fastrand::u64(..)),
        settings: tokio::sync::watch::Sender::new(Arc::new(Settings::from_config(&config))),
        declarations: tokio::sync::watch::Sender::new(0),
        nodes: config.dmz.iter().map(|n| n.addr.clone()).collect(),
        pool: pool::Pool::new(config.dmz.len()),
        keepalive: config.keepalive,
        limits: config.limits,
        session_limit: Arc::new(Semaphore::new(config.limits.max_sessions)),
        sessions: TaskTracker::new(),
        drain: CancellationToken::new(),
        drain_unconfirmed: TaskTracker::new(),
        stop_tunnels: CancellationToken::new(),
        stop_sessions: CancellationToken::new(),
        connected: Mutex::new(config.dmz.iter().map(|n| (n.addr.clone(), 0)).collect()),
        verdicts: Mutex::default(),
        log_limit: relay_tunnel::ratelog::RateLimit::new(std::time::Duration::from_secs(1)),
        config: Mutex::new(config.clone()),
        admin: admin_guard.clone(),
        table: relay_tunnel::session::Table::new(),
        paused: Default::default(),
        links: Default::default(),
        started: std::time::SystemTime::now(),
    });
    // Bind the engine-facing listeners first: a taken port is a startup error, not a log line,
    // and it returns before any task (admin endpoint, reload signal) is started.
    let mut fixed = Vec::new();
    for spec in &config.outbound {
        let listener = bind_reuse(spec.listen).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("outbound {:?}: cannot bind {}: {e}", spec.name, spec.listen),
            )
        })?;
        fixed.push((spec.clone(), listener));
    }
    let proxy_listener = match config.outbound_proxy {
        Some(addr) => Some(bind_reuse(addr).map_err(|e| {
            io::Error::new(e.kind(), format!("outbound_proxy: cannot bind {addr}: {e}"))
        })?),
        None => None,
    };

    // Each tunnel connection runs on a shard, with the sessions it carries; the shards stop
    // when this function returns, after every tunnel and session has ended.
    let shards = Shards::per_core("relay-internal-shard")?;

    let control = admin::start(
        admin_listener,
        admin_guard,
        agent.clone(),
        metrics,
        &shutdown,
    );

    zero_sessions(&config);
    relay_tunnel::expiry::publish(&config.expiries);
    relay_tunnel::expiry::warn_all(&config.expiries, config.expiry_warning);
    let (watched, warning) = (agent.clone(), agent.clone());
    tokio::spawn(relay_tunnel::expiry::watch(
        move || {
            watched
                .config
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .expiries
                .clone()
        },
        move || {
            warning
                .config
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .expiry_warning
        },
        shutdown.clone(),
    ));
    let health_task = tokio::spawn(health::run(agent.clone()));
    let audit = config.audit.as_ref().map(syslog::start);
    let shard = shards.handles();
    let tunnels = TaskTracker::new();
    let kinds: &[dialer::Kind] = if config.has_outbound() {
        &[dialer::Kind::Inbound, dialer::Kind::Outbound]
    } else {
        &[dialer::Kind::Inbound]
    };
    // Inbound carriers start first, so that a DMZ node (which places each tunnel connection
    // on its least loaded shard) tends to spread them before the outbound ones arrive.
    for &kind in kinds {
        for (node_idx, node) in config.dmz.iter().enumerate() {
            for index in 0..config.connections {
                // Connection `index` to every node runs on shard `index`.
                let placement = shard.by_index(index);
                let runtime = placement.handle().clone();
                let agent = agent.clone();
                let node = node.clone();
                tunnels.spawn_on(
                    async move {
                        let _placement = placement;
                        dialer::maintain(agent, node_idx, node, index, kind).await;
                    },
                    &runtime,
                );
            }
        }
    }
    let entry_points = TaskTracker::new();
    for (spec, listener) in fixed {
        tracing::info!(service = %spec.name, listen = %spec.listen, target = %spec.target, "outbound listener up");
        entry_points.spawn(outbound::serve_fixed(agent.clone(), spec, listener));
    }
    if let Some(listener) = proxy_listener {
        tracing::info!(listen = ?listener.local_addr().ok(), "outbound proxy (HTTP CONNECT and SOCKS5) up");
        entry_points.spawn(proxy::serve(agent.clone(), listener));
    }
    entry_points.close();
    tracing::info!(
        instance = %agent.instance,
        nodes = config.dmz.len(),
        connections = config.connections,
        services = config.inbound.len(),
        "agent started"
    );

    shutdown.cancelled().await;
    tracing::info!(drain_timeout = ?agent.limits.drain_timeout, "shutting down: no new sessions, draining");
    agent.drain.cancel();
    entry_points.wait().await;
    agent.sessions.close();
    if tokio::time::timeout(agent.limits.drain_timeout, agent.sessions.wait())
        .await
        .is_err()
    {
        tracing::warn!("drain timeout reached: resetting the remaining sessions");
        agent.stop_sessions.cancel();
        agent.sessions.wait().await;
    }
    // Until every DMZ node has confirmed the drain, it may still open sessions here: they are
    // refused, not lost, while the tunnels stay open.
    agent.drain_unconfirmed.close();
    if tokio::time::timeout(DRAIN_CONFIRM_LIMIT, agent.drain_unconfirmed.wait())
        .await
        .is_err()
    {
        tracing::warn!(limit = ?DRAIN_CONFIRM_LIMIT, "a DMZ node did not confirm the drain in time; closing its tunnels anyway");
    }
    agent.stop_tunnels.cancel();
    tunnels.close();
    tunnels.wait().await;
    // Every session and control stream has written its audit record by now.
    if let Some(audit) = audit {
        audit.finish().await;
    }
    control.stop().await;
    health_task.abort();
    drop(shards);
    tracing::info!("stopped");
    Ok(())
}
