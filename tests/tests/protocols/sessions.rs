//! Session shapes that B2B protocols need from a byte pipe: the server speaks first (SMTP-,
//! FTP- and SSH-style greetings), and a session sits idle between transfers (PeSIT, OFTP).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

use super::*;

/// Bound on a read that the test expects to succeed.
const READ_LIMIT: Duration = Duration::from_secs(5);

/// A target that greets on accept, then answers `QUIT` with `221 bye` and closes.
async fn greeting_target() -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind target");
    let addr = listener.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut s = BufReader::new(s);
                if s.get_mut()
                    .write_all(b"220 relay-test ready\r\n")
                    .await
                    .is_err()
                {
                    return;
                }
                let mut line = String::new();
                if s.read_line(&mut line).await.is_ok() && line.trim() == "QUIT" {
                    let _ = s.get_mut().write_all(b"221 bye\r\n").await;
                }
                let _ = s.get_mut().shutdown().await;
            });
        }
    });
    (addr, task)
}

/// The partner connects and, without sending anything, reads the target's greeting within
/// 5 s; then a command and its answer pass and the target's close reaches the partner.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_greeting_reaches_a_silent_partner() {
    let (target, task) = greeting_target().await;
    let pki = Pki::new();
    let dmz_opts = DmzOptions::default();
    let _dmz = start_dmz(&pki, &dmz_opts).await;
    let port = free_port();
    let public = SocketAddr::from(([127, 0, 0, 1], port));
    let _agent = start_agent(
        &pki,
        &AgentOptions::new(dmz_opts.tunnel, vec![Service::new("smtp", port, target)]),
    )
    .await;
    wait_open(public, START_LIMIT).await;

    let start = Instant::now();
    let s = TcpStream::connect(public).await.expect("connect");
    let mut s = BufReader::new(s);
    let mut greeting = String::new();
    tokio::time::timeout(READ_LIMIT, s.read_line(&mut greeting))
        .await
        .expect("no greeting within 5 s while the partner stays silent")
        .expect("read greeting");
    let waited = start.elapsed();
    assert_eq!(greeting, "220 relay-test ready\r\n");
    println!("server-first: greeting after {waited:?} without a partner byte");

    s.get_mut().write_all(b"QUIT\r\n").await.expect("send QUIT");
    let mut rest = String::new();
    tokio::time::timeout(READ_LIMIT, s.read_to_string(&mut rest))
        .await
        .expect("no answer and close within 5 s")
        .expect("read answer");
    assert_eq!(rest, "221 bye\r\n");
    task.abort();
}

/// Writes `data` and reads the same number of bytes back from an echo session.
async fn round_trip(s: &mut TcpStream, data: &[u8]) {
    let (mut r, mut w) = s.split();
    let mut back = vec![0u8; data.len()];
    let (wrote, read) = tokio::join!(
        w.write_all(data),
        tokio::time::timeout(READ_LIMIT, r.read_exact(&mut back))
    );
    wrote.expect("write to the session");
    read.expect("echo did not come back within 5 s")
        .expect("read echo");
    assert!(back == data, "echoed bytes differ");
}

/// With DMZ and agent keepalive at 1 s, a session that stays silent for 4.5 s (more than three
/// keepalive intervals) still carries bytes both ways, on the same TCP connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_session_survives_several_keepalive_intervals() {
    let echo = targets::echo().await;
    let pki = Pki::new();
    let dmz_opts = DmzOptions {
        keepalive: "1s",
        ..DmzOptions::default()
    };
    let _dmz = start_dmz(&pki, &dmz_opts).await;
    let port = free_port();
    let public = SocketAddr::from(([127, 0, 0, 1], port));
    let mut agent_opts = AgentOptions::new(
        dmz_opts.tunnel,
        vec![Service::new("pesit", port, echo.addr)],
    );
    agent_opts.keepalive = "1s";
    let _agent = start_agent(&pki, &agent_opts).await;
    wait_open(public, START_LIMIT).await;

    let mut s = TcpStream::connect(public).await.expect("connect");
    round_trip(&mut s, b"PI 1 CONNECT\r\n").await;
    let idle = Duration::from_millis(4500);
    tokio::time::sleep(idle).await;
    let data: Vec<u8> = (0..256 * 1024u32).map(|i| (i * 31 + 7) as u8).collect();
    let start = Instant::now();
    round_trip(&mut s, &data).await;
    println!(
        "idle: {idle:?} silent (keepalive 1 s), then 256 KiB echoed in {:?}",
        start.elapsed()
    );
    tokio::time::sleep(idle).await;
    round_trip(&mut s, b"PI 2 RELEASE\r\n").await;
    s.shutdown().await.expect("half-close");
    let mut rest = Vec::new();
    tokio::time::timeout(READ_LIMIT, s.read_to_end(&mut rest))
        .await
        .expect("no close within 5 s after half-close")
        .expect("read to end");
    assert!(rest.is_empty(), "unexpected bytes after the last echo");
}
