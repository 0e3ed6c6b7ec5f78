//! Port I/O and COM1: `outb`/`inb` from ring 3 (IOPL 3) and a line assembled on the stack.

use core::arch::asm;

use crate::COM1;

pub(crate) fn outb(port: u16, v: u8) {
    // SAFETY: ring 3 with IOPL 3; port I/O has no memory effects.
    unsafe { asm!("out dx, al", in("dx") port, in("al") v, options(nomem, nostack)) }
}

pub(crate) fn inb(port: u16) -> u8 {
    let v: u8;
    // SAFETY: as for outb.
    unsafe { asm!("in al, dx", out("al") v, in("dx") port, options(nomem, nostack)) }
    v
}

/// Writes a buffer to COM1, one `out` per byte (`rep outsb` from ring 3
/// raises #GP on the development host's KVM).
pub(crate) fn serial_write(bytes: &[u8]) {
    for &b in bytes {
        outb(COM1, b);
    }
}

/// A line being assembled on the stack.
pub(crate) struct Line {
    pub(crate) buf: [u8; 256],
    pub(crate) len: usize,
}

impl Line {
    pub(crate) fn new() -> Line {
        Line { buf: [0; 256], len: 0 }
    }
    pub(crate) fn s(&mut self, s: &str) -> &mut Line {
        for &b in s.as_bytes() {
            if self.len < self.buf.len() {
                self.buf[self.len] = b;
                self.len += 1;
            }
        }
        self
    }
    pub(crate) fn u(&mut self, mut v: u64) -> &mut Line {
        let mut tmp = [0u8; 20];
        let mut n = 0;
        loop {
            tmp[n] = b'0' + (v % 10) as u8;
            n += 1;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        while n > 0 {
            n -= 1;
            if self.len < self.buf.len() {
                self.buf[self.len] = tmp[n];
                self.len += 1;
            }
        }
        self
    }
    pub(crate) fn x(&mut self, v: u64, digits: u32) -> &mut Line {
        for i in (0..digits).rev() {
            let d = ((v >> (i * 4)) & 15) as u8;
            let c = if d < 10 { b'0' + d } else { b'a' + d - 10 };
            if self.len < self.buf.len() {
                self.buf[self.len] = c;
                self.len += 1;
            }
        }
        self
    }
    pub(crate) fn send(&mut self) {
        self.s("\n");
        serial_write(&self.buf[..self.len]);
        self.len = 0;
    }
}
