//! The fixed 16-byte frame header, and helpers that read and write whole frames over any
//! `Read`/`Write` (the only I/O this crate knows of is those two traits).

use std::io::{self, Read, Write};

use thiserror::Error;

use crate::error::DecodeError;

/// First four bytes of every frame: `UFPG` in ASCII.
pub const MAGIC: u32 = u32::from_le_bytes(*b"UFPG");
/// The protocol version this crate speaks. See the version policy in the crate docs.
pub const PROTOCOL_VERSION: u16 = 1;
/// Bytes in a frame header.
pub const HEADER_LEN: usize = 16;
/// Largest payload a peer may announce; checked before anything is allocated for it.
pub const MAX_PAYLOAD_BYTES: u32 = (8 << 20) + (64 << 10);

/// Message kinds. Value 0 is reserved as invalid so a zeroed buffer never decodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum Kind {
    /// Client → server: opens a channel.
    Hello = 1,
    /// Server → client: accepts a channel, carries the memory layout.
    Welcome = 2,
    /// Client → server: send these pages.
    Request = 3,
    /// Server → client: page contents, zero pages elided.
    Pages = 4,
    /// Either way: a bitmap of received or dirty pages.
    Bitmap = 5,
    /// Either way: an opaque state blob with CRC.
    State = 6,
    /// Client → server: start or stop the background stream.
    Stream = 7,
    /// Client → server: every page is present; the client no longer needs the server.
    Done = 8,
    /// Either way: a fatal error with a reason; the sender closes the connection.
    Error = 9,
    /// Server → client, on the urgent channel: the requested pages are already on their way
    /// on a bulk connection; the reply to a `Request` instead of `Pages`.
    InFlight = 10,
}

impl Kind {
    /// Maps a wire value to a kind.
    pub fn from_u16(v: u16) -> Result<Kind, DecodeError> {
        Ok(match v {
            1 => Kind::Hello,
            2 => Kind::Welcome,
            3 => Kind::Request,
            4 => Kind::Pages,
            5 => Kind::Bitmap,
            6 => Kind::State,
            7 => Kind::Stream,
            8 => Kind::Done,
            9 => Kind::Error,
            10 => Kind::InFlight,
            other => return Err(DecodeError::UnknownKind(other)),
        })
    }
}

/// A decoded frame header: `magic u32 | version u16 | kind u16 | payload_len u32 | reserved u32`,
/// little-endian.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// What the payload is.
    pub kind: Kind,
    /// Bytes of payload that follow the header.
    pub payload_len: u32,
}

impl Header {
    /// Encodes the header.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        b[4..6].copy_from_slice(&PROTOCOL_VERSION.to_le_bytes());
        b[6..8].copy_from_slice(&(self.kind as u16).to_le_bytes());
        b[8..12].copy_from_slice(&self.payload_len.to_le_bytes());
        b
    }

    /// Decodes and checks a header: magic, version, kind, reserved bits, payload cap.
    pub fn decode(b: &[u8]) -> Result<Header, DecodeError> {
        if b.len() < HEADER_LEN {
            return Err(DecodeError::Truncated {
                what: "frame header",
                need: HEADER_LEN,
                have: b.len(),
            });
        }
        let magic = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        if magic != MAGIC {
            return Err(DecodeError::BadMagic {
                found: magic,
                expected: MAGIC,
            });
        }
        let version = u16::from_le_bytes([b[4], b[5]]);
        if version != PROTOCOL_VERSION {
            return Err(DecodeError::UnsupportedVersion {
                ours: PROTOCOL_VERSION,
                theirs: version,
            });
        }
        let kind = Kind::from_u16(u16::from_le_bytes([b[6], b[7]]))?;
        let payload_len = u32::from_le_bytes([b[8], b[9], b[10], b[11]]);
        if payload_len > MAX_PAYLOAD_BYTES {
            return Err(DecodeError::TooLong {
                what: "frame payload",
                len: payload_len.into(),
                cap: MAX_PAYLOAD_BYTES.into(),
            });
        }
        let reserved = u32::from_le_bytes([b[12], b[13], b[14], b[15]]);
        if reserved != 0 {
            return Err(DecodeError::ReservedNotZero(reserved));
        }
        Ok(Header { kind, payload_len })
    }
}

/// Reading a frame failed.
#[derive(Debug, Error)]
pub enum ReadError {
    /// The peer closed the connection cleanly between frames.
    #[error("peer closed the connection")]
    Closed,
    /// The peer closed the connection in the middle of a frame.
    #[error("peer closed the connection mid-frame ({got} of {want} bytes)")]
    TruncatedFrame {
        /// Bytes received.
        got: usize,
        /// Bytes the frame needed.
        want: usize,
    },
    /// The bytes are not a valid frame.
    #[error("invalid frame")]
    Decode(#[from] DecodeError),
    /// The transport failed.
    #[error("read failed")]
    Io(#[source] io::Error),
}

fn read_full<R: Read + ?Sized>(
    r: &mut R,
    buf: &mut [u8],
    at_boundary: bool,
) -> Result<(), ReadError> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) if got == 0 && at_boundary => return Err(ReadError::Closed),
            Ok(0) => {
                return Err(ReadError::TruncatedFrame {
                    got,
                    want: buf.len(),
                })
            }
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(ReadError::Io(e)),
        }
    }
    Ok(())
}

/// Reads one frame: the header (checked), then its payload into `buf` (resized to exactly the
/// payload; never beyond [`MAX_PAYLOAD_BYTES`]). The buffer grows as the payload arrives, not
/// to what the header announces: a peer that announces the cap and sends a few bytes costs a
/// few bytes.
pub fn read_frame<R: Read + ?Sized>(r: &mut R, buf: &mut Vec<u8>) -> Result<Header, ReadError> {
    let mut hb = [0u8; HEADER_LEN];
    read_full(r, &mut hb, true)?;
    let header = Header::decode(&hb)?;
    let len = header.payload_len as usize;
    buf.clear();
    Read::take(&mut *r, len as u64)
        .read_to_end(buf)
        .map_err(ReadError::Io)?;
    if buf.len() < len {
        return Err(ReadError::TruncatedFrame {
            got: buf.len(),
            want: len,
        });
    }
    Ok(header)
}

/// Writes a whole encoded message (as produced by [`crate::Message::encode`]).
pub fn write_frame<W: Write + ?Sized>(w: &mut W, encoded: &[u8]) -> io::Result<()> {
    w.write_all(encoded)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip_and_checks() {
        let h = Header {
            kind: Kind::Pages,
            payload_len: 77,
        };
        let b = h.encode();
        assert_eq!(Header::decode(&b).unwrap(), h);
        let mut bad = b;
        bad[0] ^= 1;
        assert!(matches!(
            Header::decode(&bad),
            Err(DecodeError::BadMagic { .. })
        ));
        let mut bad = b;
        bad[4] = 9;
        assert_eq!(
            Header::decode(&bad),
            Err(DecodeError::UnsupportedVersion { ours: 1, theirs: 9 })
        );
        let mut bad = b;
        bad[6] = 0;
        assert_eq!(Header::decode(&bad), Err(DecodeError::UnknownKind(0)));
        let mut bad = b;
        bad[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            Header::decode(&bad),
            Err(DecodeError::TooLong { .. })
        ));
        let mut bad = b;
        bad[15] = 1;
        assert!(matches!(
            Header::decode(&bad),
            Err(DecodeError::ReservedNotZero(_))
        ));
        assert!(matches!(
            Header::decode(&b[..5]),
            Err(DecodeError::Truncated { .. })
        ));
    }

    #[test]
    fn read_frame_reports_truncation_and_close() {
        let mut buf = Vec::new();
        let empty: &[u8] = &[];
        assert!(matches!(
            read_frame(&mut &*empty, &mut buf),
            Err(ReadError::Closed)
        ));
        let h = Header {
            kind: Kind::Done,
            payload_len: 4,
        }
        .encode();
        let mut partial = h.to_vec();
        partial.extend_from_slice(&[1, 2]);
        assert!(matches!(
            read_frame(&mut &partial[..], &mut buf),
            Err(ReadError::TruncatedFrame { got: 2, want: 4 })
        ));
        // a header announcing the cap, then 10 bytes: nothing near the cap is allocated
        let mut big = Header {
            kind: Kind::State,
            payload_len: MAX_PAYLOAD_BYTES,
        }
        .encode()
        .to_vec();
        big.extend_from_slice(&[7; 10]);
        let mut buf = Vec::new();
        assert!(matches!(
            read_frame(&mut &big[..], &mut buf),
            Err(ReadError::TruncatedFrame { got: 10, want }) if want == MAX_PAYLOAD_BYTES as usize
        ));
        assert!(
            buf.capacity() < 1 << 20,
            "{} bytes allocated",
            buf.capacity()
        );
        // and a whole frame after it reads exactly
        let mut ok = Header {
            kind: Kind::Done,
            payload_len: 3,
        }
        .encode()
        .to_vec();
        ok.extend_from_slice(&[1, 2, 3]);
        assert_eq!(read_frame(&mut &ok[..], &mut buf).unwrap().payload_len, 3);
        assert_eq!(buf, [1, 2, 3]);
    }
}
