//! Graceful drain of a DMZ node behind HAProxy: `/readyz` turns 503 at once, HAProxy sends new
//! partners to the other node, sessions in flight finish with intact data, the node exits 0.
//! A second signal exits at once.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use relay_e2e::*;
use relay_tunnel::metrics as m;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use relay_e2e::haproxy::{BINDS, Haproxy, LB_SERVERS, haproxy_or_skip};

use super::*;

/// `limits.drain_delay` of the drained node.
const DRAIN_DELAY: Duration = Duration::from_secs(2);
/// Long transfers in flight through the drained node.
const TRANSFERS: usize = 4;
/// Bytes each long transfer sends (and gets back).
const TRANSFER_BYTES: usize = 32 * 1024 * 1024;
/// Pace of each long transfer, bytes per second: about 6 s each.
const TRANSFER_RATE: usize = TRANSFER_BYTES / 6;
/// Write size of the long transfers.
const CHUNK: usize = 128 * 1024;
/// Interval between two new short sessions through HAProxy during the drain.
const PROBE_INTERVAL: Duration = Duration::from_millis(100);

// ---------------------------------------------------------------------------------------------
// Transfers

/// A finished long transfer: what came back, and when.
struct Transfer {
    received: Vec<u8>,
    done: Instant,
}

/// Sends `data` at `TRANSFER_RATE` on `stream`, half-closes, and reads the echo to EOF. The
/// checksums are computed outside the measured window: SHA-256 of an unoptimised build would
/// take a core at this rate.
async fn paced_transfer(stream: TcpStream, data: Arc<Vec<u8>>) -> Result<Transfer, String> {
    let (mut r, mut w) = stream.into_split();
    let len = data.len();
    let reader = tokio::spawn(async move {
        let mut received = Vec::with_capacity(len);
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match r.read(&mut buf).await {
                Ok(0) => return Ok(received),
                Ok(n) => received.extend_from_slice(&buf[..n]),
                Err(e) => return Err(format!("read after {} bytes: {e}", received.len())),
            }
        }
    });
    let start = Instant::now();
    for (i, chunk) in data.chunks(CHUNK).enumerate() {
        let due = start + Duration::from_secs_f64((i * CHUNK) as f64 / TRANSFER_RATE as f64);
        tokio::time::sleep_until(due.into()).await;
        w.write_all(chunk)
            .await
            .map_err(|e| format!("write after {} bytes: {e}", i * CHUNK))?;
    }
    w.shutdown().await.map_err(|e| format!("shutdown: {e}"))?;
    let received = tokio::time::timeout(Duration::from_secs(120), reader)
        .await
        .map_err(|_| "echo not finished within 120 s".to_owned())?
        .map_err(|e| e.to_string())??;
    Ok(Transfer {
        received,
        done: Instant::now(),
    })
}

/// A short echo session through `lb`.
async fn probe(lb: SocketAddr, n: u64) -> Result<(), String> {
    let data = pattern(4096, 7_000_000 + n);
    let stream = connect_from([127, 0, 0, 1], lb)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let back = echo_exchange(stream, &data)
        .await
        .map_err(|e| e.to_string())?;
    if back != data {
        return Err(format!(
            "echo differs ({} of {} bytes)",
            back.len(),
            data.len()
        ));
    }
    Ok(())
}

/// Starts HAProxy (60 s client and server timeouts, for the long transfers) in front of the two
/// nodes and waits until it sees each of them up.
async fn start_lb(pki: &Pki, haproxy: &Path, port: u16, admins: [SocketAddr; 2]) -> Haproxy {
    let lb = Haproxy::spawn(pki, haproxy, port, admins, Duration::from_secs(60));
    for server in LB_SERVERS {
        let up = lb.wait_state(server, "UP", SETUP_LIMIT).await;
        assert!(
            up.is_some(),
            "HAProxy does not see {server} up: {}",
            lb.tail(20)
        );
    }
    lb
}

fn ms(t: Instant, since: Instant) -> i128 {
    if t >= since {
        t.duration_since(since).as_millis() as i128
    } else {
        -(since.duration_since(t).as_millis() as i128)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dmz_drain_behind_haproxy_loses_no_session() {
    let Some(haproxy) = haproxy_or_skip("dmz_drain_behind_haproxy_loses_no_session") else {
        return;
    };
    let _serial = SERIAL.lock().await;
    let pki = Pki::new();
    let echo = targets::echo().await;
    let port = free_port();
    let node = |i: usize| DmzOptions {
        public_bind: Some(std::net::Ipv4Addr::from(BINDS[i]).to_string()),
        keepalive: "2s",
        limits: format!(
            "drain_delay = \"{}s\"\ndrain_timeout = \"60s\"",
            DRAIN_DELAY.as_secs()
        ),
        ..Default::default()
    };
    let nodes = [node(0), node(1)];
    let mut dmz1 = spawn_dmz_logged(&pki, &nodes[0], &[], "dmz1");
    let _dmz2 = spawn_dmz_logged(&pki, &nodes[1], &[], "dmz2");
    let mut agent_opts =
        AgentOptions::new(nodes[0].tunnel, vec![Service::new("echo", port, echo.addr)]);
    agent_opts.dmz = vec![nodes[0].tunnel, nodes[1].tunnel];
    agent_opts.keepalive = "2s";
    let (agent, _) = spawn_agent_logged(&pki, &agent_opts, &[], "agent");
    let admins = [nodes[0].admin, nodes[1].admin];
    for (i, admin) in admins.iter().enumerate() {
        let up = wait_for(SETUP_LIMIT, || async {
            current(*admin, m::TUNNELS_CONNECTED, &[("agent", "engine-1")]).await == 2.0
                && current(*admin, m::LISTENER_OPEN, &[("service", "echo")]).await == 1.0
        })
        .await;
        assert!(
            up.is_some(),
            "agent not registered on node {}\n{}",
            i + 1,
            agent.tail(20)
        );
    }
    let lb = start_lb(&pki, &haproxy, port, admins).await;
    probe(lb.addr, 0).await.expect("a session through HAProxy");

    // The long transfers go through HAProxy to node 1: node 2 is set to drain meanwhile.
    lb.command("set server relay/dmz2 state drain")
        .await
        .expect("stats socket");
    assert!(
        lb.wait_state("dmz2", "DRAIN", Duration::from_secs(5))
            .await
            .is_some()
    );
    let data: Vec<Arc<Vec<u8>>> = (0..TRANSFERS)
        .map(|t| Arc::new(pattern(TRANSFER_BYTES, t as u64 + 1)))
        .collect();
    let mut transfers = Vec::new();
    for bytes in &data {
        let stream = connect_from([127, 0, 0, 1], lb.addr)
            .await
            .expect("connect HAProxy");
        transfers.push(tokio::spawn(paced_transfer(stream, bytes.clone())));
    }
    let active = [("service", "echo"), ("direction", "inbound")];
    wait_metric(
        admins[0],
        m::SESSIONS_ACTIVE,
        &active,
        TRANSFERS as f64,
        Duration::from_secs(10),
        "node 1",
    )
    .await;
    assert_eq!(current(admins[1], m::SESSIONS_ACTIVE, &active).await, 0.0);
    lb.command("set server relay/dmz2 state ready")
        .await
        .expect("stats socket");
    assert!(
        lb.wait_state("dmz2", "UP", Duration::from_secs(5))
            .await
            .is_some()
    );
    let node2_before = current(
        admins[1],
        m::SESSIONS_TOTAL,
        &[("service", "echo"), ("result", "ok")],
    )
    .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;

    // Short sessions through HAProxy all along the drain.
    let stop = CancellationToken::new();
    let prober = {
        let (stop, lb) = (stop.clone(), lb.addr);
        tokio::spawn(async move {
            let mut results = Vec::new();
            let mut tick = tokio::time::interval(PROBE_INTERVAL);
            let mut n = 1;
            while !stop.is_cancelled() {
                tick.tick().await;
                let start = Instant::now();
                results.push((start, probe(lb, n).await));
                n += 1;
            }
            results
        })
    };

    dmz1.guard.signal(nix::sys::signal::Signal::SIGTERM);
    let term = Instant::now();
    let not_ready = wait_for(Duration::from_secs(5), || async {
        readyz(admins[0]).await == 503
    })
    .await
    .map(|_| term.elapsed());
    let lb_down = lb
        .wait_state("dmz1", "DOWN", Duration::from_secs(5))
        .await
        .map(|_| term.elapsed());
    let public1 = addr(BINDS[0], port);
    // Polled every 100 ms: each successful probe is a (short) session on the draining node.
    let mut closed = None;
    while term.elapsed() < Duration::from_secs(10) {
        if !accepts(public1).await {
            closed = Some(term.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let exit = dmz1
        .guard
        .wait_exit(Duration::from_secs(90))
        .await
        .map(|(status, _)| (status, term.elapsed()));
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.cancel();
    let probes = prober.await.expect("prober");

    let mut last_done = term;
    let mut failures = Vec::new();
    for (t, task) in transfers.into_iter().enumerate() {
        match task.await.expect("transfer task") {
            Ok(tr) => {
                let sent: [u8; 32] = Sha256::digest(&data[t][..]).into();
                let received: [u8; 32] = Sha256::digest(&tr.received).into();
                println!(
                    "dmz_drain_behind_haproxy_loses_no_session: transfer {t}: {} of {TRANSFER_BYTES} bytes echoed, SHA-256 {}, finished {} ms after SIGTERM",
                    tr.received.len(),
                    if sent == received {
                        "matches"
                    } else {
                        "DIFFERS"
                    },
                    ms(tr.done, term)
                );
                if sent != received {
                    failures.push(format!(
                        "transfer {t}: SHA-256 differs ({} bytes back)",
                        tr.received.len()
                    ));
                }
                last_done = last_done.max(tr.done);
            }
            Err(e) => failures.push(format!("transfer {t}: {e}")),
        }
    }
    let failed_probes: Vec<String> = probes
        .iter()
        .filter_map(|(t, r)| {
            r.as_ref()
                .err()
                .map(|e| format!("{} ms: {e}", ms(*t, term)))
        })
        .collect();
    let node2_after = current(
        admins[1],
        m::SESSIONS_TOTAL,
        &[("service", "echo"), ("result", "ok")],
    )
    .await;
    println!(
        "dmz_drain_behind_haproxy_loses_no_session: {TRANSFERS} x {} MiB paced at {} KiB/s each; drain_delay {DRAIN_DELAY:?}",
        TRANSFER_BYTES >> 20,
        TRANSFER_RATE >> 10
    );
    println!(
        "dmz_drain_behind_haproxy_loses_no_session: after SIGTERM: /readyz 503 after {:?}, HAProxy marked node 1 DOWN after {:?}, node 1 public port closed after {:?}, last transfer done after {} ms, node 1 exited after {:?}",
        not_ready,
        lb_down,
        closed,
        ms(last_done, term),
        exit.map(|e| e.1)
    );
    println!(
        "dmz_drain_behind_haproxy_loses_no_session: {} short sessions through HAProxy during the drain, {} failed {failed_probes:?}; node 2 counted {} new sessions",
        probes.len(),
        failed_probes.len(),
        node2_after - node2_before
    );

    let (status, exited_after) =
        exit.unwrap_or_else(|| panic!("node 1 did not exit\n{}", dmz1.tail(20)));
    assert!(
        failures.is_empty(),
        "transfers: {failures:?}\n{}",
        dmz1.tail(20)
    );
    assert!(
        status.success(),
        "node 1 exit status after SIGTERM: {status}\n{}",
        dmz1.tail(20)
    );
    assert!(
        not_ready.is_some_and(|t| t < Duration::from_secs(1)),
        "/readyz did not turn 503 within 1 s: {not_ready:?}"
    );
    assert!(lb_down.is_some(), "HAProxy did not mark node 1 down");
    let closed = closed.expect("node 1's public listener did not close");
    assert!(
        closed + Duration::from_millis(150) >= DRAIN_DELAY
            && closed < DRAIN_DELAY + Duration::from_secs(2),
        "node 1's public listener closed {closed:?} after SIGTERM; drain_delay is {DRAIN_DELAY:?}"
    );
    assert!(
        last_done > term + DRAIN_DELAY,
        "the transfers ended before the listeners closed: the drain of sessions in flight was not tested"
    );
    let bound = DRAIN_DELAY.max(last_done - term) + Duration::from_secs(2);
    assert!(
        exited_after <= bound,
        "node 1 exited {exited_after:?} after SIGTERM; bound drain_delay or the last transfer + 2 s = {bound:?}"
    );
    assert!(probes.len() >= 20, "too few probes: {}", probes.len());
    assert!(
        failed_probes.is_empty(),
        "short sessions failed during the drain: {failed_probes:?}"
    );
    assert!(
        node2_after - node2_before >= probes.len() as f64 / 2.0,
        "node 2 carried {} of {} probes",
        node2_after - node2_before,
        probes.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dmz_second_signal_exits_at_once_and_sighup_reloads() {
    let _serial = SERIAL.lock().await;
    let pki = Pki::new();
    let target = targets::tagged_echo(b'T').await;
    let opts = DmzOptions::default();
    let mut dmz = spawn_dmz_logged(&pki, &opts, &[], "dmz");
    let port = free_port();
    let agent = start_agent(
        &pki,
        &AgentOptions::new(opts.tunnel, vec![Service::new("echo", port, target.addr)]),
    )
    .await;
    wait_metric(
        opts.admin,
        m::LISTENER_OPEN,
        &[("service", "echo")],
        1.0,
        SETUP_LIMIT,
        "DMZ",
    )
    .await;

    dmz.guard.signal(nix::sys::signal::Signal::SIGHUP);
    wait_metric(
        opts.admin,
        m::CONFIG_RELOADS,
        &[("result", "ok")],
        1.0,
        Duration::from_secs(5),
        "SIGHUP",
    )
    .await;

    let mut session = OpenSession::open(addr([127, 0, 0, 1], port))
        .await
        .expect("session");
    session
        .round_trip(b"before the signal")
        .await
        .expect("round trip");
    dmz.guard.signal(nix::sys::signal::Signal::SIGTERM);
    let first = Instant::now();
    let ready = wait_for(Duration::from_secs(5), || async {
        readyz(opts.admin).await == 503
    })
    .await;
    assert!(ready.is_some(), "/readyz not 503 after SIGTERM");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        dmz.guard.child.try_wait().expect("try_wait").is_none(),
        "the node exited before the drain delay (5 s by default) with a session in flight"
    );
    dmz.guard.signal(nix::sys::signal::Signal::SIGTERM);
    let second = Instant::now();
    let (status, took) = dmz
        .guard
        .wait_exit(Duration::from_secs(5))
        .await
        .unwrap_or_else(|| panic!("no exit after the second SIGTERM\n{}", dmz.tail(10)));
    println!(
        "dmz_second_signal_exits_at_once_and_sighup_reloads: second SIGTERM {} ms after the first; exited {} ms later with {status}",
        second.duration_since(first).as_millis(),
        took.as_millis()
    );
    assert_eq!(status.code(), Some(1), "exit code after a second signal");
    assert!(
        took < Duration::from_secs(1),
        "exit took {took:?} after the second signal"
    );
    let _ = session.round_trip(b"x").await;
    drop(agent);
}
