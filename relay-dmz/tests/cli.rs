//! The binary's command line, run as a process. (Having an integration test here also makes
//! `cargo test --workspace` build the binary that the end-to-end tests in tests/ start.)

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_relay-dmz");

#[test]
fn version_and_help_exit_0() {
    for arg in ["--version", "--help"] {
        let out = Command::new(BIN).arg(arg).output().expect("run the binary");
        assert_eq!(out.status.code(), Some(0), "{arg}");
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("relay-dmz"),
            "{arg}"
        );
    }
}

#[test]
fn missing_config_and_bad_options_exit_64() {
    let out = Command::new(BIN)
        .env_remove("RELAY_CONFIG")
        .output()
        .expect("run the binary");
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--config"));
    let out = Command::new(BIN)
        .arg("--no-such-option")
        .output()
        .expect("run the binary");
    assert_eq!(out.status.code(), Some(64));
    let out = Command::new(BIN)
        .args(["check", "--config", "/nonexistent/relay.toml"])
        .output()
        .expect("run the binary");
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/relay.toml"));
}
