//! Shared by the fuzz targets: an allocation meter (peak bytes live at once while a decoder
//! runs), the way the `wire` and `state` targets turn fuzz input into a frame, and the
//! round-trip checks of the vmm's decoders.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

use proto::Message;
use vmm::migration::{self, MigrationError, Wire};
use vmm::persist::StateError;
use vmm::state::{self, Snapshot};

/// Counts the bytes the Rust side has live (libFuzzer's own C++ allocations are not counted).
struct Meter;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

fn grew(n: usize) {
    let now = LIVE.fetch_add(n, Relaxed) + n;
    PEAK.fetch_max(now, Relaxed);
}

// SAFETY: every call is forwarded to `System` unchanged; only counters are updated.
unsafe impl GlobalAlloc for Meter {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        // SAFETY: forwarded with the caller's guarantees.
        let p = unsafe { System.alloc(l) };
        if !p.is_null() {
            grew(l.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        // SAFETY: forwarded with the caller's guarantees.
        let p = unsafe { System.alloc_zeroed(l) };
        if !p.is_null() {
            grew(l.size());
        }
        p
    }

    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { System.dealloc(p, l) };
        LIVE.fetch_sub(l.size(), Relaxed);
    }

    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        // SAFETY: forwarded with the caller's guarantees.
        let q = unsafe { System.realloc(p, l, new) };
        if !q.is_null() {
            if new >= l.size() {
                grew(new - l.size());
            } else {
                LIVE.fetch_sub(l.size() - new, Relaxed);
            }
        }
        q
    }
}

#[global_allocator]
static METER: Meter = Meter;

/// Runs `f`; returns its result and the most bytes it had allocated at once (above what was
/// live when it started).
pub fn peak_during<R>(f: impl FnOnce() -> R) -> (R, usize) {
    let base = LIVE.load(Relaxed);
    PEAK.store(base, Relaxed);
    let r = f();
    (r, PEAK.load(Relaxed).saturating_sub(base))
}

/// Bytes a decoder may hold per input byte. The largest legitimate amplification: kvm-bindings
/// decodes each KVM struct from a byte string of any length (zero-filled), so one input byte
/// yields a whole struct: a 40-byte CPUID entry per byte in an `Offer` (x2 for Vec doubling
/// and the copy while it grows). The 6 KiB `VcpuState` of 12 bytes would be ~520x, but the
/// state decoder caps the vCPUs (16) and CPUID entries (256) it takes, which the fixed
/// allowance covers; before those caps an 8.4 MB envelope decoded into more than 4 GB.
pub const AMPLIFICATION: usize = 128;
/// Fixed allowance on top (serde pre-allocates up to 1 MiB per sequence from its length prefix,
/// a few nested sequences at most).
pub const ALLOWANCE: usize = 8 << 20;

/// The allocation bound the `wire` and `state` targets assert.
pub fn bound(len: usize) -> usize {
    ALLOWANCE + AMPLIFICATION * len
}

/// A State frame around `blob` (with its CRC, so the fuzzer reaches what lies behind it).
pub fn state_frame(blob: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(blob.len() + 32);
    Message::State { blob }.encode(&mut out);
    out
}

/// How the `wire` and `state` targets read their input: the first byte picks the form of the
/// rest. `Raw`: bytes as they come off the link / out of the file. `Body`: the postcard body,
/// put behind the current version in a State frame with a valid CRC (seeds stay valid when the
/// version is bumped). `Blob`: version and body, framed with a valid CRC.
pub enum Input<'a> {
    /// The bytes as they are.
    Raw(&'a [u8]),
    /// A whole frame built around the input.
    Framed(Vec<u8>),
}

/// Splits fuzz input as described on [`Input`]; `version` is the one `Body` inputs get.
pub fn input(data: &[u8], version: u32) -> Option<Input<'_>> {
    let (&mode, rest) = data.split_first()?;
    Some(match mode % 3 {
        0 => Input::Raw(rest),
        1 => {
            let mut blob = Vec::with_capacity(4 + rest.len());
            blob.extend_from_slice(&version.to_le_bytes());
            blob.extend_from_slice(rest);
            Input::Framed(state_frame(&blob))
        }
        _ => Input::Framed(state_frame(rest)),
    })
}

/// What a decoded migration message must satisfy: it re-encodes (unless the canonical form is
/// over the frame cap), the re-encoding decodes, and that value re-encodes to the same bytes
/// (the encoding is injective, so equal bytes are equal values; the first re-encoding may
/// differ from the input because the KVM structs accept short byte strings). A `State` carries a
/// state envelope: it goes through [`check_envelope`] as the destination would decode it.
pub fn check_wire(w: &Wire) {
    let f2 = match migration::encode(w) {
        Ok(f) => f,
        Err(MigrationError::Other(m)) if m.contains("exceeds the frame cap") => return,
        Err(e) => panic!("a decoded message does not re-encode: {e}"),
    };
    let w2 = migration::decode(&f2).expect("a re-encoded message decodes");
    let f3 = migration::encode(&w2).expect("a value that encoded once encodes again");
    assert!(f3 == f2, "decode(encode(w)) is not w");
    match w {
        Wire::State { envelope, .. } => check_envelope(envelope),
        Wire::Offer(o) => {
            // the destination's CPU check of a guest against its own CPUID finds nothing
            assert!(migration::missing_cpu_features(&o.cpuid, &o.cpuid).is_empty());
        }
        _ => {}
    }
}

/// Decodes a state envelope and, if it is one, checks the snapshot with [`check_snapshot`].
pub fn check_envelope(bytes: &[u8]) {
    if let Ok(s) = state::decode(bytes, "fuzz") {
        check_snapshot(&s);
    }
}

/// What a decoded snapshot must satisfy: round trip as for [`check_wire`], and the KVM-owned
/// pages derived from it are sorted, distinct and page-aligned.
pub fn check_snapshot(s: &Snapshot) {
    let pages = state::kvm_owned_pages(s);
    assert!(pages.windows(2).all(|w| w[0] < w[1]));
    assert!(pages.iter().all(|p| p & 0xfff == 0));
    let b2 = match state::encode(s) {
        Ok(b) => b,
        Err(StateError::Invalid(m)) if m.contains("exceeds the frame cap") => return,
        Err(e) => panic!("a decoded snapshot does not re-encode: {e}"),
    };
    let s2 = state::decode(&b2, "re-encoded").expect("a re-encoded snapshot decodes");
    let b3 = state::encode(&s2).expect("a snapshot that encoded once encodes again");
    assert!(b3 == b2, "decode(encode(s)) is not s");
}
