//! The remote source's state, shared by its fault thread, streamers and supervisor: the
//! current session's connections and the loss and reconnect bookkeeping.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use proto::Layout;
use transport::{Addr, Sock};

use crate::shared::Shared;
use crate::wake::Waker;

/// One session's connections, as opened (control, urgent, bulk) and the layout it serves.
pub(super) struct Session {
    pub(super) control: Sock,
    pub(super) urgent: Sock,
    pub(super) bulks: Vec<Sock>,
    pub(super) layout: Layout,
}

/// What is written on the control connection, by whichever thread: every write holds the
/// lock, so frames never interleave and a reconnect never misses a `start_stream`.
#[derive(Debug, Default)]
pub(super) struct Control {
    /// The stream was asked for (at connect, or later by [`super::start_stream`]); every new
    /// session enables it again.
    pub(super) stream_started: bool,
    /// The current session's control connection (None while reconnecting).
    pub(super) sock: Option<Sock>,
    /// With [`crate::PagerConfig::hold_done`]: the control connection kept, every page
    /// present, until [`super::release_done`] says Done on it.
    pub(super) held: Option<Sock>,
}

/// State of a remote pager shared by its threads.
pub(crate) struct Remote {
    pub(crate) shared: Arc<Shared>,
    pub(super) addr: Addr,
    pub(crate) waker: Arc<Waker>,
    /// A new urgent connection for the fault thread after a reconnect.
    pub(crate) inbox: Mutex<Option<(Sock, u64)>>,
    /// Host addresses to fetch as if they had faulted ([`crate::Pager::fetch_early`]).
    pub(crate) early: Mutex<Vec<u64>>,
    pub(super) generation: AtomicU64,
    pub(super) lost: Mutex<Option<(u64, String)>>,
    /// The layout of the first session; every reconnect must find the same.
    pub(super) layout: Layout,
    /// How long one reconnect attempt may take (see
    /// [`crate::PagerConfig::reconnect_attempt_timeout`]).
    pub(super) attempt_timeout: Duration,
    pub(super) control: Mutex<Control>,
}

impl Remote {
    pub(crate) fn report_lost(&self, generation: u64, cause: String) {
        let sh = &self.shared;
        if sh.is_complete() || sh.stop.load(Ordering::Acquire) {
            return;
        }
        let mut l = self.lost.lock().unwrap_or_else(|p| p.into_inner());
        if l.is_none() && generation == self.generation.load(Ordering::Acquire) {
            *l = Some((generation, cause));
        }
        drop(l);
        sh.notify();
    }

    pub(super) fn register_socks(&self, s: &Session) {
        let mut v = self.shared.socks.lock().unwrap_or_else(|p| p.into_inner());
        for sock in std::iter::once(&s.control)
            .chain(std::iter::once(&s.urgent))
            .chain(s.bulks.iter())
        {
            if let Ok(c) = sock.try_clone() {
                v.push(c);
            }
        }
    }
}
