//! HTTPS, the AS2 transport: nginx terminates TLS for `as2.partner.test` behind the relay, and
//! curl verifies the certificate against the test CA through the relay (TLS passes untouched).

use std::net::SocketAddr;
use std::path::Path;

use relay_certs::{Ca, LeafSpec};

use super::*;

/// Size of the file fetched with GET and of the body sent with POST.
const SIZE: usize = 20 * 1024 * 1024;
/// The AS2 host name the partner addresses.
const HOST: &str = "as2.partner.test";

/// Writes the CA, the `as2.partner.test` certificate and a default certificate for another
/// name; returns the CA path.
fn write_certs(dir: &Path) -> PathBuf {
    let ca = Ca::new("relay protocol test CA").expect("test CA");
    for (stem, name) in [("as2", HOST), ("default", "other.partner.test")] {
        let leaf = ca.issue(&LeafSpec::server(&[name])).expect("issue leaf");
        std::fs::write(dir.join(format!("{stem}.pem")), leaf.cert_pem).expect("write cert");
        std::fs::write(dir.join(format!("{stem}-key.pem")), leaf.key_pem).expect("write key");
    }
    let path = dir.join("ca.pem");
    std::fs::write(&path, ca.cert_pem()).expect("write CA");
    path
}

/// nginx on 127.0.0.1:`port`: a default TLS server with another name's certificate (so a lost
/// SNI fails verification), the `as2.partner.test` server with a static file under `/files/`
/// and `/as2` which keeps every POST body in `bodies/` (passed to a local 200 responder).
async fn start_nginx(dir: &Path, port: u16) -> Server {
    let sink = free_port();
    let d = dir.display();
    let config = format!(
        r#"
pid {d}/nginx.pid;
error_log {d}/error.log info;
events {{ worker_connections 64; }}
http {{
    access_log {d}/access.log;
    default_type application/octet-stream;
    client_max_body_size 64m;
    client_body_temp_path {d}/tmp/body;
    proxy_temp_path {d}/tmp/proxy;
    fastcgi_temp_path {d}/tmp/fastcgi;
    uwsgi_temp_path {d}/tmp/uwsgi;
    scgi_temp_path {d}/tmp/scgi;
    ssl_protocols TLSv1.2 TLSv1.3;

    server {{
        listen 127.0.0.1:{port} ssl default_server;
        server_name _;
        ssl_certificate {d}/default.pem;
        ssl_certificate_key {d}/default-key.pem;
        return 421;
    }}
    server {{
        listen 127.0.0.1:{port} ssl;
        server_name {HOST};
        ssl_certificate {d}/as2.pem;
        ssl_certificate_key {d}/as2-key.pem;
        location /files/ {{ root {d}/www; }}
        location = /as2 {{
            limit_except POST {{ deny all; }}
            client_body_in_file_only on;
            client_body_temp_path {d}/bodies;
            proxy_pass http://127.0.0.1:{sink}/received;
        }}
    }}
    server {{
        listen 127.0.0.1:{sink};
        location / {{ return 200 "MDN: received\n"; }}
    }}
}}
"#
    );
    run_nginx(dir, &config, port).await
}

/// Through the relay, curl (SNI `as2.partner.test`, certificate verified against the test CA,
/// no `-k`) GETs a 20 MiB file and POSTs a 20 MiB AS2-style body; SHA-256 of the downloaded
/// file and of the body nginx stored match the originals.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_get_and_post_20_mib_with_sni_and_verified_certificate() {
    let curl = require("curl", "curl");
    let dir = tempfile::tempdir().expect("temp dir");
    let ca = write_certs(dir.path());
    let served = dir.path().join("www/files/report.bin");
    std::fs::create_dir_all(served.parent().expect("parent")).expect("create www");
    let served_sum = write_pattern_file(&served, 0xa52, SIZE);
    let body = dir.path().join("message.bin");
    let body_sum = write_pattern_file(&body, 0x2a5, SIZE);
    let target_port = free_port();
    let nginx = start_nginx(dir.path(), target_port).await;

    let pki = Pki::new();
    let dmz_opts = DmzOptions::default();
    let _dmz = start_dmz(&pki, &dmz_opts).await;
    let public_port = free_port();
    let public = SocketAddr::from(([127, 0, 0, 1], public_port));
    let _agent = start_agent(
        &pki,
        &AgentOptions::new(
            dmz_opts.tunnel,
            vec![Service::new(
                "as2",
                public_port,
                SocketAddr::from(([127, 0, 0, 1], target_port)),
            )],
        ),
    )
    .await;
    wait_open(public, START_LIMIT).await;

    let url = |path: &str| format!("https://{HOST}:{public_port}{path}");
    let curl_cmd = || {
        let mut cmd = tokio::process::Command::new(&curl);
        cmd.args(["-sS", "--fail", "--resolve"])
            .arg(format!("{HOST}:{public_port}:127.0.0.1"))
            .arg("--cacert")
            .arg(&ca)
            .args(["-w", "%{http_code} %{ssl_verify_result}"]);
        cmd
    };

    let downloaded = dir.path().join("downloaded.bin");
    let get = run_client(
        curl_cmd()
            .arg("-o")
            .arg(&downloaded)
            .arg(url("/files/report.bin")),
        &nginx,
    )
    .await;
    assert_eq!(
        get.stdout, "200 0",
        "GET: status and certificate verification"
    );
    assert_eq!(sha256_file(&downloaded), served_sum, "GET body differs");

    // The server picks its certificate by SNI: another name gets the default server (421),
    // so the verified as2.partner.test answers above prove SNI crossed the relay intact.
    let other = run_client(
        tokio::process::Command::new(&curl)
            .args(["-sS", "-o", "/dev/null", "--resolve"])
            .arg(format!("other.partner.test:{public_port}:127.0.0.1"))
            .arg("--cacert")
            .arg(&ca)
            .args(["-w", "%{http_code} %{ssl_verify_result}"])
            .arg(format!(
                "https://other.partner.test:{public_port}/files/report.bin"
            )),
        &nginx,
    )
    .await;
    assert_eq!(other.stdout, "421 0", "the default server did not answer");

    let answer = dir.path().join("mdn.txt");
    let post = run_client(
        curl_cmd()
            .args(["-H", "Content-Type: application/pkcs7-mime"])
            .args(["-H", "AS2-From: partner", "-H", "AS2-To: engine"])
            .arg("--data-binary")
            .arg(format!("@{}", body.display()))
            .arg("-o")
            .arg(&answer)
            .arg(url("/as2")),
        &nginx,
    )
    .await;
    assert_eq!(
        post.stdout, "200 0",
        "POST: status and certificate verification"
    );
    assert_eq!(
        std::fs::read_to_string(&answer).expect("read answer"),
        "MDN: received\n"
    );
    let stored: Vec<PathBuf> = std::fs::read_dir(dir.path().join("bodies"))
        .expect("list stored bodies")
        .map(|e| e.expect("dir entry").path())
        .collect();
    assert_eq!(stored.len(), 1, "nginx stored {stored:?}");
    assert_eq!(sha256_file(&stored[0]), body_sum, "POST body differs");

    println!(
        "https: GET {} MiB in {:.2?} ({:.1} MiB/s), POST {} MiB in {:.2?} ({:.1} MiB/s), sha256 GET {served_sum} POST {body_sum}",
        SIZE >> 20,
        get.elapsed,
        rate(SIZE, get.elapsed),
        SIZE >> 20,
        post.elapsed,
        rate(SIZE, post.elapsed)
    );
}
