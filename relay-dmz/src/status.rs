//! What the DMZ node answers on its admin endpoint: readiness, reload, `GET /status` (the node,
//! its agents, its services and limits, certificate dates) and the session table.

use std::collections::BTreeMap;
use std::time::SystemTime;

use relay_tunnel::admin::Api;
use relay_tunnel::expiry::Expiry;
use relay_tunnel::metrics as m;
use relay_tunnel::session;
use serde_json::{Value, json};

use crate::Node;

/// Partner sessions of one service that ran, and that were refused or failed before they ran.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Totals {
    accepted: u64,
    refused: u64,
}

impl Node {
    /// Counts an inbound session of `service` that ended with `outcome`.
    pub(crate) fn count(&self, service: &str, outcome: &str) {
        let mut totals = self.totals.lock().unwrap_or_else(|p| p.into_inner());
        let t = match totals.get_mut(service) {
            Some(t) => t,
            None => totals.entry(service.to_owned()).or_default(),
        };
        if m::DMZ_INBOUND_RESULTS.contains(&outcome) {
            t.refused += 1;
        } else {
            t.accepted += 1;
        }
    }
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

/// One connected agent process in `/status`.
#[derive(serde::Serialize)]
struct AgentRow {
    identity: String,
    instance: String,
    /// The address of its oldest tunnel.
    peer: String,
    #[serde(skip)]
    since: SystemTime,
    connected_since: String,
    /// Tunnel connections by role.
    tunnels: BTreeMap<&'static str, usize>,
    services: std::collections::BTreeSet<String>,
    certificate: Option<Value>,
    /// It announced its drain (shutting down) on a tunnel that registered.
    draining: bool,
}

impl Api for Node {
    fn ready(&self) -> Result<(), String> {
        self.readiness()
    }

    fn reload(&self) -> Result<String, String> {
        crate::reload::reload(self)
    }

    fn sessions(&self) -> &session::Table {
        &self.table
    }

    fn status(&self) -> Value {
        let now = SystemTime::now();
        let warning = self.expiry_warning();
        let ready = self.readiness();
        let rows = self.registry.service_rows();

        // One row per agent process: its tunnels grouped by identity and instance.
        let mut agents: BTreeMap<(String, String), AgentRow> = BTreeMap::new();
        for (id, t) in self.live.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            let instance = t.instance.clone().unwrap_or_default();
            let row = agents
                .entry((t.agent.clone(), instance.clone()))
                .or_insert_with(|| AgentRow {
                    identity: t.agent.clone(),
                    instance,
                    peer: t.peer.to_string(),
                    since: t.since,
                    connected_since: String::new(),
                    tunnels: BTreeMap::from([(m::INBOUND, 0), (m::OUTBOUND, 0)]),
                    services: Default::default(),
                    draining: false,
                    certificate: t.chain.first().and_then(|leaf| {
                        let e = Expiry::of_certificate(&format!("agent {}", t.agent), leaf)?;
                        Some(e.status(warning))
                    }),
                });
            *row.tunnels.entry(t.kind).or_default() += 1;
            if t.since < row.since {
                (row.since, row.peer) = (t.since, t.peer.to_string());
            }
            row.services.extend(self.registry.services_of(*id));
            // Registered (it has an instance) but out of the registry: drained.
            row.draining |= t.instance.is_some() && !self.registry.serves(*id);
        }
        let agents: Vec<AgentRow> = agents
            .into_values()
            .map(|mut row| {
                row.connected_since = rfc3339(row.since);
                row
            })
            .collect();

        let active = self.table.active();
        let totals = self
            .totals
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let services: Vec<Value> = rows
            .iter()
            .map(|r| {
                let mut serving: Vec<&str> = r.carriers.iter().map(|(_, a)| a.as_str()).collect();
                serving.sort_unstable();
                serving.dedup();
                let t = totals.get(&r.name).copied().unwrap_or_default();
                json!({
                    "name": r.name,
                    "listen": r.listen,
                    "open": r.open,
                    "withdrawn": r.withdrawn,
                    "agents": serving,
                    "tunnels": r.carriers.len(),
                    "sessions_active": active.get(&(r.name.clone(), m::INBOUND)).copied().unwrap_or(0),
                    "accepted": t.accepted,
                    "refused": t.refused,
                })
            })
            .collect();

        let limits = &self.limits;
        let in_use = limits.max_sessions - self.session_limit.available_permits();
        let certificates: Vec<Value> = {
            let config = self.config.lock().unwrap_or_else(|p| p.into_inner());
            config.expiries.iter().map(|e| e.status(warning)).collect()
        };
        json!({
            "binary": "relay-dmz",
            "version": env!("CARGO_PKG_VERSION"),
            "started": rfc3339(self.started),
            "uptime_seconds": now.duration_since(self.started).map_or(0, |d| d.as_secs()),
            "ready": ready.is_ok(),
            "reason": ready.err(),
            "draining": self.draining.is_cancelled(),
            "agents": agents,
            "services": services,
            "limits": {
                "sessions": { "active": in_use, "max": limits.max_sessions },
                "sessions_per_service": limits.max_sessions_per_service,
                "sessions_per_source": limits.max_sessions_per_source,
                "memory_budget_bytes": limits.memory_budget,
                "over_memory_budget": self.admission.over_budget(),
            },
            "sessions_active": self.table.len(),
            "certificates": certificates,
            "sandbox": relay_tunnel::sandbox::applied(),
        })
    }
}
