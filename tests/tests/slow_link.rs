//! A busy tunnel on a slow link: the DMZ node and the agent in two network namespaces joined by
//! a veth pair shaped with `tc ... tbf` (both directions). A tunnel that is delivering data stays
//! up however late a PING answer comes; a small session waits behind bulk transfers only for
//! HTTP/2's turn-taking, not behind megabytes of queued data, and the link stays busy; a peer
//! that goes silent is still detected within two keepalive intervals.
//!
//! Needs root and iproute2: skipped with a message otherwise, never under `CI=true`.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use relay_e2e::netns::{DMZ_IP, Netns, ShapedLink};
use relay_e2e::pattern::{Pattern, digest};
use relay_e2e::process::Captured;
use relay_e2e::*;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::task::AbortOnDropHandle;

/// The tests share the machine's CPU and would disturb each other's timings: one at a time.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Keepalive of both sides: what a user sets for fast failover, and the hardest case for a
/// busy link.
const KEEPALIVE: Duration = Duration::from_secs(1);
/// Request of a bulk session: mode, seed, length.
const DOWNLOAD: u8 = b'D';
const UPLOAD: u8 = b'U';
/// Bound on the p90 round trip of a small session behind 8 bulk sessions at 5 Mbit/s: the
/// issue's target. Measured p90 146 to 166 ms (docs/DECISIONS.md, "Short send queues"); before
/// the short queues 2.4 s (downloads) and 3.2 s (uploads), with `TCP_NOTSENT_LOWAT` alone 1.0 s.
const P90_BOUND: Duration = Duration::from_millis(300);
/// Length of a bulk session that runs until the client leaves.
const ENDLESS: u64 = u64::MAX;

/// The bulk target: a 17-byte request (mode, seed, length, little-endian). `D`: sends that
/// much of the pattern and closes. `U`: reads that much, answers its SHA-256 and closes.
async fn bulk_target(listener: TcpListener) {
    while let Ok((mut s, _)) = listener.accept().await {
        tokio::spawn(async move {
            let mut req = [0u8; 17];
            if s.read_exact(&mut req).await.is_err() {
                return;
            }
            let seed = u64::from_le_bytes(req[1..9].try_into().expect("8 bytes"));
            let len = u64::from_le_bytes(req[9..17].try_into().expect("8 bytes"));
            if req[0] == DOWNLOAD {
                let mut pattern = Pattern::new(seed, len);
                while let Some(chunk) = pattern.next_chunk() {
                    if s.write_all(chunk).await.is_err() {
                        return;
                    }
                }
                let _ = s.shutdown().await;
                let _ = s.read(&mut [0u8; 1]).await;
            } else {
                let mut hash = Sha256::new();
                let mut left = len;
                let mut buf = vec![0u8; 64 * 1024];
                while left > 0 {
                    let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
                    match s.read(&mut buf[..want]).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            hash.update(&buf[..n]);
                            left -= n as u64;
                        }
                    }
                }
                let sum: [u8; 32] = hash.finalize().into();
                let _ = s.write_all(&sum).await;
                let _ = s.shutdown().await;
            }
        });
    }
}

/// Echoes every byte back.
async fn echo_target(listener: TcpListener) {
    while let Ok((mut s, _)) = listener.accept().await {
        tokio::spawn(async move {
            let (mut r, mut w) = s.split();
            let _ = tokio::io::copy(&mut r, &mut w).await;
        });
    }
}

/// A DMZ node and an agent on either side of a shaped link, with a bulk and an echo service.
/// Fields drop in order: processes and targets first, the namespaces last.
struct Setup {
    dmz: Captured,
    agent: Captured,
    _targets: [AbortOnDropHandle<()>; 2],
    bulk: SocketAddr,
    echo: SocketAddr,
    link: ShapedLink,
    _pki: Pki,
}

impl Setup {
    async fn start(rate: &str, queue: &str, keepalive: &'static str) -> Self {
        let link = ShapedLink::new(rate, queue);
        let pki = Pki::new();
        let bulk_listener = link.agent.listen_local();
        let echo_listener = link.agent.listen_local();
        let bulk_target_addr = bulk_listener.local_addr().expect("addr");
        let echo_target_addr = echo_listener.local_addr().expect("addr");
        let targets = [
            AbortOnDropHandle::new(tokio::spawn(bulk_target(bulk_listener))),
            AbortOnDropHandle::new(tokio::spawn(echo_target(echo_listener))),
        ];
        // Ports in the namespaces' own port space; taken from the harness all the same.
        let bulk = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()));
        let echo = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()));
        let dmz_opts = DmzOptions {
            tunnel: SocketAddr::from((DMZ_IP, free_port())),
            keepalive,
            ..Default::default()
        };
        let mut agent_opts = AgentOptions::new(
            dmz_opts.tunnel,
            vec![
                Service::new("bulk", bulk.port(), bulk_target_addr),
                Service::new("echo", echo.port(), echo_target_addr),
            ],
        );
        agent_opts.keepalive = keepalive;
        let dmz_config = pki.write("dmz.toml", &dmz_opts.toml(&pki));
        let agent_config = pki.write("agent.toml", &agent_opts.toml(&pki));
        let dmz = Captured::spawn_command(
            link.dmz
                .command(bin("relay-dmz"))
                .arg("--config")
                .arg(&dmz_config),
            "relay-dmz",
        );
        let agent = Captured::spawn_command(
            link.agent
                .command(bin("relay-internal"))
                .arg("--config")
                .arg(&agent_config),
            "relay-internal",
        );
        // Both tunnel connections (`connections = 2`) up, then the public ports open.
        dmz.wait_count(
            &["agent tunnel up"],
            agent_opts.connections,
            Duration::from_secs(30),
        )
        .await;
        for addr in [bulk, echo] {
            let start = Instant::now();
            while link.dmz.connect(addr).await.is_err() {
                assert!(
                    start.elapsed() < Duration::from_secs(10),
                    "{addr} not open in the DMZ namespace; DMZ log:\n{}",
                    dmz.tail(30)
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        Self {
            dmz,
            agent,
            _targets: targets,
            bulk,
            echo,
            link,
            _pki: pki,
        }
    }

    /// Tunnel connections lost so far, as each side logged them.
    fn drops(&self) -> (usize, usize) {
        (
            self.dmz.count_lines(&["agent tunnel down"]),
            self.agent.count_lines(&["tunnel lost"]),
        )
    }

    fn logs(&self) -> String {
        format!(
            "--- DMZ\n{}\n--- agent\n{}",
            self.dmz.tail(30),
            self.agent.tail(30)
        )
    }
}

/// Opens a bulk session from the DMZ's side (a partner) and sends its request.
async fn bulk_session(ns: &Netns, addr: SocketAddr, mode: u8, seed: u64, len: u64) -> TcpStream {
    let mut s = ns.connect(addr).await.expect("connect to the bulk service");
    let mut req = vec![mode];
    req.extend_from_slice(&seed.to_le_bytes());
    req.extend_from_slice(&len.to_le_bytes());
    s.write_all(&req).await.expect("send bulk request");
    s
}

/// Downloads `len` bytes of pattern `seed`; checks length and hash.
async fn download(mut s: TcpStream, seed: u64, len: u64) -> Result<(), String> {
    let mut hash = Sha256::new();
    let mut got = 0u64;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match s.read(&mut buf).await {
            Ok(0) => break,
            Ok(n) => {
                hash.update(&buf[..n]);
                got += n as u64;
            }
            Err(e) => return Err(format!("download {seed}: {e} after {got} bytes")),
        }
    }
    let sum: [u8; 32] = hash.finalize().into();
    if got != len || sum != digest(seed, len) {
        return Err(format!(
            "download {seed}: {got} of {len} bytes, hash {}",
            if sum == digest(seed, got) {
                "of a prefix"
            } else {
                "wrong"
            }
        ));
    }
    Ok(())
}

/// Uploads `len` bytes of pattern `seed`; checks the target's hash of what it received.
async fn upload(mut s: TcpStream, seed: u64, len: u64) -> Result<(), String> {
    let mut pattern = Pattern::new(seed, len);
    while let Some(chunk) = pattern.next_chunk() {
        s.write_all(chunk)
            .await
            .map_err(|e| format!("upload {seed}: {e}"))?;
    }
    let mut sum = [0u8; 32];
    s.read_exact(&mut sum)
        .await
        .map_err(|e| format!("upload {seed}: no hash back: {e}"))?;
    if sum != digest(seed, len) {
        return Err(format!("upload {seed}: the target's hash differs"));
    }
    Ok(())
}

/// Reads and discards until the session ends; for endless downloads.
async fn drain(mut s: TcpStream) {
    let mut buf = vec![0u8; 64 * 1024];
    while let Ok(n) = s.read(&mut buf).await {
        if n == 0 {
            break;
        }
    }
}

/// Writes the pattern until the session ends; for endless uploads.
async fn flood(mut s: TcpStream) {
    let mut pattern = Pattern::new(7, ENDLESS);
    while let Some(chunk) = pattern.next_chunk() {
        if s.write_all(chunk).await.is_err() {
            break;
        }
    }
}

/// Rate of a `tc` rate string such as "5mbit", in bytes per second.
fn bytes_per_second(rate: &str) -> f64 {
    let mbit: f64 = rate
        .strip_suffix("mbit")
        .and_then(|m| m.parse().ok())
        .expect("rate in mbit");
    mbit * 1e6 / 8.0
}

/// 8 partners download and 8 upload 3 MiB each at once over 2 Mbit/s with a 1 s keepalive on
/// both sides: no tunnel is cut and every byte arrives intact.
///
/// The link queues up to 200 ms (50 KB, a DSL or VPN link's buffer). With the 50 ms of the
/// latency tests (12.5 KB, 8 packets) the shaper drops so much of what the two connections push
/// that TCP itself stalls one of them, both ways, for a second at a time: `ss -ti` showed
/// nothing sent, received or acknowledged for 1 s while the other connection ran
/// (docs/DECISIONS.md, "Liveness"). That tests the link, not the relay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busy_tunnel_at_2mbit_stays_up_and_delivers_every_byte() {
    if !netns::available("busy_tunnel_at_2mbit_stays_up_and_delivers_every_byte") {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().await;
    const LEN: u64 = 3 * 1024 * 1024;
    let setup = Setup::start("2mbit", "200ms", "1s").await;
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..8u64 {
        let down = bulk_session(&setup.link.dmz, setup.bulk, DOWNLOAD, 100 + i, LEN).await;
        tasks.spawn(download(down, 100 + i, LEN));
        let up = bulk_session(&setup.link.dmz, setup.bulk, UPLOAD, 200 + i, LEN).await;
        tasks.spawn(upload(up, 200 + i, LEN));
    }
    let mut failures = Vec::new();
    let all = async {
        while let Some(r) = tasks.join_next().await {
            if let Err(e) = r.expect("transfer task") {
                failures.push(e);
            }
        }
    };
    // 24 MiB each way at 2 Mbit/s is about 105 s.
    let finished = tokio::time::timeout(Duration::from_secs(180), all).await;
    let elapsed = started.elapsed();
    let (dmz_drops, agent_drops) = setup.drops();
    println!(
        "2 Mbit/s, 8 × 3 MiB down + 8 × 3 MiB up, keepalive 1 s: {:.1} s, tunnel drops DMZ {dmz_drops} agent {agent_drops}, failed sessions {}",
        elapsed.as_secs_f64(),
        failures.len()
    );
    assert!(
        finished.is_ok(),
        "transfers not done after {elapsed:?}\n{}",
        setup.logs()
    );
    assert!(
        failures.is_empty() && dmz_drops == 0 && agent_drops == 0,
        "{} session(s) failed, tunnel drops DMZ {dmz_drops} agent {agent_drops}: {failures:#?}\n{}",
        failures.len(),
        setup.logs()
    );
}

/// Round trips of a small request/response session on the echo service, one every 200 ms,
/// while 8 bulk sessions in `direction` fill a 5 Mbit/s link.
async fn interactive_behind_bulk(mode: u8) {
    let name = if mode == DOWNLOAD {
        "downloads"
    } else {
        "uploads"
    };
    let rate = "5mbit";
    let setup = Setup::start(rate, "50ms", "1s").await;
    let mut bulk = Vec::new();
    for i in 0..8u64 {
        let s = bulk_session(&setup.link.dmz, setup.bulk, mode, i, ENDLESS).await;
        bulk.push(AbortOnDropHandle::new(if mode == DOWNLOAD {
            tokio::spawn(drain(s))
        } else {
            tokio::spawn(flood(s))
        }));
    }
    let sent = || {
        if mode == DOWNLOAD {
            setup.link.agent_sent()
        } else {
            setup.link.dmz_sent()
        }
    };
    // Let the bulk sessions fill every queue on the way.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (bytes0, t0) = (sent(), Instant::now());
    let mut rtts = Vec::new();
    for i in 0..40u32 {
        let start = Instant::now();
        let probe = async {
            let mut s = setup.link.dmz.connect(setup.echo).await?;
            let msg = i.to_le_bytes().repeat(4);
            s.write_all(&msg).await?;
            let mut back = vec![0u8; msg.len()];
            s.read_exact(&mut back).await?;
            assert_eq!(back, msg, "echo answered other bytes");
            Ok::<_, std::io::Error>(())
        };
        match tokio::time::timeout(Duration::from_secs(15), probe).await {
            Ok(Ok(())) => rtts.push(start.elapsed()),
            Ok(Err(e)) => panic!("probe {i} failed: {e}\n{}", setup.logs()),
            Err(_) => panic!("probe {i}: no answer within 15 s\n{}", setup.logs()),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let utilisation =
        (sent() - bytes0) as f64 / t0.elapsed().as_secs_f64() / bytes_per_second(rate);
    drop(bulk);
    rtts.sort();
    let pick = |p: usize| rtts[(rtts.len() * p).div_ceil(100) - 1];
    let (p50, p90, max) = (pick(50), pick(90), rtts[rtts.len() - 1]);
    let (dmz_drops, agent_drops) = setup.drops();
    println!(
        "5 Mbit/s, 8 bulk {name}: small session round trip p50 {} ms, p90 {} ms, max {} ms ({} probes); link busy {:.0} %; tunnel drops DMZ {dmz_drops} agent {agent_drops}",
        p50.as_millis(),
        p90.as_millis(),
        max.as_millis(),
        rtts.len(),
        utilisation * 100.0
    );
    assert!(
        dmz_drops == 0 && agent_drops == 0,
        "tunnel drops DMZ {dmz_drops} agent {agent_drops}\n{}",
        setup.logs()
    );
    assert!(
        p90 <= P90_BOUND,
        "p90 round trip {p90:?} behind bulk {name} (p50 {p50:?}, max {max:?}); must be ≤ {P90_BOUND:?}"
    );
    assert!(
        utilisation >= 0.9,
        "the link carried {:.0} % of its rate during bulk {name}; must be ≥ 90 %",
        utilisation * 100.0
    );
}

/// A small session behind 8 bulk downloads on 5 Mbit/s answers within [`P90_BOUND`] (p90), and
/// the link stays at least 90 % busy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_session_is_prompt_behind_bulk_downloads() {
    if !netns::available("small_session_is_prompt_behind_bulk_downloads") {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().await;
    interactive_behind_bulk(DOWNLOAD).await;
}

/// A small session behind 8 bulk uploads on 5 Mbit/s answers within [`P90_BOUND`] (p90), and
/// the link stays at least 90 % busy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_session_is_prompt_behind_bulk_uploads() {
    if !netns::available("small_session_is_prompt_behind_bulk_uploads") {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().await;
    interactive_behind_bulk(UPLOAD).await;
}

/// The link goes down under bulk downloads (nothing crosses, no FIN, no RST): both sides
/// close their tunnels within two keepalive intervals of the last byte they received.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_peer_under_load_is_detected_within_two_intervals() {
    if !netns::available("silent_peer_under_load_is_detected_within_two_intervals") {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().await;
    let setup = Setup::start("5mbit", "50ms", "1s").await;
    let mut bulk = Vec::new();
    for i in 0..8u64 {
        let s = bulk_session(&setup.link.dmz, setup.bulk, DOWNLOAD, i, ENDLESS).await;
        bulk.push(AbortOnDropHandle::new(tokio::spawn(drain(s))));
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        setup.drops(),
        (0, 0),
        "tunnel dropped before the cut\n{}",
        setup.logs()
    );
    setup.link.cut();
    let cut = Instant::now();
    // Silence starts at the cut at the latest; the log is polled every 50 ms.
    let limit = KEEPALIVE * 2 + Duration::from_millis(500);
    let line = setup
        .dmz
        .wait_count(&["agent tunnel down"], 2, Duration::from_secs(10))
        .await;
    let dmz_took = cut.elapsed();
    let agent_line = setup
        .agent
        .wait_count(&["tunnel lost"], 2, Duration::from_secs(10))
        .await;
    let agent_took = cut.elapsed();
    println!(
        "link cut under load: DMZ closed both tunnels after {} ms, agent after at most {} ms (keepalive 1 s)",
        dmz_took.as_millis(),
        agent_took.as_millis()
    );
    assert!(
        line.contains("silent"),
        "the DMZ should say the tunnel went silent: {line}"
    );
    assert!(
        dmz_took <= limit,
        "DMZ took {dmz_took:?} to close a silent tunnel; must be ≤ {limit:?}"
    );
    assert!(
        agent_took <= limit,
        "agent took {agent_took:?} to close a silent tunnel ({agent_line}); must be ≤ {limit:?}"
    );
}
