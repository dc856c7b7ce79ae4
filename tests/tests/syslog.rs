//! The agent's audit records sent to a real syslog collector, Debian's rsyslogd run as a child
//! process, as RFC 5424 over TCP and over TLS (`[audit] syslog`): every session arrives once
//! with its fields, and so does a partner the DMZ refused. Then the collector down, slow and
//! restarted: sessions go on at their pace, records beyond the queue are dropped and counted in
//! `relay_audit_dropped_total`, and records flow again once the collector is back.
//!
//! Needs `cargo build --workspace --bins` first (the relay binaries run from target/debug), and
//! rsyslog with rsyslog-gnutls (skipped without them, except under CI). The tests of this file
//! run one at a time: one measures how long sessions take.

#[path = "syslog/collector.rs"]
mod collector;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use collector::{Received, Rsyslog, rsyslogd_or_skip};
use relay_e2e::process::Logged;
use relay_e2e::*;
use relay_tunnel::metrics as m;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Bound on processes starting and tunnels registering on a loaded machine.
const SETUP_LIMIT: Duration = Duration::from_secs(20);
/// Bound on one echo session.
const EXCHANGE_LIMIT: Duration = Duration::from_secs(10);
/// Bound on records reaching a collector that is up: the agent reconnects within 5 s (its
/// backoff's cap), plus rsyslog writing its file, on a loaded machine.
const DELIVERY_LIMIT: Duration = Duration::from_secs(15);
/// The loopback address partners connect from (refused by the guarded service's allow list).
const PARTNER_IP: [u8; 4] = [127, 0, 0, 9];

/// A DMZ node and an agent serving `echo` (open) and `guarded` (allow list without
/// [`PARTNER_IP`]), the agent sending its audit records as `audit` (TOML under `[audit]`).
struct Relay {
    _dmz: Logged,
    agent: Logged,
    dmz_tunnel: SocketAddr,
    admin: SocketAddr,
    echo_port: u16,
    guarded_port: u16,
    _echo: targets::Target,
}

impl Relay {
    async fn start(pki: &Pki, audit: &str) -> Self {
        let echo = targets::echo().await;
        let dmz_opts = DmzOptions::default();
        let dmz_path = pki.write("dmz.toml", &dmz_opts.toml(pki));
        let dmz = Logged::spawn(pki, "relay-dmz", &dmz_path, &[], "dmz");
        let (echo_port, guarded_port) = (free_port(), free_port());
        let mut guarded = Service::new("guarded", guarded_port, echo.addr);
        guarded.extra = "allow = [\"127.0.0.1/32\"]".into();
        let mut opts = AgentOptions::new(
            dmz_opts.tunnel,
            vec![Service::new("echo", echo_port, echo.addr), guarded],
        );
        opts.extra = format!("\n[audit]\n{audit}\n");
        let agent_path = pki.write("agent.toml", &opts.toml(pki));
        let agent = Logged::spawn(pki, "relay-internal", &agent_path, &[], "agent");
        let relay = Self {
            _dmz: dmz,
            agent,
            dmz_tunnel: dmz_opts.tunnel,
            admin: opts.admin,
            echo_port,
            guarded_port,
            _echo: echo,
        };
        // Not probed by a connect: that would be a session, with its audit record.
        let dmz_admin = dmz_opts.admin;
        let up = wait_for(SETUP_LIMIT, || async move {
            let text = metrics_text(dmz_admin).await;
            metric(&text, m::LISTENER_OPEN, &["service=\"echo\""]) == Some(1.0)
                && metric(&text, m::LISTENER_OPEN, &["service=\"guarded\""]) == Some(1.0)
        })
        .await;
        assert!(up.is_some(), "relay not up\n{}", relay.agent.tail(30));
        relay
    }

    /// One echo session of `len` bytes from [`PARTNER_IP`]; returns the partner address.
    async fn echo(&self, len: usize) -> SocketAddr {
        let public = SocketAddr::from(([127, 0, 0, 1], self.echo_port));
        let mut stream = connect_from(PARTNER_IP, public).await;
        let partner = stream.local_addr().expect("local addr");
        let data: Vec<u8> = (0..len).map(|i| (i * 7 + len) as u8).collect();
        let (mut r, mut w) = stream.split();
        let write = async {
            w.write_all(&data).await?;
            w.shutdown().await
        };
        let mut back = Vec::with_capacity(len);
        let (wrote, read) = tokio::time::timeout(EXCHANGE_LIMIT, async {
            tokio::join!(write, r.read_to_end(&mut back))
        })
        .await
        .unwrap_or_else(|_| panic!("echo session through {public} timed out"));
        wrote.expect("send to the relay");
        read.expect("read from the relay");
        assert!(
            back == data,
            "echoed bytes differ ({} of {len})",
            back.len()
        );
        partner
    }

    /// A partner the DMZ closes at once (outside `guarded`'s allow list); returns its address.
    async fn refused(&self) -> SocketAddr {
        let public = SocketAddr::from(([127, 0, 0, 1], self.guarded_port));
        let mut stream = connect_from(PARTNER_IP, public).await;
        let partner = stream.local_addr().expect("local addr");
        let mut got = Vec::new();
        tokio::time::timeout(EXCHANGE_LIMIT, stream.read_to_end(&mut got))
            .await
            .expect("the DMZ closes a refused partner")
            .ok();
        assert!(got.is_empty(), "a refused partner received bytes");
        partner
    }

    /// A metric of the agent; 0 when absent, NaN when the endpoint does not answer.
    async fn metric(&self, name: &str) -> f64 {
        let text = metrics_text(self.admin).await;
        if text.is_empty() {
            return f64::NAN;
        }
        metric(&text, name, &[]).unwrap_or(0.0)
    }

    async fn wait_metric(&self, name: &str, want: f64, what: &str) -> Duration {
        match wait_for(DELIVERY_LIMIT, || async { self.metric(name).await == want }).await {
            Some(t) => t,
            None => panic!(
                "{what}: {name} is {}, expected {want}\n{}",
                self.metric(name).await,
                self.agent.tail(20)
            ),
        }
    }
}

async fn connect_from(source: [u8; 4], addr: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().expect("socket");
    socket
        .bind(SocketAddr::from((source, 0)))
        .expect("bind the partner address");
    tokio::time::timeout(EXCHANGE_LIMIT, socket.connect(addr))
        .await
        .unwrap_or_else(|_| panic!("connect to {addr} timed out"))
        .unwrap_or_else(|e| panic!("connect to {addr}: {e}"))
}

/// This host's name as the agent puts it in HOSTNAME.
fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .unwrap_or_default()
        .trim()
        .to_owned()
}

/// The records of `received` whose `partner` field is `partner`.
fn of_partner<'a>(received: &'a [Received], partner: &SocketAddr) -> Vec<&'a Received> {
    let partner = partner.to_string();
    received
        .iter()
        .filter(|r| r.fields.get("partner").and_then(|v| v.as_str()) == Some(&partner))
        .collect()
}

/// N sessions and a refusal through the relay; each appears once at the collector with its
/// fields, as rsyslog parsed them.
async fn records_reach_the_collector(test: &str, tls: bool) {
    let _serial = SERIAL.lock().await;
    let Some(rsyslogd) = rsyslogd_or_skip(test) else {
        return;
    };
    let pki = Pki::new();
    let port = free_port();
    let rsyslog = Rsyslog::start(&rsyslogd, &pki, "rsyslog", port, tls).await;
    let audit = if tls {
        format!(
            "syslog = \"tls://127.0.0.1:{port}\"\nca = \"{}\"",
            pki.path("ca.pem").display()
        )
    } else {
        format!("syslog = \"tcp://127.0.0.1:{port}\"")
    };
    let relay = Relay::start(&pki, &audit).await;
    relay
        .wait_metric(m::AUDIT_CONNECTED, 1.0, "the agent connects to rsyslog")
        .await;

    const N: usize = 20;
    let started = Instant::now();
    let mut sessions = Vec::new();
    for i in 0..N {
        let len = 1 + i * 997;
        sessions.push((relay.echo(len).await, len));
    }
    let refused = relay.refused().await;
    let (_, took) = rsyslog.wait_received(N + 1, DELIVERY_LIMIT).await;
    // Late duplicates would show up here.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let received = rsyslog.received();
    println!(
        "{test}: {N} sessions and a refusal in {:?}; rsyslog had all {} records {took:?} after the last",
        started.elapsed(),
        received.len()
    );
    assert_eq!(
        received.len(),
        N + 1,
        "records: {:#?}\n{}",
        received.iter().map(|r| &r.raw).collect::<Vec<_>>(),
        rsyslog.tail()
    );

    let pid = relay.agent.guard.pid().to_string();
    let host = hostname();
    let node = relay.dmz_tunnel.to_string();
    let mut ids = HashSet::new();
    let mut sequences = HashSet::new();
    for r in &received {
        assert_eq!(r.app, "relay-internal", "{}", r.raw);
        assert_eq!(r.procid, pid, "{}", r.raw);
        assert_eq!(r.facility, "local0", "{}", r.raw);
        assert_eq!(r.hostname, host, "{}", r.raw);
        assert!(r.time.ends_with('Z') && r.time.len() >= 20, "{}", r.raw);
        assert_eq!(r.field("direction"), "inbound", "{}", r.raw);
        assert_eq!(r.field("dmz"), node, "{}", r.raw);
        assert!(
            ids.insert(r.field("session").to_owned()),
            "session id twice: {}",
            r.raw
        );
        assert!(sequences.insert(r.sequence), "sequenceId twice: {}", r.raw);
    }
    for (partner, len) in &sessions {
        let mine = of_partner(&received, partner);
        assert_eq!(mine.len(), 1, "records of partner {partner}: {mine:#?}");
        let r = mine[0];
        assert_eq!(r.msgid, "session", "{}", r.raw);
        assert_eq!(r.severity, "info", "{}", r.raw);
        assert_eq!(r.field("service"), "echo", "{}", r.raw);
        assert_eq!(r.field("outcome"), "ok", "{}", r.raw);
        assert_eq!(
            r.field("bytes_partner_to_target"),
            len.to_string(),
            "{}",
            r.raw
        );
        assert_eq!(
            r.field("bytes_target_to_partner"),
            len.to_string(),
            "{}",
            r.raw
        );
        assert!(r.field("duration_ms").parse::<u64>().is_ok(), "{}", r.raw);
        assert!(
            r.msg.starts_with("session session=") && r.msg.contains(" outcome=ok"),
            "{}",
            r.raw
        );
    }
    let mine = of_partner(&received, &refused);
    assert_eq!(mine.len(), 1, "records of the refused partner: {mine:#?}");
    let r = mine[0];
    assert_eq!(r.msgid, "refused", "{}", r.raw);
    assert_eq!(r.severity, "notice", "{}", r.raw);
    assert_eq!(r.field("service"), "guarded", "{}", r.raw);
    assert_eq!(r.field("outcome"), "source_denied", "{}", r.raw);
    assert_eq!(r.field("bytes_partner_to_target"), "0", "{}", r.raw);
    assert!(r.field("at_ms").parse::<u64>().is_ok(), "{}", r.raw);
    println!(
        "{test}: a session's record as rsyslog received it: {}",
        of_partner(&received, &sessions[3].0)[0].raw
    );
    println!(
        "{test}: the refusal's record as rsyslog received it: {}",
        r.raw
    );

    assert_eq!(relay.metric(m::AUDIT_SENT).await, (N + 1) as f64);
    assert_eq!(relay.metric(m::AUDIT_DROPPED).await, 0.0);
    // The log on stderr keeps its audit records.
    let logged = relay
        .agent
        .stderr_text()
        .lines()
        .filter(|l| l.contains("relay::audit"))
        .count();
    assert_eq!(
        logged,
        N + 1,
        "audit lines on stderr\n{}",
        relay.agent.tail(30)
    );
    drop(rsyslog);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_reach_rsyslog_over_tcp() {
    records_reach_the_collector("records_reach_rsyslog_over_tcp", false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_reach_rsyslog_over_tls() {
    records_reach_the_collector("records_reach_rsyslog_over_tls", true).await;
}

/// Runs `n` echo sessions one after the other; returns the total and the longest.
async fn timed_sessions(relay: &Relay, n: usize) -> (Duration, Duration) {
    let start = Instant::now();
    let mut longest = Duration::ZERO;
    for i in 0..n {
        let t = Instant::now();
        relay.echo(100 + i).await;
        longest = longest.max(t.elapsed());
    }
    (start.elapsed(), longest)
}

/// A collector that accepts connections and never reads. A tiny receive buffer and segment
/// size keep what its connections take small (on loopback the writer's send buffer would
/// otherwise grow to megabytes before it stalls).
fn stalled_listener(port: u16) -> std::net::TcpListener {
    let socket =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    socket.set_reuse_address(true).expect("SO_REUSEADDR");
    socket.set_recv_buffer_size(1024).expect("SO_RCVBUF");
    socket.set_tcp_mss(536).expect("TCP_MAXSEG");
    socket
        .bind(&SocketAddr::from(([127, 0, 0, 1], port)).into())
        .expect("bind the stalled collector");
    socket.listen(16).expect("listen");
    socket.into()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn collector_down_slow_and_restarted() {
    const TEST: &str = "collector_down_slow_and_restarted";
    let _serial = SERIAL.lock().await;
    let Some(rsyslogd) = rsyslogd_or_skip(TEST) else {
        return;
    };
    let pki = Pki::new();
    let port = free_port();
    const QUEUE: usize = 5;
    let mut relay = Relay::start(
        &pki,
        &format!("syslog = \"tcp://127.0.0.1:{port}\"\nqueue = {QUEUE}"),
    )
    .await;

    // Down: nothing listens. Sessions pass; records beyond the queue are dropped, counted.
    const DOWN: usize = 50;
    let (total, longest) = timed_sessions(&relay, DOWN).await;
    println!(
        "{TEST}: collector down: {DOWN} sessions in {total:?} ({:?} each, longest {longest:?})",
        total / DOWN as u32
    );
    let dropped = relay.metric(m::AUDIT_DROPPED).await;
    assert_eq!(
        dropped,
        (DOWN - QUEUE) as f64,
        "dropped with the collector down (queue {QUEUE})\n{}",
        relay.agent.tail(20)
    );
    assert_eq!(relay.metric(m::AUDIT_SENT).await, 0.0);
    let full_lines = relay
        .agent
        .stderr_text()
        .lines()
        .filter(|l| l.contains("audit queue full"))
        .count();
    // One line per 10 s at most.
    assert!(
        (1..=1 + total.as_secs() / 10).contains(&(full_lines as u64)),
        "{full_lines} lines about the full queue in {total:?}\n{}",
        relay.agent.tail(20)
    );

    // Back: the queued records arrive (the first five sessions), then new ones.
    let rsyslog = Rsyslog::start(&rsyslogd, &pki, "rsyslog-1", port, false).await;
    let (received, back) = rsyslog.wait_received(QUEUE, DELIVERY_LIMIT).await;
    println!(
        "{TEST}: collector back: the {QUEUE} queued records arrived {back:?} after it listened"
    );
    let sequences: Vec<u64> = received.iter().map(|r| r.sequence).collect();
    assert_eq!(
        sequences,
        (1..=QUEUE as u64).collect::<Vec<_>>(),
        "the oldest records were kept"
    );
    for _ in 0..3 {
        relay.echo(10).await;
    }
    let (received, _) = rsyslog.wait_received(QUEUE + 3, DELIVERY_LIMIT).await;
    let last: Vec<u64> = received[QUEUE..].iter().map(|r| r.sequence).collect();
    let first_new = (DOWN + 1) as u64;
    assert_eq!(
        last,
        vec![first_new, first_new + 1, first_new + 2],
        "a gap in sequenceId shows the drops"
    );

    // Restarted: killed, sessions meanwhile (queued, not dropped), then a new rsyslogd.
    rsyslog.kill();
    relay
        .wait_metric(
            m::AUDIT_CONNECTED,
            0.0,
            "the agent notices the collector is gone",
        )
        .await;
    let partners = [
        relay.echo(10).await,
        relay.echo(20).await,
        relay.echo(30).await,
    ];
    let killed_at = Instant::now();
    let rsyslog = Rsyslog::start(&rsyslogd, &pki, "rsyslog-2", port, false).await;
    let listening = killed_at.elapsed();
    let (received, back) = rsyslog.wait_received(partners.len(), DELIVERY_LIMIT).await;
    println!(
        "{TEST}: collector restarted (listening {listening:?} after the sessions): the {} records of the sessions made while it was down arrived {back:?} after it listened",
        partners.len()
    );
    for p in &partners {
        assert_eq!(
            of_partner(&received, p).len(),
            1,
            "record of {p}: {received:#?}"
        );
    }
    assert_eq!(relay.metric(m::AUDIT_DROPPED).await, (DOWN - QUEUE) as f64);
    rsyslog.kill();

    // Slow: a collector that accepts and never reads. Sessions keep their pace; the agent
    // drops what does not fit and says so.
    let stalled = stalled_listener(port);
    relay
        .wait_metric(
            m::AUDIT_CONNECTED,
            1.0,
            "the agent connects to the stalled collector",
        )
        .await;
    let before = relay.metric(m::AUDIT_DROPPED).await;
    const SLOW: usize = 400;
    let (total, longest) = timed_sessions(&relay, SLOW).await;
    let dropped = relay.metric(m::AUDIT_DROPPED).await - before;
    let sent = relay.metric(m::AUDIT_SENT).await;
    println!(
        "{TEST}: collector stalled: {SLOW} sessions in {total:?} ({:?} each, longest {longest:?}); {dropped} records dropped, {sent} sent in all",
        total / SLOW as u32
    );
    assert!(
        total < Duration::from_secs(60) && longest < Duration::from_secs(2),
        "sessions slowed down by a stalled collector: {SLOW} in {total:?}, longest {longest:?}"
    );
    assert!(dropped > 0.0, "no record dropped with a stalled collector");

    // Shutdown with the collector stalled: the sender gets 2 s to flush, then the agent exits.
    relay.agent.guard.signal(nix::sys::signal::Signal::SIGTERM);
    let (status, took) = relay
        .agent
        .guard
        .wait_exit(SETUP_LIMIT)
        .await
        .unwrap_or_else(|| panic!("the agent did not exit\n{}", relay.agent.tail(20)));
    let unsent = relay
        .agent
        .stderr_text()
        .lines()
        .find(|l| l.contains("before the shutdown deadline"))
        .map(str::to_owned);
    println!("{TEST}: SIGTERM with the collector stalled: exit after {took:?}; {unsent:?}");
    assert!(status.success(), "agent exit status {status}");
    assert!(
        took < Duration::from_secs(8),
        "the agent took {took:?} to exit with a stalled collector"
    );
    drop(stalled);
}
