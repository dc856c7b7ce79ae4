//! `relay-certs`: writes a development PKI, or issues more certificates from an existing CA.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use relay_certs::{DEFAULT_DAYS, DevOptions, IssueOptions, MAX_DAYS};

/// Exit code for usage and validation errors (sysexits EX_USAGE).
const EXIT_USAGE: u8 = 64;

#[derive(Parser, Debug)]
#[command(
    name = "relay-certs",
    version,
    about = "Certificates for relay's mutual-TLS tunnel"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Write a development PKI: ca.pem, ca-key.pem, dmz.pem, dmz-key.pem, NAME.pem, NAME-key.pem.
    Dev(DevArgs),
    /// Issue agent or DMZ certificates from an existing ca.pem and ca-key.pem.
    Issue(IssueArgs),
}

#[derive(Args, Debug)]
struct DevArgs {
    /// Directory to write into (created if missing).
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Agent identity; repeat for more [default: engine-1 engine-2].
    #[arg(long = "agent", value_name = "NAME")]
    agents: Vec<String>,
    /// Name the DMZ certificate is valid for (an IP address becomes an IP SAN); repeat for
    /// more [default: localhost 127.0.0.1].
    #[arg(long = "dmz-name", value_name = "NAME")]
    dmz_names: Vec<String>,
    /// Overwrite existing files.
    #[arg(long)]
    force: bool,
    /// Validity of the DMZ and agent certificates, in days.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_DAYS,
          value_parser = clap::value_parser!(u32).range(1..=i64::from(MAX_DAYS)))]
    days: u32,
}

#[derive(Args, Debug)]
#[command(group(clap::ArgGroup::new("what").required(true).multiple(true).args(["agents", "dmz_names"])))]
struct IssueArgs {
    /// Directory holding ca.pem and ca-key.pem.
    #[arg(long, value_name = "DIR")]
    ca_dir: PathBuf,
    /// Agent identity to issue a client certificate for; repeat for more.
    #[arg(long = "agent", value_name = "NAME")]
    agents: Vec<String>,
    /// Issue a new DMZ certificate valid for NAME; repeat for more names.
    #[arg(long = "dmz-name", visible_alias = "dmz", value_name = "NAME")]
    dmz_names: Vec<String>,
    /// Directory to write into [default: the CA directory].
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    /// Overwrite existing files.
    #[arg(long)]
    force: bool,
    /// Validity of the new certificates, in days.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_DAYS,
          value_parser = clap::value_parser!(u32).range(1..=i64::from(MAX_DAYS)))]
    days: u32,
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            // --help and --version are not errors.
            return if e.use_stderr() {
                ExitCode::from(EXIT_USAGE)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    match run(cli) {
        Ok(written) => {
            for path in written {
                println!("{}", path.display());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("relay-certs: error: {e:#}");
            let usage = e
                .downcast_ref::<relay_certs::Error>()
                .is_some_and(relay_certs::Error::is_usage);
            ExitCode::from(if usage { EXIT_USAGE } else { 1 })
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<Vec<PathBuf>> {
    match cli.command {
        Command::Dev(args) => {
            let defaults = DevOptions::default();
            let opts = DevOptions {
                agents: or_default(args.agents, defaults.agents),
                dmz_names: or_default(args.dmz_names, defaults.dmz_names),
                out: args.out,
                force: args.force,
                days: args.days,
            };
            let pki = relay_certs::write_dev_pki(&opts)
                .with_context(|| format!("writing a development PKI to {}", opts.out.display()))?;
            for path in &pki.removed {
                eprintln!(
                    "relay-certs: removed {} (signed by the CA this run replaced)",
                    path.display()
                );
            }
            Ok(pki.written)
        }
        Command::Issue(args) => {
            let opts = IssueOptions {
                ca_dir: args.ca_dir,
                out: args.out,
                agents: args.agents,
                dmz_names: args.dmz_names,
                force: args.force,
                days: args.days,
            };
            relay_certs::issue_from_dir(&opts)
                .with_context(|| format!("issuing from the CA in {}", opts.ca_dir.display()))
        }
    }
}

fn or_default(given: Vec<String>, default: Vec<String>) -> Vec<String> {
    if given.is_empty() { default } else { given }
}
