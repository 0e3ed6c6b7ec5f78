//! The CPUID policy: what each vCPU is told about itself.
//!
//! Start from `KVM_GET_SUPPORTED_CPUID` (what this host's KVM can virtualize)
//! and change only this, in one place:
//! - leaf 0x1: EBX[31:24] initial APIC id = vCPU index, EBX[23:16] logical
//!   count = vCPUs (HTT set when more than one), ECX[31] "hypervisor" set;
//! - leaves 0xB / 0x1F: EDX x2APIC id = vCPU index, one thread per core and
//!   all vCPUs in one package;
//! - leaf 0x4: EAX[31:26] cores per package - 1 = vCPUs - 1;
//! - leaf 0x7.0 EDX[29] (IA32_ARCH_CAPABILITIES) cleared: nested hosts
//!   (e.g. PVM) refuse that MSR, and a guest that sees the bit reads it;
//! - leaf 0x6 (thermal/power) and 0xA (architectural PMU) zeroed: we emulate
//!   neither, and a migrated guest must not depend on the source's PMU;
//! - on AMD likewise no PMU: leaf 0x8000_0001 ECX PerfCtrExtCore / NB / LLC
//!   cleared and leaf 0x8000_0022 (PerfMonV2) zeroed, and [`deny_pmu_msrs`]
//!   makes every performance-counter MSR raise #GP, so that Linux's probe of
//!   the legacy K7 counters (which AMD CPUs always have) fails cleanly ("PMU
//!   not available due to virtualization") on every host alike, instead of
//!   reaching a counter on one host and an ignored MSR on another (KVM
//!   without a guest PMU drops such writes and logs `Unhandled WRMSR`).
//!
//! Everything else passes through, so migration between hosts needs the
//! same CPU model (the destination compares the policy output in the
//! handshake of the migration issue).

use kvm_bindings::CpuId;

const ARCH_CAPABILITIES_BIT: u32 = 1 << 29;
const HYPERVISOR_BIT: u32 = 1 << 31;
const HTT_BIT: u32 = 1 << 28;
/// Leaf 0x8000_0001 ECX: PerfCtrExtCore (23), PerfCtrExtNB (24), PerfCtrExtLLC (28).
const AMD_PERFCTR_BITS: u32 = (1 << 23) | (1 << 24) | (1 << 28);

/// The performance-monitoring MSRs no guest of ours may touch (first, count).
const PMU_MSRS: &[(u32, u32)] = &[
    (0xc1, 8),         // Intel IA32_PMC0..7
    (0x186, 8),        // Intel IA32_PERFEVTSEL0..7
    (0x309, 4),        // Intel fixed counters
    (0x38d, 4),        // Intel fixed-counter control, global status / control / overflow
    (0x4c1, 8),        // Intel full-width IA32_A_PMC0..7
    (0xc000_0300, 4),  // AMD PerfMonV2 global status / control / status clear / set
    (0xc001_0000, 8),  // AMD legacy (K7) PERF_CTL0..3 and PERF_CTR0..3
    (0xc001_0200, 12), // AMD core PERF_CTL / PERF_CTR 0..5
    (0xc001_0230, 16), // AMD L3 (LLC) counters
    (0xc001_0240, 8),  // AMD northbridge / data-fabric counters
];

/// Makes the guest's every access to a performance-counter MSR ([`PMU_MSRS`]) fail with #GP
/// (`KVM_X86_SET_MSR_FILTER`; accesses by this VMM itself, e.g. saving state, are not
/// filtered). On a KVM without MSR filters (before Linux 5.10) this fails, and the host's own
/// handling stays.
pub fn deny_pmu_msrs(vm: &kvm_ioctls::VmFd) -> Result<(), kvm_ioctls::Error> {
    use kvm_ioctls::{MsrFilterDefaultAction, MsrFilterRange, MsrFilterRangeFlags};
    let deny = [0u8; 2];
    let ranges: Vec<MsrFilterRange<'_>> = PMU_MSRS
        .iter()
        .map(|&(base, msr_count)| MsrFilterRange {
            flags: MsrFilterRangeFlags::READ | MsrFilterRangeFlags::WRITE,
            base,
            msr_count,
            bitmap: &deny,
        })
        .collect();
    vm.set_msr_filter(MsrFilterDefaultAction::ALLOW, &ranges)
}

/// Applies the policy for vCPU `index` of `count` to `cpuid` (in place).
pub fn apply(cpuid: &mut CpuId, index: u32, count: u32) {
    let count = count.max(1);
    let core_bits = 32 - (count - 1).leading_zeros();
    for e in cpuid.as_mut_slice() {
        match e.function {
            0x1 => {
                e.ebx = (e.ebx & 0x0000_ffff) | (index << 24) | ((count & 0xff) << 16);
                e.ecx |= HYPERVISOR_BIT;
                if count > 1 {
                    e.edx |= HTT_BIT;
                } else {
                    e.edx &= !HTT_BIT;
                }
            }
            0x4 => {
                e.eax = (e.eax & 0x03ff_ffff) | ((count - 1) << 26);
            }
            0x6 | 0xa => {
                e.eax = 0;
                e.ebx = 0;
                e.ecx = 0;
                e.edx = 0;
            }
            0x7 if e.index == 0 => {
                e.edx &= !ARCH_CAPABILITIES_BIT;
            }
            0x8000_0001 => {
                e.ecx &= !AMD_PERFCTR_BITS;
            }
            0x8000_0022 => {
                e.eax = 0;
                e.ebx = 0;
                e.ecx = 0;
                e.edx = 0;
            }
            0xb | 0x1f => {
                e.edx = index;
                match e.index {
                    0 => {
                        e.eax = 0;
                        e.ebx = 1;
                        e.ecx = 1 << 8;
                    }
                    1 => {
                        e.eax = core_bits;
                        e.ebx = count;
                        e.ecx = 1 | (2 << 8);
                    }
                    _ => {
                        e.eax = 0;
                        e.ebx = 0;
                        e.ecx = e.index;
                    }
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::kvm_cpuid_entry2;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax: 0xffff_ffff,
            ebx: 0xffff_ffff,
            ecx: 0xffff_ffff,
            edx: 0xffff_ffff,
            ..Default::default()
        }
    }

    #[test]
    fn policy_sets_ids_and_hides_arch_capabilities() {
        let mut c =
            CpuId::from_entries(&[entry(1, 0), entry(7, 0), entry(0xb, 1), entry(0xa, 0)]).unwrap();
        apply(&mut c, 3, 4);
        let s = c.as_slice();
        assert_eq!(s[0].ebx >> 24, 3);
        assert_eq!((s[0].ebx >> 16) & 0xff, 4);
        assert_eq!(s[1].edx & ARCH_CAPABILITIES_BIT, 0);
        assert_eq!(s[2].edx, 3);
        assert_eq!(s[2].eax, 2);
        assert_eq!(s[3].eax, 0);
    }
}
