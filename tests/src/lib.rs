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

/// The pre-shared key every test node shares (tests run with security on, as users do).
pub const TEST_PSK: &str = "tests-0123456789abcdef0123456789abcdef0123456789abcdef";

/// The same key for in-process page-servers and pagers.
pub fn security() -> transport::Security {
    transport::Security::psk(TEST_PSK.as_bytes(), "the tests' pre-shared key")
        .expect("the test key is valid")
}

/// A file holding [`TEST_PSK`] (mode 0600, in the workspace's target directory), for the
/// programs the tests start: `--tls-psk-file` [`psk_file`].
pub fn psk_file() -> PathBuf {
    static FILE: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    FILE.get_or_init(|| {
        use std::os::unix::fs::OpenOptionsExt;
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target");
        let path = dir.join("test-psk");
        if std::fs::read(&path).is_ok_and(|b| b.trim_ascii() == TEST_PSK.as_bytes()) {
            return path;
        }
        // written beside and renamed: test processes running at once never see half a key
        let tmp = dir.join(format!("test-psk.{}", std::process::id()));
        let _ = std::fs::remove_file(&tmp);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .expect("create the test key file");
        f.write_all(TEST_PSK.as_bytes())
            .expect("write the test key");
        std::fs::rename(&tmp, &path).expect("rename the test key file");
        path
    })
    .clone()
}

/// `args` for a vmm or page-server the tests start, with the tests' pre-shared key added
/// where the program takes security flags, unless the test chose its own (`--insecure`,
/// `--tls-...`).
pub fn with_security(args: &[&str]) -> Vec<String> {
    let mut out: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    if args
        .iter()
        .any(|a| *a == "--insecure" || a.starts_with("--tls-"))
    {
        return out;
    }
    let takes = match args.first().copied() {
        Some("run" | "restore") => true,
        Some(a) => a == "--incoming" || a == "--serve" || args.contains(&"--incoming"),
        None => false,
    };
    if takes {
        out.push("--tls-psk-file".into());
        out.push(psk_file().display().to_string());
    }
    out
}
