//! The one error type of this crate.

use std::path::PathBuf;

/// Everything that can go wrong while making, loading or writing certificates.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A CRL could not be made.
    #[error("CRL: {0}")]
    Crl(String),
    /// A name given for an agent or the DMZ is not usable.
    #[error("invalid {what} name {name:?}: {reason}")]
    InvalidName {
        /// "agent" or "DMZ".
        what: &'static str,
        /// The name as given.
        name: String,
        /// Why it was refused.
        reason: &'static str,
    },
    /// The same name was given twice.
    #[error("{what} name {name:?} is given more than once")]
    DuplicateName {
        /// "agent" or "DMZ".
        what: &'static str,
        /// The repeated name.
        name: String,
    },
    /// Nothing names what to issue.
    #[error("no {what} name given")]
    MissingName {
        /// What should have been named.
        what: &'static str,
    },
    /// A subject alternative name that rcgen cannot encode.
    #[error("invalid subject alternative name {value:?}: {source}")]
    InvalidSan {
        /// The name as given.
        value: String,
        /// Why rcgen refused it.
        source: rcgen::Error,
    },
    /// A validity period that is empty or reversed.
    #[error("invalid validity: {0}")]
    InvalidValidity(String),
    /// A file would be overwritten without `force`.
    #[error("{} already exists; use --force to overwrite it", path.display())]
    Exists {
        /// The first existing file found.
        path: PathBuf,
    },
    /// A CA certificate or key that cannot be used.
    #[error("unusable CA {what}: {reason}")]
    BadCa {
        /// "certificate" or "key".
        what: &'static str,
        /// Why it was refused.
        reason: String,
    },
    /// rcgen failed to generate a key or sign a certificate.
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    /// Reading or writing a file failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory concerned.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
}

impl Error {
    /// True for errors in what the user asked (bad names, existing files, bad CA input), which
    /// the binary reports with exit code 64; false for IO and generation failures.
    pub fn is_usage(&self) -> bool {
        match self {
            Error::InvalidName { .. }
            | Error::DuplicateName { .. }
            | Error::MissingName { .. }
            | Error::InvalidSan { .. }
            | Error::InvalidValidity(_)
            | Error::Exists { .. }
            | Error::BadCa { .. } => true,
            Error::Generate(_) | Error::Io { .. } | Error::Crl(_) => false,
        }
    }

    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Error {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}
