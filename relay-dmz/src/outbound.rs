//! Outbound carriers: the agent is the HTTP/2 client and each stream asks the DMZ to dial a
//! partner. The DMZ resolves names itself, checks every address against
//! `policy.connect_allow`, and dials only the addresses it checked (no DNS-rebinding way
//! around the policy).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use h2::RecvStream;
use h2::server::SendResponse;
use http::{Method, Request, Response};
use relay_tunnel::config::ConnectRule;
use relay_tunnel::metrics as m;
use relay_tunnel::net::TunnelSocket;
use relay_tunnel::protocol::{
    self, HEADER_BACKUP, HEADER_CONNECT_TIMEOUT, HEADER_DIALED, HEADER_REASON, HEADER_SERVICE,
    HEADER_SESSION, MAX_BACKUPS, Refusal,
};
use relay_tunnel::pump::{self, PumpCounters};
use relay_tunnel::session;
use relay_tunnel::{h2conf, keepalive};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;
use tracing::Instrument;

use crate::Node;

/// Drives one outbound carrier until it ends.
pub async fn serve(tls: TlsStream<TunnelSocket>, agent: String, node: Arc<Node>) -> String {
    let activity = tls.get_ref().0.activity();
    let mut connection = match tokio::time::timeout(
        node.tunnel.handshake_timeout,
        h2conf::server().handshake::<_, Bytes>(tls),
    )
    .await
    {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => return format!("HTTP/2 handshake: {e}"),
        Err(_) => return "HTTP/2 handshake timed out".into(),
    };
    let ping_pong = connection.ping_pong().expect("ping_pong is taken once");
    let keepalive = keepalive::run(
        ping_pong,
        node.tunnel.keepalive,
        activity,
        metrics::histogram!(m::TUNNEL_RTT),
    );
    tokio::pin!(keepalive);
    let mut draining = false;
    loop {
        tokio::select! {
            next = connection.accept() => match next {
                Some(Ok((request, respond))) => {
                    let node2 = node.clone();
                    let agent = agent.clone();
                    node.sessions.spawn(async move { session(node2, agent, request, respond).await });
                }
                Some(Err(e)) => return format!("connection failed: {e}"),
                None => return "closed by the agent".into(),
            },
            e = &mut keepalive => return e.to_string(),
            _ = node.draining.cancelled(), if !draining => {
                connection.graceful_shutdown();
                draining = true;
            }
            _ = node.tunnels_cancel.cancelled() => return "node shutting down".into(),
        }
    }
}

async fn session(
    node: Arc<Node>,
    agent: String,
    request: Request<RecvStream>,
    respond: SendResponse<Bytes>,
) {
    let started = Instant::now();
    let header = |name: &str| request.headers().get(name).and_then(|v| v.to_str().ok());
    let service = header(HEADER_SERVICE)
        .filter(|s| protocol::valid_service_name(s))
        .unwrap_or("unnamed")
        .to_owned();
    let session_id = header(HEADER_SESSION)
        .filter(|s| !s.is_empty() && s.len() <= 64 && s.bytes().all(|b| b.is_ascii_alphanumeric()))
        .map(str::to_owned)
        .unwrap_or_else(protocol::new_session_id);
    let authority = request
        .uri()
        .authority()
        .map(|a| a.as_str().to_owned())
        .unwrap_or_default();
    let span = tracing::info_span!("session", id = %session_id, service = %service, direction = m::OUTBOUND, %agent, destination = %authority);
    async move {
        let outcome = pump::catch_panic(answer(&node, &agent, &service, &session_id, &authority, request, respond, started))
            .await
            .unwrap_or(pump::INTERNAL_ERROR);
        metrics::counter!(m::SESSIONS_TOTAL, "service" => service, "direction" => m::OUTBOUND, "result" => outcome).increment(1);
    }
    .instrument(span)
    .await;
}

/// Dials the partner an agent asked for, answers the stream and relays; returns the result.
#[allow(clippy::too_many_arguments)]
async fn answer(
    node: &Node,
    agent: &str,
    service: &str,
    session: &str,
    authority: &str,
    request: Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
    started: Instant,
) -> &'static str {
    let permit = node.session_limit.clone().try_acquire_owned();
    let dialed = match permit {
        Ok(_) => dial(node, agent, &request, authority).await,
        Err(_) => {
            metrics::counter!(m::REJECTIONS, "reason" => "limit").increment(1);
            Err((Refusal::Unavailable, "DMZ node at its session limit".into()))
        }
    };
    match dialed {
        Ok((partner, dialed)) => {
            metrics::histogram!(m::SESSION_SETUP, "direction" => m::OUTBOUND)
                .record(started.elapsed().as_secs_f64());
            let mut response = Response::new(());
            if let Ok(v) = http::HeaderValue::try_from(dialed) {
                response.headers_mut().insert(HEADER_DIALED, v);
            }
            match respond.send_response(response, false) {
                Ok(send) => {
                    let dialed = partner
                        .peer_addr()
                        .map_or_else(|_| authority.to_owned(), |a| a.to_string());
                    let listed = node
                        .table
                        .add(session, service, m::OUTBOUND, &dialed, agent);
                    relay(node, service, &listed, partner, send, request.into_body()).await
                }
                Err(_) => "reset",
            }
        }
        Err((refusal, reason)) => {
            if refusal == Refusal::PolicyDenied {
                metrics::counter!(m::REJECTIONS, "reason" => "policy_denied").increment(1);
                // Rate-limited: an agent asking in a loop must not flood the log.
                if let Some(held_back) = node.log_limit.check("policy_denied") {
                    tracing::info!(%reason, held_back, "outbound destination denied by policy");
                }
            } else {
                tracing::debug!(%reason, "outbound dial failed");
            }
            let mut response = Response::new(());
            *response.status_mut() = refusal.status();
            if let Ok(v) = http::HeaderValue::try_from(reason.replace(['\r', '\n'], " ")) {
                response.headers_mut().insert(HEADER_REASON, v);
            }
            let _ = respond.send_response(response, true);
            refusal.label()
        }
    }
}

type Refused = (Refusal, String);

/// Dials the destination of `request`, then its backups in order, each checked against the
/// policy on its own (a denied one is never dialed); returns the stream and the destination
/// reached. All of them share one connect timeout.
async fn dial(
    node: &Node,
    agent: &str,
    request: &Request<RecvStream>,
    authority: &str,
) -> Result<(TcpStream, String), Refused> {
    if request.method() != Method::CONNECT {
        return Err((Refusal::BadRequest, "only CONNECT".into()));
    }
    let mut destinations = vec![authority.to_owned()];
    if let Some(backups) = request.headers().get(HEADER_BACKUP) {
        let backups = backups
            .to_str()
            .map_err(|_| (Refusal::BadRequest, format!("{HEADER_BACKUP} is not text")))?;
        destinations.extend(backups.split(',').map(|b| b.trim().to_owned()));
        if destinations.len() > 1 + MAX_BACKUPS {
            return Err((
                Refusal::BadRequest,
                format!("more than {MAX_BACKUPS} backup destinations"),
            ));
        }
    }
    let parsed = destinations
        .iter()
        .map(|d| {
            protocol::parse_destination(d)
                .ok_or((Refusal::BadRequest, format!("invalid destination {d:?}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    if node.draining.is_cancelled() {
        return Err((Refusal::Unavailable, "DMZ node draining".into()));
    }
    // Dial within the agent's patience too, so it hears the answer before it gives up.
    let agent_wait = request
        .headers()
        .get(HEADER_CONNECT_TIMEOUT)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
        .map(Duration::from_millis);
    let timeout = agent_wait.map_or(node.limits.connect_timeout, |w| {
        w.min(node.limits.connect_timeout)
    });
    let deadline = Instant::now() + timeout;
    // The rules of the identity that asked, as they are now (a reload applies to the next
    // session).
    let policy = node.policy();
    let rights = policy.rights.of(agent);
    let mut failures: Vec<Refused> = Vec::new();
    for (i, (host, port)) in parsed.iter().enumerate() {
        // A dead primary must leave its backups time: each destination gets an equal share
        // of what is left.
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        let share = left / (parsed.len() - i) as u32;
        let addrs = match allowed_addrs(
            rights.connect_allow(),
            &rights.rules_key("connect_allow"),
            host,
            *port,
            share,
        )
        .await
        {
            Ok(addrs) => addrs,
            Err(refused) => {
                if i > 0 && refused.0 == Refusal::PolicyDenied {
                    metrics::counter!(m::REJECTIONS, "reason" => "policy_denied").increment(1);
                    if let Some(held_back) = node.log_limit.check("policy_denied") {
                        tracing::info!(reason = %refused.1, held_back, "backup destination denied by policy: not dialed");
                    }
                }
                failures.push(refused);
                continue;
            }
        };
        let until = Instant::now() + share;
        match connect_any(&addrs, until).await {
            Ok(stream) => {
                if i > 0 {
                    tracing::info!(primary = %destinations[0], dialed = %destinations[i], "primary destination unreachable: backup dialed");
                }
                return Ok((stream, protocol::destination_authority(host, *port)));
            }
            Err(failed) => failures.push(failed),
        }
    }
    // A dial failure says more than a policy refusal of a backup; the primary's first.
    let rank = |r: Refusal| match r {
        Refusal::TargetRefused | Refusal::TargetTimeout => 0,
        _ => 1,
    };
    failures.sort_by_key(|(r, _)| rank(*r));
    Err(failures.into_iter().next().unwrap_or((
        Refusal::TargetTimeout,
        format!("connect to {authority} timed out"),
    )))
}

/// Connects the first of `addrs` that answers before `until`.
async fn connect_any(addrs: &[SocketAddr], until: Instant) -> Result<TcpStream, Refused> {
    let mut last = (Refusal::TargetTimeout, "connect timed out".to_owned());
    for addr in addrs {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        match tokio::time::timeout(left, TcpStream::connect(addr)).await {
            Ok(Ok(stream)) => {
                let _ = stream.set_nodelay(true);
                return Ok(stream);
            }
            Ok(Err(e)) => last = (Refusal::TargetRefused, format!("connect to {addr}: {e}")),
            Err(_) => {
                last = (
                    Refusal::TargetTimeout,
                    format!("connect to {addr} timed out"),
                )
            }
        }
    }
    Err(last)
}

/// The addresses of `host:port` the policy admits: all of them when a name rule matches the
/// host, else those inside a network rule. Names are resolved here, once.
async fn allowed_addrs(
    rules: &[ConnectRule],
    rules_key: &str,
    host: &str,
    port: u16,
    timeout: Duration,
) -> Result<Vec<SocketAddr>, Refused> {
    let denied = || {
        (
            Refusal::PolicyDenied,
            format!(
                "{} is not allowed by {rules_key}",
                protocol::destination_authority(host, port)
            ),
        )
    };
    if rules.is_empty() {
        return Err(denied());
    }
    let by_name =
        host.parse::<IpAddr>().is_err() && rules.iter().any(|r| r.admits_name(host, port));
    let resolved: Vec<SocketAddr> = match host.parse::<IpAddr>() {
        Ok(ip) => vec![SocketAddr::new(ip, port)],
        Err(_) => {
            // A name no rule could admit is not resolved at all unless a network rule exists.
            if !by_name && !rules.iter().any(|r| matches!(r, ConnectRule::Net(_))) {
                return Err(denied());
            }
            match tokio::time::timeout(timeout, tokio::net::lookup_host((host, port))).await {
                Ok(Ok(addrs)) => addrs.collect(),
                Ok(Err(e)) => {
                    return Err((
                        Refusal::TargetRefused,
                        format!("cannot resolve {host}: {e}"),
                    ));
                }
                Err(_) => {
                    return Err((
                        Refusal::TargetTimeout,
                        format!("resolving {host} timed out"),
                    ));
                }
            }
        }
    };
    let allowed: Vec<SocketAddr> = resolved
        .into_iter()
        .filter(|a| by_name || rules.iter().any(|r| r.admits_addr(*a)))
        .collect();
    if allowed.is_empty() {
        return Err(denied());
    }
    Ok(allowed)
}

async fn relay(
    node: &Node,
    service: &str,
    listed: &session::Registered,
    partner: TcpStream,
    send: h2::SendStream<Bytes>,
    recv: RecvStream,
) -> &'static str {
    let active = metrics::gauge!(m::SESSIONS_ACTIVE, "service" => service.to_owned(), "direction" => m::OUTBOUND);
    active.increment(1.0);
    let counters = PumpCounters::partner_socket(service, listed.progress.clone());
    let started = Instant::now();
    let (moved, result) = pump::pump(
        partner,
        bytes::Bytes::new(),
        send,
        recv,
        &counters,
        node.limits.pump(),
        &node.sessions_cancel,
    )
    .await;
    active.decrement(1.0);
    metrics::histogram!(m::SESSION_DURATION).record(started.elapsed().as_secs_f64());
    match &result {
        Ok(()) => tracing::debug!(
            up = moved.to_stream,
            down = moved.to_socket,
            "session closed"
        ),
        Err(e) => {
            tracing::debug!(up = moved.to_stream, down = moved.to_socket, error = %e, "session ended")
        }
    }
    pump::outcome(&result)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The rule list named in refusals.
    const K: &str = "policy.connect_allow";

    fn rules(list: &[&str]) -> Vec<ConnectRule> {
        list.iter().map(|r| r.parse().unwrap()).collect()
    }

    #[tokio::test]
    async fn ip_destinations_need_a_network_rule() {
        let r = rules(&["127.0.0.0/8:1000-2000"]);
        let t = Duration::from_secs(1);
        assert!(allowed_addrs(&r, K, "127.0.0.1", 1500, t).await.is_ok());
        assert_eq!(
            allowed_addrs(&r, K, "127.0.0.1", 80, t)
                .await
                .unwrap_err()
                .0,
            Refusal::PolicyDenied
        );
        assert_eq!(
            allowed_addrs(&r, K, "10.0.0.1", 1500, t)
                .await
                .unwrap_err()
                .0,
            Refusal::PolicyDenied
        );
        assert_eq!(
            allowed_addrs(&[], K, "127.0.0.1", 1500, t)
                .await
                .unwrap_err()
                .0,
            Refusal::PolicyDenied
        );
    }

    #[tokio::test]
    async fn names_resolve_and_are_checked_by_address_unless_a_name_rule_admits_them() {
        let t = Duration::from_secs(5);
        let by_net = rules(&["127.0.0.0/8:*"]);
        let addrs = allowed_addrs(&by_net, K, "localhost", 443, t)
            .await
            .unwrap();
        assert!(addrs.iter().all(|a| a.ip().is_loopback() && a.is_ipv4()));
        let other_net = rules(&["203.0.113.0/24:*"]);
        assert_eq!(
            allowed_addrs(&other_net, K, "localhost", 443, t)
                .await
                .unwrap_err()
                .0,
            Refusal::PolicyDenied
        );
        let by_name = rules(&["localhost:443"]);
        assert!(
            allowed_addrs(&by_name, K, "localhost", 443, t)
                .await
                .is_ok()
        );
        assert_eq!(
            allowed_addrs(&by_name, K, "localhost", 80, t)
                .await
                .unwrap_err()
                .0,
            Refusal::PolicyDenied
        );
    }
}
