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

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use thiserror::Error;

use super::pageset::PageSet;
use crate::memory::{GuestRam, PAGE_SIZE};

const UFFD_API: u64 = 0xAA;
const FEATURE_PAGEFAULT_FLAG_WP: u64 = 1 << 0;
const FEATURE_WP_UNPOPULATED: u64 = 1 << 13;
const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
const UFFD_PAGEFAULT_FLAG_WP: u64 = 1 << 1;
const FEATURE_WP_ASYNC: u64 = 1 << 15;
const REGISTER_MODE_WP: u64 = 1 << 1;
const WRITEPROTECT_MODE_WP: u64 = 1 << 0;

const fn iowr(nr: u64, size: usize) -> u64 {
    (3 << 30) | ((size as u64) << 16) | (0xAA << 8) | nr
}
const UFFDIO_API: u64 = iowr(0x3F, 24);
const UFFDIO_REGISTER: u64 = iowr(0x00, 32);
const UFFDIO_UNREGISTER: u64 = (2 << 30) | (16 << 16) | (0xAA << 8) | 0x01;
const UFFDIO_WRITEPROTECT: u64 = iowr(0x06, 24);

/// `_IOWR('f', 16, struct pm_scan_arg)`.
const PAGEMAP_SCAN: u64 = (3 << 30) | (96 << 16) | (0x66 << 8) | 16;
const PM_SCAN_WP_MATCHING: u64 = 1 << 0;
const PM_SCAN_CHECK_WPASYNC: u64 = 1 << 1;
const PAGE_IS_WRITTEN: u64 = 1 << 1;

#[repr(C)]
#[derive(Default)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default, Clone, Copy)]
struct UffdioRange {
    start: u64,
    len: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioWriteprotect {
    range: UffdioRange,
    mode: u64,
}

#[repr(C)]
#[derive(Default)]
struct PmScanArg {
    size: u64,
    flags: u64,
    start: u64,
    end: u64,
    walk_end: u64,
    vec: u64,
    vec_len: u64,
    max_pages: u64,
    category_inverted: u64,
    category_mask: u64,
    category_anyof_mask: u64,
    return_mask: u64,
}

#[repr(C)]
#[derive(Default, Clone, Copy)]
struct PageRegion {
    start: u64,
    end: u64,
    categories: u64,
}

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
}

fn os(what: &'static str) -> impl FnOnce(io::Error) -> UffdWpError {
    move |source| UffdWpError::Os { what, source }
}

/// Issues `req` with `arg` on `fd`.
///
/// # Safety
/// `arg` must be the structure `req` expects.
unsafe fn ioctl<T>(fd: i32, req: u64, arg: &mut T) -> io::Result<i64> {
    // SAFETY: the caller passes the structure this request reads and writes; it lives across
    // the call.
    let r = unsafe { libc::ioctl(fd, req as _, arg as *mut T) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(i64::from(r))
    }
}

/// Write-protect tracking switched on for a VM's RAM.
#[derive(Debug)]
pub struct UffdWpAsync {
    uffd: OwnedFd,
    pagemap: File,
    /// `(host address, bytes, first flat page)`.
    regions: Vec<(u64, u64, u64)>,
    pages: u64,
}

impl UffdWpAsync {
    /// Whether this kernel offers the features (for gates and defaults).
    pub fn available() -> Result<(), UffdWpError> {
        let (_fd, features) = open_uffd(0)?;
        if features & FEATURE_WP_ASYNC == 0 {
            return Err(UffdWpError::Unsupported("UFFD_FEATURE_WP_ASYNC"));
        }
        if features & FEATURE_WP_UNPOPULATED == 0 {
            return Err(UffdWpError::Unsupported("UFFD_FEATURE_WP_UNPOPULATED"));
        }
        Ok(())
    }

    /// Registers every RAM region for asynchronous write protection and protects it all.
    pub fn start(ram: &GuestRam) -> Result<UffdWpAsync, UffdWpError> {
        Self::available()?;
        let (uffd, _) = open_uffd(FEATURE_WP_ASYNC | FEATURE_WP_UNPOPULATED)?;
        let (regions, pages) = ram_regions(ram);
        register_and_protect(&uffd, &regions)?;
        Ok(UffdWpAsync {
            uffd,
            pagemap: File::open("/proc/self/pagemap").map_err(os("opening /proc/self/pagemap"))?,
            regions,
            pages,
        })
    }

    /// The pages written since `start` or the previous `collect` (protected again).
    pub fn collect(&self) -> Result<PageSet, UffdWpError> {
        let ps = u64::from(PAGE_SIZE);
        let mut set = PageSet::new(self.pages);
        let mut vec = vec![PageRegion::default(); 512];
        for &(host, len, first) in &self.regions {
            let end = host + len;
            let mut at = host;
            while at < end {
                let mut arg = PmScanArg {
                    size: std::mem::size_of::<PmScanArg>() as u64,
                    flags: PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC,
                    start: at,
                    end,
                    vec: vec.as_mut_ptr() as u64,
                    vec_len: vec.len() as u64,
                    category_mask: PAGE_IS_WRITTEN,
                    return_mask: PAGE_IS_WRITTEN,
                    ..Default::default()
                };
                // SAFETY: PAGEMAP_SCAN takes a pm_scan_arg whose `vec` points to `vec_len`
                // page_region structs we own; it writes at most that many.
                let n = unsafe { ioctl(self.pagemap.as_raw_fd(), PAGEMAP_SCAN, &mut arg) }
                    .map_err(os("PAGEMAP_SCAN of guest RAM"))?;
                for r in &vec[..(n as usize).min(vec.len())] {
                    for p in (r.start - host) / ps..(r.end - host) / ps {
                        set.insert(first + p);
                    }
                }
                if arg.walk_end <= at {
                    break;
                }
                at = arg.walk_end;
            }
        }
        Ok(set)
    }

    /// Turns tracking off (unregisters, which lifts every protection).
    pub fn stop(self) -> Result<(), UffdWpError> {
        for &(host, len, _) in &self.regions {
            let mut r = UffdioRange { start: host, len };
            // SAFETY: UFFDIO_UNREGISTER takes a uffdio_range.
            unsafe { ioctl(self.uffd.as_raw_fd(), UFFDIO_UNREGISTER, &mut r) }
                .map_err(os("UFFDIO_UNREGISTER of guest RAM"))?;
        }
        Ok(())
    }
}

/// Registers `regions` (host address, bytes) of `uffd` for write-protect faults and protects
/// them all.
fn register_and_protect(uffd: &OwnedFd, regions: &[(u64, u64, u64)]) -> Result<(), UffdWpError> {
    for &(host, len, _) in regions {
        let mut reg = UffdioRegister {
            range: UffdioRange { start: host, len },
            mode: REGISTER_MODE_WP,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_REGISTER takes a uffdio_register.
        unsafe { ioctl(uffd.as_raw_fd(), UFFDIO_REGISTER, &mut reg) }
            .map_err(os("UFFDIO_REGISTER (write-protect mode) of guest RAM"))?;
    }
    for &(host, len, _) in regions {
        protect(uffd, host, len, true)?;
    }
    Ok(())
}

/// Write-protects (or lifts the protection of, waking the writers) `[addr, addr + len)`.
fn protect(uffd: &OwnedFd, addr: u64, len: u64, on: bool) -> Result<(), UffdWpError> {
    let mut wp = UffdioWriteprotect {
        range: UffdioRange { start: addr, len },
        mode: if on { WRITEPROTECT_MODE_WP } else { 0 },
    };
    // SAFETY: UFFDIO_WRITEPROTECT takes a uffdio_writeprotect.
    unsafe { ioctl(uffd.as_raw_fd(), UFFDIO_WRITEPROTECT, &mut wp) }
        .map(|_| ())
        .map_err(os("UFFDIO_WRITEPROTECT of guest RAM"))
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
    uffd: std::sync::Arc<OwnedFd>,
    regions: Vec<(u64, u64, u64)>,
    dirty: std::sync::Arc<proto::bitmap::AtomicBitmap>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    pages: u64,
}

impl UffdWp {
    /// Whether this kernel offers write-protect faults on anonymous memory.
    pub fn available() -> Result<(), UffdWpError> {
        let (_fd, features) = open_uffd(0)?;
        if features & FEATURE_PAGEFAULT_FLAG_WP == 0 {
            return Err(UffdWpError::Unsupported("UFFD_FEATURE_PAGEFAULT_FLAG_WP"));
        }
        if features & FEATURE_WP_UNPOPULATED == 0 {
            return Err(UffdWpError::Unsupported("UFFD_FEATURE_WP_UNPOPULATED"));
        }
        Ok(())
    }

    /// Registers and protects guest RAM and starts the fault thread.
    pub fn start(ram: &GuestRam) -> Result<UffdWp, UffdWpError> {
        Self::available()?;
        let (uffd, _) = open_uffd(FEATURE_PAGEFAULT_FLAG_WP | FEATURE_WP_UNPOPULATED)?;
        let (regions, pages) = ram_regions(ram);
        register_and_protect(&uffd, &regions)?;
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
                protect(&self.uffd, host + s * ps, (i - s) * ps, true)?;
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
        for &(host, len, _) in &self.regions {
            let mut range = UffdioRange { start: host, len };
            // SAFETY: UFFDIO_UNREGISTER takes a uffdio_range.
            unsafe { ioctl(self.uffd.as_raw_fd(), UFFDIO_UNREGISTER, &mut range) }
                .map_err(os("UFFDIO_UNREGISTER of guest RAM"))?;
        }
        Ok(())
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
    uffd: &OwnedFd,
    dirty: &proto::bitmap::AtomicBitmap,
    stop: &std::sync::atomic::AtomicBool,
    regions: &[(u64, u64, u64)],
) {
    let ps = u64::from(PAGE_SIZE);
    let mut msgs = [[0u8; 32]; 64];
    while !stop.load(std::sync::atomic::Ordering::Acquire) {
        let mut p = libc::pollfd {
            fd: uffd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: polling one pollfd we own.
        if unsafe { libc::poll(&mut p, 1, 50) } <= 0 {
            continue;
        }
        // SAFETY: reading into 64 uffd_msg slots of 32 bytes we own.
        let r = unsafe {
            libc::read(
                uffd.as_raw_fd(),
                msgs.as_mut_ptr().cast(),
                std::mem::size_of_val(&msgs),
            )
        };
        if r <= 0 {
            continue;
        }
        for m in &msgs[..r as usize / 32] {
            if m[0] != UFFD_EVENT_PAGEFAULT {
                continue;
            }
            let flags = u64::from_ne_bytes(m[8..16].try_into().unwrap_or([0; 8]));
            let addr = u64::from_ne_bytes(m[16..24].try_into().unwrap_or([0; 8])) & !(ps - 1);
            if flags & UFFD_PAGEFAULT_FLAG_WP == 0 {
                continue;
            }
            if let Some(&(host, _, first)) =
                regions.iter().find(|&&(h, l, _)| addr >= h && addr < h + l)
            {
                dirty.set(first + (addr - host) / ps);
            }
            if let Err(e) = protect(uffd, addr, ps, false) {
                log::warn!("lifting write protection at {addr:#x}: {e}");
            }
        }
    }
}

/// Opens a userfaultfd and negotiates `features`; returns it and what the kernel offers.
fn open_uffd(features: u64) -> Result<(OwnedFd, u64), UffdWpError> {
    let flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
    // SAFETY: userfaultfd(2) takes only flags and returns a new fd or -1.
    let r = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) };
    if r < 0 {
        return Err(UffdWpError::Os {
            what: "userfaultfd(2)",
            source: io::Error::last_os_error(),
        });
    }
    // SAFETY: a fresh descriptor nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(r as i32) };
    let mut api = UffdioApi {
        api: UFFD_API,
        features,
        ioctls: 0,
    };
    // SAFETY: UFFDIO_API takes a uffdio_api.
    unsafe { ioctl(fd.as_raw_fd(), UFFDIO_API, &mut api) }.map_err(os("UFFDIO_API"))?;
    Ok((fd, api.features))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_the_kernel_headers() {
        // values from linux/userfaultfd.h and linux/fs.h on x86_64
        assert_eq!(UFFDIO_API, 0xc018_aa3f);
        assert_eq!(UFFDIO_REGISTER, 0xc020_aa00);
        assert_eq!(UFFDIO_UNREGISTER, 0x8010_aa01);
        assert_eq!(UFFDIO_WRITEPROTECT, 0xc018_aa06);
        assert_eq!(PAGEMAP_SCAN, 0xc060_6610);
        assert_eq!(std::mem::size_of::<PmScanArg>(), 96);
        assert_eq!(std::mem::size_of::<PageRegion>(), 24);
    }
}
