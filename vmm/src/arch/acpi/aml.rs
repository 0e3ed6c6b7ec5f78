//! AML encoding of the little the DSDT needs: names, integers, EISA ids, buffers, devices,
//! scopes and the resource templates of a serial port and a virtio-mmio window.

const NAME_OP: u8 = 0x08;
const SCOPE_OP: u8 = 0x10;
const BUFFER_OP: u8 = 0x11;
const EXT_OP_PREFIX: u8 = 0x5b;
const DEVICE_OP: u8 = 0x82;
const BYTE_PREFIX: u8 = 0x0a;
const WORD_PREFIX: u8 = 0x0b;
const DWORD_PREFIX: u8 = 0x0c;
const ZERO_OP: u8 = 0x00;
const ONE_OP: u8 = 0x01;
const STRING_PREFIX: u8 = 0x0d;

/// PkgLength for a package whose contents after the PkgLength are `body` bytes (the
/// encoded length counts its own bytes).
pub fn pkg_length(body: usize) -> Vec<u8> {
    if body + 1 < 1 << 6 {
        vec![(body + 1) as u8]
    } else if body + 2 < 1 << 12 {
        let n = body + 2;
        vec![0x40 | (n & 0xf) as u8, (n >> 4) as u8]
    } else {
        let n = body + 3;
        vec![0x80 | (n & 0xf) as u8, (n >> 4) as u8, (n >> 12) as u8]
    }
}

fn package(op: &[u8], contents: &[u8]) -> Vec<u8> {
    let mut v = op.to_vec();
    v.extend(pkg_length(contents.len()));
    v.extend_from_slice(contents);
    v
}

/// An integer in its shortest encoding.
pub fn integer(v: u32) -> Vec<u8> {
    match v {
        0 => vec![ZERO_OP],
        1 => vec![ONE_OP],
        2..=0xff => vec![BYTE_PREFIX, v as u8],
        0x100..=0xffff => {
            let mut b = vec![WORD_PREFIX];
            b.extend_from_slice(&(v as u16).to_le_bytes());
            b
        }
        _ => {
            let mut b = vec![DWORD_PREFIX];
            b.extend_from_slice(&v.to_le_bytes());
            b
        }
    }
}

/// A compressed EISA id ("PNP0501") as a DWordConst.
pub fn eisa_id(id: &[u8; 7]) -> Vec<u8> {
    let c = |i: usize| u32::from(id[i].wrapping_sub(0x40) & 0x1f);
    let hex = |i: usize| char::from(id[i]).to_digit(16).unwrap_or(0);
    let v: u32 = (c(0) << 26)
        | (c(1) << 21)
        | (c(2) << 16)
        | (hex(3) << 12)
        | (hex(4) << 8)
        | (hex(5) << 4)
        | hex(6);
    // Stored big-endian: the DWord's bytes are the id's bytes in order.
    let mut b = vec![DWORD_PREFIX];
    b.extend_from_slice(&v.to_be_bytes());
    b
}

/// `Name (seg, value)`.
pub fn name(seg: &[u8; 4], value: &[u8]) -> Vec<u8> {
    let mut v = vec![NAME_OP];
    v.extend_from_slice(seg);
    v.extend_from_slice(value);
    v
}

/// `Buffer () { data }`.
pub fn buffer(data: &[u8]) -> Vec<u8> {
    let mut contents = integer(data.len() as u32);
    contents.extend_from_slice(data);
    package(&[BUFFER_OP], &contents)
}

/// `Device (seg) { body }`.
pub fn device(seg: &[u8; 4], body: &[u8]) -> Vec<u8> {
    let mut contents = seg.to_vec();
    contents.extend_from_slice(body);
    package(&[EXT_OP_PREFIX, DEVICE_OP], &contents)
}

/// `Scope (path) { body }` (`path` an encoded NameString, e.g. `\_SB_`).
pub fn scope(path: &[u8], body: &[u8]) -> Vec<u8> {
    let mut contents = path.to_vec();
    contents.extend_from_slice(body);
    package(&[SCOPE_OP], &contents)
}

/// Resource template: `IO (Decode16, base, base, 0, len)`.
pub fn io_resource(base: u16, len: u8) -> Vec<u8> {
    let mut v = vec![0x47, 0x01];
    v.extend_from_slice(&base.to_le_bytes());
    v.extend_from_slice(&base.to_le_bytes());
    v.push(0);
    v.push(len);
    v
}

/// Resource template: `IRQNoFlags () { irq }` (edge, active high).
pub fn irq_resource(irq: u8) -> Vec<u8> {
    let mask = 1u16 << (irq & 15);
    let mut v = vec![0x22];
    v.extend_from_slice(&mask.to_le_bytes());
    v
}

/// A String (`"LNRO0005"`).
pub fn string(text: &str) -> Vec<u8> {
    let mut v = vec![STRING_PREFIX];
    v.extend_from_slice(text.as_bytes());
    v.push(0);
    v
}

/// Resource template: `Memory32Fixed (ReadWrite, base, len)`.
pub fn memory32_fixed(base: u32, len: u32) -> Vec<u8> {
    let mut v = vec![0x86, 0x09, 0x00, 0x01];
    v.extend_from_slice(&base.to_le_bytes());
    v.extend_from_slice(&len.to_le_bytes());
    v
}

/// Resource template: `Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive) { gsi }`.
pub fn extended_irq(gsi: u32) -> Vec<u8> {
    let mut v = vec![0x89, 0x06, 0x00, 0x03, 0x01];
    v.extend_from_slice(&gsi.to_le_bytes());
    v
}

/// Resource template end tag (checksum 0: "treat as correct").
pub fn end_tag() -> Vec<u8> {
    vec![0x79, 0x00]
}
