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

mod config;
mod error;
mod event;
mod local;
mod placement;
mod policy;
mod precopy;
mod region;
mod remote;
mod shared;
mod stats;
mod stream_rx;

mod wake;

use std::sync::atomic::Ordering;
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use proto::Layout;

pub use config::{PagerConfig, RECONNECT_BACKOFF_MAX};
pub use error::PagerError;
pub use event::PagerEvent;
pub use policy::{Action, Policy, Req};
pub use region::HostMemory;
use shared::{Running, Shared};
pub use stats::{Histogram, LatencySummary, Report, Stats};
pub use transport::Addr;
use wake::Waker;

/// Where pages come from, as far as the owner can still steer it.
enum Source {
    Remote(Arc<remote::Remote>),
    Local(Arc<local::StreamGate>),
}

/// A region being paged in. Dropping it stops every thread and (for a region it mapped) unmaps
/// the memory.
pub struct Pager {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
    waker: Option<Arc<Waker>>,
    events: Mutex<Option<Receiver<PagerEvent>>>,
    source: Source,
}

impl Pager {
    /// Connects to the page-server at `addr`, maps a region for the memory it serves, registers
    /// it with userfaultfd, and starts paging.
    pub fn connect(addr: &Addr, config: PagerConfig) -> Result<Pager, PagerError> {
        let (run, remote) = remote::start(addr, None, config)?;
        Ok(Pager::new(run, Source::Remote(remote)))
    }

    /// Like [`Pager::connect`], paging memory the caller mapped; its layout must equal the
    /// server's (checked in the handshake).
    pub fn connect_adopt(
        addr: &Addr,
        mem: HostMemory,
        layout: Layout,
        config: PagerConfig,
    ) -> Result<Pager, PagerError> {
        let (run, remote) = remote::start(addr, Some((mem, layout)), config)?;
        Ok(Pager::new(run, Source::Remote(remote)))
    }

    /// Restores from an image file on this host, no network: faults and the stream copy from the
    /// file's pages.
    pub fn local(image: &std::path::Path, config: PagerConfig) -> Result<Pager, PagerError> {
        let (run, gate) = local::start(image, config)?;
        Ok(Pager::new(run, Source::Local(gate)))
    }

    fn new(run: Running, source: Source) -> Pager {
        Pager {
            shared: run.shared,
            threads: run.threads,
            waker: Some(run.waker),
            events: Mutex::new(Some(run.events)),
            source,
        }
    }

    /// With [`PagerConfig::hold_done`]: tells the source, once every page is present, that
    /// it may let go (Done). Errors: [`PagerError::Stopped`] when there is nothing to release
    /// (not complete, a local source, or released already).
    pub fn release_done(&self) -> Result<(), PagerError> {
        match &self.source {
            Source::Remote(r) => remote::release_done(r),
            Source::Local(_) => Err(PagerError::Stopped),
        }
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
        let complete = self.shared.completed_after();
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
            return self.shared.take_failure().map(Err);
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
        self.shared.shutdown_socks();
        self.join_threads();
    }
}
