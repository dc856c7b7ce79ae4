//! Programs the tests run that may be missing on a developer's machine: a test without one is
//! skipped with a `SKIPPED` line, except under CI (`CI=true`), where that is a failure.

use std::path::PathBuf;

/// `found`, or `None` after a `SKIPPED` line naming what is `missing` (and how to install it);
/// under CI a missing program fails `test`.
pub fn or_skip(test: &str, found: Option<PathBuf>, missing: &str) -> Option<PathBuf> {
    if found.is_none() {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "{test}: {missing}; CI must run this test"
        );
        println!("{test}: SKIPPED: {missing}");
        eprintln!("{test}: SKIPPED: {missing}");
    }
    found
}
