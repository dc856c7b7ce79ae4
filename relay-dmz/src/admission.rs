//! Admission of partner connections beyond the global session limit: per-service and
//! per-source concurrent sessions, a per-source token bucket for new connections, and a
//! memory budget. Each check is cheap and happens before any byte goes to an agent.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::config::Limits;

/// Sources tracked at most; beyond that, new sources are refused until old ones go idle.
const MAX_SOURCES: usize = 100_000;
/// Sources tracked before the first sweep of those that need no state any more. Each sweep
/// sets the next one at twice the sources left, so sweeping costs O(1) per new source and the
/// table stays within twice the sources with a session or a bucket still refilling.
const SWEEP_FLOOR: usize = 1024;

#[derive(Debug)]
struct Source {
    active: u32,
    tokens: f64,
    refilled: Instant,
}

/// The sources with state, and the table size at which the next sweep forgets those without.
#[derive(Debug)]
struct Sources {
    by_ip: HashMap<IpAddr, Source>,
    sweep_at: usize,
}

impl Default for Sources {
    fn default() -> Self {
        Self {
            by_ip: HashMap::new(),
            sweep_at: SWEEP_FLOOR,
        }
    }
}

/// Per-service and per-source admission state.
#[derive(Debug)]
pub struct Admission {
    limits: Limits,
    sources: Mutex<Sources>,
    services: Mutex<HashMap<String, usize>>,
    over_budget: AtomicBool,
}

/// A session admitted; its counts are released when dropped.
#[derive(Debug)]
pub struct Ticket {
    admission: Arc<Admission>,
    service: String,
    source: Option<IpAddr>,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if let Some(n) = lock(&self.admission.services).get_mut(&self.service) {
            *n -= 1;
        }
        if let Some(source) = self.source {
            let mut sources = lock(&self.admission.sources);
            if let Some(s) = sources.by_ip.get_mut(&source) {
                s.active -= 1;
                // Without a rate limit an idle source has no state worth keeping.
                if s.active == 0 && self.admission.limits.source_rate.is_none() {
                    sources.by_ip.remove(&source);
                }
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Admission {
    /// Admission under `limits`.
    pub fn new(limits: Limits) -> Arc<Self> {
        Arc::new(Self {
            limits,
            sources: Mutex::default(),
            services: Mutex::default(),
            over_budget: AtomicBool::new(false),
        })
    }

    /// Admits a new session of `service` from `source`, or says which limit refused it
    /// (the `relay_rejections_total` reason).
    pub fn admit(self: &Arc<Self>, service: &str, source: IpAddr) -> Result<Ticket, &'static str> {
        if self.over_budget.load(Ordering::Relaxed) {
            return Err("memory");
        }
        let l = &self.limits;
        let track_source = l.max_sessions_per_source.is_some() || l.source_rate.is_some();
        if track_source {
            let mut sources = lock(&self.sources);
            let now = Instant::now();
            if !sources.by_ip.contains_key(&source) && sources.by_ip.len() >= sources.sweep_at {
                // Forget sources with no session whose bucket (if any) has refilled: a new
                // entry for them would hold the same state.
                sources
                    .by_ip
                    .retain(|_, s| s.active > 0 || !refilled(s, l, now));
                sources.sweep_at = (2 * sources.by_ip.len()).clamp(SWEEP_FLOOR, MAX_SOURCES);
                if sources.by_ip.len() >= MAX_SOURCES {
                    return Err("source_limit");
                }
            }
            let s = sources.by_ip.entry(source).or_insert(Source {
                active: 0,
                tokens: f64::from(l.source_burst),
                refilled: now,
            });
            if l.source_rate.is_some() {
                refill(s, l, now);
                if s.tokens < 1.0 {
                    return Err("rate_limit");
                }
            }
            if l.max_sessions_per_source.is_some_and(|max| s.active >= max) {
                return Err("source_limit");
            }
            if l.source_rate.is_some() {
                s.tokens -= 1.0;
            }
            s.active += 1;
        }
        let mut services = lock(&self.services);
        let n = services.entry(service.to_owned()).or_default();
        if *n >= l.max_sessions_per_service {
            drop(services);
            if track_source {
                let mut sources = lock(&self.sources);
                if let Some(s) = sources.by_ip.get_mut(&source) {
                    s.active -= 1;
                    if s.active == 0 && l.source_rate.is_none() {
                        sources.by_ip.remove(&source);
                    }
                }
            }
            return Err("service_limit");
        }
        *n += 1;
        Ok(Ticket {
            admission: self.clone(),
            service: service.to_owned(),
            source: track_source.then_some(source),
        })
    }

    /// Whether the process is over its memory budget.
    pub fn over_budget(&self) -> bool {
        self.over_budget.load(Ordering::Relaxed)
    }

    /// Checks the process's resident memory against the budget every second, until `stop`.
    pub async fn watch_memory(self: Arc<Self>, stop: tokio_util::sync::CancellationToken) {
        let Some(budget) = self.limits.memory_budget else {
            return;
        };
        loop {
            if let Some(rss) = resident_bytes() {
                let over = rss > budget;
                if over != self.over_budget.swap(over, Ordering::Relaxed) {
                    if over {
                        tracing::warn!(
                            rss,
                            budget,
                            "memory budget exceeded: refusing new sessions"
                        );
                    } else {
                        tracing::info!(
                            rss,
                            budget,
                            "back under the memory budget: accepting sessions"
                        );
                    }
                }
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }
}

/// Adds the tokens earned since the last refill; returns the new level.
fn refill(s: &mut Source, l: &Limits, now: Instant) -> f64 {
    let earned =
        now.duration_since(s.refilled).as_secs_f64() * f64::from(l.source_rate.unwrap_or(0));
    s.tokens = (s.tokens + earned).min(f64::from(l.source_burst));
    s.refilled = now;
    s.tokens
}

/// Whether the bucket of `s` is full again (always, without a rate limit).
fn refilled(s: &mut Source, l: &Limits, now: Instant) -> bool {
    l.source_rate.is_none() || refill(s, l, now) >= f64::from(l.source_burst)
}

/// Resident set size of this process: `VmRSS` of /proc/self/status, which the kernel gives in
/// KiB whatever the page size (statm counts pages, 4 KiB on x86-64 but 16 or 64 KiB on some
/// arm64 kernels).
fn resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    vm_rss(&status)
}

/// The `VmRSS:  N kB` line of a /proc/PID/status text, in bytes.
fn vm_rss(status: &str) -> Option<u64> {
    let line = status.lines().find_map(|l| l.strip_prefix("VmRSS:"))?;
    let mut words = line.split_whitespace();
    let kib: u64 = words.next()?.parse().ok()?;
    (words.next() == Some("kB")).then_some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resident_memory_is_read_in_bytes_whatever_the_page_size() {
        let status =
            "Name:\trelay-dmz\nVmHWM:\t   20480 kB\nVmRSS:\t   12345 kB\nRssAnon:\t 8000 kB\n";
        assert_eq!(vm_rss(status), Some(12345 * 1024));
        assert_eq!(vm_rss("VmRSS:\t12 MB\n"), None, "only kB is known");
        assert_eq!(vm_rss("Name:\tx\n"), None);
        let here = resident_bytes().expect("/proc/self/status has VmRSS");
        assert!(
            here > 1024 * 1024,
            "a test process holds more than 1 MiB: {here}"
        );
    }

    fn limits(per_source: u32, per_service: usize, rate: u32, burst: u32) -> Limits {
        let mut l = crate::config::Limits::for_tests();
        l.max_sessions_per_source = Some(per_source);
        l.max_sessions_per_service = per_service;
        l.source_rate = Some(rate);
        l.source_burst = burst;
        l
    }

    #[test]
    fn per_source_concurrency_is_bounded_and_released() {
        let a = Admission::new(limits(2, 100, 1000, 1000));
        let ip: IpAddr = "198.51.100.1".parse().unwrap();
        let t1 = a.admit("s", ip).unwrap();
        let _t2 = a.admit("s", ip).unwrap();
        assert_eq!(a.admit("s", ip).unwrap_err(), "source_limit");
        assert!(
            a.admit("s", "198.51.100.2".parse().unwrap()).is_ok(),
            "another source is not affected"
        );
        drop(t1);
        assert!(a.admit("s", ip).is_ok());
    }

    #[test]
    fn per_service_concurrency_is_bounded() {
        let a = Admission::new(limits(100, 1, 1000, 1000));
        let _t = a.admit("s", "198.51.100.1".parse().unwrap()).unwrap();
        assert_eq!(
            a.admit("s", "198.51.100.2".parse().unwrap()).unwrap_err(),
            "service_limit"
        );
        assert!(a.admit("other", "198.51.100.2".parse().unwrap()).is_ok());
    }

    fn sources(a: &Admission) -> usize {
        lock(&a.sources).by_ip.len()
    }

    /// The `n`th distinct IPv6 source.
    fn nth(n: usize) -> IpAddr {
        IpAddr::V6(std::net::Ipv6Addr::from(0x2001_0db8_u128 << 96 | n as u128))
    }

    #[test]
    fn sources_without_a_rate_limit_are_forgotten_when_idle() {
        let mut l = crate::config::Limits::for_tests();
        l.max_sessions_per_source = Some(2);
        let a = Admission::new(l);
        for n in 0..MAX_SOURCES + 10 {
            let ticket = a.admit("s", nth(n)).unwrap_or_else(|e| {
                panic!("source {n}, after {n} sessions that all ended, refused: {e}")
            });
            drop(ticket);
        }
        assert_eq!(
            sources(&a),
            0,
            "no state is kept for sources with no session"
        );
        let _held = a.admit("s", nth(0)).unwrap();
        assert_eq!(sources(&a), 1, "a source with a session is tracked");
    }

    #[test]
    fn sources_whose_bucket_refilled_are_swept() {
        // A bucket of one, refilled within a microsecond.
        let a = Admission::new(limits(10, 1000, u32::MAX, 1));
        for n in 0..MAX_SOURCES / 4 {
            drop(a.admit("s", nth(n)).unwrap());
            assert!(
                sources(&a) <= 2 * SWEEP_FLOOR,
                "{} sources tracked after {n} short sessions from distinct sources",
                sources(&a)
            );
        }
        // One that still holds a session is never forgotten.
        let _held = a.admit("s", nth(0)).unwrap();
        for n in 1..4 * SWEEP_FLOOR {
            drop(a.admit("s", nth(MAX_SOURCES + n)).unwrap());
        }
        assert!(lock(&a.sources).by_ip.contains_key(&nth(0)));
    }

    #[test]
    fn new_connections_per_source_follow_the_token_bucket() {
        let a = Admission::new(limits(1000, 1000, 1, 3));
        let ip: IpAddr = "198.51.100.1".parse().unwrap();
        for _ in 0..3 {
            drop(a.admit("s", ip).unwrap());
        }
        assert_eq!(a.admit("s", ip).unwrap_err(), "rate_limit");
        assert!(
            a.admit("s", "198.51.100.9".parse().unwrap()).is_ok(),
            "another source has its own bucket"
        );
    }
}
