//! The command line and config checking of both binaries, run as real processes: every kind
//! of mistake is reported with its key path and exit code 64, `check` accepts a valid config,
//! `RELAY_CONFIG` replaces `--config`, and the example configs in docs/examples pass `check`.
//!
//! Needs `cargo build --workspace` first (the binaries are run from target/debug).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use relay_e2e::{Pki, bin};

/// Exit code of both binaries for a bad config or command line (EX_USAGE).
const EXIT_CONFIG: i32 = 64;

const DMZ: &str = "relay-dmz";
const AGENT: &str = "relay-internal";

/// A valid DMZ config; the PEM files sit next to it (paths are relative to the config file).
const DMZ_OK: &str = r#"[tunnel]
listen = "127.0.0.1:7443"
cert = "dmz.pem"
key = "dmz-key.pem"
ca = "ca.pem"
agents = ["engine-1", "engine-2"]
keepalive = "5s"

[admin]
listen = "127.0.0.1:9090"

[policy]
listen_allow = ["0.0.0.0:8000-8999", "127.0.0.0/8:1024-65535"]

[limits]
max_sessions = 100
handshake_timeout = "10s"
"#;

/// A valid agent config with two inbound services.
const AGENT_OK: &str = r#"dmz = ["127.0.0.1:7443"]
server_name = "localhost"
connections = 2
keepalive = "5s"

[tls]
cert = "engine-1.pem"
key = "engine-1-key.pem"
ca = "ca.pem"

[admin]
listen = "127.0.0.1:9091"

[[inbound]]
name = "as2"
listen = "0.0.0.0:8443"
target = "b2bi.internal:8443"

[[inbound]]
name = "ftp-data"
listen = "0.0.0.0:50000-50099"
target = "ftp.internal:50000-50099"
"#;

/// Status code, stdout and stderr of a finished process.
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Run {
    fn show(&self) -> String {
        format!(
            "exit {:?}\n--- stdout\n{}--- stderr\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

fn finished(out: Output) -> Run {
    Run {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Runs `binary` with `args`, no `RELAY_CONFIG` unless `env_config` is given.
fn run(binary: &str, args: &[&str], env_config: Option<&Path>) -> Run {
    let mut cmd = Command::new(bin(binary));
    cmd.args(args)
        .env_remove("RELAY_CONFIG")
        .env("NO_COLOR", "1");
    if let Some(path) = env_config {
        cmd.env("RELAY_CONFIG", path);
    }
    finished(cmd.output().expect("run binary"))
}

/// Runs `binary check --config PATH`.
fn check(binary: &str, path: &Path) -> Run {
    run(
        binary,
        &["check", "--config", path.to_str().expect("utf-8 path")],
        None,
    )
}

/// Asserts that `binary` refuses the config at `path` with exit 64, both in `check` and when
/// asked to run it, and that each of `expected` appears in what it printed to stderr.
/// Returns the problem lines (stderr without the heading line).
fn assert_refused(binary: &str, path: &Path, expected: &[&str]) -> Vec<String> {
    let checked = check(binary, path);
    assert_eq!(
        checked.code,
        Some(EXIT_CONFIG),
        "{binary} check:\n{}",
        checked.show()
    );
    assert!(
        !checked.stdout.contains("ok"),
        "{binary} check printed ok for a bad config:\n{}",
        checked.show()
    );
    for e in expected {
        assert!(
            checked.stderr.contains(e),
            "{binary} check: {e:?} not in the message:\n{}",
            checked.show()
        );
    }
    // Running (no subcommand) must refuse the same config before binding anything.
    let ran = run(
        binary,
        &["--config", path.to_str().expect("utf-8 path")],
        None,
    );
    assert_eq!(ran.code, Some(EXIT_CONFIG), "{binary} run:\n{}", ran.show());
    for e in expected {
        assert!(
            ran.stderr.contains(e),
            "{binary} run: {e:?} missing:\n{}",
            ran.show()
        );
    }
    let heading = format!("{}: invalid config:", path.display());
    let mut lines = checked.stderr.lines();
    assert_eq!(lines.next(), Some(heading.as_str()), "{}", checked.show());
    lines.map(str::to_owned).collect()
}

/// Writes `text` as `name` in the PKI directory.
fn write(pki: &Pki, name: &str, text: &str) -> PathBuf {
    pki.write(name, text)
}

/// `base` with the first occurrence of `from` replaced by `to` (which must exist).
fn edit(base: &str, from: &str, to: &str) -> String {
    assert!(base.contains(from), "fixture does not contain {from:?}");
    base.replacen(from, to, 1)
}

#[test]
fn valid_configs_pass_check_and_print_ok() {
    let pki = Pki::new();
    for (binary, name, text) in [(DMZ, "dmz.toml", DMZ_OK), (AGENT, "agent.toml", AGENT_OK)] {
        let path = write(&pki, name, text);
        let r = check(binary, &path);
        assert_eq!(r.code, Some(0), "{binary}:\n{}", r.show());
        assert_eq!(
            r.stdout.trim(),
            format!("{}: ok", path.display()),
            "{binary}"
        );
        assert!(
            r.stderr.is_empty(),
            "{binary} printed to stderr:\n{}",
            r.show()
        );
    }
}

#[test]
fn unknown_key_is_named() {
    let pki = Pki::new();
    let dmz = write(
        &pki,
        "dmz.toml",
        &edit(
            DMZ_OK,
            "keepalive = \"5s\"\n",
            "keepalive = \"5s\"\nbogus = 1\n",
        ),
    );
    let lines = assert_refused(DMZ, &dmz, &["tunnel.bogus", "unknown field"]);
    assert_eq!(lines.len(), 1, "{lines:?}");
    // A top-level unknown key and one inside a table of the agent.
    let agent = write(
        &pki,
        "agent.toml",
        &edit(
            AGENT_OK,
            "connections = 2\n",
            "connections = 2\nbogus = 1\n",
        ),
    );
    assert_refused(AGENT, &agent, &["bogus", "unknown field"]);
    let agent2 = write(
        &pki,
        "agent2.toml",
        &edit(
            AGENT_OK,
            "target = \"b2bi.internal:8443\"\n",
            "target = \"b2bi.internal:8443\"\nproxy_protokol = \"v2\"\n",
        ),
    );
    assert_refused(
        AGENT,
        &agent2,
        &["inbound[0].proxy_protokol", "unknown field"],
    );
    // An unknown table.
    let dmz2 = write(
        &pki,
        "dmz2.toml",
        &format!("{DMZ_OK}\n[bogus_table]\nx = 1\n"),
    );
    assert_refused(DMZ, &dmz2, &["bogus_table"]);
}

#[test]
fn invalid_socket_address_names_the_key() {
    let pki = Pki::new();
    // The second of two inbound services is bad: the index in the key path must say so.
    let agent = write(
        &pki,
        "agent.toml",
        &edit(
            AGENT_OK,
            "listen = \"0.0.0.0:50000-50099\"",
            "listen = \"0.0.0.0:99999\"",
        ),
    );
    let lines = assert_refused(AGENT, &agent, &[]);
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with(r#"inbound[1].listen: invalid socket address "0.0.0.0:99999""#)),
        "{lines:?}"
    );
    // The same mistake in the DMZ's tunnel and admin addresses.
    let dmz = write(
        &pki,
        "dmz.toml",
        &edit(
            DMZ_OK,
            "listen = \"127.0.0.1:9090\"",
            "listen = \"127.0.0.1:99999\"",
        ),
    );
    let lines = assert_refused(DMZ, &dmz, &[]);
    assert_eq!(
        lines,
        [r#"admin.listen: invalid socket address "127.0.0.1:99999""#]
    );
    let dmz2 = write(
        &pki,
        "dmz2.toml",
        &edit(
            DMZ_OK,
            "listen = \"127.0.0.1:7443\"",
            "listen = \"localhost:7443\"",
        ),
    );
    let lines = assert_refused(DMZ, &dmz2, &[]);
    assert_eq!(
        lines,
        [r#"tunnel.listen: invalid socket address "localhost:7443""#]
    );
    // A bad address rule in the DMZ policy, second of two.
    let dmz3 = write(
        &pki,
        "dmz3.toml",
        &edit(
            DMZ_OK,
            "\"127.0.0.0/8:1024-65535\"",
            "\"127.0.0.0/33:1024-65535\"",
        ),
    );
    assert_refused(
        DMZ,
        &dmz3,
        &["policy.listen_allow[1]: invalid address rule \"127.0.0.0/33:1024-65535\""],
    );
}

#[test]
fn bad_duration_names_the_key() {
    let pki = Pki::new();
    let dmz = write(
        &pki,
        "dmz.toml",
        &edit(DMZ_OK, "keepalive = \"5s\"", "keepalive = \"fast\""),
    );
    let lines = assert_refused(DMZ, &dmz, &[]);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(
        lines[0].starts_with(r#"tunnel.keepalive: invalid duration "fast""#),
        "{lines:?}"
    );
    let dmz0 = write(
        &pki,
        "dmz0.toml",
        &edit(
            DMZ_OK,
            "handshake_timeout = \"10s\"",
            "handshake_timeout = \"0s\"",
        ),
    );
    assert_refused(
        DMZ,
        &dmz0,
        &[r#"limits.handshake_timeout: invalid duration "0s""#],
    );
    let agent = write(
        &pki,
        "agent.toml",
        &edit(AGENT_OK, "keepalive = \"5s\"", "keepalive = \"5 parsecs\""),
    );
    assert_refused(
        AGENT,
        &agent,
        &[r#"keepalive: invalid duration "5 parsecs""#],
    );
}

#[test]
fn missing_cert_file_names_the_path() {
    let pki = Pki::new();
    let dmz = write(
        &pki,
        "dmz.toml",
        &edit(DMZ_OK, "cert = \"dmz.pem\"", "cert = \"missing/dmz.pem\""),
    );
    let missing = pki.path("missing/dmz.pem");
    let lines = assert_refused(DMZ, &dmz, &[]);
    // The file, and the command that would make a PKI in that (empty) directory.
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert!(lines[1].starts_with("hint: "), "{lines:?}");
    assert!(lines[0].starts_with("tunnel.cert: "), "{lines:?}");
    assert!(
        lines[0].contains(&missing.display().to_string()),
        "{lines:?}"
    );
    let agent = write(
        &pki,
        "agent.toml",
        &edit(AGENT_OK, "ca = \"ca.pem\"", "ca = \"no-such-ca.pem\""),
    );
    let ca = pki.path("no-such-ca.pem").display().to_string();
    assert_refused(AGENT, &agent, &["tls.ca: ", &ca]);
}

#[test]
fn several_problems_are_all_listed() {
    let pki = Pki::new();
    let mut dmz = edit(
        DMZ_OK,
        "listen = \"127.0.0.1:7443\"",
        "listen = \"127.0.0.1:99999\"",
    );
    dmz = edit(&dmz, "keepalive = \"5s\"", "keepalive = \"soon\"");
    dmz = edit(&dmz, "cert = \"dmz.pem\"", "cert = \"gone.pem\"");
    dmz = edit(&dmz, "max_sessions = 100", "max_sessions = 0");
    let path = write(&pki, "dmz.toml", &dmz);
    let lines = assert_refused(DMZ, &path, &[]);
    for key in [
        "tunnel.listen: ",
        "tunnel.keepalive: ",
        "tunnel.cert: ",
        "limits.max_sessions: ",
    ] {
        assert!(
            lines.iter().any(|l| l.starts_with(key)),
            "{key} missing in {lines:?}"
        );
    }
    assert_eq!(lines.len(), 4, "{lines:?}");

    let mut agent = edit(AGENT_OK, "keepalive = \"5s\"", "keepalive = \"never\"");
    agent = edit(
        &agent,
        "listen = \"0.0.0.0:8443\"",
        "listen = \"0.0.0.0:99999\"",
    );
    agent = edit(&agent, "name = \"ftp-data\"", "name = \"as2\"");
    agent = edit(&agent, "connections = 2", "connections = 0");
    agent = edit(
        &agent,
        "key = \"engine-1-key.pem\"",
        "key = \"gone-key.pem\"",
    );
    let path = write(&pki, "agent.toml", &agent);
    let lines = assert_refused(AGENT, &path, &[]);
    for key in [
        "keepalive: ",
        "inbound[0].listen: ",
        "inbound[1].name: ",
        "connections: ",
        // The key file is the one missing, so the problem is reported at its key.
        "tls.key: ",
    ] {
        assert!(
            lines.iter().any(|l| l.starts_with(key)),
            "{key} missing in {lines:?}"
        );
    }
    assert!(
        lines.iter().any(|l| l.contains("gone-key.pem")),
        "{lines:?}"
    );
    assert_eq!(lines.len(), 5, "{lines:?}");
}

#[test]
fn missing_config_option_is_refused() {
    for binary in [DMZ, AGENT] {
        for args in [&["check"][..], &[][..]] {
            let r = run(binary, args, None);
            assert_eq!(
                r.code,
                Some(EXIT_CONFIG),
                "{binary} {args:?}:\n{}",
                r.show()
            );
            assert!(
                r.stderr.contains("--config"),
                "{binary} {args:?}:\n{}",
                r.show()
            );
            assert!(
                r.stderr.contains("RELAY_CONFIG"),
                "{binary} {args:?}:\n{}",
                r.show()
            );
        }
    }
}

#[test]
fn nonexistent_config_file_is_named() {
    let pki = Pki::new();
    let path = pki.path("does-not-exist.toml");
    for binary in [DMZ, AGENT] {
        let lines = assert_refused(binary, &path, &["cannot read config"]);
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert!(
            lines[0].starts_with(&path.display().to_string()),
            "{lines:?}"
        );
    }
}

#[test]
fn port_range_sizes_must_match() {
    let pki = Pki::new();
    let agent = write(
        &pki,
        "agent.toml",
        &edit(
            AGENT_OK,
            "target = \"ftp.internal:50000-50099\"",
            "target = \"ftp.internal:50000-50009\"",
        ),
    );
    let lines = assert_refused(AGENT, &agent, &[]);
    assert_eq!(
        lines,
        ["inbound[1].target: port range 50000-50009 has 10 ports but listen 50000-50099 has 100"]
    );
    // A single port against a range is a size mismatch too.
    let agent2 = write(
        &pki,
        "agent2.toml",
        &edit(
            AGENT_OK,
            "target = \"ftp.internal:50000-50099\"",
            "target = \"ftp.internal:50000\"",
        ),
    );
    assert_refused(
        AGENT,
        &agent2,
        &["inbound[1].target: port range 50000 has 1 ports"],
    );
}

#[test]
fn duplicate_service_names_are_refused() {
    let pki = Pki::new();
    let agent = write(
        &pki,
        "agent.toml",
        &edit(AGENT_OK, "name = \"ftp-data\"", "name = \"as2\""),
    );
    let lines = assert_refused(AGENT, &agent, &[]);
    assert_eq!(
        lines,
        [r#"inbound[1].name: service "as2" is declared twice"#]
    );
}

#[test]
fn invalid_service_names_are_refused() {
    let pki = Pki::new();
    for bad in ["9lives", "has space", "", "a/b", &"x".repeat(65)] {
        let agent = write(
            &pki,
            "agent.toml",
            &edit(AGENT_OK, "name = \"as2\"", &format!("name = {bad:?}")),
        );
        let lines = assert_refused(AGENT, &agent, &[]);
        assert_eq!(lines.len(), 1, "{bad:?}: {lines:?}");
        assert!(
            lines[0].starts_with(&format!("inbound[0].name: invalid service name {bad:?}")),
            "{bad:?}: {lines:?}"
        );
    }
}

#[test]
fn relay_config_env_replaces_the_option() {
    let pki = Pki::new();
    for (binary, name, text) in [(DMZ, "dmz.toml", DMZ_OK), (AGENT, "agent.toml", AGENT_OK)] {
        let path = write(&pki, name, text);
        let r = run(binary, &["check"], Some(&path));
        assert_eq!(r.code, Some(0), "{binary}:\n{}", r.show());
        assert_eq!(
            r.stdout.trim(),
            format!("{}: ok", path.display()),
            "{binary}"
        );
        // The env var is really read: a bad file named there is reported.
        let bad = write(&pki, &format!("bad-{name}"), "nonsense = [");
        let r = run(binary, &["check"], Some(&bad));
        assert_eq!(r.code, Some(EXIT_CONFIG), "{binary}:\n{}", r.show());
        assert!(
            r.stderr.contains(&bad.display().to_string()),
            "{binary}:\n{}",
            r.show()
        );
        // An explicit --config wins over the env var.
        let r = run(
            binary,
            &["check", "--config", path.to_str().unwrap()],
            Some(&bad),
        );
        assert_eq!(
            r.code,
            Some(0),
            "{binary} --config over RELAY_CONFIG:\n{}",
            r.show()
        );
    }
}

/// The example configs in docs/examples, copied next to a development PKI made by the
/// `relay-certs dev` command their comments give, pass `check`.
#[test]
fn documented_examples_pass_check() {
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/examples");
    let dir = tempfile::tempdir().expect("temp dir");
    let certs = dir.path().join("certs");
    // As on a fresh clone, before the PKI exists: `check` names the command that makes it,
    // once, and each example given to the other binary is named as the other binary's.
    for (binary, other, name) in [(DMZ, AGENT, "dmz.toml"), (AGENT, DMZ, "internal.toml")] {
        let path = dir.path().join(name);
        std::fs::copy(examples.join(name), &path)
            .unwrap_or_else(|e| panic!("copy docs/examples/{name}: {e}"));
        let hint = format!(
            "hint: {} has no certificates yet; for a development PKI (never for production) \
             run: relay-certs dev --out {}",
            certs.display(),
            certs.display()
        );
        let lines = assert_refused(binary, &path, &[]);
        assert_eq!(lines.iter().filter(|l| **l == hint).count(), 1, "{lines:?}");
        let wrong = check(other, &path);
        assert_eq!(wrong.code, Some(EXIT_CONFIG), "{}", wrong.show());
        let named = format!(
            "{}: this looks like a {binary} config (it has `",
            path.display()
        );
        assert!(wrong.stderr.contains(&named), "{}", wrong.show());
        assert!(
            wrong
                .stderr
                .contains(&format!("check it with `{binary} check`")),
            "{}",
            wrong.show()
        );
    }
    let out = Command::new(bin("relay-certs"))
        .args(["dev", "--out"])
        .arg(&certs)
        .output()
        .expect("run relay-certs");
    assert!(
        out.status.success(),
        "relay-certs dev: {}",
        finished(out).show()
    );
    for (binary, name) in [(DMZ, "dmz.toml"), (AGENT, "internal.toml")] {
        let path = dir.path().join(name);
        std::fs::copy(examples.join(name), &path)
            .unwrap_or_else(|e| panic!("copy docs/examples/{name}: {e}"));
        let r = check(binary, &path);
        assert_eq!(r.code, Some(0), "docs/examples/{name}:\n{}", r.show());
        assert_eq!(r.stdout.trim(), format!("{}: ok", path.display()));
    }
    // The examples fit together: the DMZ example's policy admits every service of the agent
    // example, and the agent's certificate identity is in the DMZ's tunnel.agents.
    let dmz = relay_dmz::DmzConfig::load(&dir.path().join("dmz.toml")).expect("dmz example");
    let agent = relay_internal::AgentConfig::load(&dir.path().join("internal.toml"))
        .expect("agent example");
    assert!(!agent.inbound.is_empty());
    for svc in &agent.inbound {
        assert!(
            dmz.rights
                .global
                .listen_allow
                .iter()
                .any(|rule| rule.covers(&svc.listen)),
            "service {} listen {} is outside the DMZ example's policy.listen_allow",
            svc.name,
            svc.listen
        );
    }
    assert!(!agent.outbound.is_empty());
    for out in &agent.outbound {
        let (host, port) = out.target.rsplit_once(':').expect("HOST:PORT");
        let port: u16 = port.parse().expect("port");
        assert!(
            dmz.rights
                .global
                .connect_allow
                .iter()
                .any(|rule| rule.admits_name(host, port)),
            "outbound {} target {} is outside the DMZ example's policy.connect_allow",
            out.name,
            out.target
        );
    }
    let agents = dmz.agents.expect("the DMZ example lists tunnel.agents");
    assert!(agents.iter().any(|a| a == "engine-1"), "{agents:?}");
    let text = std::fs::read_to_string(examples.join("internal.toml")).expect("read example");
    assert!(
        text.contains("certs/engine-1.pem"),
        "the agent example uses engine-1's certificate"
    );
}
