//! Agent config loading (`relay_internal::AgentConfig::load`): the TOML text is written to a
//! temporary file (the loader takes a path) and loaded; it must return a config or errors,
//! never panic.
#![no_main]

use std::io::Write;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;

/// A temporary directory holding a development PKI (`ca.pem`, `dmz.pem`, `engine-1.pem`, ...),
/// so configs that name those files relative to themselves load all the way through.
fn dir() -> &'static std::path::Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = tempfile::tempdir().expect("temp dir");
        let opts = relay_certs::DevOptions {
            out: dir.path().to_owned(),
            ..Default::default()
        };
        relay_certs::write_dev_pki(&opts).expect("dev PKI");
        dir
    })
    .path()
}

fuzz_target!(|data: &[u8]| {
    let path = dir().join("internal.toml");
    let mut f = std::fs::File::create(&path).expect("create");
    f.write_all(data).expect("write");
    drop(f);
    let _ = relay_internal::AgentConfig::load(&path);
});
