//! Issuing more certificates from an existing CA directory, for new agents and rotation.

use std::fs;
use std::path::{Path, PathBuf};

use crate::dev::check_names;
use crate::leaf::DEFAULT_DAYS;
use crate::output::write_files;
use crate::{Ca, Error, layout};

/// What [`issue_from_dir`] issues, from which CA, and where it writes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IssueOptions {
    /// Directory holding the CA's `ca.pem` and `ca-key.pem`.
    pub ca_dir: PathBuf,
    /// Directory to write into (default: `ca_dir`); created with its parents if missing.
    pub out: Option<PathBuf>,
    /// Agent identities to issue client certificates for.
    pub agents: Vec<String>,
    /// If not empty, a new DMZ certificate for these names is issued.
    pub dmz_names: Vec<String>,
    /// Overwrite existing files instead of refusing.
    pub force: bool,
    /// Validity of the new certificates, in days.
    pub days: u32,
}

impl IssueOptions {
    /// Options with no names, writing into `ca_dir`, valid for the default 825 days.
    pub fn new(ca_dir: impl Into<PathBuf>) -> IssueOptions {
        IssueOptions {
            ca_dir: ca_dir.into(),
            out: None,
            agents: Vec::new(),
            dmz_names: Vec::new(),
            force: false,
            days: DEFAULT_DAYS,
        }
    }
}

/// Loads the CA in `opts.ca_dir` and issues the requested certificates; returns the paths written.
pub fn issue_from_dir(opts: &IssueOptions) -> Result<Vec<PathBuf>, Error> {
    layout::check_days(opts.days)?;
    check_names(&opts.agents, &opts.dmz_names)?;
    if opts.agents.is_empty() && opts.dmz_names.is_empty() {
        return Err(Error::MissingName {
            what: "agent or DMZ",
        });
    }
    let ca = load_ca(&opts.ca_dir)?;
    let out = opts.out.as_deref().unwrap_or(&opts.ca_dir);
    let mut files = Vec::new();
    if !opts.dmz_names.is_empty() {
        files.extend(layout::dmz_files(out, &ca, &opts.dmz_names, opts.days)?);
    }
    for agent in &opts.agents {
        files.extend(layout::agent_files(out, &ca, agent, opts.days)?);
    }
    write_files(out, &files, opts.force)
}

/// Loads `ca.pem` and `ca-key.pem` from `dir`.
pub fn load_ca(dir: &Path) -> Result<Ca, Error> {
    let cert_path = layout::cert_path(dir, layout::CA_STEM);
    let key_path = layout::key_path(dir, layout::CA_STEM);
    let cert = fs::read_to_string(&cert_path).map_err(|e| Error::io(&cert_path, e))?;
    let key = fs::read_to_string(&key_path).map_err(|e| Error::io(&key_path, e))?;
    Ca::from_pem(&cert, &key).map_err(|e| match e {
        Error::BadCa { what, reason } => {
            let path = if what == "key" { &key_path } else { &cert_path };
            Error::BadCa {
                what,
                reason: format!("{}: {reason}", path.display()),
            }
        }
        other => other,
    })
}
