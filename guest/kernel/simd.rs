//! SIMD state checks: per-cpu values in the vector registers and MXCSR that must survive
//! every interrupt, idle and migration.

use core::arch::asm;
use core::sync::atomic::Ordering::*;

use crate::avx_ok;

pub(crate) const SIMD_SEED: u64 = 0x5157_4d44_0000_0000;

pub(crate) fn avx() -> bool {
    // SAFETY: flag written once by ring 0 before user mode started.
    unsafe { avx_ok.load(Relaxed) != 0 }
}

/// Puts per-cpu values into the upper halves of ymm0-15 and a non-default
/// MXCSR.  Legacy-SSE code (all this crate is compiled to) never changes
/// either, so they must survive everything until the next check.
pub(crate) fn simd_seed(cpu: usize) {
    let mut vals = [0u64; 32];
    for (i, v) in vals.iter_mut().enumerate() {
        *v = SIMD_SEED ^ ((cpu as u64) << 16) ^ (i as u64 * 0x9e37_79b9);
    }
    let mxcsr: u32 = 0x7f80; // all masked, round toward zero
    // SAFETY: loads from a valid local array; only vector registers and
    // MXCSR change, which no other code here relies on.
    unsafe {
        asm!("ldmxcsr [{m}]", m = in(reg) &mxcsr, options(nostack));
        if avx() {
            asm!(
                "vinsertf128 ymm0, ymm0, [{p}], 1",
                "vinsertf128 ymm1, ymm1, [{p} + 16], 1",
                "vinsertf128 ymm2, ymm2, [{p} + 32], 1",
                "vinsertf128 ymm3, ymm3, [{p} + 48], 1",
                "vinsertf128 ymm4, ymm4, [{p} + 64], 1",
                "vinsertf128 ymm5, ymm5, [{p} + 80], 1",
                "vinsertf128 ymm6, ymm6, [{p} + 96], 1",
                "vinsertf128 ymm7, ymm7, [{p} + 112], 1",
                "vinsertf128 ymm8, ymm8, [{p} + 128], 1",
                "vinsertf128 ymm9, ymm9, [{p} + 144], 1",
                "vinsertf128 ymm10, ymm10, [{p} + 160], 1",
                "vinsertf128 ymm11, ymm11, [{p} + 176], 1",
                "vinsertf128 ymm12, ymm12, [{p} + 192], 1",
                "vinsertf128 ymm13, ymm13, [{p} + 208], 1",
                "vinsertf128 ymm14, ymm14, [{p} + 224], 1",
                "vinsertf128 ymm15, ymm15, [{p} + 240], 1",
                p = in(reg) vals.as_ptr(),
                out("xmm0") _, out("xmm1") _, out("xmm2") _, out("xmm3") _,
                out("xmm4") _, out("xmm5") _, out("xmm6") _, out("xmm7") _,
                out("xmm8") _, out("xmm9") _, out("xmm10") _, out("xmm11") _,
                out("xmm12") _, out("xmm13") _, out("xmm14") _, out("xmm15") _,
                options(nostack, readonly),
            );
        }
    }
}

/// Idles until the next interrupt with xmm0-15 holding per-cpu, per-round
/// values, and checks afterwards that they, the ymm upper halves and MXCSR
/// are intact.  Returns false on any mismatch.
pub(crate) fn idle_and_check(cpu: usize, round: u64) -> bool {
    let mut lo = [0u64; 32];
    for (i, v) in lo.iter_mut().enumerate() {
        *v = round.wrapping_mul(0x0100_0000_01b3) ^ ((cpu as u64) << 40) ^ i as u64;
    }
    let mut after_lo = [0u64; 32];
    let mut after_hi = [0u64; 32];
    let mut mxcsr: u32 = 0;
    // SAFETY: loads/stores within local arrays; `hlt` in ring 3 traps to the
    // kernel's #GP handler, which idles and resumes after it.
    unsafe {
        asm!(
            "movdqu xmm0, [{i}]", "movdqu xmm1, [{i} + 16]",
            "movdqu xmm2, [{i} + 32]", "movdqu xmm3, [{i} + 48]",
            "movdqu xmm4, [{i} + 64]", "movdqu xmm5, [{i} + 80]",
            "movdqu xmm6, [{i} + 96]", "movdqu xmm7, [{i} + 112]",
            "movdqu xmm8, [{i} + 128]", "movdqu xmm9, [{i} + 144]",
            "movdqu xmm10, [{i} + 160]", "movdqu xmm11, [{i} + 176]",
            "movdqu xmm12, [{i} + 192]", "movdqu xmm13, [{i} + 208]",
            "movdqu xmm14, [{i} + 224]", "movdqu xmm15, [{i} + 240]",
            "hlt",
            "movdqu [{o}], xmm0", "movdqu [{o} + 16], xmm1",
            "movdqu [{o} + 32], xmm2", "movdqu [{o} + 48], xmm3",
            "movdqu [{o} + 64], xmm4", "movdqu [{o} + 80], xmm5",
            "movdqu [{o} + 96], xmm6", "movdqu [{o} + 112], xmm7",
            "movdqu [{o} + 128], xmm8", "movdqu [{o} + 144], xmm9",
            "movdqu [{o} + 160], xmm10", "movdqu [{o} + 176], xmm11",
            "movdqu [{o} + 192], xmm12", "movdqu [{o} + 208], xmm13",
            "movdqu [{o} + 224], xmm14", "movdqu [{o} + 240], xmm15",
            "stmxcsr [{m}]",
            i = in(reg) lo.as_ptr(),
            o = in(reg) after_lo.as_mut_ptr(),
            m = in(reg) &mut mxcsr,
            out("xmm0") _, out("xmm1") _, out("xmm2") _, out("xmm3") _,
            out("xmm4") _, out("xmm5") _, out("xmm6") _, out("xmm7") _,
            out("xmm8") _, out("xmm9") _, out("xmm10") _, out("xmm11") _,
            out("xmm12") _, out("xmm13") _, out("xmm14") _, out("xmm15") _,
            options(nostack),
        );
        if avx() {
            asm!(
                "vextractf128 [{o}], ymm0, 1", "vextractf128 [{o} + 16], ymm1, 1",
                "vextractf128 [{o} + 32], ymm2, 1", "vextractf128 [{o} + 48], ymm3, 1",
                "vextractf128 [{o} + 64], ymm4, 1", "vextractf128 [{o} + 80], ymm5, 1",
                "vextractf128 [{o} + 96], ymm6, 1", "vextractf128 [{o} + 112], ymm7, 1",
                "vextractf128 [{o} + 128], ymm8, 1", "vextractf128 [{o} + 144], ymm9, 1",
                "vextractf128 [{o} + 160], ymm10, 1", "vextractf128 [{o} + 176], ymm11, 1",
                "vextractf128 [{o} + 192], ymm12, 1", "vextractf128 [{o} + 208], ymm13, 1",
                "vextractf128 [{o} + 224], ymm14, 1", "vextractf128 [{o} + 240], ymm15, 1",
                o = in(reg) after_hi.as_mut_ptr(),
                options(nostack),
            );
        }
    }
    let mut ok = after_lo == lo && mxcsr & 0xffbf == 0x7f80;
    if avx() {
        for (i, v) in after_hi.iter().enumerate() {
            ok &= *v == SIMD_SEED ^ ((cpu as u64) << 16) ^ (i as u64 * 0x9e37_79b9);
        }
    }
    ok
}
