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
mod params;
mod serial;
mod simd;
mod time;
mod virtio;

use params::{parse_params, Params};
use serial::{inb, outb, serial_write, Line};
use simd::{avx, idle_and_check, simd_seed};
use time::{calibrate_tsc, cpuid, now_ns, rdtsc};

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

fn params() -> &'static Params {
    // SAFETY: PARAMS is written by cpu 0 only before GO is released (Release);
    // every reader waits for GO (Acquire) first.
    unsafe { &*core::ptr::addr_of!(PARAMS) }
}

impl Line {
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
