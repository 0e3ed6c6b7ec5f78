//! The workspace's one userfaultfd binding: open (kernel-mode faults included, so a KVM vCPU's
//! accesses are reported), feature negotiation, register (missing pages, write protection),
//! copy / zero page / wake, write-protect, fault events, and `PAGEMAP_SCAN` ([`pagemap`]) for
//! asynchronous write protection. Every unsafe kernel call of the pager and of the VMM's
//! userfaultfd dirty tracking is here, and the EEXIST / EAGAIN handling of installs lives in
//! exactly one function, [`Uffd::install`].
//!
//! The kernel ABI (structures, ioctl numbers, feature bits) comes from `linux-raw-sys`
//! (`src/abi.rs` names the two numbers it lacks). The `userfaultfd` crate was not used: its copy
//! result folds a negative errno into the byte count, and it lacks WP_ASYNC, PAGEMAP_SCAN and
//! MOVE; `userfaultfd-sys` needs bindgen and libclang to build.
//!
//! Plain syscalls go through nix or std: `poll` ([`Uffd::wait_readable`]) through `nix::poll`,
//! reading fault events through `nix::unistd::read`, opening /dev/userfaultfd through
//! `std::fs::OpenOptions`. Two kinds of call stay on raw `libc`, because nix 0.32 has no
//! wrapper for them:
//! - `syscall(SYS_userfaultfd, flags)`: nix has no userfaultfd(2) (and libc no function for it);
//! - every `ioctl`: UFFDIO_API, UFFDIO_REGISTER, UFFDIO_UNREGISTER, UFFDIO_WAKE,
//!   UFFDIO_WRITEPROTECT, UFFDIO_COPY, UFFDIO_ZEROPAGE, USERFAULTFD_IOC_NEW here and
//!   PAGEMAP_SCAN in [`pagemap`]. nix has no userfaultfd or pagemap API, and its `ioctl_*!`
//!   macros only generate `unsafe fn`s around the same `libc::ioctl`, so they would add no
//!   safety: each call keeps its own `SAFETY:` comment on the structure it passes.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use thiserror::Error;

mod abi;
pub mod pagemap;

use abi::*;

/// Kernel feature bits (`UFFD_FEATURE_*`) reported by [`Uffd::features`].
pub mod feature {
    use linux_raw_sys::general as g;

    /// Write-protect faults (kernel ≥ 5.7).
    pub const PAGEFAULT_FLAG_WP: u64 = g::UFFD_FEATURE_PAGEFAULT_FLAG_WP as u64;
    /// Missing-page handling on shmem.
    pub const MISSING_SHMEM: u64 = g::UFFD_FEATURE_MISSING_SHMEM as u64;
    /// Thread ids in fault messages.
    pub const THREAD_ID: u64 = g::UFFD_FEATURE_THREAD_ID as u64;
    /// Minor faults on shmem.
    pub const MINOR_SHMEM: u64 = g::UFFD_FEATURE_MINOR_SHMEM as u64;
    /// Write protection of pages never touched (kernel ≥ 6.4).
    pub const WP_UNPOPULATED: u64 = g::UFFD_FEATURE_WP_UNPOPULATED as u64;
    /// UFFDIO_POISON.
    pub const POISON: u64 = g::UFFD_FEATURE_POISON as u64;
    /// Asynchronous write-protect (kernel ≥ 6.7).
    pub const WP_ASYNC: u64 = g::UFFD_FEATURE_WP_ASYNC as u64;
    /// UFFDIO_MOVE (kernel ≥ 6.8).
    pub const MOVE: u64 = g::UFFD_FEATURE_MOVE as u64;
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
    /// /proc/self/pagemap could not be opened (for `PAGEMAP_SCAN`).
    #[error("cannot open /proc/self/pagemap")]
    Pagemap(#[source] io::Error),
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
        Uffd::with_features(0)
    }

    /// Like [`Uffd::new`], asking the kernel for `features` (`feature::*` bits) in the API
    /// handshake; a kernel without one of them refuses it ([`UffdError::Api`]): check
    /// [`probe`] first for a clear reason.
    pub fn with_features(features: u64) -> Result<Uffd, UffdError> {
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
        let mut api = uffdio_api {
            api: UFFD_API,
            features,
            ioctls: 0,
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
        let mut range = uffdio_range { start: addr, len };
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
        self.register(addr, len, UFFDIO_REGISTER_MODE_MISSING)
    }

    /// Registers `[addr, addr + len)` for write-protect faults (the pages are not protected
    /// yet: [`Uffd::write_protect`]).
    pub fn register_write_protect(&self, addr: u64, len: u64) -> Result<(), UffdError> {
        self.register(addr, len, UFFDIO_REGISTER_MODE_WP)
    }

    /// Write-protects `[addr, addr + len)` (`on`), or lifts the protection and wakes the
    /// writers waiting there.
    pub fn write_protect(&self, addr: u64, len: u64, on: bool) -> Result<(), UffdError> {
        let mut wp = uffdio_writeprotect {
            range: uffdio_range { start: addr, len },
            mode: if on { UFFDIO_WRITEPROTECT_MODE_WP } else { 0 },
        };
        // SAFETY: UFFDIO_WRITEPROTECT with a uffdio_writeprotect that lives across the call.
        let r = unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_WRITEPROTECT as _, &mut wp) };
        if r < 0 {
            return Err(UffdError::Range {
                op: "UFFDIO_WRITEPROTECT",
                addr,
                len,
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    fn register(&self, addr: u64, len: u64, mode: u64) -> Result<(), UffdError> {
        let mut reg = uffdio_register {
            range: uffdio_range { start: addr, len },
            mode,
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
    ) -> (u64, Option<Errno>) {
        let mode = if wake { 0 } else { UFFDIO_COPY_MODE_DONTWAKE };
        let (r, done) = match src {
            Some(src) => {
                let mut c = uffdio_copy {
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
                let mut z = uffdio_zeropage {
                    range: uffdio_range { start: dst, len },
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
        let errno = Errno::last();
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
                Some(Errno::EAGAIN) => {}
                Some(Errno::EEXIST) => {
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
                        source: io::Error::from(e),
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

    /// Waits up to `timeout_ms` for fault events to read; false on timeout or EINTR.
    pub fn wait_readable(&self, timeout_ms: i32) -> bool {
        let mut p = [PollFd::new(self.fd.as_fd(), PollFlags::POLLIN)];
        // a negative timeout waits without limit, as poll(2) does
        let timeout = PollTimeout::try_from(timeout_ms).unwrap_or(PollTimeout::NONE);
        matches!(poll(&mut p, timeout), Ok(n) if n > 0)
    }

    /// Fault events read per call.
    pub const READ_BATCH: usize = 64;

    /// Reads pending fault addresses into `out` (non-blocking). Returns how many; 0 if none.
    /// Fewer than [`Uffd::READ_BATCH`] means the queue was drained.
    pub fn read_faults(&self, out: &mut Vec<u64>) -> Result<usize, UffdError> {
        self.read_events(|f| out.push(f.address))
    }

    /// Like [`Uffd::read_faults`], with each fault's flags ([`Fault`]).
    pub fn read_fault_events(&self, out: &mut Vec<Fault>) -> Result<usize, UffdError> {
        self.read_events(|f| out.push(f))
    }

    fn read_events(&self, mut each: impl FnMut(Fault)) -> Result<usize, UffdError> {
        const N: usize = Uffd::READ_BATCH;
        let mut msgs = [[0u8; MSG_LEN]; N];
        let r = match nix::unistd::read(&self.fd, msgs.as_flattened_mut()) {
            Ok(r) => r,
            Err(Errno::EAGAIN | Errno::EINTR) => return Ok(0),
            Err(e) => return Err(UffdError::Read(e.into())),
        };
        let n = r / MSG_LEN;
        let u64_at = |m: &[u8; MSG_LEN], at: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&m[at..at + 8]);
            u64::from_ne_bytes(a)
        };
        for m in &msgs[..n] {
            if m[0] != UFFD_EVENT_PAGEFAULT {
                return Err(UffdError::UnexpectedEvent(m[0]));
            }
            let flags = u64_at(m, MSG_FAULT_FLAGS);
            each(Fault {
                address: u64_at(m, MSG_FAULT_ADDRESS),
                write_protect: flags & UFFD_PAGEFAULT_FLAG_WP != 0,
            });
        }
        Ok(n)
    }
}

impl AsFd for Uffd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// One page fault as userfaultfd reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fault {
    /// The faulting address (not page-aligned).
    pub address: u64,
    /// A write to a write-protected page (else a missing page).
    pub write_protect: bool,
}

fn open_dev(flags: i32) -> io::Result<RawFd> {
    // O_RDWR | O_CLOEXEC (std always sets close-on-exec); closed on every path when dropped
    let dev = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/userfaultfd")?;
    // SAFETY: USERFAULTFD_IOC_NEW takes the new fd's flags by value.
    let fd = unsafe { libc::ioctl(dev.as_raw_fd(), USERFAULTFD_IOC_NEW as _, flags) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}
