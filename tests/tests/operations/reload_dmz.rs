//! Hot reload of a DMZ node (`POST /reload`): certificate rotation for new handshakes, a broken
//! key file that keeps the old credentials, and an agent removed from `tunnel.agents`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use relay_e2e::*;
use relay_tunnel::metrics as m;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use super::*;

fn first_cert(pem: &[u8]) -> Vec<u8> {
    CertificateDer::pem_slice_iter(pem)
        .next()
        .expect("a certificate")
        .expect("PEM certificate")
        .to_vec()
}

/// The certificate the DMZ tunnel listener presents to a new handshake now (as agent
/// `engine-2`, with the inbound ALPN).
async fn served_certificate(pki: &Pki, tunnel: SocketAddr) -> Vec<u8> {
    let chain = pem::certs(&pki.path("engine-2.pem"));
    let key = pem::key(&pki.path("engine-2-key.pem"));
    let mut config = rustls::ClientConfig::builder_with_provider(relay_tunnel::tls::provider())
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(pem::roots(pki))
        .with_client_auth_cert(chain, key)
        .expect("client cert");
    config.alpn_protocols = vec![relay_tunnel::protocol::ALPN_INBOUND_V1.to_vec()];
    let tcp = TcpStream::connect(tunnel)
        .await
        .expect("connect the tunnel listener");
    let name = ServerName::try_from("localhost").expect("name");
    let tls = tokio::time::timeout(
        EXCHANGE_LIMIT,
        TlsConnector::from(Arc::new(config)).connect(name, tcp),
    )
    .await
    .expect("handshake in time")
    .expect("TLS handshake with the DMZ");
    tls.get_ref()
        .1
        .peer_certificates()
        .expect("server certificate")[0]
        .to_vec()
}

/// Writes a new DMZ certificate and key issued by the PKI's CA over dmz.pem and dmz-key.pem.
fn rotate_dmz_certificate(pki: &Pki) -> Vec<u8> {
    let ca = relay_certs::Ca::from_pem(
        &std::fs::read_to_string(pki.path("ca.pem")).expect("ca.pem"),
        &std::fs::read_to_string(pki.path("ca-key.pem")).expect("ca-key.pem"),
    )
    .expect("load CA");
    let leaf = ca
        .issue(&relay_certs::LeafSpec::server(&["localhost", "127.0.0.1"]))
        .expect("issue DMZ certificate");
    pki.write("dmz.pem", &leaf.cert_pem);
    pki.write("dmz-key.pem", &leaf.key_pem);
    first_cert(leaf.cert_pem.as_bytes())
}

/// The reload counters of an admin endpoint: (ok, error).
async fn reloads(admin: SocketAddr) -> (f64, f64) {
    (
        current(admin, m::CONFIG_RELOADS, &[("result", "ok")]).await,
        current(admin, m::CONFIG_RELOADS, &[("result", "error")]).await,
    )
}

/// An agent `identity` with one service `name` on `port` toward `target`.
fn agent(identity: &str, dmz: SocketAddr, services: Vec<Service>) -> AgentOptions {
    let mut opts = AgentOptions::new(dmz, services);
    opts.identity = identity.into();
    opts.connections = 1;
    opts
}

/// A DMZ node and agent `engine-1` serving `PREFIX-a` (tag A) with a session open through it;
/// `engine-2`, serving `PREFIX-b` (tag B), joins later.
struct Scene {
    pki: Pki,
    opts: DmzOptions,
    prefix: &'static str,
    session: OpenSession,
    second: (targets::Target, u16),
    _running: Vec<InProcess>,
    _first_target: targets::Target,
}

impl Scene {
    async fn start(prefix: &'static str) -> Self {
        let pki = Pki::new();
        let (ta, tb) = (
            targets::tagged_echo(b'A').await,
            targets::tagged_echo(b'B').await,
        );
        let opts = DmzOptions::default();
        let dmz = start_dmz(&pki, &opts).await;
        let (p1, p2) = (free_port(), free_port());
        let services = vec![Service::new(&format!("{prefix}-a"), p1, ta.addr)];
        let a1 = start_agent(&pki, &agent("engine-1", opts.tunnel, services)).await;
        wait_open(addr([127, 0, 0, 1], p1), SETUP_LIMIT).await;
        let session = OpenSession::open(addr([127, 0, 0, 1], p1))
            .await
            .expect("session");
        Self {
            pki,
            opts,
            prefix,
            session,
            second: (tb, p2),
            _running: vec![dmz, a1],
            _first_target: ta,
        }
    }

    /// Starts `engine-2` and checks one session through it; returns how long its port took
    /// to open, and the agent.
    async fn second_agent_serves(&self) -> (Duration, InProcess) {
        let (target, port) = &self.second;
        let services = vec![Service::new(
            &format!("{}-b", self.prefix),
            *port,
            target.addr,
        )];
        let opts = agent("engine-2", self.opts.tunnel, services);
        let a2 = start_agent(&self.pki, &opts).await;
        let t = wait_open(addr([127, 0, 0, 1], *port), SETUP_LIMIT).await;
        let fresh = OpenSession::open(addr([127, 0, 0, 1], *port))
            .await
            .expect("session via the new agent");
        assert_eq!(fresh.tag, b'B');
        fresh.finish().await.expect("clean close");
        (t, a2)
    }

    /// Closes the session opened at the start, cleanly.
    async fn finish(self) {
        self.session
            .finish()
            .await
            .expect("clean close of the session in flight");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dmz_certificate_rotation_applies_to_new_handshakes() {
    let _serial = SERIAL.lock().await;
    let mut scene = Scene::start("rot").await;
    let (pki, opts) = (&scene.pki, &scene.opts);
    scene
        .session
        .round_trip(b"before the rotation")
        .await
        .expect("round trip");

    let old = first_cert(&std::fs::read(pki.path("dmz.pem")).expect("dmz.pem"));
    assert_eq!(served_certificate(pki, opts.tunnel).await, old);
    let reconnects = [("dmz", &*opts.tunnel.to_string())];
    let reconnects_before = current(opts.admin, m::TUNNEL_RECONNECTS, &reconnects).await;
    let new = rotate_dmz_certificate(pki);
    assert_ne!(new, old);
    let (ok0, err0) = reloads(opts.admin).await;
    let (status, body) = post_reload(opts.admin).await;
    println!(
        "dmz_certificate_rotation_applies_to_new_handshakes: POST /reload -> {status}: {body}"
    );
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("0 tunnel(s) cut"), "{body}");
    let (ok1, err1) = reloads(opts.admin).await;
    assert_eq!((ok1 - ok0, err1 - err0), (1.0, 0.0), "reload counters");

    assert_eq!(
        served_certificate(pki, opts.tunnel).await,
        new,
        "new handshakes see the new certificate"
    );
    scene
        .session
        .round_trip(b"after the rotation")
        .await
        .expect("the session in flight continues");
    assert_eq!(scene.session.tag, b'A');
    // A new agent trusts the new certificate (same CA) and registers.
    let (t, _a2) = scene.second_agent_serves().await;
    println!(
        "dmz_certificate_rotation_applies_to_new_handshakes: a new agent registered {} ms after starting; the old tunnel carried its session through the rotation",
        t.as_millis()
    );
    assert_eq!(
        current(opts.admin, m::TUNNEL_RECONNECTS, &reconnects).await,
        reconnects_before,
        "the existing tunnel was not kept"
    );
    scene.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dmz_reload_with_broken_key_keeps_the_old_credentials() {
    let _serial = SERIAL.lock().await;
    let mut scene = Scene::start("brk").await;
    let (pki, opts) = (&scene.pki, &scene.opts);
    let old = first_cert(&std::fs::read(pki.path("dmz.pem")).expect("dmz.pem"));
    let good_key = std::fs::read_to_string(pki.path("dmz-key.pem")).expect("dmz-key.pem");

    pki.write(
        "dmz-key.pem",
        "-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n",
    );
    let (ok0, err0) = reloads(opts.admin).await;
    let (status, body) = post_reload(opts.admin).await;
    println!(
        "dmz_reload_with_broken_key_keeps_the_old_credentials: POST /reload -> {status}: {body}"
    );
    assert_eq!(status, 500, "{body}");
    assert!(
        body.contains("tunnel.key") || body.contains("dmz-key.pem"),
        "the answer does not name the broken file: {body}"
    );
    let (ok1, err1) = reloads(opts.admin).await;
    assert_eq!((ok1 - ok0, err1 - err0), (0.0, 1.0), "reload counters");

    // The node keeps serving with the old credentials.
    assert_eq!(served_certificate(pki, opts.tunnel).await, old);
    scene
        .session
        .round_trip(b"still here")
        .await
        .expect("the session in flight continues");
    let _a2 = scene.second_agent_serves().await;

    // Fixed file: the next reload succeeds.
    pki.write("dmz-key.pem", &good_key);
    let (status, body) = post_reload(opts.admin).await;
    assert_eq!(status, 200, "{body}");
    scene.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dmz_reload_cuts_agents_no_longer_admitted() {
    let _serial = SERIAL.lock().await;
    let pki = Pki::new();
    let (t1, t2) = (
        targets::tagged_echo(b'1').await,
        targets::tagged_echo(b'2').await,
    );
    let mut opts = DmzOptions {
        agents: Some(vec!["engine-1".into(), "engine-2".into()]),
        ..Default::default()
    };
    let _dmz = start_dmz(&pki, &opts).await;
    let (p1, p2, ps) = (free_port(), free_port(), free_port());
    let mut a1 = agent(
        "engine-1",
        opts.tunnel,
        vec![
            Service::new("cut-only1", p1, t1.addr),
            Service::new("cut-shared", ps, t1.addr),
        ],
    );
    a1.connections = 2;
    let mut a2 = agent(
        "engine-2",
        opts.tunnel,
        vec![
            Service::new("cut-only2", p2, t2.addr),
            Service::new("cut-shared", ps, t2.addr),
        ],
    );
    a2.connections = 2;
    let _a1 = start_agent(&pki, &a1).await;
    let _a2 = start_agent(&pki, &a2).await;
    for p in [p1, p2] {
        wait_open(addr([127, 0, 0, 1], p), SETUP_LIMIT).await;
    }
    // Both agents serve the shared service: wait until sessions reach each.
    let both = wait_for(SETUP_LIMIT, || async {
        let mut seen = Vec::new();
        for _ in 0..6 {
            if let Ok(s) = OpenSession::open(addr([127, 0, 0, 1], ps)).await {
                seen.push(s.tag);
            }
        }
        seen.contains(&b'1') && seen.contains(&b'2')
    })
    .await;
    assert!(
        both.is_some(),
        "the shared service is not served by both agents"
    );
    let mut session = OpenSession::open(addr([127, 0, 0, 1], p2))
        .await
        .expect("session");
    assert_eq!(session.tag, b'2');
    // Every tunnel of both agents is up (agent side: the series of this DMZ node only).
    let node = opts.tunnel.to_string();
    wait_metric(
        opts.admin,
        m::TUNNELS_CONNECTED,
        &[("dmz", &node)],
        4.0,
        SETUP_LIMIT,
        "tunnels of both agents",
    )
    .await;

    let unknown = [("reason", "unknown_agent")];
    let refused_before = current(opts.admin, m::REJECTIONS, &unknown).await;
    opts.agents = Some(vec!["engine-2".into()]);
    opts.limits = "drain_delay = \"3s\"".into();
    pki.write(
        &format!("dmz-{}.toml", opts.tunnel.port()),
        &opts.toml(&pki),
    );
    let (status, body) = post_reload(opts.admin).await;
    println!("dmz_reload_cuts_agents_no_longer_admitted: POST /reload -> {status}: {body}");
    assert_eq!(status, 200, "{body}");
    assert!(
        body.contains("2 tunnel(s) cut"),
        "engine-1's two tunnels: {body}"
    );
    assert!(
        body.contains("limits") && body.contains("restart"),
        "restart keys not named: {body}"
    );

    let closed = wait_closed(addr([127, 0, 0, 1], p1), Duration::from_secs(5)).await;
    println!(
        "dmz_reload_cuts_agents_no_longer_admitted: engine-1's own listener closed {} ms after the reload",
        closed.as_millis()
    );
    // engine-1 keeps dialing and is refused; its listener stays closed.
    let refused = wait_for(Duration::from_secs(10), || async {
        current(opts.admin, m::REJECTIONS, &unknown).await > refused_before
    })
    .await;
    assert!(
        refused.is_some(),
        "engine-1's reconnects were not refused as unknown_agent"
    );
    assert!(
        !accepts(addr([127, 0, 0, 1], p1)).await,
        "engine-1's listener reopened"
    );
    session
        .round_trip(b"engine-2 unaffected")
        .await
        .expect("engine-2's session continues");
    for _ in 0..4 {
        let s = OpenSession::open(addr([127, 0, 0, 1], ps))
            .await
            .expect("shared service");
        assert_eq!(
            s.tag, b'2',
            "a session of the shared service reached the cut agent"
        );
        s.finish().await.expect("clean close");
    }
    let fresh = OpenSession::open(addr([127, 0, 0, 1], p2))
        .await
        .expect("engine-2's service");
    assert_eq!(fresh.tag, b'2');
    fresh.finish().await.expect("clean close");
    session
        .finish()
        .await
        .expect("clean close of engine-2's session");
}
