//! The outbound proxy: HTTP CONNECT (served by hyper) and SOCKS5 on one port, told apart by
//! the first byte (SOCKS5 starts with 0x05, an HTTP request with a letter).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::{TokioIo, TokioTimer};
use relay_tunnel::metrics as m;
use relay_tunnel::net;
use relay_tunnel::protocol::{self, Refusal};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tracing::Instrument;

use crate::Agent;
use crate::outbound;
use crate::socks5::{self, reply};

/// The `service` label of proxy sessions.
pub const SERVICE: &str = "proxy";
/// Time an engine has to send its proxy request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest SOCKS5 greeting plus request.
const MAX_SOCKS_REQUEST: usize = 600;

/// Accepts engine connections until the agent drains.
pub async fn serve(agent: Arc<Agent>, listener: TcpListener) {
    loop {
        let Some((engine, peer)) = net::accept(&listener, &agent.drain, "outbound proxy").await
        else {
            return;
        };
        let agent2 = agent.clone();
        let session = protocol::new_session_id();
        let span = tracing::info_span!("session", id = %session, service = SERVICE, direction = m::OUTBOUND, engine = %peer, destination = tracing::field::Empty);
        agent.sessions.spawn(
            async move {
                let started = Instant::now();
                let task = handle(agent2, engine, session.clone(), started);
                outbound::guarded(SERVICE, &session, started, task).await
            }
            .instrument(span),
        );
    }
}

async fn handle(agent: Arc<Agent>, engine: TcpStream, session: String, started: Instant) {
    let Ok(permit) = agent.session_limit.clone().try_acquire_owned() else {
        return outbound::refused(
            SERVICE,
            &session,
            Refusal::Unavailable,
            "agent at its session limit",
            started,
        );
    };
    let _ = engine.set_nodelay(true);
    let mut first = [0u8; 1];
    match tokio::time::timeout(REQUEST_TIMEOUT, engine.peek(&mut first)).await {
        Ok(Ok(1)) => {}
        _ => {
            metrics::counter!(m::REJECTIONS, "reason" => "bad_proxy_request").increment(1);
            tracing::debug!("engine sent no proxy request");
            return;
        }
    }
    if first[0] == socks5::VERSION {
        let _permit = permit;
        socks(&agent, engine, &session, started).await;
    } else {
        // The CONNECT session outlives this task (it runs after the upgrade): it takes the
        // permit along.
        http_connect(agent.clone(), engine, session, started, permit).await;
    }
}

async fn socks(agent: &Agent, mut engine: TcpStream, session: &str, started: Instant) {
    let handshake = async {
        let mut buf = BytesMut::with_capacity(64);
        let greeting_len = loop {
            if let Some(n) = socks5::parse_greeting(&buf)? {
                break n;
            }
            read_more(&mut engine, &mut buf).await?;
        };
        let _ = buf.split_to(greeting_len);
        engine
            .write_all(&[socks5::VERSION, 0])
            .await
            .map_err(|_| socks5::Socks5Error::Domain)?;
        loop {
            if let Some((n, host, port)) = socks5::parse_request(&buf)? {
                let _ = buf.split_to(n);
                return Ok::<_, socks5::Socks5Error>((host, port, buf.freeze()));
            }
            read_more(&mut engine, &mut buf).await?;
        }
    };
    let (host, port, prefix) = match tokio::time::timeout(REQUEST_TIMEOUT, handshake).await {
        Ok(Ok(request)) => request,
        Ok(Err(e)) => {
            if e == socks5::Socks5Error::NoAcceptableMethod {
                let _ = engine.write_all(&[socks5::VERSION, 0xff]).await;
            } else if let Some(code) = e.reply_code() {
                let _ = engine.write_all(&socks5::reply(code)).await;
            }
            metrics::counter!(m::REJECTIONS, "reason" => "bad_proxy_request").increment(1);
            tracing::debug!(error = %e, "bad SOCKS5 request");
            return;
        }
        Err(_) => return,
    };
    let destination = protocol::destination_authority(&host, port);
    match outbound::open(agent, &destination, &[], SERVICE, session, &[]).await {
        Ok(opened) => {
            if engine.write_all(&socks5::reply(reply::OK)).await.is_ok() {
                outbound::relay(agent, SERVICE, session, engine, opened, prefix, started).await;
            }
        }
        Err((refusal, reason)) => {
            let code = match refusal {
                Refusal::PolicyDenied => reply::NOT_ALLOWED,
                Refusal::TargetRefused => reply::REFUSED,
                Refusal::TargetTimeout => reply::HOST_UNREACHABLE,
                _ => reply::FAILURE,
            };
            let _ = engine.write_all(&socks5::reply(code)).await;
            outbound::refused(SERVICE, session, refusal, &reason, started);
        }
    }
}

/// Reads more bytes of a SOCKS5 exchange, within the size limit.
async fn read_more(engine: &mut TcpStream, buf: &mut BytesMut) -> Result<(), socks5::Socks5Error> {
    if buf.len() >= MAX_SOCKS_REQUEST {
        return Err(socks5::Socks5Error::Domain);
    }
    match engine.read_buf(buf).await {
        Ok(0) | Err(_) => Err(socks5::Socks5Error::Domain),
        Ok(_) => Ok(()),
    }
}

async fn http_connect(
    agent: Arc<Agent>,
    engine: TcpStream,
    session: String,
    started: Instant,
    permit: tokio::sync::OwnedSemaphorePermit,
) {
    let permit = Arc::new(std::sync::Mutex::new(Some(permit)));
    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
        let agent = agent.clone();
        let session = session.clone();
        let permit = permit.lock().unwrap_or_else(|p| p.into_inner()).take();
        async move { Ok::<_, Infallible>(answer_connect(agent, req, session, started, permit).await) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(REQUEST_TIMEOUT)
        .keep_alive(false)
        .serve_connection(TokioIo::new(engine), service)
        .with_upgrades();
    if let Err(e) = conn.await {
        tracing::debug!(error = %e, "proxy connection ended with an error");
    }
}

async fn answer_connect(
    agent: Arc<Agent>,
    mut req: Request<Incoming>,
    session: String,
    started: Instant,
    permit: Option<tokio::sync::OwnedSemaphorePermit>,
) -> Response<Full<Bytes>> {
    if req.method() != Method::CONNECT {
        metrics::counter!(m::REJECTIONS, "reason" => "bad_proxy_request").increment(1);
        return text(
            StatusCode::METHOD_NOT_ALLOWED,
            "this proxy only supports CONNECT\n".into(),
        );
    }
    let Some(destination) = req
        .uri()
        .authority()
        .and_then(|a| protocol::parse_destination(a.as_str()))
        .map(|(h, p)| protocol::destination_authority(&h, p))
    else {
        metrics::counter!(m::REJECTIONS, "reason" => "bad_proxy_request").increment(1);
        return text(StatusCode::BAD_REQUEST, "CONNECT needs host:port\n".into());
    };
    tracing::Span::current().record("destination", destination.as_str());
    match outbound::open(&agent, &destination, &[], SERVICE, &session, &[]).await {
        Ok(opened) => {
            let upgrade = hyper::upgrade::on(&mut req);
            let agent2 = agent.clone();
            agent.sessions.spawn(
                async move {
                    let _permit = permit;
                    let task = relay_upgraded(&agent2, upgrade, opened, &session, started);
                    outbound::guarded(SERVICE, &session, started, task).await
                }
                .in_current_span(),
            );
            Response::new(Full::new(Bytes::new()))
        }
        Err((refusal, reason)) => {
            let status = match refusal {
                Refusal::PolicyDenied => StatusCode::FORBIDDEN,
                Refusal::TargetTimeout => StatusCode::GATEWAY_TIMEOUT,
                Refusal::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
                _ => StatusCode::BAD_GATEWAY,
            };
            outbound::refused(SERVICE, &session, refusal, &reason, started);
            text(status, format!("{reason}\n"))
        }
    }
}

/// Relays a CONNECT session once hyper hands the engine's connection over.
async fn relay_upgraded(
    agent: &Agent,
    upgrade: OnUpgrade,
    opened: outbound::Opened,
    session: &str,
    started: Instant,
) {
    let upgraded = match upgrade.await {
        Ok(u) => u,
        Err(e) => return tracing::debug!(error = %e, "CONNECT upgrade failed"),
    };
    match upgraded.downcast::<TokioIo<TcpStream>>() {
        Ok(parts) => {
            let engine = parts.io.into_inner();
            let prefix = parts.read_buf;
            outbound::relay(agent, SERVICE, session, engine, opened, prefix, started).await
        }
        Err(_) => tracing::error!("CONNECT upgrade is not the engine's TCP stream"),
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
}
