//! Backup destinations of an outbound partner: a dead primary, a backup outside the DMZ's
//! connect policy (never dialed), a live backup that takes the session; the audit record names
//! the address used.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_primary_falls_back_to_the_live_backup_and_a_denied_backup_is_never_dialed() {
    let pki = Pki::new();
    let live = tagged(9).await;
    let dead = local(free_port());
    // Outside the policy (only 127.0.0.1 is allowed): a connect here would be counted.
    let denied_listener = TcpListener::bind("127.0.0.2:0")
        .await
        .expect("bind 127.0.0.2");
    let denied = denied_listener.local_addr().expect("addr");
    let dialed_denied = Arc::new(AtomicUsize::new(0));
    let counter = dialed_denied.clone();
    let _denied_task = tokio::spawn(async move {
        while let Ok(_conn) = denied_listener.accept().await {
            counter.fetch_add(1, Ordering::Relaxed);
        }
    });
    let dmz = Dmz::start(
        &pki,
        DmzOptions {
            connect_allow: vec!["127.0.0.1/32:*".into()],
            ..Default::default()
        },
    )
    .await;
    let engine_port = local(free_port());
    let mut opts = AgentOptions::new(dmz.opts.tunnel, vec![]);
    opts.extra = format!(
        "\n[[outbound]]\nname = \"partner-x\"\nlisten = \"{engine_port}\"\ntarget = [\"{dead}\", \"{denied}\", \"{}\"]\n",
        live.addr
    );
    let agent = spawn_agent_captured(&pki, &opts);
    let first = wait_for(LIMIT, || async { session(engine_port).await.is_ok() }).await;
    assert!(
        first.is_some(),
        "no outbound session succeeded; agent log:\n{}",
        agent.tail(30)
    );

    let (tags, failures) = sessions(engine_port, 20).await;
    println!(
        "outbound, dead primary and a denied backup: {} of 20 on the live backup, {} failed",
        tags[9],
        failures.len()
    );
    assert!(failures.is_empty(), "{failures:?}");
    assert_eq!(tags[9], 20);
    assert_eq!(
        dialed_denied.load(Ordering::Relaxed),
        0,
        "a backup outside the policy was dialed"
    );
    let line = agent
        .wait_line(
            &["relay::audit", &format!("dialed=\"{}\"", live.addr)],
            LIMIT,
        )
        .await;
    assert!(line.contains("partner-x"), "{line}");
    let denials = dmz.rejections("policy_denied").await;
    assert!(
        denials >= 20.0,
        "policy denials of the backup counted: {denials}"
    );
}
