//! The metrics upkeep both binaries start with their admin endpoint (`admin::start`): the
//! histogram samples of served sessions are folded into their buckets every
//! `telemetry::UPKEEP_PERIOD` whether or not anyone scrapes `/metrics`, so that memory does not
//! grow with the sessions served. Alone in its test binary: it reads this process's RSS.

use std::sync::Arc;
use std::time::Duration;

use relay_e2e::metric;
use relay_e2e::procfs::rss_bytes;
use relay_tunnel::metrics as names;
use relay_tunnel::{admin, session, telemetry};
use tokio_util::sync::CancellationToken;

/// Samples recorded per round: 2 Mi of them hold 32 MiB while queued (a value and a timestamp
/// each), far above what the allocator and the runtime move on their own between two reads.
const SAMPLES: u64 = 2 << 20;
/// Growth allowed over a round once the first round's memory can be reused.
const SLACK: u64 = 8 << 20;

/// A binary with nothing to say: ready, no reload, no sessions.
struct Idle(Arc<session::Table>);

impl admin::Api for Idle {
    fn ready(&self) -> Result<(), String> {
        Ok(())
    }
    fn reload(&self) -> Result<String, String> {
        Err("no reload in this test".into())
    }
    fn status(&self) -> serde_json::Value {
        serde_json::Value::Null
    }
    fn sessions(&self) -> &session::Table {
        &self.0
    }
}

fn rss() -> u64 {
    rss_bytes(std::process::id()).expect("VmRSS of this process")
}

fn record(histogram: &metrics::Histogram) {
    for i in 0..SAMPLES {
        histogram.record((i % 1000) as f64 / 1e4);
    }
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn histogram_samples_are_drained_without_a_scrape() {
    let shutdown = CancellationToken::new();
    let metrics = telemetry::metrics_handle();
    // As both binaries call it; no admin listener, so nothing could scrape.
    let control = admin::start(
        None,
        admin::Guard::new(admin::Access::default()),
        Arc::new(Idle(session::Table::new())),
        metrics.clone(),
        &shutdown,
    );
    let histogram = metrics::histogram!(names::SESSION_SETUP, "direction" => names::INBOUND);
    let half_period = telemetry::UPKEEP_PERIOD / 2;

    record(&histogram);
    // Paused time: the sleep lets the clock jump over the upkeep's next tick.
    tokio::time::sleep(telemetry::UPKEEP_PERIOD + half_period).await;
    let after_first = rss();
    record(&histogram);
    tokio::time::sleep(telemetry::UPKEEP_PERIOD).await;
    let after_second = rss();
    let grown = after_second.saturating_sub(after_first);
    assert!(
        grown < SLACK,
        "RSS grew by {} MiB over the second {SAMPLES} samples ({} -> {} MiB): the samples of the \
         first round were not drained by an upkeep within {:?}",
        grown >> 20,
        after_first >> 20,
        after_second >> 20,
        telemetry::UPKEEP_PERIOD + half_period,
    );

    // Folded, not lost: a scrape now counts every sample.
    let text = metrics.render();
    let count = metric(
        &text,
        &format!("{}_count", names::SESSION_SETUP),
        &["direction=\"inbound\""],
    );
    assert_eq!(count, Some((2 * SAMPLES) as f64), "{text}");

    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(5), control.stop())
        .await
        .expect("the upkeep stops with the admin endpoint");
}
