//! Helpers of the unit tests.

/// A skip, where `.ci/run` sees it: printed and appended to `$SKIP_LOG` (default the
/// workspace's `target/test-skips.log`, which `scripts/check-skips.sh` checks).
pub(crate) fn skip(test: &str, why: &str) {
    use std::io::Write;
    let line = format!("SKIPPED: {test}: {why}");
    println!("{line}");
    let path = std::env::var_os("SKIP_LOG")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/test-skips.log")
        });
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
    {
        let _ = writeln!(f, "{line}");
    }
}
