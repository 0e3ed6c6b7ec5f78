//! The running server's shared state: what the event loop and every bulk thread read.

use std::sync::Arc;

use crate::config::ServerConfig;
use crate::memory::PageMap;
use crate::session::Session;
use crate::stats::Totals;

/// The running server's shared parts.
pub(crate) struct Core {
    /// The memory served, with its page table.
    pub(crate) map: PageMap,
    pub(crate) config: ServerConfig,
    /// The bulk threads started, joined when the server stops: none of them reads the memory
    /// after the server's owner may have unmapped it.
    pub(crate) bulk_threads: std::sync::Mutex<Vec<std::thread::JoinHandle<()>>>,
    /// What every session sent.
    pub(crate) totals: Arc<Totals>,
    /// Pre-copy: the memory is still being modified; the stream sends `Precopy` pages and
    /// waits for pages to send again instead of ending.
    pub(crate) precopy: std::sync::atomic::AtomicBool,
    /// Held (shared) while a bulk thread picks a frame's origin and builds (counts) it,
    /// (exclusive) while pre-copy ends: after that, every `Precopy` page is counted.
    pub(crate) precopy_gate: std::sync::RwLock<()>,
    /// Every session opened (for pre-copy's re-sends).
    pub(crate) sessions: std::sync::Mutex<Vec<std::sync::Weak<Session>>>,
}
