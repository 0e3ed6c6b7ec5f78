//! Helpers: feature gates, pattern images, the page-server fixture process, touch threads.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};

pub const PS: usize = 4096;

pub use tests::skip;

/// Whether userfaultfd works here; prints the SKIPPED line when not.
pub fn uffd_or_skip(test: &str) -> bool {
    match uffd::probe() {
        Ok(_) => true,
        Err(e) => {
            crate::common::skip(format_args!("{test}: userfaultfd unavailable: {e}"));
            false
        }
    }
}

/// Whether /dev/kvm works here; prints the SKIPPED line when not.
pub fn kvm_or_skip(test: &str) -> bool {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => true,
        Err(e) => {
            crate::common::skip(format_args!("{test}: /dev/kvm unavailable: {e}"));
            false
        }
    }
}

fn mix(mut x: u64) -> u64 {
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51afd7ed558ccd);
    x ^= x >> 33;
    x = x.wrapping_mul(0xc4ceb9fe1a85ec53);
    x ^ (x >> 33)
}

/// Whether page `i` of a pattern image is a zero page (~30 % are).
pub fn is_zero_page(i: u64) -> bool {
    mix(i ^ 0x5eed) % 10 < 3
}

/// Fills `buf` with page `i` of the pattern.
pub fn pattern_page(i: u64, buf: &mut [u8]) {
    if is_zero_page(i) {
        buf.fill(0);
        return;
    }
    for (w, chunk) in buf.chunks_exact_mut(8).enumerate() {
        chunk.copy_from_slice(&mix(i.wrapping_mul(1 << 20) + w as u64 + 1).to_le_bytes());
    }
}

/// A temporary file removed on drop.
pub struct TempFile(pub PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

static SEQ: AtomicU64 = AtomicU64::new(0);

/// A unique temporary path.
pub fn temp_path(tag: &str) -> PathBuf {
    std::env::temp_dir().join(format!(
        "uffd-tests-{}-{}-{tag}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ))
}

/// Writes a pattern image of `pages` pages.
pub fn pattern_image(pages: u64) -> TempFile {
    let path = temp_path("image");
    let f = std::fs::File::create(&path).expect("create image");
    let mut w = std::io::BufWriter::with_capacity(1 << 20, f);
    let mut page = vec![0u8; PS];
    for i in 0..pages {
        pattern_page(i, &mut page);
        w.write_all(&page).expect("write image");
    }
    w.flush().expect("flush image");
    TempFile(path)
}

/// Compares memory with the pattern; panics naming the first wrong page.
pub fn verify_pattern(mem: &[u8]) {
    let mut want = vec![0u8; PS];
    for (i, got) in mem.chunks_exact(PS).enumerate() {
        pattern_page(i as u64, &mut want);
        if got != &want[..] {
            let off = got.iter().zip(&want).position(|(a, b)| a != b).unwrap_or(0);
            panic!(
                "page {i} differs from the source at byte {off}: got {:#x}, want {:#x}",
                got[off], want[off]
            );
        }
    }
}

/// The page-server fixture process, killed on drop.
pub struct ServerProc {
    pub child: Child,
    pub addr: String,
}

impl Drop for ServerProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts the real page-server program on `listen`, waits until it listens.
pub fn spawn_server(image: &Path, listen: &str) -> ServerProc {
    spawn_server_logging(image, listen, None)
}

/// [`spawn_server`], with its log (RUST_LOG=info) written to `log` when given (else warnings
/// only, to the test's stderr).
pub fn spawn_server_logging(image: &Path, listen: &str, log: Option<&Path>) -> ServerProc {
    spawn_server_with(image, listen, log, &[])
}

/// [`spawn_server_logging`] with more arguments (e.g. `--insecure` for a test of the wire
/// format, whose clients write raw frames).
pub fn spawn_server_with(
    image: &Path,
    listen: &str,
    log: Option<&Path>,
    extra: &[&str],
) -> ServerProc {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_page-server-fixture"));
    let mut args = vec![
        "--serve",
        image.to_str().unwrap(),
        "--listen",
        listen,
        "--print-addr",
    ];
    args.extend_from_slice(extra);
    cmd.args(tests::with_security(&args)).stdout(Stdio::piped());
    match log {
        Some(path) => cmd
            .env("RUST_LOG", "info")
            .stderr(std::fs::File::create(path).expect("log file")),
        None => cmd.env("RUST_LOG", "warn"),
    };
    let mut child = cmd.spawn().expect("start page-server fixture");
    let out = child.stdout.take().expect("stdout");
    let mut line = String::new();
    BufReader::new(out)
        .read_line(&mut line)
        .expect("read listening line");
    let addr = line
        .trim()
        .strip_prefix("listening ")
        .unwrap_or_else(|| panic!("unexpected output {line:?}"))
        .to_string();
    ServerProc { child, addr }
}

/// Reads one byte of each page in `pages` from memory at `base` (faulting them in), checking
/// the first word against the pattern.
pub fn touch_pages(base: usize, pages: impl Iterator<Item = u64>) {
    let mut want = vec![0u8; PS];
    for p in pages {
        // SAFETY: `base` is a live mapping of at least (p + 1) pages; reading faults it in.
        let got = unsafe { std::ptr::read_volatile((base + p as usize * PS) as *const u64) };
        pattern_page(p, &mut want);
        let w = u64::from_le_bytes(want[..8].try_into().unwrap());
        assert_eq!(got, w, "page {p}: first word wrong");
    }
}

/// A small deterministic random sequence.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E3779B97F4A7C15);
        mix(self.0)
    }
}

/// Reads what a peer sent first (up to 64 KiB, waiting at most 5 s).
pub fn read_some(s: &mut std::net::TcpStream) -> Vec<u8> {
    use std::io::Read;
    let _ = s.set_read_timeout(Some(std::time::Duration::from_secs(5)));
    let mut v = vec![0u8; 64 << 10];
    let n = s.read(&mut v).unwrap_or(0);
    v.truncate(n);
    v
}

/// Pager defaults with the tests' pre-shared key (security on, as for users).
pub fn pager_cfg() -> pager::PagerConfig {
    pager::PagerConfig {
        security: tests::security(),
        ..pager::PagerConfig::default()
    }
}
