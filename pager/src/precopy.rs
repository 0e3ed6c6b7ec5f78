//! Pre-copy on the receiving side: pages arrive while the source still runs, so a page may
//! come again with newer content (it overwrites the copy present, the region being unused
//! until pre-copy ends); at the switch the source says which pages changed after they were
//! sent: those are made missing again (the next access faults and fetches them fresh) and a
//! copy of one still on its way is dropped.

use std::ffi::c_void;
use std::ptr::NonNull;
use std::sync::atomic::Ordering;

use nix::errno::Errno;
use nix::sys::mman::{madvise, MmapAdvise};

use crate::error::PagerError;
use crate::shared::{Origin, Shared};
use crate::Pager;

impl Shared {
    /// Installs a run of `count` stream pages from `first` (`data`, or zero pages) while
    /// pre-copy runs, or a late `Precopy` copy after it. `fresh`: the copy was sent after the
    /// source paused (an `Origin::Stream` frame), so it is final; otherwise (`Precopy`) the
    /// page may have changed since.
    pub(crate) fn install_precopy(
        &self,
        first: u64,
        count: u64,
        data: Option<&[u8]>,
        fresh: bool,
    ) -> Result<(), PagerError> {
        let _g = self.precopy_lock.read().unwrap_or_else(|p| p.into_inner());
        let ps = self.mem.page_size();
        let still = self.precopy.load(Ordering::Acquire);
        // what to do with page p
        let act = |p: u64| -> u8 {
            let present = self.received.get(p);
            match (still, present) {
                // pre-copy: overwrite, but never a final copy with an older one
                (true, true) if fresh || !self.fresh.get(p) => 1,
                (true, true) => 0,
                (true, false) => 2,
                // after pre-copy: keep what is there; drop an old copy of a modified page
                (false, true) => 0,
                (false, false) if !fresh && self.stale.get(p) => 0,
                (false, false) => 2,
            }
        };
        let mut i = 0u64;
        while i < count {
            let a = act(first + i);
            let mut j = i + 1;
            while j < count && act(first + j) == a {
                j += 1;
            }
            let run = data.map(|d| &d[(i * ps) as usize..(j * ps) as usize]);
            match a {
                1 => self.overwrite(first + i, j - i, run),
                2 => self.install(first + i, j - i, run, Origin::Stream)?,
                _ => {}
            }
            if still && fresh && a != 0 {
                self.fresh.set_range(first + i, j - i);
            }
            i = j;
        }
        Ok(())
    }

    /// Writes over present pages (pre-copy only: nothing runs on the region yet).
    fn overwrite(&self, first: u64, count: u64, data: Option<&[u8]>) {
        let ps = self.mem.page_size();
        for k in 0..count {
            let Some((host, _)) = self.mem.host(proto::PageIndex(first + k)) else {
                continue;
            };
            let dst = host as *mut u8;
            match data {
                // SAFETY: `host` is a present page of our region (its bit is received), of
                // `ps` bytes; during pre-copy nothing else reads or writes it; `d` holds
                // `count * ps` bytes.
                Some(d) => unsafe {
                    std::ptr::copy_nonoverlapping(d[(k * ps) as usize..].as_ptr(), dst, ps as usize)
                },
                // SAFETY: as above; zeroing the page in place.
                None => unsafe { std::ptr::write_bytes(dst, 0, ps as usize) },
            }
        }
        self.stats
            .precopy_rewrites
            .fetch_add(count, Ordering::Relaxed);
    }
}

impl Pager {
    /// Ends pre-copy: `dirty` (little-endian bytes, one bit per page) are the pages the source
    /// modified after it last sent them. Each of them that is present is dropped (made missing
    /// again: the next access faults and fetches it) unless its final copy (sent after the
    /// source paused) already came, and an older copy still on its way is dropped when it
    /// comes. From now on the pager completes once every page is present. Returns how
    /// many present pages were dropped. Call before anything uses the region.
    ///
    /// `precopy_pages`: how many pages the source sent as `Precopy` in all
    /// (`ServerHandle::end_precopy`); this waits (up to 30 s) until they have all come, so no
    /// older copy can arrive once the region is in use.
    pub fn end_precopy(&self, dirty: &[u8], precopy_pages: u64) -> Result<u64, PagerError> {
        let sh = &self.shared;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while sh.stats.precopy_received.load(Ordering::Acquire) < precopy_pages {
            if sh.stop.load(Ordering::Acquire) || std::time::Instant::now() > deadline {
                return Err(PagerError::Protocol {
                    addr: "the page source".into(),
                    what: format!(
                        "pre-copy: {} of the {precopy_pages} pages the source sent have come",
                        sh.stats.precopy_received.load(Ordering::Acquire)
                    ),
                });
            }
            std::thread::sleep(std::time::Duration::from_micros(200));
        }
        let _w = sh.precopy_lock.write().unwrap_or_else(|p| p.into_inner());
        sh.stale.merge_bytes(0, dirty, sh.total_pages());
        let ps = sh.mem.page_size();
        let mut dropped = 0;
        for (bi, &byte) in dirty.iter().enumerate() {
            let mut b = byte;
            while b != 0 {
                let p = bi as u64 * 8 + u64::from(b.trailing_zeros());
                b &= b - 1;
                if !sh.received.get(p) || sh.fresh.get(p) {
                    continue;
                }
                let Some((host, _)) = sh.mem.host(proto::PageIndex(p)) else {
                    continue;
                };
                // address 0 is never mapped: madvise would answer ENOMEM
                let addr = NonNull::new(host as *mut c_void).ok_or(Errno::ENOMEM);
                // SAFETY: one page of our own registered anonymous region, unused until
                // pre-copy ends; after MADV_DONTNEED it is missing again and faults to us.
                let rc = addr
                    .and_then(|a| unsafe { madvise(a, ps as usize, MmapAdvise::MADV_DONTNEED) });
                if let Err(errno) = rc {
                    return Err(PagerError::Map {
                        len_bytes: ps,
                        source: std::io::Error::from(errno),
                    });
                }
                sh.received.clear(p);
                sh.present.fetch_sub(1, Ordering::AcqRel);
                dropped += 1;
            }
        }
        sh.precopy.store(false, Ordering::Release);
        sh.stats
            .precopy_dropped
            .fetch_add(dropped, Ordering::Relaxed);
        drop(_w);
        sh.check_complete();
        Ok(dropped)
    }
}
