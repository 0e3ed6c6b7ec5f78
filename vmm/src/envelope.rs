//! The one envelope of the VMM's encoded values, used by the state file ([`crate::state`]) and
//! by every message of the migration link ([`crate::migration::wire`]): a `proto` frame of kind
//! `State` (magic, protocol version, a length checked against the frame cap before anything is
//! read, CRC32 over the blob) whose blob is a `u32` LE version, then the postcard encoding of
//! the value. Each user has its own version and maps [`EnvelopeError`] into its own error, so
//! that what a user reads names the file or the peer.

use proto::{DecodeError, Kind, Message};
use serde::de::DeserializeOwned;
use serde::Serialize;
use thiserror::Error;

/// An envelope could not be made or opened.
#[derive(Debug, Error)]
pub enum EnvelopeError {
    /// The value did not encode.
    #[error("does not encode")]
    Encode(#[source] postcard::Error),
    /// The encoded value is over its cap.
    #[error("{bytes} bytes exceed the frame cap")]
    TooLarge {
        /// Version and value.
        bytes: usize,
    },
    /// Not a valid frame (magic, protocol version, length, CRC).
    #[error("not a valid frame")]
    Frame(#[source] DecodeError),
    /// Bytes after the frame.
    #[error("{0} bytes after the frame")]
    Trailing(usize),
    /// A frame of another kind.
    #[error("a {0:?} frame, not a State frame")]
    NotState(Kind),
    /// No version in the blob.
    #[error("empty blob")]
    Empty,
    /// Another version.
    #[error("version {found}")]
    Version {
        /// The blob's.
        found: u32,
    },
    /// The value does not decode.
    #[error("does not decode")]
    Decode(#[source] postcard::Error),
    /// Bytes after the value in the blob.
    #[error("{0} bytes after the value")]
    Left(usize),
}

/// Encodes `value` at `version` into one frame; refuses a version + value over `max_blob`
/// bytes.
pub fn seal<T: Serialize>(
    version: u32,
    value: &T,
    max_blob: usize,
) -> Result<Vec<u8>, EnvelopeError> {
    let mut blob = version.to_le_bytes().to_vec();
    postcard::to_io(value, &mut blob).map_err(EnvelopeError::Encode)?;
    if blob.len() > max_blob {
        return Err(EnvelopeError::TooLarge { bytes: blob.len() });
    }
    let mut out = Vec::with_capacity(blob.len() + 32);
    Message::State { blob: &blob }.encode(&mut out);
    Ok(out)
}

/// Decodes exactly one frame holding a value of `version`.
pub fn open<T: DeserializeOwned>(bytes: &[u8], version: u32) -> Result<T, EnvelopeError> {
    let (msg, used) =
        Message::decode_frame(bytes, crate::memory::PAGE_SIZE).map_err(EnvelopeError::Frame)?;
    if used != bytes.len() {
        return Err(EnvelopeError::Trailing(bytes.len() - used));
    }
    let Message::State { blob } = msg else {
        return Err(EnvelopeError::NotState(msg.kind()));
    };
    let Some((v, rest)) = blob.split_first_chunk::<4>() else {
        return Err(EnvelopeError::Empty);
    };
    let found = u32::from_le_bytes(*v);
    if found != version {
        return Err(EnvelopeError::Version { found });
    }
    let (value, left) = postcard::take_from_bytes::<T>(rest).map_err(EnvelopeError::Decode)?;
    if !left.is_empty() {
        return Err(EnvelopeError::Left(left.len()));
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_round_trip_and_every_damage_is_named() {
        let v: (u32, String) = (7, "seven".into());
        let e = seal(3, &v, 1 << 20).unwrap();
        assert_eq!(open::<(u32, String)>(&e, 3).unwrap(), v);
        assert!(matches!(
            open::<(u32, String)>(&e, 4),
            Err(EnvelopeError::Version { found: 3 })
        ));
        let mut long = e.clone();
        long.push(0);
        assert!(matches!(
            open::<(u32, String)>(&long, 3),
            Err(EnvelopeError::Trailing(1))
        ));
        let mut flipped = e.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 1;
        assert!(matches!(
            open::<(u32, String)>(&flipped, 3),
            Err(EnvelopeError::Frame(_))
        ));
        // a value with bytes left over in its blob
        let more = seal(3, &(v.clone(), 9u8), 1 << 20).unwrap();
        assert!(matches!(
            open::<(u32, String)>(&more, 3),
            Err(EnvelopeError::Left(1))
        ));
        assert!(matches!(
            seal(3, &vec![0u8; 100], 50),
            Err(EnvelopeError::TooLarge { bytes: 105 })
        ));
    }
}
