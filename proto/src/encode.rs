//! Encoding every [`Message`] into a frame (header and payload).

use crate::frame::{Header, Kind, HEADER_LEN};
use crate::layout::Layout;
use crate::layout::PageIndex;
use crate::msg::{Message, Origin, MAX_REASON_BYTES};

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
