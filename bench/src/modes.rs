//! `vm-migrate --modes`: the same guest and workload migrated in every mode — ours post-copy,
//! hybrid and pre-copy, QEMU post-copy, pre-copy and pre-copy then post-copy — one size, one
//! run, one table: downtime, freeze, stall, total time, bytes sent and pages the destination
//! had to fetch on demand.

use std::path::Path;

use anyhow::{Context, Result};
use serde::Serialize;
use serde_json::Value;

use crate::runs::{progress, run_ours, run_qemu, Args, Row};
use bench::qemu::QemuMode;

#[derive(Debug, Default, Serialize)]
struct ModeRow {
    vmm: &'static str,
    mode: String,
    downtime_ms: Option<f64>,
    /// QEMU: source STOP -> destination RESUME events (its own figure is wrong in post-copy).
    host_downtime_ms: Option<f64>,
    freeze_ms: Option<f64>,
    stall_ms: Option<f64>,
    total_ms: Option<f64>,
    bytes_sent: Option<u64>,
    /// Pages the destination fetched on demand (ours: fault pages; QEMU: postcopy requests).
    remote_faults: Option<u64>,
    precopy_passes: Option<usize>,
    error: Option<String>,
}

fn cell(v: Option<f64>) -> String {
    v.map_or("-".into(), |x| format!("{x:.1}"))
}

pub(crate) fn run(a: &Args, vmm: &Path, qemu_ok: bool, elf: &Path) -> Result<bool> {
    let mib = a.sizes[0];
    let dir = a.workdir.join(format!("{mib}m-modes"));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut rows = Vec::new();
    for mode in ["postcopy", "hybrid", "precopy"] {
        let mut aa = a.clone();
        aa.ours_mode = mode.into();
        let mut row = Row::default();
        let r = run_ours(&aa, vmm, mib, &dir, &mut row);
        let rep = row.ours_migration.as_ref();
        rows.push(ModeRow {
            vmm: "ours",
            mode: mode.into(),
            downtime_ms: row.ours_downtime_ms,
            host_downtime_ms: None,
            freeze_ms: row.ours_freeze_ms,
            stall_ms: row.ours_stall_ms,
            total_ms: row.ours_total_ms,
            bytes_sent: rep.map(|r| r.bytes_sent),
            remote_faults: rep
                .and_then(|r| r.destination.pager.as_ref())
                .map(|p| p.fault_pages),
            precopy_passes: rep.and_then(|r| r.precopy.as_ref()).map(|p| p.passes.len()),
            error: r.err().map(|e| format!("{e:#}")),
        });
        progress(mib, "ours", &format!("{mode} done"));
    }
    if qemu_ok {
        for m in [
            QemuMode::Postcopy,
            QemuMode::Precopy,
            QemuMode::PrecopyThenPostcopy,
        ] {
            let mut aa = a.clone();
            aa.qemu_mode = m;
            let mut row = Row::default();
            let r = run_qemu(&aa, elf, mib, &dir, &mut row);
            let rep = row.qemu_report.clone().unwrap_or(Value::Null);
            rows.push(ModeRow {
                vmm: "qemu",
                mode: m.name().into(),
                downtime_ms: row.qemu_downtime_ms,
                host_downtime_ms: row.qemu_host_downtime_ms,
                freeze_ms: row.qemu_freeze_ms,
                stall_ms: row.qemu_stall_ms,
                total_ms: row.qemu_total_ms,
                bytes_sent: rep["ram"]["transferred"].as_u64(),
                remote_faults: row.qemu_postcopy_requests,
                precopy_passes: rep["ram"]["dirty-sync-count"].as_u64().map(|n| n as usize),
                error: r.err().map(|e| format!("{e:#}")),
            });
            progress(mib, "qemu", &format!("{} done", m.name()));
        }
    }
    println!(
        "\n== modes: {mib} MiB, {} vCPUs, {} ==",
        a.vcpus,
        a.guest_name()
    );
    println!(
        "{:<5} {:<18} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>8} {:>6}",
        "vmm",
        "mode",
        "down ms",
        "host ms",
        "freeze",
        "stall",
        "total ms",
        "MiB sent",
        "faults",
        "passes"
    );
    for r in &rows {
        println!(
            "{:<5} {:<18} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>8} {:>6}{}",
            r.vmm,
            r.mode,
            cell(r.downtime_ms),
            cell(r.host_downtime_ms),
            cell(r.freeze_ms),
            cell(r.stall_ms),
            cell(r.total_ms),
            cell(r.bytes_sent.map(|b| b as f64 / (1 << 20) as f64)),
            r.remote_faults.map_or("-".into(), |f| f.to_string()),
            r.precopy_passes.map_or("-".into(), |p| p.to_string()),
            r.error
                .as_ref()
                .map_or(String::new(), |e| format!("  FAILED: {e}"))
        );
    }
    // what each dirty-tracking backend costs the running guest (ours: its heartbeats count the
    // pages it wrote)
    let c = bench::ours::OursConfig {
        vmm: vmm.to_owned(),
        dir: dir.clone(),
        mem_mib: mib,
        vcpus: a.vcpus,
        guest: bench::guest::Guest::Ours { rate: 400_000 },
        run_s: a.run_s,
        timeout: std::time::Duration::from_secs(a.timeout_s),
        mode: "postcopy".into(),
        insecure: false,
    };
    let cost = if a.linux_kernel.is_some() {
        Vec::new()
    } else {
        bench::ours::tracking_cost(&c, &|m| progress(mib, "ours", m))
            .map_err(|e| progress(mib, "ours", &format!("tracking cost: {e:#}")))
            .unwrap_or_default()
    };
    if !cost.is_empty() {
        println!("\n== dirty tracking cost: guest asking 400 000 page writes/s, pages written per second ==");
        for (b, r) in &cost {
            println!("  {b:<14} {r:>10.0}");
        }
    }
    let out = a.out.with_file_name("migrate-modes.json");
    if let Some(d) = out.parent() {
        std::fs::create_dir_all(d)?;
    }
    let json = serde_json::json!({
        "modes": rows,
        "tracking_cost_pages_per_s": cost
            .iter()
            .map(|(b, r)| serde_json::json!({"backend": b, "guest_writes_per_s": r}))
            .collect::<Vec<_>>(),
    });
    std::fs::write(&out, serde_json::to_vec_pretty(&json)?)
        .with_context(|| format!("writing {}", out.display()))?;
    println!("\nwrote {}", out.display());
    Ok(rows.iter().all(|r| r.error.is_none()))
}
