//! Trading-engine clusters behind one agent: several targets per service (`balance`), a failed
//! target skipped before the DMZ is answered, active health checks (`[inbound.health]`), a
//! service withdrawn from the DMZ while no target is healthy, and backup destinations of
//! outbound partners. Real processes (relay-dmz, relay-internal); targets in the test process.
//!
//! The figures the tests measure (detection and reopen times, failures per scenario) are
//! printed with `--nocapture` and recorded in docs/OPERATIONS.md.

#[path = "clusters/config.rs"]
mod config;
#[path = "clusters/health.rs"]
mod health;
#[path = "clusters/lb.rs"]
mod lb;
#[path = "clusters/outbound.rs"]
mod outbound;
#[path = "clusters/withdrawal.rs"]
mod withdrawal;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use relay_e2e::process::{Captured, Dmz};
use relay_e2e::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Bound on every wait of these tests.
const LIMIT: Duration = Duration::from_secs(20);

/// Health checks fast enough for tests: every 200 ms, out after 2 failures, back after 2
/// good checks, declared again no sooner than 500 ms after a withdrawal.
const FAST_TCP_CHECK: &str = "[inbound.health]\nkind = \"tcp\"\ninterval = \"200ms\"\ntimeout = \"150ms\"\nfall = 2\nrise = 2\nhold_down = \"500ms\"\n";
/// `fall × interval` and `rise × interval` of [`FAST_TCP_CHECK`].
const FALL_TIME: Duration = Duration::from_millis(400);
const RISE_TIME: Duration = Duration::from_millis(400);

fn local(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// A target that writes its `tag` byte to every connection, then echoes; it stops accepting
/// when dropped (sessions in flight go on). Started again on the same address with [`tagged_on`].
struct Tagged {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Tagged {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn tagged(tag: u8) -> Tagged {
    tagged_on(local(0), tag).await
}

async fn tagged_on(addr: SocketAddr, tag: u8) -> Tagged {
    let listener = TcpListener::bind(addr).await.expect("bind tagged target");
    let addr = listener.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                if s.write_all(&[tag]).await.is_err() {
                    return;
                }
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    Tagged { addr, task }
}

/// One session through `public`: the tag of the target that answered, after an echo round trip.
async fn session(public: SocketAddr) -> Result<u8, String> {
    let run = async {
        let mut s = TcpStream::connect(public)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let mut tag = [0u8; 1];
        s.read_exact(&mut tag)
            .await
            .map_err(|e| format!("read tag: {e}"))?;
        s.write_all(b"ping").await.map_err(|e| e.to_string())?;
        let mut echo = [0u8; 4];
        s.read_exact(&mut echo)
            .await
            .map_err(|e| format!("read echo: {e}"))?;
        (&echo == b"ping")
            .then_some(tag[0])
            .ok_or_else(|| "wrong echo".to_owned())
    };
    tokio::time::timeout(Duration::from_secs(5), run)
        .await
        .map_err(|_| "session timed out".to_owned())?
}

/// Runs `n` sessions one after the other; returns the count per tag and the failures.
async fn sessions(public: SocketAddr, n: usize) -> ([usize; 256], Vec<String>) {
    let mut tags = [0usize; 256];
    let mut failures = Vec::new();
    for _ in 0..n {
        match session(public).await {
            Ok(tag) => tags[tag as usize] += 1,
            Err(e) => failures.push(e),
        }
    }
    (tags, failures)
}

/// Sessions run by `workers` tasks until stopped: the count of successes and the times of the
/// failures since `t0`.
struct Load {
    ok: Arc<AtomicUsize>,
    failures: Arc<std::sync::Mutex<Vec<(Duration, String)>>>,
    stop: tokio_util::sync::CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(public: SocketAddr, workers: usize, t0: Instant) -> Self {
        let ok = Arc::new(AtomicUsize::new(0));
        let failures = Arc::new(std::sync::Mutex::new(Vec::new()));
        let stop = tokio_util::sync::CancellationToken::new();
        let tasks = (0..workers)
            .map(|_| {
                let (ok, failures, stop) = (ok.clone(), failures.clone(), stop.clone());
                tokio::spawn(async move {
                    while !stop.is_cancelled() {
                        match session(public).await {
                            Ok(_) => {
                                ok.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(e) => failures.lock().unwrap().push((t0.elapsed(), e)),
                        }
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                })
            })
            .collect();
        Self {
            ok,
            failures,
            stop,
            tasks,
        }
    }

    async fn finish(self) -> (usize, Vec<(Duration, String)>) {
        self.stop.cancel();
        for t in self.tasks {
            let _ = t.await;
        }
        let failures = self.failures.lock().unwrap().clone();
        (self.ok.load(Ordering::Relaxed), failures)
    }
}

/// A DMZ node and an agent process serving `services`.
struct Site {
    dmz: Dmz,
    agent: Captured,
    agent_opts: AgentOptions,
    _pki: Pki,
}

async fn site(services: Vec<Service>) -> Site {
    let pki = Pki::new();
    let dmz = Dmz::start(&pki, DmzOptions::default()).await;
    let agent_opts = AgentOptions::new(dmz.opts.tunnel, services);
    let agent = spawn_agent_captured(&pki, &agent_opts);
    Site {
        dmz,
        agent,
        agent_opts,
        _pki: pki,
    }
}

fn spawn_agent_captured(pki: &Pki, opts: &AgentOptions) -> Captured {
    let path = pki.write(
        &format!("agent-{}-{}.toml", opts.identity, opts.admin.port()),
        &opts.toml(pki),
    );
    Captured::spawn("relay-internal", &path)
}

/// `relay_target_up{target=ADDR}` of the agent at `admin` (None before the first sample).
async fn target_up(admin: SocketAddr, target: SocketAddr) -> Option<f64> {
    metric(
        &metrics_text(admin).await,
        "relay_target_up",
        &[&format!("target=\"{target}\"")],
    )
}

/// Waits until `relay_target_up` of `target` is `value`; returns the time it took.
async fn wait_target(
    admin: SocketAddr,
    target: SocketAddr,
    value: f64,
    log: &Captured,
) -> Duration {
    wait_for(LIMIT, || async move {
        target_up(admin, target).await == Some(value)
    })
    .await
    .unwrap_or_else(|| {
        panic!(
            "{target} never reached up={value}; agent log:\n{}",
            log.tail(40)
        )
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_spreads_sessions_and_a_killed_target_costs_no_session() {
    let a = tagged(1).await;
    let b = tagged(2).await;
    let public = free_port();
    let mut svc = Service::targets("as2", public, &[a.addr, b.addr]);
    svc.extra = FAST_TCP_CHECK.into();
    let s = site(vec![svc]).await;
    wait_open(local(public), LIMIT).await;

    let (tags, failures) = sessions(local(public), 100).await;
    println!(
        "round robin, 100 sessions: {} on 1, {} on 2, {} failed",
        tags[1],
        tags[2],
        failures.len()
    );
    assert!(failures.is_empty(), "{failures:?}");
    assert!(
        (40..=60).contains(&tags[1]) && (40..=60).contains(&tags[2]),
        "not spread about evenly: {} and {}",
        tags[1],
        tags[2]
    );

    // Under load, one target dies: its sessions move to the other before the DMZ is answered.
    let t0 = Instant::now();
    let load = Load::start(local(public), 4, t0);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let killed_at = t0.elapsed();
    drop(a);
    let detected = wait_target(s.agent_opts.admin, a_addr(&s, 0), 0.0, &s.agent).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (ok, failures) = load.finish().await;
    println!(
        "round robin, target killed under load: detected in {detected:?} (fall x interval = {FALL_TIME:?}), {ok} sessions ok, {} failed: {failures:?}",
        failures.len()
    );
    assert!(
        detected <= FALL_TIME + Duration::from_secs(1),
        "{detected:?}"
    );
    // A refused connect moves on to the other target: only sessions the dying target had
    // already accepted (in flight or in its backlog) may fail, inside the detection window.
    let window = killed_at..=killed_at + detected + Duration::from_millis(100);
    assert!(
        failures.iter().all(|(at, _)| window.contains(at)),
        "failures outside the detection window {window:?}: {failures:?}"
    );
    assert!(
        failures.len() <= 4,
        "more failures than sessions in flight: {failures:?}"
    );
    assert!(ok > 20, "too little load: {ok}");
    let line = s.agent.wait_line(&["target unhealthy", "as2"], LIMIT).await;
    assert!(line.contains(&a_addr(&s, 0).to_string()), "{line}");
    assert_eq!(
        s.agent.count_lines(&["target unhealthy"]),
        1,
        "logged once per change"
    );

    let (tags, failures) = sessions(local(public), 100).await;
    assert!(failures.is_empty(), "{failures:?}");
    assert_eq!(tags[2], 100, "every session on the remaining target");
    drop(b);
}

/// The address of target `i` of the first service of the site's agent.
fn a_addr(s: &Site, i: usize) -> SocketAddr {
    let list = s.agent_opts.services[0]
        .target
        .trim_matches(['[', ']'])
        .split(", ")
        .map(|t| t.trim_matches('"').parse().expect("target address"))
        .collect::<Vec<SocketAddr>>();
    list[i]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_stays_on_the_first_target_until_it_dies_and_returns_when_it_is_back() {
    let a = tagged(1).await;
    let b = tagged(2).await;
    let a_at = a.addr;
    let public = free_port();
    let mut svc = Service::targets("oftp", public, &[a.addr, b.addr]);
    svc.extra = format!("balance = \"first\"\n{FAST_TCP_CHECK}");
    let s = site(vec![svc]).await;
    wait_open(local(public), LIMIT).await;

    let (tags, failures) = sessions(local(public), 20).await;
    assert!(failures.is_empty(), "{failures:?}");
    assert_eq!(tags[1], 20, "all on the first");

    drop(a);
    // The accept task ends at its next poll: until then the kernel still queues connections.
    wait_closed(a_at, LIMIT).await;
    let (tags, failures) = sessions(local(public), 20).await;
    println!(
        "first, first target dead: {} on the second, {} failed",
        tags[2],
        failures.len()
    );
    assert!(failures.is_empty(), "{failures:?}");
    assert_eq!(tags[2], 20, "all on the second once the first is dead");

    wait_target(s.agent_opts.admin, a_at, 0.0, &s.agent).await;
    let _a = tagged_on(a_at, 1).await;
    let back = wait_target(s.agent_opts.admin, a_at, 1.0, &s.agent).await;
    println!(
        "first, first target back: in rotation again after {back:?} (rise x interval = {RISE_TIME:?})"
    );
    assert!(back <= RISE_TIME + Duration::from_secs(1), "{back:?}");
    let (tags, failures) = sessions(local(public), 20).await;
    assert!(failures.is_empty(), "{failures:?}");
    assert_eq!(tags[1], 20, "all on the first again");
    s.agent.wait_line(&["target healthy again"], LIMIT).await;
    drop(s.dmz);
}
