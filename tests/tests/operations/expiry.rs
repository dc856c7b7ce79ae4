//! Certificates watched: an agent certificate 10 days from expiry (made with `relay-certs
//! issue --days 10`) and a CRL due in 7 days show in `relay-certs expiry`, in the metrics of
//! both binaries and as warnings in their logs; `admin.expiry_warning` sets how early.

use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

use relay_e2e::process::Logged;
use relay_e2e::*;
use relay_tunnel::metrics as m;

use super::*;

const DAY: f64 = 86_400.0;

/// Days from now until the Unix time `t`.
fn days_until(t: f64) -> f64 {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs_f64();
    (t - now) / DAY
}

/// `relay-certs ARGS`: exit code and stdout.
fn relay_certs(args: &[&str]) -> (i32, String) {
    let out = Command::new(bin("relay-certs"))
        .args(args)
        .output()
        .expect("run relay-certs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

/// Waits until the log of `process` has a line with every needle.
async fn wait_log(process: &Logged, needles: &[&str], what: &str) {
    let matching = || {
        process
            .stderr_text()
            .lines()
            .find(|l| needles.iter().all(|n| l.contains(n)))
            .map(str::to_owned)
    };
    let found = wait_for(SETUP_LIMIT, || async { matching().is_some() }).await;
    println!("{what}: {}", matching().unwrap_or_default());
    assert!(
        found.is_some(),
        "{what}: no log line with {needles:?}:\n{}",
        process.tail(30)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_and_crl_near_their_end_are_shown_and_warned_about() {
    let _serial = SERIAL.lock().await;
    let pki = Pki::new();
    let dir = pki.dir().display().to_string();
    let (code, out) = relay_certs(&[
        "issue", "--ca-dir", &dir, "--agent", "engine-1", "--days", "10", "--force",
    ]);
    assert_eq!(code, 0, "relay-certs issue: {out}");
    let next_update = relay_certs::validity(7).1;
    let ca = relay_certs::Ca::from_pem(
        &std::fs::read_to_string(pki.path("ca.pem")).unwrap(),
        &std::fs::read_to_string(pki.path("ca-key.pem")).unwrap(),
    )
    .expect("dev CA");
    let crl = pki.write("ca.crl.pem", &ca.crl(&[], next_update).expect("CRL"));

    // On the terminal: one line per certificate or CRL, and `--within` for scripts.
    let agent_pem = pki.path("engine-1.pem").display().to_string();
    let crl_pem = crl.display().to_string();
    let (code, table) = relay_certs(&["expiry", &agent_pem, &crl_pem, "--within", "14d"]);
    println!("relay-certs expiry:\n{table}");
    assert_eq!(code, 1, "a certificate within 14 days: exit 1\n{table}");
    let line = |needle: &str| {
        table
            .lines()
            .find(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("no line with {needle:?}:\n{table}"))
            .to_owned()
    };
    assert!(table.starts_with("FILE"), "{table}");
    // The LEFT column: "10d 0h" or "9d 23h".
    let days_left = |needle: &str| -> u32 {
        let l = line(needle);
        let field = l.split_whitespace().rev().nth(1).expect("LEFT column");
        field
            .trim_end_matches('d')
            .parse()
            .unwrap_or_else(|_| panic!("{l}"))
    };
    assert!(line("engine-1.pem").contains(" certificate "), "{table}");
    assert!((9..=10).contains(&days_left("engine-1.pem")), "{table}");
    assert!(line("ca.crl.pem").contains(" crl "), "{table}");
    assert!((6..=7).contains(&days_left("ca.crl.pem")), "{table}");
    assert_eq!(
        relay_certs(&["expiry", &agent_pem, "--within", "5d"]).0,
        0,
        "nothing within 5 days"
    );
    let (code, out) = relay_certs(&[
        "expiry",
        &pki.path("engine-1-key.pem").display().to_string(),
    ]);
    assert_eq!(code, 64, "a key is no certificate: {out}");
    assert!(out.contains("no certificate or CRL"), "{out}");

    // The DMZ warns about its CRL (default 30 days) but, with `expiry_warning = "5d"` ...
    let target = targets::tagged_echo(b'A').await;
    let dmz_opts = DmzOptions {
        admin_extra: "expiry_warning = \"8d\"\n".into(),
        ..Default::default()
    };
    let text =
        dmz_opts
            .toml(&pki)
            .replacen("[tunnel]\n", &format!("[tunnel]\ncrl = \"{crl_pem}\"\n"), 1);
    let dmz = Logged::spawn(&pki, "relay-dmz", &pki.write("dmz.toml", &text), &[], "dmz");
    let port = free_port();
    let agent_opts = AgentOptions::new(
        dmz_opts.tunnel,
        vec![Service::new("expiring", port, target.addr)],
    );
    let agent = Logged::spawn(
        &pki,
        "relay-internal",
        &pki.write("agent.toml", &agent_opts.toml(&pki)),
        &[],
        "agent",
    );
    wait_metric(
        dmz_opts.admin,
        m::TUNNELS_CONNECTED,
        &[("agent", "engine-1")],
        2.0,
        SETUP_LIMIT,
        "agent tunnels up",
    )
    .await;

    // Metrics: the node's files on both sides, each agent's certificate on the DMZ.
    let (_, dmz_scrape) = scrape(dmz_opts.admin).await;
    let dmz_value = |name: &str, labels: &[(&str, &str)]| {
        days_until(value(&dmz_scrape, name, labels).unwrap_or_else(|| panic!("{name}{labels:?}")))
    };
    let agent_cert = dmz_value(m::AGENT_CERT_EXPIRY, &[("agent", "engine-1")]);
    assert!(
        (9.0..=10.01).contains(&agent_cert),
        "agent certificate: {agent_cert} days"
    );
    let crl_days = dmz_value(m::CERT_EXPIRY, &[("file", "tunnel.crl")]);
    assert!((6.0..=7.01).contains(&crl_days), "CRL: {crl_days} days");
    for file in ["tunnel.cert", "tunnel.ca"] {
        let days = dmz_value(m::CERT_EXPIRY, &[("file", file)]);
        assert!(days > 300.0, "{file}: {days} days");
    }
    let (_, agent_scrape) = scrape(agent_opts.admin).await;
    let own = value(&agent_scrape, m::CERT_EXPIRY, &[("file", "tls.cert")]).expect("tls.cert");
    assert!(
        (9.0..=10.01).contains(&days_until(own)),
        "agent's own certificate"
    );
    assert!(value(&agent_scrape, m::CERT_EXPIRY, &[("file", "tls.ca")]).is_some());

    // Status: the agent's certificate with its time left, outside the DMZ's 8-day warning so not
    // marked expiring; the CRL's 7 days are.
    let (code, body) = http_get(dmz_opts.admin, "/status")
        .await
        .expect("GET /status");
    assert_eq!(code, 200, "{body}");
    let status: serde_json::Value = serde_json::from_str(&body).expect("status JSON");
    let cert = &status["agents"][0]["certificate"];
    assert_eq!(cert["subject"], "CN=engine-1", "{status}");
    assert_eq!(cert["expiring"], false, "{status}");
    assert!(
        cert["left"]
            .as_str()
            .is_some_and(|l| l.starts_with("9d") || l.starts_with("10d"))
    );
    let crl_row = status["certificates"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["what"] == "tunnel.crl").cloned())
        .expect("tunnel.crl in status");
    assert_eq!(crl_row["expiring"], true, "{status}");

    // Logs: within 8 days on the DMZ (the CRL, not the agent's 10 days); within the default
    // 30 days on the agent (its own certificate).
    wait_log(&dmz, &["next update is due soon", "tunnel.crl"], "DMZ").await;
    wait_log(
        &agent,
        &["certificate expires soon", "tls.cert", "left="],
        "agent",
    )
    .await;
    assert!(
        !dmz.stderr_text().contains("agent engine-1"),
        "the agent's 10 days are outside the DMZ's 8-day warning:\n{}",
        dmz.tail(30)
    );

    // A reload with a longer warning warns about the CRL again; the agent's certificate is
    // warned about at its next tunnel (or at the daily check).
    let longer = text.replace("expiry_warning = \"8d\"", "expiry_warning = \"12d\"");
    pki.write("dmz.toml", &longer);
    let (status, body) = post_reload(dmz_opts.admin).await;
    assert_eq!(status, 200, "{body}");
    let crl_warnings = dmz
        .stderr_text()
        .lines()
        .filter(|l| l.contains("next update is due soon"))
        .count();
    assert_eq!(
        crl_warnings,
        2,
        "at start and at the reload:\n{}",
        dmz.tail(30)
    );
    drop(agent);
    wait_metric(
        dmz_opts.admin,
        m::TUNNELS_CONNECTED,
        &[("agent", "engine-1")],
        0.0,
        SETUP_LIMIT,
        "agent tunnels down",
    )
    .await;
    let agent = Logged::spawn(
        &pki,
        "relay-internal",
        &pki.path("agent.toml"),
        &[],
        "agent-again",
    );
    wait_log(
        &dmz,
        &["certificate expires soon", "agent engine-1"],
        "DMZ after reload",
    )
    .await;
    drop(agent);
}
