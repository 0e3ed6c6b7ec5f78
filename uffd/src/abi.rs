//! The kernel ABI this crate uses, from `linux-raw-sys` (generated from the kernel's headers),
//! in the types the ioctls take. Hand-written, because `linux-raw-sys` lacks them: the
//! `PAGEMAP_SCAN` and `USERFAULTFD_IOC_NEW` ioctl numbers and `UFFDIO_WRITEPROTECT_MODE_WP` (the
//! numbers checked by a test against the values the kernel headers give).

use linux_raw_sys::general as g;
use linux_raw_sys::ioctl as io;

pub(crate) use g::{page_region, pm_scan_arg, uffdio_api, uffdio_copy, uffdio_range};
pub(crate) use g::{uffdio_register, uffdio_writeprotect, uffdio_zeropage};

pub(crate) const UFFD_API: u64 = g::UFFD_API as u64;
pub(crate) const UFFDIO_API: u64 = io::UFFDIO_API as u64;
pub(crate) const UFFDIO_REGISTER: u64 = io::UFFDIO_REGISTER as u64;
pub(crate) const UFFDIO_UNREGISTER: u64 = io::UFFDIO_UNREGISTER as u64;
pub(crate) const UFFDIO_WAKE: u64 = io::UFFDIO_WAKE as u64;
pub(crate) const UFFDIO_COPY: u64 = io::UFFDIO_COPY as u64;
pub(crate) const UFFDIO_ZEROPAGE: u64 = io::UFFDIO_ZEROPAGE as u64;
pub(crate) const UFFDIO_WRITEPROTECT: u64 = io::UFFDIO_WRITEPROTECT as u64;

pub(crate) const UFFDIO_REGISTER_MODE_MISSING: u64 = g::UFFDIO_REGISTER_MODE_MISSING as u64;
pub(crate) const UFFDIO_REGISTER_MODE_WP: u64 = g::UFFDIO_REGISTER_MODE_WP as u64;
pub(crate) const UFFDIO_COPY_MODE_DONTWAKE: u64 = g::UFFDIO_COPY_MODE_DONTWAKE as u64;
/// Hand-written: `UFFDIO_WRITEPROTECT_MODE_WP` (`<linux/userfaultfd.h>`, a macro the generator
/// left out).
pub(crate) const UFFDIO_WRITEPROTECT_MODE_WP: u64 = 1 << 0;

pub(crate) const UFFD_EVENT_PAGEFAULT: u8 = g::UFFD_EVENT_PAGEFAULT as u8;
pub(crate) const UFFD_PAGEFAULT_FLAG_WP: u64 = g::UFFD_PAGEFAULT_FLAG_WP as u64;

/// One `struct uffd_msg` as read(2) returns it, and where a page fault's flags and address are
/// in it (the message is a packed struct around a union: read as bytes at these offsets).
pub(crate) const MSG_LEN: usize = std::mem::size_of::<g::uffd_msg>();
pub(crate) const MSG_FAULT_FLAGS: usize = std::mem::offset_of!(g::uffd_msg, arg)
    + std::mem::offset_of!(g::uffd_msg__bindgen_ty_1__bindgen_ty_1, flags);
pub(crate) const MSG_FAULT_ADDRESS: usize = std::mem::offset_of!(g::uffd_msg, arg)
    + std::mem::offset_of!(g::uffd_msg__bindgen_ty_1__bindgen_ty_1, address);

pub(crate) const PM_SCAN_WP_MATCHING: u64 = g::PM_SCAN_WP_MATCHING as u64;
pub(crate) const PM_SCAN_CHECK_WPASYNC: u64 = g::PM_SCAN_CHECK_WPASYNC as u64;
pub(crate) const PAGE_IS_WRITTEN: u64 = g::PAGE_IS_WRITTEN as u64;

/// Hand-written: `_IOWR('f', 16, struct pm_scan_arg)` (`<linux/fs.h>`, Linux ≥ 6.7).
pub(crate) const PAGEMAP_SCAN: u64 =
    (3 << 30) | ((std::mem::size_of::<pm_scan_arg>() as u64) << 16) | (0x66 << 8) | 16;
/// Hand-written: `_IO(USERFAULTFD_IOC, 0)` on /dev/userfaultfd (`<linux/userfaultfd.h>`).
pub(crate) const USERFAULTFD_IOC_NEW: u64 = (g::USERFAULTFD_IOC as u64) << 8;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_and_layouts_match_the_kernel_headers() {
        // values from linux/userfaultfd.h and linux/fs.h on x86_64
        assert_eq!(UFFDIO_API, 0xc018_aa3f);
        assert_eq!(UFFDIO_REGISTER, 0xc020_aa00);
        assert_eq!(UFFDIO_UNREGISTER, 0x8010_aa01);
        assert_eq!(UFFDIO_WAKE, 0x8010_aa02);
        assert_eq!(UFFDIO_COPY, 0xc028_aa03);
        assert_eq!(UFFDIO_ZEROPAGE, 0xc020_aa04);
        assert_eq!(UFFDIO_WRITEPROTECT, 0xc018_aa06);
        assert_eq!(PAGEMAP_SCAN, 0xc060_6610);
        assert_eq!(USERFAULTFD_IOC_NEW, 0xaa00);
        assert_eq!(std::mem::size_of::<pm_scan_arg>(), 96);
        assert_eq!(std::mem::size_of::<page_region>(), 24);
        assert_eq!((MSG_LEN, MSG_FAULT_FLAGS, MSG_FAULT_ADDRESS), (32, 8, 16));
    }
}
