//! `relay-bench`: the Rust side of `bench/run`. It holds many idle sessions open through a
//! relay (measuring the relay processes' RSS before and after), serves the echo and fallback
//! HTTP targets, and hands out free ports. See docs/PERFORMANCE.md.
#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener as StdListener};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use relay_tunnel::net::bind_reuse;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

/// Body of the fallback HTTP target (same size as the nginx one written by `bench/run`).
const PAGE: &str = "hello from the bench target\n";

#[derive(Parser)]
#[command(
    name = "relay-bench",
    version,
    about = "Helpers of bench/run: idle-session holder, echo and HTTP targets, free ports"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Opens COUNT sessions to an echo service, round-trips a few bytes on each, holds them,
    /// round-trips again, and prints key=value results (exit 1 if any session failed).
    Sessions(SessionsArgs),
    /// Serves an echo service (every byte back, EOF passed on) until SIGTERM or Ctrl-C.
    Echo {
        /// Listen address.
        #[arg(long)]
        listen: SocketAddr,
    },
    /// Serves a fixed small HTTP/1.1 page with keep-alive until SIGTERM or Ctrl-C (the
    /// fallback when nginx is missing).
    Http {
        /// Listen address.
        #[arg(long)]
        listen: SocketAddr,
    },
    /// Prints COUNT distinct free TCP ports on 127.0.0.1, one per line.
    Ports {
        /// How many.
        count: usize,
    },
}

#[derive(clap::Args)]
struct SessionsArgs {
    /// Address of the echo service (directly or through a relay).
    #[arg(long)]
    addr: SocketAddr,
    /// Sessions to open and hold.
    #[arg(long)]
    count: usize,
    /// Processes whose VmRSS is read before and after: NAME=PID (repeatable).
    #[arg(long = "pid", value_name = "NAME=PID")]
    pids: Vec<String>,
    /// Sessions being opened at the same time.
    #[arg(long, default_value_t = 256)]
    parallel: usize,
    /// Seconds to wait after all sessions are open before reading RSS.
    #[arg(long, default_value_t = 2)]
    settle: u64,
    /// Seconds to hold the sessions after reading RSS, before the second round trip.
    #[arg(long, default_value_t = 3)]
    hold: u64,
    /// Time limit of one connect or one round trip, in seconds.
    #[arg(long, default_value_t = 30)]
    timeout: u64,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("relay-bench: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async {
        match cli.command {
            Command::Sessions(args) => sessions(args).await,
            Command::Echo { listen } => {
                let task = echo(listen).await?;
                wait_for_signal().await?;
                task.abort();
                Ok(true)
            }
            Command::Http { listen } => {
                let l = bind_reuse(listen).with_context(|| format!("bind {listen}"))?;
                let _target = relay_e2e::targets::serve_http(l, PAGE);
                wait_for_signal().await?;
                Ok(true)
            }
            Command::Ports { count } => ports(count).map(|()| true),
        }
    });
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("relay-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Prints `count` distinct ports that were free a moment ago; all are held until printed so
/// that none repeats.
fn ports(count: usize) -> anyhow::Result<()> {
    let held: Vec<StdListener> = (0..count)
        .map(|_| StdListener::bind("127.0.0.1:0"))
        .collect::<Result<_, _>>()
        .context("bind port 0")?;
    for l in &held {
        println!("{}", l.local_addr()?.port());
    }
    Ok(())
}

/// Echo target; its listener has the relay's backlog (1024), not tokio's default (128), so that
/// bursts of connects are not dropped and retried a second later.
async fn echo(listen: SocketAddr) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let listener = bind_reuse(listen).with_context(|| format!("bind {listen}"))?;
    Ok(tokio::spawn(async move {
        loop {
            let mut s = match listener.accept().await {
                Ok((s, _)) => s,
                Err(e) => {
                    // Out of fds, most likely: back off rather than spin.
                    eprintln!("relay-bench echo: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = s.set_nodelay(true);
            tokio::spawn(async move {
                // A small buffer: the echo target holds thousands of idle sessions.
                let mut buf = [0u8; 2048];
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if s.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    }
                }
                let _ = s.shutdown().await;
            });
        }
    }))
}

async fn wait_for_signal() -> anyhow::Result<()> {
    let mut int = signal(SignalKind::interrupt())?;
    let mut term = signal(SignalKind::terminate())?;
    tokio::select! {
        _ = int.recv() => {}
        _ = term.recv() => {}
    }
    Ok(())
}

/// VmRSS of a process in KiB.
fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("read /proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .with_context(|| format!("no VmRSS in /proc/{pid}/status"))?;
    line.split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("bad VmRSS line {line:?}"))
}

fn parse_pids(specs: &[String]) -> anyhow::Result<Vec<(String, u32)>> {
    specs
        .iter()
        .map(|s| {
            let (name, pid) = s
                .split_once('=')
                .with_context(|| format!("--pid {s:?}: expected NAME=PID"))?;
            Ok((name.to_owned(), pid.parse().context("--pid: bad PID")?))
        })
        .collect()
}

/// Sends the session's 8-byte tag and expects it back.
async fn round_trip(s: &mut TcpStream, tag: u64, limit: Duration) -> Result<(), &'static str> {
    let sent = tag.to_be_bytes();
    let mut got = [0u8; 8];
    let io = async {
        s.write_all(&sent).await?;
        s.read_exact(&mut got).await?;
        Ok::<_, std::io::Error>(())
    };
    match tokio::time::timeout(limit, io).await {
        Err(_) => Err("timeout"),
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err("eof"),
        Ok(Err(_)) => Err("io"),
        Ok(Ok(())) if got != sent => Err("mismatch"),
        Ok(Ok(())) => Ok(()),
    }
}

async fn open_one(addr: SocketAddr, tag: u64, limit: Duration) -> Result<TcpStream, &'static str> {
    let mut s = match tokio::time::timeout(limit, TcpStream::connect(addr)).await {
        Err(_) => return Err("connect_timeout"),
        Ok(Err(_)) => return Err("connect"),
        Ok(Ok(s)) => s,
    };
    let _ = s.set_nodelay(true);
    round_trip(&mut s, tag, limit).await?;
    Ok(s)
}

async fn sessions(args: SessionsArgs) -> anyhow::Result<bool> {
    if args.count == 0 || args.parallel == 0 {
        bail!("--count and --parallel must be at least 1");
    }
    let pids = parse_pids(&args.pids)?;
    let limit = Duration::from_secs(args.timeout);
    let mut errors: BTreeMap<&'static str, usize> = BTreeMap::new();

    let rss_before: Vec<u64> = pids
        .iter()
        .map(|(_, p)| rss_kib(*p))
        .collect::<Result<_, _>>()?;

    // Open every session, `parallel` at a time.
    let started = Instant::now();
    let gate = Arc::new(Semaphore::new(args.parallel));
    let mut opening = JoinSet::new();
    for tag in 0..args.count as u64 {
        let permit = gate.clone().acquire_owned().await?;
        opening.spawn(async move {
            let r = open_one(args.addr, tag, limit).await;
            drop(permit);
            (tag, r)
        });
    }
    let mut held = Vec::with_capacity(args.count);
    while let Some(joined) = opening.join_next().await {
        match joined? {
            (tag, Ok(s)) => held.push((tag, s)),
            (_, Err(kind)) => *errors.entry(kind).or_default() += 1,
        }
    }
    let open_secs = started.elapsed().as_secs_f64();
    let opened = held.len();

    tokio::time::sleep(Duration::from_secs(args.settle)).await;
    let rss_after: Vec<u64> = pids
        .iter()
        .map(|(_, p)| rss_kib(*p))
        .collect::<Result<_, _>>()?;
    tokio::time::sleep(Duration::from_secs(args.hold)).await;

    // Every held session must still carry bytes.
    let mut checking = JoinSet::new();
    for (tag, mut s) in held {
        let permit = gate.clone().acquire_owned().await?;
        checking.spawn(async move {
            let r = round_trip(&mut s, tag ^ u64::MAX, limit).await;
            drop(permit);
            (s, r)
        });
    }
    let mut alive = 0usize;
    let mut keep = Vec::with_capacity(opened);
    while let Some(joined) = checking.join_next().await {
        let (s, r) = joined?;
        match r {
            Ok(()) => alive += 1,
            Err(kind) => *errors.entry(kind).or_default() += 1,
        }
        keep.push(s);
    }
    drop(keep);

    let total_errors: usize = errors.values().sum();
    println!("requested={}", args.count);
    println!("opened={opened}");
    println!("alive_after_hold={alive}");
    println!("errors={total_errors}");
    for (kind, n) in &errors {
        println!("error_{kind}={n}");
    }
    println!("open_seconds={open_secs:.3}");
    println!("open_rate={:.0}", opened as f64 / open_secs.max(1e-9));
    for (((name, pid), before), after) in pids.iter().zip(&rss_before).zip(&rss_after) {
        println!("rss_before_kib_{name}={before}");
        println!("rss_after_kib_{name}={after}");
        println!("pid_{name}={pid}");
    }
    Ok(total_errors == 0 && alive == args.count)
}
