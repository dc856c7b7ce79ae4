//! The admin endpoint both binaries serve: `GET /livez`, `GET /readyz`, `GET /metrics`.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Concurrent admin connections served; more wait in the backlog.
const MAX_CONNECTIONS: usize = 64;
/// How long a client may take to send its request headers.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one admin connection may stay open.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(30);

/// Answers `/readyz`: `Ok` when ready, else the one-line reason.
pub type Readiness = Arc<dyn Fn() -> Result<(), String> + Send + Sync>;

/// Reloads the config (`POST /reload`, SIGHUP): a summary of what changed, or why nothing did.
pub type Reloader = Arc<dyn Fn() -> Result<String, String> + Send + Sync>;

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
    ready: Readiness,
    reload: Reloader,
    metrics: PrometheusHandle,
    shutdown: &CancellationToken,
) -> Control {
    tokio::spawn(crate::signals::on_reload(reload.clone(), shutdown.clone()));
    let stop = CancellationToken::new();
    let tasks = TaskTracker::new();
    tasks.spawn(crate::telemetry::upkeep(
        metrics.clone(),
        crate::telemetry::UPKEEP_PERIOD,
        stop.clone(),
    ));
    if let Some(l) = listener {
        tasks.spawn(serve(l, ready, Some(reload), metrics, stop.clone()));
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
    ready: Readiness,
    reload: Option<Reloader>,
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
        let ready = ready.clone();
        let reload = reload.clone();
        let metrics = metrics.clone();
        tasks.spawn(async move {
            let _permit = permit;
            let service = hyper::service::service_fn(move |req| {
                let response = route(
                    &req,
                    &ready,
                    reload.as_ref().filter(|_| local),
                    local,
                    &metrics,
                );
                async move { Ok::<_, Infallible>(response) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .keep_alive(false)
                .serve_connection(TokioIo::new(stream), service);
            let _ = tokio::time::timeout(CONNECTION_TIMEOUT, conn).await;
        });
    }
    drop(listener);
    tasks.close();
    let _ = tokio::time::timeout(Duration::from_secs(1), tasks.wait()).await;
}

fn route(
    req: &Request<Incoming>,
    ready: &Readiness,
    reload: Option<&Reloader>,
    local: bool,
    metrics: &PrometheusHandle,
) -> Response<Full<Bytes>> {
    if req.uri().path() == "/reload" {
        return match (req.method(), reload) {
            (&Method::POST, Some(reload)) => match reload() {
                Ok(summary) => text(StatusCode::OK, format!("{summary}\n")),
                Err(reason) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("{reason}\n")),
            },
            (&Method::POST, None) if !local => text(
                StatusCode::FORBIDDEN,
                "reload is accepted from this host only\n".into(),
            ),
            (&Method::POST, None) => text(StatusCode::NOT_FOUND, "not found\n".into()),
            _ => text(StatusCode::METHOD_NOT_ALLOWED, "only POST\n".into()),
        };
    }
    if req.method() != Method::GET {
        return text(StatusCode::METHOD_NOT_ALLOWED, "only GET\n".into());
    }
    match req.uri().path() {
        "/livez" => text(StatusCode::OK, "ok\n".into()),
        "/readyz" => match ready() {
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

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
}
