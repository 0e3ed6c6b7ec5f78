//! The Linux guest's workload and witness (a static binary in the guest's initramfs).
//!
//! It keeps most of guest memory under writes and can tell afterwards whether any page came back
//! wrong:
//! - every 4 KiB page of its region holds a stamp — a magic word, the page's own index and the
//!   sequence number of the write that made it — and a body derived from (index, sequence); a
//!   table (in guest memory too) records the sequence each page should hold;
//! - one writer thread per vCPU rewrites random pages of its share at `rate=` pages per second,
//!   and checks each page against the table before it overwrites it, so a lost, stale, zeroed,
//!   duplicated (another page's stamp) or corrupt page is found while the workload runs;
//! - a heartbeat thread prints `WHB` lines every `hb=` ms with CLOCK_MONOTONIC and
//!   CLOCK_REALTIME, and reports a monotonic clock that goes back;
//! - with `log=PATH` (a file on the guest's virtio disk) it appends a checksummed record every
//!   `logms=` ms and syncs each ([`disklog`]);
//! - with `peer=HOST:PORT` it holds a TCP connection to `witness peer` (run on the host side)
//!   and both ends send and check the same byte stream ([`stream`]);
//! - lines on stdin are commands: `v` verifies every page (writers held meanwhile), the disk log
//!   (read back from the disk) and the stream, and prints a verdict over all three, `q` holds
//!   the writers, `r` lets them go on, `s` prints counters.
//!
//! Output lines (all start with a word tests match on):
//! `WITNESS START …`, `WITNESS READY …`, `WHB n= mono_ns= real_ns= w= bad=`,
//! `WITNESS BAD page= kind= …`, `WITNESS CLOCK_BACK …`, `WITNESS VERIFY pages= bad= ms=`,
//! `WITNESS DISK records= synced= bad=`, `WITNESS NET sent= recv= bad= state= idle_ms=`,
//! `WITNESS VERDICT ok|BAD`.
//!
//! Arguments: `key=value` words — `mib=` (region size; default 70 % of MemAvailable), `rate=`
//! (page writes per second per writer; default 2000, 0 = as fast as possible), `hb=` (heartbeat
//! period in ms; default 20), `writers=` (default: online CPUs), `log=PATH`, `logms=` (default
//! 50), `peer=HOST:PORT`, `netkbs=` (KiB/s each way; default 256).
//!
//! `witness peer listen=ADDR` is the stream's other end (see [`stream::peer`]).

mod clock;
mod disklog;
mod mix;
mod stream;

use std::io::{BufRead, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clock::clock;
use mix::{mix, splitmix};

const PAGE: usize = 4096;
const WORDS: usize = PAGE / 8;
const MAGIC: u64 = 0x2153_5345_4e54_4957; // "WITNESS!"
/// Most `BAD` lines printed (the count goes on).
const MAX_REPORTS: u64 = 20;

/// The page body's seed for a write.
fn seed(index: u64, seq: u64) -> u64 {
    index.wrapping_mul(0x100_0000_01b3) ^ seq.rotate_left(29)
}

/// The region of stamped pages and the table of what each should hold.
struct Region {
    base: *mut u64,
    pages: usize,
    /// The sequence number each page should hold.
    table: Vec<AtomicU64>,
    bad: AtomicU64,
    writes: AtomicU64,
    /// Writers are asked to stop between pages.
    hold: AtomicBool,
    held: AtomicUsize,
}

// SAFETY: the region's pages are partitioned among writer threads (page i belongs to writer
// i % writers), and the verifier reads them only while every writer is held (`hold`/`held`,
// with release/acquire ordering), so no page is written and read at the same time.
unsafe impl Sync for Region {}
// SAFETY: as for Sync: the pointer is to a private anonymous mapping that lives as long as the
// process (it is never unmapped).
unsafe impl Send for Region {}

/// What is wrong with a page.
enum Bad {
    Zero,
    Foreign(u64),
    Stale(u64),
    Corrupt(usize),
}

impl std::fmt::Display for Bad {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Bad::Zero => write!(f, "zero"),
            Bad::Foreign(i) => write!(f, "foreign stamp_page={i}"),
            Bad::Stale(s) => write!(f, "stale got_seq={s}"),
            Bad::Corrupt(w) => write!(f, "corrupt word={w}"),
        }
    }
}

impl Region {
    fn map(pages: usize) -> std::io::Result<Region> {
        // SAFETY: a fresh private anonymous mapping; nothing else refers to it.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                pages * PAGE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Region {
            base: p.cast(),
            pages,
            table: (0..pages).map(|_| AtomicU64::new(0)).collect(),
            bad: AtomicU64::new(0),
            writes: AtomicU64::new(0),
            hold: AtomicBool::new(false),
            held: AtomicUsize::new(0),
        })
    }

    /// Page `i`'s words.
    ///
    /// # Safety
    /// The caller owns page `i` now (its writer, or the verifier while all writers are held).
    #[allow(clippy::mut_from_ref)]
    unsafe fn page(&self, i: usize) -> &mut [u64] {
        // SAFETY: i < pages (callers index within the region), the mapping spans pages * PAGE
        // bytes, and the caller's ownership of page i keeps the borrow unique.
        unsafe { std::slice::from_raw_parts_mut(self.base.add(i * WORDS), WORDS) }
    }

    fn write(&self, i: usize, seq: u64) {
        // SAFETY: only page i's writer calls write(i).
        let w = unsafe { self.page(i) };
        let mut s = seed(i as u64, seq);
        w[0] = MAGIC;
        w[1] = i as u64;
        w[2] = seq;
        for x in &mut w[3..] {
            *x = splitmix(&mut s);
        }
        self.table[i].store(seq, Ordering::Release);
    }

    fn check(&self, i: usize) -> Result<(), Bad> {
        let want = self.table[i].load(Ordering::Acquire);
        // SAFETY: called by page i's writer, or by the verifier with every writer held.
        let w = unsafe { self.page(i) };
        if w.iter().all(|&x| x == 0) {
            return Err(Bad::Zero);
        }
        if w[0] != MAGIC || w[1] != i as u64 {
            return Err(Bad::Foreign(w[1]));
        }
        if w[2] != want {
            return Err(Bad::Stale(w[2]));
        }
        let mut s = seed(i as u64, want);
        for (k, &x) in w[3..].iter().enumerate() {
            if x != splitmix(&mut s) {
                return Err(Bad::Corrupt(k + 3));
            }
        }
        Ok(())
    }

    fn report(&self, i: usize, b: Bad, when: &str) {
        let n = self.bad.fetch_add(1, Ordering::Relaxed);
        if n < MAX_REPORTS {
            let want = self.table[i].load(Ordering::Relaxed);
            println!("WITNESS BAD page={i} want_seq={want} kind={b} found={when}");
        }
    }

    /// Holds every writer (returns when all have stopped between pages).
    fn hold_writers(&self, writers: usize) {
        self.hold.store(true, Ordering::SeqCst);
        while self.held.load(Ordering::Acquire) < writers {
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn release_writers(&self) {
        self.hold.store(false, Ordering::SeqCst);
    }

    fn verify_all(&self) -> (usize, u64) {
        let before = self.bad.load(Ordering::Relaxed);
        for i in 0..self.pages {
            if let Err(b) = self.check(i) {
                self.report(i, b, "verify");
            }
        }
        (self.pages, self.bad.load(Ordering::Relaxed) - before)
    }
}

fn writer(r: Arc<Region>, k: usize, writers: usize, rate: u64) {
    let mine: Vec<usize> = (k..r.pages).step_by(writers).collect();
    let mut seq = (k as u64) << 56 | 1;
    for &i in &mine {
        r.write(i, seq);
        seq += 1;
    }
    r.held.fetch_add(1, Ordering::AcqRel); // counted as "ready" by main
    while r.hold.load(Ordering::Acquire) {
        std::thread::sleep(Duration::from_millis(1));
    }
    r.held.fetch_sub(1, Ordering::AcqRel);
    let mut rng = 0x1234_5678 ^ k as u64;
    let start = Instant::now();
    let mut done = 0u64;
    loop {
        if r.hold.load(Ordering::Acquire) {
            r.held.fetch_add(1, Ordering::AcqRel);
            while r.hold.load(Ordering::Acquire) {
                std::thread::sleep(Duration::from_millis(1));
            }
            r.held.fetch_sub(1, Ordering::AcqRel);
        }
        if rate > 0 {
            let due = start.elapsed().as_micros() as u64 * rate / 1_000_000;
            if done >= due {
                std::thread::sleep(Duration::from_millis(1));
                continue;
            }
        }
        let i = mine[(splitmix(&mut rng) % mine.len() as u64) as usize];
        if let Err(b) = r.check(i) {
            r.report(i, b, "rewrite");
        }
        r.write(i, seq);
        seq += 1;
        done += 1;
        r.writes.fetch_add(1, Ordering::Relaxed);
    }
}

fn heartbeats(r: Arc<Region>, hb: Duration) {
    let mut last_mono = 0u64;
    let mut n = 0u64;
    loop {
        let mono = clock(libc::CLOCK_MONOTONIC);
        let real = clock(libc::CLOCK_REALTIME);
        if mono < last_mono {
            println!("WITNESS CLOCK_BACK mono_ns={mono} before={last_mono}");
        }
        last_mono = mono;
        println!(
            "WHB n={n} mono_ns={mono} real_ns={real} w={} bad={}",
            r.writes.load(Ordering::Relaxed),
            r.bad.load(Ordering::Relaxed)
        );
        let _ = std::io::stdout().flush();
        n += 1;
        std::thread::sleep(hb);
    }
}

fn mem_available_kib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemAvailable:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(256 * 1024)
}

/// `witness peer listen=ADDR`.
fn peer_main(args: &[String]) -> ! {
    let mut listen = "0.0.0.0:5555".to_owned();
    for a in args {
        match a.split_once('=') {
            Some(("listen", v)) => listen = v.to_owned(),
            _ => {
                eprintln!("witness peer: bad argument {a:?} (listen=ADDR)");
                std::process::exit(2);
            }
        }
    }
    if let Err(e) = stream::peer(&listen) {
        eprintln!("witness peer: {listen}: {e}");
        std::process::exit(1);
    }
    std::process::exit(0);
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("peer") {
        peer_main(&args[1..]);
    }
    let mut mib = 0u64;
    let mut rate = 2000u64;
    let mut hb_ms = 20u64;
    let mut writers = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut log_path: Option<String> = None;
    let mut log_ms = 50u64;
    let mut peer: Option<String> = None;
    let mut net_kbs = 256u64;
    for a in &args {
        let (k, v) = a.split_once('=').unwrap_or((a.as_str(), ""));
        let num = v.parse::<u64>();
        match (k, num) {
            ("mib", Ok(n)) => mib = n,
            ("rate", Ok(n)) => rate = n,
            ("hb", Ok(n)) if n > 0 => hb_ms = n,
            ("writers", Ok(n)) if n > 0 => writers = n as usize,
            ("logms", Ok(n)) if n > 0 => log_ms = n,
            ("netkbs", Ok(n)) if n > 0 => net_kbs = n,
            ("log", _) if !v.is_empty() => log_path = Some(v.to_owned()),
            ("peer", _) if !v.is_empty() => peer = Some(v.to_owned()),
            _ => {
                eprintln!(
                    "witness: bad argument {a:?} (mib=N rate=N hb=MS writers=N log=PATH logms=MS peer=HOST:PORT netkbs=N)"
                );
                std::process::exit(2);
            }
        }
    }
    if mib == 0 {
        mib = mem_available_kib() * 7 / 10 / 1024;
    }
    let pages = (mib * 1024 * 1024 / PAGE as u64) as usize;
    println!("WITNESS START mib={mib} pages={pages} writers={writers} rate={rate} hb_ms={hb_ms}");
    let r = match Region::map(pages) {
        Ok(r) => Arc::new(r),
        Err(e) => {
            println!("WITNESS FAIL mmap of {mib} MiB: {e}");
            std::process::exit(1);
        }
    };
    let t = Instant::now();
    r.hold.store(true, Ordering::SeqCst);
    for k in 0..writers {
        let r = r.clone();
        std::thread::spawn(move || writer(r, k, writers, rate));
    }
    r.hold_writers(writers);
    println!(
        "WITNESS READY pages={pages} fill_ms={}",
        t.elapsed().as_millis()
    );
    r.release_writers();
    {
        let r = r.clone();
        std::thread::spawn(move || heartbeats(r, Duration::from_millis(hb_ms)));
    }
    let run_id = mix(clock(libc::CLOCK_REALTIME) ^ clock(libc::CLOCK_MONOTONIC));
    let log = log_path
        .as_deref()
        .and_then(|p| match disklog::DiskLog::create(p, run_id) {
            Ok(l) => {
                println!("WITNESS DISK log={p} every {log_ms} ms");
                let l = Arc::new(l);
                let w = l.clone();
                std::thread::spawn(move || w.run(Duration::from_millis(log_ms)));
                Some(l)
            }
            Err(e) => {
                // counted as bad in every verdict: a log was asked for
                println!("WITNESS DISK ERROR cannot create {p}: {e}");
                None
            }
        });
    let net = Arc::new(stream::Stream::default());
    if let Some(p) = peer.clone() {
        let n = net.clone();
        std::thread::spawn(move || n.run(p, net_kbs));
    }
    let stdin = std::io::stdin();
    let mut held = false;
    for line in stdin.lock().lines() {
        let Ok(line) = line else { break };
        match line.trim() {
            "v" => {
                let t = Instant::now();
                if !held {
                    r.hold_writers(writers);
                }
                let (n, bad) = r.verify_all();
                if !held {
                    r.release_writers();
                }
                println!(
                    "WITNESS VERIFY pages={n} bad={bad} total_bad={} ms={}",
                    r.bad.load(Ordering::Relaxed),
                    t.elapsed().as_millis()
                );
                let mut ok = r.bad.load(Ordering::Relaxed) == 0;
                if let Some(p) = &log_path {
                    let c = log.as_ref().map(|l| l.verify());
                    let (records, synced, bad) = c
                        .as_ref()
                        .map_or((0, 0, 1), |c| (c.records, c.synced, c.bad));
                    let errors = log.as_ref().map_or(0, |l| l.errors.load(Ordering::Relaxed));
                    println!(
                        "WITNESS DISK log={p} records={records} synced={synced} bad={bad} errors={errors}"
                    );
                    ok &= c.is_some_and(|c| c.ok()) && errors == 0;
                }
                if peer.is_some() {
                    let idle_ms = (clock(libc::CLOCK_MONOTONIC)
                        .saturating_sub(net.last_recv_ns.load(Ordering::Relaxed)))
                        / 1_000_000;
                    let state = net.state();
                    let bad = net.bad.load(Ordering::Relaxed);
                    println!(
                        "WITNESS NET sent={} recv={} bad={bad} state={state} idle_ms={idle_ms}",
                        net.sent.load(Ordering::Relaxed),
                        net.recv.load(Ordering::Relaxed),
                    );
                    // the stream must be up, right, and still flowing (bytes within 10 s)
                    ok &= state == "up" && bad == 0 && idle_ms < 10_000;
                }
                println!("WITNESS VERDICT {}", if ok { "ok" } else { "BAD" });
            }
            "q" => {
                r.hold_writers(writers);
                held = true;
                println!("WITNESS HELD");
            }
            "r" => {
                r.release_writers();
                held = false;
                println!("WITNESS RUNNING");
            }
            "s" => println!(
                "WITNESS STATS pages={pages} writes={} bad={}",
                r.writes.load(Ordering::Relaxed),
                r.bad.load(Ordering::Relaxed)
            ),
            "" => {}
            other => println!("WITNESS UNKNOWN {other:?} (v q r s)"),
        }
        let _ = std::io::stdout().flush();
    }
    // stdin closed: keep running (the console may be gone); the writers and heartbeats go on.
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}
