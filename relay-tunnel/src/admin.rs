//! The admin endpoint both binaries serve: `GET /livez`, `GET /readyz`, `GET /metrics`,
//! `POST /reload`, `GET /status`, `GET /sessions`, `DELETE /sessions/{id}` (and the agent's
//! `POST /drain`, `POST /resume`); who may use what is in [`access`].

mod access;

pub use access::{Access, AdminTls, Guard, MIN_TOKEN_LEN, RawAdmin, Token};

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::session::Kill;

/// Concurrent admin connections served; more wait in the backlog.
const MAX_CONNECTIONS: usize = 64;
/// How long a client may take to send its request headers.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one admin connection may stay open.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(30);

/// What a binary answers on its admin endpoint beyond `/livez` and `/metrics`.
pub trait Api: Send + Sync + 'static {
    /// `/readyz`: `Ok` when ready, else the one-line reason.
    fn ready(&self) -> Result<(), String>;
    /// `POST /reload` and SIGHUP: a summary of what changed, or why nothing did.
    fn reload(&self) -> Result<String, String>;
    /// `GET /status`: the node, its peers and its services, as JSON.
    fn status(&self) -> serde_json::Value;
    /// The sessions being relayed (`GET /sessions`, `DELETE /sessions/{id}`).
    fn sessions(&self) -> &crate::session::Table;
    /// `POST /drain` (`true`) and `POST /resume` (`false`): what changed, or why not. `None`
    /// where the binary has no such operation (404).
    fn drain(&self, _drain: bool) -> Option<Result<String, String>> {
        None
    }
}

/// Counts and logs the outcome of a reload, and passes it on.
pub fn counted_reload(result: Result<String, String>) -> Result<String, String> {
    let label = if result.is_ok() { "ok" } else { "error" };
    metrics::counter!(crate::metrics::CONFIG_RELOADS, "result" => label).increment(1);
    match &result {
        Ok(summary) => tracing::info!(%summary, "config reloaded"),
        Err(reason) => tracing::error!(%reason, "config reload failed; the running config stays"),
    }
    result
}

/// The admin endpoint, the metrics upkeep and the reload signal of a running binary.
pub struct Control {
    stop: CancellationToken,
    tasks: TaskTracker,
}

/// Starts the reload signal (SIGHUP, until `shutdown`), the metrics upkeep (every
/// [`telemetry::UPKEEP_PERIOD`](crate::telemetry::UPKEEP_PERIOD), scraped or not) and, when
/// `listener` is given, the admin endpoint. The last two run until [`Control::stop`], so that
/// probes and scrapes are answered, and the sessions that end, counted, while the binary drains.
pub fn start(
    listener: Option<TcpListener>,
    guard: Arc<Guard>,
    api: Arc<dyn Api>,
    metrics: PrometheusHandle,
    shutdown: &CancellationToken,
) -> Control {
    let on_hup = api.clone();
    tokio::spawn(crate::signals::on_reload(
        move || on_hup.reload(),
        shutdown.clone(),
    ));
    let stop = CancellationToken::new();
    let tasks = TaskTracker::new();
    tasks.spawn(crate::telemetry::upkeep(
        metrics.clone(),
        crate::telemetry::UPKEEP_PERIOD,
        stop.clone(),
    ));
    if let Some(l) = listener {
        let open_beyond_host = l.local_addr().is_ok_and(|a| !a.ip().is_loopback());
        if open_beyond_host && guard.access().token.is_none() {
            tracing::warn!(
                "admin endpoint on a non-loopback address without admin.token_file: /metrics and \
                 every other path answer anyone who can reach it"
            );
        }
        tasks.spawn(serve(l, guard, api, metrics, stop.clone()));
    }
    tasks.close();
    Control { stop, tasks }
}

impl Control {
    /// Stops the admin endpoint and the metrics upkeep, and waits for them.
    pub async fn stop(self) {
        self.stop.cancel();
        self.tasks.wait().await;
    }
}

/// Serves the admin endpoint on `listener` until `shutdown` is cancelled.
async fn serve(
    listener: TcpListener,
    guard: Arc<Guard>,
    api: Arc<dyn Api>,
    metrics: PrometheusHandle,
    shutdown: CancellationToken,
) {
    let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let tasks = TaskTracker::new();
    loop {
        let permit = tokio::select! {
            _ = shutdown.cancelled() => break,
            p = limit.clone().acquire_owned() => p.expect("semaphore is never closed"),
        };
        let Some((stream, peer)) = crate::net::accept(&listener, &shutdown, "admin listener").await
        else {
            break;
        };
        // Reload changes the running config: only from this host (SIGHUP or a local POST),
        // even when the admin endpoint listens on every interface for probes and scrapes.
        let local = peer.ip().is_loopback();
        let guard = guard.clone();
        let api = api.clone();
        let metrics = metrics.clone();
        let tls = guard.access().tls;
        tasks.spawn(async move {
            let _permit = permit;
            let served = async {
                let Some(tls) = tls else {
                    let request = Request { peer, local, client_certified: false };
                    return answer(stream, request, guard, api, metrics).await;
                };
                let Ok(Ok(stream)) = tokio::time::timeout(HEADER_TIMEOUT, tls.acceptor.accept(stream)).await
                else {
                    if let Some(suppressed) = guard.log_limit.check("tls") {
                        tracing::warn!(%peer, suppressed, "admin TLS handshake failed or timed out");
                    }
                    return;
                };
                let client_certified = stream.get_ref().1.peer_certificates().is_some();
                let request = Request { peer, local, client_certified };
                answer(stream, request, guard, api, metrics).await;
            };
            let _ = tokio::time::timeout(CONNECTION_TIMEOUT, served).await;
        });
    }
    drop(listener);
    tasks.close();
    let _ = tokio::time::timeout(Duration::from_secs(1), tasks.wait()).await;
}

/// Where an admin request comes from.
#[derive(Clone, Copy)]
struct Request {
    peer: std::net::SocketAddr,
    /// From a loopback address.
    local: bool,
    /// Over TLS with a client certificate the CA verified.
    client_certified: bool,
}

/// Serves the one request of an admin connection.
async fn answer<IO>(
    io: IO,
    from: Request,
    guard: Arc<Guard>,
    api: Arc<dyn Api>,
    metrics: PrometheusHandle,
) where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |req| {
        let response = route(&req, from, &guard, api.as_ref(), &metrics);
        async move { Ok::<_, Infallible>(response) }
    });
    let _ = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .keep_alive(false)
        .serve_connection(TokioIo::new(io), service)
        .await;
}

fn route(
    req: &http::Request<Incoming>,
    from: Request,
    guard: &Guard,
    api: &dyn Api,
    metrics: &PrometheusHandle,
) -> Response<Full<Bytes>> {
    let (peer, local) = (from.peer, from.local);
    if let Err(reason) = guard.allows(req.uri().path(), req.headers(), from.client_certified) {
        metrics::counter!(crate::metrics::ADMIN_REJECTIONS, "reason" => reason).increment(1);
        if let Some(suppressed) = guard.log_limit.check(reason) {
            tracing::warn!(%peer, reason, suppressed, "admin request without a valid credential refused");
        }
        // Nothing about the node: not even whether the path exists.
        let mut response = text(StatusCode::UNAUTHORIZED, "unauthorized\n".into());
        response.headers_mut().insert(
            http::header::WWW_AUTHENTICATE,
            http::HeaderValue::from_static("Bearer"),
        );
        return response;
    }
    let path = req.uri().path();
    if path == "/reload" {
        return match (req.method(), local) {
            (&Method::POST, true) => match api.reload() {
                Ok(summary) => text(StatusCode::OK, format!("{summary}\n")),
                Err(reason) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("{reason}\n")),
            },
            (&Method::POST, false) => text(
                StatusCode::FORBIDDEN,
                "reload is accepted from this host only\n".into(),
            ),
            _ => text(StatusCode::METHOD_NOT_ALLOWED, "only POST\n".into()),
        };
    }
    if let Some(id) = path.strip_prefix("/sessions/") {
        if req.method() != Method::DELETE {
            return text(StatusCode::METHOD_NOT_ALLOWED, "only DELETE\n".into());
        }
        return match api.sessions().kill(id) {
            Kill::Killed => {
                tracing::info!(session = id, %peer, "session killed by an operator");
                text(StatusCode::OK, format!("session {id} killed\n"))
            }
            Kill::NotFound => text(StatusCode::NOT_FOUND, format!("no session {id} here\n")),
            Kill::Malformed => text(
                StatusCode::BAD_REQUEST,
                "a session id is 16 hexadecimal digits\n".into(),
            ),
        };
    }
    if matches!(path, "/drain" | "/resume") {
        return match (req.method(), api.drain(path == "/drain")) {
            (_, None) => text(StatusCode::NOT_FOUND, "not found\n".into()),
            (&Method::POST, Some(Ok(summary))) => text(StatusCode::OK, format!("{summary}\n")),
            (&Method::POST, Some(Err(reason))) => text(StatusCode::CONFLICT, format!("{reason}\n")),
            _ => text(StatusCode::METHOD_NOT_ALLOWED, "only POST\n".into()),
        };
    }
    if req.method() != Method::GET {
        return text(StatusCode::METHOD_NOT_ALLOWED, "only GET\n".into());
    }
    match path {
        "/livez" => text(StatusCode::OK, "ok\n".into()),
        "/status" => json(&api.status()),
        "/sessions" => json(&serde_json::json!({ "sessions": api.sessions().list() })),
        "/readyz" => match api.ready() {
            Ok(()) => text(StatusCode::OK, "ready\n".into()),
            Err(reason) => text(StatusCode::SERVICE_UNAVAILABLE, format!("{reason}\n")),
        },
        "/metrics" => {
            let mut response = text(StatusCode::OK, metrics.render());
            response.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("text/plain; version=0.0.4"),
            );
            response
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n".into()),
    }
}

fn json(value: &serde_json::Value) -> Response<Full<Bytes>> {
    let mut body = serde_json::to_string_pretty(value).unwrap_or_default();
    body.push('\n');
    let mut response = text(StatusCode::OK, body);
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    response
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
}
