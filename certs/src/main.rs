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
    /// Tell when the certificates (or CRLs) of PEM files stop working, and how long is left.
    Expiry(ExpiryArgs),
}

#[derive(Args, Debug)]
struct ExpiryArgs {
    /// PEM files holding certificates or CRLs.
    #[arg(value_name = "FILE", required = true)]
    files: Vec<PathBuf>,
    /// Exit with status 1 if any of them stops working within this time (e.g. 30d).
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    within: Option<std::time::Duration>,
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
    if let Command::Expiry(args) = &cli.command {
        return expiry(args);
    }
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
        Command::Expiry(_) => unreachable!("handled in main"),
    }
}

/// Prints one line per certificate or CRL: file, kind, subject, notAfter (a CRL's
/// nextUpdate) and the time left. Exit status 1 when one is within `--within` (or expired).
fn expiry(args: &ExpiryArgs) -> ExitCode {
    use relay_tunnel::expiry::{Expiry, Kind, human_left};
    let now = std::time::SystemTime::now();
    let mut rows = vec![vec![
        "FILE".to_owned(),
        "KIND".into(),
        "SUBJECT".into(),
        "NOT AFTER".into(),
        "LEFT".into(),
    ]];
    let mut soon = false;
    for path in &args.files {
        let what = path.display().to_string();
        let items: Vec<Expiry> = match relay_tunnel::tls::load_certs(path) {
            Ok(certs) => certs
                .iter()
                .filter_map(|c| Expiry::of_certificate(&what, c))
                .collect(),
            Err(_) => match relay_tunnel::tls::load_crls(path) {
                Ok(crls) => crls
                    .iter()
                    .filter_map(|c| Expiry::of_crl(&what, c))
                    .collect(),
                Err(_) => {
                    eprintln!("relay-certs: error: {what}: no certificate or CRL that can be read");
                    return ExitCode::from(EXIT_USAGE);
                }
            },
        };
        for e in items {
            let left = e.left(now);
            soon |= args
                .within
                .is_some_and(|w| left <= i64::try_from(w.as_secs()).unwrap_or(i64::MAX));
            let kind = match e.kind {
                Kind::Certificate => "certificate",
                Kind::Crl => "crl",
            };
            rows.push(vec![
                what.clone(),
                kind.into(),
                e.subject.clone(),
                e.date(),
                human_left(left),
            ]);
        }
    }
    print!("{}", relay_tunnel::console::table(&rows));
    if soon {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

fn or_default(given: Vec<String>, default: Vec<String>) -> Vec<String> {
    if given.is_empty() { default } else { given }
}
