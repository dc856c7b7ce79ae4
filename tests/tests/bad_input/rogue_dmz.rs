//! A rogue DMZ: the test plays a DMZ node that holds the DMZ certificate (a compromised DMZ),
//! takes the agent's registration, and then, as the HTTP/2 client of the inbound carrier, asks
//! for things the agent must refuse, and floods it. The agent lists both the rogue and a real
//! DMZ; its tunnel to the real one must be unaffected, and it must never connect anywhere but
//! the targets of its own config.
//!
//! The brief's example "10.0.0.1:22" is replaced by loopback addresses: this machine may send
//! no traffic outside 127.0.0.0/8, and the agent code path is the same for any address (the
//! authority is parsed as `service:port`, and an address is not a service name).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use relay_tunnel::protocol::{
    self, ALPN_INBOUND_V1, Registration, RegistrationAnswer, ServiceVerdict, SessionMeta,
};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;

use super::h2raw::{self, RawConn, Role};
use super::*;

/// A TLS server with the DMZ's certificate that accepts every registration and hands the
/// connection to the test.
struct RogueDmz {
    addr: SocketAddr,
    conns: mpsc::Receiver<TlsStream<TcpStream>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for RogueDmz {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl RogueDmz {
    async fn start(pki: &Pki) -> RogueDmz {
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(pem::roots(pki)),
            provider(),
        )
        .build()
        .expect("verifier");
        let mut config = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("versions")
            .with_client_cert_verifier(verifier)
            .with_single_cert(
                pem::certs(&pki.path("dmz.pem")),
                pem::key(&pki.path("dmz-key.pem")),
            )
            .expect("DMZ certificate");
        config.alpn_protocols = vec![ALPN_INBOUND_V1.to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().unwrap();
        let (tx, conns) = mpsc::channel(4);
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (acceptor, tx) = (acceptor.clone(), tx.clone());
                tokio::spawn(async move {
                    let Ok(Ok(mut tls)) = tokio::time::timeout(LIMIT, acceptor.accept(tcp)).await
                    else {
                        return;
                    };
                    let read = protocol::read_message::<Registration, _>(&mut tls);
                    let Ok(Ok(registration)) = tokio::time::timeout(LIMIT, read).await else {
                        return;
                    };
                    let answer = RegistrationAnswer::verdicts(
                        registration
                            .services
                            .iter()
                            .map(|s| ServiceVerdict {
                                name: s.name.clone(),
                                accepted: true,
                                reason: None,
                            })
                            .collect(),
                    );
                    if protocol::write_message(&mut tls, &answer).await.is_ok() {
                        // A connection nobody takes is dropped; the agent dials again.
                        let _ = tx.try_send(tls);
                    }
                });
            }
        });
        RogueDmz { addr, conns, task }
    }

    /// The next registered connection of the agent.
    async fn next(&mut self) -> TlsStream<TcpStream> {
        // Drop connections that waited in the queue: their HTTP/2 handshake may have timed out.
        while self.conns.try_recv().is_ok() {}
        tokio::time::timeout(LIMIT, self.conns.recv())
            .await
            .expect("the agent did not dial the rogue DMZ in time")
            .expect("rogue DMZ task ended")
    }
}

/// A real DMZ, the rogue one, and an agent process dialing both, serving `svc` on `port`.
struct Scene {
    _pki: Pki,
    dmz: Dmz,
    rogue: RogueDmz,
    agent: Captured,
    target: CountingEcho,
    /// A listener on this machine that is not in the agent's config.
    forbidden: CountingEcho,
    port: u16,
}

impl Scene {
    async fn start() -> Scene {
        let pki = Pki::new();
        let dmz = Dmz::start(&pki, DmzOptions::default()).await;
        let rogue = RogueDmz::start(&pki).await;
        let target = CountingEcho::start().await;
        let forbidden = CountingEcho::start().await;
        let port = free_port();
        let mut opts = AgentOptions::new(
            dmz.opts.tunnel,
            vec![Service::new("svc", port, target.addr)],
        );
        opts.dmz.push(rogue.addr);
        opts.connections = 1;
        let path = pki.write("agent-with-rogue.toml", &opts.toml(&pki));
        let agent = Captured::spawn("relay-internal", &path);
        wait_open(local(port), LIMIT).await;
        legit_works(local(port), "through the real DMZ at start").await;
        Scene {
            _pki: pki,
            dmz,
            rogue,
            agent,
            target,
            forbidden,
            port,
        }
    }

    /// The HTTP/2 client of the agent's next connection to the rogue DMZ, as a DMZ node has.
    async fn h2_client(&mut self) -> h2::client::SendRequest<Bytes> {
        let tls = self.rogue.next().await;
        let (send, connection) = tokio::time::timeout(
            LIMIT,
            relay_tunnel::h2conf::client().handshake::<_, Bytes>(tls),
        )
        .await
        .expect("HTTP/2 handshake in time")
        .expect("HTTP/2 handshake with the agent");
        tokio::spawn(connection);
        send
    }

    fn meta(&self) -> SessionMeta {
        SessionMeta {
            partner: "198.51.100.7:40000".parse().unwrap(),
            local: local(self.port),
            session: "rogue0001".into(),
        }
    }

    /// The agent is alive, never touched the forbidden listener, and still serves partners
    /// through the real DMZ.
    async fn agent_unaffected(&self, what: &str) {
        assert!(alive(self.agent.pid()), "the agent died after {what}");
        assert_eq!(
            self.forbidden.accepted(),
            0,
            "the agent connected to an address not in its config after {what}"
        );
        legit_works(
            local(self.port),
            &format!("through the real DMZ after {what}"),
        )
        .await;
        assert!(alive(self.dmz.pid()));
    }
}

/// Sends one request on the rogue's HTTP/2 client; the status and `relay-reason`.
async fn ask(
    send: &h2::client::SendRequest<Bytes>,
    request: Request<()>,
) -> (StatusCode, String, h2::SendStream<Bytes>, h2::RecvStream) {
    let mut send = tokio::time::timeout(LIMIT, send.clone().ready())
        .await
        .expect("connection ready in time")
        .expect("connection ready");
    let (response, stream) = send.send_request(request, false).expect("send request");
    let response = tokio::time::timeout(LIMIT, response)
        .await
        .expect("the agent did not answer in time")
        .expect("response");
    let reason = protocol::reason(response.headers());
    (response.status(), reason, stream, response.into_body())
}

fn connect_request(authority: &str, meta: Option<&SessionMeta>) -> Request<()> {
    let mut req = Request::builder()
        .method(Method::CONNECT)
        .uri(authority)
        .body(())
        .unwrap_or_else(|e| panic!("request for {authority}: {e}"));
    if let Some(meta) = meta {
        meta.to_headers(req.headers_mut());
    }
    req
}

/// A compromised DMZ asks the agent for an unknown service, for addresses instead of a
/// service (the loopback address of a listener that is not in the agent's config, IPv6, a
/// name), for a wrong port, without metadata, and with a method other than CONNECT. Each is
/// refused (404 or 400) and the forbidden listener sees no connection. The same rogue DMZ
/// asking for the configured service gets it (200 and an echo), so the refusals are about the
/// requests; the agent's tunnel to the real DMZ keeps working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rogue_dmz_cannot_make_the_agent_reach_anything_but_its_targets() {
    let _serial = shared().await;
    let mut scene = Scene::start().await;
    let send = scene.h2_client().await;
    let meta = scene.meta();
    let fport = scene.forbidden.addr.port();
    let port = scene.port;
    let cases: Vec<(String, Request<()>, StatusCode)> = vec![
        (
            "unknown service".into(),
            connect_request(&format!("nosuch:{port}"), Some(&meta)),
            StatusCode::NOT_FOUND,
        ),
        (
            "an IPv4 address not in the config".into(),
            connect_request(&format!("127.0.0.1:{fport}"), Some(&meta)),
            StatusCode::NOT_FOUND,
        ),
        (
            "an IPv6 address".into(),
            connect_request(&format!("[::1]:{fport}"), Some(&meta)),
            StatusCode::NOT_FOUND,
        ),
        (
            "a host name".into(),
            connect_request(&format!("localhost:{fport}"), Some(&meta)),
            StatusCode::NOT_FOUND,
        ),
        (
            "the service on a port outside it".into(),
            connect_request(&format!("svc:{fport}"), Some(&meta)),
            StatusCode::NOT_FOUND,
        ),
        (
            "the service without session metadata".into(),
            connect_request(&format!("svc:{port}"), None),
            StatusCode::BAD_REQUEST,
        ),
        (
            "GET instead of CONNECT".into(),
            Request::builder()
                .method(Method::GET)
                .uri(format!("https://svc:{port}/"))
                .body(())
                .unwrap(),
            StatusCode::BAD_REQUEST,
        ),
    ];
    let target_before = scene.target.accepted();
    for (what, request, expected) in cases {
        let (status, reason, _, _) = ask(&send, request).await;
        println!("rogue DMZ asks for {what}: {status} ({reason})");
        assert_eq!(status, expected, "{what}: {reason}");
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        scene.target.accepted(),
        target_before,
        "a refused request reached the target"
    );
    assert_eq!(
        scene.forbidden.accepted(),
        0,
        "the agent connected to an address the rogue DMZ named"
    );

    // Positive control: the configured service, properly asked, is served by the same rogue.
    let (status, reason, mut up, mut down) =
        ask(&send, connect_request(&format!("svc:{port}"), Some(&meta))).await;
    assert_eq!(status, StatusCode::OK, "{reason}");
    up.send_data(Bytes::from_static(b"via the rogue"), false)
        .unwrap();
    let echoed = tokio::time::timeout(LIMIT, down.data())
        .await
        .expect("echo in time")
        .expect("echo data")
        .expect("echo ok");
    assert_eq!(&echoed[..], b"via the rogue");
    assert_eq!(scene.target.accepted(), target_before + 1);
    let refused = scene.agent.count_lines(&["session stream refused"]);
    println!("agent log lines \"session stream refused\": {refused}");
    assert!(refused >= 1, "the agent logged none of the refusals");
    scene.agent_unaffected("the rogue's requests").await;
}

/// The literal header fields of a session's metadata.
fn meta_fields(meta: &SessionMeta) -> Vec<(String, String)> {
    vec![
        ("relay-partner".into(), meta.partner.to_string()),
        ("relay-local".into(), meta.local.to_string()),
        ("relay-session".into(), meta.session.clone()),
    ]
}

fn block(authority: &str, meta: &SessionMeta) -> Vec<u8> {
    let fields = meta_fields(meta);
    let extra: Vec<(&str, &str)> = fields
        .iter()
        .map(|(n, v)| (n.as_str(), v.as_str()))
        .collect();
    h2raw::connect_block(authority, &extra)
}

/// The rogue DMZ floods the agent: 10,000 streams opened and reset at once ("rapid reset"),
/// then, on the next connection, 20,000 streams for an unknown service. The agent cuts the
/// first with GOAWAY, answers or refuses every stream of the second in bounded time, stays
/// alive, touches no address outside its config, and keeps serving through the real DMZ.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rogue_dmz_stream_floods_are_cut_off_and_other_tunnels_unaffected() {
    let _serial = exclusive().await;
    let mut scene = Scene::start().await;
    let meta = scene.meta();
    let rss_before = procfs::rss_bytes(scene.agent.pid()).unwrap_or(0);

    // Rapid reset, toward the real service (each accepted stream would dial the target).
    let conn = RawConn::start(scene.rogue.next().await, Role::Client);
    let request = block(&format!("svc:{}", scene.port), &meta);
    let target_before = scene.target.accepted();
    let start = Instant::now();
    let mut batch = Vec::new();
    let mut sent = 0;
    for i in 0..10_000u32 {
        let id = 2 * i + 1;
        batch.extend(h2raw::frame(
            h2raw::HEADERS,
            h2raw::END_HEADERS,
            id,
            &request,
        ));
        batch.extend(h2raw::rst(id, h2raw::CANCEL));
        sent += 1;
        if (batch.len() > 32 * 1024 || i == 9_999) && !conn.send(std::mem::take(&mut batch)).await {
            break;
        }
    }
    let cut = conn.wait_end(Duration::from_secs(10)).await;
    let took = start.elapsed();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let stats = conn.stats();
    println!(
        "rogue DMZ rapid reset: {sent} pairs written; cut: {cut} after {took:.2?}; {}; target connections it caused: {}",
        stats.summary(),
        scene.target.accepted() - target_before
    );
    drop(conn);
    assert!(cut, "the agent kept the rapid-reset connection open");
    assert!(
        stats.goaway.is_some(),
        "the agent closed without GOAWAY: {}",
        stats.summary()
    );
    scene.agent_unaffected("a rapid reset").await;

    // 20,000 streams for an unknown service on the next connection.
    const STREAMS: u32 = 20_000;
    let conn = RawConn::start(scene.rogue.next().await, Role::Client);
    let request = block("nosuch:1", &meta);
    let refused_before = scene.agent.count_lines(&["session stream refused"]);
    let start = Instant::now();
    let mut batch = Vec::new();
    for i in 0..STREAMS {
        batch.extend(h2raw::frame(
            h2raw::HEADERS,
            h2raw::END_HEADERS | h2raw::END_STREAM,
            2 * i + 1,
            &request,
        ));
        if (batch.len() > 64 * 1024 || i + 1 == STREAMS)
            && !conn.send(std::mem::take(&mut batch)).await
        {
            break;
        }
    }
    let settled = conn
        .wait_until(Duration::from_secs(60), |s| {
            s.ended.is_some()
                || s.count(h2raw::HEADERS) + s.count(h2raw::RST_STREAM) >= STREAMS as usize
        })
        .await;
    let stats = conn.stats();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_after = procfs::rss_bytes(scene.agent.pid()).unwrap_or(0);
    println!(
        "rogue DMZ, 20,000 streams for an unknown service: settled: {settled} after {:.1?}; {}; agent log lines \"session stream refused\": {}; agent RSS {:.1} -> {:.1} MiB",
        start.elapsed(),
        stats.summary(),
        scene.agent.count_lines(&["session stream refused"]) - refused_before,
        rss_before as f64 / MIB,
        rss_after as f64 / MIB,
    );
    assert!(
        settled,
        "after 60 s some of the 20,000 streams are neither answered nor refused: {}",
        stats.summary()
    );
    assert!(
        rss_after < rss_before + (64 << 20),
        "the agent grew by {:.1} MiB",
        (rss_after - rss_before) as f64 / MIB
    );
    scene.agent_unaffected("20,000 streams").await;
}

/// A DMZ node that opens a session on a tunnel after the agent announced its drain, before it
/// read the announcement, gets REFUSED_STREAM: a sure sign that the agent did not start the
/// session, so the DMZ can send the session and its first bytes to another agent. (Under
/// HTTP/2's graceful shutdown the stream would be ignored and the connection closed, and the
/// DMZ could not tell.) The target sees no connection; the agent keeps the tunnel until the
/// DMZ confirms the drain, then exits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_agent_refuses_sessions_opened_before_the_dmz_read_the_drain() {
    let _serial = shared().await;
    let mut scene = Scene::start().await;
    let send = scene.h2_client().await;
    let control_request = Request::builder()
        .method(Method::POST)
        .uri(format!("https://relay{}", protocol::CONTROL_PATH))
        .body(())
        .unwrap();
    let (status, _, mut control_send, control_recv) = ask(&send, control_request).await;
    assert_eq!(status, StatusCode::OK, "control stream refused");
    let mut control = relay_tunnel::control::Reader::new(control_recv);
    let target_before = scene.target.accepted();

    let pid = nix::unistd::Pid::from_raw(scene.agent.pid() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM the agent");
    let drain = tokio::time::timeout(LIMIT, control.next::<protocol::AgentMessage>())
        .await
        .expect("the agent announced no drain in time")
        .expect("control message");
    assert_eq!(drain, Some(protocol::AgentMessage::Drain));

    // The DMZ had already chosen this tunnel: a session request with its first bytes.
    let mut ready = tokio::time::timeout(LIMIT, send.clone().ready())
        .await
        .expect("tunnel ready in time")
        .expect("the tunnel is open during the drain");
    let request = connect_request(&format!("svc:{}", scene.port), Some(&scene.meta()));
    let (response, mut up) = ready.send_request(request, false).expect("send request");
    let _ = up.send_data(Bytes::from_static(b"first bytes"), false);
    let answer = tokio::time::timeout(LIMIT, response)
        .await
        .expect("the draining agent did not answer in time");
    match answer {
        Err(e) => assert_eq!(
            e.reason(),
            Some(h2::Reason::REFUSED_STREAM),
            "the draining agent ended the late session with \"{e}\", not REFUSED_STREAM"
        ),
        Ok(response) => panic!(
            "the draining agent accepted a new session: {}",
            response.status()
        ),
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        scene.target.accepted(),
        target_before,
        "a session refused during the drain reached the target"
    );
    assert!(
        alive(scene.agent.pid()),
        "the agent did not wait for the confirmation"
    );

    relay_tunnel::control::send(&mut control_send, &protocol::DmzMessage::Drained)
        .expect("confirm the drain");
    let start = Instant::now();
    while alive(scene.agent.pid()) {
        assert!(
            start.elapsed() < LIMIT,
            "the agent did not exit within {LIMIT:?} after the drain was confirmed:\n{}",
            scene.agent.tail(20)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!(
        "draining agent: REFUSED_STREAM for a late session; exited {:?} after the confirmation",
        start.elapsed()
    );
}
