//! The Grafana dashboard `docs/grafana/relay.json`: valid JSON, a Prometheus datasource
//! variable, and every query naming metrics that exist in `relay_tunnel::metrics`.

use std::collections::BTreeSet;
use std::path::PathBuf;

use relay_tunnel::metrics as m;
use serde_json::Value;

/// Every metric name the relay exports.
pub(crate) const METRICS: &[&str] = &[
    m::TUNNELS_CONNECTED,
    m::TUNNEL_CONNECTS,
    m::TUNNEL_RECONNECTS,
    m::TUNNEL_RTT,
    m::SESSIONS_ACTIVE,
    m::SESSIONS_TOTAL,
    m::SESSION_SETUP,
    m::SESSION_DURATION,
    m::BYTES,
    m::LISTENER_OPEN,
    m::REJECTIONS,
    m::REGISTRATIONS,
    m::CONFIG_RELOADS,
    m::ADMIN_REJECTIONS,
    m::BUILD_INFO,
    m::CERT_EXPIRY,
    m::AGENT_CERT_EXPIRY,
    m::AUDIT_SENT,
    m::AUDIT_DROPPED,
    m::AUDIT_CONNECTED,
    m::TARGET_UP,
    m::HEALTH_CHECKS,
    m::SERVICE_DECLARED,
    m::WITHDRAWALS,
    m::TARGET_FAILOVERS,
    m::SANDBOX_ENFORCED,
];

/// Metrics the dashboard must show (the panels operators asked for).
const REQUIRED: &[&str] = &[
    m::TUNNELS_CONNECTED,
    m::LISTENER_OPEN,
    m::SESSIONS_TOTAL,
    m::SESSIONS_ACTIVE,
    m::SESSION_SETUP,
    m::BYTES,
    m::REJECTIONS,
    m::CONFIG_RELOADS,
    m::TUNNEL_RTT,
    m::CERT_EXPIRY,
    m::AGENT_CERT_EXPIRY,
];

/// The metric family of a series name `name` found in `place`; panics unless it is one of
/// [`METRICS`], or a histogram's `_bucket`, `_sum` or `_count` series.
pub(crate) fn family<'a>(name: &'a str, place: &str) -> &'a str {
    let family = ["_bucket", "_sum", "_count"]
        .iter()
        .find_map(|s| name.strip_suffix(s))
        .filter(|f| METRICS.contains(f))
        .unwrap_or(name);
    assert!(METRICS.contains(&family), "{place}: unknown metric {name}");
    if name != family {
        assert!(
            [m::TUNNEL_RTT, m::SESSION_SETUP, m::SESSION_DURATION].contains(&family),
            "{place}: {name} is not a histogram series"
        );
    }
    family
}

fn dashboard() -> Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs/grafana/relay.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: not JSON: {e}", path.display()))
}

#[test]
fn grafana_dashboard_queries_existing_metrics() {
    let d = dashboard();
    let schema = d["schemaVersion"].as_u64().expect("schemaVersion");
    assert!((36..=41).contains(&schema), "schemaVersion {schema}");
    assert!(d["title"].is_string() && d["uid"].is_string());
    let vars = d["templating"]["list"].as_array().expect("templating.list");
    assert!(
        vars.iter().any(|v| v["name"] == "DS_PROMETHEUS"
            && v["type"] == "datasource"
            && v["query"] == "prometheus"),
        "no datasource variable DS_PROMETHEUS of type prometheus: {vars:?}"
    );

    let metric_re = regex::Regex::new(r"\brelay_[a-z0-9_]+").expect("regex");
    let panels = d["panels"].as_array().expect("panels");
    let mut ids = BTreeSet::new();
    let mut used = BTreeSet::new();
    let mut queries = 0;
    for p in panels {
        let id = p["id"].as_u64().expect("panel id");
        assert!(ids.insert(id), "panel id {id} repeated");
        let grid = &p["gridPos"];
        for k in ["h", "w", "x", "y"] {
            assert!(grid[k].is_u64(), "panel {id}: gridPos.{k} missing");
        }
        assert!(
            grid["x"].as_u64().unwrap() + grid["w"].as_u64().unwrap() <= 24,
            "panel {id} overflows the grid"
        );
        if p["type"] == "row" {
            continue;
        }
        let title = p["title"].as_str().expect("panel title");
        assert_eq!(
            p["datasource"]["uid"], "${DS_PROMETHEUS}",
            "panel {title:?} datasource"
        );
        let targets = p["targets"]
            .as_array()
            .unwrap_or_else(|| panic!("panel {title:?} has no targets"));
        assert!(!targets.is_empty(), "panel {title:?} has no targets");
        for t in targets {
            let expr = t["expr"]
                .as_str()
                .unwrap_or_else(|| panic!("panel {title:?}: target without expr"));
            queries += 1;
            let depth = expr.chars().try_fold(0i32, |d, c| {
                let d = d + match c {
                    '(' => 1,
                    ')' => -1,
                    _ => 0,
                };
                (d >= 0).then_some(d)
            });
            assert_eq!(
                depth,
                Some(0),
                "panel {title:?}: unbalanced parentheses in {expr}"
            );
            let names: Vec<&str> = metric_re.find_iter(expr).map(|m| m.as_str()).collect();
            assert!(
                !names.is_empty(),
                "panel {title:?}: {expr} names no relay metric"
            );
            for name in names {
                let family = family(name, &format!("panel {title:?} ({expr})"));
                if expr.contains("histogram_quantile") && name == family {
                    panic!("panel {title:?}: histogram_quantile over {name} needs {name}_bucket");
                }
                used.insert(family.to_owned());
            }
        }
    }
    let missing: Vec<&&str> = REQUIRED.iter().filter(|r| !used.contains(**r)).collect();
    assert!(
        missing.is_empty(),
        "the dashboard does not show {missing:?}"
    );
    println!(
        "grafana_dashboard_queries_existing_metrics: {} panels, {queries} queries over {} metric families",
        panels.iter().filter(|p| p["type"] != "row").count(),
        used.len()
    );
}
