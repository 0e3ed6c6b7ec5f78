//! x86-64, the one architecture this VMM runs on: CPUID policy ([`cpuid`]), the boot
//! protocols (PVH for our guest and ELF kernels, the Linux boot protocol: [`boot`], [`linux`])
//! and the firmware tables a guest reads (MP table: [`mptable`]; ACPI: [`acpi`]). A single
//! level (not `arch/x86_64/`) while there is one architecture; a second would move these down
//! one.

pub mod acpi;
pub mod boot;
pub mod cpuid;
pub mod linux;
pub mod mptable;
