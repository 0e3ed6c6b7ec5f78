//! virtio-blk driver (one synchronous request at a time) and the block
//! workload: sector 0 is a header (magic, generation G, N), sectors 1..=N
//! hold `pattern_word(sector, G, i)` for i in 0..64.

use crate::virtio::{Dma, Mmio, Queue, Ring, F_NEXT, F_WRITE};
use crate::serial::Line;
use crate::time::now_ns;
use crate::{pattern_word, DISK_MAGIC};
use core::ptr::{addr_of_mut, read_volatile, write_volatile};

/// Sectors per request (4 KiB): every request costs a VM exit.
const BATCH: u64 = 8;
const TIMEOUT_NS: u64 = 5_000_000_000;
const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const F_FLUSH: u32 = 1 << 9;

/// Request buffers: data (BATCH sectors of 64 words), header, status.
#[repr(C, align(4096))]
struct Buf {
    data: [u64; BATCH as usize * 64],
    hdr: [u32; 4],
    status: u8,
}

static RING: Dma<Ring> = Dma::new(Ring::new());
static BUF: Dma<Buf> = Dma::new(Buf { data: [0; BATCH as usize * 64], hdr: [0; 4], status: 0 });

pub struct Blk {
    q: Queue,
    flush: bool,
    /// A request timed out: the device may still own the buffers.
    broken: bool,
}

/// Word `w` of the data buffer.
fn word(w: usize) -> *mut u64 {
    assert!(w < BATCH as usize * 64);
    // SAFETY: only the address is computed, inside the buffer (checked).
    unsafe { addr_of_mut!((*BUF.ptr()).data[w]) }
}

impl Blk {
    /// Capacity in 512-byte sectors (config offset 0, u64).
    pub fn capacity(m: Mmio) -> u64 {
        m.config(|m| m.config32(0) as u64 | (m.config32(4) as u64) << 32)
    }

    pub fn init(m: Mmio) -> Result<Blk, &'static str> {
        let features = m.negotiate(F_FLUSH)?;
        let q = m.setup_queue(0, RING.ptr())?;
        m.driver_ok();
        Ok(Blk { q, flush: features & F_FLUSH != 0, broken: false })
    }

    /// One request: header, the first `len` bytes of the data buffer (none
    /// for FLUSH), status.  Waits for the device (bounded).
    fn request(&mut self, ty: u32, sector: u64, len: usize) -> Result<(), &'static str> {
        if self.broken {
            return Err("broken");
        }
        let b = BUF.ptr();
        // SAFETY: BUF is ours between requests (one in flight at a time);
        // only addresses are taken besides the plain header/status writes.
        let (hdr, data, status) = unsafe {
            write_volatile(addr_of_mut!((*b).hdr), [ty, 0, sector as u32, (sector >> 32) as u32]);
            write_volatile(addr_of_mut!((*b).status), 0xff);
            (addr_of_mut!((*b).hdr) as u64, addr_of_mut!((*b).data) as u64, addr_of_mut!((*b).status))
        };
        // Chain: header (device reads) -> data (device writes for IN) -> status (device writes).
        self.q.set_desc(0, hdr, 16, F_NEXT);
        let mut last = 0;
        if len > 0 {
            last = 1;
            self.q.set_desc(1, data, len as u32, F_NEXT | if ty == T_IN { F_WRITE } else { 0 });
        }
        self.q.set_desc(last + 1, status as u64, 1, F_WRITE);
        self.q.push(0);
        self.q.kick();
        if self.q.wait(TIMEOUT_NS).is_none() {
            self.broken = true;
            return Err("timeout");
        }
        // SAFETY: the device is done with the chain (it is in the used ring).
        match unsafe { read_volatile(status) } {
            0 => Ok(()),
            1 => Err("ioerr"),
            2 => Err("unsupp"),
            _ => Err("no-status"),
        }
    }

    fn flush(&mut self) -> Result<(), &'static str> {
        if self.flush {
            self.request(T_FLUSH, 0, 0)
        } else {
            Ok(())
        }
    }
}

/// The block workload: N numbered sectors of generation `gen`.
pub struct BlkWork {
    dev: Blk,
    n: u64,
    gen: u64,
    /// Background I/O errors and mismatches (the ` blkerr=` heartbeat suffix).
    pub errs: u64,
    seq: u64,
}

/// Puts sectors first.. (count <= BATCH) of generation `gen` in the data buffer.
fn fill(first: u64, count: u64, gen: u64) {
    for k in 0..count {
        for i in 0..64 {
            // SAFETY: a word of the data buffer, ours between requests.
            unsafe { write_volatile(word((k * 64 + i) as usize), pattern_word(first + k, gen, i)) };
        }
    }
}

/// How many of sectors first.. in the data buffer differ from generation `gen`.
fn check(first: u64, count: u64, gen: u64) -> u64 {
    let mut bad = 0;
    for k in 0..count {
        // SAFETY: words of the data buffer, ours between requests.
        bad += (0..64).any(|i| unsafe { read_volatile(word((k * 64 + i) as usize)) } != pattern_word(first + k, gen, i))
            as u64;
    }
    bad
}

impl BlkWork {
    /// The boot check: adopts a disk this workload wrote with the same N
    /// (`BLK found`), else writes generation 1 (`BLK init`); verifies either way.
    pub fn start(dev: Blk, capacity: u64, n: u64) -> Option<BlkWork> {
        if n >= capacity {
            Line::new().s("BLK error=disk-too-small capacity=").u(capacity).s(" n=").u(n).send();
            return None;
        }
        let mut w = BlkWork { dev, n, gen: 1, errs: 0, seq: 0 };
        let found = match w.read_header() {
            Ok((DISK_MAGIC, gen, hn)) if hn == n => {
                w.gen = gen;
                true
            }
            _ => false,
        };
        let err = if found { Ok(()) } else { w.write_all() };
        let (ok, bad) = w.verify_all();
        let mut l = Line::new();
        l.s(if found { "BLK found gen=" } else { "BLK init gen=" }).u(w.gen);
        l.s(" n=").u(n).s(" ok=").u(ok).s(" bad=").u(bad);
        if let Err(e) = err {
            l.s(" error=").s(e);
        }
        l.send();
        Some(w)
    }

    /// (magic, generation, N) from sector 0.
    fn read_header(&mut self) -> Result<(u64, u64, u64), &'static str> {
        self.dev.request(T_IN, 0, 512)?;
        // SAFETY: words of the data buffer, ours between requests.
        Ok(unsafe { (read_volatile(word(0)), read_volatile(word(1)), read_volatile(word(2))) })
    }

    /// Writes every data sector with the current generation, then the header, then flushes.
    fn write_all(&mut self) -> Result<(), &'static str> {
        let mut s = 1;
        while s <= self.n {
            let k = BATCH.min(self.n + 1 - s);
            fill(s, k, self.gen);
            self.dev.request(T_OUT, s, k as usize * 512)?;
            s += k;
        }
        for (i, v) in [DISK_MAGIC, self.gen, self.n].into_iter().chain([0; 61]).enumerate() {
            // SAFETY: a word of the data buffer, ours between requests.
            unsafe { write_volatile(word(i), v) };
        }
        self.dev.request(T_OUT, 0, 512)?;
        self.dev.flush()
    }

    /// Reads back every data sector and the header: (data sectors ok, bad
    /// sectors incl. the header and I/O errors).
    fn verify_all(&mut self) -> (u64, u64) {
        let (mut ok, mut bad) = (0, 0);
        let mut s = 1;
        while s <= self.n {
            let k = BATCH.min(self.n + 1 - s);
            let b = match self.dev.request(T_IN, s, k as usize * 512) {
                Ok(()) => check(s, k, self.gen),
                Err(_) => k,
            };
            ok += k - b;
            bad += b;
            s += k;
        }
        if self.read_header() != Ok((DISK_MAGIC, self.gen, self.n)) {
            bad += 1;
        }
        (ok, bad)
    }

    /// Serial `w`: the next generation everywhere.
    pub fn cmd_write(&mut self) {
        let t0 = now_ns(0);
        self.gen += 1;
        let r = self.write_all();
        let mut l = Line::new();
        l.s("BLK wrote gen=").u(self.gen).s(" n=").u(self.n);
        l.s(" ms=").u((now_ns(0) - t0) / 1_000_000);
        if let Err(e) = r {
            l.s(" error=").s(e);
        }
        l.send();
    }

    /// Serial `v`: verify everything against the current generation.
    pub fn cmd_verify(&mut self) {
        let t0 = now_ns(0);
        let (ok, bad) = self.verify_all();
        Line::new()
            .s("BLK verify gen=")
            .u(self.gen)
            .s(" n=")
            .u(self.n)
            .s(" ok=")
            .u(ok)
            .s(" bad=")
            .u(bad)
            .s(" ms=")
            .u((now_ns(0) - t0) / 1_000_000)
            .send();
    }

    /// Once per heartbeat: rewrite one data sector with the bytes it already
    /// holds and read it back.
    pub fn background(&mut self) {
        let s = self.seq % self.n + 1;
        self.seq += 1;
        fill(s, 1, self.gen);
        if self.dev.request(T_OUT, s, 512).is_err() {
            self.errs += 1;
            return;
        }
        for i in 0..64 {
            // SAFETY: a word of the data buffer, ours between requests.
            unsafe { write_volatile(word(i), 0) };
        }
        if self.dev.request(T_IN, s, 512).is_err() || check(s, 1, self.gen) != 0 {
            self.errs += 1;
        }
    }
}
