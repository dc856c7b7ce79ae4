//! The admin endpoint with `admin.token_file`, asked with curl as an operator would: probes
//! stay open, everything else needs `Authorization: Bearer TOKEN`, refusals are counted and say
//! nothing about the node, a reload reads the token again (and keeps the old one when the file
//! is gone), and `metrics_open` leaves `/metrics` to Prometheus without credentials.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;

use relay_e2e::*;

use super::*;

const TOKEN_A: &str = "first-token-0123456789abcdef";
const TOKEN_B: &str = "second-token-0123456789abcdef";

/// One curl request: status code, `WWW-Authenticate` header (if any) and body.
fn curl(method: &str, admin: SocketAddr, path: &str, token: Option<&str>) -> (u16, String, String) {
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "-m", "5", "-X", method, "-D", "-", "-o", "-"]);
    if let Some(t) = token {
        cmd.args(["-H", &format!("Authorization: Bearer {t}")]);
    }
    let out = cmd
        .arg(format!("http://{admin}{path}"))
        .output()
        .expect("run curl");
    assert!(
        out.status.success(),
        "curl {method} {path}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line from curl: {head}"));
    let challenge = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .starts_with("www-authenticate:")
                .then(|| l["www-authenticate:".len()..].trim().to_owned())
        })
        .unwrap_or_default();
    (status, challenge, body.to_owned())
}

fn token_table(path: &Path, metrics_open: bool) -> String {
    let mut s = format!("token_file = {:?}\n", path.display().to_string());
    if metrics_open {
        s += "metrics_open = true\n";
    }
    s
}

async fn wait_live(admin: SocketAddr) {
    let up = wait_for(SETUP_LIMIT, || async move {
        tokio::task::spawn_blocking(move || {
            Command::new("curl")
                .args(["-sf", "-m", "1", &format!("http://{admin}/livez")])
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .await
        .unwrap_or(false)
    })
    .await;
    assert!(up.is_some(), "{admin}/livez did not answer");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dmz_admin_token_guards_all_but_the_probes_and_is_read_again_on_reload() {
    let _serial = SERIAL.lock().await;
    let pki = Pki::new();
    let token_file = pki.write("admin.token", &format!("{TOKEN_A}\n"));
    let opts = DmzOptions {
        admin_extra: token_table(&token_file, false),
        ..Default::default()
    };
    let _dmz = spawn_dmz_logged(&pki, &opts, &[], "dmz-admin-auth");
    let admin = opts.admin;
    wait_live(admin).await;

    // Probes answer anyone.
    assert_eq!(curl("GET", admin, "/livez", None).0, 200);
    assert_eq!(curl("GET", admin, "/readyz", None).0, 503, "no agent yet");

    // Everything else: 401 with a Bearer challenge and nothing about the node, not even
    // whether the path exists.
    for (method, path) in [
        ("GET", "/metrics"),
        ("GET", "/no-such-path"),
        ("POST", "/reload"),
    ] {
        let (status, challenge, body) = curl(method, admin, path, None);
        assert_eq!(
            (status, challenge.as_str(), body.as_str()),
            (401, "Bearer", "unauthorized\n"),
            "{method} {path} without a token"
        );
    }
    let (status, _, body) = curl("GET", admin, "/metrics", Some("wrong-token-0123456789"));
    assert_eq!(
        (status, body.as_str()),
        (401, "unauthorized\n"),
        "wrong token"
    );

    // The right token: the metrics, with the refusals counted by reason.
    let (status, _, body) = curl("GET", admin, "/metrics", Some(TOKEN_A));
    assert_eq!(status, 200, "{body}");
    let scrape = prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_owned())))
        .expect("parse /metrics");
    let rejected = |reason| {
        value(
            &scrape,
            "relay_admin_rejections_total",
            &[("reason", reason)],
        )
        .unwrap_or(0.0)
    };
    assert_eq!((rejected("missing"), rejected("invalid")), (3.0, 1.0));
    assert_eq!(curl("GET", admin, "/no-such-path", Some(TOKEN_A)).0, 404);

    // A new token in the file takes over at the reload it is read in.
    std::fs::write(&token_file, format!("{TOKEN_B}\n")).expect("write the new token");
    let (status, _, body) = curl("POST", admin, "/reload", Some(TOKEN_A));
    assert_eq!(status, 200, "reload with the token in force: {body}");
    assert_eq!(
        curl("GET", admin, "/metrics", Some(TOKEN_A)).0,
        401,
        "old token"
    );
    assert_eq!(
        curl("GET", admin, "/metrics", Some(TOKEN_B)).0,
        200,
        "new token"
    );

    // The token file gone: the reload fails naming the key, and the token in force stays.
    std::fs::remove_file(&token_file).expect("remove the token file");
    let (status, _, body) = curl("POST", admin, "/reload", Some(TOKEN_B));
    assert_eq!(status, 500, "{body}");
    assert!(body.contains("admin.token_file"), "{body}");
    assert_eq!(
        curl("GET", admin, "/metrics", Some(TOKEN_B)).0,
        200,
        "kept token"
    );
    assert_eq!(curl("GET", admin, "/metrics", None).0, 401, "still guarded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_admin_token_with_open_metrics() {
    let _serial = SERIAL.lock().await;
    let pki = Pki::new();
    let token_file = pki.write("agent-admin.token", TOKEN_A);
    let mut opts = AgentOptions::new(SocketAddr::from(([127, 0, 0, 1], free_port())), Vec::new());
    opts.admin_extra = token_table(&token_file, true);
    let (_agent, _) = spawn_agent_logged(&pki, &opts, &[], "agent-admin-auth");
    let admin = opts.admin;
    wait_live(admin).await;

    let (status, _, body) = curl("GET", admin, "/metrics", None);
    assert_eq!(status, 200, "metrics_open: {body}");
    assert!(body.contains("relay_build_info"), "{body}");
    assert_eq!(curl("POST", admin, "/reload", None).0, 401);
    assert_eq!(curl("GET", admin, "/no-such-path", None).0, 401);
    let (status, _, body) = curl("POST", admin, "/reload", Some(TOKEN_A));
    assert_eq!(status, 200, "{body}");
}

/// `curl` over HTTPS to the admin endpoint: status code and body; `None` when the TLS
/// handshake itself failed.
fn curl_tls(
    admin: SocketAddr,
    path: &str,
    pki: &Pki,
    client: Option<&str>,
) -> Option<(u16, String)> {
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "-m", "5", "-o", "-", "-w", "\n%{http_code}"])
        .arg("--cacert")
        .arg(pki.path("ca.pem"));
    if let Some(name) = client {
        cmd.arg("--cert")
            .arg(pki.path(&format!("{name}.pem")))
            .arg("--key")
            .arg(pki.path(&format!("{name}-key.pem")));
    }
    let out = cmd
        .arg(format!("https://{admin}{path}"))
        .output()
        .expect("run curl");
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n')?;
    Some((code.trim().parse().ok()?, body.to_owned()))
}

/// `admin.tls` with `client_ca`: HTTPS only; the probes answer anyone (load balancers have no
/// certificate), everything else needs a client certificate from that CA (and the token); the
/// console commands reach it with --cacert, --cert and --key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_tls_with_client_certificates() {
    let _serial = SERIAL.lock().await;
    let pki = Pki::new();
    let token_file = pki.write("admin.token", TOKEN_A);
    let opts = DmzOptions {
        admin_extra: format!(
            "{}\n[admin.tls]\ncert = {:?}\nkey = {:?}\nclient_ca = {:?}\n",
            token_table(&token_file, false),
            pki.path("dmz.pem").display().to_string(),
            pki.path("dmz-key.pem").display().to_string(),
            pki.path("ca.pem").display().to_string(),
        ),
        ..Default::default()
    };
    let config = pki.write("dmz-tls.toml", &opts.toml(&pki));
    let _dmz = relay_e2e::process::Logged::spawn(&pki, "relay-dmz", &config, &[], "dmz-admin-tls");
    let admin = opts.admin;
    let up = wait_for(SETUP_LIMIT, || async move {
        tokio::task::spawn_blocking(move || {
            Command::new("curl")
                .args(["-sk", "-m", "1", &format!("https://{admin}/livez")])
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .await
        .unwrap_or(false)
    })
    .await;
    assert!(up.is_some(), "https://{admin}/livez did not answer");

    // Plain HTTP gets no answer; probes over HTTPS need no certificate.
    assert_eq!(
        curl_tls(admin, "/readyz", &pki, None).map(|r| r.0),
        Some(503)
    );
    let plain = Command::new("curl")
        .args(["-sS", "-m", "3", &format!("http://{admin}/metrics")])
        .output()
        .expect("run curl");
    assert!(!plain.status.success(), "plain HTTP answered");

    // Without a client certificate: 401 even for `status`; with one but without the token:
    // 401; with both: the status.
    let (code, body) =
        curl_tls(admin, "/status", &pki, None).expect("handshake without a certificate");
    assert_eq!((code, body.as_str()), (401, "unauthorized\n"));
    assert_eq!(
        curl_tls(admin, "/status", &pki, Some("engine-1")).map(|r| r.0),
        Some(401)
    );

    let dir = pki.dir().display().to_string();
    let console = |args: &[&str]| {
        let out = Command::new(bin("relay-dmz"))
            .args(args)
            .args(["--config", &config.display().to_string()])
            .output()
            .expect("run relay-dmz");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let (code, out) = console(&["status"]);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("--cacert"), "{out}");
    let ca = format!("{dir}/ca.pem");
    let (cert, key) = (
        format!("{dir}/engine-1.pem"),
        format!("{dir}/engine-1-key.pem"),
    );
    let (code, out) = console(&["status", "--cacert", &ca]);
    assert_eq!(code, 2, "no client certificate: {out}");
    assert!(out.contains("401"), "{out}");
    let (code, out) = console(&[
        "status", "--json", "--cacert", &ca, "--cert", &cert, "--key", &key,
    ]);
    assert_eq!(code, 1, "answered, not ready: {out}");
    assert!(out.contains("\"binary\": \"relay-dmz\""), "{out}");

    let scrape = std::process::Command::new("curl")
        .args(["-sS", "-m", "5", "-o", "/dev/null", "-w", "%{http_code}"])
        .args(["--cacert", &ca, "--cert", &cert, "--key", &key])
        .args(["-H", &format!("Authorization: Bearer {TOKEN_A}")])
        .arg(format!("https://{admin}/metrics"))
        .output()
        .expect("run curl");
    assert_eq!(String::from_utf8_lossy(&scrape.stdout), "200");
    let (_, body) = curl_tls(admin, "/livez", &pki, None).expect("livez");
    assert_eq!(body, "ok\n");
}
