//! userfaultfd, wrapped: open (kernel-mode faults included, so a KVM vCPU's accesses are
//! reported), register, copy / zero-page / wake, read fault events. All of the pager's unsafe
//! kernel calls are here, and the EEXIST / EAGAIN handling of installs lives in exactly one
//! function, [`Uffd::install`].
//!
//! The structures and ioctl numbers are those of `<linux/userfaultfd.h>` (the `libc` crate has
//! none of them). The `userfaultfd` crate was not used: its copy result folds a negative errno
//! into the byte count, and later issues need WP_ASYNC, PAGEMAP_SCAN and MOVE, which it lacks.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use thiserror::Error;

const UFFD_API: u64 = 0xAA;
const UFFDIO: u64 = 0xAA;

const fn iowr(nr: u64, size: usize) -> u64 {
    (3 << 30) | ((size as u64) << 16) | (UFFDIO << 8) | nr
}
const fn ior(nr: u64, size: usize) -> u64 {
    (2 << 30) | ((size as u64) << 16) | (UFFDIO << 8) | nr
}

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
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioZeropage {
    range: UffdioRange,
    mode: u64,
    zeropage: i64,
}

const UFFDIO_API: u64 = iowr(0x3F, std::mem::size_of::<UffdioApi>());
const UFFDIO_REGISTER: u64 = iowr(0x00, std::mem::size_of::<UffdioRegister>());
const UFFDIO_UNREGISTER: u64 = ior(0x01, std::mem::size_of::<UffdioRange>());
const UFFDIO_WAKE: u64 = ior(0x02, std::mem::size_of::<UffdioRange>());
const UFFDIO_COPY: u64 = iowr(0x03, std::mem::size_of::<UffdioCopy>());
const UFFDIO_ZEROPAGE: u64 = iowr(0x04, std::mem::size_of::<UffdioZeropage>());
/// `_IO(0xAA, 0)` on /dev/userfaultfd.
const USERFAULTFD_IOC_NEW: u64 = UFFDIO << 8;

const UFFDIO_REGISTER_MODE_MISSING: u64 = 1;
const UFFDIO_COPY_MODE_DONTWAKE: u64 = 1;
const UFFD_EVENT_PAGEFAULT: u8 = 0x12;

/// Kernel feature bits (`UFFD_FEATURE_*`) reported by [`Uffd::features`].
pub mod feature {
    /// Write-protect faults (kernel ≥ 5.7).
    pub const PAGEFAULT_FLAG_WP: u64 = 1 << 0;
    /// Missing-page handling on shmem.
    pub const MISSING_SHMEM: u64 = 1 << 5;
    /// Thread ids in fault messages.
    pub const THREAD_ID: u64 = 1 << 8;
    /// Minor faults on shmem.
    pub const MINOR_SHMEM: u64 = 1 << 10;
    /// UFFDIO_POISON.
    pub const POISON: u64 = 1 << 14;
    /// Asynchronous write-protect (kernel ≥ 6.7).
    pub const WP_ASYNC: u64 = 1 << 15;
    /// UFFDIO_MOVE (kernel ≥ 6.8).
    pub const MOVE: u64 = 1 << 16;
}

/// A userfaultfd call failed.
#[derive(Debug, Error)]
pub enum UffdError {
    /// Neither the syscall nor /dev/userfaultfd gave a descriptor.
    #[error("cannot create a userfaultfd (syscall: {syscall}; /dev/userfaultfd: {dev})")]
    Open {
        /// The syscall's error.
        syscall: io::Error,
        /// The device's error.
        dev: io::Error,
    },
    /// UFFDIO_API failed.
    #[error("UFFDIO_API handshake failed")]
    Api(#[source] io::Error),
    /// An ioctl on a range failed.
    #[error("{op} of {len:#x} bytes at {addr:#x} failed")]
    Range {
        /// Which ioctl.
        op: &'static str,
        /// Start address.
        addr: u64,
        /// Length.
        len: u64,
        /// errno.
        #[source]
        source: io::Error,
    },
    /// Reading fault events failed.
    #[error("reading userfaultfd events failed")]
    Read(#[source] io::Error),
    /// An event of a kind we never asked for.
    #[error("unexpected userfaultfd event {0:#x}")]
    UnexpectedEvent(u8),
}

/// Whether userfaultfd can be used here, and if not why (for `SKIPPED:` lines).
pub fn probe() -> Result<u64, UffdError> {
    Uffd::new().map(|u| u.features())
}

/// An open, API-negotiated userfaultfd (non-blocking, close-on-exec).
#[derive(Debug)]
pub struct Uffd {
    fd: OwnedFd,
    features: u64,
}

/// What an install did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Installed {
    /// Pages this call made present.
    pub new_pages: u64,
    /// Pages that were already present (someone else installed them first).
    pub existing_pages: u64,
}

impl Uffd {
    /// Opens a userfaultfd that reports kernel-mode faults too (no `UFFD_USER_MODE_ONLY`): tries
    /// the syscall, then /dev/userfaultfd.
    pub fn new() -> Result<Uffd, UffdError> {
        let flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
        // SAFETY: userfaultfd(2) takes only flags and returns a new fd or -1.
        let r = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) };
        let raw = if r >= 0 {
            r as RawFd
        } else {
            let syscall = io::Error::last_os_error();
            match open_dev(flags) {
                Ok(fd) => fd,
                Err(dev) => return Err(UffdError::Open { syscall, dev }),
            }
        };
        // SAFETY: `raw` is a fresh descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let mut api = UffdioApi {
            api: UFFD_API,
            ..Default::default()
        };
        // SAFETY: UFFDIO_API with a pointer to a properly laid-out uffdio_api that lives across
        // the call.
        let r = unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_API as _, &mut api) };
        if r < 0 {
            return Err(UffdError::Api(io::Error::last_os_error()));
        }
        Ok(Uffd {
            fd,
            features: api.features,
        })
    }

    /// Features the kernel offers (`feature::*` bits).
    pub fn features(&self) -> u64 {
        self.features
    }

    /// The descriptor (to poll on).
    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    fn range_ioctl(
        &self,
        op: &'static str,
        req: u64,
        addr: u64,
        len: u64,
    ) -> Result<(), UffdError> {
        let mut range = UffdioRange { start: addr, len };
        // SAFETY: the request takes a uffdio_range that lives across the call; the kernel
        // validates the range itself.
        let r = unsafe { libc::ioctl(self.fd.as_raw_fd(), req as _, &mut range) };
        if r < 0 {
            return Err(UffdError::Range {
                op,
                addr,
                len,
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// Registers `[addr, addr + len)` for missing-page faults.
    pub fn register_missing(&self, addr: u64, len: u64) -> Result<(), UffdError> {
        let mut reg = UffdioRegister {
            range: UffdioRange { start: addr, len },
            mode: UFFDIO_REGISTER_MODE_MISSING,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_REGISTER with a uffdio_register that lives across the call.
        let r = unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_REGISTER as _, &mut reg) };
        if r < 0 {
            return Err(UffdError::Range {
                op: "UFFDIO_REGISTER",
                addr,
                len,
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// Unregisters a range (faults there become ordinary again).
    pub fn unregister(&self, addr: u64, len: u64) -> Result<(), UffdError> {
        self.range_ioctl("UFFDIO_UNREGISTER", UFFDIO_UNREGISTER, addr, len)
    }

    /// Wakes threads waiting on faults in a range.
    pub fn wake(&self, addr: u64, len: u64) -> Result<(), UffdError> {
        self.range_ioctl("UFFDIO_WAKE", UFFDIO_WAKE, addr, len)
    }

    /// One UFFDIO_COPY (`src` = Some) or UFFDIO_ZEROPAGE (`src` = None) call. Returns bytes
    /// done and the errno, if any (the kernel may do part of a range, then fail).
    fn raw_install(
        &self,
        dst: u64,
        src: Option<*const u8>,
        len: u64,
        wake: bool,
    ) -> (u64, Option<i32>) {
        let mode = if wake { 0 } else { UFFDIO_COPY_MODE_DONTWAKE };
        let (r, done) = match src {
            Some(src) => {
                let mut c = UffdioCopy {
                    dst,
                    src: src as u64,
                    len,
                    mode,
                    copy: 0,
                };
                // SAFETY: UFFDIO_COPY reads `len` bytes at `src` (the caller guarantees they
                // are readable) and writes only into our registered range.
                let r = unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_COPY as _, &mut c) };
                (r, c.copy)
            }
            None => {
                let mut z = UffdioZeropage {
                    range: UffdioRange { start: dst, len },
                    mode,
                    zeropage: 0,
                };
                // SAFETY: UFFDIO_ZEROPAGE maps zero pages into our registered range only.
                let r = unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_ZEROPAGE as _, &mut z) };
                (r, z.zeropage)
            }
        };
        if r >= 0 {
            return (len, None);
        }
        let errno = io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EIO);
        // `done` is bytes copied before the failure, or a negative errno: never a count then.
        (u64::try_from(done).unwrap_or(0).min(len), Some(errno))
    }

    /// Installs `len` bytes at `dst` (a multiple of `page_size`): copied from `src`, or zero
    /// pages when `src` is None. Pages already present are skipped (EEXIST), interrupted calls
    /// retried (EAGAIN); other errors are returned. Waiters on the range are woken.
    ///
    /// # Safety
    /// `src`, when given, must be readable for `len` bytes.
    pub unsafe fn install(
        &self,
        dst: u64,
        src: Option<*const u8>,
        len: u64,
        page_size: u64,
    ) -> Result<Installed, UffdError> {
        let mut out = Installed::default();
        let mut off = 0u64;
        let mut saw_existing = false;
        while off < len {
            let s = src.map(|p| p.wrapping_add(off as usize));
            let (done, err) = self.raw_install(dst + off, s, len - off, true);
            let done = done - done % page_size;
            out.new_pages += done / page_size;
            off += done;
            match err {
                None => {}
                Some(libc::EAGAIN) => {}
                Some(libc::EEXIST) => {
                    // the page at `off` is present already: skip it
                    out.existing_pages += 1;
                    off += page_size;
                    saw_existing = true;
                }
                Some(e) => {
                    return Err(UffdError::Range {
                        op: if src.is_some() {
                            "UFFDIO_COPY"
                        } else {
                            "UFFDIO_ZEROPAGE"
                        },
                        addr: dst + off,
                        len: len - off,
                        source: io::Error::from_raw_os_error(e),
                    })
                }
            }
        }
        if saw_existing {
            // a failed install wakes nobody; make sure no waiter on the range sleeps on
            let _ = self.wake(dst, len);
        }
        Ok(out)
    }

    /// Fault events read per call.
    pub const READ_BATCH: usize = 64;

    /// Reads pending fault addresses into `out` (non-blocking). Returns how many; 0 if none.
    /// Fewer than [`Uffd::READ_BATCH`] means the queue was drained.
    pub fn read_faults(&self, out: &mut Vec<u64>) -> Result<usize, UffdError> {
        const N: usize = Uffd::READ_BATCH;
        let mut msgs = [[0u8; 32]; N];
        // SAFETY: reading into a buffer of N 32-byte uffd_msg slots we own.
        let r = unsafe {
            libc::read(
                self.fd.as_raw_fd(),
                msgs.as_mut_ptr().cast(),
                std::mem::size_of_val(&msgs),
            )
        };
        if r < 0 {
            let e = io::Error::last_os_error();
            return match e.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(0),
                _ => Err(UffdError::Read(e)),
            };
        }
        let n = r as usize / 32;
        for m in &msgs[..n] {
            if m[0] != UFFD_EVENT_PAGEFAULT {
                return Err(UffdError::UnexpectedEvent(m[0]));
            }
            // pagefault: u64 flags at 8, u64 address at 16
            let mut a = [0u8; 8];
            a.copy_from_slice(&m[16..24]);
            out.push(u64::from_ne_bytes(a));
        }
        Ok(n)
    }
}

fn open_dev(flags: i32) -> io::Result<RawFd> {
    let path = c"/dev/userfaultfd";
    // SAFETY: opening a device node by a NUL-terminated path.
    let dev = unsafe { libc::open(path.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
    if dev < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `dev` is ours; wrapping it closes it on every path.
    let dev = unsafe { OwnedFd::from_raw_fd(dev) };
    // SAFETY: USERFAULTFD_IOC_NEW takes the new fd's flags by value.
    let fd = unsafe { libc::ioctl(dev.as_raw_fd(), USERFAULTFD_IOC_NEW as _, flags) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_the_kernel_headers() {
        assert_eq!(UFFDIO_API, 0xc018_aa3f);
        assert_eq!(UFFDIO_REGISTER, 0xc020_aa00);
        assert_eq!(UFFDIO_UNREGISTER, 0x8010_aa01);
        assert_eq!(UFFDIO_WAKE, 0x8010_aa02);
        assert_eq!(UFFDIO_COPY, 0xc028_aa03);
        assert_eq!(UFFDIO_ZEROPAGE, 0xc020_aa04);
    }
}
