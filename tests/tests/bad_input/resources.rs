//! Resources over time: 1,000 agent connect/disconnect cycles leave no descriptor, thread or
//! memory behind; a target that never reads holds a 1 GiB upload back through flow control.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};

use super::*;

/// Samples of a process's resources.
#[derive(Debug, Clone, Copy)]
struct Sample {
    fds: usize,
    threads: usize,
    rss: u64,
}

fn sample(pid: u32) -> Sample {
    Sample {
        fds: procfs::fd_count(pid),
        threads: threads(pid),
        rss: procfs::rss_bytes(pid).unwrap_or(0),
    }
}

/// 1,000 connect/disconnect cycles of a real agent (in-process, `connections = 1`) against a
/// DMZ process: its descriptors, threads and resident memory come back to the baseline taken
/// after a warm-up, and the service still works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_agent_cycles_leave_no_fd_thread_or_memory_behind() {
    const CYCLES: usize = 1000;
    const WARM_UP: usize = 20;
    const FD_TOLERANCE: usize = 2;
    const THREAD_TOLERANCE: usize = 2;
    const RSS_TOLERANCE: u64 = 16 << 20;
    let _serial = exclusive().await;
    let pki = Pki::new();
    let dmz = Dmz::start(&pki, DmzOptions::default()).await;
    let legit = Legit::start(&pki, dmz.opts.tunnel).await;
    let echo = CountingEcho::start().await;
    let port = free_port();
    let public = local(port);
    let mut opts = AgentOptions::new(
        dmz.opts.tunnel,
        vec![Service::new("cycled", port, echo.addr)],
    );
    opts.identity = "engine-2".into();
    opts.connections = 1;
    opts.limits = "drain_timeout = \"5s\"".into();
    let admin = opts.admin;

    let cycle = |n: usize| {
        let (pki, opts) = (&pki, &opts);
        async move {
            let agent = start_agent(pki, opts).await;
            // The agent is ready once its tunnel is up and registered.
            let start = Instant::now();
            loop {
                if matches!(http_get(admin, "/readyz").await, Ok((200, _))) {
                    break;
                }
                assert!(
                    start.elapsed() < LIMIT,
                    "cycle {n}: the agent did not connect within {LIMIT:?}"
                );
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            agent
                .stop()
                .await
                .unwrap_or_else(|e| panic!("cycle {n}: agent stop: {e}"));
        }
    };

    for n in 0..WARM_UP {
        cycle(n).await;
    }
    wait_closed(public, LIMIT).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = sample(dmz.pid());
    let registered_before = dmz
        .metric("relay_registrations_total", &["result=\"accepted\""])
        .await;

    let started = Instant::now();
    for n in 0..CYCLES {
        cycle(WARM_UP + n).await;
    }
    let took = started.elapsed();
    wait_closed(public, LIMIT).await;
    // Tunnels of the last cycles may still be ending: let the DMZ settle back.
    let settle = Instant::now();
    let mut after = sample(dmz.pid());
    while (after.fds > before.fds || after.threads > before.threads)
        && settle.elapsed() < Duration::from_secs(15)
    {
        tokio::time::sleep(Duration::from_millis(200)).await;
        after = sample(dmz.pid());
    }
    let registered = dmz
        .metric("relay_registrations_total", &["result=\"accepted\""])
        .await
        - registered_before;
    println!(
        "{CYCLES} agent cycles in {took:.1?} ({:.1} ms each); DMZ fds {} -> {}, threads {} -> {}, RSS {:.1} -> {:.1} MiB; registrations accepted {registered}",
        took.as_secs_f64() * 1000.0 / CYCLES as f64,
        before.fds,
        after.fds,
        before.threads,
        after.threads,
        before.rss as f64 / MIB,
        after.rss as f64 / MIB,
    );
    assert!(
        registered >= CYCLES as f64,
        "only {registered} registrations for {CYCLES} cycles"
    );
    assert!(
        after.fds <= before.fds + FD_TOLERANCE,
        "DMZ descriptors grew from {} to {}",
        before.fds,
        after.fds
    );
    assert!(
        after.threads <= before.threads + THREAD_TOLERANCE,
        "DMZ threads grew from {} to {}",
        before.threads,
        after.threads
    );
    assert!(
        after.rss <= before.rss + RSS_TOLERANCE,
        "DMZ RSS grew from {:.1} to {:.1} MiB",
        before.rss as f64 / MIB,
        after.rss as f64 / MIB
    );
    // The service still opens and carries a session.
    let agent = start_agent(&pki, &opts).await;
    wait_open(public, LIMIT).await;
    legit_works(public, "on the cycled service after 1,000 cycles").await;
    agent.stop().await.unwrap();
    legit.check("after the cycles").await;
}

/// A target that accepts connections and never reads from them.
async fn deaf_target() -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            held.push(s);
        }
    });
    (addr, task)
}

/// A partner uploads up to 1 GiB to a target that never reads. Flow control stops it: its
/// writes stall after a bounded amount, the DMZ and agent processes each grow by less than
/// 64 MiB, and another session through the same agent keeps working while it is stalled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn never_reading_target_stalls_a_1gib_upload_with_bounded_memory() {
    const GIB: u64 = 1 << 30;
    const RSS_LIMIT: u64 = 64 << 20;
    const STALL: Duration = Duration::from_secs(3);
    let _serial = exclusive().await;
    let pki = Pki::new();
    let dmz = Dmz::start(&pki, DmzOptions::default()).await;
    let (deaf, _deaf_task) = deaf_target().await;
    let echo = CountingEcho::start().await;
    let (deaf_port, echo_port) = (free_port(), free_port());
    let mut opts = AgentOptions::new(
        dmz.opts.tunnel,
        vec![
            Service::new("deaf", deaf_port, deaf),
            Service::new("echo", echo_port, echo.addr),
        ],
    );
    opts.connections = 1;
    let path = pki.write("agent-deaf.toml", &opts.toml(&pki));
    let agent = Captured::spawn("relay-internal", &path);
    wait_open(local(deaf_port), LIMIT).await;
    wait_open(local(echo_port), LIMIT).await;
    // Warm up both processes with a session each way before the baseline.
    for i in 0..3 {
        legit_works(local(echo_port), &format!("warm-up {i}")).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (dmz_before, agent_before) = (
        procfs::rss_bytes(dmz.pid()).unwrap_or(0),
        procfs::rss_bytes(agent.pid()).unwrap_or(0),
    );

    let mut partner = TcpStream::connect(local(deaf_port)).await.unwrap();
    let chunk = vec![0x5a_u8; 64 * 1024];
    let mut sent: u64 = 0;
    let start = Instant::now();
    let stalled = loop {
        if sent >= GIB {
            break false;
        }
        match tokio::time::timeout(STALL, partner.write_all(&chunk)).await {
            Ok(Ok(())) => sent += chunk.len() as u64,
            Ok(Err(e)) => panic!("the upload failed after {sent} bytes: {e}"),
            Err(_) => break true,
        }
    };
    let stalled_at = start.elapsed();
    // While stalled, another session through the same tunnel works.
    let other = legit_works(local(echo_port), "while the upload is stalled").await;
    let (dmz_after, agent_after) = (
        procfs::rss_bytes(dmz.pid()).unwrap_or(0),
        procfs::rss_bytes(agent.pid()).unwrap_or(0),
    );
    println!(
        "upload to a deaf target stalled: {stalled} after {:.1} MiB in {stalled_at:.1?} (blocked for {STALL:?}); other session echo in {other:?}; DMZ RSS {:.1} -> {:.1} MiB, agent RSS {:.1} -> {:.1} MiB",
        sent as f64 / MIB,
        dmz_before as f64 / MIB,
        dmz_after as f64 / MIB,
        agent_before as f64 / MIB,
        agent_after as f64 / MIB,
    );
    assert!(stalled, "the partner sent the whole GiB: no flow control");
    assert!(
        dmz_after < dmz_before + RSS_LIMIT,
        "the DMZ grew by {:.1} MiB",
        (dmz_after - dmz_before) as f64 / MIB
    );
    assert!(
        agent_after < agent_before + RSS_LIMIT,
        "the agent grew by {:.1} MiB",
        (agent_after - agent_before) as f64 / MIB
    );
    assert!(alive(dmz.pid()) && alive(agent.pid()));
}
