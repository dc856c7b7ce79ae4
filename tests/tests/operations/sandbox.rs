//! The sandbox (`[sandbox]`): `sandbox-check` asks the kernel on both binaries, and a confined
//! DMZ node and agent (real processes, confined by default) carry sessions both ways, report,
//! reload, refuse a reload that needs more than the sandbox allows, and drain.
//!
//! Landlock is required under CI (`CI=true`); elsewhere a kernel without it skips these tests.

use std::process::Command;

use nix::sys::signal::Signal;
use relay_e2e::tools::or_skip;
use relay_tunnel::metrics as m;

use super::*;

/// Runs `BINARY sandbox-check --config CONFIG`: exit success and stdout.
fn sandbox_check(binary: &str, config: &std::path::Path) -> (bool, String) {
    let out = Command::new(bin(binary))
        .args(["sandbox-check", "--config"])
        .arg(config)
        .output()
        .expect("run sandbox-check");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("$ {binary} sandbox-check\n{stdout}{stderr}");
    (out.status.success(), stdout)
}

/// Whether this kernel enforces Landlock (asked through the DMZ's own check); `None` skips.
fn landlock(test: &str, pki: &Pki) -> Option<()> {
    let path = pki.write("probe.toml", &DmzOptions::default().toml(pki));
    let (_, out) = sandbox_check("relay-dmz", &path);
    let found = out.contains("Landlock: fully enforced").then(PathBuf::new);
    or_skip(test, found, "this kernel does not enforce Landlock").map(drop)
}

/// The row of `operation` in a sandbox-check table: (expected, result, errno).
fn row<'a>(table: &'a str, operation: &str) -> (&'a str, &'a str, &'a str) {
    let line = table
        .lines()
        .find(|l| l.starts_with(operation))
        .unwrap_or_else(|| panic!("no row {operation:?} in\n{table}"));
    let mut cells = line[operation.len()..].split_whitespace();
    let expected = cells.next().unwrap_or_default();
    let result = cells.next().unwrap_or_default();
    let errno = cells.next().unwrap_or_default();
    (expected, result, errno)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sandbox_check_shows_what_the_kernel_denies() {
    let _serial = SERIAL.lock().await;
    let pki = Pki::new();
    if landlock("sandbox_check_shows_what_the_kernel_denies", &pki).is_none() {
        return;
    }
    let opts = DmzOptions {
        listen_allow: vec!["0.0.0.0:8000-8099".into()],
        connect_allow: vec!["127.0.0.1:9443".into()],
        ..DmzOptions::default()
    };
    let config = pki.write("dmz.toml", &opts.toml(&pki));
    let (ok, table) = sandbox_check("relay-dmz", &config);
    assert!(ok, "sandbox-check failed:\n{table}");
    assert!(table.contains("seccomp: allow-list"), "{table}");
    let dir = config
        .parent()
        .expect("config directory")
        .display()
        .to_string();
    for (operation, errno) in [
        (format!("write a file in {dir}"), "EACCES"),
        ("create a file in /tmp".into(), "EACCES"),
        ("read /etc/passwd (outside the rules)".into(), "EACCES"),
        ("execute /bin/true".into(), "EPERM"),
        (
            "connect to TCP port 20000 (outside the policy)".into(),
            "EACCES",
        ),
        ("bind TCP port 20000 (outside the policy)".into(), "EACCES"),
    ] {
        assert_eq!(
            row(&table, &operation),
            ("denied", "denied", errno),
            "{operation}"
        );
    }
    assert_eq!(
        row(&table, "read the config and the 3 file(s) it names").1,
        "allowed"
    );
    assert_eq!(row(&table, "bind TCP port 8000 (allowed)").1, "allowed");
    assert!(
        !pki.path(".relay-sandbox-check").exists(),
        "the probe left a file behind"
    );

    // The agent: files and programs, no port rules.
    let agent = pki.write(
        "agent.toml",
        &AgentOptions::new(opts.tunnel, vec![]).toml(&pki),
    );
    let (ok, table) = sandbox_check("relay-internal", &agent);
    assert!(ok, "agent sandbox-check failed:\n{table}");
    assert_eq!(
        row(&table, "execute /bin/true"),
        ("denied", "denied", "EPERM")
    );
    assert_eq!(
        row(&table, "connect to a TCP port outside the policy"),
        ("allowed", "allowed", "not")
    );

    // mode = "warn": nothing is enforced, and the check says so and fails.
    let warn = pki.write(
        "warn.toml",
        &format!("{}\n[sandbox]\nmode = \"warn\"\n", opts.toml(&pki)),
    );
    let (ok, table) = sandbox_check("relay-dmz", &warn);
    assert!(!ok, "sandbox-check passed in warn mode:\n{table}");
    assert_eq!(row(&table, "create a file in /tmp").1, "allowed");
    assert!(
        table.contains("the sandbox is not enforced: sandbox.mode = \"warn\""),
        "{table}"
    );
}

/// The status line of a process's `/proc/PID/status` field.
fn proc_status(pid: u32, field: &str) -> String {
    relay_e2e::procfs::status_field(pid, field).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn confined_node_and_agent_serve_reload_and_drain() {
    let _serial = SERIAL.lock().await;
    let pki = Pki::new();
    if landlock("confined_node_and_agent_serve_reload_and_drain", &pki).is_none() {
        return;
    }
    let target = targets::echo().await;
    let partner = targets::echo().await;
    let mut opts = DmzOptions {
        connect_allow: vec![format!("127.0.0.1:{}", partner.addr.port())],
        limits: "drain_delay = \"500ms\"\ndrain_timeout = \"5s\"".into(),
        ..DmzOptions::default()
    };
    let mut dmz = spawn_dmz_logged(&pki, &opts, &[], "dmz");
    let public = addr([127, 0, 0, 1], free_port());
    let fixed = addr([127, 0, 0, 1], free_port());
    let mut agent_opts = AgentOptions::new(
        opts.tunnel,
        vec![Service::new("files", public.port(), target.addr)],
    );
    agent_opts.extra = format!(
        "\n[[outbound]]\nname = \"partner\"\nlisten = \"{fixed}\"\ntarget = \"{}\"\n",
        partner.addr
    );
    let (agent, _) = spawn_agent_logged(&pki, &agent_opts, &[], "agent");
    wait_open(public, SETUP_LIMIT).await;

    for (name, pid) in [("dmz", dmz.guard.pid()), ("agent", agent.guard.pid())] {
        assert_eq!(
            proc_status(pid, "Seccomp:"),
            "2",
            "{name}: seccomp filter mode"
        );
        assert_eq!(proc_status(pid, "NoNewPrivs:"), "1", "{name}: no_new_privs");
    }
    // Sessions both ways, some at once.
    let data = pattern(256 * 1024, 7);
    let mut sessions = tokio::task::JoinSet::new();
    for _ in 0..16 {
        let data = data.clone();
        sessions.spawn(async move { echo_session(PARTNER_IP, public, &data).await });
    }
    while let Some(done) = sessions.join_next().await {
        done.expect("inbound session");
    }
    wait_open(fixed, SETUP_LIMIT).await;
    let stream = TcpStream::connect(fixed)
        .await
        .expect("outbound entry point");
    let back = echo_exchange(stream, &data)
        .await
        .expect("outbound session");
    assert!(back == data, "outbound echo differs");
    // Reported: metrics and status on both sides.
    for admin in [opts.admin, agent_opts.admin] {
        for part in ["landlock", "seccomp"] {
            assert_eq!(
                current(admin, m::SANDBOX_ENFORCED, &[("part", part)]).await,
                1.0,
                "{admin}: {part}"
            );
        }
        let (status, body) = http_get(admin, "/status").await.expect("GET /status");
        assert_eq!(status, 200, "{body}");
        let json: serde_json::Value = serde_json::from_str(&body).expect("status JSON");
        assert_eq!(json["sandbox"]["mode"], "enforce", "{body}");
    }

    // A reload that needs nothing new works.
    let (status, body) = post_reload(opts.admin).await;
    assert_eq!(status, 200, "{body}");
    // One that needs a new connect port is refused, naming it; the old config stays.
    let config = pki.path("dmz.toml");
    let other = free_port();
    opts.connect_allow.push(format!("127.0.0.1:{other}"));
    std::fs::write(&config, opts.toml(&pki)).expect("write config");
    let (status, body) = post_reload(opts.admin).await;
    println!("reload with a new connect port: {status} {body}");
    assert_ne!(status, 200, "{body}");
    assert!(
        body.contains(&format!("connecting to TCP port(s) {other}")) && body.contains("restart"),
        "{body}"
    );
    // One whose certificate lies outside the directories the sandbox reads is refused too.
    opts.connect_allow.pop();
    let elsewhere = tempfile::tempdir().expect("temp dir");
    let cert = elsewhere.path().join("dmz.pem");
    std::fs::copy(pki.path("dmz.pem"), &cert).expect("copy certificate");
    let moved = opts.toml(&pki).replace(
        &pki.path("dmz.pem").display().to_string(),
        &cert.display().to_string(),
    );
    std::fs::write(&config, moved).expect("write config");
    let (status, body) = post_reload(opts.admin).await;
    println!("reload with a certificate elsewhere: {status} {body}");
    assert_ne!(status, 200, "{body}");
    assert!(
        body.contains("Permission denied") && body.contains("a file elsewhere needs a restart"),
        "{body}"
    );
    echo_session(PARTNER_IP, public, &data).await;
    assert_eq!(
        current(opts.admin, m::CONFIG_RELOADS, &[("result", "error")]).await,
        2.0
    );

    // Drain: SIGTERM, and the node exits cleanly.
    dmz.guard.signal(Signal::SIGTERM);
    let (exit, after) = dmz
        .guard
        .wait_exit(Duration::from_secs(15))
        .await
        .unwrap_or_else(|| panic!("no exit after SIGTERM\n{}", dmz.tail(20)));
    assert!(exit.success(), "{exit}\n{}", dmz.tail(20));
    println!("confined DMZ node drained and exited {after:?} after SIGTERM");
    let log = dmz.stderr_text();
    assert!(
        log.contains("sandbox: mode enforce; Landlock: fully enforced"),
        "{log}"
    );
}
