//! The QEMU side of `vm-migrate`: a source and a destination QEMU (`-incoming defer`) on the same
//! guest ELF, memory and vCPUs, a small QMP client over their Unix sockets, and a post-copy
//! migration over loopback TCP (postcopy-ram, postcopy-preempt and postcopy-blocktime on both
//! sides; `migrate` then at once `migrate-start-postcopy`).
//!
//! The guest's serial is QEMU's stdio (a pipe), followed line by line with host instants; QMP
//! messages, events included, are read by a thread of their own and timed as they arrive, so the
//! `MIGRATION completed` event dates the completion. Both QEMUs are killed on every exit path.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};

use crate::guest::Guest;
use crate::hb::{self, Follow, Proc};

/// How to run QEMU.
#[derive(Debug, Clone)]
pub struct QemuConfig {
    /// The qemu-system-x86_64 wrapper.
    pub qemu: PathBuf,
    /// qboot (`-bios`); SeaBIOS brings up only one vCPU on this host.
    pub bios: PathBuf,
    /// Our guest as a PVH ELF (for [`Guest::Ours`]).
    pub guest_elf: PathBuf,
    /// The guest and its workload.
    pub guest: Guest,
    /// Sockets, logs.
    pub dir: PathBuf,
    /// Guest memory.
    pub mem_mib: u64,
    /// vCPUs.
    pub vcpus: u32,
    /// Seconds the guest runs after READY before the migration starts.
    pub run_s: f64,
    /// Time allowed for the migration.
    pub timeout: Duration,
    /// `auto` (KVM, else TCG), `kvm` or `tcg`.
    pub accel: String,
    /// How QEMU migrates.
    pub mode: QemuMode,
}

/// QEMU's migration modes compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QemuMode {
    /// postcopy-ram (+ preempt, blocktime), `migrate-start-postcopy` right after `migrate`.
    Postcopy,
    /// Plain pre-copy (QEMU's default: converge to its 300 ms downtime limit).
    Precopy,
    /// postcopy-ram on; `migrate-start-postcopy` once the first pre-copy pass is done.
    PrecopyThenPostcopy,
}

impl QemuMode {
    /// A short name for tables.
    pub fn name(self) -> &'static str {
        match self {
            QemuMode::Postcopy => "postcopy",
            QemuMode::Precopy => "precopy",
            QemuMode::PrecopyThenPostcopy => "precopy->postcopy",
        }
    }
}

/// What one QEMU migration gave.
#[derive(Debug, Clone, Default)]
pub struct QemuRun {
    /// `kvm` or `tcg`.
    pub accel: String,
    /// Host instants: migrate command sent, completion seen (event or poll).
    pub start: Option<Instant>,
    /// Completion.
    pub end: Option<Instant>,
    /// The source's `STOP` event and the destination's `RESUME` event (QMP, host instants).
    pub stop: Option<Instant>,
    /// The destination's `RESUME` event.
    pub resume: Option<Instant>,
    /// Source `query-migrate` at completion.
    pub source_info: Value,
    /// Destination `query-migrate` after completion (postcopy-blocktime).
    pub dest_info: Value,
    /// Source and destination serial.
    pub src_serial: Option<Follow>,
    /// Destination serial.
    pub dst_serial: Option<Follow>,
    /// `GUEST boot` line of the source.
    pub boot_line: String,
    /// The `CK` line the destination printed after `q`.
    pub checksum_line: Option<String>,
}

/// A QMP connection: commands are written here, replies and events come from a reader thread
/// that stamps each message with its arrival instant.
pub struct Qmp {
    w: UnixStream,
    rx: Receiver<(Instant, Value)>,
    /// Events seen so far.
    pub events: Vec<(Instant, Value)>,
    name: String,
}

impl Qmp {
    /// Connects (retrying until `timeout` while QEMU creates the socket), reads the greeting
    /// and negotiates capabilities.
    pub fn connect(path: &Path, name: &str, timeout: Duration) -> Result<Qmp> {
        let deadline = Instant::now() + timeout;
        let s = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if Instant::now() > deadline => {
                    return Err(e).with_context(|| format!("connecting to {}", path.display()))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        };
        let r = s.try_clone().context("cloning the QMP socket")?;
        let (tx, rx) = channel();
        std::thread::Builder::new()
            .name(format!("qmp-{name}"))
            .spawn(move || {
                let mut r = BufReader::new(r);
                let mut line = String::new();
                loop {
                    line.clear();
                    match r.read_line(&mut line) {
                        Ok(0) | Err(_) => return,
                        Ok(_) => {}
                    }
                    let now = Instant::now();
                    let v = serde_json::from_str(&line)
                        .unwrap_or_else(|_| json!({"unparsed": line.trim()}));
                    if tx.send((now, v)).is_err() {
                        return;
                    }
                }
            })
            .context("spawning the QMP reader")?;
        let mut q = Qmp {
            w: s,
            rx,
            events: Vec::new(),
            name: name.to_owned(),
        };
        let greeting = q.next(timeout)?;
        if greeting.get("QMP").is_none() {
            bail!("{name}: no QMP greeting, got {greeting}");
        }
        q.cmd("qmp_capabilities", json!({}))?;
        Ok(q)
    }

    /// The next non-event message (events are kept in `events`).
    fn next(&mut self, timeout: Duration) -> Result<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok((t, v)) if v.get("event").is_some() => self.events.push((t, v)),
                Ok((_, v)) => return Ok(v),
                Err(RecvTimeoutError::Timeout) => bail!("{}: QMP reply timed out", self.name),
                Err(RecvTimeoutError::Disconnected) => {
                    bail!("{}: QMP connection closed (QEMU exited?)", self.name)
                }
            }
        }
    }

    /// Runs one command and returns its `return` value; a QMP error is an error.
    pub fn cmd(&mut self, execute: &str, arguments: Value) -> Result<Value> {
        let mut req = json!({ "execute": execute });
        if arguments.as_object().is_some_and(|m| !m.is_empty()) {
            req["arguments"] = arguments;
        }
        let mut line = serde_json::to_vec(&req)?;
        line.push(b'\n');
        self.w
            .write_all(&line)
            .with_context(|| format!("{}: sending {execute}", self.name))?;
        let reply = self.next(Duration::from_secs(30))?;
        if let Some(e) = reply.get("error") {
            bail!("{}: {execute} failed: {e}", self.name);
        }
        reply
            .get("return")
            .cloned()
            .ok_or_else(|| anyhow!("{}: {execute}: unexpected reply {reply}", self.name))
    }

    /// Drains events already received without blocking.
    fn pump(&mut self) {
        while let Ok((t, v)) = self.rx.try_recv() {
            if v.get("event").is_some() {
                self.events.push((t, v));
            }
        }
    }

    /// The instant of the first event named `name` at or after `after`.
    fn event_after(&mut self, name: &str, after: Instant) -> Option<Instant> {
        self.pump();
        self.events
            .iter()
            .find(|(t, v)| *t >= after && v["event"] == name)
            .map(|(t, _)| *t)
    }

    /// The instant of the first `MIGRATION` event with one of `statuses`.
    fn migration_event(&mut self, statuses: &[&str]) -> Option<(Instant, String)> {
        self.pump();
        self.events.iter().find_map(|(t, v)| {
            let s = v["data"]["status"].as_str()?;
            (v["event"] == "MIGRATION" && statuses.contains(&s)).then(|| (*t, s.to_owned()))
        })
    }
}

/// A QEMU with its serial followed and its QMP connected.
struct Qemu {
    proc: Proc,
    serial: Follow,
    qmp: Qmp,
    log: PathBuf,
}

fn spawn_qemu(c: &QemuConfig, accel: &str, tag: &str, incoming: bool) -> Result<Qemu> {
    let sock = c.dir.join(format!("qemu-{tag}.qmp"));
    let log = c.dir.join(format!("qemu-{tag}.log"));
    let _ = std::fs::remove_file(&sock);
    let mut cmd = Command::new(&c.qemu);
    cmd.args(["-accel", accel, "-cpu"])
        .arg(if accel == "kvm" {
            "host,-arch-capabilities"
        } else {
            "max"
        })
        .arg("-bios")
        .arg(&c.bios)
        .args(["-nic", "none", "-vga", "none", "-display", "none"])
        .args(["-no-user-config", "-nodefaults", "-m"])
        .arg(c.mem_mib.to_string())
        .arg("-smp")
        .arg(c.vcpus.to_string())
        .args(c.guest.qemu_args(&c.guest_elf, c.vcpus))
        .args(["-serial", "stdio", "-qmp"])
        .arg(format!("unix:{},server=on,wait=off", sock.display()));
    if incoming {
        cmd.args(["-incoming", "defer"]);
    }
    let stderr =
        std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(stderr);
    let mut proc = Proc::spawn(&mut cmd, &format!("qemu {tag}"))?;
    let out = proc.child().stdout.take().context("qemu stdout")?;
    let serial = Follow::start(out, tag)?;
    let qmp = Qmp::connect(&sock, &format!("qemu {tag}"), Duration::from_secs(20))
        .with_context(|| format!("qemu {tag}: QMP (log: {})", hb::log_tail(&log, 3)))?;
    Ok(Qemu {
        proc,
        serial,
        qmp,
        log,
    })
}

/// Boots the source with `accel` and waits for READY.
fn boot_source(c: &QemuConfig, accel: &str) -> Result<(Qemu, String)> {
    let mut q = spawn_qemu(c, accel, "src", false)?;
    let g = &c.guest;
    let boot = q
        .serial
        .wait(g.boot_marker(), Duration::from_secs(g.boot_secs()), |l| {
            l.starts_with(g.boot_marker())
        })
        .and_then(|(_, boot)| {
            // Filling memory: ~1 s per GiB with KVM here; TCG is slower.
            let fill = Duration::from_secs(60 + 60 * c.mem_mib.div_ceil(1024));
            q.serial
                .wait(g.ready_marker(), fill, |l| l.starts_with(g.ready_marker()))
                .map(|_| boot)
        });
    match boot {
        Ok(boot) => Ok((q, boot)),
        Err(e) => {
            let status = q.proc.exited();
            Err(e.context(format!(
                "qemu source ({accel}): exit {status:?}; serial: {}; log: {}",
                q.serial.tail(3),
                hb::log_tail(&q.log, 3)
            )))
        }
    }
}

const CAPS: [&str; 3] = ["postcopy-ram", "postcopy-preempt", "postcopy-blocktime"];

fn set_caps(q: &mut Qmp, postcopy: bool) -> Result<()> {
    let caps: Vec<Value> = CAPS
        .iter()
        .filter(|_| postcopy)
        .chain(std::iter::once(&"events"))
        .map(|c| json!({"capability": c, "state": true}))
        .collect();
    q.cmd("migrate-set-capabilities", json!({ "capabilities": caps }))?;
    Ok(())
}

/// Boots the guest under QEMU (KVM, else TCG), migrates it post-copy to a second QEMU over
/// loopback TCP, and asks the destination guest for its checksum. `progress` prints a line.
pub fn migrate(c: &QemuConfig, progress: &dyn Fn(&str)) -> Result<QemuRun> {
    let first = if c.accel == "auto" { "kvm" } else { &c.accel };
    progress(&format!("booting the source ({first})..."));
    let (mut src, boot_line, accel) = match boot_source(c, first) {
        Ok((q, b)) => (q, b, first),
        Err(e) if c.accel != "auto" => return Err(e),
        Err(e) => {
            progress(&format!(
                "KVM did not bring the guest to READY ({e:#}); falling back to TCG"
            ));
            let (q, b) = boot_source(c, "tcg").context("TCG fallback")?;
            (q, b, "tcg")
        }
    };
    let mut dst = spawn_qemu(c, accel, "dst", true)?;
    let postcopy = c.mode != QemuMode::Precopy;
    set_caps(&mut src.qmp, postcopy)?;
    set_caps(&mut dst.qmp, postcopy)?;
    let port = hb::free_port()?;
    let uri = format!("tcp:127.0.0.1:{port}");
    dst.qmp.cmd("migrate-incoming", json!({ "uri": uri }))?;
    progress(&format!(
        "guest running ({accel}); migrating in {:.1} s",
        c.run_s
    ));
    crate::hb::settle_then_warm(c.run_s, (c.mem_mib + 512) << 20);
    progress(&format!("migrate to {uri} ({})", c.mode.name()));
    let start = Instant::now();
    src.qmp.cmd("migrate", json!({ "uri": uri }))?;
    match c.mode {
        QemuMode::Postcopy => {
            src.qmp.cmd("migrate-start-postcopy", json!({}))?;
        }
        QemuMode::Precopy => {}
        QemuMode::PrecopyThenPostcopy => {
            // after the first pass (QEMU syncs the dirty bitmap at the end of each)
            let deadline = start + c.timeout;
            loop {
                std::thread::sleep(Duration::from_millis(5));
                let info = src.qmp.cmd("query-migrate", json!({}))?;
                if info["ram"]["dirty-sync-count"].as_u64().unwrap_or(0) >= 2
                    || info["status"] == "completed"
                {
                    break;
                }
                if Instant::now() > deadline {
                    bail!("QEMU's first pre-copy pass did not end: {info}");
                }
            }
            let _ = src.qmp.cmd("migrate-start-postcopy", json!({}));
        }
    }
    let deadline = start + c.timeout;
    let (end, info) = loop {
        std::thread::sleep(Duration::from_millis(50));
        let ev = src.qmp.migration_event(&["completed", "failed"]);
        let info = src.qmp.cmd("query-migrate", json!({}))?;
        let status = info["status"].as_str().unwrap_or("").to_owned();
        match (ev, status.as_str()) {
            (Some((t, s)), _) if s == "completed" => break (t, info),
            (_, "completed") => break (Instant::now(), info),
            (_, "failed") | (Some(_), _) => bail!(
                "QEMU migration failed: {info}; source log: {}; destination log: {}",
                hb::log_tail(&src.log, 3),
                hb::log_tail(&dst.log, 3)
            ),
            _ => {}
        }
        if Instant::now() > deadline {
            bail!(
                "QEMU migration not complete after {:.0} s (status {status}): {info}",
                c.timeout.as_secs_f64()
            );
        }
    };
    // Let the destination report blocktime and print a few heartbeats after completion.
    std::thread::sleep(Duration::from_millis(300));
    let dest_info = dst
        .qmp
        .cmd("query-migrate", json!({}))
        .unwrap_or(Value::Null);
    let checksum_line = checksum(&mut dst, &c.guest)
        .map_err(|e| progress(&format!("note: no checksum from the destination: {e:#}")))
        .ok();
    let run = QemuRun {
        accel: accel.to_owned(),
        start: Some(start),
        end: Some(end),
        stop: src.qmp.event_after("STOP", start),
        resume: dst.qmp.event_after("RESUME", start),
        source_info: info,
        dest_info,
        src_serial: Some(src.serial.clone()),
        dst_serial: Some(dst.serial.clone()),
        boot_line,
        checksum_line,
    };
    let _ = dst.qmp.cmd("quit", json!({}));
    let _ = src.qmp.cmd("quit", json!({}));
    dst.proc.wait_exit(Duration::from_secs(5));
    src.proc.wait_exit(Duration::from_secs(5));
    Ok(run)
}

/// Types the guest's memory check on the destination's serial (QEMU's stdin) and waits for its
/// answer.
fn checksum(q: &mut Qemu, g: &Guest) -> Result<String> {
    let stdin = q.proc.child().stdin.as_mut().context("qemu stdin")?;
    stdin
        .write_all(g.check_input().as_bytes())
        .context("writing to the guest's serial")?;
    stdin.flush()?;
    Ok(q.serial
        .wait("the memory check", Duration::from_secs(60), |l| {
            l.starts_with(g.check_prefix())
        })?
        .1)
}
