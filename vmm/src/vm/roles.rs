//! A VM's part in a migration: the source side's running migration, or a destination that
//! still depends on its source.

use std::time::Instant;

use crate::api::Reply;
use crate::migration::outgoing::Outgoing;
use crate::migration::Link;

/// A migration this VM is the source of.
pub(super) struct Source {
    pub(super) run: Outgoing,
    pub(super) reply: std::sync::mpsc::Sender<Reply>,
    /// The migration paused the VM (and resumes it if the destination never ran it).
    pub(super) paused_it: bool,
    /// Add the checksum of RAM at the pause to the report.
    pub(super) verify: bool,
    /// Ends the pre-copy passes (`migrate-switchover`).
    pub(super) switchover: std::sync::Arc<std::sync::atomic::AtomicBool>,
    pub(super) hybrid: bool,
}

/// This VM arrived by migration and still depends on its source.
pub(super) struct Dest {
    pub(super) link: Link,
    pub(super) last_progress: Instant,
    /// Every RAM page is here (disks copied in may still be coming).
    pub(super) memory_complete: bool,
    /// Reports of the disks copied in so far.
    pub(super) disk_copies: Vec<crate::api::replies::DiskCopy>,
    /// Disks still being copied in (counted down as their `Done` events are handled).
    pub(super) disks_pending: usize,
}
