//! The command line both binaries share: run, `check`, `health`; exit codes.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::error::ErrorKind;
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use crate::config::ConfigError;
use crate::console;
use crate::sandbox;
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
    /// Confine this process as the config would confine the node, try what the sandbox must
    /// deny and what it must allow, and print what the kernel answered; exit 0 if every
    /// operation came out as promised, 1 if not.
    SandboxCheck,
    /// Ask a running node's admin endpoint whether it is healthy; exit 0 if it answers 200
    /// (for container health checks: needs no shell and no curl).
    Health {
        /// Admin endpoint address.
        #[arg(long)]
        admin: String,
        /// Path to ask: /readyz or /livez.
        #[arg(long, default_value = "/readyz")]
        path: String,
        /// CA of the admin endpoint's certificate, for an endpoint with admin.tls (HTTPS).
        #[arg(long, value_name = "FILE")]
        cacert: Option<PathBuf>,
    },
    /// Show a running node's status as tables; exit 0 if it is ready, 1 if not.
    Status {
        #[command(flatten)]
        admin: AdminArgs,
        /// Print the JSON of GET /status instead.
        #[arg(long)]
        json: bool,
    },
    /// List the sessions a running node is relaying.
    Sessions {
        #[command(flatten)]
        admin: AdminArgs,
        /// Print the JSON of GET /sessions instead.
        #[arg(long)]
        json: bool,
    },
    /// Reset a session on both sides (its audit record says `killed`).
    Kill {
        /// The session id (16 hexadecimal digits, as `sessions` lists it).
        id: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Agent: stop taking new sessions from the DMZ nodes; running sessions go on.
    Drain {
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Agent: take new sessions again after `drain`.
    Resume {
        #[command(flatten)]
        admin: AdminArgs,
    },
}

/// Which admin endpoint an operator's command asks.
#[derive(clap::Args)]
struct AdminArgs {
    /// Admin endpoint: `HOST:PORT`, `http://HOST:PORT` or `https://HOST:PORT` [default:
    /// admin.listen of --config, else the binary's default].
    #[arg(long)]
    admin: Option<String>,
    /// File holding the admin token [default: admin.token_file of --config].
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// CA of the admin endpoint's certificate, for an endpoint with admin.tls (HTTPS).
    #[arg(long, value_name = "FILE")]
    cacert: Option<PathBuf>,
    /// Client certificate, for an endpoint with admin.tls.client_ca.
    #[arg(long, value_name = "FILE", requires = "key")]
    cert: Option<PathBuf>,
    /// The client certificate's key.
    #[arg(long, value_name = "FILE", requires = "cert")]
    key: Option<PathBuf>,
}

/// Parses the command line and runs the binary `name`: `load` reads the config, `confine`
/// says how its process is confined, `serve` runs it until the shutdown token (cancelled by
/// SIGINT/SIGTERM) is cancelled.
pub fn main<C, F, Fut>(
    name: &'static str,
    about: &'static str,
    default_admin: &'static str,
    load: impl Fn(&Path) -> Result<C, ConfigError>,
    confine: impl Fn(&C) -> (sandbox::Settings, sandbox::Rules),
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
    if let Some(Command::Health {
        admin,
        path,
        cacert,
    }) = &cli.command
    {
        return match health(admin, path, cacert.clone()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("{name}: unhealthy: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let operator = |admin: &AdminArgs| {
        let tls = console::TlsOptions {
            ca: admin.cacert.clone(),
            cert: admin.cert.clone(),
            key: admin.key.clone(),
        };
        console::Target::resolve(
            admin.admin.clone(),
            admin.token_file.clone(),
            &tls,
            cli.config.as_deref(),
            default_admin,
        )
    };
    let asked = match &cli.command {
        Some(Command::Status { admin, json }) => Some(
            operator(admin)
                .and_then(|t| console::status(&t, *json).map(|ready| if ready { 0 } else { 1 })),
        ),
        Some(Command::Sessions { admin, json }) => {
            Some(operator(admin).and_then(|t| console::sessions(&t, *json).map(|()| 0)))
        }
        Some(Command::Kill { id, admin }) => Some(operator(admin).and_then(|t| {
            let answer = console::act(&t, "DELETE", &format!("/sessions/{id}"))?;
            println!("{answer}");
            Ok(0)
        })),
        Some(Command::Drain { admin }) | Some(Command::Resume { admin }) => {
            let path = if matches!(cli.command, Some(Command::Drain { .. })) {
                "/drain"
            } else {
                "/resume"
            };
            Some(operator(admin).and_then(|t| {
                println!("{}", console::act(&t, "POST", path)?);
                Ok(0)
            }))
        }
        _ => None,
    };
    match asked {
        Some(Ok(code)) => return ExitCode::from(code),
        Some(Err(e)) => {
            eprintln!("{name}: {e}");
            return ExitCode::from(2);
        }
        None => {}
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
    let (settings, rules) = confine(&config);
    if let Some(Command::SandboxCheck) = cli.command {
        return match sandbox::apply(settings, &rules) {
            Ok(applied) if sandbox::check(applied, &path) => ExitCode::SUCCESS,
            Ok(_) => ExitCode::FAILURE,
            Err(e) => {
                eprintln!("{name}: sandbox: {e}");
                ExitCode::FAILURE
            }
        };
    }
    telemetry::init_tracing(cli.log_format);
    // Before the runtime starts its threads: they inherit the confinement.
    match sandbox::apply(settings, &rules) {
        Ok(applied) if applied.mode == sandbox::Mode::Enforce && !applied.fully_enforced() => {
            tracing::warn!("sandbox: {applied}: this kernel confines the process only in part")
        }
        Ok(applied) if applied.mode == sandbox::Mode::Enforce => {
            tracing::info!("sandbox: {applied}")
        }
        Ok(applied) => tracing::warn!("sandbox: {applied}: the process is not confined"),
        Err(e) => {
            tracing::error!("sandbox: {e}");
            return ExitCode::FAILURE;
        }
    }
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

/// `GET path` on the admin endpoint; `Ok` on a 200 answer.
fn health(admin: &str, path: &str, cacert: Option<PathBuf>) -> Result<(), String> {
    let tls = console::TlsOptions {
        ca: cacert,
        ..Default::default()
    };
    let mut target = console::Target::resolve(Some(admin.to_owned()), None, &tls, None, admin)?;
    target.timeout = std::time::Duration::from_secs(3);
    match target.request("GET", path)? {
        (200, _) => Ok(()),
        (status, body) => Err(format!("{status} {}", body.trim())),
    }
}
