//! The files of a relay PKI directory and the certificate profile behind each.

use std::path::{Path, PathBuf};

use crate::leaf::{LeafSpec, Usage, validity};
use crate::output::PemFile;
use crate::{Ca, Error};

/// File stem of the CA certificate (`ca.pem`) and key (`ca-key.pem`).
pub const CA_STEM: &str = "ca";
/// File stem of the DMZ tunnel certificate (`dmz.pem`) and key (`dmz-key.pem`).
pub const DMZ_STEM: &str = "dmz";
/// The longest validity the command line accepts, in days (100 years).
pub const MAX_DAYS: u32 = 36_500;

/// The path of a certificate file in `dir` for `stem` (`ca`, `dmz` or an agent name).
pub fn cert_path(dir: &Path, stem: &str) -> PathBuf {
    dir.join(format!("{stem}.pem"))
}

/// The path of a private key file in `dir` for `stem`.
pub fn key_path(dir: &Path, stem: &str) -> PathBuf {
    dir.join(format!("{stem}-key.pem"))
}

/// The certificate file of `stem` in `dir`, to write.
fn cert_file(dir: &Path, stem: &str, contents: String) -> PemFile {
    PemFile {
        path: cert_path(dir, stem),
        contents,
        secret: false,
    }
}

/// The private key file of `stem` in `dir`, to write (mode 0600).
fn key_file(dir: &Path, stem: &str, contents: String) -> PemFile {
    PemFile {
        path: key_path(dir, stem),
        contents,
        secret: true,
    }
}

pub(crate) fn check_days(days: u32) -> Result<(), Error> {
    if days == 0 || days > MAX_DAYS {
        return Err(Error::InvalidValidity(format!(
            "days must be between 1 and {MAX_DAYS}, not {days}"
        )));
    }
    Ok(())
}

/// The CA's two files.
pub(crate) fn ca_files(dir: &Path, ca: &Ca) -> Vec<PemFile> {
    vec![
        cert_file(dir, CA_STEM, ca.cert_pem()),
        key_file(dir, CA_STEM, ca.key_pem()),
    ]
}

/// The DMZ certificate (serverAuth, SANs `names`, CN the first) and key.
pub(crate) fn dmz_files(
    dir: &Path,
    ca: &Ca,
    names: &[String],
    days: u32,
) -> Result<Vec<PemFile>, Error> {
    let (not_before, not_after) = validity(days);
    let spec = LeafSpec {
        common_name: names.first().cloned().unwrap_or_default(),
        sans: names.to_vec(),
        usage: Usage::Server,
        not_before,
        not_after,
    };
    let leaf = ca.issue(&spec)?;
    Ok(vec![
        cert_file(dir, DMZ_STEM, leaf.cert_pem),
        key_file(dir, DMZ_STEM, leaf.key_pem),
    ])
}

/// An agent certificate (clientAuth, first SAN the DNS name `name`, CN `name`) and key.
pub(crate) fn agent_files(
    dir: &Path,
    ca: &Ca,
    name: &str,
    days: u32,
) -> Result<Vec<PemFile>, Error> {
    let leaf = ca.issue(&LeafSpec::client(name).valid_for_days(days))?;
    Ok(vec![
        cert_file(dir, name, leaf.cert_pem),
        key_file(dir, name, leaf.key_pem),
    ])
}
