//! The shortest path through the relay: gating opens on registration, bytes pass both ways,
//! gating closes when the agent goes.

use std::net::SocketAddr;
use std::time::Duration;

use relay_e2e::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_through_the_relay_and_listener_follows_the_agent() {
    let pki = Pki::new();
    let echo = targets::echo().await;
    let dmz_opts = DmzOptions::default();
    let _dmz = start_dmz(&pki, &dmz_opts).await;
    let port = free_port();
    let public: SocketAddr = ([127, 0, 0, 1], port).into();
    assert!(
        !accepts(public).await,
        "no agent yet: the public port must refuse"
    );

    let agent = start_agent(
        &pki,
        &AgentOptions::new(dmz_opts.tunnel, vec![Service::new("echo", port, echo.addr)]),
    )
    .await;
    wait_open(public, Duration::from_secs(10)).await;

    let mut s = TcpStream::connect(public).await.unwrap();
    let data: Vec<u8> = (0..1024 * 1024u32).map(|i| (i * 7 + 3) as u8).collect();
    let (mut r, mut w) = s.split();
    let write = async {
        w.write_all(&data).await.unwrap();
        w.shutdown().await.unwrap();
    };
    let mut back = Vec::new();
    let read = r.read_to_end(&mut back);
    let (_, n) = tokio::join!(write, read);
    n.unwrap();
    assert_eq!(back.len(), data.len());
    assert!(back == data, "echoed bytes differ");

    agent.stop().await.unwrap();
    wait_closed(public, Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_subcommand_follows_readiness() {
    let health = |admin: SocketAddr| async move {
        tokio::task::spawn_blocking(move || {
            std::process::Command::new(bin("relay-dmz"))
                .args(["health", "--admin", &admin.to_string()])
                .output()
                .expect("run relay-dmz health")
        })
        .await
        .unwrap()
    };
    let pki = Pki::new();
    let echo = targets::echo().await;
    let dmz_opts = DmzOptions::default();
    let _dmz = start_dmz(&pki, &dmz_opts).await;
    let out = health(dmz_opts.admin).await;
    assert_eq!(out.status.code(), Some(1), "no agent: not ready");
    assert!(String::from_utf8_lossy(&out.stderr).contains("no agent connected"));
    let port = free_port();
    let _agent = start_agent(
        &pki,
        &AgentOptions::new(dmz_opts.tunnel, vec![Service::new("echo", port, echo.addr)]),
    )
    .await;
    wait_open(([127, 0, 0, 1], port).into(), Duration::from_secs(10)).await;
    assert_eq!(
        health(dmz_opts.admin).await.status.code(),
        Some(0),
        "agent registered: ready"
    );
    let unused: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    assert_eq!(
        health(unused).await.status.code(),
        Some(1),
        "nothing listening: unhealthy"
    );
}
