//! HAProxy in TCP mode in front of two DMZ nodes on one host (public binds 127.0.0.2 and
//! 127.0.0.3), each server checked through its node's `/readyz`, and its stats socket for
//! server states and admin commands.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

use crate::process::log_tail;
use crate::{ChildGuard, Pki, free_port, wait_for};

/// Public bind addresses of the two DMZ nodes.
pub const BINDS: [[u8; 4]; 2] = [[127, 0, 0, 2], [127, 0, 0, 3]];
/// HAProxy's server names for the two nodes.
pub const LB_SERVERS: [&str; 2] = ["dmz1", "dmz2"];

/// The HAProxy binary, or `None` (after a skip line) when it is not installed; under CI a
/// missing HAProxy is an error.
pub fn haproxy_or_skip(test: &str) -> Option<PathBuf> {
    let found = [
        "/usr/sbin/haproxy",
        "/usr/local/sbin/haproxy",
        "/usr/bin/haproxy",
    ]
    .iter()
    .map(PathBuf::from)
    .find(|p| p.exists());
    crate::tools::or_skip(
        test,
        found,
        "HAProxy is not installed (apt-get install haproxy)",
    )
}

/// The config: TCP mode on `lb` with client and server timeout `timeout`, servers
/// `BINDS[i]:port`, each checked by `GET /readyz` on `admins[i]` every 300 ms, down after one
/// failed check and up after one good one.
fn config(
    lb: SocketAddr,
    port: u16,
    admins: [SocketAddr; 2],
    stats: &Path,
    timeout: u64,
) -> String {
    let mut s = format!(
        "global\n    stats socket {} mode 600 level admin\n    maxconn 4096\n\n\
         defaults\n    mode tcp\n    timeout connect 2s\n    timeout client {timeout}s\n    timeout server {timeout}s\n    timeout check 1s\n\n\
         listen relay\n    bind {lb}\n    balance roundrobin\n    option httpchk GET /readyz\n    http-check expect status 200\n",
        stats.display()
    );
    for i in 0..2 {
        let [a, b, c, d] = BINDS[i];
        s += &format!(
            "    server {} {a}.{b}.{c}.{d}:{port} check port {} addr {} inter 300ms fall 1 rise 1\n",
            LB_SERVERS[i],
            admins[i].port(),
            admins[i].ip()
        );
    }
    s
}

/// HAProxy running in front of two DMZ nodes, logging to `haproxy.log` in the test directory;
/// killed on drop.
pub struct Haproxy {
    /// Where partners connect.
    pub addr: SocketAddr,
    stats: PathBuf,
    log: PathBuf,
    _proc: ChildGuard,
}

impl Haproxy {
    /// Starts `haproxy` on a free port for the nodes' service `port` and admin endpoints
    /// `admins`, with `timeout` as its client and server timeout; does not wait for anything.
    pub fn spawn(
        pki: &Pki,
        haproxy: &Path,
        port: u16,
        admins: [SocketAddr; 2],
        timeout: Duration,
    ) -> Self {
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let stats = pki.path("haproxy.sock");
        let cfg = pki.write(
            "haproxy.cfg",
            &config(addr, port, admins, &stats, timeout.as_secs()),
        );
        let log = pki.path("haproxy.log");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("open haproxy.log");
        let child = Command::new(haproxy)
            .arg("-f")
            .arg(&cfg)
            .arg("-db")
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("log file"))
            .stderr(file)
            .spawn()
            .expect("spawn haproxy");
        Self {
            addr,
            stats,
            log,
            _proc: ChildGuard { child },
        }
    }

    /// Sends one command to the stats socket; returns the answer, `None` if there is none
    /// within 2 s.
    pub async fn command(&self, cmd: &str) -> Option<String> {
        let exchange = async {
            let mut s = UnixStream::connect(&self.stats).await.ok()?;
            s.write_all(format!("{cmd}\n").as_bytes()).await.ok()?;
            let mut text = String::new();
            s.read_to_string(&mut text).await.ok()?;
            Some(text)
        };
        tokio::time::timeout(Duration::from_secs(2), exchange)
            .await
            .ok()
            .flatten()
    }

    /// HAProxy's status of each server (`UP`, `DOWN`, `DRAIN`, ...) from `show stat`; empty
    /// when the stats socket does not answer.
    pub async fn states(&self) -> HashMap<String, String> {
        let Some(text) = self.command("show stat").await else {
            return HashMap::new();
        };
        let mut lines = text.lines();
        let Some(header) = lines.next().and_then(|h| h.strip_prefix("# ")) else {
            return HashMap::new();
        };
        let cols: Vec<&str> = header.split(',').collect();
        let (Some(sv), Some(st)) = (
            cols.iter().position(|c| *c == "svname"),
            cols.iter().position(|c| *c == "status"),
        ) else {
            return HashMap::new();
        };
        lines
            .map(|l| l.split(',').collect::<Vec<_>>())
            .filter(|f| f.len() > sv.max(st))
            .map(|f| (f[sv].to_owned(), f[st].to_owned()))
            .collect()
    }

    /// Whether every server of [`LB_SERVERS`] is in `state` now.
    pub async fn all_in(&self, state: &str) -> bool {
        let states = self.states().await;
        LB_SERVERS
            .iter()
            .all(|s| states.get(*s).is_some_and(|st| st == state))
    }

    /// Waits until HAProxy reports `server` in `state`; the time it took, or `None`.
    pub async fn wait_state(&self, server: &str, state: &str, limit: Duration) -> Option<Duration> {
        wait_for(limit, || async {
            self.states().await.get(server).is_some_and(|s| s == state)
        })
        .await
    }

    /// The last `n` lines of HAProxy's log, for assertion messages.
    pub fn tail(&self, n: usize) -> String {
        log_tail(&self.log, n)
    }
}
