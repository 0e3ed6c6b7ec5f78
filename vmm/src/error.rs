//! The VMM's error type and the one-line rendering of an error with its causes.

use std::time::Duration;

use thiserror::Error;

use crate::api::ControlError;
use crate::arch::boot::BootError;
use crate::memory::MemoryError;
use crate::persist::StateError;
use crate::virtio::VirtioError;

/// Building or running the VM failed.
#[derive(Debug, Error)]
pub enum VmError {
    /// /dev/kvm or a VM-level ioctl.
    #[error("KVM {op} failed")]
    Kvm {
        /// The operation.
        op: &'static str,
        /// errno.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Guest memory.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// Boot image.
    #[error(transparent)]
    Boot(#[from] BootError),
    /// Saving / restoring state.
    #[error(transparent)]
    State(#[from] StateError),
    /// The control socket.
    #[error(transparent)]
    Control(#[from] ControlError),
    /// Lazy restore could not start paging.
    #[error("lazy restore from {addr}")]
    Pager {
        /// The page-server.
        addr: String,
        /// Cause.
        #[source]
        source: pager::PagerError,
    },
    /// A configuration the VMM refuses.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// Threads, eventfds.
    #[error("{what}")]
    Os {
        /// What failed.
        what: &'static str,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// A virtio device.
    #[error(transparent)]
    Device(#[from] VirtioError),
    /// vCPUs did not pause.
    #[error("vCPUs did not pause within {0:?}")]
    PauseTimeout(Duration),
}

pub(crate) fn kvm_err(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { op, source }
}
