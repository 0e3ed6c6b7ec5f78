//! The Intel MultiProcessor Specification 1.4 table for Linux guests: how
//! many CPUs there are (APIC id = vCPU index, vCPU 0 the BSP), the IOAPIC
//! and how the ISA IRQs reach it.
//!
//! Layout: the MP floating pointer (`_MP_`, 16 bytes) at [`MPTABLE_START`],
//! followed by the configuration table (`PCMP` header and its entries). Both
//! live in the BIOS area 0xF0000..0x100000, which our e820 map reserves and
//! which Linux scans for `_MP_` (on kernels built with `CONFIG_X86_MPPARSE`).
//!
//! The ISA IRQs go to the IOAPIC pin of the same number: that is how KVM's
//! default GSI routing (which this VMM keeps) wires them, the PIT's IRQ 0
//! included. Firmware for QEMU-style machines instead says IRQ 0 → pin 2,
//! which is right only where the VMM installs that route; see
//! [`ISA_IRQ0_PIN`].

use vm_memory::{Bytes, GuestAddress};

use crate::arch::boot::BootError;
use crate::memory::GuestRam;

/// Where the MP floating pointer goes (the configuration table follows it).
pub const MPTABLE_START: u64 = 0xF0000;
/// End of the BIOS area the table must fit in.
pub const MPTABLE_LIMIT: u64 = 0x10_0000;
/// The IOAPIC's MMIO base.
pub const IOAPIC_ADDR: u32 = 0xFEC0_0000;
/// The local APICs' MMIO base.
pub const LAPIC_ADDR: u32 = 0xFEE0_0000;
/// The IOAPIC version the table reports (82093AA-compatible, as KVM's).
pub const IOAPIC_VERSION: u8 = 0x11;
/// The local APIC version the table reports.
pub const LAPIC_VERSION: u8 = 0x14;
/// The IOAPIC pin ISA IRQ 0 (the PIT) arrives on. KVM's default routing,
/// which this VMM does not change, sends GSI 0 to pin 0. Change this to 2
/// (and skip ISA IRQ 2) only together with a GSI route 0 → pin 2.
pub const ISA_IRQ0_PIN: u8 = 0;

const FP_LEN: usize = 16;
const HEADER_LEN: usize = 44;
const PROCESSOR_LEN: usize = 20;
const ENTRY_LEN: usize = 8;

const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;

const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;

const CPU_ENABLED: u8 = 1;
const CPU_BSP: u8 = 2;
/// Family 6 (the signature is informational for Linux).
const CPU_SIGNATURE: u32 = 0x600;
/// FPU | APIC.
const CPU_FEATURES: u32 = 0x201;
const ISA_BUS_ID: u8 = 0;
const SPEC_REV_1_4: u8 = 4;

use crate::arch::boot::table_checksum as checksum;

/// The ISA IRQ → IOAPIC pin routes the table announces.
pub fn isa_routes() -> Vec<(u8, u8)> {
    (0u8..16)
        .filter_map(|irq| match irq {
            0 => Some((0, ISA_IRQ0_PIN)),
            // Pin 2 already carries IRQ 0 when IRQ 0 is rerouted there.
            2 if ISA_IRQ0_PIN == 2 => None,
            _ => Some((irq, irq)),
        })
        .collect()
}

/// The floating pointer and configuration table as they go to guest-physical
/// `base` (the floating pointer's address; 16-byte aligned).
pub fn build(vcpus: u32, base: u64) -> Result<Vec<u8>, BootError> {
    if vcpus == 0 || vcpus > 254 {
        return Err(BootError::Other(format!(
            "MP table for {vcpus} vCPUs (1 to 254 supported)"
        )));
    }
    if !base.is_multiple_of(16) || base + FP_LEN as u64 > u64::from(u32::MAX) {
        return Err(BootError::Other(format!(
            "MP table at {base:#x} (must be 16-byte aligned below 4 GiB)"
        )));
    }
    let ioapic_id = vcpus as u8;
    let config_addr = (base + FP_LEN as u64) as u32;

    // Entries (in the order the spec asks for: processors, buses, IOAPICs,
    // I/O interrupts, local interrupts).
    let io_routes = isa_routes();
    let mut entries =
        Vec::with_capacity(vcpus as usize * PROCESSOR_LEN + (2 + io_routes.len() + 2) * ENTRY_LEN);
    let mut count: u16 = 0;
    for i in 0..vcpus {
        entries.push(ENTRY_PROCESSOR);
        entries.push(i as u8); // local APIC id
        entries.push(LAPIC_VERSION);
        entries.push(CPU_ENABLED | if i == 0 { CPU_BSP } else { 0 });
        entries.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        entries.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    entries.push(ENTRY_BUS);
    entries.push(ISA_BUS_ID);
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    entries.push(ENTRY_IOAPIC);
    entries.push(ioapic_id);
    entries.push(IOAPIC_VERSION);
    entries.push(1); // enabled
    entries.extend_from_slice(&IOAPIC_ADDR.to_le_bytes());
    count += 1;
    for (irq, pin) in io_routes {
        // Flags 0: polarity and trigger mode conform to the bus (ISA: high, edge).
        entries.extend_from_slice(&[
            ENTRY_IO_INTERRUPT,
            INT_TYPE_INT,
            0,
            0,
            ISA_BUS_ID,
            irq,
            ioapic_id,
            pin,
        ]);
        count += 1;
    }
    for (kind, lint) in [(INT_TYPE_EXTINT, 0u8), (INT_TYPE_NMI, 1)] {
        // Destination 0xff: every local APIC.
        entries.extend_from_slice(&[ENTRY_LOCAL_INTERRUPT, kind, 0, 0, ISA_BUS_ID, 0, 0xff, lint]);
        count += 1;
    }

    let table_len = HEADER_LEN + entries.len();
    let mut header = Vec::with_capacity(table_len);
    header.extend_from_slice(b"PCMP");
    header.extend_from_slice(&(table_len as u16).to_le_bytes());
    header.push(SPEC_REV_1_4);
    header.push(0); // checksum, below
    header.extend_from_slice(b"UFVMM   "); // OEM id, 8 bytes
    header.extend_from_slice(b"KVM VMM     "); // product id, 12 bytes
    header.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    header.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    header.extend_from_slice(&count.to_le_bytes());
    header.extend_from_slice(&LAPIC_ADDR.to_le_bytes());
    header.extend_from_slice(&0u16.to_le_bytes()); // extended table length
    header.push(0); // extended table checksum
    header.push(0); // reserved
    debug_assert_eq!(header.len(), HEADER_LEN);
    header.extend_from_slice(&entries);
    header[7] = checksum(&header);

    let mut fp = Vec::with_capacity(FP_LEN);
    fp.extend_from_slice(b"_MP_");
    fp.extend_from_slice(&config_addr.to_le_bytes());
    fp.push(1); // length in 16-byte units
    fp.push(SPEC_REV_1_4);
    fp.push(0); // checksum, below
    fp.extend_from_slice(&[0; 5]); // feature bytes: a config table is present; no IMCR
    fp[10] = checksum(&fp);

    let mut out = fp;
    out.extend_from_slice(&header);
    Ok(out)
}

/// Writes the MP table for `vcpus` vCPUs at [`MPTABLE_START`].
pub fn write(ram: &GuestRam, vcpus: u32) -> Result<(), BootError> {
    let bytes = build(vcpus, MPTABLE_START)?;
    if MPTABLE_START + bytes.len() as u64 > MPTABLE_LIMIT {
        return Err(BootError::Other(format!(
            "MP table of {} bytes does not fit below {MPTABLE_LIMIT:#x}",
            bytes.len()
        )));
    }
    ram.mem()
        .write_slice(&bytes, GuestAddress(MPTABLE_START))
        .map_err(|_| BootError::Memory { what: "MP table" })
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::arch::boot::byte_sum as sum;
    use crate::arch::boot::le::*;

    #[test]
    fn signatures_checksums_and_entries() {
        for vcpus in [1u32, 2, 16] {
            let t = build(vcpus, MPTABLE_START).unwrap();
            let fp = &t[..FP_LEN];
            assert_eq!(&fp[..4], b"_MP_");
            assert_eq!(sum(fp), 0, "floating pointer checksum");
            assert_eq!(fp[8], 1);
            assert_eq!(fp[9], 4);
            let config = u32_at(fp, 4) as u64;
            assert_eq!(config, MPTABLE_START + 16);

            let ct = &t[FP_LEN..];
            assert_eq!(&ct[..4], b"PCMP");
            let len = u16_at(ct, 4) as usize;
            assert_eq!(len, ct.len());
            assert_eq!(sum(&ct[..len]), 0, "configuration table checksum");
            assert_eq!(u32_at(ct, 36), LAPIC_ADDR);

            // Walk the entries.
            let count = u16_at(ct, 34) as usize;
            let mut at = HEADER_LEN;
            let (mut cpus, mut bsp, mut buses, mut ioapics, mut ints, mut lints) =
                (Vec::new(), 0, 0, 0, Vec::new(), Vec::new());
            for _ in 0..count {
                match ct[at] {
                    ENTRY_PROCESSOR => {
                        cpus.push(ct[at + 1]);
                        assert_ne!(ct[at + 3] & CPU_ENABLED, 0);
                        if ct[at + 3] & CPU_BSP != 0 {
                            assert_eq!(ct[at + 1], 0, "the BSP is vCPU 0");
                            bsp += 1;
                        }
                        at += PROCESSOR_LEN;
                    }
                    ENTRY_BUS => {
                        assert_eq!(&ct[at + 2..at + 8], b"ISA   ");
                        buses += 1;
                        at += ENTRY_LEN;
                    }
                    ENTRY_IOAPIC => {
                        assert_eq!(ct[at + 1] as u32, vcpus);
                        assert_eq!(ct[at + 2], IOAPIC_VERSION);
                        assert_eq!(u32_at(ct, at + 4), IOAPIC_ADDR);
                        ioapics += 1;
                        at += ENTRY_LEN;
                    }
                    ENTRY_IO_INTERRUPT => {
                        assert_eq!(ct[at + 6] as u32, vcpus, "destination IOAPIC id");
                        ints.push((ct[at + 5], ct[at + 7]));
                        at += ENTRY_LEN;
                    }
                    ENTRY_LOCAL_INTERRUPT => {
                        lints.push((ct[at + 1], ct[at + 7]));
                        at += ENTRY_LEN;
                    }
                    other => panic!("unknown entry type {other}"),
                }
            }
            assert_eq!(at, len, "entries fill the table exactly");
            assert_eq!(cpus, (0..vcpus as u8).collect::<Vec<_>>());
            assert_eq!((bsp, buses, ioapics), (1, 1, 1));
            assert_eq!(ints, isa_routes());
            assert!(ints.contains(&(0, ISA_IRQ0_PIN)));
            assert!(ints.contains(&(4, 4)), "COM1");
            assert_eq!(lints, vec![(INT_TYPE_EXTINT, 0), (INT_TYPE_NMI, 1)]);
            assert!(MPTABLE_START + t.len() as u64 <= MPTABLE_LIMIT);
        }
    }

    #[test]
    fn refuses_bad_shapes() {
        assert!(build(0, MPTABLE_START).is_err());
        assert!(build(255, MPTABLE_START).is_err());
        assert!(build(1, MPTABLE_START + 1).is_err());
    }
}
