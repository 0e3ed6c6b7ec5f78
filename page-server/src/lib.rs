//! Source side of post-copy paging: serves the pages of a memory — a raw image file, or regions
//! of this process such as a VMM's guest RAM — to pagers on other hosts.
//!
//! Each client opens a control, an urgent and one or more bulk connections (see the `proto`
//! crate's docs). Control and urgent traffic of every client is handled by one mio event loop
//! thread, so a fault reply is written the moment its request is read; each bulk connection gets
//! a streaming thread at lower CPU priority. A session sends every page at most once — a fault
//! on a page the stream already sent is answered `InFlight`, and the page arrives on the stream
//! — and its stream follows the client's latest fault. [`ServerHandle::stats`] sums what every
//! session sent.
//!
//! This crate must not know about KVM or vCPUs; it reads bytes through [`MemoryProvider`].

mod bulk;
pub mod cli;
mod config;
mod conn;
mod dispatch;
mod error;
mod listen;
mod memory;
mod server;
mod session;
mod shared;
mod stats;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

pub use config::ServerConfig;
pub use error::ServerError;
pub use memory::{MemoryProvider, RawRegions};
pub use stats::ServerStats;
use transport::Addr;

/// A running server; [`ServerHandle::stop`] (or drop) ends it and every session.
pub struct ServerHandle {
    addr: Addr,
    stop: Arc<AtomicBool>,
    waker: Arc<mio::Waker>,
    thread: Option<JoinHandle<Result<(), ServerError>>>,
    totals: Arc<stats::Totals>,
    core: Arc<shared::Core>,
}

impl ServerHandle {
    /// The address it listens on (with the real port when asked for port 0).
    pub fn addr(&self) -> &Addr {
        &self.addr
    }

    /// What the server has sent so far: pages by origin, zero pages, data bytes and sessions,
    /// summed over every session, live and ended (a few atomic loads; call it as often as a
    /// progress display needs). Still readable after the server stopped, through a handle.
    pub fn stats(&self) -> ServerStats {
        self.totals.snapshot()
    }

    fn live_sessions(&self) -> Vec<Arc<session::Session>> {
        let mut v = self.core.sessions.lock().unwrap_or_else(|e| e.into_inner());
        v.retain(|w| w.strong_count() > 0);
        v.iter().filter_map(|w| w.upgrade()).collect()
    }

    /// Pre-copy: the pages set in `bits` (little-endian bytes, one bit per page) were modified
    /// since they were sent; every session's stream sends them again. Returns how many pages
    /// were marked (summed over sessions).
    pub fn resend(&self, bits: &[u8]) -> u64 {
        self.live_sessions().iter().map(|s| s.unsend(bits)).sum()
    }

    /// Pages some session has not sent (yet, or again): 0 when every client has everything.
    /// With no client yet, every page.
    pub fn unsent_pages(&self) -> u64 {
        let v = self.live_sessions();
        if v.is_empty() {
            return self.core.map.total_pages();
        }
        v.iter().map(|s| s.unsent()).max().unwrap_or(0)
    }

    /// Ends pre-copy: from now on the stream sends `Stream` pages and ends when all are sent.
    /// Returns how many pages were sent as `Precopy` in all (every one of them built already):
    /// a receiver that has that many knows no older copy is still on its way.
    pub fn end_precopy(&self) -> u64 {
        let _w = self
            .core
            .precopy_gate
            .write()
            .unwrap_or_else(|e| e.into_inner());
        self.core.precopy.store(false, Ordering::Release);
        self.totals.snapshot().precopy_pages
    }

    /// A function that stops the server from any thread (e.g. a signal handler thread).
    pub fn stopper(&self) -> impl Fn() + Send + Sync + 'static {
        let stop = self.stop.clone();
        let waker = self.waker.clone();
        move || {
            stop.store(true, Ordering::Release);
            let _ = waker.wake();
        }
    }

    /// Stops the server and waits for its loop to end.
    pub fn stop(mut self) -> Result<(), ServerError> {
        self.stop_inner()
    }

    /// Waits for the server to end (after a stopper was called).
    pub fn join(mut self) -> Result<(), ServerError> {
        match self.thread.take() {
            Some(t) => t.join().unwrap_or(Ok(())),
            None => Ok(()),
        }
    }

    fn stop_inner(&mut self) -> Result<(), ServerError> {
        (self.stopper())();
        match self.thread.take() {
            Some(t) => t.join().unwrap_or(Ok(())),
            None => Ok(()),
        }
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        let _ = self.stop_inner();
    }
}

/// Starts serving `mem` on `addr` (port 0 picks a free port). Returns once listening.
pub fn serve(
    mem: Arc<dyn MemoryProvider>,
    addr: &Addr,
    config: ServerConfig,
) -> Result<ServerHandle, ServerError> {
    mem.layout()
        .validate(mem.page_size())
        .map_err(ServerError::Layout)?;
    let (listener, bound) = listen::bind(addr)?;
    let (poll, waker) = server::new_poll().map_err(ServerError::Poll)?;
    let stop = Arc::new(AtomicBool::new(false));
    let totals = Arc::new(stats::Totals::default());
    let config_precopy = config.precopy;
    let core = Arc::new(shared::Core {
        map: memory::PageMap::new(mem),
        config,
        totals: totals.clone(),
        precopy: AtomicBool::new(config_precopy),
        precopy_gate: std::sync::RwLock::new(()),
        sessions: std::sync::Mutex::new(Vec::new()),
        bulk_threads: std::sync::Mutex::new(Vec::new()),
    });
    let core_handle = core.clone();
    let a = bound.clone();
    let st = stop.clone();
    let thread = std::thread::Builder::new()
        .name("page-server".into())
        .spawn(move || server::run(core, listener, a, poll, st))
        .map_err(ServerError::Poll)?;
    Ok(ServerHandle {
        addr: bound,
        stop,
        waker,
        thread: Some(thread),
        totals,
        core: core_handle,
    })
}
