//! Waiting: an eventfd that wakes a pager thread out of poll(2), and the poll(2) itself.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// An eventfd that wakes the fault thread out of poll(2).
#[derive(Debug)]
pub(crate) struct Waker(OwnedFd);

impl Waker {
    pub(crate) fn new() -> io::Result<Waker> {
        // SAFETY: eventfd takes flags only and returns a new descriptor or -1.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor we own.
        Ok(Waker(unsafe { OwnedFd::from_raw_fd(fd) }))
    }
    pub(crate) fn wake(&self) {
        let one = 1u64;
        // SAFETY: writing 8 bytes from a live u64 to our eventfd.
        unsafe { libc::write(self.0.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }
    pub(crate) fn drain(&self) {
        let mut v = 0u64;
        // SAFETY: reading 8 bytes into a live u64 from our non-blocking eventfd.
        unsafe { libc::read(self.0.as_raw_fd(), (&mut v as *mut u64).cast(), 8) };
    }
    pub(crate) fn fd(&self) -> i32 {
        self.0.as_raw_fd()
    }
}

/// poll(2) for input on up to three descriptors (-1: none) for at most `timeout_ms`. Returns
/// which are readable (all false on timeout or EINTR).
pub(crate) fn poll_in(fds: [i32; 3], timeout_ms: i32) -> [bool; 3] {
    let mut p = fds.map(|fd| libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    });
    // SAFETY: polling three pollfd structs we own (negative fds are ignored by the kernel).
    let n = unsafe { libc::poll(p.as_mut_ptr(), 3, timeout_ms) };
    if n <= 0 {
        return [false; 3];
    }
    p.map(|x| x.revents != 0)
}
