//! Messages: the payload of each frame kind, encoded after the header. Variable parts borrow
//! from the payload buffer, so decoding a page frame copies nothing.

use crate::frame::PROTOCOL_VERSION;
use crate::layout::{Layout, PageIndex};

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
