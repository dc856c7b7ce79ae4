//! Hot reload of an agent: services added, removed and re-targeted with `POST /reload` (pushed
//! to both DMZ nodes on the control streams), and the same through SIGHUP on a process.

use std::net::SocketAddr;
use std::time::Duration;

use relay_e2e::haproxy::BINDS;
use relay_e2e::*;
use relay_tunnel::metrics as m;

use super::*;

/// Opens a session on `public` and checks the target's tag, then closes it cleanly.
async fn tag_of(public: SocketAddr) -> u8 {
    let s = OpenSession::open(public)
        .await
        .unwrap_or_else(|e| panic!("session through {public}: {e}"));
    let tag = s.tag;
    s.finish().await.expect("clean close");
    tag
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_reload_adds_removes_and_retargets_services() {
    let _serial = SERIAL.lock().await;
    let pki = Pki::new();
    let (ta, tb, tc) = (
        targets::tagged_echo(b'A').await,
        targets::tagged_echo(b'B').await,
        targets::tagged_echo(b'C').await,
    );
    let node = |i: usize| DmzOptions {
        public_bind: Some(std::net::Ipv4Addr::from(BINDS[i]).to_string()),
        ..Default::default()
    };
    let nodes = [node(0), node(1)];
    let _d1 = start_dmz(&pki, &nodes[0]).await;
    let _d2 = start_dmz(&pki, &nodes[1]).await;
    let (pk, pa) = (free_port(), free_port());
    let keep = Service::new("ag-keep", pk, ta.addr);
    let added = Service::new("ag-added", pa, tb.addr);
    let mut opts = AgentOptions::new(nodes[0].tunnel, vec![keep.clone()]);
    opts.dmz = vec![nodes[0].tunnel, nodes[1].tunnel];
    let _agent = start_agent(&pki, &opts).await;
    let config = pki.path(&format!("agent-{}.toml", opts.admin.port()));
    for bind in BINDS {
        wait_open(addr(bind, pk), SETUP_LIMIT).await;
        assert!(
            !accepts(addr(bind, pa)).await,
            "the service to add is already open"
        );
    }
    let ok = [("result", "ok")];
    let ok_before = current(opts.admin, m::CONFIG_RELOADS, &ok).await;

    // Add a service: it opens on both nodes.
    opts.services = vec![keep.clone(), added.clone()];
    std::fs::write(&config, opts.toml(&pki)).expect("write agent config");
    let (status, body) = post_reload(opts.admin).await;
    println!("agent_reload_adds_removes_and_retargets_services: add -> {status}: {body}");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("pushed"), "{body}");
    for (i, bind) in BINDS.iter().enumerate() {
        let t = wait_open(addr(*bind, pa), Duration::from_secs(10)).await;
        println!(
            "agent_reload_adds_removes_and_retargets_services: added service open on node {} {} ms after the reload answer",
            i + 1,
            t.as_millis()
        );
        assert_eq!(tag_of(addr(*bind, pa)).await, b'B');
    }

    // Remove it: it closes on both nodes; a session of the other service continues.
    let mut kept = OpenSession::open(addr(BINDS[0], pk))
        .await
        .expect("session of the kept service");
    assert_eq!(kept.tag, b'A');
    kept.round_trip(b"before the removal")
        .await
        .expect("round trip");
    opts.services = vec![keep.clone()];
    std::fs::write(&config, opts.toml(&pki)).expect("write agent config");
    let (status, body) = post_reload(opts.admin).await;
    println!("agent_reload_adds_removes_and_retargets_services: remove -> {status}: {body}");
    assert_eq!(status, 200, "{body}");
    for bind in BINDS {
        wait_closed(addr(bind, pa), Duration::from_secs(10)).await;
    }
    kept.round_trip(b"after the removal")
        .await
        .expect("the other service's session continues");

    // Change the target: new sessions reach the new one; the session in flight stays on the old.
    let mut retargeted = keep.clone();
    retargeted.target = tc.addr.to_string();
    opts.services = vec![retargeted];
    opts.keepalive = "2s";
    std::fs::write(&config, opts.toml(&pki)).expect("write agent config");
    let (status, body) = post_reload(opts.admin).await;
    println!("agent_reload_adds_removes_and_retargets_services: retarget -> {status}: {body}");
    assert_eq!(status, 200, "{body}");
    assert!(
        body.contains("keepalive") && body.contains("restart"),
        "restart keys not named: {body}"
    );
    for bind in BINDS {
        assert_eq!(
            tag_of(addr(bind, pk)).await,
            b'C',
            "a new session did not reach the new target"
        );
    }
    kept.round_trip(b"after the retarget")
        .await
        .expect("the session to the old target continues");
    assert_eq!(kept.tag, b'A');
    kept.finish()
        .await
        .expect("clean close of the session in flight");
    assert_eq!(
        current(opts.admin, m::CONFIG_RELOADS, &ok).await - ok_before,
        3.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_sighup_reloads_like_post() {
    let _serial = SERIAL.lock().await;
    let pki = Pki::new();
    let (ta, tb) = (
        targets::tagged_echo(b'A').await,
        targets::tagged_echo(b'B').await,
    );
    let dmz = DmzOptions::default();
    let _dmz = start_dmz(&pki, &dmz).await;
    let (p1, p2) = (free_port(), free_port());
    let first = Service::new("hup-first", p1, ta.addr);
    let second = Service::new("hup-second", p2, tb.addr);
    let mut opts = AgentOptions::new(dmz.tunnel, vec![first.clone()]);
    let (mut agent, config) = spawn_agent_logged(&pki, &opts, &[], "agent");
    wait_open(addr([127, 0, 0, 1], p1), SETUP_LIMIT).await;
    let admin = opts.admin;
    let reloads = |result: &'static str| async move {
        current(admin, m::CONFIG_RELOADS, &[("result", result)]).await
    };

    opts.services = vec![first.clone(), second.clone()];
    std::fs::write(&config, opts.toml(&pki)).expect("write agent config");
    agent.guard.signal(nix::sys::signal::Signal::SIGHUP);
    let t = wait_open(addr([127, 0, 0, 1], p2), Duration::from_secs(10)).await;
    println!(
        "agent_sighup_reloads_like_post: SIGHUP added a service, open {} ms later",
        t.as_millis()
    );
    assert_eq!(tag_of(addr([127, 0, 0, 1], p2)).await, b'B');
    assert_eq!(reloads("ok").await, 1.0);

    // A broken file: nothing changes, the error is counted and logged.
    std::fs::write(&config, "dmz = [\"unterminated\n").expect("write broken config");
    agent.guard.signal(nix::sys::signal::Signal::SIGHUP);
    let counted = wait_for(Duration::from_secs(5), || async {
        reloads("error").await == 1.0
    })
    .await;
    assert!(
        counted.is_some(),
        "broken reload not counted\n{}",
        agent.tail(10)
    );
    assert!(
        agent.stderr_text().contains("config reload failed"),
        "{}",
        agent.tail(10)
    );
    assert_eq!(tag_of(addr([127, 0, 0, 1], p1)).await, b'A');
    assert_eq!(tag_of(addr([127, 0, 0, 1], p2)).await, b'B');
    assert!(
        agent.guard.child.try_wait().expect("try_wait").is_none(),
        "agent exited"
    );

    // Remove a service through SIGHUP.
    opts.services = vec![first];
    std::fs::write(&config, opts.toml(&pki)).expect("write agent config");
    agent.guard.signal(nix::sys::signal::Signal::SIGHUP);
    wait_closed(addr([127, 0, 0, 1], p2), Duration::from_secs(10)).await;
    assert_eq!(tag_of(addr([127, 0, 0, 1], p1)).await, b'A');
    assert_eq!((reloads("ok").await, reloads("error").await), (2.0, 1.0));
}
