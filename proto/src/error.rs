//! Errors of decoding and of the handshake. Every variant names the values that were wrong.

use thiserror::Error;

/// A frame or message could not be decoded. Decoding never panics; it returns one of these.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum DecodeError {
    /// Fewer bytes than the fixed part of what was being decoded.
    #[error("truncated {what}: need {need} bytes, have {have}")]
    Truncated {
        /// What was being decoded.
        what: &'static str,
        /// Bytes needed.
        need: usize,
        /// Bytes available.
        have: usize,
    },
    /// The frame does not start with the protocol's magic.
    #[error("bad magic {found:#010x} (expected {expected:#010x}): not a paging-protocol peer")]
    BadMagic {
        /// What the peer sent.
        found: u32,
        /// [`crate::MAGIC`].
        expected: u32,
    },
    /// The frame's protocol version is not ours.
    #[error("unsupported protocol version {theirs} (we speak {ours})")]
    UnsupportedVersion {
        /// Our version.
        ours: u16,
        /// The peer's version.
        theirs: u16,
    },
    /// Unknown message kind.
    #[error("unknown message kind {0}")]
    UnknownKind(u16),
    /// Reserved header bits were set.
    #[error("reserved header field is {0:#x}, must be 0")]
    ReservedNotZero(u32),
    /// A length field is over its cap; nothing was allocated for it.
    #[error("{what} is {len}, over the cap of {cap}")]
    TooLong {
        /// Which length.
        what: &'static str,
        /// The length the peer sent.
        len: u64,
        /// The cap.
        cap: u64,
    },
    /// A field's value is not valid.
    #[error("invalid {field}: {value}")]
    InvalidField {
        /// The field.
        field: &'static str,
        /// Its value.
        value: u64,
    },
    /// The payload is longer or shorter than its own fields say.
    #[error("{what}: payload is {have} bytes, fields describe {expected}")]
    LengthMismatch {
        /// Which message.
        what: &'static str,
        /// Bytes the fields describe.
        expected: u64,
        /// Bytes the payload has.
        have: u64,
    },
    /// The state blob's CRC does not match its bytes.
    #[error("state blob CRC mismatch: header says {expected:#010x}, bytes give {actual:#010x}")]
    BadCrc {
        /// CRC in the message.
        expected: u32,
        /// CRC of the bytes received.
        actual: u32,
    },
    /// An error reason is not UTF-8.
    #[error("error reason is not valid UTF-8")]
    BadUtf8,
}

/// The two sides of a handshake do not agree. Each variant names both sides' values.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum HandshakeError {
    /// Protocol versions differ.
    #[error("protocol version mismatch: ours {ours}, theirs {theirs}")]
    Version {
        /// Ours.
        ours: u16,
        /// Theirs.
        theirs: u16,
    },
    /// Page sizes differ.
    #[error("page size mismatch: ours {ours} bytes, theirs {theirs} bytes")]
    PageSize {
        /// Ours.
        ours: u32,
        /// Theirs.
        theirs: u32,
    },
    /// Memory layouts differ.
    #[error("memory layout mismatch: ours {ours}, theirs {theirs}")]
    Layout {
        /// Ours, formatted.
        ours: String,
        /// Theirs, formatted.
        theirs: String,
    },
    /// The layout itself is unusable (unaligned, overlapping, empty, too large).
    #[error("invalid memory layout: {0}")]
    InvalidLayout(String),
    /// A page size that is not a power of two in [4096, 1 GiB].
    #[error("invalid page size {0}")]
    InvalidPageSize(u32),
}
