//! Decoding a frame's payload into a [`Message`], every length, count and range checked
//! before anything is trusted, and the fixed part of a `Pages` frame for streaming readers.

use crate::error::DecodeError;
use crate::frame::{Header, Kind, HEADER_LEN, MAX_PAYLOAD_BYTES};
use crate::layout::{GuestPhysAddr, Layout, PageIndex, Region, MAX_REGIONS};
use crate::msg::{
    mask_len, Bitmap, BitmapKind, Channel, Hello, Message, Origin, Pages, Request, Welcome,
    MAX_PAGES_PER_FRAME, MAX_PAGE_DATA_BYTES, MAX_REASON_BYTES,
};

/// A cursor over a payload that fails with `Truncated` instead of panicking.
struct Cur<'a> {
    b: &'a [u8],
    what: &'static str,
}

impl<'a> Cur<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.b.len() < n {
            return Err(DecodeError::Truncated {
                what: self.what,
                need: n,
                have: self.b.len(),
            });
        }
        let (h, t) = self.b.split_at(n);
        self.b = t;
        Ok(h)
    }
    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, DecodeError> {
        let s = self.take(2)?;
        Ok(u16::from_le_bytes([s[0], s[1]]))
    }
    fn u32(&mut self) -> Result<u32, DecodeError> {
        let s = self.take(4)?;
        Ok(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
    }
    fn u64(&mut self) -> Result<u64, DecodeError> {
        let s = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(s);
        Ok(u64::from_le_bytes(a))
    }
    /// Reserved bytes: must be zero, so every valid frame has exactly one encoding.
    fn pad(&mut self, n: usize) -> Result<(), DecodeError> {
        let b = self.take(n)?;
        match b.iter().find(|&&x| x != 0) {
            None => Ok(()),
            Some(&x) => Err(DecodeError::InvalidField {
                field: "padding (must be 0)",
                value: x.into(),
            }),
        }
    }
    fn finish(self) -> Result<(), DecodeError> {
        if self.b.is_empty() {
            Ok(())
        } else {
            Err(DecodeError::LengthMismatch {
                what: self.what,
                expected: 0,
                have: self.b.len() as u64,
            })
        }
    }
}

fn decode_layout(c: &mut Cur<'_>) -> Result<Layout, DecodeError> {
    let n = c.u32()?;
    if n as usize > MAX_REGIONS {
        return Err(DecodeError::TooLong {
            what: "region count",
            len: n.into(),
            cap: MAX_REGIONS as u64,
        });
    }
    let mut regions = Vec::with_capacity(n as usize);
    for _ in 0..n {
        let gpa_start = GuestPhysAddr(c.u64()?);
        let len_bytes = c.u64()?;
        regions.push(Region {
            gpa_start,
            len_bytes,
        });
    }
    Ok(Layout { regions })
}

fn decode_channel(v: u8) -> Result<Channel, DecodeError> {
    match v {
        1 => Ok(Channel::Control),
        2 => Ok(Channel::Urgent),
        3 => Ok(Channel::Bulk),
        v => Err(DecodeError::InvalidField {
            field: "channel",
            value: v.into(),
        }),
    }
}

fn check_count(count: u32, what: &'static str) -> Result<(), DecodeError> {
    if count == 0 {
        return Err(DecodeError::InvalidField {
            field: what,
            value: 0,
        });
    }
    if count > MAX_PAGES_PER_FRAME {
        return Err(DecodeError::TooLong {
            what,
            len: count.into(),
            cap: MAX_PAGES_PER_FRAME.into(),
        });
    }
    Ok(())
}

fn check_range(first: u64, count: u64) -> Result<(), DecodeError> {
    if first.checked_add(count).is_none() {
        return Err(DecodeError::InvalidField {
            field: "first page (range wraps)",
            value: first,
        });
    }
    Ok(())
}

impl<'a> Message<'a> {
    /// Decodes the payload of a frame whose header was already decoded. `page_size` is the
    /// session's page size (used to check `Pages` lengths; ignored for other kinds).
    pub fn decode(header: &Header, payload: &'a [u8], page_size: u32) -> Result<Self, DecodeError> {
        if payload.len() != header.payload_len as usize {
            return Err(DecodeError::LengthMismatch {
                what: "frame",
                expected: header.payload_len.into(),
                have: payload.len() as u64,
            });
        }
        let what = match header.kind {
            Kind::Hello => "hello",
            Kind::Welcome => "welcome",
            Kind::Request => "request",
            Kind::Pages => "pages",
            Kind::Bitmap => "bitmap",
            Kind::State => "state",
            Kind::Stream => "stream",
            Kind::Done => "done",
            Kind::Error => "error",
            Kind::InFlight => "in-flight",
        };
        let mut c = Cur { b: payload, what };
        let msg = match header.kind {
            Kind::Hello => {
                let version = c.u16()?;
                let channel = decode_channel(c.u8()?)?;
                c.pad(1)?;
                let page_size = c.u32()?;
                let session = c.u64()?;
                let layout = decode_layout(&mut c)?;
                Message::Hello(Hello {
                    version,
                    channel,
                    session,
                    page_size,
                    layout,
                })
            }
            Kind::Welcome => {
                let version = c.u16()?;
                c.pad(2)?;
                let page_size = c.u32()?;
                let session = c.u64()?;
                let layout = decode_layout(&mut c)?;
                Message::Welcome(Welcome {
                    version,
                    session,
                    page_size,
                    layout,
                })
            }
            Kind::Request => {
                let first = c.u64()?;
                let count = c.u32()?;
                let fault_pages = c.u32()?;
                check_count(count, "request page count")?;
                check_range(first, count.into())?;
                if fault_pages > count {
                    return Err(DecodeError::InvalidField {
                        field: "request fault_pages (over count)",
                        value: fault_pages.into(),
                    });
                }
                Message::Request(Request {
                    first: PageIndex(first),
                    count,
                    fault_pages,
                })
            }
            Kind::Pages => {
                let (first, count, origin) = pages_fixed(c.take(PAGES_FIXED_LEN)?)?;
                let zero_mask = c.take(mask_len(count))?;
                let data_len = pages_data_len(header, count, zero_mask, page_size)?;
                let data = c.take(data_len)?;
                Message::Pages(Pages {
                    first,
                    count,
                    origin,
                    zero_mask,
                    data,
                })
            }
            Kind::Bitmap => {
                let kind = match c.u8()? {
                    1 => BitmapKind::Received,
                    2 => BitmapKind::Dirty,
                    v => {
                        return Err(DecodeError::InvalidField {
                            field: "bitmap kind",
                            value: v.into(),
                        })
                    }
                };
                c.pad(7)?;
                let first = c.u64()?;
                let count = c.u64()?;
                check_range(first, count)?;
                let cap = u64::from(MAX_PAYLOAD_BYTES) * 8;
                if count > cap {
                    return Err(DecodeError::TooLong {
                        what: "bitmap bit count",
                        len: count,
                        cap,
                    });
                }
                let bits = c.take(count.div_ceil(8) as usize)?;
                Message::Bitmap(Bitmap {
                    kind,
                    first: PageIndex(first),
                    count,
                    bits,
                })
            }
            Kind::State => {
                let expected = c.u32()?;
                let blob = c.take(c.b.len())?;
                let actual = crc32fast::hash(blob);
                if actual != expected {
                    return Err(DecodeError::BadCrc { expected, actual });
                }
                Message::State { blob }
            }
            Kind::Stream => {
                let v = c.u8()?;
                if v > 1 {
                    return Err(DecodeError::InvalidField {
                        field: "stream enable",
                        value: v.into(),
                    });
                }
                Message::Stream { enable: v == 1 }
            }
            Kind::Done => Message::Done,
            Kind::InFlight => {
                let first = c.u64()?;
                let count = c.u32()?;
                check_count(count, "in-flight page count")?;
                check_range(first, count.into())?;
                Message::InFlight {
                    first: PageIndex(first),
                    count,
                }
            }
            Kind::Error => {
                let code = c.u16()?;
                let rest = c.take(c.b.len())?;
                if rest.len() > MAX_REASON_BYTES {
                    return Err(DecodeError::TooLong {
                        what: "error reason",
                        len: rest.len() as u64,
                        cap: MAX_REASON_BYTES as u64,
                    });
                }
                let reason = std::str::from_utf8(rest).map_err(|_| DecodeError::BadUtf8)?;
                Message::Error { code, reason }
            }
        };
        c.finish()?;
        Ok(msg)
    }

    /// Decodes one whole frame (header and payload) from the start of `bytes`; returns the
    /// message and the number of bytes it took.
    pub fn decode_frame(bytes: &'a [u8], page_size: u32) -> Result<(Self, usize), DecodeError> {
        let header = Header::decode(bytes)?;
        let end = HEADER_LEN + header.payload_len as usize;
        if bytes.len() < end {
            return Err(DecodeError::Truncated {
                what: "frame payload",
                need: end,
                have: bytes.len(),
            });
        }
        let msg = Message::decode(&header, &bytes[HEADER_LEN..end], page_size)?;
        Ok((msg, end))
    }
}

/// Bytes of a `Pages` payload before its zero mask.
pub const PAGES_FIXED_LEN: usize = 16;

/// Decodes and checks the fixed part of a `Pages` payload (its first [`PAGES_FIXED_LEN`]
/// bytes): first page, count, origin. With [`pages_data_len`], lets a receiver read the page
/// data straight into place instead of into a frame buffer; [`Message::decode`] uses the same
/// two functions.
pub fn pages_fixed(fixed: &[u8]) -> Result<(PageIndex, u32, Origin), DecodeError> {
    let mut c = Cur {
        b: fixed,
        what: "pages",
    };
    let first = c.u64()?;
    let count = c.u32()?;
    let origin = match c.u8()? {
        1 => Origin::Fault,
        2 => Origin::Prefetch,
        3 => Origin::Stream,
        4 => Origin::Precopy,
        v => {
            return Err(DecodeError::InvalidField {
                field: "pages origin",
                value: v.into(),
            })
        }
    };
    c.pad(3)?;
    check_count(count, "pages count")?;
    check_range(first, count.into())?;
    Ok((PageIndex(first), count, origin))
}

/// Checks a `Pages` zero mask (`mask_len(count)` bytes) against the frame's payload length and
/// returns the number of page-data bytes that follow it.
pub fn pages_data_len(
    header: &Header,
    count: u32,
    zero_mask: &[u8],
    page_size: u32,
) -> Result<usize, DecodeError> {
    if zero_mask.len() != mask_len(count) {
        return Err(DecodeError::LengthMismatch {
            what: "pages zero mask",
            expected: mask_len(count) as u64,
            have: zero_mask.len() as u64,
        });
    }
    let tail_bits = count % 8;
    if let (true, Some(last)) = (tail_bits != 0, zero_mask.last()) {
        if last >> tail_bits != 0 {
            return Err(DecodeError::InvalidField {
                field: "zero mask padding bits",
                value: (last >> tail_bits).into(),
            });
        }
    }
    let zeros: u32 = zero_mask.iter().map(|b| b.count_ones()).sum();
    let expected = u64::from(count.saturating_sub(zeros)) * u64::from(page_size);
    if expected > u64::from(MAX_PAGE_DATA_BYTES) {
        return Err(DecodeError::TooLong {
            what: "page data bytes",
            len: expected,
            cap: MAX_PAGE_DATA_BYTES.into(),
        });
    }
    let payload = (PAGES_FIXED_LEN + zero_mask.len()) as u64 + expected;
    if u64::from(header.payload_len) != payload {
        return Err(DecodeError::LengthMismatch {
            what: "pages",
            expected: payload,
            have: header.payload_len.into(),
        });
    }
    Ok(expected as usize)
}
