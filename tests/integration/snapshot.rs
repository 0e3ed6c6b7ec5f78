//! Snapshot, then eager and lazy restore, with every check the guest offers (heartbeat
//! sequence, guest time, timer ticks, SSE/AVX, serial in/out, memory checksums), and clear
//! errors for bad state files.

use std::time::{Duration, Instant};

use vmm::api::replies::Snapshot;

use crate::common::{kvm_or_skip, spawn_server, temp_path, uffd_or_skip, TempFile};
use crate::vm::{
    boot_guest, check_vcpus_run_on, checksum_line, heartbeats, vmm_fails, Heartbeat, VmmProc,
};

/// What was true of the guest when it was snapshotted.
struct Snapped {
    state: TempFile,
    memory: TempFile,
    last: Heartbeat,
    guest_checksum: String,
    ram_checksum: String,
    vcpus: u32,
}

fn boot_and_snapshot(vcpus: u32) -> Snapped {
    let mut p = boot_guest(vcpus, "256M");
    // Stop the writes so the guest's own checksum is stable, then snapshot.
    let since = p.serial_text().len();
    p.ctl(&["serial-input", "q"]);
    let guest_checksum = checksum_line(&p, since);
    p.heartbeats_after(None, 3);
    let state = TempFile(temp_path("state"));
    let memory = TempFile(temp_path("memory"));
    let snap: Snapshot = p.ctl_as(&[
        "snapshot",
        "--state",
        state.0.to_str().unwrap(),
        "--memory",
        memory.0.to_str().unwrap(),
    ]);
    assert_eq!(snap.memory_bytes, 256u64 << 20);
    let ram_checksum = snap.ram_checksum;
    let last = heartbeats(&p.serial_text()).pop().expect("heartbeats");
    p.ctl(&["shutdown"]);
    assert_eq!(p.wait_exit(Duration::from_secs(10)), 0);
    Snapped {
        state,
        memory,
        last,
        guest_checksum,
        ram_checksum,
        vcpus,
    }
}

/// The checks of a restored guest: continues exactly where it was.
fn check_restored(p: &VmmProc, s: &Snapped) {
    let hbs = p.heartbeats_after(Some(s.last.seq), 10);
    let first = &hbs[0];
    // A heartbeat line cut by the pause shows up partial (and is skipped): +1 or +2.
    assert!(
        first.seq == s.last.seq + 1 || first.seq == s.last.seq + 2,
        "heartbeat sequence reset or skipped: before {:?}, after {first:?}",
        s.last
    );
    // kvmclock is held while paused; the bound allows a restored vCPU that a loaded machine
    // schedules late (as in the migration tests), and still catches a clock that ran through
    // the snapshot and restore (which take longer than this)
    assert!(
        first.t_us > s.last.t_us && first.t_us < s.last.t_us + 250_000,
        "guest time did not continue: before {:?}, after {first:?}",
        s.last
    );
    check_vcpus_run_on(p, &hbs, &s.last, s.vcpus as usize);
    let text = p.serial_text();
    // Serial in and out; the guest's checksum of its memory is the one before the snapshot.
    let since = text.len();
    p.ctl(&["serial-input", "c"]);
    assert_eq!(checksum_line(p, since), s.guest_checksum);
    p.ctl(&["serial-input", "r"]);
    p.wait_line("RESUMED", Duration::from_secs(10), |l| l == "RESUMED");
}

#[test]
fn snapshot_then_eager_restore_continues_exactly() {
    if !kvm_or_skip("snapshot_then_eager_restore_continues_exactly") {
        return;
    }
    for vcpus in [1, 2] {
        let s = boot_and_snapshot(vcpus);
        let mut p = VmmProc::start(&[
            "restore",
            "--state",
            s.state.0.to_str().unwrap(),
            "--memory",
            s.memory.0.to_str().unwrap(),
            "--paused",
        ]);
        // Host-side: RAM equals what was saved, before the guest runs again.
        assert_eq!(p.checksum().ram_checksum, s.ram_checksum);
        p.ctl(&["resume"]);
        check_restored(&p, &s);
        p.ctl(&["shutdown"]);
        assert_eq!(p.wait_exit(Duration::from_secs(10)), 0);
    }
}

#[test]
fn snapshot_then_lazy_restore_pages_through_the_pager() {
    if !kvm_or_skip("snapshot_then_lazy_restore_pages_through_the_pager")
        || !uffd_or_skip("snapshot_then_lazy_restore_pages_through_the_pager")
    {
        return;
    }
    for (vcpus, stream) in [(2, false), (1, true)] {
        let s = boot_and_snapshot(vcpus);
        let server = spawn_server(&s.memory.0, "127.0.0.1:0");
        let mut args = vec![
            "restore",
            "--state",
            s.state.0.to_str().unwrap(),
            "--memory-from",
            &server.addr,
        ];
        if !stream {
            args.push("--no-stream");
        }
        let mut p = VmmProc::start(&args);
        check_restored(&p, &s);
        let mut st = p.status();
        assert!(st.lazy);
        if !stream {
            // Demand only: every page the vCPUs (and KVM on their behalf) touched came through
            // userfaultfd faults served by the page-server.
            let pager = st.pager.as_ref().expect("a lazy VM has a pager");
            assert!(pager.fault_events > 0, "no vCPU faults: {st:?}");
            assert!(pager.fault_pages > 0, "{st:?}");
            assert_eq!(pager.stream_pages, 0, "{st:?}");
        } else {
            let deadline = Instant::now() + Duration::from_secs(30);
            while st.memory_complete_ms.is_none() {
                assert!(Instant::now() < deadline, "memory never complete: {st:?}");
                std::thread::sleep(Duration::from_millis(50));
                st = p.status();
            }
            assert_eq!(st.pages_present, st.pages_total);
            // No page is sent twice (a fault on a page in flight waits for the stream).
            let pager = st.pager.as_ref().expect("a lazy VM has a pager");
            assert_eq!(pager.duplicate_pages, 0, "{st:?}");
        }
        p.ctl(&["shutdown"]);
        assert_eq!(p.wait_exit(Duration::from_secs(10)), 0);
    }
}

#[test]
fn bad_state_files_are_refused_clearly() {
    if !kvm_or_skip("bad_state_files_are_refused_clearly") {
        return;
    }
    let s = boot_and_snapshot(1);
    let good = std::fs::read(&s.state.0).unwrap();
    let bad = TempFile(temp_path("badstate"));
    let restore = |bytes: &[u8]| {
        std::fs::write(&bad.0, bytes).unwrap();
        vmm_fails(&[
            "restore",
            "--state",
            bad.0.to_str().unwrap(),
            "--memory",
            s.memory.0.to_str().unwrap(),
        ])
    };
    // A flipped byte in the blob: CRC.
    let mut corrupt = good.clone();
    let mid = corrupt.len() / 2;
    corrupt[mid] ^= 0x40;
    let e = restore(&corrupt);
    assert!(
        e.contains("not a valid state frame") && e.to_lowercase().contains("crc"),
        "{e}"
    );
    // Truncated.
    let e = restore(&good[..good.len() - 100]);
    assert!(e.contains("not a valid state frame"), "{e}");
    // Another protocol version in the header.
    let mut v = good.clone();
    v[4] = 0x7f;
    let e = restore(&v);
    assert!(e.contains("version"), "{e}");
    // Garbage and an empty file.
    let e = restore(b"GET / HTTP/1.1\r\n\r\n");
    assert!(e.contains("not a valid state frame"), "{e}");
    let e = restore(b"");
    assert!(e.contains("not a valid state frame"), "{e}");
    // A memory file of the wrong size.
    let e = vmm_fails(&[
        "restore",
        "--state",
        s.state.0.to_str().unwrap(),
        "--memory",
        bad.0.to_str().unwrap(),
    ]);
    assert!(e.contains("guest RAM has"), "{e}");
}

#[test]
fn snapshot_files_are_new_and_private() {
    if !kvm_or_skip("snapshot_files_are_new_and_private") {
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    let p = boot_guest(1, "64M");
    let state = TempFile(temp_path("priv-state"));
    let memory = TempFile(temp_path("priv-memory"));
    let snap = |st: &std::path::Path, mem: &std::path::Path| {
        crate::vm::ctl_raw(
            &p.sock,
            &[
                "snapshot",
                "--state",
                st.to_str().unwrap(),
                "--memory",
                mem.to_str().unwrap(),
            ],
        )
    };
    // new files: created 0600 (guest memory and registers are nobody else's to read)
    let r = snap(&state.0, &memory.0);
    assert!(r.ok, "{r:?}");
    for f in [&state.0, &memory.0] {
        let mode = std::fs::metadata(f).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{}", f.display());
    }
    // an existing file is not overwritten, and the refusal says why
    let before = std::fs::read(&state.0).unwrap();
    let other_mem = TempFile(temp_path("priv-memory2"));
    let r = snap(&state.0, &other_mem.0);
    let e = r.error.expect("refused");
    assert!(e.message.contains("exists"), "{e:?}");
    assert_eq!(std::fs::read(&state.0).unwrap(), before);
    // a symlink planted at the path (here to a file of ours) is not followed
    let target = TempFile(temp_path("priv-target"));
    std::fs::write(&target.0, b"keep").unwrap();
    let link = TempFile(temp_path("priv-link"));
    std::os::unix::fs::symlink(&target.0, &link.0).unwrap();
    let other_state = TempFile(temp_path("priv-state2"));
    let r = snap(&other_state.0, &link.0);
    assert!(!r.ok, "{r:?}");
    assert_eq!(std::fs::read(&target.0).unwrap(), b"keep");
    // ... and no half snapshot stays: the state file written before the refusal is gone
    assert!(!other_state.0.exists(), "a half snapshot was left");
    // a dangling one neither
    let dangling = TempFile(temp_path("priv-dangling"));
    let nowhere = temp_path("priv-nowhere");
    std::os::unix::fs::symlink(&nowhere, &dangling.0).unwrap();
    let third = TempFile(temp_path("priv-state3"));
    let r = snap(&third.0, &dangling.0);
    assert!(!r.ok, "{r:?}");
    assert!(!nowhere.exists(), "the dangling symlink was followed");
    p.ctl(&["shutdown"]);
}
