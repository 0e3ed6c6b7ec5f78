//! Linux boot (bzImage / ELF vmlinux, 64-bit boot protocol).
use std::path::Path;

use kvm_bindings::kvm_sregs;

use crate::boot::{BootError, BootSetup};
use crate::memory::GuestRam;

/// Loads a Linux kernel (and initrd) and returns the BSP's registers.
pub fn load(
    _ram: &GuestRam,
    kernel: &Path,
    _initrd: Option<&Path>,
    _cmdline: &str,
    _vcpus: u32,
    _base: kvm_sregs,
) -> Result<BootSetup, BootError> {
    Err(BootError::Other(format!(
        "{}: Linux boot is not built yet",
        kernel.display()
    )))
}
