//! Linux boot through `vmm run --kernel` (early boot here; full boot where the host KVM runs
//! guest kernel code natively).
//!
//! The kernel is the Debian cloud kernel that `scripts/fetch-linux-kernel.sh` puts at
//! `target/linux/vmlinuz` (bzImage) and `target/linux/vmlinux` (the uncompressed ELF inside
//! it); where the file a test boots (or /dev/kvm) is missing the test prints `SKIPPED: ...`.
//! On hosts whose KVM emulates guest kernel code (nested setups without hardware
//! virtualization for the guest) the bzImage needs about 75 s just to decompress itself, so
//! the ACPI / SMP checks boot the vmlinux (ELF path), the bzImage test checks only the first
//! lines and waits generously, and the full-boot test runs only where our own guest measures
//! native kernel-mode speed.

use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::common::{kvm_or_skip, temp_path, TempFile};

const VMLINUZ: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../target/linux/vmlinuz");
const VMLINUX: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../target/linux/vmlinux");
/// bzImage early boot: the first kernel lines took ~90 s on an emulating host; three times that.
const BZIMAGE_EARLY_BOOT_TIMEOUT: Duration = Duration::from_secs(270);
/// vmlinux early boot up to the SMP line: ~25 s on an emulating host; generous for loaded hosts.
const ELF_EARLY_BOOT_TIMEOUT: Duration = Duration::from_secs(180);
/// Full boot where guest kernel code runs natively (it takes a few seconds there).
const FULL_BOOT_TIMEOUT: Duration = Duration::from_secs(60);
/// Our own guest prints its first line within milliseconds; generous for loaded hosts.
const PROBE_TIMEOUT: Duration = Duration::from_secs(30);
/// Below this kernel-mode speed (million instructions / s) the host emulates guest kernel mode.
const NATIVE_KMODE_MIPS: u64 = 100;

/// A vmm we started, killed (by its PID, through `Child`) and reaped on drop: also when an
/// assertion fails. Should the test process die without unwinding, the kernel kills the vmm
/// (parent-death signal).
struct VmmProc {
    child: Child,
    serial: TempFile,
    stderr: TempFile,
}

impl Drop for VmmProc {
    fn drop(&mut self) {
        // Unless it already exited (and was reaped): SIGKILL to its PID.
        if !matches!(self.child.try_wait(), Ok(Some(_))) {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

impl VmmProc {
    /// `vmm-fixture run --serial FILE ARGS...`, stderr to a file (quoted on failure).
    fn start(tag: &str, args: &[&str]) -> VmmProc {
        let serial = TempFile(temp_path(&format!("{tag}-serial")));
        let stderr = TempFile(temp_path(&format!("{tag}-stderr")));
        let err = File::create(&stderr.0).expect("create the vmm stderr file");
        let serial_arg = serial.0.to_str().expect("temp path is UTF-8").to_owned();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_vmm-fixture"));
        // SAFETY: the closure runs in the forked child before exec and only calls prctl(2),
        // which is async-signal-safe; it allocates nothing and touches no parent state.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == -1 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .arg("run")
            .args(args)
            .args(["--serial", &serial_arg])
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(err)
            .spawn()
            .expect("start vmm-fixture");
        VmmProc {
            child,
            serial,
            stderr,
        }
    }

    fn serial_log(&self) -> String {
        std::fs::read(&self.serial.0)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// The last lines of the serial log and of the vmm's stderr, for assertion messages.
    fn tails(&self) -> String {
        let stderr = std::fs::read(&self.stderr.0)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default();
        format!(
            "--- serial log (last 40 lines) ---\n{}\n--- vmm stderr (last 20 lines) ---\n{}",
            tail(&self.serial_log(), 40),
            tail(&stderr, 20)
        )
    }

    /// Polls the serial log until `done` says so, the vmm exits or `timeout` passes.
    fn wait_serial(
        &mut self,
        timeout: Duration,
        done: impl Fn(&str) -> bool,
    ) -> Result<(String, Duration), String> {
        let start = Instant::now();
        loop {
            let log = self.serial_log();
            if done(&log) {
                return Ok((log, start.elapsed()));
            }
            let exited: Option<ExitStatus> = self.child.try_wait().ok().flatten();
            if let Some(status) = exited {
                // One last look: output written just before the exit.
                let log = self.serial_log();
                if done(&log) {
                    return Ok((log, start.elapsed()));
                }
                return Err(format!(
                    "the vmm exited ({status}) after {:.1} s\n{}",
                    start.elapsed().as_secs_f64(),
                    self.tails()
                ));
            }
            if start.elapsed() > timeout {
                return Err(format!("timed out after {timeout:?}\n{}", self.tails()));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

fn tail(s: &str, lines: usize) -> String {
    let v: Vec<&str> = s.lines().collect();
    v[v.len().saturating_sub(lines)..].join("\n")
}

/// /dev/kvm and the fetched kernel file `path`, or the SKIPPED line.
fn kvm_and_kernel_or_skip(test: &str, path: &str) -> Option<PathBuf> {
    if !kvm_or_skip(test) {
        return None;
    }
    let kernel = Path::new(path);
    if !kernel.is_file() {
        crate::common::skip(format_args!(
            "{test}: no Linux kernel at {} (run scripts/fetch-linux-kernel.sh)",
            kernel.display()
        ));
        return None;
    }
    Some(kernel.to_path_buf())
}

/// The `BIOS-e820:` lines Linux prints for the map our VMM gives a VM of `mem_bytes`.
fn expected_e820_lines(mem_bytes: u64) -> Vec<String> {
    let ram = vmm::memory::GuestRam::new(mem_bytes).expect("map guest RAM for the expected map");
    vmm::arch::boot::memory_map(&ram)
        .into_iter()
        .map(|(addr, size, type_)| {
            let kind = match type_ {
                1 => "usable",
                2 => "reserved",
                other => panic!("unexpected e820 type {other} in our map"),
            };
            format!(
                "BIOS-e820: [mem {addr:#018x}-{:#018x}] {kind}",
                addr + size - 1
            )
        })
        .collect()
}

fn unique_token() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("t{}x{nanos:08x}", std::process::id())
}

/// Boots `kernel` with `vcpus` vCPUs and 512 MiB and a command line with a unique token; waits
/// until the serial log has `Linux version`, the command line and every line of `wanted`.
/// Returns the log, how long it took and the token.
fn early_boot(
    test: &str,
    kernel: &Path,
    vcpus: u32,
    wanted: &[String],
    timeout: Duration,
) -> (String, Duration, String, VmmProc) {
    let token = unique_token();
    let cmdline =
        format!("console=ttyS0 earlyprintk=serial,ttyS0,115200 loglevel=8 ufvmm.test={token}");
    let command_line = format!("Command line: {cmdline}");
    let vcpus = vcpus.to_string();
    let mut vmm = VmmProc::start(
        test,
        &[
            "--mem",
            "512M",
            "--vcpus",
            &vcpus,
            "--kernel",
            kernel.to_str().expect("kernel path is UTF-8"),
            "--cmdline",
            &cmdline,
        ],
    );
    let all: Vec<&str> = ["Linux version", command_line.as_str()]
        .into_iter()
        .chain(wanted.iter().map(String::as_str))
        .collect();
    let (log, took) = match vmm.wait_serial(timeout, |log| all.iter().all(|l| log.contains(l))) {
        Ok(r) => r,
        Err(why) => {
            let log = vmm.serial_log();
            let missing: Vec<&&str> = all.iter().filter(|l| !log.contains(**l)).collect();
            panic!("{test}: the kernel did not print {missing:?}: {why}");
        }
    };
    // Our token reached the kernel exactly as given.
    assert!(
        log.lines().any(|l| l.contains("Command line:")
            && l.trim_end().ends_with(&format!("ufvmm.test={token}"))),
        "{test}: no command line with ufvmm.test={token}\n{}",
        vmm.tails()
    );
    (log, took, token, vmm)
}

/// The uncompressed kernel (ELF path, no decompressor) with 2 vCPUs: the e820 map, and the
/// kernel finds our ACPI tables (RSDP at the address the zero page gives, XSDT, FADT, DSDT,
/// MADT) and takes the CPUs and the IOAPIC from the MADT.
#[test]
fn linux_elf_early_boot_finds_acpi_tables_and_two_cpus() {
    let test = "linux_elf_early_boot_finds_acpi_tables_and_two_cpus";
    let Some(kernel) = kvm_and_kernel_or_skip(test, VMLINUX) else {
        return;
    };
    let mut wanted = expected_e820_lines(512 << 20);
    wanted.extend([
        // acpi_tb_print_table_header(): each table, its address and our OEM id.
        format!(
            "ACPI: RSDP 0x{:016X} 000024 (v02 UFVMM )",
            vmm::arch::acpi::ACPI_START
        ),
        "ACPI: XSDT 0x".to_owned(),
        "ACPI: FACP 0x".to_owned(),
        "ACPI: DSDT 0x".to_owned(),
        "ACPI: APIC 0x".to_owned(),
        // The MADT parsed: its NMI entry, the IOAPIC (id = vCPU count), SMP from the MADT.
        "ACPI: LAPIC_NMI (acpi_id[0xff] dfl dfl lint[0x1])".to_owned(),
        "IOAPIC[0]: apic_id 2, version 17, address 0xfec00000, GSI 0-23".to_owned(),
        "ACPI: Using ACPI (MADT) for SMP configuration information".to_owned(),
        "smpboot: Allowing 2 CPUs, 0 hotplug CPUs".to_owned(),
    ]);
    let (log, took, _, vmm) = early_boot(test, &kernel, 2, &wanted, ELF_EARLY_BOOT_TIMEOUT);
    println!(
        "{test}: version, e820 map, command line, ACPI tables and 2 CPUs after {:.1} s; ACPI / SMP lines:\n{}",
        took.as_secs_f64(),
        log.lines()
            .filter(|l| l.contains("ACPI") || l.contains("smpboot") || l.contains("IOAPIC"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    // Every table the kernel lists carries our OEM id.
    for sig in ["XSDT", "FACP", "DSDT", "APIC"] {
        let line = log
            .lines()
            .find(|l| l.contains(&format!("ACPI: {sig} 0x")))
            .unwrap_or_default();
        assert!(
            line.contains("UFVMM "),
            "{test}: {sig} line without our OEM id: {line:?}\n{}",
            vmm.tails()
        );
    }
    // The usable RAM above 1 MiB is what memory_map() gives for 512M.
    assert!(
        log.contains("BIOS-e820: [mem 0x0000000000100000-0x000000001fffffff] usable"),
        "{test}: no usable range 1 MiB..512 MiB\n{}",
        vmm.tails()
    );
    drop(vmm); // kills it: it will not finish booting on an emulating host
}

/// The bzImage (setup header, 64-bit entry, the kernel's own decompressor): the first lines.
/// Slow where guest kernel code is emulated (about 75 s of decompression).
#[test]
fn linux_bzimage_early_boot_prints_version_and_cmdline() {
    let test = "linux_bzimage_early_boot_prints_version_and_cmdline";
    let Some(kernel) = kvm_and_kernel_or_skip(test, VMLINUZ) else {
        return;
    };
    let (_, took, token, vmm) = early_boot(test, &kernel, 1, &[], BZIMAGE_EARLY_BOOT_TIMEOUT);
    println!(
        "{test}: version and command line (ufvmm.test={token}) after {:.1} s",
        took.as_secs_f64()
    );
    drop(vmm);
}

/// Our own guest's `kmode_mips` (from its first line), or an error quoting its output.
fn kernel_mode_mips() -> Result<u64, String> {
    let mut probe = VmmProc::start("kmode-probe", &["--mem", "128M"]);
    let (log, _) = probe.wait_serial(PROBE_TIMEOUT, |log| {
        log.lines()
            .any(|l| l.starts_with("GUEST boot") && l.contains("kmode_mips="))
    })?;
    let line = log
        .lines()
        .find(|l| l.starts_with("GUEST boot"))
        .unwrap_or_default();
    line.split_whitespace()
        .find_map(|w| w.strip_prefix("kmode_mips="))
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| format!("no kmode_mips number in {line:?}"))
}

#[test]
fn linux_full_boot_where_kernel_mode_is_native() {
    let test = "linux_full_boot_where_kernel_mode_is_native";
    let Some(kernel) = kvm_and_kernel_or_skip(test, VMLINUZ) else {
        return;
    };
    let mips = kernel_mode_mips().unwrap_or_else(|e| panic!("{test}: the kmode probe failed: {e}"));
    if mips < NATIVE_KMODE_MIPS {
        crate::common::skip(format_args!(
            "{test}: host KVM emulates guest kernel mode (kmode_mips={mips})"
        ));
        return;
    }
    // No initrd and no disk: a complete boot ends in the root-fs panic (or runs an init).
    let late = [
        "Kernel panic - not syncing: VFS: Unable to mount root fs",
        "Run /init as init process",
        "Run /sbin/init as init process",
    ];
    let mut vmm = VmmProc::start(
        "linux-full",
        &[
            "--mem",
            "512M",
            "--vcpus",
            "2",
            "--kernel",
            kernel.to_str().expect("kernel path is UTF-8"),
            "--cmdline",
            "console=ttyS0 loglevel=8",
        ],
    );
    match vmm.wait_serial(FULL_BOOT_TIMEOUT, |log| {
        late.iter().any(|l| log.contains(l))
    }) {
        Ok((log, took)) => {
            // Both vCPUs came up through our MADT.
            assert!(
                log.contains("Brought up 1 node, 2 CPUs"),
                "{test}: the second vCPU did not come up"
            );
            let reached = late
                .iter()
                .find(|l| log.contains(*l))
                .copied()
                .unwrap_or("");
            println!(
                "{test}: kmode_mips={mips}; reached {reached:?} after {:.1} s",
                took.as_secs_f64()
            );
        }
        Err(why) => panic!("{test}: no late-boot line (one of {late:?}): {why}"),
    }
    drop(vmm);
}
