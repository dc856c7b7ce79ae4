//! `relay-dmz` binary: parse the command line, load the config, start telemetry, run.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use relay_dmz::{DmzConfig, Listeners};
use relay_tunnel::telemetry::{self, LogFormat};
use tokio_util::sync::CancellationToken;

/// Exit code for a bad config or command line (EX_USAGE).
const EXIT_CONFIG: u8 = 64;

#[derive(Parser)]
#[command(
    name = "relay-dmz",
    version,
    about = "relay DMZ node: public listeners gated by agent tunnels"
)]
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
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let Some(path) = cli.config else {
        eprintln!("relay-dmz: --config PATH (or RELAY_CONFIG) is required");
        return ExitCode::from(EXIT_CONFIG);
    };
    let config = match DmzConfig::load(&path) {
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
            eprintln!("relay-dmz: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serve(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(config: DmzConfig) -> anyhow::Result<()> {
    use anyhow::Context;
    let listeners = Listeners::bind(&config)
        .await
        .context("binding the tunnel and admin listeners")?;
    let shutdown = CancellationToken::new();
    tokio::spawn(relay_tunnel::signals::on_shutdown(shutdown.clone()));
    relay_dmz::run(config, listeners, shutdown).await?;
    Ok(())
}
