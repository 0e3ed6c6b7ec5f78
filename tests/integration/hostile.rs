//! Malicious peers: each speaks our real protocols over real sockets and misbehaves — frames
//! whose length lies, frames cut off, peers that stall mid-frame, request floods, pages for the
//! wrong address, garbage. Each must be refused with an error that names what was wrong, memory
//! must stay bounded, nothing may panic or hang, and the good peers next to it carry on.
//!
//! A: hostile clients against the real `page-server` program (a process of its own, so its
//!    memory can be read from /proc) while good pagers restore from it.
//! B: a hostile page-server written here (real handshake, then lies) against the pager.
//! C: hostile "sources" against `vmm --incoming`, which must refuse them, keep listening and
//!    then take a real migration.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use pager::{Addr, Pager, PagerConfig, PagerError, PagerEvent};
use proto::{
    error_code, mask_len, read_frame, Channel, Header, Kind, Layout, Message, Origin, PageIndex,
    Welcome, HEADER_LEN, MAX_PAYLOAD_BYTES, PROTOCOL_VERSION,
};
use serde_json::Value;

use crate::common::*;
use crate::migration::{
    check_continues, check_report, gates, last_heartbeat, migrate, source_exits, start_dest,
    still_running,
};
use crate::vm::{boot_guest, ctl_raw, VmmProc};

// ------------------------------------------------------------------------------------------
// Shared helpers
// ------------------------------------------------------------------------------------------

/// A frame header of `kind` announcing `len` payload bytes (whatever follows).
fn header(kind: Kind, len: u32) -> [u8; HEADER_LEN] {
    let mut h = Header {
        kind,
        payload_len: 0,
    }
    .encode();
    h[8..12].copy_from_slice(&len.to_le_bytes());
    h
}

/// A field of /proc/PID/status in KiB (VmRSS, RssAnon, ...).
fn status_kib(pid: u32, field: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Samples a process's RssAnon and VmRSS every few ms until dropped; keeps the maxima.
struct RssWatch {
    stop: Arc<AtomicBool>,
    max_anon: Arc<AtomicU64>,
    max_rss: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

impl RssWatch {
    fn start(pid: u32) -> RssWatch {
        let stop = Arc::new(AtomicBool::new(false));
        let max_anon = Arc::new(AtomicU64::new(0));
        let max_rss = Arc::new(AtomicU64::new(0));
        let (s, a, r) = (stop.clone(), max_anon.clone(), max_rss.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                a.fetch_max(status_kib(pid, "RssAnon"), Ordering::Relaxed);
                r.fetch_max(status_kib(pid, "VmRSS"), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        RssWatch {
            stop,
            max_anon,
            max_rss,
            thread: Some(thread),
        }
    }

    /// (max RssAnon, max VmRSS) in KiB so far.
    fn max(&self) -> (u64, u64) {
        (
            self.max_anon.load(Ordering::Relaxed),
            self.max_rss.load(Ordering::Relaxed),
        )
    }
}

impl Drop for RssWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Reads from `s` until the peer closes (or `within` passes); returns the first error frame
/// it sent, if any, and whether it closed.
fn error_then_close(s: &mut TcpStream, within: Duration) -> (Option<(u16, String)>, bool) {
    let deadline = Instant::now() + within;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 64 << 10];
    let mut closed = false;
    while Instant::now() < deadline {
        let left = deadline.saturating_duration_since(Instant::now());
        let _ = s.set_read_timeout(Some(left.max(Duration::from_millis(1))));
        match s.read(&mut chunk) {
            Ok(0) => {
                closed = true;
                break;
            }
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => {
                closed = true; // reset
                break;
            }
        }
    }
    let mut at = 0;
    while at < buf.len() {
        let Ok((m, used)) = Message::decode_frame(&buf[at..], PS as u32) else {
            break;
        };
        if let Message::Error { code, reason } = m {
            return (Some((code, reason.to_string())), closed);
        }
        at += used;
    }
    (None, closed)
}

/// Like [`error_then_close`], insisting on both; returns the error.
fn refused(s: &mut TcpStream, what: &str) -> (u16, String) {
    let (err, closed) = error_then_close(s, Duration::from_secs(5));
    assert!(closed, "{what}: the server kept the connection open");
    err.unwrap_or_else(|| panic!("{what}: closed without an error frame"))
}

/// A kernel-mode read of the first word of the page at `addr` (write(2) from it into a pipe),
/// on a thread: faults like a vCPU's access would, and if the mapping goes away while the fault
/// waits it gets EFAULT (None) instead of killing the test with SIGSEGV.
fn kernel_read(addr: usize) -> Receiver<Option<u64>> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut fds = [0i32; 2];
        // SAFETY: pipe(2) into a local array.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        // SAFETY: the kernel reads 8 bytes at `addr` (a page of a live paged mapping, or one
        // that went away: then the call fails with EFAULT); the pipe is ours.
        let n = unsafe { libc::write(fds[1], addr as *const libc::c_void, 8) };
        let mut word = [0u8; 8];
        let got = if n == 8 {
            // SAFETY: reading the 8 bytes just written into a local buffer.
            let r = unsafe { libc::read(fds[0], word.as_mut_ptr().cast(), 8) };
            (r == 8).then(|| u64::from_le_bytes(word))
        } else {
            None
        };
        // SAFETY: closing our pipe.
        unsafe {
            libc::close(fds[0]);
            libc::close(fds[1]);
        }
        let _ = tx.send(got);
    });
    rx
}

/// The first word of pattern page `i`.
fn pattern_word(i: u64) -> u64 {
    let mut p = vec![0u8; PS];
    pattern_page(i, &mut p);
    u64::from_le_bytes(p[..8].try_into().unwrap())
}

/// A `Pages` frame for `count` pages from `first` whose bytes come from `page(i, buf)`.
fn pages_frame(first: u64, count: u32, origin: Origin, page: impl Fn(u64, &mut [u8])) -> Vec<u8> {
    let mut mask = vec![0u8; mask_len(count)];
    let mut data = Vec::new();
    let mut buf = vec![0u8; PS];
    for i in 0..count as u64 {
        page(first + i, &mut buf);
        if buf.iter().all(|&b| b == 0) {
            mask[(i / 8) as usize] |= 1 << (i % 8);
        } else {
            data.extend_from_slice(&buf);
        }
    }
    Message::Pages(proto::Pages {
        first: PageIndex(first),
        count,
        origin,
        zero_mask: &mask,
        data: &data,
    })
    .to_vec()
}

fn garbage_page(_: u64, buf: &mut [u8]) {
    buf.fill(0xEE);
}

const GARBAGE_WORD: u64 = u64::from_le_bytes([0xEE; 8]);

// ------------------------------------------------------------------------------------------
// A: hostile clients against the page-server program
// ------------------------------------------------------------------------------------------

/// The real page-server program with its log (RUST_LOG=info) in a file; killed on drop.
struct LoggedServer {
    child: Child,
    addr: String,
    log: PathBuf,
}

impl Drop for LoggedServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.log);
    }
}

impl LoggedServer {
    fn start(image: &Path) -> LoggedServer {
        let log = temp_path("page-server.log");
        let mut child = Command::new(env!("CARGO_BIN_EXE_page-server-fixture"))
            .args([
                "--serve",
                image.to_str().unwrap(),
                "--listen",
                "127.0.0.1:0",
                "--print-addr",
            ])
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("start page-server fixture");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("read listening line");
        let addr = line
            .trim()
            .strip_prefix("listening ")
            .unwrap_or_else(|| panic!("unexpected output {line:?}"))
            .to_string();
        LoggedServer { child, addr, log }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn connect(&self) -> TcpStream {
        let s = TcpStream::connect(&self.addr).expect("connect to page-server");
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s
    }

    /// Opens a channel with a correct Hello; returns it and its session.
    fn channel(&self, channel: Channel, session: u64) -> (TcpStream, u64) {
        let mut s = self.connect();
        s.write_all(&proto::hello(channel, session, PS as u32, Layout::default()).to_vec())
            .unwrap();
        let mut buf = Vec::new();
        let h = read_frame(&mut s, &mut buf).expect("Welcome");
        let Ok(Message::Welcome(w)) = Message::decode(&h, &buf, PS as u32) else {
            panic!("no Welcome for {channel:?}");
        };
        (s, w.session)
    }

    /// A control and an urgent connection of a new session.
    fn session(&self) -> (TcpStream, TcpStream, u64) {
        let (c, id) = self.channel(Channel::Control, 0);
        let (u, _) = self.channel(Channel::Urgent, id);
        (c, u, id)
    }

    /// Asserts the log gets a line containing every one of `parts` within `within`.
    fn expect_log(&self, parts: &[&str], within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let log = self.log_text();
            if log.lines().any(|l| parts.iter().all(|p| l.contains(p))) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "no log line with {parts:?}; log:\n{log}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn request(first: u64, count: u32, fault_pages: u32) -> Vec<u8> {
    Message::Request(proto::Request {
        first: PageIndex(first),
        count,
        fault_pages,
    })
    .to_vec()
}

fn good_pager(addr: &str, stream: bool) -> Pager {
    Pager::connect(
        &addr.parse().unwrap(),
        PagerConfig {
            stream,
            ..Default::default()
        },
    )
    .expect("good pager connects")
}

fn complete_and_verify(p: &mut Pager, what: &str) -> pager::Report {
    let r = match p.wait(Duration::from_secs(60)) {
        Some(Ok(r)) => r,
        Some(Err(e)) => panic!("{what}: failed: {e}"),
        None => panic!(
            "{what}: not complete within 60 s ({} of {} pages)",
            p.present_pages(),
            p.total_pages()
        ),
    };
    // SAFETY: complete: every page present.
    verify_pattern(unsafe { p.memory().owned_bytes() }.unwrap());
    r
}

/// Frames that lie about their length, clients that stop mid-frame or stall, requests outside
/// the layout, wrong page sizes and layouts — each refused with an error frame naming it and one
/// log line, while two good pagers (one faulting every page in, one streaming) restore from the
/// same server with every byte right.
#[test]
fn page_server_refuses_lying_stalling_and_out_of_range_clients() {
    if !uffd_or_skip("page_server_refuses_lying_stalling_and_out_of_range_clients") {
        return;
    }
    let pages = 32 * 256u64;
    let image = pattern_image(pages);
    let mut server = LoggedServer::start(&image.0);
    let t0 = Instant::now();
    let mut demand = good_pager(&server.addr, false);
    let mut streamed = good_pager(&server.addr, true);
    let base = demand.memory().regions()[0].0 as usize;
    touch_pages(base, 0..64);

    // A1. a header announcing far more than the frame cap: refused on the header alone
    let mut s = server.connect();
    s.write_all(&header(Kind::Hello, u32::MAX)).unwrap();
    let (code, reason) = refused(&mut s, "oversized frame");
    assert_eq!(code, error_code::PROTOCOL);
    assert!(
        reason.contains("4294967295") && reason.contains("over the cap"),
        "{reason}"
    );
    server.expect_log(
        &["dropped: bad frame header", "over the cap"],
        Duration::from_secs(5),
    );

    // A1. a Hello announcing a megabyte (under the cap, far over any Hello) with a kilobyte
    // behind it: refused before the server buffers it
    let mut s = server.connect();
    s.write_all(&header(Kind::Hello, 1 << 20)).unwrap();
    s.write_all(&[0u8; 1024]).unwrap();
    let (code, reason) = refused(&mut s, "a Hello that claims 1 MiB");
    assert_eq!(code, error_code::PROTOCOL);
    assert!(reason.contains("1048576"), "{reason}");

    // A1. a frame announcing more than it sends, then the client vanishes: one log line saying
    // how much of the frame came
    let (_c, mut u, _) = server.session();
    u.write_all(&request(0, 1, 1)[..HEADER_LEN + 6]).unwrap();
    drop(u);
    server.expect_log(
        &["dropped: closed mid-frame (22 bytes of a frame received)"],
        Duration::from_secs(5),
    );
    let (mut c, _u, _) = server.session();
    c.write_all(&header(Kind::Bitmap, 1 << 20)).unwrap();
    c.write_all(&[0xffu8; 4000]).unwrap();
    c.shutdown(Shutdown::Write).unwrap();
    let (err, closed) = error_then_close(&mut c, Duration::from_secs(5));
    assert!(closed && err.is_none(), "{err:?} {closed}");
    server.expect_log(
        &["dropped: closed mid-frame (4016 bytes of a frame received)"],
        Duration::from_secs(5),
    );

    // A2. clients that stall: half a header before the handshake, and half a request on an
    // urgent channel, each then silent with its socket open. Nobody else waits for them; the
    // server drops each after its timeout with an error frame.
    let stall_started = Instant::now();
    let mut stall_new = server.connect();
    stall_new.write_all(&header(Kind::Hello, 40)[..8]).unwrap();
    let (_stall_c, mut stall_u, _) = server.session();
    stall_u.write_all(&request(5, 1, 1)[..10]).unwrap();

    // A4, meanwhile: requests outside the layout, malformed requests, wrong page size, wrong
    // layout — each refused, naming the values
    let cases: Vec<(&str, Vec<u8>, u16, Vec<String>)> = vec![
        (
            "a request past the end",
            request(pages, 1, 1),
            error_code::OUT_OF_RANGE,
            vec![format!("{pages}+1 beyond the {pages} served")],
        ),
        (
            "a request crossing the end",
            request(pages - 2, 4, 1),
            error_code::OUT_OF_RANGE,
            vec![format!("{}+4 beyond the {pages} served", pages - 2)],
        ),
        (
            "a request at the top of the page space",
            request(u64::MAX - 1, 1, 1),
            error_code::OUT_OF_RANGE,
            vec!["beyond".into()],
        ),
        (
            "a range that wraps",
            request(u64::MAX, 2, 1),
            error_code::PROTOCOL,
            vec!["wraps".into()],
        ),
        (
            "a request for 0 pages",
            request(0, 0, 0),
            error_code::PROTOCOL,
            vec!["request page count: 0".into()],
        ),
        (
            "a request for more pages than a frame carries",
            request(0, 4096, 1),
            error_code::PROTOCOL,
            vec!["4096".into(), "cap of 2048".into()],
        ),
        (
            "more fault pages than pages",
            request(0, 2, 3),
            error_code::PROTOCOL,
            vec!["fault_pages".into()],
        ),
        (
            "a request with a payload longer than a request",
            {
                let mut r = request(0, 1, 1);
                r[8..12].copy_from_slice(&20u32.to_le_bytes());
                r.extend_from_slice(&[0; 4]);
                r
            },
            error_code::PROTOCOL,
            vec!["request".into(), "payload".into()],
        ),
        (
            "page data sent to the server",
            pages_frame(0, 1, Origin::Fault, pattern_page),
            error_code::PROTOCOL,
            vec!["Pages".into()],
        ),
    ];
    for (what, bytes, want_code, want) in cases {
        let (_c, mut u, _) = server.session();
        u.write_all(&bytes).unwrap();
        let (code, reason) = refused(&mut u, what);
        assert_eq!(code, want_code, "{what}: {reason}");
        for w in &want {
            assert!(
                reason.contains(w.as_str()),
                "{what}: {reason:?} lacks {w:?}"
            );
        }
        println!("{what}: refused: {reason}");
    }
    let hellos: Vec<(&str, Vec<u8>, Vec<&str>)> = vec![
        (
            "another page size",
            proto::hello(Channel::Control, 0, 8192, Layout::default()).to_vec(),
            vec!["page size", "4096", "8192"],
        ),
        (
            "a page size that is no page size",
            proto::hello(Channel::Control, 0, 1000, Layout::default()).to_vec(),
            vec!["invalid page size 1000"],
        ),
        (
            "another layout",
            proto::hello(
                Channel::Control,
                0,
                PS as u32,
                Layout::single(2 * pages * PS as u64),
            )
            .to_vec(),
            vec!["layout mismatch"],
        ),
    ];
    for (what, bytes, want) in hellos {
        let mut s = server.connect();
        s.write_all(&bytes).unwrap();
        let (code, reason) = refused(&mut s, what);
        assert_eq!(code, error_code::HANDSHAKE, "{what}: {reason}");
        for w in &want {
            assert!(reason.contains(w), "{what}: {reason:?} lacks {w:?}");
        }
        println!("{what}: refused: {reason}");
    }

    // the good pagers go on while the stallers hold their sockets
    touch_pages(base, 64..pages / 2);
    let (err, closed) = error_then_close(&mut stall_new, Duration::from_secs(10));
    let waited = stall_started.elapsed();
    assert!(
        closed,
        "a client stalled before its Hello was never dropped"
    );
    let (code, reason) = err.expect("an error frame for the stalled Hello");
    println!("stalled before the handshake: dropped after {waited:?}: {reason}");
    assert_eq!(code, error_code::PROTOCOL);
    assert!(
        reason.contains("Hello") && reason.contains("8 bytes"),
        "{reason}"
    );
    let (err, closed) = error_then_close(&mut stall_u, Duration::from_secs(15));
    let waited = stall_started.elapsed();
    println!("stalled mid-request: dropped after {waited:?}: {err:?}");
    assert!(closed, "a client stalled mid-frame was never dropped");
    let (code, reason) = err.expect("an error frame for the stalled request");
    assert_eq!(code, error_code::PROTOCOL);
    assert!(
        reason.contains("stalled") && reason.contains("10 bytes"),
        "{reason}"
    );
    server.expect_log(&["dropped:", "stalled"], Duration::from_secs(2));

    touch_pages(base, pages / 2..pages);
    complete_and_verify(&mut demand, "the demand-paging pager");
    complete_and_verify(&mut streamed, "the streaming pager");
    assert!(
        server.child.try_wait().unwrap().is_none(),
        "the page-server died"
    );
    let log = server.log_text();
    assert!(!log.contains("panicked"), "{log}");
    println!("took {:?}; server log:\n{log}", t0.elapsed());
}

/// Reads `replies` frames (headers parsed, payloads skipped) from `s`; returns the bytes read.
fn drain_replies(s: TcpStream, replies: usize) -> u64 {
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut r = BufReader::with_capacity(1 << 20, s);
    let mut h = [0u8; HEADER_LEN];
    let mut skip = vec![0u8; 1 << 20];
    let mut total = 0u64;
    for i in 0..replies {
        r.read_exact(&mut h)
            .unwrap_or_else(|e| panic!("reply {i}: {e}"));
        let hd = Header::decode(&h).unwrap_or_else(|e| panic!("reply {i}: {e}"));
        if hd.kind == Kind::Error {
            let mut p = vec![0u8; hd.payload_len as usize];
            r.read_exact(&mut p).unwrap();
            panic!("reply {i}: error {:?}", Message::decode(&hd, &p, PS as u32));
        }
        assert!(
            matches!(hd.kind, Kind::Pages | Kind::InFlight),
            "reply {i}: {:?}",
            hd.kind
        );
        let mut left = hd.payload_len as usize;
        while left > 0 {
            let n = left.min(skip.len());
            r.read_exact(&mut skip[..n]).unwrap();
            left -= n;
        }
        total += (HEADER_LEN + hd.payload_len as usize) as u64;
    }
    total
}

/// Clients that flood the urgent channel with requests: one never reads a reply (the server
/// must stop reading it rather than buffer without bound), one pipelines requests for the whole
/// memory while reading replies as fast as it can (the reply buffer must not keep what was
/// already sent). The server's anonymous memory grows by less than 64 MiB over each, and a good
/// pager restores the memory meanwhile.
#[test]
fn page_server_memory_stays_bounded_under_request_floods() {
    if !uffd_or_skip("page_server_memory_stays_bounded_under_request_floods") {
        return;
    }
    let t0 = Instant::now();
    let pages = 256 * 256u64; // 256 MiB
    let image = pattern_image(pages);
    let mut server = LoggedServer::start(&image.0);
    let pid = server.pid();
    std::thread::sleep(Duration::from_millis(100));
    let base_anon = status_kib(pid, "RssAnon");
    let base_rss = status_kib(pid, "VmRSS");
    println!("page-server at start: VmRSS {base_rss} KiB, RssAnon {base_anon} KiB");
    let limit_kib = 64 << 10;

    // 1. never reads: requests (each a different run of 64 pages, then again) until the server
    // stops taking them
    let watch = RssWatch::start(pid);
    let (_c, mut u, _) = server.session();
    u.set_write_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut sent = 0u64;
    let mut batch = Vec::with_capacity(1024 * 32);
    let flood_start = Instant::now();
    'flood: while sent < 1_000_000 && flood_start.elapsed() < Duration::from_secs(20) {
        batch.clear();
        for k in 0..1024u64 {
            let first = ((sent + k) * 64) % pages;
            batch.extend_from_slice(&request(first, 64, 1));
        }
        let mut at = 0;
        while at < batch.len() {
            match u.write(&batch[at..]) {
                Ok(n) => at += n,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    sent += (at / 32) as u64;
                    break 'flood;
                }
                Err(e) => panic!("flood write: {e}"),
            }
        }
        sent += 1024;
    }
    let stopped_taking = flood_start.elapsed();
    std::thread::sleep(Duration::from_millis(300));
    let (anon1, rss1) = watch.max();
    println!(
        "flood without reading: {sent} requests written in {stopped_taking:?} before the server stopped taking them; max RssAnon {anon1} KiB (+{} KiB), max VmRSS {rss1} KiB (+{} KiB)",
        anon1.saturating_sub(base_anon),
        rss1.saturating_sub(base_rss)
    );
    assert!(sent >= 10_000, "only {sent} requests went out");
    assert!(
        anon1.saturating_sub(base_anon) < limit_kib,
        "the server buffered {} KiB for a client that reads nothing",
        anon1 - base_anon
    );
    // the flooder still holds its connection: a good pager restores everything meanwhile
    let mut good = good_pager(&server.addr, true);
    let b = good.memory().regions()[0].0 as usize;
    let mut rng = Rng(7);
    touch_pages(b, (0..2000).map(|_| rng.next() % pages));
    let r = complete_and_verify(&mut good, "the good pager during the flood");
    println!("good pager during the flood: {r}");
    drop(good);
    drop(u);
    drop(watch);

    // 2. pipelines a request for every page (2048 at a time: 8 MiB replies) and reads the
    // replies as fast as it can
    std::thread::sleep(Duration::from_millis(200));
    let base_anon2 = status_kib(pid, "RssAnon");
    let base_rss2 = status_kib(pid, "VmRSS");
    let watch = RssWatch::start(pid);
    let (_c, u, _) = server.session();
    let reader = u.try_clone().unwrap();
    let n_req = (pages / 2048) as usize;
    let rd = std::thread::spawn(move || drain_replies(reader, n_req));
    let mut w = u;
    let pipe_start = Instant::now();
    for k in 0..n_req as u64 {
        w.write_all(&request(k * 2048, 2048, 1)).unwrap();
    }
    let bytes = rd.join().expect("reader");
    let took = pipe_start.elapsed();
    let (anon2, rss2) = watch.max();
    drop(watch);
    println!(
        "pipelined flood: {n_req} requests, {} MiB of replies in {took:?}; max RssAnon {anon2} KiB (+{} KiB), max VmRSS {rss2} KiB (+{} KiB, the image's page cache included)",
        bytes >> 20,
        anon2.saturating_sub(base_anon2),
        rss2.saturating_sub(base_rss2)
    );
    assert!(bytes > (pages * PS as u64) / 2, "{bytes} bytes of replies");
    assert!(
        anon2.saturating_sub(base_anon2) < limit_kib,
        "the server's memory grew by {} KiB while one client pipelined requests for {} MiB",
        anon2 - base_anon2,
        bytes >> 20
    );
    assert!(server.child.try_wait().unwrap().is_none());
    println!("took {:?}", t0.elapsed());
}

// ------------------------------------------------------------------------------------------
// B: a hostile page-server against the pager
// ------------------------------------------------------------------------------------------

/// What the fake page-server does wrong, in the sessions it misbehaves in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Evil {
    /// Urgent: answers the first request with a page beyond the layout.
    UrgentOutOfLayout,
    /// Urgent: answers the first request with another page (garbage bytes) than was asked.
    UrgentUnrequested,
    /// Urgent: the reply's header announces 4 GiB.
    UrgentOversized,
    /// Urgent: the reply's length disagrees with its page count.
    UrgentLyingLength,
    /// Urgent: half a reply, then the connection closes.
    UrgentTruncated,
    /// Urgent: half a reply, then silence (socket open).
    UrgentStall,
    /// Bulk: a frame of garbage pages that runs past the end of the layout.
    BulkOutOfLayout,
    /// Bulk: a header announcing 4 GiB.
    BulkOversized,
    /// Bulk: a Pages frame whose length disagrees with its page count.
    BulkLyingLength,
    /// Bulk: half a frame, then the connection closes.
    BulkTruncated,
    /// Bulk: half a header, then silence.
    BulkStall,
    /// Control: half a Welcome, then silence.
    HandshakeStall,
}

/// A page-server written here: the real handshake (Hello → Welcome with a valid layout), then
/// the pattern's pages — except that sessions up to `evil_sessions` misbehave as `evil`.
/// Stops every thread and closes every socket on drop.
struct FakeServer {
    addr: String,
    stop: Arc<AtomicBool>,
    socks: Arc<Mutex<Vec<TcpStream>>>,
    threads: Arc<Mutex<Vec<JoinHandle<()>>>>,
    accept: Option<JoinHandle<()>>,
}

#[derive(Clone)]
struct Fake {
    pages: u64,
    evil: Evil,
    evil_sessions: u64,
    next_session: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl Drop for FakeServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        // no new connection after this; then every blocked read or write ends
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
        for s in self.socks.lock().unwrap().drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
        let threads: Vec<_> = self.threads.lock().unwrap().drain(..).collect();
        for t in threads {
            let _ = t.join();
        }
    }
}

impl FakeServer {
    fn start(pages: u64, evil: Evil, evil_sessions: u64) -> FakeServer {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.set_nonblocking(true).unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let stop = Arc::new(AtomicBool::new(false));
        let socks = Arc::new(Mutex::new(Vec::new()));
        let threads = Arc::new(Mutex::new(Vec::new()));
        let fake = Fake {
            pages,
            evil,
            evil_sessions,
            next_session: Arc::new(AtomicU64::new(1)),
            stop: stop.clone(),
        };
        let (st, so, th) = (stop.clone(), socks.clone(), threads.clone());
        let accept = std::thread::spawn(move || {
            while !st.load(Ordering::Acquire) {
                match l.accept() {
                    Ok((s, _)) => {
                        s.set_nonblocking(false).unwrap();
                        let _ = s.set_nodelay(true);
                        so.lock().unwrap().push(s.try_clone().unwrap());
                        let f = fake.clone();
                        th.lock()
                            .unwrap()
                            .push(std::thread::spawn(move || f.serve(s)));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        FakeServer {
            addr,
            stop,
            socks,
            threads,
            accept: Some(accept),
        }
    }

    fn addr(&self) -> Addr {
        self.addr.parse().unwrap()
    }
}

impl Fake {
    fn welcome(&self, session: u64) -> Vec<u8> {
        Message::Welcome(Welcome {
            version: PROTOCOL_VERSION,
            session,
            page_size: PS as u32,
            layout: Layout::single(self.pages * PS as u64),
        })
        .to_vec()
    }

    fn stall(&self) {
        while !self.stop.load(Ordering::Acquire) {
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn is(&self, session: u64, e: Evil) -> bool {
        self.evil == e && session <= self.evil_sessions
    }

    fn serve(&self, mut s: TcpStream) {
        let mut buf = Vec::new();
        let Ok(h) = read_frame(&mut s, &mut buf) else {
            return;
        };
        let Ok(Message::Hello(hello)) = Message::decode(&h, &buf, PS as u32) else {
            return;
        };
        match hello.channel {
            Channel::Control => {
                if self.evil == Evil::HandshakeStall {
                    let w = self.welcome(1);
                    let _ = s.write_all(&w[..w.len() / 2]);
                    return self.stall();
                }
                let id = self.next_session.fetch_add(1, Ordering::AcqRel);
                if s.write_all(&self.welcome(id)).is_err() {
                    return;
                }
                // Stream, Bitmap, Done: taken and ignored
                while read_frame(&mut s, &mut buf).is_ok() {}
            }
            Channel::Urgent => {
                let id = hello.session;
                if s.write_all(&self.welcome(id)).is_err() {
                    return;
                }
                let mut first_reply = true;
                while let Ok(h) = read_frame(&mut s, &mut buf) {
                    let Ok(Message::Request(r)) = Message::decode(&h, &buf, PS as u32) else {
                        return;
                    };
                    let evil = first_reply && id <= self.evil_sessions;
                    first_reply = false;
                    let count = u64::from(r.count).min(self.pages - r.first.0) as u32;
                    let good = pages_frame(r.first.0, count, Origin::Fault, pattern_page);
                    let reply = if !evil {
                        good
                    } else {
                        match self.evil {
                            Evil::UrgentOutOfLayout => {
                                pages_frame(self.pages + 5, 1, Origin::Fault, garbage_page)
                            }
                            Evil::UrgentUnrequested => pages_frame(
                                (r.first.0 + 7) % self.pages,
                                1,
                                Origin::Fault,
                                garbage_page,
                            ),
                            Evil::UrgentOversized => header(Kind::Pages, u32::MAX).to_vec(),
                            Evil::UrgentLyingLength => {
                                let mut f = pages_frame(r.first.0, 1, Origin::Fault, garbage_page);
                                let len = (f.len() - HEADER_LEN + PS) as u32;
                                f[8..12].copy_from_slice(&len.to_le_bytes());
                                f.extend_from_slice(&vec![0xEE; PS]);
                                f
                            }
                            Evil::UrgentTruncated => {
                                let _ = s.write_all(&good[..good.len() / 2]);
                                let _ = s.shutdown(Shutdown::Both);
                                return;
                            }
                            Evil::UrgentStall => {
                                let _ = s.write_all(&good[..good.len() / 2]);
                                return self.stall();
                            }
                            _ => good,
                        }
                    };
                    if s.write_all(&reply).is_err() {
                        return;
                    }
                }
            }
            Channel::Bulk => {
                let id = hello.session;
                if s.write_all(&self.welcome(id)).is_err() {
                    return;
                }
                let evil: Option<Vec<u8>> = if self.is(id, Evil::BulkOutOfLayout) {
                    Some(pages_frame(self.pages - 2, 4, Origin::Stream, garbage_page))
                } else if self.is(id, Evil::BulkOversized) {
                    Some(header(Kind::Pages, u32::MAX).to_vec())
                } else if self.is(id, Evil::BulkLyingLength) {
                    let mut f = pages_frame(0, 1, Origin::Stream, garbage_page);
                    let len = (f.len() - HEADER_LEN + PS) as u32;
                    f[8..12].copy_from_slice(&len.to_le_bytes());
                    f.extend_from_slice(&vec![0xEE; PS]);
                    Some(f)
                } else if self.is(id, Evil::BulkTruncated) {
                    let f = pages_frame(0, 4, Origin::Stream, garbage_page);
                    let _ = s.write_all(&f[..f.len() / 2]);
                    let _ = s.shutdown(Shutdown::Both);
                    return;
                } else if self.is(id, Evil::BulkStall) {
                    let f = pages_frame(0, 4, Origin::Stream, pattern_page);
                    let _ = s.write_all(&f[..HEADER_LEN / 2]);
                    return self.stall();
                } else {
                    None
                };
                if let Some(f) = evil {
                    let _ = s.write_all(&f);
                    return self.stall();
                }
                let mut first = 0;
                while first < self.pages {
                    let n = (self.pages - first).min(256) as u32;
                    if s.write_all(&pages_frame(first, n, Origin::Stream, pattern_page))
                        .is_err()
                    {
                        return;
                    }
                    first += u64::from(n);
                }
                self.stall();
            }
        }
    }
}

fn fake_cfg(stream: bool) -> PagerConfig {
    PagerConfig {
        stream,
        bulk_connections: 1,
        reconnect_timeout: Duration::from_secs(2),
        connect_timeout: Duration::from_secs(1),
        ..Default::default()
    }
}

fn base(p: &Pager) -> usize {
    p.memory().regions()[0].0 as usize
}

/// Events until `want` matches one (or `within` passes); returns them all.
fn events_until(
    rx: &Receiver<PagerEvent>,
    within: Duration,
    want: impl Fn(&PagerEvent) -> bool,
) -> Vec<PagerEvent> {
    let deadline = Instant::now() + within;
    let mut v = Vec::new();
    while let Ok(e) = rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
        let done = want(&e);
        v.push(e);
        if done {
            break;
        }
    }
    v
}

/// A page beyond the layout, on the urgent connection (a fault's reply) and on the stream (a
/// frame running past the end): the pager fails for good with an error naming the page, and
/// installs nothing of the frame; the fault never returns with data.
#[test]
fn pager_refuses_pages_outside_the_layout() {
    if !uffd_or_skip("pager_refuses_pages_outside_the_layout") {
        return;
    }
    let pages = 256u64;
    // the fault's reply names page 261 of 256
    let fake = FakeServer::start(pages, Evil::UrgentOutOfLayout, u64::MAX);
    let mut p = Pager::connect(&fake.addr(), fake_cfg(false)).expect("connect");
    let t = Instant::now();
    let fault = kernel_read(base(&p) + 3 * PS);
    let e = match p.wait(Duration::from_secs(10)) {
        Some(Err(e)) => e,
        Some(Ok(_)) => panic!("completed from a source that lies"),
        None => panic!("no outcome within 10 s"),
    };
    println!(
        "urgent reply beyond the layout: failed after {:?}: {e}",
        t.elapsed()
    );
    // the reply answers no request: the session is dropped before any byte is installed, and
    // a source that does it on every reconnect is given up once the reconnect timeout passes
    let text = format!("{e}: {e:?}");
    assert!(
        matches!(e, PagerError::SourceLost { .. })
            && text.contains("pages 261+1 matches no request"),
        "{text}"
    );
    assert_eq!(p.present_pages(), 0, "something was installed");
    assert!(fault.try_recv().is_err(), "the fault returned");
    drop(p);
    assert_eq!(
        fault
            .recv_timeout(Duration::from_secs(5))
            .expect("fault thread"),
        None,
        "the fault got data"
    );
    drop(fake);

    // the stream sends garbage for pages 254..258 of 256
    let fake = FakeServer::start(pages, Evil::BulkOutOfLayout, u64::MAX);
    let mut p = Pager::connect(&fake.addr(), fake_cfg(true)).expect("connect");
    let t = Instant::now();
    let e = match p.wait(Duration::from_secs(10)) {
        Some(Err(e)) => e,
        Some(Ok(_)) => panic!("completed from a source that lies"),
        None => panic!("no outcome within 10 s"),
    };
    println!(
        "stream frame past the layout: failed after {:?}: {e}",
        t.elapsed()
    );
    let msg = e.to_string();
    assert!(
        matches!(e, PagerError::Protocol { .. })
            && msg.contains(&fake.addr)
            && msg.contains("pages 254+4, beyond the 256 pages of the layout"),
        "{msg}"
    );
    assert!(
        !p.is_present(pages - 2) && !p.is_present(pages - 1),
        "the in-range part of a frame that runs past the layout was installed"
    );
    assert_eq!(p.present_pages(), 0);
}

/// A fault's reply for a page that was not asked for (garbage bytes): the pager drops the
/// session as broken, and must not have put the unrequested bytes into memory; it reconnects
/// and completes with the source's pages.
#[test]
fn pager_never_installs_an_unrequested_fault_reply() {
    if !uffd_or_skip("pager_never_installs_an_unrequested_fault_reply") {
        return;
    }
    let pages = 256u64;
    let fake = FakeServer::start(pages, Evil::UrgentUnrequested, 1);
    let mut p = Pager::connect(&fake.addr(), fake_cfg(false)).expect("connect");
    let events = p.events().unwrap();
    let fault = kernel_read(base(&p) + 3 * PS);
    let ev = events_until(&events, Duration::from_secs(10), |e| {
        matches!(e, PagerEvent::Reconnected { .. })
    });
    println!("events: {ev:?}");
    let lost = ev
        .iter()
        .find_map(|e| match e {
            PagerEvent::SourceLost { cause } => Some(cause.clone()),
            _ => None,
        })
        .expect("SourceLost");
    assert!(lost.contains("matches no request"), "{lost}");
    assert_eq!(
        fault.recv_timeout(Duration::from_secs(10)).unwrap(),
        Some(pattern_word(3))
    );
    let garbage_installed = p.is_present(10) && {
        // SAFETY: page 10 is present.
        let w = unsafe { std::ptr::read_volatile((base(&p) + 10 * PS) as *const u64) };
        w == GARBAGE_WORD
    };
    assert!(
        !garbage_installed,
        "the bytes of page 10, which nobody asked for, were installed"
    );
    touch_pages(base(&p), 0..pages);
    complete_and_verify(&mut p, "after the reconnect");
}

/// Frames whose length lies (4 GiB announced; a length that disagrees with the page count) and
/// frames cut off by a close, on the stream and on the urgent connection: each breaks only that
/// session — the cause says what was wrong, nothing of the frame is installed — and the pager
/// reconnects and completes with every byte right.
#[test]
fn pager_drops_lying_and_truncated_frames_and_recovers() {
    if !uffd_or_skip("pager_drops_lying_and_truncated_frames_and_recovers") {
        return;
    }
    let pages = 256u64;
    let cases = [
        (
            Evil::BulkOversized,
            "bulk connection: bad frame: frame payload is 4294967295, over the cap",
        ),
        (
            Evil::BulkLyingLength,
            "bulk connection: bad Pages frame: pages: payload is 8209 bytes, fields describe 4113",
        ),
        (Evil::BulkTruncated, "bulk connection: closed by the source"),
        (
            Evil::UrgentOversized,
            "urgent connection: bad frame: frame payload is 4294967295, over the cap",
        ),
        (
            Evil::UrgentLyingLength,
            "bad reply: pages: payload is 8209 bytes, fields describe 4113",
        ),
        (
            Evil::UrgentTruncated,
            "urgent connection closed by the source",
        ),
    ];
    for (evil, want) in cases {
        let t = Instant::now();
        let fake = FakeServer::start(pages, evil, 1);
        let urgent = matches!(
            evil,
            Evil::UrgentOversized | Evil::UrgentLyingLength | Evil::UrgentTruncated
        );
        let mut p = Pager::connect(&fake.addr(), fake_cfg(!urgent)).expect("connect");
        let events = p.events().unwrap();
        let fault = urgent.then(|| kernel_read(base(&p) + 3 * PS));
        let ev = events_until(&events, Duration::from_secs(10), |e| {
            matches!(e, PagerEvent::Reconnected { .. })
        });
        let cause = ev
            .iter()
            .find_map(|e| match e {
                PagerEvent::SourceLost { cause } => Some(cause.clone()),
                _ => None,
            })
            .unwrap_or_else(|| panic!("{evil:?}: no SourceLost: {ev:?}"));
        println!("{evil:?}: source lost: {cause}");
        assert!(cause.contains(want), "{evil:?}: {cause:?} lacks {want:?}");
        assert!(
            ev.iter()
                .any(|e| matches!(e, PagerEvent::Reconnected { .. })),
            "{evil:?}: no reconnect: {ev:?}"
        );
        if let Some(f) = fault {
            assert_eq!(
                f.recv_timeout(Duration::from_secs(10)).unwrap(),
                Some(pattern_word(3)),
                "{evil:?}"
            );
            touch_pages(base(&p), 0..pages);
        }
        let r = complete_and_verify(&mut p, &format!("{evil:?}"));
        assert_eq!(r.reconnects, 1, "{evil:?}");
        println!("{evil:?}: recovered and complete after {:?}", t.elapsed());
    }
}

/// A source that stalls in the middle of its Welcome: connecting fails after the connect
/// timeout, with an error saying it was the Welcome that did not come.
#[test]
fn pager_gives_up_on_a_welcome_that_stalls() {
    if !uffd_or_skip("pager_gives_up_on_a_welcome_that_stalls") {
        return;
    }
    let fake = FakeServer::start(256, Evil::HandshakeStall, u64::MAX);
    let t = Instant::now();
    let r = Pager::connect(&fake.addr(), fake_cfg(true));
    let took = t.elapsed();
    let e = match r {
        Err(e) => e,
        Ok(_) => panic!("connected through half a Welcome"),
    };
    println!("half a Welcome: failed after {took:?}: {e}");
    assert!(matches!(e, PagerError::Protocol { .. }), "{e}");
    assert!(e.to_string().contains("reading Welcome"), "{e}");
    assert!(took < Duration::from_secs(4), "took {took:?}");
}

/// A source that stalls mid-frame (half a stream frame, or half a fault's reply) with its
/// connections open, so TCP sees nothing wrong: faults beside a stalled stream are still
/// served, the stall is noticed after the pager's `stall_timeout` (2 s here) with a cause that
/// says so, nothing of the half frame is installed, and the pager reconnects and completes.
/// A pager dropped while its source stalls stops at once.
#[test]
fn pager_notices_a_source_stalled_mid_frame() {
    if !uffd_or_skip("pager_notices_a_source_stalled_mid_frame") {
        return;
    }
    let pages = 256u64;
    let cfg = |stream| PagerConfig {
        stall_timeout: Duration::from_secs(2),
        ..fake_cfg(stream)
    };
    let bulk_fake = FakeServer::start(pages, Evil::BulkStall, 1);
    let urgent_fake = FakeServer::start(pages, Evil::UrgentStall, 1);
    let mut bulk_p = Pager::connect(&bulk_fake.addr(), cfg(true)).expect("connect");
    let mut urgent_p = Pager::connect(&urgent_fake.addr(), cfg(false)).expect("connect");
    let t = Instant::now();
    let (bulk_ev, urgent_ev) = (bulk_p.events().unwrap(), urgent_p.events().unwrap());
    // faults are still served beside a stalled stream
    let served = kernel_read(base(&bulk_p) + 9 * PS);
    assert_eq!(
        served.recv_timeout(Duration::from_secs(5)).unwrap(),
        Some(pattern_word(9)),
        "a fault beside the stalled stream was not served"
    );
    let stuck = kernel_read(base(&urgent_p) + 3 * PS);
    for (what, ev, p) in [
        ("stream", &bulk_ev, &mut bulk_p),
        ("fault reply", &urgent_ev, &mut urgent_p),
    ] {
        let ev = events_until(ev, Duration::from_secs(8), |e| {
            matches!(e, PagerEvent::Reconnected { .. })
        });
        let cause = ev.iter().find_map(|e| match e {
            PagerEvent::SourceLost { cause } => Some(cause.clone()),
            _ => None,
        });
        println!("{what} stalled mid-frame: after {:?}: {ev:?}", t.elapsed());
        let cause = cause.unwrap_or_else(|| {
            panic!(
                "{what}: a source stalled mid-frame went unnoticed for {:?} ({} of {} pages)",
                t.elapsed(),
                p.present_pages(),
                p.total_pages()
            )
        });
        assert!(cause.contains("stalls mid-frame"), "{what}: {cause}");
        assert!(
            ev.iter()
                .any(|e| matches!(e, PagerEvent::Reconnected { .. })),
            "{what}: {ev:?}"
        );
    }
    assert_eq!(
        stuck.recv_timeout(Duration::from_secs(5)).unwrap(),
        Some(pattern_word(3)),
        "the fault whose reply stalled was not served after the reconnect"
    );
    touch_pages(base(&urgent_p), 0..pages);
    for (what, p) in [("stream", &mut bulk_p), ("fault reply", &mut urgent_p)] {
        let r = complete_and_verify(p, what);
        assert_eq!(r.reconnects, 1, "{what}");
    }
    println!("both recovered and complete after {:?}", t.elapsed());

    // dropped while its source stalls for good: it stops at once, the waiting fault gets no data
    let fake = FakeServer::start(pages, Evil::UrgentStall, u64::MAX);
    let p = Pager::connect(&fake.addr(), cfg(false)).expect("connect");
    let stuck = kernel_read(base(&p) + 3 * PS);
    std::thread::sleep(Duration::from_millis(500));
    assert!(stuck.try_recv().is_err(), "the stalled fault returned");
    let t = Instant::now();
    drop(p);
    println!("pager dropped during a stall in {:?}", t.elapsed());
    assert!(t.elapsed() < Duration::from_secs(5), "drop hung");
    assert_eq!(
        stuck
            .recv_timeout(Duration::from_secs(5))
            .expect("fault thread"),
        None,
        "the fault on the stalled reply got data"
    );
}

// ------------------------------------------------------------------------------------------
// C: hostile sources against `vmm --incoming`
// ------------------------------------------------------------------------------------------

/// The pid of the process whose command line names `sock` (a vmm's control socket).
fn pid_of(sock: &Path) -> Option<u32> {
    let want = sock.to_str()?;
    std::fs::read_dir("/proc").ok()?.find_map(|e| {
        let e = e.ok()?;
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let cmd = std::fs::read(e.path().join("cmdline")).ok()?;
        String::from_utf8_lossy(&cmd)
            .split('\0')
            .any(|a| a == want)
            .then_some(pid)
    })
}

/// Waits until the destination has seen `n` attempts; returns its status.
fn attempts(dest: &VmmProc, n: u64, within: Duration) -> Value {
    let deadline = Instant::now() + within;
    loop {
        let st = dest.ctl(&["status"]);
        if st["attempts"].as_u64().unwrap_or(0) >= n {
            return st;
        }
        assert!(
            Instant::now() < deadline,
            "attempt {n} not seen: {st}; {}",
            dest.stderr_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The destination's log line about attempt failures containing `part`.
fn failure_logged(dest: &VmmProc, part: &str) -> String {
    let log = dest.stderr_text();
    log.lines()
        .find(|l| l.contains("failed:") && l.contains(part))
        .unwrap_or_else(|| panic!("no failure logged with {part:?}:\n{log}"))
        .to_owned()
}

/// Garbage, a 4 GiB frame header, a frame cut short by a close, and a frame that announces 8 MiB
/// and then trickles a byte a second: each is refused with the reason in the destination's log
/// and `status` (`last_error`), without allocating what the header announces, and the
/// destination keeps listening — the trickler is cut off by the offer timeout, however slowly it
/// sends — and then takes a real migration from a running VM that was waiting behind it.
#[test]
fn incoming_refuses_garbage_lies_and_stalls_then_takes_a_real_source() {
    if !gates("incoming_refuses_garbage_lies_and_stalls_then_takes_a_real_source") {
        return;
    }
    let t0 = Instant::now();
    let mut src = boot_guest(1, "64M");
    let (dest, addr) = start_dest(None, "127.0.0.1", &[]);
    let pid = pid_of(&dest.sock).expect("destination pid");

    // C1. garbage: the destination hangs up
    let mut s = TcpStream::connect(&addr).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: vmm\r\n\r\n").unwrap();
    let (_, closed) = error_then_close(&mut s, Duration::from_secs(5));
    assert!(closed, "the destination kept a garbage peer");
    let st = attempts(&dest, 1, Duration::from_secs(5));
    let e = st["last_error"].as_str().unwrap_or("");
    println!("garbage: {e}");
    assert!(e.contains("bad magic"), "{st}");
    failure_logged(&dest, "bad magic");

    // C2. a header announcing 4 GiB
    let mut s = TcpStream::connect(&addr).unwrap();
    s.write_all(&header(Kind::State, u32::MAX)).unwrap();
    let (_, closed) = error_then_close(&mut s, Duration::from_secs(5));
    assert!(closed);
    let st = attempts(&dest, 2, Duration::from_secs(5));
    let e = st["last_error"].as_str().unwrap_or("");
    println!("4 GiB header: {e}");
    assert!(
        e.contains("4294967295") && e.contains("over the cap"),
        "{st}"
    );

    // C2. a header announcing 1 MiB, 1000 bytes, then the peer closes
    let mut s = TcpStream::connect(&addr).unwrap();
    s.write_all(&header(Kind::State, 1 << 20)).unwrap();
    s.write_all(&[7u8; 1000]).unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    let (_, closed) = error_then_close(&mut s, Duration::from_secs(5));
    assert!(closed);
    let st = attempts(&dest, 3, Duration::from_secs(5));
    let e = st["last_error"].as_str().unwrap_or("");
    println!("cut short: {e}");
    assert!(
        e.contains("mid-frame") && e.contains("1000 of 1048576"),
        "{st}"
    );

    // C2 + C3. a header announcing the largest frame, then a byte a second: the destination
    // must neither allocate 8 MiB for it nor wait for it past the offer timeout
    let rss_before = status_kib(pid, "VmRSS");
    let anon_before = status_kib(pid, "RssAnon");
    let stop = Arc::new(AtomicBool::new(false));
    let st2 = stop.clone();
    let a2 = addr.clone();
    let dripper = std::thread::spawn(move || -> Option<Duration> {
        let mut s = TcpStream::connect(&a2).unwrap();
        let t = Instant::now();
        s.write_all(&header(Kind::State, MAX_PAYLOAD_BYTES))
            .unwrap();
        s.write_all(&[1u8; 4]).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(900)))
            .unwrap();
        while !st2.load(Ordering::Acquire) && t.elapsed() < Duration::from_secs(40) {
            let mut b = [0u8; 16];
            match s.read(&mut b) {
                Ok(0) => return Some(t.elapsed()),
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(_) => return Some(t.elapsed()),
            }
            if s.write_all(&[1u8]).is_err() {
                return Some(t.elapsed());
            }
        }
        None
    });
    std::thread::sleep(Duration::from_millis(1500));
    let rss_during = status_kib(pid, "VmRSS");
    let anon_during = status_kib(pid, "RssAnon");
    println!(
        "destination while a peer trickles an 8 MiB frame: VmRSS {rss_before} -> {rss_during} KiB, RssAnon {anon_before} -> {anon_during} KiB"
    );
    // a real source connects behind the trickler
    let src_sock = src.sock.clone();
    let to = addr.clone();
    let real = std::thread::spawn(move || {
        let t = Instant::now();
        let r = ctl_raw(&src_sock, &["migrate", "--to", &to]);
        (r, t.elapsed())
    });
    let dropped_after = dripper.join().unwrap();
    stop.store(true, Ordering::Release);
    println!("the trickling peer was dropped after {dropped_after:?}");
    let (r, took) = real.join().unwrap();
    println!("the real migration behind it took {took:?}");
    check_report(&r, 64 << 20);
    source_exits(&mut src);
    check_continues(&dest, &last_heartbeat(&src), 1);
    let line = failure_logged(&dest, "within");
    println!("destination log: {line}");
    assert!(
        anon_during.saturating_sub(anon_before) < 4 << 10,
        "the destination allocated {} KiB for a frame that never came",
        anon_during - anon_before
    );
    let dropped_after = dropped_after.expect("the trickling peer was never dropped");
    assert!(
        dropped_after < Duration::from_secs(15),
        "the trickling peer held the destination for {dropped_after:?}"
    );
    dest.ctl(&["shutdown"]);
    println!("took {:?}", t0.elapsed());
}

/// How the man in the middle spoils the State message.
#[derive(Debug, Clone, Copy)]
enum Spoil {
    /// One byte of the state envelope flipped (the message itself re-framed correctly).
    FlipByte,
    /// The state envelope cut to half (the message re-framed correctly).
    HalfEnvelope,
    /// The State frame cut in half on the wire, then the connection closed.
    CutFrame,
}

/// A hostile source: relays a real source's migration to the destination — the Offer, Accept,
/// the clock probes — then spoils the State. Returns the destination's answer to it.
fn relay_and_spoil(l: TcpListener, dest: String, spoil: Spoil) -> Option<vmm::migration::Wire> {
    use vmm::migration::{decode, encode, Wire};
    let (mut src, _) = l.accept().unwrap();
    let mut dst = TcpStream::connect(&dest).unwrap();
    for s in [&src, &dst] {
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    }
    let mut buf = Vec::new();
    let frame = |s: &mut TcpStream, buf: &mut Vec<u8>| -> Option<(Vec<u8>, Wire)> {
        let h = read_frame(s, buf).ok()?;
        let mut f = h.encode().to_vec();
        f.extend_from_slice(buf);
        let w = decode(&f).ok()?;
        Some((f, w))
    };
    loop {
        let (bytes, w) = frame(&mut src, &mut buf)?;
        let (mut envelope, paused_at, dirty, precopy_pages) = match w {
            Wire::State {
                envelope,
                paused_at,
                dirty,
                precopy_pages,
            } => (envelope, paused_at, dirty, precopy_pages),
            w => {
                dst.write_all(&bytes).unwrap();
                if matches!(w, Wire::Offer(_) | Wire::Ping { .. }) {
                    let (reply, _) = frame(&mut dst, &mut buf)?;
                    src.write_all(&reply).unwrap();
                }
                continue;
            }
        };
        match spoil {
            Spoil::FlipByte => {
                let i = envelope.len() / 2;
                envelope[i] ^= 0x5a;
            }
            Spoil::HalfEnvelope => envelope.truncate(envelope.len() / 2),
            Spoil::CutFrame => {
                dst.write_all(&bytes[..bytes.len() / 2]).unwrap();
                dst.shutdown(Shutdown::Write).unwrap();
                let mut rest = Vec::new();
                let _ = dst.read_to_end(&mut rest);
                // nothing can come back; the source must hear that the VM does not run there
                let failed = Wire::Failed {
                    reason: "the relay cut the state in half".into(),
                };
                src.write_all(&encode(&failed).unwrap()).unwrap();
                return (!rest.is_empty()).then(|| decode(&rest).ok()).flatten();
            }
        }
        let spoiled = Wire::State {
            envelope,
            paused_at,
            dirty,
            precopy_pages,
        };
        dst.write_all(&encode(&spoiled).unwrap()).unwrap();
        let (reply, w) = frame(&mut dst, &mut buf)?;
        src.write_all(&reply).unwrap();
        return Some(w);
    }
}

/// A well-formed Offer (a real source's, relayed) followed by a State that is corrupt, short,
/// or cut off on the wire: the destination refuses it before any vCPU runs (with `Failed` and
/// the reason where the link still works), the source resumes its VM each time, the destination
/// keeps listening, and a real migration afterwards succeeds.
#[test]
fn incoming_refuses_a_spoiled_state_then_takes_a_real_source() {
    if !gates("incoming_refuses_a_spoiled_state_then_takes_a_real_source") {
        return;
    }
    let t0 = Instant::now();
    let mut src = boot_guest(1, "64M");
    let (dest, addr) = start_dest(None, "127.0.0.1", &[]);
    let cases = [
        (Spoil::FlipByte, "CRC mismatch"),
        (Spoil::HalfEnvelope, "truncated"),
        (Spoil::CutFrame, "mid-frame"),
    ];
    for (n, (spoil, want)) in cases.into_iter().enumerate() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let relay_addr = l.local_addr().unwrap().to_string();
        let d = addr.clone();
        let relay = std::thread::spawn(move || relay_and_spoil(l, d, spoil));
        let r = migrate(&src, &relay_addr, &[]);
        let answer = relay.join().expect("relay");
        println!("{spoil:?}: the destination answered {answer:?}; the source: {r}");
        assert_eq!(r["ok"], Value::Bool(false), "{spoil:?}: {r}");
        let st = attempts(&dest, n as u64 + 1, Duration::from_secs(10));
        assert_eq!(st["state"], "incoming", "{spoil:?}: {st}");
        let e = st["last_error"].as_str().unwrap_or("");
        println!("{spoil:?}: destination last_error: {e}");
        assert!(e.contains(want), "{spoil:?}: {st}");
        match spoil {
            Spoil::CutFrame => assert!(answer.is_none(), "{answer:?}"),
            _ => {
                let Some(vmm::migration::Wire::Failed { reason }) = answer else {
                    panic!("{spoil:?}: the destination did not say Failed: {answer:?}");
                };
                assert!(reason.contains(want), "{reason}");
                let msg = r["error"]["message"].as_str().unwrap_or("");
                assert!(
                    msg.contains("destination failed before resuming") && msg.contains(want),
                    "{msg}"
                );
            }
        }
        still_running(&src);
    }
    let r = migrate(&src, &addr, &[]);
    check_report(&r, 64 << 20);
    source_exits(&mut src);
    check_continues(&dest, &last_heartbeat(&src), 1);
    let log = dest.stderr_text();
    assert!(!log.contains("panicked"), "{log}");
    dest.ctl(&["shutdown"]);
    println!("took {:?}", t0.elapsed());
}
