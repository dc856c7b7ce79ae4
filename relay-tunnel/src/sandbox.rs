//! Self-confinement (`[sandbox]`): Landlock rules (read-only files, TCP ports to bind and to
//! connect to) and a seccomp allow-list of system calls, applied on the main thread before the
//! runtime starts its threads, so every thread of the process inherits them.
//!
//! What each binary may touch is a [`Rules`] value its config builds; [`apply`] confines the
//! process with it and remembers it, so a reload can tell when a new config needs more than
//! the sandbox allows ([`outside`]).

mod probe;
mod ruleset;
mod seccomp;

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use serde::{Deserialize, Serialize};

use crate::config::{ConfigError, PortRange};

pub use probe::check;

/// `[sandbox] mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Confine the process; what the kernel lacks is logged (or refused with `require`).
    Enforce,
    /// Confine nothing, but have the kernel log (audit) each system call outside the
    /// allow-list, to try a new deployment.
    Warn,
    /// No confinement.
    Off,
}

/// `[sandbox]`, checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    /// How much is confined.
    pub mode: Mode,
    /// Refuse to start unless every part is enforced.
    pub require: bool,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            mode: Mode::Enforce,
            require: false,
        }
    }
}

/// `[sandbox]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSandbox {
    mode: Option<String>,
    require: Option<bool>,
}

impl RawSandbox {
    /// Checks `[sandbox]`; an absent table is the default (enforce, not required).
    pub fn check(raw: Option<&RawSandbox>, err: &mut ConfigError) -> Settings {
        let Some(raw) = raw else {
            return Settings::default();
        };
        let mode = match raw.mode.as_deref() {
            None | Some("enforce") => Mode::Enforce,
            Some("warn") => Mode::Warn,
            Some("off") => Mode::Off,
            Some(other) => {
                err.push(
                    "sandbox.mode",
                    format_args!(
                        "unknown mode {other:?} (expected \"enforce\", \"warn\" or \"off\")"
                    ),
                );
                Mode::Enforce
            }
        };
        let require = raw.require.unwrap_or(false);
        if require && mode != Mode::Enforce {
            err.push(
                "sandbox.require",
                "only means something with sandbox.mode = \"enforce\"",
            );
        }
        Settings { mode, require }
    }
}

/// What a confined process may do.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rules {
    /// Files it reads, such as its config and certificates; their directories become readable
    /// (a renewed certificate is often a new file moved into place).
    pub files: Vec<PathBuf>,
    /// TCP ports it may bind; `None`: any.
    pub bind: Option<Vec<PortRange>>,
    /// TCP ports it may connect to; `None`: any; empty: none.
    pub connect: Option<Vec<PortRange>>,
}

impl Rules {
    /// The directories readable under these rules: each file's directory, made absolute, and
    /// the directory of the file a symbolic link leads to (Landlock checks where the file
    /// really is).
    pub fn read_dirs(&self) -> Vec<PathBuf> {
        let mut dirs: Vec<PathBuf> = self
            .files
            .iter()
            .flat_map(|f| [Some(absolute(f)), std::fs::canonicalize(f).ok()])
            .flatten()
            .filter_map(|f| f.parent().map(Path::to_path_buf))
            .collect();
        dirs.sort();
        dirs.dedup();
        dirs
    }

    /// Whether `port` may be bound.
    pub fn may_bind(&self, port: u16) -> bool {
        self.bind
            .as_ref()
            .is_none_or(|r| r.iter().any(|r| r.contains(port)))
    }

    /// Whether `port` may be connected to.
    pub fn may_connect(&self, port: u16) -> bool {
        self.connect
            .as_ref()
            .is_none_or(|r| r.iter().any(|r| r.contains(port)))
    }
}

/// The port rule for `ranges`: `None` (any port) when they cover every port, so that the
/// kernel need not hold 65,536 rules for "any".
pub fn port_rule(mut ranges: Vec<PortRange>) -> Option<Vec<PortRange>> {
    ranges.sort_by_key(|r| r.first);
    let mut next = 0u32;
    for r in &ranges {
        if u32::from(r.first) > next {
            return Some(ranges);
        }
        next = next.max(u32::from(r.last) + 1);
    }
    if next > u32::from(u16::MAX) {
        None
    } else {
        Some(ranges)
    }
}

/// A path made absolute against the working directory, without touching the file system
/// beyond that (a missing file still has a directory).
fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())
}

/// How each part of the confinement came out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Applied {
    /// The configured mode.
    pub mode: Mode,
    /// Landlock: `"fully enforced (ABI 7)"`, `"partially enforced (ABI 3)"`, `"not enforced:
    /// ..."`, `"off"`.
    pub landlock: String,
    /// Whether the Landlock rules (files and, if the kernel has them, ports) are in force.
    pub landlock_enforced: bool,
    /// Whether the kernel can restrict TCP ports (Landlock ABI 4 or later).
    pub landlock_net: bool,
    /// seccomp: `"allow-list (N calls)"`, `"log only"`, `"off"`.
    pub seccomp: String,
    /// Whether the seccomp allow-list is in force.
    pub seccomp_enforced: bool,
    /// Whether `no_new_privs` is set.
    pub no_new_privs: bool,
    /// The directories readable.
    pub read: Vec<PathBuf>,
    /// The rules the process was confined with.
    #[serde(skip)]
    pub rules: Rules,
}

impl Applied {
    /// Whether every part is in force: Landlock with port rules, and the seccomp allow-list.
    pub fn fully_enforced(&self) -> bool {
        self.landlock.starts_with("fully") && self.seccomp_enforced
    }
}

impl fmt::Display for Applied {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mode = match self.mode {
            Mode::Enforce => "enforce",
            Mode::Warn => "warn",
            Mode::Off => "off",
        };
        write!(
            f,
            "mode {mode}; Landlock: {}; seccomp: {}; no_new_privs: {}",
            self.landlock,
            self.seccomp,
            if self.no_new_privs { "set" } else { "not set" }
        )
    }
}

/// Why the process could not be confined as required.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// `require = true` and a part is missing.
    #[error("sandbox.require is set but {0}")]
    Required(String),
    /// The kernel refused a rule or the filter.
    #[error("{0}")]
    Kernel(String),
}

static APPLIED: OnceLock<Applied> = OnceLock::new();

/// The confinement in force, if [`apply`] ran in this process.
pub fn applied() -> Option<&'static Applied> {
    APPLIED.get()
}

/// Confines the calling thread and the threads it starts afterwards. Call it on the main
/// thread before starting the runtime. In `Mode::Off` nothing is applied (but it is
/// remembered, for `/status`).
pub fn apply(settings: Settings, rules: &Rules) -> Result<&'static Applied, SandboxError> {
    let mut applied = Applied {
        mode: settings.mode,
        landlock: "off".into(),
        landlock_enforced: false,
        landlock_net: false,
        seccomp: "off".into(),
        seccomp_enforced: false,
        no_new_privs: false,
        read: Vec::new(),
        rules: rules.clone(),
    };
    match settings.mode {
        Mode::Off => {}
        Mode::Warn => {
            applied.landlock = "not applied (mode warn)".into();
            seccomp::apply(false)?;
            applied.seccomp = "log only (mode warn)".into();
            applied.no_new_privs = true;
        }
        Mode::Enforce => {
            ruleset::apply(rules, settings.require, &mut applied)?;
            match seccomp::apply(true) {
                Ok(calls) => {
                    applied.seccomp = format!("allow-list ({calls} calls)");
                    applied.seccomp_enforced = true;
                    applied.no_new_privs = true;
                }
                Err(e) if settings.require => return Err(SandboxError::Required(e.to_string())),
                Err(e) => applied.seccomp = format!("not enforced: {e}"),
            }
        }
    }
    Ok(APPLIED.get_or_init(|| applied))
}

/// What `rules` needs beyond the confinement in force, one line each (empty when nothing, or
/// when the process is not confined).
pub fn outside(rules: &Rules) -> Vec<String> {
    let Some(applied) = applied().filter(|a| a.landlock_enforced) else {
        return Vec::new();
    };
    let allowed = applied.rules.read_dirs();
    let mut needs = Vec::new();
    for dir in rules.read_dirs() {
        if !allowed.iter().any(|a| dir.starts_with(a)) {
            needs.push(format!("reading files in {}", dir.display()));
        }
    }
    let all = [PortRange {
        first: 0,
        last: u16::MAX,
    }];
    let mut ports = |wanted: &Option<Vec<PortRange>>, have: &dyn Fn(u16) -> bool, what: &str| {
        let missing: Vec<u16> = wanted
            .as_deref()
            .unwrap_or(&all)
            .iter()
            .flat_map(PortRange::iter)
            .filter(|p| !have(*p))
            .collect();
        if !missing.is_empty() {
            needs.push(format!("{what} TCP port(s) {}", port_list(&missing)));
        }
    };
    if applied.landlock_net {
        ports(&rules.bind, &|p| applied.rules.may_bind(p), "binding");
        ports(
            &rules.connect,
            &|p| applied.rules.may_connect(p),
            "connecting to",
        );
    }
    needs
}

/// Whether a reload may apply a config with `rules` under the confinement in force; if not,
/// why, naming what it needs.
pub fn reload_check(rules: &Rules) -> Result<(), String> {
    let needs = outside(rules);
    if needs.is_empty() {
        return Ok(());
    }
    Err(format!(
        "the sandbox set at start does not allow {}: restart to apply this config",
        needs.join(", ")
    ))
}

/// Adds to a reload's error, when a file could not be read and the sandbox may be why, which
/// directories the sandbox lets the process read.
pub fn explain_denied(error: String) -> String {
    let denied = error.contains("os error 13");
    match applied().filter(|a| a.landlock_enforced && denied) {
        Some(a) => {
            let dirs: Vec<String> = a
                .rules
                .read_dirs()
                .iter()
                .map(|d| d.display().to_string())
                .collect();
            format!(
                "{error}; the sandbox lets this process read files only in {} (and system \
                 files): a file elsewhere needs a restart",
                dirs.join(", ")
            )
        }
        None => error,
    }
}

/// `8443, 9000-9010` from a sorted list of ports.
fn port_list(ports: &[u16]) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut i = 0;
    while i < ports.len() {
        let mut j = i;
        while j + 1 < ports.len() && ports[j + 1] == ports[j] + 1 {
            j += 1;
        }
        out.push(if i == j {
            ports[i].to_string()
        } else {
            format!("{}-{}", ports[i], ports[j])
        });
        i = j + 1;
    }
    out.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(first: u16, last: u16) -> PortRange {
        PortRange { first, last }
    }

    #[test]
    fn mode_and_require_are_checked() {
        let mut err = ConfigError::default();
        let raw: RawSandbox = toml::from_str("mode = \"strict\"").unwrap();
        RawSandbox::check(Some(&raw), &mut err);
        let raw: RawSandbox = toml::from_str("mode = \"warn\"\nrequire = true").unwrap();
        RawSandbox::check(Some(&raw), &mut err);
        let text = err.to_string();
        assert!(
            text.contains("sandbox.mode: unknown mode \"strict\""),
            "{text}"
        );
        assert!(
            text.contains("sandbox.require: only means something"),
            "{text}"
        );
        let mut ok = ConfigError::default();
        assert_eq!(RawSandbox::check(None, &mut ok), Settings::default());
        assert!(ok.into_result(|| ()).is_ok());
    }

    #[test]
    fn ports_and_directories() {
        let rules = Rules {
            files: vec!["/etc/relay/dmz.toml".into(), "/etc/relay/pki/ca.pem".into()],
            bind: Some(vec![range(7443, 7443), range(8000, 8999)]),
            connect: Some(Vec::new()),
        };
        assert_eq!(
            rules.read_dirs(),
            [PathBuf::from("/etc/relay"), PathBuf::from("/etc/relay/pki")]
        );
        assert!(rules.may_bind(8500) && !rules.may_bind(9000));
        assert!(!rules.may_connect(443));
        assert!(Rules::default().may_connect(443));
        assert_eq!(port_list(&[80, 443, 444, 445, 8000]), "80, 443-445, 8000");
        assert_eq!(port_rule(vec![range(1024, 65535), range(0, 1023)]), None);
        assert_eq!(
            port_rule(vec![range(1025, 65535), range(0, 1023)]),
            Some(vec![range(0, 1023), range(1025, 65535)])
        );
        assert_eq!(port_rule(Vec::new()), Some(Vec::new()));
    }
}
