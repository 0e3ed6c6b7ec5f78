//! What a VM is asked to be (fresh boot or restore, console, control socket) and how it ended.

use std::path::PathBuf;

use pager::PagerConfig;
use transport::Addr;

/// What a fresh VM boots.
#[derive(Debug, Clone)]
pub enum BootSource {
    /// A PVH ELF (`None`: our embedded guest).
    Guest {
        /// The ELF, or the embedded guest.
        elf: Option<PathBuf>,
        /// Command line (our guest: workload parameters).
        cmdline: String,
    },
    /// A Linux bzImage or vmlinux.
    Linux {
        /// Kernel image.
        kernel: PathBuf,
        /// Initial ramdisk.
        initrd: Option<PathBuf>,
        /// Kernel command line.
        cmdline: String,
    },
}

/// Where the console writes.
#[derive(Debug, Clone)]
pub enum SerialOut {
    /// This process's stdout (and stdin is forwarded as input).
    Stdout,
    /// A file (created / truncated).
    File(PathBuf),
}

/// A fresh VM.
#[derive(Debug, Clone)]
pub struct RunConfig {
    /// Guest RAM bytes.
    pub mem_bytes: u64,
    /// vCPUs.
    pub vcpus: u32,
    /// What to boot.
    pub boot: BootSource,
    /// virtio devices, in slot order.
    pub devices: Vec<crate::virtio::DeviceConfig>,
    /// Console output.
    pub serial: SerialOut,
    /// Control socket path.
    pub api_socket: Option<PathBuf>,
    /// How a migration away from this VM is authenticated and encrypted.
    pub security: transport::Security,
}

/// Where a restored VM's memory comes from.
#[derive(Debug, Clone)]
pub enum RestoreMemory {
    /// Read the whole memory file before resuming (eager).
    File(PathBuf),
    /// Page it in from a page-server after resuming (lazy).
    Remote(Addr, PagerConfig),
}

/// A VM from a snapshot.
#[derive(Debug, Clone)]
pub struct RestoreConfig {
    /// State file.
    pub state: PathBuf,
    /// Memory.
    pub memory: RestoreMemory,
    /// Console output.
    pub serial: SerialOut,
    /// Control socket path.
    pub api_socket: Option<PathBuf>,
    /// Leave the vCPUs paused after the restore.
    pub paused: bool,
    /// How a migration away from this VM is authenticated and encrypted (a lazy restore's
    /// pager has its own, in its [`PagerConfig`]).
    pub security: transport::Security,
}

/// How the VM ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exit {
    /// `shutdown` request or a signal.
    Shutdown,
    /// The guest reset / powered off.
    GuestReset,
    /// A vCPU could not go on.
    Fatal(String),
    /// Lazy restore lost its memory source for good: the VM is paused.
    SourceLost(String),
    /// The VM was migrated away (this was the source; its memory is freed).
    Migrated,
}

impl Exit {
    /// The process exit code (documented in README).
    pub fn code(&self) -> i32 {
        match self {
            Exit::Shutdown | Exit::GuestReset | Exit::Migrated => 0,
            Exit::Fatal(_) => 2,
            Exit::SourceLost(_) => 3,
        }
    }
}
