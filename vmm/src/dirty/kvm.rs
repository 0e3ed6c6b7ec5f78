//! Dirty-page tracking of guest RAM, the `kvm` backend: KVM_MEM_LOG_DIRTY_PAGES on every memory
//! slot and KVM_GET_DIRTY_LOG, which returns the pages written since the previous call and
//! write-protects them again. KVM's own writes into guest memory (kvmclock, steal time) are
//! logged too; this VMM's devices do not write guest memory.

use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES};
use kvm_ioctls::VmFd;

use super::pageset::PageSet;
use crate::memory::{GuestRam, PAGE_SIZE};

/// KVM dirty logging switched on for a VM's RAM.
#[derive(Debug)]
pub struct KvmDirtyLog {
    /// `(slot, guest-physical start, host address, bytes, first flat page)`.
    slots: Vec<(u32, u64, u64, u64, u64)>,
    pages: u64,
}

fn set_slots(
    fd: &VmFd,
    slots: &[(u32, u64, u64, u64, u64)],
    flags: u32,
) -> Result<(), kvm_ioctls::Error> {
    for &(slot, gpa, host, len, _) in slots {
        let region = kvm_userspace_memory_region {
            slot,
            guest_phys_addr: gpa,
            memory_size: len,
            userspace_addr: host,
            flags,
        };
        // SAFETY: the same live mapping of guest RAM the slot already holds (owned by the VM's
        // GuestRam, which outlives the VM fd); only the flags change.
        unsafe { fd.set_user_memory_region(region) }?;
    }
    Ok(())
}

impl KvmDirtyLog {
    /// Turns dirty logging on for every slot of `ram` (slot i = region i) and starts from an
    /// empty log.
    pub fn start(fd: &VmFd, ram: &GuestRam) -> Result<KvmDirtyLog, kvm_ioctls::Error> {
        let ps = u64::from(PAGE_SIZE);
        let mut first = 0;
        let slots: Vec<_> = ram
            .host_regions()
            .into_iter()
            .enumerate()
            .map(|(i, (gpa, host, len))| {
                let s = (i as u32, gpa, host, len, first);
                first += len / ps;
                s
            })
            .collect();
        set_slots(fd, &slots, KVM_MEM_LOG_DIRTY_PAGES)?;
        let log = KvmDirtyLog {
            slots,
            pages: first,
        };
        log.collect(fd)?;
        Ok(log)
    }

    /// The pages written since `start` or the previous `collect`.
    pub fn collect(&self, fd: &VmFd) -> Result<PageSet, kvm_ioctls::Error> {
        let mut set = PageSet::new(self.pages);
        for &(slot, _, _, len, first) in &self.slots {
            let bits = fd.get_dirty_log(slot, len as usize)?;
            set.merge_slot(first, &bits);
        }
        Ok(set)
    }

    /// Turns dirty logging off again.
    pub fn stop(self, fd: &VmFd) -> Result<(), kvm_ioctls::Error> {
        set_slots(fd, &self.slots, 0)
    }
}
