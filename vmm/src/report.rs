//! Human-readable output of `vmm ctl migrate`: one progress line per report on stderr, and the
//! final report as a table on stdout.

use crate::api::replies::{MigrationReport, Progress};

/// Prints one progress report (stderr).
pub fn progress_line(p: &Progress) {
    match p {
        Progress::Precopy {
            pass,
            pages_sent,
            pages_dirtied,
            elapsed_ms,
        } => eprintln!(
            "[migrate] pre-copy pass {pass}: {pages_sent} pages sent, {pages_dirtied} written again meanwhile, {:.1} s",
            elapsed_ms / 1e3
        ),
        Progress::Postcopy {
            pages_present,
            pages_total,
            percent,
            mb_per_s,
            elapsed_ms,
        } => eprintln!(
            "[migrate] postcopy: {percent:5.1}% of pages present ({pages_present}/{pages_total}), {mb_per_s:7.1} MB/s, {:.1} s",
            elapsed_ms / 1e3
        ),
        Progress::Connected => eprintln!("[migrate] connected"),
    }
}

/// Prints the final report of a migration (stdout).
pub fn print_migration(m: &MigrationReport) {
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    let d = m.destination.pager.clone().unwrap_or_default();
    let l = &d.fault_latency;
    let page = 4096.0;
    println!(
        "migration complete: {} MiB, {} vCPUs -> {}",
        m.mem_bytes >> 20,
        m.vcpus,
        m.to
    );
    let mut rows: Vec<(&str, String)> = vec![
        (
            "downtime (source pause -> destination running)",
            format!("{:.2} ms", m.downtime_ms),
        ),
        (
            "  pause + save on the source",
            format!("{:.2} ms", m.pause_ms),
        ),
        ("  state", format!("{} bytes", m.state_bytes)),
        (
            "  apply on the destination",
            format!("{:.2} ms", m.apply_ms),
        ),
        (
            "time to complete (destination depended on the source)",
            format!("{:.1} ms", m.total_ms),
        ),
        (
            "handshake (connect -> destination ready)",
            format!(
                "{:.1} ms (destination prepared in {:.1} ms)",
                m.handshake_ms, m.prepare_ms
            ),
        ),
        ("link round trip", format!("{:.0} us", m.rtt_us)),
        (
            "pages by origin: fault / prefetch / stream",
            format!(
                "{} / {} / {}",
                d.fault_pages, d.prefetch_pages, d.stream_pages
            ),
        ),
        ("  zero pages (no payload)", format!("{}", d.zero_pages)),
        (
            "  bytes: fault / prefetch / stream",
            format!(
                "{:.1} / {:.1} / {:.1} MiB",
                mib(d.fault_bytes),
                mib(d.prefetch_bytes),
                mib(d.stream_bytes)
            ),
        ),
        ("  pages received twice", format!("{}", d.duplicate_pages)),
        (
            "vCPU faults on missing pages",
            format!("{} (requests {})", l.count, d.requests),
        ),
        (
            "fault latency p50 / p90 / p99 / max",
            format!(
                "{:.0} / {:.0} / {:.0} / {:.0} us",
                l.p50_us, l.p90_us, l.p99_us, l.max_us
            ),
        ),
        (
            "vCPU time blocked on faults",
            format!("{:.1} ms", d.blocked_ms),
        ),
        ("reconnects", format!("{}", d.reconnects)),
        (
            "average rate after switchover",
            format!(
                "{:.0} MB/s",
                d.total_pages as f64 * page / 1e6 / (m.total_ms / 1e3).max(1e-9)
            ),
        ),
    ];
    if !m.destination.disk_copies.is_empty() {
        for c in &m.destination.disk_copies {
            let p = c.pager.clone().unwrap_or_default();
            rows.push((
                "disk copied (--copy-disk)",
                format!(
                    "slot {}: {:.1} MiB in {:.1} ms (write-back {:.1} ms); faults {} / stream {} / zero {} pages",
                    c.slot,
                    mib(c.bytes),
                    c.ms,
                    c.write_back_ms,
                    p.fault_pages,
                    p.stream_pages,
                    p.zero_pages,
                ),
            ));
        }
        rows.push((
            "  disk bytes sent by the source",
            format!("{:.1} MiB", mib(m.disk_bytes_sent)),
        ));
    }
    if let Some(pc) = &m.precopy {
        let sent: u64 = pc.passes.iter().map(|p| p.pages_sent).sum();
        rows.insert(
            0,
            (
                "pre-copy (VM running)",
                format!(
                    "{} passes, {sent} pages sent, {:.0} ms; stopped: {}",
                    pc.passes.len(),
                    pc.ms,
                    pc.stop_reason
                ),
            ),
        );
        rows.insert(
            1,
            (
                "  pages still dirty at the switchover",
                format!("{}", pc.pages_dirty_at_switchover),
            ),
        );
    }
    if m.destination.pager.is_some() {
        let cells: Vec<String> = d
            .fault_latency_log2_us
            .iter()
            .map(|(le, n)| format!("<={le}us:{n}"))
            .collect();
        rows.insert(13, ("fault latency histogram", cells.join(" ")));
    }
    let w = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    for (k, v) in rows {
        println!("  {k:<w$}  {v}");
    }
}
