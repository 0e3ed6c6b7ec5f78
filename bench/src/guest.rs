//! The guest both VMMs of `vm-migrate` run: our test guest (vmm's embedded one, a PVH ELF for
//! QEMU) or a Linux kernel + initramfs whose /init runs the witness (scripts/linux-guest.sh).
//! Each kind says how to boot it, which console lines mark boot and readiness, and how to ask it
//! to check its memory.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

/// What runs inside the VM.
#[derive(Debug, Clone)]
pub enum Guest {
    /// Our guest: its workload writes `rate` random pages per second; `q` on its serial prints
    /// a `CK` checksum line.
    Ours {
        /// Page writes per second.
        rate: u64,
    },
    /// Linux: the witness writes stamped pages, prints `WHB` heartbeats and, on `v`, verifies
    /// all of its memory (`WITNESS VERDICT ok|BAD`).
    Linux {
        /// bzImage.
        kernel: PathBuf,
        /// The witness's initramfs.
        initrd: PathBuf,
        /// Kernel command line (console, witness.mib=, witness.rate=, witness.hb=).
        cmdline: String,
    },
}

impl Guest {
    /// Arguments for `vmm run` (memory and vCPUs aside).
    pub fn vmm_args(&self) -> Vec<String> {
        match self {
            Guest::Ours { rate } => vec!["--cmdline".into(), format!("rate={rate} hot=100")],
            Guest::Linux {
                kernel,
                initrd,
                cmdline,
            } => vec![
                "--kernel".into(),
                kernel.display().to_string(),
                "--initrd".into(),
                initrd.display().to_string(),
                "--cmdline".into(),
                cmdline.clone(),
            ],
        }
    }

    /// Arguments for QEMU's `-kernel` (and `-initrd`) and `-append`; `elf` is our guest's PVH
    /// ELF (unused for Linux).
    pub fn qemu_args(&self, elf: &Path, vcpus: u32) -> Vec<OsString> {
        match self {
            Guest::Ours { rate } => vec![
                "-kernel".into(),
                elf.into(),
                "-append".into(),
                format!("cpus={vcpus} rate={rate} hot=100").into(),
            ],
            Guest::Linux {
                kernel,
                initrd,
                cmdline,
            } => vec![
                "-kernel".into(),
                kernel.into(),
                "-initrd".into(),
                initrd.into(),
                "-append".into(),
                cmdline.into(),
            ],
        }
    }

    /// The console line that says the guest booted (its text is the boot line kept in the
    /// report).
    pub fn boot_marker(&self) -> &'static str {
        match self {
            Guest::Ours { .. } => "GUEST boot",
            Guest::Linux { .. } => "L2 userspace up",
        }
    }

    /// The console line that says the workload runs over all of its memory.
    pub fn ready_marker(&self) -> &'static str {
        match self {
            Guest::Ours { .. } => "READY",
            Guest::Linux { .. } => "WITNESS READY",
        }
    }

    /// What to type on the guest's serial to have it check its memory.
    pub fn check_input(&self) -> &'static str {
        match self {
            Guest::Ours { .. } => "q",
            Guest::Linux { .. } => "v\n",
        }
    }

    /// The start of the line that answers [`Guest::check_input`].
    pub fn check_prefix(&self) -> &'static str {
        match self {
            Guest::Ours { .. } => "CK ",
            Guest::Linux { .. } => "WITNESS VERDICT",
        }
    }

    /// Seconds a boot may take until [`Guest::boot_marker`].
    pub fn boot_secs(&self) -> u64 {
        match self {
            Guest::Ours { .. } => 60,
            Guest::Linux { .. } => 180,
        }
    }

    /// Heartbeat period, ms (the witness's `witness.hb=`, 20 when not given).
    pub fn hb_period_ms(&self) -> f64 {
        match self {
            Guest::Ours { .. } => 10.0,
            Guest::Linux { cmdline, .. } => cmdline
                .split(' ')
                .find_map(|kv| kv.strip_prefix("witness.hb="))
                .and_then(|v| v.parse().ok())
                .unwrap_or(20.0),
        }
    }

    /// Whether a check line says the memory is intact (a checksum line always counts: the
    /// bench compares it with the source's own).
    pub fn check_ok(&self, line: &str) -> bool {
        match self {
            Guest::Ours { .. } => line.starts_with("CK "),
            Guest::Linux { .. } => line.trim_end() == "WITNESS VERDICT ok",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linux_guest_boots_with_kernel_initrd_and_its_heartbeat_period() {
        let g = Guest::Linux {
            kernel: "/l2/vmlinuz".into(),
            initrd: "/l2/initrd.gz".into(),
            cmdline: "console=ttyS0 witness.mib=300 witness.hb=20".into(),
        };
        assert_eq!(g.hb_period_ms(), 20.0);
        assert_eq!(
            g.vmm_args()[..4],
            ["--kernel", "/l2/vmlinuz", "--initrd", "/l2/initrd.gz"]
        );
        assert!(g.check_ok("WITNESS VERDICT ok\r"));
        assert!(!g.check_ok("WITNESS VERDICT BAD"));
        let o = Guest::Ours { rate: 5 };
        assert_eq!(o.vmm_args(), ["--cmdline", "rate=5 hot=100"]);
        assert_eq!(o.hb_period_ms(), 10.0);
    }
}
