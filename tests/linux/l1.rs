//! The Linux guest, for real: a stock Debian cloud kernel with the witness initramfs
//! (`scripts/linux-guest.sh`), under our vmm, inside the simulated hardware-virt host
//! (`scripts/hwvirt-host.sh`: QEMU TCG with SVM + nested paging, kvm-amd in it). This host's
//! own KVM (PVM kind) cannot run Linux's kernel code in useful time; L1 can.
//!
//! Each test runs one job of `tests/l1/` inside L1 and judges what comes back: the guest's
//! console (kernel log, `WHB` heartbeats with CLOCK_MONOTONIC, the witness's verdict over every
//! stamped page) and the migration replies. Needs the release binaries (`cargo build
//! --release`), QEMU 10 (`scripts/fetch-qemu.sh`) and the Debian kernel
//! (`scripts/fetch-linux-kernel.sh`); where one is missing the test is skipped with a
//! `SKIPPED:` line that names it (and `.ci/run` fails on skips README does not expect).

use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// What the simulated host needs, or the reason it cannot run here.
fn l1_ready(test: &str) -> bool {
    let r = root();
    let need = [
        (
            "target/qemu/qemu-system-x86_64",
            "run scripts/fetch-qemu.sh",
        ),
        ("target/linux/vmlinuz", "run scripts/fetch-linux-kernel.sh"),
        ("target/release/vmm", "run cargo build --release"),
        ("target/release/page-server", "run cargo build --release"),
    ];
    for (p, how) in need {
        if !r.join(p).exists() {
            tests::skip(format_args!("{test}: {p} is missing ({how})"));
            return false;
        }
    }
    true
}

/// The shape of the simulated host a job runs in.
///
/// With two L1 CPUs (two TCG threads emulating SVM with nested paging at once) the simulated
/// host triple-faulted, froze or corrupted the 2-vCPU Linux guest in most migration jobs of
/// 2026-12-03: unpinned, 5 of 6 post-copy tries reset; with both guest vCPUs pinned to one L1
/// CPU (`--vcpu-cpus 0`), 2 of 2 post-copy tries reset the destination, a precopy destination
/// never ran and a lazy restore took recursive #PFs on a per-CPU read (#DF, panic). QEMU's own
/// VMM in L1 loses its guests the same way (README, "Linux guests"). With one L1 CPU, post-copy
/// and lazy restore passed; booting passed with two (3 of 3). The guest keeps its 2 vCPUs.
#[derive(Clone, Copy)]
enum L1 {
    /// Two CPUs, as on the hosts the issue measured.
    TwoCpus,
    /// One CPU: no two TCG threads run guest code at once.
    OneCpu,
}

impl L1 {
    fn cpus(self) -> u32 {
        match self {
            L1::TwoCpus => 2,
            L1::OneCpu => 1,
        }
    }
}

/// The mark our vmm logs when a guest vCPU triple-faults or resets.
const GUEST_RESET: &str = "shutdown at rip=0xfff0";
/// The mark of a panicking Linux kernel.
const L1_PANIC: &str = "Kernel panic - not syncing";
/// The mark Linux logs when one of its CPUs did not get to schedule for over 20 s.
const SOFT_LOCKUP: &str = "watchdog: BUG: soft lockup";
/// The mark of a double fault in L1's own kernel. The CI run of 2026-12-05 (commit 68b7132)
/// saw L1 print it while running our vCPU thread, followed by "BUG: scheduling while atomic"
/// in L1 and a "Fatal exception in interrupt" panic of the L2 guest: the simulated host broke
/// under the guest, not our vmm.
const L1_DOUBLE_FAULT: &str = "PANIC: double fault";

/// Runs a job like [`run_l1_once`], up to three times while the simulated host itself is what
/// went wrong: a guest reset (triple fault), a soft lockup of a starved vCPU, a panic or a
/// double fault of L1's own kernel, or L1 freezing whole.
///
/// Under load, the simulated host (nested SVM under TCG) resets 2-vCPU Linux guests on its own:
/// measured here with no migration at all, for QEMU `-accel kvm` as for our vmm (README,
/// "Linux guests"). Nothing is hidden: each retry is printed with its reason and where the
/// failed try's files were kept (`TEST.tryN`), and a third such failure fails the test; any
/// other failure (a bad verdict, a missing device, an oops) fails it at once.
fn run_l1(test: &str, l1: L1, job: &str, args: &[&str], timeout_s: u32) -> (i32, PathBuf, String) {
    let mut tries = 1;
    loop {
        let r = run_l1_once(test, l1, job, args, timeout_s);
        let lost = simulator_lost(r.0, &r.1, &r.2);
        let Some(why) = lost.filter(|_| tries < 3) else {
            return r;
        };
        let kept = r.1.with_extension(format!("try{tries}"));
        let _ = std::fs::remove_dir_all(&kept);
        let _ = std::fs::rename(&r.1, &kept);
        println!("{test}: the simulated host lost the job ({why}); running it again (files of try {tries}: {})", kept.display());
        eprintln!("{test}: the simulated host lost the job ({why}); running it again");
        tries += 1;
    }
}

/// Why a job's try says more about the simulated host than about our vmm, if it does.
///
/// Exit status 124 means QEMU had to be ended from outside: L1 runs every job under its own
/// deadline (3/4 of `--timeout`, `scripts/hwvirt-host.sh`), and a job that merely hangs is
/// killed there and its files come back; when that deadline never fired, L1's kernel itself
/// had stopped running (the CI run of 2026-12-04 saw L1 go silent for 550 s after the guest
/// booted). L1's `L1 tick` lines date the freeze.
fn simulator_lost(rc: i32, dir: &Path, console: &str) -> Option<String> {
    if rc == 124 {
        let last = console
            .lines()
            .rev()
            .find(|l| l.starts_with("L1 tick"))
            .unwrap_or("no L1 tick at all");
        return Some(format!(
            "L1 froze: its own job deadline never fired; last pulse: {last}"
        ));
    }
    guest_was_reset(dir)
        .then(|| "a guest reset, a soft lockup, or a panic or double fault of L1".to_string())
}

/// Whether a log or console in `dir` shows a reset, a soft lockup, or an L1 panic or double
/// fault (the job may still have passed).
fn guest_was_reset(dir: &Path) -> bool {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .any(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            (name.ends_with(".log") || name.ends_with(".serial"))
                && std::fs::read_to_string(e.path()).is_ok_and(|s| {
                    s.contains(GUEST_RESET)
                            || s.contains(SOFT_LOCKUP)
                            // L1's own kernel (its console is serial.log; the guests' consoles
                            // are vmN.serial): the panics of README's "Linux guests"
                            || (name == "serial.log"
                                && (s.contains(L1_PANIC) || s.contains(L1_DOUBLE_FAULT)))
                })
        })
}

/// Runs `tests/l1/JOB ARGS` in L1; returns (exit status, results directory, console).
fn run_l1_once(
    test: &str,
    l1: L1,
    job: &str,
    args: &[&str],
    timeout_s: u32,
) -> (i32, PathBuf, String) {
    // one simulated host at a time: each keeps both CPUs busy (TCG)
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let out = root().join("target/hwvirt/tests").join(test);
    let _ = std::fs::remove_dir_all(&out);
    std::fs::create_dir_all(&out).unwrap();
    let status = Command::new(root().join("scripts/hwvirt-host.sh"))
        .arg("--quiet")
        .arg("--out")
        .arg(&out)
        .arg("--cpus")
        .arg(l1.cpus().to_string())
        .arg("--timeout")
        .arg(timeout_s.to_string())
        .arg("--file")
        .arg(format!(
            "{}:/l1lib.sh",
            root().join("tests/l1/lib.sh").display()
        ))
        .arg(root().join("tests/l1").join(job))
        .args(args)
        .status()
        .expect("running scripts/hwvirt-host.sh");
    let console = std::fs::read_to_string(out.join("serial.log")).unwrap_or_default();
    (status.code().unwrap_or(-1), out, console)
}

fn read(dir: &Path, f: &str) -> String {
    String::from_utf8_lossy(&std::fs::read(dir.join(f)).unwrap_or_default()).into_owned()
}

/// `key=value` of a line.
fn field(line: &str, key: &str) -> Option<u64> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('=')?.parse().ok())
}

/// CLOCK_MONOTONIC of each heartbeat on a console.
fn heartbeats(console: &str) -> Vec<u64> {
    console
        .lines()
        .filter(|l| l.starts_with("WHB "))
        .filter_map(|l| field(l, "mono_ns"))
        .collect()
}

/// The last 30 lines of L1's console, newest first (for a failure message).
fn console_tail(console: &str) -> String {
    console
        .lines()
        .rev()
        .take(30)
        .collect::<Vec<_>>()
        .join("\n")
}

/// Lines of the Linux kernel's log that mean something went wrong in the guest.
fn kernel_trouble(console: &str) -> Vec<&str> {
    console
        .lines()
        // allowed: the CPU-vulnerability advisory Linux prints for L1's emulated EPYC (no
        // SRSO microcode); it is a boot notice, not a kernel WARN
        .filter(|l| !l.contains("Speculative Return Stack Overflow"))
        .filter(|l| {
            [
                "Oops",
                "BUG:",
                "WARNING:",
                "Call Trace",
                "Kernel panic",
                "general protection",
            ]
            .iter()
            .any(|p| l.contains(p))
        })
        .collect()
}

/// The witness's last disk and stream lines on a console (`WITNESS DISK …`, `WITNESS NET …`)
/// and the peer's log: records were synced and all read back right, bytes went both ways and
/// all were right, the connection is up; the peer saw no wrong byte.
fn check_io(serial: &str, peer: &str) {
    let last = |p: &str| {
        serial
            .lines()
            .rev()
            .find(|l| l.starts_with(p))
            .map(str::trim)
    };
    let disk = last("WITNESS DISK log=").unwrap_or_else(|| panic!("no disk verdict:\n{serial}"));
    assert!(
        field(disk, "records").is_some_and(|n| n > 0) && field(disk, "bad") == Some(0),
        "the disk log is not right: {disk}"
    );
    let net = last("WITNESS NET sent=").unwrap_or_else(|| panic!("no stream verdict:\n{serial}"));
    assert!(
        field(net, "recv").is_some_and(|n| n > 0)
            && field(net, "bad") == Some(0)
            && net.contains("state=up"),
        "the TCP stream is not right: {net}"
    );
    assert!(
        peer.contains("PEER up") && !peer.contains("PEER BAD"),
        "the stream's peer in L1: {peer}"
    );
}

#[test]
fn linux_boots_to_user_space_in_the_simulated_host() {
    const T: &str = "linux_boots_to_user_space_in_the_simulated_host";
    if !l1_ready(T) {
        return;
    }
    let (rc, dir, console) = run_l1(T, L1::TwoCpus, "boot.sh", &[], 300);
    let serial = read(&dir, "vm0.serial");
    assert_eq!(
        rc, 0,
        "the boot job failed; L1 console:\n{console}\nguest:\n{serial}"
    );
    assert!(
        serial.contains("2 CPUs online"),
        "both vCPUs must be online:\n{serial}"
    );
    // the stock kernel finds our virtio-mmio devices through the DSDT (ACPI id LNRO0005)
    assert!(
        serial.contains("1 virtio disks, 1 NICs"),
        "the guest must see its virtio disk and NIC:\n{serial}"
    );
    let trouble = kernel_trouble(&serial);
    assert!(
        trouble.is_empty(),
        "the kernel log shows trouble: {trouble:?}"
    );
    // Linux's own virtio-blk and virtio-net drivers at work: ext4 mounted, a log of fsync'd
    // records read back from the disk, a TCP stream both ways through the bridge in L1
    assert!(
        serial.contains("L2 disk: /dev/vda (ext4) on /mnt") && serial.contains("L2 net: eth0"),
        "the guest must mount its disk and bring up its NIC:\n{serial}"
    );
    check_io(&serial, &read(&dir, "peer.log"));
    assert!(
        serial.contains("WITNESS VERDICT ok"),
        "the witness must find every page, its disk log and its stream right:\n{serial}"
    );
    let hb = heartbeats(&serial);
    assert!(hb.len() >= 10, "heartbeats: {}", hb.len());
    assert!(
        hb.windows(2).all(|w| w[1] > w[0]),
        "CLOCK_MONOTONIC went back"
    );
}

/// Judges a chain of moves left by `tests/l1/migrate.sh`.
/// `job_args` after MODE COUNT: `[MEM] [WITNESS_MIB] [RATE] [migrate args]` (`tests/l1/migrate.sh`).
fn check_moves(test: &str, mode: &str, moves: usize, job_args: &[&str]) {
    if !l1_ready(test) {
        return;
    }
    let n = moves.to_string();
    let mut args = vec![mode, n.as_str()];
    args.extend_from_slice(job_args);
    let (rc, dir, console) = run_l1(test, L1::OneCpu, "migrate.sh", &args, 900);
    let summary = read(&dir, "summary");
    assert_eq!(
        rc,
        0,
        "the migration job failed:\n{summary}\nL1 console (tail):\n{}",
        console_tail(&console)
    );
    let done: Vec<&str> = summary.lines().filter(|l| l.starts_with("MOVE")).collect();
    assert_eq!(done.len(), moves, "{summary}");
    for i in 1..=moves {
        let reply: vmm::api::Reply =
            serde_json::from_str(read(&dir, &format!("mig{i}.out")).trim())
                .unwrap_or_else(|e| panic!("move {i}: migrate reply is not JSON ({e})"));
        let report: vmm::api::replies::MigrationReport = reply
            .body()
            .unwrap_or_else(|e| panic!("move {i}: {e}: {reply:?}"));
        let downtime_ms = report.downtime_ms;
        let before = heartbeats(&read(&dir, &format!("vm{}.serial", i - 1)));
        let after = heartbeats(&read(&dir, &format!("vm{i}.serial")));
        let (Some(&last), Some(&first)) = (before.last(), after.first()) else {
            panic!(
                "move {i}: heartbeats before {} after {}",
                before.len(),
                after.len()
            );
        };
        assert!(
            first > last,
            "move {i}: CLOCK_MONOTONIC went back across the move"
        );
        // the heartbeat period is 20 ms; the guest is slow in L1 (everything runs under TCG),
        // so the bound is generous: the clock must not jump by seconds beyond the pause
        let jump_ms = (first - last) as f64 / 1e6;
        assert!(
            jump_ms <= downtime_ms + 2000.0,
            "move {i}: CLOCK_MONOTONIC jumped {jump_ms:.0} ms across a {downtime_ms:.1} ms pause"
        );
        assert!(
            after.len() >= 3,
            "move {i}: the guest must go on running on the destination"
        );
        let serial = read(&dir, &format!("vm{i}.serial"));
        let trouble = kernel_trouble(&serial);
        assert!(
            trouble.is_empty(),
            "move {i}: the kernel log shows trouble: {trouble:?}"
        );
        // the disk log and the TCP stream came through the move: records synced on the source
        // are read back on the destination, the connection is up and every byte was right
        check_io(&serial, &read(&dir, "peer.log"));
        println!(
            "{test}: move {i}: downtime {downtime_ms:.1} ms, pre-copy {} ms, all memory on the \
             destination after {} ms, clock jump {jump_ms:.0} ms",
            report.precopy.as_ref().map_or(0.0, |p| p.ms).round(),
            report
                .destination
                .pager
                .as_ref()
                .and_then(|p| p.time_to_complete_ms)
                .unwrap_or(f64::NAN)
                .round()
        );
    }
    for l in &done {
        assert!(
            l.contains("verdict=ok") && l.contains("source_exit=0"),
            "{l}"
        );
    }
}

#[test]
#[ignore = "passed 2 of 3 jobs in a one-CPU L1; the third left the destination's vCPU 0 in a soft lockup for 188 s (README, \"Linux guests\"); run with --ignored"]
fn linux_guest_migrates_postcopy_in_the_simulated_host() {
    check_moves(
        "linux_guest_migrates_postcopy_in_the_simulated_host",
        "postcopy",
        2,
        &[],
    );
}

#[test]
#[ignore = "pre-copy does not finish in a one-CPU L1 and two-CPU L1 loses guests (README, \"Linux guests\"); run with --ignored"]
fn linux_guest_migrates_hybrid_in_the_simulated_host() {
    check_moves(
        "linux_guest_migrates_hybrid_in_the_simulated_host",
        "hybrid",
        2,
        &[],
    );
}

#[test]
#[ignore = "one-CPU L1 hangs during pure pre-copy, two-CPU L1 loses the guest (README, \"Linux guests\"); run with --ignored"]
fn linux_guest_migrates_precopy_in_the_simulated_host() {
    check_moves(
        "linux_guest_migrates_precopy_in_the_simulated_host",
        "precopy",
        2,
        // pure pre-copy must converge while the guest writes: in an L1 of one TCG CPU the two
        // busy vCPUs leave the sender a third of it, so the witness rewrites 250 pages/s per
        // vCPU here (2000 in the other modes)
        &["512M", "300", "250"],
    );
}

#[test]
#[ignore = "passed 1 of 2 jobs: in the second the one-CPU L1 itself went idle and silent (README, \"Linux guests\"); run with --ignored"]
fn linux_guest_restores_lazily_in_the_simulated_host() {
    const T: &str = "linux_guest_restores_lazily_in_the_simulated_host";
    if !l1_ready(T) {
        return;
    }
    let (rc, dir, console) = run_l1(T, L1::OneCpu, "restore.sh", &[], 900);
    let summary = read(&dir, "summary");
    assert_eq!(
        rc,
        0,
        "the restore job failed:\n{summary}\nL1 console (tail):\n{}",
        console_tail(&console)
    );
    assert!(
        summary.contains("verdict=ok") && summary.contains("rc=running"),
        "{summary}"
    );
    let snap: vmm::api::Reply = serde_json::from_str(read(&dir, "snap.out").trim())
        .unwrap_or_else(|e| panic!("snapshot reply is not JSON ({e})"));
    if let Err(e) = snap.body::<vmm::api::replies::Snapshot>() {
        panic!("snapshot: {e}: {snap:?}");
    }
    let before = heartbeats(&read(&dir, "vm0.serial"));
    let serial = read(&dir, "vm1.serial");
    let after = heartbeats(&serial);
    let (Some(&last), Some(&first)) = (before.last(), after.first()) else {
        panic!("heartbeats before {} after {}", before.len(), after.len())
    };
    // kvmclock is held while the VM is saved: the guest's clock goes on from where it stopped
    assert!(first > last, "CLOCK_MONOTONIC went back across the restore");
    assert!(
        (first - last) as f64 / 1e6 <= 2000.0,
        "CLOCK_MONOTONIC jumped {} ms across the restore",
        (first - last) / 1_000_000
    );
    let trouble = kernel_trouble(&serial);
    assert!(
        trouble.is_empty(),
        "the kernel log shows trouble: {trouble:?}"
    );
    check_io(&serial, &read(&dir, "peer.log"));
    let log = read(&dir, "vm1.log");
    assert!(
        log.contains("all guest memory present"),
        "the restore must complete:\n{log}"
    );
    println!(
        "{T}: {}",
        log.lines()
            .find(|l| l.contains("restored"))
            .unwrap_or("(no restore line)")
    );
}

/// The source vmm is killed (SIGKILL) while the Linux guest runs post-copy on the destination
/// with most of its memory still on the source (no background stream), its disk log and TCP
/// stream going: the destination says so within seconds, keeps the guest paused for good
/// (no heartbeat, `resume` refused with the reason), answers `status` meanwhile, and ends with
/// exit code 3. (A device thread or vCPU waiting for a page that never comes cannot be stopped;
/// it used to hold the destination's controller, and `status`, for ever.)
#[test]
fn linux_source_killed_mid_postcopy_leaves_the_destination_paused() {
    const T: &str = "linux_source_killed_mid_postcopy_leaves_the_destination_paused";
    if !l1_ready(T) {
        return;
    }
    let (rc, dir, console) = run_l1(T, L1::TwoCpus, "killed.sh", &[], 300);
    let summary = read(&dir, "summary");
    let log = read(&dir, "vm1.log");
    assert_eq!(
        rc,
        0,
        "the job failed:\n{summary}\ndestination log:\n{log}\nthreads:\n{}\nL1 console (tail):\n{}",
        read(&dir, "threads.txt"),
        console_tail(&console)
    );
    let line = summary
        .lines()
        .find(|l| l.starts_with("KILLED"))
        .unwrap_or_else(|| panic!("no KILLED line:\n{summary}"));
    assert!(
        field(line, "reported_ms").is_some_and(|ms| ms < 20_000),
        "the loss must be reported within seconds: {line}"
    );
    assert!(line.contains("state=source_lost"), "{line}");
    assert!(field(line, "missing").is_some_and(|n| n > 0), "{line}");
    assert!(line.contains("hb_frozen=yes"), "the guest ran on: {line}");
    assert!(line.contains("resume_refused=yes"), "{line}");
    assert!(line.contains("exit=3"), "{line}");
    assert!(log.contains("memory source lost for good"), "{log}");
    println!("{T}: {line}");
}
