//! Disks and NICs that move with the VM: virtio-blk on an image both "hosts" share and
//! virtio-net on a tap in each host's bridge, migrated between two network namespaces while a
//! client in a third namespace keeps sending UDP echo requests (and pings) to the guest; the
//! guest's numbered sectors are verified after the move and checked in the image file; a
//! destination that finds another file at the disk's path refuses and the source runs on.

use std::net::UdpSocket;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmm::api::replies::{IncomingStatus, NetStats};

use crate::common::temp_path;
use crate::migration::{
    check_continues, check_report, gates, last_heartbeat, migrate, refused, source_exits,
    start_dest, still_running,
};
use crate::netns::{Shape, TwoHosts};
use crate::vm::VmmProc;

/// Sectors in the guest's numbered region (its default).
const SECTORS: u64 = 256;

/// A raw image of `mib` MiB (sparse), removed on drop.
struct Image(std::path::PathBuf);

impl Image {
    fn new(tag: &str, mib: u64) -> Image {
        let p = temp_path(tag);
        let f = std::fs::File::create(&p).expect("image");
        f.set_len(mib << 20).expect("image size");
        Image(p)
    }
    fn path(&self) -> &str {
        self.0.to_str().expect("utf-8 path")
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The image holds generation `gen` of the guest's numbered sectors and its header.
pub(crate) fn check_image(path: &Path, gen: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(path).expect("image");
    let mut s = [0u8; 512];
    f.read_exact_at(&mut s, 0).expect("header");
    assert_eq!(s, guest::disk_header(gen, SECTORS), "disk header");
    for sector in 1..=SECTORS {
        f.read_exact_at(&mut s, sector * 512).expect("sector");
        assert_eq!(
            s,
            guest::sector_pattern(sector, gen),
            "sector {sector} of generation {gen}"
        );
    }
}

/// What the UDP echo client saw.
#[derive(Debug, Default)]
pub(crate) struct EchoRun {
    pub sent: u64,
    /// (sequence, time the answer arrived).
    pub answers: Vec<(u64, Instant)>,
}

impl EchoRun {
    /// Longest time between two consecutive answers after `from`.
    pub fn longest_gap(&self, from: Instant, to: Instant) -> Duration {
        let mut times: Vec<Instant> = self
            .answers
            .iter()
            .map(|a| a.1)
            .filter(|t| *t >= from && *t <= to)
            .collect();
        times.sort();
        times
            .windows(2)
            .map(|w| w[1] - w[0])
            .max()
            .unwrap_or_default()
    }
    pub fn answered_after(&self, t: Instant) -> usize {
        self.answers.iter().filter(|a| a.1 > t).count()
    }
}

/// Sends a numbered UDP datagram to `target` (port 7) every `interval` from namespace `ns`
/// until `stop`, collecting the echoes; `answered` counts them as they come.
pub(crate) fn echo_client(
    ns: &str,
    target: String,
    interval: Duration,
    stop: Arc<AtomicBool>,
    answered: Arc<AtomicU64>,
) -> std::thread::JoinHandle<Result<EchoRun, String>> {
    TwoHosts::in_netns(ns, move || {
        let s = UdpSocket::bind("0.0.0.0:0").expect("udp socket");
        let to = format!("{target}:7");
        let mut run = EchoRun::default();
        let mut next = Instant::now();
        let mut buf = [0u8; 64];
        while !stop.load(Ordering::Relaxed) {
            let now = Instant::now();
            if now >= next {
                let mut msg = [0u8; 16];
                msg[..8].copy_from_slice(&run.sent.to_le_bytes());
                msg[8..].copy_from_slice(b"uffd-mig");
                // ARP may not be resolved yet: errors are just unanswered requests
                let _ = s.send_to(&msg, &to);
                run.sent += 1;
                next += interval;
            }
            // wait in recv until an answer or the next send (no busy loop)
            let wait = next
                .saturating_duration_since(Instant::now())
                .max(Duration::from_micros(20));
            s.set_read_timeout(Some(wait)).expect("timeout");
            if let Ok((16, _)) = s.recv_from(&mut buf) {
                if &buf[8..16] == b"uffd-mig" {
                    let seq = u64::from_le_bytes(buf[..8].try_into().unwrap());
                    run.answers.push((seq, Instant::now()));
                    answered.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        run
    })
}

/// One ICMP echo from namespace `ns` to `target`: true if answered within a second.
fn ping(ns: &str, target: &str) -> bool {
    let target: std::net::Ipv4Addr = target.parse().expect("ipv4");
    TwoHosts::in_netns(ns, move || {
        // SAFETY: plain socket calls on a descriptor this closure owns and closes.
        unsafe {
            let fd = libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_ICMP);
            if fd < 0 {
                return false;
            }
            let tv = libc::timeval {
                tv_sec: 0,
                tv_usec: 200_000,
            };
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as u32,
            );
            let mut pkt = [0u8; 16];
            pkt[0] = 8; // echo request
            pkt[4..6].copy_from_slice(&0x5155u16.to_be_bytes());
            pkt[8..16].copy_from_slice(b"pingtest");
            let sum = !pkt
                .chunks(2)
                .map(|c| u32::from(u16::from_be_bytes([c[0], c[1]])))
                .fold(0u32, |a, b| {
                    let s = a + b;
                    (s & 0xffff) + (s >> 16)
                }) as u16;
            pkt[2..4].copy_from_slice(&sum.to_be_bytes());
            let addr = libc::sockaddr_in {
                sin_family: libc::AF_INET as u16,
                sin_port: 0,
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(target.octets()),
                },
                sin_zero: [0; 8],
            };
            let deadline = Instant::now() + Duration::from_secs(1);
            let mut ok = false;
            while !ok && Instant::now() < deadline {
                libc::sendto(
                    fd,
                    pkt.as_ptr().cast(),
                    pkt.len(),
                    0,
                    (&addr as *const libc::sockaddr_in).cast(),
                    std::mem::size_of::<libc::sockaddr_in>() as u32,
                );
                let mut buf = [0u8; 128];
                let n = libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0);
                // IPv4 header (20 bytes) then the ICMP echo reply from the target
                ok = n >= 36
                    && buf[12..16] == target.octets()
                    && buf[20] == 0
                    && &buf[28..36] == b"pingtest";
            }
            libc::close(fd);
            ok
        }
    })
    .join()
    .ok()
    .and_then(Result::ok)
    .unwrap_or(false)
}

fn wait_count(c: &AtomicU64, n: u64, what: &str, p: &VmmProc) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while c.load(Ordering::Relaxed) < n {
        assert!(
            Instant::now() < deadline,
            "{what}: {} of {n}; serial: {}; stderr: {}",
            c.load(Ordering::Relaxed),
            p.serial_text()
                .lines()
                .filter(|l| !l.starts_with("HB"))
                .collect::<Vec<_>>()
                .join(" | "),
            p.stderr_text()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The first network device's counters in `status`.
fn net_stats(p: &VmmProc) -> Option<NetStats> {
    p.status().devices.into_iter().find_map(|d| d.net)
}

#[test]
fn disk_and_network_move_with_the_vm() {
    if !gates("disk_and_network_move_with_the_vm") {
        return;
    }
    let hosts = match TwoHosts::lan(Shape::default()) {
        Ok(h) => h,
        Err(e) => {
            crate::common::skip(format_args!(
                "disk_and_network_move_with_the_vm: cannot create network namespaces: {e}"
            ));
            return;
        }
    };
    let img = Image::new("disk", 64);
    let cmdline = format!("rate=2000 hot=50 ip={}", hosts.ip_guest);
    let mut src = VmmProc::start_in(
        Some(&hosts.a),
        &[
            "run",
            "--mem",
            "256M",
            "--vcpus",
            "2",
            "--disk",
            img.path(),
            "--net",
            "tap=tap0,mac-namespace=02:75:66",
            "--id",
            "devices-test",
            "--cmdline",
            &cmdline,
        ],
    );
    let blk = src.wait_line("BLK init", Duration::from_secs(30), |l| {
        l.starts_with("BLK init")
    });
    assert!(blk.ends_with("bad=0") || blk.contains("bad=0 "), "{blk}");
    let nic = src.wait_line("net device", Duration::from_secs(30), |l| {
        l.contains("dev=net")
    });
    // the MAC comes from the namespace given, not from any host NIC
    assert!(nic.contains("mac=02:75:66:"), "{nic}");
    src.wait_line("READY", Duration::from_secs(60), |l| l.starts_with("READY"));
    assert!(
        ping(&hosts.c, &hosts.ip_guest),
        "the guest does not answer pings"
    );

    let stop = Arc::new(AtomicBool::new(false));
    let answered = Arc::new(AtomicU64::new(0));
    let client = echo_client(
        &hosts.c,
        hosts.ip_guest.clone(),
        Duration::from_millis(1),
        stop.clone(),
        answered.clone(),
    );
    wait_count(&answered, 200, "UDP echoes from the source", &src);

    // shared storage (the same path) and a tap of the same name, named by the operator
    let disk_map = format!("--disk-map={}", img.path());
    // a destination whose operator gave no tap for the NIC: refused, nothing attached, and
    // the source is not told what this host has
    let (d0, addr0) = start_dest(Some(&hosts.b), &hosts.ip_b, &[&disk_map]);
    let r = migrate(&src, &addr0, &[]);
    let msg = &refused(&r).message;
    assert!(msg.contains("cannot be attached on this host"), "{msg}");
    assert!(d0.stderr_text().contains("has no --tap-map"), "{r:?}");
    drop(d0);
    let (dest, addr) = start_dest(
        Some(&hosts.b),
        &hosts.ip_b,
        &[&disk_map, "--tap-map", "tap0"],
    );
    let t_migrate = Instant::now();
    let r = migrate(&src, &addr, &[]);
    let t_done = Instant::now();
    let r = check_report(&r, 256 << 20);
    source_exits(&mut src);
    check_continues(&dest, &last_heartbeat(&src), 2);
    let before = answered.load(Ordering::Relaxed);
    wait_count(
        &answered,
        before + 500,
        "UDP echoes from the destination",
        &dest,
    );
    stop.store(true, Ordering::Relaxed);
    let run = client.join().expect("client thread").expect("client");
    let gap = run.longest_gap(t_migrate - Duration::from_millis(200), Instant::now());
    println!(
        "devices: downtime {:.1} ms, longest gap between UDP echoes {:.1} ms, {} of {} requests unanswered",
        r.downtime_ms,
        gap.as_secs_f64() * 1e3,
        run.sent - run.answers.len() as u64,
        run.sent
    );
    assert!(run.answered_after(t_done) >= 500, "{run:?}");
    // a sanity bound: the network came back (speed is the benchmark's business)
    assert!(gap < Duration::from_secs(5), "no echo for {gap:?}");
    assert!(
        ping(&hosts.c, &hosts.ip_guest),
        "no ping answer after the move"
    );
    // the destination announced the MAC and its NIC carries the traffic now
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let net = net_stats(&dest).expect("a network device");
        if net.announces == 5 {
            assert!(net.tx_frames > 100, "{net:?}");
            break;
        }
        assert!(Instant::now() < deadline, "announces: {net:?}");
        std::thread::sleep(Duration::from_millis(50));
    }

    // the disk: what the guest wrote on the source is there, and it goes on writing
    dest.ctl(&["serial-input", "v"]);
    let v = dest.wait_line("BLK verify", Duration::from_secs(20), |l| {
        l.starts_with("BLK verify")
    });
    assert!(v.contains("gen=1 ") && v.contains(" bad=0"), "{v}");
    dest.ctl(&["serial-input", "w"]);
    dest.wait_line("BLK wrote", Duration::from_secs(20), |l| {
        l.starts_with("BLK wrote gen=2")
    });
    let text = dest.serial_text();
    assert!(
        !text.contains("blkerr="),
        "background block I/O failed: {text}"
    );
    let mut dest = dest;
    dest.ctl(&["shutdown"]);
    dest.wait_exit(Duration::from_secs(10));
    check_image(&img.0, 2);
}

#[test]
fn destination_refuses_another_disk_at_the_same_path() {
    if !gates("destination_refuses_another_disk_at_the_same_path") {
        return;
    }
    let img = Image::new("disk", 16);
    let other = Image::new("other", 16);
    let smaller = Image::new("small", 8);
    let src = VmmProc::start(&[
        "run",
        "--mem",
        "128M",
        "--disk",
        img.path(),
        "--cmdline",
        "rate=500",
    ]);
    src.wait_line("READY", Duration::from_secs(60), |l| l.starts_with("READY"));
    src.heartbeats_after(None, 3);
    // Another host whose storage holds a different file at that path: a private mount
    // namespace with another image bind-mounted over it.
    let script = r#"mount --bind "$1" "$2" && shift 2 && exec "$@""#;
    let dest = VmmProc::start_wrapped(
        &[
            "unshare",
            "-m",
            "sh",
            "-c",
            script,
            "sh",
            other.path(),
            img.path(),
        ],
        &[
            "--incoming",
            "tcp:127.0.0.1:0",
            &format!("--disk-map={}", img.path()),
        ],
    );
    let addr = dest.ctl_as::<IncomingStatus>(&["status"]).listening;
    let r = migrate(&src, &addr, &[]);
    // the source learns that it was refused, not what the destination has at which path
    let msg = &refused(&r).message;
    assert!(msg.contains("cannot be attached on this host"), "{msg}");
    assert!(!msg.contains(img.path()) && !msg.contains("inode"), "{msg}");
    let log = dest.stderr_text();
    assert!(
        log.contains("not the source's disk") && log.contains("inode"),
        "the destination's log does not say why: {log}"
    );
    still_running(&src);
    // a destination without a mapping for the disk: nothing is opened at the peer's path
    let (d1, addr1) = start_dest(None, "127.0.0.1", &[]);
    let r = migrate(&src, &addr1, &[]);
    let msg = &refused(&r).message;
    assert!(msg.contains("cannot be attached on this host"), "{msg}");
    assert!(d1.stderr_text().contains("has no --disk-map"), "{r:?}");
    drop(d1);
    // a mapping to a FIFO: refused at once (opened non-blocking), the listener goes on
    let fifo = crate::common::temp_path("fifo");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(made.success(), "mkfifo {}", fifo.display());
    let map = format!("--disk-map={}={}", img.path(), fifo.display());
    let (d4, addr4) = start_dest(None, "127.0.0.1", &[&map]);
    let t0 = std::time::Instant::now();
    let r = migrate(&src, &addr4, &[]);
    assert!(refused(&r).message.contains("cannot be attached"), "{r:?}");
    assert!(
        t0.elapsed() < Duration::from_secs(10),
        "the FIFO held the destination"
    );
    assert!(
        d4.stderr_text()
            .contains("neither a regular file nor a block device"),
        "{r:?}"
    );
    let st: IncomingStatus = d4.ctl_as(&["status"]);
    assert_eq!(st.state, "incoming", "{st:?}");
    drop(d4);
    let _ = std::fs::remove_file(&fifo);
    // a destination whose file (through --disk-map) has another size, or no file at all
    let map = format!("--disk-map={}={}", img.path(), smaller.path());
    let (d2, addr2) = start_dest(None, "127.0.0.1", &[&map]);
    let r = migrate(&src, &addr2, &[]);
    let msg = &refused(&r).message;
    assert!(
        !msg.contains("bytes here") && !msg.contains(smaller.path()),
        "{msg}"
    );
    assert!(d2.stderr_text().contains("bytes here"), "{r:?}");
    drop(d2);
    let map = format!("--disk-map={}=/nonexistent/disk.img", img.path());
    let (d3, addr3) = start_dest(None, "127.0.0.1", &[&map]);
    let r = migrate(&src, &addr3, &[]);
    let msg = &refused(&r).message;
    assert!(!msg.contains("/nonexistent"), "{msg}");
    assert!(d3.stderr_text().contains("cannot open"), "{r:?}");
    drop(d3);
    still_running(&src);
    // the guest's disk is intact and still in use
    src.ctl(&["serial-input", "v"]);
    let v = src.wait_line("BLK verify", Duration::from_secs(20), |l| {
        l.starts_with("BLK verify")
    });
    assert!(v.contains(" bad=0"), "{v}");
}

/// FNV-style checksum of a whole file.
fn file_checksum(path: &Path) -> u64 {
    let bytes = std::fs::read(path).expect("read image");
    guest::checksum_words(
        bytes
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap())),
        guest::CHECKSUM_INIT,
    )
}

#[test]
fn copy_disk_moves_a_disk_that_is_not_shared() {
    if !gates("copy_disk_moves_a_disk_that_is_not_shared") {
        return;
    }
    let img = Image::new("disk", 32);
    let copy = temp_path("copy");
    let mut src = VmmProc::start(&[
        "run",
        "--mem",
        "256M",
        "--vcpus",
        "2",
        "--disk",
        img.path(),
        "--cmdline",
        "rate=2000 hot=50",
    ]);
    src.wait_line("READY", Duration::from_secs(60), |l| l.starts_with("READY"));
    let map = format!("--disk-map={}={}", img.path(), copy.display());
    // the local image must be new: an existing file is refused, the source runs on
    std::fs::write(&copy, b"x").unwrap();
    let (d0, addr0) = start_dest(None, "127.0.0.1", &[&map]);
    let r = migrate(&src, &addr0, &["--copy-disk"]);
    // refused; why (the file exists) only in the destination's own log
    assert!(
        refused(&r)
            .message
            .contains("cannot be attached on this host"),
        "{r:?}"
    );
    assert!(
        d0.stderr_text().contains("copy-disk writes a new image"),
        "{r:?}"
    );
    drop(d0);
    std::fs::remove_file(&copy).unwrap();
    still_running(&src);

    let (dest, addr) = start_dest(None, "127.0.0.1", &[&map]);
    let r = check_report(&migrate(&src, &addr, &["--copy-disk"]), 256 << 20);
    let copies = &r.destination.disk_copies;
    assert_eq!(copies.len(), 1, "{r:?}");
    assert_eq!(copies[0].bytes, 32u64 << 20, "{r:?}");
    source_exits(&mut src);
    check_continues(&dest, &last_heartbeat(&src), 2);
    // the copy is the source's disk as it was at the pause, byte for byte
    assert_eq!(file_checksum(&img.0), file_checksum(&copy));
    dest.ctl(&["serial-input", "v"]);
    let v = dest.wait_line("BLK verify", Duration::from_secs(20), |l| {
        l.starts_with("BLK verify")
    });
    assert!(v.contains(" bad=0"), "{v}");
    dest.ctl(&["serial-input", "w"]);
    dest.wait_line("BLK wrote", Duration::from_secs(20), |l| {
        l.starts_with("BLK wrote gen=2")
    });
    let mut dest = dest;
    dest.ctl(&["shutdown"]);
    dest.wait_exit(Duration::from_secs(10));
    // the destination's writes went to its copy; the source's image is untouched
    check_image(&copy, 2);
    check_image(&img.0, 1);
    let _ = std::fs::remove_file(&copy);
}

/// `--copy-disk` to a destination whose file system fills up (ENOSPC) during the write-back:
/// the destination keeps the VM paused (it never runs on a disk it could not keep) and keeps
/// the partial image; the source, never told Done for the disk, keeps its VM and its disk.
#[test]
fn copy_disk_that_fills_the_destination_keeps_the_vm_and_the_image() {
    if !gates("copy_disk_that_fills_the_destination_keeps_the_vm_and_the_image") {
        return;
    }
    // a 4 MiB tmpfs of our own for the destination's copy (a 32 MiB disk does not fit)
    let dir = temp_path("enospc");
    std::fs::create_dir_all(&dir).unwrap();
    use std::process::Command;
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=4M,mode=0700", "tmpfs"])
        .arg(&dir)
        .status();
    if !mounted.is_ok_and(|s| s.success()) {
        tests::skip(
            "copy_disk_that_fills_the_destination_keeps_the_vm_and_the_image: cannot mount a tmpfs (needs root)",
        );
        return;
    }
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
            let _ = std::fs::remove_dir(&self.0);
        }
    }
    let _unmount = Unmount(dir.clone());
    let img = Image::new("disk", 32);
    let copy = dir.join("copy.img");
    let src = VmmProc::start(&[
        "run",
        "--mem",
        "128M",
        "--disk",
        img.path(),
        "--cmdline",
        "rate=500",
    ]);
    src.wait_line("READY", Duration::from_secs(60), |l| l.starts_with("READY"));
    let map = format!("--disk-map={}={}", img.path(), copy.display());
    let (dest, addr) = start_dest(None, "127.0.0.1", &[&map]);
    let sock = src.sock.clone();
    let mig = std::thread::spawn(move || {
        crate::vm::ctl_raw(
            &sock,
            &[
                "migrate",
                "--to",
                &addr,
                "--copy-disk",
                "--recover-timeout-s",
                "5",
            ],
        )
    });
    // the write-back hits the full file system
    let t0 = Instant::now();
    while !dest.stderr_text().contains("No space left") {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "no ENOSPC: {}",
            dest.stderr_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_secs(1));
    let log = dest.stderr_text();
    println!(
        "destination: {}",
        log.lines()
            .filter(|l| l.contains("disk") || l.contains("paused"))
            .collect::<Vec<_>>()
            .join("\n  ")
    );
    // the destination's VM does not run on: paused, and its image is there
    let st: vmm::api::replies::Status = dest.ctl_as(&["status"]);
    assert!(
        st.state.contains("source_lost") || st.state.contains("paused"),
        "the destination runs a VM whose disk it could not keep: {st:?}"
    );
    assert!(copy.exists(), "the partial image was deleted");
    // ended here (shutdown: the paused VM's devices are dropped): the image stays
    let mut dest = dest;
    dest.ctl(&["shutdown"]);
    let code = dest.wait_exit(Duration::from_secs(20));
    println!("destination exit code {code}");
    assert!(copy.exists(), "the destination removed the image on exit");
    // the source was never told the disk is safe: its migration did not complete and it has
    // not let go of its VM (it waits for a destination to come back, then says it failed)
    let r = mig.join().unwrap();
    println!("source's reply: {r:?}");
    assert!(
        !r.ok,
        "the source declared complete a migration whose disk was lost: {r:?}"
    );
    let src_log = src.stderr_text();
    assert!(
        !src_log.contains("guest memory freed"),
        "the source freed the VM: {src_log}"
    );
    assert!(
        std::fs::metadata(img.path()).is_ok(),
        "the source's image is gone"
    );
}
