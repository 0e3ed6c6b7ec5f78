//! Fuzzes the snapshot / state envelope decoder `vmm::state::decode` (state files, and the
//! envelope a migration's `State` message carries). Input: see `fuzz::Input` (first
//! byte: raw envelope bytes, or a postcard `Snapshot` body / a versioned blob framed with a
//! valid CRC).
//!
//! Asserts: no panic; what decodes re-encodes to a snapshot that encodes to the same bytes;
//! the KVM-owned pages derived from it are sorted, distinct, page-aligned; peak allocation
//! linear in the input.

#![no_main]

use libfuzzer_sys::fuzz_target;
use fuzz::{bound, check_envelope, input, peak_during, Input};
use vmm::state::STATE_VERSION;

fuzz_target!(|data: &[u8]| {
    let Some(inp) = input(data, STATE_VERSION) else {
        return;
    };
    let bytes: &[u8] = match &inp {
        Input::Raw(b) => b,
        Input::Framed(f) => f,
    };
    let ((), peak) = peak_during(|| check_envelope(bytes));
    assert!(
        peak <= bound(bytes.len()),
        "{peak} bytes for {}",
        bytes.len()
    );
});
