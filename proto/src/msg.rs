//! Messages: the payload of each frame kind, encoded after the header. Variable parts borrow
//! from the payload buffer, so decoding a page frame copies nothing.

use crate::error::DecodeError;
use crate::frame::{Header, Kind, HEADER_LEN, MAX_PAYLOAD_BYTES, PROTOCOL_VERSION};
use crate::layout::{GuestPhysAddr, Layout, PageIndex, Region, MAX_REGIONS};

/// At most this many pages in one `Pages` frame or one `Request`.
pub const MAX_PAGES_PER_FRAME: u32 = 2048;
/// At most this many bytes of page data in one `Pages` frame.
pub const MAX_PAGE_DATA_BYTES: u32 = 8 << 20;
/// At most this many bytes in an error reason.
pub const MAX_REASON_BYTES: usize = 4096;

/// Which channel a connection is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Channel {
    /// Session setup, stream control, bitmaps, state, done.
    Control = 1,
    /// Fault requests and their replies only (latency-critical).
    Urgent = 2,
    /// The background stream (throughput).
    Bulk = 3,
}

/// Why a page was sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Origin {
    /// The page a fault asked for.
    Fault = 1,
    /// A page sent with a fault's reply, around the faulting page.
    Prefetch = 2,
    /// The background stream.
    Stream = 3,
    /// The background stream while the source still runs (pre-copy): the page may be dirtied
    /// again after it was sent, and the receiver drops such a copy once told the page is dirty.
    Precopy = 4,
}

/// What a bitmap means.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum BitmapKind {
    /// Pages the receiver already has.
    Received = 1,
    /// Pages modified since they were sent.
    Dirty = 2,
}

/// Opens a channel. For `Control`, `session` is 0 and the server allocates one; for the other
/// channels it is the session the control channel was given. An empty `layout` means "whatever
/// the server serves"; a non-empty one must equal the server's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// The client's protocol version.
    pub version: u16,
    /// Which channel this connection is.
    pub channel: Channel,
    /// The session this channel belongs to.
    pub session: u64,
    /// The client's page size in bytes.
    pub page_size: u32,
    /// The layout the client expects (may be empty).
    pub layout: Layout,
}

/// Accepts a channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Welcome {
    /// The server's protocol version.
    pub version: u16,
    /// The session.
    pub session: u64,
    /// The server's page size in bytes.
    pub page_size: u32,
    /// The memory the server serves.
    pub layout: Layout,
}

/// Asks for `count` pages from `first`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// First page.
    pub first: PageIndex,
    /// Number of pages (1..=[`MAX_PAGES_PER_FRAME`]).
    pub count: u32,
    /// How many of the pages, from `first`, a fault is waiting on; the rest are prefetch.
    pub fault_pages: u32,
}

/// A run of pages; pages whose bit is set in `zero_mask` are all zero and carry no bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pages<'a> {
    /// First page.
    pub first: PageIndex,
    /// Number of pages.
    pub count: u32,
    /// Why they were sent.
    pub origin: Origin,
    /// Bit i (LSB-first in each byte) set: page `first + i` is zero.
    pub zero_mask: &'a [u8],
    /// The non-zero pages' bytes, in order.
    pub data: &'a [u8],
}

/// A bitmap over `count` pages from `first`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bitmap<'a> {
    /// What the bits mean.
    pub kind: BitmapKind,
    /// Page of bit 0.
    pub first: PageIndex,
    /// Number of bits.
    pub count: u64,
    /// LSB-first bits, `ceil(count / 8)` bytes.
    pub bits: &'a [u8],
}

/// One decoded message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message<'a> {
    /// See [`Hello`].
    Hello(Hello),
    /// See [`Welcome`].
    Welcome(Welcome),
    /// See [`Request`].
    Request(Request),
    /// See [`Pages`].
    Pages(Pages<'a>),
    /// See [`Bitmap`].
    Bitmap(Bitmap<'a>),
    /// Opaque state; the CRC was checked while decoding.
    State {
        /// The bytes.
        blob: &'a [u8],
    },
    /// Start (`true`) or stop the background stream.
    Stream {
        /// On or off.
        enable: bool,
    },
    /// Every page is present.
    Done,
    /// The reply to a `Request` whose leading `count` pages from `first` (the request's first)
    /// this session already sent on a bulk connection: they are not sent again, the client
    /// waits for the stream to deliver them.
    InFlight {
        /// The request's first page.
        first: PageIndex,
        /// Leading pages of the request already sent (1..=the request's count).
        count: u32,
    },
    /// A fatal error.
    Error {
        /// Machine-readable code (see [`error_code`]).
        code: u16,
        /// Human-readable reason.
        reason: &'a str,
    },
}

/// Codes carried by [`Message::Error`].
pub mod error_code {
    /// The handshake failed (version, page size, layout).
    pub const HANDSHAKE: u16 = 1;
    /// The peer sent something invalid.
    pub const PROTOCOL: u16 = 2;
    /// A request was out of range.
    pub const OUT_OF_RANGE: u16 = 3;
    /// The session is unknown.
    pub const NO_SESSION: u16 = 4;
    /// The sender is shutting down.
    pub const SHUTDOWN: u16 = 5;
}

/// Bytes of a zero mask for `count` pages.
pub fn mask_len(count: u32) -> usize {
    (count as usize).div_ceil(8)
}

/// Whether bit `i` is set in an LSB-first bitmap.
#[inline]
pub fn bit(bits: &[u8], i: usize) -> bool {
    bits[i / 8] & (1 << (i % 8)) != 0
}

/// Encodes the header, fixed fields and zero mask of a `Pages` frame whose `data_len` bytes of
/// page data the caller writes right after (e.g. straight from guest memory with `writev`).
pub fn encode_pages_prefix(
    first: PageIndex,
    count: u32,
    origin: Origin,
    zero_mask: &[u8],
    data_len: usize,
    out: &mut Vec<u8>,
) {
    let payload = 16 + zero_mask.len() + data_len;
    push_header(out, Kind::Pages, payload);
    out.extend_from_slice(&first.0.to_le_bytes());
    out.extend_from_slice(&count.to_le_bytes());
    out.extend_from_slice(&[origin as u8, 0, 0, 0]);
    out.extend_from_slice(zero_mask);
}

fn push_header(out: &mut Vec<u8>, kind: Kind, payload_len: usize) {
    let payload_len = u32::try_from(payload_len).unwrap_or(u32::MAX);
    out.extend_from_slice(&Header { kind, payload_len }.encode());
}

fn encode_layout(out: &mut Vec<u8>, layout: &Layout) {
    out.extend_from_slice(&(layout.regions.len() as u32).to_le_bytes());
    for r in &layout.regions {
        out.extend_from_slice(&r.gpa_start.0.to_le_bytes());
        out.extend_from_slice(&r.len_bytes.to_le_bytes());
    }
}

impl Message<'_> {
    /// The frame kind of this message.
    pub fn kind(&self) -> Kind {
        match self {
            Message::Hello(_) => Kind::Hello,
            Message::Welcome(_) => Kind::Welcome,
            Message::Request(_) => Kind::Request,
            Message::Pages(_) => Kind::Pages,
            Message::Bitmap(_) => Kind::Bitmap,
            Message::State { .. } => Kind::State,
            Message::Stream { .. } => Kind::Stream,
            Message::Done => Kind::Done,
            Message::Error { .. } => Kind::Error,
            Message::InFlight { .. } => Kind::InFlight,
        }
    }

    /// Appends the whole frame (header and payload) to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(&[0u8; HEADER_LEN]);
        match self {
            Message::Hello(h) => {
                out.extend_from_slice(&h.version.to_le_bytes());
                out.extend_from_slice(&[h.channel as u8, 0]);
                out.extend_from_slice(&h.page_size.to_le_bytes());
                out.extend_from_slice(&h.session.to_le_bytes());
                encode_layout(out, &h.layout);
            }
            Message::Welcome(w) => {
                out.extend_from_slice(&w.version.to_le_bytes());
                out.extend_from_slice(&[0, 0]);
                out.extend_from_slice(&w.page_size.to_le_bytes());
                out.extend_from_slice(&w.session.to_le_bytes());
                encode_layout(out, &w.layout);
            }
            Message::Request(r) => {
                out.extend_from_slice(&r.first.0.to_le_bytes());
                out.extend_from_slice(&r.count.to_le_bytes());
                out.extend_from_slice(&r.fault_pages.to_le_bytes());
            }
            Message::Pages(p) => {
                out.truncate(start);
                encode_pages_prefix(p.first, p.count, p.origin, p.zero_mask, p.data.len(), out);
                out.extend_from_slice(p.data);
                return;
            }
            Message::Bitmap(b) => {
                out.extend_from_slice(&[b.kind as u8, 0, 0, 0, 0, 0, 0, 0]);
                out.extend_from_slice(&b.first.0.to_le_bytes());
                out.extend_from_slice(&b.count.to_le_bytes());
                out.extend_from_slice(b.bits);
            }
            Message::State { blob } => {
                out.extend_from_slice(&crc32fast::hash(blob).to_le_bytes());
                out.extend_from_slice(blob);
            }
            Message::Stream { enable } => out.push(u8::from(*enable)),
            Message::Done => {}
            Message::InFlight { first, count } => {
                out.extend_from_slice(&first.0.to_le_bytes());
                out.extend_from_slice(&count.to_le_bytes());
            }
            Message::Error { code, reason } => {
                let mut end = reason.len().min(MAX_REASON_BYTES);
                while !reason.is_char_boundary(end) {
                    end -= 1;
                }
                out.extend_from_slice(&code.to_le_bytes());
                out.extend_from_slice(&reason.as_bytes()[..end]);
            }
        }
        let payload_len = out.len() - start - HEADER_LEN;
        let header = Header {
            kind: self.kind(),
            payload_len: u32::try_from(payload_len).unwrap_or(u32::MAX),
        }
        .encode();
        out[start..start + HEADER_LEN].copy_from_slice(&header);
    }

    /// Encodes into a new buffer.
    pub fn to_vec(&self) -> Vec<u8> {
        let mut v = Vec::new();
        self.encode(&mut v);
        v
    }
}

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

/// A contiguous run inside a `Pages` frame: all zero (`data: None`) or all carrying bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run<'a> {
    /// First page of the run.
    pub first: PageIndex,
    /// Pages in the run.
    pub count: u32,
    /// The run's bytes (`count * page_size`), or `None` for zero pages.
    pub data: Option<&'a [u8]>,
}

impl<'a> Pages<'a> {
    /// Splits the frame into maximal runs of zero and non-zero pages, in page order.
    pub fn runs(&self, page_size: u32) -> impl Iterator<Item = Run<'a>> + '_ {
        let ps = page_size as usize;
        let mut i = 0u32;
        let mut off = 0usize;
        std::iter::from_fn(move || {
            if i >= self.count {
                return None;
            }
            let zero = bit(self.zero_mask, i as usize);
            let start = i;
            while i < self.count && bit(self.zero_mask, i as usize) == zero {
                i += 1;
            }
            let n = i - start;
            let data = if zero {
                None
            } else {
                let bytes = n as usize * ps;
                let d = self.data.get(off..off + bytes);
                off += bytes;
                d
            };
            Some(Run {
                first: PageIndex(self.first.0 + u64::from(start)),
                count: n,
                data: if zero {
                    None
                } else {
                    Some(data.unwrap_or(&[]))
                },
            })
        })
    }
}

/// The Hello a client sends for `channel`.
pub fn hello(channel: Channel, session: u64, page_size: u32, layout: Layout) -> Message<'static> {
    Message::Hello(Hello {
        version: PROTOCOL_VERSION,
        channel,
        session,
        page_size,
        layout,
    })
}
