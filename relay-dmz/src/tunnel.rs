//! Tunnel side: authenticate an agent's connection, take its registration, then drive the
//! reverse HTTP/2 connection (the DMZ is the client) until it ends.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use relay_tunnel::expiry::Expiry;
use relay_tunnel::keepalive;
use relay_tunnel::metrics as m;
use relay_tunnel::net::TunnelSocket;
use relay_tunnel::protocol::{
    self, ALPN_INBOUND_V1, ALPN_OUTBOUND_V1, Registration, RegistrationAnswer,
};
use relay_tunnel::{h2conf, tls};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;
use tracing::Instrument;

use crate::Node;
use crate::registry::Carrier;
use crate::{control, outbound, partner};

/// Why an agent connection was refused before it became a tunnel.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Refused {
    #[error("{0} connections from this source are already in their handshake")]
    PendingLimit(usize),
    #[error(
        "evicted before its ClientHello ended: a newer connection from the same source took its place"
    )]
    Evicted,
    #[error("no complete TLS ClientHello within {0:?}")]
    HelloTimeout(std::time::Duration),
    #[error("TLS handshake failed: {0}")]
    Handshake(std::io::Error),
    #[error("TLS handshake not finished within {0:?}")]
    HandshakeTimeout(std::time::Duration),
    #[error("no ALPN or unknown ALPN {0:?}; expected {a:?} or {b:?}", a = String::from_utf8_lossy(ALPN_INBOUND_V1), b = String::from_utf8_lossy(ALPN_OUTBOUND_V1))]
    Alpn(Option<String>),
    #[error("certificate has no DNS or URI subject alternative name")]
    NoIdentity,
    #[error("agent identity {0:?} is not in tunnel.agents")]
    UnknownAgent(String),
    #[error("{0}")]
    NoRights(crate::rights::NotAllowed),
    #[error("registration: {0}")]
    Registration(String),
}

impl Refused {
    fn label(&self) -> &'static str {
        match self {
            // rustls refuses an ALPN it does not know during the handshake.
            Refused::Handshake(e)
                if e.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>())
                    == Some(&rustls::Error::NoApplicationProtocol) =>
            {
                "bad_alpn"
            }
            Refused::PendingLimit(_) => "pending_limit",
            Refused::Evicted => "pending_evicted",
            Refused::Handshake(_) | Refused::HandshakeTimeout(_) | Refused::HelloTimeout(_) => {
                "tls_handshake"
            }
            Refused::Alpn(_) => "bad_alpn",
            Refused::NoIdentity | Refused::UnknownAgent(_) => "unknown_agent",
            Refused::NoRights(_) => "no_rights",
            Refused::Registration(_) => "registration",
        }
    }
}

/// Counts and logs (at most once a second per reason) an agent connection refused before it
/// became a tunnel.
pub(crate) fn refuse(node: &Node, peer: SocketAddr, refused: &Refused) {
    metrics::counter!(m::REJECTIONS, "reason" => refused.label()).increment(1);
    metrics::counter!(m::TUNNEL_CONNECTS, "result" => refused.label()).increment(1);
    if let Some(held_back) = node.log_limit.check(refused.label()) {
        tracing::warn!(%peer, reason = %refused, held_back, "agent connection refused");
    }
}

/// Serves one agent connection from accept to close.
pub async fn serve(
    stream: TcpStream,
    peer: SocketAddr,
    node: Arc<Node>,
    handshake_permit: crate::pending::Slot,
) {
    let started = Instant::now();
    let stream = TunnelSocket::new(stream);
    let (mut tls_stream, agent, kind) = match authenticate(stream, &node, &handshake_permit).await {
        Ok(ok) => ok,
        Err(refused) => return refuse(&node, peer, &refused),
    };
    if let Err(refused) = admitted(&node, &agent) {
        refuse(&node, peer, &refused);
        return tell_refused(tls_stream, &node, kind, &refused).await;
    }
    let chain = tls_stream
        .get_ref()
        .1
        .peer_certificates()
        .map(<[_]>::to_vec)
        .unwrap_or_default();
    let kind_label = if kind == Kind::Outbound {
        m::OUTBOUND
    } else {
        m::INBOUND
    };
    let live = LiveGuard::new(&node, agent.clone(), chain, peer, kind_label);
    let cut = live.cut.clone();
    if kind == Kind::Outbound {
        // No registration on an outbound carrier: authenticated is done.
        drop(handshake_permit);
        let span = tracing::info_span!("tunnel", agent = %agent, %peer, kind = "outbound");
        metrics::counter!(m::TUNNEL_CONNECTS, "result" => "ok").increment(1);
        let connected = metrics::gauge!(m::TUNNELS_CONNECTED, "agent" => agent.clone());
        connected.increment(1.0);
        span.in_scope(|| tracing::debug!("outbound tunnel up"));
        let ended = tokio::select! {
            r = outbound::serve(tls_stream, agent, node.clone()).instrument(span.clone()) => r,
            _ = cut.cancelled() => "agent no longer admitted (reload)".to_owned(),
        };
        connected.decrement(1.0);
        // Info, like "agent tunnel down": an agent cut off for HTTP/2 abuse must show in the log.
        span.in_scope(|| tracing::info!(reason = %ended, "outbound tunnel down"));
        return;
    }
    let span = tracing::info_span!("tunnel", agent = %agent, %peer);
    let remaining = node
        .tunnel
        .handshake_timeout
        .saturating_sub(started.elapsed());
    let registration = match tokio::time::timeout(
        remaining,
        protocol::read_message::<Registration, _>(&mut tls_stream),
    )
    .await
    {
        Ok(Ok(reg)) => reg,
        Ok(Err(e)) => return refuse_registration(&span, peer, e.to_string()),
        Err(_) => {
            return refuse_registration(
                &span,
                peer,
                format!("not received within {:?}", node.tunnel.handshake_timeout),
            );
        }
    };
    drop(handshake_permit);
    let (answer, reservation) = node.registry.reserve(&agent, &registration);
    for v in &answer.services {
        let result = if v.accepted { "accepted" } else { "rejected" };
        metrics::counter!(m::REGISTRATIONS, "result" => result).increment(1);
        if let Some(reason) = &v.reason {
            span.in_scope(|| tracing::warn!(service = %v.name, %reason, "service rejected"));
        }
    }
    let write = protocol::write_message(&mut tls_stream, &answer);
    match tokio::time::timeout(node.tunnel.handshake_timeout, write).await {
        Ok(Ok(())) => {}
        _ => {
            return refuse_registration(
                &span,
                peer,
                "could not send the registration answer".into(),
            );
        }
    }
    let activity = tls_stream.get_ref().0.activity();
    let (send, mut connection) = match h2conf::client()
        .handshake::<_, bytes::Bytes>(tls_stream)
        .await
    {
        Ok(pair) => pair,
        Err(e) => return refuse_registration(&span, peer, format!("HTTP/2 handshake: {e}")),
    };
    let ping_pong = connection.ping_pong().expect("ping_pong is taken once");
    let (outbox, inbox) = tokio::sync::mpsc::channel(control::QUEUE);
    let carrier = Arc::new(Carrier {
        // The same id as the live tunnel, so that `/status` can join the two.
        id: live.id,
        agent: agent.clone(),
        instance: registration.instance.clone(),
        send,
        active: Default::default(),
        control: outbox,
        runtime: tokio::runtime::Handle::current(),
        retired: Default::default(),
    });
    if let Some(t) = node
        .live
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get_mut(&live.id)
    {
        t.instance = Some(registration.instance.clone());
    }
    let guard = CarrierGuard {
        node: &node,
        carrier: &carrier,
    };
    for listener in node.registry.activate(reservation, &carrier) {
        node.listeners.spawn(partner::serve(listener, node.clone()));
    }
    metrics::counter!(m::TUNNEL_CONNECTS, "result" => "ok").increment(1);
    let connected = metrics::gauge!(m::TUNNELS_CONNECTED, "agent" => agent.clone());
    connected.increment(1.0);
    let services: Vec<&str> = answer
        .services
        .iter()
        .filter(|v| v.accepted)
        .map(|v| v.name.as_str())
        .collect();
    span.in_scope(
        || tracing::info!(instance = %registration.instance, ?services, "agent tunnel up"),
    );

    let rtt = metrics::histogram!(m::TUNNEL_RTT);
    let ended = tokio::select! {
        r = &mut connection => match r {
            Ok(()) => "closed by the agent".to_owned(),
            Err(e) => format!("connection failed: {e}"),
        },
        e = keepalive::run(ping_pong, node.tunnel.keepalive, activity, rtt) => e.to_string(),
        e = control::run(&node, &carrier, inbox).instrument(span.clone()) => e,
        _ = node.tunnels_cancel.cancelled() => "node shutting down".to_owned(),
        _ = cut.cancelled() => "agent no longer admitted (reload)".to_owned(),
    };
    drop(guard);
    connected.decrement(1.0);
    span.in_scope(|| tracing::info!(reason = %ended, "agent tunnel down"));
}

fn refuse_registration(span: &tracing::Span, peer: SocketAddr, reason: String) {
    let refused = Refused::Registration(reason);
    metrics::counter!(m::REJECTIONS, "reason" => refused.label()).increment(1);
    metrics::counter!(m::TUNNEL_CONNECTS, "result" => refused.label()).increment(1);
    span.in_scope(|| tracing::warn!(%peer, reason = %refused, "agent connection refused"));
}

/// Lists a tunnel among the live ones (for reload checks) until dropped.
struct LiveGuard<'a> {
    node: &'a Node,
    id: u64,
    cut: tokio_util::sync::CancellationToken,
}

impl<'a> LiveGuard<'a> {
    fn new(
        node: &'a Node,
        agent: String,
        chain: Vec<rustls::pki_types::CertificateDer<'static>>,
        peer: SocketAddr,
        kind: &'static str,
    ) -> Self {
        let id = node.registry.next_carrier_id();
        let cut = tokio_util::sync::CancellationToken::new();
        let expiry = chain
            .first()
            .and_then(|leaf| Expiry::of_certificate(&format!("agent {agent}"), leaf));
        if let Some(e) = &expiry {
            metrics::gauge!(m::AGENT_CERT_EXPIRY, "agent" => agent.clone()).set(e.not_after as f64);
        }
        let tunnel = crate::LiveTunnel {
            agent,
            chain,
            cut: cut.clone(),
            peer,
            since: std::time::SystemTime::now(),
            kind,
            instance: None,
        };
        let first = {
            let mut live = node.live.lock().unwrap_or_else(|p| p.into_inner());
            let first = !live.values().any(|t| t.agent == tunnel.agent);
            live.insert(id, tunnel);
            first
        };
        // Warned about when the agent's first tunnel comes up (not once per connection), then
        // daily by the node's expiry watch.
        if let (true, Some(e)) = (first, expiry) {
            e.warn(node.expiry_warning(), std::time::SystemTime::now());
        }
        Self { node, id, cut }
    }
}

impl Drop for LiveGuard<'_> {
    fn drop(&mut self) {
        self.node
            .live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.id);
    }
}

/// Takes the tunnel out of the registry however the task ends, closing listeners it was the
/// last to serve.
struct CarrierGuard<'a> {
    node: &'a Node,
    carrier: &'a Carrier,
}

impl Drop for CarrierGuard<'_> {
    fn drop(&mut self) {
        self.node.registry.remove(self.carrier);
    }
}

/// The role of a tunnel connection, from its ALPN.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Inbound,
    Outbound,
}

/// Time a new agent connection has to send its whole TLS ClientHello (at most
/// `limits.handshake_timeout`). A real agent sends it at once; a peer that stalls before it
/// holds a pending slot for this long at most, and is the first evicted when its source is at
/// its share. It covers two retransmissions of a lost first segment (1 s, then 2 s).
pub const HELLO_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3);

async fn authenticate(
    stream: TunnelSocket,
    node: &Node,
    slot: &crate::pending::Slot,
) -> Result<(TlsStream<TunnelSocket>, String, Kind), Refused> {
    let t = &node.tunnel;
    let started = Instant::now();
    let hello_timeout = HELLO_TIMEOUT.min(t.handshake_timeout);
    let acceptor =
        tokio_rustls::LazyConfigAcceptor::new(rustls::server::Acceptor::default(), stream);
    let start = tokio::select! {
        r = tokio::time::timeout(hello_timeout, acceptor) => r
            .map_err(|_| Refused::HelloTimeout(hello_timeout))?
            .map_err(Refused::Handshake)?,
        _ = slot.evicted() => return Err(Refused::Evicted),
    };
    slot.hello_done();
    let policy = node.policy();
    let remaining = t.handshake_timeout.saturating_sub(started.elapsed());
    let mut tls_stream = tokio::time::timeout(
        remaining,
        start.into_stream(policy.acceptor.config().clone()),
    )
    .await
    .map_err(|_| Refused::HandshakeTimeout(t.handshake_timeout))?
    .map_err(Refused::Handshake)?;
    tls_stream
        .get_mut()
        .1
        .set_buffer_limit(Some(relay_tunnel::net::TUNNEL_TLS_SEND_BUFFER));
    let (_, conn) = tls_stream.get_ref();
    let kind = match conn.alpn_protocol() {
        Some(ALPN_INBOUND_V1) => Kind::Inbound,
        Some(ALPN_OUTBOUND_V1) => Kind::Outbound,
        other => {
            return Err(Refused::Alpn(
                other.map(|p| String::from_utf8_lossy(p).into_owned()),
            ));
        }
    };
    let agent = tls::peer_identity(conn).ok_or(Refused::NoIdentity)?;
    Ok((tls_stream, agent, kind))
}

/// Whether identity `agent`, authenticated, may hold a tunnel: listed in `tunnel.agents` (when
/// set) and with some rights on this node.
fn admitted(node: &Node, agent: &str) -> Result<(), Refused> {
    let policy = node.policy();
    if let Some(allowed) = &policy.agents
        && !allowed.iter().any(|a| a == agent)
    {
        return Err(Refused::UnknownAgent(agent.to_owned()));
    }
    if let Err(e) = policy.rights.of(agent).any_rights() {
        return Err(Refused::NoRights(e));
    }
    Ok(())
}

/// Tells an agent refused after its handshake why, in the answer to its registration (an
/// inbound carrier; an outbound carrier is just closed), so that its log says more than "peer
/// closed connection". Bounded by the handshake timeout.
async fn tell_refused(
    mut tls: TlsStream<TunnelSocket>,
    node: &Node,
    kind: Kind,
    refused: &Refused,
) {
    if kind != Kind::Inbound {
        return;
    }
    let exchange = async {
        // Read the registration first: closing with it unread would reset the connection and
        // could discard the answer before the agent reads it.
        protocol::read_message::<Registration, _>(&mut tls)
            .await
            .map_err(std::io::Error::other)?;
        let answer = RegistrationAnswer {
            services: Vec::new(),
            refused: Some(refused.to_string()),
        };
        protocol::write_message(&mut tls, &answer).await?;
        tokio::io::AsyncWriteExt::shutdown(&mut tls).await
    };
    let _ = tokio::time::timeout(node.tunnel.handshake_timeout, exchange).await;
}
