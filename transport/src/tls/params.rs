//! What the TLS modules share: the error type of loading credentials, the limits, and what
//! the helpers write.

use std::fmt;
use std::io;
use std::path::PathBuf;
use std::time::Duration;

/// What identity a peer authenticated with in pre-shared-key mode.
pub const PSK_IDENTITY: &str = "psk";
/// The shortest pre-shared key accepted (characters of the file, white space trimmed).
pub const MIN_PSK_LEN: usize = 32;
/// How long a handshake may take before the peer is dropped (a real peer needs two round
/// trips; an unauthenticated one gets no longer than this).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// Why credentials could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// A file held no usable PEM item of the kind wanted.
    #[error("{path}: {what}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        what: String,
    },
    /// The pre-shared key is too short to be a key.
    #[error("{path}: the pre-shared key has {len} characters; at least {MIN_PSK_LEN} are needed (make one with `vmm tls psk FILE`)")]
    ShortPsk {
        /// The file.
        path: PathBuf,
        /// Its length.
        len: usize,
    },
    /// A key file is readable by other users.
    #[error("{path} is readable by other users (mode {mode:o}); a key must be private: chmod 600 {path}")]
    KeyNotPrivate {
        /// The file.
        path: PathBuf,
        /// Its mode bits.
        mode: u32,
    },
    /// No peer identity was given in certificate mode.
    #[error("certificate mode needs the identities of the peers to accept (--tls-peer NAME)")]
    NoPeers,
    /// A peer identity is not a DNS name.
    #[error("peer identity {0:?} is not a DNS name")]
    BadPeer(String),
    /// rustls or rcgen refused the configuration.
    #[error("TLS configuration: {0}")]
    Config(String),
}

pub(crate) fn config_err(e: impl fmt::Display) -> TlsError {
    TlsError::Config(e.to_string())
}

/// The files `vmm tls` writes (see [`make_certificates`]).
#[derive(Debug)]
pub struct Made {
    /// Every file written.
    pub files: Vec<PathBuf>,
}
