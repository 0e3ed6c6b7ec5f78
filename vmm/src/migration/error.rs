//! What can go wrong in a migration.

use thiserror::Error;

/// Migration failed.
#[derive(Debug, Error)]
pub enum MigrationError {
    /// Socket I/O.
    #[error("{what}")]
    Io {
        /// What was being done.
        what: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The peer sent something that is not a valid message.
    #[error("bad message from the peer: {0}")]
    Protocol(String),
    /// The peer runs another migration version.
    #[error("migration protocol version {theirs} (this vmm speaks {ours})")]
    Version {
        /// Theirs.
        theirs: u32,
        /// Ours ([`super::MIGRATION_VERSION`]).
        ours: u32,
    },
    /// The destination refused.
    #[error("destination refused the migration: {0}")]
    Refused(String),
    /// The destination failed before running the VM.
    #[error("destination failed before resuming the VM: {0}")]
    DestinationFailed(String),
    /// The VM could not be prepared or rebuilt.
    #[error(transparent)]
    Vm(Box<crate::error::VmError>),
    /// Anything else the migration cannot go on from.
    #[error("{0}")]
    Other(String),
}

impl From<crate::error::VmError> for MigrationError {
    fn from(e: crate::error::VmError) -> Self {
        MigrationError::Vm(Box::new(e))
    }
}
