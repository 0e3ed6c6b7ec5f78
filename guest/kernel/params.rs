//! The workload's parameters: from the PVH start info (the RAM map, the command line's
//! `key=value` words; see the crate doc for the keys).

use crate::{start_info_ptr, MAX_CPUS, PAGE, WORK_BASE};

#[derive(Clone, Copy)]
pub(crate) struct Range {
    pub(crate) start: u64,
    pub(crate) pages: u64,
}

#[derive(Clone, Copy)]
pub(crate) struct Params {
    pub(crate) cpus: u64,
    pub(crate) fill_mib: u64,
    pub(crate) rate: u64,
    pub(crate) hot_pct: u64,
    pub(crate) hb_ms: u64,
    pub(crate) ranges: [Range; 4],
    pub(crate) nranges: usize,
    pub(crate) pages: u64,
    /// Block workload sectors (u64::MAX: the default).
    pub(crate) blk: u64,
    pub(crate) ip: Option<[u8; 4]>,
}

impl Params {
    pub(crate) const DEFAULT: Params = Params {
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
    pub(crate) fn page_addr(&self, mut p: u64) -> u64 {
        for r in &self.ranges[..self.nranges] {
            if p < r.pages {
                return r.start + p * PAGE;
            }
            p -= r.pages;
        }
        self.ranges[0].start
    }
}

pub(crate) fn parse_params() -> Params {
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

pub(crate) fn add_ram(p: &mut Params, ty: u32, addr: u64, size: u64) {
    pub(crate) const LIMIT: u64 = 16 << 30; // the identity map's reach
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

pub(crate) fn parse_cmdline(s: &[u8], p: &mut Params) {
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

pub(crate) fn parse_ip(v: &[u8]) -> Option<[u8; 4]> {
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
