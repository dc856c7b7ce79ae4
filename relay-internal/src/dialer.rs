//! The agent's tunnels: dial a DMZ node, register, serve its streams, and reconnect with
//! exponential backoff and full jitter, forever.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use relay_tunnel::backoff::Backoff;
use relay_tunnel::net::TunnelSocket;
use relay_tunnel::protocol::{
    self, ALPN_INBOUND_V1, ALPN_OUTBOUND_V1, CONTROL_PATH, RegistrationAnswer,
};
use relay_tunnel::{h2conf, keepalive, metrics as m};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_util::task::AbortOnDropHandle;
use tracing::Instrument;

use crate::Agent;
use crate::config::DmzNode;
use crate::pool::OutCarrier;
use crate::{control, inbound};

/// First reconnect delays are drawn from `[0, BACKOFF_BASE]`, so the first retry comes within 1 s.
const BACKOFF_BASE: Duration = Duration::from_secs(1);
/// Time a stopping agent gives each tunnel to close cleanly.
const CLOSE_GRACE: Duration = Duration::from_secs(1);
/// Reconnect delays never exceed this.
const BACKOFF_CAP: Duration = Duration::from_secs(30);

/// Why a tunnel attempt failed or ended.
#[derive(Debug, thiserror::Error)]
enum TunnelError {
    #[error("connect: {0}")]
    Connect(std::io::Error),
    #[error("connect: no answer within {0:?}")]
    ConnectTimeout(Duration),
    #[error("TLS handshake: {0}{hint}", hint = tls_hint(.0))]
    Tls(std::io::Error),
    #[error(
        "DMZ did not agree on ALPN {:?}",
        String::from_utf8_lossy(ALPN_INBOUND_V1)
    )]
    Alpn,
    #[error("registration: {0}")]
    Registration(String),
    /// In TLS 1.3 the DMZ checks the agent's certificate after the agent's side of the
    /// handshake is done: its refusal arrives while the registration is exchanged.
    #[error("registration: {0}{hint}", hint = tls_hint(.0))]
    RegistrationIo(std::io::Error),
    #[error("the DMZ refused this agent: {0}")]
    Refused(String),
    #[error("HTTP/2: {0}{hint}", hint = .0.get_io().map_or("", tls_hint))]
    Http2(h2::Error),
}

/// The likely causes of a failed tunnel handshake, in words, after the TLS error itself (which
/// names an alert or a parse error that means little to an operator). Empty when unknown.
fn tls_hint(e: &std::io::Error) -> &'static str {
    use rustls::AlertDescription as Alert;
    use rustls::{CertificateError, Error};
    let Some(tls) = e.get_ref().and_then(|e| e.downcast_ref::<Error>()) else {
        return match e.kind() {
            std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset => {
                " (the DMZ closed the connection during the handshake: see its log for why; \
                 at its limit of pending handshakes, or not a relay DMZ)"
            }
            _ => "",
        };
    };
    match tls {
        Error::AlertReceived(
            Alert::UnknownCA
            | Alert::DecryptError
            | Alert::BadCertificate
            | Alert::CertificateUnknown
            | Alert::UnsupportedCertificate
            | Alert::AccessDenied,
        ) => {
            " (the DMZ did not accept this agent's certificate: is it issued by the CA the DMZ \
             trusts (its tunnel.ca), still valid, and a client certificate?)"
        }
        Error::AlertReceived(Alert::CertificateExpired) => {
            " (the DMZ says this agent's certificate has expired or is not valid yet: renew it, \
             and check both clocks)"
        }
        Error::AlertReceived(Alert::CertificateRevoked) => {
            " (the DMZ says this agent's certificate is revoked (its tunnel.crl): issue a new one)"
        }
        Error::AlertReceived(Alert::CertificateRequired) => {
            " (the DMZ requires a client certificate: check tls.cert and tls.key)"
        }
        Error::AlertReceived(Alert::NoApplicationProtocol) => {
            " (the DMZ does not speak this agent's tunnel protocol version: upgrade the older side)"
        }
        Error::AlertReceived(Alert::ProtocolVersion | Alert::HandshakeFailure) => {
            " (no TLS version or cipher in common: the tunnel is TLS 1.3 only)"
        }
        Error::InvalidCertificate(CertificateError::UnknownIssuer) => {
            " (the DMZ's certificate is not issued by a CA in this agent's tls.ca)"
        }
        Error::InvalidCertificate(
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
        ) => " (the DMZ's certificate does not name server_name: set server_name to a name it has)",
        Error::InvalidCertificate(
            CertificateError::Expired
            | CertificateError::ExpiredContext { .. }
            | CertificateError::NotValidYet
            | CertificateError::NotValidYetContext { .. },
        ) => {
            " (the DMZ's certificate has expired or is not valid yet: renew it, and check both clocks)"
        }
        Error::InvalidMessage(_)
        | Error::InappropriateHandshakeMessage { .. }
        | Error::InappropriateMessage { .. } => {
            " (the peer does not speak TLS: is this address the DMZ's tunnel.listen, not a public or admin port?)"
        }
        _ => "",
    }
}

/// The role of a tunnel connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The DMZ opens partner sessions toward us (we are the HTTP/2 server).
    Inbound,
    /// We open outbound sessions through the DMZ (we are the HTTP/2 client).
    Outbound,
}

/// Keeps tunnel connection `index` of `kind` to node `node_idx` up until the agent stops.
pub async fn maintain(agent: Arc<Agent>, node_idx: usize, node: DmzNode, index: usize, kind: Kind) {
    let mut backoff = Backoff::new(BACKOFF_BASE, BACKOFF_CAP);
    let mut last_failure: Option<String> = None;
    let reconnects = metrics::counter!(m::TUNNEL_RECONNECTS, "dmz" => node.addr.clone());
    let kind_label = match kind {
        Kind::Inbound => "inbound",
        Kind::Outbound => "outbound",
    };
    loop {
        let span = tracing::info_span!("tunnel", dmz = %node.addr, conn = index, kind = kind_label);
        let mut was_up = false;
        let result = async {
            let tls = dial(&agent, &node, kind).await?;
            match kind {
                Kind::Inbound => serve_inbound(&agent, &node, index, tls, &mut was_up).await,
                Kind::Outbound => serve_outbound(&agent, node_idx, &node, tls, &mut was_up).await,
            }
        }
        .instrument(span.clone())
        .await;
        if agent.stop_tunnels.is_cancelled() {
            return;
        }
        if agent.drain.is_cancelled() {
            // A draining agent opens no new tunnel: a DMZ node would send it new sessions.
            span.in_scope(|| tracing::info!("tunnel ended during the drain; not reconnecting"));
            agent.stop_tunnels.cancelled().await;
            return;
        }
        match result {
            Ok(reason) => {
                backoff.reset();
                last_failure = None;
                agent.link_error(&node.addr, format!("tunnel lost: {reason}"));
                span.in_scope(|| tracing::warn!(%reason, "tunnel lost; reconnecting"));
            }
            Err(e) => {
                metrics::counter!(m::TUNNEL_CONNECTS, "result" => "error").increment(1);
                let text = e.to_string();
                agent.link_error(&node.addr, text.clone());
                if last_failure.as_deref() != Some(text.as_str()) {
                    span.in_scope(|| tracing::warn!(error = %text, "cannot establish tunnel; retrying with backoff"));
                    last_failure = Some(text);
                } else {
                    span.in_scope(
                        || tracing::debug!(error = %text, "cannot establish tunnel (same reason)"),
                    );
                }
            }
        }
        if was_up {
            reconnects.increment(1);
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff.next_delay()) => {}
            _ = agent.stop_tunnels.cancelled() => return,
        }
    }
}

/// TCP, then TLS with the ALPN of `kind`.
async fn dial(
    agent: &Agent,
    node: &DmzNode,
    kind: Kind,
) -> Result<TlsStream<TunnelSocket>, TunnelError> {
    let timeout = agent.limits.connect_timeout;
    let tcp = tokio::time::timeout(timeout, TcpStream::connect(node.addr.as_str()))
        .await
        .map_err(|_| TunnelError::ConnectTimeout(timeout))?
        .map_err(TunnelError::Connect)?;
    let tcp = TunnelSocket::new(tcp);
    let settings = agent.settings();
    let (connector, alpn) = match kind {
        Kind::Inbound => (&settings.connector, ALPN_INBOUND_V1),
        Kind::Outbound => (&settings.connector_out, ALPN_OUTBOUND_V1),
    };
    let mut tls = tokio::time::timeout(timeout, connector.connect(node.server_name.clone(), tcp))
        .await
        .map_err(|_| TunnelError::ConnectTimeout(timeout))?
        .map_err(TunnelError::Tls)?;
    tls.get_mut()
        .1
        .set_buffer_limit(Some(relay_tunnel::net::TUNNEL_TLS_SEND_BUFFER));
    if tls.get_ref().1.alpn_protocol() != Some(alpn) {
        return Err(TunnelError::Alpn);
    }
    Ok(tls)
}

/// Registers, then serves the session streams the DMZ opens. `Ok` says why the tunnel ended.
async fn serve_inbound(
    agent: &Arc<Agent>,
    node: &DmzNode,
    index: usize,
    mut tls: TlsStream<TunnelSocket>,
    was_up: &mut bool,
) -> Result<String, TunnelError> {
    let timeout = agent.limits.connect_timeout;
    // Watch from before the registration is sent, so no reload is missed.
    let changes = (agent.settings.subscribe(), agent.declarations.subscribe());
    let registration = agent.registration();
    let exchange = async {
        protocol::write_message(&mut tls, &registration).await?;
        // The connection's own error as it is, so that a TLS alert can be read from it.
        protocol::read_message::<RegistrationAnswer, _>(&mut tls)
            .await
            .map_err(|e| match e {
                protocol::ReadMessageError::Io(io) => io,
                other => std::io::Error::other(other),
            })
    };
    let answer = tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| TunnelError::Registration(format!("no answer within {timeout:?}")))?
        .map_err(TunnelError::RegistrationIo)?;
    if let Some(reason) = answer.refused {
        return Err(TunnelError::Refused(reason));
    }
    agent.record_verdicts(&node.addr, &answer.services, true, index);
    let activity = tls.get_ref().0.activity();
    let mut connection = tokio::time::timeout(timeout, h2conf::server().handshake::<_, Bytes>(tls))
        .await
        .map_err(|_| TunnelError::ConnectTimeout(timeout))?
        .map_err(TunnelError::Http2)?;
    let ping_pong = connection.ping_pong().expect("ping_pong is taken once");

    metrics::counter!(m::TUNNEL_CONNECTS, "result" => "ok").increment(1);
    let _up = agent.tunnel_up(&node.addr);
    *was_up = true;
    tracing::info!("tunnel up");

    let keepalive = keepalive::run(
        ping_pong,
        agent.keepalive,
        activity,
        agent.rtt_histogram(&node.addr),
    );
    tokio::pin!(keepalive);
    let mut draining = false;
    let mut changes = Some(changes);
    let mut _control_task = None;
    loop {
        tokio::select! {
            next = connection.accept() => match next {
                Some(Ok((request, mut respond))) if request.uri().path() == CONTROL_PATH => {
                    match changes.take() {
                        Some(changes) => {
                            let task = control::serve(agent.clone(), node.addr.clone(), index, changes, request, respond);
                            // Aborted when dropped: the control task ends with the tunnel.
                            _control_task = Some(AbortOnDropHandle::new(tokio::spawn(task.in_current_span())));
                        }
                        None => {
                            let mut refused = http::Response::new(());
                            *refused.status_mut() = http::StatusCode::CONFLICT;
                            let _ = respond.send_response(refused, true);
                        }
                    }
                }
                Some(Ok((_, mut respond))) if draining => {
                    // Opened before the DMZ read our drain: refused, so it sends the session
                    // (and any first bytes) to another agent.
                    respond.send_reset(h2::Reason::REFUSED_STREAM);
                }
                Some(Ok((request, respond))) => {
                    let agent2 = agent.clone();
                    let dmz = node.addr.clone();
                    agent.sessions.spawn(async move { inbound::serve(agent2, dmz, request, respond).await });
                }
                Some(Err(e)) => return Ok(format!("connection failed: {e}")),
                None => return Ok("closed by the DMZ".into()),
            },
            e = &mut keepalive, if !draining => return Ok(e.to_string()),
            _ = agent.drain.cancelled(), if !draining => {
                // The control stream tells the DMZ to open no new session here; streams in
                // flight finish. No GOAWAY until the DMZ confirms: a stream it opens meanwhile
                // must be refused (REFUSED_STREAM, certainly not processed), not ignored, or
                // the DMZ could not tell whether its first bytes reached a target.
                draining = true;
            }
            _ = agent.stop_tunnels.cancelled() => {
                // GOAWAY, then let h2 close the TLS stream (close_notify) for a clean end.
                connection.abrupt_shutdown(h2::Reason::NO_ERROR);
                // Streams that arrived before the GOAWAY are refused, not dropped unanswered.
                let refuse_late = async {
                    while let Some(next) = connection.accept().await {
                        if let Ok((_, mut respond)) = next {
                            respond.send_reset(h2::Reason::REFUSED_STREAM);
                        }
                    }
                };
                let _ = tokio::time::timeout(CLOSE_GRACE, refuse_late).await;
                return Ok("agent stopped".into());
            }
        }
    }
}

/// Offers this connection to outbound sessions until it ends.
async fn serve_outbound(
    agent: &Arc<Agent>,
    node_idx: usize,
    node: &DmzNode,
    tls: TlsStream<TunnelSocket>,
    was_up: &mut bool,
) -> Result<String, TunnelError> {
    let timeout = agent.limits.connect_timeout;
    let activity = tls.get_ref().0.activity();
    let (send, mut connection) =
        tokio::time::timeout(timeout, h2conf::client().handshake::<_, Bytes>(tls))
            .await
            .map_err(|_| TunnelError::ConnectTimeout(timeout))?
            .map_err(TunnelError::Http2)?;
    let ping_pong = connection.ping_pong().expect("ping_pong is taken once");
    let id = fastrand::u64(..);
    agent.pool.add(
        node_idx,
        Arc::new(OutCarrier {
            id,
            send,
            active: Default::default(),
            runtime: tokio::runtime::Handle::current(),
        }),
    );
    *was_up = true;
    metrics::counter!(m::TUNNEL_CONNECTS, "result" => "ok").increment(1);
    let _up = agent.tunnel_up(&node.addr);
    tracing::debug!(dmz = %node.addr, "outbound tunnel up");
    let keepalive = keepalive::run(
        ping_pong,
        agent.keepalive,
        activity,
        agent.rtt_histogram(&node.addr),
    );
    let ended = tokio::select! {
        r = &mut connection => match r {
            Ok(()) => "closed".to_owned(),
            Err(e) => format!("connection failed: {e}"),
        },
        e = keepalive => e.to_string(),
        _ = agent.stop_tunnels.cancelled() => "agent stopped".to_owned(),
    };
    agent.pool.remove(node_idx, id);
    if agent.stop_tunnels.is_cancelled() {
        // With its last handle gone, the client connection sends GOAWAY and closes cleanly.
        let _ = tokio::time::timeout(CLOSE_GRACE, connection).await;
    }
    Ok(ended)
}
