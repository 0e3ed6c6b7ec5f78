//! Our side of `vm-migrate`: a destination `vmm --incoming tcp:...`, a source `vmm run` of the
//! embedded guest, and `vmm ctl migrate --to ... --json` between them, all with the guest's
//! serial on the processes' stdout (followed line by line with host instants) and every process
//! killed on every exit path. The control socket is spoken with the vmm crate's own client
//! ([`vmm::api::client`]): requests are [`Request`]s, replies are read as the typed bodies of
//! [`vmm::api::replies`].

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::de::DeserializeOwned;
use vmm::api::replies::{DirtyRate, MigrationReport, Queued, StateNow};
use vmm::api::{client, Reply, Request};

use crate::guest::Guest;
use crate::hb::{self, Follow, Proc};

/// How to run our vmm.
#[derive(Debug, Clone)]
pub struct OursConfig {
    /// The vmm binary.
    pub vmm: PathBuf,
    /// Sockets, logs.
    pub dir: PathBuf,
    /// Guest memory.
    pub mem_mib: u64,
    /// vCPUs.
    pub vcpus: u32,
    /// The guest and its workload.
    pub guest: Guest,
    /// Seconds the guest runs after READY before the migration starts.
    pub run_s: f64,
    /// Time allowed for the migration.
    pub timeout: Duration,
    /// `vmm ctl migrate --mode`: postcopy, hybrid or precopy.
    pub mode: String,
    /// Plaintext (`--insecure` on both sides) instead of TLS with a pre-shared key (the
    /// default, as for users): for the same-run cost of TLS.
    pub insecure: bool,
}

/// `args` for a vmm (or page-server) this bench starts, with security as a user has it: TLS
/// with a pre-shared key kept in `dir` (made once, 0600), added where the program takes it,
/// unless `args` choose (`--insecure`, `--tls-...`).
pub fn with_security(dir: &Path, args: &[String]) -> Result<Vec<String>> {
    let mut out = args.to_vec();
    if args
        .iter()
        .any(|a| a == "--insecure" || a.starts_with("--tls-"))
    {
        return Ok(out);
    }
    let takes = match args.first().map(String::as_str) {
        Some("run" | "restore" | "--incoming" | "--serve") => true,
        _ => args.iter().any(|a| a == "--incoming"),
    };
    if takes {
        let psk = dir.join("bench-psk");
        if !psk.exists() {
            transport::tls::make_psk(&psk)
                .with_context(|| format!("making the pre-shared key {}", psk.display()))?;
        }
        out.push("--tls-psk-file".into());
        out.push(psk.display().to_string());
    }
    Ok(out)
}

/// What one migration with our vmm gave.
#[derive(Debug, Clone)]
pub struct OursRun {
    /// Host instants: `vmm ctl migrate` spawned, its JSON reply line arrived.
    pub start: Option<Instant>,
    /// Completion.
    pub end: Option<Instant>,
    /// The reply of `vmm ctl migrate --json`, as it came.
    pub reply: Reply,
    /// Its body.
    pub report: MigrationReport,
    /// Source serial.
    pub src_serial: Option<Follow>,
    /// Destination serial.
    pub dst_serial: Option<Follow>,
    /// The boot line of the source (`GUEST boot ...`, or Linux's `L2 userspace up ...`).
    pub boot_line: String,
    /// The source vmm's exit status after the migration (expected: 0).
    pub source_exit: Option<i32>,
    /// The destination's answer to the memory check (`CK ...` or `WITNESS VERDICT ...`).
    pub checksum_line: Option<String>,
}

/// Sends one request to a vmm control socket and returns the body of its final (non-progress)
/// reply as `T`; a refusal, or a reply without `T`'s fields, is an error.
pub fn ctl_as<T: DeserializeOwned>(sock: &Path, req: &Request, timeout: Duration) -> Result<T> {
    let what = || {
        format!(
            "{}: {} failed",
            sock.display(),
            serde_json::to_string(req).unwrap_or_else(|_| format!("{req:?}"))
        )
    };
    client::request(sock, req, timeout)
        .with_context(what)?
        .body()
        .with_context(what)
}

/// A vmm with its serial (stdout) followed and its stderr in a log file.
pub struct Vmm {
    /// The process.
    pub proc: Proc,
    /// Its serial console.
    pub serial: Follow,
    /// Its control socket.
    pub sock: PathBuf,
    /// Its stderr.
    pub log: PathBuf,
}

impl Vmm {
    fn start(c: &OursConfig, tag: &str, args: &[String]) -> Result<Vmm> {
        Vmm::start_at(&c.vmm, &c.dir, None, tag, args)
    }

    /// Starts `vmm ARGS` (inside network namespace `netns` when given), its sockets and logs in
    /// `dir`, and waits for its control socket.
    pub fn start_at(
        vmm: &Path,
        dir: &Path,
        netns: Option<&str>,
        tag: &str,
        args: &[String],
    ) -> Result<Vmm> {
        let sock = dir.join(format!("ours-{tag}.sock"));
        let log = dir.join(format!("ours-{tag}.log"));
        let _ = std::fs::remove_file(&sock);
        let stderr =
            std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let mut cmd = match netns {
            None => Command::new(vmm),
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(vmm);
                c
            }
        };
        cmd.args(with_security(dir, args)?)
            .args(["--serial", "stdout", "--api-socket"])
            .arg(&sock)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr);
        let mut proc = Proc::spawn(&mut cmd, &format!("vmm {tag}"))?;
        let out = proc.child().stdout.take().context("vmm stdout")?;
        let serial = Follow::start(out, tag)?;
        if let Err(e) = hb::wait_path(&sock, Duration::from_secs(30), &mut proc) {
            bail!("{e:#}; its stderr: {:?}", hb::log_tail(&log, 3));
        }
        Ok(Vmm {
            proc,
            serial,
            sock,
            log,
        })
    }

    /// Exit status, serial and log tails, for an error message.
    pub fn fail_context(&mut self) -> String {
        let status = self.proc.exited();
        format!(
            "{}: exit {status:?}; serial: {}; log: {}",
            self.proc.name,
            self.serial.tail(2),
            hb::log_tail(&self.log, 3)
        )
    }
}

/// `vmm run` with the configured memory, vCPUs and guest.
fn run_args(c: &OursConfig) -> Vec<String> {
    let mut args = vec![
        "run".into(),
        "--mem".into(),
        format!("{}M", c.mem_mib),
        "--vcpus".into(),
        c.vcpus.to_string(),
    ];
    args.extend(c.guest.vmm_args());
    args
}

/// Boots the guest in `vmm run`, migrates it with `vmm ctl migrate` to a `vmm --incoming` over
/// loopback TCP, and asks the destination guest for its checksum.
pub fn migrate(c: &OursConfig, progress: &dyn Fn(&str)) -> Result<OursRun> {
    let port = hb::free_port()?;
    let to = format!("tcp:127.0.0.1:{port}");
    progress("starting the destination (vmm --incoming)...");
    let sec = |mut v: Vec<String>| {
        if c.insecure {
            v.push("--insecure".into());
        }
        v
    };
    let mut dst = Vmm::start(c, "dst", &sec(vec!["--incoming".into(), to.clone()]))
        .context("starting the destination vmm")?;
    progress("booting the source...");
    let mut src = Vmm::start(c, "src", &sec(run_args(c))).context("starting the source vmm")?;
    let g = &c.guest;
    let fill = Duration::from_secs(60 + 60 * c.mem_mib.div_ceil(1024));
    let boot_line = src
        .serial
        .wait(g.boot_marker(), Duration::from_secs(g.boot_secs()), |l| {
            l.starts_with(g.boot_marker())
        })
        .and_then(|(_, b)| {
            src.serial
                .wait(g.ready_marker(), fill, |l| l.starts_with(g.ready_marker()))
                .map(|_| b)
        })
        .with_context(|| src.fail_context())?;
    progress(&format!("guest running; migrating in {:.1} s", c.run_s));
    crate::hb::settle_then_warm(c.run_s, (c.mem_mib + 512) << 20);
    progress(&format!("vmm ctl migrate --to {to}"));
    let ctl_log = c.dir.join("ours-ctl.log");
    let mut cmd = Command::new(&c.vmm);
    cmd.arg("ctl")
        .arg("--api-socket")
        .arg(&src.sock)
        .args(["--json", "migrate", "--to", &to, "--mode", &c.mode])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&ctl_log)?);
    let start = Instant::now();
    let mut ctl_proc = Proc::spawn(&mut cmd, "vmm ctl migrate")?;
    let out = Follow::start(ctl_proc.child().stdout.take().context("ctl stdout")?, "ctl")?;
    let reply = out.wait("the JSON reply of vmm ctl migrate", c.timeout, |l| {
        l.trim_start().starts_with('{')
    });
    let (end, line) = match reply {
        Ok(x) => x,
        Err(e) => {
            let status = ctl_proc.wait_exit(Duration::from_millis(100));
            return Err(e.context(format!(
                "vmm ctl migrate: exit {status:?}; its stderr: {}; source: {}; destination: {}",
                hb::log_tail(&ctl_log, 5),
                src.fail_context(),
                dst.fail_context()
            )));
        }
    };
    let reply: Reply = serde_json::from_str(&line)
        .with_context(|| format!("vmm ctl migrate printed {line:?}, not a reply"))?;
    let status = ctl_proc.wait_exit(Duration::from_secs(5));
    let report: MigrationReport = match reply.body() {
        Ok(r) => r,
        Err(e) => bail!(
            "migration failed (ctl exit {status:?}): {:#}; source: {}; destination: {}",
            anyhow::Error::new(e),
            src.fail_context(),
            dst.fail_context()
        ),
    };
    let source_exit = src
        .proc
        .wait_exit(Duration::from_secs(10))
        .map(|s| s.code().unwrap_or(-1));
    if source_exit != Some(0) {
        progress(&format!(
            "note: the source vmm exit status after migration is {source_exit:?} (expected 0)"
        ));
    }
    // A few heartbeats after completion, then the guest's own memory check.
    std::thread::sleep(Duration::from_millis(300));
    let checksum_line = ctl_as::<Queued>(
        &dst.sock,
        &Request::SerialInput {
            data: g.check_input().into(),
        },
        Duration::from_secs(10),
    )
    .and_then(|_| {
        dst.serial
            .wait("the memory check", Duration::from_secs(60), |l| {
                l.starts_with(g.check_prefix())
            })
    })
    .map(|(_, l)| l)
    .map_err(|e| {
        progress(&format!(
            "note: no memory check from the destination: {e:#}"
        ))
    })
    .ok();
    let run = OursRun {
        start: Some(start),
        end: Some(end),
        reply,
        report,
        src_serial: Some(src.serial.clone()),
        dst_serial: Some(dst.serial.clone()),
        boot_line,
        source_exit,
        checksum_line,
    };
    let _ = ctl_as::<StateNow>(&dst.sock, &Request::Shutdown {}, Duration::from_secs(10));
    dst.proc.wait_exit(Duration::from_secs(5));
    Ok(run)
}

/// The guest's write counter (`w=`) in its latest heartbeat.
fn last_writes(serial: &Follow) -> Option<u64> {
    let (lines, _) = serial.snapshot();
    lines.iter().rev().find_map(|(_, l)| {
        l.strip_prefix("HB ")?
            .split(' ')
            .find_map(|kv| kv.strip_prefix("w="))?
            .parse()
            .ok()
    })
}

/// What dirty tracking costs the guest: it writes as fast as it can ask (`rate` pages/s over
/// all memory) while each backend tracks for 2 s, and without tracking; pages written per
/// second, twice each, interleaved.
pub fn tracking_cost(c: &OursConfig, progress: &dyn Fn(&str)) -> Result<Vec<(String, f64)>> {
    let mut vm = Vmm::start(c, "cost", &run_args(c))?;
    let fill = Duration::from_secs(60 + 60 * c.mem_mib.div_ceil(1024));
    vm.serial
        .wait("READY", fill, |l| l.starts_with("READY"))
        .with_context(|| vm.fail_context())?;
    std::thread::sleep(Duration::from_secs(1));
    let mut out = Vec::new();
    for _ in 0..2 {
        for b in ["none", "kvm", "uffd-wp", "uffd-wp-async"] {
            progress(&format!("tracking cost: {b}"));
            let w0 = last_writes(&vm.serial).context("no heartbeat")?;
            let t0 = Instant::now();
            if b == "none" {
                std::thread::sleep(Duration::from_secs(2));
            } else {
                let req = Request::DirtyRate {
                    ms: 2000,
                    backend: Some(b.into()),
                };
                if let Err(e) = ctl_as::<DirtyRate>(&vm.sock, &req, Duration::from_secs(30)) {
                    progress(&format!("{b}: {e:#}"));
                    continue;
                }
            }
            std::thread::sleep(Duration::from_millis(30)); // the next heartbeat
            let w1 = last_writes(&vm.serial).context("no heartbeat")?;
            out.push((b.to_owned(), (w1 - w0) as f64 / t0.elapsed().as_secs_f64()));
        }
    }
    let _ = ctl_as::<StateNow>(&vm.sock, &Request::Shutdown {}, Duration::from_secs(5));
    vm.proc.wait_exit(Duration::from_secs(5));
    Ok(out)
}
