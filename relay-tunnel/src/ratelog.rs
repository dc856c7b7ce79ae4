//! Rate-limited logging of repeated bad input: at most one line per key per interval, with
//! the number of lines held back since. Metrics keep the exact counts.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Allows one log line per key per interval.
#[derive(Debug)]
pub struct RateLimit {
    interval: Duration,
    state: Mutex<HashMap<&'static str, (Instant, u64)>>,
}

impl RateLimit {
    /// At most one line per key every `interval`.
    pub fn new(interval: Duration) -> Self {
        Self {
            interval,
            state: Mutex::new(HashMap::new()),
        }
    }

    /// `Some(n)` if a line for `key` may be logged now, `n` being how many were held back
    /// since the last one; `None` if this one is held back.
    pub fn check(&self, key: &'static str) -> Option<u64> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        match state.get_mut(key) {
            Some((last, held)) if now.duration_since(*last) < self.interval => {
                *held += 1;
                None
            }
            Some((last, held)) => {
                *last = now;
                Some(std::mem::take(held))
            }
            None => {
                // Keys are a small fixed set (reason labels), so the map stays small.
                state.insert(key, (now, 0));
                Some(0)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_back_repeats_and_reports_them() {
        let limit = RateLimit::new(Duration::from_millis(50));
        assert_eq!(limit.check("a"), Some(0));
        assert_eq!(limit.check("a"), None);
        assert_eq!(limit.check("a"), None);
        assert_eq!(limit.check("b"), Some(0));
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(limit.check("a"), Some(2));
    }
}
