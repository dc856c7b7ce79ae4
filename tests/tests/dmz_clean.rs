//! The DMZ stays clean: under a real workload (sessions with data, an agent that leaves and
//! comes back, a garbage client, admin scrapes, SIGTERM), the relay-dmz process opens no file
//! for writing, creates, renames, truncates or removes nothing, and with an inbound-only
//! config makes no `connect` call at all. Checked with strace on the real binary.
//!
//! strace is required under CI (`CI=true`): a missing strace fails the test there. On a
//! developer machine without strace the test says so and returns. Needs
//! `cargo build --workspace` first.

use std::fs::File;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use relay_e2e::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Syscalls that open, create, modify or remove files, `connect`, and `socket`.
const TRACED: &str = "trace=connect,socket,open,openat,openat2,creat,rename,renameat,renameat2,\
                      unlink,unlinkat,mkdir,mkdirat,truncate";

/// Generous limit for each step; strace slows the DMZ down.
const LIMIT: Duration = Duration::from_secs(30);

/// Open flags that mean the file may be written, created or emptied.
const WRITE_FLAGS: &[&str] = &[
    "O_WRONLY",
    "O_RDWR",
    "O_CREAT",
    "O_TRUNC",
    "O_APPEND",
    "O_TMPFILE",
];

/// Syscalls the DMZ must never make.
const FORBIDDEN: &[&str] = &[
    "connect",
    "creat",
    "rename",
    "renameat",
    "renameat2",
    "unlink",
    "unlinkat",
    "mkdir",
    "mkdirat",
    "truncate",
];

/// What a line of `strace -f` output shows the traced process doing wrong, if anything.
fn violation(line: &str) -> Option<String> {
    let line = line.trim();
    // `PID syscall(...)` with -f; signals (`--- SIG`), exits (`+++`) and the second half of
    // an interrupted call (`<... openat resumed>`, its arguments are on the first half) are
    // not calls to judge.
    let rest = match line.split_once(' ') {
        // strace pads the pid column with spaces.
        Some((pid, rest)) if pid.chars().all(|c| c.is_ascii_digit()) => rest.trim_start(),
        _ => line,
    };
    if rest.is_empty()
        || rest.starts_with("---")
        || rest.starts_with("+++")
        || rest.starts_with("<...")
    {
        return None;
    }
    let (name, args) = rest.split_once('(')?;
    if !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return Some(format!("unparsed strace line: {line}"));
    }
    if FORBIDDEN.contains(&name) {
        return Some(format!("forbidden call: {line}"));
    }
    match name {
        "open" | "openat" | "openat2" => {
            let flags = after_first_string(args)?;
            WRITE_FLAGS
                .iter()
                .any(|f| flags.contains(f))
                .then(|| format!("file opened for writing: {line}"))
        }
        // Only TCP listeners: a datagram, unix or netlink socket could reach out without
        // a connect call.
        "socket" => {
            let family_ok = args.starts_with("AF_INET,") || args.starts_with("AF_INET6,");
            let stream = args.contains("SOCK_STREAM");
            (!(family_ok && stream)).then(|| format!("unexpected socket: {line}"))
        }
        _ => None,
    }
}

/// The text after the first quoted string of a syscall's arguments (strace escapes `"` and
/// `\` inside strings), so flags are never read from a path.
fn after_first_string(args: &str) -> Option<&str> {
    let start = args.find('"')? + 1;
    let mut escaped = false;
    for (i, c) in args[start..].char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' => escaped = true,
            '"' => return Some(&args[start + i + 1..]),
            _ => {}
        }
    }
    None
}

/// Whether strace runs here; `None` means skip (developer machine without strace).
fn strace_available() -> Option<()> {
    let works = Command::new("strace")
        .arg("-V")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if works {
        return Some(());
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("strace not installed, but CI=true: this check must run in CI");
    }
    println!("strace not installed: skipped (install strace to run this check)");
    eprintln!("strace not installed: skipped (install strace to run this check)");
    None
}

/// The pid of the process strace started (its only child).
fn traced_pid(strace_pid: u32) -> u32 {
    let children =
        std::fs::read_to_string(format!("/proc/{strace_pid}/task/{strace_pid}/children"))
            .unwrap_or_default();
    if let Some(pid) = children.split_whitespace().next() {
        return pid.parse().expect("pid");
    }
    // Kernels without /proc/.../children: look for the process whose parent is strace.
    for entry in std::fs::read_dir("/proc").expect("read /proc").flatten() {
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // `pid (comm) state ppid ...`; comm may hold spaces, so split after the last ')'.
        let Some((_, after)) = stat.rsplit_once(')') else {
            continue;
        };
        let ppid = after
            .split_whitespace()
            .nth(1)
            .and_then(|p| p.parse::<u32>().ok());
        if ppid == Some(strace_pid) {
            return entry.file_name().to_string_lossy().parse().expect("pid");
        }
    }
    panic!("no child of strace (pid {strace_pid}) found");
}

/// Sends `len` bytes through `public` and checks they come back unchanged.
async fn echo_session(public: SocketAddr, seed: u32, len: usize) {
    let mut s = tokio::time::timeout(LIMIT, TcpStream::connect(public))
        .await
        .expect("connect timeout")
        .expect("connect to the public port");
    let data: Vec<u8> = (0..len as u32)
        .map(|i| (i.wrapping_mul(31) ^ seed) as u8)
        .collect();
    let (mut r, mut w) = s.split();
    let write = async {
        w.write_all(&data).await.expect("write");
        w.shutdown().await.expect("shutdown");
    };
    let mut back = Vec::with_capacity(len);
    let read = r.read_to_end(&mut back);
    let ((), n) = tokio::time::timeout(LIMIT, async { tokio::join!(write, read) })
        .await
        .expect("session timeout");
    n.expect("read");
    assert!(
        back == data,
        "session {seed}: echoed bytes differ ({} of {len})",
        back.len()
    );
}

async fn sessions(public: SocketAddr, first_seed: u32, count: u32) {
    let tasks: Vec<_> = (first_seed..first_seed + count)
        .map(|seed| tokio::spawn(echo_session(public, seed, 256 * 1024)))
        .collect();
    for t in tasks {
        t.await.expect("session task");
    }
}

async fn get(admin: SocketAddr, path: &str) -> (u16, String) {
    http_get(admin, path)
        .await
        .unwrap_or_else(|e| panic!("GET {path}: {e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dmz_opens_nothing_for_writing_and_connects_nowhere() {
    if strace_available().is_none() {
        return;
    }
    let pki = Pki::new();
    let work = tempfile::tempdir().expect("temp dir");
    let trace = work.path().join("strace.log");
    let stderr_path = work.path().join("dmz.stderr");
    let opts = DmzOptions {
        limits: "drain_timeout = \"5s\"\ndrain_delay = \"200ms\"".into(),
        ..Default::default()
    };
    let config = pki.write("dmz.toml", &opts.toml(&pki));
    // The test process opens the DMZ's stderr file; the DMZ only inherits the descriptor.
    let stderr_file = File::create(&stderr_path).expect("stderr file");
    let mut strace = ChildGuard {
        child: Command::new("strace")
            .args(["-f", "-qq", "-e", TRACED, "-o"])
            .arg(&trace)
            .arg(bin("relay-dmz"))
            .arg("--config")
            .arg(&config)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr_file)
            .spawn()
            .expect("spawn strace"),
    };
    let dmz_log = || std::fs::read_to_string(&stderr_path).unwrap_or_default();
    let admin = opts.admin;
    let up = wait_for(LIMIT, || async move {
        matches!(http_get(admin, "/livez").await, Ok((200, _)))
    })
    .await;
    assert!(
        up.is_some(),
        "DMZ under strace did not come up; its stderr:\n{}",
        dmz_log()
    );
    let dmz_pid = traced_pid(strace.pid());

    // Workload.
    let (status, body) = get(admin, "/readyz").await;
    assert_eq!(status, 503, "no agent yet: {body}");
    garbage_client(opts.tunnel).await;

    let echo = targets::echo().await;
    let port = free_port();
    let public = SocketAddr::from(([127, 0, 0, 1], port));
    let agent_opts = AgentOptions::new(opts.tunnel, vec![Service::new("echo", port, echo.addr)]);
    let agent = start_agent(&pki, &agent_opts).await;
    wait_open(public, LIMIT).await;
    let (status, body) = get(admin, "/readyz").await;
    assert_eq!(status, 200, "{body}");
    sessions(public, 0, 6).await;
    let (status, metrics) = get(admin, "/metrics").await;
    assert_eq!(status, 200);
    let bytes = metric(&metrics, "relay_bytes_total", &[]).unwrap_or(0.0);
    assert!(
        bytes > 0.0,
        "the workload moved no byte through the DMZ:\n{metrics}"
    );

    // The agent leaves and comes back.
    agent.stop().await.expect("agent stop");
    wait_closed(public, LIMIT).await;
    let (status, _) = get(admin, "/readyz").await;
    assert_eq!(status, 503);
    let agent = start_agent(&pki, &agent_opts).await;
    wait_open(public, LIMIT).await;
    sessions(public, 100, 4).await;
    let (status, _) = get(admin, "/metrics").await;
    assert_eq!(status, 200);
    let (status, _) = get(admin, "/readyz").await;
    assert_eq!(status, 200);

    // SIGTERM the DMZ (not strace); strace exits with the DMZ's status.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(dmz_pid as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("SIGTERM the DMZ");
    let start = Instant::now();
    let status = loop {
        if let Some(status) = strace.child.try_wait().expect("wait strace") {
            break status;
        }
        assert!(
            start.elapsed() < LIMIT,
            "DMZ did not stop within {LIMIT:?} of SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    println!(
        "DMZ stopped {:?} after SIGTERM, status {status}",
        start.elapsed()
    );
    assert!(
        status.success(),
        "DMZ exit status {status}; stderr:\n{}",
        dmz_log()
    );
    agent.stop().await.expect("agent stop");

    let log = std::fs::read_to_string(&trace).expect("read strace log");
    check_trace(&log, &config);
}

/// Judges a complete strace log: no violation, and evidence that the DMZ was really traced.
fn check_trace(log: &str, config: &Path) {
    let lines = log.lines().count();
    let opens = log.lines().filter(|l| l.contains("open")).count();
    let sockets = log.lines().filter(|l| l.contains("socket(")).count();
    println!("strace: {lines} lines, {opens} opens, {sockets} sockets");
    let mut paths: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("open") && !l.contains("= -1"))
        .filter_map(|l| l.split('"').nth(1))
        .filter(|p| !p.contains(".so"))
        .collect();
    paths.sort_unstable();
    paths.dedup();
    println!("files opened (shared libraries left out): {paths:?}");
    let config = config.display().to_string();
    assert!(
        log.lines()
            .any(|l| l.contains("open") && l.contains(&config) && l.contains("O_RDONLY")),
        "the trace does not show the config being read: was the DMZ traced?\n{log}"
    );
    assert!(sockets >= 2, "the trace shows no listener socket:\n{log}");
    let found: Vec<String> = log.lines().filter_map(violation).collect();
    assert!(
        found.is_empty(),
        "the DMZ left the clean path:\n{}",
        found.join("\n")
    );
}

/// A client that speaks no TLS at all to the tunnel port: the DMZ refuses it.
async fn garbage_client(tunnel: SocketAddr) {
    let mut s = tokio::time::timeout(LIMIT, TcpStream::connect(tunnel))
        .await
        .expect("connect timeout")
        .expect("connect tunnel");
    let _ = s.write_all(b"GET / HTTP/1.0\r\n\r\n").await;
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(LIMIT, s.read_to_end(&mut buf))
        .await
        .expect("garbage client not closed");
}

#[cfg(test)]
mod parser {
    use super::*;

    #[test]
    fn read_only_opens_and_listener_sockets_pass() {
        for line in [
            r#"25908 openat(AT_FDCWD, "/etc/ld.so.cache", O_RDONLY|O_CLOEXEC) = 3"#,
            r#"25908 openat(AT_FDCWD, "certs/dmz.pem", O_RDONLY|O_CLOEXEC) = 3"#,
            r#"openat(AT_FDCWD, "/proc/self/cgroup", O_RDONLY|O_CLOEXEC) = 3"#,
            r#"25908 open("/x", O_RDONLY) = -1 ENOENT (No such file or directory)"#,
            r#"25908 socket(AF_INET, SOCK_STREAM|SOCK_CLOEXEC|SOCK_NONBLOCK, IPPROTO_IP) = 9"#,
            r#"25908 socket(AF_INET6, SOCK_STREAM|SOCK_CLOEXEC, IPPROTO_TCP) = 9"#,
            r#"25911 --- SIGTERM {si_signo=SIGTERM, si_code=SI_USER, si_pid=25900, si_uid=0} ---"#,
            r#"25911 +++ exited with 0 +++"#,
            r#"25912 <... openat resumed>) = 5"#,
            r#"6516  openat(AT_FDCWD, "/lib/libgcc_s.so.1", O_RDONLY|O_CLOEXEC) = -1 ENOENT (No such file or directory)"#,
            // A path that merely contains flag names is not a write.
            r#"25908 openat(AT_FDCWD, "/tmp/O_CREAT|O_WRONLY \"x\"", O_RDONLY|O_CLOEXEC) = 3"#,
            r#"25908 openat2(AT_FDCWD, "/etc/hosts", {flags=O_RDONLY|O_CLOEXEC, resolve=0}, 24) = 3"#,
            "",
        ] {
            assert_eq!(violation(line), None, "{line}");
        }
    }

    #[test]
    fn writes_connects_and_file_changes_are_caught() {
        for line in [
            r#"25908 openat(AT_FDCWD, "/tmp/out.log", O_WRONLY|O_CREAT|O_TRUNC|O_CLOEXEC, 0666) = 7"#,
            r#"25908 openat(AT_FDCWD, "/var/tmp/x", O_RDWR|O_CLOEXEC) = 7"#,
            r#"6516  openat(AT_FDCWD, "/var/tmp/y", O_WRONLY|O_CLOEXEC) = 7"#,
            r#"25908 open("/tmp/a", O_WRONLY|O_APPEND) = 7"#,
            r#"25908 openat(AT_FDCWD, "/tmp", O_RDWR|O_TMPFILE, 0600) = 7"#,
            r#"25908 openat2(AT_FDCWD, "/tmp/x", {flags=O_WRONLY|O_CREAT, mode=0600, resolve=0}, 24) = 7"#,
            r#"25909 openat(AT_FDCWD, "/tmp/slow", O_WRONLY|O_CREAT <unfinished ...>"#,
            r#"25908 connect(12, {sa_family=AF_INET, sin_port=htons(8443), sin_addr=inet_addr("10.0.0.5")}, 16) = -1 EINPROGRESS"#,
            r#"25908 connect(5, {sa_family=AF_UNIX, sun_path="/var/run/nscd/socket"}, 110) = -1 ENOENT"#,
            r#"25908 creat("/tmp/x", 0644) = 7"#,
            // Real strace output: padded pid column, aligned return values.
            r#"8140  mkdir("st2d", 0777)               = 0"#,
            r#"8138  openat(AT_FDCWD, "/tmp/st2.out", O_WRONLY|O_CREAT|O_TRUNC, 0666) = 3"#,
            r#"8146  renameat2(AT_FDCWD, "/tmp/st2.out", AT_FDCWD, "/tmp/st2d/x", RENAME_NOREPLACE) = 0"#,
            r#"8149  unlinkat(AT_FDCWD, "/tmp/st2d", AT_REMOVEDIR) = 0"#,
            r#"8150  connect(3, {sa_family=AF_INET, sin_port=htons(53), sin_addr=inet_addr("10.255.255.53")}, 16) = 0"#,
            r#"25908 unlinkat(AT_FDCWD, "/tmp/x", 0) = 0"#,
            r#"25908 renameat2(AT_FDCWD, "/tmp/a", AT_FDCWD, "/tmp/b", 0) = 0"#,
            r#"25908 mkdir("/tmp/d", 0755) = 0"#,
            r#"25908 truncate("/tmp/x", 0) = 0"#,
            r#"25908 socket(AF_INET, SOCK_DGRAM|SOCK_CLOEXEC, IPPROTO_IP) = 9"#,
            r#"25908 socket(AF_UNIX, SOCK_STREAM|SOCK_CLOEXEC, 0) = 9"#,
            r#"25908 socket(AF_NETLINK, SOCK_RAW|SOCK_CLOEXEC, NETLINK_ROUTE) = 9"#,
        ] {
            assert!(violation(line).is_some(), "not caught: {line}");
        }
    }

    #[test]
    fn a_whole_log_with_one_write_fails_the_check() {
        let config = Path::new("/tmp/cfg/dmz.toml");
        let clean = "1 openat(AT_FDCWD, \"/tmp/cfg/dmz.toml\", O_RDONLY|O_CLOEXEC) = 3\n\
                     1 socket(AF_INET, SOCK_STREAM|SOCK_CLOEXEC|SOCK_NONBLOCK, IPPROTO_IP) = 9\n\
                     1 socket(AF_INET, SOCK_STREAM|SOCK_CLOEXEC|SOCK_NONBLOCK, IPPROTO_IP) = 11\n";
        check_trace(clean, config);
        let dirty =
            format!("{clean}2 openat(AT_FDCWD, \"/tmp/state\", O_WRONLY|O_CREAT, 0644) = 12\n");
        let caught = std::panic::catch_unwind(|| check_trace(&dirty, config));
        assert!(caught.is_err(), "a write in the log passed the check");
        let untraced = std::panic::catch_unwind(|| check_trace("", config));
        assert!(untraced.is_err(), "an empty log passed the check");
    }
}
