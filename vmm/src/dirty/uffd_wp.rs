//! Dirty-page tracking through userfaultfd write protection, two backends.
//!
//! `uffd-wp` (Linux ≥ 5.7; the seed's method): every page is write-protected; a write faults,
//! a thread of ours records the page as dirty and lifts the protection, and the writer goes on.
//! A collection takes the recorded set and protects those pages again.
//!
//! `uffd-wp-async` (Linux ≥ 6.7): guest RAM is registered
//! with a userfaultfd in write-protect mode with `UFFD_FEATURE_WP_ASYNC` (the kernel itself
//! lifts the protection on a write and records it, no fault reaches user space) and
//! `UFFD_FEATURE_WP_UNPOPULATED` (pages never touched are protected too), and the `PAGEMAP_SCAN`
//! ioctl on /proc/self/pagemap returns the written pages and protects them again in one step.
//! Writes by KVM through its own mappings go through the same page tables, so they count too.

use std::io;

use thiserror::Error;
use uffd::pagemap::Pagemap;
use uffd::{feature, Fault, Uffd, UffdError};

use super::pageset::PageSet;
use crate::memory::{GuestRam, PAGE_SIZE};

/// The backend could not be used.
#[derive(Debug, Error)]
pub enum UffdWpError {
    /// The kernel lacks a feature.
    #[error("this kernel's userfaultfd lacks {0} (needs Linux >= 6.7)")]
    Unsupported(&'static str),
    /// A call failed.
    #[error("{what}")]
    Os {
        /// What.
        what: &'static str,
        /// errno.
        #[source]
        source: io::Error,
    },
    /// A userfaultfd call failed.
    #[error("{what}")]
    Uffd {
        /// What.
        what: &'static str,
        /// The call and its errno.
        #[source]
        source: UffdError,
    },
}

fn os(what: &'static str) -> impl FnOnce(io::Error) -> UffdWpError {
    move |source| UffdWpError::Os { what, source }
}

fn uf(what: &'static str) -> impl FnOnce(UffdError) -> UffdWpError {
    move |source| UffdWpError::Uffd { what, source }
}

/// Write-protect tracking switched on for a VM's RAM.
#[derive(Debug)]
pub struct UffdWpAsync {
    uffd: Uffd,
    pagemap: Pagemap,
    /// `(host address, bytes, first flat page)`.
    regions: Vec<(u64, u64, u64)>,
    pages: u64,
}

impl UffdWpAsync {
    /// Whether this kernel offers the features (for gates and defaults).
    pub fn available() -> Result<(), UffdWpError> {
        require(ASYNC_FEATURES)
    }

    /// Registers every RAM region for asynchronous write protection and protects it all.
    pub fn start(ram: &GuestRam) -> Result<UffdWpAsync, UffdWpError> {
        let (uffd, regions, pages) = protect_all(ram, ASYNC_FEATURES)?;
        Ok(UffdWpAsync {
            uffd,
            pagemap: Pagemap::open().map_err(uf("opening /proc/self/pagemap"))?,
            regions,
            pages,
        })
    }

    /// The pages written since `start` or the previous `collect` (protected again).
    pub fn collect(&self) -> Result<PageSet, UffdWpError> {
        let ps = u64::from(PAGE_SIZE);
        let mut set = PageSet::new(self.pages);
        for &(host, len, first) in &self.regions {
            self.pagemap
                .take_written(host, host + len, |start, end| {
                    for p in (start - host) / ps..(end - host) / ps {
                        set.insert(first + p);
                    }
                })
                .map_err(uf("PAGEMAP_SCAN of guest RAM"))?;
        }
        Ok(set)
    }

    /// Turns tracking off (unregisters, which lifts every protection).
    pub fn stop(self) -> Result<(), UffdWpError> {
        unregister(&self.uffd, &self.regions)
    }
}

/// Each RAM region's `(host address, bytes, first flat page)`.
type Regions = Vec<(u64, u64, u64)>;

/// The features `uffd-wp-async` needs, with their names for the refusal.
const ASYNC_FEATURES: &[(u64, &str)] = &[
    (feature::WP_ASYNC, "UFFD_FEATURE_WP_ASYNC"),
    (feature::WP_UNPOPULATED, "UFFD_FEATURE_WP_UNPOPULATED"),
];
/// The features `uffd-wp` needs.
const SYNC_FEATURES: &[(u64, &str)] = &[
    (feature::PAGEFAULT_FLAG_WP, "UFFD_FEATURE_PAGEFAULT_FLAG_WP"),
    (feature::WP_UNPOPULATED, "UFFD_FEATURE_WP_UNPOPULATED"),
];

/// Whether this kernel's userfaultfd offers every one of `needed`; names the first it lacks.
fn require(needed: &[(u64, &'static str)]) -> Result<(), UffdWpError> {
    let offered = uffd::probe().map_err(uf("userfaultfd(2)"))?;
    match needed.iter().find(|(bit, _)| offered & bit == 0) {
        Some(&(_, name)) => Err(UffdWpError::Unsupported(name)),
        None => Ok(()),
    }
}

/// A userfaultfd with `needed`, every RAM region of `ram` registered for write-protect faults
/// and protected; with the regions `(host address, bytes, first flat page)` and the page count.
fn protect_all(
    ram: &GuestRam,
    needed: &[(u64, &'static str)],
) -> Result<(Uffd, Regions, u64), UffdWpError> {
    require(needed)?;
    let uffd = Uffd::with_features(needed.iter().fold(0, |a, (bit, _)| a | bit))
        .map_err(uf("UFFDIO_API"))?;
    let (regions, pages) = ram_regions(ram);
    register_and_protect(&uffd, &regions)?;
    Ok((uffd, regions, pages))
}

/// Registers `regions` (host address, bytes) of `uffd` for write-protect faults and protects
/// them all.
fn register_and_protect(uffd: &Uffd, regions: &[(u64, u64, u64)]) -> Result<(), UffdWpError> {
    for &(host, len, _) in regions {
        uffd.register_write_protect(host, len)
            .map_err(uf("UFFDIO_REGISTER (write-protect mode) of guest RAM"))?;
    }
    for &(host, len, _) in regions {
        uffd.write_protect(host, len, true)
            .map_err(uf("UFFDIO_WRITEPROTECT of guest RAM"))?;
    }
    Ok(())
}

fn unregister(uffd: &Uffd, regions: &[(u64, u64, u64)]) -> Result<(), UffdWpError> {
    for &(host, len, _) in regions {
        uffd.unregister(host, len)
            .map_err(uf("UFFDIO_UNREGISTER of guest RAM"))?;
    }
    Ok(())
}

fn ram_regions(ram: &GuestRam) -> (Vec<(u64, u64, u64)>, u64) {
    let ps = u64::from(PAGE_SIZE);
    let mut first = 0;
    let mut v = Vec::new();
    for (_, host, len) in ram.host_regions() {
        v.push((host, len, first));
        first += len / ps;
    }
    (v, first)
}

/// Synchronous write-protect tracking: a thread takes each write fault, records the page and
/// lets the writer go on.
#[derive(Debug)]
pub struct UffdWp {
    uffd: std::sync::Arc<Uffd>,
    regions: Vec<(u64, u64, u64)>,
    dirty: std::sync::Arc<proto::bitmap::AtomicBitmap>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    pages: u64,
}

impl UffdWp {
    /// Whether this kernel offers write-protect faults on anonymous memory.
    pub fn available() -> Result<(), UffdWpError> {
        require(SYNC_FEATURES)
    }

    /// Registers and protects guest RAM and starts the fault thread.
    pub fn start(ram: &GuestRam) -> Result<UffdWp, UffdWpError> {
        let (uffd, regions, pages) = protect_all(ram, SYNC_FEATURES)?;
        let uffd = std::sync::Arc::new(uffd);
        let dirty = std::sync::Arc::new(proto::bitmap::AtomicBitmap::new(pages));
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (u, d, st, r) = (uffd.clone(), dirty.clone(), stop.clone(), regions.clone());
        let thread = std::thread::Builder::new()
            .name("uffd-wp".into())
            .spawn(move || wp_fault_loop(&u, &d, &st, &r))
            .map_err(os("spawning the write-fault thread"))?;
        Ok(UffdWp {
            uffd,
            regions,
            dirty,
            stop,
            thread: Some(thread),
            pages,
        })
    }

    /// The pages written since `start` or the previous `collect` (protected again).
    pub fn collect(&self) -> Result<PageSet, UffdWpError> {
        let ps = u64::from(PAGE_SIZE);
        // take the set first, then protect its pages again: a write in between goes to a page
        // reported now (and read for sending after it), so none is lost
        let mut set = PageSet::new(self.pages);
        let bytes = self.dirty.to_bytes();
        self.dirty.clear_bytes(&bytes);
        for (bi, &b) in bytes.iter().enumerate() {
            let mut b = b;
            while b != 0 {
                let p = bi as u64 * 8 + u64::from(b.trailing_zeros());
                b &= b - 1;
                set.insert(p);
            }
        }
        for &(host, len, first) in &self.regions {
            let n = len / ps;
            let mut i = 0;
            while i < n {
                if !set.contains(first + i) {
                    i += 1;
                    continue;
                }
                let s = i;
                while i < n && set.contains(first + i) {
                    i += 1;
                }
                self.uffd
                    .write_protect(host + s * ps, (i - s) * ps, true)
                    .map_err(uf("UFFDIO_WRITEPROTECT of guest RAM"))?;
            }
        }
        Ok(set)
    }

    /// Turns tracking off: stops the fault thread, then unregisters (lifting every protection
    /// and waking any writer that faulted meanwhile).
    pub fn stop(mut self) -> Result<(), UffdWpError> {
        self.stop.store(true, std::sync::atomic::Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        unregister(&self.uffd, &self.regions)
    }
}

impl Drop for UffdWp {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Takes write faults: records the page, lifts its protection (which wakes the writer).
fn wp_fault_loop(
    uffd: &Uffd,
    dirty: &proto::bitmap::AtomicBitmap,
    stop: &std::sync::atomic::AtomicBool,
    regions: &[(u64, u64, u64)],
) {
    let ps = u64::from(PAGE_SIZE);
    let mut faults: Vec<Fault> = Vec::with_capacity(Uffd::READ_BATCH);
    while !stop.load(std::sync::atomic::Ordering::Acquire) {
        if !uffd.wait_readable(50) {
            continue;
        }
        faults.clear();
        if uffd.read_fault_events(&mut faults).is_err() {
            continue;
        }
        for f in &faults {
            if !f.write_protect {
                continue;
            }
            let addr = f.address & !(ps - 1);
            if let Some(&(host, _, first)) =
                regions.iter().find(|&&(h, l, _)| addr >= h && addr < h + l)
            {
                dirty.set(first + (addr - host) / ps);
            }
            if let Err(e) = uffd.write_protect(addr, ps, false) {
                log::warn!("lifting write protection at {addr:#x}: {e}");
            }
        }
    }
}
