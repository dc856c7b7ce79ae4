//! Writes PEM files: keys readable by the owner only, never overwriting unless forced.

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::Error;

/// Mode of private key files. Set at creation so the key is never readable by others.
const KEY_MODE: u32 = 0o600;
/// Mode of certificate files (the umask may narrow it).
const CERT_MODE: u32 = 0o644;

/// One file to write.
pub(crate) struct PemFile {
    pub(crate) path: PathBuf,
    pub(crate) contents: String,
    /// A private key: written with mode 0600.
    pub(crate) secret: bool,
}

/// Refuses if any of `files` exists and `force` is false; nothing is written then.
pub(crate) fn check_absent(files: &[PemFile], force: bool) -> Result<(), Error> {
    if force {
        return Ok(());
    }
    // symlink_metadata: a dangling symlink counts as present, as writing would follow it.
    match files.iter().find(|f| f.path.symlink_metadata().is_ok()) {
        Some(f) => Err(Error::Exists {
            path: f.path.clone(),
        }),
        None => Ok(()),
    }
}

/// Creates `dir` and writes `files` into it; returns their paths.
pub(crate) fn write_files(
    dir: &Path,
    files: &[PemFile],
    force: bool,
) -> Result<Vec<PathBuf>, Error> {
    check_absent(files, force)?;
    fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let mut written = Vec::with_capacity(files.len());
    for file in files {
        let mode = if file.secret { KEY_MODE } else { CERT_MODE };
        if force {
            replace(&file.path, file.contents.as_bytes(), mode)?;
        } else {
            create_new(&file.path, file.contents.as_bytes(), mode).map_err(|e| {
                if e.kind() == io::ErrorKind::AlreadyExists {
                    Error::Exists {
                        path: file.path.clone(),
                    }
                } else {
                    Error::io(&file.path, e)
                }
            })?;
        }
        written.push(file.path.clone());
    }
    Ok(written)
}

fn create_new(path: &Path, contents: &[u8], mode: u32) -> io::Result<()> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)?;
    file.write_all(contents)?;
    file.sync_all()
}

/// Writes a fresh file beside `path` and renames it over `path`: the mode is the new file's
/// (truncating an old 0644 key file would keep 0644), and a reader sees the old or the new
/// contents, never half of them.
fn replace(path: &Path, contents: &[u8], mode: u32) -> Result<(), Error> {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    let tmp = path.with_file_name(format!(".{}", name.to_string_lossy()));
    match fs::remove_file(&tmp) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(Error::io(&tmp, e)),
        _ => {}
    }
    let result = create_new(&tmp, contents, mode)
        .map_err(|e| Error::io(&tmp, e))
        .and_then(|()| fs::rename(&tmp, path).map_err(|e| Error::io(path, e)));
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}
