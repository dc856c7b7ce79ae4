//! PROXY protocol: the DMZ believes a header only from `policy.trusted_proxies` on services
//! with `accept_proxy`, uses its address for allow-lists, and the agent passes the partner
//! address on to targets with `proxy_protocol`.

use std::net::SocketAddr;
use std::time::Duration;

use relay_e2e::*;
use relay_tunnel::proxyproto;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

/// A target that reads a PROXY header, reports the source it names and the payload after it.
async fn header_target() -> (SocketAddr, mpsc::Receiver<(Option<SocketAddr>, Vec<u8>)>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::channel(8);
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await;
                if let Ok(proxyproto::Parsed::Header { len, source }) = proxyproto::parse(&buf) {
                    let _ = tx.send((source, buf[len..].to_vec())).await;
                } else {
                    let _ = tx.send((None, buf)).await;
                }
            });
        }
    });
    (addr, rx)
}

async fn setup(
    trusted: &str,
    allow: &str,
) -> (
    Pki,
    InProcess,
    InProcess,
    SocketAddr,
    SocketAddr,
    mpsc::Receiver<(Option<SocketAddr>, Vec<u8>)>,
) {
    let pki = Pki::new();
    let (target, rx) = header_target().await;
    let dmz_opts = DmzOptions {
        trusted_proxies: vec![trusted.into()],
        ..Default::default()
    };
    let dmz = start_dmz(&pki, &dmz_opts).await;
    let port = free_port();
    let mut svc = Service::new("as2", port, target);
    svc.extra = format!("accept_proxy = true\nproxy_protocol = \"v2\"\nallow = [\"{allow}\"]\n");
    let agent = start_agent(&pki, &AgentOptions::new(dmz_opts.tunnel, vec![svc])).await;
    let public: SocketAddr = ([127, 0, 0, 1], port).into();
    wait_open(public, Duration::from_secs(10)).await;
    (pki, dmz, agent, public, dmz_opts.admin, rx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trusted_header_sets_the_partner_address_end_to_end() {
    let (_pki, _dmz, _agent, public, _admin, mut rx) =
        setup("127.0.0.0/8", "198.51.100.0/24").await;
    let partner: SocketAddr = "198.51.100.7:40000".parse().unwrap();
    let mut s = TcpStream::connect(public).await.unwrap();
    // The header arrives one byte at a time, the payload right behind it.
    let header = proxyproto::encode(proxyproto::Version::V1, partner, public);
    for b in &header {
        s.write_all(&[*b]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    s.write_all(b"payload").await.unwrap();
    s.shutdown().await.unwrap();
    let (source, payload) = tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        source,
        Some(partner),
        "the target sees the partner named by the trusted header"
    );
    assert_eq!(payload, b"payload");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn untrusted_missing_malformed_or_disallowed_headers_are_closed_and_counted() {
    let (_pki, _dmz, _agent, public, admin, mut rx) = setup("10.0.0.0/8", "0.0.0.0/0").await;
    // From 127.0.0.1, which is not a trusted proxy here: closed before any agent sees it.
    let header = proxyproto::encode(
        proxyproto::Version::V2,
        "198.51.100.7:1".parse().unwrap(),
        public,
    );
    let mut s = TcpStream::connect(public).await.unwrap();
    // The DMZ may close before the writes finish: a broken pipe is part of the answer.
    let _ = s.write_all(&header).await;
    let _ = s.write_all(b"x").await;
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
        .await
        .unwrap();
    assert!(matches!(n, Ok(0) | Err(_)), "connection must be closed");
    assert!(
        tokio::time::timeout(Duration::from_millis(500), rx.recv())
            .await
            .is_err(),
        "target must see nothing"
    );
    let (_, metrics) = http_get(admin, "/metrics").await.unwrap();
    assert!(
        metric(
            &metrics,
            "relay_rejections_total",
            &["reason=\"proxy_header\""]
        )
        .unwrap_or(0.0)
            >= 1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allow_list_applies_to_the_address_in_the_header() {
    let (_pki, _dmz, _agent, public, admin, mut rx) = setup("127.0.0.0/8", "198.51.100.0/24").await;
    for bad in [
        proxyproto::encode(
            proxyproto::Version::V1,
            "203.0.113.9:1".parse().unwrap(),
            public,
        ),
        b"GET / HTTP/1.1\r\n\r\n".to_vec(),
        b"PROXY TCP4 1.2.3.4 5.6.7.8 99999 1\r\n".to_vec(),
        {
            // A v2 header whose length field promises more than the TLV area holds.
            let mut h = proxyproto::encode(
                proxyproto::Version::V2,
                "198.51.100.7:1".parse().unwrap(),
                public,
            );
            h.extend_from_slice(&[0x04, 0x00, 0x10, 0xAA]);
            let len = (h.len() - 16) as u16;
            h[14..16].copy_from_slice(&len.to_be_bytes());
            h
        },
    ] {
        let mut s = TcpStream::connect(public).await.unwrap();
        let _ = s.write_all(&bad).await;
        let mut buf = [0u8; 16];
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
            .await
            .unwrap();
        assert!(
            matches!(n, Ok(0) | Err(_)),
            "connection must be closed for {:?}",
            String::from_utf8_lossy(&bad)
        );
    }
    assert!(
        tokio::time::timeout(Duration::from_millis(500), rx.recv())
            .await
            .is_err(),
        "target must see nothing"
    );
    let (_, metrics) = http_get(admin, "/metrics").await.unwrap();
    assert!(
        metric(
            &metrics,
            "relay_rejections_total",
            &["reason=\"source_denied\""]
        )
        .unwrap_or(0.0)
            >= 1.0
    );
}
