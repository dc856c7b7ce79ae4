//! HAProxy in TCP mode in front of two DMZ nodes (as in ha.rs), with its stats socket for
//! server states and admin commands.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use relay_e2e::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

use super::*;

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
    if found.is_none() {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "{test}: HAProxy is not installed (apt-get install haproxy); CI must run this test"
        );
        println!("{test}: SKIPPED: HAProxy is not installed (apt-get install haproxy)");
    }
    found
}

/// TCP mode on `lb`, servers 127.0.0.2:`port` and 127.0.0.3:`port`, each checked by
/// `GET /readyz` on its node's admin endpoint every 300 ms, down after one failed check.
fn haproxy_config(lb: SocketAddr, port: u16, admins: [SocketAddr; 2], stats: &Path) -> String {
    let mut s = format!(
        "global\n    stats socket {} mode 600 level admin\n    maxconn 4096\n\n\
         defaults\n    mode tcp\n    timeout connect 2s\n    timeout client 60s\n    timeout server 60s\n    timeout check 1s\n\n\
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

pub struct Lb {
    pub addr: SocketAddr,
    stats: PathBuf,
    _proc: Logged,
}

impl Lb {
    pub async fn start(pki: &Pki, haproxy: &Path, port: u16, admins: [SocketAddr; 2]) -> Self {
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let stats = pki.path("haproxy.sock");
        let cfg = pki.write("haproxy.cfg", &haproxy_config(addr, port, admins, &stats));
        let stdout = std::fs::File::create(pki.path("haproxy.log")).expect("log file");
        let child = Command::new(haproxy)
            .arg("-f")
            .arg(&cfg)
            .arg("-db")
            .stdin(std::process::Stdio::null())
            .stdout(stdout.try_clone().expect("log file"))
            .stderr(stdout)
            .spawn()
            .expect("spawn haproxy");
        let lb = Self {
            addr,
            stats,
            _proc: Logged {
                guard: ChildGuard { child },
                stdout: pki.path("haproxy.log"),
                stderr: pki.path("haproxy.log"),
            },
        };
        for server in LB_SERVERS {
            let up = lb.wait_state(server, "UP", SETUP_LIMIT).await;
            assert!(
                up.is_some(),
                "HAProxy does not see {server} up: {}",
                lb._proc.tail(20)
            );
        }
        lb
    }

    /// Sends one command to the stats socket; returns the answer.
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

    /// HAProxy's status of `server` (`UP`, `DOWN`, `DRAIN`, ...).
    pub async fn state(&self, server: &str) -> Option<String> {
        let text = self.command("show stat").await?;
        let mut lines = text.lines();
        let cols: Vec<&str> = lines.next()?.strip_prefix("# ")?.split(',').collect();
        let sv = cols.iter().position(|c| *c == "svname")?;
        let st = cols.iter().position(|c| *c == "status")?;
        lines
            .map(|l| l.split(',').collect::<Vec<_>>())
            .find(|f| f.len() > sv.max(st) && f[sv] == server)
            .map(|f| f[st].to_owned())
    }

    pub async fn wait_state(&self, server: &str, state: &str, limit: Duration) -> Option<Duration> {
        wait_for(limit, || async {
            self.state(server).await.as_deref() == Some(state)
        })
        .await
    }
}
