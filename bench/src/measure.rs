//! The measurements. Every figure of ours is paired with a raw baseline taken in the same run:
//! a plain TCP round trip, plain TCP throughput, a bare userfaultfd fault.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use pager::{Addr, Pager, PagerConfig};
use transport::sched::pin_current_thread;
use uffd::Uffd;

use crate::image::Rng;

/// Latency samples in nanoseconds.
#[derive(Debug, Default, Clone)]
pub struct Samples(pub Vec<u64>);

impl Samples {
    /// Sorts for quantiles.
    pub fn sorted(mut self) -> Self {
        self.0.sort_unstable();
        self
    }
    /// Quantile in microseconds (sorted samples).
    pub fn q_us(&self, q: f64) -> f64 {
        if self.0.is_empty() {
            return f64::NAN;
        }
        let i = ((q * self.0.len() as f64).ceil() as usize).clamp(1, self.0.len()) - 1;
        self.0[i] as f64 / 1000.0
    }
}

/// 4 KiB request/reply round trips over loopback TCP, both ends blocking, TCP_NODELAY.
pub fn raw_rtt(n: usize, cpu: Option<usize>) -> anyhow::Result<Samples> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    let addr = l.local_addr()?;
    let server = std::thread::spawn(move || -> std::io::Result<()> {
        if let Some(c) = cpu {
            pin_current_thread(c);
        }
        let (mut s, _) = l.accept()?;
        s.set_nodelay(true)?;
        let page = vec![0x5au8; 4096];
        let mut req = [0u8; 32];
        loop {
            if s.read_exact(&mut req).is_err() {
                return Ok(());
            }
            s.write_all(&page)?;
        }
    });
    let _pin = Pinned::new(cpu);
    let mut c = TcpStream::connect(addr)?;
    c.set_nodelay(true)?;
    let req = [1u8; 32];
    let mut page = vec![0u8; 4096];
    let mut out = Vec::with_capacity(n);
    for i in 0..n + n / 10 {
        let t = Instant::now();
        c.write_all(&req)?;
        c.read_exact(&mut page)?;
        if i >= n / 10 {
            out.push(t.elapsed().as_nanos() as u64);
        }
    }
    drop(c);
    let _ = server.join();
    Ok(Samples(out).sorted())
}

/// One-connection loopback TCP throughput (Gbit/s), `bytes` in 1 MiB writes.
pub fn tcp_gbps(bytes: u64) -> anyhow::Result<f64> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    let addr = l.local_addr()?;
    let sender = std::thread::spawn(move || -> std::io::Result<()> {
        let mut s = TcpStream::connect(addr)?;
        let buf = vec![0xa5u8; 1 << 20];
        let mut sent = 0;
        while sent < bytes {
            s.write_all(&buf)?;
            sent += buf.len() as u64;
        }
        Ok(())
    });
    let (mut r, _) = l.accept()?;
    let mut buf = vec![0u8; 1 << 20];
    let t = Instant::now();
    let mut got = 0u64;
    while got < bytes {
        let n = r.read(&mut buf)?;
        if n == 0 {
            bail!("sender closed early");
        }
        got += n as u64;
    }
    let secs = t.elapsed().as_secs_f64();
    sender
        .join()
        .map_err(|_| anyhow::anyhow!("sender panicked"))??;
    Ok(bytes as f64 * 8.0 / secs / 1e9)
}

/// Pins the calling thread for its lifetime, then lets it run anywhere again.
pub struct Pinned(bool);

impl Pinned {
    /// Pins to `cpu` if given.
    pub fn new(cpu: Option<usize>) -> Pinned {
        Pinned(cpu.is_some_and(pin_current_thread))
    }
}

impl Drop for Pinned {
    fn drop(&mut self) {
        if self.0 {
            transport::sched::allow_all_cpus();
        }
    }
}

thread_local! {
    static TOUCH_CPU: std::cell::Cell<Option<usize>> = const { std::cell::Cell::new(None) };
}

/// The CPU touching threads use (set once by the caller: the fault thread's CPU).
pub fn set_touch_cpu(cpu: Option<usize>) {
    TOUCH_CPU.with(|c| c.set(cpu));
}

fn p_cpu(_p: &Pager) -> Option<usize> {
    TOUCH_CPU.with(|c| c.get())
}

/// Touches one byte of `page` and returns how long it took (ns).
fn timed_touch(base: usize, page: u64) -> u64 {
    let t = Instant::now();
    // SAFETY: `base` maps at least `page + 1` pages; a read faults the page in.
    unsafe { std::ptr::read_volatile((base + page as usize * 4096) as *const u8) };
    t.elapsed().as_nanos() as u64
}

/// Random-order touches of pages not yet present, timed from the touching thread: what a
/// vCPU would see. Stops after `n` samples, at `deadline`, or when `keep_going` says so.
fn touch_random(p: &Pager, n: usize, seed: u64, deadline: Instant) -> Samples {
    let _pin = Pinned::new(p_cpu(p));
    let base = p.memory().regions()[0].0 as usize;
    let pages = p.total_pages();
    let mut rng = Rng(seed);
    let mut out = Vec::with_capacity(n);
    let mut tries = 0u64;
    while out.len() < n && Instant::now() < deadline && p.present_pages() < pages {
        let page = rng.next_u64() % pages;
        tries += 1;
        if p.is_present(page) {
            if tries > 50 * n as u64 {
                break;
            }
            continue;
        }
        out.push(timed_touch(base, page));
    }
    Samples(out).sorted()
}

/// `base` with the stream off: every page comes in through a fault.
fn demand_only(base: &PagerConfig) -> PagerConfig {
    PagerConfig {
        stream: false,
        ..base.clone()
    }
}

/// Remote faults with the stream off (pure demand), random order.
pub fn remote_faults(
    addr: &Addr,
    n: usize,
    base: &PagerConfig,
) -> anyhow::Result<(Samples, pager::Report)> {
    let p = Pager::connect(addr, demand_only(base)).context("connect to page-server")?;
    let s = touch_random(&p, n, 7, Instant::now() + Duration::from_secs(60));
    Ok((s, p.report()))
}

/// Remote faults while the stream runs flat out; then the stream's completion time.
pub fn faults_under_stream(
    addr: &Addr,
    n: usize,
    base: &PagerConfig,
) -> anyhow::Result<(Samples, pager::Report)> {
    let mut p = Pager::connect(addr, base.clone()).context("connect to page-server")?;
    let s = touch_random(&p, n, 11, Instant::now() + Duration::from_secs(60));
    Ok((s, complete(&mut p, "restore under stream")?))
}

/// Waits for every page to be present (at most 300 s).
fn complete(p: &mut Pager, what: &str) -> anyhow::Result<pager::Report> {
    match p.wait(Duration::from_secs(300)) {
        Some(Ok(r)) => Ok(r),
        Some(Err(e)) => Err(e).with_context(|| format!("{what} failed")),
        None => bail!("{what} did not complete in 300 s"),
    }
}

/// Stream only, no touches: time to make every page present.
pub fn stream_only(addr: &Addr, base: &PagerConfig) -> anyhow::Result<pager::Report> {
    let mut p = Pager::connect(addr, base.clone()).context("connect to page-server")?;
    complete(&mut p, "stream restore")
}

/// Faults served from the local image file (no network), random order, stream off.
pub fn local_faults(
    image: &Path,
    n: usize,
    base: &PagerConfig,
) -> anyhow::Result<(Samples, pager::Report)> {
    let p = Pager::local(image, demand_only(base)).context("local restore")?;
    let s = touch_random(&p, n, 13, Instant::now() + Duration::from_secs(60));
    Ok((s, p.report()))
}

/// The floor: a bare userfaultfd handler that copies each faulting page from a buffer already
/// in memory (no policy, no bookkeeping), random-order touches.
pub fn raw_local_faults(
    region_bytes: usize,
    n: usize,
    cpu: Option<usize>,
) -> anyhow::Result<Samples> {
    // a small source buffer, hot in cache: the floor, not a second 256 MiB allocation
    const SRC_BYTES: usize = 1 << 20;
    let src = vec![0x3cu8; SRC_BYTES];
    // SAFETY: a fresh private anonymous mapping.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            region_bytes,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        bail!("mmap: {}", std::io::Error::last_os_error());
    }
    let base = p as usize;
    // SAFETY: advising our own mapping.
    unsafe { libc::madvise(p, region_bytes, libc::MADV_NOHUGEPAGE) };
    let uffd = std::sync::Arc::new(Uffd::new()?);
    uffd.register_missing(base as u64, region_bytes as u64)?;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (u, st) = (uffd.clone(), stop.clone());
    let src_addr = src.as_ptr() as usize;
    let handler = std::thread::spawn(move || {
        if let Some(c) = cpu {
            pin_current_thread(c);
        }
        let mut faults = Vec::new();
        while !st.load(std::sync::atomic::Ordering::Relaxed) {
            if !u.wait_readable(100) {
                continue;
            }
            faults.clear();
            let _ = u.read_faults(&mut faults);
            for &a in &faults {
                let page = (a - base as u64) & !4095;
                // SAFETY: `src` holds SRC_BYTES bytes; the offset is a page inside it.
                let _ = unsafe {
                    u.install(
                        base as u64 + page,
                        Some((src_addr + page as usize % SRC_BYTES) as *const u8),
                        4096,
                        4096,
                    )
                };
            }
        }
    });
    let _pin = Pinned::new(cpu);
    let pages = (region_bytes / 4096) as u64;
    let mut rng = Rng(17);
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::with_capacity(n);
    let want = n.min(pages as usize / 2);
    let warmup = want / 10;
    while out.len() < want + warmup {
        let page = rng.next_u64() % pages;
        if seen.insert(page) {
            out.push(timed_touch(base, page));
        }
    }
    out.drain(..warmup);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = handler.join();
    // SAFETY: unmapping our own mapping; the handler has stopped.
    unsafe { libc::munmap(p, region_bytes) };
    drop(src);
    Ok(Samples(out).sorted())
}
