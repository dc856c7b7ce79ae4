//! A slow partner slows the target through the relay's flow control: while a target pushes
//! 200 MiB as fast as it can toward a partner that reads slowly, neither the DMZ process nor
//! the agent process grows by more than 64 MiB, and every byte still arrives.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use relay_e2e::pattern::Pattern;
use relay_e2e::*;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Bound on any single network wait.
const WAIT: Duration = Duration::from_secs(10);
/// What the target sends in the measured session.
const TOTAL: u64 = 200 << 20;
/// What the target sends in the warm-up session.
const WARM_UP: u64 = 4 << 20;
/// The acceptance bound on each process's RSS growth.
const RSS_LIMIT: u64 = 64 << 20;
/// How long the partner reads slowly.
const SLOW_PHASE: Duration = Duration::from_secs(10);
/// The slow partner reads this much...
const SLOW_READ: usize = 64 * 1024;
/// ...every this long (6.4 MiB/s at most).
const SLOW_PERIOD: Duration = Duration::from_millis(10);
/// Generous bound on the whole transfer (about 15 s on an idle 2-core machine, debug build).
const TRANSFER_LIMIT: Duration = Duration::from_secs(120);
/// Seed of the target's byte pattern.
const SEED: u64 = 0xb0ff;

/// A target that reads an 8-byte big-endian length, then sends that many pattern bytes as
/// fast as the connection takes them and closes. `written` counts what it has handed to the
/// kernel so far.
async fn source_target(written: Arc<AtomicU64>) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind target");
    let addr = listener.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let written = written.clone();
            tokio::spawn(async move {
                let mut len = [0u8; 8];
                let Ok(Ok(_)) = tokio::time::timeout(WAIT, s.read_exact(&mut len)).await else {
                    return;
                };
                written.store(0, Ordering::Relaxed);
                let mut pattern = Pattern::new(SEED, u64::from_be_bytes(len));
                while let Some(chunk) = pattern.next_chunk() {
                    if s.write_all(chunk).await.is_err() {
                        return;
                    }
                    written.fetch_add(chunk.len() as u64, Ordering::Relaxed);
                }
                let _ = s.shutdown().await;
            });
        }
    });
    (addr, task)
}

/// Resident set size of process `pid`, in bytes.
fn rss(pid: u32) -> u64 {
    procfs::rss_bytes(pid).expect("VmRSS in /proc status")
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1 << 20) as f64
}

/// Asks the target for `len` bytes through the relay; returns the open partner stream.
async fn request(public: SocketAddr, len: u64) -> TcpStream {
    let mut s = tokio::time::timeout(WAIT, TcpStream::connect(public))
        .await
        .expect("connect timed out")
        .expect("connect");
    s.write_all(&len.to_be_bytes()).await.expect("send request");
    s
}

/// Reads up to `want` bytes (or to EOF), hashing them into `hash`; returns the count read.
async fn read_into(s: &mut TcpStream, buf: &mut [u8], hash: &mut Sha256) -> usize {
    let n = tokio::time::timeout(WAIT, s.read(buf))
        .await
        .expect("no data from the relay within the wait bound")
        .expect("partner read");
    hash.update(&buf[..n]);
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_partner_keeps_relay_memory_within_the_windows() {
    let test_start = Instant::now();
    let pki = Pki::new();
    let dmz_opts = DmzOptions::default();
    let _dmz = spawn_dmz(&pki, &dmz_opts);
    let dmz_pid = _dmz.pid();
    let written = Arc::new(AtomicU64::new(0));
    let (target, target_task) = source_target(written.clone()).await;
    let port = free_port();
    let public = SocketAddr::from(([127, 0, 0, 1], port));
    let agent_opts = AgentOptions::new(dmz_opts.tunnel, vec![Service::new("bulk", port, target)]);
    let _agent = spawn_agent(&pki, &agent_opts);
    let agent_pid = _agent.pid();
    let open = wait_for(Duration::from_secs(30), || async {
        match http_get(dmz_opts.admin, "/metrics").await {
            Ok((200, text)) => {
                metric(&text, "relay_listener_open", &["service=\"bulk\""]) == Some(1.0)
            }
            _ => false,
        }
    })
    .await;
    assert!(open.is_some(), "the bulk listener did not open within 30 s");

    // Warm-up: one session at full speed, so buffers and pools that every session uses exist.
    let mut s = request(public, WARM_UP).await;
    let mut got = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut got))
        .await
        .expect("warm-up timed out")
        .expect("warm-up read");
    assert_eq!(got.len() as u64, WARM_UP, "warm-up bytes");
    drop(s);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let base = [rss(dmz_pid), rss(agent_pid)];

    // Sample both processes every 50 ms until the transfer ends.
    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let done = done.clone();
        tokio::spawn(async move {
            let mut peak = base;
            while !done.load(Ordering::Relaxed) {
                peak[0] = peak[0].max(rss(dmz_pid));
                peak[1] = peak[1].max(rss(agent_pid));
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            peak
        })
    };

    // The expected digest is computed while the partner idles through the slow phase.
    let expected = tokio::task::spawn_blocking(|| pattern::digest(SEED, TOTAL));
    let transfer_start = Instant::now();
    let mut s = request(public, TOTAL).await;
    let mut hash = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut read = 0u64;
    // Slow phase.
    let mut tick = tokio::time::interval(SLOW_PERIOD);
    while transfer_start.elapsed() < SLOW_PHASE {
        tick.tick().await;
        let n = read_into(&mut s, &mut buf[..SLOW_READ], &mut hash).await;
        assert!(n > 0, "EOF after {read} bytes in the slow phase");
        read += n as u64;
    }
    let slow_read = read;
    let slow_written = written.load(Ordering::Relaxed);
    // Fast phase: the rest at full speed.
    loop {
        let n = read_into(&mut s, &mut buf, &mut hash).await;
        if n == 0 {
            break;
        }
        read += n as u64;
        assert!(
            transfer_start.elapsed() < TRANSFER_LIMIT,
            "transfer not done after {TRANSFER_LIMIT:?} ({read} bytes)"
        );
    }
    let transfer = transfer_start.elapsed();
    done.store(true, Ordering::Relaxed);
    let peak = sampler.await.expect("sampler");
    target_task.abort();

    let in_flight = slow_written - slow_read;
    println!(
        "slow phase {SLOW_PHASE:?}: partner read {:.1} MiB, target had written {:.1} MiB ({:.1} MiB in flight)",
        mib(slow_read),
        mib(slow_written),
        mib(in_flight)
    );
    println!(
        "transfer of {:.0} MiB: {transfer:?}; test total {:?}",
        mib(TOTAL),
        test_start.elapsed()
    );
    for (name, base, peak) in [("DMZ", base[0], peak[0]), ("agent", base[1], peak[1])] {
        println!(
            "{name} RSS: baseline {:.1} MiB, peak {:.1} MiB, growth {:.1} MiB",
            mib(base),
            mib(peak),
            mib(peak - base)
        );
    }

    assert_eq!(read, TOTAL, "bytes received");
    assert!(
        <[u8; 32]>::from(hash.finalize()) == expected.await.expect("digest task"),
        "the partner's bytes differ from what the target sent"
    );
    // The slow reader held the writer back: the target could not run ahead by the whole file.
    assert!(
        slow_written < TOTAL,
        "the target wrote all {TOTAL} bytes while the partner had read {slow_read}"
    );
    assert!(
        peak[0] - base[0] < RSS_LIMIT,
        "DMZ RSS grew by {:.1} MiB",
        mib(peak[0] - base[0])
    );
    assert!(
        peak[1] - base[1] < RSS_LIMIT,
        "agent RSS grew by {:.1} MiB",
        mib(peak[1] - base[1])
    );
}
