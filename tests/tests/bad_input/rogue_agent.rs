//! A rogue agent: a valid certificate (`engine-2`) in the hands of an attacker who writes raw
//! HTTP/2 frames on its carriers. The DMZ must cut it off and keep serving the normal agent
//! `engine-1`.
//!
//! What the DMZ does is h2's work (settings in relay-tunnel/src/h2conf.rs): a flood of
//! remotely reset streams ends the connection with GOAWAY ENHANCE_YOUR_CALM (CVE-2023-44487);
//! more than a few CONTINUATION frames, or more than 100 empty DATA frames, likewise.

use std::time::{Duration, Instant};

use relay_tunnel::protocol::{
    self, ALPN_INBOUND_V1, ALPN_OUTBOUND_V1, Registration, RegistrationAnswer, ServiceDecl,
};

use super::h2raw::{self, RawConn, Role};
use super::*;

/// How long the DMZ may take to cut an abusive connection.
const CUT: Duration = Duration::from_secs(10);

/// A DMZ process that lets agents dial `127.0.0.1:ECHO` outbound, a normal agent beside it,
/// and the echo target that outbound sessions reach.
struct Scene {
    pki: Pki,
    dmz: Dmz,
    legit: Legit,
    echo: CountingEcho,
    rss_before: u64,
}

impl Scene {
    async fn start() -> Scene {
        let pki = Pki::new();
        let echo = CountingEcho::start().await;
        let dmz = Dmz::start(
            &pki,
            DmzOptions {
                connect_allow: vec![echo.addr.to_string()],
                ..Default::default()
            },
        )
        .await;
        let legit = Legit::start(&pki, dmz.opts.tunnel).await;
        let rss_before = procfs::rss_bytes(dmz.pid()).unwrap_or(0);
        Scene {
            pki,
            dmz,
            legit,
            echo,
            rss_before,
        }
    }

    /// An outbound carrier of the rogue agent (it is the HTTP/2 client).
    async fn outbound(&self) -> RawConn {
        let tls = dial_tls(
            client_config(&self.pki, "engine-2", ALPN_OUTBOUND_V1),
            self.dmz.opts.tunnel,
        )
        .await
        .expect("rogue agent outbound TLS");
        RawConn::start(tls, Role::Client)
    }

    /// An inbound carrier of the rogue agent, registered for a service on `port` (it is the
    /// HTTP/2 server).
    async fn inbound(&self, port: u16) -> RawConn {
        let mut tls = dial_tls(
            client_config(&self.pki, "engine-2", ALPN_INBOUND_V1),
            self.dmz.opts.tunnel,
        )
        .await
        .expect("rogue agent inbound TLS");
        let registration = Registration {
            instance: "rogue".into(),
            services: vec![ServiceDecl {
                name: "rogue".into(),
                listen: format!("127.0.0.1:{port}"),
                allow: vec![],
                accept_proxy: false,
                ..Default::default()
            }],
        };
        protocol::write_message(&mut tls, &registration)
            .await
            .unwrap();
        let answer: RegistrationAnswer =
            tokio::time::timeout(LIMIT, protocol::read_message(&mut tls))
                .await
                .expect("registration answer in time")
                .expect("registration answer");
        assert!(answer.services[0].accepted, "{answer:?}");
        RawConn::start(tls, Role::Server)
    }

    /// After an abuse: the normal agent's sessions work, its tunnel never went down, the DMZ
    /// is alive and grew by less than 64 MiB.
    async fn others_unaffected(&self, what: &str) {
        self.legit.check(&format!("after {what}")).await;
        assert!(alive(self.dmz.pid()), "the DMZ died after {what}");
        let downs = self
            .dmz
            .proc
            .count_lines(&["agent tunnel down", "engine-1"]);
        assert_eq!(
            downs,
            0,
            "engine-1's tunnel went down after {what}:\n{}",
            self.dmz.proc.tail(40)
        );
        let rss = procfs::rss_bytes(self.dmz.pid()).unwrap_or(0);
        println!(
            "{what}: DMZ RSS {:.1} -> {:.1} MiB",
            self.rss_before as f64 / MIB,
            rss as f64 / MIB
        );
        assert!(
            rss < self.rss_before + (64 << 20),
            "the DMZ grew by {:.1} MiB after {what}",
            (rss - self.rss_before) as f64 / MIB
        );
    }

    /// Waits for the DMZ's log line saying it cut an outbound carrier of the rogue agent for
    /// an HTTP/2 error; returns it.
    async fn logged_cut(&self) -> String {
        self.dmz
            .proc
            .wait_line(
                &["outbound tunnel down", "engine-2", "connection failed"],
                LIMIT,
            )
            .await
    }

    /// DMZ log lines about the rogue agent, for the report.
    fn rogue_log(&self) -> Vec<String> {
        self.dmz
            .proc
            .text()
            .lines()
            .filter(|l| l.contains("engine-2") || l.contains("h2::"))
            .map(str::to_owned)
            .collect()
    }
}

fn print_log(lines: &[String]) {
    println!("DMZ log lines about the rogue agent: {}", lines.len());
    for l in lines.iter().take(5) {
        println!("  {l}");
    }
}

/// A CONNECT request header block for `authority`.
fn connect(authority: &str) -> Vec<u8> {
    h2raw::connect_block(authority, &[("relay-service", "rogue")])
}

/// 20,000 streams opened on an outbound carrier as fast as frames can be written, each asking
/// for a destination the policy denies. Every stream is answered or refused (or the connection
/// is cut) in bounded time and memory; engine-1 is not disturbed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rogue_agent_opening_20000_streams_is_bounded() {
    const STREAMS: u32 = 20_000;
    let _serial = exclusive().await;
    let scene = Scene::start().await;
    let before = scene.dmz.rejections("policy_denied").await;
    let conn = scene.outbound().await;
    let denied = connect("127.0.0.1:9");
    let start = Instant::now();
    let mut batch = Vec::new();
    let mut sent = 0;
    for i in 0..STREAMS {
        batch.extend(h2raw::frame(
            h2raw::HEADERS,
            h2raw::END_HEADERS,
            2 * i + 1,
            &denied,
        ));
        sent += 1;
        if batch.len() > 64 * 1024 || i + 1 == STREAMS {
            if !conn.send(std::mem::take(&mut batch)).await {
                break;
            }
            if i == STREAMS / 2 {
                scene.legit.check("in the middle of the stream flood").await;
            }
        }
    }
    let settled = conn
        .wait_until(Duration::from_secs(60), |s| {
            s.ended.is_some()
                || s.count(h2raw::HEADERS) + s.count(h2raw::RST_STREAM) >= STREAMS as usize
        })
        .await;
    let took = start.elapsed();
    let stats = conn.stats();
    let after = scene.dmz.rejections("policy_denied").await;
    println!(
        "20,000 streams: sent {sent} in {took:.1?}; the DMZ answered: {}; relay_rejections_total{{reason=\"policy_denied\"}} {before} -> {after}",
        stats.summary()
    );
    let denial_lines = scene
        .dmz
        .proc
        .count_lines(&["outbound destination denied by policy"]);
    println!("DMZ log lines \"outbound destination denied by policy\": {denial_lines}");
    assert!(
        settled,
        "after 60 s, {} of {STREAMS} streams are neither answered nor refused and the connection is open",
        STREAMS as usize - stats.count(h2raw::HEADERS) - stats.count(h2raw::RST_STREAM)
    );
    if stats.goaway.is_some() {
        println!("DMZ log: {}", scene.logged_cut().await);
    }
    scene.others_unaffected("20,000 streams").await;
}

/// "Rapid reset" (CVE-2023-44487): streams opened and reset at once, 10,000 times, on an
/// outbound carrier, toward a destination the policy allows. The DMZ cuts the connection with
/// GOAWAY (h2's pending-accept reset limit, 64) long before the 10,000th.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rogue_agent_rapid_reset_is_cut_off() {
    const STREAMS: u32 = 10_000;
    let _serial = shared().await;
    let scene = Scene::start().await;
    let conn = scene.outbound().await;
    let allowed = connect(&scene.echo.addr.to_string());
    let dials_before = scene.echo.accepted();
    let start = Instant::now();
    let mut batch = Vec::new();
    let mut sent = 0;
    for i in 0..STREAMS {
        let id = 2 * i + 1;
        batch.extend(h2raw::frame(
            h2raw::HEADERS,
            h2raw::END_HEADERS,
            id,
            &allowed,
        ));
        batch.extend(h2raw::rst(id, h2raw::CANCEL));
        sent += 1;
        if (batch.len() > 32 * 1024 || i + 1 == STREAMS)
            && !conn.send(std::mem::take(&mut batch)).await
        {
            break;
        }
    }
    let cut = conn.wait_end(CUT).await;
    let took = start.elapsed();
    let stats = conn.stats();
    // Let dials already under way land before counting them.
    tokio::time::sleep(Duration::from_millis(500)).await;
    println!(
        "rapid reset: {sent} open+reset pairs written; connection cut: {cut} after {took:.2?}; {}; dials the flood caused: {}",
        stats.summary(),
        scene.echo.accepted() - dials_before
    );
    print_log(&scene.rogue_log());
    assert!(
        cut,
        "the rapid-reset connection is still open after {CUT:?}"
    );
    assert!(
        stats.goaway.is_some(),
        "the DMZ closed without GOAWAY: {}",
        stats.summary()
    );
    scene.others_unaffected("rapid reset").await;
}

/// A request whose header block never ends (HEADERS without END_HEADERS, then CONTINUATION
/// frames forever) is cut off; so is a single header block of 64 KiB (limit 16 KiB), which
/// never becomes a session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rogue_agent_continuation_flood_and_oversized_headers_are_refused() {
    let _serial = shared().await;
    let scene = Scene::start().await;

    let conn = scene.outbound().await;
    let start = Instant::now();
    let mut first = h2raw::frame(h2raw::HEADERS, 0, 1, &connect("127.0.0.1:9"));
    first.extend(h2raw::frame(
        h2raw::CONTINUATION,
        0,
        1,
        &h2raw::literal("x-pad", &[b'a'; 100]),
    ));
    let mut frames = 1;
    let mut ok = conn.send(first).await;
    while ok && !conn.is_ended() && frames < 100_000 && start.elapsed() < CUT {
        let mut batch = Vec::new();
        for _ in 0..100 {
            batch.extend(h2raw::frame(
                h2raw::CONTINUATION,
                0,
                1,
                &h2raw::literal("x-pad", &[b'a'; 100]),
            ));
        }
        frames += 100;
        ok = conn.send(batch).await;
        tokio::task::yield_now().await;
    }
    let cut = conn.wait_end(CUT).await;
    println!(
        "CONTINUATION flood: {frames} frames written; cut: {cut} after {:.2?}; {}",
        start.elapsed(),
        conn.stats().summary()
    );
    assert!(cut, "a header block without end kept the connection open");
    assert!(
        conn.stats().goaway.is_some(),
        "closed without GOAWAY: {}",
        conn.stats().summary()
    );
    println!("DMZ log: {}", scene.logged_cut().await);
    scene.others_unaffected("a CONTINUATION flood").await;
    let cuts_before =
        scene
            .dmz
            .proc
            .count_lines(&["outbound tunnel down", "engine-2", "connection failed"]);

    let dials_before = scene.echo.accepted();
    let conn = scene.outbound().await;
    let mut block = connect(&scene.echo.addr.to_string());
    block.extend(h2raw::literal("x-big", &vec![b'b'; 64 * 1024]));
    conn.send(h2raw::frame(h2raw::HEADERS, h2raw::END_HEADERS, 1, &block))
        .await;
    let refused = conn
        .wait_until(CUT, |s| {
            s.ended.is_some() || s.resets.iter().any(|(id, _)| *id == 1) || s.goaway.is_some()
        })
        .await;
    let stats = conn.stats();
    println!(
        "64 KiB header block: refused: {refused}; {}",
        stats.summary()
    );
    assert!(refused, "a 64 KiB header block was neither refused nor cut");
    assert!(
        !stats.headers.contains(&1),
        "the DMZ answered the oversized request as if it were a session"
    );
    assert_eq!(
        scene.echo.accepted(),
        dials_before,
        "the oversized request made the DMZ dial"
    );
    let line = scene
        .dmz
        .proc
        .wait_count(
            &["outbound tunnel down", "engine-2", "connection failed"],
            cuts_before + 1,
            LIMIT,
        )
        .await;
    println!("DMZ log: {line}");
    scene.others_unaffected("a 64 KiB header block").await;
}

/// Many empty DATA frames on an open outbound session: h2 tolerates 100, then cuts the
/// connection with GOAWAY ENHANCE_YOUR_CALM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rogue_agent_empty_data_flood_is_cut_off() {
    let _serial = shared().await;
    let scene = Scene::start().await;
    let conn = scene.outbound().await;
    conn.send(h2raw::frame(
        h2raw::HEADERS,
        h2raw::END_HEADERS,
        1,
        &connect(&scene.echo.addr.to_string()),
    ))
    .await;
    assert!(
        conn.wait_until(LIMIT, |s| s.headers.contains(&1)).await,
        "the DMZ did not answer the CONNECT: {}",
        conn.stats().summary()
    );
    let start = Instant::now();
    let mut frames = 0;
    while !conn.is_ended() && frames < 100_000 && start.elapsed() < CUT {
        let mut batch = Vec::new();
        for _ in 0..100 {
            batch.extend(h2raw::frame(h2raw::DATA, 0, 1, &[]));
        }
        frames += 100;
        if !conn.send(batch).await {
            break;
        }
        tokio::task::yield_now().await;
    }
    let cut = conn.wait_end(CUT).await;
    let stats = conn.stats();
    println!(
        "empty DATA flood: {frames} frames written; cut: {cut} after {:.2?}; {}",
        start.elapsed(),
        stats.summary()
    );
    assert!(cut, "the empty DATA flood kept the connection open");
    assert_eq!(
        stats.goaway.as_ref().map(|g| g.1),
        Some(h2raw::ENHANCE_YOUR_CALM),
        "expected GOAWAY ENHANCE_YOUR_CALM: {}",
        stats.summary()
    );
    println!("DMZ log: {}", scene.logged_cut().await);
    scene.others_unaffected("an empty DATA flood").await;
}

/// On an inbound carrier the rogue agent is the HTTP/2 server and answers the DMZ's control
/// stream with abuse: a header block that never ends, or a flood of empty DATA frames. The
/// DMZ cuts the tunnel at once (well before its 10 s control-stream timeout), logs it, and
/// closes the rogue's public listener.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rogue_agent_abuse_on_an_inbound_carrier_cuts_its_tunnel() {
    let _serial = shared().await;
    let scene = Scene::start().await;
    for abuse in ["CONTINUATION without end", "empty DATA flood"] {
        let downs = scene
            .dmz
            .proc
            .count_lines(&["agent tunnel down", "engine-2"]);
        let port = free_port();
        let conn = scene.inbound(port).await;
        wait_open(local(port), LIMIT).await;
        assert!(
            conn.wait_until(LIMIT, |s| s.headers.contains(&1)).await,
            "the DMZ did not open its control stream: {}",
            conn.stats().summary()
        );
        let start = Instant::now();
        let mut frames = 0;
        if abuse == "CONTINUATION without end" {
            conn.send(h2raw::frame(h2raw::HEADERS, 0, 1, h2raw::STATUS_200))
                .await;
        } else {
            conn.send(h2raw::frame(
                h2raw::HEADERS,
                h2raw::END_HEADERS,
                1,
                h2raw::STATUS_200,
            ))
            .await;
        }
        while !conn.is_ended() && frames < 100_000 && start.elapsed() < CUT {
            let mut batch = Vec::new();
            for _ in 0..100 {
                batch.extend(if abuse == "CONTINUATION without end" {
                    h2raw::frame(
                        h2raw::CONTINUATION,
                        0,
                        1,
                        &h2raw::literal("x-pad", &[b'a'; 100]),
                    )
                } else {
                    h2raw::frame(h2raw::DATA, 0, 1, &[])
                });
            }
            frames += 100;
            if !conn.send(batch).await {
                break;
            }
            tokio::task::yield_now().await;
        }
        let cut = conn.wait_end(CUT).await;
        let took = start.elapsed();
        println!(
            "inbound carrier, {abuse}: {frames} frames written; cut: {cut} after {took:.2?}; {}",
            conn.stats().summary()
        );
        assert!(cut, "{abuse}: the tunnel is still open after {CUT:?}");
        assert!(
            took < Duration::from_secs(5),
            "{abuse}: cut only after {took:?}, i.e. by a timeout rather than the frame limits"
        );
        wait_closed(local(port), LIMIT).await;
        let line = scene
            .dmz
            .proc
            .wait_count(&["agent tunnel down", "engine-2"], downs + 1, LIMIT)
            .await;
        println!("DMZ log: {line}");
        scene.others_unaffected(abuse).await;
    }
}
