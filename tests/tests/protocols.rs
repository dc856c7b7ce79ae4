//! Interoperability through DMZ + agent on loopback: real servers and clients from Debian
//! packages (OpenSSH sftp, an FTP server in passive mode over a port-range service, nginx over
//! HTTPS with SNI), a server that speaks first, a long idle session, and the port-range rules.
//!
//! The programs must be installed (`.ci/run` installs them): a test whose program is missing
//! fails and names the package, it is never skipped.

#[path = "protocols/ftp.rs"]
mod ftp;
#[path = "protocols/gates.rs"]
mod gates;
#[path = "protocols/https.rs"]
mod https;
#[path = "protocols/ranges.rs"]
mod ranges;
#[path = "protocols/sessions.rs"]
mod sessions;
#[path = "protocols/sftp.rs"]
mod sftp;

use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use relay_e2e::*;
use sha2::{Digest, Sha256};

/// Bound on one external client command (a whole transfer on a busy 2-core machine).
const COMMAND_LIMIT: Duration = Duration::from_secs(180);
/// Bound on a server program or a relay listener coming up.
const START_LIMIT: Duration = Duration::from_secs(20);

/// The path of `program` (searched in PATH, then in the sbin directories), or a failure that
/// names the Debian package to install.
fn require(program: &str, package: &str) -> PathBuf {
    let path = std::env::var("PATH").unwrap_or_default();
    let dirs = path
        .split(':')
        .map(PathBuf::from)
        .chain(["/usr/sbin", "/sbin", "/usr/bin"].map(PathBuf::from));
    for dir in dirs {
        let candidate = dir.join(program);
        if candidate.is_file() {
            return candidate;
        }
    }
    panic!("{program} is not installed: install the Debian package {package} (see .ci/run)");
}

/// A Python interpreter that runs `check` (imports and version checks) without error:
/// `python3` from PATH, else Debian's `/usr/bin/python3`; fails with `install` as the remedy.
fn require_python(check: &str, install: &str) -> PathBuf {
    let candidates = [
        std::env::var("PATH")
            .unwrap_or_default()
            .split(':')
            .map(|d| Path::new(d).join("python3"))
            .find(|p| p.is_file()),
        Some(PathBuf::from("/usr/bin/python3")),
    ];
    let mut errors = Vec::new();
    for python in candidates.into_iter().flatten() {
        match Command::new(&python).args(["-c", check]).output() {
            Ok(out) if out.status.success() => return python,
            Ok(out) => errors.push(format!(
                "{}: {}",
                python.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            )),
            Err(e) => errors.push(format!("{}: {e}", python.display())),
        }
    }
    panic!(
        "no python3 passes `{check}`: {install} (see .ci/run)\n{}",
        errors.join("\n")
    );
}

/// The user name the tests run as.
fn current_user() -> String {
    let out = Command::new("id").arg("-un").output().expect("run id -un");
    assert!(out.status.success(), "id -un failed");
    String::from_utf8(out.stdout)
        .expect("user name is UTF-8")
        .trim()
        .to_owned()
}

/// Whether the tests run as root (sshd then needs its privilege separation directory).
fn is_root() -> bool {
    let out = Command::new("id").arg("-u").output().expect("run id -u");
    String::from_utf8_lossy(&out.stdout).trim() == "0"
}

/// Writes `len` pseudo-random bytes (splitmix64 from `seed`) to `path`; returns their SHA-256.
fn write_pattern_file(path: &Path, seed: u64, len: usize) -> String {
    let mut pattern = pattern::Pattern::new(seed, len as u64);
    let mut hash = Sha256::new();
    let mut out = BufWriter::new(File::create(path).expect("create data file"));
    while let Some(chunk) = pattern.next_chunk() {
        hash.update(chunk);
        out.write_all(chunk).expect("write data file");
    }
    out.flush().expect("flush data file");
    hex(&hash.finalize())
}

/// SHA-256 of a file, hex.
fn sha256_file(path: &Path) -> String {
    let mut file =
        File::open(path).unwrap_or_else(|e| panic!("open {} to hash it: {e}", path.display()));
    let mut hash = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = file.read(&mut buf).expect("read file to hash");
        if n == 0 {
            break;
        }
        hash.update(&buf[..n]);
    }
    hex(&hash.finalize())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A server program running as a child, its stdout and stderr in `log`; killed on drop.
struct Server {
    child: ChildGuard,
    log: PathBuf,
    name: &'static str,
}

impl Server {
    /// Starts `cmd` with its output going to `log`.
    fn spawn(name: &'static str, cmd: &mut Command, log: PathBuf) -> Server {
        let out = File::create(&log).expect("create server log");
        let err = out.try_clone().expect("clone log handle");
        let child = spawn_command(cmd.stdout(Stdio::from(out)).stderr(Stdio::from(err)));
        Server { child, log, name }
    }

    /// The last lines of the server's log, for failure messages.
    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// Waits until the server accepts on `addr`; fails early if it exits.
    async fn wait_ready(&mut self, addr: SocketAddr) {
        let start = Instant::now();
        while start.elapsed() < START_LIMIT {
            if let Some(status) = self.child.child.try_wait().expect("poll server child") {
                panic!(
                    "{} exited with {status} before listening on {addr}:\n{}",
                    self.name,
                    self.log_tail()
                );
            }
            if accepts(addr).await {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!(
            "{} did not listen on {addr} within {START_LIMIT:?}:\n{}",
            self.name,
            self.log_tail()
        );
    }
}

/// Output of a client command that succeeded.
struct Ran {
    stdout: String,
    elapsed: Duration,
}

/// Runs a client command with stdin closed under [`COMMAND_LIMIT`]; fails with its output
/// (and the server's log) unless it exits 0.
async fn run_client(cmd: &mut tokio::process::Command, server: &Server) -> Ran {
    let what = format!("{:?}", cmd.as_std());
    let start = Instant::now();
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {what}: {e}"));
    let out = tokio::time::timeout(COMMAND_LIMIT, child.wait_with_output())
        .await
        .unwrap_or_else(|_| {
            panic!(
                "{what} did not finish within {COMMAND_LIMIT:?}; server log:\n{}",
                server.log_tail()
            )
        })
        .expect("wait for client");
    let elapsed = start.elapsed();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{what} failed with {}\nstdout: {stdout}\nstderr: {}\n{} log:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        server.name,
        server.log_tail()
    );
    Ran { stdout, elapsed }
}

/// MiB/s for `bytes` moved in `elapsed`.
/// nginx in the foreground, prefixed to `dir` (its `www/files`, `bodies` and `tmp` made here),
/// with `config` as `dir/nginx.conf`, once it accepts on 127.0.0.1:`port`.
async fn run_nginx(dir: &Path, config: &str, port: u16) -> Server {
    let nginx = require("nginx", "nginx");
    for sub in ["www/files", "bodies", "tmp"] {
        std::fs::create_dir_all(dir.join(sub)).expect("create nginx dir");
    }
    let conf = dir.join("nginx.conf");
    std::fs::write(&conf, config).expect("write nginx.conf");
    let mut server = Server::spawn(
        "nginx",
        Command::new(nginx)
            .arg("-p")
            .arg(dir)
            .arg("-e")
            .arg(dir.join("error.log"))
            .arg("-c")
            .arg(&conf)
            .args(["-g", "daemon off; master_process off;"]),
        dir.join("error.log"),
    );
    server
        .wait_ready(SocketAddr::from(([127, 0, 0, 1], port)))
        .await;
    server
}

fn rate(bytes: usize, elapsed: Duration) -> f64 {
    bytes as f64 / (1024.0 * 1024.0) / elapsed.as_secs_f64().max(1e-6)
}

/// The DMZ admin endpoint's value of `relay_bytes_total` for `service` and `direction`
/// (summed by the DMZ and the agent, which share this process's metrics).
async fn bytes_metric(dmz: &DmzOptions, service: &str, direction: &str) -> f64 {
    let (status, text) = http_get(dmz.admin, "/metrics").await.expect("GET /metrics");
    assert_eq!(status, 200, "/metrics answered {status}");
    metric(
        &text,
        "relay_bytes_total",
        &[
            &format!("service=\"{service}\""),
            &format!("direction=\"{direction}\""),
        ],
    )
    .unwrap_or(0.0)
}
