//! Load: three 1 GiB VMs migrated at the same time, a destination whose guest faults on its
//! memory while the background stream runs at full speed, and a guest whose written set is
//! larger than half of its RAM — each checked byte for byte (the destination's RAM against the
//! source's at the pause, or the guest's own checksum of its memory) and for a guest that goes
//! on where it was.

use std::time::{Duration, Instant};

use vmm::api::replies::{MemoryRead, MigrationReport, Status};

use crate::common::{temp_path, TempFile};
use crate::migration::{
    check_continues, check_report, dest_pager, gates, last_heartbeat, migrate, source_exits,
    start_dest,
};
use crate::vm::{checksum_line, ctl_raw, VmmProc};

const GIB: u64 = 1 << 30;

/// Starts `vmm run` with our guest (1 GiB, 1 vCPU: three of them share this machine's 2 cores
/// with their destinations), not waiting for it.
fn start_guest(cmdline: &str) -> VmmProc {
    VmmProc::start(&["run", "--mem", "1G", "--vcpus", "1", "--cmdline", cmdline])
}

/// Waits until the guest has filled its memory and beats; returns its boot line.
fn wait_ready(p: &VmmProc) -> String {
    let boot = p.wait_line("boot line", Duration::from_secs(60), |l| {
        l.starts_with("GUEST boot")
    });
    assert!(boot.contains("cpus=1/1"), "{boot}");
    // three 1 GiB guests fill at once on two cores (and this host backs memory lazily)
    p.wait_line("READY", Duration::from_secs(120), |l| {
        l.starts_with("READY")
    });
    let hbs = p.heartbeats_after(None, 5);
    assert!(hbs.iter().all(|h| h.simd_ok), "{hbs:?}");
    boot
}

/// `key=` value of a `GUEST boot` line.
fn boot_field(line: &str, key: &str) -> u64 {
    line.split(' ')
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {key}= in {line:?}"))
}

/// The figures of a migration report, one line.
fn figures(r: &MigrationReport) -> String {
    let d = dest_pager(r);
    let l = &d.fault_latency;
    format!(
        "downtime {:.2} ms (pause+save {:.2}, apply {:.2}), total {:.0} ms, {:.0} MB/s after the \
         switch; pages fault/prefetch/stream/zero {}/{}/{}/{}, duplicates {}, in flight {}; \
         faults {} (p50 {:.0} / p90 {:.0} / p99 {:.0} / max {:.0} us), vCPU blocked {:.1} ms",
        r.downtime_ms,
        r.pause_ms,
        r.apply_ms,
        r.total_ms,
        d.total_pages as f64 * 4096.0 / 1e3 / r.total_ms.max(1e-3),
        d.fault_pages,
        d.prefetch_pages,
        d.stream_pages,
        d.zero_pages,
        d.duplicate_pages,
        d.in_flight_replies,
        l.count,
        l.p50_us,
        l.p90_us,
        l.p99_us,
        l.max_us,
        d.blocked_ms,
    )
}

/// A `--paused` destination's RAM equals the source's at the pause (`--verify`), except the
/// pages KVM rewrites when the state is applied; returns the checksum.
fn check_ram_equal(dest: &VmmProc, r: &MigrationReport) -> String {
    let want = r
        .source_ram_checksum_except_kvm
        .clone()
        .unwrap_or_else(|| panic!("no source checksum in the report: {r:?}"));
    let got = dest.checksum();
    assert!(got.paused, "{got:?}");
    let kvm_pages = got.kvm_pages.as_ref().unwrap();
    assert!(!kvm_pages.is_empty() && kvm_pages.len() <= 4, "{got:?}");
    assert_eq!(
        got.ram_checksum_except_kvm.as_ref(),
        Some(&want),
        "destination RAM differs from the source's at the pause: {r:?}"
    );
    want
}

#[test]
fn three_concurrent_1g_migrations() {
    if !gates("three_concurrent_1g_migrations") {
        return;
    }
    let t0 = Instant::now();
    // the default workload writes 1000 random pages/s over all of its memory
    let mut srcs: Vec<VmmProc> = (0..3).map(|_| start_guest("")).collect();
    for s in &srcs {
        wait_ready(s);
    }
    let booted = t0.elapsed();
    let dests: Vec<(VmmProc, String)> = (0..3)
        .map(|_| start_dest(None, "127.0.0.1", &["--paused"]))
        .collect();
    let t = Instant::now();
    // (report, when `migrate` was issued, when it answered)
    let reports: Vec<(MigrationReport, Instant, Instant)> = std::thread::scope(|sc| {
        let handles: Vec<_> = srcs
            .iter()
            .zip(&dests)
            .map(|(src, (_, addr))| {
                sc.spawn(move || {
                    let t = Instant::now();
                    let r = migrate(src, addr, &["--verify"]);
                    (check_report(&r, GIB), t, Instant::now())
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("migrate thread"))
            .collect()
    });
    let wall = t.elapsed();
    for (i, ((r, from, to), src)) in reports.iter().zip(&mut srcs).enumerate() {
        source_exits(src);
        println!(
            "migration {i}: {} (migrate command {:.0} ms)",
            figures(r),
            (*to - *from).as_secs_f64() * 1e3
        );
        // the destinations did not run: the stream brought (nearly) every page; what faulted
        // is KVM's own page(s) touched when the state was applied (kvmclock)
        let d = dest_pager(r);
        assert!(d.fault_pages + d.prefetch_pages <= 64, "{r:?}");
    }
    // the three ran at the same time: the last one began before the first one ended
    let last_start = reports.iter().map(|x| x.1).max().unwrap();
    let first_end = reports.iter().map(|x| x.2).min().unwrap();
    assert!(last_start < first_end, "the migrations did not overlap");
    // the destinations' checksums (a pass over 1 GiB each) at the same time too
    let t = Instant::now();
    let sums: Vec<String> = std::thread::scope(|sc| {
        let handles: Vec<_> = reports
            .iter()
            .zip(&dests)
            .map(|((r, ..), (dest, _))| sc.spawn(move || check_ram_equal(dest, r)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("checksum thread"))
            .collect()
    });
    for (i, sum) in sums.iter().enumerate() {
        println!("migration {i}: destination RAM equals the source's at the pause ({sum})");
    }
    let checksums = t.elapsed();
    for ((dest, _), src) in dests.iter().zip(&srcs) {
        dest.ctl(&["resume"]);
        check_continues(dest, &last_heartbeat(src), 1);
    }
    for (dest, _) in &dests {
        dest.ctl(&["shutdown"]);
    }
    println!(
        "three_concurrent_1g_migrations: boot {:.1} s, the three migrations {:.1} s wall (incl. \
         the sources' --verify checksums), destination checksums {:.1} s, test {:.1} s",
        booted.as_secs_f64(),
        wall.as_secs_f64(),
        checksums.as_secs_f64(),
        t0.elapsed().as_secs_f64()
    );
}

/// Guest-physical address of work page `pg` of our guest (1 GiB: one RAM range, the work
/// area from 16 MiB on).
fn work_gpa(pg: u64) -> u64 {
    (16 << 20) + pg * 4096
}

/// Checks one page read from guest memory (`read-memory` hex) against the guest's fill
/// pattern: word `w` of work page `pg` is `(pg << 12 | w) ^ 0xa5a5 << 48`.
fn check_fill_pattern(pg: u64, hex: &str) {
    assert_eq!(hex.len(), 8192, "page {pg}: {hex}");
    for w in 0..512u64 {
        let b = &hex[w as usize * 16..][..16];
        let got = u64::from_le_bytes(
            (0..8)
                .map(|i| u8::from_str_radix(&b[i * 2..][..2], 16).unwrap())
                .collect::<Vec<_>>()
                .try_into()
                .unwrap(),
        );
        let want = (pg << 12 | w) ^ 0xa5a5_0000_0000_0000;
        assert_eq!(
            got, want,
            "work page {pg} word {w}: {got:#x}, want {want:#x}"
        );
    }
}

#[test]
fn source_serves_faults_while_streaming_at_full_speed() {
    if !gates("source_serves_faults_while_streaming_at_full_speed") {
        return;
    }
    let t0 = Instant::now();
    // `rate=0`: the guest fills its memory with its pattern and never writes it again, so
    // every work page's content is known. It prints the checksum of its memory; the
    // destination runs it (stream on) and is told at once to compute it again: the walk over
    // 1 GiB faults on the pages the stream has not brought yet, while the test reads random
    // pages through the destination's VMM (faults too, at random places, each answered on the
    // urgent connection) and compares them with the pattern.
    let mut src = start_guest("rate=0");
    let boot = wait_ready(&src);
    let work_pages = boot_field(&boot, "work_mib") * 256;
    let probe: MemoryRead = src.ctl_as(&[
        "read-memory",
        "--gpa",
        &work_gpa(7).to_string(),
        "--len",
        "4096",
    ]);
    check_fill_pattern(7, &probe.hex);
    let since = src.serial_text().len();
    src.ctl(&["serial-input", "c"]);
    let before = checksum_line(&src, since);
    let (dest, addr) = start_dest(None, "127.0.0.1", &[]);
    let sock = src.sock.clone();
    let m = std::thread::spawn(move || ctl_raw(&sock, &["migrate", "--to", &addr]));
    // the control socket answers `incoming` until the VM is attached, then `running`
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let st = ctl_raw(&dest.sock, &["status"]);
        if st.body::<Status>().is_ok_and(|s| s.state == "running") {
            break;
        }
        assert!(Instant::now() < deadline, "destination never ran: {st:?}");
        assert!(!m.is_finished(), "migration ended early: {st:?}");
        std::thread::sleep(Duration::from_millis(5));
    }
    // The guest prints its heartbeats and computes the checksum on one vCPU: told at once, its
    // first heartbeat here would wait for the whole walk (seconds of faults) and look like a
    // clock that ran through the move. One heartbeat first, then the walk.
    dest.heartbeats_after(None, 1);
    let since = dest.serial_text().len();
    dest.ctl(&["serial-input", "c"]);
    // While the migration runs: random pages read and checked, and the destination's pager
    // watched for a moment with faults served, the stream installing and pages still missing.
    let mut during: Option<Status> = None;
    let mut polls = 0;
    let mut reads = 0;
    let mut rng = crate::common::Rng(0x10ad);
    while !m.is_finished() {
        let pg = rng.next() % work_pages;
        let v = ctl_raw(
            &dest.sock,
            &[
                "read-memory",
                "--gpa",
                &work_gpa(pg).to_string(),
                "--len",
                "4096",
            ],
        );
        if let Ok(v) = v.body::<MemoryRead>() {
            check_fill_pattern(pg, &v.hex);
            reads += 1;
        }
        let st: Status = dest.status();
        polls += 1;
        let p = st.pager.clone().unwrap_or_default();
        if p.fault_pages > 0 && p.stream_pages > 0 && st.pages_present < st.pages_total {
            during = Some(st);
        }
    }
    let r = check_report(&m.join().unwrap(), GIB);
    source_exits(&mut src);
    println!("faults while streaming: {}", figures(&r));
    let during = during.unwrap_or_else(|| {
        panic!("none of {polls} status polls saw faults served while the stream ran: {r:?}")
    });
    let dp = during.pager.clone().unwrap_or_default();
    println!(
        "  last status during the stream ({} of {} pages present): fault {} / prefetch {} / stream {} pages; {} faults, p50 {:.0} / p99 {:.0} / max {:.0} us; {reads} random pages read and checked",
        during.pages_present,
        during.pages_total,
        dp.fault_pages,
        dp.prefetch_pages,
        dp.stream_pages,
        dp.fault_latency.count,
        dp.fault_latency.p50_us,
        dp.fault_latency.p99_us,
        dp.fault_latency.max_us,
    );
    let d = dest_pager(&r);
    assert!(d.fault_pages > 0, "{r:?}");
    assert!(d.stream_pages > 0, "{r:?}");
    let lat = &d.fault_latency;
    assert!(lat.count > 0, "{r:?}");
    assert!(lat.max_us >= lat.p50_us, "{r:?}");
    assert_eq!(d.reconnects, 0, "{r:?}");
    assert_eq!(d.duplicate_pages, 0, "{r:?}");
    // the guest's checksum of its memory, computed on the destination through faults and the
    // stream, is the one it had on the source
    assert_eq!(
        checksum_line(&dest, since),
        before,
        "guest memory changed in transit"
    );
    let st = dest.status();
    assert_eq!(st.pages_present, st.pages_total, "{st:?}");
    assert!(!st.incoming_migration_open, "{st:?}");
    check_continues(&dest, &last_heartbeat(&src), 1);
    dest.ctl(&["shutdown"]);
    println!(
        "source_serves_faults_while_streaming_at_full_speed: guest checksum {before} equal, {polls} status polls, test {:.1} s",
        t0.elapsed().as_secs_f64()
    );
}

/// Pages the guest's workload wrote so far (`w=` of its last heartbeat).
fn pages_written(p: &VmmProc) -> u64 {
    let text = p.serial_text();
    text.lines()
        .rev()
        .filter(|l| l.starts_with("HB ") && l.contains(" simd="))
        .find_map(|l| {
            l.split(' ')
                .find_map(|kv| kv.strip_prefix("w=")?.parse().ok())
        })
        .unwrap_or(0)
}

/// Checks the work area of our guest (1 GiB, 1 vCPU) in a memory file: each 8-word group of
/// each page holds either the fill pattern (`(pg << 12 | w) ^ 0xa5a5 << 48`) or one write of
/// the workload (`seq ^ w` for its word `w`, `seq` < 2^48), and pages from `hot_pages` on were
/// never written. A pause may cut one write short (words of two writes, or of a write and the
/// pattern): at most one group per pause. Returns (groups written, groups cut).
fn check_work_memory(path: &std::path::Path, work_pages: u64, hot_pages: u64) -> (u64, u64) {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(path).expect("memory file");
    f.seek(SeekFrom::Start(16 << 20)).unwrap();
    let mut r = std::io::BufReader::with_capacity(4 << 20, f);
    let mut page = vec![0u8; 4096];
    let (mut written, mut torn) = (0u64, 0u64);
    for pg in 0..work_pages {
        r.read_exact(&mut page).expect("read the memory file");
        for g in 0..64u64 {
            let mut fill = true;
            let mut seq = None;
            let mut one_write = true;
            for i in 0..8u64 {
                let w = g * 8 + i;
                let at = w as usize * 8;
                let v = u64::from_le_bytes(page[at..at + 8].try_into().unwrap());
                if v == (pg << 12 | w) ^ 0xa5a5_0000_0000_0000 {
                    one_write = false;
                    continue;
                }
                fill = false;
                assert!(
                    (v ^ i) >> 48 == 0,
                    "work page {pg} word {w}: {v:#x} is neither the pattern nor a write"
                );
                one_write &= *seq.get_or_insert(v ^ i) == v ^ i;
            }
            if fill {
                continue;
            }
            assert!(
                pg < hot_pages,
                "work page {pg} is outside the hot set but was written"
            );
            if one_write {
                written += 1;
            } else {
                torn += 1;
            }
        }
    }
    // two pauses (A -> B, B -> C), one vCPU
    assert!(torn <= 2, "{torn} groups hold parts of several writes");
    (written, torn)
}

#[test]
fn hot_set_larger_than_half_of_ram() {
    if !gates("hot_set_larger_than_half_of_ram") {
        return;
    }
    let t0 = Instant::now();
    // 25 600 random pages/s (100 MiB/s) over the first 75 % of the filled memory
    let mut a = start_guest("rate=25600 hot=75");
    let boot = wait_ready(&a);
    let hot_mib = boot_field(&boot, "work_mib") * boot_field(&boot, "hot") / 100;
    assert!(
        hot_mib > 512,
        "the written set should exceed half of RAM: {boot}"
    );

    // A -> B, B running: its writes fault on the hot set while the stream runs
    let (mut b, addr_b) = start_dest(None, "127.0.0.1", &[]);
    let r = check_report(&migrate(&a, &addr_b, &[]), GIB);
    source_exits(&mut a);
    println!(
        "hot set {hot_mib} MiB, running destination: {}",
        figures(&r)
    );
    assert!(
        dest_pager(&r).fault_pages > 0,
        "the writes should fault: {r:?}"
    );
    check_continues(&b, &last_heartbeat(&a), 1);

    // B -> C, C paused: C's RAM equals B's at the pause, taken while the guest wrote its hot
    // set; then it runs on
    let (c, addr_c) = start_dest(None, "127.0.0.1", &["--paused"]);
    let r = check_report(&migrate(&b, &addr_c, &["--verify"]), GIB);
    source_exits(&mut b);
    println!("hot set {hot_mib} MiB, paused destination: {}", figures(&r));
    let sum = check_ram_equal(&c, &r);
    // every work page is intact after both moves: a page the guest never wrote (the cold
    // quarter) holds its fill pattern, a written one consistent 8-word groups of the
    // workload's writes; a page lost, zeroed or delivered at the wrong place would not
    let state = TempFile(temp_path("load-state"));
    let memory = TempFile(temp_path("load-memory"));
    c.ctl(&[
        "snapshot",
        "--state",
        state.0.to_str().unwrap(),
        "--memory",
        memory.0.to_str().unwrap(),
    ]);
    let work_pages = boot_field(&boot, "work_mib") * 256;
    let hot_pages = work_pages * boot_field(&boot, "hot") / 100;
    let (written, torn) = check_work_memory(&memory.0, work_pages, hot_pages);
    drop(memory);
    println!(
        "hot set {hot_pages} of {work_pages} work pages: every page intact, {written} 8-word \
         groups written by the guest, {torn} cut by a pause"
    );
    assert!(written > 1000, "the guest should have written its hot set");
    println!(
        "  the guest wrote {} pages on A, {} in all by B's pause",
        pages_written(&a),
        pages_written(&b)
    );
    c.ctl(&["resume"]);
    check_continues(&c, &last_heartbeat(&b), 1);
    c.ctl(&["shutdown"]);
    println!(
        "hot_set_larger_than_half_of_ram: RAM equal at the pause ({sum}), test {:.1} s",
        t0.elapsed().as_secs_f64()
    );
}
