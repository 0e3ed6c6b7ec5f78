//! The state a pager's threads share: the region, its userfaultfd, which pages are present,
//! counters, the outcome, the owner's event channel and every live connection.

use std::net::Shutdown;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use proto::bitmap::AtomicBitmap;
use proto::PageIndex;

use crate::config::PagerConfig;
use crate::error::PagerError;
use crate::event::PagerEvent;
use crate::policy::{Action, Policy, Req};
use crate::region::HostMemory;
use crate::stats::Stats;
use crate::wake::Waker;
use uffd::Uffd;

#[derive(Debug, Default)]
struct Outcome {
    complete: Option<Duration>,
    failed: Option<PagerError>,
    /// Set with `failed`, kept after [`crate::Pager::wait`] takes the error.
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
    pub(crate) socks: Mutex<Vec<transport::Sock>>,
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

    /// A new region's shared state, registered with a new userfaultfd, with its event channel.
    pub(crate) fn start(
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

    /// How long after the start every page was present, once it was.
    pub(crate) fn completed_after(&self) -> Option<Duration> {
        self.outcome
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .complete
    }

    /// The error paging failed with, once (the owner's [`crate::Pager::wait`] takes it).
    pub(crate) fn take_failure(&self) -> Option<PagerError> {
        self.outcome
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .failed
            .take()
    }

    /// Shuts down every connection of a pager (wakes threads blocked on them).
    pub(crate) fn shutdown_socks(&self) {
        for s in self
            .socks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
        {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

/// A started pager's threads and the owner's handles on them, before the owner wraps them
/// with its source (remote or local).
pub(crate) struct Running {
    pub(crate) shared: Arc<Shared>,
    pub(crate) threads: Vec<std::thread::JoinHandle<()>>,
    pub(crate) waker: Arc<Waker>,
    pub(crate) events: Receiver<PagerEvent>,
}

impl Running {
    /// Bundles a started source's parts with what it hands its owner (its stream gate or its
    /// remote state).
    pub(crate) fn with<T>(
        shared: Arc<Shared>,
        threads: Vec<std::thread::JoinHandle<()>>,
        waker: Arc<Waker>,
        events: Receiver<PagerEvent>,
        handle: T,
    ) -> (Running, T) {
        (
            Running {
                shared,
                threads,
                waker,
                events,
            },
            handle,
        )
    }
}
