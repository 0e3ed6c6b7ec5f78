//! Memory providers: what the server reads pages from. A file image (mmap'd read-only) or
//! memory regions of this process (the VMM's guest RAM). The server only ever reads.

use std::ptr::NonNull;
use std::sync::Arc;

use proto::{Layout, PageIndex};
use transport::FileImage;

/// Something the server can read pages from. Implementations hand out the bytes of each region
/// of their layout; the flat page index space is the regions concatenated.
pub trait MemoryProvider: Send + Sync {
    /// Page size in bytes.
    fn page_size(&self) -> u32;
    /// The layout served.
    fn layout(&self) -> &Layout;
    /// The bytes of region `index` (`layout().regions[index].len_bytes` long).
    fn region_bytes(&self, index: usize) -> &[u8];
}

impl MemoryProvider for FileImage {
    fn page_size(&self) -> u32 {
        FileImage::page_size(self)
    }
    fn layout(&self) -> &Layout {
        FileImage::layout(self)
    }
    fn region_bytes(&self, index: usize) -> &[u8] {
        assert_eq!(index, 0, "file image has one region");
        self.bytes()
    }
}

/// Memory regions of this process (e.g. a VMM's guest RAM), served in place.
#[derive(Debug)]
pub struct RawRegions {
    regions: Vec<(NonNull<u8>, usize)>,
    layout: Layout,
    page_size: u32,
}

// SAFETY: the constructor's contract makes the regions readable from any thread for our lifetime.
unsafe impl Send for RawRegions {}
// SAFETY: as above; only shared reads.
unsafe impl Sync for RawRegions {}

impl RawRegions {
    /// Serves the host memory `hosts[i]` as `layout.regions[i]`.
    ///
    /// # Safety
    /// Each `(ptr, len)` must be mapped readable for the whole life of the returned value, with
    /// `len == layout.regions[i].len_bytes`. Bytes may change under the server (it copies what it
    /// finds); whoever serves a running VM's memory must account for that (dirty tracking).
    pub unsafe fn new(hosts: Vec<(NonNull<u8>, usize)>, layout: Layout, page_size: u32) -> Self {
        assert_eq!(hosts.len(), layout.regions.len());
        RawRegions {
            regions: hosts,
            layout,
            page_size,
        }
    }
}

impl MemoryProvider for RawRegions {
    fn page_size(&self) -> u32 {
        self.page_size
    }
    fn layout(&self) -> &Layout {
        &self.layout
    }
    fn region_bytes(&self, index: usize) -> &[u8] {
        let (p, l) = self.regions[index];
        // SAFETY: the constructor's contract: mapped and readable for our lifetime.
        unsafe { std::slice::from_raw_parts(p.as_ptr(), l) }
    }
}

/// Flat page index → bytes of a provider, splitting at region boundaries. Built once per
/// server (the region table never changes), not per request.
pub(crate) struct PageMap {
    mem: Arc<dyn MemoryProvider>,
    /// First page of each region, plus the total at the end.
    starts: Vec<u64>,
    page_size: u32,
}

impl PageMap {
    pub(crate) fn new(mem: Arc<dyn MemoryProvider>) -> Self {
        let ps = u64::from(mem.page_size());
        let mut starts = vec![0];
        let mut acc = 0;
        for r in &mem.layout().regions {
            acc += r.len_bytes / ps;
            starts.push(acc);
        }
        let page_size = mem.page_size();
        PageMap {
            mem,
            starts,
            page_size,
        }
    }

    /// The provider.
    pub(crate) fn mem(&self) -> &dyn MemoryProvider {
        &*self.mem
    }

    pub(crate) fn page_size(&self) -> u32 {
        self.page_size
    }

    pub(crate) fn total_pages(&self) -> u64 {
        *self.starts.last().unwrap_or(&0)
    }

    /// Bytes of up to `count` pages from `first`, stopping at the end of `first`'s region.
    /// None if `first` is out of range.
    pub(crate) fn run(&self, first: PageIndex, count: u32) -> Option<&[u8]> {
        let p = first.0;
        if p >= self.total_pages() {
            return None;
        }
        let r = self.starts.partition_point(|&s| s <= p) - 1;
        let in_region = p - self.starts[r];
        let n = u64::from(count).min(self.starts[r + 1] - p);
        let ps = self.page_size as usize;
        let off = in_region as usize * ps;
        self.mem.region_bytes(r).get(off..off + n as usize * ps)
    }
}
