//! Waiting: an eventfd that wakes a pager thread out of poll(2), and the poll(2) itself, both
//! through nix (`nix::sys::eventfd`, `nix::poll`).

use std::io;
use std::os::fd::{AsFd, BorrowedFd};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::eventfd::{EfdFlags, EventFd};

/// An eventfd that wakes the fault thread out of poll(2).
#[derive(Debug)]
pub(crate) struct Waker(EventFd);

impl Waker {
    pub(crate) fn new() -> io::Result<Waker> {
        let fd = EventFd::from_value_and_flags(0, EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)?;
        Ok(Waker(fd))
    }
    pub(crate) fn wake(&self) {
        // best effort: a full counter (EAGAIN) means a wake-up is pending anyway
        let _ = self.0.write(1);
    }
    pub(crate) fn drain(&self) {
        // non-blocking: EAGAIN when nothing was pending
        let _ = self.0.read();
    }
}

impl AsFd for Waker {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}

/// poll(2) for input on up to three descriptors (None: none) for at most `timeout_ms`. Returns
/// which are readable (all false on timeout or EINTR).
pub(crate) fn poll_in(fds: [Option<BorrowedFd<'_>>; 3], timeout_ms: i32) -> [bool; 3] {
    // a negative timeout waits without limit, as poll(2) does
    let timeout = PollTimeout::try_from(timeout_ms).unwrap_or(PollTimeout::NONE);
    // which of `fds` each polled entry is
    let mut at = [0usize; 3];
    let mut k = 0;
    for (i, fd) in fds.iter().enumerate() {
        if fd.is_some() {
            at[k] = i;
            k += 1;
        }
    }
    let Some(&any) = fds.iter().flatten().next() else {
        let _ = poll(&mut [], timeout);
        return [false; 3];
    };
    // the first `k` entries are the given descriptors; the tail (a repeat, never polled) only
    // fills the array, so no allocation is needed
    let mut p: [PollFd<'_>; 3] =
        std::array::from_fn(|j| PollFd::new(fds[at[j]].unwrap_or(any), PollFlags::POLLIN));
    match poll(&mut p[..k], timeout) {
        Ok(n) if n > 0 => {}
        _ => return [false; 3],
    }
    let mut out = [false; 3];
    for (&i, pf) in at[..k].iter().zip(&p[..k]) {
        // unknown revents bits still mean something happened, as the raw non-zero check did
        out[i] = pf.any().unwrap_or(true);
    }
    out
}
