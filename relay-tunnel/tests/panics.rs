//! A panic is reported as an error event of the log, in the span it happened in. In its own
//! test binary: the panic hook is global to the process.

use std::io::Write;
use std::sync::{Arc, Mutex};

/// A log writer that keeps every line.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn a_panic_in_a_session_is_logged_as_an_error_with_the_session_id() {
    let log = Captured::default();
    let writer = log.clone();
    tracing_subscriber::fmt()
        .json()
        .with_current_span(true)
        .with_writer(move || writer.clone())
        .init();
    relay_tunnel::telemetry::log_panics();

    let session = std::thread::spawn(|| {
        let _span = tracing::info_span!("session", id = "0123456789abcdef").entered();
        let n = std::hint::black_box(7);
        panic!("a bug with value {n}");
    });
    assert!(session.join().is_err(), "the thread panicked");

    let text = String::from_utf8(log.0.lock().unwrap().clone()).unwrap();
    let line = text
        .lines()
        .find(|l| l.contains("panic: a bug with value 7"))
        .unwrap_or_else(|| panic!("no panic event in the log: {text}"));
    let event: serde_json::Value = serde_json::from_str(line).expect("one JSON object");
    assert_eq!(event["level"], "ERROR", "{line}");
    assert_eq!(event["span"]["id"], "0123456789abcdef", "{line}");
    assert!(
        event["fields"]["location"]
            .as_str()
            .is_some_and(|l| l.contains("panics.rs")),
        "{line}"
    );
}
