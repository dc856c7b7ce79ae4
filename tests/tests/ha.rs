//! High availability with real processes: two DMZ nodes on one host (public binds 127.0.0.2 and
//! 127.0.0.3) behind HAProxy in TCP mode, whose HTTP check follows each node's `/readyz`, and
//! agents that dial both nodes. A DMZ node or an agent is killed under load, every agent goes
//! and one comes back, outbound sessions fail over between nodes, an agent started before the
//! DMZ joins it when it appears, a restarted DMZ node is re-joined, and a rolling restart of the
//! agents loses no new session.
//!
//! The tests in this file run one at a time (they share two cores and measure time bounds).
//! Child logs go to files in the test's temporary directory; a failing assertion prints the
//! relevant tails.

use std::net::SocketAddr;
use std::path::Path;
use std::process::ExitStatus;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use relay_e2e::haproxy::{BINDS, Haproxy, haproxy_or_skip};
use relay_e2e::pattern::Pattern;
use relay_e2e::process::{Logged, curl, log_tail};
use relay_e2e::*;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// The tests of this file run one at a time: they measure time bounds on two cores.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The page of the HTTP target.
const BODY: &str = "hello from the target\n";
/// Bound on one short client exchange.
const EXCHANGE_LIMIT: Duration = Duration::from_secs(5);
/// Bound on setup waits (processes starting, tunnels registering) on a loaded machine.
const SETUP_LIMIT: Duration = Duration::from_secs(20);
/// Time between two new sessions of a load loop (200 per second): leaves the two cores room
/// for the processes under test.
const LOAD_INTERVAL: Duration = Duration::from_millis(5);

// ---------------------------------------------------------------------------------------------
// HAProxy

/// Starts HAProxy for `c`'s service port and waits until it sees both servers up and routes
/// `probe`.
async fn start_lb(c: &Cluster, haproxy: &Path, probe: Probe) -> Haproxy {
    let admins = [c.nodes[0].admin, c.nodes[1].admin];
    let lb = Haproxy::spawn(&c.pki, haproxy, c.port, admins, Duration::from_secs(30));
    let up = wait_for(SETUP_LIMIT, || lb.all_in("UP")).await;
    assert!(
        up.is_some(),
        "HAProxy did not see both DMZ nodes up within {SETUP_LIMIT:?}: {:?}\n{}",
        lb.states().await,
        lb.tail(20)
    );
    wait_routes(&lb, probe, SETUP_LIMIT).await;
    lb
}

/// Waits until a `probe` exchange through HAProxy succeeds; returns the time it took.
async fn wait_routes(lb: &Haproxy, probe: Probe, limit: Duration) -> Duration {
    let addr = lb.addr;
    wait_for(limit, || async move { probe.run(addr).await.is_ok() })
        .await
        .unwrap_or_else(|| panic!("HAProxy {addr} did not route within {limit:?}"))
}

// ---------------------------------------------------------------------------------------------
// Processes

/// Sends SIGTERM and waits for the process to exit; panics after `limit`.
async fn terminate(child: &mut ChildGuard, limit: Duration) -> (ExitStatus, Duration) {
    child.signal(Signal::SIGTERM);
    child.wait_exit(limit).await.unwrap_or_else(|| {
        panic!(
            "process {} did not exit within {limit:?} after SIGTERM",
            child.pid()
        )
    })
}

/// Tunnels of `agent` registered on the DMZ node at `admin`.
async fn tunnels_of(admin: SocketAddr, agent: &str) -> f64 {
    let label = format!("agent=\"{agent}\"");
    metric(
        &metrics_text(admin).await,
        "relay_tunnels_connected",
        &[&label],
    )
    .unwrap_or(0.0)
}

/// Sessions of a direction with result `ok` counted by an admin endpoint.
async fn sessions_ok(admin: SocketAddr, direction: &str) -> f64 {
    let dir = format!("direction=\"{direction}\"");
    metric(
        &metrics_text(admin).await,
        "relay_sessions_total",
        &[&dir, "result=\"ok\""],
    )
    .unwrap_or(0.0)
}

/// Two DMZ nodes (public binds 127.0.0.2 and 127.0.0.3) and agents dialing both, each a real
/// process, publishing services on one port.
struct Cluster {
    pki: Pki,
    nodes: [DmzOptions; 2],
    dmz: [Option<Logged>; 2],
    agents: Vec<AgentOptions>,
    agent_procs: Vec<Option<Logged>>,
    /// The public port of the service.
    port: u16,
}

impl Cluster {
    fn new(connect_allow: Vec<String>) -> Self {
        let node = |i: usize| {
            let [a, b, c, d] = BINDS[i];
            DmzOptions {
                public_bind: Some(format!("{a}.{b}.{c}.{d}")),
                connect_allow: connect_allow.clone(),
                ..Default::default()
            }
        };
        Self {
            pki: Pki::new(),
            nodes: [node(0), node(1)],
            dmz: [None, None],
            agents: Vec::new(),
            agent_procs: Vec::new(),
            port: free_port(),
        }
    }

    /// The public address of the service on node `i`.
    fn public(&self, i: usize) -> SocketAddr {
        SocketAddr::from((BINDS[i], self.port))
    }

    fn start_dmz(&mut self, i: usize) {
        let path = self.pki.write(
            &format!("dmz{}.toml", i + 1),
            &self.nodes[i].toml(&self.pki),
        );
        let name = format!("dmz{}", i + 1);
        self.dmz[i] = Some(Logged::spawn(&self.pki, "relay-dmz", &path, &[], &name));
    }

    /// SIGKILLs node `i` and reaps it; returns the moment of the kill.
    fn kill_dmz(&mut self, i: usize) -> Instant {
        let mut node = self.dmz[i].take().expect("node running");
        let at = Instant::now();
        node.guard.child.kill().expect("SIGKILL DMZ node");
        node.guard.child.wait().expect("reap DMZ node");
        at
    }

    /// Adds an agent `identity` dialing both nodes; returns its index.
    fn add_agent(&mut self, identity: &str, services: Vec<Service>, extra: String) -> usize {
        let mut opts = AgentOptions::new(self.nodes[0].tunnel, services);
        opts.identity = identity.into();
        opts.dmz = vec![self.nodes[0].tunnel, self.nodes[1].tunnel];
        opts.extra = extra;
        self.agents.push(opts);
        self.agent_procs.push(None);
        self.agents.len() - 1
    }

    fn start_agent(&mut self, i: usize) {
        let opts = &self.agents[i];
        let path = self
            .pki
            .write(&format!("{}.toml", opts.identity), &opts.toml(&self.pki));
        self.agent_procs[i] = Some(Logged::spawn(
            &self.pki,
            "relay-internal",
            &path,
            &[],
            &opts.identity,
        ));
    }

    /// SIGKILLs agent `i` and reaps it; returns the moment of the kill.
    fn kill_agent(&mut self, i: usize) -> Instant {
        let mut agent = self.agent_procs[i].take().expect("agent running");
        let at = Instant::now();
        agent.guard.child.kill().expect("SIGKILL agent");
        agent.guard.child.wait().expect("reap agent");
        at
    }

    /// Waits until every agent in `agents` has `per_node` tunnels registered on every node in
    /// `nodes`; returns the time it took.
    async fn wait_registered(
        &self,
        nodes: &[usize],
        agents: &[usize],
        per_node: usize,
    ) -> Duration {
        let start = Instant::now();
        for &n in nodes {
            for &a in agents {
                let admin = self.nodes[n].admin;
                let id = self.agents[a].identity.clone();
                let up = wait_for(SETUP_LIMIT, || {
                    let id = id.clone();
                    async move { tunnels_of(admin, &id).await == per_node as f64 }
                })
                .await;
                assert!(
                    up.is_some(),
                    "{id} does not have {per_node} tunnels on DMZ node {} within {SETUP_LIMIT:?} (has {})\n{}\n{}",
                    n + 1,
                    tunnels_of(admin, &id).await,
                    log_tail(&self.pki.path(&format!("{id}.stderr")), 15),
                    log_tail(&self.pki.path(&format!("dmz{}.stderr", n + 1)), 15),
                );
            }
        }
        start.elapsed()
    }

    fn logs(&self) -> String {
        let mut names: Vec<String> = vec!["dmz1.stderr".into(), "dmz2.stderr".into()];
        names.extend(self.agents.iter().map(|a| format!("{}.stderr", a.identity)));
        names
            .iter()
            .map(|n| log_tail(&self.pki.path(n), 25))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

// ---------------------------------------------------------------------------------------------
// Targets and clients

/// Connects, writes `request` (half-closing after it when asked), reads to EOF.
async fn exchange(addr: SocketAddr, request: &[u8], half_close: bool) -> Result<Vec<u8>, String> {
    let run = async {
        let mut s = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        s.write_all(request)
            .await
            .map_err(|e| format!("write: {e}"))?;
        if half_close {
            s.shutdown().await.map_err(|e| format!("shutdown: {e}"))?;
        }
        let mut buf = Vec::new();
        s.read_to_end(&mut buf)
            .await
            .map_err(|e| format!("read: {e}"))?;
        Ok(buf)
    };
    tokio::time::timeout(EXCHANGE_LIMIT, run)
        .await
        .map_err(|_| format!("no complete answer within {EXCHANGE_LIMIT:?}"))?
}

/// A short session through the relay.
#[derive(Clone, Copy, Debug)]
enum Probe {
    /// `GET /` on the HTTP target, new connection, `Connection: close`.
    Http,
    /// A line through a [`targets::tagged_echo`]; the answer names the target's tag.
    TaggedEcho,
}

impl Probe {
    /// Runs one session; `Ok(tag)` (0 for HTTP) when the answer is complete and right.
    async fn run(self, addr: SocketAddr) -> Result<u8, String> {
        match self {
            Probe::Http => {
                let answer = exchange(
                    addr,
                    b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
                    false,
                )
                .await?;
                let text = String::from_utf8_lossy(&answer);
                if text.starts_with("HTTP/1.1 200 ") && text.ends_with(BODY) {
                    Ok(0)
                } else {
                    Err(format!("unexpected answer {text:?}"))
                }
            }
            Probe::TaggedEcho => {
                const LINE: &[u8] = b"a short session\n";
                let answer = exchange(addr, LINE, true).await?;
                match answer.split_first() {
                    Some((&tag, rest)) if rest == LINE => Ok(tag),
                    _ => Err(format!(
                        "unexpected answer {:?}",
                        String::from_utf8_lossy(&answer)
                    )),
                }
            }
        }
    }
}

/// One short session of a load loop.
#[derive(Debug)]
struct Sample {
    start: Instant,
    end: Instant,
    result: Result<u8, String>,
}

/// Open-loop load: a new short session every `interval` (at most `MAX_IN_FLIGHT` at once), each
/// on its own task, so one slow failure does not hold back the sessions after it. Runs until
/// `stop`; returns every sample, by start time.
fn spawn_load(
    addr: SocketAddr,
    interval: Duration,
    probe: Probe,
    stop: CancellationToken,
) -> JoinHandle<Vec<Sample>> {
    const MAX_IN_FLIGHT: usize = 64;
    tokio::spawn(async move {
        let limit = Arc::new(tokio::sync::Semaphore::new(MAX_IN_FLIGHT));
        let mut tasks = tokio::task::JoinSet::new();
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        while !stop.is_cancelled() {
            tick.tick().await;
            let permit = limit.clone().acquire_owned().await.expect("open semaphore");
            tasks.spawn(async move {
                let _permit = permit;
                let start = Instant::now();
                let result = probe.run(addr).await;
                Sample {
                    start,
                    end: Instant::now(),
                    result,
                }
            });
        }
        let mut all = Vec::new();
        while let Some(r) = tasks.join_next().await {
            all.push(r.expect("load task"));
        }
        all.sort_by_key(|s| s.start);
        all
    })
}

/// Milliseconds of `t` relative to `zero` (negative before it).
fn ms(t: Instant, zero: Instant) -> i64 {
    if t >= zero {
        (t - zero).as_millis() as i64
    } else {
        -((zero - t).as_millis() as i64)
    }
}

/// The failed samples, as lines with times relative to `zero`.
fn failures(samples: &[Sample], zero: Instant) -> Vec<String> {
    samples
        .iter()
        .filter_map(|s| {
            s.result.as_ref().err().map(|e| {
                format!(
                    "started {} ms, ended {} ms: {e}",
                    ms(s.start, zero),
                    ms(s.end, zero)
                )
            })
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Long transfers

/// What a long echo session saw.
#[derive(Debug)]
struct LongResult {
    /// The target's tag (`b'1'` or `b'2'`), once read.
    tag: Option<u8>,
    /// `Ok` when every byte came back with the right SHA-256.
    outcome: Result<(), String>,
    ended: Instant,
}

/// Read buffer of a long session.
const CHUNK: usize = 64 * 1024;

/// A long echo session through `addr`: reads the tag, sends `len` bytes of pattern `seed` at
/// `rate` bytes/s at most, and checks the echo's length and SHA-256. `echoed` counts the bytes
/// received so far; `tagged` is set once the tag is read.
async fn long_session(
    addr: SocketAddr,
    seed: u64,
    len: u64,
    rate: f64,
    echoed: Arc<AtomicU64>,
    tag_slot: Arc<AtomicU64>,
) -> LongResult {
    let mut tag = None;
    let run = async {
        let mut s = tokio::time::timeout(EXCHANGE_LIMIT, TcpStream::connect(addr))
            .await
            .map_err(|_| "connect timed out".to_owned())?
            .map_err(|e| format!("connect: {e}"))?;
        let mut t = [0u8; 1];
        tokio::time::timeout(EXCHANGE_LIMIT, s.read_exact(&mut t))
            .await
            .map_err(|_| "no tag within the limit".to_owned())?
            .map_err(|e| format!("reading the tag: {e}"))?;
        tag = Some(t[0]);
        tag_slot.store(t[0] as u64, Ordering::Relaxed);
        let (mut r, mut w) = s.into_split();
        let writer = async move {
            let mut pattern = Pattern::new(seed, len);
            let mut hash = Sha256::new();
            let started = Instant::now();
            let mut sent = 0u64;
            while let Some(chunk) = pattern.next_chunk() {
                hash.update(chunk);
                w.write_all(chunk)
                    .await
                    .map_err(|e| format!("write after {sent} bytes: {e}"))?;
                sent += chunk.len() as u64;
                let due = Duration::from_secs_f64(sent as f64 / rate);
                if let Some(ahead) = due.checked_sub(started.elapsed()) {
                    tokio::time::sleep(ahead).await;
                }
            }
            w.shutdown().await.map_err(|e| format!("shutdown: {e}"))?;
            Ok::<[u8; 32], String>(hash.finalize().into())
        };
        let reader = async move {
            let mut hash = Sha256::new();
            let mut buf = vec![0u8; CHUNK];
            let mut total = 0u64;
            loop {
                let n = r
                    .read(&mut buf)
                    .await
                    .map_err(|e| format!("read after {total} bytes: {e}"))?;
                if n == 0 {
                    return Ok::<(u64, [u8; 32]), String>((total, hash.finalize().into()));
                }
                hash.update(&buf[..n]);
                total += n as u64;
                echoed.store(total, Ordering::Relaxed);
            }
        };
        let (sent, received) = tokio::join!(writer, reader);
        let (total, got) = received?;
        if total != len {
            return Err(format!("echo ended after {total} of {len} bytes"));
        }
        let want = sent?;
        if got != want {
            return Err("SHA-256 of the echo differs".to_owned());
        }
        Ok(())
    };
    let outcome = match tokio::time::timeout(Duration::from_secs(60), run).await {
        Ok(r) => r,
        Err(_) => Err("no end within 60 s".to_owned()),
    };
    LongResult {
        tag,
        outcome,
        ended: Instant::now(),
    }
}

// ---------------------------------------------------------------------------------------------
// Tests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_dmz_node_under_load() {
    let Some(haproxy) = haproxy_or_skip("kill_dmz_node_under_load") else {
        return;
    };
    let _serial = SERIAL.lock().await;
    let target = targets::http(BODY).await;
    let mut c = Cluster::new(Vec::new());
    c.start_dmz(0);
    c.start_dmz(1);
    let service = vec![Service::new("web", c.port, target.addr)];
    c.add_agent("engine-1", service.clone(), String::new());
    c.add_agent("engine-2", service, String::new());
    c.start_agent(0);
    c.start_agent(1);
    c.wait_registered(&[0, 1], &[0, 1], 2).await;
    let lb = start_lb(&c, &haproxy, Probe::Http).await;

    let stop = CancellationToken::new();
    let load = spawn_load(lb.addr, LOAD_INTERVAL, Probe::Http, stop.clone());
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before_kill = sessions_ok(c.nodes[0].admin, "inbound").await;
    assert!(
        before_kill > 0.0,
        "DMZ node 1 carried no session before the kill: the test would prove nothing"
    );
    let killed = c.kill_dmz(0);
    let marked_down = lb.wait_state("dmz1", "DOWN", Duration::from_secs(5)).await;
    let end = killed + Duration::from_secs(6);
    tokio::time::sleep(end.saturating_duration_since(Instant::now())).await;
    stop.cancel();
    let samples = load.await.expect("load task");

    let failed = failures(&samples, killed);
    let before: Vec<&Sample> = samples.iter().filter(|s| s.end < killed).collect();
    let window: Vec<&Sample> = samples.iter().filter(|s| s.end >= killed).collect();
    let window_failed = window.iter().filter(|s| s.result.is_err()).count();
    let last_failure = samples
        .iter()
        .filter(|s| s.result.is_err())
        .map(|s| s.start)
        .max();
    let streak_from = match last_failure {
        Some(t) => samples
            .iter()
            .find(|s| s.start > t)
            .map(|s| ms(s.start, killed)),
        None => Some(0),
    };
    let last_failure_end = samples
        .iter()
        .filter(|s| s.result.is_err())
        .map(|s| ms(s.end, killed))
        .max();
    let steady: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.start >= killed + Duration::from_secs(3))
        .collect();
    let steady_failed = steady.iter().filter(|s| s.result.is_err()).count();
    println!(
        "kill_dmz_node_under_load: {} requests ({} before the kill, {} during/after it, one every {LOAD_INTERVAL:?}); node 1 had carried {before_kill} sessions",
        samples.len(),
        before.len(),
        window.len()
    );
    println!(
        "kill_dmz_node_under_load: HAProxy marked dmz1 DOWN {} after the SIGKILL",
        marked_down.map_or("never (5 s)".to_owned(), |d| format!(
            "{} ms",
            d.as_millis()
        ))
    );
    println!(
        "kill_dmz_node_under_load: {window_failed} failed requests in the window; every request started from {} ms after the kill on succeeded (the last failing one ended {} ms after the kill: HAProxy retries a refused connect on the same server, 1 s apart, without `option redispatch`); {} requests started >= 3 s after the kill, {steady_failed} failed",
        streak_from.map_or("never".to_owned(), |m| m.to_string()),
        last_failure_end.map_or("-".to_owned(), |m| m.to_string()),
        steady.len()
    );
    for f in failed.iter().take(10) {
        println!("kill_dmz_node_under_load: failure {f}");
    }
    assert!(
        before.iter().all(|s| s.result.is_ok()),
        "requests failed before the kill: {failed:?}"
    );
    assert!(
        marked_down.is_some(),
        "HAProxy did not mark dmz1 down within 5 s"
    );
    assert!(
        steady.len() >= 100,
        "only {} requests started >= 3 s after the kill (want 100 at least)",
        steady.len()
    );
    assert_eq!(
        steady_failed,
        0,
        "requests failed >= 3 s after the kill: {failed:?}\n{}",
        c.logs()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_agent_under_load() {
    const LONG: usize = 8;
    const LEN: u64 = 32 * 1024 * 1024;
    // Per long session: 32 MiB take about 16 s, so all are in flight at the kill, and the
    // two cores keep room for the new sessions.
    const RATE: f64 = 2.0 * 1024.0 * 1024.0;
    let Some(haproxy) = haproxy_or_skip("kill_agent_under_load") else {
        return;
    };
    let _serial = SERIAL.lock().await;
    let echo1 = targets::tagged_echo(b'1').await;
    let echo2 = targets::tagged_echo(b'2').await;
    let mut c = Cluster::new(Vec::new());
    c.start_dmz(0);
    c.start_dmz(1);
    // Same service, each agent with its own target: the tag tells which agent carried a session.
    c.add_agent(
        "engine-1",
        vec![Service::new("echo", c.port, echo1.addr)],
        String::new(),
    );
    c.add_agent(
        "engine-2",
        vec![Service::new("echo", c.port, echo2.addr)],
        String::new(),
    );
    c.start_agent(0);
    c.start_agent(1);
    c.wait_registered(&[0, 1], &[0, 1], 2).await;
    let lb = start_lb(&c, &haproxy, Probe::TaggedEcho).await;

    let echoed: Vec<Arc<AtomicU64>> = (0..LONG).map(|_| Arc::default()).collect();
    let tags: Vec<Arc<AtomicU64>> = (0..LONG).map(|_| Arc::default()).collect();
    let mut long = Vec::new();
    for i in 0..LONG {
        long.push(tokio::spawn(long_session(
            lb.addr,
            0x5eed + i as u64,
            LEN,
            RATE,
            echoed[i].clone(),
            tags[i].clone(),
        )));
    }
    let stop = CancellationToken::new();
    let load = spawn_load(lb.addr, LOAD_INTERVAL * 4, Probe::TaggedEcho, stop.clone());

    // Every long session tagged and well under way, none finished.
    let under_way = wait_for(Duration::from_secs(30), || async {
        echoed
            .iter()
            .all(|e| e.load(Ordering::Relaxed) >= 2 * 1024 * 1024)
    })
    .await;
    assert!(
        under_way.is_some(),
        "long sessions did not get under way: echoed {:?}",
        echoed
            .iter()
            .map(|e| e.load(Ordering::Relaxed))
            .collect::<Vec<_>>()
    );
    let at_kill: Vec<u64> = echoed.iter().map(|e| e.load(Ordering::Relaxed)).collect();
    let on: Vec<u8> = tags
        .iter()
        .map(|t| t.load(Ordering::Relaxed) as u8)
        .collect();
    let on1 = on.iter().filter(|&&t| t == b'1').count();
    let on2 = on.iter().filter(|&&t| t == b'2').count();
    println!(
        "kill_agent_under_load: {LONG} long sessions of {} MiB: {on1} on engine-1, {on2} on engine-2; echoed at the kill (MiB): {:?}",
        LEN >> 20,
        at_kill.iter().map(|b| b >> 20).collect::<Vec<_>>()
    );
    assert_eq!(on1 + on2, LONG, "every long session is tagged: {on:?}");
    assert!(
        on1 >= 1 && on2 >= 1,
        "long sessions not spread over both agents: engine-1 {on1}, engine-2 {on2}"
    );
    assert!(
        at_kill.iter().all(|&b| b < LEN),
        "a long session finished before the kill: {at_kill:?}"
    );

    let killed = c.kill_agent(0);
    let mut results = Vec::new();
    for task in long {
        results.push(task.await.expect("long session task"));
    }
    let end = (killed + Duration::from_secs(3)).max(Instant::now());
    tokio::time::sleep(end.saturating_duration_since(Instant::now())).await;
    stop.cancel();
    let samples = load.await.expect("load task");

    for (i, r) in results.iter().enumerate() {
        println!(
            "kill_agent_under_load: long session {i} on engine-{} ended {} ms after the kill: {:?}",
            r.tag.map_or('?', |t| t as char),
            ms(r.ended, killed),
            r.outcome
        );
    }
    let survivors_ok = results
        .iter()
        .filter(|r| r.tag == Some(b'2') && r.outcome.is_ok())
        .count();
    let broken = results
        .iter()
        .filter(|r| r.tag == Some(b'1') && r.outcome.is_err())
        .count();
    let after = killed + Duration::from_secs(1);
    let new_late: Vec<&Sample> = samples.iter().filter(|s| s.start >= after).collect();
    let new_late_bad: Vec<&&Sample> = new_late
        .iter()
        .filter(|s| s.result.as_ref().ok() != Some(&b'2'))
        .collect();
    let new_early: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.end >= killed && s.start < after)
        .collect();
    let new_early_failed = new_early.iter().filter(|s| s.result.is_err()).count();
    println!(
        "kill_agent_under_load: engine-2 sessions completed with SHA-256 OK: {survivors_ok}/{on2}; engine-1 sessions broken by the kill: {broken}/{on1}"
    );
    println!(
        "kill_agent_under_load: new short sessions: {} in all; {} within 1 s of the kill ({new_early_failed} failed); {} started >= 1 s after ({} failed or not on engine-2)",
        samples.len(),
        new_early.len(),
        new_late.len(),
        new_late_bad.len()
    );
    for f in failures(&samples, killed).iter().take(10) {
        println!("kill_agent_under_load: short session failure {f}");
    }
    assert_eq!(
        survivors_ok,
        on2,
        "sessions carried by engine-2 must complete intact\n{}",
        c.logs()
    );
    assert_eq!(
        broken, on1,
        "sessions carried by the killed engine-1 cannot complete"
    );
    for r in results.iter().filter(|r| r.tag == Some(b'1')) {
        assert!(
            r.ended < killed + Duration::from_secs(10),
            "a session of the killed agent took {} ms to end",
            ms(r.ended, killed)
        );
    }
    assert!(
        new_late.len() >= 20,
        "only {} new sessions started >= 1 s after the kill",
        new_late.len()
    );
    assert!(
        new_late_bad.is_empty(),
        "new sessions started >= 1 s after the kill failed or did not land on engine-2: {:?}",
        new_late_bad
            .iter()
            .take(5)
            .map(|s| (ms(s.start, killed), &s.result))
            .collect::<Vec<_>>()
    );
    drop(echo1);
    drop(echo2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_agents_gone_then_one_returns() {
    let Some(haproxy) = haproxy_or_skip("all_agents_gone_then_one_returns") else {
        return;
    };
    let _serial = SERIAL.lock().await;
    let target = targets::http(BODY).await;
    let mut c = Cluster::new(Vec::new());
    c.start_dmz(0);
    c.start_dmz(1);
    let service = vec![Service::new("web", c.port, target.addr)];
    c.add_agent("engine-1", service.clone(), String::new());
    c.add_agent("engine-2", service, String::new());
    c.start_agent(0);
    c.start_agent(1);
    c.wait_registered(&[0, 1], &[0, 1], 2).await;
    let lb = start_lb(&c, &haproxy, Probe::Http).await;

    // engine-1 stops gracefully, engine-2 is killed.
    let (status, took) = terminate(
        &mut c.agent_procs[0].as_mut().expect("engine-1").guard,
        Duration::from_secs(40),
    )
    .await;
    assert!(
        status.success(),
        "engine-1 exit status after SIGTERM: {status}"
    );
    c.agent_procs[0] = None;
    assert!(
        Probe::Http.run(lb.addr).await.is_ok(),
        "engine-2 still serves after engine-1 stopped"
    );
    let gone = c.kill_agent(1);

    // Every figure below is the time since the last agent went (or came back).
    let mut closed = Vec::new();
    for i in 0..2 {
        wait_closed(c.public(i), Duration::from_secs(5)).await;
        closed.push(gone.elapsed());
    }
    let mut not_ready = Vec::new();
    for n in &c.nodes {
        let admin = n.admin;
        wait_for(Duration::from_secs(5), || async move {
            readyz(admin).await == 503
        })
        .await
        .unwrap_or_else(|| {
            panic!("DMZ {admin} /readyz not 503 within 5 s of the last agent going")
        });
        not_ready.push(gone.elapsed());
    }
    let lb_down = wait_for(Duration::from_secs(5), || lb.all_in("DOWN"))
        .await
        .map(|_| gone.elapsed());
    let lb_down_at = gone.elapsed();
    let through = Probe::Http.run(lb.addr).await;
    println!(
        "all_agents_gone_then_one_returns: engine-1 exited 0 {} ms after SIGTERM; after SIGKILL of engine-2: public ports refused after {} / {} ms, /readyz 503 after {} / {} ms, HAProxy both DOWN after {}; request through HAProxy: {through:?}",
        took.as_millis(),
        closed[0].as_millis(),
        closed[1].as_millis(),
        not_ready[0].as_millis(),
        not_ready[1].as_millis(),
        lb_down.map_or("never (5 s)".to_owned(), |d| format!(
            "{} ms",
            d.as_millis()
        )),
    );
    assert!(
        lb_down.is_some(),
        "HAProxy did not mark both nodes down: {:?}",
        lb.states().await
    );
    assert!(
        through.is_err(),
        "a request through HAProxy succeeded with no agent ({lb_down_at:?} after the last went)"
    );

    c.start_agent(0);
    let back = Instant::now();
    let mut opened = Vec::new();
    for i in 0..2 {
        wait_open(c.public(i), SETUP_LIMIT).await;
        opened.push(back.elapsed());
    }
    let mut ready = Vec::new();
    for n in &c.nodes {
        let admin = n.admin;
        wait_for(SETUP_LIMIT, || async move { readyz(admin).await == 200 })
            .await
            .unwrap_or_else(|| panic!("DMZ {admin} /readyz not 200 within {SETUP_LIMIT:?}"));
        ready.push(back.elapsed());
    }
    let lb_up = wait_for(SETUP_LIMIT, || lb.all_in("UP"))
        .await
        .map(|_| back.elapsed());
    wait_routes(&lb, Probe::Http, SETUP_LIMIT).await;
    let routed_at = back.elapsed();
    println!(
        "all_agents_gone_then_one_returns: engine-1 started again: public ports open after {} / {} ms, /readyz 200 after {} / {} ms, HAProxy both UP after {}, routes after {} ms",
        opened[0].as_millis(),
        opened[1].as_millis(),
        ready[0].as_millis(),
        ready[1].as_millis(),
        lb_up.map_or("never".to_owned(), |d| format!("{} ms", d.as_millis())),
        routed_at.as_millis()
    );
    assert!(
        lb_up.is_some(),
        "HAProxy did not mark both nodes up again: {:?}",
        lb.states().await
    );
    // Both nodes serve again: a session through each public address.
    for i in 0..2 {
        let r = Probe::Http.run(c.public(i)).await;
        assert!(r.is_ok(), "node {} after the agent came back: {r:?}", i + 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbound_proxy_fails_over_between_dmz_nodes() {
    let _serial = SERIAL.lock().await;
    let partner = targets::http("hello partner\n").await;
    let pport = partner.addr.port();
    let mut c = Cluster::new(vec![
        format!("127.0.0.1:{pport}"),
        format!("localhost:{pport}"),
    ]);
    c.start_dmz(0);
    c.start_dmz(1);
    let proxy = SocketAddr::from(([127, 0, 0, 1], free_port()));
    c.add_agent(
        "engine-1",
        Vec::new(),
        format!("\n[outbound_proxy]\nlisten = \"{proxy}\"\n"),
    );
    c.start_agent(0);
    // Inbound and outbound carriers: two of each per node.
    c.wait_registered(&[0, 1], &[0], 4).await;

    let connect = move || {
        curl(vec![
            "--proxytunnel".into(),
            "--proxy".into(),
            format!("http://{proxy}"),
            format!("http://127.0.0.1:{pport}/"),
        ])
    };
    let socks = move || {
        curl(vec![
            "--proxy".into(),
            format!("socks5h://{proxy}"),
            format!("http://localhost:{pport}/"),
        ])
    };
    let request = move |i: usize| async move {
        let (code, body) = if i.is_multiple_of(2) {
            connect().await
        } else {
            socks().await
        };
        (code == 0 && body == "hello partner\n", code)
    };
    const FIRST: usize = 6;
    for i in 0..FIRST {
        let (ok, code) = request(i).await;
        assert!(
            ok,
            "outbound request {i} before the kill failed (curl exit {code})"
        );
    }
    let admins = [c.nodes[0].admin, c.nodes[1].admin];
    let counted = wait_for(Duration::from_secs(5), || async {
        sessions_ok(admins[0], "outbound").await + sessions_ok(admins[1], "outbound").await
            >= FIRST as f64
    })
    .await;
    assert!(
        counted.is_some(),
        "the DMZ nodes did not count {FIRST} outbound sessions"
    );
    let per_node = [
        sessions_ok(admins[0], "outbound").await,
        sessions_ok(admins[1], "outbound").await,
    ];
    let victim = if per_node[0] >= per_node[1] { 0 } else { 1 };
    let survivor = 1 - victim;
    println!(
        "outbound_proxy_fails_over_between_dmz_nodes: {FIRST} sessions before the kill: node 1 {}, node 2 {}; killing node {}",
        per_node[0],
        per_node[1],
        victim + 1
    );
    assert!(per_node[victim] >= 1.0);
    let survivor_before = per_node[survivor];
    let denied_before = metric(
        &metrics_text(admins[survivor]).await,
        "relay_rejections_total",
        &["reason=\"policy_denied\""],
    )
    .unwrap_or(0.0);

    let killed = c.kill_dmz(victim);
    let mut samples: Vec<(Instant, bool, i32)> = Vec::new();
    let mut i = 0;
    while killed.elapsed() < Duration::from_millis(3500) {
        let start = Instant::now();
        let (ok, code) = request(i).await;
        samples.push((start, ok, code));
        i += 1;
    }
    let failed: Vec<String> = samples
        .iter()
        .filter(|s| !s.1)
        .map(|s| format!("started {} ms, curl exit {}", ms(s.0, killed), s.2))
        .collect();
    let late: Vec<&(Instant, bool, i32)> = samples
        .iter()
        .filter(|s| s.0 >= killed + Duration::from_secs(2))
        .collect();
    let succeeded = samples.iter().filter(|s| s.1).count();
    println!(
        "outbound_proxy_fails_over_between_dmz_nodes: {} requests (HTTP CONNECT and SOCKS5 alternating) in 3.5 s after SIGKILL of node {}: {} failed {failed:?}; {} started >= 2 s after the kill",
        samples.len(),
        victim + 1,
        failed.len(),
        late.len()
    );
    assert!(
        late.len() >= 3,
        "too few requests after the kill: {}",
        late.len()
    );
    assert!(
        late.iter().all(|s| s.1),
        "outbound requests failed >= 2 s after the kill: {failed:?}\n{}",
        c.logs()
    );
    let survivor_admin = admins[survivor];
    let carried = wait_for(Duration::from_secs(5), || async move {
        sessions_ok(survivor_admin, "outbound").await >= survivor_before + succeeded as f64
    })
    .await;
    let survivor_after = sessions_ok(survivor_admin, "outbound").await;
    println!(
        "outbound_proxy_fails_over_between_dmz_nodes: surviving node {} counted {} new outbound sessions for {succeeded} successful requests",
        survivor + 1,
        survivor_after - survivor_before
    );
    assert!(
        carried.is_some(),
        "the surviving node did not carry the sessions after the kill"
    );

    // A destination outside connect_allow: 403 through CONNECT, 0x02 through SOCKS5.
    let denied_port = free_port();
    let mut engine = TcpStream::connect(proxy).await.expect("connect proxy");
    engine
        .write_all(
            format!(
                "CONNECT 127.0.0.1:{denied_port} HTTP/1.1\r\nHost: 127.0.0.1:{denied_port}\r\n\r\n"
            )
            .as_bytes(),
        )
        .await
        .expect("write CONNECT");
    let mut answer = vec![0u8; 512];
    let n = tokio::time::timeout(Duration::from_secs(10), engine.read(&mut answer))
        .await
        .expect("CONNECT answer in time")
        .expect("read CONNECT answer");
    let head = String::from_utf8_lossy(&answer[..n]).into_owned();
    assert!(
        head.starts_with("HTTP/1.1 403"),
        "expected 403, got {head:?}"
    );

    let mut engine = TcpStream::connect(proxy).await.expect("connect proxy");
    engine.write_all(&[5, 1, 0]).await.expect("SOCKS greeting");
    let mut hello = [0u8; 2];
    tokio::time::timeout(Duration::from_secs(10), engine.read_exact(&mut hello))
        .await
        .expect("SOCKS method in time")
        .expect("read SOCKS method");
    assert_eq!(hello, [5, 0]);
    let mut req = vec![5, 1, 0, 1, 127, 0, 0, 1];
    req.extend_from_slice(&denied_port.to_be_bytes());
    engine.write_all(&req).await.expect("SOCKS request");
    let mut reply = [0u8; 10];
    tokio::time::timeout(Duration::from_secs(10), engine.read_exact(&mut reply))
        .await
        .expect("SOCKS reply in time")
        .expect("read SOCKS reply");
    assert_eq!(
        reply[1], 0x02,
        "SOCKS5 reply must be 0x02 (not allowed by ruleset)"
    );

    let denied = wait_for(Duration::from_secs(5), || async move {
        metric(
            &metrics_text(survivor_admin).await,
            "relay_rejections_total",
            &["reason=\"policy_denied\""],
        )
        .unwrap_or(0.0)
            >= denied_before + 2.0
    })
    .await;
    let denied_after = metric(
        &metrics_text(survivor_admin).await,
        "relay_rejections_total",
        &["reason=\"policy_denied\""],
    )
    .unwrap_or(0.0);
    println!(
        "outbound_proxy_fails_over_between_dmz_nodes: surviving node counted {} policy_denied rejections (CONNECT 403, SOCKS5 0x02)",
        denied_after - denied_before
    );
    assert!(
        denied.is_some(),
        "policy denials not counted on the surviving node"
    );
    assert_eq!(denied_after - denied_before, 2.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_started_before_dmz_connects_when_it_appears() {
    /// The bound of the acceptance criterion: the backoff cap (30 s) plus a margin.
    const BOUND: Duration = Duration::from_secs(35);
    let _serial = SERIAL.lock().await;
    let target = targets::http(BODY).await;
    let mut c = Cluster::new(Vec::new());
    let service = vec![Service::new("web", c.port, target.addr)];
    let a = c.add_agent("engine-1", service, String::new());
    c.start_agent(a);
    let agent_admin = c.agents[a].admin;

    // The agent runs and fails for about 3 s: no DMZ is up.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (status, reason) = http_get(agent_admin, "/readyz").await.expect("agent admin");
    let errors = metric(
        &metrics_text(agent_admin).await,
        "relay_tunnel_connects_total",
        &["result=\"error\""],
    )
    .unwrap_or(0.0);
    println!(
        "agent_started_before_dmz_connects_when_it_appears: after 3 s with no DMZ: agent /readyz {status} ({}), {errors} failed tunnel attempts",
        reason.trim()
    );
    assert_eq!(status, 503, "agent ready with no DMZ up");
    assert!(
        errors >= 2.0,
        "the agent did not keep trying: {errors} failed attempts"
    );

    c.start_dmz(0);
    c.start_dmz(1);
    let appeared = Instant::now();
    let mut joined = Vec::new();
    for i in 0..2 {
        let admin = c.nodes[i].admin;
        let limit = BOUND.saturating_sub(appeared.elapsed());
        let t = wait_for(limit, || async move { readyz(admin).await == 200 }).await;
        assert!(
            t.is_some(),
            "the agent did not join DMZ node {} within {BOUND:?} of it appearing\n{}",
            i + 1,
            c.logs()
        );
        joined.push(appeared.elapsed());
    }
    println!(
        "agent_started_before_dmz_connects_when_it_appears: DMZ nodes appeared; agent registered on node 1 after {} ms, node 2 after {} ms (bound {BOUND:?})",
        joined[0].as_millis(),
        joined[1].as_millis()
    );
    for i in 0..2 {
        wait_open(c.public(i), SETUP_LIMIT).await;
        let r = Probe::Http.run(c.public(i)).await;
        assert!(r.is_ok(), "session through node {}: {r:?}", i + 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dmz_restart_is_rejoined() {
    const BOUND: Duration = Duration::from_secs(5);
    let _serial = SERIAL.lock().await;
    let target = targets::http(BODY).await;
    let mut c = Cluster::new(Vec::new());
    c.start_dmz(0);
    c.start_dmz(1);
    let service = vec![Service::new("web", c.port, target.addr)];
    let a = c.add_agent("engine-1", service, String::new());
    c.start_agent(a);
    c.wait_registered(&[0, 1], &[a], 2).await;
    assert!(Probe::Http.run(c.public(0)).await.is_ok());

    let killed = c.kill_dmz(0);
    // Restarted at once on the same ports.
    c.start_dmz(0);
    let restarted = Instant::now();
    let admin = c.nodes[0].admin;
    let ready = wait_for(Duration::from_secs(15), || async move {
        readyz(admin).await == 200
    })
    .await;
    let ready_at = restarted.elapsed();
    wait_open(c.public(0), Duration::from_secs(15)).await;
    let open_at = restarted.elapsed();
    let all = wait_for(Duration::from_secs(15), || async move {
        tunnels_of(admin, "engine-1").await == 2.0
    })
    .await;
    let all_at = restarted.elapsed();
    let reconnects = metric(
        &metrics_text(c.agents[a].admin).await,
        "relay_tunnel_reconnects_total",
        &[&format!("dmz=\"{}\"", c.nodes[0].tunnel)],
    )
    .unwrap_or(0.0);
    println!(
        "dmz_restart_is_rejoined: node 1 restarted {} ms after its SIGKILL; agent registered {} ms after the restart (public port open after {} ms), both tunnels after {} ms; agent counted {reconnects} reconnects to node 1",
        ms(restarted, killed),
        ready_at.as_millis(),
        open_at.as_millis(),
        all_at.as_millis()
    );
    assert!(
        ready.is_some_and(|d| d < BOUND),
        "the agent did not re-join the restarted node within {BOUND:?} (took {ready:?})\n{}",
        c.logs()
    );
    assert!(
        all.is_some(),
        "not every tunnel came back to the restarted node"
    );
    let r = Probe::Http.run(c.public(0)).await;
    assert!(r.is_ok(), "session through the restarted node: {r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_restart_of_agents_loses_no_new_session() {
    let Some(haproxy) = haproxy_or_skip("rolling_restart_of_agents_loses_no_new_session") else {
        return;
    };
    let _serial = SERIAL.lock().await;
    let target = targets::http(BODY).await;
    let mut c = Cluster::new(Vec::new());
    c.start_dmz(0);
    c.start_dmz(1);
    let service = vec![Service::new("web", c.port, target.addr)];
    c.add_agent("engine-1", service.clone(), String::new());
    c.add_agent("engine-2", service, String::new());
    c.start_agent(0);
    c.start_agent(1);
    c.wait_registered(&[0, 1], &[0, 1], 2).await;
    let lb = start_lb(&c, &haproxy, Probe::Http).await;

    let stop = CancellationToken::new();
    let load = spawn_load(lb.addr, LOAD_INTERVAL, Probe::Http, stop.clone());
    let began = Instant::now();
    let mut events = Vec::new();
    // Two rounds of the rolling restart: engine-1, engine-2, engine-1, engine-2.
    for i in [0, 1, 0, 1] {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let id = c.agents[i].identity.clone();
        events.push((Instant::now(), format!("SIGTERM {id}")));
        let (status, took) = terminate(
            &mut c.agent_procs[i].as_mut().expect("agent running").guard,
            Duration::from_secs(40),
        )
        .await;
        events.push((Instant::now(), format!("{id} exited ({status})")));
        assert!(status.success(), "{id} exit status after SIGTERM: {status}");
        c.agent_procs[i] = None;
        // The nodes let go of the old process's tunnels, so the registration counted below is
        // the new process's.
        for n in &c.nodes {
            let (admin, id) = (n.admin, id.clone());
            let gone = wait_for(Duration::from_secs(5), || {
                let id = id.clone();
                async move { tunnels_of(admin, &id).await == 0.0 }
            })
            .await;
            assert!(
                gone.is_some(),
                "DMZ {admin} still counts tunnels of {id} after it exited"
            );
        }
        c.start_agent(i);
        events.push((Instant::now(), format!("{id} started")));
        let admin = c.agents[i].admin;
        let ready = wait_for(SETUP_LIMIT, || async move { readyz(admin).await == 200 }).await;
        assert!(
            ready.is_some(),
            "{id} /readyz not 200 within {SETUP_LIMIT:?}"
        );
        // Ready means one node; the next step stops the other agent, so wait for both nodes.
        let registered = c.wait_registered(&[0, 1], &[i], 2).await;
        events.push((Instant::now(), format!("{id} registered on both nodes")));
        println!(
            "rolling_restart_of_agents_loses_no_new_session: {id} exited 0 {} ms after SIGTERM, ready {} ms after its start, on both nodes after {} ms more",
            took.as_millis(),
            ready.map_or(0, |d| d.as_millis()),
            registered.as_millis()
        );
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.cancel();
    let samples = load.await.expect("load task");
    let failed = failures(&samples, began);
    println!(
        "rolling_restart_of_agents_loses_no_new_session: {} sessions through HAProxy during the rolling restart ({} s, one every {LOAD_INTERVAL:?}), {} failed",
        samples.len(),
        began.elapsed().as_secs(),
        failed.len()
    );
    for (t, e) in &events {
        println!(
            "rolling_restart_of_agents_loses_no_new_session: {} ms: {e}",
            ms(*t, began)
        );
    }
    for f in failed.iter().take(10) {
        println!("rolling_restart_of_agents_loses_no_new_session: failure {f}");
    }
    assert!(samples.len() >= 500, "too few sessions: {}", samples.len());
    assert!(
        failed.is_empty(),
        "{} of {} sessions failed during the rolling restart: {failed:?}\n{}",
        failed.len(),
        samples.len(),
        c.logs()
    );
}
