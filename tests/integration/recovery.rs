//! Fault tolerance after the switch: a migration link cut for 30 s mid post-copy, a source
//! stopped (SIGSTOP) for 10 s, and a source killed (SIGKILL) for good; plus a control socket
//! that refuses other users.

use std::time::{Duration, Instant};

use vmm::api::replies::{MigrationReport, Status};
use vmm::api::Reply;

use crate::migration::{gates, refused, source_exits, start_dest};
use crate::netns::{Shape, TwoHosts};
use crate::vm::{boot_guest_in, checksum_line, ctl_raw, heartbeats, VmmProc};

/// Sends `sig` to a process this test started.
fn signal(p: &VmmProc, sig: i32) {
    // SAFETY: kill(2) on the PID of a child we started and still hold (not yet reaped).
    let rc = unsafe { libc::kill(p.pid(), sig) };
    assert_eq!(rc, 0, "kill: {}", std::io::Error::last_os_error());
}

/// Waits until the destination runs the VM after the switch (post-copy under way).
fn wait_running(dest: &VmmProc) -> Status {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let st = ctl_raw(&dest.sock, &["status"]);
        match st.body::<Status>() {
            Ok(s) if s.state == "running" => return s,
            _ => {}
        }
        assert!(Instant::now() < deadline, "destination never ran: {st:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn last_seq(p: &VmmProc) -> u64 {
    heartbeats(&p.serial_text()).last().map_or(0, |h| h.seq)
}

/// The guest stops writing and prints the checksum of its memory (on the source).
fn quiesce(src: &VmmProc) -> String {
    let since = src.serial_text().len();
    src.ctl(&["serial-input", "q"]);
    checksum_line(src, since)
}

/// The guest's checksum of its memory, computed on the destination.
fn guest_checksum(dest: &VmmProc) -> String {
    let since = dest.serial_text().len();
    dest.ctl(&["serial-input", "c"]);
    checksum_line(dest, since)
}

/// Two namespaces on a 200 Mbit/s link (256 MiB take ~11 s to stream), or None (SKIPPED).
fn slow_link(test: &str) -> Option<TwoHosts> {
    match TwoHosts::new(Shape {
        delay_us: 0,
        rate_mbit: 200,
    }) {
        Ok(h) => Some(h),
        Err(e) => {
            crate::common::skip(format_args!(
                "{test}: cannot create network namespaces: {e}"
            ));
            None
        }
    }
}

/// A post-copy migration under way between two slow-linked hosts: the guest quiesced (its
/// checksum taken), the destination running.
struct Underway {
    src: VmmProc,
    dest: VmmProc,
    before: String,
    migrate: std::thread::JoinHandle<Reply>,
    started: Instant,
}

impl Underway {
    fn start(hosts: &TwoHosts, extra: &'static [&'static str]) -> Underway {
        let src = boot_guest_in(Some(&hosts.a), 2, "256M");
        let before = quiesce(&src);
        let (dest, addr) = start_dest(Some(&hosts.b), &hosts.ip_b, &[]);
        let sock = src.sock.clone();
        let started = Instant::now();
        let migrate = std::thread::spawn(move || {
            let mut args = vec!["migrate", "--to", &addr];
            args.extend_from_slice(extra);
            ctl_raw(&sock, &args)
        });
        wait_running(&dest);
        Underway {
            src,
            dest,
            before,
            migrate,
            started,
        }
    }

    /// Waits for the migration; checks it completed with every page and the guest's memory
    /// unchanged. Returns the source's report and the destination's status.
    fn finish(mut self) -> (MigrationReport, Status, VmmProc) {
        let r = self.migrate.join().unwrap();
        let r: MigrationReport = r.body().unwrap_or_else(|e| panic!("{e}: {r:?}"));
        source_exits(&mut self.src);
        let st = self.dest.status();
        assert_eq!(st.pages_present, st.pages_total, "{st:?}");
        assert_eq!(
            guest_checksum(&self.dest),
            self.before,
            "guest memory changed in transit"
        );
        (r, st, self.dest)
    }
}

#[test]
fn postcopy_survives_a_30s_link_cut() {
    const T: &str = "postcopy_survives_a_30s_link_cut";
    if !gates(T) {
        return;
    }
    let Some(hosts) = slow_link(T) else { return };
    let m = Underway::start(&hosts, &["--recover-timeout-s", "90"]);
    std::thread::sleep(Duration::from_millis(1500));
    let st = m.dest.status();
    let (present, total) = (st.pages_present, st.pages_total);
    assert!(
        present < total,
        "post-copy already over before the cut: {st:?}"
    );
    // the source's side of the link goes down: nothing is closed, packets just vanish
    let cut = Instant::now();
    crate::netns::ip_in(&hosts.a, &["link", "set", "eth0", "down"]);
    std::thread::sleep(Duration::from_secs(5));
    let seq_a = last_seq(&m.dest);
    std::thread::sleep(Duration::from_secs(20));
    let seq_b = last_seq(&m.dest);
    let mid = m.dest.status();
    std::thread::sleep(Duration::from_secs(30).saturating_sub(cut.elapsed()));
    crate::netns::ip_in(&hosts.a, &["link", "set", "eth0", "up"]);
    let up = Instant::now();
    let started = m.started;
    let (r, st, dest) = m.finish();
    let done = Instant::now();
    let pager = st.pager.clone().expect("a pager");
    let reconnects = pager.reconnects;
    let without_ms = pager.disconnected_ms;
    println!(
        "link cut 30 s mid post-copy ({present}/{total} pages present at the cut): migration done \
         {:.1} s after it started, {:.1} s after the link came back; destination: {reconnects} \
         reconnect(s), {:.1} s without a source, max fault latency {:.0} ms; heartbeats during \
         the cut: {seq_a} -> {seq_b}; source's view: {:?}",
        (done - started).as_secs_f64(),
        (done - up).as_secs_f64(),
        without_ms / 1e3,
        pager.fault_latency.max_us / 1e3,
        r.recovery
    );
    assert!(reconnects >= 1, "{st:?}");
    assert!(r.recovery.page_server_reconnects >= 1, "{r:?}");
    assert!(without_ms > 20_000.0, "{st:?}");
    // the vCPUs ran on through the cut (the pages they use had arrived)
    assert!(
        seq_b > seq_a + 100,
        "the guest stalled during the cut: {mid:?}"
    );
    dest.ctl(&["shutdown"]);
}

#[test]
fn postcopy_survives_a_source_stopped_for_10s() {
    const T: &str = "postcopy_survives_a_source_stopped_for_10s";
    if !gates(T) {
        return;
    }
    let Some(hosts) = slow_link(T) else { return };
    let m = Underway::start(&hosts, &[]);
    std::thread::sleep(Duration::from_millis(1000));
    signal(&m.src, libc::SIGSTOP);
    let stopped = Instant::now();
    let seq_a = last_seq(&m.dest);
    std::thread::sleep(Duration::from_secs(10));
    let seq_b = last_seq(&m.dest);
    let mid = m.dest.status();
    signal(&m.src, libc::SIGCONT);
    let (_, st, dest) = m.finish();
    println!(
        "source stopped 10 s: migration done {:.1} s after the stop; heartbeats during it {seq_a} -> {seq_b}",
        stopped.elapsed().as_secs_f64()
    );
    assert!(mid.pages_present < st.pages_total, "{mid:?}");
    assert!(
        seq_b > seq_a + 100,
        "the guest stalled while the source was stopped: {mid:?}"
    );
    dest.ctl(&["shutdown"]);
}

#[test]
fn source_killed_mid_postcopy_leaves_the_destination_paused() {
    const T: &str = "source_killed_mid_postcopy_leaves_the_destination_paused";
    if !gates(T) {
        return;
    }
    const RECOVER_S: u64 = 3;
    let src = boot_guest_in(None, 2, "256M");
    // no stream: pages come on faults only, so post-copy is still under way when the source dies
    let (mut dest, addr) = start_dest(
        None,
        "127.0.0.1",
        &["--no-stream", "--recover-timeout-s", &RECOVER_S.to_string()],
    );
    // (the source dies before it can answer: no JSON reply is expected)
    let m = std::process::Command::new(crate::vm::VMM)
        .args(["ctl", "--api-socket"])
        .arg(&src.sock)
        .args(["--json", "migrate", "--to", &addr])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("vmm ctl migrate");
    wait_running(&dest);
    dest.heartbeats_after(None, 5);
    signal(&src, libc::SIGKILL);
    let killed = Instant::now();
    let _ = m.wait_with_output();
    let st = loop {
        let st = dest.status();
        if st.source_lost.is_some() {
            break st;
        }
        assert!(
            killed.elapsed() < Duration::from_secs(5 + RECOVER_S),
            "the destination did not report the lost source within 5 s + {RECOVER_S} s: {st:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let reported = killed.elapsed();
    println!(
        "source killed: destination reported it {:.2} s later (recover timeout {RECOVER_S} s): {:?}",
        reported.as_secs_f64(),
        st.source_lost
    );
    assert!(st.state.starts_with("source_lost"), "{st:?}");
    let missing = st.source_lost.as_ref().map_or(0, |l| l.pages_missing);
    assert!(missing > 0, "{st:?}");
    // paused for good: no heartbeat any more, resume and whole-RAM reads refused
    let seq = last_seq(&dest);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        last_seq(&dest),
        seq,
        "the VM runs on after its source was lost"
    );
    for cmd in [
        &["resume"][..],
        &["checksum"],
        &["migrate", "--to", "127.0.0.1:9"],
    ] {
        let r = ctl_raw(&dest.sock, cmd);
        assert!(
            refused(&r).message.contains("source was lost"),
            "{cmd:?}: {r:?}"
        );
    }
    // guest state stays inspectable: present pages can be read (the guest's code ran here)
    dest.ctl(&["read-memory", "--gpa", "0x100000", "--len", "16"]);
    let st = dest.status();
    assert_eq!(
        st.source_lost.as_ref().map(|l| l.pages_missing),
        Some(missing),
        "{st:?}"
    );
    dest.ctl(&["shutdown"]);
    assert_eq!(
        dest.wait_exit(Duration::from_secs(10)),
        3,
        "{}",
        dest.stderr_text()
    );
    assert!(dest.stderr_text().contains("memory source lost for good"));
}

#[test]
fn control_socket_refuses_other_users() {
    const T: &str = "control_socket_refuses_other_users";
    if !gates(T) {
        return;
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        crate::common::skip(format_args!("{T}: needs root to act as another user"));
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    let p = crate::vm::boot_guest(1, "64M");
    let as_nobody = || {
        std::process::Command::new(crate::vm::VMM)
            .args(["ctl", "--api-socket"])
            .arg(&p.sock)
            .args(["--json", "status"])
            .uid(65534)
            .gid(65534)
            .output()
            .expect("run vmm ctl as nobody")
    };
    // 0600: another user cannot even connect
    let out = as_nobody();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("ermission denied"), "{err}");
    // opened up by mistake: the vmm still refuses a peer of another user
    std::fs::set_permissions(&p.sock, std::fs::Permissions::from_mode(0o666)).unwrap();
    let out = as_nobody();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("another user"), "{text}");
    // and the owner is still served
    assert_eq!(p.status().state, "running");
}

#[test]
fn destination_killed_before_resume_leaves_the_source_running() {
    const T: &str = "destination_killed_before_resume_leaves_the_source_running";
    if !gates(T) {
        return;
    }
    let Some(hosts) = slow_link(T) else { return };
    let src = boot_guest_in(Some(&hosts.a), 2, "256M");
    // hybrid: a pre-copy pass (~11 s over this link) before the switch; the destination dies
    // in it, before it ever had the VM's state
    let (dest, addr) = start_dest(Some(&hosts.b), &hosts.ip_b, &[]);
    let sock = src.sock.clone();
    let m =
        std::thread::spawn(move || ctl_raw(&sock, &["migrate", "--to", &addr, "--mode", "hybrid"]));
    // 3 s into the first pass (of ~11 s)
    std::thread::sleep(Duration::from_secs(3));
    let st = src.status();
    assert_eq!(st.state, "migrating", "{st:?}");
    signal(&dest, libc::SIGKILL);
    let killed = Instant::now();
    let r = m.join().unwrap();
    println!(
        "destination killed in pre-copy: the source answered {:.2} s later: {:?}",
        killed.elapsed().as_secs_f64(),
        r.error
    );
    assert_ne!(refused(&r).kind, "migration_unknown", "{r:?}");
    // the VM runs on at the source, and only there
    let st = src.status();
    assert_eq!(st.state, "running", "{st:?}");
    let seq = last_seq(&src);
    src.heartbeats_after(Some(seq), 20);
}
