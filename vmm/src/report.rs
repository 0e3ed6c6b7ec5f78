//! Human-readable output of `vmm ctl migrate`: one progress line per report on stderr, and the
//! final report as a table on stdout.

use serde_json::{Map, Value};

fn num(m: &Map<String, Value>, k: &str) -> f64 {
    m.get(k).and_then(Value::as_f64).unwrap_or(0.0)
}

/// Prints one progress report (stderr).
pub fn progress_line(m: &Map<String, Value>) {
    match m.get("phase").and_then(Value::as_str) {
        Some("precopy") => eprintln!(
            "[migrate] pre-copy pass {}: {} pages sent, {} written again meanwhile, {:.1} s",
            num(m, "pass") as u64,
            num(m, "pages_sent") as u64,
            num(m, "pages_dirtied") as u64,
            num(m, "elapsed_ms") / 1e3
        ),
        Some("postcopy") => eprintln!(
            "[migrate] postcopy: {:5.1}% of pages present ({}/{}), {:7.1} MB/s, {:.1} s",
            num(m, "percent"),
            num(m, "pages_present") as u64,
            num(m, "pages_total") as u64,
            num(m, "mb_per_s"),
            num(m, "elapsed_ms") / 1e3
        ),
        Some(p) => eprintln!("[migrate] {p}"),
        None => {}
    }
}

/// Prints the final report of a migration (stdout).
pub fn print_migration(m: &Map<String, Value>) {
    let mib = |b: f64| b / (1 << 20) as f64;
    let lat = m.get("fault_latency").and_then(Value::as_object);
    let l = |k: &str| lat.map_or(0.0, |x| num(x, k));
    let page = 4096.0;
    println!(
        "migration complete: {} MiB, {} vCPUs -> {}",
        num(m, "mem_bytes") as u64 >> 20,
        num(m, "vcpus") as u64,
        m.get("to").and_then(Value::as_str).unwrap_or("?")
    );
    let rows: Vec<(&str, String)> = vec![
        (
            "downtime (source pause -> destination running)",
            format!("{:.2} ms", num(m, "downtime_ms")),
        ),
        (
            "  pause + save on the source",
            format!("{:.2} ms", num(m, "pause_ms")),
        ),
        ("  state", format!("{} bytes", num(m, "state_bytes") as u64)),
        (
            "  apply on the destination",
            format!("{:.2} ms", num(m, "apply_ms")),
        ),
        (
            "time to complete (destination depended on the source)",
            format!("{:.1} ms", num(m, "total_ms")),
        ),
        (
            "handshake (connect -> destination ready)",
            format!(
                "{:.1} ms (destination prepared in {:.1} ms)",
                num(m, "handshake_ms"),
                num(m, "prepare_ms")
            ),
        ),
        ("link round trip", format!("{:.0} us", num(m, "rtt_us"))),
        (
            "pages by origin: fault / prefetch / stream",
            format!(
                "{} / {} / {}",
                num(m, "fault_pages") as u64,
                num(m, "prefetch_pages") as u64,
                num(m, "stream_pages") as u64
            ),
        ),
        (
            "  zero pages (no payload)",
            format!("{}", num(m, "zero_pages") as u64),
        ),
        (
            "  bytes: fault / prefetch / stream",
            format!(
                "{:.1} / {:.1} / {:.1} MiB",
                mib(num(m, "fault_bytes")),
                mib(num(m, "prefetch_bytes")),
                mib(num(m, "stream_bytes"))
            ),
        ),
        (
            "  pages received twice",
            format!("{}", num(m, "duplicate_pages") as u64),
        ),
        (
            "vCPU faults on missing pages",
            format!(
                "{} (requests {})",
                l("count") as u64,
                num(m, "requests") as u64
            ),
        ),
        (
            "fault latency p50 / p90 / p99 / max",
            format!(
                "{:.0} / {:.0} / {:.0} / {:.0} us",
                l("p50_us"),
                l("p90_us"),
                l("p99_us"),
                l("max_us")
            ),
        ),
        (
            "vCPU time blocked on faults",
            format!("{:.1} ms", num(m, "blocked_ms")),
        ),
        ("reconnects", format!("{}", num(m, "reconnects") as u64)),
        (
            "average rate after switchover",
            format!(
                "{:.0} MB/s",
                num(m, "total_pages") * page / 1e6 / (num(m, "total_ms") / 1e3).max(1e-9)
            ),
        ),
    ];
    let mut rows = rows;
    if let Some(copies) = m.get("disk_copies").and_then(Value::as_array) {
        for c in copies {
            let p = c.get("pager").and_then(Value::as_object);
            let pn = |k: &str| p.map_or(0.0, |x| num(x, k));
            rows.push((
                "disk copied (--copy-disk)",
                format!(
                    "slot {}: {:.1} MiB in {:.1} ms (write-back {:.1} ms); faults {} / stream {} / zero {} pages",
                    c.get("slot").and_then(Value::as_u64).unwrap_or(0),
                    mib(c.get("bytes").and_then(Value::as_f64).unwrap_or(0.0)),
                    c.get("ms").and_then(Value::as_f64).unwrap_or(0.0),
                    c.get("write_back_ms").and_then(Value::as_f64).unwrap_or(0.0),
                    pn("fault_pages") as u64,
                    pn("stream_pages") as u64,
                    pn("zero_pages") as u64,
                ),
            ));
        }
        rows.push((
            "  disk bytes sent by the source",
            format!("{:.1} MiB", mib(num(m, "disk_bytes_sent"))),
        ));
    }
    if let Some(pc) = m.get("precopy").and_then(Value::as_object) {
        let passes = pc.get("passes").and_then(Value::as_array);
        let sent: f64 = passes.map_or(0.0, |v| {
            v.iter()
                .filter_map(|p| p.get("pages_sent").and_then(Value::as_f64))
                .sum()
        });
        rows.insert(
            0,
            (
                "pre-copy (VM running)",
                format!(
                    "{} passes, {} pages sent, {:.0} ms; stopped: {}",
                    passes.map_or(0, |v| v.len()),
                    sent as u64,
                    num(pc, "ms"),
                    pc.get("stop_reason").and_then(Value::as_str).unwrap_or("?")
                ),
            ),
        );
        rows.insert(
            1,
            (
                "  pages still dirty at the switchover",
                format!("{}", num(pc, "pages_dirty_at_switchover") as u64),
            ),
        );
    }
    if let Some(h) = m.get("fault_latency_log2_us").and_then(Value::as_array) {
        let cells: Vec<String> = h
            .iter()
            .filter_map(|b| {
                let b = b.as_array()?;
                Some(format!(
                    "<={}us:{}",
                    b.first()?.as_u64()?,
                    b.get(1)?.as_u64()?
                ))
            })
            .collect();
        rows.insert(13, ("fault latency histogram", cells.join(" ")));
    }
    let w = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    for (k, v) in rows {
        println!("  {k:<w$}  {v}");
    }
}
