//! The `relay-certs` binary: files written, exit codes 0 / 64 / 1.

use std::path::Path;
use std::process::{Command, Output};

fn relay_certs(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_relay-certs"))
        .args(args)
        .output()
        .expect("run relay-certs")
}

fn code(out: &Output) -> i32 {
    out.status.code().expect("exited")
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn s(path: &Path) -> &str {
    path.to_str().unwrap()
}

#[test]
fn dev_writes_lists_and_refuses_to_overwrite() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("dev");

    let out = relay_certs(&["dev", "--out", s(&dir)]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let listed: Vec<_> = stdout(&out).lines().map(str::to_owned).collect();
    assert_eq!(listed.len(), 8, "{listed:?}");
    for name in [
        "ca.pem",
        "ca-key.pem",
        "dmz.pem",
        "dmz-key.pem",
        "engine-1.pem",
        "engine-2-key.pem",
    ] {
        let path = dir.join(name);
        assert!(path.exists(), "{name}");
        assert!(listed.contains(&s(&path).to_owned()), "{name} listed");
    }
    let before = std::fs::read(dir.join("ca-key.pem")).unwrap();

    let out = relay_certs(&["dev", "--out", s(&dir)]);
    assert_eq!(code(&out), 64);
    let err = stderr(&out);
    assert!(err.contains("ca.pem") && err.contains("--force"), "{err}");
    assert_eq!(std::fs::read(dir.join("ca-key.pem")).unwrap(), before);

    let out = relay_certs(&["dev", "--out", s(&dir), "--force"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_ne!(std::fs::read(dir.join("ca-key.pem")).unwrap(), before);

    // Other agents this time: the old agents' files go, and the command says so.
    let out = relay_certs(&["dev", "--out", s(&dir), "--force", "--agent", "ops-1"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let err = stderr(&out);
    for name in [
        "engine-1.pem",
        "engine-1-key.pem",
        "engine-2.pem",
        "engine-2-key.pem",
    ] {
        assert!(!dir.join(name).exists(), "{name} left behind");
        assert!(
            err.contains(&format!(
                "removed {} (signed by the CA this run replaced)",
                s(&dir.join(name))
            )),
            "{name} not reported: {err}"
        );
    }
    assert!(dir.join("ops-1.pem").exists());
}

#[test]
fn dev_with_named_agents_and_dmz() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let out = relay_certs(&[
        "dev",
        "--out",
        s(dir),
        "--agent",
        "a1",
        "--agent",
        "a2.example",
        "--dmz-name",
        "dmz.example.net",
        "--days",
        "10",
    ]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(dir.join("a1-key.pem").exists());
    assert!(dir.join("a2.example.pem").exists());
    assert!(
        !dir.join("engine-1.pem").exists(),
        "defaults only without --agent"
    );
}

#[test]
fn usage_errors_exit_64() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("dev");
    let d = s(&dir);
    for args in [
        vec!["dev", "--out", d, "--agent", "../evil"],
        vec!["dev", "--out", d, "--agent", "a/b"],
        vec!["dev", "--out", d, "--agent", "ca"],
        vec!["dev", "--out", d, "--dmz-name", "bad name"],
        vec!["dev", "--out", d, "--days", "0"],
        vec!["dev", "--out", d, "--days", "many"],
        vec!["dev"],
        vec!["dev", "--out", d, "--bogus"],
        vec!["issue", "--ca-dir", d],
        vec!["frobnicate"],
        vec![],
    ] {
        let out = relay_certs(&args);
        assert_eq!(code(&out), 64, "{args:?}: {}", stderr(&out));
        assert!(!stderr(&out).is_empty(), "{args:?} explains itself");
    }
    assert!(!dir.exists(), "nothing written");

    let out = relay_certs(&["--help"]);
    assert_eq!(code(&out), 0);
    assert!(stdout(&out).contains("dev"));
}

#[test]
fn issue_adds_an_agent_and_rotates_the_dmz_cert() {
    let tmp = tempfile::tempdir().unwrap();
    let ca_dir = tmp.path().join("ca");
    assert_eq!(code(&relay_certs(&["dev", "--out", s(&ca_dir)])), 0);

    let out_dir = tmp.path().join("new");
    let out = relay_certs(&[
        "issue",
        "--ca-dir",
        s(&ca_dir),
        "--agent",
        "engine-3",
        "--out",
        s(&out_dir),
    ]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(stdout(&out).lines().count(), 2);
    assert!(out_dir.join("engine-3.pem").exists());
    assert!(out_dir.join("engine-3-key.pem").exists());

    let out = relay_certs(&["issue", "--ca-dir", s(&ca_dir), "--dmz-name", "localhost"]);
    assert_eq!(code(&out), 64, "dmz.pem exists");
    let out = relay_certs(&[
        "issue",
        "--ca-dir",
        s(&ca_dir),
        "--dmz",
        "localhost",
        "--dmz",
        "::1",
        "--force",
    ]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));

    // A missing CA is an IO error.
    let out = relay_certs(&[
        "issue",
        "--ca-dir",
        s(&tmp.path().join("none")),
        "--agent",
        "x",
    ]);
    assert_eq!(code(&out), 1, "{}", stderr(&out));
    assert!(stderr(&out).contains("ca.pem"));
}
