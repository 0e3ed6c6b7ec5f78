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

mod vs_incoming;
mod vs_pager;
mod vs_server;

pub(super) use std::io::{BufReader, Read, Write};
pub(super) use std::net::{Shutdown, TcpListener, TcpStream};
pub(super) use std::path::{Path, PathBuf};
pub(super) use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
pub(super) use std::sync::mpsc::Receiver;
pub(super) use std::sync::{Arc, Mutex};
pub(super) use std::thread::JoinHandle;
pub(super) use std::time::{Duration, Instant};

pub(super) use pager::{Addr, Pager, PagerConfig, PagerError, PagerEvent};
pub(super) use proto::{
    error_code, mask_len, read_frame, Channel, Header, Kind, Layout, Message, Origin, PageIndex,
    Welcome, HEADER_LEN, MAX_PAYLOAD_BYTES, PROTOCOL_VERSION,
};
pub(super) use vmm::api::replies::IncomingStatus;

pub(super) use crate::common::*;
pub(super) use crate::migration::{
    check_continues, check_report, gates, last_heartbeat, migrate, source_exits, start_dest,
    still_running,
};
pub(super) use crate::vm::{ctl_raw, VmmProc};

// ------------------------------------------------------------------------------------------
// Shared helpers
// ------------------------------------------------------------------------------------------

/// A frame header of `kind` announcing `len` payload bytes (whatever follows).
pub(crate) fn header(kind: Kind, len: u32) -> [u8; HEADER_LEN] {
    let mut h = Header {
        kind,
        payload_len: 0,
    }
    .encode();
    h[8..12].copy_from_slice(&len.to_le_bytes());
    h
}

/// A field of /proc/PID/status in KiB (VmRSS, RssAnon, ...).
pub(crate) fn status_kib(pid: u32, field: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Samples a process's RssAnon and VmRSS every few ms until dropped; keeps the maxima.
pub(crate) struct RssWatch {
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
pub(crate) fn error_then_close(
    s: &mut TcpStream,
    within: Duration,
) -> (Option<(u16, String)>, bool) {
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
pub(crate) fn refused(s: &mut TcpStream, what: &str) -> (u16, String) {
    let (err, closed) = error_then_close(s, Duration::from_secs(5));
    assert!(closed, "{what}: the server kept the connection open");
    err.unwrap_or_else(|| panic!("{what}: closed without an error frame"))
}

/// A kernel-mode read of the first word of the page at `addr` (write(2) from it into a pipe),
/// on a thread: faults like a vCPU's access would, and if the mapping goes away while the fault
/// waits it gets EFAULT (None) instead of killing the test with SIGSEGV.
pub(crate) fn kernel_read(addr: usize) -> Receiver<Option<u64>> {
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
pub(crate) fn pattern_word(i: u64) -> u64 {
    let mut p = vec![0u8; PS];
    pattern_page(i, &mut p);
    u64::from_le_bytes(p[..8].try_into().unwrap())
}

/// A `Pages` frame for `count` pages from `first` whose bytes come from `page(i, buf)`.
pub(crate) fn pages_frame(
    first: u64,
    count: u32,
    origin: Origin,
    page: impl Fn(u64, &mut [u8]),
) -> Vec<u8> {
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

pub(crate) fn garbage_page(_: u64, buf: &mut [u8]) {
    buf.fill(0xEE);
}

pub(crate) const GARBAGE_WORD: u64 = u64::from_le_bytes([0xEE; 8]);

pub(crate) fn good_pager(addr: &str, stream: bool) -> Pager {
    Pager::connect(
        &addr.parse().unwrap(),
        PagerConfig {
            stream,
            // the servers of these tests speak plaintext: they test the wire format
            security: transport::Security::Insecure,
            ..Default::default()
        },
    )
    .expect("good pager connects")
}

pub(crate) fn complete_and_verify(p: &mut Pager, what: &str) -> pager::Report {
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
