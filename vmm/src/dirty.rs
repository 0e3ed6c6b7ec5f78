//! Dirty-page tracking of guest RAM, the `kvm` backend: KVM_MEM_LOG_DIRTY_PAGES on every memory
//! slot and KVM_GET_DIRTY_LOG, which returns the pages written since the previous call and
//! write-protects them again. KVM's own writes into guest memory (kvmclock, steal time) are
//! logged too; this VMM's devices do not write guest memory.
//!
//! Pages are numbered flat across the RAM regions in guest-physical order (the page index space
//! of `GuestRam::layout`, which the page-server and the pager use).

use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES};
use kvm_ioctls::VmFd;

use crate::memory::{GuestRam, PAGE_SIZE};

/// A set of guest pages, one bit each (flat page indices).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageSet {
    words: Vec<u64>,
    pages: u64,
}

impl PageSet {
    /// An empty set over `pages` pages.
    pub fn new(pages: u64) -> PageSet {
        PageSet {
            words: vec![0; pages.div_ceil(64) as usize],
            pages,
        }
    }

    /// Adds page `i` (ignored past the end).
    pub fn insert(&mut self, i: u64) {
        if i < self.pages {
            self.words[(i / 64) as usize] |= 1 << (i % 64);
        }
    }

    /// Whether page `i` is in the set.
    pub fn contains(&self, i: u64) -> bool {
        i < self.pages && self.words[(i / 64) as usize] & (1 << (i % 64)) != 0
    }

    /// Pages in the set.
    pub fn count(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// Pages the set ranges over.
    pub fn len(&self) -> u64 {
        self.pages
    }

    /// Whether the set ranges over no pages.
    pub fn is_empty(&self) -> bool {
        self.pages == 0
    }

    /// Little-endian bytes, bit `i % 8` of byte `i / 8` for page `i` (`proto` bitmap order).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b: Vec<u8> = self.words.iter().flat_map(|w| w.to_le_bytes()).collect();
        b.truncate(self.pages.div_ceil(8) as usize);
        b
    }

    /// Adds every page of `slot_bits` (one bit per page of a slot, KVM's layout), the slot's
    /// first page being flat page `first`.
    fn merge_slot(&mut self, first: u64, slot_bits: &[u64]) {
        for (wi, &w) in slot_bits.iter().enumerate() {
            let mut w = w;
            while w != 0 {
                let b = u64::from(w.trailing_zeros());
                self.insert(first + wi as u64 * 64 + b);
                w &= w - 1;
            }
        }
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_sets_merge_slots_at_any_offset_and_encode_like_proto_bitmaps() {
        let mut s = PageSet::new(200);
        // a slot starting at flat page 70 (not a multiple of 64) with its pages 0, 63, 64 dirty
        s.merge_slot(70, &[1 | (1 << 63), 1]);
        assert!(s.contains(70) && s.contains(133) && s.contains(134));
        assert_eq!(s.count(), 3);
        s.insert(500); // past the end: ignored
        assert_eq!(s.count(), 3);
        let b = s.to_bytes();
        assert_eq!(b.len(), 25);
        assert_eq!(b[70 / 8], 1 << (70 % 8));
        assert!(proto::bit(&b, 133) && proto::bit(&b, 134) && !proto::bit(&b, 135));
    }
}

/// Which dirty-tracking backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// KVM_GET_DIRTY_LOG.
    Kvm,
    /// userfaultfd write protection, faults taken by a thread of ours.
    UffdWp,
    /// userfaultfd asynchronous write protection + PAGEMAP_SCAN.
    UffdWpAsync,
}

impl Backend {
    /// Parses `kvm` / `uffd-wp-async` (None: the default, `kvm`).
    pub fn parse(s: Option<&str>) -> Result<Backend, String> {
        match s {
            None | Some("kvm") => Ok(Backend::Kvm),
            Some("uffd-wp-async") => Ok(Backend::UffdWpAsync),
            Some("uffd-wp") => Ok(Backend::UffdWp),
            Some(o) => Err(format!(
                "unknown dirty tracking {o:?} (kvm, uffd-wp, uffd-wp-async)"
            )),
        }
    }

    /// Its name.
    pub fn name(self) -> &'static str {
        match self {
            Backend::Kvm => "kvm",
            Backend::UffdWp => "uffd-wp",
            Backend::UffdWpAsync => "uffd-wp-async",
        }
    }
}

/// Dirty tracking switched on with one backend.
#[derive(Debug)]
pub enum Tracker {
    /// KVM's dirty log.
    Kvm(KvmDirtyLog),
    /// userfaultfd write protection.
    UffdWp(crate::dirty_uffd::UffdWp),
    /// userfaultfd asynchronous write protection.
    UffdWpAsync(crate::dirty_uffd::UffdWpAsync),
}

impl Tracker {
    /// Turns tracking on for `ram`.
    pub fn start(b: Backend, fd: &VmFd, ram: &GuestRam) -> Result<Tracker, String> {
        ram.take_vmm_dirty();
        match b {
            Backend::Kvm => KvmDirtyLog::start(fd, ram)
                .map(Tracker::Kvm)
                .map_err(|e| format!("turning KVM dirty logging on: {e}")),
            Backend::UffdWp => crate::dirty_uffd::UffdWp::start(ram)
                .map(Tracker::UffdWp)
                .map_err(|e| crate::vm::error_chain(&e)),
            Backend::UffdWpAsync => crate::dirty_uffd::UffdWpAsync::start(ram)
                .map(Tracker::UffdWpAsync)
                .map_err(|e| crate::vm::error_chain(&e)),
        }
    }

    /// The pages written since `start` or the previous collection: by the guest (and KVM),
    /// and by this VMM through [`GuestRam::write_bytes`] (which KVM's log does not see; the
    /// userfaultfd backends see them anyway).
    pub fn collect(&self, fd: &VmFd, ram: &GuestRam) -> Result<PageSet, String> {
        // the VMM's own writes first: one made while the backend collects is then reported
        // now or next time, never lost
        let vmm = ram.take_vmm_dirty();
        let mut set = match self {
            Tracker::Kvm(l) => l.collect(fd).map_err(|e| format!("KVM_GET_DIRTY_LOG: {e}")),
            Tracker::UffdWp(t) => t.collect().map_err(|e| crate::vm::error_chain(&e)),
            Tracker::UffdWpAsync(t) => t.collect().map_err(|e| crate::vm::error_chain(&e)),
        }?;
        for (bi, &b) in vmm.iter().enumerate() {
            let mut b = b;
            while b != 0 {
                set.insert(bi as u64 * 8 + u64::from(b.trailing_zeros()));
                b &= b - 1;
            }
        }
        Ok(set)
    }

    /// Turns tracking off.
    pub fn stop(self, fd: &VmFd) -> Result<(), String> {
        match self {
            Tracker::Kvm(l) => l
                .stop(fd)
                .map_err(|e| format!("turning KVM dirty logging off: {e}")),
            Tracker::UffdWp(t) => t.stop().map_err(|e| crate::vm::error_chain(&e)),
            Tracker::UffdWpAsync(t) => t.stop().map_err(|e| crate::vm::error_chain(&e)),
        }
    }

    /// The backend.
    pub fn backend(&self) -> Backend {
        match self {
            Tracker::Kvm(_) => Backend::Kvm,
            Tracker::UffdWp(_) => Backend::UffdWp,
            Tracker::UffdWpAsync(_) => Backend::UffdWpAsync,
        }
    }
}
