//! Protocol gates and SNI routing at the DMZ: what a partner sends first is checked before any
//! stream opens to an agent, and several TLS services share one public port, routed by the
//! ClientHello's server name without terminating TLS. Real nginx, curl, OpenSSH.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use relay_certs::{Ca, LeafSpec};
use relay_e2e::process::{Captured, Dmz};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::*;

/// Size of each download and upload through the SNI-routed port.
const SIZE: usize = 20 * 1024 * 1024;
/// The two names routed to the two nginx servers: an exact name and one under a wildcard.
const AS2: &str = "as2.partner.test";
const EDI: &str = "x.edi.partner.test";

fn local(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// `[[inbound]]` service `name` on `port` to `target` with extra TOML lines.
fn service(name: &str, port: u16, target: SocketAddr, extra: &str) -> Service {
    let mut s = Service::new(name, port, target);
    s.extra = extra.to_owned();
    s
}

/// An agent process of identity `identity`, log captured.
fn agent(
    pki: &Pki,
    identity: &str,
    dmz: SocketAddr,
    services: Vec<Service>,
) -> (Captured, SocketAddr) {
    let mut opts = AgentOptions::new(dmz, services);
    opts.identity = identity.into();
    let path = pki.write(&format!("agent-{identity}.toml"), &opts.toml(pki));
    (Captured::spawn("relay-internal", &path), opts.admin)
}

/// The agent's inbound sessions so far (all results), from its `/metrics`.
async fn agent_sessions(admin: SocketAddr) -> f64 {
    metrics_text(admin)
        .await
        .lines()
        .filter(|l| l.starts_with("relay_sessions_total{") && l.contains("direction=\"inbound\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// nginx on 127.0.0.1:`port` serving `name` with its own certificate: `GET /files/NAME.bin`
/// and `POST /upload` (bodies kept in `bodies/`).
async fn start_nginx(dir: &Path, port: u16, name: &str, ca: &Ca) -> Server {
    let leaf = ca.issue(&LeafSpec::server(&[name])).expect("issue leaf");
    std::fs::write(dir.join("cert.pem"), leaf.cert_pem).expect("write cert");
    std::fs::write(dir.join("key.pem"), leaf.key_pem).expect("write key");
    let sink = free_port();
    let d = dir.display();
    let config = format!(
        r#"
pid {d}/nginx.pid;
error_log {d}/error.log info;
events {{ worker_connections 64; }}
http {{
    access_log {d}/access.log;
    client_max_body_size 64m;
    client_body_temp_path {d}/tmp/body;
    proxy_temp_path {d}/tmp/proxy;
    fastcgi_temp_path {d}/tmp/fastcgi;
    uwsgi_temp_path {d}/tmp/uwsgi;
    scgi_temp_path {d}/tmp/scgi;
    server {{
        listen 127.0.0.1:{port} ssl;
        server_name {name};
        ssl_certificate {d}/cert.pem;
        ssl_certificate_key {d}/key.pem;
        location /files/ {{ root {d}/www; }}
        location = /upload {{
            client_body_in_file_only on;
            client_body_temp_path {d}/bodies;
            proxy_pass http://127.0.0.1:{sink}/received;
        }}
    }}
    server {{
        listen 127.0.0.1:{sink};
        location / {{ return 200 "{name}\n"; }}
    }}
}}
"#
    );
    run_nginx(dir, &config, port).await
}

/// A ClientHello for `name`, as rustls writes it.
fn client_hello(name: &str) -> Vec<u8> {
    let config = rustls::ClientConfig::builder_with_provider(relay_tunnel::tls::provider())
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    let server_name = rustls::pki_types::ServerName::try_from(name.to_owned()).expect("name");
    let mut conn = rustls::ClientConnection::new(Arc::new(config), server_name).expect("client");
    let mut out = Vec::new();
    conn.write_tls(&mut out).expect("ClientHello");
    out
}

/// Whether the DMZ closes a connection that sent `bytes`, within `limit`.
async fn cut(public: SocketAddr, bytes: &[u8], limit: Duration) -> bool {
    let Ok(mut s) = TcpStream::connect(public).await else {
        return false;
    };
    let _ = s.write_all(bytes).await;
    let mut buf = [0u8; 64];
    matches!(
        tokio::time::timeout(limit, s.read(&mut buf)).await,
        Ok(Ok(0) | Err(_))
    )
}

/// Two nginx servers with their own certificates behind one public port: curl with `--resolve`
/// reaches each by name with its certificate verified (no `-k`), 20 MiB each way, hashed. An
/// unknown name is cut before any stream reaches an agent; once a default service (`sni =
/// ["*"]`, from another agent) joins the address, unknown names reach it. A ClientHello sent one
/// byte at a time, or split over two TLS records, is routed and passed on unchanged; an
/// oversized one is cut.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sni_routes_two_tls_services_on_one_port() {
    let curl = require("curl", "curl");
    let dir = tempfile::tempdir().expect("temp dir");
    let ca = Ca::new("relay SNI test CA").expect("CA");
    let ca_path = dir.path().join("ca.pem");
    std::fs::write(&ca_path, ca.cert_pem()).expect("write CA");
    let (port_a, port_b) = (free_port(), free_port());
    let mut servers = Vec::new();
    let mut sums = Vec::new();
    for (i, (name, port)) in [(AS2, port_a), (EDI, port_b)].into_iter().enumerate() {
        let d = dir.path().join(format!("nginx-{i}"));
        std::fs::create_dir_all(d.join("www/files")).expect("create");
        let sum = write_pattern_file(
            &d.join(format!("www/files/{name}.bin")),
            0x51 + i as u64,
            SIZE,
        );
        servers.push(start_nginx(&d, port, name, &ca).await);
        sums.push(sum);
    }

    let pki = Pki::with_agents(&["engine-1", "engine-2"]);
    let dmz = Dmz::start(&pki, DmzOptions::default()).await;
    let public_port = free_port();
    let public = local(public_port);
    let (_a, agent_admin) = agent(
        &pki,
        "engine-1",
        dmz.opts.tunnel,
        vec![
            service(
                "as2",
                public_port,
                local(port_a),
                &format!("sni = [\"{AS2}\"]"),
            ),
            service(
                "edi",
                public_port,
                local(port_b),
                "sni = [\"*.edi.partner.test\"]",
            ),
        ],
    );
    wait_open(public, START_LIMIT).await;

    let body = dir.path().join("upload.bin");
    let body_sum = write_pattern_file(&body, 0x77, SIZE);
    for (i, name) in [AS2, EDI].into_iter().enumerate() {
        let curl_cmd = || {
            let mut cmd = tokio::process::Command::new(&curl);
            cmd.args(["-sS", "--fail", "--resolve"])
                .arg(format!("{name}:{public_port}:127.0.0.1"))
                .arg("--cacert")
                .arg(&ca_path)
                .args(["-w", "%{http_code} %{ssl_verify_result}"]);
            cmd
        };
        let got = dir.path().join(format!("got-{i}.bin"));
        let get = run_client(
            curl_cmd()
                .arg("-o")
                .arg(&got)
                .arg(format!("https://{name}:{public_port}/files/{name}.bin")),
            &servers[i],
        )
        .await;
        assert_eq!(
            get.stdout, "200 0",
            "{name}: GET status, certificate verified"
        );
        assert_eq!(
            sha256_file(&got),
            sums[i],
            "{name}: downloaded file differs"
        );
        let post = run_client(
            curl_cmd()
                .arg("--data-binary")
                .arg(format!("@{}", body.display()))
                .arg(format!("https://{name}:{public_port}/upload")),
            &servers[i],
        )
        .await;
        assert_eq!(
            post.stdout,
            format!("{name}\n200 0"),
            "{name}: POST reached its server"
        );
        let stored: Vec<PathBuf> = std::fs::read_dir(dir.path().join(format!("nginx-{i}/bodies")))
            .expect("bodies")
            .map(|e| e.expect("entry").path())
            .collect();
        assert_eq!(stored.len(), 1, "{name}: nginx stored {stored:?}");
        assert_eq!(
            sha256_file(&stored[0]),
            body_sum,
            "{name}: uploaded body differs"
        );
        println!(
            "sni {name}: GET {} MiB in {:.2?}, POST {} MiB in {:.2?}",
            SIZE >> 20,
            get.elapsed,
            SIZE >> 20,
            post.elapsed
        );
    }

    // An unknown name: cut at the DMZ, no stream to the agent.
    let before = agent_sessions(agent_admin).await;
    assert!(
        cut(
            public,
            &client_hello("other.partner.test"),
            Duration::from_secs(5)
        )
        .await
    );
    assert!(dmz.wait_rejections("sni", 1.0).await >= 1.0);
    assert_eq!(
        agent_sessions(agent_admin).await,
        before,
        "a stream reached the agent"
    );

    // One byte at a time (a ClientHello over many TCP segments): routed, passed on unchanged.
    let hello = client_hello(AS2);
    let mut s = TcpStream::connect(public).await.expect("connect");
    s.set_nodelay(true).expect("nodelay");
    for b in &hello {
        s.write_all(&[*b]).await.expect("write one byte");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let mut reply = [0u8; 5];
    tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut reply))
        .await
        .expect("nginx answered the ClientHello in time")
        .expect("read nginx's answer");
    assert_eq!(
        reply[0], 0x16,
        "nginx answered with a TLS handshake record: {reply:?}"
    );
    drop(s);

    // Split over two TLS records: routed, and nginx (OpenSSL) takes it as it is.
    let body = &hello[5..];
    let (first, second) = body.split_at(body.len() / 2);
    let mut split = Vec::new();
    for part in [first, second] {
        split.extend_from_slice(&[0x16, 0x03, 0x01]);
        split.extend_from_slice(&(part.len() as u16).to_be_bytes());
        split.extend_from_slice(part);
    }
    let mut s = TcpStream::connect(public).await.expect("connect");
    s.write_all(&split).await.expect("write split ClientHello");
    tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut reply))
        .await
        .expect("nginx answered the split ClientHello in time")
        .expect("read nginx's answer");
    assert_eq!(
        reply[0], 0x16,
        "nginx answered with a TLS handshake record: {reply:?}"
    );
    drop(s);

    // Oversized: a record header announcing more than the 16 KiB the DMZ reads, then junk.
    let mut oversized = vec![0x16, 0x03, 0x01, 0x48, 0x00, 0x01, 0x00, 0x47, 0xfc];
    oversized.resize(17 * 1024, 0x42);
    let refused = dmz.rejections("protocol").await;
    assert!(
        cut(public, &oversized, Duration::from_secs(5)).await,
        "oversized ClientHello not cut"
    );
    assert!(dmz.wait_rejections("protocol", refused + 1.0).await > refused);

    // A default service from another agent joins the address: unknown names go there.
    let fallback = targets::tagged_echo(b'D').await;
    let (_b, _) = agent(
        &pki,
        "engine-2",
        dmz.opts.tunnel,
        vec![service(
            "fallback",
            public_port,
            fallback.addr,
            "sni = [\"*\"]",
        )],
    );
    let joined = wait_for(START_LIMIT, || async {
        let Ok(mut s) = TcpStream::connect(public).await else {
            return false;
        };
        let _ = s.write_all(&client_hello("other.partner.test")).await;
        let mut tag = [0u8; 1];
        matches!(
            tokio::time::timeout(Duration::from_secs(2), s.read_exact(&mut tag)).await,
            Ok(Ok(_))
        ) && tag[0] == b'D'
    })
    .await;
    assert!(
        joined.is_some(),
        "unknown names never reached the default service"
    );
    // The named services still go to their own servers.
    let still = run_client(
        tokio::process::Command::new(&curl)
            .args(["-sS", "--fail", "-o", "/dev/null", "--resolve"])
            .arg(format!("{AS2}:{public_port}:127.0.0.1"))
            .arg("--cacert")
            .arg(&ca_path)
            .args(["-w", "%{http_code}"])
            .arg(format!("https://{AS2}:{public_port}/files/{AS2}.bin")),
        &servers[0],
    )
    .await;
    assert_eq!(still.stdout, "200");
}

/// `expect = "tls"`: an ssh client and a plain `curl http://` are cut at the DMZ and the agent
/// sees no stream; a partner that sends nothing is cut after `limits.first_bytes_timeout`.
/// `expect = "ssh"`: OpenSSH's sftp works through it, curl is cut.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_gates_cut_the_wrong_protocol_before_any_stream() {
    let curl = require("curl", "curl");
    let ssh = require("ssh", "openssh-client");
    let sftp = require("sftp", "openssh-client");
    let dir = tempfile::tempdir().expect("temp dir");
    let sshd_port = free_port();
    let sshd = super::sftp::start_sshd(dir.path(), sshd_port).await;
    let echo = targets::echo().await;

    let pki = Pki::new();
    let dmz = Dmz::start(
        &pki,
        DmzOptions {
            limits: "first_bytes_timeout = \"1s\"".into(),
            ..Default::default()
        },
    )
    .await;
    let (tls_port, ssh_port) = (free_port(), free_port());
    let (_a, agent_admin) = agent(
        &pki,
        "engine-1",
        dmz.opts.tunnel,
        vec![
            service("tls-only", tls_port, echo.addr, "expect = \"tls\""),
            service("sftp", ssh_port, local(sshd_port), "expect = \"ssh\""),
        ],
    );
    wait_open(local(tls_port), START_LIMIT).await;
    wait_open(local(ssh_port), START_LIMIT).await;

    let before = agent_sessions(agent_admin).await;
    let ssh_out = tokio::process::Command::new(&ssh)
        .args(["-p", &tls_port.to_string(), "-F", "/dev/null"])
        .args(["-o", "BatchMode=yes", "-o", "ConnectTimeout=5"])
        .args([
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
        ])
        .args(["127.0.0.1", "true"])
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .expect("run ssh");
    assert!(!ssh_out.status.success(), "ssh got through a TLS gate");
    let (code, _) = relay_e2e::process::curl(vec![format!("http://127.0.0.1:{tls_port}/")]).await;
    assert_ne!(code, 0, "curl http:// got through a TLS gate");
    assert!(dmz.wait_rejections("protocol", 2.0).await >= 2.0);
    assert_eq!(
        agent_sessions(agent_admin).await,
        before,
        "a stream reached the agent"
    );

    let start = Instant::now();
    assert!(
        cut(local(tls_port), b"", Duration::from_secs(5)).await,
        "a silent partner was not cut"
    );
    let waited = start.elapsed();
    println!("silent partner cut after {waited:?} (first_bytes_timeout 1 s)");
    assert!(
        waited >= Duration::from_millis(900),
        "cut before the timeout: {waited:?}"
    );

    // sftp through the SSH gate.
    let original = dir.path().join("original.bin");
    let copy = dir.path().join("copy.bin");
    let sum = write_pattern_file(&original, 0x5a, 1024 * 1024);
    let batch = dir.path().join("batch");
    std::fs::write(
        &batch,
        format!("put {} {}\n", original.display(), copy.display()),
    )
    .expect("write batch");
    run_client(
        tokio::process::Command::new(sftp)
            .arg("-b")
            .arg(&batch)
            .arg("-i")
            .arg(dir.path().join("client_key"))
            .args(["-P", &ssh_port.to_string(), "-F", "/dev/null"])
            .args([
                "-o",
                "StrictHostKeyChecking=no",
                "-o",
                "UserKnownHostsFile=/dev/null",
            ])
            .args(["-o", "BatchMode=yes", "-o", "LogLevel=ERROR"])
            .arg(format!("{}@127.0.0.1", current_user())),
        &sshd,
    )
    .await;
    assert_eq!(sha256_file(&copy), sum, "file through the SSH gate differs");
    let refused = dmz.rejections("protocol").await;
    let out = tokio::process::Command::new(&curl)
        .args(["-sS", "--max-time", "5"])
        .arg(format!("http://127.0.0.1:{ssh_port}/"))
        .output()
        .await
        .expect("run curl");
    assert!(!out.status.success(), "curl got through an SSH gate");
    assert!(dmz.wait_rejections("protocol", refused + 1.0).await > refused);
}

/// 1,000 partners failing a TLS gate in a burst: the DMZ logs a few rate-limited lines, its
/// memory stays flat, and sessions of another service go on meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_gated_refusals_stays_quiet_and_cheap() {
    const BURST: usize = 1000;
    let pki = Pki::new();
    let dmz = Dmz::start(&pki, DmzOptions::default()).await;
    let echo = targets::echo().await;
    let (gated, open) = (free_port(), free_port());
    let (_a, _) = agent(
        &pki,
        "engine-1",
        dmz.opts.tunnel,
        vec![
            service("gated", gated, echo.addr, "expect = \"tls\""),
            service("open", open, echo.addr, ""),
        ],
    );
    wait_open(local(gated), START_LIMIT).await;
    wait_open(local(open), START_LIMIT).await;
    let rss = |pid: u32| relay_e2e::procfs::rss_bytes(pid).unwrap_or(0) / 1024;
    let rss_before = rss(dmz.pid());
    let burst = tokio::spawn(async move {
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..BURST {
            tasks.spawn(async move {
                cut(
                    local(gated),
                    b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
                    Duration::from_secs(10),
                )
                .await
            });
            if i % 50 == 49 {
                while tasks.len() > 100 {
                    tasks.join_next().await;
                }
            }
        }
        let mut cut_all = true;
        while let Some(r) = tasks.join_next().await {
            cut_all &= r.unwrap_or(false);
        }
        cut_all
    });
    let mut ok = 0;
    while !burst.is_finished() {
        let mut s = TcpStream::connect(local(open)).await.expect("open service");
        s.write_all(b"hello").await.expect("write");
        let mut buf = [0u8; 5];
        tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut buf))
            .await
            .expect("echo in time during the burst")
            .expect("echo");
        ok += 1;
    }
    assert!(
        burst.await.expect("burst task"),
        "a gated partner was not cut"
    );
    let refused = dmz.wait_rejections("protocol", BURST as f64).await;
    let rss_after = rss(dmz.pid());
    let lines = dmz.proc.count_lines(&["partner failed the protocol check"]);
    println!(
        "{BURST} gated refusals: {refused} counted, {lines} log lines, DMZ RSS {rss_before} -> {rss_after} KiB, {ok} sessions of another service meanwhile"
    );
    assert!(
        ok > 0,
        "no session of the other service ran during the burst"
    );
    assert!(lines <= 20, "{lines} log lines for {BURST} refusals");
    assert!(
        rss_after < rss_before + 8 * 1024,
        "RSS grew from {rss_before} to {rss_after} KiB"
    );
}

/// Two agents claiming one server name on one address: the second declaration is rejected with
/// the name and the service that has it; a service without `sni` cannot join the address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_name_is_routed_to_one_service_only() {
    let pki = Pki::with_agents(&["engine-1", "engine-2"]);
    let dmz = Dmz::start(&pki, DmzOptions::default()).await;
    let echo = targets::echo().await;
    let port = free_port();
    let (_a, _) = agent(
        &pki,
        "engine-1",
        dmz.opts.tunnel,
        vec![service(
            "first",
            port,
            echo.addr,
            "sni = [\"a.partner.test\", \"*\"]",
        )],
    );
    wait_open(local(port), START_LIMIT).await;
    let (b, _) = agent(
        &pki,
        "engine-2",
        dmz.opts.tunnel,
        vec![service(
            "second",
            port,
            echo.addr,
            "sni = [\"b.partner.test\", \"A.partner.test\"]",
        )],
    );
    let line = b
        .wait_line(&["service rejected by the DMZ", "second"], START_LIMIT)
        .await;
    println!("engine-2: {line}");
    assert!(
        line.contains("a.partner.test") && line.contains("first"),
        "{line}"
    );
    drop(b);
    let (c, _) = agent(
        &pki,
        "engine-2",
        dmz.opts.tunnel,
        vec![service("plain", port, echo.addr, "")],
    );
    let line = c
        .wait_line(&["service rejected by the DMZ", "plain"], START_LIMIT)
        .await;
    println!("engine-2: {line}");
    assert!(line.contains("overlap"), "{line}");
}

/// `check` names what cannot work: two services on one address without `sni` or with a name
/// in common, `sni` on another gate, a gate on a port range or on a server-first protocol.
#[test]
fn gate_config_mistakes_are_named() {
    let pki = Pki::new();
    let t = SocketAddr::from(([127, 0, 0, 1], 9));
    let mut opts = AgentOptions::new(t, vec![]);
    opts.services = vec![
        service("a", 8443, local(8443), "sni = [\"x.test\", \"*\"]"),
        service("b", 8443, local(8444), "sni = [\"*\", \"X.test\"]"),
        service("c", 8443, local(8445), ""),
        service(
            "d",
            9000,
            local(9000),
            "sni = [\"d.test\"]\nexpect = \"ssh\"",
        ),
        service("e", 9100, local(9100), "expect = \"tls\""),
        service("ftp", 2121, local(21), "expect = \"http\""),
    ];
    opts.services[4].listen = "127.0.0.1:50000-50009".into();
    opts.services[4].target = "127.0.0.1:50000-50009".into();
    let path = pki.write("agent-gates.toml", &opts.toml(&pki));
    let err = relay_internal::AgentConfig::load(&path)
        .expect_err("a config with gate mistakes")
        .to_string();
    println!("{err}");
    for expected in [
        "inbound[1].sni: * is also routed to service \"a\" on 127.0.0.1:8443",
        "inbound[2].listen: 127.0.0.1:8443 is also the address of service",
        "inbound[3].sni: SNI routing reads the TLS ClientHello: it needs expect = \"tls\"",
        "inbound[4].expect: a port range (FTP passive data ports)",
        "inbound[5].expect: port 21 is FTP, whose server speaks first",
    ] {
        assert!(err.contains(expected), "{expected:?} missing:\n{err}");
    }
}
