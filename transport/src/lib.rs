//! How pages and messages travel between the hosts of a migration, and the pieces both ends
//! share: the socket type (TCP or Unix, by the address's form) with connect deadlines, buffer
//! sizes and liveness (keepalive + `TCP_USER_TIMEOUT`), the placement and priority of the
//! threads that use them, and memory image files (pages at rest, read through the page cache).
//!
//! The page-server, the pager and the VMM's migration link all sit on this crate, and every
//! connection they make is authenticated and encrypted here ([`tls`], [`Security`]).

mod image;
mod ratelog;
pub mod sched;
mod sock;
pub mod tls;

pub use image::{create_private, FileImage, ImageError};
pub use ratelog::LogLimiter;
pub use sock::{clear_stale_socket, set_liveness, Addr, Sock};
pub use tls::Security;

/// Default socket buffer of a bulk connection, on both sides: enough for ~10 Gbit/s at 1 ms
/// round trip, small enough that a fault on a page queued behind it waits ~1 ms, not ~10.
pub const DEFAULT_BULK_BUFFER_BYTES: usize = 2 << 20;

/// Default liveness timeout of a connection (page-server, pager, migration link): long enough
/// for a congested link, short enough that a cut is noticed well within the usual recovery
/// timeouts.
pub const DEFAULT_LIVENESS_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// An error and its causes on one line, `error: cause: cause` (how every crate of the
/// workspace logs and reports an error chain).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}
