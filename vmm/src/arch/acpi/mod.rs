//! ACPI tables for Linux guests: what kernels built without
//! `CONFIG_X86_MPPARSE` (Debian's cloud kernel, for one) need to find the
//! vCPUs, the IOAPIC and the serial port.
//!
//! Layout from [`ACPI_START`] (0xE0000, in the BIOS area our e820 map
//! reserves, below the MP table at [`crate::arch::mptable::MPTABLE_START`]), each
//! table 16-byte aligned:
//!
//! | table | what                                                         |
//! |-------|--------------------------------------------------------------|
//! | RSDP  | ACPI 2.0 root pointer (revision 2), only an XSDT address     |
//! | XSDT  | points at the FADT and the MADT                              |
//! | FADT  | revision 6, hardware-reduced, points at the DSDT             |
//! | DSDT  | `\_SB.COM1`: the 16550 at 0x3F8, IRQ 4                       |
//! | MADT  | one local APIC per vCPU, the IOAPIC, LINT1 = NMI             |
//!
//! The RSDP sits on a 16-byte boundary in 0xE0000..0xFFFFF, where Linux's
//! legacy scan looks, and its address also goes to the zero page
//! (`boot_params.acpi_rsdp_addr`), so the kernel need not scan.
//!
//! **Hardware-reduced ACPI** (FADT flag `HW_REDUCED_ACPI`, as Firecracker
//! and Cloud Hypervisor do): the VMM emulates no ACPI PM1 event / control
//! blocks, no PM timer, no GPEs and no SCI, and a full-hardware FADT would
//! need all of them (and a FACS). With the flag set, Linux expects none of
//! that; it also leaves the 8259 PICs and the PIT alone (it times with the
//! TSC / kvmclock and the local APIC timer) and maps no ISA IRQ on its own:
//! devices get their IRQs from their ACPI description. That is why the DSDT
//! describes COM1 (`PNP0501`, I/O 0x3F8..0x3FF, IRQ 4 edge / active high):
//! the kernel's PnP layer then routes GSI 4, which reaches IOAPIC pin 4 as
//! the VMM's irqfd raises it. No interrupt source overrides: KVM's default
//! GSI routing, which this VMM keeps, wires ISA IRQ n to IOAPIC pin n (the
//! same choice as the MP table, see [`crate::arch::mptable::ISA_IRQ0_PIN`]).
//!
//! FADT boot flags: no VGA, no CMOS RTC (neither is emulated), and no 8042
//! advertised: the i8042 is there only for the reset pulse, which Linux's
//! reboot path writes to port 0x64 whether the flag is set or not, while the
//! flag would make Linux probe it for a keyboard.

use vm_memory::{Bytes, GuestAddress};

use crate::arch::boot::BootError;
use crate::arch::mptable::{IOAPIC_ADDR, LAPIC_ADDR, MPTABLE_START};
use crate::devices::{COM1, COM1_GSI};
use crate::memory::GuestRam;

/// Where the RSDP (and after it the other tables) goes.
pub const ACPI_START: u64 = 0xE0000;
/// The tables end below this (the MP table follows).
pub const ACPI_LIMIT: u64 = MPTABLE_START;

/// OEM id in every table (6 bytes).
pub const OEM_ID: &[u8; 6] = b"UFVMM ";
const OEM_REVISION: u32 = 1;
const CREATOR_ID: &[u8; 4] = b"UFVM";
const CREATOR_REVISION: u32 = 1;

const RSDP_LEN: usize = 36;
const RSDP_V1_LEN: usize = 20;
const HEADER_LEN: usize = 36;
/// FADT length for revision 6 (ACPI 6.x, up to the hypervisor vendor id).
const FADT_LEN: usize = 276;
const FADT_REVISION: u8 = 6;
/// ACPI 6.5.
const FADT_MINOR_REVISION: u8 = 5;
const MADT_REVISION: u8 = 5;
/// Revision 2: 64-bit AML integers.
const DSDT_REVISION: u8 = 2;
const XSDT_REVISION: u8 = 1;
const TABLE_ALIGN: usize = 16;

/// FADT flags: PWR_BUTTON and SLP_BUTTON (no fixed-feature buttons), HW_REDUCED_ACPI.
const FADT_FLAGS: u32 = (1 << 4) | (1 << 5) | (1 << 20);
/// IAPC_BOOT_ARCH: VGA not present (bit 2), CMOS RTC not present (bit 5).
const IAPC_BOOT_ARCH: u16 = (1 << 2) | (1 << 5);
const FADT_OFF_DSDT: usize = 40;
const FADT_OFF_IAPC_BOOT_ARCH: usize = 109;
const FADT_OFF_FLAGS: usize = 112;
const FADT_OFF_MINOR_REVISION: usize = 131;
const FADT_OFF_X_DSDT: usize = 140;
const FADT_OFF_HYPERVISOR_ID: usize = 268;

/// MADT flags: PCAT_COMPAT (KVM's in-kernel irqchip has the two 8259s).
const MADT_PCAT_COMPAT: u32 = 1;
const MADT_LOCAL_APIC: u8 = 0;
const MADT_IO_APIC: u8 = 1;
const MADT_LOCAL_APIC_NMI: u8 = 4;
const MADT_LOCAL_APIC_LEN: u8 = 8;
const MADT_IO_APIC_LEN: u8 = 12;
const MADT_LOCAL_APIC_NMI_LEN: u8 = 6;
const LAPIC_ENABLED: u32 = 1;
/// Processor UID 0xFF in a Local APIC NMI entry: all processors.
const ALL_PROCESSORS: u8 = 0xff;

/// Where each table went (guest-physical) and the bytes of the whole area.
#[derive(Debug, Clone)]
pub struct AcpiTables {
    /// The bytes to write at [`AcpiTables::rsdp`] (the RSDP first).
    pub bytes: Vec<u8>,
    /// RSDP address (the start of `bytes`).
    pub rsdp: u64,
    /// XSDT address.
    pub xsdt: u64,
    /// FADT address.
    pub fadt: u64,
    /// DSDT address.
    pub dsdt: u64,
    /// MADT address.
    pub madt: u64,
}

use crate::arch::boot::table_checksum as checksum;

/// A table: the standard header (length and checksum filled by [`finish`]) and `body`.
fn table(signature: &[u8; 4], revision: u8, oem_table_id: &[u8; 8], body: &[u8]) -> Vec<u8> {
    let mut t = Vec::with_capacity(HEADER_LEN + body.len());
    t.extend_from_slice(signature);
    t.extend_from_slice(&0u32.to_le_bytes()); // length, below
    t.push(revision);
    t.push(0); // checksum, below
    t.extend_from_slice(OEM_ID);
    t.extend_from_slice(oem_table_id);
    t.extend_from_slice(&OEM_REVISION.to_le_bytes());
    t.extend_from_slice(CREATOR_ID);
    t.extend_from_slice(&CREATOR_REVISION.to_le_bytes());
    debug_assert_eq!(t.len(), HEADER_LEN);
    t.extend_from_slice(body);
    finish(&mut t);
    t
}

/// Sets a table's length and checksum fields.
fn finish(t: &mut [u8]) {
    let len = t.len() as u32;
    t[4..8].copy_from_slice(&len.to_le_bytes());
    t[9] = 0;
    t[9] = checksum(t);
}

fn put(t: &mut [u8], at: usize, bytes: &[u8]) {
    t[at..at + bytes.len()].copy_from_slice(bytes);
}

mod aml;

/// The DSDT's AML: `Scope (\_SB) { Device (COM1) { _HID PNP0501, _UID 0, _CRS } ... }` and,
/// for each virtio-mmio window `(address, GSI)`, `Device (VRnn) { _HID "LNRO0005", _UID n,
/// _CRS { Memory32Fixed 4 KiB, Interrupt GSI } }`: the ACPI id Linux's `virtio_mmio` driver
/// binds, so a stock distro kernel (no `virtio_mmio.device=` support) finds our disks and NICs.
fn dsdt_aml(virtio: &[(u64, u32)]) -> Result<Vec<u8>, BootError> {
    let mut crs = aml::io_resource(COM1, 8);
    crs.extend(aml::irq_resource(COM1_GSI as u8));
    crs.extend(aml::end_tag());
    let mut com1 = aml::name(b"_HID", &aml::eisa_id(b"PNP0501"));
    com1.extend(aml::name(b"_UID", &aml::integer(0)));
    com1.extend(aml::name(b"_CRS", &aml::buffer(&crs)));
    let mut devices = aml::device(b"COM1", &com1);
    if virtio.len() > 100 {
        return Err(BootError::Other(format!(
            "{} virtio devices for the DSDT (at most 100)",
            virtio.len()
        )));
    }
    for (n, &(addr, gsi)) in virtio.iter().enumerate() {
        let base = u32::try_from(addr)
            .ok()
            .filter(|b| b.checked_add(VIRTIO_WINDOW).is_some())
            .ok_or_else(|| {
                BootError::Other(format!(
                    "virtio window at {addr:#x} is not below 4 GiB (Memory32Fixed)"
                ))
            })?;
        let mut crs = aml::memory32_fixed(base, VIRTIO_WINDOW);
        crs.extend(aml::extended_irq(gsi));
        crs.extend(aml::end_tag());
        let mut dev = aml::name(b"_HID", &aml::string("LNRO0005"));
        dev.extend(aml::name(b"_UID", &aml::integer(n as u32)));
        dev.extend(aml::name(b"_CRS", &aml::buffer(&crs)));
        let seg = [b'V', b'R', b'0' + (n / 10) as u8, b'0' + (n % 10) as u8];
        devices.extend(aml::device(&seg, &dev));
    }
    Ok(aml::scope(b"\\_SB_", &devices))
}

/// Bytes of one virtio-mmio window.
const VIRTIO_WINDOW: u32 = 0x1000;

fn madt(vcpus: u32) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&LAPIC_ADDR.to_le_bytes());
    body.extend_from_slice(&MADT_PCAT_COMPAT.to_le_bytes());
    for i in 0..vcpus {
        // Processor UID = APIC id = vCPU index.
        body.extend_from_slice(&[MADT_LOCAL_APIC, MADT_LOCAL_APIC_LEN, i as u8, i as u8]);
        body.extend_from_slice(&LAPIC_ENABLED.to_le_bytes());
    }
    body.extend_from_slice(&[MADT_IO_APIC, MADT_IO_APIC_LEN, vcpus as u8, 0]);
    body.extend_from_slice(&IOAPIC_ADDR.to_le_bytes());
    body.extend_from_slice(&0u32.to_le_bytes()); // GSI base
                                                 // LINT1 of every processor is the NMI input; flags 0: polarity and trigger conform to the bus.
    body.extend_from_slice(&[MADT_LOCAL_APIC_NMI, MADT_LOCAL_APIC_NMI_LEN, ALL_PROCESSORS]);
    body.extend_from_slice(&0u16.to_le_bytes());
    body.push(1); // LINT1
    table(b"APIC", MADT_REVISION, b"UFVMAPIC", &body)
}

fn fadt(dsdt: u64) -> Vec<u8> {
    let mut t = table(
        b"FACP",
        FADT_REVISION,
        b"UFVMFACP",
        &[0u8; FADT_LEN - HEADER_LEN],
    );
    // Both DSDT pointers (the 32-bit one fits: the tables live below 1 MiB).
    put(&mut t, FADT_OFF_DSDT, &(dsdt as u32).to_le_bytes());
    put(&mut t, FADT_OFF_X_DSDT, &dsdt.to_le_bytes());
    put(
        &mut t,
        FADT_OFF_IAPC_BOOT_ARCH,
        &IAPC_BOOT_ARCH.to_le_bytes(),
    );
    put(&mut t, FADT_OFF_FLAGS, &FADT_FLAGS.to_le_bytes());
    t[FADT_OFF_MINOR_REVISION] = FADT_MINOR_REVISION;
    put(&mut t, FADT_OFF_HYPERVISOR_ID, b"UFVMMKVM");
    finish(&mut t);
    t
}

fn xsdt(entries: &[u64]) -> Vec<u8> {
    let body: Vec<u8> = entries.iter().flat_map(|a| a.to_le_bytes()).collect();
    table(b"XSDT", XSDT_REVISION, b"UFVMXSDT", &body)
}

fn rsdp(xsdt: u64) -> Vec<u8> {
    let mut r = Vec::with_capacity(RSDP_LEN);
    r.extend_from_slice(b"RSD PTR ");
    r.push(0); // checksum of the first 20 bytes, below
    r.extend_from_slice(OEM_ID);
    r.push(2); // revision: ACPI 2.0+
    r.extend_from_slice(&0u32.to_le_bytes()); // no RSDT
    r.extend_from_slice(&(RSDP_LEN as u32).to_le_bytes());
    r.extend_from_slice(&xsdt.to_le_bytes());
    r.push(0); // extended checksum, below
    r.extend_from_slice(&[0; 3]);
    debug_assert_eq!(r.len(), RSDP_LEN);
    r[8] = checksum(&r[..RSDP_V1_LEN]);
    r[32] = checksum(&r);
    r
}

fn align(v: &mut Vec<u8>) {
    v.resize(v.len().next_multiple_of(TABLE_ALIGN), 0);
}

/// The tables for `vcpus` vCPUs and the virtio-mmio windows `virtio` (`(address, GSI)`), laid
/// out from guest-physical `base` (16-byte aligned, below 1 MiB).
pub fn build(vcpus: u32, base: u64, virtio: &[(u64, u32)]) -> Result<AcpiTables, BootError> {
    if vcpus == 0 || vcpus > 254 {
        return Err(BootError::Other(format!(
            "ACPI tables for {vcpus} vCPUs (1 to 254 supported)"
        )));
    }
    if !base.is_multiple_of(TABLE_ALIGN as u64) || base >= 0x10_0000 {
        return Err(BootError::Other(format!(
            "ACPI tables at {base:#x} (must be 16-byte aligned below 1 MiB)"
        )));
    }
    // Offsets first (the sizes do not depend on the addresses), then the bytes.
    let at = |off: usize| base + off as u64;
    let dsdt_t = table(b"DSDT", DSDT_REVISION, b"UFVMDSDT", &dsdt_aml(virtio)?);
    let madt_t = madt(vcpus);
    let xsdt_off = RSDP_LEN.next_multiple_of(TABLE_ALIGN);
    let fadt_off = (xsdt_off + HEADER_LEN + 2 * 8).next_multiple_of(TABLE_ALIGN);
    let dsdt_off = (fadt_off + FADT_LEN).next_multiple_of(TABLE_ALIGN);
    let madt_off = (dsdt_off + dsdt_t.len()).next_multiple_of(TABLE_ALIGN);

    let mut bytes = rsdp(at(xsdt_off));
    for (off, t) in [
        (xsdt_off, xsdt(&[at(fadt_off), at(madt_off)])),
        (fadt_off, fadt(at(dsdt_off))),
        (dsdt_off, dsdt_t),
        (madt_off, madt_t),
    ] {
        align(&mut bytes);
        debug_assert_eq!(bytes.len(), off);
        bytes.extend(t);
    }
    Ok(AcpiTables {
        bytes,
        rsdp: base,
        xsdt: at(xsdt_off),
        fadt: at(fadt_off),
        dsdt: at(dsdt_off),
        madt: at(madt_off),
    })
}

/// Writes the tables for `vcpus` vCPUs and the virtio-mmio windows `virtio` at
/// [`ACPI_START`]; returns the RSDP's address.
pub fn write(ram: &GuestRam, vcpus: u32, virtio: &[(u64, u32)]) -> Result<u64, BootError> {
    let t = build(vcpus, ACPI_START, virtio)?;
    if ACPI_START + t.bytes.len() as u64 > ACPI_LIMIT {
        return Err(BootError::Other(format!(
            "ACPI tables of {} bytes do not fit below {ACPI_LIMIT:#x}",
            t.bytes.len()
        )));
    }
    ram.mem()
        .write_slice(&t.bytes, GuestAddress(ACPI_START))
        .map_err(|_| BootError::Memory {
            what: "ACPI tables",
        })?;
    Ok(t.rsdp)
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::arch::boot::byte_sum as sum;
    use crate::arch::boot::le::*;

    /// The table at guest address `addr`: checks signature, length and checksum.
    fn table_at<'a>(t: &'a AcpiTables, addr: u64, sig: &[u8; 4]) -> &'a [u8] {
        let off = (addr - t.rsdp) as usize;
        let b = &t.bytes[off..];
        assert_eq!(&b[..4], sig);
        let len = u32_at(b, 4) as usize;
        assert!(len >= HEADER_LEN && len <= b.len(), "{sig:?} length {len}");
        let b = &b[..len];
        assert_eq!(sum(b), 0, "{sig:?} checksum");
        assert_eq!(&b[10..16], OEM_ID);
        assert_eq!(addr % 8, 0, "{sig:?} alignment");
        b
    }

    #[test]
    fn checksums_and_pointers() {
        for vcpus in [1u32, 2, 16, 254] {
            let t = build(vcpus, ACPI_START, &[(0xd000_0000, 5)]).unwrap();
            assert_eq!(t.rsdp, ACPI_START);
            assert_eq!(t.rsdp % 16, 0);

            let r = &t.bytes[..RSDP_LEN];
            assert_eq!(&r[..8], b"RSD PTR ");
            assert_eq!(sum(&r[..RSDP_V1_LEN]), 0, "RSDP checksum");
            assert_eq!(sum(r), 0, "RSDP extended checksum");
            assert_eq!(r[15], 2, "revision");
            assert_eq!(u32_at(r, 20) as usize, RSDP_LEN);
            assert_eq!(u64_at(r, 24), t.xsdt);

            let x = table_at(&t, t.xsdt, b"XSDT");
            let entries: Vec<u64> = x[HEADER_LEN..]
                .chunks_exact(8)
                .map(|c| u64_at(c, 0))
                .collect();
            assert_eq!(entries, vec![t.fadt, t.madt]);

            let f = table_at(&t, t.fadt, b"FACP");
            assert_eq!(f.len(), FADT_LEN);
            assert_eq!(f[8], 6, "FADT revision");
            assert_eq!(u32_at(f, FADT_OFF_DSDT) as u64, t.dsdt);
            assert_eq!(u64_at(f, FADT_OFF_X_DSDT), t.dsdt);
            assert_ne!(u32_at(f, FADT_OFF_FLAGS) & (1 << 20), 0, "HW_REDUCED_ACPI");
            assert_eq!(u16_at(f, FADT_OFF_IAPC_BOOT_ARCH) & 2, 0, "no 8042");

            let d = table_at(&t, t.dsdt, b"DSDT");
            assert!(d.len() > HEADER_LEN, "the DSDT has a body");

            let m = table_at(&t, t.madt, b"APIC");
            assert_eq!(u32_at(m, 36), LAPIC_ADDR);
            assert_eq!(u32_at(m, 40), MADT_PCAT_COMPAT);
            let (mut lapics, mut ioapics, mut nmis) = (Vec::new(), Vec::new(), Vec::new());
            let mut at = 44;
            while at < m.len() {
                let (kind, len) = (m[at], m[at + 1] as usize);
                assert!(len >= 2 && at + len <= m.len(), "entry at {at}");
                match kind {
                    MADT_LOCAL_APIC => {
                        assert_eq!(len, 8);
                        assert_eq!(u32_at(m, at + 4), LAPIC_ENABLED);
                        lapics.push((m[at + 2], m[at + 3]));
                    }
                    MADT_IO_APIC => {
                        assert_eq!(len, 12);
                        ioapics.push((m[at + 2], u32_at(m, at + 4), u32_at(m, at + 8)));
                    }
                    MADT_LOCAL_APIC_NMI => {
                        assert_eq!(len, 6);
                        nmis.push((m[at + 2], m[at + 5]));
                    }
                    other => panic!("unexpected MADT entry type {other}"),
                }
                at += len;
            }
            assert_eq!(at, m.len(), "entries fill the MADT exactly");
            let want: Vec<(u8, u8)> = (0..vcpus).map(|i| (i as u8, i as u8)).collect();
            assert_eq!(lapics, want, "one enabled local APIC per vCPU");
            assert_eq!(ioapics, vec![(vcpus as u8, IOAPIC_ADDR, 0)]);
            assert_eq!(nmis, vec![(ALL_PROCESSORS, 1)]);
            assert!(ACPI_START + t.bytes.len() as u64 <= ACPI_LIMIT);
        }
    }

    #[test]
    fn dsdt_aml_describes_com1() {
        let aml = dsdt_aml(&[]).unwrap();
        // Scope (\_SB_) with a one-byte PkgLength covering the rest.
        assert_eq!(aml[0], 0x10);
        assert_eq!(aml[1] as usize, aml.len() - 1);
        assert_eq!(&aml[2..7], b"\\_SB_");
        // Device (COM1).
        assert_eq!(&aml[7..9], &[0x5b, 0x82]);
        assert_eq!(aml[9] as usize, aml.len() - 9);
        assert_eq!(&aml[10..14], b"COM1");
        // Name (_HID, EisaId ("PNP0501")) = 0x0105D041.
        assert_eq!(
            &aml[14..24],
            &[0x08, b'_', b'H', b'I', b'D', 0x0c, 0x41, 0xd0, 0x05, 0x01]
        );
        let crs = [
            0x47, 0x01, 0xf8, 0x03, 0xf8, 0x03, 0x00, 0x08, // IO 0x3F8, 8 ports
            0x22, 0x10, 0x00, // IRQ 4
            0x79, 0x00,
        ];
        assert!(aml.windows(crs.len()).any(|w| w == crs));
        assert_eq!(aml::eisa_id(b"PNP0A03"), vec![0x0c, 0x41, 0xd0, 0x0a, 0x03]);
    }

    #[test]
    fn dsdt_aml_describes_virtio_mmio_devices() {
        let aml = dsdt_aml(&[(0xd000_0000, 5), (0xd000_1000, 6)]).unwrap();
        // Scope (\_SB_) with a two-byte PkgLength covering the rest.
        assert_eq!(aml[0], 0x10);
        assert_eq!(
            (aml[1] & 0x0f) as usize | (aml[2] as usize) << 4,
            aml.len() - 1
        );
        for (n, base, gsi) in [
            (0u8, [0x00, 0x00, 0x00, 0xd0], 5u8),
            (1, [0x00, 0x10, 0x00, 0xd0], 6),
        ] {
            let name = [b'V', b'R', b'0', b'0' + n];
            assert!(aml.windows(4).any(|w| w == name), "VR0{n}");
            let mut crs = vec![0x86, 0x09, 0x00, 0x01];
            crs.extend(base);
            crs.extend([0x00, 0x10, 0x00, 0x00]); // 4 KiB
            crs.extend([0x89, 0x06, 0x00, 0x03, 0x01, gsi, 0, 0, 0]); // edge, active high
            crs.extend([0x79, 0x00]);
            assert!(aml.windows(crs.len()).any(|w| w == crs), "VR0{n} _CRS");
        }
        let hid = [
            0x08, b'_', b'H', b'I', b'D', 0x0d, b'L', b'N', b'R', b'O', b'0', b'0', b'0', b'5', 0,
        ];
        assert_eq!(aml.windows(hid.len()).filter(|w| *w == hid).count(), 2);
    }

    #[test]
    fn pkg_length_encodings() {
        assert_eq!(aml::pkg_length(0), vec![1]);
        assert_eq!(aml::pkg_length(62), vec![63]);
        // 63 + 2 = 65 = 0x41.
        assert_eq!(aml::pkg_length(63), vec![0x41, 0x04]);
        assert_eq!(aml::pkg_length(4093), vec![0x4f, 0xff]);
        assert_eq!(aml::pkg_length(4094), vec![0x81, 0x00, 0x01]);
    }

    #[test]
    fn writes_into_guest_memory_and_refuses_bad_shapes() {
        let ram = GuestRam::new(64 << 20).unwrap();
        let rsdp = write(&ram, 2, &[]).unwrap();
        assert_eq!(rsdp, ACPI_START);
        let sig: [u8; 8] = ram.mem().read_obj(GuestAddress(rsdp)).unwrap();
        assert_eq!(&sig, b"RSD PTR ");
        assert!(build(0, ACPI_START, &[]).is_err());
        assert!(build(255, ACPI_START, &[]).is_err());
        assert!(build(1, ACPI_START + 8, &[]).is_err());
        assert!(build(1, ACPI_START, &[(0x1_0000_0000, 5)]).is_err());
    }
}
