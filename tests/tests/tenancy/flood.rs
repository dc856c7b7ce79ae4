//! The tunnel port under a flood of slow connections from the agent's own address (a NAT on the
//! inner firewall makes every internal host one address): the real agent still registers at once.

use std::time::Instant;

use super::*;

/// Slow connections in all: more than four times a source's share of pending handshakes (64).
const SLOW: usize = 300;
/// Of which opened before the agent starts; the rest while it starts.
const BEFORE: usize = 200;

/// A connection to `tunnel` from 127.0.0.1 that sends one byte of a ClientHello, then nothing.
async fn open_slow(tunnel: SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(tunnel)
        .await
        .expect("connect to the tunnel port");
    s.write_all(&[0x16]).await.expect("one byte");
    s
}

/// 300 slow connections from 127.0.0.1, 200 before and 100 while an agent on 127.0.0.1 starts:
/// the agent registers within 2 s and its sessions work; a tunnel that was up before the flood
/// never notices; every slow connection is cut and counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_registers_through_a_slow_flood_from_its_own_address() {
    let pki = Pki::with_agents(&IDENTITIES);
    let dmz = Dmz::start(&pki, DmzOptions::default()).await;
    let tunnel = dmz.opts.tunnel;
    let echo = targets::echo().await;
    let (port_up, port_new) = (free_port(), free_port());
    let (up, _) = agent(
        &pki,
        "engine-2",
        AgentOptions::new(tunnel, vec![Service::new("up", port_up, echo.addr)]),
    );
    wait_open(local(port_up), LIMIT).await;

    let mut slow = Vec::with_capacity(SLOW);
    for _ in 0..BEFORE {
        slow.push(open_slow(tunnel).await);
    }
    let started = Instant::now();
    let (new, _) = agent(
        &pki,
        "engine-1",
        AgentOptions::new(tunnel, vec![Service::new("new", port_new, echo.addr)]),
    );
    let during = tokio::spawn(async move {
        let mut more = Vec::new();
        for _ in BEFORE..SLOW {
            more.push(open_slow(tunnel).await);
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        more
    });
    wait_open(local(port_new), LIMIT).await;
    let registered = started.elapsed();
    slow.extend(during.await.expect("flood task"));
    println!(
        "{SLOW} slow connections from 127.0.0.1 ({BEFORE} before the agent started): the agent's service opened {registered:?} after its start"
    );
    assert!(
        registered < Duration::from_secs(2),
        "the agent needed {registered:?} to register; log:\n{}",
        new.tail(20)
    );
    for port in [port_new, port_up] {
        let mut s = TcpStream::connect(local(port)).await.expect("partner");
        s.write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 4];
        tokio::time::timeout(LIMIT, s.read_exact(&mut buf))
            .await
            .expect("echo in time")
            .expect("echo");
        assert_eq!(&buf, b"ping");
    }

    // Cut: evicted by newer ones, or after the ClientHello deadline (3 s).
    tokio::time::sleep(relay_dmz::tunnel::HELLO_TIMEOUT + Duration::from_secs(1)).await;
    let mut open = 0;
    for s in &mut slow {
        let mut b = [0u8; 16];
        if let Err(_) | Ok(Ok(1..)) =
            tokio::time::timeout(Duration::from_millis(50), s.read(&mut b)).await
        {
            open += 1;
        }
    }
    let evicted = dmz.rejections("pending_evicted").await;
    let timed_out = dmz.rejections("tls_handshake").await;
    println!(
        "slow connections still open after {:?}: {open}; pending_evicted {evicted}, tls_handshake {timed_out}",
        relay_dmz::tunnel::HELLO_TIMEOUT + Duration::from_secs(1)
    );
    assert_eq!(open, 0, "slow connections left open");
    assert!(evicted + timed_out >= SLOW as f64, "not all counted");
    assert!(
        !up.text().contains("tunnel lost"),
        "the tunnel up before the flood noticed it:\n{}",
        up.tail(20)
    );
    assert!(
        !dmz.proc.text().contains("agent tunnel down"),
        "a tunnel went down:\n{}",
        dmz.proc.tail(20)
    );
}
