//! Our test guest: the ring-3 workload (boot.s holds the ring-0 part).
//!
//! Every vCPU runs `user_main` in ring 3 with IOPL 3: it does port I/O to
//! COM1 directly, reads time from its kvmclock page (or the TSC), and idles by
//! executing `hlt`, which traps to the kernel's #GP handler and waits for the
//! next interrupt there: the 1 kHz timer's or, on cpu 0, the network device's.
//!
//! Boot parameters (PVH command line, space separated `key=value`):
//! `cpus=N` vCPUs to wait for (default 1), `fill=MIB` memory to fill with the
//! pattern (default: all RAM above 16 MiB), `rate=PAGES` page writes per
//! second over all vCPUs (default 1000), `hot=PERCENT` of the filled memory
//! the writes go to (default 100), `hb=MS` heartbeat period (default 10),
//! `blk=N` data sectors of the block workload (default 256; 0: off),
//! `ip=A.B.C.D` our IPv4 address (without it the network device answers nothing).
//!
//! Devices: polled virtio-mmio (version 2) in up to 8 slots at
//! `VIRTIO_MMIO_BASE`, all driven by cpu 0 from ring 3 (virtio.rs): one block
//! device (blk.rs) and one network device (net.rs).  The network device's
//! interrupt (vector `NET_VECTOR`, routed to cpu 0 through the IOAPIC) wakes
//! cpu 0 from its idle `hlt`, so a frame is answered at once rather than at
//! the next timer tick; it is not counted as a tick.
//!
//! Serial output (COM1), one line each:
//! `GUEST boot ...`, then per device `VIRTIO slot=I dev=blk capacity=SECTORS`
//! or `VIRTIO slot=I dev=net mac=M` (failures: `VIRTIO slot=I error=WHAT`), the
//! block workload's boot check `BLK found|init gen=G n=N ok=OK bad=BAD`
//! (`ok` counts data sectors, `bad` bad sectors incl. the header and I/O
//! errors; `BLK error=disk-too-small capacity=C n=N` when N+1 sectors do not
//! fit; BLK lines end in ` error=WHAT` after a failed request),
//! `READY fill_ms=...`, every period
//! `HB seq=S t_us=T tick=A,B,.. w=W [behind=N] simd=ok|FAIL [blkerr=E]`
//! (`blkerr`: failed background block rewrites, one per period), and on input bytes:
//! `q` stop writes + `CK <hex> pages=N`, `c` checksum only, `r` resume
//! writes (`RESUMED`), `x` power off through the i8042 (`POWEROFF`),
//! `w` next block generation (`BLK wrote gen=G n=N ms=T`), `v` verify the
//! disk (`BLK verify gen=G n=N ok=OK bad=BAD ms=T`), `n` network counters
//! (`NET rx=R tx=T arp=A icmp=I udp=U drop=D`); `w`/`v`/`n` without the
//! device print `BLK off` / `NET off`.  Every byte received is echoed as `RX <hex>`.
#![no_std]
#![no_main]

use core::arch::{asm, global_asm};
use core::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering::*};

global_asm!(include_str!("boot.s"));
include!("../src/shared.rs");

mod blk;
mod net;
mod virtio;

const MAX_CPUS: usize = 16;
const PAGE: u64 = 4096;
/// Memory below this belongs to the image, stacks and tables.
const WORK_BASE: u64 = 16 << 20;
const COM1: u16 = 0x3f8;
/// The network device's interrupt vector (boot.s `NET_VECTOR`: its IDT entry).
const NET_VECTOR: u8 = 0x21;

extern "C" {
    static start_info_ptr: u64;
    static kmode_loop_tsc: u64;
    static aps_online: AtomicU64;
    static ticks: [AtomicU64; MAX_CPUS];
    static pvclock: [[u8; 64]; MAX_CPUS];
    static kvmclock_ok: AtomicU8;
    static avx_ok: AtomicU8;
    /// Per cpu: set by the network interrupt, cleared by us before polling;
    /// while set, an idle `hlt` returns at once.
    static irq_wake: [AtomicU8; MAX_CPUS];
}

/// Workload parameters, set by cpu 0 before `GO`.
static mut PARAMS: Params = Params::DEFAULT;
static GO: AtomicBool = AtomicBool::new(false);
static WRITES_ON: AtomicBool = AtomicBool::new(true);
static QUIESCE_GEN: AtomicU64 = AtomicU64::new(0);
static SEEN_GEN: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];
static WRITES: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];
/// Writes dropped because the vCPU fell more than a period behind.
static SKIPPED: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];
static SIMD_FAIL: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];
static FILLED: AtomicU64 = AtomicU64::new(0);
/// TSC ticks per microsecond when there is no kvmclock.
static TSC_PER_US: AtomicU64 = AtomicU64::new(0);

#[derive(Clone, Copy)]
struct Range {
    start: u64,
    pages: u64,
}

#[derive(Clone, Copy)]
struct Params {
    cpus: u64,
    fill_mib: u64,
    rate: u64,
    hot_pct: u64,
    hb_ms: u64,
    ranges: [Range; 4],
    nranges: usize,
    pages: u64,
    /// Block workload sectors (u64::MAX: the default).
    blk: u64,
    ip: Option<[u8; 4]>,
}

impl Params {
    const DEFAULT: Params = Params {
        cpus: 1,
        fill_mib: u64::MAX,
        rate: 1000,
        hot_pct: 100,
        hb_ms: 10,
        ranges: [Range { start: 0, pages: 0 }; 4],
        nranges: 0,
        pages: 0,
        blk: u64::MAX,
        ip: None,
    };

    /// Guest-physical address of workload page `p`.
    fn page_addr(&self, mut p: u64) -> u64 {
        for r in &self.ranges[..self.nranges] {
            if p < r.pages {
                return r.start + p * PAGE;
            }
            p -= r.pages;
        }
        self.ranges[0].start
    }
}

fn params() -> &'static Params {
    // SAFETY: PARAMS is written by cpu 0 only before GO is released (Release);
    // every reader waits for GO (Acquire) first.
    unsafe { &*core::ptr::addr_of!(PARAMS) }
}

// ------------------------------------------------------------------ port I/O
fn outb(port: u16, v: u8) {
    // SAFETY: ring 3 with IOPL 3; port I/O has no memory effects.
    unsafe { asm!("out dx, al", in("dx") port, in("al") v, options(nomem, nostack)) }
}

fn inb(port: u16) -> u8 {
    let v: u8;
    // SAFETY: as for outb.
    unsafe { asm!("in al, dx", out("al") v, in("dx") port, options(nomem, nostack)) }
    v
}

/// Writes a buffer to COM1, one `out` per byte (`rep outsb` from ring 3
/// raises #GP on the development host's KVM).
fn serial_write(bytes: &[u8]) {
    for &b in bytes {
        outb(COM1, b);
    }
}

/// A line being assembled on the stack.
struct Line {
    buf: [u8; 256],
    len: usize,
}

impl Line {
    fn new() -> Line {
        Line { buf: [0; 256], len: 0 }
    }
    fn s(&mut self, s: &str) -> &mut Line {
        for &b in s.as_bytes() {
            if self.len < self.buf.len() {
                self.buf[self.len] = b;
                self.len += 1;
            }
        }
        self
    }
    fn u(&mut self, mut v: u64) -> &mut Line {
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
    fn x(&mut self, v: u64, digits: u32) -> &mut Line {
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
    fn send(&mut self) {
        self.s("\n");
        serial_write(&self.buf[..self.len]);
        self.len = 0;
    }

    /// `send`, answering the network between two bytes when its interrupt
    /// came: every `out` is a VM exit (~50 us on the development host), so a
    /// heartbeat line alone would keep cpu 0 from polling for milliseconds.
    fn send_serving(&mut self, cpu: usize, net: &mut Option<net::Net>) {
        self.s("\n");
        for &b in &self.buf[..self.len] {
            if let Some(n) = net {
                // SAFETY: a byte array in the kernel's data, user-accessible.
                if unsafe { irq_wake[cpu].load(Relaxed) } != 0 {
                    serve_net(cpu, n);
                }
            }
            outb(COM1, b);
        }
        self.len = 0;
    }
}

// ---------------------------------------------------------------------- time
fn rdtsc() -> u64 {
    let lo: u32;
    let hi: u32;
    // SAFETY: rdtsc has no memory effects (CR4.TSD is clear).
    unsafe { asm!("rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack)) }
    (hi as u64) << 32 | lo as u64
}

fn cpuid(leaf: u32) -> (u32, u32, u32, u32) {
    let r = core::arch::x86_64::__cpuid(leaf);
    (r.eax, r.ebx, r.ecx, r.edx)
}

/// Guest time in nanoseconds: kvmclock of this cpu, else TSC / calibration.
fn now_ns(cpu: usize) -> u64 {
    // SAFETY: reading flags written once by ring 0 before user mode started.
    if unsafe { kvmclock_ok.load(Relaxed) } == 0 {
        let per_us = TSC_PER_US.load(Relaxed).max(1);
        return rdtsc() / per_us * 1000;
    }
    // SAFETY: the pvclock area is static guest memory the hypervisor updates;
    // volatile reads under the version protocol.
    let p = unsafe { core::ptr::addr_of!(pvclock[cpu]) as *const u8 };
    loop {
        // SAFETY: offsets inside the 64-byte per-cpu pvclock record.
        unsafe {
            let v1 = core::ptr::read_volatile(p as *const u32);
            if v1 & 1 != 0 {
                continue;
            }
            core::sync::atomic::fence(Acquire);
            let tsc_ts = core::ptr::read_volatile(p.add(8) as *const u64);
            let sys = core::ptr::read_volatile(p.add(16) as *const u64);
            let mul = core::ptr::read_volatile(p.add(24) as *const u32);
            let shift = core::ptr::read_volatile(p.add(28) as *const i8);
            let tsc = rdtsc();
            core::sync::atomic::fence(Acquire);
            if core::ptr::read_volatile(p as *const u32) != v1 {
                continue;
            }
            let mut delta = tsc.wrapping_sub(tsc_ts);
            if shift >= 0 {
                delta <<= shift;
            } else {
                delta >>= -shift;
            }
            return sys.wrapping_add(((delta as u128 * mul as u128) >> 32) as u64);
        }
    }
}

/// Measures the TSC against PIT channel 2 over 10 ms (no kvmclock).
fn calibrate_tsc() {
    outb(0x61, (inb(0x61) & !0x02) | 0x01);
    outb(0x43, 0xb0);
    let count: u16 = 11932; // 10 ms at 1.193182 MHz
    outb(0x42, count as u8);
    outb(0x42, (count >> 8) as u8);
    let t0 = rdtsc();
    let mut spins = 0u64;
    while inb(0x61) & 0x20 == 0 && spins < 10_000_000 {
        spins += 1;
    }
    let per_us = (rdtsc() - t0) / 10_000;
    TSC_PER_US.store(per_us.max(1), Relaxed);
}

// ------------------------------------------------------------------ SIMD state
const SIMD_SEED: u64 = 0x5157_4d44_0000_0000;

fn avx() -> bool {
    // SAFETY: flag written once by ring 0 before user mode started.
    unsafe { avx_ok.load(Relaxed) != 0 }
}

/// Puts per-cpu values into the upper halves of ymm0-15 and a non-default
/// MXCSR.  Legacy-SSE code (all this crate is compiled to) never changes
/// either, so they must survive everything until the next check.
fn simd_seed(cpu: usize) {
    let mut vals = [0u64; 32];
    for (i, v) in vals.iter_mut().enumerate() {
        *v = SIMD_SEED ^ ((cpu as u64) << 16) ^ (i as u64 * 0x9e37_79b9);
    }
    let mxcsr: u32 = 0x7f80; // all masked, round toward zero
    // SAFETY: loads from a valid local array; only vector registers and
    // MXCSR change, which no other code here relies on.
    unsafe {
        asm!("ldmxcsr [{m}]", m = in(reg) &mxcsr, options(nostack));
        if avx() {
            asm!(
                "vinsertf128 ymm0, ymm0, [{p}], 1",
                "vinsertf128 ymm1, ymm1, [{p} + 16], 1",
                "vinsertf128 ymm2, ymm2, [{p} + 32], 1",
                "vinsertf128 ymm3, ymm3, [{p} + 48], 1",
                "vinsertf128 ymm4, ymm4, [{p} + 64], 1",
                "vinsertf128 ymm5, ymm5, [{p} + 80], 1",
                "vinsertf128 ymm6, ymm6, [{p} + 96], 1",
                "vinsertf128 ymm7, ymm7, [{p} + 112], 1",
                "vinsertf128 ymm8, ymm8, [{p} + 128], 1",
                "vinsertf128 ymm9, ymm9, [{p} + 144], 1",
                "vinsertf128 ymm10, ymm10, [{p} + 160], 1",
                "vinsertf128 ymm11, ymm11, [{p} + 176], 1",
                "vinsertf128 ymm12, ymm12, [{p} + 192], 1",
                "vinsertf128 ymm13, ymm13, [{p} + 208], 1",
                "vinsertf128 ymm14, ymm14, [{p} + 224], 1",
                "vinsertf128 ymm15, ymm15, [{p} + 240], 1",
                p = in(reg) vals.as_ptr(),
                out("xmm0") _, out("xmm1") _, out("xmm2") _, out("xmm3") _,
                out("xmm4") _, out("xmm5") _, out("xmm6") _, out("xmm7") _,
                out("xmm8") _, out("xmm9") _, out("xmm10") _, out("xmm11") _,
                out("xmm12") _, out("xmm13") _, out("xmm14") _, out("xmm15") _,
                options(nostack, readonly),
            );
        }
    }
}

/// Idles until the next interrupt with xmm0-15 holding per-cpu, per-round
/// values, and checks afterwards that they, the ymm upper halves and MXCSR
/// are intact.  Returns false on any mismatch.
fn idle_and_check(cpu: usize, round: u64) -> bool {
    let mut lo = [0u64; 32];
    for (i, v) in lo.iter_mut().enumerate() {
        *v = round.wrapping_mul(0x0100_0000_01b3) ^ ((cpu as u64) << 40) ^ i as u64;
    }
    let mut after_lo = [0u64; 32];
    let mut after_hi = [0u64; 32];
    let mut mxcsr: u32 = 0;
    // SAFETY: loads/stores within local arrays; `hlt` in ring 3 traps to the
    // kernel's #GP handler, which idles and resumes after it.
    unsafe {
        asm!(
            "movdqu xmm0, [{i}]", "movdqu xmm1, [{i} + 16]",
            "movdqu xmm2, [{i} + 32]", "movdqu xmm3, [{i} + 48]",
            "movdqu xmm4, [{i} + 64]", "movdqu xmm5, [{i} + 80]",
            "movdqu xmm6, [{i} + 96]", "movdqu xmm7, [{i} + 112]",
            "movdqu xmm8, [{i} + 128]", "movdqu xmm9, [{i} + 144]",
            "movdqu xmm10, [{i} + 160]", "movdqu xmm11, [{i} + 176]",
            "movdqu xmm12, [{i} + 192]", "movdqu xmm13, [{i} + 208]",
            "movdqu xmm14, [{i} + 224]", "movdqu xmm15, [{i} + 240]",
            "hlt",
            "movdqu [{o}], xmm0", "movdqu [{o} + 16], xmm1",
            "movdqu [{o} + 32], xmm2", "movdqu [{o} + 48], xmm3",
            "movdqu [{o} + 64], xmm4", "movdqu [{o} + 80], xmm5",
            "movdqu [{o} + 96], xmm6", "movdqu [{o} + 112], xmm7",
            "movdqu [{o} + 128], xmm8", "movdqu [{o} + 144], xmm9",
            "movdqu [{o} + 160], xmm10", "movdqu [{o} + 176], xmm11",
            "movdqu [{o} + 192], xmm12", "movdqu [{o} + 208], xmm13",
            "movdqu [{o} + 224], xmm14", "movdqu [{o} + 240], xmm15",
            "stmxcsr [{m}]",
            i = in(reg) lo.as_ptr(),
            o = in(reg) after_lo.as_mut_ptr(),
            m = in(reg) &mut mxcsr,
            out("xmm0") _, out("xmm1") _, out("xmm2") _, out("xmm3") _,
            out("xmm4") _, out("xmm5") _, out("xmm6") _, out("xmm7") _,
            out("xmm8") _, out("xmm9") _, out("xmm10") _, out("xmm11") _,
            out("xmm12") _, out("xmm13") _, out("xmm14") _, out("xmm15") _,
            options(nostack),
        );
        if avx() {
            asm!(
                "vextractf128 [{o}], ymm0, 1", "vextractf128 [{o} + 16], ymm1, 1",
                "vextractf128 [{o} + 32], ymm2, 1", "vextractf128 [{o} + 48], ymm3, 1",
                "vextractf128 [{o} + 64], ymm4, 1", "vextractf128 [{o} + 80], ymm5, 1",
                "vextractf128 [{o} + 96], ymm6, 1", "vextractf128 [{o} + 112], ymm7, 1",
                "vextractf128 [{o} + 128], ymm8, 1", "vextractf128 [{o} + 144], ymm9, 1",
                "vextractf128 [{o} + 160], ymm10, 1", "vextractf128 [{o} + 176], ymm11, 1",
                "vextractf128 [{o} + 192], ymm12, 1", "vextractf128 [{o} + 208], ymm13, 1",
                "vextractf128 [{o} + 224], ymm14, 1", "vextractf128 [{o} + 240], ymm15, 1",
                o = in(reg) after_hi.as_mut_ptr(),
                options(nostack),
            );
        }
    }
    let mut ok = after_lo == lo && mxcsr & 0xffbf == 0x7f80;
    if avx() {
        for (i, v) in after_hi.iter().enumerate() {
            ok &= *v == SIMD_SEED ^ ((cpu as u64) << 16) ^ (i as u64 * 0x9e37_79b9);
        }
    }
    ok
}

// ------------------------------------------------------------------ workload
fn xorshift(s: &mut u64) -> u64 {
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    *s
}

/// The memory checksum the host side (`vmm`) computes the same way.
fn checksum_range(ptr: *const u64, words: usize, mut h: u64) -> u64 {
    for i in 0..words {
        // SAFETY: the caller passes mapped guest RAM.
        let w = unsafe { core::ptr::read_volatile(ptr.add(i)) };
        h = (h ^ w).wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

fn checksum(p: &Params) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325;
    let filled = FILLED.load(Acquire);
    for pg in 0..filled {
        h = checksum_range(p.page_addr(pg) as *const u64, 512, h);
    }
    h
}

/// This cpu's share of pages to fill: [from, to).
fn share(p: &Params, cpu: usize) -> (u64, u64) {
    let n = p.cpus.max(1);
    let per = p.pages.div_ceil(n);
    let from = (cpu as u64 * per).min(p.pages);
    (from, (from + per).min(p.pages))
}

fn fill(p: &Params, cpu: usize) {
    let (from, to) = share(p, cpu);
    for pg in from..to {
        let a = p.page_addr(pg) as *mut u64;
        for w in 0..512u64 {
            // SAFETY: workload pages are guest RAM from the memory map,
            // identity-mapped, and outside the image.
            unsafe { core::ptr::write_volatile(a.add(w as usize), (pg << 12 | w) ^ 0xa5a5_0000_0000_0000) };
        }
    }
    FILLED.fetch_add(to - from, Release);
}

fn write_page(p: &Params, cpu: usize, rng: &mut u64, seq: u64) {
    let hot = (p.pages * p.hot_pct / 100).max(1);
    let pg = xorshift(rng) % hot;
    let a = p.page_addr(pg) as *mut u64;
    let off = (xorshift(rng) % 64) as usize * 8;
    for w in 0..8 {
        // SAFETY: as in fill.
        unsafe { core::ptr::write_volatile(a.add(off + w), seq ^ (cpu as u64) << 56 ^ w as u64) };
    }
}

// --------------------------------------------------------------- boot params
fn parse_params() -> Params {
    let mut p = Params::DEFAULT;
    // SAFETY: written once by the PVH entry code.
    let si = unsafe { start_info_ptr } as *const u8;
    if si.is_null() {
        return p;
    }
    // SAFETY: hvm_start_info layout (xen/include/public/arch-x86/hvm/start_info.h);
    // the loader placed it in RAM, identity-mapped.
    unsafe {
        let version = core::ptr::read_unaligned(si.add(4) as *const u32);
        let cmdline = core::ptr::read_unaligned(si.add(24) as *const u64) as *const u8;
        if !cmdline.is_null() {
            let mut len = 0;
            while len < 4096 && *cmdline.add(len) != 0 {
                len += 1;
            }
            parse_cmdline(core::slice::from_raw_parts(cmdline, len), &mut p);
        }
        if version >= 1 {
            let map = core::ptr::read_unaligned(si.add(40) as *const u64) as *const u8;
            let n = core::ptr::read_unaligned(si.add(48) as *const u32) as usize;
            for e in 0..n.min(128) {
                let ent = map.add(e * 24);
                let addr = core::ptr::read_unaligned(ent as *const u64);
                let size = core::ptr::read_unaligned(ent.add(8) as *const u64);
                let ty = core::ptr::read_unaligned(ent.add(16) as *const u32);
                add_ram(&mut p, ty, addr, size);
            }
        }
    }
    let want = p.fill_mib.saturating_mul(256);
    let mut left = want;
    for r in &mut p.ranges[..p.nranges] {
        r.pages = r.pages.min(left);
        left -= r.pages;
    }
    p.pages = p.ranges[..p.nranges].iter().map(|r| r.pages).sum();
    p.cpus = p.cpus.clamp(1, MAX_CPUS as u64);
    p.hb_ms = p.hb_ms.max(1);
    p.hot_pct = p.hot_pct.clamp(1, 100);
    p
}

fn add_ram(p: &mut Params, ty: u32, addr: u64, size: u64) {
    const LIMIT: u64 = 16 << 30; // the identity map's reach
    if ty != 1 || p.nranges == p.ranges.len() {
        return;
    }
    let start = addr.max(WORK_BASE).next_multiple_of(PAGE);
    let end = (addr + size).min(LIMIT) & !(PAGE - 1);
    if end > start {
        p.ranges[p.nranges] = Range { start, pages: (end - start) / PAGE };
        p.nranges += 1;
    }
}

fn parse_cmdline(s: &[u8], p: &mut Params) {
    for word in s.split(|&b| b == b' ') {
        let mut kv = word.splitn(2, |&b| b == b'=');
        let (Some(k), Some(v)) = (kv.next(), kv.next()) else { continue };
        let mut n: u64 = 0;
        for &d in v {
            if !d.is_ascii_digit() {
                break;
            }
            n = n.saturating_mul(10).saturating_add((d - b'0') as u64);
        }
        match k {
            b"cpus" => p.cpus = n,
            b"fill" => p.fill_mib = n,
            b"rate" => p.rate = n,
            b"hot" => p.hot_pct = n,
            b"hb" => p.hb_ms = n,
            b"blk" => p.blk = n,
            b"ip" => p.ip = parse_ip(v),
            _ => {}
        }
    }
}

fn parse_ip(v: &[u8]) -> Option<[u8; 4]> {
    let mut ip = [0u8; 4];
    let mut parts = v.split(|&b| b == b'.');
    for o in &mut ip {
        let d = parts.next()?;
        if d.is_empty() || d.len() > 3 || !d.iter().all(u8::is_ascii_digit) {
            return None;
        }
        *o = u8::try_from(d.iter().fold(0u32, |n, &c| n * 10 + (c - b'0') as u32)).ok()?;
    }
    parts.next().is_none().then_some(ip)
}

// ------------------------------------------------------------------ devices
/// The virtio devices cpu 0 drives (the other cpus have none).
struct Devices {
    blk: Option<blk::BlkWork>,
    net: Option<net::Net>,
}

impl Devices {
    const NONE: Devices = Devices { blk: None, net: None };

    /// Probes the virtio-mmio slots, prints a line per device, initialises
    /// the first block and network device and runs the block boot check.
    fn probe(p: &Params) -> Devices {
        let mut d = Devices::NONE;
        let mut blk_dev = None;
        let mut net_seen = false;
        for slot in 0..VIRTIO_MMIO_SLOTS {
            let m = virtio::Mmio::slot(slot);
            let mut l = Line::new();
            l.s("VIRTIO slot=").u(slot);
            let r = match m.probe() {
                Ok(0) => continue,
                Ok(2) => {
                    let cap = blk::Blk::capacity(m);
                    l.s(" dev=blk capacity=").u(cap).send();
                    match blk_dev {
                        Some(_) => Err("second-blk-device"),
                        None => blk::Blk::init(m).map(|b| blk_dev = Some((b, cap))),
                    }
                }
                Ok(1) => {
                    l.s(" dev=net mac=");
                    for (i, b) in net::Net::mac(m).iter().enumerate() {
                        l.s(if i > 0 { ":" } else { "" }).x(*b as u64, 2);
                    }
                    l.send();
                    if net_seen {
                        Err("second-net-device")
                    } else {
                        net_seen = true;
                        net::Net::init(m, p.ip).map(|n| d.net = Some(n))
                    }
                }
                Ok(_) => Err("unsupported-device"),
                Err(e) => Err(e),
            };
            if let Err(e) = r {
                Line::new().s("VIRTIO slot=").u(slot).s(" error=").s(e).send();
            }
        }
        let n = if p.blk == u64::MAX { 256 } else { p.blk };
        if let (Some((b, cap)), true) = (blk_dev, n > 0) {
            d.blk = blk::BlkWork::start(b, cap, n);
        }
        d
    }
}

// ---------------------------------------------------------------- main loops
/// Entered from ring 0 on every cpu, in ring 3.
#[no_mangle]
pub extern "C" fn user_main(cpu: u64) -> ! {
    let cpu = cpu as usize;
    simd_seed(cpu);
    if cpu == 0 {
        bsp_main()
    }
    while !GO.load(Acquire) {
        core::hint::spin_loop();
    }
    fill(params(), cpu);
    let mut none = Devices::NONE;
    worker_loop(cpu, &mut none)
}

fn bsp_main() -> ! {
    let p = parse_params();
    // SAFETY: only cpu 0 writes PARAMS, before GO.
    unsafe { PARAMS = p };
    // SAFETY: flag written by ring 0 before user mode started.
    if unsafe { kvmclock_ok.load(Relaxed) } == 0 {
        calibrate_tsc();
    }
    let t0 = now_ns(0);
    for _ in 0..200 {
        outb(0x80, 0);
    }
    let pio_ns = (now_ns(0) - t0) / 200;
    // Kernel-mode speed: 20000 instructions took kmode_loop_tsc TSC ticks.
    let t1 = now_ns(0);
    let c1 = rdtsc();
    while now_ns(0) < t1 + 1_000_000 {
        core::hint::spin_loop();
    }
    let tsc_per_ms = (rdtsc() - c1).max(1);
    // SAFETY: written once by ring 0 before user mode started.
    let k_tsc = unsafe { kmode_loop_tsc }.max(1);
    let kmode_mips = 20_000 * tsc_per_ms / k_tsc / 1000;
    // Wait (bounded) for the APs started by the kernel.
    let mut online = 0;
    let deadline = t0 + 20_000_000_000;
    while now_ns(0) < deadline {
        // SAFETY: counter incremented by APs in ring 0.
        online = unsafe { aps_online.load(Acquire) } + 1;
        if online >= p.cpus {
            break;
        }
    }
    // Work with the vCPUs that came up (the boot line says how many of how many).
    let wanted = p.cpus;
    let mut p = p;
    p.cpus = online.clamp(1, wanted);
    // SAFETY: only cpu 0 writes PARAMS, before GO.
    unsafe { PARAMS = p };
    let (_, _, ecx, _) = cpuid(1);
    Line::new()
        .s("GUEST boot cpus=")
        .u(online)
        .s("/")
        .u(wanted)
        .s(" work_mib=")
        .u(p.pages / 256)
        .s(" rate=")
        .u(p.rate)
        .s(" hot=")
        .u(p.hot_pct)
        .s(" kvmclock=")
        // SAFETY: flag written by ring 0 before user mode started.
        .s(if unsafe { kvmclock_ok.load(Relaxed) } != 0 { "yes" } else { "no" })
        .s(" avx=")
        .s(if avx() { "yes" } else { "no" })
        .s(" kmode_mips=")
        .u(kmode_mips)
        .s(" pio_ns=")
        .u(pio_ns)
        .s(" x2apic=")
        .s(if ecx & (1 << 21) != 0 { "yes" } else { "no" })
        .send();
    let mut dev = Devices::probe(&p);
    GO.store(true, Release);
    let tf = now_ns(0);
    fill(params(), 0);
    while FILLED.load(Acquire) < p.pages && now_ns(0) < tf + 60_000_000_000 {
        core::hint::spin_loop();
    }
    Line::new().s("READY fill_ms=").u((now_ns(0) - tf) / 1_000_000).send();
    worker_loop(0, &mut dev)
}

/// `dev`: cpu 0's devices (none on the other cpus).
fn worker_loop(cpu: usize, dev: &mut Devices) -> ! {
    let p = *params();
    let mut rng = 0x9e37_79b9_7f4a_7c15u64 ^ (cpu as u64 + 1) << 32 ^ now_ns(cpu);
    let start = now_ns(cpu);
    let rate = p.rate / p.cpus;
    let mut done = 0u64;
    let mut written = 0u64;
    let mut skipped = 0u64;
    let mut round = 0u64;
    let mut seq = 0u64;
    let mut next_hb = start;
    let mut reported_fail = [0u64; MAX_CPUS];
    loop {
        let now = now_ns(cpu);
        let gen = QUIESCE_GEN.load(Acquire);
        if WRITES_ON.load(Acquire) {
            let due = ((now - start) as u128 * rate as u128 / 1_000_000_000) as u64;
            // At most one period behind: a vCPU that was slowed down (e.g. by faults on missing
            // pages) drops the backlog instead of writing it in one burst, so heartbeats stay
            // regular and their gaps show real stalls.
            let per_period = (rate * p.hb_ms / 1000).max(1);
            if due > done + per_period {
                skipped += due - done - per_period;
                done = due - per_period;
            }
            while done < due {
                write_page(&p, cpu, &mut rng, done);
                done += 1;
                written += 1;
            }
            WRITES[cpu].store(written, Relaxed);
        } else {
            // Skip what was not written while quiesced.
            done = ((now - start) as u128 * rate as u128 / 1_000_000_000) as u64;
        }
        SKIPPED[cpu].store(skipped, Relaxed);
        SEEN_GEN[cpu].store(gen, Release);
        if let Some(n) = &mut dev.net {
            serve_net(cpu, n);
        }
        if cpu == 0 && now >= next_hb {
            let blkerr = dev.blk.as_ref().map_or(0, |b| b.errs);
            heartbeat(&p, seq, now, &mut reported_fail, blkerr, &mut dev.net);
            if let Some(b) = &mut dev.blk {
                b.background();
            }
            if let Some(n) = &mut dev.net {
                n.ack_interrupts();
            }
            seq += 1;
            next_hb += p.hb_ms * 1_000_000;
            if next_hb < now {
                next_hb = now + p.hb_ms * 1_000_000;
            }
            poll_serial(&p, dev);
        }
        round += 1;
        if !idle_and_check(cpu, round) {
            SIMD_FAIL[cpu].fetch_add(1, Relaxed);
        }
    }
}

/// Polls the network device on `cpu` (0, the one its interrupt goes to).
fn serve_net(cpu: usize, n: &mut net::Net) {
    // Cleared before looking at the rings: an interrupt from here on sets it
    // again and the next idle `hlt` does not sleep.
    // SAFETY: a byte array in the kernel's data, user-accessible.
    unsafe { irq_wake[cpu].store(0, SeqCst) };
    n.poll();
}

/// The heartbeat line (cpu 0; the network is served while it is written).
fn heartbeat(
    p: &Params,
    seq: u64,
    now: u64,
    reported: &mut [u64; MAX_CPUS],
    blkerr: u64,
    net: &mut Option<net::Net>,
) {
    let mut l = Line::new();
    l.s("HB seq=").u(seq).s(" t_us=").u(now / 1000).s(" tick=");
    let mut writes = 0;
    let mut skipped = 0;
    let mut fail = false;
    for c in 0..p.cpus as usize {
        if c > 0 {
            l.s(",");
        }
        // SAFETY: tick counters are only incremented by the timer handler.
        l.u(unsafe { ticks[c].load(Relaxed) });
        writes += WRITES[c].load(Relaxed);
        skipped += SKIPPED[c].load(Relaxed);
        let f = SIMD_FAIL[c].load(Relaxed);
        if f != reported[c] {
            reported[c] = f;
            fail = true;
        }
    }
    l.s(" w=").u(writes);
    if skipped > 0 {
        l.s(" behind=").u(skipped);
    }
    l.s(" simd=").s(if fail { "FAIL" } else { "ok" });
    if blkerr > 0 {
        l.s(" blkerr=").u(blkerr);
    }
    l.send_serving(0, net);
}

fn poll_serial(p: &Params, dev: &mut Devices) {
    while inb(COM1 + 5) & 1 != 0 {
        let b = inb(COM1);
        Line::new().s("RX ").x(b as u64, 2).send();
        match b {
            b'q' | b'c' => {
                if b == b'q' {
                    quiesce(p);
                }
                let h = checksum(p);
                Line::new().s("CK ").x(h, 16).s(" pages=").u(FILLED.load(Acquire)).send();
            }
            b'r' => {
                WRITES_ON.store(true, Release);
                Line::new().s("RESUMED").send();
            }
            b'x' => {
                Line::new().s("POWEROFF").send();
                outb(0x64, 0xfe);
            }
            b'w' | b'v' => match &mut dev.blk {
                Some(bw) if b == b'w' => bw.cmd_write(),
                Some(bw) => bw.cmd_verify(),
                None => Line::new().s("BLK off").send(),
            },
            b'n' => match &dev.net {
                Some(n) => {
                    let s = &n.stats;
                    Line::new()
                        .s("NET rx=")
                        .u(s.rx)
                        .s(" tx=")
                        .u(s.tx)
                        .s(" arp=")
                        .u(s.arp)
                        .s(" icmp=")
                        .u(s.icmp)
                        .s(" udp=")
                        .u(s.udp)
                        .s(" drop=")
                        .u(s.drop)
                        .send();
                }
                None => Line::new().s("NET off").send(),
            },
            _ => {}
        }
    }
}

/// Stops writes on every cpu and waits (bounded) until each has seen it.
fn quiesce(p: &Params) {
    WRITES_ON.store(false, Release);
    let gen = QUIESCE_GEN.fetch_add(1, AcqRel) + 1;
    let deadline = now_ns(0) + 2_000_000_000;
    for c in 1..p.cpus as usize {
        while SEEN_GEN[c].load(Acquire) < gen && now_ns(0) < deadline {
            core::hint::spin_loop();
        }
    }
}

#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    serial_write(b"PANIC\n");
    loop {
        core::hint::spin_loop();
    }
}

// The freestanding build has no libc: the few memory routines the compiler
// may call, without loops it could turn back into calls to themselves.
#[no_mangle]
unsafe extern "C" fn memcpy(d: *mut u8, s: *const u8, n: usize) -> *mut u8 {
    // SAFETY: the caller's contract (non-overlapping valid ranges).
    unsafe { asm!("rep movsb", inout("rdi") d => _, inout("rsi") s => _, inout("rcx") n => _, options(nostack)) };
    d
}

#[no_mangle]
unsafe extern "C" fn memmove(d: *mut u8, s: *const u8, n: usize) -> *mut u8 {
    if (d as usize) <= (s as usize) || (d as usize) >= (s as usize) + n {
        // SAFETY: forward copy is safe when d is not inside (s, s+n).
        return unsafe { memcpy(d, s, n) };
    }
    // SAFETY: backward copy for the overlapping case.
    unsafe {
        asm!("std", "rep movsb", "cld", inout("rdi") d.add(n - 1) => _,
             inout("rsi") s.add(n - 1) => _, inout("rcx") n => _, options(nostack))
    };
    d
}

#[no_mangle]
unsafe extern "C" fn memset(d: *mut u8, c: i32, n: usize) -> *mut u8 {
    // SAFETY: the caller's contract (valid range).
    unsafe { asm!("rep stosb", inout("rdi") d => _, inout("rcx") n => _, in("al") c as u8, options(nostack)) };
    d
}

#[no_mangle]
unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    for i in 0..n {
        // SAFETY: the caller's contract (valid ranges).
        let (x, y) = unsafe { (core::ptr::read_volatile(a.add(i)), core::ptr::read_volatile(b.add(i))) };
        if x != y {
            return x as i32 - y as i32;
        }
    }
    0
}

#[no_mangle]
unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: same contract as memcmp.
    unsafe { memcmp(a, b, n) }
}

/// Referenced from the precompiled `core`'s unwind tables; never called
/// (this kernel is built with panic=abort and drops the unwind tables).
#[no_mangle]
extern "C" fn rust_eh_personality() {}
