//! Our test guest, built by `build.rs` from `kernel/` and embedded here.
//!
//! A small x86-64 kernel with a PVH entry (so our vmm and QEMU `-kernel`
//! boot the same file) that runs its workload in ring 3: it fills memory with
//! a pattern, keeps writing pages at a given rate, prints a heartbeat every
//! period, keeps live values in SSE/AVX registers and checks them, and prints
//! a checksum of its memory on request.  With virtio-mmio devices it also
//! runs a block workload (numbered sectors, see [`sector_pattern`]) and
//! answers ARP, ICMP echo and UDP echo (port 7).  See `kernel/main.rs` for the
//! boot parameters and the serial protocol.

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

include!("shared.rs");

/// The 512 bytes of data sector `sector` (1..=N) in generation `gen`, as the guest writes them.
pub fn sector_pattern(sector: u64, gen: u64) -> [u8; 512] {
    let mut b = [0u8; 512];
    for (i, w) in b.chunks_exact_mut(8).enumerate() {
        w.copy_from_slice(&pattern_word(sector, gen, i as u64).to_le_bytes());
    }
    b
}

/// Sector 0 of the block workload's disk: [`DISK_MAGIC`], the generation and the number of
/// data sectors N as little endian u64 words 0-2, the rest zero.
pub fn disk_header(gen: u64, n: u64) -> [u8; 512] {
    let mut b = [0u8; 512];
    for (i, w) in [DISK_MAGIC, gen, n].iter().enumerate() {
        b[i * 8..i * 8 + 8].copy_from_slice(&w.to_le_bytes());
    }
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sector_pattern_is_deterministic_and_distinct() {
        let a = sector_pattern(1, 1);
        assert_eq!(a, sector_pattern(1, 1));
        assert_ne!(a, sector_pattern(2, 1));
        assert_ne!(a, sector_pattern(1, 2));
        // Word 0 of sector 1, generation 1, worked by hand from the formula.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15 ^ 0xbf58_476d_1ce4_e5b9;
        x ^= x >> 31;
        x = x.wrapping_mul(0xd6e9_8f5b_2b69_7a3d);
        x ^= x >> 29;
        assert_eq!(a[..8], x.to_le_bytes());
        assert_eq!(a[8..16], pattern_word(1, 1, 1).to_le_bytes());
        assert_eq!(pattern_word(0, 0, 0), 0);
    }

    #[test]
    fn disk_header_layout() {
        let h = disk_header(7, 256);
        assert_eq!(&h[..8], b"TESTDISK");
        assert_eq!(h[8..16], 7u64.to_le_bytes());
        assert_eq!(h[16..24], 256u64.to_le_bytes());
        assert!(h[24..].iter().all(|&b| b == 0));
    }
}
