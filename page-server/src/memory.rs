//! Memory providers: what the server reads pages from. A file image (mmap'd read-only) or
//! memory regions of this process (the VMM's guest RAM). The server only ever reads.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::Arc;

use proto::{Layout, PageIndex};
use thiserror::Error;

/// Opening a memory image failed.
#[derive(Debug, Error)]
pub enum ImageError {
    /// The file could not be opened or measured.
    #[error("cannot open memory image {path}")]
    Open {
        /// The image.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file's size is not a non-zero multiple of the page size.
    #[error(
        "memory image {path} is {len} bytes, not a non-zero multiple of the page size {page_size}"
    )]
    BadSize {
        /// The image.
        path: PathBuf,
        /// Its size.
        len: u64,
        /// The page size.
        page_size: u32,
    },
    /// mmap failed.
    #[error("cannot map memory image {path}")]
    Map {
        /// The image.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

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

/// A read-only private mapping of a whole file.
#[derive(Debug)]
pub struct FileImage {
    ptr: NonNull<u8>,
    len: usize,
    layout: Layout,
    page_size: u32,
}

// SAFETY: the mapping is read-only and lives as long as the FileImage; sharing `&[u8]` views of
// it between threads is sound.
unsafe impl Send for FileImage {}
// SAFETY: as above: only shared reads.
unsafe impl Sync for FileImage {}

impl FileImage {
    /// Maps `path` read-only as one region at guest-physical 0.
    pub fn open(path: &Path, page_size: u32) -> Result<Self, ImageError> {
        let open_err = |source| ImageError::Open {
            path: path.to_owned(),
            source,
        };
        let file = File::open(path).map_err(open_err)?;
        let len = file.metadata().map_err(open_err)?.len();
        if len == 0 || len % u64::from(page_size) != 0 {
            return Err(ImageError::BadSize {
                path: path.to_owned(),
                len,
                page_size,
            });
        }
        // SAFETY: a fresh read-only shared mapping of a file we opened; no Rust object aliases
        // the returned range. The file may be changed by others; we only copy bytes out of it.
        // MAP_POPULATE maps every page up front, so serving a fault never takes a page fault.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len as usize,
                libc::PROT_READ,
                libc::MAP_SHARED | libc::MAP_POPULATE,
                file.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(ImageError::Map {
                path: path.to_owned(),
                source: std::io::Error::last_os_error(),
            });
        }
        let ptr = NonNull::new(p.cast::<u8>()).ok_or_else(|| ImageError::Map {
            path: path.to_owned(),
            source: std::io::Error::other("mmap returned null"),
        })?;
        Ok(FileImage {
            ptr,
            len: len as usize,
            layout: Layout::single(len),
            page_size,
        })
    }

    /// The whole image.
    pub fn bytes(&self) -> &[u8] {
        // SAFETY: ptr/len describe our live read-only mapping.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for FileImage {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the mapping we created; no borrows outlive self.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

impl MemoryProvider for FileImage {
    fn page_size(&self) -> u32 {
        self.page_size
    }
    fn layout(&self) -> &Layout {
        &self.layout
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

/// Whether a page is all zero. Data pages usually differ in their first bytes and return at
/// once; zero pages are scanned 64 bytes per step with no branch inside a step (vectorizes).
#[inline]
pub fn is_zero_page(page: &[u8]) -> bool {
    // SAFETY: u64 has no invalid bit patterns; align_to handles the unaligned ends.
    let (pre, mid, post) = unsafe { page.align_to::<u64>() };
    if pre.iter().chain(post).any(|&b| b != 0) {
        return false;
    }
    let mut chunks = mid.chunks_exact(8);
    for c in &mut chunks {
        if c.iter().fold(0u64, |a, &w| a | w) != 0 {
            return false;
        }
    }
    chunks.remainder().iter().all(|&w| w == 0)
}
