//! vm-migrate's arguments and its row of figures, and one measured migration with each VMM:
//! ours ([`run_ours`]) and QEMU ([`run_qemu`]). The size runs (`vm-migrate`) and `--modes`
//! both use them.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Parser;
use serde::Serialize;
use serde_json::Value;
use vmm::api::replies::MigrationReport;

use bench::{guest, hb, ours, qemu};

/// Post-copy live migration of our guest over loopback: our vmm vs QEMU, same guest and size.
///
/// Writes a JSON list (one object per size) and prints a side-by-side table with the targets:
/// our downtime <= 5 ms at 1 GiB, our freeze <= 0.25 x QEMU's, our stall <= 0.5 x QEMU's, our
/// total <= 1.1 x the loopback limit and < QEMU's. A MISS is reported, never an error; the exit
/// code is 1 only when a migration could not be measured.
///
/// Downtime and total are each VMM's own figures. Freeze: the longest host-time gap between the
/// guest's heartbeat lines (every 10 ms; the source's serial then the destination's, merged),
/// from 1 s before the migration starts to its completion. Stall: the sum of (gap - 10 ms) from
/// start to completion. Limit: the guest's filled memory (all RAM above 16 MiB; the low 16 MiB
/// is counted as zero pages) over raw loopback TCP throughput measured in the same run. The
/// workdir keeps each run's logs and serial timelines (ours-serial.tsv, qemu-serial.tsv).
#[derive(Parser, Debug, Clone)]
#[command(name = "vm-migrate")]
pub(crate) struct Args {
    /// 1 GiB only, with a shorter run before the migration.
    #[arg(long)]
    pub(crate) quick: bool,
    /// Guest memory sizes in MiB.
    #[arg(long, value_delimiter = ',', default_value = "1024,4096")]
    pub(crate) sizes: Vec<u64>,
    /// vCPUs (both VMMs).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=16))]
    pub(crate) vcpus: u32,
    /// Guest writes, random 4 KiB pages per second (25600 = 100 MiB/s).
    #[arg(long, default_value_t = 25600)]
    pub(crate) rate: u64,
    /// Seconds the guest runs after its memory is filled, before the migration starts (>= 1:
    /// the freeze window begins 1 s before the start).
    #[arg(long, default_value_t = 3.0)]
    pub(crate) run_s: f64,
    /// Seconds allowed for one migration.
    #[arg(long, default_value_t = 300)]
    pub(crate) timeout_s: u64,
    /// JSON output.
    #[arg(long, default_value = "target/bench/migrate.json")]
    pub(crate) out: PathBuf,
    /// Sockets, logs, the guest ELF.
    #[arg(long, default_value = "target/bench/migrate")]
    pub(crate) workdir: PathBuf,
    /// Skip QEMU (its figures are null).
    #[arg(long)]
    pub(crate) no_qemu: bool,
    /// The QEMU binary or wrapper (scripts/fetch-qemu.sh makes the default).
    #[arg(long, default_value = "target/qemu/qemu-system-x86_64")]
    pub(crate) qemu: PathBuf,
    /// QEMU accelerator: `auto` tries KVM and falls back to TCG if the guest does not reach
    /// READY.
    #[arg(long, default_value = "auto", value_parser = ["auto", "kvm", "tcg"])]
    pub(crate) qemu_accel: String,
    /// Firmware for QEMU (qboot; SeaBIOS brings up one vCPU on PVM hosts).
    #[arg(long, default_value = "target/qemu/fw/qboot.rom")]
    pub(crate) qemu_bios: PathBuf,
    /// Skip our vmm (its figures are null).
    #[arg(long)]
    pub(crate) no_ours: bool,
    /// Our vmm binary (default: `vmm` next to this program).
    #[arg(long)]
    pub(crate) vmm: Option<PathBuf>,
    /// Before the measured runs, one migration of each size with each VMM that is not counted
    /// (one line, its downtimes, then forgotten). In the simulated host (QEMU TCG), the first
    /// migration after L1 boots runs L1 kernel code (KVM's get/set-state paths, device
    /// registration) that TCG has never translated: measured 2026-12-04, a throwaway 256 MiB
    /// move first took the first measured move from downtime 54-59 ms (pause 13-16, apply
    /// 26-38) to 29 ms (pause 8, apply 19). Without it the VMM that goes first pays for both.
    #[arg(long)]
    pub(crate) warm_up: bool,
    /// Compare migration modes instead (first size only): ours postcopy / hybrid / precopy,
    /// QEMU postcopy / precopy / precopy->postcopy; writes target/bench/migrate-modes.json.
    #[arg(long)]
    pub(crate) modes: bool,
    /// A Linux guest instead of ours: this bzImage (with --linux-initrd, the witness's
    /// initramfs from scripts/linux-guest.sh). Its heartbeats and memory check come from the
    /// witness; --rate is ignored (witness.rate= in --linux-cmdline).
    #[arg(long, requires = "linux_initrd")]
    pub(crate) linux_kernel: Option<PathBuf>,
    /// The Linux guest's initramfs.
    #[arg(long, requires = "linux_kernel")]
    pub(crate) linux_initrd: Option<PathBuf>,
    /// The Linux guest's command line.
    #[arg(
        long,
        default_value = "console=ttyS0 quiet witness.mib=300 witness.rate=2000 witness.hb=20"
    )]
    pub(crate) linux_cmdline: String,
    /// Migrations per VMM and size (one row each): how often each VMM moved the guest intact.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub(crate) repeat: u32,
    /// Skip the second migration of ours in plaintext (`--insecure`) that measures what TLS
    /// costs in the same run.
    #[arg(long)]
    pub(crate) no_plaintext: bool,
    #[arg(skip = String::from("postcopy"))]
    pub(crate) ours_mode: String,
    #[arg(skip = qemu::QemuMode::Postcopy)]
    pub(crate) qemu_mode: qemu::QemuMode,
}

impl Args {
    /// The guest both VMMs run.
    pub(crate) fn guest(&self) -> guest::Guest {
        match (&self.linux_kernel, &self.linux_initrd) {
            (Some(k), Some(i)) => guest::Guest::Linux {
                kernel: k.clone(),
                initrd: i.clone(),
                cmdline: self.linux_cmdline.clone(),
            },
            _ => guest::Guest::Ours { rate: self.rate },
        }
    }

    /// The guest for table headings.
    pub(crate) fn guest_name(&self) -> String {
        match self.guest() {
            guest::Guest::Ours { rate } => format!("guest writing {rate} pages/s"),
            guest::Guest::Linux { cmdline, .. } => format!("Linux guest ({cmdline})"),
        }
    }
}

/// One row of the JSON output: one memory size, both VMMs.
#[derive(Debug, Default, Serialize)]
pub(crate) struct Row {
    pub(crate) mem_mib: u64,
    pub(crate) vcpus: u32,
    pub(crate) rate_pages_s: u64,
    /// `ours` or `linux`.
    pub(crate) guest: String,
    /// Which of --repeat runs this is (from 1).
    pub(crate) run: u32,
    pub(crate) ours_downtime_ms: Option<f64>,
    pub(crate) qemu_downtime_ms: Option<f64>,
    pub(crate) ours_freeze_ms: Option<f64>,
    pub(crate) qemu_freeze_ms: Option<f64>,
    pub(crate) ours_stall_ms: Option<f64>,
    pub(crate) qemu_stall_ms: Option<f64>,
    pub(crate) ours_total_ms: Option<f64>,
    pub(crate) qemu_total_ms: Option<f64>,
    /// Guest non-zero memory / raw loopback TCP throughput.
    pub(crate) limit_total_ms: f64,
    /// What the limit assumes is non-zero: the guest's filled memory (`work_mib` of its boot
    /// line, all RAM above 16 MiB); the low 16 MiB is counted as zero.
    pub(crate) limit_bytes: u64,
    pub(crate) tcp_gbps: f64,
    /// Raw 4 KiB request/reply over loopback TCP, p50 (same run, threads unpinned).
    pub(crate) rtt_p50_us: f64,
    pub(crate) qemu_accel: Option<String>,
    /// Migration start (command sent) -> completion seen by the host.
    pub(crate) ours_host_total_ms: Option<f64>,
    pub(crate) qemu_host_total_ms: Option<f64>,
    pub(crate) ours_seq_continuous: Option<bool>,
    pub(crate) qemu_seq_continuous: Option<bool>,
    pub(crate) ours_heartbeats: Option<hb::HbFigures>,
    pub(crate) qemu_heartbeats: Option<hb::HbFigures>,
    pub(crate) ours_fault_p50_us: Option<f64>,
    pub(crate) ours_fault_p99_us: Option<f64>,
    pub(crate) ours_blocked_ms: Option<f64>,
    pub(crate) ours_pages: Option<OursPages>,
    pub(crate) ours_source_exit: Option<i32>,
    /// The destination guest's answer to the memory check (`CK ...` / `WITNESS VERDICT ...`).
    pub(crate) ours_checksum: Option<String>,
    /// Linux: the witness found every page intact on the destination.
    pub(crate) ours_memory_ok: Option<bool>,
    /// The whole reply of `vmm ctl migrate --json`.
    pub(crate) ours_report: Option<Value>,
    /// Its body, typed (not written: `ours_report` has it all).
    #[serde(skip)]
    pub(crate) ours_migration: Option<MigrationReport>,
    /// Source `STOP` event -> destination `RESUME` event (QMP events, host time): the
    /// switchover as the host saw it.
    pub(crate) qemu_host_downtime_ms: Option<f64>,
    /// Set when QEMU's own `downtime` is not its switchover (see the table note).
    pub(crate) qemu_downtime_note: Option<String>,
    pub(crate) qemu_blocktime_ms: Option<f64>,
    pub(crate) qemu_postcopy_requests: Option<u64>,
    pub(crate) qemu_transferred_bytes: Option<u64>,
    pub(crate) qemu_checksum: Option<String>,
    pub(crate) qemu_memory_ok: Option<bool>,
    /// Source `query-migrate` at completion.
    pub(crate) qemu_report: Option<Value>,
    pub(crate) ours_error: Option<String>,
    pub(crate) qemu_error: Option<String>,
    /// What protects ours (the figures above): TLS 1.3 with a pre-shared key.
    pub(crate) ours_security: String,
    /// The same migration of ours in plaintext (`--insecure`), same run: the cost of TLS.
    pub(crate) ours_plain_downtime_ms: Option<f64>,
    pub(crate) ours_plain_total_ms: Option<f64>,
    pub(crate) ours_plain_freeze_ms: Option<f64>,
    pub(crate) ours_plain_fault_p50_us: Option<f64>,
    pub(crate) ours_plain_error: Option<String>,
    /// PASS / MISS / n/a per target.
    pub(crate) targets: Vec<Target>,
}

/// Our migration's page and byte counts, from its report (null when the report has none: the
/// destination's pager figures are missing when the source learnt the outcome from its
/// page-servers). Fields in name order, as the JSON object they replace was written.
#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct OursPages {
    pub(crate) bytes_sent: Option<u64>,
    pub(crate) duplicate_pages: Option<u64>,
    pub(crate) fault_pages: Option<u64>,
    pub(crate) pages_total: Option<u64>,
    pub(crate) prefetch_pages: Option<u64>,
    pub(crate) state_bytes: Option<u64>,
    pub(crate) stream_pages: Option<u64>,
    pub(crate) zero_pages: Option<u64>,
}

impl OursPages {
    fn of(rep: &MigrationReport) -> OursPages {
        let pager = rep.destination.pager.as_ref();
        OursPages {
            bytes_sent: Some(rep.bytes_sent),
            duplicate_pages: pager.map(|p| p.duplicate_pages),
            fault_pages: pager.map(|p| p.fault_pages),
            pages_total: pager.map(|p| p.total_pages),
            prefetch_pages: pager.map(|p| p.prefetch_pages),
            state_bytes: Some(rep.state_bytes),
            stream_pages: pager.map(|p| p.stream_pages),
            zero_pages: pager.map(|p| p.zero_pages),
        }
    }
}

/// One target and how this run did.
#[derive(Debug, Serialize)]
pub(crate) struct Target {
    pub(crate) target: String,
    pub(crate) result: String,
}

pub(crate) fn ms(a: Instant, b: Instant) -> f64 {
    b.saturating_duration_since(a).as_secs_f64() * 1e3
}

pub(crate) fn work_bytes(boot_line: &str, mem_mib: u64) -> u64 {
    boot_line
        .split(' ')
        .find_map(|kv| kv.strip_prefix("work_mib="))
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(mem_mib.saturating_sub(16))
        << 20
}

/// Freeze, stall and "heartbeats go on" of one side's figures: freeze and stall only when the
/// guest was heard from after the migration started (a stopped guest has none, not 0).
pub(crate) fn hb_cells(
    mib: u64,
    side: &str,
    f: &hb::HbFigures,
) -> (Option<f64>, Option<f64>, Option<bool>) {
    if !f.ran_on() {
        progress(
            mib,
            side,
            "no heartbeat after the migration started: the guest stopped (freeze and stall not measured)",
        );
    }
    (
        f.ran_on().then_some(f.freeze_ms),
        f.ran_on().then_some(f.stall_ms),
        Some(f.seq_continuous && f.ran_on()),
    )
}

pub(crate) fn progress(mib: u64, side: &str, msg: &str) {
    eprintln!("[vm-migrate] {mib} MiB: {side}: {msg}");
}

/// Freeze / stall figures from both serial streams of one migration (source, then destination,
/// merged by host arrival time), with the timeline written to `timeline`.
pub(crate) fn heartbeat_figures(
    (src, dst): (Option<&hb::Follow>, Option<&hb::Follow>),
    (start, end): (Instant, Instant),
    timeline: &Path,
    period_ms: f64,
) -> Result<hb::HbFigures> {
    let (src, dst) = (src.context("serial")?, dst.context("serial")?);
    hb::write_timeline(timeline, src, dst, start)?;
    Ok(hb::figures(&hb::merged(src, dst), start, end, period_ms))
}

/// Linux: whether the witness found its memory intact (`None`: no answer, or our guest, whose
/// checksum has nothing to compare with here).
pub(crate) fn memory_ok(g: &guest::Guest, line: Option<&str>) -> Option<bool> {
    match g {
        guest::Guest::Ours { .. } => None,
        guest::Guest::Linux { .. } => line.map(|l| g.check_ok(l)),
    }
}

/// Ours once more, in plaintext, into the row's `ours_plain_*` figures.
pub(crate) fn run_ours_plain(
    a: &Args,
    vmm: &Path,
    mib: u64,
    dir: &Path,
    row: &mut Row,
) -> Result<()> {
    let dir = dir.join("plaintext");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut plain = Row::default();
    run_ours_as(a, vmm, mib, &dir, &mut plain, true)?;
    row.ours_plain_downtime_ms = plain.ours_downtime_ms;
    row.ours_plain_total_ms = plain.ours_total_ms;
    row.ours_plain_freeze_ms = plain.ours_freeze_ms;
    row.ours_plain_fault_p50_us = plain.ours_fault_p50_us;
    Ok(())
}

pub(crate) fn run_ours(a: &Args, vmm: &Path, mib: u64, dir: &Path, row: &mut Row) -> Result<()> {
    row.ours_security = "TLS 1.3, pre-shared key".into();
    run_ours_as(a, vmm, mib, dir, row, false)
}

fn run_ours_as(
    a: &Args,
    vmm: &Path,
    mib: u64,
    dir: &Path,
    row: &mut Row,
    insecure: bool,
) -> Result<()> {
    let side = if insecure { "ours plaintext" } else { "ours" };
    let c = ours::OursConfig {
        vmm: vmm.to_owned(),
        dir: dir.to_owned(),
        mem_mib: mib,
        vcpus: a.vcpus,
        guest: a.guest(),
        run_s: a.run_s,
        timeout: Duration::from_secs(a.timeout_s),
        mode: a.ours_mode.clone(),
        insecure,
    };
    let r = ours::migrate(&c, &|m| progress(mib, side, m))?;
    let (start, end) = (r.start.context("start")?, r.end.context("end")?);
    let f = heartbeat_figures(
        (r.src_serial.as_ref(), r.dst_serial.as_ref()),
        (start, end),
        &dir.join("ours-serial.tsv"),
        c.guest.hb_period_ms(),
    )?;
    let rep = &r.report;
    let pager = rep.destination.pager.as_ref();
    row.ours_downtime_ms = Some(rep.downtime_ms);
    row.ours_total_ms = Some(rep.total_ms);
    row.ours_host_total_ms = Some(ms(start, end));
    (
        row.ours_freeze_ms,
        row.ours_stall_ms,
        row.ours_seq_continuous,
    ) = hb_cells(mib, side, &f);
    row.ours_heartbeats = Some(f);
    row.ours_fault_p50_us = pager.map(|p| p.fault_latency.p50_us);
    row.ours_fault_p99_us = pager.map(|p| p.fault_latency.p99_us);
    row.ours_blocked_ms = pager.map(|p| p.blocked_ms);
    row.ours_pages = Some(OursPages::of(rep));
    row.ours_source_exit = r.source_exit;
    row.ours_memory_ok = memory_ok(&c.guest, r.checksum_line.as_deref());
    row.ours_checksum = r.checksum_line;
    row.ours_report = Some(serde_json::to_value(&r.reply)?);
    row.ours_migration = Some(r.report);
    if row.limit_bytes == 0 {
        row.limit_bytes = work_bytes(&r.boot_line, mib);
    }
    Ok(())
}

pub(crate) fn run_qemu(a: &Args, elf: &Path, mib: u64, dir: &Path, row: &mut Row) -> Result<()> {
    let c = qemu::QemuConfig {
        qemu: a.qemu.clone(),
        bios: a.qemu_bios.clone(),
        guest_elf: elf.to_owned(),
        guest: a.guest(),
        dir: dir.to_owned(),
        mem_mib: mib,
        vcpus: a.vcpus,
        run_s: a.run_s,
        timeout: Duration::from_secs(a.timeout_s),
        accel: a.qemu_accel.clone(),
        mode: a.qemu_mode,
    };
    let r = qemu::migrate(&c, &|m| progress(mib, "qemu", m))?;
    let (start, end) = (r.start.context("start")?, r.end.context("end")?);
    let f = heartbeat_figures(
        (r.src_serial.as_ref(), r.dst_serial.as_ref()),
        (start, end),
        &dir.join("qemu-serial.tsv"),
        c.guest.hb_period_ms(),
    )?;
    let info = &r.source_info;
    row.qemu_accel = Some(r.accel.clone());
    row.qemu_downtime_ms = info["downtime"].as_f64();
    row.qemu_total_ms = info["total-time"].as_f64();
    row.qemu_host_total_ms = Some(ms(start, end));
    (
        row.qemu_freeze_ms,
        row.qemu_stall_ms,
        row.qemu_seq_continuous,
    ) = hb_cells(mib, "qemu", &f);
    row.qemu_heartbeats = Some(f);
    row.qemu_host_downtime_ms = match (r.stop, r.resume) {
        (Some(s), Some(e)) => Some(ms(s, e)),
        _ => None,
    };
    // QEMU sets a post-copy downtime when the switchover package is sent, but keeps 0 as
    // "unset": a switchover under 1 ms is then overwritten at completion with the whole
    // post-copy phase.
    if let (Some(d), Some(t)) = (row.qemu_downtime_ms, row.qemu_total_ms) {
        if d >= 0.9 * t {
            row.qemu_downtime_note = Some(format!(
                "QEMU reported downtime {d} ms ~ its total time: its post-copy switchover took \
                 < 1 ms (source stop -> package sent), which QEMU stores as 0 = unset and then \
                 overwrites with source stop -> completion; see qemu_host_downtime_ms"
            ));
        }
    }
    row.qemu_blocktime_ms = r.dest_info["postcopy-blocktime"].as_f64();
    row.qemu_postcopy_requests = info["ram"]["postcopy-requests"].as_u64();
    row.qemu_transferred_bytes = info["ram"]["transferred"].as_u64();
    row.qemu_memory_ok = memory_ok(&c.guest, r.checksum_line.as_deref());
    row.qemu_checksum = r.checksum_line;
    row.qemu_report = Some(r.source_info.clone());
    if row.limit_bytes == 0 {
        row.limit_bytes = work_bytes(&r.boot_line, mib);
    }
    Ok(())
}
