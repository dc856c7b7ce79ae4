//! `sandbox-check`: confine the process as the node would be, then try what an attacker with
//! code execution in it would, and what the node itself must still do, and let the kernel
//! answer each.

use std::io;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::{Applied, Mode, Rules};

/// One thing tried under the sandbox.
struct Probe {
    what: String,
    expect_denied: bool,
    /// What the kernel said; `None`: not tried, the rules allow it anyway.
    result: Option<io::Result<()>>,
}

/// Whether an error is the sandbox's refusal (Landlock: EACCES, seccomp: EPERM).
fn denied(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EACCES | libc::EPERM))
}

/// Whether an error came from the network stack, past the sandbox.
fn reached_network(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(
            libc::ECONNREFUSED
                | libc::EADDRINUSE
                | libc::ETIMEDOUT
                | libc::ENETUNREACH
                | libc::EHOSTUNREACH
        )
    ) || e.kind() == io::ErrorKind::TimedOut
}

/// An error's errno name and text.
fn errno(e: &io::Error) -> String {
    let name = match e.raw_os_error() {
        Some(libc::EACCES) => "EACCES",
        Some(libc::EPERM) => "EPERM",
        Some(libc::ENOENT) => "ENOENT",
        Some(libc::EADDRINUSE) => "EADDRINUSE",
        Some(libc::ECONNREFUSED) => "ECONNREFUSED",
        Some(libc::ETIMEDOUT) => "ETIMEDOUT",
        Some(libc::ENOSYS) => "ENOSYS",
        Some(libc::EROFS) => "EROFS",
        _ => return e.to_string(),
    };
    let text = e.to_string();
    let text = text.split(" (os error").next().unwrap_or(&text);
    format!("{name} ({text})")
}

/// Runs the probes under the confinement in force (`applied`) and prints the table; returns
/// whether every probe came out as the sandbox promises.
pub fn check(applied: &Applied, config: &Path) -> bool {
    let rules = &applied.rules;
    let config_dir = std::path::absolute(config)
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf))
        .unwrap_or_else(|| PathBuf::from("."));
    // A file every system has, outside the rules (a scratch image has no /etc/passwd).
    let outside = ["/etc/passwd", "/proc/version"]
        .map(PathBuf::from)
        .into_iter()
        .find(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("/etc/passwd"));
    let mut probes = vec![
        Probe {
            what: format!("write a file in {}", config_dir.display()),
            expect_denied: true,
            result: Some(create(&config_dir.join(".relay-sandbox-check"))),
        },
        Probe {
            what: "create a file in /tmp".into(),
            expect_denied: true,
            result: Some(create(
                &std::env::temp_dir().join(format!("relay-sandbox-check-{}", std::process::id())),
            )),
        },
        Probe {
            what: format!("read {} (outside the rules)", outside.display()),
            expect_denied: true,
            result: Some(std::fs::read(&outside).map(drop)),
        },
        Probe {
            what: "execute /bin/true".into(),
            expect_denied: true,
            result: Some(
                // Standard streams inherited: opening /dev/null would be refused first.
                std::process::Command::new("/bin/true").status().map(drop),
            ),
        },
    ];
    probes.push(match free_port(|p| !rules.may_connect(p)) {
        Some(port) => Probe {
            what: format!("connect to TCP port {port} (outside the policy)"),
            expect_denied: true,
            result: Some(connect(port)),
        },
        None => Probe {
            what: "connect to a TCP port outside the policy".into(),
            expect_denied: false,
            result: None,
        },
    });
    probes.push(match free_port(|p| !rules.may_bind(p)) {
        Some(port) => Probe {
            what: format!("bind TCP port {port} (outside the policy)"),
            expect_denied: true,
            result: Some(bind(port)),
        },
        None => Probe {
            what: "bind a TCP port outside the policy".into(),
            expect_denied: false,
            result: None,
        },
    });
    probes.push(Probe {
        what: format!(
            "read the config and the {} file(s) it names",
            rules.files.len().saturating_sub(1)
        ),
        expect_denied: false,
        result: Some(
            rules
                .files
                .iter()
                .try_for_each(|f| std::fs::read(f).map(drop)),
        ),
    });
    if let Some(port) = allowed_port(rules) {
        probes.push(Probe {
            what: format!("bind TCP port {port} (allowed)"),
            expect_denied: false,
            result: Some(bind(port)),
        });
    }
    println!("{applied}");
    println!();
    let width = probes.iter().map(|p| p.what.len()).max().unwrap_or(0);
    println!(
        "{:width$}  {:8}  {:8}  ERRNO",
        "OPERATION", "EXPECTED", "RESULT"
    );
    let mut all_as_promised = true;
    for p in &probes {
        let (result, detail) = match &p.result {
            None => (
                "allowed",
                "not tried: the policy allows every port".to_owned(),
            ),
            Some(Ok(())) => ("allowed", String::new()),
            Some(Err(e)) if denied(e) => ("denied", errno(e)),
            // The network stack answered (port taken, nothing listening): the sandbox let the
            // call through.
            Some(Err(e)) if reached_network(e) => ("allowed", errno(e)),
            // Refused before the sandbox was asked (a read-only or missing file system in a
            // container): proves nothing either way.
            Some(Err(e)) => (
                "refused",
                format!("{}: before the sandbox was asked", errno(e)),
            ),
        };
        let expected = if p.expect_denied { "denied" } else { "allowed" };
        let ok = result == expected || (p.expect_denied && result == "refused");
        all_as_promised &= ok;
        println!(
            "{:width$}  {expected:8}  {result:8}  {detail}{}",
            p.what,
            if ok { "" } else { "  <- not as expected" }
        );
    }
    if !all_as_promised {
        println!();
        println!(
            "{}",
            match applied.mode {
                Mode::Enforce => "the sandbox is not fully enforced on this kernel",
                Mode::Warn => "the sandbox is not enforced: sandbox.mode = \"warn\"",
                Mode::Off => "the sandbox is off: sandbox.mode = \"off\"",
            }
        );
    }
    all_as_promised
}

/// Creates (and removes, if that worked) a file.
fn create(path: &Path) -> io::Result<()> {
    std::fs::File::create(path)?;
    let _ = std::fs::remove_file(path);
    Ok(())
}

fn connect(port: u16) -> io::Result<()> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    TcpStream::connect_timeout(&addr, Duration::from_secs(2)).map(drop)
}

fn bind(port: u16) -> io::Result<()> {
    TcpListener::bind((Ipv4Addr::LOCALHOST, port)).map(drop)
}

/// A port above 1023 that `outside` says is outside the rules.
fn free_port(outside: impl Fn(u16) -> bool) -> Option<u16> {
    (20_000..u16::MAX).chain(1024..20_000).find(|p| outside(*p))
}

/// A port the rules allow binding, unprivileged if possible.
fn allowed_port(rules: &Rules) -> Option<u16> {
    let ranges = rules.bind.as_ref()?;
    ranges
        .iter()
        .flat_map(crate::config::PortRange::iter)
        .find(|p| *p >= 1024)
        .or_else(|| ranges.first().map(|r| r.first))
}
