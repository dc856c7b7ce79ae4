//! What an agent refused by the DMZ logs: the DMZ's own reason after a valid handshake, and the
//! likely causes in words when the handshake itself fails. docs/OPERATIONS.md quotes these lines.

use super::*;

/// An identity outside `tunnel.agents` completes its handshake and hears the DMZ's reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_identity_outside_tunnel_agents_hears_why() {
    let pki = Pki::with_agents(&IDENTITIES);
    let dmz = Dmz::start(
        &pki,
        DmzOptions {
            agents: Some(vec!["engine-1".into()]),
            ..Default::default()
        },
    )
    .await;
    let echo = targets::echo().await;
    let (a, _) = agent(
        &pki,
        "engine-2",
        AgentOptions::new(
            dmz.opts.tunnel,
            vec![Service::new("svc", free_port(), echo.addr)],
        ),
    );
    let line = a.wait_line(&["cannot establish tunnel"], LIMIT).await;
    println!("agent: {line}");
    assert!(
        line.contains(
            r#"the DMZ refused this agent: agent identity \"engine-2\" is not in tunnel.agents"#
        ) || line.contains(
            r#"the DMZ refused this agent: agent identity "engine-2" is not in tunnel.agents"#
        ),
        "{line}"
    );
}

/// A failed handshake names its likely cause: a certificate from a CA the DMZ does not trust,
/// a DMZ certificate that does not name `server_name`, and an address that is not the tunnel
/// port (the DMZ's admin endpoint, which speaks HTTP).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_handshakes_name_their_likely_cause() {
    let pki = Pki::with_agents(&IDENTITIES);
    let other = Pki::new();
    let dmz = Dmz::start(&pki, DmzOptions::default()).await;
    let echo = targets::echo().await;
    let base = AgentOptions::new(
        dmz.opts.tunnel,
        vec![Service::new("svc", free_port(), echo.addr)],
    );
    let text = base.toml(&pki);
    let foreign = text
        .replace(
            &pki.path("engine-1.pem").display().to_string(),
            &other.path("engine-1.pem").display().to_string(),
        )
        .replace(
            &pki.path("engine-1-key.pem").display().to_string(),
            &other.path("engine-1-key.pem").display().to_string(),
        );
    let wrong_name = text.replace(
        "server_name = \"localhost\"",
        "server_name = \"wrong.example\"",
    );
    let admin_port = text.replace(
        &format!("dmz = [\"{}\"]", dmz.opts.tunnel),
        &format!("dmz = [\"{}\"]", dmz.opts.admin),
    );
    for (name, config, hint) in [
        (
            "foreign-ca",
            foreign,
            "did not accept this agent's certificate",
        ),
        ("wrong-name", wrong_name, "does not name server_name"),
        ("admin-port", admin_port, "does not speak TLS"),
    ] {
        assert_ne!(config, text, "{name}: the config did not change");
        let path = pki.write(&format!("agent-{name}.toml"), &config);
        let a = Captured::spawn("relay-internal", &path);
        let line = a.wait_line(&["cannot establish tunnel"], LIMIT).await;
        println!("{name}: {line}");
        assert!(line.contains(hint), "{name}: {hint:?} missing: {line}");
    }
}
