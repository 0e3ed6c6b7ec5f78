//! What can go wrong when a page-server starts or runs.

use thiserror::Error;

/// The server failed.
#[derive(Debug, Error)]
pub enum ServerError {
    /// Could not listen.
    #[error("cannot listen on {addr}")]
    Bind {
        /// The address.
        addr: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The event loop failed.
    #[error("event loop failed")]
    Poll(#[source] std::io::Error),
    /// The memory's layout is unusable.
    #[error("memory cannot be served")]
    Layout(#[source] proto::HandshakeError),
}
