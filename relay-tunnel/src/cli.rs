//! The command line both binaries share: run, `check`, `health`; exit codes.

use std::future::Future;
use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::error::ErrorKind;
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use crate::config::ConfigError;
use crate::telemetry::{self, LogFormat};

/// Exit code for a bad config or command line (EX_USAGE).
pub const EXIT_CONFIG: u8 = 64;

#[derive(Parser)]
struct Cli {
    /// Config file (TOML).
    #[arg(long, env = "RELAY_CONFIG", global = true)]
    config: Option<PathBuf>,
    /// Log format: text or json.
    #[arg(long, default_value = "text", global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Check the config and print every problem; exit 0 if valid, 64 if not.
    Check,
    /// Ask a running node's admin endpoint whether it is healthy; exit 0 if it answers 200
    /// (for container health checks: needs no shell and no curl).
    Health {
        /// Admin endpoint address.
        #[arg(long)]
        admin: String,
        /// Path to ask: /readyz or /livez.
        #[arg(long, default_value = "/readyz")]
        path: String,
    },
}

/// Parses the command line and runs the binary `name`: `load` reads the config, `serve` runs
/// it until the shutdown token (cancelled by SIGINT/SIGTERM) is cancelled.
pub fn main<C, F, Fut>(
    name: &'static str,
    about: &'static str,
    default_admin: &'static str,
    load: impl Fn(&Path) -> Result<C, ConfigError>,
    serve: F,
) -> ExitCode
where
    F: FnOnce(C, CancellationToken) -> Fut,
    Fut: Future<Output = Result<(), Box<dyn std::error::Error + Send + Sync>>>,
{
    let command = Cli::command()
        .name(name)
        .version(env!("CARGO_PKG_VERSION"))
        .about(about)
        .mut_subcommand("health", |s| {
            s.mut_arg("admin", |a| a.required(false).default_value(default_admin))
        });
    let cli = match command
        .try_get_matches()
        .and_then(|m| Cli::from_arg_matches(&m))
    {
        Ok(cli) => cli,
        Err(e) if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) => {
            e.exit()
        }
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if let Some(Command::Health { admin, path }) = &cli.command {
        return match health(admin, path) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("{name}: unhealthy: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let Some(path) = cli.config else {
        eprintln!("{name}: --config PATH (or RELAY_CONFIG) is required");
        return ExitCode::from(EXIT_CONFIG);
    };
    let config = match load(&path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{}: invalid config:\n{e}", path.display());
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if let Some(Command::Check) = cli.command {
        println!("{}: ok", path.display());
        return ExitCode::SUCCESS;
    }
    telemetry::init_tracing(cli.log_format);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("{name}: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        let shutdown = CancellationToken::new();
        tokio::spawn(crate::signals::on_shutdown(shutdown.clone()));
        serve(config, shutdown).await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            ExitCode::FAILURE
        }
    }
}

/// `GET path` on the admin endpoint; `Ok` on a 200 answer within 3 seconds.
fn health(admin: &str, path: &str) -> Result<(), String> {
    const TIMEOUT: Duration = Duration::from_secs(3);
    let addr = admin
        .to_socket_addrs()
        .map_err(|e| format!("{admin}: {e}"))?
        .next()
        .ok_or_else(|| format!("{admin}: no address"))?;
    let mut stream =
        TcpStream::connect_timeout(&addr, TIMEOUT).map_err(|e| format!("{addr}: {e}"))?;
    stream
        .set_read_timeout(Some(TIMEOUT))
        .map_err(|e| e.to_string())?;
    stream
        .set_write_timeout(Some(TIMEOUT))
        .map_err(|e| e.to_string())?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {admin}\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    let mut answer = Vec::new();
    stream
        .take(4096)
        .read_to_end(&mut answer)
        .map_err(|e| e.to_string())?;
    let answer = String::from_utf8_lossy(&answer);
    let status = answer.lines().next().unwrap_or("");
    if status.starts_with("HTTP/1.1 200") {
        Ok(())
    } else {
        let body = answer
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.trim())
            .unwrap_or("");
        Err(format!("{status} {body}").trim().to_owned())
    }
}
