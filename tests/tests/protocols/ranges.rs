//! Port-range services: each public port maps to the target port at the same offset, a range
//! that `policy.listen_allow` covers only in part is refused whole, and a range that overlaps
//! another agent's range is refused whole while the first keeps working.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::*;

/// Targets on `n` consecutive ports, each answering `PORT <its port>\n` and closing; the
/// listeners are bound before the function returns, so no other test can take the ports.
async fn port_reporters(n: u16) -> (u16, Vec<tokio::task::JoinHandle<()>>) {
    for _ in 0..50 {
        let first = free_block(n, &[Ipv4Addr::LOCALHOST]);
        let mut listeners = Vec::new();
        for port in first..first + n {
            match TcpListener::bind((Ipv4Addr::LOCALHOST, port)).await {
                Ok(l) => listeners.push(l),
                Err(_) => break,
            }
        }
        if listeners.len() < usize::from(n) {
            continue;
        }
        let tasks = listeners
            .into_iter()
            .map(|listener| {
                tokio::spawn(async move {
                    let port = listener.local_addr().expect("addr").port();
                    while let Ok((mut s, _)) = listener.accept().await {
                        let _ = s.write_all(format!("PORT {port}\n").as_bytes()).await;
                        let _ = s.shutdown().await;
                    }
                })
            })
            .collect();
        return (first, tasks);
    }
    panic!("could not bind {n} consecutive target ports");
}

/// What the target behind public `port` says (`PORT <n>`).
async fn ask(port: u16) -> String {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut s = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(addr))
        .await
        .unwrap_or_else(|_| panic!("connect to {addr} timed out"))
        .unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
    let mut text = String::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut text))
        .await
        .unwrap_or_else(|_| panic!("no answer through {addr} within 5 s"))
        .unwrap_or_else(|e| panic!("read through {addr}: {e}"));
    text.trim().to_owned()
}

fn range(first: u16, n: u16) -> String {
    format!("127.0.0.1:{first}-{}", first + n - 1)
}

/// Public port `first + i` reaches target port `target_first + i`: three ports of a five-port
/// range land on three distinct targets that report their own port.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn range_ports_map_to_the_target_at_the_same_offset() {
    const N: u16 = 5;
    let (target_first, tasks) = port_reporters(N).await;
    let public_first = free_block(N, &[Ipv4Addr::LOCALHOST]);
    let pki = Pki::new();
    let dmz_opts = DmzOptions::default();
    let _dmz = start_dmz(&pki, &dmz_opts).await;
    let service = Service {
        name: "range-map".into(),
        listen: range(public_first, N),
        target: range(target_first, N),
        extra: String::new(),
    };
    let _agent = start_agent(&pki, &AgentOptions::new(dmz_opts.tunnel, vec![service])).await;
    wait_open(
        SocketAddr::from(([127, 0, 0, 1], public_first)),
        START_LIMIT,
    )
    .await;

    for i in [0, 2, N - 1] {
        let answer = ask(public_first + i).await;
        assert_eq!(
            answer,
            format!("PORT {}", target_first + i),
            "public port {} (offset {i}) reached the wrong target",
            public_first + i
        );
    }
    for t in tasks {
        t.abort();
    }
}

/// `policy.listen_allow` ends in the middle of the range: the whole service is refused and no
/// port of it opens, not even the allowed half, while a single-port service of the same
/// registration opens (which shows the registration was answered).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn range_only_partly_allowed_is_refused_whole() {
    const N: u16 = 21;
    let echo = targets::echo().await;
    let first = free_block(N, &[Ipv4Addr::LOCALHOST]);
    let sentinel = free_port();
    let pki = Pki::new();
    let dmz_opts = DmzOptions {
        listen_allow: vec![
            format!("127.0.0.0/8:1024-{}", first + 10),
            format!("127.0.0.0/8:{sentinel}"),
        ],
        ..DmzOptions::default()
    };
    let _dmz = start_dmz(&pki, &dmz_opts).await;
    let services = vec![
        Service {
            name: "range-part".into(),
            listen: range(first, N),
            target: range(first, N),
            extra: String::new(),
        },
        Service::new("sentinel", sentinel, echo.addr),
    ];
    let _agent = start_agent(&pki, &AgentOptions::new(dmz_opts.tunnel, services)).await;
    wait_open(SocketAddr::from(([127, 0, 0, 1], sentinel)), START_LIMIT).await;

    for round in 0..2 {
        for port in first..first + N {
            assert!(
                !accepts(SocketAddr::from(([127, 0, 0, 1], port))).await,
                "port {port} of a range that listen_allow covers only up to {} is open (check {round})",
                first + 10
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Agent engine-1 serves range A..A+9; agent engine-2 then declares A+5..A+14. The second
/// service is refused whole (A+10..A+14 stay closed) and A..A+9 keep reaching engine-1's
/// targets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlapping_range_from_another_agent_is_refused() {
    const N: u16 = 10;
    let echo = targets::echo().await;
    let (target_first, tasks) = port_reporters(N).await;
    let first = free_block(N + 5, &[Ipv4Addr::LOCALHOST]);
    let pki = Pki::new();
    let dmz_opts = DmzOptions::default();
    let _dmz = start_dmz(&pki, &dmz_opts).await;
    let first_service = Service {
        name: "data-a".into(),
        listen: range(first, N),
        target: range(target_first, N),
        extra: String::new(),
    };
    let _agent1 = start_agent(
        &pki,
        &AgentOptions::new(dmz_opts.tunnel, vec![first_service]),
    )
    .await;
    wait_open(SocketAddr::from(([127, 0, 0, 1], first)), START_LIMIT).await;

    let sentinel = free_port();
    let mut second = AgentOptions::new(
        dmz_opts.tunnel,
        vec![
            Service {
                name: "data-b".into(),
                listen: range(first + 5, N),
                target: range(target_first, N),
                extra: String::new(),
            },
            Service::new("sentinel-b", sentinel, echo.addr),
        ],
    );
    second.identity = "engine-2".into();
    let _agent2 = start_agent(&pki, &second).await;
    wait_open(SocketAddr::from(([127, 0, 0, 1], sentinel)), START_LIMIT).await;

    for port in first + N..first + N + 5 {
        assert!(
            !accepts(SocketAddr::from(([127, 0, 0, 1], port))).await,
            "port {port}: the overlapping range of engine-2 was opened in part"
        );
    }
    for i in [0, 5, N - 1] {
        assert_eq!(
            ask(first + i).await,
            format!("PORT {}", target_first + i),
            "port {} no longer reaches engine-1's service",
            first + i
        );
    }
    for t in tasks {
        t.abort();
    }
}
