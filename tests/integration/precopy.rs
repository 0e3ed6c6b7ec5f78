//! Pre-copy through the real page-server and pager: the source memory changes while it is
//! streamed, pages marked dirty go out again and overwrite their older copies, and at the switch
//! the pages modified since they were sent are dropped on the receiver and fetched fresh.
//! Every byte is compared with the source at the end.

use std::ptr::NonNull;
use std::sync::Arc;
use std::time::{Duration, Instant};

use page_server::{serve, RawRegions, ServerConfig};
use pager::{Pager, PagerConfig};
use proto::Layout;

use crate::common::*;

/// A page-aligned anonymous buffer (the "running VM's" memory), unmapped on drop.
struct Source {
    ptr: *mut u8,
    len: usize,
}

impl Source {
    fn new(pages: u64) -> Source {
        let len = pages as usize * PS;
        // SAFETY: a fresh private anonymous mapping of our own.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(ptr, libc::MAP_FAILED);
        let s = Source {
            ptr: ptr.cast(),
            len,
        };
        let mut page = vec![0u8; PS];
        for i in 0..pages {
            pattern_page(i, &mut page);
            s.write_page(i, &page);
        }
        s
    }
    /// Writes page `i` (like a running guest: the server may be reading it meanwhile; a torn
    /// read only ever concerns a page that is then marked dirty and sent again).
    fn write_page(&self, i: u64, data: &[u8]) {
        assert!(i < (self.len / PS) as u64 && data.len() == PS);
        // SAFETY: the page lies inside our mapping and `data` is one page long.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr.add(i as usize * PS), PS) }
    }
    fn bytes(&self) -> &[u8] {
        // SAFETY: our whole mapping.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

impl Drop for Source {
    fn drop(&mut self) {
        // SAFETY: our own mapping, no longer used (the server was stopped first).
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// Rewrites `n` pseudo-random pages (`seed`) and returns them as a bitmap (proto byte order).
fn dirty_some(src: &Source, pages: u64, n: u64, seed: u64) -> Vec<u8> {
    let mut bits = vec![0u8; pages.div_ceil(8) as usize];
    let mut r = Rng(seed);
    for _ in 0..n {
        let p = r.next() % pages;
        let fill = (r.next() as u8) | 1;
        src.write_page(p, &[fill; PS]);
        bits[(p / 8) as usize] |= 1 << (p % 8);
    }
    bits
}

fn wait_all_sent(server: &page_server::ServerHandle) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while server.unsent_pages() > 0 {
        assert!(
            Instant::now() < deadline,
            "the stream did not send everything"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn precopy_passes_then_switch_leave_no_stale_page() {
    if !uffd_or_skip("precopy_passes_then_switch_leave_no_stale_page") {
        return;
    }
    let pages = 64 * 256; // 64 MiB
    let src = Source::new(pages);
    let hosts = vec![(NonNull::new(src.ptr).unwrap(), src.len)];
    // SAFETY: `src` outlives the server (stopped before `src` drops, below).
    let mem = unsafe { RawRegions::new(hosts, Layout::single(src.len as u64), PS as u32) };
    let server = serve(
        Arc::new(mem),
        &"127.0.0.1:0".parse().unwrap(),
        ServerConfig {
            precopy: true,
            security: tests::security(),
            ..ServerConfig::default()
        },
    )
    .expect("serve");
    let cfg = PagerConfig {
        precopy: true,
        bulk_connections: 1,
        ..crate::common::pager_cfg()
    };
    let mut p = Pager::connect(server.addr(), cfg).expect("connect");
    // pass 1: everything; the receiver has every page but does not complete
    wait_all_sent(&server);
    let deadline = Instant::now() + Duration::from_secs(30);
    while p.present_pages() < pages {
        assert!(Instant::now() < deadline, "pass 1 incomplete");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(
        p.wait(Duration::from_millis(200)).is_none(),
        "completed during pre-copy"
    );
    // pass 2: 2000 pages changed and sent again (they overwrite their copies)
    let d1 = dirty_some(&src, pages, 2000, 7);
    let distinct = |b: &[u8]| b.iter().map(|x| u64::from(x.count_ones())).sum::<u64>();
    assert_eq!(server.resend(&d1), distinct(&d1));
    wait_all_sent(&server);
    // switch: 500 more changed and not sent; the receiver drops its copies of them
    let d2 = dirty_some(&src, pages, 500, 11);
    // (the receiver learns of them before their fresh copies are sent; the other order, fresh
    // copies first, is what a live migration usually sees and is covered there)
    let sent_precopy = server.end_precopy();
    let dropped = p.end_precopy(&d2, sent_precopy).expect("end_precopy");
    assert_eq!(dropped, distinct(&d2), "every modified page is dropped");
    server.resend(&d2);
    let rep = match p.wait(Duration::from_secs(10)) {
        Some(Ok(r)) => r,
        other => panic!(
            "no completion: {:?}; present {} of {}, server unsent {}, stats {:?}",
            other.map(|r| r.map(|_| ())),
            p.present_pages(),
            p.total_pages(),
            server.unsent_pages(),
            server.stats()
        ),
    };
    assert!(rep.precopy_rewrites > 1000, "{rep:?}");
    assert_eq!(rep.precopy_dropped, dropped);
    // SAFETY: the pager mapped this region itself and is complete: nothing writes it now.
    let got = unsafe { p.memory().owned_bytes() }.expect("owned mapping");
    assert!(got == src.bytes(), "receiver differs from the source");
    drop(p);
    drop(server);
}
