//! Live migration of our guest between two vmm processes: over loopback and between two network
//! namespaces, while the guest's workload writes memory; A→B→A; and the failures that must leave
//! the source running (nobody listening, an incompatible or hostile destination).

use std::time::{Duration, Instant};

use vmm::api::replies::{IncomingStatus, MigrationReport};
use vmm::api::{ErrorReply, Reply};

use crate::common::{kvm_or_skip, uffd_or_skip};
use crate::netns::{Shape, TwoHosts};
use crate::vm::{
    boot_guest, boot_guest_in, check_vcpus_run_on, checksum_line, ctl_raw, heartbeats, Heartbeat,
    VmmProc,
};

pub(crate) fn gates(test: &str) -> bool {
    kvm_or_skip(test) && uffd_or_skip(test)
}

/// A destination `vmm --incoming` on `ip` (port 0 → the one it got); returns it and its
/// address.
pub(crate) fn start_dest(netns: Option<&str>, ip: &str, extra: &[&str]) -> (VmmProc, String) {
    let listen = format!("tcp:{ip}:0");
    let mut args = vec!["--incoming", listen.as_str()];
    args.extend_from_slice(extra);
    let p = VmmProc::start_in(netns, &args);
    let st: IncomingStatus = p.ctl_as(&["status"]);
    assert_eq!(st.state, "incoming", "{st:?}");
    (p, st.listening)
}

/// `vmm ctl migrate --to ADDR`: the final reply.
pub(crate) fn migrate(src: &VmmProc, to: &str, extra: &[&str]) -> Reply {
    let mut args = vec!["migrate", "--to", to];
    args.extend_from_slice(extra);
    ctl_raw(&src.sock, &args)
}

pub(crate) fn last_heartbeat(p: &VmmProc) -> Heartbeat {
    heartbeats(&p.serial_text()).pop().expect("heartbeats")
}

/// The guest goes on where it was on the source: the heartbeat sequence continues (a line cut by
/// the pause is skipped), guest time moves on by little (< 250 ms), every vCPU gets timer ticks,
/// SSE/AVX state is intact and no exception was taken.
pub(crate) fn check_continues(dest: &VmmProc, before: &Heartbeat, vcpus: usize) {
    let hbs = dest.heartbeats_after(None, 20);
    let first = &hbs[0];
    assert!(
        first.seq == before.seq + 1 || first.seq == before.seq + 2,
        "heartbeat sequence reset or skipped: source ended at {before:?}, destination began at {first:?}"
    );
    // kvmclock is held while the VM is paused: guest time moves on by about one heartbeat
    // (10 ms), more when the guest was slowed just before the pause (write-protect tracking
    // on a loaded machine took 110 ms once); a clock that ran through the migration would
    // jump by all of it
    assert!(
        first.t_us > before.t_us && first.t_us < before.t_us + 250_000,
        "guest time did not continue: {before:?} then {first:?}"
    );
    check_vcpus_run_on(dest, &hbs, before, vcpus);
    let text = dest.serial_text();
    assert!(!text.contains("GUEST boot"), "the guest rebooted: {text}");
}

/// The report says the migration did what it claims; returns it.
pub(crate) fn check_report(r: &Reply, mem_bytes: u64) -> MigrationReport {
    let r: MigrationReport = r
        .body()
        .unwrap_or_else(|e| panic!("migration failed: {e}: {r:?}"));
    let pages = mem_bytes / 4096;
    let d = dest_pager(&r);
    assert_eq!(d.total_pages, pages, "{r:?}");
    assert_eq!(d.present_pages, pages, "{r:?}");
    let got = d.fault_pages + d.prefetch_pages + d.stream_pages;
    // pre-copied pages dropped at the switch (modified since) are installed a second time
    assert_eq!(
        got - d.duplicate_pages - d.precopy_dropped,
        pages,
        "pages by origin do not add up: {r:?}"
    );
    let d = r.downtime_ms;
    // a sanity bound only (speed is the benchmark's business; CI machines are loaded)
    assert!(d > 0.0 && d < 10_000.0, "downtime {d} ms: {r:?}");
    assert!(r.total_ms >= d, "{r:?}");
    assert!(r.state_bytes > 1000, "{r:?}");
    r
}

/// The destination's pager figures in a migration report.
pub(crate) fn dest_pager(r: &MigrationReport) -> &pager::Report {
    r.destination
        .pager
        .as_ref()
        .unwrap_or_else(|| panic!("no destination figures in the report: {r:?}"))
}

/// The error of a reply that must be one.
pub(crate) fn refused(r: &Reply) -> &ErrorReply {
    assert!(!r.ok, "{r:?}");
    r.error
        .as_ref()
        .unwrap_or_else(|| panic!("not ok, but no error: {r:?}"))
}

/// The source ends with exit 0 once the destination has every page.
pub(crate) fn source_exits(src: &mut VmmProc) {
    assert_eq!(
        src.wait_exit(Duration::from_secs(20)),
        0,
        "{}",
        src.stderr_text()
    );
    assert!(
        src.stderr_text().contains("guest memory freed"),
        "{}",
        src.stderr_text()
    );
}

#[test]
fn migrate_running_guest_over_loopback_1_and_2_vcpus() {
    if !gates("migrate_running_guest_over_loopback_1_and_2_vcpus") {
        return;
    }
    for vcpus in [1usize, 2] {
        // the workload writes random pages all along (rate=2000 over half of memory)
        let mut src = boot_guest(vcpus as u32, "256M");
        let (dest, addr) = start_dest(None, "127.0.0.1", &[]);
        check_report(&migrate(&src, &addr, &[]), 256 << 20);
        source_exits(&mut src);
        let before = last_heartbeat(&src);
        check_continues(&dest, &before, vcpus);
        let st = dest.status();
        assert_eq!(st.state, "running", "{st:?}");
        assert_eq!(st.pages_present, st.pages_total, "{st:?}");
        assert!(!st.incoming_migration_open, "{st:?}");
        dest.ctl(&["shutdown"]);
    }
}

#[test]
fn migrated_memory_equals_the_source_at_pause() {
    if !gates("migrated_memory_equals_the_source_at_pause") {
        return;
    }
    // Host-side, every byte: the destination stays paused (all of RAM arrives by the stream),
    // and its RAM checksum must equal the source's RAM at the pause, taken while the workload
    // was writing.
    let mut src = boot_guest(2, "256M");
    let (dest, addr) = start_dest(None, "127.0.0.1", &["--paused"]);
    let r = check_report(&migrate(&src, &addr, &["--verify"]), 256 << 20);
    source_exits(&mut src);
    // KVM rewrites its own pages (kvmclock) when the state is applied: those are left out.
    let want = r.source_ram_checksum_except_kvm.expect("source checksum");
    let got = dest.checksum();
    assert!(got.paused);
    let kvm_pages = got.kvm_pages.as_ref().unwrap();
    assert!(!kvm_pages.is_empty() && kvm_pages.len() <= 4, "{got:?}");
    assert_eq!(
        got.ram_checksum_except_kvm,
        Some(want),
        "destination RAM differs from the source's"
    );
    dest.ctl(&["resume"]);
    check_continues(&dest, &last_heartbeat(&src), 2);

    // Guest-side, through faults only (no stream): the guest stops writing and prints the
    // checksum of its memory, is migrated, and computes it again on the destination — touching
    // every page, each fetched on demand. Pages it never touches never come: the migration
    // cannot complete, so the destination is shut down afterwards and the source, which cannot
    // know whether the VM runs elsewhere, must stay paused and say so.
    let src = boot_guest(2, "256M");
    let since = src.serial_text().len();
    src.ctl(&["serial-input", "q"]);
    let before = checksum_line(&src, since);
    let (dest, addr) = start_dest(None, "127.0.0.1", &["--no-stream"]);
    let sock = src.sock.clone();
    let m = std::thread::spawn(move || ctl_raw(&sock, &["migrate", "--to", &addr]));
    dest.heartbeats_after(None, 3);
    let since = dest.serial_text().len();
    dest.ctl(&["serial-input", "c"]);
    assert_eq!(
        checksum_line(&dest, since),
        before,
        "guest memory changed in transit"
    );
    let st = dest.status();
    // fetched on demand: each fault's page, plus prefetch as the walk goes sequential
    let pager = st.pager.clone().expect("a pager");
    let demand = pager.fault_pages + pager.prefetch_pages;
    assert!(
        demand > 50_000,
        "the checksum should have faulted most pages in: {st:?}"
    );
    assert_eq!(pager.stream_pages, 0, "{st:?}");
    dest.ctl(&["shutdown"]);
    let r = m.join().unwrap();
    assert_eq!(refused(&r).kind, "migration_unknown", "{r:?}");
    let st = src.status();
    assert!(st.state.contains("paused"), "{st:?}");
}

#[test]
fn migrate_there_and_back() {
    if !gates("migrate_there_and_back") {
        return;
    }
    let mut a = boot_guest(2, "256M");
    let (mut b, addr_b) = start_dest(None, "127.0.0.1", &[]);
    check_report(&migrate(&a, &addr_b, &[]), 256 << 20);
    source_exits(&mut a);
    check_continues(&b, &last_heartbeat(&a), 2);
    let (a2, addr_a) = start_dest(None, "127.0.0.1", &[]);
    check_report(&migrate(&b, &addr_a, &[]), 256 << 20);
    source_exits(&mut b);
    check_continues(&a2, &last_heartbeat(&b), 2);
    a2.ctl(&["shutdown"]);
}

/// The source keeps running after a failed migration.
pub(crate) fn still_running(src: &VmmProc) {
    let st = src.status();
    assert_eq!(st.state, "running", "{st:?}");
    let last = last_heartbeat(src);
    src.heartbeats_after(Some(last.seq), 3);
}

#[test]
fn failed_migrations_leave_the_source_running() {
    if !gates("failed_migrations_leave_the_source_running") {
        return;
    }
    let src = boot_guest(1, "256M");

    // nobody listening
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let r = migrate(&src, &format!("127.0.0.1:{port}"), &[]);
    let msg = &refused(&r).message;
    assert!(
        msg.contains("listening") && msg.contains("refused"),
        "{msg}"
    );
    still_running(&src);

    // a destination that cannot take this VM: refused before the source pauses
    let (dest, addr) = start_dest(None, "127.0.0.1", &["--max-mem", "128M"]);
    let t = Instant::now();
    let r = migrate(&src, &addr, &[]);
    let msg = &refused(&r).message;
    assert!(
        msg.contains("refused") && msg.contains("at most 128 MiB"),
        "{msg}"
    );
    assert!(t.elapsed() < Duration::from_secs(10));
    still_running(&src);
    // the destination is still waiting, and says what went wrong
    let st: IncomingStatus = dest.ctl_as(&["status"]);
    assert_eq!(st.state, "incoming", "{st:?}");
    assert!(
        st.last_error.as_deref().unwrap().contains("128 MiB"),
        "{st:?}"
    );
    // ... and takes a VM it can run
    let mut small = boot_guest(1, "64M");
    check_report(&migrate(&small, &addr, &[]), 64 << 20);
    source_exits(&mut small);
    check_continues(&dest, &last_heartbeat(&small), 1);

    // a peer that is not a vmm: garbage, then it hangs up
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let to = l.local_addr().unwrap().to_string();
    let peer = std::thread::spawn(move || {
        use std::io::Write;
        let (mut s, _) = l.accept().unwrap();
        let _ = crate::common::read_some(&mut s);
        let _ = s.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\nnot a vmm\r\n");
    });
    let r = migrate(&src, &to, &[]);
    peer.join().unwrap();
    let msg = &refused(&r).message;
    assert!(msg.contains("does not speak TLS"), "{msg}");
    still_running(&src);

    // unknown mode
    let r = migrate(&src, &addr, &["--mode", "sideways"]);
    assert_eq!(refused(&r).kind, "bad_request", "{r:?}");
    still_running(&src);
}

#[test]
fn migrate_over_a_unix_socket() {
    if !gates("migrate_over_a_unix_socket") {
        return;
    }
    let mut src = boot_guest(1, "64M");
    let path = crate::common::temp_path("incoming.sock");
    let listen = path.to_str().unwrap().to_owned();
    let dest = VmmProc::start(&["--incoming", &listen]);
    assert_eq!(dest.ctl_as::<IncomingStatus>(&["status"]).state, "incoming");
    check_report(&migrate(&src, &listen, &[]), 64 << 20);
    source_exits(&mut src);
    check_continues(&dest, &last_heartbeat(&src), 1);
    dest.ctl(&["shutdown"]);
    let _ = std::fs::remove_file(&path);
}

#[test]
fn migrate_between_two_network_namespaces() {
    if !gates("migrate_between_two_network_namespaces") {
        return;
    }
    // 1 ms round trip, 1 Gbit/s
    let hosts = match TwoHosts::new(Shape {
        delay_us: 500,
        rate_mbit: 1000,
    }) {
        Ok(h) => h,
        Err(e) => {
            crate::common::skip(format_args!(
                "migrate_between_two_network_namespaces: cannot create network namespaces: {e}"
            ));
            return;
        }
    };
    let mut src = boot_guest_in(Some(&hosts.a), 2, "256M");
    // nobody listening on the other host yet: refused, the VM runs on
    let r = migrate(&src, &format!("{}:7700", hosts.ip_b), &[]);
    refused(&r);
    still_running(&src);
    let (dest, addr) = start_dest(Some(&hosts.b), &hosts.ip_b, &[]);
    let r = check_report(&migrate(&src, &addr, &[]), 256 << 20);
    let rtt = r.rtt_us;
    if hosts.delayed {
        assert!(
            rtt > 900.0,
            "the link should have a 1 ms round trip, measured {rtt} us"
        );
    } else {
        println!("note: this kernel has no netem qdisc: the link is rate-limited (tbf) but not delayed (round trip {rtt:.0} us)");
    }
    source_exits(&mut src);
    check_continues(&dest, &last_heartbeat(&src), 2);
    // and back, over the same link
    let (back, addr_a) = start_dest(Some(&hosts.a), &hosts.ip_a, &[]);
    let mut dest = dest;
    check_report(&migrate(&dest, &addr_a, &[]), 256 << 20);
    source_exits(&mut dest);
    check_continues(&back, &last_heartbeat(&dest), 2);
    back.ctl(&["shutdown"]);
}
