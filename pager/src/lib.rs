//! Destination side of post-copy paging: a memory region whose pages are all missing at first
//! and are filled lazily — each faulting page fetched on demand through userfaultfd (with an
//! adaptive prefetch window), everything else installed by a background stream — until the
//! region no longer depends on its source. Sources: a page-server over the network
//! ([`Pager::connect`]) or an image file on this host ([`Pager::local`]).
//!
//! Threads of a remote pager: one **fault thread** (userfaultfd events + the urgent
//! connection), one **streamer** per bulk connection, one **supervisor** (control connection,
//! completion, reconnection). A session receives each page once: a fault on a page the stream
//! already has on its way (the source answers `InFlight`) waits for the stream's install; only
//! a reconnect asks again for what the lost session never delivered. With
//! [`PagerConfig::stream_deferred`] every connection is opened at once but the stream waits for
//! [`Pager::start_stream`] (a migration destination connects before the source pauses). When every page is present the supervisor unregisters the region,
//! sends `Done` and closes every connection. If the source goes away, the owner gets
//! [`PagerEvent::SourceLost`], faults keep waiting (never served wrong memory), and the
//! supervisor reconnects for up to [`PagerConfig::reconnect_timeout`] before failing with
//! [`PagerError::SourceLost`].
//!
//! This crate knows nothing of KVM; it pages any memory of this process.

mod fault;
mod local;
mod policy;
mod precopy;
mod region;
mod remote;
mod stats;
mod stream_rx;
pub mod uffd;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use proto::bitmap::AtomicBitmap;
use proto::{Layout, PageIndex};
use thiserror::Error;

pub use page_server::Addr;
pub use policy::{Action, Policy, Req};
pub use region::HostMemory;
pub use stats::{Histogram, LatencySummary, Report, Stats};
use uffd::{Uffd, UffdError};

/// The longest pause between two reconnect attempts (the back-off doubles from 50 ms to this).
pub const RECONNECT_BACKOFF_MAX: Duration = Duration::from_millis(100);

/// Pager tunables.
#[derive(Debug, Clone)]
pub struct PagerConfig {
    /// Run the background stream (off: pure demand paging).
    pub stream: bool,
    /// Open the stream's connections (or, for a local image, its thread) but send no page
    /// until [`Pager::start_stream`]; faults are served meanwhile. Ignored without `stream`.
    pub stream_deferred: bool,
    /// Pre-copy: the source's memory still changes while pages arrive (a running VM being
    /// migrated), and the region is not used yet. Stream pages marked `Precopy` overwrite a
    /// page already present; the pager never completes until [`Pager::end_precopy`] says which
    /// pages changed since they were sent. Needs one bulk connection (pages sent again must
    /// arrive after their older copies).
    pub precopy: bool,
    /// Bulk connections for the stream (remote only).
    pub bulk_connections: usize,
    /// Smallest prefetch window (pages requested per fault).
    pub prefetch_min_pages: u32,
    /// Largest prefetch window, reached while faults walk memory sequentially.
    pub prefetch_max_pages: u32,
    /// How long to keep trying to reach a lost source before failing.
    pub reconnect_timeout: Duration,
    /// Connect timeout of the first connection (and its handshake).
    pub connect_timeout: Duration,
    /// Each reconnect attempt (connect + handshake, per connection) gives up after this long,
    /// or after 4 round trips of the first connection plus 50 ms if that is longer, and the
    /// next starts: short, so that a link that comes back is found within about this long
    /// plus the back-off (at most [`RECONNECT_BACKOFF_MAX`]), not after TCP's own SYN
    /// back-off (1, 2, 4 ... s).
    pub reconnect_attempt_timeout: Duration,
    /// A source whose host stops answering (cut link, lost host) is declared lost after this
    /// long without acknowledgements (TCP keepalive + TCP_USER_TIMEOUT on every connection);
    /// then the pager reconnects on its own. Zero: the kernel's defaults (~15 minutes).
    pub liveness_timeout: Duration,
    /// No page arrives for this long while faults wait on them, although the connections are
    /// up (a source that is stopped, wedged or stalls mid-frame): the source is treated as
    /// lost and the pager reconnects. Zero: never.
    pub stall_timeout: Duration,
    /// Busy-poll for a fault reply this long before sleeping in poll(2). Zero by default: on a
    /// shared CPU, spinning keeps the CPU from the thread that would answer.
    pub reply_spin: Duration,
    /// Pin the fault thread to this CPU (put it next to the threads that fault, e.g. the
    /// vCPUs: a wake-up on the same CPU costs a few µs, across CPUs tens) and keep the
    /// streamers off it.
    pub fault_cpu: Option<usize>,
    /// Page size in bytes.
    pub page_size: u32,
    /// Socket buffer size of each bulk connection (see
    /// [`page_server::DEFAULT_BULK_BUFFER_BYTES`]): bounds how long a fault on a page already
    /// streamed, still queued, waits.
    pub bulk_buffer_bytes: usize,
}

impl Default for PagerConfig {
    fn default() -> Self {
        PagerConfig {
            stream: true,
            stream_deferred: false,
            precopy: false,
            bulk_connections: 2,
            prefetch_min_pages: 1,
            prefetch_max_pages: 64,
            reconnect_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(2),
            reconnect_attempt_timeout: Duration::from_millis(250),
            liveness_timeout: page_server::DEFAULT_LIVENESS_TIMEOUT,
            stall_timeout: Duration::from_secs(30),
            reply_spin: Duration::ZERO,
            fault_cpu: None,
            page_size: 4096,
            bulk_buffer_bytes: page_server::DEFAULT_BULK_BUFFER_BYTES,
        }
    }
}

/// The pager failed.
#[derive(Debug, Error)]
pub enum PagerError {
    /// A userfaultfd call failed.
    #[error("userfaultfd")]
    Uffd(#[from] UffdError),
    /// Mapping the region failed.
    #[error("cannot map {len_bytes} bytes for the region")]
    Map {
        /// Size.
        len_bytes: u64,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Could not reach the source.
    #[error("cannot connect to page-server at {addr}")]
    Connect {
        /// Where.
        addr: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The source refused us, or we refused it.
    #[error("handshake with {addr} failed")]
    Handshake {
        /// Where.
        addr: String,
        /// What disagreed.
        #[source]
        source: proto::HandshakeError,
    },
    /// The source sent an error frame.
    #[error("page-server at {addr} refused: {reason} (code {code})")]
    Refused {
        /// Where.
        addr: String,
        /// Code.
        code: u16,
        /// Reason.
        reason: String,
    },
    /// The source sent something invalid.
    #[error("protocol error from {addr}: {what}")]
    Protocol {
        /// Where.
        addr: String,
        /// What.
        what: String,
    },
    /// The source went away and could not be reached again in time.
    #[error("source {addr} lost ({cause}); gave up after {waited:?} of reconnect attempts; {missing} pages still missing (faults on them stay blocked)")]
    SourceLost {
        /// Where.
        addr: String,
        /// What broke first.
        cause: String,
        /// Time spent reconnecting.
        waited: Duration,
        /// Pages never received.
        missing: u64,
    },
    /// The local image could not be used.
    #[error("local image")]
    Image(#[from] page_server::ImageError),
    /// A thread could not be started.
    #[error("cannot start a pager thread")]
    Spawn(#[source] std::io::Error),
    /// The pager has failed for good; nothing more can be asked of its source.
    #[error("the pager has stopped")]
    Stopped,
}

/// Things the owner is told as they happen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PagerEvent {
    /// The source stopped answering; faults on missing pages wait while we reconnect.
    SourceLost {
        /// What broke.
        cause: String,
    },
    /// Reconnected; paging continues.
    Reconnected {
        /// Reconnections so far.
        count: u64,
    },
    /// Every page is present; the region no longer depends on the source.
    Complete,
    /// Paging failed for good (see [`Pager::wait`]).
    Failed {
        /// Why.
        reason: String,
    },
}

#[derive(Debug, Default)]
struct Outcome {
    complete: Option<Duration>,
    failed: Option<PagerError>,
    /// Set with `failed`, kept after [`Pager::wait`] takes the error.
    has_failed: bool,
}

/// State shared by a pager's threads.
pub(crate) struct Shared {
    // `mem` is declared before `uffd`: on drop the region is unmapped before the userfaultfd
    // closes, so a thread still blocked on a missing page can never see a zero page.
    pub(crate) mem: HostMemory,
    pub(crate) uffd: Uffd,
    pub(crate) received: AtomicBitmap,
    pub(crate) present: AtomicU64,
    pub(crate) stats: Stats,
    pub(crate) started: Instant,
    pub(crate) config: PagerConfig,
    pub(crate) stop: AtomicBool,
    outcome: Mutex<Outcome>,
    cv: Condvar,
    events: Mutex<Option<Sender<PagerEvent>>>,
    /// Every live connection, so any thread can shut them all down.
    pub(crate) socks: Mutex<Vec<page_server::Sock>>,
    /// Pages the fault thread awaits from the stream (answered `InFlight`): while non-zero, a
    /// streamer wakes the fault thread after each install.
    pub(crate) awaited_from_stream: AtomicU64,
    /// Pages the fault thread waits on (requested or awaited from the stream), published
    /// after each round: the supervisor's stall detector reads it.
    pub(crate) waiting: AtomicU64,
    /// Pre-copy still runs (see [`PagerConfig::precopy`]).
    pub(crate) precopy: AtomicBool,
    /// Held (shared) by a streamer while it installs a `Precopy` frame, (exclusive) while
    /// pre-copy ends.
    pub(crate) precopy_lock: std::sync::RwLock<()>,
    /// Pages modified after they were pre-copied: a late `Precopy` copy of one is dropped.
    pub(crate) stale: AtomicBitmap,
    /// Pages whose final copy (sent after the source paused) came while pre-copy still ran.
    pub(crate) fresh: AtomicBitmap,
}

/// Where pages come from, as far as the owner can still steer it.
enum Source {
    Remote(Arc<remote::Remote>),
    Local(Arc<local::StreamGate>),
}

/// Which counters an install feeds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Origin {
    Fault,
    Prefetch,
    Stream,
}

impl Shared {
    fn new(mem: HostMemory, uffd: Uffd, config: PagerConfig) -> Self {
        let total = mem.total_pages();
        let precopy = config.precopy;
        Shared {
            mem,
            uffd,
            received: AtomicBitmap::new(total),
            present: AtomicU64::new(0),
            stats: Stats::default(),
            started: Instant::now(),
            config,
            stop: AtomicBool::new(false),
            outcome: Mutex::default(),
            cv: Condvar::new(),
            events: Mutex::new(None),
            socks: Mutex::default(),
            awaited_from_stream: AtomicU64::new(0),
            waiting: AtomicU64::new(0),
            precopy: AtomicBool::new(precopy),
            precopy_lock: std::sync::RwLock::new(()),
            stale: AtomicBitmap::new(total),
            fresh: AtomicBitmap::new(total),
        }
    }

    pub(crate) fn total_pages(&self) -> u64 {
        self.mem.total_pages()
    }

    pub(crate) fn present_pages(&self) -> u64 {
        self.present.load(Ordering::Acquire)
    }

    pub(crate) fn is_complete(&self) -> bool {
        self.present_pages() >= self.total_pages() && !self.precopy.load(Ordering::Acquire)
    }

    /// Records completion once every page is present (and pre-copy is over).
    pub(crate) fn check_complete(&self) {
        if self.is_complete() {
            let mut o = self.outcome.lock().unwrap_or_else(|p| p.into_inner());
            if o.complete.is_none() {
                o.complete = Some(self.started.elapsed());
            }
            self.cv.notify_all();
        }
    }

    pub(crate) fn event(&self, e: PagerEvent) {
        if let Some(tx) = self
            .events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
        {
            let _ = tx.send(e);
        }
    }

    /// Registers every region for missing faults.
    fn register(&self) -> Result<(), PagerError> {
        for (addr, len) in self.mem.regions() {
            self.uffd.register_missing(*addr, *len)?;
        }
        Ok(())
    }

    /// Unregisters every region (only once every page is present).
    pub(crate) fn unregister(&self) {
        for (addr, len) in self.mem.regions() {
            if let Err(e) = self.uffd.unregister(*addr, *len) {
                log::warn!("unregister after completion: {e}");
            }
        }
    }

    /// Installs `count` pages from `first` — from `data` (`count * page_size` bytes) or as zero
    /// pages — then marks them received. Runs crossing a region end are split.
    pub(crate) fn install(
        &self,
        first: u64,
        count: u64,
        data: Option<&[u8]>,
        origin: Origin,
    ) -> Result<(), PagerError> {
        let ps = self.mem.page_size();
        let mut done = 0u64;
        while done < count {
            let Some((host, left)) = self.mem.host(PageIndex(first + done)) else {
                return Err(PagerError::Protocol {
                    addr: "the page source".into(),
                    what: format!(
                        "page {} is outside the region of {} pages",
                        first + done,
                        self.total_pages()
                    ),
                });
            };
            let n = left.min(count - done);
            let src = data.map(|d| d[(done * ps) as usize..((done + n) * ps) as usize].as_ptr());
            // SAFETY: `src` points into `data`, which holds (done + n) * ps bytes or more.
            let r = unsafe { self.uffd.install(host, src, n * ps, ps) }?;
            self.stats
                .duplicate_pages
                .fetch_add(r.existing_pages, Ordering::Relaxed);
            done += n;
        }
        let (pages, bytes) = match origin {
            Origin::Fault => (&self.stats.fault_pages, &self.stats.fault_bytes),
            Origin::Prefetch => (&self.stats.prefetch_pages, &self.stats.prefetch_bytes),
            Origin::Stream => (&self.stats.stream_pages, &self.stats.stream_bytes),
        };
        pages.fetch_add(count, Ordering::Relaxed);
        match data {
            Some(_) => bytes.fetch_add(count * ps, Ordering::Relaxed),
            None => self.stats.zero_pages.fetch_add(count, Ordering::Relaxed),
        };
        let newly = self.received.set_range(first, count);
        if newly > 0 {
            self.present.fetch_add(newly, Ordering::AcqRel);
            self.check_complete();
        }
        Ok(())
    }

    /// Reads every pending fault event and feeds it to `policy`: waiters of pages already
    /// present are woken, each new request goes to `request`. Returns false on a fatal error
    /// (already reported through [`Shared::fail`]).
    pub(crate) fn dispatch_faults(
        &self,
        policy: &mut Policy,
        faults: &mut Vec<u64>,
        mut request: impl FnMut(&mut Policy, Req),
    ) -> bool {
        faults.clear();
        loop {
            match self.uffd.read_faults(faults) {
                Ok(n) if n < Uffd::READ_BATCH => break,
                Ok(_) => {}
                Err(e) => {
                    self.fail(e.into());
                    return false;
                }
            }
        }
        let now = Instant::now();
        for &addr in faults.iter() {
            self.stats.fault_events.fetch_add(1, Ordering::Relaxed);
            let Some(page) = self.mem.page_of(addr) else {
                log::warn!("fault at {addr:#x} outside the region");
                continue;
            };
            let left = self.mem.host(page).map_or(1, |(_, l)| l);
            match policy.on_fault(page.0, now, |p| self.received.get(p), left) {
                Some(Action::Request(req)) => {
                    self.stats.requests.fetch_add(1, Ordering::Relaxed);
                    request(policy, req);
                }
                Some(Action::Wake(p)) => {
                    if let Some((host, _)) = self.mem.host(PageIndex(p)) {
                        let _ = self.uffd.wake(host, self.mem.page_size());
                    }
                }
                None => {}
            }
        }
        true
    }

    /// Requests the pages at host addresses `addrs` that are missing and not yet asked for
    /// (`Pager::fetch_early`).
    pub(crate) fn dispatch_early(
        &self,
        policy: &mut Policy,
        addrs: &[u64],
        mut request: impl FnMut(&mut Policy, Req),
    ) {
        for &addr in addrs {
            let Some(page) = self.mem.page_of(addr) else {
                log::warn!("early fetch at {addr:#x} outside the region");
                continue;
            };
            if let Some(req) = policy.on_early(page.0, |p| self.received.get(p)) {
                self.stats.requests.fetch_add(1, Ordering::Relaxed);
                request(policy, req);
            }
        }
    }

    /// Records a fault that waited from `since` until now.
    pub(crate) fn fault_done(&self, since: Instant) {
        let ns = since.elapsed().as_nanos() as u64;
        self.stats.fault_latency.record(ns);
        self.stats.blocked_ns.fetch_add(ns, Ordering::Relaxed);
    }

    /// Whether paging failed for good.
    pub(crate) fn has_failed(&self) -> bool {
        self.outcome
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .has_failed
    }

    pub(crate) fn fail(&self, e: PagerError) {
        let reason = e.to_string();
        let mut o = self.outcome.lock().unwrap_or_else(|p| p.into_inner());
        if o.failed.is_none() && o.complete.is_none() {
            o.failed = Some(e);
            o.has_failed = true;
            drop(o);
            self.event(PagerEvent::Failed { reason });
        }
        self.cv.notify_all();
    }

    /// Waits until complete, failed or `timeout`, whichever first; wakes early on `notify`.
    pub(crate) fn wait_outcome(&self, timeout: Duration) -> (bool, bool) {
        let o = self.outcome.lock().unwrap_or_else(|p| p.into_inner());
        let (o, _) = self
            .cv
            .wait_timeout_while(o, timeout, |o| {
                o.complete.is_none() && o.failed.is_none() && !self.stop.load(Ordering::Acquire)
            })
            .unwrap_or_else(|p| p.into_inner());
        (o.complete.is_some(), o.failed.is_some())
    }

    pub(crate) fn notify(&self) {
        let _g = self.outcome.lock().unwrap_or_else(|p| p.into_inner());
        self.cv.notify_all();
    }
}

/// A region being paged in. Dropping it stops every thread and (for a region it mapped) unmaps
/// the memory.
pub struct Pager {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
    waker: Option<Arc<remote::Waker>>,
    events: Mutex<Option<Receiver<PagerEvent>>>,
    source: Source,
}

impl Pager {
    /// Connects to the page-server at `addr`, maps a region for the memory it serves, registers
    /// it with userfaultfd, and starts paging.
    pub fn connect(addr: &Addr, config: PagerConfig) -> Result<Pager, PagerError> {
        remote::start(addr, None, config)
    }

    /// Like [`Pager::connect`], paging memory the caller mapped; its layout must equal the
    /// server's (checked in the handshake).
    pub fn connect_adopt(
        addr: &Addr,
        mem: HostMemory,
        layout: Layout,
        config: PagerConfig,
    ) -> Result<Pager, PagerError> {
        remote::start(addr, Some((mem, layout)), config)
    }

    /// Restores from an image file on this host, no network: faults and the stream copy from the
    /// file's pages.
    pub fn local(image: &std::path::Path, config: PagerConfig) -> Result<Pager, PagerError> {
        local::start(image, config)
    }

    fn build(
        mem: HostMemory,
        config: PagerConfig,
    ) -> Result<(Arc<Shared>, Receiver<PagerEvent>), PagerError> {
        let uffd = Uffd::new()?;
        let shared = Arc::new(Shared::new(mem, uffd, config));
        let (tx, rx) = std::sync::mpsc::channel();
        *shared.events.lock().unwrap_or_else(|p| p.into_inner()) = Some(tx);
        shared.register()?;
        Ok((shared, rx))
    }

    /// Starts the background stream of a pager configured with
    /// [`PagerConfig::stream_deferred`]: the source starts sending every page not yet sent.
    /// Idempotent, and remembered: a reconnect after it enables the stream on the new
    /// session, a reconnect before it does not. Returns at once (the request is one small
    /// frame); while the source is unreachable it takes effect on the reconnect. A no-op
    /// without [`PagerConfig::stream`] or once every page is present.
    ///
    /// Errors: [`PagerError::Stopped`] if paging has failed for good.
    pub fn start_stream(&self) -> Result<(), PagerError> {
        match &self.source {
            Source::Remote(r) => remote::start_stream(r),
            Source::Local(gate) => {
                if self.shared.has_failed() {
                    return Err(PagerError::Stopped);
                }
                gate.open();
                Ok(())
            }
        }
    }

    /// Asks for the pages at the host addresses `addrs` now, in one round, as if they had
    /// faulted, without waiting: for pages that are about to be touched by someone other than
    /// a vCPU (e.g. KVM writing its clock pages while a vCPU's state is applied), so that they
    /// arrive in one round trip instead of one each. A no-op for a local image (its faults
    /// take microseconds) and for pages already present or asked for.
    pub fn fetch_early(&self, addrs: &[u64]) {
        if let Source::Remote(r) = &self.source {
            remote::fetch_early(r, addrs);
        }
    }

    /// The memory being paged.
    pub fn memory(&self) -> &HostMemory {
        &self.shared.mem
    }

    /// Pages in the region.
    pub fn total_pages(&self) -> u64 {
        self.shared.total_pages()
    }

    /// Pages present now.
    pub fn present_pages(&self) -> u64 {
        self.shared.present_pages()
    }

    /// Whether page `i` is present. Set just after the page is installed: a thread woken by
    /// the install may see `false` for a few microseconds.
    pub fn is_present(&self, i: u64) -> bool {
        self.shared.received.get(i)
    }

    /// Events as they happen (the receiver can be taken once).
    pub fn events(&self) -> Option<Receiver<PagerEvent>> {
        self.events.lock().unwrap_or_else(|p| p.into_inner()).take()
    }

    /// Live counters.
    pub fn stats(&self) -> &Stats {
        &self.shared.stats
    }

    /// The figures so far.
    pub fn report(&self) -> Report {
        let complete = self
            .shared
            .outcome
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .complete;
        self.shared
            .stats
            .report(self.total_pages(), self.present_pages(), complete)
    }

    /// Waits up to `timeout` for the outcome: `Some(Ok(report))` once every page is present
    /// (and the source released), `Some(Err(..))` if paging failed, `None` on timeout.
    pub fn wait(&mut self, timeout: Duration) -> Option<Result<Report, PagerError>> {
        let (complete, failed) = self.shared.wait_outcome(timeout);
        if complete {
            // the supervisor finishes releasing the source; join it so "complete" means released
            self.join_threads();
            return Some(Ok(self.report()));
        }
        if failed {
            let e = self
                .shared
                .outcome
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .failed
                .take();
            return e.map(Err);
        }
        None
    }

    fn join_threads(&mut self) {
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for Pager {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        self.shared.notify();
        if let Some(w) = &self.waker {
            w.wake();
        }
        remote::shutdown_all(&self.shared);
        self.join_threads();
    }
}
