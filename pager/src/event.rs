//! What a pager tells its owner as it happens.

/// Things the owner is told as they happen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PagerEvent {
    /// The source stopped answering; faults on missing pages wait while we reconnect.
    SourceLost {
        /// What broke.
        cause: String,
    },
    /// Reconnected; paging continues.
    Reconnected {
        /// Reconnections so far.
        count: u64,
    },
    /// Every page is present; the region no longer depends on the source.
    Complete,
    /// Paging failed for good (see [`crate::Pager::wait`]).
    Failed {
        /// Why.
        reason: String,
    },
}
