//! Logging and metrics setup for the binaries.

use std::sync::OnceLock;
use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

use crate::metrics as names;

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "text" => Ok(Self::Text),
            "json" => Ok(Self::Json),
            other => Err(format!(
                "unknown log format {other:?} (expected text or json)"
            )),
        }
    }
}

/// Installs the global tracing subscriber: level from `RUST_LOG` (default `info`), to stderr;
/// and the tap of audit records ([`crate::audit`]), which `RUST_LOG` does not filter, so that
/// records sent to a syslog collector do not depend on the log level.
pub fn init_tracing(format: LogFormat) {
    use std::io::IsTerminal;
    use tracing_subscriber::prelude::*;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let log = tracing_subscriber::fmt::layer()
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let log = match format {
        LogFormat::Text => log.boxed(),
        LogFormat::Json => log
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .boxed(),
    };
    let _ = tracing_subscriber::registry()
        .with(log.with_filter(filter))
        .with(crate::audit::tap())
        .try_init();
    log_panics();
}

/// Reports every panic (a bug) as one error event of the log, in the span it happened in (a
/// session's, with its id), instead of as plain text on stderr, which a JSON log would not
/// parse. A backtrace is added when `RUST_BACKTRACE` asks for one.
pub fn log_panics() {
    std::panic::set_hook(Box::new(|info| {
        let payload = info.payload();
        let message = payload
            .downcast_ref::<&str>()
            .copied()
            .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
            .unwrap_or("(a value that is not text)");
        let location = info
            .location()
            .map(|l| format!("{}:{}", l.file(), l.line()))
            .unwrap_or_default();
        let backtrace = std::backtrace::Backtrace::capture();
        if backtrace.status() == std::backtrace::BacktraceStatus::Captured {
            tracing::error!(%location, %backtrace, "panic: {message}");
        } else {
            tracing::error!(%location, "panic: {message}");
        }
    }));
}

/// How often [`upkeep`] folds the histogram samples recorded since the last fold into their
/// buckets: the exporter's own period for the recorders it installs (docs/DECISIONS.md).
pub const UPKEEP_PERIOD: Duration = Duration::from_secs(5);

/// Folds pending histogram samples into their buckets every `period` until `stop`, whether or
/// not anyone scrapes `/metrics`. The recorder built here queues every sample (16 bytes) until
/// a scrape or an upkeep drains it (metrics-rs/metrics issue 467): without this task a node
/// that nobody scrapes grows with every session it serves.
pub async fn upkeep(metrics: PrometheusHandle, period: Duration, stop: CancellationToken) {
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    // The first tick is immediate: nothing is pending yet.
    tick.tick().await;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => metrics.run_upkeep(),
        }
    }
}

/// Installs the process-wide Prometheus recorder once and returns its handle; later calls
/// return the same handle (tests run several components in one process).
pub fn metrics_handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(
                    Matcher::Full(names::SESSION_DURATION.into()),
                    names::DURATION_BUCKETS,
                )
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Suffix("_seconds".into()),
                        names::LATENCY_BUCKETS,
                    )
                })
                .expect("bucket lists are not empty")
                .build_recorder();
            let handle = recorder.handle();
            // Fails only if another recorder was installed first; the handle still renders ours.
            let _ = metrics::set_global_recorder(recorder);
            names::describe();
            handle
        })
        .clone()
}
