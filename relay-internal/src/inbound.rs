//! Inbound sessions: a stream from the DMZ names a service; the agent connects the target from
//! its own config (never an address the DMZ chose) and pumps bytes.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use h2::RecvStream;
use h2::server::SendResponse;
use http::{Method, Request, Response, StatusCode};
use relay_tunnel::metrics as m;
use relay_tunnel::protocol::{self, HEADER_REASON, Refusal, SessionMeta};
use relay_tunnel::pump::{self, PumpCounters, PumpError};
use tokio::net::TcpStream;
use tracing::Instrument;

use crate::Agent;
use crate::config::InboundService;
use crate::health::{self, ServiceState, Source};

/// Serves one session stream opened by the DMZ node `dmz`.
pub async fn serve(
    agent: Arc<Agent>,
    dmz: String,
    request: Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
) {
    let started = Instant::now();
    let (service, state, port_offset, meta) = match parse(&agent, &request) {
        Ok(parsed) => parsed,
        Err((refusal, reason)) => {
            metrics::counter!(m::REJECTIONS, "reason" => refusal.label()).increment(1);
            // A bad request from a DMZ node may come in floods: log a sample, count them all.
            if let Some(held_back) = agent.log_limit.check(refusal.label()) {
                tracing::warn!(%dmz, authority = ?request.uri().authority().map(|a| a.as_str()), %reason, held_back, "session stream refused");
            }
            refuse(&mut respond, refusal, &reason);
            return;
        }
    };
    let span = tracing::info_span!("session", id = %meta.session, service = %service.name, direction = m::INBOUND, partner = %meta.partner, %dmz);
    async move {
        let result =
            pump::catch_panic(run(&agent, &dmz, &service, &state, port_offset, &meta, request, respond, started))
                .await;
        let duration = started.elapsed();
        if let Some(Ok(_)) = result {
            metrics::histogram!(m::SESSION_DURATION).record(duration.as_secs_f64());
        }
        let (outcome, moved) = match &result {
            Some(Ok((moved, ran))) => (pump::outcome(ran), *moved),
            Some(Err(refusal)) => (refusal.label(), Default::default()),
            None => (pump::INTERNAL_ERROR, Default::default()),
        };
        metrics::counter!(m::SESSIONS_TOTAL, "service" => service.name.clone(), "direction" => m::INBOUND, "result" => outcome).increment(1);
        tracing::info!(
            target: "relay::audit",
            session = %meta.session,
            service = %service.name,
            direction = m::INBOUND,
            partner = %meta.partner,
            dmz = %dmz,
            duration_ms = duration.as_millis() as u64,
            bytes_partner_to_target = moved.to_socket,
            bytes_target_to_partner = moved.to_stream,
            outcome,
            "session"
        );
    }
    .instrument(span)
    .await;
}

type Parsed = (Arc<InboundService>, Arc<ServiceState>, u16, SessionMeta);

fn parse(agent: &Agent, request: &Request<RecvStream>) -> Result<Parsed, (Refusal, String)> {
    if request.method() != Method::CONNECT {
        return Err((
            Refusal::BadRequest,
            format!("method {} is not CONNECT", request.method()),
        ));
    }
    let authority = request
        .uri()
        .authority()
        .ok_or((Refusal::BadRequest, "no authority".to_owned()))?;
    let (name, port) = protocol::parse_session_authority(authority.as_str()).ok_or_else(|| {
        (
            Refusal::UnknownService,
            format!("{authority} does not name a service"),
        )
    })?;
    // Both from one snapshot: a reload may replace the settings meanwhile.
    let settings = agent.settings();
    let (service, state) = settings
        .services
        .get(name)
        .cloned()
        .zip(settings.health.get(name).cloned())
        .ok_or_else(|| (Refusal::UnknownService, format!("no service {name:?} here")))?;
    if !service.listen.ports.contains(port) {
        return Err((
            Refusal::UnknownService,
            format!("port {port} is not a port of service {name:?}"),
        ));
    }
    let meta = SessionMeta::from_headers(request.headers()).ok_or((
        Refusal::BadRequest,
        "missing or malformed session metadata".to_owned(),
    ))?;
    let offset = port - service.listen.ports.first;
    Ok((service, state, offset, meta))
}

fn refuse(respond: &mut SendResponse<Bytes>, refusal: Refusal, reason: &str) {
    let mut response = Response::new(());
    *response.status_mut() = refusal.status();
    if let Ok(value) = http::HeaderValue::try_from(reason.replace(['\r', '\n'], " ")) {
        response.headers_mut().insert(HEADER_REASON, value);
    }
    let _ = respond.send_response(response, true);
}

type Ran = (pump::Transferred, Result<(), PumpError>);

/// Connects the targets of `service` in the order its balance gives, skipping those that
/// refuse or time out (each failure counts toward the target's `fall`); returns the stream
/// and the index of the target, or the last failure when none could be reached.
async fn connect(
    agent: &Agent,
    service: &InboundService,
    state: &ServiceState,
    port_offset: u16,
    meta: &SessionMeta,
) -> Result<(TcpStream, usize), (Refusal, String)> {
    let timeout = agent.limits.connect_timeout;
    let mut last = (Refusal::TargetRefused, "no target".to_owned());
    let mut changed = false;
    for i in state.order() {
        let target = &state.targets[i];
        let (host, port) = target
            .spec
            .authority_for_offset(port_offset)
            .expect("config checks that target and listen ranges have the same size");
        let failure =
            match tokio::time::timeout(timeout, TcpStream::connect((host.as_str(), port))).await {
                Ok(Ok(mut stream)) => {
                    let _ = stream.set_nodelay(true);
                    match service.proxy_protocol {
                        Some(version) => {
                            use tokio::io::AsyncWriteExt;
                            let header =
                                relay_tunnel::proxyproto::encode(version, meta.partner, meta.local);
                            match tokio::time::timeout(timeout, stream.write_all(&header)).await {
                                Ok(Ok(())) => Ok(stream),
                                _ => Err((
                                    Refusal::TargetRefused,
                                    "target closed before the PROXY header was sent".to_owned(),
                                )),
                            }
                        }
                        None => Ok(stream),
                    }
                }
                Ok(Err(e)) => Err((
                    Refusal::TargetRefused,
                    format!("target connect failed: {e}"),
                )),
                Err(_) => Err((
                    Refusal::TargetTimeout,
                    format!("target connect timed out after {timeout:?}"),
                )),
            };
        match failure {
            Ok(stream) => {
                state.record(i, Ok(()), Source::Session);
                if changed || state.evaluate() {
                    agent.declarations_changed();
                }
                return Ok((stream, i));
            }
            Err((refusal, reason)) => {
                metrics::counter!(m::TARGET_FAILOVERS, "service" => service.name.clone(), "target" => target.label.clone()).increment(1);
                // A dead target under load fails every session: log a sample, count them all.
                if let Some(held_back) = agent.log_limit.check("target_connect") {
                    tracing::warn!(target = %format_args!("{host}:{port}"), %reason, held_back, "target connect failed; trying the next target");
                }
                state.record(i, Err(&reason), Source::Session);
                changed |= state.evaluate();
                last = (refusal, reason);
            }
        }
    }
    if changed {
        agent.declarations_changed();
    }
    Err(last)
}

#[allow(clippy::too_many_arguments)]
async fn run(
    agent: &Agent,
    dmz: &str,
    service: &InboundService,
    state: &ServiceState,
    port_offset: u16,
    meta: &SessionMeta,
    request: Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
    started: Instant,
) -> Result<Ran, Refusal> {
    let Ok(_permit) = agent.session_limit.clone().try_acquire_owned() else {
        refuse(
            &mut respond,
            Refusal::Unavailable,
            "agent at its session limit",
        );
        return Err(Refusal::Unavailable);
    };
    let (target, chosen) = match connect(agent, service, state, port_offset, meta).await {
        Ok(connected) => connected,
        Err((refusal, reason)) => {
            refuse(&mut respond, refusal, &reason);
            return Err(refusal);
        }
    };
    let _in_flight = health::InFlight::new(&state.targets[chosen]);
    let send = match respond.send_response(
        Response::builder()
            .status(StatusCode::OK)
            .body(())
            .expect("static response"),
        false,
    ) {
        Ok(send) => send,
        Err(e) => {
            tracing::debug!(error = %e, "DMZ gave up on the session before it started");
            return Err(Refusal::Unavailable);
        }
    };
    // On the agent, setup is the stream's arrival to the target connected and answered.
    let setup = started.elapsed();
    metrics::histogram!(m::SESSION_SETUP, "direction" => m::INBOUND).record(setup.as_secs_f64());
    let active = metrics::gauge!(m::SESSIONS_ACTIVE, "service" => service.name.clone(), "direction" => m::INBOUND);
    active.increment(1.0);
    let listed = agent.table.add(
        &meta.session,
        &service.name,
        m::INBOUND,
        &meta.partner.to_string(),
        dmz,
    );
    let counters = PumpCounters::target_socket(&service.name, listed.progress.clone());
    let ran = pump::pump(
        target,
        bytes::Bytes::new(),
        send,
        request.into_body(),
        &counters,
        agent.limits.pump(),
        &agent.stop_sessions,
    )
    .await;
    active.decrement(1.0);
    Ok(ran)
}
