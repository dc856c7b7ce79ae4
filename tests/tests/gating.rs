//! Listener gating: a DMZ public port exists only while an agent serving it holds a tunnel.
//! It opens on registration, closes within 1 s of the last tunnel's TCP connection closing,
//! closes within two keepalive intervals of a tunnel going silent, follows `public.bind`,
//! leaks no file descriptor over many open/close cycles, and stays open (with sessions
//! carried on) while another agent still serves it.
//!
//! Process-based tests need `cargo build --workspace` first (target/debug/relay-internal,
//! target/debug/relay-dmz).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use relay_e2e::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// How long one echo round trip may take before the session counts as hung.
const ROUNDTRIP_LIMIT: Duration = Duration::from_secs(5);

/// How an echo round trip on a session went.
#[derive(Debug, PartialEq, Eq)]
enum Roundtrip {
    /// The bytes came back.
    Echoed,
    /// The session was closed or reset (EOF, error, or different bytes).
    Closed(String),
    /// Nothing came back within [`ROUNDTRIP_LIMIT`].
    Hung,
}

/// Writes `msg` on a session to the echo target and reads it back.
async fn roundtrip(s: &mut TcpStream, msg: &[u8]) -> Roundtrip {
    let exchange = async {
        s.write_all(msg).await?;
        let mut back = vec![0u8; msg.len()];
        s.read_exact(&mut back).await?;
        Ok::<_, std::io::Error>(back)
    };
    match tokio::time::timeout(ROUNDTRIP_LIMIT, exchange).await {
        Ok(Ok(back)) if back == msg => Roundtrip::Echoed,
        Ok(Ok(_)) => Roundtrip::Closed("different bytes came back".into()),
        Ok(Err(e)) => Roundtrip::Closed(e.to_string()),
        Err(_) => Roundtrip::Hung,
    }
}

/// Opens a session to `public` and checks that it echoes.
async fn open_session(public: SocketAddr, tag: &str) -> TcpStream {
    let mut s = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(public))
        .await
        .unwrap_or_else(|_| panic!("{tag}: connect to {public} timed out"))
        .unwrap_or_else(|e| panic!("{tag}: connect to {public}: {e}"));
    let msg = format!("hello from {tag}");
    let r = roundtrip(&mut s, msg.as_bytes()).await;
    assert_eq!(
        r,
        Roundtrip::Echoed,
        "{tag}: session through {public} does not echo"
    );
    s
}

/// A session through `public` carries 256 KiB both ways, half-close included.
async fn session_works(public: SocketAddr, tag: &str) {
    let mut s = open_session(public, tag).await;
    let data: Vec<u8> = (0..256 * 1024u32).map(|i| (i * 31 + 7) as u8).collect();
    let (mut r, mut w) = s.split();
    let write = async {
        w.write_all(&data).await?;
        w.shutdown().await
    };
    let mut back = Vec::new();
    let read = r.read_to_end(&mut back);
    let (wr, rd) =
        tokio::time::timeout(Duration::from_secs(20), async { tokio::join!(write, read) })
            .await
            .unwrap_or_else(|_| panic!("{tag}: 256 KiB echo did not finish within 20 s"));
    wr.unwrap_or_else(|e| panic!("{tag}: write: {e}"));
    rd.unwrap_or_else(|e| panic!("{tag}: read: {e}"));
    assert!(
        back == data,
        "{tag}: echoed {} bytes differ from the {} sent",
        back.len(),
        data.len()
    );
}

/// Whether an admin endpoint answers `path` with 200.
async fn admin_ok(admin: SocketAddr, path: &str) -> bool {
    matches!(http_get(admin, path).await, Ok((200, _)))
}

/// Resident memory of process `pid` in KiB (`VmRSS`), for the report.
fn rss_kib(pid: u32) -> u64 {
    procfs::rss_bytes(pid).map_or(0, |b| b / 1024)
}

/// A SIGSTOPped child, SIGCONTed on drop (also when the test fails). It borrows the child so
/// the continue comes before the child's own kill and reap.
struct Stopped<'a> {
    child: &'a ChildGuard,
    stopped: bool,
}

impl<'a> Stopped<'a> {
    fn stop(child: &'a ChildGuard) -> Self {
        child.signal(Signal::SIGSTOP);
        Self {
            child,
            stopped: true,
        }
    }

    fn resume(&mut self) {
        if self.stopped {
            self.child.signal(Signal::SIGCONT);
            self.stopped = false;
        }
    }
}

impl Drop for Stopped<'_> {
    fn drop(&mut self) {
        if self.stopped {
            let _ = kill(pid_of(self.child), Signal::SIGCONT);
        }
    }
}

fn pid_of(child: &ChildGuard) -> Pid {
    Pid::from_raw(i32::try_from(child.pid()).expect("pid fits in i32"))
}

fn local(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_agent_refuses_then_registration_opens() {
    let pki = Pki::new();
    let echo = targets::echo().await;
    let dmz_opts = DmzOptions::default();
    let _dmz = start_dmz(&pki, &dmz_opts).await;
    wait_for(Duration::from_secs(10), || {
        admin_ok(dmz_opts.admin, "/livez")
    })
    .await
    .expect("DMZ admin endpoint up");
    let port = free_port();
    let public = local(port);

    assert!(
        !accepts(public).await,
        "no agent yet: the public port must refuse"
    );
    let (status, body) = http_get(dmz_opts.admin, "/readyz").await.unwrap();
    assert_eq!(status, 503, "DMZ /readyz without an agent: {body}");
    // Still refused a moment later: nothing opens the port but a registration.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !accepts(public).await,
        "no agent yet: the public port must still refuse"
    );

    let started = Instant::now();
    let _agent = spawn_agent(
        &pki,
        &AgentOptions::new(dmz_opts.tunnel, vec![Service::new("echo", port, echo.addr)]),
    );
    wait_open(public, Duration::from_secs(10)).await;
    println!(
        "gating: public port opened {:?} after the agent process started",
        started.elapsed()
    );
    // The listener opens during the registration and the agent counts as connected when it
    // ends: a probe between the two may still see 503 for a moment.
    let mut ready = (0, String::new());
    for _ in 0..50 {
        ready = http_get(dmz_opts.admin, "/readyz").await.unwrap();
        if ready.0 == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (status, body) = ready;
    assert_eq!(
        status, 200,
        "DMZ /readyz with an agent, within 1 s of the port opening: {body}"
    );
    session_works(public, "after registration").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_agent_closes_within_1s_and_restart_reopens() {
    let pki = Pki::new();
    let echo = targets::echo().await;
    let dmz_opts = DmzOptions::default();
    let _dmz = start_dmz(&pki, &dmz_opts).await;
    let port = free_port();
    let public = local(port);
    let mut opts = AgentOptions::new(dmz_opts.tunnel, vec![Service::new("echo", port, echo.addr)]);

    let mut agent = spawn_agent(&pki, &opts);
    wait_open(public, Duration::from_secs(10)).await;
    session_works(public, "first agent").await;

    // SIGKILL: the kernel closes the agent's tunnel connections at once.
    let killed = Instant::now();
    agent.child.kill().expect("SIGKILL the agent");
    let closed = wait_for(
        Duration::from_secs(10),
        || async move { !accepts(public).await },
    )
    .await
    .map(|_| killed.elapsed())
    .expect("public port still accepts 10 s after the agent was killed");
    println!("gating: public port refused {closed:?} after SIGKILL of the agent");
    assert!(
        closed < Duration::from_secs(1),
        "public port closed {closed:?} after the agent's tunnel closed; must be < 1 s"
    );
    agent.child.wait().expect("reap the killed agent");
    // It stays closed: no agent, no listener.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!accepts(public).await, "public port reopened with no agent");

    // Restart (a fresh admin port: the old one may have connections in TIME_WAIT).
    opts.admin = local(free_port());
    let spawned = Instant::now();
    let _agent = spawn_agent(&pki, &opts);
    let mut open_at = None;
    let mut ready_at = None;
    while open_at.is_none() || ready_at.is_none() {
        assert!(
            spawned.elapsed() < Duration::from_secs(10),
            "restarted agent: port open after {open_at:?}, agent ready after {ready_at:?} (10 s limit)"
        );
        if open_at.is_none() && accepts(public).await {
            open_at = Some(spawned.elapsed());
        }
        if ready_at.is_none() && admin_ok(opts.admin, "/readyz").await {
            ready_at = Some(spawned.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (open_at, ready_at) = (open_at.unwrap(), ready_at.unwrap());
    println!(
        "gating: restarted agent ready (/readyz 200) {ready_at:?} after start; public port accepted {open_at:?} after start"
    );
    assert!(
        open_at <= ready_at + Duration::from_secs(1),
        "public port opened {open_at:?} after start, more than 1 s after the agent was ready ({ready_at:?})"
    );
    session_works(public, "restarted agent").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_agent_sigstop_closes_within_two_keepalives() {
    let pki = Pki::new();
    let echo = targets::echo().await;
    let dmz_opts = DmzOptions::default();
    assert_eq!(
        dmz_opts.keepalive, "1s",
        "the bound below assumes a 1 s DMZ keepalive"
    );
    let keepalive = Duration::from_secs(1);
    let _dmz = start_dmz(&pki, &dmz_opts).await;
    let port = free_port();
    let public = local(port);
    let opts = AgentOptions::new(dmz_opts.tunnel, vec![Service::new("echo", port, echo.addr)]);
    let agent = spawn_agent(&pki, &opts);
    wait_open(public, Duration::from_secs(10)).await;
    wait_for(Duration::from_secs(10), || admin_ok(opts.admin, "/readyz"))
        .await
        .expect("agent ready");
    session_works(public, "before SIGSTOP").await;

    // SIGSTOP: the tunnel's TCP connection stays up, but nothing answers PINGs any more.
    let mut stopped = Stopped::stop(&agent);
    let paused = Instant::now();
    let limit = 2 * keepalive + Duration::from_secs(1);
    let closed = wait_for(
        Duration::from_secs(15),
        || async move { !accepts(public).await },
    )
    .await
    .map(|_| paused.elapsed())
    .expect("public port still accepts 15 s after the agent was stopped");
    println!("gating: public port refused {closed:?} after SIGSTOP of the agent (limit {limit:?})");
    assert!(
        closed <= limit,
        "silent agent: public port closed after {closed:?}; must be within 2 × keepalive + 1 s = {limit:?}"
    );

    stopped.resume();
    let reopened = wait_for(Duration::from_secs(15), || accepts(public))
        .await
        .expect("public port did not reopen within 15 s of SIGCONT");
    println!("gating: public port reopened {reopened:?} after SIGCONT");
    session_works(public, "after SIGCONT").await;
    drop(stopped);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn public_bind_replaces_service_address() {
    let pki = Pki::new();
    let echo = targets::echo().await;
    let opts_a = DmzOptions {
        public_bind: Some("127.0.0.2".into()),
        ..Default::default()
    };
    let opts_b = DmzOptions {
        public_bind: Some("127.0.0.3".into()),
        ..Default::default()
    };
    let _dmz_a = start_dmz(&pki, &opts_a).await;
    let _dmz_b = start_dmz(&pki, &opts_b).await;
    let port = free_port();
    let on_a = SocketAddr::from(([127, 0, 0, 2], port));
    let on_b = SocketAddr::from(([127, 0, 0, 3], port));
    let declared = local(port);
    assert!(
        !accepts(on_a).await && !accepts(on_b).await,
        "no agent yet: both nodes must refuse"
    );

    let mut opts = AgentOptions::new(opts_a.tunnel, vec![Service::new("echo", port, echo.addr)]);
    opts.dmz.push(opts_b.tunnel);
    let started = Instant::now();
    let agent = start_agent(&pki, &opts).await;
    wait_open(on_a, Duration::from_secs(10)).await;
    let ta = started.elapsed();
    wait_open(on_b, Duration::from_secs(10)).await;
    let tb = started.elapsed();
    println!("gating: after the agent started, {on_a} open within {ta:?}, {on_b} within {tb:?}");
    session_works(on_a, "node bound to 127.0.0.2").await;
    session_works(on_b, "node bound to 127.0.0.3").await;
    assert!(
        !accepts(declared).await,
        "{declared} (the declared address) must not be bound: public.bind replaces it on both nodes"
    );

    agent.stop().await.unwrap();
    wait_closed(on_a, Duration::from_secs(5)).await;
    wait_closed(on_b, Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_fd_leak_after_200_agent_cycles() {
    const CYCLES: usize = 200;
    const FD_TOLERANCE: usize = 2;
    let pki = Pki::new();
    let echo = targets::echo().await;
    let dmz_opts = DmzOptions::default();
    let dmz = spawn_dmz(&pki, &dmz_opts);
    wait_for(Duration::from_secs(10), || {
        admin_ok(dmz_opts.admin, "/livez")
    })
    .await
    .expect("DMZ process admin endpoint up");
    let port = free_port();
    let public = local(port);
    let mut opts = AgentOptions::new(dmz_opts.tunnel, vec![Service::new("echo", port, echo.addr)]);
    opts.connections = 1;
    // A lingering session must not make a cycle wait the default 30 s drain.
    opts.limits = "drain_timeout = \"5s\"".into();

    let cycle = |n: usize| {
        let pki = &pki;
        let opts = &opts;
        async move {
            let agent = start_agent(pki, opts).await;
            if wait_for(Duration::from_secs(10), || accepts(public))
                .await
                .is_none()
            {
                panic!(
                    "cycle {n}: public port {public} did not reopen within 10 s (bind failure on the DMZ?)"
                );
            }
            agent
                .stop()
                .await
                .unwrap_or_else(|e| panic!("cycle {n}: agent stop: {e}"));
            if wait_for(
                Duration::from_secs(10),
                || async move { !accepts(public).await },
            )
            .await
            .is_none()
            {
                panic!(
                    "cycle {n}: public port {public} still accepts 10 s after the agent stopped"
                );
            }
        }
    };

    // One warm-up cycle, so the runtime's lazily opened descriptors are in the baseline.
    cycle(0).await;
    session_works_after_open(&pki, &opts, public).await;
    let before = procfs::fd_count(dmz.pid());
    let rss_before = rss_kib(dmz.pid());
    let started = Instant::now();
    for n in 1..=CYCLES {
        cycle(n).await;
    }
    let took = started.elapsed();
    // Sessions of the last probes may still be ending: give the DMZ a moment to settle back
    // to the baseline before applying the tolerance.
    let mut after = procfs::fd_count(dmz.pid());
    let settle = Instant::now();
    while after > before && settle.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(100)).await;
        after = procfs::fd_count(dmz.pid());
    }
    println!(
        "gating: {CYCLES} agent cycles in {took:?}; DMZ process fds before {before}, after {after}"
    );
    println!(
        "gating: DMZ process RSS before {rss_before} KiB, after {} KiB",
        rss_kib(dmz.pid())
    );
    assert!(
        after <= before + FD_TOLERANCE,
        "DMZ fd count grew from {before} to {after} over {CYCLES} agent cycles"
    );

    let text = metrics_text(dmz_opts.admin).await;
    let accepted =
        metric(&text, "relay_registrations_total", &["result=\"accepted\""]).unwrap_or(0.0);
    let rejected =
        metric(&text, "relay_registrations_total", &["result=\"rejected\""]).unwrap_or(0.0);
    println!("gating: DMZ registrations accepted {accepted}, rejected {rejected}");
    assert_eq!(
        rejected, 0.0,
        "a registration was rejected (bind error on reopen?)"
    );
    assert!(
        accepted >= (CYCLES + 2) as f64,
        "only {accepted} registrations accepted for {} agent starts",
        CYCLES + 2
    );

    // The port still works after all the cycles.
    session_works_after_open(&pki, &opts, public).await;
}

/// Starts an agent, checks a session through `public`, stops the agent.
async fn session_works_after_open(pki: &Pki, opts: &AgentOptions, public: SocketAddr) {
    let agent = start_agent(pki, opts).await;
    wait_open(public, Duration::from_secs(10)).await;
    session_works(public, "in-process agent").await;
    agent.stop().await.unwrap();
    wait_closed(public, Duration::from_secs(10)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_agents_one_killed_sessions_on_the_other_continue() {
    const SESSIONS: usize = 10;
    const NEW_SESSIONS: usize = 50;
    let pki = Pki::new();
    let echo = targets::echo().await;
    // The DMZ runs as a process so its metrics are its own (in-process metrics are global to
    // the test binary).
    let dmz_opts = DmzOptions::default();
    let _dmz = spawn_dmz(&pki, &dmz_opts);
    let port = free_port();
    let public = local(port);
    let service = vec![Service::new("echo", port, echo.addr)];
    let opts1 = AgentOptions::new(dmz_opts.tunnel, service.clone());
    let mut opts2 = AgentOptions::new(dmz_opts.tunnel, service);
    opts2.identity = "engine-2".into();
    let mut agent1 = spawn_agent(&pki, &opts1);
    let _agent2 = spawn_agent(&pki, &opts2);

    // Both agents' tunnels registered on the DMZ before the sessions start.
    let admin = dmz_opts.admin;
    let (c1, c2) = (opts1.connections as f64, opts2.connections as f64);
    let both_up = wait_for(Duration::from_secs(15), || async move {
        let text = metrics_text(admin).await;
        metric(&text, "relay_tunnels_connected", &["agent=\"engine-1\""]) == Some(c1)
            && metric(&text, "relay_tunnels_connected", &["agent=\"engine-2\""]) == Some(c2)
    })
    .await;
    assert!(
        both_up.is_some(),
        "both agents' tunnels not up within 15 s:\n{}",
        metrics_text(admin).await
    );
    wait_open(public, Duration::from_secs(5)).await;

    let mut sessions = Vec::new();
    for i in 0..SESSIONS {
        sessions.push(open_session(public, &format!("session {i}")).await);
    }
    let active = |a: SocketAddr| async move {
        metric(
            &metrics_text(a).await,
            "relay_sessions_active",
            &["service=\"echo\"", "direction=\"inbound\""],
        )
        .unwrap_or(0.0) as usize
    };
    let (k1, k2) = (active(opts1.admin).await, active(opts2.admin).await);
    println!("gating: {SESSIONS} sessions spread engine-1 {k1}, engine-2 {k2}");
    assert_eq!(
        k1 + k2,
        SESSIONS,
        "agents report {k1} + {k2} active sessions for {SESSIONS} open"
    );
    assert!(
        k1 >= 1 && k2 >= 1,
        "sessions not spread over both agents: engine-1 {k1}, engine-2 {k2}"
    );

    agent1.child.kill().expect("SIGKILL engine-1");
    let killed = Instant::now();

    // Every old session is tried at once; those on engine-2 echo, those on engine-1 are closed.
    let mut tasks = tokio::task::JoinSet::new();
    for (i, mut s) in sessions.into_iter().enumerate() {
        tasks.spawn(async move {
            let r = roundtrip(&mut s, format!("after kill {i}").as_bytes()).await;
            (i, r, s)
        });
    }
    let mut survivors = Vec::new();
    let mut closed = 0;
    while let Some(joined) = tasks.join_next().await {
        let (i, r, s) = joined.expect("session task");
        match r {
            Roundtrip::Echoed => survivors.push((i, s)),
            Roundtrip::Closed(why) => {
                println!("gating: session {i} closed after the kill: {why}");
                closed += 1;
            }
            Roundtrip::Hung => panic!(
                "session {i} neither echoed nor closed within {ROUNDTRIP_LIMIT:?} after engine-1 was killed"
            ),
        }
    }
    println!(
        "gating: after SIGKILL of engine-1: {} sessions continue, {closed} closed ({:?})",
        survivors.len(),
        killed.elapsed()
    );
    assert_eq!(
        survivors.len(),
        k2,
        "sessions carried by engine-2 must all continue"
    );
    assert_eq!(closed, k1, "sessions carried by engine-1 must be closed");

    // The survivors keep exchanging data.
    for round in 0..5 {
        for (i, s) in &mut survivors {
            let r = roundtrip(s, format!("round {round} session {i}").as_bytes()).await;
            assert_eq!(r, Roundtrip::Echoed, "surviving session {i}, round {round}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The listener stays open: engine-2 still serves it, and every new session works.
    for i in 0..NEW_SESSIONS {
        let mut s = open_session(public, &format!("new session {i}")).await;
        let r = roundtrip(&mut s, b"second message").await;
        assert_eq!(r, Roundtrip::Echoed, "new session {i}");
    }
    // The new sessions are gone again: engine-2 carries exactly the survivors.
    let admin2 = opts2.admin;
    let settled = wait_for(Duration::from_secs(10), || async move {
        active(admin2).await == k2
    })
    .await;
    assert!(
        settled.is_some(),
        "engine-2 still reports {} active sessions; expected the {k2} survivors",
        active(admin2).await
    );
    agent1.child.wait().expect("reap engine-1");
}
