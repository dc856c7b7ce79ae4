//! Test harness: a development PKI in a temporary directory, DMZ nodes and agents started
//! in-process or as real processes from generated config files, and small targets; next to it,
//! admin endpoint clients ([`admin`]), processes with their logs ([`process`]), `/proc` readers
//! ([`procfs`]), a seeded byte pattern ([`pattern`]), the PKI's PEM files ([`pem`]),
//! HAProxy in front of two DMZ nodes ([`haproxy`]) and a shaped link between two network
//! namespaces ([`netns`]).
#![forbid(unsafe_code)]

pub mod admin;
pub mod haproxy;
pub mod netns;
pub mod pattern;
pub mod pem;
pub mod process;
pub mod procfs;
pub mod targets;
pub mod tools;

pub use admin::{http_get, http_post, metric, metrics_text, readyz};

use std::hash::{BuildHasher, RandomState};
use std::net::{Ipv4Addr, SocketAddr, TcpListener as StdListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tempfile::TempDir;
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// A development PKI (CA, DMZ certificate for localhost/127.0.0.1, agents engine-1 and
/// engine-2) and a directory for config files, removed on drop.
pub struct Pki {
    dir: TempDir,
}

impl Pki {
    /// A fresh PKI with agents `engine-1` and `engine-2`.
    pub fn new() -> Self {
        Self::with_agents(&["engine-1", "engine-2"])
    }

    /// A fresh PKI with the given agent identities.
    pub fn with_agents(agents: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let opts = relay_certs::DevOptions {
            out: dir.path().to_owned(),
            agents: agents.iter().map(|a| a.to_string()).collect(),
            ..Default::default()
        };
        relay_certs::write_dev_pki(&opts).expect("dev PKI");
        Self { dir }
    }

    /// The directory holding the PEM files and configs.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Path of a file in the PKI directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Writes `text` to `name` in the PKI directory and returns its path.
    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.path(name);
        std::fs::write(&path, text).expect("write file");
        path
    }
}

impl Default for Pki {
    fn default() -> Self {
        Self::new()
    }
}

/// A TCP port on 127.0.0.1 that is free now and that nothing else will take before the
/// caller binds it: see [`free_block`].
pub fn free_port() -> u16 {
    free_block(1, &[Ipv4Addr::LOCALHOST])
}

/// The first of `n` consecutive TCP ports that are free now on each of `ips`.
///
/// Ports a test writes into a config (a DMZ's tunnel and admin addresses, the public port an
/// agent declares) stay unbound for a while, and a public listener closes and reopens with its
/// agent. They therefore come from outside `net.ipv4.ip_local_port_range`, where the kernel
/// never picks a port on its own: no outgoing connection of a parallel test can take one as its
/// source port meanwhile (a port from `bind(0)` could be, and then the DMZ could not bind it).
/// Each port is handed out once per test process; the starting point is random, so that test
/// processes running at the same time start far apart.
pub fn free_block(n: u16, ips: &[Ipv4Addr]) -> u16 {
    static NEXT: Mutex<Option<u16>> = Mutex::new(None);
    let (from, to) = unassigned_ports();
    assert!(to > from + n, "no room for {n} ports in {from}..{to}");
    let mut next = NEXT.lock().unwrap_or_else(|e| e.into_inner());
    let cursor = next.get_or_insert_with(|| {
        from + (RandomState::new().hash_one(std::process::id()) % u64::from(to - from)) as u16
    });
    for _ in 0..(to - from) / n {
        if *cursor > to - n {
            *cursor = from;
        }
        let base = *cursor;
        *cursor += n;
        let free = (base..base + n)
            .all(|port| ips.iter().all(|ip| StdListener::bind((*ip, port)).is_ok()));
        if free {
            return base;
        }
    }
    panic!("no block of {n} free ports in {from}..{to}");
}

/// The larger stretch of ports (from 10000) outside the kernel's ephemeral range.
fn unassigned_ports() -> (u16, u16) {
    let (lo, hi) = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| {
            let mut it = s.split_whitespace().map(|v| v.parse::<u16>().ok());
            Some((it.next()??, it.next()??))
        })
        .unwrap_or((32768, 60999));
    let below = lo.saturating_sub(10_000);
    let above = 65_535 - hi;
    if below >= above {
        (10_000, lo)
    } else {
        (hi + 1, 65_535)
    }
}

/// Settings of a DMZ node config.
#[derive(Clone, Debug)]
pub struct DmzOptions {
    /// `tunnel.listen`.
    pub tunnel: SocketAddr,
    /// `admin.listen`.
    pub admin: SocketAddr,
    /// `tunnel.keepalive`.
    pub keepalive: &'static str,
    /// `tunnel.agents`, if any.
    pub agents: Option<Vec<String>>,
    /// `public.bind`, if any.
    pub public_bind: Option<String>,
    /// `policy.listen_allow`.
    pub listen_allow: Vec<String>,
    /// `policy.connect_allow`.
    pub connect_allow: Vec<String>,
    /// `policy.trusted_proxies`.
    pub trusted_proxies: Vec<String>,
    /// `policy.default`, if set.
    pub policy_default: Option<&'static str>,
    /// `[policy.agents."ID"]` tables: identity, `listen_allow`, `connect_allow`.
    pub agent_rules: Vec<AgentRules>,
    /// Extra TOML appended under `[limits]`.
    pub limits: String,
    /// Extra TOML under `[admin]` (`token_file`, `metrics_open`).
    pub admin_extra: String,
}

/// One `[policy.agents."ID"]` table of a DMZ config.
#[derive(Clone, Debug, Default)]
pub struct AgentRules {
    /// The identity.
    pub agent: String,
    /// `listen_allow`.
    pub listen_allow: Vec<String>,
    /// `connect_allow`.
    pub connect_allow: Vec<String>,
}

impl Default for DmzOptions {
    fn default() -> Self {
        Self {
            tunnel: SocketAddr::from(([127, 0, 0, 1], free_port())),
            admin: SocketAddr::from(([127, 0, 0, 1], free_port())),
            keepalive: "1s",
            agents: None,
            public_bind: None,
            listen_allow: vec!["127.0.0.0/8:1024-65535".into()],
            connect_allow: Vec::new(),
            trusted_proxies: Vec::new(),
            policy_default: None,
            agent_rules: Vec::new(),
            limits: String::new(),
            admin_extra: String::new(),
        }
    }
}

impl DmzOptions {
    /// The TOML config text, using the PKI's files.
    pub fn toml(&self, pki: &Pki) -> String {
        let mut s = format!(
            "[tunnel]\nlisten = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\nca = \"{}\"\nkeepalive = \"{}\"\n",
            self.tunnel,
            pki.path("dmz.pem").display(),
            pki.path("dmz-key.pem").display(),
            pki.path("ca.pem").display(),
            self.keepalive
        );
        if let Some(agents) = &self.agents {
            s += &format!("agents = {agents:?}\n");
        }
        s += &format!(
            "\n[admin]\nlisten = \"{}\"\n{}",
            self.admin, self.admin_extra
        );
        if let Some(bind) = &self.public_bind {
            s += &format!("\n[public]\nbind = \"{bind}\"\n");
        }
        s += &format!(
            "\n[policy]\nlisten_allow = {:?}\nconnect_allow = {:?}\ntrusted_proxies = {:?}\n",
            self.listen_allow, self.connect_allow, self.trusted_proxies
        );
        if let Some(default) = self.policy_default {
            s += &format!("default = {default:?}\n");
        }
        for r in &self.agent_rules {
            s += &format!(
                "\n[policy.agents.{:?}]\nlisten_allow = {:?}\nconnect_allow = {:?}\n",
                r.agent, r.listen_allow, r.connect_allow
            );
        }
        s += &format!("\n[limits]\n{}\n", self.limits);
        s
    }
}

/// One `[[inbound]]` service of an agent config.
#[derive(Clone, Debug)]
pub struct Service {
    /// Name.
    pub name: String,
    /// Public listen address.
    pub listen: String,
    /// Target address; written as a TOML value as it is when it starts with `[` (a list).
    pub target: String,
    /// Extra TOML lines for the service.
    pub extra: String,
}

impl Service {
    /// A service `name` published on 127.0.0.1:`port`, relayed to `target`.
    pub fn new(name: &str, port: u16, target: SocketAddr) -> Self {
        Self {
            name: name.into(),
            listen: format!("127.0.0.1:{port}"),
            target: target.to_string(),
            extra: String::new(),
        }
    }

    /// A service `name` published on 127.0.0.1:`port`, relayed to the list `targets`.
    pub fn targets(name: &str, port: u16, targets: &[SocketAddr]) -> Self {
        let list: Vec<String> = targets.iter().map(|t| t.to_string()).collect();
        Self {
            target: format!("{list:?}"),
            ..Self::new(name, port, targets[0])
        }
    }
}

/// Settings of an agent config.
#[derive(Clone, Debug)]
pub struct AgentOptions {
    /// Agent identity: its certificate files are `NAME.pem` and `NAME-key.pem`.
    pub identity: String,
    /// DMZ tunnel addresses.
    pub dmz: Vec<SocketAddr>,
    /// `admin.listen`.
    pub admin: SocketAddr,
    /// `connections`.
    pub connections: usize,
    /// `keepalive`.
    pub keepalive: &'static str,
    /// `[[inbound]]` services.
    pub services: Vec<Service>,
    /// Extra TOML under `[limits]`.
    pub limits: String,
    /// Extra TOML tables appended at the end (`[[outbound]]`, `[outbound_proxy]`).
    pub extra: String,
    /// Extra TOML under `[admin]` (`token_file`, `metrics_open`).
    pub admin_extra: String,
}

impl AgentOptions {
    /// An agent `engine-1` dialing `dmz` with the given services.
    pub fn new(dmz: SocketAddr, services: Vec<Service>) -> Self {
        Self {
            identity: "engine-1".into(),
            dmz: vec![dmz],
            admin: SocketAddr::from(([127, 0, 0, 1], free_port())),
            connections: 2,
            keepalive: "1s",
            services,
            limits: String::new(),
            extra: String::new(),
            admin_extra: String::new(),
        }
    }

    /// The TOML config text, using the PKI's files.
    pub fn toml(&self, pki: &Pki) -> String {
        let dmz: Vec<String> = self.dmz.iter().map(|a| a.to_string()).collect();
        let mut s = format!(
            "dmz = {dmz:?}\nserver_name = \"localhost\"\nconnections = {}\nkeepalive = \"{}\"\n\n[tls]\ncert = \"{}\"\nkey = \"{}\"\nca = \"{}\"\n\n[admin]\nlisten = \"{}\"\n{}\n[limits]\n{}\n",
            self.connections,
            self.keepalive,
            pki.path(&format!("{}.pem", self.identity)).display(),
            pki.path(&format!("{}-key.pem", self.identity)).display(),
            pki.path("ca.pem").display(),
            self.admin,
            self.admin_extra,
            self.limits,
        );
        for svc in &self.services {
            let target = if svc.target.starts_with('[') {
                svc.target.clone()
            } else {
                format!("\"{}\"", svc.target)
            };
            s += &format!(
                "\n[[inbound]]\nname = \"{}\"\nlisten = \"{}\"\ntarget = {target}\n{}\n",
                svc.name, svc.listen, svc.extra
            );
        }
        s += &self.extra;
        s
    }
}

/// A component running in-process; stopped (shutdown token) on drop.
pub struct InProcess {
    shutdown: CancellationToken,
    task: Option<JoinHandle<std::io::Result<()>>>,
}

impl InProcess {
    /// Cancels the shutdown token and waits for `run` to return.
    pub async fn stop(mut self) -> std::io::Result<()> {
        self.shutdown.cancel();
        match self.task.take() {
            Some(task) => task.await.expect("run task panicked"),
            None => Ok(()),
        }
    }

    /// The shutdown token.
    pub fn token(&self) -> CancellationToken {
        self.shutdown.clone()
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// Runs an in-process component and prints the error it stops with, if any: a component that
/// fails at start (a port taken) would otherwise show only as a later wait timing out.
async fn reported(
    what: &'static str,
    addr: SocketAddr,
    run: impl std::future::Future<Output = std::io::Result<()>>,
) -> std::io::Result<()> {
    let result = run.await;
    if let Err(e) = &result {
        eprintln!("in-process {what} ({addr}) stopped with an error: {e}");
    }
    result
}

/// Starts a DMZ node in-process from `opts`.
pub async fn start_dmz(pki: &Pki, opts: &DmzOptions) -> InProcess {
    let path = pki.write(&format!("dmz-{}.toml", opts.tunnel.port()), &opts.toml(pki));
    let config = relay_dmz::DmzConfig::load(&path).unwrap_or_else(|e| panic!("DMZ config: {e}"));
    let listeners = relay_dmz::Listeners::bind(&config)
        .await
        .expect("bind DMZ listeners");
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(reported(
        "DMZ node",
        opts.tunnel,
        relay_dmz::run(config, listeners, shutdown.clone()),
    ));
    InProcess {
        shutdown,
        task: Some(task),
    }
}

/// Starts an agent in-process from `opts`.
pub async fn start_agent(pki: &Pki, opts: &AgentOptions) -> InProcess {
    let path = pki.write(
        &format!("agent-{}.toml", opts.admin.port()),
        &opts.toml(pki),
    );
    let config =
        relay_internal::AgentConfig::load(&path).unwrap_or_else(|e| panic!("agent config: {e}"));
    // An agent started again on the same admin address (a test's restart cycles) may find the
    // previous one's listener not yet closed by the kernel: a second, not a test failure.
    let started = Instant::now();
    let admin = loop {
        match tokio::net::TcpListener::bind(opts.admin).await {
            Ok(listener) => break listener,
            Err(e)
                if e.kind() == std::io::ErrorKind::AddrInUse
                    && started.elapsed() < Duration::from_secs(2) =>
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("bind agent admin {}: {e}", opts.admin),
        }
    };
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(reported(
        "agent",
        opts.admin,
        relay_internal::run(config, Some(admin), shutdown.clone()),
    ));
    InProcess {
        shutdown,
        task: Some(task),
    }
}

/// Path of a workspace binary (`relay-dmz`, `relay-internal`, `relay-certs`), built by
/// `cargo test --workspace` next to the test executables.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} not found: run the suite with `cargo test --workspace` (or `cargo build --workspace` first)",
        path.display()
    );
    path
}

/// A child process killed (SIGKILL) and reaped on drop.
pub struct ChildGuard {
    /// The child.
    pub child: Child,
}

impl ChildGuard {
    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `signal` to the process; panics if it cannot be sent.
    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.pid()).expect("pid fits in i32"));
        nix::sys::signal::kill(pid, signal)
            .unwrap_or_else(|e| panic!("send {signal} to process {pid}: {e}"));
    }

    /// Waits up to `limit` for the process to exit; its status and the time waited.
    pub async fn wait_exit(&mut self, limit: Duration) -> Option<(ExitStatus, Duration)> {
        let start = Instant::now();
        while start.elapsed() < limit {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return Some((status, start.elapsed()));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        None
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts a binary with `--config PATH`, logs to this test's stderr.
pub fn spawn_bin(name: &str, config: &Path) -> ChildGuard {
    spawn_command(Command::new(bin(name)).arg("--config").arg(config))
}

/// Starts a prepared command with stdin closed.
pub fn spawn_command(cmd: &mut Command) -> ChildGuard {
    let child = cmd
        .stdin(Stdio::null())
        .env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
        )
        .spawn()
        .expect("spawn binary");
    ChildGuard { child }
}

/// Starts an agent as a process from `opts`.
pub fn spawn_agent(pki: &Pki, opts: &AgentOptions) -> ChildGuard {
    let path = pki.write(
        &format!("agent-{}.toml", opts.admin.port()),
        &opts.toml(pki),
    );
    spawn_bin("relay-internal", &path)
}

/// Starts a DMZ node as a process from `opts`.
pub fn spawn_dmz(pki: &Pki, opts: &DmzOptions) -> ChildGuard {
    let path = pki.write(&format!("dmz-{}.toml", opts.tunnel.port()), &opts.toml(pki));
    spawn_bin("relay-dmz", &path)
}

/// Whether a TCP connect to `addr` succeeds now.
pub async fn accepts(addr: SocketAddr) -> bool {
    matches!(
        tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(addr)).await,
        Ok(Ok(_))
    )
}

/// Polls `check` every 20 ms until it holds; returns the time it took, or `None` after `limit`.
pub async fn wait_for<F, Fut>(limit: Duration, mut check: F) -> Option<Duration>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while start.elapsed() < limit {
        if check().await {
            return Some(start.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}

/// Waits until `addr` accepts connections, or panics after `limit`.
pub async fn wait_open(addr: SocketAddr, limit: Duration) -> Duration {
    wait_for(limit, || accepts(addr))
        .await
        .unwrap_or_else(|| panic!("{addr} did not open within {limit:?}"))
}

/// Waits until `addr` refuses connections, or panics after `limit`.
pub async fn wait_closed(addr: SocketAddr, limit: Duration) -> Duration {
    wait_for(limit, || async move { !accepts(addr).await })
        .await
        .unwrap_or_else(|| panic!("{addr} still accepts after {limit:?}"))
}

/// Asserts that `addr` refuses every connection for `period` (polled every 100 ms).
pub async fn assert_stays_closed(addr: SocketAddr, period: Duration, what: &str) {
    let start = Instant::now();
    while start.elapsed() < period {
        assert!(
            !accepts(addr).await,
            "{what}: {addr} opened after {:?}",
            start.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
