//! Active health checks of each kind: `http` takes out a target answering 503, `tls` passes a
//! TLS target (verified against its CA) and fails a plain TCP one.

use super::*;

/// An HTTP server answering every request with `status`, then closing.
async fn http_status(status: u16) -> Tagged {
    let listener = TcpListener::bind(local(0)).await.expect("bind http");
    let addr = listener.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                let mut seen = Vec::new();
                while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => seen.extend_from_slice(&buf[..n]),
                    }
                }
                let answer = format!(
                    "HTTP/1.1 {status} X\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                );
                let _ = s.write_all(answer.as_bytes()).await;
            });
        }
    });
    Tagged { addr, task }
}

/// A TLS server with the PKI's DMZ certificate (names localhost and 127.0.0.1).
async fn tls_target(pki: &Pki) -> Tagged {
    let certs = relay_tunnel::tls::load_certs(&pki.path("dmz.pem")).expect("certs");
    let key = relay_tunnel::tls::load_key(&pki.path("dmz-key.pem")).expect("key");
    let config = rustls::ServerConfig::builder_with_provider(relay_tunnel::tls::provider())
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .expect("server config");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind(local(0)).await.expect("bind tls");
    let addr = listener.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                if let Ok(mut tls) = acceptor.accept(s).await {
                    let _ = tls.write_all(&[7]).await;
                    let _ = tls.shutdown().await;
                }
            });
        }
    });
    Tagged { addr, task }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_check_takes_out_a_target_answering_503() {
    let good = http_status(200).await;
    let bad = http_status(503).await;
    let public = free_port();
    let mut svc = Service::targets("as2", public, &[good.addr, bad.addr]);
    svc.extra = "[inbound.health]\nkind = \"http\"\nrequest = \"GET /health\"\nstatus = 200\ninterval = \"200ms\"\ntimeout = \"150ms\"\nfall = 2\nrise = 2\n".into();
    let s = site(vec![svc]).await;
    wait_open(local(public), LIMIT).await;
    let out = wait_target(s.agent_opts.admin, bad.addr, 0.0, &s.agent).await;
    println!("http check, target answering 503: out after {out:?}");
    assert_eq!(target_up(s.agent_opts.admin, good.addr).await, Some(1.0));
    let line = s.agent.wait_line(&["target unhealthy"], LIMIT).await;
    assert!(line.contains("status 503, expected 200"), "{line}");
    let checks = metric(
        &metrics_text(s.agent_opts.admin).await,
        "relay_health_checks_total",
        &[&format!("target=\"{}\"", good.addr), "result=\"ok\""],
    );
    assert!(checks.is_some_and(|n| n >= 1.0), "{checks:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_check_passes_a_tls_target_and_fails_a_plain_one() {
    let pki = Pki::new();
    let tls = tls_target(&pki).await;
    let plain = tagged(1).await;
    let public = free_port();
    let mut svc = Service::targets("ftps", public, &[tls.addr, plain.addr]);
    svc.extra = format!(
        "[inbound.health]\nkind = \"tls\"\nca = \"{}\"\nserver_name = \"localhost\"\ninterval = \"200ms\"\ntimeout = \"150ms\"\nfall = 2\nrise = 2\n",
        pki.path("ca.pem").display()
    );
    let dmz = Dmz::start(&pki, DmzOptions::default()).await;
    let opts = AgentOptions::new(dmz.opts.tunnel, vec![svc]);
    let agent = spawn_agent_captured(&pki, &opts);
    wait_open(local(public), LIMIT).await;
    wait_target(opts.admin, plain.addr, 0.0, &agent).await;
    // Checked for a while: the TLS target keeps passing.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(
        target_up(opts.admin, tls.addr).await,
        Some(1.0),
        "{}",
        agent.tail(20)
    );
    let ok = metric(
        &metrics_text(opts.admin).await,
        "relay_health_checks_total",
        &[&format!("target=\"{}\"", tls.addr), "result=\"ok\""],
    );
    assert!(ok.is_some_and(|n| n >= 3.0), "{ok:?}");
    let line = agent.wait_line(&["target unhealthy", "ftps"], LIMIT).await;
    assert!(line.contains("TLS handshake"), "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_check_without_a_ca_does_not_verify_but_needs_a_handshake() {
    let pki = Pki::new();
    let tls = tls_target(&pki).await;
    let public = free_port();
    let mut svc = Service::targets("as2s", public, &[tls.addr]);
    // No ca: the certificate (issued for localhost) is not checked against the name either.
    svc.extra = "[inbound.health]\nkind = \"tls\"\nserver_name = \"b2bi.internal\"\ninterval = \"200ms\"\ntimeout = \"150ms\"\nfall = 1\nrise = 1\n".into();
    let dmz = Dmz::start(&pki, DmzOptions::default()).await;
    let opts = AgentOptions::new(dmz.opts.tunnel, vec![svc]);
    let agent = spawn_agent_captured(&pki, &opts);
    wait_open(local(public), LIMIT).await;
    let ok = wait_for(LIMIT, || async {
        metric(
            &metrics_text(opts.admin).await,
            "relay_health_checks_total",
            &["service=\"as2s\"", "result=\"ok\""],
        )
        .is_some_and(|n| n >= 3.0)
    })
    .await;
    assert!(ok.is_some(), "{}", agent.tail(20));
    assert_eq!(
        agent.count_lines(&["target unhealthy"]),
        0,
        "{}",
        agent.tail(20)
    );
}
