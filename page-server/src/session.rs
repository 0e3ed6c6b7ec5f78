//! One client's session: which pages it was sent (each page goes out at most once, except a
//! page a fault asks for again), where the background stream's cursor is, and whether the
//! stream runs. Shared by the event loop (control + urgent) and the bulk threads.

use std::net::Shutdown;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};

use proto::bitmap::AtomicBitmap;
use proto::{encode_pages_prefix, mask_len, Origin, PageIndex, MAX_PAGES_PER_FRAME};

use crate::memory::{is_zero_page, PageMap};
use crate::sock::Sock;

#[derive(Debug, Default)]
struct Flow {
    stream: bool,
    closed: bool,
}

#[derive(Debug, Default)]
struct Cursor {
    next: u64,
    /// Where the last fault was: the stream continues from here next.
    hint: Option<u64>,
}

/// Counters of one session (pages and bytes by origin).
#[derive(Debug, Default)]
pub struct SessionStats {
    /// Pages sent because a fault asked for them.
    pub fault_pages: AtomicU64,
    /// Pages sent as prefetch around a fault.
    pub prefetch_pages: AtomicU64,
    /// Pages sent by the background stream.
    pub stream_pages: AtomicU64,
    /// Of those, zero pages (no payload).
    pub zero_pages: AtomicU64,
    /// Page bytes put on the wire.
    pub data_bytes: AtomicU64,
}

/// Server-side state of one client.
#[derive(Debug)]
pub struct Session {
    /// Session id (given to the client in `Welcome`).
    pub id: u64,
    total_pages: u64,
    sent: AtomicBitmap,
    sent_count: AtomicU64,
    cursor: Mutex<Cursor>,
    flow: Mutex<Flow>,
    cv: Condvar,
    bulk_socks: Mutex<Vec<Sock>>,
    /// Counters.
    pub stats: SessionStats,
}

impl Session {
    pub(crate) fn new(id: u64, total_pages: u64) -> Self {
        Session {
            id,
            total_pages,
            sent: AtomicBitmap::new(total_pages),
            sent_count: AtomicU64::new(0),
            cursor: Mutex::default(),
            flow: Mutex::default(),
            cv: Condvar::new(),
            bulk_socks: Mutex::default(),
            stats: SessionStats::default(),
        }
    }

    fn mark_sent(&self, first: u64, count: u64) {
        let n = self.sent.set_range(first, count);
        self.sent_count.fetch_add(n, Ordering::AcqRel);
    }

    /// The client already has these pages (a `Received` bitmap after a reconnect).
    pub(crate) fn merge_received(&self, first: u64, bits: &[u8], count: u64) {
        let n = self.sent.merge_bytes(first, bits, count);
        self.sent_count.fetch_add(n, Ordering::AcqRel);
    }

    /// Starts or stops the stream.
    pub(crate) fn set_stream(&self, on: bool) {
        self.flow.lock().unwrap_or_else(|e| e.into_inner()).stream = on;
        self.cv.notify_all();
    }

    /// Ends the session: bulk threads stop, their sockets are shut down.
    pub(crate) fn close(&self) {
        self.flow.lock().unwrap_or_else(|e| e.into_inner()).closed = true;
        self.cv.notify_all();
        for s in self
            .bulk_socks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            let _ = s.shutdown(Shutdown::Both);
        }
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.flow.lock().unwrap_or_else(|e| e.into_inner()).closed
    }

    pub(crate) fn add_bulk_sock(&self, s: Sock) {
        self.bulk_socks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(s);
    }

    /// Blocks until the stream is enabled (true) or the session closed (false).
    pub(crate) fn wait_stream(&self) -> bool {
        let mut f = self.flow.lock().unwrap_or_else(|e| e.into_inner());
        while !f.stream && !f.closed {
            f = self.cv.wait(f).unwrap_or_else(|e| e.into_inner());
        }
        !f.closed
    }

    /// Blocks until the session is closed.
    pub(crate) fn wait_closed(&self) {
        let mut f = self.flow.lock().unwrap_or_else(|e| e.into_inner());
        while !f.closed {
            f = self.cv.wait(f).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Claims up to `max_pages` not-yet-sent pages for the stream, from the cursor (or from just
    /// after the latest fault), wrapping once. Returns runs `(first, count)`; empty when every
    /// page has been sent.
    pub(crate) fn claim_stream(&self, max_pages: u32) -> Vec<(u64, u32)> {
        let mut runs: Vec<(u64, u32)> = Vec::new();
        if self.sent_count.load(Ordering::Acquire) >= self.total_pages {
            return runs;
        }
        let mut cur = self.cursor.lock().unwrap_or_else(|e| e.into_inner());
        let start = cur.hint.take().unwrap_or(cur.next).min(self.total_pages);
        let mut pos = start;
        let mut wrapped = false;
        let mut claimed = 0u32;
        while claimed < max_pages {
            let next = if wrapped && pos >= start {
                None
            } else {
                self.sent.next_clear(pos).filter(|&c| !wrapped || c < start)
            };
            let Some(c) = next else {
                if wrapped {
                    break;
                }
                wrapped = true;
                pos = 0;
                continue;
            };
            // stay contiguous within one chunk: stop at a gap once something is claimed
            if let Some(&(f, n)) = runs.last() {
                if c != f + u64::from(n) {
                    break;
                }
            }
            let want = u64::from(max_pages - claimed).min(64 - c % 64);
            let (base, m) = self.sent.claim_word(c, want);
            pos = c + want;
            if m == 0 {
                continue;
            }
            let mut bits = m;
            while bits != 0 {
                let lo = u64::from(bits.trailing_zeros());
                let len = u64::from((bits >> lo).trailing_ones());
                let first = base + lo;
                match runs.last_mut() {
                    Some((f, n)) if *f + u64::from(*n) == first => *n += len as u32,
                    _ => runs.push((first, len as u32)),
                }
                claimed += len as u32;
                bits &= !(if lo + len >= 64 {
                    u64::MAX
                } else {
                    ((1u64 << len) - 1) << lo
                });
            }
        }
        self.sent_count
            .fetch_add(u64::from(claimed), Ordering::AcqRel);
        cur.next = pos;
        runs
    }

    /// Handles a fault request: the fault pages are always sent (the client is waiting on them);
    /// prefetch pages after them only while not yet sent. Moves the stream cursor to follow.
    /// Returns the run to reply with.
    pub(crate) fn claim_request(&self, first: u64, count: u32, fault_pages: u32) -> (u64, u32) {
        let fault = u64::from(fault_pages.max(1).min(count));
        self.mark_sent(first, fault);
        let mut n = fault;
        while n < u64::from(count) {
            let p = first + n;
            if p >= self.total_pages || self.sent.set(p) {
                break;
            }
            self.sent_count.fetch_add(1, Ordering::AcqRel);
            n += 1;
        }
        self.cursor.lock().unwrap_or_else(|e| e.into_inner()).hint = Some(first + n);
        (first, n as u32)
    }
}

/// An encoded `Pages` frame that points into the memory instead of copying it: the header,
/// fixed part and zero mask, then the non-zero pages as slices (contiguous pages merged).
#[derive(Default)]
pub(crate) struct Frame<'m> {
    pub(crate) prefix: Vec<u8>,
    pub(crate) segs: Vec<&'m [u8]>,
}

impl Frame<'_> {
    /// Every byte of the frame, in order, as slices (for `writev`).
    pub(crate) fn parts(&self) -> Vec<&[u8]> {
        std::iter::once(&self.prefix[..])
            .chain(self.segs.iter().copied())
            .collect()
    }
}

/// Builds into `frame` a `Pages` frame for up to `count` pages from `first` (clipped to the end
/// of the region and to [`MAX_PAGES_PER_FRAME`]). Returns the pages
/// covered (0 if `first` is out of range). In the counters, a `Fault` frame's first
/// `fault_pages` pages are fault pages and the rest prefetch.
pub(crate) fn build_frame<'m>(
    map: &'m PageMap,
    first: u64,
    count: u32,
    origin: Origin,
    fault_pages: u32,
    frame: &mut Frame<'m>,
    stats: &SessionStats,
) -> u32 {
    let Frame { prefix, segs } = frame;
    prefix.clear();
    segs.clear();
    let Some(bytes) = map.run(PageIndex(first), count.min(MAX_PAGES_PER_FRAME)) else {
        return 0;
    };
    let ps = map.page_size() as usize;
    let n = (bytes.len() / ps) as u32;
    let mut mask = vec![0u8; mask_len(n)];
    let mut data_len = 0;
    let mut seg_start: Option<usize> = None;
    let mut zeros = 0u64;
    for i in 0..n as usize {
        let page = &bytes[i * ps..(i + 1) * ps];
        if is_zero_page(page) {
            mask[i / 8] |= 1 << (i % 8);
            zeros += 1;
            if let Some(s) = seg_start.take() {
                segs.push(&bytes[s * ps..i * ps]);
            }
        } else {
            data_len += ps;
            seg_start.get_or_insert(i);
        }
    }
    if let Some(s) = seg_start {
        segs.push(&bytes[s * ps..n as usize * ps]);
    }
    encode_pages_prefix(PageIndex(first), n, origin, &mask, data_len, prefix);
    let (lead, rest) = match origin {
        Origin::Fault => (&stats.fault_pages, &stats.prefetch_pages),
        Origin::Prefetch => (&stats.prefetch_pages, &stats.prefetch_pages),
        Origin::Stream => (&stats.stream_pages, &stats.stream_pages),
    };
    let led = fault_pages.min(n);
    lead.fetch_add(u64::from(led), Ordering::Relaxed);
    rest.fetch_add(u64::from(n - led), Ordering::Relaxed);
    stats.zero_pages.fetch_add(zeros, Ordering::Relaxed);
    stats
        .data_bytes
        .fetch_add(data_len as u64, Ordering::Relaxed);
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_claims_every_page_once_and_follows_faults() {
        let s = Session::new(1, 1000);
        let (f, n) = s.claim_request(500, 4, 1);
        assert_eq!((f, n), (500, 4));
        // the stream continues right after the fault
        let runs = s.claim_stream(10);
        assert_eq!(runs, vec![(504, 10)]);
        let mut seen = vec![false; 1000];
        seen[500..514].fill(true);
        loop {
            let runs = s.claim_stream(100);
            if runs.is_empty() {
                break;
            }
            for (f, n) in runs {
                for p in f..f + u64::from(n) {
                    assert!(!seen[p as usize], "page {p} sent twice");
                    seen[p as usize] = true;
                }
            }
        }
        assert!(seen.iter().all(|&x| x));
        // a fault on an already-streamed page is still answered, prefetch is not
        assert_eq!(s.claim_request(10, 8, 1), (10, 1));
    }
}
