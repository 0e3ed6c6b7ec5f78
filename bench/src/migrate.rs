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

// The raw loopback TCP throughput of the fault-latency benchmark (and what it needs).
mod modes;
mod runs;

use bench::{guest, measure};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use anyhow::{bail, Context, Result};
use clap::Parser;

use runs::{progress, run_ours, run_qemu, Args, Row, Target};

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
        (
            // within noise: a quarter, or 1 ms for the few-ms downtimes where that is noise
            "ours TLS downtime <= plaintext's x 1.25 (+1 ms)",
            both(r.ours_downtime_ms, r.ours_plain_downtime_ms, &|t, p| {
                t <= 1.25 * p + 1.0
            }),
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
                .and_then(|p| p.fault_pages)
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
    if r.ours_plain_downtime_ms.is_some() || r.ours_plain_error.is_some() {
        println!(
            "{:<34} {:>12}   (ours above: {}; plaintext: same migration with --insecure)",
            "ours PLAINTEXT downtime ms",
            cell(r.ours_plain_downtime_ms),
            r.ours_security
        );
        println!(
            "{:<34} {:>12}",
            "ours PLAINTEXT freeze ms",
            cell(r.ours_plain_freeze_ms)
        );
        println!(
            "{:<34} {:>12}",
            "ours PLAINTEXT total ms",
            cell(r.ours_plain_total_ms)
        );
        println!(
            "{:<34} {:>12}",
            "ours PLAINTEXT fault p50 us",
            cell(r.ours_plain_fault_p50_us)
        );
        if let Some(e) = &r.ours_plain_error {
            println!("  ours plaintext: ERROR: {e}");
        }
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
    if run != 0 && !a.no_ours && !a.no_plaintext && row.ours_error.is_none() {
        if let Err(e) = runs::run_ours_plain(a, vmm, mib, &dir, &mut row) {
            progress(mib, "ours plaintext", &format!("FAILED: {e:#}"));
            row.ours_plain_error = Some(format!("{e:#}"));
        }
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
        let p = row.ours_pages.clone().unwrap_or_default();
        row.limit_bytes = match (p.pages_total, p.zero_pages) {
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
