//! Outbound sessions (trading engine to partner): open a stream on a DMZ node that dials the
//! partner, trying the next node when one cannot, then pump bytes. Entry points: fixed
//! `[[outbound]]` listeners here, the HTTP CONNECT / SOCKS5 proxy in `proxy.rs`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::FutureExt;
use http::{Method, Request, StatusCode};
use relay_tunnel::h2conf::ANSWER_MARGIN;
use relay_tunnel::metrics as m;
use relay_tunnel::net;
use relay_tunnel::protocol::{
    self, HEADER_BACKUP, HEADER_CONNECT_TIMEOUT, HEADER_DIALED, HEADER_SERVICE, HEADER_SESSION,
    Refusal,
};
use relay_tunnel::pump::{self, PumpCounters};
use tokio::net::{TcpListener, TcpStream};
use tracing::Instrument;

use crate::Agent;
use crate::config::OutboundService;
use crate::pool::Lease;

/// An outbound stream the DMZ answered with 200.
pub struct Opened {
    /// Counts the session against its node until dropped.
    pub lease: Lease,
    /// Toward the partner.
    pub send: h2::SendStream<Bytes>,
    /// From the partner.
    pub recv: h2::RecvStream,
    /// The destination the DMZ reached (the primary or one of its backups).
    pub dialed: String,
}

/// Asks DMZ nodes, best first, to dial `destination` (`host:port`, then `backups` in order);
/// returns the first stream a node accepted, or the most telling refusal.
pub async fn open(
    agent: &Agent,
    destination: &str,
    backups: &[String],
    service: &str,
    session: &str,
    via: &[usize],
) -> Result<Opened, (Refusal, String)> {
    let plan = agent.pool.plan(via);
    if plan.is_empty() {
        return Err((Refusal::Unavailable, "no DMZ node connected".into()));
    }
    let mut failures: Vec<(Refusal, String)> = Vec::new();
    for lease in plan {
        let node = &agent.nodes[lease.node()];
        let wait = agent.limits.connect_timeout + ANSWER_MARGIN;
        match tokio::time::timeout(
            wait,
            request(
                &lease,
                destination,
                backups,
                service,
                session,
                agent.limits.connect_timeout,
            ),
        )
        .await
        {
            Ok(Ok((send, recv, dialed))) => {
                return Ok(Opened {
                    lease,
                    send,
                    recv,
                    dialed: dialed.unwrap_or_else(|| destination.to_owned()),
                });
            }
            Ok(Err(failure)) => {
                tracing::debug!(dmz = %node, refusal = ?failure.0, reason = %failure.1, "DMZ node could not open the session; trying the next");
                failures.push(failure);
            }
            Err(_) => {
                tracing::debug!(dmz = %node, "DMZ node did not answer in time; trying the next");
                failures.push((
                    Refusal::TargetTimeout,
                    format!("{node} did not answer within {wait:?}"),
                ));
            }
        }
    }
    // A dial failure says more about the partner than a policy or availability refusal.
    let rank = |r: Refusal| match r {
        Refusal::TargetRefused => 0,
        Refusal::TargetTimeout => 1,
        Refusal::PolicyDenied => 2,
        _ => 3,
    };
    failures.sort_by_key(|(r, _)| rank(*r));
    Err(failures.swap_remove(0))
}

/// A stream the DMZ answered with 200, and the destination it says it reached.
type Answered = (h2::SendStream<Bytes>, h2::RecvStream, Option<String>);

async fn request(
    lease: &Lease,
    destination: &str,
    backups: &[String],
    service: &str,
    session: &str,
    dial_timeout: Duration,
) -> Result<Answered, (Refusal, String)> {
    let tunnel = |e: h2::Error| (Refusal::Unavailable, format!("tunnel: {e}"));
    let mut req = Request::builder()
        .method(Method::CONNECT)
        .uri(destination)
        .body(())
        .map_err(|_| {
            (
                Refusal::BadRequest,
                format!("invalid destination {destination:?}"),
            )
        })?;
    let headers = req.headers_mut();
    let dial_ms = dial_timeout.as_millis().to_string();
    let backup_list = backups.join(",");
    for (name, value) in [
        (HEADER_SERVICE, service),
        (HEADER_SESSION, session),
        (HEADER_CONNECT_TIMEOUT, dial_ms.as_str()),
        (HEADER_BACKUP, backup_list.as_str()),
    ] {
        if value.is_empty() {
            continue;
        }
        if let Ok(v) = http::HeaderValue::try_from(value) {
            headers.insert(name, v);
        }
    }
    let mut send_request = lease.carrier().send.clone().ready().await.map_err(tunnel)?;
    let (response, mut send) = send_request.send_request(req, false).map_err(tunnel)?;
    let response = response.await.map_err(tunnel)?;
    if response.status() == StatusCode::OK {
        let dialed = response
            .headers()
            .get(HEADER_DIALED)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        return Ok((send, response.into_body(), dialed));
    }
    send.send_reset(h2::Reason::CANCEL);
    Err(Refusal::of_answer(&response))
}

/// Pumps an opened outbound session with the engine's connection and writes its audit
/// record. `prefix` holds bytes the engine sent already (after a proxy request).
pub async fn relay(
    agent: &Agent,
    service: &str,
    session: &str,
    engine: TcpStream,
    opened: Opened,
    prefix: Bytes,
    started: Instant,
) {
    let dmz = agent.nodes[opened.lease.node()].clone();
    metrics::histogram!(m::SESSION_SETUP, "direction" => m::OUTBOUND)
        .record(started.elapsed().as_secs_f64());
    let active = metrics::gauge!(m::SESSIONS_ACTIVE, "service" => service.to_owned(), "direction" => m::OUTBOUND);
    active.increment(1.0);
    let listed = agent
        .table
        .add(session, service, m::OUTBOUND, &opened.dialed, &dmz);
    let counters = PumpCounters::target_socket(service, listed.progress.clone());
    let (moved, result) = pump::pump_on(
        &opened.lease.carrier().runtime,
        engine,
        prefix,
        opened.send,
        opened.recv,
        counters,
        agent.limits.pump(),
        agent.stop_sessions.clone(),
    )
    .await;
    drop(listed);
    active.decrement(1.0);
    drop(opened.lease);
    metrics::histogram!(m::SESSION_DURATION).record(started.elapsed().as_secs_f64());
    let outcome = pump::outcome(&result);
    audit(
        service,
        session,
        &dmz,
        &opened.dialed,
        started.elapsed(),
        moved.to_socket,
        moved.to_stream,
        outcome,
    );
}

/// Runs the task of an outbound session begun at `started`. One that panics (a bug) ends
/// alone, counted and audited with the result `internal_error`. (Not an `async fn`, which
/// would hold `task` twice.)
pub fn guarded<'a>(
    service: &'a str,
    session: &'a str,
    started: Instant,
    task: impl Future<Output = ()> + 'a,
) -> impl Future<Output = ()> + 'a {
    pump::catch_panic(task).map(move |ran| {
        if ran.is_none() {
            let outcome = pump::INTERNAL_ERROR;
            audit(service, session, "-", "-", started.elapsed(), 0, 0, outcome);
        }
    })
}

/// Counts and audits an outbound session that never started.
pub fn refused(service: &str, session: &str, refusal: Refusal, reason: &str, started: Instant) {
    let level_warn = matches!(refusal, Refusal::PolicyDenied | Refusal::Unavailable);
    if level_warn {
        tracing::warn!(refusal = refusal.label(), %reason, "outbound session refused");
    } else {
        tracing::info!(refusal = refusal.label(), %reason, "outbound session failed");
    }
    audit(
        service,
        session,
        "-",
        "-",
        started.elapsed(),
        0,
        0,
        refusal.label(),
    );
}

#[allow(clippy::too_many_arguments)]
fn audit(
    service: &str,
    session: &str,
    dmz: &str,
    dialed: &str,
    duration: Duration,
    to_engine: u64,
    to_partner: u64,
    outcome: &'static str,
) {
    metrics::counter!(m::SESSIONS_TOTAL, "service" => service.to_owned(), "direction" => m::OUTBOUND, "result" => outcome).increment(1);
    tracing::info!(
        target: "relay::audit",
        session,
        service,
        direction = m::OUTBOUND,
        dmz,
        dialed,
        duration_ms = duration.as_millis() as u64,
        bytes_partner_to_target = to_engine,
        bytes_target_to_partner = to_partner,
        outcome,
        "session"
    );
}

/// Accepts engine connections on a fixed `[[outbound]]` listener until `stop` is cancelled.
pub async fn serve_fixed(agent: Arc<Agent>, spec: OutboundService, listener: TcpListener) {
    loop {
        let Some((engine, peer)) = net::accept(&listener, &agent.drain, &spec.name).await else {
            return;
        };
        let agent2 = agent.clone();
        let spec = spec.clone();
        let session = protocol::new_session_id();
        let span = tracing::info_span!("session", id = %session, service = %spec.name, direction = m::OUTBOUND, engine = %peer, destination = %spec.target);
        agent.sessions.spawn(
            async move {
                let started = Instant::now();
                let task = fixed_session(&agent2, &spec, engine, &session, started);
                guarded(&spec.name, &session, started, task).await;
            }
            .instrument(span),
        );
    }
}

/// One engine connection on a fixed `[[outbound]]` listener, accepted at `started`.
async fn fixed_session(
    agent: &Agent,
    spec: &OutboundService,
    engine: TcpStream,
    session: &str,
    started: Instant,
) {
    let name = &spec.name;
    let Ok(_permit) = agent.session_limit.clone().try_acquire_owned() else {
        let reason = "agent at its session limit";
        return refused(name, session, Refusal::Unavailable, reason, started);
    };
    let _ = engine.set_nodelay(true);
    match open(agent, &spec.target, &spec.backups, name, session, &spec.via).await {
        Ok(opened) => relay(agent, name, session, engine, opened, Bytes::new(), started).await,
        Err((refusal, reason)) => refused(name, session, refusal, &reason, started),
    }
}
