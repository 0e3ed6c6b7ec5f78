//! Our test guest, built by `build.rs` from `kernel/` and embedded here.
//!
//! A small x86-64 kernel with a PVH entry (so our vmm and QEMU `-kernel`
//! boot the same file) that runs its workload in ring 3: it fills memory with
//! a pattern, keeps writing pages at a given rate, prints a heartbeat every
//! period, keeps live values in SSE/AVX registers and checks them, and prints
//! a checksum of its memory on request.  See `kernel/main.rs` for the boot
//! parameters and the serial protocol.

/// The guest ELF image.
pub const ELF: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/guest.elf"));

/// The checksum the guest prints in its `CK` line, over `words` (u64, little
/// endian) continuing from `h` (start with [`CHECKSUM_INIT`]).
pub fn checksum_words(words: impl IntoIterator<Item = u64>, mut h: u64) -> u64 {
    for w in words {
        h = (h ^ w).wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Initial value of [`checksum_words`].
pub const CHECKSUM_INIT: u64 = 0xcbf2_9ce4_8422_2325;
