//! Fuzzes every decoder of the page protocol's wire format: whole frames from arbitrary bytes
//! (two page sizes), a valid header of every kind with arbitrary payload, the handshake check
//! both sides run on a decoded Hello / Welcome, and the blocking frame reader over a stream.
//!
//! Asserts: no panic; what decodes re-encodes to the same bytes; a `Pages` frame's runs cover
//! exactly its pages; an accepted layout validates, adds up and equals ours; the reader hands
//! back exactly the bytes of each frame it consumed; peak allocation bounded (decoding borrows
//! from the input; the reader sizes its buffer from a header, never past the frame cap).

#![no_main]

use libfuzzer_sys::fuzz_target;
use proto::handshake::{check, offer, Offer};
use proto::{read_frame, Header, Kind, Layout, Message, HEADER_LEN, MAX_PAYLOAD_BYTES};
use fuzz::peak_during;

/// A decoded Hello / Welcome goes through the handshake check against our offer.
fn handshake(version: u16, page_size: u32, layout: &Layout) {
    let ours = Layout::single(1 << 30);
    let theirs = Offer {
        version,
        page_size,
        layout,
    };
    if check(offer(4096, &ours), theirs).is_ok() {
        assert!(layout.regions.is_empty() || *layout == ours);
    }
    if !layout.regions.is_empty() && layout.validate(page_size).is_ok() {
        let pages = layout.total_pages(page_size);
        assert_eq!(pages * u64::from(page_size), layout.total_bytes());
        let _ = layout.to_string();
    }
}

fuzz_target!(|data: &[u8]| {
    let ((), peak) = peak_during(|| {
        // arbitrary bytes as a frame, for two page sizes
        for ps in [4096u32, 2 << 20] {
            if let Ok((m, used)) = Message::decode_frame(data, ps) {
                assert!(used <= data.len());
                // what decodes re-encodes to the same bytes
                assert_eq!(m.to_vec(), &data[..used]);
                match m {
                    Message::Pages(p) => {
                        let pages: u64 = p.runs(ps).map(|r| u64::from(r.count)).sum();
                        assert_eq!(pages, u64::from(p.count));
                    }
                    Message::Hello(h) => handshake(h.version, h.page_size, &h.layout),
                    Message::Welcome(w) => handshake(w.version, w.page_size, &w.layout),
                    _ => {}
                }
            }
        }
        // the first byte picks a kind, the rest is its payload
        if let Some((&k, rest)) = data.split_first() {
            if let Ok(kind) = Kind::from_u16(u16::from(k % 11)) {
                let h = Header {
                    kind,
                    payload_len: rest.len() as u32,
                };
                if let Ok(m) = Message::decode(&h, rest, 4096) {
                    assert_eq!(m.kind(), kind);
                    assert_eq!(&m.to_vec()[HEADER_LEN..], rest);
                }
            }
        }
    });
    // decoding borrows; re-encoding copies the frame (twice, two page sizes), a layout is small
    assert!(peak <= 64 * 1024 + 4 * data.len(), "decode: {peak} bytes");

    // the stream reader never allocates past the cap, never panics, returns each frame whole
    let ((), peak) = peak_during(|| {
        let mut buf = Vec::new();
        let mut r = data;
        let mut at = 0;
        while let Ok(h) = read_frame(&mut r, &mut buf) {
            let used = data.len() - r.len() - at;
            assert_eq!(used, HEADER_LEN + buf.len());
            assert_eq!(h.encode(), data[at..at + HEADER_LEN]);
            assert!(buf == data[at + HEADER_LEN..at + used]);
            at += used;
        }
    });
    assert!(peak <= MAX_PAYLOAD_BYTES as usize, "reader: {peak} bytes");
});
