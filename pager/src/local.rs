//! The local source: restore from an image file on this host (snapshot restore), no network.
//! Faults copy straight from the file's page-cache pages; a streamer installs the rest.

use std::os::fd::AsFd;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use proto::is_zero_page;
use proto::Layout;
use transport::FileImage;

use crate::config::PagerConfig;
use crate::error::PagerError;
use crate::event::PagerEvent;
use crate::placement::{place_fault_thread, place_streamer};
use crate::policy::Policy;
use crate::region::HostMemory;
use crate::shared::{Origin, Running, Shared};
use crate::wake::{poll_in, Waker};

/// Holds the streamer back until [`crate::Pager::start_stream`] (with `stream_deferred`).
#[derive(Debug, Default)]
pub(crate) struct StreamGate {
    open: Mutex<bool>,
    cv: Condvar,
}

impl StreamGate {
    pub(crate) fn open(&self) {
        *self.open.lock().unwrap_or_else(|p| p.into_inner()) = true;
        self.cv.notify_all();
    }

    /// Waits until open (true) or `stop` (false), looking at `stop` every 50 ms.
    fn wait(&self, stop: &std::sync::atomic::AtomicBool) -> bool {
        let mut o = self.open.lock().unwrap_or_else(|p| p.into_inner());
        while !*o {
            if stop.load(Ordering::Acquire) {
                return false;
            }
            o = self
                .cv
                .wait_timeout(o, Duration::from_millis(50))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        true
    }
}

/// The image mapped read-only and pre-populated (the page-server's own file provider), so a
/// fault copies from the page cache without a second fault on the source side.
struct Image(FileImage);

impl Image {
    fn len(&self) -> usize {
        self.0.bytes().len()
    }

    fn pages(&self, first: u64, count: u64, ps: u64) -> &[u8] {
        &self.0.bytes()[(first * ps) as usize..((first + count) * ps) as usize]
    }
}

/// Installs `count` pages from the image, zero pages as zero pages, in maximal runs of one
/// kind and one origin.
fn install_from(
    sh: &Shared,
    img: &Image,
    first: u64,
    count: u64,
    origin: impl Fn(u64) -> Origin,
) -> Result<(), PagerError> {
    let ps = sh.mem.page_size();
    let kind = |p: u64| (is_zero_page(img.pages(p, 1, ps)), origin(p));
    let mut i = 0;
    let mut this = kind(first);
    while i < count {
        let mut j = i + 1;
        let mut next = None;
        while j < count {
            let k = kind(first + j);
            if k != this {
                next = Some(k);
                break;
            }
            j += 1;
        }
        let data = (!this.0).then(|| img.pages(first + i, j - i, ps));
        sh.install(first + i, j - i, data, this.1)?;
        i = j;
        if let Some(k) = next {
            this = k;
        }
    }
    Ok(())
}

pub(crate) fn start(
    path: &Path,
    config: PagerConfig,
) -> Result<(Running, Arc<StreamGate>), PagerError> {
    let img = Arc::new(Image(FileImage::open(path, config.page_size)?));
    let layout = Layout::single(img.len() as u64);
    let mem = HostMemory::map(&layout, config.page_size).map_err(|source| PagerError::Map {
        len_bytes: img.len() as u64,
        source,
    })?;
    let stream = config.stream;
    let gate = Arc::new(StreamGate::default());
    if !config.stream_deferred {
        gate.open();
    }
    let (shared, rx) = Shared::start(mem, config)?;
    let waker = Arc::new(Waker::new().map_err(PagerError::Spawn)?);
    let mut threads = Vec::new();
    let (sh, im, w) = (shared.clone(), img.clone(), waker.clone());
    threads.push(
        std::thread::Builder::new()
            .name("pager-fault".into())
            .spawn(move || fault_loop(sh, im, w))
            .map_err(PagerError::Spawn)?,
    );
    if stream {
        let (sh, im, g) = (shared.clone(), img.clone(), gate.clone());
        threads.push(
            std::thread::Builder::new()
                .name("pager-stream".into())
                .spawn(move || stream_loop(sh, im, &g))
                .map_err(PagerError::Spawn)?,
        );
    }
    let (sh, w) = (shared.clone(), waker.clone());
    threads.push(
        std::thread::Builder::new()
            .name("pager-supervisor".into())
            .spawn(move || {
                loop {
                    let (complete, failed) = sh.wait_outcome(std::time::Duration::from_millis(50));
                    if complete {
                        sh.unregister();
                        sh.event(PagerEvent::Complete);
                        break;
                    }
                    if failed || sh.stop.load(Ordering::Acquire) {
                        break;
                    }
                }
                sh.stop.store(true, Ordering::Release);
                w.wake();
            })
            .map_err(PagerError::Spawn)?,
    );
    Ok(Running::with(shared, threads, waker, rx, gate))
}

fn fault_loop(sh: Arc<Shared>, img: Arc<Image>, waker: Arc<Waker>) {
    let cfg = sh.config.clone();
    place_fault_thread(&cfg);
    let mut policy = Policy::new(
        sh.total_pages(),
        cfg.prefetch_min_pages,
        cfg.prefetch_max_pages,
    );
    let mut faults = Vec::with_capacity(64);
    while !sh.stop.load(Ordering::Acquire) {
        if poll_in([Some(sh.uffd.as_fd()), Some(waker.as_fd()), None], 1000) == [false; 3] {
            continue;
        }
        let mut failed = None;
        let ok = sh.dispatch_faults(&mut policy, &mut faults, |policy, req| {
            if failed.is_some() {
                return;
            }
            // served at once from the image: request and reply in one step
            let fault_end = req.first + u64::from(req.fault_pages);
            let origin = |p: u64| {
                if p < fault_end {
                    Origin::Fault
                } else {
                    Origin::Prefetch
                }
            };
            if let Err(e) = install_from(&sh, &img, req.first, u64::from(req.count), origin) {
                failed = Some(e);
                return;
            }
            if let Some((_, out)) = policy.on_reply(req.first, req.count, |p| sh.received.get(p)) {
                for t in out.satisfied {
                    sh.fault_done(t);
                }
            }
        });
        if let Some(e) = failed {
            sh.fail(e);
            return;
        }
        if !ok {
            return;
        }
    }
}

fn stream_loop(sh: Arc<Shared>, img: Arc<Image>, gate: &StreamGate) {
    place_streamer(&sh.config);
    if !gate.wait(&sh.stop) {
        return;
    }
    const CHUNK: u64 = 256;
    let total = sh.total_pages();
    let mut p = 0;
    while p < total && !sh.stop.load(Ordering::Acquire) {
        // skip what faults already brought in
        let Some(start) = sh.received.next_clear(p) else {
            break;
        };
        let mut end = start + 1;
        while end < total && end - start < CHUNK && !sh.received.get(end) {
            end += 1;
        }
        if let Err(e) = install_from(&sh, &img, start, end - start, |_| Origin::Stream) {
            sh.fail(e);
            return;
        }
        p = end;
    }
}
