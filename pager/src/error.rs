//! What can go wrong while paging.

use std::time::Duration;

use thiserror::Error;

use uffd::UffdError;

/// The pager failed.
#[derive(Debug, Error)]
pub enum PagerError {
    /// A userfaultfd call failed.
    #[error("userfaultfd")]
    Uffd(#[from] UffdError),
    /// Mapping the region failed.
    #[error("cannot map {len_bytes} bytes for the region")]
    Map {
        /// Size.
        len_bytes: u64,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Could not reach the source.
    #[error("cannot connect to page-server at {addr}")]
    Connect {
        /// Where.
        addr: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The source refused us, or we refused it.
    #[error("handshake with {addr} failed")]
    Handshake {
        /// Where.
        addr: String,
        /// What disagreed.
        #[source]
        source: proto::HandshakeError,
    },
    /// The source sent an error frame.
    #[error("page-server at {addr} refused: {reason} (code {code})")]
    Refused {
        /// Where.
        addr: String,
        /// Code.
        code: u16,
        /// Reason.
        reason: String,
    },
    /// The source sent something invalid.
    #[error("protocol error from {addr}: {what}")]
    Protocol {
        /// Where.
        addr: String,
        /// What.
        what: String,
    },
    /// The source went away and could not be reached again in time.
    #[error("source {addr} lost ({cause}); gave up after {waited:?} of reconnect attempts; {missing} pages still missing (faults on them stay blocked)")]
    SourceLost {
        /// Where.
        addr: String,
        /// What broke first.
        cause: String,
        /// Time spent reconnecting.
        waited: Duration,
        /// Pages never received.
        missing: u64,
    },
    /// The local image could not be used.
    #[error("local image")]
    Image(#[from] transport::ImageError),
    /// A thread could not be started.
    #[error("cannot start a pager thread")]
    Spawn(#[source] std::io::Error),
    /// The pager has failed for good; nothing more can be asked of its source.
    #[error("the pager has stopped")]
    Stopped,
}
