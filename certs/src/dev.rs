//! The development PKI: a new CA, one DMZ certificate and one certificate per agent.

use std::fs;
use std::path::PathBuf;

use crate::leaf::{DEFAULT_DAYS, validity};
use crate::name::{check_agent_name, check_dmz_name, check_unique};
use crate::output::write_files;
use crate::{Ca, Error, ca::CA_DAYS, layout};

/// Common name of the development CA.
pub const DEV_CA_NAME: &str = "relay development CA";

/// What [`write_dev_pki`] writes, and where.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DevOptions {
    /// Directory to write into; created with its parents if missing.
    pub out: PathBuf,
    /// Agent identities: each gets `NAME.pem` and `NAME-key.pem`.
    pub agents: Vec<String>,
    /// Names the DMZ certificate is valid for (IP addresses become IP SANs).
    pub dmz_names: Vec<String>,
    /// Overwrite existing files instead of refusing.
    pub force: bool,
    /// Validity of the DMZ and agent certificates, in days.
    pub days: u32,
}

impl Default for DevOptions {
    fn default() -> Self {
        DevOptions {
            out: PathBuf::from("certs/dev"),
            agents: default_agents(),
            dmz_names: default_dmz_names(),
            force: false,
            days: DEFAULT_DAYS,
        }
    }
}

/// The agents of a development PKI when none are named.
pub fn default_agents() -> Vec<String> {
    vec!["engine-1".to_owned(), "engine-2".to_owned()]
}

/// The DMZ names of a development PKI when none are named.
pub fn default_dmz_names() -> Vec<String> {
    vec!["localhost".to_owned(), "127.0.0.1".to_owned()]
}

/// What [`write_dev_pki`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DevPki {
    /// The files written, in order.
    pub written: Vec<PathBuf>,
    /// Certificate and key pairs of agents that the new CA did not sign, removed with `force`
    /// (left in place they would fail verification against the new `ca.pem`).
    pub removed: Vec<PathBuf>,
}

/// Writes a development PKI; returns the paths written and removed.
///
/// Every name is checked and every certificate made before the first file is written, and
/// without `force` nothing is written if any target file exists. With `force`, the
/// `NAME.pem` + `NAME-key.pem` pairs of other agents in `out` are removed after the new files
/// are written: they were signed by the CA that this call replaces.
pub fn write_dev_pki(opts: &DevOptions) -> Result<DevPki, Error> {
    layout::check_days(opts.days)?;
    check_names(&opts.agents, &opts.dmz_names)?;
    if opts.dmz_names.is_empty() {
        return Err(Error::MissingName { what: "DMZ" });
    }

    // The CA outlives its leaves, so leaves can be re-issued from it for a while.
    let (not_before, not_after) = validity(opts.days.max(CA_DAYS));
    let ca = Ca::with_validity(DEV_CA_NAME, not_before, not_after)?;
    let mut files = layout::ca_files(&opts.out, &ca);
    files.extend(layout::dmz_files(
        &opts.out,
        &ca,
        &opts.dmz_names,
        opts.days,
    )?);
    for agent in &opts.agents {
        files.extend(layout::agent_files(&opts.out, &ca, agent, opts.days)?);
    }
    let stale = if opts.force {
        stale_pairs(opts)?
    } else {
        Vec::new()
    };
    let written = write_files(&opts.out, &files, opts.force)?;
    for path in &stale {
        fs::remove_file(path).map_err(|e| Error::io(path, e))?;
    }
    Ok(DevPki {
        written,
        removed: stale,
    })
}

/// Certificate and key pairs in `opts.out` that a new CA makes stale: every `NAME.pem` with a
/// `NAME-key.pem` beside it, other than the CA's, the DMZ's and the agents being written.
fn stale_pairs(opts: &DevOptions) -> Result<Vec<PathBuf>, Error> {
    let entries = match fs::read_dir(&opts.out) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io(&opts.out, e)),
    };
    let mut stale = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(&opts.out, e))?;
        let name = entry.file_name();
        let Some(stem) = name.to_str().and_then(|n| n.strip_suffix(".pem")) else {
            continue;
        };
        let kept = stem.ends_with("-key")
            || stem == layout::CA_STEM
            || stem == layout::DMZ_STEM
            || opts.agents.iter().any(|a| a == stem);
        let key = layout::key_path(&opts.out, stem);
        if !kept && key.is_file() {
            stale.push(layout::cert_path(&opts.out, stem));
            stale.push(key);
        }
    }
    stale.sort();
    Ok(stale)
}

pub(crate) fn check_names(agents: &[String], dmz_names: &[String]) -> Result<(), Error> {
    agents.iter().try_for_each(|a| check_agent_name(a))?;
    dmz_names.iter().try_for_each(|n| check_dmz_name(n))?;
    check_unique("agent", agents)?;
    check_unique("DMZ", dmz_names)
}
