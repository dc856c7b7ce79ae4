//! The tap of audit records: a tracing layer that copies every `relay::audit` event into a
//! bounded queue, for a sender that forwards them (the agent's syslog sender). The session that
//! logs a record never waits: when the queue is full the record is dropped and counted in
//! `relay_audit_dropped_total`. Without an open queue the layer costs one atomic load per
//! audit event.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{LazyLock, RwLock};
use std::time::{Duration, SystemTime};

use tokio::sync::mpsc;
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::Layer;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::Context;

use crate::metrics as m;
use crate::ratelog::RateLimit;

/// The tracing target of audit records.
pub const TARGET: &str = "relay::audit";

/// How often, at most, a full queue is logged (the counter counts every drop).
const DROP_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// One audit event, as the tap saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditRecord {
    /// When it was logged.
    pub time: SystemTime,
    /// Its number in this process, from 1, in the order records were logged: a gap at the
    /// collector is a dropped record.
    pub sequence: u32,
    /// Its message (`session`, `session refused by the DMZ`).
    pub message: String,
    /// Its fields in the order they were logged, values as text.
    pub fields: Vec<(&'static str, String)>,
}

impl AuditRecord {
    /// The value of field `name`, if the record has it.
    pub fn field(&self, name: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Whether a queue is open: the layer's fast path when none is.
static OPEN: AtomicBool = AtomicBool::new(false);
/// The sending end of the open queue.
static QUEUE: RwLock<Option<mpsc::Sender<AuditRecord>>> = RwLock::new(None);
/// The number of the last record logged.
static SEQUENCE: AtomicU32 = AtomicU32::new(0);
static DROP_LOG: LazyLock<RateLimit> = LazyLock::new(|| RateLimit::new(DROP_LOG_INTERVAL));

/// Opens a queue of `capacity` records and returns its receiving end; from now on every audit
/// event is copied into it. Replaces the queue opened before, if any (its receiver then ends).
pub fn open(capacity: usize) -> mpsc::Receiver<AuditRecord> {
    let (tx, rx) = mpsc::channel(capacity.max(1));
    *QUEUE.write().unwrap_or_else(|p| p.into_inner()) = Some(tx);
    OPEN.store(true, Ordering::Release);
    rx
}

/// Closes the queue: audit events are no longer copied, and the receiver ends once it has
/// taken the records already queued.
pub fn close() {
    OPEN.store(false, Ordering::Release);
    QUEUE.write().unwrap_or_else(|p| p.into_inner()).take();
}

/// The tap, for the process's subscriber: it sees `relay::audit` events at info and above,
/// whatever `RUST_LOG` lets through to the log.
pub fn tap<S>() -> impl Layer<S>
where
    S: Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    Tap.with_filter(Targets::new().with_target(TARGET, Level::INFO))
}

/// Copies audit events into the open queue.
struct Tap;

impl<S: Subscriber> Layer<S> for Tap {
    fn on_event(&self, event: &Event<'_>, _: Context<'_, S>) {
        if !OPEN.load(Ordering::Acquire) || event.metadata().target() != TARGET {
            return;
        }
        let mut record = AuditRecord {
            time: SystemTime::now(),
            sequence: next_sequence(&SEQUENCE),
            message: String::new(),
            fields: Vec::with_capacity(12),
        };
        event.record(&mut Fields(&mut record));
        let queue = QUEUE.read().unwrap_or_else(|p| p.into_inner());
        let Some(queue) = queue.as_ref() else {
            return;
        };
        if queue.try_send(record).is_err() {
            metrics::counter!(m::AUDIT_DROPPED).increment(1);
            if let Some(held_back) = DROP_LOG.check("audit_dropped") {
                // Not a `relay::audit` event: this line is not tapped itself.
                tracing::warn!(
                    held_back,
                    "audit queue full: record dropped (the syslog collector is down or slow)"
                );
            }
        }
    }
}

/// The largest RFC 5424 `sequenceId`; the next one is 1 (it is never 0).
const MAX_SEQUENCE: u32 = i32::MAX as u32;

/// Bumps `counter`: 1, 2, ... up to [`MAX_SEQUENCE`], then 1 again.
fn next_sequence(counter: &AtomicU32) -> u32 {
    let bump = |n: u32| if n >= MAX_SEQUENCE { 1 } else { n + 1 };
    let previous = counter
        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| Some(bump(n)))
        .unwrap_or_else(|n| n);
    bump(previous)
}

/// Collects an event's message and fields as text.
struct Fields<'a>(&'a mut AuditRecord);

impl Fields<'_> {
    fn put(&mut self, field: &Field, value: String) {
        if field.name() == "message" {
            self.0.message = value;
        } else {
            self.0.fields.push((field.name(), value));
        }
    }
}

impl Visit for Fields<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.put(field, value.to_owned());
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.put(field, value.to_string());
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.put(field, value.to_string());
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.put(field, value.to_string());
    }
    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.put(field, value.to_string());
    }
    // `%value` (Display) fields and the message arrive here; their Debug is their Display.
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.put(field, format!("{value:?}"));
    }
}

#[cfg(test)]
mod tests {
    use tracing_subscriber::layer::SubscriberExt;

    use super::*;

    /// The queue is process-wide: one test exercises it from start to end.
    #[test]
    fn copies_audit_events_drops_when_full_and_stops_when_closed() {
        // A log that shows warnings only and no audit record does not stop the tap.
        let quiet = tracing_subscriber::fmt::layer()
            .with_writer(std::io::sink)
            .with_filter(tracing_subscriber::EnvFilter::new("warn,relay::audit=off"));
        let subscriber = tracing_subscriber::registry().with(quiet).with(tap());
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!(target: "relay::audit", session = "s0", "session");
            let mut rx = open(2);
            let partner: std::net::SocketAddr = "127.0.0.9:4242".parse().unwrap();
            tracing::info!(
                target: "relay::audit",
                session = "s1",
                service = %"as2",
                partner = %partner,
                duration_ms = 12u64,
                ok = true,
                "session"
            );
            tracing::info!(target: "relay::other", session = "not audit");
            tracing::debug!(target: "relay::audit", session = "debug", "session");
            tracing::info!(target: "relay::audit", session = "s2", "session refused by the DMZ");
            tracing::info!(target: "relay::audit", session = "s3", "session");
            let first = rx.try_recv().expect("first record");
            assert_eq!(first.message, "session");
            assert_eq!(
                first.fields,
                vec![
                    ("session", "s1".to_owned()),
                    ("service", "as2".to_owned()),
                    ("partner", "127.0.0.9:4242".to_owned()),
                    ("duration_ms", "12".to_owned()),
                    ("ok", "true".to_owned()),
                ]
            );
            assert_eq!(first.field("partner"), Some("127.0.0.9:4242"));
            let second = rx.try_recv().expect("second record");
            assert_eq!(second.message, "session refused by the DMZ");
            assert_eq!(second.sequence, first.sequence + 1);
            // The queue held two: the third was dropped (and numbered, so the gap shows).
            assert!(rx.try_recv().is_err(), "a third record in a queue of two");
            close();
            tracing::info!(target: "relay::audit", session = "s4", "session");
            assert!(matches!(
                rx.try_recv(),
                Err(mpsc::error::TryRecvError::Disconnected)
            ));
        });
    }

    #[test]
    fn sequence_wraps_to_one() {
        let counter = AtomicU32::new(0);
        assert_eq!(next_sequence(&counter), 1);
        counter.store(MAX_SEQUENCE - 1, Ordering::Relaxed);
        assert_eq!(next_sequence(&counter), MAX_SEQUENCE);
        assert_eq!(next_sequence(&counter), 1);
    }
}
