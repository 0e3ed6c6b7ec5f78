//! Split virtqueues (virtio 1.x, no indirect descriptors, no event index) read and written in
//! guest RAM through [`GuestRam`], so every device write is recorded for dirty tracking.
//! A queue's whole state is a few numbers ([`Queue`]): it migrates as part of the device.

use serde::{Deserialize, Serialize};

use crate::memory::GuestRam;

/// Descriptor flag: the chain continues at `next`.
const F_NEXT: u16 = 1;
/// Descriptor flag: the device writes this buffer.
const F_WRITE: u16 = 2;
/// Descriptor flag: indirect table (never negotiated, refused).
const F_INDIRECT: u16 = 4;

/// One guest buffer of a chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Desc {
    /// Guest-physical address.
    pub addr: u64,
    /// Bytes.
    pub len: u32,
    /// The device writes it (else reads it).
    pub write: bool,
}

/// A descriptor chain taken from the available ring.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chain {
    /// Head index (returned in the used ring).
    pub head: u16,
    /// The buffers, in order.
    pub descs: Vec<Desc>,
}

/// A queue the driver set up wrongly: the device stops using it (the driver must reset).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("virtqueue: {0}")]
pub struct QueueError(pub String);

/// A split virtqueue's state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Queue {
    /// Entries (power of two, 0 = not set).
    pub size: u16,
    /// QueueReady.
    pub ready: bool,
    /// Descriptor table.
    pub desc: u64,
    /// Available (driver) ring.
    pub avail: u64,
    /// Used (device) ring.
    pub used: u64,
    /// Next available-ring slot the device reads.
    pub next_avail: u16,
    /// Next used-ring slot the device writes.
    pub next_used: u16,
}

/// `base + off` for a ring or table address the driver chose: an address past 2^64 is a
/// driver error (not a wrap in release and a panic in debug builds).
fn at(base: u64, off: u64, what: &str) -> Result<u64, QueueError> {
    base.checked_add(off).ok_or_else(|| {
        QueueError(format!(
            "{what} at {base:#x} + {off:#x} is past the address space"
        ))
    })
}

fn u16_at(ram: &GuestRam, gpa: u64) -> Result<u16, QueueError> {
    let mut b = [0u8; 2];
    ram.read_into(gpa, &mut b)
        .map_err(|e| QueueError(e.to_string()))?;
    Ok(u16::from_le_bytes(b))
}

impl Queue {
    /// Usable: ready with a valid size.
    pub fn usable(&self) -> bool {
        self.ready && self.size.is_power_of_two()
    }

    /// Back to the reset state.
    pub fn reset(&mut self) {
        *self = Queue::default();
    }

    /// Buffers the driver made available and the device has not taken.
    pub fn pending(&self, ram: &GuestRam) -> Result<u16, QueueError> {
        let idx = u16_at(ram, at(self.avail, 2, "available ring")?)?;
        Ok(idx.wrapping_sub(self.next_avail))
    }

    /// Takes the next available chain, if any.
    pub fn pop(&mut self, ram: &GuestRam) -> Result<Option<Chain>, QueueError> {
        if !self.usable() {
            return Ok(None);
        }
        let idx = u16_at(ram, at(self.avail, 2, "available ring")?)?;
        let pending = idx.wrapping_sub(self.next_avail);
        if pending == 0 {
            return Ok(None);
        }
        if pending > self.size {
            return Err(QueueError(format!(
                "available index {idx} is {pending} ahead of the device (queue of {})",
                self.size
            )));
        }
        // The ring entry is read after the index (the driver publishes the index last).
        std::sync::atomic::fence(std::sync::atomic::Ordering::Acquire);
        let slot = u64::from(self.next_avail % self.size);
        let head = u16_at(ram, at(self.avail, 4 + 2 * slot, "available ring")?)?;
        self.next_avail = self.next_avail.wrapping_add(1);
        let mut descs = Vec::new();
        let mut i = head;
        loop {
            if i >= self.size {
                return Err(QueueError(format!(
                    "descriptor {i} outside a queue of {}",
                    self.size
                )));
            }
            if descs.len() >= usize::from(self.size) {
                return Err(QueueError(format!("descriptor chain from {head} loops")));
            }
            let mut d = [0u8; 16];
            ram.read_into(
                at(self.desc, 16 * u64::from(i), "descriptor table")?,
                &mut d,
            )
            .map_err(|e| QueueError(e.to_string()))?;
            let addr = u64::from_le_bytes(d[0..8].try_into().unwrap_or_default());
            let len = u32::from_le_bytes(d[8..12].try_into().unwrap_or_default());
            let flags = u16::from_le_bytes([d[12], d[13]]);
            let next = u16::from_le_bytes([d[14], d[15]]);
            if flags & F_INDIRECT != 0 {
                return Err(QueueError("indirect descriptor (not negotiated)".into()));
            }
            descs.push(Desc {
                addr,
                len,
                write: flags & F_WRITE != 0,
            });
            if flags & F_NEXT == 0 {
                break;
            }
            i = next;
        }
        Ok(Some(Chain { head, descs }))
    }

    /// Returns chain `head` to the driver with `len` bytes written.
    pub fn push_used(&mut self, ram: &GuestRam, head: u16, len: u32) -> Result<(), QueueError> {
        let slot = u64::from(self.next_used % self.size.max(1));
        let mut e = [0u8; 8];
        e[0..4].copy_from_slice(&u32::from(head).to_le_bytes());
        e[4..8].copy_from_slice(&len.to_le_bytes());
        ram.write_bytes(at(self.used, 4 + 8 * slot, "used ring")?, &e)
            .map_err(|e| QueueError(e.to_string()))?;
        self.next_used = self.next_used.wrapping_add(1);
        // The element is visible before the index that publishes it.
        std::sync::atomic::fence(std::sync::atomic::Ordering::Release);
        ram.write_bytes(
            at(self.used, 2, "used ring")?,
            &self.next_used.to_le_bytes(),
        )
        .map_err(|e| QueueError(e.to_string()))
    }
}

/// Reads the device-readable buffers of a chain, in order, into one vector (at most `max`).
pub fn gather(ram: &GuestRam, descs: &[Desc], max: usize) -> Result<Vec<u8>, QueueError> {
    let mut out = Vec::new();
    for d in descs.iter().filter(|d| !d.write) {
        let n = d.len as usize;
        if out.len() + n > max {
            return Err(QueueError(format!("request of more than {max} bytes")));
        }
        let at = out.len();
        out.resize(at + n, 0);
        ram.read_into(d.addr, &mut out[at..])
            .map_err(|e| QueueError(e.to_string()))?;
    }
    Ok(out)
}

/// Writes `data` across the device-writable buffers of a chain; returns bytes written.
pub fn scatter(ram: &GuestRam, descs: &[Desc], mut data: &[u8]) -> Result<u32, QueueError> {
    let mut written = 0u32;
    for d in descs.iter().filter(|d| d.write) {
        if data.is_empty() {
            break;
        }
        let n = data.len().min(d.len as usize);
        ram.write_bytes(d.addr, &data[..n])
            .map_err(|e| QueueError(e.to_string()))?;
        written += n as u32;
        data = &data[n..];
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(ram: &GuestRam, gpa: u64, b: &[u8]) {
        ram.write_bytes(gpa, b).unwrap();
    }

    fn desc(ram: &GuestRam, table: u64, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let mut d = Vec::new();
        d.extend_from_slice(&addr.to_le_bytes());
        d.extend_from_slice(&len.to_le_bytes());
        d.extend_from_slice(&flags.to_le_bytes());
        d.extend_from_slice(&next.to_le_bytes());
        put(ram, table + 16 * u64::from(i), &d);
    }

    /// Ring addresses a driver set near 2^64: an error naming the ring, in debug builds (which
    /// used to panic on the overflow) as in release (which wrapped).
    #[test]
    fn ring_addresses_past_the_address_space_are_errors() {
        let ram = GuestRam::new(4 << 20).unwrap();
        for (desc, avail, used) in [
            (0x1000, u64::MAX - 1, 0x3000),
            (0x1000, u64::MAX - 3, 0x3000),
            (u64::MAX - 20, 0x2000, 0x3000),
            (0x1000, 0x2000, u64::MAX - 1),
        ] {
            let mut q = Queue {
                size: 8,
                ready: true,
                desc,
                avail,
                used,
                ..Default::default()
            };
            if avail == 0x2000 {
                put(&ram, 0x2000 + 2, &1u16.to_le_bytes());
                put(&ram, 0x2000 + 4, &1u16.to_le_bytes());
            }
            let popped = q.pop(&ram);
            let pushed = q.push_used(&ram, 0, 1);
            assert!(
                popped.is_err() || pushed.is_err(),
                "{desc:#x} {avail:#x} {used:#x}"
            );
            for e in [popped.err(), pushed.err()].into_iter().flatten() {
                assert!(
                    e.0.contains("past the address space")
                        || e.0.contains("not (all) in guest RAM"),
                    "{}",
                    e.0
                );
            }
        }
    }

    #[test]
    fn pop_chain_and_push_used() {
        let ram = GuestRam::new(32 << 20).unwrap();
        let mut q = Queue {
            size: 8,
            ready: true,
            desc: 0x1000,
            avail: 0x2000,
            used: 0x3000,
            ..Default::default()
        };
        desc(&ram, 0x1000, 0, 0x10000, 16, F_NEXT, 3);
        desc(&ram, 0x1000, 3, 0x11000, 512, F_WRITE | F_NEXT, 5);
        desc(&ram, 0x1000, 5, 0x12000, 1, F_WRITE, 0);
        put(&ram, 0x2000 + 4, &0u16.to_le_bytes());
        assert_eq!(q.pop(&ram).unwrap(), None);
        put(&ram, 0x2000 + 2, &1u16.to_le_bytes());
        let c = q.pop(&ram).unwrap().unwrap();
        assert_eq!(c.head, 0);
        assert_eq!(c.descs.len(), 3);
        assert!(!c.descs[0].write && c.descs[1].write && c.descs[2].write);
        assert_eq!(q.pop(&ram).unwrap(), None);
        q.push_used(&ram, c.head, 513).unwrap();
        assert_eq!(ram.read_bytes(0x3002, 2).unwrap(), 1u16.to_le_bytes());
        assert_eq!(ram.read_bytes(0x3008, 4).unwrap(), 513u32.to_le_bytes());
        // The device's writes are recorded for dirty tracking.
        let dirty = ram.take_vmm_dirty();
        assert_ne!(dirty[0] & (1 << 3), 0);
    }

    #[test]
    fn looping_and_out_of_range_chains_are_refused() {
        let ram = GuestRam::new(32 << 20).unwrap();
        let mut q = Queue {
            size: 4,
            ready: true,
            desc: 0x1000,
            avail: 0x2000,
            used: 0x3000,
            ..Default::default()
        };
        desc(&ram, 0x1000, 0, 0x10000, 16, F_NEXT, 1);
        desc(&ram, 0x1000, 1, 0x10000, 16, F_NEXT, 0);
        put(&ram, 0x2002, &1u16.to_le_bytes());
        assert!(q.pop(&ram).unwrap_err().0.contains("loops"));
        desc(&ram, 0x1000, 2, 0x10000, 16, F_NEXT, 9);
        put(&ram, 0x2004 + 2, &2u16.to_le_bytes());
        put(&ram, 0x2002, &2u16.to_le_bytes());
        assert!(q.pop(&ram).unwrap_err().0.contains("outside"));
        put(&ram, 0x2002, &200u16.to_le_bytes());
        assert!(q.pop(&ram).unwrap_err().0.contains("ahead"));
    }
}
