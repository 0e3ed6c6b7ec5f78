//! Loading what the VM boots and the boot CPU's first registers.
//!
//! PVH (our guest, or any ELF with a `XEN_ELFNOTE_PHYS32_ENTRY` note): the
//! ELF's segments go to their physical addresses, an `hvm_start_info` with
//! the memory map and command line is written to low memory, and the BSP
//! starts in 32-bit protected mode, paging off, `ebx` = start info. Linux
//! bzImage / vmlinux boot through the 64-bit boot protocol is in
//! [`crate::arch::linux`].

use std::io::Cursor;

use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::elf::start_info::{hvm_memmap_table_entry, hvm_start_info};
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::KernelLoader;
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress};

use crate::memory::GuestRam;

/// Where the boot GDT goes.
pub const BOOT_GDT: u64 = 0x500;
/// Where the PVH start info goes.
pub const PVH_INFO: u64 = 0x6000;
/// Where the PVH memory map goes.
pub const PVH_MEMMAP: u64 = 0x7000;
/// Where the command line goes.
pub const CMDLINE: u64 = 0x20000;
/// Longest command line.
pub const CMDLINE_MAX: usize = 4096;

const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;

/// Loading the boot image failed.
#[derive(Debug, Error)]
pub enum BootError {
    /// The kernel / guest file could not be read.
    #[error("cannot read {path}")]
    Read {
        /// The file.
        path: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// linux-loader refused the image.
    #[error("cannot load {what}")]
    Load {
        /// What.
        what: String,
        /// Cause.
        #[source]
        source: linux_loader::loader::Error,
    },
    /// The ELF has no PVH entry note.
    #[error("{what} has no PVH entry (XEN_ELFNOTE_PHYS32_ENTRY note); only PVH ELF images boot with --guest")]
    NoPvhEntry {
        /// What.
        what: String,
    },
    /// The command line is too long or contains a NUL.
    #[error("command line of {len} bytes is invalid (max {CMDLINE_MAX}, no NUL bytes)")]
    Cmdline {
        /// Its length.
        len: usize,
    },
    /// Writing boot structures into guest memory failed.
    #[error("cannot write {what} into guest memory")]
    Memory {
        /// What.
        what: &'static str,
    },
    /// Anything else about the boot setup.
    #[error("{0}")]
    Other(String),
}

/// The BSP's first registers.
#[derive(Debug, Clone)]
pub struct BootSetup {
    /// General registers.
    pub regs: kvm_regs,
    /// Segment / control registers.
    pub sregs: kvm_sregs,
}

/// A flat segment.
pub fn segment(selector: u16, type_: u8, db: u8, l: u8) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db,
        s: 1,
        l,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// Writes a GDT at [`BOOT_GDT`]: null, code (0x08), data (0x10), TSS (0x18).
pub fn write_boot_gdt(ram: &GuestRam, code: u64) -> Result<(), BootError> {
    let gdt: [u64; 4] = [0, code, 0x00cf_9300_0000_ffff, 0x0080_8b00_0000_0067];
    for (i, e) in gdt.iter().enumerate() {
        ram.mem()
            .write_obj(*e, GuestAddress(BOOT_GDT + 8 * i as u64))
            .map_err(|_| BootError::Memory { what: "boot GDT" })?;
    }
    Ok(())
}

/// Writes the boot GDT and points `base`'s segment registers at it: code 0x08 (64-bit when
/// `long_mode`, else 32-bit), flat data 0x10 in every data segment, TSS 0x18.
pub fn boot_segments(
    ram: &GuestRam,
    base: kvm_sregs,
    long_mode: bool,
) -> Result<kvm_sregs, BootError> {
    let (code_desc, code) = if long_mode {
        (0x00af_9b00_0000_ffff, segment(0x08, 0xb, 0, 1))
    } else {
        (0x00cf_9b00_0000_ffff, segment(0x08, 0xb, 1, 0))
    };
    write_boot_gdt(ram, code_desc)?;
    let mut sregs = base;
    sregs.cs = code;
    let data = segment(0x10, 0x3, 1, 0);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = kvm_segment {
        base: 0,
        limit: 0x67,
        selector: 0x18,
        type_: 0xb,
        present: 1,
        s: 0,
        ..Default::default()
    };
    sregs.gdt.base = BOOT_GDT;
    sregs.gdt.limit = 4 * 8 - 1;
    Ok(sregs)
}

/// The checksum byte of a firmware table (ACPI, MP): what makes all its bytes sum to 0 mod 256.
pub fn table_checksum(bytes: &[u8]) -> u8 {
    byte_sum(bytes).wrapping_neg()
}

/// Sum of `bytes` mod 256 (0 for a firmware table with a correct checksum).
pub fn byte_sum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |s, b| s.wrapping_add(*b))
}

/// The e820-style map shared by PVH and Linux: low RAM, the BIOS hole,
/// RAM from 1 MiB, the RAM above 4 GiB.
pub fn memory_map(ram: &GuestRam) -> Vec<(u64, u64, u32)> {
    let mut map = vec![
        (0, 0x9fc00, E820_RAM),
        (0x9fc00, 0x100000 - 0x9fc00, E820_RESERVED),
    ];
    for &(gpa, len) in ram.ranges() {
        if gpa == 0 {
            if len > 0x100000 {
                map.push((0x100000, len - 0x100000, E820_RAM));
            }
        } else {
            map.push((gpa, len, E820_RAM));
        }
    }
    map
}

fn write_cmdline(ram: &GuestRam, cmdline: &str) -> Result<(), BootError> {
    if cmdline.len() >= CMDLINE_MAX || cmdline.contains('\0') {
        return Err(BootError::Cmdline { len: cmdline.len() });
    }
    let mut b = cmdline.as_bytes().to_vec();
    b.push(0);
    ram.mem()
        .write_slice(&b, GuestAddress(CMDLINE))
        .map_err(|_| BootError::Memory {
            what: "command line",
        })
}

/// Loads a PVH ELF image and sets up its start info.
pub fn load_pvh(
    ram: &GuestRam,
    elf: &[u8],
    what: &str,
    cmdline: &str,
    base_sregs: kvm_sregs,
) -> Result<BootSetup, BootError> {
    let mut image = Cursor::new(elf);
    let loaded =
        Elf::load(ram.mem(), None, &mut image, None).map_err(|source| BootError::Load {
            what: what.to_owned(),
            source,
        })?;
    let PvhBootCapability::PvhEntryPresent(entry) = loaded.pvh_boot_cap else {
        return Err(BootError::NoPvhEntry {
            what: what.to_owned(),
        });
    };
    write_cmdline(ram, cmdline)?;
    let map: Vec<hvm_memmap_table_entry> = memory_map(ram)
        .into_iter()
        .map(|(addr, size, type_)| hvm_memmap_table_entry {
            addr,
            size,
            type_,
            reserved: 0,
        })
        .collect();
    let info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC,
        version: 1,
        cmdline_paddr: CMDLINE,
        memmap_paddr: PVH_MEMMAP,
        memmap_entries: map.len() as u32,
        ..Default::default()
    };
    let mut params = BootParams::new(&info, GuestAddress(PVH_INFO));
    params.set_sections(&map, GuestAddress(PVH_MEMMAP));
    PvhBootConfigurator::write_bootparams::<vm_memory::GuestMemoryMmap<()>>(&params, ram.mem())
        .map_err(|e| BootError::Other(format!("PVH start info: {e}")))?;
    // 32-bit flat code 0x08, data 0x10, TSS 0x18.
    let mut sregs = boot_segments(ram, base_sregs, false)?;
    sregs.cr0 = 0x11; // PE | ET
    sregs.cr4 = 0;
    sregs.efer = 0;
    let regs = kvm_regs {
        rip: entry.0,
        rbx: PVH_INFO,
        rflags: 0x2,
        ..Default::default()
    };
    Ok(BootSetup { regs, sregs })
}

/// Little-endian reads for tests of byte layouts.
#[cfg(test)]
pub(crate) mod le {
    /// u16 at `at`.
    pub fn u16_at(b: &[u8], at: usize) -> u16 {
        u16::from_le_bytes([b[at], b[at + 1]])
    }
    /// u32 at `at`.
    pub fn u32_at(b: &[u8], at: usize) -> u32 {
        u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
    }
    /// u64 at `at`.
    pub fn u64_at(b: &[u8], at: usize) -> u64 {
        u64::from(u32_at(b, at)) | (u64::from(u32_at(b, at + 4)) << 32)
    }
}
