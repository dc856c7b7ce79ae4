//! Relay binaries run as child processes whose logs a test reads: written to files in the test
//! directory ([`Logged`]) or collected in memory ([`Captured`], and a DMZ node run that way,
//! [`Dmz`]); and curl as a client.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::{ChildGuard, DmzOptions, Pki, bin, http_get, metric, wait_for};

/// Generous bound on a process coming up or a counter moving, on an idle machine.
const LIMIT: Duration = Duration::from_secs(20);

/// The last `n` lines of a log file, headed by its path, for assertion messages.
pub fn log_tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let from = lines.len().saturating_sub(n);
    format!(
        "--- {} (last {n} lines)\n{}",
        path.display(),
        lines[from..].join("\n")
    )
}

/// Opens `path` for appending, so a restarted process continues the log of the one before.
fn append(path: &Path) -> std::fs::File {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open log file {}: {e}", path.display()))
}

/// A child whose stdout and stderr go to files in the test directory.
pub struct Logged {
    /// The child.
    pub guard: ChildGuard,
    /// Where its stdout goes.
    pub stdout: PathBuf,
    /// Where its stderr (the relay's log) goes.
    pub stderr: PathBuf,
}

impl Logged {
    /// Starts `binary --config CONFIG ARGS...` with `RUST_LOG=info`, appending to `NAME.stdout`
    /// and `NAME.stderr` in the PKI directory.
    pub fn spawn(pki: &Pki, binary: &str, config: &Path, args: &[&str], name: &str) -> Self {
        let stdout = pki.path(&format!("{name}.stdout"));
        let stderr = pki.path(&format!("{name}.stderr"));
        let child = Command::new(bin(binary))
            .arg("--config")
            .arg(config)
            .args(args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(append(&stdout))
            .stderr(append(&stderr))
            .spawn()
            .expect("spawn binary");
        Self {
            guard: ChildGuard { child },
            stdout,
            stderr,
        }
    }

    /// Everything the process wrote to stderr so far.
    pub fn stderr_text(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Everything the process wrote to stdout so far.
    pub fn stdout_text(&self) -> String {
        std::fs::read_to_string(&self.stdout).unwrap_or_default()
    }

    /// The last `n` lines of stderr, for assertion messages.
    pub fn tail(&self, n: usize) -> String {
        log_tail(&self.stderr, n)
    }
}

/// A child whose stderr is collected in memory line by line (stdout is discarded).
pub struct Captured {
    /// The child.
    pub guard: ChildGuard,
    log: Arc<Mutex<String>>,
    name: &'static str,
}

impl Captured {
    /// Starts `binary --config PATH` with `RUST_LOG=info` and no colours.
    pub fn spawn(binary: &'static str, config: &Path) -> Self {
        Self::spawn_command(
            Command::new(bin(binary)).arg("--config").arg(config),
            binary,
        )
    }

    /// Starts a prepared command (such as a relay binary under `ip netns exec`) the same way;
    /// `name` names it in assertion messages.
    pub fn spawn_command(cmd: &mut Command, name: &'static str) -> Self {
        let mut child = cmd
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn binary");
        let stderr = child.stderr.take().expect("stderr piped");
        let log = Arc::new(Mutex::new(String::new()));
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let mut text = sink.lock().unwrap();
                text.push_str(&strip_ansi(&line));
                text.push('\n');
            }
        });
        Self {
            guard: ChildGuard { child },
            log,
            name,
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.guard.pid()
    }

    /// Everything logged so far.
    pub fn text(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// The last `n` lines logged so far.
    pub fn tail(&self, n: usize) -> String {
        let text = self.text();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// The number of lines holding every one of `needles`.
    pub fn count_lines(&self, needles: &[&str]) -> usize {
        self.text()
            .lines()
            .filter(|l| needles.iter().all(|n| l.contains(n)))
            .count()
    }

    /// Waits until `n` lines hold every one of `needles`; returns the last, or panics.
    pub async fn wait_count(&self, needles: &[&str], n: usize, limit: Duration) -> String {
        let start = Instant::now();
        loop {
            let text = self.text();
            let lines: Vec<&str> = text
                .lines()
                .filter(|l| needles.iter().all(|x| l.contains(x)))
                .collect();
            if lines.len() >= n {
                return lines[lines.len() - 1].to_owned();
            }
            assert!(
                start.elapsed() < limit,
                "{} logged {} line(s) with {needles:?}, expected {n}; log:\n{}",
                self.name,
                lines.len(),
                self.tail(60)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits for a line holding every one of `needles`; returns it, or panics with the log.
    pub async fn wait_line(&self, needles: &[&str], limit: Duration) -> String {
        let start = Instant::now();
        loop {
            if let Some(line) = self
                .text()
                .lines()
                .find(|l| needles.iter().all(|n| l.contains(n)))
            {
                return line.to_owned();
            }
            if start.elapsed() > limit {
                panic!(
                    "{} (pid {}) logged no line with {needles:?} within {limit:?}; log:\n{}",
                    self.name,
                    self.pid(),
                    self.tail(60)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Removes ANSI escape sequences (in case colours are forced on).
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// A DMZ node process, its log [`Captured`], and its options.
pub struct Dmz {
    /// The process.
    pub proc: Captured,
    /// Its options.
    pub opts: DmzOptions,
}

impl Dmz {
    /// Starts a DMZ from `opts` and waits until `/livez` answers.
    pub async fn start(pki: &Pki, opts: DmzOptions) -> Self {
        let text = opts.toml(pki);
        Self::start_with(pki, opts, text).await
    }

    /// Starts a DMZ from `text`, a config made from `opts` and then edited.
    pub async fn start_with(pki: &Pki, opts: DmzOptions, text: String) -> Self {
        let path = pki.write(&format!("dmz-{}.toml", opts.tunnel.port()), &text);
        let proc = Captured::spawn("relay-dmz", &path);
        let admin = opts.admin;
        let up = wait_for(LIMIT, || async move {
            matches!(http_get(admin, "/livez").await, Ok((200, _)))
        })
        .await;
        assert!(up.is_some(), "DMZ did not come up; log:\n{}", proc.text());
        Self { proc, opts }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// The `/metrics` text; panics unless it answers 200.
    pub async fn metrics(&self) -> String {
        let (status, body) = http_get(self.opts.admin, "/metrics")
            .await
            .expect("scrape /metrics");
        assert_eq!(status, 200);
        body
    }

    /// A metric sample, 0 if absent.
    pub async fn metric(&self, name: &str, labels: &[&str]) -> f64 {
        metric(&self.metrics().await, name, labels).unwrap_or(0.0)
    }

    /// `relay_rejections_total{reason=REASON}`, 0 if absent.
    pub async fn rejections(&self, reason: &str) -> f64 {
        self.metric("relay_rejections_total", &[&format!("reason=\"{reason}\"")])
            .await
    }

    /// Waits until the rejection counter for `reason` reaches `at_least`; returns it.
    pub async fn wait_rejections(&self, reason: &str, at_least: f64) -> f64 {
        let start = Instant::now();
        loop {
            let n = self.rejections(reason).await;
            if n >= at_least {
                return n;
            }
            assert!(
                start.elapsed() < LIMIT,
                "relay_rejections_total{{reason=\"{reason}\"}} is {n}, expected >= {at_least}; log:\n{}",
                self.proc.tail(60)
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Runs `curl -sS --max-time 10 ARGS...`; returns its exit code (-1 if killed) and stdout.
pub async fn curl(args: Vec<String>) -> (i32, String) {
    tokio::task::spawn_blocking(move || {
        let out = Command::new("curl")
            .args(["-sS", "--max-time", "10"])
            .args(&args)
            .output()
            .expect("curl is installed (.ci/run installs it)");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    })
    .await
    .expect("curl task")
}
