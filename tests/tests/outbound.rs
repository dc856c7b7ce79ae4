//! Outbound sessions: engine -> agent (fixed mapping, HTTP CONNECT, SOCKS5) -> DMZ -> partner,
//! under the DMZ's `policy.connect_allow`.

use std::net::SocketAddr;
use std::time::Duration;

use relay_e2e::process::curl;
use relay_e2e::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

struct Setup {
    _pki: Pki,
    _partner: targets::Target,
    partner: SocketAddr,
    dmz_admin: SocketAddr,
    fixed: SocketAddr,
    proxy: SocketAddr,
    _dmz: InProcess,
    _agent: InProcess,
}

async fn setup() -> Setup {
    let pki = Pki::new();
    let partner_target = targets::http("hello partner\n").await;
    let partner = partner_target.addr;
    let dmz_opts = DmzOptions {
        connect_allow: vec![
            format!("127.0.0.1:{}", partner.port()),
            "localhost:*".into(),
        ],
        ..Default::default()
    };
    let dmz = start_dmz(&pki, &dmz_opts).await;
    let fixed: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let proxy: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let mut agent_opts = AgentOptions::new(dmz_opts.tunnel, vec![]);
    agent_opts.extra = format!(
        "\n[[outbound]]\nname = \"partner-x\"\nlisten = \"{fixed}\"\ntarget = \"{partner}\"\n\n[outbound_proxy]\nlisten = \"{proxy}\"\n"
    );
    let agent = start_agent(&pki, &agent_opts).await;
    wait_for(Duration::from_secs(10), || async {
        matches!(http_get(agent_opts.admin, "/readyz").await, Ok((200, _)))
    })
    .await
    .expect("agent ready");
    Setup {
        _pki: pki,
        _partner: partner_target,
        partner,
        dmz_admin: dmz_opts.admin,
        fixed,
        proxy,
        _dmz: dmz,
        _agent: agent,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fixed_mapping_http_connect_and_socks5_reach_the_partner() {
    let s = setup().await;
    // Outbound carriers come up right after the inbound ones; allow them a moment.
    let fixed_ok = wait_for(Duration::from_secs(10), || async {
        curl(vec![format!("http://{}/", s.fixed)]).await.1 == "hello partner\n"
    })
    .await;
    assert!(
        fixed_ok.is_some(),
        "fixed outbound mapping never reached the partner"
    );

    // curl sends a plain GET to an HTTP proxy unless told to tunnel: the proxy only tunnels.
    let (_, body) = curl(vec![
        "--proxy".into(),
        format!("http://{}", s.proxy),
        format!("http://{}/", s.partner),
    ])
    .await;
    assert_eq!(body, "this proxy only supports CONNECT\n");
    let (code, body) = curl(vec![
        "--proxytunnel".into(),
        "--proxy".into(),
        format!("http://{}", s.proxy),
        format!("http://{}/", s.partner),
    ])
    .await;
    assert_eq!(
        (code, body.as_str()),
        (0, "hello partner\n"),
        "HTTP CONNECT"
    );

    let (code, body) = curl(vec![
        "--proxy".into(),
        format!("socks5h://{}", s.proxy),
        format!("http://localhost:{}/", s.partner.port()),
    ])
    .await;
    assert_eq!(
        (code, body.as_str()),
        (0, "hello partner\n"),
        "SOCKS5 with a domain name"
    );
    let (code, body) = curl(vec![
        "--proxy".into(),
        format!("socks5://{}", s.proxy),
        format!("http://{}/", s.partner),
    ])
    .await;
    assert_eq!(
        (code, body.as_str()),
        (0, "hello partner\n"),
        "SOCKS5 with an IPv4 address"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destinations_outside_connect_allow_are_refused_and_counted() {
    let s = setup().await;
    let denied = format!("127.0.0.1:{}", free_port());
    // Wait for outbound carriers through a destination that is allowed.
    wait_for(Duration::from_secs(10), || async {
        curl(vec![
            "--proxytunnel".into(),
            "--proxy".into(),
            format!("http://{}", s.proxy),
            format!("http://{}/", s.partner),
        ])
        .await
        .0 == 0
    })
    .await
    .expect("outbound carriers up");

    let mut engine = TcpStream::connect(s.proxy).await.unwrap();
    engine
        .write_all(format!("CONNECT {denied} HTTP/1.1\r\nHost: {denied}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut answer = vec![0u8; 512];
    let n = tokio::time::timeout(Duration::from_secs(10), engine.read(&mut answer))
        .await
        .unwrap()
        .unwrap();
    let head = String::from_utf8_lossy(&answer[..n]);
    assert!(
        head.starts_with("HTTP/1.1 403"),
        "expected 403, got {head:?}"
    );

    let mut engine = TcpStream::connect(s.proxy).await.unwrap();
    let port = denied.rsplit(':').next().unwrap().parse::<u16>().unwrap();
    engine.write_all(&[5, 1, 0]).await.unwrap();
    let mut hello = [0u8; 2];
    engine.read_exact(&mut hello).await.unwrap();
    assert_eq!(hello, [5, 0]);
    let mut req = vec![5, 1, 0, 1, 127, 0, 0, 1];
    req.extend_from_slice(&port.to_be_bytes());
    engine.write_all(&req).await.unwrap();
    let mut reply = [0u8; 10];
    tokio::time::timeout(Duration::from_secs(10), engine.read_exact(&mut reply))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        reply[1], 0x02,
        "SOCKS5 reply must be 0x02 (not allowed by ruleset)"
    );

    let (_, metrics) = http_get(s.dmz_admin, "/metrics").await.unwrap();
    let denied_count = metric(
        &metrics,
        "relay_rejections_total",
        &["reason=\"policy_denied\""],
    )
    .unwrap_or(0.0);
    assert!(
        denied_count >= 2.0,
        "policy denials counted on the DMZ: {denied_count}"
    );
}

/// Outbound sessions of a mapping pinned with `via` use only the listed DMZ nodes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn via_pins_an_outbound_mapping_to_its_nodes() {
    let pki = Pki::new();
    let partner = targets::http("hello partner\n").await;
    let allow = vec![format!("127.0.0.1:{}", partner.addr.port())];
    let dmz1 = DmzOptions {
        connect_allow: allow.clone(),
        ..Default::default()
    };
    let dmz2 = DmzOptions {
        connect_allow: allow,
        ..Default::default()
    };
    // Processes, so each node's metrics are its own.
    let _d1 = spawn_dmz(&pki, &dmz1);
    let _d2 = spawn_dmz(&pki, &dmz2);
    let fixed: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let mut opts = AgentOptions::new(dmz1.tunnel, vec![]);
    opts.dmz = vec![dmz1.tunnel, dmz2.tunnel];
    opts.extra = format!(
        "\n[[outbound]]\nname = \"pinned\"\nlisten = \"{fixed}\"\ntarget = \"{}\"\nvia = [\"{}\"]\n",
        partner.addr, dmz2.tunnel
    );
    let _agent = start_agent(&pki, &opts).await;
    // Both nodes connected (inbound and outbound carriers on each).
    for node in [dmz1.admin, dmz2.admin] {
        wait_for(Duration::from_secs(15), || async move {
            metric(
                &metrics_text(node).await,
                "relay_tunnels_connected",
                &["agent=\"engine-1\""],
            ) == Some(4.0)
        })
        .await
        .expect("agent connected to both nodes");
    }
    for _ in 0..6 {
        let (code, body) = curl(vec![format!("http://{fixed}/")]).await;
        assert_eq!((code, body.as_str()), (0, "hello partner\n"));
    }
    let outbound = |text: &str| {
        metric(
            text,
            "relay_sessions_total",
            &["service=\"pinned\"", "result=\"ok\""],
        )
    };
    // A session is counted when it ends, which can be a moment after curl has its answer.
    let all_on_node_2 = wait_for(Duration::from_secs(10), || async {
        outbound(&metrics_text(dmz2.admin).await) == Some(6.0)
    })
    .await;
    assert!(
        all_on_node_2.is_some(),
        "node 2 carried every session: it counted {:?} of 6",
        outbound(&metrics_text(dmz2.admin).await)
    );
    assert_eq!(
        outbound(&metrics_text(dmz1.admin).await),
        None,
        "node 1 is not in via: no session"
    );
}

/// An agent whose `[[outbound]]` port is taken fails to start with an error naming the mapping
/// and the port, and leaves nothing running behind it: its admin port is free again at once
/// (in one process, an agent started again after fixing the config binds it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_whose_outbound_port_is_taken_fails_and_leaves_nothing_running() {
    let pki = Pki::new();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = taken.local_addr().unwrap();
    let nowhere = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let mut opts = AgentOptions::new(nowhere, vec![]);
    opts.extra = format!(
        "\n[[outbound]]\nname = \"partner-x\"\nlisten = \"{port}\"\ntarget = \"127.0.0.1:9\"\n"
    );
    let agent = start_agent(&pki, &opts).await;
    let err = tokio::time::timeout(Duration::from_secs(10), agent.stop())
        .await
        .expect("run returns")
        .expect_err("the port is taken");
    let text = err.to_string();
    assert!(
        text.contains("partner-x") && text.contains(&port.to_string()),
        "the error names the mapping and the port: {text}"
    );
    std::net::TcpListener::bind(opts.admin).unwrap_or_else(|e| {
        panic!(
            "admin port {} still held after the failed start: {e}",
            opts.admin
        )
    });
}
