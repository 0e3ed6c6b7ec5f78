//! Wire format of the post-copy paging protocol. This crate does no I/O beyond the `Read` /
//! `Write` traits: every message is encoded into and decoded from byte buffers, so every rule
//! below is unit-tested without a socket.
//!
//! # Connections
//! A client (the destination's pager) opens, to one server (the source's page-server):
//! - one **control** connection: `Hello{Control, session 0}` → `Welcome{session, layout}`; then
//!   `Stream{enable}`, `Bitmap{Received}` (after a reconnect), `State`, and finally `Done`;
//! - one **urgent** connection (TCP_NODELAY): `Hello{Urgent, session}` → `Welcome`; then only
//!   `Request` → `Pages{Fault|Prefetch}` or `InFlight`, answered in order (one reply per
//!   request), never queued behind bulk data;
//! - one or more **bulk** connections: `Hello{Bulk, session}` → `Welcome`; then the server sends
//!   `Pages{Stream}` frames while the stream is enabled, until every page was sent once.
//!
//! ```text
//!  client (pager)                                   server (page-server)
//!  control: Hello(Control, 0, page_size, layout?) ──►  check versions / page size / layout
//!           ◄── Welcome(session, page_size, layout)   (or Error(HANDSHAKE, "…ours X, theirs Y"))
//!  urgent:  Hello(Urgent, session)                ──►
//!           ◄── Welcome
//!  bulk×N:  Hello(Bulk, session)                  ──►
//!           ◄── Welcome
//!  control: Stream(enable)                        ──►  stream cursor starts
//!  urgent:  Request(first, count, fault_pages)    ──►  cursor moves to follow the fault
//!           ◄── Pages(first, n, Fault, zero mask, data)   (first not sent yet: it and the
//!                                                          unsent pages after it, n ≤ count)
//!           ◄── InFlight(first, n)                (first already sent on a bulk connection:
//!                                                  the client waits for the stream)
//!  bulk:    ◄── Pages(…, Stream, …) …  (each page at most once per session)
//!  control: Done                                  ──►  session ends, connections close
//! ```
//!
//! # Each page once per session
//! A session sends every page at most once, on whichever channel claims it first; a fault
//! on a page the stream has already sent is answered `InFlight` and waits for the stream.
//! Only a new session (after a reconnect) sends a page again: it starts from the client's
//! `Bitmap{Received}`, so a page lost with a broken bulk connection is sent once more.
//! A client may open its bulk connections and delay `Stream(enable)` (e.g. until a migrating
//! VM has paused on the source): until then only requested pages are sent.
//!
//! # Frames
//! Every frame is a 16-byte header — `magic "UFPG" | version u16 | kind u16 | payload_len u32 |
//! reserved u32 (0)`, little-endian — then `payload_len` bytes (at most [`MAX_PAYLOAD_BYTES`],
//! checked before any allocation). Kind 0 is reserved as invalid. A `Pages` payload is `first u64 |
//! count u32 | origin u8 | pad[3] | zero_mask[ceil(count/8)] | data`, where `data` holds only the
//! pages whose zero bit is clear: a zero page costs one bit.
//!
//! # Version policy
//! [`PROTOCOL_VERSION`] is bumped on any change to the bytes of an existing message; a frame of
//! another version is refused with [`DecodeError::UnsupportedVersion`] and the handshake names
//! both versions. New message kinds get new numbers; unknown kinds are refused, never skipped.
//! (`InFlight`, kind 10, was added this way: both sides of this workspace are built together;
//! a peer that predates it fails its urgent connection on the unknown kind, not silently.)
//! Golden fixtures in `tests/golden.rs` fail on any accidental change of the bytes.

pub mod bitmap;
mod decode;
mod encode;
mod error;
mod frame;
pub mod handshake;
mod layout;
mod msg;
mod zero;

pub use decode::{pages_data_len, pages_fixed, PAGES_FIXED_LEN};
pub use encode::encode_pages_prefix;
pub use error::{DecodeError, HandshakeError};
pub use frame::{
    read_frame, write_frame, Header, Kind, ReadError, HEADER_LEN, MAGIC, MAX_PAYLOAD_BYTES,
    PROTOCOL_VERSION,
};
pub use layout::{
    check_page_size, GuestPhysAddr, Layout, PageIndex, Region, MAX_LAYOUT_BYTES, MAX_REGIONS,
};
pub use msg::{
    bit, error_code, hello, mask_len, Bitmap, BitmapKind, Channel, Hello, Message, Origin, Pages,
    Request, Run, Welcome, MAX_PAGES_PER_FRAME, MAX_PAGE_DATA_BYTES, MAX_REASON_BYTES,
};
pub use zero::is_zero_page;
