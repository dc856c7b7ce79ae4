//! The operator's console: `status`, `sessions`, `kill`, `drain` and `resume` of both binaries,
//! run as an operator would (the real binaries, against processes with an admin token): the
//! tables and JSON say who is connected and what runs; a killed session is reset on both sides
//! and recorded as `killed`, others go on; a drained agent's new sessions go to the other agent
//! while its running one goes on; wrong ids, a missing token and a node that is down get clear
//! errors and exit codes.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;

use relay_e2e::process::Logged;
use relay_e2e::*;
use relay_tunnel::metrics as m;
use tokio::io::AsyncReadExt;

use super::*;

const TOKEN: &str = "console-token-0123456789abcdef";

/// `BINARY ARGS...`: exit code and stdout + stderr.
async fn run(binary: &str, args: &[&str]) -> (i32, String) {
    let mut cmd = Command::new(bin(binary));
    cmd.args(args);
    let out = tokio::task::spawn_blocking(move || cmd.output())
        .await
        .expect("join")
        .unwrap_or_else(|e| panic!("run {binary}: {e}"));
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.code().unwrap_or(-1), text)
}

/// `BINARY ARGS... --config CONFIG --json` parsed; `Null` if the command failed (the node is
/// not up yet).
async fn try_json(binary: &str, args: &[&str], config: &Path) -> serde_json::Value {
    let config = config.display().to_string();
    let mut all = args.to_vec();
    all.extend(["--config", &config, "--json"]);
    let (_, out) = run(binary, &all).await;
    serde_json::from_str(&out).unwrap_or(serde_json::Value::Null)
}

/// The same, which must succeed.
async fn json(binary: &str, args: &[&str], config: &Path) -> serde_json::Value {
    let v = try_json(binary, args, config).await;
    assert!(!v.is_null(), "{binary} {args:?} --json failed");
    v
}

/// A session through `public` that the target tagged `tag` answers (sessions spread over the
/// agents, so a few tries find it).
async fn open_on(public: SocketAddr, tag: u8) -> OpenSession {
    loop {
        let s = OpenSession::open(public).await.expect("session");
        if s.tag == tag {
            return s;
        }
    }
}

/// Waits until `agent` wrote the audit record of session `id` with the outcome `killed`.
async fn wait_killed_audit(agent: &Logged, id: &str, what: &str) {
    let audited = wait_for(EXCHANGE_LIMIT, || async {
        agent.stderr_text().lines().any(|l| {
            l.contains("relay::audit") && l.contains(id) && l.contains("outcome=\"killed\"")
        })
    })
    .await;
    assert!(
        audited.is_some(),
        "{what}: no audit record of {id} with outcome=killed:\n{}",
        agent.tail(20)
    );
}

/// The tags of `n` sessions through `public`.
async fn tags(public: SocketAddr, n: usize) -> Vec<u8> {
    let mut tags = Vec::new();
    for _ in 0..n {
        let s = OpenSession::open(public).await.expect("session");
        tags.push(s.tag);
        s.finish().await.expect("clean close");
    }
    tags
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_see_status_and_sessions_kill_one_and_drain_an_agent() {
    let _serial = SERIAL.lock().await;
    let pki = Pki::new();
    let token = pki.write("admin.token", &format!("{TOKEN}\n"));
    // `metrics_open`: the test reads the metrics without the token, as a Prometheus would.
    let token_table = format!(
        "token_file = {:?}\nmetrics_open = true\n",
        token.display().to_string()
    );
    let (ta, tb) = (
        targets::tagged_echo(b'A').await,
        targets::tagged_echo(b'B').await,
    );
    let dmz_opts = DmzOptions {
        admin_extra: token_table.clone(),
        ..Default::default()
    };
    let dmz_config = pki.write("dmz.toml", &dmz_opts.toml(&pki));
    let dmz = Logged::spawn(&pki, "relay-dmz", &dmz_config, &[], "dmz");
    let port = free_port();
    let public = addr([127, 0, 0, 1], port);
    let agent = |identity: &str, target: SocketAddr| {
        let mut o = AgentOptions::new(dmz_opts.tunnel, vec![Service::new("files", port, target)]);
        o.identity = identity.into();
        o.admin_extra = token_table.clone();
        o
    };
    let (a_opts, b_opts) = (agent("engine-1", ta.addr), agent("engine-2", tb.addr));
    let a_config = pki.write("agent-a.toml", &a_opts.toml(&pki));
    let b_config = pki.write("agent-b.toml", &b_opts.toml(&pki));
    let agent_a = Logged::spawn(&pki, "relay-internal", &a_config, &[], "agent-a");
    let agent_b = Logged::spawn(&pki, "relay-internal", &b_config, &[], "agent-b");
    let up = wait_for(SETUP_LIMIT, || async {
        let s = try_json("relay-dmz", &["status"], &dmz_config).await;
        s["ready"] == true
            && s["agents"]
                .as_array()
                .is_some_and(|a| a.len() == 2 && a.iter().all(|x| x["tunnels"]["inbound"] == 2))
    })
    .await;
    assert!(up.is_some(), "two agents never showed:\n{}", dmz.tail(20));

    // Status on the terminal, from the config alone (admin address and token).
    let dmz_cfg = dmz_config.display().to_string();
    let (code, table) = run("relay-dmz", &["status", "--config", &dmz_cfg]).await;
    println!("$ relay-dmz status\n{table}");
    assert_eq!(code, 0, "ready: exit 0\n{table}");
    for needle in [
        "ready",
        "engine-1",
        "engine-2",
        "files",
        "tunnel.cert",
        "INBOUND",
    ] {
        assert!(table.contains(needle), "{needle:?} missing:\n{table}");
    }
    let s = json("relay-dmz", &["status"], &dmz_config).await;
    let agents = s["agents"].as_array().unwrap();
    assert_eq!(agents[0]["identity"], "engine-1");
    assert_eq!(agents[0]["tunnels"]["inbound"], 2);
    assert_eq!(agents[0]["services"][0], "files");
    assert!(agents[0]["certificate"]["not_after"].is_string());
    let svc = &s["services"][0];
    assert_eq!(
        (svc["name"].as_str(), svc["open"].as_bool()),
        (Some("files"), Some(true))
    );
    assert_eq!(svc["agents"], serde_json::json!(["engine-1", "engine-2"]));

    // Sessions: one on each agent, listed with the same id on the DMZ and on its agent.
    let mut on = std::collections::HashMap::new();
    while on.len() < 2 {
        let mut s = OpenSession::open(public).await.expect("session");
        s.round_trip(&[7u8; 1000]).await.expect("round trip");
        on.entry(s.tag).or_insert(s);
    }
    let listed = json("relay-dmz", &["sessions"], &dmz_config).await;
    let listed = listed["sessions"].as_array().unwrap().clone();
    assert_eq!(listed.len(), 2, "{listed:?}");
    let (code, table) = run("relay-dmz", &["sessions", "--config", &dmz_cfg]).await;
    println!("$ relay-dmz sessions\n{table}");
    assert_eq!(code, 0);
    let on_a = listed
        .iter()
        .find(|x| x["via"] == "engine-1")
        .expect("session on engine-1");
    assert_eq!(on_a["bytes_partner_to_target"], 1000);
    let id = on_a["id"].as_str().unwrap().to_owned();
    let a_cfg = a_config.display().to_string();
    let (_, table) = run("relay-internal", &["sessions", "--config", &a_cfg]).await;
    println!("$ relay-internal sessions\n{table}");
    assert!(table.contains(&id), "the agent lists the same id:\n{table}");
    let (code, table) = run("relay-internal", &["status", "--config", &a_cfg]).await;
    println!("$ relay-internal status\n{table}");
    assert_eq!(code, 0, "{table}");
    assert!(
        table.contains("connected") && table.contains("accepted"),
        "{table}"
    );

    // Kill the session on engine-1 from the agent: both sides reset, recorded as killed on
    // both; the other session goes on.
    let (code, out) = run("relay-internal", &["kill", &id, "--config", &a_cfg]).await;
    assert_eq!(
        (code, out.trim()),
        (0, format!("session {id} killed").as_str())
    );
    let mut killed = on.remove(&b'A').unwrap();
    let mut rest = Vec::new();
    let read = tokio::time::timeout(EXCHANGE_LIMIT, killed.stream.read_to_end(&mut rest)).await;
    assert!(
        matches!(read, Ok(Err(_))),
        "the partner's connection is reset: {read:?}"
    );
    let mut other = on.remove(&b'B').unwrap();
    other
        .round_trip(b"still here")
        .await
        .expect("the other session goes on");
    for (side, admin) in [("DMZ", dmz_opts.admin), ("agent", a_opts.admin)] {
        wait_metric(
            admin,
            m::SESSIONS_TOTAL,
            &[("service", "files"), ("result", "killed")],
            1.0,
            EXCHANGE_LIMIT,
            side,
        )
        .await;
    }
    wait_killed_audit(&agent_a, &id, "a session killed at its agent").await;

    // The same from the DMZ's side: the agent's audit record says killed too.
    let mut doomed = open_on(public, b'B').await;
    doomed.round_trip(b"x").await.expect("round trip");
    // The other session on engine-2 moved 1010 bytes toward the target; this one 1.
    let listed = json("relay-dmz", &["sessions"], &dmz_config).await;
    let doomed_id = listed["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["via"] == "engine-2" && x["bytes_partner_to_target"] == 1)
        .and_then(|x| x["id"].as_str())
        .unwrap_or_else(|| panic!("the new session on engine-2: {listed}"))
        .to_owned();
    let (code, out) = run("relay-dmz", &["kill", &doomed_id, "--config", &dmz_cfg]).await;
    assert_eq!(code, 0, "{out}");
    let mut rest = Vec::new();
    let read = tokio::time::timeout(EXCHANGE_LIMIT, doomed.stream.read_to_end(&mut rest)).await;
    assert!(matches!(read, Ok(Err(_))), "reset from the DMZ: {read:?}");
    wait_killed_audit(&agent_b, &doomed_id, "a session killed at the DMZ").await;
    other
        .round_trip(b"still here")
        .await
        .expect("the other session goes on");

    // Wrong ids, no token, a node that is down: clear errors, exit code 2.
    let (code, out) = run("relay-dmz", &["kill", "zz", "--config", &dmz_cfg]).await;
    assert_eq!(code, 2, "{out}");
    assert!(
        out.contains("400") && out.contains("16 hexadecimal digits"),
        "{out}"
    );
    let (code, out) = run("relay-dmz", &["kill", &id, "--config", &dmz_cfg]).await;
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("404") && out.contains("no session"), "{out}");
    let admin = dmz_opts.admin.to_string();
    let (code, out) = run("relay-dmz", &["status", "--admin", &admin]).await;
    assert_eq!(code, 2, "{out}");
    assert!(
        out.contains("401 unauthorized") && out.contains("--token-file"),
        "{out}"
    );
    let down = format!("127.0.0.1:{}", free_port());
    let (code, out) = run("relay-dmz", &["status", "--admin", &down]).await;
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("cannot reach the admin endpoint"), "{out}");
    let (code, out) = run("relay-dmz", &["drain", "--config", &dmz_cfg]).await;
    assert_eq!(code, 2, "{out}");

    // Drain engine-1: new sessions go to engine-2, its running session goes on; status says
    // so and exits 1 (not ready). Resume: engine-1 takes sessions again.
    let mut running = open_on(public, b'A').await;
    let (code, out) = run("relay-internal", &["drain", "--config", &a_cfg]).await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("drained"), "{out}");
    let gone = wait_for(SETUP_LIMIT, || async {
        let s = json("relay-dmz", &["status"], &dmz_config).await;
        s["services"][0]["agents"] == serde_json::json!(["engine-2"])
    })
    .await;
    assert!(gone.is_some(), "engine-1 still serves files after drain");
    assert!(
        tags(public, 10).await.iter().all(|t| *t == b'B'),
        "a new session went to the drained agent"
    );
    running
        .round_trip(b"during the drain")
        .await
        .expect("the running session goes on");
    let (code, table) = run("relay-internal", &["status", "--config", &a_cfg]).await;
    println!("$ relay-internal status (drained)\n{table}");
    assert_eq!(code, 1, "drained: not ready\n{table}");
    assert!(table.contains("drained by an operator"), "{table}");
    let (code, out) = run("relay-internal", &["resume", "--config", &a_cfg]).await;
    assert_eq!((code, out.trim()), (0, "resumed: services declared again"));
    let back = wait_for(SETUP_LIMIT, || async {
        tags(public, 4).await.contains(&b'A')
    })
    .await;
    assert!(back.is_some(), "engine-1 takes no session after resume");
    running.finish().await.expect("clean close");

    // engine-2 shuts down while a session of it runs: the DMZ shows it draining until then.
    let term = Command::new("kill")
        .args(["-TERM", &agent_b.guard.pid().to_string()])
        .status()
        .expect("run kill");
    assert!(term.success());
    let draining = wait_for(SETUP_LIMIT, || async {
        let s = json("relay-dmz", &["status"], &dmz_config).await;
        s["agents"].as_array().is_some_and(|a| {
            a.iter()
                .any(|x| x["identity"] == "engine-2" && x["draining"] == true)
        })
    })
    .await;
    assert!(
        draining.is_some(),
        "engine-2 not shown draining:\n{}",
        dmz.tail(20)
    );
    other
        .round_trip(b"during the drain")
        .await
        .expect("the session goes on");
}
