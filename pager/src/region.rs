//! The destination memory: one anonymous mapping the pager owns (regions laid out back to
//! back), or regions the caller adopted in (a VMM's guest RAM). Maps flat page indices to host
//! addresses. Owns no userfaultfd logic. The mapping is made, advised and unmapped through
//! `nix::sys::mman`.

use std::io;
use std::num::NonZeroUsize;
use std::ptr::NonNull;

use nix::errno::Errno;
use nix::sys::mman::{madvise, mmap_anonymous, munmap, MapFlags, MmapAdvise, ProtFlags};
use proto::{Layout, PageIndex};

/// Host memory backing a layout.
#[derive(Debug)]
pub struct HostMemory {
    /// (host start, bytes) per layout region.
    regions: Vec<(u64, u64)>,
    /// First page of each region, then the total.
    starts: Vec<u64>,
    page_size: u64,
    /// The mapping to unmap on drop, if we made it.
    owned: Option<(NonNull<u8>, usize)>,
}

// SAFETY: the struct only holds addresses; all access to the memory goes through the kernel
// (uffd ioctls) or through callers' own unsafe code.
unsafe impl Send for HostMemory {}
// SAFETY: as above.
unsafe impl Sync for HostMemory {}

impl HostMemory {
    /// Maps `layout.total_bytes()` of private anonymous memory, no swap reservation; every page
    /// starts missing.
    pub fn map(layout: &Layout, page_size: u32) -> io::Result<HostMemory> {
        let total = layout.total_bytes() as usize;
        // a zero length is what mmap refuses with EINVAL
        let len = NonZeroUsize::new(total).ok_or(io::Error::from(Errno::EINVAL))?;
        // SAFETY: a fresh anonymous mapping placed by the kernel (no address given, so nothing
        // existing is replaced); nothing aliases it.
        let p = unsafe {
            mmap_anonymous(
                None,
                len,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_PRIVATE | MapFlags::MAP_NORESERVE,
            )
        }?;
        let base = p.cast::<u8>();
        // no transparent huge pages: uffd MISSING works on 4 KiB pages here (best effort)
        // SAFETY: advising our own fresh mapping, exactly its range.
        let _ = unsafe { madvise(p, total, MmapAdvise::MADV_NOHUGEPAGE) };
        let mut hosts = Vec::new();
        let mut off = 0u64;
        for r in &layout.regions {
            hosts.push((base.as_ptr() as u64 + off, r.len_bytes));
            off += r.len_bytes;
        }
        let mut m = Self::build(hosts, page_size);
        m.owned = Some((base, total));
        Ok(m)
    }

    /// Uses memory the caller mapped.
    ///
    /// # Safety
    /// Each `(addr, len)` must be a private anonymous (or shmem) mapping, page aligned, matching
    /// the layout's regions, that stays mapped while the returned value and any pager using it
    /// live.
    pub unsafe fn adopt(regions: Vec<(u64, u64)>, page_size: u32) -> HostMemory {
        Self::build(regions, page_size)
    }

    fn build(regions: Vec<(u64, u64)>, page_size: u32) -> HostMemory {
        let ps = u64::from(page_size);
        let mut starts = vec![0];
        let mut acc = 0;
        for (_, len) in &regions {
            acc += len / ps;
            starts.push(acc);
        }
        HostMemory {
            regions,
            starts,
            page_size: ps,
            owned: None,
        }
    }

    /// Host regions (start, bytes).
    pub fn regions(&self) -> &[(u64, u64)] {
        &self.regions
    }

    /// Total pages.
    pub fn total_pages(&self) -> u64 {
        *self.starts.last().unwrap_or(&0)
    }

    /// Page size in bytes.
    pub fn page_size(&self) -> u64 {
        self.page_size
    }

    /// Host address of a page, and how many pages follow it in the same region (itself
    /// included). None when out of range.
    pub fn host(&self, page: PageIndex) -> Option<(u64, u64)> {
        let p = page.0;
        if p >= self.total_pages() {
            return None;
        }
        let r = self.starts.partition_point(|&s| s <= p) - 1;
        let off = (p - self.starts[r]) * self.page_size;
        Some((self.regions[r].0 + off, self.starts[r + 1] - p))
    }

    /// The page holding host address `addr`, if inside.
    pub fn page_of(&self, addr: u64) -> Option<PageIndex> {
        for (i, (start, len)) in self.regions.iter().enumerate() {
            if addr >= *start && addr < start + len {
                return Some(PageIndex(self.starts[i] + (addr - start) / self.page_size));
            }
        }
        None
    }

    /// The whole owned mapping as bytes (for tests and checksums), if the pager made it.
    ///
    /// # Safety
    /// Reading a page that is still missing blocks the caller until the pager installs it; do
    /// not call from the pager's own threads.
    pub unsafe fn owned_bytes(&self) -> Option<&[u8]> {
        // SAFETY: the caller's contract; the mapping lives as long as self.
        self.owned
            .map(|(p, l)| unsafe { std::slice::from_raw_parts(p.as_ptr(), l) })
    }
}

impl Drop for HostMemory {
    fn drop(&mut self) {
        if let Some((p, l)) = self.owned {
            // SAFETY: unmapping the mapping we made; borrows of it end with self.
            let _ = unsafe { munmap(p.cast(), l) };
        }
    }
}
