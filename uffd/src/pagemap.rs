//! `PAGEMAP_SCAN` on /proc/self/pagemap (Linux ≥ 6.7): the pages of a range written since they
//! were write-protected by a userfaultfd in `WP_ASYNC` mode, protected again in the same call.
//!
//! The one call here, `ioctl(PAGEMAP_SCAN)`, stays on raw `libc`: nix 0.32 has no pagemap API,
//! and its `ioctl_*!` macros only generate an `unsafe fn` around the same `libc::ioctl`.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

use crate::abi::*;
use crate::UffdError;

/// This process's pagemap, open for scans.
#[derive(Debug)]
pub struct Pagemap(File);

impl Pagemap {
    /// Opens /proc/self/pagemap.
    pub fn open() -> Result<Pagemap, UffdError> {
        File::open("/proc/self/pagemap")
            .map(Pagemap)
            .map_err(UffdError::Pagemap)
    }

    /// Calls `each(start, end)` for every run of written pages in `[start, end)` and protects
    /// them again (`PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC`).
    pub fn take_written(
        &self,
        start: u64,
        end: u64,
        mut each: impl FnMut(u64, u64),
    ) -> Result<(), UffdError> {
        let mut vec = vec![
            page_region {
                start: 0,
                end: 0,
                categories: 0,
            };
            512
        ];
        let mut at = start;
        while at < end {
            let mut arg = pm_scan_arg {
                size: std::mem::size_of::<pm_scan_arg>() as u64,
                flags: PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC,
                start: at,
                end,
                walk_end: 0,
                vec: vec.as_mut_ptr() as u64,
                vec_len: vec.len() as u64,
                max_pages: 0,
                category_inverted: 0,
                category_mask: PAGE_IS_WRITTEN,
                category_anyof_mask: 0,
                return_mask: PAGE_IS_WRITTEN,
            };
            // SAFETY: PAGEMAP_SCAN takes a pm_scan_arg whose `vec` points to `vec_len`
            // page_region structs we own; it writes at most that many.
            let n = unsafe { libc::ioctl(self.0.as_raw_fd(), PAGEMAP_SCAN as _, &mut arg) };
            if n < 0 {
                return Err(UffdError::Range {
                    op: "PAGEMAP_SCAN",
                    addr: at,
                    len: end - at,
                    source: io::Error::last_os_error(),
                });
            }
            for r in &vec[..(n as usize).min(vec.len())] {
                each(r.start, r.end);
            }
            if arg.walk_end <= at {
                break;
            }
            at = arg.walk_end;
        }
        Ok(())
    }
}
