//! Fuzzes every decoder of the wire format: whole frames from arbitrary bytes, a valid header
//! of every kind with arbitrary payload, and the blocking frame reader.

#![no_main]

use libfuzzer_sys::fuzz_target;
use proto::{read_frame, Header, Kind, Message};

fuzz_target!(|data: &[u8]| {
    // arbitrary bytes as a frame, for two page sizes
    for ps in [4096u32, 2 << 20] {
        if let Ok((m, used)) = Message::decode_frame(data, ps) {
            assert!(used <= data.len());
            // what decodes re-encodes to the same bytes
            assert_eq!(m.to_vec(), &data[..used]);
            if let Message::Pages(p) = m {
                let pages: u64 = p.runs(ps).map(|r| u64::from(r.count)).sum();
                assert_eq!(pages, u64::from(p.count));
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
            let _ = Message::decode(&h, rest, 4096);
        }
    }
    // the stream reader never allocates past the cap, never panics
    let mut buf = Vec::new();
    let mut r = data;
    while read_frame(&mut r, &mut buf).is_ok() {}
});
