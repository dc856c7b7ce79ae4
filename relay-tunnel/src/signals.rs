//! Shutdown signals for the binaries.

use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;

/// Cancels `token` on the first SIGINT or SIGTERM; exits the process at once on a second one.
pub async fn on_shutdown(token: CancellationToken) {
    let (Ok(mut int), Ok(mut term)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) else {
        tracing::error!("cannot install signal handlers");
        return;
    };
    tokio::select! {
        _ = int.recv() => {},
        _ = term.recv() => {},
    }
    tracing::info!("shutdown signal received; a second signal exits at once");
    token.cancel();
    tokio::select! {
        _ = int.recv() => {},
        _ = term.recv() => {},
    }
    tracing::warn!("second signal: exiting now");
    std::process::exit(1);
}

/// Calls `reload` on every SIGHUP until `stop` is cancelled.
pub async fn on_reload<R>(reload: impl Fn() -> R, stop: CancellationToken) {
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        tracing::error!("cannot install the SIGHUP handler");
        return;
    };
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            r = hup.recv() => if r.is_none() { return },
        }
        // The reloader logs its own outcome.
        let _ = reload();
    }
}
