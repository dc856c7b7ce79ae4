//! HAProxy in front of two DMZ nodes, checking their `/readyz`: when every target of the only
//! service is down, the agent withdraws it from both nodes, both close the port and turn
//! unready, and HAProxy takes both out; a target back brings them in again.

use relay_e2e::haproxy::{BINDS, Haproxy, haproxy_or_skip};

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_load_balancer_sees_both_nodes_go_down_and_come_back() {
    let Some(haproxy) = haproxy_or_skip("the_load_balancer_sees_both_nodes_go_down_and_come_back")
    else {
        return;
    };
    let pki = Pki::new();
    let binds = BINDS.map(std::net::Ipv4Addr::from);
    let port = free_block(1, &binds);
    let mut nodes = Vec::new();
    for b in binds {
        let opts = DmzOptions {
            public_bind: Some(b.to_string()),
            ..Default::default()
        };
        nodes.push(Dmz::start(&pki, opts).await);
    }
    let target = tagged(5).await;
    let target_at = target.addr;
    let mut svc = Service::targets("as2", port, &[target_at]);
    svc.extra = FAST_TCP_CHECK.into();
    let mut opts = AgentOptions::new(nodes[0].opts.tunnel, vec![svc]);
    opts.dmz.push(nodes[1].opts.tunnel);
    let agent = spawn_agent_captured(&pki, &opts);
    let publics = binds.map(|b| SocketAddr::from((b, port)));
    for p in publics {
        wait_open(p, LIMIT).await;
    }
    let lb = Haproxy::spawn(
        &pki,
        &haproxy,
        port,
        [nodes[0].opts.admin, nodes[1].opts.admin],
        Duration::from_secs(30),
    );
    let up = wait_for(LIMIT, || lb.all_in("UP")).await;
    assert!(up.is_some(), "{:?}\n{}", lb.states().await, lb.tail(20));
    let (tags, failures) = sessions(lb.addr, 20).await;
    assert!(failures.is_empty(), "{failures:?}");
    assert_eq!(tags[5], 20);

    let down = Instant::now();
    drop(target);
    for p in publics {
        wait_closed(p, LIMIT).await;
    }
    let closed = down.elapsed();
    let lb_down = wait_for(LIMIT, || lb.all_in("DOWN")).await;
    assert!(
        lb_down.is_some(),
        "{:?}\n{}",
        lb.states().await,
        lb.tail(20)
    );
    let lb_down = down.elapsed();
    println!(
        "LB, every target down: both nodes closed the port after {closed:?}, HAProxy saw both down after {lb_down:?}"
    );
    assert!(closed <= FALL_TIME + Duration::from_secs(1), "{closed:?}");
    for n in &nodes {
        let (status, body) = http_get(n.opts.admin, "/readyz").await.expect("readyz");
        assert_eq!(status, 503, "{body}");
        assert!(body.contains("withdrawn") && body.contains("as2"), "{body}");
    }
    assert!(
        session(lb.addr).await.is_err(),
        "a session through the LB with no node up"
    );
    assert_eq!(
        agent.count_lines(&["no healthy target: service withdrawn"]),
        1,
        "{}",
        agent.tail(20)
    );

    tokio::time::sleep(Duration::from_millis(600)).await;
    let back = Instant::now();
    let _target = tagged_on(target_at, 5).await;
    for p in publics {
        wait_open(p, LIMIT).await;
    }
    let reopened = back.elapsed();
    let lb_up = wait_for(LIMIT, || lb.all_in("UP")).await;
    assert!(lb_up.is_some(), "{:?}\n{}", lb.states().await, lb.tail(20));
    let lb_up = back.elapsed();
    println!(
        "LB, target back: both nodes reopened after {reopened:?}, HAProxy saw both up after {lb_up:?}"
    );
    assert!(
        reopened <= RISE_TIME + Duration::from_secs(1),
        "{reopened:?}"
    );
    let (tags, failures) = sessions(lb.addr, 20).await;
    assert!(failures.is_empty(), "{failures:?}");
    assert_eq!(tags[5], 20);
}
