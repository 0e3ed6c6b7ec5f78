// Shared by the host crate (src/lib.rs) and the guest kernel (kernel/main.rs), both with
// `include!`, so the two sides cannot drift apart.

/// Guest-physical address of virtio-mmio slot 0; slot `i` is at
/// `VIRTIO_MMIO_BASE + i * VIRTIO_MMIO_STRIDE`.
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
/// Distance between two virtio-mmio slots.
pub const VIRTIO_MMIO_STRIDE: u64 = 0x1000;
/// Number of virtio-mmio slots the guest probes.
pub const VIRTIO_MMIO_SLOTS: u64 = 8;

/// `TESTDISK` (little endian): word 0 of the block workload's header, disk sector 0.
pub const DISK_MAGIC: u64 = 0x4b53_4944_5453_4554;

/// Word `i` (0..64, little endian u64s) of data sector `sector` in generation `gen` of the
/// guest's block workload.
pub const fn pattern_word(sector: u64, gen: u64, i: u64) -> u64 {
    let mut x = sector.wrapping_mul(0x9e37_79b9_7f4a_7c15)
        ^ gen.wrapping_mul(0xbf58_476d_1ce4_e5b9)
        ^ i.wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^= x >> 31;
    x = x.wrapping_mul(0xd6e9_8f5b_2b69_7a3d);
    x ^= x >> 29;
    x
}
