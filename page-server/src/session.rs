//! One client's session: which pages it was sent (each page goes out at most once: a fault on
//! a page already sent is answered "in flight"), where the background stream's cursor is, and
//! whether the stream runs. Shared by the event loop (control + urgent) and the bulk threads.
//! It counts what it sends, into its own counters and the server's totals; it does no I/O
//! except shutting down its bulk sockets on close.

use std::net::Shutdown;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use proto::bitmap::AtomicBitmap;
use proto::{encode_pages_prefix, mask_len, Origin, PageIndex, MAX_PAGES_PER_FRAME};

use crate::memory::PageMap;
use crate::stats::{Counters, Totals};
use proto::is_zero_page;
use transport::Sock;

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

/// What a fault request is answered with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Claim {
    /// Send `count` pages from `first` (the request's first page); they are now claimed.
    Send {
        /// First page.
        first: u64,
        /// Pages.
        count: u32,
    },
    /// The request's leading `count` pages from `first` were sent already (by the stream):
    /// reply `InFlight`, send nothing.
    InFlight {
        /// First page.
        first: u64,
        /// Pages.
        count: u32,
    },
}

/// Server-side state of one client.
#[derive(Debug)]
pub struct Session {
    /// Session id (given to the client in `Welcome`): random, so not guessable.
    pub id: u64,
    /// The identity the control connection authenticated with: only connections of the
    /// same identity may join (None: plaintext, anyone who knows the id).
    pub(crate) owner: Option<String>,
    total_pages: u64,
    sent: AtomicBitmap,
    sent_count: AtomicU64,
    cursor: Mutex<Cursor>,
    flow: Mutex<Flow>,
    cv: Condvar,
    bulk_socks: Mutex<Vec<Sock>>,
    /// What this session sent.
    pub stats: Counters,
    /// What every session of the server sent (this one included).
    totals: Arc<Totals>,
}

impl Session {
    /// A new session over `total_pages`, counted in `totals`.
    pub(crate) fn new(
        id: u64,
        owner: Option<String>,
        total_pages: u64,
        totals: Arc<Totals>,
    ) -> Self {
        totals.sessions_opened.fetch_add(1, Ordering::Relaxed);
        Session {
            id,
            owner,
            total_pages,
            sent: AtomicBitmap::new(total_pages),
            sent_count: AtomicU64::new(0),
            cursor: Mutex::default(),
            flow: Mutex::default(),
            cv: Condvar::new(),
            bulk_socks: Mutex::default(),
            stats: Counters::default(),
            totals,
        }
    }

    /// Counts `pages` pages sent for `origin` (of them `zeros` zero pages, `data_bytes` bytes
    /// on the wire); for `Fault`, the first `fault_pages` are fault pages and the rest prefetch.
    fn count_sent(
        &self,
        origin: Origin,
        fault_pages: u32,
        pages: u32,
        zeros: u64,
        data_bytes: u64,
    ) {
        for c in [&self.stats, &self.totals.sent] {
            let (lead, rest) = match origin {
                Origin::Fault => (&c.fault_pages, &c.prefetch_pages),
                Origin::Prefetch => (&c.prefetch_pages, &c.prefetch_pages),
                Origin::Stream | Origin::Precopy => (&c.stream_pages, &c.stream_pages),
            };
            if origin == Origin::Precopy {
                c.precopy_pages
                    .fetch_add(u64::from(pages), Ordering::Relaxed);
            }
            let led = fault_pages.min(pages);
            lead.fetch_add(u64::from(led), Ordering::Relaxed);
            rest.fetch_add(u64::from(pages - led), Ordering::Relaxed);
            c.zero_pages.fetch_add(zeros, Ordering::Relaxed);
            c.data_bytes.fetch_add(data_bytes, Ordering::Relaxed);
        }
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

    /// Bulk connections attached so far.
    pub(crate) fn bulk_count(&self) -> usize {
        self.bulk_socks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len()
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

    /// Pages not (or no longer) sent.
    pub(crate) fn unsent(&self) -> u64 {
        self.total_pages
            .saturating_sub(self.sent_count.load(Ordering::Acquire))
    }

    /// Pre-copy: the pages set in `bits` were modified since they were sent; the stream sends
    /// them again. Returns how many had been sent.
    pub(crate) fn unsend(&self, bits: &[u8]) -> u64 {
        let n = self.sent.clear_bytes(bits);
        self.sent_count.fetch_sub(n, Ordering::AcqRel);
        self.cv.notify_all();
        n
    }

    /// Pre-copy: waits (at most `t`) for pages to send again, or the session to close.
    pub(crate) fn wait_more(&self, t: std::time::Duration) {
        let f = self.flow.lock().unwrap_or_else(|e| e.into_inner());
        if f.closed || self.unsent() > 0 {
            return;
        }
        let _ = self.cv.wait_timeout(f, t);
    }

    /// Blocks until the session is closed.
    #[allow(dead_code)]
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

    /// Handles a fault request for `count` pages from `first`: claims the run of not-yet-sent
    /// pages from `first` (stopping at the first page already sent) and replies with it; if
    /// `first` itself was sent already — the stream has it on its way — nothing is sent again,
    /// the reply is `InFlight` for the leading already-sent pages. The stream's cursor moves
    /// to just after the reply, to follow the fault. `first..first + count` must be pages one
    /// frame can carry (in range, within one region).
    pub(crate) fn claim_request(&self, first: u64, count: u32) -> Claim {
        let count = u64::from(count.max(1)).min(self.total_pages.saturating_sub(first));
        let mut n = 0u64;
        while n < count && !self.sent.set(first + n) {
            n += 1;
        }
        let claim = if n > 0 {
            self.sent_count.fetch_add(n, Ordering::AcqRel);
            Claim::Send {
                first,
                count: n as u32,
            }
        } else {
            let mut k = 1u64;
            while k < count && self.sent.get(first + k) {
                k += 1;
            }
            for c in [&self.stats, &self.totals.sent] {
                c.in_flight_replies.fetch_add(1, Ordering::Relaxed);
            }
            Claim::InFlight {
                first,
                count: k as u32,
            }
        };
        let (Claim::Send { first, count } | Claim::InFlight { first, count }) = claim;
        self.cursor.lock().unwrap_or_else(|e| e.into_inner()).hint = Some(first + u64::from(count));
        claim
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
/// covered (0 if `first` is out of range), counted as sent by `session`. In the counters, a
/// `Fault` frame's first `fault_pages` pages are fault pages and the rest prefetch.
pub(crate) fn build_frame<'m>(
    map: &'m PageMap,
    first: u64,
    count: u32,
    origin: Origin,
    fault_pages: u32,
    frame: &mut Frame<'m>,
    session: &Session,
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
    session.count_sent(origin, fault_pages, n, zeros, data_len as u64);
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session(total: u64) -> (Session, Arc<Totals>) {
        let totals = Arc::new(Totals::default());
        (Session::new(1, None, total, totals.clone()), totals)
    }

    fn send(first: u64, count: u32) -> Claim {
        Claim::Send { first, count }
    }

    /// Drains the stream; panics on a page claimed twice.
    fn drain_stream(s: &Session, seen: &mut [bool]) {
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
    }

    #[test]
    fn stream_claims_every_page_once_and_follows_faults() {
        let (s, _) = session(1000);
        assert_eq!(s.claim_request(500, 4), send(500, 4));
        // the stream continues right after the fault
        let runs = s.claim_stream(10);
        assert_eq!(runs, vec![(504, 10)]);
        let mut seen = vec![false; 1000];
        seen[500..514].fill(true);
        drain_stream(&s, &mut seen);
        assert!(seen.iter().all(|&x| x));
    }

    #[test]
    fn a_fault_on_a_sent_page_is_answered_in_flight_never_resent() {
        let (s, totals) = session(1000);
        // the stream claims 0..100
        assert_eq!(s.claim_stream(100), vec![(0, 100)]);
        // a fault on page 10 (prefetch 8): every page is on its way already
        assert_eq!(
            s.claim_request(10, 8),
            Claim::InFlight {
                first: 10,
                count: 8
            }
        );
        // a fault on 98 with a window reaching past the streamed run: only the leading
        // streamed pages are in flight (the rest is the stream's, or a later request's)
        assert_eq!(
            s.claim_request(98, 4),
            Claim::InFlight {
                first: 98,
                count: 2
            }
        );
        // the stream follows the fault: it continues at 100
        assert_eq!(s.claim_stream(5), vec![(100, 5)]);
        // a fault on an unsent page sends it, and the unsent pages after it up to the next
        // sent one
        assert_eq!(s.claim_stream(1), vec![(105, 1)]);
        s.claim_request(110, 1);
        assert_eq!(s.claim_request(106, 8), send(106, 4));
        // and a fault asking again for what a fault reply sent is in flight too
        assert_eq!(
            s.claim_request(106, 1),
            Claim::InFlight {
                first: 106,
                count: 1
            }
        );
        // a request running off the end is clipped
        assert_eq!(s.claim_request(998, 8), send(998, 2));
        let mut seen = vec![false; 1000];
        seen[..111].fill(true);
        seen[998..].fill(true);
        drain_stream(&s, &mut seen);
        assert!(seen.iter().all(|&x| x));
        assert_eq!(s.stats.in_flight_replies.load(Ordering::Relaxed), 3);
        assert_eq!(totals.sent.in_flight_replies.load(Ordering::Relaxed), 3);
        assert_eq!(totals.sessions_opened.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn after_a_reconnect_only_pages_the_client_lacks_are_sent() {
        // the new session starts from the client's Received bitmap: 0..8 present, 8..16 not
        // (e.g. lost with a bulk connection of the old session)
        let (s, _) = session(64);
        s.merge_received(0, &[0xff, 0x00], 16);
        assert_eq!(s.claim_request(8, 4), send(8, 4));
        assert_eq!(s.claim_stream(64), vec![(12, 52)]);
        assert!(s.claim_stream(64).is_empty());
    }
}
