//! Rogue partners on public ports: floods past the session limit, one source opening too fast,
//! broken PROXY headers, sources outside the allow-list, sessions left half-closed or idle.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use relay_tunnel::proxyproto::{self, Version};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::*;

/// An agent `engine-1` in-process serving `services`; waits until each public port is open.
async fn agent_with(pki: &Pki, dmz: &Dmz, services: Vec<Service>) -> InProcess {
    let ports: Vec<SocketAddr> = services
        .iter()
        .map(|s| s.listen.parse().expect("listen address"))
        .collect();
    let mut opts = AgentOptions::new(dmz.opts.tunnel, services);
    opts.connections = 1;
    let agent = start_agent(pki, &opts).await;
    for p in ports {
        wait_open(p, LIMIT).await;
    }
    agent
}

/// Above `max_sessions = 20`, new partners are closed at once and counted (`limit`), while the
/// 20 established sessions keep flowing; once some end, new partners are admitted again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_flood_above_max_sessions_is_closed_at_once() {
    const MAX: usize = 20;
    const EXCESS: usize = 50;
    let _serial = exclusive().await;
    let pki = Pki::new();
    let dmz = Dmz::start(
        &pki,
        DmzOptions {
            limits: format!("max_sessions = {MAX}"),
            ..Default::default()
        },
    )
    .await;
    let echo = CountingEcho::start().await;
    let port = free_port();
    let public = local(port);
    let _agent = agent_with(&pki, &dmz, vec![Service::new("echo", port, echo.addr)]).await;

    let mut established = Vec::new();
    for i in 0..MAX {
        let mut s = TcpStream::connect(public).await.expect("connect");
        echo_on(&mut s, format!("established {i}").as_bytes())
            .await
            .unwrap_or_else(|e| panic!("established session {i}: {e}"));
        established.push(s);
    }
    let before = dmz.rejections("limit").await;

    let mut slowest = Duration::ZERO;
    let mut flood = Vec::new();
    for i in 0..EXCESS {
        let mut s = TcpStream::connect(public).await.expect("connect");
        let _ = s.write_all(b"let me in").await;
        let took = closed_within(&mut s, Duration::from_secs(5))
            .await
            .unwrap_or_else(|| panic!("excess connection {i} was not closed within 5 s"));
        slowest = slowest.max(took);
        flood.push(s);
    }
    let after = dmz.wait_rejections("limit", before + EXCESS as f64).await;
    println!(
        "max_sessions = {MAX}: {EXCESS} excess connections each closed within {slowest:?}; relay_rejections_total{{reason=\"limit\"}} {before} -> {after}"
    );
    assert!(
        slowest < Duration::from_secs(1),
        "an excess connection took {slowest:?} to be closed"
    );
    let line = dmz.proc.wait_line(&["session limit reached"], LIMIT).await;
    println!("DMZ log: {line}");
    for (i, s) in established.iter_mut().enumerate() {
        echo_on(s, format!("still flowing {i}").as_bytes())
            .await
            .unwrap_or_else(|e| panic!("established session {i} after the flood: {e}"));
    }
    // Capacity comes back as sessions end.
    established.truncate(MAX - 5);
    let readmitted = wait_for(LIMIT, || async move {
        roundtrip(public, b"after some ended").await.is_ok()
    })
    .await;
    assert!(
        readmitted.is_some(),
        "no new session was admitted after 5 established ones ended"
    );
    println!("a new partner was admitted {readmitted:?} after 5 sessions ended");
}

/// Writes a PROXY v1 header naming `source`, then `msg`; true if the echo came back, false if
/// the DMZ closed the connection.
async fn proxied_echo(public: SocketAddr, source: SocketAddr, msg: &[u8]) -> bool {
    let mut s = TcpStream::connect(public).await.expect("connect");
    let mut bytes = proxyproto::encode(Version::V1, source, public);
    bytes.extend_from_slice(msg);
    if s.write_all(&bytes).await.is_err() {
        return false;
    }
    let mut buf = vec![0u8; msg.len()];
    matches!(
        tokio::time::timeout(LIMIT, s.read_exact(&mut buf)).await,
        Ok(Ok(_)) if buf == msg
    )
}

/// With `source_rate = 2`, `source_burst = 4` and PROXY headers from a trusted proxy, one
/// partner address opening connections back to back is throttled (`rate_limit`) while another
/// address, behind the same proxy, is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_source_rate_limit_throttles_one_source_only() {
    const RATE: f64 = 2.0;
    const BURST: f64 = 4.0;
    const TRIES: usize = 16;
    let _serial = shared().await;
    let pki = Pki::new();
    let dmz = Dmz::start(
        &pki,
        DmzOptions {
            trusted_proxies: vec!["127.0.0.0/8".into()],
            limits: format!("source_rate = {RATE}\nsource_burst = {BURST}"),
            ..Default::default()
        },
    )
    .await;
    let echo = CountingEcho::start().await;
    let port = free_port();
    let public = local(port);
    let mut svc = Service::new("proxied", port, echo.addr);
    svc.extra = "accept_proxy = true".into();
    let _agent = agent_with(&pki, &dmz, vec![svc]).await;
    let before = dmz.rejections("rate_limit").await;

    let noisy: SocketAddr = "198.51.100.7:40000".parse().unwrap();
    let quiet: SocketAddr = "198.51.100.8:40000".parse().unwrap();
    let start = Instant::now();
    let mut admitted = 0;
    for i in 0..TRIES {
        if proxied_echo(public, noisy, format!("noisy {i}").as_bytes()).await {
            admitted += 1;
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    // The bucket holds BURST tokens and earns RATE per second.
    let allowed = (BURST + RATE * elapsed).floor() as usize;
    let refused = TRIES - admitted;
    println!(
        "noisy source: {admitted} of {TRIES} admitted in {elapsed:.2} s (bucket allows {allowed}); {refused} refused"
    );
    assert!(
        admitted <= allowed,
        "the noisy source got {admitted} sessions, the bucket allows {allowed}"
    );
    assert!(
        admitted >= BURST as usize,
        "the burst was not admitted: {admitted}"
    );
    assert!(refused > 0, "the noisy source was never throttled");

    for i in 0..3 {
        assert!(
            proxied_echo(public, quiet, format!("quiet {i}").as_bytes()).await,
            "the quiet source was refused on try {i}"
        );
    }
    let after = dmz
        .wait_rejections("rate_limit", before + refused as f64)
        .await;
    println!("relay_rejections_total{{reason=\"rate_limit\"}}: {before} -> {after}");
    let line = dmz
        .proc
        .wait_line(&["partner refused by a limit", "rate_limit"], LIMIT)
        .await;
    println!("DMZ log: {line}");
}

/// Sends `bytes` to `public` and returns how long the DMZ took to close the connection.
async fn refused_after(public: SocketAddr, bytes: &[u8], what: &str) -> Duration {
    let mut s = TcpStream::connect(public).await.expect("connect");
    let _ = s.write_all(bytes).await;
    closed_within(&mut s, Duration::from_secs(10))
        .await
        .unwrap_or_else(|| panic!("{what}: still open after 10 s"))
}

/// A PROXY v2 header naming `source` (IPv4) followed by `tlvs`, with the length field set to
/// `declared` bytes after the 16-byte prefix (normally 12 + `tlvs.len()`).
fn v2_with(source: SocketAddr, public: SocketAddr, tlvs: &[u8], declared: Option<u16>) -> Vec<u8> {
    let mut h = proxyproto::encode(Version::V2, source, public);
    assert_eq!(h.len(), 28, "an IPv4 v2 header");
    h.extend_from_slice(tlvs);
    let len = declared.unwrap_or((h.len() - 16) as u16);
    h[14..16].copy_from_slice(&len.to_be_bytes());
    h
}

/// PROXY header edge cases beyond proxy_protocol.rs, on a service with `accept_proxy` and
/// `proxy_header_timeout = 1s`: a v2 header arriving one byte at a time is accepted; a header
/// cut short and then silence is closed at the timeout; an oversized header (> 1 KiB), a v1
/// line without end, and a v2 TLV running past the header are closed at once. No bad one ever
/// reaches the target; each is counted as `proxy_header`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_header_edge_cases() {
    let _serial = exclusive().await;
    let pki = Pki::new();
    let dmz = Dmz::start(
        &pki,
        DmzOptions {
            trusted_proxies: vec!["127.0.0.0/8".into()],
            limits: "proxy_header_timeout = \"1s\"".into(),
            ..Default::default()
        },
    )
    .await;
    let target = CountingEcho::start().await;
    let port = free_port();
    let public = local(port);
    let mut svc = Service::new("proxied", port, target.addr);
    svc.extra = "accept_proxy = true".into();
    let legit_echo = CountingEcho::start().await;
    let legit_port = free_port();
    let _agent = agent_with(
        &pki,
        &dmz,
        vec![svc, Service::new("plain", legit_port, legit_echo.addr)],
    )
    .await;
    let partner: SocketAddr = "198.51.100.7:40000".parse().unwrap();
    // wait_open's probes carried no header: they were refused before the target.
    assert_eq!(
        target.accepted(),
        0,
        "a headerless probe reached the target"
    );
    let before = dmz.rejections("proxy_header").await;

    // 1. v2, one byte at a time, then the payload: accepted.
    let header = proxyproto::encode(Version::V2, partner, public);
    let mut s = TcpStream::connect(public).await.unwrap();
    for b in &header {
        s.write_all(&[*b]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    echo_on(&mut s, b"after a trickled v2 header")
        .await
        .expect("a v2 header sent byte by byte must be accepted");
    drop(s);
    assert_eq!(target.accepted(), 1);

    // 2. Cut short, then silence: closed at the header timeout.
    let cut = refused_after(public, &header[..20], "truncated v2 header").await;
    let nothing = refused_after(public, b"", "no header at all").await;
    println!("truncated v2 header closed after {cut:?}; silent connection after {nothing:?}");
    for (what, t) in [("truncated", cut), ("silent", nothing)] {
        assert!(
            t >= Duration::from_millis(900) && t <= Duration::from_secs(3),
            "{what}: closed after {t:?}, expected about proxy_header_timeout = 1 s"
        );
    }

    // 3. Refused at once: oversized v2 (2 KiB of NOOP TLVs), an endless v1 line, a TLV whose
    // length runs past the header, and a v2 header that announces 64 KiB.
    let mut noop = vec![0x04, 0x07, 0xf8]; // PP2_TYPE_NOOP, 2040 bytes
    noop.resize(3 + 2040, 0);
    let cases = [
        (
            "oversized v2 (2 KiB)",
            v2_with(partner, public, &noop, None),
        ),
        (
            "v1 line of 300 bytes without CRLF",
            [b"PROXY TCP4 ".as_slice(), &[b'1'; 289]].concat(),
        ),
        (
            "v2 TLV longer than the header",
            v2_with(partner, public, &[0x04, 0x04, 0x00, 0xAA, 0xBB], None),
        ),
        (
            "v2 announcing 65535 bytes",
            v2_with(partner, public, &[0u8; 1100], Some(u16::MAX)),
        ),
    ];
    for (what, bytes) in &cases {
        let t = refused_after(public, bytes, what).await;
        println!("{what}: closed after {t:?}");
        assert!(
            t < Duration::from_millis(800),
            "{what}: took {t:?}, so it waited for the timeout instead of being refused"
        );
    }
    let expected = before + 2.0 + cases.len() as f64;
    let after = dmz.wait_rejections("proxy_header", expected).await;
    println!("relay_rejections_total{{reason=\"proxy_header\"}}: {before} -> {after}");
    let line = dmz.proc.wait_line(&["PROXY header refused"], LIMIT).await;
    println!("DMZ log: {line}");
    assert_eq!(
        target.accepted(),
        1,
        "a connection with a bad PROXY header reached the target"
    );
    legit_works(local(legit_port), "beside the PROXY header cases").await;
}

/// A partner from a source outside the service's `allow` list is closed by the DMZ before any
/// agent sees it: the target counts no connection. The same agent's service that allows the
/// source still works and its target counts the session (so the counter does count).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partner_outside_allow_is_closed_before_any_agent_sees_it() {
    let _serial = shared().await;
    let pki = Pki::new();
    let dmz = Dmz::start(&pki, DmzOptions::default()).await;
    let guarded_target = CountingEcho::start().await;
    let open_target = CountingEcho::start().await;
    let guarded_port = free_port();
    let open_port = free_port();
    let mut guarded = Service::new("guarded", guarded_port, guarded_target.addr);
    guarded.extra = "allow = [\"198.51.100.0/24\"]".into();
    let mut open = Service::new("open", open_port, open_target.addr);
    open.extra = "allow = [\"127.0.0.0/8\"]".into();
    let _agent = agent_with(&pki, &dmz, vec![guarded, open]).await;
    let before = dmz.rejections("source_denied").await;

    for i in 0..5 {
        let t = refused_after(local(guarded_port), b"hello", "partner outside allow").await;
        if i == 0 {
            println!("partner outside allow: closed after {t:?}");
        }
    }
    let after = dmz.wait_rejections("source_denied", before + 5.0).await;
    println!("relay_rejections_total{{reason=\"source_denied\"}}: {before} -> {after}");
    let line = dmz.proc.wait_line(&["partner source denied"], LIMIT).await;
    println!("DMZ log: {line}");
    let open_before = open_target.accepted();
    legit_works(local(open_port), "on the service that allows 127.0.0.0/8").await;
    // Let any stray session reach its target.
    tokio::time::sleep(Duration::from_millis(500)).await;
    println!(
        "target connections: guarded {}, open {} (was {open_before})",
        guarded_target.accepted(),
        open_target.accepted()
    );
    assert_eq!(
        guarded_target.accepted(),
        0,
        "a partner outside allow reached the target"
    );
    assert_eq!(
        open_target.accepted(),
        open_before + 1,
        "the allowed partner's session should reach its target exactly once"
    );
}

/// A target that reads everything (to EOF) and then holds the connection: it never writes and
/// never closes.
async fn silent_sink() -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut sink = Vec::new();
                let _ = s.read_to_end(&mut sink).await;
                // Held open, silent, until the relay resets it or the test ends.
                let mut b = [0u8; 1];
                let _ = s.read(&mut b).await;
                std::future::pending::<()>().await;
            });
        }
    });
    (addr, task)
}

/// Reads until the connection ends; the time from `from` until then, or `None` if it is
/// still open `limit` after `from`.
async fn ends_after(s: &mut TcpStream, from: Instant, limit: Duration) -> Option<Duration> {
    let mut buf = [0u8; 1024];
    loop {
        let left = limit.checked_sub(from.elapsed())?;
        match tokio::time::timeout(left, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return Some(from.elapsed()),
            Ok(Ok(_)) => {}
            Err(_) => return None,
        }
    }
}

/// A DMZ process with `limits` and an in-process agent serving `services` through it.
async fn dmz_and_agent(pki: &Pki, limits: &str, services: Vec<Service>) -> (Dmz, InProcess) {
    let dmz = Dmz::start(
        pki,
        DmzOptions {
            limits: limits.into(),
            ..Default::default()
        },
    )
    .await;
    let agent = agent_with(pki, &dmz, services).await;
    (dmz, agent)
}

/// Sessions left hanging are reaped on time. With `half_closed_timeout = 2s` (idle timeout at
/// its default): a partner that sends, half-closes, and whose target never answers nor closes
/// is reaped about 2 s after its FIN. With `idle_timeout = 2s` on another DMZ: a session where
/// nothing moves is reaped about 2 s after its last byte, while a session that keeps talking
/// outlives it. Each is counted with its result label.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_closed_and_idle_sessions_are_reaped_on_time() {
    let _serial = exclusive().await;
    let pki = Pki::new();
    let (sink_addr, _sink) = silent_sink().await;
    let echo = CountingEcho::start().await;
    let (sink_port, echo_port) = (free_port(), free_port());
    let (half_dmz, _half_agent) = dmz_and_agent(
        &pki,
        "half_closed_timeout = \"2s\"",
        vec![Service::new("sink", sink_port, sink_addr)],
    )
    .await;
    let (idle_dmz, _idle_agent) = dmz_and_agent(
        &pki,
        "idle_timeout = \"2s\"",
        vec![Service::new("echo", echo_port, echo.addr)],
    )
    .await;
    let timeout = Duration::from_secs(2);
    let slack = Duration::from_secs(2);

    let talker = tokio::spawn(async move {
        let mut s = TcpStream::connect(local(echo_port)).await.unwrap();
        let start = Instant::now();
        let mut rounds = 0;
        while start.elapsed() < Duration::from_secs(6) {
            echo_on(&mut s, b"still here").await?;
            rounds += 1;
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        Ok::<_, String>(rounds)
    });

    // Half-closed: data, then FIN from the partner; the target never answers nor closes.
    let mut half = TcpStream::connect(local(sink_port)).await.unwrap();
    half.write_all(b"here is my file, bye").await.unwrap();
    half.shutdown().await.unwrap();
    let fin = Instant::now();

    // Idle: one echo, then silence both ways.
    let mut idle = TcpStream::connect(local(echo_port)).await.unwrap();
    echo_on(&mut idle, b"one and done").await.unwrap();
    let last_byte = Instant::now();

    let (half_took, idle_took) = tokio::join!(
        ends_after(&mut half, fin, timeout + slack + LIMIT),
        ends_after(&mut idle, last_byte, timeout + slack + LIMIT),
    );
    let rounds = talker.await.unwrap();
    println!(
        "half-closed session reaped {half_took:?} after the FIN; idle session reaped {idle_took:?} after its last byte (timeouts 2 s); the talking session did {rounds:?} echo rounds over 6 s"
    );
    for (what, took) in [("half-closed", half_took), ("idle", idle_took)] {
        let took = took.unwrap_or_else(|| panic!("the {what} session was never reaped"));
        assert!(
            took >= timeout - Duration::from_millis(200) && took <= timeout + slack,
            "the {what} session was reaped after {took:?}, expected {timeout:?} (+{slack:?})"
        );
    }
    let rounds = rounds.expect("the talking session must not be reaped");
    assert!(rounds >= 10, "the talking session did only {rounds} rounds");
    let half_count = half_dmz
        .metric("relay_sessions_total", &["result=\"half_closed\""])
        .await;
    let idle_count = idle_dmz
        .metric("relay_sessions_total", &["result=\"idle\""])
        .await;
    println!("DMZ relay_sessions_total: half_closed {half_count}, idle {idle_count}");
    assert!(half_count >= 1.0, "no half_closed session counted");
    assert!(idle_count >= 1.0, "no idle session counted");
}
