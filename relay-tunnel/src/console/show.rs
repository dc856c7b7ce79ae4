//! How `status` and `sessions` print: tables like `kubectl get`, or the JSON as it came.

use serde_json::Value;

use super::Target;

/// Lines of left-aligned columns, two spaces apart; the first row is the header.
pub fn table(rows: &[Vec<String>]) -> String {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|i| {
            rows.iter()
                .filter_map(|r| r.get(i))
                .map(|c| c.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in rows {
        let line: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        out += line.join("  ").trim_end();
        out.push('\n');
    }
    out
}

fn text(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) if s.is_empty() => "-".into(),
        Value::String(s) => s.clone(),
        Value::Bool(b) => if *b { "yes" } else { "no" }.into(),
        Value::Array(a) if a.is_empty() => "-".into(),
        Value::Array(a) => a.iter().map(text).collect::<Vec<_>>().join(","),
        other => other.to_string(),
    }
}

fn header(cells: &[&str]) -> Vec<String> {
    cells.iter().map(|c| (*c).to_owned()).collect()
}

/// An age or an uptime: "42s", "5m", "3h 2m", "12d 3h".
fn duration(seconds: u64) -> String {
    if seconds < 60 {
        format!("{seconds}s")
    } else {
        crate::expiry::human_left(i64::try_from(seconds).unwrap_or(i64::MAX))
    }
}

/// `status`: prints the node's status; `Ok(true)` when it is ready.
pub fn status(target: &Target, json: bool) -> Result<bool, String> {
    let s = target.json("/status")?;
    let ready = s["ready"].as_bool().unwrap_or(false);
    if json {
        println!("{}", serde_json::to_string_pretty(&s).unwrap_or_default());
        return Ok(ready);
    }
    let state = if ready {
        "ready".to_owned()
    } else {
        format!("NOT READY: {}", text(&s["reason"]))
    };
    println!(
        "{} {} at {}: {state}; up {} (since {})",
        text(&s["binary"]),
        text(&s["version"]),
        target.admin,
        duration(s["uptime_seconds"].as_u64().unwrap_or(0)),
        text(&s["started"]),
    );
    if let Some(sandbox) = s["sandbox"].as_object() {
        println!(
            "sandbox: mode {}; Landlock: {}; seccomp: {}",
            text(&sandbox["mode"]),
            text(&sandbox["landlock"]),
            text(&sandbox["seccomp"]),
        );
    }
    let empty = Vec::new();
    let rows = |key: &str| s[key].as_array().unwrap_or(&empty).clone();
    if s["binary"] == "relay-dmz" {
        let mut t = vec![header(&[
            "AGENT",
            "INSTANCE",
            "PEER",
            "SINCE",
            "INBOUND",
            "OUTBOUND",
            "SERVICES",
            "CERT LEFT",
        ])];
        for a in rows("agents") {
            t.push(vec![
                text(&a["identity"]),
                text(&a["instance"]),
                text(&a["peer"]),
                text(&a["connected_since"]),
                text(&a["tunnels"]["inbound"]),
                text(&a["tunnels"]["outbound"]),
                text(&a["services"]),
                text(&a["certificate"]["left"]),
            ]);
        }
        println!("\n{}", table(&t));
        let mut t = vec![header(&[
            "SERVICE", "LISTEN", "OPEN", "AGENTS", "ACTIVE", "ACCEPTED", "REFUSED",
        ])];
        for v in rows("services") {
            let open = if v["withdrawn"] == true {
                "withdrawn".into()
            } else {
                text(&v["open"])
            };
            t.push(vec![
                text(&v["name"]),
                text(&v["listen"]),
                open,
                text(&v["agents"]),
                text(&v["sessions_active"]),
                text(&v["accepted"]),
                text(&v["refused"]),
            ]);
        }
        println!("{}", table(&t));
        let l = &s["limits"];
        println!(
            "sessions {} of {}; per service {}; per source {}; over memory budget: {}\n",
            text(&l["sessions"]["active"]),
            text(&l["sessions"]["max"]),
            text(&l["sessions_per_service"]),
            text(&l["sessions_per_source"]),
            text(&l["over_memory_budget"]),
        );
    } else {
        let drained = if s["drained"] == true {
            " (drained by an operator: POST /resume or `resume` to undo)"
        } else {
            ""
        };
        println!("instance {}{drained}", text(&s["instance"]));
        let mut t = vec![header(&[
            "DMZ",
            "STATE",
            "TUNNELS",
            "SINCE",
            "RTT MS",
            "LAST ERROR",
        ])];
        for n in rows("dmz") {
            let error = match &n["last_error"] {
                Value::Null => "-".into(),
                e => format!("{} ({})", text(&e["error"]), text(&e["at"])),
            };
            t.push(vec![
                text(&n["address"]),
                text(&n["state"]),
                text(&n["tunnels"]),
                text(&n["connected_since"]),
                n["rtt_ms"]
                    .as_f64()
                    .map_or_else(|| "-".into(), |ms| format!("{ms:.1}")),
                error,
            ]);
        }
        println!("\n{}", table(&t));
        let mut t = vec![header(&[
            "SERVICE", "LISTEN", "TARGETS", "DECLARED", "NODES", "ACTIVE",
        ])];
        for v in rows("services") {
            let targets: Vec<String> = v["targets"]
                .as_array()
                .unwrap_or(&empty)
                .iter()
                .map(|t| {
                    let down = if t["up"] == true { "" } else { " (down)" };
                    format!("{}{down}", text(&t["target"]))
                })
                .collect();
            let nodes: Vec<String> = v["nodes"]
                .as_object()
                .map(|m| m.iter().map(|(n, v)| format!("{n}: {}", text(v))).collect())
                .unwrap_or_default();
            t.push(vec![
                text(&v["name"]),
                text(&v["listen"]),
                targets.join(","),
                text(&v["declared"]),
                nodes.join("; "),
                text(&v["sessions_active"]),
            ]);
        }
        println!("{}", table(&t));
        let outbound = rows("outbound");
        if !outbound.is_empty() {
            let mut t = vec![header(&["OUTBOUND", "LISTEN", "TARGET", "ACTIVE"])];
            for o in outbound {
                t.push(vec![
                    text(&o["name"]),
                    text(&o["listen"]),
                    text(&o["target"]),
                    text(&o["sessions_active"]),
                ]);
            }
            println!("{}", table(&t));
        }
        if !s["outbound_proxy"].is_null() {
            println!(
                "outbound proxy (HTTP CONNECT, SOCKS5) on {}",
                text(&s["outbound_proxy"])
            );
        }
        println!(
            "sessions {} of {}\n",
            text(&s["limits"]["sessions"]["active"]),
            text(&s["limits"]["sessions"]["max"]),
        );
    }
    let mut t = vec![header(&["CERTIFICATE", "SUBJECT", "NOT AFTER", "LEFT"])];
    for c in rows("certificates") {
        let warn = if c["expiring"] == true { " (!)" } else { "" };
        t.push(vec![
            text(&c["what"]),
            text(&c["subject"]),
            text(&c["not_after"]),
            format!("{}{warn}", text(&c["left"])),
        ]);
    }
    print!("{}", table(&t));
    Ok(ready)
}

/// `sessions`: prints the sessions being relayed.
pub fn sessions(target: &Target, json: bool) -> Result<(), String> {
    let s = target.json("/sessions")?;
    if json {
        println!("{}", serde_json::to_string_pretty(&s).unwrap_or_default());
        return Ok(());
    }
    let mut t = vec![header(&[
        "ID",
        "SERVICE",
        "DIRECTION",
        "PARTNER",
        "VIA",
        "STARTED",
        "AGE",
        "TO TARGET",
        "TO PARTNER",
    ])];
    for x in s["sessions"].as_array().unwrap_or(&Vec::new()) {
        t.push(vec![
            text(&x["id"]),
            text(&x["service"]),
            text(&x["direction"]),
            text(&x["partner"]),
            text(&x["via"]),
            text(&x["started"]),
            duration(x["seconds"].as_u64().unwrap_or(0)),
            text(&x["bytes_partner_to_target"]),
            text(&x["bytes_target_to_partner"]),
        ]);
    }
    print!("{}", table(&t));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_their_columns() {
        let t = table(&[
            header(&["A", "LONGER"]),
            vec!["wide cell".into(), "x".into()],
        ]);
        assert_eq!(t, "A          LONGER\nwide cell  x\n");
    }
}
