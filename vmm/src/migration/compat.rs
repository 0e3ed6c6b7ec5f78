//! What a destination host must offer for the state a source sends: KVM capabilities and the
//! guest's CPU features.

use kvm_bindings::kvm_cpuid_entry2;

/// KVM capabilities a destination needs to rebuild the state the source sends.
pub const REQUIRED_CAPS: &[(u32, &str)] = &[
    (kvm_bindings::KVM_CAP_IRQCHIP, "IRQCHIP"),
    (kvm_bindings::KVM_CAP_PIT2, "PIT2"),
    (kvm_bindings::KVM_CAP_USER_MEMORY, "USER_MEMORY"),
    (kvm_bindings::KVM_CAP_IRQFD, "IRQFD"),
    (kvm_bindings::KVM_CAP_XSAVE, "XSAVE"),
    (kvm_bindings::KVM_CAP_XCRS, "XCRS"),
    (kvm_bindings::KVM_CAP_VCPU_EVENTS, "VCPU_EVENTS"),
    (kvm_bindings::KVM_CAP_DEBUGREGS, "DEBUGREGS"),
    (kvm_bindings::KVM_CAP_ADJUST_CLOCK, "ADJUST_CLOCK"),
    (kvm_bindings::KVM_CAP_MP_STATE, "MP_STATE"),
    (kvm_bindings::KVM_CAP_GET_TSC_KHZ, "GET_TSC_KHZ"),
];

/// Feature bits a guest may only use if the host supports them: `(leaf, subleaf, register,
/// mask of bits the VMM itself controls and that are not host features)`.
const FEATURE_WORDS: &[(u32, u32, usize, u32)] = &[
    // leaf 1: ecx minus OSXSAVE (27, mirrors CR4) and the hypervisor bit (31, ours)
    (1, 0, 2, (1 << 27) | (1 << 31)),
    // leaf 1 edx minus HTT (28, set by our topology policy)
    (1, 0, 3, 1 << 28),
    // leaf 7.0: ebx, ecx minus OSPKE (4, mirrors CR4), edx
    (7, 0, 1, 0),
    (7, 0, 2, 1 << 4),
    (7, 0, 3, 0),
    (7, 1, 0, 0),
    // xsave features
    (0xd, 1, 0, 0),
    (0x8000_0001, 0, 2, 0),
    (0x8000_0001, 0, 3, 0),
];

fn reg(e: &kvm_cpuid_entry2, r: usize) -> u32 {
    [e.eax, e.ebx, e.ecx, e.edx][r]
}

/// CPU features the guest was given that `host` (KVM_GET_SUPPORTED_CPUID here) lacks, as
/// `leaf 0x7.0 ebx bit 5` strings. Empty: the guest can run here.
pub fn missing_cpu_features(guest: &[kvm_cpuid_entry2], host: &[kvm_cpuid_entry2]) -> Vec<String> {
    let find = |t: &[kvm_cpuid_entry2], leaf: u32, sub: u32| {
        t.iter()
            .find(|e| e.function == leaf && (e.index == sub || e.flags & 1 == 0))
            .copied()
    };
    let mut missing = Vec::new();
    for &(leaf, sub, r, ignore) in FEATURE_WORDS {
        let Some(g) = find(guest, leaf, sub) else {
            continue;
        };
        let h = find(host, leaf, sub).map_or(0, |h| reg(&h, r));
        let lacking = reg(&g, r) & !h & !ignore;
        for bit in 0..32 {
            if lacking & (1 << bit) != 0 {
                missing.push(format!(
                    "CPUID leaf {leaf:#x}.{sub} {} bit {bit}",
                    ["eax", "ebx", "ecx", "edx"][r]
                ));
            }
        }
    }
    missing
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32, ecx: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            flags: 1,
            ecx,
            ..Default::default()
        }
    }

    #[test]
    fn cpu_features_the_host_lacks_are_named() {
        let host = vec![entry(1, 0, 0b0110 | (1 << 31)), entry(7, 0, 0)];
        let same = vec![entry(1, 0, 0b0110)];
        assert!(missing_cpu_features(&same, &host).is_empty());
        // OSXSAVE and the hypervisor bit are not host features
        let os = vec![entry(1, 0, (1 << 27) | (1 << 31))];
        assert!(missing_cpu_features(&os, &host).is_empty());
        let more = vec![entry(1, 0, 0b1110), entry(7, 0, 1 << 3)];
        assert_eq!(
            missing_cpu_features(&more, &host),
            vec![
                "CPUID leaf 0x1.0 ecx bit 3".to_owned(),
                "CPUID leaf 0x7.0 ecx bit 3".to_owned()
            ]
        );
    }
}
