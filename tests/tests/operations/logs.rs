//! JSON logs and the audit trail: the agent (`--log-format json`) writes one audit record per
//! session with exact byte counts, and one for a partner the DMZ refused by the service's
//! allow list (sent over the control stream); the DMZ writes nothing per session.

use std::collections::HashSet;
use std::time::Duration;

use relay_e2e::*;
use relay_tunnel::metrics as m;
use serde_json::Value;
use tokio::io::AsyncReadExt;

use super::*;

/// Every complete non-empty line of `text` (a line still being written is left out) as a JSON
/// object; panics on the first line that is not.
fn json_lines(side: &str, text: &str) -> Vec<Value> {
    let complete = text.rfind('\n').map_or("", |end| &text[..end]);
    complete
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let v: Value = serde_json::from_str(l)
                .unwrap_or_else(|e| panic!("{side}: log line is not JSON ({e}): {l}"));
            assert!(v.is_object(), "{side}: log line is not a JSON object: {l}");
            for key in ["timestamp", "level", "target"] {
                assert!(
                    v.get(key).is_some(),
                    "{side}: log line without {key:?}: {l}"
                );
            }
            v
        })
        .collect()
}

/// An event field: under `fields` (tracing-subscriber's JSON layout) or at the top level.
fn field<'a>(record: &'a Value, name: &str) -> Option<&'a Value> {
    record
        .get("fields")
        .and_then(|f| f.get(name))
        .or_else(|| record.get(name))
}

fn text_field(record: &Value, name: &str) -> String {
    match field(record, name) {
        Some(Value::String(s)) => s.clone(),
        other => panic!("audit record field {name:?} is {other:?} in {record}"),
    }
}

fn number_field(record: &Value, name: &str) -> u64 {
    field(record, name)
        .and_then(Value::as_u64)
        .unwrap_or_else(|| panic!("audit record field {name:?} is not a number in {record}"))
}

fn audit_records(lines: &[Value]) -> Vec<Value> {
    lines
        .iter()
        .filter(|v| v.get("target").and_then(Value::as_str) == Some("relay::audit"))
        .cloned()
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_and_one_audit_record_per_session() {
    let _serial = SERIAL.lock().await;
    let pki = Pki::new();
    let echo = targets::echo().await;
    let dmz_opts = DmzOptions {
        keepalive: "5s",
        ..Default::default()
    };
    let dmz = spawn_dmz_logged(&pki, &dmz_opts, &["--log-format", "json"], "dmz");
    let (port, guarded_port) = (free_port(), free_port());
    let mut guarded = Service::new("guarded", guarded_port, echo.addr);
    guarded.extra = "allow = [\"127.0.0.1/32\"]".into();
    let mut agent_opts = AgentOptions::new(
        dmz_opts.tunnel,
        vec![Service::new("echo", port, echo.addr), guarded],
    );
    agent_opts.keepalive = "5s";
    let (mut agent, _) = spawn_agent_logged(&pki, &agent_opts, &["--log-format", "json"], "agent");
    let dmz_admin = dmz_opts.admin;
    let up = wait_for(SETUP_LIMIT, || async {
        current(dmz_admin, m::TUNNELS_CONNECTED, &[("agent", "engine-1")]).await == 2.0
            && current(dmz_admin, m::LISTENER_OPEN, &[("service", "echo")]).await == 1.0
            && current(dmz_admin, m::LISTENER_OPEN, &[("service", "guarded")]).await == 1.0
    })
    .await;
    assert!(
        up.is_some(),
        "tunnels not up\n{}\n{}",
        dmz.tail(20),
        agent.tail(20)
    );
    let dmz_before = dmz.stderr_text().len() + dmz.stdout_text().len();

    let sizes = [1_000usize, 20_000, 300_000];
    let mut partners = Vec::new();
    for (i, &len) in sizes.iter().enumerate() {
        let data = pattern(len, 100 + i as u64);
        partners.push(echo_session(PARTNER_IP, addr([127, 0, 0, 1], port), &data).await);
    }
    // A partner outside the allow list: the DMZ closes it before any agent sees it.
    let mut refused = connect_from(PARTNER_IP, addr([127, 0, 0, 1], guarded_port))
        .await
        .expect("connect to the guarded port");
    let refused_partner = refused.local_addr().expect("local addr");
    let mut got = Vec::new();
    let read = tokio::time::timeout(EXCHANGE_LIMIT, refused.read_to_end(&mut got)).await;
    assert!(read.is_ok(), "the DMZ did not close the refused partner");
    assert!(
        got.is_empty(),
        "the refused partner received {} bytes",
        got.len()
    );

    let want = sizes.len() + 1;
    let all = wait_for(SETUP_LIMIT, || async {
        audit_records(&json_lines("agent", &agent.stderr_text())).len() >= want
    })
    .await;
    assert!(
        all.is_some(),
        "fewer than {want} audit records\n{}",
        agent.tail(30)
    );
    // Late duplicates would show up here.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let dmz_during = format!("{}{}", dmz.stdout_text(), dmz.stderr_text());
    let dmz_new = dmz_during.get(dmz_before..).unwrap_or_default().to_owned();

    agent.guard.signal(nix::sys::signal::Signal::SIGTERM);
    let (status, _) = agent
        .guard
        .wait_exit(Duration::from_secs(40))
        .await
        .expect("agent exits after SIGTERM");
    assert!(status.success(), "agent exit status {status}");

    let lines = json_lines("agent", &agent.stderr_text());
    assert!(
        agent.stdout_text().trim().is_empty(),
        "agent wrote to stdout: {}",
        agent.stdout_text()
    );
    let audit = audit_records(&lines);
    println!(
        "json_logs_and_one_audit_record_per_session: agent wrote {} JSON lines, {} audit records",
        lines.len(),
        audit.len()
    );
    assert_eq!(audit.len(), want, "audit records: {audit:#?}");

    let mut ids = HashSet::new();
    let node = dmz_opts.tunnel.to_string();
    for (&len, partner) in sizes.iter().zip(&partners) {
        let matching: Vec<&Value> = audit
            .iter()
            .filter(|r| field(r, "partner").and_then(Value::as_str) == Some(&partner.to_string()))
            .collect();
        assert_eq!(
            matching.len(),
            1,
            "audit records of partner {partner}: {matching:#?}"
        );
        let r = matching[0];
        println!(
            "json_logs_and_one_audit_record_per_session: audit record of a {len}-byte session: {r}"
        );
        assert_eq!(text_field(r, "service"), "echo");
        assert_eq!(text_field(r, "direction"), "inbound");
        assert_eq!(text_field(r, "dmz"), node);
        assert_eq!(text_field(r, "outcome"), "ok");
        assert_eq!(number_field(r, "bytes_partner_to_target"), len as u64);
        assert_eq!(number_field(r, "bytes_target_to_partner"), len as u64);
        number_field(r, "duration_ms");
        let id = text_field(r, "session");
        assert!(
            !id.is_empty() && ids.insert(id.clone()),
            "session id {id:?} empty or repeated"
        );
    }
    let r = audit
        .iter()
        .find(|r| field(r, "partner").and_then(Value::as_str) == Some(&refused_partner.to_string()))
        .unwrap_or_else(|| {
            panic!("no audit record of the refused partner {refused_partner}: {audit:#?}")
        });
    println!(
        "json_logs_and_one_audit_record_per_session: audit record of the refused partner: {r}"
    );
    assert_eq!(text_field(r, "service"), "guarded");
    assert_eq!(text_field(r, "direction"), "inbound");
    assert_eq!(text_field(r, "outcome"), "source_denied");
    assert_eq!(number_field(r, "bytes_partner_to_target"), 0);
    assert_eq!(number_field(r, "bytes_target_to_partner"), 0);
    number_field(r, "duration_ms");
    let id = text_field(r, "session");
    assert!(
        !id.is_empty() && ids.insert(id.clone()),
        "session id {id:?} empty or repeated"
    );
    assert_eq!(
        text_field(r, "dmz"),
        node,
        "the refused record does not name its DMZ node"
    );

    // The DMZ stays terse: JSON too, and nothing about the sessions that went through. A
    // refused partner is bad input and may get one rate-limited line.
    json_lines("DMZ", &dmz_during);
    println!(
        "json_logs_and_one_audit_record_per_session: the DMZ wrote {} lines during the {} sessions",
        dmz_new.lines().count(),
        want
    );
    let partner_ip = std::net::Ipv4Addr::from(PARTNER_IP).to_string();
    for line in dmz_new.lines() {
        if line.contains("partner source denied") {
            assert!(
                line.contains(&refused_partner.to_string()),
                "the refusal line names another partner: {line}"
            );
            continue;
        }
        assert!(
            !line.contains(&partner_ip) && !ids.iter().any(|id| line.contains(id.as_str())),
            "the DMZ logged a session at info level: {line}"
        );
        assert!(
            !line.contains("\"session\""),
            "the DMZ logged inside a session span: {line}"
        );
    }
}
