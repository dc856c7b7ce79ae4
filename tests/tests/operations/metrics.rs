//! Metrics exactness: a DMZ node and an agent as processes, ten echo sessions of known sizes,
//! then both `/metrics` pages parsed and checked against the exact sums.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use prometheus_parse::{Scrape, Value};
use relay_e2e::*;
use relay_tunnel::metrics as m;

use super::*;

/// Sessions run.
const SESSIONS: usize = 10;
/// Tunnel connections of the agent.
const CONNECTIONS: usize = 2;

/// The size of session `i` (1-based): i × 37 KiB + i bytes, so no two sizes are equal and none
/// is a multiple of a buffer size.
fn size(i: usize) -> usize {
    i * 37 * 1024 + i
}

/// The metric family a sample belongs to (histogram series carry suffixes).
fn family(name: &str) -> &str {
    ["_bucket", "_sum", "_count"]
        .iter()
        .find_map(|s| name.strip_suffix(s))
        .unwrap_or(name)
}

/// Label values that look like an IP address (v4 dotted quad, or anything that parses as an
/// address or a socket address), with their metric and label name.
fn ip_like_labels(scrape: &Scrape) -> Vec<(String, String, String)> {
    let v4 = regex::Regex::new(r"(^|[^0-9.])\d{1,3}(\.\d{1,3}){3}([^0-9.]|$)").expect("regex");
    let mut found = Vec::new();
    for s in &scrape.samples {
        for (k, v) in s.labels.iter() {
            if v4.is_match(v) || v.parse::<IpAddr>().is_ok() || v.parse::<SocketAddr>().is_ok() {
                found.push((s.metric.clone(), k.clone(), v.clone()));
            }
        }
    }
    found
}

/// Checks shared by both sides: every family described, no IP-like label value except the
/// `dmz` label of the agent (the configured node addresses), build info present.
fn check_common(side: &str, text: &str, scrape: &Scrape, dmz_nodes: &[String]) {
    let families: BTreeSet<&str> = scrape.samples.iter().map(|s| family(&s.metric)).collect();
    let undocumented: Vec<&&str> = families
        .iter()
        .filter(|f| !scrape.docs.contains_key(**f))
        .collect();
    assert!(
        undocumented.is_empty(),
        "{side}: metric families without # HELP: {undocumented:?}"
    );
    assert!(
        families.iter().all(|f| f.starts_with("relay_")),
        "{side}: metric families without the relay_ prefix: {families:?}"
    );
    let partner = format!(
        "{}.{}.{}.{}",
        PARTNER_IP[0], PARTNER_IP[1], PARTNER_IP[2], PARTNER_IP[3]
    );
    assert!(
        !text.contains(&partner),
        "{side}: the partner address {partner} appears in /metrics:\n{text}"
    );
    let ip_like: Vec<_> = ip_like_labels(scrape)
        .into_iter()
        .filter(|(_, k, v)| !(k == "dmz" && dmz_nodes.contains(v)))
        .collect();
    assert!(
        ip_like.is_empty(),
        "{side}: label values that look like IP addresses: {ip_like:?}"
    );
    let version = env!("CARGO_PKG_VERSION");
    assert_eq!(
        value(scrape, m::BUILD_INFO, &[("version", version)]),
        Some(1.0),
        "{side}: relay_build_info{{version=\"{version}\"}} 1 missing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_exact_on_dmz_and_agent() {
    let _serial = SERIAL.lock().await;
    let pki = Pki::new();
    let echo = targets::echo().await;
    let dmz_opts = DmzOptions {
        keepalive: "5s",
        ..Default::default()
    };
    let dmz = spawn_dmz_logged(&pki, &dmz_opts, &[], "dmz");
    let port = free_port();
    let public = addr([127, 0, 0, 1], port);
    let mut agent_opts =
        AgentOptions::new(dmz_opts.tunnel, vec![Service::new("echo", port, echo.addr)]);
    agent_opts.connections = CONNECTIONS;
    agent_opts.keepalive = "5s";
    let (agent, _) = spawn_agent_logged(&pki, &agent_opts, &[], "agent");
    let (dmz_admin, agent_admin) = (dmz_opts.admin, agent_opts.admin);
    let node = dmz_opts.tunnel.to_string();

    // Readiness from the metrics alone: a TCP probe of the public port would be a session.
    let n = CONNECTIONS as f64;
    let up = wait_for(SETUP_LIMIT, || async {
        current(dmz_admin, m::TUNNELS_CONNECTED, &[("agent", "engine-1")]).await == n
            && current(agent_admin, m::TUNNELS_CONNECTED, &[("dmz", &node)]).await == n
            && current(dmz_admin, m::LISTENER_OPEN, &[("service", "echo")]).await == 1.0
    })
    .await;
    assert!(
        up.is_some(),
        "tunnels not up\n{}\n{}",
        dmz.tail(20),
        agent.tail(20)
    );

    let started = Instant::now();
    let mut total = 0u64;
    for i in 1..=SESSIONS {
        let data = pattern(size(i), i as u64);
        echo_session(PARTNER_IP, public, &data).await;
        total += data.len() as u64;
    }
    let took = started.elapsed();
    let ok = [
        ("service", "echo"),
        ("direction", "inbound"),
        ("result", "ok"),
    ];
    for (side, admin) in [("DMZ", dmz_admin), ("agent", agent_admin)] {
        wait_metric(
            admin,
            m::SESSIONS_TOTAL,
            &ok,
            SESSIONS as f64,
            Duration::from_secs(10),
            side,
        )
        .await;
    }

    let (dmz_text, dmz_scrape) = scrape(dmz_admin).await;
    let (agent_text, agent_scrape) = scrape(agent_admin).await;
    println!(
        "metrics_are_exact_on_dmz_and_agent: {SESSIONS} echo sessions, {total} bytes each way, in {} ms",
        took.as_millis()
    );

    for (side, s) in [("DMZ", &dmz_scrape), ("agent", &agent_scrape)] {
        for direction in [m::PARTNER_TO_TARGET, m::TARGET_TO_PARTNER] {
            let got = value(
                s,
                m::BYTES,
                &[("service", "echo"), ("direction", direction)],
            );
            println!(
                "metrics_are_exact_on_dmz_and_agent: {side} relay_bytes_total{{direction=\"{direction}\"}} = {got:?} (expected {total})"
            );
            assert_eq!(got, Some(total as f64), "{side}: bytes {direction}");
        }
        assert_eq!(
            value(s, m::SESSIONS_TOTAL, &ok),
            Some(SESSIONS as f64),
            "{side}: ok sessions"
        );
        assert_eq!(
            value(s, m::SESSIONS_TOTAL, &[("service", "echo")]),
            Some(SESSIONS as f64),
            "{side}: sessions of every result (a stray session was counted)"
        );
        assert_eq!(
            value(
                s,
                m::SESSIONS_ACTIVE,
                &[("service", "echo"), ("direction", "inbound")]
            ),
            Some(0.0),
            "{side}: sessions still active"
        );
    }
    assert_eq!(
        value(&dmz_scrape, m::TUNNELS_CONNECTED, &[("agent", "engine-1")]),
        Some(n),
        "DMZ: tunnels of engine-1"
    );
    assert_eq!(
        value(&agent_scrape, m::TUNNELS_CONNECTED, &[("dmz", &node)]),
        Some(n),
        "agent: tunnels to the DMZ node"
    );
    assert_eq!(
        value(&dmz_scrape, m::LISTENER_OPEN, &[("service", "echo")]),
        Some(1.0),
        "DMZ: listener open"
    );
    assert_eq!(
        value(&dmz_scrape, m::REGISTRATIONS, &[("result", "accepted")]),
        Some(n),
        "DMZ: one accepted registration per tunnel"
    );

    // Counters with known labels exist from the start at 0, so rate() and alerts work before
    // the first event: every rejection reason of each side, rejected registrations, failed
    // reloads, and every result of the service's sessions.
    for (side, s, reasons, results) in [
        (
            "DMZ",
            &dmz_scrape,
            m::DMZ_REJECTION_REASONS,
            m::DMZ_INBOUND_RESULTS,
        ),
        (
            "agent",
            &agent_scrape,
            m::AGENT_REJECTION_REASONS,
            m::AGENT_INBOUND_RESULTS,
        ),
    ] {
        for reason in reasons {
            assert_eq!(
                value(s, m::REJECTIONS, &[("reason", reason)]),
                Some(0.0),
                "{side}: relay_rejections_total{{reason=\"{reason}\"}}"
            );
        }
        for result in results.iter().chain(&["idle", "reset", "internal_error"]) {
            let labels = [
                ("service", "echo"),
                ("direction", "inbound"),
                ("result", result),
            ];
            assert_eq!(
                value(s, m::SESSIONS_TOTAL, &labels),
                Some(0.0),
                "{side}: relay_sessions_total{labels:?}"
            );
        }
        assert_eq!(
            value(s, m::CONFIG_RELOADS, &[("result", "error")]),
            Some(0.0),
            "{side}: failed reloads"
        );
    }
    assert_eq!(
        value(&dmz_scrape, m::REGISTRATIONS, &[("result", "rejected")]),
        Some(0.0),
        "DMZ: rejected registrations"
    );

    // The setup histogram: one observation per session, all in the +Inf bucket.
    let setup = dmz_scrape
        .samples
        .iter()
        .find(|s| s.metric == m::SESSION_SETUP && s.labels.get("direction") == Some("inbound"))
        .expect("DMZ: relay_session_setup_seconds{direction=\"inbound\"}");
    let Value::Histogram(buckets) = &setup.value else {
        panic!(
            "relay_session_setup_seconds is not a histogram: {:?}",
            setup.value
        );
    };
    let inf = buckets
        .iter()
        .find(|b| b.less_than.is_infinite())
        .map(|b| b.count);
    assert_eq!(inf, Some(SESSIONS as f64), "setup histogram +Inf bucket");
    let count = value(
        &dmz_scrape,
        &format!("{}_count", m::SESSION_SETUP),
        &[("direction", "inbound")],
    );
    assert_eq!(count, Some(SESSIONS as f64), "setup histogram count");
    let p = |q: f64| {
        let rank = q * SESSIONS as f64;
        buckets
            .iter()
            .find(|b| b.count >= rank)
            .map_or(f64::INFINITY, |b| b.less_than)
    };
    println!(
        "metrics_are_exact_on_dmz_and_agent: setup latency on the DMZ: p50 <= {} s, p99 <= {} s (bucket bounds)",
        p(0.5),
        p(0.99)
    );
    let duration_count = value(&dmz_scrape, &format!("{}_count", m::SESSION_DURATION), &[]);
    assert_eq!(
        duration_count,
        Some(SESSIONS as f64),
        "DMZ: duration histogram count"
    );

    // The agent times its own part: stream arrival to target connected, and the session.
    for (name, labels) in [
        (
            format!("{}_count", m::SESSION_SETUP),
            &[("direction", "inbound")][..],
        ),
        (format!("{}_count", m::SESSION_DURATION), &[][..]),
    ] {
        assert_eq!(
            value(&agent_scrape, &name, labels),
            Some(SESSIONS as f64),
            "agent: {name}"
        );
    }

    check_common("DMZ", &dmz_text, &dmz_scrape, &[]);
    check_common(
        "agent",
        &agent_text,
        &agent_scrape,
        std::slice::from_ref(&node),
    );

    for (side, text) in [("DMZ", &dmz_text), ("agent", &agent_text)] {
        println!(
            "metrics_are_exact_on_dmz_and_agent: --- {side} /metrics after the workload (buckets left out)"
        );
        for line in text
            .lines()
            .filter(|l| !l.contains("_bucket{") && !l.is_empty())
        {
            println!("{line}");
        }
    }
}
