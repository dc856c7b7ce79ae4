//! Target health of inbound services: the order in which a session tries the targets
//! (`balance`), the state of each target (active checks and failed session connects count
//! toward `fall`, good checks toward `rise`), and the withdrawal of a service from the DMZ
//! nodes while none of its targets is healthy.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use relay_tunnel::config::TargetSpec;
use relay_tunnel::metrics as m;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::Agent;
use crate::config::{Balance, CheckKind, HealthCheck, InboundService};

/// Longest status line an HTTP check reads.
const STATUS_LINE_LIMIT: usize = 1024;

/// One target of a service and what is known of it.
pub struct Target {
    /// The configured target.
    pub spec: TargetSpec,
    /// `host:port` (first port of a range): its name in logs and metrics.
    pub label: String,
    /// Sessions in flight to it.
    pub sessions: AtomicUsize,
}

struct Counts {
    up: bool,
    fails: u32,
    goods: u32,
}

struct Inner {
    targets: Vec<Counts>,
    /// When the service was withdrawn from the DMZ nodes; `None` while declared.
    withdrawn_at: Option<Instant>,
}

/// The runtime state of one inbound service's targets (rebuilt on reload, with the config).
pub struct ServiceState {
    name: String,
    /// The targets, in the configured order.
    pub targets: Vec<Target>,
    balance: Balance,
    check: Option<HealthCheck>,
    next: AtomicUsize,
    inner: Mutex<Inner>,
}

/// Whether a result came from an active check or from a session's connect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// An active health check.
    Check,
    /// A session's connect to the target.
    Session,
}

impl ServiceState {
    /// Every target healthy, the service declared.
    pub fn new(service: &InboundService) -> Self {
        let targets: Vec<Target> = service
            .targets
            .iter()
            .map(|spec| Target {
                label: relay_tunnel::protocol::destination_authority(&spec.host, spec.ports.first),
                spec: spec.clone(),
                sessions: AtomicUsize::new(0),
            })
            .collect();
        if service.health.is_some() {
            for t in &targets {
                metrics::gauge!(m::TARGET_UP, "service" => service.name.clone(), "target" => t.label.clone()).set(1.0);
            }
            metrics::gauge!(m::SERVICE_DECLARED, "service" => service.name.clone()).set(1.0);
        }
        Self {
            name: service.name.clone(),
            inner: Mutex::new(Inner {
                targets: targets
                    .iter()
                    .map(|_| Counts {
                        up: true,
                        fails: 0,
                        goods: 0,
                    })
                    .collect(),
                withdrawn_at: None,
            }),
            targets,
            balance: service.balance,
            check: service.health.clone(),
            next: AtomicUsize::new(0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether each target is in the rotation now, in the configured order.
    pub fn up(&self) -> Vec<bool> {
        self.lock().targets.iter().map(|c| c.up).collect()
    }

    /// Whether the service is withdrawn from the DMZ nodes now.
    pub fn withdrawn(&self) -> bool {
        self.lock().withdrawn_at.is_some()
    }

    /// The targets a new session tries, in order: the healthy ones as `balance` says; when
    /// none is healthy, all of them (one may have come back since the last check).
    pub fn order(&self) -> Vec<usize> {
        let up: Vec<bool> = self.lock().targets.iter().map(|c| c.up).collect();
        let mut order: Vec<usize> = (0..self.targets.len()).filter(|&i| up[i]).collect();
        if order.is_empty() {
            order = (0..self.targets.len()).collect();
        }
        match self.balance {
            Balance::First => {}
            Balance::RoundRobin => {
                let turn = self.next.fetch_add(1, Ordering::Relaxed) % order.len();
                order.rotate_left(turn);
            }
            Balance::LeastSessions => {
                // Ties go round robin, so an idle service still spreads its sessions.
                let turn = self.next.fetch_add(1, Ordering::Relaxed) % order.len();
                order.rotate_left(turn);
                order.sort_by_key(|&i| self.targets[i].sessions.load(Ordering::Relaxed));
            }
        }
        order
    }

    /// Records a good or failed contact with target `i`; logs and counts a change of state.
    /// Without `[inbound.health]` nothing changes: every target stays in the rotation.
    pub fn record(&self, i: usize, result: Result<(), &str>, source: Source) {
        let Some(check) = &self.check else {
            return;
        };
        let target = &self.targets[i];
        let label = match (&result, source) {
            (Ok(()), _) => "ok",
            (Err(_), Source::Check) => "failed",
            (Err(_), Source::Session) => "passive_failed",
        };
        metrics::counter!(m::HEALTH_CHECKS, "service" => self.name.clone(), "target" => target.label.clone(), "result" => label).increment(1);
        let mut inner = self.lock();
        let counts = &mut inner.targets[i];
        match result {
            Ok(()) => {
                counts.fails = 0;
                counts.goods = counts.goods.saturating_add(1);
                if !counts.up && counts.goods >= check.rise {
                    counts.up = true;
                    drop(inner);
                    metrics::gauge!(m::TARGET_UP, "service" => self.name.clone(), "target" => target.label.clone()).set(1.0);
                    tracing::info!(service = %self.name, target = %target.label, rise = check.rise, "target healthy again");
                }
            }
            Err(reason) => {
                counts.goods = 0;
                counts.fails = counts.fails.saturating_add(1);
                if counts.up && counts.fails >= check.fall {
                    counts.up = false;
                    drop(inner);
                    metrics::gauge!(m::TARGET_UP, "service" => self.name.clone(), "target" => target.label.clone()).set(0.0);
                    tracing::warn!(service = %self.name, target = %target.label, fall = check.fall, %reason, ?source, "target unhealthy: taken out of the rotation");
                }
            }
        }
    }

    /// Withdraws the service when no target is healthy, declares it again when one is and the
    /// hold-down has passed; returns whether the declaration changed.
    pub fn evaluate(&self) -> bool {
        let Some(check) = &self.check else {
            return false;
        };
        let mut inner = self.lock();
        let any_up = inner.targets.iter().any(|c| c.up);
        match inner.withdrawn_at {
            None if !any_up => {
                inner.withdrawn_at = Some(Instant::now());
                drop(inner);
                metrics::counter!(m::WITHDRAWALS, "service" => self.name.clone()).increment(1);
                metrics::gauge!(m::SERVICE_DECLARED, "service" => self.name.clone()).set(0.0);
                tracing::warn!(service = %self.name, hold_down = ?check.hold_down, "no healthy target: service withdrawn from the DMZ nodes");
                true
            }
            Some(at) if any_up && at.elapsed() >= check.hold_down => {
                inner.withdrawn_at = None;
                drop(inner);
                metrics::gauge!(m::SERVICE_DECLARED, "service" => self.name.clone()).set(1.0);
                tracing::info!(service = %self.name, withdrawn_for = ?at.elapsed(), "a target is healthy again: service declared to the DMZ nodes");
                true
            }
            _ => false,
        }
    }
}

/// Counts a session on a target until dropped.
pub struct InFlight<'a>(&'a Target);

impl<'a> InFlight<'a> {
    /// Counts one more session on `target`.
    pub fn new(target: &'a Target) -> Self {
        target.sessions.fetch_add(1, Ordering::Relaxed);
        Self(target)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.sessions.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Runs the health checks of the services in force until the agent stops, starting over
/// with the new services after a reload.
pub async fn run(agent: Arc<Agent>) {
    let mut changes = agent.settings.subscribe();
    loop {
        let settings = changes.borrow_and_update().clone();
        let mut checkers = tokio::task::JoinSet::new();
        for (name, state) in &settings.health {
            if let Some(check) = state.check.clone() {
                let agent = agent.clone();
                let state = state.clone();
                let name = name.clone();
                checkers.spawn(async move {
                    tracing::debug!(service = %name, kind = check.kind.label(), "health checks started");
                    checker(&agent, &state, &check).await;
                });
            }
        }
        tokio::select! {
            changed = changes.changed() => if changed.is_err() { return },
            _ = agent.stop_tunnels.cancelled() => return,
        }
        checkers.abort_all();
    }
}

/// Checks every target of one service each `interval`, the first round at once.
async fn checker(agent: &Agent, state: &ServiceState, check: &HealthCheck) {
    let mut tick = tokio::time::interval(check.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let rounds = state.targets.iter().map(|t| async {
            let (host, port) = (t.spec.host.as_str(), t.spec.ports.first);
            match tokio::time::timeout(check.timeout, probe(&check.kind, host, port)).await {
                Ok(result) => result,
                Err(_) => Err(format!("no answer within {:?}", check.timeout)),
            }
        });
        let results = futures_util::future::join_all(rounds).await;
        for (i, result) in results.iter().enumerate() {
            state.record(
                i,
                result.as_ref().map(|_| ()).map_err(String::as_str),
                Source::Check,
            );
        }
        if state.evaluate() {
            agent.declarations_changed();
        }
    }
}

/// One check of `host:port`.
async fn probe(kind: &CheckKind, host: &str, port: u16) -> Result<(), String> {
    let mut tcp = TcpStream::connect((host, port))
        .await
        .map_err(|e| format!("connect: {e}"))?;
    match kind {
        CheckKind::Tcp => Ok(()),
        CheckKind::Tls {
            config,
            server_name,
            ..
        } => {
            let name = match server_name {
                Some(n) => n.clone(),
                None => ServerName::try_from(host.to_owned())
                    .map_err(|_| format!("{host:?} is not a valid TLS server name"))?,
            };
            let mut tls = tokio_rustls::TlsConnector::from(config.clone())
                .connect(name, tcp)
                .await
                .map_err(|e| format!("TLS handshake: {e}"))?;
            let _ = tls.shutdown().await;
            Ok(())
        }
        CheckKind::Http { request, status } => {
            let text = format!(
                "{request} HTTP/1.1\r\nHost: {}\r\nUser-Agent: relay-health-check\r\nConnection: close\r\n\r\n",
                relay_tunnel::protocol::destination_authority(host, port)
            );
            tcp.write_all(text.as_bytes())
                .await
                .map_err(|e| format!("send request: {e}"))?;
            let got = read_status(&mut tcp).await?;
            if got == *status {
                Ok(())
            } else {
                Err(format!("status {got}, expected {status}"))
            }
        }
    }
}

/// The status code of an HTTP/1.x answer.
async fn read_status(tcp: &mut TcpStream) -> Result<u16, String> {
    let mut buf = Vec::with_capacity(128);
    let mut chunk = [0u8; 256];
    loop {
        if let Some(end) = buf.windows(2).position(|w| w == b"\r\n") {
            return parse_status_line(&buf[..end]).ok_or_else(|| {
                format!(
                    "not an HTTP status line: {:?}",
                    String::from_utf8_lossy(&buf[..end])
                )
            });
        }
        if buf.len() >= STATUS_LINE_LIMIT {
            return Err("no HTTP status line in the first KiB".into());
        }
        let n = tcp
            .read(&mut chunk)
            .await
            .map_err(|e| format!("read answer: {e}"))?;
        if n == 0 {
            return Err("closed before answering".into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn parse_status_line(line: &[u8]) -> Option<u16> {
    let line = std::str::from_utf8(line).ok()?;
    let mut words = line.split(' ');
    if !words.next()?.starts_with("HTTP/1.") {
        return None;
    }
    let code = words.next()?;
    if code.len() != 3 {
        return None;
    }
    code.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn service(balance: Balance, health: Option<HealthCheck>) -> InboundService {
        InboundService {
            name: "as2".into(),
            listen: "127.0.0.1:8000".parse().unwrap(),
            targets: vec![
                "10.0.0.1:1".parse().unwrap(),
                "10.0.0.2:1".parse().unwrap(),
                "10.0.0.3:1".parse().unwrap(),
            ],
            balance,
            health,
            allow: vec![],
            accept_proxy: false,
            proxy_protocol: None,
            expect: Default::default(),
            sni: Vec::new(),
        }
    }

    fn check(hold_down: Duration) -> HealthCheck {
        HealthCheck {
            kind: CheckKind::Tcp,
            interval: Duration::from_secs(1),
            timeout: Duration::from_secs(1),
            fall: 2,
            rise: 2,
            hold_down,
        }
    }

    #[test]
    fn round_robin_turns_and_first_stays() {
        let rr = ServiceState::new(&service(Balance::RoundRobin, None));
        let firsts: Vec<usize> = (0..6).map(|_| rr.order()[0]).collect();
        assert_eq!(firsts, [0, 1, 2, 0, 1, 2]);
        assert_eq!(rr.order().len(), 3, "every target is a fallback");
        let first = ServiceState::new(&service(Balance::First, None));
        assert!((0..5).all(|_| first.order() == [0, 1, 2]));
    }

    #[test]
    fn least_sessions_prefers_the_idle_target() {
        let s = ServiceState::new(&service(Balance::LeastSessions, None));
        let _a = InFlight::new(&s.targets[0]);
        let _b = InFlight::new(&s.targets[1]);
        assert_eq!(s.order()[0], 2);
        drop(_a);
        assert!(matches!(s.order()[0], 0 | 2));
    }

    #[test]
    fn fall_takes_out_rise_brings_back_and_all_down_withdraws_after_hold_down() {
        let s = ServiceState::new(&service(Balance::First, Some(check(Duration::ZERO))));
        s.record(0, Err("refused"), Source::Session);
        assert_eq!(s.order(), [0, 1, 2], "one failure is below fall");
        s.record(0, Err("refused"), Source::Check);
        assert_eq!(s.order(), [1, 2]);
        s.record(0, Ok(()), Source::Check);
        assert_eq!(s.order(), [1, 2], "one good check is below rise");
        s.record(0, Ok(()), Source::Check);
        assert_eq!(s.order(), [0, 1, 2]);
        for i in 0..3 {
            s.record(i, Err("x"), Source::Check);
            s.record(i, Err("x"), Source::Check);
        }
        assert_eq!(s.order(), [0, 1, 2], "none healthy: all are tried");
        assert!(s.evaluate() && s.withdrawn());
        assert!(!s.evaluate(), "withdrawn once");
        s.record(2, Ok(()), Source::Check);
        s.record(2, Ok(()), Source::Check);
        assert!(s.evaluate() && !s.withdrawn());
    }

    #[test]
    fn hold_down_delays_the_declaration() {
        let s = ServiceState::new(&service(
            Balance::First,
            Some(check(Duration::from_secs(3600))),
        ));
        for i in 0..3 {
            s.record(i, Err("x"), Source::Check);
            s.record(i, Err("x"), Source::Check);
        }
        assert!(s.evaluate());
        s.record(1, Ok(()), Source::Check);
        s.record(1, Ok(()), Source::Check);
        assert!(!s.evaluate() && s.withdrawn(), "still inside the hold-down");
    }

    #[test]
    fn without_health_checks_nothing_is_taken_out() {
        let s = ServiceState::new(&service(Balance::First, None));
        for _ in 0..10 {
            s.record(0, Err("refused"), Source::Session);
        }
        assert_eq!(s.order(), [0, 1, 2]);
        assert!(!s.evaluate());
    }

    #[test]
    fn status_lines() {
        assert_eq!(
            parse_status_line(b"HTTP/1.1 503 Service Unavailable"),
            Some(503)
        );
        assert_eq!(parse_status_line(b"HTTP/1.0 200"), Some(200));
        assert_eq!(parse_status_line(b"SSH-2.0-x"), None);
        assert_eq!(parse_status_line(b"HTTP/1.1 20 OK"), None);
    }
}
