//! vmm: the process under test ([`VmmProc`], its control socket, serial and heartbeats), and the
//! tests of a VM's own life: boot on 1 and 2 vCPUs, the control socket, clear errors for bad
//! flags, the dirty rate. Snapshot and restore are `snapshot`'s.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use vmm::api::replies::{Checksum, DirtyRate, StateNow, Status};
use vmm::api::Reply;

use crate::common::{kvm_or_skip, temp_path, TempFile};

pub const VMM: &str = env!("CARGO_BIN_EXE_vmm-fixture");

/// A vmm process, killed (by PID, ours) on drop; its serial log and control socket.
pub struct VmmProc {
    child: Child,
    pub serial: PathBuf,
    pub sock: PathBuf,
    stderr: PathBuf,
}

impl Drop for VmmProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        for p in [&self.serial, &self.sock, &self.stderr] {
            let _ = std::fs::remove_file(p);
        }
    }
}

impl VmmProc {
    /// Starts `vmm <args> --serial FILE --api-socket SOCK` and waits for the socket.
    pub fn start(args: &[&str]) -> VmmProc {
        VmmProc::start_in(None, args)
    }

    /// Like [`VmmProc::start`], inside network namespace `netns` when given.
    pub fn start_in(netns: Option<&str>, args: &[&str]) -> VmmProc {
        let prefix: Vec<&str> = match netns {
            None => vec![],
            Some(ns) => vec!["ip", "netns", "exec", ns],
        };
        VmmProc::start_wrapped(&prefix, args)
    }

    /// Like [`VmmProc::start`], with the vmm run by the command `prefix` (which must end by
    /// executing its arguments: the vmm path, then `args`).
    pub fn start_wrapped(prefix: &[&str], args: &[&str]) -> VmmProc {
        let serial = temp_path("serial");
        let sock = temp_path("sock");
        let stderr = temp_path("stderr");
        let mut cmd = match prefix.split_first() {
            None => Command::new(VMM),
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(VMM);
                c
            }
        };
        let child = cmd
            .args(tests::with_security(args))
            .arg("--serial")
            .arg(&serial)
            .arg("--api-socket")
            .arg(&sock)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr).expect("stderr file"))
            .spawn()
            .expect("start vmm");
        let mut p = VmmProc {
            child,
            serial,
            sock,
            stderr,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !p.sock.exists() {
            if let Ok(Some(st)) = p.child.try_wait() {
                panic!("vmm exited early ({st}): {}", p.stderr_text());
            }
            assert!(
                Instant::now() < deadline,
                "no control socket: {}",
                p.stderr_text()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        p
    }

    pub fn stderr_text(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    pub fn serial_text(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.serial).unwrap_or_default()).into_owned()
    }

    /// `vmm ctl --json <args>`, asserting success.
    pub fn ctl(&self, args: &[&str]) -> Reply {
        let r = ctl_raw(&self.sock, args);
        assert!(r.ok, "ctl {args:?}: {r:?}");
        r
    }

    /// `vmm ctl --json <args>`, asserting success, its body as `T`.
    pub fn ctl_as<T: DeserializeOwned>(&self, args: &[&str]) -> T {
        let r = self.ctl(args);
        r.body()
            .unwrap_or_else(|e| panic!("ctl {args:?}: {e}: {r:?}"))
    }

    /// `status` of a VM.
    pub fn status(&self) -> Status {
        self.ctl_as(&["status"])
    }

    /// `checksum`.
    pub fn checksum(&self) -> Checksum {
        self.ctl_as(&["checksum"])
    }

    /// Waits until a serial line satisfies `pred`, returning it.
    pub fn wait_line(&self, what: &str, timeout: Duration, pred: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let text = self.serial_text();
            // Complete lines only: the guest prints a byte at a time.
            let complete = &text[..text.rfind('\n').map_or(0, |i| i + 1)];
            if let Some(l) = complete.lines().find(|l| pred(l)) {
                return l.to_owned();
            }
            let tail: String = text.lines().rev().take(5).collect::<Vec<_>>().join(" | ");
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; serial tail: {tail}; stderr: {}",
                self.stderr_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for `n` more complete heartbeats after the current last one.
    pub fn heartbeats_after(&self, after_seq: Option<u64>, n: u64) -> Vec<Heartbeat> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let hbs: Vec<Heartbeat> = heartbeats(&self.serial_text())
                .into_iter()
                .filter(|h| after_seq.is_none_or(|s| h.seq > s))
                .collect();
            if hbs.len() as u64 >= n {
                return hbs;
            }
            assert!(
                Instant::now() < deadline,
                "only {} heartbeats after {after_seq:?}; stderr: {}",
                hbs.len(),
                self.stderr_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The vmm's process ID (for signals in tests).
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Waits for the process to end; returns its exit code.
    pub fn wait_exit(&mut self, timeout: Duration) -> i32 {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(st)) = self.child.try_wait() {
                return st.code().unwrap_or(-1);
            }
            assert!(
                Instant::now() < deadline,
                "vmm did not exit: {}",
                self.stderr_text()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// `vmm ctl --json <args>`: its reply, whatever it says.
pub fn ctl_raw(sock: &Path, args: &[&str]) -> Reply {
    let out = Command::new(VMM)
        .arg("ctl")
        .arg("--api-socket")
        .arg(sock)
        .arg("--json")
        .args(args)
        .output()
        .expect("run vmm ctl");
    serde_json::from_slice(&out.stdout).unwrap_or_else(|_| {
        panic!(
            "ctl {args:?}: no JSON reply: {} {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// One `HB seq=S t_us=T tick=A,B w=W simd=X` line.
#[derive(Debug, Clone, PartialEq)]
pub struct Heartbeat {
    pub seq: u64,
    pub t_us: u64,
    pub ticks: Vec<u64>,
    pub simd_ok: bool,
}

/// Every complete heartbeat line in `text`.
pub fn heartbeats(text: &str) -> Vec<Heartbeat> {
    let complete = match text.rfind('\n') {
        Some(i) => &text[..i],
        None => "",
    };
    complete
        .lines()
        .filter_map(|l| {
            let l = l.strip_prefix("HB ")?;
            let mut h = Heartbeat {
                seq: 0,
                t_us: 0,
                ticks: Vec::new(),
                simd_ok: false,
            };
            for kv in l.split(' ') {
                let (k, v) = kv.split_once('=')?;
                match k {
                    "seq" => h.seq = v.parse().ok()?,
                    "t_us" => h.t_us = v.parse().ok()?,
                    "tick" => {
                        h.ticks = v
                            .split(',')
                            .map(|t| t.parse().ok())
                            .collect::<Option<_>>()?
                    }
                    "simd" => h.simd_ok = v == "ok",
                    _ => {}
                }
            }
            Some(h)
        })
        .collect()
}

/// The `CK <hex>` checksum printed after `since` bytes of output.
pub fn checksum_line(p: &VmmProc, since: usize) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let text = p.serial_text();
        let text = &text[..text.rfind('\n').map_or(0, |i| i + 1)];
        if let Some(l) = text
            .get(since..)
            .unwrap_or("")
            .lines()
            .find(|l| l.starts_with("CK ") && l.contains(" pages="))
        {
            return l.split(' ').nth(1).unwrap_or("").to_owned();
        }
        assert!(
            Instant::now() < deadline,
            "no CK line; stderr: {}",
            p.stderr_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Boots our guest and checks it runs on every vCPU; returns the process.
pub fn boot_guest(vcpus: u32, mem: &str) -> VmmProc {
    boot_guest_in(None, vcpus, mem)
}

/// [`boot_guest`] inside a network namespace.
pub fn boot_guest_in(netns: Option<&str>, vcpus: u32, mem: &str) -> VmmProc {
    boot_guest_with(netns, vcpus, mem, &[])
}

/// [`boot_guest_in`] with more `vmm run` arguments (e.g. `--insecure`).
pub fn boot_guest_with(netns: Option<&str>, vcpus: u32, mem: &str, extra: &[&str]) -> VmmProc {
    let vcpus_s = vcpus.to_string();
    let mut args = vec![
        "run",
        "--mem",
        mem,
        "--vcpus",
        &vcpus_s,
        "--cmdline",
        "rate=2000 hot=50",
    ];
    args.extend_from_slice(extra);
    let p = VmmProc::start_in(netns, &args);
    let boot = p.wait_line("boot line", Duration::from_secs(30), |l| {
        l.starts_with("GUEST boot")
    });
    assert!(
        boot.contains(&format!("cpus={vcpus}/{vcpus}")),
        "not every vCPU came up: {boot}"
    );
    p.wait_line("READY", Duration::from_secs(60), |l| l.starts_with("READY"));
    let hbs = p.heartbeats_after(None, 5);
    let (first, last) = (&hbs[0], &hbs[hbs.len() - 1]);
    assert_eq!(last.ticks.len(), vcpus as usize);
    for c in 0..vcpus as usize {
        assert!(
            last.ticks[c] > first.ticks[c],
            "cpu{c} gets no timer interrupts: {hbs:?}"
        );
    }
    assert!(last.t_us > first.t_us);
    assert!(hbs.iter().all(|h| h.simd_ok), "SIMD check failed: {hbs:?}");
    p
}

#[test]
fn guest_boots_on_1_and_2_vcpus_and_powers_off() {
    if !kvm_or_skip("guest_boots_on_1_and_2_vcpus_and_powers_off") {
        return;
    }
    for vcpus in [1, 2] {
        let mut p = boot_guest(vcpus, "128M");
        // Serial input reaches the guest, and its i8042 reset ends the VM cleanly.
        p.ctl(&["serial-input", "x"]);
        p.wait_line("POWEROFF", Duration::from_secs(10), |l| l == "POWEROFF");
        assert_eq!(
            p.wait_exit(Duration::from_secs(10)),
            0,
            "{}",
            p.stderr_text()
        );
        assert!(p.serial_text().contains("RX 78"));
    }
}

#[test]
fn control_socket_is_private_and_answers_errors() {
    if !kvm_or_skip("control_socket_is_private_and_answers_errors") {
        return;
    }
    use std::io::{BufRead, Write};
    use std::os::unix::fs::PermissionsExt;
    let p = boot_guest(1, "64M");
    let mode = std::fs::metadata(&p.sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let mut s = std::os::unix::net::UnixStream::connect(&p.sock).unwrap();
    s.write_all(b"{\"cmd\":\"format_disk\"}\nnot json\n")
        .unwrap();
    let mut r = std::io::BufReader::new(s);
    for _ in 0..2 {
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        let v: Reply = serde_json::from_str(&line).unwrap();
        assert!(!v.ok);
        assert_eq!(v.error.unwrap().kind, "bad_request");
    }
    let st = p.status();
    assert_eq!(st.api_version, vmm::api::VERSION);
    assert_eq!(st.state, "running");
    let st: StateNow = p.ctl_as(&["pause"]);
    assert_eq!(st.state, "paused");
    let a = p.checksum().ram_checksum;
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(p.checksum().ram_checksum, a, "paused RAM changed");
    p.ctl(&["resume"]);
    p.ctl(&["shutdown"]);
}

/// After a restore or a migration: every vCPU gets timer ticks again (and none went back from
/// `before`), SSE/AVX state is intact in every heartbeat, and the guest took no exception.
pub fn check_vcpus_run_on(p: &VmmProc, hbs: &[Heartbeat], before: &Heartbeat, vcpus: usize) {
    let (first, last) = (&hbs[0], &hbs[hbs.len() - 1]);
    for c in 0..vcpus {
        assert!(first.ticks[c] >= before.ticks[c], "cpu{c} ticks went back");
        assert!(
            last.ticks[c] > first.ticks[c],
            "cpu{c}: no timer ticks since"
        );
    }
    assert!(hbs.iter().all(|h| h.simd_ok), "SSE/AVX state lost: {hbs:?}");
    let text = p.serial_text();
    assert!(!text.contains("EXC "), "guest exception: {text}");
}

pub fn vmm_fails(args: &[&str]) -> String {
    let out = Command::new(VMM)
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run vmm");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "vmm {args:?}: {err}");
    assert!(!err.contains("panicked"), "vmm {args:?} panicked: {err}");
    err
}

#[test]
fn missing_kernel_and_bad_flags_are_clear_errors() {
    let e = vmm_fails(&[
        "run",
        "--kernel",
        "/nonexistent/vmlinuz",
        "--serial",
        "/dev/null",
    ]);
    assert!(e.contains("/nonexistent/vmlinuz"), "{e}");
    let e = vmm_fails(&[
        "run",
        "--guest",
        "/nonexistent/guest.elf",
        "--serial",
        "/dev/null",
    ]);
    assert!(e.contains("/nonexistent/guest.elf"), "{e}");
    let e = vmm_fails(&["run", "--vcpus", "0", "--serial", "/dev/null"]);
    assert!(e.contains("vCPUs"), "{e}");
    let e = vmm_fails(&["run", "--mem", "lots"]);
    assert!(e.contains("512M"), "{e}");
    let e = vmm_fails(&["run", "--mem", "3M", "--serial", "/dev/null"]);
    assert!(e.contains("memory") || e.contains("2 MiB"), "{e}");
    let e = vmm_fails(&["restore", "--state", "/nonexistent/state"]);
    assert!(e.contains("--memory"), "{e}");
    let e = vmm_fails(&[
        "restore",
        "--state",
        "/nonexistent/state",
        "--memory",
        "/dev/null",
    ]);
    assert!(e.contains("/nonexistent/state"), "{e}");
    let e = vmm_fails(&["bogus-command"]);
    assert!(e.contains("bogus-command"), "{e}");
    // --api-socket at a path that holds a file: refused, and the file is not removed
    if std::path::Path::new("/dev/kvm").exists() {
        let f = TempFile(temp_path("not-a-socket"));
        std::fs::write(&f.0, b"keep").unwrap();
        let e = vmm_fails(&[
            "run",
            "--mem",
            "64M",
            "--api-socket",
            f.0.to_str().unwrap(),
            "--serial",
            "/dev/null",
        ]);
        assert!(e.contains("not a socket"), "{e}");
        assert_eq!(std::fs::read(&f.0).unwrap(), b"keep");
    }
    // A file that is not a PVH ELF.
    let notelf = TempFile(temp_path("notelf"));
    std::fs::write(&notelf.0, b"\x7fELF not really").unwrap();
    if std::path::Path::new("/dev/kvm").exists() {
        let e = vmm_fails(&[
            "run",
            "--guest",
            notelf.0.to_str().unwrap(),
            "--serial",
            "/dev/null",
        ]);
        assert!(e.contains("cannot load"), "{e}");
    }
}

#[test]
fn dirty_rate_follows_the_guest_writes() {
    if !kvm_or_skip("dirty_rate_follows_the_guest_writes") {
        return;
    }
    // the workload writes 2000 random pages/s over half of its memory (~61 000 pages): in
    // 500 ms ~1000 distinct pages, plus a few the kernel writes
    let p = boot_guest(2, "256M");
    let r: DirtyRate = p.ctl_as(&["dirty-rate", "--ms", "500"]);
    assert_eq!(r.backend, "kvm");
    assert_eq!(r.total_pages, 65536);
    assert!((1500.0..3000.0).contains(&r.pages_per_s), "{r:?}");
    // userfaultfd write protection, synchronous and asynchronous, sees the same writes (where
    // the kernel has it)
    let backends = [
        ("uffd-wp", vmm::dirty::uffd_wp::UffdWp::available()),
        (
            "uffd-wp-async",
            vmm::dirty::uffd_wp::UffdWpAsync::available(),
        ),
    ];
    for (backend, avail) in backends {
        if let Err(e) = avail {
            crate::common::skip(format_args!(
                "dirty_rate_follows_the_guest_writes ({backend}): {e}"
            ));
            continue;
        }
        let r: DirtyRate = p.ctl_as(&["dirty-rate", "--ms", "500", "--backend", backend]);
        assert_eq!(r.backend, backend);
        assert!((1500.0..3000.0).contains(&r.pages_per_s), "{r:?}");
    }
    // writes stopped: only the guest kernel's own few pages (stacks, heartbeat, kvmclock)
    let since = p.serial_text().len();
    p.ctl(&["serial-input", "q"]);
    checksum_line(&p, since);
    let r: DirtyRate = p.ctl_as(&["dirty-rate", "--ms", "500"]);
    assert!(r.dirty_pages < 100, "{r:?}");
    // dirty logging is off again and the guest runs on
    let last = heartbeats(&p.serial_text()).pop().unwrap();
    p.heartbeats_after(Some(last.seq), 5);
    p.ctl(&["shutdown"]);
}
