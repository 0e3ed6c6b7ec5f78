//! Dirty-page tracking of guest RAM, three backends ([`Backend`]): `kvm` (KVM's dirty log,
//! [`kvm`]), `uffd-wp` and `uffd-wp-async` (userfaultfd write protection, [`uffd_wp`]). Each
//! collection returns a [`PageSet`].
//!
//! Pages are numbered flat across the RAM regions in guest-physical order (the page index space
//! of `GuestRam::layout`, which the page-server and the pager use).

mod kvm;
mod pageset;
pub mod uffd_wp;

use kvm_ioctls::VmFd;

use crate::memory::GuestRam;
pub use kvm::KvmDirtyLog;
pub use pageset::PageSet;
use uffd_wp::{UffdWp, UffdWpAsync};

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
    UffdWp(UffdWp),
    /// userfaultfd asynchronous write protection.
    UffdWpAsync(UffdWpAsync),
}

impl Tracker {
    /// Turns tracking on for `ram`.
    pub fn start(b: Backend, fd: &VmFd, ram: &GuestRam) -> Result<Tracker, String> {
        ram.take_vmm_dirty();
        match b {
            Backend::Kvm => KvmDirtyLog::start(fd, ram)
                .map(Tracker::Kvm)
                .map_err(|e| format!("turning KVM dirty logging on: {e}")),
            Backend::UffdWp => UffdWp::start(ram)
                .map(Tracker::UffdWp)
                .map_err(|e| transport::error_chain(&e)),
            Backend::UffdWpAsync => UffdWpAsync::start(ram)
                .map(Tracker::UffdWpAsync)
                .map_err(|e| transport::error_chain(&e)),
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
            Tracker::UffdWp(t) => t.collect().map_err(|e| transport::error_chain(&e)),
            Tracker::UffdWpAsync(t) => t.collect().map_err(|e| transport::error_chain(&e)),
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
            Tracker::UffdWp(t) => t.stop().map_err(|e| transport::error_chain(&e)),
            Tracker::UffdWpAsync(t) => t.stop().map_err(|e| transport::error_chain(&e)),
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
