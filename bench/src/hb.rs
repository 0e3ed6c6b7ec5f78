//! What `vm-migrate` shares between its two VMMs: child processes that are killed when dropped,
//! output streams followed line by line with the host instant each line arrived, the guest's
//! heartbeat lines, and the heartbeat figures (freeze, stall, sequence continuity) computed from
//! the source's and the destination's serial merged in host time.
//!
//! Timestamps are taken by a reader thread per stream the moment `read(2)` returns, never by
//! polling a file. Nothing here knows which VMM produced a stream.

use std::io::Read;
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Serialize;

/// A child process, killed (SIGKILL) and reaped when dropped, on every exit path.
pub struct Proc {
    child: Child,
    /// For messages.
    pub name: String,
}

impl Proc {
    /// Spawns `cmd`; `name` appears in messages.
    pub fn spawn(cmd: &mut Command, name: &str) -> Result<Proc> {
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {name} ({:?})", cmd.get_program()))?;
        Ok(Proc {
            child,
            name: name.to_owned(),
        })
    }

    /// The child, for taking its pipes.
    pub fn child(&mut self) -> &mut Child {
        &mut self.child
    }

    /// `Some(status)` once the process has ended.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Waits up to `timeout` for the process to end by itself.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.exited() {
                return Some(s);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.exited().is_none() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

#[derive(Default)]
struct FollowState {
    lines: Vec<(Instant, String)>,
    /// Bytes after the last newline.
    partial: String,
    eof: bool,
}

/// A stream (a child's stdout) read by its own thread; each complete line is kept with the
/// instant its newline arrived.
#[derive(Clone)]
pub struct Follow(Arc<(Mutex<FollowState>, Condvar)>);

impl std::fmt::Debug for Follow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Follow({} lines)", self.lock().lines.len())
    }
}

impl Follow {
    /// Starts a thread reading `r` until end of file.
    pub fn start(mut r: impl Read + Send + 'static, name: &str) -> Result<Follow> {
        let f = Follow(Arc::new((
            Mutex::new(FollowState::default()),
            Condvar::new(),
        )));
        let inner = f.clone();
        std::thread::Builder::new()
            .name(format!("follow-{name}"))
            .spawn(move || {
                let mut buf = vec![0u8; 64 << 10];
                loop {
                    let n = match r.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    let now = Instant::now();
                    let mut st = inner.lock();
                    st.partial.push_str(&String::from_utf8_lossy(&buf[..n]));
                    while let Some(i) = st.partial.find('\n') {
                        let line: String = st.partial.drain(..=i).collect();
                        st.lines.push((now, line.trim_end().to_owned()));
                    }
                    drop(st);
                    inner.0 .1.notify_all();
                }
                inner.lock().eof = true;
                inner.0 .1.notify_all();
            })
            .context("spawning a reader thread")?;
        Ok(f)
    }

    fn lock(&self) -> MutexGuard<'_, FollowState> {
        self.0 .0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits for the first line matching `pred`; fails at `timeout` or when the stream ends.
    pub fn wait(
        &self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> Result<(Instant, String)> {
        let deadline = Instant::now() + timeout;
        let mut st = self.lock();
        loop {
            if let Some(x) = st.lines.iter().find(|(_, l)| pred(l)) {
                return Ok(x.clone());
            }
            if st.eof {
                bail!("the stream ended before {what}");
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                bail!(
                    "timed out after {:.0} s waiting for {what}",
                    timeout.as_secs_f64()
                );
            }
            st = self
                .0
                 .1
                .wait_timeout(st, left.min(Duration::from_millis(100)))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Complete lines so far, and the unterminated rest.
    pub fn snapshot(&self) -> (Vec<(Instant, String)>, String) {
        let st = self.lock();
        (st.lines.clone(), st.partial.clone())
    }

    /// The last `n` lines, for error messages.
    pub fn tail(&self, n: usize) -> String {
        let st = self.lock();
        let from = st.lines.len().saturating_sub(n);
        st.lines[from..]
            .iter()
            .map(|(_, l)| l.as_str())
            .collect::<Vec<_>>()
            .join(" | ")
    }
}

/// `ip ARGS...` (iproute2), failing with its stderr (vm-devices, vm-recovery).
#[allow(dead_code)]
pub fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Network namespaces standing in for hosts, each with an uplink `eth0` (a veth) on one bridge
/// `br0` in a further namespace (the switch, last of `ns`); all deleted on drop. The caller gives
/// each host its addresses.
#[allow(dead_code)]
pub struct Switched {
    /// The hosts' namespaces, then the switch's.
    pub ns: Vec<String>,
}

#[allow(dead_code)]
impl Switched {
    /// Namespaces `<prefix><pid><host>` for each of `hosts`, and `<prefix><pid>sw`.
    pub fn new(prefix: &str, hosts: &[&str]) -> Result<Switched> {
        let tag = std::process::id() % 100_000;
        let mut sw = Switched { ns: Vec::new() };
        for h in hosts.iter().chain(std::iter::once(&"sw")) {
            let n = format!("{prefix}{tag}{h}");
            ip(&["netns", "add", &n])?;
            sw.ns.push(n);
        }
        let s = sw.ns[hosts.len()].clone();
        ip(&["-n", &s, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &s, "link", "set", "br0", "up"])?;
        for (i, n) in sw.ns[..hosts.len()].iter().enumerate() {
            let port = format!("p{i}");
            ip(&[
                "link", "add", "eth0", "netns", n, "type", "veth", "peer", "name", &port, "netns",
                &s,
            ])?;
            ip(&["-n", &s, "link", "set", &port, "master", "br0", "up"])?;
            ip(&["-n", n, "link", "set", "lo", "up"])?;
        }
        Ok(sw)
    }
}

impl Drop for Switched {
    fn drop(&mut self) {
        for n in &self.ns {
            let _ = ip(&["netns", "del", n]);
        }
    }
}

/// The last lines of a log file (a child's stderr), for error messages.
pub fn log_tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join(" | ")
}

/// A free TCP port on loopback (bound, then released for the child to bind).
pub fn free_port() -> Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0").context("binding 127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// Waits until `path` exists (a control socket the child creates).
pub fn wait_path(path: &Path, timeout: Duration, proc: &mut Proc) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while !path.exists() {
        if let Some(s) = proc.exited() {
            bail!(
                "{} exited ({s}) before creating {}",
                proc.name,
                path.display()
            );
        }
        if Instant::now() > deadline {
            bail!("{} did not create {} in time", proc.name, path.display());
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    Ok(())
}

/// One heartbeat line of the guest: ours (`HB seq=N t_us=T ... simd=..`) or the Linux witness's
/// (`WHB n=N mono_ns=T real_ns=.. w=.. bad=N`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hb {
    /// Sequence number (the guest counts from 0 after READY).
    pub seq: u64,
    /// Guest time in microseconds (ours: kvmclock; Linux: CLOCK_MONOTONIC).
    pub t_us: u64,
}

/// Parses a heartbeat line; anything else (or a line cut short) is `None`.
pub fn parse_hb(line: &str) -> Option<Hb> {
    if let Some(rest) = line.strip_prefix("WHB ") {
        let (mut seq, mut t_ns, mut bad) = (None, None, None);
        for kv in rest.split(' ') {
            match kv.split_once('=') {
                Some(("n", v)) => seq = v.parse().ok(),
                Some(("mono_ns", v)) => t_ns = v.parse::<u64>().ok(),
                Some(("bad", v)) => bad = v.trim_end().parse::<u64>().ok(),
                _ => {}
            }
        }
        // A complete witness heartbeat ends with its bad-page count.
        bad?;
        return Some(Hb {
            seq: seq?,
            t_us: t_ns? / 1000,
        });
    }
    let rest = line.strip_prefix("HB ")?;
    let (mut seq, mut t_us) = (None, None);
    for kv in rest.split(' ') {
        match kv.split_once('=') {
            Some(("seq", v)) => seq = v.parse().ok(),
            Some(("t_us", v)) => t_us = v.parse().ok(),
            _ => {}
        }
    }
    // A complete heartbeat ends with the SIMD check; a cut one does not.
    if !rest.contains("simd=") {
        return None;
    }
    Some(Hb {
        seq: seq?,
        t_us: t_us?,
    })
}

/// The heartbeats of a migrated guest: the source's serial, then the destination's, merged in
/// host time. A line the switch cut (its start printed by the source, its rest by the
/// destination) is joined and timed when its rest arrived.
pub fn merged(src: &Follow, dst: &Follow) -> Vec<(Instant, Hb)> {
    let (s_lines, s_partial) = src.snapshot();
    let (mut d_lines, _) = dst.snapshot();
    let mut all: Vec<(Instant, String)> = s_lines;
    if !s_partial.is_empty() {
        if let Some(first) = d_lines.first_mut() {
            first.1 = format!("{s_partial}{}", first.1);
        }
    }
    all.extend(d_lines);
    all.sort_by_key(|(t, _)| *t);
    all.into_iter()
        .filter_map(|(t, l)| parse_hb(&l).map(|h| (t, h)))
        .collect()
}

/// Writes both serial streams, each line with its host arrival time relative to `start` (ms),
/// to `path` (tab-separated: ms, `src`/`dst`, line; an unterminated rest is marked `...`).
pub fn write_timeline(path: &Path, src: &Follow, dst: &Follow, start: Instant) -> Result<()> {
    let rel = |t: Instant| {
        if t >= start {
            t.duration_since(start).as_secs_f64() * 1e3
        } else {
            -(start.duration_since(t).as_secs_f64() * 1e3)
        }
    };
    let mut out = String::new();
    for (tag, f) in [("src", src), ("dst", dst)] {
        let (lines, partial) = f.snapshot();
        for (t, l) in lines {
            out.push_str(&format!("{:.3}\t{tag}\t{l}\n", rel(t)));
        }
        if !partial.is_empty() {
            out.push_str(&format!("-\t{tag}\t{partial}...\n"));
        }
    }
    std::fs::write(path, out).with_context(|| format!("writing {}", path.display()))
}

/// Heartbeat figures over a migration.
#[derive(Debug, Clone, Default, Serialize)]
pub struct HbFigures {
    /// Longest host-time gap between consecutive heartbeats, from 1 s before the migration
    /// started to its completion (a gap that spans either end counts).
    pub freeze_ms: f64,
    /// Sum over heartbeat gaps of max(0, gap - 10 ms), from migration start to completion.
    pub stall_ms: f64,
    /// Heartbeats seen in the freeze window.
    pub heartbeats: u64,
    /// Heartbeats seen after the migration started: none means the guest stopped before it
    /// (or never ran on the destination), and the freeze and stall are then not measured.
    pub heartbeats_after_start: u64,
    /// Every heartbeat's seq greater than the one before it (no reset across the switch).
    pub seq_continuous: bool,
    /// Sequence numbers missing between consecutive heartbeats (the guest skipped or a line
    /// was lost).
    pub seq_skipped: u64,
    /// Guest time across the longest gap (kvmclock), ms.
    pub freeze_guest_ms: f64,
    /// First and last seq seen over the whole run.
    pub seq_first: Option<u64>,
    /// Last seq seen.
    pub seq_last: Option<u64>,
    /// The five longest gaps in the freeze window, longest first.
    pub longest_gaps: Vec<Gap>,
}

/// One heartbeat gap.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Gap {
    /// Host time of the gap's first heartbeat relative to the migration start (negative:
    /// before it).
    pub at_ms: f64,
    /// Host time between the two heartbeats.
    pub host_ms: f64,
    /// Guest time (kvmclock) between them: less than `host_ms` where the guest was stopped.
    pub guest_ms: f64,
    /// Seq of the heartbeat that ended the gap.
    pub seq: u64,
}

/// Computes [`HbFigures`] from merged heartbeats, the host instant the migration was started and
/// the instant it was known complete. `period_ms` is the heartbeat period (10).
pub fn figures(hbs: &[(Instant, Hb)], start: Instant, end: Instant, period_ms: f64) -> HbFigures {
    let pre = start.checked_sub(Duration::from_secs(1)).unwrap_or(start);
    let mut f = HbFigures {
        seq_continuous: true,
        seq_first: hbs.first().map(|(_, h)| h.seq),
        seq_last: hbs.last().map(|(_, h)| h.seq),
        ..Default::default()
    };
    for w in hbs.windows(2) {
        let ((t0, h0), (t1, h1)) = (w[0], w[1]);
        if h1.seq <= h0.seq {
            f.seq_continuous = false;
        } else {
            f.seq_skipped += h1.seq - h0.seq - 1;
        }
        // Pairs overlapping [pre, end]: the gap may span either boundary.
        if t1 < pre || t0 > end {
            continue;
        }
        let gap = t1.saturating_duration_since(t0).as_secs_f64() * 1e3;
        let guest_ms = (h1.t_us as f64 - h0.t_us as f64) / 1e3;
        if gap > f.freeze_ms {
            f.freeze_ms = gap;
            f.freeze_guest_ms = guest_ms;
        }
        let at_ms = if t0 >= start {
            t0.duration_since(start).as_secs_f64() * 1e3
        } else {
            -(start.duration_since(t0).as_secs_f64() * 1e3)
        };
        f.longest_gaps.push(Gap {
            at_ms,
            host_ms: gap,
            guest_ms,
            seq: h1.seq,
        });
        if t1 >= start {
            f.stall_ms += (gap - period_ms).max(0.0);
        }
    }
    f.longest_gaps
        .sort_by(|a, b| b.host_ms.total_cmp(&a.host_ms));
    f.longest_gaps.truncate(5);
    f.heartbeats = hbs.iter().filter(|(t, _)| *t >= pre && *t <= end).count() as u64;
    f.heartbeats_after_start = hbs.iter().filter(|(t, _)| *t >= start).count() as u64;
    f
}

impl HbFigures {
    /// Whether the guest was heard from after the migration started: without that its freeze
    /// and stall are unknown (a guest that stopped, not one with no pause).
    pub fn ran_on(&self) -> bool {
        self.heartbeats_after_start > 0
    }
}

/// Lets the guest run `run_s` seconds before the migration starts; 1 s before the start (the
/// freeze window's beginning), warms `bytes` of host memory.
pub fn settle_then_warm(run_s: f64, bytes: u64) {
    std::thread::sleep(Duration::from_secs_f64((run_s - 1.0).max(0.0)));
    warm_host_memory(bytes);
    std::thread::sleep(Duration::from_secs(1));
}

/// Touches `bytes` of fresh memory once and frees it, right before a migration (for both VMMs
/// alike): some hosts back their own memory lazily and take freed memory back after about two
/// seconds (this nested VM: a virtio-balloon with free page reporting; a first touch costs
/// ~2 s per GiB against ~0.25 s for a page touched recently), so the destination's fresh RAM
/// would otherwise cost whichever VMM happened to get cold pages.
pub fn warm_host_memory(bytes: u64) {
    let t = Instant::now();
    // zeroed allocation: fresh untouched pages from the kernel, touched once each below
    let mut v: Vec<u8> = vec![0; bytes as usize];
    for i in (0..v.len()).step_by(4096) {
        v[i] = 1;
    }
    std::hint::black_box(&v);
    drop(v);
    eprintln!(
        "[bench] warmed {} MiB of host memory in {:.1} s",
        bytes >> 20,
        t.elapsed().as_secs_f64()
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_heartbeats_and_rejects_cut_lines() {
        let h = parse_hb("HB seq=12 t_us=345 tick=1,2 w=9 simd=ok").unwrap();
        assert_eq!(h, Hb { seq: 12, t_us: 345 });
        assert!(parse_hb("HB seq=12 t_us=34").is_none());
        assert!(parse_hb(" w=75032 behind=3594 simd=ok").is_none());
        assert!(parse_hb("HB seq=x t_us=1 simd=ok").is_none());
        let w =
            parse_hb("WHB n=411 mono_ns=41991354581 real_ns=1796299498257132182 w=37766 bad=0\r");
        assert_eq!(
            w,
            Some(Hb {
                seq: 411,
                t_us: 41991354
            })
        );
        assert!(parse_hb("WHB n=413 mono_ns=42071400769 real").is_none());
        assert!(parse_hb("WHB n=413 mono_ns=42071400769 real_ns=1 w=2 bad=").is_none());
    }

    #[test]
    fn merges_a_line_cut_by_the_switch() {
        let src = Follow::start(
            std::io::Cursor::new(b"HB seq=1 t_us=10 simd=ok\nHB seq=2 t_us=20 w=1 s".to_vec()),
            "src",
        )
        .unwrap();
        let long = Duration::from_secs(5);
        // the destination's lines arrive after the source's (as in a migration)
        src.wait("seq 1", long, |l| l.starts_with("HB seq=1"))
            .unwrap();
        std::thread::sleep(Duration::from_millis(20));
        let dst = Follow::start(
            std::io::Cursor::new(b"imd=ok\nHB seq=3 t_us=30 simd=ok\n".to_vec()),
            "dst",
        )
        .unwrap();
        dst.wait("seq 3", long, |l| l.starts_with("HB seq=3"))
            .unwrap();
        let seqs: Vec<u64> = merged(&src, &dst).iter().map(|(_, h)| h.seq).collect();
        assert_eq!(seqs, [1, 2, 3]);
    }

    #[test]
    fn freeze_stall_and_continuity() {
        let t = Instant::now();
        let at = |ms: u64| t + Duration::from_millis(ms);
        let hb = |seq, ms| {
            (
                at(ms),
                Hb {
                    seq,
                    t_us: ms * 1000,
                },
            )
        };
        // Heartbeats every 10 ms, then a 50 ms gap after migration start (at 2000 ms).
        let mut v: Vec<_> = (0..200).map(|i| hb(i, i * 10)).collect();
        v.push(hb(200, 2040));
        v.push(hb(201, 2050));
        let f = figures(&v, at(2000), at(2100), 10.0);
        assert!((f.freeze_ms - 50.0).abs() < 1e-6);
        assert!((f.stall_ms - 40.0).abs() < 1e-6);
        assert!(f.seq_continuous);
        assert_eq!(f.seq_skipped, 0);
        assert!(f.ran_on());
        v.push(hb(0, 2060));
        assert!(!figures(&v, at(2000), at(2100), 10.0).seq_continuous);
        // a guest last heard before the migration started did not run on
        let quiet: Vec<_> = (0..150).map(|i| hb(i, i * 10)).collect();
        let f = figures(&quiet, at(2000), at(2100), 10.0);
        assert!(!f.ran_on());
        assert_eq!(f.heartbeats_after_start, 0);
    }
}
