//! Fuzzes the migration link: `vmm::migration::decode` on one frame, and the link's reader
//! (what `Link::recv` does: `proto::read_frame` off the stream, the frame put back together,
//! then `decode`) on a stream of frames. Input: see `fuzz::Input` (first byte: raw bytes,
//! or a postcard `Wire` body / a versioned blob framed with a valid CRC).
//!
//! Asserts: no panic; what decodes re-encodes to a value that encodes to the same bytes (and a
//! `State`'s envelope decodes as the destination decodes it, with the same check); the reader
//! hands back exactly the frame bytes it consumed; peak allocation linear in the input.

#![no_main]

use libfuzzer_sys::fuzz_target;
use proto::{read_frame, HEADER_LEN, MAX_PAYLOAD_BYTES};
use fuzz::{bound, check_wire, input, peak_during, Input};
use vmm::migration::{decode, MIGRATION_VERSION};

fuzz_target!(|data: &[u8]| {
    let Some(inp) = input(data, MIGRATION_VERSION) else {
        return;
    };
    let bytes: &[u8] = match &inp {
        Input::Raw(b) => b,
        Input::Framed(f) => f,
    };
    let ((), peak) = peak_during(|| {
        if let Ok(w) = decode(bytes) {
            check_wire(&w);
        }
    });
    assert!(
        peak <= bound(bytes.len()),
        "decode: {peak} bytes for {}",
        bytes.len()
    );

    if let Input::Raw(stream) = inp {
        // the link's reader: frame after frame until the stream ends or one is invalid
        let ((), peak) = peak_during(|| {
            let mut r = stream;
            let mut buf = Vec::new();
            let mut at = 0;
            while let Ok(h) = read_frame(&mut r, &mut buf) {
                let used = stream.len() - r.len() - at;
                assert_eq!(used, HEADER_LEN + buf.len());
                let mut frame = Vec::with_capacity(used);
                frame.extend_from_slice(&h.encode());
                frame.extend_from_slice(&buf);
                assert!(frame == stream[at..at + used], "reader and stream disagree");
                at += used;
                if let Ok(w) = decode(&frame) {
                    check_wire(&w);
                }
            }
        });
        // the reader sizes its buffer from the header (capped) before the payload arrives
        let cap = HEADER_LEN + MAX_PAYLOAD_BYTES as usize;
        assert!(peak <= cap + bound(stream.len()), "reader: {peak} bytes");
    }
});
