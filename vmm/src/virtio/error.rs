//! What can go wrong setting up a virtio device or applying its state.

use thiserror::Error;

/// A device could not be set up, or its state not applied.
#[derive(Debug, Error)]
pub enum VirtioError {
    /// The disk image.
    #[error("disk {path}: {what}")]
    Disk {
        /// The image.
        path: String,
        /// What is wrong.
        what: String,
    },
    /// The tap device.
    #[error("tap {name}: {what}")]
    Tap {
        /// Interface name.
        name: String,
        /// What is wrong.
        what: String,
    },
    /// A bad option or state.
    #[error("{0}")]
    Config(String),
    /// A device did not stop in time.
    #[error("{0}")]
    Busy(String),
}
