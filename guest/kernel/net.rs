//! virtio-net driver and a tiny responder: ARP requests for our address,
//! ICMP echo requests and UDP echo (port 7).  Every received frame is
//! handled in place and its buffer re-posted; replies go out through a ring
//! of static transmit buffers (descriptor i always points at buffer i).

use crate::virtio::{Dma, Mmio, Queue, Ring, F_WRITE, QSIZE};
use core::ptr::addr_of_mut;

/// With VERSION_1 every buffer starts with a 12-byte virtio_net_hdr_v1.
const HDR: usize = 12;
const BUFSZ: usize = 2048;
const F_MAC: u32 = 1 << 5;

#[repr(C, align(4096))]
struct Bufs([[u8; BUFSZ]; QSIZE]);

static RX_RING: Dma<Ring> = Dma::new(Ring::new());
static TX_RING: Dma<Ring> = Dma::new(Ring::new());
static RX: Dma<Bufs> = Dma::new(Bufs([[0; BUFSZ]; QSIZE]));
static TX: Dma<Bufs> = Dma::new(Bufs([[0; BUFSZ]; QSIZE]));

fn buf_addr(b: &Dma<Bufs>, i: usize) -> u64 {
    // SAFETY: only the address is computed (i < QSIZE, checked by indexing).
    unsafe { addr_of_mut!((*b.ptr()).0[i]) as u64 }
}

#[derive(Default)]
pub struct Stats {
    pub rx: u64,
    pub tx: u64,
    pub arp: u64,
    pub icmp: u64,
    pub udp: u64,
    pub drop: u64,
}

pub struct Net {
    mmio: Mmio,
    rx: Queue,
    tx: Queue,
    mac: [u8; 6],
    ip: Option<[u8; 4]>,
    /// Bit i: transmit descriptor/buffer i is ours.
    tx_free: u32,
    /// The device used buffers since our last InterruptACK.
    unacked: bool,
    pub stats: Stats,
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

/// The Internet checksum of `b` (0 when `b` holds a valid checksum).
fn csum(b: &[u8]) -> u16 {
    let mut s: u32 = 0;
    for c in b.chunks(2) {
        s += u32::from(c[0]) << 8 | u32::from(*c.get(1).unwrap_or(&0));
    }
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    !(s as u16)
}

impl Net {
    /// The MAC address (config offset 0, 6 bytes).
    pub fn mac(m: Mmio) -> [u8; 6] {
        m.config(|m| core::array::from_fn(|i| m.config8(i as u64)))
    }

    pub fn init(m: Mmio, ip: Option<[u8; 4]>) -> Result<Net, &'static str> {
        m.negotiate(F_MAC)?;
        let mac = Net::mac(m);
        let mut rx = m.setup_queue(0, RX_RING.ptr())?;
        let tx = m.setup_queue(1, TX_RING.ptr())?;
        for i in 0..QSIZE {
            rx.set_desc(i, buf_addr(&RX, i), BUFSZ as u32, F_WRITE);
            rx.push(i as u16);
        }
        m.driver_ok();
        rx.kick();
        // A frame that comes while cpu 0 idles in `hlt` wakes it (the first
        // poll after this picks up whatever came before).
        m.route_interrupt(crate::NET_VECTOR)?;
        Ok(Net { mmio: m, rx, tx, mac, ip, tx_free: (1 << QSIZE) - 1, unacked: false, stats: Stats::default() })
    }

    fn reclaim_tx(&mut self) {
        while let Some((id, _)) = self.tx.pop() {
            self.tx_free |= 1 << id;
        }
    }

    /// Handles every received frame (cheap when there is none: memory reads only).
    pub fn poll(&mut self) {
        self.unacked |= self.rx.pending() || self.tx.pending();
        self.reclaim_tx();
        let mut reposted = false;
        while let Some((id, len)) = self.rx.pop() {
            self.stats.rx += 1;
            // SAFETY: the device gave buffer `id` back; it is ours until re-posted below.
            let b = unsafe { &(*RX.ptr()).0[id] };
            let frame = &b[HDR.min(len as usize)..(len as usize).min(BUFSZ)];
            if !self.handle(frame) {
                self.stats.drop += 1;
            }
            self.rx.push(id as u16);
            reposted = true;
        }
        if reposted {
            self.rx.kick();
        }
    }

    /// Acknowledges the used-buffer interrupts since the last call, if any.
    /// Not per poll: each ack is a VM exit (it made the median UDP echo
    /// round trip ~0.08 ms longer), and this device sends an edge for every
    /// used buffer whether or not InterruptStatus was acknowledged; the ack
    /// only keeps that register from staying set for good.
    pub fn ack_interrupts(&mut self) {
        if self.unacked {
            self.unacked = false;
            self.mmio.ack_used();
        }
    }

    /// False: not for us / not something we answer.
    fn handle(&mut self, f: &[u8]) -> bool {
        let Some(ip) = self.ip else { return false };
        if f.len() < 14 {
            return false;
        }
        match be16(f, 12) {
            0x0806 => self.arp(f, ip),
            0x0800 => self.ipv4(f, ip),
            _ => false,
        }
    }

    fn arp(&mut self, f: &[u8], ip: [u8; 4]) -> bool {
        let a = &f[14..];
        // Ethernet/IPv4 request (op 1) for our address.
        if a.len() < 28 || a[..8] != [0, 1, 8, 0, 6, 4, 0, 1] || a[24..28] != ip {
            return false;
        }
        let mac = self.mac;
        if self.send(42, |r| {
            r[0..6].copy_from_slice(&a[8..14]);
            r[6..12].copy_from_slice(&mac);
            r[12..14].copy_from_slice(&[8, 6]);
            r[14..22].copy_from_slice(&[0, 1, 8, 0, 6, 4, 0, 2]);
            r[22..28].copy_from_slice(&mac);
            r[28..32].copy_from_slice(&ip);
            r[32..42].copy_from_slice(&a[8..18]); // requester's MAC and IP
        }) {
            self.stats.arp += 1;
        }
        true
    }

    fn ipv4(&mut self, f: &[u8], ip: [u8; 4]) -> bool {
        let p = &f[14..];
        if p.len() < 20 || p[0] >> 4 != 4 {
            return false;
        }
        let ihl = (p[0] & 15) as usize * 4;
        let total = be16(p, 2) as usize;
        // Unfragmented, to us, with a valid header checksum.
        if ihl < 20
            || total < ihl + 8
            || total > p.len()
            || p[16..20] != ip
            || be16(p, 6) & 0x3fff != 0
            || csum(&p[..ihl]) != 0
        {
            return false;
        }
        let l4 = &p[ihl..total];
        let mac = self.mac;
        // The reply: the same packet with MACs and IPs swapped, TTL 64, new header checksum.
        let reply = |r: &mut [u8]| {
            r[..14 + total].copy_from_slice(&f[..14 + total]);
            r[0..6].copy_from_slice(&f[6..12]);
            r[6..12].copy_from_slice(&mac);
            let h = &mut r[14..14 + ihl];
            h[12..16].copy_from_slice(&ip);
            h[16..20].copy_from_slice(&p[12..16]);
            h[8] = 64;
            h[10..12].fill(0);
            let c = csum(h);
            h[10..12].copy_from_slice(&c.to_be_bytes());
        };
        match p[9] {
            1 if l4[0] == 8 && l4[1] == 0 => {
                // ICMP echo request -> echo reply (type 0), checksum over the message.
                if self.send(14 + total, |r| {
                    reply(r);
                    let m = &mut r[14 + ihl..14 + total];
                    m[0] = 0;
                    m[2..4].fill(0);
                    let c = csum(m);
                    m[2..4].copy_from_slice(&c.to_be_bytes());
                }) {
                    self.stats.icmp += 1;
                }
                true
            }
            17 if be16(l4, 2) == 7 && (8..=l4.len()).contains(&(be16(l4, 4) as usize)) => {
                // UDP echo: ports swapped, no checksum.
                if self.send(14 + total, |r| {
                    reply(r);
                    let u = &mut r[14 + ihl..14 + total];
                    u[0..2].copy_from_slice(&l4[2..4]);
                    u[2..4].copy_from_slice(&l4[0..2]);
                    u[6..8].fill(0);
                }) {
                    self.stats.udp += 1;
                }
                true
            }
            _ => false,
        }
    }

    /// Transmits a `len`-byte frame (padded to 60) built by `build`; false
    /// (the reply dropped and counted) when no transmit buffer is free.
    fn send(&mut self, len: usize, build: impl FnOnce(&mut [u8])) -> bool {
        if self.tx_free == 0 {
            self.reclaim_tx();
        }
        if self.tx_free == 0 || HDR + len > BUFSZ {
            self.stats.drop += 1;
            return false;
        }
        let i = self.tx_free.trailing_zeros() as usize;
        self.tx_free &= !(1 << i);
        let len = len.max(60);
        // SAFETY: buffer i is free: the device gave it back or never had it.
        let b = unsafe { &mut (*TX.ptr()).0[i] };
        b[..HDR + len].fill(0); // also the all-zero virtio_net_hdr_v1
        build(&mut b[HDR..HDR + len]);
        self.tx.set_desc(i, buf_addr(&TX, i), (HDR + len) as u32, 0);
        self.tx.push(i as u16);
        self.tx.kick();
        self.stats.tx += 1;
        true
    }
}
