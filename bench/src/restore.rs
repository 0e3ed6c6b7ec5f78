//! `vm-restore`: boot time of our guest, snapshot, and eager vs lazy restore of a running VM,
//! per memory size, with the real `vmm` and `page-server` programs (release builds next to this
//! binary). Prints a table and writes JSON.
//!
//! Per size: boot our guest (its workload writing pages), snapshot it while it writes, then
//! restore it eagerly (memory file read first) and lazily (page-server on loopback, pages on
//! demand + background stream), and measure: process start -> vCPUs running (the vmm's own
//! figure, from `main`), spawn -> first heartbeat of the restored guest, faults served in the
//! first second, time until all memory is present, the guest-time gap across the restore, and
//! the longest wall-clock gap between heartbeats in the first second after restore.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use serde::de::DeserializeOwned;
use serde::Serialize;
use vmm::api::replies::{Snapshot, StateNow, Status};
use vmm::api::Request;

#[derive(Parser, Debug)]
#[command(about = "Boot, snapshot, eager and lazy restore of our guest, measured")]
struct Args {
    /// Memory sizes in MiB.
    #[arg(long, value_delimiter = ',', default_value = "1024,4096")]
    sizes: Vec<u64>,
    /// vCPUs.
    #[arg(long, default_value_t = 2)]
    vcpus: u32,
    /// Guest page writes per second (25600 = 100 MiB/s of 4 KiB pages).
    #[arg(long, default_value_t = 25600)]
    rate: u64,
    /// Seconds the guest runs before the snapshot.
    #[arg(long, default_value_t = 2.0)]
    run_s: f64,
    /// Lazy restores per size (the table shows the median run by process start -> running).
    #[arg(long, default_value_t = 5)]
    repeat: usize,
    /// Working directory for snapshots.
    #[arg(long, default_value = "target/bench/restore")]
    workdir: PathBuf,
    /// JSON output.
    #[arg(long, default_value = "target/bench/restore.json")]
    out: PathBuf,
}

fn bin(name: &str) -> Result<PathBuf> {
    let me = std::env::current_exe()?;
    let p = me.parent().context("exe dir")?.join(name);
    if !p.exists() {
        bail!(
            "{} not built (cargo build --release -p vmm -p page-server)",
            p.display()
        );
    }
    Ok(p)
}

/// Serial lines with the instant each was first seen (polled every 0.5 ms).
#[derive(Clone, Default)]
struct Lines(Arc<Mutex<Vec<(Instant, String)>>>);

impl Lines {
    fn follow(path: PathBuf, stop: Arc<std::sync::atomic::AtomicBool>) -> Lines {
        let l = Lines::default();
        let inner = l.0.clone();
        std::thread::spawn(move || {
            let mut pos = 0usize;
            let mut partial = String::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                if let Ok(mut f) = std::fs::File::open(&path) {
                    use std::io::Seek;
                    let mut buf = Vec::new();
                    if f.seek(std::io::SeekFrom::Start(pos as u64)).is_ok()
                        && f.read_to_end(&mut buf).is_ok()
                        && !buf.is_empty()
                    {
                        pos += buf.len();
                        let now = Instant::now();
                        partial.push_str(&String::from_utf8_lossy(&buf));
                        while let Some(i) = partial.find('\n') {
                            let line: String = partial.drain(..=i).collect();
                            inner
                                .lock()
                                .unwrap()
                                .push((now, line.trim_end().to_owned()));
                        }
                    }
                }
                std::thread::sleep(Duration::from_micros(500));
            }
        });
        l
    }

    fn wait(
        &self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> Result<(Instant, String)> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(x) = self.0.lock().unwrap().iter().find(|(_, l)| pred(l)) {
                return Ok(x.clone());
            }
            if Instant::now() > deadline {
                bail!("timed out waiting for {what}");
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn snapshot(&self) -> Vec<(Instant, String)> {
        self.0.lock().unwrap().clone()
    }
}

#[derive(Debug, Clone)]
struct Hb {
    seq: u64,
    t_us: u64,
    /// Start of a line cut by a pause, after this heartbeat.
    cut: String,
}

fn hb(l: &str) -> Option<Hb> {
    let rest = l.strip_prefix("HB ")?;
    let mut h = Hb {
        seq: 0,
        t_us: 0,
        cut: String::new(),
    };
    for kv in rest.split(' ') {
        match kv.split_once('=')? {
            ("seq", v) => h.seq = v.parse().ok()?,
            ("t_us", v) => h.t_us = v.parse().ok()?,
            _ => {}
        }
    }
    Some(h)
}

/// A vmm process (killed on drop) with its followed serial output.
struct Vmm {
    child: Child,
    sock: PathBuf,
    lines: Lines,
    stop: Arc<std::sync::atomic::AtomicBool>,
    spawned: Instant,
}

impl Drop for Vmm {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Vmm {
    fn start(dir: &Path, tag: &str, args: &[String]) -> Result<Vmm> {
        let serial = dir.join(format!("{tag}.serial"));
        let sock = dir.join(format!("{tag}.sock"));
        let _ = std::fs::remove_file(&serial);
        let _ = std::fs::remove_file(&sock);
        std::fs::write(&serial, b"")?;
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let lines = Lines::follow(serial.clone(), stop.clone());
        let spawned = Instant::now();
        let child = Command::new(bin("vmm")?)
            .args(bench::ours::with_security(dir, args)?)
            .arg("--serial")
            .arg(&serial)
            .arg("--api-socket")
            .arg(&sock)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .spawn()
            .context("start vmm")?;
        let v = Vmm {
            child,
            sock,
            lines,
            stop,
            spawned,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while !v.sock.exists() {
            if Instant::now() > deadline {
                bail!("vmm {tag}: no control socket");
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        Ok(v)
    }

    /// Sends `req` and returns its reply's body as `T` (a refusal is an error).
    fn ctl<T: DeserializeOwned>(&self, req: &Request) -> Result<T> {
        let r = vmm::api::client::request(&self.sock, req, Duration::from_secs(600))?;
        r.body().with_context(|| format!("{req:?}"))
    }

    fn shutdown(mut self) -> Result<()> {
        let _ = self.ctl::<StateNow>(&Request::Shutdown {});
        let _ = self.child.wait();
        Ok(())
    }
}

#[derive(Debug, Default, Serialize)]
struct RestoreRow {
    mode: String,
    /// vmm main() -> vCPUs running (the vmm's own figure).
    running_after_start_ms: f64,
    /// State file read and applied.
    state_ms: f64,
    /// Memory file read (eager) / pager connected (lazy).
    memory_ms: f64,
    /// Spawn of the restoring process -> first heartbeat line of the restored guest.
    spawn_to_first_heartbeat_ms: f64,
    /// Guest time between the last heartbeat begun before the snapshot and the first one begun
    /// after the restore (the heartbeat period when nothing was lost).
    guest_time_gap_ms: f64,
    /// Longest wall-clock gap between heartbeats in the first second after restore.
    max_heartbeat_gap_first_s_ms: f64,
    /// Lazy: fault events / pages served in the first second after the vCPUs run.
    faults_first_s: u64,
    fault_pages_first_s: u64,
    /// Lazy: fault latency over the first second.
    fault_p50_us: f64,
    fault_p99_us: f64,
    /// Lazy: time until every page was present (after the vCPUs started).
    memory_complete_ms: Option<f64>,
    /// Lazy: process start -> running of every repeat (sorted); this row is the median run.
    runs_running_after_start_ms: Vec<f64>,
}

#[derive(Debug, Default, Serialize)]
struct SizeRow {
    mem_mib: u64,
    vcpus: u32,
    rate_pages_s: u64,
    /// Spawn -> guest in ring 3 (`GUEST boot` line).
    boot_to_guest_ms: f64,
    /// Spawn -> memory filled (`READY`).
    boot_to_ready_ms: f64,
    kmode_mips: u64,
    snapshot_ms: f64,
    state_bytes: u64,
    restores: Vec<RestoreRow>,
}

fn measure_restore(dir: &Path, mode: &str, args: Vec<String>, last: &Hb) -> Result<RestoreRow> {
    let v = Vmm::start(dir, mode, &args)?;
    let (t_first, line) = v.lines.wait(
        "first heartbeat after restore",
        Duration::from_secs(120),
        |l| hb(l).is_some_and(|h| h.seq > last.seq),
    )?;
    let first = hb(&line).context("heartbeat")?;
    // A heartbeat line the pause cut, completed by the restored guest, is the last one before.
    let head = std::fs::read_to_string(dir.join(format!("{mode}.serial"))).unwrap_or_default();
    let joined = format!("{}{}", last.cut, head.split('\n').next().unwrap_or(""));
    let last = match hb(&joined) {
        Some(h) if !last.cut.is_empty() && h.seq == last.seq + 1 => h,
        _ => last.clone(),
    };
    let st0: Status = v.ctl(&Request::Status {})?;
    // One second of running, then the pager's view of it.
    let run_start = t_first;
    std::thread::sleep(Duration::from_secs(1).saturating_sub(run_start.elapsed()));
    let st1: Status = v.ctl(&Request::Status {})?;
    let mut gap = 0f64;
    let mut prev: Option<Instant> = None;
    for (t, l) in v.lines.snapshot() {
        if t < run_start || t > run_start + Duration::from_secs(1) || hb(&l).is_none() {
            continue;
        }
        if let Some(p) = prev {
            gap = gap.max((t - p).as_secs_f64() * 1e3);
        }
        prev = Some(t);
    }
    let mut row = RestoreRow {
        mode: mode.to_owned(),
        running_after_start_ms: st0.running_after_start_ms,
        state_ms: st0.state_load_ms,
        memory_ms: st0.memory_load_ms,
        spawn_to_first_heartbeat_ms: (t_first - v.spawned).as_secs_f64() * 1e3,
        guest_time_gap_ms: (first.t_us as f64 - last.t_us as f64) / 1e3,
        max_heartbeat_gap_first_s_ms: gap,
        ..Default::default()
    };
    if st1.lazy {
        // zeros when the reply has no pager figures
        let p = st1.pager.clone().unwrap_or_default();
        row.faults_first_s = p.fault_events;
        row.fault_pages_first_s = p.fault_pages;
        row.fault_p50_us = p.fault_latency.p50_us;
        row.fault_p99_us = p.fault_latency.p99_us;
        let deadline = Instant::now() + Duration::from_secs(120);
        let mut st = st1;
        while st.memory_complete_ms.is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
            st = v.ctl(&Request::Status {})?;
        }
        row.memory_complete_ms = st.memory_complete_ms;
    }
    v.shutdown()?;
    Ok(row)
}

fn one_size(a: &Args, mib: u64) -> Result<SizeRow> {
    let dir = a.workdir.join(format!("{mib}m"));
    std::fs::create_dir_all(&dir)?;
    let state = dir.join("state.bin");
    let memory = dir.join("memory.bin");
    // the VMM writes snapshots to new files only: a previous run's go first
    for f in [&state, &memory] {
        let _ = std::fs::remove_file(f);
    }
    eprintln!(
        "[vm-restore] {mib} MiB: booting our guest ({} vCPUs, {} pages/s)",
        a.vcpus, a.rate
    );
    let v = Vmm::start(
        &dir,
        "boot",
        &[
            "run".into(),
            "--mem".into(),
            format!("{mib}M"),
            "--vcpus".into(),
            a.vcpus.to_string(),
            "--cmdline".into(),
            format!("rate={} hot=100", a.rate),
        ],
    )?;
    let (t_boot, boot_line) = v.lines.wait("GUEST boot", Duration::from_secs(120), |l| {
        l.starts_with("GUEST boot")
    })?;
    let (t_ready, _) = v.lines.wait("READY", Duration::from_secs(600), |l| {
        l.starts_with("READY")
    })?;
    let kmode_mips = boot_line
        .split(' ')
        .find_map(|kv| kv.strip_prefix("kmode_mips="))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    std::thread::sleep(Duration::from_secs_f64(a.run_s));
    eprintln!("[vm-restore] {mib} MiB: snapshot while the guest writes");
    let snap: Snapshot = v.ctl(&Request::Snapshot {
        state: state.clone(),
        memory: memory.clone(),
    })?;
    // The last complete heartbeat before the pause, and the start of a line the pause cut (the
    // restored guest prints the rest of it).
    let text = std::fs::read_to_string(dir.join("boot.serial")).unwrap_or_default();
    let cut = text.rsplit('\n').next().unwrap_or("").to_owned();
    let last = v
        .lines
        .snapshot()
        .iter()
        .rev()
        .find_map(|(_, l)| hb(l))
        .map(|h| Hb {
            cut: cut.clone(),
            ..h
        })
        .context("no heartbeat before the snapshot")?;
    let mut row = SizeRow {
        mem_mib: mib,
        vcpus: a.vcpus,
        rate_pages_s: a.rate,
        boot_to_guest_ms: (t_boot - v.spawned).as_secs_f64() * 1e3,
        boot_to_ready_ms: (t_ready - v.spawned).as_secs_f64() * 1e3,
        kmode_mips,
        snapshot_ms: snap.ms,
        state_bytes: snap.state_bytes,
        restores: Vec::new(),
    };
    v.shutdown()?;
    let st = state.display().to_string();
    eprintln!("[vm-restore] {mib} MiB: eager restore");
    row.restores.push(measure_restore(
        &dir,
        "eager",
        vec![
            "restore".into(),
            "--state".into(),
            st.clone(),
            "--memory".into(),
            memory.display().to_string(),
        ],
        &last,
    )?);
    eprintln!("[vm-restore] {mib} MiB: lazy restore from page-server on loopback");
    let mut server = Command::new(bin("page-server")?)
        .args(bench::ours::with_security(
            &dir,
            &[
                "--serve".into(),
                memory.display().to_string(),
                "--listen".into(),
                "127.0.0.1:0".into(),
                "--print-addr".into(),
            ],
        )?)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .context("start page-server")?;
    let mut line = String::new();
    BufReader::new(server.stdout.take().context("stdout")?).read_line(&mut line)?;
    let addr = line
        .trim()
        .strip_prefix("listening ")
        .context("page-server address")?
        .to_owned();
    let mut lazy = Vec::new();
    for i in 0..a.repeat.max(1) {
        eprintln!(
            "[vm-restore] {mib} MiB: lazy restore {}/{}",
            i + 1,
            a.repeat.max(1)
        );
        match measure_restore(
            &dir,
            "lazy",
            vec![
                "restore".into(),
                "--state".into(),
                st.clone(),
                "--memory-from".into(),
                addr.clone(),
            ],
            &last,
        ) {
            Ok(r) => lazy.push(r),
            Err(e) => {
                let _ = server.kill();
                let _ = server.wait();
                return Err(e);
            }
        }
    }
    let _ = server.kill();
    let _ = server.wait();
    let mut all: Vec<f64> = lazy.iter().map(|r| r.running_after_start_ms).collect();
    lazy.sort_by(|x, y| {
        x.running_after_start_ms
            .total_cmp(&y.running_after_start_ms)
    });
    all.sort_by(f64::total_cmp);
    let mut median = lazy.swap_remove(lazy.len() / 2);
    median.runs_running_after_start_ms = all;
    row.restores.push(median);
    let _ = std::fs::remove_file(&memory);
    Ok(row)
}

fn main() -> Result<()> {
    page_server::cli::exit_quietly_on_broken_pipe();
    let a = Args::parse();
    let mut rows = Vec::new();
    for &mib in &a.sizes {
        rows.push(one_size(&a, mib)?);
    }
    println!();
    println!(
        "{:>6} {:>8} {:>9} {:>9} {:>8} {:>10} {:>10} {:>10} {:>9} {:>9} {:>9} {:>10}",
        "MiB",
        "boot ms",
        "ready ms",
        "snap ms",
        "restore",
        "running ms",
        "1st HB ms",
        "guest gap",
        "max gap",
        "faults 1s",
        "p99 us",
        "complete"
    );
    for r in &rows {
        for x in &r.restores {
            println!(
                "{:>6} {:>8.1} {:>9.1} {:>9.1} {:>8} {:>10.1} {:>10.1} {:>10.1} {:>9.1} {:>9} {:>9.1} {:>10}",
                r.mem_mib,
                r.boot_to_guest_ms,
                r.boot_to_ready_ms,
                r.snapshot_ms,
                x.mode,
                x.running_after_start_ms,
                x.spawn_to_first_heartbeat_ms,
                x.guest_time_gap_ms,
                x.max_heartbeat_gap_first_s_ms,
                x.faults_first_s,
                x.fault_p99_us,
                x.memory_complete_ms.map(|m| format!("{m:.0} ms")).unwrap_or("-".into()),
            );
        }
    }
    let lazy: Vec<f64> = rows
        .iter()
        .flat_map(|r| {
            r.restores
                .iter()
                .filter(|x| x.mode == "lazy")
                .map(|x| x.running_after_start_ms)
        })
        .collect();
    let ratio = if lazy.len() >= 2 && lazy[0] > 0.0 {
        Some(lazy[lazy.len() - 1] / lazy[0])
    } else {
        None
    };
    if let Some(r) = ratio {
        println!(
            "lazy restore, process start -> vCPUs running (median of {}): {:.1} ms ({} MiB) vs {:.1} ms ({} MiB): {r:.2}x",
            a.repeat.max(1),
            lazy[0],
            rows[0].mem_mib,
            lazy[lazy.len() - 1],
            rows[rows.len() - 1].mem_mib
        );
    }
    if let Some(d) = a.out.parent() {
        std::fs::create_dir_all(d)?;
    }
    std::fs::write(
        &a.out,
        serde_json::to_vec_pretty(
            &serde_json::json!({"rows": rows, "lazy_running_ratio_largest_vs_smallest": ratio}),
        )?,
    )?;
    println!("wrote {}", a.out.display());
    Ok(())
}
