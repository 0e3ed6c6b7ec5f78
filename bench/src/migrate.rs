//! `vm-migrate`: post-copy live migration of our test guest over loopback, with our vmm and with
//! QEMU on the same guest ELF, memory size and vCPUs, measured the same way; prints a table per
//! size with the targets and writes JSON (one row per size).
//!
//! Per VMM and size: boot the guest (its workload writing `--rate` random pages/s over all of
//! its filled memory), let it run, start the migration, wait for the VMM to report it complete,
//! then ask the destination guest for its checksum. Figures: the VMM's own downtime and total
//! time; from the guest's heartbeats (every 10 ms, source then destination serial merged in host
//! time) the longest gap ("freeze") and the time lost to gaps ("stall"); and a limit: the
//! guest's non-zero memory over raw loopback TCP throughput measured in the same run.

mod guest;
mod hb;
// The raw loopback TCP throughput of the fault-latency benchmark (and what it needs).
#[allow(dead_code)]
mod image;
#[allow(dead_code)]
mod measure;
mod modes;
mod ours;
mod qemu;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use serde::Serialize;
use serde_json::Value;

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
struct Args {
    /// 1 GiB only, with a shorter run before the migration.
    #[arg(long)]
    quick: bool,
    /// Guest memory sizes in MiB.
    #[arg(long, value_delimiter = ',', default_value = "1024,4096")]
    sizes: Vec<u64>,
    /// vCPUs (both VMMs).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=16))]
    vcpus: u32,
    /// Guest writes, random 4 KiB pages per second (25600 = 100 MiB/s).
    #[arg(long, default_value_t = 25600)]
    rate: u64,
    /// Seconds the guest runs after its memory is filled, before the migration starts (>= 1:
    /// the freeze window begins 1 s before the start).
    #[arg(long, default_value_t = 3.0)]
    run_s: f64,
    /// Seconds allowed for one migration.
    #[arg(long, default_value_t = 300)]
    timeout_s: u64,
    /// JSON output.
    #[arg(long, default_value = "target/bench/migrate.json")]
    out: PathBuf,
    /// Sockets, logs, the guest ELF.
    #[arg(long, default_value = "target/bench/migrate")]
    workdir: PathBuf,
    /// Skip QEMU (its figures are null).
    #[arg(long)]
    no_qemu: bool,
    /// The QEMU binary or wrapper (scripts/fetch-qemu.sh makes the default).
    #[arg(long, default_value = "target/qemu/qemu-system-x86_64")]
    qemu: PathBuf,
    /// QEMU accelerator: `auto` tries KVM and falls back to TCG if the guest does not reach
    /// READY.
    #[arg(long, default_value = "auto", value_parser = ["auto", "kvm", "tcg"])]
    qemu_accel: String,
    /// Firmware for QEMU (qboot; SeaBIOS brings up one vCPU on PVM hosts).
    #[arg(long, default_value = "target/qemu/fw/qboot.rom")]
    qemu_bios: PathBuf,
    /// Skip our vmm (its figures are null).
    #[arg(long)]
    no_ours: bool,
    /// Our vmm binary (default: `vmm` next to this program).
    #[arg(long)]
    vmm: Option<PathBuf>,
    /// Before the measured runs, one migration of each size with each VMM that is not counted
    /// (one line, its downtimes, then forgotten). In the simulated host (QEMU TCG), the first
    /// migration after L1 boots runs L1 kernel code (KVM's get/set-state paths, device
    /// registration) that TCG has never translated: measured 2026-12-04, a throwaway 256 MiB
    /// move first took the first measured move from downtime 54-59 ms (pause 13-16, apply
    /// 26-38) to 29 ms (pause 8, apply 19). Without it the VMM that goes first pays for both.
    #[arg(long)]
    warm_up: bool,
    /// Compare migration modes instead (first size only): ours postcopy / hybrid / precopy,
    /// QEMU postcopy / precopy / precopy->postcopy; writes target/bench/migrate-modes.json.
    #[arg(long)]
    modes: bool,
    /// A Linux guest instead of ours: this bzImage (with --linux-initrd, the witness's
    /// initramfs from scripts/linux-guest.sh). Its heartbeats and memory check come from the
    /// witness; --rate is ignored (witness.rate= in --linux-cmdline).
    #[arg(long, requires = "linux_initrd")]
    linux_kernel: Option<PathBuf>,
    /// The Linux guest's initramfs.
    #[arg(long, requires = "linux_kernel")]
    linux_initrd: Option<PathBuf>,
    /// The Linux guest's command line.
    #[arg(
        long,
        default_value = "console=ttyS0 quiet witness.mib=300 witness.rate=2000 witness.hb=20"
    )]
    linux_cmdline: String,
    /// Migrations per VMM and size (one row each): how often each VMM moved the guest intact.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=100))]
    repeat: u32,
    #[arg(skip = String::from("postcopy"))]
    ours_mode: String,
    #[arg(skip = qemu::QemuMode::Postcopy)]
    qemu_mode: qemu::QemuMode,
}

impl Args {
    /// The guest both VMMs run.
    fn guest(&self) -> guest::Guest {
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
    fn guest_name(&self) -> String {
        match self.guest() {
            guest::Guest::Ours { rate } => format!("guest writing {rate} pages/s"),
            guest::Guest::Linux { cmdline, .. } => format!("Linux guest ({cmdline})"),
        }
    }
}

/// One row of the JSON output: one memory size, both VMMs.
#[derive(Debug, Default, Serialize)]
struct Row {
    mem_mib: u64,
    vcpus: u32,
    rate_pages_s: u64,
    /// `ours` or `linux`.
    guest: String,
    /// Which of --repeat runs this is (from 1).
    run: u32,
    ours_downtime_ms: Option<f64>,
    qemu_downtime_ms: Option<f64>,
    ours_freeze_ms: Option<f64>,
    qemu_freeze_ms: Option<f64>,
    ours_stall_ms: Option<f64>,
    qemu_stall_ms: Option<f64>,
    ours_total_ms: Option<f64>,
    qemu_total_ms: Option<f64>,
    /// Guest non-zero memory / raw loopback TCP throughput.
    limit_total_ms: f64,
    /// What the limit assumes is non-zero: the guest's filled memory (`work_mib` of its boot
    /// line, all RAM above 16 MiB); the low 16 MiB is counted as zero.
    limit_bytes: u64,
    tcp_gbps: f64,
    /// Raw 4 KiB request/reply over loopback TCP, p50 (same run, threads unpinned).
    rtt_p50_us: f64,
    qemu_accel: Option<String>,
    /// Migration start (command sent) -> completion seen by the host.
    ours_host_total_ms: Option<f64>,
    qemu_host_total_ms: Option<f64>,
    ours_seq_continuous: Option<bool>,
    qemu_seq_continuous: Option<bool>,
    ours_heartbeats: Option<hb::HbFigures>,
    qemu_heartbeats: Option<hb::HbFigures>,
    ours_fault_p50_us: Option<f64>,
    ours_fault_p99_us: Option<f64>,
    ours_blocked_ms: Option<f64>,
    ours_pages: Option<Value>,
    ours_source_exit: Option<i32>,
    /// The destination guest's answer to the memory check (`CK ...` / `WITNESS VERDICT ...`).
    ours_checksum: Option<String>,
    /// Linux: the witness found every page intact on the destination.
    ours_memory_ok: Option<bool>,
    /// The whole reply of `vmm ctl migrate --json`.
    ours_report: Option<Value>,
    /// Source `STOP` event -> destination `RESUME` event (QMP events, host time): the
    /// switchover as the host saw it.
    qemu_host_downtime_ms: Option<f64>,
    /// Set when QEMU's own `downtime` is not its switchover (see the table note).
    qemu_downtime_note: Option<String>,
    qemu_blocktime_ms: Option<f64>,
    qemu_postcopy_requests: Option<u64>,
    qemu_transferred_bytes: Option<u64>,
    qemu_checksum: Option<String>,
    qemu_memory_ok: Option<bool>,
    /// Source `query-migrate` at completion.
    qemu_report: Option<Value>,
    ours_error: Option<String>,
    qemu_error: Option<String>,
    /// PASS / MISS / n/a per target.
    targets: Vec<Target>,
}

/// One target and how this run did.
#[derive(Debug, Serialize)]
struct Target {
    target: String,
    result: String,
}

fn ms(a: Instant, b: Instant) -> f64 {
    b.saturating_duration_since(a).as_secs_f64() * 1e3
}

fn work_bytes(boot_line: &str, mem_mib: u64) -> u64 {
    boot_line
        .split(' ')
        .find_map(|kv| kv.strip_prefix("work_mib="))
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(mem_mib.saturating_sub(16))
        << 20
}

/// Freeze, stall and "heartbeats go on" of one side's figures: freeze and stall only when the
/// guest was heard from after the migration started (a stopped guest has none, not 0).
fn hb_cells(mib: u64, side: &str, f: &hb::HbFigures) -> (Option<f64>, Option<f64>, Option<bool>) {
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

fn progress(mib: u64, side: &str, msg: &str) {
    eprintln!("[vm-migrate] {mib} MiB: {side}: {msg}");
}

/// Freeze / stall figures from both serial streams of one migration (source, then destination,
/// merged by host arrival time), with the timeline written to `timeline`.
fn heartbeat_figures(
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
fn memory_ok(g: &guest::Guest, line: Option<&str>) -> Option<bool> {
    match g {
        guest::Guest::Ours { .. } => None,
        guest::Guest::Linux { .. } => line.map(|l| g.check_ok(l)),
    }
}

fn run_ours(a: &Args, vmm: &Path, mib: u64, dir: &Path, row: &mut Row) -> Result<()> {
    let c = ours::OursConfig {
        vmm: vmm.to_owned(),
        dir: dir.to_owned(),
        mem_mib: mib,
        vcpus: a.vcpus,
        guest: a.guest(),
        run_s: a.run_s,
        timeout: Duration::from_secs(a.timeout_s),
        mode: a.ours_mode.clone(),
    };
    let r = ours::migrate(&c, &|m| progress(mib, "ours", m))?;
    let (start, end) = (r.start.context("start")?, r.end.context("end")?);
    let f = heartbeat_figures(
        (r.src_serial.as_ref(), r.dst_serial.as_ref()),
        (start, end),
        &dir.join("ours-serial.tsv"),
        c.guest.hb_period_ms(),
    )?;
    let rep = &r.report;
    row.ours_downtime_ms = rep["downtime_ms"].as_f64();
    row.ours_total_ms = rep["total_ms"].as_f64();
    row.ours_host_total_ms = Some(ms(start, end));
    (
        row.ours_freeze_ms,
        row.ours_stall_ms,
        row.ours_seq_continuous,
    ) = hb_cells(mib, "ours", &f);
    row.ours_heartbeats = Some(f);
    row.ours_fault_p50_us = rep["fault_latency"]["p50_us"].as_f64();
    row.ours_fault_p99_us = rep["fault_latency"]["p99_us"].as_f64();
    row.ours_blocked_ms = rep["blocked_ms"].as_f64();
    // The contract's names first, then the names the report may use instead.
    let pick = |names: &[&str]| {
        names
            .iter()
            .map(|k| &rep[*k])
            .find(|v| !v.is_null())
            .cloned()
    };
    let bytes_sent = pick(&["bytes_sent"]).or_else(|| {
        let parts = ["fault_bytes", "prefetch_bytes", "stream_bytes"].map(|k| rep[k].as_u64());
        parts
            .iter()
            .any(Option::is_some)
            .then(|| Value::from(parts.iter().flatten().sum::<u64>()))
    });
    let mut pages = serde_json::Map::new();
    for (key, names) in [
        ("pages_total", &["pages_total", "total_pages"][..]),
        ("fault_pages", &["fault_pages"]),
        ("prefetch_pages", &["prefetch_pages"]),
        ("stream_pages", &["stream_pages"]),
        ("zero_pages", &["zero_pages"]),
        ("duplicate_pages", &["duplicate_pages"]),
        ("state_bytes", &["state_bytes"]),
    ] {
        pages.insert(key.into(), pick(names).unwrap_or(Value::Null));
    }
    pages.insert("bytes_sent".into(), bytes_sent.unwrap_or(Value::Null));
    row.ours_pages = Some(Value::Object(pages));
    row.ours_source_exit = r.source_exit;
    row.ours_memory_ok = memory_ok(&c.guest, r.checksum_line.as_deref());
    row.ours_checksum = r.checksum_line;
    row.ours_report = Some(r.report.clone());
    if row.limit_bytes == 0 {
        row.limit_bytes = work_bytes(&r.boot_line, mib);
    }
    Ok(())
}

fn run_qemu(a: &Args, elf: &Path, mib: u64, dir: &Path, row: &mut Row) -> Result<()> {
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

fn verdict(ok: Option<bool>) -> String {
    match ok {
        Some(true) => "PASS".into(),
        Some(false) => "MISS".into(),
        None => "n/a".into(),
    }
}

fn judge(r: &mut Row) {
    let both = |x: Option<f64>, y: Option<f64>, f: &dyn Fn(f64, f64) -> bool| match (x, y) {
        (Some(x), Some(y)) => Some(f(x, y)),
        _ => None,
    };
    let limit = Some(r.limit_total_ms).filter(|l| *l > 0.0);
    let targets = [
        (
            "ours_downtime <= 5 ms (at 1 GiB)",
            if r.mem_mib <= 1024 {
                r.ours_downtime_ms.map(|d| d <= 5.0)
            } else {
                None
            },
        ),
        (
            "ours_freeze <= 0.25 x qemu_freeze",
            both(r.ours_freeze_ms, r.qemu_freeze_ms, &|o, q| o <= 0.25 * q),
        ),
        (
            "ours_stall <= 0.5 x qemu_stall",
            both(r.ours_stall_ms, r.qemu_stall_ms, &|o, q| o <= 0.5 * q),
        ),
        (
            "ours_total <= 1.1 x limit_total",
            both(r.ours_total_ms, limit, &|o, l| o <= 1.1 * l),
        ),
        (
            "ours_total < qemu_total",
            both(r.ours_total_ms, r.qemu_total_ms, &|o, q| o < q),
        ),
        (
            "ours_fault_p50 <= 2 x raw RTT p50",
            both(
                r.ours_fault_p50_us,
                Some(r.rtt_p50_us).filter(|v| v.is_finite() && *v > 0.0),
                &|o, t| o <= 2.0 * t,
            ),
        ),
    ];
    r.targets = targets
        .into_iter()
        .map(|(t, ok)| Target {
            target: t.to_owned(),
            result: verdict(ok),
        })
        .collect();
}

fn cell(v: Option<f64>) -> String {
    v.map(|v| format!("{v:.1}")).unwrap_or_else(|| "-".into())
}

fn flag(v: Option<bool>) -> String {
    match v {
        Some(true) => "yes".into(),
        Some(false) => "RESET".into(),
        None => "-".into(),
    }
}

fn print_row(r: &Row) {
    println!();
    println!(
        "== {} MiB, {} vCPUs, {}{}; QEMU accel: {} ==",
        r.mem_mib,
        r.vcpus,
        if r.guest == "linux" {
            "Linux guest (witness)".to_owned()
        } else {
            format!("guest writing {} pages/s", r.rate_pages_s)
        },
        if r.run > 1 {
            format!("; run {}", r.run)
        } else {
            String::new()
        },
        r.qemu_accel.as_deref().unwrap_or("-")
    );
    println!("{:<34} {:>12} {:>12}", "figure", "ours", "qemu");
    let intact = |ok: Option<bool>| match ok {
        Some(true) => "ok".to_owned(),
        Some(false) => "BAD".to_owned(),
        None => "-".to_owned(),
    };
    let lines: [(&str, String, String); 10] = [
        (
            "downtime ms (VMM's own)",
            cell(r.ours_downtime_ms),
            cell(r.qemu_downtime_ms),
        ),
        (
            "host: src STOP -> dst RESUME ms",
            "-".into(),
            cell(r.qemu_host_downtime_ms),
        ),
        (
            "freeze ms (longest HB gap)",
            cell(r.ours_freeze_ms),
            cell(r.qemu_freeze_ms),
        ),
        (
            "stall ms (sum of HB gap - period)",
            cell(r.ours_stall_ms),
            cell(r.qemu_stall_ms),
        ),
        (
            "total ms (VMM's own)",
            cell(r.ours_total_ms),
            cell(r.qemu_total_ms),
        ),
        (
            "host: start -> complete ms",
            cell(r.ours_host_total_ms),
            cell(r.qemu_host_total_ms),
        ),
        (
            "HB go on, seq continues (no reset)",
            flag(r.ours_seq_continuous),
            flag(r.qemu_seq_continuous),
        ),
        (
            "faults (pages / requests)",
            r.ours_pages
                .as_ref()
                .and_then(|p| p["fault_pages"].as_u64())
                .map_or("-".into(), |v| v.to_string()),
            r.qemu_postcopy_requests
                .map_or("-".into(), |v| v.to_string()),
        ),
        (
            "fault p50/p99 us | blocktime ms",
            match (r.ours_fault_p50_us, r.ours_fault_p99_us) {
                (Some(a), Some(b)) => format!("{a:.0}/{b:.0}"),
                _ => "-".into(),
            },
            cell(r.qemu_blocktime_ms),
        ),
        (
            "memory intact (Linux witness)",
            intact(r.ours_memory_ok),
            intact(r.qemu_memory_ok),
        ),
    ];
    for (k, o, q) in lines {
        println!("{k:<34} {o:>12} {q:>12}");
    }
    println!(
        "{:<34} {:>12.1}   ({} MiB non-zero at {:.1} Gbit/s raw loopback TCP)",
        "limit total ms",
        r.limit_total_ms,
        r.limit_bytes >> 20,
        r.tcp_gbps
    );
    println!(
        "{:<34} {:>12.0}",
        "raw loopback 4 KiB RTT p50 us", r.rtt_p50_us
    );
    for t in &r.targets {
        println!("  target {:<40} {}", t.target, t.result);
    }
    if let Some(n) = &r.qemu_downtime_note {
        println!("  note: {n}");
    }
    if let Some(e) = &r.ours_error {
        println!("  ours: ERROR: {e}");
    }
    if let Some(e) = &r.qemu_error {
        println!("  qemu: ERROR: {e}");
    }
}

fn one_size(a: &Args, vmm: &Path, qemu_ok: bool, elf: &Path, mib: u64, run: u32) -> Result<Row> {
    let dir = if run == 0 {
        a.workdir.join(format!("{mib}m-warm-up"))
    } else if a.repeat > 1 {
        a.workdir.join(format!("{mib}m-run{run}"))
    } else {
        a.workdir.join(format!("{mib}m"))
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let linux = matches!(a.guest(), guest::Guest::Linux { .. });
    let mut row = Row {
        mem_mib: mib,
        vcpus: a.vcpus,
        rate_pages_s: a.rate,
        guest: if linux { "linux" } else { "ours" }.into(),
        run,
        ..Default::default()
    };
    if a.no_ours {
        row.ours_error = Some("skipped (--no-ours)".into());
    } else if let Err(e) = run_ours(a, vmm, mib, &dir, &mut row) {
        progress(mib, "ours", &format!("FAILED: {e:#}"));
        row.ours_error = Some(format!("{e:#}"));
    }
    if !qemu_ok {
        row.qemu_error = Some("QEMU not run (--no-qemu or not available)".into());
    } else if let Err(e) = run_qemu(a, elf, mib, &dir, &mut row) {
        progress(mib, "qemu", &format!("FAILED: {e:#}"));
        row.qemu_error = Some(format!("{e:#}"));
    }
    if run == 0 {
        return Ok(row);
    }
    if linux {
        // Linux's boot line says nothing about its memory: what our source found non-zero
        // (the same guest and workload for both VMMs), else the witness's share.
        let p = row.ours_pages.clone().unwrap_or(Value::Null);
        row.limit_bytes = match (p["pages_total"].as_u64(), p["zero_pages"].as_u64()) {
            (Some(t), Some(z)) if t > z => (t - z) << 12,
            _ => mib.saturating_sub(64) << 20,
        };
    } else if row.limit_bytes == 0 {
        row.limit_bytes = mib.saturating_sub(16) << 20;
    }
    progress(
        mib,
        "limit",
        "measuring raw loopback TCP throughput and round trip",
    );
    row.tcp_gbps = measure::tcp_gbps(row.limit_bytes.max(256 << 20))?;
    row.limit_total_ms = row.limit_bytes as f64 * 8.0 / (row.tcp_gbps * 1e9) * 1e3;
    row.rtt_p50_us = measure::raw_rtt(2000, None)?.q_us(0.5);
    judge(&mut row);
    Ok(row)
}

/// --warm-up: one uncounted migration per VMM (run 0), reported in one line.
fn warm_up(a: &Args, vmm: &Path, qemu_ok: bool, elf: &Path, mib: u64) -> Result<()> {
    progress(mib, "warm-up", "one migration per VMM, not counted");
    let r = one_size(a, vmm, qemu_ok, elf, mib, 0)?;
    let said = |d: Option<f64>, e: &Option<String>| match (d, e) {
        (Some(d), _) => format!("downtime {d:.1} ms"),
        (None, Some(e)) => format!("failed: {e}"),
        (None, None) => "no figure".into(),
    };
    progress(
        mib,
        "warm-up",
        &format!(
            "done (not counted): ours {}; QEMU {}",
            said(r.ours_downtime_ms, &r.ours_error),
            said(r.qemu_downtime_ms, &r.qemu_error)
        ),
    );
    Ok(())
}

/// Over --repeat runs: per VMM, how many migrations were measured and (Linux) found every page
/// intact, and the median of the main figures.
fn print_tally(rows: &[Row]) {
    fn median(mut v: Vec<f64>) -> String {
        if v.is_empty() {
            return "-".into();
        }
        v.sort_by(f64::total_cmp);
        format!("{:.1}", v[v.len() / 2])
    }
    println!("\n== {} runs ==", rows.len());
    type Pick = fn(&Row) -> (Option<f64>, Option<f64>);
    let figures: [(&str, Pick); 5] = [
        ("downtime ms", |r| (r.ours_downtime_ms, r.qemu_downtime_ms)),
        ("freeze ms", |r| (r.ours_freeze_ms, r.qemu_freeze_ms)),
        ("stall ms", |r| (r.ours_stall_ms, r.qemu_stall_ms)),
        ("total ms", |r| (r.ours_total_ms, r.qemu_total_ms)),
        ("fault p50 us", |r| (r.ours_fault_p50_us, None)),
    ];
    for (side, err, ok) in [
        (
            "ours",
            rows.iter().filter(|r| r.ours_error.is_none()).count(),
            rows.iter()
                .filter(|r| r.ours_memory_ok == Some(true))
                .count(),
        ),
        (
            "qemu",
            rows.iter().filter(|r| r.qemu_error.is_none()).count(),
            rows.iter()
                .filter(|r| r.qemu_memory_ok == Some(true))
                .count(),
        ),
    ] {
        let mut line = format!(
            "{side}: {err}/{} migrations completed, {ok} with memory intact; median",
            rows.len()
        );
        for (name, pick) in &figures {
            let v: Vec<f64> = rows
                .iter()
                .filter_map(|r| if side == "ours" { pick(r).0 } else { pick(r).1 })
                .collect();
            line.push_str(&format!(" {name} {}", median(v)));
        }
        println!("{line}");
    }
}

/// The vmm next to this program (or `--vmm`).
fn vmm_path(a: &Args) -> Result<PathBuf> {
    let p = match &a.vmm {
        Some(p) => p.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("the directory of this program")?
            .join("vmm"),
    };
    if !p.exists() {
        bail!("{} not found (cargo build --release -p vmm)", p.display());
    }
    Ok(p)
}

fn qemu_available(a: &Args) -> bool {
    if a.no_qemu {
        return false;
    }
    let ok = Command::new(&a.qemu)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        eprintln!(
            "[vm-migrate] QEMU not available ({} does not run; scripts/fetch-qemu.sh makes it): \
             qemu_* figures will be null",
            a.qemu.display()
        );
    } else if !a.qemu_bios.exists() {
        eprintln!(
            "[vm-migrate] QEMU firmware {} missing (scripts/fetch-qemu.sh): qemu_* figures will \
             be null",
            a.qemu_bios.display()
        );
        return false;
    }
    ok
}

fn run() -> Result<bool> {
    let mut a = Args::parse();
    if a.quick {
        a.sizes = vec![1024];
        a.run_s = 1.5;
    }
    if a.run_s < 1.0 {
        bail!("--run-s must be at least 1 (the freeze window starts 1 s before migration)");
    }
    if a.sizes.is_empty() || a.sizes.iter().any(|&m| !(64..=65536).contains(&m)) {
        bail!("--sizes: each size must be 64..=65536 MiB");
    }
    std::fs::create_dir_all(&a.workdir)
        .with_context(|| format!("creating {}", a.workdir.display()))?;
    let vmm = vmm_path(&a)?;
    let qemu_ok = qemu_available(&a);
    let elf = a.workdir.join("guest.elf");
    if qemu_ok {
        let st = Command::new(&vmm)
            .arg("guest-elf")
            .arg("--out")
            .arg(&elf)
            .status()
            .context("vmm guest-elf")?;
        if !st.success() {
            bail!("vmm guest-elf --out {} failed: {st}", elf.display());
        }
    }
    if a.modes {
        return modes::run(&a, &vmm, qemu_ok, &elf);
    }
    let mut rows = Vec::new();
    for &mib in &a.sizes {
        if a.warm_up {
            warm_up(&a, &vmm, qemu_ok, &elf, mib)?;
        }
        for run in 1..=a.repeat {
            let row = one_size(&a, &vmm, qemu_ok, &elf, mib, run)?;
            print_row(&row);
            rows.push(row);
        }
    }
    if a.repeat > 1 {
        print_tally(&rows);
    }
    if let Some(d) = a.out.parent() {
        std::fs::create_dir_all(d)?;
    }
    std::fs::write(&a.out, serde_json::to_vec_pretty(&rows)?)
        .with_context(|| format!("writing {}", a.out.display()))?;
    println!("\nwrote {}", a.out.display());
    let measured = rows
        .iter()
        .all(|r| (a.no_ours || r.ours_error.is_none()) && (!qemu_ok || r.qemu_error.is_none()));
    Ok(measured)
}

fn main() -> ExitCode {
    page_server::cli::exit_quietly_on_broken_pipe();
    match run() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("[vm-migrate] some migrations could not be measured (see the rows above)");
            ExitCode::from(1)
        }
        Err(e) => {
            eprintln!("vm-migrate: error: {e:#}");
            ExitCode::from(1)
        }
    }
}
