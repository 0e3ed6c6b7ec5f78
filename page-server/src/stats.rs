//! What the server sent: lock-free counters per session and summed over every session, and
//! the serializable snapshot ([`ServerStats`]) an embedding VMM reports. Counting only: this
//! module decides nothing.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use serde::{Deserialize, Serialize};

/// Pages and bytes sent, by origin (one session's, or the sum over sessions).
#[derive(Debug, Default)]
pub struct Counters {
    /// Pages sent because a fault asked for them.
    pub fault_pages: AtomicU64,
    /// Pages sent as prefetch around a fault.
    pub prefetch_pages: AtomicU64,
    /// Pages sent by the background stream.
    pub stream_pages: AtomicU64,
    /// Of those, zero pages (no payload).
    pub zero_pages: AtomicU64,
    /// Page bytes put on the wire.
    pub data_bytes: AtomicU64,
    /// Fault requests answered `InFlight` (their page was on its way on the stream).
    pub in_flight_replies: AtomicU64,
    /// Of the stream's pages, those sent as `Precopy` (while the memory still changed).
    pub precopy_pages: AtomicU64,
}

/// Totals over every session of a server, live and ended.
#[derive(Debug, Default)]
pub(crate) struct Totals {
    /// Sessions opened (control connections accepted).
    pub(crate) sessions_opened: AtomicU64,
    /// Clients that said `Done` (they have every page).
    pub(crate) clients_done: AtomicU64,
    /// What every session sent.
    pub(crate) sent: Counters,
}

impl Totals {
    pub(crate) fn snapshot(&self) -> ServerStats {
        let s = &self.sent;
        ServerStats {
            sessions_opened: self.sessions_opened.load(Relaxed),
            clients_done: self.clients_done.load(Relaxed),
            fault_pages: s.fault_pages.load(Relaxed),
            prefetch_pages: s.prefetch_pages.load(Relaxed),
            stream_pages: s.stream_pages.load(Relaxed),
            zero_pages: s.zero_pages.load(Relaxed),
            data_bytes: s.data_bytes.load(Relaxed),
            in_flight_replies: s.in_flight_replies.load(Relaxed),
            precopy_pages: s.precopy_pages.load(Relaxed),
        }
    }
}

/// What a server has sent so far, summed over every session (live and ended). Each field is
/// read on its own (no lock), so a snapshot taken while pages go out may be a few pages
/// apart between fields.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerStats {
    /// Sessions opened (one per client connect or reconnect).
    pub sessions_opened: u64,
    /// Clients that said `Done`: they had every page (a migration source learns the outcome
    /// from this when its own link to the destination is gone).
    #[serde(default)]
    pub clients_done: u64,
    /// Pages sent because a fault asked for them.
    pub fault_pages: u64,
    /// Pages sent as prefetch with a fault's reply.
    pub prefetch_pages: u64,
    /// Pages sent by the background stream.
    pub stream_pages: u64,
    /// Of all pages sent, zero pages (one bit each on the wire, no data).
    pub zero_pages: u64,
    /// Page data bytes sent.
    pub data_bytes: u64,
    /// Fault requests answered `InFlight` instead of sending their page again.
    pub in_flight_replies: u64,
    /// Of the stream's pages, those sent as `Precopy` (while the memory still changed).
    pub precopy_pages: u64,
}

impl ServerStats {
    /// Pages sent, every origin.
    pub fn pages_sent(&self) -> u64 {
        self.fault_pages + self.prefetch_pages + self.stream_pages
    }
}
