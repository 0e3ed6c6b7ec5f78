//! Linux boot (bzImage / ELF vmlinux, 64-bit boot protocol).
//!
//! Guest-physical layout below 1 MiB:
//!
//! | address    | what                                          |
//! |------------|-----------------------------------------------|
//! | 0x500      | boot GDT (null, code 0x08, data 0x10, TSS 0x18) |
//! | 0x7000     | zero page (`boot_params`, with the e820 map)  |
//! | 0x8ff0     | initial stack (grows down into 0x8000..)      |
//! | 0x9000     | PML4                                          |
//! | 0xA000     | PDPT                                          |
//! | 0xB000     | PD: the first 1 GiB identity-mapped, 2 MiB pages |
//! | 0x20000    | command line                                  |
//! | 0xE0000    | ACPI tables, RSDP first ([`crate::arch::acpi`])     |
//! | 0xF0000    | MP table ([`crate::arch::mptable`])                 |
//!
//! A bzImage goes to its `code32_start` (1 MiB) and starts at its 64-bit
//! entry (load address + 0x200); a vmlinux goes to its segments' physical
//! addresses and starts at `e_entry`. The initrd goes page-aligned as high
//! as the kernel accepts in the first RAM range. The BSP starts in long
//! mode, `rsi` = zero page.
//!
//! The vCPUs, IOAPIC and interrupt routing are described twice: by ACPI
//! tables (the RSDP's address also in the zero page's `acpi_rsdp_addr`) for
//! kernels built without `CONFIG_X86_MPPARSE`, and by an MP table for
//! kernels that boot with `acpi=off` or have no ACPI.

use std::io::Cursor;
use std::path::Path;

use kvm_bindings::{kvm_regs, kvm_sregs};
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_params, setup_header, LOADED_HIGH};
use linux_loader::loader::bzimage::BzImage;
use linux_loader::loader::elf::Elf;
use linux_loader::loader::{KernelLoader, KernelLoaderResult};
use vm_memory::{Bytes, GuestAddress};

use crate::arch::boot::{self, BootError, BootSetup, CMDLINE, CMDLINE_MAX};
use crate::memory::GuestRam;

/// Where the zero page (`boot_params`) goes.
pub const ZERO_PAGE: u64 = 0x7000;
/// The BSP's initial stack pointer (the kernel's entry code pushes before it
/// sets up a stack of its own).
pub const BOOT_STACK: u64 = 0x8ff0;
/// The boot page tables: PML4.
pub const PML4: u64 = 0x9000;
/// PDPT.
pub const PDPT: u64 = 0xA000;
/// Page directory (512 × 2 MiB = the first 1 GiB).
pub const PD: u64 = 0xB000;
/// Where kernels are loaded no lower than (the end of the BIOS area).
pub const HIGH_MEMORY: u64 = 0x10_0000;
/// The initrd ends below this even where the kernel would take it higher
/// (the traditional loader limit, below the 32-bit kernel's lowmem end).
pub const INITRD_LIMIT: u64 = 0x3800_0000;

const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT: u32 = 0x100_0000;
/// bzImage: the 64-bit entry is 0x200 past the 32-bit one.
const BZIMAGE_ENTRY_64: u64 = 0x200;
/// xloadflags: the kernel has the 64-bit entry.
const XLF_KERNEL_64: u16 = 1;
const PAGE: u64 = 4096;

const CR0_PE: u64 = 1;
const CR0_ET: u64 = 1 << 4;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

const PTE_PRESENT: u64 = 1;
const PTE_WRITE: u64 = 1 << 1;
const PDE_2M: u64 = 1 << 7;

fn read_file(path: &Path) -> Result<Vec<u8>, BootError> {
    std::fs::read(path).map_err(|source| BootError::Read {
        path: path.display().to_string(),
        source,
    })
}

fn mem_err(what: &'static str) -> impl Fn(vm_memory::GuestMemoryError) -> BootError {
    move |_| BootError::Memory { what }
}

/// The command line, NUL-terminated, at [`CMDLINE`]; returns its bytes with the NUL.
fn write_cmdline(ram: &GuestRam, cmdline: &str) -> Result<u32, BootError> {
    if cmdline.len() >= CMDLINE_MAX || cmdline.contains('\0') {
        return Err(BootError::Cmdline { len: cmdline.len() });
    }
    let mut b = Vec::with_capacity(cmdline.len() + 1);
    b.extend_from_slice(cmdline.as_bytes());
    b.push(0);
    ram.mem()
        .write_slice(&b, GuestAddress(CMDLINE))
        .map_err(mem_err("command line"))?;
    Ok(b.len() as u32)
}

/// Identity-maps the first 1 GiB with 2 MiB pages.
fn write_page_tables(ram: &GuestRam) -> Result<(), BootError> {
    let mem = ram.mem();
    let err = mem_err("boot page tables");
    let mut pml4 = [0u64; 512];
    pml4[0] = PDPT | PTE_PRESENT | PTE_WRITE;
    let mut pdpt = [0u64; 512];
    pdpt[0] = PD | PTE_PRESENT | PTE_WRITE;
    let mut pd = [0u64; 512];
    for (i, e) in pd.iter_mut().enumerate() {
        *e = ((i as u64) << 21) | PTE_PRESENT | PTE_WRITE | PDE_2M;
    }
    for (addr, table) in [(PML4, &pml4), (PDPT, &pdpt), (PD, &pd)] {
        let bytes: Vec<u8> = table.iter().flat_map(|e| e.to_le_bytes()).collect();
        mem.write_slice(&bytes, GuestAddress(addr)).map_err(&err)?;
    }
    Ok(())
}

/// The kernel in guest memory: where it starts, where its image ends, its setup header.
struct Kernel {
    entry: u64,
    end: u64,
    header: setup_header,
}

fn load_kernel(ram: &GuestRam, image: &[u8], what: &str) -> Result<Kernel, BootError> {
    let load_err = |source| BootError::Load {
        what: what.to_owned(),
        source,
    };
    let mut cursor = Cursor::new(image);
    if image.starts_with(b"\x7fELF") {
        let r: KernelLoaderResult = Elf::load(
            ram.mem(),
            None,
            &mut cursor,
            Some(GuestAddress(HIGH_MEMORY)),
        )
        .map_err(load_err)?;
        // A vmlinux has no setup header: the fields a bzImage would bring.
        let header = setup_header {
            boot_flag: KERNEL_BOOT_FLAG_MAGIC,
            header: KERNEL_HDR_MAGIC,
            kernel_alignment: KERNEL_MIN_ALIGNMENT,
            loadflags: LOADED_HIGH,
            initrd_addr_max: (INITRD_LIMIT - 1) as u32,
            ..Default::default()
        };
        Ok(Kernel {
            entry: r.kernel_load.0,
            end: r.kernel_end,
            header,
        })
    } else {
        let r = BzImage::load(
            ram.mem(),
            None,
            &mut cursor,
            Some(GuestAddress(HIGH_MEMORY)),
        )
        .map_err(load_err)?;
        let header = r.setup_header.ok_or_else(|| {
            BootError::Other(format!(
                "{what}: the bzImage loader returned no setup header"
            ))
        })?;
        let (version, xloadflags) = (header.version, header.xloadflags);
        if version < 0x0206 || xloadflags & XLF_KERNEL_64 == 0 {
            return Err(BootError::Other(format!(
                "{what}: bzImage (boot protocol {}.{:02}) has no 64-bit entry point",
                version >> 8,
                version & 0xff
            )));
        }
        Ok(Kernel {
            entry: r.kernel_load.0 + BZIMAGE_ENTRY_64,
            end: r.kernel_end,
            header,
        })
    }
}

/// Places the initrd as high as the kernel takes it; returns (address, size).
fn load_initrd(ram: &GuestRam, path: &Path, kernel: &Kernel) -> Result<(u32, u32), BootError> {
    let data = read_file(path)?;
    let what = path.display();
    let size = data.len() as u64;
    if size == 0 {
        return Err(BootError::Other(format!("initrd {what} is empty")));
    }
    let first_ram_end = ram.ranges().first().map(|r| r.0 + r.1).unwrap_or(0);
    let max_addr = u64::from(kernel.header.initrd_addr_max);
    let limit = first_ram_end.min(INITRD_LIMIT).min(if max_addr == 0 {
        INITRD_LIMIT
    } else {
        max_addr + 1
    });
    // Above the kernel image and the area it decompresses / relocates into.
    let init_size = u64::from(kernel.header.init_size);
    let pref = kernel.header.pref_address;
    let floor = [
        kernel.end,
        u64::from(kernel.header.code32_start) + init_size,
        if pref != 0 { pref + init_size } else { 0 },
    ]
    .into_iter()
    .max()
    .unwrap_or(0)
    .next_multiple_of(PAGE);
    let addr = limit
        .checked_sub(size)
        .map(|a| a & !(PAGE - 1))
        .filter(|&a| a >= floor)
        .ok_or_else(|| {
            BootError::Other(format!(
                "initrd {what} ({size} bytes) does not fit between the kernel ({floor:#x}) and {limit:#x}"
            ))
        })?;
    ram.mem()
        .write_slice(&data, GuestAddress(addr))
        .map_err(mem_err("initrd"))?;
    log::debug!("initrd {what}: {size} bytes at {addr:#x}");
    Ok((addr as u32, size as u32))
}

fn zero_page(
    ram: &GuestRam,
    kernel: &Kernel,
    cmdline_bytes: u32,
    initrd: Option<(u32, u32)>,
    rsdp: u64,
) -> Result<boot_params, BootError> {
    let mut params = boot_params {
        hdr: kernel.header,
        ..Default::default()
    };
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.loadflags |= LOADED_HIGH;
    params.hdr.cmd_line_ptr = CMDLINE as u32;
    params.hdr.cmdline_size = cmdline_bytes;
    // In the zero page proper (0x070), read by kernels since boot protocol 2.14.
    params.acpi_rsdp_addr = rsdp;
    if let Some((addr, size)) = initrd {
        params.hdr.ramdisk_image = addr;
        params.hdr.ramdisk_size = size;
    }
    let map = boot::memory_map(ram);
    if map.len() > params.e820_table.len() {
        return Err(BootError::Other(format!(
            "{} e820 entries (the zero page holds {})",
            map.len(),
            params.e820_table.len()
        )));
    }
    for (slot, &(addr, size, type_)) in params.e820_table.iter_mut().zip(&map) {
        slot.addr = addr;
        slot.size = size;
        slot.r#type = type_;
    }
    params.e820_entries = map.len() as u8;
    Ok(params)
}

/// Loads a Linux kernel (and initrd), writes the boot tables (ACPI with the virtio-mmio windows
/// `virtio`, `(address, GSI)`; MP table) and returns the BSP's registers.
pub fn load(
    ram: &GuestRam,
    kernel: &Path,
    initrd: Option<&Path>,
    cmdline: &str,
    vcpus: u32,
    virtio: &[(u64, u32)],
    base: kvm_sregs,
) -> Result<BootSetup, BootError> {
    let image = read_file(kernel)?;
    let what = kernel.display().to_string();
    let k = load_kernel(ram, &image, &what)?;
    drop(image);

    let cmdline_bytes = write_cmdline(ram, cmdline)?;
    let kernel_max = k.header.cmdline_size;
    if kernel_max != 0 && cmdline.len() as u64 > u64::from(kernel_max) {
        log::warn!(
            "{what}: the command line has {} bytes; this kernel takes {kernel_max} and drops the rest",
            cmdline.len()
        );
    }
    let initrd = initrd.map(|p| load_initrd(ram, p, &k)).transpose()?;
    let rsdp = crate::arch::acpi::write(ram, vcpus, virtio)?;
    let params = zero_page(ram, &k, cmdline_bytes, initrd, rsdp)?;
    LinuxBootConfigurator::write_bootparams::<vm_memory::GuestMemoryMmap<()>>(
        &BootParams::new(&params, GuestAddress(ZERO_PAGE)),
        ram.mem(),
    )
    .map_err(|e| BootError::Other(format!("zero page: {e}")))?;
    crate::arch::mptable::write(ram, vcpus)?;
    write_page_tables(ram)?;
    // 64-bit code 0x08, data 0x10, TSS 0x18.
    let mut sregs = boot::boot_segments(ram, base, true)?;
    sregs.cr0 = CR0_PE | CR0_ET | CR0_PG;
    sregs.cr3 = PML4;
    sregs.cr4 = CR4_PAE;
    sregs.efer = EFER_LME | EFER_LMA;
    let regs = kvm_regs {
        rip: k.entry,
        rsi: ZERO_PAGE,
        rsp: BOOT_STACK,
        rbp: BOOT_STACK,
        rflags: 0x2,
        ..Default::default()
    };
    log::info!(
        "Linux {what}: entry {:#x}, image end {:#x}, command line {cmdline:?}{}",
        k.entry,
        k.end,
        match initrd {
            Some((a, s)) => format!(", initrd {s} bytes at {a:#x}"),
            None => String::new(),
        }
    );
    Ok(BootSetup { regs, sregs })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ram() -> GuestRam {
        GuestRam::new(64 << 20).unwrap()
    }

    fn sregs() -> kvm_sregs {
        kvm_sregs::default()
    }

    /// A minimal bzImage: boot sector + one setup sector with the header, then a "kernel".
    fn bzimage(version: u16, xloadflags: u16) -> Vec<u8> {
        let mut img = vec![0u8; 1024 + 4096];
        img[0x1f1] = 1; // setup_sects
        img[0x1fe..0x200].copy_from_slice(&KERNEL_BOOT_FLAG_MAGIC.to_le_bytes());
        img[0x202..0x206].copy_from_slice(&KERNEL_HDR_MAGIC.to_le_bytes());
        img[0x206..0x208].copy_from_slice(&version.to_le_bytes());
        img[0x211] = LOADED_HIGH; // loadflags
        img[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes()); // code32_start
        img[0x22c..0x230].copy_from_slice(&0x7fff_ffffu32.to_le_bytes()); // initrd_addr_max
        img[0x236..0x238].copy_from_slice(&xloadflags.to_le_bytes());
        img[0x238..0x23c].copy_from_slice(&2047u32.to_le_bytes()); // cmdline_size
        img[1024..1028].copy_from_slice(b"KERN");
        img
    }

    fn temp(tag: &str, data: &[u8]) -> std::path::PathBuf {
        let p = std::env::temp_dir().join(format!("vmm-linux-{}-{tag}", std::process::id()));
        std::fs::write(&p, data).unwrap();
        p
    }

    #[test]
    fn missing_kernel_names_the_path() {
        let p = Path::new("/nonexistent/vmlinuz-for-test");
        let e = load(&ram(), p, None, "", 1, &[], sregs()).unwrap_err();
        match e {
            BootError::Read { path, .. } => assert_eq!(path, p.display().to_string()),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn bzimage_zero_page_long_mode_and_initrd() {
        let ram = ram();
        let k = temp("bz", &bzimage(0x020f, XLF_KERNEL_64));
        let initrd = temp("initrd", &[0x5a; 10_000]);
        let setup = load(
            &ram,
            &k,
            Some(&initrd),
            "console=ttyS0 x=1",
            2,
            &[],
            sregs(),
        )
        .unwrap();
        let _ = std::fs::remove_file(&k);
        let _ = std::fs::remove_file(&initrd);
        let mem = ram.mem();
        assert_eq!(setup.regs.rip, 0x10_0000 + 0x200);
        assert_eq!(setup.regs.rsi, ZERO_PAGE);
        assert_eq!(setup.sregs.cr3, PML4);
        assert_eq!(setup.sregs.efer, 0x500);
        assert_eq!(setup.sregs.cr0, 0x8000_0011);
        assert_eq!(setup.sregs.cs.l, 1);
        let kernel: [u8; 4] = mem.read_obj(GuestAddress(0x10_0000)).unwrap();
        assert_eq!(&kernel, b"KERN");

        let p: boot_params = mem.read_obj(GuestAddress(ZERO_PAGE)).unwrap();
        let (tl, ptr, rd, rs) = (
            p.hdr.type_of_loader,
            p.hdr.cmd_line_ptr,
            p.hdr.ramdisk_image,
            p.hdr.ramdisk_size,
        );
        assert_eq!(tl, 0xff);
        assert_eq!(ptr as u64, CMDLINE);
        assert_eq!(rs, 10_000);
        assert_eq!(rd % 4096, 0);
        assert!(rd as u64 + 10_000 <= 64 << 20);
        assert!(
            rd as u64 + 10_000 > (64 << 20) - 8192,
            "as high as possible"
        );
        let byte: u8 = mem.read_obj(GuestAddress(rd as u64)).unwrap();
        assert_eq!(byte, 0x5a);
        let map = boot::memory_map(&ram);
        assert_eq!(p.e820_entries as usize, map.len());
        for (e, &(a, s, t)) in p.e820_table.iter().zip(&map) {
            let (ea, es, et) = (e.addr, e.size, e.r#type);
            assert_eq!((ea, es, et), (a, s, t));
        }
        let mut line = [0u8; 18];
        mem.read_slice(&mut line, GuestAddress(CMDLINE)).unwrap();
        assert_eq!(&line, b"console=ttyS0 x=1\0");

        // Identity map: 2 MiB page 3 maps 6 MiB.
        let pde: u64 = mem.read_obj(GuestAddress(PD + 3 * 8)).unwrap();
        assert_eq!(pde, (3 << 21) | 0x83);
        let mp: [u8; 4] = mem
            .read_obj(GuestAddress(crate::arch::mptable::MPTABLE_START))
            .unwrap();
        assert_eq!(&mp, b"_MP_");
        let rsdp_addr = p.acpi_rsdp_addr;
        assert_eq!(rsdp_addr, crate::arch::acpi::ACPI_START);
        let rsdp: [u8; 8] = mem.read_obj(GuestAddress(rsdp_addr)).unwrap();
        assert_eq!(&rsdp, b"RSD PTR ");
    }

    #[test]
    fn refuses_bad_command_lines_and_old_kernels() {
        let ram = ram();
        let k = temp("bz2", &bzimage(0x020f, XLF_KERNEL_64));
        let long = "x".repeat(CMDLINE_MAX);
        assert!(matches!(
            load(&ram, &k, None, &long, 1, &[], sregs()),
            Err(BootError::Cmdline { .. })
        ));
        assert!(matches!(
            load(&ram, &k, None, "a\0b", 1, &[], sregs()),
            Err(BootError::Cmdline { .. })
        ));
        let old = temp("bz3", &bzimage(0x020f, 0));
        assert!(matches!(
            load(&ram, &old, None, "", 1, &[], sregs()),
            Err(BootError::Other(_))
        ));
        let empty = temp("empty", &[]);
        assert!(matches!(
            load(&ram, &k, Some(&empty), "", 1, &[], sregs()),
            Err(BootError::Other(m)) if m.contains("empty")
        ));
        let huge = temp("huge", &[]);
        std::fs::File::options()
            .write(true)
            .open(&huge)
            .unwrap()
            .set_len(63 << 20)
            .unwrap();
        assert!(matches!(
            load(&ram, &k, Some(&huge), "", 1, &[], sregs()),
            Err(BootError::Other(m)) if m.contains("does not fit")
        ));
        let junk = temp("junk", &[0u8; 8192]);
        assert!(matches!(
            load(&ram, &junk, None, "", 1, &[], sregs()),
            Err(BootError::Load { .. })
        ));
        for p in [k, old, junk, empty, huge] {
            let _ = std::fs::remove_file(p);
        }
    }
}
