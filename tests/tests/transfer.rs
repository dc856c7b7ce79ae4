//! Inbound sessions carry bytes intact: sizes from 1 byte to 256 MiB, independent directions,
//! many sessions at once, a real HTTP client, half-close and reset in both directions, a target
//! that refuses, sessions spread over two agents, and a partner's first bytes passed on to the
//! next agent when the first one refuses.

use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use relay_e2e::pattern::Pattern;
use relay_e2e::*;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Bound on any single network wait in these tests.
const WAIT: Duration = Duration::from_secs(10);
/// Read buffer when hashing what comes back.
const CHUNK: usize = 64 * 1024;

/// Writes `len` bytes of the pattern `seed`, then half-closes; returns their SHA-256.
async fn send_pattern<W: AsyncWrite + Unpin>(
    w: &mut W,
    seed: u64,
    len: u64,
) -> io::Result<[u8; 32]> {
    let mut pattern = Pattern::new(seed, len);
    let mut hash = Sha256::new();
    while let Some(chunk) = pattern.next_chunk() {
        hash.update(chunk);
        w.write_all(chunk).await?;
    }
    w.shutdown().await?;
    Ok(hash.finalize().into())
}

/// Reads to EOF; returns the byte count and SHA-256.
async fn read_digest<R: AsyncRead + Unpin>(r: &mut R) -> io::Result<(u64, [u8; 32])> {
    let mut hash = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let mut total = 0u64;
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            return Ok((total, hash.finalize().into()));
        }
        hash.update(&buf[..n]);
        total += n as u64;
    }
}

/// A DMZ and an agent in-process publishing one service `name` that relays to `target`.
struct Relay {
    public: SocketAddr,
    dmz_opts: DmzOptions,
    _agent: InProcess,
    _dmz: InProcess,
    _pki: Pki,
}

async fn relay_to(name: &str, target: SocketAddr) -> Relay {
    let pki = Pki::new();
    let dmz_opts = DmzOptions::default();
    let dmz = start_dmz(&pki, &dmz_opts).await;
    let port = free_port();
    let agent = start_agent(
        &pki,
        &AgentOptions::new(dmz_opts.tunnel, vec![Service::new(name, port, target)]),
    )
    .await;
    let public = SocketAddr::from(([127, 0, 0, 1], port));
    wait_listener_open(dmz_opts.admin, name).await;
    Relay {
        public,
        dmz_opts,
        _agent: agent,
        _dmz: dmz,
        _pki: pki,
    }
}

/// Waits until the DMZ at `admin` reports the public listener of `service` open. Unlike
/// `wait_open`, this opens no probe session, so a test's target sees only the test's sessions.
async fn wait_listener_open(admin: SocketAddr, service: &str) {
    let label = format!("service=\"{service}\"");
    let open = wait_for(WAIT, || async {
        match http_get(admin, "/metrics").await {
            Ok((200, text)) => metric(&text, "relay_listener_open", &[&label]) == Some(1.0),
            _ => false,
        }
    })
    .await;
    assert!(
        open.is_some(),
        "listener of {service} not open within {WAIT:?}"
    );
}

async fn connect(addr: SocketAddr) -> TcpStream {
    tokio::time::timeout(WAIT, TcpStream::connect(addr))
        .await
        .expect("connect timed out")
        .expect("connect")
}

async fn accept(listener: &TcpListener) -> TcpStream {
    tokio::time::timeout(WAIT, listener.accept())
        .await
        .expect("the target saw no connection")
        .expect("accept")
        .0
}

async fn read_exact_timed(s: &mut TcpStream, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    tokio::time::timeout(WAIT, s.read_exact(&mut buf))
        .await
        .expect("read timed out")
        .expect("read");
    buf
}

async fn read_to_end_timed(s: &mut TcpStream) -> Vec<u8> {
    let mut buf = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut buf))
        .await
        .expect("read to EOF timed out")
        .expect("read to EOF");
    buf
}

/// Sends `len` pattern bytes through an echo session while reading the echo; checks count
/// and SHA-256 of both directions; returns the time taken, or what went wrong.
async fn echo_session(public: SocketAddr, seed: u64, len: u64) -> Result<Duration, String> {
    let start = Instant::now();
    let stream = tokio::time::timeout(WAIT, TcpStream::connect(public))
        .await
        .map_err(|_| "connect timed out".to_owned())?
        .map_err(|e| format!("connect: {e}"))?;
    let (mut r, mut w) = stream.into_split();
    let writer = tokio::spawn(async move { send_pattern(&mut w, seed, len).await });
    let read = read_digest(&mut r).await;
    let sent = writer.await.map_err(|e| format!("writer task: {e}"))?;
    let (got, digest) = read.map_err(|e| format!("read echo: {e}"))?;
    let sent = sent.map_err(|e| format!("write: {e}"))?;
    if got != len {
        return Err(format!("echoed {got} bytes of {len}"));
    }
    if digest != sent {
        return Err("SHA-256 of the echo differs from what was sent".into());
    }
    Ok(start.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_keeps_bytes_intact_from_one_byte_to_256_mib() {
    let echo = targets::echo().await;
    let relay = relay_to("echo", echo.addr).await;
    for (len, limit) in [
        (1u64, WAIT),
        (1 << 20, Duration::from_secs(30)),
        (256 << 20, Duration::from_secs(120)),
    ] {
        let took = tokio::time::timeout(limit, echo_session(relay.public, len ^ 0x5eed, len))
            .await
            .unwrap_or_else(|_| panic!("echo of {len} bytes did not finish within {limit:?}"))
            .unwrap_or_else(|e| panic!("echo of {len} bytes: {e}"));
        let mib = len as f64 / (1 << 20) as f64;
        println!(
            "echo {len} bytes: {took:?} ({:.1} MiB/s each way)",
            mib / took.as_secs_f64()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_direction_carries_its_own_stream() {
    const UP: u64 = 3 * 1024 * 1024 + 5;
    const DOWN: u64 = 5 * 1024 * 1024 + 3;
    const UP_SEED: u64 = 11;
    const DOWN_SEED: u64 = 22;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let target_addr = listener.local_addr().unwrap();
    // The target hashes what it receives while it sends its own pattern.
    let target = tokio::spawn(async move {
        let s = accept(&listener).await;
        let (mut r, mut w) = s.into_split();
        let sender = tokio::spawn(async move { send_pattern(&mut w, DOWN_SEED, DOWN).await });
        let received = read_digest(&mut r).await.expect("target read");
        sender.await.expect("target sender").expect("target write");
        received
    });
    let relay = relay_to("split", target_addr).await;

    let run = async {
        let (mut r, mut w) = connect(relay.public).await.into_split();
        let writer = tokio::spawn(async move { send_pattern(&mut w, UP_SEED, UP).await });
        let down = read_digest(&mut r).await.expect("partner read");
        writer
            .await
            .expect("partner writer")
            .expect("partner write");
        let up = target.await.expect("target task");
        (up, down)
    };
    let (up, down) = tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .expect("session did not finish in 60 s");
    assert_eq!(
        up,
        (UP, pattern::digest(UP_SEED, UP)),
        "partner -> target bytes"
    );
    assert_eq!(
        down,
        (DOWN, pattern::digest(DOWN_SEED, DOWN)),
        "target -> partner bytes"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_concurrent_sessions_all_succeed() {
    const SESSIONS: u64 = 200;
    let echo = targets::echo().await;
    let relay = relay_to("many", echo.addr).await;
    let start = Instant::now();
    let sessions: Vec<_> = (0..SESSIONS)
        .map(|i| {
            let public = relay.public;
            tokio::spawn(async move {
                // A few KiB, a different size and pattern per session.
                echo_session(public, 1000 + i, 2048 + i * 37).await
            })
        })
        .collect();
    let all = async {
        let mut failed = Vec::new();
        for (i, s) in sessions.into_iter().enumerate() {
            match s.await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => failed.push(format!("session {i}: {e}")),
                Err(e) => failed.push(format!("session {i}: task {e}")),
            }
        }
        failed
    };
    let failed = tokio::time::timeout(Duration::from_secs(60), all)
        .await
        .expect("200 sessions did not finish within 60 s");
    assert!(
        failed.is_empty(),
        "{} of {SESSIONS} sessions failed; first: {:?}",
        failed.len(),
        &failed[..failed.len().min(5)]
    );
    println!("{SESSIONS} concurrent echo sessions: {:?}", start.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_get_through_the_relay_with_curl() {
    let web = targets::http("hello").await;
    let relay = relay_to("web", web.addr).await;
    let url = format!("http://{}/", relay.public);
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new("curl")
            .args(["-sS", "--max-time", "10", "-w", "\n%{http_code}", &url])
            .output()
    })
    .await
    .unwrap()
    .expect("curl must be installed to run this test (.ci/run installs it)");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "curl failed: {} {stdout} {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(stdout, "hello\n200", "curl: body, then status code");

    // Keep-alive: two requests on one connection through the relay.
    let mut s = connect(relay.public).await;
    let req =
        "GET / HTTP/1.1\r\nHost: x\r\n\r\nGET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
    s.write_all(req.as_bytes()).await.unwrap();
    let text = String::from_utf8(read_to_end_timed(&mut s).await).unwrap();
    assert_eq!(text.matches("HTTP/1.1 200 OK\r\n").count(), 2, "{text}");
    assert!(text.ends_with("\r\n\r\nhello"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partner_half_close_reaches_the_target_which_can_still_answer() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let relay = relay_to("half-up", listener.local_addr().unwrap()).await;
    let request: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    let reply = b"reply sent after the target saw EOF";

    let mut partner = connect(relay.public).await;
    let mut target = accept(&listener).await;
    partner.write_all(&request).await.unwrap();
    partner.shutdown().await.unwrap();

    // The target gets every byte and then EOF, while its own write side is still open.
    let got = read_to_end_timed(&mut target).await;
    assert!(
        got == request,
        "target got {} bytes, expected {}",
        got.len(),
        request.len()
    );
    // Only now does it answer; the partner, half-closed, still receives the answer.
    target.write_all(reply).await.unwrap();
    assert_eq!(read_exact_timed(&mut partner, reply.len()).await, reply);
    target.shutdown().await.unwrap();
    assert!(
        read_to_end_timed(&mut partner).await.is_empty(),
        "nothing after the reply"
    );
    drop(target);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn target_half_close_reaches_the_partner_which_can_still_send() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let relay = relay_to("half-down", listener.local_addr().unwrap()).await;
    let banner: Vec<u8> = (0..100_000u32).map(|i| (i % 241) as u8).collect();
    let upload = b"partner data sent after it saw the target's EOF";

    let mut partner = connect(relay.public).await;
    let mut target = accept(&listener).await;
    target.write_all(&banner).await.unwrap();
    target.shutdown().await.unwrap();

    let got = read_to_end_timed(&mut partner).await;
    assert!(
        got == banner,
        "partner got {} bytes, expected {}",
        got.len(),
        banner.len()
    );
    partner.write_all(upload).await.unwrap();
    assert_eq!(read_exact_timed(&mut target, upload.len()).await, upload);
    partner.shutdown().await.unwrap();
    assert!(
        read_to_end_timed(&mut target).await.is_empty(),
        "nothing after the upload"
    );
}

/// Closes `s` with a TCP RST instead of a FIN.
fn reset(s: TcpStream) {
    socket2::SockRef::from(&s)
        .set_linger(Some(Duration::ZERO))
        .expect("SO_LINGER");
    drop(s);
}

/// Reads until EOF or an error, within [`WAIT`].
async fn read_outcome(s: &mut TcpStream) -> io::Result<usize> {
    let mut buf = vec![0u8; 4096];
    let mut total = 0;
    loop {
        match tokio::time::timeout(WAIT, s.read(&mut buf)).await {
            Err(_) => panic!("neither EOF nor error within {WAIT:?}"),
            Ok(Ok(0)) => return Ok(total),
            Ok(Ok(n)) => total += n,
            Ok(Err(e)) => return Err(e),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partner_reset_resets_the_target() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let relay = relay_to("rst-up", listener.local_addr().unwrap()).await;
    let mut partner = connect(relay.public).await;
    let mut target = accept(&listener).await;
    // The session is up end to end before the reset.
    partner.write_all(b"ping").await.unwrap();
    assert_eq!(read_exact_timed(&mut target, 4).await, b"ping");
    target.write_all(b"pong").await.unwrap();
    assert_eq!(read_exact_timed(&mut partner, 4).await, b"pong");

    reset(partner);
    let err = read_outcome(&mut target)
        .await
        .expect_err("the target must see a reset, not a clean EOF");
    assert_eq!(err.kind(), io::ErrorKind::ConnectionReset, "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn target_reset_resets_the_partner() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let relay = relay_to("rst-down", listener.local_addr().unwrap()).await;
    let mut partner = connect(relay.public).await;
    let mut target = accept(&listener).await;
    partner.write_all(b"ping").await.unwrap();
    assert_eq!(read_exact_timed(&mut target, 4).await, b"ping");
    target.write_all(b"pong").await.unwrap();
    assert_eq!(read_exact_timed(&mut partner, 4).await, b"pong");

    reset(target);
    let err = read_outcome(&mut partner)
        .await
        .expect_err("the partner must see a reset, not a clean EOF");
    assert_eq!(err.kind(), io::ErrorKind::ConnectionReset, "{err}");
}

/// An address nothing listens on, held so that no other test can take it: connects to it are
/// refused. Keep the socket.
fn refusing_addr() -> (tokio::net::TcpSocket, SocketAddr) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::from(([127, 0, 0, 1], 0))).unwrap();
    let addr = socket.local_addr().unwrap();
    (socket, addr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_target_closes_the_partner_and_is_counted() {
    const SERVICE: &str = "refused-target";
    let (_held, nothing) = refusing_addr();
    let relay = relay_to(SERVICE, nothing).await;
    let mut partner = connect(relay.public).await;
    let started = Instant::now();
    match read_outcome(&mut partner).await {
        Ok(n) => assert_eq!(n, 0, "no data may come from a refused target"),
        Err(e) => println!("partner connection ended with an error: {e}"),
    }
    println!("partner closed {:?} after connect", started.elapsed());

    let label = format!("service=\"{SERVICE}\"");
    let labels = [
        label.as_str(),
        "direction=\"inbound\"",
        "result=\"target_refused\"",
    ];
    // The DMZ and the agent run in this process and share one metrics recorder, and both
    // count this session under the same labels: 1 from the agent (target connect failed)
    // + 1 from the DMZ (no agent could serve it).
    let counted = wait_for(WAIT, || async {
        let (status, text) = http_get(relay.dmz_opts.admin, "/metrics").await.unwrap();
        status == 200 && metric(&text, "relay_sessions_total", &labels) == Some(2.0)
    })
    .await;
    let (_, text) = http_get(relay.dmz_opts.admin, "/metrics").await.unwrap();
    assert!(
        counted.is_some(),
        "relay_sessions_total{{{}}} = {:?}, expected 2 (agent + DMZ)",
        labels.join(","),
        metric(&text, "relay_sessions_total", &labels)
    );
}

/// A DMZ, then agent engine-1 serving `service` to `target_1`, then engine-2 serving it to
/// `target_2`, both registered (`two_agents_with`: a DMZ with these options).
struct TwoAgents {
    public: SocketAddr,
    dmz_opts: DmzOptions,
    _agents: [InProcess; 2],
    _dmz: InProcess,
    _pki: Pki,
}

async fn two_agents(service: &str, target_1: SocketAddr, target_2: SocketAddr) -> TwoAgents {
    two_agents_with(service, target_1, target_2, DmzOptions::default()).await
}

async fn two_agents_with(
    service: &str,
    target_1: SocketAddr,
    target_2: SocketAddr,
    dmz_opts: DmzOptions,
) -> TwoAgents {
    // Tests in this process share one metrics recorder: a second identity of this test alone
    // makes the gauge below tell when its agent is in.
    let second = format!("engine-2-{service}");
    let pki = Pki::with_agents(&["engine-1", &second]);
    let dmz = start_dmz(&pki, &dmz_opts).await;
    let port = free_port();
    let opts_1 = AgentOptions::new(dmz_opts.tunnel, vec![Service::new(service, port, target_1)]);
    let mut opts_2 =
        AgentOptions::new(dmz_opts.tunnel, vec![Service::new(service, port, target_2)]);
    opts_2.identity = second;
    let agent_2_label = format!("agent=\"{}\"", opts_2.identity);
    let agent_1 = start_agent(&pki, &opts_1).await;
    wait_listener_open(dmz_opts.admin, service).await;
    let agent_2 = start_agent(&pki, &opts_2).await;
    let registered = wait_for(WAIT, || async {
        let (_, text) = http_get(dmz_opts.admin, "/metrics").await.unwrap();
        metric(&text, "relay_tunnels_connected", &[&agent_2_label]).unwrap_or(0.0) >= 1.0
    })
    .await;
    assert!(
        registered.is_some(),
        "{} did not register within {WAIT:?}",
        opts_2.identity
    );
    TwoAgents {
        public: SocketAddr::from(([127, 0, 0, 1], port)),
        dmz_opts,
        _agents: [agent_1, agent_2],
        _dmz: dmz,
        _pki: pki,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_spread_over_two_agents() {
    const SESSIONS: usize = 40;
    let target_1 = targets::tagged_echo(b'1').await;
    let target_2 = targets::tagged_echo(b'2').await;
    let scene = two_agents("spread", target_1.addr, target_2.addr).await;
    let public = scene.public;

    let mut counts = [0usize; 2];
    for i in 0..SESSIONS {
        let mut s = connect(public).await;
        let msg = format!("session {i}");
        s.write_all(msg.as_bytes()).await.unwrap();
        s.shutdown().await.unwrap();
        let got = read_to_end_timed(&mut s).await;
        assert!(!got.is_empty(), "session {i}: no answer");
        assert_eq!(&got[1..], msg.as_bytes(), "echo after the tag");
        match got[0] {
            b'1' => counts[0] += 1,
            b'2' => counts[1] += 1,
            other => panic!("unknown tag {other}"),
        }
    }
    println!(
        "{SESSIONS} sessions: engine-1 served {}, engine-2 served {}",
        counts[0], counts[1]
    );
    assert!(
        counts[0] > 0 && counts[1] > 0,
        "both agents must serve sessions: {counts:?}"
    );
    drop(target_1);
    drop(target_2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_bytes_reach_the_next_agent_when_one_refuses() {
    // A partner that speaks first has its bytes sent before an agent answers (the DMZ's early
    // bytes, up to 16 KiB). When that agent refuses (its target is down), the next one must get
    // them all, once, in order, and then the rest and the partner's FIN.
    const SERVICE: &str = "early-replay";
    let (_held, nothing) = refusing_addr();
    let target = targets::tagged_echo(b'2').await;
    let scene = two_agents(SERVICE, nothing, target.addr).await;
    let (public, dmz_opts) = (scene.public, &scene.dmz_opts);

    let sizes = [
        1usize,
        100,
        16 * 1024 - 1,
        16 * 1024,
        16 * 1024 + 1,
        100 * 1024,
    ];
    for round in 0..4 {
        for &len in &sizes {
            let msg: Vec<u8> = (0..len).map(|i| (i * 7 + round) as u8).collect();
            let mut s = connect(public).await;
            // All of it, and the FIN, before the relay can have answered.
            s.write_all(&msg).await.unwrap();
            s.shutdown().await.unwrap();
            let got = read_to_end_timed(&mut s).await;
            assert_eq!(
                got.first(),
                Some(&b'2'),
                "round {round}, {len} bytes: served by the refusing agent?"
            );
            assert!(
                got[1..] == msg[..],
                "round {round}, {len} bytes: echoed {} bytes, not the same bytes once",
                got.len() - 1
            );
        }
    }
    let labels = [
        "service=\"early-replay\"",
        "direction=\"inbound\"",
        "result=\"target_refused\"",
    ];
    let (_, text) = http_get(dmz_opts.admin, "/metrics").await.unwrap();
    let refused = metric(&text, "relay_sessions_total", &labels).unwrap_or(0.0);
    println!(
        "{} sessions, {refused} refused by the first agent tried",
        4 * sizes.len()
    );
    assert!(
        refused >= 1.0,
        "no session met the refusing agent first: the test proved nothing"
    );
}

/// A listener that completes no more connections: its backlog is full, so the kernel drops
/// further SYNs and a connect to it hangs. Keep the listener and the held connections.
async fn blackhole() -> (TcpListener, Vec<TcpStream>, SocketAddr) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::from(([127, 0, 0, 1], 0))).unwrap();
    let listener = socket.listen(0).unwrap();
    let addr = listener.local_addr().unwrap();
    let mut held = Vec::new();
    while let Ok(Ok(s)) =
        tokio::time::timeout(Duration::from_millis(300), TcpStream::connect(addr)).await
    {
        held.push(s);
        assert!(held.len() < 64, "the backlog of {addr} does not fill");
    }
    (listener, held, addr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_bytes_go_to_one_agent_only_when_it_does_not_answer() {
    // The DMZ gives up on an agent that does not answer in time (here its setup timeout, 1 s,
    // is shorter than the agent's connect timeout to a blackholed target). It cannot tell
    // whether that agent reached its target, so a partner whose first bytes already went out
    // is closed rather than sent to the next agent, where they could arrive a second time. A
    // partner that had sent nothing is tried on the next agent, as before.
    const SERVICE: &str = "early-timeout";
    let (_hole, _held, hole) = blackhole().await;
    let target = targets::tagged_echo(b'2').await;
    let dmz_opts = DmzOptions {
        limits: "setup_timeout = \"1s\"".into(),
        ..Default::default()
    };
    let scene = two_agents_with(SERVICE, hole, target.addr, dmz_opts).await;

    let (mut closed, mut served) = (0, 0);
    for i in 0..6 {
        let msg = format!("speaks first {i}");
        let mut s = connect(scene.public).await;
        s.write_all(msg.as_bytes()).await.unwrap();
        s.shutdown().await.unwrap();
        let got = read_to_end_timed(&mut s).await;
        if got.is_empty() {
            closed += 1;
        } else {
            assert_eq!(
                got,
                format!("2{msg}").as_bytes(),
                "served once, by engine-2"
            );
            served += 1;
        }
    }
    println!(
        "partners speaking first: {served} served by engine-2, {closed} closed after engine-1 did not answer"
    );
    assert!(served >= 1, "engine-2 was never tried first: nothing shown");
    assert!(
        closed >= 1,
        "no partner was closed: first bytes that went to engine-1 were sent to engine-2 too"
    );

    for i in 0..4 {
        // Says nothing until the relay has answered: engine-2 serves it even after engine-1
        // failed to answer.
        let mut s = connect(scene.public).await;
        assert_eq!(
            read_exact_timed(&mut s, 1).await,
            b"2",
            "silent partner {i}"
        );
        s.write_all(b"then speaks").await.unwrap();
        s.shutdown().await.unwrap();
        assert_eq!(read_to_end_timed(&mut s).await, b"then speaks");
    }
}
