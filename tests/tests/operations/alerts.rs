//! The Prometheus alert rules `docs/prometheus/alerts.yml`: valid for promtool, their unit
//! tests `alerts_test.yml` pass, every alert has a `for`, a severity and both annotations, is
//! tested firing and silent, and is documented; every metric they name exists in
//! `relay_tunnel::metrics`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use relay_tunnel::metrics as m;

/// `docs/prometheus`.
fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs/prometheus")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// promtool, or `None` (after a skip line) when it is not installed; under CI a missing
/// promtool is an error.
fn promtool_or_skip(test: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let found = std::env::split_paths(&path)
        .chain(["/usr/bin", "/usr/local/bin"].map(PathBuf::from))
        .map(|d| d.join("promtool"))
        .find(|p| p.is_file());
    relay_e2e::tools::or_skip(
        test,
        found,
        "promtool is not installed (apt-get install prometheus)",
    )
}

/// Runs `promtool ARGS FILE`; panics with its output unless it succeeds.
fn promtool(promtool: &Path, args: &[&str], file: &Path) -> String {
    let out = Command::new(promtool)
        .args(args)
        .arg(file)
        .output()
        .unwrap_or_else(|e| panic!("run {}: {e}", promtool.display()));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "promtool {} {} failed ({}):\n{text}",
        args.join(" "),
        file.display(),
        out.status
    );
    text
}

#[test]
fn alert_rules_pass_promtool_check_and_their_unit_tests() {
    let test = "alert_rules_pass_promtool_check_and_their_unit_tests";
    let Some(bin) = promtool_or_skip(test) else {
        return;
    };
    let check = promtool(&bin, &["check", "rules"], &dir().join("alerts.yml"));
    let unit = promtool(&bin, &["test", "rules"], &dir().join("alerts_test.yml"));
    println!("{test}:\n{check}{unit}");
}

/// One alerting rule of alerts.yml, read line by line (promtool checks the YAML itself).
#[derive(Default, Debug)]
struct Rule {
    name: String,
    has_for: bool,
    severity: Option<String>,
    summary: bool,
    description: bool,
}

/// The alerting rules of alerts.yml, in order. A rule that shares a YAML anchor's annotations
/// (`annotations: *name`) counts as having both.
fn rules(text: &str) -> Vec<Rule> {
    let mut rules: Vec<Rule> = Vec::new();
    for line in text.lines().map(str::trim) {
        if let Some(name) = line.strip_prefix("- alert:") {
            rules.push(Rule {
                name: name.trim().to_owned(),
                ..Rule::default()
            });
            continue;
        }
        let Some(rule) = rules.last_mut() else {
            continue;
        };
        if line.starts_with("for:") {
            rule.has_for = true;
        } else if let Some(s) = line.strip_prefix("severity:") {
            rule.severity = Some(s.trim().to_owned());
        } else if line.starts_with("summary:") {
            rule.summary = true;
        } else if line.starts_with("description:") {
            rule.description = true;
        } else if line.starts_with("annotations: *") {
            rule.summary = true;
            rule.description = true;
        }
    }
    rules
}

#[test]
fn every_alert_is_complete_tested_documented_and_names_existing_metrics() {
    let text = read(&dir().join("alerts.yml"));
    let rules = rules(&text);
    assert!(
        rules.len() >= 8,
        "only {} alerting rules: {rules:?}",
        rules.len()
    );
    for r in &rules {
        assert!(r.has_for, "alert {}: no `for:`", r.name);
        assert!(
            matches!(r.severity.as_deref(), Some("critical" | "warning")),
            "alert {}: severity {:?}, expected critical or warning",
            r.name,
            r.severity
        );
        assert!(
            r.summary && r.description,
            "alert {}: needs a summary and a description",
            r.name
        );
    }

    // Each alert has a test where it fires and one where it stays silent: `alertname: X`
    // followed by `exp_alerts: []` (silent) or by a list of `exp_labels` (firing).
    let tests = read(&dir().join("alerts_test.yml"));
    let mut cases: BTreeMap<&str, (bool, bool)> = BTreeMap::new();
    let mut lines = tests.lines().map(str::trim).filter(|l| !l.is_empty());
    while let Some(line) = lines.next() {
        let Some(name) = line.strip_prefix("alertname:") else {
            continue;
        };
        let next = lines.next().unwrap_or_default();
        let case = cases.entry(name.trim()).or_default();
        match next {
            "exp_alerts: []" => case.1 = true,
            "exp_alerts:" => case.0 = true,
            other => panic!("alerts_test.yml: alertname {name} followed by {other:?}"),
        }
    }
    let operations = read(&PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs/OPERATIONS.md"));
    let names: BTreeSet<&str> = rules.iter().map(|r| r.name.as_str()).collect();
    for name in &names {
        let (fires, silent) = cases.get(name).copied().unwrap_or_default();
        assert!(fires, "alerts_test.yml has no case where {name} fires");
        assert!(
            silent,
            "alerts_test.yml has no case where {name} stays silent"
        );
        assert!(
            operations.contains(&format!("`{name}`")),
            "docs/OPERATIONS.md does not describe {name}"
        );
    }
    for name in cases.keys() {
        assert!(
            names.contains(name),
            "alerts_test.yml tests unknown alert {name}"
        );
    }

    // Metric names anywhere in the file, expressions and annotations alike.
    let metric_re = regex::Regex::new(r"\brelay_[a-z0-9_]+").expect("regex");
    let mut used = BTreeSet::new();
    for name in metric_re.find_iter(&text).map(|m| m.as_str()) {
        used.insert(crate::dashboard::family(name, "alerts.yml"));
    }
    for required in [
        m::BUILD_INFO,
        m::TUNNELS_CONNECTED,
        m::LISTENER_OPEN,
        m::CERT_EXPIRY,
        m::AGENT_CERT_EXPIRY,
        m::REJECTIONS,
        m::SESSIONS_TOTAL,
        m::TUNNEL_RECONNECTS,
        m::CONFIG_RELOADS,
    ] {
        assert!(
            used.contains(required),
            "alerts.yml does not use {required}"
        );
    }
    println!(
        "every_alert_is_complete_tested_documented_and_names_existing_metrics: {} rules, {} alerts, {} metric families",
        rules.len(),
        names.len(),
        used.len()
    );
}
