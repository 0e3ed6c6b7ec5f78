//! `vmm ctl`: one request to a running VMM's control socket ([`crate::api`]), its progress
//! lines on stderr and its reply on stdout (a table for `migrate`, `--json` for the raw reply).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};

use super::parse::parse_u64;
use crate::api::{self, Request};

#[derive(Args, Debug)]
pub(super) struct CtlArgs {
    /// The vmm's control socket.
    #[arg(long)]
    api_socket: PathBuf,
    /// Print the raw JSON reply.
    #[arg(long)]
    json: bool,
    #[command(subcommand)]
    cmd: CtlCmd,
}

#[derive(Subcommand, Debug)]
enum CtlCmd {
    /// State, shape and timings.
    Status,
    /// Stop every vCPU.
    Pause,
    /// Run every vCPU.
    Resume,
    /// Pause and write state + memory (the VM stays paused).
    Snapshot {
        /// State file.
        #[arg(long)]
        state: PathBuf,
        /// Memory file.
        #[arg(long)]
        memory: PathBuf,
    },
    /// End the VM.
    Shutdown,
    /// Send text to the guest's serial input.
    SerialInput {
        /// The text.
        data: String,
    },
    /// Checksum of guest RAM (pause first for a stable value).
    Checksum,
    /// End the pre-copy passes of a running `migrate --mode hybrid` now and switch over.
    MigrateSwitchover,
    /// Write bytes into guest memory as a device's DMA would (debugging / test hook).
    WriteMemory {
        /// Guest-physical address (decimal or 0x hex).
        #[arg(long, value_parser = parse_u64)]
        gpa: u64,
        /// The bytes, as hex.
        #[arg(long)]
        hex: String,
    },
    /// Read guest memory (at most 64 KiB), printed as hex.
    ReadMemory {
        /// Guest-physical address (decimal or 0x hex).
        #[arg(long, value_parser = parse_u64)]
        gpa: u64,
        /// Bytes.
        #[arg(long)]
        len: usize,
    },
    /// How fast the guest writes its memory: KVM dirty logging on for --ms milliseconds;
    /// reports the pages written (each counted once) and the rate.
    DirtyRate {
        /// Measuring time in milliseconds (10 to 10000).
        #[arg(long, default_value_t = 1000)]
        ms: u64,
        /// `kvm` (KVM dirty log, the default) or `uffd-wp-async` (userfaultfd asynchronous
        /// write protection + PAGEMAP_SCAN, Linux >= 6.7).
        #[arg(long)]
        backend: Option<String>,
    },
    /// Live-migrate the VM to a `vmm --incoming` on another host: the VM pauses only while
    /// its non-memory state crosses, resumes there at once, and its memory follows (faults
    /// first, the rest streamed). Progress goes to stderr, the report to stdout; the source
    /// vmm exits 0 when the destination has every page.
    Migrate {
        /// Destination: `HOST:PORT`, `tcp:HOST:PORT` or a Unix socket path.
        #[arg(long)]
        to: String,
        /// `postcopy` (default): pause at once, memory follows. `hybrid`: copy memory while
        /// the VM runs (KVM dirty logging finds what it writes again, pass after pass), then
        /// pause and let post-copy bring the pages still dirty. `precopy`: the same passes,
        /// then the pages still dirty are copied while the VM is paused (no post-copy).
        #[arg(long, default_value = "postcopy")]
        mode: String,
        /// Hybrid / precopy: at most this many pre-copy passes (default 16).
        #[arg(long)]
        max_passes: Option<u32>,
        /// Hybrid / precopy: switch over once a pass leaves at most this many dirty pages
        /// (default 256).
        #[arg(long)]
        threshold_pages: Option<u64>,
        /// Hybrid / precopy: also switch over once the dirty pages could be sent within this
        /// many milliseconds at the rate the last pass sent.
        #[arg(long)]
        max_downtime_ms: Option<u64>,
        /// Hybrid / precopy: how writes are tracked, `kvm` (default) or `uffd-wp-async`.
        #[arg(long)]
        dirty_tracking: Option<String>,
        /// Report the checksum of guest RAM at the pause (`source_ram_checksum`), to compare
        /// with `vmm ctl checksum` on a destination started with --paused.
        #[arg(long)]
        verify: bool,
        /// Disks are not on shared storage: move them too, like memory — blocks the guest
        /// reads on the destination come on demand, the rest streams in the background. The
        /// destination writes a new image (its path through `--disk-map`, else the source's).
        #[arg(long)]
        copy_disk: bool,
        /// After the switch, how long to wait out a silent or broken link to the destination
        /// (its pagers reconnect on their own; their `Done` to our page-server also completes
        /// the migration) before giving up on knowing the outcome — the VM then stays paused
        /// here, its memory still served (default 120).
        #[arg(long)]
        recover_timeout_s: Option<u64>,
    },
}

pub(super) fn ctl(a: CtlArgs) -> Result<ExitCode> {
    let req = match a.cmd {
        CtlCmd::Status => Request::Status {},
        CtlCmd::Pause => Request::Pause {},
        CtlCmd::Resume => Request::Resume {},
        CtlCmd::Snapshot { state, memory } => Request::Snapshot {
            state: std::path::absolute(&state).unwrap_or(state),
            memory: std::path::absolute(&memory).unwrap_or(memory),
        },
        CtlCmd::Shutdown => Request::Shutdown {},
        CtlCmd::SerialInput { data } => Request::SerialInput { data },
        CtlCmd::Checksum => Request::Checksum {},
        CtlCmd::DirtyRate { ms, backend } => Request::DirtyRate { ms, backend },
        CtlCmd::Migrate {
            to,
            mode,
            verify,
            max_passes,
            threshold_pages,
            max_downtime_ms,
            dirty_tracking,
            copy_disk,
            recover_timeout_s,
        } => Request::Migrate {
            to,
            mode: Some(mode),
            verify,
            max_passes,
            threshold_pages,
            max_downtime_ms,
            dirty_tracking,
            copy_disk,
            recover_timeout_s,
        },
        CtlCmd::MigrateSwitchover => Request::MigrateSwitchover {},
        CtlCmd::WriteMemory { gpa, hex } => Request::WriteMemory { gpa, hex },
        CtlCmd::ReadMemory { gpa, len } => Request::ReadMemory { gpa, len },
    };
    let migrate = matches!(req, Request::Migrate { .. });
    let reply =
        api::client::request_with_progress(&a.api_socket, &req, Duration::from_secs(600), |p| {
            if let Ok(p) = p.body::<api::replies::Progress>() {
                crate::report::progress_line(&p)
            }
        })?;
    if migrate && reply.ok && !a.json {
        let report: api::replies::MigrationReport = reply
            .body()
            .context("the migration's report does not have the expected fields")?;
        crate::report::print_migration(&report);
    } else if a.json {
        println!("{}", serde_json::to_string(&reply)?);
    } else if let Some(e) = &reply.error {
        eprintln!("error ({}): {}", e.kind, e.message);
    } else {
        for (k, v) in &reply.fields {
            println!("{k}: {v}");
        }
    }
    Ok(if reply.ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
