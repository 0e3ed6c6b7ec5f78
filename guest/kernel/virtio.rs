//! Polled virtio-mmio (version 2, "modern") transport and split virtqueues.
//!
//! All of it runs in ring 3 on cpu 0: the device registers and our rings are
//! reached through the identity map (virtual == guest-physical), so the
//! address of a static is what the device is given.  Drivers poll the used
//! rings; a driver that wants to be woken (net) routes its device's interrupt
//! to cpu 0 with `Mmio::route_interrupt`, whose handler only ends cpu 0's
//! idle `hlt` so that the poll runs at once.

use core::cell::UnsafeCell;
use core::ptr::{addr_of, addr_of_mut, read_volatile, write_volatile};
use core::sync::atomic::{fence, Ordering::SeqCst};

/// Entries of every queue we set up (a power of two).
pub const QSIZE: usize = 16;

// Register offsets (virtio 1.x, 4.2.2).
const MAGIC: u64 = 0x000;
const VERSION: u64 = 0x004;
const DEVICE_ID: u64 = 0x008;
const DEVICE_FEATURES: u64 = 0x010;
const DEVICE_FEATURES_SEL: u64 = 0x014;
const DRIVER_FEATURES: u64 = 0x020;
const DRIVER_FEATURES_SEL: u64 = 0x024;
const QUEUE_SEL: u64 = 0x030;
const QUEUE_NUM_MAX: u64 = 0x034;
const QUEUE_NUM: u64 = 0x038;
const QUEUE_READY: u64 = 0x044;
const QUEUE_NOTIFY: u64 = 0x050;
const INTERRUPT_ACK: u64 = 0x064;
const STATUS: u64 = 0x070;
const QUEUE_DESC: u64 = 0x080;
const QUEUE_DRIVER: u64 = 0x090;
const QUEUE_DEVICE: u64 = 0x0a0;
const CONFIG_GENERATION: u64 = 0x0fc;
const CONFIG: u64 = 0x100;

/// InterruptStatus / InterruptACK bit: the device used buffers.
const INT_USED_BUFFER: u32 = 1;

/// GSI of slot 0's interrupt; slot `i` raises `VIRTIO_GSI_BASE + i` (the VMM's
/// `virtio::GSI_BASE`, and the interrupt its DSDT gives Linux for each device).
/// Below 24, KVM's default routing sends GSI n to IOAPIC pin n.
const VIRTIO_GSI_BASE: u64 = 5;
/// KVM's in-kernel IOAPIC: IOREGSEL at +0, IOWIN at +0x10.
const IOAPIC: u64 = 0xfec0_0000;
const IOAPIC_PINS: u64 = 24;
/// The local APIC's ID register (ID in bits 24-31).
const LAPIC_ID: u64 = 0xfee0_0020;

fn ioapic_write(reg: u32, v: u32) {
    // SAFETY: IOAPIC registers, identity-mapped and user-accessible; MMIO has
    // no effect on memory Rust owns.  Only cpu 0, once per device, uses them.
    unsafe {
        write_volatile(IOAPIC as *mut u32, reg);
        write_volatile((IOAPIC + 0x10) as *mut u32, v);
    }
}

// Device status bits.
const ACKNOWLEDGE: u32 = 1;
const DRIVER: u32 = 2;
const DRIVER_OK: u32 = 4;
const FEATURES_OK: u32 = 8;
const FAILED: u32 = 128;

/// Descriptor flags.
pub const F_NEXT: u16 = 1;
/// The device writes this buffer.
pub const F_WRITE: u16 = 2;

/// Guest memory the device reads and writes (DMA): a static we only touch
/// through raw pointers, from cpu 0.
#[repr(transparent)]
pub struct Dma<T>(UnsafeCell<T>);

// SAFETY: only cpu 0 touches device memory (drivers live in cpu 0's
// `Devices`); the device's accesses are ordered by our fences.
unsafe impl<T> Sync for Dma<T> {}

impl<T> Dma<T> {
    pub const fn new(v: T) -> Dma<T> {
        Dma(UnsafeCell::new(v))
    }
    pub fn ptr(&self) -> *mut T {
        self.0.get()
    }
}

/// One virtio-mmio register window.
#[derive(Clone, Copy)]
pub struct Mmio(u64);

impl Mmio {
    pub fn slot(i: u64) -> Mmio {
        Mmio(crate::VIRTIO_MMIO_BASE + i * crate::VIRTIO_MMIO_STRIDE)
    }

    pub fn read(self, off: u64) -> u32 {
        // SAFETY: an aligned register of a virtio-mmio window, identity-mapped
        // and user-accessible; MMIO has no effect on memory Rust owns.
        unsafe { read_volatile((self.0 + off) as *const u32) }
    }

    pub fn write(self, off: u64, v: u32) {
        // SAFETY: as for `read`.
        unsafe { write_volatile((self.0 + off) as *mut u32, v) }
    }

    /// Byte `off` of the device-specific configuration space.
    pub fn config8(self, off: u64) -> u8 {
        // SAFETY: as for `read`; the config space may be read bytewise.
        unsafe { read_volatile((self.0 + CONFIG + off) as *const u8) }
    }

    /// Little-endian u32 at `off` (4-aligned) of the configuration space.
    pub fn config32(self, off: u64) -> u32 {
        self.read(CONFIG + off)
    }

    /// Reads the configuration with `f` until ConfigGeneration is stable.
    pub fn config<R>(self, f: impl Fn(Mmio) -> R) -> R {
        loop {
            let g = self.read(CONFIG_GENERATION);
            let r = f(self);
            if self.read(CONFIG_GENERATION) == g {
                return r;
            }
        }
    }

    /// The device id in this slot (0: none there), or why we cannot drive it.
    pub fn probe(self) -> Result<u32, &'static str> {
        if self.read(MAGIC) != 0x7472_6976 {
            return Ok(0); // absent: unbacked MMIO reads as 0 or all ones
        }
        if self.read(VERSION) != 2 {
            return Err("not-virtio-mmio-version-2");
        }
        Ok(self.read(DEVICE_ID))
    }

    /// Resets the device and negotiates VIRTIO_F_VERSION_1 plus those of
    /// `wanted` (feature bits 0-31) it offers; returns the accepted bits 0-31.
    pub fn negotiate(self, wanted: u32) -> Result<u32, &'static str> {
        self.write(STATUS, 0);
        self.write(STATUS, ACKNOWLEDGE);
        self.write(STATUS, ACKNOWLEDGE | DRIVER);
        self.write(DEVICE_FEATURES_SEL, 0);
        let lo = self.read(DEVICE_FEATURES) & wanted;
        self.write(DEVICE_FEATURES_SEL, 1);
        if self.read(DEVICE_FEATURES) & 1 == 0 {
            return Err(self.fail("no VERSION_1"));
        }
        self.write(DRIVER_FEATURES_SEL, 0);
        self.write(DRIVER_FEATURES, lo);
        self.write(DRIVER_FEATURES_SEL, 1);
        self.write(DRIVER_FEATURES, 1); // bit 32: VERSION_1
        self.write(STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK);
        if self.read(STATUS) & FEATURES_OK == 0 {
            return Err(self.fail("features refused"));
        }
        Ok(lo)
    }

    /// Gives the device queue `index` in `ring` (QSIZE entries).
    pub fn setup_queue(self, index: u32, ring: *mut Ring) -> Result<Queue, &'static str> {
        self.write(QUEUE_SEL, index);
        if self.read(QUEUE_READY) != 0 {
            return Err(self.fail("queue in use"));
        }
        if (self.read(QUEUE_NUM_MAX) as usize) < QSIZE {
            return Err(self.fail("queue too small"));
        }
        self.write(QUEUE_NUM, QSIZE as u32);
        // SAFETY: `ring` is a static only this queue uses; the device does
        // not touch it before QueueReady.  After the reset the device starts
        // both indexes at 0, so our copies do too (a rebooted guest's static
        // may hold old values).
        let (d, a, u) = unsafe {
            write_volatile(addr_of_mut!((*ring).avail.flags), 0);
            write_volatile(addr_of_mut!((*ring).avail.idx), 0);
            write_volatile(addr_of_mut!((*ring).used.idx), 0);
            (addr_of!((*ring).desc) as u64, addr_of!((*ring).avail) as u64, addr_of!((*ring).used) as u64)
        };
        for (reg, addr) in [(QUEUE_DESC, d), (QUEUE_DRIVER, a), (QUEUE_DEVICE, u)] {
            self.write(reg, addr as u32);
            self.write(reg + 4, (addr >> 32) as u32);
        }
        fence(SeqCst);
        self.write(QUEUE_READY, 1);
        Ok(Queue { mmio: self, index, ring, avail_idx: 0, last_used: 0 })
    }

    /// This window's slot number.
    pub fn slot_index(self) -> u64 {
        (self.0 - crate::VIRTIO_MMIO_BASE) / crate::VIRTIO_MMIO_STRIDE
    }

    /// Routes this device's interrupt (an edge on IOAPIC pin `VIRTIO_GSI_BASE
    /// + slot`, one per used-buffer notification) to `vector` on the calling
    /// cpu: edge-triggered, active high, fixed delivery, physical destination,
    /// unmasked.  Returns the pin.
    pub fn route_interrupt(self, vector: u8) -> Result<u64, &'static str> {
        let pin = VIRTIO_GSI_BASE + self.slot_index();
        if pin >= IOAPIC_PINS {
            return Err("no-ioapic-pin");
        }
        // SAFETY: the LAPIC page is identity-mapped and user-accessible; reading
        // the ID register has no side effects.
        let apic_id = unsafe { read_volatile(LAPIC_ID as *const u32) } >> 24;
        let reg = 0x10 + 2 * pin as u32;
        ioapic_write(reg + 1, apic_id << 24); // destination first, then unmask
        ioapic_write(reg, vector as u32);
        Ok(pin)
    }

    /// InterruptACK for used-buffer notifications.
    pub fn ack_used(self) {
        self.write(INTERRUPT_ACK, INT_USED_BUFFER);
    }

    pub fn driver_ok(self) {
        self.write(STATUS, self.read(STATUS) | DRIVER_OK);
    }

    /// Marks the device FAILED; returns `why` for the error line.
    pub fn fail(self, why: &'static str) -> &'static str {
        self.write(STATUS, self.read(STATUS) | FAILED);
        why
    }
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct Desc {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}

#[repr(C)]
pub struct Avail {
    flags: u16,
    idx: u16,
    ring: [u16; QSIZE],
    used_event: u16,
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct UsedElem {
    id: u32,
    len: u32,
}

#[repr(C)]
pub struct Used {
    flags: u16,
    idx: u16,
    ring: [UsedElem; QSIZE],
    avail_event: u16,
}

/// The three parts of a split virtqueue in one page: descriptor table at 0
/// (16-byte aligned), available ring at 256 (2), used ring after it (4).
#[repr(C, align(4096))]
pub struct Ring {
    desc: [Desc; QSIZE],
    avail: Avail,
    used: Used,
}

impl Ring {
    pub const fn new() -> Ring {
        Ring {
            desc: [Desc { addr: 0, len: 0, flags: 0, next: 0 }; QSIZE],
            avail: Avail { flags: 0, idx: 0, ring: [0; QSIZE], used_event: 0 },
            used: Used { flags: 0, idx: 0, ring: [UsedElem { id: 0, len: 0 }; QSIZE], avail_event: 0 },
        }
    }
}

/// The driver's side of one split virtqueue.
pub struct Queue {
    mmio: Mmio,
    index: u32,
    ring: *mut Ring,
    avail_idx: u16,
    last_used: u16,
}

impl Queue {
    /// Sets descriptor `i` (chained to `i + 1` with F_NEXT).
    pub fn set_desc(&mut self, i: usize, addr: u64, len: u32, flags: u16) {
        let d = Desc { addr, len, flags, next: (i as u16 + 1) % QSIZE as u16 };
        // SAFETY: i < QSIZE (index panics otherwise); the ring is ours.
        unsafe { write_volatile(addr_of_mut!((*self.ring).desc[i]), d) }
    }

    /// Makes the chain starting at descriptor `head` available (no notify).
    pub fn push(&mut self, head: u16) {
        let slot = self.avail_idx as usize % QSIZE;
        self.avail_idx = self.avail_idx.wrapping_add(1);
        // SAFETY: the ring is ours; fences order the descriptor and ring
        // entry before the index the device reads them by.
        unsafe {
            fence(SeqCst);
            write_volatile(addr_of_mut!((*self.ring).avail.ring[slot]), head);
            fence(SeqCst);
            write_volatile(addr_of_mut!((*self.ring).avail.idx), self.avail_idx);
        }
    }

    /// QueueNotify: the device processes what was pushed (a VM exit).
    pub fn kick(&self) {
        fence(SeqCst);
        self.mmio.write(QUEUE_NOTIFY, self.index);
    }

    /// True when the device has used chains we have not popped.
    pub fn pending(&self) -> bool {
        // SAFETY: the ring is ours; the device writes used.idx (volatile read).
        unsafe { read_volatile(addr_of!((*self.ring).used.idx)) != self.last_used }
    }

    /// The next used chain: (head descriptor, bytes the device wrote).
    pub fn pop(&mut self) -> Option<(usize, u32)> {
        // SAFETY: the ring is ours; the device writes the used ring, hence
        // volatile reads, the element only after the index (fence).
        unsafe {
            if read_volatile(addr_of!((*self.ring).used.idx)) == self.last_used {
                return None;
            }
            fence(SeqCst);
            let e = read_volatile(addr_of!((*self.ring).used.ring[self.last_used as usize % QSIZE]));
            self.last_used = self.last_used.wrapping_add(1);
            Some((e.id as usize % QSIZE, e.len))
        }
    }

    /// Waits (bounded, by guest time) for the next used chain.
    pub fn wait(&mut self, timeout_ns: u64) -> Option<(usize, u32)> {
        let deadline = crate::time::now_ns(0) + timeout_ns;
        loop {
            if let Some(u) = self.pop() {
                return Some(u);
            }
            if crate::time::now_ns(0) > deadline {
                return None;
            }
            core::hint::spin_loop();
        }
    }
}
