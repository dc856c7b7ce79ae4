//! Hot reload of the DMZ config (SIGHUP, `POST /reload`): new TLS material applies to new
//! handshakes, tunnels of agents no longer admitted (identity or CA) are cut, and the
//! listen and connect policies apply to what agents ask next. Keys that need a restart are
//! reported. A broken config changes nothing.

use std::sync::Arc;

use crate::{DmzConfig, Node, Policy};

/// Reloads the config from the file it came from; returns a summary or why nothing changed.
pub(crate) fn reload(node: &Node) -> Result<String, String> {
    relay_tunnel::admin::counted_reload(apply(node))
}

fn apply(node: &Node) -> Result<String, String> {
    let mut current = node.config.lock().unwrap_or_else(|p| p.into_inner());
    let Some(path) = current.source.clone() else {
        return Err("this node was not started from a config file".into());
    };
    let mut new = DmzConfig::load(&path).map_err(|e| {
        relay_tunnel::sandbox::explain_denied(format!(
            "{}: {}",
            path.display(),
            e.to_string().replace('\n', "; ")
        ))
    })?;
    relay_tunnel::sandbox::reload_check(&new.sandbox_rules())
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let mut restart = Vec::new();
    if new.tunnel_listen != current.tunnel_listen {
        restart.push("tunnel.listen");
    }
    if new.admin_listen != current.admin_listen {
        restart.push("admin.listen");
    }
    if new.public_bind != current.public_bind {
        restart.push("public.bind");
    }
    if new.keepalive != current.keepalive {
        restart.push("tunnel.keepalive");
    }
    if new.limits != current.limits {
        restart.push("limits");
    }
    if new.sandbox != current.sandbox {
        restart.push("sandbox");
    }
    node.admin.set(new.admin_access.clone());
    let policy = Arc::new(Policy::from_config(&new));
    *node.policy.write().unwrap_or_else(|p| p.into_inner()) = policy.clone();
    let withdrawn = node
        .registry
        .set_policy(policy.rights.clone(), !new.trusted_proxies.is_empty());
    let mut services = 0;
    for (carrier, verdicts) in withdrawn {
        services += verdicts.len();
        // The agent logs the verdicts and shows them in its readiness, as after a registration.
        let _ = carrier
            .control
            .try_send(relay_tunnel::protocol::DmzMessage::Registered { services: verdicts });
    }
    let mut cut = 0;
    for tunnel in node.live.lock().unwrap_or_else(|p| p.into_inner()).values() {
        if !policy.admits(&tunnel.agent, &tunnel.chain) {
            tracing::warn!(agent = %tunnel.agent, "agent no longer admitted after reload: tunnel cut");
            tunnel.cut.cancel();
            cut += 1;
        }
    }
    // What needs a restart keeps running as it is: remember that, so the next reload still
    // reports the pending change.
    new.tunnel_listen = current.tunnel_listen;
    new.admin_listen = current.admin_listen;
    new.public_bind = current.public_bind;
    new.keepalive = current.keepalive;
    new.limits = current.limits;
    new.sandbox = current.sandbox;
    relay_tunnel::expiry::publish(&new.expiries);
    relay_tunnel::expiry::warn_all(&new.expiries, new.expiry_warning);
    *current = new;
    let mut summary = format!(
        "reloaded {}; {cut} tunnel(s) cut; {services} service declaration(s) withdrawn",
        path.display()
    );
    if !restart.is_empty() {
        summary += &format!("; changes to {} apply after a restart", restart.join(", "));
    }
    Ok(summary)
}
