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
