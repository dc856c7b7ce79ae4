//! Mutual TLS of the tunnel: the DMZ refuses agents it must not trust (foreign CA, identity
//! not allowed, no or wrong ALPN, TLS 1.2) and says why in its log and metrics; the agent
//! refuses a DMZ whose certificate does not carry the expected name; no session is resumed.
//! A refused agent never gets a public listener opened.
//!
//! The DMZ runs as a real process here (its stderr and /metrics are its own), so these tests
//! need `cargo build --workspace` first.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use relay_e2e::process::{Captured, Dmz};
use relay_e2e::*;
use relay_tunnel::protocol::{
    self, ALPN_INBOUND_V1, Registration, RegistrationAnswer, ServiceDecl,
};
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, HandshakeKind};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

/// How long a refused agent's service must stay closed.
const STAYS_CLOSED: Duration = Duration::from_secs(3);
/// Generous limit for things that happen at once on an idle machine.
const LIMIT: Duration = Duration::from_secs(20);

fn local(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// A client config presenting `identity`'s certificate, built with the given protocol versions.
fn client_config(
    pki: &Pki,
    identity: &str,
    versions: &[&'static rustls::SupportedProtocolVersion],
    alpn: &[&[u8]],
) -> ClientConfig {
    let chain = pem::certs(&pki.path(&format!("{identity}.pem")));
    let key = pem::key(&pki.path(&format!("{identity}-key.pem")));
    let mut config = ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_protocol_versions(versions)
    .expect("versions")
    .with_root_certificates(pem::roots(pki))
    .with_client_auth_cert(chain, key)
    .expect("client cert");
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    config
}

/// What a hand-made client got from the DMZ.
#[derive(Debug)]
#[allow(
    dead_code,
    reason = "the details are shown through Debug in assertion messages"
)]
enum Outcome {
    /// The TLS handshake failed on the client side.
    HandshakeFailed(std::io::Error),
    /// The handshake passed but the DMZ closed without answering the registration.
    ClosedWithoutAnswer(String),
    /// The DMZ answered the registration (the connection is kept open).
    Answered(RegistrationAnswer, Box<TlsStream<TcpStream>>),
}

/// Dials the DMZ with `config`, and if the handshake passes, registers one service on `port`
/// as a real agent would and reads the answer.
async fn try_register(config: ClientConfig, tunnel: SocketAddr, port: u16) -> Outcome {
    let tcp = tokio::time::timeout(LIMIT, TcpStream::connect(tunnel))
        .await
        .expect("connect timeout")
        .expect("connect to the tunnel listener");
    let connector = TlsConnector::from(Arc::new(config));
    let name = ServerName::try_from("localhost").unwrap();
    let mut tls = match tokio::time::timeout(LIMIT, connector.connect(name, tcp))
        .await
        .expect("TLS handshake timeout")
    {
        Ok(tls) => tls,
        Err(e) => return Outcome::HandshakeFailed(e),
    };
    let registration = Registration {
        instance: "handmade".into(),
        services: vec![ServiceDecl {
            name: "svc".into(),
            listen: format!("127.0.0.1:{port}"),
            allow: vec![],
            accept_proxy: false,
            ..Default::default()
        }],
    };
    // The DMZ may already have closed: a failed write is a refusal too.
    if let Err(e) = protocol::write_message(&mut tls, &registration).await {
        return Outcome::ClosedWithoutAnswer(format!("write: {e}"));
    }
    let read = protocol::read_message::<RegistrationAnswer, _>(&mut tls);
    match tokio::time::timeout(LIMIT, read)
        .await
        .expect("no answer and no close")
    {
        Ok(answer) => Outcome::Answered(answer, Box::new(tls)),
        Err(e) => Outcome::ClosedWithoutAnswer(e.to_string()),
    }
}

/// An agent certificate from another CA (same identity as an allowed agent) is refused during
/// the handshake; the service stays closed; a proper agent is still accepted afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_certificate_from_another_ca_is_refused() {
    let pki = Pki::new();
    let rogue_ca = relay_certs::Ca::new("rogue CA").expect("CA");
    let rogue = rogue_ca
        .issue(&relay_certs::LeafSpec::client("engine-1"))
        .expect("leaf");
    pki.write("rogue.pem", &rogue.cert_pem);
    pki.write("rogue-key.pem", &rogue.key_pem);

    let dmz = Dmz::start(&pki, DmzOptions::default()).await;
    let echo = targets::echo().await;
    let port = free_port();
    let mut opts = AgentOptions::new(dmz.opts.tunnel, vec![Service::new("svc", port, echo.addr)]);
    opts.identity = "rogue".into();
    let _agent = start_agent(&pki, &opts).await;

    let line = dmz
        .proc
        .wait_line(&["agent connection refused", "TLS handshake failed"], LIMIT)
        .await;
    println!("DMZ log: {line}");
    assert!(
        line.contains("UnknownIssuer") || line.contains("unknown issuer"),
        "the reason should say the issuer is unknown: {line}"
    );
    assert_stays_closed(
        local(port),
        STAYS_CLOSED,
        "agent with a foreign certificate",
    )
    .await;
    let n = dmz.wait_rejections("tls_handshake", 1.0).await;
    println!("relay_rejections_total{{reason=\"tls_handshake\"}} = {n}");

    // Positive control: the genuine engine-1 opens its own service on the same DMZ.
    let port2 = free_port();
    let good = AgentOptions::new(
        dmz.opts.tunnel,
        vec![Service::new("good", port2, echo.addr)],
    );
    let _good = start_agent(&pki, &good).await;
    wait_open(local(port2), LIMIT).await;
    assert!(
        !accepts(local(port)).await,
        "the rogue agent's service opened"
    );
}

/// An identity outside `tunnel.agents` is refused with reason unknown_agent; an allowed one
/// is accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_identity_not_in_allow_list_is_refused() {
    let pki = Pki::new();
    let dmz = Dmz::start(
        &pki,
        DmzOptions {
            agents: Some(vec!["engine-2".into()]),
            ..Default::default()
        },
    )
    .await;
    let echo = targets::echo().await;
    let port1 = free_port();
    let opts1 = AgentOptions::new(dmz.opts.tunnel, vec![Service::new("one", port1, echo.addr)]);
    let _agent1 = start_agent(&pki, &opts1).await;

    let line = dmz
        .proc
        .wait_line(&["agent connection refused", "not in tunnel.agents"], LIMIT)
        .await;
    println!("DMZ log: {line}");
    assert!(
        line.contains("engine-1"),
        "the refused identity should be named: {line}"
    );
    assert_stays_closed(
        local(port1),
        STAYS_CLOSED,
        "agent engine-1 not in tunnel.agents",
    )
    .await;
    let n = dmz.wait_rejections("unknown_agent", 1.0).await;
    println!("relay_rejections_total{{reason=\"unknown_agent\"}} = {n}");

    // Positive control: engine-2 is in the list.
    let port2 = free_port();
    let mut opts2 = AgentOptions::new(dmz.opts.tunnel, vec![Service::new("two", port2, echo.addr)]);
    opts2.identity = "engine-2".into();
    let _agent2 = start_agent(&pki, &opts2).await;
    wait_open(local(port2), LIMIT).await;
    dmz.proc
        .wait_line(&["agent tunnel up", "engine-2"], LIMIT)
        .await;
    assert!(!accepts(local(port1)).await, "engine-1's service opened");
    assert!(
        !dmz.proc
            .text()
            .lines()
            .any(|l| l.contains("agent tunnel up") && l.contains("engine-1")),
        "engine-1 got a tunnel:\n{}",
        dmz.proc.text()
    );
}

/// The agent checks the DMZ certificate's name: with `server_name = "wrong.example"` it logs a
/// TLS error and no service opens; the same agent with the right name gets through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dmz_certificate_with_wrong_name_is_refused_by_the_agent() {
    let pki = Pki::new();
    let dmz = Dmz::start(&pki, DmzOptions::default()).await;
    let echo = targets::echo().await;
    let port = free_port();
    let opts = AgentOptions::new(dmz.opts.tunnel, vec![Service::new("svc", port, echo.addr)]);
    let good_text = opts.toml(&pki);
    let wrong_text = good_text.replace(
        "server_name = \"localhost\"",
        "server_name = \"wrong.example\"",
    );
    assert_ne!(
        good_text, wrong_text,
        "the harness config changed: server_name not found"
    );
    let path = pki.write("agent-wrong-name.toml", &wrong_text);
    let agent = Captured::spawn("relay-internal", &path);

    let line = agent
        .wait_line(&["cannot establish tunnel", "TLS handshake"], LIMIT)
        .await;
    println!("agent log: {line}");
    assert!(
        line.contains("wrong.example") || line.contains("NotValidForName"),
        "the agent's error should say the name does not match: {line}"
    );
    assert_stays_closed(local(port), STAYS_CLOSED, "agent that refused the DMZ name").await;
    // The DMZ sees the agent's alert as a failed handshake.
    let dmz_line = dmz
        .proc
        .wait_line(&["agent connection refused", "TLS handshake failed"], LIMIT)
        .await;
    println!("DMZ log: {dmz_line}");
    drop(agent);

    // Positive control: the same config with the right name opens the service.
    let path = pki.write("agent-right-name.toml", &good_text);
    let _agent = Captured::spawn("relay-internal", &path);
    wait_open(local(port), LIMIT).await;
}

/// A client with a valid certificate but no ALPN passes the TLS handshake (rustls does not
/// require ALPN) and must then be refused by the DMZ itself: closed, reason bad_alpn, and its
/// registration never opens a listener. A client offering "h2" is refused as well.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_without_or_with_wrong_alpn_are_refused() {
    let pki = Pki::new();
    let dmz = Dmz::start(&pki, DmzOptions::default()).await;
    let tls13 = &[&rustls::version::TLS13][..];

    let port = free_port();
    let outcome = try_register(
        client_config(&pki, "engine-1", tls13, &[]),
        dmz.opts.tunnel,
        port,
    )
    .await;
    println!("no ALPN: {outcome:?}");
    assert!(
        !matches!(outcome, Outcome::Answered(..)),
        "the DMZ answered a registration without ALPN"
    );
    let line = dmz
        .proc
        .wait_line(&["agent connection refused", "no ALPN"], LIMIT)
        .await;
    println!("DMZ log: {line}");
    assert_stays_closed(local(port), STAYS_CLOSED, "client without ALPN").await;
    let n = dmz.wait_rejections("bad_alpn", 1.0).await;
    println!("relay_rejections_total{{reason=\"bad_alpn\"}} = {n}");

    // A wrong ALPN: rustls itself refuses a client whose protocols share none with ours
    // (no_application_protocol alert); the DMZ counts it as a bad ALPN all the same.
    let before = dmz.rejections("bad_alpn").await;
    let port_h2 = free_port();
    let outcome = try_register(
        client_config(&pki, "engine-1", tls13, &[b"h2"]),
        dmz.opts.tunnel,
        port_h2,
    )
    .await;
    println!("ALPN h2: {outcome:?}");
    assert!(
        !matches!(outcome, Outcome::Answered(..)),
        "the DMZ answered a client offering only h2"
    );
    let n = dmz.wait_rejections("bad_alpn", before + 1.0).await;
    println!("relay_rejections_total{{reason=\"bad_alpn\"}} = {n} after the h2 client");
    let line = dmz
        .proc
        .wait_line(
            &[
                "agent connection refused",
                "TLS handshake failed",
                "any known protocol",
            ],
            LIMIT,
        )
        .await;
    println!("DMZ log: {line}");
    assert_stays_closed(local(port_h2), Duration::from_secs(1), "client offering h2").await;

    // Positive control: the same hand-made client with the right ALPN is answered and opens
    // its service (so the refusals above are about ALPN, not the client).
    let port_ok = free_port();
    let outcome = try_register(
        client_config(&pki, "engine-1", tls13, &[ALPN_INBOUND_V1]),
        dmz.opts.tunnel,
        port_ok,
    )
    .await;
    let Outcome::Answered(answer, _conn) = outcome else {
        panic!("a correct hand-made client was refused: {outcome:?}");
    };
    assert!(answer.services[0].accepted, "{answer:?}");
    wait_open(local(port_ok), LIMIT).await;
}

/// A client limited to TLS 1.2 cannot complete a handshake with the TLS 1.3-only DMZ.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls12_only_client_is_refused() {
    let pki = Pki::new();
    let dmz = Dmz::start(&pki, DmzOptions::default()).await;
    let port = free_port();
    let config = client_config(
        &pki,
        "engine-1",
        &[&rustls::version::TLS12],
        &[ALPN_INBOUND_V1],
    );
    let outcome = try_register(config, dmz.opts.tunnel, port).await;
    println!("TLS 1.2 only: {outcome:?}");
    assert!(
        matches!(outcome, Outcome::HandshakeFailed(_)),
        "a TLS 1.2-only client got past the handshake: {outcome:?}"
    );
    let line = dmz
        .proc
        .wait_line(&["agent connection refused", "TLS handshake failed"], LIMIT)
        .await;
    println!("DMZ log: {line}");
    assert_stays_closed(local(port), STAYS_CLOSED, "TLS 1.2 client").await;
    dmz.wait_rejections("tls_handshake", 1.0).await;
}

/// The DMZ issues no session ticket and keeps no session cache: a client that would resume
/// gets a full handshake the second time. A local server with rustls defaults shows that the
/// same client does resume when it can.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tunnel_sessions_are_never_resumed() {
    let pki = Pki::new();
    let dmz = Dmz::start(&pki, DmzOptions::default()).await;
    // One config (and so one session cache) for both connections; resumption is on by default.
    let config = client_config(
        &pki,
        "engine-1",
        &[&rustls::version::TLS13],
        &[ALPN_INBOUND_V1],
    );

    let mut kinds = Vec::new();
    for _ in 0..2 {
        let port = free_port();
        // Reading the registration answer also processes any ticket sent after the handshake.
        let outcome = try_register(config.clone(), dmz.opts.tunnel, port).await;
        let Outcome::Answered(answer, conn) = outcome else {
            panic!("a correct client was refused: {outcome:?}");
        };
        assert!(answer.services[0].accepted, "{answer:?}");
        kinds.push(conn.get_ref().1.handshake_kind());
        drop(conn);
    }
    println!("DMZ handshake kinds: {kinds:?}");
    assert!(kinds.iter().all(|k| k.is_some()), "{kinds:?}");
    assert!(
        !kinds.contains(&Some(HandshakeKind::Resumed)),
        "a tunnel session was resumed: {kinds:?}"
    );

    // Positive control: rustls server defaults (tickets on) let the same client resume.
    let kinds = resumption_control(&pki, &config).await;
    println!("control server handshake kinds: {kinds:?}");
    assert_eq!(
        kinds[1],
        Some(HandshakeKind::Resumed),
        "control did not resume: {kinds:?}"
    );
}

/// Two connections of `config` to a local TLS server with rustls's default session settings.
async fn resumption_control(pki: &Pki, config: &ClientConfig) -> Vec<Option<HandshakeKind>> {
    let chain = pem::certs(&pki.path("dmz.pem"));
    let key = pem::key(&pki.path("dmz-key.pem"));
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(pem::roots(pki)),
        provider.clone(),
    )
    .build()
    .expect("verifier");
    let mut server = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("versions")
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .expect("server cert");
    server.alpn_protocols = vec![ALPN_INBOUND_V1.to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().unwrap();
    let server_task = tokio::spawn(async move {
        for _ in 0..2 {
            let (tcp, _) = listener.accept().await.expect("accept");
            let mut tls = acceptor.accept(tcp).await.expect("server handshake");
            tls.write_all(b"hi").await.expect("server write");
            tls.shutdown().await.expect("server close");
        }
    });
    let connector = TlsConnector::from(Arc::new(config.clone()));
    let mut kinds = Vec::new();
    for _ in 0..2 {
        let tcp = TcpStream::connect(addr).await.expect("connect control");
        let name = ServerName::try_from("localhost").unwrap();
        let mut tls = tokio::time::timeout(LIMIT, connector.connect(name, tcp))
            .await
            .expect("control handshake timeout")
            .expect("control handshake");
        let mut buf = Vec::new();
        tokio::time::timeout(LIMIT, tls.read_to_end(&mut buf))
            .await
            .expect("control read timeout")
            .expect("control read");
        assert_eq!(buf, b"hi");
        kinds.push(tls.get_ref().1.handshake_kind());
    }
    server_task.await.expect("control server");
    kinds
}
