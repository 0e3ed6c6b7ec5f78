//! Guest time: the TSC, kvmclock (the per-cpu pvclock records), and the TSC's calibration
//! against the PIT when there is no kvmclock.

use core::arch::asm;
use core::sync::atomic::{AtomicU64, Ordering::*};

use crate::serial::{inb, outb};
use crate::{kvmclock_ok, pvclock};

/// TSC ticks per microsecond when there is no kvmclock.
pub(crate) static TSC_PER_US: AtomicU64 = AtomicU64::new(0);

pub(crate) fn rdtsc() -> u64 {
    let lo: u32;
    let hi: u32;
    // SAFETY: rdtsc has no memory effects (CR4.TSD is clear).
    unsafe { asm!("rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack)) }
    (hi as u64) << 32 | lo as u64
}

pub(crate) fn cpuid(leaf: u32) -> (u32, u32, u32, u32) {
    let r = core::arch::x86_64::__cpuid(leaf);
    (r.eax, r.ebx, r.ecx, r.edx)
}

/// Guest time in nanoseconds: kvmclock of this cpu, else TSC / calibration.
pub(crate) fn now_ns(cpu: usize) -> u64 {
    // SAFETY: reading flags written once by ring 0 before user mode started.
    if unsafe { kvmclock_ok.load(Relaxed) } == 0 {
        let per_us = TSC_PER_US.load(Relaxed).max(1);
        return rdtsc() / per_us * 1000;
    }
    // SAFETY: the pvclock area is static guest memory the hypervisor updates;
    // volatile reads under the version protocol.
    let p = unsafe { core::ptr::addr_of!(pvclock[cpu]) as *const u8 };
    loop {
        // SAFETY: offsets inside the 64-byte per-cpu pvclock record.
        unsafe {
            let v1 = core::ptr::read_volatile(p as *const u32);
            if v1 & 1 != 0 {
                continue;
            }
            core::sync::atomic::fence(Acquire);
            let tsc_ts = core::ptr::read_volatile(p.add(8) as *const u64);
            let sys = core::ptr::read_volatile(p.add(16) as *const u64);
            let mul = core::ptr::read_volatile(p.add(24) as *const u32);
            let shift = core::ptr::read_volatile(p.add(28) as *const i8);
            let tsc = rdtsc();
            core::sync::atomic::fence(Acquire);
            if core::ptr::read_volatile(p as *const u32) != v1 {
                continue;
            }
            let mut delta = tsc.wrapping_sub(tsc_ts);
            if shift >= 0 {
                delta <<= shift;
            } else {
                delta >>= -shift;
            }
            return sys.wrapping_add(((delta as u128 * mul as u128) >> 32) as u64);
        }
    }
}

/// Measures the TSC against PIT channel 2 over 10 ms (no kvmclock).
pub(crate) fn calibrate_tsc() {
    outb(0x61, (inb(0x61) & !0x02) | 0x01);
    outb(0x43, 0xb0);
    let count: u16 = 11932; // 10 ms at 1.193182 MHz
    outb(0x42, count as u8);
    outb(0x42, (count >> 8) as u8);
    let t0 = rdtsc();
    let mut spins = 0u64;
    while inb(0x61) & 0x20 == 0 && spins < 10_000_000 {
        spins += 1;
    }
    let per_us = (rdtsc() - t0) / 10_000;
    TSC_PER_US.store(per_us.max(1), Relaxed);
}
