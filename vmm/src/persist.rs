//! What every component with state implements to be saved and restored ([`Persist`]), and
//! what can go wrong doing it ([`StateError`]).

use thiserror::Error;

/// Saving or restoring state failed.
#[derive(Debug, Error)]
pub enum StateError {
    /// A KVM ioctl failed.
    #[error("KVM {op} failed")]
    Kvm {
        /// The ioctl.
        op: &'static str,
        /// errno.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// KVM accepted only part of the MSRs.
    #[error("KVM {op}: {done} of {want} MSRs (stopped at index {index:#x})")]
    Msrs {
        /// Get or set.
        op: &'static str,
        /// Accepted.
        done: usize,
        /// Asked.
        want: usize,
        /// First MSR not accepted.
        index: u32,
    },
    /// The state does not fit what it is restored into.
    #[error("invalid state: {0}")]
    Invalid(String),
    /// The state file could not be read or written.
    #[error("state file {path}")]
    Io {
        /// The file.
        path: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The state file is larger than a state frame may be.
    #[error("state file {path} has {len} bytes, more than the {cap}-byte cap")]
    TooLarge {
        /// The file.
        path: String,
        /// Its size.
        len: u64,
        /// The cap.
        cap: u64,
    },
    /// The envelope is not a valid state frame (magic, version, length, CRC).
    #[error("state file {path} is not a valid state frame")]
    Frame {
        /// The file.
        path: String,
        /// Cause.
        #[source]
        source: proto::DecodeError,
    },
    /// Bytes after the frame.
    #[error("state file {path} has {extra} bytes after the state frame")]
    Trailing {
        /// The file.
        path: String,
        /// How many.
        extra: usize,
    },
    /// Another state version.
    #[error("state version {found} (this vmm reads version {supported})")]
    Version {
        /// Found in the blob.
        found: u32,
        /// The version this vmm reads ([`crate::state::STATE_VERSION`]).
        supported: u32,
    },
    /// The blob does not decode.
    #[error("state blob does not decode")]
    Decode(#[source] postcard::Error),
}

/// A component whose state is saved and restored. Implemented next to each component: the
/// vCPU (`vcpu::Vcpu`), the in-kernel chips and clock (`chips::Chips`), the serial port and
/// the i8042 (`devices`), each virtio device (`virtio::Transport`) and guest RAM's layout
/// (`memory::GuestRam`; its contents go to the memory file or the page-server).
pub trait Persist: Sized {
    /// The saved form.
    type State;
    /// Live resources needed to rebuild it.
    type Args;
    /// What can go wrong (the component's own error type).
    type Error: std::error::Error;
    /// Captures the state (the VM is paused).
    fn save(&self) -> Result<Self::State, Self::Error>;
    /// Rebuilds the component from `state`.
    fn restore(args: Self::Args, state: &Self::State) -> Result<Self, Self::Error>;
}
