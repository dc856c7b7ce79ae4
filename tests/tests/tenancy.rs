//! Rights per agent identity at the DMZ (`[policy.agents."ID"]`, `policy.default`): which
//! services an identity may open or join, which destinations it may have dialed, what a reload
//! takes away, readiness that means "partners can connect", and what a refused agent hears.
//! Real processes and a dev PKI with a third identity.

#[path = "tenancy/flood.rs"]
mod flood;
#[path = "tenancy/refusals.rs"]
mod refusals;

use std::net::SocketAddr;
use std::time::Duration;

use relay_e2e::process::{Captured, Dmz, curl};
use relay_e2e::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Bound on every wait of these tests.
const LIMIT: Duration = Duration::from_secs(20);

/// The identities of these tests: two engines and an operations agent.
const IDENTITIES: [&str; 3] = ["engine-1", "engine-2", "ops-3"];

fn local(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// Rules for `agent`: the listen rules, and the destinations.
fn rules(agent: &str, listen: &[String], connect: &[String]) -> AgentRules {
    AgentRules {
        agent: agent.into(),
        listen_allow: listen.to_vec(),
        connect_allow: connect.to_vec(),
    }
}

/// Starts an agent process with identity `identity` from `opts`; its log is captured.
fn agent(pki: &Pki, identity: &str, mut opts: AgentOptions) -> (Captured, AgentOptions) {
    opts.identity = identity.into();
    let path = pki.write(
        &format!("agent-{identity}-{}.toml", opts.admin.port()),
        &opts.toml(pki),
    );
    (Captured::spawn("relay-internal", &path), opts)
}

/// The tag byte of the target that answers a session on `public`.
async fn tag_of(public: SocketAddr) -> Result<u8, String> {
    let mut s = tokio::time::timeout(LIMIT, TcpStream::connect(public))
        .await
        .map_err(|_| "connect timed out".to_owned())?
        .map_err(|e| format!("connect: {e}"))?;
    let mut tag = [0u8; 1];
    tokio::time::timeout(LIMIT, s.read_exact(&mut tag))
        .await
        .map_err(|_| "no tag within the limit".to_owned())?
        .map_err(|e| format!("read tag: {e}"))?;
    s.write_all(b"x").await.map_err(|e| e.to_string())?;
    Ok(tag[0])
}

/// `/readyz` of `admin`: status and body.
async fn ready(admin: SocketAddr) -> (u16, String) {
    http_get(admin, "/readyz")
        .await
        .unwrap_or((0, String::new()))
}

/// Identity `engine-2` declares a port inside the global rules but outside its own table:
/// rejected with a reason that names it and its table, counted; the listener stays closed and
/// `engine-2` is not ready; `engine-1` (no table: the global rules) is unaffected. The DMZ is not
/// ready while the only agent connected has had every service rejected, with the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_declaration_outside_the_identitys_own_table_is_rejected() {
    let pki = Pki::with_agents(&IDENTITIES);
    let (own, outside, port_a) = (free_port(), free_port(), free_port());
    let dmz = Dmz::start(
        &pki,
        DmzOptions {
            agent_rules: vec![rules("engine-2", &[format!("127.0.0.1:{own}")], &[])],
            ..Default::default()
        },
    )
    .await;
    let echo = targets::echo().await;
    let (b, b_opts) = agent(
        &pki,
        "engine-2",
        AgentOptions::new(
            dmz.opts.tunnel,
            vec![Service::new("b-svc", outside, echo.addr)],
        ),
    );
    let line = b
        .wait_line(&["service rejected by the DMZ", "b-svc"], LIMIT)
        .await;
    println!("engine-2: {line}");
    assert!(
        line.contains(r#"for agent \"engine-2\""#) || line.contains(r#"for agent "engine-2""#),
        "the reason names the identity: {line}"
    );
    assert!(
        line.contains("policy.agents") && line.contains("listen_allow"),
        "the reason names the rule set used: {line}"
    );
    assert!(!accepts(local(outside)).await, "the listener opened");
    assert!(dmz.wait_rejections("service_not_allowed", 1.0).await >= 1.0);
    let (status, body) = ready(dmz.opts.admin).await;
    println!("DMZ /readyz with engine-2 alone: {status} {body}");
    assert_eq!(status, 503);
    assert!(body.contains("no public listener is open"), "{body}");
    let agent_ready = wait_for(LIMIT, || async { ready(b_opts.admin).await.0 == 503 }).await;
    let (status, body) = ready(b_opts.admin).await;
    println!("engine-2 /readyz: {status} {body}");
    assert!(agent_ready.is_some(), "engine-2 says it is ready: {body}");
    assert!(
        body.contains("rejected every service") && body.contains("b-svc"),
        "{body}"
    );

    // engine-1 has no table: the global rules let it open its service, and the node is ready.
    let _a = agent(
        &pki,
        "engine-1",
        AgentOptions::new(
            dmz.opts.tunnel,
            vec![Service::new("a-svc", port_a, echo.addr)],
        ),
    );
    wait_open(local(port_a), LIMIT).await;
    let (status, _) = ready(dmz.opts.admin).await;
    assert_eq!(status, 200, "DMZ ready once a public listener is open");
    assert!(!accepts(local(outside)).await, "engine-2's port opened");
}

/// `engine-2` declares `engine-1`'s service (same name, address and allow) without the right to
/// its address: rejected, and all of 100 partner sessions reach `engine-1`'s target.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn joining_another_identitys_service_needs_its_own_right() {
    let pki = Pki::with_agents(&IDENTITIES);
    let port = free_port();
    let dmz = Dmz::start(
        &pki,
        DmzOptions {
            agent_rules: vec![
                rules("engine-1", &[format!("127.0.0.1:{port}")], &[]),
                rules("engine-2", &["127.0.0.1:1024".into()], &[]),
            ],
            ..Default::default()
        },
    )
    .await;
    let (ta, tb) = (
        targets::tagged_echo(b'A').await,
        targets::tagged_echo(b'B').await,
    );
    let _a = agent(
        &pki,
        "engine-1",
        AgentOptions::new(dmz.opts.tunnel, vec![Service::new("shared", port, ta.addr)]),
    );
    wait_open(local(port), LIMIT).await;
    let (b, _) = agent(
        &pki,
        "engine-2",
        AgentOptions::new(dmz.opts.tunnel, vec![Service::new("shared", port, tb.addr)]),
    );
    let line = b
        .wait_line(&["service rejected by the DMZ", "shared"], LIMIT)
        .await;
    println!("engine-2: {line}");
    assert!(line.contains("engine-2"), "{line}");
    let mut tags = Vec::new();
    for _ in 0..100 {
        tags.push(tag_of(local(port)).await.expect("session through engine-1"));
    }
    let on_b = tags.iter().filter(|t| **t == b'B').count();
    assert_eq!(on_b, 0, "{on_b} of 100 sessions reached engine-2's target");
}

/// Two identities whose tables both cover the service serve it together: sessions spread over
/// both; when one agent is killed, the other carries every session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_identities_with_the_right_share_a_service() {
    let pki = Pki::with_agents(&IDENTITIES);
    let port = free_port();
    let listen = vec![format!("127.0.0.1:{port}")];
    let dmz = Dmz::start(
        &pki,
        DmzOptions {
            agent_rules: vec![
                rules("engine-1", &listen, &[]),
                rules("engine-2", &listen, &[]),
            ],
            policy_default: Some("deny"),
            ..Default::default()
        },
    )
    .await;
    let (ta, tb) = (
        targets::tagged_echo(b'A').await,
        targets::tagged_echo(b'B').await,
    );
    let (a, _) = agent(
        &pki,
        "engine-1",
        AgentOptions::new(
            dmz.opts.tunnel,
            vec![Service::new("cluster", port, ta.addr)],
        ),
    );
    let (b, _) = agent(
        &pki,
        "engine-2",
        AgentOptions::new(
            dmz.opts.tunnel,
            vec![Service::new("cluster", port, tb.addr)],
        ),
    );
    for who in [&a, &b] {
        who.wait_line(&["tunnel up"], LIMIT).await;
    }
    wait_open(local(port), LIMIT).await;
    let mut tags = Vec::new();
    for _ in 0..100 {
        tags.push(tag_of(local(port)).await.expect("session"));
    }
    let on_a = tags.iter().filter(|t| **t == b'A').count();
    println!(
        "100 sessions: {on_a} on engine-1, {} on engine-2",
        100 - on_a
    );
    assert!(
        (10..=90).contains(&on_a),
        "not spread: {on_a} of 100 on engine-1"
    );
    drop(a);
    // Once the DMZ has seen engine-1 go (its tunnel closes with the process), every session
    // reaches engine-2.
    let after = wait_for(LIMIT, || async { tag_of(local(port)).await == Ok(b'B') }).await;
    assert!(after.is_some(), "sessions never moved to engine-2");
    for i in 0..50 {
        assert_eq!(
            tag_of(local(port)).await,
            Ok(b'B'),
            "session {i} after the kill"
        );
    }
}

/// Outbound per identity: `engine-1` may reach the partner, `engine-2` may not (403, counted);
/// after a reload that removes `engine-1`'s right, its next session is refused too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbound_destinations_follow_the_identity_that_asks() {
    let pki = Pki::with_agents(&IDENTITIES);
    let partner = targets::http("hello partner\n").await;
    let allowed = format!("127.0.0.1:{}", partner.addr.port());
    let mut opts = DmzOptions {
        connect_allow: vec![allowed.clone()],
        agent_rules: vec![
            rules("engine-1", &[], std::slice::from_ref(&allowed)),
            rules("engine-2", &[], &[]),
        ],
        ..Default::default()
    };
    let dmz = Dmz::start(&pki, opts.clone()).await;
    let mut proxies = Vec::new();
    let mut agents = Vec::new();
    for identity in ["engine-1", "engine-2"] {
        let proxy = local(free_port());
        let mut o = AgentOptions::new(dmz.opts.tunnel, vec![]);
        o.extra = format!("\n[outbound_proxy]\nlisten = \"{proxy}\"\n");
        agents.push(agent(&pki, identity, o));
        proxies.push(proxy);
    }
    let through = |proxy: SocketAddr| {
        let url = format!("http://{}/", partner.addr);
        async move {
            curl(vec![
                "-o".into(),
                "/dev/null".into(),
                "-w".into(),
                "%{http_connect}".into(),
                "--proxytunnel".into(),
                "--proxy".into(),
                format!("http://{proxy}"),
                url,
            ])
            .await
            .1
        }
    };
    let a_ok = wait_for(LIMIT, || async { through(proxies[0]).await == "200" }).await;
    assert!(
        a_ok.is_some(),
        "engine-1 never reached the partner: {}",
        through(proxies[0]).await
    );
    assert_eq!(through(proxies[1]).await, "403", "engine-2 must be refused");
    assert!(dmz.wait_rejections("policy_denied", 1.0).await >= 1.0);
    let audit = agents[1]
        .0
        .wait_line(&["relay::audit", "policy_denied"], LIMIT)
        .await;
    println!("engine-2 audit: {audit}");

    // Reload without engine-1's right: its next session is refused.
    opts.agent_rules[0].connect_allow.clear();
    pki.write(
        &format!("dmz-{}.toml", opts.tunnel.port()),
        &opts.toml(&pki),
    );
    let (status, body) = http_post(dmz.opts.admin, "/reload", LIMIT)
        .await
        .expect("reload");
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        through(proxies[0]).await,
        "403",
        "engine-1 after losing its right"
    );
}

/// `policy.default = "deny"`: an identity without a table is refused as a whole (the agent logs
/// the DMZ's reason), opens nothing and dials nothing; one with a table is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_deny_leaves_an_identity_without_a_table_nothing() {
    let pki = Pki::with_agents(&IDENTITIES);
    let partner = targets::http("hello partner\n").await;
    let (port1, port3) = (free_port(), free_port());
    let dmz = Dmz::start(
        &pki,
        DmzOptions {
            connect_allow: vec!["127.0.0.0/8:*".into()],
            policy_default: Some("deny"),
            agent_rules: vec![rules("engine-1", &[format!("127.0.0.1:{port1}")], &[])],
            ..Default::default()
        },
    )
    .await;
    let echo = targets::echo().await;
    let proxy = local(free_port());
    let mut o = AgentOptions::new(dmz.opts.tunnel, vec![Service::new("ops", port3, echo.addr)]);
    o.extra = format!("\n[outbound_proxy]\nlisten = \"{proxy}\"\n");
    let (ops, _) = agent(&pki, "ops-3", o);
    let line = ops
        .wait_line(
            &["the DMZ refused this agent", "no rights on this node"],
            LIMIT,
        )
        .await;
    println!("ops-3: {line}");
    assert!(
        line.contains("ops-3") && line.contains("policy.default"),
        "{line}"
    );
    assert!(dmz.wait_rejections("no_rights", 1.0).await >= 1.0);
    assert!(!accepts(local(port3)).await, "ops-3 opened a port");
    let (code, body) = curl(vec![
        "--proxytunnel".into(),
        "--proxy".into(),
        format!("http://{proxy}"),
        format!("http://{}/", partner.addr),
    ])
    .await;
    assert!(
        body != "hello partner\n",
        "ops-3 dialed the partner (curl {code})"
    );

    let _e1 = agent(
        &pki,
        "engine-1",
        AgentOptions::new(dmz.opts.tunnel, vec![Service::new("e1", port1, echo.addr)]),
    );
    wait_open(local(port1), LIMIT).await;
}

/// A reload that takes a service's address out of an identity's table withdraws that identity
/// from the service: the listener closes (no one else serves it), the agent hears why, and a
/// session already running finishes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_removes_a_right_withdraws_the_service() {
    let pki = Pki::with_agents(&IDENTITIES);
    let port = free_port();
    let mut opts = DmzOptions {
        agent_rules: vec![rules("engine-1", &[format!("127.0.0.1:{port}")], &[])],
        ..Default::default()
    };
    let dmz = Dmz::start(&pki, opts.clone()).await;
    let echo = targets::echo().await;
    let (a, _) = agent(
        &pki,
        "engine-1",
        AgentOptions::new(dmz.opts.tunnel, vec![Service::new("svc", port, echo.addr)]),
    );
    wait_open(local(port), LIMIT).await;
    let mut running = TcpStream::connect(local(port)).await.expect("session");
    running.write_all(b"before").await.unwrap();
    let mut buf = [0u8; 6];
    running.read_exact(&mut buf).await.unwrap();

    opts.agent_rules[0].listen_allow = vec!["127.0.0.1:1024".into()];
    pki.write(
        &format!("dmz-{}.toml", opts.tunnel.port()),
        &opts.toml(&pki),
    );
    let (status, body) = http_post(dmz.opts.admin, "/reload", LIMIT)
        .await
        .expect("reload");
    println!("reload: {status} {body}");
    assert_eq!(status, 200, "{body}");
    // One per tunnel connection of the agent that declared it.
    assert!(
        body.contains("2 service declaration(s) withdrawn"),
        "{body}"
    );
    wait_closed(local(port), LIMIT).await;
    let line = a
        .wait_line(&["service rejected by the DMZ", "svc"], LIMIT)
        .await;
    println!("engine-1: {line}");
    running.write_all(b"after!").await.unwrap();
    running
        .read_exact(&mut buf)
        .await
        .expect("the running session goes on");
    assert_eq!(&buf, b"after!");
}

/// The config check names every problem of the policy tables.
#[test]
fn policy_tables_are_checked() {
    let pki = Pki::with_agents(&IDENTITIES);
    let mut opts = DmzOptions {
        agents: Some(vec!["engine-1".into()]),
        policy_default: Some("maybe"),
        agent_rules: vec![
            rules("engine-1", &["nonsense".into()], &[]),
            rules("engine-9", &[], &[]),
        ],
        ..Default::default()
    };
    opts.limits.clear();
    let path = pki.write("dmz-policy.toml", &opts.toml(&pki));
    let err = relay_dmz::DmzConfig::load(&path)
        .expect_err("a config with bad policy tables")
        .to_string();
    println!("{err}");
    for expected in [
        "policy.default: unknown value \"maybe\"",
        "policy.agents.\"engine-1\".listen_allow[0]: invalid address rule",
        "policy.agents.\"engine-9\": \"engine-9\" is not in tunnel.agents",
    ] {
        assert!(err.contains(expected), "{expected:?} missing:\n{err}");
    }
}
