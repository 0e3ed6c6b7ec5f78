//! Live migration, post-copy: the source pauses only while the non-memory state crosses the
//! wire, the destination resumes at once and pages guest RAM in through the pager (faults first,
//! the stream for the rest) from a page-server the source runs over its paused VM's memory.
//!
//! One **migration connection** (TCP or a Unix socket) carries the conversation below; each
//! message is a `proto` State frame (length-checked, CRC32) holding a postcard-encoded [`Wire`]
//! value after a 4-byte [`MIGRATION_VERSION`]. Pages travel on the page-server's own connections.
//!
//! ```text
//! source                                   destination (vmm --incoming)
//!   Offer{config, cpuid, msrs, caps, page-server}  ->
//!                                          checks compatibility, builds the VM shell, maps and
//!                                          registers RAM with userfaultfd, connects the pager
//!                                   <-     Accept | Refuse{reason}
//!   Ping{t} (x N)                   ->
//!                                   <-     Pong{t, t_dest}        (clock offset, RTT)
//!   pause vCPUs, save state
//!   State{snapshot, paused_at}      ->
//!                                          applies it, resumes vCPUs, starts the stream
//!                                   <-     Resumed{running_at} | Failed{reason} (source resumes)
//!                                   <-     Progress{present, total} (every 250 ms)
//!                                   <-     Complete{report}
//!   stops serving, frees RAM, exits 0
//! ```
//!
//! Incompatibilities are refused before the source pauses; a destination that fails before its
//! vCPUs run says `Failed` and the source resumes its VM, so no VM is lost and two copies never
//! run.

mod compat;
pub mod controller;
mod error;
pub mod incoming;
mod link;
pub mod outgoing;
mod plan;
mod precopy;
mod wire;

pub use compat::{missing_cpu_features, REQUIRED_CAPS};
pub use error::MigrationError;
pub use link::{bulk_buffer_for, mono_ns, tcp_rtt, Link, SILENCE_TIMEOUT};
pub use plan::{Mode, PassEnd, Plan, DEFAULT_RECOVER_TIMEOUT};
pub use wire::{decode, encode, Offer, Wire, MIGRATION_VERSION};

use std::time::Duration;

/// How often the destination reports progress.
pub const PROGRESS_EVERY: Duration = Duration::from_millis(250);
