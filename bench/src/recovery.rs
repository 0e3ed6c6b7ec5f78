//! `vm-recovery`: what a link cut in the middle of post-copy costs.
//!
//! Two "hosts" (network namespaces on a bridge in a third), their uplinks rate-limited so that
//! post-copy lasts some seconds. Our guest (writing memory) migrates from A to B twice per run:
//! once undisturbed (the baseline), once with A's uplink taken down for `--cut-s` seconds soon
//! after the destination resumed (nothing is closed: packets just vanish, as when a cable or a
//! switch fails). Target: the cut run takes at most cut + 1 s longer than the baseline of the
//! same run. Also printed: the destination's reconnects and time without a source, how long
//! the migration needed once the link was back, and whether every page arrived (the guest's
//! own checksum of its memory, before and after).

use bench::{hb, ours};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use vmm::api::replies::{IncomingStatus, MigrationReport, Queued, StateNow, Status};
use vmm::api::Request;

use hb::{ip, Switched};
use ours::{ctl_as, Vmm};

/// The reply to `status`: a VM's, or that of a `vmm --incoming` still waiting for its
/// migration.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum AnyStatus {
    Vm(Box<Status>),
    Incoming(IncomingStatus),
}

impl AnyStatus {
    fn state(&self) -> &str {
        match self {
            AnyStatus::Vm(s) => &s.state,
            AnyStatus::Incoming(s) => &s.state,
        }
    }
}

/// Post-copy recovery after a link cut (our vmm), against a baseline run without the cut.
///
/// Writes target/bench/recovery.json. A MISS is reported, never an error; the exit code is 1
/// only when something could not be measured. Needs root (network namespaces), /dev/kvm and
/// userfaultfd.
#[derive(Parser, Debug, Clone)]
#[command(name = "vm-recovery")]
struct Args {
    /// Runs (each: a baseline and a cut migration).
    #[arg(long, default_value_t = 2)]
    runs: u32,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 256)]
    mem: u64,
    /// Rate of each host's uplink, Mbit/s (tbf): sets how long post-copy lasts.
    #[arg(long, default_value_t = 200)]
    rate_mbit: u32,
    /// How long the link is down.
    #[arg(long, default_value_t = 30)]
    cut_s: u64,
    /// The cut starts this long after the destination resumed the VM.
    #[arg(long, default_value_t = 1500)]
    cut_after_ms: u64,
    /// Guest page writes per second.
    #[arg(long, default_value_t = 2000)]
    rate: u64,
    /// The vmm binary (default: next to this one).
    #[arg(long)]
    vmm: Option<PathBuf>,
    /// JSON output.
    #[arg(long, default_value = "target/bench/recovery.json")]
    out: PathBuf,
    /// Logs and sockets.
    #[arg(long, default_value = "target/bench/recovery")]
    workdir: PathBuf,
}

fn say(m: &str) {
    eprintln!("[vm-recovery] {m}");
}

/// Hosts A and B, each with a rate-limited uplink eth0, on a bridge in namespace `sw`.
struct Hosts {
    net: Switched,
    ip_b: String,
}

impl Hosts {
    fn new(rate_mbit: u32) -> Result<Hosts> {
        let net = Switched::new("vmrec", &["a", "b"])?;
        for (i, n) in net.ns[..2].iter().enumerate() {
            let cidr = format!("10.214.7.{}/24", i + 1);
            ip(&["-n", n, "addr", "add", &cidr, "dev", "eth0"])?;
            ip(&["-n", n, "link", "set", "eth0", "up"])?;
            let rate = format!("{rate_mbit}mbit");
            ip(&[
                "netns", "exec", n, "tc", "qdisc", "add", "dev", "eth0", "root", "tbf", "rate",
                &rate, "burst", "256kb", "latency", "50ms",
            ])?;
        }
        Ok(Hosts {
            net,
            ip_b: "10.214.7.2".into(),
        })
    }
}

#[derive(Debug, Clone, Serialize)]
struct Run {
    run: u32,
    cut: bool,
    /// From the `migrate` request to its reply (source side), ms.
    wall_ms: f64,
    downtime_ms: f64,
    /// The source's total (pause to completion), ms.
    total_ms: f64,
    /// Pages present on the destination when the link went down.
    present_at_cut: Option<u64>,
    pages_total: u64,
    /// From the link coming back to the migration's end, ms.
    after_link_up_ms: Option<f64>,
    reconnects: u64,
    disconnected_ms: f64,
    max_fault_ms: f64,
    /// The guest's checksum of its memory was the same before and after.
    checksum_equal: bool,
}

fn wait_line(v: &Vmm, what: &str, secs: u64, pred: impl Fn(&str) -> bool) -> Result<String> {
    v.serial
        .wait(what, Duration::from_secs(secs), pred)
        .map(|(_, l)| l)
}

/// The guest's checksum line printed after it was asked (`q` on the source: stop writing and
/// print; `c` on the destination: print).
fn guest_checksum(v: &Vmm, cmd: &str) -> Result<String> {
    let before = v.serial.snapshot().0.len();
    ctl_as::<Queued>(
        &v.sock,
        &Request::SerialInput { data: cmd.into() },
        Duration::from_secs(5),
    )?;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let lines = v.serial.snapshot().0;
        if let Some((_, l)) = lines
            .iter()
            .skip(before)
            .find(|(_, l)| l.starts_with("CK ") && l.contains(" pages="))
        {
            return Ok(l.split(' ').nth(1).unwrap_or("").to_owned());
        }
        if Instant::now() > deadline {
            bail!("no checksum line from the guest");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn one(a: &Args, vmm: &Path, run: u32, cut: bool) -> Result<Run> {
    let hosts = Hosts::new(a.rate_mbit)
        .context("creating the network namespaces (root, iproute2 and tbf needed)")?;
    let dir = a
        .workdir
        .join(format!("run{run}-{}", if cut { "cut" } else { "base" }));
    std::fs::create_dir_all(&dir)?;
    let args: Vec<String> = [
        "run",
        "--mem",
        &format!("{}M", a.mem),
        "--vcpus",
        "2",
        "--cmdline",
        &format!("rate={}", a.rate),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut src = Vmm::start_at(vmm, &dir, Some(&hosts.net.ns[0]), "src", &args)?;
    wait_line(&src, "READY", 120, |l| l.starts_with("READY"))
        .with_context(|| src.fail_context())?;
    let to = format!("tcp:{}:{}", hosts.ip_b, 7950 + run);
    let mut dst = Vmm::start_at(
        vmm,
        &dir,
        Some(&hosts.net.ns[1]),
        "dst",
        &["--incoming".into(), to.clone()],
    )?;
    hb::settle_then_warm(1.0, (a.mem + 512) << 20);
    let before = guest_checksum(&src, "q")?;
    let sock = src.sock.clone();
    let req = Request::Migrate {
        to,
        mode: None,
        max_passes: None,
        threshold_pages: None,
        max_downtime_ms: None,
        dirty_tracking: None,
        verify: false,
        copy_disk: false,
        recover_timeout_s: Some(a.cut_s * 3 + 30),
    };
    let t0 = Instant::now();
    let m = std::thread::spawn(move || {
        ctl_as::<MigrationReport>(&sock, &req, Duration::from_secs(900))
    });
    let mut present_at_cut = None;
    let mut up = None;
    if cut {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let st = ctl_as::<AnyStatus>(&dst.sock, &Request::Status {}, Duration::from_secs(5))?;
            if st.state() == "running" {
                break;
            }
            if Instant::now() > deadline || m.is_finished() {
                bail!("the destination never ran: {st:?}");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        std::thread::sleep(Duration::from_millis(a.cut_after_ms));
        let st = ctl_as::<Status>(&dst.sock, &Request::Status {}, Duration::from_secs(5))?;
        present_at_cut = Some(st.pages_present);
        ip(&["-n", &hosts.net.ns[0], "link", "set", "eth0", "down"])?;
        say(&format!(
            "run {run}: link down ({} of {} pages present)",
            present_at_cut.unwrap_or(0),
            st.pages_total
        ));
        std::thread::sleep(Duration::from_secs(a.cut_s));
        ip(&["-n", &hosts.net.ns[0], "link", "set", "eth0", "up"])?;
        up = Some(Instant::now());
        say(&format!("run {run}: link up"));
    }
    let r = m
        .join()
        .map_err(|_| anyhow::anyhow!("migrate thread panicked"))?;
    let t1 = Instant::now();
    let r = r.with_context(|| format!("{}; {}", src.fail_context(), dst.fail_context()))?;
    src.proc.wait_exit(Duration::from_secs(20));
    let st = ctl_as::<Status>(&dst.sock, &Request::Status {}, Duration::from_secs(5))?;
    let after = guest_checksum(&dst, "c")?;
    let _ = ctl_as::<StateNow>(&dst.sock, &Request::Shutdown {}, Duration::from_secs(5));
    dst.proc.wait_exit(Duration::from_secs(10));
    let pager = st.pager.as_ref();
    Ok(Run {
        run,
        cut,
        wall_ms: (t1 - t0).as_secs_f64() * 1e3,
        downtime_ms: r.downtime_ms,
        total_ms: r.total_ms,
        present_at_cut,
        pages_total: st.pages_total,
        after_link_up_ms: up.map(|u| (t1 - u).as_secs_f64() * 1e3),
        reconnects: pager.map_or(0, |p| p.reconnects),
        disconnected_ms: pager.map_or(0.0, |p| p.disconnected_ms),
        max_fault_ms: pager.map_or(0.0, |p| p.fault_latency.max_us) / 1e3,
        checksum_equal: before == after && !before.is_empty(),
    })
}

fn main() -> ExitCode {
    page_server::cli::exit_quietly_on_broken_pipe();
    env_logger::init();
    let a = Args::parse();
    let vmm = a.vmm.clone().unwrap_or_else(|| {
        std::env::current_exe()
            .ok()
            .and_then(|p| p.parent().map(|d| d.join("vmm")))
            .unwrap_or_else(|| "vmm".into())
    });
    let mut runs = Vec::new();
    let mut rows = Vec::new();
    for run in 0..a.runs {
        let mut pair = Vec::new();
        for cut in [false, true] {
            say(&format!(
                "run {run}: {} MiB guest, {} Mbit/s link, {}",
                a.mem,
                a.rate_mbit,
                if cut {
                    format!("link cut for {} s", a.cut_s)
                } else {
                    "baseline (no cut)".into()
                }
            ));
            match one(&a, &vmm, run, cut) {
                Ok(r) => {
                    say(&format!("  {r:?}"));
                    pair.push(r.clone());
                    runs.push(r);
                }
                Err(e) => {
                    eprintln!("vm-recovery: run {run}: {e:#}");
                    return ExitCode::FAILURE;
                }
            }
        }
        let extra_ms = pair[1].total_ms - pair[0].total_ms;
        let target_ms = (a.cut_s * 1000 + 1000) as f64;
        rows.push(json!({
            "run": run,
            "baseline_total_ms": pair[0].total_ms,
            "cut_total_ms": pair[1].total_ms,
            "extra_ms": extra_ms,
            "target_ms": target_ms,
            "pass": extra_ms <= target_ms,
            "after_link_up_ms": pair[1].after_link_up_ms,
            "reconnects": pair[1].reconnects,
            "disconnected_ms": pair[1].disconnected_ms,
            "checksums_equal": pair[0].checksum_equal && pair[1].checksum_equal,
        }));
    }
    println!(
        "\nPost-copy recovery ({} MiB guest, {} Mbit/s, link cut {} s, {} ms after resume)",
        a.mem, a.rate_mbit, a.cut_s, a.cut_after_ms
    );
    println!("| run | baseline total ms | cut total ms | extra ms | target ms | after link up ms | reconnects | without source ms | checksums |");
    println!("|---|---|---|---|---|---|---|---|---|");
    for r in &rows {
        println!(
            "| {} | {:.0} | {:.0} | {:.0} | {:.0}: {} | {:.0} | {} | {:.0} | {} |",
            r["run"],
            r["baseline_total_ms"].as_f64().unwrap_or(f64::NAN),
            r["cut_total_ms"].as_f64().unwrap_or(f64::NAN),
            r["extra_ms"].as_f64().unwrap_or(f64::NAN),
            r["target_ms"].as_f64().unwrap_or(f64::NAN),
            if r["pass"] == Value::Bool(true) {
                "PASS"
            } else {
                "MISS"
            },
            r["after_link_up_ms"].as_f64().unwrap_or(f64::NAN),
            r["reconnects"],
            r["disconnected_ms"].as_f64().unwrap_or(f64::NAN),
            if r["checksums_equal"] == Value::Bool(true) {
                "equal"
            } else {
                "DIFFER"
            },
        );
    }
    let out = json!({"config": {"mem_mib": a.mem, "rate_mbit": a.rate_mbit, "cut_s": a.cut_s,
        "cut_after_ms": a.cut_after_ms, "guest_write_rate": a.rate}, "runs": runs, "summary": rows});
    if let Some(d) = a.out.parent() {
        let _ = std::fs::create_dir_all(d);
    }
    if let Err(e) = std::fs::write(
        &a.out,
        serde_json::to_string_pretty(&out).unwrap_or_default(),
    ) {
        eprintln!("vm-recovery: writing {}: {e}", a.out.display());
        return ExitCode::FAILURE;
    }
    println!("(JSON: {})", a.out.display());
    if rows
        .iter()
        .any(|r| r["checksums_equal"] != Value::Bool(true))
    {
        eprintln!("vm-recovery: guest memory differs after a migration");
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}
