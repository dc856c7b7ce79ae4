//! Withdrawal: every target of a service down closes its public port (refused, not accepted and
//! reset) and `/readyz` says why; a target back reopens it. With a second agent serving the
//! service the port stays open and every session goes there.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_target_down_closes_the_port_and_a_target_back_reopens_it() {
    let a = tagged(1).await;
    let b = tagged(2).await;
    let (a_at, b_at) = (a.addr, b.addr);
    let public = free_port();
    let mut svc = Service::targets("as2", public, &[a_at, b_at]);
    svc.extra = FAST_TCP_CHECK.into();
    let s = site(vec![svc]).await;
    wait_open(local(public), LIMIT).await;
    let ready = wait_for(LIMIT, || async { readyz(s.dmz.opts.admin).await == 200 }).await;
    assert!(ready.is_some(), "DMZ not ready with the service open");

    let down = Instant::now();
    drop(a);
    drop(b);
    // No partner connects meanwhile: the active checks alone find it (a partner's session
    // would count as a passive failure and find it sooner).
    let admin = s.agent_opts.admin;
    let withdrawn = wait_for(LIMIT, || async move {
        metric(
            &metrics_text(admin).await,
            "relay_service_declared",
            &["service=\"as2\""],
        ) == Some(0.0)
    })
    .await
    .expect("service never withdrawn");
    wait_closed(local(public), LIMIT).await;
    let closed_at = down.elapsed();
    println!(
        "all targets down, no traffic: withdrawn after {withdrawn:?}, public port closed after {closed_at:?} (fall x interval = {FALL_TIME:?})"
    );
    assert!(
        closed_at <= FALL_TIME + Duration::from_secs(1),
        "closed after {closed_at:?}"
    );
    // Refused at the TCP level: no accept and reset.
    let refused = TcpStream::connect(local(public)).await;
    assert_eq!(
        refused.map(|_| ()).unwrap_err().kind(),
        std::io::ErrorKind::ConnectionRefused
    );
    let (status, body) = http_get(s.dmz.opts.admin, "/readyz").await.expect("readyz");
    assert_eq!(status, 503, "{body}");
    assert!(
        body.contains("withdrawn") && body.contains("as2"),
        "readyz does not say why: {body}"
    );
    s.agent
        .wait_line(&["no healthy target: service withdrawn", "as2"], LIMIT)
        .await;
    let agent_metrics = metrics_text(s.agent_opts.admin).await;
    assert_eq!(
        metric(
            &agent_metrics,
            "relay_service_declared",
            &["service=\"as2\""]
        ),
        Some(0.0)
    );
    assert_eq!(
        metric(
            &agent_metrics,
            "relay_service_withdrawals_total",
            &["service=\"as2\""]
        ),
        Some(1.0)
    );
    // Past the hold-down (500 ms), one target comes back.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_stays_closed(
        local(public),
        Duration::from_millis(300),
        "no target back yet",
    )
    .await;
    let back = Instant::now();
    let _b = tagged_on(b_at, 2).await;
    wait_open(local(public), LIMIT).await;
    let reopened = back.elapsed();
    println!(
        "a target back: public port open again after {reopened:?} (rise x interval = {RISE_TIME:?})"
    );
    assert!(
        reopened <= RISE_TIME + Duration::from_secs(1),
        "{reopened:?}"
    );
    let (tags, failures) = sessions(local(public), 10).await;
    assert!(failures.is_empty(), "{failures:?}");
    assert_eq!(tags[2], 10);
    let ready = wait_for(LIMIT, || async { readyz(s.dmz.opts.admin).await == 200 }).await;
    assert!(ready.is_some(), "readyz stays 503 after the reopening");
    assert_eq!(
        s.agent
            .count_lines(&["no healthy target: service withdrawn"]),
        1,
        "one withdrawal"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_agent_keeps_the_port_open_and_takes_every_session() {
    let pki = Pki::new();
    let dmz = Dmz::start(&pki, DmzOptions::default()).await;
    let one = tagged(1).await;
    let two = tagged(2).await;
    let public = free_port();
    let mut svc1 = Service::targets("sftp", public, &[one.addr]);
    svc1.extra = FAST_TCP_CHECK.into();
    let opts1 = AgentOptions::new(dmz.opts.tunnel, vec![svc1]);
    let agent1 = spawn_agent_captured(&pki, &opts1);
    let mut svc2 = Service::targets("sftp", public, &[two.addr]);
    svc2.extra = FAST_TCP_CHECK.into();
    let mut opts2 = AgentOptions::new(dmz.opts.tunnel, vec![svc2]);
    opts2.identity = "engine-2".into();
    let agent2 = spawn_agent_captured(&pki, &opts2);
    wait_open(local(public), LIMIT).await;
    // Both agents serve it before the failure.
    let both = wait_for(LIMIT, || async {
        let (tags, _) = sessions(local(public), 10).await;
        tags[1] > 0 && tags[2] > 0
    })
    .await;
    assert!(both.is_some(), "sessions never reached both agents");

    let t0 = Instant::now();
    let load = Load::start(local(public), 4, t0);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let killed_at = t0.elapsed();
    drop(one);
    agent1
        .wait_line(&["no healthy target: service withdrawn", "sftp"], LIMIT)
        .await;
    let withdrawn_at = t0.elapsed();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (ok, failures) = load.finish().await;
    println!(
        "two agents, one loses its target: withdrawn {:?} after the kill, {ok} sessions ok, {} failed: {failures:?}",
        withdrawn_at - killed_at,
        failures.len()
    );
    // The DMZ tries the other agent when one answers that its targets failed: only a session
    // the dying target had already accepted (in its backlog) can fail, inside the window.
    assert!(
        failures
            .iter()
            .all(|(at, _)| *at >= killed_at && *at <= withdrawn_at + Duration::from_millis(100)),
        "failures outside the detection window ({killed_at:?}..{withdrawn_at:?}): {failures:?}"
    );
    assert!(
        failures.len() <= 4,
        "more failures than sessions in flight: {failures:?}"
    );
    assert!(accepts(local(public)).await, "the port stays open");
    let (tags, failures) = sessions(local(public), 100).await;
    assert!(failures.is_empty(), "{failures:?}");
    assert_eq!(tags[2], 100, "every session on the other agent");
    assert_eq!(readyz(dmz.opts.admin).await, 200);
    drop((agent1, agent2));
}
