//! `vm-devices`: what a client sees of a VM's network while it migrates, and what moving its
//! disk costs.
//!
//! Network: two "hosts" (network namespaces, each a bridge with its uplink and a tap) and a
//! client namespace on one subnet. Our guest runs with a virtio-net NIC on host A's tap and a
//! virtio-blk disk on an image both hosts share; a client sends a UDP echo request to the guest
//! every 1 ms; the VM migrates to host B (which announces it with RARP). Figure: the longest
//! time between two answered requests around the migration, against the target
//! 2 × downtime + 10 ms, per mode (postcopy, hybrid), several runs.
//!
//! Disk: the same guest with a disk full of data migrates over loopback twice per run — the
//! disk on shared storage (re-opened, nothing copied), then with `--copy-disk` (a new image on
//! the destination, filled like memory is). Targets: copy-disk adds nothing to the downtime;
//! its total time ≤ 1.1 × (guest memory + disk) / raw loopback TCP throughput measured in the
//! same run.

use bench::{hb, measure, ours};
use std::net::UdpSocket;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use serde::Serialize;
use serde_json::json;
use vmm::api::replies::{MigrationReport, StateNow};
use vmm::api::Request;

use hb::{ip, Switched};
use ours::{ctl_as, Vmm};

/// Network interruption and disk transfer of a migrating VM (our vmm), with targets.
///
/// Writes target/bench/devices.json and prints one table per part. A MISS is reported, never
/// an error; the exit code is 1 only when something could not be measured. Needs root (network
/// namespaces, taps), /dev/kvm and userfaultfd.
#[derive(Parser, Debug, Clone)]
#[command(name = "vm-devices")]
struct Args {
    /// Smaller guest and disk, fewer runs.
    #[arg(long)]
    quick: bool,
    /// Runs per configuration (default 3; 2 with --quick).
    #[arg(long)]
    runs: Option<u32>,
    /// Guest memory in MiB (default 1024; 512 with --quick).
    #[arg(long)]
    mem: Option<u64>,
    /// Disk image in MiB for the copy-disk part (default 1024; 256 with --quick).
    #[arg(long)]
    disk: Option<u64>,
    /// Guest page writes per second.
    #[arg(long, default_value_t = 2000)]
    rate: u64,
    /// Skip the network part.
    #[arg(long)]
    no_net: bool,
    /// Skip the disk part.
    #[arg(long)]
    no_disk: bool,
    /// The vmm binary (default: next to this one).
    #[arg(long)]
    vmm: Option<PathBuf>,
    /// JSON output.
    #[arg(long, default_value = "target/bench/devices.json")]
    out: PathBuf,
    /// Logs, sockets and images.
    #[arg(long, default_value = "target/bench/devices")]
    workdir: PathBuf,
}

fn say(m: &str) {
    eprintln!("[vm-devices] {m}");
}

/// Hosts A and B (bridge br0 = uplink eth0 + tap0) and client C, on a bridge in a fourth
/// namespace. Deleted on drop.
struct Lan {
    net: Switched,
    ip_b: String,
    guest: String,
}

impl Lan {
    fn new() -> Result<Lan> {
        let net = Switched::new("vmdev", &["a", "b", "c"])?;
        for (i, n) in net.ns[..3].iter().enumerate() {
            let cidr = format!("10.213.7.{}/24", [1, 2, 100][i]);
            if i < 2 {
                ip(&["-n", n, "link", "add", "br0", "type", "bridge"])?;
                ip(&["-n", n, "link", "set", "eth0", "master", "br0", "up"])?;
                ip(&["-n", n, "tuntap", "add", "dev", "tap0", "mode", "tap"])?;
                ip(&["-n", n, "link", "set", "tap0", "master", "br0", "up"])?;
                ip(&["-n", n, "addr", "add", &cidr, "dev", "br0"])?;
                ip(&["-n", n, "link", "set", "br0", "up"])?;
            } else {
                ip(&["-n", n, "addr", "add", &cidr, "dev", "eth0"])?;
                ip(&["-n", n, "link", "set", "eth0", "up"])?;
            }
        }
        Ok(Lan {
            net,
            ip_b: "10.213.7.2".into(),
            guest: "10.213.7.50".into(),
        })
    }
}

/// Sends a numbered UDP request to `target:7` every millisecond from namespace `ns` until
/// `stop`; returns when each answer came.
fn echo_client(
    ns: String,
    target: String,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<Result<(u64, Vec<Instant>)>> {
    std::thread::spawn(move || {
        let f = std::fs::File::open(format!("/run/netns/{ns}")).context("netns")?;
        // SAFETY: setns on this thread only, with a namespace fd we hold open.
        if unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&f), libc::CLONE_NEWNET) } != 0 {
            bail!("setns {ns}: {}", std::io::Error::last_os_error());
        }
        let s = UdpSocket::bind("0.0.0.0:0")?;
        let to = format!("{target}:7");
        let (mut sent, mut answers) = (0u64, Vec::new());
        let mut next = Instant::now();
        let mut buf = [0u8; 64];
        while !stop.load(Ordering::Relaxed) {
            let now = Instant::now();
            if now >= next {
                let _ = s.send_to(&sent.to_le_bytes(), &to);
                sent += 1;
                next += Duration::from_millis(1);
            }
            // sleep in recv until an answer or the next send (no busy loop stealing the CPU)
            let wait = next
                .saturating_duration_since(Instant::now())
                .max(Duration::from_micros(20));
            s.set_read_timeout(Some(wait))?;
            if let Ok((8, _)) = s.recv_from(&mut buf) {
                answers.push(Instant::now());
            }
        }
        Ok((sent, answers))
    })
}

#[derive(Debug, Clone, Serialize)]
struct NetRun {
    mode: String,
    run: u32,
    downtime_ms: f64,
    total_ms: f64,
    longest_gap_ms: f64,
    target_ms: f64,
    pass: bool,
    requests: u64,
    unanswered: u64,
    /// Longest gap in the second before the migration (the baseline).
    baseline_gap_ms: f64,
}

fn gap_ms(answers: &[Instant], from: Instant, to: Instant) -> f64 {
    let t: Vec<&Instant> = answers
        .iter()
        .filter(|t| **t >= from && **t <= to)
        .collect();
    t.windows(2)
        .map(|w| (*w[1] - *w[0]).as_secs_f64() * 1e3)
        .fold(0.0, f64::max)
}

fn shutdown(v: &mut Vmm) {
    let _ = ctl_as::<StateNow>(&v.sock, &Request::Shutdown {}, Duration::from_secs(5));
    v.proc.wait_exit(Duration::from_secs(5));
}

fn boot_args(mem: u64, cmdline: &str, extra: &[&str]) -> Vec<String> {
    let mut a: Vec<String> = ["run", "--mem", &format!("{mem}M"), "--vcpus", "2"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    a.extend(extra.iter().map(|s| s.to_string()));
    a.extend(["--cmdline".to_string(), cmdline.to_string()]);
    a
}

fn wait_ready(v: &mut Vmm, mem: u64) -> Result<()> {
    let fill = Duration::from_secs(60 + 60 * mem.div_ceil(1024));
    v.serial
        .wait("READY", fill, |l| l.starts_with("READY"))
        .map(|_| ())
        .with_context(|| v.fail_context())
}

fn migrate_req(to: &str, mode: &str, copy_disk: bool) -> Request {
    Request::Migrate {
        to: to.into(),
        mode: Some(mode.into()),
        max_passes: None,
        threshold_pages: None,
        max_downtime_ms: None,
        dirty_tracking: None,
        verify: false,
        copy_disk,
        recover_timeout_s: None,
    }
}

fn net_run(a: &Args, vmm: &Path, mem: u64, mode: &str, run: u32) -> Result<NetRun> {
    let lan = Lan::new().context("creating the network namespaces (root and iproute2 needed)")?;
    let dir = a.workdir.join(format!("net-{mode}-{run}"));
    std::fs::create_dir_all(&dir)?;
    let img = dir.join("disk.img");
    std::fs::File::create(&img)?.set_len(64 << 20)?;
    let cmdline = format!("rate={} ip={}", a.rate, lan.guest);
    let extra = [
        "--disk",
        img.to_str().context("path")?,
        "--net",
        "tap=tap0,mac-namespace=02:62:65",
    ];
    let mut src = Vmm::start_at(
        vmm,
        &dir,
        Some(&lan.net.ns[0]),
        "src",
        &boot_args(mem, &cmdline, &extra),
    )?;
    wait_ready(&mut src, mem)?;
    let port = 7900 + run as u16;
    let to = format!("tcp:{}:{port}", lan.ip_b);
    let mut dst = Vmm::start_at(
        vmm,
        &dir,
        Some(&lan.net.ns[1]),
        "dst",
        &[
            "--incoming".into(),
            to.clone(),
            // shared storage and a tap of the same name, as the operator maps them
            format!("--disk-map={}", img.display()),
            "--tap-map=tap0".into(),
        ],
    )?;
    let stop = Arc::new(AtomicBool::new(false));
    let client = echo_client(lan.net.ns[2].clone(), lan.guest.clone(), stop.clone());
    hb::settle_then_warm(2.0, (mem + 512) << 20);
    let t0 = Instant::now();
    let r = ctl_as::<MigrationReport>(
        &src.sock,
        &migrate_req(&to, mode, false),
        Duration::from_secs(300),
    );
    let t1 = Instant::now();
    std::thread::sleep(Duration::from_secs(1));
    stop.store(true, Ordering::Relaxed);
    let (sent, answers) = client
        .join()
        .map_err(|_| anyhow::anyhow!("client thread panicked"))??;
    let r = r.with_context(|| format!("{}; {}", src.fail_context(), dst.fail_context()))?;
    src.proc.wait_exit(Duration::from_secs(10));
    shutdown(&mut dst);
    let downtime = r.downtime_ms;
    let gap = gap_ms(
        &answers,
        t0 - Duration::from_millis(100),
        t1 + Duration::from_secs(1),
    );
    if answers.iter().filter(|t| **t > t1).count() < 100 {
        bail!(
            "the guest did not answer after the migration ({} answers in all)",
            answers.len()
        );
    }
    let target = 2.0 * downtime + 10.0;
    Ok(NetRun {
        mode: mode.into(),
        run,
        downtime_ms: downtime,
        total_ms: r.total_ms,
        longest_gap_ms: gap,
        target_ms: target,
        pass: gap <= target,
        requests: sent,
        unanswered: sent.saturating_sub(answers.len() as u64),
        baseline_gap_ms: gap_ms(
            &answers,
            t0 - Duration::from_millis(1100),
            t0 - Duration::from_millis(100),
        ),
    })
}

#[derive(Debug, Clone, Serialize)]
struct DiskRun {
    run: u32,
    copy_disk: bool,
    downtime_ms: f64,
    total_ms: f64,
    disk_copy_ms: Option<f64>,
    write_back_ms: Option<f64>,
    disk_bytes_sent: u64,
    copy_equal: Option<bool>,
}

/// Fills `path` with `mib` MiB of non-zero pseudo-random data (nothing to skip as zero pages).
fn fill_image(path: &Path, mib: u64) -> Result<()> {
    use std::io::Write;
    let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut buf = vec![0u8; 1 << 20];
    for _ in 0..mib {
        for c in buf.chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            c.copy_from_slice(&(x | 1).to_le_bytes());
        }
        f.write_all(&buf)?;
    }
    f.flush()?;
    Ok(())
}

fn file_hash(p: &Path) -> Result<u64> {
    use std::io::Read;
    let mut f = std::fs::File::open(p)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            return Ok(h);
        }
        for c in buf[..n].chunks(8) {
            let mut w = [0u8; 8];
            w[..c.len()].copy_from_slice(c);
            h = (h ^ u64::from_le_bytes(w)).wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
}

fn disk_run(a: &Args, vmm: &Path, mem: u64, img: &Path, run: u32, copy: bool) -> Result<DiskRun> {
    let dir = a.workdir.join(format!(
        "disk-{run}-{}",
        if copy { "copy" } else { "shared" }
    ));
    std::fs::create_dir_all(&dir)?;
    let target = dir.join("copy.img");
    let _ = std::fs::remove_file(&target);
    let imgs = img.to_str().context("path")?;
    let cmdline = format!("rate={}", a.rate);
    let mut src = Vmm::start_at(
        vmm,
        &dir,
        None,
        "src",
        &boot_args(mem, &cmdline, &["--disk", imgs]),
    )?;
    wait_ready(&mut src, mem)?;
    let port = hb::free_port()?;
    let to = format!("tcp:127.0.0.1:{port}");
    let mut dargs = vec!["--incoming".to_string(), to.clone()];
    dargs.push(if copy {
        format!("--disk-map={imgs}={}", target.display())
    } else {
        // shared storage: the same path, named by the operator
        format!("--disk-map={imgs}")
    });
    let mut dst = Vmm::start_at(vmm, &dir, None, "dst", &dargs)?;
    // this host backs its memory lazily (see hb::warm_host_memory): warm what the destination's
    // RAM, a staging copy of the disk and the new image's page cache will take, for both runs
    let disk_mib = std::fs::metadata(img)?.len() >> 20;
    hb::settle_then_warm(2.0, (mem + 2 * disk_mib + 512) << 20);
    let r = ctl_as::<MigrationReport>(
        &src.sock,
        &migrate_req(&to, "postcopy", copy),
        Duration::from_secs(600),
    )
    .with_context(|| format!("{}; {}", src.fail_context(), dst.fail_context()))?;
    src.proc.wait_exit(Duration::from_secs(10));
    let dc = r.destination.disk_copies.first();
    let copy_equal = if copy {
        // quiesce the guest's disk I/O before comparing (its background writes rewrite the
        // same bytes, so the copy must equal the source image as it was at the pause)
        Some(file_hash(img)? == file_hash(&target)?)
    } else {
        None
    };
    shutdown(&mut dst);
    let _ = std::fs::remove_file(&target);
    Ok(DiskRun {
        run,
        copy_disk: copy,
        downtime_ms: r.downtime_ms,
        total_ms: r.total_ms,
        disk_copy_ms: dc.map(|d| d.ms),
        write_back_ms: dc.map(|d| d.write_back_ms),
        disk_bytes_sent: r.disk_bytes_sent,
        copy_equal,
    })
}

fn pass(ok: bool) -> &'static str {
    if ok {
        "PASS"
    } else {
        "MISS"
    }
}

fn main() -> ExitCode {
    page_server::cli::exit_quietly_on_broken_pipe();
    env_logger::init();
    let a = Args::parse();
    match run(&a) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vm-devices: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(a: &Args) -> Result<()> {
    let runs = a.runs.unwrap_or(if a.quick { 2 } else { 3 });
    let mem = a.mem.unwrap_or(if a.quick { 512 } else { 1024 });
    let disk_mib = a.disk.unwrap_or(if a.quick { 256 } else { 1024 });
    let vmm = match &a.vmm {
        Some(p) => p.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("exe dir")?
            .join("vmm"),
    };
    std::fs::create_dir_all(&a.workdir)?;
    let mut out = json!({"mem_mib": mem, "vcpus": 2, "rate": a.rate});
    if !a.no_net {
        let mut rows = Vec::new();
        for run in 0..runs {
            for mode in ["postcopy", "hybrid"] {
                say(&format!("network: {mode} run {}/{runs}", run + 1));
                let r = net_run(a, &vmm, mem, mode, run)?;
                say(&format!(
                    "  downtime {:.2} ms, longest gap {:.1} ms (target {:.1}) {}",
                    r.downtime_ms,
                    r.longest_gap_ms,
                    r.target_ms,
                    pass(r.pass)
                ));
                rows.push(r);
            }
        }
        println!("\nNetwork interruption (UDP echo every 1 ms from a third namespace; {mem} MiB, 2 vCPUs, {} writes/s)", a.rate);
        println!(
            "{:<9} {:>4} {:>12} {:>16} {:>12} {:>10} {:>14} {:>6}",
            "mode", "run", "downtime ms", "longest gap ms", "target ms", "lost", "baseline gap", ""
        );
        for r in &rows {
            println!(
                "{:<9} {:>4} {:>12.2} {:>16.1} {:>12.1} {:>10} {:>14.1} {:>6}",
                r.mode,
                r.run + 1,
                r.downtime_ms,
                r.longest_gap_ms,
                r.target_ms,
                format!("{}/{}", r.unanswered, r.requests),
                r.baseline_gap_ms,
                pass(r.pass)
            );
        }
        out["network"] = serde_json::to_value(&rows)?;
    }
    if !a.no_disk {
        say("raw loopback TCP throughput...");
        let gbps = measure::tcp_gbps(4 << 30)?;
        say(&format!("  {gbps:.1} Gbit/s"));
        let img = a.workdir.join("data-disk.img");
        say(&format!("writing a {disk_mib} MiB disk image of data..."));
        fill_image(&img, disk_mib)?;
        let mut rows = Vec::new();
        for run in 0..runs {
            for copy in [false, true] {
                say(&format!(
                    "disk: {} run {}/{runs}",
                    if copy {
                        "--copy-disk"
                    } else {
                        "shared storage"
                    },
                    run + 1
                ));
                rows.push(disk_run(a, &vmm, mem, &img, run, copy)?);
            }
        }
        let _ = std::fs::remove_file(&img);
        // the guest fills all RAM above 16 MiB; the disk is all data
        let bytes = ((mem - 16) << 20) + (disk_mib << 20);
        let limit_ms = bytes as f64 * 8.0 / (gbps * 1e9) * 1e3;
        println!("\nDisk transfer ({mem} MiB guest, {disk_mib} MiB disk of data, over loopback; limit = (RAM + disk) / {gbps:.1} Gbit/s = {limit_ms:.0} ms)");
        println!(
            "{:>4} {:<16} {:>12} {:>10} {:>14} {:>12} {:>8} {:>6}",
            "run", "disk", "downtime ms", "total ms", "disk copy ms", "x limit", "equal", ""
        );
        let mut summary = Vec::new();
        for run in 0..runs {
            let sh = rows.iter().find(|r| r.run == run && !r.copy_disk);
            let cp = rows.iter().find(|r| r.run == run && r.copy_disk);
            if let (Some(sh), Some(cp)) = (sh, cp) {
                let ratio = cp.total_ms / limit_ms;
                // "adds nothing": within 0.5 ms of the same run's shared-storage downtime
                let dt_ok = cp.downtime_ms <= sh.downtime_ms + 0.5;
                for r in [sh, cp] {
                    println!(
                        "{:>4} {:<16} {:>12.2} {:>10.0} {:>14} {:>12} {:>8} {:>6}",
                        run + 1,
                        if r.copy_disk { "--copy-disk" } else { "shared" },
                        r.downtime_ms,
                        r.total_ms,
                        r.disk_copy_ms.map_or("-".into(), |m| format!("{m:.0}")),
                        if r.copy_disk {
                            format!("{ratio:.2}")
                        } else {
                            "-".into()
                        },
                        r.copy_equal.map_or("-".into(), |e| e.to_string()),
                        if r.copy_disk {
                            format!("{}/{}", pass(dt_ok), pass(ratio <= 1.1))
                        } else {
                            String::new()
                        }
                    );
                }
                summary.push(json!({
                    "run": run, "downtime_added_ms": cp.downtime_ms - sh.downtime_ms,
                    "downtime_pass": dt_ok, "total_over_limit": ratio, "total_pass": ratio <= 1.1,
                }));
            }
        }
        println!("(targets: copy-disk downtime within 0.5 ms of shared storage's / total <= 1.1 x limit)");
        if rows.iter().any(|r| r.copy_equal == Some(false)) {
            bail!("a copied disk differs from the source's image");
        }
        out["disk"] = json!({
            "disk_mib": disk_mib, "raw_tcp_gbps": gbps, "limit_ms": limit_ms,
            "runs": rows, "summary": summary,
        });
    }
    if let Some(d) = a.out.parent() {
        std::fs::create_dir_all(d)?;
    }
    std::fs::write(&a.out, serde_json::to_string_pretty(&out)?)?;
    say(&format!("wrote {}", a.out.display()));
    Ok(())
}
