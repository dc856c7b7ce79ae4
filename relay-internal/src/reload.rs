//! Hot reload of the agent config (SIGHUP, `POST /reload`): new TLS material applies to new
//! tunnel connections, and a changed service list is pushed to every DMZ node on the control
//! streams (new services open there, removed ones close, a changed target applies to new
//! sessions). Keys that need a restart are reported. A broken config changes nothing.

use std::sync::Arc;

use crate::{Agent, AgentConfig, Settings};

/// Reloads the config from the file it came from; returns a summary or why nothing changed.
pub(crate) fn reload(agent: &Agent) -> Result<String, String> {
    relay_tunnel::admin::counted_reload(apply(agent))
}

fn apply(agent: &Agent) -> Result<String, String> {
    let mut current = agent.config.lock().unwrap_or_else(|p| p.into_inner());
    let Some(path) = current.source.clone() else {
        return Err("this agent was not started from a config file".into());
    };
    let mut new = AgentConfig::load(&path).map_err(|e| {
        relay_tunnel::sandbox::explain_denied(format!(
            "{}: {}",
            path.display(),
            e.to_string().replace('\n', "; ")
        ))
    })?;
    relay_tunnel::sandbox::reload_check(&new.sandbox_rules())
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let mut restart = Vec::new();
    if new.dmz != current.dmz || new.connections != current.connections {
        restart.push("dmz/connections");
    }
    if new.keepalive != current.keepalive || new.limits != current.limits {
        restart.push("keepalive/limits");
    }
    if new.admin_listen != current.admin_listen {
        restart.push("admin.listen");
    }
    if new.outbound != current.outbound || new.outbound_proxy != current.outbound_proxy {
        restart.push("outbound/outbound_proxy");
    }
    if new.audit != current.audit {
        restart.push("audit");
    }
    if new.sandbox != current.sandbox {
        restart.push("sandbox");
    }
    // By their Debug text: a TLS health check holds a rustls config, which has no equality.
    // The new settings apply either way; this only decides whether the DMZ nodes are told.
    let services_changed = format!("{:?}", new.inbound) != format!("{:?}", current.inbound);
    agent.admin.set(new.admin_access.clone());
    agent
        .settings
        .send_replace(Arc::new(Settings::from_config(&new)));
    // What needs a restart keeps running as it is: remember that, so the next reload still
    // reports the pending change.
    new.dmz = std::mem::take(&mut current.dmz);
    new.connections = current.connections;
    new.keepalive = current.keepalive;
    new.limits = current.limits;
    new.admin_listen = current.admin_listen;
    new.outbound = std::mem::take(&mut current.outbound);
    new.outbound_proxy = current.outbound_proxy;
    new.audit = current.audit.take();
    new.sandbox = current.sandbox;
    crate::zero_sessions(&new);
    relay_tunnel::expiry::publish(&new.expiries);
    relay_tunnel::expiry::warn_all(&new.expiries, new.expiry_warning);
    *current = new;
    let mut summary = format!(
        "reloaded {}; TLS material for new tunnels; services {}",
        path.display(),
        if services_changed {
            "pushed to the DMZ nodes"
        } else {
            "unchanged"
        }
    );
    if !restart.is_empty() {
        summary += &format!("; changes to {} apply after a restart", restart.join(", "));
    }
    Ok(summary)
}
