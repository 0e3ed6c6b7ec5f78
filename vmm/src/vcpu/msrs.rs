//! Which MSRs a vCPU's state holds (KVM's list, ordered and filtered to what this host reads),
//! and setting them, one at a time when a batch is refused or when tracing names slow ones.

use kvm_bindings::{kvm_msr_entry, Msrs};
use std::time::Instant;

use kvm_ioctls::VcpuFd;

use crate::persist::StateError;

/// MSRs never saved: KVM lists them, but hosts refuse them (arch capabilities
/// on nested hosts) or they are read-only views.
pub(super) const SKIPPED_MSRS: &[u32] = &[0x10a];
/// Restored last: the TSC deadline is relative to the TSC, restored first; and once more after
/// the LAPIC (see `Persist::restore`).
pub(super) const MSR_TSC_DEADLINE: u32 = 0x6e0;
/// IA32_TSC.
pub(super) const MSR_TSC: u32 = 0x10;

pub(super) fn kvm(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> StateError {
    move |source| StateError::Kvm { op, source }
}

/// Orders the saveable MSR list: TSC first, TSC deadline last, skipped ones out.
pub fn order_msrs(list: &[u32]) -> Vec<u32> {
    let mut v: Vec<u32> = list
        .iter()
        .copied()
        .filter(|i| !SKIPPED_MSRS.contains(i))
        .collect();
    v.sort_by_key(|&i| match i {
        MSR_TSC => 0,
        MSR_TSC_DEADLINE => 2,
        _ => 1,
    });
    v
}

/// Keeps the MSRs of `list` this vCPU can read (KVM may list MSRs the host
/// CPU or a nested hypervisor does not support).
pub fn readable_msrs(fd: &VcpuFd, list: &[u32]) -> Vec<u32> {
    list.iter()
        .copied()
        .filter(|&index| {
            let mut one = match Msrs::from_entries(&[kvm_msr_entry {
                index,
                ..Default::default()
            }]) {
                Ok(m) => m,
                Err(_) => return false,
            };
            matches!(fd.get_msrs(&mut one), Ok(1))
        })
        .collect()
}

pub(super) fn msrs_of(entries: &[(u32, u64)]) -> Result<Msrs, StateError> {
    let e: Vec<kvm_msr_entry> = entries
        .iter()
        .map(|&(index, data)| kvm_msr_entry {
            index,
            data,
            ..Default::default()
        })
        .collect();
    Msrs::from_entries(&e).map_err(|e| StateError::Invalid(format!("MSR list: {e:?}")))
}

/// KVM_SET_MSRS one MSR at a time, each timed: a diagnosis of a slow restore (`RUST_LOG=trace`)
/// that names the MSRs that cost more than 100 µs. Returns how many were set, like the ioctl.
pub(super) fn set_msrs_one_by_one(
    index: u32,
    fd: &VcpuFd,
    msrs: &[(u32, u64)],
) -> Result<usize, StateError> {
    let mut slow = Vec::new();
    for (n, &m) in msrs.iter().enumerate() {
        let t = Instant::now();
        if fd.set_msrs(&msrs_of(&[m])?).map_err(kvm("KVM_SET_MSRS"))? != 1 {
            return Ok(n);
        }
        let took = t.elapsed();
        if took.as_micros() > 100 {
            slow.push(format!("{:#x}={:#x}: {took:?}", m.0, m.1));
        }
    }
    log::trace!(
        "vcpu{index}: MSRs over 100 us to set: [{}]",
        slow.join(", ")
    );
    Ok(msrs.len())
}
