//! Strangers on the tunnel port: garbage, slowloris, and a tunnel whose path turns into a
//! black hole.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use relay_e2e::pattern::Pattern;
use relay_tunnel::protocol::{
    self, ALPN_INBOUND_V1, Registration, RegistrationAnswer, ServiceDecl,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use super::*;

/// The first flight of a rustls client limited to `versions`: a ClientHello record.
fn client_hello(pki: &Pki, versions: &[&'static rustls::SupportedProtocolVersion]) -> Vec<u8> {
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(versions)
        .expect("versions")
        .with_root_certificates(pem::roots(pki))
        .with_no_client_auth();
    config.alpn_protocols = vec![ALPN_INBOUND_V1.to_vec()];
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut conn = rustls::ClientConnection::new(Arc::new(config), name).expect("client");
    let mut out = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut out).expect("write ClientHello");
    }
    assert_eq!(out[0], 0x16, "a TLS handshake record");
    out
}

/// Reads until the peer closes (EOF or reset); the time it took and what it sent (such as a
/// TLS alert), or `None` if it is still open after `limit`.
async fn eof_within(s: &mut TcpStream, limit: Duration) -> Option<(Duration, Vec<u8>)> {
    let start = Instant::now();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let left = limit.checked_sub(start.elapsed())?;
        match tokio::time::timeout(left, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return Some((start.elapsed(), got)),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Err(_) => return None,
        }
    }
}

/// Random bytes, an HTTP request and a TLS 1.2 ClientHello sent to the tunnel port are closed
/// and counted as `tls_handshake` rejections, with a log line; the DMZ keeps serving the
/// legitimate agent's sessions and accepts a new agent afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_the_tunnel_port_is_closed_and_counted() {
    let _serial = shared().await;
    let pki = Pki::new();
    let dmz = Dmz::start(&pki, DmzOptions::default()).await;
    let legit = Legit::start(&pki, dmz.opts.tunnel).await;
    let before = dmz.rejections("tls_handshake").await;

    let inputs = [
        (
            "4 KiB of random bytes",
            Pattern::new(7, 4096).next_chunk().expect("4 KiB").to_vec(),
        ),
        (
            "an HTTP request",
            b"GET / HTTP/1.1\r\nHost: relay\r\nUser-Agent: curl\r\n\r\n".to_vec(),
        ),
        (
            "a TLS 1.2 ClientHello",
            client_hello(&pki, &[&rustls::version::TLS12]),
        ),
    ];
    // Bound: the handshake timeout (10 s) plus slack; garbage should not need it at all.
    let bound = Duration::from_secs(15);
    for (what, bytes) in &inputs {
        let mut s = TcpStream::connect(dmz.opts.tunnel).await.expect("connect");
        // The DMZ may close before all bytes are written: a failed write is part of the answer.
        let _ = s.write_all(bytes).await;
        let (took, answer) = eof_within(&mut s, bound)
            .await
            .unwrap_or_else(|| panic!("{what}: the DMZ kept the connection open past {bound:?}"));
        println!(
            "{what}: closed after {took:?}; the DMZ sent {} byte(s) first ({})",
            answer.len(),
            if answer.first() == Some(&0x15) {
                "a TLS alert"
            } else if answer.is_empty() {
                "nothing"
            } else {
                "other bytes"
            }
        );
        legit.check(&format!("after {what}")).await;
    }
    let after = dmz.wait_rejections("tls_handshake", before + 3.0).await;
    println!("relay_rejections_total{{reason=\"tls_handshake\"}}: {before} -> {after}");
    let line = dmz
        .proc
        .wait_line(&["agent connection refused", "TLS handshake failed"], LIMIT)
        .await;
    println!("DMZ log: {line}");

    // The DMZ still serves: the legitimate session works and a new agent registers.
    legit.check("after the garbage").await;
    let echo = CountingEcho::start().await;
    let port = free_port();
    let mut opts = AgentOptions::new(dmz.opts.tunnel, vec![Service::new("late", port, echo.addr)]);
    opts.identity = "engine-2".into();
    let _late = start_agent(&pki, &opts).await;
    wait_open(local(port), LIMIT).await;
    legit_works(local(port), "through an agent that came after the garbage").await;
    assert!(alive(dmz.pid()), "the DMZ process died");
}

/// The source address of every slowloris client: another host than the legitimate peers.
const ATTACKER: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));

/// Connects to `addr` from `from`.
async fn connect_from(from: IpAddr, addr: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(from, 0))?;
    socket.connect(addr).await
}

/// A slowloris client from [`ATTACKER`]: holds a connection to `addr` and sends `bytes` one
/// per second, reconnecting a second after the server closes it, until `stop`.
async fn slowloris(
    addr: SocketAddr,
    bytes: Arc<Vec<u8>>,
    stop: CancellationToken,
    connected: Arc<AtomicUsize>,
    cut: Arc<AtomicUsize>,
) {
    while !stop.is_cancelled() {
        let s = tokio::select! {
            _ = stop.cancelled() => return,
            r = tokio::time::timeout(Duration::from_secs(5), connect_from(ATTACKER, addr)) => r,
        };
        let Ok(Ok(mut s)) = s else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        connected.fetch_add(1, Ordering::Relaxed);
        let mut sink = [0u8; 1024];
        'bytes: for b in bytes.iter().cycle() {
            if s.write_all(&[*b]).await.is_err() {
                break;
            }
            let tick = tokio::time::sleep(Duration::from_secs(1));
            tokio::pin!(tick);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => {
                        connected.fetch_sub(1, Ordering::Relaxed);
                        return;
                    }
                    _ = &mut tick => break,
                    // Drain what the server sends (echoed bytes, an alert) and notice a close.
                    r = s.read(&mut sink) => if matches!(r, Ok(0) | Err(_)) { break 'bytes; },
                }
            }
        }
        connected.fetch_sub(1, Ordering::Relaxed);
        cut.fetch_add(1, Ordering::Relaxed);
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

/// Registers a service as a hand-made agent `engine-2`: TCP, TLS, registration, answer. Returns
/// the time it took and the connection (kept open by the caller until it has measured).
async fn legit_agent_connects(
    config: Arc<rustls::ClientConfig>,
    tunnel: SocketAddr,
) -> Result<(Duration, tokio_rustls::client::TlsStream<TcpStream>), String> {
    let start = Instant::now();
    let mut tls = dial_tls(config, tunnel)
        .await
        .map_err(|e| format!("TLS: {e}"))?;
    let registration = Registration {
        instance: format!("slowloris-probe-{}", free_port()),
        services: vec![ServiceDecl {
            name: "probe".into(),
            listen: format!("127.0.0.1:{}", free_port()),
            allow: vec![],
            accept_proxy: false,
            ..Default::default()
        }],
    };
    protocol::write_message(&mut tls, &registration)
        .await
        .map_err(|e| format!("write registration: {e}"))?;
    let answer = tokio::time::timeout(
        LIMIT,
        protocol::read_message::<RegistrationAnswer, _>(&mut tls),
    )
    .await
    .map_err(|_| "no registration answer".to_owned())?
    .map_err(|e| format!("registration answer: {e}"))?;
    if !answer.services.iter().all(|v| v.accepted) {
        return Err(format!("registration refused: {answer:?}"));
    }
    Ok((start.elapsed(), tls))
}

/// Slowloris from one host: 2,100 connections to the tunnel port (more than the DMZ handles
/// unauthenticated at once, 2,048) and 500 to a public port, each sending one byte per second
/// (and reconnecting a second after it is cut). The DMZ keeps 64 unauthenticated connections of
/// that host, each new one evicting the oldest (`pending_evicted`), and cuts each after
/// `HELLO_TIMEOUT` without a whole ClientHello. Meanwhile a legitimate agent on
/// another host still connects (TLS + registration answered) and a legitimate partner still
/// gets an echo, each in under 1 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_on_tunnel_and_public_ports_does_not_lock_out_legitimate_peers() {
    const SLOW_TUNNEL: usize = 2100;
    const SLOW_PUBLIC: usize = 500;
    const BOUND: Duration = Duration::from_secs(1);
    let _serial = exclusive().await;
    let pki = Pki::new();
    let dmz = Dmz::start(&pki, DmzOptions::default()).await;
    let legit = Legit::start(&pki, dmz.opts.tunnel).await;
    let agent_config = client_config(&pki, "engine-2", ALPN_INBOUND_V1);
    // Warm-up: one agent connection before the flood, for comparison.
    let (quiet, conn) = legit_agent_connects(agent_config.clone(), dmz.opts.tunnel)
        .await
        .expect("legitimate agent before the flood");
    drop(conn);
    println!("before the flood: legitimate agent connected in {quiet:?}");

    let stop = CancellationToken::new();
    let _stop_on_drop = stop.clone().drop_guard();
    let hello = Arc::new(client_hello(&pki, &[&rustls::version::TLS13]));
    let junk = Arc::new(b"slowloris ".repeat(100));
    let tunnel_conns = Arc::new(AtomicUsize::new(0));
    let tunnel_cut = Arc::new(AtomicUsize::new(0));
    let public_conns = Arc::new(AtomicUsize::new(0));
    let public_cut = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..SLOW_TUNNEL {
        tasks.push(tokio::spawn(slowloris(
            dmz.opts.tunnel,
            hello.clone(),
            stop.clone(),
            tunnel_conns.clone(),
            tunnel_cut.clone(),
        )));
    }
    for _ in 0..SLOW_PUBLIC {
        tasks.push(tokio::spawn(slowloris(
            legit.public,
            junk.clone(),
            stop.clone(),
            public_conns.clone(),
            public_cut.clone(),
        )));
    }
    let flood_start = Instant::now();
    // Let the flood establish itself.
    let all_in = wait_for(Duration::from_secs(15), || {
        let (t, cut) = (tunnel_conns.clone(), tunnel_cut.clone());
        let p = public_conns.clone();
        async move {
            t.load(Ordering::Relaxed) + cut.load(Ordering::Relaxed) >= SLOW_TUNNEL
                && p.load(Ordering::Relaxed) >= SLOW_PUBLIC
        }
    })
    .await;
    println!(
        "flood up after {:?} (every client connected once: {}); slow tunnel connections {}, slow public connections {}",
        flood_start.elapsed(),
        all_in.is_some(),
        tunnel_conns.load(Ordering::Relaxed),
        public_conns.load(Ordering::Relaxed)
    );
    tokio::time::sleep(Duration::from_secs(2)).await;

    // Probe three times, spread over more than one handshake timeout (10 s).
    let mut agent_times = Vec::new();
    let mut partner_times = Vec::new();
    let mut failures = Vec::new();
    for probe in 0..3 {
        let at = flood_start.elapsed();
        match legit_agent_connects(agent_config.clone(), dmz.opts.tunnel).await {
            Ok((took, conn)) => {
                agent_times.push(took);
                drop(conn);
            }
            Err(e) => failures.push(format!("agent probe {probe} at {at:?}: {e}")),
        }
        match roundtrip(legit.public, b"legit partner").await {
            Ok(took) => partner_times.push(took),
            Err(e) => failures.push(format!("partner probe {probe} at {at:?}: {e}")),
        }
        println!(
            "probe {probe} at {at:?} into the flood: agent {:?}, partner {:?}; slow connections held: tunnel {}, public {}; cut so far: tunnel {}, public {}",
            agent_times.get(probe),
            partner_times.get(probe),
            tunnel_conns.load(Ordering::Relaxed),
            public_conns.load(Ordering::Relaxed),
            tunnel_cut.load(Ordering::Relaxed),
            public_cut.load(Ordering::Relaxed),
        );
        tokio::time::sleep(Duration::from_secs(4)).await;
    }
    stop.cancel();
    for t in tasks {
        let _ = t.await;
    }
    let rejected = dmz.rejections("tls_handshake").await;
    let over_share = dmz.rejections("pending_limit").await;
    let evicted = dmz.rejections("pending_evicted").await;
    println!(
        "slowloris: legitimate agent connect times {agent_times:?}, partner echo times {partner_times:?}; DMZ rejections: tls_handshake {rejected}, pending_limit {over_share}, pending_evicted {evicted}"
    );
    assert!(alive(dmz.pid()), "the DMZ process died");
    // Beyond its 64, each new connection of the attacker evicts its oldest one still before
    // the end of its ClientHello (or is refused at once when none is).
    assert!(
        over_share + evicted >= (SLOW_TUNNEL - 64) as f64,
        "the attacker's connections beyond its 64 must be cut at once: pending_limit {over_share}, pending_evicted {evicted}"
    );
    assert!(failures.is_empty(), "probes failed: {failures:#?}");
    for t in agent_times.iter().chain(&partner_times) {
        assert!(
            *t < BOUND,
            "a legitimate peer waited {t:?} (bound {BOUND:?}) during the slowloris flood: agent {agent_times:?}, partner {partner_times:?}"
        );
    }
    legit.check("after the slowloris flood").await;
}

/// A TCP proxy that forwards until told to stop, then holds every connection open in silence
/// (a black hole: no FIN, no RST, no byte).
struct Blackhole {
    addr: SocketAddr,
    forwarding: Arc<AtomicBool>,
    stop: CancellationToken,
}

impl Drop for Blackhole {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl Blackhole {
    async fn start(upstream: SocketAddr) -> Blackhole {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().unwrap();
        let forwarding = Arc::new(AtomicBool::new(true));
        let stop = CancellationToken::new();
        let (fwd, stop2) = (forwarding.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    _ = stop2.cancelled() => return,
                    r = listener.accept() => r,
                };
                let Ok((down, _)) = accepted else { continue };
                let (fwd, stop3) = (fwd.clone(), stop2.clone());
                tokio::spawn(async move {
                    // Held until the test ends, whatever happens below.
                    let _hold = stop3.clone();
                    if !fwd.load(Ordering::SeqCst) {
                        stop3.cancelled().await;
                        drop(down);
                        return;
                    }
                    let Ok(up) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    let (dr, dw) = down.into_split();
                    let (ur, uw) = up.into_split();
                    let a = pipe(dr, uw, fwd.clone());
                    let b = pipe(ur, dw, fwd.clone());
                    tokio::select! {
                        _ = stop3.cancelled() => {}
                        _ = async { tokio::join!(a, b) } => {}
                    }
                });
            }
        });
        Blackhole {
            addr,
            forwarding,
            stop,
        }
    }

    fn swallow(&self) {
        self.forwarding.store(false, Ordering::SeqCst);
    }
}

/// Copies until `forwarding` turns false, then keeps both halves open and silent forever.
async fn pipe(
    mut r: tokio::net::tcp::OwnedReadHalf,
    mut w: tokio::net::tcp::OwnedWriteHalf,
    forwarding: Arc<AtomicBool>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match r.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if !forwarding.load(Ordering::SeqCst) {
            break;
        }
        if w.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    if !forwarding.load(Ordering::SeqCst) {
        // A black hole neither closes nor answers.
        std::future::pending::<()>().await;
    }
}

/// A tunnel whose path stops forwarding without closing is detected by the DMZ's PING
/// keepalive within 2 × keepalive (+1 s slack), and the agent's public listener closes; the
/// other agent's sessions go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blackholed_tunnel_is_detected_within_two_keepalives() {
    let _serial = exclusive().await;
    let pki = Pki::new();
    let opts = DmzOptions::default();
    let keepalive = humantime_secs(opts.keepalive);
    let dmz = Dmz::start(&pki, opts).await;
    let legit = Legit::start(&pki, dmz.opts.tunnel).await;

    let proxy = Blackhole::start(dmz.opts.tunnel).await;
    let echo = CountingEcho::start().await;
    let port = free_port();
    let public = local(port);
    let mut opts = AgentOptions::new(proxy.addr, vec![Service::new("behind", port, echo.addr)]);
    opts.identity = "engine-2".into();
    opts.connections = 1;
    let _agent = start_agent(&pki, &opts).await;
    wait_open(public, LIMIT).await;
    legit_works(public, "through the proxy before the black hole").await;
    // Let a few keepalive rounds pass so the timing is steady.
    tokio::time::sleep(Duration::from_millis(1500)).await;

    proxy.swallow();
    let start = Instant::now();
    let bound = 2 * keepalive + Duration::from_secs(1);
    let closed = wait_for(bound + Duration::from_secs(10), || async move {
        !accepts(public).await
    })
    .await;
    let took = start.elapsed();
    println!(
        "black hole: listener closed after {took:?} (keepalive {keepalive:?}, bound {bound:?}); closed: {}",
        closed.is_some()
    );
    let line = dmz
        .proc
        .wait_line(&["agent tunnel down", "engine-2"], LIMIT)
        .await;
    println!("DMZ log: {line}");
    assert!(closed.is_some(), "the listener never closed");
    assert!(
        took <= bound,
        "the black-holed tunnel was detected after {took:?}, bound {bound:?}"
    );
    assert!(
        line.contains("PING") || line.contains("silent"),
        "the DMZ should say the tunnel went silent: {line}"
    );
    legit.check("after the black hole").await;
}

fn humantime_secs(s: &str) -> Duration {
    Duration::from_secs(
        s.strip_suffix('s')
            .and_then(|n| n.parse().ok())
            .expect("keepalive in whole seconds"),
    )
}
