//! Integration tests live in `integration/` (one binary, the areas that run on this host's
//! KVM) and `linux/` (the Linux guest in the simulated hardware-virt host, a binary of its own
//! so that cargo runs it alone: it keeps both CPUs busy). This library holds what both share.
//! The `page-server-fixture` binary is the real `page-server` program, built here so tests can
//! run it as a separate process (and kill it) without invoking cargo.

use std::io::Write;
use std::path::{Path, PathBuf};

/// Reports a skipped test: prints `SKIPPED: <test>: <reason>` (hidden by cargo's output capture)
/// and appends the same line to the file `$SKIP_LOG` names (default `target/test-skips.log` of
/// the workspace), which `.ci/run` prints, counts and checks against README's list of skips
/// expected on this kind of machine (`scripts/check-skips.sh`).
pub fn skip(line: impl std::fmt::Display) {
    let line = line.to_string();
    println!("SKIPPED: {line}");
    let path = std::env::var_os("SKIP_LOG")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/test-skips.log"));
    match std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
    {
        Ok(mut f) => {
            let _ = writeln!(f, "SKIPPED: {line}");
        }
        Err(e) => eprintln!("cannot record the skip in {}: {e}", path.display()),
    }
}
