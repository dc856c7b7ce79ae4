//! Public side: the accept loop of a service and the inbound session of each partner.

use std::future::poll_fn;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use h2::RecvStream;
use http::{Method, Request, StatusCode};
use relay_tunnel::metrics as m;
use relay_tunnel::protocol::{self, Refusal, SessionMeta};
use relay_tunnel::proxyproto;
use relay_tunnel::pump::{self, PumpCounters};
use tokio::net::TcpStream;
use tracing::Instrument;

use crate::Node;
use crate::registry::{Busy, Carrier, ListenerPolicy, PublicListener, Route};
use relay_tunnel::first_bytes::{self, Expect, Sniffed};

/// Pause after an accept error (such as running out of file descriptors).
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(50);

/// Accepts partners on a service's sockets until the listener closes.
pub async fn serve(listener: Arc<PublicListener>, node: Arc<Node>) {
    m::zero_sessions(&listener.service, m::INBOUND, m::DMZ_INBOUND_RESULTS);
    for route in listener.routes().iter() {
        m::zero_sessions(&route.service, m::INBOUND, m::DMZ_INBOUND_RESULTS);
    }
    loop {
        let accepted = tokio::select! {
            _ = listener.closed.cancelled() => return,
            r = poll_fn(|cx| listener.poll_accept(cx)) => r,
        };
        match accepted {
            None => return,
            Some(Ok((stream, peer))) => {
                let node2 = node.clone();
                let routes = listener.routes();
                // A service on its own address is known at accept; on an address shared by
                // SNI, only once the ClientHello is read.
                let own = match routes.as_slice() {
                    [route] if route.policy.sni.is_empty() => Some(route.clone()),
                    _ => None,
                };
                let label = own
                    .as_ref()
                    .map_or_else(|| listener.service.clone(), |r| r.service.clone());
                let session_id = protocol::new_session_id();
                let span = tracing::info_span!("session", id = %session_id, service = %label, direction = m::INBOUND, %peer, partner = tracing::field::Empty);
                // The session runs on the shard of the tunnel it will try first, so that its
                // pump and that tunnel's connection task share a thread; here when that tunnel
                // runs here (no hand-over to another thread).
                let here = tokio::runtime::Handle::current();
                let candidates = match &own {
                    Some(route) => node.registry.candidates(&route.service, &here),
                    None => Vec::new(),
                };
                let first = candidates.first();
                let placed = first.map(Busy::new);
                let shard = first
                    .map(|c| c.runtime.clone())
                    .filter(|shard| shard.id() != here.id());
                let session = async move |stream| {
                    let accepted = Accepted {
                        peer,
                        routes,
                        own,
                        label,
                    };
                    let (outcome, partner, service) = pump::catch_panic(admit_and_relay(
                        &node2,
                        stream,
                        &accepted,
                        session_id.clone(),
                        candidates,
                        placed,
                    ))
                    .await
                    .unwrap_or((
                        pump::INTERNAL_ERROR,
                        peer,
                        accepted.label.clone(),
                    ));
                    if matches!(
                        outcome,
                        "source_denied" | "limit" | "no_agent" | "proxy_header" | "protocol"
                    ) {
                        tell_an_agent(&node2, &service, session_id, partner, outcome);
                    }
                    node2.count(&service, outcome);
                    metrics::counter!(m::SESSIONS_TOTAL, "service" => service, "direction" => m::INBOUND, "result" => outcome).increment(1);
                };
                let Some(shard) = shard else {
                    node.sessions.spawn(session(stream).instrument(span));
                    continue;
                };
                // Moves the socket to the other shard's event loop. One that cannot be
                // detached is closed.
                if let Ok(stream) = stream.into_std() {
                    node.sessions.spawn_on(
                        async move {
                            if let Ok(stream) = TcpStream::from_std(stream) {
                                session(stream).await;
                            }
                        }
                        .instrument(span),
                        &shard,
                    );
                }
            }
            Some(Err(e)) => {
                tracing::warn!(service = %listener.service, error = %e, "accept failed");
                tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
            }
        }
    }
}

/// Sends the record of a partner refused here to an agent serving the service, for its audit
/// trail: the DMZ keeps no record. Dropped (and counted) if that agent's queue is full.
fn tell_an_agent(node: &Node, service: &str, session: String, partner: SocketAddr, reason: &str) {
    let Some(carrier) = node.registry.any_carrier(service) else {
        return;
    };
    let at_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let record = protocol::RefusedSession {
        session,
        service: service.to_owned(),
        partner: partner.to_string(),
        reason: reason.to_owned(),
        at_ms,
    };
    if carrier
        .control
        .try_send(protocol::DmzMessage::Refused(record))
        .is_err()
    {
        metrics::counter!(m::REJECTIONS, "reason" => "audit_dropped").increment(1);
    }
}

/// A partner connection as accepted: where it came from and the services of its address.
struct Accepted {
    peer: SocketAddr,
    routes: Arc<Vec<Route>>,
    /// The service, when the address is its own.
    own: Option<Route>,
    /// The service, or the address when services share it by SNI.
    label: String,
}

/// Runs one partner session; returns its result label, the partner address (from the PROXY
/// header when the service expects one from a trusted proxy) and the service it reached (the
/// address, for an SNI-routed partner no service took).
async fn admit_and_relay(
    node: &Node,
    partner_stream: TcpStream,
    accepted: &Accepted,
    session: String,
    candidates: Vec<Arc<Carrier>>,
    placed: Option<Busy>,
) -> (&'static str, SocketAddr, String) {
    let accepted_at = Instant::now();
    let peer = accepted.peer;
    let label = || accepted.label.clone();
    // Taken first, so connections waiting for a PROXY header count against the limit too.
    let Ok(_permit) = node.session_limit.clone().try_acquire_owned() else {
        metrics::counter!(m::REJECTIONS, "reason" => "limit").increment(1);
        if let Some(held_back) = node.log_limit.check("limit") {
            tracing::info!(held_back, "session limit reached: closed");
        }
        return ("limit", peer, label());
    };
    // Services sharing an address agree on it (the registry checks).
    let accept_proxy = accepted.routes.iter().any(|r| r.policy.accept_proxy);
    let (partner, prefix) = if accept_proxy {
        match proxy_header(node, &partner_stream, peer).await {
            Ok(pair) => pair,
            Err(reason) => {
                metrics::counter!(m::REJECTIONS, "reason" => "proxy_header").increment(1);
                if let Some(held_back) = node.log_limit.check("proxy_header") {
                    tracing::info!(%reason, held_back, "PROXY header refused: closed");
                }
                return ("proxy_header", peer, label());
            }
        }
    } else {
        (peer, Bytes::new())
    };
    tracing::Span::current().record("partner", tracing::field::display(partner));
    let expect = accepted
        .own
        .as_ref()
        .map_or(Expect::Tls, |r| r.policy.expect);
    let gated = !expect.is_any();
    let (route, prefix) = if gated {
        // A denied source is cut before its bytes are even read.
        if denied(node, partner) {
            return (source_denied(node), partner, label());
        }
        let (bytes, server_name) = match first_bytes(node, &partner_stream, prefix, expect).await {
            Ok(pair) => pair,
            Err(reason) => {
                metrics::counter!(m::REJECTIONS, "reason" => "protocol").increment(1);
                if let Some(held_back) = node.log_limit.check("protocol") {
                    tracing::info!(%expect, %reason, held_back, "partner failed the protocol check: closed");
                }
                return ("protocol", partner, label());
            }
        };
        let route = match &accepted.own {
            Some(route) => route.clone(),
            None => {
                let routes = accepted.routes.iter().map(|r| (&r.policy.sni[..], r));
                let Some(route) = first_bytes::route(routes, server_name.as_deref()) else {
                    metrics::counter!(m::REJECTIONS, "reason" => "sni").increment(1);
                    if let Some(held_back) = node.log_limit.check("sni") {
                        tracing::info!(
                            server_name = server_name.as_deref().unwrap_or("(none)"),
                            held_back,
                            "no service for this TLS server name: closed"
                        );
                    }
                    return ("sni", partner, label());
                };
                route.clone()
            }
        };
        (route, bytes)
    } else {
        let route = accepted
            .own
            .clone()
            .expect("an address without SNI has its service");
        (route, prefix)
    };
    // Waiting for the PROXY header or the first bytes may have taken a while, and an SNI
    // partner's service was not known at accept: choose the tunnels again.
    let candidates = if accept_proxy || gated {
        node.registry
            .candidates(&route.service, &tokio::runtime::Handle::current())
    } else {
        candidates
    };
    let outcome = relay_partner(
        node,
        partner_stream,
        partner,
        &route.service,
        &route.policy,
        session,
        prefix,
        accepted_at,
        candidates,
        placed,
    )
    .await;
    (outcome, partner, route.service)
}

/// Whether `policy.deny` refuses `partner`.
fn denied(node: &Node, partner: SocketAddr) -> bool {
    node.policy()
        .deny
        .iter()
        .any(|net| net.contains(&partner.ip()))
}

/// Counts and logs (rate-limited) a partner refused by its source address.
fn source_denied(node: &Node) -> &'static str {
    metrics::counter!(m::REJECTIONS, "reason" => "source_denied").increment(1);
    if let Some(held_back) = node.log_limit.check("source_denied") {
        tracing::info!(
            held_back,
            "partner source denied (policy.deny or the service's allow list): closed"
        );
    }
    "source_denied"
}

/// Reads what the partner sends first until `expect` can tell (within
/// `limits.first_bytes_timeout` and [`first_bytes::LIMIT`]); returns every byte read, to be
/// passed on unchanged, and the TLS server name when there is one.
async fn first_bytes(
    node: &Node,
    stream: &TcpStream,
    prefix: Bytes,
    expect: Expect,
) -> Result<(Bytes, Option<String>), String> {
    let read = async {
        let mut buf = BytesMut::with_capacity(first_bytes::LIMIT);
        buf.extend_from_slice(&prefix);
        loop {
            match first_bytes::inspect(expect, &buf) {
                Sniffed::Pass { server_name } => return Ok((buf.freeze(), server_name)),
                Sniffed::Fail(reason) => return Err(reason),
                Sniffed::More if buf.len() >= first_bytes::LIMIT => {
                    return Err(format!(
                        "nothing {expect} could tell within {} bytes",
                        first_bytes::LIMIT
                    ));
                }
                Sniffed::More => {}
            }
            read_more(stream, &mut buf, "its first bytes could be checked").await?;
        }
    };
    let timeout = node.limits.first_bytes_timeout;
    tokio::time::timeout(timeout, read)
        .await
        .map_err(|_| format!("sent too little within {timeout:?} (limits.first_bytes_timeout)"))?
}

/// Reads what `stream` has into `buf`, waiting until it has something; an error naming what
/// was still missing (`before`) when the partner closed.
async fn read_more(stream: &TcpStream, buf: &mut BytesMut, before: &str) -> Result<(), String> {
    // A partner sends its first bytes right after connecting: read what is already there
    // without waiting for the event loop to report the new socket readable (one turn of it,
    // measured as a quarter of a millisecond per gated session).
    let mut now = [0u8; 2048];
    match std::io::Read::read(&mut &*socket2::SockRef::from(stream), &mut now) {
        Ok(0) => return Err(format!("connection closed before {before}")),
        Ok(n) => {
            buf.extend_from_slice(&now[..n]);
            return Ok(());
        }
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
        Err(e) => return Err(e.to_string()),
    }
    loop {
        stream.readable().await.map_err(|e| e.to_string())?;
        match stream.try_read_buf(buf) {
            Ok(0) => return Err(format!("connection closed before {before}")),
            Ok(_) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e.to_string()),
        }
    }
}

/// Reads the PROXY header a trusted proxy sends first; returns the partner address and any
/// bytes read past the header.
async fn proxy_header(
    node: &Node,
    stream: &TcpStream,
    peer: SocketAddr,
) -> Result<(SocketAddr, Bytes), String> {
    let trusted = node
        .policy()
        .trusted_proxies
        .iter()
        .any(|net| net.contains(&peer.ip()));
    if !trusted {
        return Err(format!("{peer} is not in policy.trusted_proxies"));
    }
    let read = async {
        let mut buf = BytesMut::with_capacity(256);
        loop {
            match proxyproto::parse(&buf)? {
                proxyproto::Parsed::Header { len, source } => {
                    let rest = buf.split_off(len).freeze();
                    return Ok((source.unwrap_or(peer), rest));
                }
                proxyproto::Parsed::Incomplete => {}
            }
            read_more(stream, &mut buf, "the PROXY header ended").await?;
        }
    };
    let timeout = node.limits.proxy_header_timeout;
    tokio::time::timeout(timeout, read)
        .await
        .map_err(|_| format!("no complete PROXY header within {timeout:?}"))?
}

#[allow(clippy::too_many_arguments)]
async fn relay_partner(
    node: &Node,
    partner_stream: TcpStream,
    partner: SocketAddr,
    service: &str,
    policy: &ListenerPolicy,
    session: String,
    prefix: Bytes,
    accepted_at: Instant,
    candidates: Vec<Arc<Carrier>>,
    mut placed: Option<Busy>,
) -> &'static str {
    if denied(node, partner)
        || (!policy.allow.is_empty() && !policy.allow.iter().any(|net| net.contains(&partner.ip())))
    {
        return source_denied(node);
    }
    let _ticket = match node.admission.admit(service, partner.ip()) {
        Ok(ticket) => ticket,
        Err(reason) => {
            metrics::counter!(m::REJECTIONS, "reason" => reason).increment(1);
            if let Some(held_back) = node.log_limit.check(reason) {
                tracing::info!(reason, held_back, "partner refused by a limit: closed");
            }
            return "limit";
        }
    };
    let _ = partner_stream.set_nodelay(true);
    let local = match partner_stream.local_addr() {
        Ok(a) => a,
        Err(_) => return "reset",
    };
    let meta = SessionMeta {
        partner,
        local,
        session,
    };

    let mut last_refusal = None;
    let mut early = Early::new(prefix);
    for carrier in candidates {
        // Counted on the tunnel tried now; no longer on the one chosen at accept.
        let busy = Busy::new(&carrier);
        drop(placed.take());
        let opening = open(&carrier, service, &meta, &partner_stream, &mut early);
        let failed = match tokio::time::timeout(node.limits.setup_timeout, opening).await {
            Ok(Ok((send, recv))) => {
                metrics::histogram!(m::SESSION_SETUP, "direction" => m::INBOUND)
                    .record(accepted_at.elapsed().as_secs_f64());
                // Not needed again: an idle session must not hold its read block.
                let sent_early = early.len;
                drop(early);
                return relay(
                    node,
                    &carrier,
                    busy,
                    service,
                    &meta,
                    partner_stream,
                    send,
                    recv,
                    sent_early,
                )
                .await;
            }
            Ok(Err(OpenError::Partner(e))) => {
                tracing::debug!(error = %e, "partner failed before the session was answered");
                return "reset";
            }
            Ok(Err(OpenError::Refused(refusal, reason))) => {
                tracing::debug!(agent = %carrier.agent, ?refusal, %reason, "agent refused the session; trying the next");
                last_refusal = Some(refusal);
                continue;
            }
            Ok(Err(OpenError::Retired)) => {
                tracing::debug!(agent = %carrier.agent, "tunnel left service before the session was opened; trying the next");
                continue;
            }
            Ok(Err(OpenError::Tunnel(e))) if early.exposed && !not_processed(&e) => {
                (format!("tunnel failed opening the session: {e}"), "reset")
            }
            Ok(Err(OpenError::Tunnel(e))) => {
                tracing::debug!(agent = %carrier.agent, error = %e, "tunnel failed opening the session; trying the next");
                continue;
            }
            Err(_) => {
                last_refusal = Some(Refusal::TargetTimeout);
                if !early.exposed {
                    tracing::debug!(agent = %carrier.agent, "agent did not answer in time; trying the next");
                    continue;
                }
                ("agent did not answer in time".to_owned(), "target_timeout")
            }
        };
        // The partner's first bytes went out on that stream and may have reached a target:
        // sending them to another could deliver them twice.
        let (reason, label) = failed;
        tracing::info!(agent = %carrier.agent, %reason, early_bytes = early.len, result = label, "session failed after the partner's first bytes went out: not tried elsewhere, partner closed");
        return label;
    }
    let label = match last_refusal {
        None => "no_agent",
        Some(Refusal::TargetRefused) => "target_refused",
        Some(Refusal::TargetTimeout) => "target_timeout",
        Some(_) => "error",
    };
    tracing::info!(
        result = label,
        "no agent could serve the session: partner closed"
    );
    label
}

enum OpenError {
    Refused(Refusal, String),
    /// The tunnel left the registry (its agent drains) before the stream was opened.
    Retired,
    Tunnel(h2::Error),
    Partner(std::io::Error),
}

/// Whether a stream that failed this way was certainly not handed to the agent's session
/// code: refused by HTTP/2 (REFUSED_STREAM). A GOAWAY error does not tell: h2 gives the same
/// error to the streams above the GOAWAY's last stream (not processed) and, when the
/// connection then ends, to those below it (perhaps processed).
fn not_processed(e: &h2::Error) -> bool {
    e.reason() == Some(h2::Reason::REFUSED_STREAM)
}

/// Partner bytes read before an agent answered: sent into the session stream at once, so a
/// partner who speaks first does not wait a tunnel round trip, and kept (shared, not copied)
/// to be sent again on the next tunnel if this one certainly did not start the session (a
/// refusal; see [`not_processed`]). At most [`EARLY_LIMIT`]; past that the partner waits for
/// the answer.
struct Early {
    /// What is left of the one block the early bytes are read into.
    block: BytesMut,
    chunks: Vec<Bytes>,
    len: usize,
    /// The partner closed its side before the answer (read again later, the socket says so
    /// again, and the pump passes it on).
    eof: bool,
    /// Some of the bytes went out on the stream being opened now.
    exposed: bool,
}

/// Partner bytes sent before the agent's answer: one read buffer.
const EARLY_LIMIT: usize = relay_tunnel::h2conf::READ_BUFFER;

impl Early {
    fn new(prefix: Bytes) -> Self {
        let len = prefix.len();
        let chunks = if prefix.is_empty() {
            Vec::new()
        } else {
            vec![prefix]
        };
        Self {
            block: BytesMut::new(),
            chunks,
            len,
            eof: false,
            exposed: false,
        }
    }

    fn wants_more(&self) -> bool {
        !self.eof && self.len < EARLY_LIMIT
    }

    /// Reads what the partner has sent, if anything, up to the limit. All reads share one
    /// block of [`EARLY_LIMIT`] bytes, however small they are.
    fn read(&mut self, partner: &TcpStream) -> std::io::Result<Option<Bytes>> {
        if self.block.capacity() == 0 {
            self.block = BytesMut::with_capacity(EARLY_LIMIT - self.len);
        }
        match partner.try_read_buf(&mut self.block) {
            Ok(0) => {
                self.eof = true;
                Ok(None)
            }
            Ok(n) => {
                self.len += n;
                let chunk = self.block.split().freeze();
                self.chunks.push(chunk.clone());
                Ok(Some(chunk))
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(e),
        }
    }
}

/// Opens a session stream on `carrier` and waits for the agent's answer, meanwhile sending it
/// the partner's first bytes (see [`Early`]).
async fn open(
    carrier: &Carrier,
    service: &str,
    meta: &SessionMeta,
    partner: &TcpStream,
    early: &mut Early,
) -> Result<(h2::SendStream<Bytes>, RecvStream), OpenError> {
    let mut req = Request::builder()
        .method(Method::CONNECT)
        .uri(protocol::session_authority(service, meta.local.port()))
        .body(())
        .expect("a service name and a port form a valid authority");
    meta.to_headers(req.headers_mut());
    early.exposed = false;
    let mut send_request = carrier
        .send
        .clone()
        .ready()
        .await
        .map_err(OpenError::Tunnel)?;
    let (response, mut send) = {
        let retired = crate::registry::lock(&carrier.retired);
        if *retired {
            return Err(OpenError::Retired);
        }
        send_request
            .send_request(req, false)
            .map_err(OpenError::Tunnel)?
    };
    tokio::pin!(response);
    // A stream that takes no more data has been refused or has failed: its answer, or the
    // error in its place, says which.
    let mut sending = true;
    let mut pacing = pump::Pacing::default();
    for chunk in &early.chunks {
        early.exposed = true;
        if pump::send_all(&mut send, chunk.clone(), &mut pacing)
            .await
            .is_err()
        {
            sending = false;
            break;
        }
    }
    let response = loop {
        tokio::select! {
            biased;
            r = &mut response => break r.map_err(OpenError::Tunnel)?,
            r = partner.readable(), if sending && early.wants_more() => {
                match r.and_then(|()| early.read(partner)) {
                    Ok(Some(chunk)) => {
                        early.exposed = true;
                        sending = pump::send_all(&mut send, chunk, &mut pacing).await.is_ok();
                    }
                    Ok(None) => {}
                    Err(e) => {
                        send.send_reset(h2::Reason::CANCEL);
                        return Err(OpenError::Partner(e));
                    }
                }
            }
        }
    };
    if response.status() == StatusCode::OK {
        return Ok((send, response.into_body()));
    }
    send.send_reset(h2::Reason::CANCEL);
    let (refusal, reason) = Refusal::of_answer(&response);
    Err(OpenError::Refused(refusal, reason))
}

#[allow(clippy::too_many_arguments)]
async fn relay(
    node: &Node,
    carrier: &Carrier,
    busy: Busy,
    service: &str,
    meta: &SessionMeta,
    partner: TcpStream,
    send: h2::SendStream<Bytes>,
    recv: RecvStream,
    early: usize,
) -> &'static str {
    let active = metrics::gauge!(m::SESSIONS_ACTIVE, "service" => service.to_owned(), "direction" => m::INBOUND);
    active.increment(1.0);
    let listed = node.table.add(
        &meta.session,
        service,
        m::INBOUND,
        &meta.partner.to_string(),
        &carrier.agent,
    );
    let counters = PumpCounters::partner_socket(service, listed.progress.clone());
    // Sent while the session was being answered.
    counters.to_stream.increment(early as u64);
    listed
        .progress
        .to_target
        .fetch_add(early as u64, std::sync::atomic::Ordering::Relaxed);
    let started = Instant::now();
    let (moved, result) = if tokio::runtime::Handle::current().id() == carrier.runtime.id() {
        let stop = &node.sessions_cancel;
        pump::pump(
            partner,
            Bytes::new(),
            send,
            recv,
            &counters,
            node.limits.pump(),
            stop,
        )
        .await
    } else {
        // Another tunnel than the one expected at accept time carries it: hop to its shard.
        let stop = node.sessions_cancel.clone();
        pump::pump_on(
            &carrier.runtime,
            partner,
            Bytes::new(),
            send,
            recv,
            counters,
            node.limits.pump(),
            stop,
        )
        .await
    };
    // The early bytes are in the session's count already.
    let up = moved.to_stream;
    active.decrement(1.0);
    drop(busy);
    metrics::histogram!(m::SESSION_DURATION).record(started.elapsed().as_secs_f64());
    let label = pump::outcome(&result);
    match result {
        Ok(()) => {
            tracing::debug!(agent = %carrier.agent, up, down = moved.to_socket, "session closed")
        }
        Err(e) => {
            tracing::debug!(agent = %carrier.agent, up, down = moved.to_socket, error = %e, "session ended")
        }
    }
    label
}
