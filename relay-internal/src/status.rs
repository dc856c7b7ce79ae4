//! What the agent answers on its admin endpoint: readiness, reload, `GET /status` (its DMZ
//! nodes, services and entry points, certificate dates), the session table, and
//! `POST /drain` / `POST /resume`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use relay_tunnel::admin::Api;
use relay_tunnel::metrics as m;
use relay_tunnel::session;
use serde_json::{Value, json};

use crate::Agent;

/// What is known of the tunnels to one DMZ node.
#[derive(Debug, Default)]
pub(crate) struct Link {
    /// Since when at least one tunnel to it is up.
    since: Option<SystemTime>,
    /// The latest failure to connect, or why the latest tunnel ended, and when.
    last_error: Option<(SystemTime, String)>,
    /// The latest keepalive round trip, in microseconds (0: none yet).
    rtt_micros: Arc<AtomicU64>,
}

/// A histogram that also keeps its latest value for `/status`.
struct LastValue {
    histogram: metrics::Histogram,
    last_micros: Arc<AtomicU64>,
}

impl metrics::HistogramFn for LastValue {
    fn record(&self, value: f64) {
        self.histogram.record(value);
        self.last_micros
            .store((value * 1e6) as u64, Ordering::Relaxed);
    }
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

impl Agent {
    fn link<T>(&self, node: &str, f: impl FnOnce(&mut Link) -> T) -> T {
        let mut links = self.links.lock().unwrap_or_else(|p| p.into_inner());
        f(links.entry(node.to_owned()).or_default())
    }

    /// Notes that the first tunnel to `node` came up (`true`) or the last went down.
    pub(crate) fn link_up(&self, node: &str, up: bool) {
        self.link(node, |l| l.since = up.then(SystemTime::now));
    }

    /// Notes why a tunnel to `node` failed or ended.
    pub(crate) fn link_error(&self, node: &str, error: String) {
        self.link(node, |l| l.last_error = Some((SystemTime::now(), error)));
    }

    /// The keepalive RTT histogram of a tunnel to `node`, which also keeps its latest value.
    pub(crate) fn rtt_histogram(&self, node: &str) -> metrics::Histogram {
        let last_micros = self.link(node, |l| l.rtt_micros.clone());
        metrics::Histogram::from_arc(Arc::new(LastValue {
            histogram: metrics::histogram!(m::TUNNEL_RTT),
            last_micros,
        }))
    }
}

impl Api for Agent {
    fn ready(&self) -> Result<(), String> {
        self.readiness()
    }

    fn reload(&self) -> Result<String, String> {
        crate::reload::reload(self)
    }

    fn sessions(&self) -> &session::Table {
        &self.table
    }

    fn drain(&self, drain: bool) -> Option<Result<String, String>> {
        if self.drain.is_cancelled() {
            return Some(Err("the agent is shutting down".into()));
        }
        let was = self.paused.swap(drain, Ordering::Relaxed);
        Some(Ok(match (was, drain) {
            (false, true) => {
                tracing::warn!(
                    "drained by an operator: services withdrawn from every DMZ node; running sessions go on"
                );
                self.declarations_changed();
                format!(
                    "drained: no service declared to the DMZ nodes; {} session(s) running go on",
                    self.table.len()
                )
            }
            (true, false) => {
                tracing::info!("resumed by an operator: services declared again");
                self.declarations_changed();
                "resumed: services declared again".into()
            }
            (true, true) => "already drained".into(),
            (false, false) => "not drained".into(),
        }))
    }

    fn status(&self) -> Value {
        let now = SystemTime::now();
        let ready = self.readiness();
        let config = self
            .config
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let connected = self
            .connected
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let verdicts = self
            .verdicts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let links = self.links.lock().unwrap_or_else(|p| p.into_inner());
        let nodes: Vec<Value> = self
            .nodes
            .iter()
            .map(|node| {
                let tunnels = connected.get(node).copied().unwrap_or(0);
                let link = links.get(node);
                let rtt = link.map_or(0, |l| l.rtt_micros.load(Ordering::Relaxed));
                json!({
                    "address": node,
                    "state": if tunnels > 0 { "connected" } else { "down" },
                    "tunnels": tunnels,
                    "connected_since": link.and_then(|l| l.since).map(rfc3339),
                    "last_error": link.and_then(|l| l.last_error.as_ref()).map(|(at, e)| json!({
                        "at": rfc3339(*at),
                        "error": e,
                    })),
                    "rtt_ms": (rtt > 0).then(|| rtt as f64 / 1000.0),
                })
            })
            .collect();
        drop(links);

        let settings = self.settings();
        let active = self.table.active();
        let paused = self.paused.load(Ordering::Relaxed);
        let services: Vec<Value> = config
            .inbound
            .iter()
            .map(|s| {
                let state = settings.health.get(&s.name);
                let up = state.map(|h| h.up()).unwrap_or_default();
                let targets: Vec<Value> = state
                    .map(|h| {
                        h.targets
                            .iter()
                            .zip(&up)
                            .map(|(t, up)| json!({ "target": t.label, "up": up }))
                            .collect()
                    })
                    .unwrap_or_default();
                let withdrawn = state.is_some_and(|h| h.withdrawn());
                let by_node: serde_json::Map<String, Value> = self
                    .nodes
                    .iter()
                    .map(|node| {
                        let verdict = match verdicts.get(node).and_then(|v| v.get(&s.name)) {
                            _ if paused || withdrawn => json!("not declared"),
                            None => json!("unknown"),
                            Some(None) => json!("accepted"),
                            Some(Some(reason)) => json!(format!("rejected: {reason}")),
                        };
                        (node.clone(), verdict)
                    })
                    .collect();
                json!({
                    "name": s.name,
                    "listen": s.listen.to_string(),
                    "targets": targets,
                    "declared": !paused && !withdrawn,
                    "withdrawn": withdrawn,
                    "nodes": by_node,
                    "sessions_active": active.get(&(s.name.clone(), m::INBOUND)).copied().unwrap_or(0),
                })
            })
            .collect();
        let outbound: Vec<Value> = config
            .outbound
            .iter()
            .map(|o| {
                json!({
                    "name": o.name,
                    "listen": o.listen.to_string(),
                    "target": o.target,
                    "backups": o.backups,
                    "sessions_active": active.get(&(o.name.clone(), m::OUTBOUND)).copied().unwrap_or(0),
                })
            })
            .collect();
        let certificates: Vec<Value> = config
            .expiries
            .iter()
            .map(|e| e.status(config.expiry_warning))
            .collect();
        json!({
            "binary": "relay-internal",
            "version": env!("CARGO_PKG_VERSION"),
            "instance": self.instance,
            "started": rfc3339(self.started),
            "uptime_seconds": now.duration_since(self.started).map_or(0, |d| d.as_secs()),
            "ready": ready.is_ok(),
            "reason": ready.err(),
            "draining": self.drain.is_cancelled(),
            "drained": paused,
            "dmz": nodes,
            "services": services,
            "outbound": outbound,
            "outbound_proxy": config.outbound_proxy.map(|a| a.to_string()),
            "sessions_active": self.table.len(),
            "limits": {
                "sessions": {
                    "active": config.limits.max_sessions - self.session_limit.available_permits(),
                    "max": config.limits.max_sessions,
                },
            },
            "certificates": certificates,
            "sandbox": relay_tunnel::sandbox::applied(),
        })
    }
}
