//! `relay-demo-target`: the stand-in trading engine of `scripts/demo`. It serves a one-line
//! HTTP page and an echo service until Ctrl-C or SIGTERM.
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::process::ExitCode;

use clap::Parser;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};

/// The page served to every HTTP request.
const PAGE: &str = "hello from the trading engine\n";

#[derive(Parser)]
#[command(
    name = "relay-demo-target",
    version,
    about = "Demo target for relay: a one-line HTTP page and an echo service"
)]
struct Cli {
    /// Address of the HTTP page.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:18080")]
    http: SocketAddr,
    /// Address of the echo service (every byte is sent back; EOF is passed on).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:18081")]
    echo: SocketAddr,
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let http = match TcpListener::bind(cli.http).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("relay-demo-target: cannot bind HTTP on {}: {e}", cli.http);
            return ExitCode::FAILURE;
        }
    };
    let echo = match TcpListener::bind(cli.echo).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("relay-demo-target: cannot bind echo on {}: {e}", cli.echo);
            return ExitCode::FAILURE;
        }
    };
    let _http = relay_e2e::targets::serve_http(http, PAGE);
    let echo_task = tokio::spawn(serve_echo(echo));
    eprintln!(
        "relay-demo-target: HTTP on {}, echo on {}; Ctrl-C stops",
        cli.http, cli.echo
    );

    let (Ok(mut int), Ok(mut term)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) else {
        eprintln!("relay-demo-target: cannot install signal handlers");
        return ExitCode::FAILURE;
    };
    tokio::select! {
        _ = int.recv() => {}
        _ = term.recv() => {}
    }
    echo_task.abort();
    ExitCode::SUCCESS
}

/// Echoes every byte back; on EOF from the client it finishes writing and closes.
async fn serve_echo(listener: TcpListener) {
    loop {
        let mut stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                eprintln!("relay-demo-target: echo accept failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        tokio::spawn(async move {
            let (mut r, mut w) = stream.split();
            let _ = tokio::io::copy(&mut r, &mut w).await;
            let _ = w.shutdown().await;
        });
    }
}
