//! Bad cluster configs: each mistake reported by `relay-internal check` with its key.

use std::process::Command;

use super::*;

/// A valid agent config with `inbound` (TOML of one `[[inbound]]` table) and `outbound`.
fn config(pki: &Pki, inbound: &str) -> std::path::PathBuf {
    let base = AgentOptions::new(local(7443), vec![]).toml(pki);
    pki.write(
        &format!("bad-{}.toml", free_port()),
        &format!("{base}\n{inbound}"),
    )
}

fn check(path: &std::path::Path) -> (i32, String) {
    let out = Command::new(bin("relay-internal"))
        .args(["check", "--config"])
        .arg(path)
        .output()
        .expect("run relay-internal check");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn each_mistake_is_reported_with_its_key() {
    let pki = Pki::new();
    let inbound = "[[inbound]]\nname = \"as2\"\nlisten = \"127.0.0.1:8443\"\n";
    let cases: &[(&str, &str)] = &[
        (
            "target = []",
            "inbound[0].target: at least one target is required",
        ),
        (
            "target = [\"b2bi-1:8443\", \"b2bi-1:8443\"]",
            "inbound[0].target[1]: \"b2bi-1:8443\" is listed twice",
        ),
        (
            "target = [\"b2bi-1:8443\"]\nbalance = \"random\"",
            "inbound[0].balance: unknown balance \"random\"",
        ),
        (
            "target = [\"b2bi-1:8443\"]\n[inbound.health]\ninterval = \"1s\"",
            "inbound[0].health.kind: missing",
        ),
        (
            "target = [\"b2bi-1:8443\"]\n[inbound.health]\nkind = \"tcp\"\ninterval = \"0s\"",
            "inbound[0].health.interval: invalid duration \"0s\": must be greater than zero",
        ),
        (
            "target = [\"b2bi-1:8443\"]\n[inbound.health]\nkind = \"tcp\"\ntimeout = \"0ms\"",
            "inbound[0].health.timeout: invalid duration \"0ms\": must be greater than zero",
        ),
        (
            "target = [\"b2bi-1:8443\"]\n[inbound.health]\nkind = \"tcp\"\nhold_down = \"0s\"",
            "inbound[0].health.hold_down: invalid duration",
        ),
        (
            "target = [\"b2bi-1:8443\"]\n[inbound.health]\nkind = \"tcp\"\nfall = 0",
            "inbound[0].health.fall: must be at least 1",
        ),
        (
            "target = [\"b2bi-1:8443\"]\n[inbound.health]\nkind = \"tcp\"\nstatus = 200",
            "inbound[0].health.status: applies to kind = \"http\" only",
        ),
        (
            "target = [\"b2bi-1:8443\"]\n[inbound.health]\nkind = \"http\"\nrequest = \"GET health\"",
            "inbound[0].health.request: invalid request line",
        ),
    ];
    for (lines, expected) in cases {
        let (code, stderr) = check(&config(&pki, &format!("{inbound}{lines}\n")));
        assert_eq!(code, 64, "{lines}: {stderr}");
        assert!(
            stderr.contains(expected),
            "{lines}: {expected:?} not in\n{stderr}"
        );
    }
    // A range list: every range as large as listen's.
    let ranges = "[[inbound]]\nname = \"ftp-data\"\nlisten = \"127.0.0.1:50000-50009\"\ntarget = [\"ftp-1:50000-50009\", \"ftp-2:50000-50004\"]\n";
    let (code, stderr) = check(&config(&pki, ranges));
    assert_eq!(code, 64, "{stderr}");
    assert!(
        stderr.contains(
            "inbound[0].target[1]: port range 50000-50004 has 5 ports but listen 50000-50009 has 10"
        ),
        "{stderr}"
    );
    // An outbound target list with a duplicate and an invalid entry.
    let outbound = "[[outbound]]\nname = \"partner-x\"\nlisten = \"127.0.0.1:9001\"\ntarget = [\"p.example.com:443\", \"p.example.com:443\", \"nope\"]\n";
    let (code, stderr) = check(&config(&pki, outbound));
    assert_eq!(code, 64, "{stderr}");
    assert!(
        stderr.contains("outbound[0].target[1]: \"p.example.com:443\" is listed twice"),
        "{stderr}"
    );
    assert!(
        stderr.contains("outbound[0].target[2]: invalid destination \"nope\""),
        "{stderr}"
    );
    // Every key of the issue, valid: check passes.
    let good = "[[inbound]]\nname = \"as2\"\nlisten = \"127.0.0.1:8443\"\ntarget = [\"b2bi-1.internal:8443\", \"b2bi-2.internal:8443\"]\nbalance = \"least_sessions\"\n[inbound.health]\nkind = \"http\"\nrequest = \"GET /health\"\nstatus = 204\ninterval = \"2s\"\ntimeout = \"1s\"\nfall = 3\nrise = 2\nhold_down = \"10s\"\n\n[[inbound]]\nname = \"ftp-data\"\nlisten = \"127.0.0.1:50000-50009\"\ntarget = [\"ftp-1:50000-50009\", \"ftp-2:51000-51009\"]\n\n[[outbound]]\nname = \"partner-x\"\nlisten = \"127.0.0.1:9001\"\ntarget = [\"p.example.com:443\", \"p-backup.example.com:443\"]\n";
    let (code, stderr) = check(&config(&pki, good));
    assert_eq!(code, 0, "{stderr}");
}
