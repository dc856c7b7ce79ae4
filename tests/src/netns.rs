//! Two network namespaces joined by a veth pair whose both ends are shaped with `tc ... tbf`:
//! a slow link between a DMZ node and an agent. Needs root, `ip` and `tc`; [`available`] says
//! whether a test can run here (and fails loudly under `CI=true` when it cannot).
//!
//! The namespaces and everything in them (the veth pair, its private /30) exist only for the
//! test and are deleted on drop, also when the test panics. Sockets are made inside a namespace
//! by a short-lived thread that joins it ([`Netns::socket`]); processes run in it through
//! `ip netns exec` ([`Netns::command`]).

use std::net::{Ipv4Addr, SocketAddr};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use tokio::net::{TcpListener, TcpSocket, TcpStream};

/// DMZ end of the link (inside the test's own namespaces only).
pub const DMZ_IP: Ipv4Addr = Ipv4Addr::new(10, 224, 24, 1);
/// Agent end of the link.
pub const AGENT_IP: Ipv4Addr = Ipv4Addr::new(10, 224, 24, 2);
/// Interface names, each inside its own namespace.
const DMZ_DEV: &str = "vdmz";
const AGENT_DEV: &str = "vagent";

/// Whether namespaces and `tc` can be used: root, and `ip` and `tc` present. When not, prints
/// why the test `name` is skipped and returns false; under `CI=true` it panics instead, so a
/// CI run never passes by skipping.
pub fn available(name: &str) -> bool {
    let problem = if !nix::unistd::geteuid().is_root() {
        Some("not root".to_owned())
    } else if !runs(Command::new("ip").arg("-V")) {
        Some("`ip` (iproute2) not found".to_owned())
    } else if !runs(Command::new("tc").arg("-V")) {
        Some("`tc` (iproute2) not found".to_owned())
    } else {
        None
    };
    match problem {
        None => true,
        Some(why) if std::env::var("CI").is_ok_and(|v| v == "true") => {
            panic!(
                "{name}: needs network namespaces and tc (root, iproute2): {why}; CI=true does not skip"
            )
        }
        Some(why) => {
            eprintln!("SKIPPED {name}: needs network namespaces and tc (root, iproute2): {why}");
            false
        }
    }
}

fn runs(cmd: &mut Command) -> bool {
    cmd.output().is_ok_and(|o| o.status.success())
}

/// Runs `ip ARGS`, panicking with its stderr when it fails.
fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("ip {}: {e}", args.join(" ")));
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A network namespace, deleted on drop.
pub struct Netns {
    name: String,
}

impl Netns {
    fn new(name: String) -> Self {
        ip(&["netns", "add", &name]);
        let ns = Self { name };
        ip(&["-n", &ns.name, "link", "set", "lo", "up"]);
        ns
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `PROGRAM` to be run inside the namespace (`ip netns exec NAME PROGRAM`).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).arg(program);
        cmd
    }

    /// A TCP socket that belongs to this namespace.
    pub fn socket(&self) -> TcpSocket {
        let path = format!("/var/run/netns/{}", self.name);
        let made = std::thread::spawn(move || {
            // This thread joins the namespace and ends: no other code runs in it.
            let ns = std::fs::File::open(&path)?;
            nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(std::io::Error::from)?;
            let socket = socket2::Socket::new(
                socket2::Domain::IPV4,
                socket2::Type::STREAM,
                Some(socket2::Protocol::TCP),
            )?;
            socket.set_nonblocking(true)?;
            Ok::<_, std::io::Error>(std::net::TcpStream::from(socket))
        })
        .join()
        .expect("namespace thread");
        let std = made.unwrap_or_else(|e| panic!("socket in namespace {}: {e}", self.name));
        TcpSocket::from_std_stream(std)
    }

    /// Connects to `addr` from inside the namespace.
    pub async fn connect(&self, addr: SocketAddr) -> std::io::Result<TcpStream> {
        let socket = self.socket();
        socket.set_nodelay(true)?;
        socket.connect(addr).await
    }

    /// A listener on 127.0.0.1 (a free port) inside the namespace.
    pub fn listen_local(&self) -> TcpListener {
        let socket = self.socket();
        socket
            .bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
            .expect("bind in namespace");
        socket.listen(1024).expect("listen in namespace")
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting the namespace also deletes the veth end inside it (and so the pair).
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// A DMZ namespace and an agent namespace joined by a veth pair shaped to `rate` in both
/// directions (`tbf`, queue bounded by `latency`).
pub struct ShapedLink {
    /// Where the DMZ node runs (and its partners connect from).
    pub dmz: Netns,
    /// Where the agent and its targets run.
    pub agent: Netns,
}

impl ShapedLink {
    /// Creates the namespaces `r24-PID-N-dmz` and `r24-PID-N-agent` and the link between them.
    pub fn new(rate: &str, latency: &str) -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let base = format!("relay-{}-{n}", std::process::id());
        let dmz = Netns::new(format!("{base}-dmz"));
        let agent = Netns::new(format!("{base}-agent"));
        // Made inside the DMZ namespace with its peer moved to the agent's: nothing appears in
        // the host's namespace, even for a moment.
        ip(&[
            "-n",
            dmz.name(),
            "link",
            "add",
            DMZ_DEV,
            "type",
            "veth",
            "peer",
            "name",
            AGENT_DEV,
            "netns",
            agent.name(),
        ]);
        for (ns, dev, addr) in [(&dmz, DMZ_DEV, DMZ_IP), (&agent, AGENT_DEV, AGENT_IP)] {
            ip(&[
                "-n",
                ns.name(),
                "addr",
                "add",
                &format!("{addr}/30"),
                "dev",
                dev,
            ]);
            ip(&["-n", ns.name(), "link", "set", dev, "up"]);
        }
        let link = Self { dmz, agent };
        link.shape(rate, latency);
        link
    }

    /// Sets both directions to `rate` with a queue of at most `latency`.
    pub fn shape(&self, rate: &str, latency: &str) {
        for (ns, dev) in [(&self.dmz, DMZ_DEV), (&self.agent, AGENT_DEV)] {
            let out = ns
                .command("tc")
                .args(["qdisc", "replace", "dev", dev, "root", "tbf", "rate", rate])
                .args(["burst", "16kb", "latency", latency])
                .output()
                .expect("run tc");
            assert!(
                out.status.success(),
                "tc qdisc replace dev {dev} root tbf rate {rate}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }

    /// Bytes the DMZ's end sent through its qdisc so far (from `tc -s qdisc`): what crossed the
    /// link toward the agent. [`ShapedLink::agent_sent`] is the other direction.
    pub fn dmz_sent(&self) -> u64 {
        qdisc_sent(&self.dmz, DMZ_DEV)
    }

    /// Bytes the agent's end sent through its qdisc so far.
    pub fn agent_sent(&self) -> u64 {
        qdisc_sent(&self.agent, AGENT_DEV)
    }

    /// Takes the agent's end of the link down: from now on nothing crosses, in either
    /// direction, and neither side is told (no RST, no FIN).
    pub fn cut(&self) {
        ip(&["-n", self.agent.name(), "link", "set", AGENT_DEV, "down"]);
    }
}

fn qdisc_sent(ns: &Netns, dev: &str) -> u64 {
    let out = ns
        .command("tc")
        .args(["-s", "qdisc", "show", "dev", dev])
        .output()
        .expect("run tc -s");
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace()
        .skip_while(|w| *w != "Sent")
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no `Sent N bytes` in tc -s qdisc show dev {dev}: {text}"))
}
