//! The local source: restore from an image file on this host (snapshot restore), no network.
//! Faults copy straight from the file's page-cache pages; a streamer installs the rest.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use proto::{Layout, PageIndex};

use crate::policy::{Action, Policy};
use crate::remote::Waker;
use crate::{HostMemory, Origin, Pager, PagerConfig, PagerError, Shared};

/// A read-only, pre-populated mapping of the image.
struct Image {
    ptr: *const u8,
    len: usize,
}

// SAFETY: a read-only mapping; shared reads from any thread are sound.
unsafe impl Send for Image {}
// SAFETY: as above.
unsafe impl Sync for Image {}

impl Drop for Image {
    fn drop(&mut self) {
        // SAFETY: unmapping the mapping we made.
        unsafe { libc::munmap(self.ptr as *mut libc::c_void, self.len) };
    }
}

impl Image {
    fn open(path: &Path, page_size: u32) -> Result<Image, PagerError> {
        let err = |what: &str, source| PagerError::Image {
            path: path.to_owned(),
            what: what.to_string(),
            source,
        };
        let f = File::open(path).map_err(|e| err("cannot open", Some(e)))?;
        let len = f.metadata().map_err(|e| err("cannot stat", Some(e)))?.len();
        if len == 0 || len % u64::from(page_size) != 0 {
            return Err(err(
                &format!("size {len} is not a non-zero multiple of the page size {page_size}"),
                None,
            ));
        }
        // SAFETY: a fresh private read-only mapping of our file; MAP_POPULATE fills the page
        // tables so faults copy without taking a second fault on the source side.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len as usize,
                libc::PROT_READ,
                libc::MAP_PRIVATE | libc::MAP_POPULATE,
                f.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(err("cannot map", Some(std::io::Error::last_os_error())));
        }
        Ok(Image {
            ptr: p as *const u8,
            len: len as usize,
        })
    }

    fn pages(&self, first: u64, count: u64, ps: u64) -> &[u8] {
        // SAFETY: callers stay within the mapping (checked against total pages).
        unsafe {
            std::slice::from_raw_parts(self.ptr.add((first * ps) as usize), (count * ps) as usize)
        }
    }
}

fn is_zero(page: &[u8]) -> bool {
    // SAFETY: u64 has no invalid bit patterns; align_to handles unaligned ends.
    let (a, m, b) = unsafe { page.align_to::<u64>() };
    a.iter().all(|&x| x == 0) && m.iter().all(|&x| x == 0) && b.iter().all(|&x| x == 0)
}

/// Installs `count` pages from the image, zero pages as zero pages, in maximal runs.
fn install_from(
    sh: &Shared,
    img: &Image,
    first: u64,
    count: u64,
    origin: impl Fn(u64) -> Origin,
) -> Result<(), PagerError> {
    let ps = sh.mem.page_size();
    let mut i = 0;
    while i < count {
        let zero = is_zero(img.pages(first + i, 1, ps));
        let o = origin(first + i);
        let mut j = i + 1;
        while j < count && origin(first + j) == o && is_zero(img.pages(first + j, 1, ps)) == zero {
            j += 1;
        }
        let data = (!zero).then(|| img.pages(first + i, j - i, ps));
        sh.install(first + i, j - i, data, o)?;
        i = j;
    }
    Ok(())
}

pub(crate) fn start(path: &Path, config: PagerConfig) -> Result<Pager, PagerError> {
    let img = Arc::new(Image::open(path, config.page_size)?);
    let layout = Layout::single(img.len as u64);
    let mem = HostMemory::map(&layout, config.page_size).map_err(|source| PagerError::Map {
        len_bytes: img.len as u64,
        source,
    })?;
    let stream = config.stream;
    let (shared, rx) = Pager::build(mem, config)?;
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
        let (sh, im) = (shared.clone(), img.clone());
        threads.push(
            std::thread::Builder::new()
                .name("pager-stream".into())
                .spawn(move || stream_loop(sh, im))
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
                        sh.event(crate::PagerEvent::Complete);
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
    Ok(Pager {
        shared,
        threads,
        waker: Some(waker),
        events: Mutex::new(Some(rx)),
    })
}

fn fault_loop(sh: Arc<Shared>, img: Arc<Image>, waker: Arc<Waker>) {
    let cfg = sh.config.clone();
    crate::remote::place_fault_thread(&cfg);
    let mut policy = Policy::new(
        sh.total_pages(),
        cfg.prefetch_min_pages,
        cfg.prefetch_max_pages,
    );
    let mut faults = Vec::with_capacity(64);
    while !sh.stop.load(Ordering::Acquire) {
        let mut fds = [
            libc::pollfd {
                fd: sh.uffd.raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: waker.fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: polling two pollfd structs we own.
        if unsafe { libc::poll(fds.as_mut_ptr(), 2, 1000) } <= 0 {
            continue;
        }
        faults.clear();
        match sh.uffd.read_faults(&mut faults) {
            Ok(_) => {}
            Err(e) => {
                sh.fail(e.into());
                return;
            }
        }
        for &addr in &faults {
            let now = Instant::now();
            sh.stats.fault_events.fetch_add(1, Ordering::Relaxed);
            let Some(page) = sh.mem.page_of(addr) else {
                continue;
            };
            let left = sh.mem.host(page).map_or(1, |(_, l)| l);
            match policy.on_fault(page.0, now, |p| sh.received.get(p), left) {
                Some(Action::Request(req)) => {
                    sh.stats.requests.fetch_add(1, Ordering::Relaxed);
                    let fault_end = req.first + u64::from(req.fault_pages);
                    let origin = |p: u64| {
                        if p < fault_end {
                            Origin::Fault
                        } else {
                            Origin::Prefetch
                        }
                    };
                    if let Err(e) = install_from(&sh, &img, req.first, u64::from(req.count), origin)
                    {
                        sh.fail(e);
                        return;
                    }
                    if let Some((_, out)) =
                        policy.on_reply(req.first, req.count, |p| sh.received.get(p))
                    {
                        for t in out.satisfied {
                            sh.fault_done(t);
                        }
                    }
                }
                Some(Action::Wake(p)) => {
                    if let Some((host, _)) = sh.mem.host(PageIndex(p)) {
                        let _ = sh.uffd.wake(host, sh.mem.page_size());
                    }
                }
                None => {}
            }
        }
    }
}

fn stream_loop(sh: Arc<Shared>, img: Arc<Image>) {
    crate::remote::place_streamer(&sh.config);
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
