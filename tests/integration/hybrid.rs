//! Hybrid migration (pre-copy passes while the guest runs, KVM dirty logging, then post-copy
//! for the pages still dirty): the guest goes on, and the destination's RAM equals the source's
//! at the pause, byte for byte, whether pre-copy converged, ran out of passes, or was cut short.

use vmm::api::replies::{MemoryRead, MigrationReport, PrecopyReport};

use crate::migration::{
    check_continues, check_report, dest_pager, gates, last_heartbeat, migrate, source_exits,
    start_dest,
};
use crate::vm::{boot_guest, VmmProc};

/// The pre-copy part of a report.
fn precopy(r: &MigrationReport) -> &PrecopyReport {
    assert!(r.mode == "hybrid" || r.mode == "precopy", "{r:?}");
    r.precopy
        .as_ref()
        .unwrap_or_else(|| panic!("no pre-copy figures: {r:?}"))
}

/// Boots a guest writing `rate` pages/s, migrates it (hybrid, `extra` options) into a paused
/// destination and checks its RAM equals the source's at the pause; returns the report.
fn hybrid_ram_equal(cmdline: &str, extra: &[&str]) -> MigrationReport {
    ram_equal_after("hybrid", cmdline, extra)
}

/// [`hybrid_ram_equal`] for any mode with pre-copy.
fn ram_equal_after(mode: &str, cmdline: &str, extra: &[&str]) -> MigrationReport {
    let mut src = VmmProc::start(&["run", "--mem", "256M", "--vcpus", "2", "--cmdline", cmdline]);
    src.wait_line("READY", std::time::Duration::from_secs(60), |l| {
        l.starts_with("READY")
    });
    src.heartbeats_after(None, 10);
    let (dest, addr) = start_dest(None, "127.0.0.1", &["--paused"]);
    let mut args = vec!["--mode", mode, "--verify"];
    args.extend_from_slice(extra);
    let r = check_report(&migrate(&src, &addr, &args), 256 << 20);
    source_exits(&mut src);
    let got = dest.checksum();
    assert_eq!(
        got.ram_checksum_except_kvm, r.source_ram_checksum_except_kvm,
        "destination RAM differs from the source's at the pause: {r:?}"
    );
    dest.ctl(&["resume"]);
    check_continues(&dest, &last_heartbeat(&src), 2);
    r
}

#[test]
fn hybrid_migration_of_a_running_guest() {
    if !gates("hybrid_migration_of_a_running_guest") {
        return;
    }
    let mut src = boot_guest(2, "256M");
    let (dest, addr) = start_dest(None, "127.0.0.1", &[]);
    let r = check_report(&migrate(&src, &addr, &["--mode", "hybrid"]), 256 << 20);
    let pc = precopy(&r);
    let passes = &pc.passes;
    assert!(!passes.is_empty(), "{r:?}");
    assert_eq!(
        passes[0].pages_sent, 65536,
        "the first pass sends every page: {r:?}"
    );
    // The guest writes ~2000 pages/s: a pass of ~0.1-0.5 s leaves a few hundred dirty and the
    // passes converge. On a loaded machine a pass can take seconds and the stop rule may end
    // them another way; which way is a speed figure (bench/migrate.sh), not a test verdict.
    let why = &pc.stop_reason;
    assert!(
        why.starts_with("converged")
            || why.ends_with("passes done")
            || why.contains("not shrinking"),
        "unknown stop reason: {r:?}"
    );
    println!("hybrid_migration_of_a_running_guest: pre-copy stopped: {why}");
    source_exits(&mut src);
    check_continues(&dest, &last_heartbeat(&src), 2);
    // Pages sent before the pause and not written since are not fetched again: the
    // destination faults only on pages still dirty at the switch.
    let dirty = pc.pages_dirty_at_switchover;
    assert!(dest_pager(&r).fault_pages <= dirty, "{r:?}");
    dest.ctl(&["shutdown"]);
}

#[test]
fn hybrid_memory_equals_the_source_at_pause() {
    if !gates("hybrid_memory_equals_the_source_at_pause") {
        return;
    }
    // converging: a few hundred pages written per pass
    let r = hybrid_ram_equal("rate=2000 hot=50", &[]);
    assert!(precopy(&r).stop_reason.starts_with("converged"));
    // not converging: 50 000 pages/s over all memory, a threshold no pass reaches
    let r = hybrid_ram_equal(
        "rate=50000 hot=100",
        &["--threshold-pages", "1", "--max-passes", "3"],
    );
    let why = precopy(&r).stop_reason.clone();
    assert!(
        why.contains("passes done") || why.contains("not shrinking"),
        "{why}: {r:?}"
    );
    assert!(precopy(&r).pages_dirty_at_switchover > 100);
}

#[test]
fn hybrid_switchover_on_request() {
    if !gates("hybrid_switchover_on_request") {
        return;
    }
    let mut src = boot_guest(2, "256M");
    let (dest, addr) = start_dest(None, "127.0.0.1", &[]);
    let sock = src.sock.clone();
    // never converges on its own: threshold 0, many passes
    let m = std::thread::spawn(move || {
        crate::vm::ctl_raw(
            &sock,
            &[
                "migrate",
                "--to",
                &addr,
                "--mode",
                "hybrid",
                "--threshold-pages",
                "0",
                "--max-passes",
                "1000",
            ],
        )
    });
    // a postcopy-only request is refused meanwhile, the switchover taken
    let mut asked = false;
    for _ in 0..200 {
        std::thread::sleep(std::time::Duration::from_millis(20));
        let v = crate::vm::ctl_raw(&src.sock, &["migrate-switchover"]);
        if v.ok {
            asked = true;
            break;
        }
    }
    assert!(asked, "migrate-switchover was never accepted");
    let r = check_report(&m.join().unwrap(), 256 << 20);
    assert_eq!(precopy(&r).stop_reason, "switchover requested", "{r:?}");
    source_exits(&mut src);
    check_continues(&dest, &last_heartbeat(&src), 2);
    dest.ctl(&["shutdown"]);
}

#[test]
fn precopy_mode_resumes_with_every_page_present() {
    if !gates("precopy_mode_resumes_with_every_page_present") {
        return;
    }
    let r = ram_equal_after("precopy", "rate=2000 hot=50", &[]);
    assert_eq!(r.mode, "precopy");
    // the rest was copied while paused: nothing left to fault on after the resume
    assert_eq!(dest_pager(&r).fault_pages, 0, "{r:?}");
    // and the downtime estimate stops the passes too
    let r = ram_equal_after(
        "precopy",
        "rate=50000 hot=100",
        &["--threshold-pages", "1", "--max-downtime-ms", "50"],
    );
    let why = precopy(&r).stop_reason.clone();
    assert!(
        why.contains("ms <= 50 ms") || why.contains("not shrinking"),
        "{why}"
    );
}

#[test]
fn hybrid_with_userfaultfd_write_protect_tracking() {
    if !gates("hybrid_with_userfaultfd_write_protect_tracking") {
        return;
    }
    let backends = [
        ("uffd-wp", vmm::dirty::uffd_wp::UffdWp::available()),
        (
            "uffd-wp-async",
            vmm::dirty::uffd_wp::UffdWpAsync::available(),
        ),
    ];
    for (backend, avail) in backends {
        if let Err(e) = avail {
            crate::common::skip(format_args!(
                "hybrid_with_userfaultfd_write_protect_tracking ({backend}): {e}"
            ));
            continue;
        }
        for mode in ["hybrid", "precopy"] {
            let r = ram_equal_after(mode, "rate=2000 hot=50", &["--dirty-tracking", backend]);
            assert_eq!(precopy(&r).dirty_tracking, backend, "{r:?}");
            // the guest writes ~2000 pages/s: the tracker sees them
            let passes = &precopy(&r).passes;
            assert!(passes[0].pages_dirtied > 20, "{r:?}");
        }
    }
}

#[test]
fn vmm_writes_during_precopy_are_tracked() {
    if !gates("vmm_writes_during_precopy_are_tracked") {
        return;
    }
    let backends = [
        ("kvm", Ok(())),
        ("uffd-wp", vmm::dirty::uffd_wp::UffdWp::available()),
        (
            "uffd-wp-async",
            vmm::dirty::uffd_wp::UffdWpAsync::available(),
        ),
    ];
    let pattern: String = (0..4096)
        .map(|i| format!("{:02x}", (i * 7 + 1) % 251))
        .collect();
    // a page the guest never writes (below its 16 MiB kernel area end, above what it uses):
    // its own workload writes random pages of all filled memory and would overwrite ours
    let gpa = "0xf00000";
    for (backend, avail) in backends {
        if let Err(e) = avail {
            crate::common::skip(format_args!(
                "vmm_writes_during_precopy_are_tracked ({backend}): {e}"
            ));
            continue;
        }
        // The guest writes fast (50 000 pages/s), so pre-copy runs several passes; once the
        // first has sent every page (the source logs it), the VMM writes one of them as a
        // device would, and that write must still arrive.
        let mut src = VmmProc::start(&[
            "run",
            "--mem",
            "1G",
            "--vcpus",
            "1",
            "--cmdline",
            "rate=50000 hot=100",
        ]);
        src.wait_line("READY", std::time::Duration::from_secs(60), |l| {
            l.starts_with("READY")
        });
        let (dest, addr) = start_dest(None, "127.0.0.1", &["--paused"]);
        let sock = src.sock.clone();
        let b = backend.to_owned();
        let m = std::thread::spawn(move || {
            let args = ["migrate", "--to", &addr, "--mode", "hybrid", "--verify"];
            let mut args = args.to_vec();
            args.extend(["--threshold-pages", "0", "--dirty-tracking", &b]);
            crate::vm::ctl_raw(&sock, &args)
        });
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while !src.stderr_text().contains("pre-copy pass 1:") {
            assert!(std::time::Instant::now() < deadline, "no first pass");
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        src.ctl(&["write-memory", "--gpa", gpa, "--hex", &pattern]);
        let r = check_report(&m.join().unwrap(), 1 << 30);
        source_exits(&mut src);
        let got: MemoryRead = dest.ctl_as(&["read-memory", "--gpa", gpa, "--len", "4096"]);
        assert_eq!(got.hex, pattern, "{backend}: the VMM's write was lost");
        let sum = dest.checksum();
        assert_eq!(
            sum.ram_checksum_except_kvm, r.source_ram_checksum_except_kvm,
            "{backend}: RAM differs: {r:?}"
        );
    }
}
